"""The PyTorch (CPU, Pillow) two-view loader: the fallback pipeline, and the reference for DALI.

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

from .augment import TwoViewAugment
from .datasets import DataError, Sample

BATCH_KEYS = ("view1", "view2", "boxes", "flips", "image_size", "label", "index",
              "skipped_files", "epoch", "batch_index")


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


class _EpochSamples(Dataset):
    """Maps a key (epoch, position, index) to one augmented sample (runs in the workers)."""

    def __init__(self, dataset, augment: TwoViewAugment, seed: int):
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
        return {"view1": views.view1, "view2": views.view2, "boxes": views.boxes,
                "flips": views.flips, "image_size": (sample.image.height, sample.image.width),
                "label": sample.label, "index": sample.index, "skipped": sample.skipped,
                "epoch": epoch, "batch_index": batch_index}


def collate_two_views(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into the batch dict the engine consumes (see TwoViewLoader)."""
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        return {"error": errors[0]}
    return {
        "view1": torch.stack([s["view1"] for s in samples]),
        "view2": torch.stack([s["view2"] for s in samples]),
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
    """Batches of two augmented views with their crop geometry, from a map-style dataset.

    dataset: `dataset[i]` → `datasets.Sample` (e.g. `ImageFolder`) or `(PIL image, label)`.
    augment: a `TwoViewAugment`. workers: DataLoader worker processes (0 = in this process).
    drop_last: True (default) drops the final partial batch of each epoch; False keeps it.
    pin_memory: "auto" pins when CUDA is available. device: if given, tensors are moved there
    (non_blocking) before a batch is yielded.

    Each batch is a dict:
      view1, view2   float32 (B, 3, S, S), normalised as the augmentation says
      boxes          float32 (B, 2, 4): (y, x, h, w) per view, pixels of the original image
      flips          bool (B, 2): view mirrored left-right after crop+resize
      image_size     int64 (B, 2): (H, W) of the original image
      label          int64 (B,);  index  int64 (B,): dataset index of the image actually used
      skipped_files  list[str]: files that failed to decode while building this batch (each was
                     replaced by the next readable image of the dataset)
      epoch, batch_index  int: where the batch sits in the epoch order
    rank, world_size: shard each global batch over data-parallel ranks (see the module docstring).
    """

    def __init__(self, dataset, augment: TwoViewAugment, batch_size: int, workers: int = 0,
                 seed: int = 0, drop_last: bool = True, pin_memory: bool | str = "auto",
                 device: torch.device | str | None = None, prefetch_factor: int = 2,
                 rank: int = 0, world_size: int = 1):
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
                if self.device is not None:
                    batch = {k: (v.to(self.device, non_blocking=True)
                                 if isinstance(v, torch.Tensor) else v)
                             for k, v in batch.items()}
                yield batch
        finally:
            del iterator  # shuts the workers down when the consumer stops early
