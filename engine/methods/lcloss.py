"""LC-loss: BYOL plus a pixel-level local contrastive loss at exact correspondences.

Paper: Islam, Lundell, Sawhney, Sinha, Morales, Radke, "Self-Supervised Learning with Local
Contrastive Loss for Detection and Semantic Segmentation", WACV 2023 (arXiv 2207.04398). No
official code was found, and the paper body could not be read here (spec/DENSE.md §4,
spec/OFFICIAL.md): the structure follows the abstract — "minimizing a pixel-level local
contrastive (LC) loss" between "self-learned features representing corresponding image locations
of transformed versions of the same image", added to an existing self-supervised method — and
every constant is OUR choice, marked so and exposed as a `--method-arg`.

The method. The base is BYOL (Grill et al., NeurIPS 2020; deepmind-research/byol): online backbone
-> projector (Linear C-4096, BN, ReLU, Linear 4096-256) -> predictor (same shape), target = EMA of
backbone and projector (τ_base -> 1, cosine), L_BYOL = Σ over both directions of
2 − 2·cos(q_a, sg z'_b). The local term works on dense maps: a dense projector (1×1 convs C-2048-256
with BN) and a dense predictor (256-2048-256) online, the EMA dense projector on the target side.
For every cell i of view a whose centre lies inside view b (kernels.geometric_correspondence), the
positive is the target map of view b sampled bilinearly at that exact point T(i); the negatives are
the target cells j of view b at least `exclude_radius` cells away from T(i) in both directions'
maximum, max(|Δrow|, |Δcol|) ≥ 1 by default (the cells whose centres lie within one cell of the
point, i.e. that share the bilinear support of the positive, are not negatives; our choice):
    ℓ_i = −log [ exp(cos(u_a,i, ū_b(T(i)))/τ) / (exp(cos(u_a,i, ū_b(T(i)))/τ) + Σ_j exp(cos(u_a,i, ū_b,j)/τ)) ]
    L_LC = ½ [ mean_{i∈overlap} ℓ_i (a=1, b=2) + (1 ↔ 2) ],          τ = 0.1 (ours)
    L = L_BYOL + λ·L_LC,                                               λ = 1 (ours)

Departures: all LC constants (τ, λ, head widths, negative set, exclusion radius) are unverified.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.methods.base import Method, StepContext
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     dense_grid, dense_map, describe_backbone, pooled)
from engine.models.correspondence import sample_other_view
from engine.models.heads import head_flops, mlp


@dataclass
class LCLossHyper:
    hidden: int = 4096            # BYOL projector / predictor hidden width
    dim: int = 256                # BYOL projection width
    dense_hidden: int = 2048      # dense projector / predictor hidden width (ours)
    dense_dim: int = 256          # dense embedding width (ours)
    temperature: float = 0.1      # τ of the local InfoNCE (ours)
    lc_weight: float = 1.0        # λ (ours)
    exclude_radius: float = 1.0   # target cells within this many cells of T(i) are not negatives

    def validate(self) -> None:
        for name in ("hidden", "dim", "dense_hidden", "dense_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.temperature > 0:
            raise ValueError("temperature must be positive")
        if self.lc_weight < 0 or self.exclude_radius < 0:
            raise ValueError("lc_weight and exclude_radius must be >= 0")


def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's 2 − 2·cos(q, sg z'), mean over the batch."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


def local_contrast(online: torch.Tensor, target_b: torch.Tensor, positives: torch.Tensor,
                   location: torch.Tensor, overlap: torch.Tensor, temperature: float,
                   exclude_radius: float) -> torch.Tensor:
    """Mean over the overlap cells of view a of the pixel InfoNCE (module docstring).

    online (B, D, N) view a's predictions; target_b (B, D, N) view b's target cells; positives
    (B, D, N) view b's target sampled at each view-a cell's point; location (B, N, 2) that point
    in view-b cell units; overlap (B, N) bool."""
    grid = int(round(target_b.shape[2] ** 0.5))
    u = F.normalize(online.float(), dim=1)
    t = F.normalize(target_b.detach().float(), dim=1)
    pos = (u * F.normalize(positives.detach().float(), dim=1)).sum(1) / temperature    # (B, N)
    neg = torch.einsum("bdi,bdj->bij", u, t) / temperature                             # (B, N, N)
    cells = torch.stack(torch.meshgrid(torch.arange(grid, device=u.device),
                                       torch.arange(grid, device=u.device), indexing="ij"),
                        dim=-1).reshape(1, 1, grid * grid, 2).to(location.dtype)
    near = (location[:, :, None, :] - cells).abs().amax(-1) < exclude_radius          # (B, N, N)
    neg = neg.masked_fill(near, float("-inf"))
    per_cell = torch.logsumexp(torch.cat([pos[..., None], neg], dim=-1), dim=-1) - pos
    valid = overlap.to(per_cell.dtype)
    return (per_cell * valid).sum() / valid.sum().clamp(min=1.0)


class LCLoss(Method):
    name = "lcloss"
    paper = ("Islam et al., Self-Supervised Learning with Local Contrastive Loss for Detection "
             "and Semantic Segmentation, WACV 2023")
    official_code = "none found (structure from the abstract; BYOL base: deepmind-research/byol)"
    sync_batchnorm = True      # BYOL's cross-replica BN
    Hyper = LCLossHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        c = self.channels = backbone_channels(self.encoder)
        self.projector = mlp([c, h.hidden, h.dim], bn=True, last_bias=False)
        self.predictor = mlp([h.dim, h.hidden, h.dim], bn=True, last_bias=False)
        self.dense_projector = mlp([c, h.dense_hidden, h.dense_dim], bn=True, dense=True)
        self.dense_predictor = mlp([h.dense_dim, h.dense_hidden, h.dense_dim], bn=True,
                                   dense=True)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.target_dense_projector = copy.deepcopy(self.dense_projector).requires_grad_(False)

    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector),
                (self.dense_projector, self.target_dense_projector)]

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        h, device = self.hyper, ctx.device
        views = [batch["view1"].to(device, non_blocking=True),
                 batch["view2"].to(device, non_blocking=True)]
        features = [dense_map(self.encoder, v) for v in views]
        q = [self.predictor(self.projector(pooled(f))) for f in features]
        u = [self.dense_predictor(self.dense_projector(f)) for f in features]
        ctx.mark("online_forward")
        with torch.no_grad():
            target_features = [dense_map(self.target_encoder, v) for v in views]
            z = [self.target_projector(pooled(f)) for f in target_features]
            dense_targets = [self.target_dense_projector(f) for f in target_features]
        ctx.mark("target_forward")
        loss_byol = byol_regression(q[0], z[1]) + byol_regression(q[1], z[0])
        boxes, flips = batch["boxes"].to(device), batch["flips"].to(device)
        geometry = [(boxes, flips), (boxes.flip(1), flips.flip(1))]
        loss_local = u[0].new_zeros((), dtype=torch.float32)
        for a, b in ((0, 1), (1, 0)):
            positives, overlap, location = sample_other_view(dense_targets[b], *geometry[a])
            loss_local = loss_local + local_contrast(
                u[a].flatten(2), dense_targets[b].flatten(2), positives, location, overlap,
                h.temperature, h.exclude_radius) / 2
        ctx.mark("loss")
        loss = loss_byol + h.lc_weight * loss_local
        return loss, {"loss_byol": loss_byol.detach(), "loss_local": loss_local.detach()}

    def flops_per_image(self) -> float:
        h, cells = self.hyper, dense_grid(self.cfg) ** 2
        backbone = backbone_flops_per_image(self.cfg)
        projector = head_flops([self.channels, h.hidden, h.dim])
        dense = head_flops([self.channels, h.dense_hidden, h.dense_dim], cells)
        online = (backbone + projector + head_flops([h.dim, h.hidden, h.dim]) + dense
                  + head_flops([h.dense_dim, h.dense_hidden, h.dense_dim], cells)
                  + 2 * cells * cells * h.dense_dim)
        return 2 * (3 * online + backbone + projector + dense)

    def describe(self) -> str:
        h = self.hyper
        grid = dense_grid(self.cfg)
        return (f"LC-loss (BYOL + local InfoNCE) on {describe_backbone(self.cfg)} "
                f"({grid}x{grid} map), τ {h.temperature}, λ {h.lc_weight}; {super().describe()}")


__all__ = ["LCLoss", "LCLossHyper", "local_contrast"]
