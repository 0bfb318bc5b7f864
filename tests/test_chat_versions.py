"""Tokenizer versions after v7 (v11, v13, v15): chat ids, loss masks and the exported template.

mistral-common encodes these versions but ships no file for them; a model brings its own
tekken.json, whose config names the version and whose `special_tokens` list the control tokens
(required from v11 on). The fixture builds such files from the one tekken vocabulary the wheel
ships (tekken_240718.json, a v3 file without a special-token list): `config.version` changed, and
a `special_tokens` list added: ranks 0-19 as mistral-common's defaults for older files, then
[ARGS]=32, [CALL_ID]=33, [THINK]=34, [/THINK]=35 and, for v15, [MODEL_SETTINGS]=36,
[/MODEL_SETTINGS]=37 and a `model_settings_builder` (reasoning effort "none" | "high", default
"none"); mistral-common fills the other ranks up to 1000 with <SPECIAL_n>. The v11 file has no
[THINK] tokens (mistral-common writes no thinking for v11), and one v13 file has none either
(a v13 model that does not reason).

Every check compares with mistral-common itself: the ids with `encode_chat_completion`, which
conversations are rejected, the trained tokens with its per-message `encode_assistant_message`,
and the exported template (read back by transformers' AutoTokenizer) with both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_tune.chat import BUNDLED, ChatTokenizer, load_tokenizer
from mistral_tune.errors import DataError, ModelError
from mistral_tune.export.hf_tokenizer import save_hf_tokenizer

transformers = pytest.importorskip("transformers")

# name -> (version, has [THINK] tokens)
FILES = {"v11": ("v11", False), "v13": ("v13", True), "v13_nothink": ("v13", False), "v15": ("v15", True)}
NEW_TOKENS = {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]",
              36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]"}


def write_tekken(path: Path, version: str, think: bool) -> Path:
    data = json.loads(BUNDLED["tekken"].read_text(encoding="utf-8"))
    data["config"]["version"] = version
    specials = [{**t, "token_str": str(t["token_str"])} for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    for rank in range(len(specials), 40):
        name = NEW_TOKENS.get(rank, f"<SPECIAL_{rank}>")
        if (name in ("[THINK]", "[/THINK]") and not think) or ("MODEL_SETTINGS" in name and version != "v15"):
            name = f"<SPECIAL_{rank}>"
        specials.append({"rank": rank, "token_str": name, "is_control": True})
    data["special_tokens"] = specials
    if version == "v15":
        data["model_settings_builder"] = {
            "reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none", "values": ["none", "high"]}
        }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


class Version:
    """One tokenizer file: ours, mistral-common's (finetuning and test mode), the exported HF one."""

    def __init__(self, name: str, ours: ChatTokenizer, reference: MistralTokenizer, prompts: MistralTokenizer,
                 hf: object) -> None:
        self.name, self.ours, self.reference, self.prompts, self.hf = name, ours, reference, prompts, hf

    def __repr__(self) -> str:
        return f"Version({self.name})"


@pytest.fixture(scope="module", params=list(FILES))
def version(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Version:
    tmp = tmp_path_factory.mktemp(request.param)
    source = write_tekken(tmp / "tekken.json", *FILES[request.param])
    ours = load_tokenizer(str(tmp))  # a model directory: the version comes from the file
    assert ours.version == FILES[request.param][0]
    save_hf_tokenizer(ours, tmp / "hf")
    return Version(
        request.param,
        ours,
        MistralTokenizer.from_file(source, mode=ValidationMode.finetuning),
        MistralTokenizer.from_file(source, mode=ValidationMode.test),
        transformers.AutoTokenizer.from_pretrained(tmp / "hf"),
    )


# ---------------------------------------------------------------------- generated conversations

# No "[": text that spells a control token is encoded as text by mistral-common, as the token by
# HF tokenizers (a known difference, tested in test_hf_tokenizer.py).
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="["), max_size=24)
NONBLANK = TEXT.filter(lambda s: s.strip() != "")
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"The {name} tool.",
                                      "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
    for name in ("get_weather", "search")
]
CALL_IDS = ["abc123XYZ", "def456UVW", "ghi789RST"]


@st.composite
def assistant_turn(draw, last: bool) -> dict:
    msg: dict = {"role": "assistant"}
    kind = draw(st.sampled_from(["text", "text", "parts", "reasoning"]))
    text = draw(NONBLANK) + draw(st.sampled_from(["", " ", "  "]))
    if kind == "text":
        msg["content"] = text
    elif kind == "parts":
        msg["content"] = [{"type": "thinking", "thinking": draw(NONBLANK)}, {"type": "text", "text": text}]
    else:
        msg["reasoning_content"], msg["content"] = draw(NONBLANK), text
    if draw(st.booleans()):
        msg["weight"] = draw(st.sampled_from([0, 1]))
    if last and msg.get("weight") == 0:
        del msg["weight"]  # leave something to train on
    return msg


