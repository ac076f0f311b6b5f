"""ResNet-18/50 encoders (C2..C5) for the dense self-supervised methods, without torchvision.

DenseCL, PixPro, DetCo, SCFS and the other ResNet-based methods of the dense family pre-train a
ResNet whose C5 map feeds their dense heads. This is torchvision's ResNet ("v1.5", torchvision 0.2x)
with the same parameter and buffer names, shapes and state-dict order, so an exported backbone loads
into torchvision / detectron2 / mmdet code with `strict=False` only for the absent `fc`:

- stem: `conv1` 7×7 stride 2 padding 3 (bias False) → `bn1` → `relu` → `maxpool` 3×3 stride 2
  padding 1;
- `layer1`..`layer4`: BasicBlock (resnet18: conv1/bn1/conv2/bn2, two 3×3) or Bottleneck (resnet50:
  conv1 1×1, conv2 3×3, conv3 1×1 expanding ×4, each followed by bn1/bn2/bn3). The stride of a
  stage's first block sits on its 3×3 conv (Bottleneck: `conv2`, the "v1.5" placement; the original
  paper put it on the first 1×1). A block whose stride or width changes gets a `downsample` =
  Sequential(1×1 conv stride s bias False, BatchNorm2d) named `downsample.0` / `downsample.1`;
- every conv has bias=False; initialisation as torchvision: kaiming_normal_(mode="fan_out",
  nonlinearity="relu") on convs, BatchNorm weight 1 and bias 0, and with `zero_init_residual` the
  last BatchNorm weight of each block zeroed (each block starts as the identity);
- NO `avgpool` / `fc`: the encoder ends at layer4 (methods add their own heads; a user can attach an
  `fc`).

`cifar_stem=True` is the usual adaptation for 32-px images (solo-learn, lightly): `conv1` becomes
3×3 stride 1 padding 1 (same name, weight (64, 3, 3, 3)) and `maxpool` is `nn.Identity()`, so the
strides of C2..C5 are 1, 2, 4, 8 instead of 4, 8, 16, 32.

`forward(x)` returns C5 (B, C5, H/32, W/32); `forward_features(x, levels)` returns the requested
levels of ("c2", "c3", "c4", "c5") (the outputs of layer1..layer4), running only as far as the
deepest one asked for. Only plain `nn.BatchNorm2d` modules hold the statistics, so
`torch.nn.SyncBatchNorm.convert_sync_batchnorm` converts every one of them; channels_last inputs
work as with any stock conv net.

`torchvision_resnet_state_keys(name)` states torchvision's state-dict layout (without `fc`) from the
architecture description alone, independently of the modules here, for tests and for the export
code; `resnet_flops_per_image` is the analytic forward cost.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

LEVELS = ("c2", "c3", "c4", "c5")
STAGE_PLANES = (64, 128, 256, 512)
# name -> (block kind, blocks per stage)
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def _check_name(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown ResNet {name!r}: use one of {', '.join(ARCHITECTURES)}")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs (the first with the stride) and the identity / projection shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (with the stride: v1.5) → 1×1 expand ×4, and the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A torchvision-named ResNet encoder ending at layer4 (module docstring).

    Attributes: `name`, `out_channels` (C5 width), `channels` and `stride` per level
    ("c2".."c5"), `cifar_stem`.
    """

    def __init__(self, name: str = "resnet50", cifar_stem: bool = False,
                 zero_init_residual: bool = False):
        super().__init__()
        _check_name(name)
        kind, depths = ARCHITECTURES[name]
        block = _BLOCKS[kind]
        self.name, self.cifar_stem = name, bool(cifar_stem)
        self.inplanes = 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if cifar_stem
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, STAGE_PLANES[0], depths[0])
        self.layer2 = self._make_layer(block, STAGE_PLANES[1], depths[1], stride=2)
        self.layer3 = self._make_layer(block, STAGE_PLANES[2], depths[2], stride=2)
        self.layer4 = self._make_layer(block, STAGE_PLANES[3], depths[3], stride=2)

        self.channels = {level: planes * block.expansion
                         for level, planes in zip(LEVELS, STAGE_PLANES)}
        stem = 1 if cifar_stem else 4
        self.stride = {level: stem * 2 ** k for k, level in enumerate(LEVELS)}
        self.out_channels = self.channels["c5"]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor,
                         levels: Sequence[str] = LEVELS) -> dict[str, torch.Tensor]:
        """{level: map} for the requested levels of ("c2", "c3", "c4", "c5"), in that order;
        stages past the deepest requested level are not run."""
        if isinstance(levels, str):
            levels = (levels,)
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown or not levels:
            raise ValueError(f"unknown feature level(s) {unknown or list(levels)}: use some of "
                             f"{', '.join(LEVELS)}")
        deepest = max(LEVELS.index(lv) for lv in levels)
        wanted = set(levels)
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for level, stage in zip(LEVELS[:deepest + 1], self.stages):
            x = stage(x)
            if level in wanted:
                out[level] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """C5: (B, out_channels, H/32, W/32) (H/8 with the CIFAR stem)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


def build_resnet(name: str, cifar_stem: bool = False, zero_init_residual: bool = False) -> ResNet:
    """"resnet18" or "resnet50" (anything else: a one-line ValueError)."""
    _check_name(name)
    return ResNet(name, cifar_stem=cifar_stem, zero_init_residual=zero_init_residual)


def resnet18(cifar_stem: bool = False, zero_init_residual: bool = False) -> ResNet:
    return build_resnet("resnet18", cifar_stem, zero_init_residual)


def resnet50(cifar_stem: bool = False, zero_init_residual: bool = False) -> ResNet:
    return build_resnet("resnet50", cifar_stem, zero_init_residual)


# ----------------------------------------------------------------------------- layout and cost
# Both below read only ARCHITECTURES / STAGE_PLANES / EXPANSION (the architecture description), not
# the modules, so a test comparing them with a built ResNet checks the module code.

def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _block_convs(kind: str, inplanes: int, planes: int, stride: int):
    """(name, in, out, kernel, stride, padding) of one block's convs in torchvision's order, then
    the downsample conv when there is one."""
    if kind == "basic":
        convs = [("conv1", inplanes, planes, 3, stride, 1), ("conv2", planes, planes, 3, 1, 1)]
    else:
        convs = [("conv1", inplanes, planes, 1, 1, 0), ("conv2", planes, planes, 3, stride, 1),
                 ("conv3", planes, planes * 4, 1, 1, 0)]
    out = planes * EXPANSION[kind]
    if stride != 1 or inplanes != out:
        convs.append(("downsample.0", inplanes, out, 1, stride, 0))
    return convs


def _blocks(name: str):
    """(prefix, kind, inplanes, planes, stride) of every block, in order."""
    kind, depths = ARCHITECTURES[name]
    inplanes = 64
    for stage, (planes, depth) in enumerate(zip(STAGE_PLANES, depths)):
        for b in range(depth):
            stride = 2 if stage > 0 and b == 0 else 1
            yield f"layer{stage + 1}.{b}", kind, inplanes, planes, stride
            inplanes = planes * EXPANSION[kind]


def _bn_keys(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,)),
            (f"{prefix}.running_mean", (channels,)), (f"{prefix}.running_var", (channels,)),
            (f"{prefix}.num_batches_tracked", ())]


def torchvision_resnet_state_keys(name: str) -> OrderedDict[str, tuple[int, ...]]:
    """torchvision's `resnet18()` / `resnet50()` state dict without `fc`: name -> shape, in order.

    Per module, its parameters then its buffers, then its children in registration order: the
    stem conv1, bn1; then per block conv1, bn1, conv2, bn2[, conv3, bn3], downsample.0,
    downsample.1. BatchNorm: weight, bias, running_mean, running_var, num_batches_tracked (a 0-d
    int64). (The CIFAR stem only changes conv1.weight to (64, 3, 3, 3).)"""
    _check_name(name)
    keys: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, 3, 7, 7))]
    keys += _bn_keys("bn1", 64)
    for prefix, kind, inplanes, planes, stride in _blocks(name):
        for conv, cin, cout, k, _, _ in _block_convs(kind, inplanes, planes, stride):
            keys.append((f"{prefix}.{conv}.weight", (cout, cin, k, k)))
            bn = "downsample.1" if conv == "downsample.0" else "bn" + conv[-1]
            keys += _bn_keys(f"{prefix}.{bn}", cout)
    return OrderedDict(keys)


def resnet_flops_per_image(name: str, img_size: int | tuple[int, int],
                           cifar_stem: bool = False) -> int:
    """Forward FLOPs of one image (2 × multiply-accumulates of every conv, stem included; BN,
    ReLU, pooling and the residual adds ignored): resnet50 at 224 px ≈ 8.2 GFLOP (4.1 GMAC),
    resnet18 ≈ 3.6 GFLOP (1.8 GMAC)."""
    _check_name(name)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    macs = 0

    def conv(cin, cout, k, stride, padding):
        nonlocal h, w, macs
        h, w = _conv_out(h, k, stride, padding), _conv_out(w, k, stride, padding)
        macs += h * w * cout * cin * k * k

    if cifar_stem:
        conv(3, 64, 3, 1, 1)
    else:
        conv(3, 64, 7, 2, 3)
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)      # maxpool
    for _, kind, inplanes, planes, stride in _blocks(name):
        h_in, w_in = h, w
        for conv_name, cin, cout, k, s, p in _block_convs(kind, inplanes, planes, stride):
            if conv_name == "downsample.0":   # runs on the block's input, ends at its output
                h, w = h_in, w_in
            conv(cin, cout, k, s, p)
    return 2 * macs
