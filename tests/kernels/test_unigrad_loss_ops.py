"""unigrad_loss / unigrad_covariance against the issue-10 contract, on both implementations of the
registered ops: "op_reference" (CPU tensors, backend="auto": densesim::unigrad_loss /
densesim::unigrad_covariance with use_triton=False, the reference maths) and "triton"
(backend="triton": the Triton kernels -- in the interpreter on a CPU-only machine,
TRITON_INTERPRET=1 from the root conftest; compiled on CUDA tensors on a GPU).

    * torch.library.opcheck of densesim::unigrad_covariance, densesim::unigrad_loss (requires_grad
      pred: the autograd registration too) and densesim::unigrad_loss_backward, use_triton=False
      (the Triton implementation's opcheck is in test_unigrad_loss_triton.py);
    * the op path equals the plain-autograd reference: the loss bit for bit, the gradient to fp32
      rounding (closed form vs autograd) -- also under torch.autocast("cpu", bfloat16), where SIM
      calls it, with the same dtypes;
    * zero host syncs, forward + backward, default arguments (tests/host_sync.py);
    * the drop-in use inside a user's torch.compile(fullgraph=True, backend="aot_eager") function,
      forward and backward, equal to eager within rtol = 1e-6 (the same op runs in both);
    * bad input under torch.compile: the same one-line ValueError;
    * meta tensors, forward and backward (no value is read);
    * edge inputs against float64: one token (N = 1), one row (M = 1), one image (B = 1), all rows
      equal, constant rows (the target LayerNorm gives exactly 0), neg_weight = 0, both forms, the
      global + dense weights, non-contiguous pred; an empty batch is a ValueError.
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from kernels import unigrad_covariance, unigrad_loss, unigrad_loss_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_sync import count_host_syncs

U = importlib.import_module("kernels.unigrad_loss")
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not U._TRITON_IMPORTABLE, reason="triton is not importable")
# path -> (device of the inputs, backend): both run the registered ops
PATHS = {"op_reference": ("cpu", "auto"), "triton": (TRITON_DEVICE, "triton")}
PATH_PARAMS = [pytest.param("op_reference"), pytest.param("triton", marks=needs_triton)]
OPS = torch.ops.densesim


def _inputs(shape, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g) * 2.0 + 0.5  # off-centre, off-scale
    return pred.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)


def _layernorm64(x):
    mean = x.mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dim=-1, keepdim=True) + 1e-5)


def _ref64(pred, target, neg_weight=0.02, covariance=None, form="dense", global_weight=1.0,
           dense_weight=1.0):
    """(loss, dL/dpred, covariance(s)) in float64, written out from the spec (6.2 / 12)."""
    p = pred.detach().cpu().double().requires_grad_()
    t = _layernorm64(target.detach().cpu().double())
    channels = p.shape[-1]

    def moment(rows):
        return rows.t() @ rows / rows.shape[0]

    def rowwise(p_rows, t_rows, f):
        per_row = ((p_rows - t_rows) ** 2).sum(-1) + neg_weight * ((p_rows @ f) * p_rows).sum(-1)
        return per_row.mean() / channels

    if form == "dense":
        f = moment(t.reshape(-1, channels)) if covariance is None else covariance.cpu().double()
        loss = rowwise(p.reshape(-1, channels), t.reshape(-1, channels), f)
    else:
        t_mean = t.mean(dim=1)
        if covariance is None:
            f = (moment(t_mean), moment((t - t_mean[:, None]).reshape(-1, channels)))
        else:
            f = tuple(c.cpu().double() for c in covariance)
        p_mean = p.mean(dim=1)
        dense = rowwise((p - p_mean[:, None]).reshape(-1, channels),
                        (t - t_mean[:, None]).reshape(-1, channels), f[1])
        loss = global_weight * rowwise(p_mean, t_mean, f[0]) + dense_weight * dense
    grad, = torch.autograd.grad(loss, p)
    return loss.detach(), grad, f


def _run(path, pred, target, grad_scale=1.0, **kw):
    _, backend = PATHS[path]
    p = pred.detach().clone().requires_grad_()
    loss = unigrad_loss(p, target, backend=backend, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), p.grad


def _assert_close64(loss, grad, ref_loss, ref_grad, rtol=3e-5):
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.shape == ref_grad.shape
    assert abs(float(loss.double().cpu() - ref_loss)) <= rtol * max(1.0, abs(float(ref_loss)))
    error = float((grad.double().cpu() - ref_grad).abs().max())
    assert error <= rtol * float(ref_grad.abs().max()) + 1e-9


# ----------------------------------------------------------------------------------------------
# opcheck (the reference-maths implementation; the Triton one in test_unigrad_loss_triton.py)
# ----------------------------------------------------------------------------------------------

def test_opcheck_registered_ops():
    pred, target = _inputs((2, 5, 12), seed=1)
    g = torch.Generator().manual_seed(2)
    f = torch.randn(12, 12, generator=g)
    for form in ("dense", "paper"):
        torch.library.opcheck(OPS.unigrad_covariance.default, (target, True, form, False))
        torch.library.opcheck(OPS.unigrad_covariance.default, (target, False, form, False))
    for form, first, second in (("dense", None, None), ("dense", f, None),
                                ("paper", None, None), ("paper", f, f.t() @ f)):
        torch.library.opcheck(OPS.unigrad_loss.default,
                              (pred.clone().requires_grad_(), target, first, second,
                               [0.3, 0.7, 1.3], True, form, True, False))
        torch.library.opcheck(OPS.unigrad_loss.default,
                              (pred, target, first, second, [0.3, 1.0, 1.0], False, form, False,
                               False))
    grad = torch.randn(2, 5, 12, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(OPS.unigrad_loss_backward.default,
                              (grad, torch.tensor(-0.7), dtype, False))


def test_registered_ops_outputs():
    pred, target = _inputs((3, 4, 10), seed=3)
    covariance, = OPS.unigrad_covariance(target, True, "dense", False)
    torch.testing.assert_close(covariance, unigrad_covariance(target, backend="reference"),
                               rtol=0, atol=0)
    loss, grad = OPS.unigrad_loss(pred, target, None, None, [0.4, 1.0, 1.0], True, "dense", True,
                                  False)
    ref_loss, ref_grad, _ = _ref64(pred, target, neg_weight=0.4)
    _assert_close64(loss, grad, ref_loss, ref_grad)
    assert grad.dtype == torch.float32 and grad.is_contiguous()
    _, no_grad = OPS.unigrad_loss(pred, target, None, None, [0.4, 1.0, 1.0], True, "dense", False,
                                  False)
    assert no_grad.shape == (0,)
    scaled = OPS.unigrad_loss_backward(grad, torch.tensor(2.5), torch.bfloat16, False)
    assert scaled.dtype == torch.bfloat16
    torch.testing.assert_close(scaled, (2.5 * grad).to(torch.bfloat16), rtol=0, atol=0)


def test_backward_without_write_grad_is_a_clear_error():
    pred, target = _inputs((2, 3, 8), seed=4)
    pred.requires_grad_()
    loss, _ = OPS.unigrad_loss(pred, target, None, None, [0.1, 1.0, 1.0], True, "dense", False,
                               False)
    with pytest.raises(RuntimeError, match="write_grad=True"):
        loss.backward()


# ----------------------------------------------------------------------------------------------
# the op path equals the reference (and under autocast, as SIM calls it)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["dense", "paper"])
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("normalize_target", [True, False])
def test_op_path_equals_reference(form, given, normalize_target):
    pred, target = _inputs((3, 7, 20), seed=5)
    g = torch.Generator().manual_seed(6)
    covariance = None
    if given:  # not symmetric: the loss uses F as given, the gradient (F + F^T)/2
        covariance = torch.randn(20, 20, generator=g) / 20
        covariance = covariance if form == "dense" else (covariance, covariance.t() @ covariance)
    kw = {"neg_weight": 0.6, "normalize_target": normalize_target, "covariance": covariance,
          "form": form, "global_weight": 0.4, "dense_weight": 1.7}
    results = []
    for backend in ("auto", "reference"):
        p = pred.clone().requires_grad_()
        loss = unigrad_loss(p, target, backend=backend, **kw)
        (loss * -1.3).backward()
        results.append((loss.detach(), p.grad))
    (op_loss, op_grad), (ref_loss, ref_grad) = results
    assert torch.equal(op_loss, ref_loss)  # the same ops in the same order
    torch.testing.assert_close(op_grad, ref_grad, rtol=1e-5, atol=1e-6 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("form", ["dense", "paper"])
@pytest.mark.parametrize("given", [False, True])
def test_autocast_op_path_equals_reference(form, given):
    """SIM calls both ops under bf16 autocast, pred a bf16 autocast output: the op path gives the
    reference's loss bit for bit (fp32) and its gradient in the same dtypes."""
    torch.manual_seed(7)
    layer = torch.nn.Linear(24, 24)
    x, target = _inputs((3, 9, 24), seed=8)
    results = []
    for backend in ("auto", "reference"):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = layer(x)
            pred.retain_grad()
            covariance = unigrad_covariance(target, form=form, backend=backend) if given else None
            loss = unigrad_loss(pred, target, 0.5, covariance=covariance, form=form,
                                global_weight=0.8, dense_weight=1.2, backend=backend)
        (loss * 0.37).backward()
        results.append((pred.dtype, covariance, loss.detach(), pred.grad, layer.weight.grad.clone()))
    (dtype_a, cov_a, loss_a, grad_a, weight_a), (dtype_b, cov_b, loss_b, grad_b, weight_b) = results
    assert dtype_a == dtype_b == torch.bfloat16
    assert loss_a.dtype == loss_b.dtype == torch.float32 and torch.equal(loss_a, loss_b)
    if given:
        for a, b in zip((cov_a,) if form == "dense" else cov_a, (cov_b,) if form == "dense" else cov_b):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert grad_a.dtype == grad_b.dtype == torch.bfloat16
    # fp32 closed form vs fp32 autograd, each rounded once to bf16: at most one bf16 step apart
    torch.testing.assert_close(grad_a.float(), grad_b.float(), rtol=2 ** -7, atol=1e-6)
    assert weight_a.dtype == weight_b.dtype == torch.float32
    torch.testing.assert_close(weight_a, weight_b, rtol=1e-2, atol=1e-4 * float(weight_b.abs().max()))


