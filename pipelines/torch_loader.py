"""The PyTorch (CPU, Pillow) two-view / multi-crop loader: the fallback pipeline, the reference for
DALI, and the home of what every loader shares (order, sharding, the batch dict, proposals).

Reproducibility contract: epoch `e` visits the dataset in the order `torch.randperm(n)` drawn from a
generator seeded by (seed, e), cut into `n // batch_size` batches (drop_last: the final partial
batch is dropped, so every batch has exactly `batch_size` images). The sample at position `p` of the
epoch is augmented with `random.Random` seeded by (seed, e, p). So a batch is a pure function of
(dataset, augmentation, seed, epoch, batch index): identical for any number of workers, and when
an epoch is resumed at batch k with `epoch_batches(e, start_batch=k)`. The loader never touches
the global torch / random / numpy RNGs.

Sharding (one process per GPU): with `world_size` ranks, global batch k of an epoch is positions
[k·B·world, (k+1)·B·world) of the permutation, and rank r takes the r-th slice of B. The ranks'
batches are disjoint, together they are exactly the single-process run's global batches, and the
augmentation of a sample does not depend on the world size (positions are global).

`stream(epoch, start_batch)` yields batches across epoch boundaries from ONE DataLoader, so the
worker processes start once per run, not once per epoch (on a small dataset an epoch can be a
single batch).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .augment import MultiCropAugment, TwoViewAugment, is_multicrop, size_runs
from .datasets import DataError, Sample
from .geometry import boxes_in_view

BATCH_KEYS = ("view1", "view2", "boxes", "flips", "image_size", "label", "index",
              "skipped_files", "epoch", "batch_index")
MULTICROP_KEYS = BATCH_KEYS + ("crops",)
PROPOSAL_KEYS = ("proposals", "proposal_visible")


class Batch(dict):
    """A loader batch: a plain dict of the keys in TwoViewLoader's docstring, which also answers
    `batch["crops"]` (and `.get("crops")`) on a two-view batch with `[view1, view2]`, so a method
    can read every batch as a list of crops. The key is not stored in a two-view batch (its keys
    stay BATCH_KEYS); a multi-crop batch stores it. A dict rebuilt from a batch ({k: ... for k in
    batch.items()}) is a plain dict without this fallback: use `batch_crops(batch)` there."""

    def __missing__(self, key):
        if key == "crops" and "view1" in self and "view2" in self:
            return [self["view1"], self["view2"]]
        raise KeyError(key)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


def batch_crops(batch) -> list:
    """The crops of any batch dict: `batch["crops"]` if stored, else [view1, view2]."""
    return batch["crops"] if "crops" in batch else [batch["view1"], batch["view2"]]


def with_view_aliases(batch: dict) -> "Batch":
    """A multi-crop batch's view1 / view2: the same tensors as crops[0] / crops[1]."""
    batch = Batch(batch)
    if "crops" in batch:
        batch["view1"], batch["view2"] = batch["crops"][0], batch["crops"][1]
    return batch


# ------------------------------------------------ region proposals (shared by every loader)

