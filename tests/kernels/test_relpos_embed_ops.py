"""relpos_embed / relpos_query_embed as registered torch ops (densesim::relpos_embed,
densesim::relpos_query_embed, densesim::relpos_query_embed_into, densesim::relpos_query_embed_backward),
their CPU implementation (the reference maths, use_triton=False): opcheck, the drop-in use inside a
user's torch.compile, meta tensors, the no-host-sync rule, the device-side value checks, autocast,
and edge inputs against a float64 formula written out here. The Triton implementation of the same
ops is tested in test_relpos_embed_triton.py."""
import importlib
import math

import pytest
import torch

from kernels import (
    relpos_embed,
    relpos_embed_reference,
    relpos_query_embed,
    relpos_query_embed_reference,
)
from tests.host_sync import count_host_syncs

rk = importlib.import_module("kernels.relpos_embed")  # the package's `relpos_embed` is the function
OPS = torch.ops.densesim


def _random_rel(batch, seed, dtype=torch.float32):
    """Plausible SIM geometry: offsets within a crop or two, scale ratios in [0.3, 3.3], both flips."""
    g = torch.Generator().manual_seed(seed)
    rel = torch.empty(batch, 6, dtype=torch.float64)
    rel[:, 0:2] = torch.rand(batch, 2, generator=g, dtype=torch.float64) * 1.6 - 0.8
    rel[:, 2:4] = torch.exp(torch.rand(batch, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    rel[:, 4] = (torch.arange(batch) % 2).double()
    rel[:, 5] = torch.rand(batch, generator=g, dtype=torch.float64) * 2.0 - 0.5
    return rel.to(dtype)


def _params(d_out, dim, seed, dtype=torch.float32, mask_shape=None, mask_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, 2 * dim, generator=g, dtype=torch.float64) / math.sqrt(2 * dim)
    bias = torch.randn(d_out, generator=g, dtype=torch.float64) * 0.1
    mask = torch.randn(*(mask_shape or (d_out,)), generator=g, dtype=torch.float64) * 0.02
    return (weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_(),
            mask.to(mask_dtype).requires_grad_())


def _table64(rel, grid, dim):
    """(B, G*G, 2*dim) float64 straight from spec section 4.3."""
    r = rel.detach().double()
    quarter = dim // 4
    omega = torch.tensor([10000.0 ** (-k / quarter) for k in range(quarter)], dtype=torch.float64)
    centres = torch.arange(grid, dtype=torch.float64) + 0.5
    y = r[:, 2:3] * centres + grid * r[:, 0:1] - 0.5
    x = torch.where(r[:, 4:5] == 1, -r[:, 3:4] * centres + grid * r[:, 5:6] - 0.5,
                    r[:, 3:4] * centres + grid * r[:, 1:2] - 0.5)
    batch = r.shape[0]
    y = y[:, :, None].expand(batch, grid, grid).reshape(batch, grid * grid)
    x = x[:, None, :].expand(batch, grid, grid).reshape(batch, grid * grid)
    s_h = (10 * torch.log(r[:, 2]))[:, None].expand(batch, grid * grid)
    s_w = (10 * torch.log(r[:, 3]))[:, None].expand(batch, grid * grid)
    blocks = []
    for values in (y, x, s_h, s_w):
        angles = values[..., None] * omega
        blocks += [angles.sin(), angles.cos()]
    return torch.cat(blocks, dim=-1)


def _queries64_and_grads(rel, grid, weight, bias, mask, grad_out):
    w, b, m = [t.detach().double().requires_grad_() for t in (weight, bias, mask)]
    queries = m.reshape(-1) + _table64(rel, grid, w.shape[1] // 2) @ w.t() + b
    grads = torch.autograd.grad(queries, [w, b, m], grad_out.detach().double())
    return queries.detach(), grads


def _assert_close64(actual, expected, rel_tol=1e-5):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rel_tol, atol=rel_tol * scale)


def _forward_backward(rel, grid, weight, bias, mask, backend, out_dtype=None, seed=0, autocast=False):
    """(result, grads of weight/bias/mask [/head]) for a random upstream gradient; with out_dtype the
    queries go into a NaN-poisoned (B, 2 + G*G, D) buffer whose first two rows hold 2*head."""
    batch, d_out = rel.shape[0], weight.shape[0]
    leaves = [weight, bias, mask]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if out_dtype is None:
            result = relpos_query_embed(rel, grid, weight, bias, mask, backend=backend)
        else:
            head = torch.randn(batch, 2, d_out, generator=torch.Generator().manual_seed(seed),
                               requires_grad=True)
            leaves.append(head)
            result = torch.full((batch, 2 + grid * grid, d_out), float("nan"), dtype=out_dtype)
            result[:, :2] = head * 2.0
            returned = relpos_query_embed(rel, grid, weight, bias, mask, out=result[:, 2:],
                                          backend=backend)
            assert returned.data_ptr() == result[:, 2:].data_ptr()
    grad_out = torch.randn(result.shape, generator=torch.Generator().manual_seed(seed + 1)).to(result.dtype)
    grads = torch.autograd.grad(result, leaves, grad_out)
    return result.detach(), grads


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------

def test_opcheck_registered_ops():
    """opcheck (schema, fake, autograd registration, aot dispatch) of every op, reference maths."""
    rel, grid, dim, d_out = _random_rel(3, seed=1), 3, 8, 12
    weight, bias, mask = _params(d_out, dim, seed=1, mask_shape=(1, 1, d_out))
    plain = [t.detach() for t in (weight, bias, mask)]
    torch.library.opcheck(OPS.relpos_embed.default, (rel.clone().requires_grad_(), grid, dim, True, False))
    torch.library.opcheck(OPS.relpos_embed.default, (rel, 1, 4, False, False))
    torch.library.opcheck(OPS.relpos_query_embed.default,
                          (rel, weight, bias, mask, grid, torch.float32, True, True, False))
    torch.library.opcheck(OPS.relpos_query_embed.default,
                          (rel, *plain, grid, torch.bfloat16, False, True, False))
    out = torch.empty(3, grid * grid, d_out, dtype=torch.bfloat16)
    torch.library.opcheck(OPS.relpos_query_embed_into.default,
                          (out, rel, *plain, grid, torch.float32, True, True, False))
    _, saved = OPS.relpos_query_embed(rel, *plain, grid, torch.float32, True, True, False)
    grad = torch.randn(3, grid * grid, d_out, generator=torch.Generator().manual_seed(2))
    for need_weight in (True, False):
        torch.library.opcheck(OPS.relpos_query_embed_backward.default,
                              (grad, saved, grid, 2 * dim, torch.float32, torch.float32, torch.float32,
                               torch.float32, torch.float32, [1, 1, d_out], need_weight, False))


def test_registered_ops_outputs():
    rel, grid, dim, d_out = _random_rel(2, seed=3), 4, 8, 12
    weight, bias, mask = [t.detach() for t in _params(d_out, dim, seed=3)]
    table = OPS.relpos_embed(rel, grid, dim, True, False)
    assert torch.equal(table, relpos_embed_reference(rel, grid, dim))
    queries, saved = OPS.relpos_query_embed(rel, weight, bias, mask, grid, torch.float32, True, True, False)
    assert torch.equal(queries, relpos_query_embed_reference(rel, grid, weight, bias, mask))
    assert torch.equal(saved, table)  # the reference maths keep the Linear's input, as autograd would
    _, nothing = OPS.relpos_query_embed(rel, weight, bias, mask, grid, torch.float32, False, True, False)
    assert nothing.shape == (0,)
    out = torch.full((2, grid * grid, d_out), float("nan"))
    OPS.relpos_query_embed_into(out, rel, weight, bias, mask, grid, torch.float32, False, True, False)
    assert torch.equal(out, queries)


def test_weight_gradient_needs_the_saved_tensors():
    rel, grid = _random_rel(2, seed=4), 3
    weight, bias, mask = _params(8, 8, seed=4)
    queries, _ = OPS.relpos_query_embed(rel, weight, bias, mask, grid, torch.float32, False, True, False)
    with pytest.raises(RuntimeError, match="keep_for_weight_grad=False"):
        queries.sum().backward()


@pytest.mark.parametrize("use_out", [False, True])
def test_works_inside_torch_compile(use_out):
    """The drop-in use: the public ops inside a user's fullgraph compiled function (no graph break),
    forward and backward equal to eager (bit for bit: the same ops run)."""
    rel, grid, dim, d_out = _random_rel(3, seed=5), 5, 12, 20
    weight, bias, mask = _params(d_out, dim, seed=5, mask_shape=(1, 1, d_out))
    head = torch.randn(3, 2, d_out, generator=torch.Generator().manual_seed(5), requires_grad=True)

    def user(rel, weight, bias, mask, head):
        if use_out:
            buffer = head.new_empty(rel.shape[0], 2 + grid * grid, d_out)
            buffer[:, :2] = head * 2.0
            relpos_query_embed(rel, grid, weight, bias, mask, out=buffer[:, 2:])
            queries = buffer
        else:
            queries = relpos_query_embed(rel, grid, weight, bias, mask) * 2.0 + head.sum()
        return (queries * queries).sum() + relpos_embed(rel, grid, dim).sum()

    compiled = torch.compile(user, fullgraph=True, backend="aot_eager")
    leaves = [weight, bias, mask, head]
    loss = compiled(rel, *leaves)
    grads = torch.autograd.grad(loss, leaves)
    expected = user(rel, *leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_compiled_under_autocast_keeps_dtypes():
    rel, grid, dim, d_out = _random_rel(2, seed=6), 3, 8, 12
    weight, bias, mask = _params(d_out, dim, seed=6, mask_shape=(1, 1, d_out))

    def user(rel, weight, bias, mask):
        out = torch.empty(rel.shape[0], grid * grid, d_out, dtype=torch.bfloat16)
        relpos_query_embed(rel, grid, weight, bias, mask, out=out)
        return relpos_query_embed(rel, grid, weight, bias, mask) + 1.0, out * 1.0

    compiled = torch.compile(user, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(rel, weight, bias, mask)
        want = user(rel, weight, bias, mask)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32, torch.bfloat16]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_bad_input_under_compile():
    rel, grid = _random_rel(2, seed=7), 3
    weight, bias, mask = [t.detach() for t in _params(8, 8, seed=7)]

    def user(rel, weight):
        return relpos_query_embed(rel, grid, weight, bias, mask) * 2.0

    shape_message = "relpos_query_embed: rel must be a float tensor of shape \\(B, 6\\)"
    with pytest.raises(ValueError, match=shape_message):
        torch.compile(user, backend="aot_eager")(rel[:, :5], weight)
    with pytest.raises(Exception) as info:
        torch.compile(user, fullgraph=True, backend="aot_eager")(rel[:, :5], weight)
    assert "relpos_query_embed: rel must be a float tensor of shape (B, 6)" in str(info.value)
    # a value check runs inside the op's implementation, which runs eagerly in the compiled graph:
    # on CPU it is the same ValueError, with or without fullgraph
    bad = rel.clone()
    bad[1, 3] = 0.0
    for fullgraph in (False, True):
        torch._dynamo.reset()
        with pytest.raises(ValueError, match=r"relpos_query_embed: rel\[:, 2\] \(dh\) and rel\[:, 3\] \(dw\)"):
            torch.compile(user, fullgraph=fullgraph, backend="aot_eager")(bad, weight)


def test_meta_tensors_need_no_values():
    """The public ops on meta tensors at the recipe size: validation and fake impls read no value."""
    rel = torch.empty(128, 6, device="meta")
    weight = torch.empty(768, 1536, device="meta", requires_grad=True)
    bias = torch.empty(768, device="meta", requires_grad=True)
    mask = torch.empty(1, 1, 768, device="meta", requires_grad=True)
    queries = relpos_query_embed(rel, 14, weight, bias, mask)
    assert queries.device.type == "meta" and queries.shape == (128, 196, 768)
    grads = torch.autograd.grad(queries.sum(), [weight, bias, mask])
    assert [g.shape for g in grads] == [weight.shape, bias.shape, mask.shape]
    buffer = torch.empty(128, 1 + 49 + 196, 768, device="meta", dtype=torch.bfloat16)
    assert relpos_query_embed(rel, 14, weight, bias, mask, out=buffer[:, 50:]).dtype == torch.bfloat16
    table = relpos_embed(rel, 14, 768)
    assert table.device.type == "meta" and table.shape == (128, 196, 1536)


# ---------------------------------------------------------------------------------------------
# No host sync; value checks on the device
# ---------------------------------------------------------------------------------------------

def test_no_host_syncs_on_the_op_path():
    """Forward + backward of both public ops, default arguments (value checks ON), reference maths
    op path ("auto" on CPU): zero Python-level reads of a tensor value."""
    rel, grid, dim, d_out = _random_rel(3, seed=8), 4, 8, 12
    weight, bias, mask = _params(d_out, dim, seed=8, mask_shape=(1, 1, d_out))
    with count_host_syncs() as syncs:
        queries = relpos_query_embed(rel, grid, weight, bias, mask)
        torch.autograd.grad(queries.sum(), [weight, bias, mask])
        buffer = torch.zeros(3, 1 + grid * grid, d_out, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            relpos_query_embed(rel, grid, weight, bias, mask, out=buffer[:, 1:])
        torch.autograd.grad(buffer.float().sum(), [weight, bias, mask])
        relpos_embed(rel, grid, dim)
    assert not syncs, syncs.report()


@pytest.mark.parametrize("column,value,needle", [
    (2, 0.0, "dh"), (3, -1.0, "dw"), (4, 0.5, "relflip"), (4, 2.0, "relflip"),
    (0, float("nan"), "finite"), (5, float("inf"), "finite"), (2, float("nan"), "finite"),
])
def test_value_checks_raise_on_cpu_and_can_be_skipped(column, value, needle):
    rel = _random_rel(3, seed=9)
    rel[1, column] = value
    weight, bias, mask = [t.detach() for t in _params(8, 8, seed=9)]
    for call in (lambda **kw: relpos_query_embed(rel, 3, weight, bias, mask, **kw),
                 lambda **kw: relpos_embed(rel, 3, 8, **kw)):
        for backend in ("auto", "reference"):
            with pytest.raises(ValueError, match="^relpos_(query_)?embed: rel") as info:
                call(backend=backend)
            assert needle in str(info.value) and "\n" not in str(info.value)
            assert call(backend=backend, check_values=False).shape[:2] == (3, 9)
    with pytest.raises(ValueError, match=needle):
        OPS.relpos_query_embed(rel, weight, bias, mask, 3, torch.float32, False, True, False)
    OPS.relpos_query_embed(rel, weight, bias, mask, 3, torch.float32, False, False, False)


def test_check_on_device_helper():
    rk._check_on_device(torch.tensor(True), "never raised")
    with pytest.raises(ValueError, match="^the message$"):
        rk._check_on_device(torch.tensor(False), "the message")
    rk._check_on_device(torch.empty((), dtype=torch.bool, device="meta"), "no value on meta")


# ---------------------------------------------------------------------------------------------
# Autocast and dtypes: the op path keeps the previous results and dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
def test_op_path_equals_the_reference_bit_for_bit(autocast, weight_dtype, out_dtype):
    """"auto" on CPU ran relpos_query_embed_reference before the ops were registered; the op path
    (reference maths) must give the same numbers and dtypes, forward and gradients (also the
    gradient through the buffer's other rows), under bf16 autocast too (SIM's online branch: fp32
    Linear parameters, fp32 geometry, a bf16 predictor buffer)."""
    rel, grid, dim, d_out = _random_rel(3, seed=10), 5, 12, 20
    results = {}
    for backend in ("auto", "reference"):
        weight, bias, mask = _params(d_out, dim, seed=10, dtype=weight_dtype, mask_shape=(1, 1, d_out))
        results[backend] = _forward_backward(rel, grid, weight, bias, mask, backend, out_dtype, seed=3,
                                             autocast=autocast)
    (got, got_grads), (want, want_grads) = results["auto"], results["reference"]
    assert got.dtype == want.dtype and torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    # the dtypes themselves, as before: promote(mask fp32, Linear dtype) without `out`
    assert got.dtype == (out_dtype or torch.float32)
    assert [g.dtype for g in got_grads[:3]] == [weight_dtype, weight_dtype, torch.float32]
    expected, _ = _queries64_and_grads(rel, grid, *_params(d_out, dim, seed=10, dtype=weight_dtype,
                                                          mask_shape=(1, 1, d_out)),
                                       torch.zeros(3, grid * grid, d_out))
    queries = got[:, 2:] if out_dtype is not None else got
    lowp = autocast or weight_dtype != torch.float32 or out_dtype == torch.bfloat16
    torch.testing.assert_close(queries.double(), expected, rtol=2e-2 if lowp else 1e-5,
                               atol=2e-2 if lowp else 1e-5)


# ---------------------------------------------------------------------------------------------
# Edge inputs against float64 (reference maths op path)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_out", [False, True])
def test_empty_batch(use_out):
    """B = 0 is legal: empty results of the right shape, zero gradients of the parameters' shapes."""
    rel = torch.zeros(0, 6)
    weight, bias, mask = _params(12, 8, seed=11, mask_shape=(1, 1, 12))
    table = relpos_embed(rel, 3, 8)
    assert table.shape == (0, 9, 16) and table.dtype == torch.float32
    if use_out:
        buffer = torch.zeros(0, 1 + 9, 12, requires_grad=True).clone()
        queries = relpos_query_embed(rel, 3, weight, bias, mask, out=buffer[:, 1:])
        queries = buffer
    else:
        queries = relpos_query_embed(rel, 3, weight, bias, mask)
        assert queries.shape == (0, 9, 12)
    grads = torch.autograd.grad(queries.sum(), [weight, bias, mask])
    for grad, param in zip(grads, (weight, bias, mask)):
        assert grad.shape == param.shape and grad.dtype == param.dtype and not grad.any()


@pytest.mark.parametrize("case", ["grid1", "single_image", "zero_offsets", "zero_offsets_flipped"])
def test_edge_geometry_against_float64(case):
    grid, batch = (1, 3) if case == "grid1" else (5, 1 if case == "single_image" else 2)
    rel = _random_rel(batch, seed=12)
    if case.startswith("zero_offsets"):  # identical boxes: di = dj = dj_flip = 0, dh = dw = 1
        rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, float(case.endswith("flipped")), 0.0]] * batch)
    dim, d_out = 12, 20
    weight, bias, mask = _params(d_out, dim, seed=12)
    table = relpos_embed(rel, grid, dim)
    torch.testing.assert_close(table.double(), _table64(rel, grid, dim), rtol=0, atol=2e-6)
    queries = relpos_query_embed(rel, grid, weight, bias, mask)
    grad_out = torch.randn(queries.shape, generator=torch.Generator().manual_seed(12))
    expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    _assert_close64(queries, expected)
    for got, want in zip(torch.autograd.grad(queries, [weight, bias, mask], grad_out), expected_grads):
        _assert_close64(got, want)


def test_non_contiguous_inputs_against_float64():
    batch, grid, dim, d_out = 3, 5, 12, 20
    rel = _random_rel(batch, seed=13).t().contiguous().t()  # strides (1, B)
    weight = (torch.randn(2 * dim, d_out, generator=torch.Generator().manual_seed(13)) / 5).t()
    bias = torch.randn(2 * d_out, generator=torch.Generator().manual_seed(14))[::2]
    mask = torch.randn(1, 2, d_out, generator=torch.Generator().manual_seed(15))[:, :1]
    weight, bias, mask = [t.detach().requires_grad_() for t in (weight, bias, mask)]
    assert not (rel.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    torch.testing.assert_close(relpos_embed(rel, grid, dim), relpos_embed(rel.contiguous(), grid, dim),
                               rtol=0, atol=0)
    grad_out = torch.randn(batch, d_out, grid * grid, generator=torch.Generator().manual_seed(16)).transpose(1, 2)
    queries = relpos_query_embed(rel, grid, weight, bias, mask)
    expected, expected_grads = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    _assert_close64(queries, expected)
    for got, want in zip(torch.autograd.grad(queries, [weight, bias, mask], grad_out), expected_grads):
        _assert_close64(got, want)


def test_partial_gradients():
    """Only the parameters that require grad get one; no grad needed at all -> a plain tensor."""
    rel, grid = _random_rel(2, seed=17), 4
    weight, bias, mask = _params(8, 8, seed=17)
    bias.requires_grad_(False)
    queries = relpos_query_embed(rel, grid, weight, bias, mask)
    grad_out = torch.randn(queries.shape, generator=torch.Generator().manual_seed(17))
    got = torch.autograd.grad(queries, [weight, mask], grad_out)
    _, expected = _queries64_and_grads(rel, grid, weight, bias, mask, grad_out)
    _assert_close64(got[0], expected[0])
    _assert_close64(got[1], expected[2])
    weight.requires_grad_(False)
    mask.requires_grad_(False)
    assert not relpos_query_embed(rel, grid, weight, bias, mask).requires_grad
    with torch.no_grad():
        weight.requires_grad_(True)
        assert not relpos_query_embed(rel, grid, weight, bias, mask).requires_grad


def test_rel_gets_no_gradient():
    rel = _random_rel(2, seed=18).requires_grad_()
    weight, bias, mask = _params(8, 8, seed=18)
    assert not relpos_embed(rel, 3, 8).requires_grad
    queries = relpos_query_embed(rel, 3, weight, bias, mask)
    assert torch.autograd.grad(queries.sum(), rel, allow_unused=True) == (None,)


def test_launch_plans_are_cached():
    assert hasattr(rk._query_plan, "cache_info") and hasattr(rk._reduce_plan, "cache_info")
    first = rk._query_plan(4, 5, 12, 20, torch.float32, torch.float32, torch.bfloat16, "cpu")
    hits = rk._query_plan.cache_info().hits
    assert rk._query_plan(4, 5, 12, 20, torch.float32, torch.float32, torch.bfloat16, "cpu") is first
    assert rk._query_plan.cache_info().hits == hits + 1
    assert first["OUT_BF16_BY_BITS"] and not first["EMBED_BF16_BY_BITS"]
    assert first["DOT_PRECISION"] == "tf32x3"
    assert rk._query_plan(4, 5, 12, 20, torch.float32, torch.bfloat16, torch.bfloat16, "cuda")[
        "DOT_PRECISION"] == "tf32"
    assert rk._omega32(12, torch.device("cpu")) is rk._omega32(12, torch.device("cpu"))
