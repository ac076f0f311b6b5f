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
        tokens = encoder(images)[:, 1:]                          # (B, G², D), cls dropped
        grid = encoder.grid
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


__all__ = ["backbone_channels", "backbone_flops_per_image", "build_backbone", "dense_grid",
           "dense_map", "describe_backbone", "pooled"]
