"""Attention masks for packed rows: a dense boolean mask (any device, SDPA) or a FlexAttention
block mask (GPU), both expressing causal + same-sample + sliding window.

The block mask is built once per batch and shared by every layer; fully masked 128x128 blocks
(other samples, outside the window) are skipped by the kernel, so packing costs no wasted FLOPs.

When rows hold a single sample each (no packing; trailing padding allowed) and no sliding window
cuts inside them, the mask is plain causal: `CAUSAL` stands for it, and attention runs SDPA's
causal kernel (cuDNN's fused attention on Hopper, else flash; in float32, the memory-efficient
kernel), which is faster than FlexAttention's general kernel. Padding at a row's end sees the
real tokens before it; no real token sees the padding, and padding carries no loss, so real
outputs and gradients are the same.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA's kernels for a dense mask (see attend): every one but cuDNN's, in torch's own order.
DENSE_MASK_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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


CAUSAL = "causal"


def one_sample_per_row(seq_ids: torch.Tensor) -> bool:
    """Whether each row is one sample followed only by padding (id -1). One host sync."""
    real = seq_ids >= 0
    same = (seq_ids == seq_ids[:, :1]) | ~real
    trailing_pad = real[:, 1:] <= real[:, :-1]  # once padding starts, it runs to the row's end
    return bool(same.all() & trailing_pad.all())


# (device, dtype, head_dim) -> SDPA backends for the causal kernel; filled by probe_causal_backends.
_CAUSAL_BACKENDS: dict[tuple[torch.device, torch.dtype, int], list] = {}


def probe_causal_backends(device: torch.device, head_dim: int) -> None:
    """Find, once per device and head size, the SDPA backend the causal kernel takes for each
    floating dtype: cuDNN where it runs (Hopper and later; bf16/fp16), else flash (bf16/fp16),
    else the memory-efficient kernel (float32 too), each tried with a small forward and backward.
    A dtype none of them runs gets an empty list: SDPA's own choice. Call it outside compiled code."""
    if device.type != "cuda" or (device, torch.float32, head_dim) in _CAUSAL_BACKENDS:
        return

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if torch.cuda.get_device_capability(device)[0] >= 9:
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        choice = []
        for backend in order:
            try:
                q = torch.randn(1, 4, 256, head_dim, device=device, dtype=dtype, requires_grad=True)
                kv = torch.randn(1, 2, 256, head_dim, device=device, dtype=dtype)
                # Not under the caller's autocast, which would hand every probe bf16 inputs.
                with warnings.catch_warnings(), torch.autocast("cuda", enabled=False), sdpa_kernel([backend]):
                    warnings.simplefilter("ignore")  # each refusal explains itself in a warning
                    F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()
                choice = [backend]
                break
            except RuntimeError:
                continue
        _CAUSAL_BACKENDS[(device, dtype, head_dim)] = choice


def causal_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> list:
    """The probed backends for the causal kernel; empty: SDPA's own choice."""
    return _CAUSAL_BACKENDS.get((device, dtype, head_dim), [])


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
    """q (B, Hq, L, D), k/v (B, Hkv, S, D) -> (B, Hq, L, D).
    mask: dense bool tensor, BlockMask, or CAUSAL (one sample per row, L == S)."""
    if isinstance(mask, str):
        dev = q.device.type  # SDPA autocasts its inputs: the kernel sees autocast's dtype
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
        backends = causal_backends(q.device, dtype, q.shape[-1])
        if not backends:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if mask is not None and not isinstance(mask, torch.Tensor):
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    # Not cuDNN's kernel for a dense mask: it builds an execution plan for every new shape, and
    # decoding with a KV cache makes a new key length at every token. On an H200 that plan cost
    # about 40 ms of CPU a token and layer group (4 layers decoded at 46 ms a token instead of
    # 3.6); the memory-efficient kernel takes any mask and has no per-shape setup.
    with sdpa_kernel(DENSE_MASK_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
