"""Backbones every method can use, behind three functions: build, dense map, pooled vector.

  vit        engine/models/vit.py: timm-named ViT (frozen random patch embedding, fixed sin-cos
             positions, no final norm, as SIM trains it). Its dense map is the patch-token grid
             (B, D, G, G), G = img_size / patch_size; the cls token is left out.
  resnet18,  engine/models/resnet.py: torchvision-named ResNet without avgpool/fc. Its dense map
  resnet50   is C5 (B, 512 | 2048, S/32, S/32), or S/8 with the CIFAR stem.

So every dense objective runs on a ViT too: its "feature map" is the patch-token grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.models.resnet import ResNet, build_resnet, resnet_flops_per_image
from engine.models.vit import VisionTransformer, vit_flops_per_image
from engine.presets import ConfigError, PretrainConfig
from kernels import absolute_sincos_table


def build_backbone(cfg: PretrainConfig) -> nn.Module:
    """cfg's backbone, freshly initialised. A ResNet gets a plain `img_size` attribute (the size it
    is trained at; evaluation resizes images to it), as our ViT has one by construction."""
    if cfg.backbone == "vit":
        return VisionTransformer(cfg.img_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads,
                                 cfg.mlp_ratio)
    if cfg.backbone in ("resnet18", "resnet50"):
        encoder = build_resnet(cfg.backbone, cifar_stem=cfg.cifar_stem,
                               zero_init_residual=cfg.zero_init_residual)
        encoder.img_size = cfg.img_size
        return encoder
    raise ConfigError(f"unknown backbone {cfg.backbone!r}: use vit, resnet18 or resnet50")


def backbone_channels(encoder: nn.Module) -> int:
    """Channels of the dense map (= of the pooled vector)."""
    if isinstance(encoder, VisionTransformer):
        return encoder.dim
    if isinstance(encoder, ResNet):
        return encoder.out_channels
    raise TypeError(f"not a densesim backbone: {type(encoder).__name__}")


def dense_grid(cfg: PretrainConfig) -> int:
    """Side of the dense map for cfg's backbone at cfg.img_size."""
    if cfg.backbone == "vit":
        return cfg.img_size // cfg.patch_size
    return cfg.img_size // (8 if cfg.cifar_stem else 32)


