"""Out of memory on the accelerator: a report with figures and fixes, and the smaller micro-batch to retry with."""

from __future__ import annotations

import gc
import os
import resource

import torch

# torch >= 2.5 names it torch.OutOfMemoryError; older releases only torch.cuda.OutOfMemoryError.
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def smaller_micro_batch(micro_batch_size: int, accumulation: int) -> tuple[int, int] | None:
    """(micro_batch_size, gradient_accumulation_steps) with at most half the rows per micro-batch and
    the same rows per optimizer step, or None at 1. Halves when it can (4 -> 2 x 2); an odd size
    drops to its largest proper divisor (6 -> 3, 3 -> 1) so the effective batch never changes."""
    if micro_batch_size <= 1:
        return None
    smaller = max(d for d in range(1, micro_batch_size // 2 + 1) if micro_batch_size % d == 0)
    return smaller, accumulation * (micro_batch_size // smaller)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_figures(device: torch.device) -> tuple[float, float]:
    """(peak bytes this process used on the device, the device's total bytes)."""
    if device.type == "cuda":
        return (float(torch.cuda.max_memory_allocated(device)),
                float(torch.cuda.get_device_properties(device).total_memory))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # kB on Linux
    return peak, float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def oom_advice(device: torch.device, micro_batch_size: int, accumulation: int, sequence_len: int,
               gradient_checkpointing: bool, adapter: str, step: int) -> str:
    """One message: where it happened, peak and total memory, and config changes that use less."""
    peak, total = memory_figures(device)
    gib = 1024**3
    fixes = []
    smaller = smaller_micro_batch(micro_batch_size, accumulation)
    if smaller:
        fixes.append(f"micro_batch_size: {smaller[0]} with gradient_accumulation_steps: {smaller[1]} "
                     "(same effective batch; or auto_micro_batch: true to find it)")
    if not gradient_checkpointing:
        fixes.append("gradient_checkpointing: true (recompute activations in backward)")
    if adapter == "none":
        fixes.append("adapter: lora (trains ~1% of the weights; no full-size gradients or optimizer state)")
    elif adapter == "lora":
        fixes.append("adapter: qlora (the frozen base in 4-bit NF4: about a quarter of its bf16 memory)")
    if sequence_len >= 32:  # the config's floor is 16
        fixes.append(f"sequence_len: {sequence_len // 2} (activations grow with it)")
    return (f"out of memory on {device} at optimizer step {step + 1} with micro_batch_size {micro_batch_size} x "
            f"gradient_accumulation_steps {accumulation}, sequence_len {sequence_len}: peak {peak / gib:.2f} GiB "
            f"of {total / gib:.2f} GiB. To fit, try: " + "; ".join(fixes))
