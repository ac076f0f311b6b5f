"""The NVIDIA DALI two-view / multi-crop loader: the same batches as `torch_loader.TwoViewLoader`,
made by DALI.

Per view, inside one DALI pipeline: region-of-interest decode (`fn.decoders.image_slice`,
`device="mixed"` on a GPU: nvJPEG / the hardware decoder) → `fn.resize` of exactly the crop box
to S×S (the recipe's bicubic) → colour jitter → grayscale → Gaussian blur → solarize → flip +
normalise to CHW (`fn.crop_mirror_normalize`). The batch dict is `TwoViewLoader`'s (view1, view2,
boxes, flips, image_size, label, index, skipped_files, epoch, batch_index) with the same geometry
convention (DESIGN.md): a view is `resize(crop(image, box))`, mirrored afterwards if its flip flag
is set, `box = (y, x, h, w)` in pixels of the original unflipped image. Every parameter comes from
the `TwoViewAugment` the PyTorch loader takes. With `device=None` (or "cpu") the same pipeline
runs in DALI's CPU-only mode (`device_id=None`, CPU decoder): what CI tests without a GPU.

Design choices (and why)
------------------------
* **Order, sharding, resume.** The file order is fed from Python through `fn.external_source`
  (encoded bytes + per-sample parameters) instead of `fn.readers.file`'s internal shuffle: epoch
  `e` visits the images in `epoch_permutation(n, seed, e)` (the PyTorch loader's order) and rank r
  of `world_size` takes the r-th slice of B of every global batch of B·world_size positions, as
  `TwoViewLoader` does. Both loaders therefore agree on which images form batch k of epoch e on
  every rank; the ranks are disjoint and together cover the global batches; `epoch_batches(e,
  start_batch=k)` and `stream(e, k)` start exactly at batch k without touching the batches before
  it. One pipeline serves a whole `stream()` across epoch boundaries (it is built once per
  iterator, so a tiny dataset with 1-batch epochs costs no rebuilds). A reader thread reads the
  next batches' files ahead (file reads release the GIL), so the caller of `pipe.run()` — the
  training loop — mostly hands over batches that are ready (~30 µs per file when read inline).
* **Randomness is a pure function of (seed, epoch, position).** DALI's random operators
  (`fn.random_crop_generator`, `fn.random.coin_flip`, ...) keep per-operator state that advances
  with every batch, so a pipeline restarted mid-epoch cannot reproduce the batches the first one
  would have made. No DALI RNG is used: every random number of a sample (flip, the crop's 10 tries
  and anchor, jitter order and factors, grayscale, blur σ, solarize) is a counter-based hash
  (SplitMix64) of (seed, epoch, global position in the epoch order, view, slot), drawn with numpy
  once per batch (vectorised). The crop window is torchvision's RandomResizedCrop sampler on those
  uniforms and the image's stored size, which the loader reads from the JPEG/PNG header it already
  holds (no decode; `fn.peek_image_shape` is not needed): up to 10 tries of area fraction
  s ~ U(scale) and log-uniform aspect a, w = round(√(s·H·W·a)), h = round(√(s·H·W/a)), accepted if
  0 < w ≤ W and 0 < h ≤ H, anchor uniform over the free range; else the centre crop clamped to the
  ratio range — `augment.random_resized_crop_box` exactly, on these uniforms. Consequences: a batch
  is a pure function of (dataset, augmentation, seed, epoch, batch index), so **a resume at (epoch,
  batch k) reproduces the uninterrupted run's batches exactly** (same images, boxes, flips and
  colour draws; the same pixels on the same kind of machine); a sample's augmentation does not
  depend on the batch size or the number of ranks; CPU and GPU runs draw identical parameters (their
  pixels differ only by decoder and resampling arithmetic). The draws have the PyTorch loader's
  distributions but not its numbers (that loader uses `random.Random`).
* **Colour jitter has torchvision's semantics**: the four factors in random order (DALI
  conditionals, `enable_conditionals=True`: each sample runs exactly its own ops in its own
  order), factors uniform in [max(0, 1−s), 1+s] (hue in [−h, h]), each op clamped to [0, 255]
  like PIL's 8-bit images: brightness x·b; contrast blends with the grey mean rounded to an
  integer (ITU-R 601 luma, as PIL); saturation blends with the per-pixel grey; hue is an exact HSV
  hue rotation written with DALI arithmetic. (DALI's `fn.hue` / `fn.hsv` are a linear YIQ
  approximation that differs from PIL's HSV by ~14 levels mean at hue 0.1, so they are not used.)
  What still differs from the Pillow path: values stay float between steps (PIL rounds every step
  to uint8: ≤ 1 level), PIL's HSV round trip quantises H, S, V to 8 bits (≈ ±1 level), and PIL
  shifts hue by int(h·255) steps of a 256-step circle. Grayscale is ITU-R 601 luma on 3 channels.
* **Blur** is `fn.gaussian_blur` with the drawn σ (window 2·⌈3σ⌉+1, a true Gaussian, border
  reflect-101); Pillow's GaussianBlur(radius=σ) approximates the same Gaussian with box filters and
  extends the edge pixels. **Solarize** has no DALI operator: x ≥ threshold → 255 − x with
  arithmetic on the float image (Pillow applies it to the rounded 8-bit image).
* **Resampling.** The decoded region is the box plus the filter's support (clamped to the image),
  and `fn.resize` samples exactly the box through its ROI, so pixels just outside the box enter the
  view's border pixels as in Pillow's `resize(box=...)` (decoding the box alone would replicate the
  box's edge instead). Output pixel (r, c) samples source (y + (r+½)·h/S − ½, x + (c'+½)·w/S − ½):
  the convention. Interpolations map to DALI's (nearest, bilinear, bicubic, lanczos = Lanczos-3);
  Pillow's "box" and "hamming" have no DALI counterpart and are refused. Downscaling is
  antialiased, as in Pillow. nvJPEG is asked for libjpeg's "fancy" chroma upsampling
  (`jpeg_fancy_upsampling`), so GPU and CPU decodes (and Pillow's) agree more closely.
* **Decoding policy = `datasets.ImageFolder`'s.** Each file is sniffed once from its bytes (header
  only): 8-bit baseline/progressive JPEGs with 1 or 3 components and an end-of-image marker, and
  8-bit grey/RGB PNGs without transparency, go to DALI's decoder as they are (EXIF orientation
  ignored, as ImageFolder does). Everything else — CMYK/YCCK JPEGs, PNGs with alpha, palette or 16
  bits, BMP/WebP/GIF/TIFF, anything that looks truncated — is decoded by Pillow with
  `datasets.decode_rgb` (transparency composited on black, 16-bit scaled, ...) and fed to DALI as a
  lossless PPM. Files Pillow cannot decode either are **skipped** like `ImageFolder.__getitem__`
  does: the sample uses the next index (i+1) % n (up to 16 tries, then a one-line `DataError`),
  and the path is listed in that batch's `skipped_files` each time the file comes up. A file that
  passes the sniff but makes DALI's decoder fail (say, corrupt entropy-coded data) stops the
  pipeline: the loader catches the error, finds the culprit among the files of the batches in
  flight, those of the batch the error surfaced with first (Pillow decode, then a one-image DALI
  probe), marks it (skipped, or Pillow-decoded when Pillow can read it), rebuilds the pipeline and
  re-feeds from the first batch not yet delivered: the batches are those an error-free run yields,
  thanks to the position-keyed randomness. If no file can be blamed, a one-line `DataError` quoting
  DALI's message is raised. Never a hang, a deep traceback or a silently wrong batch.
* **Last partial batch.** `drop_last=True` (default) drops it, so every batch has exactly
  `batch_size` images, as `TwoViewLoader`; `drop_last=False` yields it with fewer rows (one rank
  only, as `TwoViewLoader`).
* **Multi-crop** (a `MultiCropAugment`, V views of one or more sizes): the batch also holds
  `crops` (V tensors; view1 / view2 are crops[0] / crops[1]), boxes (B, V, 4), flips (B, V). Each
  image is DECODED ONCE for all of its crops: the region decoded is the union of the V views'
  regions (box + filter support each, `union_regions`) — for SwAV's 2×224 (0.14–1) + 6×96 almost
  always most of the image — and every view is `fn.resize`d from it through its own ROI (the same
  output as decoding each view's region: the ROI and its filter support lie inside both). Per-view
  ROI decodes would decode 8 overlapping regions (≈ 1.7 images of pixels on average for SwAV's
  crops, each JPEG's entropy-coded data parsed 8 times). Measured in DALI's CPU mode (2 threads,
  colour off, 47 photos of ~1280×850): 52 img/s decoding once against 25 img/s decoding per crop;
  on Imagenette's 224-px JPEGs the decode is small and both are within noise. Two views keep one
  region decode per view (`decode="per_view"`, the default for two views: on the same photos
  once ≈ per view, 42 vs 38 img/s, within noise; `decode="once"` / "per_view" choose either for
  any V; bench/test_pipeline.py has both variants for the GPU). Uniforms come from the same
  counter-based hash with V views per position (`sample_uniforms(..., views=V)`).
* **Proposals** (`proposals=(boxes (N, P, 4), counts (N,))`): mapped into every view by
  `torch_loader.proposals_in_views` in the reader thread, ahead of the step.
* **Masks** for view 1 are made on the device by the engine (engine/masking.py), not here.

Output dtype: float32 (default), float16 (made by DALI) or bfloat16 (DALI has no bf16: float32
from DALI, cast by torch on the device). With a CUDA device every tensor of the batch is on it
(views made there); in CPU mode everything is on the CPU.

DALI is imported lazily: `import pipelines.dali` works without it; constructing the loader raises a
one-line `DataError` that says how to install it. `dali_available()` tells whether it can run.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from .augment import MultiCropAugment, TwoViewAugment, ViewAugment, is_multicrop
from .datasets import MAX_DECODE_TRIES, DataError, ImageFolder, decode_rgb
from .torch_loader import (PROPOSAL_KEYS, Batch, _mix, check_batching, check_proposals,
                           count_batches, epoch_permutation, proposals_in_views, rank_slice)

DALI_INSTALL_HINT = ("pip install nvidia-dali-cuda130 (or the build for your CUDA), or use "
                     "--loader torch")

# ----------------------------------------------------------------------------- randomness

# The uniforms of one view (SLOTS_PER_VIEW per view; view 2's follow view 1's).
SLOT_FLIP = 0
SLOT_AREA = 1          # CROP_TRIES area fractions
SLOT_RATIO = 11        # CROP_TRIES log-aspects
SLOT_ANCHOR = 21       # y, x
SLOT_JITTER = 23       # apply the colour jitter?
SLOT_ORDER = 24        # 4 uniforms; their argsort is the jitter order
SLOT_FACTORS = 28      # brightness, contrast, saturation, hue
SLOT_GRAY = 32
SLOT_BLUR = 33
SLOT_SIGMA = 34
SLOT_SOLARIZE = 35
SLOTS_PER_VIEW = 40
CROP_TRIES = 10
NO_OP = 4              # jitter-order code of a step that is not applied

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 counters (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, positions, views: int = 2) -> np.ndarray:
    """(n, views, SLOTS_PER_VIEW) float64 uniforms in [0, 1) for the samples at these positions
    of the epoch order: a pure function of (seed, epoch, position, view, slot) for a given number
    of views (2, or a multi-crop's V)."""
    positions = np.asarray(positions, dtype=np.uint64).reshape(-1, 1)
    base = np.uint64(_mix(seed, epoch, 0xDA11))
    with np.errstate(over="ignore"):
        counters = (positions * np.uint64(views * SLOTS_PER_VIEW)
                    + np.arange(views * SLOTS_PER_VIEW, dtype=np.uint64))
        z = _splitmix64(base + counters * _GOLDEN)
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u.reshape(-1, views, SLOTS_PER_VIEW)


def crop_boxes(heights, widths, u: np.ndarray, scale: tuple[float, float],
               ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop sampler for n images at once: (n, 4) int64 (y, x, h, w).

    heights, widths: (n,) image sizes; u: (n, SLOTS_PER_VIEW) uniforms of the view. It is
    `augment.random_resized_crop_box` with rng.uniform(a, b) = a + (b−a)·u and
    rng.randint(0, m) = ⌊u·(m+1)⌋ (round() is half-to-even in both).
    """
    height = np.asarray(heights, dtype=np.float64)
    width = np.asarray(widths, dtype=np.float64)
    area = (height * width)[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, SLOT_AREA:SLOT_AREA + CROP_TRIES])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, SLOT_RATIO:SLOT_RATIO + CROP_TRIES])
    w_try = np.rint(np.sqrt(target * aspect))
    h_try = np.rint(np.sqrt(target / aspect))
    fits = (w_try > 0) & (w_try <= width[:, None]) & (h_try > 0) & (h_try <= height[:, None])
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(len(first)), first]
    h = np.where(found, h_try[np.arange(len(first)), first], 0.0)
    w = np.where(found, w_try[np.arange(len(first)), first], 0.0)
    y = np.minimum(np.floor(u[:, SLOT_ANCHOR] * (height - h + 1)), height - h)
    x = np.minimum(np.floor(u[:, SLOT_ANCHOR + 1] * (width - w + 1)), width - w)
    # no try fits: the centre crop of the whole image clamped to the ratio range
    in_ratio = width / height
    tall, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    w_fb = np.where(tall, width, np.where(wide, np.rint(height * max(ratio)), width))
    h_fb = np.where(tall, np.rint(width / min(ratio)), height)
    w_fb, h_fb = np.maximum(w_fb, 1), np.maximum(h_fb, 1)
    h = np.where(found, h, h_fb)
    w = np.where(found, w, w_fb)
    y = np.where(found, y, np.floor((height - h) / 2))
    x = np.where(found, x, np.floor((width - w) / 2))
    return np.stack([y, x, h, w], axis=1).astype(np.int64)


class ViewDraws(NamedTuple):
    """The random decisions of one view for n samples (besides the crop box, see crop_boxes)."""
    flip: np.ndarray            # bool (n,)
    jitter: np.ndarray          # bool (n,): ColorJitter applied
    order: np.ndarray           # int32 (n, 4): the op of each jitter slot (0 brightness,
                                #   1 contrast, 2 saturation, 3 hue; NO_OP where not applied)
    factors: np.ndarray         # float32 (n, 4): brightness, contrast, saturation, hue
    grayscale: np.ndarray       # bool (n,)
    blur: np.ndarray            # bool (n,)
    sigma: np.ndarray           # float32 (n,): σ ~ U(blur_sigma) (drawn for every sample)
    solarize: np.ndarray        # bool (n,)


def _factor_range(strength: float) -> tuple[float, float]:
    return max(0.0, 1.0 - strength), 1.0 + strength


def jitter_enabled(view: ViewAugment) -> tuple[bool, bool, bool, bool]:
    """Which of brightness, contrast, saturation, hue the view's ColorJitter can apply."""
    on = view.jitter_p > 0
    return (on and view.brightness > 0, on and view.contrast > 0, on and view.saturation > 0,
            on and view.hue > 0)


def draw_view(view: ViewAugment, u: np.ndarray) -> ViewDraws:
    """The per-sample decisions of one view from its (n, SLOTS_PER_VIEW) uniforms, with `view`'s
    probabilities and ranges (torchvision's ColorJitter: random order, factors uniform)."""
    ranges = [_factor_range(view.brightness), _factor_range(view.contrast),
              _factor_range(view.saturation), (-view.hue, view.hue)]
    lo = np.array([r[0] for r in ranges])
    hi = np.array([r[1] for r in ranges])
    factors = lo + (hi - lo) * u[:, SLOT_FACTORS:SLOT_FACTORS + 4]
    jitter = u[:, SLOT_JITTER] < view.jitter_p
    order = np.argsort(u[:, SLOT_ORDER:SLOT_ORDER + 4], axis=1, kind="stable")
    enabled = np.array(jitter_enabled(view))
    order = np.where(jitter[:, None] & enabled[order], order, NO_OP).astype(np.int32)
    s_lo, s_hi = view.blur_sigma
    return ViewDraws(
        flip=u[:, SLOT_FLIP] < view.flip_p,
        jitter=jitter,
        order=np.ascontiguousarray(order),
        factors=factors.astype(np.float32),
        grayscale=u[:, SLOT_GRAY] < view.grayscale_p,
        blur=u[:, SLOT_BLUR] < view.blur_p,
        sigma=(s_lo + (s_hi - s_lo) * u[:, SLOT_SIGMA]).astype(np.float32),
        solarize=u[:, SLOT_SOLARIZE] < view.solarize_p)


# ----------------------------------------------------------------------------- availability

def dali_available() -> tuple[bool, str]:
    """(True, "nvidia-dali <version>") when DALI and its PyTorch plugin import, else (False,
    the reason)."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401
        from nvidia import dali
    except Exception as err:  # noqa: BLE001 - any import failure means "no DALI here"
        return False, f"NVIDIA DALI is not importable ({type(err).__name__}: {err})"
    return True, f"nvidia-dali {dali.__version__}"


# ----------------------------------------------------------------------------- file routing

ROUTE_UNKNOWN, ROUTE_DALI, ROUTE_PILLOW, ROUTE_BROKEN = 0, 1, 2, 3
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF_DALI = (0xC0, 0xC1, 0xC2)        # baseline, extended, progressive (Huffman)
_JPEG_SOF_ALL = tuple(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))


def _jpeg_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, precision, height, width, components) from a JPEG's headers, or None when the
    headers are malformed."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                               # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:     # stand-alone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):                       # end of image / scan before a frame
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF_ALL:
            if i + 10 > n or length < 8:
                return None
            return (marker, data[i + 4], int.from_bytes(data[i + 5:i + 7], "big"),
                    int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9])
        i += 2 + length
    return None


def sniff(data: bytes) -> tuple[str, int, int]:
    """(where the bytes go, height, width) from a file's header, without decoding.

    "dali": DALI decodes the bytes as they are (height and width from the header); "pillow":
    decode with Pillow under ImageFolder's policy; "suspect": looks broken (Pillow decides).
    Sizes are 0 unless the route is "dali".
    """
    if len(data) < 26:
        return "suspect", 0, 0
    if data[:3] == b"\xff\xd8\xff":
        frame = _jpeg_frame(data)
        if frame is None or data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
            return "suspect", 0, 0     # malformed headers, or no end-of-image marker: truncated
        marker, precision, height, width, components = frame
        if (marker in _JPEG_SOF_DALI and precision == 8 and components in (1, 3)
                and height > 0 and width > 0):
            return "dali", height, width
        return "pillow", 0, 0
    if data[:8] == _PNG_SIGNATURE:
        if data[12:16] != b"IHDR" or data[-8:-4] != b"IEND":
            return "suspect", 0, 0
        width = int.from_bytes(data[16:20], "big")
        height = int.from_bytes(data[20:24], "big")
        depth, colour_type = data[24], data[25]
        idat = data.find(b"IDAT")
        transparent = data.find(b"tRNS", 0, idat if idat > 0 else len(data)) >= 0
        if depth == 8 and colour_type in (0, 2) and not transparent and height and width:
            return "dali", height, width
        return "pillow", 0, 0
    return "pillow", 0, 0


def pillow_ppm(path: str) -> tuple[bytes, int, int]:
    """(binary PPM bytes, height, width) of the file decoded by Pillow under ImageFolder's policy.
    Raises whatever Pillow raises for an unreadable file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        image = decode_rgb(path)
    header = f"P6\n{image.width} {image.height}\n255\n".encode()
    return header + image.tobytes(), image.height, image.width


def _pillow_decodes(path: str) -> bool:
    try:
        pillow_ppm(path)
    except Exception:  # noqa: BLE001 - any decode failure means "unreadable"
        return False
    return True


def _dali_error_line(err: BaseException) -> str:
    """The informative line of a DALI pipeline error (the message spans many lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for k, line in enumerate(lines):
        if line.startswith("encountered:") and k + 1 < len(lines):
            return lines[k + 1][:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


# ----------------------------------------------------------------------------- the graph

_LUMA = (0.299, 0.587, 0.114)
# Pillow interpolation → (DALI interpolation, filter radius in source pixels at scale 1)
_INTERP = {"nearest": ("INTERP_NN", 0.5), "bilinear": ("INTERP_LINEAR", 1.0),
           "bicubic": ("INTERP_CUBIC", 2.0), "lanczos": ("INTERP_LANCZOS3", 3.0)}
# (g − b, b − r, r − g): the differences HSV's hue uses for max = r, g, b
_HUE_DIFFERENCES = (0.0, 1.0, -1.0, -1.0, 0.0, 1.0, 1.0, -1.0, 0.0)


class _ViewSpec(NamedTuple):
    """What the graph of one view needs at build time (a step off for every sample is left out)."""
    size: int
    interp: str
    support: float
    jitter: tuple[bool, bool, bool, bool]
    grayscale: bool
    blur: bool
    solarize: bool
    threshold: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _view_spec(view: ViewAugment) -> _ViewSpec:
    if view.interpolation not in _INTERP:
        raise DataError(f"interpolation {view.interpolation!r} has no DALI counterpart: use one "
                        f"of {', '.join(_INTERP)} with the DALI loader")
    interp, support = _INTERP[view.interpolation]
    if view.normalize:
        mean = tuple(255.0 * m for m in view.mean)
        std = tuple(255.0 * s for s in view.std)
    else:
        mean, std = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    return _ViewSpec(int(view.size), interp, support, jitter_enabled(view),
                     view.grayscale_p > 0, view.blur_p > 0, view.solarize_p > 0,
                     float(view.solarize_threshold), mean, std)


def _feed_names(specs: tuple[_ViewSpec, ...], decode_once: bool = False) -> list[str]:
    """The external_source outputs, in order (only those the graph uses)."""
    names = ["encoded", "meta"] + (["anchor", "extent"] if decode_once else [])
    for v, spec in enumerate(specs):
        names += ([] if decode_once else [f"anchor{v}", f"extent{v}"])
        names += [f"roi_start{v}", f"roi_end{v}", f"mirror{v}"]
        if any(spec.jitter):
            names += [f"order{v}", f"factors{v}"]
        if spec.grayscale:
            names.append(f"gray{v}")
        if spec.blur:
            names += [f"blur{v}", f"sigma{v}"]
        if spec.solarize:
            names.append(f"solarize{v}")
    return names


def decode_regions(boxes: np.ndarray, heights, widths, size: int, support: float):
    """The region to decode for each box — the box plus the resampling filter's support, clamped
    to the image — and the box inside it: (anchor int32 (n, 2), extent int32 (n, 2), roi_start
    float32 (n, 2), roi_end float32 (n, 2)), all (row, column)."""
    y, x, h, w = (boxes[:, k].astype(np.int64) for k in range(4))
    height = np.asarray(heights, dtype=np.int64)
    width = np.asarray(widths, dtype=np.int64)
    margin_y = np.ceil(support * np.maximum(h / size, 1.0)).astype(np.int64) + 1
    margin_x = np.ceil(support * np.maximum(w / size, 1.0)).astype(np.int64) + 1
    y0, x0 = np.maximum(y - margin_y, 0), np.maximum(x - margin_x, 0)
    y1, x1 = np.minimum(y + h + margin_y, height), np.minimum(x + w + margin_x, width)
    anchor = np.stack([y0, x0], axis=1).astype(np.int32)
    extent = np.stack([y1 - y0, x1 - x0], axis=1).astype(np.int32)
    roi_start = np.stack([y - y0, x - x0], axis=1).astype(np.float32)
    roi_end = roi_start + np.stack([h, w], axis=1).astype(np.float32)
    return anchor, extent, roi_start, roi_end


def union_regions(boxes: np.ndarray, heights, widths, sizes, supports):
    """One region per image covering every view's decode region (`decode_regions`), and each box
    inside it: (anchor int32 (n, 2), extent int32 (n, 2), roi_start float32 (n, V, 2), roi_end
    float32 (n, V, 2)), all (row, column). boxes (n, V, 4); sizes, supports: per view."""
    starts, ends = [], []
    for v, (size, support) in enumerate(zip(sizes, supports)):
        anchor, extent, _, _ = decode_regions(boxes[:, v], heights, widths, size, support)
        starts.append(anchor.astype(np.int64))
        ends.append(anchor.astype(np.int64) + extent)
    lo = np.min(np.stack(starts, axis=1), axis=1)                      # (n, 2)
    hi = np.max(np.stack(ends, axis=1), axis=1)
    yx = boxes[:, :, :2].astype(np.int64)
    roi_start = (yx - lo[:, None, :]).astype(np.float32)
    roi_end = roi_start + boxes[:, :, 2:].astype(np.float32)
    return lo.astype(np.int32), (hi - lo).astype(np.int32), roi_start, roi_end


# Graph builders. Module-level so that AutoGraph (DALI's conditionals) converts the pipeline
# definition once per process; the helpers are exempted from conversion in _graph_definition.

def _brightness(img, factor):
    import nvidia.dali.math as dmath

    return dmath.clamp(img * factor, 0.0, 255.0)


def _contrast(img, factor):
    """PIL's ImageEnhance.Contrast: blend with the grey mean rounded to an integer."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    grey = fn.reductions.mean(fn.coord_transform(img, M=list(_LUMA)), keep_dims=True)
    return dmath.clamp(factor * img + (1.0 - factor) * dmath.floor(grey + 0.5), 0.0, 255.0)


def _saturation(img, factor):
    """PIL's ImageEnhance.Color: blend with the per-pixel grey (ITU-R 601 luma)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    grey = fn.coord_transform(img, M=list(_LUMA))
    return dmath.clamp(factor * img + (1.0 - factor) * grey, 0.0, 255.0)


def _hue(img, delta):
    """Exact HSV hue rotation by `delta` turns (torchvision's adjust_hue) of a float RGB image:
    a pixel keeps its max and min, its hue h (in sixths of a turn) moves to h + 6·delta, and
    channel c becomes max − chroma·clamp(min(k, 4 − k), 0, 1) with k = (n_c + h) mod 6,
    n = (5, 3, 1)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    hi = fn.reductions.max(img, axes=[2], keep_dims=True)
    lo = fn.reductions.min(img, axes=[2], keep_dims=True)
    chroma = hi - lo
    inverse = 1.0 / (chroma + (chroma == 0))
    differences = fn.coord_transform(img, M=list(_HUE_DIFFERENCES))
    sector = types.Constant(np.array([[[0.0, 2.0, 4.0]]], np.float32), device=img.device)
    # the hue seen from each channel; only the maximal channel's counts (ties agree)
    candidates = differences * inverse + sector - 8.0 * (img != hi)
    hue6 = fn.reductions.max(candidates, axes=[2], keep_dims=True) + 6.0 * delta
    k = hue6 + types.Constant(np.array([[[5.0, 3.0, 1.0]]], np.float32), device=img.device)
    k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
    return hi - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def _solarize(img, threshold):
    return img + (img >= threshold) * (255.0 - 2.0 * img)


def _decode(encoded, anchor, extent, decoder_device):
    from nvidia.dali import fn, types

    return fn.decoders.image_slice(
        encoded, anchor, extent, device=decoder_device, axis_names="HW",
        adjust_orientation=False, output_type=types.RGB,
        jpeg_fancy_upsampling=True)   # nvJPEG upsamples chroma as libjpeg (and Pillow) do


def _views_graph(specs, names, feed, decoder_device, half, decode_once):
    """The pipeline definition (AutoGraph turns the `if`s on DALI data into DALI conditionals).
    decode_once: one region per image (the union of its views' regions) decoded once and every
    view resized from it; else one region decode per view."""
    from nvidia.dali import fn, types

    fed = dict(zip(names, fn.external_source(source=feed, num_outputs=len(names), batch=True)))
    encoded = fed["encoded"]
    whole = None
    if decode_once:
        whole = _decode(encoded, fed["anchor"], fed["extent"], decoder_device)
    views = []
    for v, spec in enumerate(specs):
        if decode_once:
            region = whole
        else:
            region = _decode(encoded, fed[f"anchor{v}"], fed[f"extent{v}"], decoder_device)
        img = fn.resize(region, size=[spec.size, spec.size], roi_start=fed[f"roi_start{v}"],
                        roi_end=fed[f"roi_end{v}"], roi_relative=False,
                        interp_type=getattr(types, spec.interp), antialias=True,
                        dtype=types.FLOAT)
        if any(spec.jitter):   # random order: jitter slot k applies op order[k]
            order, factors = fed[f"order{v}"], fed[f"factors{v}"]
            on_b, on_c, on_s, on_h = spec.jitter
            for slot in range(4):
                op = order[slot]
                if on_b:  # noqa: SIM102 - a build-time test around a DALI conditional
                    if op == 0:
                        img = _brightness(img, factors[0])
                if on_c:  # noqa: SIM102
                    if op == 1:
                        img = _contrast(img, factors[1])
                if on_s:  # noqa: SIM102
                    if op == 2:
                        img = _saturation(img, factors[2])
                if on_h:  # noqa: SIM102
                    if op == 3:
                        img = _hue(img, factors[3])
        if spec.grayscale:  # noqa: SIM102
            if fed[f"gray{v}"]:
                img = fn.coord_transform(img, M=list(_LUMA) * 3)
        if spec.blur:  # noqa: SIM102
            if fed[f"blur{v}"]:
                img = fn.gaussian_blur(img, sigma=fed[f"sigma{v}"])
        if spec.solarize:  # noqa: SIM102
            if fed[f"solarize{v}"]:
                img = _solarize(img, spec.threshold)
        views.append(fn.crop_mirror_normalize(
            img, mirror=fed[f"mirror{v}"], mean=list(spec.mean), std=list(spec.std),
            output_layout="CHW", dtype=types.FLOAT16 if half else types.FLOAT))
    return (*views, fed["meta"])


_GRAPH = None


def _graph_definition():
    """`_views_graph` as a DALI pipeline definition with conditionals (made once)."""
    global _GRAPH
    if _GRAPH is None:
        from nvidia.dali.pipeline import do_not_convert, pipeline_def

        for name in ("_brightness", "_contrast", "_saturation", "_hue", "_solarize", "_decode"):
            globals()[name] = do_not_convert(globals()[name])
        _GRAPH = pipeline_def(_views_graph, enable_conditionals=True)
    return _GRAPH


def _build_pipeline(specs, feed, batch_size: int, threads: int, device_id: int | None,
                    seed: int, prefetch: int, half: bool, decode_once: bool = False):
    """The built DALI pipeline for the views of `specs`; `feed()` returns one batch of the
    external_source outputs named by `_feed_names(specs, decode_once)`."""
    pipe = _graph_definition()(
        specs, _feed_names(specs, decode_once), feed, "cpu" if device_id is None else "mixed",
        half, decode_once,
        batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
        prefetch_queue_depth=prefetch)
    pipe.build()
    return pipe


def _dali_rejects(files: list[str], device_id: int | None) -> list[bool]:
    """For each file, whether DALI's decoder (on this device) fails on it: a one-image pipeline
    reused from file to file (rebuilt after each failure), used only to find the file that broke a
    batch."""
    from nvidia.dali import fn, pipeline_def, types

    holder: list[np.ndarray] = []

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1,
                  exec_pipelined=False, exec_async=False)
    def probe():
        encoded = fn.external_source(source=lambda: [holder[-1]], batch=True)
        return fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                 adjust_orientation=False, output_type=types.RGB)

    rejected, pipe = [], None
    for path in files:
        holder.append(np.fromfile(path, dtype=np.uint8))
        try:
            if pipe is None:
                pipe = probe()
                pipe.build()
            pipe.run()
            rejected.append(False)
        except Exception:  # noqa: BLE001 - any failure means "DALI cannot decode this file"
            rejected.append(True)
            pipe = None
    return rejected


# ----------------------------------------------------------------------------- the loader

class _Job(NamedTuple):
    epoch: int
    batch_index: int
    positions: np.ndarray   # int64 (b,): positions in the epoch order (the randomness key)
    indices: np.ndarray     # int64 (b,): dataset indices before substitution


class _Fed(NamedTuple):
    """A batch handed to the pipeline and not yet delivered: what the batch dict needs besides the
    pixels, and what a failure diagnosis needs."""
    job: _Job
    index: np.ndarray       # int64 (b,): dataset index actually used
    boxes: np.ndarray       # float32 (b, V, 4)
    flips: np.ndarray       # bool (b, V)
    image_size: np.ndarray  # int64 (b, 2)
    skipped: list[str]      # unreadable files met on the way
    dali_routed: list[int]  # indices whose raw bytes DALI decodes
    proposals: tuple | None = None  # (proposals (b, V, P, 4), visible (b, V, P)) CPU tensors


class _Feeder:
    """The external_source callback: one batch of bytes + parameters per call. A reader thread
    prepares the next `readahead` batches (file reads release the GIL), so the caller of
    `pipe.run()` — the training loop — mostly just hands over ready batches. Remembers what is in
    flight so that a failing batch can be diagnosed and re-fed."""

    def __init__(self, loader: DaliTwoViewLoader, jobs: Iterator[_Job], readahead: int = 2):
        self.loader, self.jobs, self.readahead = loader, jobs, readahead
        self.in_flight: deque[_Fed] = deque()
        self.error: BaseException | None = None
        self._pending: deque[Future] = deque()
        self._exhausted = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-feed")

    def _fill(self) -> None:
        while len(self._pending) < self.readahead and not self._exhausted:
            try:
                job = next(self.jobs)
            except StopIteration:
                self._exhausted = True
                return
            self._pending.append(self._pool.submit(self._batch, job))

    def __call__(self):
        self._fill()
        if not self._pending:
            raise StopIteration   # ends the pipeline's data
        future = self._pending.popleft()
        try:
            feed, fed = future.result()
        except BaseException as err:  # re-raised by the loader (DALI wraps what it catches)
            self.error = err
            raise
        self.in_flight.append(fed)
        self._fill()
        return feed

    def close(self, wait: bool = False) -> None:
        """Stop the reader thread (`wait`: until its current batch is done)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=wait)

    def _batch(self, job: _Job):
        loader = self.loader
        encoded, used, skipped, dali_routed = [], [], [], []
        for index in job.indices.tolist():
            data, i, route, missed = loader._sample_bytes(index)
            encoded.append(data)
            used.append(i)
            skipped += missed
            if route == ROUTE_DALI:
                dali_routed.append(i)
        index = np.asarray(used, dtype=np.int64)
        sizes = loader._sizes[index].astype(np.int64)
        views = loader.augment.views
        u = sample_uniforms(loader.seed, job.epoch, job.positions, len(views))
        feed: dict[str, Any] = {
            "encoded": encoded,
            "meta": np.stack([index, np.full(len(index), job.batch_index, np.int64)], axis=1)}
        boxes, flips = [], []
        for v, (view, spec) in enumerate(zip(views, loader._specs)):
            box = crop_boxes(sizes[:, 0], sizes[:, 1], u[:, v], view.scale, view.ratio)
            draws = draw_view(view, u[:, v])
            if not loader.decode_once:
                (feed[f"anchor{v}"], feed[f"extent{v}"], feed[f"roi_start{v}"],
                 feed[f"roi_end{v}"]) = decode_regions(box, sizes[:, 0], sizes[:, 1], spec.size,
                                                       spec.support)
            feed[f"mirror{v}"] = draws.flip.astype(np.int32)
            feed[f"order{v}"] = draws.order
            feed[f"factors{v}"] = draws.factors
            feed[f"gray{v}"] = draws.grayscale
            feed[f"blur{v}"] = draws.blur
            feed[f"sigma{v}"] = draws.sigma
            feed[f"solarize{v}"] = draws.solarize
            boxes.append(box)
            flips.append(draws.flip)
        boxes, flips = np.stack(boxes, axis=1), np.stack(flips, axis=1)
        if loader.decode_once:   # one region per image covering every view's
            feed["anchor"], feed["extent"], roi_start, roi_end = union_regions(
                boxes, sizes[:, 0], sizes[:, 1], [sp.size for sp in loader._specs],
                [sp.support for sp in loader._specs])
            for v in range(len(views)):
                feed[f"roi_start{v}"] = np.ascontiguousarray(roi_start[:, v])
                feed[f"roi_end{v}"] = np.ascontiguousarray(roi_end[:, v])
        boxes = boxes.astype(np.float32)
        proposals = None
        if loader.proposals is not None:   # here, in the reader thread, ahead of the step
            proposals = proposals_in_views(*loader.proposals, torch.from_numpy(index),
                                           torch.from_numpy(boxes), torch.from_numpy(flips),
                                           [sp.size for sp in loader._specs])
        fed = _Fed(job, index, boxes, flips, sizes, skipped, dali_routed, proposals)
        return tuple(feed[name] for name in loader._names), fed


class DaliTwoViewLoader:
    """Two-view or multi-crop batches with crop geometry from an image folder, made by an NVIDIA
    DALI pipeline.

    root: an image folder (`datasets.ImageFolder` layout: class/xxx.jpg or flat) or an
    `ImageFolder`. augment: the `TwoViewAugment` or `MultiCropAugment` (the PyTorch loader's).
    decode: "auto" (default: "once" for more than two views, "per_view" for two), "once" (one
    region per image, the union of its views' regions, decoded once and every view resized from
    it) or "per_view" (one region decode per view, just the view's box plus the filter support).
    proposals: (boxes (N, P, 4), counts (N,)) region proposals by dataset index, mapped into every
    view (`torch_loader.TwoViewLoader`; computed in the reader thread). device: None or "cpu"
    runs DALI's CPU-only mode; "cuda", "cuda:N" or a torch.device decodes with nvJPEG ("mixed")
    and runs every image operator on that GPU. threads: DALI CPU threads (default: the CPUs this
    process may use, at most 16). drop_last: drop each epoch's final partial batch (default).
    dtype: float32, float16 or bfloat16 views. prefetch: DALI's prefetch queue depth.
    seed, rank, world_size: as `TwoViewLoader` (the same order and sharding).

    Batches are `TwoViewLoader`'s dicts; the module docstring says how they are made and what
    differs from the Pillow path.
    """

    def __init__(self, root, augment: TwoViewAugment | MultiCropAugment, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device | None = None, threads: int | None = None,
                 drop_last: bool = True, dtype: torch.dtype = torch.float32, prefetch: int = 2,
                 decode: str = "auto", proposals=None):
        ok, reason = dali_available()
        if not ok:
            raise DataError(f"the DALI loader needs NVIDIA DALI, which is not importable here "
                            f"({reason.split('(', 1)[-1].rstrip(')')}): {DALI_INSTALL_HINT}")
        dataset = root if isinstance(root, ImageFolder) else ImageFolder(os.fspath(root))
        n = len(dataset)
        check_batching(n, batch_size, rank, world_size, drop_last)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise DataError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if prefetch < 1:
            raise DataError(f"prefetch must be >= 1, got {prefetch}")
        if threads is None:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                threads = os.cpu_count() or 1
            threads = min(threads, 16)
        if threads < 1:
            raise DataError(f"threads must be >= 1, got {threads}")
        if decode not in ("auto", "once", "per_view"):
            raise DataError(f"decode must be 'auto', 'once' or 'per_view', got {decode!r}")
        self._specs = tuple(_view_spec(view) for view in augment.views)
        self.multicrop = is_multicrop(augment)
        self.decode_once = decode == "once" or (decode == "auto" and len(self._specs) > 2)
        self.proposals = None if proposals is None else check_proposals(proposals, n)
        self.device = self._resolve_device(device)
        self.dataset, self.augment = dataset, augment
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last, self.dtype, self.prefetch = drop_last, dtype, int(prefetch)
        self.threads = int(threads)
        self._labels = np.asarray(dataset.labels, dtype=np.int64)
        self._routes = np.zeros(n, dtype=np.uint8)      # ROUTE_* per file, learnt on first use
        self._sizes = np.zeros((n, 2), dtype=np.int32)  # (H, W) per file, learnt with the route
        self._names = _feed_names(self._specs, self.decode_once)

    @staticmethod
    def _resolve_device(device) -> torch.device:
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cpu":
            return dev
        if dev.type != "cuda":
            raise DataError(f"the DALI loader runs on the CPU or a CUDA device, not {dev}")
        if not torch.cuda.is_available():
            raise DataError(f"device {dev} requested but CUDA is not available: use device=None "
                            f"(DALI's CPU mode) or --loader torch")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None
                            else dev.index)

    @property
    def device_id(self) -> int | None:
        """DALI's device_id: None in CPU-only mode."""
        return None if self.device.type == "cpu" else self.device.index

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def batches_per_epoch(self) -> int:
        return count_batches(len(self.dataset), self.batch_size, self.world_size, self.drop_last)

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ------------------------------------------------------------------ what to feed

    def _jobs(self, epoch: int, start_batch: int, one_epoch: bool) -> Iterator[_Job]:
        n = len(self.dataset)
        while True:
            order = epoch_permutation(n, self.seed, epoch).numpy()
            for k in range(start_batch, self.batches_per_epoch):
                lo, hi = rank_slice(k, self.batch_size, self.rank, self.world_size, n)
                yield _Job(epoch, k, np.arange(lo, hi, dtype=np.int64), order[lo:hi])
            if one_epoch:
                return
            epoch, start_batch = epoch + 1, 0

    def _file_bytes(self, index: int) -> tuple[np.ndarray | None, int]:
        """(encoded bytes for DALI, route) of one file; (None, ROUTE_BROKEN) if unreadable. Learns
        the file's route and size on first use."""
        path = self.dataset.paths[index]
        route = self._routes[index]
        if route == ROUTE_BROKEN:
            return None, ROUTE_BROKEN
        try:
            if route == ROUTE_PILLOW:
                return np.frombuffer(pillow_ppm(path)[0], dtype=np.uint8), ROUTE_PILLOW
            with open(path, "rb") as f:
                data = f.read()
            if route == ROUTE_UNKNOWN:
                kind, height, width = sniff(data)
                if kind != "dali":
                    ppm, height, width = pillow_ppm(path)   # raises for an unreadable file
                    self._sizes[index] = (height, width)
                    self._routes[index] = ROUTE_PILLOW
                    return np.frombuffer(ppm, dtype=np.uint8), ROUTE_PILLOW
                self._sizes[index] = (height, width)
                self._routes[index] = ROUTE_DALI
            return np.frombuffer(data, dtype=np.uint8), ROUTE_DALI
        except Exception:  # noqa: BLE001 - any read/decode failure means "skip this file"
            self._routes[index] = ROUTE_BROKEN
            return None, ROUTE_BROKEN

    def _sample_bytes(self, index: int) -> tuple[np.ndarray, int, int, list[str]]:
        """ImageFolder's substitution: the first readable of index, index+1, ... (16 tries)."""
        n = len(self.dataset)
        skipped: list[str] = []
        for attempt in range(min(MAX_DECODE_TRIES, n)):
            i = (index + attempt) % n
            data, route = self._file_bytes(i)
            if data is None:
                skipped.append(self.dataset.paths[i])
                continue
            return data, i, route, skipped
        raise DataError(f"too many unreadable images near {self.dataset.paths[index]} "
                        f"({len(skipped)} in a row failed to decode): check the folder "
                        f"{self.dataset.root}")

    # ------------------------------------------------------------------ iteration

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from batch index `start_batch` on (resume mid-epoch exactly)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        if start_batch == self.batches_per_epoch:
            return iter(())
        return self._iterate(epoch, start_batch, one_epoch=True)

    def stream(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Endless batches from (epoch, start_batch) on, across epochs, from one pipeline.
        Each batch's `epoch` and `batch_index` say where it came from (for checkpoints)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        if start_batch == self.batches_per_epoch:
            epoch, start_batch = epoch + 1, 0
        return self._iterate(epoch, start_batch, one_epoch=False)

    def _iterate(self, epoch: int, start_batch: int, one_epoch: bool):
        pipe = feeder = None
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            while True:   # one pipeline per pass; a new pass after a decode failure
                feeder = _Feeder(self, self._jobs(epoch, start_batch, one_epoch))
                pipe = _build_pipeline(self._specs, feeder, self.batch_size, self.threads,
                                       self.device_id, _mix(self.seed, epoch) & 0x7FFFFFFF,
                                       self.prefetch, half=self.dtype == torch.float16,
                                       decode_once=self.decode_once)
                while True:
                    try:
                        outputs = pipe.run(stream)   # outputs bound to torch's stream
                    except StopIteration:
                        return
                    except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError
                        if feeder.error is not None:
                            raise feeder.error from None
                        if not feeder.in_flight:
                            raise DataError(f"DALI pipeline failed: {_dali_error_line(err)}"
                                            ) from None
                        feeder.close(wait=True)   # no reader thread runs while files are judged
                        first = feeder.in_flight[0].job
                        self._blame(list(feeder.in_flight), err)
                        epoch, start_batch = first.epoch, first.batch_index
                        break
                    yield self._to_batch(outputs, feeder.in_flight.popleft())
                pipe = None   # releases the failed pipeline before the next is built
        finally:
            if feeder is not None:
                feeder.close()
            del pipe

    def _blame(self, pending: list[_Fed], err: BaseException) -> None:
        """Find and mark the file(s) that made DALI fail, or raise a one-line DataError. The
        error surfaces with the first batch not delivered, so its files are judged first."""
        for group in (pending[:1], pending[1:]):
            suspects = list(dict.fromkeys(i for fed in group for i in fed.dali_routed))
            broken = [i for i in suspects if not _pillow_decodes(self.dataset.paths[i])]
            for i in broken:
                self._routes[i] = ROUTE_BROKEN
            if broken:
                return
            rejected = _dali_rejects([self.dataset.paths[i] for i in suspects], self.device_id)
            for i, bad in zip(suspects, rejected):
                if bad:
                    self._routes[i] = ROUTE_PILLOW    # Pillow reads it: decode it there
            if any(rejected):
                return
        job = pending[0].job
        raise DataError(f"DALI pipeline failed on epoch {job.epoch} batch {job.batch_index} and "
                        f"no file could be blamed: {_dali_error_line(err)}")

    def _to_batch(self, outputs, fed: _Fed) -> dict[str, Any]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        *outputs, meta = outputs
        meta = np.asarray(meta.as_array())
        if not (np.array_equal(meta[:, 0], fed.index) and (meta[:, 1] == fed.job.batch_index).all()):
            raise DataError("internal error: DALI returned batches out of order")
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if cuda else None
        dali_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        views = []
        for out in outputs:
            dense = out.as_tensor()
            tensor = torch.empty(dense.shape(), dtype=dali_dtype, device=self.device)
            feed_ndarray(dense, tensor, cuda_stream=stream)
            views.append(tensor if dali_dtype == self.dtype else tensor.to(self.dtype))
        batch = Batch({"crops": views} if self.multicrop else {})
        batch.update({
            "view1": views[0],
            "view2": views[1],
            "boxes": torch.from_numpy(fed.boxes),
            "flips": torch.from_numpy(fed.flips),
            "image_size": torch.from_numpy(fed.image_size),
            "label": torch.from_numpy(self._labels[fed.index]),
            "index": torch.from_numpy(fed.index),
            "skipped_files": list(fed.skipped),
            "epoch": int(fed.job.epoch),
            "batch_index": int(fed.job.batch_index),
        })
        if fed.proposals is not None:
            batch.update(zip(PROPOSAL_KEYS, fed.proposals))
        if cuda:
            for key in ("boxes", "flips", "image_size", "label", "index", *PROPOSAL_KEYS):
                if key in batch:
                    batch[key] = batch[key].to(self.device, non_blocking=True)
        return batch
