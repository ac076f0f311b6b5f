"""The PyTorch two-view loader and SIM augmentation (pipelines/augment.py, torch_loader.py).

Geometry convention under test (DESIGN.md): output pixel (r, c) of an S×S view samples source row
y + (r+½)·h/S − ½ and column x + (c'+½)·w/S − ½, c' = S−1−c when the view is flipped.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.augment import (IMAGENET_MEAN, IMAGENET_STD, JitterParams, TwoViewAugment,
                               ViewAugment, adjust_hue, color_jitter, crop_resize,
                               random_resized_crop_box, recipe_augment,
                               sample_jitter)
from pipelines.datasets import DataError, ImageFolder, sample_photos
from pipelines.torch_loader import TwoViewLoader, epoch_permutation

try:
    import fixtures_images as fx
except ImportError:  # tests/ is a package
    from tests import fixtures_images as fx
RAMP_BLUE, RAMP_COL, RAMP_H, RAMP_ROW, RAMP_W = (fx.RAMP_BLUE, fx.RAMP_COL, fx.RAMP_H,
                                                  fx.RAMP_ROW, fx.RAMP_W)

S = 32
# Bicubic (a = −0.5, Pillow) reproduces a linear ramp exactly away from the image border; what is
# left is the ramp's own rounding (±0.5 level) amplified by the kernel's negative lobes (Σ|w| ≤ 1.2)
# plus the output rounding (±0.5): ≤ 1.1 levels. 1.5 levels is < 0.75 source pixel on either
# ramp, so a box or flip wrong by one pixel fails.
TOL_LEVELS = 1.5


# ----------------------------------------------------------------------------- geometry

def _predicted_source(box, flip, size):
    """Source (row, col) of every output pixel under the convention, and the interior mask."""
    y, x, h, w = (float(v) for v in box)
    r = np.arange(size, dtype=np.float64)
    c = r[::-1] if flip else r
    rows = y + (r + 0.5) * h / size - 0.5
    cols = x + (c + 0.5) * w / size - 0.5
    # Pillow clips the kernel at the image border and renormalises, which bends the ramp there:
    # keep pixels whose whole bicubic support (radius 2·max(scale, 1) source px) is inside.
    support_r, support_c = 2 * max(h / size, 1) + 1, 2 * max(w / size, 1) + 1
    ok_r = (rows - support_r >= 0) & (rows + support_r <= RAMP_H - 1)
    ok_c = (cols - support_c >= 0) & (cols + support_c <= RAMP_W - 1)
    return rows, cols, ok_r[:, None] & ok_c[None, :]


def _check_view_against_geometry(view_levels, box, flip, image_size):
    """view_levels: (3, S, S) in 0..255 levels."""
    assert tuple(image_size) == (RAMP_H, RAMP_W)
    y, x, h, w = box
    assert 0 <= y and 0 <= x and y + h <= RAMP_H and x + w <= RAMP_W and h > 0 and w > 0
    size = view_levels.shape[-1]
    rows, cols, interior = _predicted_source(box, flip, size)
    want_r = RAMP_ROW * rows[:, None] * np.ones((1, size))
    want_g = RAMP_COL * cols[None, :] * np.ones((size, 1))
    assert interior.sum() >= size  # the check is not vacuous
    err_r = np.abs(view_levels[0] - want_r)[interior]
    err_g = np.abs(view_levels[1] - want_g)[interior]
    assert err_r.max() <= TOL_LEVELS, (box, flip, err_r.max())
    assert err_g.max() <= TOL_LEVELS, (box, flip, err_g.max())
    assert np.abs(view_levels[2] - RAMP_BLUE).max() <= 1.0
    return interior.sum()


def test_crop_resize_is_the_convention():
    """The primitive alone, for fixed boxes covering up- and down-scaling and non-square boxes."""
    image = fx.coordinate_image()
    for box in [(10, 7, 40, 60), (3, 50, 17, 23), (0, 0, RAMP_H, RAMP_W), (20, 30, 31, 9)]:
        for flip in (False, True):
            view = crop_resize(image, box, S)
            if flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            levels = np.asarray(view, dtype=np.float64).transpose(2, 0, 1)
            _check_view_against_geometry(levels, box, flip, (RAMP_H, RAMP_W))


@pytest.mark.parametrize("flip_p", [0.0, 1.0, 0.5])
def test_loader_views_match_returned_geometry(tmp_path, flip_p):
    """Every view's pixels come from where its returned box and flip say (colour off)."""
    folder = fx.write_coordinate_folder(tmp_path / "ramp")
    ds = ImageFolder(str(folder))
    base = TwoViewAugment.sim(size=S, scale=(0.05, 1.0), colour=False)
    aug = TwoViewAugment(dataclasses.replace(base.view1, flip_p=flip_p),
                         dataclasses.replace(base.view2, flip_p=flip_p))
    loader = TwoViewLoader(ds, aug, batch_size=1, workers=0, seed=3)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    flips_seen = []
    for epoch in range(12):
        (batch,) = list(loader.epoch_batches(epoch))
        assert batch["boxes"].dtype == torch.float32 and batch["flips"].dtype == torch.bool
        for v in range(2):
            view = batch[f"view{v + 1}"][0]
            levels = ((view * std + mean) * 255).double().numpy()  # undo the normalisation
            box = batch["boxes"][0, v].tolist()
            assert all(float(b).is_integer() for b in box)
            flip = bool(batch["flips"][0, v])
            flips_seen.append(flip)
            _check_view_against_geometry(levels, box, flip, batch["image_size"][0].tolist())
    if flip_p == 1.0:
        assert all(flips_seen)
    elif flip_p == 0.0:
        assert not any(flips_seen)
    else:
        assert any(flips_seen) and not all(flips_seen)


