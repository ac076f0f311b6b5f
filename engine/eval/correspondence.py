"""A label-free dense metric: do a backbone's features find the same image point in another crop?

For every held-out image, two random crops with known geometry (crop box + horizontal flip, the
engine's geometry convention; no colour change) are rendered at the backbone's input size and
encoded into dense maps (G×G: a ResNet's C5, a ViT's patch grid). For each view-1 cell whose
centre lies inside view 2 (the overlap), its nearest view-2 cell by cosine of the backbone
features (kernels.dense_match) is compared with the geometric correspondent, the point under the
view-1 cell's centre located in view 2 (kernels.geometric_correspondence):

    hit@1    the matched cell's centre is within one cell of the correspondent in both directions
             (|Δrow| ≤ 1 and |Δcol| ≤ 1, in view-2 cell units)
    hit@0.5  the matched cell is the one containing the correspondent (|Δ| ≤ ½): stricter

reported as fractions of all overlap cells, with the chance level of each (the same fraction for a
match drawn uniformly among the G² cells, computed exactly for the same cells).

The position shortcut. On a small map, matching every cell to the cell at the SAME grid position
is often right: two random crops of one image overlap a lot, so the content moved by less than a
cell. Features that only know where a cell sits in its crop (zero padding makes border cells
recognisable) then score well without matching any content — at 4×4 (a ResNet's C5 on 32 px
CIFAR) the same-position match scores hit@1 ≈ 0.51, as much as a random-init ResNet. So the
headline is **hit@1 on displaced cells**: only the overlap cells whose correspondent lies more than
one cell from their own grid position (where the shortcut is wrong by construction), with its own
chance level; `identity_hit@1` (the shortcut's score on all overlap cells) is reported beside, and
`--img-size` evaluates a convolutional backbone on larger renderings of the same crops (a finer
map, where fewer cells are near their own position).

Instance-level objectives (MoCo) pool the map away and need not keep cells apart; dense objectives
(DenseCL, PixPro, ...) train the cells, so the metric is meant to separate them, and a random-init
backbone is the floor every trained one should clear.

Draws are a pure function of (seed, image index), so two checkpoints are compared on the same
pairs. The crop scale range is (0.25, 1) by default: the views overlap enough for the metric to
mean something at small G.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from engine.eval.features import _Progress, encoder_device, normalize_images
from engine.models.backbones import dense_map
from kernels import dense_match, geometric_correspondence
from pipelines.augment import ViewAugment, ViewParams, random_resized_crop_box
from pipelines.datasets import ImageFolder
from pipelines.torch_loader import _mix

DEFAULT_CROP_SCALE = (0.25, 1.0)


@dataclass
class CorrespondenceResult:
    hit1: float              # fraction of overlap cells matched within one cell
    hit_half: float          # fraction matched to the cell containing the correspondent
    chance_hit1: float       # the same fractions for a uniformly random match
    chance_half: float
    identity_hit1: float     # hit@1 of the same-position shortcut, on all overlap cells
    displaced_hit1: float    # hit@1 on the displaced cells only (the headline)
    displaced_chance: float  # its chance level
    cells: int               # overlap cells counted
    displaced_cells: int     # of which displaced (shortcut wrong)
    pairs: int               # image pairs evaluated
    grid: int

    def summary(self) -> dict:
        return {"displaced_hit@1": self.displaced_hit1,
                "chance_displaced_hit@1": self.displaced_chance,
                "hit@1": self.hit1, "hit@0.5": self.hit_half, "chance_hit@1": self.chance_hit1,
                "chance_hit@0.5": self.chance_half, "identity_hit@1": self.identity_hit1,
                "overlap_cells": self.cells, "displaced_cells": self.displaced_cells,
                "pairs": self.pairs, "grid": self.grid}


class CropPairs(Dataset):
    """Item i: two uint8 views (3, S, S) of image i, their boxes (2, 4) (y, x, h, w) and flips (2,).
    The boxes and flips depend on (seed, image index) only, not on the rendering size S."""

    def __init__(self, folder: ImageFolder, size: int, indices: list[int] | None = None,
                 scale: tuple[float, float] = DEFAULT_CROP_SCALE, seed: int = 0):
        self.folder, self.size, self.seed = folder, size, seed
        self.indices = list(range(len(folder))) if indices is None else list(indices)
        self.view = ViewAugment(size=size, scale=scale, jitter_p=0.0, grayscale_p=0.0,
                                blur_p=0.0, solarize_p=0.0, normalize=False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        image = self.folder[index].image
        rng = random.Random(_mix(self.seed, index, 0xC0AA))
        views, boxes, flips = [], [], []
        for _ in range(2):
            flip = rng.random() < 0.5
            box = random_resized_crop_box(image.height, image.width, self.view.scale,
                                          self.view.ratio, rng)
            params = ViewParams(box, flip, None, False, None, False)
            views.append((self.view.apply(image, params) * 255).round().to(torch.uint8))
            boxes.append(box)
            flips.append(flip)
        return (torch.stack(views), torch.tensor(boxes, dtype=torch.float32),
                torch.tensor(flips, dtype=torch.bool))


def _collate(items):
    views, boxes, flips = zip(*items)
    return torch.stack(views), torch.stack(boxes), torch.stack(flips)


def _hits(match: torch.Tensor, location: torch.Tensor, grid: int, tolerance: float):
    """(B, N) bool: the matched cell (index into the G×G view-2 grid) lies within `tolerance`
    cells of `location` (B, N, 2) in both directions."""
    rows = torch.div(match, grid, rounding_mode="floor").to(location.dtype)
    cols = (match % grid).to(location.dtype)
    return ((rows - location[..., 0]).abs() <= tolerance) & \
        ((cols - location[..., 1]).abs() <= tolerance)


def _chance(location: torch.Tensor, grid: int, tolerance: float) -> torch.Tensor:
    """(B, N) fraction of the G² cells within `tolerance` of each location."""
    centres = torch.arange(grid, device=location.device, dtype=location.dtype)
    row_ok = ((centres - location[..., :1]).abs() <= tolerance).sum(-1)
    col_ok = ((centres - location[..., 1:]).abs() <= tolerance).sum(-1)
    return (row_ok * col_ok).to(location.dtype) / grid ** 2


@torch.inference_mode()
def correspondence_accuracy(encoder: torch.nn.Module, folder: ImageFolder, size: int,
                            indices: list[int] | None = None, device=None, batch_size: int = 128,
                            workers: int = 0, scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                            seed: int = 0, progress: bool = False,
                            backend: str = "auto") -> CorrespondenceResult:
    """The metric of the module docstring for `encoder` (a densesim backbone) on `folder`."""
    device = encoder_device(encoder) if device is None else torch.device(device)
    pairs = CropPairs(folder, size, indices, scale, seed)
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate)
    was_training = encoder.training
    encoder.eval()
    totals = torch.zeros(7, dtype=torch.float64)
    cells, displaced_cells, grid = 0, 0, 0
    bar = _Progress("correspondence", len(pairs)) if progress else None
    done = 0
    try:
        for views, boxes, flips in loader:
            batch = views.shape[0]
            images = normalize_images(views.flatten(0, 1).to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                maps = dense_map(encoder, images).float()
            grid = maps.shape[-1]
            maps = maps.reshape(batch, 2, maps.shape[1], grid * grid).transpose(2, 3)
            match, _ = dense_match(maps[:, 0], maps[:, 1], backend=backend)   # (B, G²)
            location, overlap = geometric_correspondence(boxes.to(device), flips.to(device),
                                                         grid)
            location = location.double()
            same_position = torch.arange(grid * grid, device=device).expand_as(match)
            shortcut = _hits(same_position, location, grid, 1.0)
            displaced = (overlap & ~shortcut).double()
            overlap = overlap.double()
            hits, chance = _hits(match, location, grid, 1.0), _chance(location, grid, 1.0)
            per_cell = [(hits, overlap), (_hits(match, location, grid, 0.5), overlap),
                        (chance, overlap), (_chance(location, grid, 0.5), overlap),
                        (shortcut, overlap), (hits, displaced), (chance, displaced)]
            totals += torch.tensor([float((value * mask).sum()) for value, mask in per_cell],
                                   dtype=torch.float64)
            cells += int(overlap.sum())
            displaced_cells += int(displaced.sum())
            done += batch
            if bar:
                bar.update(done)
    finally:
        encoder.train(was_training)
        if bar:
            bar.close()
    denominator, moved = max(cells, 1), max(displaced_cells, 1)
    hit1, half, chance1, chance_half, identity = (float(v) / denominator for v in totals[:5])
    displaced_hit1, displaced_chance = (float(v) / moved for v in totals[5:])
    return CorrespondenceResult(hit1, half, chance1, chance_half, identity, displaced_hit1,
                                displaced_chance, cells, displaced_cells, len(pairs), grid)


__all__ = ["CorrespondenceResult", "CropPairs", "DEFAULT_CROP_SCALE", "correspondence_accuracy"]
