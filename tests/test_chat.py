"""Tests for mistral_tune.chat: ids must equal mistral-common's own encode_chat_completion."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_tune.chat import BUNDLED, BUNDLED_DIR, ChatTokenizer, load_tokenizer
from mistral_tune.errors import DataError, ModelError

# "tekken_v7" is the bundled tekken file relabelled as version v7: the wheel ships no
# V7-Tekken file, and this exercises [SYSTEM_PROMPT] handling on a tiktoken vocabulary.
NAMES = ["v1", "v3", "v7", "tekken", "tekken_v7"]

_CACHE: dict[str, tuple[ChatTokenizer, MistralTokenizer, MistralTokenizer]] = {}


@pytest.fixture(scope="session")
def tekken_v7_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = json.loads(BUNDLED["tekken"].read_text(encoding="utf-8"))
    data["config"]["version"] = "v7"
    path = tmp_path_factory.mktemp("tekken_v7") / "tekken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _get(name: str, tekken_v7_file: Path) -> tuple[ChatTokenizer, MistralTokenizer, MistralTokenizer]:
    """(ours, reference in finetuning mode, reference in test mode), loaded once per name."""
    if name not in _CACHE:
        tok = load_tokenizer(str(tekken_v7_file) if name == "tekken_v7" else name)
        ref_ft = MistralTokenizer.from_file(tok.source_file, mode=ValidationMode.finetuning)
        ref_test = MistralTokenizer.from_file(tok.source_file, mode=ValidationMode.test)
        _CACHE[name] = (tok, ref_ft, ref_test)
    return _CACHE[name]


@pytest.fixture(params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tok(name: str, tekken_v7_file: Path) -> ChatTokenizer:
    return _get(name, tekken_v7_file)[0]


@pytest.fixture
def ref_ft(name: str, tekken_v7_file: Path) -> MistralTokenizer:
    return _get(name, tekken_v7_file)[1]


@pytest.fixture
def ref_test(name: str, tekken_v7_file: Path) -> MistralTokenizer:
    return _get(name, tekken_v7_file)[2]


# ---------------------------------------------------------------------- conversations

NON_ASCII = "Café, naïve, Übergröße; 日本語のテキスト 你好; emoji 😀🚀👍🏽; عربي: مرحبا بالعالم"

CONVERSATIONS: dict[str, list[dict]] = {
    "single": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, obviously."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    # mistral-common rejects system right after assistant, but allows it after a user message.
    "two_system_prompts": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr!"},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "system", "content": "Now answer in French."},
        {"role": "user", "content": "Please."},
        {"role": "assistant", "content": "Sous le palmier."},
    ],
    "non_ascii": [
        {"role": "system", "content": "Réponds en français. " + NON_ASCII},
        {"role": "user", "content": NON_ASCII},
        {"role": "assistant", "content": "D'accord : " + NON_ASCII},
        {"role": "user", "content": "كيف حالك؟ 🤔"},
        {"role": "assistant", "content": "بخير، شكرا! 日本 🎉"},
    ],
    "multiline": [
        {"role": "user", "content": "Write code.\n\nPlease."},
        {"role": "assistant", "content": "```python\ndef f(x):\n    return x * 2\n```\n\nDone."},
    ],
    "weight0": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Insult me."},
        {"role": "assistant", "content": "You absolute walnut.", "weight": 0},
        {"role": "user", "content": "Be nicer."},
        {"role": "assistant", "content": "You are wonderful.", "weight": 1},
    ],
    "consecutive_users": [
        {"role": "user", "content": "First part."},
        {"role": "user", "content": "Second part."},
        {"role": "assistant", "content": "Both read."},
    ],
}

TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "abc123XYZ",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21°C in Paris."},
]


def reference_messages(conv: list[dict], training: bool = True) -> list:
    """Build mistral-common messages directly with the library's classes (independent of chat.py)."""
    out: list = []
    for m in conv:
        role = m["role"]
        if role == "system":
            out.append(SystemMessage(content=m["content"]))
        elif role == "user":
            out.append(UserMessage(content=m["content"]))
        elif role == "tool":
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m.get("name")))
        else:
            calls = [ToolCall.model_validate(c) for c in m["tool_calls"]] if m.get("tool_calls") else None
            if training:
                out.append(
                    FinetuningAssistantMessage(content=m.get("content"), tool_calls=calls, weight=m.get("weight"))
                )
            else:
                out.append(AssistantMessage(content=m.get("content"), tool_calls=calls))
    return out


