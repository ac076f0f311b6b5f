"""The Triton paths of kernels/dense_match.py (dense_match, pixpro_loss) against float64 references.

On a CPU-only machine these run the kernels in the Triton interpreter (the root conftest sets
TRITON_INTERPRET=1), at small shapes chosen so that every block-boundary case is hit: several query
and key tiles, ragged last tiles, the one-tile and the looped channel paths. Also the registered
ops' Triton implementation (use_triton=True): opcheck, torch.compile, no host sync, the launch-plan
cache, and the edge inputs (ties, all-negative cosines next to padded key slots, single rows, empty
batches, 1x1 grids).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from host_sync import count_host_syncs

from kernels.dense_match import (dense_match, dense_match_reference, geometric_correspondence,
                                 grid_sample_coordinates, pixpro_loss, pixpro_loss_reference,
                                 pixpro_positive_mask)

# the module, not the function `kernels.dense_match` that kernels/__init__.py re-exports
dm = importlib.import_module("kernels.dense_match")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not dm._TRITON_IMPORTABLE, reason="triton is not importable")
pytestmark = needs_triton


# ---------------------------------------------------------------------------------------------
# dense_match (features)
# ---------------------------------------------------------------------------------------------

def _queries_with_clear_best_key(batch, num_queries, num_keys, channels):
    """Each query is a scaled, perturbed copy of one random key: a unique best match by a margin."""
    keys = torch.randn(batch, num_keys, channels)
    chosen = torch.randint(0, num_keys, (batch, num_queries))
    queries = keys[torch.arange(batch)[:, None], chosen] * (torch.rand(batch, num_queries, 1) * 3 + 0.5)
    return queries + 0.05 * torch.randn_like(queries), keys


def _cosines64(q, k):
    return F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).transpose(1, 2)


def _unique_argmax64(q, k):
    cosines = _cosines64(q, k)
    if k.shape[1] > 1:
        top2 = cosines.topk(2, dim=-1).values
        assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-3, "test inputs need a unique best key"
    sim, idx = cosines.max(dim=-1)
    return idx, sim


@pytest.mark.parametrize("batch,num_queries,num_keys,channels,dtype", [
    (3, 11, 17, 24, torch.float32),    # one tile each way, one channel tile
    (1, 5, 5, 7, torch.float32),       # B = 1, tiny, odd
    (2, 9, 1, 3, torch.float32),       # a single key
    (2, 70, 150, 45, torch.float32),   # 2 query tiles (fp32 tiles are 64), 3 key tiles, looped channels
    (2, 131, 37, 40, torch.bfloat16),  # 2 query tiles (16-bit tiles are 128), one channel tile
    (1, 19, 80, 300, torch.float16),   # channels > 256: the looped-channel path
])
def test_dense_match_triton_matches_float64(batch, num_queries, num_keys, channels, dtype):
    q, k = _queries_with_clear_best_key(batch, num_queries, num_keys, channels)
    q, k = q.to(DEVICE, dtype), k.to(DEVICE, dtype)
    idx, sim = dense_match(q, k, backend="triton")
    expected_idx, expected_sim = _unique_argmax64(q.cpu(), k.cpu())  # from the (rounded) inputs
    assert idx.dtype == torch.int64 and sim.dtype == torch.float32
    assert idx.shape == sim.shape == (batch, num_queries)
    assert torch.equal(idx.cpu(), expected_idx)
    err = (sim.cpu().double() - expected_sim).abs()
    if dtype == torch.float32:
        assert float(err.max()) <= 2e-6
    else:  # the low-precision rule, against the reference run on the same low-precision inputs
        _, lowp_sim = dense_match_reference(q, k)
        assert (err <= 2 * (lowp_sim.cpu().double() - expected_sim).abs() + 2e-6).all()


def test_dense_match_triton_non_contiguous_and_zero_rows():
    q, k = _queries_with_clear_best_key(2, 40, 30, 16)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)    # channel stride != 1
    k_strided = torch.cat([k, k], dim=2)[:, :, :16]                # token stride 32
    assert not q_strided.is_contiguous() and not k_strided.is_contiguous()
    idx, sim = dense_match(q_strided.to(DEVICE), k_strided.to(DEVICE), backend="triton")
    expected_idx, expected_sim = _unique_argmax64(q, k)
    assert torch.equal(idx.cpu(), expected_idx)
    torch.testing.assert_close(sim.cpu().double(), expected_sim, rtol=0, atol=2e-6)
    # an all-zero query has cosine 0 with every key: the first key, similarity 0 (as the reference)
    q[0, 3] = 0
    idx, sim = dense_match(q.to(DEVICE), k.to(DEVICE), backend="triton")
    assert int(idx[0, 3]) == 0 and float(sim[0, 3]) == 0.0


def test_dense_match_triton_ties_pick_the_smallest_index():
    # small integers: every dot product is exact, so duplicates tie bit for bit in any summation order
    keys = torch.randint(-3, 4, (2, 150, 20)).float()
    for duplicate in (70, 149):  # same key in another tile of 64 keys
        keys[:, duplicate] = keys[:, 5]
    keys[:, 9] = keys[:, 9] + 4 * torch.eye(20)[0]  # no ties for key 9
    queries = keys[:, [5, 70, 149, 9]] * 2
    idx, sim = dense_match(queries.to(DEVICE), keys.to(DEVICE), backend="triton")
    assert idx.cpu().tolist() == [[5, 5, 5, 9]] * 2
    torch.testing.assert_close(sim.cpu(), torch.ones(2, 4), rtol=0, atol=1e-6)


def test_dense_match_triton_overwrites_poisoned_outputs_and_has_no_gradient():
    q, k = _queries_with_clear_best_key(3, 70, 21, 12)
    q, k = q.to(DEVICE), k.to(DEVICE)
    idx = torch.full((3, 70), -7, dtype=torch.int64, device=DEVICE)
    sim = torch.full((3, 70), float("nan"), device=DEVICE)
    dm._dense_match_triton(q, k, out_idx=idx, out_sim=sim)
    expected_idx, expected_sim = _unique_argmax64(q.cpu(), k.cpu())
    assert torch.equal(idx.cpu(), expected_idx) and torch.isfinite(sim).all()
    _, sim_grad = dense_match(q.requires_grad_(), k, backend="triton")
    assert not sim_grad.requires_grad
    empty_idx, empty_sim = dense_match(q[:, :0], k, backend="triton")
    assert empty_idx.shape == empty_sim.shape == (3, 0)


def test_dense_match_validates_before_any_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(dm, "_dense_match_triton", no_launch)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    for bad_q, bad_k, message in [(q[0], k, "q must be a float tensor"), (q, k[:1], "k must have shape"),
                                  (q, k.long(), "k must be a float"), (q, k[:, :0], "at least one token"),
                                  (q, k.to("meta"), "same device")]:
        with pytest.raises(ValueError, match=message):
            dense_match(bad_q, bad_k, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        dense_match(q, k, backend="Triton")


@pytest.mark.skipif(CUDA, reason="simulates a CPU-only machine")
def test_triton_backend_without_cuda_or_interpreter_raises(monkeypatch):
    q, k = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    boxes, flips = torch.tensor([[[0.0, 0.0, 10.0, 10.0]] * 2]), torch.zeros(1, 2, dtype=torch.bool)
    y = torch.randn(1, 4, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="dense_match: backend='triton' needs CUDA tensors"):
        dense_match(q, k, backend="triton")
    with pytest.raises(RuntimeError, match="pixpro_loss: backend='triton' needs CUDA tensors"):
        pixpro_loss(y, y, boxes, flips, 2, image_size=(20, 20), backend="triton")
    monkeypatch.setattr(dm, "_TRITON_IMPORTABLE", False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        dense_match(q, k, backend="triton")
    # "auto" on CPU is the reference, interpreter or not
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dm, "_TRITON_IMPORTABLE", True)
    monkeypatch.setattr(dm, "_dense_match_triton", None)
    assert dense_match(q, k)[0].shape == (1, 3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda(monkeypatch):
    calls = []
    real = dm._dense_match_triton
    monkeypatch.setattr(dm, "_dense_match_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k = _queries_with_clear_best_key(2, 9, 7, 16)
    dense_match(q.cuda(), k.cuda())
    assert calls


# ---------------------------------------------------------------------------------------------
# pixpro_loss (geometry + fused masked cosine)
# ---------------------------------------------------------------------------------------------

def _random_views(batch):
    sizes = torch.randint(60, 300, (batch, 2)).double()
    frac = torch.rand(batch, 2, 4, dtype=torch.float64)
    h = sizes[:, None, 0] * (0.2 + 0.8 * frac[..., 2])
    w = sizes[:, None, 1] * (0.2 + 0.8 * frac[..., 3])
    boxes = torch.stack([(sizes[:, None, 0] - h) * frac[..., 0], (sizes[:, None, 1] - w) * frac[..., 1], h, w], -1)
    flips = torch.rand(batch, 2) < 0.5
    flips[:4] = torch.tensor([[False, False], [False, True], [True, False], [True, True]])[:batch]
    return boxes.float(), flips, sizes


def _views_with_special_cases(batch):
    """Random views, plus (when batch >= 3) identical views and a pair that does not overlap."""
    boxes, flips, sizes = _random_views(batch)
    if batch >= 3:
        boxes[1, 1] = boxes[1, 0]
        sizes[2] = torch.tensor([120.0, 150.0])
        boxes[2] = torch.tensor([[0.0, 0.0, 40.0, 40.0], [50.0, 60.0, 30.0, 30.0]])
    return boxes, flips, sizes


def _reference64(y, z, boxes, flips, grid, threshold, sizes):
    y64 = y.detach().cpu().double().requires_grad_()
    z64 = z.detach().cpu().double().requires_grad_()
    loss = pixpro_loss_reference(y64, z64, boxes, flips, grid, threshold, image_size=sizes)
    grad_y, grad_z = torch.autograd.grad(loss, (y64, z64))
    return loss.detach(), grad_y, grad_z


def _to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("grid,batch,channels,threshold", [
    (5, 4, 24, 0.7),    # one 32-token tile each way
    (7, 3, 37, 1.7),    # 64-token tiles, ragged, odd channels, more pairs
    (9, 2, 300, 0.7),   # 81 tokens: 2 x 2 tiles of 64; channels > 256 (looped forward)
    (4, 1, 16, 1.3),    # B = 1
])
def test_pixpro_loss_triton_fp32_forward_and_gradients(grid, batch, channels, threshold):
    boxes, flips, sizes = _views_with_special_cases(batch)
    tokens = grid * grid
    y = torch.randn(batch, tokens, channels, device=DEVICE, requires_grad=True)
    z = torch.randn(batch, tokens, channels, device=DEVICE, requires_grad=True)
    boxes_d, flips_d = _to_device(boxes, flips)
    loss = pixpro_loss(y, z, boxes_d, flips_d, grid, threshold, image_size=sizes.to(DEVICE), backend="triton")
    grad_y, grad_z = torch.autograd.grad(loss, (y, z))
    ref_loss, ref_y, ref_z = _reference64(y, z, boxes, flips, grid, threshold, sizes)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-6
    assert grad_y.dtype == torch.float32 and grad_y.shape == y.shape
    for got, want in ((grad_y, ref_y), (grad_z, ref_z)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_pixpro_mask_built_in_the_kernel_matches_the_reference_mask():
    grid, batch = 9, 6
    boxes, flips, sizes = _views_with_special_cases(batch)
    for threshold in (0.7, 1.3):
        geo = dm._pixpro_kernel_geometry(boxes, flips, grid, sizes)
        y, z = torch.randn(batch, grid * grid, 16), torch.randn(batch, grid * grid, 16)
        rowsum = torch.full((batch, grid * grid), float("nan"))
        rowcnt = torch.full((batch, grid * grid), float("nan"))
        (y, z, geo, rowsum, rowcnt) = _to_device(y, z, geo, rowsum, rowcnt)
        dm._pixpro_forward_rows(y, z, geo, grid, threshold ** 2, out_rowsum=rowsum, out_rowcnt=rowcnt)
        mask = pixpro_positive_mask(boxes, flips, grid, threshold, image_size=sizes)
        assert torch.equal(rowcnt.cpu(), mask.sum(2).float())  # also: every poisoned entry written
        expected = (_cosines64(y.cpu(), z.cpu()) * mask).sum(2)
        torch.testing.assert_close(rowsum.cpu().double(), expected, rtol=0, atol=1e-5)
    assert not mask[2].any() and mask[1].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pixpro_loss_triton_low_precision(dtype):
    grid, batch, channels, threshold = 7, 3, 40, 1.3
    boxes, flips, sizes = _views_with_special_cases(batch)
    y = torch.randn(batch, grid * grid, channels, device=DEVICE, dtype=dtype, requires_grad=True)
    z = torch.randn(batch, grid * grid, channels, device=DEVICE, dtype=dtype, requires_grad=True)
    boxes_d, flips_d = _to_device(boxes, flips)
    loss = pixpro_loss(y, z, boxes_d, flips_d, grid, threshold, image_size=sizes, backend="triton")
    grad_y, grad_z = torch.autograd.grad(loss, (y, z))
    assert grad_y.dtype == grad_z.dtype == dtype
    lowp = pixpro_loss(y, z, boxes_d, flips_d, grid, threshold, image_size=sizes, backend="reference")
    lowp_y, lowp_z = torch.autograd.grad(lowp, (y, z))
    ref_loss, ref_y, ref_z = _reference64(y, z, boxes, flips, grid, threshold, sizes)
    assert abs(float(loss.detach()) - float(ref_loss)) <= 2 * abs(float(lowp.detach()) - float(ref_loss)) + 1e-6
    for got, low, want in ((grad_y, lowp_y, ref_y), (grad_z, lowp_z, ref_z)):
        err = (got.cpu().double() - want).abs()
        low_err = (low.cpu().double() - want).abs()
        # atol: one 16-bit rounding step at the gradient's scale (both round an fp32 result)
        assert (err <= 2 * low_err + 2 ** -8 * float(want.abs().max())).all()


def test_pixpro_loss_triton_non_contiguous_detached_target_and_poisoned_gradient():
    grid, batch, channels = 6, 3, 20
    boxes, flips, sizes = _views_with_special_cases(batch)
    boxes_d, flips_d = _to_device(boxes, flips)
    base = torch.randn(batch, channels, grid * grid, device=DEVICE)
    y = base.transpose(1, 2).requires_grad_()                                # channel stride != 1
    z = torch.randn(batch, grid * grid, 2 * channels, device=DEVICE)[..., ::2]  # every other channel
    assert not y.is_contiguous() and not z.is_contiguous()
    loss = pixpro_loss(y, z, boxes_d, flips_d, grid, image_size=sizes, backend="triton")  # z detached
    (grad_y,) = torch.autograd.grad(loss, (y,))
    ref_loss, ref_y, _ = _reference64(y, z, boxes, flips, grid, 0.7, sizes)
    assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-6
    torch.testing.assert_close(grad_y.cpu().double(), ref_y, rtol=1e-4, atol=1e-5 * float(ref_y.abs().max()))
    # the backward kernel writes every element of its output
    geo = dm._pixpro_kernel_geometry(boxes_d, flips_d, grid, sizes)
    yc, zc = y.detach().contiguous(), z.contiguous()
    rowsum, _, inv_y, norm_y, inv_z = dm._pixpro_forward_rows(yc, zc, geo, grid, 0.49)
    poisoned = torch.full_like(yc, float("nan"))
    weight = torch.full((batch,), -0.5, device=DEVICE)
    dm._pixpro_backward_rows(yc, zc, inv_y, norm_y, inv_z, rowsum, weight, geo, grid, 0.49, out_grad=poisoned)
    assert torch.isfinite(poisoned).all()


def test_pixpro_loss_without_positive_pairs_is_zero():
    grid, channels = 4, 8
    boxes = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [50.0, 60.0, 30.0, 30.0]],
                          [[0.0, 0.0, 40.0, 40.0], [0.0, 70.0, 40.0, 30.0]]])
    flips = torch.tensor([[True, False], [False, True]])
    assert not pixpro_positive_mask(boxes, flips, grid, image_size=(100, 120)).any()
    y = torch.randn(2, grid * grid, channels, device=DEVICE, requires_grad=True)
    z = torch.randn(2, grid * grid, channels, device=DEVICE)
    boxes_d, flips_d = _to_device(boxes, flips)
    for backend in ("triton", "reference"):
        loss = pixpro_loss(y, z, boxes_d, flips_d, grid, image_size=(100, 120), backend=backend)
        (grad_y,) = torch.autograd.grad(loss, (y,))
        assert float(loss.detach()) == 0.0 and not grad_y.any()
    # an image without pairs still counts in the batch mean: halving when a paired image is added
    boxes2 = torch.cat([boxes[:1], boxes[:1].clone()])
    boxes2[1, 1] = boxes2[1, 0]
    y2, z2 = y[:1].detach().repeat(2, 1, 1), z[:1].repeat(2, 1, 1)
    both = pixpro_loss(y2, z2, boxes2.to(DEVICE), torch.zeros(2, 2, dtype=torch.bool, device=DEVICE), grid,
                       image_size=(100, 120), backend="triton")
    alone = pixpro_loss(y2[1:], z2[1:], boxes2[1:].to(DEVICE), torch.zeros(1, 2, dtype=torch.bool, device=DEVICE),
                        grid, image_size=(100, 120), backend="triton")
    assert abs(float(both.detach()) - float(alone.detach()) / 2) <= 1e-7


def test_pixpro_loss_symmetric_form_and_unit_inputs():
    """PixPro's L = f(y1, z2; A12) + f(y2, z1; A21), and with unit vectors -2 cos = |a - b|^2 - 2."""
    grid, batch, channels = 5, 4, 12
    boxes, flips, sizes = _random_views(batch)
    y1, y2, z1, z2 = (F.normalize(torch.randn(batch, grid * grid, channels, device=DEVICE), dim=-1)
                      for _ in range(4))
    boxes_d, flips_d, sizes_d = boxes.to(DEVICE), flips.to(DEVICE), sizes.to(DEVICE)
    total = (pixpro_loss(y1, z2, boxes_d, flips_d, grid, image_size=sizes_d, backend="triton")
             + pixpro_loss(y2, z1, boxes_d.flip(1), flips_d.flip(1), grid, image_size=sizes_d,
                           backend="triton"))
    mask12 = pixpro_positive_mask(boxes_d, flips_d, grid, image_size=sizes_d).double()
    expected = 0.0
    for y, z, mask in ((y1, z2, mask12), (y2, z1, mask12.transpose(1, 2))):
        sq = ((y.double()[:, :, None] - z.double()[:, None]) ** 2).sum(-1)  # |y_i - z_j|^2
        expected += ((mask * (sq - 2)).sum((1, 2)) / (mask.sum((1, 2)) + 1e-6)).mean()
    assert abs(float(total.detach()) - float(expected)) <= 1e-5


