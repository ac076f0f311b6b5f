"""The resident loader (pipelines/resident.py): images decoded once into device memory, two-view
augmentation as batched tensor ops. Runs on the CPU here; the same code runs on CUDA.

Geometry convention under test (DESIGN.md): output pixel (r, c) of an S×S view samples original
row y + (r+½)·h/S − ½ and column x + (c'+½)·w/S − ½, c' = S−1−c when the view is flipped.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from pipelines.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewAugment,
    ViewAugment,
    random_resized_crop_box,
)
from pipelines.augment import adjust_hue as pil_adjust_hue
from pipelines.datasets import DataError, ImageFolder, sample_photos
from pipelines.resident import (
    U_PER_VIEW,
    ResidentImages,
    ResidentTwoViewLoader,
    TwoViewRenderer,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    draw_params,
    gaussian_blur,
    grayscale,
    sample_crop_boxes,
    solarize,
)
from pipelines.torch_loader import TwoViewLoader

try:
    import fixtures_images as fx
except ImportError:  # tests/ is a package
    from tests import fixtures_images as fx

S = 32
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The batched ops here are small; on a shared 2-core machine, OpenMP's thread team turns
    each into a spin-wait under contention (measured: 30 ms → 3 s per 64-image batch). One thread
    keeps this module fast and its timing stable; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)


def _levels(view: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (3, S, S) in 0..255 levels, float64."""
    return ((view.double() * STD + MEAN) * 255).numpy()


