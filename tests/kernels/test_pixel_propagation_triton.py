"""The Triton path of kernels/pixel_propagation.py (PixPro's PPM) against float64 PixPro `featprop`.

On a CPU-only machine these run the kernels in the Triton interpreter (the root conftest sets
TRITON_INTERPRET=1), at small shapes chosen so that every block-boundary case is hit: several row
and key tiles (the interpreter's tiles are 32 tokens), ragged last tiles, the one-tile and the looped
channel paths for x (C > 256) and for value (Cv > 256), and explicit 16-wide configurations that
loop everything. On a GPU the same tests run the compiled kernels on CUDA tensors.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels import pixel_propagation, pixel_propagation_reference

pp = importlib.import_module("kernels.pixel_propagation")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not pp._TRITON_IMPORTABLE, reason="triton is not importable")
pytestmark = needs_triton


def pixpro_featprop(x, value, gamma):
    """zdaxie/PixPro `featprop` (OFFICIAL.md §2) in the inputs' dtype, channels-first as PixPro:
    fn = l2n(x) (B, C, N); A = clamp(einsum('bci,bcj->bij', fn, fn), min=0) [+1e-6 if γ < 1] ^ γ;
    y = einsum('bcj,bij->bci', v, A). Takes and returns (B, N, channels)."""
    fn = F.normalize(x.transpose(1, 2), dim=1)
    sim = torch.einsum("bci,bcj->bij", fn, fn).clamp(min=0.0)
    if gamma < 1:
        sim = sim + 1e-6
    sim = sim ** gamma
    return torch.einsum("bcj,bij->bci", value.transpose(1, 2), sim).transpose(1, 2)


def forward_backward(fn, x, value, gamma, grad_y):
    x = x.detach().requires_grad_()
    value = value.detach().requires_grad_()
    y = fn(x, value, gamma)
    grad_x, grad_v = torch.autograd.grad(y, (x, value), grad_y)
    return y.detach(), grad_x, grad_v


def expected64(x, value, gamma, grad_y):
    """float64 forward and gradients of <y, grad_y> (autograd through PixPro's formula), on the CPU."""
    return forward_backward(pixpro_featprop, x.cpu().double(), value.cpu().double(), gamma,
                            grad_y.cpu().double())


def assert_close64(got, want, rtol=1e-5):
    """A result against float64, relative to the tensor's scale (at least 1e-2)."""
    scale = max(float(want.abs().max()), 1e-2)
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=rtol * scale)


def triton_fn(x, value, gamma):
    return pixel_propagation(x, value, gamma, backend="triton")


def check_fp32(x, value, gamma, fn=triton_fn):
    grad_y = torch.randn(value.shape, device=value.device)
    y, grad_x, grad_v = forward_backward(fn, x, value, gamma, grad_y)
    want_y, want_x, want_v = expected64(x, value, gamma, grad_y)
    assert y.dtype == grad_x.dtype == grad_v.dtype == torch.float32
    assert y.shape == value.shape and grad_x.shape == x.shape and grad_v.shape == value.shape
    assert_close64(y, want_y)
    assert_close64(grad_v, want_v)
    if x.shape[1] == 1:  # one token: dx is exactly 0, a difference of O(|dy||v|/|x|) terms
        assert float(grad_x.abs().max()) <= 1e-6 * float(grad_y.norm() * value.norm() / x.norm())
        return
    assert_close64(grad_x, want_x, rtol=2e-5 if gamma >= 1 else 5e-4)  # γ < 1: steep near cos = 0


@pytest.mark.parametrize("batch,tokens,channels,value_channels,gamma", [
    (3, 13, 37, 29, 2.0),    # odd sizes, one tile
    (2, 49, 16, 24, 1.0),    # PixPro's 7x7: 2 x 2 tiles of 32 tokens, ragged; γ = 1
    (2, 40, 20, 24, 0.5),    # γ < 1: the +1e-6 branch, and masked key columns must stay 0
    (1, 70, 300, 20, 1.5),   # C > 256: the looped Gram; 3 tiles; a general power
    (1, 20, 12, 300, 2.0),   # Cv > 256: two value chunks, the looped ds GEMMs
    (1, 1, 4, 3, 2.0),       # a single token
])
def test_triton_fp32_forward_and_gradients(batch, tokens, channels, value_channels, gamma):
    x = torch.randn(batch, tokens, channels, device=DEVICE) * 3
    value = F.normalize(torch.randn(batch, tokens, value_channels, device=DEVICE), dim=-1)
    check_fp32(x, value, gamma)


