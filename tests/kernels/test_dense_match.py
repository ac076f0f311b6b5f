"""dense_match (DenseCL argmax) and the K3 geometric helpers against float64 brute force; the
registered ops' CPU implementation (opcheck, torch.compile, meta tensors, no host sync, device-side
value checks, edge inputs). The Triton implementation: test_dense_match_triton.py."""
import pytest
import torch
import torch.nn.functional as F
from host_sync import count_host_syncs

from kernels import (dense_match, dense_match_reference, geometric_correspondence,
                     grid_sample_coordinates, pixpro_loss, pixpro_loss_reference,
                     pixpro_normalised_boxes, pixpro_positive_mask, relpos_coordinates)
from pipelines.geometry import patch_centres_in_source, relative_geometry


# ---------------------------------------------------------------------------------------------
# feature matching
# ---------------------------------------------------------------------------------------------

def _queries_with_clear_best_key(batch, num_queries, num_keys, channels):
    """Keys are random; each query is a scaled, lightly perturbed copy of one random key, so its
    best match is unique by a wide margin (checked in float64 below)."""
    keys = torch.randn(batch, num_keys, channels)
    chosen = torch.randint(0, num_keys, (batch, num_queries))
    scale = torch.rand(batch, num_queries, 1) * 3 + 0.5
    queries = keys[torch.arange(batch)[:, None], chosen] * scale
    queries = queries + 0.05 * torch.randn_like(queries)
    return queries, keys


def _brute_force64(q, k):
    batch, num_queries, num_keys = q.shape[0], q.shape[1], k.shape[1]
    idx = torch.empty(batch, num_queries, dtype=torch.int64)
    sim = torch.empty(batch, num_queries, dtype=torch.float64)
    margin = float("inf")
    for b in range(batch):
        for n in range(num_queries):
            qv = q[b, n].double()
            cosines = torch.stack([qv @ k[b, m].double() / (qv.norm() * k[b, m].double().norm())
                                   for m in range(num_keys)])
            top2 = torch.topk(cosines, 2).values if num_keys > 1 else torch.stack([cosines[0], cosines[0] - 1])
            margin = min(margin, float(top2[0] - top2[1]))
            idx[b, n], sim[b, n] = int(cosines.argmax()), cosines.max()
    return idx, sim, margin


@pytest.mark.parametrize("batch,num_queries,num_keys,channels", [(3, 11, 17, 24), (1, 5, 5, 7), (2, 9, 1, 3)])
def test_argmax_matches_brute_force(batch, num_queries, num_keys, channels):
    q, k = _queries_with_clear_best_key(batch, num_queries, num_keys, channels)
    idx, sim = dense_match(q, k)
    expected_idx, expected_sim, margin = _brute_force64(q, k)
    assert margin > 1e-3, "test inputs must have a unique best key"
    assert idx.dtype == torch.int64 and sim.dtype == torch.float32
    assert idx.shape == sim.shape == (batch, num_queries)
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(sim.double(), expected_sim, rtol=0, atol=1e-5)


def test_chunked_non_contiguous_and_low_precision():
    q, k = _queries_with_clear_best_key(2, 40, 30, 16)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_strided = torch.cat([k, k], dim=2)[:, :, :16]
    assert not q_strided.is_contiguous() and not k_strided.is_contiguous()
    full_idx, full_sim = dense_match(q, k)
    chunk_idx, chunk_sim = dense_match_reference(q_strided, k_strided, chunk_entries=2 * 30 * 7)
    assert torch.equal(chunk_idx, full_idx)
    torch.testing.assert_close(chunk_sim, full_sim)
    idx_bf16, sim_bf16 = dense_match(q.bfloat16(), k.bfloat16())
    assert sim_bf16.dtype == torch.float32
    assert (idx_bf16 == full_idx).float().mean() > 0.95
    torch.testing.assert_close(sim_bf16, full_sim, rtol=0, atol=2e-2)
    # no gradient is produced even from inputs that require it
    _, sim_grad = dense_match(q.requires_grad_(), k)
    assert not sim_grad.requires_grad


def test_dense_match_rejects_bad_inputs():
    q, k = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="dense_match: q must be a float tensor of shape"):
        dense_match(q[0], k)
    with pytest.raises(ValueError, match="dense_match: k must have shape \\(B, M, C\\) with B=2"):
        dense_match(q, k[:1])
    with pytest.raises(ValueError, match="dense_match: k must have shape"):
        dense_match(q, k[..., :7])
    with pytest.raises(ValueError, match="dense_match: k must be a float"):
        dense_match(q, k.long())
    with pytest.raises(ValueError, match="dense_match: k must be on the same device"):
        dense_match(q, k.to("meta"))
    with pytest.raises(ValueError, match="at least one token"):
        dense_match(q, k[:, :0])
    with pytest.raises(ValueError, match="backend"):
        dense_match(q, k, backend="")


# ---------------------------------------------------------------------------------------------
# geometric correspondence
# ---------------------------------------------------------------------------------------------

