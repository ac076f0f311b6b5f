"""Benchmarks: the DETR matcher's assignment (DENSE.md K7, section 8) at DETReg and UP-DETR sizes.

Cases: "detreg" B = 24 images, 300 queries x 30 targets (DETReg's top-30 selective-search boxes);
"updetr" B = 32 images, 100 queries x 10 targets (UP-DETR's 10 random patches). The cost is
DETR-like: 5 L1(cx, cy, w, h) - the class probability, fp32, built on the device; the number of
targets per image varies (num_cols in [T/2, T], the first image full), as in a real batch.
Variants:
  * `scipy`: what DETReg and UP-DETR do -- the cost copied to the host (`cost.cpu()`: a device
    sync on CUDA), then scipy.optimize.linear_sum_assignment image by image on each image's valid
    columns, the indices gathered into a (B, T) tensor and copied back to the device;
  * `reference`: batched_linear_sum_assignment(backend="reference"), the torch definition on the
    device (fixed-bound loops, no host sync);
  * `triton`: backend="triton", one program per image, one launch (CUDA only).
No `compiled` variant: the reference is a Python loop of ~m (m + 1) small steps (930 at T = 30);
torch.compile would unroll it into one huge graph. CUDA work is synchronised inside the timed
function. Every case checks its result against scipy's total cost first.

GPU goal: triton well below scipy-with-the-copy at both sizes (one launch, no sync) and far below
the reference (~20 launches per Dijkstra step).

extra_info: case, sizes, variant, device; op_bytes = the cost read once + the assignment written
(B n T x 4 + B T x 8); floor_s = op_bytes / the copy ceiling and roofline_fraction = floor_s /
time (tiny by nature: the op is a chain of dependent steps, latency-bound); per_image_us;
launches (triton: 1); on CUDA peak_extra_bytes and the host overhead (bench.measure; not for
scipy, which synchronises by design). On CPU `scipy` and `reference` run at both sizes
(`pytest --benchmark-disable` stays within a few seconds); triton skips with the reason.
"""
import pytest
import torch

from bench.measure import peak_extra_bytes, record_host_overhead
from kernels import batched_linear_sum_assignment

scipy_optimize = pytest.importorskip("scipy.optimize")

# name: (images, queries, targets)
CASES = {"detreg": (24, 300, 30), "updetr": (32, 100, 10)}
VARIANTS = ("scipy", "reference", "triton")


def _skip_unless_runnable(variant, device):
    if device.type != "cuda" and variant == "triton":
        pytest.skip("the Triton kernels run compiled only on a CUDA device")


def _matcher_inputs(images, queries, targets, device):
    """A DETR-like cost (B, Q, T) on the device and the number of targets of each image."""
    g = torch.Generator(device=device).manual_seed(0)
    boxes = torch.rand(images, queries, 4, generator=g, device=device)
    target_boxes = torch.rand(images, targets, 4, generator=g, device=device)
    probs = torch.rand(images, queries, targets, generator=g, device=device)
    cost = 5 * torch.cdist(boxes, target_boxes, p=1) - probs
    num_targets = torch.randint(targets // 2, targets + 1, (images,), generator=g, device=device)
    num_targets[0] = targets
    return cost.contiguous(), num_targets


def scipy_matcher(cost, num_targets_host):
    """The official repos' way: the cost to the host, scipy per image, the indices back."""
    host = cost.detach().cpu().double().numpy()
    images, _, targets = host.shape
    assignment = torch.full((images, targets), -1, dtype=torch.int64)
    for b, k in enumerate(num_targets_host):
        rows, cols = scipy_optimize.linear_sum_assignment(host[b, :, :k])
        assignment[b, torch.from_numpy(cols)] = torch.from_numpy(rows)
    return assignment.to(cost.device)


def _match_fn(variant, num_targets, num_targets_host):
    if variant == "scipy":
        return lambda cost: scipy_matcher(cost, num_targets_host)
    return lambda cost: batched_linear_sum_assignment(cost, num_targets, backend=variant)


@pytest.mark.benchmark(group="linear_sum_assignment")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_linear_sum_assignment(benchmark, record_rate, device_ceilings, bench_device, sync, case,
                               variant):
    _skip_unless_runnable(variant, bench_device)
    images, queries, targets = CASES[case]
    cost, num_targets = _matcher_inputs(images, queries, targets, bench_device)
    num_targets_host = num_targets.tolist()       # known on the host in DETR (len(targets))
    match = _match_fn(variant, num_targets, num_targets_host)

    def call():
        assignment = match(cost)
        sync()
        return assignment

    call()  # warm-up: compile, launch caches, allocator
    peak = peak_extra_bytes(call, bench_device)
    assignment = benchmark(call)

    # correctness at the benchmark size: a valid matching with scipy's total cost
    assignment = assignment.cpu()
    host = cost.double().cpu()
    for b, k in enumerate(num_targets_host):
        matched = assignment[b, :k]
        assert (assignment[b, k:] == -1).all() and len(set(matched.tolist())) == k
        rows, cols = scipy_optimize.linear_sum_assignment(host[b, :, :k].numpy())
        expected = float(host[b].numpy()[rows, cols].sum())
        got = float(host[b, matched, torch.arange(k)].sum())
        assert abs(got - expected) <= 1e-9 * max(1.0, abs(expected)), (b, got, expected)

    op_bytes = images * queries * targets * cost.element_size() + images * targets * 8
    benchmark.extra_info.update(
        case=case, images=images, queries=queries, targets=targets,
        mean_targets=sum(num_targets_host) / images, variant=variant, device=str(bench_device),
        op_bytes=op_bytes, launches=1 if variant == "triton" else None, peak_extra_bytes=peak)
    record_rate(images, "images_per_s")
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    floor_s = op_bytes / (device_ceilings["copy_gbps"] * 1e9)
    benchmark.extra_info["per_image_us"] = mean / images * 1e6 if mean else None
    benchmark.extra_info["floor_s"] = floor_s
    benchmark.extra_info["roofline_fraction"] = floor_s / mean if mean else None
    if variant != "scipy":
        record_host_overhead(benchmark, lambda: match(cost), bench_device)
