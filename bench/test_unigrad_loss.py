"""Benchmarks: unigrad_loss (SIM's dense UniGrad) and unigrad_covariance at the recipe size.

Recipe: ViT-B/16 at 224 px, 196 target tokens per image, C = 768, per-GPU batch 128 and 256
(R = 25,088 / 50,176 rows), bf16 and fp32 inputs, lambda = 0.02, target LayerNorm on.
Variants: `reference` (eager PyTorch, true fp32 matmuls), `compiled` (torch.compile of the
reference; CUDA only), `triton` (the fused kernels; CUDA only). Modes: `fwd` (a training forward:
pred requires grad, so the Triton path also writes its saved gradient) and `fwd_bwd` (forward +
backward to pred.grad).

extra_info: sizes (batch, tokens, channels, rows) actually used, dtype, variant, mode;
op_bytes (read P and T once, write dL/dP) and op_flops (the two R x C x C GEMMs, F = T^T T / R and
Q = P F); achieved gbps / tflops; roofline_fraction = max(op_bytes / copy ceiling,
op_flops / matmul ceiling) / measured time (None with --benchmark-disable); on CUDA the peak extra
memory of one call (torch.cuda.max_memory_allocated minus what was allocated before) and its ratio
to size(P) + size(T); and the host overhead (`bench.measure.record_host_overhead`: host_overhead =
wall time per call / GPU kernel time per call from torch.profiler, with wall_ms, gpu_kernel_ms,
host_ms, kernels_per_call; None off CUDA). On CPU only the reference runs, at batch 2, so
`pytest --benchmark-disable` stays fast.
"""
import pytest
import torch

from bench.measure import peak_extra_bytes, record_host_overhead

from kernels import unigrad_covariance, unigrad_loss, unigrad_loss_reference

TOKENS, CHANNELS, NEG_WEIGHT = 196, 768, 0.02
CPU_BATCH = 2
VARIANTS = ("reference", "compiled", "triton")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_COMPILED = {}


def _skip_unless_runnable(variant, device):
    if device.type != "cuda" and variant == "compiled":
        pytest.skip("torch.compile timings are only measured on a GPU "
                    "(cold compile costs ~20 s per graph on CPU)")
    if device.type != "cuda" and variant == "triton":
        pytest.skip("the Triton kernels run compiled only on a CUDA device")


def _loss_fn(variant):
    if variant == "reference":
        return lambda p, t: unigrad_loss_reference(p, t, neg_weight=NEG_WEIGHT)
    if variant == "compiled":
        if "loss" not in _COMPILED:
            _COMPILED["loss"] = torch.compile(unigrad_loss_reference)
        compiled = _COMPILED["loss"]
        return lambda p, t: compiled(p, t, neg_weight=NEG_WEIGHT)
    return lambda p, t: unigrad_loss(p, t, neg_weight=NEG_WEIGHT, backend="triton")


def _covariance_fn(variant):
    if variant == "reference":
        return lambda t: unigrad_covariance(t, backend="reference")
    if variant == "compiled":
        if "covariance" not in _COMPILED:
            _COMPILED["covariance"] = torch.compile(
                lambda t: unigrad_covariance(t, backend="reference"))
        return _COMPILED["covariance"]
    return lambda t: unigrad_covariance(t, backend="triton")


def _data(batch, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    pred = torch.randn(batch, TOKENS, CHANNELS, generator=g, device=device).to(dtype)
    target = (torch.randn(batch, TOKENS, CHANNELS, generator=g, device=device) * 1.5 + 0.3).to(dtype)
    return pred.requires_grad_(), target


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
    benchmark.extra_info["ceilings"] = device_ceilings


@pytest.mark.benchmark(group="unigrad_loss")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", [128, 256])
def test_unigrad_loss(benchmark, record_rate, device_ceilings, bench_device, sync,
                      batch, dtype_name, variant, mode):
    _skip_unless_runnable(variant, bench_device)
    dtype = DTYPES[dtype_name]
    batch = batch if bench_device.type == "cuda" else CPU_BATCH
    pred, target = _data(batch, dtype, bench_device)
    loss_fn = _loss_fn(variant)

    def forward():
        return loss_fn(pred, target)

    def forward_backward():
        pred.grad = None
        loss = loss_fn(pred, target)
        loss.backward()
        return loss

    call = forward if mode == "fwd" else forward_backward

    def run():
        loss = call()
        sync()
        return loss

    run()  # warm-up: compile, autotune-free launch caches, allocator
    pred.grad = None
    peak = peak_extra_bytes(run, bench_device)
    loss = benchmark(run)

    # correctness at the benchmark size, against the eager fp32 reference
    expected_pred = pred.detach().requires_grad_()
    expected = unigrad_loss_reference(expected_pred, target, neg_weight=NEG_WEIGHT)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    if mode == "fwd_bwd":
        expected_grad, = torch.autograd.grad(expected, expected_pred)
        tolerance = (1e-2 if dtype == torch.bfloat16 else 1e-4) * expected_grad.abs().max()
        assert pred.grad.dtype == dtype
        assert (pred.grad.float() - expected_grad.float()).abs().max() <= tolerance

    rows, element = batch * TOKENS, pred.element_size()
    size = rows * CHANNELS * element
    _record(benchmark, record_rate, device_ceilings,
            op_bytes=3 * size + CHANNELS * CHANNELS * 4, op_flops=4 * rows * CHANNELS ** 2,
            batch=batch, tokens=TOKENS, channels=CHANNELS, rows=rows, dtype=dtype_name,
            variant=variant, mode=mode, neg_weight=NEG_WEIGHT, device=str(bench_device),
            peak_extra_bytes=peak,
            peak_extra_over_inputs=peak / (2 * size) if peak is not None else None)
    record_host_overhead(benchmark, call, bench_device)


@pytest.mark.benchmark(group="unigrad_covariance")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [128, 256])
def test_unigrad_covariance(benchmark, record_rate, device_ceilings, bench_device, sync, batch,
                            variant):
    """F alone (what the trainer runs over all micro-batch targets before the losses), bf16."""
    _skip_unless_runnable(variant, bench_device)
    batch = batch if bench_device.type == "cuda" else CPU_BATCH
    _, target = _data(batch, torch.bfloat16, bench_device)
    covariance_fn = _covariance_fn(variant)

    def call():
        return covariance_fn(target)

    def run():
        covariance = call()
        sync()
        return covariance

    run()
    peak = peak_extra_bytes(run, bench_device)
    covariance = benchmark(run)
    expected = unigrad_covariance(target, backend="reference")
    assert covariance.shape == (CHANNELS, CHANNELS) and covariance.dtype == torch.float32
    assert (covariance - expected).abs().max() <= 1e-4 * expected.abs().max()

    rows = batch * TOKENS
    size = rows * CHANNELS * target.element_size()
    _record(benchmark, record_rate, device_ceilings,
            op_bytes=size + CHANNELS * CHANNELS * 4, op_flops=2 * rows * CHANNELS ** 2,
            batch=batch, tokens=TOKENS, channels=CHANNELS, rows=rows, dtype="bf16",
            variant=variant, device=str(bench_device), peak_extra_bytes=peak,
            peak_extra_over_inputs=peak / size if peak is not None else None)
    record_host_overhead(benchmark, call, bench_device)
