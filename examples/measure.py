"""Time and peak memory of one call, on CUDA or on the CPU, for the examples and benchmarks.

``median_time(fn, device, warmup, reps)``: median wall time in seconds (CUDA-synchronised);
``timed_calls(fn, device, reps)``: the time of each call.
``peak_memory(fn, device)``: bytes allocated by tensors at the peak of one call of ``fn``
above what was live before it. CUDA: ``torch.cuda.max_memory_allocated``. CPU: PyTorch
keeps no allocator statistics there, so the call runs once under the profiler's memory
timeline (tensor allocations and frees, in order) and the peak is summed from it; it
returns None when the profiler cannot give a timeline (an older or newer PyTorch).
"""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds per call of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(timed_calls(fn, device, reps))


def timed_calls(fn, device, reps: int) -> list[float]:
    """Seconds taken by each of ``reps`` calls of ``fn()``, the device synchronised after each."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory(fn, device) -> int | None:
    """Peak bytes of tensors allocated during one call of ``fn()``, above those live before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return _cpu_peak_from_profiler(fn)


def _cpu_peak_from_profiler(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    try:                                                       # private API: the memory timeline
        timeline = prof._memory_profile().timeline             # [(time, action, (key, version), bytes)]
    except Exception:                                          # noqa: BLE001 - report "unknown", not a crash
        return None
    live = peak = 0
    for _, action, (key, _version), size in sorted(timeline, key=lambda e: e[0]):
        if key.device.type != "cpu":
            continue
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            live += size
        elif name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
