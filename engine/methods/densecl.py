"""DenseCL: dense contrastive learning, a MoCo v2 whose head also contrasts every feature cell.

Paper: Wang, Zhang, Shen, Kong, Li, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", CVPR 2021. Official code: WXinlong/DenseCL @ b64bbb6e (`openselfsup/models/
densecl.py`, `necks.py::DenseCLNeck`, `configs/selfsup/densecl/densecl_imagenet_200ep.py`); the
loss as spec/OFFICIAL.md §1 reads it line by line.

The method. Query encoder f_q, key encoder f_k = EMA(f_q) (m = 0.999 constant), both a backbone
followed by DenseCLNeck on its dense map F (C5 (N, 2048, 7, 7) for ResNet-50 at 224, or a ViT's
patch grid):
  global branch  g = MLP(GAP(F))                 2048-2048-128 (no BN)      -> q, k          (N, 128)
  dense branch   d = Conv1x1-ReLU-Conv1x1(F)     2048-2048-128 (no BN)      -> q_grid, k_grid (N, 128, S)
                 k2 = GAP(d of the key)          the dense queue's entry    -> (N, 128)
all L2-normalised. Correspondence: for every query cell i, the key cell j*(i) whose BACKBONE
feature (F, not the neck's) is the most cosine-similar (kernels/dense_match.py, no gradient, query
-> key only). With two queues of K = 65,536 keys, τ = 0.2 and λ = 0.5:

    L_global = InfoNCE(q, k, queue)                         N rows
    L_dense  = InfoNCE(q_grid_i, k_grid_{j*(i)}, queue2)    N·S rows; queue2 holds one pooled
                                                            dense key (k2) per image
    L = (1 − λ)·L_global + λ·L_dense

Both InfoNCE terms run through kernels/queue_infonce.py (DenseCL's dense term at its real size
is 1,568 rows × 65,537 logits per GPU: 411 MB of fp32 that the kernel never stores). After the
step: enqueue k into queue and k2 into queue2, all-gathered over ranks.

Departures from the official code: as MoCo v2's (engine/methods/mocov2.py: per-step enqueue,
per-iteration cosine lr, seeded shuffle permutation). `dense_warmup_steps` implements the
repository's DenseCLWarmupHook (λ = 0 for the first steps); no released config enables it, so it
defaults to 0. The neck initialisation follows the code: the global Linear layers kaiming-normal
(fan_in), the dense 1×1 convolutions PyTorch's default.
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
from engine.models.moco import KeyQueue, gather_keys, shuffle_generator, shuffled_forward
from kernels import dense_match, queue_infonce


@dataclass
class DenseCLHyper:
    queue_length: int = 65536
    dim: int = 128
    hidden: int = 2048
    temperature: float = 0.2
    loss_lambda: float = 0.5          # weight of the dense term
    dense_warmup_steps: int = 0       # DenseCLWarmupHook: λ = 0 before this step (off in releases)

    def validate(self) -> None:
        if self.queue_length < 1 or self.dim < 1 or self.hidden < 1:
            raise ValueError("queue_length, dim and hidden must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.loss_lambda <= 1:
            raise ValueError(f"loss_lambda must be in [0, 1], got {self.loss_lambda}")
        if self.dense_warmup_steps < 0:
            raise ValueError("dense_warmup_steps must be >= 0")


class DenseCLNeck(nn.Module):
    """The two branches on the backbone's dense map; returns (g, d, d2) unnormalised."""

    def __init__(self, channels: int, hidden: int, dim: int):
        super().__init__()
        self.mlp = mlp([channels, hidden, dim], init="kaiming")
        self.mlp2 = mlp([channels, hidden, dim], dense=True)

    def forward(self, features: torch.Tensor):
        global_embedding = self.mlp(pooled(features))
        dense = self.mlp2(features)
        return global_embedding, dense.flatten(2), pooled(dense)


