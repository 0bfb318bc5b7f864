"""Drift: the request log of the server (redacted, capped, rotated) and the drift measures against SciPy."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from export_fixtures import tiny_model
from mistral_tune.evaluate.drift import js_divergence, ks_statistic, read_served
from mistral_tune.models.tuned import load_tuned
from mistral_tune.serve.request_log import CURRENT, RequestLog, log_files
from mistral_tune.serve.server import ChatRequest, CompletionRequest, ServerConfig, make_server

openai = pytest.importorskip("openai")
FAST = settings(max_examples=80, deadline=None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # SciPy's p-value for tiny samples; the statistic is what counts
@FAST
@given(st.lists(st.integers(1, 60), min_size=1, max_size=40), st.lists(st.integers(1, 60), min_size=1, max_size=40))
def test_ks_statistic_equals_scipy(a, b):
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b, method="asymp").statistic, abs=1e-12)


@FAST
@given(st.lists(st.integers(0, 12), min_size=1, max_size=50), st.lists(st.integers(0, 12), min_size=1, max_size=50))
def test_js_divergence_equals_scipy(a, b):
    keys = sorted(set(a) | set(b))
    p, q = Counter(a), Counter(b)
    theirs = jensenshannon([p[k] for k in keys], [q[k] for k in keys], base=2) ** 2  # SciPy gives the distance
    assert js_divergence(p, q) == pytest.approx(theirs, abs=1e-9)


def _chat(text: str) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": text}]})


emails = st.from_regex(r"[a-z]{1,8}\.[a-z]{1,8}@[a-z]{2,8}\.(com|org|de)", fullmatch=True)


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=60), emails)
def test_logged_prompts_are_redacted(tmp_path_factory, words, email):
    folder = tmp_path_factory.mktemp("log")
    log = RequestLog(folder)
    log.record(_chat(f"{words} write to {email} please"), 12)
    log.record(CompletionRequest.model_validate({"prompt": f"mail {email}"}), 5)
    chat, completion = [json.loads(line) for line in (folder / CURRENT).read_text(encoding="utf-8").splitlines()]
    assert email not in json.dumps(chat, ensure_ascii=False) and "[EMAIL]" in chat["messages"][0]["content"]
    assert chat["endpoint"] == "chat" and chat["prompt_tokens"] == 12
    assert completion == {**completion, "endpoint": "completions", "prompt": "mail [EMAIL]", "prompt_tokens": 5}


def test_log_files_are_capped_rotated_and_only_ours_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("not the log's")
    log = RequestLog(tmp_path, max_bytes=2048, keep=3)
    threads = [threading.Thread(target=lambda i=i: [log.record(_chat(f"prompt {i}-{j} " + "x" * 100), 30)
                                                    for j in range(20)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = log_files(tmp_path)
    assert [f.name for f in files][-1] == CURRENT and len(files) == 3
    assert all(f.stat().st_size <= 2048 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]  # every line whole
    assert len(lines) < 80 and lines[-1]["prompt_tokens"] == 30
    assert (tmp_path / "notes.txt").read_text() == "not the log's"
    long = "y" * 5000
    log.record(_chat(long), 1)
    last = json.loads((tmp_path / CURRENT).read_text().splitlines()[-1])
    assert last["truncated"] is True and len(last["messages"][0]["content"]) == 2048 // 4


def test_server_logs_accepted_requests(tmp_path_factory):
    loaded = load_tuned(tiny_model(tmp_path_factory.mktemp("server") / "tiny-v3", "v3"))
    folder = tmp_path_factory.mktemp("requests")
    server = make_server(loaded, ServerConfig(host="127.0.0.1", port=0), RequestLog(folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=60)
        client.chat.completions.create(model=loaded.name, max_tokens=2,
                                       messages=[{"role": "user", "content": "call 555-123-4567 now"}])
        with pytest.raises(openai.BadRequestError):  # refused requests are not logged
            client.chat.completions.create(model=loaded.name, max_tokens=2, messages=[{"role": "system",
                                                                                        "content": "only"}])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    (rec,) = read_served(folder)
    assert rec["messages"] == [{"role": "user", "content": "call [PHONE] now"}]
    assert rec["prompt_tokens"] == len(loaded.tokenizer.encode_prompt([{"role": "user",
                                                                        "content": "call 555-123-4567 now"}]))


def test_reading_a_damaged_log_names_the_line(tmp_path: Path):
    from mistral_tune.errors import DataError

    (tmp_path / CURRENT).write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"requests.jsonl:2: not valid JSON"):
        read_served(tmp_path)
    with pytest.raises(DataError, match="no request log"):
        read_served(tmp_path / "elsewhere")
