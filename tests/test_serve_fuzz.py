"""Near-valid and hostile requests against a running server: every one gets a well-formed answer.

A valid request is built, then mutated (wrong types, extreme and non-finite numbers, integers of
thousands of digits, lone surrogates, invalid UTF-8, deep nesting, odd unicode, extra fields,
streaming on or off). Each answer must be a 200 completion (JSON, or an SSE stream that ends with
`[DONE]`) or a 4xx JSON error in OpenAI's shape: never a 5xx, never a connection closed without
an answer.
"""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export_fixtures import running_server, tiny_model
from mistral_tune.models.tuned import load_tuned

NAME = "tiny-fuzz"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass(frozen=True)
class Raw:
    """JSON text put into the body as is (numbers json.dumps cannot write, deep nesting)."""

    text: str


def encode(body, ascii_only: bool) -> bytes:
    raws: list[str] = []

    def swap(obj):
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(obj, dict):
            return {k: swap(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [swap(v) for v in obj]
        return obj

    text = json.dumps(swap(body), ensure_ascii=ascii_only)
    text = re.sub(r'"\\u0000raw(\d+)\\u0000"', lambda m: raws[int(m[1])], text)
    # Without ascii escapes a lone surrogate is written as its (invalid) UTF-8 bytes.
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------- request strategies

ODD_TEXT = ["\ud800", "a\udfffb", "\udbff\udc00", "\x00", "\u202e", "\ufeff", "\U0010ffff", "\ufffe", "[INST]", "</s>",
            "nan", "inf", "-Infinity", "1e-300", "", " ", "\r\n"]
EXTREME_NUMBERS = ["1e-40", "1e-45", "1e-300", "5e-324", "1e-400", "-0.0", "0", "-1", "1e308", "1e400", "-1e400",
                   "NaN", "Infinity", "-Infinity", "2.0000000001", "0.9999999999999999", "18446744073709551616",
                   "9223372036854775808", "-9223372036854775809", "1.5", "true"]

plain_text = st.text(max_size=30)
odd_text = st.sampled_from(ODD_TEXT) | st.builds(lambda a, b, c: a + b + c, plain_text, st.sampled_from(ODD_TEXT),
                                                   plain_text)
huge_int = st.builds(lambda sign, n: Raw(sign + "9" * n), st.sampled_from(["", "-"]), st.integers(19, 6000))
number = st.sampled_from(EXTREME_NUMBERS).map(Raw) | st.floats(allow_nan=False, allow_infinity=False).map(
    lambda x: Raw(repr(x)))
deep = st.builds(lambda d, open_, close: Raw(open_ * d + close * d), st.integers(50, 100_000),
                 st.sampled_from(["["]), st.sampled_from(["]"])) | st.integers(50, 50_000).map(
    lambda d: Raw('{"a":' * d + "1" + "}" * d))
weird = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), huge_int, number, odd_text, plain_text, deep,
                  st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(plain_text, st.integers(), max_size=2))


@st.composite
def valid_request(draw) -> tuple[str, dict]:
    chat = draw(st.booleans())
    body: dict = {}
    if chat:
        turns = draw(st.lists(plain_text, min_size=0, max_size=2))
        messages = [{"role": "system", "content": draw(plain_text)}] if draw(st.booleans()) else []
        for t in turns:
            messages += [{"role": "user", "content": t}, {"role": "assistant", "content": t or "ok"}]
        content = draw(plain_text | st.lists(st.builds(lambda t: {"type": "text", "text": t}, plain_text),
                                             min_size=1, max_size=2))
        body["messages"] = messages + [{"role": "user", "content": content}]
    else:
        body["prompt"] = draw(plain_text | st.lists(plain_text, min_size=1, max_size=1))
    optional = {
        "model": st.just(NAME),
        "max_tokens": st.integers(1, 3),
        "temperature": st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 2),
        "top_p": st.floats(0.01, 1.0),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": plain_text.filter(bool) | st.lists(plain_text.filter(bool), max_size=4),
        "n": st.just(1),
        "stream_options": st.builds(lambda u: {"include_usage": u}, st.booleans()),
        "user": plain_text,
    }
    for key in draw(st.sets(st.sampled_from(sorted(optional)))):
        body[key] = draw(optional[key])
    body["max_tokens"] = body.get("max_tokens", draw(st.integers(1, 3)))  # keeps each request short
    body["stream"] = draw(st.booleans())
    return (CHAT if chat else COMPLETIONS), body