# ----------------------------------------------------------------------------------------------
# no host syncs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("form", ["dense", "paper"])
def test_no_host_syncs(path, form):
    device, backend = PATHS[path]
    pred, target = _inputs((2, 5, 16), seed=9, device=device)
    pred.requires_grad_()
    with count_host_syncs() as syncs:
        covariance = unigrad_covariance(target, form=form, backend=backend)
        unigrad_loss(pred, target, covariance=covariance, form=form, backend=backend).backward()
        unigrad_loss(pred, target, form=form, backend=backend).backward()  # F made inside
    assert not syncs, syncs.report()


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("form,given", [("dense", False), ("dense", True), ("paper", True)])
def test_works_inside_torch_compile(path, form, given):
    device, backend = PATHS[path]
    pred, target = _inputs((2, 5, 16), seed=10, device=device)

    def user_step(p, t):
        covariance = unigrad_covariance(t, form=form, backend=backend) if given else None
        loss = unigrad_loss(p, t, 0.7, covariance=covariance, form=form, global_weight=0.5,
                            backend=backend)
        return loss * 2.0 + 1.0

    compiled = torch.compile(user_step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (user_step, compiled):
        p = pred.clone().requires_grad_()
        out = fn(p, target)
        out.backward()
        results.append((out.detach(), p.grad))
    (eager, eager_grad), (traced, traced_grad) = results
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(traced_grad, eager_grad, rtol=1e-6,
                               atol=1e-7 * float(eager_grad.abs().max()))
    ref_loss, ref_grad, _ = _ref64(pred, target, neg_weight=0.7, form=form, global_weight=0.5)
    _assert_close64((traced - 1.0) / 2.0, traced_grad / 2.0, ref_loss, ref_grad)


BAD_INPUTS = [
    (lambda p, t: (p, t[:, :4]), "unigrad_loss: target must have the same shape as pred"),
    (lambda p, t: (p.long(), t), "unigrad_loss: pred must be a floating tensor"),
    (lambda p, t: (p[:0], t[:0]), "unigrad_loss: pred must not be empty"),
    (lambda p, t: (p[0, 0], t[0, 0]), "unigrad_loss: pred must have shape (B, N, C) or (M, C)"),
]


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_under_torch_compile_raises_the_same_message(path, case):
    device, backend = PATHS[path]
    make, message = BAD_INPUTS[case]
    pred, target = make(*_inputs((2, 5, 8), seed=11, device=device))

    def user_step(p, t):
        return unigrad_loss(p, t, backend=backend) * 2.0

    with pytest.raises(ValueError) as eager_error:
        user_step(pred, target)
    assert str(eager_error.value).startswith(message) and "\n" not in str(eager_error.value)
    # dynamo remembers a frame that failed to compile (it then runs it eagerly): a clean cache for
    # each of the two compiles, so that each one really traces user_step
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported) as wrapped:  # fullgraph: wrapped, same text
        torch.compile(user_step, fullgraph=True, backend="aot_eager")(pred, target)
    assert "Observed exception" in str(wrapped.value)
    assert str(eager_error.value) in str(wrapped.value)
    torch._dynamo.reset()
    with pytest.raises(ValueError) as error:  # no fullgraph: dynamo falls back, the error propagates
        torch.compile(user_step, backend="aot_eager")(pred, target)
    assert str(error.value) == str(eager_error.value)