def true_spans(ids: list[int], mask: list[bool]) -> list[list[int]]:
    spans: list[list[int]] = []
    prev = False
    for i, m in zip(ids, mask, strict=True):
        if m and not prev:
            spans.append([])
        if m:
            spans[-1].append(i)
        prev = m
    return spans


# ---------------------------------------------------------------------- encode_chat


@pytest.mark.parametrize("conv_name", list(CONVERSATIONS))
def test_encode_chat_matches_mistral_common(tok: ChatTokenizer, ref_ft: MistralTokenizer, conv_name: str) -> None:
    conv = CONVERSATIONS[conv_name]
    ids, mask = tok.encode_chat(conv)
    expected = ref_ft.encode_chat_completion(ChatCompletionRequest(messages=reference_messages(conv))).tokens
    assert ids == expected
    assert len(mask) == len(ids)
    assert ids[0] == tok.bos_id and not mask[0]

    # Masked-in tokens are exactly the trained assistant replies, each closed by </s>.
    # Consecutive user messages are merged, but no test conversation has consecutive assistants.
    trained = [m["content"] for m in conv if m["role"] == "assistant" and m.get("weight", 1) != 0]
    spans = true_spans(ids, mask)
    assert len(spans) == len(trained)
    for span, content in zip(spans, trained, strict=True):
        assert span[-1] == tok.eos_id
        assert tok.eos_id not in span[:-1]
        # No strip needed: SPM prepends a dummy-prefix "▁" when encoding and sentencepiece's
        # decode removes it again; tekken adds nothing.  (v2+ would rstrip trailing spaces of
        # the reply, and none of these replies has any.)
        assert tok.decode(span[:-1]) == content


def test_consecutive_assistants_are_merged(tok: ChatTokenizer, ref_ft: MistralTokenizer) -> None:
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Part one."},
        {"role": "assistant", "content": "Part two."},
    ]
    ids, mask = tok.encode_chat(conv)
    expected = ref_ft.encode_chat_completion(ChatCompletionRequest(messages=reference_messages(conv))).tokens
    assert ids == expected
    (span,) = true_spans(ids, mask)
    assert tok.decode(span[:-1]) == "Part one.\n\nPart two."


def test_pickle_round_trip(tok: ChatTokenizer) -> None:
    again = pickle.loads(pickle.dumps(tok))
    assert (again.version, again.is_tekken, again.source_file) == (tok.version, tok.is_tekken, tok.source_file)
    conv = CONVERSATIONS["weight0"]
    assert again.encode_chat(conv) == tok.encode_chat(conv)


def test_weight0_turn_is_in_ids_but_not_trained(tok: ChatTokenizer) -> None:
    conv = CONVERSATIONS["weight0"]
    ids, mask = tok.encode_chat(conv)
    all_on = [dict(m, weight=1) if m["role"] == "assistant" else m for m in conv]
    ids1, mask1 = tok.encode_chat(all_on)
    assert ids1 == ids  # the weight changes the mask only
    dropped = [i for i, (a, b) in enumerate(zip(mask, mask1, strict=True)) if b and not a]
    assert tok.decode([ids[i] for i in dropped[:-1]]) == "You absolute walnut."
    assert ids[dropped[-1]] == tok.eos_id
    assert not any(a and not b for a, b in zip(mask, mask1, strict=True))


def test_train_on_inputs(tok: ChatTokenizer) -> None:
    ids, mask = tok.encode_chat(CONVERSATIONS["system_multi_turn"], train_on_inputs=True)
    assert mask == [False] + [True] * (len(ids) - 1)  # everything but the unpredictable BOS

    conv = CONVERSATIONS["weight0"]
    _, default_mask = tok.encode_chat(conv)
    _, all_on_mask = tok.encode_chat([dict(m, weight=1) if m["role"] == "assistant" else m for m in conv])
    ids, mask = tok.encode_chat(conv, train_on_inputs=True)
    weight0 = {i for i, (a, b) in enumerate(zip(default_mask, all_on_mask, strict=True)) if b and not a}
    assert weight0  # a weight-0 reply stays untrained even with train_on_inputs
    assert mask == [i != 0 and i not in weight0 for i in range(len(ids))]


