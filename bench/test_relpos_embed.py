"""Benchmarks: SIM's predictor queries = mask_token + Linear(relpos_embed(geometry)) at the recipe size.

Recipe (ViT-B/16, 224 px): G=14 (196 queries per sample), D = decoder_dim = 768, so the relative
sin-cos table is 1536 wide and the Linear is a (768, 1536) bf16 weight (SIM runs under bf16 autocast;
here the parameters are bf16 directly). Per-GPU batch B=128 and 256.

Variants:
  reference  relpos_embed_reference -> .to(bf16) -> F.linear(+bias) -> + mask token (the model today)
  compiled   torch.compile of that reference (CUDA only)
  triton     the fused relpos_query_embed (CUDA only): (B, 2G+1, D) small products + a broadcast
             writer; the (B, 196, 1536) table is never materialised
Modes: `fwd` and `fwd_bwd` (gradients for weight, bias and mask token; rel gets none).
On CPU only the reference runs, at B=2, so `pytest bench --benchmark-disable` stays fast.

extra_info: sizes, dtype, variant, mode; bytes the op must move (the bf16 (B,196,768) output written,
plus grad_out read once for fwd_bwd); FLOPs of the reference GEMM (2*B*196*1536*768 per pass) and of
the fused decomposition (2*768*(2*B*14*384 + B*768) per pass); achieved GB/s and the fraction of the
copy floor (bytes / copy_gbps over the measured time); the reference GEMM's TFLOP/s and its fraction
of the matmul ceiling; the speed-up over the eager reference (timed in the same test, CUDA only); the
peak-memory delta of one call (CUDA only); the host overhead (`bench.measure.record_host_overhead`:
host_overhead = wall time per call / GPU kernel time per call from torch.profiler, with wall_ms,
gpu_kernel_ms, host_ms, kernels_per_call; CUDA only). Timing-derived figures are None with
--benchmark-disable.
"""
import importlib
import time

import pytest
import torch
import torch.nn.functional as F

from bench.measure import peak_extra_bytes, record_host_overhead

rk = importlib.import_module("kernels.relpos_embed")  # the package's `relpos_embed` is the function

CUDA = torch.cuda.is_available()
GRID, DIM = 14, 768
CELLS = GRID * GRID
DTYPE = torch.bfloat16
CPU_BATCH = 2


def _reference_queries(rel, weight, bias, mask_token):
    """What engine/methods/sim.py does today: the fp32 table, cast, Linear, plus the mask token."""
    table = rk.relpos_embed_reference(rel, GRID, DIM)
    return mask_token + F.linear(table.to(weight.dtype), weight, bias)


def _triton_queries(rel, weight, bias, mask_token):
    return rk.relpos_query_embed(rel, GRID, weight, bias, mask_token, backend="triton")


_COMPILED = {}


def _compiled_queries(rel, weight, bias, mask_token):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_reference_queries)
    return _COMPILED["fn"](rel, weight, bias, mask_token)


VARIANTS = {"reference": _reference_queries, "compiled": _compiled_queries, "triton": _triton_queries}


