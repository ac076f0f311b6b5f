"""pixel_propagation against the issue-10 contract, on both implementations of the registered op:
"op_reference" (CPU tensors, backend="auto": densesim::pixel_propagation with use_triton=False,
the reference maths, its backward by formula) and "triton" (backend="triton": the Triton kernels --
in the interpreter on a CPU-only machine, TRITON_INTERPRET=1 from the root conftest; compiled on
CUDA tensors on a GPU).

    * zero host syncs, forward + backward, default arguments (tests/host_sync.py);
    * the drop-in use inside a user's torch.compile(fullgraph=True, backend="aot_eager") function,
      forward and backward, equal to eager within rtol = atol = 1e-6 (relative to the scale);
    * bad input under torch.compile: the same one-line ValueError (propagated without fullgraph,
      its message inside dynamo's "Observed exception" with fullgraph=True);
    * meta tensors, forward and backward (no value is read);
    * edge inputs against float64 PixPro: every off-diagonal cosine negative (a regular simplex),
      all tokens equal (a stride-0 expand, and scaled copies), one token (N = 1), an empty batch
      (B = 0, legal: empty outputs and gradients), transposed and strided views;
    * the launch plan cached per shape on plain Python values, and the kernels fed the caller's
      tensors as they are (no .contiguous()/dtype copies, float64 included).
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import pixel_propagation, pixel_propagation_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_sync import count_host_syncs

pp = importlib.import_module("kernels.pixel_propagation")
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not pp._TRITON_IMPORTABLE, reason="triton is not importable")
# path -> (device of the inputs, backend): both run the registered op
PATHS = {"op_reference": ("cpu", "auto"), "triton": (TRITON_DEVICE, "triton")}
PATH_PARAMS = [pytest.param("op_reference"), pytest.param("triton", marks=needs_triton)]
EPS32 = torch.finfo(torch.float32).eps


def pixpro_featprop(x, value, gamma):
    """zdaxie/PixPro `featprop` (see test_pixel_propagation.py), (B, N, channels) in and out."""
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


def dx_scale64(x, value, grad_y, gamma):
    """max_i sum_j |w_ij| / max(|x_i|, eps) in float64: the size of the two terms whose difference
    is dx_i (dx̂_i and its projection on x̂_i). Where they cancel (all tokens equal, a single
    token, an all-negative simplex) dx is fp32 rounding of this size, not a relative error."""
    x, value, dy = (t.detach().cpu().double() for t in (x, value, grad_y))
    unit = F.normalize(x, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    base = cos.clamp(min=0) + (1e-6 if gamma < 1 else 0.0)
    slope = torch.where(cos >= 0, gamma * base.pow(gamma - 1), torch.zeros_like(cos))
    ds = dy @ value.transpose(1, 2)
    w = slope * (ds + ds.transpose(1, 2))
    return float((w.abs().sum(-1) / x.norm(dim=-1).clamp_min(1e-12)).max())


def check_against_float64(fn, x, value, gamma, seed=0):
    """Forward and both gradients of <y, grad_y> against float64 PixPro; returns y."""
    grad_y = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64).to(device=value.device, dtype=torch.float32)
    y, grad_x, grad_v = forward_backward(fn, x, value, gamma, grad_y)
    want = forward_backward(pixpro_featprop, x.cpu().double(), value.cpu().double(), gamma,
                            grad_y.cpu().double())
    assert y.dtype == value.dtype and grad_x.dtype == x.dtype and grad_v.dtype == value.dtype
    assert y.shape == value.shape and grad_x.shape == x.shape and grad_v.shape == value.shape
    for got, ref in zip((y, grad_v), (want[0], want[2])):
        scale = max(float(ref.abs().max()), 1e-2)
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-5 * scale)
    # γ < 1: ds/dcos = γ (cos + 1e-6)^(γ-1) is steep near cos = 0 (fp32 cosines' rounding shows)
    rtol = 2e-5 if gamma >= 1 else 5e-4
    floor = 64 * EPS32 * dx_scale64(x, value, grad_y, gamma)
    torch.testing.assert_close(grad_x.cpu().double(), want[1], rtol=rtol,
                               atol=max(rtol * float(want[1].abs().max()), floor))
    return y


def _path_fn(backend):
    return lambda x, v, g: pixel_propagation(x, v, g, backend=backend)


# ----------------------------------------------------------------------------------------------
# no host sync
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS + ["plain_reference"])
def test_no_host_sync_forward_and_backward(path):
    device, backend = PATHS.get(path, ("cpu", "reference"))
    x = torch.randn(2, 37, 20, device=device, requires_grad=True)
    value = torch.randn(2, 37, 12, device=device, requires_grad=True)
    with count_host_syncs() as syncs:
        y = pixel_propagation(x, value, backend=backend)  # default gamma
        F.normalize(y, dim=-1).sum().backward()
    assert not syncs, syncs.report()
    assert x.grad is not None and value.grad is not None


# ----------------------------------------------------------------------------------------------
# torch.compile: the drop-in use, and bad input
# ----------------------------------------------------------------------------------------------

COMPILE_TOLERANCE = 1e-6  # relative to the scale: the op is opaque in the graph, the same kernels run


@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("path", PATH_PARAMS + ["plain_reference"])
def test_drop_in_inside_torch_compile_fullgraph(path, gamma):
    """PixPro's head as a user writes it: value = l2n(g(x)), pred = l2n(ppm(x, value)), a loss."""
    device, backend = PATHS.get(path, ("cpu", "reference"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 35, 16, generator=gen).to(device)
    weight = torch.randn(12, 16, generator=gen).to(device)
    target = F.normalize(torch.randn(2, 35, 12, generator=gen), dim=-1).to(device)

    def head(x, weight):
        value = F.normalize(x @ weight.t(), dim=-1)
        pred = F.normalize(pixel_propagation(x, value, gamma, backend=backend), dim=-1)
        return -(pred * target).sum(-1).mean()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    leaves_eager = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    leaves_compiled = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    eager = head(*leaves_eager)
    eager.backward()
    got = compiled(*leaves_compiled)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=COMPILE_TOLERANCE, atol=COMPILE_TOLERANCE)
    for a, b in zip(leaves_compiled, leaves_eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=COMPILE_TOLERANCE,
                                   atol=COMPILE_TOLERANCE * float(b.grad.abs().max()))


