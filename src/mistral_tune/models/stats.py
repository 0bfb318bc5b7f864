"""What a model counts: its parameters (trainable and total, a quantized base's packed weights counted
as the weights they stand for) and its training FLOPs per token, for the trainer's reports.

Kept apart from the model (mistral.py) because the parameter count must know the quantized layers
(quant.py, fp8.py), which themselves import the model: from here all three are imported at the top,
and none of them imports this module back.
"""

from __future__ import annotations

from torch import nn

from .fp8 import FP8Linear
from .mistral import MistralConfig
from .quant import NF4Linear


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A quantized base's weights (NF4, FP8) are buffers of packed
    codes: they count as the weights they stand for."""
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (NF4Linear, FP8Linear)))
    total = sum(p.numel() for p in model.parameters()) + quantized
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def flops_per_token(cfg: MistralConfig) -> float:
    """Approximate forward+backward FLOPs per token (6N), for throughput reports."""
    d, h = cfg.hidden_size, cfg.head_dim
    active_mlps = cfg.num_experts_per_tok if cfg.moe else 1  # a token runs through k experts
    per_layer = (d * h * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
                 + 3 * d * cfg.intermediate_size * active_mlps + (d * cfg.num_local_experts if cfg.moe else 0))
    n = cfg.num_hidden_layers * per_layer + cfg.vocab_size * d
    return 6.0 * n