TILE_CONFIGS = {
    # 3 row tiles x 3 key tiles; x and value channels in ragged 16-wide K chunks and output chunks
    "all_looped": dict(BLOCK_N=16, BLOCK_M=16, BLOCK_C=16, BLOCK_V=16, OUT_C=16, OUT_V=16),
    # the GPU's fp32 shape: narrow K chunks, wider output chunks (dx's key tile loaded apart)
    "narrow_k_wide_out": dict(BLOCK_N=16, BLOCK_M=32, BLOCK_C=16, BLOCK_V=16, OUT_C=32, OUT_V=32),
    # rows held in registers (one K chunk) but dx written in two chunks
    "held_rows_split_out": dict(BLOCK_N=32, BLOCK_M=16, BLOCK_C=64, BLOCK_V=32, OUT_C=32, OUT_V=16),
}


class _WithConfig(torch.autograd.Function):
    """The launchers with an explicit configuration (the op always picks _ppm_config's)."""

    @staticmethod
    def forward(ctx, x, value, gamma, config):
        ctx.save_for_backward(x, value)
        ctx.gamma, ctx.config = gamma, config
        return pp._pixel_propagation_triton(x, value, gamma, config=config)

    @staticmethod
    def backward(ctx, grad_y):
        x, value = ctx.saved_tensors
        grad_x, grad_v = pp._pixel_propagation_backward_triton(grad_y, x, value, ctx.gamma, config=ctx.config)
        return grad_x, grad_v, None, None


@pytest.mark.parametrize("name,gamma", [("all_looped", 2.0), ("narrow_k_wide_out", 0.7),
                                        ("held_rows_split_out", 1.0)])
def test_triton_tile_configurations(name, gamma):
    config = dict(TILE_CONFIGS[name], num_warps=4, num_stages=2)
    x = torch.randn(2, 37, 41, device=DEVICE)
    value = torch.randn(2, 37, 29, device=DEVICE)
    check_fp32(x, value, gamma, lambda x, v, g: _WithConfig.apply(x, v, g, config))


@pytest.mark.parametrize("gamma", [2.0, 1.0, 0.5])
def test_triton_matches_the_reference_with_many_negative_cosines(gamma):
    """About half the pairs have cosine near -1 (clamped away); 45 tokens = 2 tiles of 32."""
    direction = F.normalize(torch.randn(2, 1, 24), dim=-1)
    signs = torch.where(torch.rand(2, 45, 1) < 0.5, -1.0, 1.0)
    x = (signs * direction * 4 + 0.8 * torch.randn(2, 45, 24) / 24 ** 0.5).to(DEVICE)
    value = torch.randn(2, 45, 19, device=DEVICE)
    cosines = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)
    assert float((cosines < -0.5).float().mean()) > 0.3
    check_fp32(x, value, gamma)
    # and the same numbers as the reference backend, forward and backward
    grad_y = torch.randn(2, 45, 19, device=DEVICE)
    got = forward_backward(triton_fn, x, value, gamma, grad_y)
    ref = forward_backward(pixel_propagation_reference, x, value, gamma, grad_y)
    for a, b in zip(got, ref):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=(1e-5 if gamma >= 1 else 1e-4) * scale)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_triton_all_zero_token(gamma):
    x = torch.randn(2, 35, 8, device=DEVICE)
    x[0, 3] = 0
    x[1, 34] = 0   # in the second (ragged) tile
    value, grad_y = torch.randn(2, 35, 6, device=DEVICE), torch.randn(2, 35, 6, device=DEVICE)
    y, grad_x, grad_v = forward_backward(triton_fn, x, value, gamma, grad_y)
    want_y, want_x, want_v = expected64(x, value, gamma, grad_y)
    assert torch.isfinite(y).all() and torch.isfinite(grad_x).all()
    assert_close64(y, want_y)
    assert_close64(grad_v, want_v)
    zero = torch.zeros(2, 35, dtype=torch.bool)
    zero[0, 3] = zero[1, 34] = True
    assert_close64(grad_x[~zero], want_x[~zero], rtol=5e-4 if gamma < 1 else 2e-5)
    for b, i in ((0, 3), (1, 34)):  # below eps F.normalize's gradient is a plain 1e12 scaling
        assert_close64(grad_x[b, i], want_x[b, i], rtol=5e-4)
    if gamma == 2.0:
        assert not grad_x[zero].any() and not y[zero].any()


