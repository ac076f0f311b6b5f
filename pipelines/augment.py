"""Two-view augmentation on PIL images, no torchvision: SIM's recipe (spec/SIM.md §1.1) and others.

Per view, in this order: RandomResizedCrop (torchvision's sampler) → crop+resize (Pillow, the
view's interpolation) → horizontal flip → ColorJitter with probability `jitter_p` (torchvision
semantics, random order of the four factors) → grayscale with probability `grayscale_p` → Gaussian
blur with probability `blur_p`, σ ~ U(blur_sigma) → solarize with probability `solarize_p` → float
CHW in [0, 1] → normalise (ImageNet mean/std). Every step is switched off by setting its
probability to 0.

Geometry convention (DESIGN.md): a view is `resize(crop(image, box))`, mirrored left-right
afterwards if its flip flag is set; `box = (y, x, h, w)` is in pixels of the original, unflipped
image. Output pixel (r, c) of an S×S view samples source row `y + (r+½)·h/S − ½` and column
`x + (c'+½)·w/S − ½`, c' = S−1−c when flipped. Pillow's `resize(..., box=(x, y, x+w, y+h))` is
exactly this mapping. The SIM reference flips before cropping; because the crop sampler is
mirror-symmetric, sampling the box on the unflipped image and flipping the result is the same
distribution.

Named recipes (`AUGMENTATIONS`, `augment_recipe(name, size, ...)`): "sim" (the default, SIM's =
BYOL's asymmetric pair, bicubic), "byol" (the same table under BYOL's name) and "mocov2" (MoCo v2 /
DenseCL: both views alike, crop scale (0.2, 1), bilinear, blur p 0.5, no solarize).
`recipe_augment(...)` is the "sim" recipe, as before. "swav" (SwAV's colour, symmetric, bilinear,
mean/std (0.485, 0.456, 0.406)/(0.228, 0.224, 0.225)) is the colour table of SwAV's multi-crop.

Multi-crop (`MultiCropAugment`, `multicrop_augment(name, crops)`): any number of crops, each with
its own `ViewAugment` (size, scale range, colour), e.g. SwAV's 2×224 (scale 0.14–1) + 6×96
(0.05–0.14). The draws follow TwoViewAugment's order: every crop's geometry first (crop by crop),
then every crop's colour, so a two-crop MultiCropAugment with TwoViewAugment's two views yields
exactly its views for the same rng.

All randomness comes from the `random.Random` passed in, so a view is a pure function of
(image, augmentation config, rng state). Parameters are drawn first (`sample_params`, cheap, no
pixels) and applied afterwards (`apply`); for two views both geometries are drawn before any colour
parameter, so switching colour off leaves the crops and flips of a seed unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWAV_STD = (0.228, 0.224, 0.225)   # SwAV's src/multicropdataset.py normalises with this std

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

Box = tuple[int, int, int, int]  # (y, x, h, w), pixels of the original unflipped image


# ----------------------------------------------------------------------------- geometry

def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: random.Random) -> Box:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`; returns (y, x, h, w).

    Up to 10 tries of area fraction s ~ U(scale), aspect a = exp(U(log ratio)),
    w = round(sqrt(s·H·W·a)), h = round(sqrt(s·H·W/a)), accepted when 0 < w ≤ W and 0 < h ≤ H,
    then y ~ U{0..H−h}, x ~ U{0..W−w}. Otherwise a centre crop of the whole image clamped to the
    ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = rng.randint(0, height - h)
            x = rng.randint(0, width - w)
            return y, x, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: Image.Image, box: Box, size: int,
                interpolation: str = "bicubic") -> Image.Image:
    """`resize(crop(image, box))` to size×size; box = (y, x, h, w) (the convention above)."""
    y, x, h, w = box
    return image.resize((size, size), resample=INTERPOLATIONS[interpolation],
                        box=(x, y, x + w, y + h))


# ----------------------------------------------------------------------------- colour

class JitterParams(NamedTuple):
    """ColorJitter draw: `order` of ops (0 brightness, 1 contrast, 2 saturation, 3 hue) and the
    factors (None where that op is off)."""
    order: tuple[int, ...]
    brightness: float | None
    contrast: float | None
    saturation: float | None
    hue: float | None


def _factor_range(strength: float) -> tuple[float, float] | None:
    return None if strength == 0 else (max(0.0, 1.0 - strength), 1.0 + strength)


def sample_jitter(brightness: float, contrast: float, saturation: float, hue: float,
                  rng: random.Random) -> JitterParams:
    """torchvision ColorJitter.get_params: random order, then each factor uniformly in
    [max(0, 1−s), 1+s] (hue in [−hue, hue])."""
    order = list(range(4))
    rng.shuffle(order)
    factors = []
    for rng_range in (_factor_range(brightness), _factor_range(contrast),
                      _factor_range(saturation), None if hue == 0 else (-hue, hue)):
        factors.append(None if rng_range is None else rng.uniform(*rng_range))
    return JitterParams(tuple(order), *factors)


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL adjust_hue: shift the HSV hue channel by int(hue_factor·255), wrapping."""
    if image.mode in ("L", "1", "I", "F"):
        return image
    h, s, v = image.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.int16) + int(hue_factor * 255)) % 256
    h = Image.fromarray(shifted.astype(np.uint8))
    return Image.merge("HSV", (h, s, v)).convert(image.mode)


