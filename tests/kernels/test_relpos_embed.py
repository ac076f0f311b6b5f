"""relpos_embed / absolute_sincos_table: SIM spec section 4 identities and a pixel-level brute force."""
import math

import pytest
import torch

from kernels import absolute_sincos_table, relpos_coordinates, relpos_embed
from pipelines.geometry import relative_geometry


def _frequencies64(dim):
    quarter = dim // 4
    return torch.tensor([10000.0 ** (-k / quarter) for k in range(quarter)], dtype=torch.float64)


def _encode64(values, dim):
    """[sin(v w), cos(v w)] blocks for (..., ) float64 values."""
    angles = values[..., None] * _frequencies64(dim)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _random_views(batch, generator=None):
    """Random boxes (B, 2, 4) in original unflipped pixels, flips (B, 2), per-image sizes (B, 2)."""
    sizes = torch.randint(40, 400, (batch, 2), generator=generator).double()
    frac = torch.rand(batch, 2, 4, generator=generator, dtype=torch.float64)
    h = sizes[:, None, 0] * (0.1 + 0.9 * frac[..., 2])
    w = sizes[:, None, 1] * (0.1 + 0.9 * frac[..., 3])
    y = (sizes[:, None, 0] - h) * frac[..., 0]
    x = (sizes[:, None, 1] - w) * frac[..., 1]
    boxes = torch.stack([y, x, h, w], dim=-1)
    flips = torch.rand(batch, 2, generator=generator) < 0.5
    return boxes, flips, sizes


def _brute_force_view2_in_view1(boxes, flips, grid, patch):
    """(B, G*G, 2) float64: every view-2 patch centre in view-1 patch units, straight from the
    pixel convention (no use of the relative-geometry algebra)."""
    view_size = grid * patch
    batch = boxes.shape[0]
    out = torch.empty(batch, grid * grid, 2, dtype=torch.float64)
    for n in range(batch):
        y1, x1, h1, w1 = boxes[n, 0].tolist()
        y2, x2, h2, w2 = boxes[n, 1].tolist()
        for a in range(grid):
            for b in range(grid):
                # centre of view-2 patch (a, b) in view-2 output pixel coordinates
                r = patch * a + (patch - 1) / 2
                c = patch * b + (patch - 1) / 2
                c_src = view_size - 1 - c if flips[n, 1] else c
                source_row = y2 + (r + 0.5) * h2 / view_size - 0.5
                source_col = x2 + (c_src + 0.5) * w2 / view_size - 0.5
                # the same original pixel in view-1 output pixel coordinates
                r1 = (source_row + 0.5 - y1) * view_size / h1 - 0.5
                c1_src = (source_col + 0.5 - x1) * view_size / w1 - 0.5
                c1 = view_size - 1 - c1_src if flips[n, 0] else c1_src
                # view-1 patch (a', b') has its centre at pixel patch*a' + (patch-1)/2
                out[n, a * grid + b, 0] = (r1 - (patch - 1) / 2) / patch
                out[n, a * grid + b, 1] = (c1 - (patch - 1) / 2) / patch
    return out