def test_pixpro_loss_validates_before_any_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(dm, "_pixpro_forward_rows", no_launch)
    monkeypatch.setattr(dm, "_pixpro_backward_rows", no_launch)
    grid = 3
    boxes, flips = torch.tensor([[[0.0, 0.0, 10.0, 10.0]] * 2] * 2), torch.zeros(2, 2, dtype=torch.bool)
    y = torch.randn(2, 9, 4)
    cases = [
        (dict(y=y[0]), "y must be a float tensor of shape"),
        (dict(y=y.long()), "y must be a float tensor"),
        (dict(y=y[:, :8]), "y must have shape \\(B, grid\\*grid, C\\) = \\(2, 9, C\\)"),
        (dict(z=y[:1]), "z must have shape"),
        (dict(z=y[..., :3]), "z must have shape"),
        (dict(z=y.to("meta")), "z must be on the same device as y"),
        (dict(boxes=boxes[:, 0]), "boxes must be a float tensor of shape \\(B, 2, 4\\)"),
        (dict(flips=flips[:1]), "flips must be a bool tensor"),
        (dict(grid=0), "grid must be a positive int"),
        (dict(threshold=-0.7), "threshold must be a positive number"),
        (dict(threshold=float("inf")), "threshold must be a positive number"),
        (dict(image_size=(1, 50)), "image_size"),
        (dict(boxes=boxes[:0], flips=flips[:0], y=y[:0], z=y[:0]), "at least one image"),
    ]
    for change, message in cases:
        args = dict(y=y, z=y, boxes=boxes, flips=flips, grid=grid, threshold=0.7, image_size=(50, 50))
        args.update(change)
        with pytest.raises(ValueError, match=message):
            pixpro_loss(args["y"], args["z"], args["boxes"], args["flips"], args["grid"], args["threshold"],
                        image_size=args["image_size"], backend="triton")
    with pytest.raises(ValueError, match="pixpro_loss: backend"):
        pixpro_loss(y, y, boxes, flips, grid, image_size=(50, 50), backend="cuda")


