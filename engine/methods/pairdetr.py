"""Pair DETR, label-free: detect each region as a pair of keypoints (top-left corner and centre) with
two decoders, trained on selective-search proposals.

Paper: Iranmanesh, Chen, Lien, "Pair DETR: Contrastive Learning Speeds Up DETR Training", arXiv
2210.16476. No official code (spec/OFFICIAL.md, spec/DENSE.md §8): everything below the abstract's
level -- an object as a pair of keypoints, the top-left corner and the centre, found by two
decoders; joint classification; the pair association between the two decoders' queries learnt by
a contrastive loss -- is our reading, and each choice is marked [ours]. The paper trains with COCO
labels; here the targets are label-free (DETReg's: cached selective-search proposals, one class).

The method, on the view I (S x S, `view1`) with the image's top-30 proposals mapped into it:
  targets   boxes of batch["proposals"][:, 0] (x1 y1 x2 y2 in view pixels, clipped to the view)
            KEPT when their visible fraction is >= visible_thr (0.5) and both sides are >= min_side
            pixels at 224 (4, scaled by S / 224: 1.1 px at 64) [ours]; kept boxes are packed to
            the front in their cached order, label 0 (class-agnostic, num_classes 1: 2 logits with
            no-object), cxcywh normalised by S. An image may keep none.
  network   the frozen CNN (FrozenBN, no gradient, as UP-DETR's --fre_cnn) -> C5 -> 1x1 input_proj
            -> DETR's transformer encoder (sine positions), shared by two DETR decoders of N queries
            each (each its own learned queries, layers and final LayerNorm): the centre decoder
            (DETR's `transformer.decoder`) and the corner decoder (`corner_decoder`). Query i of
            both decoders form pair i [ours: pairs by index].
  boxes     per decoder layer l and pair i: centre c = sigmoid(centre_embed(hs^c_{l,i})) (MLP 3
            layers, 2 outputs), corner k = c − min(c, 1 − c) ⊙ sigmoid(corner_embed(hs^k_{l,i}))
            [ours: the corner lies between the centre and the farthest top-left point that keeps
            the box inside the image], box = (c, w, h) with w = 2(c_x − k_x), h = 2(c_y − k_y), so
            w, h >= 0 and the box lies in [0, 1]²
  classes   joint logits = class_embed(hs^c) + corner_class_embed(hs^k) (2 each: a product of
            the two decoders' softmax distributions, renormalised) [ours]
  matching  Hungarian on the joint prediction per decoder layer: cost 1·(−softmax prob) + 5·L1 +
            2·(−GIoU) (DETR)
  losses    per layer (final + auxiliary, each its own matching): DETR's CE (no-object weight
            eos_coef 0.1) x1, L1 x5, GIoU x2 over the matched pairs / num_boxes;
            pair association, final layer only [ours]: z^c_i = l2n(pair_centre(hs^c_i)),
            z^k_j = l2n(pair_corner(hs^k_j)) (MLP d -> d -> 128, 2 layers), s_ij = z^c_i·z^k_j / τ
            (τ = 0.1), for every MATCHED pair i:
              ℓ_i = ½ [CE(s_i·, i) + CE(s_·i, i)]  (positive i among all N queries of the other
                    decoder, both directions)
            L_pair = Σ_matched ℓ_i / num_boxes, weight 1
  num_boxes = the batch's kept targets summed over ranks / world size, at least 1 (DETR).
Fixed shapes and no host sync: the keep mask, the packing (a stable sort on the device) and the
counts stay tensors; the matching runs on the device (kernels/linear_sum_assignment, K7).

Assumptions and departures (all [ours], there being no code):
  * the recipe is DETR's (see the pairdetr-r50 preset): N = 100 queries, post-norm transformer
    6 + 6 layers, d 256, FFN 2048, dropout 0.1, CE set loss with DETR's weights and costs, AdamW
    1e-4; the paper's base model (Conditional DETR: 300 queries, focal loss) is not followed;
  * label-free targets (the paper is supervised): the top-30 proposals as DETReg; they are the
    loader's cached selective-search boxes of the whole image mapped into view 1 (DETReg computes
    them on the fly on the image resized to 128 px), so a crop cuts boxes, and the visible
    fraction and side filters above drop what the crop left of them;
  * the detection image is view1 of the loader's two-view batch (view 2 is decoded and unused), a
    square random-resized crop without padding mask (DETR: the whole image resized and padded);
  * the frozen CNN is initialised from `backbone_checkpoint` as UP-DETR's (a densesim checkpoint's
    online encoder, an exported encoder or a torchvision-named ResNet state dict); without one it
    stays random (a warning at the start);
  * no query dropout, no attention mask between the decoders: they meet only through the shared
    memory, the joint class score, the box and the pair loss;
  * the auxiliary layers get the set losses, not the pair loss;
  * the pair projections read the decoders' outputs only, not their learned queries (with the
    queries an index-matching code would solve the InfoNCE without looking at the image): a pair
    is associated through what its two queries attend to. On the CPU demo (a random frozen CNN,
    60 steps) the pair loss stays near chance, log N, while the set losses fall.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import Method, StepContext, ViewSpec
from engine.models.box_ops import box_cxcywh_to_xyxy
from engine.models.detr import (MLP, Backbone, HungarianMatcher, Joiner, PositionEmbeddingSine,
                                SetCriterion, Transformer, TransformerDecoder,
                                TransformerDecoderLayer)
from engine.models.detr_pretraining import (check_detector_config, feature_tokens,
                                            frozen_resnet, transformer_flops)
from engine.models.resnet import ResNet, resnet_flops_per_image
from pipelines.datasets import DataError

PROPOSALS = 30          # boxes per image the loader is asked for (DETReg's top-30)


@dataclass
class PairDETRHyper:
    num_queries: int = 100               # N per decoder (DETR)
    max_targets: int = 30                # proposals used per image (<= the loader's 30)
    visible_thr: float = 0.5             # keep a proposal if at least this much is in the view
    min_side: float = 4.0                # and both sides >= this many pixels at 224 (x S/224)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6                  # per decoder
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False               # DETR's post-norm
    aux_loss: bool = True
    eos_coef: float = 0.1
    cost_class: float = 1.0              # matcher (DETR)
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    ce_weight: float = 1.0               # loss weights (DETR) and the pair loss's
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    pair_weight: float = 1.0
    pair_dim: int = 128                  # pair projection width
    pair_temperature: float = 0.1        # τ of the pair InfoNCE
    backbone_checkpoint: str = ""        # the frozen CNN's weights ("" = random: smoke tests only)

    def validate(self) -> None:
        if min(self.num_queries, self.max_targets, self.hidden_dim, self.nheads, self.enc_layers,
               self.dec_layers, self.dim_feedforward, self.pair_dim) < 1:
            raise ValueError("num_queries, max_targets, hidden_dim, nheads, enc_layers, "
                             "dec_layers, dim_feedforward and pair_dim must be at least 1")
        if self.max_targets > PROPOSALS:
            raise ValueError(f"max_targets must be at most the loader's {PROPOSALS} proposals")
        if self.num_queries < self.max_targets:
            raise ValueError(f"num_queries {self.num_queries} must be >= max_targets "
                             f"{self.max_targets} (the matching needs a query per target)")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even and divisible by nheads "
                             f"{self.nheads}")
        if not 0 <= self.visible_thr <= 1 or self.min_side < 0:
            raise ValueError("visible_thr must be in [0, 1] and min_side >= 0")
        if not 0 <= self.dropout < 1 or not 0 < self.eos_coef <= 1:
            raise ValueError("dropout must be in [0, 1) and eos_coef in (0, 1]")
        if not self.pair_temperature > 0:
            raise ValueError(f"pair_temperature must be positive, got {self.pair_temperature}")


# ---------------------------------------------------------------------------------- the pieces
def pair_boxes(centre: torch.Tensor, corner_logits: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """centre (..., 2) in (0, 1), corner_logits (..., 2) -> (boxes (..., 4) cxcywh, corner
    (..., 2)): corner = c − min(c, 1 − c)·sigmoid(a), w, h = 2(c − corner) (module docstring)."""
    half = torch.minimum(centre, 1 - centre) * corner_logits.sigmoid()
    return torch.cat([centre, 2 * half], dim=-1), centre - half


def pair_infonce(z_centre: torch.Tensor, z_corner: torch.Tensor, matched: torch.Tensor,
                 temperature: float, num_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z_centre, z_corner (B, N, D) unit rows, matched (B, N) bool -> (Σ over matched i of
    ½[CE(s_i·, i) + CE(s_·i, i)] / num_boxes, the fraction of matched i whose row and column argmax
    is i), s = z_centre z_cornerᵀ / τ in float32."""
    logits = torch.einsum("bnd,bmd->bnm", z_centre.float(), z_corner.float()) / temperature
    positive = torch.diagonal(logits, dim1=1, dim2=2)                          # (B, N)
    rows = torch.logsumexp(logits, dim=2) - positive      # centre i against every corner j
    cols = torch.logsumexp(logits, dim=1) - positive      # corner i against every centre j
    zero = positive.new_zeros(())
    loss = torch.where(matched, 0.5 * (rows + cols), zero).sum() / num_boxes
    with torch.no_grad():
        index = torch.arange(logits.shape[1], device=logits.device)
        hit = (logits.argmax(2) == index) & (logits.argmax(1) == index) & matched
        accuracy = hit.sum() / matched.sum().clamp(min=1)
    return loss, accuracy


