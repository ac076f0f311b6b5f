"""UP-DETR: unsupervised pre-training of DETR by random query patch detection.

Paper: Dai, Cai, Lin, Chen, "UP-DETR: Unsupervised Pre-training for Object Detection with
Transformers", CVPR 2021 (TPAMI 2022). Official code: dddzg/up-detr @ 44c0c6eb (`models/updetr.py`,
`models/detr.py` SetCriterion.loss_feature, `models/matcher.py`, `models/__init__.py`,
`datasets/selfdet.py`, `main.py`, the README's pre-training command); the loss as
spec/OFFICIAL.md §6 reads it line by line.

The method. A DETR (engine/models/detr.py) whose CNN is frozen (`--fre_cnn`: FrozenBatchNorm,
no gradient, lr 0), pre-norm transformer (6 + 6 layers, d 256, 8 heads, FFN 2048, dropout 0.1),
100 queries, num_classes 2 (3 logits with no-object). Per image, the view I (S x S):
  patches   P = 10 boxes in view pixels: sides w, h ~ U{min_pixel .. S - min_pixel} (integers,
            min_pixel 8), corner x ~ U{0 .. S - w - 1}, y ~ U{0 .. S - h - 1}
            (selfdet.get_random_patch_from_img); each cut from I by RoIAlign to patch_size² (128)
  gt_p      = GAP(C5(patch_p)), the SAME frozen CNN                                  (B, P, C)
  queries   pq = patch2query(gt) (Linear C -> d), repeated to the Q/P consecutive queries of its
            group (repeat_interleave: queries 0..9 <- patch 0, 10..19 <- patch 1, ...); each
            query's patch term kept with probability 1 - mask_ratio (0.1; rand > mask_ratio, one
            draw per image and query); query positions = pq·keep + query_embed (a random
            permutation of query_embed's rows with query_shuffle, off in the release); decoder
            input zeros, positions added in every decoder layer (DETR)
  attention decoder self-attention mask: query i sees query j only within its group
            (i // (Q/P) == j // (Q/P)); fixed
  targets   the P patch boxes, label 1, cxcywh normalised by S
  matching  Hungarian per decoder layer, cost 1·(−softmax prob of the label) + 5·L1 + 2·(−GIoU)
  losses    for the final layer and each of the 5 auxiliary ones, each with its own matching σ_l:
            L_ce   = weighted CE over all (B, Q) slots, unmatched -> no-object, weights 1 and
                     eos_coef 0.1 (torch's Σ w·nll / Σ w)
            L_bbox = Σ_matched |b − b̂|₁ / num_boxes;  L_giou = Σ_matched (1 − GIoU) / num_boxes
            L_feat = Σ_matched ‖l2n(feature_align(hs_l)[σ_l(p)]) − l2n(gt_p)‖² / num_boxes
                     (feature_align: MLP d -> d -> C, 2 layers; each term is 2 − 2cos)
            L = Σ_l 1·L_ce + 5·L_bbox + 2·L_giou + 1·L_feat
  num_boxes = the batch's targets summed over ranks / world size (B·P), at least 1.
Fixed shapes and no host sync: the patches are cut on the device (kernels/roi_align), the
matching is solved on the device (kernels/linear_sum_assignment, K7), num_boxes stays a tensor.

Departures from the official code and assumptions (each on purpose):
  * the detection image is `view1` of the loader's two-view batch: there is no single-crop loader
    (a multi-crop ViewSpec needs >= 2 crops), so view 2 is decoded and not used. It is a square
    S x S random-resized crop of the run's recipe (flip and colour included); the release feeds
    the whole image, resized to a short side in 320..480 (max 600), without flip or colour, padded
    in the batch with a padding mask. Here there is no padding (mask None);
  * the patch boxes are drawn in view pixels after the view is made (the release: in the original
    image, which is then resized; the same distribution up to the pixel scale of min_pixel), and
    the patches are cut from the augmented view by RoIAlign (aligned, adaptive sampling: plain
    bilinear when the patch is enlarged to patch_size, an average of ceil(side / patch_size)²
    bilinear samples per output pixel when it is shrunk, a box-filter antialias). The release crops
    the original PIL image, resizes it (PIL bilinear, antialiased) and gives each patch its own
    SimCLR colour jitter, grayscale and blur: here the patches share the view's colour draw (with
    the "mocov2" recipe of the presets the view gets that same SimCLR table);
  * the random draws (patch boxes, query dropout, query permutation) come from a generator on the
    device seeded by (seed, rank, step, micro-batch) (the release: numpy's and torch's global
    RNGs), so a resumed run draws the same patches; the transformer's dropout uses the global RNG,
    which the checkpoint restores;
  * gt_p is computed under no_grad (the release does not detach it, but no gradient can reach the
    frozen CNN: the same gradients);
  * the backbone's initial weights come from `backbone_checkpoint` (a densesim checkpoint or run
    folder -- its online encoder, e.g. a SwAV run's --, an exported encoder, or a torchvision-named
    ResNet state dict such as SwAV's release, which UP-DETR loads: the 800-epoch ResNet-50), read
    when the method is built (not inside engine.methods.base.skip_initial_weights(), where every
    tensor comes from a checkpoint). Without one the frozen CNN stays random, which only makes
    sense for smoke tests: the run says so in a warning at the start;
  * ResNet-18 and the CIFAR stem are accepted (C5 has 512 channels; stride 8), for CPU runs;
  * the release's evaluation path with fewer patches than num_patches is not offered:
    detections() runs all Q queries on P patches, without query dropout;
  * class_error / cardinality_error (logging only in the release) are not computed; the logged
    figures are the final layer's four losses and the weighted sum of the auxiliary ones;
  * the learning-rate schedule is the run's (warm-up + cosine; see the updetr-r50 preset), not the
    release's step drop at epoch 40.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import Method, StepContext, ViewSpec
from engine.models.box_ops import box_cxcywh_to_xyxy
from engine.models.detr import DETR, MLP, HungarianMatcher, Matching, SetCriterion
from engine.models.detr_pretraining import (check_detector_config, draw_generator,
                                            feature_tokens, frozen_resnet,
                                            transformer_flops)
from engine.models.resnet import resnet_flops_per_image
from engine.presets import ConfigError
from kernels import roi_align

DRAW_TAG = 0x0DE7     # the generator of the patch boxes, query dropout and query permutation


@dataclass
class UPDETRHyper:
    num_queries: int = 100               # --num_queries
    num_patches: int = 10                # --num_patches (query patches per image)
    patch_size: int = 128                # query patches resized to this side (selfdet.py)
    min_pixel: int = 8                   # smallest patch side in view pixels (selfdet.py)
    mask_ratio: float = 0.1              # query dropout of the patch term (UPDETR default)
    query_shuffle: bool = False          # --query_shuffle (off in the release's command)
    feature_recon: bool = True           # --feature_recon (on in the release's command)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = True                # --pre_norm
    aux_loss: bool = True
    num_classes: int = 2                 # ImageNet pre-training (3 logits with no-object)
    eos_coef: float = 0.1
    cost_class: float = 1.0              # matcher
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    ce_weight: float = 1.0               # loss weights (weight_dict)
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    feature_weight: float = 1.0
    backbone_checkpoint: str = ""        # the frozen CNN's weights ("" = random: smoke tests only)

    def validate(self) -> None:
        if min(self.num_queries, self.num_patches, self.patch_size, self.min_pixel,
               self.hidden_dim, self.nheads, self.enc_layers, self.dec_layers,
               self.dim_feedforward) < 1:
            raise ValueError("num_queries, num_patches, patch_size, min_pixel, hidden_dim, nheads, "
                             "enc_layers, dec_layers and dim_feedforward must be at least 1")
        if self.num_queries % self.num_patches:
            raise ValueError(f"num_queries {self.num_queries} must be a multiple of num_patches "
                             f"{self.num_patches} (equal query groups)")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even and divisible by nheads "
                             f"{self.nheads}")
        if not 0 <= self.mask_ratio < 1 or not 0 <= self.dropout < 1:
            raise ValueError("mask_ratio and dropout must be in [0, 1)")
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2 (the patches have label 1)")
        if not 0 < self.eos_coef <= 1:
            raise ValueError(f"eos_coef must be in (0, 1], got {self.eos_coef}")


# ---------------------------------------------------------------------------------- the pieces
def random_patch_boxes(batch: int, num_patches: int, size: int, min_pixel: int,
                       generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(batch, num_patches, 4) float32 x1 y1 x2 y2 in pixel-edge coordinates of a size x size
    view, integers as selfdet.get_random_patch_from_img: w, h ~ U{min_pixel .. size − min_pixel},
    x ~ U{0 .. size − w − 1}, y ~ U{0 .. size − h − 1}. Draws: the sides, then the corners."""
    sides = torch.randint(min_pixel, size - min_pixel + 1, (batch, num_patches, 2),
                          generator=generator, device=device).to(torch.float32)
    uniform = torch.rand((batch, num_patches, 2), generator=generator, device=device)
    corner = torch.floor(uniform * (size - sides)).clamp(max=size - sides - 1)
    return torch.cat([corner, corner + sides], dim=-1)


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, patch_size: int,
                 backend: str = "auto") -> torch.Tensor:
    """images (B, 3, S, S), boxes (B, P, 4) x1 y1 x2 y2 in pixel edges -> (B·P, 3, patch_size,
    patch_size), image-major: RoIAlign with aligned=True (samples at pixel centres) and adaptive
    sampling (see the module docstring)."""
    b, p = boxes.shape[:2]
    index = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat_interleave(p)
    rois = torch.cat([index[:, None], boxes.reshape(b * p, 4).to(images.dtype)], dim=1)
    return roi_align(images, rois.to(images.dtype), patch_size, spatial_scale=1.0,
                     sampling_ratio=0, aligned=True, backend=backend)