def color_jitter(image: Image.Image, params: JitterParams) -> Image.Image:
    """Apply a ColorJitter draw (PIL ImageEnhance, as torchvision does for PIL images)."""
    for op in params.order:
        if op == 0 and params.brightness is not None:
            image = ImageEnhance.Brightness(image).enhance(params.brightness)
        elif op == 1 and params.contrast is not None:
            image = ImageEnhance.Contrast(image).enhance(params.contrast)
        elif op == 2 and params.saturation is not None:
            image = ImageEnhance.Color(image).enhance(params.saturation)
        elif op == 3 and params.hue is not None:
            image = adjust_hue(image, params.hue)
    return image


def to_grayscale_rgb(image: Image.Image) -> Image.Image:
    """torchvision rgb_to_grayscale(num_output_channels=3): PIL "L" repeated on 3 channels."""
    return image.convert("L").convert("RGB")


def to_tensor(image: Image.Image, mean: tuple[float, ...] | None = None,
              std: tuple[float, ...] | None = None) -> torch.Tensor:
    """RGB PIL → float32 (3, H, W) in [0, 1], then (x − mean)/std when mean and std are given."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    tensor = tensor.permute(2, 0, 1).float().div_(255.0)
    if mean is not None:
        tensor.sub_(torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        tensor.div_(torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))
    return tensor


# ----------------------------------------------------------------------------- one view

class ViewParams(NamedTuple):
    """Everything random about one view: geometry, then the colour draws (None/False = off)."""
    box: Box
    flip: bool
    jitter: JitterParams | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


@dataclass(frozen=True)
class ViewAugment:
    """The augmentation of one view. Defaults: SIM view 1 (spec/SIM.md §1.1)."""
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: int = 128
    normalize: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        for name in ("scale", "ratio", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"view size must be a positive integer, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"crop scale must satisfy 0 < min <= max, got {self.scale}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}: use one of "
                             f"{', '.join(INTERPOLATIONS)}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got "
                                 f"{getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur sigma range must satisfy 0 < min <= max, got "
                             f"{self.blur_sigma}")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(f"solarize threshold must be in [0, 256], got "
                             f"{self.solarize_threshold}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")

    @property
    def has_colour(self) -> bool:
        return any(p > 0 for p in (self.jitter_p, self.grayscale_p, self.blur_p, self.solarize_p))

    def geometry_only(self) -> "ViewAugment":
        """The same crop and flip, with jitter, grayscale, blur and solarize all off."""
        return dataclasses.replace(self, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                   solarize_p=0.0)

    def sample_geometry(self, height: int, width: int, rng: random.Random) -> tuple[Box, bool]:
        flip = rng.random() < self.flip_p
        box = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
        return box, flip

    def sample_colour(self, rng: random.Random):
        """(jitter, grayscale, blur_sigma, solarize); a step with probability 0 draws nothing."""
        jitter = None
        if self.jitter_p > 0 and rng.random() < self.jitter_p:
            jitter = sample_jitter(self.brightness, self.contrast, self.saturation, self.hue, rng)
        grayscale = self.grayscale_p > 0 and rng.random() < self.grayscale_p
        blur_sigma = None
        if self.blur_p > 0 and rng.random() < self.blur_p:
            blur_sigma = rng.uniform(*self.blur_sigma)
        solarize = self.solarize_p > 0 and rng.random() < self.solarize_p
        return jitter, grayscale, blur_sigma, solarize

    def sample_params(self, height: int, width: int, rng: random.Random) -> ViewParams:
        box, flip = self.sample_geometry(height, width, rng)
        return ViewParams(box, flip, *self.sample_colour(rng))

    def apply_pil(self, image: Image.Image, params: ViewParams) -> Image.Image:
        """The augmented view as an RGB PIL image (before tensor conversion and normalisation)."""
        view = crop_resize(image, params.box, self.size, self.interpolation)
        if params.flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if params.jitter is not None:
            view = color_jitter(view, params.jitter)
        if params.grayscale:
            view = to_grayscale_rgb(view)
        if params.blur_sigma is not None:
            view = view.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
        if params.solarize:
            view = ImageOps.solarize(view, threshold=self.solarize_threshold)
        return view

    def apply(self, image: Image.Image, params: ViewParams) -> torch.Tensor:
        """The augmented view as float32 (3, size, size), normalised if `normalize`."""
        view = self.apply_pil(image, params)
        if self.normalize:
            return to_tensor(view, self.mean, self.std)
        return to_tensor(view)

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, ViewParams]:
        params = self.sample_params(image.height, image.width, rng)
        return self.apply(image, params), params


# ----------------------------------------------------------------------------- two views

class TwoViews(NamedTuple):
    view1: torch.Tensor   # float32 (3, S, S)
    view2: torch.Tensor   # float32 (3, S, S)
    boxes: torch.Tensor   # float32 (2, 4): (y, x, h, w) per view, original-image pixels
    flips: torch.Tensor   # bool (2,)
    params: tuple[ViewParams, ViewParams]


def _sim_view2() -> ViewAugment:
    return ViewAugment(blur_p=0.1, solarize_p=0.2)


@dataclass(frozen=True)
class TwoViewAugment:
    """SIM's asymmetric pair: view 1 (masked, online) always blurred, never solarized; view 2
    (target) blurred with p=0.1 and solarized with p=0.2. Both views must have the same size."""
    view1: ViewAugment = dataclasses.field(default_factory=ViewAugment)
    view2: ViewAugment = dataclasses.field(default_factory=_sim_view2)

    def __post_init__(self):
        if self.view1.size != self.view2.size:
            raise ValueError(f"both views must have the same size, got {self.view1.size} and "
                             f"{self.view2.size}")

    @classmethod
    def sim(cls, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic",
            colour: bool = True, blur: bool = True, normalize: bool = True) -> "TwoViewAugment":
        """The recipe at another size/crop range; `colour=False` turns every colour step off,
        `blur=False` only the blur (as usual for CIFAR-sized images)."""
        common = dict(size=size, scale=scale, ratio=ratio, interpolation=interpolation,
                      normalize=normalize)
        pair = cls(ViewAugment(**common), ViewAugment(blur_p=0.1, solarize_p=0.2, **common))
        if not blur:
            pair = cls(dataclasses.replace(pair.view1, blur_p=0.0),
                       dataclasses.replace(pair.view2, blur_p=0.0))
        return pair if colour else pair.geometry_only()

    @property
    def size(self) -> int:
        return self.view1.size

    @property
    def views(self) -> tuple[ViewAugment, ViewAugment]:
        """(view1, view2): the per-view configs, as `MultiCropAugment.views` (what loaders read)."""
        return self.view1, self.view2

    def geometry_only(self) -> "TwoViewAugment":
        """Crops and flips only: the same geometry for a given rng state as with colour on."""
        return TwoViewAugment(self.view1.geometry_only(), self.view2.geometry_only())

    def sample_params(self, height: int, width: int,
                      rng: random.Random) -> tuple[ViewParams, ViewParams]:
        """Both geometries first (flip, box of view 1, then of view 2), then both colour draws."""
        geo1 = self.view1.sample_geometry(height, width, rng)
        geo2 = self.view2.sample_geometry(height, width, rng)
        col1 = self.view1.sample_colour(rng)
        col2 = self.view2.sample_colour(rng)
        return ViewParams(*geo1, *col1), ViewParams(*geo2, *col2)

    def __call__(self, image: Image.Image, rng: random.Random) -> TwoViews:
        p1, p2 = self.sample_params(image.height, image.width, rng)
        return TwoViews(
            self.view1.apply(image, p1), self.view2.apply(image, p2),
            torch.tensor([p1.box, p2.box], dtype=torch.float32),
            torch.tensor([p1.flip, p2.flip], dtype=torch.bool),
            (p1, p2))


# ----------------------------------------------------------------------------- multi-crop

class MultiViews(NamedTuple):
    crops: list[torch.Tensor]          # V float32 (3, S_v, S_v), in the augmentation's order
    boxes: torch.Tensor                # float32 (V, 4): (y, x, h, w), original-image pixels
    flips: torch.Tensor                # bool (V,)
    params: tuple[ViewParams, ...]


class CropGroup(NamedTuple):
    """`count` crops of `size` pixels with RandomResizedCrop area fraction in `scale`; `view` is
    the template of their other settings (ratio, interpolation, flip, colour, normalisation), or
    a sequence of `count` ViewAugments, one per crop (their size and scale are replaced too)."""
    count: int
    size: int
    scale: tuple[float, float]
    view: ViewAugment | Sequence[ViewAugment] = ViewAugment()


@dataclass(frozen=True)
class MultiCropAugment:
    """V ≥ 2 crops of one image, each with its own ViewAugment (size, crop scale, colour, ...).

    views: one ViewAugment per crop, in output order (the large crops first, by convention: the
    loaders keep the order given). `from_groups` builds it from (count, size, scale, view)
    groups; `swav()` is SwAV's 2×224 + 6×96. Draws, from the rng: the geometry (flip, box) of
    crop 0, 1, ..., V−1, then the colour of crop 0, 1, ..., V−1: TwoViewAugment's order, so
    `MultiCropAugment((a, b))` gives exactly `TwoViewAugment(a, b)`'s views for one rng state,
    and switching colour off leaves every crop and flip unchanged.
    """
    views: tuple[ViewAugment, ...]

    def __post_init__(self):
        views = tuple(self.views)
        object.__setattr__(self, "views", views)
        if len(views) < 2:
            raise ValueError(f"multi-crop needs at least 2 crops, got {len(views)}")
        if not all(isinstance(v, ViewAugment) for v in views):
            raise ValueError("every crop of a MultiCropAugment must be a ViewAugment")

    @classmethod
    def from_groups(cls, groups: Sequence) -> "MultiCropAugment":
        """From (count, size, scale[, view]) groups (`CropGroup`s or plain tuples), in order."""
        views: list[ViewAugment] = []
        for group in groups:
            group = CropGroup(*group)
            if int(group.count) != group.count or group.count < 1:
                raise ValueError(f"a crop group needs a positive integer count, got "
                                 f"{group.count}")
            per_crop = ([group.view] * group.count if isinstance(group.view, ViewAugment)
                        else list(group.view))
            if len(per_crop) != group.count:
                raise ValueError(f"a crop group of {group.count} crops got {len(per_crop)} "
                                 f"ViewAugments")
            views += [dataclasses.replace(v, size=int(group.size), scale=tuple(group.scale))
                      for v in per_crop]
        return cls(tuple(views))

    @classmethod
    def swav(cls, sizes: tuple[int, int] = (224, 96), counts: tuple[int, int] = (2, 6),
             scales: tuple[tuple[float, float], tuple[float, float]] = ((0.14, 1.0),
                                                                          (0.05, 0.14)),
             normalize: bool = True) -> "MultiCropAugment":
        """SwAV's multi-crop (spec/DENSE.md §5, `multicropdataset.py`): 2×224 at scale
        (0.14, 1) + 6×96 at (0.05, 0.14), every crop with the "swav" recipe's colour."""
        return multicrop_augment("swav", list(zip(counts, sizes, scales)), normalize=normalize)

    @property
    def count(self) -> int:
        return len(self.views)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(v.size for v in self.views)

    @property
    def size_groups(self) -> tuple[tuple[int, int, int], ...]:
        """(start, stop, size) of each run of consecutive crops of one size (loaders batch
        each run in one op; SwAV's 2×224 + 6×96 is ((0, 2, 224), (2, 8, 96)))."""
        return size_runs(self.sizes)

    @property
    def view1(self) -> ViewAugment:
        return self.views[0]

    @property
    def view2(self) -> ViewAugment:
        return self.views[1]

    def geometry_only(self) -> "MultiCropAugment":
        """Crops and flips only: the same geometry for a given rng state as with colour on."""
        return MultiCropAugment(tuple(v.geometry_only() for v in self.views))

    def sample_params(self, height: int, width: int,
                      rng: random.Random) -> tuple[ViewParams, ...]:
        """Every geometry first (flip, box of crop 0, 1, ...), then every colour draw."""
        geometry = [v.sample_geometry(height, width, rng) for v in self.views]
        colour = [v.sample_colour(rng) for v in self.views]
        return tuple(ViewParams(*g, *c) for g, c in zip(geometry, colour))

    def __call__(self, image: Image.Image, rng: random.Random) -> MultiViews:
        params = self.sample_params(image.height, image.width, rng)
        return MultiViews(
            [v.apply(image, p) for v, p in zip(self.views, params)],
            torch.tensor([p.box for p in params], dtype=torch.float32),
            torch.tensor([p.flip for p in params], dtype=torch.bool),
            params)


