"""Frozen features of a labelled image folder: the deterministic eval transform, decoded-image
caches, and a batched extractor.

Eval transform (`EvalTransform`, one bicubic resample, no randomness):
  * an image whose shorter side exceeds the model's `img_size` S is resized so that its shorter
    side is int(S / crop_pct) (crop_pct 0.875: 224 → 256, 128 → 146, as DINO/timm evaluate) and
    centre-cropped to S×S;
  * an image whose shorter side is ≤ S (CIFAR at 32, Imagenette-128 at 128) is only resized
    (its centred square, i.e. the whole image when square) to S×S — no crop that throws pixels away.
  The crop is taken as a float box of the source and resized once (Pillow `resize(box=...)`), so a
  square S×S image comes out bit-identical. The transform returns uint8 (3, S, S); normalisation
  (ImageNet mean/std, as in training) happens on the device, batched, in `normalize_images`.

Features (`extract_features`): the encoder runs on full images (no mask), in inference mode, with
bf16 autocast on CUDA; per image
  * patch_mean = the mean of the dense map's cells: for a ViT the G² patch tokens of the last
                 block (no final norm: SIM's ViT has none), for a ResNet the global average of
                 C5 (what MoCo/DenseCL/PixPro evaluate),
  * cls        = the ViT's cls token of the last block (None for a ResNet),
both returned as float32. The input is a folder (decoded through a torch DataLoader with worker
processes) or a `DecodedImages` cache (uint8 images already decoded, e.g. resident on the GPU), so an
online monitor that evaluates every N steps decodes the JPEGs once.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from engine.models.backbones import backbone_channels
from engine.models.vit import VisionTransformer
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from pipelines.datasets import ImageFolder

DEFAULT_CROP_PCT = 0.875


# ----------------------------------------------------------------------------- transform
@dataclass(frozen=True)
class EvalTransform:
    """PIL RGB image -> uint8 (3, size, size); see the module docstring for the rule."""
    size: int
    crop_pct: float = DEFAULT_CROP_PCT

    def __post_init__(self):
        if self.size < 1 or not 0 < self.crop_pct <= 1:
            raise ValueError(f"bad eval transform: size {self.size}, crop_pct {self.crop_pct}")

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source box (left, upper, right, lower) that becomes the S×S output."""
        short = min(width, height)
        if short <= self.size:
            side = float(short)
        else:
            resized_short = int(self.size / self.crop_pct)
            side = self.size * short / resized_short
        left, upper = (width - side) / 2, (height - side) / 2
        return left, upper, left + side, upper + side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box = self.box(image.width, image.height)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=Image.Resampling.BICUBIC,
                                 box=box)
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32, ImageNet-normalised, on the images' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean).div_(std)


