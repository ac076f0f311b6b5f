"""queue_infonce against the issue-10 contract, on both implementations of the registered op:
"op_reference" (CPU tensors, backend="auto": densesim::queue_infonce with use_triton=False, the
reference maths) and "triton" (backend="triton": the Triton kernels -- in the interpreter on a
CPU-only machine, TRITON_INTERPRET=1 from the root conftest; compiled on CUDA tensors on a GPU).

    * zero host syncs, forward + backward, default arguments (tests/host_sync.py);
    * the drop-in use inside a user's torch.compile(fullgraph=True, backend="aot_eager") function,
      forward and backward, equal to eager within rtol = atol = 1e-6 (relative to the scale);
    * bad input under torch.compile: the same one-line ValueError (propagated without fullgraph,
      its message inside dynamo's "Observed exception" with fullgraph=True);
    * meta tensors, forward and backward (no value is read);
    * edge inputs against the float64 formula: all logits negative, all queue keys (and all
      queries) identical, M = 1, K = 1, D = 1, float64 inputs, stride-0 and transposed views;
    * the launch plan cached per shape on plain Python values, and the kernels fed the caller's
      tensors as they are (no .contiguous()/dtype copies; the gradient of a mean stays stride 0).
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import queue_infonce, queue_infonce_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_sync import count_host_syncs

qi = importlib.import_module("kernels.queue_infonce")
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not qi._TRITON_IMPORTABLE, reason="triton is not importable")
# path -> (device of the inputs, backend): both run the registered op
PATHS = {"op_reference": ("cpu", "auto"), "triton": (TRITON_DEVICE, "triton")}
PATH_PARAMS = [pytest.param("op_reference"), pytest.param("triton", marks=needs_triton)]


def _unit(rows, dim, gen, device="cpu", dtype=torch.float32):
    x = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)
    return x.to(device=device, dtype=dtype)


def _inputs(rows, keys, dim, seed, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(_unit(n, dim, gen, device, dtype) for n in (rows, rows, keys))


def _infonce64(query, positive, queue, temperature):
    """(loss, dL/dquery, row losses) in float64 from the formula (see test_queue_infonce.py)."""
    q, pos, keys = (t.detach().cpu().double() for t in (query, positive, queue))
    logits = torch.cat([(q * pos).sum(1, keepdim=True), q @ keys.t()], dim=1) / temperature
    lse = torch.logsumexp(logits, dim=1)
    rows = lse - logits[:, 0]
    p = torch.exp(logits - lse[:, None])
    grad = (p[:, :1] * pos + p[:, 1:] @ keys - pos) / (q.shape[0] * temperature)
    return rows.mean(), grad, rows


def _loss_and_grad(query, positive, queue, temperature, backend):
    q = query.detach().clone().requires_grad_()
    loss = queue_infonce(q, positive, queue, temperature, backend=backend)
    loss.backward()
    return loss.detach(), q.grad


def _assert_matches_float64(query, positive, queue, temperature, backend):
    loss, grad = _loss_and_grad(query, positive, queue, temperature, backend)
    expected, expected_grad, _ = _infonce64(query, positive, queue, temperature)
    assert loss.dtype == torch.float32 and grad.dtype == query.dtype and grad.shape == query.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    # the fp32 floor (as in test_queue_infonce.py's extreme logits): p_ij = exp(x_ij - lse_i)
    # with logits up to 1/tau is good to a few ulps of 1/tau, and reaches the gradient times
    # 1/(M tau) -- where the exact gradient nearly cancels (D = 1) that is all there is
    floor = 4 * torch.finfo(torch.float32).eps / temperature / (query.shape[0] * temperature)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, rtol=1e-5,
                               atol=max(2e-6 * float(expected_grad.abs().max()), floor))
    return loss, grad


# ----------------------------------------------------------------------------------------------
# no host sync
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS + ["plain_reference"])
def test_no_host_sync_forward_and_backward(path):
    device, backend = PATHS.get(path, ("cpu", "reference"))
    query, positive, queue = _inputs(37, 70, 20, seed=1, device=device)
    q = query.clone().requires_grad_()
    with count_host_syncs() as syncs:
        loss = queue_infonce(q, positive, queue, 0.2, backend=backend)  # default arguments
        loss.backward()
    assert not syncs, syncs.report()
    assert q.grad is not None and q.grad.shape == query.shape


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_no_host_sync_in_the_registered_ops(path):
    """The ops as the fused engine calls them: row losses, a weighted sum, both outputs' gradients."""
    device, _ = PATHS[path]
    query, positive, queue = _inputs(33, 50, 16, seed=2, device=device)
    weights = torch.rand(33, generator=torch.Generator().manual_seed(0)).to(device)
    q = query.clone().requires_grad_()
    with count_host_syncs() as syncs:
        row_loss, lse = torch.ops.densesim.queue_infonce(q, positive, queue, 0.2, path == "triton")
        ((row_loss * weights).sum() + lse.sum()).backward()
    assert not syncs, syncs.report()


