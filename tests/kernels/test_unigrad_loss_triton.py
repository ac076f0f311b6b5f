"""The Triton path of unigrad_loss / unigrad_covariance (backend="triton") against float64.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set by the root conftest) at small
shapes; on a CUDA machine the same tests run the compiled kernels on the GPU. Every test runs with
the shipped block sizes and with 16-wide blocks, so that F has several tiles (upper, lower and
diagonal), the rows several covariance splits, and Q several row and column blocks.
Also here: torch.library.opcheck of the registered ops' Triton implementation (use_triton=True),
the launch-plan cache, and that the Triton path makes no torch copies of its inputs. The
contract tests run on both implementations (host syncs, torch.compile, edge inputs) are in
test_unigrad_loss_ops.py.
"""
import importlib
import os
import socket
import traceback

import pytest
import torch

from kernels import unigrad_covariance, unigrad_loss, unigrad_loss_reference
from tests.spawn import spawn_ranks

U = importlib.import_module("kernels.unigrad_loss")  # the module (the package exports the function)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LOW = (torch.bfloat16, torch.float16)

pytestmark = pytest.mark.skipif(
    not U._TRITON_IMPORTABLE or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1")

SMALL_BLOCKS = {"covariance": {"BLOCK_C": 16, "BLOCK_R": 16},
                "loss": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_N_CENTRED": 16, "BLOCK_K": 16,
                         "BLOCK_K_FP32": 16},
                "image_mean": {"BLOCK_N": 4, "BLOCK_C": 16},
                "stats": {"BLOCK_R": 4, "BLOCK_C": 16}}


@pytest.fixture(params=["shipped", "small"])
def blocks(request, monkeypatch):
    if request.param == "small":
        for kernel, values in SMALL_BLOCKS.items():
            monkeypatch.setitem(U._CONFIG, kernel, {**U._CONFIG[kernel], **values})
    return request.param


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g) * 2.0 + 0.5  # off-centre, off-scale: the LayerNorm matters
    return pred.to(device=DEVICE, dtype=dtype), target.to(device=DEVICE, dtype=dtype)


def _layernorm64(x):
    mean = x.mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dim=-1, keepdim=True) + 1e-5)


def _second_moment64(rows):
    return rows.t() @ rows / rows.shape[0]


def _cov64(target, normalize_target=True, form="dense"):
    """F (or (F_global, F_dense)) in float64, written out from the spec."""
    t = target.detach().double()
    t = _layernorm64(t) if normalize_target else t
    channels = t.shape[-1]
    if form == "dense":
        return _second_moment64(t.reshape(-1, channels))
    image_mean = t.mean(dim=1)
    return (_second_moment64(image_mean),
            _second_moment64((t - image_mean[:, None]).reshape(-1, channels)))


def _ref64(pred, target, neg_weight=0.02, normalize_target=True, covariance=None, form="dense",
           global_weight=1.0, dense_weight=1.0):
    """Loss and gradient in float64 (spec 6.2 / 12) on exactly the tensors the kernel sees."""
    p = pred.detach().double().requires_grad_()
    t = target.detach().double()
    t = _layernorm64(t) if normalize_target else t
    channels = p.shape[-1]

    def rowwise(p_rows, t_rows, f):
        per_row = ((p_rows - t_rows) ** 2).sum(-1) + neg_weight * ((p_rows @ f) * p_rows).sum(-1)
        return per_row.mean() / channels

    if covariance is None:
        covariance = _cov64(target, normalize_target, form)
    if form == "dense":
        loss = rowwise(p.reshape(-1, channels), t.reshape(-1, channels), covariance.double())
    else:
        f_global, f_dense = (c.double() for c in covariance)
        p_mean, t_mean = p.mean(dim=1), t.mean(dim=1)
        dense = rowwise((p - p_mean[:, None]).reshape(-1, channels),
                        (t - t_mean[:, None]).reshape(-1, channels), f_dense)
        loss = global_weight * rowwise(p_mean, t_mean, f_global) + dense_weight * dense
    grad, = torch.autograd.grad(loss, p)
    return loss.detach(), grad


def _triton(pred, target, grad_scale=None, **kw):
    pred = pred.detach().requires_grad_()
    loss = unigrad_loss(pred, target, backend="triton", **kw)
    grad, = torch.autograd.grad(loss if grad_scale is None else loss * grad_scale, pred)
    return loss.detach(), grad