def test_flip_is_a_mirror_of_the_unflipped_view():
    image = fx.coordinate_image()
    aug = ViewAugment(size=S, normalize=False).geometry_only()
    params = aug.sample_params(image.height, image.width, random.Random(0))
    plain = aug.apply(image, params._replace(flip=False))
    mirrored = aug.apply(image, params._replace(flip=True))
    torch.testing.assert_close(mirrored, plain.flip(-1), rtol=0, atol=0)


# ----------------------------------------------------------------------------- crop sampler

def test_crop_sampler_statistics():
    rng = random.Random(0)
    H, W = 200, 300
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = np.array([random_resized_crop_box(H, W, scale, ratio, rng) for _ in range(4000)])
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y + h <= H).all() and (x + w <= W).all()
    area = h * w / (H * W)
    aspect = w / h
    # rounding w and h to integers moves area and aspect by < 1.5% at the smallest crops here
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= (4 / 3) * 1.03
    # the whole range is used; on a 3:2 image h ≤ H caps the area at max(ratio)·H/W = 8/9
    assert area.min() < 0.1 and 0.85 < area.max() <= 8 / 9 + 0.005
    assert np.mean(aspect < 1) < 0.45  # tall crops are rejected more often on a wide image
    # anchors spread over the whole free range (uniform y in 0..H−h)
    rel_y = y / np.maximum(H - h, 1)
    assert 0.45 < rel_y[h < H].mean() < 0.55
    # on a square image the log-uniform aspect is symmetric, and so are the anchors
    boxes = np.array([random_resized_crop_box(250, 250, scale, ratio, rng) for _ in range(4000)])
    y, x, h, w = boxes.T
    assert abs(np.mean(w < h) - np.mean(w > h)) < 0.05
    assert abs(np.mean(x / np.maximum(250 - w, 1)) - 0.5) < 0.03


