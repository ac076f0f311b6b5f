"""The Triton path of kernels/queue_infonce.py against a float64 formula written out here.

On a CPU-only machine these run the kernels in the Triton interpreter (the root conftest sets
TRITON_INTERPRET=1), at small shapes with the interpreter's small blocks (32 rows x 32 keys, the
queue split in 2) so that several row blocks, key tiles, ragged last tiles and splits are crossed;
on a GPU the same tests run the compiled kernels with their GPU blocks.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import queue_infonce

qi = importlib.import_module("kernels.queue_infonce")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not qi._TRITON_IMPORTABLE, reason="triton is not importable")


def _unit(rows, dim, gen, dtype=torch.float32):
    x = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)
    return x.to(device=DEVICE, dtype=dtype)


def _inputs(rows, keys, dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return _unit(rows, dim, gen, dtype), _unit(rows, dim, gen, dtype), _unit(keys, dim, gen, dtype)


def _infonce64(query, positive, queue, temperature):
    """(loss, dL/dquery, lse) in float64 from the formula (see test_queue_infonce.py)."""
    q, pos, keys = (t.detach().cpu().double() for t in (query, positive, queue))
    logits = torch.cat([(q * pos).sum(1, keepdim=True), q @ keys.t()], dim=1) / temperature
    lse = torch.logsumexp(logits, dim=1)
    loss = (lse - logits[:, 0]).mean()
    p = torch.exp(logits - lse[:, None])
    grad = (p[:, :1] * pos + p[:, 1:] @ keys - pos) / (q.shape[0] * temperature)
    return loss, grad, lse


def _lowp_torch(query, positive, queue, temperature):
    """Plain torch in the inputs' low precision (on the CPU: the interpreter has no bf16 matmul)."""
    q = query.detach().cpu().clone().requires_grad_()
    pos, keys = positive.cpu(), queue.cpu()
    logits = torch.cat([(q * pos).sum(1, keepdim=True), q @ keys.t()], dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
    grad, = torch.autograd.grad(loss, q)
    return loss.detach(), grad


def _triton(query, positive, queue, temperature=0.2):
    q = query.detach().clone().requires_grad_()
    loss = queue_infonce(q, positive, queue, temperature, backend="triton")
    loss.backward()
    return loss.detach(), q.grad


def _fp32_grad_tolerance(expected_grad):
    return dict(rtol=1e-5, atol=2e-6 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("rows,keys,dim", [
    (37, 129, 61),   # 2 row blocks, 5 key tiles split 3 + 2, D padded 61 -> 64
    (1, 1, 8),       # one row, one key
    (1, 70, 16),
    (45, 1, 7),      # a single key: one split
    (64, 64, 128),   # exact blocks, DenseCL's D
    (9, 40, 256),    # the largest D
])
def test_fp32_matches_float64(rows, keys, dim):
    query, positive, queue = _inputs(rows, keys, dim, seed=rows * 1000 + keys + dim)
    loss, grad = _triton(query, positive, queue)
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device.type == DEVICE
    assert grad.dtype == torch.float32 and grad.shape == (rows, dim)
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **_fp32_grad_tolerance(expected_grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,keys,dim", [(37, 129, 61), (40, 100, 128)])
def test_low_precision_rule(dtype, rows, keys, dim):
    query, positive, queue = _inputs(rows, keys, dim, seed=rows + keys + dim, dtype=dtype)
    loss, grad = _triton(query, positive, queue)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)  # from the rounded inputs
    lowp, lowp_grad = _lowp_torch(query, positive, queue, 0.2)
    assert abs(float(loss) - float(expected)) <= 2 * abs(float(lowp) - float(expected)) + 1e-5
    assert float((grad.cpu().double() - expected_grad).abs().max()) <= \
        2 * float((lowp_grad.double() - expected_grad).abs().max()) + 1e-6


def test_triton_equals_reference():
    query, positive, queue = _inputs(37, 129, 61, seed=3)
    loss, grad = _triton(query, positive, queue)
    q = query.clone().requires_grad_()
    ref = queue_infonce(q, positive, queue, 0.2, backend="reference")
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, q.grad, rtol=1e-5, atol=2e-6 * float(q.grad.abs().max()))


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_queue_splits_give_the_same_answer(monkeypatch, splits):
    if CUDA:
        pytest.skip("the split is chosen from the SM count on a GPU")
    monkeypatch.setitem(qi._CONFIG, "interpret", dict(qi._CONFIG["interpret"], splits=splits))
    # plans are cached per shape and read _CONFIG when made: start and end with an empty cache
    qi._cached_launch_plan.cache_clear()
    query, positive, queue = _inputs(33, 200, 20, seed=5)
    try:
        assert qi._launch_plan("forward", query, positive, queue)["splits"] == min(splits, 7)  # 7 tiles
        loss, grad = _triton(query, positive, queue)
    finally:
        qi._cached_launch_plan.cache_clear()
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, **_fp32_grad_tolerance(expected_grad))