def test_triton_non_contiguous_inputs_and_broadcast_gradient():
    x = torch.randn(3, 10, 40, device=DEVICE).transpose(1, 2)             # (3, 40, 10), channel stride 40
    value = torch.randn(3, 40, 2 * 13, device=DEVICE)[..., ::2]           # every other channel
    assert not x.is_contiguous() and not value.is_contiguous()
    x, value = x.requires_grad_(), value.requires_grad_()
    y = pixel_propagation(x, value, backend="triton")
    grad_x, grad_v = torch.autograd.grad(y.sum(), (x, value))             # dy: a stride-0 expand
    want_y, want_x, want_v = expected64(x, value, 2.0, torch.ones(y.shape))
    assert_close64(y.detach(), want_y)
    assert_close64(grad_x, want_x, rtol=2e-5)
    assert_close64(grad_v, want_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_rule(dtype):
    """|kernel - ref64| <= 2 |torch's own low-precision answer - ref64| + one rounding step."""
    x = torch.randn(2, 49, 32, device=DEVICE).to(dtype)
    value = F.normalize(torch.randn(2, 49, 24, device=DEVICE), dim=-1).to(dtype)
    grad_y = torch.randn(2, 49, 24, device=DEVICE).to(dtype)
    got = forward_backward(triton_fn, x, value, 2.0, grad_y)
    assert all(t.dtype == dtype for t in got)
    low = forward_backward(pixpro_featprop, x, value, 2.0, grad_y)
    want = expected64(x, value, 2.0, grad_y)
    for g, lo, w in zip(got, low, want):
        err = (g.cpu().double() - w).abs()
        low_err = (lo.cpu().double() - w).abs()
        assert (err <= 2 * low_err + 2 ** -8 * float(w.abs().max())).all()


def test_triton_mixed_and_float64_inputs():
    x, value = torch.randn(2, 21, 16, device=DEVICE), torch.randn(2, 21, 12, device=DEVICE)
    y = pixel_propagation(x.bfloat16(), value, backend="triton")          # y in value's dtype
    assert y.dtype == torch.float32
    assert_close64(y, pixpro_featprop(x.bfloat16().cpu().double(), value.cpu().double(), 2.0))
    x64 = x.double().requires_grad_()
    v64 = value.double().requires_grad_()
    y64 = pixel_propagation(x64, v64, backend="triton")                  # fp32 inside, float64 out
    grad_x, grad_v = torch.autograd.grad(y64.sum(), (x64, v64))
    assert y64.dtype == grad_x.dtype == grad_v.dtype == torch.float64
    want_y, want_x, want_v = expected64(x, value, 2.0, torch.ones(y64.shape))
    assert_close64(y64.detach(), want_y)
    assert_close64(grad_x, want_x, rtol=2e-5)
    assert_close64(grad_v, want_v)


def test_triton_writes_every_output_and_handles_empty_batches():
    x, value = torch.randn(2, 37, 20, device=DEVICE), torch.randn(2, 37, 18, device=DEVICE)
    y = pp._pixel_propagation_triton(x, value, 2.0)
    grad_x, grad_v = pp._pixel_propagation_backward_triton(torch.randn_like(y), x, value, 2.0)
    assert torch.isfinite(y).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_v).all()
    assert y.is_contiguous() and grad_x.is_contiguous() and grad_v.is_contiguous()
    x_empty, v_empty = x[:0].clone().requires_grad_(), value[:0].clone().requires_grad_()
    empty = pixel_propagation(x_empty, v_empty, backend="triton")
    grad_x, grad_v = torch.autograd.grad(empty.sum(), (x_empty, v_empty))
    assert empty.shape == (0, 37, 18) and grad_x.shape == (0, 37, 20) and grad_v.shape == (0, 37, 18)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_opcheck_triton_implementation(gamma):
    """Every opcheck utility (schema, autograd registration, fake tensor, aot dispatch) on both
    registered ops with use_triton=True: the forward with requires_grad inputs, and the backward."""
    x = torch.randn(2, 9, 7, device=DEVICE, requires_grad=True)
    value = torch.randn(2, 9, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.densesim.pixel_propagation.default, (x, value, gamma, True))
    torch.library.opcheck(torch.ops.densesim.pixel_propagation_backward.default,
                          (torch.randn(2, 9, 5, device=DEVICE), x.detach(), value.detach(), gamma, True))
    # strided inputs and a stride-0 gradient
    x_t = torch.randn(2, 7, 9, device=DEVICE).transpose(1, 2)
    v_s = torch.randn(2, 9, 10, device=DEVICE)[..., ::2]
    torch.library.opcheck(torch.ops.densesim.pixel_propagation_backward.default,
                          (torch.ones(1, 1, 1, device=DEVICE).expand(2, 9, 5), x_t, v_s, gamma, True))


