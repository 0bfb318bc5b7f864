"""Reading dataset records and turning each into a conversation or a raw text.

A record becomes either `Chat(messages)` or `Text(text)`; the tokenizer then turns those into ids
and a loss mask. Errors carry the file and line so a user can find the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

FORMATS = ("messages", "instruction", "text")


@dataclass
class Chat:
    messages: list[dict]


@dataclass
class Text:
    text: str


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a line that is not a JSON object is a DataError."""
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    with path.open("r", encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 ({exc.reason})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    raise ValueError(
        f"cannot tell the format from keys {sorted(record)}; expected 'messages', "
        "'instruction' + 'output', or 'text'"
    )


def _string(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def to_example(record: dict, fmt: str) -> Chat | Text:
    """Convert one record; raises ValueError with a short reason (the caller adds file:line)."""
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("field 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{i}] must be an object with a 'role'")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        return Chat(messages)
    if fmt == "instruction":
        instruction = _string(record, "instruction")
        extra = _string(record, "input", required=False)
        output = _string(record, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])
    if fmt == "text":
        text = _string(record, "text")
        if not text.strip():
            raise ValueError("field 'text' is empty")
        return Text(text)
    raise ValueError(f"unknown format '{fmt}'; allowed: auto, {', '.join(FORMATS)}")
