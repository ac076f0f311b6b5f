"""Named two-view recipes (pipelines/augment.py: AUGMENTATIONS, augment_recipe) and whether each of
the three loaders (torch, DALI in CPU-only mode, resident on the CPU) honours each recipe.

Per recipe the distinctive settings are (BYOL appendix B / SIM spec; MoCo v2 `--aug-plus`):

            crop scale   interpolation  blur p (v1, v2)  solarize p (v1, v2)  saturation jitter
  sim       (0.08, 1)    bicubic        1.0, 0.1         0.0, 0.2             0.2
  byol      = sim
  mocov2    (0.2, 1)     bilinear       0.5, 0.5         0.0, 0.0             0.4

For each loader the test reads the boxes and flips of real batches, and the per-sample colour
decisions the loader made for those very samples (the torch loader: `sample_rng` + the augment's
`sample_params`; DALI: `sample_uniforms` + `draw_view`, the numbers fed to its graph; resident: the
epoch's uniform table + `draw_params`), tied to the batch by checking that they reproduce its boxes
and flips. The interpolation is checked on pixels: with colour off, every view is compared with
Pillow's rendering of its returned box under bilinear and under bicubic, and must be far closer to
the recipe's own.
"""
from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch

from pipelines.augment import (
    AUGMENTATIONS,
    TwoViewAugment,
    augment_recipe,
    augmentation_source,
    crop_resize,
    recipe_augment,
)
from pipelines.dali import (
    DaliTwoViewLoader,
    crop_boxes,
    dali_available,
    draw_view,
    sample_uniforms,
)
from pipelines.datasets import ImageFolder
from pipelines.resident import ResidentTwoViewLoader, draw_params
from pipelines.torch_loader import TwoViewLoader, epoch_permutation, sample_rng

try:
    import fixtures_images as fx
except ImportError:  # tests/ is a package
    from tests import fixtures_images as fx

DALI_OK, DALI_REASON = dali_available()
requires_dali = pytest.mark.skipif(not DALI_OK, reason=DALI_REASON)
LOADERS = ("torch", pytest.param("dali", marks=requires_dali), "resident")

