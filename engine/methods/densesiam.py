"""DenseSiam: SimSiam on the pixels and the regions of the two views' overlap.

Paper: Zhang, Pang, Chen, Loy, "Dense Siamese Network for Dense Unsupervised Learning", ECCV 2022
(arXiv 2203.11075). Official code: ZwwWayne/DenseSiam @ 99f8ce1b — it releases only the
unsupervised-segmentation setting (ResNet-18 + FPN, crop replay on the feature map); the ResNet-50
pre-training of the paper is not released (spec/OFFICIAL.md §3). This file implements the paper's
pre-training formulation as spec/DENSE.md §3b reads the abstract and project page: no negative
pixel pairs, no momentum encoder, a predictor on one side and a stop-gradient on the other;
"pixel consistency according to the exact location correspondence in the overlapped area", by grid
sampling; and "region embeddings that correspond to some sub-regions in the overlapped area" that
are contrasted. Every constant below that the paper does not state is OUR choice and is marked so.

The method, for views 1 and 2 with crop geometry, f_v = backbone(view v) (a G×G dense map):
  * PixSim. Dense projector z = P(f) (1×1 convs C-512-256, BN, last BN non-affine, as SimSiam's
    projector per cell) and dense predictor p = Q(z) (256-64-256). For every cell i of view 1 whose
    centre falls inside view 2 (kernels.geometric_correspondence), z_2 is sampled bilinearly at
    that exact point T(i) (engine/models/correspondence.py):
        L_pix = ½ [ mean_{i∈overlap} −cos(p_1,i, sg z_2(T(i))) + (1 ↔ 2) ]
  * RegionSim. K soft regions per image: m_v = softmax_K(R(z_v)) (R a 1×1 conv, K = 16: our
    choice; the released code uses its 27 projector channels). Over the overlap points only, each
    region's embedding is the mask-weighted sum of z — view 1 at its own cells, view 2 sampled at
    the same image points — r_1[k] = Σ_{i∈overlap} m_1[k,i] z_1,i, r_2[k] = Σ_i m_2[k](T(i)) z_2(T(i))
    (pooling the dense projection z is our choice; the released code pools its 128-d FPN
    features). They are projected (Linear-BN-ReLU ×2, Linear, non-affine BN, as released) and
    predicted (Linear-BN-ReLU-Linear with a `dense_pred_hidden` bottleneck: ours; released
    128-128-128), L2-normalised, and contrasted across the K regions of the same image with
    τ = 0.1, both ways, without stop-gradient (the released code's "kernel" contrast):
        L_region = −½ [ mean_{b: overlap} mean_k log softmax_k'(p̂_1[b,k]·ẑ_2[b,k']/τ)[k] + (1 ↔ 2) ]
  * GlobalSim. SimSiam on the pooled backbone features (projector C-2048-2048-2048 with BN, last BN
    non-affine; predictor 2048-512-2048): L_global = ½[−cos(p_1, sg z_2) − cos(p_2, sg z_1)].
    (The released code has this head, off by default; we keep it on because the ImageNet paper
    setting trains image-level consistency too — our choice.)
    L = w_global·L_global + w_pixel·L_pix + w_region·L_region,   w = 1, 1, 0.1 (w_region as the
    released code's kernel-contrast weight; the others our choice).

Departures: the pre-training constants are unverified (the paper body could not be read here);
they are all `--method-arg`s. The pixel term averages over the overlap cells that exist and the
region term over the images that have any; an image whose two crops miss each other contributes
to neither (a batch with no overlap at all gives 0 for both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import Method, StepContext
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     dense_grid, dense_map, describe_backbone, pooled)
from engine.models.correspondence import sample_other_view
from engine.models.heads import head_flops, mlp


@dataclass
class DenseSiamHyper:
    global_dim: int = 2048          # SimSiam projector width (and output)
    global_pred_hidden: int = 512   # SimSiam predictor bottleneck
    dense_hidden: int = 512         # dense projector hidden width (ours)
    dense_dim: int = 256            # dense projector output (ours)
    dense_pred_hidden: int = 64     # dense predictor bottleneck (ours)
    regions: int = 16               # soft regions per image (ours; released: 27 classes)
    region_temperature: float = 0.1  # released kernel_temp
    global_weight: float = 1.0
    pixel_weight: float = 1.0
    region_weight: float = 0.1      # released loss_kernel_cross_weight

    def validate(self) -> None:
        for name in ("global_dim", "global_pred_hidden", "dense_hidden", "dense_dim",
                     "dense_pred_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.regions < 2:
            raise ValueError(f"regions must be at least 2 (they are contrasted), got "
                             f"{self.regions}")
        if not self.region_temperature > 0:
            raise ValueError("region_temperature must be positive")
        if min(self.global_weight, self.pixel_weight, self.region_weight) < 0:
            raise ValueError("loss weights must be >= 0")


def negative_cosine(p: torch.Tensor, z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """SimSiam's D(p, z) = −cos(p, sg z), elementwise over the other dims."""
    return -F.cosine_similarity(p, z.detach(), dim=dim)


