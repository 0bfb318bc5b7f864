"""Optimizer, learning-rate schedule, and the loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.pack import IGNORE
from ..errors import ConfigError
from ..kernels.loss import linear_cross_entropy_sum
from ..models.lora import output_head


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    if cfg.warmup_ratio is not None:
        return int(cfg.warmup_ratio * total_steps)
    return 0


def eight_bit_adamw():
    """bitsandbytes' AdamW8bit class, or a ConfigError naming the extra (train checks this before it
    loads anything: prepare)."""
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError:
        raise ConfigError("optimizer: adamw_8bit needs bitsandbytes; install it with: "
                          "pip install 'mistral-tune[qlora]'") from None
    return AdamW8bit


def make_optimizer(named: dict[str, torch.nn.Parameter], cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only. Each group's "lr_scale" multiplies the scheduled
    learning rate: LoRA+ (loraplus_lr_ratio) gives lora_B and the other vectors (DoRA magnitudes) the
    ratio, as PEFT's create_loraplus_optimizer does; everything else 1.

    `optimizer: adamw_8bit` is bitsandbytes' AdamW8bit (what transformers' Trainer runs for
    optim="adamw_bnb_8bit"): both moments in 8 bits with a float32 scale per block of 256 values.
    Float32 moments stay on tensors under 4,096 values (bitsandbytes' rule) and, as the Trainer
    keeps them, on the input embedding, whose rarely seen rows 8-bit moments update unstably."""
    ratio = cfg.loraplus_lr_ratio or 1.0
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in named.items():
        scale = ratio if (".lora_B." in name or p.ndim == 1) else 1.0
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
                    for (decay, scale), ps in groups.items()]
    options = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw_8bit":
        optimizer = eight_bit_adamw()(param_groups, **options)
        for name, p in named.items():  # the state bitsandbytes' first step makes for float32 moments
            if name.endswith("embed_tokens.weight"):
                optimizer.state[p].update(step=0, state1=torch.zeros_like(p), state2=torch.zeros_like(p))
        return optimizer
    return torch.optim.AdamW(param_groups, **options, fused=device.type == "cuda")


def token_loss_sum(model, batch) -> torch.Tensor:
    """Sum of next-token cross-entropy over the trained tokens of a batch (float32).

    Only trained positions go through lm_head, so masked prompts cost no logits memory; with
    `model.fused_loss` the logits are never kept at all (kernels/loss.py).
    """
    hidden = model.hidden_states(batch.input_ids, batch.position_ids, batch.seq_ids)
    keep = batch.labels != IGNORE
    h = hidden[keep]
    targets = batch.labels[keep]
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    if getattr(model, "fused_loss", False):
        weight, rows, values = output_head(model)
        return linear_cross_entropy_sum(h, weight, targets, rows=rows, row_values=values)
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits, targets, reduction="sum")