def check_proposals(proposals, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes float32 (N, P, 4), counts int64 (N,)) on the CPU from `proposals` = (boxes, counts)
    as `pipelines.proposals.load_proposals` makes them (x1 y1 x2 y2 original-image pixels,
    zero-padded after each image's `counts[i]` boxes, indexed by dataset index); a one-line
    DataError when they do not fit the dataset."""
    try:
        boxes, counts = proposals
    except (TypeError, ValueError):
        raise DataError("proposals must be a (boxes (N, P, 4), counts (N,)) pair") from None
    boxes = torch.as_tensor(boxes).to("cpu", torch.float32)
    counts = torch.as_tensor(counts).to("cpu", torch.int64)
    if boxes.dim() != 3 or boxes.shape[2] != 4 or boxes.shape[0] != num_images:
        raise DataError(f"proposal boxes must have shape (N={num_images}, P, 4), got "
                        f"{tuple(boxes.shape)}")
    if tuple(counts.shape) != (num_images,):
        raise DataError(f"proposal counts must have shape ({num_images},), got "
                        f"{tuple(counts.shape)}")
    if num_images and (int(counts.min()) < 0 or int(counts.max()) > boxes.shape[1]):
        raise DataError(f"proposal counts must be in 0..{boxes.shape[1]} (P)")
    if not bool(torch.isfinite(boxes).all()):
        raise DataError("proposal boxes must be finite")
    return boxes.contiguous(), counts.contiguous()


def proposals_in_views(boxes: torch.Tensor, counts: torch.Tensor, index: torch.Tensor,
                       view_boxes: torch.Tensor, flips: torch.Tensor, sizes
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's proposals mapped into each of its views (`geometry.boxes_in_view`).

    boxes (N, P, 4), counts (N,): the dataset's proposals (check_proposals), on the batch's
    device; index (B,) the dataset index of each image; view_boxes (B, V, 4) (y, x, h, w) and
    flips (B, V): the views; sizes: the V view sizes. Returns (proposals (B, V, P, 4) float32
    x1 y1 x2 y2 in view pixels, clipped to the view; visible (B, V, P) float32, the fraction of
    each box inside the view). Padding rows (p ≥ counts[index]) are all zero in both. Tensor ops
    only: no host sync (the resident loader runs this on the device).
    """
    mine = boxes.index_select(0, index)                                     # (B, P, 4)
    b, p = mine.shape[:2]
    valid = (torch.arange(p, device=index.device)[None, :]
             < counts.index_select(0, index)[:, None])[:, None, :]           # (B, 1, P)
    mapped, visible = [], []
    for lo, hi, size in size_runs(sizes):
        m, v = boxes_in_view(mine[:, None].expand(b, hi - lo, p, 4), view_boxes[:, lo:hi],
                             flips[:, lo:hi], int(size))
        mapped.append(m)
        visible.append(v)
    mapped = torch.cat(mapped, dim=1) if len(mapped) > 1 else mapped[0]
    visible = torch.cat(visible, dim=1) if len(visible) > 1 else visible[0]
    return (torch.where(valid[..., None], mapped, torch.zeros_like(mapped)).contiguous(),
            (visible * valid).contiguous())


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The dataset order of `epoch`: torch.randperm(n) from a generator seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(n, generator=generator)


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The augmentation RNG of the sample at `position` in `epoch`."""
    return random.Random(_mix(seed, epoch, position, 0x5A3D))


# ------------------------------------------------ batching rules shared by every loader (dali,
# resident): the same checks, batch count and rank slice, so they visit an epoch identically.

def check_batching(num_images: int, batch_size: int, rank: int, world_size: int,
                   drop_last: bool) -> None:
    """One-line DataError for a batch size / rank layout the data cannot serve."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside 0..{world_size - 1}")
    if drop_last and batch_size * world_size > num_images:
        per_rank = num_images // world_size
        raise DataError(f"batch size {batch_size} is larger than the dataset ({num_images} images"
                        + (f" over {world_size} ranks" if world_size > 1 else "")
                        + f"): use --batch-size {per_rank} or less")
    if not drop_last and world_size > 1:
        raise DataError("drop_last=False is only supported with one rank (ranks must see "
                        "equal batch counts)")