# ---------------------------------------------------------------------------------------------
# Issue 10: the registered ops' Triton implementation (use_triton=True): opcheck, torch.compile,
# no host sync, the launch-plan cache, edge inputs against float64 and against the reference path
# ---------------------------------------------------------------------------------------------

def test_opcheck_registered_ops_triton():
    """opcheck on the Triton implementation (in the interpreter on a CPU-only machine)."""
    q, k = _queries_with_clear_best_key(2, 19, 21, 6)
    q, k = q.to(DEVICE), k.to(DEVICE)
    torch.library.opcheck(torch.ops.densesim.dense_match.default, (q.clone().requires_grad_(), k, True))
    torch.library.opcheck(torch.ops.densesim.dense_match.default, (q.bfloat16(), k.bfloat16(), True))
    grid, batch = 3, 3
    boxes, flips, sizes = _views_with_special_cases(batch)
    boxes, flips, sizes = _to_device(boxes, flips, sizes)
    forward = torch.ops.densesim.pixpro_loss.default
    backward = torch.ops.densesim.pixpro_loss_backward.default
    y = torch.randn(batch, grid * grid, 5, device=DEVICE)
    z = torch.randn(batch, grid * grid, 5, device=DEVICE)
    torch.library.opcheck(forward, (y.clone().requires_grad_(), z.clone().requires_grad_(), boxes, flips,
                                    sizes, grid, 1.3, True))
    torch.library.opcheck(forward, (y.clone().requires_grad_(), z, boxes, flips, sizes, grid, 0.7, True))
    _, rowsum, count, inv_y, norm_y, inv_z, geometry = forward(y, z, boxes, flips, sizes, grid, 1.3, True)
    assert torch.equal(geometry, dm._pixpro_kernel_geometry(boxes, flips, grid, sizes))
    weight = torch.rand(batch, device=DEVICE)
    for need_y, need_z in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (y, z, geometry, rowsum, inv_y, norm_y, inv_z, weight, grid, 1.3,
                                         need_y, need_z, True))


