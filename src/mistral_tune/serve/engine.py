"""Continuous batching: one thread owns the model and decodes every running request together.

A request waits in a bounded queue, is prefilled alone (so its first token is the one `generate`
would pick), then joins the running batch. Each step feeds every row its last token and picks
each row's next one with the row's own sampling settings. A row leaves when it ends: end of
sequence, max_tokens, or cancelled by its consumer (a stop string was found, the client left).
Rows of different lengths share one KV cache, right-aligned (KVCache.join/select), with a key
mask over the padding on their left, so each row's tokens equal what it would get alone.

Consumers are told what happens through a `sink` called on the engine thread with each new token
id (an int) and, last, an `End`; a sink must return at once (hand the item to a queue).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.mistral import KVCache, MistralForCausalLM
from .generate import _last_logits, _pick


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class End:
    """The last item a request's sink gets. reason: "stop" (end of sequence), "length"
    (max_tokens), "cancelled" (by its consumer), "error" (see error)."""

    reason: str
    error: BaseException | None = None


class QueueFull(Exception):
    """The batch and the queue are full."""


class QueueTimeout(Exception):
    """A request waited in the queue longer than the engine's queue_timeout."""


class Request:
    def __init__(self, prompt: list[int], params: Params, sink: Callable[[int | End], None],
                 release: Callable[[Request], None]) -> None:
        self.prompt, self.params, self.sink = prompt, params, sink
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.queued_at = time.monotonic()
        self.count = 0  # tokens sent
        self.cancelled = False
        self.released = False  # its place in the batch + queue given back (under the engine's lock)
        self._release = release

    def cancel(self) -> None:
        """Ask the engine to drop this request (at its next step; harmless once it has ended). Its place
        counts as free at once: a client that stopped reading an answer (a stop string, a response
        sent) and asks again is not turned away while the engine catches up; the next request waits
        in the queue until the row has left the batch."""
        self.cancelled = True
        self._release(self)


