"""Image sources (pipelines/datasets.py): folder scanning, decoding, the embedded sample."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines import datasets
from pipelines.datasets import (SAMPLE_PHOTOS_DIR, DataError, ImageFolder, Sample, decode_rgb,
                                resolve_source, sample_photos)

try:
    import fixtures_images as fx
except ImportError:  # tests/ is a package
    from tests import fixtures_images as fx


@pytest.fixture()
def odd(tmp_path):
    return fx.write_odd_folder(tmp_path / "odd")


def _px(image, x, y):
    return image.getpixel((x, y))


def test_decode_policies(odd):
    gray = decode_rgb(odd / "gray.jpg")
    assert gray.mode == "RGB" and gray.size == (45, 37)
    arr = np.asarray(gray)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()

    cmyk = decode_rgb(odd / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.size == (33, 29)
    r, g, b = _px(cmyk, 16, 14)
    assert g < r and g < b  # magenta-heavy ink → little green

    rgba = decode_rgb(odd / "rgba.png")  # alpha composited on black
    assert _px(rgba, 0, 0) == (200, 100, 50) and _px(rgba, 23, 19) == (0, 0, 0)

    palette = decode_rgb(odd / "palette.png")  # transparent index 0 (red) → black
    assert _px(palette, 0, 0) == (0, 255, 0) and _px(palette, 25, 17) == (0, 0, 0)

    assert decode_rgb(odd / "one_px.png").getpixel((0, 0)) == (9, 99, 199)

    with Image.open(odd / "gray16.png") as raw:
        assert raw.mode.startswith("I")
    g16 = decode_rgb(odd / "gray16.png")  # 16-bit scaled to 8 (÷257), not clipped
    assert _px(g16, 0, 0) == (255, 255, 255) and _px(g16, 20, 0) == (128, 128, 128)

    for name in fx.ODD_BROKEN:
        with pytest.raises(Exception):
            decode_rgb(odd / name)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_more_modes(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0], la[:2, :, 1] = 180, 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = decode_rgb(tmp_path / "la.png")
    assert _px(img, 0, 0) == (180, 180, 180) and _px(img, 0, 3) == (0, 0, 0)

    Image.new("P", (3, 3), 7).save(tmp_path / "p.gif")
    assert decode_rgb(tmp_path / "p.gif").mode == "RGB"

    f = Image.fromarray(np.full((3, 3), 0.5, np.float32))
    f.save(tmp_path / "f.tif")
    assert _px(decode_rgb(tmp_path / "f.tif"), 1, 1) == (128, 128, 128)

    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "x.webp", lossless=True)
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "x.bmp")
    assert _px(decode_rgb(tmp_path / "x.bmp"), 0, 0) == (1, 2, 3)
    assert decode_rgb(tmp_path / "x.webp").size == (5, 4)


def test_getitem_substitutes_next_readable_image(odd):
    ds = ImageFolder(str(odd))
    names = [os.path.basename(p) for p in ds.paths]
    i = names.index("truncated.jpg")
    sample = ds[i]
    assert isinstance(sample, Sample) and sample.skipped[0] == str(odd / "truncated.jpg")
    assert sample.index == (i + len(sample.skipped)) % len(ds)
    assert names[sample.index] in fx.ODD_GOOD
    assert sample.image.mode == "RGB" and sample.label == 0
    good = ds[names.index("one_px.png")]
    assert good.skipped == () and good.image.size == (1, 1)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_scanning_does_not_decode(tmp_path, monkeypatch):
    root = fx.write_class_folder(tmp_path / "data")

    def no_open(*a, **k):
        raise AssertionError("decoded while scanning")
    monkeypatch.setattr(Image, "open", no_open)
    ds = ImageFolder(str(root))
    assert len(ds) == 12 and ds.classes == ["cat", "dog", "eel"]


def test_embedded_sample_photos():
    ds = sample_photos()
    assert ds.root == str(SAMPLE_PHOTOS_DIR)
    assert len(ds) == 47 and len(ds.classes) == 19 and ds.has_labels
    assert ds.other_files == 1  # the README
    assert (SAMPLE_PHOTOS_DIR / "README.md").is_file()
    total = sum(os.path.getsize(p) for p in ds.paths)
    assert total < 1_000_000
    for i in range(len(ds)):
        s = ds[i]
        assert s.skipped == () and min(s.image.size) == 96
    assert sorted(set(ds.labels)) == list(range(19))


def test_resolve_source(tmp_path):
    assert len(resolve_source(None)) == 47
    flat = fx.write_flat_folder(tmp_path / "flat", n=3)
    ds = resolve_source(str(flat))
    assert isinstance(ds, ImageFolder) and len(ds) == 3
    assert len(resolve_source(flat)) == 3  # a Path works too
    with pytest.raises(DataError):
        resolve_source(str(tmp_path / "missing"))
    assert issubclass(DataError, ValueError)
    assert datasets.IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif",
                                         ".tif", ".tiff")
