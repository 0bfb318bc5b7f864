"""OpenAI API requests: parsing and validation, independent of HTTP and of the engine.

`parse_body` turns request bytes into a JSON object and `parse_request` into a validated
ChatRequest or CompletionRequest; every refusal is an ApiError whose body is OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) and whose message names the field. After
validation every value is safe to hand to the engine: finite numbers in range, a seed in int64's
range, text that is valid Unicode (no lone surrogates) with control characters removed, at most
MAX_STOP_STRINGS stop strings of at most MAX_STOP_CHARS characters each.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from ..generate.sampling import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_CHOICES = 8  # n
MAX_TOOLS = 128  # as OpenAI
MAX_STOP_CHARS = 1000
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI documents

# C0 and C1 control characters except tab, newline and carriage return.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class ApiError(Exception):
    """A refusal: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def clean_text(text: str) -> str:
    return _CONTROL_CHARS.sub("", text)


def _unicode_text(text: str) -> str:
    bad = _SURROGATE.search(text)
    if bad:
        raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}, "
                         "which is not a character")
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]


def _text_or_list(item: Any, expected: str) -> Any:
    """A string or a list of `item`, told apart by type, so errors come only from the form sent."""
    kind = lambda v: "text" if isinstance(v, str) else "list" if isinstance(v, list) else None
    pick = Discriminator(kind, custom_error_type="type_error", custom_error_message=f"Input should be {expected}")
    return Annotated[Annotated[Text, Tag("text")] | Annotated[list[item], Tag("list")], pick]


class _Request(BaseModel):
    # OpenAI clients send fields we do not use (user, presence_penalty, ...): accept, ignore.
    # Non-finite numbers (1e400 parses as infinity) are refused wherever a number is read.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class FunctionCall(_Request):
    name: Text = Field(min_length=1, max_length=64)
    arguments: Text  # a JSON object, as text


class ToolCall(_Request):
    id: Text = Field(min_length=1, max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCall

    @field_validator("function")
    @classmethod
    def _json_arguments(cls, v: FunctionCall) -> FunctionCall:
        try:
            args = json.loads(v.arguments)
        except ValueError:
            raise ValueError("arguments must be a JSON object (as text)") from None
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object (as text)")
        return v


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: _text_or_list(TextPart, "a string or a list of text parts") | None = None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_call_id: Text | None = Field(None, min_length=1, max_length=64)

    def text(self) -> str | None:
        if self.content is None:
            return None
        raw = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return clean_text(raw)


_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # a function's name, as OpenAI allows


class FunctionDef(_Request):
    name: str = Field(pattern=_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request):
    name: str = Field(pattern=_NAME)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Request):
    name: str = Field("response", pattern=_NAME)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class Sampling(_Request):
    """The fields both endpoints share. Any temperature in [0, 2] and top_p in (0, 1] is usable:
    values so small that one token keeps all the probability sample as greedy would."""

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: the model's default (serve/defaults.py)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # not OpenAI's, but vLLM's: 0 or -1 is off
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _text_or_list(Text, "a string or a list of strings") | None = Field(None, validate_default=True)  # -> list
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])

    @field_validator("stop")
    @classmethod
    def _stop(cls, v) -> list[str]:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
        return stops


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: _text_or_list(Text, "a string or a list of one string")
    logprobs: int | None = Field(None, ge=0, le=5)  # as OpenAI's legacy completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request")
            v = v[0]
        return v

    def requested_tokens(self) -> int | None:
        return self.max_tokens


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        body = json.loads(raw, parse_constant=_not_json_constant)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # bad syntax or UTF-8, NaN/Infinity, an integer of thousands of digits
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def parse_request(body: dict, chat: bool) -> ChatRequest | CompletionRequest:
    """A validated chat or completion request, or a 400 naming the first fields at fault."""
    try:
        req = ChatRequest.model_validate(body) if chat else CompletionRequest.model_validate(body)
    except ValidationError as exc:
        problems: dict[str, str] = {}
        for err in exc.errors(include_input=False, include_url=False):
            path = _field_path(body, err["loc"], missing=err["type"] == "missing")
            problems.setdefault(path, err["msg"].removeprefix("Value error, "))  # a union's first branch
        parts = [f"{path}: {msg}" if path else msg for path, msg in list(problems.items())[:3]]
        raise ApiError(400, "; ".join(parts), param=next(iter(problems)) or None) from None
    if chat:
        _check_chat(req)
    return req


def _check_chat(req: ChatRequest) -> None:
    """What a chat request's fields must agree on (each refusal names its field)."""
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        if m.role == "tool" and (m.tool_call_id is None or m.content is None):
            raise ApiError(400, f"{where}: a tool message needs 'tool_call_id' and 'content'", param=where)
        if m.tool_calls and m.role != "assistant":
            raise ApiError(400, f"{where}.tool_calls: only assistant messages have tool calls", param=where)
        if m.content is None and not m.tool_calls:
            raise ApiError(400, f"{where}.content: required (or, for an assistant, 'tool_calls')", param=where)
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) < len(names):
        raise ApiError(400, "tools: two functions have the same name", param="tools")
    choice = req.tool_choice
    if not req.tools and choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice: needs tools", param="tool_choice")
    if not isinstance(choice, str | None) and choice.function.name not in names:
        raise ApiError(400, f"tool_choice: no tool named {choice.function.name!r} in tools", param="tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs true", param="top_logprobs")
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise ApiError(400, "response_format.json_schema: a json_schema type needs json_schema.schema",
                       param="response_format.json_schema")
    if fmt is not None and fmt.type != "text" and req.tools and choice not in (None, "none"):
        raise ApiError(400, "response_format: a JSON answer and tool calls cannot both be asked for (set "
                       "tool_choice 'none' or leave response_format out)", param="response_format")


def _field_path(body: Any, loc: tuple, missing: bool) -> str:
    """An error's location as keys and indexes of the body, without pydantic's union-member tags."""
    parts, node = [], body
    for i, step in enumerate(loc):
        if isinstance(node, dict) and step in node or isinstance(node, list) and isinstance(step, int):
            parts.append(str(step))
            node = node[step]
        elif missing and i == len(loc) - 1:
            parts.append(str(step))
    return ".".join(parts)
