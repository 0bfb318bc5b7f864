"""An OpenAI-compatible HTTP server for a fine-tuned model (Starlette on uvicorn, pydantic).

Endpoints: POST /v1/chat/completions (streaming as server-sent events), POST /v1/completions,
GET /v1/models, GET /health. Requests are decoded together by the batching engine (engine.py):
up to `max_batch` at once, then up to `queue_depth` more wait their turn, for at most
`queue_timeout_s` (then 503); beyond that a request gets 429 at once. Safe defaults, because a
model server is easy to expose by accident: it binds 127.0.0.1; an optional API key (Bearer)
guards every /v1 route; bodies, input tokens and max_tokens are limited; headers and body must
arrive within deadlines (a client trickling bytes is cut off with 408) and a client that stops
reading a stream is dropped after `socket_timeout_s`; request bodies are validated by schema
(protocol.py) and every refusal is a JSON error in OpenAI's shape with a 4xx status. Once a
stream has begun, a failure is sent as a last `data: {"error": ...}` event before `[DONE]`.
A client that leaves frees its place in the batch at the next step.

Several adapters on one base (models/tuned.py's load_with_adapters): a request's `model` names the
base or one of the adapters, and requests for any of them are decoded together; /v1/models lists them.

Prompt safety: chat messages are formatted by mistral-common, which encodes message *text* as
text, so "[INST]" or "</s>" typed by a user are ordinary characters, never control tokens
(tests check this). Control characters other than tab and newline are removed from inputs.

This is a server for trying and evaluating a fine-tune and for small deployments; for
production throughput use vLLM (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError, DataError
from ..generate.constrain import Constraint, Grammars
from ..generate.decoder import Params
from ..generate.engine import Engine
from ..models.tuned import TunedModel
from .answer import Answer, Piece, logprobs_content
from .defaults import sampling_defaults
from .protocol import ApiError, ChatRequest, CompletionRequest, clean_text, parse_body, parse_request
from .tools import ToolFormat, prompt_messages, prompt_tools

log = logging.getLogger("mistral_tune.serve")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_input_tokens: int = 8192
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_batch: int = 16  # requests decoded together (1: one at a time)
    queue_depth: int = 64  # requests waiting for a place in the batch; more get 429
    queue_timeout_s: float = 60.0  # the longest wait in the queue (then 503)
    socket_timeout_s: float = 30.0  # any one write of a response
    header_timeout_s: float = 10.0  # the request line and headers, from the start of the wait
    body_timeout_s: float = 30.0  # the whole body


# As the standard library's http.server: the longest request line, the most header lines.
MAX_REQUEST_LINE, MAX_HEADERS = 65536, 100
# Route -> the one method it takes.
_ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}


def _check_head(target_bytes: int, header_lines: int) -> None:
    if target_bytes > MAX_REQUEST_LINE:
        raise ApiError(414, f"the request line is longer than {MAX_REQUEST_LINE} bytes")
    if header_lines > MAX_HEADERS:
        raise ApiError(431, f"more than {MAX_HEADERS} header lines")


def _route_method(path: str) -> str | None:
    return _ROUTES.get(path) or ("GET" if path.startswith("/v1/models/") else None)


def _unauthorized() -> ApiError:
    return ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")


def _internal_error() -> ApiError:
    return ApiError(500, "the server failed while answering; its log has the details", code="internal_error")


def _error(err: ApiError, headers: dict | None = None) -> Response:
    # An error may leave a body unread: the connection ends with the answer.
    return JSONResponse(err.body(), err.status, headers={"Connection": "close", **(headers or {})})


class _ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


async def _disconnected(receive) -> None:
    """Returns once the client has gone (call after the body has been read)."""
    while True:
        if (await receive())["type"] == "http.disconnect":
            return


async def _unless_gone(awaitable, receive):
    """awaitable's result, or _ClientGone (awaitable cancelled) if the client leaves first."""
    task, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise _ClientGone
    return task.result()