class DenseCL(Method):
    name = "densecl"
    paper = "Wang et al., Dense Contrastive Learning for Self-Supervised Visual Pre-Training, CVPR 2021"
    official_code = "WXinlong/DenseCL @ b64bbb6e"
    sync_batchnorm = False     # shuffle-BN, as MoCo
    Hyper = DenseCLHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        self.channels = backbone_channels(self.encoder)
        self.neck = DenseCLNeck(self.channels, h.hidden, h.dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_neck = copy.deepcopy(self.neck).requires_grad_(False)
        self.queue = KeyQueue(h.queue_length, h.dim)          # global keys k
        self.queue_dense = KeyQueue(h.queue_length, h.dim)    # pooled dense keys k2
        self._step_keys: list[tuple[torch.Tensor, torch.Tensor]] = []

    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.neck, self.target_neck)]

    def _keys(self, images: torch.Tensor):
        features = dense_map(self.target_encoder, images)
        g, d, d2 = self.target_neck(features)
        return (F.normalize(g, dim=1), F.normalize(d, dim=1), F.normalize(d2, dim=1),
                features.flatten(2))

    def dense_lambda(self, step: int) -> float:
        return 0.0 if step < self.hyper.dense_warmup_steps else self.hyper.loss_lambda

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        h = self.hyper
        view1 = batch["view1"].to(ctx.device, non_blocking=True)
        view2 = batch["view2"].to(ctx.device, non_blocking=True)
        features_q = dense_map(self.encoder, view1)                     # (N, C, H, W)
        g, d, _ = self.neck(features_q)
        q, q_grid = F.normalize(g, dim=1), F.normalize(d, dim=1)       # (N, D), (N, D, S)
        ctx.mark("online_forward")
        with torch.no_grad():
            k, k_grid, k2, features_k = shuffled_forward(
                self._keys, view2, ctx.rank, ctx.world_size,
                shuffle_generator(ctx.seed, ctx.step, ctx.micro))
        ctx.mark("target_forward")
        # j*(i): for each query cell the key cell with the most similar backbone feature.
        match, _ = dense_match(features_q.detach().flatten(2).transpose(1, 2),
                               features_k.transpose(1, 2), backend=ctx.backend("dense_match"))
        positives = torch.gather(k_grid, 2, match[:, None, :].expand(-1, k_grid.shape[1], -1))
        ctx.mark("matching")
        dim = q_grid.shape[1]
        # Queues in the queries' dtype (bf16 under autocast: the kernel's tensor-core path).
        loss_global = queue_infonce(q, k, self.queue.keys.to(q.dtype), h.temperature,
                                    backend=ctx.backend("queue_infonce"))
        loss_dense = queue_infonce(q_grid.transpose(1, 2).reshape(-1, dim),
                                   positives.transpose(1, 2).reshape(-1, dim),
                                   self.queue_dense.keys.to(q_grid.dtype), h.temperature,
                                   backend=ctx.backend("queue_infonce"))
        lam = self.dense_lambda(ctx.step)
        loss = (1 - lam) * loss_global + lam * loss_dense
        ctx.mark("loss")
        self._step_keys.append((k, k2))
        return loss, {"loss_global": loss_global.detach(), "loss_dense": loss_dense.detach()}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self._step_keys:
            keys = torch.cat([k for k, _ in self._step_keys])
            pooled_dense = torch.cat([k2 for _, k2 in self._step_keys])
            self.queue.enqueue(gather_keys(keys, ctx.world_size), ctx.ok)
            self.queue_dense.enqueue(gather_keys(pooled_dense, ctx.world_size), ctx.ok)
        self._step_keys = []

    def flops_per_image(self) -> float:
        h, cells = self.hyper, dense_grid(self.cfg) ** 2
        backbone = backbone_flops_per_image(self.cfg)
        neck = (head_flops([self.channels, h.hidden, h.dim])
                + head_flops([self.channels, h.hidden, h.dim], cells))
        queues = 2 * (1 + cells) * h.queue_length * h.dim
        matching = 2 * cells * cells * self.channels
        return 3 * (backbone + neck + queues) + backbone + neck + matching

    def describe(self) -> str:
        h = self.hyper
        grid = dense_grid(self.cfg)
        return (f"DenseCL on {describe_backbone(self.cfg)} ({grid}x{grid} dense map), "
                f"{h.dim}-d, queues {h.queue_length}, τ {h.temperature}, λ {h.loss_lambda}; "
                f"{super().describe()}")


__all__ = ["DenseCL", "DenseCLHyper", "DenseCLNeck"]
