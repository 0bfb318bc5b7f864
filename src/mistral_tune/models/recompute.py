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

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

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
        ctx.autocast, ctx.rng = _autocast_state(x.device), _rng_state(x.device)
        x = x.detach()  # one compiled no-grad graph whatever the input's requires_grad
        store.keep(i, x)
        with torch.no_grad():
            return layer(x, *args)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.store.take(ctx.i, ctx.device)
        # The same random state as the forward, so dropout draws the same masks.
        with _replay_rng(ctx.device, ctx.rng):
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
    with torch.enable_grad(), _replay_autocast(ctx.autocast):
        out = ctx.layer(x, *args, grad_only=True)
    torch.autograd.backward(out, grad_out)
    return x.grad


def product_dtype(x: torch.Tensor, other: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a product of x (with a weight of dtype other): autocast's where it is on for x's
    device, else the usual promotion."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if other is None else torch.promote_types(x.dtype, other)


def _autocast_state(device: torch.device) -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in {device.type, "cpu"}]


@contextmanager
def _replay_autocast(state: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    with ExitStack() as stack:
        for d, on, dt in state:
            stack.enter_context(torch.autocast(d, dtype=dt, enabled=on))
        yield


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def _replay_rng(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> Iterator[None]:
    """Run the block from a saved random state, leaving the caller's own state as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


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
        ctx.dtype = product_dtype(x, weight.dtype)  # the dtype the product would have had
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


@torch.compiler.disable  # a compiled layer calls it eagerly: its chunk count follows the row length
def by_token_chunks(fn: Callable[[torch.Tensor, bool], torch.Tensor], x: torch.Tensor, n: int,
                    grad_only_out: bool) -> torch.Tensor:
    """fn(x, grad_only_out) for a token-wise fn whose output has x's width, computed n tokens at a
    time, so that fn's own activations (the MLP's, several times the hidden width a token) are held
    for n tokens at once instead of for the whole sequence. For passes that keep no activations: a
    no-grad forward, or a checkpointed layer's re-run (grad_only_out), whose chunks are computed
    again in backward, one at a time, and back-propagated there. The same FLOPs as one call."""
    if grad_only_out:
        return _GradOnlyByChunk.apply(x, fn, n)
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([fn(chunk, False) for chunk in flat.split(n)]).view(x.shape)


class _GradOnlyByChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, n):
        ctx.save_for_backward(x)
        ctx.fn, ctx.n = fn, n
        ctx.autocast, ctx.rng = _autocast_state(x.device), _rng_state(x.device)
        return x.new_zeros((), dtype=product_dtype(x)).expand(x.shape)  # never read (grad_only)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grads = []
        # The forward's random state: the chunks draw their dropout masks as the no-grad pass did.
        with _replay_rng(x.device, ctx.rng):
            for chunk, g in zip(x.reshape(-1, x.shape[-1]).split(ctx.n), grad.reshape(-1, x.shape[-1]).split(ctx.n)):
                chunk = chunk.detach().requires_grad_(ctx.needs_input_grad[0])
                with torch.enable_grad(), _replay_autocast(ctx.autocast):
                    out = ctx.fn(chunk, True)
                torch.autograd.backward(out, g.to(out.dtype))
                grads.append(chunk.grad)
        grad_x = torch.cat(grads).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None