class EvalDataset(Dataset):
    """A (subset of an) ImageFolder through the eval transform: item -> (uint8 image, label,
    dataset index actually used, skipped paths). Broken files follow ImageFolder's policy (the
    next readable image stands in, and the broken path is reported)."""

    def __init__(self, folder: ImageFolder, size: int, indices: list[int] | None = None,
                 crop_pct: float = DEFAULT_CROP_PCT):
        self.folder = folder
        self.transform = EvalTransform(size, crop_pct)
        self.indices = list(range(len(folder))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([self.folder.labels[i] for i in self.indices], dtype=torch.int64)

    def __getitem__(self, item: int):
        sample = self.folder[self.indices[item]]
        return self.transform(sample.image), sample.label, sample.index, sample.skipped


def _collate(samples):
    images, labels, indices, skipped = zip(*samples)
    return (torch.stack(images), torch.tensor(labels, dtype=torch.int64),
            torch.tensor(indices, dtype=torch.int64), [p for s in skipped for p in s])


def subsample_indices(n: int, max_n: int | None, seed: int = 0) -> list[int] | None:
    """A deterministic random subset of max_n of range(n), sorted (None: keep all). Random, not
    the first max_n, because a class-folder dataset is ordered by class."""
    if max_n is None or max_n >= n:
        return None
    if max_n < 1:
        raise ValueError(f"a subset needs at least one image, got {max_n}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:max_n].tolist())


# ----------------------------------------------------------------------------- decoded images
@dataclass
class DecodedImages:
    """Eval images decoded once: uint8 (N, 3, S, S) and int64 labels (N,), on one device."""
    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device | str) -> DecodedImages:
        return DecodedImages(self.images.to(device), self.labels.to(device), self.skipped)


def decoded_nbytes(num_images: int, size: int) -> int:
    """Bytes a DecodedImages of `num_images` S×S images takes (uint8)."""
    return num_images * 3 * size * size


def _loader(dataset: EvalDataset, batch_size: int, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_collate, pin_memory=pin,
                      prefetch_factor=4 if workers > 0 else None)


def decode_images(dataset: EvalDataset, device: torch.device | str = "cpu",
                  batch_size: int = 256, workers: int = 0,
                  progress: bool = False) -> DecodedImages:
    """Decode and transform every image of `dataset` once into a uint8 tensor on `device`."""
    device = torch.device(device)
    n, size = len(dataset), dataset.transform.size
    images = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.empty((n,), dtype=torch.int64, device=device)
    skipped: list[str] = []
    bar = _Progress("decode", n) if progress else None
    done = 0
    for batch, batch_labels, _, batch_skipped in _loader(dataset, batch_size, workers,
                                                         device.type == "cuda"):
        images[done:done + len(batch)].copy_(batch, non_blocking=True)
        labels[done:done + len(batch)].copy_(batch_labels, non_blocking=True)
        done += len(batch)
        skipped += batch_skipped
        if bar:
            bar.update(done)
    if bar:
        bar.close()
    return DecodedImages(images, labels, skipped)


# ----------------------------------------------------------------------------- features
@dataclass
class Features:
    """Per image: patch_mean float32 (N, D), cls float32 (N, D) or None (ResNet), labels int64
    (N,), one device. `skipped`: files that failed to decode (each replaced by the next readable
    image)."""
    patch_mean: torch.Tensor
    cls: torch.Tensor | None
    labels: torch.Tensor
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def kind(self, name: str) -> torch.Tensor:
        """'patch' (global average of the patch tokens) or 'cls'."""
        if name == "patch":
            return self.patch_mean
        if name == "cls":
            if self.cls is None:
                raise ValueError("this encoder has no cls token (a ResNet): use the patch "
                                 "(pooled) features")
            return self.cls
        raise ValueError(f"unknown feature kind {name!r}: use patch or cls")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("patch",) if self.cls is None else ("patch", "cls")

    def to(self, device: torch.device | str) -> Features:
        return Features(self.patch_mean.to(device),
                        None if self.cls is None else self.cls.to(device),
                        self.labels.to(device), self.skipped, self.seconds)


def encoder_device(encoder: torch.nn.Module) -> torch.device:
    return next(encoder.parameters()).device


@torch.inference_mode()
def extract_features(encoder: torch.nn.Module, data: ImageFolder | EvalDataset | DecodedImages,
                     device: torch.device | str | None = None, batch_size: int = 256,
                     workers: int = 0, progress: bool = False, amp: bool | None = None,
                     crop_pct: float = DEFAULT_CROP_PCT) -> Features:
    """Features of every image of `data` (see the module docstring), in dataset order.

    encoder: a backbone of engine/models/backbones.py — our ViT or ResNet — (already on `device`;
      it is put in eval mode for the call and its previous mode restored). data: an ImageFolder (wrapped in the eval transform at the
      encoder's img_size), an EvalDataset, or DecodedImages (no decoding at all).
    device: where to compute (default: the encoder's device); features come back there.
    amp: bf16 autocast; default on CUDA only. workers: DataLoader worker processes.
    """
    device = encoder_device(encoder) if device is None else torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    if isinstance(data, ImageFolder):
        data = EvalDataset(data, encoder.img_size, crop_pct=crop_pct)
    if isinstance(data, DecodedImages):
        size = data.images.shape[-1]
        batches = ((data.images[i:i + batch_size], data.labels[i:i + batch_size])
                   for i in range(0, len(data), batch_size))
        skipped = list(data.skipped)
    else:
        size = data.transform.size
        skipped = []
        batches = _folder_batches(_loader(data, batch_size, workers, device.type == "cuda"),
                                  skipped)
    if size != encoder.img_size:
        raise ValueError(f"images are {size} px but the encoder expects {encoder.img_size} px")

    n = len(data)
    is_vit = isinstance(encoder, VisionTransformer)
    channels = backbone_channels(encoder)
    patch_mean = torch.empty((n, channels), dtype=torch.float32, device=device)
    cls = torch.empty((n, channels), dtype=torch.float32, device=device) if is_vit else None
    labels = torch.empty((n,), dtype=torch.int64, device=device)
    bar = _Progress("features", n) if progress else None
    was_training = encoder.training
    encoder.eval()
    started, done = time.perf_counter(), 0
    try:
        for images, batch_labels in batches:
            images = normalize_images(images.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                output = encoder(images)
            end = done + len(images)
            if is_vit:
                cls[done:end] = output[:, 0].float()
                patch_mean[done:end] = output[:, 1:].float().mean(dim=1)
            else:
                patch_mean[done:end] = output.float().mean(dim=(2, 3))
            labels[done:end] = batch_labels.to(device, non_blocking=True)
            done = end
            if bar:
                bar.update(done)
    finally:
        encoder.train(was_training)
        if bar:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Features(patch_mean, cls, labels, skipped, time.perf_counter() - started)


def _folder_batches(loader: DataLoader, skipped: list[str]):
    for images, labels, _, batch_skipped in loader:
        skipped += batch_skipped
        yield images, labels


class _Progress:
    """One line on stderr: what, done/total images, img/s; redrawn in place on a terminal."""

    def __init__(self, what: str, total: int, stream=None):
        self.what, self.total = what, total
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.5 if self.interactive else 10.0  # a log file gets a line every 10 s
        self.started = self.last = time.perf_counter()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.last >= self.every or done >= self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        width = 24
        filled = round(width * self.done / max(1, self.total))
        line = (f"{self.what} [{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} "
                f"images | {rate:.0f} img/s")
        self.stream.write(("\r" + line + "\033[K") if self.interactive else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


__all__ = [
    "DecodedImages",
    "EvalDataset",
    "EvalTransform",
    "Features",
    "decode_images",
    "decoded_nbytes",
    "extract_features",
    "normalize_images",
    "subsample_indices",
]