@st.composite
def conversations(draw) -> tuple[list[dict], bool]:
    """(conversation ending with an assistant turn, whether tools are offered)."""
    conv: list[dict] = []
    if draw(st.booleans()):
        system = draw(NONBLANK)
        conv.append({"role": "system", "content": [{"type": "text", "text": system},
                                                   {"type": "thinking", "thinking": draw(NONBLANK)}]
                     if draw(st.integers(0, 3)) == 0 else system})
    with_tools = draw(st.booleans())
    turns = draw(st.integers(1, 3))
    for t in range(turns):
        conv.append({"role": "user", "content": draw(NONBLANK)})
        if with_tools and draw(st.booleans()):
            ids = CALL_IDS[: draw(st.integers(1, 2))]
            calls = [{"id": i, "type": "function", "function": {
                "name": draw(st.sampled_from(["get_weather", "search"])),
                "arguments": json.dumps({"x": draw(TEXT)}, ensure_ascii=draw(st.booleans()))}} for i in ids]
            call = {"role": "assistant", "tool_calls": calls}
            if draw(st.booleans()):
                call["content"] = draw(NONBLANK)
            conv.append(call)
            for i in draw(st.permutations(ids)):
                conv.append({"role": "tool", "tool_call_id": i, "content": draw(NONBLANK)})
        conv.append(draw(assistant_turn(last=t == turns - 1)))
    return conv, with_tools


def reference_messages(conv: list[dict], training: bool) -> list:
    """mistral-common's message objects, built with its own classes (independently of chat.py)."""
    out: list = []
    for m in conv:
        content = m.get("content")
        if isinstance(content, list):
            content = [ThinkChunk(thinking=p["thinking"]) if p["type"] == "thinking" else TextChunk(text=p["text"])
                       for p in content]
        if m["role"] == "system":
            out.append(SystemMessage(content=content))
        elif m["role"] == "user":
            out.append(UserMessage(content=content))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=content, tool_call_id=m["tool_call_id"]))
        else:
            if m.get("reasoning_content"):
                rest = [TextChunk(text=content)] if content else []
                content = [ThinkChunk(thinking=m["reasoning_content"]), *rest]
            calls = [ToolCall.model_validate(c) for c in m["tool_calls"]] if m.get("tool_calls") else None
            if training:
                out.append(FinetuningAssistantMessage(content=content, tool_calls=calls, weight=m.get("weight")))
            else:
                out.append(AssistantMessage(content=content, tool_calls=calls))
    return out


def expected_trained(v: Version, conv: list[dict], tools: list[dict] | None, thinking: bool) -> list[int]:
    """The trained ids, from mistral-common's per-message encoding: each assistant turn with weight
    1 (normalized by mistral-common), its thinking ([THINK] ... [/THINK]) left out unless trained."""
    it = v.reference.instruct_tokenizer
    raw = it.tokenizer
    builder = getattr(raw, "model_settings_builder", None)
    request = ChatCompletionRequest(messages=reference_messages(conv, training=False),
                                    tools=[Tool.model_validate(t) for t in tools] if tools else None)
    normalized = get_normalizer(raw.version, builder).from_chat_completion_request(request)
    turns = [m for m in normalized.messages if isinstance(m, AssistantMessage)]
    weights = [m.get("weight", 1) for m in conv if m["role"] == "assistant"]
    assert len(turns) == len(weights)  # the generator never puts two assistant turns in a row
    begin, end = getattr(it, "BEGIN_THINK", None), getattr(it, "END_THINK", None)
    out: list[int] = []
    for turn, weight in zip(turns, weights, strict=True):
        if weight == 0:
            continue
        inside = False
        for t in it.encode_assistant_message(turn, is_before_last_user_message=False):
            inside = inside or (not thinking and t == begin)
            if not inside:
                out.append(t)
            inside = inside and t != end
    return out


