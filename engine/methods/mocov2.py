"""MoCo v2: the instance-level baseline every dense method is compared with.

Paper: Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning", arXiv
2003.04297 (2020), on He et al., "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020. Official code: facebookresearch/moco @ 78b69caf (`moco/builder.py`,
`main_moco.py --mlp --moco-t 0.2 --aug-plus --cos`).

The method: a query encoder f_q and a key encoder f_k = EMA(f_q) (m = 0.999, constant, updated
before the key forward); both are backbone -> global average pool -> MLP head (2048-2048-128,
no BN) -> L2 normalisation. For view 1's query q and view 2's key k (stop-gradient, the key batch
shuffled across ranks for BatchNorm), with a queue of K = 65,536 earlier keys:

    L = mean_i  −q_i·k_i/τ + log( exp(q_i·k_i/τ) + Σ_j exp(q_i·queue_j/τ) ),   τ = 0.2

i.e. cross-entropy with label 0 over [positive, queue] (kernels/queue_infonce.py, which never
stores the (B, K+1) logits). After the step the keys of all ranks are enqueued.

Departures from the official code:
  * the loss is not symmetrised (as in MoCo v2); the queue is enqueued once per optimiser step
    (after every micro-batch's loss) rather than once per forward, so gradient accumulation sees
    one queue per step — identical when accum = 1;
  * the cosine lr schedule is per iteration (the official one steps once per epoch);
  * the shuffle-BN permutation is drawn from a seeded generator on every rank instead of being
    broadcast from rank 0 (same distribution, exact on resume);
  * on a ViT backbone the pooled feature is the mean of the patch tokens (MoCo v3 uses the cls
    token and a BN head; this is MoCo v2's head on our ViT).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.methods.base import Method, StepContext
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     dense_map, describe_backbone, pooled)
from engine.models.heads import head_flops, mlp
from engine.models.moco import KeyQueue, gather_keys, shuffle_generator, shuffled_forward
from kernels import queue_infonce


@dataclass
class MoCoHyper:
    queue_length: int = 65536
    dim: int = 128           # key/query embedding
    hidden: int = 2048       # MLP head hidden width
    temperature: float = 0.2

    def validate(self) -> None:
        if self.queue_length < 1 or self.dim < 1 or self.hidden < 1:
            raise ValueError("queue_length, dim and hidden must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


class MoCoV2(Method):
    name = "mocov2"
    paper = "Chen et al., Improved Baselines with Momentum Contrastive Learning, 2020"
    official_code = "facebookresearch/moco @ 78b69caf"
    sync_batchnorm = False     # shuffle-BN instead
    Hyper = MoCoHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        self.head_dims = [backbone_channels(self.encoder), h.hidden, h.dim]
        self.head = mlp(self.head_dims)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        self.queue = KeyQueue(h.queue_length, h.dim)
        self._step_keys: list[torch.Tensor] = []

    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.head, self.target_head)]

    def embed(self, encoder, head, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(pooled(dense_map(encoder, images))), dim=1)

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        view1 = batch["view1"].to(ctx.device, non_blocking=True)
        view2 = batch["view2"].to(ctx.device, non_blocking=True)
        query = self.embed(self.encoder, self.head, view1)
        ctx.mark("online_forward")
        with torch.no_grad():
            key = shuffled_forward(lambda x: self.embed(self.target_encoder, self.target_head, x),
                                   view2, ctx.rank, ctx.world_size,
                                   shuffle_generator(ctx.seed, ctx.step, ctx.micro))
        ctx.mark("target_forward")
        # The queue in the query's dtype: under bf16 autocast the kernel then streams it on the
        # tensor cores (a 16 MB cast per step at K = 65,536, D = 128).
        loss = queue_infonce(query, key, self.queue.keys.to(query.dtype), self.hyper.temperature,
                             backend=ctx.backend("queue_infonce"))
        ctx.mark("loss")
        self._step_keys.append(key)
        return loss, {}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self._step_keys:
            self.queue.enqueue(gather_keys(torch.cat(self._step_keys), ctx.world_size), ctx.ok)
        self._step_keys = []

    def flops_per_image(self) -> float:
        backbone = backbone_flops_per_image(self.cfg)
        head = head_flops(self.head_dims)
        queue = 2 * self.hyper.queue_length * self.hyper.dim
        return 3 * (backbone + head + queue) + backbone + head

    def describe(self) -> str:
        h = self.hyper
        return (f"MoCo v2 on {describe_backbone(self.cfg)}; head {'-'.join(map(str, self.head_dims))}"
                f", queue {h.queue_length}, τ {h.temperature}; {super().describe()}")


__all__ = ["MoCoV2", "MoCoHyper"]
