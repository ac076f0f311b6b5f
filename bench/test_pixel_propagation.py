"""Benchmarks: pixel_propagation (PixPro's pixel propagation module core, DENSE.md K4).

The question this file answers from one GPU run: is the fused op faster than eager PyTorch at
PixPro's recipe size, where it is launch-bound (B = 128 per GPU, 7x7 C5 map -> N = 49 tokens,
C = Cv = 256, gamma = 2)? And how do the three compare where the (B, N, N) matrices grow (N = 196
and 784: 14x14 and 28x28 maps, B = 128)? bf16 (PixPro trains under AMP) and fp32 inputs.

Variants: `reference` (eager pixel_propagation_reference: normalize, bmm, clamp, pow, bmm in fp32),
`compiled` (torch.compile of that reference; CUDA only) and `triton` (the registered op: 1 forward
+ 1 backward launch; CUDA only). Modes: `fwd_bwd` (forward + torch.autograd.grad to x and value
with a fixed random dy -- the decision's number) at every size, `fwd` (a training forward: inputs
require grad) at N = 49. CUDA work is synchronised inside the timed function.

extra_info: sizes, dtype, variant, mode; op_flops (forward 2 B N² (C + Cv); fwd_bwd three times
that, the minimal backward being twice the forward); op_bytes (forward: read x, value, write y;
backward: read x, value, dy, write dx, dvalue); achieved gbps / tflops; floor_s = max(op_bytes /
copy ceiling, op_flops / matmul ceiling) and roofline_fraction = floor_s / measured mean. On CUDA:
peak_extra_bytes (one call's torch.cuda.max_memory_allocated above what was allocated before),
similarity_matrix_bytes_fp32 (one (B, N, N) fp32 matrix, for scale), cuda_kernels_per_call (from
torch.profiler), and, when timing is on, speedup_vs_eager = eager median / this variant's median,
both timed back to back in the same test (eager_ms, variant_ms) -- so `-k triton` alone still
answers the question; the host overhead (`bench.measure.record_host_overhead`: host_overhead = wall
time per call / GPU kernel time per call from torch.profiler, with wall_ms, gpu_kernel_ms, host_ms,
kernels_per_call). On CPU only the reference runs, at B = 2 (B = 1 at N = 784), so
`pytest bench --benchmark-disable` stays within seconds; compiled and triton skip with the reason.
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from bench.measure import peak_extra_bytes, record_host_overhead
from kernels import pixel_propagation, pixel_propagation_reference

CHANNELS = VALUE_CHANNELS = 256   # PixPro's projector output and value transform
GAMMA = 2.0                       # pixpro_p
CUDA_BATCH = 128                  # PixPro: 8 GPUs x 128 images
CASES = [(49, "fwd"), (49, "fwd_bwd"), (196, "fwd_bwd"), (784, "fwd_bwd")]  # (tokens, mode)
VARIANTS = ("reference", "compiled", "triton")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_COMPILED = {}


def _skip_unless_runnable(variant, device):
    if device.type != "cuda" and variant == "compiled":
        pytest.skip("torch.compile timings are only measured on a GPU "
                    "(cold compile costs ~20 s per graph on CPU)")
    if device.type != "cuda" and variant == "triton":
        pytest.skip("the Triton kernels run compiled only on a CUDA device")


def _propagation_fn(variant):
    if variant == "reference":
        return pixel_propagation_reference
    if variant == "compiled":
        if "reference" not in _COMPILED:
            _COMPILED["reference"] = torch.compile(pixel_propagation_reference)
        return _COMPILED["reference"]
    return lambda x, value, gamma: pixel_propagation(x, value, gamma, backend="triton")


def _data(batch, tokens, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, tokens, CHANNELS, generator=g, device=device)                # projector output
    value = F.normalize(torch.randn(batch, tokens, VALUE_CHANNELS, generator=g, device=device), dim=-1)
    grad_y = torch.randn(batch, tokens, VALUE_CHANNELS, generator=g, device=device) / tokens
    return x.to(dtype).requires_grad_(), value.to(dtype).requires_grad_(), grad_y.to(dtype)


def _runner(fn, x, value, grad_y, mode, sync):
    """One call (forward, or forward + gradients) followed by `sync()`; sync=None: no sync."""
    def forward():
        return fn(x, value, GAMMA).detach(), None, None

    def forward_backward():
        y = fn(x, value, GAMMA)
        grad_x, grad_value = torch.autograd.grad(y, (x, value), grad_y)
        return y.detach(), grad_x, grad_value

    call = forward if mode == "fwd" else forward_backward
    if sync is None:
        return call

    def run():
        out = call()
        sync()
        return out

    return run


def _median_ms(run, repeats=25):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _cuda_kernels_per_call(run):
    """Kernels one call launches on the GPU (torch.profiler; None where it cannot tell)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        events = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        return len(events) or None
    except Exception:  # pragma: no cover - profiler availability depends on the build
        return None