# What distinguishes the recipes (the table in the module docstring).
EXPECTED = {
    "sim": dict(scale=0.08, interpolation="bicubic", blur=(1.0, 0.1), solarize=(0.0, 0.2),
                saturation=0.2),
    "byol": dict(scale=0.08, interpolation="bicubic", blur=(1.0, 0.1), solarize=(0.0, 0.2),
                 saturation=0.2),
    "mocov2": dict(scale=0.2, interpolation="bilinear", blur=(0.5, 0.5), solarize=(0.0, 0.0),
                   saturation=0.4),
    "swav": dict(scale=0.14, interpolation="bilinear", blur=(0.5, 0.5), solarize=(0.0, 0.0),
                 saturation=0.8),
}
SEED = 5
N_IMAGES = 24
EPOCHS = 12       # 288 samples per view and loader
S = 12


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Small batched ops on a shared machine: one thread is faster than a spinning team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def square_ish(tmp_path_factory):
    """Noise PNGs 48..64 px a side (aspect within the crop's 3/4..4/3), so the crop sampler never
    needs its centre-crop fallback below the recipe's minimum scale."""
    root = tmp_path_factory.mktemp("square_ish")
    rng = np.random.default_rng(3)
    for k in range(N_IMAGES):
        h, w = (int(v) for v in rng.integers(48, 65, size=2))
        fx.noise_image(700 + k, h, w).save(root / f"q{k:02d}.png")
    return root


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """Noise PNGs 18..27 px a side: every crop is upscaled to the 32-px view, where bilinear and
    bicubic differ by ~10 levels on noise and no loader's antialiasing comes into play."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    for k in range(16):
        h, w = (int(v) for v in rng.integers(18, 28, size=2))
        fx.noise_image(300 + k, h, w).save(root / f"s{k:02d}.png")
    return root


# ----------------------------------------------------------------------------- the recipes

def test_recipe_names_and_one_line_error():
    assert AUGMENTATIONS == ("sim", "byol", "mocov2", "swav")
    with pytest.raises(ValueError, match=r"^unknown augmentation 'simclr': use one of sim, byol, "
                                         r"mocov2, swav$"):
        augment_recipe("simclr", 32)
    for name in AUGMENTATIONS:
        assert "\n" not in augmentation_source(name) and augmentation_source(name)


def test_sim_is_todays_recipe_and_byol_the_same_table():
    assert augment_recipe("sim") == recipe_augment() == TwoViewAugment()
    for kw in (dict(size=32, blur=False), dict(size=64, scale=(0.3, 1.0), ratio=(0.5, 2.0)),
               dict(size=48, interpolation="bilinear")):
        assert augment_recipe("sim", **kw) == recipe_augment(**kw)
        assert augment_recipe("byol", **kw) == recipe_augment(**kw)
    byol = augment_recipe("byol", 224)
    v1, v2 = byol.view1, byol.view2
    assert (v1.scale, v1.ratio, v1.interpolation) == ((0.08, 1.0), (3 / 4, 4 / 3), "bicubic")
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (v1.jitter_p, v1.grayscale_p, v1.flip_p, v1.blur_sigma) == (0.8, 0.2, 0.5, (0.1, 2.0))
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert dataclasses.replace(v2, blur_p=1.0, solarize_p=0.0) == v1


def test_mocov2_recipe():
    pair = augment_recipe("mocov2", 224)
    assert pair.view1 == pair.view2      # both views from one distribution
    v = pair.view1
    assert (v.size, v.scale, v.ratio, v.interpolation) == (224, (0.2, 1.0), (3 / 4, 4 / 3),
                                                           "bilinear")
    assert (v.brightness, v.contrast, v.saturation, v.hue, v.jitter_p) == (0.4, 0.4, 0.4, 0.1,
                                                                           0.8)
    assert (v.grayscale_p, v.blur_p, v.blur_sigma, v.flip_p, v.solarize_p) == (0.2, 0.5,
                                                                               (0.1, 2.0), 0.5,
                                                                               0.0)
    assert v.normalize and v.mean == (0.485, 0.456, 0.406)


def test_overrides_blur_off_and_colour_off():
    for name in AUGMENTATIONS:
        default = augment_recipe(name, 32)
        custom = augment_recipe(name, 32, scale=(0.5, 0.9), ratio=(0.5, 2.0),
                                interpolation="nearest")
        for v, ref in zip((custom.view1, custom.view2), (default.view1, default.view2)):
            assert (v.scale, v.ratio, v.interpolation) == ((0.5, 0.9), (0.5, 2.0), "nearest")
            assert dataclasses.replace(v, scale=ref.scale, ratio=ref.ratio,
                                       interpolation=ref.interpolation) == ref
        no_blur = augment_recipe(name, 32, blur=False)
        assert no_blur.view1.blur_p == no_blur.view2.blur_p == 0.0
        assert no_blur.view1 == dataclasses.replace(default.view1, blur_p=0.0)
        assert no_blur.view2 == dataclasses.replace(default.view2, blur_p=0.0)
        plain = augment_recipe(name, 32, colour=False)
        assert plain == default.geometry_only() and not plain.view2.has_colour
        with pytest.raises(ValueError, match="^unknown interpolation"):
            augment_recipe(name, 32, interpolation="cubic")


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_recipe_draws_follow_the_table(name):
    """The PyTorch augmentation's own parameter draws (the reference the loaders follow)."""
    aug, want = augment_recipe(name, 224), EXPECTED[name]
    rng = random.Random(0)
    draws = [aug.sample_params(300, 400, rng) for _ in range(3000)]
    for v in range(2):
        ps = [d[v] for d in draws]
        area = np.array([p.box[2] * p.box[3] / (300 * 400) for p in ps])
        assert want["scale"] - 0.01 < area.min() < want["scale"] + 0.02 and area.max() > 0.95
        assert abs(np.mean([p.blur_sigma is not None for p in ps]) - want["blur"][v]) < 0.04
        assert abs(np.mean([p.solarize for p in ps]) - want["solarize"][v]) < 0.04
        sat = np.array([p.jitter.saturation for p in ps if p.jitter is not None])
        assert 1 - want["saturation"] <= sat.min() < 1 - want["saturation"] + 0.01
        assert 1 + want["saturation"] - 0.01 < sat.max() <= 1 + want["saturation"]


