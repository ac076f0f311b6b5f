"""Measurement helpers shared by the benchmark modules.

* `peak_extra_bytes(fn, device)`: the peak memory one call allocates (CUDA only).
* `host_overhead(call, device)` / `record_host_overhead(benchmark, call, device)`: how host-bound
  an op is: wall time per call ÷ the GPU kernel time per call from torch.profiler (the issue-10 bar:
  each fused op's wall time <= 1.3x its GPU kernel time at the recipe sizes). CUDA only; on a CPU
  there is no GPU kernel time and every figure is None.
"""
from __future__ import annotations

import time

import torch

# The keys `host_overhead` returns (and `record_host_overhead` stores in extra_info).
HOST_OVERHEAD_KEYS = ("host_overhead", "wall_ms", "gpu_kernel_ms", "host_ms", "kernels_per_call",
                      "host_overhead_calls")


def peak_extra_bytes(fn, device) -> int | None:
    """Peak memory one call of `fn` allocates above what was allocated before it (CUDA only;
    None elsewhere). The result of `fn` is dropped before returning."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def device_kernel_time_us(events, device_type=None) -> tuple[float, int]:
    """(total µs, count) of the device-side events of a profiler trace: the GPU kernels, memcpys and
    memsets that `torch.profiler.profile(activities=[ProfilerActivity.CUDA])` recorded
    (`prof.events()`). Each event's own duration is summed (`time_range`), so nested CPU ops never
    count twice; `device_type` defaults to CUDA."""
    if device_type is None:
        device_type = torch.autograd.DeviceType.CUDA
    total, count = 0.0, 0
    for event in events:
        if getattr(event, "device_type", None) != device_type:
            continue
        span = event.time_range
        total += span.end - span.start
        count += 1
    return total, count


def overhead_figures(wall_s: float, host_s: float, gpu_us: float, kernels: int,
                     calls: int) -> dict:
    """Per-call figures from `calls` back-to-back calls: wall and host (issue) time in ms, the
    summed GPU kernel time in ms, kernels per call, and host_overhead = wall / GPU kernel time
    (None when the profiler saw no device work)."""
    wall_ms, host_ms = 1e3 * wall_s / calls, 1e3 * host_s / calls
    gpu_ms = gpu_us / 1e3 / calls
    return {"host_overhead": wall_ms / gpu_ms if gpu_ms > 0 else None,
            "wall_ms": wall_ms, "gpu_kernel_ms": gpu_ms if kernels else None, "host_ms": host_ms,
            "kernels_per_call": kernels / calls, "host_overhead_calls": calls}


def host_overhead(call, device, *, target_s: float = 0.1, min_calls: int = 3,
                  max_calls: int = 30) -> dict:
    """How host-bound `call` is on a CUDA device.

    `call` must NOT synchronise (it is one training-style call: launch and return). After a
    warm-up call, N calls run back to back with one device sync after the last (N sized so the
    loop takes about `target_s`, between `min_calls` and `max_calls`): wall_ms = that time / N,
    host_ms = the time until the last call returned (before the sync) / N. Then the same N calls
    run under torch.profiler (CUDA activity only) and gpu_kernel_ms = the summed duration of the
    device events / N. host_overhead = wall_ms / gpu_kernel_ms: 1.0 means the GPU never waited for
    the host; the bar for a fused op is <= 1.3. Off CUDA every figure is None (no GPU kernel time)."""
    if torch.device(device).type != "cuda":
        return dict.fromkeys(HOST_OVERHEAD_KEYS)
    from torch.profiler import ProfilerActivity

    return _measure(call, torch.cuda.synchronize, ProfilerActivity.CUDA,
                    torch.autograd.DeviceType.CUDA, target_s, min_calls, max_calls)


def _measure(call, synchronize, activity, device_type, target_s, min_calls, max_calls) -> dict:
    """host_overhead's measurement with the device's sync, profiler activity and event type as
    arguments (CUDA in use; the CPU ones let a CPU test run the same code end to end)."""
    from torch.profiler import profile

    call()
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    one = time.perf_counter() - start
    calls = max(min_calls, min(max_calls, int(target_s / max(one, 1e-6))))

    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    issued = time.perf_counter()
    synchronize()
    wall = time.perf_counter() - start

    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            call()
        synchronize()
    device_us, kernels = device_kernel_time_us(prof.events(), device_type)
    return overhead_figures(wall, issued - start, device_us, kernels, calls)


def record_host_overhead(benchmark, call, device) -> dict:
    """`host_overhead(call, device)` into benchmark.extra_info (its keys, see HOST_OVERHEAD_KEYS).
    Measured on CUDA with timing on; with --benchmark-disable, or off CUDA, the keys are None (and
    if the measurement itself fails, `host_overhead_error` says why: the timing is kept)."""
    if getattr(benchmark, "disabled", False):
        figures = dict.fromkeys(HOST_OVERHEAD_KEYS)
    else:
        try:
            figures = host_overhead(call, device)
        except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the timing
            figures = {**dict.fromkeys(HOST_OVERHEAD_KEYS),
                       "host_overhead_error": f"{type(exc).__name__}: {exc}"}
    benchmark.extra_info.update(figures)
    return figures
