"""A mistral-common tokenizer's vocabulary in the forms other runtimes read.

Two consumers need the same facts: HF `tokenizer.json` (transformers, vLLM, TGI) and GGUF's
`tokenizer.ggml.*` keys (llama.cpp). Both describe a BPE model as a token list plus a merge list,
so this module derives them once from the loaded mistral-common tokenizer, never from a second
copy of the file format:

- SentencePiece (v1/v2/v3/v7): pieces, scores and piece types from the SentencePiece model;
  text is byte-fallback BPE over "▁"-prefixed words.
- Tekken: tiktoken byte-level BPE ranks offset by the number of special tokens (1000); tokens
  are written with GPT-2's byte-to-unicode alphabet, as HF and llama.cpp expect.

The chat template comes from mistral-common's own generator, so it renders what
`encode_chat_completion` encodes (tests compare the ids through transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ..chat import ChatTokenizer

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


def _merges(ranks: dict, key=lambda t: t) -> list[tuple]:
    """BPE merges implied by an ordered vocabulary: a token of rank r is the merge of any split
    whose halves are both tokens; merges are ordered by the rank of their result."""
    out = []
    for token, rank in ranks.items():
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                local.append((ranks[left], ranks[right], left, right))
        local.sort()
        out.extend((rank, key(a), key(b)) for _, _, a, b in local)
    out.sort(key=lambda m: m[0])
    return [(a, b) for _, a, b in out]


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
    # Only ordinary pieces take part in merging; control and byte pieces are matched whole.
    ranks = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    return Vocab("spm", tokens, scores, types, _merges(ranks), None, tok.bos_id, tok.eos_id, sp.unk_id())


def _tekken_vocab(tok: ChatTokenizer, raw) -> Vocab:
    n_special = raw.num_special_tokens
    specials = sorted(raw._all_special_tokens, key=lambda t: t["rank"])
    byte_ranks: dict[bytes, int] = raw._tekken_token2id_nospecial  # bytes -> rank (without offset)
    enc = bytes_to_unicode()
    text = lambda b: "".join(enc[x] for x in b)
    tokens = [""] * (n_special + len(byte_ranks))
    types = [CONTROL] * n_special + [NORMAL] * len(byte_ranks)
    for t in specials:
        tokens[t["rank"]] = str(getattr(t["token_str"], "value", t["token_str"]))
    for b, r in byte_ranks.items():
        tokens[n_special + r] = text(b)
    unk = raw.unk_id
    types[unk] = UNKNOWN
    pad = next((t["rank"] for t in specials if str(t["token_str"]) == "<pad>"), None)
    return Vocab(
        "tekken",
        tokens,
        [0.0] * len(tokens),
        types,
        _merges(byte_ranks, key=text),
        raw._model._pat_str,
        tok.bos_id,
        tok.eos_id,
        unk,
        pad,
    )


def chat_template(tok: ChatTokenizer) -> str:
    """mistral-common's Jinja chat template for this tokenizer (bos/eos as variables)."""
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    return convert_tokenizer_to_chat_template(tok.source_file)
