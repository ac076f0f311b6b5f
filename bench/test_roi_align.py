"""Benchmarks: roi_align (DENSE.md K6, torchvision.ops.roi_align semantics) at CCOP / Faster R-CNN
and RegionCL sizes.

Cases (image-frame boxes, mapped by spatial_scale; aligned=True, i.e. RoIAlignV2):
  * "fpn_level": one FPN level of a Faster R-CNN-style head, input (16, 256, 50, 50) (stride 4 of
    a 200-px image), 512 boxes of 16..200 px, 7x7, sampling_ratio 2;
  * "ccop_p2": CCOP's P2 level (spec section 7: RoIAlignV2 7x7, sampling_ratio 0 -- adaptive,
    sqrt(area) <= 48 -> P2), input (32, 256, 56, 56) (32 images of 224 px per GPU), 4,096 boxes of
    12..48 px (CCOP has up to 35,200 RoIs over its four levels);
  * "regioncl": RegionCL's box mean on C5 (spec section 6: one 96/128/160-px box per image on a
    32-aligned grid, the mean over its cells), input (128, 2048, 7, 7), 128 boxes, output 1x1,
    sampling_ratio 0: with aligned=True the adaptive grid puts one sample on every cell centre.
bf16 and fp32 features. Variants: `reference` (eager roi_align_reference), `compiled`
(torch.compile of the reference; CUDA only) and `triton` (the kernels; CUDA only). Modes: `fwd`
(the pooled features, no grad: CCOP's key branch) and `fwd_bwd` (forward, then backward of a
random gradient to the features). CUDA work is synchronised inside the timed function.

GPU goal: triton >= 3x the reference forward + backward (not yet measured on a GPU).

extra_info: case, sizes, dtype, variant, mode; samples_per_bin (mean grid_h * grid_w over the
boxes); op_bytes = what must cross HBM at the least (the features read once, the output written;
fwd_bwd adds the gradient read and the feature gradient written), op_flops = 8 K C L S per pass
(four multiply-adds per sample); achieved gbps / tflops; floor_s and roofline_fraction as in the
other benchmark files; peak_extra_bytes on CUDA; the host overhead (bench.measure). On CPU only
the reference runs, at tiny sizes (`pytest --benchmark-disable` stays within seconds); compiled
and triton skip with the reason.
"""
import math

import pytest
import torch

from bench.measure import peak_extra_bytes, record_host_overhead
from kernels import roi_align, roi_align_reference

# name: (images, channels, feature size, image size, boxes, box sides (min, max) px, output,
#        sampling_ratio, CPU (images, channels, feature size, boxes))
CASES = {
    "fpn_level": (16, 256, 50, 200, 512, (16, 200), 7, 2, (2, 8, 13, 24)),
    "ccop_p2": (32, 256, 56, 224, 4096, (12, 48), 7, 0, (2, 8, 14, 24)),
    "regioncl": (128, 2048, 7, 224, 128, None, 1, 0, (4, 32, 7, 4)),
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


def _pool_fn(variant, output, scale, sampling_ratio):
    args = (output, scale, sampling_ratio, True)
    if variant == "reference":
        return lambda x, boxes: roi_align_reference(x, boxes, *args)
    if variant == "compiled":
        if "reference" not in _COMPILED:
            _COMPILED["reference"] = torch.compile(roi_align_reference)
        compiled = _COMPILED["reference"]
        return lambda x, boxes: compiled(x, boxes, *args)
    return lambda x, boxes: roi_align(x, boxes, *args, backend="triton")


def _boxes(case, images, image_size, count, sides, gen):
    """(count, 5) fp32 image-frame boxes [b, x1, y1, x2, y2] inside the image."""
    if case == "regioncl":  # one box per image: sides 32*randint(3, 6), start on the 32-px grid
        side = 32 * torch.randint(3, 6, (count, 2), generator=gen)
        start = 32 * torch.randint(0, image_size // 32, (count, 2), generator=gen)
        start = torch.minimum(start, (image_size - side) // 32 * 32)
        index = torch.arange(count) % images
        return torch.cat([index[:, None], start, start + side], 1).float()
    low, high = sides
    side = low + (high - low) * torch.rand(count, 2, generator=gen)
    start = torch.rand(count, 2, generator=gen) * (image_size - side)
    index = torch.randint(0, images, (count, 1), generator=gen)
    return torch.cat([index.float(), start, start + side], 1)


def _samples_per_bin(boxes, scale, output, sampling_ratio):
    if sampling_ratio > 0:
        return float(sampling_ratio ** 2)
    sizes = (boxes[:, 3:5] - boxes[:, 1:3]) * scale
    return float(torch.ceil(sizes / output).prod(1).clamp(min=1).mean())


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


@pytest.mark.benchmark(group="roi_align")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_roi_align(benchmark, record_rate, device_ceilings, bench_device, sync, case, dtype_name,
                   mode, variant):
    _skip_unless_runnable(variant, bench_device)
    dtype = DTYPES[dtype_name]
    cuda = bench_device.type == "cuda"
    images, channels, size, image_size, count, sides, output, sampling_ratio, cpu = CASES[case]
    if not cuda:
        images, channels, size, count = cpu
        image_size = size * (image_size // CASES[case][2])
    scale = size / image_size
    gen = torch.Generator().manual_seed(0)
    boxes = _boxes(case, images, image_size, count, sides, gen)
    features = torch.randn(images, channels, size, size, generator=gen).to(bench_device, dtype)
    boxes = boxes.to(bench_device)
    grad = torch.randn(count, channels, output, output, generator=gen).to(bench_device, dtype)
    pool = _pool_fn(variant, output, scale, sampling_ratio)
    leaf = features.detach().requires_grad_(mode == "fwd_bwd")

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return pool(features, boxes)
        leaf.grad = None
        out = pool(leaf, boxes)
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
    expected_leaf = features.detach().requires_grad_(mode == "fwd_bwd")
    expected = roi_align_reference(expected_leaf, boxes, output, scale, sampling_ratio, True)
    assert out.shape == (count, channels, output, output) and out.dtype == dtype
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.detach().float(), expected.detach().float(), rtol=tolerance,
                               atol=tolerance * float(expected.detach().abs().max()))
    if mode == "fwd_bwd":
        expected.backward(grad)
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.float(), expected_leaf.grad.float(), rtol=tolerance,
                                   atol=tolerance * float(expected_leaf.grad.abs().max()))

    element = features.element_size()
    bins = output * output
    samples = _samples_per_bin(boxes.cpu(), scale, output, sampling_ratio)
    passes = 1 if mode == "fwd" else 2
    op_bytes = element * (images * channels * size * size + count * channels * bins) * passes
    _record(benchmark, record_rate, device_ceilings, op_bytes=op_bytes,
            op_flops=math.ceil(8 * count * channels * bins * samples) * passes,
            case=case, images=images, channels=channels, feature_size=size, boxes=count,
            output=output, sampling_ratio=sampling_ratio, samples_per_bin=samples,
            spatial_scale=scale, dtype=dtype_name, variant=variant, mode=mode,
            device=str(bench_device), peak_extra_bytes=peak)
    record_host_overhead(benchmark, call, bench_device)
