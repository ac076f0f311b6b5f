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
