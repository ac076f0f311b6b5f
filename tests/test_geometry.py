"""pipelines/geometry.py: the repo's crop convention and SIM's six relative numbers."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.geometry import (flipped_frame_boxes, patch_centres_in_source, relative_geometry,
                                view_to_source)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _random_views(batch):
    sizes = torch.randint(30, 500, (batch, 2)).double()
    frac = torch.rand(batch, 2, 4, dtype=torch.float64)
    h = torch.ceil(sizes[:, None, 0] * (0.1 + 0.9 * frac[..., 2]))
    w = torch.ceil(sizes[:, None, 1] * (0.1 + 0.9 * frac[..., 3]))
    y = torch.floor((sizes[:, None, 0] - h) * frac[..., 0])
    x = torch.floor((sizes[:, None, 1] - w) * frac[..., 1])
    return torch.stack([y, x, h, w], dim=-1), torch.rand(batch, 2) < 0.5, sizes


def test_relative_geometry_follows_sim_definitions():
    batch = 32
    boxes, flips, sizes = _random_views(batch)
    rel = relative_geometry(boxes, flips, sizes)
    assert rel.shape == (batch, 6) and rel.dtype == torch.float32
    for n in range(batch):
        width = sizes[n, 1].item()
        frame = []
        for v in range(2):  # SIM measures a flipped view's box in the mirrored image
            y, x, h, w = boxes[n, v].tolist()
            frame.append((y, width - x - w if flips[n, v] else x, h, w))
        (i1, j1, h1, w1), (i2, j2, h2, w2) = frame
        expected = [(i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1,
                    float(bool(flips[n, 0]) != bool(flips[n, 1])), (width - j1 - j2) / w1]
        torch.testing.assert_close(rel[n].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)


def test_hand_computed_example():
    # 200 x 300 image; view 1 = rows 20..119, cols 40..189, flipped; view 2 = rows 50..99, cols 0..74
    boxes = torch.tensor([[[20.0, 40.0, 100.0, 150.0], [50.0, 0.0, 50.0, 75.0]]])
    flips = torch.tensor([[True, False]])
    sim_boxes = flipped_frame_boxes(boxes, flips, (200, 300))
    torch.testing.assert_close(sim_boxes[0, 0], torch.tensor([20.0, 110.0, 100.0, 150.0], dtype=torch.float64))
    torch.testing.assert_close(sim_boxes[0, 1], torch.tensor([50.0, 0.0, 50.0, 75.0], dtype=torch.float64))
    rel = relative_geometry(boxes, flips, (200, 300))
    expected = torch.tensor([[30 / 100, (0 - 110) / 150, 0.5, 0.5, 1.0, (300 - 110 - 0) / 150]])
    torch.testing.assert_close(rel, expected)


def test_image_size_forms_and_array_likes_agree():
    boxes, flips, sizes = _random_views(5)
    sizes[:] = sizes[0]
    by_tensor = relative_geometry(boxes, flips, sizes)
    by_tuple = relative_geometry(boxes, flips, tuple(sizes[0].tolist()))
    by_numpy = relative_geometry(boxes.numpy(), flips.numpy().astype(np.int64), sizes[0].numpy())
    by_list = relative_geometry(boxes.tolist(), flips.tolist(), sizes[0].tolist())
    for other in (by_tuple, by_numpy, by_list):
        torch.testing.assert_close(other, by_tensor, rtol=0, atol=0)


def test_view_to_source_convention():
    # A full-image view at native size maps every pixel to itself; flipped, column c to W-1-c.
    size = 9
    box = torch.tensor([[0.0, 0.0, size, size]] * 2)
    flip = torch.tensor([False, True])
    rows = torch.arange(size, dtype=torch.float64)[None, :]
    cols = torch.arange(size, dtype=torch.float64)[None, :]
    source_rows, source_cols = view_to_source(box, flip, rows, cols, size)
    torch.testing.assert_close(source_rows, rows.expand(2, -1))
    torch.testing.assert_close(source_cols[0], cols[0])
    torch.testing.assert_close(source_cols[1], size - 1 - cols[0])
    # 2x downscale of a 4x4 crop at (y, x) = (2, 6): view pixel 0 averages source pixels 6 and 7
    source_rows, source_cols = view_to_source(torch.tensor([[2.0, 6.0, 4.0, 4.0]]), torch.tensor([False]),
                                              torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]), 2)
    torch.testing.assert_close(source_rows, torch.tensor([[2.5, 4.5]], dtype=torch.float64))
    torch.testing.assert_close(source_cols, torch.tensor([[6.5, 8.5]], dtype=torch.float64))


def test_patch_centres_are_independent_of_view_resolution():
    boxes, flips, _ = _random_views(4)
    grid, patch = 7, 16
    centres = patch_centres_in_source(boxes[:, 1], flips[:, 1], grid)
    cells = torch.arange(grid, dtype=torch.float64)
    pixel = patch * cells + (patch - 1) / 2  # centre of patch a in a 112-pixel view
    rows, cols = view_to_source(boxes[:, 1], flips[:, 1], pixel.repeat_interleave(grid)[None],
                                pixel.repeat(grid)[None], grid * patch)
    torch.testing.assert_close(centres, torch.stack([rows, cols], dim=-1))


def test_rejects_bad_inputs():
    boxes, flips, sizes = _random_views(2)
    with pytest.raises(ValueError, match="boxes must have shape \\(B, 2, 4\\)"):
        relative_geometry(boxes[:, 0], flips, sizes)
    with pytest.raises(ValueError, match="flips must have shape \\(B, 2\\) with B=2"):
        relative_geometry(boxes, flips[:1], sizes)
    with pytest.raises(ValueError, match="flips must be bool"):
        relative_geometry(boxes, flips.double() + 2, sizes)
    bad = boxes.clone()
    bad[1, 0, 2] = 0.0
    with pytest.raises(ValueError, match="h and w"):
        relative_geometry(bad, flips, sizes)
    with pytest.raises(ValueError, match="image_size"):
        relative_geometry(boxes, flips, sizes[:1].repeat(3, 1))
    with pytest.raises(ValueError, match="image_size"):
        relative_geometry(boxes, flips, (0, 100))
    with pytest.raises(ValueError, match="view_size"):
        view_to_source(boxes[:, 0], flips[:, 0], torch.zeros(1, 1), torch.zeros(1, 1), 0)


def test_pipelines_geometry_imports_no_model_code():
    code = ("import sys; import pipelines.geometry; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('engine', 'kernels')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# ------------------------------------------------------------------ proposals mapped into views
def test_boxes_in_view_agrees_with_view_to_source():
    """A box around the source point that view pixel (r, c) samples maps back onto (r, c): the
    proposal mapping is the inverse of the geometry convention, flips included."""
    from pipelines.geometry import boxes_in_view, view_to_source

    g = torch.Generator().manual_seed(3)
    B, P, S = 6, 5, 17
    H, W = 90, 130
    h = torch.randint(20, 80, (B,), generator=g).double()
    w = torch.randint(20, 120, (B,), generator=g).double()
    y = (torch.rand(B, generator=g, dtype=torch.float64) * (H - h)).floor()
    x = (torch.rand(B, generator=g, dtype=torch.float64) * (W - w)).floor()
    box = torch.stack([y, x, h, w], 1)
    flip = torch.tensor([False, True, False, True, True, False])
    rows = torch.randint(1, S - 1, (B, P), generator=g).double()
    cols = torch.randint(1, S - 1, (B, P), generator=g).double()
    src_r, src_c = view_to_source(box, flip, rows, cols, S)
    eps = 1e-3   # a tiny box around the sampled point, in edge coordinates (index + 1/2)
    tiny = torch.stack([src_c + 0.5 - eps, src_r + 0.5 - eps, src_c + 0.5 + eps,
                        src_r + 0.5 + eps], -1)
    mapped, visible = boxes_in_view(tiny, box, flip, S)
    centre_c = (mapped[..., 0] + mapped[..., 2]).double() / 2
    centre_r = (mapped[..., 1] + mapped[..., 3]).double() / 2
    torch.testing.assert_close(centre_c, cols + 0.5, rtol=0, atol=1e-4)
    torch.testing.assert_close(centre_r, rows + 0.5, rtol=0, atol=1e-4)
    assert bool((visible == 1).all())


def test_boxes_in_view_clips_flips_and_reports_the_visible_fraction():
    from pipelines.geometry import boxes_in_view

    box = torch.tensor([10.0, 20.0, 40.0, 80.0])          # y, x, h, w
    S = 8
    boxes = torch.tensor([[20.0, 10.0, 100.0, 50.0],       # exactly the crop
                          [20.0, 10.0, 60.0, 30.0],        # its top-left quarter
                          [0.0, 10.0, 60.0, 50.0],         # left 20 px outside: 40 of 60 wide
                          [200.0, 0.0, 220.0, 5.0],        # entirely outside
                          [30.0, 20.0, 30.0, 40.0]])       # zero width
    plain, vis = boxes_in_view(boxes, box, torch.tensor(False), S)
    flipped, vis_f = boxes_in_view(boxes, box, torch.tensor(True), S)
    torch.testing.assert_close(plain[0], torch.tensor([0.0, 0, 8, 8]))
    torch.testing.assert_close(plain[1], torch.tensor([0.0, 0, 4, 4]))
    torch.testing.assert_close(flipped[1], torch.tensor([4.0, 0, 8, 4]))   # mirrored
    torch.testing.assert_close(plain[2], torch.tensor([0.0, 0, 4, 8]))
    torch.testing.assert_close(flipped[2], torch.tensor([4.0, 0, 8, 8]))
    torch.testing.assert_close(vis, torch.tensor([1.0, 1.0, 40 / 60, 0.0, 0.0]))
    torch.testing.assert_close(vis_f, vis)
    assert bool(((plain >= 0) & (plain <= S)).all()) and bool(torch.isfinite(plain).all())
    # non-square views and batch dimensions broadcast
    mapped, _ = boxes_in_view(boxes[None, None].expand(2, 3, 5, 4), box.expand(2, 3, 4),
                              torch.zeros(2, 3, dtype=torch.bool), (4, 16))
    torch.testing.assert_close(mapped[1, 2, 0], torch.tensor([0.0, 0, 16, 4]))
