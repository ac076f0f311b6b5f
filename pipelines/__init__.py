"""Data pipelines: image sources, SIM two-view augmentation with crop geometry, and loaders.

`pipelines` imports no model code (DESIGN.md). The PyTorch loader is the CPU fallback and the
reference for the DALI pipeline; both yield the same batch dict (see `TwoViewLoader`).
"""
from .augment import (IMAGENET_MEAN, IMAGENET_STD, TwoViewAugment, ViewAugment, ViewParams,
                      crop_resize, random_resized_crop_box, recipe_augment)
from .datasets import (DataError, ImageFolder, Sample, SAMPLE_PHOTOS_DIR, decode_rgb,
                       resolve_source, sample_photos)
from .torch_loader import TwoViewLoader, epoch_permutation, sample_rng

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "TwoViewAugment", "ViewAugment", "ViewParams",
    "crop_resize", "random_resized_crop_box", "recipe_augment",
    "DataError", "ImageFolder", "Sample", "SAMPLE_PHOTOS_DIR", "decode_rgb", "resolve_source",
    "sample_photos",
    "TwoViewLoader", "epoch_permutation", "sample_rng",
]