def _assert_fp32_close(loss, grad, ref_loss, ref_grad):
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == torch.float32 and grad.shape == ref_grad.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=3e-5, atol=1e-6)
    scale = ref_grad.abs().max()
    assert (grad.double() - ref_grad).abs().max() <= 3e-5 * scale


@pytest.mark.parametrize("shape,neg_weight", [((2, 13, 40), 0.02), ((2, 13, 40), 1.5),
                                              ((1, 7, 24), 1.5), ((37, 40), 0.02), ((3, 5, 72), 1.5)])
def test_dense_fp32_matches_float64(blocks, shape, neg_weight):
    pred, target = _inputs(shape)
    loss, grad = _triton(pred, target, neg_weight=neg_weight)
    _assert_fp32_close(loss, grad, *_ref64(pred, target, neg_weight=neg_weight))


def test_without_target_layernorm(blocks):
    pred, target = _inputs((2, 9, 24))
    for dtype in (torch.float32, torch.bfloat16):  # bf16 without LayerNorm: exact MMA operands
        p, t = pred.to(dtype), target.to(dtype)
        loss, grad = _triton(p, t, neg_weight=0.7, normalize_target=False)
        ref_loss, ref_grad = _ref64(p, t, neg_weight=0.7, normalize_target=False)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=3e-5, atol=1e-6)
        covariance = unigrad_covariance(t, normalize_target=False, backend="triton")
        expected = _cov64(t, normalize_target=False)
        assert (covariance.double() - expected).abs().max() <= 3e-5 * expected.abs().max()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("form", ["dense", "paper"])
def test_low_precision_rule(blocks, dtype, form):
    """|kernel - ref64| <= 2 |torch_lowp - ref64| + small atol, ref64 on the same rounded inputs."""
    pred, target = _inputs((3, 11, 40), dtype, seed=1)
    loss, grad = _triton(pred, target, neg_weight=0.5, form=form)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = _ref64(pred, target, neg_weight=0.5, form=form)
    lowp_loss, lowp_grad = _triton_free_lowp(pred, target, neg_weight=0.5, form=form)
    loss_err, lowp_loss_err = (loss.double() - ref_loss).abs(), (lowp_loss.double() - ref_loss).abs()
    assert loss_err <= 2 * lowp_loss_err + 2e-5 * ref_loss.abs()
    grad_err = (grad.double() - ref_grad).abs().max()
    lowp_grad_err = (lowp_grad.double() - ref_grad).abs().max()
    assert grad_err <= 2 * lowp_grad_err + 1e-5 * ref_grad.abs().max()


def _triton_free_lowp(pred, target, **kw):
    p = pred.detach().requires_grad_()
    loss = unigrad_loss_reference(p, target, **kw)
    grad, = torch.autograd.grad(loss, p)
    return loss.detach(), grad


@pytest.mark.parametrize("shape", [(4, 7, 24), (1, 9, 40)])
def test_paper_form_fp32(blocks, shape):
    pred, target = _inputs(shape, seed=2)
    for global_weight, dense_weight in ((1.0, 1.0), (0.3, 2.0)):
        kw = dict(neg_weight=0.8, form="paper", global_weight=global_weight, dense_weight=dense_weight)
        loss, grad = _triton(pred, target, **kw)
        _assert_fp32_close(loss, grad, *_ref64(pred, target, **kw))


@pytest.mark.parametrize("form", ["dense", "paper"])
@pytest.mark.parametrize("normalize_target", [True, False])
def test_covariance_matches_float64(blocks, form, normalize_target):
    _, target = _inputs((3, 23, 40), seed=3)
    got = unigrad_covariance(target, normalize_target=normalize_target, form=form, backend="triton")
    expected = _cov64(target, normalize_target, form)
    if form == "dense":
        got, expected = (got,), (expected,)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32 and g.shape == (40, 40) and not g.requires_grad
        assert torch.equal(g, g.t())  # mirrored and symmetrised exactly
        assert (g.double() - e).abs().max() <= 3e-5 * e.abs().max()