class Engine:
    def __init__(self, model: MistralForCausalLM, eos_id: int | None, max_batch: int = 16, queue_depth: int = 64,
                 queue_timeout: float = 60.0) -> None:
        if max_batch < 1 or queue_depth < 0 or queue_timeout <= 0:
            raise ValueError("max_batch must be >= 1, queue_depth >= 0 and queue_timeout > 0")
        self.model, self.eos_id = model, eos_id
        self.max_batch, self.queue_depth, self.queue_timeout = max_batch, queue_depth, queue_timeout
        self.device = model.lm_head.weight.device
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._in_flight = 0  # waiting + running, counted under _cond
        self._closed = False
        # The running batch (engine thread only): rows, their next input token and its position,
        # the shared cache and which of its keys each row may attend.
        self.rows: list[Request] = []
        self._tokens = self._positions = self._key_mask = None
        self._cache = KVCache(model.config.num_hidden_layers)
        model.eval()
        self._thread = threading.Thread(target=self._run, name="mistral-tune-engine", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- any thread

    def submit(self, prompt: list[int], params: Params, sink: Callable[[int | End], None]) -> Request:
        """Queue a request; raises QueueFull when max_batch + queue_depth requests are in flight."""
        req = Request(prompt, params, sink, self._release)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._in_flight >= self.max_batch + self.queue_depth:
                raise QueueFull(f"{self._in_flight} requests in flight (batch {self.max_batch}, "
                                f"queue {self.queue_depth})")
            self._in_flight += 1
            self._waiting.append(req)
            self._cond.notify()
        return req

    def close(self) -> None:
        """Stop the engine thread; requests still in flight end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    # -------------------------------------------------------------- the engine thread

    def _release(self, req: Request) -> None:
        with self._cond:
            if not req.released:
                req.released = True
                self._in_flight -= 1

    def _end(self, req: Request, end: End) -> None:
        self._release(req)
        req.sink(end)

    def _run(self) -> None:
        with torch.no_grad():
            while (admitted := self._admit()) is not None:
                for req in admitted:
                    self._prefill(req)
                if self.rows:
                    self._step()

    def _admit(self) -> list[Request] | None:
        """Requests that may join the batch now (None: closed); ends cancelled and timed-out ones."""
        ended: list[tuple[Request, End]] = []
        with self._cond:
            while not self._closed and not self._waiting and not self.rows:
                self._cond.wait()
            if self._closed:
                ended = [(r, End("error", RuntimeError("the server is shutting down")))
                         for r in self._waiting + self.rows]
                self._waiting, self.rows = [], []
                admitted = None
            else:
                now, free, admitted, kept = time.monotonic(), self.max_batch - len(self.rows), [], []
                for req in self._waiting:
                    if req.cancelled:
                        ended.append((req, End("cancelled")))
                    elif len(admitted) < free:
                        admitted.append(req)
                    elif now - req.queued_at > self.queue_timeout:
                        ended.append((req, End("error", QueueTimeout(
                            f"waited {now - req.queued_at:.0f} s in the queue (limit {self.queue_timeout:g} s)"))))
                    else:
                        kept.append(req)
                self._waiting = kept
        for req, end in ended:
            self._end(req, end)
        return admitted

    def _picks(self, rows: list[Request], logits: torch.Tensor) -> list[int | Exception]:
        """Each row's next token with its own sampling settings (or why it could not be sampled:
        a diverged model's NaN logits fail that row alone)."""
        greedy = logits.argmax(-1).tolist()
        out: list[int | Exception] = []
        for i, req in enumerate(rows):
            p = req.params
            if p.temperature <= 0:
                out.append(greedy[i])
                continue
            try:
                out.append(int(_pick(logits[i:i + 1], p.temperature, p.top_p, req.generator)[0]))
            except RuntimeError as exc:
                out.append(exc)
        return out

    def _emit(self, req: Request, token: int | Exception) -> bool:
        """Send a row its token; False if the row has ended."""
        if isinstance(token, Exception):
            self._end(req, End("error", token))
        elif req.cancelled:
            self._end(req, End("cancelled"))
        elif token == self.eos_id:
            self._end(req, End("stop"))
        else:
            req.count += 1
            req.sink(token)
            if req.count < req.params.max_tokens:
                return True
            self._end(req, End("length"))
        return False

    def _prefill(self, req: Request) -> None:
        """The prompt alone (as `generate` does), then the row joins the batch right-aligned."""
        cache = KVCache(self.model.config.num_hidden_layers)
        try:
            logits = _last_logits(self.model, torch.tensor([req.prompt], device=self.device), kv_cache=cache)
            token = self._picks([req], logits)[0]
        except Exception as exc:  # out of memory, a failing model: this request fails, the rest go on
            token = exc
        if not self._emit(req, token):
            return
        n, dev = len(req.prompt), self.device
        if not self.rows:
            self._cache, self._key_mask = cache, torch.ones(1, n, dtype=torch.bool, device=dev)
            self._tokens = torch.tensor([token], device=dev)
            self._positions = torch.tensor([n], device=dev)
        else:
            width = max(self._key_mask.shape[1], n)
            old = torch.nn.functional.pad(self._key_mask, (width - self._key_mask.shape[1], 0))
            new = torch.arange(width, device=dev)[None] >= width - n
            self._cache.join(cache)
            self._key_mask = torch.cat([old, new])
            self._tokens = torch.cat([self._tokens, torch.tensor([token], device=dev)])
            self._positions = torch.cat([self._positions, torch.tensor([n], device=dev)])
        self.rows.append(req)

    def _step(self) -> None:
        """One token for every running row; rows that end leave the batch."""
        rows, B = self.rows, len(self.rows)
        self._key_mask = torch.cat([self._key_mask, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
        try:
            logits = self.model(self._tokens[:, None], position_ids=self._positions[:, None], kv_cache=self._cache,
                                key_mask=self._key_mask)[:, -1]
            picks = self._picks(rows, logits)
        except Exception as exc:  # the batch's step failed (out of memory): its rows fail, the engine goes on
            picks = [exc] * B
        keep = [i for i, (req, token) in enumerate(zip(rows, picks)) if self._emit(req, token)]
        if not keep:
            self.rows = []
            self._cache = KVCache(self.model.config.num_hidden_layers)
            return
        self._tokens = torch.tensor([picks[i] for i in keep], device=self.device)
        self._positions = self._positions + 1
        if len(keep) < B:
            index = torch.tensor(keep, device=self.device)
            mask = self._key_mask[index]
            start = int(mask.any(0).int().argmax())  # columns before it are padding in every row left
            self._key_mask, self._positions = mask[:, start:], self._positions[index]
            self._cache.select(index, start)
            self.rows = [rows[i] for i in keep]