# ----------------------------------------------------------------------------- each loader

class Draws:
    """Per sample and view, what one loader did: boxes (N, 2, 4), sizes (N, 2), flips, and the
    colour decisions blur / solarize / jitter / grayscale (N, 2) bool, sigma and saturation
    (N, 2) float (NaN where the step was not applied)."""

    def __init__(self):
        self.rows: dict[str, list] = {k: [] for k in ("boxes", "sizes", "flips", "blur", "sigma",
                                                      "solarize", "jitter", "grayscale",
                                                      "saturation", "index")}

    def add(self, **cols):
        for k, v in cols.items():
            self.rows[k].append(np.asarray(v))

    def done(self):
        for k, v in self.rows.items():
            setattr(self, k, np.concatenate(v))
        return self


def _positions(batch, batch_size):
    k = batch["batch_index"]
    return np.arange(k * batch_size, k * batch_size + len(batch["index"]))


def _torch_draws(folder, aug, batch_size):
    loader = TwoViewLoader(ImageFolder(str(folder)), aug, batch_size=batch_size, seed=SEED)
    out = Draws()
    for epoch in range(EPOCHS):
        for batch in loader.epoch_batches(epoch):
            for i, pos in enumerate(_positions(batch, batch_size)):
                h, w = batch["image_size"][i].tolist()
                params = loader.augment.sample_params(h, w, sample_rng(SEED, epoch, int(pos)))
                assert [list(p.box) for p in params] == batch["boxes"][i].tolist()
                assert [p.flip for p in params] == batch["flips"][i].tolist()
                nan = float("nan")
                out.add(boxes=batch["boxes"][i:i + 1].numpy(), sizes=[[h, w]],
                        flips=batch["flips"][i:i + 1].numpy(), index=batch["index"][i:i + 1],
                        blur=[[p.blur_sigma is not None for p in params]],
                        sigma=[[nan if p.blur_sigma is None else p.blur_sigma for p in params]],
                        solarize=[[p.solarize for p in params]],
                        jitter=[[p.jitter is not None for p in params]],
                        grayscale=[[p.grayscale for p in params]],
                        saturation=[[nan if p.jitter is None else p.jitter.saturation
                                     for p in params]])
    return out.done(), loader


def _dali_draws(folder, aug, batch_size):
    loader = DaliTwoViewLoader(folder, aug, batch_size=batch_size, seed=SEED, threads=1)
    out = Draws()
    for batch in itertools.islice(loader.stream(), EPOCHS * loader.batches_per_epoch):
        u = sample_uniforms(SEED, batch["epoch"], _positions(batch, batch_size))
        sizes = batch["image_size"].numpy()
        cols = {k: [] for k in ("blur", "sigma", "solarize", "jitter", "grayscale",
                                "saturation")}
        for v, view in enumerate((loader.augment.view1, loader.augment.view2)):
            box = crop_boxes(sizes[:, 0], sizes[:, 1], u[:, v], view.scale, view.ratio)
            d = draw_view(view, u[:, v])
            np.testing.assert_array_equal(box, batch["boxes"][:, v].numpy())
            np.testing.assert_array_equal(d.flip, batch["flips"][:, v].numpy())
            cols["blur"].append(d.blur)
            cols["sigma"].append(np.where(d.blur, d.sigma, np.nan))
            cols["solarize"].append(d.solarize)
            cols["jitter"].append(d.jitter)
            cols["grayscale"].append(d.grayscale)
            cols["saturation"].append(np.where(d.jitter, d.factors[:, 2], np.nan))
        out.add(boxes=batch["boxes"].numpy(), sizes=sizes, flips=batch["flips"].numpy(),
                index=batch["index"].numpy(), **{k: np.stack(v, 1) for k, v in cols.items()})
    return out.done(), loader


