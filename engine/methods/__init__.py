"""The objectives, one file each, and the registry the trainer and the CLI pick them from.

    sim        Siamese Image Modeling (Tao et al., CVPR 2023): masked ViT, UniGrad loss
    mocov2     MoCo v2 (Chen et al., 2020): the instance baseline every dense paper compares against
    densecl    DenseCL (Wang et al., CVPR 2021): global + dense InfoNCE, feature correspondence
    pixpro     PixPro (Xie et al., CVPR 2021): pixel propagation, geometric positive pairs
    densesiam  DenseSiam (Zhang et al., ECCV 2022): SimSiam on pixels and regions of the overlap
    lcloss     LC-loss (Islam et al., WACV 2023): BYOL + pixel InfoNCE at exact correspondences
    swav       SwAV (Caron et al., NeurIPS 2020): multi-crop swapped prediction of Sinkhorn codes
    regioncl   RegionCL-M (Xu et al., 2021): MoCo v2 + region swapping, canvas and paste contrast
    detco      DetCo (Xie et al., ICCV 2021): multi-level global/local (3x3 jigsaw) contrast
    ccop       CCOP (Yang et al., 2021): R50-FPN RoI contrast on selective-search boxes
    scfs       SCFS (Song et al., ICCV 2023): semantics-consistent feature search
    detreg     DETReg (Bar et al., CVPR 2022): Deformable DETR finding selective-search proposals
               and predicting their frozen SwAV embeddings
    updetr     UP-DETR (Dai et al., CVPR 2021): DETR detecting random query patches of its image,
               with the patches' frozen-CNN features as query inputs and reconstruction targets
    pairdetr   Pair DETR (Iranmanesh et al., 2022), label-free: centre and corner decoders whose
               query pairs find selective-search proposals, pair-association InfoNCE

Each module defines one `Method` subclass (engine/methods/base.py has the contract); the modules
are imported on first use, so listing the methods costs nothing.
"""
from __future__ import annotations

import importlib

from engine.methods.base import CropSpec, Method, StepContext, ViewSpec
from engine.presets import ConfigError, PretrainConfig

METHODS = {
    "sim": ("engine.methods.sim", "SIM"),
    "mocov2": ("engine.methods.mocov2", "MoCoV2"),
    "densecl": ("engine.methods.densecl", "DenseCL"),
    "pixpro": ("engine.methods.pixpro", "PixPro"),
    "densesiam": ("engine.methods.densesiam", "DenseSiam"),
    "lcloss": ("engine.methods.lcloss", "LCLoss"),
    "swav": ("engine.methods.swav", "SwAV"),
    "regioncl": ("engine.methods.regioncl", "RegionCL"),
    "detco": ("engine.methods.detco", "DetCo"),
    "ccop": ("engine.methods.ccop", "CCOP"),
    "scfs": ("engine.methods.scfs", "SCFS"),
    "detreg": ("engine.methods.detreg", "DETReg"),
    "updetr": ("engine.methods.updetr", "UPDETR"),
    "pairdetr": ("engine.methods.pairdetr", "PairDETR"),
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(module), cls)


def build_method(cfg: PretrainConfig) -> Method:
    """The method of `cfg` with its networks initialised (the caller seeds torch first)."""
    return method_class(cfg.method)(cfg)


def check_method_config(cfg: PretrainConfig) -> None:
    """One-line ConfigError if `cfg` cannot run its method (unknown method, bad method_args)."""
    method_class(cfg.method).check_config(cfg)


__all__ = ["METHODS", "CropSpec", "Method", "StepContext", "ViewSpec", "build_method", "check_method_config",
           "method_class"]