def test_non_contiguous_inputs(blocks):
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(9, 3, 40, generator=g).to(DEVICE).transpose(0, 1)  # (3, 9, 40), strided rows
    target = (torch.randn(3, 9, 80, generator=g) * 3).to(DEVICE)[..., ::2]  # channel stride 2
    assert not pred.is_contiguous() and not target.is_contiguous()
    for form in ("dense", "paper"):
        loss, grad = _triton(pred, target, neg_weight=0.4, form=form)
        _assert_fp32_close(loss, grad, *_ref64(pred, target, neg_weight=0.4, form=form))
    got = unigrad_covariance(target, backend="triton")
    expected = _cov64(target)
    assert (got.double() - expected).abs().max() <= 3e-5
    # a transposed 2-D pred
    pred2d = torch.randn(40, 21, generator=g).to(DEVICE).t()
    target2d = torch.randn(21, 40, generator=g).to(DEVICE)
    loss, grad = _triton(pred2d, target2d)
    _assert_fp32_close(loss, grad, *_ref64(pred2d, target2d))


def test_given_covariance_is_honoured(blocks):
    pred, target = _inputs((2, 9, 24), seed=5)
    g = torch.Generator().manual_seed(6)
    other = torch.randn(24, 24, generator=g).to(DEVICE)
    for covariance in (other @ other.t() / 24, other):  # symmetric, and not symmetric
        loss, grad = _triton(pred, target, neg_weight=1.1, covariance=covariance)
        _assert_fp32_close(loss, grad, *_ref64(pred, target, neg_weight=1.1, covariance=covariance))
    pair = (other @ other.t() / 24, other.t() @ other / 24)
    loss, grad = _triton(pred, target, neg_weight=0.9, form="paper", covariance=pair)
    _assert_fp32_close(loss, grad, *_ref64(pred, target, neg_weight=0.9, form="paper", covariance=pair))
    # bf16 / fp64 covariances are accepted and used in fp32
    loss64, _ = _triton(pred, target, covariance=pair[0].double())
    loss32, _ = _triton(pred, target, covariance=pair[0])
    torch.testing.assert_close(loss64, loss32)


def test_gradient_accumulation_identity():
    pred, target = _inputs((6, 9, 24), seed=7)
    full_loss, full_grad = _triton(pred, target, neg_weight=2.0)
    covariance = unigrad_covariance(target, backend="triton")
    pred = pred.detach().requires_grad_()
    micro = [unigrad_loss(p, t, neg_weight=2.0, covariance=covariance, backend="triton")
             for p, t in zip(pred.chunk(3), target.chunk(3))]
    accumulated = torch.stack(micro).mean()
    grad, = torch.autograd.grad(accumulated, pred)
    torch.testing.assert_close(accumulated.detach(), full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-7)


def test_backward_scales_the_saved_gradient():
    pred, target = _inputs((2, 7, 24), seed=8)
    ref_loss, ref_grad = _ref64(pred, target, neg_weight=0.3)
    loss, grad = _triton(pred, target, grad_scale=-3.7, neg_weight=0.3)
    _assert_fp32_close(loss, grad / -3.7, ref_loss, ref_grad)
    # twice through a retained graph: the saved gradient is not modified in place
    p = pred.detach().requires_grad_()
    loss = unigrad_loss(p, target, neg_weight=0.3, backend="triton")
    loss.backward(retain_graph=True)
    first = p.grad.clone()
    loss.backward()
    torch.testing.assert_close(p.grad, 2 * first)


def test_no_grad_and_autocast():
    pred, target = _inputs((2, 7, 24), seed=9)
    plain, _ = _triton(pred, target)
    # without a gradient to write the kernel is compiled without the G store (on a GPU the
    # compiler may then contract the loss terms differently: close, not necessarily bit-equal)
    with torch.no_grad():
        torch.testing.assert_close(unigrad_loss(pred, target, backend="triton"), plain,
                                   rtol=1e-6, atol=0)
    torch.testing.assert_close(unigrad_loss(pred, target, backend="triton"), plain,  # no requires_grad
                               rtol=1e-6, atol=0)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        under_amp = unigrad_loss(pred, target, backend="triton")
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, plain, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["dense", "paper"])
def test_poisoned_buffers_are_overwritten(blocks, monkeypatch, form):
    pred, target = _inputs((3, 7, 36), seed=10)
    clean_loss, clean_grad = _triton(pred, target, neg_weight=0.5, form=form)
    clean_cov = unigrad_covariance(target, form=form, backend="triton")
    real = U._new_buffer

    def poisoned(shape, dtype, device):
        return real(shape, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(U, "_new_buffer", poisoned)
    loss, grad = _triton(pred, target, neg_weight=0.5, form=form)
    cov = unigrad_covariance(target, form=form, backend="triton")
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)
    for a, b in zip(cov if form == "paper" else (cov,), clean_cov if form == "paper" else (clean_cov,)):
        assert torch.equal(a, b)


