"""unigrad_loss / unigrad_covariance against float64 formulas written out here (SIM spec 6.2, 11, 12)."""
import os
import socket

import pytest
import torch

from kernels import unigrad_covariance, unigrad_loss, unigrad_loss_reference
from tests.spawn import spawn_ranks


def _layernorm64(x):
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def _dense_loss64_via_diag(pred, target, neg_weight, normalize_target=True):
    """The released code's formulation: the N x N matrix P F P^T and its mean diagonal."""
    channels = pred.shape[-1]
    p = pred.double().reshape(-1, channels)
    t = (_layernorm64(target) if normalize_target else target.double()).reshape(-1, channels)
    rows = p.shape[0]
    covariance = t.t() @ t / rows
    positive = ((p - t) ** 2).sum() / rows
    negative = torch.diagonal(p @ covariance @ p.t()).mean()
    return (positive + neg_weight * negative) / channels, covariance, p, t


def test_rowwise_equals_diagonal_formulation():
    pred, target = torch.randn(3, 10, 24), torch.randn(3, 10, 24)
    for neg_weight in (0.02, 1.5):
        loss = unigrad_loss(pred, target, neg_weight=neg_weight)
        expected, *_ = _dense_loss64_via_diag(pred, target, neg_weight)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize_target", [True, False])
def test_gradient_is_closed_form(normalize_target):
    batch, tokens, channels, neg_weight = 2, 13, 20, 0.3
    pred = torch.randn(batch, tokens, channels, requires_grad=True)
    target = torch.randn(batch, tokens, channels, requires_grad=True)
    loss = unigrad_loss(pred, target, neg_weight=neg_weight, normalize_target=normalize_target)
    loss.backward()
    _, covariance, p, t = _dense_loss64_via_diag(pred.detach(), target.detach(), neg_weight,
                                                 normalize_target)
    rows = batch * tokens
    expected = 2 * (p - t + neg_weight * p @ covariance) / (rows * channels)
    torch.testing.assert_close(pred.grad.double().reshape(rows, channels), expected, rtol=1e-5, atol=1e-8)
    assert target.grad is None  # the target is a constant


def test_trace_of_layernormed_covariance_is_channel_count():
    channels = 96
    target = torch.randn(4, 50, channels) * 3 + 1
    covariance = unigrad_covariance(target)
    assert covariance.shape == (channels, channels) and covariance.dtype == torch.float32
    assert not covariance.requires_grad
    assert abs(float(torch.trace(covariance)) - channels) / channels < 1e-3
    torch.testing.assert_close(covariance, covariance.t(), rtol=0, atol=0)
    _, expected, _, _ = _dense_loss64_via_diag(target, target, 0.0)
    torch.testing.assert_close(covariance.double(), expected, rtol=1e-5, atol=1e-6)


