"""Tool calling for the server: OpenAI messages and tools to the dicts chat.py encodes (so a prompt
with tools is rendered exactly as training renders it), the model's [TOOL_CALLS] output parsed
back into OpenAI tool calls, and the constraint that forces a call (tool_choice "required" or a
named function).

What a model emits after [TOOL_CALLS] is what mistral-common writes for an assistant's calls:
up to v7, one JSON list `[{"name": ..., "arguments": {...}, "id": ...}]` (v2 without ids); from
v11 on, each call is `[TOOL_CALLS]name[ARGS]{...}` (v11 may put `[CALL_ID]id` before [ARGS]).
"""

from __future__ import annotations

import json
import secrets
import string

from ..chat import ChatTokenizer
from ..generate.constrain import Grammars, Prefixed
from .protocol import ApiError, ChatRequest

_ID_CHARS = string.ascii_letters + string.digits


class MalformedToolCall(ValueError):
    """The model's tool-call output does not parse, or names no tool of the request."""


def new_call_id() -> str:
    """Nine letters and digits: the form Mistral's tool call ids take."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def prompt_messages(req: ChatRequest) -> list[dict]:
    """The request's messages as chat.py's dicts (tool calls and tool results included)."""
    out = []
    for m in req.messages:
        msg: dict = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def prompt_tools(req: ChatRequest) -> list[dict] | None:
    """The tools the prompt shows the model: none when tool_choice is "none"."""
    if not req.tools or req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


class ToolFormat:
    """How one tokenizer writes tool calls, and their parsing."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        instruct = tokenizer._instruct
        self.tokenizer = tokenizer
        self.calls_id: int | None = getattr(instruct, "TOOL_CALLS", None)
        self.args_id: int | None = getattr(instruct, "ARGS", None)
        self.call_id_id: int | None = getattr(instruct, "CALL_ID", None)

    def check(self, req: ChatRequest) -> None:
        if req.tools and self.calls_id is None:
            raise ApiError(400, f"tools: this model's tokenizer ({self.tokenizer.version}) has no tool calls",
                           param="tools")

    def parse(self, ids: list[int], names: set[str]) -> list[dict]:
        """OpenAI tool calls from the ids that begin with [TOOL_CALLS]; MalformedToolCall if they do not parse."""
        calls = self._parse_args(ids) if self.args_id is not None else self._parse_list(ids)
        out = []
        for name, args, call_id in calls:
            if name not in names:
                raise MalformedToolCall(f"no tool named {name!r}")
            out.append({"id": call_id or new_call_id(), "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
        return out

    def _parse_list(self, ids: list[int]) -> list[tuple[str, dict, str | None]]:
        text = self.tokenizer.decode(ids[1:])
        try:
            calls = json.loads(text)
        except ValueError:
            raise MalformedToolCall("not a JSON list") from None
        if not isinstance(calls, list) or not calls:
            raise MalformedToolCall("not a JSON list of calls")
        out = []
        for c in calls:
            if not (isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)):
                raise MalformedToolCall("a call without a name and arguments object")
            call_id = c.get("id")
            out.append((c["name"], c["arguments"], call_id if isinstance(call_id, str) and call_id else None))
        return out

    def _parse_args(self, ids: list[int]) -> list[tuple[str, dict, str | None]]:
        out, decode = [], self.tokenizer.decode
        segments, current = [], None
        for t in ids:
            if t == self.calls_id:
                current = []
                segments.append(current)
            else:
                current.append(t)
        for seg in segments:
            if seg.count(self.args_id) != 1:
                raise MalformedToolCall("a call without one [ARGS]")
            at = seg.index(self.args_id)
            head, body = seg[:at], seg[at + 1:]
            call_id = None
            if self.call_id_id in head:
                k = head.index(self.call_id_id)
                head, call_id = head[:k], decode(head[k + 1:]).strip() or None
            try:
                args = json.loads(decode(body))
            except ValueError:
                raise MalformedToolCall("arguments are not JSON") from None
            if not isinstance(args, dict):
                raise MalformedToolCall("arguments are not a JSON object")
            out.append((decode(head).strip(), args, call_id))
        return out

    def forced(self, req: ChatRequest, grammars: Grammars) -> Prefixed | None:
        """The constraint that makes the answer a call (tool_choice "required" or a named function;
        one call, or with parallel_tool_calls a list of them up to v7), else None."""
        choice = req.tool_choice
        if choice in (None, "none", "auto"):
            return None
        tools = [t for t in req.tools if isinstance(choice, str) or t.function.name == choice.function.name]
        params = {t.function.name: t.function.parameters or {"type": "object"} for t in tools}
        if self.args_id is None:
            call = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema,
                                                      "id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}},
                     "required": ["name", "arguments"]} for name, schema in params.items()]
            schema = {"type": "array", "items": {"anyOf": call}, "minItems": 1}
            if not req.parallel_tool_calls:
                schema["maxItems"] = 1
            return Prefixed({(self.calls_id,): grammars.json(schema)})
        encode = lambda s: self.tokenizer.encode_text(s, bos=False, eos=False)
        return Prefixed({(self.calls_id, *encode(name), self.args_id): grammars.json(schema)
                         for name, schema in params.items()})