def test_no_host_syncs_triton():
    """The interpreted Triton path, forward and backward, value checks on: no Python-level read of
    a tensor value (each would be a host sync on CUDA)."""
    grid = 4
    boxes, flips, sizes = _to_device(*_views_with_special_cases(3))
    q, k = _to_device(*_queries_with_clear_best_key(2, 9, 7, 6))
    y = torch.randn(3, grid * grid, 6, device=DEVICE, requires_grad=True)
    z = torch.randn(3, grid * grid, 6, device=DEVICE, requires_grad=True)
    with count_host_syncs() as syncs:
        dense_match(q, k, backend="triton")
        location, _ = geometric_correspondence(boxes, flips, grid)
        grid_sample_coordinates(location, grid)
        loss = pixpro_loss(y, z, boxes, flips, grid, image_size=sizes, backend="triton")
        loss = loss + pixpro_loss(z, y, boxes.flip(1), flips.flip(1), grid, image_size=(300, 320),
                                  backend="triton")
        loss.backward()
    assert not syncs, syncs.report()
    assert y.grad is not None and z.grad is not None


def test_ops_inside_torch_compile_triton():
    """The drop-in use with the Triton kernels: a user's fullgraph-compiled step, forward and
    backward, equals eager (the same opaque ops run: equal up to fp32 rounding)."""
    grid, batch, channels = 4, 3, 10
    boxes, flips, sizes = _to_device(*_views_with_special_cases(batch))
    q, k = _to_device(*_queries_with_clear_best_key(2, 13, 9, 8))
    y0 = torch.randn(batch, grid * grid, channels, device=DEVICE)
    z0 = torch.randn(batch, grid * grid, channels, device=DEVICE)

    def step(q, k, y, z, boxes, flips, sizes):
        idx, sim = dense_match(q, k, backend="triton")
        loss = pixpro_loss(y, z, boxes, flips, grid, 1.3, image_size=sizes, backend="triton")
        loss = loss + pixpro_loss(z, y, boxes.flip(1), flips.flip(1), grid, image_size=sizes, backend="triton")
        return loss * 2.0, idx, sim

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        y, z = y0.clone().requires_grad_(), z0.clone().requires_grad_()
        loss, idx, sim = fn(q, k, y, z, boxes, flips, sizes)
        loss.backward()
        results.append((loss.detach(), y.grad, z.grad, idx, sim))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_launch_plans_are_cached():
    q, k = _to_device(*_queries_with_clear_best_key(2, 23, 29, 12))
    dense_match(q, k, backend="triton")
    before = dm._dense_match_plan.cache_info().hits
    dense_match(q, k, backend="triton")
    assert dm._dense_match_plan.cache_info().hits == before + 1
    boxes, flips, sizes = _to_device(*_views_with_special_cases(2))
    y = torch.randn(2, 9, 5, device=DEVICE, requires_grad=True)
    pixpro_loss(y, y.detach(), boxes, flips, 3, image_size=sizes, backend="triton").backward()
    before = dm._pixpro_plan.cache_info().hits
    pixpro_loss(y, y.detach(), boxes, flips, 3, image_size=sizes, backend="triton").backward()
    assert dm._pixpro_plan.cache_info().hits == before + 2  # forward rows + backward rows


