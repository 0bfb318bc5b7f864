"""The continuous-batching engine: every request's tokens equal single-request generation, however
requests join and leave the running batch; the queue is bounded and its waits time out."""

from __future__ import annotations

import queue
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_tune.generate.decoder import End, Params
from mistral_tune.generate.engine import Engine, QueueFull, QueueTimeout
from mistral_tune.generate.run import stream
from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM
from plain_decoding import plain_greedy

VOCAB, EOS = 300, 2


def _model(sliding_window: int | None) -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=sliding_window, eos_token_id=EOS)
    model = MistralForCausalLM(cfg)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))  # peaked logits: EOS comes early
    return model


MODELS = {None: _model(None), 5: _model(5)}  # full attention; a window shorter than most rows


pytestmark = pytest.mark.usefixtures("one_thread")


def _alone(model, prompt: list[int], p: Params) -> list[int]:
    """Greedy: decoding without a cache. Sampled: the request decoded on its own (its draws depend on
    its seed alone)."""
    if p.temperature == 0:
        return plain_greedy(model, prompt, p.max_tokens, eos_id=EOS)
    return [t.id for t in stream(model, prompt, p, eos_id=EOS)]


class Collector:
    """A sink per request; request i+1 is submitted when request i has `after` tokens (or ends), so
    requests join a batch that is mid-way through others."""

    def __init__(self, engine: Engine, jobs: list[tuple[list[int], Params, int]]) -> None:
        self.engine, self.jobs = engine, jobs
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.ends: list[End | None] = [None] * len(jobs)
        self.done = threading.Event()
        self.next = 0
        self._submit()

    def _submit(self) -> None:
        i, self.next = self.next, self.next + 1
        if i < len(self.jobs):
            prompt, params, _ = self.jobs[i]
            self.engine.submit(prompt, params, lambda item: self._take(i, item))

    def _take(self, i: int, item) -> None:
        if isinstance(item, End):
            self.ends[i] = item
            if all(e is not None for e in self.ends):
                self.done.set()
        else:
            self.tokens[i].append(item.id)
        if self.next == i + 1 and (isinstance(item, End) or len(self.tokens[i]) == self.jobs[i][2]):
            self._submit()


job = st.tuples(
    st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12),  # the prompt
    st.builds(Params, max_tokens=st.integers(1, 12), temperature=st.sampled_from([0.0, 0.0, 0.8]),
              top_p=st.sampled_from([1.0, 0.7]), seed=st.integers(0, 2**32)),
    st.integers(0, 4),  # the next request is submitted after this many tokens
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=st.lists(job, min_size=1, max_size=7), max_batch=st.integers(1, 4), window=st.sampled_from([None, 5]))
def test_batched_tokens_equal_single_request_generation(jobs, max_batch, window) -> None:
    model = MODELS[window]
    engine = Engine(model, EOS, max_batch=max_batch, queue_depth=len(jobs))
    try:
        got = Collector(engine, jobs)
        assert got.done.wait(60)
    finally:
        engine.close()
    for (prompt, params, _), tokens, end in zip(jobs, got.tokens, got.ends, strict=True):
        want = _alone(model, prompt, params)
        assert tokens == want, (prompt, params)
        assert end.reason == ("length" if len(want) == params.max_tokens else "stop")


def test_rows_join_and_leave_mid_batch(monkeypatch) -> None:
    """The corpus above really batches: rows of different lengths share steps, and some leave early."""
    model, sizes = MODELS[5], []
    engine = Engine(model, EOS, max_batch=4)
    step = engine.decoder.step
    monkeypatch.setattr(engine.decoder, "step", lambda: (sizes.append(len(engine.rows)), step())[1])
    jobs = [([5 + i] * (3 + 4 * i), Params(max_tokens=4 + 3 * i), 2) for i in range(4)]
    try:
        got = Collector(engine, jobs)
        assert got.done.wait(60)
    finally:
        engine.close()
    assert got.tokens == [_alone(model, p, params) for p, params, _ in jobs]
    assert max(sizes) >= 3 and sizes[-1] == 1 and len(set(sizes)) >= 3, sizes


def test_cancelled_rows_leave_and_the_queue_is_bounded() -> None:
    model = MODELS[None]
    engine = Engine(model, eos_id=None, max_batch=1, queue_depth=1, queue_timeout=0.3)
    items: dict[str, queue.Queue] = {k: queue.Queue() for k in "abc"}
    try:
        a = engine.submit([5, 6, 7], Params(max_tokens=10_000), items["a"].put)
        items["a"].get(timeout=30)  # a is running
        engine.submit([5], Params(max_tokens=1), items["b"].put)  # b waits
        with pytest.raises(QueueFull):
            engine.submit([5], Params(max_tokens=1), items["c"].put)
        end = _last(items["b"])  # b's wait times out while a holds the only row
        assert end.reason == "error" and isinstance(end.error, QueueTimeout) and "queue" in str(end.error)
        a.cancel()
        assert _last(items["a"]).reason == "cancelled"
        engine.submit([5], Params(max_tokens=2), items["c"].put)  # the row is free again
        assert _last(items["c"]).reason == "length" and engine.in_flight == 0
    finally:
        engine.close()


def test_a_cancelled_request_gives_its_place_back_at_once() -> None:
    """A server answer cut at a stop string cancels its request and responds; the client's next request
    came while the engine still held the row and got 429 with max_batch 1 and no queue. The place is
    free at cancel; the next request waits until the row has left, then runs."""
    model = MODELS[None]
    engine = Engine(model, eos_id=None, max_batch=1, queue_depth=0)
    gate, entered = threading.Event(), threading.Event()

    def hold(*_args):  # the engine thread stops inside a decoding step while the test cancels
        entered.set()
        assert gate.wait(30)

    items: dict[str, queue.Queue] = {k: queue.Queue() for k in "ab"}
    handle = None
    try:
        a = engine.submit([5, 6, 7], Params(max_tokens=10_000), items["a"].put)
        items["a"].get(timeout=30)  # a has a token: it is in the batch
        handle = model.model.embed_tokens.register_forward_pre_hook(hold)
        assert entered.wait(30)  # the engine is inside a step with a in the batch
        a.cancel()
        engine.submit([5], Params(max_tokens=2), items["b"].put)  # no QueueFull
        assert items["b"].empty()
        gate.set()
        assert _last(items["a"]).reason == "cancelled"
        assert _last(items["b"]).reason == "length" and engine.in_flight == 0
    finally:
        gate.set()
        if handle is not None:
            handle.remove()
        engine.close()


def _last(q: queue.Queue) -> End:
    """The request's End, after its tokens."""
    while True:
        if isinstance(item := q.get(timeout=30), End):
            return item
