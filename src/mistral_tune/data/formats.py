"""Turning one record into a conversation (`Chat`) or a raw text (`Text`), whatever its layout.

Formats (detected per dataset from its first record, or set in the config):

- ``messages``: OpenAI ``{"messages": [{"role", "content"}, ...]}``, including assistant
  ``tool_calls``, ``tool`` messages with ``tool_call_id``, and thinking (assistant/system content
  parts ``{"type": "thinking", "thinking": ...}``, or an assistant's ``reasoning_content``);
- ``sharegpt``: ``{"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}``;
- ``alpaca`` (alias ``instruction``): ``instruction``, optional ``input``, ``output``, optional ``system``;
- ``prompt_completion``: ``prompt`` + ``completion`` (strings, or lists of messages), optional ``system``;
- ``text``: raw continuation text.

A field map renames columns: ``{"instruction": "question", "output": "answer"}`` reads the record's
``question`` as the instruction. Message keys (``role``/``content``, ``from``/``value``) can be mapped
the same way. Reasons for a bad record are short; the caller adds file:line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ALIASES = {"instruction": "alpaca"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system",
                  "tool": "tool"}


@dataclass
class Chat:
    messages: list[dict]
    tools: list[dict] | None = None  # tool definitions offered to the model (messages format)


@dataclass
class Text:
    text: str


class FieldMap:
    """Reads canonical field names through a user's renaming."""

    def __init__(self, mapping: dict[str, str] | None = None) -> None:
        self.mapping = dict(mapping or {})

    def key(self, canonical: str) -> str:
        return self.mapping.get(canonical, canonical)

    def has(self, record: dict, canonical: str) -> bool:
        return self.key(canonical) in record

    def get(self, record: dict, canonical: str) -> Any:
        return record.get(self.key(canonical))


def detect_format(record: dict, fields: FieldMap | None = None) -> str:
    fm = fields or FieldMap()
    if fm.has(record, "messages"):
        return "messages"
    if fm.has(record, "conversations"):
        turns = fm.get(record, "conversations")
        # Some datasets name the list "conversations" but use OpenAI role/content keys.
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and fm.key("role") in turns[0]:
            return "messages"
        return "sharegpt"
    if fm.has(record, "instruction") and fm.has(record, "output"):
        return "alpaca"
    if fm.has(record, "prompt") and fm.has(record, "completion"):
        return "prompt_completion"
    if fm.has(record, "text"):
        return "text"
    if fm.has(record, "instruction") or fm.has(record, "output"):
        return "alpaca"
    raise ValueError(
        f"cannot tell the format from keys {sorted(record)}; expected 'messages', 'conversations', "
        "'instruction' + 'output', 'prompt' + 'completion', or 'text' (or set format: and field_map:)"
    )


def canonical_format(fmt: str) -> str:
    return ALIASES.get(fmt, fmt)


def _string(record: dict, key: str, fm: FieldMap, required: bool = True) -> str:
    value = fm.get(record, key)
    shown = fm.key(key)
    if value is None:
        if required:
            raise ValueError(f"missing field '{shown}'")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{shown}' must be a string, got {type(value).__name__}")
    return value


def to_example(record: dict, fmt: str, fields: FieldMap | dict | None = None) -> Chat | Text:
    """Convert one record; raises ValueError with a short reason (the caller adds file:line)."""
    fm = fields if isinstance(fields, FieldMap) else FieldMap(fields)
    fmt = canonical_format(fmt)
    if fmt == "auto":
        fmt = detect_format(record, fm)
    if fmt == "messages":
        key = "messages" if fm.has(record, "messages") or not fm.has(record, "conversations") else "conversations"
        messages = fm.get(record, key)
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"field '{fm.key(key)}' must be a non-empty list of messages")
        tools = fm.get(record, "tools")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise ValueError(f"field '{fm.key('tools')}' must be a list of tool definitions")
        return Chat(check_conversation([_openai_message(i, m, fm) for i, m in enumerate(messages)]), tools or None)
    if fmt == "sharegpt":
        turns = fm.get(record, "conversations")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"field '{fm.key('conversations')}' must be a non-empty list of turns")
        return Chat(check_conversation([_sharegpt_turn(i, t, fm) for i, t in enumerate(turns)]))
    if fmt == "alpaca":
        instruction = _string(record, "instruction", fm)
        extra = _string(record, "input", fm, required=False)
        output = _string(record, "output", fm)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Chat(check_conversation(_with_system(record, fm, [{"role": "user", "content": prompt},
                                                                 {"role": "assistant", "content": output}])))
    if fmt == "prompt_completion":
        prompt, completion = fm.get(record, "prompt"), fm.get(record, "completion")
        msgs: list[dict] = []
        for name, value, role in (("prompt", prompt, "user"), ("completion", completion, "assistant")):
            if value is None:
                raise ValueError(f"missing field '{fm.key(name)}'")
            if isinstance(value, str):
                msgs.append({"role": role, "content": value})
            elif isinstance(value, list):  # the "conversational" prompt/completion layout
                msgs.extend(_openai_message(i, m, fm) for i, m in enumerate(value))
            else:
                raise ValueError(f"field '{fm.key(name)}' must be a string or a list of messages")
        return Chat(check_conversation(_with_system(record, fm, msgs)))
    if fmt == "text":
        text = _string(record, "text", fm)
        if not text.strip():
            raise ValueError(f"field '{fm.key('text')}' is empty")
        return Text(text)
    raise ValueError(f"unknown format '{fmt}'; allowed: auto, {', '.join(FORMATS)}")


