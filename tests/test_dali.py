"""The DALI two-view loader (pipelines/dali.py), in DALI's CPU-only mode (plus a GPU check that runs
where CUDA is present).

Geometry convention under test (DESIGN.md): output pixel (r, c) of an S×S view samples source row
y + (r+½)·h/S − ½ and column x + (c'+½)·w/S − ½, c' = S−1−c when the view is flipped.

Tolerances, in 8-bit levels (measured values on the development machine in brackets):
* geometry on the lossless coordinate PNG: |view − ramp| ≤ 1.5 levels (the PyTorch loader's
  bound: < 0.75 source pixel on either ramp) away from the image border [max 0.50, mean 0.14];
  on the same ramp as a JPEG (quality 95, no chroma subsampling) max ≤ 4.5 and mean ≤ 0.75 level:
  JPEG's own error, while a box or flip wrong by one pixel moves the mean by ≥ 2 levels
  [max 3.0, mean 0.40];
* pixel parity with Pillow (real photos, colour off, the returned box rendered by
  `augment.crop_resize`): mean absolute difference ≤ 1.0 per view, ≤ 0.6 on average
  [max 0.41, mean 0.31] (libjpeg-turbo in both; bicubic weights differ in rounding; Pillow rounds
  to uint8);
* colour jitter against PIL's `color_jitter` with the same order and factors, applied to the same
  geometry-only view: MAD ≤ 3.5 per view, ≤ 2.0 on average [max 2.2, mean 1.3] (PIL rounds every
  step to uint8 and quantises HSV to 8 bits; the jitter itself moves pixels by ~27 levels).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.augment import (
    JitterParams,
    TwoViewAugment,
    color_jitter,
    crop_resize,
    random_resized_crop_box,
)
from pipelines.dali import (
    NO_OP,
    ROUTE_BROKEN,
    ROUTE_DALI,
    ROUTE_PILLOW,
    SLOT_ANCHOR,
    SLOT_AREA,
    SLOT_RATIO,
    SLOTS_PER_VIEW,
    DaliTwoViewLoader,
    crop_boxes,
    dali_available,
    draw_view,
    sample_uniforms,
    sniff,
)
from pipelines.datasets import DataError, ImageFolder, decode_rgb, sample_photos
from pipelines.torch_loader import TwoViewLoader, epoch_permutation

try:
    import fixtures_images as fx
except ImportError:  # tests/ is a package
    from tests import fixtures_images as fx

DALI_OK, DALI_REASON = dali_available()
requires_dali = pytest.mark.skipif(not DALI_OK, reason=DALI_REASON)
S = 32
BATCH_KEYS = {"view1", "view2", "boxes", "flips", "image_size", "label", "index",
              "skipped_files", "epoch", "batch_index"}


def _levels(view: torch.Tensor) -> np.ndarray:
    """(3, S, S) view with normalize=False → (S, S, 3) float64 levels 0..255."""
    return view.permute(1, 2, 0).double().numpy() * 255.0


def _with(pair: TwoViewAugment, **changes) -> TwoViewAugment:
    return TwoViewAugment(dataclasses.replace(pair.view1, **changes),
                          dataclasses.replace(pair.view2, **changes))


# ----------------------------------------------------------------------------- import guard

def test_module_imports_without_dali_and_the_loader_says_how_to_get_it(tmp_path):
    """`import pipelines.dali` must not need DALI; constructing the loader without it raises one
    line. Run in a fresh interpreter where importing `nvidia` fails."""
    folder = fx.write_flat_folder(tmp_path / "flat", n=2)
    code = f"""
import sys
import torch  # noqa: F401  (a CUDA build of torch may load nvidia.* libraries itself)
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia" or name.startswith("nvidia."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import pipelines.dali as d
assert "nvidia.dali" not in sys.modules
ok, reason = d.dali_available()
assert not ok and "not importable" in reason, reason
from pipelines.augment import TwoViewAugment
try:
    d.DaliTwoViewLoader({str(folder)!r}, TwoViewAugment.sim(size=8), batch_size=1)
except d.DataError as err:
    print("ERR", err)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR ")]
    assert len(lines) == 1
    assert "needs NVIDIA DALI" in lines[0] and "pip install nvidia-dali" in lines[0]


# ----------------------------------------------------------------------------- the crop sampler

