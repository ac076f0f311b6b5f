"""The resident two-view / multi-crop loader: a small dataset decoded once into device memory,
augmented there.

For datasets that fit in device memory (CIFAR-10: 50k × 32²; Imagenette-128: 9,469 × 128²) the
whole folder is decoded once (Pillow, a thread pool) into one uint8 tensor on the training device,
and every batch is cut, resized, flipped, colour-jittered, blurred, solarised and normalised there
by a handful of batched tensor ops. An epoch then costs seconds, with no worker processes and no
host-to-device image traffic. `ResidentTwoViewLoader` is a drop-in for `torch_loader.TwoViewLoader`
(same constructor arguments where they apply, same batch dict, same epoch order and sharding).

Storage (`ResidentImages`). Images are stored as (R, 3, Hmax, Wmax) uint8 (R readable images, in
dataset order), each in the top-left corner of its slot with the padding filled by REPLICATING the
image's last row/column, plus a per-image table of original and stored sizes. With `max_side`, an
image whose longer side exceeds it is first resized by Pillow (bicubic, antialiased) so that its
longer side is `max_side`; the stored image is then a resampling of the original, and everything
the loader reports (boxes, image_size) stays in ORIGINAL-image pixels: the crop sampler runs on the
original size and the view is sampled from the stored copy through the exact pixel-centre mapping
stored = (original + ½)·(stored size / original size) − ½ (the mapping Pillow's resize itself uses).

Memory budget: the padded tensor must fit `max_bytes`; by default half of the free device memory
on CUDA (`torch.cuda.mem_get_info`), half of the available host memory on the CPU. Otherwise a
one-line `DataError` says how much is needed and suggests `--loader torch` / `--loader dali` or a
smaller `max_side`. A projection from the first chunk of decoded images refuses early (before the
whole folder is decoded) when it exceeds 1.5× the budget.

Geometry (DESIGN.md): output pixel (r, c) of an S×S view samples original row y + (r+½)·h/S − ½ and
column x + (c'+½)·w/S − ½, c' = S−1−c when flipped. It is one `grid_sample` per batch and view
size (the views of one size stacked along rows: one launch for two views, two for SwAV's 2×224 +
6×96 multi-crop; every later step also runs once per view size), align_corners=False, padding_mode='border', with a per-sample
affine grid built from the boxes. Because the stored padding replicates each image's own edge,
'border' clamping is clamping at the image's own edge (as torchvision's tensor resize does), never
a read of another image or of zeros. Differences from the Pillow path (torch_loader): PyTorch's
bicubic is Keys' cubic with a = −0.75 (Pillow: a = −0.5, slightly softer), so bicubic views are not
bit-identical to Pillow's; bilinear reproduces a linear ramp exactly (the geometry test relies on
it). Pillow renormalises its kernel at the image border, grid_sample clamps.

Antialiasing: grid_sample point-samples, so a crop much larger than the view aliases. With
`antialias=True` (default) the loader supersamples by a static factor k = ceil(max(Hmax, Wmax) /
(2·S)) (capped at 4): it samples a kS×kS grid whose k×k sub-samples per output pixel are spread
over the pixel's footprint in the source (spread ∝ clamp(source pixels per output pixel − 1, 0,
1), so an upscaled or 1:1 crop is not blurred) and averages them (avg_pool2d). The sub-samples
are symmetric about the pixel centre, so the geometry is unchanged. k = 1 (no extra cost) whenever
the stored images are at most twice the view size: CIFAR-10 at 32 px and Imagenette-128 at 112 or
128 px both sample once per pixel. For big stored images prefer `max_side` (Pillow antialiases the
one-off resize).

Colour (after the crop, float in [0, 1], torchvision tensor semantics, clamped to [0, 1] after
every blend as torchvision's `_blend` does): ColorJitter with probability jitter_p: brightness
(multiply by f), contrast (blend with the mean of the image's grayscale), saturation (blend with
the grayscale), hue (shift in HSV, hexcone model, written as the closed form
max − chroma·clamp(min(k, 4 − k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B: the same
function as torchvision's _rgb2hsv → shift → _hsv2rgb), each factor uniform in [max(0, 1−s), 1+s]
(hue in [−hue, hue]), in a random order per sample. The order is vectorised as four slots: at slot
t every sample applies its t-th op (the three blends share one kernel through a per-sample
"degenerate" image: 0, the grey mean or the grey image; the hue result is selected by mask).
Grayscale: ITU-R 601-2 luma 0.299 R + 0.587 G + 0.114 B (Pillow's "L", what the torch loader uses;
torchvision's tensor op uses 0.2989). Gaussian blur with σ ~ U(blur_sigma): separable, per-sample
kernels exp(−t²/2σ²) normalised over t ∈ [−R, R], R = ceil(3·max σ of the config) (static: no
host sync), reflect padding (torchvision), as two grouped conv2d over (1, B·3·2, S, S); samples not
blurred get a delta kernel (exact identity). Pillow's GaussianBlur (torch loader) approximates the
Gaussian by three box blurs, so the two paths differ slightly. Solarize: x ≥ threshold/255 → 1 − x.
Then normalise. Ops whose probability is 0 in both views are not computed at all. On the CPU only
(`compact`), each gated step is computed just for the (sample, view) pairs that use it (boolean
indexing: free on the CPU, a host sync on CUDA).

Randomness and reproducibility. Epoch e visits the dataset in `torch_loader.epoch_permutation(n,
seed, e)` order, global batch k is positions [k·B·world, (k+1)·B·world) and rank r takes the r-th
slice of B: exactly the torch loader's order and sharding, so the two loaders yield the same image
indices batch for batch (unreadable files are replaced by the next readable image, as
`ImageFolder` does). Every random parameter of an epoch comes from ONE `torch.rand((n, V, 36))`
(V = 2, or a multi-crop's V) drawn on the device from a `torch.Generator` seeded by (seed, epoch):
row p holds the uniforms of the sample at epoch position p, per view (flip, 10 crop tries of area and aspect, anchor, jitter gate, order,
factors, grayscale, blur gate and σ, solarize gate; the same layout whatever the config, so turning
colour off leaves the crops unchanged). A batch is therefore a pure function of (images, augment,
seed, epoch, batch index, rank, batch size·world): resuming with `start_batch=k` reproduces it bit
for bit, the augmentation of a sample does not depend on the number of ranks (nor on the batch
size), and the global torch RNG is never touched. The CPU and CUDA generators are different
streams: the same seed gives different (equally distributed) draws on CPU and on CUDA.

Host work per batch: a few Python integers and tensor views; on CUDA no `.item()`, `.tolist()`,
boolean indexing or data-dependent shape (only the CPU's `compact` colour steps index by mask).
Per epoch: one CPU `randperm` (the torch loader's order), copied to the device from pinned memory
with non_blocking=True, and one `torch.rand` on the device. The uniform table costs n·V·36·4 bytes
of device memory (14 MB for CIFAR-10's 50k with two views). Per batch, the gathered slots are
converted to float (B·3·Hmax·Wmax·4 bytes, 50 MB at B = 256 and 128² slots): another reason to
bound slots with `max_side` for folders of large photos. Decoding holds the decoded images in host memory once
(unpadded) before they are copied to the device in chunks.

Multi-crop and proposals. With a `MultiCropAugment` the batch also holds `crops` (V tensors, view1 /
view2 = crops[0] / crops[1]), boxes (B, V, 4) and flips (B, V). With `proposals` (boxes (N, P, 4),
counts (N,)), kept on the device, each batch holds them mapped into every view
(`torch_loader.proposals_in_views`: index_select + `geometry.boxes_in_view`, tensor ops only, no
host sync).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import MultiCropAugment, TwoViewAugment, ViewAugment, is_multicrop, size_runs
from .datasets import MAX_DECODE_TRIES, DataError, ImageFolder, resolve_source
from .torch_loader import (Batch, _mix, check_batching, check_proposals, count_batches,
                           epoch_permutation, proposals_in_views, rank_slice)

GRID_SAMPLE_MODES = ("bicubic", "bilinear", "nearest")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L")
MAX_SUPERSAMPLE = 4
DEFAULT_MEMORY_FRACTION = 0.5
_PROJECT_AFTER = 512  # images decoded before the early (projected) budget check
_PROJECT_SLACK = 1.5

# Layout of the per-sample uniforms, per view (last dim of the epoch's (n, 2, U_PER_VIEW) table).
CROP_TRIES = 10
_U_FLIP = 0
_U_AREA = slice(1, 1 + CROP_TRIES)
_U_RATIO = slice(1 + CROP_TRIES, 1 + 2 * CROP_TRIES)
_U_Y, _U_X = 1 + 2 * CROP_TRIES, 2 + 2 * CROP_TRIES          # 21, 22
_U_JITTER = 23
_U_ORDER = slice(24, 28)
_U_FACTORS = slice(28, 32)  # brightness, contrast, saturation, hue
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = 32, 33, 34, 35
U_PER_VIEW = 36


# ----------------------------------------------------------------------------- device helpers

def default_device() -> torch.device:
    """The current CUDA device where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _resolve_device(device) -> torch.device:
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _param_dtype(device: torch.device) -> torch.dtype:
    """float64 for the (small) per-sample geometry; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class ResidentBudgetError(DataError):
    """The folder does not fit the resident loader's memory budget (`--loader auto` then falls
    back to a streaming loader)."""


def memory_budget(device: torch.device, max_bytes: int | None = None,
                  fraction: float = DEFAULT_MEMORY_FRACTION) -> tuple[int | None, str]:
    """(bytes the stored images may take, how that number was chosen) for `device`."""
    if max_bytes is not None:
        return int(max_bytes), "max_bytes"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction), (f"{fraction:.0%} of the {free / 2**30:.1f} GiB free on "
                                      f"{device}")
    available = _host_available_bytes()
    if available is None:
        return None, "no limit: available memory unknown"
    return int(available * fraction), (f"{fraction:.0%} of the {available / 2**30:.1f} GiB "
                                       f"of available host memory")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- stored images

def _stored_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _decode(dataset, index: int, max_side: int | None):
    """(stored HWC uint8 array, original H, original W), or None for an unreadable file."""
    try:
        image = dataset.load(index)
    except Exception:  # noqa: BLE001 - any decode failure means "skip this file", as ImageFolder
        return None
    height, width = image.height, image.width
    stored_h, stored_w = _stored_size(height, width, max_side)
    if (stored_h, stored_w) != (height, width):
        image = image.resize((stored_w, stored_h), resample=Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8), height, width  # writable, for torch.from_numpy


class ResidentImages:
    """An ImageFolder decoded once into a uint8 tensor on `device` (see the module docstring).

    source: an `ImageFolder` (anything with `paths`, `labels`, `load(i)` and `root`), a folder
    path, or None for the embedded sample photos (`datasets.resolve_source`).
    max_side: store images with a longer side above this resized down to it (None: as decoded).
    max_bytes: memory budget for the stored tensor (None: `memory_fraction` of what is free).
    workers: decoding threads (None: os.cpu_count()).

    Attributes: `pixels` (R, 3, Hmax, Wmax) uint8 on `device` (R readable images, dataset order,
    padding replicates each image's edge); `table` (N, 7) int64 on `device`, per dataset index i:
    (index actually used, storage row, label, original H, original W, stored H, stored W): an
    unreadable file's index is replaced by the next readable one, as `ImageFolder[i]` does;
    `skipped_files` the unreadable paths; `num_images` N = len(dataset).
    """

    TABLE_COLUMNS = ("index", "row", "label", "height", "width", "stored_height", "stored_width")

    def __init__(self, source: ImageFolder | str | os.PathLike | None = None,
                 device: torch.device | str | None = None, *, max_side: int | None = None,
                 max_bytes: int | None = None, memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                 workers: int | None = None, chunk: int = 1024):
        started = time.perf_counter()
        dataset = source if hasattr(source, "paths") else resolve_source(source)
        if max_side is not None and (int(max_side) != max_side or max_side < 1):
            raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
        self.dataset, self.device, self.max_side = dataset, _resolve_device(device), max_side
        n = len(dataset.paths)
        budget, budget_source = memory_budget(self.device, max_bytes, memory_fraction)
        workers = workers or os.cpu_count() or 1

        decoded: list = []
        stored_bytes = 0
        with warnings.catch_warnings(), ThreadPoolExecutor(max(1, workers)) as pool:
            # Pillow's warnings about odd-but-decodable files are not actionable here (as in
            # ImageFolder); the filter is process-wide while the pool runs.
            warnings.simplefilter("ignore", UserWarning)
            for lo in range(0, n, chunk):
                part = list(pool.map(lambda i: _decode(dataset, i, max_side),
                                     range(lo, min(lo + chunk, n))))
                decoded += part
                stored_bytes += sum(a[0].size for a in part if a is not None)
                if budget is not None:
                    done = len(decoded)
                    if stored_bytes > budget:
                        self._refuse(f"more than {_gib(stored_bytes)} (after {done} of {n} "
                                     f"images)", budget, budget_source)
                    if done >= min(n, _PROJECT_AFTER) and done < n:
                        projected = stored_bytes * n / done
                        if projected > _PROJECT_SLACK * budget:
                            self._refuse(f"about {_gib(projected)} (projected from the first "
                                         f"{done} images)", budget, budget_source)

        readable = [i for i, d in enumerate(decoded) if d is not None]
        self.skipped_files = tuple(dataset.paths[i] for i, d in enumerate(decoded) if d is None)
        used = self._substitutes([d is not None for d in decoded])
        if readable:
            hmax = max(decoded[i][0].shape[0] for i in readable)
            wmax = max(decoded[i][0].shape[1] for i in readable)
        else:
            hmax = wmax = 1
        total = len(readable) * 3 * hmax * wmax
        if budget is not None and total > budget:
            self._refuse(f"{_gib(total)} ({len(readable)} images stored at up to {hmax}×{wmax})",
                         budget, budget_source)

        # The pixels, filled chunk by chunk (host staging bounded by `chunk` images).
        self.pixels = torch.empty((len(readable), 3, hmax, wmax), dtype=torch.uint8,
                                  device=self.device)
        on_host = self.device.type == "cpu"
        for lo in range(0, len(readable), chunk):
            rows = readable[lo:lo + chunk]
            staging = (self.pixels[lo:lo + len(rows)] if on_host else
                       torch.empty((len(rows), 3, hmax, wmax), dtype=torch.uint8,
                                   pin_memory=self.device.type == "cuda"))
            for j, i in enumerate(rows):
                _fill_replicated(staging[j], decoded[i][0])
                decoded[i] = (None,) + decoded[i][1:]  # free the host copy as we go
            if not on_host:
                self.pixels[lo:lo + len(rows)].copy_(staging)

        row_of = np.full(n, -1, dtype=np.int64)
        row_of[readable] = np.arange(len(readable))
        sizes = np.zeros((n, 4), dtype=np.int64)
        for i in readable:
            _, height, width = decoded[i]
            sizes[i] = (height, width) + _stored_size(height, width, max_side)
        used = np.asarray(used, dtype=np.int64)
        labels = np.asarray(dataset.labels, dtype=np.int64)
        table = np.concatenate([used[:, None], row_of[used][:, None], labels[used][:, None],
                                sizes[used]], axis=1)
        self.table = torch.from_numpy(table).to(self.device)
        self.num_readable = len(readable)
        self.decode_seconds = time.perf_counter() - started

    def _substitutes(self, ok: list[bool]) -> list[int]:
        """Per dataset index, the index ImageFolder[i] would use: the first readable of
        i, i+1, ... (mod n), at most MAX_DECODE_TRIES tries; else ImageFolder's DataError."""
        n, used = len(ok), []
        for i in range(n):
            for attempt in range(min(MAX_DECODE_TRIES, n)):
                j = (i + attempt) % n
                if ok[j]:
                    used.append(j)
                    break
            else:
                tries = min(MAX_DECODE_TRIES, n)
                raise DataError(f"too many unreadable images near {self.dataset.paths[i]} "
                                f"({tries} in a row failed to decode): check the folder "
                                f"{self.dataset.root}")
        return used

    def _refuse(self, needed: str, budget: int, budget_source: str):
        raise ResidentBudgetError(
            f"the resident loader needs {needed} of {self.device} memory for "
            f"{self.dataset.root} but its budget is {_gib(budget)} ({budget_source}): "
            f"use --loader torch or --loader dali, or store smaller images (max_side)")

    @property
    def num_images(self) -> int:
        return int(self.table.shape[0])

    def __len__(self) -> int:
        return self.num_images

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()

    def image(self, index: int) -> torch.Tensor:
        """The stored (3, h, w) uint8 image used for dataset index `index` (host sync; tests)."""
        _, row, _, _, _, h, w = self.table[index].tolist()
        return self.pixels[row, :, :h, :w]

    def describe(self) -> str:
        """One line for the log."""
        _, _, hmax, wmax = self.pixels.shape
        skipped = (f", {len(self.skipped_files)} unreadable skipped" if self.skipped_files
                   else "")
        return (f"resident: {self.num_readable} images decoded in {self.decode_seconds:.1f} s, "
                f"{_gib(self.nbytes)} on {self.device} (slots {hmax}×{wmax}"
                + (f", longer side ≤ {self.max_side}" if self.max_side else "") + f"){skipped}")


def _fill_replicated(slot: torch.Tensor, image: np.ndarray):
    """Copy an HWC image into the top-left of a (3, Hmax, Wmax) slot; replicate its edge into
    the rest, so that grid_sample's 'border' clamping sees the image's own edge."""
    h, w = image.shape[:2]
    src = torch.from_numpy(image).permute(2, 0, 1)
    slot[:, :h, :w] = src
    if w < slot.shape[2]:
        slot[:, :h, w:] = src[:, :, w - 1:w]
    if h < slot.shape[1]:
        slot[:, h:, :] = slot[:, h - 1:h, :]


# ----------------------------------------------------------------------------- crop sampler

def sample_crop_boxes(height: torch.Tensor, width: torch.Tensor, u_area: torch.Tensor,
                      u_ratio: torch.Tensor, u_y: torch.Tensor, u_x: torch.Tensor,
                      scale: tuple[torch.Tensor, torch.Tensor],
                      log_ratio: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """torchvision's RandomResizedCrop sampler, vectorised: (..., 4) boxes (y, x, h, w).

    height, width (...) image sizes; u_area, u_ratio (..., T) uniforms in [0, 1) for T tries;
    u_y, u_x (...) uniforms for the anchor; scale = (lo, hi), log_ratio = (log lo, log hi), each
    broadcastable to (...). Try t: area fraction s = lo + (hi−lo)·u_area, aspect a =
    exp(log lo + (log hi − log lo)·u_ratio), w = round(√(s·H·W·a)), h = round(√(s·H·W/a)); the
    first try with 0 < w ≤ W and 0 < h ≤ H wins, y = ⌊u_y·(H−h+1)⌋, x = ⌊u_x·(W−w+1)⌋. With no
    accepted try: the centre crop of the whole image clamped to the ratio range. Integer-valued.
    """
    dtype = u_area.dtype
    H, W = height.to(dtype), width.to(dtype)
    s_lo, s_hi = (v.to(dtype) for v in scale)
    r_lo, r_hi = (v.to(dtype) for v in log_ratio)
    target = (H * W)[..., None] * (s_lo[..., None] + (s_hi - s_lo)[..., None] * u_area)
    aspect = torch.exp(r_lo[..., None] + (r_hi - r_lo)[..., None] * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W[..., None]) & (h > 0) & (h <= H[..., None])
    first = ok.to(torch.uint8).argmax(dim=-1, keepdim=True)  # the first accepted try
    accepted = ok.any(dim=-1)
    w = w.gather(-1, first).squeeze(-1)
    h = h.gather(-1, first).squeeze(-1)
    y = torch.minimum(torch.floor(u_y.to(dtype) * (H - h + 1)), H - h)
    x = torch.minimum(torch.floor(u_x.to(dtype) * (W - w + 1)), W - w)
    # fallback: whole image, clamped to the ratio range, centred
    in_ratio = W / H
    ratio_lo, ratio_hi = torch.exp(r_lo), torch.exp(r_hi)
    too_tall, too_wide = in_ratio < ratio_lo, in_ratio > ratio_hi
    fw = torch.where(too_wide, torch.round(H * ratio_hi), W)
    fh = torch.where(too_tall, torch.round(W / ratio_lo), H)
    fy = torch.floor((H - fh) / 2)
    fx = torch.floor((W - fw) / 2)
    return torch.stack([torch.where(accepted, y, fy), torch.where(accepted, x, fx),
                        torch.where(accepted, h, fh), torch.where(accepted, w, fw)], dim=-1)


# ----------------------------------------------------------------------------- colour ops
# All take x with the channel at dim 1 ((N, 3, H, W), or (B, 3, 2, S, S) for two stacked views)
# and per-sample factors broadcastable to x with a singleton channel dim (e.g. (N, 1, 1, 1)).

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, keepdim: (N, 1, ...)."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend: clamp(f·x + (1−f)·other, 0, 1) (as one lerp kernel)."""
    return torch.lerp(other.expand_as(x), x, factor).clamp_(0, 1)


def adjust_brightness(x, factor):
    return blend(x, torch.zeros_like(x[:, :1]), factor)


def adjust_contrast(x, factor):
    return blend(x, grayscale(x).mean(dim=(-2, -1), keepdim=True), factor)


def adjust_saturation(x, factor):
    return blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (rgb → hsv, h ← (h + shift) mod 1, hsv → rgb) in closed form:
    channel = max − chroma·clamp(min(k, 4 − k), 0, 1), k = (n + 6h') mod 6, n = 5, 3, 1 for
    R, G, B (the hexcone model: the same function as torchvision's _rgb2hsv / _hsv2rgb)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    # 6·hue: (g−b)/c where max is R, 2 + (b−r)/c where G, 4 + (r−g)/c where B (one division)
    numerator = torch.where(maxc == r, g - b,
                            torch.where(maxc == g, b - r + 2 * chroma, r - g + 4 * chroma))
    hue6 = numerator / torch.where(chroma > 0, chroma, 1.0)
    # arange, not torch.tensor: no host-to-device copy (which would sync on CUDA)
    offsets = torch.arange(5, 0, -2, dtype=x.dtype, device=x.device)
    k = torch.remainder(offsets.view((1, 3) + (1,) * (x.dim() - 2))
                        + (hue6.unsqueeze(1) + 6 * shift), 6)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def _jitter_blend(x: torch.Tensor, factor: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """Brightness (op 0), contrast (1) or saturation (2) per sample: a blend with 0, the mean
    grey or the grey image."""
    gray = grayscale(x)
    degenerate = torch.where(op == 1, gray.mean(dim=(-2, -1), keepdim=True), gray) * (op != 0)
    return blend(x, degenerate, factor)


def solarize(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """torchvision's float solarize: x ≥ threshold → 1 − x (threshold on the [0, 1] scale)."""
    return torch.where(x >= threshold, 1 - x, x)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(..., 2R+1) normalised kernels exp(−t²/2σ²), t = −R..R; σ ≤ 0 gives the delta kernel."""
    taps = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    positive = sigma > 0
    s = torch.where(positive, sigma, torch.ones_like(sigma))[..., None]
    kernel = torch.exp(-0.5 * (taps / s) ** 2)
    kernel = kernel / kernel.sum(dim=-1, keepdim=True)
    delta = (taps == 0).to(sigma.dtype)
    return torch.where(positive[..., None], kernel, delta)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-image separable Gaussian blur of x (..., H, W) (torchvision's tensor gaussian_blur with
    kernel size 2R+1: reflect padding; replicate where R ≥ H or W, which reflect cannot do).
    sigma broadcastable to x.shape[:-2]; σ ≤ 0 leaves that image unchanged."""
    if radius == 0:
        return x
    lead, (height, width) = x.shape[:-2], x.shape[-2:]
    kernels = gaussian_kernels(sigma.to(x.dtype).expand(lead), radius).reshape(-1, 2 * radius + 1)
    groups = kernels.shape[0]
    mode = "reflect" if radius < min(height, width) else "replicate"
    padded = F.pad(x.reshape(1, groups, height, width), (radius,) * 4, mode=mode)
    out = F.conv2d(padded, kernels.view(groups, 1, -1, 1), groups=groups)
    out = F.conv2d(out, kernels.view(groups, 1, 1, -1), groups=groups)
    return out.view(x.shape)


# ----------------------------------------------------------------------------- parameters

class ViewBatchParams(NamedTuple):
    """Everything random about a batch of V-view samples; (B, V) per view unless noted."""
    boxes: torch.Tensor        # (B, V, 4) (y, x, h, w), original-image pixels, integer-valued
    flips: torch.Tensor        # bool
    jitter: torch.Tensor       # bool: ColorJitter applied
    order: torch.Tensor        # (B, V, 4) int64: op per slot (0 b, 1 c, 2 s, 3 hue)
    factors: torch.Tensor      # (B, V, 4): brightness, contrast, saturation factors; hue shift
    grayscale: torch.Tensor    # bool
    blur_sigma: torch.Tensor   # σ, 0 where not blurred
    solarize: torch.Tensor     # bool


class _ViewConstants:
    """The V ViewAugment configs as (V, ...) tensors on the device (index 0 = view 1)."""

    def __init__(self, views: tuple[ViewAugment, ...], device: torch.device,
                 dtype: torch.dtype):
        def t(values, dt=dtype):
            return torch.tensor(values, dtype=dt, device=device)
        self.flip_p = t([v.flip_p for v in views])
        self.scale = (t([v.scale[0] for v in views]), t([v.scale[1] for v in views]))
        self.log_ratio = (t([math.log(v.ratio[0]) for v in views]),
                          t([math.log(v.ratio[1]) for v in views]))
        self.jitter_p = t([v.jitter_p for v in views])
        ranges = [[_factor_range(v.brightness), _factor_range(v.contrast),
                   _factor_range(v.saturation), (-v.hue, v.hue) if v.hue > 0 else None]
                  for v in views]
        self.enabled = t([[r is not None for r in rs] for rs in ranges], torch.bool)
        self.factor_lo = t([[r[0] if r else 0.0 for r in rs] for rs in ranges])
        self.factor_hi = t([[r[1] if r else 0.0 for r in rs] for rs in ranges])
        self.grayscale_p = t([v.grayscale_p for v in views])
        self.blur_p = t([v.blur_p for v in views])
        self.sigma = (t([v.blur_sigma[0] for v in views]), t([v.blur_sigma[1] for v in views]))
        self.solarize_p = t([v.solarize_p for v in views])
        self.threshold = t([v.solarize_threshold / 255.0 for v in views], torch.float32)


def _factor_range(strength: float) -> tuple[float, float] | None:
    return None if strength == 0 else (max(0.0, 1.0 - strength), 1.0 + strength)


def draw_params(uniforms: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                consts: _ViewConstants) -> ViewBatchParams:
    """Turn (B, V, U_PER_VIEW) uniforms into the batch's parameters (same distributions as
    pipelines/augment.py, per view config). height, width (B,) original image sizes."""
    u = uniforms.to(consts.scale[0].dtype)
    flips = u[..., _U_FLIP] < consts.flip_p
    shape = u.shape[:2]
    boxes = sample_crop_boxes(height[:, None].expand(shape), width[:, None].expand(shape),
                              u[..., _U_AREA], u[..., _U_RATIO], u[..., _U_Y], u[..., _U_X],
                              consts.scale, consts.log_ratio)
    jitter = u[..., _U_JITTER] < consts.jitter_p
    order = u[..., _U_ORDER].argsort(dim=-1)  # a uniformly random permutation per sample
    factors = consts.factor_lo + (consts.factor_hi - consts.factor_lo) * u[..., _U_FACTORS]
    gray = u[..., _U_GRAY] < consts.grayscale_p
    blurred = u[..., _U_BLUR] < consts.blur_p
    sigma = consts.sigma[0] + (consts.sigma[1] - consts.sigma[0]) * u[..., _U_SIGMA]
    sigma = torch.where(blurred, sigma, torch.zeros_like(sigma))
    sol = u[..., _U_SOLARIZE] < consts.solarize_p
    return ViewBatchParams(boxes, flips, jitter, order, factors, gray, sigma, sol)


# ----------------------------------------------------------------------------- the renderer

class _Steps(NamedTuple):
    """Which colour steps a set of views can apply at all (static, decided at construction)."""
    jitter: bool
    blend: bool
    hue: bool
    gray: bool
    blur: bool
    solarize: bool


def _steps(views) -> _Steps:
    return _Steps(any(v.jitter_p > 0 for v in views),
                  any(v.jitter_p > 0 and (v.brightness or v.contrast or v.saturation)
                      for v in views),
                  any(v.jitter_p > 0 and v.hue > 0 for v in views),
                  any(v.grayscale_p > 0 for v in views),
                  any(v.blur_p > 0 for v in views),
                  any(v.solarize_p > 0 for v in views))


def _take(p: ViewBatchParams, lo: int, hi: int) -> ViewBatchParams:
    """The parameters of views lo..hi−1."""
    return ViewBatchParams(*(t[:, lo:hi] for t in p))


class ViewRenderer:
    """Crop + resize + flip + colour + normalise for a batch of stored images, every view at once.

    augment: a TwoViewAugment or a MultiCropAugment (`augment.views`). The views are rendered in
    runs of consecutive views of one size (`groups`: SwAV's 2×224 + 6×96 is two runs), each run
    one grid_sample (per interpolation mode) and one pass of each colour step over (B, 3, V_run,
    S, S). Static decisions (made here, never per batch): the grid_sample mode(s), the
    supersampling factor of each run, which colour ops exist at all in each run, the blur radius.
    """

    def __init__(self, augment, slot_size: tuple[int, int],
                 device: torch.device, antialias: bool = True, compact: bool | None = None):
        views = tuple(augment.views)
        for v in views:
            if v.interpolation not in GRID_SAMPLE_MODES:
                raise DataError(f"interpolation {v.interpolation!r} is not available in the "
                                f"resident loader: use {', '.join(GRID_SAMPLE_MODES)} (or "
                                f"--loader torch)")
        self.views, self.device = views, device
        self.sizes = tuple(v.size for v in views)
        self.size = self.sizes[0]              # the (first run's) view size
        self.groups = size_runs(self.sizes)    # (start, stop, size) per run of one size
        self.modes = tuple(v.interpolation for v in views)
        self.slot_size = slot_size
        self.supersamples = tuple(
            min(MAX_SUPERSAMPLE, max(1, math.ceil(max(slot_size) / size / 2))) if antialias
            else 1 for _, _, size in self.groups)
        self.supersample = self.supersamples[0]
        self.dtype = _param_dtype(device)
        self.consts = _ViewConstants(views, device, self.dtype)
        steps = _steps(views)
        (self.any_jitter, self.any_blend, self.any_hue, self.any_gray, self.any_blur,
         self.any_solarize) = steps
        self._group_steps = tuple(_steps(views[lo:hi]) for lo, hi, _ in self.groups)
        self.blur_radius = max((math.ceil(3 * v.blur_sigma[1]) for v in views if v.blur_p > 0),
                               default=0)
        # On the CPU a data-dependent shape costs nothing, so each gated colour step (the hue,
        # the costliest, is needed at each of the four jitter slots by a fifth of the samples)
        # is computed only where it is used. On CUDA that would be a host sync per step: there
        # it is computed for the whole batch and selected by mask. Both give the same values.
        self.compact = device.type == "cpu" if compact is None else bool(compact)
        self._centres = []
        for (_, _, s), k in zip(self.groups, self.supersamples):
            m = torch.arange(s * k, dtype=self.dtype, device=device)
            self._centres.append((torch.div(m, k, rounding_mode="floor") + 0.5,  # pixel centre
                                  (torch.remainder(m, k) + 0.5) / k - 0.5))       # sub-sample
        mean = torch.tensor([v.mean if v.normalize else (0.0,) * 3 for v in views],
                            dtype=torch.float32, device=device)
        std = torch.tensor([v.std if v.normalize else (1.0,) * 3 for v in views],
                           dtype=torch.float32, device=device)
        self._mean, self._std = mean.view(-1, 1, 3, 1, 1), std.view(-1, 1, 3, 1, 1)

    def grid(self, boxes: torch.Tensor, flips: torch.Tensor, image_hw: torch.Tensor,
             stored_hw: torch.Tensor, group: int = 0) -> torch.Tensor:
        """(B, V_g·kS, kS, 2) float32 grid_sample coordinates for the views of run `group`
        (boxes (B, V_g, 4) and flips (B, V_g) of those views; the first view's rows first)."""
        _, _, s = self.groups[group]
        k = self.supersamples[group]
        base, offset = self._centres[group]
        hmax, wmax = self.slot_size
        b, views = boxes.shape[:2]
        y, x, h, w = boxes.unbind(-1)                                    # (B, V_g)
        scale_y = (stored_hw[:, 0] / image_hw[:, 0])[:, None]             # stored / original
        scale_x = (stored_hw[:, 1] / image_hw[:, 1])[:, None]
        if k > 1:
            spread_y = (h * scale_y / s - 1).clamp(0, 1)[..., None]
            spread_x = (w * scale_x / s - 1).clamp(0, 1)[..., None]
        else:
            spread_y = spread_x = 0.0
        uy = base + offset * spread_y                                    # output-pixel units
        ux = base + offset * spread_x
        ux = torch.where(flips[..., None], s - ux, ux)                   # mirror: c' = S−1−c
        # original coordinate y + u·h/S − ½ → stored (· + ½)·scale − ½ → normalised (2·+1)/size − 1
        gy = 2 * (y[..., None] + uy * (h / s)[..., None]) * (scale_y / hmax)[..., None] - 1
        gx = 2 * (x[..., None] + ux * (w / s)[..., None]) * (scale_x / wmax)[..., None] - 1
        gy, gx = gy.to(torch.float32), gx.to(torch.float32)              # (B, V_g, kS)
        grid = torch.stack([gx[:, :, None, :].expand(b, views, s * k, s * k),
                            gy[:, :, :, None].expand(b, views, s * k, s * k)], dim=-1)
        return grid.reshape(b, views * s * k, s * k, 2)

    def crop_resize(self, images: torch.Tensor, grid: torch.Tensor,
                    group: int = 0) -> torch.Tensor:
        """(B, 3, V_g, S, S) float32 in [0, 1] from (B, 3, Hmax, Wmax) images (uint8, or
        already float in 0..255)."""
        lo, hi, s = self.groups[group]
        k = self.supersamples[group]
        src = images if images.is_floating_point() else images.to(torch.float32)
        modes = self.modes[lo:hi]
        if all(mode == modes[0] for mode in modes):
            out = F.grid_sample(src, grid, mode=modes[0], padding_mode="border",
                                align_corners=False)
        else:
            rows = s * k
            out = torch.cat([F.grid_sample(src, grid[:, v * rows:(v + 1) * rows], mode=mode,
                                           padding_mode="border", align_corners=False)
                             for v, mode in enumerate(modes)], dim=2)
        if k > 1:
            out = F.avg_pool2d(out, k)
        return out.mul_(1 / 255).clamp_(0, 1).view(out.shape[0], 3, hi - lo, s, s)

    def colour(self, x: torch.Tensor, p: ViewBatchParams, group: int | None = None
               ) -> torch.Tensor:
        """The colour steps on (B, 3, V_g, S, S) in [0, 1], per-(sample, view) parameters (p's
        (B, V_g) entries); `group` is the run these views are (None: all views, one size).

        Each step is gated per (sample, view) by a (B, V_g) mask: on CUDA computed for the whole
        batch and selected with `torch.where` (no host sync); with `compact` (the CPU) computed
        only for the pairs where the mask holds. Both give the same values."""
        if group is None:
            lo, hi, steps = 0, len(self.views), _Steps(
                self.any_jitter, self.any_blend, self.any_hue, self.any_gray, self.any_blur,
                self.any_solarize)
        else:
            (lo, hi, _), steps = self.groups[group], self._group_steps[group]
        compact = self.compact
        if compact:
            x = x.clone()  # updated in place below

        def bcast(t):  # (B, V) → (B, 1, V, 1, 1)
            return t[:, None, :, None, None]

        def gated(x, mask, fn, *params):
            """fn(x, *params) where `mask` holds, x elsewhere; params are (B, V) tensors."""
            if not compact:
                return torch.where(bcast(mask), fn(x, *(bcast(t) for t in params)), x)
            sample, view = mask.nonzero(as_tuple=True)
            if sample.numel():
                x[sample, :, view] = fn(x[sample, :, view],
                                        *(t[sample, view].view(-1, 1, 1, 1) for t in params))
            return x

        if steps.jitter:
            enabled = self.consts.enabled[lo:hi].expand(p.order.shape)
            for slot in range(4):
                op = p.order[..., slot:slot + 1]                              # (B, V, 1)
                active = p.jitter & enabled.gather(-1, op).squeeze(-1)
                factor = p.factors.gather(-1, op).squeeze(-1).to(x.dtype)
                op = op.squeeze(-1)
                if steps.blend:
                    x = gated(x, active & (op < 3), _jitter_blend, factor, op)
                if steps.hue:
                    x = gated(x, active & (op == 3), adjust_hue, factor)
        if steps.gray:
            x = gated(x, p.grayscale, lambda v: grayscale(v).expand_as(v))
        if steps.blur:
            sigma, radius = p.blur_sigma.to(x.dtype), self.blur_radius
            if compact:
                x = gated(x, sigma > 0, lambda v, s: gaussian_blur(v, s.view(-1, 1), radius),
                          sigma)
            else:  # not blurred: σ = 0, a delta kernel
                x = gaussian_blur(x, sigma[:, None, :], radius)
        if steps.solarize:
            x = gated(x, p.solarize, solarize,
                      self.consts.threshold[lo:hi].expand(p.solarize.shape))
        return x

    def normalise(self, x: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, ...]:
        """The run's V_g contiguous (B, 3, S, S) float32 views, (x − mean)/std per view config."""
        lo, hi, _ = self.groups[group]
        return tuple((x[:, :, v] - self._mean[lo + v]) / self._std[lo + v]
                     for v in range(hi - lo))

    def __call__(self, images: torch.Tensor, params: ViewBatchParams, image_hw: torch.Tensor,
                 stored_hw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every view, in order: V (B, 3, S_v, S_v) float32 tensors."""
        src = images.to(torch.float32)   # converted once for all runs
        views: list[torch.Tensor] = []
        for g, (lo, hi, _) in enumerate(self.groups):
            p = params if len(self.groups) == 1 else _take(params, lo, hi)
            grid = self.grid(p.boxes, p.flips, image_hw, stored_hw, g)
            views += self.normalise(self.colour(self.crop_resize(src, grid, g), p, g), g)
        return tuple(views)


TwoViewRenderer = ViewRenderer   # the two-view name of the same renderer

# ----------------------------------------------------------------------------- the loader

class _Epoch(NamedTuple):
    epoch: int
    order: torch.Tensor      # (n,) dataset indices in epoch order, on the device
    uniforms: torch.Tensor   # (n, V, U_PER_VIEW) float32 per epoch position, on the device


class ResidentTwoViewLoader:
    """Two-view or multi-crop batches from a `ResidentImages`, augmented on its device (module
    docstring).

    images: a `ResidentImages`, or what `ResidentImages` accepts as its source (an ImageFolder, a
    folder path, None for the embedded photos), decoded on `device` with `max_side`, `max_bytes`
    and `workers` decoding threads. augment: a `TwoViewAugment` or a `MultiCropAugment`
    (interpolation bicubic, bilinear or nearest). antialias: supersample strongly shrunk crops
    (module docstring). proposals: (boxes (N, P, 4), counts (N,)) region proposals by dataset
    index (`torch_loader.TwoViewLoader`), kept on the device and mapped into every view there.
    The batch dict is `torch_loader.TwoViewLoader`'s, every tensor on the device; skipped_files
    (unreadable files, found at load time) is reported in the first batch of each
    `epoch_batches` / `stream` iterator only.
    """

    def __init__(self, images, augment: TwoViewAugment | MultiCropAugment, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 device: torch.device | str | None = None, antialias: bool = True,
                 workers: int | None = None, max_side: int | None = None,
                 max_bytes: int | None = None, proposals=None):
        if not isinstance(images, ResidentImages):
            images = ResidentImages(images, device=device, max_side=max_side,
                                    max_bytes=max_bytes, workers=workers)
        elif device is not None and not _same_device(torch.device(device), images.device):
            raise ValueError(f"images live on {images.device}, not on {device}")
        n = images.num_images
        check_batching(n, batch_size, rank, world_size, drop_last)
        self.images, self.augment, self.device = images, augment, images.device
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), drop_last
        self.renderer = ViewRenderer(augment, tuple(images.pixels.shape[2:]), self.device,
                                     antialias)
        self.multicrop = is_multicrop(augment)
        self.proposals = None
        if proposals is not None:
            self.proposals = tuple(t.to(self.device) for t in check_proposals(proposals, n))

    @property
    def dataset(self):
        return self.images.dataset

    @property
    def num_images(self) -> int:
        return self.images.num_images

    @property
    def batches_per_epoch(self) -> int:
        return count_batches(self.num_images, self.batch_size, self.world_size, self.drop_last)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def describe(self) -> str:
        ks = [(k, size) for k, (_, _, size) in zip(self.renderer.supersamples,
                                                     self.renderer.groups) if k > 1]
        if len(self.renderer.groups) == 1:
            return self.images.describe() + (f"; {ks[0][0]}×{ks[0][0]} supersampling"
                                              if ks else "")
        return self.images.describe() + "".join(f"; {k}×{k} supersampling of the {s} px views"
                                                for k, s in ks)

    def epoch_plan(self, epoch: int) -> _Epoch:
        """The epoch's order (the torch loader's) and its table of per-position uniforms."""
        order = epoch_permutation(self.num_images, self.seed, epoch)
        if self.device.type == "cuda":
            order = order.pin_memory().to(self.device, non_blocking=True)
        else:
            order = order.to(self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_mix(self.seed, epoch, 0x2E51D))
        uniforms = torch.rand((self.num_images, len(self.renderer.views), U_PER_VIEW),
                              generator=generator,
                              device=self.device, dtype=torch.float32)
        return _Epoch(epoch, order, uniforms)

    def batch(self, plan: _Epoch, batch_index: int, skipped_files=()) -> dict[str, Any]:
        """This rank's part of global batch `batch_index` of `plan`'s epoch."""
        lo, hi = rank_slice(batch_index, self.batch_size, self.rank, self.world_size,
                            self.num_images)
        info = self.images.table.index_select(0, plan.order[lo:hi])      # (b, 7)
        image_hw, stored_hw = info[:, 3:5], info[:, 5:7]
        dtype = self.renderer.dtype
        params = draw_params(plan.uniforms[lo:hi], image_hw[:, 0].to(dtype),
                             image_hw[:, 1].to(dtype), self.renderer.consts)
        images = self.images.pixels.index_select(0, info[:, 1])
        views = self.renderer(images, params, image_hw.to(dtype), stored_hw.to(dtype))
        index = info[:, 0].contiguous()
        batch = Batch({"view1": views[0], "view2": views[1]} if not self.multicrop else
                      {"crops": list(views), "view1": views[0], "view2": views[1]})
        batch.update({"boxes": params.boxes.to(torch.float32),
                      "flips": params.flips, "image_size": image_hw.contiguous(),
                      "label": info[:, 2].contiguous(), "index": index,
                      "skipped_files": list(skipped_files),
                      "epoch": plan.epoch, "batch_index": batch_index})
        if self.proposals is not None:   # on the device, no host sync
            batch["proposals"], batch["proposal_visible"] = proposals_in_views(
                *self.proposals, index, batch["boxes"], params.flips, self.renderer.sizes)
        return batch

    def _check_start(self, start_batch: int):
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from batch index `start_batch` on (resume mid-epoch exactly)."""
        self._check_start(start_batch)
        return self._iterate(epoch, start_batch, endless=False)

    def stream(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Endless batches from (epoch, start_batch) on, across epochs."""
        self._check_start(start_batch)
        return self._iterate(epoch, start_batch, endless=True)

    def _iterate(self, epoch: int, start: int, endless: bool) -> Iterator[dict[str, Any]]:
        skipped = self.images.skipped_files
        while True:
            if start < self.batches_per_epoch:
                plan = self.epoch_plan(epoch)
                for k in range(start, self.batches_per_epoch):
                    yield self.batch(plan, k, skipped)
                    skipped = ()
            if not endless:
                return
            epoch, start = epoch + 1, 0


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
