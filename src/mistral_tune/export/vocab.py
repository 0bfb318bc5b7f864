"""A mistral-common tokenizer's vocabulary in the forms other runtimes read.

Two consumers need the same facts: HF `tokenizer.json` (transformers, vLLM, TGI) and GGUF's
`tokenizer.ggml.*` keys (llama.cpp). Both describe a BPE model as a token list plus a merge list,
so this module derives them once from the loaded mistral-common tokenizer, never from a second
copy of the file format:

- SentencePiece (v1/v2/v3/v7): pieces, scores and piece types from the SentencePiece model.
  Its BPE merges, over the whole text at once (no splitting at spaces), the adjacent pair whose
  result has the highest score, the leftmost on a tie; the merge list reproduces that order.
- Tekken: tiktoken byte-level BPE ranks offset by the number of special tokens (1000); tokens
  are written with GPT-2's byte-to-unicode alphabet, as HF and llama.cpp expect.

The chat template comes from mistral-common's own generator, adapted to runtimes that encode each
text between two control tokens on its own, as mistral-common does (see `chat_template`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache

from ..chat import ChatTokenizer
from ..errors import ModelError

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    kind: str  # "spm" or "tekken"
    tokens: list[str]  # index = token id
    scores: list[float]
    types: list[int]
    merges: list[tuple[str, str]] = field(default_factory=list)
    pattern: str | None = None  # tekken's pre-tokenizer regex
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    pad_id: int | None = None

    @property
    def special_tokens(self) -> list[tuple[int, str]]:
        return [(i, t) for i, t in enumerate(self.tokens) if self.types[i] in (CONTROL, UNKNOWN)]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by HF ByteLevel and llama.cpp)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _merges(priority: dict, key=lambda t: t) -> list[tuple]:
    """BPE merges implied by a vocabulary in merge order (`priority`: token -> number, lower merges
    first): a token is the merge of any split whose halves are both tokens.

    Merges are ordered by the priority of their result. Where several merges share a priority
    (the splits of one token; SentencePiece's whitespace pieces, which all have the same score),
    SentencePiece and tiktoken merge the leftmost pair; a BPE with merge ranks reproduces that by
    listing the split with the longer left part first (a run grows from its left end), then the
    shorter result."""
    out = []
    for token, p in priority.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in priority and right in priority:
                out.append((p, -i, len(token), key(left), key(right)))
    out.sort(key=lambda m: m[:3])
    return [(a, b) for *_, a, b in out]


def extract_vocab(tok: ChatTokenizer) -> Vocab:
    raw = tok._raw
    vocab = _tekken_vocab(tok, raw) if tok.is_tekken else _spm_vocab(tok, raw)
    for name, i in tok.added.items():  # reserved slots under the names a run gave them (chat.py)
        vocab.tokens[i] = name
    return vocab


def _spm_vocab(tok: ChatTokenizer, raw) -> Vocab:
    sp = raw._model  # sentencepiece.SentencePieceProcessor
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_byte(i):
            types.append(BYTE)
        elif sp.is_unused(i):
            types.append(UNUSED)
        else:
            types.append(NORMAL)
    # Only ordinary pieces take part in merging; control, user-defined and byte pieces are
    # matched whole. A higher score merges first.
    priority = {t: -scores[i] for i, t in enumerate(tokens) if types[i] == NORMAL}
    return Vocab("spm", tokens, scores, types, _merges(priority), None, tok.bos_id, tok.eos_id, sp.unk_id())


def _tekken_vocab(tok: ChatTokenizer, raw) -> Vocab:
    n_special = raw.num_special_tokens
    specials = sorted(raw._all_special_tokens, key=lambda t: t["rank"])
    byte_ranks: dict[bytes, int] = raw._tekken_token2id_nospecial  # bytes -> rank (without offset)
    enc = bytes_to_unicode()
    text = {b: "".join(enc[x] for x in b) for b in byte_ranks}
    tokens = [""] * (n_special + len(byte_ranks))
    types = [CONTROL] * n_special + [NORMAL] * len(byte_ranks)
    for t in specials:
        tokens[t["rank"]] = str(getattr(t["token_str"], "value", t["token_str"]))
    for b, r in byte_ranks.items():
        tokens[n_special + r] = text[b]
    unk = raw.unk_id
    types[unk] = UNKNOWN
    pad = next((t["rank"] for t in specials if str(t["token_str"]) == "<pad>"), None)
    return Vocab(
        "tekken",
        tokens,
        [0.0] * len(tokens),
        types,
        _merges(byte_ranks, key=text.__getitem__),
        raw._model._pat_str,
        tok.bos_id,
        tok.eos_id,
        unk,
        pad,
    )


# Where mistral-common's templates (v2 and later, text only) write an assistant message's text.
_ASSISTANT_TEXT = "render_content(content=message['content'], context_name='assistant message contents'"
# A space written on its own ({{- ' ' }}): the "▁" of the text that follows a control token.
_LONE_SPACE = re.compile(r"\{\{-?\s*(['\"]) \1\s*-?\}\}")


def chat_template(tok: ChatTokenizer) -> str:
    """mistral-common's Jinja chat template for this tokenizer (bos/eos as variables), adapted to
    a tokenizer that encodes each text between two control tokens on its own, as mistral-common's
    per-message encode calls do (our tokenizer.json; llama.cpp):

    - SentencePiece: mistral-common writes its template for a tokenizer that puts "▁" only at the
      start of the whole text, so it writes a space after each control token ("[INST] Hi") to
      stand for the "▁" SentencePiece puts in front of the next text. Here every such text gets
      that "▁" from the tokenizer, so the template's spaces go. In v1 only <s> and </s> are
      control tokens ("[INST] Hi [/INST]" is one text): only the space before "[INST]" goes.
    - v2 and later encode an assistant's text without its trailing spaces (`rstrip(" ")`), which
      mistral-common's template does not do: ours does, so history turns match training.
    """
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    # mistral-common guesses that a v11 model reasons in plain "<think>" text; its tokenizer
    # writes no thinking for v11 (neither does our chat encoding), so the template writes none.
    plain_thinking = False if tok.version == "v11" else None
    try:
        template = convert_tokenizer_to_chat_template(tok.source_file, plain_thinking_support=plain_thinking)
    except ValueError as e:  # e.g. a v11 file with [THINK] tokens, a v15 file without settings
        raise ModelError(f"{tok.source_file}: mistral-common writes no chat template for this tokenizer: {e}") from e
    if tok.version == "v1":
        return template.replace("{{- ' [INST] ' }}", "{{- '[INST] ' }}")
    if not tok.is_tekken:
        raw = tok._raw
        for control in {raw.id_to_piece(i) for i in raw.special_ids}:
            template = template.replace(control + " ", control)
        template = _LONE_SPACE.sub("", template)
    if template.count(_ASSISTANT_TEXT) == 1:
        stripped = "(message['content'].rstrip(' ') if message['content'] is string else message['content'])"
        template = template.replace(_ASSISTANT_TEXT, _ASSISTANT_TEXT.replace("message['content']", stripped))
    else:
        logger.warning("chat template: could not find where mistral-common's template writes assistant text; "
                       "an assistant turn ending in spaces keeps them there (mistral-common drops them)")
    return template
