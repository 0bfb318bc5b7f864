"""An OpenAI-compatible HTTP server for a fine-tuned model (stdlib http.server + pydantic).

Endpoints: POST /v1/chat/completions (streaming as server-sent events), POST /v1/completions,
GET /v1/models, GET /health. Safe defaults, because a model server is easy to expose by
accident: it binds 127.0.0.1; an optional API key (Bearer) guards every /v1 route; bodies,
input tokens, max_tokens and requests in flight are limited (over the in-flight limit a
request gets 429 at once instead of queueing without bound); request bodies are validated by
schema and every refusal is a JSON error in OpenAI's shape with a 4xx status.

Prompt safety: chat messages are formatted by mistral-common, which encodes message *text* as
text, so "[INST]" or "</s>" typed by a user are ordinary characters, never control tokens
(tests check this). Control characters other than tab and newline are removed from inputs.

One model serves one request at a time (a lock around generation); this is a server for trying
and evaluating a fine-tune and for small deployments. For throughput use vLLM (docs/deploy.md).
"""

from __future__ import annotations

import hmac
import json
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import DataError
from .generate import TextStream, generate
from .load import LoadedModel

# C0 and C1 control characters except tab, newline and carriage return.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    return _CONTROL_CHARS.sub("", text)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_input_tokens: int = 8192
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_concurrent: int = 4
    socket_timeout_s: float = 30.0


# ---------------------------------------------------------------------- request schemas


class _Request(BaseModel):
    # OpenAI clients send fields we do not use (user, presence_penalty, ...): accept, ignore.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        raw = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return clean_text(raw)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request")
            v = v[0]
        return v


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _unauthorized() -> ApiError:
    return ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        param = param or loc
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts), param


# ---------------------------------------------------------------------- the application


class App:
    """Request handling independent of HTTP: validated request in, response dict or chunks out."""

    def __init__(self, loaded: LoadedModel, cfg: ServerConfig, request_log=None) -> None:
        self.loaded, self.cfg, self.request_log = loaded, cfg, request_log  # request_log: serve/request_log.py
        self.model_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(cfg.max_concurrent)
        max_pos = loaded.model.config.max_position_embeddings
        self.max_input_tokens = min(cfg.max_input_tokens, max_pos - 1)
        self.max_positions = max_pos
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.loaded.name, "object": "model", "created": self.created,
                                            "owned_by": "mistral-tune"}]}

    def encode_chat(self, req: ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must be from the user", param="messages")
        try:
            return self.loaded.tokenizer.encode_prompt(messages)
        except DataError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None

    def encode_completion(self, req: CompletionRequest) -> list[int]:
        return self.loaded.tokenizer.encode_text(clean_text(req.prompt), bos=True, eos=False)

    def budget(self, req: _Sampling, prompt_ids: list[int], requested: int | None) -> int:
        if len(prompt_ids) > self.max_input_tokens:
            raise ApiError(400, f"the input is {len(prompt_ids)} tokens; this server accepts at most "
                                f"{self.max_input_tokens}", param="messages", code="context_length_exceeded")
        if requested is not None and requested > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {requested} is above this server's limit of "
                                f"{self.cfg.max_tokens_limit}", param="max_tokens")
        wanted = requested or self.cfg.default_max_tokens
        return max(1, min(wanted, self.max_positions - len(prompt_ids)))

    def tokens(self, prompt_ids: list[int], max_tokens: int, req: _Sampling):
        """Yield (text_delta, finish_reason or None, tokens so far); holds the model meanwhile.

        Callers must close() the generator if they stop early, which releases the model.
        """
        tok = self.loaded.tokenizer
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        stream, produced, sent, n = TextStream(tok), "", 0, 0
        with self.model_lock:
            for token in generate(self.loaded.model, prompt_ids, max_tokens, eos_id=tok.eos_id,
                                  temperature=req.temperature, top_p=req.top_p, generator=gen):
                n += 1
                delta = stream.push(token)
                if not req.stop:
                    yield delta, None, n
                    continue
                produced += delta
                hit = min((produced.find(s) for s in req.stop if s in produced), default=-1)
                if hit >= 0:  # send only what precedes the stop string
                    yield produced[sent:hit], "stop", n
                    return
                # Hold back a tail that may be the start of a stop string split across tokens.
                held = max((k for s in req.stop for k in range(1, len(s)) if produced.endswith(s[:k])), default=0)
                yield produced[sent:len(produced) - held], None, n
                sent = len(produced) - held
            tail = stream.flush()
        yield produced[sent:] + tail, "length" if n >= max_tokens else "stop", n


