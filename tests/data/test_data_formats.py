"""Record layouts -> conversations, field maps, and the reasons given for malformed records."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import write_jsonl

from mistral_tune.data.build import build_dataset
from mistral_tune.data.formats import Chat, Text, detect_format, to_example
from mistral_tune.errors import DataError

U, A = "user", "assistant"


def msgs(chat: Chat) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in chat.messages]


def test_each_format_and_detection() -> None:
    cases = [
        ({"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ]
    for record, fmt in cases:
        assert detect_format(record) == fmt
        assert msgs(to_example(record, "auto")) == [(U, "q"), (A, "a")]
    assert to_example({"text": "once upon"}, "auto") == Text("once upon")
    # Alpaca input and system become part of the prompt / a system message.
    ex = to_example({"instruction": "Sum", "input": "2 2", "output": "4", "system": "Be terse."}, "instruction")
    assert msgs(ex) == [("system", "Be terse."), (U, "Sum\n\n2 2"), (A, "4")]
    # Conversational prompt/completion (lists of messages).
    ex = to_example({"prompt": [{"role": U, "content": "q"}], "completion": [{"role": A, "content": "a"}]},
                    "prompt_completion")
    assert msgs(ex) == [(U, "q"), (A, "a")]
    # A list named "conversations" with role/content keys is OpenAI messages.
    assert detect_format({"conversations": [{"role": U, "content": "q"}]}) == "messages"
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format({"question": "q"})


def test_field_map() -> None:
    record = {"question": "q", "answer": "a"}
    assert msgs(to_example(record, "auto", {"instruction": "question", "output": "answer"})) == [(U, "q"), (A, "a")]
    sharegpt = {"dialog": [{"speaker": "human", "text": "q"}, {"speaker": "gpt", "text": "a"}]}
    fm = {"conversations": "dialog", "from": "speaker", "value": "text"}
    assert msgs(to_example(sharegpt, "sharegpt", fm)) == [(U, "q"), (A, "a")]
    with pytest.raises(ValueError, match="missing field 'answer'"):
        to_example({"question": "q"}, "alpaca", {"instruction": "question", "output": "answer"})


def test_tool_calls_pass_through(tok) -> None:
    record = {"messages": [
        {"role": U, "content": "Weather in Paris?"},
        {"role": A, "content": None, "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'},
        {"role": A, "content": "21 degrees."},
    ]}
    ex = to_example(record, "auto")
    ids, mask = tok.encode_chat(ex.messages)
    assert any(mask) and tok.decode([i for i, m in zip(ids, mask, strict=True) if m]).count("21 degrees") == 1


@pytest.mark.parametrize(("record", "reason"), [
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"content": "q"}]}, "missing 'role'"),
    ({"messages": [{"role": U, "content": 5}, {"role": A, "content": "a"}]}, "must be a string"),
    ({"messages": [{"role": A, "content": "a"}, {"role": U, "content": "q"}, {"role": A, "content": "b"}]},
     "wrong role order"),
    ({"messages": [{"role": U, "content": "q"}, {"role": "tool", "content": "r", "tool_call_id": "x"},
                   {"role": A, "content": "a"}]}, "tool result that follows no tool call"),
    ({"messages": [{"role": U, "content": "q"}, {"role": A, "content": "  "}]}, "empty assistant message"),
    ({"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}, {"role": U, "content": "?"}]},
     "last message must be from the assistant, got 'user'"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "unknown role 'bot'"),
    ({"conversations": [{"from": "alien", "value": "q"}]}, "unknown speaker 'alien'"),
    ({"instruction": 3, "output": "a"}, "field 'instruction' must be a string"),
    ({"instruction": "q"}, "missing field 'output'"),
    ({"text": "   "}, "field 'text' is empty"),
])
def test_malformed_records_have_reasons(record, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        to_example(record, "auto")


def test_bad_records_are_listed_with_file_and_line(tmp_path: Path, tok, make_cfg) -> None:
    good = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]}
    p = write_jsonl(tmp_path / "d.jsonl", [
        good,
        "{oops",
        {"messages": [{"role": U, "content": "q"}]},
        {"messages": [{"role": U, "content": "q"}, {"role": A, "content": ["not", "parts"]}]},
        {"messages": [{"role": U, "content": "q2"}, {"role": A, "content": "a2"}]},
    ])
    with pytest.raises(DataError) as err:
        build_dataset(make_cfg([p]), tok)
    text = str(err.value)
    assert text.startswith("3 bad record(s): ")
    assert f"{p}:2: not valid JSON" in text
    assert f"{p}:3: last message must be from the assistant, got 'user'" in text
    assert f"{p}:4: message 1: content part of type 'str' is not supported" in text

    data = build_dataset(make_cfg([p], on_bad_record="skip"), tok)
    assert len(data.train) == 2 and data.report.rejected == 3
    (rejects,) = data.report.rejects_files
    lines = Path(rejects).read_text().splitlines()
    assert len(lines) == 3 and all('"kind": "bad"' in line for line in lines)


def test_tool_calls_on_v1_are_a_bad_record(tmp_path: Path, make_cfg) -> None:
    from mistral_tune.chat import load_tokenizer

    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": U, "content": "q"},
        {"role": A, "content": None, "tool_calls": [{"id": "abcDEF123", "type": "function",
                                                    "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"},
        {"role": A, "content": "done"}]}])
    with pytest.raises(DataError, match=r"1 bad record\(s\): .*d\.jsonl:1: "):
        build_dataset(make_cfg([p]), load_tokenizer("v1"))


def test_auto_reads_each_record_by_its_keys_a_set_format_says_what_a_record_looks_like(
        tmp_path: Path, tok, make_cfg) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]},
                                          {"instruction": "q2", "output": "a2"}, {"instruction": "q3", "output": "a3"}])
    r = build_dataset(make_cfg([p]), tok).report
    assert r.samples == 3 and r.formats == {str(p): "alpaca (2), messages (1)"}
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*\(the record looks like alpaca, the dataset is read as "
                                        r"messages\)"):
        build_dataset(make_cfg([{"path": str(p), "format": "messages"}]), tok)


def test_data_config_keys_are_checked() -> None:
    from mistral_tune.config import config_from_dict
    from mistral_tune.errors import ConfigError

    base = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}
    cfg = config_from_dict(base)
    defaults = (cfg.on_bad_record, cfg.on_too_long, cfg.cleaning.dedup, cfg.cleaning.near_dedup)
    assert defaults == ("error", "drop", True, False)
    with pytest.raises(ConfigError, match="unknown key 'cleaning.redact_pi'; did you mean 'redact_pii'"):
        config_from_dict({**base, "cleaning": {"redact_pi": False}})
    with pytest.raises(ConfigError, match="unknown key 'datasets.0.weigth'; did you mean 'weight'"):
        config_from_dict({**base, "datasets": [{"path": "d.jsonl", "weigth": 2}]})
    with pytest.raises(ConfigError, match=r"field_map: unknown field name\(s\) \['question'\]"):
        config_from_dict({**base, "datasets": [{"path": "d.jsonl", "field_map": {"question": "q"}}]})
    with pytest.raises(ConfigError, match="val_set_size or val_datasets, not both"):
        config_from_dict({**base, "val_set_size": 0.1, "val_datasets": [{"path": "v.jsonl"}]})
    with pytest.raises(ConfigError, match="on_too_long"):
        config_from_dict({**base, "on_too_long": "cut"})


@pytest.mark.parametrize("version", ["v3", "tekken"])
def test_tool_definitions_match_mistral_common(tmp_path: Path, make_cfg, version: str) -> None:
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Tool, ToolCall
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_tune.chat import load_tokenizer

    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function",
            "function": {"name": "get_weather", "description": "Current weather", "parameters": params}}
    call = {"id": "abcDEF123", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}
    record = {"tools": [tool], "messages": [
        {"role": U, "content": "Weather in Lyon?"}, {"role": A, "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 18}'},
        {"role": A, "content": "18 degrees."}]}
    tok = load_tokenizer(version)
    data = build_dataset(make_cfg([write_jsonl(tmp_path / "d.jsonl", [record])], sequence_len=512), tok)
    ids, mask = data.train.ids_and_mask(0)

    ref = MistralTokenizer.from_file(tok.source_file, mode=ValidationMode.finetuning)
    expected = ref.encode_chat_completion(ChatCompletionRequest(tools=[Tool.model_validate(tool)], messages=[
        UserMessage(content="Weather in Lyon?"), AssistantMessage(tool_calls=[ToolCall.model_validate(call)]),
        ToolMessage(content='{"temp": 18}', tool_call_id="abcDEF123"), AssistantMessage(content="18 degrees.")])).tokens
    assert list(ids) == expected
    trained = tok.decode([int(i) for i, m in zip(ids, mask, strict=True) if m])
    assert "18 degrees." in trained and "Current weather" not in trained  # definitions are never targets