# ----------------------------------------------------------------------------------------------
# meta tensors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["dense", "paper"])
def test_meta_tensors_need_no_values(form):
    """Validation, the fake implementations and the backward read no value (recipe size, bf16)."""
    pred = torch.empty(128, 196, 768, device="meta", dtype=torch.bfloat16, requires_grad=True)
    target = torch.empty(128, 196, 768, device="meta", dtype=torch.bfloat16)
    covariance = unigrad_covariance(target, form=form)
    for matrix in (covariance,) if form == "dense" else covariance:
        assert matrix.device.type == "meta" and matrix.shape == (768, 768)
        assert matrix.dtype == torch.float32
    for given in (covariance, None):
        loss = unigrad_loss(pred, target, covariance=given, form=form)
        assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
        loss.backward()
        assert pred.grad.device.type == "meta" and pred.grad.shape == pred.shape
        assert pred.grad.dtype == torch.bfloat16
        pred.grad = None


# ----------------------------------------------------------------------------------------------
# edge inputs against float64
# ----------------------------------------------------------------------------------------------

def _edge(name, device):
    g = torch.Generator().manual_seed(12)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    if name == "one_token":          # N = 1: the paper form's dense part is exactly 0
        pred, target = rand(3, 1, 16), rand(3, 1, 16) * 2
    elif name == "one_row":          # M = 1 (a 2-D input of one row): F = t t^T
        pred, target = rand(1, 24), rand(1, 24) * 2
    elif name == "one_image":        # B = 1: F_global is one image's mean outer product
        pred, target = rand(1, 9, 20), rand(1, 9, 20) * 2
    elif name == "equal_rows":       # every row the same (rank-1 F, equal per-row terms)
        pred = rand(1, 1, 20).expand(2, 6, 20).clone()
        target = (rand(1, 1, 20) * 3 + 1).expand(2, 6, 20).clone()
    elif name == "constant_rows":    # each target row constant: LayerNorm gives exactly 0, F = 0
        pred = torch.full((2, 5, 40), 0.75) + torch.arange(40.0) / 40
        target = torch.arange(10.0).repeat_interleave(40).reshape(2, 5, 40) * 0.75
    elif name == "non_contiguous":   # transposed rows and a channel stride of 2
        pred = rand(7, 3, 48).transpose(0, 1)[..., ::2]
        target = rand(3, 7, 24) * 2
    else:
        raise AssertionError(name)
    return pred.to(device), target.to(device)