def test_gpu_split_plan_fills_waves():
    # (row blocks, tiles, SMs): DenseCL at 32 and 256 images per GPU on a 132-SM H100/H200
    assert qi._queue_splits(13, 512, 132) * 13 >= 132
    splits = qi._queue_splits(98, 512, 132)
    programs = 98 * splits
    assert programs >= 132 and programs / (-(-programs // 132) * 132) >= 0.9
    assert qi._queue_splits(1000, 512, 132) == 1       # enough row blocks: no split
    assert qi._queue_splits(1, 3, 132) <= 3            # never more splits than tiles


def test_mixed_dtypes_use_the_fp32_path():
    query, positive, queue = _inputs(21, 50, 24, seed=7)
    query, queue = query.to(torch.bfloat16), queue.to(torch.float16)
    assert qi._fp32_mma(query, queue)
    loss, grad = _triton(query, positive, queue)
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    assert float((grad.cpu().double() - expected_grad).abs().max()) <= \
        2 ** -8 * float(expected_grad.abs().max())


def test_autocast_does_not_change_the_result():
    query, positive, queue = _inputs(19, 45, 32, seed=9)
    plain, plain_grad = _triton(query, positive, queue)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        cast, cast_grad = _triton(query, positive, queue)
    assert cast.dtype == torch.float32 and cast_grad.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)
    torch.testing.assert_close(cast_grad, plain_grad, rtol=0, atol=0)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(11)
    query = _unit(29, 40, gen).repeat(1, 2)[:, ::2]               # column stride 2
    positive = _unit(29, 40, gen).t().contiguous().t()            # column-major
    queue = _unit(90, 40, gen).t().contiguous().t()               # a (D, K) buffer's .t()
    assert not (query.is_contiguous() or positive.is_contiguous() or queue.is_contiguous())
    loss, grad = _triton(query, positive, queue)
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **_fp32_grad_tolerance(expected_grad))


def test_no_gradient_to_positive_or_queue():
    query, positive, queue = _inputs(9, 31, 16, seed=13)
    for t in (query, positive, queue):
        t.requires_grad_()
    queue_infonce(query, positive, queue, 0.2, backend="triton").backward()
    assert query.grad is not None and positive.grad is None and queue.grad is None


@pytest.mark.parametrize("temperature", [0.05, 0.01])
def test_extreme_logits_are_stable(temperature):
    """Cosines near +-1 (positives and queue keys near copies of queries or of their negatives)."""
    gen = torch.Generator().manual_seed(17)
    rows, keys, dim = 17, 70, 32
    query = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)
    noise = lambda n: 1e-3 * torch.randn(n, dim, generator=gen, dtype=torch.float64)  # noqa: E731
    positive = F.normalize(query + noise(rows), dim=1)
    signs = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64).repeat(keys // 3 + 1)[:keys, None]
    near = F.normalize(signs * query[torch.randint(0, rows, (keys,), generator=gen)] + noise(keys), dim=1)
    queue = torch.where(signs == 0, F.normalize(torch.randn(keys, dim, generator=gen,
                                                            dtype=torch.float64), dim=1), near)
    query, positive, queue = (t.float().to(DEVICE) for t in (query, positive, queue))
    loss, grad = _triton(query, positive, queue, temperature)
    expected, expected_grad, _ = _infonce64(query, positive, queue, temperature)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    floor = 4 * torch.finfo(torch.float32).eps / temperature / (rows * temperature)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, rtol=1e-4, atol=floor)