# ----------------------------------------------------------------------------------------------
# torch.compile: the drop-in use, and bad input
# ----------------------------------------------------------------------------------------------

COMPILE_TOLERANCE = 1e-6  # relative to the scale: the op is opaque in the graph, the same kernels run


@pytest.mark.parametrize("path", PATH_PARAMS + ["plain_reference"])
def test_drop_in_inside_torch_compile_fullgraph(path):
    device, backend = PATHS.get(path, ("cpu", "reference"))
    query, positive, queue = _inputs(35, 45, 24, seed=3, device=device)
    queue = queue.t().contiguous().t()  # MoCo's (D, K) buffer seen as (K, D): a strided view

    def user_step(q, pos, keys):
        # a user's function: normalises its embeddings and scales the loss (more than `return op()`)
        q = F.normalize(q, dim=1)
        return 0.5 * queue_infonce(q, pos, keys, 0.2, backend=backend) + 0.01 * q.pow(2).sum()

    compiled = torch.compile(user_step, fullgraph=True, backend="aot_eager")
    q_eager = query.clone().requires_grad_()
    eager = user_step(q_eager, positive, queue)
    eager.backward()
    q_compiled = query.clone().requires_grad_()
    got = compiled(q_compiled, positive, queue)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=COMPILE_TOLERANCE, atol=COMPILE_TOLERANCE)
    torch.testing.assert_close(q_compiled.grad, q_eager.grad, rtol=COMPILE_TOLERANCE,
                               atol=COMPILE_TOLERANCE * float(q_eager.grad.abs().max()))
    # and both equal the float64 formula
    expected, _, _ = _infonce64(F.normalize(query.double(), dim=1), positive, queue, 0.2)
    torch.testing.assert_close(got.detach().cpu().double(),
                               0.5 * expected + 0.01 * query.shape[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_registered_op_rows_inside_torch_compile(path):
    """The row losses and lse of the op itself (a weighted mean, as a user would write it)."""
    device, _ = PATHS[path]
    query, positive, queue = _inputs(21, 40, 12, seed=4, device=device)
    weights = torch.linspace(0.5, 1.5, 21, device=device)

    def weighted(q):
        row_loss, lse = torch.ops.densesim.queue_infonce(q, positive, queue, 0.3, path == "triton")
        return (row_loss * weights).sum() / weights.sum() + 0.1 * lse.mean()

    compiled = torch.compile(weighted, fullgraph=True, backend="aot_eager")
    q1, q2 = query.clone().requires_grad_(), query.clone().requires_grad_()
    eager = weighted(q1)
    eager.backward()
    got = compiled(q2)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=COMPILE_TOLERANCE, atol=COMPILE_TOLERANCE)
    torch.testing.assert_close(q2.grad, q1.grad, rtol=COMPILE_TOLERANCE,
                               atol=COMPILE_TOLERANCE * float(q1.grad.abs().max()))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_changing_temperature_inside_torch_compile(path):
    """A temperature passed as an argument that changes between calls (a schedule): on the
    recompile dynamo makes it a SymFloat; the validation compares it (a guard) -- no graph break
    under fullgraph -- and every value gives the eager answer."""
    device, backend = PATHS[path]
    query, positive, queue = _inputs(19, 40, 12, seed=16, device=device)

    def user_step(q, temperature):
        return queue_infonce(q, positive, queue, temperature, backend=backend) + 0.0 * q.sum()

    torch._dynamo.reset()  # user_step's code is shared by the parametrisations: fresh limits
    compiled = torch.compile(user_step, fullgraph=True, backend="aot_eager")
    for temperature in (0.2, 0.1, 0.07):
        q1, q2 = query.clone().requires_grad_(), query.clone().requires_grad_()
        eager = user_step(q1, temperature)
        eager.backward()
        got = compiled(q2, temperature)
        got.backward()
        torch.testing.assert_close(got, eager, rtol=COMPILE_TOLERANCE, atol=COMPILE_TOLERANCE)
        torch.testing.assert_close(q2.grad, q1.grad, rtol=COMPILE_TOLERANCE,
                                   atol=COMPILE_TOLERANCE * float(q1.grad.abs().max()))


BAD_INPUTS = [
    (lambda q, p, k: (q, p[:, :7], k, 0.2), "queue_infonce: positive must have the same D as query (8)"),
    (lambda q, p, k: (q, p[:3], k, 0.2), "queue_infonce: positive must have one row per query row"),
    (lambda q, p, k: (q, p, k[:, :5], 0.2), "queue_infonce: queue must have shape (K, D) with D = 8"),
    (lambda q, p, k: (q[:0], p[:0], k, 0.2), "queue_infonce: query must have at least one row"),
    (lambda q, p, k: (q, p, k, -0.2), "queue_infonce: temperature must be a positive finite number"),
]


@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_under_torch_compile_raises_the_same_message(backend, case):
    make, message = BAD_INPUTS[case]
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, positive, queue, temperature = make(*_inputs(4, 6, 8, seed=5, device=device))

    def user_step(q, pos, keys):
        return queue_infonce(q, pos, keys, temperature, backend=backend) * 2.0

    with pytest.raises(ValueError) as eager_error:
        user_step(query, positive, queue)
    assert str(eager_error.value).startswith(message) and "\n" not in str(eager_error.value)
    # without fullgraph dynamo falls back to eager: the ValueError itself propagates
    with pytest.raises(ValueError) as error:
        torch.compile(user_step, backend="aot_eager")(query, positive, queue)
    assert str(error.value) == str(eager_error.value)
    # with fullgraph=True dynamo raises Unsupported ("Observed exception") carrying the message
    torch._dynamo.reset()  # the fallback above marked user_step's frame to run eagerly
    with pytest.raises(torch._dynamo.exc.Unsupported) as wrapped:
        torch.compile(user_step, fullgraph=True, backend="aot_eager")(query, positive, queue)
    assert "Observed exception" in str(wrapped.value)
    assert str(eager_error.value) in str(wrapped.value)


# ----------------------------------------------------------------------------------------------
# meta tensors
# ----------------------------------------------------------------------------------------------

def test_meta_tensors_forward_and_backward():
    """DenseCL's dense term at 256 images: no value is read, no memory of that size is touched."""
    query = torch.empty(12544, 128, device="meta", dtype=torch.bfloat16, requires_grad=True)
    positive = torch.empty(12544, 128, device="meta", dtype=torch.bfloat16)
    queue = torch.empty(128, 65536, device="meta", dtype=torch.bfloat16).t()
    with count_host_syncs() as syncs:
        loss = queue_infonce(query, positive, queue, 0.2)
        loss.backward()
    assert not syncs, syncs.report()
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    assert query.grad.device.type == "meta" and query.grad.shape == query.shape
    assert query.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# edge inputs against the float64 formula, both implementations
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
def test_all_logits_negative(path):
    """Every logit (positive and queue) is below zero; the queue's ragged last tile is padding that
    must count as -inf, never as a zero logit (which would beat every real one)."""
    device, backend = PATHS[path]
    gen = torch.Generator().manual_seed(6)
    rows, keys, dim = 37, 45, 16
    u = F.normalize(torch.randn(1, dim, generator=gen, dtype=torch.float64), dim=1)
    def around(n, sign):
        return F.normalize(sign * u + 0.05 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)

    query, positive, queue = (t.float().to(device) for t in (around(rows, 1), around(rows, -1),
                                                              around(keys, -1)))
    assert float((query * positive).sum(1).max()) < 0 and float((query @ queue.t()).max()) < 0
    for temperature in (0.2, 0.02):
        _assert_matches_float64(query, positive, queue, temperature, backend)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_all_queue_keys_and_queries_identical(path):
    """Identical keys give identical logits (the op has no argmax, so there is no tie to break:
    the softmax spreads evenly); identical query rows give identical row losses. The queue is
    one key expanded (a stride-0 view, read without a copy)."""
    device, backend = PATHS[path]
    gen = torch.Generator().manual_seed(7)
    rows, keys, dim = 40, 70, 24
    query = _unit(1, dim, gen, device).expand(rows, dim)
    positive = _unit(rows, dim, gen, device)
    for queue in (_unit(1, dim, gen, device).expand(keys, dim),
                  _unit(1, dim, gen, device).repeat(keys, 1)):
        _assert_matches_float64(query, positive, queue, 0.2, backend)
        same_positive = positive[:1].expand(rows, dim)
        row_loss, lse = torch.ops.densesim.queue_infonce(query, same_positive, queue, 0.2,
                                                         path == "triton")
        torch.testing.assert_close(row_loss, row_loss[:1].expand(rows), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, lse[:1].expand(rows), rtol=1e-6, atol=1e-6)
        _, _, expected_rows = _infonce64(query, same_positive, queue, 0.2)
        torch.testing.assert_close(row_loss.cpu().double(), expected_rows, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("rows,keys,dim", [(1, 1, 1), (1, 1, 8), (1, 70, 16), (45, 1, 7),
                                           (3, 2, 1)])
def test_single_row_single_key_single_dim(path, rows, keys, dim):
    device, backend = PATHS[path]
    _assert_matches_float64(*_inputs(rows, keys, dim, seed=rows + keys + dim, device=device),
                            0.2, backend)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_float64_and_transposed_inputs(path):
    """float64 inputs are read as they are (fp32 compute; the gradient in float64), and
    transposed / column-strided views need no copy."""
    device, backend = PATHS[path]
    gen = torch.Generator().manual_seed(8)
    query = _unit(33, 20, gen, device, torch.float64).t().contiguous().t()     # column-major
    positive = _unit(33, 20, gen, device, torch.float64).repeat(1, 2)[:, ::2]  # column stride 2
    queue = _unit(90, 20, gen, device, torch.float64).t().contiguous().t()     # a (D, K) buffer
    assert not (query.is_contiguous() or positive.is_contiguous() or queue.is_contiguous())
    loss, grad = _loss_and_grad(query, positive, queue, 0.2, backend)
    expected, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float64
    # fp32 compute: the float64 inputs are rounded to fp32 once
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, rtol=1e-5,
                               atol=2e-6 * float(expected_grad.abs().max()))


def test_empty_batch_is_a_clear_value_error():
    """M = 0 has no mean: a one-line ValueError on every backend, before anything runs."""
    query, positive, queue = _inputs(0, 5, 8, seed=9)
    for backend in ("auto", "reference", "triton"):
        with pytest.raises(ValueError, match=r"^queue_infonce: query must have at least one row "
                                             r"\(M > 0\), got \(0, 8\)$"):
            queue_infonce(query, positive, queue, 0.2, backend=backend)


# ----------------------------------------------------------------------------------------------
# launch plan cache and no copies
# ----------------------------------------------------------------------------------------------

@needs_triton
def test_launch_plan_is_cached_per_shape_on_plain_values(monkeypatch):
    keys_seen = []
    cached = qi._cached_launch_plan

    def recording(*key):
        keys_seen.append(key)
        return cached(*key)

    monkeypatch.setattr(qi, "_cached_launch_plan", recording)
    cached.cache_clear()
    query, positive, queue = _inputs(29, 61, 12, seed=10, device=TRITON_DEVICE)
    for _ in range(3):
        _loss_and_grad(query, positive, queue, 0.2, "triton")
    info = cached.cache_info()
    assert info.misses == 2 and info.hits == 4  # one plan per pass, made once
    plain = (bool, int, float, str, type(None), torch.dtype)
    for key in keys_seen:
        for part in key:
            assert isinstance(part, plain) or (isinstance(part, tuple) and
                                               all(isinstance(p, int) for p in part)), key
    # a new shape makes new plans; an old one is still a hit
    _loss_and_grad(*_inputs(30, 61, 12, seed=11, device=TRITON_DEVICE), 0.2, "triton")
    _loss_and_grad(query, positive, queue, 0.2, "triton")
    info = cached.cache_info()
    assert info.misses == 4 and info.hits == 6


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
def test_kernels_take_the_callers_tensors_without_copies(monkeypatch):
    forward = _RecordLaunch(qi._qi_forward_kernel)
    backward = _RecordLaunch(qi._qi_backward_kernel)
    monkeypatch.setattr(qi, "_qi_forward_kernel", forward)
    monkeypatch.setattr(qi, "_qi_backward_kernel", backward)
    gen = torch.Generator().manual_seed(12)
    query = _unit(31, 40, gen, TRITON_DEVICE).repeat(1, 2)[:, ::2].requires_grad_()  # stride 2
    positive = _unit(31, 40, gen, TRITON_DEVICE).t().contiguous().t()                 # column-major
    queue = _unit(40, 77, gen, TRITON_DEVICE).t()                                     # a (D, K) buffer
    row_loss, _ = torch.ops.densesim.queue_infonce(query, positive, queue, 0.2, True)
    (row_loss.sum() / 31).backward()  # sum's backward expands: the gradient arrives stride 0
    # the kernels take one group's tensors as (1, ...) views of the caller's: same memory, strides
    (q, pos, keys, index, *_), = forward.launches
    for got, given in ((q, query), (pos, positive), (keys, queue)):
        assert got.data_ptr() == given.data_ptr() and got.stride()[1:] == given.stride()
    assert index.tolist() == [0]
    (q, pos, keys, _index, lse, grad_loss, grad_lse, _out), = backward.launches
    assert q.data_ptr() == query.data_ptr() and keys.stride()[1:] == queue.stride()
    assert grad_loss.stride()[1:] == (0,)  # read by its stride: no copy
    assert lse.dtype == grad_loss.dtype == grad_lse.dtype == torch.float32
    _, expected_grad, _ = _infonce64(query, positive, queue, 0.2)
    torch.testing.assert_close(query.grad.cpu().double(), expected_grad, rtol=1e-5,
                               atol=2e-6 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_backward_op_takes_strided_gradient_vectors(path):
    """densesim::queue_infonce_backward with stride-0 / strided grad_loss, grad_lse and lse views
    gives what contiguous copies give."""
    device, _ = PATHS[path]
    use_triton = path == "triton"
    query, positive, queue = _inputs(35, 60, 12, seed=13, device=device)
    _, lse = torch.ops.densesim.queue_infonce(query, positive, queue, 0.2, use_triton)
    grad_loss = torch.full((1,), 0.25, device=device).expand(35)
    grad_lse = torch.randn(70, generator=torch.Generator().manual_seed(0)).to(device)[::2]
    lse_strided = torch.stack([lse, lse], dim=1)[:, 1]
    got = torch.ops.densesim.queue_infonce_backward(query, positive, queue, lse_strided, grad_loss,
                                                    grad_lse, 0.2, use_triton)
    want = torch.ops.densesim.queue_infonce_backward(query, positive, queue, lse.contiguous(),
                                                     grad_loss.contiguous(), grad_lse.contiguous(),
                                                     0.2, use_triton)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_opcheck_with_strided_inputs_and_gradients(path):
    device, _ = PATHS[path]
    use_triton = path == "triton"
    gen = torch.Generator().manual_seed(14)
    query = _unit(9, 6, gen, device).t().contiguous().t()
    positive = _unit(9, 12, gen, device)[:, ::2]
    queue = _unit(6, 19, gen, device).t()
    forward = torch.ops.densesim.queue_infonce.default
    torch.library.opcheck(forward, (query.clone().requires_grad_(), positive, queue, 0.2, use_triton))
    _, lse = forward(query, positive, queue, 0.2, use_triton)
    grad_loss = torch.full((1,), 1 / 9, device=device).expand(9)
    torch.library.opcheck(torch.ops.densesim.queue_infonce_backward.default,
                          (query, positive, queue, lse, grad_loss, torch.zeros(9, device=device),
                           0.2, use_triton))


def test_reference_function_equals_the_op_paths():
    """backend="reference" (plain autograd, what --no-fused runs) and the op agree."""
    query, positive, queue = _inputs(17, 33, 10, seed=15)
    loss_ref, grad_ref = _loss_and_grad(query, positive, queue, 0.2, "reference")
    loss_op, grad_op = _loss_and_grad(query, positive, queue, 0.2, "auto")
    torch.testing.assert_close(loss_op, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_op, grad_ref, rtol=1e-5, atol=1e-7)
    assert float(queue_infonce_reference(query, positive, queue, 0.2)) == float(loss_ref)
