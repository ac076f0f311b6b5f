"""Benchmarks: ms_deform_attn (DENSE.md K7, Deformable DETR's multi-scale deformable attention) at
Deformable DETR's sizes, as DETReg pre-trains it.

Cases (hidden 256 = 8 heads x d 32, 4 levels, 4 points; the levels of an ~800 x 1200 input at
strides 8, 16, 32, 64: (100, 150), (50, 75), (25, 38), (13, 19), S = 19,947 positions):
  * "encoder": one encoder layer's attention, every position a query (Lq = S), N = 2 images per
    GPU (Deformable DETR's batch);
  * "decoder": one decoder layer's cross-attention, Lq = 300 queries, N = 2.
bf16 and fp32. Locations are uniform in [-0.05, 1.05] (a few outside the map: zero padding), the
weights a softmax over L * P, as the module makes them. Variants: `reference` (eager
ms_deform_attn_reference, Deformable DETR's grid_sample path), `compiled` (torch.compile of the
reference; CUDA only) and `triton` (the kernels; CUDA only). Modes: `fwd` (no grad) and `fwd_bwd`
(forward, then backward of a random gradient to value, locations and weights). CUDA work is
synchronised inside the timed function. The level arguments are device tensors, as Deformable DETR
passes them (the reference reads spatial_shapes on the host each call, a sync it has too).

GPU goal: triton >= 3x the reference forward + backward (not yet measured on a GPU).

extra_info: case, sizes, dtype, variant, mode; samples (N Lq heads L P); op_bytes = what must
cross HBM at the least (value, locations and weights read, the output written; fwd_bwd adds the
gradient read, the inputs read again and the three gradients written), gather_bytes = the corner
reads (4 d elements per sample and pass; L2 traffic mostly), op_flops = 10 d per sample forward,
40 d forward + backward; achieved gbps / tflops; floor_s and roofline_fraction as in the other
benchmark files; peak_extra_bytes on CUDA; the host overhead (bench.measure). On CPU only the
reference runs, at tiny sizes (`pytest --benchmark-disable` stays within seconds); compiled and
triton skip with the reason.
"""
import pytest
import torch

from bench.measure import peak_extra_bytes, record_host_overhead
from kernels import ms_deform_attn, ms_deform_attn_reference

DETR_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
CPU_LEVELS = [(8, 12), (4, 6), (2, 3), (1, 2)]
HEADS, HEAD_DIM, POINTS = 8, 32, 4
# name: (images, queries (None: Lq = S), CPU (images, queries))
CASES = {
    "encoder": (2, None, (1, None)),
    "decoder": (2, 300, (1, 30)),
}
VARIANTS = ("reference", "compiled", "triton")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_COMPILED = {}


def _skip_unless_runnable(variant, device):
    if device.type != "cuda" and variant == "compiled":
        pytest.skip("torch.compile timings are only measured on a GPU "
                    "(cold compile costs ~20 s per graph on CPU)")
    if device.type != "cuda" and variant == "triton":
        pytest.skip("the Triton kernels run compiled only on a CUDA device")


def _attn_fn(variant):
    if variant == "reference":
        return ms_deform_attn_reference
    if variant == "compiled":
        if "reference" not in _COMPILED:
            _COMPILED["reference"] = torch.compile(ms_deform_attn_reference)
        return _COMPILED["reference"]
    return lambda *args: ms_deform_attn(*args, backend="triton")


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


def _close(got, expected, tolerance, name, allowed_fraction=0.0):
    """|got - expected| <= tolerance * (|expected| + max|expected|) elementwise, except at most
    `allowed_fraction` of the elements (the location gradient jumps at integer pixel
    coordinates, where fp32 rounding picks the side)."""
    got, expected = got.detach().float(), expected.detach().float()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    bad = (got - expected).abs() > tolerance * (expected.abs() + scale)
    fraction = float(bad.float().mean()) if bad.numel() else 0.0
    assert fraction <= allowed_fraction, (name, fraction)


