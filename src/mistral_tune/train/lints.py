"""Lints: what in a config fits the model or the data badly without being an error (printed by
validate, plan and train)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..chat import ChatTokenizer, find_tokenizer_file
from ..config import Config
from ..errors import ModelError
from ..models.families import EXPERT_TARGETS

# Lints: ranges outside which a setting is unusual enough to mention (never an error).
USUAL_LEARNING_RATE = {"adapter": (2e-5, 5e-3), "full": (1e-6, 1e-4)}  # LoRA/QLoRA, full fine-tuning


USUAL_LORA_SCALING = (0.25, 8.0)  # lora_alpha / lora_r (/ sqrt(r) with rsLoRA)


SHORT_SAMPLES = 0.25  # without packing: mean sample below this share of sequence_len


def model_fit_warnings(cfg: Config, model_dir: Path, model_cfg, tokenizer, lengths=None) -> list[str]:
    """What in the config fits the model or the data badly without being an error (printed by
    validate, plan and train). lengths: the training samples' token counts."""
    out = []
    kind, (low, high) = (("full fine-tuning", USUAL_LEARNING_RATE["full"]) if cfg.adapter == "none"
                         else (cfg.adapter.upper(), USUAL_LEARNING_RATE["adapter"]))
    if not low <= cfg.learning_rate <= high:
        below = cfg.learning_rate < low
        out.append(f"learning_rate {cfg.learning_rate:g} is far {'below' if below else 'above'} the usual range for "
                   f"{kind} ({low:g} to {high:g}; full fine-tuning takes about 10x less than adapters): expect "
                   + ("little learning" if below else "divergence or forgetting"))
    if cfg.adapter != "none":
        scaling = cfg.lora_alpha / (math.sqrt(cfg.lora_r) if cfg.use_rslora else cfg.lora_r)
        if not USUAL_LORA_SCALING[0] <= scaling <= USUAL_LORA_SCALING[1]:
            rule = "lora_alpha / sqrt(lora_r) (use_rslora)" if cfg.use_rslora else "lora_alpha / lora_r"
            out.append(f"lora_alpha {cfg.lora_alpha:g} with lora_r {cfg.lora_r}: the adapter's scale {rule} is "
                       f"{scaling:.3g}, outside the usual {USUAL_LORA_SCALING[0]:g} to {USUAL_LORA_SCALING[1]:g} "
                       "(alpha = r or 2r is common): the effective learning rate moves with it")
    if cfg.sequence_len > model_cfg.max_position_embeddings:
        out.append(f"sequence_len {cfg.sequence_len} is more than the model's max_position_embeddings "
                   f"{model_cfg.max_position_embeddings} ({model_dir / 'config.json'}): it has not learnt positions "
                   "that far")
    window = model_cfg.sliding_window
    if window and cfg.sequence_len > window:
        out.append(f"sequence_len {cfg.sequence_len} is more than the model's sliding_window {window} "
                   f"({model_dir / 'config.json'}): a token attends to the {window} before it only, and rows of one "
                   "sample are padded to sequence_len")
    if lengths is not None and len(lengths) and not cfg.sample_packing:
        mean = float(np.mean(lengths))
        if mean < SHORT_SAMPLES * cfg.sequence_len:
            out.append(f"sample_packing is off and samples average {mean:.0f} tokens against sequence_len "
                       f"{cfg.sequence_len}: a micro-batch of {cfg.micro_batch_size} row(s) holds about "
                       f"{mean * cfg.micro_batch_size:.0f} tokens; sample_packing: true fills rows (samples never "
                       "attend to each other)")
    if cfg.adapter == "qlora" and model_cfg.moe and not set(cfg.lora_target_modules) & set(EXPERT_TARGETS):
        out.append("adapter qlora: the experts are not in lora_target_modules, so they stay in full precision "
                   "(QLoRA holds in NF4 what it adapts); add experts to hold them in 4 bits")
    if cfg.tokenizer is not None:
        try:
            own = ChatTokenizer(find_tokenizer_file(model_dir))
        except ModelError:  # the folder ships none (or several): nothing to compare with
            return out
        def kind_of(t: ChatTokenizer) -> str:
            return f"{'tekken' if t.is_tekken else 'SentencePiece'} {t.version}"

        if kind_of(own) != kind_of(tokenizer):
            out.append(f"tokenizer: {cfg.tokenizer} is {kind_of(tokenizer)}, but the model folder ships "
                       f"{own.source_file.name} ({kind_of(own)}): the prompt format differs from the one the model "
                       "knows; leave tokenizer out to use the model's own")
    return out

