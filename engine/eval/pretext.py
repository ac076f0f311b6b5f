"""The label-free check of detector pre-training: does the detector find its own pretext targets
on held-out images it never trained on?

UP-DETR's targets are the random query patches of each image (the patches given as queries),
DETReg's and Pair DETR's the image's selective-search proposals. A method that trains a detector
offers `detections(batch, ctx)` (engine/methods/updetr.py, detreg.py, pairdetr.py), which returns,
for one loader batch, the predictions and the pretext targets of that batch:

    pred_boxes (B, Q, 4) x1 y1 x2 y2 normalised to [0, 1]; scores (B, Q) foreground probability;
    target_boxes (B, T, 4) x1 y1 x2 y2 normalised; num_targets (B,) the valid leading targets.

Metrics (class-agnostic, every image of the subset pooled):
    AP50, AP75   average precision at IoU 0.5 / 0.75: all predictions sorted by score, each a true
                 positive when its best still-unmatched target of the same image has IoU >= the
                 threshold (greedy, highest score first, as COCO/VOC), the all-point interpolated
                 area under precision(recall) (VOC 2010+);
    AR@k         recall at IoU 0.5 of the top-k predictions of each image by score (k = 1, 10,
                 100 or Q), the fraction of targets covered by any of them;
    mean best IoU  per target, the highest IoU of any prediction, averaged;
    held-out loss  the method's own training loss (and its logged terms) on the same batches,
                 computed in eval mode without gradient: the pretext objective on unseen images.
A random-init detector gives the floor (scores and boxes from an untrained network); the check
is the same numbers after training (bench/results/cpu-detector-pretext/).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch

from engine.models.box_ops import box_iou

RECALL_AT = (1, 10, 100)


@dataclass
class PretextScores:
    ap50: float
    ap75: float
    recall: dict[int, float]
    mean_best_iou: float
    images: int
    targets: int
    predictions_per_image: int
    heldout_loss: dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {"AP50": self.ap50, "AP75": self.ap75,
                **{f"AR@{k}": v for k, v in self.recall.items()},
                "mean_best_iou": self.mean_best_iou, "images": self.images,
                "targets": self.targets, "predictions_per_image": self.predictions_per_image,
                "heldout_loss": self.heldout_loss}


def average_precision(scores: list[torch.Tensor], ious: list[torch.Tensor], threshold: float,
                      num_targets: int) -> float:
    """All-point interpolated AP over images: scores[i] (Q_i,), ious[i] (Q_i, T_i) of image i."""
    if num_targets == 0:
        return float("nan")
    flags, all_scores = [], []
    for score, iou in zip(scores, ious):
        order = torch.argsort(score, descending=True, stable=True)
        taken = torch.zeros(iou.shape[1], dtype=torch.bool)
        hit = torch.zeros(len(order), dtype=torch.bool)
        for rank, q in enumerate(order.tolist()):
            if iou.shape[1] == 0:
                break
            candidates = torch.where(taken, torch.full_like(iou[q], -1.0), iou[q])
            best = int(torch.argmax(candidates))
            if float(candidates[best]) >= threshold:
                taken[best] = True
                hit[rank] = True
        flags.append(hit)
        all_scores.append(score[order])
    scores_cat, flags_cat = torch.cat(all_scores), torch.cat(flags)
    order = torch.argsort(scores_cat, descending=True, stable=True)
    tp = flags_cat[order].double().cumsum(0)
    fp = (~flags_cat[order]).double().cumsum(0)
    recall = tp / num_targets
    precision = tp / (tp + fp).clamp(min=1)
    # the precision envelope (monotone from the right), integrated over recall steps
    envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    steps = torch.diff(torch.cat([torch.zeros(1, dtype=recall.dtype), recall]))
    return float((steps * envelope).sum())


def score_detections(chunks: list[dict]) -> PretextScores:
    """The metrics from the `detections` dicts of every evaluated batch."""
    scores, ious, best = [], [], []
    recall_hits = {k: 0 for k in RECALL_AT}
    targets = images = 0
    queries = 0
    for chunk in chunks:
        pred = chunk["pred_boxes"].detach().double().cpu()
        score = chunk["scores"].detach().double().cpu()
        target = chunk["target_boxes"].detach().double().cpu()
        counts = chunk["num_targets"].detach().cpu().tolist()
        queries = pred.shape[1]
        for b, count in enumerate(counts):
            images += 1
            iou = box_iou(pred[b], target[b, :count]) if count else torch.zeros(len(pred[b]), 0,
                                                                                 dtype=pred.dtype)
            scores.append(score[b])
            ious.append(iou)
            targets += count
            if count:
                best.append(iou.max(dim=0).values)
                order = torch.argsort(score[b], descending=True, stable=True)
                for k in RECALL_AT:
                    top = iou[order[:k]]
                    recall_hits[k] += int((top.max(dim=0).values >= 0.5).sum())
    recall = {k: (recall_hits[k] / targets if targets else float("nan")) for k in RECALL_AT}
    return PretextScores(
        ap50=average_precision(scores, ious, 0.5, targets),
        ap75=average_precision(scores, ious, 0.75, targets),
        recall=recall,
        mean_best_iou=float(torch.cat(best).mean()) if best else float("nan"),
        images=images, targets=targets, predictions_per_image=queries)


@torch.no_grad()
def evaluate_pretext(method, loader, device: torch.device, max_images: int, seed: int,
                     progress: bool = False) -> PretextScores:
    """Run `method.detections` over the first `max_images` images of `loader` (a loader built
    with the method's views and a fixed seed), the method in eval mode; returns the metrics."""
    from engine.fused import choose_kernels
    from engine.methods.base import StepContext

    if not hasattr(method, "detections"):
        raise ValueError(f"method {method.name} trains no detector: the pretext check applies "
                         f"to updetr, detreg and pairdetr")
    was_training = method.training
    method.eval()
    chunks, seen, losses = [], 0, {}
    backends = dict(choose_kernels(device.type == "cuda", device).backend)
    try:
        batches = loader.epoch_batches(0) if hasattr(loader, "epoch_batches") else loader
        for index, batch in enumerate(batches):
            ctx = StepContext(step=index, device=device, seed=seed, backends=backends)
            out = method.detections(batch, ctx)
            loss, figures = method(batch, ctx)          # the pretext loss on this batch
            for name, value in {"loss": loss, **figures}.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    losses.setdefault(name, []).append(float(value))
            keep = min(max_images - seen, out["pred_boxes"].shape[0])
            chunks.append({k: v[:keep] for k, v in out.items()})
            seen += keep
            if progress:
                print(f"\rpretext: {seen}/{max_images} images", end="", flush=True,
                      file=sys.stderr)
            if seen >= max_images:
                break
    finally:
        method.train(was_training)
    if progress:
        print(file=sys.stderr)
    scores = score_detections(chunks)
    scores.heldout_loss = {name: sum(v) / len(v) for name, v in losses.items()}
    return scores


__all__ = ["PretextScores", "average_precision", "evaluate_pretext", "score_detections"]