def _dyadic_rows(batch, rows, channels, nonzeros, gen, sign=None):
    """Rows with `nonzeros` entries of +-1: with nonzeros a power of 4 all cosines are exact in any
    summation order, so ties are exact and decided by the tie rule alone."""
    values = torch.zeros(batch, rows, channels)
    order = torch.rand(batch, rows, channels, generator=gen).argsort(dim=-1)[..., :nonzeros]
    signs = torch.randint(0, 2, (batch, rows, nonzeros), generator=gen).float() * 2 - 1
    return values.scatter(-1, order, signs if sign is None else torch.full_like(signs, sign))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_match_triton_ties_agree_with_the_reference(dtype):
    """Tie rule: the smallest index among exactly equal cosines, as torch.argmax and the reference.
    150 keys = 3 key tiles (fp32 tiles of 64; 16-bit 64) and 37 queries (a ragged query tile)."""
    gen = torch.Generator().manual_seed(97)
    q = _dyadic_rows(3, 37, 16, 4, gen)
    k = _dyadic_rows(3, 150, 16, 4, gen)
    idx, sim = dense_match(q.to(DEVICE, dtype), k.to(DEVICE, dtype), backend="triton")
    cosines = _cosines64(q, k)
    assert torch.equal(idx.cpu(), cosines.argmax(-1))
    assert torch.equal(idx.cpu(), dense_match(q, k, backend="auto")[0])  # the reference op path
    assert torch.equal(sim.cpu().double(), cosines.amax(-1))
    # all-equal keys: key 0 everywhere; all-zero queries: key 0, similarity 0
    idx, _ = dense_match(q.to(DEVICE, dtype), k[:, :1].expand(-1, 150, -1).to(DEVICE, dtype), backend="triton")
    assert not idx.any()
    idx, sim = dense_match(torch.zeros(2, 5, 16, device=DEVICE, dtype=dtype), k[:2].to(DEVICE, dtype),
                           backend="triton")
    assert not idx.any() and not sim.any()


