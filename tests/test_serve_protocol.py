"""Request parsing and validation (serve/protocol.py) and stop-string matching, without HTTP."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_tune.generate.text import StopMatcher
from mistral_tune.serve.protocol import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    SEED_RANGE,
    ApiError,
    ChatRequest,
    CompletionRequest,
    parse_body,
    parse_request,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(st.characters(codec=None)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
          "stream_options", "stop", "seed", "top_k", "logprobs", "top_logprobs", "tools", "tool_choice",
          "response_format"]


def _safe(req: ChatRequest | CompletionRequest) -> None:
    """What the engine relies on after validation."""
    assert req.temperature is None or math.isfinite(req.temperature) and 0 <= req.temperature <= 2
    assert req.top_p is None or 0 < req.top_p <= 1
    assert req.seed is None or SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]
    assert isinstance(req.stop, list) and len(req.stop) <= MAX_STOP_STRINGS
    assert all(0 < len(s) <= MAX_STOP_CHARS for s in req.stop)
    texts = [*req.stop, req.model or ""] + ([m.text() or "" for m in req.messages] if isinstance(req, ChatRequest)
                                            else [req.prompt])
    for t in texts:
        t.encode("utf-8")  # no lone surrogates


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6), chat=st.booleans(),
       content=json_values)
def test_any_json_object_is_a_request_or_a_400(fields, chat, content) -> None:
    body = {**({"messages": [{"role": "user", "content": content}]} if chat else {"prompt": content}), **fields}
    raw = json.dumps(body).encode()
    try:
        req = parse_request(parse_body(raw), chat)
    except ApiError as err:
        assert err.status == 400 and err.body()["error"]["message"]
    else:
        _safe(req)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_are_a_json_object_or_a_400(raw) -> None:
    try:
        assert isinstance(parse_body(raw), dict)
    except ApiError as err:
        assert err.status == 400


@pytest.mark.parametrize(
    ("raw", "param", "fragment"),
    [
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content", "(U+D800) at character 1"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
         "messages.0.content.0.text", "surrogate"),
        ('{"messages": [{"role": "user", "content": "x"}], "stop": ["ok", "\\ud800"]}', "stop.1", "surrogate"),
        ('{"messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}', "seed", "less than"),
        ('{"messages": [{"role": "user", "content": "x"}], "seed": -9223372036854775809}', "seed", "greater than"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', "temperature", "finite"),
        ('{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p", "greater than 0"),
        ('{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}', "stop", "at most 4"),
        ('{"messages": [{"role": "user", "content": "x"}], "stop": "%s"}' % ("s" * (MAX_STOP_CHARS + 1)), "stop",
         f"1 to {MAX_STOP_CHARS} characters"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, "NaN is not a JSON number"),
        ('{"messages": [{"role": "user", "content": "x"}], "n": %s}' % ("9" * 5000), None, "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
        (b'{"messages": "\xff"}', None, "not valid JSON"),
    ],
)
def test_refusals_name_the_field(raw: str | bytes, param: str | None, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(parse_body(raw if isinstance(raw, bytes) else raw.encode()), chat=True)
    err = info.value
    assert err.status == 400 and err.param == param and fragment in err.message, err.message


def test_limits_at_the_edge_are_accepted() -> None:
    req = parse_request({"prompt": "x", "seed": SEED_RANGE[1], "temperature": 5e-324, "top_p": 5e-324,
                         "stop": ["s" * MAX_STOP_CHARS] * MAX_STOP_STRINGS}, chat=False)
    assert req.seed == 2**63 - 1 and req.stop == ["s" * MAX_STOP_CHARS] * 4
    assert parse_request({"prompt": "x", "seed": SEED_RANGE[0]}, chat=False).seed == -(2**63)


# ---------------------------------------------------------------------- stop strings


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string to be completed (longest first at the same end)."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return text, False
    end, neg_len = min(ends)
    return text[: end + neg_len], True


@settings(max_examples=500, deadline=None)
@given(text=st.text("abc", max_size=40), stops=st.lists(st.text("abc", min_size=1, max_size=5), max_size=4),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_matching_equals_a_search_of_the_whole_text_however_it_is_cut(text, stops, cuts) -> None:
    matcher, out = StopMatcher(stops), ""
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    for a, b in zip(bounds, bounds[1:]):
        out += matcher.push(text[a:b])
    if not matcher.stopped:
        out += matcher.flush()
    assert (out, matcher.stopped) == _reference_cut(text, stops)
