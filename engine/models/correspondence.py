"""Exact geometric correspondence between two views' dense maps (DENSE.md K3, inverse map), as the
methods that compare a cell with "the same image point in the other view" use it: DenseSiam's
pixel and region terms, LC-loss, and the correspondence evaluation.

`sample_other_view(features_b, boxes, flips)`: for every cell i of view a's G×G map, the image
point under its centre, located in view b (kernels.geometric_correspondence, in view b's OUTPUT
orientation, so flips are handled), and view b's map bilinearly sampled there (grid_sample,
align_corners=False: cell (r, c) of view b has its centre at (r, c) in those units). Returns the
sampled features (B, C, G·G) and `in_overlap` (B, G·G): whether the point lies inside view b's crop.
Swap the views (`boxes.flip(1)`, `flips.flip(1)`) for the other direction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import geometric_correspondence, grid_sample_coordinates


def correspondence(boxes: torch.Tensor, flips: torch.Tensor, grid: int):
    """(location (B, G², 2) in view-2 cell units (row, col), in_overlap (B, G²)) for view 1's cells."""
    return geometric_correspondence(boxes, flips, grid)


def sample_other_view(features_b: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View b's map (B, C, G, G) sampled under view a's cell centres: (sampled (B, C, G²),
    in_overlap (B, G²) bool, location (B, G², 2)). boxes/flips: (B, 2, 4) / (B, 2), view a first."""
    batch, _, grid, width = features_b.shape
    if grid != width:
        raise ValueError(f"dense maps must be square, got {grid}x{width}")
    location, in_overlap = geometric_correspondence(boxes.to(features_b.device),
                                                    flips.to(features_b.device), grid)
    coords = grid_sample_coordinates(location, grid).to(features_b.dtype)     # (B, G², 2) x, y
    sampled = F.grid_sample(features_b, coords[:, :, None, :], mode="bilinear",
                            padding_mode="border", align_corners=False)      # (B, C, G², 1)
    return sampled[..., 0], in_overlap, location


__all__ = ["correspondence", "sample_other_view"]
