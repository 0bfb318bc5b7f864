"""Peak of the bytes a function allocates on the CPU, as the allocator sees them.

torch's profiler with profile_memory reports every CPU allocation and free (the size, in order),
also those made inside a kernel (logsumexp's temporary), and a view allocates nothing, so the
running sum of its records is exactly the memory the function holds at each moment beyond what it
started with. Only allocations made while measuring count: a free of an older tensor is not reported.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

MEMORY_RECORD = "[memory]"


def peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(most bytes held at once while fn ran beyond those at its start, fn's result).
    The result is held until the end, so what it keeps counts."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_RECORD),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak, result
