"""Optimizer, learning-rate schedule, and the loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.pack import IGNORE
from ..kernels.loss import linear_cross_entropy_sum
from ..lora import output_head


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


def make_optimizer(named: dict[str, torch.nn.Parameter], cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only. Each group's "lr_scale" multiplies the scheduled
    learning rate: LoRA+ (loraplus_lr_ratio) gives lora_B and the other vectors (DoRA magnitudes) the
    ratio, as PEFT's create_loraplus_optimizer does; everything else 1."""
    ratio = cfg.loraplus_lr_ratio or 1.0
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in named.items():
        scale = ratio if (".lora_B." in name or p.ndim == 1) else 1.0
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
         for (decay, scale), ps in groups.items()],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=device.type == "cuda",
    )


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
