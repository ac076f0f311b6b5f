"""Linear probe on frozen, precomputed features (the MAE / SimMIM linear-probing head, without LARS).

Model: BatchNorm1d(D, affine=False) -> Linear(D, C) (weight N(0, 0.01²), bias 0). The BatchNorm
normalises each feature channel with batch statistics while training and its running statistics
at test time, so one learning rate suits features of any scale.
Training: cross-entropy, SGD with momentum 0.9, weight decay 0, `epochs` passes over the shuffled
training features in batches of `batch_size` (drop_last, as MAE), a linear warm-up of
`warmup_epochs` and then a cosine decay of the lr to 0, per step.

The features are computed once, without augmentation (the encoder is frozen, so this is the same
classifier family as the augmented protocol; only the data augmentation of the head is missing —
numbers are comparable between our checkpoints, and typically a little below a full augmented
linear evaluation). Everything runs on the features' device; a 10k × 384 run of 100 epochs takes
a few seconds on a CPU.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_EPOCHS = 100
DEFAULT_BATCH_SIZE = 256
DEFAULT_LR = 0.1          # for BatchNorm-ed features at batch 256; scaled linearly with the batch
DEFAULT_WARMUP_EPOCHS = 5


@dataclass
class LinearProbeResult:
    top1: float                 # val accuracy, fraction in [0, 1]
    top5: float
    train_top1: float           # accuracy on the training features (eval-mode BN)
    final_loss: float           # mean training loss over the last epoch
    epochs: int
    steps: int
    lr: float                   # peak lr actually used
    batch_size: int
    seconds: float
    classifier: nn.Module       # the trained BN + Linear, in eval mode

    def summary(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "train_top1": self.train_top1,
                "final_loss": self.final_loss, "epochs": self.epochs, "steps": self.steps,
                "lr": self.lr, "batch_size": self.batch_size, "seconds": self.seconds}


def linear_classifier(dim: int, num_classes: int) -> nn.Sequential:
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), head)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _accuracy(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor,
              num_classes: int, batch: int = 4096) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    hits1 = hits5 = 0
    width = min(5, num_classes)
    for start in range(0, len(features), batch):
        logits = classifier(features[start:start + batch])
        top = logits.topk(width, dim=1).indices
        target = labels[start:start + batch].view(-1, 1)
        hits1 += (top[:, :1] == target).sum().item()
        hits5 += (top == target).any(dim=1).sum().item()
    return hits1 / len(labels), hits5 / len(labels)


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device):
    """One intra-op thread for the probe's tiny CPU steps (a 256×D×C matmul): extra threads cost
    more in synchronisation than they save — 90× more on a loaded 2-core machine (measured)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor,
                 val_features: torch.Tensor, val_labels: torch.Tensor, num_classes: int,
                 epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE,
                 lr: float | None = None, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_epochs: int = DEFAULT_WARMUP_EPOCHS, seed: int = 0,
                 progress: bool = False) -> LinearProbeResult:
    """Train BN + Linear on (train_features, train_labels); top-1/top-5 on the val features.

    Features (N, D) float on one device (the probe runs there); labels int in [0, num_classes).
    lr: peak learning rate; default DEFAULT_LR × batch_size / 256. Deterministic for a seed on
    a CPU (shuffling uses its own generator; the global RNG is untouched).
    """
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    if train_features.ndim != 2 or val_features.ndim != 2:
        raise ValueError("features must be (N, D)")
    if train_features.shape[1] != val_features.shape[1]:
        raise ValueError("train and val features have different widths")
    device = train_features.device
    train_x = train_features.float()
    val_x = val_features.to(device).float()
    train_y = train_labels.to(device, torch.int64)
    val_y = val_labels.to(device, torch.int64)
    n = len(train_x)
    if n < 2:
        raise ValueError("the linear probe needs at least 2 training images")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total_steps = epochs * steps_per_epoch
    warmup = min(warmup_epochs * steps_per_epoch, total_steps // 2)
    peak_lr = DEFAULT_LR * batch_size / 256 if lr is None else lr

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = linear_classifier(train_x.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=peak_lr, momentum=momentum,
                                weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with _single_cpu_thread(device):
        classifier, last_loss = _train(classifier, optimizer, train_x, train_y, generator, epochs,
                                       batch_size, warmup, peak_lr, progress)
        classifier.eval()
        top1, top5 = _accuracy(classifier, val_x, val_y, num_classes)
        train_top1, _ = _accuracy(classifier, train_x, train_y, num_classes)
    return LinearProbeResult(top1, top5, train_top1, last_loss, epochs, total_steps, peak_lr,
                             batch_size, time.perf_counter() - started, classifier)


def _train(classifier, optimizer, train_x, train_y, generator, epochs, batch_size, warmup,
           peak_lr, progress):
    device, n = train_x.device, len(train_x)
    steps_per_epoch = n // batch_size
    total_steps = epochs * steps_per_epoch
    step, epoch_loss = 0, torch.zeros((), device=device)
    classifier.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        epoch_loss = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, warmup, peak_lr)
            loss = F.cross_entropy(classifier(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            step += 1
        if progress and (epoch + 1) % max(1, epochs // 10) == 0:
            print(f"linear probe epoch {epoch + 1}/{epochs} | loss "
                  f"{epoch_loss.item() / steps_per_epoch:.4f}", file=sys.stderr, flush=True)
    return classifier, epoch_loss.item() / steps_per_epoch


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "LinearProbeResult",
    "linear_classifier",
    "linear_probe",
]
