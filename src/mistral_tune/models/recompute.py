"""Per-layer activation checkpointing, optionally with the saved layer inputs in CPU memory.

Each decoder layer runs its forward without autograd and keeps only its input; backward runs the
layer again with autograd on and back-propagates through it. With `offload`, the kept inputs are
copied to pinned host memory on a side stream while the next layers compute, and copied back one
layer ahead of backward, so the copies overlap with compute instead of stalling it. The GPU then
holds no per-layer activations between forward and backward at all.

This is the reentrant form of checkpointing (an autograd.Function that calls backward inside its
own backward): the forward is a plain no-grad call, so a compiled layer runs its inference graph
there, and nothing autograd would save is created only to be thrown away.

In backward the re-run layer's output value is never read, only back-propagated through, so its
last projection (the MLP's down_proj, over a quarter of a layer's forward FLOPs) is called in `grad_only`
form: its frozen product is not computed at all, and its backward computes the input gradient
(and the weight's, where it trains) exactly as the plain product's backward would.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerInputs:
    """The inputs of one forward pass's layers, on the GPU or (offload) in pinned host memory."""

    def __init__(self, offload: bool) -> None:
        self.offload = offload
        self.kept: dict[int, torch.Tensor] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.stream = torch.cuda.Stream() if offload else None
        # Per layer: its per-row (cos, sin, mask) when backward goes one batch row at a time, else
        # None (set by the model; layers differ where their sliding windows do).
        self.row_args: list[list[tuple] | None] | None = None

    def keep(self, i: int, x: torch.Tensor) -> None:
        if not self.offload:
            self.kept[i] = x
            return
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.kept[i] = host

    def _fetch(self, i: int, device: torch.device) -> None:
        host = self.kept.pop(i)
        gpu = torch.empty(host.shape, dtype=host.dtype, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            gpu.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.prefetched[i] = (gpu, done)

    def take(self, i: int, device: torch.device) -> torch.Tensor:
        """Layer i's input for its backward; starts bringing layer i-1's back meanwhile."""
        if not self.offload:
            return self.kept.pop(i)
        if i not in self.prefetched:
            self._fetch(i, device)
        if i - 1 in self.kept:
            self._fetch(i - 1, device)
        gpu, done = self.prefetched.pop(i)
        torch.cuda.current_stream(device).wait_event(done)
        return gpu


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, _grad_anchor, layer: nn.Module, store: LayerInputs, i: int, args: tuple):
        ctx.layer, ctx.store, ctx.i, ctx.args = layer, store, i, args
        ctx.device = x.device
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                        for d in {x.device.type, "cpu"}]
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        x = x.detach()  # one compiled no-grad graph whatever the input's requires_grad
        store.keep(i, x)
        with torch.no_grad():
            return layer(x, *args)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.store.take(ctx.i, ctx.device)
        # The same autocast and random state as the forward, so dropout draws the same masks.
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            rows = ctx.store.row_args[ctx.i] if ctx.store.row_args is not None else None
            if rows is None:
                grad_x = _layer_backward(ctx, x, ctx.args, grad_out)
            else:  # one row at a time: one row's activations alive instead of the batch's
                grads = [_layer_backward(ctx, x[b:b + 1], args, grad_out[b:b + 1]) for b, args in enumerate(rows)]
                grad_x = torch.cat(grads) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def _layer_backward(ctx, x: torch.Tensor, args: tuple, grad_out: torch.Tensor) -> torch.Tensor | None:
    """Run the layer on x with autograd (under the forward's autocast) and back-propagate grad_out:
    the LoRA/weight gradients accumulate in .grad; returns the gradient of x."""
    x = x.detach().requires_grad_(ctx.needs_input_grad[0])
    with torch.enable_grad():
        autocasts = [torch.autocast(d, dtype=dt, enabled=on) for d, on, dt in ctx.autocast]
        for a in autocasts:
            a.__enter__()
        try:
            out = ctx.layer(x, *args, grad_only=True)
        finally:
            for a in reversed(autocasts):
                a.__exit__(None, None, None)
    torch.autograd.backward(out, grad_out)
    return x.grad


# Gives every checkpointed layer's output a grad_fn even when its input needs no gradient (the
# first layer's input comes from a frozen embedding); it never receives a gradient itself.
_ANCHORS: dict[torch.device, torch.Tensor] = {}


def recompute_layer(layer: nn.Module, x: torch.Tensor, store: LayerInputs, i: int, *args) -> torch.Tensor:
    anchor = _ANCHORS.get(x.device)
    if anchor is None:
        anchor = _ANCHORS[x.device] = torch.zeros((), device=x.device, requires_grad=True)
    return _Recompute.apply(x, anchor, layer, store, i, args)


class _LinearGradOnly(torch.autograd.Function):
    """x W^T for a pass that only back-propagates through it: forward returns zeros (the product
    is never read), backward gives the gradients of the real product."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        dev = x.device.type
        # The dtype the product would have had: autocast's, or the usual promotion.
        ctx.dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(
            x.dtype, weight.dtype)
        return x.new_zeros((), dtype=ctx.dtype).expand(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_x = (grad @ weight.to(ctx.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.flatten(0, -2).t() @ x.to(ctx.dtype).flatten(0, -2)).to(weight.dtype)
        return grad_x, grad_w


def grad_only(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) where the result is only back-propagated through, never read: the frozen (or
    plain trainable) product is skipped where the module knows how; anything else runs as is."""
    own = getattr(module, "grad_only", None)
    if own is not None:
        return own(x)
    if type(module) is nn.Linear and module.bias is None:
        return linear_grad_only(x, module.weight)
    return module(x)


def linear_grad_only(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _LinearGradOnly.apply(x, weight)
