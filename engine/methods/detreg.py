"""DETReg: the whole detector pre-trained to find region proposals and embed them like a
self-supervised encoder.

Paper: Bar, Wang, Kantorov, Reed, Herzig, Chechik, Rohrbach, Darrell, Globerson, "DETReg:
Unsupervised Pretraining with Region Priors for Object Detection", CVPR 2022. Official code:
amirbar/DETReg @ a4b63635 (`models/deformable_detr.py` SetCriterion.loss_object_embedding,
`models/backbone.py` build_swav_backbone_old, `datasets/selfdet.py`, `engine.py`, `main.py`,
`util/default_args.py`, `configs/DETReg_top30_in.sh`), read line by line in spec/OFFICIAL.md §7.

The method. A Deformable DETR (engine/models/detr.py: 300 queries, hidden 256, 6 + 6 layers, FFN
1024, 4 feature levels, no box refinement -- the IN-1k command does not set --with_box_refine --,
91 sigmoid classes) on a FROZEN frozen-BN ResNet (`--lr_backbone 0`), initialised from SwAV.
Each image's pretext targets are its top-30 selective-search proposals (python -m
engine.proposals; the first 30 in selective search's order, as `--strategy topk --max_prop 30`),
all of class 1 (class-agnostic objectness with the COCO head). Per kept proposal b:
  target box    b in view-1 pixels -> cxcywh normalised by the view
  target embed  e_b = GAP(C3(crop_b)), crop_b = the box cut from view 1 and resized to
                crop_size x crop_size (128), C3 = layer2 of the frozen embedding encoder (SwAV
                ResNet-50: 512-d), under no_grad, not normalised (`--obj_embedding_head
                intermediate`)
  predicted     f_q = MLP(hidden -> hidden -> C3 channels)(hs_q of the LAST decoder layer)
                (`feature_embed`, DETReg's name)
With σ the Hungarian matching of the final layer (cost 2·focal class + 5·L1 + 2·(−GIoU), focal
α 0.25, γ 2) and num_boxes = targets all-reduced over ranks / world size, clamped at 1:
  L_ce   = Σ_{b,q,c} focal(sigmoid logits, one-hot) / num_boxes   (mean over q, times Q)
  L_bbox = Σ_matched |b̂ − b|_1 / num_boxes,  L_giou = Σ_matched (1 − GIoU) / num_boxes
  L_emb  = mean over matched pairs and C3 dims of |f_σ(b) − e_b|    (F.l1_loss, final layer only)
  L = 2·L_ce + 5·L_bbox + 2·L_giou + 1·L_emb + Σ_{5 earlier decoder layers} (2·L_ce + 5·L_bbox +
      2·L_giou), each earlier layer with its own matching, no embedding term.

What the batch gives and what is used:
  * the loader always makes two views (a single-crop loader does not exist); view 1 is the
    detection image, view 2 is made and not used;
  * batch["proposals"][:, 0] (B, P, 4) are view 1's proposals (x1 y1 x2 y2 in view pixels,
    clipped) and batch["proposal_visible"][:, 0] the fraction of each inside view 1. A proposal
    is KEPT when at least `min_visible` (0.5) of it is inside the view and its clipped box is at
    least `min_box_size` (1) view pixel wide and high; kept proposals are moved to the front
    (stable), padded targets behind them (fixed shapes, no host sync);
  * the crops are cut with kernels.roi_align (aligned, adaptive sampling: one bilinear sample per
    output pixel for boxes up to crop_size, the average of ceil(box / crop_size)² samples for
    larger ones, a box filter standing in for PIL's antialiased resize) from view 1 after the
    loader's augmentation, so each crop carries view 1's colour. DETReg draws a separate SimCLR
    colour augmentation per crop (ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p
    0.5) and none on the detection image; here the recipe's colour (the presets use "mocov2",
    that same table) is drawn once per image and shared by the detection image and all its crops.
    No per-crop colour is added on the device.

Initial weights (Hyper `backbone_checkpoint`, `embedding_checkpoint`): each a densesim checkpoint
or run folder (the online encoder of, e.g., a SwAV run of this engine), an exported torchvision
ResNet, or a raw torchvision-named ResNet state dict (SwAV's released file), read by
engine.encoders.resnet_from_weights. DETReg initialises both from SwAV-800ep. The backbone file
must match --backbone; the embedding encoder takes the architecture of its file. Without an
embedding_checkpoint the embedding encoder is a frozen copy of the detector backbone's initial
weights (after backbone_checkpoint); one warning line at the start of the run says what was
missing. Both files are read when the method is built (also on resume, before the checkpoint
overwrites every tensor); `engine.methods.base.skip_initial_weights()` builds without them.

Departures from the official code (each on purpose):
  * square views from the loaders' RandomResizedCrop (recipe crop scale, aspect distorted to
    S x S), no padding mask; DETReg resizes the short side to 320..480 (max 600) keeping the
    aspect, with a DETR random size crop half the time, and pads the batch;
  * the embedding target is the VISIBLE part of the proposal cut from view 1 (DETReg embeds the
    whole proposal cut from the original image before its detection crop); hence the
    visible-fraction threshold 0.5 (DETReg keeps every box with a positive clipped area);
  * an image with no kept proposal contributes only its no-object focal term (DETReg re-samples
    images with fewer than 2 boxes); L_emb is 0 when no pair is matched in the micro-batch (the
    official F.l1_loss of nothing is NaN);
  * optimiser (the detreg-r50 preset): AdamW lr 2e-4 at 8 x 24, betas (0.9, 0.999), weight decay
    1e-4 on every tensor, clip 0.1, as DETReg, but one learning rate for every trainable tensor
    (DETReg: 0.1x on sampling_offsets and reference_points, `--lr_linear_proj_mult`) and the
    engine's cosine to 0 over the 5 epochs (DETReg: constant, its lr drop at epoch 40 is never
    reached); the trainer has neither per-tensor lr multipliers nor a constant schedule;
  * everything runs under the trainer's autocast (bf16 on CUDA; DETReg trains in fp32).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.checkpoint import CheckpointError
from engine.methods.base import Method, StepContext, ViewSpec, initial_weights_wanted
from engine.models.backbones import build_backbone, describe_backbone
from engine.models.box_ops import box_cxcywh_to_xyxy
from engine.models.detr import (MLP, DeformableDETR, HungarianMatcher, MSDeformAttn, SetCriterion,
                                convert_frozen_batchnorm)
from engine.models.resnet import ResNet, resnet_flops_per_image
from engine.presets import ConfigError
from pipelines.datasets import DataError

PROPOSALS = 30          # --max_prop 30: boxes per image the loader is asked for
FOREGROUND = 1          # every proposal's label (DETReg: labels = ones, 91-way sigmoid head)
EMBEDDING_LEVEL = "c3"  # --obj_embedding_head intermediate: layer2's output


@dataclass
class DETRegHyper:
    embedding_checkpoint: str = ""       # frozen embedding encoder (DETReg: SwAV R50)
    backbone_checkpoint: str = ""        # detector backbone init (DETReg: SwAV R50)
    num_queries: int = 300
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4          # C3-C5 + one stride-2 level (1: C5 only)
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False        # the IN-1k config does not set it
    num_classes: int = 91                # dataset_file 'coco': 91 sigmoid logits
    train_backbone: bool = False         # --lr_backbone 0: frozen (True: layer2-4 train)
    max_boxes: int = 30                  # proposals used per image (<= the loader's 30)
    min_visible: float = 0.5             # keep a proposal when this much of it is in view 1
    min_box_size: float = 1.0            # ... and its clipped box is this many view px wide/high
    crop_size: int = 128                 # Resize((128, 128)) of each proposal crop
    cost_class: float = 2.0              # matcher (set_cost_class for deformable_detr)
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    object_embedding_coef: float = 1.0
    focal_alpha: float = 0.25

    def validate(self) -> None:
        if min(self.num_queries, self.hidden_dim, self.nheads, self.enc_layers, self.dec_layers,
               self.dim_feedforward, self.enc_n_points, self.dec_n_points, self.max_boxes,
               self.crop_size) < 1:
            raise ValueError("num_queries, hidden_dim, nheads, enc_layers, dec_layers, "
                             "dim_feedforward, the n_points, max_boxes and crop_size must be >= 1")
        if self.hidden_dim % 32 or self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm(32) in input_proj) "
                             f"and of nheads {self.nheads}, got {self.hidden_dim}")
        if self.num_feature_levels < 1 or self.num_feature_levels == 2:
            raise ValueError(f"num_feature_levels must be 1 (C5) or >= 3 (C3-C5 + extra levels), "
                             f"got {self.num_feature_levels}")
        if self.max_boxes > self.num_queries:
            raise ValueError(f"max_boxes {self.max_boxes} needs at least as many queries, got "
                             f"num_queries={self.num_queries}")
        if self.num_classes <= FOREGROUND:
            raise ValueError(f"num_classes must be > {FOREGROUND} (proposals are class "
                             f"{FOREGROUND}), got {self.num_classes}")
        if not 0 <= self.min_visible <= 1 or self.min_box_size < 0:
            raise ValueError("min_visible must be in [0, 1] and min_box_size >= 0")
        if not 0 <= self.dropout < 1 or not 0 <= self.focal_alpha <= 1:
            raise ValueError("dropout must be in [0, 1) and focal_alpha in [0, 1]")


class DETReg(Method):
    name = "detreg"
    paper = ("Bar et al., DETReg: Unsupervised Pretraining with Region Priors for Object "
             "Detection, CVPR 2022")
    official_code = "amirbar/DETReg @ a4b63635"
    views = ViewSpec(proposals=PROPOSALS)
    sync_batchnorm = False      # no BatchNorm anywhere: FrozenBatchNorm2d in both ResNets
    Hyper = DETRegHyper

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.backbone not in ("resnet18", "resnet50"):
            raise ConfigError(f"detreg trains a Deformable DETR on a ResNet: use --backbone "
                              f"resnet50 or resnet18 (got {cfg.backbone})")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.check_config(cfg)
        h = self.hyper
        load = initial_weights_wanted()
        body = build_backbone(cfg)
        if h.backbone_checkpoint and load:
            pretrained = _pretrained_resnet(h.backbone_checkpoint, "backbone_checkpoint")
            if (pretrained.name, pretrained.cifar_stem) != (cfg.backbone, cfg.cifar_stem):
                raise ConfigError(f"detreg: backbone_checkpoint holds a {_arch(pretrained)}, the "
                                  f"run's --backbone is a {_arch(body)}")
            body.load_state_dict(pretrained.state_dict())
        detector = DeformableDETR(
            body, num_classes=h.num_classes, num_queries=h.num_queries, hidden_dim=h.hidden_dim,
            nheads=h.nheads, enc_layers=h.enc_layers, dec_layers=h.dec_layers,
            dim_feedforward=h.dim_feedforward, dropout=h.dropout,
            num_feature_levels=h.num_feature_levels, enc_n_points=h.enc_n_points,
            dec_n_points=h.dec_n_points, aux_loss=True, with_box_refine=h.with_box_refine,
            train_backbone=h.train_backbone, frozen_bn=True)
        # the backbone registered first: its tensors are named encoder.* (evaluation and the
        # torchvision export find it there), detector.backbone.0.body.* is the same module
        self.encoder = detector.backbone[0].body
        self.detector = detector

        if h.embedding_checkpoint and load:
            embedding = convert_frozen_batchnorm(
                _pretrained_resnet(h.embedding_checkpoint, "embedding_checkpoint"))
        else:   # also the structure-only build: the backbone's architecture
            embedding = copy.deepcopy(self.encoder)
        # only stem..layer2 run (C3); the deeper stages are dropped, not kept frozen and unused
        embedding.layer3, embedding.layer4 = nn.Identity(), nn.Identity()
        self.embedding_encoder = embedding.requires_grad_(False)
        self.embedding_dim = embedding.channels[EMBEDDING_LEVEL]
        self.feature_embed = MLP(h.hidden_dim, h.hidden_dim, self.embedding_dim, 2)

        matcher = HungarianMatcher(h.cost_class, h.cost_bbox, h.cost_giou, class_cost="focal",
                                   focal_alpha=h.focal_alpha)
        self.criterion = SetCriterion(
            h.num_classes, matcher, {"loss_ce": h.cls_loss_coef, "loss_bbox": h.bbox_loss_coef,
                                     "loss_giou": h.giou_loss_coef},
            class_loss="focal", focal_alpha=h.focal_alpha)
        self._deform_attn = [m for m in detector.modules() if isinstance(m, MSDeformAttn)]
        self._start_warnings = _initial_weight_warnings(h)

    # ------------------------------------------------------------------ pieces
    def _set_backends(self, ctx: StepContext) -> None:
        attn = ctx.backend("ms_deform_attn")
        for module in self._deform_attn:
            module.backend = attn
        self.criterion.matcher.backend = ctx.backend("linear_sum_assignment")

    def select_targets(self, batch: dict, height: int, width: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(boxes (B, P, 4) x1 y1 x2 y2 view-1 pixels, kept ones first and the others zeroed,
        valid (B, P) bool, num_targets (B,) int64) from the batch's view-1 proposals."""
        if "proposals" not in batch or "proposal_visible" not in batch:
            raise DataError("detreg needs region proposals in the batch: run python -m "
                            "engine.proposals --data DIR once (or pass --proposals FILE)")
        proposals, visible = batch["proposals"], batch["proposal_visible"]
        if (proposals.dim() != 4 or proposals.shape[-1] != 4 or proposals.shape[2] < 1
                or visible.shape != proposals.shape[:3]):
            raise ValueError(f"detreg: batch['proposals'] must be (B, V, P >= 1, 4) and "
                             f"batch['proposal_visible'] (B, V, P), got "
                             f"{tuple(proposals.shape)} and {tuple(visible.shape)}")
        slots = min(self.hyper.max_boxes, proposals.shape[2])
        boxes = proposals[:, 0, :slots].to(device, torch.float32, non_blocking=True)
        visible = visible[:, 0, :slots].to(device, torch.float32, non_blocking=True)
        finite = torch.isfinite(boxes).all(-1) & torch.isfinite(visible)
        boxes = torch.where(finite[..., None], boxes, torch.zeros((), device=device))
        x1, x2 = boxes[..., 0].clamp(0, width), boxes[..., 2].clamp(0, width)
        y1, y2 = boxes[..., 1].clamp(0, height), boxes[..., 3].clamp(0, height)
        boxes = torch.stack([x1, y1, x2, y2], dim=-1)
        size = self.hyper.min_box_size
        keep = (finite & (visible > 0) & (visible >= self.hyper.min_visible)
                & (x2 - x1 >= size) & (y2 - y1 >= size))
        order = torch.argsort(keep.logical_not().to(torch.int32), dim=1, stable=True)
        keep = keep.gather(1, order)
        boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        boxes = torch.where(keep[..., None], boxes, torch.zeros((), device=device))
        return boxes, keep, keep.sum(dim=1)

    @torch.no_grad()
    def embed_boxes(self, view: torch.Tensor, boxes: torch.Tensor, backend: str = "auto"
                    ) -> torch.Tensor:
        """view (B, 3, H, W), boxes (B, P, 4) view pixels -> (B, P, C3): each box cut from the view
        to crop_size² (roi_align, aligned, adaptive sampling), C3 of the frozen embedding encoder,
        averaged over space. Empty boxes give the embedding of an all-zero crop."""
        from kernels import roi_align

        batch, slots = boxes.shape[:2]
        image = torch.arange(batch, device=boxes.device, dtype=boxes.dtype)
        image = image[:, None].expand(batch, slots).reshape(-1, 1)
        rois = torch.cat([image, boxes.reshape(-1, 4)], dim=1)
        crops = roi_align(view, rois, self.hyper.crop_size, spatial_scale=1.0, sampling_ratio=0,
                          aligned=True, backend=backend)
        c3 = self.embedding_encoder.forward_features(crops, (EMBEDDING_LEVEL,))[EMBEDDING_LEVEL]
        return c3.mean(dim=(2, 3)).view(batch, slots, -1)

    def compute(self, batch: dict, ctx: StepContext) -> dict:
        """Everything one micro-batch's losses read."""
        view = batch["view1"].to(ctx.device, non_blocking=True)
        height, width = view.shape[-2:]
        boxes, valid, count = self.select_targets(batch, height, width, view.device)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32).to(
            view.device, non_blocking=True)
        normalised = boxes / scale
        cxcywh = torch.cat([(normalised[..., :2] + normalised[..., 2:]) * 0.5,
                            normalised[..., 2:] - normalised[..., :2]], dim=-1)
        targets = {"boxes": cxcywh, "labels": torch.full_like(count[:, None].expand_as(valid),
                                                               FOREGROUND),
                   "num_targets": count}
        self._set_backends(ctx)
        outputs = self.detector(view)
        ctx.mark("online_forward")
        embedding = self.embed_boxes(view, boxes, ctx.backend("roi_align"))
        ctx.mark("target_forward")
        predicted = self.feature_embed(outputs["hs"][-1])
        return dict(outputs=outputs, targets=targets, embedding=embedding, predicted=predicted,
                    boxes=boxes, valid=valid, num_targets=count)

    def losses(self, out: dict) -> dict[str, torch.Tensor]:
        losses, matching, _ = self.criterion(out["outputs"], out["targets"])
        matched = matching.gather(out["predicted"].float())                      # (B, T, C3)
        error = (matched - out["embedding"].float()).abs().sum(-1)                # (B, T)
        valid = matching.valid
        pairs = valid.sum()
        losses["loss_object_embedding"] = (
            torch.where(valid, error, torch.zeros((), device=error.device)).sum()
            / (pairs.clamp(min=1) * self.embedding_dim).to(error.dtype))
        return losses

    # ------------------------------------------------------------------ the contract
    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        out = self.compute(batch, ctx)
        parts = self.losses(out)
        loss = (self.criterion.total(parts)
                + self.hyper.object_embedding_coef * parts["loss_object_embedding"])
        ctx.mark("loss")
        figures = {name: parts[name].detach() for name in
                   ("loss_ce", "loss_bbox", "loss_giou", "loss_object_embedding")}
        figures["boxes_per_image"] = out["num_targets"].float().mean()
        return loss, figures

    @torch.no_grad()
    def detections(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The detector on view 1 and its pretext targets (the kept proposals), for the label-free
        check (engine/eval/pretext.py); the caller sets eval mode. pred_boxes (B, Q, 4) and
        target_boxes (B, T, 4) x1 y1 x2 y2 normalised by the view, scores (B, Q) the foreground
        (class 1) probability, num_targets (B,) the leading valid targets."""
        view = batch["view1"].to(ctx.device, non_blocking=True)
        height, width = view.shape[-2:]
        boxes, _, count = self.select_targets(batch, height, width, view.device)
        self._set_backends(ctx)
        outputs = self.detector(view)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32).to(
            view.device, non_blocking=True)
        return dict(pred_boxes=box_cxcywh_to_xyxy(outputs["pred_boxes"].float()),
                    scores=outputs["pred_logits"][..., FOREGROUND].float().sigmoid(),
                    target_boxes=boxes / scale, num_targets=count)

    # ------------------------------------------------------------------ bookkeeping
    def data_warnings(self, num_images: int, global_batch: int, total_steps: int) -> list[str]:
        return super().data_warnings(num_images, global_batch, total_steps) + self._start_warnings

    def flops_per_image(self) -> float:
        """Rough: the frozen backbone forward on view 1, the frozen embedding encoder (stem to C3)
        on max_boxes crops, and 3x (forward + backward) the trainable part: input projections,
        deformable encoder over every level's cells, decoder over the queries, heads on every
        layer (ms_deform_attn's sampling counted as 4 bilinear taps x channel per point)."""
        h, cfg = self.hyper, self.cfg
        backbone = resnet_flops_per_image(cfg.backbone, cfg.img_size, cifar_stem=cfg.cifar_stem)
        embedding = h.max_boxes * _stem_to_c3_flops(self.embedding_encoder, h.crop_size)
        d, f, lv = h.hidden_dim, h.dim_feedforward, h.num_feature_levels
        body = self.encoder
        levels = ("c3", "c4", "c5") if lv > 1 else ("c5",)
        cells, proj = 0, 0
        side = None
        for level in levels:
            side = math.ceil(cfg.img_size / body.stride[level])
            cells += side * side
            proj += 2 * side * side * body.channels[level] * d
        channels = body.channels[levels[-1]]
        for _ in range(lv - len(levels)):
            side = math.ceil(side / 2)
            cells += side * side
            proj += 2 * side * side * 9 * channels * d
            channels = d

        def deform(queries: int, points: int) -> float:
            heads_points = h.nheads * lv * points
            linear = 2 * d * (3 * heads_points) + 2 * 2 * d * d     # offsets + weights, value/out
            return queries * (linear + 4 * 2 * heads_points * (d // h.nheads))

        ffn = 2 * 2 * d * f
        encoder = h.enc_layers * (deform(cells, h.enc_n_points) + cells * ffn)
        self_attn = 2 * 4 * d * d * h.num_queries + 2 * 2 * h.num_queries ** 2 * d
        decoder = h.dec_layers * (deform(h.num_queries, h.dec_n_points) + self_attn
                                  + h.num_queries * ffn)
        heads = h.dec_layers * h.num_queries * 2 * (d * h.num_classes + 2 * d * d + 4 * d)
        heads += h.num_queries * 2 * (d * d + d * self.embedding_dim)
        trainable = proj + encoder + decoder + heads
        backbone_train = 2 * backbone if h.train_backbone else 0
        return float(backbone + embedding + backbone_train + 3 * trainable)

    def describe(self) -> str:
        h = self.hyper
        refine = ", box refinement" if h.with_box_refine else ""
        frozen = "trainable layer2-4" if h.train_backbone else "frozen"
        return (f"DETReg: Deformable DETR ({h.num_queries} queries, hidden {h.hidden_dim}, "
                f"{h.enc_layers}+{h.dec_layers} layers, {h.num_feature_levels} levels{refine}) on "
                f"{describe_backbone(self.cfg)} ({frozen}); top-{h.max_boxes} proposals "
                f"(visible >= {h.min_visible}), {h.crop_size}px crops -> C3 "
                f"{self.embedding_dim}-d of a frozen {_arch(self.embedding_encoder)}; "
                f"{super().describe()}")


def _arch(resnet: ResNet) -> str:
    return resnet.name + (" with the CIFAR stem" if resnet.cifar_stem else "")


def _pretrained_resnet(path: str, what: str) -> ResNet:
    from engine.encoders import resnet_from_weights

    try:
        return resnet_from_weights(path)
    except CheckpointError as exc:
        raise ConfigError(f"detreg {what}: {exc}") from exc


def _initial_weight_warnings(h: DETRegHyper) -> list[str]:
    if h.embedding_checkpoint and h.backbone_checkpoint:
        return []
    if not h.embedding_checkpoint and not h.backbone_checkpoint:
        return ["detreg: no backbone_checkpoint or embedding_checkpoint: the detector backbone "
                "and the embedding encoder are the same random initialisation (DETReg starts "
                "both from SwAV: --method-arg backbone_checkpoint=PATH "
                "--method-arg embedding_checkpoint=PATH)"]
    if not h.embedding_checkpoint:
        return ["detreg: no embedding_checkpoint: the embedding encoder is a frozen copy of the "
                "backbone_checkpoint weights"]
    return ["detreg: no backbone_checkpoint: the detector backbone starts from a random "
            "initialisation" + ("" if h.train_backbone else " and stays frozen")]


def _stem_to_c3_flops(resnet: ResNet, size: int) -> float:
    """Forward FLOPs (2·MAC of the convs) of `resnet`'s stem, layer1 and layer2 on size² input."""
    side = size
    macs = 0

    def conv(module: nn.Conv2d, side_in: int) -> int:
        nonlocal macs
        out = (side_in + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1
        macs += out * out * module.in_channels * module.out_channels * module.kernel_size[0] ** 2
        return out

    side = conv(resnet.conv1, side)
    if isinstance(resnet.maxpool, nn.MaxPool2d):
        side = (side + 2 - 3) // 2 + 1
    for stage in (resnet.layer1, resnet.layer2):
        for block in stage:
            side_in = side
            for name in ("conv1", "conv2", "conv3"):
                if hasattr(block, name):
                    side = conv(getattr(block, name), side)
            if block.downsample is not None:
                conv(block.downsample[0], side_in)
    return float(2 * macs)


__all__ = ["DETReg", "DETRegHyper", "FOREGROUND", "PROPOSALS"]