@pytest.mark.parametrize("path", PATH_PARAMS + ["plain_reference"])
def test_changing_gamma_inside_torch_compile(path):
    """A gamma passed as an argument that changes between calls: on the recompile dynamo makes it
    a SymFloat; the validation compares it (a guard) -- no graph break under fullgraph -- and
    every value gives the eager answer."""
    device, backend = PATHS.get(path, ("cpu", "reference"))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 13, 8, generator=gen).to(device)
    value = torch.randn(2, 13, 5, generator=gen).to(device)

    def user_step(x, gamma):
        return pixel_propagation(x, value, gamma, backend=backend).pow(2).sum()

    torch._dynamo.reset()  # user_step's code is shared by the parametrisations: fresh limits
    compiled = torch.compile(user_step, fullgraph=True, backend="aot_eager")
    for gamma in (2.0, 0.5, 1.5):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager = user_step(x1, gamma)
        eager.backward()
        got = compiled(x2, gamma)
        got.backward()
        torch.testing.assert_close(got, eager, rtol=COMPILE_TOLERANCE,
                                   atol=COMPILE_TOLERANCE * float(eager.detach().abs()))
        torch.testing.assert_close(x2.grad, x1.grad, rtol=COMPILE_TOLERANCE,
                                   atol=COMPILE_TOLERANCE * float(x1.grad.abs().max()))


