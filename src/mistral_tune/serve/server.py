"""An OpenAI-compatible HTTP server for a fine-tuned model (stdlib http.server + pydantic).

Endpoints: POST /v1/chat/completions (streaming as server-sent events), POST /v1/completions,
GET /v1/models, GET /health. Safe defaults, because a model server is easy to expose by
accident: it binds 127.0.0.1; an optional API key (Bearer) guards every /v1 route; bodies,
input tokens, max_tokens and requests in flight are limited (over the in-flight limit a
request gets 429 at once instead of queueing without bound); headers and body must arrive
within deadlines (a client trickling bytes is cut off with 408); request bodies are validated by
schema (protocol.py) and every refusal is a JSON error in OpenAI's shape with a 4xx status. Once a
stream has begun, a failure is sent as a last `data: {"error": ...}` event before `[DONE]`.

Prompt safety: chat messages are formatted by mistral-common, which encodes message *text* as
text, so "[INST]" or "</s>" typed by a user are ordinary characters, never control tokens
(tests check this). Control characters other than tab and newline are removed from inputs.

One model serves one request at a time (a lock around generation); this is a server for trying
and evaluating a fine-tune and for small deployments. For throughput use vLLM (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from ..errors import DataError
from ..models.tuned import TunedModel
from .generate import StopMatcher, TextStream, generate
from .protocol import ApiError, ChatRequest, CompletionRequest, Sampling, clean_text, parse_body, parse_request


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
    socket_timeout_s: float = 30.0  # any one write (reads have the deadlines below)
    header_timeout_s: float = 10.0  # the request line and headers, from the start of the wait
    body_timeout_s: float = 30.0  # the whole body


def _unauthorized() -> ApiError:
    return ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")


# ---------------------------------------------------------------------- the application


class App:
    """Request handling independent of HTTP: validated request in, response dict or chunks out."""

    def __init__(self, loaded: TunedModel, cfg: ServerConfig, request_log=None) -> None:
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

    def budget(self, prompt_ids: list[int], requested: int | None) -> int:
        if len(prompt_ids) > self.max_input_tokens:
            raise ApiError(400, f"the input is {len(prompt_ids)} tokens; this server accepts at most "
                                f"{self.max_input_tokens}", param="messages", code="context_length_exceeded")
        if requested is not None and requested > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {requested} is above this server's limit of "
                                f"{self.cfg.max_tokens_limit}", param="max_tokens")
        wanted = requested or self.cfg.default_max_tokens
        return max(1, min(wanted, self.max_positions - len(prompt_ids)))

    def tokens(self, prompt_ids: list[int], max_tokens: int, req: Sampling):
        """Yield (text_delta, finish_reason or None, tokens so far); holds the model meanwhile.

        Callers must close() the generator if they stop early, which releases the model.
        """
        tok = self.loaded.tokenizer
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        text, stops, n = TextStream(tok), StopMatcher(req.stop), 0
        with self.model_lock:
            for token in generate(self.loaded.model, prompt_ids, max_tokens, eos_id=tok.eos_id,
                                  temperature=req.temperature, top_p=req.top_p, generator=gen):
                n += 1
                delta = stops.push(text.push(token))
                if stops.stopped:  # only what precedes the stop string was sent
                    yield delta, "stop", n
                    return
                yield delta, None, n
        tail = stops.push(text.flush())
        yield tail + stops.flush(), "stop" if stops.stopped or n < max_tokens else "length", n


# ---------------------------------------------------------------------- HTTP

# Route -> the one method it takes.
_ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
_HEADERS = "request line and headers"  # what the header deadline covers


def _route_method(path: str) -> str | None:
    return _ROUTES.get(path) or ("GET" if path.startswith("/v1/models/") else None)


class _DeadlineInput(io.RawIOBase):
    """A connection's input whose reads all end by a deadline, so that a client trickling bytes
    cannot hold a thread longer than the deadline. Writes keep the socket's own timeout."""

    def __init__(self, sock: socket.socket, write_timeout: float) -> None:
        self.sock, self.write_timeout = sock, write_timeout
        self.deadline, self.what, self.received, self.expired = 0.0, "", 0, ""

    def start(self, seconds: float, what: str) -> None:
        self.deadline, self.what, self.received, self.expired = time.monotonic() + seconds, what, 0, ""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(max(self.deadline - time.monotonic(), 1e-3))
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            self.expired = self.what
            raise
        finally:
            self.sock.settimeout(self.write_timeout)
        self.received += n
        return n


