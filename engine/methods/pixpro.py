"""PixPro: pixel-to-propagation consistency between two views' feature cells.

Paper: Xie, Lin, Zhang, Cao, Lin, Hu, "Propagate Yourself: Exploring Pixel-Level Consistency for
Unsupervised Visual Representation Learning", CVPR 2021. Official code: zdaxie/PixPro @ e390d6b6
(`contrast/models/PixPro.py`, `tools/pixpro_base_r50_100ep.sh`); the loss as spec/OFFICIAL.md §2
reads it line by line.

The method. Online: backbone -> per-cell projector MLP2d (Conv1x1 2048-4096, BN, ReLU, Conv1x1
4096-256) -> x (N, 256, 7, 7) -> pixel propagation module (PPM):
    y_i = Σ_j max(cos(x_i, x_j), 0)^γ · l2n(g(x))_j,   γ = 2, g = Conv1x1 256-256 (transform layer 1)
    pred = l2n(y)                                                    (kernels/pixel_propagation.py)
Target: the EMA copies of backbone and projector (momentum 0.99 -> 1, cosine over the run),
z = l2n(projector_k(backbone_k(view))), stop-gradient. BOTH views go through both networks (four
backbone passes). Positive pairs come from the crop geometry alone: cells i of view a and j of view
b are a pair when their centres, in original-image coordinates normalised by the image's width and
height, lie closer than T = 0.7 of the larger cell diagonal (kernels/dense_match.py
`pixpro_positive_mask`, PixPro's exact rule incl. its (W−1, H−1) normalisation and flip-as-swapped-x).

    f(y, z; A) = −2 · mean_images [ Σ_ij A_ij cos(y_i, z_j) / (Σ_ij A_ij + 1e−6) ]
    L = f(pred_1, z_2; A_12) + f(pred_2, z_1; A_21)                 (summed, no ½)

via kernels/dense_match.py `pixpro_loss`, which rebuilds A from 8 numbers per image inside the
kernel instead of storing it. The instance branch (`instance_weight`, 0 in both released scripts)
adds −2·cos between a pooled predictor output and the pooled target instance projection,
symmetrised, as the official code does when its weight is positive.

Departures: none in the loss. The data recipe is the released "--aug BYOL --crop 0.08" pair with
bilinear resizing (presets set interpolation="bilinear"); LARS with PixPro's exclusions is
engine/optim.py. On a ViT backbone the dense map is the patch-token grid.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import Method, StepContext
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     dense_grid, dense_map, describe_backbone, pooled)
from engine.models.heads import head_flops, mlp
from kernels import pixel_propagation, pixpro_loss


@dataclass
class PixProHyper:
    hidden: int = 4096              # projector hidden width
    dim: int = 256                  # projection width
    gamma: float = 2.0              # pixpro_p: sharpness of the propagation weights
    threshold: float = 0.7          # pixpro_pos_ratio: positive if distance < T · max bin diagonal
    transform_layers: int = 1       # g: 0 identity, 1 Conv1x1, 2 Conv-BN-ReLU-Conv
    instance_weight: float = 0.0    # pixpro_ins_loss_weight (0 in the released scripts)

    def validate(self) -> None:
        if self.hidden < 1 or self.dim < 1:
            raise ValueError("hidden and dim must be at least 1")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")
        if self.transform_layers not in (0, 1, 2):
            raise ValueError(f"transform_layers must be 0, 1 or 2, got {self.transform_layers}")
        if self.instance_weight < 0:
            raise ValueError("instance_weight must be >= 0")


class PixelPropagation(nn.Module):
    """PPM: value transform g, then the ReLU^γ propagation of the normalised values."""

    def __init__(self, dim: int, transform_layers: int, gamma: float):
        super().__init__()
        self.gamma = gamma
        if transform_layers == 0:
            self.transform = nn.Identity()
        elif transform_layers == 1:
            self.transform = nn.Conv2d(dim, dim, 1)
        else:
            self.transform = mlp([dim, dim, dim], bn=True, dense=True)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """x (N, C, H, W) -> l2n(propagated values) as tokens (N, H·W, C)."""
        value = F.normalize(self.transform(x), dim=1).flatten(2).transpose(1, 2)
        tokens = x.flatten(2).transpose(1, 2)
        return F.normalize(pixel_propagation(tokens, value, self.gamma, backend=backend), dim=-1)


class PixPro(Method):
    name = "pixpro"
    paper = "Xie et al., Propagate Yourself: Exploring Pixel-Level Consistency, CVPR 2021"
    official_code = "zdaxie/PixPro @ e390d6b6"
    sync_batchnorm = True      # every BN of the official model is SyncBN
    Hyper = PixProHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        self.channels = backbone_channels(self.encoder)
        self.projector = mlp([self.channels, h.hidden, h.dim], bn=True, dense=True)
        self.propagation = PixelPropagation(h.dim, h.transform_layers, h.gamma)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if h.instance_weight > 0:
            self.instance_projector = mlp([self.channels, h.hidden, h.dim], bn=True, dense=True)
            self.instance_predictor = mlp([h.dim, h.hidden, h.dim], bn=True, dense=True)
            self.target_instance_projector = copy.deepcopy(
                self.instance_projector).requires_grad_(False)

    def target_pairs(self):
        pairs = [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]
        if self.hyper.instance_weight > 0:
            pairs.append((self.instance_projector, self.target_instance_projector))
        return pairs

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        h, device = self.hyper, ctx.device
        views = [batch["view1"].to(device, non_blocking=True),
                 batch["view2"].to(device, non_blocking=True)]
        features = [dense_map(self.encoder, v) for v in views]
        preds = [self.propagation(self.projector(f), backend=ctx.backend("pixel_propagation"))
                 for f in features]
        ctx.mark("online_forward")
        with torch.no_grad():
            target_features = [dense_map(self.target_encoder, v) for v in views]
            targets = [F.normalize(self.target_projector(f), dim=1).flatten(2).transpose(1, 2)
                       for f in target_features]
        ctx.mark("target_forward")
        boxes = batch["boxes"].to(device)
        flips = batch["flips"].to(device)
        sizes = batch["image_size"].to(device)
        grid = features[0].shape[-1]
        backend = ctx.backend("pixpro_loss")
        loss_pixel = (pixpro_loss(preds[0], targets[1], boxes, flips, grid, h.threshold,
                                  image_size=sizes, backend=backend)
                      + pixpro_loss(preds[1], targets[0], boxes.flip(1), flips.flip(1), grid,
                                    h.threshold, image_size=sizes, backend=backend))
        figures = {"loss_pixel": loss_pixel.detach()}
        loss = loss_pixel
        if h.instance_weight > 0:
            loss_instance = self.instance_loss(features, target_features)
            figures["loss_instance"] = loss_instance.detach()
            loss = loss + h.instance_weight * loss_instance
        ctx.mark("loss")
        return loss, figures

    def instance_loss(self, features, target_features) -> torch.Tensor:
        """PixPro's optional instance branch: −2·cos(pooled predictor, pooled target), both ways."""
        preds = [F.normalize(pooled(self.instance_predictor(self.instance_projector(f))), dim=1)
                 for f in features]
        with torch.no_grad():
            targets = [F.normalize(pooled(self.target_instance_projector(f)), dim=1)
                       for f in target_features]
        return (-2 * (preds[0] * targets[1]).sum(1).mean()
                - 2 * (preds[1] * targets[0]).sum(1).mean())

    def flops_per_image(self) -> float:
        h, cells = self.hyper, dense_grid(self.cfg) ** 2
        backbone = backbone_flops_per_image(self.cfg)
        projector = head_flops([self.channels, h.hidden, h.dim], cells)
        ppm = head_flops([h.dim, h.dim], cells) + 4 * cells * cells * h.dim
        online = backbone + projector + ppm
        return 2 * (3 * online + backbone + projector)    # two views, each both networks

    def describe(self) -> str:
        h = self.hyper
        grid = dense_grid(self.cfg)
        return (f"PixPro on {describe_backbone(self.cfg)} ({grid}x{grid} map), projector "
                f"{self.channels}-{h.hidden}-{h.dim}, γ {h.gamma}, T {h.threshold}; "
                f"{super().describe()}")


__all__ = ["PixPro", "PixProHyper", "PixelPropagation"]
