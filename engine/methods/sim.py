"""Siamese Image Modeling (SIM; Tao et al., "Siamese Image Modeling for Self-Supervised Vision
Representation Learning", CVPR 2023; official code fundamentalvision/Siamese-Image-Modeling, as
read in spec/SIM.md): online encoder + projector + predictor, EMA target branch, UniGrad loss.

The method: view 1 is block-masked and encoded (visible patches only); the predictor gets one query
per view-2 patch, placed by its position relative to view 1 (relpos_embed of the crop geometry),
and predicts the EMA target's tokens of the full view 2. Loss: UniGrad (kernels/unigrad_loss.py),
with F = mean t tᵀ over the WHOLE accumulated batch: `prepare` runs every micro-batch's target first
(spec §6.4, what the original 32-GPU run computed).

Shapes for the recipe (ViT-B/16, 224 px, G=14, K=78 visible of N=196, D=D'=768), per image:
  online:  view1 --patch_gather(visible_idx)--> (78, D) --[cls; ...]--> 12 blocks --> (79, D)
           --Linear--> 2 BN blocks (projector) --> (79, D')
           queries = mask_token + Linear(relpos_embed(geometry)) --> (196, D')
           predictor input [cls ; visible + P_dec[visible_idx] ; queries] (275, D')
           --> 4 BN blocks --> Linear --> last 196 = predictions (196, D')
  target:  EMA copy of encoder + Linear + projector on the FULL view 2 (197 tokens), no grad,
           train-mode BN; returns the 196 patch tokens. The loss applies the non-affine LayerNorm.
See spec/SIM.md §3–§5.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from engine.masking import make_mask, mask_generator, visible_indices
from engine.methods.base import Method, StepContext
from engine.models.vit import Block, VisionTransformer, init_transformer_, vit_flops_per_image
from engine.presets import PretrainConfig
from kernels import absolute_sincos_table, relpos_query_embed, unigrad_covariance, unigrad_loss
from pipelines.geometry import relative_geometry


class Projector(nn.Module):
    """Linear into the decoder width, then BatchNorm transformer blocks (SIM's projector)."""

    def __init__(self, dim: int, decoder_dim: int, heads: int, depth: int, mlp_ratio: float):
        super().__init__()
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.blocks = nn.ModuleList(Block(decoder_dim, heads, mlp_ratio, "bn")
                                    for _ in range(depth))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(tokens)
        for block in self.blocks:
            x = block(x)
        return x


class SIM(Method):
    name = "sim"
    paper = "Tao et al., Siamese Image Modeling for Self-Supervised Vision Representation Learning, CVPR 2023"
    official_code = "fundamentalvision/Siamese-Image-Modeling (read in spec/SIM.md)"

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        self.grid = cfg.grid
        self.encoder = VisionTransformer(cfg.img_size, cfg.patch_size, cfg.dim, cfg.depth,
                                         cfg.heads, cfg.mlp_ratio)
        self.projector = Projector(cfg.dim, cfg.decoder_dim, cfg.decoder_heads,
                                   cfg.projector_depth, cfg.mlp_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos_mlp = nn.Linear(2 * cfg.decoder_dim, cfg.decoder_dim)
        self.predictor = nn.ModuleList(Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio, "bn")
                                       for _ in range(cfg.predictor_depth))
        self.decoder_pred = nn.Linear(cfg.decoder_dim, cfg.decoder_dim)
        self.register_buffer("decoder_pos_embed",
                             absolute_sincos_table(cfg.grid, cfg.decoder_dim), persistent=True)
        init_transformer_(self.projector)
        init_transformer_(self.predictor)
        init_transformer_(self.decoder_pos_mlp)
        init_transformer_(self.decoder_pred)
        nn.init.normal_(self.mask_token, std=0.02)

        # Target branch: EMA copies of encoder and projector (no predictor), never trained by
        # the optimiser. At step 0 it equals the online network.
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    # ---------------------------------------------------------------- the method contract
    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def prepare(self, batches: list[dict], ctx: StepContext):
        """Every micro-batch's target tokens, and ONE F over all of them (all-reduced over ranks
        inside unigrad_covariance)."""
        targets = [self.forward_target(b["view2"].to(ctx.device, non_blocking=True))
                   for b in batches]
        ctx.mark("target_forward")
        covariance = unigrad_covariance(torch.cat(targets), form=self.cfg.loss_form,
                                        backend=ctx.backend("unigrad_loss"))
        ctx.mark("loss")
        return targets, covariance

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        """One micro-batch: its block mask (a generator per (rank, step, micro)), the online
        predictions for every view-2 patch, and the UniGrad loss against its targets with the
        step's F."""
        cfg, device = self.cfg, ctx.device
        targets, covariance = prepared
        mask = make_mask(cfg.mask_kind, len(batch["view1"]), cfg.grid, cfg.num_masked,
                         generator=mask_generator(cfg.seed, ctx.rank, ctx.step, ctx.micro, device),
                         device=device)
        visible_idx = visible_indices(mask, num_visible=cfg.grid ** 2 - cfg.num_masked,
                                      check=False)
        rel = relative_geometry(batch["boxes"], batch["flips"], batch["image_size"]).to(device)
        pred = self.forward_online(batch["view1"].to(device, non_blocking=True), visible_idx, rel,
                                   backends=ctx.backends)
        ctx.mark("online_forward")
        loss = unigrad_loss(pred, targets[ctx.micro], cfg.neg_weight, covariance=covariance,
                            form=cfg.loss_form, global_weight=cfg.global_weight,
                            dense_weight=cfg.dense_weight, backend=ctx.backend("unigrad_loss"))
        ctx.mark("loss")
        return loss, {}

    # ---------------------------------------------------------------- online branch
    def forward_online(self, view1: torch.Tensor, visible_idx: torch.Tensor,
                       rel_geometry: torch.Tensor, backends: dict | None = None) -> torch.Tensor:
        """Predictions for every view-2 patch: (B, G², D'). `backends` maps op name -> kernel
        backend ("auto", "reference", "triton"); missing ops use "auto"."""
        backends = backends or {}
        batch, visible = visible_idx.shape
        patch_tokens = self.encoder.embed_patches(view1, visible_idx,
                                                  backend=backends.get("patch_gather", "auto"))
        hidden = self.projector(self.encoder.forward_tokens(patch_tokens))      # (B, 1+K, D')

        # Predictor input [cls ; visible + P_dec[visible] ; one query per view-2 patch], built in
        # one preallocated buffer: the query block is written straight into its slice by
        # relpos_query_embed (mask token + Linear(sin-cos relpos), never a (B, G², 2D') table on
        # the fused path), so no torch.cat copies the sequence.
        x = hidden.new_empty(batch, 1 + visible + self.grid ** 2, hidden.shape[-1])
        x[:, :1] = hidden[:, :1]
        x[:, 1:1 + visible] = hidden[:, 1:] + self.decoder_pos_embed.to(hidden.dtype)[visible_idx]
        # The geometry comes from pipelines.geometry on the loader's boxes (positive sizes by
        # construction): skipping the value checks removes their host sync from every step.
        relpos_query_embed(rel_geometry, self.grid, self.decoder_pos_mlp.weight,
                           self.decoder_pos_mlp.bias, self.mask_token, out=x[:, 1 + visible:],
                           backend=backends.get("relpos_embed", "auto"), check_values=False)
        for block in self.predictor:
            x = block(x)
        return self.decoder_pred(x[:, 1 + visible:])

    # ---------------------------------------------------------------- target branch
    @torch.no_grad()
    def forward_target(self, view2: torch.Tensor) -> torch.Tensor:
        """Target tokens of the full view 2: (B, G², D'), before the target LayerNorm."""
        return self.target_projector(self.target_encoder(view2))[:, 1:]

    def update_target(self, momentum: float) -> None:
        """The EMA update (Method.before_step): ξ ← m·ξ + (1−m)·θ, fused _foreach ops."""
        self.before_step(momentum)

    # ---------------------------------------------------------------- bookkeeping
    def flops_per_image(self) -> float:
        return sim_flops_per_image(self.cfg)

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return (f"SIM ViT {self.cfg.dim}d×{self.cfg.depth} patch {self.cfg.patch_size} "
                f"@{self.cfg.img_size}px, grid {self.grid}, {self.cfg.num_masked}/{self.grid ** 2} "
                f"masked; {trainable / 1e6:.2f}M trainable params, "
                f"{self.flops_per_image() / 1e9:.2f} GFLOP/img/step")


def sim_flops_per_image(cfg: PretrainConfig) -> float:
    """Model FLOPs (2·MAC; linear layers + attention) per image per training step: online
    forward + backward (≈ 3× forward; the frozen patch embedding has no backward) + target forward."""
    n = cfg.grid ** 2
    visible = n - cfg.num_masked
    patch = 2 * 3 * cfg.patch_size ** 2 * cfg.dim
    online = (vit_flops_per_image(visible + 1, cfg.dim, cfg.depth, cfg.mlp_ratio)
              + 2 * (visible + 1) * cfg.dim * cfg.decoder_dim
              + vit_flops_per_image(visible + 1, cfg.decoder_dim, cfg.projector_depth,
                                    cfg.mlp_ratio)
              + 2 * n * 2 * cfg.decoder_dim * cfg.decoder_dim
              + vit_flops_per_image(1 + visible + n, cfg.decoder_dim, cfg.predictor_depth,
                                    cfg.mlp_ratio)
              + 2 * n * cfg.decoder_dim ** 2)
    target = (n * patch + vit_flops_per_image(n + 1, cfg.dim, cfg.depth, cfg.mlp_ratio)
              + 2 * (n + 1) * cfg.dim * cfg.decoder_dim
              + vit_flops_per_image(n + 1, cfg.decoder_dim, cfg.projector_depth, cfg.mlp_ratio))
    return visible * patch + 3 * online + target


__all__ = ["SIM", "Projector", "sim_flops_per_image"]