class App:
    """The ASGI application: validated request in, JSON or an event stream out."""

    def __init__(self, loaded: TunedModel, cfg: ServerConfig, request_log=None) -> None:
        self.loaded, self.cfg, self.request_log = loaded, cfg, request_log  # request_log: serve/request_log.py
        max_pos = loaded.model.config.max_position_embeddings
        self.max_input_tokens = min(cfg.max_input_tokens, max_pos - 1)
        self.max_positions = max_pos
        self.created = int(time.time())
        # What a request's model may name: the base (0) and its adapters (1..).
        self.names = {loaded.name: 0, **{name: i + 1 for i, name in enumerate(loaded.adapters)}}
        self.defaults = sampling_defaults(loaded.adapter_dir, loaded.model_dir)
        self.tool_format = ToolFormat(loaded.tokenizer)
        self.grammars = Grammars(loaded.tokenizer, loaded.model.config.vocab_size)
        # Each of max_batch requests holds up to its input and answer limits in the cache.
        capacity = min(max_pos, self.max_input_tokens + cfg.max_tokens_limit + 1)
        self.engine = Engine(loaded.model, loaded.tokenizer.eos_id, cfg.max_batch, cfg.queue_depth,
                             cfg.queue_timeout_s, capacity)

    def close(self) -> None:
        self.engine.close()

    def models(self) -> dict:
        def entry(name: str) -> dict:
            parent = {"parent": self.loaded.name} if self.names[name] else {}
            return {"id": name, "object": "model", "created": self.created, "owned_by": "mistral-tune", **parent}

        return {"object": "list", "data": [entry(name) for name in self.names]}

    def adapter(self, model: str | None) -> int:
        """The adapter a request's model names (0: the base, as when it names none)."""
        if model is None:
            return 0
        if model not in self.names:
            served = ", ".join(repr(n) for n in self.names)
            raise ApiError(404, f"model {model!r} is not served here (this server has {served})",
                           param="model", code="model_not_found")
        return self.names[model]

    def encode_chat(self, req: ChatRequest) -> list[int]:
        messages = prompt_messages(req)
        if messages[-1]["role"] not in ("user", "tool"):
            raise ApiError(400, "the last message must be from the user (or a tool's result)", param="messages")
        self.tool_format.check(req)
        try:
            return self.loaded.tokenizer.encode_prompt(messages, prompt_tools(req))
        except DataError as exc:
            param = "tools" if req.tools and "tool" in str(exc).lower() and "message" not in str(exc) else "messages"
            raise ApiError(400, f"{param}: {exc}", param=param) from None

    def constraint(self, req: ChatRequest | CompletionRequest) -> Constraint | None:
        """A fresh constraint for one choice: the JSON its response_format asks for, or the call its
        tool_choice forces (None: free text)."""
        if not isinstance(req, ChatRequest):
            return None
        fmt = req.response_format
        try:
            if fmt is not None and fmt.type == "json_object":
                return self.grammars.json(None)
            if fmt is not None and fmt.type == "json_schema":
                return self.grammars.json(fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict))
            return self.tool_format.forced(req, self.grammars)
        except ValueError as exc:
            param = "response_format.json_schema.schema" if fmt is not None and fmt.type != "text" else "tools"
            raise ApiError(400, f"{param}: cannot be decoded to ({exc})", param=param) from None

    def params(self, req: ChatRequest | CompletionRequest, max_tokens: int, index: int, adapter: int = 0) -> Params:
        d = self.defaults
        top_k = d.top_k if req.top_k is None else max(req.top_k, 0)
        if isinstance(req, ChatRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        seed = None if req.seed is None else (req.seed + index + 2**63) % 2**64 - 2**63  # n choices: seed + i
        return Params(max_tokens, d.temperature if req.temperature is None else req.temperature,
                      d.top_p if req.top_p is None else req.top_p, top_k=top_k, seed=seed, logprobs=logprobs,
                      constraint=self.constraint(req), adapter=adapter)

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

    # ------------------------------------------------------------------ HTTP

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._respond(request)
        except ApiError as err:
            response = _error(err)
        except (_ClientGone, ClientDisconnect):
            return  # nobody to answer
        except Exception:  # a bug: still an answer
            log.exception("failed while answering %s %s", request.method, request.url.path)
            response = _error(_internal_error())
        if isinstance(response, StreamingResponse):
            await self._send_stream(response, scope, receive, send)
        else:
            await response(scope, receive, send)

    async def _send_stream(self, response: StreamingResponse, scope, receive, send) -> None:
        """Every write of a stream must end within socket_timeout_s: a client that stops reading
        is dropped, and its request leaves the batch."""
        timeout = self.cfg.socket_timeout_s

        async def timed_send(message) -> None:
            await asyncio.wait_for(send(message), timeout)

        try:
            await response(scope, receive, timed_send)
        except TimeoutError:
            log.warning("dropped a client that read nothing for %g s", timeout)
        finally:
            for answer in response.answers:
                answer.request.cancel()

    async def _respond(self, request: Request) -> Response:
        scope, path, method = request.scope, request.url.path, request.method
        _check_head(len(scope["raw_path"]) + len(scope["query_string"]), len(scope["headers"]))
        if method not in _METHODS:
            raise ApiError(501, f"unsupported method ({method!r})")
        allowed = _route_method(path)
        if allowed is None:
            raise ApiError(404, f"no route {path}")
        if method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": f"{allowed}, HEAD, OPTIONS" if allowed == "GET"
                                                      else f"{allowed}, OPTIONS"})
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            return _error(ApiError(405, f"{path} takes {allowed}, not {method}", code="method_not_allowed"),
                          {"Allow": allowed})
        if path == "/health":
            return JSONResponse({"status": "ok"})
        if not self._authorized(request):
            raise _unauthorized()
        if path == "/v1/models":
            return JSONResponse(self.models())
        if path.startswith("/v1/models/"):
            wanted = path.removeprefix("/v1/models/")
            self.adapter(wanted)  # 404 unless served
            return JSONResponse(next(m for m in self.models()["data"] if m["id"] == wanted))
        req = parse_request(await self._read_json(request), chat=path == "/v1/chat/completions")
        return await self._complete(req, request)

    def _authorized(self, request: Request) -> bool:
        key = self.cfg.api_key
        if not key:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    async def _read_json(self, request: Request) -> dict:
        if request.headers.get("transfer-encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        length = request.headers.get("content-length", "").strip()
        if not length.isdigit() or not length.isascii():
            if not length:
                raise ApiError(411, "a Content-Length header is required")
            raise ApiError(400, f"Content-Length {length[:40]!r} is not a number of bytes")
        limit = self.cfg.max_body_bytes
        if len(length) > 15 or int(length) > limit:
            raise ApiError(413, f"the request body is {length[:20]} bytes; the limit is {limit}",
                           code="request_too_large")
        timeout = self.cfg.body_timeout_s
        try:
            raw = await asyncio.wait_for(request.body(), timeout)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s",
                           code="request_timeout") from None
        return parse_body(raw)

    async def _complete(self, req: ChatRequest | CompletionRequest, request: Request) -> Response:
        chat = isinstance(req, ChatRequest)
        adapter = self.adapter(req.model)
        name = req.model or self.loaded.name
        prompt = self.encode_chat(req) if chat else self.encode_completion(req)
        max_tokens = self.budget(prompt, req.requested_tokens())
        params = [self.params(req, max_tokens, i, adapter) for i in range(req.n)]
        if self.request_log is not None:
            self.request_log.record(req, len(prompt))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        tools = (self.tool_format, {t.function.name for t in req.tools}) if chat and prompt_tools(req) else None
        answers: list[Answer] = []
        try:
            for p in params:  # n choices, decoded side by side
                answers.append(Answer(self.engine, self.loaded.tokenizer, prompt, p, req.stop, tools))
            if req.stream:
                return await self._stream(req, answers, (rid, name), chat, prompt, request)
            pieces = await _unless_gone(asyncio.gather(*(self._collect(a) for a in answers)), request.receive)
        except BaseException:
            for a in answers:
                a.request.cancel()
            raise
        finally:
            if not req.stream:
                for a in answers:
                    a.request.cancel()  # a no-op once it has ended
        count = sum(a.count for a in answers)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": count, "total_tokens": len(prompt) + count}
        choices = []
        for i, p in enumerate(pieces):
            choice = {"index": i, "finish_reason": p.finish, "logprobs": self._logprobs(req, p.tokens)}
            if not chat:
                choice["text"] = p.text
            else:
                choice["message"] = {"role": "assistant", "content": p.text if p.text or not p.calls else None,
                                     **({"tool_calls": p.calls} if p.calls else {})}
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": name, "choices": choices,
                             "usage": usage})

    def _logprobs(self, req: ChatRequest | CompletionRequest, tokens) -> dict | None:
        """OpenAI's logprobs of a choice (or of a streamed chunk), None unless asked for."""
        if isinstance(req, ChatRequest):
            if not req.logprobs:
                return None
            return {"content": logprobs_content(self.loaded.tokenizer, tokens), "refusal": None}
        if req.logprobs is None:
            return None
        content = logprobs_content(self.loaded.tokenizer, tokens)
        offsets, at = [], 0
        for c in content:
            offsets.append(at)
            at += len(c["token"])
        return {"tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
                "top_logprobs": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
                "text_offset": offsets}

    @staticmethod
    async def _collect(answer: Answer) -> Piece:
        whole = Piece("", None)
        while True:
            piece = await answer.next()
            whole.text += piece.text
            whole.tokens += piece.tokens
            if piece.finish:
                whole.finish, whole.calls = piece.finish, piece.calls
                return whole

    async def _stream(self, req, answers: list[Answer], ids: tuple[str, str], chat: bool, prompt: list[int],
                      request: Request) -> StreamingResponse:
        """Server-sent events. The 200 goes once a choice has its first piece of text (a wait in the
        queue that times out is still an HTTP error). After it, a failure is reported as a last event
        `data: {"error": {...}}` (the openai client raises it), and every stream ends with
        `data: [DONE]` unless the client is gone. Tool calls come whole, one delta each, at the end."""
        (rid, name), merged = ids, asyncio.Queue()

        async def pump(i: int, answer: Answer) -> None:
            try:
                while not (piece := await answer.next()).finish:
                    merged.put_nowait((i, piece))
                merged.put_nowait((i, piece))
            except Exception as exc:
                merged.put_nowait((i, exc))

        pumps = [asyncio.ensure_future(pump(i, a)) for i, a in enumerate(answers)]

        def stop() -> None:
            for a, task in zip(answers, pumps, strict=True):
                a.request.cancel()
                task.cancel()

        try:
            first = await _unless_gone(merged.get(), request.receive)
            if isinstance(first[1], ApiError):
                raise first[1]
        except BaseException:
            stop()
            raise
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def event(data: dict | str) -> str:
            return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

        def chunk(i: int, piece: Piece | None) -> dict:
            logprobs = self._logprobs(req, piece.tokens) if piece is not None else None
            if not chat:
                choice = {"index": i, "text": piece.text, "finish_reason": piece.finish, "logprobs": logprobs}
            elif piece is None:
                choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None}
            else:
                delta = {"content": piece.text} if piece.text else {}
                if piece.calls:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(piece.calls)]
                choice = {"index": i, "delta": delta, "finish_reason": piece.finish, "logprobs": logprobs}
            return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            item, left = first, len(answers)
            try:
                if chat:
                    for i in range(len(answers)):
                        yield event(chunk(i, None))
                while True:
                    i, piece = item
                    if isinstance(piece, Exception):
                        raise piece
                    yield event(chunk(i, piece))
                    left -= piece.finish is not None
                    if not left:
                        break
                    item = await merged.get()
                if req.stream_options and req.stream_options.include_usage:
                    n = sum(a.count for a in answers)
                    yield event({"id": rid, "object": obj, "created": created, "model": name,
                                 "choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                                                          "total_tokens": len(prompt) + n}})
            except Exception:
                log.exception("failed while streaming")
                yield event(_internal_error().body())
            finally:
                stop()
            yield event("[DONE]")

        response = StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "Connection": "close"})
        response.answers = answers
        return response