@pytest.mark.benchmark(group="ms_deform_attn")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_ms_deform_attn(benchmark, record_rate, device_ceilings, bench_device, sync, case,
                        dtype_name, mode, variant):
    _skip_unless_runnable(variant, bench_device)
    dtype = DTYPES[dtype_name]
    cuda = bench_device.type == "cuda"
    images, queries, cpu = CASES[case]
    levels = DETR_LEVELS
    if not cuda:
        (images, queries), levels = cpu, CPU_LEVELS
    positions = sum(h * w for h, w in levels)
    queries = positions if queries is None else queries
    n_levels = len(levels)
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(images, positions, HEADS, HEAD_DIM, generator=gen)
    loc = torch.rand(images, queries, HEADS, n_levels, POINTS, 2, generator=gen) * 1.1 - 0.05
    weights = torch.randn(images, queries, HEADS, n_levels * POINTS, generator=gen).softmax(-1)
    weights = weights.view(images, queries, HEADS, n_levels, POINTS)
    grad = torch.randn(images, queries, HEADS * HEAD_DIM, generator=gen).to(bench_device, dtype)
    value, loc, weights = (t.to(bench_device, dtype) for t in (value, loc, weights))
    shapes = torch.tensor(levels, dtype=torch.int64, device=bench_device)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    attn = _attn_fn(variant)
    leaves = [t.detach().requires_grad_(mode == "fwd_bwd") for t in (value, loc, weights)]

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return attn(value, shapes, starts, loc, weights)
        for leaf in leaves:
            leaf.grad = None
        out = attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(grad)
        return out

    def timed():
        out = call()
        sync()
        return out

    timed()  # warm-up: compile, launch caches, allocator
    peak = peak_extra_bytes(timed, bench_device)
    out = benchmark(timed)

    # correctness at the benchmark size, against the eager reference
    expected_leaves = [t.detach().requires_grad_(mode == "fwd_bwd") for t in (value, loc, weights)]
    expected = ms_deform_attn_reference(expected_leaves[0], shapes, starts, expected_leaves[1],
                                        expected_leaves[2])
    assert out.shape == (images, queries, HEADS * HEAD_DIM) and out.dtype == dtype
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    _close(out, expected, tolerance, "out")
    if mode == "fwd_bwd":
        expected.backward(grad)
        for name, leaf, want, allowed in zip(("grad_value", "grad_loc", "grad_weights"), leaves,
                                             expected_leaves, (0.0, 1e-4, 0.0)):
            assert leaf.grad.dtype == dtype
            _close(leaf.grad, want.grad, tolerance, name, allowed)

    element = value.element_size()
    samples = images * queries * HEADS * n_levels * POINTS
    value_elements = images * positions * HEADS * HEAD_DIM
    out_elements = images * queries * HEADS * HEAD_DIM
    forward_bytes = element * (value_elements + 3 * samples + out_elements)
    if mode == "fwd":
        op_bytes, op_flops, passes = forward_bytes, 10 * HEAD_DIM * samples, 1
    else:  # + grad_out read, the inputs read again, the three gradients written
        op_bytes = (forward_bytes + element * out_elements
                    + element * (value_elements + 3 * samples) * 2)
        op_flops, passes = 40 * HEAD_DIM * samples, 2
    _record(benchmark, record_rate, device_ceilings, op_bytes=op_bytes, op_flops=op_flops,
            case=case, images=images, queries=queries, positions=positions, levels=levels,
            heads=HEADS, head_dim=HEAD_DIM, points=POINTS, samples=samples,
            gather_bytes=4 * HEAD_DIM * element * samples * passes, dtype=dtype_name,
            variant=variant, mode=mode, device=str(bench_device), peak_extra_bytes=peak)
    record_host_overhead(benchmark, call, bench_device)