def size_runs(sizes) -> tuple[tuple[int, int, int], ...]:
    """(start, stop, size) of each run of consecutive equal view sizes."""
    runs: list[tuple[int, int, int]] = []
    for v, size in enumerate(sizes):
        if runs and runs[-1][2] == size:
            runs[-1] = (runs[-1][0], v + 1, size)
        else:
            runs.append((v, v + 1, size))
    return tuple(runs)


def is_multicrop(augment) -> bool:
    """Whether `augment` makes multi-crop batches (`crops`, V views) rather than two views."""
    return isinstance(augment, MultiCropAugment)


def recipe_augment(size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3), blur: bool = True,
                   colour: bool = True, interpolation: str = "bicubic") -> TwoViewAugment:
    """The SIM two-view recipe at `size` (what the engine builds from its config)."""
    return TwoViewAugment.sim(size=size, scale=scale, ratio=ratio, interpolation=interpolation,
                              colour=colour, blur=blur)


# ----------------------------------------------------------------------------- named recipes
#
# Each recipe is (crop defaults, view 1, view 2): every ViewAugment field a recipe sets is written
# out, so a recipe reads like its paper's table. All three loaders (torch, DALI, resident) read
# these fields generically; tests/test_augment_recipes.py checks that each honours each recipe.

_BYOL_VIEW1 = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                   hue=0.1, grayscale_p=0.2, blur_p=1.0, blur_sigma=(0.1, 2.0), solarize_p=0.0)
_BYOL_VIEW2 = dict(_BYOL_VIEW1, blur_p=0.1, solarize_p=0.2)
# SwAV (src/multicropdataset.py @ 06b1b7cb): get_color_distortion(s=1) = ColorJitter(0.8, 0.8,
# 0.8, 0.2) with p 0.8 + RandomGrayscale 0.2, then PILRandomGaussianBlur(p=0.5, radius U(0.1, 2)),
# after RandomResizedCrop + RandomHorizontalFlip(0.5); Normalize(mean, std (0.228, 0.224, 0.225)).
_SWAV_VIEW = dict(flip_p=0.5, jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8,
                  hue=0.2, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.0,
                  mean=IMAGENET_MEAN, std=SWAV_STD)
