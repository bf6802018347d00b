"""Peak memory of a call, from torch's own allocator events (what the measurements in tests and bench/ use)."""
from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Largest live-bytes total of the torch CPU allocations made while ``fn()`` runs, counted from zero at the call
    (torch.profiler memory events replayed in time order; frees of older tensors count as negative).

    tracemalloc does not see torch's allocator and the process RSS includes everything else, so this is the
    measure for "how much does this call add"."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
