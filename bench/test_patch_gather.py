"""Benchmarks: patch_gather (embed the visible patches) and token_gather at the recipe sizes.

ViT-B/16 at 224 px: images (B, 3, 224, 224), G=14, N=196 patches, K=78 visible, C*p*p=768, D=768,
per-GPU batch B=128 and 256. The patch embedding follows the engine (`VisionTransformer.embed_patches`):
weight (768, 768) and bias in the images' dtype, the fixed fp32 position table (so bf16 images give
fp32 tokens, as SIM's fp32 residual stream). Variants: `reference` (eager PyTorch: gather the K
patches, matmul, + bias, + pos rows), `compiled` (torch.compile of the reference; CUDA only),
`triton` (the fused kernel; CUDA only; check_index=False, the sync-free path for indices built
from a mask). `fwd` is the hot path (SIM's embedding is frozen); `fwd_bwd` also takes the weight and
bias gradients.

extra_info: sizes, dtypes, variant, mode, the bytes the op must move (gathered pixels + weight +
bias + the pos rows it uses + output, plus for fwd_bwd the upstream gradient, the re-read pixels and
the parameter gradients), its FLOPs (2·B·K·768·768 per matmul), GB/s and TFLOP/s, their fractions
of the device's measured ceilings (device_ceilings: copy_gbps, matmul_tflops), which bound applies
(the larger of bytes/copy_gbps and FLOPs/matmul_tflops) and the fraction of that floor reached,
and on CUDA the peak-memory delta of one call and the host overhead (`bench.measure.record_host_overhead`:
host_overhead = wall time per call / GPU kernel time per call from torch.profiler, with wall_ms,
gpu_kernel_ms, host_ms, kernels_per_call).

token_gather: (B, 196, 768) bf16 -> (B, 78, 768): `fwd` moves 2·B·K·D values, `fwd_bwd` also reads
the (B, K, D) gradient and writes the whole (B, N, D) token gradient. `triton_unique` is the
backward with unique_indices=True (plain stores, no fp32 buffer).

On CPU only the reference runs, at B=2, so `pytest bench --benchmark-disable` stays fast.
"""
import pytest
import torch

from bench.measure import peak_extra_bytes, record_host_overhead

from kernels import patch_gather, patch_gather_reference, token_gather, token_gather_reference

IMAGE, PATCH, CHANNELS, VISIBLE, DIM = 224, 16, 3, 78, 768
GRID = IMAGE // PATCH
NUM_PATCHES = GRID * GRID
PATCH_DIM = CHANNELS * PATCH * PATCH
BATCHES = (128, 256)
CPU_BATCH = 2


def _setup(variant, batch, device):
    """The batch actually used; skips what this machine does not measure."""
    if device.type != "cuda":
        if variant == "compiled":
            pytest.skip("torch.compile timings are only measured on a GPU "
                        "(cold compile costs ~20 s per graph on CPU)")
        if variant.startswith("triton"):
            pytest.skip("the Triton kernels run compiled only on a CUDA device")
        if batch != BATCHES[0]:
            pytest.skip(f"on CPU the reference runs once, at the reduced batch B={CPU_BATCH}")
        return CPU_BATCH
    if variant == "compiled":
        torch._dynamo.reset()  # fresh cache per case: never hit the recompile limit (and go eager)
    return batch


def _visible_indices(batch, device):
    """Sorted random visible patches per sample, like engine.masking.visible_indices."""
    order = torch.rand(batch, NUM_PATCHES, device=device).argsort(dim=1)
    return order[:, :VISIBLE].sort(dim=1).values


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _record(benchmark, device_ceilings, n_bytes, flops, **info):
    """Sizes, bytes/FLOPs, achieved rates and the fractions of the device's two ceilings."""
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    copy_s = n_bytes / 1e9 / device_ceilings["copy_gbps"]
    math_s = flops / 1e12 / device_ceilings["matmul_tflops"] if flops else 0.0
    benchmark.extra_info.update(
        info, bytes=n_bytes, flops=flops,
        gb_per_s=n_bytes / mean / 1e9 if mean else None,
        tflops=flops / mean / 1e12 if mean and flops else None,
        copy_fraction=copy_s / mean if mean else None,
        matmul_fraction=math_s / mean if mean and flops else None,
        bound="compute (matmul)" if math_s > copy_s else "memory bandwidth",
        roofline_fraction=max(copy_s, math_s) / mean if mean else None,
        ceilings=dict(device_ceilings))


