"""DetCo: MoCo v2 with contrast at every backbone stage, between whole views and 3×3 jigsaw patches.

Paper: Xie, Ding, Wang, Zhan, Xu, Sun, Li, Luo, "DetCo: Unsupervised Contrastive Learning for
Object Detection", ICCV 2021 (arXiv 2102.04803). Official code: xieenze/DetCo @ adf49478 -- README
and transfer configs only; the pre-training code was announced and never released
(spec/OFFICIAL.md, spec/DENSE.md §7). What is below is the paper's description filled in where it
is silent; the choices marked [ours] are not confirmed by any released code. An unofficial
reimplementation (shuuchen/DetCo.pytorch, on MoCo's code) was read for comparison; where it
differs it is said below.

The method, on MoCo v2 (query encoder f_q, key encoder f_k = EMA(f_q), m = 0.999 constant, shuffle-
BN for the keys, K = 65,536 keys per queue, τ = 0.2, 128-d embeddings). Each view x is seen twice:
  global  x itself;
  local   its 3×3 jigsaw: the view cut into nine equal thirds-by-thirds cells, each resized to
          P × P pixels (P = 64 at 224: see `jigsaw_side`), made on the device here, not by the loader.
For every level ℓ of the backbone (ResNet C2..C5 = layer1..layer4; on a ViT the outputs of evenly
spaced blocks, engine/models/backbones.py `dense_levels`):
  g_ℓ(x) = l2n(MLP^g_ℓ(GAP(F_ℓ(x))))                           C_ℓ -> hidden -> dim
  l_ℓ(x) = l2n(MLP^l_ℓ([GAP(F_ℓ(p_1)); ...; GAP(F_ℓ(p_9))]))   9·C_ℓ -> hidden -> dim
(the nine patches go through the backbone as one batch of 9B crops; their per-patch GAP vectors are
concatenated in row-major cell order). With queries from view 1 (online nets) and keys from view 2
(EMA nets, no gradient), and two queues per level -- Q^g_ℓ of global keys, Q^l_ℓ of local keys (8
queues) --

    L = Σ_ℓ w_ℓ [ InfoNCE(g_ℓ(v1), g_ℓ(v2); Q^g_ℓ)        global <-> global
                + InfoNCE(l_ℓ(v1), l_ℓ(v2); Q^l_ℓ)        local  <-> local
                + InfoNCE(l_ℓ(v1), g_ℓ(v2); Q^g_ℓ) ]      local query <-> global key
    w = (0.1, 0.4, 0.7, 1.0) for C2..C5

twelve queue-InfoNCE terms, computed in one forward and one backward launch
(kernels.queue_infonce_grouped over the bank of the 8 queues; no (M, K+1) logits are stored). After the
step, g_ℓ(v2) is enqueued in Q^g_ℓ and l_ℓ(v2) in Q^l_ℓ, all-gathered over ranks.

Assumptions (no released code) and departures:
  * [ours] the level weights (0.1, 0.4, 0.7, 1.0) are DENSE.md's reading [unverified] (the
    unofficial code uses the same); the three contrasts of a level have equal weight and the total
    is a plain weighted sum (no normalisation by Σw or by the number of terms);
  * [ours] the cross term is one-directional, a local query against global keys (the negatives
    from the global queue of its level), as DENSE.md describes; no global-query/local-key term;
  * [ours] the jigsaw: each cell is exactly one third of the view in each direction (fractional
    bounds when the side is not a multiple of 3), resampled bilinearly to P × P with the engine's
    crop convention (output pixel r samples the cell at row y0 + (r+½)·h/P − ½, border clamped:
    grid_sample, align_corners=False). PIRL's jigsaw -- which the unofficial code follows -- first
    resizes to 255 px and takes a random 64 px crop inside each 85 px cell; we take the whole cell
    (no extra jitter, no resize of the view). P = round(S / 3.5) (64 at S = 224), at least 16
    pixels, and on a ViT rounded to a multiple of its patch size (`jigsaw_size` > 0 overrides);
  * [ours] the patches are concatenated in row-major cell order; `shuffle_patches=True` permutes
    the nine patch vectors of every image independently (a seeded per-step draw, exact on resume;
    the unofficial code shuffles the crops with one permutation per batch);
  * [ours] the heads: MoCo v2's 2-layer MLP (no BN) per level, global C_ℓ -> hidden -> dim, local
    9·C_ℓ -> hidden -> dim with the same hidden width (2048); the unofficial code widens the local
    hidden layer to 9·C_ℓ (340 M parameters at C5 of a ResNet-50);
  * the patches run through the backbone as their own BatchNorm batch (9B crops), separately from
    the whole views; the key side shuffles images across ranks (shuffle-BN) with their patches;
  * as MoCo v2 (engine/methods/mocov2.py): the loss is not symmetrised, keys are enqueued once per
    optimiser step (every micro-batch of a step sees the same queues), per-iteration cosine lr,
    seeded shuffle-BN permutation; a queue of any length (no divisibility by the batch);
  * on a ViT, the GAP of a level is the mean of its patch tokens (cls left out), and the 9 crops use
    the fixed sin-cos positions of their own smaller grid.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import Method, StepContext
from engine.models.backbones import (FEATURE_LEVELS, backbone_flops_per_image, build_backbone,
                                     dense_levels, describe_backbone, level_channels, pooled)
from engine.models.heads import head_flops, mlp
from engine.models.moco import KeyQueueBank, gather_keys, shuffle_generator, shuffled_forward
from engine.models.vit import VisionTransformer
from kernels import queue_infonce_grouped

CELLS = 3          # the jigsaw is CELLS × CELLS patches


@dataclass
class DetCoHyper:
    queue_length: int = 65536       # each of the 8 queues
    dim: int = 128
    hidden: int = 2048              # hidden width of every global and local head
    temperature: float = 0.2
    level_weights: tuple[float, float, float, float] = (0.1, 0.4, 0.7, 1.0)   # C2..C5
    jigsaw_size: int = 0            # patch side in pixels; 0: round(img_size / 3.5), >= 16
    shuffle_patches: bool = False   # permute the 9 patch vectors of each image before the concat

    def validate(self) -> None:
        if self.queue_length < 1 or self.dim < 1 or self.hidden < 1:
            raise ValueError("queue_length, dim and hidden must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if len(self.level_weights) != 4 or any(w < 0 for w in self.level_weights):
            raise ValueError(f"level_weights must be 4 non-negative numbers (C2..C5), got "
                             f"{self.level_weights}")
        if self.jigsaw_size < 0:
            raise ValueError("jigsaw_size must be >= 0 (0: automatic)")


def jigsaw_side(img_size: int, vit_patch: int | None, requested: int = 0) -> int:
    """The side P of a jigsaw patch: `requested` if > 0, else round(img_size / 3.5) (64 at 224, as
    DetCo) but at least 16; on a ViT (vit_patch = its patch size) the nearest multiple of it."""
    side = requested if requested > 0 else max(16, round(img_size / 3.5))
    if vit_patch:
        side = max(vit_patch, round(side / vit_patch) * vit_patch)
    return side


def jigsaw(images: torch.Tensor, side: int) -> torch.Tensor:
    """The 3×3 jigsaw of every image: (B, C, H, W) -> (B·9, C, side, side), image-major, cells in
    row-major order. Cell (i, j) covers rows [i·H/3, (i+1)·H/3) and columns [j·W/3, (j+1)·W/3)
    (fractional when H or W is not a multiple of 3); output pixel (r, c) of the cell samples row
    i·H/3 + (r+½)·(H/3)/side − ½ and column j·W/3 + (c+½)·(W/3)/side − ½ bilinearly, clamped to
    the image border. One grid_sample for the whole 3·side × 3·side mosaic (no copies of the view)."""
    batch, channels = images.shape[:2]
    # In grid_sample's normalised coordinates (align_corners=False) the source pixel coordinate
    # u maps to (2u + 1)/W − 1, so the cell-j, column-c sample is 2j/3 + (2c + 1)/(3·side) − 1,
    # independent of W; the same along rows.
    steps = torch.arange(CELLS * side, device=images.device, dtype=torch.float64)
    cell, offset = steps // side, steps % side
    coords = (2 * cell / CELLS + (2 * offset + 1) / (CELLS * side) - 1).to(images.dtype)
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1)   # (3P, 3P, (x, y))
    mosaic = F.grid_sample(images, grid.expand(batch, -1, -1, -1), mode="bilinear",
                           padding_mode="border", align_corners=False)       # (B, C, 3P, 3P)
    cells = mosaic.reshape(batch, channels, CELLS, side, CELLS, side).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(batch * CELLS * CELLS, channels, side, side)


class DetCoHeads(nn.Module):
    """Per level a global head (C_ℓ -> hidden -> dim) and a local head (9·C_ℓ -> hidden -> dim)."""

    def __init__(self, channels: list[int], hidden: int, dim: int):
        super().__init__()
        self.global_heads = nn.ModuleList(mlp([c, hidden, dim]) for c in channels)
        self.local_heads = nn.ModuleList(mlp([CELLS * CELLS * c, hidden, dim]) for c in channels)


class DetCo(Method):
    name = "detco"
    paper = "Xie et al., DetCo: Unsupervised Contrastive Learning for Object Detection, ICCV 2021"
    official_code = "xieenze/DetCo @ adf49478 (README only; pre-training code never released)"
    sync_batchnorm = False     # shuffle-BN, as MoCo
    Hyper = DetCoHyper
    levels = FEATURE_LEVELS

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        self.channels = [level_channels(self.encoder, lv) for lv in self.levels]
        self.heads = DetCoHeads(self.channels, h.hidden, h.dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_heads = copy.deepcopy(self.heads).requires_grad_(False)
        # the 8 queues in one bank: Q^g_C2..Q^g_C5 then Q^l_C2..Q^l_C5 (queues_global/_local)
        self.queues = KeyQueueBank(2 * len(self.levels), h.queue_length, h.dim)
        vit_patch = cfg.patch_size if isinstance(self.encoder, VisionTransformer) else None
        self.patch_side = jigsaw_side(cfg.img_size, vit_patch, h.jigsaw_size)
        self._step_keys: list[tuple[torch.Tensor, ...]] = []

    @property
    def queues_global(self):
        return [self.queues[i] for i in range(len(self.levels))]

    @property
    def queues_local(self):
        return [self.queues[len(self.levels) + i] for i in range(len(self.levels))]

    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.heads, self.target_heads)]

    def embed(self, encoder: nn.Module, heads: DetCoHeads, images: torch.Tensor,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """(g_C2, .., g_C5, l_C2, .., l_C5), each (B, dim), L2-normalised."""
        batch = images.shape[0]
        whole = dense_levels(encoder, images, self.levels)
        parts = dense_levels(encoder, jigsaw(images, self.patch_side), self.levels)
        order = None
        if self.hyper.shuffle_patches:
            order = torch.argsort(torch.rand(batch, CELLS * CELLS, generator=generator), dim=1)
            order = order.to(images.device)
        globals_, locals_ = [], []
        for index, level in enumerate(self.levels):
            globals_.append(F.normalize(heads.global_heads[index](pooled(whole[level])), dim=1))
            vectors = pooled(parts[level]).reshape(batch, CELLS * CELLS, -1)   # (B, 9, C)
            if order is not None:
                vectors = torch.gather(vectors, 1, order[:, :, None].expand_as(vectors))
            locals_.append(F.normalize(heads.local_heads[index](vectors.flatten(1)), dim=1))
        return (*globals_, *locals_)

    def _patch_generator(self, ctx: StepContext, which: int) -> torch.Generator | None:
        if not self.hyper.shuffle_patches:
            return None
        return torch.Generator().manual_seed(
            hash((0xDE7C0, which, ctx.seed, ctx.step, ctx.micro, ctx.rank)) % (2 ** 63))

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        h = self.hyper
        view1 = batch["view1"].to(ctx.device, non_blocking=True)
        view2 = batch["view2"].to(ctx.device, non_blocking=True)
        queries = self.embed(self.encoder, self.heads, view1, self._patch_generator(ctx, 0))
        ctx.mark("online_forward")
        key_generator = self._patch_generator(ctx, 1)
        with torch.no_grad():
            keys = shuffled_forward(
                lambda x: self.embed(self.target_encoder, self.target_heads, x, key_generator),
                view2, ctx.rank, ctx.world_size, shuffle_generator(ctx.seed, ctx.step, ctx.micro))
        ctx.mark("target_forward")
        n = len(self.levels)
        # the twelve terms in one launch: (gg, ll, lg) per level, each (query, key, queue) --
        # global/global on Q^g, local/local on Q^l, local query/global key on Q^g
        q_global, q_local = queries[:n], queries[n:]
        k_global, k_local = keys[:n], keys[n:]
        query = torch.stack([*q_global, *q_local, *q_local])
        key = torch.stack([*k_global, *k_local, *k_global])
        index = [*range(n), *range(n, 2 * n), *range(n)]
        # the bank in the queries' dtype (bf16 under autocast: the kernel's tensor-core path)
        losses = queue_infonce_grouped(query, key, self.queues.keys.to(query.dtype), index,
                                       h.temperature, backend=ctx.backend("queue_infonce"))
        gg, ll, lg = losses[:n], losses[n:2 * n], losses[2 * n:]
        weights = torch.tensor(h.level_weights, dtype=losses.dtype, device=losses.device)
        loss = (weights * (gg + ll + lg)).sum()
        terms = {"loss_global": (weights * gg).sum().detach(),
                 "loss_local": (weights * ll).sum().detach(),
                 "loss_cross": (weights * lg).sum().detach()}
        for level_index, level in enumerate(self.levels):
            terms[f"loss_{level}"] = (gg[level_index] + ll[level_index]
                                      + lg[level_index]).detach()
        ctx.mark("loss")
        self._step_keys.append(tuple(k.detach() for k in keys))
        return loss, terms

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self._step_keys:
            n = len(self.levels)
            for index in range(2 * n):
                keys = gather_keys(torch.cat([step[index] for step in self._step_keys]),
                                   ctx.world_size)
                self.queues[index].enqueue(keys, ctx.ok)
        self._step_keys = []

    def flops_per_image(self) -> float:
        h, cfg = self.hyper, self.cfg
        backbone = backbone_flops_per_image(cfg)
        patches = CELLS * CELLS * backbone_flops_per_image(
            dataclasses.replace(cfg, img_size=self.patch_side))
        heads = sum(head_flops([c, h.hidden, h.dim]) + head_flops([CELLS * CELLS * c, h.hidden,
                                                                   h.dim])
                    for c in self.channels)
        queues = 3 * len(self.levels) * 2 * h.queue_length * h.dim
        online = backbone + patches + heads
        return 3 * (online + queues) + online

    def describe(self) -> str:
        h = self.hyper
        return (f"DetCo on {describe_backbone(self.cfg)}, levels {'/'.join(self.levels)} weights "
                f"{'/'.join(f'{w:g}' for w in h.level_weights)}, 3x3 jigsaw of "
                f"{self.patch_side}px patches, {h.dim}-d, 8 queues of {h.queue_length}, "
                f"τ {h.temperature}; {super().describe()}")


__all__ = ["DetCo", "DetCoHyper", "DetCoHeads", "jigsaw", "jigsaw_side"]