class _UniformRng:
    """Stands in for random.Random in augment.random_resized_crop_box, replaying fed uniforms:
    uniform(a, b) = a + (b − a)·u, randint(0, m) = ⌊u·(m + 1)⌋ (the DALI loader's mapping)."""

    def __init__(self, u: np.ndarray):
        self.u = u
        self.tries = 0
        self.anchor = 0
        self.calls = 0

    def uniform(self, a, b):
        if self.calls % 2 == 0:
            value = self.u[SLOT_AREA + self.tries]
        else:
            value = self.u[SLOT_RATIO + self.tries]
            self.tries += 1
        self.calls += 1
        return a + (b - a) * value

    def randint(self, a, b):
        value = self.u[SLOT_ANCHOR + self.anchor]
        self.anchor += 1
        return a + math.floor(value * (b - a + 1))


def test_crop_boxes_are_torchvisions_sampler_on_the_fed_uniforms():
    rng = np.random.default_rng(0)
    sizes = [(97, 123), (200, 300), (300, 200), (1, 1), (1, 2), (10, 400), (400, 10), (31, 35),
             (5, 7), (1000, 700)]
    u = sample_uniforms(5, 0, np.arange(3000))[:, 0]
    for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.2, 1.0), (0.5, 2.0)),
                         ((1.5, 2.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (1.0, 1.0))]:
        pick = rng.integers(0, len(sizes), len(u))
        heights = np.array([sizes[p][0] for p in pick])
        widths = np.array([sizes[p][1] for p in pick])
        boxes = crop_boxes(heights, widths, u, scale, ratio)
        for k in range(len(u)):
            want = random_resized_crop_box(int(heights[k]), int(widths[k]), scale, ratio,
                                           _UniformRng(u[k]))
            assert tuple(boxes[k]) == want, (heights[k], widths[k], scale, ratio)
    # the fallback is exercised: 10×400 at scale ≥ 0.08 never fits 10 rows
    box = crop_boxes(np.array([10]), np.array([400]), u[:1], (0.08, 1.0), (3 / 4, 4 / 3))
    assert tuple(box[0]) == (0, (400 - 13) // 2, 10, 13)


def test_uniforms_are_keyed_by_seed_epoch_and_position():
    a = sample_uniforms(1, 2, np.arange(10, 20))
    assert a.shape == (10, 2, SLOTS_PER_VIEW) and a.min() >= 0 and a.max() < 1
    np.testing.assert_array_equal(a[3:], sample_uniforms(1, 2, np.arange(13, 20)))
    assert not np.array_equal(a, sample_uniforms(1, 3, np.arange(10, 20)))
    assert not np.array_equal(a, sample_uniforms(2, 2, np.arange(10, 20)))
    big = sample_uniforms(0, 0, np.arange(20000)).ravel()
    assert abs(big.mean() - 0.5) < 0.005 and abs(big.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(big[:-1], big[1:])[0, 1]) < 0.01


# ----------------------------------------------------------------------------- distribution parity

def test_parameter_distributions_match_the_pytorch_augmentation():
    """The numpy draws that drive the DALI graph against TwoViewAugment.sample_params (what the
    PyTorch loader uses): step rates, jitter factor ranges and order, blur σ range, over 4000
    samples per view."""
    aug = TwoViewAugment()  # the SIM recipe
    n = 4000
    u = sample_uniforms(0, 0, np.arange(n))
    rng = random.Random(0)
    torch_draws = [aug.sample_params(100, 120, rng) for _ in range(n)]
    for v, view in enumerate((aug.view1, aug.view2)):
        d = draw_view(view, u[:, v])
        ps = [t[v] for t in torch_draws]
        pairs = [(d.flip.mean(), np.mean([p.flip for p in ps])),
                 (d.jitter.mean(), np.mean([p.jitter is not None for p in ps])),
                 (d.grayscale.mean(), np.mean([p.grayscale for p in ps])),
                 (d.blur.mean(), np.mean([p.blur_sigma is not None for p in ps])),
                 (d.solarize.mean(), np.mean([p.solarize for p in ps]))]
        for ours, theirs in pairs:  # 4σ of a difference of two rates at n = 4000 is ≤ 0.045
            assert abs(ours - theirs) < 0.045, (v, pairs)
        jittered = d.jitter
        factors = d.factors[jittered]
        theirs = np.array([[p.jitter.brightness, p.jitter.contrast, p.jitter.saturation,
                            p.jitter.hue] for p in ps if p.jitter is not None])
        for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            for col in (factors[:, k], theirs[:, k]):
                assert lo <= col.min() < lo + 0.01 and hi - 0.01 < col.max() <= hi
            assert abs(factors[:, k].mean() - theirs[:, k].mean()) < 0.01
        # random order: every op leads about a quarter of the time, every op exactly once
        assert (np.sort(d.order[jittered], axis=1) == np.arange(4)).all()
        assert (d.order[~jittered] == NO_OP).all()
        first = np.bincount(d.order[jittered][:, 0], minlength=4) / jittered.sum()
        assert np.abs(first - 0.25).max() < 0.03
        sigma = d.sigma[d.blur]
        assert 0.1 <= sigma.min() < 0.15 and 1.95 < sigma.max() <= 2.0
    off = draw_view(dataclasses.replace(aug.view1, hue=0.0, contrast=0.0), u[:, 0])
    assert not np.isin(off.order, [1, 3]).any()   # a zero-strength factor is never applied


@requires_dali
def test_crop_area_and_aspect_histograms_match_the_pytorch_loader(tmp_path):
    """4096 boxes from the DALI pipeline against 4096 from the PyTorch loader's sampler on the same
    images: two-sample Kolmogorov-Smirnov distance of area fraction and aspect below 0.045 (the
    0.1% critical value is 0.043), and matching flip rates."""
    folder = fx.write_size_variety_folder(tmp_path / "sizes", n=64)
    aug = TwoViewAugment.sim(size=8, colour=False)
    loader = DaliTwoViewLoader(folder, aug, batch_size=64, seed=7)
    boxes, sizes, flips = [], [], []
    for batch in itertools.islice(loader.stream(), 32):
        boxes.append(batch["boxes"].reshape(-1, 4))
        sizes.append(batch["image_size"].repeat_interleave(2, dim=0))
        flips.append(batch["flips"].reshape(-1))
    boxes, sizes = torch.cat(boxes).double().numpy(), torch.cat(sizes).double().numpy()
    flips = torch.cat(flips).numpy()
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y + h <= sizes[:, 0]).all() and (x + w <= sizes[:, 1]).all()
    rng = random.Random(7)
    draws = [aug.view1.sample_geometry(int(H), int(W), rng) for H, W in sizes]
    ref = np.array([box for box, _ in draws])
    ref_flips = [flip for _, flip in draws]

    def ks(a, b):
        grid = np.sort(np.concatenate([a, b]))
        cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
        cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
        return np.abs(cdf_a - cdf_b).max()

    area = h * w / (sizes[:, 0] * sizes[:, 1])
    ref_area = ref[:, 2] * ref[:, 3] / (sizes[:, 0] * sizes[:, 1])
    assert ks(area, ref_area) < 0.045
    assert ks(w / h, ref[:, 3] / ref[:, 2]) < 0.045
    assert abs(flips.mean() - np.mean(ref_flips)) < 0.045