def _random_views(batch):
    sizes = torch.randint(60, 300, (batch, 2)).double()
    frac = torch.rand(batch, 2, 4, dtype=torch.float64)
    h = sizes[:, None, 0] * (0.2 + 0.8 * frac[..., 2])
    w = sizes[:, None, 1] * (0.2 + 0.8 * frac[..., 3])
    boxes = torch.stack([(sizes[:, None, 0] - h) * frac[..., 0], (sizes[:, None, 1] - w) * frac[..., 1], h, w], -1)
    return boxes.float(), torch.rand(batch, 2) < 0.5, sizes


def _grid_cells(grid):
    cells = torch.arange(grid, dtype=torch.float64)
    return torch.stack([cells.repeat_interleave(grid), cells.repeat(grid)], dim=-1)  # (G*G, 2) (row, col)


@pytest.mark.parametrize("flip", [False, True])
def test_identical_views_are_the_identity(flip):
    grid, batch = 6, 3
    boxes, _, _ = _random_views(batch)
    boxes[:, 1] = boxes[:, 0]
    location, in_overlap = geometric_correspondence(boxes, torch.full((batch, 2), flip), grid)
    assert location.shape == (batch, grid * grid, 2) and location.dtype == torch.float32
    torch.testing.assert_close(location.double(), _grid_cells(grid).expand(batch, -1, -1), rtol=0, atol=1e-4)
    assert in_overlap.all()


def test_mirrored_view_flips_columns():
    grid = 5
    boxes = torch.tensor([[[10.0, 20.0, 50.0, 70.0]] * 2])
    location, in_overlap = geometric_correspondence(boxes, torch.tensor([[False, True]]), grid)
    cells = _grid_cells(grid)
    torch.testing.assert_close(location[0, :, 0].double(), cells[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(location[0, :, 1].double(), grid - 1 - cells[:, 1], rtol=0, atol=1e-5)
    assert in_overlap.all()


def test_disjoint_views_have_no_overlap():
    boxes = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [50.0, 60.0, 30.0, 30.0]],
                          [[0.0, 0.0, 40.0, 40.0], [0.0, 41.0, 40.0, 30.0]]])  # side by side
    for flips in (torch.zeros(2, 2, dtype=torch.bool), torch.tensor([[True, False], [False, True]])):
        _, in_overlap = geometric_correspondence(boxes, flips, 7)
        assert not in_overlap.any()
        assert not pixpro_positive_mask(boxes, flips, 7, image_size=(100, 120)).any()


def test_correspondence_matches_pixel_brute_force_and_relpos():
    grid, batch = 7, 16
    boxes, flips, sizes = _random_views(batch)
    flips[:4] = torch.tensor([[False, False], [False, True], [True, False], [True, True]])
    # guaranteed partial overlap: view 2 is view 1 moved by 30% of its size down and left
    boxes[4, 1] = boxes[4, 0] + 0.3 * boxes[4, 0, 2:].repeat(2) * torch.tensor([1.0, -1.0, 0.0, 0.0])
    location, in_overlap = geometric_correspondence(boxes, flips, grid)
    # brute force: view-1 patch centres in source pixels, then inverted through view 2's pixel map
    centres = patch_centres_in_source(boxes[:, 0].double(), flips[:, 0], grid)  # (B, G*G, 2)
    y2, x2, h2, w2 = (v[:, None] for v in boxes[:, 1].double().unbind(-1))
    row2 = (centres[..., 0] + 0.5 - y2) * grid / h2 - 0.5
    col2 = (centres[..., 1] + 0.5 - x2) * grid / w2 - 0.5
    col2 = torch.where(flips[:, 1:2], grid - 1 - col2, col2)
    torch.testing.assert_close(location[..., 0].double(), row2, rtol=0, atol=1e-4)
    torch.testing.assert_close(location[..., 1].double(), col2, rtol=0, atol=1e-4)
    inside = (row2 >= -0.5) & (row2 <= grid - 0.5) & (col2 >= -0.5) & (col2 <= grid - 0.5)
    assert torch.equal(in_overlap, inside)
    assert in_overlap[4].any() and not in_overlap[4].all()
    # the inverse direction is SIM's relative position: view-2 tokens in view-1 units
    inverse, _ = geometric_correspondence(boxes.flip(1), flips.flip(1), grid)
    sim_coords = relpos_coordinates(relative_geometry(boxes, flips, sizes), grid)
    torch.testing.assert_close(inverse, sim_coords[..., :2], rtol=0, atol=1e-4)


def test_grid_sample_coordinates_sample_the_right_place():
    grid, batch = 6, 8
    boxes, flips, _ = _random_views(batch)
    location, in_overlap = geometric_correspondence(boxes, flips, grid)
    # a view-2 "feature map" whose two channels are each token's own (row, col)
    position_map = _grid_cells(grid).t().reshape(1, 2, grid, grid).expand(batch, -1, -1, -1).float()
    coords = grid_sample_coordinates(location, grid).reshape(batch, grid * grid, 1, 2)
    sampled = F.grid_sample(position_map, coords, mode="bilinear", align_corners=False,
                            padding_mode="border")[..., 0].transpose(1, 2)
    # bilinear interpolation of a linear ramp is exact between the outermost token centres
    interior = ((location >= 0) & (location <= grid - 1)).all(-1)
    assert interior.any()
    torch.testing.assert_close(sampled[interior], location[interior], rtol=0, atol=1e-4)
    assert (coords.abs() <= 1 + 1e-6).all(-1).squeeze(-1)[in_overlap].all()


