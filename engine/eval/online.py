"""The online kNN monitor: kNN top-1 of the encoder being trained, every N steps (solo-learn style).

    monitor = OnlineKnn(train_dir, val_dir, img_size=cfg.img_size, device=device)
    ...
    if step % eval_every == 0:
        record.update(monitor.evaluate(model.encoder))   # {"knn_top1": 0.61, ...}

Both folders are scanned (and checked: class layout, same classes) when the monitor is built, so
a bad `--eval-data` fails before training starts. The images are decoded once, at the first
evaluation, with the deterministic eval transform, and kept as uint8 tensors:
  * on the device when both sets fit in `device_cache_bytes` (CIFAR-10 train+test: 184 MB;
    Imagenette-128 train+val: 660 MB),
  * else in host memory when they fit in `host_cache_bytes` (copied per batch),
  * else not cached: each evaluation decodes again through the DataLoader (ImageNet-sized sets).
An evaluation then costs two encoder passes plus the kNN, with no JPEG decoding. The encoder is
switched to eval mode for the call and back afterwards; no gradient is recorded.
Distributed runs: call it on rank 0 only (the other ranks wait at the next collective) or give
each rank the same call — it does not communicate.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from engine.eval.features import (
    DecodedImages,
    EvalDataset,
    decode_images,
    decoded_nbytes,
    extract_features,
    subsample_indices,
)
from engine.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_classify
from pipelines.datasets import DataError, ImageFolder

DEVICE_CACHE_BYTES = 2 * 2 ** 30
HOST_CACHE_BYTES = 16 * 2 ** 30


def labelled_folders(train_dir: str | Path, val_dir: str | Path) -> tuple[ImageFolder,
                                                                          ImageFolder]:
    """Both folders scanned and checked for an evaluation: class layout, same class names."""
    train, val = ImageFolder(str(train_dir)), ImageFolder(str(val_dir))
    for folder, what in ((train, "training"), (val, "validation")):
        if not folder.has_labels:
            raise DataError(f"the {what} folder {folder.root} has no class folders: evaluation "
                            f"needs labels, laid out as class/img.jpg")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = [f"only in train: {', '.join(only_train[:5])}" if only_train else "",
                 f"only in val: {', '.join(only_val[:5])}" if only_val else ""]
        raise DataError(f"the training and validation folders have different classes "
                        f"({len(train.classes)} vs {len(val.classes)}; "
                        f"{'; '.join(p for p in parts if p)}): point both at the same label set")
    return train, val


class OnlineKnn:
    """kNN accuracy of an encoder on a fixed labelled train/val pair (module docstring).

    k, temperature: as `knn_classify`. kinds: feature kinds reported ("patch", "cls").
    max_train / max_val: deterministic random subsets (seeded) to bound the cost.
    """

    def __init__(self, train_dir: str | Path, val_dir: str | Path, img_size: int,
                 device: torch.device | str, k: tuple[int, ...] = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, kinds: tuple[str, ...] = ("patch", "cls"),
                 batch_size: int = 256, workers: int = 4, max_train: int | None = None,
                 max_val: int | None = None, device_cache_bytes: int = DEVICE_CACHE_BYTES,
                 host_cache_bytes: int = HOST_CACHE_BYTES):
        self.device = torch.device(device)
        self.k, self.temperature, self.kinds = tuple(k), temperature, tuple(kinds)
        self.batch_size, self.workers = batch_size, workers
        train, val = labelled_folders(train_dir, val_dir)
        self.num_classes = len(train.classes)
        self.train = EvalDataset(train, img_size, subsample_indices(len(train), max_train))
        self.val = EvalDataset(val, img_size, subsample_indices(len(val), max_val))
        total = decoded_nbytes(len(self.train) + len(self.val), img_size)
        if total <= device_cache_bytes:
            self.cache_device: torch.device | None = self.device
        elif total <= host_cache_bytes:
            self.cache_device = torch.device("cpu")
        else:
            self.cache_device = None
        self._cached: tuple[DecodedImages, DecodedImages] | None = None

    def describe(self) -> str:
        where = ("not cached (decoded per evaluation)" if self.cache_device is None
                 else f"cached as uint8 on {self.cache_device}")
        return (f"kNN monitor: {len(self.train)} train / {len(self.val)} val images, "
                f"{self.num_classes} classes, k={','.join(map(str, self.k))}; images {where}")

    def prepare(self) -> None:
        """Decode both sets into the cache now (otherwise done by the first evaluate)."""
        if self._cached is None and self.cache_device is not None:
            self._cached = tuple(decode_images(data, self.cache_device, self.batch_size,
                                               self.workers) for data in (self.train, self.val))

    def evaluate(self, encoder: torch.nn.Module) -> dict[str, float]:
        """Metrics of the encoder as it is now, accuracies as fractions in [0, 1]:
        "knn_top1" (the headline: patch-mean features, k=200 if monitored, else the largest k),
        "knn_top1_<kind>@<k>" for every feature kind and k, and "knn_seconds"."""
        started = time.perf_counter()
        self.prepare()
        sources = self._cached if self._cached is not None else (self.train, self.val)
        train_features, val_features = (
            extract_features(encoder, data, self.device, self.batch_size, self.workers)
            for data in sources)
        metrics: dict[str, float] = {}
        for kind in (k for k in self.kinds if k in train_features.kinds):  # ResNet: no cls
            result = knn_classify(train_features.kind(kind), train_features.labels,
                                  val_features.kind(kind), self.num_classes, self.k,
                                  self.temperature, query_labels=val_features.labels)
            for value in self.k:
                metrics[f"knn_top1_{kind}@{value}"] = result.top1[value]
        headline_kind = "patch" if "patch" in self.kinds else self.kinds[0]
        if f"knn_top1_{headline_kind}@{max(self.k)}" not in metrics:
            headline_kind = "patch"
        headline_k = 200 if 200 in self.k else max(self.k)
        metrics = {"knn_top1": metrics[f"knn_top1_{headline_kind}@{headline_k}"], **metrics}
        metrics["knn_seconds"] = time.perf_counter() - started
        return metrics


__all__ = ["OnlineKnn", "labelled_folders"]