def test_crop_sampler_centre_fallback_for_extreme_aspect():
    rng = random.Random(1)
    # 10×400: no crop of area ≥ 8% fits 10 rows, so every try fails → centre crop at ratio 4/3
    assert random_resized_crop_box(10, 400, (0.08, 1.0), (3 / 4, 4 / 3), rng) == (
        0, (400 - 13) // 2, 10, 13)
    assert random_resized_crop_box(400, 10, (0.08, 1.0), (3 / 4, 4 / 3), rng) == (
        (400 - 13) // 2, 0, 13, 10)
    # within the ratio range the fallback is the whole image (forced: scale > 1 never fits)
    assert random_resized_crop_box(30, 35, (1.5, 2.0), (3 / 4, 4 / 3), rng) == (0, 0, 30, 35)
    for _ in range(50):  # a 1-pixel image always gives the whole pixel
        assert random_resized_crop_box(1, 1, (0.08, 1.0), (3 / 4, 4 / 3), rng) == (0, 0, 1, 1)


# ----------------------------------------------------------------------------- colour steps

def _levels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def test_colour_off_is_pure_geometry():
    image = fx.noise_image(5, 50, 70)
    aug = TwoViewAugment.sim(size=S, normalize=False)
    geo = aug.geometry_only()
    for seed in range(5):
        full = aug(image, random.Random(seed))
        plain = geo(image, random.Random(seed))
        # the same rng gives the same crops and flips with or without colour
        torch.testing.assert_close(full.boxes, plain.boxes)
        torch.testing.assert_close(full.flips, plain.flips)
        for v, params in enumerate(plain.params):
            ref = crop_resize(image, params.box, S)
            if params.flip:
                ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            ref = torch.from_numpy(_levels(ref)).permute(2, 0, 1).float() / 255
            torch.testing.assert_close((plain.view1, plain.view2)[v], ref, rtol=0, atol=0)


def test_grayscale_solarize_and_normalise():
    image = fx.noise_image(6, 40, 40)
    geo = ViewAugment(size=S, normalize=False).geometry_only()
    params = geo.sample_params(40, 40, random.Random(0))
    ref = _levels(geo.apply_pil(image, params))

    gray = dataclasses.replace(geo, grayscale_p=1.0)
    out = _levels(gray.apply_pil(image, gray.sample_params(40, 40, random.Random(0))))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    luma = (ref[..., 0] * 299 + ref[..., 1] * 587 + ref[..., 2] * 114) / 1000
    assert np.abs(out[..., 0] - luma).max() <= 1

    sol = dataclasses.replace(geo, solarize_p=1.0)
    out = _levels(sol.apply_pil(image, sol.sample_params(40, 40, random.Random(0))))
    np.testing.assert_array_equal(out, np.where(ref >= 128, 255 - ref, ref))

    normed = dataclasses.replace(geo, normalize=True).apply(image, params)
    want = (torch.from_numpy(ref).permute(2, 0, 1).float() / 255
            - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normed, want)


def test_color_jitter_factors():
    image = Image.fromarray(np.array([[[200, 100, 50], [20, 40, 60]]], dtype=np.uint8))
    none = JitterParams((0, 1, 2, 3), None, None, None, None)
    np.testing.assert_array_equal(_levels(color_jitter(image, none)), _levels(image))
    half = color_jitter(image, JitterParams((0,), 0.5, None, None, None))
    assert np.abs(_levels(half) - _levels(image) / 2).max() <= 1
    flat = _levels(color_jitter(image, JitterParams((1,), None, 0.0, None, None)))
    assert (flat == flat[0, 0]).all()  # contrast 0: every pixel becomes the grey mean
    desat = _levels(color_jitter(image, JitterParams((2,), None, None, 0.0, None)))
    assert (desat[..., 0] == desat[..., 1]).all() and (desat[..., 1] == desat[..., 2]).all()
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    cyan = _levels(adjust_hue(red, 0.5))[0, 0]  # half a turn of hue
    assert cyan[0] < 10 and cyan[1] > 240 and cyan[2] > 240

    rng = random.Random(0)
    draws = [sample_jitter(0.4, 0.4, 0.2, 0.1, rng) for _ in range(2000)]
    assert {d.order[0] for d in draws} == {0, 1, 2, 3}  # random order
    assert all(sorted(d.order) == [0, 1, 2, 3] for d in draws)
    b = np.array([d.brightness for d in draws])
    s = np.array([d.saturation for d in draws])
    hue = np.array([d.hue for d in draws])
    assert 0.6 <= b.min() < 0.62 and 1.38 < b.max() <= 1.4
    assert 0.8 <= s.min() and s.max() <= 1.2
    assert -0.1 <= hue.min() < -0.09 and 0.09 < hue.max() <= 0.1
    assert sample_jitter(0, 0, 0, 0, rng)[1:] == (None, None, None, None)


def test_step_probabilities_follow_the_recipe():
    aug = TwoViewAugment()  # the SIM recipe at 224
    assert (aug.view1.blur_p, aug.view1.solarize_p) == (1.0, 0.0)
    assert (aug.view2.blur_p, aug.view2.solarize_p) == (0.1, 0.2)
    rng = random.Random(0)
    n = 4000
    draws = [aug.sample_params(100, 120, rng) for _ in range(n)]
    for v, (blur, sol) in enumerate([(1.0, 0.0), (0.1, 0.2)]):
        ps = [d[v] for d in draws]
        rate = lambda f: sum(map(f, ps)) / n  # noqa: E731
        assert abs(rate(lambda p: p.flip) - 0.5) < 0.03
        assert abs(rate(lambda p: p.jitter is not None) - 0.8) < 0.03
        assert abs(rate(lambda p: p.grayscale) - 0.2) < 0.03
        assert abs(rate(lambda p: p.blur_sigma is not None) - blur) < 0.02
        assert abs(rate(lambda p: p.solarize) - sol) < 0.02
        sigmas = [p.blur_sigma for p in ps if p.blur_sigma is not None]
        assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    odd = ViewAugment(flip_p=0.3, size=S)
    flips = [odd.sample_params(50, 50, rng).flip for _ in range(n)]
    assert abs(np.mean(flips) - 0.3) < 0.03
    off = TwoViewAugment.sim(size=S, blur=False)
    assert off.view1.blur_p == 0 and off.view2.blur_p == 0 and off.view2.solarize_p == 0.2
    assert not TwoViewAugment.sim(size=S, colour=False).view2.has_colour
    assert recipe_augment(S, scale=(0.2, 1.0), blur=False) == TwoViewAugment.sim(
        size=S, scale=(0.2, 1.0), blur=False)


def test_blur_smooths_the_view():
    image = fx.noise_image(7, 48, 48)
    geo = ViewAugment(size=S, normalize=False).geometry_only()
    blur = dataclasses.replace(geo, blur_p=1.0, blur_sigma=(2.0, 2.0))
    sharp = _levels(geo.apply_pil(image, geo.sample_params(48, 48, random.Random(0))))
    soft = _levels(blur.apply_pil(image, blur.sample_params(48, 48, random.Random(0))))
    assert np.abs(np.diff(soft, axis=1)).mean() < 0.3 * np.abs(np.diff(sharp, axis=1)).mean()


def test_view_augment_rejects_bad_settings():
    for bad in [dict(size=0), dict(scale=(0.5, 0.1)), dict(ratio=(0, 1)), dict(flip_p=1.5),
                dict(hue=0.7), dict(interpolation="cubic"), dict(blur_sigma=(0, 1))]:
        with pytest.raises(ValueError):
            ViewAugment(**bad)
    with pytest.raises(ValueError):
        TwoViewAugment(ViewAugment(size=32), ViewAugment(size=48))


# ----------------------------------------------------------------------------- the loader

def test_batch_contract(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    loader = TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=5, workers=0, seed=0)
    assert len(loader) == loader.batches_per_epoch == 12 // 5  # drop_last
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {"view1", "view2", "boxes", "flips", "image_size", "label", "index",
                      "skipped_files", "epoch", "batch_index"}
    assert [(bb["epoch"], bb["batch_index"]) for bb in batches] == [(0, 0), (0, 1)]
    assert b["view1"].shape == b["view2"].shape == (5, 3, S, S)
    assert b["view1"].dtype == torch.float32
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
        assert ((y + h) <= H).all() and ((x + w) <= W).all()
    used = torch.cat([bb["index"] for bb in batches])
    assert len(set(used.tolist())) == 10  # no repeats within an epoch
    keep = TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=5, drop_last=False)
    assert [len(bb["index"]) for bb in keep.epoch_batches(0)] == [5, 5, 2]
    on_device = TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=5, device="cpu")
    assert next(iter(on_device.epoch_batches(0)))["view1"].device.type == "cpu"


