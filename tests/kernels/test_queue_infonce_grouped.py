"""queue_infonce_grouped: G queue-InfoNCE terms against a bank of queues in one launch (DetCo's
twelve terms), against float64 cross-entropies written here, on every backend; and the single op
as the grouped launch with G = 1."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels import queue_infonce, queue_infonce_grouped, queue_infonce_grouped_reference
from tests.host_sync import count_host_syncs

qi = importlib.import_module("kernels.queue_infonce")  # the module (the package exports the function)
BACKENDS = ["auto", "reference", "triton"]
# On a GPU machine the kernels run compiled on CUDA tensors; on CPU under TRITON_INTERPRET=1.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(*tensors):
    return [t.to(DEVICE) for t in tensors]


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def float64_terms(q, k, queues, index, tau):
    """(G, M) row losses: cross-entropy over cat([<q,k+>, q @ queue^T]) / tau, label 0."""
    rows = []
    for g, i in enumerate(index):
        logits = torch.cat([(q[g] * k[g]).sum(1, keepdim=True), q[g] @ queues[i].t()], 1) / tau
        rows.append(F.cross_entropy(logits, torch.zeros(len(q[g]), dtype=torch.long),
                                    reduction="none"))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(12, 8, 8, 70, 16), (3, 2, 1, 1, 3), (5, 3, 19, 45, 8)])
def test_grouped_matches_float64(backend, shape):
    G, Q, M, K, D = shape
    torch.manual_seed(sum(shape))
    q = unit(G, M, D).requires_grad_()
    k, queues = unit(G, M, D), unit(Q, K, D)
    index = [g % Q for g in range(G)][::-1]          # shared queues, out of order
    want = float64_terms(q, k, queues, index, 0.2)
    weights = torch.rand(G, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad((want.mean(1) * weights).sum(), [q])
    qf = q.detach().float().to(DEVICE).requires_grad_()
    kf, queues_f = on(k.float(), queues.float())
    got = queue_infonce_grouped(qf, kf, queues_f, index, 0.2, backend=backend)
    assert got.shape == (G,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), want.mean(1), rtol=1e-5, atol=1e-5)
    (got * weights.float().to(DEVICE)).sum().backward()
    torch.testing.assert_close(qf.grad.double().cpu(), want_grad, rtol=1e-4, atol=1e-6)
    rows = queue_infonce_grouped(qf, kf, queues_f, index, 0.2, backend=backend,
                                 reduction="none")
    torch.testing.assert_close(rows.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_each_group_is_the_single_op(backend):
    """Term g equals queue_infonce on its own tensors (the DetCo twelve-call loop)."""
    torch.manual_seed(3)
    q, k, queues = on(unit(6, 9, 8).float(), unit(6, 9, 8).float(), unit(4, 50, 8).float())
    index = [0, 1, 2, 3, 0, 1]
    got = queue_infonce_grouped(q, k, queues, index, 0.1, backend=backend)
    for g, i in enumerate(index):
        torch.testing.assert_close(got[g], queue_infonce(q[g], k[g], queues[i], 0.1,
                                                         backend=backend), rtol=1e-6, atol=1e-6)


def test_triton_splits_across_groups(monkeypatch):
    """Queue splits (partial sums per split) with several groups give the same answer."""
    if DEVICE == "cuda":
        pytest.skip("the split is chosen from the SM count on a GPU")
    monkeypatch.setitem(qi._CONFIG, "interpret", dict(qi._CONFIG["interpret"], splits=3))
    qi._cached_launch_plan.cache_clear()
    try:
        torch.manual_seed(4)
        q = unit(3, 40, 20).requires_grad_()
        k, queues = unit(3, 40, 20), unit(2, 130, 20)
        index = [1, 0, 1]
        want = float64_terms(q, k, queues, index, 0.2).mean(1).sum()
        (want_grad,) = torch.autograd.grad(want, [q])
        qf = q.detach().float().requires_grad_()
        assert qi._launch_plan("forward", qf, k.float(), queues.float())["splits"] == 3
        got = queue_infonce_grouped(qf, k.float(), queues.float(), index, 0.2, backend="triton")
        got.sum().backward()
    finally:
        qi._cached_launch_plan.cache_clear()
    torch.testing.assert_close(got.sum().double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qf.grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_bf16_queries_against_an_fp32_bank_and_strided_views():
    torch.manual_seed(5)
    q = unit(4, 7, 16)
    bank = unit(3, 33, 16)
    k = unit(4, 7, 16)
    index = [2, 0, 1, 2]
    want = float64_terms(q.bfloat16().double(), k, bank, index, 0.2).mean(1)
    strided = torch.stack([bank.float(), bank.float()], dim=2)[:, :, 1]     # (Q, K, D) view
    q16, kf, strided = on(q.bfloat16(), k.float(), strided)
    for backend in ("auto", "triton"):
        got = queue_infonce_grouped(q16, kf, strided, index, 0.2, backend=backend)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


def test_no_host_sync_after_the_first_call():
    torch.manual_seed(6)
    q = unit(4, 5, 8).float().requires_grad_()
    k, queues = unit(4, 5, 8).float(), unit(2, 20, 8).float()
    queue_infonce_grouped(q, k, queues, [0, 1, 1, 0], 0.2).sum().backward()
    with count_host_syncs() as syncs:
        queue_infonce_grouped(q, k, queues, [0, 1, 1, 0], 0.2).sum().backward()
    assert not syncs, syncs.report()


def test_reference_is_a_stack_of_single_references():
    torch.manual_seed(7)
    q, k, queues = unit(2, 3, 4).float(), unit(2, 3, 4).float(), unit(2, 6, 4).float()
    got = queue_infonce_grouped_reference(q, k, queues, [1, 1], 0.2)
    torch.testing.assert_close(got, torch.stack([
        queue_infonce(q[0], k[0], queues[1], 0.2, backend="reference"),
        queue_infonce(q[1], k[1], queues[1], 0.2, backend="reference")]))


@pytest.mark.parametrize("bad, message", [
    (dict(queue_index=[0, 2]), r"queue_index entries must be in \[0, 2\)"),
    (dict(queue_index=[0]), "one queue per group"),
    (dict(queue_index=(0, True)), "Python ints"),
    (dict(query=torch.zeros(2, 3)), r"query must be a tensor of shape \(G, M, D\)"),
    (dict(positive=torch.zeros(2, 4, 4)), "positive must have query's shape"),
    (dict(queues=torch.zeros(2, 0, 4)), "K > 0"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_input_is_one_line(bad, message):
    args = dict(query=torch.zeros(2, 3, 4), positive=torch.zeros(2, 3, 4),
                queues=torch.zeros(2, 5, 4), queue_index=[0, 1], temperature=0.2)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        queue_infonce_grouped(args["query"], args["positive"], args["queues"],
                              args["queue_index"], args["temperature"])


def test_registered_op_passes_opcheck():
    torch.manual_seed(8)
    q = unit(3, 4, 8).float().requires_grad_()
    k, queues = unit(3, 4, 8).float(), unit(2, 10, 8).float()
    index = torch.tensor([0, 1, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.densesim.queue_infonce_grouped.default,
                          (q, k, queues, index, 0.2, False))
