"""FP8 (e4m3) frozen linear layers for LoRA over an FP8 base (`base_precision: fp8`).

Each frozen projection holds its weight as float8_e4m3fn with one float32 scale per output row
(amax / 448, computed once at load): half the bytes of bf16. Both GEMMs of the frozen base run in
FP8 through torch._scaled_mm with row-wise scales:

- forward: the input is quantized per token (its own amax per row, at every call), then
  y = (x_q * s_x) (W_q * s_w)^T, accumulated in float32 and written in bf16;
- backward (input gradient only: the base is frozen): the weight's row scales lie along the
  reduction dimension there, so they are folded into the gradient first, g' = g * s_w, which is
  then quantized per token like the input: dx = (g'_q * s_g') W_q. The FP8 GEMM needs both
  operands contiguous along the reduced dimension, so W_q is transposed for it, a transient
  1-byte copy of one layer's weight at a time.

The gradient is quantized to e4m3, not e5m2: with a scale per token row the range that e5m2's
extra exponent bit buys is not needed, and e4m3's extra mantissa bit halves the rounding error.
(Hopper's row-wise kernel accepts e5m2 only for the first operand; e4m3 works everywhere.)

LoRA wraps these layers as it wraps NF4 ones (lora.py); checkpointed layers re-run them, the MLP's
last one in its grad-only form; the fast path's compiled layers trace them whole. Nothing but the
adapter is saved: a merge puts it on the original weights, which the FP8 codes only approximate.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .quant import moves_only, replace_linears
from .recompute import product_dtype

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# _scaled_mm on a GPU needs both dimensions of its second operand to be multiples of 16.
ALIGN = 16


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, float32 scale per row of shape (..., 1)) with t ~ codes * scale: each row's
    largest magnitude maps to e4m3's largest value, 448."""
    t = t.float()
    scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _input_grad(grad: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad @ (codes * scale[:, None]) as one FP8 GEMM (see the module's docstring)."""
    g = grad.reshape(-1, grad.shape[-1]).float() * scale
    g_codes, g_scale = quantize_rows(g)
    ones = torch.ones(1, codes.shape[1], device=codes.device, dtype=torch.float32)
    out = torch._scaled_mm(g_codes, codes.t().contiguous().t(), scale_a=g_scale, scale_b=ones,
                           out_dtype=torch.bfloat16)
    return out.view(*grad.shape[:-1], codes.shape[1]).to(dtype)


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, scale):
        ctx.save_for_backward(codes, scale)
        ctx.dtype = x.dtype
        x_codes, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(x_codes, codes.t(), scale_a=x_scale, scale_b=scale[None, :],
                               out_dtype=torch.bfloat16)
        return out.view(*x.shape[:-1], codes.shape[0]).to(product_dtype(x))

    @staticmethod
    def backward(ctx, grad):
        codes, scale = ctx.saved_tensors
        return _input_grad(grad, codes, scale, ctx.dtype), None, None


class _FP8GradOnly(torch.autograd.Function):
    """The FP8 product for a pass that only back-propagates through it (models/recompute.py):
    no GEMM in forward, the input-gradient GEMM in backward."""

    @staticmethod
    def forward(ctx, x, codes, scale):
        ctx.save_for_backward(codes, scale)
        ctx.dtype = x.dtype
        return x.new_zeros((), dtype=product_dtype(x)).expand(*x.shape[:-1], codes.shape[0])

    backward = _FP8Matmul.backward


class FP8Linear(nn.Module):
    """A frozen, bias-free linear layer held in e4m3 with a float32 scale per output row."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> FP8Linear:
        if linear.bias is not None:
            raise ConfigError("base_precision: fp8 supports bias-free projections only")
        if linear.in_features % ALIGN or linear.out_features % ALIGN:
            raise ConfigError(f"base_precision: fp8 needs projection sizes that are multiples of {ALIGN} "
                              f"(FP8 matmul), not {linear.out_features}x{linear.in_features}")
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)
        codes, scale = quantize_rows(weight)
        return cls(codes, scale.squeeze(1))

    def _apply(self, fn, recurse=True):
        # Only moves: the codes stay e4m3 and the scales float32 (model.to(dtype) leaves them).
        return moves_only(self, ("codes", "scale"), fn)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8Matmul.apply(x, self.codes, self.scale)

    def grad_only(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) when the result is only back-propagated through (models/recompute.py)."""
        return _FP8GradOnly.apply(x, self.codes, self.scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, e4m3, row-wise scales"


def fp8_model(model: nn.Module, targets: list[str], device: torch.device | str | None = None) -> int:
    """Replace the named projections' nn.Linear layers with FP8 layers (quantized on `device`, one
    at a time), then move everything else to `device`. Returns how many layers were converted."""
    count = sum(replace_linears(module, targets, lambda linear: FP8Linear.from_linear(linear, device))
                for module in list(model.modules()))
    if device is not None:
        model.to(device)
    return count


def fp8_support_error(gpu: str, capability: tuple[int, int]) -> str | None:
    """Why a CUDA GPU cannot run the FP8 base, or None: FP8 matmuls need compute capability 8.9
    (Ada) or newer."""
    if capability >= (8, 9):
        return None
    return (f"base_precision: fp8 needs a GPU with FP8 matmuls (compute capability 8.9 or newer: L4, L40S, "
            f"H100, H200); {gpu} has {capability[0]}.{capability[1]}; use base_precision: bf16")


def check_fp8_device(device: torch.device) -> None:
    """Raise ConfigError where the device cannot run the FP8 base (the CPU can)."""
    if device.type == "cuda":
        error = fp8_support_error(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
        if error:
            raise ConfigError(error)