@pytest.mark.parametrize("num_queries,num_keys", [(77, 33), (5, 65), (1, 1), (3, 1)])
def test_dense_match_triton_all_negative_similarities_never_pick_padding(num_queries, num_keys):
    """Every cosine < 0 while padded key slots (past M in the last tile) would score 0 if they were
    not masked to -inf: the index stays in range and is the float64 maximum."""
    gen = torch.Generator().manual_seed(num_queries * 1000 + num_keys)
    q = torch.rand(2, num_queries, 9, generator=gen) + 0.05
    k = -(torch.rand(2, num_keys, 9, generator=gen) + 0.05)
    idx, sim = dense_match(q.to(DEVICE), k.to(DEVICE), backend="triton")
    idx, sim = idx.cpu(), sim.cpu()
    cosines = _cosines64(q, k)
    assert (cosines < 0).all() and (sim < 0).all() and ((idx >= 0) & (idx < num_keys)).all()
    torch.testing.assert_close(sim.double(), cosines.amax(-1), rtol=0, atol=2e-6)
    assert (cosines.amax(-1) - cosines.gather(-1, idx[..., None])[..., 0] <= 2e-6).all()
    # exact negative cosines (-1/4, -1/2, -1) with ties
    q = torch.ones(2, num_queries, 16)
    k = _dyadic_rows(2, num_keys, 16, 4, gen, sign=-1.0)
    k[:, 1::3] = _dyadic_rows(2, len(range(1, num_keys, 3)), 16, 1, gen, sign=-1.0)
    idx, sim = dense_match(q.to(DEVICE), k.to(DEVICE), backend="triton")
    assert torch.equal(idx.cpu(), _cosines64(q, k).argmax(-1)) and (sim < 0).all()