def test_tool_conversation(name: str, tok: ChatTokenizer, ref_ft: MistralTokenizer) -> None:
    if name == "v1":
        with pytest.raises(DataError, match="(?i)tool"):
            tok.encode_chat(TOOL_CONVERSATION)
        return
    ids, mask = tok.encode_chat(TOOL_CONVERSATION)
    expected = ref_ft.encode_chat_completion(
        ChatCompletionRequest(messages=reference_messages(TOOL_CONVERSATION))
    ).tokens
    assert ids == expected
    spans = true_spans(ids, mask)
    assert len(spans) == 2  # the tool call and the final answer; the tool result is not trained
    assert all(s[-1] == tok.eos_id for s in spans)
    assert "get_weather" in tok.decode(spans[0]) and "Paris" in tok.decode(spans[0])
    assert tok.decode(spans[1][:-1]) == "It is 21°C in Paris."
    results = tok.mistral_tokenizer.instruct_tokenizer.tokenizer.get_special_token("[TOOL_RESULTS]")
    assert not mask[ids.index(results)]


# Tool conversations, generated: whatever mistral-common rejects we reject, and what it accepts
# gives its ids. v2 is the version with a rule of its own (one tool result per assistant turn).
TOOL_NAMES = ["v2", "v3", "v7", "tekken"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_IDS = ["abc123XYZ", "def456UVW", "ghi789RST"]


def _call(call_id: str, city: str) -> dict:
    arguments = json.dumps({"city": city})
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


@st.composite
def tool_conversations(draw) -> list[dict]:
    """Turns of user question, maybe tool calls and their results, answer; the results sometimes
    do not match the calls, and one message may be swapped, dropped or repeated."""
    conv: list[dict] = []
    for turn in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            conv.append({"role": "system", "content": "Answer in French."})
        conv.append({"role": "user", "content": f"Weather, question {turn}?"})
        if draw(st.booleans()):
            ids = draw(st.lists(st.sampled_from(CALL_IDS), min_size=1, max_size=3, unique=True))
            conv.append({"role": "assistant", "tool_calls": [_call(i, "Paris") for i in ids]})
            if draw(st.integers(0, 3)) == 0:
                ids = draw(st.lists(st.sampled_from(CALL_IDS), max_size=3))
            conv += [{"role": "tool", "tool_call_id": i, "name": "get_weather", "content": '{"temp": 21}'} for i in ids]
        conv.append({"role": "assistant", "content": f"Answer {turn}."})
    i = draw(st.integers(0, len(conv) - 2))
    change = draw(st.sampled_from(["none", "none", "swap", "drop", "repeat"]))
    if change == "swap":
        conv[i], conv[i + 1] = conv[i + 1], conv[i]
    elif change == "drop":
        del conv[i]
    elif change == "repeat":
        conv.insert(i, conv[i])
    if conv[-1]["role"] != "assistant":
        conv.append({"role": "assistant", "content": "Done."})
    return conv


@pytest.fixture(scope="module", params=TOOL_NAMES)
def tool_tokenizers(request: pytest.FixtureRequest) -> tuple[ChatTokenizer, MistralTokenizer]:
    source = BUNDLED_DIR / "mistral_instruct_tokenizer_240216.model.v2" if request.param == "v2" else request.param
    tok = load_tokenizer(str(source))
    return tok, MistralTokenizer.from_file(tok.source_file, mode=ValidationMode.finetuning)


SEVERAL_RESULTS = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "tool_calls": [_call("abc123XYZ", "Paris"), _call("def456UVW", "Rome")]},
    {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "def456UVW", "name": "get_weather", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "21°C and 25°C."},
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(conv=SEVERAL_RESULTS)
@given(conv=tool_conversations())
def test_tool_conversations_accepted_like_mistral_common(tool_tokenizers, conv: list[dict]) -> None:
    tok, reference = tool_tokenizers
    request = ChatCompletionRequest(messages=reference_messages(conv), tools=[WEATHER_TOOL])
    try:
        expected = reference.encode_chat_completion(request).tokens
    except (MistralCommonException, ValueError, AssertionError) as e:
        with pytest.raises(DataError):
            tok.encode_chat(conv, tools=[WEATHER_TOOL])
        note(f"rejected by mistral-common: {e}")
        return
    assert tok.encode_chat(conv, tools=[WEATHER_TOOL])[0] == expected


def test_v2_rejects_several_tool_results_for_one_turn() -> None:
    tok = load_tokenizer(str(BUNDLED_DIR / "mistral_instruct_tokenizer_240216.model.v2"))
    with pytest.raises(DataError, match="multiple tool results"):
        tok.encode_chat(SEVERAL_RESULTS, tools=[WEATHER_TOOL])
    assert tok.encode_chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL])  # one call, one result: fine


