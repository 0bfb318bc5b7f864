"""Constrained decoding: which tokens a row may pick next, so that its answer follows a grammar.

A `Constraint` belongs to one row. Before each pick the engine asks it for a bitmask of the
allowed next tokens (xgrammar's layout: int32 words, ceil(vocab / 32) of them, bit j of word w set
when token 32 * w + j is allowed) and sets every other token's logit to -inf; after the pick it
tells it the token. Once `finished` (the grammar is complete and nothing but end of sequence may
follow) the row ends.

`Grammars` compiles JSON schemas for one tokenizer with xgrammar (compiled grammars are cached)
and hands out `GrammarConstraint`s; `Prefixed` forces one of several token sequences (control
tokens included, which a text grammar cannot name) and then that sequence's grammar, as a tool
call needs: [TOOL_CALLS] and the function's name, then its arguments as JSON.

The vocabulary xgrammar sees is our tokenizer's: SentencePiece pieces as they are ("▁" for a
space, <0x..> for a byte: xgrammar's byte-fallback type decodes them), tekken's byte strings as
they are; control tokens are empty (never allowed inside a grammar), and so are tokens holding a
raw control character (never valid in compact JSON); the end-of-sequence token is the one stop
token, and ids past the tokenizer's vocabulary but inside the model's are never allowed.
JSON is compact (", " and ": " between items, as json.dumps writes and mistral-common renders tool
calls) with an optional leading space, which SentencePiece models put before an answer's first
word.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import torch
import xgrammar as xgr

from ..chat import ChatTokenizer


@runtime_checkable
class Constraint(Protocol):
    def fill_mask(self, out: torch.Tensor) -> None:
        """Write the allowed next tokens into out, an int32 row of ceil(vocab / 32) words."""

    def accept(self, token: int) -> None:
        """The row's next token (one fill_mask allowed); raises ValueError for any other."""

    @property
    def finished(self) -> bool:
        """The grammar is complete: only end of sequence may follow."""


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def _allow(out: torch.Tensor, token: int) -> None:
    word, bit = divmod(token, 32)
    out[word] |= -(2**31) if bit == 31 else 1 << bit


# Compact JSON never holds a raw control character (strings escape them): tokens with one are left
# out, which also covers xgrammar 0.2.9's length-limited strings that let them in.
_CONTROL = re.compile(rb"[\x00-\x1f]")
_CONTROL_BYTE = re.compile(r"<0x[01][0-9A-F]>")


def grammar_vocabulary(tokenizer: ChatTokenizer) -> tuple[list[str] | list[bytes], xgr.VocabType]:
    """Each id's text as xgrammar reads it (see the module doc)."""
    raw = tokenizer._raw
    if tokenizer.is_tekken:
        return [b"" if _CONTROL.search(b := raw.id_to_byte_piece(i)) else b for i in range(raw.n_words)], \
            xgr.VocabType.RAW
    unk = raw.unk_id
    pieces = []
    for i in range(raw.n_words):
        piece = raw.id_to_piece(i)
        control = _CONTROL.search(piece.encode()) or _CONTROL_BYTE.fullmatch(piece)
        pieces.append("" if raw.is_special(i) or i == unk or control else piece)
    return pieces, xgr.VocabType.BYTE_FALLBACK


class GrammarConstraint:
    """A row following one compiled grammar (xgrammar's matcher)."""

    def __init__(self, compiled: xgr.CompiledGrammar, stop_ids: tuple[int, ...], vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.stop_ids, self.vocab_size = stop_ids, vocab_size
        self._mask: torch.Tensor | None = None  # the next mask, when `finished` had to compute it

    def fill_mask(self, out: torch.Tensor) -> None:
        if self._mask is not None:
            out.copy_(self._mask)
        else:
            self.matcher.fill_next_token_bitmask(out[None])

    def accept(self, token: int) -> None:
        self._mask = None
        if not self.matcher.accept_token(token):
            raise ValueError(f"token {token} does not follow the grammar")

    @property
    def finished(self) -> bool:
        if not self.matcher.is_completed():
            return False
        if self._mask is None:  # complete, but may go on (a number's next digit)
            self._mask = torch.zeros(mask_words(self.vocab_size), dtype=torch.int32)
            self.matcher.fill_next_token_bitmask(self._mask[None])
        only_stop = torch.zeros_like(self._mask)
        for i in self.stop_ids:
            _allow(only_stop, i)
        return bool(((self._mask & ~only_stop) == 0).all())


class Prefixed:
    """One of several token sequences (a trie; none a prefix of another), then the grammar the
    sequence leads to."""

    def __init__(self, branches: dict[tuple[int, ...], GrammarConstraint]) -> None:
        self.branches, self.done = branches, ()
        self.inner: GrammarConstraint | None = None

    def fill_mask(self, out: torch.Tensor) -> None:
        if self.inner is not None:
            return self.inner.fill_mask(out)
        out.zero_()
        n = len(self.done)
        for seq in self.branches:
            if seq[:n] == self.done:
                _allow(out, seq[n])

    def accept(self, token: int) -> None:
        if self.inner is not None:
            return self.inner.accept(token)
        done = (*self.done, token)
        if not any(seq[:len(done)] == done for seq in self.branches):
            raise ValueError(f"token {token} does not follow the forced sequence")
        self.done = done
        self.inner = self.branches.get(done)

    @property
    def finished(self) -> bool:
        return self.inner is not None and self.inner.finished


class Grammars:
    """JSON-schema grammars compiled for one tokenizer and a model's vocabulary size (which may be
    larger than the tokenizer's), the most recent `cache_size` kept."""

    def __init__(self, tokenizer: ChatTokenizer, vocab_size: int, cache_size: int = 64) -> None:
        vocab, kind = grammar_vocabulary(tokenizer)
        self.vocab_size = max(vocab_size, len(vocab))
        self.stop_ids = (tokenizer.eos_id,)
        info = xgr.TokenizerInfo(vocab, kind, vocab_size=self.vocab_size, stop_token_ids=list(self.stop_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._lead = xgr.Grammar.from_ebnf('root ::= "" | " "')
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the server compiles on its event loop, tests from threads

    def compile(self, schema: dict[str, Any] | None, strict: bool = True) -> xgr.CompiledGrammar:
        """The grammar of JSON text matching schema (None: any JSON object). strict: no properties or
        items beyond those the schema names. Raises ValueError for a schema xgrammar cannot express."""
        key = json.dumps([schema, strict], sort_keys=True)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            body = xgr.Grammar.from_json_schema(json.dumps(schema if schema is not None else {"type": "object"}),
                                                any_whitespace=False, strict_mode=strict and schema is not None)
            compiled = self.compiler.compile_grammar(xgr.Grammar.concat(self._lead, body))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(" ".join(str(exc).split())[:300]) from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, compiled: xgr.CompiledGrammar) -> GrammarConstraint:
        return GrammarConstraint(compiled, self.stop_ids, self.vocab_size)

    def json(self, schema: dict[str, Any] | None, strict: bool = True) -> GrammarConstraint:
        """A fresh row constraint for JSON matching schema (see compile)."""
        return self.constraint(self.compile(schema, strict))
