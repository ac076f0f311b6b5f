"""queue_infonce (DENSE.md K1): the reference and the registered op's CPU path against a float64
formula written out here, the official ContrastiveHead formulation, validation, backend choice,
torch.library registration (opcheck, torch.compile) and the no-host-read rule.
The Triton kernels are tested in test_queue_infonce_triton.py."""
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import queue_infonce, queue_infonce_reference

qi = importlib.import_module("kernels.queue_infonce")


def _unit(rows, dim, gen, dtype=torch.float32):
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def _inputs(rows, keys, dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return _unit(rows, dim, gen, dtype), _unit(rows, dim, gen, dtype), _unit(keys, dim, gen, dtype)


def _infonce64(query, positive, queue, temperature):
    """(loss, dL/dquery, lse) in float64 from the formula:
    x = [<q_i, k+_i>, q_i queue^T] / tau, L = mean_i(lse_i - x_i0),
    dL/dq_i = (sum_j p_ij v_j - k+_i) / (M tau) with v = [k+_i; queue rows]."""
    q, pos, keys = (t.detach().cpu().double() for t in (query, positive, queue))
    logits = torch.cat([(q * pos).sum(1, keepdim=True), q @ keys.t()], dim=1) / temperature
    lse = torch.logsumexp(logits, dim=1)
    loss = (lse - logits[:, 0]).mean()
    p = torch.exp(logits - lse[:, None])
    grad = (p[:, :1] * pos + p[:, 1:] @ keys - pos) / (q.shape[0] * temperature)
    return loss, grad, lse


def _lowp_torch(query, positive, queue, temperature):
    """The same maths by plain torch in the inputs' (low) precision: loss and dL/dquery."""
    q = query.detach().clone().requires_grad_()
    logits = torch.cat([(q * positive).sum(1, keepdim=True), q @ queue.t()], dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
    grad, = torch.autograd.grad(loss, q)
    return loss.detach(), grad


def _loss_and_grad(query, positive, queue, temperature, backend):
    q = query.detach().clone().requires_grad_()
    loss = queue_infonce(q, positive, queue, temperature, backend=backend)
    loss.backward()
    return loss.detach(), q.grad


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("rows,keys,dim", [(37, 129, 61), (1, 1, 8), (1, 50, 16), (20, 1, 7),
                                           (6, 300, 128)])
def test_matches_float64_formula(backend, rows, keys, dim):
    query, positive, queue = _inputs(rows, keys, dim, seed=rows * 1000 + keys + dim)
    loss, grad = _loss_and_grad(query, positive, queue, 0.2, backend)
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == torch.float32 and grad.shape == query.shape
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5,
                               atol=1e-6 * float(expected_grad.abs().max()))


def test_equals_official_contrastive_head():
    """MoCo/DenseCL ContrastiveHead: cross_entropy(cat([l_pos, l_neg]) / T, zeros)."""
    query, positive, queue = _inputs(23, 77, 32, seed=1)
    l_pos = (query * positive).sum(1, keepdim=True)
    l_neg = query @ queue.t()
    official = F.cross_entropy(torch.cat([l_pos, l_neg], dim=1) / 0.2, torch.zeros(23, dtype=torch.long))
    for backend in ("auto", "reference"):
        torch.testing.assert_close(queue_infonce(query, positive, queue, 0.2, backend=backend), official,
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(queue_infonce_reference(query, positive, queue, 0.2), official,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_low_precision_rule(dtype, backend):
    query, positive, queue = _inputs(37, 129, 61, seed=7, dtype=dtype)
    loss, grad = _loss_and_grad(query, positive, queue, 0.2, backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)  # from the rounded inputs
    lowp, lowp_grad = _lowp_torch(query, positive, queue, 0.2)
    assert abs(float(loss) - float(expected)) <= 2 * abs(float(lowp) - float(expected)) + 1e-5
    assert float((grad.double() - expected_grad).abs().max()) <= \
        2 * float((lowp_grad.double() - expected_grad).abs().max()) + 1e-6


def test_mixed_dtypes_and_autocast_compute_in_fp32():
    query, positive, queue = _inputs(19, 70, 24, seed=3)
    query, positive = query.to(torch.bfloat16), positive.to(torch.float16)
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    for backend in ("auto", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grad = _loss_and_grad(query, positive, queue, 0.2, backend)
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
        # the only rounding is the bf16 gradient itself
        assert float((grad.double() - expected_grad).abs().max()) <= \
            2 ** -8 * float(expected_grad.abs().max())


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(11)
    query = _unit(29, 40, gen).repeat(1, 2)[:, ::2]               # column stride 2
    positive = _unit(29, 40, gen).t().contiguous().t()            # column-major
    queue_buffer = _unit(90, 40, gen).t().contiguous()            # MoCo's (D, K) buffer
    queue = queue_buffer.t()                                      # (K, D) view, no copy
    assert not (query.is_contiguous() or positive.is_contiguous() or queue.is_contiguous())
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    for backend in ("auto", "reference"):
        loss, grad = _loss_and_grad(query, positive, queue, 0.2, backend)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5,
                                   atol=1e-6 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_no_gradient_to_positive_or_queue(backend):
    query, positive, queue = _inputs(9, 31, 16, seed=5)
    query.requires_grad_()
    positive.requires_grad_()
    queue.requires_grad_()
    queue_infonce(query, positive, queue, 0.2, backend=backend).backward()
    assert query.grad is not None and positive.grad is None and queue.grad is None
    # a loss that depends on nothing with a gradient needs none
    loss = queue_infonce(query.detach(), positive, queue, 0.2, backend=backend)
    assert not loss.requires_grad


def _extreme_inputs(rows, keys, dim, seed):
    """Cosines near +-1: positives and a third of the queue are near-copies of queries, another
    third near-copies of their negatives."""
    gen = torch.Generator().manual_seed(seed)
    query = _unit(rows, dim, gen)
    noise = lambda n: 1e-3 * torch.randn(n, dim, generator=gen, dtype=torch.float64).float()  # noqa: E731
    positive = F.normalize(query + noise(rows), dim=1)
    picks = torch.randint(0, rows, (keys,), generator=gen)
    signs = torch.tensor([1.0, -1.0, 0.0]).repeat(keys // 3 + 1)[:keys, None]
    near = F.normalize(signs * query[picks] + noise(keys), dim=1)
    queue = torch.where(signs == 0, _unit(keys, dim, gen), near)
    return query, positive, queue


@pytest.mark.parametrize("temperature", [0.05, 0.01])
def test_extreme_logits_are_stable(temperature):
    # tau = 0.01: logits +-100, exp(100) overflows fp32 without the max subtraction
    query, positive, queue = _extreme_inputs(17, 60, 32, seed=13)
    expected, expected_grad, _ = _infonce64(query, positive, queue, temperature)
    for backend in ("auto", "reference"):
        loss, grad = _loss_and_grad(query, positive, queue, temperature, backend)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
        # the fp32 floor: p_i0 = exp(x_i0 - lse_i) with logits up to 1/tau is good to a few ulps
        # of 1/tau, and p_i0 - 1 reaches the gradient times 1/(M tau)
        floor = 4 * torch.finfo(torch.float32).eps / temperature / (query.shape[0] * temperature)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=floor)


def test_registered_op_outputs_rows_and_lse():
    query, positive, queue = _inputs(13, 40, 20, seed=17)
    row_loss, lse = torch.ops.densesim.queue_infonce(query, positive, queue, 0.2, False)
    expected, _, expected_lse = _infonce64(query, positive, queue, 0.2)
    assert row_loss.shape == lse.shape == (13,) and row_loss.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row_loss.mean().double(), expected, rtol=1e-6, atol=1e-6)


def test_gradient_through_lse_output():
    """The op's autograd also carries a gradient that reaches lse (d lse_i/dq_i = sum_j p_ij v_j / tau)."""
    query, positive, queue = _inputs(11, 25, 12, seed=19)
    weights = torch.rand(11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = query.clone().requires_grad_()
    row_loss, lse = torch.ops.densesim.queue_infonce(q, positive, queue, 0.3, False)
    (row_loss * weights.float()).sum().add((lse * (1 - weights).float()).sum()).backward()
    q64 = query.double().requires_grad_()
    x = torch.cat([(q64 * positive.double()).sum(1, keepdim=True), q64 @ queue.double().t()], 1) / 0.3
    lse64 = torch.logsumexp(x, 1)
    ((lse64 - x[:, 0]) * weights + lse64 * (1 - weights)).sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5,
                               atol=1e-6 * float(q64.grad.abs().max()))


def test_opcheck_registered_ops():
    query, positive, queue = _inputs(7, 13, 5, seed=23)
    forward = torch.ops.densesim.queue_infonce.default
    backward = torch.ops.densesim.queue_infonce_backward.default
    torch.library.opcheck(forward, (query.clone().requires_grad_(), positive, queue, 0.2, False))
    torch.library.opcheck(forward, (query, positive, queue, 0.07, False))
    _, lse = forward(query, positive, queue, 0.2, False)
    grads = torch.rand(2, 7, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(backward, (query, positive, queue, lse, grads[0], grads[1], 0.2, False))


def test_works_inside_torch_compile():
    query, positive, queue = _inputs(21, 45, 16, seed=29)

    def step(q, pos, keys):
        return queue_infonce(q, pos, keys, 0.2) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q = query.clone().requires_grad_()
    loss = compiled(q, positive, queue)
    loss.backward()
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    torch.testing.assert_close(loss.double(), 2 * expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.grad.double(), 2 * expected_grad, rtol=1e-5,
                               atol=2e-6 * float(expected_grad.abs().max()))


def test_meta_tensors_need_no_values():
    """Validation and the op's fake implementation never read a value (no host sync)."""
    query, positive = torch.empty(12544, 128, device="meta"), torch.empty(12544, 128, device="meta")
    queue = torch.empty(65536, 128, device="meta", dtype=torch.bfloat16)
    loss = queue_infonce(query.requires_grad_(), positive, queue, 0.2)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32


def _valid():
    return _inputs(4, 6, 8, seed=31)


@pytest.mark.parametrize("case,message", [
    (lambda q, p, k: (q[0], p, k), "query must have shape \\(M, D\\)"),
    (lambda q, p, k: (q, p[None], k), "positive must have shape \\(M, D\\)"),
    (lambda q, p, k: (q, p, k[0]), "queue must have shape \\(K, D\\)"),
    (lambda q, p, k: (q, p[:, :7], k), "positive must have the same D as query"),
    (lambda q, p, k: (q, p[:3], k), "positive must have one row per query row"),
    (lambda q, p, k: (q, p, k[:, :5]), "queue must have shape \\(K, D\\) with D = 8"),
    (lambda q, p, k: (q.long(), p, k), "query must be a floating tensor"),
    (lambda q, p, k: (q, p.to(torch.int32), k), "positive must be a floating tensor"),
    (lambda q, p, k: (q, p, k.bool()), "queue must be a floating tensor"),
    (lambda q, p, k: (q, p, k.to("meta")), "queue must be on the same device as query"),
    (lambda q, p, k: (q, p.to("meta"), k), "positive must be on the same device as query"),
    (lambda q, p, k: (q, p, k[:0]), "queue must hold at least one key"),
    (lambda q, p, k: (q[:0], p[:0], k), "query must have at least one row"),
    (lambda q, p, k: (q[:, :0], p[:, :0], k[:, :0]), "query must have a non-empty feature dim"),
    (lambda q, p, k: (q.numpy(), p, k), "query must be a torch.Tensor"),
])
def test_validation_errors(monkeypatch, case, message):
    def no_launch(*args, **kwargs):
        raise AssertionError("the op ran before validation")

    monkeypatch.setattr(qi, "_triton_forward", no_launch)
    monkeypatch.setattr(qi, "_reference_forward", no_launch)
    query, positive, queue = case(*_valid())
    for backend in ("auto", "reference", "triton"):
        with pytest.raises(ValueError, match=f"^queue_infonce: {message}") as info:
            queue_infonce(query, positive, queue, 0.2, backend=backend)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"^queue_infonce_reference: {message}"):
        queue_infonce_reference(query, positive, queue, 0.2)


@pytest.mark.parametrize("temperature", [0.0, -0.2, float("inf"), float("nan"), True, "0.2",
                                         torch.tensor(0.2), None])
def test_temperature_must_be_a_positive_finite_number(temperature):
    with pytest.raises(ValueError, match="^queue_infonce: temperature must be a positive finite"):
        queue_infonce(*_valid(), temperature)
    assert float(queue_infonce(*_valid(), 1)) > 0  # an int is a number


def test_bad_backend_name():
    with pytest.raises(ValueError, match="^queue_infonce: backend must be one of"):
        queue_infonce(*_valid(), 0.2, backend="cuda")


@pytest.mark.skipif(not qi._TRITON_IMPORTABLE, reason="triton is not importable")
def test_backend_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="^queue_infonce: backend='triton' needs CUDA tensors .*"
                                           "TRITON_INTERPRET=1") as info:
        queue_infonce(*_valid(), 0.2, backend="triton")
    assert "\n" not in str(info.value)
    # 'auto' on CPU is the reference, with or without the interpreter
    assert torch.isfinite(queue_infonce(*_valid(), 0.2, backend="auto"))


def test_backend_triton_without_interpreter_in_a_fresh_process():
    """The same in a process that imported triton without TRITON_INTERPRET (as a CPU user would)."""
    code = ("import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from kernels import queue_infonce\n"
            "q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)\n"
            "try:\n    queue_infonce(q, q, q, 0.2, backend='triton')\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=str(__import__("pathlib").Path(qi.__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("RAISED queue_infonce: backend='triton' needs"), out.stdout


def test_backend_triton_rejects_large_dim_and_auto_uses_the_reference():
    query, positive, queue = _inputs(3, 5, 300, seed=37)
    if qi._TRITON_IMPORTABLE:
        with pytest.raises(RuntimeError, match="^queue_infonce: backend='triton' supports D <= 256"):
            queue_infonce(query, positive, queue, 0.2, backend="triton")
    expected, _, _ = _infonce64(query, positive, queue, 0.2)
    torch.testing.assert_close(queue_infonce(query, positive, queue, 0.2).double(), expected,
                               rtol=1e-6, atol=1e-6)
