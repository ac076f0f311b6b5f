"""bench.measure: the host-overhead figure (wall time per call / GPU kernel time per call) that
the op benchmarks store, tested where a CPU can test it: the aggregation of a profiler trace (a
fake one with CUDA events, and a real CPU trace through the same code), the per-call figures,
the CPU path (every figure None), and the report column. A plain test file (no benchmarks)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from bench.measure import (
    HOST_OVERHEAD_KEYS,
    device_kernel_time_us,
    host_overhead,
    overhead_figures,
    record_host_overhead,
)
from bench.report import render


def event(device_type, start, end, name="k"):
    return SimpleNamespace(name=name, device_type=device_type,
                           time_range=SimpleNamespace(start=start, end=end))


def test_device_time_sums_only_device_events():
    events = [event(DeviceType.CPU, 0, 500, "aten::mm"),        # host op: never counted
              event(DeviceType.CUDA, 10, 40, "gemm"),
              event(DeviceType.CUDA, 40, 45, "Memset (Device)"),
              event(DeviceType.CPU, 3, 4, "cudaLaunchKernel"),
              event(DeviceType.CUDA, 50, 110, "triton_kernel")]
    total, count = device_kernel_time_us(events)
    assert (total, count) == (30 + 5 + 60, 3)
    assert device_kernel_time_us([]) == (0.0, 0)
    assert device_kernel_time_us(events, DeviceType.CPU) == (500 + 1, 2)


def test_a_real_profiler_trace_goes_through_the_same_code():
    """torch.profiler on the CPU: the events have the attributes the aggregation reads, and a
    CPU-only trace has no device time (which is why the CPU path reports None)."""
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a
    events = prof.events()
    assert device_kernel_time_us(events) == (0.0, 0)
    cpu_us, cpu_events = device_kernel_time_us(events, DeviceType.CPU)
    assert cpu_events >= 3 and cpu_us > 0


def test_overhead_figures_per_call():
    # 10 calls: 5 ms wall, 2 ms to issue, 4,000 µs of kernels in 30 launches
    figures = overhead_figures(wall_s=5e-3, host_s=2e-3, gpu_us=4000.0, kernels=30, calls=10)
    assert figures["wall_ms"] == pytest.approx(0.5)
    assert figures["host_ms"] == pytest.approx(0.2)
    assert figures["gpu_kernel_ms"] == pytest.approx(0.4)
    assert figures["host_overhead"] == pytest.approx(1.25)
    assert figures["kernels_per_call"] == 3 and figures["host_overhead_calls"] == 10
    assert set(figures) == set(HOST_OVERHEAD_KEYS)
    empty = overhead_figures(wall_s=1e-3, host_s=1e-3, gpu_us=0.0, kernels=0, calls=4)
    assert empty["host_overhead"] is None and empty["gpu_kernel_ms"] is None


def test_cpu_path_reports_none_without_calling():
    calls = []
    assert host_overhead(lambda: calls.append(1), torch.device("cpu")) == \
        dict.fromkeys(HOST_OVERHEAD_KEYS)
    assert not calls
    bench = SimpleNamespace(extra_info={}, disabled=False)
    record_host_overhead(bench, lambda: calls.append(1), "cpu")
    assert bench.extra_info == dict.fromkeys(HOST_OVERHEAD_KEYS) and not calls
    disabled = SimpleNamespace(extra_info={}, disabled=True)   # --benchmark-disable: not measured
    record_host_overhead(disabled, lambda: calls.append(1), "cuda")
    assert disabled.extra_info["host_overhead"] is None and not calls


def test_report_shows_the_host_overhead_column(tmp_path):
    def bench(variant, median, overhead):
        return {"name": f"test_op[128-{variant}-fwd]", "group": "op", "param": f"128-{variant}-fwd",
                "fullname": f"bench/test_op.py::test_op[128-{variant}-fwd]",
                "stats": {"median": median},
                "extra_info": {"variant": variant, "gpu_kernel_ms": 0.4, "wall_ms": 0.5,
                               "host_overhead": overhead}}
    path = tmp_path / "op.json"
    path.write_text(json.dumps({"machine_info": {"densesim": {"device_name": "GPU"}},
                                "benchmarks": [bench("reference", 2e-3, 3.2),
                                               bench("triton", 5e-4, 1.25)]}))
    text = render([path])
    header = next(line for line in text.splitlines() if line.startswith("| case "))
    columns = [c.strip() for c in header.strip().strip("|").split("|")]
    assert columns[-2:] == ["GPU kernels ms", "wall / GPU"]
    row = next(line for line in text.splitlines() if line.startswith("| test_op[128-triton-fwd]"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[-1] == "1.25" and cells[-2] == "0.4" and cells[2] == "4.00×"
    cpu = tmp_path / "cpu.json"          # None on a CPU: no column at all
    data = json.loads(path.read_text())
    for b in data["benchmarks"]:
        b["extra_info"].update(host_overhead=None, gpu_kernel_ms=None)
    cpu.write_text(json.dumps(data))
    assert "wall / GPU" not in render([cpu])


def test_official_variant_is_a_baseline(tmp_path):
    """bench/test_official_sim.py: the official code's step is a baseline ("vs official")."""
    def bench(variant, median):
        return {"name": f"test_sim_step_vs_official[bf16-{variant}]", "group": "official_sim",
                "param": f"bf16-{variant}",
                "fullname": f"bench/test_official_sim.py::test_sim_step_vs_official[bf16-{variant}]",
                "stats": {"median": median}, "extra_info": {"variant": variant,
                                                             "img_per_s": 128 / median}}
    path = tmp_path / "official.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [
        bench("official", 0.3), bench("reference", 0.2), bench("fused", 0.1)]}))
    text = render([path])
    assert "| case | median | vs reference | vs official |" in text
    row = next(line for line in text.splitlines() if "[bf16-fused]" in line)
    assert "3.00×" in row and "2.00×" in row


def test_a_failing_measurement_keeps_the_benchmark(monkeypatch):
    from bench import measure

    def broken(call, device):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(measure, "host_overhead", broken)
    bench = SimpleNamespace(extra_info={}, disabled=False)
    figures = record_host_overhead(bench, lambda: None, "cuda")
    assert figures["host_overhead"] is None
    assert bench.extra_info["host_overhead_error"] == "RuntimeError: CUPTI unavailable"


def test_the_measurement_loop_end_to_end_on_the_cpu():
    """host_overhead's own loop (calibration, back-to-back wall time, the profiled calls, the
    aggregation) with the CPU's profiler activity in place of CUDA's: the 'device' events are
    then the CPU ops, so the ratio is >= 1 only up to timer noise -- the point is that every
    figure comes out, sized as documented."""
    from torch.profiler import ProfilerActivity

    from bench.measure import _measure

    a = torch.randn(128, 128)
    figures = _measure(lambda: a @ a, lambda: None, ProfilerActivity.CPU, DeviceType.CPU,
                       target_s=0.02, min_calls=3, max_calls=30)
    assert set(figures) == set(HOST_OVERHEAD_KEYS)
    assert 3 <= figures["host_overhead_calls"] <= 30
    assert figures["wall_ms"] > 0 and figures["host_ms"] > 0 and figures["gpu_kernel_ms"] > 0
    assert figures["kernels_per_call"] >= 1
    assert figures["host_overhead"] == pytest.approx(figures["wall_ms"] / figures["gpu_kernel_ms"])