def _with_system(record: dict, fm: FieldMap, msgs: list[dict]) -> list[dict]:
    system = fm.get(record, "system")
    if system is None or system == "":
        return msgs
    if not isinstance(system, str):
        raise ValueError(f"field '{fm.key('system')}' must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}, *msgs]


def _openai_message(i: int, m: Any, fm: FieldMap) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f"message {i}: expected an object, got {type(m).__name__}")
    rk, ck = fm.key("role"), fm.key("content")
    role = m.get(rk)
    if not isinstance(role, str):
        raise ValueError(f"message {i}: missing '{rk}'")
    out = {k: v for k, v in m.items() if k not in (rk, ck)}
    out["role"] = role
    content = m.get(ck)
    thinking = isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "thinking" for p in content)
    if thinking and role in ("assistant", "system"):
        pass  # text and thinking parts stay parts; the tokenizer checks them (chat.py)
    elif isinstance(content, list):  # OpenAI content parts: keep the text ones, refuse others
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"message {i}: content part of type {kind!r} is not supported (text only)")
        content = "".join(texts)
    if content is not None and not isinstance(content, str) and not thinking:
        raise ValueError(f"message {i}: '{ck}' must be a string, got {type(content).__name__}")
    out["content"] = content
    return out


def _sharegpt_turn(i: int, t: Any, fm: FieldMap) -> dict:
    if not isinstance(t, dict):
        raise ValueError(f"turn {i}: expected an object, got {type(t).__name__}")
    fk, vk = fm.key("from"), fm.key("value")
    who = t.get(fk)
    if not isinstance(who, str):
        raise ValueError(f"turn {i}: missing '{fk}'")
    role = SHAREGPT_ROLES.get(who.lower())
    if role is None:
        raise ValueError(f"turn {i}: unknown speaker {who!r} (known: {', '.join(SHAREGPT_ROLES)})")
    value = t.get(vk)
    if not isinstance(value, str):
        raise ValueError(f"turn {i}: '{vk}' must be a string, got {type(value).__name__}")
    out = {"role": role, "content": value}
    if "weight" in t:
        out["weight"] = t["weight"]
    return out


def check_conversation(messages: list[dict]) -> list[dict]:
    """Catch the common conversation mistakes with a readable reason before tokenizing."""
    seen_user = False
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {i}: unknown role {role!r} (expected system, user, assistant or tool)")
        content = m.get("content")
        if role == "user":
            seen_user = True
        elif role == "assistant":
            if not seen_user:
                raise ValueError(f"wrong role order: message {i} is an assistant turn before any user turn")
            if (content is None or not str(content).strip()) and not m.get("tool_calls"):
                raise ValueError(f"message {i}: empty assistant message")
        elif role == "tool":
            prev = messages[i - 1] if i else None
            if prev is None or not (prev["role"] == "tool" or (prev["role"] == "assistant" and prev.get("tool_calls"))):
                raise ValueError(f"wrong role order: message {i} is a tool result that follows no tool call")
        if role not in ("assistant", "system") and not isinstance(content, str):
            raise ValueError(f"message {i}: {role} content must be a string")
    last = messages[-1]["role"]
    if last != "assistant":
        raise ValueError(f"last message must be from the assistant, got {last!r} (nothing to learn at the end)")
    return messages


def example_json(example: Chat | Text) -> str:
    """A canonical serialisation (for exact deduplication and the rejects file)."""
    if isinstance(example, Text):
        body: dict = {"text": example.text}
    else:
        body = {"messages": example.messages, "tools": example.tools}
    return json.dumps(body, ensure_ascii=False, sort_keys=True)