def _record(benchmark, record_rate, device_ceilings, op_bytes, op_flops, **info):
    benchmark.extra_info.update(op_bytes=op_bytes, op_flops=op_flops, **info)
    record_rate(op_bytes / 1e9, "gbps")
    record_rate(op_flops / 1e12, "tflops")
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    floor_s = max(op_bytes / (device_ceilings["copy_gbps"] * 1e9),
                  op_flops / (device_ceilings["matmul_tflops"] * 1e12))
    benchmark.extra_info["floor_s"] = floor_s
    benchmark.extra_info["roofline_fraction"] = floor_s / mean if mean else None


@pytest.mark.benchmark(group="pixel_propagation")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens,mode", CASES, ids=[f"n{n}-{m}" for n, m in CASES])
def test_pixel_propagation(benchmark, record_rate, device_ceilings, bench_device, sync, tokens, mode,
                           dtype_name, variant):
    _skip_unless_runnable(variant, bench_device)
    cuda = bench_device.type == "cuda"
    dtype = DTYPES[dtype_name]
    batch = CUDA_BATCH if cuda else (2 if tokens < 784 else 1)
    x, value, grad_y = _data(batch, tokens, dtype, bench_device)
    run = _runner(_propagation_fn(variant), x, value, grad_y, mode, sync)

    run()  # warm-up: compile, Triton JIT, allocator
    peak = peak_extra_bytes(run, bench_device)
    y, grad_x, grad_value = benchmark(run)

    # the same answer as the eager reference at the benchmark size
    assert y.shape == (batch, tokens, VALUE_CHANNELS) and y.dtype == dtype and torch.isfinite(y).all()
    if variant != "reference":
        expected = _runner(pixel_propagation_reference, x, value, grad_y, mode, sync)()
        rtol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        for got, want in zip((y, grad_x, grad_value), expected):
            if want is not None:
                assert got.dtype == want.dtype
                assert (got.float() - want.float()).abs().max() <= rtol * want.float().abs().max()

    speedup = 1.0 if variant == "reference" else None
    eager_ms = variant_ms = kernels = None
    if cuda:
        kernels = _cuda_kernels_per_call(run)
        if variant != "reference" and not getattr(benchmark, "disabled", False):
            eager = _runner(pixel_propagation_reference, x, value, grad_y, mode, sync)
            eager_ms, variant_ms = _median_ms(eager), _median_ms(run)
            speedup = eager_ms / variant_ms
    if variant == "triton" and peak is not None:
        # no (B, N, N) matrix: only the outputs y (and dx, dvalue) are allocated
        outputs = (1 if mode == "fwd" else 3) * batch * tokens * CHANNELS * x.element_size()
        assert peak <= outputs + (1 << 20), f"peak extra memory {peak} B"

    element = x.element_size()
    tensor_bytes = batch * tokens * CHANNELS * element
    forward_flops = 2 * batch * tokens * tokens * (CHANNELS + VALUE_CHANNELS)
    _record(benchmark, record_rate, device_ceilings,
            op_bytes=(3 if mode == "fwd" else 8) * tensor_bytes,
            op_flops=(1 if mode == "fwd" else 3) * forward_flops,
            op="pixel_propagation", variant=variant, mode=mode, dtype=dtype_name, device=str(bench_device),
            batch=batch, tokens=tokens, channels=CHANNELS, value_channels=VALUE_CHANNELS, gamma=GAMMA,
            peak_extra_bytes=peak, similarity_matrix_bytes_fp32=4 * batch * tokens * tokens,
            cuda_kernels_per_call=kernels, eager_ms=eager_ms, variant_ms=variant_ms,
            speedup_vs_eager=speedup)
    record_host_overhead(benchmark, _runner(_propagation_fn(variant), x, value, grad_y, mode, None),
                         bench_device)