def test_determinism_across_workers_and_resume(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    aug = TwoViewAugment.sim(size=S)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    serial = TwoViewLoader(ds, aug, batch_size=4, workers=0, seed=11)
    parallel = TwoViewLoader(ds, aug, batch_size=4, workers=2, seed=11)
    e0 = list(serial.epoch_batches(0))
    fx.assert_same_batches(e0, list(parallel.epoch_batches(0)))
    fx.assert_same_batches(e0, list(TwoViewLoader(ds, aug, 4, seed=11).epoch_batches(0)))
    # resuming mid-epoch gives exactly the remaining batches, whatever the worker count
    fx.assert_same_batches(e0[1:], list(parallel.epoch_batches(0, start_batch=1)))
    fx.assert_same_batches(e0[2:], list(serial.epoch_batches(0, start_batch=2)))
    assert list(serial.epoch_batches(0, start_batch=3)) == []
    with pytest.raises(ValueError):
        serial.epoch_batches(0, start_batch=4)
    # a new epoch (or seed) is a new order and new augmentations
    e1 = list(serial.epoch_batches(1))
    order0 = torch.cat([b["index"] for b in e0])
    assert not torch.equal(order0, torch.cat([b["index"] for b in e1]))
    assert torch.equal(order0, epoch_permutation(12, 11, 0)[:12])
    other = list(TwoViewLoader(ds, aug, 4, seed=12).epoch_batches(0))
    assert not torch.equal(e0[0]["boxes"], other[0]["boxes"])
    # the loader leaves the global RNGs alone (the engine's masks depend on them)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_same_sample_same_augmentation_regardless_of_batch_size(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data")))
    aug = TwoViewAugment.sim(size=S)
    small = torch.cat([b["boxes"] for b in TwoViewLoader(ds, aug, 2, seed=5).epoch_batches(3)])
    large = torch.cat([b["boxes"] for b in TwoViewLoader(ds, aug, 6, seed=5).epoch_batches(3)])
    torch.testing.assert_close(small, large, rtol=0, atol=0)


def test_batch_larger_than_dataset(tmp_path):
    ds = ImageFolder(str(fx.write_class_folder(tmp_path / "data", per_class=2)))
    with pytest.raises(DataError) as err:
        TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=64)
    assert str(err.value) == ("batch size 64 is larger than the dataset (6 images): "
                              "use --batch-size 6 or less")


