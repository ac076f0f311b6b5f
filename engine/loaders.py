"""Which pipeline feeds a run (`--loader`), and one log line saying what was chosen and why.

All three loaders yield the same batch dict (pipelines/torch_loader.py's docstring), visit an epoch in
the same order (`epoch_permutation(n, seed, epoch)`), shard a global batch over ranks the same way and
resume at (epoch, batch) exactly, so the trainer does not care which one it got:

  torch     Pillow in DataLoader worker processes (any folder, any machine; the reference).
  dali      NVIDIA DALI: ROI JPEG decode + augmentation on the GPU ("mixed"), or DALI's CPU-only
            mode on a machine without CUDA. Needs `pip install -e ".[dali]"`.
  resident  the whole folder decoded once into a uint8 tensor on the device, crops and colour done
            there in a handful of batched ops (small datasets: an epoch of Imagenette-128 in
            seconds). Refuses, with a one-line reason, a folder that does not fit its budget.
  auto      on a GPU with --fused: resident where the folder fits the device budget; else DALI
            where it is installed; else torch. On a CPU, or with --no-fused: torch (on a CPU the
            Pillow workers overlap augmentation with the step, which the in-process resident
            augmentation does not; and DALI's CPU mode measured slower than Pillow here,
            bench/test_pipeline.py).

What the loader makes follows the method's `views` (engine/methods/base.py ViewSpec): two views at
cfg.img_size with the recipe's crop scale, or (views.crops) a multi-crop with the recipe's colour
(`pipelines.augment.multicrop_augment`; "swav" is SwAV's), and proposals mapped into every view
when views.proposals > 0 (the (boxes, counts) pair passed as `proposals`).
"""
from __future__ import annotations

from typing import Any

import torch

from engine.presets import PretrainConfig
from pipelines.augment import augment_recipe, multicrop_augment
from pipelines.datasets import DataError, resolve_source
from pipelines.torch_loader import TwoViewLoader


def build_augment(cfg: PretrainConfig, views=None):
    """The augmentation a run's loader applies: the two-view recipe `cfg.augmentation` at
    cfg.img_size (crop scale cfg.crop_scale or the recipe's), or, when `views.crops` is non-empty,
    a MultiCropAugment of those crops (count, size, scale) with the recipe's colour (within each
    group the crops alternate the recipe's view 1 / view 2 colour; "swav" is SwAV's colour for
    every crop). ratio, blur and interpolation come from cfg either way."""
    if views is not None and views.crops:
        return multicrop_augment(cfg.augmentation, views.crops, ratio=cfg.crop_ratio,
                                 blur=cfg.blur, interpolation=cfg.interpolation)
    return augment_recipe(cfg.augmentation, cfg.img_size, scale=cfg.crop_scale,
                          ratio=cfg.crop_ratio, blur=cfg.blur, interpolation=cfg.interpolation)


def build_loader(cfg: PretrainConfig, data: str | None, device: torch.device, rank: int = 0,
                 world_size: int = 1, fused: bool = True, views=None,
                 proposals=None) -> tuple[Any, str]:
    """(loader, one log line) for `cfg.loader`; raises DataError with a one-line reason when the
    loader asked for explicitly cannot run here. `auto` with `fused=False` (`--no-fused`, the
    reference path) is the torch loader.

    views: the method's ViewSpec (engine/methods/base.py), None for the two-view default; a
    non-empty `views.crops` makes multi-crop batches (`build_augment`). proposals: (boxes (N, P,
    4), counts (N,)) by dataset index (`pipelines.proposals.load_proposals(cache, dataset,
    top=views.proposals)`), forwarded to the loader, which maps them into every view; a one-line
    DataError when views.proposals > 0 and none are given."""
    dataset = resolve_source(data)
    augment = build_augment(cfg, views)
    wanted = 0 if views is None else int(getattr(views, "proposals", 0) or 0)
    if wanted > 0 and proposals is None:
        raise DataError(f"method {cfg.method} needs region proposals ({wanted} per image): pass "
                        f"the cached proposals (python -m engine.proposals) to the loader")
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                  proposals=proposals)
    kind, notes = cfg.loader, []
    if kind == "auto" and not _auto_prefers_fast_loaders(device, fused):
        kind = "torch"

    if kind in ("auto", "resident"):
        from pipelines.resident import ResidentBudgetError, ResidentTwoViewLoader
        try:
            loader = ResidentTwoViewLoader(dataset, augment, device=device, workers=cfg.workers,
                                           **common)
            return loader, f"data: resident loader ({loader.describe()})"
        except ResidentBudgetError as exc:
            if kind == "resident":
                raise
            notes.append(f"not resident: {exc}")
        kind = "dali" if _dali_ready() else "torch"
        if kind == "torch":
            notes.append(f"not DALI: {_dali_reason()}")

    if kind == "dali":
        from pipelines.dali import DaliTwoViewLoader, dali_available
        ok, reason = dali_available()
        if not ok:
            raise DataError(f"--loader dali: {reason}")
        loader = DaliTwoViewLoader(dataset, augment, device=device, threads=max(1, cfg.workers),
                                   **common)
        mode = "GPU (mixed decode)" if device.type == "cuda" else "CPU-only mode"
        return loader, _line(f"data: DALI loader, {mode}", notes)

    loader = TwoViewLoader(dataset, augment, workers=cfg.workers,
                           pin_memory=device.type == "cuda", **common)
    return loader, _line(f"data: torch loader ({cfg.workers} Pillow worker processes)", notes)


def _auto_prefers_fast_loaders(device: torch.device, fused: bool) -> bool:
    return fused and device.type == "cuda"


def _dali_ready() -> bool:
    from pipelines.dali import dali_available
    return dali_available()[0]


def _dali_reason() -> str:
    from pipelines.dali import dali_available
    return dali_available()[1] or "available"


def _line(head: str, notes: list[str]) -> str:
    return head + ("" if not notes else " — " + "; ".join(notes))
