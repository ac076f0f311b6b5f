"""Benchmarks: mask generation at the recipe size (B=256, 14x14 grid, 118 masked), on the device.

extra_info: masks_per_s, the sizes, and (from conftest) the environment.
"""
import pytest
import torch

from engine.masking import MASK_KINDS, make_mask, visible_indices

B, GRID, K = 256, 14, 118


def _info(benchmark, **kw):
    benchmark.extra_info.update(batch=B, grid=GRID, num_masked=K, **kw)


@pytest.mark.benchmark(group="masking")
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_make_mask(benchmark, record_rate, bench_device, sync, kind):
    """Masks at the recipe size; on CUDA the block mask runs as a cached CUDA graph."""
    g = torch.Generator(device=bench_device).manual_seed(0)

    def run():
        m = make_mask(kind, B, GRID, K, g, bench_device)
        sync()
        return m

    run()  # warm-up (allocator, lazy init)
    mask = benchmark(run)
    assert mask.shape == (B, GRID * GRID) and mask.device.type == bench_device.type
    assert torch.equal(mask.sum(1).cpu(), torch.full((B,), K))
    _info(benchmark, kind=kind, device=str(bench_device))
    record_rate(B, "masks_per_s")


@pytest.mark.benchmark(group="masking")
def test_visible_indices(benchmark, record_rate, bench_device, sync):
    g = torch.Generator(device=bench_device).manual_seed(0)
    mask = make_mask("block", B, GRID, K, g, bench_device)

    def run():
        idx = visible_indices(mask, GRID * GRID - K, check=False)  # the sync-free training path
        sync()
        return idx

    run()
    idx = benchmark(run)
    assert idx.shape == (B, GRID * GRID - K)
    _info(benchmark, device=str(bench_device))
    record_rate(B, "masks_per_s")


@pytest.mark.benchmark(group="masking")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph switch is CUDA only")
def test_block_mask_cuda_eager(benchmark, record_rate, bench_device, sync):
    """The block mask on CUDA without the CUDA graph (launch-bound: ~50 kernels per round)."""
    from engine.masking import block_mask

    g = torch.Generator(device=bench_device).manual_seed(0)

    def run():
        m = block_mask(B, GRID, K, generator=g, cuda_graph=False)
        sync()
        return m

    run()
    mask = benchmark(run)
    assert torch.equal(mask.sum(1).cpu(), torch.full((B,), K))
    _info(benchmark, kind="block", device=str(bench_device), cuda_graph=False)
    record_rate(B, "masks_per_s")
