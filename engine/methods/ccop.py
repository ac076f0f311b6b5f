"""CCOP: contrastive learning of object parts under a curriculum of hard positives.

Paper: Yang, Huang, Crowley, "Contrastive Object-level Pre-training with Spatial Noise
Curriculum Learning", arXiv 2111.13651 (2021). Official code: ChenhongyiYang/CCOP @ 956b952a
(`openselfsup/models/ccop.py`, `openselfsup/models/utils/pooler.py`, `openselfsup/models/utils/
d2_fpn.py`, `openselfsup/datasets/contrastive_boxes.py`, `configs/selfsup/ccop/r50_d2.py`); the
loss as spec/OFFICIAL.md §8 reads it line by line.

The method. A query network (backbone + feature pyramid P2..P5 with 256 channels + two necks) and
its momentum copy (m = 0.999 constant, updated before the key forward; the key backbone and pyramid
run under shuffle-BN). Each image comes with region proposals (selective search, cached by
`python -m engine.proposals`), the same box p seen in both views; box p is KEPT when more than 60%
of it is inside each view and its area in each view is above 144 px (at 224; below).
  image branch  img = l2n(Linear-Dropout(0.1)-ReLU-Linear(GAP(C5)))          2048-2048-128
  RoI branch    roi = l2n(Linear-Dropout(0.1)-ReLU-Linear(flatten(RoIAlignV2 7x7(P_level(box)))))
                12544-2048-128; level by sqrt(area): <= 48 -> P2, <= 96 -> P3, <= 192 -> P4,
                <= 224 -> P5 (larger -> P2, unreachable for boxes clipped to the view)
Dropout is active in the key necks too (train mode), as released. With q = view 1 (query) and
k = view 2 (key), for every kept box b (query box q_b, key box k_b), at iteration t of T
(r = t/T, t counted from 1):
  curriculum   iou_thr = 0.8 -> 0.4, mag_xy = 0.15 -> 0.6, mag_wh = 0.35 -> 1.4, linear in r
  jitter       10 copies of k_b: centre += (w, h)·(U − ½)·mag_xy, size ·= exp((U − ½)·mag_wh)
              (U uniform on [0, 1)),
               clamped to the view, + k_b itself (index 10); a copy is invalid if IoU(k_b, copy) <
               iou_thr
  positive     pos_b = the copy (key RoI branch) with the LOWEST cosine to roi_q(b), invalid copies
               pushed by +5: the hardest valid positive
  L_img    = InfoNCE(img_q, img_k, image queue),  τ = 0.2
  L_roi    = InfoNCE(roi_q(b), pos_b, RoI queue) over the kept boxes,  τ = 0.2
  L_intra  = mean over (image, i, j) with IoU(k_i, k_j) < 0.05 of
             relu(roi_q(i)·roi0_k(j) − roi_q(j)·roi0_k(j) + 0.4),   roi0_k = key RoI embedding
             of the ORIGINAL key boxes (a second pass of the key neck: its own dropout draw)
  L = L_img + L_roi + L_intra; after the step img_k enters the image queue and the mined
  positives pos_b (a variable number) the RoI queue, all-gathered over ranks.
Both InfoNCE terms run through kernels/queue_infonce.py (the RoI term with reduction="none" and a
masked mean over the kept boxes); the pooling through kernels/roi_align.py (aligned=True,
sampling_ratio=0: detectron2's ROIAlignV2, adaptive sampling).

Fixed shapes, no host sync. Every image carries P = min(max_boxes, loader's P) box slots and a
keep mask (B, P): nothing is ever compacted. The multi-level pooling runs roi_align once per level
on ALL B·P (or B·P·11) boxes, a box not assigned to that level replaced by the empty box
(0, 0, 0, 0), which pools to exact zeros (aligned, adaptive: no samples), so the four results sum
to the assigned level's pooling. L_roi and L_intra are masked means (sum over the kept rows /
max(count, 1)). The RoI queue's write (`enqueue_kept`) is computed per queue SLOT on the
device: slot s receives the kept key whose rank among the kept keys is the last one landing on s
(searchsorted over the cumulative keep count), so the write is a fixed-size gather + where (one
pass over the queue), no collisions, no data-dependent shape, and the pointer advances by the
kept count (a device tensor). Every rank all-gathers its B·P slots and keep mask (fixed sizes).

Other input sizes and backbones:
  * the thresholds measured in pixels at 224 scale with the view: the box-area floor 144 by
    (S/224)^2, the level thresholds (48, 96, 192, 224) by S/224 (at 224 the released values);
  * ResNet: detectron2's FPN on C2..C5 (engine/models/fpn.py; strides 4..32, or 1..8 with the
    CIFAR stem); ViT: ViTDet's simple feature pyramid from the last token map (deconv x4, x2,
    identity, max-pool; strides p/4 .. 2p), channel LayerNorm as ViTDet; the image branch pools
    the ViT's last map.

Departures from the official code (each on purpose):
  * a batch with no valid intra pair gives L_intra = 0 (the release: the mean of an empty tensor,
    NaN, which poisons the step); a batch with no kept box gives L_roi = 0 and enqueues nothing
    (the release: NaN, cross-entropy over zero rows);
  * the RoI queue write WRAPS around the end of the queue (the release truncates at the end: the
    overflow of that step is dropped and the pointer returns to 0); both queues are enqueued once
    per optimiser step, after every micro-batch (identical when accum = 1), and the image queue
    takes any length (the release asserts length % batch == 0);
  * the curriculum clamps r at 1 (the release extrapolates past T); T is `curriculum_steps`, or
    the run's --steps when that is 0 and --steps is set, else the paper's 800 × 462 (the method
    does not see the loader's epoch length); t is the optimiser step + 1 (the release: the
    forward count, the same with accum = 1);
  * the jitter draws come from a generator seeded by (seed, rank, step, micro-batch) (the release:
    the global RNG), so a resumed run draws the same jitters; the dropout masks use the global RNG;
  * shuffle-BN draws its permutation from a seeded generator (engine/models/moco.py); the key
    pyramid maps are un-shuffled by all-gathering them, as the release does;
  * the loss is not symmetrised and view 1 is always the query (the release swaps the two views of
    an image at random in the loader: the same distribution);
  * the loader (not this file) gives the boxes: no retry of the crop until a box survives (the
    release retries up to 10 crops for >= 1 box), no clamp to S − 1 (the release clamps the kept
    boxes to [0, 223]); a batch of images without a kept box simply has zero RoI terms here;
  * the in-model kornia colour augmentation and the 0..255 pixel normalisation of the release
    are the loaders' usual augmentation (see the preset).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import Method, StepContext, ViewSpec
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     describe_backbone, pooled)
from engine.models.fpn import build_pyramid, pyramid_flops, pyramid_levels
from engine.models.heads import head_flops
from engine.models.moco import KeyQueue, gather_keys, shuffle_generator, shuffled_forward
from kernels import queue_infonce
from pipelines.datasets import DataError

PAPER_CURRICULUM_STEPS = 800 * 462       # r50_d2.py: total_step = 800 epochs x 462 iterations
LEVEL_SIZES_224 = (48.0, 96.0, 192.0, 224.0)   # sqrt(area) upper bounds of P2..P5 at 224 px
INVALID_PUSH = 5.0                       # added to an invalid jitter's cosine (never selected)
PROPOSALS = 100                          # boxes per image the loader is asked for (max_box_num)


@dataclass
class CCOPHyper:
    queue_length: int = 65536            # image queue and RoI queue (img/roi_queue_len)
    dim: int = 128                       # embedding width of both necks
    hidden: int = 2048                   # hidden width of both necks
    temperature: float = 0.2             # img_temperature = roi_temperature
    dropout: float = 0.1                 # after each neck's first Linear (q and k necks)
    fpn_channels: int = 256
    fpn_norm: str = "auto"               # auto: "bn" on a ResNet (r50_d2.py), "ln" on a ViT
    pooler_size: int = 7                 # RoIAlignV2 output side
    max_boxes: int = 100                 # box slots per image used (the loader gives 100)
    jitters: int = 10                    # n_jitter (the original box is added as one more)
    iou_thr: tuple = (0.8, 0.4)          # curriculum start, end
    jitter_xy: tuple = (0.15, 0.6)       # jit_mag[0:2]
    jitter_wh: tuple = (0.35, 1.4)       # jit_mag[2:4]
    curriculum_steps: int = 0            # T; 0: the run's --steps if set, else 800 x 462
    margin: float = 0.4                  # intra-image triplet margin
    intra_iou: float = 0.05              # key-box pairs below this IoU are intra negatives
    visible_thr: float = 0.6             # part_thr: keep a box if more than this is inside
    min_area: float = 144.0              # area_thr at 224 px (scaled by (S/224)^2)

    def validate(self) -> None:
        if min(self.queue_length, self.dim, self.hidden, self.fpn_channels, self.pooler_size,
               self.max_boxes) < 1:
            raise ValueError("queue_length, dim, hidden, fpn_channels, pooler_size and "
                             "max_boxes must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.fpn_norm not in ("auto", "bn", "ln", "none", ""):
            raise ValueError(f"fpn_norm must be auto, bn, ln or none, got {self.fpn_norm!r}")
        if self.jitters < 0 or self.curriculum_steps < 0:
            raise ValueError("jitters and curriculum_steps must be >= 0")
        for name in ("iou_thr", "jitter_xy", "jitter_wh"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 0:
                raise ValueError(f"{name} must be two non-negative numbers (start, end), got "
                                 f"{value}")
        if not 0 <= self.visible_thr < 1 or self.min_area < 0 or self.intra_iou <= 0:
            raise ValueError("visible_thr must be in [0, 1), min_area >= 0, intra_iou > 0")


# ---------------------------------------------------------------------------------------- boxes
# Boxes are (..., 4) x1 y1 x2 y2 in view pixels. No function here reads a value on the host.

def box_area(boxes: torch.Tensor) -> torch.Tensor:
    width = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    return width * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of broadcast pairs (..., 4) x (..., 4) -> (...); 0 where both boxes are empty."""
    low = torch.maximum(a[..., :2], b[..., :2])
    high = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return inter / union.clamp(min=1e-12)