def _assert_lowp_rule(kernel, lowp, truth, name):
    kernel_err = (kernel.double() - truth.double()).abs().max().item()
    torch_err = (lowp.double() - truth.double()).abs().max().item()
    atol = 1e-3 * max(truth.abs().max().item(), 1.0)
    assert kernel_err <= 2 * torch_err + atol, f"{name}: error {kernel_err} vs torch {torch_err}"


# ---------------------------------------------------------------------------------------------
# patch_gather with the patch embedding
# ---------------------------------------------------------------------------------------------

@pytest.mark.benchmark(group="patch_gather")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["reference", "compiled", "triton"])
def test_patch_embed(benchmark, bench_device, sync, device_ceilings, variant, batch, dtype, mode):
    batch = _setup(variant, batch, bench_device)
    device = bench_device
    images = torch.randn(batch, CHANNELS, IMAGE, IMAGE, device=device).to(dtype)
    weight = (torch.randn(DIM, PATCH_DIM, device=device) / PATCH_DIM ** 0.5).to(dtype)
    bias = (torch.randn(DIM, device=device) * 0.02).to(dtype)
    pos_embed = torch.randn(NUM_PATCHES, DIM, device=device) * 0.02  # the fp32 table, as in SIM
    idx = _visible_indices(batch, device)
    train = mode == "fwd_bwd"
    if train:
        weight.requires_grad_()
        bias.requires_grad_()

    if variant == "reference":
        def embed():
            return patch_gather_reference(images, idx, PATCH, weight, bias, pos_embed)
    elif variant == "compiled":
        compiled = torch.compile(patch_gather_reference)

        def embed():
            return compiled(images, idx, PATCH, weight, bias, pos_embed)
    else:
        def embed():
            return patch_gather(images, idx, PATCH, weight, bias, pos_embed, backend="triton",
                                check_index=False)

    out_dtype = torch.promote_types(dtype, pos_embed.dtype)
    upstream = torch.randn(batch, VISIBLE, DIM, device=device).to(out_dtype) if train else None

    def call():
        out = embed()
        return out, torch.autograd.grad(out, (weight, bias), upstream) if train else None

    def run():
        result = call()
        sync()
        return result

    for _ in range(2):  # warm-up: compile, autotune, allocator
        run()
    peak = peak_extra_bytes(run, device)
    out, grads = benchmark(run)

    # correct at the benchmark size: against fp32 torch, within 2x the eager low-precision error
    assert out.shape == (batch, VISIBLE, DIM) and out.dtype == out_dtype
    lowp_leaves = [t.detach().requires_grad_() for t in (weight, bias)]
    lowp = patch_gather_reference(images, idx, PATCH, *lowp_leaves, pos_embed)
    truth_leaves = [t.detach().float().requires_grad_() for t in (weight, bias)]
    truth = patch_gather_reference(images.float(), idx, PATCH, *truth_leaves, pos_embed)
    _assert_lowp_rule(out, lowp, truth, "tokens")
    if train:
        grads_lowp = torch.autograd.grad(lowp, lowp_leaves, upstream)
        grads_truth = torch.autograd.grad(truth, truth_leaves, upstream.float())
        for name, grad, grad_lowp, grad_truth in zip(("weight", "bias"), grads, grads_lowp,
                                                     grads_truth):
            _assert_lowp_rule(grad, grad_lowp, grad_truth, name)

    size = _itemsize(dtype)
    tokens = batch * VISIBLE
    n_bytes = (tokens * PATCH_DIM * size                            # gathered pixels
               + DIM * PATCH_DIM * size + DIM * size                # weight, bias
               + min(NUM_PATCHES, tokens) * DIM * 4                 # pos rows used (fp32)
               + tokens * DIM * _itemsize(out_dtype))               # tokens written
    flops = 2 * tokens * PATCH_DIM * DIM
    if train:
        n_bytes += (tokens * DIM * _itemsize(out_dtype)             # upstream gradient
                    + tokens * PATCH_DIM * size                     # pixels re-read
                    + DIM * PATCH_DIM * size + DIM * size)          # weight / bias gradients
        flops *= 2
    _record(benchmark, device_ceilings, n_bytes, flops, variant=variant, mode=mode, batch=batch,
            image_size=IMAGE, patch_size=PATCH, visible=VISIBLE, num_patches=NUM_PATCHES,
            embed_dim=DIM, patch_dim=PATCH_DIM, dtype=str(dtype).removeprefix("torch."),
            pos_dtype="float32", out_dtype=str(out_dtype).removeprefix("torch."),
            check_index=False if variant == "triton" else None, peak_memory_bytes=peak,
            device=str(device),
            note=("fp32 operands: the Triton kernel runs tf32x3 (fp32-accurate, 3 tensor-core "
                  "passes) and torch runs true fp32; the matmul ceiling is the bf16 one")
            if dtype == torch.float32 else "bf16 operands, fp32 accumulation")
    record_host_overhead(benchmark, call, device)