EDGES = ["one_token", "one_row", "one_image", "equal_rows", "constant_rows", "non_contiguous"]


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("name", EDGES)
def test_edge_inputs_match_float64(path, name):
    device, backend = PATHS[path]
    pred, target = _edge(name, device)
    if name == "non_contiguous":
        assert not pred.is_contiguous()
    forms = ["dense"] if pred.dim() == 2 else ["dense", "paper"]
    for form in forms:
        for neg_weight in (0.0, 0.9):
            kw = {"neg_weight": neg_weight, "form": form, "global_weight": 0.3,
                  "dense_weight": 2.0}
            loss, grad = _run(path, pred, target, **kw)
            assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
            ref_loss, ref_grad, ref_cov = _ref64(pred, target, **kw)
            _assert_close64(loss, grad, ref_loss, ref_grad)
            covariance = unigrad_covariance(target, form=form, backend=backend)
            for got, want in zip((covariance,) if form == "dense" else covariance,
                                 (ref_cov,) if form == "dense" else ref_cov):
                assert float((got.double().cpu() - want).abs().max()) <= 3e-5 * max(
                    1.0, float(want.abs().max()))
    if name == "constant_rows":
        assert not unigrad_covariance(target, backend=backend).any()


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_neg_weight_zero_is_the_plain_regression(path):
    device, _ = PATHS[path]
    pred, target = _inputs((2, 6, 12), seed=13, device=device)
    loss, grad = _run(path, pred, target, neg_weight=0)
    t = _layernorm64(target.double().cpu())
    p = pred.double().cpu()
    rows = p.numel() // 12
    torch.testing.assert_close(loss.double().cpu(), ((p - t) ** 2).sum() / (rows * 12),
                               rtol=3e-6, atol=1e-7)
    torch.testing.assert_close(grad.double().cpu(), 2 * (p - t) / (rows * 12), rtol=3e-5, atol=1e-8)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.3, 2.0)])