BAD_INPUTS = [
    (lambda x, v: (x, v[:, :4], 2.0, "auto"),
     "pixel_propagation: value must have shape (B, N, Cv) with B=2, N=5 as x, got (2, 4, 3)"),
    (lambda x, v: (x[0], v, 2.0, "auto"), "pixel_propagation: x must be a float tensor of shape (B, N, C)"),
    (lambda x, v: (x[:, :0], v[:, :0], 2.0, "auto"), "pixel_propagation: x must have at least one token"),
    (lambda x, v: (x, v, -1.0, "auto"), "pixel_propagation: gamma must be a positive finite number, got -1.0"),
    (lambda x, v: (x, v, 2.0, "cuda"), "pixel_propagation: backend must be one of"),
]


@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_under_torch_compile_raises_the_same_message(backend, case):
    make, message = BAD_INPUTS[case]
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, value, gamma, case_backend = make(torch.randn(2, 5, 4, device=device),
                                         torch.randn(2, 5, 3, device=device))
    backend = backend if case_backend == "auto" else case_backend

    def user_step(x, value):
        return pixel_propagation(x, value, gamma, backend=backend).sum() * 2.0

    with pytest.raises(ValueError) as eager_error:
        user_step(x, value)
    assert str(eager_error.value).startswith(message) and "\n" not in str(eager_error.value)
    # without fullgraph dynamo falls back to eager: the ValueError itself propagates
    with pytest.raises(ValueError) as error:
        torch.compile(user_step, backend="aot_eager")(x, value)
    assert str(error.value) == str(eager_error.value)
    # with fullgraph=True dynamo raises Unsupported ("Observed exception") carrying the message
    torch._dynamo.reset()  # the fallback above marked user_step's frame to run eagerly
    with pytest.raises(torch._dynamo.exc.Unsupported) as wrapped:
        torch.compile(user_step, fullgraph=True, backend="aot_eager")(x, value)
    assert "Observed exception" in str(wrapped.value)
    assert str(eager_error.value) in str(wrapped.value)


# ----------------------------------------------------------------------------------------------
# meta tensors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_tensors_forward_and_backward(dtype):
    """PixPro at a stride-4 map (N = 3136, 256 images): nothing is read or allocated."""
    x = torch.empty(256, 3136, 256, device="meta", dtype=dtype, requires_grad=True)
    value = torch.empty(256, 256, 3136, device="meta", dtype=dtype).transpose(1, 2).requires_grad_()
    with count_host_syncs() as syncs:
        y = pixel_propagation(x, value)
        y.sum().backward()
    assert not syncs, syncs.report()
    assert y.device.type == "meta" and y.shape == (256, 3136, 256) and y.dtype == dtype
    assert x.grad.shape == x.shape and value.grad.shape == value.shape
    assert x.grad.dtype == value.grad.dtype == dtype


# ----------------------------------------------------------------------------------------------
# edge inputs against float64 PixPro, both implementations
# ----------------------------------------------------------------------------------------------

def simplex_tokens(batch, tokens, channels, gen):
    """The vertices of a regular simplex, randomly rotated and scaled: every off-diagonal cosine is
    -1/(N-1) < 0 (channels >= tokens). Stored channels-first and transposed (a strided view)."""
    centred = torch.eye(tokens, dtype=torch.float64) - 1.0 / tokens
    x = torch.zeros(batch, tokens, channels, dtype=torch.float64)
    x[..., :tokens] = centred
    rotation, _ = torch.linalg.qr(torch.randn(batch, channels, channels, generator=gen, dtype=torch.float64))
    scale = 0.5 + torch.rand(batch, tokens, 1, generator=gen, dtype=torch.float64)
    x = (x @ rotation) * scale
    return x.float().transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("gamma", [2.0, 1.0, 0.5])
