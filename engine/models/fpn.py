"""Feature pyramids on our backbones: detectron2's FPN on a ResNet, ViTDet's simple pyramid on a
ViT.

Methods that pool region features at several scales (CCOP's RoIAlign on P2..P5) read a backbone
through one of these two, behind one function (`pyramid_levels`):

  FPN (ResNet; Lin et al., CVPR 2017, as detectron2's `modeling/backbone/fpn.py`): for C2..C5
      lateral_l = Conv1x1(C_l -> 256),  output_l = Conv3x3(256 -> 256)
      P5' = lateral_5(C5);  P_l' = lateral_l(C_l) + upsample_nearest(P_{l+1}')  (top-down, "sum")
      P_l = output_l(P_l')
  Parameter names as detectron2's (`fpn_lateral{s}`, `fpn_output{s}`, s = log2(stride), and
  `.norm` inside a conv), initialisation its `c2_xavier_fill` (kaiming_uniform a=1, zero bias).
  `norm`: "" (detectron2's default: convs with bias, no norm), "bn" (BatchNorm2d after each conv,
  convs without bias: what CCOP's r50_d2.py sets, MODEL.FPN.NORM = 'BN') or "ln" (channel
  LayerNorm). detectron2's LastLevelMaxPool P6 is left out (nothing here pools on it). The top-down
  upsampling is to the lateral map's size (detectron2: scale factor 2), the same wherever the
  sizes halve exactly and still defined when they do not.

  SimpleFeaturePyramid (ViT; Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones
  for Object Detection", ECCV 2022, detectron2's `modeling/backbone/vit.py::SimpleFeaturePyramid`):
  from the LAST patch-token map only (stride p, D channels):
      stride p/4: ConvT2x2(D -> D/2) -> norm -> GELU -> ConvT2x2(D/2 -> D/4)
      stride p/2: ConvT2x2(D -> D/2)
      stride p:   identity
      stride 2p:  MaxPool 2x2
  each followed by Conv1x1(-> 256) -> norm -> Conv3x3(256 -> 256) -> norm (ViTDet's default
  norm "ln", channel LayerNorm eps 1e-6; its top block P6 is left out). With patch 16 the strides
  are 4, 8, 16, 32, as the ResNet's P2..P5.

`pyramid_levels(encoder, pyramid, images) -> (top, [P2, P3, P4, P5])`: `top` is the map an image
branch pools (ResNet C5, the ViT's last token map). `pyramid.strides` holds each level's stride in
input pixels (RoIAlign's spatial_scale = 1/stride).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.models.backbones import dense_levels, dense_map
from engine.models.resnet import ResNet
from engine.models.vit import VisionTransformer

NORMS = ("", "bn", "ln")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (detectron2.layers.LayerNorm)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _norm(kind: str, channels: int) -> nn.Module | None:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return LayerNorm2d(channels)
    return None


class ConvNorm(nn.Conv2d):
    """detectron2.layers.Conv2d: a conv with an optional `norm` after it (no bias when normed)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str = "",
                 padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding,
                         bias=norm == "")
        self.norm = _norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if self.norm is None else self.norm(x)


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """fvcore's c2_xavier_fill (Caffe2's XavierFill): kaiming_uniform_(a=1), zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown pyramid norm {norm!r}: use '', 'bn' or 'ln'")


class FPN(nn.Module):
    """detectron2's FPN over C2..C5 (module docstring). forward([C2, C3, C4, C5]) -> [P2..P5]."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[float],
                 out_channels: int = 256, norm: str = ""):
        super().__init__()
        _check_norm(norm)
        if len(in_channels) != len(strides) or not in_channels:
            raise ValueError("FPN needs one stride per input level")
        for fine, coarse in zip(strides[:-1], strides[1:]):
            if coarse != 2 * fine:
                raise ValueError(f"FPN strides must double from level to level, got {strides}")
        self.strides = tuple(float(s) for s in strides)
        self.out_channels = out_channels
        self.lateral_names, self.output_names = [], []
        for channels, stride in zip(in_channels, strides):
            stage = int(round(math.log2(stride)))
            lateral = ConvNorm(channels, out_channels, 1, norm)
            output = ConvNorm(out_channels, out_channels, 3, norm, padding=1)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{stage}", lateral)
            self.add_module(f"fpn_output{stage}", output)
            self.lateral_names.append(f"fpn_lateral{stage}")
            self.output_names.append(f"fpn_output{stage}")

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [getattr(self, n) for n in self.lateral_names]
        outputs = [getattr(self, n) for n in self.output_names]
        previous = laterals[-1](features[-1])
        results = [outputs[-1](previous)]
        for index in range(len(features) - 2, -1, -1):
            lateral = laterals[index](features[index])
            previous = lateral + F.interpolate(previous, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, outputs[index](previous))
        return results


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one (B, D, G, G) map at stride `patch_size`
    (module docstring). forward(map) -> [P2..P5] at strides p/4, p/2, p, 2p."""

    def __init__(self, dim: int, patch_size: int, out_channels: int = 256, norm: str = "ln"):
        super().__init__()
        _check_norm(norm)
        if dim % 4:
            raise ValueError(f"the simple feature pyramid needs a ViT width divisible by 4, got "
                             f"{dim}")
        self.strides = (patch_size / 4, patch_size / 2, float(patch_size), 2.0 * patch_size)
        self.out_channels = out_channels
        scales = []
        up4 = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)]
        if norm:
            up4.append(_norm(norm, dim // 2))
        up4 += [nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
        scales.append((up4, dim // 4))
        scales.append(([nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2))
        scales.append(([], dim))
        scales.append(([nn.MaxPool2d(kernel_size=2, stride=2)], dim))
        self.level_names = []
        for stage, (layers, channels) in zip(range(2, 6), scales):
            layers = layers + [ConvNorm(channels, out_channels, 1, norm),
                               ConvNorm(out_channels, out_channels, 3, norm, padding=1)]
            self.add_module(f"simfp_{stage}", nn.Sequential(*layers))
            self.level_names.append(f"simfp_{stage}")

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [getattr(self, n)(features) for n in self.level_names]


def build_pyramid(encoder: nn.Module, out_channels: int = 256, norm: str = "auto") -> nn.Module:
    """An FPN for a ResNet (norm "auto": "bn", CCOP's setting), a simple feature pyramid for a ViT
    (norm "auto": "ln", ViTDet's)."""
    if isinstance(encoder, ResNet):
        norm = "bn" if norm == "auto" else norm
        levels = ("c2", "c3", "c4", "c5")
        return FPN([encoder.channels[lv] for lv in levels],
                   [encoder.stride[lv] for lv in levels], out_channels, norm)
    if isinstance(encoder, VisionTransformer):
        norm = "ln" if norm == "auto" else norm
        return SimpleFeaturePyramid(encoder.dim, encoder.patch_size, out_channels, norm)
    raise TypeError(f"not a densesim backbone: {type(encoder).__name__}")


def pyramid_levels(encoder: nn.Module, pyramid: nn.Module, images: torch.Tensor
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(top map, [P2, P3, P4, P5]) of `images`: the backbone runs once."""
    if isinstance(pyramid, FPN):
        levels = dense_levels(encoder, images, ("c2", "c3", "c4", "c5"))
        maps = [levels[lv] for lv in ("c2", "c3", "c4", "c5")]
        return maps[-1], pyramid(maps)
    top = dense_map(encoder, images)
    return top, pyramid(top)


def pyramid_flops(pyramid: nn.Module, img_size: int) -> float:
    """Forward FLOPs (2·MAC) of the pyramid's convolutions on one img_size image."""
    total = 0.0
    for name, module in pyramid.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            stride = _module_stride(pyramid, name)
            cells = (img_size / stride) ** 2
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * cells * k * module.in_channels * module.out_channels
    return total


def _module_stride(pyramid: nn.Module, name: str) -> float:
    """The stride (input pixels) of the map a pyramid conv writes."""
    if isinstance(pyramid, FPN):
        stage = int("".join(c for c in name.split(".")[0] if c.isdigit()))
        return float(2 ** stage)
    level = int(name.split(".")[0].removeprefix("simfp_")) - 2
    top = pyramid.strides[2]
    index = int(name.split(".")[1])
    if level == 0 and index == 0:   # the first ConvT of the x4 branch writes stride p/2
        return top / 2
    return pyramid.strides[level]


__all__ = ["FPN", "ConvNorm", "LayerNorm2d", "NORMS", "SimpleFeaturePyramid", "build_pyramid",
           "c2_xavier_fill", "pyramid_flops", "pyramid_levels"]