# ---------------------------------------------------------------------------------------------
# token_gather
# ---------------------------------------------------------------------------------------------

@pytest.mark.benchmark(group="token_gather")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["reference", "compiled", "triton", "triton_unique"])
def test_token_gather(benchmark, bench_device, sync, device_ceilings, variant, batch, mode):
    if variant == "triton_unique" and mode == "fwd":
        pytest.skip("unique_indices only changes the backward")
    batch = _setup(variant, batch, bench_device)
    device, dtype = bench_device, torch.bfloat16
    tokens = torch.randn(batch, NUM_PATCHES, DIM, device=device).to(dtype)
    idx = _visible_indices(batch, device)
    train = mode == "fwd_bwd"
    tokens.requires_grad_(train)
    upstream = torch.randn(batch, VISIBLE, DIM, device=device).to(dtype) if train else None

    if variant == "reference":
        gather = token_gather_reference
    elif variant == "compiled":
        gather = torch.compile(token_gather_reference)
    else:
        unique = variant == "triton_unique"

        def gather(tokens, idx):
            return token_gather(tokens, idx, backend="triton", check_index=False,
                                unique_indices=unique)

    def call():
        out = gather(tokens, idx)
        return out, torch.autograd.grad(out, tokens, upstream)[0] if train else None

    def run():
        result = call()
        sync()
        return result

    for _ in range(2):
        run()
    peak = peak_extra_bytes(run, device)
    out, grad = benchmark(run)

    expected = token_gather_reference(tokens.detach(), idx)
    assert torch.equal(out, expected)
    if train:  # unique indices: every gradient value is one upstream value, exactly
        expected_grad = torch.zeros_like(tokens)
        expected_grad[torch.arange(batch, device=device)[:, None], idx] = upstream
        assert torch.equal(grad, expected_grad)

    values = 2 * batch * VISIBLE * DIM
    if train:
        values += batch * VISIBLE * DIM + batch * NUM_PATCHES * DIM
    _record(benchmark, device_ceilings, values * _itemsize(dtype), 0, variant=variant, mode=mode,
            batch=batch, num_tokens=NUM_PATCHES, visible=VISIBLE, embed_dim=DIM, dtype="bfloat16",
            check_index=False if variant.startswith("triton") else None, peak_memory_bytes=peak,
            device=str(device))
    record_host_overhead(benchmark, call, device)