_MOCOV2_VIEW = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
                    hue=0.1, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.0)


class _Recipe(NamedTuple):
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: str
    view1: dict
    view2: dict
    source: str


_RECIPES: dict[str, _Recipe] = {
    # SIM (spec/SIM.md §1.1) takes BYOL's asymmetric pair unchanged: the masked online view 1 is
    # always blurred and never solarized, the target view 2 blurred with p 0.1, solarized with 0.2.
    "sim": _Recipe((0.08, 1.0), (3 / 4, 4 / 3), "bicubic", _BYOL_VIEW1, _BYOL_VIEW2,
                   "SIM spec (spec/SIM.md §1.1): BYOL's asymmetric pair, bicubic"),
    # BYOL (Grill et al. 2020, appendix B, table 6): RandomResizedCrop (0.08, 1) resized with
    # bicubic interpolation, flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale
    # 0.2, Gaussian blur σ ∈ [0.1, 2] with p 1.0 / 0.1, solarize p 0.0 / 0.2. PixPro's
    # "--aug BYOL --crop 0.08" (contrast/data/transform.py) uses the same table but resizes with
    # its RandomResizedCropCoord's default BILINEAR: augment_recipe("byol", ...,
    # interpolation="bilinear") reproduces it exactly.
    "byol": _Recipe((0.08, 1.0), (3 / 4, 4 / 3), "bicubic", _BYOL_VIEW1, _BYOL_VIEW2,
                    "BYOL paper appendix B (asymmetric blur/solarize), bicubic"),
    # MoCo v2 (Chen et al. 2020, "Improved baselines...", moco/main_moco.py `--aug-plus`), also
    # DenseCL's (configs/selfsup/densecl/*.py): both views from the same distribution:
    # RandomResizedCrop(scale=(0.2, 1)) with torchvision's default BILINEAR, ColorJitter(0.4, 0.4,
    # 0.4, 0.1) with p 0.8, RandomGrayscale 0.2, GaussianBlur σ ∈ [0.1, 2] (PIL's, as here) with
    # p 0.5, horizontal flip 0.5, no solarize. MoCo flips last, after the blur; every colour step
    # and the blur commute with a horizontal mirror, so flipping right after the crop (as every
    # loader here does) is the same distribution.
    "mocov2": _Recipe((0.2, 1.0), (3 / 4, 4 / 3), "bilinear", _MOCOV2_VIEW, _MOCOV2_VIEW,
                      "MoCo v2 (moco/main_moco.py --aug-plus; DenseCL), symmetric, bilinear"),
    # SwAV (Caron et al. 2020; spec/DENSE.md §5 "Multi-crop"): every crop alike, torchvision's
    # RandomResizedCrop (default BILINEAR) at the large crops' scale (0.14, 1) when used for two
    # views; jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2, PIL blur σ ∈ [0.1, 2] p 0.5,
    # flip 0.5, no solarize, std (0.228, 0.224, 0.225). Its multi-crop is
    # multicrop_augment("swav", [(2, 224, (0.14, 1)), (6, 96, (0.05, 0.14))]).
    "swav": _Recipe((0.14, 1.0), (3 / 4, 4 / 3), "bilinear", _SWAV_VIEW, _SWAV_VIEW,
                    "SwAV (src/multicropdataset.py): symmetric colour s=1, blur p 0.5, bilinear"),
}

