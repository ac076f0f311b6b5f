"""Multi-crop and region proposals in the three loaders (torch, resident on the CPU, DALI's CPU mode).

Geometry convention under test (DESIGN.md): output pixel (r, c) of an S×S view samples source row
y + (r+½)·h/S − ½ and column x + (c'+½)·w/S − ½, c' = S−1−c when the view is flipped; a multi-crop
batch holds V views of several sizes (`crops`), boxes (B, V, 4) and flips (B, V). Proposals (x1 y1
x2 y2, edge coordinates of the original image) map into a view as (u − x)·S/w, mirrored to S − ·
when flipped, clipped to [0, S]; `proposal_visible` is the fraction of the box inside the view.

Tolerances (levels of 8 bits, as in the two-view tests): Pillow and DALI ≤ 1.5 levels (< 0.75
source pixel on either ramp) away from the image border, DALI mean ≤ 0.5; the resident loader's
bilinear grid_sample is reproduced by a float64 bilinear interpolation to 0.01 levels everywhere.
Proposals: float32 results against a float64 per-box computation, 1e-4 view pixels.
"""
from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.augment import (SWAV_STD, MultiCropAugment, TwoViewAugment, ViewAugment,
                               augment_recipe, multicrop_augment)
from pipelines.dali import DaliTwoViewLoader, dali_available
from pipelines.datasets import DataError, ImageFolder
from pipelines.resident import ResidentImages, ResidentTwoViewLoader
from pipelines.torch_loader import (BATCH_KEYS, MULTICROP_KEYS, PROPOSAL_KEYS, TwoViewLoader,
                                    batch_crops, proposals_in_views)

try:
    import fixtures_images as fx
    from host_sync import count_host_syncs
except ImportError:  # tests/ is a package
    from tests import fixtures_images as fx
    from tests.host_sync import count_host_syncs

DALI_OK, DALI_REASON = dali_available()
requires_dali = pytest.mark.skipif(not DALI_OK, reason=DALI_REASON)
LOADERS = ("torch", "resident", pytest.param("dali", marks=requires_dali))
CPU = torch.device("cpu")

LARGE, SMALL = 24, 12
GROUPS = [(2, LARGE, (0.3, 1.0)), (3, SMALL, (0.05, 0.3))]       # V = 5, two sizes
SIZES = [LARGE] * 2 + [SMALL] * 3
SCALES = [(0.3, 1.0)] * 2 + [(0.05, 0.3)] * 3
# coordinate images whose aspect is inside the crop's (3/4, 4/3): no centre-crop fallback
RAMP_SIZES = ((fx.RAMP_H, fx.RAMP_W), (64, 80), (90, 70))
MULTI_KEYS = set(MULTICROP_KEYS)


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Small batched ops on a shared machine: one thread beats a spinning OpenMP team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _geometry_augment(flip_p: float = 0.5, interpolation: str = "bilinear") -> MultiCropAugment:
    """Colour off, no normalisation: a view's pixels are the resampled source levels / 255."""
    multi = multicrop_augment("mocov2", GROUPS, colour=False, normalize=False,
                              interpolation=interpolation)
    return MultiCropAugment(tuple(dataclasses.replace(v, flip_p=flip_p) for v in multi.views))


def _make(kind: str, data, augment, batch_size: int, seed: int = 0, **kw):
    if kind == "torch":
        return TwoViewLoader(data, augment, batch_size=batch_size, seed=seed, workers=0,
                             pin_memory=False, **kw)
    if kind == "resident":
        images = data if isinstance(data, ResidentImages) else ResidentImages(data, CPU)
        return ResidentTwoViewLoader(images, augment, batch_size=batch_size, seed=seed,
                                     antialias=False, **kw)
    return DaliTwoViewLoader(data, augment, batch_size=batch_size, seed=seed, threads=1, **kw)


def _same(a: dict, b: dict, keys=None) -> None:
    """Two batches are identical (tensors bit for bit, lists of tensors element-wise): every key,
    or just `keys`."""
    if keys is None:
        assert a.keys() == b.keys()
    for key in keys or a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=key)
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                torch.testing.assert_close(u, v, rtol=0, atol=0, msg=key)
        else:
            assert x == y, key


def _source(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64).transpose(2, 0, 1)


def _source_coords(box, flip, size):
    y, x, h, w = (float(v) for v in box)
    r = np.arange(size, dtype=np.float64)
    c = r[::-1] if flip else r
    return y + (r + 0.5) * h / size - 0.5, x + (c + 0.5) * w / size - 0.5


