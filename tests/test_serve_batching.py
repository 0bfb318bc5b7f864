"""The server under concurrent clients (the official `openai` client): requests are batched and
answered as one at a time would answer them, wait in a bounded queue, and leave when their client
does."""

from __future__ import annotations

import http.client
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export_fixtures import tiny_model
from mistral_tune.models.tuned import load_tuned
from mistral_tune.serve.protocol import clean_text
from mistral_tune.serve.server import ServerConfig, make_server
from plain_decoding import plain_greedy

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps of a tiny model: far faster than split across a busy machine
    yield load_tuned(tiny_model(tmp_path_factory.mktemp("batching") / "tiny", "v3"))
    torch.set_num_threads(threads)


class Running:
    """A server in a thread; records the engine's batch sizes and the requests it was given."""

    def __init__(self, loaded, **cfg) -> None:
        self.server = make_server(loaded, ServerConfig(host="127.0.0.1", port=0, max_tokens_limit=4000, **cfg))
        engine = self.server.app.engine
        self.batch_sizes, self.requests = [], []
        step, submit = engine.decoder.step, engine.submit
        engine.decoder.step = lambda: (self.batch_sizes.append(len(engine.rows)), step())[1]
        engine.submit = lambda *a: (r := submit(*a), self.requests.append(r))[0]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        host, port = self.server.server_address
        self.address = host, port
        self.client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def running(loaded, request):
    server = Running(loaded, **getattr(request, "param", {}))
    yield server
    server.close()


def _greedy(loaded, messages, n: int) -> str:
    ids = loaded.tokenizer.encode_prompt(messages)
    return loaded.tokenizer.decode(plain_greedy(loaded.model, ids, n, eos_id=loaded.tokenizer.eos_id))


@pytest.fixture(scope="module")
def batching(loaded):
    server = Running(loaded)  # max_batch 16
    yield server
    server.close()


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(min_size=1, max_size=40), min_size=16, max_size=16),
       lengths=st.lists(st.integers(4, 24), min_size=16, max_size=16))
def test_sixteen_streaming_clients_are_all_served_as_one_at_a_time(batching, loaded, texts, lengths) -> None:
    messages = [[{"role": "user", "content": t}] for t in texts]
    got: list[str | BaseException] = [""] * 16
    start = threading.Barrier(16)

    def client(i: int) -> None:
        try:
            start.wait()
            stream = batching.client.chat.completions.create(model=loaded.name, messages=messages[i],
                                                             max_tokens=lengths[i], temperature=0, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream)
        except BaseException as exc:  # reported below, with the others
            got[i] = exc

    batching.batch_sizes.clear()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # The server drops control characters from what users send (protocol.clean_text).
    want = [_greedy(loaded, [{"role": "user", "content": clean_text(t)}], n) for t, n in zip(texts, lengths,
                                                                                            strict=True)]
    assert got == want
    assert max(batching.batch_sizes) >= 2, batching.batch_sizes  # requests really shared steps


def _long_stream(running, loaded):
    """A greedy stream of 4000 tokens (this tiny model does not end it sooner), its first chunk read."""
    stream = running.client.completions.create(model=loaded.name, prompt="Count:", max_tokens=4000, temperature=0,
                                               stream=True)
    next(iter(stream))
    return stream


def _until_idle(running) -> None:
    deadline = time.monotonic() + 10
    while running.server.app.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("running", [dict(max_batch=1, queue_depth=0)], indirect=True)
def test_a_client_that_leaves_mid_stream_frees_its_place(running, loaded) -> None:
    stream = _long_stream(running, loaded)
    with pytest.raises(openai.RateLimitError) as info:  # batch of one, no queue: full
        running.client.completions.create(model=loaded.name, prompt="me too", max_tokens=2)
    assert info.value.body["code"] == "rate_limit_exceeded"
    stream.close()
    _until_idle(running)
    first = running.requests[0]
    assert first.cancelled and 0 < first.count < 4000 and running.server.app.engine.in_flight == 0
    answer = running.client.completions.create(model=loaded.name, prompt="me too", max_tokens=2)
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("running", [dict(max_batch=1, queue_depth=1, queue_timeout_s=0.5)], indirect=True)
def test_requests_wait_in_the_queue_and_a_wait_too_long_is_a_clear_503(running, loaded) -> None:
    stream = _long_stream(running, loaded)
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:  # waits its turn in the queue, then gives up
            running.client.completions.create(model=loaded.name, prompt="waiting", max_tokens=2)
        assert info.value.status_code == 503 and info.value.body["code"] == "queue_timeout"
        assert "queue" in info.value.body["message"] and time.monotonic() - started >= 0.5
    finally:
        stream.close()
    _until_idle(running)
    # A short request queued behind a short one is answered, not refused.
    done = []
    first = threading.Thread(target=lambda: done.append(running.client.completions.create(
        model=loaded.name, prompt="a", max_tokens=30)))
    first.start()
    done.append(running.client.completions.create(model=loaded.name, prompt="b", max_tokens=30))
    first.join(timeout=60)
    assert len(done) == 2


def test_head_and_options(batching) -> None:
    for method, path, status, allow in [("HEAD", "/health", 200, None), ("OPTIONS", "/v1/chat/completions", 204,
                                                                          "POST, OPTIONS"),
                                        ("OPTIONS", "/v1/models", 204, "GET, HEAD, OPTIONS")]:
        conn = http.client.HTTPConnection(*batching.address, timeout=30)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            assert resp.status == status and resp.read() == b""
            assert resp.getheader("Allow") == allow
        finally:
            conn.close()