def dense_map(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's dense output (B, C, H, W): ResNet C5, or the ViT patch tokens as a grid."""
    if isinstance(encoder, VisionTransformer):
        grid = images.shape[-1] // encoder.patch_size
        if grid == encoder.grid:
            tokens = encoder(images)[:, 1:]                      # (B, G², D), cls dropped
        else:   # another crop size (multi-crop): the fixed sin-cos positions of its own grid
            if images.shape[-2] != images.shape[-1] or images.shape[-1] % encoder.patch_size:
                raise ValueError(f"a ViT crop must be square and a multiple of the patch size "
                                 f"{encoder.patch_size}, got {tuple(images.shape[-2:])}")
            patches = encoder.patch_embed.proj(images).flatten(2).transpose(1, 2)
            table = absolute_sincos_table(grid, encoder.dim).to(patches)
            tokens = encoder.forward_tokens(patches + table)[:, 1:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid)
    return encoder(images)


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average of a dense map (B, C, H, W) -> (B, C)."""
    return features.mean(dim=(2, 3))


def backbone_flops_per_image(cfg: PretrainConfig) -> float:
    """Forward FLOPs (2·MAC) of cfg's backbone on one full image."""
    if cfg.backbone == "vit":
        grid = cfg.img_size // cfg.patch_size
        patch = 2 * 3 * cfg.patch_size ** 2 * cfg.dim * grid ** 2
        return patch + vit_flops_per_image(grid ** 2 + 1, cfg.dim, cfg.depth, cfg.mlp_ratio)
    return float(resnet_flops_per_image(cfg.backbone, cfg.img_size, cifar_stem=cfg.cifar_stem))


def describe_backbone(cfg: PretrainConfig) -> str:
    if cfg.backbone == "vit":
        return f"ViT {cfg.dim}d×{cfg.depth} patch {cfg.patch_size} @{cfg.img_size}px"
    stem = ", CIFAR stem" if cfg.cifar_stem else ""
    return f"{cfg.backbone}{stem} @{cfg.img_size}px"


# ---------------------------------------------------------------------------- feature levels
# Multi-level methods (DetCo: C2-C5, SCFS: C3-C5) read the backbone at several depths. ResNet: the
# outputs of layer1..layer4 (strides 4, 8, 16, 32; 1, 2, 4, 8 with the CIFAR stem). ViT, which has
# no stages: "c2".."c5" are the patch-token grids after evenly spaced blocks, level k = 1..4 after
# block ceil(k·depth/4) (depth 12: blocks 3, 6, 9, 12, the last one being dense_map's grid; a
# shallower ViT repeats blocks, depth 1: every level is block 1's output).
FEATURE_LEVELS = ("c2", "c3", "c4", "c5")


def vit_level_blocks(depth: int) -> dict[str, int]:
    """{level: 0-based index of the ViT block whose output is that level}."""
    return {level: -(-(k + 1) * depth // 4) - 1 for k, level in enumerate(FEATURE_LEVELS)}


def level_channels(encoder: nn.Module, level: str) -> int:
    """Channels of the backbone's map at `level` ("c2".."c5")."""
    if level not in FEATURE_LEVELS:
        raise ValueError(f"unknown feature level {level!r}: use {', '.join(FEATURE_LEVELS)}")
    if isinstance(encoder, VisionTransformer):
        return encoder.dim
    if isinstance(encoder, ResNet):
        return encoder.channels[level]
    raise TypeError(f"not a densesim backbone: {type(encoder).__name__}")


def dense_levels(encoder: nn.Module, images: torch.Tensor,
                 levels=FEATURE_LEVELS) -> dict[str, torch.Tensor]:
    """{level: (B, C, H, W) map} for the requested levels, running the backbone once and only as
    deep as the deepest level asked for. A ViT takes any square crop whose side is a multiple of
    its patch size (the fixed sin-cos positions of that grid, as dense_map)."""
    if isinstance(levels, str):
        levels = (levels,)
    unknown = [lv for lv in levels if lv not in FEATURE_LEVELS]
    if unknown or not levels:
        raise ValueError(f"unknown feature level(s) {unknown or list(levels)}: use some of "
                         f"{', '.join(FEATURE_LEVELS)}")
    if not isinstance(encoder, VisionTransformer):
        return encoder.forward_features(images, tuple(levels))
    grid = images.shape[-1] // encoder.patch_size
    if images.shape[-2] != images.shape[-1] or images.shape[-1] % encoder.patch_size:
        raise ValueError(f"a ViT crop must be square and a multiple of the patch size "
                         f"{encoder.patch_size}, got {tuple(images.shape[-2:])}")
    patches = encoder.patch_embed.proj(images).flatten(2).transpose(1, 2)
    table = (encoder.pos_embed[0, 1:] if grid == encoder.grid
             else absolute_sincos_table(grid, encoder.dim))
    x = patches + table.to(patches)
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    at_block = vit_level_blocks(len(encoder.blocks))
    wanted = {at_block[lv] for lv in levels}
    outputs: dict[int, torch.Tensor] = {}
    for index, block in enumerate(encoder.blocks[:max(wanted) + 1]):
        x = block(x)
        if index in wanted:
            tokens = x[:, 1:]
            outputs[index] = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)
    return {lv: outputs[at_block[lv]] for lv in levels}


__all__ = ["FEATURE_LEVELS", "backbone_channels", "backbone_flops_per_image", "build_backbone",
           "dense_grid", "dense_levels", "dense_map", "describe_backbone", "level_channels",
           "pooled", "vit_level_blocks"]
