"""4-bit NormalFloat (NF4) frozen linear layers for QLoRA, through bitsandbytes.

Weights are quantized in blocks of 64 with double quantization of the block scales (about 4.1
bits a weight). The matmul dequantizes the weight to the activation dtype on the fly, in forward
and again in backward, so no full-precision copy of a frozen weight outlives its use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ConfigError(
            "adapter: qlora needs bitsandbytes; install it with: pip install 'mistral-tune[qlora]'"
        ) from None
    return bnbf


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x.to(dtype), layer.dequantized(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The frozen weight gets no gradient; the input's needs the weight once more.
        grad_x = grad @ ctx.layer.dequantized(grad.dtype)
        return grad_x.to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer held in NF4."""

    def __init__(self, packed: torch.Tensor, quant_state, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed, persistent=False)
        self.quant_state = quant_state

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> NF4Linear:
        bnbf = _bnb()
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)
        if weight.dtype == torch.float32 and weight.is_cuda:
            weight = weight.to(torch.bfloat16)  # what a bf16 checkpoint would hold; halves the transient
        packed, state = bnbf.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        return cls(packed, state, linear.in_features, linear.out_features)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the packed buffer; the quantization state (block scales, code book) follows.
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _bnb().dequantize_4bit(self.packed, self.quant_state).to(dtype)

    # Compiled decoder layers call this eagerly (a graph break on each side): bitsandbytes'
    # dequantization runs as its own kernels, everything around it still fuses.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, blocksize={BLOCKSIZE}, double quant"


def quantize_model(model: nn.Module, targets: list[str], device: torch.device | str | None = None) -> int:
    """Replace the named projections' nn.Linear layers with NF4 layers (quantized on `device`, one
    at a time), then move everything else to `device`. Returns how many layers were quantized."""
    _bnb()
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(module, name, NF4Linear.from_linear(child, device))
                count += 1
    if device is not None:
        model.to(device)
    return count


def nf4_round_trip(model: nn.Module, targets: list[str]) -> int:
    """Put into each target projection the weight that QLoRA training saw: quantized to NF4 and
    dequantized back. Merging a QLoRA adapter into these reproduces the trained model."""
    count = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    q = NF4Linear.from_linear(child)
                    child.weight.copy_(q.dequantized(child.weight.dtype))
                    count += 1
    return count