AUGMENTATIONS = tuple(_RECIPES)
"""The names `augment_recipe` and `multicrop_augment` accept: ("sim", "byol", "mocov2", "swav")."""


def augmentation_source(name: str) -> str:
    """One line saying where recipe `name` comes from (for the run's log)."""
    return _recipe(name).source


def _recipe(name: str) -> _Recipe:
    if name not in _RECIPES:
        raise ValueError(f"unknown augmentation {name!r}: use one of {', '.join(AUGMENTATIONS)}")
    return _RECIPES[name]


def recipe_scale(name: str) -> tuple[float, float]:
    """The RandomResizedCrop area range of recipe `name` (what scale=None gives)."""
    return tuple(_recipe(name).scale)


def augment_recipe(name: str, size: int = 224, scale: tuple[float, float] | None = None,
                   ratio: tuple[float, float] | None = None, blur: bool = True,
                   interpolation: str | None = None, colour: bool = True,
                   normalize: bool = True) -> TwoViewAugment:
    """The named two-view recipe ("sim", "byol", "mocov2" or "swav", see AUGMENTATIONS) at `size`.

    scale / ratio / interpolation: None keeps the recipe's own (sim, byol: (0.08, 1), bicubic;
    mocov2: (0.2, 1), bilinear; all: ratio (3/4, 4/3)). blur=False switches the Gaussian blur off
    in both views (as usual for CIFAR-sized images); colour=False every colour step (crops and
    flips only: the same geometry for a given seed). An unknown name is a one-line ValueError.
    `augment_recipe("sim", ...)` equals `recipe_augment(...)`.
    """
    recipe = _recipe(name)
    common = dict(size=size, scale=recipe.scale if scale is None else scale,
                  ratio=recipe.ratio if ratio is None else ratio,
                  interpolation=recipe.interpolation if interpolation is None else interpolation,
                  normalize=normalize)
    views = [ViewAugment(**common, **recipe.view1), ViewAugment(**common, **recipe.view2)]
    if not blur:
        views = [dataclasses.replace(v, blur_p=0.0) for v in views]
    pair = TwoViewAugment(*views)
    return pair if colour else pair.geometry_only()


