"""The fault injector: a test tool that makes chosen processes of a run behave like faulty workers.

`MISTRAL_TUNE_FAULTS=1:scale,3:nan@5` makes rank 1 send its gradient times 1e4 and rank 3 send NaN
from step 5 on (kinds: scale, signflip, nan, noise; and oom: the rank runs out of memory on
micro-batches of more than one row, as a smaller GPU would). It exists to prove robust aggregation,
the out-of-memory retry and the outlier reports of train/runtime.py; never set it in a real run.

Production code does not read it: `Runtime.detect` asks `fault_hooks` for this rank's hooks only when
the variable is set, and otherwise the runtime's `gradient_hook` and `model_hook` stay None.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import ConfigError

FAULT_KINDS = ("scale", "signflip", "nan", "noise", "oom")
FAULTS_ENV = "MISTRAL_TUNE_FAULTS"

GradientHook = Callable[[list[torch.Tensor], int], None]  # (this rank's local gradients, step), in place
ModelHook = Callable[[torch.nn.Module], str]  # installs on the model; the line to print


def fault_hooks(text: str, rank: int, world: int) -> tuple[GradientHook | None, ModelHook | None]:
    """This rank's (gradient hook, model hook) for MISTRAL_TUNE_FAULTS=`text`; (None, None) when it names no
    fault. The gradient hook corrupts the gradients from the fault's step on, and exists only on a rank
    whose fault is a gradient kind (the runtime then sends no bucket during backward: the hook needs the
    gradients whole before any is sent). The model hook, on every rank, installs the `oom` fault on the
    rank that has it and returns what is injected, to print."""
    faults = parse_faults(text, world)
    if not faults:
        return None, None
    kind, from_step = faults.get(rank, ("", 0))
    gradient_hook = None
    if kind not in ("", "oom"):
        def gradient_hook(grads: list[torch.Tensor], step: int) -> None:
            if step >= from_step:
                inject_fault(grads, kind, step)

    def model_hook(model: torch.nn.Module) -> str:
        if kind == "oom":
            install_memory_fault(model.model.embed_tokens)
        injected = ", ".join(f"{r} ({k} from step {s})" for r, (k, s) in faults.items())
        return f"{FAULTS_ENV} is set: faults injected on rank(s) {injected}. This is a test tool"

    return gradient_hook, model_hook


def parse_faults(text: str, world: int) -> dict[int, tuple[str, int]]:
    """`1:scale,3:nan@5` -> {1: ('scale', 1), 3: ('nan', 5)}."""
    faults: dict[int, tuple[str, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        rank, _, rest = part.partition(":")
        kind, _, from_step = rest.partition("@")
        if not rank.isdigit() or kind not in FAULT_KINDS or not (from_step or "1").isdigit():
            raise ConfigError(f"{FAULTS_ENV}={text!r}: expected RANK:KIND[@STEP][,...], KIND one of {FAULT_KINDS}")
        if int(rank) >= world:
            raise ConfigError(f"{FAULTS_ENV}={text!r}: rank {rank} but the run has {world} process(es)")
        faults[int(rank)] = (kind, int(from_step or 1))
    return faults


def install_memory_fault(model: torch.nn.Module) -> None:
    """The `oom` fault: training forwards of more than one row raise out-of-memory."""
    def check(module, args) -> None:
        if module.training and args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by MISTRAL_TUNE_FAULTS)")

    model.register_forward_pre_hook(check)


def inject_fault(grads: list[torch.Tensor], kind: str, step: int) -> None:
    """Corrupt this process's gradients in place, as a faulty worker would."""
    with torch.no_grad():
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        numel = sum(g.numel() for g in grads)
        gen = torch.Generator().manual_seed(step)
        for g in grads:
            if kind == "scale":
                g.mul_(1e4)
            elif kind == "signflip":
                g.neg_()
            elif kind == "nan":
                g.fill_(float("nan"))
            else:  # noise: random directions, 100 times the gradient's norm
                noise = torch.randn(g.shape, generator=gen).to(g.device, g.dtype)
                g.copy_(noise * (100 * norm / math.sqrt(numel)))