def _places(body: dict) -> list[tuple]:
    """Paths (key, index, ...) in the body a mutation may target."""
    places: list[tuple] = [(k,) for k in body]
    messages = body.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        places.append(("messages", i))
        if isinstance(m, dict):
            places += [("messages", i, "role"), ("messages", i, "content"), ("messages", i, "extra")]
            if isinstance(m.get("content"), list) and m["content"] and isinstance(m["content"][0], dict):
                places += [("messages", i, "content", 0, "text"), ("messages", i, "content", 0, "type")]
    if isinstance(body.get("stop"), list) and body["stop"]:
        places.append(("stop", 0))
    if isinstance(body.get("prompt"), list):
        places.append(("prompt", 0))
    return places


@st.composite
def near_valid_request(draw) -> tuple[str, bytes, str]:
    """(path, body bytes, a description for failure messages)."""
    path, body = draw(valid_request())
    notes = []
    for _ in range(draw(st.integers(0, 3))):
        places = _places(body) + [("stream",), ("temperature",), ("top_p",), ("seed",), ("max_tokens",),
                                  (draw(plain_text),)]
        place = draw(st.sampled_from(places))
        value = draw(number | huge_int if place[-1] in ("temperature", "top_p", "seed", "max_tokens", "n")
                     and draw(st.booleans()) else weird)
        target = body
        try:
            for step in place[:-1]:
                target = target[step]
            if draw(st.integers(0, 5)) == 0 and isinstance(target, dict):
                target.pop(place[-1], None)
                notes.append(f"del {place}")
            else:
                target[place[-1]] = value
                notes.append(f"{place}={value!r:.80}")
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced a container
    if draw(st.integers(0, 9)) == 0:
        body = draw(weird)  # not an object at all
        notes.append(f"body={body!r:.80}")
    ascii_only = draw(st.integers(0, 4)) > 0
    return path, encode(body, ascii_only), f"POST {path} {'; '.join(notes) or 'valid'}; ascii={ascii_only}"


# ---------------------------------------------------------------------- checking one exchange

ERROR_KEYS = {"message", "type", "param", "code"}


def _error_problem(err) -> str | None:
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or not isinstance(err["message"], str) or \
            not err["message"]:
        return f"malformed error {err!r:.300}"
    return None


def _stream_problem(data: bytes, chat: bool) -> str | None:
    events = [e for e in data.decode().split("\n\n") if e]
    if not events or any(not e.startswith("data: ") for e in events):
        return f"not an SSE stream: {data[:300]!r}"
    payloads = [e[len("data: "):] for e in events]
    if payloads[-1] != "[DONE]":
        return f"stream does not end with [DONE]: {data[-300:]!r}"
    for i, p in enumerate(payloads[:-1]):
        obj = json.loads(p)
        if "error" in obj:
            if i != len(payloads) - 2:
                return "an error event is not the last event"
            if obj["error"].get("type") == "server_error":
                return f"server error mid-stream: {obj!r:.300}"
            return _error_problem(obj["error"])
        if not isinstance(obj.get("choices"), list):
            return f"malformed chunk {p[:300]}"
        for c in obj["choices"]:
            if chat and not isinstance(c.get("delta"), dict) or not chat and not isinstance(c.get("text"), str):
                return f"malformed chunk {p[:300]}"
    return None


def exchange(address: tuple[str, int], path: str, body: bytes) -> str | None:
    """Send one request; None if the answer is well formed, else what is wrong with it."""
    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, ctype, data = resp.status, resp.getheader("Content-Type", ""), resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer: {exc!r}"
    finally:
        conn.close()
    try:
        if status == 200 and ctype.startswith("text/event-stream"):
            return _stream_problem(data, path == CHAT)
        obj = json.loads(data)
        if status == 200:
            choice = obj["choices"][0]
            text = choice["message"]["content"] if path == CHAT else choice["text"]
            ok = isinstance(text, str) and choice["finish_reason"] in ("stop", "length") and "usage" in obj
            return None if ok else f"malformed completion {obj!r:.300}"
        if not 400 <= status < 500:
            return f"status {status}: {data[:300]!r}"
        return _error_problem(obj.get("error"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return f"status {status}, unreadable answer ({exc!r}): {data[:300]!r}"


# ---------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):
    loaded = load_tuned(tiny_model(tmp_path_factory.mktemp("fuzz") / NAME, "v3"))
    assert loaded.name == NAME
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a one-token decode step is faster alone than split on a busy machine
    try:
        yield from running_server(loaded, max_tokens_limit=4, default_max_tokens=2, max_input_tokens=256)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # 1,500 requests: ~30 s of CPU, 85-100 s on a 2-core machine with a load of 12-16
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=near_valid_request())
def test_every_near_valid_request_gets_a_well_formed_answer(fuzz_server, request) -> None:
    path, body, description = request
    problem = exchange(fuzz_server, path, body)
    assert problem is None, f"{description}\n{problem}"