def _template_ids(hf, conv: list[dict], tools: list[dict] | None, generation_prompt: bool) -> list[int]:
    plain = [{k: x for k, x in m.items() if k != "weight"} for m in conv]
    out = hf.apply_chat_template(plain, tools=tools, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _canonical(arguments: str) -> bool:
    """mistral-common re-serializes tool-call arguments (json.dumps, ensure_ascii=False); a chat
    template cannot parse JSON, so it writes an arguments string as it is (a dict it serializes
    the same way)."""
    return json.dumps(json.loads(arguments), ensure_ascii=False) == arguments


def _results_in_call_order(conv: list[dict]) -> bool:
    """v13+ write tool results in the order of the calls (mistral-common's normalizer sorts them);
    the template writes them in the order given."""
    calls: list[str] = []
    results: list[str] = []
    for m in [*conv, {"role": "end"}]:
        if m["role"] == "tool":
            results.append(m["tool_call_id"])
            continue
        if results and results != [c for c in calls if c in results]:
            return False
        results = []
        calls = [c["id"] for c in m.get("tool_calls", [])] or calls
    return True


def check(v: Version, conv: list[dict], with_tools: bool) -> str:
    """Compare one conversation with mistral-common; returns "rejected" or "accepted"."""
    tools = TOOLS if with_tools else None
    request = ChatCompletionRequest(messages=reference_messages(conv, training=True),
                                    tools=[Tool.model_validate(t) for t in tools] if tools else None)
    try:
        want = v.reference.encode_chat_completion(request).tokens
    except (MistralCommonException, ValueError, AssertionError) as e:
        note(f"mistral-common rejects: {e}")
        with pytest.raises(DataError):
            v.ours.encode_chat(conv, tools=tools)
        return "rejected"
    for thinking in (True, False):
        ids, mask = v.ours.encode_chat(conv, tools=tools, train_on_thinking=thinking)
        assert ids == want
        assert [t for t, m in zip(ids, mask, strict=True) if m] == expected_trained(v, conv, tools, thinking)
    if not all(_canonical(c["function"]["arguments"]) for m in conv for c in m.get("tool_calls", [])):
        return "accepted, arguments not in json.dumps form"  # the template writes a string as given
    if not _results_in_call_order(conv):
        return "accepted, tool results not in call order"  # mistral-common sorts them, the template cannot
    # The exported template: the training conversation, and the prompt before its last answer.
    assert _template_ids(v.hf, conv, tools, False) == want
    prompt = conv[:-1]
    want_prompt = v.prompts.encode_chat_completion(ChatCompletionRequest(
        messages=reference_messages(prompt, training=False),
        tools=[Tool.model_validate(t) for t in tools] if tools else None)).tokens
    assert _template_ids(v.hf, prompt, tools, True) == want_prompt
    if not with_tools:
        assert v.ours.encode_prompt(prompt) == want_prompt
    return "accepted"


THINKING_TOOLS = (
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "thinking", "thinking": "How?"}]},
     {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "Let me look.", "tool_calls": [
         {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": '{"x": "Paris"}'}}]},
     {"role": "tool", "tool_call_id": "abc123XYZ", "content": "21 C"},
     {"role": "assistant", "reasoning_content": "It said 21.", "content": "21 C.  "}],
    True,
)
PLAIN = ([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello  ", "weight": 0}, {"role": "user", "content": "Again"},
          {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}, {"type": "text", "text": "ok"}]}],
         False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(case=THINKING_TOOLS)
@example(case=PLAIN)
@given(case=conversations())
def test_generated_conversations_match_mistral_common(version: Version, case: tuple[list[dict], bool]) -> None:
    event(check(version, *case))  # counted by --hypothesis-show-statistics


# ---------------------------------------------------------------------- what a version cannot write


def test_thinking_needs_think_tokens(version: Version) -> None:
    conv = PLAIN[0]
    if version.ours.supports_thinking:
        assert version.ours.encode_chat(conv)
        return
    with pytest.raises(DataError, match=r"\[THINK\] tokens .* this tokenizer is v1[13]"):
        version.ours.encode_chat(conv)
    with pytest.raises(DataError, match=r"\[THINK\] tokens"):
        version.ours.encode_prompt([{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "reasoning_content": "t", "content": "ok"},
                                    {"role": "user", "content": "Again"}])


@pytest.mark.parametrize("name", ["v3", "v7", "tekken"])
def test_thinking_rejected_by_older_versions(name: str) -> None:
    with pytest.raises(DataError, match=rf"\[THINK\] tokens .* this tokenizer is {name if name != 'tekken' else 'v3'}"):
        load_tokenizer(name).encode_chat(PLAIN[0])


def test_tools_rejected_by_v1() -> None:
    conv = THINKING_TOOLS[0][1:4] + [{"role": "assistant", "content": "21 C."}]
    conv[1] = {k: x for k, x in conv[1].items() if k != "content"}
    with pytest.raises(DataError, match="Tools not implemented for tokenizer V1"):  # mistral-common's words
        load_tokenizer("v1").encode_chat(conv)


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": "x"}, {"type": "thinking", "thinking": "t",
                                                                          "closed": False}, "text"])
def test_unsupported_parts(part) -> None:
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [part]}]
    with pytest.raises(DataError, match="message 1: .*(not supported|unclosed)"):
        load_tokenizer("v7").encode_chat(conv)


def test_unshipped_version_names() -> None:
    for name in ("v11", "v13", "v15"):
        with pytest.raises(ModelError, match=f"ships no {name} tokenizer file.*tekken.json"):
            load_tokenizer(name)
