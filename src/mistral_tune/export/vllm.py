"""What vLLM's LoRA loader accepts, stated once for the adapter check (adapter.py) and the model card (card.py)."""

from __future__ import annotations

#: Values vLLM accepts for --max-lora-rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def min_max_lora_rank(r: int) -> int:
    """The smallest --max-lora-rank value vLLM accepts that fits rank r."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)
