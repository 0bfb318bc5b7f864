"""4-bit NormalFloat (NF4) frozen linear layers for QLoRA, through bitsandbytes.

Mixtral's stacked expert weights are quantized expert by expert, each (out, in) matrix as a linear
layer's, so the forward dequantizes only the experts a batch uses, one at a time.

Weights are quantized in blocks of 64 with double quantization of the block scales (about 4.1
bits a weight). The matmul dequantizes the weight to the activation dtype on the fly, in forward
and again in backward, so no full-precision copy of a frozen weight outlives its use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .families import EXPERT_TARGETS
from .mistral import Experts

BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ConfigError(
            "adapter: qlora needs bitsandbytes; install it with: pip install 'mistral-tune[qlora]'"
        ) from None
    return bnbf


def _dequantize(packed, absmax, absmax2, code2, offset, meta) -> torch.Tensor:
    """bitsandbytes' NF4 dequantization (double-quantized block scales first), written with its
    registered torch ops only, so torch.compile traces through it without a graph break."""
    shape, dtype, blocksize, blocksize2 = meta
    if absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, blocksize2, torch.float32)
        absmax = absmax + offset
    return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, "nf4", shape, dtype)


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, absmax2, code2, offset, meta):
        ctx.save_for_backward(packed, absmax, absmax2, code2, offset)
        ctx.meta = meta
        return F.linear(x, _dequantize(packed, absmax, absmax2, code2, offset, meta).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        # The frozen weight gets no gradient; the input's needs the weight once more.
        w = _dequantize(*ctx.saved_tensors, ctx.meta).to(grad.dtype)
        return grad @ w, None, None, None, None, None, None


class _NF4GradOnly(torch.autograd.Function):
    """The NF4 product for a pass that only back-propagates through it (models/recompute.py):
    no dequantization or matmul in forward, one of each in backward."""

    @staticmethod
    def forward(ctx, x, packed, absmax, absmax2, code2, offset, meta):
        ctx.save_for_backward(packed, absmax, absmax2, code2, offset)
        ctx.meta = meta
        return x.new_zeros(()).expand(*x.shape[:-1], meta[0][0])

    backward = _NF4Matmul.backward


def moves_only(module: nn.Module, names: tuple[str, ...], fn) -> nn.Module:
    """Module._apply for a quantized layer's buffers: `fn`'s device move applies, its dtype cast
    (model.to(dtype)) does not, so codes and scales keep theirs."""
    for name in names:
        t = getattr(module, name)
        if t is not None:
            moved = fn(t)
            setattr(module, name, t.to(moved.device) if moved.dtype != t.dtype else moved)
    return module


class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer held in NF4."""

    def __init__(self, packed: torch.Tensor, quant_state, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if quant_state.quant_type != "nf4":
            raise ValueError(f"4-bit type {quant_state.quant_type!r} is not nf4")
        nested = quant_state.nested
        self.quantized_from: torch.dtype | None = None  # set by from_linear; None when read quantized
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", quant_state.absmax, persistent=False)
        self.register_buffer("absmax2", quant_state.state2.absmax if nested else None, persistent=False)
        self.register_buffer("code2", quant_state.state2.code if nested else None, persistent=False)
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32) if nested else None
        self.register_buffer("offset", offset, persistent=False)
        self.meta = (list(quant_state.shape), quant_state.dtype, quant_state.blocksize,
                     quant_state.state2.blocksize if nested else 0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> NF4Linear:
        return cls.from_weight(linear.weight, device)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, device: torch.device | str | None = None) -> NF4Linear:
        """An NF4 layer applying weight (out, in)."""
        bnbf = _bnb()
        weight = weight.detach()
        if device is not None:
            weight = weight.to(device)
        if weight.dtype == torch.float32 and weight.is_cuda:
            weight = weight.to(torch.bfloat16)  # what a bf16 checkpoint would hold; halves the transient
        packed, state = bnbf.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        q = cls(packed, state, weight.shape[1], weight.shape[0])
        q.quantized_from = weight.dtype  # the codes depend on it: a merge must quantize the same values
        return q

    def _apply(self, fn, recurse=True):
        # Only moves: the packed codes and block scales keep their dtypes (float32 scales stay float32).
        return moves_only(self, ("packed", "absmax", "absmax2", "code2", "offset"), fn)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _tensors(self):
        return self.packed, self.absmax, self.absmax2, self.code2, self.offset

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        _bnb()
        with torch.no_grad():
            return _dequantize(*self._tensors(), self.meta).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._autocast(x)
        if x.is_cuda and not torch.is_grad_enabled() and x.shape[:-1].numel() == 1:
            return self._gemv(x)
        return _NF4Matmul.apply(x, *self._tensors(), self.meta)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        """One token without gradients (decoding at batch 1): bitsandbytes' 4-bit matrix-vector kernel
        reads the codes once, where dequantizing first also writes and reads the whole weight in x's
        dtype. Its block scales are dequantized once and kept (the weight is frozen)."""
        if getattr(self, "_gemv_scales", None) is None or self._gemv_scales[0].device != x.device:
            shape, dtype, blocksize, blocksize2 = self.meta
            absmax = self.absmax
            if self.absmax2 is not None:
                absmax = torch.ops.bitsandbytes.dequantize_blockwise(self.absmax, self.absmax2, self.code2,
                                                                     blocksize2, torch.float32) + self.offset
            self._gemv_scales = (absmax, _bnb().get_4bit_type("nf4", device=x.device))
        absmax, code = self._gemv_scales
        return torch.ops.bitsandbytes.gemv_4bit(x, self.packed.t(), self.meta[0], absmax, code, self.meta[2])

    def grad_only(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) when the result is only back-propagated through (models/recompute.py)."""
        return _NF4GradOnly.apply(self._autocast(x), *self._tensors(), self.meta)

    @staticmethod
    def _autocast(x: torch.Tensor) -> torch.Tensor:
        # As nn.Linear under autocast: the matmul runs in the autocast dtype.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, blocksize={self.meta[2]}"


def _stacked_targets(targets: list[str]) -> list[str]:
    """The stacked expert weights that LoRA target names adapt (families.EXPERT_TARGETS)."""
    return sorted({p for name in targets for p in EXPERT_TARGETS.get(name, ())})


def quantize_model(model: nn.Module, targets: list[str], device: torch.device | str | None = None) -> int:
    """Replace the named projections' nn.Linear layers with NF4 layers (quantized on `device`, one
    at a time), and a named stacked expert weight (Mixtral) with one NF4 layer per expert, in
    `Experts.nf4`; then move everything else to `device`. Returns how many layers were quantized."""
    _bnb()
    count = 0
    stacked = _stacked_targets(targets)
    for module in list(model.modules()):
        if isinstance(module, Experts):
            for name in stacked:
                weight = getattr(module, name)
                module.nf4[name] = nn.ModuleList(NF4Linear.from_weight(w, device) for w in weight)
                del module._parameters[name]
                count += len(weight)
            continue
        count += replace_linears(module, targets, lambda linear: NF4Linear.from_linear(linear, device))
    if device is not None:
        model.to(device)
    return count


def replace_linears(module: nn.Module, targets, convert) -> int:
    """Put convert(child) in place of each of module's plain nn.Linear children named in targets;
    returns how many (the NF4 and FP8 bases both convert their projections this way)."""
    count = 0
    for name, child in list(module.named_children()):
        if name in targets and type(child) is nn.Linear:
            setattr(module, name, convert(child))
            count += 1
    return count


def nf4_round_trip(model: nn.Module, targets: list[str], quantized_from: torch.dtype = torch.float32) -> int:
    """Put into each target projection (and named stacked expert weight, expert by expert) the weight
    that QLoRA training saw: quantized to NF4 (from the dtype training quantized from: bf16 on a GPU)
    and dequantized back. Merging a QLoRA adapter into these reproduces the trained model."""
    count = 0
    stacked = _stacked_targets(targets)

    def round_trip(weight: torch.Tensor) -> None:
        weight.copy_(NF4Linear.from_weight(weight.to(quantized_from)).dequantized(weight.dtype))

    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, Experts):
                for name in stacked:
                    for w in getattr(module, name):
                        round_trip(w)
                        count += 1
                continue
            for name, child in list(module.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    round_trip(child.weight)
                    count += 1
    return count