def _bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(3, len(rows), len(cols)) bilinear samples with clamp-to-edge (grid_sample's border)."""
    _, h, w = image.shape
    r = np.clip(rows, 0, h - 1)[:, None]
    c = np.clip(cols, 0, w - 1)[None, :]
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = r - r0, c - c0
    top = image[:, r0, c0] * (1 - fc) + image[:, r0, c1] * fc
    bottom = image[:, r1, c0] * (1 - fc) + image[:, r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def _check_box(box, image_size, scale):
    """Inside the image, integer, and an area fraction inside the crop's scale range (w and h are
    rounded: (h − ½)(w − ½) ≤ s·H·W ≤ (h + ½)(w + ½))."""
    y, x, h, w = box
    height, width = image_size
    assert all(float(v).is_integer() for v in box)
    assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= height and x + w <= width
    area = height * width
    assert (h + 0.5) * (w + 0.5) >= scale[0] * area and (h - 0.5) * (w - 0.5) <= scale[1] * area


# ----------------------------------------------------------------------------- the augmentation

def test_two_crop_multicrop_is_the_two_view_augment():
    """Same rng → the same draws and the same views; multicrop_augment's first group of a
    two-view recipe is exactly that recipe's pair (view 1 colour, then view 2's)."""
    pair = augment_recipe("sim", 24, scale=(0.2, 1.0))
    multi = MultiCropAugment(pair.views)
    assert multicrop_augment("sim", [(2, 24, (0.2, 1.0))]) == multi
    image = fx.noise_image(3, 40, 52)
    for seed in range(6):
        two = pair(image, random.Random(seed))
        many = multi(image, random.Random(seed))
        assert two.params == many.params
        torch.testing.assert_close(many.crops[0], two.view1, rtol=0, atol=0)
        torch.testing.assert_close(many.crops[1], two.view2, rtol=0, atol=0)
        assert torch.equal(many.boxes, two.boxes) and torch.equal(many.flips, two.flips)


def test_draw_order_geometry_first_and_the_recipes():
    """All geometries (crop by crop) before any colour draw: colour off keeps every crop and
    flip. SwAV's recipe: 2×224 (0.14–1) + 6×96 (0.05–0.14), its colour on every crop."""
    multi = multicrop_augment("byol", GROUPS)
    plain = multi.geometry_only()
    rng_a, rng_b = random.Random(7), random.Random(7)
    geometry = [v.sample_geometry(50, 60, rng_b) for v in multi.views]   # crop by crop
    params = multi.sample_params(50, 60, rng_a)
    assert [(p.box, p.flip) for p in params] == geometry
    assert [(p.box, p.flip) for p in plain.sample_params(50, 60, random.Random(7))] == geometry
    # byol's asymmetric pair alternates within each group: view 1's colour on crops 0, 2, ...
    assert [v.solarize_p for v in multi.views] == [0.0, 0.2, 0.0, 0.2, 0.0]
    assert [v.blur_p for v in multi.views] == [1.0, 0.1, 1.0, 0.1, 1.0]
    assert multi.sizes == tuple(SIZES) and [v.scale for v in multi.views] == SCALES
    assert multi.size_groups == ((0, 2, LARGE), (2, 5, SMALL))

    swav = MultiCropAugment.swav()
    assert swav.sizes == (224,) * 2 + (96,) * 6
    assert [v.scale for v in swav.views] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    for v in swav.views:
        assert (v.brightness, v.contrast, v.saturation, v.hue, v.jitter_p) == (0.8, 0.8, 0.8,
                                                                               0.2, 0.8)
        assert (v.grayscale_p, v.blur_p, v.blur_sigma, v.solarize_p, v.flip_p) == (
            0.2, 0.5, (0.1, 2.0), 0.0, 0.5)
        assert v.interpolation == "bilinear" and v.std == SWAV_STD == (0.228, 0.224, 0.225)
    assert augment_recipe("swav", 32).views == (dataclasses.replace(swav.views[0], size=32),) * 2
    # groups with per-crop ViewAugments, and the errors
    own = MultiCropAugment.from_groups([(1, 20, (0.5, 1.0), ViewAugment(flip_p=0.0)),
                                        (2, 10, (0.1, 0.2), [ViewAugment(), ViewAugment(
                                            solarize_p=1.0)])])
    assert own.sizes == (20, 10, 10) and own.views[0].flip_p == 0.0
    assert own.views[2].solarize_p == 1.0 and own.views[2].scale == (0.1, 0.2)
    with pytest.raises(ValueError, match="at least 2 crops"):
        MultiCropAugment((ViewAugment(),))
    with pytest.raises(ValueError, match="unknown augmentation 'simclr'"):
        multicrop_augment("simclr", GROUPS)


# ----------------------------------------------------------------------------- geometry

@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    return fx.write_coordinate_sizes(tmp_path_factory.mktemp("ramps"), sizes=RAMP_SIZES)


def _multicrop_views(loader, epochs):
    """(levels (3, S, S), box, flip, image size, dataset index, view) of every view."""
    for epoch in range(epochs):
        for batch in loader.epoch_batches(epoch):
            assert set(batch) == MULTI_KEYS
            assert [tuple(c.shape[1:]) for c in batch["crops"]] == [(3, s, s) for s in SIZES]
            assert batch["view1"] is batch["crops"][0] and batch["view2"] is batch["crops"][1]
            assert batch["boxes"].shape == (len(batch["index"]), 5, 4)
            assert batch["flips"].shape == (len(batch["index"]), 5)
            assert batch["boxes"].dtype == torch.float32 and batch["flips"].dtype == torch.bool
            for k in range(len(batch["index"])):
                for v, crop in enumerate(batch["crops"]):
                    yield (crop[k].double().numpy() * 255, batch["boxes"][k, v].tolist(),
                           bool(batch["flips"][k, v]), batch["image_size"][k].tolist(),
                           int(batch["index"][k]), v)


@pytest.mark.parametrize("kind", LOADERS)
def test_every_crop_comes_from_its_box_and_flip(ramps, kind):
    """Coordinate images (R ∝ row, G ∝ column): each crop's pixels are the convention applied to
    its own box, size and flip; the boxes respect each group's scale range."""
    ds = ImageFolder(str(ramps))
    loader = _make(kind, ds, _geometry_augment(), batch_size=3, seed=3)
    sources = {i: _source(ds.paths[i]) for i in range(len(ds))}
    checked, flips, worst, means = 0, [], 0.0, []
    for levels, box, flip, image_size, index, v in _multicrop_views(loader, epochs=4):
        size = SIZES[v]
        _check_box(box, image_size, SCALES[v])
        assert list(sources[index].shape[1:]) == image_size
        rows, cols = _source_coords(box, flip, size)
        flips.append(flip)
        if kind == "resident":   # bilinear grid_sample, clamped at the image's own edge: exact
            worst = max(worst, np.abs(levels - _bilinear(sources[index], rows, cols)).max())
            checked += size * size
            continue
        # Pillow and DALI renormalise / clamp the kernel at the image border: the interior only,
        # against the ramp itself (R = 2.5·row, G = 2·col)
        h, w = box[2:]
        margin_r, margin_c = 2 * max(h / size, 1) + 1, 2 * max(w / size, 1) + 1
        ok = (((rows - margin_r >= 0) & (rows + margin_r <= image_size[0] - 1))[:, None]
              & ((cols - margin_c >= 0) & (cols + margin_c <= image_size[1] - 1))[None, :])
        if not ok.any():
            continue
        err_r = np.abs(levels[0] - fx.RAMP_ROW * rows[:, None])[ok]
        err_g = np.abs(levels[1] - fx.RAMP_COL * cols[None, :])[ok]
        worst = max(worst, err_r.max(), err_g.max())
        means += [err_r.mean(), err_g.mean()]
        assert np.abs(levels[2] - fx.RAMP_BLUE).max() <= 1.0
        checked += int(ok.sum())
    assert any(flips) and not all(flips)
    if kind == "resident":
        assert worst <= 0.01, worst
    else:
        assert worst <= 1.5 and float(np.mean(means)) <= 0.5, (worst, np.mean(means))
    assert checked > 40 * SMALL * SMALL   # not vacuous


@requires_dali
def test_dali_decode_once_equals_a_decode_per_crop(ramps):
    """One decode of the union region per image gives the views that one region decode per crop
    gives (the ROI and its filter support lie inside both regions)."""
    aug = _geometry_augment()
    once = DaliTwoViewLoader(ramps, aug, batch_size=3, seed=5, threads=1)
    per_view = DaliTwoViewLoader(ramps, aug, batch_size=3, seed=5, threads=1, decode="per_view")
    assert once.decode_once and not per_view.decode_once
    pair = DaliTwoViewLoader(ramps, TwoViewAugment(*aug.views[:2]), batch_size=3, seed=5)
    assert not pair.decode_once   # two views: one region decode per view (the default)
    for a, b in zip(once.epoch_batches(0), per_view.epoch_batches(0)):
        _same(a, b, keys=("boxes", "flips", "index"))
        for x, y in zip(a["crops"], b["crops"]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- order and resume

@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    return ImageFolder(str(fx.write_class_folder(tmp_path_factory.mktemp("classes"))))


@pytest.mark.parametrize("kind", LOADERS)
def test_reproducible_resumable_and_two_crops_are_two_views(class_folder, kind):
    """Same seed → the same batches; epoch_batches(e, k) / stream(e, k) resume at batch k; a new
    seed draws anew; a two-crop MultiCropAugment gives the TwoViewAugment's batches."""
    aug = multicrop_augment("sim", GROUPS)
    data = ResidentImages(class_folder, CPU) if kind == "resident" else class_folder
    loader = _make(kind, data, aug, batch_size=4, seed=11)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    e0 = list(loader.epoch_batches(0))
    assert len(e0) == 3 and [b["batch_index"] for b in e0] == [0, 1, 2]
    for a, b in zip(e0, _make(kind, data, aug, batch_size=4, seed=11).epoch_batches(0)):
        _same(a, b)
    for a, b in zip(e0[1:], loader.epoch_batches(0, start_batch=1)):
        _same(a, b)
    streamed = list(itertools.islice(loader.stream(0, 2), 2))
    _same(streamed[0], e0[2])
    assert (streamed[1]["epoch"], streamed[1]["batch_index"]) == (1, 0)
    other = next(iter(_make(kind, data, aug, batch_size=4, seed=12).epoch_batches(0)))
    assert not torch.equal(other["boxes"], e0[0]["boxes"])
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    for batch in e0:
        for k, v in itertools.product(range(4), range(5)):
            _check_box(batch["boxes"][k, v].tolist(), batch["image_size"][k].tolist(), SCALES[v])

    pair = augment_recipe("sim", 16, scale=(0.2, 1.0))
    two = list(_make(kind, data, pair, batch_size=4, seed=11).epoch_batches(1))
    multi = list(_make(kind, data, MultiCropAugment(pair.views), batch_size=4,
                       seed=11).epoch_batches(1))
    for a, b in zip(two, multi):
        assert set(a) == set(BATCH_KEYS) and set(b) == MULTI_KEYS
        _same(a, b, keys=BATCH_KEYS)
        assert len(b["crops"]) == 2 and b["view1"] is b["crops"][0]
        # a two-view batch answers batch["crops"] without storing it
        assert a["crops"][0] is a["view1"] and a.get("crops")[1] is a["view2"]
        assert batch_crops(a)[1] is a["view2"] and batch_crops(dict(b))[0] is b["view1"]


def test_loaders_agree_on_order_and_format(class_folder):
    """The three loaders (same seed) visit the same images batch for batch and yield the same
    keys, shapes and dtypes (their random streams differ by design: Python's Random, a
    counter-based hash, a device generator); the torch loader is the same with workers."""
    aug = multicrop_augment("mocov2", GROUPS)
    kinds = ["torch", "resident"] + (["dali"] if DALI_OK else [])
    runs = {kind: list(itertools.chain.from_iterable(
        _make(kind, class_folder, aug, batch_size=4, seed=2).epoch_batches(e) for e in (0, 1)))
        for kind in kinds}
    runs["workers"] = list(itertools.chain.from_iterable(
        TwoViewLoader(class_folder, aug, batch_size=4, seed=2, workers=1,
                      pin_memory=False).epoch_batches(e) for e in (0, 1)))
    for a, b in zip(runs["torch"], runs["workers"]):
        _same(a, b)
    reference = runs["torch"]
    for kind in kinds[1:]:
        for a, b in zip(reference, runs[kind]):
            assert a["index"].tolist() == b["index"].tolist()
            assert set(a) == set(b) == MULTI_KEYS
            for key in BATCH_KEYS:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            assert [c.shape for c in a["crops"]] == [c.shape for c in b["crops"]]
            assert torch.equal(a["image_size"], b["image_size"])


# ----------------------------------------------------------------------------- proposals

P = 6


def _proposal_table(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes (N, P, 4), counts (N,)): per image the whole image, a box around its centre, and
    random boxes; counts 2..6; the padding rows of odd images hold a box (a count must hide it)."""
    g = torch.Generator().manual_seed(0)
    n = len(dataset.paths)
    boxes, counts = torch.zeros(n, P, 4), torch.zeros(n, dtype=torch.int64)
    for i, path in enumerate(dataset.paths):
        with Image.open(path) as im:
            width, height = im.size
        count = 2 + i % 5
        rows = [[0.0, 0.0, width, height], [width / 4, height / 4, 3 * width / 4, 3 * height / 4]]
        while len(rows) < count:
            x1, y1 = (torch.rand(2, generator=g) * torch.tensor([width - 2, height - 2])).tolist()
            x2 = x1 + 1 + float(torch.rand((), generator=g)) * (width - x1 - 1)
            y2 = y1 + 1 + float(torch.rand((), generator=g)) * (height - y1 - 1)
            rows.append([x1, y1, x2, y2])
        boxes[i, :count] = torch.tensor(rows)
        if i % 2:
            boxes[i, count:] = torch.tensor([1.0, 1.0, width - 1.0, height - 1.0])
        counts[i] = count
    return boxes, counts


def _expected(proposal, box, flip, size):
    """One proposal in a view, from the convention alone, in float64: ((x1, y1, x2, y2) clipped,
    visible fraction). Source edge u lies at view edge (u − x)·S/w (pixel k spans [k, k+1] on
    both sides); a mirrored view reads it at S − that."""
    px1, py1, px2, py2 = (float(t) for t in proposal)
    y, x, h, w = (float(t) for t in box)
    left, right = (px1 - x) * size / w, (px2 - x) * size / w
    top, bottom = (py1 - y) * size / h, (py2 - y) * size / h
    if flip:
        left, right = size - right, size - left
    area = max(right - left, 0.0) * max(bottom - top, 0.0)
    cl, cr = min(max(left, 0.0), size), min(max(right, 0.0), size)
    ct, cb = min(max(top, 0.0), size), min(max(bottom, 0.0), size)
    inside = max(cr - cl, 0.0) * max(cb - ct, 0.0)
    return [cl, ct, max(cr, cl), max(cb, ct)], (inside / area if area > 0 else 0.0)


def test_proposals_in_views_by_hand():
    """A fixed crop (y, x, h, w) = (10, 20, 40, 80) shown at 8 px: the box's top-left quarter,
    mirrored when flipped; a box half outside (visible 0.5, clipped); padding rows all zero."""
    boxes = torch.tensor([[[20.0, 10.0, 60.0, 30.0],      # the crop's top-left quarter
                           [0.0, 10.0, 40.0, 50.0],       # x 0..40: half of it left of x = 20
                           [5.0, 5.0, 9.0, 9.0]]])        # padding (count 2)
    counts = torch.tensor([2])
    crop = torch.tensor([[[10.0, 20.0, 40.0, 80.0]] * 2])
    mapped, visible = proposals_in_views(boxes, counts, torch.tensor([0]), crop,
                                         torch.tensor([[False, True]]), [8, 8])
    torch.testing.assert_close(mapped[0, 0, 0], torch.tensor([0.0, 0.0, 4.0, 4.0]))
    torch.testing.assert_close(mapped[0, 1, 0], torch.tensor([4.0, 0.0, 8.0, 4.0]))
    torch.testing.assert_close(mapped[0, 0, 1], torch.tensor([0.0, 0.0, 2.0, 8.0]))
    torch.testing.assert_close(mapped[0, 1, 1], torch.tensor([6.0, 0.0, 8.0, 8.0]))
    torch.testing.assert_close(visible[0], torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]))
    assert not mapped[0, :, 2].any()


@pytest.mark.parametrize("kind", LOADERS)
def test_proposals_follow_every_crop_and_flip(class_folder, kind):
    """Each loader's `proposals` / `proposal_visible` equal an independent per-box computation
    from the batch's own boxes and flips, in every crop of both sizes; padding rows (beyond the
    image's count, even where they hold a box) are 0; flipped views with boxes partly outside
    occur."""
    table = _proposal_table(class_folder)
    loader = _make(kind, class_folder, multicrop_augment("mocov2", GROUPS), batch_size=4,
                   seed=4, proposals=table)
    seen = {"flipped_partial": 0, "outside": 0, "padding": 0}
    for batch in itertools.chain(loader.epoch_batches(0), loader.epoch_batches(1)):
        assert set(batch) == MULTI_KEYS | set(PROPOSAL_KEYS)
        b = len(batch["index"])
        assert batch["proposals"].shape == (b, 5, P, 4)
        assert batch["proposal_visible"].shape == (b, 5, P)
        assert batch["proposals"].dtype == batch["proposal_visible"].dtype == torch.float32
        for k, v, p in itertools.product(range(b), range(5), range(P)):
            index = int(batch["index"][k])
            got_box = batch["proposals"][k, v, p].double()
            got_visible = float(batch["proposal_visible"][k, v, p])
            if p >= int(table[1][index]):
                assert got_visible == 0.0 and not got_box.any()
                seen["padding"] += 1
                continue
            want_box, want_visible = _expected(table[0][index, p], batch["boxes"][k, v],
                                               bool(batch["flips"][k, v]), SIZES[v])
            torch.testing.assert_close(got_box, torch.tensor(want_box, dtype=torch.float64),
                                       rtol=0, atol=1e-4)
            assert abs(got_visible - want_visible) <= 1e-5
            seen["flipped_partial"] += bool(batch["flips"][k, v]) and 0 < want_visible < 0.99
            seen["outside"] += want_visible == 0
    assert all(n > 0 for n in seen.values()), seen
    # one two-view loader too: (B, 2, P, ...) with the same mapping
    pair = _make(kind, class_folder, augment_recipe("mocov2", 16), batch_size=4, seed=4,
                 proposals=table)
    batch = next(iter(pair.epoch_batches(0)))
    assert set(batch) == set(BATCH_KEYS) | set(PROPOSAL_KEYS)
    assert batch["proposals"].shape == (4, 2, P, 4)
    want = _expected(table[0][int(batch["index"][0]), 0], batch["boxes"][0, 1],
                     bool(batch["flips"][0, 1]), 16)
    torch.testing.assert_close(batch["proposals"][0, 1, 0].double(),
                               torch.tensor(want[0], dtype=torch.float64), rtol=0, atol=1e-4)
    with pytest.raises(DataError, match=r"proposal boxes must have shape \(N=12, P, 4\)"):
        _make(kind, class_folder, augment_recipe("mocov2", 16), batch_size=4,
              proposals=(table[0][:5], table[1][:5]))


def test_resident_multicrop_and_proposals_make_no_host_sync(class_folder):
    """The resident batch, multi-crop views and proposals included, reads no device value on
    the host when colour is masked (as on CUDA): counted on the CPU (tests/host_sync.py)."""
    loader = ResidentTwoViewLoader(class_folder, multicrop_augment("byol", GROUPS), batch_size=4,
                                   device=CPU, proposals=_proposal_table(class_folder))
    loader.renderer.compact = False   # the CUDA path: every step for all, selected by mask
    plan = loader.epoch_plan(0)
    loader.batch(plan, 0)
    with count_host_syncs() as syncs:
        batch = loader.batch(plan, 1)
    assert not syncs, syncs.report()
    assert batch["proposals"].shape == (4, 5, P, 4)


# ----------------------------------------------------------------------------- engine wiring

def test_build_loader_follows_the_methods_views(class_folder):
    from engine.loaders import build_augment, build_loader
    from engine.methods.base import CropSpec, ViewSpec
    from engine.presets import PretrainConfig

    cfg = PretrainConfig(augmentation="swav", img_size=16, batch_size=4, loader="torch",
                         workers=0)
    views = ViewSpec(crops=(CropSpec(2, 16, (0.14, 1.0)), CropSpec(3, 8, (0.05, 0.14))))
    multi = build_augment(cfg, views)
    assert multi == multicrop_augment("swav", [(2, 16, (0.14, 1.0)), (3, 8, (0.05, 0.14))],
                                      blur=cfg.blur)
    assert build_augment(cfg) == augment_recipe("swav", 16, blur=cfg.blur)
    table = _proposal_table(class_folder)
    loader, line = build_loader(cfg, class_folder.root, CPU, views=dataclasses.replace(
        views, proposals=P), proposals=table)
    assert isinstance(loader, TwoViewLoader) and loader.augment == multi and "torch" in line
    batch = next(iter(loader.epoch_batches(0)))
    assert [c.shape[-1] for c in batch["crops"]] == [16, 16, 8, 8, 8]
    assert batch["proposals"].shape == (4, 5, P, 4)
    with pytest.raises(DataError, match="needs region proposals"):
        build_loader(cfg, class_folder.root, CPU, views=ViewSpec(proposals=P))
    two, _ = build_loader(cfg, class_folder.root, CPU)
    assert isinstance(two.augment, TwoViewAugment)