def test_embedded_sample_trains(tmp_path):
    ds = sample_photos()
    assert len(ds) == 47 and len(ds.classes) == 19
    loader = TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=16, workers=0, seed=0)
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 2
    assert len(set(torch.cat([b["label"] for b in batches]).tolist())) > 5
    assert all(torch.isfinite(b["view1"]).all() and torch.isfinite(b["view2"]).all()
               for b in batches)
    assert min(b["image_size"].min().item() for b in batches) == 96  # short side 96


# ----------------------------------------------------------------------------- awkward data

def test_odd_folder_yields_valid_batches_and_names_broken_files(tmp_path):
    root = fx.write_odd_folder(tmp_path / "odd")
    ds = ImageFolder(str(root))
    names = sorted(fx.ODD_GOOD + fx.ODD_BROKEN)
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.paths) == names  # .txt not listed
    assert ds.other_files == len(fx.ODD_OTHER) and not ds.has_labels
    broken = {str(root / n) for n in fx.ODD_BROKEN}
    good_idx = {i for i, p in enumerate(ds.paths) if p not in broken}
    for workers in (0, 2):
        loader = TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=4, workers=workers,
                               seed=0)
        skipped = []
        for epoch in range(2):
            for b in loader.epoch_batches(epoch):
                assert b["view1"].shape == (4, 3, S, S)
                assert torch.isfinite(b["view1"]).all() and torch.isfinite(b["view2"]).all()
                assert set(b["index"].tolist()) <= good_idx  # broken files were replaced
                assert (b["image_size"] >= 1).all()
                skipped += b["skipped_files"]
        # each broken file comes up once per epoch (more when it is also the next index)
        assert set(skipped) == broken and len(skipped) >= 2 * len(broken)


