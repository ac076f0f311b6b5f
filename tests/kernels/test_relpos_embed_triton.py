"""Triton paths of relpos_embed (the table) and relpos_query_embed (the fused query block).

Checked against float64 formulas written out here (independent of the kernel file's helpers), plus
the registered ops' Triton implementation (use_triton=True): opcheck, torch.compile, no host sync,
edge inputs. On a CPU-only machine the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
the root conftest.py); on a CUDA machine the same tests run on CUDA tensors.
"""
import importlib
import math
import os

import pytest
import torch

from kernels.relpos_embed import (
    absolute_sincos_table,
    relpos_embed,
    relpos_embed_reference,
    relpos_query_embed,
    relpos_query_embed_reference,
)
from tests.host_sync import count_host_syncs

# the package re-exports the function `relpos_embed`, which shadows the submodule attribute
rk = importlib.import_module("kernels.relpos_embed")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(
    not rk._TRITON_IMPORTABLE or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1")


def _random_rel(batch, seed, device=DEVICE, dtype=torch.float32):
    """Plausible SIM geometry: offsets within a crop or two, scale ratios in [0.3, 3.3], both flips."""
    g = torch.Generator().manual_seed(seed)
    rel = torch.empty(batch, 6, dtype=torch.float64)
    rel[:, 0:2] = torch.rand(batch, 2, generator=g, dtype=torch.float64) * 1.6 - 0.8
    rel[:, 2:4] = torch.exp(torch.rand(batch, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    rel[:, 4] = (torch.arange(batch) % 2).double()
    rel[:, 5] = torch.rand(batch, generator=g, dtype=torch.float64) * 2.0 - 0.5
    return rel.to(device=device, dtype=dtype)


def _table64(rel, grid, dim):
    """(B, G*G, 2*dim) float64 straight from spec section 4.3."""
    r = rel.detach().double().cpu()
    quarter = dim // 4
    omega = torch.tensor([10000.0 ** (-k / quarter) for k in range(quarter)], dtype=torch.float64)
    centres = torch.arange(grid, dtype=torch.float64) + 0.5
    y = r[:, 2:3] * centres + grid * r[:, 0:1] - 0.5
    x_same = r[:, 3:4] * centres + grid * r[:, 1:2] - 0.5
    x_flip = -r[:, 3:4] * centres + grid * r[:, 5:6] - 0.5
    x = torch.where(r[:, 4:5] == 1, x_flip, x_same)
    batch = r.shape[0]
    y = y[:, :, None].expand(batch, grid, grid).reshape(batch, grid * grid)
    x = x[:, None, :].expand(batch, grid, grid).reshape(batch, grid * grid)
    s_h = (10 * torch.log(r[:, 2]))[:, None].expand(batch, grid * grid)
    s_w = (10 * torch.log(r[:, 3]))[:, None].expand(batch, grid * grid)

    def encode(values):
        angles = values[..., None] * omega
        return [angles.sin(), angles.cos()]

    return torch.cat(encode(y) + encode(x) + encode(s_h) + encode(s_w), dim=-1)


def _params(d_out, dim, seed, dtype=torch.float32, mask_shape=None, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, 2 * dim, generator=g, dtype=torch.float64) / math.sqrt(2 * dim)
    bias = torch.randn(d_out, generator=g, dtype=torch.float64) * 0.1
    mask = torch.randn(*(mask_shape or (d_out,)), generator=g, dtype=torch.float64) * 0.02
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (weight, bias, mask)]


def _queries64_and_grads(rel, grid, weight, bias, mask, grad_out):
    w, b, m = [t.detach().double().cpu().requires_grad_() for t in (weight, bias, mask)]
    queries = m.reshape(-1) + _table64(rel, grid, w.shape[1] // 2) @ w.t() + b
    grads = torch.autograd.grad(queries, [w, b, m], grad_out.detach().double().cpu())
    return queries.detach(), grads


def _assert_close64(actual, expected, rel_tol=1e-5):
    """fp32 check against float64, tolerance scaled by the expected magnitude."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=rel_tol, atol=rel_tol * scale)


# ---------------------------------------------------------------------------------------------
# relpos_embed: the table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,grid,dim,contiguous", [
    (1, 14, 64, True), (3, 5, 20, False), (2, 7, 36, True), (4, 3, 200, False)])
def test_table_matches_float64(batch, grid, dim, contiguous):
    rel = _random_rel(batch, seed=grid * 100 + dim)
    if not contiguous:
        rel = rel.t().contiguous().t()  # column-major storage: strides (1, B)
        assert not rel.is_contiguous()
    table = relpos_embed(rel, grid, dim, backend="triton")
    assert table.shape == (batch, grid * grid, 2 * dim) and table.dtype == torch.float32
    assert not table.requires_grad
    # fp32 angles: |angle| <~ 30 here, so ~ulp(30) = 2e-6 of angle error
    torch.testing.assert_close(table.double().cpu(), _table64(rel, grid, dim), rtol=0, atol=2e-5)
    torch.testing.assert_close(table, relpos_embed_reference(rel, grid, dim), rtol=0, atol=2e-5)


def test_table_identity_boxes_give_the_absolute_table():
    grid, dim, batch = 14, 32, 2
    rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]] * batch, device=DEVICE)
    table = relpos_embed(rel, grid, dim, backend="triton")
    absolute = absolute_sincos_table(grid, dim, device=DEVICE)
    torch.testing.assert_close(table[:, :, :dim], absolute.expand(batch, -1, -1), rtol=0, atol=2e-6)
    quarter = dim // 4
    scale_block = torch.cat([torch.zeros(quarter), torch.ones(quarter)] * 2).to(DEVICE)
    torch.testing.assert_close(table[:, :, dim:], scale_block.expand(batch, grid * grid, -1), rtol=0, atol=1e-6)


def test_table_float64_and_bf16_rel():
    rel = _random_rel(3, seed=7, dtype=torch.float64).requires_grad_()
    table = relpos_embed(rel, 4, 8, backend="triton")
    assert table.dtype == torch.float32 and not table.requires_grad
    torch.testing.assert_close(table.double().cpu(), _table64(rel, 4, 8), rtol=0, atol=2e-5)
    rel_bf16 = rel.detach().to(torch.bfloat16)
    torch.testing.assert_close(relpos_embed(rel_bf16, 4, 8, backend="triton").double().cpu(),
                               _table64(rel_bf16, 4, 8), rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# relpos_query_embed: forward and gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,grid,dim,d_out,mask_shape", [
    (1, 5, 20, 20, (20,)),
    (2, 7, 36, 36, (1, 1, 36)),
    (3, 5, 20, 24, (1, 1, 24)),   # D != dim
    (2, 14, 64, 48, (48,)),       # the recipe's grid
    (5, 3, 8, 20, (20,)),         # dim/4 = 2, far below the K block
])
def test_query_fp32_forward_and_gradients(batch, grid, dim, d_out, mask_shape):
    rel = _random_rel(batch, seed=batch * 1000 + grid * 10 + dim)
    weight, bias, mask = _params(d_out, dim, seed=dim + d_out, mask_shape=mask_shape)
    queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    assert queries.shape == (batch, grid * grid, d_out) and queries.dtype == torch.float32
    grad_out = torch.randn(queries.shape, device=DEVICE)
    expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    _assert_close64(queries, expected)
    grads = torch.autograd.grad(queries, [weight, bias, mask], grad_out)
    assert grads[2].shape == mask.shape
    for got, want in zip(grads, expected_grads):
        _assert_close64(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_query_low_precision_rule(dtype):
    batch, grid, dim, d_out = 2, 7, 36, 36
    rel = _random_rel(batch, seed=11)
    weight, bias, mask = _params(d_out, dim, seed=3, dtype=dtype, mask_shape=(1, 1, d_out))
    queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    assert queries.dtype == dtype
    grad_out = torch.randn(queries.shape, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(queries, [weight, bias, mask], grad_out)
    assert [g.dtype for g in grads] == [dtype] * 3
    expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    lowp = relpos_query_embed_reference(rel, grid, weight, bias, mask)
    lowp_grads = torch.autograd.grad(lowp, [weight, bias, mask], grad_out)
    for got, torch_lowp, want in zip([queries, *grads], [lowp, *lowp_grads], [expected, *expected_grads]):
        err = float((got.detach().double().cpu() - want).abs().max())
        torch_err = float((torch_lowp.detach().double().cpu() - want).abs().max())
        assert err <= 2 * torch_err + 1e-3 * float(want.abs().max()), (err, torch_err)


def test_query_fp32_params_into_bf16_out():
    """SIM under bf16 autocast: fp32 parameters, queries written into the bf16 predictor buffer."""
    batch, grid, dim = 2, 5, 20
    rel = _random_rel(batch, seed=5)
    weight, bias, mask = _params(dim, dim, seed=5, mask_shape=(1, 1, dim))
    out = torch.full((batch, grid * grid, dim), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    result = relpos_query_embed(rel, grid, weight, bias, mask, out=out, backend="triton")
    assert result is out and result.dtype == torch.bfloat16
    expected, _ = _queries64_and_grads(rel, grid, weight, bias, mask, torch.zeros(result.shape))
    torch.testing.assert_close(result.double().cpu(), expected, rtol=2 ** -8, atol=1e-3)
    grads = torch.autograd.grad(result.float().sum(), [weight, bias, mask])
    _, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, torch.ones(result.shape))
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        _assert_close64(got, want)


def test_query_under_autocast_into_bf16_buffer():
    """SIM's configuration: fp32 parameters, bf16 autocast, queries written into a bf16 buffer.
    Low-precision rule against the reference run under the same autocast."""
    batch, grid, dim = 2, 7, 36
    rel = _random_rel(batch, seed=13)
    weight, bias, mask = _params(dim, dim, seed=13, mask_shape=(1, 1, dim))
    grad_out = torch.randn(batch, grid * grid, dim, device=DEVICE).to(torch.bfloat16)
    results = {}
    for backend in ("triton", "reference"):
        out = torch.full((batch, grid * grid, dim), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            queries = relpos_query_embed(rel, grid, weight, bias, mask, out=out, backend=backend)
        assert queries is out and queries.dtype == torch.bfloat16
        grads = torch.autograd.grad(queries, [weight, bias, mask], grad_out)
        assert [g.dtype for g in grads] == [torch.float32] * 3
        results[backend] = [queries, *grads]
    expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    for got, torch_lowp, want in zip(results["triton"], results["reference"], [expected, *expected_grads]):
        err = float((got.detach().double().cpu() - want).abs().max())
        torch_err = float((torch_lowp.detach().double().cpu() - want).abs().max())
        assert err <= 2 * torch_err + 1e-3 * float(want.abs().max()), (err, torch_err)


def test_query_non_contiguous_inputs_and_grad_out():
    batch, grid, dim, d_out = 3, 5, 20, 24
    rel = _random_rel(batch, seed=9).t().contiguous().t()
    w_storage = torch.randn(2 * dim, d_out, device=DEVICE) / math.sqrt(2 * dim)
    weight = w_storage.t().requires_grad_(False)          # (D, 2*dim), strides (1, D)
    b_storage = torch.randn(2 * d_out, device=DEVICE) * 0.1
    bias = b_storage[::2]                                  # stride 2
    m_storage = torch.randn(1, 2, d_out, device=DEVICE) * 0.02
    mask = m_storage[:, :1]                                # (1, 1, D) view
    weight, bias, mask = [t.detach().requires_grad_() for t in (weight, bias, mask)]
    # detach() keeps the strides
    assert not weight.is_contiguous() and bias.stride(0) == 2
    queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    grad_out = torch.randn(batch, d_out, grid * grid, device=DEVICE).transpose(1, 2)  # strided
    expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    _assert_close64(queries, expected)
    grads = torch.autograd.grad(queries, [weight, bias, mask], grad_out)
    for got, want in zip(grads, expected_grads):
        _assert_close64(got, want)


def test_query_identity_boxes():
    """Identical boxes: R(a, b) = [P(a, b), 0..0 1..1 0..0 1..1] (spec section 4.3)."""
    batch, grid, dim = 2, 7, 20
    rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]] * batch, device=DEVICE)
    weight, bias, mask = _params(dim, dim, seed=21)
    queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    quarter = dim // 4
    scale_block = torch.cat([torch.zeros(quarter), torch.ones(quarter)] * 2).double()
    absolute = absolute_sincos_table(grid, dim).double()
    table = torch.cat([absolute, scale_block.expand(grid * grid, -1)], dim=1)
    w, b, m = [t.detach().double().cpu() for t in (weight, bias, mask)]
    expected = (m + table @ w.t() + b).expand(batch, -1, -1)
    torch.testing.assert_close(queries.detach().double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries_first", [False, True])
def test_query_out_buffer_matches_cat_formulation(queries_first):
    """The model's use: [cls ; visible ; queries] in one preallocated buffer, no torch.cat. The
    buffer (poisoned with NaN) holds grad-requiring values in its first 1+K rows (written before or
    after the queries); gradients through it must equal those of the torch.cat formulation exactly."""
    batch, grid, dim, visible = 3, 5, 20, 6
    rel = _random_rel(batch, seed=31)
    weight, bias, mask = _params(dim, dim, seed=31, mask_shape=(1, 1, dim))
    head_source = torch.randn(batch, 1 + visible, dim, device=DEVICE, requires_grad=True)
    grad_total = torch.randn(batch, 1 + visible + grid * grid, dim, device=DEVICE)

    buffer = torch.full((batch, 1 + visible + grid * grid, dim), float("nan"), device=DEVICE)
    if not queries_first:
        buffer[:, :1 + visible] = head_source * 2.0
    out_view = buffer[:, 1 + visible:]
    assert not out_view.is_contiguous()
    result = relpos_query_embed(rel, grid, weight, bias, mask, out=out_view, backend="triton")
    if queries_first:
        buffer[:, :1 + visible] = head_source * 2.0
    assert result is out_view
    assert result.data_ptr() == buffer[:, 1 + visible:].data_ptr()
    assert not torch.isnan(buffer).any()
    grads_buffer = torch.autograd.grad((buffer * grad_total).sum(), [head_source, weight, bias, mask])

    queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    concatenated = torch.cat([head_source * 2.0, queries], dim=1)
    assert torch.equal(concatenated.detach(), buffer.detach())
    grads_cat = torch.autograd.grad((concatenated * grad_total).sum(), [head_source, weight, bias, mask])
    for got, want in zip(grads_buffer, grads_cat):
        assert torch.equal(got, want)
    torch.testing.assert_close(grads_buffer[0], 2.0 * grad_total[:, :1 + visible])
    _, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_total[:, 1 + visible:])
    for got, want in zip(grads_buffer[1:], expected_grads):
        _assert_close64(got, want)

    # the reference path writes into the buffer the same way
    buffer_ref = torch.full_like(buffer, float("nan"))
    buffer_ref[:, :1 + visible] = head_source * 2.0
    relpos_query_embed(rel, grid, weight, bias, mask, out=buffer_ref[:, 1 + visible:], backend="reference")
    torch.testing.assert_close(buffer_ref, buffer, rtol=1e-5, atol=1e-5)
    grads_ref = torch.autograd.grad((buffer_ref * grad_total).sum(), [head_source, weight, bias, mask])
    for got, want in zip(grads_ref, grads_buffer):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_query_poisoned_out_fully_overwritten_and_batch_one():
    grid, dim = 7, 36
    rel = _random_rel(1, seed=41)
    weight, bias, mask = _params(dim, dim, seed=41)
    out = torch.full((1, grid * grid, dim), float("nan"), device=DEVICE)
    with torch.no_grad():
        result = relpos_query_embed(rel, grid, weight, bias, mask, out=out, backend="triton")
    assert result is out and torch.isfinite(out).all()
    expected, _ = _queries64_and_grads(rel, grid, weight, bias, mask, torch.zeros(out.shape))
    _assert_close64(out, expected)


def test_query_partial_and_no_gradients():
    batch, grid, dim = 2, 5, 20
    rel = _random_rel(batch, seed=51)
    weight, bias, mask = _params(dim, dim, seed=51)
    bias.requires_grad_(False)
    mask.requires_grad_(False)
    queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    grad_out = torch.randn(queries.shape, device=DEVICE)
    (grad_weight,) = torch.autograd.grad(queries, [weight], grad_out)
    _, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    _assert_close64(grad_weight, expected_grads[0])
    weight.requires_grad_(False)
    mask.requires_grad_(True)
    queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    (grad_mask,) = torch.autograd.grad(queries, [mask], grad_out)
    _assert_close64(grad_mask, expected_grads[2])
    mask.requires_grad_(False)
    assert not relpos_query_embed(rel, grid, weight, bias, mask, backend="triton").requires_grad


def test_query_empty_batch():
    rel = torch.zeros(0, 6, device=DEVICE)
    weight, bias, mask = _params(20, 20, seed=0)
    queries = relpos_query_embed(rel, 5, weight, bias, mask, backend="triton")
    assert queries.shape == (0, 25, 20)
    grads = torch.autograd.grad(queries.sum(), [weight, bias, mask])
    assert all(float(g.abs().sum()) == 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: validation must reject before it."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    for name in ("_query_forward_triton", "_relpos_table_triton", "_grad_reduce_triton"):
        monkeypatch.setattr(rk, name, boom)


def _good_args(batch=2, grid=5, dim=20, d_out=20):
    rel = _random_rel(batch, seed=0)
    weight, bias, mask = _params(d_out, dim, seed=0)
    return rel, grid, weight, bias, mask


VALUE_NEEDLES = ("dh", "dw", "relflip", "finite")


def _value_check_args_on_cpu(args):
    """The value checks on rel raise a ValueError at once on CPU tensors only: on CUDA they are
    torch._assert_async (no host sync), whose failure is a device-side assert that poisons the CUDA
    context of the test process. On a CUDA machine the value-check cases therefore run on CPU
    copies (backend 'auto': the reference maths op, whose check runs before any work); the CUDA
    form is tested in a subprocess (test_value_check_on_cuda_is_a_device_side_assert)."""
    if DEVICE.type != "cuda":
        return args
    args = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    args["backend"] = "auto"
    return args


@pytest.mark.parametrize("change,needle", [
    (lambda a: a.update(weight=a["weight"][:, :36]), "weight must be"),          # 2*dim = 36, dim % 4 != 0
    (lambda a: a.update(weight=a["weight"][0]), "weight must be"),
    (lambda a: a.update(weight=a["weight"].double()), "weight must be float32"),
    (lambda a: a.update(bias=a["bias"][:-1]), "bias must have shape"),
    (lambda a: a.update(mask_token=a["mask_token"][:-1]), "mask_token must have shape"),
    (lambda a: a.update(mask_token=a["mask_token"].reshape(1, 2, 10)), "mask_token must have shape"),
    (lambda a: a.update(out=torch.empty(2, 24, 20, device=DEVICE)), "out must be"),
    (lambda a: a.update(out=torch.empty(2, 25, 20, dtype=torch.float64, device=DEVICE)), "out must be"),
    (lambda a: a.update(out=torch.empty(2, 25, 20, device="meta")), "out must be on"),
    (lambda a: a.update(weight=torch.empty(20, 40, device="meta")), "weight must be on"),
    (lambda a: a.update(grid=0), "grid must be"),
    (lambda a: a.update(rel=a["rel"][:, :5]), "rel must be"),
    (lambda a: a["rel"].__setitem__((0, 2), -1.0), "dh"),
    (lambda a: a["rel"].__setitem__((1, 4), 0.5), "relflip"),
    (lambda a: a["rel"].__setitem__((1, 0), float("inf")), "finite"),
    (lambda a: a.update(backend="fast"), "backend"),
])
def test_query_rejects_bad_inputs_before_launch(no_launch, change, needle):
    rel, grid, weight, bias, mask = _good_args()
    args = dict(rel=rel, grid=grid, weight=weight.detach(), bias=bias.detach(), mask_token=mask.detach(),
                out=None, backend="triton")
    change(args)
    if needle in VALUE_NEEDLES:
        args = _value_check_args_on_cpu(args)
    with pytest.raises(ValueError, match="relpos_query_embed") as info:
        relpos_query_embed(**args)
    assert needle in str(info.value)


def test_table_rejects_bad_inputs_before_launch(no_launch):
    rel = _random_rel(2, seed=0)
    with pytest.raises(ValueError, match="dim must be"):
        relpos_embed(rel, 5, 18, backend="triton")
    rel[0, 3] = 0.0
    args = _value_check_args_on_cpu({"rel": rel, "grid": 5, "dim": 16, "backend": "triton"})
    with pytest.raises(ValueError, match="dw"):
        relpos_embed(**args)


def test_triton_backend_without_cuda_or_interpreter_raises(monkeypatch):
    rel, grid, weight, bias, mask = _good_args()
    rel, weight, bias, mask = [t.detach().cpu() for t in (rel, weight, bias, mask)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        relpos_embed(rel, grid, 16, backend="triton")
    monkeypatch.setattr(rk, "_TRITON_IMPORTABLE", False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        relpos_query_embed(rel.to(DEVICE), grid, weight.to(DEVICE), bias.to(DEVICE), mask.to(DEVICE),
                           backend="triton")


def test_auto_on_cpu_runs_the_reference(no_launch):
    rel, grid, weight, bias, mask = _good_args()
    rel, weight, bias, mask = [t.detach().cpu() for t in (rel, weight, bias, mask)]
    queries = relpos_query_embed(rel, grid, weight, bias, mask)
    torch.testing.assert_close(queries, relpos_query_embed_reference(rel, grid, weight, bias, mask))
    torch.testing.assert_close(relpos_embed(rel, grid, 20), relpos_embed_reference(rel, grid, 20))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda(monkeypatch):
    calls = []
    original = rk._query_forward_triton
    monkeypatch.setattr(rk, "_query_forward_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    rel, grid, weight, bias, mask = _good_args()
    relpos_query_embed(rel, grid, weight, bias, mask)
    assert calls


def test_check_values_false_skips_only_the_value_checks():
    """check_values=False: no value check (and no host sync), but shapes are still validated."""
    rel, grid, weight, bias, mask = _good_args()
    bad = rel.clone()
    bad[:, 2] = -1.0  # dh <= 0: rejected by default
    args = _value_check_args_on_cpu({"rel": bad, "grid": grid, "weight": weight, "bias": bias,
                                     "mask_token": mask})
    with pytest.raises(ValueError, match="dh"):
        relpos_query_embed(**args)
    out = relpos_query_embed(bad, grid, weight, bias, mask, check_values=False)
    assert out.shape == (rel.shape[0], grid * grid, weight.shape[0])
    with pytest.raises(ValueError, match="rel must be a float tensor of shape"):
        relpos_query_embed(rel[:, :5], grid, weight, bias, mask, check_values=False)
    torch.testing.assert_close(relpos_query_embed(rel, grid, weight, bias, mask, check_values=False),
                               relpos_query_embed(rel, grid, weight, bias, mask))


# ---------------------------------------------------------------------------------------------
# Registered ops with use_triton=True (the CUDA implementation; the interpreter on CPU)
# ---------------------------------------------------------------------------------------------

OPS = torch.ops.densesim


def test_opcheck_registered_ops_triton():
    """opcheck of every op's Triton implementation (small shapes: it runs in the interpreter on CPU)."""
    rel, grid, dim, d_out = _random_rel(3, seed=61), 3, 8, 12
    weight, bias, mask = _params(d_out, dim, seed=61, mask_shape=(1, 1, d_out))
    plain = [t.detach() for t in (weight, bias, mask)]
    torch.library.opcheck(OPS.relpos_embed.default, (rel.clone().requires_grad_(), grid, dim, True, True))
    torch.library.opcheck(OPS.relpos_query_embed.default,
                          (rel, weight, bias, mask, grid, torch.float32, True, True, True))
    torch.library.opcheck(OPS.relpos_query_embed.default,
                          (rel, *plain, grid, torch.bfloat16, True, True, True))
    out = torch.empty(3, grid * grid, d_out, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(OPS.relpos_query_embed_into.default,
                          (out, rel, *plain, grid, torch.float32, True, True, True))
    for gemm_dtype in (torch.float32, torch.bfloat16):
        _, saved = OPS.relpos_query_embed(rel, *plain, grid, gemm_dtype, True, True, True)
        assert saved.dtype == gemm_dtype and saved.shape == (3 * (2 * grid + 2) * dim // 2,)
        grad = torch.randn(3, grid * grid, d_out, device=DEVICE)
        for need_weight in (True, False):
            torch.library.opcheck(OPS.relpos_query_embed_backward.default,
                                  (grad, saved, grid, 2 * dim, gemm_dtype, torch.float32, torch.float32,
                                   torch.float32, torch.float32, [1, 1, d_out], need_weight, True))


def test_no_host_syncs_on_the_triton_path():
    """Forward + backward of both public ops with backend='triton' and default arguments (value
    checks ON): zero Python-level reads of a tensor value (on CPU: the interpreted kernels)."""
    rel, grid, dim, d_out = _random_rel(3, seed=62), 4, 8, 12
    weight, bias, mask = _params(d_out, dim, seed=62, mask_shape=(1, 1, d_out))
    with count_host_syncs() as syncs:
        queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
        torch.autograd.grad(queries.sum(), [weight, bias, mask])
        buffer = torch.zeros(3, 1 + grid * grid, d_out, dtype=torch.bfloat16, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            relpos_query_embed(rel, grid, weight, bias, mask, out=buffer[:, 1:], backend="triton")
        torch.autograd.grad(buffer.float().sum(), [weight, bias, mask])
        relpos_embed(rel, grid, dim, backend="triton")
    assert not syncs, syncs.report()


@pytest.mark.parametrize("use_out", [False, True])
def test_triton_path_inside_torch_compile(use_out):
    """backend='triton' inside a user's fullgraph compiled function: the ops are opaque nodes,
    forward and backward equal to eager."""
    rel, grid, dim, d_out = _random_rel(3, seed=63), 5, 12, 20
    weight, bias, mask = _params(d_out, dim, seed=63, mask_shape=(1, 1, d_out))
    head = torch.randn(3, 2, d_out, device=DEVICE, requires_grad=True)

    def user(rel, weight, bias, mask, head):
        if use_out:
            buffer = head.new_empty(rel.shape[0], 2 + grid * grid, d_out)
            buffer[:, :2] = head * 2.0
            relpos_query_embed(rel, grid, weight, bias, mask, out=buffer[:, 2:], backend="triton")
            queries = buffer
        else:
            queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton") * 2.0 + head.sum()
        return (queries * queries).sum() + relpos_embed(rel, grid, dim, backend="triton").sum()

    leaves = [weight, bias, mask, head]
    loss = torch.compile(user, fullgraph=True, backend="aot_eager")(rel, *leaves)
    grads = torch.autograd.grad(loss, leaves)
    expected = user(rel, *leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_query_under_autocast_without_out_keeps_weight_dtype():
    """The Triton path's dtype policy under autocast, as before: no `out` -> weight.dtype (fp32 for
    SIM's fp32 Linear), fp32 gradients; the numbers follow the low-precision rule against the
    reference run under the same autocast (which also returns fp32: fp32 mask + bf16 Linear)."""
    batch, grid, dim = 2, 5, 20
    rel = _random_rel(batch, seed=64)
    weight, bias, mask = _params(dim, dim, seed=64, mask_shape=(1, 1, dim))
    grad_out = torch.randn(batch, grid * grid, dim, device=DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            queries = relpos_query_embed(rel, grid, weight, bias, mask, backend=backend)
        assert queries.dtype == torch.float32
        grads = torch.autograd.grad(queries, [weight, bias, mask], grad_out)
        assert [g.dtype for g in grads] == [torch.float32] * 3
        results[backend] = [queries, *grads]
    expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    for got, torch_lowp, want in zip(results["triton"], results["reference"], [expected, *expected_grads]):
        err = float((got.detach().double().cpu() - want).abs().max())
        torch_err = float((torch_lowp.detach().double().cpu() - want).abs().max())
        assert err <= 2 * torch_err + 1e-3 * float(want.abs().max()), (err, torch_err)


def test_table_empty_batch_and_single_cell():
    table = relpos_embed(torch.zeros(0, 6, device=DEVICE), 5, 16, backend="triton")
    assert table.shape == (0, 25, 32) and table.dtype == torch.float32
    rel = _random_rel(3, seed=65)
    table = relpos_embed(rel, 1, 16, backend="triton")
    torch.testing.assert_close(table.double().cpu(), _table64(rel, 1, 16), rtol=0, atol=2e-5)


def test_query_empty_batch_into_a_buffer():
    weight, bias, mask = _params(20, 20, seed=66, mask_shape=(1, 1, 20))
    head = torch.zeros(0, 2, 20, device=DEVICE, requires_grad=True)
    buffer = torch.empty(0, 2 + 25, 20, device=DEVICE)
    buffer[:, :2] = head
    out = relpos_query_embed(torch.zeros(0, 6, device=DEVICE), 5, weight, bias, mask, out=buffer[:, 2:],
                             backend="triton")
    assert out.shape == (0, 25, 20)
    grads = torch.autograd.grad(buffer.sum(), [weight, bias, mask, head])
    for grad, like in zip(grads, (weight, bias, mask, head)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and not grad.any()


@pytest.mark.parametrize("case", ["grid1", "single_image_zero_offsets", "zero_offsets_flipped"])
def test_query_edge_geometry(case):
    """grid = 1 (one cell: x, y from the one centre), one image, rel with all-zero offsets
    (identical boxes: di = dj = dj_flip = 0, dh = dw = 1, relflip 0 or 1), against float64."""
    grid, batch = (1, 3) if case == "grid1" else (5, 1 if case.startswith("single") else 2)
    rel = _random_rel(batch, seed=67)
    if "zero_offsets" in case:
        rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, float(case.endswith("flipped")), 0.0]] * batch,
                           device=DEVICE)
    dim, d_out = 12, 20
    weight, bias, mask = _params(d_out, dim, seed=67)
    for use_out in (False, True):
        if use_out:
            out = torch.full((batch, grid * grid, d_out), float("nan"), device=DEVICE)
            queries = relpos_query_embed(rel, grid, weight, bias, mask, out=out, backend="triton")
        else:
            queries = relpos_query_embed(rel, grid, weight, bias, mask, backend="triton")
        grad_out = torch.randn(queries.shape, device=DEVICE)
        expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
        _assert_close64(queries, expected)
        for got, want in zip(torch.autograd.grad(queries, [weight, bias, mask], grad_out), expected_grads):
            _assert_close64(got, want)


def test_launch_plans_are_cached_per_shape():
    rel, grid, dim, d_out = _random_rel(2, seed=68), 3, 8, 12
    weight, bias, mask = _params(d_out, dim, seed=68)
    relpos_query_embed(rel, grid, weight, bias, mask, backend="triton").sum().backward()
    before = (rk._query_plan.cache_info().hits, rk._reduce_plan.cache_info().hits)
    relpos_query_embed(rel, grid, weight, bias, mask, backend="triton").sum().backward()
    after = (rk._query_plan.cache_info().hits, rk._reduce_plan.cache_info().hits)
    assert after == (before[0] + 1, before[1] + 1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_value_check_on_cuda_is_a_device_side_assert():
    """On CUDA the value check does not sync: the call returns at once, and the failure stops the
    next synchronisation (a device-side assert, so in a subprocess: it poisons the CUDA context)."""
    import subprocess
    import sys
    code = ("import torch\n"
            "from kernels import relpos_query_embed\n"
            "rel = torch.tensor([[0.0, 0.0, -1.0, 1.0, 0.0, 0.0]], device='cuda')\n"
            "w = torch.randn(8, 16, device='cuda'); b = torch.zeros(8, device='cuda')\n"
            "q = relpos_query_embed(rel, 3, w, b, b)\n"
            "print('RETURNED', flush=True)\n"
            "torch.cuda.synchronize()\n"
            "print('NOT STOPPED', flush=True)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=root, check=False)
    assert "RETURNED" in result.stdout, result.stderr
    assert "NOT STOPPED" not in result.stdout and result.returncode != 0


def test_bias_and_mask_gradients_do_not_share_storage():
    """grad_bias and grad_mask are the same sum: they come back as two tensors (an accumulation into
    bias.grad must never change mask_token.grad)."""
    weight, bias, mask = _params(12, 8, seed=69)
    queries = relpos_query_embed(_random_rel(2, seed=69), 3, weight, bias, mask, backend="triton")
    queries.sum().backward()
    assert bias.grad.untyped_storage().data_ptr() != mask.grad.untyped_storage().data_ptr()
    torch.testing.assert_close(bias.grad, mask.grad, rtol=0, atol=0)