# ---------------------------------------------------------------------------------------------
# PixPro positive mask
# ---------------------------------------------------------------------------------------------

def _pixpro_brute_force(boxes, flips, sizes, grid, threshold):
    """PixPro's released formula, one pair at a time, from boxes in this repo's convention."""
    batch = boxes.shape[0]
    mask = torch.zeros(batch, grid * grid, grid * grid, dtype=torch.bool)
    for n in range(batch):
        height, width = sizes[n].tolist()
        views = []
        for v in range(2):
            y, x, h, w = boxes[n, v].double().tolist()
            x0, x1 = x / (width - 1), (x + w - 1) / (width - 1)
            if flips[n, v]:
                x0, x1 = x1, x0
            y0, y1 = y / (height - 1), (y + h - 1) / (height - 1)
            views.append((x0, y0, (x1 - x0) / grid, (y1 - y0) / grid))
        max_diag = max((bw ** 2 + bh ** 2) ** 0.5 for _, _, bw, bh in views)
        for i in range(grid * grid):
            for j in range(grid * grid):
                (ax, ay, abw, abh), (bx, by, bbw, bbh) = views
                cxa, cya = ax + (i % grid + 0.5) * abw, ay + (i // grid + 0.5) * abh
                cxb, cyb = bx + (j % grid + 0.5) * bbw, by + (j // grid + 0.5) * bbh
                mask[n, i, j] = ((cxa - cxb) ** 2 + (cya - cyb) ** 2) ** 0.5 / max_diag < threshold
    return mask


def test_pixpro_mask_matches_brute_force():
    grid, batch = 5, 10
    boxes, flips, sizes = _random_views(batch)
    flips[:4] = torch.tensor([[False, False], [False, True], [True, False], [True, True]])
    boxes[4, 1] = boxes[4, 0] * torch.tensor([1.0, 1.0, 0.8, 1.1]) + 2
    for threshold in (0.7, 1.3):
        mask = pixpro_positive_mask(boxes, flips, grid, threshold, image_size=sizes)
        assert mask.shape == (batch, grid * grid, grid * grid) and mask.dtype == torch.bool
        assert torch.equal(mask, _pixpro_brute_force(boxes, flips, sizes, grid, threshold))
    assert mask.any()
    # swapping the views transposes the mask (PixPro's A_21 = A_12^T)
    swapped = pixpro_positive_mask(boxes.flip(1), flips.flip(1), grid, 1.3, image_size=sizes)
    assert torch.equal(swapped, mask.transpose(1, 2))


def test_pixpro_identical_and_mirrored_square_bins():
    # square bins in normalised units: neighbours are 1/sqrt(2) = 0.707 diagonals apart > 0.7
    grid = 7
    boxes = torch.tensor([[[10.0, 30.0, 61.0, 121.0]] * 2])
    image_size = (101, 201)  # (h-1)/(H-1) == (w-1)/(W-1) == 0.6
    same = pixpro_positive_mask(boxes, torch.tensor([[False, False]]), grid, image_size=image_size)
    assert torch.equal(same[0], torch.eye(grid * grid, dtype=torch.bool))
    mirrored = pixpro_positive_mask(boxes, torch.tensor([[True, False]]), grid, image_size=image_size)
    cells = torch.arange(grid * grid)
    mirror_of = (cells // grid) * grid + (grid - 1 - cells % grid)
    assert torch.equal(mirrored[0], torch.eye(grid * grid, dtype=torch.bool)[mirror_of])
    normalised = pixpro_normalised_boxes(boxes, torch.tensor([[True, False]]), image_size)
    torch.testing.assert_close(normalised[0, 0], torch.tensor([150 / 200, 0.1, 0.15, 0.7], dtype=torch.float64))


def test_geometry_helpers_reject_bad_inputs():
    boxes, flips = torch.tensor([[[0.0, 0.0, 10.0, 10.0]] * 2]), torch.zeros(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="geometric_correspondence: boxes must be a float tensor of shape \\(B, 2, 4\\)"):
        geometric_correspondence(boxes[:, 0], flips, 4)
    with pytest.raises(ValueError, match="flips must be a bool tensor of shape \\(B, 2\\) with B=1"):
        geometric_correspondence(boxes, flips[:, :1], 4)
    with pytest.raises(ValueError, match="h and w"):
        geometric_correspondence(boxes * torch.tensor([1.0, 1.0, 1.0, -1.0]), flips, 4)
    with pytest.raises(ValueError, match="grid must be a positive int"):
        geometric_correspondence(boxes, flips, 0)
    with pytest.raises(ValueError, match="flips must be on the same device"):
        geometric_correspondence(boxes, flips.to("meta"), 4)
    with pytest.raises(ValueError, match="image_size"):
        pixpro_positive_mask(boxes, flips, 4, image_size=(1, 50))
    with pytest.raises(ValueError, match="image_size"):
        pixpro_positive_mask(boxes, flips, 4, image_size=torch.ones(3, 2) * 50)
    with pytest.raises(ValueError, match="threshold"):
        pixpro_positive_mask(boxes, flips, 4, -0.7, image_size=(50, 50))


def test_pixpro_loss_reference_matches_the_spec_formula():
    """DENSE.md §2: f = -2 mean_n [Σ_ij A(i,j) <ŷ_i, ẑ_j> / (Σ_ij A(i,j) + 1e-6)], empty images count."""
    from kernels.dense_match import pixpro_loss_reference

    grid, batch, channels = 4, 5, 6
    boxes, flips, sizes = _random_views(batch)
    boxes[1] = torch.tensor([[0.0, 0.0, 40.0, 40.0], [50.0, 60.0, 30.0, 30.0]])  # disjoint: no pair
    sizes[1] = torch.tensor([120.0, 150.0])
    y = torch.randn(batch, grid * grid, channels, dtype=torch.float64)
    z = torch.randn(batch, grid * grid, channels, dtype=torch.float64)
    mask = _pixpro_brute_force(boxes, flips, sizes, grid, 0.9)
    assert not mask[1].any() and mask.any()
    total = 0.0
    for n in range(batch):
        pair_sum, count = 0.0, 0
        for i in range(grid * grid):
            for j in range(grid * grid):
                if mask[n, i, j]:
                    pair_sum += float(y[n, i] @ z[n, j] / (y[n, i].norm() * z[n, j].norm()))
                    count += 1
        total += pair_sum / (count + 1e-6)
    expected = -2.0 * total / batch
    loss = pixpro_loss_reference(y, z, boxes, flips, grid, 0.9, image_size=sizes)
    assert loss.dtype == torch.float64
    assert abs(float(loss) - expected) < 1e-12


# ---------------------------------------------------------------------------------------------
# Issue 10: registered ops (CPU implementation = the reference maths), torch.compile, meta
# tensors, no host sync, value checks on the device, edge inputs. The Triton implementation of the
# same ops is exercised in test_dense_match_triton.py.
# ---------------------------------------------------------------------------------------------

def _views(batch, seed):
    """Random views (boxes, flips, (B, 2) float64 sizes); image 1 has identical views and image 2
    (when B >= 3) two views with no positive pair."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(60, 300, (batch, 2), generator=gen).double()
    frac = torch.rand(batch, 2, 4, generator=gen, dtype=torch.float64)
    h = sizes[:, None, 0] * (0.2 + 0.8 * frac[..., 2])
    w = sizes[:, None, 1] * (0.2 + 0.8 * frac[..., 3])
    boxes = torch.stack([(sizes[:, None, 0] - h) * frac[..., 0], (sizes[:, None, 1] - w) * frac[..., 1],
                         h, w], -1).float()
    flips = torch.rand(batch, 2, generator=gen) < 0.5
    if batch >= 2:
        boxes[1, 1] = boxes[1, 0]
    if batch >= 3:
        sizes[2] = torch.tensor([120.0, 150.0], dtype=torch.float64)
        boxes[2] = torch.tensor([[0.0, 0.0, 40.0, 40.0], [50.0, 60.0, 30.0, 30.0]])
    return boxes, flips, sizes


def _pixpro64(y, z, boxes, flips, grid, threshold, sizes):
    """(loss, dL/dy, dL/dz) in float64 from the plain-autograd reference."""
    y64 = y.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    loss = pixpro_loss_reference(y64, z64, boxes, flips, grid, threshold, image_size=sizes)
    grad_y, grad_z = torch.autograd.grad(loss, (y64, z64))
    return loss.detach(), grad_y, grad_z


def _assert_grad_close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12)


def test_opcheck_registered_ops():
    """opcheck (schema, fake impl, autograd registration, aot dispatch) on every op of the file,
    CPU implementation (use_triton=False)."""
    gen = torch.Generator().manual_seed(41)
    q, k = torch.randn(2, 7, 5, generator=gen), torch.randn(2, 11, 5, generator=gen)
    torch.library.opcheck(torch.ops.densesim.dense_match.default, (q.clone().requires_grad_(), k, False))
    boxes, flips, sizes = _views(3, seed=43)
    torch.library.opcheck(torch.ops.densesim.geometric_correspondence.default, (boxes, flips, 3))
    torch.library.opcheck(torch.ops.densesim.geometric_correspondence.default,
                          (boxes.requires_grad_(), flips.to(torch.uint8), 4))
    boxes = boxes.detach()
    forward = torch.ops.densesim.pixpro_loss.default
    backward = torch.ops.densesim.pixpro_loss_backward.default
    for dtype in (torch.float32, torch.float64):
        y = torch.randn(3, 9, 6, generator=gen, dtype=dtype)
        z = torch.randn(3, 9, 6, generator=gen, dtype=dtype)
        torch.library.opcheck(forward, (y.clone().requires_grad_(), z.clone().requires_grad_(), boxes, flips,
                                        sizes, 3, 1.3, False))
        torch.library.opcheck(forward, (y.clone().requires_grad_(), z, boxes, flips, sizes, 3, 0.7, False))
        _, rowsum, count, inv_y, norm_y, inv_z, geometry = forward(y, z, boxes, flips, sizes, 3, 1.3, False)
        weight = torch.rand(3, generator=gen, dtype=count.dtype)
        for need_y, need_z in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(backward, (y, z, geometry, rowsum, inv_y, norm_y, inv_z, weight, 3, 1.3,
                                             need_y, need_z, False))


def test_registered_ops_outputs():
    boxes, flips, sizes = _views(4, seed=47)
    y, z = torch.randn(4, 16, 5), torch.randn(4, 16, 5)
    loss, rowsum, count, inv_y, norm_y, inv_z, geometry = torch.ops.densesim.pixpro_loss(
        y, z, boxes, flips, sizes, 4, 1.3, False)
    mask = pixpro_positive_mask(boxes, flips, 4, 1.3, image_size=sizes)
    cosines = F.normalize(y.double(), dim=-1) @ F.normalize(z.double(), dim=-1).transpose(1, 2)
    torch.testing.assert_close(rowsum.double(), (cosines * mask).sum(2), rtol=0, atol=1e-5)
    assert torch.equal(count, mask.sum((1, 2)).float())
    torch.testing.assert_close(norm_y, y.norm(dim=-1))
    torch.testing.assert_close(inv_y, 1 / y.norm(dim=-1))
    torch.testing.assert_close(inv_z, 1 / z.norm(dim=-1))
    assert torch.equal(geometry, pixpro_normalised_boxes(boxes, flips, sizes))  # the reference's A
    assert loss.dtype == torch.float32 and loss.shape == ()
    # non-differentiable ops: nothing requires grad even from inputs that do
    idx, sim = torch.ops.densesim.dense_match(y.requires_grad_(), z, False)
    assert not idx.requires_grad and not sim.requires_grad
    location, inside = torch.ops.densesim.geometric_correspondence(boxes.requires_grad_(), flips, 4)
    assert not location.requires_grad and not inside.requires_grad


@pytest.mark.parametrize("grid,batch,channels,threshold,dtype", [
    (5, 4, 24, 0.7, torch.float32),
    (3, 3, 7, 1.7, torch.float32),
    (4, 3, 16, 1.3, torch.float64),   # the reference maths keep float64 (loss and gradients)
    (1, 2, 5, 0.7, torch.float32),    # a 1x1 grid: one token per view
])
def test_pixpro_loss_op_cpu_matches_float64(grid, batch, channels, threshold, dtype):
    """backend="auto" on CPU: the registered op with the reference maths (forward and backward op)."""
    boxes, flips, sizes = _views(batch, seed=grid * 100 + batch)
    y = torch.randn(batch, grid * grid, channels, dtype=dtype, requires_grad=True)
    z = torch.randn(batch, grid * grid, channels, dtype=dtype, requires_grad=True)
    loss = pixpro_loss(y, z, boxes, flips, grid, threshold, image_size=sizes)
    grad_y, grad_z = torch.autograd.grad(loss * 3.0, (y, z))
    ref_loss, ref_y, ref_z = _pixpro64(y, z, boxes, flips, grid, threshold, sizes)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad_y.dtype == grad_z.dtype == dtype
    assert abs(float(loss.detach()) - float(ref_loss)) <= (1e-12 if dtype == torch.float64 else 1e-6)
    _assert_grad_close(grad_y, 3 * ref_y)
    _assert_grad_close(grad_z, 3 * ref_z)


def test_pixpro_loss_op_cpu_low_precision_zero_rows_and_detached_target():
    grid, batch, channels = 4, 3, 12
    boxes, flips, sizes = _views(batch, seed=53)
    base = torch.randn(batch, channels, grid * grid)
    base[0, :, 5] = 0  # an all-zero y row: F.normalize's clamp, no projection term
    y = base.transpose(1, 2).requires_grad_()                        # non-contiguous
    z = torch.randn(batch, grid * grid, 2 * channels)[..., ::2]      # non-contiguous, detached
    loss = pixpro_loss(y, z, boxes, flips, grid, 1.3, image_size=sizes)
    (grad_y,) = torch.autograd.grad(loss, (y,))
    ref_loss, ref_y, _ = _pixpro64(y, z, boxes, flips, grid, 1.3, sizes)
    assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-6
    others = torch.ones(batch, grid * grid, dtype=torch.bool)
    others[0, 5] = False
    _assert_grad_close(grad_y[others], ref_y[others])
    _assert_grad_close(grad_y[0, 5], ref_y[0, 5])  # ~1e12: the clamped norm's 1/eps
    # bf16 inputs: fp32 maths, bf16 gradients (the low-precision rule against the plain reference)
    y16 = torch.randn(batch, grid * grid, channels).bfloat16().requires_grad_()
    z16 = z.bfloat16()
    loss16 = pixpro_loss(y16, z16, boxes, flips, grid, 1.3, image_size=sizes)
    (grad16,) = torch.autograd.grad(loss16, (y16,))
    low = pixpro_loss(y16, z16, boxes, flips, grid, 1.3, image_size=sizes, backend="reference")
    (low_grad,) = torch.autograd.grad(low, (y16,))
    ref_loss, ref_y, _ = _pixpro64(y16, z16, boxes, flips, grid, 1.3, sizes)
    assert grad16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert abs(float(loss16.detach()) - float(ref_loss)) <= 2 * abs(float(low.detach()) - float(ref_loss)) + 1e-6
    err, low_err = (grad16.double() - ref_y).abs(), (low_grad.double() - ref_y).abs()
    assert (err <= 2 * low_err + 2 ** -8 * float(ref_y.abs().max())).all()


def test_dense_match_inside_torch_compile():
    q, k = _queries_with_clear_best_key(3, 13, 9, 10)

    def step(q, k):
        idx, sim = dense_match(q, k)
        return idx * 2, sim * 2.0

    idx, sim = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k)
    eager_idx, eager_sim = dense_match(q, k)
    assert torch.equal(idx, 2 * eager_idx)
    torch.testing.assert_close(sim, 2 * eager_sim, rtol=0, atol=0)


def test_geometry_inside_torch_compile():
    grid = 5
    boxes, flips, sizes = _views(4, seed=59)

    def step(boxes, flips, sizes):
        location, inside = geometric_correspondence(boxes, flips, grid)
        coords = grid_sample_coordinates(location, grid)
        mask = pixpro_positive_mask(boxes, flips, grid, 1.3, image_size=sizes)
        normalised = pixpro_normalised_boxes(boxes, flips, sizes)
        return coords * 2.0, inside, mask.sum(2), normalised + 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(boxes, flips, sizes), step(boxes, flips, sizes)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pixpro_loss_inside_torch_compile():
    grid, batch, channels = 4, 3, 10
    boxes, flips, sizes = _views(batch, seed=61)
    y0, z0 = torch.randn(batch, grid * grid, channels), torch.randn(batch, grid * grid, channels)

    def step(y, z, boxes, flips, sizes):
        forward = pixpro_loss(y, z, boxes, flips, grid, 1.3, image_size=sizes)
        return forward + 0.5 * pixpro_loss(z, y, boxes.flip(1), flips.flip(1), grid, 1.3, image_size=sizes)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        y, z = y0.clone().requires_grad_(), z0.clone().requires_grad_()
        loss = fn(y, z, boxes, flips, sizes)
        loss.backward()
        results.append((loss.detach(), y.grad, z.grad))
    for got, want in zip(*results):  # the same ops run: equal up to fp32 rounding
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _bad_value_cases():
    boxes, flips, sizes = _views(2, seed=67)
    negative = boxes.clone()
    negative[1, 0, 3] = -2.0
    infinite = boxes.clone()
    infinite[0, 1, 0] = float("inf")
    two = flips.to(torch.int64)
    two[1, 1] = 2
    return [
        (negative, flips, sizes, "boxes h and w \\(boxes\\[..., 2:\\]\\) must be > 0"),
        (infinite, flips, sizes, "boxes must be finite"),
        (boxes, two, sizes, "flips must be bool \\(or 0/1\\)"),
        (boxes, flips, torch.tensor([[100.0, 1.0], [50.0, 60.0]]), "image_size H and W must be > 1"),
    ]


@pytest.mark.parametrize("case", range(4))
def test_value_checks_raise_on_cpu_in_eager_and_compiled(case):
    """The device-side value checks: on CPU the same ValueError at once, also when the op runs inside
    a compiled graph (the registered ops check when they run). The plain helpers inside a compiled
    graph check with torch._assert_async (what CUDA does): a RuntimeError with the same message."""
    boxes, flips, sizes, message = _bad_value_cases()[case]
    y = torch.randn(2, 9, 4, requires_grad=True)
    calls = [  # (name, user function, what its compiled form raises)
        ("pixpro_loss", lambda b, f, s: pixpro_loss(y, y.detach(), b, f, 3, image_size=s) * 2.0, ValueError),
        ("pixpro_positive_mask", lambda b, f, s: pixpro_positive_mask(b, f, 3, image_size=s).sum() * 2,
         RuntimeError),
        ("pixpro_normalised_boxes", lambda b, f, s: pixpro_normalised_boxes(b, f, s) * 2.0, RuntimeError),
    ]
    if "image_size" not in message:
        calls.append(("geometric_correspondence",
                      lambda b, f, s: geometric_correspondence(b, f, 3)[0] * 2.0, ValueError))
    for name, call, compiled_error in calls:
        with pytest.raises(ValueError, match=f"^{name}: {message}"):
            call(boxes, flips, sizes)
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        with pytest.raises(compiled_error, match=f"{name}: {message}"):
            compiled(boxes, flips, sizes)
    # the same inputs made valid pass (0/1 integer flips are allowed)
    pixpro_loss(y, y.detach(), boxes.clamp(-1e4, 1e4).abs() + 1, flips.clamp(0, 1), 3, image_size=(100, 100))


def test_bad_shapes_under_compile_raise_the_same_message():
    q, k = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    boxes, flips, _ = _views(2, seed=71)

    def bad_match(q, k):
        return dense_match(q[0], k)[1] * 2.0

    def bad_loss(y, boxes, flips):
        return pixpro_loss(y, y, boxes, flips, 3, image_size=(50, 50)) * 2.0

    y = torch.randn(2, 8, 4)
    for fn, args, message in ((bad_match, (q, k), "dense_match: q must be a float tensor of shape"),
                              (bad_loss, (y, boxes, flips), "pixpro_loss: y must have shape")):
        with pytest.raises(ValueError, match=message):  # graph break: eager raises the ValueError
            torch.compile(fn, backend="aot_eager")(*args)
        with pytest.raises(Exception) as info:  # fullgraph: dynamo wraps it, the message is kept
            torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        assert message in str(info.value)


def test_meta_tensors_need_no_values():
    """Validation and the fake implementations never read a value (no host sync)."""
    q = torch.empty(4, 3136, 256, device="meta", dtype=torch.bfloat16)
    idx, sim = dense_match(q, torch.empty(4, 3136, 256, device="meta"))
    assert idx.device.type == "meta" and idx.shape == sim.shape == (4, 3136)
    assert idx.dtype == torch.int64 and sim.dtype == torch.float32
    boxes = torch.empty(128, 2, 4, device="meta")
    flips = torch.empty(128, 2, device="meta", dtype=torch.bool)
    location, inside = geometric_correspondence(boxes, flips, 7)
    assert location.shape == (128, 49, 2) and location.dtype == torch.float32 and inside.dtype == torch.bool
    sizes = torch.empty(128, 2, device="meta", dtype=torch.int64)
    assert pixpro_positive_mask(boxes, flips, 7, image_size=sizes).shape == (128, 49, 49)
    assert pixpro_normalised_boxes(boxes, flips, (224, 224)).shape == (128, 2, 4)
    y = torch.empty(128, 49, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)
    z = torch.empty(128, 49, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)
    loss = pixpro_loss(y, z, boxes, flips, 7, image_size=sizes)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    grad_y, grad_z = torch.autograd.grad(loss, (y, z))
    assert grad_y.shape == y.shape and grad_y.dtype == torch.bfloat16 and grad_z.shape == z.shape


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_no_host_syncs(backend):
    """Every public op, forward and backward, value checks on: no Python-level read of a tensor
    value (on CUDA each would be a host sync). backend="auto" on CPU is the registered ops'
    reference maths; the interpreted Triton path is counted in test_dense_match_triton.py."""
    grid = 4
    boxes, flips, sizes = _views(3, seed=73)
    q, k = _queries_with_clear_best_key(2, 9, 7, 6)
    y = torch.randn(3, grid * grid, 6, requires_grad=True)
    z = torch.randn(3, grid * grid, 6, requires_grad=True)
    with count_host_syncs() as syncs:
        dense_match(q, k, backend=backend)
        location, _ = geometric_correspondence(boxes, flips.to(torch.uint8), grid)
        grid_sample_coordinates(location, grid)
        pixpro_normalised_boxes(boxes, flips, sizes)
        pixpro_positive_mask(boxes, flips, grid, image_size=(300, 320))
        loss = pixpro_loss(y, z, boxes, flips, grid, image_size=sizes, backend=backend)
        loss = loss + pixpro_loss(z, y, boxes.flip(1), flips.flip(1), grid, image_size=(300, 320),
                                  backend=backend)
        loss.backward()
    assert not syncs, syncs.report()
    assert y.grad is not None and z.grad is not None


# --- edge inputs (the reference-maths op path; backend="auto" on CPU) -------------------------

def _cosines64(q, k):
    return F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).transpose(1, 2)


def _dyadic_rows(batch, rows, channels, nonzeros, gen, sign=None):
    """Rows with `nonzeros` entries of +-1 (the rest 0): with nonzeros a power of 4 the norm is a
    power of two, so normalised rows, their dot products and so all cosines are exact in fp32 and
    float64 whatever the summation order -- exact ties, decided by the tie rule alone."""
    values = torch.zeros(batch, rows, channels)
    order = torch.rand(batch, rows, channels, generator=gen).argsort(dim=-1)[..., :nonzeros]
    signs = torch.randint(0, 2, (batch, rows, nonzeros), generator=gen).float() * 2 - 1
    return values.scatter(-1, order, signs if sign is None else torch.full_like(signs, sign))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_dense_match_ties_pick_the_smallest_index_like_argmax(backend):
    gen = torch.Generator().manual_seed(79)
    q = _dyadic_rows(3, 37, 16, 4, gen)
    k = _dyadic_rows(3, 150, 16, 4, gen)       # cosines in {-1, -3/4, ..., 1}: many exact ties
    idx, sim = dense_match(q, k, backend=backend)
    cosines = _cosines64(q, k)
    assert torch.equal(idx, cosines.argmax(-1))  # torch.argmax: the first maximal index
    assert torch.equal(sim.double(), cosines.amax(-1))
    # all-equal keys: every cosine of a query ties, key 0 wins; an all-zero query matches key 0
    same = k[:, :1].expand(-1, 150, -1)
    idx, sim = dense_match(q, same, backend=backend)
    assert not idx.any()
    idx, sim = dense_match(torch.zeros(2, 5, 16), k[:2], backend=backend)
    assert not idx.any() and not sim.any()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_dense_match_all_similarities_negative(backend):
    gen = torch.Generator().manual_seed(83)
    q = torch.rand(2, 77, 9, generator=gen) + 0.05
    k = -(torch.rand(2, 33, 9, generator=gen) + 0.05)
    idx, sim = dense_match(q, k, backend=backend)
    cosines = _cosines64(q, k)
    assert (cosines < 0).all() and (sim < 0).all() and ((idx >= 0) & (idx < 33)).all()
    torch.testing.assert_close(sim.double(), cosines.amax(-1), rtol=0, atol=1e-6)
    # the chosen key is a maximum up to fp32 rounding (random cosines can be within 1e-7)
    assert (cosines.amax(-1) - cosines.gather(-1, idx[..., None])[..., 0] <= 1e-6).all()
    # exact negative cosines with ties (-1/4, -1/2, -1), and a single negative key
    q = torch.ones(2, 21, 16)
    k = _dyadic_rows(2, 45, 16, 4, gen, sign=-1.0)
    k[:, 7::3] = _dyadic_rows(2, 13, 16, 1, gen, sign=-1.0)
    idx, sim = dense_match(q, k, backend=backend)
    assert torch.equal(idx, _cosines64(q, k).argmax(-1)) and (sim < 0).all()
    idx, sim = dense_match(q, k[:, :1], backend=backend)
    assert not idx.any() and torch.equal(sim, torch.full((2, 21), -0.5))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("batch,num_queries,num_keys,channels", [
    (1, 1, 1, 1), (2, 1, 5, 3), (2, 6, 1, 4), (0, 5, 3, 4), (3, 0, 4, 2)])
def test_dense_match_single_rows_and_empty_batches(backend, batch, num_queries, num_keys, channels):
    q, k = torch.randn(batch, num_queries, channels), torch.randn(batch, num_keys, channels)
    idx, sim = dense_match(q, k, backend=backend)
    assert idx.shape == sim.shape == (batch, num_queries)
    assert idx.dtype == torch.int64 and sim.dtype == torch.float32
    cosines = _cosines64(q, k)
    if channels == 1:  # the cosines are exactly +-1: ties, the first maximal key wins
        assert torch.equal(idx, cosines.argmax(-1))
    else:  # random cosines: the chosen key is a maximum up to fp32 rounding
        assert (cosines.amax(-1) - cosines.gather(-1, idx[..., None])[..., 0] <= 1e-6).all()
    torch.testing.assert_close(sim.double(), cosines.amax(-1), rtol=0, atol=1e-6)


def test_geometry_single_token_and_empty_batch():
    boxes, flips, sizes = _views(3, seed=89)
    location, inside = geometric_correspondence(boxes, flips, 1)
    assert location.shape == (3, 1, 2) and inside.shape == (3, 1)
    # one token: its centre is the crop's centre, mapped into view 2's single-token units
    centre = boxes[:, 0, :2].double() + boxes[:, 0, 2:].double() / 2
    expected = (centre - boxes[:, 1, :2].double()) / boxes[:, 1, 2:].double() - 0.5
    expected[:, 1] = torch.where(flips[:, 1], -expected[:, 1], expected[:, 1])
    torch.testing.assert_close(location[:, 0].double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(location[1], torch.zeros(1, 2)) and inside[1].all()
    mask = pixpro_positive_mask(boxes, flips, 1, 0.7, image_size=sizes)
    assert mask.shape == (3, 1, 1) and mask[1].all() and not mask[2].any()
    empty_boxes, empty_flips = boxes[:0], flips[:0]
    location, inside = geometric_correspondence(empty_boxes, empty_flips, 4)
    assert location.shape == (0, 16, 2) and inside.shape == (0, 16)
    assert pixpro_positive_mask(empty_boxes, empty_flips, 4, image_size=(50, 50)).shape == (0, 16, 16)
    assert pixpro_normalised_boxes(empty_boxes, empty_flips, (50, 50)).shape == (0, 2, 4)
    with pytest.raises(ValueError, match="pixpro_loss: boxes must hold at least one image"):
        pixpro_loss(torch.randn(0, 16, 3), torch.randn(0, 16, 3), empty_boxes, empty_flips, 4,
                    image_size=(50, 50))