def _resident_draws(folder, aug, batch_size):
    loader = ResidentTwoViewLoader(ImageFolder(str(folder)), aug, batch_size=batch_size,
                                   seed=SEED, device="cpu", workers=1)
    out = Draws()
    for epoch in range(EPOCHS):
        plan = loader.epoch_plan(epoch)
        for batch in loader.epoch_batches(epoch):
            pos = _positions(batch, batch_size)
            hw = batch["image_size"].to(loader.renderer.dtype)
            p = draw_params(plan.uniforms[pos[0]:pos[-1] + 1], hw[:, 0], hw[:, 1],
                            loader.renderer.consts)
            assert torch.equal(p.boxes.float(), batch["boxes"])
            assert torch.equal(p.flips, batch["flips"])
            blurred = p.blur_sigma > 0
            out.add(boxes=batch["boxes"].numpy(), sizes=batch["image_size"].numpy(),
                    flips=batch["flips"].numpy(), index=batch["index"].numpy(),
                    blur=blurred.numpy(),
                    sigma=torch.where(blurred, p.blur_sigma, float("nan")).numpy(),
                    solarize=p.solarize.numpy(), jitter=p.jitter.numpy(),
                    grayscale=p.grayscale.numpy(),
                    saturation=torch.where(p.jitter, p.factors[..., 2], float("nan")).numpy())
    return out.done(), loader


DRAWS = {"torch": _torch_draws, "dali": _dali_draws, "resident": _resident_draws}