def test_one_pixel_image_views(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "a.png")
    Image.new("RGB", (1, 2), (10, 200, 30)).save(root / "b.png")
    aug = TwoViewAugment.sim(size=S, normalize=False, colour=False)
    (b,) = list(TwoViewLoader(ImageFolder(str(root)), aug, batch_size=2).epoch_batches(0))
    for k, i in enumerate(b["index"].tolist()):
        size = [(1, 1), (2, 1)][i]
        assert b["image_size"][k].tolist() == list(size)
        y, x, h, w = b["boxes"][k, 0].tolist()
        assert y + h <= size[0] and x + w <= size[1] and h >= 1 and w >= 1
        view = (b["view1"][k] * 255).round()
        assert view[0].eq(10).all() and view[1].eq(200).all() and view[2].eq(30).all()


def test_all_broken_raises_one_line_error(tmp_path):
    ds = ImageFolder(str(fx.write_broken_folder(tmp_path / "bad")))
    for workers in (0, 1):
        loader = TwoViewLoader(ds, TwoViewAugment.sim(size=S), batch_size=2, workers=workers)
        with pytest.raises(DataError, match=r"^too many unreadable images near .*bad\d\.jpg "
                                            r".*: check the folder ") as err:
            list(loader.epoch_batches(0))
        assert "\n" not in str(err.value)


def test_folder_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"^data folder .*nope does not exist: point --data at"):
        ImageFolder(str(missing))
    a_file = tmp_path / "x.jpg"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match=r"x\.jpg is a file, not a folder: "):
        ImageFolder(str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"^no images found in .*empty \(looked for \.jpg, \.jpeg, "
                                        r".*found 0 other files\): point --data at a folder"):
        ImageFolder(str(empty))
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.csv", "sub/c.json"):
        (texts / name).write_text("x")
    with pytest.raises(DataError, match=r"found 3 other files\)") as err:
        ImageFolder(str(texts))
    assert "\n" not in str(err.value)


def test_class_folder_and_flat_folder_labels(tmp_path):
    root = fx.write_class_folder(tmp_path / "cls", classes=("b_dog", "a_cat"), per_class=2)
    (root / "a_cat" / "deeper").mkdir()
    fx.noise_image(9, 20, 20).save(root / "a_cat" / "deeper" / "Z.JPG")   # upper-case ext
    fx.noise_image(9, 20, 20).save(root / "loose.png")                     # not in a class
    (root / "b_dog" / "readme.md").write_text("x")
    (root / ".hidden").mkdir()
    fx.noise_image(9, 20, 20).save(root / ".hidden" / "h.png")
    (root / "empty_class").mkdir()
    ds = ImageFolder(str(root))
    assert ds.has_labels and ds.classes == ["a_cat", "b_dog"]
    assert len(ds) == 5 and ds.loose_images == 1 and ds.other_files == 1
    by_name = {p[len(str(root)) + 1:]: lab for p, lab in zip(ds.paths, ds.labels)}
    assert by_name == {"a_cat/0.png": 0, "a_cat/1.png": 0, "a_cat/deeper/Z.JPG": 0,
                       "b_dog/0.png": 1, "b_dog/1.png": 1}
    assert "2 class folders" in ds.describe() and "1 image outside" in ds.describe()
    b = next(iter(TwoViewLoader(ds, TwoViewAugment.sim(size=S), 5).epoch_batches(0)))
    assert sorted(b["label"].tolist()) == [0, 0, 0, 1, 1]

    flat = ImageFolder(str(fx.write_flat_folder(tmp_path / "flat", n=4, ext="JPEG")))
    assert not flat.has_labels and flat.classes == [] and flat.labels == [0, 0, 0, 0]
    b = next(iter(TwoViewLoader(flat, TwoViewAugment.sim(size=S), 4).epoch_batches(0)))
    assert b["label"].tolist() == [0, 0, 0, 0]
