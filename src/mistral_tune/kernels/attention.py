"""Attention masks for packed rows: a dense boolean mask (any device, SDPA) or a FlexAttention
block mask (GPU), both expressing causal + same-sample + sliding window.

The block mask is built once per batch and shared by every layer; fully masked 128x128 blocks
(other samples, outside the window) are skipped by the kernel, so packing costs no wasted FLOPs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def dense_mask(seq_ids: torch.Tensor, position_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (B, 1, L, L): causal, same sample only, and within the sliding window.

    Positions count from each sample's start, so the window is measured in them.
    """
    L = seq_ids.shape[1]
    idx = torch.arange(L, device=seq_ids.device)
    mask = (idx[None, :, None] >= idx[None, None, :]) & (seq_ids[:, :, None] == seq_ids[:, None, :])
    if window is not None:
        mask &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    return mask[:, None]


def flex_block_mask(seq_ids: torch.Tensor, window: int | None):
    """FlexAttention BlockMask for rows of packed samples (seq_ids (B, L); padding has id -1).

    Inside one sample, token index distance equals position distance, so the window test can
    use indices directly.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = seq_ids.shape
    doc = seq_ids.to(torch.int32)

    if window is None:
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (doc[b, q] == doc[b, kv])
    else:
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (doc[b, q] == doc[b, kv]) & (q - kv < window)

    return create_block_mask(mask_mod, B, None, L, L, device=seq_ids.device, _compile=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention is a slow reference path; the compiled one is the fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """q (B, Hq, L, D), k/v (B, Hkv, S, D) -> (B, Hq, L, D). mask: dense bool tensor or BlockMask."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