def test_validates_before_any_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(pp, "_pixel_propagation_triton", no_launch)
    x, value = torch.randn(2, 5, 4, device=DEVICE), torch.randn(2, 5, 3, device=DEVICE)
    for bad_x, bad_v, message in [(x[0], value, "x must be a float tensor"), (x, value[:1], "value must have shape"),
                                  (x.long(), value, "x must be a float"), (x[:, :0], value[:, :0], "at least one token"),
                                  (x, value.to("meta"), "same device")]:
        with pytest.raises(ValueError, match=message):
            pixel_propagation(bad_x, bad_v, backend="triton")
    with pytest.raises(ValueError, match="gamma"):
        pixel_propagation(x, value, gamma=-1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        pixel_propagation(x, value, backend="Triton")


@pytest.mark.skipif(CUDA, reason="simulates a CPU-only machine")
def test_triton_backend_without_cuda_or_interpreter_raises(monkeypatch):
    x, value = torch.randn(1, 3, 4), torch.randn(1, 3, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="pixel_propagation: backend='triton' needs CUDA tensors"):
        pixel_propagation(x, value, backend="triton")
    with pytest.raises(RuntimeError, match="the Triton kernels need CUDA tensors"):
        torch.ops.densesim.pixel_propagation(x, value, 2.0, True)
    monkeypatch.setattr(pp, "_TRITON_IMPORTABLE", False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        pixel_propagation(x, value, backend="triton")
    # "auto" on CPU is the reference, interpreter or not
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(pp, "_TRITON_IMPORTABLE", True)
    monkeypatch.setattr(pp, "_pixel_propagation_triton", None)
    assert pixel_propagation(x, value).shape == (1, 3, 2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda_and_stores_no_token_by_token_matrix(monkeypatch):
    calls = []
    real = pp._pixel_propagation_triton
    monkeypatch.setattr(pp, "_pixel_propagation_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 9, 16, device="cuda", requires_grad=True)
    value = torch.randn(2, 9, 8, device="cuda", requires_grad=True)
    pixel_propagation(x, value).sum().backward()
    assert calls and x.grad is not None and value.grad is not None
    # N = 784 tokens: one (B, N, N) fp32 matrix would be 9.8 MB; inputs + outputs are ~3.2 MB
    x = torch.randn(4, 784, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    value = torch.randn(4, 784, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = pixel_propagation(x, value)
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 4 * 4 * 784 * 784