class DenseSiam(Method):
    name = "densesiam"
    paper = "Zhang et al., Dense Siamese Network for Dense Unsupervised Learning, ECCV 2022"
    official_code = "ZwwWayne/DenseSiam @ 99f8ce1b (segmentation setting only)"
    sync_batchnorm = True
    Hyper = DenseSiamHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        c = self.channels = backbone_channels(self.encoder)
        self.global_projector = mlp([c, h.global_dim, h.global_dim, h.global_dim], bn=True,
                                    hidden_bias=False, last_bn=True)
        self.global_predictor = mlp([h.global_dim, h.global_pred_hidden, h.global_dim], bn=True,
                                    hidden_bias=False)
        self.dense_projector = mlp([c, h.dense_hidden, h.dense_dim], bn=True, dense=True,
                                   hidden_bias=False, last_bn=True)
        self.dense_predictor = mlp([h.dense_dim, h.dense_pred_hidden, h.dense_dim], bn=True,
                                   dense=True, hidden_bias=False)
        self.region_head = nn.Conv2d(h.dense_dim, h.regions, 1)
        self.region_projector = mlp([h.dense_dim] * 4, bn=True, hidden_bias=False,
                                    last_bias=False, last_bn=True)
        self.region_predictor = mlp([h.dense_dim, h.dense_pred_hidden, h.dense_dim], bn=True,
                                    hidden_bias=False)

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        h, device = self.hyper, ctx.device
        views = [batch["view1"].to(device, non_blocking=True),
                 batch["view2"].to(device, non_blocking=True)]
        features = [dense_map(self.encoder, v) for v in views]
        z = [self.dense_projector(f) for f in features]             # (B, D, G, G)
        p = [self.dense_predictor(zv) for zv in z]
        ctx.mark("online_forward")
        boxes, flips = batch["boxes"].to(device), batch["flips"].to(device)
        geometry = [(boxes, flips), (boxes.flip(1), flips.flip(1))]   # a -> b, then b -> a
        loss_pixel, loss_region = z[0].new_zeros(()), z[0].new_zeros(())
        for a, b in ((0, 1), (1, 0)):
            pair_boxes, pair_flips = geometry[a]
            # z_b and its region masks at view a's cell centres, one grid_sample for both.
            masks_b = torch.softmax(self.region_head(z[b]), dim=1)
            sampled, overlap, _ = sample_other_view(torch.cat([z[b], masks_b], dim=1),
                                                    pair_boxes, pair_flips)
            z_b_at_a, m_b_at_a = sampled[:, :h.dense_dim], sampled[:, h.dense_dim:]
            valid = overlap.to(z[a].dtype)                           # (B, G²)
            count = valid.sum().clamp(min=1.0)
            pixel = negative_cosine(p[a].flatten(2), z_b_at_a, dim=1)  # (B, G²)
            loss_pixel = loss_pixel + (pixel * valid).sum() / count / 2
            masks_a = torch.softmax(self.region_head(z[a]), dim=1).flatten(2)
            regions_a = torch.einsum("bkn,bdn->bkd", masks_a * valid[:, None], z[a].flatten(2))
            regions_b = torch.einsum("bkn,bdn->bkd", m_b_at_a * valid[:, None], z_b_at_a)
            loss_region = loss_region + self.region_contrast(regions_a, regions_b,
                                                             overlap.any(dim=1)) / 2
        ctx.mark("matching")
        loss_global = self.global_loss(features)
        loss = (h.global_weight * loss_global + h.pixel_weight * loss_pixel
                + h.region_weight * loss_region)
        ctx.mark("loss")
        return loss, {"loss_global": loss_global.detach(), "loss_pixel": loss_pixel.detach(),
                      "loss_region": loss_region.detach()}

    def region_contrast(self, regions_a: torch.Tensor, regions_b: torch.Tensor,
                        has_overlap: torch.Tensor) -> torch.Tensor:
        """Regions (B, K, D) of the same image points in views a and b: −log softmax over the
        image's K regions of p̂_a[k]·ẑ_b[k]/τ (no stop-gradient, the released kernel contrast),
        averaged over the images whose views overlap (`has_overlap` (B,) bool; an image without
        overlap has all-zero regions and would otherwise add ln K with no gradient). Selecting
        those images by weight, not by indexing, keeps the step free of host syncs; their zero
        rows still enter the region heads' BatchNorm statistics (rare: crops of one image seldom
        miss each other entirely)."""
        batch, k, dim = regions_a.shape
        z_a = self.region_projector(regions_a.reshape(batch * k, dim))
        z_b = self.region_projector(regions_b.reshape(batch * k, dim))
        p_a = F.normalize(self.region_predictor(z_a), dim=1).reshape(batch, k, dim)
        z_b = F.normalize(z_b, dim=1).reshape(batch, k, dim)
        logits = torch.einsum("bkd,bld->bkl", p_a, z_b) / self.hyper.region_temperature
        labels = torch.arange(k, device=logits.device).expand(batch, k)
        per_row = F.cross_entropy(logits.reshape(batch * k, k).float(), labels.reshape(-1),
                                  reduction="none").reshape(batch, k)
        weight = has_overlap.to(per_row.dtype)
        return (per_row.mean(dim=1) * weight).sum() / weight.sum().clamp(min=1.0)

    def global_loss(self, features) -> torch.Tensor:
        z = [self.global_projector(pooled(f)) for f in features]
        p = [self.global_predictor(zv) for zv in z]
        return (negative_cosine(p[0], z[1]).mean() + negative_cosine(p[1], z[0]).mean()) / 2

    def flops_per_image(self) -> float:
        h, cells = self.hyper, dense_grid(self.cfg) ** 2
        backbone = backbone_flops_per_image(self.cfg)
        dense = (head_flops([self.channels, h.dense_hidden, h.dense_dim], cells)
                 + head_flops([h.dense_dim, h.dense_pred_hidden, h.dense_dim], cells))
        glob = (head_flops([self.channels] + [h.global_dim] * 3)
                + head_flops([h.global_dim, h.global_pred_hidden, h.global_dim]))
        return 2 * 3 * (backbone + dense + glob)

    def describe(self) -> str:
        h = self.hyper
        grid = dense_grid(self.cfg)
        return (f"DenseSiam on {describe_backbone(self.cfg)} ({grid}x{grid} map), dense "
                f"{h.dense_dim}-d, {h.regions} regions, weights global/pixel/region "
                f"{h.global_weight}/{h.pixel_weight}/{h.region_weight}; {super().describe()}")


__all__ = ["DenseSiam", "DenseSiamHyper"]
