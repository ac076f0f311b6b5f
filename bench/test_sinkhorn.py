"""Benchmarks: sinkhorn (DENSE.md K5, SwAV's distributed_sinkhorn) at SwAV's sizes.

SwAV (DENSE.md section 5, per-step tensors; spec/OFFICIAL.md section 4): K = 3000 prototypes,
eps = 0.05, 3 iterations, one call per assigned crop (2 per step). Rows per GPU: R = 64 (the
4096-batch recipe, 64 images per GPU, no queue), R = 1,024 (the bs-256 recipe on 4 GPUs: 960 queue
rows + 64) and R = 4,096 (that recipe on one GPU: the 3,840-row queue + 256). Scores are cosines
(normalised embeddings against normalised prototypes, D = 128), in fp32 and bf16 (an autocast
matmul's output). Variants: `official` (SwAV's formula, exp(scores / eps) without a max shift, in
fp32, eager), `reference` (sinkhorn_reference: the log-domain torch definition, eager),
`compiled` (torch.compile of the reference; CUDA only) and `triton` (the fused kernel: one launch
while R K <= 2^18 and K <= 4096, else 2 * iterations launches; CUDA only). Single process (no
all-reduce). CUDA synchronised inside the timed function.

GPU goal: the op is latency-bound (~10 R K FLOPs per pass; 1.5 MB to 49 MB of bytes): triton
at least 3x the eager reference at R = 64 (one launch instead of ~30) and no slower than
compiled at every size.

extra_info: sizes, dtype, variant; op_bytes = what must cross HBM: the scores read once and Q
(fp32) written once, R K (e + 4); pass_bytes = what the kernels stream (the scores iterations + 1
times, from L2 at these sizes, and Q written); achieved gbps; floor_s = op_bytes / copy ceiling and
roofline_fraction = floor_s / measured time; launches (the Triton path's kernel launches per call);
on CUDA peak_extra_bytes (one call's max_memory_allocated above what was allocated before) and the
host overhead (`bench.measure.record_host_overhead`). On CPU only `official` and `reference` run,
at R = 64, K = 3000 (`pytest --benchmark-disable` stays within a second); the larger R, compiled
and triton skip with the reason, as in the other benchmark files.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from bench.measure import peak_extra_bytes, record_host_overhead
from kernels import sinkhorn, sinkhorn_reference

KEYS, DIM, EPSILON, ITERATIONS = 3000, 128, 0.05, 3
ROWS = (64, 1024, 4096)
CPU_ROWS = 64
VARIANTS = ("official", "reference", "compiled", "triton")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_COMPILED = {}
_sk = importlib.import_module("kernels.sinkhorn")


def _skip_unless_runnable(variant, rows, device):
    if device.type != "cuda" and rows != CPU_ROWS:
        pytest.skip(f"on CPU only R = {CPU_ROWS} runs (the larger sizes are GPU figures)")
    if device.type != "cuda" and variant == "compiled":
        pytest.skip("torch.compile timings are only measured on a GPU "
                    "(cold compile costs ~20 s per graph on CPU)")
    if device.type != "cuda" and variant == "triton":
        pytest.skip("the Triton kernels run compiled only on a CUDA device")


def official_sinkhorn(scores, epsilon=EPSILON, iterations=ITERATIONS):
    """SwAV's distributed_sinkhorn on one process, as released (fp32, no max shift)."""
    with torch.no_grad():
        q = torch.exp(scores.float() / epsilon).t()
        batch, keys = q.shape[1], q.shape[0]
        q /= torch.sum(q)
        for _ in range(iterations):
            q /= torch.sum(q, dim=1, keepdim=True)
            q /= keys
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= batch
        q *= batch
        return q.t()


def _codes_fn(variant):
    if variant == "official":
        return official_sinkhorn
    if variant == "reference":
        return lambda s: sinkhorn_reference(s, EPSILON, ITERATIONS)
    if variant == "compiled":
        if "reference" not in _COMPILED:
            _COMPILED["reference"] = torch.compile(sinkhorn_reference)
        compiled = _COMPILED["reference"]
        return lambda s: compiled(s, EPSILON, ITERATIONS)
    return lambda s: sinkhorn(s, EPSILON, ITERATIONS, backend="triton")


def _scores(rows, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    z = F.normalize(torch.randn(rows, DIM, generator=g, device=device), dim=1)
    prototypes = F.normalize(torch.randn(KEYS, DIM, generator=g, device=device), dim=1)
    return (z.to(dtype) @ prototypes.to(dtype).t()).contiguous()


@pytest.mark.benchmark(group="sinkhorn")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("rows", ROWS)
def test_sinkhorn(benchmark, record_rate, device_ceilings, bench_device, sync, rows, dtype_name,
                  variant):
    _skip_unless_runnable(variant, rows, bench_device)
    dtype = DTYPES[dtype_name]
    scores = _scores(rows, dtype, bench_device)
    codes_fn = _codes_fn(variant)

    def call():
        q = codes_fn(scores)
        sync()
        return q

    call()  # warm-up: compile, launch caches, allocator
    peak = peak_extra_bytes(call, bench_device)
    q = benchmark(call)

    # correctness at the benchmark size, against the eager log-domain reference (fp32)
    expected = sinkhorn_reference(scores, EPSILON, ITERATIONS)
    assert q.shape == (rows, KEYS) and q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(q.sum(dim=1), torch.ones_like(q[:, 0]), rtol=0, atol=1e-5)

    element = scores.element_size()
    op_bytes = rows * KEYS * (element + 4)
    launches = None
    if variant == "triton":
        launches = 1 if _sk._launch_plan(scores)["fused"] else 2 * ITERATIONS
    benchmark.extra_info.update(
        rows=rows, keys=KEYS, epsilon=EPSILON, iterations=ITERATIONS, dtype=dtype_name,
        variant=variant, device=str(bench_device), op_bytes=op_bytes,
        pass_bytes=rows * KEYS * ((ITERATIONS + 1) * element + 4), launches=launches,
        peak_extra_bytes=peak)
    record_rate(op_bytes / 1e9, "gbps")
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    floor_s = op_bytes / (device_ceilings["copy_gbps"] * 1e9)
    benchmark.extra_info["floor_s"] = floor_s
    benchmark.extra_info["roofline_fraction"] = floor_s / mean if mean else None
    benchmark.extra_info["ceilings"] = device_ceilings
    record_host_overhead(benchmark, lambda: codes_fn(scores), bench_device)