def count_batches(num_images: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Global batches per epoch: the final partial one is dropped unless drop_last=False."""
    b = batch_size * world_size
    return num_images // b if drop_last else -(-num_images // b)


def rank_slice(batch_index: int, batch_size: int, rank: int, world_size: int,
               num_images: int) -> tuple[int, int]:
    """Positions [lo, hi) of the epoch order that form this rank's part of a global batch."""
    lo = (batch_index * world_size + rank) * batch_size
    return lo, min(lo + batch_size, num_images)


def _to_device(value, device: torch.device):
    """A tensor, or a list of tensors (crops), moved with non_blocking; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [v.to(device, non_blocking=True) for v in value]
    return value


class _EpochSamples(Dataset):
    """Maps a key (epoch, position, index) to one augmented sample (runs in the workers)."""

    def __init__(self, dataset, augment: TwoViewAugment | MultiCropAugment, seed: int):
        self.dataset, self.augment, self.seed = dataset, augment, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, Any]:
        epoch, position, index, batch_index = key
        try:
            sample = self.dataset[index]
        except DataError as err:
            # Raised in the main process with its own one-line message (a worker's exception
            # would arrive wrapped in a traceback).
            return {"error": str(err)}
        if not isinstance(sample, Sample):  # any dataset returning (PIL image, label)
            image, label = sample[0], sample[1]
            sample = Sample(image, int(label), index, ())
        views = self.augment(sample.image, sample_rng(self.seed, epoch, position))
        pixels = ({"crops": views.crops} if is_multicrop(self.augment)
                  else {"view1": views.view1, "view2": views.view2})
        return {**pixels, "boxes": views.boxes,
                "flips": views.flips, "image_size": (sample.image.height, sample.image.width),
                "label": sample.label, "index": sample.index, "skipped": sample.skipped,
                "epoch": epoch, "batch_index": batch_index}


def collate_two_views(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into the batch dict the engine consumes (see TwoViewLoader). Multi-crop
    samples give `crops` only; the loader adds the view1 / view2 aliases after pinning and
    moving (so they stay the same tensors as crops[0] / crops[1])."""
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        return {"error": errors[0]}
    if "crops" in samples[0]:
        pixels = {"crops": [torch.stack([s["crops"][v] for s in samples])
                            for v in range(len(samples[0]["crops"]))]}
    else:
        pixels = {"view1": torch.stack([s["view1"] for s in samples]),
                  "view2": torch.stack([s["view2"] for s in samples])}
    return {
        **pixels,
        "boxes": torch.stack([s["boxes"] for s in samples]),
        "flips": torch.stack([s["flips"] for s in samples]),
        "image_size": torch.tensor([s["image_size"] for s in samples], dtype=torch.int64),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "skipped_files": [path for s in samples for path in s["skipped"]],
        "epoch": samples[0]["epoch"],
        "batch_index": samples[0]["batch_index"],
    }


class _EpochBatchKeys:
    """Batch sampler: this rank's part of batches start_batch..stop_batch−1 of one epoch, as keys
    (epoch, position, dataset index, batch index)."""

    def __init__(self, order: torch.Tensor, epoch: int, batch_size: int, start_batch: int,
                 stop_batch: int, rank: int = 0, world_size: int = 1):
        self.order, self.epoch, self.batch_size = order, epoch, batch_size
        self.start_batch, self.stop_batch = start_batch, stop_batch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop_batch - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        for k in range(self.start_batch, self.stop_batch):
            lo, hi = rank_slice(k, self.batch_size, self.rank, self.world_size, len(self.order))
            yield [(self.epoch, pos, idx, k)
                   for pos, idx in zip(range(lo, hi), self.order[lo:hi].tolist())]


class _StreamBatchKeys:
    """Endless batch sampler: the epochs' keys one after another, from (epoch, start_batch)."""

    def __init__(self, loader: "TwoViewLoader", epoch: int, start_batch: int):
        self.loader, self.epoch, self.start_batch = loader, epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        epoch, start = self.epoch, self.start_batch
        while True:
            yield from self.loader.epoch_batch_keys(epoch, start)
            epoch, start = epoch + 1, 0


class TwoViewLoader:
    """Batches of two augmented views (or V multi-crop views) with their crop geometry, from a
    map-style dataset.

    dataset: `dataset[i]` → `datasets.Sample` (e.g. `ImageFolder`) or `(PIL image, label)`.
    augment: a `TwoViewAugment`, or a `MultiCropAugment` (V crops). workers: DataLoader worker
    processes (0 = in this process). drop_last: True (default) drops the final partial batch of
    each epoch; False keeps it. pin_memory: "auto" pins when CUDA is available. device: if given,
    tensors are moved there (non_blocking) before a batch is yielded. proposals: optional
    (boxes (N, P, 4) float32 x1 y1 x2 y2 original-image pixels, zero-padded; counts (N,) int64),
    indexed by dataset index (`pipelines.proposals.load_proposals`): each batch then also holds
    them mapped into every view.

    Each batch is a dict (a `Batch`; every loader — torch, DALI, resident — yields this format):
      view1, view2   float32 (B, 3, S, S), normalised as the augmentation says
      boxes          float32 (B, V, 4): (y, x, h, w) per view, pixels of the original image
                     (V = 2 for two views)
      flips          bool (B, V): view mirrored left-right after crop+resize
      image_size     int64 (B, 2): (H, W) of the original image
      label          int64 (B,);  index  int64 (B,): dataset index of the image actually used
      skipped_files  list[str]: files that failed to decode while building this batch (each was
                     replaced by the next readable image of the dataset)
      epoch, batch_index  int: where the batch sits in the epoch order
    Multi-crop (a MultiCropAugment) adds
      crops          list of V float32 (B, 3, S_v, S_v), in the augmentation's order (large crops
                     first, as given); view1 / view2 are crops[0] / crops[1] (the same tensors).
                     A two-view batch does not store `crops`, but `batch["crops"]` answers
                     [view1, view2] there too (`Batch`), so methods can use one code path.
    With proposals:
      proposals         float32 (B, V, P, 4): x1 y1 x2 y2 in view pixels (geometry.boxes_in_view:
                        through the crop and the flip, clipped to [0, S_v])
      proposal_visible  float32 (B, V, P): fraction of each box inside the view; padding rows
                        (beyond the image's count) are 0 here and in `proposals`
    rank, world_size: shard each global batch over data-parallel ranks (see the module docstring).
    """

    def __init__(self, dataset, augment: TwoViewAugment | MultiCropAugment, batch_size: int,
                 workers: int = 0, seed: int = 0, drop_last: bool = True,
                 pin_memory: bool | str = "auto", device: torch.device | str | None = None,
                 prefetch_factor: int = 2, rank: int = 0, world_size: int = 1,
                 proposals=None):
        check_batching(len(dataset), batch_size, rank, world_size, drop_last)
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}")
        self.dataset, self.augment = dataset, augment
        self.batch_size, self.workers, self.seed = int(batch_size), int(workers), int(seed)
        self.drop_last = drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.device = None if device is None else torch.device(device)
        self.prefetch_factor = prefetch_factor
        self.rank, self.world_size = int(rank), int(world_size)
        self._samples = _EpochSamples(dataset, augment, self.seed)
        self.proposals = None if proposals is None else check_proposals(proposals, len(dataset))

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def batches_per_epoch(self) -> int:
        return count_batches(len(self.dataset), self.batch_size, self.world_size, self.drop_last)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batch_keys(self, epoch: int, start_batch: int = 0) -> "_EpochBatchKeys":
        """Per batch of `epoch` (from `start_batch`), the (epoch, position, dataset index) of
        each sample; built lazily from the permutation (no per-sample list for big datasets)."""
        order = epoch_permutation(len(self.dataset), self.seed, epoch)
        return _EpochBatchKeys(order, epoch, self.batch_size, start_batch, self.batches_per_epoch,
                               self.rank, self.world_size)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from batch index `start_batch` on (resume mid-epoch exactly)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        keys = self.epoch_batch_keys(epoch, start_batch)
        if len(keys) == 0:
            return iter(())
        return self._iterate(keys)

    def stream(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Endless batches from (epoch, start_batch) on, across epochs, with one set of workers.
        Each batch's `epoch` and `batch_index` say where it came from (for checkpoints)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        return self._iterate(_StreamBatchKeys(self, epoch, start_batch))

    def _iterate(self, keys) -> Iterator[dict[str, Any]]:
        extra = {}
        if self.workers > 0:
            extra["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(self._samples, batch_sampler=keys, num_workers=self.workers,
                            collate_fn=collate_two_views, pin_memory=self.pin_memory,
                            # DataLoader draws a worker base seed from this generator on every
                            # iterator; a private one keeps the global torch RNG untouched.
                            generator=torch.Generator().manual_seed(self.seed), **extra)
        iterator = iter(loader)
        try:
            for batch in iterator:
                if "error" in batch:
                    raise DataError(batch["error"])
                if self.proposals is not None:
                    batch.update(zip(PROPOSAL_KEYS, proposals_in_views(
                        *self.proposals, batch["index"], batch["boxes"], batch["flips"],
                        [v.size for v in self.augment.views])))
                if self.device is not None:
                    batch = {k: _to_device(v, self.device) for k, v in batch.items()}
                yield with_view_aliases(batch)
        finally:
            del iterator  # shuts the workers down when the consumer stops early
