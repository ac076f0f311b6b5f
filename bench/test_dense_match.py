"""Benchmarks for kernels/dense_match.py: DenseCL feature matching and PixPro's fused masked-cosine loss.

dense_match: per query token the argmax of cosine similarity over the other view's tokens, at the
grids of stride 16/8/4 on 224 px (14x14, 28x28, 56x56 tokens), C=256, B=128, bf16; plus the SIM-sized
14x14, C=768, B=256. Variants: `reference` (the chunked full similarity matrix + max, fp32),
`compiled` (torch.compile of the same reference) and `triton` (the fused GEMM + running argmax that
never stores the (B, N, M) matrix). FLOPs = 2 B N M C; extra_info also holds the peak extra memory
on CUDA (torch.cuda.max_memory_allocated above what was allocated before the call).

pixpro_loss: PixPro's real size (7x7 C5 map, C=256, B=128) and 14x14, bf16, `fwd` and `fwd_bwd`
(z detached as in PixPro, so the backward is dL/dy only). FLOPs: 2 B N M C per direction of work
(forward cosines; backward masked GEMM A.Z).

Both record the host overhead (`bench.measure.record_host_overhead`: host_overhead = wall time per call /
GPU kernel time per call from torch.profiler, with wall_ms, gpu_kernel_ms, host_ms, kernels_per_call;
CUDA only). On CPU only the reference runs, at B=2 (so `pytest bench --benchmark-disable` stays quick).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from bench.measure import peak_extra_bytes, record_host_overhead

dm = importlib.import_module("kernels.dense_match")

CUDA = torch.cuda.is_available()
# Both the eager and the compiled reference build the similarity in chunks of at most this many
# fp32 entries (512 MB), so torch.compile sees ~10 chunks at 56x56 instead of ~80.
REFERENCE_CHUNK_ENTRIES = 1 << 27
SKIP_COMPILED = "torch.compile timings are only measured on a GPU (cold compile costs ~20 s per graph on CPU)"
SKIP_TRITON = "the Triton kernels run compiled only on a CUDA device"
_COMPILED = {}


def _skip_variant(variant, device):
    if device.type != "cuda" and variant == "compiled":
        pytest.skip(SKIP_COMPILED)
    if device.type != "cuda" and variant == "triton":
        pytest.skip(SKIP_TRITON)


def _compiled(name, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _rates(benchmark, record_rate, device_ceilings, flops):
    tflops = record_rate(flops / 1e12, "tflops")
    benchmark.extra_info["flops"] = flops
    benchmark.extra_info["fraction_of_matmul_peak"] = (
        tflops / device_ceilings["matmul_tflops"] if tflops is not None else None)
    benchmark.extra_info["matmul_tflops_ceiling"] = device_ceilings["matmul_tflops"]


# ---------------------------------------------------------------------------------------------
# dense_match
# ---------------------------------------------------------------------------------------------

DENSE_MATCH_CASES = [  # (grid, channels, batch on CUDA)
    (14, 256, 128),
    (28, 256, 128),
    (56, 256, 128),
    (14, 768, 256),
]


@pytest.mark.benchmark(group="dense_match")
@pytest.mark.parametrize("variant", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("grid,channels,cuda_batch", DENSE_MATCH_CASES,
                         ids=[f"g{g}-c{c}-cudaB{b}" for g, c, b in DENSE_MATCH_CASES])
def test_dense_match(benchmark, record_rate, bench_device, sync, device_ceilings, variant, grid, channels,
                     cuda_batch):
    _skip_variant(variant, bench_device)
    batch = cuda_batch if bench_device.type == "cuda" else 2
    if bench_device.type != "cuda" and grid == 56:
        batch = 1
    tokens = grid * grid
    dtype = torch.bfloat16
    gen = torch.Generator(device=bench_device).manual_seed(0)
    q = torch.randn(batch, tokens, channels, device=bench_device, generator=gen).to(dtype)
    k = torch.randn(batch, tokens, channels, device=bench_device, generator=gen).to(dtype)

    if variant == "reference":
        fn = lambda: dm.dense_match_reference(q, k, chunk_entries=REFERENCE_CHUNK_ENTRIES)  # noqa: E731
    elif variant == "compiled":
        compiled = _compiled("dense_match_reference", dm.dense_match_reference)
        fn = lambda: compiled(q, k, chunk_entries=REFERENCE_CHUNK_ENTRIES)  # noqa: E731
    else:
        fn = lambda: dm.dense_match(q, k, backend="triton")  # noqa: E731

    def run():
        out = fn()
        sync()
        return out

    run()  # warm-up: compilation, autotuning, allocator
    peak = peak_extra_bytes(fn, bench_device)
    idx, sim = benchmark(run)

    assert idx.shape == sim.shape == (batch, tokens) and idx.dtype == torch.int64
    assert torch.isfinite(sim).all() and ((idx >= 0) & (idx < tokens)).all()
    if variant != "reference":  # same answer as the eager reference; near-ties may pick another key
        ref_idx, ref_sim = dm.dense_match_reference(q, k, chunk_entries=REFERENCE_CHUNK_ENTRIES)
        torch.testing.assert_close(sim, ref_sim, rtol=0, atol=1e-4)
        chosen = torch.gather(k, 1, idx[..., None].expand(-1, -1, channels))
        chosen_cos = (F.normalize(q.float(), dim=-1) * F.normalize(chosen.float(), dim=-1)).sum(-1)
        torch.testing.assert_close(chosen_cos, ref_sim, rtol=0, atol=1e-4)
        assert (idx == ref_idx).float().mean() > 0.99
    if variant == "triton" and peak is not None:
        # no O(N*M) allocation: outputs + inverse norms are ~24 bytes per token
        assert peak < 64 * batch * 2 * tokens + (1 << 20), f"peak extra memory {peak} B"

    benchmark.extra_info.update(
        op="dense_match", variant=variant, device=str(bench_device), dtype=str(dtype).removeprefix("torch."),
        batch=batch, grid=grid, num_queries=tokens, num_keys=tokens, channels=channels,
        reference_chunk_entries=REFERENCE_CHUNK_ENTRIES if variant != "triton" else None,
        peak_extra_bytes=peak, similarity_matrix_bytes_fp32=4 * batch * tokens * tokens)
    _rates(benchmark, record_rate, device_ceilings, 2 * batch * tokens * tokens * channels)
    record_host_overhead(benchmark, fn, bench_device)


# ---------------------------------------------------------------------------------------------
# pixpro_loss
# ---------------------------------------------------------------------------------------------

def _random_crops(batch, device, gen):
    """Two RandomResizedCrop-like views per image (scale 0.08-1, ratio 3/4-4/3), random flips."""
    sizes = torch.randint(300, 500, (batch, 2), generator=gen).double()
    area = sizes.prod(-1, keepdim=True) * (0.08 + 0.92 * torch.rand(batch, 2, generator=gen, dtype=torch.float64))
    ratio = torch.exp((torch.rand(batch, 2, generator=gen, dtype=torch.float64) - 0.5) * 2 * 0.2877)
    h = torch.minimum(torch.sqrt(area / ratio), sizes[:, None, 0])
    w = torch.minimum(torch.sqrt(area * ratio), sizes[:, None, 1])
    y = (sizes[:, None, 0] - h) * torch.rand(batch, 2, generator=gen, dtype=torch.float64)
    x = (sizes[:, None, 1] - w) * torch.rand(batch, 2, generator=gen, dtype=torch.float64)
    boxes = torch.stack([y, x, h, w], dim=-1).float()
    flips = torch.rand(batch, 2, generator=gen) < 0.5
    return boxes.to(device), flips.to(device), sizes.to(device)


PIXPRO_CASES = [(7, 256, 128), (14, 256, 128)]  # (grid, channels, batch on CUDA): PixPro's C5 size and 14x14


@pytest.mark.benchmark(group="pixpro_loss")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("grid,channels,cuda_batch", PIXPRO_CASES,
                         ids=[f"g{g}-c{c}-cudaB{b}" for g, c, b in PIXPRO_CASES])
def test_pixpro_loss(benchmark, record_rate, bench_device, sync, device_ceilings, variant, mode, grid, channels,
                     cuda_batch):
    _skip_variant(variant, bench_device)
    batch = cuda_batch if bench_device.type == "cuda" else 2
    tokens = grid * grid
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    boxes, flips, sizes = _random_crops(batch, bench_device, gen)
    y = torch.randn(batch, tokens, channels, generator=gen).to(bench_device, dtype).requires_grad_()
    z = torch.randn(batch, tokens, channels, generator=gen).to(bench_device, dtype)  # target: detached

    if variant == "reference":
        loss_fn = lambda: dm.pixpro_loss_reference(y, z, boxes, flips, grid, image_size=sizes)  # noqa: E731
    elif variant == "compiled":
        compiled = _compiled("pixpro_loss_reference", dm.pixpro_loss_reference)
        loss_fn = lambda: compiled(y, z, boxes, flips, grid, image_size=sizes)  # noqa: E731
    else:
        loss_fn = lambda: dm.pixpro_loss(y, z, boxes, flips, grid, image_size=sizes, backend="triton")  # noqa: E731

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return loss_fn(), None
        loss = loss_fn()
        return loss.detach(), torch.autograd.grad(loss, (y,))[0]

    def run():
        out = call()
        sync()
        return out

    run()
    peak = peak_extra_bytes(run, bench_device)
    loss, grad_y = benchmark(run)

    assert loss.shape == () and torch.isfinite(loss)
    if variant != "reference":
        ref_loss = dm.pixpro_loss_reference(y, z, boxes, flips, grid, image_size=sizes)
        assert abs(float(loss) - float(ref_loss.detach())) <= 1e-4
        if grad_y is not None:
            (ref_grad,) = torch.autograd.grad(ref_loss, (y,))
            torch.testing.assert_close(grad_y.float(), ref_grad.float(), rtol=2e-2,
                                       atol=1e-2 * float(ref_grad.float().abs().max()))
    if grad_y is not None:
        assert grad_y.shape == y.shape and torch.isfinite(grad_y).all()

    flops = 2 * batch * tokens * tokens * channels * (1 if mode == "fwd" else 2)
    benchmark.extra_info.update(
        op="pixpro_loss", variant=variant, mode=mode, device=str(bench_device),
        dtype=str(dtype).removeprefix("torch."), batch=batch, grid=grid, tokens=tokens, channels=channels,
        threshold=0.7, peak_extra_bytes=peak, mask_bytes_bool=batch * tokens * tokens)
    _rates(benchmark, record_rate, device_ceilings, flops)
    record_host_overhead(benchmark, call, bench_device)