@pytest.mark.parametrize("batch,num_queries,num_keys,channels", [
    (1, 1, 1, 1), (2, 1, 5, 3), (2, 6, 1, 4), (0, 5, 3, 4), (3, 0, 4, 2)])
def test_dense_match_triton_single_rows_and_empty_batches(batch, num_queries, num_keys, channels):
    q, k = torch.randn(batch, num_queries, channels), torch.randn(batch, num_keys, channels)
    idx, sim = dense_match(q.to(DEVICE), k.to(DEVICE), backend="triton")
    assert idx.shape == sim.shape == (batch, num_queries)
    assert idx.dtype == torch.int64 and sim.dtype == torch.float32
    cosines = _cosines64(q, k)
    idx, sim = idx.cpu(), sim.cpu()
    if channels == 1:  # cosines are exactly +-1: ties, the first maximal key wins
        assert torch.equal(idx, cosines.argmax(-1))
    else:
        assert (cosines.amax(-1) - cosines.gather(-1, idx[..., None])[..., 0] <= 2e-6).all()
    torch.testing.assert_close(sim.double(), cosines.amax(-1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("grid,batch", [(1, 3), (2, 1)])
def test_pixpro_loss_triton_single_token_grids(grid, batch):
    """A 1x1 grid (one token per view, one candidate pair per image) and B = 1 against float64."""
    boxes, flips, sizes = _views_with_special_cases(batch)
    y = torch.randn(batch, grid * grid, 7, device=DEVICE, requires_grad=True)
    z = torch.randn(batch, grid * grid, 7, device=DEVICE, requires_grad=True)
    boxes_d, flips_d = _to_device(boxes, flips)
    loss = pixpro_loss(y, z, boxes_d, flips_d, grid, 1.3, image_size=sizes, backend="triton")
    grad_y, grad_z = torch.autograd.grad(loss, (y, z))
    ref_loss, ref_y, ref_z = _reference64(y, z, boxes, flips, grid, 1.3, sizes)
    assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-6
    for got, want in ((grad_y, ref_y), (grad_z, ref_z)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4,
                                   atol=1e-5 * float(want.abs().max()) + 1e-12)
