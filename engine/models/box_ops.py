"""Box utilities for the DETR family (DETR / UP-DETR / Deformable DETR / DETReg), without torchvision.

Boxes are either `cxcywh` (centre x, centre y, width, height; DETR's prediction and target format,
normalised by the image size) or `xyxy` (x0, y0, x1, y1). Every function accepts any leading batch
dimensions; the pairwise ones broadcast them, so a whole padded batch is one call:
`generalized_box_iou(a (B, N, 4), b (B, M, 4)) -> (B, N, M)`.

Semantics are torchvision's / DETR's `util/box_ops.py`, with one change so that degenerate boxes
never produce NaN (a zero-area target, a prediction whose width underflowed to 0, padded rows of a
padded batch):

    iou  = inter / max(union, EPS)
    giou = iou - (enclose - union) / max(enclose, EPS)

with EPS = 1e-7 (in the boxes' dtype; squared normalised units). A real box of one pixel at 600 px
has area 2.8e-6 > EPS, so the clamp never touches a union or enclosing area of real boxes and the
value equals torchvision's there; when it does bite, both numerators are 0 (no overlap and nothing
outside the union), so the result is 0 instead of 0/0: IoU 0 and GIoU 0 for two identical points,
and the gradient through the clamp is 0 rather than NaN. (DETR itself asserts `x1 >= x0` on the host,
which is a device sync; we do not check. Boxes from `box_cxcywh_to_xyxy` of a non-negative width
and height are always valid; an inverted box gives a finite, meaningless value.)
"""
from __future__ import annotations

import torch

EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size -> corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> centre/size."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...) area (x1 - x0)(y1 - y0), as torchvision (not clamped)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_inter_union(boxes1: torch.Tensor, boxes2: torch.Tensor):
    area1 = box_area(boxes1)[..., :, None]                       # (..., N, 1)
    area2 = box_area(boxes2)[..., None, :]                       # (..., 1, M)
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area1 + area2 - inter


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (..., N, 4), (..., M, 4) -> (..., N, M); 0 where the union is
    empty (see the module docstring for the clamp)."""
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    return inter / union.clamp(min=EPS)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes: (..., N, 4), (..., M, 4)
    -> (..., N, M), in [-1, 1]; NaN-free for degenerate boxes (module docstring)."""
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    iou = inter / union.clamp(min=EPS)
    lt = torch.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = wh[..., 0] * wh[..., 1]
    return iou - (enclose - union) / enclose.clamp(min=EPS)


def elementwise_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of matched pairs: (..., 4), (..., 4) -> (...). Equals the diagonal of
    `generalized_box_iou` (what DETR's loss takes) without building the N x N matrix."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / union.clamp(min=EPS)
    lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = wh[..., 0] * wh[..., 1]
    return iou - (enclose - union) / enclose.clamp(min=EPS)


__all__ = ["EPS", "box_area", "box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh",
           "elementwise_generalized_box_iou", "generalized_box_iou"]
