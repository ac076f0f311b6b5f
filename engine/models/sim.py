"""Siamese Image Modeling (SIM): online encoder + projector + predictor, EMA target branch.

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

from engine.models.vit import Block, VisionTransformer, init_transformer_, vit_flops_per_image
from engine.presets import PretrainConfig
from kernels import absolute_sincos_table, relpos_query_embed


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


class SIM(nn.Module):
    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
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
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

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

    def forward(self, view1: torch.Tensor, visible_idx: torch.Tensor, rel_geometry: torch.Tensor,
                backends: dict | None = None) -> torch.Tensor:
        """The online branch (what DistributedDataParallel wraps); see forward_online."""
        return self.forward_online(view1, visible_idx, rel_geometry, backends)

    # ---------------------------------------------------------------- target branch
    @torch.no_grad()
    def forward_target(self, view2: torch.Tensor) -> torch.Tensor:
        """Target tokens of the full view 2: (B, G², D'), before the target LayerNorm."""
        return self.target_projector(self.target_encoder(view2))[:, 1:]

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """ξ ← m·ξ + (1−m)·θ over all trainable online/target pairs, as fused _foreach ops, fp32.

        BatchNorm running buffers are not averaged (they are unused: the target runs in train mode).
        """
        if self._ema_pairs is None:
            online, target = [], []
            for src, dst in ((self.encoder, self.target_encoder),
                             (self.projector, self.target_projector)):
                for (name, p_src), (_, p_dst) in zip(src.named_parameters(),
                                                     dst.named_parameters()):
                    if p_src.requires_grad:  # the frozen patch embedding is identical: skip it
                        online.append(p_src)
                        target.append(p_dst)
            self._ema_pairs = (online, target)
        online, target = self._ema_pairs
        torch._foreach_lerp_(target, online, 1.0 - momentum)

    def _apply(self, fn, *args, **kwargs):  # moving the module invalidates the cached pairs
        self._ema_pairs = None
        return super()._apply(fn, *args, **kwargs)

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
