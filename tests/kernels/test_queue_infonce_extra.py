"""queue_infonce's extra per-row negative column (RegionCL) and per-row losses (CCOP's masked rows),
against a float64 cross-entropy over cat([l_pos, extra, l_neg]) / tau, on every backend, with the
gradients to the query and to whatever made the extra column."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import queue_infonce, queue_infonce_reference
from tests.host_sync import count_host_syncs


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def float64_rows(q, k, queue, e, tau):
    logits = torch.cat([(q * k).sum(1, keepdim=True), (q * e).sum(1, keepdim=True), q @ queue.t()],
                       dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long), reduction="none")


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("shape", [(7, 33, 16), (1, 1, 3), (19, 70, 8)])
def test_extra_negative_matches_float64(backend, shape):
    torch.manual_seed(sum(shape))
    M, K, D = shape
    q, k, queue = unit(M, D).requires_grad_(), unit(M, D), unit(K, D)
    e = unit(M, D).requires_grad_()
    want = float64_rows(q, k, queue, e, 0.2)
    want_grads = torch.autograd.grad(want.sum() * 0.5, [q, e])
    got = queue_infonce(q.float(), k.float(), queue.float(), 0.2, backend=backend,
                        extra_negative=(q.float() * e.float()).sum(1), reduction="none")
    assert got.dtype == torch.float32 and got.shape == (M,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.sum() * 0.5, [q, e])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    mean = queue_infonce(q.float(), k.float(), queue.float(), 0.2, backend=backend,
                         extra_negative=(q.float() * e.float()).sum(1))
    torch.testing.assert_close(mean.double(), want.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_rows_without_extra_are_the_op_rows(backend):
    torch.manual_seed(1)
    q, k, queue = unit(9, 8).float(), unit(9, 8).float(), unit(40, 8).float()
    rows = queue_infonce(q, k, queue, 0.2, backend=backend, reduction="none")
    ref = queue_infonce_reference(q, k, queue, 0.2, reduction="none")
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.mean(), queue_infonce(q, k, queue, 0.2, backend=backend))


def test_a_huge_extra_negative_stays_finite_and_no_host_sync():
    torch.manual_seed(2)
    q = unit(5, 8).float().requires_grad_()
    k, queue = unit(5, 8).float(), unit(16, 8).float()
    extra = torch.full((5,), 1.0) * 50.0          # logit 250 at tau 0.2
    with count_host_syncs() as syncs:
        rows = queue_infonce(q, k, queue, 0.2, extra_negative=extra, reduction="none")
        rows.sum().backward()
    assert not syncs, syncs.report()
    assert bool(torch.isfinite(rows).all()) and bool(torch.isfinite(q.grad).all())
    torch.testing.assert_close(rows, 250 - (q * k).sum(1).detach() / 0.2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(extra_negative=torch.zeros(3)), "extra_negative must have shape (M,) = (4,)"),
    (dict(extra_negative=torch.zeros(4, dtype=torch.long)), "extra_negative must be a floating"),
    (dict(reduction="sum"), "reduction must be 'mean' or 'none'"),
])
def test_bad_extras_are_one_line_errors(bad, message):
    q, k, queue = unit(4, 8).float(), unit(4, 8).float(), unit(6, 8).float()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        queue_infonce(q, k, queue, 0.2, **bad)