def test_lse_output_and_gradient_through_it():
    query, positive, queue = _inputs(35, 70, 24, seed=19)
    weights = torch.rand(35, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = query.clone().requires_grad_()
    row_loss, lse = torch.ops.densesim.queue_infonce(q, positive, queue, 0.3, True)
    _, _, expected_lse = _infonce64(query, positive, queue, 0.3)
    torch.testing.assert_close(lse.detach().cpu().double(), expected_lse, rtol=1e-6, atol=1e-6)
    w = weights.float().to(DEVICE)
    ((row_loss * w).sum() + (lse * (1 - w)).sum()).backward()
    q64 = query.detach().cpu().double().requires_grad_()
    x = torch.cat([(q64 * positive.cpu().double()).sum(1, keepdim=True),
                   q64 @ queue.cpu().double().t()], 1) / 0.3
    lse64 = torch.logsumexp(x, 1)
    ((lse64 - x[:, 0]) * weights + lse64 * (1 - weights)).sum().backward()
    torch.testing.assert_close(q.grad.cpu().double(), q64.grad, rtol=1e-5,
                               atol=2e-6 * float(q64.grad.abs().max()))


def test_every_buffer_is_written(monkeypatch):
    """Buffers poisoned with NaN: the kernels write all of what is read later."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(qi, "_new_buffer", poisoned)
    query, positive, queue = _inputs(37, 100, 20, seed=23)
    for dtype in (torch.float32, torch.bfloat16):
        loss, grad = _triton(query.to(dtype), positive.to(dtype), queue.to(dtype))
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


class _RecordOutputs(TorchDispatchMode):
    """The size in bytes of every tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel() * t.element_size()))
        return out


def test_no_m_by_k_tensor_is_made():
    """Every tensor made while the launchers run (their buffers, the torch ops of the lse combine
    and the gradient sum, and -- in the interpreter -- its host copies of the arguments) is no
    larger than the largest input, far below the M x K logits."""
    rows, keys, dim = 64, 500, 8
    query, positive, queue = _inputs(rows, keys, dim, seed=29)
    grads = torch.full((rows,), 1.0 / rows, device=DEVICE)
    with _RecordOutputs() as record:
        _, lse = qi._triton_forward(query, positive, queue, 0.2)
        grad = qi._triton_backward(query, positive, queue, lse, grads, torch.zeros_like(grads), 0.2)
    largest = max(size for _, size in record.sizes)
    assert largest <= keys * dim * 4 < rows * keys * 4 / 4, record.sizes
    _, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **_fp32_grad_tolerance(expected_grad))


@pytest.mark.skipif(not CUDA, reason="peak device memory is measured on CUDA only")
def test_peak_memory_is_o_of_m_plus_k():
    rows, keys, dim = 4096, 65536, 128
    query, positive, queue = _inputs(rows, keys, dim, seed=31, dtype=torch.bfloat16)
    query.requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    queue_infonce(query, positive, queue, 0.2, backend="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    logits_bytes = 4 * rows * (keys + 1)
    assert peak < logits_bytes / 20, (peak, logits_bytes)


def test_opcheck_triton_path():
    query, positive, queue = _inputs(7, 20, 5, seed=37)
    forward = torch.ops.densesim.queue_infonce.default
    torch.library.opcheck(forward, (query.clone().requires_grad_(), positive, queue, 0.2, True))
    _, lse = forward(query, positive, queue, 0.2, True)
    grads = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.library.opcheck(torch.ops.densesim.queue_infonce_backward.default,
                          (query, positive, queue, lse, grads[0], grads[1], 0.2, True))
