"""What the detector pre-training methods UP-DETR and Pair DETR share (engine/methods/updetr.py,
pairdetr.py): their frozen CNN (UP-DETR's `--fre_cnn`: cfg's ResNet, optionally initialised from
pre-trained weights), their configuration check, the seeded generator of their random draws, and
the cost model of a DETR transformer.

The frozen CNN becomes `detr.backbone[0].body` (FrozenBatchNorm2d in place of BatchNorm2d) and the
method's `encoder` (one module, two names: evaluation and export find it under `encoder.*`; a
frozen-BN state dict has no BatchNorm counters, which engine/encoders.py fills with zeros).
"""
from __future__ import annotations

import math

import torch

from engine.checkpoint import CheckpointError
from engine.models.resnet import ResNet
from engine.presets import ConfigError, PretrainConfig


def check_detector_config(cfg: PretrainConfig, method: str) -> None:
    """One-line ConfigError unless cfg trains a ResNet (the DETR backbones are ResNets)."""
    if cfg.backbone not in ("resnet18", "resnet50"):
        raise ConfigError(f"{method} pre-trains a DETR on a ResNet: use --backbone resnet50 or "
                          f"resnet18 (got {cfg.backbone})")


def _arch(name: str, cifar_stem: bool) -> str:
    return name + (" with the CIFAR stem" if cifar_stem else "")


def frozen_resnet(cfg: PretrainConfig, checkpoint: str, method: str
                  ) -> tuple[ResNet, str | None]:
    """cfg's ResNet, drawn first (so its random weights are those build_encoder(cfg) draws), then
    given the weights at `checkpoint` when one is named: a densesim checkpoint or run folder (its
    online encoder, e.g. a SwAV run), an exported torchvision ResNet, or a raw torchvision-named
    ResNet state dict such as SwAV's release (engine.encoders.resnet_from_weights). Returns (the
    ResNet, a description of its weights' source, None when random). Inside
    engine.methods.base.skip_initial_weights() the file is not read (the caller restores every
    tensor from a checkpoint)."""
    from engine.encoders import resnet_from_weights
    from engine.methods.base import initial_weights_wanted
    from engine.models.backbones import build_backbone

    body = build_backbone(cfg)
    if not checkpoint:
        return body, None
    if not initial_weights_wanted():
        return body, f"{checkpoint} (not read: structure-only build)"
    try:
        pretrained = resnet_from_weights(checkpoint)
    except CheckpointError as exc:
        raise ConfigError(f"{method} backbone_checkpoint: {exc}") from exc
    if (pretrained.name, pretrained.cifar_stem) != (cfg.backbone, cfg.cifar_stem):
        raise ConfigError(f"{method}: backbone_checkpoint holds a "
                          f"{_arch(pretrained.name, pretrained.cifar_stem)}, the run's --backbone "
                          f"is a {_arch(cfg.backbone, cfg.cifar_stem)}")
    body.load_state_dict(pretrained.state_dict())
    return body, str(checkpoint)


def draw_generator(tag: int, seed: int, rank: int, step: int, micro: int,
                   device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by (tag, seed, rank, step, micro): the same draws on resume."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((tag, seed, rank, step, micro)) % (2 ** 63))
    return generator


def transformer_flops(tokens: int, queries: int, dim: int, ffn: int, enc_layers: int,
                      dec_layers: int, decoders: int = 1) -> float:
    """Forward FLOPs (2·MAC) of DETR's encoder over `tokens` and of `decoders` decoders of
    `queries` queries each (projections, attention products, FFNs; softmax and norms ignored)."""
    encoder = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * ffn
    decoder = (4 * queries * dim * dim + 2 * queries * queries * dim          # self-attention
               + 2 * queries * dim * dim + 2 * tokens * dim * dim             # cross q/out, k/v
               + 2 * queries * tokens * dim + 2 * queries * dim * ffn)        # products, FFN
    return 2.0 * (enc_layers * encoder + decoders * dec_layers * decoder)


def feature_tokens(cfg: PretrainConfig, size: int | None = None) -> int:
    """C5 cells of a `size` (default img_size) square image for cfg's ResNet."""
    stride = 8 if cfg.cifar_stem else 32
    return math.ceil((size or cfg.img_size) / stride) ** 2


__all__ = ["check_detector_config", "draw_generator", "feature_tokens", "frozen_resnet",
           "transformer_flops"]
