"""The ViT backbone used by SIM, written here (no timm/torchvision: neither imports beside the CPU torch).

Parameter names follow timm's ViT (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.i.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`) so that an exported encoder loads into
detection and segmentation codebases without renaming.

SIM-specific choices (spec/SIM.md §3.1):
- the patch embedding is a random Xavier-uniform projection, then frozen (as in MoCo v3);
- positions are a fixed 2-D sin-cos table with the ROW half first, cls slot zeros;
- no final LayerNorm during pre-training (the raw residual stream feeds the projector);
- LayerNorm runs in fp32 even under autocast; attention goes through scaled_dot_product_attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import absolute_sincos_table, patch_gather


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 with autocast off, cast back to the input dtype (spec §3.1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape,
                               None if self.weight is None else self.weight.float(),
                               None if self.bias is None else self.bias.float(), self.eps)
        return out.to(x.dtype)


class TokenBatchNorm(nn.Module):
    """BatchNorm over channels of (B, L, C) tokens, statistics over all B·L tokens, in fp32.

    SIM's projector and predictor use this ("PermuteBN"); cls and patch tokens share statistics.
    The BatchNorm is an inner module so that `SyncBatchNorm.convert_sync_batchnorm` can swap it
    for a synchronised one under data parallelism while this wrapper keeps the token layout.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            batch, length, channels = x.shape
            out = self.bn(x.float().reshape(batch * length, channels))
        return out.reshape(batch, length, channels).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "ln":
        return FP32LayerNorm(dim, eps=1e-6)
    if kind == "bn":
        return TokenBatchNorm(dim)
    raise ValueError(f"unknown norm kind {kind!r}: use 'ln' or 'bn'")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(N(x)), then x + MLP(N(x)); N is LayerNorm or token BN."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm: str = "ln"):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads)
        self.norm2 = make_norm(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def flat_weight(self) -> torch.Tensor:
        """The conv weight as (D, C·p·p) in (c, row, col) order: the layout patch_gather expects."""
        return self.proj.weight.reshape(self.proj.out_channels, -1)


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, in_chans: int = 3, freeze_patch_embed: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.img_size, self.patch_size, self.dim = img_size, patch_size, dim
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = absolute_sincos_table(self.grid, dim)
        # Fixed positions; slot 0 (cls) is zeros. A buffer, so it is saved but never trained.
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, dim), table]).unsqueeze(0),
                             persistent=True)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, "ln") for _ in range(depth))
        self._init_weights()
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)

    def _init_weights(self) -> None:
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        init_transformer_(self.blocks)

    def embed_patches(self, images: torch.Tensor, patch_idx: torch.Tensor,
                      backend: str = "auto") -> torch.Tensor:
        """Embedded tokens (+ positions) of the listed patches only: (B,K,D). Masked patches are
        never embedded (patch_gather reads just the K patches' pixels)."""
        weight = self.patch_embed.flat_weight().to(images.dtype)
        bias = self.patch_embed.proj.bias.to(images.dtype)
        # The indices come from engine.masking (in range by construction), so the per-call range
        # check (a host sync) is skipped; the kernel still masks every access.
        return patch_gather(images, patch_idx, self.patch_size, weight, bias,
                            self.pos_embed[0, 1:], backend=backend, check_index=False)

    def forward_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[cls ; patch tokens] through the blocks; returns (B, 1+K, D) with no final norm."""
        cls = self.cls_token.expand(patch_tokens.shape[0], -1, -1).to(patch_tokens.dtype)
        x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """All patches of full images: (B, 1+G², D)."""
        tokens = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        return self.forward_tokens(tokens + self.pos_embed[:, 1:].to(tokens.dtype))


def init_transformer_(module: nn.Module) -> None:
    """Xavier-uniform Linear weights, zero biases; norms weight 1 bias 0 (spec §3.1)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def vit_flops_per_image(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (2·MAC) of `depth` blocks over `tokens` tokens: linear layers + attention."""
    linear = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * dim
    return float(depth * (linear + attention))


__all__ = ["VisionTransformer", "Block", "FP32LayerNorm", "TokenBatchNorm", "init_transformer_",
           "vit_flops_per_image"]