# ---------------------------------------------------------------------- text, prompt, decode


@pytest.mark.parametrize(("bos", "eos"), [(True, True), (True, False), (False, True), (False, False)])
def test_encode_text(tok: ChatTokenizer, ref_ft: MistralTokenizer, bos: bool, eos: bool) -> None:
    text = "Plain continuation text. " + NON_ASCII
    ids = tok.encode_text(text, bos=bos, eos=eos)
    body = ref_ft.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    assert ids == [tok.bos_id] * bos + body + [tok.eos_id] * eos
    assert tok.decode(ids) == text


def test_encode_text_defaults(tok: ChatTokenizer) -> None:
    ids = tok.encode_text("hello")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


@pytest.mark.parametrize("conv_name", ["single", "system_multi_turn", "two_system_prompts", "non_ascii"])
def test_encode_prompt_matches_test_mode(tok: ChatTokenizer, ref_test: MistralTokenizer, conv_name: str) -> None:
    conv = CONVERSATIONS[conv_name]
    prompt_msgs = conv[:-1]  # ends with the last user message
    ids = tok.encode_prompt(prompt_msgs)
    expected = ref_test.encode_chat_completion(
        ChatCompletionRequest(messages=reference_messages(prompt_msgs, training=False))
    ).tokens
    assert ids == expected
    # v1 writes [INST]/[/INST] as plain text, later versions as control tokens.
    assert tok.decode(ids, keep_special=True).rstrip().endswith("[/INST]")
    # The training encoding of the full conversation is this prompt plus the trained reply.
    train_ids, mask = tok.encode_chat(conv)
    assert train_ids[: len(ids)] == ids
    assert all(mask[len(ids) :]) and not mask[len(ids) - 1]


def test_decode_keep_special(tok: ChatTokenizer) -> None:
    ids, _ = tok.encode_chat(CONVERSATIONS["single"])
    assert "</s>" in tok.decode(ids, keep_special=True)
    assert "</s>" not in tok.decode(ids)


# ---------------------------------------------------------------------- errors

BAD_CONVERSATIONS: dict[str, tuple[object, str]] = {
    "empty": ([], "no messages"),
    "not_a_list": ({"role": "user", "content": "x"}, "list"),
    "not_a_dict": (["hello"], "object"),
    "last_is_user": ([{"role": "user", "content": "Hi"}], "last message"),
    "last_is_system": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "system", "content": "S"}],
        "last message",
    ),
    "unknown_role": ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}], "unknown role 'bot'"),
    "missing_role": ([{"content": "Hi"}, {"role": "assistant", "content": "Yo"}], "unknown role None"),
    "non_string_user": ([{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}], "string"),
    "non_string_assistant": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 42}], "string"),
    "empty_assistant": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], "empty"),
    "blank_assistant": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " \n "}], "empty"),
    "bad_weight": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0.5}],
        "weight",
    ),
    "weight_on_user": (
        [{"role": "user", "content": "Hi", "weight": 1}, {"role": "assistant", "content": "Yo"}],
        "weight",
    ),
    "system_after_assistant": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
        ],
        "Unexpected role 'system' after role 'assistant'",  # mistral-common's rule
    ),
    "lone_assistant": ([{"role": "assistant", "content": "Yo"}], "start with a user"),  # mistral-common's check
    "tool_without_id": (
        [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "Yo"}],
        "tool_call_id",
    ),
}


@pytest.mark.parametrize("bad", list(BAD_CONVERSATIONS))
def test_invalid_conversations(tok: ChatTokenizer, bad: str) -> None:
    conv, reason = BAD_CONVERSATIONS[bad]
    with pytest.raises(DataError, match=reason):
        tok.encode_chat(conv)  # type: ignore[arg-type]


def test_library_errors_become_data_errors(tok: ChatTokenizer) -> None:
    # user -> tool is rejected by mistral-common's validator (InvalidMessageStructureException).
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "{}"},
        {"role": "assistant", "content": "Yo"},
    ]
    with pytest.raises(DataError, match="Unexpected role"):
        tok.encode_chat(conv)


def test_encode_prompt_rejects_trailing_assistant(tok: ChatTokenizer) -> None:
    with pytest.raises(DataError, match="end with a user"):
        tok.encode_prompt(CONVERSATIONS["single"])
    with pytest.raises(DataError, match="no messages"):
        tok.encode_prompt([])


