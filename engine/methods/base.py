"""The method contract: what one self-supervised objective offers the training loop.

A method is an `nn.Module` holding everything the objective trains and keeps: its online networks,
their momentum (EMA) copies, heads, predictors and queues. Every piece of state is a parameter or
a buffer, so `state_dict()` is the whole method and a resumed run continues bit for bit. By
convention the online backbone is `self.encoder` and its EMA copy (where the method has one)
`self.target_encoder`: evaluation and export find them there for every method.

The trainer (engine/trainer.py) calls, per optimiser step over `accum` micro-batches:

    method.before_step(momentum)              EMA update of the target networks (momentum from the
                                              run's schedule; a no-op for methods without a target)
    state = method.prepare(batches, ctx)      work over the WHOLE accumulated batch before any
                                              micro-batch loss (SIM: all targets and one F); None
                                              for most methods
    for each micro-batch:
        loss, figures = method(batch, ctx)    one micro-batch's loss (this is the call DDP wraps);
                                              `figures` is a small dict of detached scalars to log
        backward(loss / accum)
    method.after_step(ctx)                    enqueue this step's keys (all-gathered over ranks),
                                              after the last micro-batch, so every micro-batch of
                                              a step sees the same queue: accum = 2 with batch B
                                              is then the same step as accum = 1 with batch 2B
                                              wherever BatchNorm statistics allow

`ctx` (StepContext) carries the step number, the micro-batch index and count, the device, the
kernel backends, the data-parallel group, the run's seed and the optional stage marker, so a
method never reaches into the trainer.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from engine.presets import ConfigError, PretrainConfig


@dataclass(frozen=True)
class CropSpec:
    """`count` crops of `size` pixels, RandomResizedCrop area fraction in `scale`."""
    count: int
    size: int
    scale: tuple[float, float]


@dataclass(frozen=True)
class ViewSpec:
    """The views a method asks the loader for, every one with its crop geometry (boxes, flips,
    image size).

    crops: () is the two-view default (two crops at cfg.img_size with the recipe's scale);
           a multi-crop list, e.g. SwAV's (CropSpec(2, 224, (0.14, 1)), CropSpec(6, 96,
           (0.05, 0.14))), gives batch["crops"] (one tensor per crop, large crops first),
           boxes (B, V, 4) and flips (B, V); view1/view2 stay the first two crops.
    proposals: P > 0 asks for each image's top-P cached selective-search boxes
           (python -m engine.proposals) mapped into every view: batch["proposals"] (B, V, P, 4)
           x1 y1 x2 y2 in view pixels, clipped, and batch["proposal_visible"] (B, V, P), the
           fraction of each box inside the view (0 for padding).
    """
    count: int = 2
    geometry: bool = True
    crops: tuple[CropSpec, ...] = ()
    proposals: int = 0

    def __post_init__(self):
        if self.crops:
            object.__setattr__(self, "count", sum(c.count for c in self.crops))


@dataclass
class StepContext:
    step: int
    micro: int = 0
    micro_batches: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backends: dict = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    mark: Callable[[str], None] = field(default=lambda stage: None)
    # after the micro-batches: a 0-d bool tensor on the device, False when the step's loss or
    # gradients were not finite (the step is then skipped: no queue, EMA or parameter change)
    ok: torch.Tensor | None = None

    def backend(self, op: str) -> str:
        """The kernel backend of `op` for this run (engine/fused.py sets every op it knows)."""
        return self.backends.get(op, "auto")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class Method(nn.Module):
    """Base class of every objective in engine/methods/ (see the module docstring)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    official_code: ClassVar[str] = ""
    views: ClassVar[ViewSpec] = ViewSpec()
    # Under data parallelism: convert BatchNorm to SyncBatchNorm (where the paper used it);
    # MoCo-style methods use shuffle-BN instead and set this False.
    sync_batchnorm: ClassVar[bool] = True
    # The method's own hyperparameters: a dataclass with the paper's defaults, filled from
    # cfg.method_args (unknown keys are a one-line ConfigError).
    Hyper: ClassVar[type | None] = None

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.hyper = self.hyperparameters(cfg)
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # set by the trainer after each step (a device bool); None: no step skipped so far
        self.last_step_ok: torch.Tensor | None = None

    # ------------------------------------------------------------------ configuration
    @classmethod
    def hyperparameters(cls, cfg: PretrainConfig):
        if cls.Hyper is None:
            if cfg.method_args:
                raise ConfigError(f"method {cls.name} takes no --method-arg, got "
                                  f"{', '.join(sorted(cfg.method_args))}")
            return None
        known = {f.name: f for f in dataclasses.fields(cls.Hyper)}
        unknown = sorted(set(cfg.method_args) - set(known))
        if unknown:
            raise ConfigError(f"unknown --method-arg {unknown[0]} for method {cls.name}: known "
                              f"are {', '.join(known)}")
        values = {}
        for key, value in cfg.method_args.items():
            values[key] = _coerce(cls.name, key, value, known[key])
        hyper = cls.Hyper(**values)
        check = getattr(hyper, "validate", None)
        if check is not None:
            try:
                check()
            except ValueError as exc:
                raise ConfigError(f"{cls.name}: {exc}") from exc
        return hyper

    @classmethod
    def check_config(cls, cfg: PretrainConfig) -> None:
        """One-line ConfigError for a configuration this method cannot run (beyond cfg.validate)."""
        cls.hyperparameters(cfg)

    # ------------------------------------------------------------------ the contract
    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online module, its EMA copy) pairs; [] for methods without a momentum target."""
        return []

    @torch.no_grad()
    def before_step(self, momentum: float) -> None:
        """ξ ← m·ξ + (1−m)·θ over every trainable online/target parameter pair, as fused
        `_foreach` ops. BatchNorm running buffers are not averaged (the targets run in train
        mode, as in MoCo, BYOL, PixPro and SIM)."""
        if self._ema_pairs is None:
            online, target = [], []
            for src, dst in self.target_pairs():
                for p_src, p_dst in zip(src.parameters(), dst.parameters()):
                    if p_src.requires_grad:  # frozen pieces (SIM's patch embedding) are identical
                        online.append(p_src)
                        target.append(p_dst)
            self._ema_pairs = (online, target)
        online, target = self._ema_pairs
        if not online:
            return
        if self.last_step_ok is None:
            torch._foreach_lerp_(target, online, 1.0 - momentum)
        else:  # the last step was skipped if not ok: then so is this EMA (weight 0, on the device)
            weight = torch.where(self.last_step_ok, 1.0 - momentum, 0.0)   # made on the device
            torch._foreach_lerp_(target, online, [weight] * len(target))

    def prepare(self, batches: list[dict], ctx: StepContext) -> Any:
        return None

    def forward(self, batch: dict, ctx: StepContext, prepared: Any = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        return None

    # ------------------------------------------------------------------ bookkeeping
    def flops_per_image(self) -> float:
        """Model FLOPs (2·MAC) per image per training step, for MFU; 0 when unknown."""
        return 0.0

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{self.name}: {trainable / 1e6:.2f}M trainable params"

    def data_warnings(self, num_images: int, global_batch: int, total_steps: int) -> list[str]:
        """What this method's state makes of the data at hand (one line each, logged at the start):
        a key queue longer than the dataset holds several keys of every image -- each image's own
        among its negatives -- and a queue that needs a large part of the run to replace its
        random initial keys trains against noise meanwhile (the loss can rise on small data,
        mmpretrain#1541). MoCo/DenseCL's papers size the queue well below ImageNet's 1.28 M."""
        from engine.models.moco import KeyQueue, KeyQueueBank

        lines = []
        queues = ((n, m) for n, m in self.named_modules() if isinstance(m, (KeyQueue, KeyQueueBank)))
        for name, queue in queues:
            fill_steps = -(-queue.length // max(1, global_batch))
            # at most half the images, a whole number of global batches
            suggestion = max(global_batch, num_images // 2 // max(1, global_batch) * global_batch)
            if queue.length > num_images:
                lines.append(f"{name}: {queue.length} keys for {num_images} images: the queue holds "
                             f"each image's own keys among its negatives; use --method-arg "
                             f"queue_length={suggestion}")
            elif fill_steps > total_steps // 10:
                lines.append(f"{name}: the first {fill_steps} of {total_steps} steps still see "
                             f"random initial keys in the queue; a shorter queue "
                             f"(--method-arg queue_length={suggestion}) or a longer run fixes it")
        return lines

    def _apply(self, fn, *args, **kwargs):  # moving the module invalidates the cached EMA pairs
        self._ema_pairs = None
        self.__dict__.pop("_norm_statistics_cache", None)
        return super()._apply(fn, *args, **kwargs)


_INITIAL_WEIGHTS = [True]


@contextlib.contextmanager
def skip_initial_weights():
    """Build methods without reading the pre-trained weights their hyperparameters name (DETReg's
    embedding_checkpoint / backbone_checkpoint): for code that only needs the method's structure
    (the detector export) or restores every tensor from a checkpoint right after building. A
    method that loads such files asks `initial_weights_wanted()` first."""
    _INITIAL_WEIGHTS.append(False)
    try:
        yield
    finally:
        _INITIAL_WEIGHTS.pop()


def initial_weights_wanted() -> bool:
    """False inside `skip_initial_weights()`."""
    return _INITIAL_WEIGHTS[-1]


def _coerce(method: str, key: str, value, spec: dataclasses.Field):
    """A --method-arg value (often a string from the CLI) as the type of the Hyper field."""
    default = spec.default if spec.default is not dataclasses.MISSING else None
    kind = type(default) if default is not None else None
    if kind is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is tuple:   # "0.14,1" from the CLI; a list from a stored config
            parts = value.split(",") if isinstance(value, str) else list(value)
            if len(parts) != len(default):
                raise ValueError(value)
            return tuple(type(d)(p) for d, p in zip(default, parts))
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--method-arg {key}={value!r} for method {method}: expected "
                          f"{kind.__name__}") from exc


__all__ = ["CropSpec", "Method", "StepContext", "ViewSpec", "initial_weights_wanted",
           "skip_initial_weights"]
