"""Image sources for pre-training: a folder of images, and the photos embedded in the package.

Policies (the engine and the README rely on them):

* **Layout.** `root/<class>/.../img.ext` gives label = index of `<class>` in the sorted class names
  (as torchvision's ImageFolder; files below a class folder are found recursively). A folder with
  no image-holding sub-folder is *flat*: every image gets label 0 and `has_labels` is False. In the
  class layout, images lying loose in `root` itself are not used; they are counted in
  `loose_images`. Hidden files and folders (name starting with ".") are ignored.
* **What is an image.** By extension, case-insensitive: .jpg .jpeg .png .bmp .webp .gif .tif .tiff.
  Other files are ignored and counted in `other_files`. Nothing is decoded while scanning.
* **Decoding.** Pillow, always to 8-bit RGB. Grayscale, CMYK, YCbCr, ... are converted; images
  with transparency (RGBA, LA, PA, palette or L/RGB with a transparent colour) are **composited
  on black** (a fully transparent pixel becomes black whatever colour it hides). 16-bit images
  are scaled to 8 bits (÷257; also 32-bit integer images whose maximum exceeds 255); float images
  are taken as 0..1 if their maximum is ≤ 1, else 0..255. EXIF orientation is **not** applied (as
  in torchvision's ImageFolder): crop boxes are in the pixel grid as stored. Only the first frame
  of a GIF / multi-page TIFF is used.
* **Broken files.** Truncated images are not accepted (`ImageFile.LOAD_TRUNCATED_IMAGES` is never
  touched). `dataset[i]` catches a file that fails to decode, records its path, and uses the next
  index `(i+1) % n` instead, up to 16 tries; then it raises `DataError`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SAMPLE_PHOTOS_DIR = Path(__file__).resolve().parent / "sample_photos"
MAX_DECODE_TRIES = 16

_DATA_HINT = "point --data at a folder of images, either class/img.jpg or flat"


class DataError(ValueError):
    """The data cannot be used as given; the one-line message says what to do about it."""


class Sample(NamedTuple):
    """One decoded image: `index` is the dataset index actually used (after any substitution),
    `skipped` the paths that failed to decode on the way to it (usually empty)."""
    image: Image.Image
    label: int
    index: int
    skipped: tuple[str, ...]


def decode_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image (policies in the module docstring).

    Raises whatever Pillow raises for an unreadable, truncated or unsupported file.
    """
    with Image.open(path) as img:
        img.load()
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        if "transparency" not in img.info:
            return img.copy()
        return _composite_on_black(img.convert("RGBA"))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            mode in ("P", "L") and "transparency" in img.info):
        return _composite_on_black(img.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    return img.convert("RGB")


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.ndim == 3:  # a multi-channel 16-bit mode Pillow exposes as an array
        arr = arr[..., :3]
    arr = arr.astype(np.float64)
    if img.mode == "F":
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr / 257.0
    gray = np.clip(np.nan_to_num(arr) + 0.5, 0, 255).astype(np.uint8)
    if gray.ndim == 3:
        return Image.fromarray(gray)
    return Image.fromarray(gray).convert("RGB")


@dataclass
class ImageFolder:
    """The images under `root` (layout and decoding policies in the module docstring).

    `dataset[i]` -> `Sample(image (PIL RGB), label, index, skipped)`; `len(dataset)` images.
    Construction only lists files; raises `DataError` for a missing folder, a file, or no images.
    """
    root: str
    paths: list[str] = field(init=False, repr=False)
    labels: list[int] = field(init=False, repr=False)
    classes: list[str] = field(init=False)
    has_labels: bool = field(init=False)
    other_files: int = field(init=False)
    loose_images: int = field(init=False)

    def __post_init__(self):
        self.root = os.path.abspath(os.path.expanduser(os.fspath(self.root)))
        root = self.root
        if not os.path.exists(root):
            raise DataError(f"data folder {root} does not exist: {_DATA_HINT}")
        if not os.path.isdir(root):
            raise DataError(f"{root} is a file, not a folder: {_DATA_HINT}")
        try:
            top_images, top_other, subdirs = _list_dir(root)
        except OSError as err:
            raise DataError(f"cannot read folder {root} ({err.strerror or err}): "
                            f"check its permissions, or {_DATA_HINT}") from None
        other = top_other
        per_class: list[tuple[str, list[str]]] = []
        for name, path in subdirs:
            images, n_other = _walk_images(path)
            other += n_other
            if images:
                per_class.append((name, images))
        self.paths, self.labels = [], []
        if per_class:
            self.classes = [name for name, _ in per_class]
            self.has_labels = True
            self.loose_images = len(top_images)
            for label, (_, images) in enumerate(per_class):
                self.paths += images
                self.labels += [label] * len(images)
        else:
            self.classes = []
            self.has_labels = False
            self.loose_images = 0
            self.paths = top_images
            self.labels = [0] * len(top_images)
        self.other_files = other
        if not self.paths:
            looked = ", ".join(IMAGE_EXTENSIONS)
            found = f"found {other} other file{'s' if other != 1 else ''}"
            raise DataError(f"no images found in {root} (looked for {looked}; {found}): "
                            f"{_DATA_HINT}")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Decode image `index` to RGB; raises on a broken file (no substitution)."""
        return decode_rgb(self.paths[index])

    def __getitem__(self, index: int) -> Sample:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        skipped: list[str] = []
        for attempt in range(min(MAX_DECODE_TRIES, n)):
            i = (index + attempt) % n
            try:
                with warnings.catch_warnings():
                    # Pillow's warnings about odd-but-decodable files are not actionable here.
                    warnings.simplefilter("ignore", UserWarning)
                    image = self.load(i)
            except Exception:  # noqa: BLE001 - any decode failure means "skip this file"
                skipped.append(self.paths[i])
                continue
            return Sample(image, self.labels[i], i, tuple(skipped))
        raise DataError(f"too many unreadable images near {self.paths[index]} "
                        f"({len(skipped)} in a row failed to decode): check the folder {self.root}")

    def describe(self) -> str:
        """One line for the log: what was found and what was ignored."""
        n = len(self.paths)
        n_cls = len(self.classes)
        layout = (f"{n_cls} class folder{'s' if n_cls != 1 else ''}" if self.has_labels
                  else "flat folder, no labels")
        notes = []
        if self.other_files:
            notes.append(f"ignored {self.other_files} non-image file"
                         f"{'s' if self.other_files != 1 else ''}")
        if self.loose_images:
            notes.append(f"ignored {self.loose_images} image"
                         f"{'s' if self.loose_images != 1 else ''} outside the class folders")
        extra = f"; {', '.join(notes)}" if notes else ""
        return f"{n} images in {self.root} ({layout}{extra})"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_dir(path: str) -> tuple[list[str], int, list[tuple[str, str]]]:
    """Sorted (image files, count of other files, (name, path) of sub-folders) of one folder."""
    images, subdirs, other = [], [], 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError:
                other += 1
                continue
            if is_dir:
                subdirs.append((entry.name, entry.path))
            elif is_file and _is_image(entry.name):
                images.append(entry.path)
            else:
                other += 1
    images.sort()
    subdirs.sort()
    return images, other, subdirs


def _walk_images(top: str) -> tuple[list[str], int]:
    """All image files below `top` (sorted, following links once), and the count of others."""
    images, other = [], 0
    seen = set()
    stack = [top]
    while stack:
        path = stack.pop()
        real = os.path.realpath(path)
        if real in seen:  # a symlink cycle
            continue
        seen.add(real)
        try:
            found, n_other, subdirs = _list_dir(path)
        except OSError:
            continue
        images += found
        other += n_other
        stack += [p for _, p in reversed(subdirs)]
    images.sort()
    return images, other


def sample_photos() -> ImageFolder:
    """The 47 embedded photos (19 label folders, short side 96 px; see sample_photos/README.md)."""
    return ImageFolder(str(SAMPLE_PHOTOS_DIR))


def resolve_source(data: str | os.PathLike | None) -> ImageFolder:
    """`None` (no --data) -> the embedded sample photos; a path -> `ImageFolder(path)`."""
    if data is None:
        return sample_photos()
    return ImageFolder(os.fspath(data))