def assign_levels(boxes: torch.Tensor, view_size: float) -> torch.Tensor:
    """Pyramid level index 0..3 (P2..P5) of each box by sqrt(area), as CCOP's
    assign_boxes_to_levels_soco: <= 48 -> 0, <= 96 -> 1, <= 192 -> 2, <= 224 -> 3, larger -> 0,
    the thresholds scaled by view_size / 224."""
    size = box_area(boxes).sqrt()
    scale = view_size / 224.0
    level = torch.zeros(size.shape, dtype=torch.int64, device=size.device)
    for index in (3, 2, 1, 0):
        level = torch.where(size <= LEVEL_SIZES_224[index] * scale, index, level)
    return level


def jitter_boxes(boxes: torch.Tensor, uniform: torch.Tensor, mag_xy: float, mag_wh: float,
                 height: float, width: float) -> torch.Tensor:
    """(N, 4) boxes and (N, J, 4) draws of U[0, 1) -> (N, J + 1, 4): J jittered copies (uniform
    [..., 0:2] shift the centre by (w, h)·(u − ½)·mag_xy, [..., 2:4] scale (w, h) by
    exp((u − ½)·mag_wh)), clamped to the view, then the box itself (unclamped), as aug_boxes."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    cx, cy, w, h = (x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1
    t_xy = (uniform[..., 0:2] - 0.5) * mag_xy
    t_wh = (uniform[..., 2:4] - 0.5) * mag_wh
    jx = w[:, None] * t_xy[..., 0] + cx[:, None]
    jy = h[:, None] * t_xy[..., 1] + cy[:, None]
    jw = torch.exp(t_wh[..., 0]) * w[:, None]
    jh = torch.exp(t_wh[..., 1]) * h[:, None]
    jittered = torch.stack([(jx - 0.5 * jw).clamp(0, width), (jy - 0.5 * jh).clamp(0, height),
                            (jx + 0.5 * jw).clamp(0, width), (jy + 0.5 * jh).clamp(0, height)],
                           dim=-1)
    return torch.cat([jittered, boxes[:, None, :]], dim=1)


def jitter_invalid(boxes: torch.Tensor, jittered: torch.Tensor, iou_thr: float) -> torch.Tensor:
    """(N, J + 1) bool: IoU(box, copy) < iou_thr."""
    return box_iou(boxes[:, None, :], jittered) < iou_thr


def hardest_positive(query: torch.Tensor, candidates: torch.Tensor, invalid: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """query (N, D), candidates (N, J + 1, D), invalid (N, J + 1) -> (the candidate of lowest
    cosine among the valid ones (N, D), its index (N,)); invalid ones are pushed by +5."""
    similarity = torch.einsum("nd,njd->nj", query, candidates) + INVALID_PUSH * invalid
    index = similarity.argmin(dim=1)
    chosen = index[:, None, None].expand(-1, 1, candidates.shape[2])
    return torch.gather(candidates, 1, chosen)[:, 0], index


def intra_image_loss(query: torch.Tensor, key: torch.Tensor, key_boxes: torch.Tensor,
                     keep: torch.Tensor, margin: float, max_iou: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """query, key (B, P, D), key_boxes (B, P, 4), keep (B, P) -> (loss, number of pairs).
    X[b, i, j] = q_i·k_j;  T = relu(X − X[b, j, j] + margin)  over pairs of kept boxes whose key
    boxes have IoU < max_iou; the mean over all of them, 0 when there is none."""
    x = torch.einsum("bid,bjd->bij", query.float(), key.float())   # fp32 under autocast too
    positive = torch.diagonal(x, dim1=1, dim2=2)                    # (B, P): q_j·k_j
    triplet = F.relu(x - positive[:, None, :] + margin)
    with torch.no_grad():
        iou = box_iou(key_boxes[:, :, None, :], key_boxes[:, None, :, :])
        pairs = (iou < max_iou) & keep[:, :, None] & keep[:, None, :]
        count = pairs.sum()
    total = torch.where(pairs, triplet, torch.zeros((), dtype=triplet.dtype,
                                                    device=triplet.device)).sum()
    return total / count.clamp(min=1).to(total.dtype), count


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """mean of values[keep], 0 when nothing is kept (no host sync, no NaN)."""
    total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / keep.sum().clamp(min=1).to(values.dtype)


@torch.no_grad()
def enqueue_kept(queue: KeyQueue, keys: torch.Tensor, keep: torch.Tensor,
                 ok: torch.Tensor | None = None) -> None:
    """KeyQueue.enqueue of keys[keep] (in order), wrapping, without compacting on the host: each
    queue slot s, at offset o = (s − ptr) mod L from the pointer, receives the kept key of rank
    o + L·floor((n − 1 − o)/L) when o < n (n kept keys; the last L of them survive, as enqueue
    keeps the last L), found by searchsorted over the running keep count. The pointer advances by
    n. `ok` False (a skipped step): nothing changes."""
    if keys.dim() != 2 or keys.shape[1] != queue.dim or keep.shape != keys.shape[:1]:
        raise ValueError(f"enqueue_kept takes keys (n, {queue.dim}) and keep (n,), got "
                         f"{tuple(keys.shape)} and {tuple(keep.shape)}")
    if keys.shape[0] == 0:
        return
    length = queue.length
    running = torch.cumsum(keep.to(torch.int64), 0)             # kept keys up to each row
    count = running[-1]
    offset = (torch.arange(length, device=queue.ptr.device) - queue.ptr) % length
    written = offset < count
    laps = torch.div(count - 1 - offset, length, rounding_mode="floor").clamp(min=0)
    rank = offset + length * laps
    row = torch.searchsorted(running, rank + 1).clamp(max=keys.shape[0] - 1)
    if ok is not None:
        written = written & ok
        count = count * ok.to(count.dtype)
    new = keys.detach().to(queue.keys.dtype)[row]
    queue.keys.copy_(torch.where(written[:, None], new, queue.keys))
    queue.ptr.copy_((queue.ptr + count) % length)


def roi_features(maps: list[torch.Tensor], strides, boxes: torch.Tensor, image: torch.Tensor,
                 view_size: float, output_size: int, backend: str) -> torch.Tensor:
    """RoIAlignV2 (aligned, adaptive sampling) of boxes (K, 4) of images image (K,) on the level
    assign_levels picks: one roi_align per level over all K boxes, the others made empty (they
    pool to zeros), summed. Returns (K, C, output_size, output_size)."""
    from kernels import roi_align

    levels = assign_levels(boxes, view_size)
    index = image.to(boxes.dtype)[:, None]
    empty = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    out = None
    for level, (feature, stride) in enumerate(zip(maps, strides)):
        rois = torch.cat([index, torch.where((levels == level)[:, None], boxes, empty)], dim=1)
        part = roi_align(feature, rois, output_size, spatial_scale=1.0 / stride,
                         sampling_ratio=0, aligned=True, backend=backend)
        if out is None:
            out = part
        elif torch.is_grad_enabled():
            out = out + part
        else:
            out.add_(part)
    return out


def neck(in_features: int, hidden: int, dim: int, dropout: float) -> nn.Sequential:
    """CCOP's LinearNormNeck (num_mlp 1, norm ''): Linear-Dropout-ReLU-Linear, weights N(0, 0.01)
    and zero biases (init_linear='normal')."""
    layers = nn.Sequential(nn.Linear(in_features, hidden), nn.Dropout(dropout),
                           nn.ReLU(inplace=True), nn.Linear(hidden, dim))
    for module in layers:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
    return layers


def jitter_generator(seed: int, rank: int, step: int, micro: int, device: torch.device
                     ) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((0xCC0B, seed, rank, step, micro)) % (2 ** 63))
    return generator


class CCOP(Method):
    name = "ccop"
    paper = ("Yang, Huang, Crowley, Contrastive Object-level Pre-training with Spatial Noise "
             "Curriculum Learning, arXiv 2111.13651")
    official_code = "ChenhongyiYang/CCOP @ 956b952a"
    views = ViewSpec(proposals=PROPOSALS)
    sync_batchnorm = False     # shuffle-BN; the release's backbone and FPN use per-GPU BN
    Hyper = CCOPHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        norm = {"none": ""}.get(h.fpn_norm, h.fpn_norm)
        self.encoder = build_backbone(cfg)
        self.channels = backbone_channels(self.encoder)
        self.fpn = build_pyramid(self.encoder, h.fpn_channels, norm)
        self.strides = self.fpn.strides
        self.roi_in = h.fpn_channels * h.pooler_size ** 2
        self.img_neck = neck(self.channels, h.hidden, h.dim, h.dropout)
        self.roi_neck = neck(self.roi_in, h.hidden, h.dim, h.dropout)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_fpn = copy.deepcopy(self.fpn).requires_grad_(False)
        self.target_img_neck = copy.deepcopy(self.img_neck).requires_grad_(False)
        self.target_roi_neck = copy.deepcopy(self.roi_neck).requires_grad_(False)
        self.img_queue = KeyQueue(h.queue_length, h.dim)
        self.roi_queue = KeyQueue(h.queue_length, h.dim)
        self._step_keys: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.fpn, self.target_fpn),
                (self.img_neck, self.target_img_neck), (self.roi_neck, self.target_roi_neck)]

    # ------------------------------------------------------------------ pieces
    def curriculum(self, step: int) -> tuple[float, float, float]:
        """(iou_thr, mag_xy, mag_wh) at optimiser step `step` (0-based)."""
        h = self.hyper
        total = h.curriculum_steps or self.cfg.steps or PAPER_CURRICULUM_STEPS
        r = min((step + 1) / total, 1.0)
        return tuple(start + r * (end - start) for start, end in (h.iou_thr, h.jitter_xy,
                                                                   h.jitter_wh))

    def select_boxes(self, batch: dict, height: int, width: int, device: torch.device):
        """(query boxes (B, P, 4), key boxes (B, P, 4), keep (B, P) bool) from the batch's
        proposals: kept when visible > visible_thr and area > min_area·(S/224)² in both views."""
        if "proposals" not in batch or "proposal_visible" not in batch:
            raise DataError("ccop needs region proposals in the batch: run python -m "
                            "engine.proposals --data DIR once (or pass --proposals FILE)")
        proposals = batch["proposals"]
        visible = batch["proposal_visible"]
        if (proposals.dim() != 4 or proposals.shape[1] < 2 or proposals.shape[3] != 4
                or visible.shape != proposals.shape[:3] or proposals.shape[2] < 1):
            raise ValueError(f"ccop: batch['proposals'] must be (B, V >= 2, P >= 1, 4) and "
                             f"batch['proposal_visible'] (B, V, P), got {tuple(proposals.shape)} "
                             f"and {tuple(visible.shape)}")
        boxes = proposals[:, :2, :self.hyper.max_boxes].to(device, torch.float32,
                                                          non_blocking=True)
        visible = visible[:, :2, :self.hyper.max_boxes].to(device, torch.float32,
                                                           non_blocking=True)
        min_area = self.hyper.min_area * height * width / 224.0 ** 2
        keep = ((visible > self.hyper.visible_thr) & (box_area(boxes) > min_area)).all(dim=1)
        return boxes[:, 0], boxes[:, 1], keep

    def _keys(self, images: torch.Tensor):
        top, maps = pyramid_levels(self.target_encoder, self.target_fpn, images)
        return (F.normalize(self.target_img_neck(pooled(top)), dim=1), *maps)

    def compute(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Every embedding, box and mask of one micro-batch (the losses read only these)."""
        h = self.hyper
        view1 = batch["view1"].to(ctx.device, non_blocking=True)
        view2 = batch["view2"].to(ctx.device, non_blocking=True)
        height, width = view1.shape[-2:]
        size = math.sqrt(height * width)
        boxes_q, boxes_k, keep = self.select_boxes(batch, height, width, view1.device)
        batch_size, slots = keep.shape
        rows = batch_size * slots
        image = torch.arange(batch_size, device=view1.device)[:, None].expand(batch_size, slots)
        image = image.reshape(rows)
        backend = ctx.backend("roi_align")

        top_q, maps_q = pyramid_levels(self.encoder, self.fpn, view1)
        img_q = F.normalize(self.img_neck(pooled(top_q)), dim=1)
        pooled_q = roi_features(maps_q, self.strides, boxes_q.reshape(rows, 4), image, size,
                                h.pooler_size, backend)
        roi_q = F.normalize(self.roi_neck(pooled_q.flatten(1)), dim=1)           # (rows, D)
        ctx.mark("online_forward")

        with torch.no_grad():
            img_k, *maps_k = shuffled_forward(self._keys, view2, ctx.rank, ctx.world_size,
                                              shuffle_generator(ctx.seed, ctx.step, ctx.micro))
            iou_thr, mag_xy, mag_wh = self.curriculum(ctx.step)
            flat_k = boxes_k.reshape(rows, 4)
            uniform = torch.rand((rows, h.jitters, 4), device=view1.device,
                                 generator=jitter_generator(ctx.seed, ctx.rank, ctx.step,
                                                            ctx.micro, view1.device))
            jittered = jitter_boxes(flat_k, uniform, mag_xy, mag_wh, height, width)
            invalid = jitter_invalid(flat_k, jittered, iou_thr)                  # (rows, J+1)
            copies = h.jitters + 1
            pooled_k = roi_features(maps_k, self.strides, jittered.reshape(rows * copies, 4),
                                    image[:, None].expand(rows, copies).reshape(-1), size,
                                    h.pooler_size, backend).flatten(1)
            roi_k = F.normalize(self.target_roi_neck(pooled_k), dim=1).view(rows, copies, -1)
            positive, chosen = hardest_positive(roi_q.detach().float(), roi_k.float(), invalid)
            # the original key boxes (copy J, the same RoIAlign) through the key neck again, a
            # second dropout draw, as the release's separate roi_feats_k_ori pass
            original = pooled_k.view(rows, copies, -1)[:, h.jitters]
            roi0_k = F.normalize(self.target_roi_neck(original), dim=1)
        ctx.mark("target_forward")
        return dict(img_q=img_q, img_k=img_k, roi_q=roi_q, roi_k=roi_k, roi0_k=roi0_k,
                    positive=positive, chosen=chosen, invalid=invalid, jittered=jittered,
                    boxes_q=boxes_q, boxes_k=boxes_k, keep=keep)

    def losses(self, out: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        h = self.hyper
        backend = ctx.backend("queue_infonce")
        roi_q = out["roi_q"]
        keep = out["keep"]
        batch_size, slots = keep.shape
        loss_img = queue_infonce(out["img_q"], out["img_k"],
                                 self.img_queue.keys.to(out["img_q"].dtype), h.temperature,
                                 backend=backend)
        rows = queue_infonce(roi_q, out["positive"], self.roi_queue.keys.to(roi_q.dtype),
                             h.temperature, backend=backend, reduction="none")
        loss_roi = masked_mean(rows, keep.reshape(-1))
        loss_intra, pairs = intra_image_loss(roi_q.view(batch_size, slots, -1),
                                             out["roi0_k"].view(batch_size, slots, -1),
                                             out["boxes_k"], keep, h.margin, h.intra_iou)
        return dict(loss_img=loss_img, loss_roi=loss_roi, loss_intra=loss_intra,
                    intra_pairs=pairs)

    # ------------------------------------------------------------------ the contract
    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        out = self.compute(batch, ctx)
        parts = self.losses(out, ctx)
        loss = parts["loss_img"] + parts["loss_roi"] + parts["loss_intra"]
        ctx.mark("loss")
        keep = out["keep"]
        self._step_keys.append((out["img_k"], out["positive"], keep.reshape(-1)))
        figures = {name: parts[name].detach() for name in ("loss_img", "loss_roi", "loss_intra")}
        figures["boxes_per_image"] = keep.sum(dim=1).float().mean()
        return loss, figures

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self._step_keys:
            img_keys = torch.cat([k for k, _, _ in self._step_keys])
            roi_keys = torch.cat([p for _, p, _ in self._step_keys])
            keep = torch.cat([m for _, _, m in self._step_keys])
            self.img_queue.enqueue(gather_keys(img_keys, ctx.world_size), ctx.ok)
            # every rank's B·P slots (a fixed size) and keep mask, in rank order
            enqueue_kept(self.roi_queue, gather_keys(roi_keys, ctx.world_size),
                         gather_keys(keep.to(torch.uint8), ctx.world_size).bool(), ctx.ok)
        self._step_keys = []

    # ------------------------------------------------------------------ bookkeeping
    def data_warnings(self, num_images: int, global_batch: int, total_steps: int) -> list[str]:
        # the RoI queue fills with ~boxes-per-image keys per image: the image-based advice of the
        # base class would be wrong for it
        return [line for line in super().data_warnings(num_images, global_batch, total_steps)
                if not line.startswith("roi_queue")]

    def flops_per_image(self) -> float:
        """An upper bound: every one of max_boxes slots kept."""
        h, cfg = self.hyper, self.cfg
        boxes = min(h.max_boxes, PROPOSALS)
        trunk = backbone_flops_per_image(cfg) + pyramid_flops(self.fpn, cfg.img_size)
        img_head = head_flops([self.channels, h.hidden, h.dim])
        roi_head = head_flops([self.roi_in, h.hidden, h.dim])
        queues = 2 * (1 + boxes) * h.queue_length * h.dim
        intra = 2 * boxes * boxes * h.dim
        online = trunk + img_head + boxes * roi_head + queues + intra
        key = trunk + img_head + boxes * (h.jitters + 2) * roi_head
        return 3 * online + key

    def describe(self) -> str:
        h = self.hyper
        pyramid = type(self.fpn).__name__
        return (f"CCOP on {describe_backbone(self.cfg)} + {pyramid} ({h.fpn_channels} ch), "
                f"RoIAlign {h.pooler_size}x{h.pooler_size} on <= {h.max_boxes} boxes/image, "
                f"{h.jitters} jitters, queues {h.queue_length}, τ {h.temperature}; "
                f"{super().describe()}")


__all__ = ["CCOP", "CCOPHyper", "assign_levels", "box_iou", "enqueue_kept", "hardest_positive",
           "intra_image_loss", "jitter_boxes", "jitter_generator", "jitter_invalid",
           "masked_mean", "roi_features"]
