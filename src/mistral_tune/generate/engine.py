"""Continuous batching for a server: one thread owns the Decoder and decodes every running request
together; requests join between steps and leave when they end.

A request waits in a bounded queue until a slot is free, is prefilled (with the others that arrived
meanwhile), then decodes with the running ones. Consumers learn what happens through a `sink`
called on the engine thread with each `Token` and, last, an `End`; a sink must return at once (hand
the item to a queue). A consumer that stops reading cancels its request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from .decoder import Decoder, End, Params, Sequence, Token


class QueueFull(Exception):
    """The batch and the queue are full."""


class QueueTimeout(Exception):
    """A request waited in the queue longer than the engine's queue_timeout."""


class Request:
    def __init__(self, prompt: list[int], params: Params, sink: Callable[[Token | End], None],
                 release: Callable[[Request], None]) -> None:
        self.prompt, self.params, self.sink = prompt, params, sink
        self.queued_at = time.monotonic()
        self.cancelled = False
        self.released = False  # its place in the batch + queue given back (under the engine's lock)
        self.sequence: Sequence | None = None  # once decoding
        self._release = release

    @property
    def count(self) -> int:
        """Tokens sent so far."""
        return self.sequence.count if self.sequence is not None else 0

    def cancel(self) -> None:
        """Ask the engine to drop this request (at its next step; harmless once it has ended). Its place
        counts as free at once: a client that stopped reading an answer (a stop string, a response
        sent) and asks again is not turned away while the engine catches up; the next request waits
        in the queue until the row has left the batch."""
        self.cancelled = True
        if self.sequence is not None:
            self.sequence.cancelled = True
        self._release(self)


class Engine:
    """max_batch: requests decoded together; capacity: the most tokens (prompt and answer) of one."""

    def __init__(self, model, eos_id: int | None, max_batch: int = 16, queue_depth: int = 64,
                 queue_timeout: float = 60.0, capacity: int | None = None) -> None:
        if max_batch < 1 or queue_depth < 0 or queue_timeout <= 0:
            raise ValueError("max_batch must be >= 1, queue_depth >= 0 and queue_timeout > 0")
        self.eos_id = eos_id
        self.max_batch, self.queue_depth, self.queue_timeout = max_batch, queue_depth, queue_timeout
        self.decoder = Decoder(model, slots=max_batch, capacity=capacity or model.config.max_position_embeddings)
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._in_flight = 0  # waiting + running, counted under _cond
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mistral-tune-engine", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> list[Sequence]:
        return self.decoder.rows

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

    def _run(self) -> None:
        with torch.no_grad():
            while (admitted := self._admit()) is not None:
                if admitted:
                    self._start(admitted)
                self.decoder.step()
        gone = RuntimeError("the server is shutting down")
        self.decoder.abort(gone)
        for req in self._waiting:
            self._release(req)
            req.sink(End("error", gone))

    def _start(self, admitted: list[Request]) -> None:
        def sink_of(req: Request) -> Callable[[Token | End], None]:
            def sink(item: Token | End) -> None:
                if isinstance(item, End):
                    self._release(req)
                req.sink(item)
            return sink

        seqs = self.decoder.add_many([(r.prompt, r.params, sink_of(r)) for r in admitted], self.eos_id)
        for req, seq in zip(admitted, seqs, strict=True):
            req.sequence = seq
            if req.cancelled:
                seq.cancelled = True

    def _admit(self) -> list[Request] | None:
        """Requests that may join the batch now (None: closed); ends cancelled and timed-out ones."""
        ended: list[tuple[Request, End]] = []
        with self._cond:
            while not self._closed and not self._waiting and not self.decoder.rows:
                self._cond.wait()
            if self._closed:
                return None
            now, free, admitted, kept = time.monotonic(), self.decoder.free(), [], []
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
            self._release(req)
            req.sink(end)
        return admitted