def group_attention_mask(num_queries: int, num_patches: int,
                         device: torch.device | None = None) -> torch.Tensor:
    """(Q, Q) bool, True where attention is NOT allowed: query i sees j only when both are in the
    same group of Q/P consecutive queries (the release's −inf / 0 float mask)."""
    group = torch.arange(num_queries, device=device) // (num_queries // num_patches)
    return group[:, None] != group[None, :]


def patch_targets(boxes: torch.Tensor, size: int, label: int = 1) -> dict[str, torch.Tensor]:
    """Pixel boxes (B, P, 4) x1 y1 x2 y2 -> the padded targets of SetCriterion: cxcywh / size,
    every label `label`, P targets per image."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    cxcywh = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) / size
    b, p = boxes.shape[:2]
    return {"boxes": cxcywh, "labels": torch.full((b, p), label, dtype=torch.int64,
                                                  device=boxes.device),
            "num_targets": torch.full((b,), p, dtype=torch.int64, device=boxes.device)}


def feature_reconstruction_loss(pred_feature: torch.Tensor, gt_feature: torch.Tensor,
                                matching: Matching, num_boxes: torch.Tensor) -> torch.Tensor:
    """pred_feature (B, Q, C), gt_feature (B, T, C) -> Σ over matched (query, target) pairs of
    ‖l2n(pred) − l2n(gt)‖² / num_boxes (SetCriterion.loss_feature), in float32."""
    pred = F.normalize(matching.gather(pred_feature.float()), dim=-1)
    gt = F.normalize(gt_feature.float(), dim=-1)
    per_pair = (pred - gt).pow(2).sum(-1)
    zero = per_pair.new_zeros(())
    return torch.where(matching.valid, per_pair, zero).sum() / num_boxes


class UPDETR(Method):
    name = "updetr"
    paper = ("Dai, Cai, Lin, Chen, UP-DETR: Unsupervised Pre-training for Object Detection with "
             "Transformers, CVPR 2021")
    official_code = "dddzg/up-detr @ 44c0c6eb"
    views = ViewSpec()              # two views; view1 is the detection image
    sync_batchnorm = False          # nothing normalises over the batch (FrozenBN, LayerNorm)
    Hyper = UPDETRHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        self.check_config(cfg)
        h = self.hyper
        body, self.backbone_source = frozen_resnet(cfg, h.backbone_checkpoint, self.name)
        detr = DETR(body, num_classes=h.num_classes, num_queries=h.num_queries,
                    hidden_dim=h.hidden_dim, nheads=h.nheads, enc_layers=h.enc_layers,
                    dec_layers=h.dec_layers, dim_feedforward=h.dim_feedforward,
                    dropout=h.dropout, pre_norm=h.pre_norm, aux_loss=h.aux_loss,
                    train_backbone=False, frozen_bn=True)
        # the frozen ResNet registered first, under the contract's name (evaluation and the
        # torchvision export find it as encoder.*); detr.backbone.0.body is the same module
        self.encoder = detr.backbone[0].body
        self.detr = detr
        self.channels = self.encoder.out_channels
        self.patch2query = nn.Linear(self.channels, h.hidden_dim)
        self.feature_align = (MLP(h.hidden_dim, h.hidden_dim, self.channels, 2)
                              if h.feature_recon else None)
        matcher = HungarianMatcher(h.cost_class, h.cost_bbox, h.cost_giou, "softmax")
        weights = {"loss_ce": h.ce_weight, "loss_bbox": h.bbox_weight, "loss_giou": h.giou_weight}
        if h.feature_recon:
            weights["loss_feature"] = h.feature_weight
        self.criterion = SetCriterion(h.num_classes, matcher, weights, h.eos_coef, "ce")
        self.register_buffer("group_mask", group_attention_mask(h.num_queries, h.num_patches),
                             persistent=False)

    @classmethod
    def check_config(cls, cfg) -> None:
        hyper = cls.hyperparameters(cfg)
        check_detector_config(cfg, cls.name)
        if cfg.img_size < 2 * hyper.min_pixel + 1:
            raise ConfigError(f"updetr: a {cfg.img_size} px view has no patch side in "
                              f"[min_pixel, S - min_pixel] = [{hyper.min_pixel}, "
                              f"{cfg.img_size - hyper.min_pixel}]: lower --method-arg min_pixel")

    # ------------------------------------------------------------------ pieces
    def draws(self, batch_size: int, size: int, ctx: StepContext, device: torch.device):
        """(patch boxes (B, P, 4), keep (B, Q, 1) bool, query order (Q,) | None) of this
        micro-batch, from its seeded generator (always the boxes first, so detections() sees the
        training step's patches)."""
        h = self.hyper
        generator = draw_generator(DRAW_TAG, ctx.seed, ctx.rank, ctx.step, ctx.micro, device)
        boxes = random_patch_boxes(batch_size, h.num_patches, size, h.min_pixel, generator,
                                   device)
        keep = torch.rand((batch_size, h.num_queries, 1), generator=generator,
                          device=device) > h.mask_ratio
        order = (torch.randperm(h.num_queries, generator=generator, device=device)
                 if h.query_shuffle else None)
        return boxes, keep, order

    def patch_features(self, view: torch.Tensor, boxes: torch.Tensor, backend: str
                       ) -> torch.Tensor:
        """gt (B, P, C) float32: GAP(C5) of the frozen CNN on each patch, no gradient."""
        with torch.no_grad():
            patches = crop_patches(view, boxes, self.hyper.patch_size, backend)
            gt = self.encoder(patches).float().mean(dim=(2, 3))
        return gt.view(boxes.shape[0], boxes.shape[1], -1)

    def predict(self, view: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor | None,
                order: torch.Tensor | None) -> dict:
        """The DETR outputs with the patch queries (keep None: no query dropout)."""
        h = self.hyper
        patch_query = self.patch2query(gt).repeat_interleave(h.num_queries // h.num_patches,
                                                             dim=1)          # (B, Q, d)
        if keep is not None:
            patch_query = patch_query * keep.to(patch_query.dtype)
        query_pos = None if order is None else self.detr.query_embed.weight[order]
        return self.detr(view, query_pos=query_pos, query_pos_add=patch_query,
                         tgt_mask=self.group_mask)

    def compute(self, batch: dict, ctx: StepContext) -> dict:
        """Every output, target and matching of one micro-batch (the losses read only these)."""
        view = batch["view1"].to(ctx.device, non_blocking=True)
        size = view.shape[-1]
        boxes, keep, order = self.draws(view.shape[0], size, ctx, view.device)
        gt = self.patch_features(view, boxes, ctx.backend("roi_align"))
        ctx.mark("patch_features")
        outputs = self.predict(view, gt, keep if self.training else None, order)
        ctx.mark("detr_forward")
        targets = patch_targets(boxes, size)
        self.criterion.matcher.backend = ctx.backend("linear_sum_assignment")
        losses, matching, aux_matchings = self.criterion(outputs, targets)
        if self.feature_align is not None:
            features = self.feature_align(outputs["hs"])                     # (L, B, Q, C)
            num_boxes = self.criterion.num_boxes
            losses["loss_feature"] = feature_reconstruction_loss(features[-1], gt, matching,
                                                                 num_boxes)
            for i, aux in enumerate(aux_matchings):
                losses[f"loss_feature_{i}"] = feature_reconstruction_loss(features[i], gt, aux,
                                                                          num_boxes)
        return dict(outputs=outputs, losses=losses, matching=matching, gt=gt, boxes=boxes,
                    keep=keep, order=order, targets=targets)

    # ------------------------------------------------------------------ the contract
    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        out = self.compute(batch, ctx)
        losses = out["losses"]
        loss = self.criterion.total(losses)
        ctx.mark("loss")
        final = ("loss_ce", "loss_bbox", "loss_giou") + (
            ("loss_feature",) if self.feature_align is not None else ())
        figures = {name: losses[name].detach() for name in final}
        aux = {k: v for k, v in losses.items() if k not in final}
        if aux:
            figures["loss_aux"] = self.criterion.total(aux).detach()
        return loss, figures

    @torch.no_grad()
    def detections(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The pretext's detections on view1 (the caller puts the model in eval mode): the same
        patches as the training step at ctx, all queries, no query dropout or shuffle.
        pred_boxes (B, Q, 4) xyxy in [0, 1], scores (B, Q) = 1 − p(no-object), target_boxes
        (B, P, 4) xyxy in [0, 1] (the patches), num_targets (B,) = P."""
        view = batch["view1"].to(ctx.device, non_blocking=True)
        size = view.shape[-1]
        boxes, _, _ = self.draws(view.shape[0], size, ctx, view.device)
        gt = self.patch_features(view, boxes, ctx.backend("roi_align"))
        outputs = self.predict(view, gt, None, None)
        probability = outputs["pred_logits"].float().softmax(-1)
        return {"pred_boxes": box_cxcywh_to_xyxy(outputs["pred_boxes"].float()).clamp(0, 1),
                "scores": 1 - probability[..., -1],
                "target_boxes": boxes / size,
                "num_targets": torch.full((view.shape[0],), boxes.shape[1], dtype=torch.int64,
                                          device=view.device)}

    # ------------------------------------------------------------------ bookkeeping
    def data_warnings(self, num_images: int, global_batch: int, total_steps: int) -> list[str]:
        lines = super().data_warnings(num_images, global_batch, total_steps)
        if self.backbone_source is None:
            lines.append("updetr: no --method-arg backbone_checkpoint: the frozen CNN is random "
                         "(only a smoke test makes sense; UP-DETR starts from SwAV's ResNet-50)")
        return lines

    def flops_per_image(self) -> float:
        """The frozen CNN forward on the image and its P patches, and the transformer, heads and
        feature MLP forward and backward (3x); the CNN has no backward (frozen, input without
        gradient)."""
        h, cfg = self.hyper, self.cfg
        cnn = (resnet_flops_per_image(cfg.backbone, cfg.img_size, cfg.cifar_stem)
               + h.num_patches * resnet_flops_per_image(cfg.backbone, h.patch_size,
                                                        cfg.cifar_stem))
        tokens = feature_tokens(cfg)
        d, q, c, layers = h.hidden_dim, h.num_queries, self.channels, h.dec_layers
        heads = layers * q * (d * (h.num_classes + 1) + 2 * d * d + 4 * d)
        if h.feature_recon:
            heads += layers * q * (d * d + d * c)
        trained = (transformer_flops(tokens, q, d, h.dim_feedforward, h.enc_layers, layers)
                   + 2.0 * (tokens * c * d + h.num_patches * c * d + heads))
        return float(cnn + 3 * trained)

    def describe(self) -> str:
        h, cfg = self.hyper, self.cfg
        source = self.backbone_source or "random (no backbone_checkpoint)"
        return (f"UP-DETR on a frozen {cfg.backbone}{', CIFAR stem' if cfg.cifar_stem else ''} "
                f"@{cfg.img_size}px (weights: {source}), DETR {h.enc_layers}+{h.dec_layers} "
                f"{'pre' if h.pre_norm else 'post'}-norm d{h.hidden_dim}, {h.num_queries} queries "
                f"in {h.num_patches} patch groups of {h.patch_size}px, query dropout "
                f"{h.mask_ratio}{', shuffled queries' if h.query_shuffle else ''}"
                f"{', feature reconstruction' if h.feature_recon else ''}; {super().describe()}")


__all__ = ["UPDETR", "UPDETRHyper", "crop_patches", "feature_reconstruction_loss",
           "group_attention_mask", "patch_targets", "random_patch_boxes"]