def test_given_covariance_equals_internal():
    pred, target = torch.randn(5, 16), torch.randn(5, 16)
    for normalize_target in (True, False):
        covariance = unigrad_covariance(target, normalize_target=normalize_target)
        a = unigrad_loss(pred, target, normalize_target=normalize_target)
        b = unigrad_loss(pred, target, normalize_target=normalize_target, covariance=covariance)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradient_accumulation_identity():
    # Engine recipe: F over all micro-batch targets, then each micro-batch's loss with that F.
    # A large neg_weight makes the F term matter, so the naive per-micro-batch F visibly differs.
    batch, tokens, channels, micro, neg_weight = 6, 9, 16, 3, 2.0
    pred = torch.randn(batch, tokens, channels, requires_grad=True)
    target = torch.randn(batch, tokens, channels)
    full = unigrad_loss(pred, target, neg_weight=neg_weight)
    full_grad, = torch.autograd.grad(full, pred)
    full_covariance = unigrad_covariance(target)
    micro_losses = [unigrad_loss(p, t, neg_weight=neg_weight, covariance=full_covariance)
                    for p, t in zip(pred.chunk(micro), target.chunk(micro))]
    accumulated = torch.stack(micro_losses).mean()
    accumulated_grad, = torch.autograd.grad(accumulated, pred)
    torch.testing.assert_close(accumulated, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(accumulated_grad, full_grad, rtol=1e-5, atol=1e-9)
    # averaging equal-sized micro-batch covariances gives the same F
    averaged = torch.stack([unigrad_covariance(t) for t in target.chunk(micro)]).mean(0)
    torch.testing.assert_close(averaged, full_covariance, rtol=1e-5, atol=1e-6)
    # while a micro-batch-only F (the naive way) gives a different gradient
    naive = torch.stack([unigrad_loss(p, t, neg_weight=neg_weight)
                         for p, t in zip(pred.chunk(micro), target.chunk(micro))]).mean()
    naive_grad, = torch.autograd.grad(naive, pred)
    assert (naive_grad - full_grad).abs().max() > 1e-2 * full_grad.abs().max()


def _paper_loss64(pred, target, neg_weight, global_weight, dense_weight):
    """SIM paper form written with explicit per-image loops, float64."""
    p_all, t_all = pred.double(), _layernorm64(target)
    batch, tokens, channels = p_all.shape
    p_bar = torch.stack([p_all[b].sum(0) / tokens for b in range(batch)])
    t_bar = torch.stack([t_all[b].sum(0) / tokens for b in range(batch)])
    f_global = sum(torch.outer(t_bar[b], t_bar[b]) for b in range(batch)) / batch
    global_terms = [((p_bar[b] - t_bar[b]) ** 2).sum() + neg_weight * p_bar[b] @ f_global @ p_bar[b]
                    for b in range(batch)]
    global_loss = sum(global_terms) / batch / channels
    p_tilde = [p_all[b] - p_bar[b] for b in range(batch)]
    t_tilde = [t_all[b] - t_bar[b] for b in range(batch)]
    f_dense = sum(t_tilde[b].t() @ t_tilde[b] for b in range(batch)) / (batch * tokens)
    dense_terms = [((p_tilde[b] - t_tilde[b]) ** 2).sum()
                   + neg_weight * torch.diagonal(p_tilde[b] @ f_dense @ p_tilde[b].t()).sum()
                   for b in range(batch)]
    dense_loss = sum(dense_terms) / (batch * tokens) / channels
    return global_weight * global_loss + dense_weight * dense_loss, f_global, f_dense


def test_paper_form_matches_direct_formula():
    batch, tokens, channels, neg_weight = 4, 7, 12, 0.5
    pred = torch.randn(batch, tokens, channels, requires_grad=True)
    target = torch.randn(batch, tokens, channels)
    for global_weight, dense_weight in ((1.0, 1.0), (0.3, 2.0)):
        loss = unigrad_loss(pred, target, neg_weight=neg_weight, form="paper",
                            global_weight=global_weight, dense_weight=dense_weight)
        pred64 = pred.detach().double().requires_grad_()
        expected, f_global, f_dense = _paper_loss64(pred64, target, neg_weight, global_weight, dense_weight)
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
        grad, = torch.autograd.grad(loss, pred)
        expected_grad, = torch.autograd.grad(expected, pred64)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-8)
    covariances = unigrad_covariance(target, form="paper")
    torch.testing.assert_close(covariances[0].double(), f_global, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(covariances[1].double(), f_dense, rtol=1e-5, atol=1e-6)
    given = unigrad_loss(pred, target, neg_weight=neg_weight, form="paper", covariance=covariances)
    torch.testing.assert_close(given, unigrad_loss(pred, target, neg_weight=neg_weight, form="paper"))


def test_three_d_and_two_d_inputs_agree():
    pred, target = torch.randn(3, 8, 10), torch.randn(3, 8, 10)
    torch.testing.assert_close(unigrad_loss(pred, target), unigrad_loss(pred.reshape(24, 10), target.reshape(24, 10)))
    torch.testing.assert_close(unigrad_covariance(target), unigrad_covariance(target.reshape(24, 10)))


def test_low_precision_inputs_give_fp32_loss():
    pred, target = torch.randn(4, 12, 32), torch.randn(4, 12, 32)
    ref64, *_ = _dense_loss64_via_diag(pred, target, 0.02)
    for dtype in (torch.bfloat16, torch.float16):
        loss = unigrad_loss(pred.to(dtype), target.to(dtype))
        assert loss.dtype == torch.float32
        # the loss itself adds no low-precision error: it equals the float64 loss of the rounded inputs
        rounded64, *_ = _dense_loss64_via_diag(pred.to(dtype), target.to(dtype), 0.02)
        torch.testing.assert_close(loss.double(), rounded64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.double(), ref64, rtol=2e-2, atol=1e-3)


def test_autocast_does_not_lower_precision():
    pred, target = torch.randn(30, 16), torch.randn(30, 16)
    plain = unigrad_loss(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = unigrad_loss(pred, target)
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, plain, rtol=1e-6, atol=0)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world_size, port, pred, target, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        local_pred, local_target = pred.chunk(world_size)[rank], target.chunk(world_size)[rank]
        result = (unigrad_covariance(local_target), unigrad_loss(local_pred, local_target))
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()   # leave together: a rank tearing gloo down early can abort
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_covariance_is_averaged_over_ranks(tmp_path):
    pred, target = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    spawn_ranks(_distributed_worker, (2, _free_port(), pred, target, str(tmp_path)), 2, tmp_path)
    full_covariance = unigrad_covariance(target)
    for rank in range(2):
        covariance, loss = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(covariance, full_covariance, rtol=1e-5, atol=1e-6)
        local_pred, local_target = pred.chunk(2)[rank], target.chunk(2)[rank]
        torch.testing.assert_close(loss, unigrad_loss(local_pred, local_target, covariance=full_covariance))


def test_rejects_bad_inputs():
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="unigrad_loss: target must have the same shape as pred"):
        unigrad_loss(pred, target[:, :4])
    with pytest.raises(ValueError, match="unigrad_loss: pred must have shape"):
        unigrad_loss(pred[0, 0], target[0, 0])
    with pytest.raises(ValueError, match="unigrad_loss: pred must be a floating"):
        unigrad_loss(pred.long(), target)
    with pytest.raises(ValueError, match="unigrad_loss: target must be on the same device"):
        unigrad_loss(pred, target.to("meta"))
    with pytest.raises(ValueError, match="covariance must be a float tensor of shape \\(C, C\\) = \\(8, 8\\)"):
        unigrad_loss(pred, target, covariance=torch.eye(7))
    with pytest.raises(ValueError, match="covariance must be a pair"):
        unigrad_loss(pred, target, covariance=torch.eye(8), form="paper")
    with pytest.raises(ValueError, match="form='paper'"):
        unigrad_loss(pred[0], target[0], form="paper")
    with pytest.raises(ValueError, match="form must be one of"):
        unigrad_loss(pred, target, form="global")
    with pytest.raises(ValueError, match="neg_weight"):
        unigrad_loss(pred, target, neg_weight=None)
    with pytest.raises(ValueError, match="unigrad_covariance: target must have shape"):
        unigrad_covariance(torch.randn(8))
    with pytest.raises(ValueError, match="backend"):
        unigrad_loss(pred, target, backend="Triton")
    torch.testing.assert_close(unigrad_loss(pred, target, backend="reference"),
                               unigrad_loss_reference(pred, target))