def proposal_targets(proposals: torch.Tensor, visible: torch.Tensor, size: int,
                     visible_thr: float, min_side: float, max_targets: int
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The view's proposals (B, P, 4) x1 y1 x2 y2 in pixels and visible fractions (B, P) -> (the
    padded targets of SetCriterion (kept boxes first, cxcywh / size, label 0), the same boxes as
    xyxy / size (B, T, 4), zeros in padding). Kept: finite, visible >= visible_thr, both sides
    >= min_side pixels after clipping to the view; T = min(P, max_targets)."""
    boxes = proposals[:, :max_targets].float()
    visible = visible[:, :max_targets].float()
    finite = torch.isfinite(boxes).all(-1)
    boxes = torch.where(finite[..., None], boxes, torch.zeros((), device=boxes.device))
    boxes = boxes.clamp(0, size)
    keep = (finite & (visible >= visible_thr) & (boxes[..., 2] - boxes[..., 0] >= min_side)
            & (boxes[..., 3] - boxes[..., 1] >= min_side))
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices   # kept first
    boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
    count = keep.sum(dim=1)
    valid = torch.arange(boxes.shape[1], device=boxes.device) < count[:, None]
    xyxy = torch.where(valid[..., None], boxes / size, torch.zeros((), device=boxes.device))
    x1, y1, x2, y2 = xyxy.unbind(-1)
    cxcywh = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
    labels = torch.zeros(boxes.shape[:2], dtype=torch.int64, device=boxes.device)
    return {"boxes": cxcywh, "labels": labels, "num_targets": count}, xyxy


class PairDETRNet(nn.Module):
    """The two-decoder DETR (module docstring). DETR's names where DETR has the piece
    (backbone.0.body, input_proj, transformer.encoder, transformer.decoder = the centre decoder,
    query_embed, class_embed), and corner_decoder, corner_query_embed, corner_class_embed,
    centre_embed, corner_embed, pair_centre, pair_corner for the rest.

    forward(images (B, 3, H, W)) -> {"pred_logits" (B, N, 2) joint, "pred_boxes" (B, N, 4) cxcywh,
    "pred_corners" (B, N, 2), "aux_outputs" (layers 0..L-2), "hs_centre", "hs_corner" (L, B, N, d)}.
    """

    def __init__(self, body: ResNet, num_queries: int, hidden_dim: int, nheads: int,
                 enc_layers: int, dec_layers: int, dim_feedforward: int, dropout: float,
                 pre_norm: bool, aux_loss: bool, pair_dim: int):
        super().__init__()
        self.aux_loss = aux_loss
        self.transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers,
                                       dim_feedforward, dropout, pre_norm)
        layer = TransformerDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.corner_decoder = TransformerDecoder(layer, dec_layers, nn.LayerNorm(hidden_dim))
        for p in self.corner_decoder.parameters():      # as Transformer initialises its own
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.class_embed = nn.Linear(hidden_dim, 2)            # foreground, no-object
        self.corner_class_embed = nn.Linear(hidden_dim, 2)
        self.centre_embed = MLP(hidden_dim, hidden_dim, 2, 3)
        self.corner_embed = MLP(hidden_dim, hidden_dim, 2, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.corner_query_embed = nn.Embedding(num_queries, hidden_dim)
        self.pair_centre = MLP(hidden_dim, hidden_dim, pair_dim, 2)
        self.pair_corner = MLP(hidden_dim, hidden_dim, pair_dim, 2)
        backbone = Backbone(body, ("c5",), train_backbone=False, frozen_bn=True)
        self.input_proj = nn.Conv2d(backbone.num_channels[0], hidden_dim, kernel_size=1)
        self.backbone = Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2))

    def forward(self, images: torch.Tensor) -> dict:
        features, _, pos = self.backbone(images)
        src = self.input_proj(features[-1]).flatten(2).transpose(1, 2)
        pos = pos[-1].flatten(2).transpose(1, 2)
        memory = self.transformer.encoder(src, src_key_padding_mask=None, pos=pos)
        batch = images.shape[0]

        def decode(decoder, embed):
            queries = embed.weight.unsqueeze(0).expand(batch, -1, -1)
            return decoder(torch.zeros_like(queries), memory, pos=pos, query_pos=queries)

        hs_centre = decode(self.transformer.decoder, self.query_embed)        # (L, B, N, d)
        hs_corner = decode(self.corner_decoder, self.corner_query_embed)
        logits = self.class_embed(hs_centre) + self.corner_class_embed(hs_corner)
        boxes, corners = pair_boxes(self.centre_embed(hs_centre).sigmoid(),
                                    self.corner_embed(hs_corner))
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "pred_corners": corners[-1],
               "hs_centre": hs_centre, "hs_corner": hs_corner}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out


class PairDETR(Method):
    name = "pairdetr"
    paper = ("Iranmanesh, Chen, Lien, Pair DETR: Contrastive Learning Speeds Up DETR Training, "
             "arXiv 2210.16476")
    official_code = "none (no code released; every choice beyond the abstract is ours)"
    views = ViewSpec(proposals=PROPOSALS)     # two views; view1 is the detection image
    sync_batchnorm = False                    # FrozenBN and LayerNorm only
    Hyper = PairDETRHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        self.check_config(cfg)
        h = self.hyper
        body, self.backbone_source = frozen_resnet(cfg, h.backbone_checkpoint, self.name)
        detector = PairDETRNet(body, h.num_queries, h.hidden_dim, h.nheads, h.enc_layers,
                               h.dec_layers, h.dim_feedforward, h.dropout, h.pre_norm,
                               h.aux_loss, h.pair_dim)
        # the frozen ResNet registered first, under the contract's name (encoder.*);
        # detector.backbone.0.body is the same module
        self.encoder = detector.backbone[0].body
        self.detector = detector
        self.channels = self.encoder.out_channels
        matcher = HungarianMatcher(h.cost_class, h.cost_bbox, h.cost_giou, "softmax")
        weights = {"loss_ce": h.ce_weight, "loss_bbox": h.bbox_weight,
                   "loss_giou": h.giou_weight, "loss_pair": h.pair_weight}
        self.criterion = SetCriterion(1, matcher, weights, h.eos_coef, "ce")

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.hyperparameters(cfg)
        check_detector_config(cfg, cls.name)

    # ------------------------------------------------------------------ pieces
    def select_targets(self, batch: dict, size: int, device: torch.device):
        """(targets, target boxes xyxy / S (B, T, 4)) from view 1's proposals (module docstring)."""
        if "proposals" not in batch or "proposal_visible" not in batch:
            raise DataError("pairdetr needs region proposals in the batch: run python -m "
                            "engine.proposals --data DIR once (or pass --proposals FILE)")
        proposals, visible = batch["proposals"], batch["proposal_visible"]
        if (proposals.dim() != 4 or proposals.shape[3] != 4 or proposals.shape[2] < 1
                or visible.shape != proposals.shape[:3]):
            raise ValueError(f"pairdetr: batch['proposals'] must be (B, V, P >= 1, 4) and "
                             f"batch['proposal_visible'] (B, V, P), got {tuple(proposals.shape)} "
                             f"and {tuple(visible.shape)}")
        h = self.hyper
        return proposal_targets(proposals[:, 0].to(device, non_blocking=True),
                                visible[:, 0].to(device, non_blocking=True), size,
                                h.visible_thr, h.min_side * size / 224.0, h.max_targets)

    def compute(self, batch: dict, ctx: StepContext) -> dict:
        """Every output, target and matching of one micro-batch (the losses read only these)."""
        h = self.hyper
        view = batch["view1"].to(ctx.device, non_blocking=True)
        targets, target_xyxy = self.select_targets(batch, view.shape[-1], view.device)
        outputs = self.detector(view)
        ctx.mark("detr_forward")
        self.criterion.matcher.backend = ctx.backend("linear_sum_assignment")
        losses, matching, _ = self.criterion(outputs, targets)
        z_centre = F.normalize(self.detector.pair_centre(outputs["hs_centre"][-1]).float(), dim=-1)
        z_corner = F.normalize(self.detector.pair_corner(outputs["hs_corner"][-1]).float(), dim=-1)
        matched = matching.query_mask(h.num_queries)
        losses["loss_pair"], pair_top1 = pair_infonce(z_centre, z_corner, matched,
                                                      h.pair_temperature, self.criterion.num_boxes)
        return dict(outputs=outputs, losses=losses, matching=matching, targets=targets,
                    target_xyxy=target_xyxy, z_centre=z_centre, z_corner=z_corner,
                    matched=matched, pair_top1=pair_top1)

    # ------------------------------------------------------------------ the contract
    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        out = self.compute(batch, ctx)
        losses = out["losses"]
        loss = self.criterion.total(losses)
        ctx.mark("loss")
        final = ("loss_ce", "loss_bbox", "loss_giou", "loss_pair")
        figures = {name: losses[name].detach() for name in final}
        aux = {k: v for k, v in losses.items() if k not in final}
        if aux:
            figures["loss_aux"] = self.criterion.total(aux).detach()
        figures["pair_top1"] = out["pair_top1"]
        figures["targets_per_image"] = out["targets"]["num_targets"].float().mean()
        return loss, figures

    @torch.no_grad()
    def detections(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The pretext's detections on view1 (the caller puts the model in eval mode):
        pred_boxes (B, N, 4) xyxy in [0, 1], scores (B, N) = 1 − p(no-object) of the joint
        logits, target_boxes (B, T, 4) xyxy in [0, 1] (the kept proposals first, zeros after),
        num_targets (B,)."""
        view = batch["view1"].to(ctx.device, non_blocking=True)
        targets, target_xyxy = self.select_targets(batch, view.shape[-1], view.device)
        outputs = self.detector(view)
        probability = outputs["pred_logits"].float().softmax(-1)
        return {"pred_boxes": box_cxcywh_to_xyxy(outputs["pred_boxes"].float()).clamp(0, 1),
                "scores": 1 - probability[..., -1],
                "target_boxes": target_xyxy,
                "num_targets": targets["num_targets"]}

    # ------------------------------------------------------------------ bookkeeping
    def data_warnings(self, num_images: int, global_batch: int, total_steps: int) -> list[str]:
        lines = super().data_warnings(num_images, global_batch, total_steps)
        if self.backbone_source is None:
            lines.append("pairdetr: no --method-arg backbone_checkpoint: the frozen CNN is random "
                         "(only a smoke test makes sense)")
        return lines

    def flops_per_image(self) -> float:
        """The frozen CNN forward on the image, and the encoder, both decoders and the heads
        forward and backward (3x); the CNN has no backward."""
        h, cfg = self.hyper, self.cfg
        cnn = resnet_flops_per_image(cfg.backbone, cfg.img_size, cfg.cifar_stem)
        tokens = feature_tokens(cfg)
        d, n, layers = h.hidden_dim, h.num_queries, h.dec_layers
        heads = 2 * layers * n * (2 * d + 2 * d * d + 2 * d) + 2 * n * (d * d + d * h.pair_dim)
        trained = (transformer_flops(tokens, n, d, h.dim_feedforward, h.enc_layers, layers, 2)
                   + 2.0 * (tokens * self.channels * d + heads + n * n * h.pair_dim))
        return float(cnn + 3 * trained)

    def describe(self) -> str:
        h, cfg = self.hyper, self.cfg
        source = self.backbone_source or "random (no backbone_checkpoint)"
        return (f"Pair DETR on a frozen {cfg.backbone}{', CIFAR stem' if cfg.cifar_stem else ''} "
                f"@{cfg.img_size}px (weights: {source}), encoder {h.enc_layers} + 2 decoders x "
                f"{h.dec_layers} {'pre' if h.pre_norm else 'post'}-norm d{h.hidden_dim}, "
                f"{h.num_queries} query pairs, <= {h.max_targets} proposals/image (visible >= "
                f"{h.visible_thr}), pair InfoNCE τ {h.pair_temperature}; {super().describe()}")


__all__ = ["PairDETR", "PairDETRHyper", "PairDETRNet", "pair_boxes", "pair_infonce",
           "proposal_targets"]
