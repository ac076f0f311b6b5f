"""Data pipelines: image sources, SIM two-view augmentation with crop geometry, and loaders.

`pipelines` imports no model code (DESIGN.md). Three loaders yield the same batch dict (see
`TwoViewLoader`): the PyTorch loader (Pillow workers; the reference), `pipelines.dali`'s
`DaliTwoViewLoader` (NVIDIA DALI, GPU or CPU-only mode; DALI is imported only when it is built) and
`ResidentTwoViewLoader` (a folder decoded once and augmented on the device).
"""
from .augment import (IMAGENET_MEAN, IMAGENET_STD, TwoViewAugment, ViewAugment, ViewParams,
                      crop_resize, random_resized_crop_box, recipe_augment)
from .datasets import (DataError, ImageFolder, Sample, SAMPLE_PHOTOS_DIR, decode_rgb,
                       resolve_source, sample_photos)
from .resident import ResidentImages, ResidentTwoViewLoader
from .torch_loader import TwoViewLoader, epoch_permutation, sample_rng

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "TwoViewAugment", "ViewAugment", "ViewParams",
    "crop_resize", "random_resized_crop_box", "recipe_augment",
    "DataError", "ImageFolder", "Sample", "SAMPLE_PHOTOS_DIR", "decode_rgb", "resolve_source",
    "sample_photos",
    "TwoViewLoader", "epoch_permutation", "sample_rng", "ResidentImages", "ResidentTwoViewLoader",
]
