"""SwAV: swapped prediction of Sinkhorn-Knopp cluster codes over multi-crop views.

Paper: Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features
by Contrasting Cluster Assignments", NeurIPS 2020. Official code: facebookresearch/swav @ 06b1b7cb
(`main_swav.py`: `train`, `distributed_sinkhorn`; `src/resnet50.py`), read in spec/OFFICIAL.md §4.

The method, per image with V crops (2 large + 6 small by default, batch["crops"]):
    z_v = normalize(head(backbone(crop_v)))        head: Linear(C, 2048)-BN-ReLU-Linear(2048, 128)
    s_v = z_v · Cᵀ                                 C: 3000 prototypes, rows renormalised to unit
                                                   length at the start of every step (no bias)
    for a in (0, 1), the large crops:
        q_a = sinkhorn(sg(s_a), ε = 0.05, 3 iterations)      (kernels/sinkhorn.py; batch rows only
                                                             when the queue's rows are prepended)
        ℓ_a = Σ_{v ≠ a} mean_b[ −Σ_k q_a[b,k] · log_softmax(s_v[b] / τ)_k ] / (V − 1)
    L = (ℓ_0 + ℓ_1) / 2,  τ = 0.1
Crops of equal size go through the backbone together (two calls for 2×224 + 6×96). The prototype
gradient is zero for the first `freeze_prototypes_steps` steps (313 in the 4,096-batch recipe).

Queue (`queue_length` > 0; 3,840 in the 256-batch scripts, from epoch 15): per assigned crop a ring
of the last embeddings z_a (not codes). Once it has been filled, its scores against the CURRENT
prototypes are prepended to s_a before Sinkhorn, so the codes are balanced over queue + batch, and
only the batch rows are kept. Sinkhorn's row sums are all-reduced across ranks inside the kernel
(kernels/sinkhorn.py, `process_group`), as `distributed_sinkhorn` does.

Departures from the official code (each is exact for one process with accum = 1 unless said):
  * the queue is a ring (a write pointer) instead of shift-by-batch; the same rows, another order,
    and Sinkhorn does not depend on the order of its samples;
  * embeddings are enqueued once per optimiser step, after every micro-batch (the official code
    enqueues inside the forward), so every micro-batch of a step sees the same queue;
  * "use the queue once it is full": the official code tests the last slot on the device each
    step (a host sync); here it is a function of the step, `step >= queue_start_step +
    ceil(queue_length / global batch)` (queue_start_step is the official epoch_queue_starts in
    steps: set it from the run's steps per epoch). A skipped (non-finite) step enqueues nothing,
    so a queue may then be used with a few all-zero rows (scores 0 against every prototype);
  * the prototype freeze zeroes the gradient instead of setting it to None, so weight decay still
    shrinks the prototypes; the renormalisation at the next step undoes any change of length
    (their direction cannot change without a gradient);
  * Sinkhorn runs in the log domain (no overflow in fp16/bf16 or at small ε); the official fp32
    exp(s/ε) is exact for |s| <= 1 and gives the same codes;
  * LARC (apex) is our LARS with the weight-decay filter "none" (every tensor adapted);
  * on the ViT backbone the pooled feature is the mean patch token, and small crops use the fixed
    sin-cos positions of their own (smaller) patch grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import CropSpec, Method, StepContext, ViewSpec
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     dense_map, describe_backbone, pooled)
from engine.models.heads import head_flops, mlp
from engine.models.moco import gather_keys
from engine.presets import ConfigError
from kernels import sinkhorn


@dataclass
class SwAVHyper:
    prototypes: int = 3000
    hidden: int = 2048          # projection head hidden width
    dim: int = 128              # embedding
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    large_crops: int = 2        # the crops codes are computed for (crops_for_assign 0 1)
    small_crops: int = 6
    small_size: int = 0         # pixels; 0: 96 × img_size / 224 (96 at 224) rounded to a multiple
                                # of 8 (of the patch size on a ViT)
    large_scale: tuple[float, float] = (0.14, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.14)
    queue_length: int = 0       # 0 in the 4,096-batch recipe, 3,840 in the 256-batch ones
    queue_start_step: int = 0   # epoch_queue_starts (15) × steps per epoch
    freeze_prototypes_steps: int = 313

    def validate(self) -> None:
        if min(self.prototypes, self.hidden, self.dim, self.sinkhorn_iterations) < 1:
            raise ValueError("prototypes, hidden, dim and sinkhorn_iterations must be at least 1")
        if self.large_crops != 2:
            raise ValueError(f"large_crops must be 2 (codes come from the two large crops), got "
                             f"{self.large_crops}")
        if self.small_crops < 0 or self.small_size < 0 or self.queue_length < 0 \
                or self.queue_start_step < 0 or self.freeze_prototypes_steps < 0:
            raise ValueError("small_crops, small_size, queue_length, queue_start_step and "
                             "freeze_prototypes_steps must be >= 0")
        if not (self.temperature > 0 and self.epsilon > 0):
            raise ValueError("temperature and epsilon must be positive")
        for name in ("large_scale", "small_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")


class SwAV(Method):
    name = "swav"
    paper = ("Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster "
             "Assignments, NeurIPS 2020")
    official_code = "facebookresearch/swav @ 06b1b7cb"
    sync_batchnorm = True
    Hyper = SwAVHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        self.head_dims = [backbone_channels(self.encoder), h.hidden, h.dim]
        self.head = mlp(self.head_dims, bn=True)
        self.prototypes = nn.Linear(h.dim, h.prototypes, bias=False)
        # (2, length, dim) embeddings of the two large crops, zeros until written (as official)
        self.register_buffer("queue", torch.zeros(h.large_crops, h.queue_length, h.dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))
        self._step_embeddings: list[torch.Tensor] = []
        self.small_size = self._small_size(cfg)

    # -------------------------------------------------------------- the views it asks for
    def _small_size(self, cfg) -> int:
        h = self.hyper
        if h.small_size:
            return h.small_size
        multiple = cfg.patch_size if cfg.backbone == "vit" else 8
        return max(multiple, round(cfg.img_size * 96 / 224 / multiple) * multiple)

    @property
    def views(self) -> ViewSpec:
        h = self.hyper
        crops = [CropSpec(h.large_crops, self.cfg.img_size, tuple(h.large_scale))]
        if h.small_crops:
            crops.append(CropSpec(h.small_crops, self.small_size, tuple(h.small_scale)))
        return ViewSpec(crops=tuple(crops))

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        h = cls.hyperparameters(cfg)
        if cfg.backbone == "vit" and h.small_size and h.small_size % cfg.patch_size:
            raise ConfigError(f"swav: small_size {h.small_size} must be a multiple of the ViT "
                              f"patch size {cfg.patch_size}")

    # -------------------------------------------------------------- the step
    @torch.no_grad()
    def before_step(self, momentum: float) -> None:
        """Prototype rows back to unit length (official: at the start of every iteration)."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1, p=2))

    def embed(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """(V·B, dim) normalised embeddings, crop-major; crops of one size in one backbone call."""
        out, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            out.append(pooled(dense_map(self.encoder, torch.cat(crops[start:end]))))
            start = end
        return F.normalize(self.head(torch.cat(out)), dim=1)

    def queue_in_use(self, step: int, global_batch: int) -> bool:
        h = self.hyper
        if h.queue_length == 0:
            return False
        return step >= h.queue_start_step + math.ceil(h.queue_length / max(1, global_batch))

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        h = self.hyper
        crops = [c.to(ctx.device, non_blocking=True) for c in batch["crops"]]
        bs, views = crops[0].shape[0], len(crops)
        embedding = self.embed(crops)
        frozen = ctx.step < h.freeze_prototypes_steps
        weight = self.prototypes.weight
        weight = weight.detach() + (0.0 if frozen else 1.0) * (weight - weight.detach())
        scores = embedding @ weight.t().to(embedding.dtype)         # (V·B, K)
        ctx.mark("online_forward")

        group = dist.group.WORLD if ctx.distributed and dist.is_initialized() else None
        use_queue = self.queue_in_use(ctx.step, bs * ctx.world_size * ctx.micro_batches)
        loss = scores.new_zeros((), dtype=torch.float32)
        log_prob = F.log_softmax(scores.float() / h.temperature, dim=1).view(views, bs, -1)
        for a in range(h.large_crops):
            with torch.no_grad():
                out = scores[a * bs:(a + 1) * bs].detach().float()
                if use_queue:
                    out = torch.cat([self.queue[a] @ weight.detach().t().float(), out])
                codes = sinkhorn(out, h.epsilon, h.sinkhorn_iterations, process_group=group,
                                 backend=ctx.backend("sinkhorn"))[-bs:]
            others = [v for v in range(views) if v != a]
            cross = -(codes[None] * log_prob[others]).sum(dim=2).mean(dim=1)   # per crop v
            loss = loss + cross.sum() / (views - 1)
        loss = loss / h.large_crops
        ctx.mark("loss")
        if h.queue_length and ctx.step >= h.queue_start_step:
            self._step_embeddings.append(embedding[:h.large_crops * bs].detach()
                                         .view(h.large_crops, bs, -1))
        return loss, {}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """The step's large-crop embeddings (all ranks, rank order) into the ring, if ok."""
        if not self._step_embeddings:
            return
        h = self.hyper
        rows = torch.cat(self._step_embeddings, dim=1)                     # (2, n, dim)
        rows = torch.stack([gather_keys(rows[a], ctx.world_size) for a in range(h.large_crops)])
        self._step_embeddings = []
        n = rows.shape[1]
        keep = rows[:, n - min(n, h.queue_length):].to(self.queue.dtype)
        slots = (self.queue_ptr + (n - keep.shape[1])
                 + torch.arange(keep.shape[1], device=self.queue.device)) % h.queue_length
        ok = torch.ones((), dtype=torch.bool, device=self.queue.device) if ctx.ok is None \
            else ctx.ok
        self.queue[:, slots] = torch.where(ok, keep, self.queue[:, slots])
        self.queue_ptr.copy_((self.queue_ptr + n * ok.long()) % h.queue_length)

    # -------------------------------------------------------------- bookkeeping
    def flops_per_image(self) -> float:
        h, cfg = self.hyper, self.cfg
        large = backbone_flops_per_image(cfg)
        small = large * (self.small_size / cfg.img_size) ** 2
        per_crop_head = head_flops(self.head_dims) + 2 * h.dim * h.prototypes
        forward = h.large_crops * large + h.small_crops * small \
            + (h.large_crops + h.small_crops) * per_crop_head
        return 3 * forward

    def describe(self) -> str:
        h = self.hyper
        crops = f"{h.large_crops}×{self.cfg.img_size}" + (
            f" + {h.small_crops}×{self.small_size}" if h.small_crops else "")
        queue = (f", queue {h.queue_length} from step {h.queue_start_step}" if h.queue_length
                 else "")
        return (f"SwAV on {describe_backbone(self.cfg)}; crops {crops}; head "
                f"{'-'.join(map(str, self.head_dims))}, {h.prototypes} prototypes, τ "
                f"{h.temperature}, ε {h.epsilon}{queue}; {super().describe()}")


__all__ = ["SwAV", "SwAVHyper"]
