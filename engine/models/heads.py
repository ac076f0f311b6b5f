"""Projection and prediction heads shared by the methods: one builder for vectors and for maps.

`mlp(dims, ...)` builds Linear layers for (B, C) vectors, or 1×1 convolutions for (B, C, H, W) maps
(`dense=True`, PixPro's "MLP2d", DenseCL's dense neck), with optional BatchNorm + ReLU between layers
and an optional non-affine BatchNorm after the last one (SimSiam's projector). Parameter names are
those of a plain `nn.Sequential`. Which published head is which:

  MoCo v2 / DenseCL global   mlp([C, 2048, 128])                        no BN
  DenseCL dense              mlp([C, 2048, 128], dense=True)            no BN
  PixPro projector           mlp([C, 4096, 256], bn=True, dense=True)
  BYOL projector/predictor   mlp([C, 4096, 256], bn=True, last_bias=False)
  SimSiam projector          mlp([C, 2048, 2048, 2048], bn=True, hidden_bias=False, last_bn=True)
  SimSiam predictor          mlp([2048, 512, 2048], bn=True, hidden_bias=False)
"""
from __future__ import annotations

import torch.nn as nn


def mlp(dims: list[int], *, bn: bool = False, dense: bool = False, last_bias: bool = True,
        hidden_bias: bool = True, last_bn: bool = False, init: str = "default") -> nn.Sequential:
    """Layers dims[0] -> dims[1] -> ... -> dims[-1]; between layers [BN] + ReLU.

    init: "default" keeps PyTorch's (what MoCo, PixPro and BYOL's PyTorch ports do); "kaiming"
    draws Linear/conv weights from kaiming_normal_(fan_in, relu) with zero bias (DenseCL's
    `init_linear='kaiming'`, applied by its code to the Linear layers only).
    """
    if len(dims) < 2:
        raise ValueError(f"a head needs at least an input and an output width, got {dims}")
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = index == len(dims) - 2
        bias = last_bias if last else (hidden_bias or not bn)
        layers.append(nn.Conv2d(fan_in, fan_out, 1, bias=bias) if dense
                      else nn.Linear(fan_in, fan_out, bias=bias))
        if not last:
            if bn:
                layers.append(nn.BatchNorm2d(fan_out) if dense else nn.BatchNorm1d(fan_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm2d(fan_out, affine=False) if dense
                          else nn.BatchNorm1d(fan_out, affine=False))
    head = nn.Sequential(*layers)
    if init == "kaiming":
        for module in head.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    elif init != "default":
        raise ValueError(f"unknown head init {init!r}: use default or kaiming")
    return head


def head_flops(dims: list[int], positions: int = 1) -> float:
    """Forward FLOPs (2·MAC) of mlp(dims) applied at `positions` vectors/cells."""
    return float(2 * positions * sum(a * b for a, b in zip(dims[:-1], dims[1:])))


__all__ = ["head_flops", "mlp"]
