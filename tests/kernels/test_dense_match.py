"""dense_match (DenseCL argmax) and the K3 geometric helpers against float64 brute force."""
import pytest
import torch
import torch.nn.functional as F

from kernels import (dense_match, dense_match_reference, geometric_correspondence,
                     grid_sample_coordinates, pixpro_normalised_boxes, pixpro_positive_mask,
                     relpos_coordinates)
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