def _no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    for name in ("_launch_row_stats", "_launch_prologue", "_launch_covariance",
                 "_launch_image_mean", "_launch_loss_grad", "_launch_scale"):
        monkeypatch.setattr(U, name, fail)


def test_bad_inputs_raise_before_any_launch(monkeypatch):
    pred, target = _inputs((2, 5, 16))
    _no_launch(monkeypatch)
    bad_calls = [
        lambda: unigrad_loss(pred, target[:, :4], backend="triton"),
        lambda: unigrad_loss(pred[0, 0], target[0, 0], backend="triton"),
        lambda: unigrad_loss(pred.long(), target, backend="triton"),
        lambda: unigrad_loss(pred, target.to("meta"), backend="triton"),
        lambda: unigrad_loss(pred, target, covariance=torch.eye(7, device=DEVICE), backend="triton"),
        lambda: unigrad_loss(pred, target, covariance=torch.eye(16, device=DEVICE), form="paper",
                             backend="triton"),
        lambda: unigrad_loss(pred[0], target[0], form="paper", backend="triton"),
        lambda: unigrad_loss(pred, target, neg_weight=None, backend="triton"),
        lambda: unigrad_loss(pred, target, backend="Triton"),
        lambda: unigrad_covariance(torch.randn(8, device=DEVICE), backend="triton"),
        lambda: unigrad_covariance(target, form="global", backend="triton"),
        lambda: unigrad_covariance(target, backend="cuda"),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


def test_triton_backend_refuses_where_it_cannot_run(monkeypatch):
    pred, target = torch.randn(2, 5, 16), torch.randn(2, 5, 16)  # CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="unigrad_loss: backend='triton' needs CUDA tensors"):
        unigrad_loss(pred, target, backend="triton")
    with pytest.raises(RuntimeError, match="unigrad_covariance: backend='triton' needs CUDA tensors"):
        unigrad_covariance(target, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(U, "_TRITON_IMPORTABLE", False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        unigrad_loss(pred, target, backend="triton")
    with pytest.raises(RuntimeError, match="needs the triton package"):
        unigrad_covariance(target, backend="triton")


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    pred, target = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    expected = unigrad_loss_reference(pred, target)
    _no_launch(monkeypatch)
    assert torch.equal(unigrad_loss(pred, target), expected)
    assert torch.equal(unigrad_covariance(target), unigrad_covariance(target, backend="reference"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda(monkeypatch):
    pred, target = _inputs((2, 5, 16))
    calls = []
    real = U._triton_forward
    monkeypatch.setattr(U, "_triton_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = unigrad_loss(pred, target)
    assert calls and loss.device.type == "cuda"
    torch.testing.assert_close(loss, unigrad_loss(pred, target, backend="reference"),
                               rtol=3e-5, atol=1e-6)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world_size, port, pred, target, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        local_pred, local_target = pred.chunk(world_size)[rank], target.chunk(world_size)[rank]
        result = (unigrad_covariance(local_target, backend="triton"),
                  unigrad_loss(local_pred, local_target, backend="triton"))
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()   # leave together: a rank tearing gloo down early can abort
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(CUDA or not torch.distributed.is_available(),
                    reason="gloo on CPU tensors under the interpreter (the GPU path shares the code)")
def test_covariance_is_averaged_over_ranks(tmp_path):
    pred, target = torch.randn(4, 6, 24), torch.randn(4, 6, 24)
    spawn_ranks(_distributed_worker, (2, _free_port(), pred, target, str(tmp_path)), 2, tmp_path)
    full_covariance = _cov64(target)
    for rank in range(2):
        covariance, loss = torch.load(tmp_path / f"rank{rank}.pt")
        assert (covariance.double() - full_covariance).abs().max() <= 3e-5
        local_pred, local_target = pred.chunk(2)[rank], target.chunk(2)[rank]
        expected, _ = _ref64(local_pred, local_target, covariance=full_covariance)
        torch.testing.assert_close(loss.double(), expected, rtol=3e-5, atol=1e-6)


def test_opcheck_triton_path():
    pred, target = _inputs((2, 5, 24), seed=11)
    g = torch.Generator().manual_seed(12)
    f = torch.randn(24, 24, generator=g).to(DEVICE)
    ops = torch.ops.densesim
    for form in ("dense", "paper"):
        torch.library.opcheck(ops.unigrad_covariance.default, (target, True, form, True))
    torch.library.opcheck(ops.unigrad_covariance.default, (target, False, "dense", True))
    for form, first, second in (("dense", None, None), ("dense", f, None),
                                ("paper", None, None), ("paper", f, f.t() @ f)):
        torch.library.opcheck(ops.unigrad_loss.default,
                              (pred.clone().requires_grad_(), target, first, second,
                               [0.3, 0.7, 1.3], True, form, True, True))
    torch.library.opcheck(ops.unigrad_loss.default,
                          (pred, target, None, None, [0.3, 1.0, 1.0], False, "dense", False, True))
    grad = torch.randn(2, 5, 24, generator=g).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(ops.unigrad_loss_backward.default,
                              (grad, torch.tensor(-0.7, device=DEVICE), dtype, True))


def _torch_split(covariance, symmetrize):
    """The torch ops the split kernels replaced: F.to(fp32), (F + F.t()) * 0.5, F.to(bf16),
    (F - F_hi.float()).to(bf16)."""
    f = covariance.to(torch.float32)
    f = (f + f.t()) * 0.5 if symmetrize else f
    high = f.to(torch.bfloat16)
    return high, (f - high.to(torch.float32)).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_prologue_split_is_bit_exact(blocks, dtype, normalize):
    """A caller's F (any dtype, any strides) -> (F_hi, F_lo) of (F + F^T)/2 in the prologue
    launch, with the target's row stats: the same bits as the torch ops, the same stats as the
    row-stats kernel."""
    g = torch.Generator().manual_seed(13)
    _, target = _inputs((3, 7, 37), seed=16)
    base = torch.randn(37, 37, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    strided = torch.randn(37, 74, generator=g).to(DEVICE, dtype)[:, ::2]
    for covariances in ((base,), (base.t(),), (strided,), (base.t(), strided)):
        stats, split = U._launch_prologue(target, normalize, covariances)
        assert split.shape == (len(covariances), 2, 37, 37) and split.dtype == torch.bfloat16
        for matrix, covariance in zip(split, covariances):
            high, low = _torch_split(covariance, True)
            assert torch.equal(matrix[0], high) and torch.equal(matrix[1], low)
        if normalize:
            expected = U._launch_row_stats(target)
            assert torch.equal(stats[0], expected[0]) and torch.equal(stats[1], expected[1])
        else:
            assert stats is None


@pytest.mark.parametrize("form", ["dense", "paper"])
def test_finalize_split_is_bit_exact(blocks, form):
    """F made here: the finalize kernel writes (F_hi, F_lo) from the values it stores as F."""
    _, target = _inputs((3, 9, 40), seed=17)
    stats = U._launch_row_stats(target)
    centre = U._launch_image_mean(target, stats) if form == "paper" else None
    covariance, split = U._launch_covariance(target, stats, centre, write_split=True)
    plain, none = U._launch_covariance(target, stats, centre)
    assert none is None and torch.equal(covariance, plain)
    high, low = _torch_split(covariance, False)
    assert split.shape == (1, 2, 40, 40)
    assert torch.equal(split[0, 0], high) and torch.equal(split[0, 1], low)


def test_launch_plans_are_cached(blocks):
    """The per-shape launch decisions come from functools.lru_cache'd plans keyed on plain values
    (shapes, dtypes' sizes, the SM count, the _CONFIG entry): a second call of the same shapes
    computes none, a patched _CONFIG entry gets its own plan."""
    pred, target = _inputs((2, 7, 24), seed=14)
    plans = (U._stats_plan, U._covariance_plan, U._prologue_plan, U._loss_plan, U._scale_plan)
    for plan in plans:
        plan.cache_clear()
    covariance = unigrad_covariance(target, backend="triton")
    _triton(pred, target)
    _triton(pred, target, covariance=covariance)
    misses = [plan.cache_info().misses for plan in plans]
    # row stats: their own entry + the prologue's lookup; the covariance plan: one shape
    assert misses == [1, 1, 1, 1, 1]
    _triton(pred, target)
    _triton(pred + 1.0, target * 0.5, covariance=covariance * 2)
    assert [plan.cache_info().misses for plan in plans] == misses
    _triton(pred[:1], target[:1])  # a new shape: new plans
    assert U._loss_plan.cache_info().misses > misses[3]
    key = U._config_key("loss")
    assert key == tuple(U._CONFIG["loss"].items()) and hash(key) is not None


class _TorchOpsFromThisFile(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that kernels/unigrad_loss.py itself runs (not the interpreter's)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for frame in reversed(traceback.extract_stack()[:-1]):
            if "/torch/" in frame.filename or frame.filename == __file__:
                continue
            if frame.filename.endswith(os.path.join("kernels", "unigrad_loss.py")):
                self.ops.append(func.overloadpacket.__name__)
            break
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["dense", "paper"])
@pytest.mark.parametrize("given", [False, True])
def test_triton_path_makes_no_copies(form, given):
    """Non-contiguous bf16 pred, a strided target, a transposed fp64 covariance: the kernels read
    them all through their strides. The only torch ops of the Triton forward (the body of
    densesim::unigrad_loss with use_triton=True, run here under a dispatch mode, which does not
    see inside a registered op) are the buffers' allocations, views and the final sum and scale;
    of the backward (densesim::unigrad_loss_backward's body), one allocation."""
    g = torch.Generator().manual_seed(15)
    pred = torch.randn(7, 3, 24, generator=g).to(DEVICE, torch.bfloat16).transpose(0, 1)
    target = (torch.randn(3, 7, 48, generator=g) * 2).to(DEVICE)[..., ::2]
    f = torch.randn(24, 24, generator=g, dtype=torch.float64).to(DEVICE)
    covariances = ([f.t()] if form == "dense" else [f.t(), f]) if given else []
    mode = _TorchOpsFromThisFile()
    with mode, U._on_device(pred.device):
        loss, grad = U._triton_forward(pred, target, covariances, 0.5, 0.7, 1.3, True, form, True)
    # allocations, the loss's sum and scale, and (paper form) views of the split buffer
    assert {"empty", "sum"} <= set(mode.ops) <= {"empty", "sum", "mul", "add", "select"}, mode.ops
    mode.ops.clear()
    with mode, U._on_device(pred.device):
        grad_pred = U._launch_scale(grad, torch.tensor(-2.0, device=DEVICE), pred.dtype)
    assert mode.ops == ["empty"], mode.ops
    if given:
        covariance = (f.t() + f) / 2 if form == "dense" else ((f.t() + f) / 2, (f + f.t()) / 2)
    else:
        covariance = None
    kw = {"neg_weight": 0.5, "covariance": covariance, "form": form, "global_weight": 0.7,
          "dense_weight": 1.3}
    ref_loss, ref_grad = _ref64(pred, target, **kw)
    lowp_loss, lowp_grad = _triton_free_lowp(pred, target, **kw)
    assert (loss.double() - ref_loss).abs() <= 2 * (lowp_loss.double() - ref_loss).abs() + 1e-5
    assert grad_pred.dtype == torch.bfloat16 and grad_pred.shape == pred.shape
    error = (grad_pred.double() / -2.0 - ref_grad).abs().max()
    assert error <= 2 * (lowp_grad.double() - ref_grad).abs().max() + 1e-5 * ref_grad.abs().max()


def test_triton_backend_refuses_channels_beyond_int32_offsets():
    """F's offsets are int32 (2 C^2 < 2^31): C > 32,767 is refused before any launch ("auto" runs
    the reference there)."""
    pred, target = torch.zeros(2, 32768, device=DEVICE), torch.zeros(2, 32768, device=DEVICE)
    with pytest.raises(RuntimeError, match="unigrad_loss: backend='triton' supports C <= 32767"):
        unigrad_loss(pred, target, backend="triton")
    with pytest.raises(RuntimeError, match="unigrad_covariance: backend='triton' supports C"):
        unigrad_covariance(target, backend="triton")
    assert U._select_backend("unigrad_loss", "auto", torch.device("cuda"), 32768) == "reference"
    assert U._select_backend("unigrad_loss", "auto", torch.device("cuda"), 32767) == (
        "triton" if U._TRITON_IMPORTABLE else "reference")