# ----------------------------------------------------------------------------- the batch dict

@requires_dali
def test_batch_contract_order_and_partial_batch_policy(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    aug = TwoViewAugment.sim(size=S)
    loader = DaliTwoViewLoader(ds, aug, batch_size=5, seed=0)
    assert len(loader) == loader.batches_per_epoch == 12 // 5 and loader.num_images == 12
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 2 and [(b["epoch"], b["batch_index"]) for b in batches] == [(0, 0),
                                                                                          (0, 1)]
    b = batches[0]
    assert set(b) == BATCH_KEYS
    assert b["view1"].shape == b["view2"].shape == (5, 3, S, S)
    assert b["view1"].dtype == torch.float32 and b["view1"].device.type == "cpu"
    assert torch.isfinite(b["view1"]).all() and torch.isfinite(b["view2"]).all()
    assert b["boxes"].shape == (5, 2, 4) and b["boxes"].dtype == torch.float32
    assert b["flips"].shape == (5, 2) and b["flips"].dtype == torch.bool
    assert b["image_size"].dtype == b["label"].dtype == b["index"].dtype == torch.int64
    assert b["skipped_files"] == []
    for k in range(5):
        i = int(b["index"][k])
        with Image.open(ds.paths[i]) as im:
            assert b["image_size"][k].tolist() == [im.height, im.width]
        assert int(b["label"][k]) == ds.labels[i]
        y, x, h, w = b["boxes"][k].T
        H, W = b["image_size"][k].tolist()
        assert ((y + h) <= H).all() and ((x + w) <= W).all() and (h >= 1).all()
    # the PyTorch loader's order: the same images in the same batches
    used = torch.cat([bb["index"] for bb in batches])
    assert torch.equal(used, epoch_permutation(12, 0, 0)[:10])
    torch_batches = list(TwoViewLoader(ds, aug, batch_size=5, seed=0).epoch_batches(0))
    assert [bb["index"].tolist() for bb in torch_batches] == [bb["index"].tolist()
                                                               for bb in batches]
    # last partial batch: dropped by default, kept (smaller) with drop_last=False
    keep = DaliTwoViewLoader(ds, aug, batch_size=5, seed=0, drop_last=False)
    kept = list(keep.epoch_batches(0))
    assert len(keep) == 3 and [len(bb["index"]) for bb in kept] == [5, 5, 2]
    assert kept[2]["view2"].shape == (2, 3, S, S) and kept[2]["boxes"].shape == (2, 2, 4)
    assert sorted(torch.cat([bb["index"] for bb in kept]).tolist()) == list(range(12))
    fx.assert_same_batches(kept[:2], batches)   # dropping the tail changes nothing before it


@requires_dali
def test_half_precision_outputs_and_argument_errors(tmp_path):
    ds = ImageFolder(str(fx.write_flat_folder(tmp_path / "flat", n=4)))
    aug = TwoViewAugment.sim(size=16, colour=False)
    ref = next(iter(DaliTwoViewLoader(ds, aug, batch_size=4).epoch_batches(0)))
    for dtype in (torch.float16, torch.bfloat16):
        b = next(iter(DaliTwoViewLoader(ds, aug, batch_size=4, dtype=dtype).epoch_batches(0)))
        assert b["view1"].dtype == b["view2"].dtype == dtype
        torch.testing.assert_close(b["view1"].float(), ref["view1"], rtol=0.01, atol=0.02)
        torch.testing.assert_close(b["boxes"], ref["boxes"], rtol=0, atol=0)
    with pytest.raises(DataError, match=r"^batch size 5 is larger than the dataset \(4 images\)"):
        DaliTwoViewLoader(ds, aug, batch_size=5)
    with pytest.raises(DataError, match="only supported with one rank"):
        DaliTwoViewLoader(ds, aug, batch_size=1, rank=0, world_size=2, drop_last=False)
    with pytest.raises(DataError, match="'box' has no DALI counterpart"):
        DaliTwoViewLoader(ds, _with(aug, interpolation="box"), batch_size=2)
    with pytest.raises(DataError, match="dtype must be"):
        DaliTwoViewLoader(ds, aug, batch_size=2, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA is not available"):
            DaliTwoViewLoader(ds, aug, batch_size=2, device="cuda")
    loader = DaliTwoViewLoader(str(tmp_path / "flat"), aug, batch_size=2)   # a path works too
    assert loader.num_images == 4 and loader.device_id is None
    with pytest.raises(ValueError):
        loader.epoch_batches(0, start_batch=3)


# ----------------------------------------------------------------------------- geometry

def _predicted_source(box, flip, size):
    y, x, h, w = (float(v) for v in box)
    r = np.arange(size, dtype=np.float64)
    c = r[::-1] if flip else r
    rows = y + (r + 0.5) * h / size - 0.5
    cols = x + (c + 0.5) * w / size - 0.5
    # the resampling kernel is clipped at the image border (renormalised by Pillow, edge-clamped
    # by DALI): keep pixels whose whole bicubic support is inside the image
    support_r, support_c = 2 * max(h / size, 1) + 1, 2 * max(w / size, 1) + 1
    ok_r = (rows - support_r >= 0) & (rows + support_r <= fx.RAMP_H - 1)
    ok_c = (cols - support_c >= 0) & (cols + support_c <= fx.RAMP_W - 1)
    return rows, cols, ok_r[:, None] & ok_c[None, :]


@requires_dali
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_views_match_returned_geometry(tmp_path, kind):
    """Every view's pixels come from where its returned box and flip say (colour off), on a
    synthetic image whose red and green channels encode the source row and column."""
    if kind == "png":
        folder = fx.write_coordinate_folder(tmp_path / "ramp")
        max_tol, mean_tol, blue_tol = 1.5, 0.5, 0.01
    else:
        folder = fx.write_coordinate_jpeg_folder(tmp_path / "ramp")
        max_tol, mean_tol, blue_tol = 4.5, 0.75, 3.0
    aug = TwoViewAugment.sim(size=S, scale=(0.05, 1.0), colour=False, normalize=False)
    loader = DaliTwoViewLoader(folder, aug, batch_size=1, seed=3)
    flips_seen, checked = [], 0
    for batch in itertools.islice(loader.stream(), 24):   # 24 one-image epochs, one pipeline
        assert tuple(batch["image_size"][0].tolist()) == (fx.RAMP_H, fx.RAMP_W)
        for v in range(2):
            levels = _levels(batch[f"view{v + 1}"][0])
            box = batch["boxes"][0, v].tolist()
            y, x, h, w = box
            assert y >= 0 and x >= 0 and y + h <= fx.RAMP_H and x + w <= fx.RAMP_W
            flip = bool(batch["flips"][0, v])
            flips_seen.append(flip)
            rows, cols, interior = _predicted_source(box, flip, S)
            assert interior.sum() >= S
            err_r = np.abs(levels[..., 0] - fx.RAMP_ROW * rows[:, None])[interior]
            err_g = np.abs(levels[..., 1] - fx.RAMP_COL * cols[None, :])[interior]
            assert err_r.max() <= max_tol and err_g.max() <= max_tol, (box, flip)
            assert err_r.mean() <= mean_tol and err_g.mean() <= mean_tol, (box, flip)
            assert np.abs(levels[..., 2] - fx.RAMP_BLUE).max() <= blue_tol
            checked += 1
    assert checked == 48 and any(flips_seen) and not all(flips_seen)


@requires_dali
def test_pixels_match_pillow_for_the_returned_boxes():
    """Real photos, colour off: the DALI view and Pillow's crop_resize of the returned box agree."""
    ds = sample_photos()
    aug = TwoViewAugment.sim(size=64, colour=False, normalize=False)
    loader = DaliTwoViewLoader(ds, aug, batch_size=16, seed=1)
    mads = []
    for batch in loader.epoch_batches(0):
        for k in range(len(batch["index"])):
            image = decode_rgb(ds.paths[int(batch["index"][k])])
            for v in range(2):
                box = tuple(int(t) for t in batch["boxes"][k, v].tolist())
                ref = crop_resize(image, box, 64)
                if batch["flips"][k, v]:
                    ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                diff = np.abs(_levels(batch[f"view{v + 1}"][k]) - np.asarray(ref, np.float64))
                mads.append(diff.mean())
    assert len(mads) == 64
    assert max(mads) <= 1.0 and np.mean(mads) <= 0.6, (max(mads), np.mean(mads))


# ----------------------------------------------------------------------------- colour steps

def _positions(batch, batch_size):
    k = batch["batch_index"]
    return np.arange(k * batch_size, k * batch_size + len(batch["index"]))


@requires_dali
def test_colour_steps_follow_the_draws_sample_by_sample(tmp_path):
    """Grayscale, blur and solarize happen exactly to the samples whose draws say so: compared
    with the geometry-only views of the same seed (same boxes and flips)."""
    folder = tmp_path / "noise"
    folder.mkdir()
    for k in range(32):   # crops of at least half a 64-px noise image: views stay rough
        fx.noise_image(50 + k, 64, 64).save(folder / f"n{k:02d}.png")
    base = TwoViewAugment.sim(size=S, scale=(0.5, 1.0), normalize=False).geometry_only()
    aug = TwoViewAugment(dataclasses.replace(base.view1, grayscale_p=0.5, blur_p=0.5,
                                             blur_sigma=(1.5, 2.0)),
                         dataclasses.replace(base.view2, solarize_p=0.5, solarize_threshold=100))
    colour = list(DaliTwoViewLoader(folder, aug, batch_size=16, seed=4).epoch_batches(0))
    plain = list(DaliTwoViewLoader(folder, base, batch_size=16, seed=4).epoch_batches(0))
    counts = np.zeros(3, int)
    for bc, bp in zip(colour, plain):
        torch.testing.assert_close(bc["boxes"], bp["boxes"], rtol=0, atol=0)
        u = sample_uniforms(4, 0, _positions(bc, 16))
        d1, d2 = draw_view(aug.view1, u[:, 0]), draw_view(aug.view2, u[:, 1])
        for k in range(16):
            ref1, out1 = _levels(bp["view1"][k]), _levels(bc["view1"][k])
            grey = ref1 @ np.array([0.299, 0.587, 0.114])
            want = np.repeat(grey[..., None], 3, axis=-1) if d1.grayscale[k] else ref1
            roughness = np.abs(np.diff(out1, axis=1)).mean() / np.abs(np.diff(want, axis=1)).mean()
            if d1.blur[k]:
                assert roughness < 0.5
            else:
                np.testing.assert_allclose(out1, want, atol=2e-3)
            if d1.grayscale[k]:
                assert np.abs(out1 - out1[..., :1]).max() < 2e-3
            ref2 = _levels(bp["view2"][k])
            want2 = np.where(ref2 >= 100, 255 - ref2, ref2) if d2.solarize[k] else ref2
            clear = np.abs(ref2 - 100) > 1e-3   # float noise cannot flip the threshold test
            np.testing.assert_allclose(_levels(bc["view2"][k])[clear], want2[clear], atol=2e-3)
            counts += [d1.grayscale[k], d1.blur[k], d2.solarize[k]]
    assert (counts > 4).all() and (counts < 28).all()   # both branches exercised


@requires_dali
def test_colour_jitter_matches_pillow_with_the_same_draws():
    """Random order, each factor, exact HSV hue: DALI's jitter against PIL's color_jitter (what the
    PyTorch loader runs) applied to the same geometry-only view with the same order and factors."""
    ds = sample_photos()
    base = TwoViewAugment.sim(size=48, normalize=False)
    jitter = _with(base, jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    coloured = list(DaliTwoViewLoader(ds, jitter, batch_size=16, seed=2).epoch_batches(0))
    plain = list(DaliTwoViewLoader(ds, jitter.geometry_only(), batch_size=16,
                                   seed=2).epoch_batches(0))
    mads, effect = [], []
    for bc, bp in zip(coloured, plain):
        u = sample_uniforms(2, 0, _positions(bc, 16))
        for v, view in enumerate((jitter.view1, jitter.view2)):
            d = draw_view(view, u[:, v])
            for k in range(16):
                geo = np.clip(np.rint(_levels(bp[f"view{v + 1}"][k])), 0, 255).astype(np.uint8)
                order = tuple(int(o) for o in d.order[k] if o != NO_OP)
                assert sorted(order) == [0, 1, 2, 3]
                ref = color_jitter(Image.fromarray(geo),
                                   JitterParams(order, *map(float, d.factors[k])))
                ref = np.asarray(ref, np.float64)
                mads.append(np.abs(_levels(bc[f"view{v + 1}"][k]) - ref).mean())
                effect.append(np.abs(ref - geo).mean())
    assert len(mads) == 64 and np.mean(effect) > 10
    assert max(mads) <= 3.5 and np.mean(mads) <= 2.0, (max(mads), np.mean(mads))


# ----------------------------------------------------------------------------- bad data

@requires_dali
def test_odd_folder_decodes_or_skips_and_names_every_file(tmp_path):
    """Grayscale and CMYK JPEGs, RGBA / palette / 16-bit / 1-pixel PNGs are decoded (ImageFolder's
    policy); truncated, empty and corrupt JPEGs are skipped, replaced by the next readable image
    and named in skipped_files each time they come up (the corrupt one only DALI's decoder finds,
    which costs a pipeline rebuild); a file with a bogus header segment goes through Pillow."""
    root = fx.write_odd_folder(tmp_path / "odd")
    (root / "corrupt.jpg").write_bytes(fx.corrupt_jpeg_bytes())
    (root / "bogus_segment.jpg").write_bytes(fx.bogus_segment_jpeg_bytes())
    fx.noise_image(8, 50, 60).save(root / "good.jpg", quality=90)
    ds = ImageFolder(str(root))
    broken = {str(root / name) for name in fx.ODD_BROKEN + ("corrupt.jpg",)}
    good_idx = {i for i, p in enumerate(ds.paths) if p not in broken}
    aug = TwoViewAugment.sim(size=S, colour=False, normalize=False)
    loader = DaliTwoViewLoader(ds, aug, batch_size=4, seed=0, drop_last=False)
    assert len(ds) == 11 and len(loader) == 3
    skipped, seen = [], set()
    for batch in itertools.islice(loader.stream(), 2 * len(loader)):   # two whole epochs
        assert batch["view1"].shape == (3 if batch["batch_index"] == 2 else 4, 3, S, S)
        assert torch.isfinite(batch["view1"]).all() and torch.isfinite(batch["view2"]).all()
        assert set(batch["index"].tolist()) <= good_idx
        skipped += batch["skipped_files"]
        for k, i in enumerate(batch["index"].tolist()):
            seen.add(i)
            image = decode_rgb(ds.paths[i])   # the Pillow policy is the reference
            assert batch["image_size"][k].tolist() == [image.height, image.width]
            for v in range(2):
                box = tuple(int(t) for t in batch["boxes"][k, v].tolist())
                ref = crop_resize(image, box, S)
                if batch["flips"][k, v]:
                    ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                diff = np.abs(_levels(batch[f"view{v + 1}"][k]) - np.asarray(ref, np.float64))
                assert diff.mean() < 2.5, (ds.paths[i], diff.mean())
    assert set(skipped) == broken and len(skipped) >= 2 * len(broken)
    names = {Path(ds.paths[i]).name for i in seen}
    assert {"gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "gray16.png",
            "bogus_segment.jpg"} <= names
    # who decoded what: only DALI's decoder could find the corrupt file out
    assert sniff(fx.corrupt_jpeg_bytes())[0] == "dali"
    routes = {Path(p).name: int(r) for p, r in zip(ds.paths, loader._routes)}
    assert routes["corrupt.jpg"] == routes["truncated.jpg"] == ROUTE_BROKEN
    assert routes["gray.jpg"] == routes["good.jpg"] == ROUTE_DALI
    assert all(routes[name] == ROUTE_PILLOW for name in ("cmyk.jpg", "rgba.png", "palette.png",
                                                          "gray16.png", "bogus_segment.jpg"))


@requires_dali
def test_a_file_only_dali_cannot_read_is_handed_to_pillow(tmp_path, monkeypatch):
    """A file that passes the header sniff, which Pillow decodes but DALI's decoder rejects: the
    failed batch is diagnosed (DALI probe), the file is decoded by Pillow from then on, and the
    re-made batch is the one an error-free run gives."""
    import pipelines.dali as dali_module

    root = tmp_path / "data"
    root.mkdir()
    for k in range(5):
        fx.noise_image(20 + k, 40, 44).save(root / f"ok{k}.jpg", quality=90)
    (root / "odd.jpg").write_bytes(fx.bogus_segment_jpeg_bytes())
    real_sniff = dali_module.sniff

    def lenient_sniff(data):
        if b"garbage-garbage" in data:
            return "dali", 48, 40
        return real_sniff(data)

    aug = TwoViewAugment.sim(size=16, normalize=False)
    reference = list(DaliTwoViewLoader(root, aug, batch_size=3, seed=1).epoch_batches(0))
    monkeypatch.setattr(dali_module, "sniff", lenient_sniff)
    loader = DaliTwoViewLoader(root, aug, batch_size=3, seed=1)
    batches = list(loader.epoch_batches(0))
    odd = ImageFolder(str(root)).paths.index(str(root / "odd.jpg"))
    assert loader._routes[odd] == dali_module.ROUTE_PILLOW
    fx.assert_same_batches(batches, reference)


@requires_dali
def test_all_broken_raises_one_line_error(tmp_path):
    ds = ImageFolder(str(fx.write_broken_folder(tmp_path / "bad")))
    loader = DaliTwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=2)
    with pytest.raises(DataError, match=r"^too many unreadable images near .*bad\d\.jpg "
                                        r".*: check the folder ") as err:
        list(loader.epoch_batches(0))
    assert "\n" not in str(err.value)


@requires_dali
def test_a_failure_no_file_explains_is_one_line(tmp_path, monkeypatch):
    import pipelines.dali as dali_module

    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jpg").write_bytes(fx.corrupt_jpeg_bytes(1))
    (root / "b.jpg").write_bytes(fx.corrupt_jpeg_bytes(2))
    monkeypatch.setattr(dali_module, "_pillow_decodes", lambda path: True)
    monkeypatch.setattr(dali_module, "_dali_rejects",
                        lambda files, device_id: [False] * len(files))
    loader = DaliTwoViewLoader(root, TwoViewAugment.sim(size=8), batch_size=2)
    with pytest.raises(DataError, match=r"^DALI pipeline failed on epoch 0 batch 0 and no file "
                                        r"could be blamed: ") as err:
        list(loader.epoch_batches(0))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- order and resume

@requires_dali
def test_stream_resume_and_determinism(tmp_path):
    """A batch is a pure function of (seed, epoch, batch index): the stream equals the epochs back
    to back, and resuming mid-epoch reproduces the remaining batches exactly (augmentation
    included)."""
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    aug = TwoViewAugment.sim(size=16)
    loader = DaliTwoViewLoader(ds, aug, batch_size=4, seed=11)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    per_epoch = [list(loader.epoch_batches(e)) for e in range(2)]
    expected = [b for epoch in per_epoch for b in epoch]
    fx.assert_same_batches(list(itertools.islice(loader.stream(0, 0), len(expected))), expected)
    fx.assert_same_batches(list(itertools.islice(loader.stream(0, 2), 3)), expected[2:5])
    fx.assert_same_batches(list(loader.epoch_batches(1, start_batch=1)), per_epoch[1][1:])
    assert list(loader.epoch_batches(0, start_batch=3)) == []
    assert next(loader.stream(0, 3))["epoch"] == 1   # the end of an epoch resumes at the next
    other = next(iter(DaliTwoViewLoader(ds, aug, batch_size=4, seed=12).epoch_batches(0)))
    assert not torch.equal(other["boxes"], expected[0]["boxes"])
    order0 = torch.cat([b["index"] for b in per_epoch[0]])
    assert not torch.equal(order0, torch.cat([b["index"] for b in per_epoch[1]]))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


@requires_dali
def test_ranks_see_disjoint_shards_that_cover_the_global_batches(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    aug = TwoViewAugment.sim(size=16)
    single = list(DaliTwoViewLoader(ds, aug, batch_size=4, seed=1).epoch_batches(0))
    shards = [list(DaliTwoViewLoader(ds, aug, batch_size=2, seed=1, rank=r,
                                     world_size=2).epoch_batches(0)) for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 3
    covered = []
    for k, whole in enumerate(single):
        a, b = shards[0][k], shards[1][k]
        assert not set(a["index"].tolist()) & set(b["index"].tolist())
        assert a["index"].tolist() + b["index"].tolist() == whole["index"].tolist()
        covered += whole["index"].tolist()
        # a sample's augmentation does not depend on the number of ranks
        for key in ("view1", "view2", "boxes", "flips"):
            torch.testing.assert_close(torch.cat([a[key], b[key]]), whole[key], rtol=0, atol=0)
    assert sorted(covered) == list(range(12))   # 12 images, 3 global batches of 4: the epoch
    torch_rank1 = TwoViewLoader(ds, aug, batch_size=2, seed=1, rank=1, world_size=2)
    assert [b["index"].tolist() for b in torch_rank1.epoch_batches(0)] == [
        b["index"].tolist() for b in shards[1]]


# ----------------------------------------------------------------------------- GPU

@requires_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed (nvJPEG) path needs CUDA")
def test_gpu_mode_matches_cpu_mode():
    """Same seed on the GPU ("mixed" decode, GPU operators) and in CPU mode: identical images,
    boxes and flips; pixels within decoder/resampling differences; everything on the device."""
    ds = sample_photos()
    aug = TwoViewAugment.sim(size=64)
    cpu = next(iter(DaliTwoViewLoader(ds, aug, batch_size=16, seed=5).epoch_batches(0)))
    gpu = next(iter(DaliTwoViewLoader(ds, aug, batch_size=16, seed=5,
                                      device="cuda").epoch_batches(0)))
    for key in ("view1", "view2", "boxes", "flips", "image_size", "label", "index"):
        assert gpu[key].device.type == "cuda"
    for key in ("boxes", "flips", "image_size", "label", "index"):
        assert torch.equal(gpu[key].cpu(), cpu[key])
    for key in ("view1", "view2"):
        diff = (gpu[key].cpu() - cpu[key]).abs() * 255 * 0.226   # ≈ levels (undo the std)
        assert diff.mean() < 2.0, diff.mean()