def _inputs(batch, device):
    g = torch.Generator().manual_seed(batch)
    rel = torch.empty(batch, 6, dtype=torch.float64)
    rel[:, 0:2] = torch.rand(batch, 2, generator=g, dtype=torch.float64) * 1.6 - 0.8
    rel[:, 2:4] = torch.exp(torch.rand(batch, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    rel[:, 4] = (torch.rand(batch, generator=g) < 0.5).double()
    rel[:, 5] = torch.rand(batch, generator=g, dtype=torch.float64) * 2.0 - 0.5
    weight = torch.randn(DIM, 2 * DIM, generator=g) / (2 * DIM) ** 0.5
    bias = torch.randn(DIM, generator=g) * 0.02
    mask_token = torch.randn(1, 1, DIM, generator=g) * 0.02
    grad_out = torch.randn(batch, CELLS, DIM, generator=g)
    params = [t.to(device=device, dtype=DTYPE).requires_grad_() for t in (weight, bias, mask_token)]
    return rel.to(device=device, dtype=torch.float32), params, grad_out.to(device=device, dtype=DTYPE)


def _expected(rel, params, grad_out):
    """fp32 queries and parameter gradients from the materialised table (the check, not timed)."""
    weight, bias, mask_token = [p.detach().float() for p in params]
    table = rk.relpos_embed_reference(rel, GRID, DIM).reshape(-1, 2 * DIM)
    queries = mask_token.reshape(-1) + table @ weight.t() + bias
    grads = grad_out.float().reshape(-1, DIM)
    grad_weight = grads.t() @ table
    grad_bias = grads.sum(0)
    return queries.reshape(-1, CELLS, DIM), [grad_weight, grad_bias, grad_bias.reshape(1, 1, DIM)]


def _assert_close_rel(actual, expected, frac):
    err = float((actual.detach().float() - expected).abs().max())
    assert err <= frac * float(expected.abs().max()), (err, float(expected.abs().max()))


def _cuda_mean_seconds(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@pytest.mark.benchmark(group="relpos_query_embed")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("batch", [128, 256])
def test_relpos_query_embed(benchmark, bench_device, sync, device_ceilings, batch, variant, mode):
    if variant == "compiled" and not CUDA:
        pytest.skip("torch.compile timings are only measured on a GPU (cold compile costs ~20 s per "
                    "graph on CPU)")
    if variant == "triton" and not CUDA:
        pytest.skip("the Triton kernels run compiled only on a CUDA device")
    if not CUDA and batch != 128:
        pytest.skip("on CPU the reference runs once, at a reduced batch")
    used_batch = batch if CUDA else CPU_BATCH
    rel, params, grad_out = _inputs(used_batch, bench_device)
    fn = VARIANTS[variant]

    def forward():
        return fn(rel, *params)

    def forward_backward():
        for p in params:
            p.grad = None
        queries = fn(rel, *params)
        queries.backward(grad_out)
        return queries

    call = forward if mode == "fwd" else forward_backward

    def run():
        queries = call()
        sync()
        return queries

    run()  # warm-up: compile / autotune / allocator
    peak_memory = peak_extra_bytes(run, rel.device)
    queries = benchmark(run)

    expected, expected_grads = _expected(rel, params, grad_out)
    assert queries.shape == (used_batch, CELLS, DIM) and queries.dtype == DTYPE
    _assert_close_rel(queries, expected, 2e-2)
    if mode == "fwd_bwd":
        for p, want in zip(params, expected_grads):
            assert p.grad is not None and p.grad.shape == want.shape
            _assert_close_rel(p.grad, want, 2e-2)

    passes = 1 if mode == "fwd" else 2
    bytes_output = used_batch * CELLS * DIM * DTYPE.itemsize
    bytes_moved = bytes_output * passes  # fwd: write the queries; bwd: read grad_out once
    flops_reference = 2 * used_batch * CELLS * (2 * DIM) * DIM * passes
    flops_fused = 2 * DIM * (2 * used_batch * GRID * (DIM // 2) + used_batch * DIM) * passes
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    speedup = None
    if mean and CUDA and variant != "reference":
        reference_run = lambda: (_reference_queries(rel, *params).backward(grad_out) if mode == "fwd_bwd"
                                 else _reference_queries(rel, *params))  # noqa: E731
        speedup = _cuda_mean_seconds(reference_run) / mean
        for p in params:
            p.grad = None
    benchmark.extra_info.update(
        batch=used_batch, grid=GRID, cells=CELLS, dim=DIM, table_width=2 * DIM, weight_shape=[DIM, 2 * DIM],
        dtype=str(DTYPE).removeprefix("torch."), variant=variant, mode=mode, device=str(bench_device),
        bytes_output=bytes_output, bytes_moved=bytes_moved,
        flops_reference_gemm=flops_reference, flops_fused_decomposition=flops_fused,
        flops_ratio_reference_over_fused=flops_reference / flops_fused,
        achieved_gbps=bytes_moved / mean / 1e9 if mean else None,
        fraction_of_copy_floor=(bytes_moved / (device_ceilings["copy_gbps"] * 1e9)) / mean if mean else None,
        reference_gemm_tflops=flops_reference / mean / 1e12 if mean else None,
        fraction_of_matmul_floor=(flops_reference / (device_ceilings["matmul_tflops"] * 1e12)) / mean
        if mean else None,
        speedup_vs_reference=speedup,
        peak_memory_bytes=peak_memory,
    )
    record_host_overhead(benchmark, call, bench_device)


@pytest.mark.benchmark(group="relpos_embed_table")
@pytest.mark.parametrize("variant", ["reference", "compiled", "triton"])
def test_relpos_embed_table(benchmark, bench_device, sync, device_ceilings, variant):
    """The stand-alone (B, 196, 1536) fp32 table at B=128 (write-bound: 154 MB)."""
    if variant == "compiled" and not CUDA:
        pytest.skip("torch.compile timings are only measured on a GPU (cold compile costs ~20 s per "
                    "graph on CPU)")
    if variant == "triton" and not CUDA:
        pytest.skip("the Triton kernels run compiled only on a CUDA device")
    used_batch = 128 if CUDA else CPU_BATCH
    rel, _, _ = _inputs(used_batch, bench_device)
    if variant == "reference":
        fn = lambda: rk.relpos_embed_reference(rel, GRID, DIM)  # noqa: E731
    elif variant == "compiled":
        compiled = torch.compile(rk.relpos_embed_reference)
        fn = lambda: compiled(rel, GRID, DIM)  # noqa: E731
    else:
        fn = lambda: rk.relpos_embed(rel, GRID, DIM, backend="triton")  # noqa: E731

    def run():
        table = fn()
        sync()
        return table

    run()
    table = benchmark(run)
    assert table.shape == (used_batch, CELLS, 2 * DIM) and table.dtype == torch.float32
    torch.testing.assert_close(table, rk.relpos_embed_reference(rel, GRID, DIM), rtol=0, atol=5e-5)
    bytes_moved = used_batch * CELLS * 2 * DIM * 4
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    benchmark.extra_info.update(
        batch=used_batch, grid=GRID, dim=DIM, table_width=2 * DIM, dtype="float32", variant=variant,
        device=str(bench_device), bytes_moved=bytes_moved,
        sincos_evaluations=2 * used_batch * CELLS * DIM // 2,
        achieved_gbps=bytes_moved / mean / 1e9 if mean else None,
        fraction_of_copy_floor=(bytes_moved / (device_ceilings["copy_gbps"] * 1e9)) / mean if mean else None)
    record_host_overhead(benchmark, fn, bench_device)