def _crop_triple(crop) -> tuple[int, int, tuple[float, float]]:
    """(count, size, scale) from a (count, size, scale) tuple or anything with those attributes
    (engine.methods.base.CropSpec)."""
    if all(hasattr(crop, name) for name in ("count", "size", "scale")):
        return int(crop.count), int(crop.size), tuple(crop.scale)
    count, size, scale = crop
    return int(count), int(size), tuple(scale)


def multicrop_augment(name: str, crops: Sequence, ratio: tuple[float, float] | None = None,
                      blur: bool = True, interpolation: str | None = None, colour: bool = True,
                      normalize: bool = True) -> MultiCropAugment:
    """Multi-crop with the colour of the named recipe (see AUGMENTATIONS).

    crops: (count, size, scale) groups in output order (or CropSpecs), e.g. SwAV's
    [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]. The recipe's scale is not used (each group
    has its own); ratio / interpolation: None keeps the recipe's. Colour: within every group the
    crops alternate between the recipe's two views — crops 0, 2, 4, ... of a group take view 1's
    colour, crops 1, 3, 5, ... view 2's — so the first group of a two-view recipe is exactly its
    pair (`multicrop_augment(name, [(2, S, scale)])` draws what `augment_recipe(name, S,
    scale=scale)` draws), and an asymmetric recipe (sim/byol: view 1 always blurred, view 2
    blurred 0.1 and solarized 0.2) gives the small crops half of each kind, as DINO's
    multi-crop mixes them. For the symmetric recipes (mocov2, swav) every crop is alike.
    blur=False / colour=False as in `augment_recipe`.
    """
    recipe = _recipe(name)
    views: list[ViewAugment] = []
    triples = [_crop_triple(c) for c in crops]
    if not triples:
        raise ValueError("multicrop_augment needs at least one crop group")
    for count, size, scale in triples:
        if count < 1:
            raise ValueError(f"a crop group needs a positive count, got {count}")
        for j in range(count):
            table = recipe.view1 if j % 2 == 0 else recipe.view2
            views.append(ViewAugment(
                size=size, scale=scale, ratio=recipe.ratio if ratio is None else ratio,
                interpolation=recipe.interpolation if interpolation is None else interpolation,
                normalize=normalize, **table))
    if not blur:
        views = [dataclasses.replace(v, blur_p=0.0) for v in views]
    multi = MultiCropAugment(tuple(views))
    return multi if colour else multi.geometry_only()