def test_global_and_dense_parts(path, weights):
    """The paper form's global + dense variant; each part alone is its own formula."""
    device, _ = PATHS[path]
    pred, target = _inputs((3, 5, 16), seed=14, device=device)
    kw = {"neg_weight": 1.1, "form": "paper", "global_weight": weights[0],
          "dense_weight": weights[1]}
    loss, grad = _run(path, pred, target, grad_scale=-2.0, **kw)
    ref_loss, ref_grad, _ = _ref64(pred, target, **kw)
    _assert_close64(loss, grad / -2.0, ref_loss, ref_grad)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_empty_batch_is_a_value_error(path):
    device, backend = PATHS[path]
    pred, target = _inputs((2, 5, 8), seed=15, device=device)
    for p, t in ((pred[:0], target[:0]), (pred[:, :0], target[:, :0]),
                 (pred[..., :0], target[..., :0])):
        with pytest.raises(ValueError, match="unigrad_loss: pred must not be empty"):
            unigrad_loss(p, t, backend=backend)
        with pytest.raises(ValueError, match="unigrad_covariance: target must not be empty"):
            unigrad_covariance(t, backend=backend)
    with pytest.raises(ValueError, match="must not be empty"):
        unigrad_loss(pred[:0], target[:0], form="paper", backend=backend)


def test_auto_equals_reference_for_the_paper_form_on_cpu():
    pred, target = _inputs((2, 4, 12), seed=16)
    for form in ("dense", "paper"):
        assert torch.equal(unigrad_loss(pred, target, form=form),
                           unigrad_loss_reference(pred, target, form=form))