def test_absolute_table_matches_formula():
    grid, dim = 5, 16
    table = absolute_sincos_table(grid, dim)
    assert table.shape == (25, 16) and table.dtype == torch.float32
    for a in range(grid):
        for b in range(grid):
            expected = torch.cat([_encode64(torch.tensor(float(a), dtype=torch.float64), dim),
                                  _encode64(torch.tensor(float(b), dtype=torch.float64), dim)])
            torch.testing.assert_close(table[a * grid + b].double(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("flip_both", [False, True])
def test_identical_boxes_reproduce_absolute_table(flip_both):
    grid, dim, batch = 14, 64, 3
    boxes, _, sizes = _random_views(batch)
    boxes[:, 1] = boxes[:, 0]
    flips = torch.full((batch, 2), flip_both)
    embedding = relpos_embed(relative_geometry(boxes, flips, sizes), grid, dim)
    assert embedding.shape == (batch, grid * grid, 2 * dim) and embedding.dtype == torch.float32
    table = absolute_sincos_table(grid, dim)
    torch.testing.assert_close(embedding[:, :, :dim], table.expand(batch, -1, -1), rtol=0, atol=1e-6)
    quarter = dim // 4
    scale_block = embedding[:, :, dim:]
    expected_scale = torch.cat([torch.zeros(quarter), torch.ones(quarter)] * 2)
    torch.testing.assert_close(scale_block, expected_scale.expand_as(scale_block), rtol=0, atol=1e-6)


def test_both_flipped_equals_neither_flipped():
    # SIM's identity is stated for the same boxes in SIM's frame, where a flipped view's box is
    # measured in the mirrored image. In this repo's convention (unflipped pixels) those boxes are
    # the mirrored ones, x -> W - x - w: mirroring the whole scene changes nothing relative.
    grid, dim, batch = 7, 32, 6
    boxes, _, sizes = _random_views(batch)
    mirrored = boxes.clone()
    mirrored[..., 1] = sizes[:, None, 1] - boxes[..., 1] - boxes[..., 3]
    neither = relpos_embed(relative_geometry(boxes, torch.zeros(batch, 2, dtype=torch.bool), sizes), grid, dim)
    both = relpos_embed(relative_geometry(mirrored, torch.ones(batch, 2, dtype=torch.bool), sizes), grid, dim)
    torch.testing.assert_close(both, neither, rtol=0, atol=2e-5)
    # ... whereas flipping both views of the SAME unflipped windows mirrors every column offset
    # about each view's own centre, which is a different relative geometry in general.
    same_windows = relpos_coordinates(relative_geometry(boxes, torch.ones(batch, 2, dtype=torch.bool), sizes), grid)
    expected_cols = _brute_force_view2_in_view1(boxes, torch.ones(batch, 2, dtype=torch.bool), grid, 2)[..., 1]
    torch.testing.assert_close(same_windows[..., 1].double(), expected_cols, rtol=0, atol=1e-4)


@pytest.mark.parametrize("flipped_view", [0, 1])
def test_mirrored_view_maps_column_b_to_last_minus_b(flipped_view):
    # View 2 is view 1's crop mirrored: the same window of the original image, exactly one view
    # flipped. In SIM's flipped frame the flipped view's box starts at x2 = W - x1 - w1.
    grid, dim, batch = 14, 48, 4
    boxes, _, sizes = _random_views(batch)
    boxes[:, 1] = boxes[:, 0]
    flips = torch.zeros(batch, 2, dtype=torch.bool)
    flips[:, flipped_view] = True
    rel = relative_geometry(boxes, flips, sizes)
    assert torch.all(rel[:, 4] == 1)
    coords = relpos_coordinates(rel, grid).double()
    cells = torch.arange(grid, dtype=torch.float64)
    expected_rows = cells.repeat_interleave(grid).expand(batch, -1)
    expected_cols = (grid - 1 - cells).repeat(grid).expand(batch, -1)
    torch.testing.assert_close(coords[..., 0], expected_rows, rtol=0, atol=1e-4)
    torch.testing.assert_close(coords[..., 1], expected_cols, rtol=0, atol=1e-4)
    # and the embedding's x block is the absolute table's column block read right to left
    embedding = relpos_embed(rel, grid, dim)
    table = absolute_sincos_table(grid, dim).reshape(grid, grid, dim)
    mirrored = table.flip(1).reshape(grid * grid, dim)
    torch.testing.assert_close(embedding[:, :, dim // 2:dim], mirrored[:, dim // 2:].expand(batch, -1, -1),
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("grid,patch", [(14, 16), (5, 3)])
def test_brute_force_pixel_geometry(grid, patch):
    batch, dim = 24, 32
    boxes, flips, sizes = _random_views(batch)
    flips[:4] = torch.tensor([[False, False], [False, True], [True, False], [True, True]])  # all cases
    rel = relative_geometry(boxes, flips, sizes)
    expected_yx = _brute_force_view2_in_view1(boxes, flips, grid, patch)
    coords = relpos_coordinates(rel, grid).double()
    torch.testing.assert_close(coords[..., :2], expected_yx, rtol=0, atol=1e-4)
    expected_sh = 10 * torch.log(boxes[:, 1, 2] / boxes[:, 0, 2])
    expected_sw = 10 * torch.log(boxes[:, 1, 3] / boxes[:, 0, 3])
    torch.testing.assert_close(coords[..., 2], expected_sh[:, None].expand(batch, grid * grid), rtol=0, atol=1e-4)
    torch.testing.assert_close(coords[..., 3], expected_sw[:, None].expand(batch, grid * grid), rtol=0, atol=1e-4)

    embedding = relpos_embed(rel, grid, dim)
    expected_embedding = torch.cat([
        _encode64(expected_yx[..., 0], dim), _encode64(expected_yx[..., 1], dim),
        _encode64(expected_sh[:, None].expand(batch, grid * grid), dim),
        _encode64(expected_sw[:, None].expand(batch, grid * grid), dim)], dim=-1)
    torch.testing.assert_close(embedding.double(), expected_embedding, rtol=0, atol=1e-4)


def test_float64_rel_and_no_gradient():
    boxes, flips, sizes = _random_views(3)
    rel = relative_geometry(boxes, flips, sizes).double().requires_grad_()
    embedding = relpos_embed(rel, 4, 8)
    assert embedding.dtype == torch.float32 and not embedding.requires_grad
    torch.testing.assert_close(embedding, relpos_embed(rel.detach().float(), 4, 8), rtol=0, atol=1e-6)


def test_sizes_and_frequencies_of_the_recipe():
    # ViT-B/16: 1536-d output, 192 frequencies with exponent k/192
    rel = torch.tensor([[0.1, -0.2, 1.3, 0.7, 0.0, 0.5]])
    embedding = relpos_embed(rel, 14, 768)
    assert embedding.shape == (1, 196, 1536)
    y0 = 1.3 * 0.5 + 14 * 0.1 - 0.5
    assert math.isclose(float(embedding[0, 0, 1]), math.sin(y0 * 10000 ** (-1 / 192)), abs_tol=1e-6)


@pytest.mark.parametrize("column,value,needle", [
    (2, 0.0, "dh"), (2, -1.0, "dh"), (3, 0.0, "dw"), (4, 0.5, "relflip"), (0, float("nan"), "finite"),
])
def test_rejects_bad_geometry(column, value, needle):
    rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]] * 2)
    rel[1, column] = value
    with pytest.raises(ValueError, match="relpos_embed") as info:
        relpos_embed(rel, 14, 16)
    assert needle in str(info.value)


def test_rejects_bad_shapes_and_arguments():
    rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="rel must be a float tensor of shape \\(B, 6\\)"):
        relpos_embed(rel[:, :5], 14, 16)
    with pytest.raises(ValueError, match="rel must be a float tensor"):
        relpos_embed(rel.long(), 14, 16)
    with pytest.raises(ValueError, match="rel must be a float tensor"):
        relpos_embed(rel[0], 14, 16)
    with pytest.raises(ValueError, match="dim must be a positive int divisible by 4"):
        relpos_embed(rel, 14, 18)
    with pytest.raises(ValueError, match="grid must be a positive int"):
        relpos_embed(rel, 0, 16)
    with pytest.raises(ValueError, match="dim must be"):
        absolute_sincos_table(4, 6)
    with pytest.raises(ValueError, match="backend"):
        relpos_embed(rel, 14, 16, backend="fast")
