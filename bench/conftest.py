"""Shared pytest-benchmark setup for bench/ (kept generic: every benchmark module can use it).

* The environment (device name, torch / triton / CUDA versions, git commit, date, ...) goes into the
  JSON's ``machine_info["densesim"]`` (``pytest_benchmark_update_machine_info``) and, for every test
  that uses the ``benchmark`` fixture, into ``benchmark.extra_info["env"]``.
* The device's two ceilings (``device_ceilings``: copy bandwidth and matmul rate, measured once per
  session) go into every benchmark's ``extra_info["ceilings"]`` and into
  ``machine_info["densesim"]["ceilings"]``, so each figure in a result file can be read as a
  fraction of the floor measured in the same run.
* Fixtures: ``bench_device`` (cuda if available, else cpu), ``sync`` (a callable to call at the end
  of the timed function: ``torch.cuda.synchronize`` on CUDA, a no-op on CPU), and ``record_rate``
  (stores ``items / mean seconds`` under a key of ``benchmark.extra_info``).

Run ``pytest bench/ --benchmark-only`` for timings; ``pytest bench/ --benchmark-disable`` runs each
benchmark body once as a plain test.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from importlib import metadata

import pytest
import torch


def _version(dist: str):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def env_info() -> dict:
    cuda = torch.cuda.is_available()
    info = {
        "device_type": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
    }
    if info["git_commit"] is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = bool(status) if status is not None else None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["device_capability"] = f"{props.major}.{props.minor}"
    return info


# The ceilings measured in this session (filled by the device_ceilings fixture), for machine_info.
_MEASURED_CEILINGS: dict = {}


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    # Called when the JSON is written, after the benchmarks: the ceilings are known by then.
    machine_info["densesim"] = {**env_info(), "ceilings": dict(_MEASURED_CEILINGS) or None}


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@pytest.fixture(autouse=True)
def _benchmark_env(request):
    """Attach the environment and the device ceilings to every benchmark's extra_info (no-op for
    tests without a benchmark), and the host's 1-minute load average at the start and the end of
    the test (above the CPU count, other work shared the CPU: CPU timings are then noisy)."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    extra_info = request.getfixturevalue("benchmark").extra_info
    extra_info["env"] = env_info()
    extra_info["ceilings"] = dict(request.getfixturevalue("device_ceilings"))
    started = _load_average()
    yield
    extra_info["load_avg_1m"] = [started, _load_average()]


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def sync(bench_device):
    """Call at the end of a timed function so that CUDA work is inside the measurement."""
    if bench_device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@pytest.fixture
def record_rate(benchmark):
    """``record_rate(items, key)``: store items / mean seconds per call in extra_info[key].

    With ``--benchmark-disable`` there are no timings and the key is set to None.
    """

    def record(items: float, key: str):
        stats = getattr(benchmark, "stats", None)
        mean = stats.stats.mean if stats is not None else None
        benchmark.extra_info[key] = items / mean if mean else None
        return benchmark.extra_info[key]

    return record


@pytest.fixture(scope="session")
def device_ceilings(bench_device) -> dict:
    """The device's two ceilings, measured once per session on this machine:
    ``copy_gbps`` (a large device-to-device copy, bytes read + written per second) and
    ``matmul_tflops`` (a large bf16 matmul on CUDA, fp32 on CPU). Every benchmark reports its
    figure as a fraction of these (bytes it must move / copy_gbps, FLOPs / matmul_tflops).
    Best of several repeats: on CUDA a 1 GiB copy and an 8192² matmul; on CPU a 64 MiB copy and
    a 2048² matmul (1024² reaches only about half of a 2-core machine's rate)."""

    def best_of(fn, repeats):
        fn()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if bench_device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    cuda = bench_device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (1 << 26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=bench_device).uniform_()
    dst = torch.empty_like(src)
    copy_s = best_of(lambda: dst.copy_(src), 10)
    size = 8192 if cuda else 2048
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=bench_device, dtype=dtype)
    b = torch.randn(size, size, device=bench_device, dtype=dtype)
    mm_s = best_of(lambda: a @ b, 10 if cuda else 5)
    ceilings = {"copy_gbps": 2 * n_bytes / copy_s / 1e9,
                "matmul_tflops": 2 * size ** 3 / mm_s / 1e12,
                "matmul_dtype": str(dtype).removeprefix("torch."),
                "copy_bytes": n_bytes, "matmul_size": size,
                "device": env_info()["device_name"]}
    _MEASURED_CEILINGS.update(ceilings)
    return ceilings
