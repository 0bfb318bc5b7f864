"""One choice of an answer in the engine, seen from the server's event loop: pieces of text (cut at
stop strings, whole characters only), the tokens they came from (for logprobs), and, once the
model has written [TOOL_CALLS], the calls parsed at the end.

A call that does not parse (or names no tool of the request) is returned as text, the control
tokens written out, with finish_reason "malformed_tool_call" ("length" when max_tokens cut it).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from ..chat import ChatTokenizer
from ..generate.decoder import End, Params, Token
from ..generate.engine import Engine, QueueFull, QueueTimeout
from ..generate.text import AnswerText
from .protocol import ApiError
from .tools import MalformedToolCall, ToolFormat

MALFORMED = "malformed_tool_call"


@dataclass
class Piece:
    text: str
    finish: str | None  # with the last piece: stop, length, tool_calls or malformed_tool_call
    tokens: list[Token] = field(default_factory=list)
    calls: list[dict] | None = None


class Answer:
    """tools: the request's tool names and the tokenizer's format, when the model may call one."""

    def __init__(self, engine: Engine, tokenizer: ChatTokenizer, prompt: list[int], params: Params,
                 stops: list[str], tools: tuple[ToolFormat, set[str]] | None = None) -> None:
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.tokenizer, self.text, self.max_tokens = tokenizer, AnswerText(tokenizer, stops), params.max_tokens
        self.tools, self.call_ids, self.count = tools, None, 0  # call_ids: from [TOOL_CALLS] on

        def sink(item) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting
                loop.call_soon_threadsafe(self.queue.put_nowait, item)

        try:
            self.request = engine.submit(prompt, params, sink)
        except QueueFull:
            raise ApiError(429, "the server is at capacity (batch and queue full); retry shortly", "rate_limit_error",
                           code="rate_limit_exceeded") from None

    async def next(self) -> Piece:
        """The next piece of text (possibly empty with tokens held back) and, last, the finish reason."""
        tokens: list[Token] = []
        while True:
            item = await self.queue.get()
            if isinstance(item, End):
                if isinstance(item.error, QueueTimeout):
                    raise ApiError(503, f"the server is busy: this request {item.error}; retry later",
                                   code="queue_timeout")
                if item.error is not None:
                    raise item.error
                return self._last(tokens)
            tokens.append(item)
            self.count += 1
            if self.call_ids is None and self.tools is not None and item.id == self.tools[0].calls_id:
                self.call_ids = []
            if self.call_ids is not None:
                self.call_ids.append(item.id)
                continue
            delta = self.text.push(item.id)
            if self.text.stopped:  # only what precedes the stop string is sent
                self.request.cancel()
                return Piece(delta, "stop", tokens)
            if delta:
                return Piece(delta, None, tokens)

    def _last(self, tokens: list[Token]) -> Piece:
        tail = self.text.end()
        cut = self.count >= self.max_tokens and not self.text.stopped
        if self.call_ids is None:
            return Piece(tail, "length" if cut else "stop", tokens)
        fmt, names = self.tools
        try:
            return Piece(tail, "tool_calls", tokens, fmt.parse(self.call_ids, names))
        except MalformedToolCall:
            return Piece(tail + _with_controls(self.tokenizer, self.call_ids), "length" if cut else MALFORMED, tokens)


def _with_controls(tokenizer: ChatTokenizer, ids: list[int]) -> str:
    """ids as text, control tokens written as their names ([TOOL_CALLS], [ARGS])."""
    raw, out, run = tokenizer._raw, [], []
    for t in [*ids, None]:
        if t is not None and not raw.is_special(t):
            run.append(t)
            continue
        out.append(tokenizer.decode(run))
        if t is not None:
            out.append(raw.id_to_piece(t))
        run = []
    return "".join(out)


def token_bytes(tokenizer: ChatTokenizer, token: int) -> bytes:
    """The bytes a token stands for (a SentencePiece "▁" is a space; control tokens their name)."""
    raw = tokenizer._raw
    if tokenizer.is_tekken:
        return raw.id_to_byte_piece(token) if token >= raw.num_special_tokens else raw.id_to_piece(token).encode()
    piece = raw.id_to_piece(token)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def logprobs_content(tokenizer: ChatTokenizer, tokens: list[Token]) -> list[dict]:
    """OpenAI's logprobs.content entries for tokens."""

    def entry(token: int, logprob: float) -> dict:
        b = token_bytes(tokenizer, token)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0), "bytes": list(b)}

    return [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]
