"""Continuous batching: one thread owns the model and decodes every running request together.

A request waits in a bounded queue, is prefilled alone (so its first token is the one `generate`
would pick), then joins the running batch. Each step feeds every row its last token and picks
each row's next one with the row's own sampling settings. A row leaves when it ends: end of
sequence, max_tokens, or cancelled by its consumer (a stop string was found, the client left).
Rows of different lengths share one KV cache, right-aligned (KVCache.join/select), with a key
mask over the padding on their left, so each row's tokens equal what it would get alone.

Consumers are told what happens through a `sink` called on the engine thread with each new
`Token` and, last, an `End`; a sink must return at once (hand the item to a queue).

Per row, before a token is picked: a `Constraint` (generate/constrain.py) masks the tokens its
grammar does not allow (tokens past the grammar's vocabulary too), then top-k, temperature and
top-p apply. Log-probabilities are of the model's own distribution: log_softmax of the raw
logits, before the constraint's mask, temperature, top-k and top-p.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generate.constrain import Constraint, allowed_tokens
from ..models.mistral import KVCache, MistralForCausalLM
from .generate import _last_logits, _pick

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Params:
    """How one request is decoded. top_k 0: no top-k. logprobs None: none; 0: the chosen token's;
    k > 0 (at most MAX_TOP_LOGPROBS): also the k most likely tokens'. constraint: the row's grammar
    (its state advances as tokens are picked: one per request). stop_token_ids end the row as the
    end-of-sequence token does (not sent)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    logprobs: int | None = None
    constraint: Constraint | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Token:
    """One new token of a row. logprob: its log-probability under the model (log_softmax of the raw
    logits), None unless the request asked for logprobs; top: the most likely (id, logprob) pairs,
    most likely first, as many as it asked."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


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
    def __init__(self, prompt: list[int], params: Params, sink: Callable[[Token | End], None],
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

    def submit(self, prompt: list[int], params: Params, sink: Callable[[Token | End], None]) -> Request:
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

    def _picks(self, rows: list[Request], logits: torch.Tensor) -> list[Token | Exception]:
        """Each row's next token with its own settings (or why it could not be picked: a diverged
        model's NaN logits, a constraint that fails, fail that row alone)."""
        out: list[Token | Exception] = []
        masked = self._masked(rows, logits)
        greedy = masked.argmax(-1).tolist()
        for i, req in enumerate(rows):
            p = req.params
            try:
                if p.temperature <= 0:
                    token = greedy[i]
                else:
                    token = int(_pick(masked[i:i + 1], p.temperature, p.top_p, req.generator, p.top_k)[0])
                out.append(_with_logprobs(token, logits[i], p.logprobs))
            except Exception as exc:
                out.append(exc)
        return out

    @staticmethod
    def _masked(rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """logits with each constrained row's disallowed tokens at -inf."""
        constrained = [i for i, req in enumerate(rows) if req.params.constraint is not None]
        if not constrained:
            return logits
        words = -(-logits.shape[-1] // 32)
        bitmask = torch.zeros(len(constrained), words, dtype=torch.int32)
        for j, i in enumerate(constrained):
            rows[i].params.constraint.fill_mask(bitmask[j])
        allowed = allowed_tokens(bitmask.to(logits.device), logits.shape[-1])
        logits = logits.clone()
        index = torch.tensor(constrained, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits

    def _emit(self, req: Request, token: Token | Exception) -> bool:
        """Send a row its token; False if the row has ended."""
        p = req.params
        if isinstance(token, Exception):
            self._end(req, End("error", token))
        elif req.cancelled:
            self._end(req, End("cancelled"))
        elif token.id == self.eos_id or token.id in p.stop_token_ids:
            self._end(req, End("stop"))
        else:
            if p.constraint is not None:
                try:
                    p.constraint.accept(token.id)
                except Exception as exc:
                    self._end(req, End("error", exc))
                    return False
            req.count += 1
            req.sink(token)
            if p.constraint is not None and p.constraint.finished:
                self._end(req, End("stop"))  # the grammar is complete: only end of sequence may follow
            elif req.count < p.max_tokens:
                return True
            else:
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
            self._tokens = torch.tensor([token.id], device=dev)
            self._positions = torch.tensor([n], device=dev)
        else:
            width = max(self._key_mask.shape[1], n)
            old = torch.nn.functional.pad(self._key_mask, (width - self._key_mask.shape[1], 0))
            new = torch.arange(width, device=dev)[None] >= width - n
            self._cache.join(cache)
            self._key_mask = torch.cat([old, new])
            self._tokens = torch.cat([self._tokens, torch.tensor([token.id], device=dev)])
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
        self._tokens = torch.tensor([picks[i].id for i in keep], device=self.device)
        self._positions = self._positions + 1
        if len(keep) < B:
            index = torch.tensor(keep, device=self.device)
            mask = self._key_mask[index]
            start = int(mask.any(0).int().argmax())  # columns before it are padding in every row left
            self._key_mask, self._positions = mask[:, start:], self._positions[index]
            self._cache.select(index, start)
            self.rows = [rows[i] for i in keep]


def _with_logprobs(token: int, logits: torch.Tensor, k: int | None) -> Token:
    """token with its log-probability and the k most likely tokens' under the raw logits (a row)."""
    if k is None:
        return Token(token)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = ()
    if k > 0:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return Token(token, float(logprobs[token]), top)