def _rate(mask):
    return float(np.mean(mask))


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_loader_honours_the_recipe(square_ish, kind, name):
    """Crop-scale range of the returned boxes, blur and solarize rates per view, the blur σ and
    saturation ranges, flip / jitter / grayscale rates: what the loader did for 288 samples per
    view. Rate tolerances are ≥ 3.4 standard errors at n = 288 (the draws are seeded, so the test
    is deterministic; the tolerances only say how far a correct loader may land)."""
    want = EXPECTED[name]
    aug = augment_recipe(name, S)
    d, loader = DRAWS[kind](square_ish, aug, batch_size=8)
    assert d.boxes.shape == (EPOCHS * N_IMAGES, 2, 4)
    y, x, h, w = np.moveaxis(d.boxes, -1, 0)
    height, width = d.sizes[:, None, 0], d.sizes[:, None, 1]
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
    # w = round(√(s·A·a)), h = round(√(s·A/a)), so (h + ½)(w + ½) ≥ s·A ≥ min scale · A
    assert ((h + 0.5) * (w + 0.5) / (height * width) >= want["scale"]).all()
    area = h * w / (height * width)
    assert area.max() > 0.9
    if want["scale"] in (0.14, 0.2):
        assert area.min() < want["scale"] + 0.06       # the range starts at 0.14 / 0.2 ...
    else:
        assert area.min() < 0.12 and _rate(area < 0.2) > 0.05   # ... or well below it
    for v in range(2):
        assert abs(_rate(d.blur[:, v]) - want["blur"][v]) < (0.06 if want["blur"][v] != 0.5
                                                             else 0.1), (v, _rate(d.blur[:, v]))
        if want["solarize"][v] == 0:
            assert not d.solarize[:, v].any()
        else:
            assert abs(_rate(d.solarize[:, v]) - want["solarize"][v]) < 0.08
        sigma = d.sigma[:, v][d.blur[:, v]]
        assert 0.1 <= sigma.min() < 0.3 and 1.8 < sigma.max() <= 2.0
        sat = d.saturation[:, v][d.jitter[:, v]]
        s = want["saturation"]
        assert 1 - s <= sat.min() < 1 - s + 0.05 and 1 + s - 0.05 < sat.max() <= 1 + s
        assert abs(_rate(d.jitter[:, v]) - 0.8) < 0.08
        assert abs(_rate(d.grayscale[:, v]) - 0.2) < 0.08
        assert abs(_rate(d.flips[:, v]) - 0.5) < 0.1
    # the loader's static set-up agrees: which steps exist at all, and how it resamples
    if kind == "dali":
        specs = loader._specs
        assert [sp.solarize for sp in specs] == [False, want["solarize"][1] > 0]
        assert all(sp.blur for sp in specs)
        assert {sp.interp for sp in specs} == {"INTERP_LINEAR" if want["interpolation"] ==
                                               "bilinear" else "INTERP_CUBIC"}
    elif kind == "resident":
        assert loader.renderer.modes == (want["interpolation"],) * 2
        assert loader.renderer.any_solarize == (want["solarize"][1] > 0)
    # every loader visits the torch loader's order (epoch_permutation), whatever the recipe
    order = [epoch_permutation(N_IMAGES, SEED, e).tolist() for e in range(EPOCHS)]
    assert d.index.tolist() == [i for epoch in order for i in epoch]


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("name", ["sim", "mocov2"])   # byol's pixels are sim's
def test_loader_resamples_with_the_recipes_interpolation(small_images, kind, name):
    """Colour off, each view against Pillow's crop_resize of its returned box (mirrored where
    flipped) under bilinear and bicubic: the recipe's interpolation is at least 2× closer.
    Measured mean absolute differences (levels): own ≤ 0.5 (torch 0, DALI 0.3-0.5, resident
    bilinear 0.3), resident bicubic 4.0 (PyTorch's a = −0.75 against Pillow's −0.5); the other
    interpolation ≥ 9."""
    own = EXPECTED[name]["interpolation"]
    other = "bicubic" if own == "bilinear" else "bilinear"
    aug = augment_recipe(name, 32, normalize=False, colour=False)
    folder = small_images
    dataset = ImageFolder(str(folder))
    if kind == "torch":
        loader = TwoViewLoader(dataset, aug, batch_size=16, seed=SEED)
    elif kind == "dali":
        loader = DaliTwoViewLoader(folder, aug, batch_size=16, seed=SEED, threads=1)
    else:
        loader = ResidentTwoViewLoader(dataset, aug, batch_size=16, seed=SEED, device="cpu",
                                       workers=1)
    (batch,) = list(loader.epoch_batches(0))
    diffs = {own: [], other: []}
    for i in range(16):
        image = dataset.load(int(batch["index"][i]))
        for v in range(2):
            view = batch[f"view{v + 1}"][i].permute(1, 2, 0).double().numpy() * 255
            if batch["flips"][i, v]:
                view = view[:, ::-1]
            box = tuple(int(b) for b in batch["boxes"][i, v].tolist())
            for interp in diffs:
                ref = np.asarray(crop_resize(image, box, 32, interp), dtype=np.float64)
                diffs[interp].append(np.abs(view - ref).mean())
    mine, theirs = np.array(diffs[own]), np.array(diffs[other])
    assert (mine < 0.5 * theirs).all(), (mine.max(), theirs.min())
    assert mine.max() < (1.0 if own == "bilinear" else 5.0) and theirs.min() > 6.0


@pytest.mark.parametrize("kind", LOADERS)
def test_colour_off_keeps_each_recipes_geometry(square_ish, kind):
    """Within a loader, a recipe with colour off draws the same boxes and flips for a seed (what
    every loader guarantees for SIM), and byol gives sim's batches bit for bit."""
    dataset = ImageFolder(str(square_ish))

    def batches(aug):
        if kind == "torch":
            loader = TwoViewLoader(dataset, aug, batch_size=8, seed=SEED)
        elif kind == "dali":
            loader = DaliTwoViewLoader(square_ish, aug, batch_size=8, seed=SEED, threads=1)
        else:
            loader = ResidentTwoViewLoader(dataset, aug, batch_size=8, seed=SEED, device="cpu",
                                           workers=1)
        return list(loader.epoch_batches(1))

    mocov2 = batches(augment_recipe("mocov2", S))
    for full, plain in zip(mocov2, batches(augment_recipe("mocov2", S, colour=False))):
        assert torch.equal(full["boxes"], plain["boxes"])
        assert torch.equal(full["flips"], plain["flips"])
        assert torch.equal(full["index"], plain["index"])
    fx.assert_same_batches(batches(augment_recipe("sim", S)), batches(augment_recipe("byol", S)))