@pytest.mark.parametrize("tokens,channels", [(2, 3), (5, 8), (40, 48)])
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_all_off_diagonal_cosines_negative(path, tokens, channels, gamma):
    """Only s_ii = 1 survives the clamp (γ < 1: the others are 1e-6^γ); padding in the last key
    tile (40 tokens: 32 + 8 under the interpreter) must add nothing."""
    device, backend = PATHS[path]
    gen = torch.Generator().manual_seed(tokens + channels)
    x = simplex_tokens(2, tokens, channels, gen).to(device)
    assert not x.is_contiguous()
    unit = F.normalize(x.double(), dim=-1)
    cos = unit @ unit.transpose(1, 2)
    off_diagonal = ~torch.eye(tokens, dtype=torch.bool, device=device)
    assert float(cos[:, off_diagonal].max()) < 0
    value = torch.randn(2, tokens, 7, generator=gen).to(device)
    y = check_against_float64(_path_fn(backend), x, value, gamma, seed=tokens)
    if gamma >= 1:  # y_i = value_i exactly: nothing else passes the clamp
        torch.testing.assert_close(y, value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_all_tokens_equal(path, gamma):
    """All cosines 1: y_i = Σ_j value_j for every i (equal rows in, equal rows out -- the op has no
    argmax, so no tie to break) and dx = 0 up to rounding (dx̂ is parallel to x̂). As one token
    expanded over N (a stride-0 view, read without a copy) and as scaled copies."""
    device, backend = PATHS[path]
    gen = torch.Generator().manual_seed(3)
    tokens, channels = 37, 12
    token = torch.randn(2, 1, channels, generator=gen).to(device)
    scales = (0.5 + torch.rand(2, tokens, 1, generator=gen)).to(device)
    value = torch.randn(2, tokens, 9, generator=gen).to(device)
    for x in (token.expand(2, tokens, channels), token * scales):
        y = check_against_float64(_path_fn(backend), x, value, gamma)
        torch.testing.assert_close(y, y[:, :1].expand_as(y), rtol=1e-6, atol=1e-6 * float(y.abs().max()))
        offset = 1e-6 if gamma < 1 else 0.0
        torch.testing.assert_close(y, value.sum(1, keepdim=True).expand_as(y) * (1 + offset) ** gamma,
                                   rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("batch,channels,value_channels,gamma", [(3, 5, 4, 2.0), (1, 1, 1, 0.5),
                                                                 (2, 300, 3, 1.0)])
def test_single_token(path, batch, channels, value_channels, gamma):
    """N = 1: y = (1 + offset)^γ value, dx = 0 up to rounding."""
    device, backend = PATHS[path]
    gen = torch.Generator().manual_seed(batch + channels)
    x = torch.randn(batch, 1, channels, generator=gen).to(device)
    value = torch.randn(batch, 1, value_channels, generator=gen).to(device)
    y = check_against_float64(_path_fn(backend), x, value, gamma)
    torch.testing.assert_close(y, value * (1 + (1e-6 if gamma < 1 else 0.0)) ** gamma, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATH_PARAMS + ["plain_reference"])
def test_empty_batch_is_legal(path):
    """B = 0: empty y and empty gradients of the right shapes and dtypes, nothing launched."""
    device, backend = PATHS.get(path, ("cpu", "reference"))
    x = torch.randn(0, 7, 5, device=device, requires_grad=True)
    value = torch.randn(0, 7, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = pixel_propagation(x, value, backend=backend)
    assert y.shape == (0, 7, 3) and y.dtype == torch.float64
    grad_x, grad_v = torch.autograd.grad(y.sum(), (x, value))
    assert grad_x.shape == (0, 7, 5) and grad_x.dtype == torch.float32
    assert grad_v.shape == (0, 7, 3) and grad_v.dtype == torch.float64
    use_triton = path == "triton"
    if path != "plain_reference":
        y = torch.ops.densesim.pixel_propagation(x, value, 2.0, use_triton)
        grads = torch.ops.densesim.pixel_propagation_backward(y, x, value, 2.0, use_triton)
        assert [tuple(g.shape) for g in grads] == [(0, 7, 5), (0, 7, 3)]


# ----------------------------------------------------------------------------------------------
# launch plan cache and no copies
# ----------------------------------------------------------------------------------------------

@needs_triton
def test_launch_plan_is_cached_per_shape_on_plain_values(monkeypatch):
    keys_seen = []
    cached = pp._launch_plan

    def recording(*key):
        keys_seen.append(key)
        return cached(*key)

    monkeypatch.setattr(pp, "_launch_plan", recording)
    cached.cache_clear()
    x = torch.randn(2, 21, 10, device=TRITON_DEVICE, requires_grad=True)
    value = torch.randn(2, 21, 6, device=TRITON_DEVICE, requires_grad=True)
    for _ in range(3):
        pixel_propagation(x, value, backend="triton").sum().backward()
    info = cached.cache_info()
    assert info.misses == 2 and info.hits == 4  # one plan per pass, made once
    for key in keys_seen:
        assert all(isinstance(part, (bool, int, torch.dtype)) for part in key), key
    # float64 inputs share the fp32 plans (the kernels compute them in fp32)
    pixel_propagation(x.double(), value.double(), backend="triton").sum().backward()
    assert cached.cache_info().misses == 2


class _RecordLaunch:
    """Wraps a Triton kernel: records the tensor arguments of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append([a for a in args if isinstance(a, torch.Tensor)])
            return self.kernel[grid](*args, **kwargs)
        return launch


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_take_the_callers_tensors_without_copies(monkeypatch, dtype):
    forward = _RecordLaunch(pp._ppm_fwd_kernel)
    backward = _RecordLaunch(pp._ppm_bwd_kernel)
    monkeypatch.setattr(pp, "_ppm_fwd_kernel", forward)
    monkeypatch.setattr(pp, "_ppm_bwd_kernel", backward)
    x = torch.randn(2, 11, 33, device=TRITON_DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
    value = torch.randn(2, 33, 14, device=TRITON_DEVICE, dtype=dtype)[..., ::2].requires_grad_()
    y = pixel_propagation(x, value, backend="triton")
    grad_x, grad_v = torch.autograd.grad(y.sum(), (x, value))  # dy: a stride-0 expand
    (x_k, v_k, y_k), = forward.launches
    assert (x_k.data_ptr(), x_k.stride(), x_k.dtype) == (x.data_ptr(), x.stride(), dtype)
    assert (v_k.data_ptr(), v_k.stride(), v_k.dtype) == (value.data_ptr(), value.stride(), dtype)
    assert y_k.dtype == dtype and y_k.data_ptr() == y.data_ptr()  # written in its final dtype
    (x_k, v_k, dy_k, dx_k, dv_k), = backward.launches
    assert x_k.data_ptr() == x.data_ptr() and v_k.data_ptr() == value.data_ptr()
    assert dy_k.stride() == (0, 0, 0) and dy_k.dtype == dtype
    assert dx_k.data_ptr() == grad_x.data_ptr() and dv_k.data_ptr() == grad_v.data_ptr()
    want = forward_backward(pixpro_featprop, x.detach().cpu().double(), value.detach().cpu().double(), 2.0,
                            torch.ones(y.shape, dtype=torch.float64))
    for got, ref in zip((y.detach(), grad_x, grad_v), want):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=2e-5, atol=2e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_auto_and_triton_run_the_registered_op(monkeypatch, path):
    """"auto" on CPU and "triton" call densesim::pixel_propagation (use_triton False / True);
    "reference" the plain-autograd pixel_propagation_reference."""
    device, backend = PATHS[path]
    calls = []
    real = pp._pixel_propagation_op

    def spy(x, value, gamma, use_triton):
        calls.append(use_triton)
        return real(x, value, gamma, use_triton)

    monkeypatch.setattr(pp, "_pixel_propagation_op", spy)
    x, value = torch.randn(1, 4, 3, device=device), torch.randn(1, 4, 2, device=device)
    pixel_propagation(x, value, backend=backend)
    assert calls == [path == "triton"]
    pixel_propagation(x, value, backend="reference")
    assert calls == [path == "triton"]
    torch.testing.assert_close(pixel_propagation(x, value, backend=backend),
                               pixel_propagation_reference(x, value), rtol=1e-6, atol=1e-6)