class Handler(BaseHTTPRequestHandler):
    server_version = "mistral-tune"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made by make_server

    def setup(self) -> None:
        super().setup()
        cfg = self.app.cfg
        self.connection.settimeout(cfg.socket_timeout_s)
        self.rfile.close()
        self.input = _DeadlineInput(self.connection, cfg.socket_timeout_s)
        self.rfile = io.BufferedReader(self.input)

    def handle_one_request(self) -> None:
        # Defaults until the request line is parsed (a 408 may come before it is).
        self.command, self.requestline, self.request_version = None, "", "HTTP/1.1"
        timeout = self.app.cfg.header_timeout_s
        self.input.start(timeout, _HEADERS)
        super().handle_one_request()  # a read past the deadline ends it with close_connection set
        if self.input.expired == _HEADERS and self.input.received:  # part of a request came, too slowly
            self._error(ApiError(408, f"the {self.input.what} did not arrive within {timeout:g} s",
                                 code="request_timeout"))

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # -- plumbing

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, err: ApiError, headers: dict | None = None) -> None:
        try:
            self._send_json(err.status, err.body(), headers)
        except OSError:  # the client is gone
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line or headers, unknown method) in our JSON shape."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self._error(ApiError(code, message or HTTPStatus(code).phrase))

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
        length = self.headers.get("Content-Length", "").strip()
        if not length.isdigit() or not length.isascii():
            self.close_connection = True  # the unread body must not be taken for the next request
            if not length:
                raise ApiError(411, "a Content-Length header is required")
            raise ApiError(400, f"Content-Length {length[:40]!r} is not a number of bytes")
        limit = self.app.cfg.max_body_bytes
        if len(length) > 15 or int(length) > limit:
            self.close_connection = True
            raise ApiError(413, f"the request body is {length[:20]} bytes; the limit is {limit}",
                           code="request_too_large")
        timeout = self.app.cfg.body_timeout_s
        self.input.start(timeout, "request body")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s",
                           code="request_timeout") from None
        return parse_body(raw)

    # -- routes

    def _wrong_route(self, path: str) -> None:
        """404 for an unknown path; 405 (with Allow) for a known one asked with the wrong method."""
        method = _route_method(path)
        if method is None:
            return self._error(ApiError(404, f"no route {path}"))
        self._error(ApiError(405, f"{path} takes {method}, not {self.command}", code="method_not_allowed"),
                    {"Allow": method})

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
        self._wrong_route(path)

    def _not_allowed(self) -> None:
        self.close_connection = True  # a body, if any, is left unread
        self._wrong_route(self.path.split("?", 1)[0])

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if _route_method(path) != "POST":
                self.close_connection = True
                return self._wrong_route(path)
            if not self._authorized():
                self.close_connection = True
                raise _unauthorized()
            req = parse_request(self._read_json(), chat=path == "/v1/chat/completions")
            if not self.app.slots.acquire(blocking=False):
                raise ApiError(429, "too many requests in flight; retry shortly", "rate_limit_error",
                               code="rate_limit_exceeded")
        except ApiError as err:
            return self._error(err)
        self._slot_held = True
        try:
            self._complete(req)
        except ApiError as err:
            self._release_slot()
            self._error(err)
        except Exception:  # a bug or the engine failing (out of memory): still an answer
            self.log_error("failed: %s", traceback.format_exc())
            self.close_connection = True
            self._release_slot()
            self._error(_internal_error())
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        """Free the request's slot before its last bytes are sent: a client that sends its next
        request as soon as it has the answer must not find the slot still taken."""
        if self._slot_held:
            self._slot_held = False
            self.app.slots.release()

    def _complete(self, req: ChatRequest | CompletionRequest) -> None:
        app = self.app
        chat = isinstance(req, ChatRequest)
        if req.model not in (None, app.loaded.name):
            raise ApiError(404, f"model {req.model!r} is not served here (this server has {app.loaded.name!r})",
                           param="model", code="model_not_found")
        prompt = app.encode_chat(req) if chat else app.encode_completion(req)
        max_tokens = app.budget(prompt, req.requested_tokens())
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
        self._release_slot()
        self._send_json(200, {"id": rid, "object": obj, "created": created, "model": app.loaded.name,
                              "choices": [choice], "usage": usage})

    def _stream(self, req, rid: str, created: int, chat: bool, prompt: list[int], max_tokens: int) -> None:
        """Server-sent events. Once the 200 is sent, a failure is reported as a last event
        `data: {"error": {...}}` (the openai client raises it), and every stream ends with
        `data: [DONE]` unless the client is gone."""
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

        tokens, count, failed = app.tokens(prompt, max_tokens, req), 0, False
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
        except OSError:
            return  # the client went away (or stopped reading): stop generating
        except Exception:
            self.log_error("failed while streaming: %s", traceback.format_exc())
            failed = True
        finally:
            tokens.close()  # releases the model lock now, not when garbage-collected
            self._release_slot()
        with contextlib.suppress(OSError):  # the client went away: nothing more to tell it
            if failed:
                send(_internal_error().body())
            send("[DONE]")


def _internal_error() -> ApiError:
    return ApiError(500, "the server failed while answering; its log has the details", code="internal_error")


def make_server(loaded: TunedModel, cfg: ServerConfig, request_log=None) -> ThreadingHTTPServer:
    app = App(loaded, cfg, request_log)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    server.daemon_threads = True
    return server