# ---------------------------------------------------------------------- loading and saving


@pytest.mark.parametrize(
    ("spec", "version", "is_tekken", "vocab"),
    [
        ("v1", "v1", False, 32000),
        ("v3", "v3", False, 32768),
        ("v7", "v7", False, 32768),
        ("tekken", "v3", True, 131072),
    ],
)
def test_bundled(spec: str, version: str, is_tekken: bool, vocab: int, tekken_v7_file: Path) -> None:
    tok = _get(spec, tekken_v7_file)[0]
    assert (tok.version, tok.is_tekken, tok.vocab_size) == (version, is_tekken, vocab)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.source_file == BUNDLED[spec] and tok.source_file.is_file()


def test_tekken_v7_fixture_is_v7(tekken_v7_file: Path) -> None:
    tok = _get("tekken_v7", tekken_v7_file)[0]
    assert (tok.version, tok.is_tekken) == ("v7", True)


def test_load_from_file_path() -> None:
    tok = load_tokenizer(str(BUNDLED["v3"]))
    assert tok.version == "v3" and not tok.is_tekken
    assert tok.source_file == BUNDLED["v3"]


def test_save_round_trip(tok: ChatTokenizer, tmp_path: Path) -> None:
    written = tok.save(tmp_path / "out")
    assert len(written) == 1 and written[0].is_file()
    expected_name = "tekken.json" if tok.is_tekken else f"tokenizer.model.{tok.version}"
    assert written[0].name == expected_name
    conv = CONVERSATIONS["non_ascii"]
    for again in (load_tokenizer(str(tmp_path / "out")), load_tokenizer(None, model_dir=tmp_path / "out")):
        assert again.version == tok.version and again.is_tekken == tok.is_tekken
        assert again.source_file == written[0]
        assert again.encode_chat(conv) == tok.encode_chat(conv)
    assert tok.save(tmp_path / "out") == written  # idempotent


def test_dir_prefers_tekken_json(tmp_path: Path) -> None:
    shutil.copyfile(BUNDLED["v3"], tmp_path / "tokenizer.model.v3")
    assert load_tokenizer(None, model_dir=tmp_path).version == "v3"
    shutil.copyfile(BUNDLED["tekken"], tmp_path / "tekken.json")
    assert load_tokenizer(None, model_dir=tmp_path).is_tekken


def test_bare_tokenizer_model_is_v1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copyfile(BUNDLED["v1"], tmp_path / "tokenizer.model")
    with caplog.at_level(logging.WARNING, logger="mistral_tune.chat"):
        assert load_tokenizer(None, model_dir=tmp_path).version == "v1"
    assert not caplog.records
    # A v3 vocabulary under the bare name still loads as v1 (mistral-common's rule) but warns.
    shutil.copyfile(BUNDLED["v3"], tmp_path / "tokenizer.model")
    with caplog.at_level(logging.WARNING, logger="mistral_tune.chat"):
        assert load_tokenizer(None, model_dir=tmp_path).version == "v1"
    assert "tokenizer.model.v3" in caplog.text


def test_ambiguous_dir(tmp_path: Path) -> None:
    shutil.copyfile(BUNDLED["v3"], tmp_path / "tokenizer.model.v3")
    shutil.copyfile(BUNDLED["v7"], tmp_path / "tokenizer.model.v7")
    with pytest.raises(ModelError, match="several"):
        load_tokenizer(str(tmp_path))


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tekken.json"
    with pytest.raises(ModelError, match="nope"):
        load_tokenizer(str(missing))


def test_dir_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")  # HF format: not something mistral-common reads
    with pytest.raises(ModelError, match="tekken.json"):
        load_tokenizer(None, model_dir=tmp_path)
    with pytest.raises(ModelError, match="not a directory"):
        load_tokenizer(None, model_dir=tmp_path / "missing")


def test_no_spec_no_dir() -> None:
    with pytest.raises(ModelError):
        load_tokenizer(None)


@pytest.mark.parametrize("filename", ["tekken.json", "tokenizer.model.v3", "notes.txt"])
def test_unloadable_file(tmp_path: Path, filename: str) -> None:
    bad = tmp_path / filename
    bad.write_text("not a tokenizer")
    with pytest.raises(ModelError, match=filename.replace(".", r"\.")):
        load_tokenizer(str(bad))
