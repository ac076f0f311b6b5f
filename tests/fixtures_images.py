"""Synthetic image folders for the pipeline tests (plain helpers, imported by the test modules).

Everything is written to a directory the caller owns (pytest's tmp_path), in milliseconds.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# Coordinate-encoding image: R = round(RAMP_ROW · row), G = round(RAMP_COL · col), B constant.
# PNG, so lossless. Odd sizes on purpose.
RAMP_H, RAMP_W = 97, 123
RAMP_ROW, RAMP_COL = 2.5, 2.0
RAMP_BLUE = 77


def coordinate_image(height: int = RAMP_H, width: int = RAMP_W) -> Image.Image:
    rows = np.arange(height, dtype=np.float64)[:, None] * np.ones((1, width))
    cols = np.ones((height, 1)) * np.arange(width, dtype=np.float64)[None, :]
    rgb = np.stack([np.round(RAMP_ROW * rows), np.round(RAMP_COL * cols),
                    np.full((height, width), RAMP_BLUE)], axis=-1)
    assert rgb.max() <= 255
    return Image.fromarray(rgb.astype(np.uint8))


def write_coordinate_folder(root: Path) -> Path:
    """A flat folder holding one coordinate image `ramp.png`."""
    root.mkdir(parents=True, exist_ok=True)
    coordinate_image().save(root / "ramp.png")
    return root


def noise_image(seed: int, height: int, width: int) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def write_class_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4,
                       size: tuple[int, int] = (40, 52)) -> Path:
    """root/<class>/<k>.png with random-noise images of varied sizes; returns root."""
    seed = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            h, w = size[0] + 3 * k, size[1] - 2 * k
            noise_image(seed, h, w).save(root / c / f"{k}.png")
            seed += 1
    return root


def write_flat_folder(root: Path, n: int = 5, ext: str = "png") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        noise_image(100 + k, 30 + k, 41 - k).save(root / f"img{k}.{ext}")
    return root


def _jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


# Names in the odd folder; BROKEN ones cannot be decoded.
ODD_GOOD = ("gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "one_px.png", "gray16.png")
ODD_BROKEN = ("truncated.jpg", "zero_bytes.jpg")
ODD_OTHER = ("notes.txt",)


def write_odd_folder(root: Path) -> Path:
    """A flat folder with every awkward kind of file the loader must survive."""
    root.mkdir(parents=True, exist_ok=True)
    noise_image(1, 37, 45).convert("L").save(root / "gray.jpg", quality=90)
    Image.new("CMYK", (33, 29), (10, 200, 30, 40)).save(root / "cmyk.jpg", quality=90)
    rgba = np.zeros((20, 24, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[:, :12, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(rgba).save(root / "rgba.png")
    palette = Image.new("P", (26, 18), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    palette.paste(1, (0, 0, 13, 18))
    palette.save(root / "palette.png", transparency=0)  # index 0 (red) is transparent
    Image.new("RGB", (1, 1), (9, 99, 199)).save(root / "one_px.png")
    gray16 = np.full((16, 21), 32768, dtype=np.uint16)
    gray16[:, :10] = 65535
    Image.fromarray(gray16).save(root / "gray16.png")  # mode I;16
    good = _jpeg_bytes(noise_image(2, 64, 64), quality=90)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "zero_bytes.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    return root


def write_broken_folder(root: Path, n: int = 3) -> Path:
    """Only undecodable .jpg files."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (root / f"bad{k}.jpg").write_bytes(b"\xff\xd8\xff garbage" * k)
    return root


def write_coordinate_sizes(root: Path, sizes=((RAMP_H, RAMP_W), (64, 80), (103, 41),
                                                (20, 128))) -> Path:
    """A flat folder of coordinate images `ramp<k>.png` of the given (height, width) sizes (each
    at most 103 × 128, so the ramps stay within 0..255)."""
    root.mkdir(parents=True, exist_ok=True)
    for k, (height, width) in enumerate(sizes):
        coordinate_image(height, width).save(root / f"ramp{k}.png")
    return root


# ----------------------------------------------------------------------------- DALI loader tests

def write_coordinate_jpeg_folder(root: Path, quality: int = 95) -> Path:
    """A flat folder holding the coordinate image as `ramp.jpg` (no chroma subsampling)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ramp.jpg").write_bytes(_jpeg_bytes(coordinate_image(), quality=quality,
                                                subsampling=0))
    return root


def corrupt_jpeg_bytes(seed: int = 3) -> bytes:
    """A JPEG whose headers and end marker are intact but whose entropy-coded data is garbage:
    nothing short of decoding finds out, and then Pillow and DALI both fail."""
    data = bytearray(_jpeg_bytes(noise_image(seed, 64, 64), quality=90))
    middle = len(data) // 2
    data[300:middle] = bytes([0xAB]) * (middle - 300)
    return bytes(data)


def bogus_segment_jpeg_bytes(seed: int = 4) -> bytes:
    """A JPEG with an extra segment whose length field is wrong: Pillow still decodes it, DALI's
    JPEG parser rejects it."""
    good = _jpeg_bytes(noise_image(seed, 48, 40), quality=90)
    return good[:2] + b"\xff\xe0\x00\x10garbage-garbage" + good[2:]


def write_size_variety_folder(root: Path, n: int = 64, seed: int = 0) -> Path:
    """n small noise PNGs of varied sizes and aspect ratios (tall, wide, square), flat."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(12, 90, size=2))
        noise_image(1000 + k, h, w).save(root / f"v{k:03d}.png")
    return root


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """Two lists of loader batches are identical: same keys, dtypes and bits, equal non-tensors."""
    import torch

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
            else:
                assert x[k] == y[k]
