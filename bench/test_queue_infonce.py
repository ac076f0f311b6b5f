"""Benchmarks: queue_infonce (DENSE.md K1, the MoCo/DenseCL queue InfoNCE) at DenseCL's sizes.

DenseCL (spec/OFFICIAL.md section 1): dense term over M = N * 49 query rows (C5 7x7 grid) against
a K = 65,536 queue of D = 128 keys, tau = 0.2; N = 32 images per GPU (the released recipe,
M = 1,568) and 256 (M = 12,544, where the reference's fp32 logits alone are 3.3 GB). bf16 and fp32
inputs (the queue in the inputs' dtype). Variants: `reference` (eager PyTorch: the materialised
cat([l_pos, l_neg]) / tau and cross-entropy, fp32), `compiled` (torch.compile of the reference;
CUDA only) and `triton` (the fused kernels; CUDA only). Timed: forward + backward to query.grad,
CUDA synchronised inside the timed function.

GPU goal (forward + backward): triton >= 3x the reference and >= 1.5x compiled at both sizes, with
extra memory O((M + K) D) (the reference's peak is ~3 x 4 M (K+1) bytes).

extra_info: sizes, dtype, variant, mode; op_flops = 6 M K D (forward s = q queue^T, the backward's
recompute of s, dq = p queue); op_bytes = what must cross HBM: query and positive read by both
passes, the queue read by both passes, dq written (the L2 re-reads of the queue per row block are
not counted); achieved gbps / tflops; floor_s = max(op_bytes / copy ceiling, op_flops / matmul
ceiling) and roofline_fraction = floor_s / measured time (the matmul ceiling is the bf16 one: for
fp32 inputs the kernels run tf32x3, three tf32 MMAs per product). On CUDA, peak_extra_bytes (one
call's torch.cuda.max_memory_allocated above what was allocated before) and its ratio to the fp32
logits' size; the host overhead (`bench.measure.record_host_overhead`: host_overhead = wall time per
call / GPU kernel time per call from torch.profiler, with wall_ms, gpu_kernel_ms, host_ms,
kernels_per_call). On CPU only the reference runs, at M = 256, K = 4,096 (`pytest --benchmark-disable`
stays within seconds); compiled and triton skip with the reason, as in the other benchmark files.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.measure import peak_extra_bytes, record_host_overhead

from kernels import queue_infonce, queue_infonce_reference

KEYS, DIM, TEMPERATURE, GRID_CELLS = 65536, 128, 0.2, 49
CPU_ROWS, CPU_KEYS = 256, 4096
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
        return lambda q, p, k: queue_infonce_reference(q, p, k, TEMPERATURE)
    if variant == "compiled":
        if "reference" not in _COMPILED:
            _COMPILED["reference"] = torch.compile(queue_infonce_reference)
        compiled = _COMPILED["reference"]
        return lambda q, p, k: compiled(q, p, k, TEMPERATURE)
    return lambda q, p, k: queue_infonce(q, p, k, TEMPERATURE, backend="triton")


def _data(rows, keys, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    query = F.normalize(torch.randn(rows, DIM, generator=g, device=device), dim=1)
    # positives correlated with their queries, as after some training (the softmax is not flat)
    positive = F.normalize(query + 0.7 * torch.randn(rows, DIM, generator=g, device=device), dim=1)
    queue = F.normalize(torch.randn(keys, DIM, generator=g, device=device), dim=1)
    return query.to(dtype).requires_grad_(), positive.to(dtype), queue.to(dtype)


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


@pytest.mark.benchmark(group="queue_infonce")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("images", [32, 256])
def test_queue_infonce(benchmark, record_rate, device_ceilings, bench_device, sync, images,
                       dtype_name, variant):
    _skip_unless_runnable(variant, bench_device)
    dtype = DTYPES[dtype_name]
    cuda = bench_device.type == "cuda"
    rows = images * GRID_CELLS if cuda else CPU_ROWS
    keys = KEYS if cuda else CPU_KEYS
    query, positive, queue = _data(rows, keys, dtype, bench_device)
    loss_fn = _loss_fn(variant)

    def call():
        query.grad = None
        loss = loss_fn(query, positive, queue)
        loss.backward()
        return loss

    def forward_backward():
        loss = call()
        sync()
        return loss

    forward_backward()  # warm-up: compile, launch caches, allocator
    query.grad = None
    peak = peak_extra_bytes(forward_backward, bench_device)
    loss = benchmark(forward_backward)

    # correctness at the benchmark size, against the eager fp32 reference
    expected_query = query.detach().requires_grad_()
    expected = queue_infonce_reference(expected_query, positive, queue, TEMPERATURE)
    expected_grad, = torch.autograd.grad(expected, expected_query)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-5)
    tolerance = (1e-2 if dtype == torch.bfloat16 else 1e-4) * expected_grad.abs().max()
    assert query.grad.dtype == dtype
    assert (query.grad.float() - expected_grad.float()).abs().max() <= tolerance

    element = query.element_size()
    logits_bytes = 4 * rows * (keys + 1)
    _record(benchmark, record_rate, device_ceilings,
            op_bytes=element * (5 * rows * DIM + 2 * keys * DIM), op_flops=6 * rows * keys * DIM,
            images=images if cuda else None, rows=rows, keys=keys, dim=DIM,
            temperature=TEMPERATURE, dtype=dtype_name, variant=variant, mode="fwd_bwd",
            device=str(bench_device), peak_extra_bytes=peak, logits_bytes_fp32=logits_bytes,
            peak_extra_over_logits=peak / logits_bytes if peak is not None else None)
    record_host_overhead(benchmark, call, bench_device)


# DetCo: twelve terms per step -- (global, local, local-to-global) x 4 levels -- of M = batch rows
# against 8 queues of 65,536 keys. `loop`: twelve queue_infonce calls (each launch has only
# cdiv(M, BLOCK_M) row blocks x its queue split); `grouped`: queue_infonce_grouped, one forward and
# one backward launch over all twelve; `reference`: the grouped reference (eager, G x M x K
# logits). On CPU: the reference at 8 rows and 2,048 keys per queue only.
DETCO_INDEX = [*range(4), *range(4, 8), *range(4)]


@pytest.mark.benchmark(group="queue_infonce_grouped")
@pytest.mark.parametrize("variant", ["reference", "loop", "grouped"])
@pytest.mark.parametrize("batch", [32, 256])
def test_queue_infonce_detco_terms(benchmark, record_rate, device_ceilings, bench_device, sync,
                                   batch, variant):
    from kernels import queue_infonce_grouped, queue_infonce_grouped_reference

    cuda = bench_device.type == "cuda"
    if not cuda and variant != "reference":
        pytest.skip("the Triton kernels run compiled only on a CUDA device")
    if not cuda and batch != 32:
        pytest.skip("one CPU size")
    rows, keys = (batch, KEYS) if cuda else (8, 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=bench_device).manual_seed(0)
    query = F.normalize(torch.randn(12, rows, DIM, generator=g, device=bench_device), dim=2)
    positive = F.normalize(query + 0.7 * torch.randn(12, rows, DIM, generator=g,
                                                     device=bench_device), dim=2)
    bank = F.normalize(torch.randn(8, keys, DIM, generator=g, device=bench_device), dim=2)
    query, positive, bank = query.to(dtype).requires_grad_(), positive.to(dtype), bank.to(dtype)

    def loss_fn():
        if variant == "reference":
            return queue_infonce_grouped_reference(query, positive, bank, DETCO_INDEX,
                                                   TEMPERATURE).sum()
        if variant == "grouped":
            return queue_infonce_grouped(query, positive, bank, DETCO_INDEX, TEMPERATURE,
                                         backend="triton").sum()
        return sum(queue_infonce(query[t], positive[t], bank[i], TEMPERATURE, backend="triton")
                   for t, i in enumerate(DETCO_INDEX))

    def forward_backward():
        query.grad = None
        loss = loss_fn()
        loss.backward()
        sync()
        return loss

    forward_backward()
    loss = benchmark(forward_backward)
    expected = queue_infonce_grouped_reference(query.detach().float(), positive.float(),
                                               bank.float(), DETCO_INDEX, TEMPERATURE).sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-3, atol=1e-3)
    _record(benchmark, record_rate, device_ceilings,
            op_bytes=query.element_size() * (12 * 5 * rows * DIM + 2 * 12 * keys * DIM),
            op_flops=12 * 6 * rows * keys * DIM, batch=batch if cuda else None, rows=rows,
            keys=keys, dim=DIM, terms=12, queues=8, dtype=str(dtype).removeprefix("torch."),
            variant=variant, mode="fwd_bwd", device=str(bench_device))