def _bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(3, len(rows), len(cols)) bilinear samples of a (3, h, w) image with clamp-to-edge
    (what grid_sample's border mode does on the image's own extent)."""
    _, h, w = image.shape
    r = np.clip(rows, 0, h - 1)[:, None]
    c = np.clip(cols, 0, w - 1)[None, :]
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = r - r0, c - c0
    img = image.astype(np.float64)
    top = img[:, r0, c0] * (1 - fc) + img[:, r0, c1] * fc
    bottom = img[:, r1, c0] * (1 - fc) + img[:, r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def _source_coords(box, flip, size):
    """Original-image (rows, cols) of every output row/column under the convention."""
    y, x, h, w = (float(v) for v in box)
    r = np.arange(size, dtype=np.float64)
    c = r[::-1] if flip else r
    return y + (r + 0.5) * h / size - 0.5, x + (c + 0.5) * w / size - 0.5


def _geometry_loader(folder, interpolation="bilinear", antialias=False, max_side=None,
                     flip_p=0.5, batch_size=4, seed=3):
    base = TwoViewAugment.sim(size=S, scale=(0.05, 1.0), colour=False,
                              interpolation=interpolation)
    aug = TwoViewAugment(dataclasses.replace(base.view1, flip_p=flip_p),
                         dataclasses.replace(base.view2, flip_p=flip_p))
    images = ResidentImages(ImageFolder(str(folder)), CPU, max_side=max_side)
    return images, ResidentTwoViewLoader(images, aug, batch_size=batch_size, seed=seed,
                                         antialias=antialias)


def _views(loader, epochs):
    """(levels (3,S,S), box, flip, image_size, dataset index) of every view of `epochs` epochs."""
    for epoch in range(epochs):
        for batch in loader.epoch_batches(epoch):
            assert batch["boxes"].dtype == torch.float32 and batch["flips"].dtype == torch.bool
            for k in range(batch["index"].shape[0]):
                for v in range(2):
                    yield (_levels(batch[f"view{v + 1}"][k]), batch["boxes"][k, v].tolist(),
                           bool(batch["flips"][k, v]), batch["image_size"][k].tolist(),
                           int(batch["index"][k]))


# Bilinear grid_sample of the stored uint8 ramp at the predicted positions is reproduced by a
# float64 bilinear interpolation to float32 precision (grid coordinates, interpolation and the
# normalise/denormalise round trip): measured ≤ 5.3e-5 levels. 0.01 levels is ≤ 0.005 source pixel
# on the ramps, so a box, flip or padding error of any visible size fails.
EXACT_LEVELS = 0.01


def test_bilinear_views_match_returned_geometry_exactly(tmp_path):
    """Every pixel (border included) of every view comes from where its box and flip say; the
    folder mixes sizes, so images sit in padded slots whose padding must never leak in."""
    folder = fx.write_coordinate_sizes(tmp_path / "ramps")
    images, loader = _geometry_loader(folder)
    assert tuple(images.pixels.shape) == (4, 3, 103, 128)
    ds = loader.dataset
    flips, worst = [], 0.0
    for levels, box, flip, image_size, index in _views(loader, epochs=6):
        y, x, h, w = box
        height, width = image_size
        with Image.open(ds.paths[index]) as im:
            assert [im.height, im.width] == image_size
            source = np.asarray(im.convert("RGB"), dtype=np.float64).transpose(2, 0, 1)
        assert all(float(b).is_integer() for b in box)
        assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= height and x + w <= width
        rows, cols = _source_coords(box, flip, S)
        worst = max(worst, np.abs(levels - _bilinear(source, rows, cols)).max())
        flips.append(flip)
    assert worst <= EXACT_LEVELS, worst
    assert any(flips) and not all(flips)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_flip_probability_extremes(tmp_path, flip_p):
    _, loader = _geometry_loader(fx.write_coordinate_sizes(tmp_path / "r"), flip_p=flip_p)
    flips = torch.cat([b["flips"].flatten() for b in loader.epoch_batches(0)])
    assert bool(flips.all()) if flip_p == 1.0 else not bool(flips.any())


def test_max_side_boxes_stay_in_original_pixels(tmp_path):
    """Stored copies are resized (longer side 61) but boxes and image_size are in original
    pixels; the view samples the stored copy at stored = (original + ½)·(stored/original) − ½."""
    folder = fx.write_coordinate_sizes(tmp_path / "ramps", sizes=((97, 123), (64, 80)))
    images, loader = _geometry_loader(folder, max_side=61, batch_size=2)
    assert tuple(images.pixels.shape) == (2, 3, 49, 61)  # 97×123 → 48×61, 64×80 → 49×61
    worst = 0.0
    for levels, box, flip, (height, width), index in _views(loader, epochs=8):
        assert (height, width) in ((97, 123), (64, 80))
        stored = images.image(index).numpy()
        sh, sw = stored.shape[1:]
        assert max(sh, sw) == 61 and abs(sh / sw - height / width) < 0.03
        rows, cols = _source_coords(box, flip, S)
        rows_stored = (rows + 0.5) * sh / height - 0.5
        cols_stored = (cols + 0.5) * sw / width - 0.5
        worst = max(worst, np.abs(levels - _bilinear(stored, rows_stored, cols_stored)).max())
    assert worst <= EXACT_LEVELS, worst


def _ramp_interior_errors(levels, box, flip, image_size, margin):
    """|view − exact linear ramp| on pixels whose sampling support (± margin source px) is
    inside the image; returns (errors R, errors G, count)."""
    height, width = image_size
    rows, cols = _source_coords(box, flip, S)
    ok = (((rows - margin[0] >= 0) & (rows + margin[0] <= height - 1))[:, None]
          & ((cols - margin[1] >= 0) & (cols + margin[1] <= width - 1))[None, :])
    err_r = np.abs(levels[0] - fx.RAMP_ROW * rows[:, None])[ok]
    err_g = np.abs(levels[1] - fx.RAMP_COL * cols[None, :])[ok]
    return err_r, err_g, int(ok.sum())


@pytest.mark.parametrize("interpolation,antialias,tolerance", [
    # Sub-samples are symmetric about the pixel centre, so averaging them keeps a linear ramp;
    # what is left is the ramp's own rounding (±0.5 level): measured max 0.49.
    ("bilinear", True, 0.5 + 2e-3),
    # PyTorch's cubic (a = −0.75) is not exact on a linear ramp (≤ 0.047 px, 0.12 level) and its
    # negative lobes amplify the ramp rounding: measured max 0.60 levels. 1.0 level is
    # 0.4–0.5 source pixel; a wrong box or flip moves pixels by ≥ 1 pixel (≥ 2 levels).
    ("bicubic", False, 1.0),
    ("bicubic", True, 1.0),
])
def test_interior_matches_linear_ramp(tmp_path, interpolation, antialias, tolerance):
    folder = fx.write_coordinate_sizes(tmp_path / "ramps")
    _, loader = _geometry_loader(folder, interpolation=interpolation, antialias=antialias)
    assert loader.renderer.supersample == (2 if antialias else 1)  # 128 px slots, 32 px views
    checked = 0
    for levels, box, flip, image_size, _ in _views(loader, epochs=4):
        h, w = box[2:]
        margin = (2 * max(h / S, 1) + 1, 2 * max(w / S, 1) + 1)  # sub-samples + cubic support
        err_r, err_g, count = _ramp_interior_errors(levels, box, flip, image_size, margin)
        checked += count
        if count:
            assert max(err_r.max(), err_g.max()) <= tolerance, (box, flip, err_r.max(),
                                                                err_g.max())
        assert np.abs(levels[2] - fx.RAMP_BLUE).max() <= 1e-2
    assert checked > 20 * S  # the check is not vacuous


def test_antialias_reduces_aliasing(tmp_path):
    """Pixel noise shrunk 4× (128 → 32): point sampling keeps most of its contrast (aliasing),
    supersampling averages it away. Measured std: bicubic 0.205 → 0.087 with 2×2 supersampling,
    bilinear 0.143 → 0.072 (Pillow's antialiased bicubic resize: 0.058)."""
    root = tmp_path / "noise"
    root.mkdir()
    fx.noise_image(0, 128, 128).save(root / "n.png")
    spread = {}
    for interpolation, antialias in itertools.product(("bilinear", "bicubic"), (False, True)):
        aug = TwoViewAugment.sim(size=S, scale=(1.0, 1.0), ratio=(1.0, 1.0), colour=False,
                                 interpolation=interpolation, normalize=False)
        loader = ResidentTwoViewLoader(ImageFolder(str(root)), aug, batch_size=1, device=CPU,
                                       antialias=antialias)
        assert loader.renderer.supersample == (2 if antialias else 1)
        batch = next(iter(loader.epoch_batches(0)))
        assert batch["boxes"][0, 0].tolist() == [0, 0, 128, 128]
        spread[interpolation, antialias] = float(batch["view1"][0].std())
    for interpolation in ("bilinear", "bicubic"):
        assert spread[interpolation, True] < 0.6 * spread[interpolation, False], spread


# ----------------------------------------------------------------------------- crop sampler

def _vector_boxes(height, width, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((n, 22), generator=g, dtype=torch.float64)
    full = torch.full((n,), 1.0, dtype=torch.float64)
    boxes = sample_crop_boxes(full * height, full * width, u[:, :10], u[:, 10:20], u[:, 20],
                              u[:, 21], (full * scale[0], full * scale[1]),
                              (full * math.log(ratio[0]), full * math.log(ratio[1])))
    return boxes.numpy()


def _python_boxes(height, width, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0):
    rng = random.Random(seed)
    return np.array([random_resized_crop_box(height, width, scale, ratio, rng)
                     for _ in range(n)], dtype=np.float64)


def _summary(boxes, height, width):
    y, x, h, w = boxes.T
    area, log_aspect = h * w / (height * width), np.log(w / h)
    return area, log_aspect, y / np.maximum(height - h, 1), x / np.maximum(width - w, 1)


def test_crop_sampler_matches_torchvision_distribution():
    """Vectorised sampler vs augment.random_resized_crop_box, 4000 draws each. Tolerances are
    about 3.5 standard errors of the difference: area fraction (sd 0.26) means within 0.02, its
    deciles within 0.03 and its two-sample KS distance below 0.045 (the 0.1% critical value for
    4000 + 4000 draws is 0.044); log-aspect (sd 0.17) means within 0.015; rates within 0.04."""
    n = 4000
    for height, width in [(200, 300), (250, 250), (97, 123)]:
        ours, ref = _vector_boxes(height, width, n), _python_boxes(height, width, n)
        assert np.array_equal(ours, np.round(ours))
        y, x, h, w = ours.T
        assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (y + h <= height).all() and (x + w <= width).all()
        (a1, l1, ry1, rx1), (a2, l2, ry2, rx2) = (_summary(ours, height, width),
                                                  _summary(ref, height, width))
        assert abs(a1.mean() - a2.mean()) < 0.02
        deciles = np.linspace(0.1, 0.9, 9)
        assert np.abs(np.quantile(a1, deciles) - np.quantile(a2, deciles)).max() < 0.03
        grid = np.linspace(0, 1, 201)
        ks = np.abs((a1[:, None] <= grid).mean(0) - (a2[:, None] <= grid).mean(0)).max()
        assert ks < 0.045, ks
        assert abs(l1.mean() - l2.mean()) < 0.015
        assert abs(np.mean(l1 < 0) - np.mean(l2 < 0)) < 0.04
        assert abs(ry1.mean() - ry2.mean()) < 0.03 and abs(rx1.mean() - rx2.mean()) < 0.03
    # extreme shapes: the centre fallback, clamped to the ratio range
    assert _vector_boxes(10, 400, 50).tolist() == [[0, (400 - 13) // 2, 10, 13]] * 50
    assert _vector_boxes(400, 10, 50).tolist() == [[(400 - 13) // 2, 0, 13, 10]] * 50
    assert _vector_boxes(30, 35, 5, scale=(1.5, 2.0)).tolist() == [[0, 0, 30, 35]] * 5
    assert _vector_boxes(1, 1, 20).tolist() == [[0, 0, 1, 1]] * 20
    # a shape where only some draws succeed: the fallback rate matches (measured 0.78 vs 0.76)
    ours, ref = _vector_boxes(40, 400, n), _python_boxes(40, 400, n)
    fallback = [np.mean((b[:, 2] == 40) & (b[:, 3] == 53) & (b[:, 1] == 173)) for b in (ours, ref)]
    assert 0.2 < fallback[1] < 0.9 and abs(fallback[0] - fallback[1]) < 0.04, fallback


def _draws(augment, n=4000, height=100, width=120, seed=0):
    renderer = TwoViewRenderer(augment, (height, width), CPU)
    u = torch.rand((n, 2, U_PER_VIEW), generator=torch.Generator().manual_seed(seed))
    size = torch.full((n,), 1.0, dtype=torch.float64)
    return draw_params(u, size * height, size * width, renderer.consts)


def test_step_probabilities_and_factor_ranges():
    """Rates over 4000 draws within 0.03 (3.5 standard errors at p = 0.5)."""
    aug = TwoViewAugment.sim(size=S)
    p = _draws(aug)
    for v, (blur, sol) in enumerate([(1.0, 0.0), (0.1, 0.2)]):
        assert abs(p.flips[:, v].double().mean() - 0.5) < 0.03
        assert abs(p.jitter[:, v].double().mean() - 0.8) < 0.03
        assert abs(p.grayscale[:, v].double().mean() - 0.2) < 0.03
        assert abs((p.blur_sigma[:, v] > 0).double().mean() - blur) < 0.03
        assert abs(p.solarize[:, v].double().mean() - sol) < 0.03
        sigma = p.blur_sigma[:, v][p.blur_sigma[:, v] > 0]
        assert 0.1 <= sigma.min() < 0.15 and 1.95 < sigma.max() <= 2.0
        b, c, s, h = p.factors[:, v].unbind(-1)
        assert 0.6 <= b.min() < 0.62 and 1.38 < b.max() <= 1.4
        assert 0.6 <= c.min() and c.max() <= 1.4 and 0.8 <= s.min() and s.max() <= 1.2
        assert -0.1 <= h.min() < -0.09 and 0.09 < h.max() <= 0.1
        order = p.order[:, v]
        assert (order.sort(-1).values == torch.arange(4)).all()  # permutations
        first = torch.bincount(order[:, 0], minlength=4).double() / len(order)
        assert (first - 0.25).abs().max() < 0.03  # uniformly random order
    odd = TwoViewAugment(ViewAugment(size=S, flip_p=0.3), ViewAugment(size=S, flip_p=0.0))
    p = _draws(odd, seed=1)
    assert abs(p.flips[:, 0].double().mean() - 0.3) < 0.03 and not p.flips[:, 1].any()


def test_colour_off_leaves_the_geometry_unchanged():
    aug = TwoViewAugment.sim(size=S)
    full, plain = _draws(aug, n=200), _draws(aug.geometry_only(), n=200)
    assert torch.equal(full.boxes, plain.boxes) and torch.equal(full.flips, plain.flips)
    assert not plain.jitter.any() and not plain.grayscale.any() and not plain.solarize.any()


# ----------------------------------------------------------------------------- colour ops
# Reference: torchvision's tensor semantics written out in float64 (grayscale with the 601-2
# luma 0.299/0.587/0.114 the loader documents; torchvision's tensor op uses 0.2989).

def _ref_gray(img):
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def _ref_blend(a, b, f):
    return (f * a + (1 - f) * b).clamp(0, 1)


def _ref_rgb2hsv(img):  # torchvision.transforms.functional_tensor._rgb2hsv
    r, g, b = img.unbind(0)
    maxc, minc = img.max(0).values, img.min(0).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc))


def _ref_hsv2rgb(img):  # torchvision.transforms.functional_tensor._hsv2rgb
    h, s, v = img.unbind(0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    mask = (i[None] == torch.arange(6).view(-1, 1, 1)).to(img.dtype)
    a = torch.stack((torch.stack((v, q, p, p, t, v)), torch.stack((t, v, v, q, p, p)),
                     torch.stack((p, p, t, v, v, q))))
    return torch.einsum("ijk,xijk->xjk", mask, a)


def _ref_op(img, op, factor):
    if op == 0:
        return _ref_blend(img, torch.zeros_like(img), factor)
    if op == 1:
        return _ref_blend(img, _ref_gray(img).mean(), factor)
    if op == 2:
        return _ref_blend(img, _ref_gray(img), factor)
    hsv = _ref_rgb2hsv(img)
    return _ref_hsv2rgb(torch.stack(((hsv[0] + factor) % 1.0, hsv[1], hsv[2])))


def _ref_blur(img, sigma, radius):  # torchvision's tensor gaussian_blur, kernel 2R+1
    x = torch.linspace(-radius, radius, 2 * radius + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = torch.outer(k1, k1).expand(3, 1, -1, -1)
    padded = F.pad(img[None], (radius,) * 4, mode="reflect")
    return F.conv2d(padded, k2, groups=3)[0]


def _ref_solarize(img, threshold):
    return torch.where(img >= threshold, 1 - img, img)


def _photo_patch(size=40):
    """A real photo patch (the embedded sample photos) as (uint8 PIL, float64 (3, H, W))."""
    image = sample_photos().load(3).crop((20, 10, 20 + size, 10 + size))
    return image, torch.from_numpy(np.array(image)).permute(2, 0, 1).double() / 255


def test_each_colour_op_matches_the_float64_reference():
    """Float32 batched ops vs the float64 per-image reference: max |diff| ≤ 2e-6 (measured
    ≤ 1.4e-7 for the blends and the blur, 7.2e-7 for hue through its divisions)."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.rand((6, 3, 20, 24), generator=gen, dtype=torch.float64)
    x64[0] = x64[0, :1]  # a grey image (hue undefined, chroma 0)
    x64[1, :, :5] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # saturated primaries
    x = x64.float()
    factors = torch.tensor([0.0, 0.5, 0.9, 1.0, 1.3, 1.6], dtype=torch.float64)
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.33, 0.5], dtype=torch.float64)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 0.0], dtype=torch.float64)
    per = (-1, 1, 1, 1)

    def close(ours, ref):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)

    close(adjust_brightness(x, factors.float().view(per)),
          torch.stack([_ref_op(x64[i], 0, factors[i]) for i in range(6)]))
    close(adjust_contrast(x, factors.float().view(per)),
          torch.stack([_ref_op(x64[i], 1, factors[i]) for i in range(6)]))
    close(adjust_saturation(x, factors.float().view(per)),
          torch.stack([_ref_op(x64[i], 2, factors[i]) for i in range(6)]))
    close(adjust_hue(x, shifts.float().view(per)),
          torch.stack([_ref_op(x64[i], 3, shifts[i]) for i in range(6)]))
    close(grayscale(x).expand_as(x), torch.stack([_ref_gray(x64[i]).expand(3, -1, -1)
                                                  for i in range(6)]))
    close(gaussian_blur(x, sigmas.float().view(6, 1), 6),
          torch.stack([_ref_blur(x64[i], sigmas[i], 6) if sigmas[i] > 0 else x64[i]
                       for i in range(6)]))
    close(solarize(x, 128 / 255), _ref_solarize(x64, 128 / 255))


@pytest.mark.parametrize("op,factor,max_mean_levels", [
    # Mean |ours − Pillow| in 0..255 levels on a 40×40 real photo patch. Pillow rounds to 8 bits
    # after every op (≤ 0.5 level each), so ≈ 0.4 is the floor. Measured: brightness 0.40–0.43,
    # contrast 0.32–0.50, saturation 0.41–0.43, hue 0.31–0.53 (Pillow quantises H to 256 levels),
    # grayscale 0.16, blur 0.49–0.70 away from the 6-px border (Pillow: three box blurs; its edge
    # rule differs from reflect, so the border is left out), solarize 0 (same threshold; 3e-6
    # float rounding).
    ("brightness", 0.6, 0.6), ("brightness", 1.3, 0.6), ("contrast", 0.6, 0.7),
    ("contrast", 1.4, 0.6), ("saturation", 0.6, 0.6), ("saturation", 1.4, 0.6),
    ("hue", 0.1, 0.8), ("hue", -0.07, 0.8), ("grayscale", None, 0.3), ("blur", 0.5, 0.9),
    ("blur", 1.0, 0.9), ("blur", 2.0, 0.9), ("solarize", None, 1e-4),
])
def test_colour_ops_agree_with_the_pillow_path(op, factor, max_mean_levels):
    image, x = _photo_patch()
    x = x.float()[None]
    f = None if factor is None else torch.tensor(factor).view(1, 1, 1, 1)
    ours, pil = {
        "brightness": lambda: (adjust_brightness(x, f), ImageEnhance.Brightness(image)),
        "contrast": lambda: (adjust_contrast(x, f), ImageEnhance.Contrast(image)),
        "saturation": lambda: (adjust_saturation(x, f), ImageEnhance.Color(image)),
        "hue": lambda: (adjust_hue(x, f), pil_adjust_hue(image, factor)),
        "grayscale": lambda: (grayscale(x).expand_as(x), image.convert("L").convert("RGB")),
        "blur": lambda: (gaussian_blur(x, f.view(1, 1), 6),
                         image.filter(ImageFilter.GaussianBlur(factor))),
        "solarize": lambda: (solarize(x, 128 / 255), ImageOps.solarize(image, 128)),
    }[op]()
    if isinstance(pil, ImageEnhance._Enhance):
        pil = pil.enhance(factor)
    ours_levels = ours[0].double().permute(1, 2, 0).numpy() * 255
    diff = np.abs(ours_levels - np.asarray(pil, dtype=np.float64))
    diff = (diff[6:-6, 6:-6] if op == "blur" else diff).mean()
    assert diff <= max_mean_levels, diff


@pytest.mark.parametrize("compact", [False, True])
def test_batched_colour_pipeline_matches_per_sample_reference(compact):
    """The four-slot jitter (random order per sample), gating by each view's config, grayscale,
    blur and solarize on (B, 3, 2, S, S) vs a per-(sample, view) float64 loop. Max |diff| ≤ 1e-5
    (measured 9.3e-7). compact=False is the CUDA path (hue for all, selected by mask), True the
    CPU one (hue only where used)."""
    view1 = ViewAugment(size=16, jitter_p=0.7, grayscale_p=0.3, blur_p=0.5, solarize_p=0.4,
                        blur_sigma=(0.2, 1.5))
    view2 = ViewAugment(size=16, jitter_p=0.7, brightness=0.0, hue=0.0, saturation=0.5,
                        grayscale_p=0.3, blur_p=0.0, solarize_p=0.5, solarize_threshold=100)
    aug = TwoViewAugment(view1, view2)
    n = 24
    p = _draws(aug, n=n, seed=4)
    renderer = TwoViewRenderer(aug, (20, 20), CPU, compact=compact)
    x64 = torch.rand((n, 3, 2, 16, 16), generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64)
    ours = renderer.colour(x64.float(), p).double()
    radius = renderer.blur_radius
    assert radius == math.ceil(3 * 1.5)
    views = (view1, view2)
    for i, v in itertools.product(range(n), range(2)):
        img, cfg = x64[i, :, v], views[v]
        enabled = [cfg.brightness > 0, cfg.contrast > 0, cfg.saturation > 0, cfg.hue > 0]
        if p.jitter[i, v]:
            for op in p.order[i, v].tolist():
                if enabled[op]:
                    img = _ref_op(img, op, p.factors[i, v, op].double())
        if p.grayscale[i, v]:
            img = _ref_gray(img).expand(3, -1, -1)
        if p.blur_sigma[i, v] > 0:
            img = _ref_blur(img, p.blur_sigma[i, v].double(), radius)
        if p.solarize[i, v]:
            img = _ref_solarize(img, cfg.solarize_threshold / 255)
        torch.testing.assert_close(ours[i, :, v], img, rtol=0, atol=1e-5)
    assert p.jitter.any() and p.solarize[:, 1].any() and (p.blur_sigma[:, 0] > 0).any()


# ----------------------------------------------------------------------------- the loader

@pytest.fixture()
def class_images(tmp_path):
    return ResidentImages(ImageFolder(str(fx.write_class_folder(tmp_path / "data"))), CPU)


def test_batch_contract(class_images):
    loader = ResidentTwoViewLoader(class_images, TwoViewAugment.sim(size=16), batch_size=5)
    assert len(loader) == loader.batches_per_epoch == 12 // 5 and loader.num_images == 12
    batches = list(loader.epoch_batches(0))
    assert [(b["epoch"], b["batch_index"]) for b in batches] == [(0, 0), (0, 1)]
    b = batches[0]
    assert set(b) == {"view1", "view2", "boxes", "flips", "image_size", "label", "index",
                      "skipped_files", "epoch", "batch_index"}
    assert b["view1"].shape == b["view2"].shape == (5, 3, 16, 16)
    assert b["view1"].dtype == b["view2"].dtype == b["boxes"].dtype == torch.float32
    assert all(b[k].is_contiguous() for k in ("view1", "view2", "boxes", "flips", "image_size",
                                              "label", "index"))
    assert b["boxes"].shape == (5, 2, 4) and b["flips"].dtype == torch.bool
    assert b["image_size"].dtype == b["label"].dtype == b["index"].dtype == torch.int64
    assert b["skipped_files"] == []
    ds = class_images.dataset
    for k, i in enumerate(b["index"].tolist()):
        with Image.open(ds.paths[i]) as im:
            assert b["image_size"][k].tolist() == [im.height, im.width]
        assert int(b["label"][k]) == ds.labels[i]
        y, x, h, w = b["boxes"][k].T
        height, width = b["image_size"][k].tolist()
        assert ((y + h) <= height).all() and ((x + w) <= width).all()
    keep = ResidentTwoViewLoader(class_images, TwoViewAugment.sim(size=16), 5, drop_last=False)
    assert [len(bb["index"]) for bb in keep.epoch_batches(0)] == [5, 5, 2]
    with pytest.raises(DataError, match=r"^batch size 64 is larger than the dataset \(12 "):
        ResidentTwoViewLoader(class_images, TwoViewAugment.sim(size=16), 64)
    with pytest.raises(DataError, match="interpolation 'lanczos' is not available"):
        ResidentTwoViewLoader(class_images, TwoViewAugment.sim(size=16, interpolation="lanczos"),
                              4)


def test_determinism_resume_and_the_torch_loaders_order(class_images):
    aug = TwoViewAugment.sim(size=16)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    loader = ResidentTwoViewLoader(class_images, aug, batch_size=4, seed=11)
    e0 = list(loader.epoch_batches(0))
    fx.assert_same_batches(e0, list(loader.epoch_batches(0)))
    fx.assert_same_batches(e0, list(ResidentTwoViewLoader(class_images, aug, 4, seed=11)
                           .epoch_batches(0)))
    fx.assert_same_batches(e0[1:], list(loader.epoch_batches(0, start_batch=1)))
    fx.assert_same_batches(e0[2:], list(loader.epoch_batches(0, start_batch=2)))
    assert list(loader.epoch_batches(0, start_batch=3)) == []
    with pytest.raises(ValueError):
        loader.epoch_batches(0, start_batch=4)
    # the stream is the epochs back to back, and resumes mid-epoch exactly
    per_epoch = [e0] + [list(loader.epoch_batches(e)) for e in (1, 2)]
    expected = [b for epoch in per_epoch for b in epoch]
    fx.assert_same_batches(expected, list(itertools.islice(loader.stream(0, 0), len(expected))))
    fx.assert_same_batches(expected[4:7], list(itertools.islice(loader.stream(1, 1), 3)))
    # the same image order as the torch loader, batch for batch
    reference = TwoViewLoader(class_images.dataset, aug, batch_size=4, seed=11)
    for epoch in range(2):
        assert ([b["index"].tolist() for b in reference.epoch_batches(epoch)]
                == [b["index"].tolist() for b in per_epoch[epoch]])
    # a new epoch or seed means new augmentations
    assert not torch.equal(e0[0]["boxes"], per_epoch[1][0]["boxes"])
    other = next(iter(ResidentTwoViewLoader(class_images, aug, 4, seed=12).epoch_batches(0)))
    assert not torch.equal(e0[0]["view1"], other["view1"])
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_ranks_shard_the_global_batch_and_augmentation_is_position_keyed(class_images):
    aug = TwoViewAugment.sim(size=16)
    single = ResidentTwoViewLoader(class_images, aug, batch_size=4, seed=1)
    ranks = [ResidentTwoViewLoader(class_images, aug, batch_size=2, seed=1, rank=r,
                                   world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == single.batches_per_epoch
    for epoch in range(2):
        whole = list(single.epoch_batches(epoch))
        shards = [list(r.epoch_batches(epoch)) for r in ranks]
        seen = []
        for k, global_batch in enumerate(whole):
            a, b = shards[0][k], shards[1][k]
            assert not set(a["index"].tolist()) & set(b["index"].tolist())
            assert a["index"].tolist() + b["index"].tolist() == global_batch["index"].tolist()
            for key in ("view1", "view2", "boxes", "flips"):
                torch.testing.assert_close(torch.cat([a[key], b[key]]), global_batch[key],
                                           rtol=0, atol=0)
            seen += global_batch["index"].tolist()
        assert sorted(seen) == list(range(12))  # together they cover the epoch
    # nor does a sample's augmentation depend on the batch size
    small = torch.cat([b["boxes"] for b in ResidentTwoViewLoader(
        class_images, aug, 2, seed=5).epoch_batches(3)])
    large = torch.cat([b["boxes"] for b in ResidentTwoViewLoader(
        class_images, aug, 6, seed=5).epoch_batches(3)])
    torch.testing.assert_close(small, large, rtol=0, atol=0)


def test_cuda_style_masked_colour_gives_the_same_batches(class_images):
    """The loader on CUDA computes every colour step for the whole batch and selects by mask
    (compact=False); on the CPU it computes only where needed. Same batches (≤ 1e-6)."""
    aug = TwoViewAugment.sim(size=16)
    compact = ResidentTwoViewLoader(class_images, aug, batch_size=6, seed=2)
    masked = ResidentTwoViewLoader(class_images, aug, batch_size=6, seed=2)
    masked.renderer.compact = False
    assert compact.renderer.compact
    for a, b in zip(compact.epoch_batches(0), masked.epoch_batches(0)):
        for key in ("view1", "view2"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["index"], b["index"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_makes_no_host_syncs(tmp_path):
    """On CUDA a batch (epoch boundaries included) launches work without waiting for the GPU."""
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    loader = ResidentTwoViewLoader(ds, TwoViewAugment.sim(size=32), batch_size=4, device="cuda")
    assert loader.images.pixels.is_cuda and not loader.renderer.compact
    stream = loader.stream(0)
    first = next(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(itertools.islice(stream, 6))  # crosses two epoch boundaries
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(b["view1"].is_cuda and b["label"].is_cuda for b in [first] + batches)
    cpu = ResidentTwoViewLoader(ds, TwoViewAugment.sim(size=32), batch_size=4, device=CPU)
    assert ([b["index"].tolist() for b in itertools.islice(cpu.stream(0), 7)]
            == [b["index"].tolist() for b in [first] + batches])  # the same order on both


def test_unreadable_files_are_skipped_named_and_substituted(tmp_path):
    root = fx.write_odd_folder(tmp_path / "odd")
    ds = ImageFolder(str(root))
    images = ResidentImages(ds, CPU)
    broken = {str(root / n) for n in fx.ODD_BROKEN}
    assert set(images.skipped_files) == broken and images.num_readable == len(fx.ODD_GOOD)
    assert images.num_images == len(ds) == len(fx.ODD_GOOD) + len(fx.ODD_BROKEN)
    aug = TwoViewAugment.sim(size=S)
    loader = ResidentTwoViewLoader(images, aug, batch_size=4, seed=0)
    reference = TwoViewLoader(ds, aug, batch_size=4, seed=0)
    good = {i for i, p in enumerate(ds.paths) if p not in broken}
    for epoch in range(2):
        batches = list(loader.epoch_batches(epoch))
        # the first batch names the files skipped at load time; later ones do not repeat them
        assert set(batches[0]["skipped_files"]) == broken
        assert all(b["skipped_files"] == [] for b in batches[1:])
        # a broken index is replaced by the next readable one, exactly as ImageFolder does
        assert ([b["index"].tolist() for b in batches]
                == [b["index"].tolist() for b in reference.epoch_batches(epoch)])
        for b in batches:
            assert set(b["index"].tolist()) <= good
            assert torch.isfinite(b["view1"]).all() and torch.isfinite(b["view2"]).all()
            for k, i in enumerate(b["index"].tolist()):
                with Image.open(ds.paths[i]) as im:
                    assert b["image_size"][k].tolist() == [im.height, im.width]
    streamed = list(itertools.islice(loader.stream(0), 4))
    assert set(streamed[0]["skipped_files"]) == broken
    assert all(b["skipped_files"] == [] for b in streamed[1:])


def test_all_broken_and_over_budget_raise_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"^too many unreadable images near .*bad\d\.jpg "
                                        r"\(3 in a row failed to decode\): check the folder "):
        ResidentImages(ImageFolder(str(fx.write_broken_folder(tmp_path / "bad"))), CPU)
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    unpadded = sum(3 * h * w for h, w in ((40 + 3 * k, 52 - 2 * k) for k in range(4))) * 3
    padded = 12 * 3 * (40 + 9) * 52
    for max_bytes, needs in [(1000, r"more than .* \(after 12 of 12 images\)"),
                             (unpadded, r"[\d.]+ MiB \(12 images stored at up to 49×52\)")]:
        assert max_bytes < padded
        with pytest.raises(DataError, match=r"^the resident loader needs " + needs
                           + r" of cpu memory for .*data but its budget is .*\(max_bytes\): "
                             r"use --loader torch or --loader dali") as err:
            ResidentImages(ds, CPU, max_bytes=max_bytes)
        assert "\n" not in str(err.value)
    assert ResidentImages(ds, CPU, max_bytes=padded).nbytes == padded


def test_one_pixel_images_give_constant_views(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "a.png")
    Image.new("RGB", (1, 2), (10, 200, 30)).save(root / "b.png")
    aug = TwoViewAugment.sim(size=S, normalize=False, colour=False)
    loader = ResidentTwoViewLoader(ImageFolder(str(root)), aug, batch_size=2, device=CPU)
    (b,) = list(loader.epoch_batches(0))
    for k, i in enumerate(b["index"].tolist()):
        size = [(1, 1), (2, 1)][i]
        assert b["image_size"][k].tolist() == list(size)
        y, x, h, w = b["boxes"][k, 0].tolist()
        assert y + h <= size[0] and x + w <= size[1] and h >= 1 and w >= 1
        view = (b["view1"][k] * 255).round()
        assert view[0].eq(10).all() and view[1].eq(200).all() and view[2].eq(30).all()


def test_cifar_subset_end_to_end(cifar_train_subset):
    """640 real 32×32 JPEGs, the full SIM recipe at 32 px (blur included)."""
    ds = ImageFolder(str(cifar_train_subset))
    loader = ResidentTwoViewLoader(ds, TwoViewAugment.sim(size=32), batch_size=64, device=CPU)
    assert loader.images.pixels.shape == (640, 3, 32, 32) and loader.renderer.supersample == 1
    low = ((0 - MEAN) / STD).float().view(1, 3, 1, 1) - 1e-5
    high = ((1 - MEAN) / STD).float().view(1, 3, 1, 1) + 1e-5
    labels, indices = [], []
    for b in loader.epoch_batches(0):
        for key in ("view1", "view2"):
            assert b[key].shape == (64, 3, 32, 32) and b[key].dtype == torch.float32
            assert ((b[key] >= low) & (b[key] <= high)).all()
            assert b[key].std() > 0.3  # real content, not a constant
        assert (b["image_size"] == 32).all()
        assert (b["boxes"][..., 2:] >= 1).all()
        assert (b["boxes"][..., :2] + b["boxes"][..., 2:] <= 32).all()
        labels += b["label"].tolist()
        indices += b["index"].tolist()
    assert sorted(indices) == list(range(640))
    assert labels == [ds.labels[i] for i in indices] and set(labels) == set(range(10))
