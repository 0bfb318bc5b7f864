"""HF tokenizer files (tokenizer.json, tokenizer_config.json, chat template) for a merged model.

transformers, vLLM and TGI read these instead of mistral-common's file. They are built with the
`tokenizers` library from the vocabulary mistral-common loaded (export/vocab.py), so that they
give mistral-common's ids:

- SentencePiece: what its normalizer does (a "▁" in front of the text, every space written "▁",
  nothing collapsed), then its byte-fallback BPE over the whole text, with no pre-tokenizer:
  SentencePiece does not split at spaces when it encodes, and its whitespace runs merge last.
  Each text between two control tokens gets its own "▁", as each of mistral-common's per-message
  encode calls does; user-defined pieces ([REF], ...) are matched inside the text like
  SentencePiece matches them, after the normalizer.
- Tekken: byte-level BPE with tekken's split regex and `ignore_merges` (tiktoken takes a whole
  pre-token when it is in the vocabulary).

The chat template is mistral-common's own, adapted to that per-segment "▁" (export/vocab.py).
Tests check on generated text and conversations that transformers gives exactly mistral-common's
ids. One difference is inherent to HF tokenizers: they turn the *text* "[INST]" inside user
content into the control token; mistral-common (and our chat/serve code) encodes it as text.
Two more come from Jinja (docs/data.md): tool-call arguments given as a string are written as
given (mistral-common re-serializes them), and v13+ tool results out of call order stay in
the given order (mistral-common sorts them).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..chat import ChatTokenizer
from ..fsutil import atomic_write_text
from .vocab import USER_DEFINED, Vocab, chat_template, extract_vocab

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def build_tokenizer(vocab: Vocab) -> Tokenizer:
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    if vocab.kind == "spm":
        tok = Tokenizer(BPE(ids, vocab.merges, unk_token=vocab.tokens[vocab.unk_id], fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        # Decoding drops the "▁" of the first piece only, as SentencePiece does.
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        user_defined = [t for i, t in enumerate(vocab.tokens) if vocab.types[i] == USER_DEFINED]
        tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in user_defined])
    else:
        tok = Tokenizer(BPE(ids, vocab.merges, fuse_unk=False, ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(vocab.pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for _, t in vocab.special_tokens])
    # Plain `tokenizer(text)` adds BOS like mistral-common's encode(bos=True); chat templates
    # write bos_token themselves and transformers encodes them without special tokens.
    bos = vocab.tokens[vocab.bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)]
    )
    return tok


def save_hf_tokenizer(tok: ChatTokenizer, out_dir: Path) -> list[Path]:
    """Write the HF tokenizer files for `tok` into out_dir; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = extract_vocab(tok)
    template = chat_template(tok)
    build_tokenizer(vocab).save(str(out_dir / "tokenizer.json"))
    specials = {
        "bos_token": vocab.tokens[vocab.bos_id],
        "eos_token": vocab.tokens[vocab.eos_id],
        "unk_token": vocab.tokens[vocab.unk_id],
    }
    if vocab.pad_id is not None:
        specials["pad_token"] = vocab.tokens[vocab.pad_id]
    config = {
        # PreTrainedTokenizerFast: known to transformers 4.x and 5.x alike (vLLM pins either).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": template,
    }
    written = []
    for name, text in (
        ("tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n"),
        ("special_tokens_map.json", json.dumps(specials, indent=2) + "\n"),
        ("chat_template.jinja", template),
    ):
        atomic_write_text(out_dir / name, text)
        written.append(out_dir / name)
    return [out_dir / "tokenizer.json", *written]