# ---------------------------------------------------------------------- the connection


def _raw_response(err: ApiError) -> bytes:
    """A whole HTTP/1.1 error response, for refusals made before there is a request to answer."""
    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a deadline for each request's line and headers (uvicorn
    has none once bytes arrive): a client that sends part of a request too slowly gets a 408, an
    idle connection is closed. Malformed requests are refused in our JSON error shape."""

    header_timeout = 10.0  # set per server (Server)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_request()

    def _await_request(self) -> None:
        self._head, self._waiting_cycle = bytearray(), self.cycle
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:  # bounded: h11 refuses a head over h11_max_incomplete_event_size
            self._head += data
        super().data_received(data)
        if self.cycle is not self._waiting_cycle:  # a request's headers are in
            self._stop_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._deadline is None:
            self._await_request()

    def connection_lost(self, exc) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._head:  # part of a request came, too slowly
            self.transport.write(_raw_response(ApiError(
                408, f"the request line and headers did not arrive within {self.header_timeout:g} s",
                code="request_timeout")))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: too long a line or too many headers (as the app refuses them,
        which does so for requests h11 accepts), else malformed."""
        head = bytes(self._head).split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        try:
            _check_head(len(head[0].split(b" ")[1]) if head[0].count(b" ") == 2 else len(head[0]), len(head) - 1)
            err = ApiError(400, "malformed HTTP request (its line or headers)")
        except ApiError as refusal:
            err = refusal
        self.transport.write(_raw_response(err))
        self.transport.close()


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket. `serve` opens it before the model loads, so that a port in use
    fails in a moment rather than after the weights are read (and no other process takes the port
    meanwhile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # without create_server's "(while attempting...)"
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None


class Server:
    """The app on uvicorn. It listens from construction (on `sock`, or on a socket of its own), so the
    port is known (port 0: any free one) and a port in use fails at once with ConfigError."""

    def __init__(self, app, cfg: ServerConfig, sock: socket.socket | None = None) -> None:
        self.app = app  # an ASGI app: ours, or llama-cpp-python's (llama_server.py)
        self.socket = sock if sock is not None else listen(cfg.host, cfg.port)
        self.server_address = self.socket.getsockname()[:2]
        protocol = type("Protocol", (_Protocol,), {"header_timeout": cfg.header_timeout_s})
        logging_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
        logging_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for what serve prints
        config = uvicorn.Config(app, http=protocol, lifespan="off", server_header=False, log_config=logging_config,
                                timeout_keep_alive=max(1, int(cfg.header_timeout_s)), timeout_graceful_shutdown=5,
                                h11_max_incomplete_event_size=2 * MAX_REQUEST_LINE + 65536)
        self._uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Make serve_forever (running in another thread) return, and wait until it has."""
        self._uvicorn.should_exit = True
        self._stopped.wait()

    def server_close(self) -> None:
        if isinstance(self.app, App):
            self.app.close()
        self.socket.close()


def make_server(loaded: TunedModel, cfg: ServerConfig, request_log=None, sock: socket.socket | None = None) -> Server:
    app = App(loaded, cfg, request_log)
    try:
        return Server(app, cfg, sock)
    except ConfigError:
        app.close()
        raise