# ---------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "mistral-tune"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made by make_server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.app.cfg.socket_timeout_s)  # no slow-loris hold on a thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # -- plumbing

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError) -> None:
        self._send_json(err.status, err.body())

    def _authorized(self) -> bool:
        key = self.app.cfg.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required") from None
        if length < 0 or length > self.app.cfg.max_body_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise ApiError(413, f"the request body is {length} bytes; the limit is {self.app.cfg.max_body_bytes}",
                           code="request_too_large")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    # -- routes

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self._send_json(200, {"status": "ok"})
        if not self._authorized():
            return self._error(_unauthorized())
        if path == "/v1/models":
            return self._send_json(200, self.app.models())
        if path.startswith("/v1/models/"):
            if path.removeprefix("/v1/models/") == self.app.loaded.name:
                return self._send_json(200, self.app.models()["data"][0])
            return self._error(ApiError(404, "no such model", code="model_not_found"))
        if path in ("/v1/chat/completions", "/v1/completions"):
            return self._error(ApiError(405, f"{path} takes POST"))
        self._error(ApiError(404, f"no route {path}"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                self.close_connection = True
                raise ApiError(404 if path not in ("/health", "/v1/models") else 405, f"no POST route {path}")
            if not self._authorized():
                self.close_connection = True
                raise _unauthorized()
            body = self._read_json()
            if not self.app.slots.acquire(blocking=False):
                raise ApiError(429, "too many requests in flight; retry shortly", "rate_limit_error",
                               code="rate_limit_exceeded")
        except ApiError as err:
            return self._error(err)
        try:
            self._complete(path, body)
        except ApiError as err:
            self._error(err)
        finally:
            self.app.slots.release()

    def _complete(self, path: str, body: dict) -> None:
        app = self.app
        chat = path == "/v1/chat/completions"
        try:
            req = ChatRequest.model_validate(body) if chat else CompletionRequest.model_validate(body)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise ApiError(400, message, param=param) from None
        if req.model not in (None, app.loaded.name):
            raise ApiError(404, f"model {req.model!r} is not served here (this server has {app.loaded.name!r})",
                           param="model", code="model_not_found")
        prompt = app.encode_chat(req) if chat else app.encode_completion(req)
        requested = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        max_tokens = app.budget(req, prompt, requested)
        if app.request_log is not None:
            app.request_log.record(req, len(prompt))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            return self._stream(req, rid, created, chat, prompt, max_tokens)
        text, finish, count = "", "stop", 0
        for delta, reason, count in app.tokens(prompt, max_tokens, req):  # noqa: B007 (the last count is used)
            text += delta
            finish = reason or finish
        usage = {"prompt_tokens": len(prompt), "completion_tokens": count, "total_tokens": len(prompt) + count}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        self._send_json(200, {"id": rid, "object": obj, "created": created, "model": app.loaded.name,
                              "choices": [choice], "usage": usage})

    def _stream(self, req, rid: str, created: int, chat: bool, prompt: list[int], max_tokens: int) -> None:
        app = self.app
        self.close_connection = True  # the event stream ends with the connection
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": app.loaded.name, "choices": [choice]}

        def send(data: dict | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data)
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()

        tokens, count = app.tokens(prompt, max_tokens, req), 0
        try:
            if chat:
                send(chunk(None, None, first=True))
            for delta, reason, count in tokens:  # noqa: B007 (the last count is used)
                if delta or reason:
                    send(chunk(delta, reason))
            if req.stream_options and req.stream_options.include_usage:
                usage = {"prompt_tokens": len(prompt), "completion_tokens": count, "total_tokens": len(prompt) + count}
                send({"id": rid, "object": obj, "created": created, "model": app.loaded.name, "choices": [],
                      "usage": usage})
            send("[DONE]")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away: stop generating
        finally:
            tokens.close()  # releases the model lock now, not when garbage-collected


def make_server(loaded: LoadedModel, cfg: ServerConfig, request_log=None) -> ThreadingHTTPServer:
    app = App(loaded, cfg, request_log)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    server.daemon_threads = True
    return server
