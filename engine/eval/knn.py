"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

For each query q (DINO's `knn_classifier`, eval_knn.py):
  1. L2-normalise train and query features;
  2. s_j = cos(q, x_j) for every training feature x_j; keep the k largest (the k nearest);
  3. each neighbour votes for its label with weight exp(s_j / T) (T = 0.07);
  4. class score = sum of the weights of its voters; the prediction is the best-scoring class,
     top-5 the five best (DINO counts top-5 over min(5, k) ranked classes).
Ties between class scores are broken towards the lower class index (a stable sort), so results
are deterministic and a brute-force re-implementation can agree exactly.

Memory: the queries are processed in chunks, so only a (chunk, N_train) similarity block exists at
a time (the default chunk keeps it under ~256 MiB); votes are accumulated with scatter_add into
(chunk, C) scores (no (chunk, k, C) one-hot as in DINO's code — same sums). A k larger than the
training set is clamped to N_train (every training image votes); the result says so in `notes`.
All work happens on the device of `train_features`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEFAULT_K = (20, 200)
DEFAULT_TEMPERATURE = 0.07
SIMILARITY_BLOCK_BYTES = 256 * 2 ** 20


@dataclass
class KnnResult:
    """ranked[k]: int64 (N_query, min(5, C)) classes by decreasing score (column 0 = prediction);
    top1/top5[k]: accuracy as a fraction in [0, 1] (None without query labels). k_used[k]: k after clamping."""
    k: tuple[int, ...]
    k_used: dict[int, int]
    ranked: dict[int, torch.Tensor]
    top1: dict[int, float] | None = None
    top5: dict[int, float] | None = None
    notes: list[str] = field(default_factory=list)

    def predictions(self, k: int) -> torch.Tensor:
        return self.ranked[k][:, 0]


def _as_float(features: torch.Tensor, name: str) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {features.dtype}")
    # float64 stays float64 (exact tests); half types are upcast so the weights cannot overflow
    return features if features.dtype == torch.float64 else features.float()


def default_chunk(num_train: int, element_bytes: int = 4,
                  block_bytes: int = SIMILARITY_BLOCK_BYTES) -> int:
    """Queries per chunk so that a (chunk, num_train) similarity block stays under block_bytes."""
    return max(1, block_bytes // max(1, num_train * element_bytes))


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 query_features: torch.Tensor, num_classes: int,
                 k: int | tuple[int, ...] | list[int] = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, chunk: int | None = None,
                 query_labels: torch.Tensor | None = None) -> KnnResult:
    """Weighted kNN predictions of `query_features` (module docstring); accuracies when
    `query_labels` are given.

    train_features (N, D), train_labels int (N,) in [0, num_classes), query_features (M, D) with
    the same D; k: one value or several (all served by one top-k search); chunk: queries per block
    (default from `default_chunk`).
    """
    ks = (k,) if isinstance(k, int) else tuple(int(v) for v in k)
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be at least 1, got {ks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    train = _as_float(train_features, "train_features")
    device = train.device
    query = _as_float(query_features, "query_features").to(device, train.dtype)
    if query.shape[1] != train.shape[1]:
        raise ValueError(f"train features have {train.shape[1]} channels, queries "
                         f"{query.shape[1]}")
    train_labels = train_labels.to(device, torch.int64)
    if train_labels.shape != (len(train),):
        raise ValueError(f"train_labels must be ({len(train)},), got {tuple(train_labels.shape)}")
    if len(train) == 0:
        raise ValueError("the training set is empty")
    if len(train_labels) and (int(train_labels.min()) < 0
                              or int(train_labels.max()) >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes})")

    if query_labels is not None and len(query_labels) != len(query):
        raise ValueError(f"{len(query)} queries but {len(query_labels)} query labels")

    num_train = len(train)
    k_used = {value: min(value, num_train) for value in ks}
    notes = [f"k={value} is larger than the training set: clamped to {num_train} (every "
             f"training image votes)" for value in ks if value > num_train]
    k_max = max(k_used.values())
    ranked_width = min(5, num_classes)
    chunk = chunk or default_chunk(num_train, train.element_size())

    train = F.normalize(train, dim=1)
    ranked: dict[int, list[torch.Tensor]] = {value: [] for value in ks}
    for start in range(0, len(query), chunk):
        block = F.normalize(query[start:start + chunk], dim=1)
        similarity = block @ train.T                                     # (chunk, N_train)
        top_sim, top_idx = similarity.topk(k_max, dim=1, largest=True, sorted=True)
        del similarity
        neighbour_labels = train_labels[top_idx]                         # (chunk, k_max)
        weights = top_sim.div(temperature).exp()
        for value in ks:
            kk = k_used[value]
            scores = torch.zeros(len(block), num_classes, dtype=weights.dtype, device=device)
            scores.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices
            ranked[value].append(order[:, :ranked_width])
    result = KnnResult(ks, k_used,
                       {value: (torch.cat(parts) if parts else
                                torch.empty(0, ranked_width, dtype=torch.int64, device=device))
                        for value, parts in ranked.items()},
                       notes=notes)
    if query_labels is not None:
        result.top1, result.top5 = {}, {}
        query_labels = query_labels.to(device, torch.int64).view(-1, 1)
        for value in ks:
            ranks = result.ranked[value]
            width = min(5, k_used[value], num_classes)
            result.top1[value] = _fraction(ranks[:, :1] == query_labels)
            result.top5[value] = _fraction(ranks[:, :width] == query_labels)
    return result


def _fraction(hits: torch.Tensor) -> float:
    if len(hits) == 0:
        return float("nan")
    return hits.any(dim=1).double().mean().item()


__all__ = ["DEFAULT_K", "DEFAULT_TEMPERATURE", "KnnResult", "default_chunk", "knn_classify"]
