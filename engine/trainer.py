"""The SIM training loop. It reads top to bottom: set up, (resume), then one optimiser step at a time.

One optimiser step (spec/SIM.md §10), with `accum` micro-batches:
  1. EMA update of the target branch (before the target forward; a no-op at step 0),
  2. target forward of every micro-batch's view 2 (no grad), then F = mean t tᵀ over ALL of them
     (so F covers the whole accumulated batch, spec §6.4),
  3. per micro-batch: block mask on the device -> online forward -> UniGrad loss with that F ->
     backward (scaled by 1/accum),
  4. unscale, clip the global grad norm, fused AdamW step, zero grads.
Learning rate and momentum are functions of the step, so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from engine.checkpoint import (CHECKPOINT_NAME, load_checkpoint, restore_rng_state, rng_state,
                               save_checkpoint)
from engine.distributed import ProcessGroupInfo, init_from_environment, mean_over_ranks, shutdown
from engine.eval import OnlineKnn
from engine.fused import choose_kernels
from engine.loaders import build_loader as choose_loader
from engine.masking import make_mask, visible_indices
from engine.models.sim import SIM
from engine.monitor import MetricsLog, ProgressBar, plot_loss_curve
from engine.presets import ConfigError, PretrainConfig
from engine.schedules import ema_momentum, learning_rate
from kernels import unigrad_covariance, unigrad_loss
from pipelines.datasets import DataError
from pipelines.geometry import relative_geometry


class RunError(ValueError):
    """A run that cannot start or continue; the message is one line that says what to do."""


@dataclass
class RunOptions:
    out: Path
    data: str | None = None
    device: str = "auto"
    fused: bool = True
    resume: bool = False
    stop_after: int | None = None     # stop after this many steps in this invocation (resumable)
    quiet: bool = False
    # Online kNN monitor: (train folder, val folder) with class layout, or None.
    eval_data: tuple[str, str] | None = None
    # On --resume the run's own config is used; only these (e.g. steps, workers) may change.
    resume_overrides: dict = field(default_factory=dict)


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, flush=True)


# ------------------------------------------------------------------------------------ set-up
def resolve_device(name: str, group: ProcessGroupInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunError(f"unknown --device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    if device.type == "cuda" and group.active:
        device = torch.device("cuda", group.local_rank)  # one GPU per process under torchrun
    return device


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default (fp16 + GradScaler as an option); fp32 on CPU."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def prepare_output_dir(out: Path, resume: bool, write: bool = True) -> Path:
    """Check (and on the writing rank create) the output folder; refuse to start a new run over an
    existing checkpoint."""
    out = Path(out)
    if write:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise RunError(f"cannot write to output folder {out} ({exc.strerror or exc}): "
                           f"choose a writable --out") from exc
    if not resume and (out / CHECKPOINT_NAME).exists():
        raise RunError(f"{out} already holds a checkpoint: pass --resume to continue that run, "
                       f"or choose another --out (nothing was overwritten)")
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every trainable tensor of ≥2 dims (incl. cls and mask tokens); none on
    biases and norm weights; frozen tensors (patch embedding, target branch) excluded."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lamb":
        try:
            from apex.optimizers import FusedLAMB  # NVIDIA apex; not on PyPI
        except ImportError as exc:
            raise ConfigError("--optimizer lamb needs NVIDIA apex (built from source; the 'apex' "
                              "package on PyPI is unrelated): use --optimizer adamw") from exc
        return FusedLAMB(groups, lr=cfg.lr, betas=cfg.betas)
    # The lr is set every step from the schedule; the value here is only a placeholder.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def build_loader(cfg: PretrainConfig, data: str | None, device: torch.device,
                 group: ProcessGroupInfo, fused: bool = True):
    """The run's two-view loader (engine/loaders.py picks it) and its one-line description."""
    loader, message = choose_loader(cfg, data, device, group.rank, group.world_size, fused)
    if loader.batches_per_epoch < cfg.accum:
        raise RunError(f"an optimiser step needs {cfg.effective_batch * group.world_size} images "
                       f"(--batch-size {cfg.batch_size} × --accum {cfg.accum}"
                       + (f" × {group.world_size} ranks" if group.active else "")
                       + f") but the data has {loader.num_images}: lower --batch-size or --accum")
    return loader, message


def mask_generator(seed: int, rank: int, step: int, micro: int,
                   device: torch.device) -> torch.Generator:
    """A generator per (rank, step, micro-batch): masks are reproducible across resumes for free
    and differ between ranks. (Python hashes tuples of ints deterministically.)"""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, rank, step, micro)) % (2 ** 63))
    return generator


def wrap_data_parallel(model: SIM, device: torch.device, group: ProcessGroupInfo):
    """The module the online forward goes through: DDP over ranks, else the model itself."""
    if not group.active:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None, broadcast_buffers=False)


# ------------------------------------------------------------------------------------ one step
@dataclass
class StepSession:
    """What one optimiser step needs (built once by `pretrain`; also used by bench/)."""
    cfg: PretrainConfig
    model: SIM
    online: torch.nn.Module            # the model, or its DDP wrapper (the online forward)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    backends: dict
    group: ProcessGroupInfo = field(default_factory=ProcessGroupInfo)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)


def optimisation_step(s: StepSession, batches: list[dict], step: int, momentum: float,
                      stages=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SIM optimiser step over `accum` micro-batches; returns (loss, grad norm) as tensors
    (no host sync). The optimiser's lr must already be set for this step.

    `stages` (optional, `stages(name: str) -> None`) is called with a stage's name as each stage
    ends: "ema", "target_forward", "loss" (F over all targets), then per micro-batch
    "online_forward" (mask, geometry, forward), "loss", "backward", and last "optimizer" (unscale,
    clip, AdamW, zero_grad). bench/ passes an `engine.stage_timer.StageTimer`, which synchronises
    the device at each mark; the default None adds no call and no sync."""
    cfg, device = s.cfg, s.device
    mark = stages if stages is not None else (lambda stage: None)
    # Target branch: EMA update first, then all micro-batches' targets and one F over them
    # (all-reduced over ranks inside unigrad_covariance).
    s.model.update_target(momentum)
    mark("ema")
    with s.autocast():
        targets = [s.model.forward_target(b["view2"].to(device, non_blocking=True))
                   for b in batches]
    mark("target_forward")
    covariance = unigrad_covariance(torch.cat(targets), form=cfg.loss_form,
                                    backend=s.backends.get("unigrad_loss", "auto"))
    mark("loss")

    # Online branch, one micro-batch at a time; DDP all-reduces gradients on the last one.
    step_loss = torch.zeros((), device=device)
    for micro, (batch, target) in enumerate(zip(batches, targets)):
        mask = make_mask(cfg.mask_kind, len(batch["view1"]), cfg.grid, cfg.num_masked,
                         generator=mask_generator(cfg.seed, s.group.rank, step, micro, device),
                         device=device)
        visible_idx = visible_indices(mask, num_visible=cfg.grid ** 2 - cfg.num_masked,
                                      check=False)
        rel = relative_geometry(batch["boxes"], batch["flips"], batch["image_size"]).to(device)
        last_micro = micro == len(batches) - 1
        with contextlib.nullcontext() if last_micro or not s.group.active else s.online.no_sync():
            with s.autocast():
                pred = s.online(batch["view1"].to(device, non_blocking=True), visible_idx, rel,
                                backends=s.backends)
            mark("online_forward")
            loss = unigrad_loss(pred, target, cfg.neg_weight, covariance=covariance,
                                form=cfg.loss_form, global_weight=cfg.global_weight,
                                dense_weight=cfg.dense_weight,
                                backend=s.backends.get("unigrad_loss", "auto")) / len(batches)
            mark("loss")
            s.scaler.scale(loss).backward()
            mark("backward")
        step_loss += loss.detach()

    s.scaler.unscale_(s.optimizer)
    trainable = [p for group in s.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad, foreach=True)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    mark("optimizer")
    return step_loss, grad_norm


# ------------------------------------------------------------------------------------ the loop
def pretrain(cfg: PretrainConfig, run: RunOptions) -> dict:
    group = init_from_environment(run.device)
    quiet = run.quiet or not group.is_main
    out = prepare_output_dir(run.out, run.resume, write=group.is_main)
    checkpoint = load_checkpoint(out) if run.resume else None
    if checkpoint is not None:
        cfg = _config_for_resume(checkpoint, run.resume_overrides)
    cfg.validate()
    device = resolve_device(run.device, group)
    kernels_used = choose_kernels(run.fused, device)
    log(kernels_used.message, quiet)
    amp_dtype = autocast_dtype(cfg, device)
    seed_everything(cfg.seed + group.rank)

    loader, loader_message = build_loader(cfg, run.data, device, group, run.fused)
    log(loader_message, quiet)
    steps_per_epoch = loader.batches_per_epoch // cfg.accum
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                    else round(cfg.warmup_epochs * steps_per_epoch))
    global_batch = cfg.effective_batch * group.world_size
    peak_lr = cfg.blr * global_batch / 256
    schedule = {"total_steps": total_steps, "warmup_steps": warmup_steps, "peak_lr": peak_lr,
                "min_lr": cfg.min_lr, "base_momentum": cfg.momentum, "world_size": group.world_size}

    model = SIM(cfg)
    if group.active and device.type == "cuda":  # SyncBatchNorm runs on CUDA only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    start_step, position = 0, {"epoch": 0, "batch": 0}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        start_step, position = checkpoint["step"], checkpoint["data_position"]
        log(f"resuming {out} at step {start_step}/{total_steps}", quiet)
    online = wrap_data_parallel(model, device, group)
    if group.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log(f"{model.describe()}; data: {loader.num_images} images, {steps_per_epoch} steps/epoch, "
        f"batch {cfg.batch_size}×{cfg.accum}"
        + (f"×{group.world_size} ranks" if group.active else "")
        + f", lr {peak_lr:.2e}, device {device}"
        + ("" if amp_dtype is None else f" ({str(amp_dtype).removeprefix('torch.')})"), quiet)

    # Online kNN monitor (rank 0 only; the folders are checked now, decoded at the first use).
    monitor, eval_interval = None, 0
    if run.eval_data and group.is_main:
        monitor = OnlineKnn(*run.eval_data, img_size=cfg.img_size, device=device,
                            workers=min(cfg.workers, 8))
        eval_interval = (max(1, round(cfg.eval_every * steps_per_epoch)) if cfg.eval_every > 0
                         else 0)
        log(monitor.describe() + (f"; every {eval_interval} steps" if eval_interval else
                                  "; at the end of the run"), quiet)

    session = StepSession(cfg, model, online, optimizer, scaler, device, amp_dtype,
                          kernels_used.backend, group)
    metrics = MetricsLog(out / "metrics.jsonl")
    progress = None if quiet else ProgressBar(total_steps)
    stream = loader.stream(position["epoch"], position["batch"])
    skipped: set[str] = set()
    interval_loss, interval_images, interval_time, interval_wait = [], 0, 0.0, 0.0
    last_step = start_step
    final_stop = min(total_steps, start_step + run.stop_after if run.stop_after else total_steps)

    run_started, last_eval = time.perf_counter(), None

    def evaluate_now(at_step: int) -> dict:
        result = monitor.evaluate(model.encoder)
        metrics.write({"step": at_step, "epoch": round(at_step / steps_per_epoch, 4), **result,
                       "elapsed": time.perf_counter() - run_started, "time": time.time()})
        line = (f"step {at_step}: kNN top-1 {result['knn_top1']:.4f} "
                f"({result['knn_seconds']:.1f} s)")
        if progress:
            progress.note(line)
        else:
            log(line, quiet)
        return result

    if monitor and start_step == 0:
        last_eval = evaluate_now(0)  # the random-init baseline, first point of the kNN curve
    model.train()
    for step in range(start_step, final_stop):
        step_started = time.perf_counter()
        lr = learning_rate(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
        momentum = ema_momentum(step, total_steps, cfg.momentum)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr

        # Data: `accum` micro-batches; the time spent waiting here is the data-wait fraction.
        batches = [next(stream) for _ in range(cfg.accum)]
        position = {"epoch": batches[-1]["epoch"], "batch": batches[-1]["batch_index"] + 1}
        for name in (name for batch in batches for name in batch["skipped_files"]):
            if name not in skipped:
                skipped.add(name)
                log(f"skipped unreadable image: {name}", quiet)
        data_wait = time.perf_counter() - step_started

        step_loss, grad_norm = optimisation_step(session, batches, step, momentum)

        # Bookkeeping: host syncs only at log steps.
        last_step = step + 1
        log_now = last_step % cfg.log_every == 0 or last_step == final_stop
        if device.type == "cuda" and log_now:
            torch.cuda.synchronize(device)
        interval_loss.append(step_loss)
        interval_images += global_batch
        interval_time += time.perf_counter() - step_started
        interval_wait += data_wait
        if log_now:
            mean_loss = mean_over_ranks(torch.stack(interval_loss).mean(), group).item()
            if not math.isfinite(mean_loss):
                raise RunError(f"the loss became {mean_loss} at step {last_step}: lower the "
                               f"learning rate (--blr) or use --precision fp32; the last "
                               f"checkpoint in {out} is intact")
            record = {"step": last_step, "epoch": round(last_step / steps_per_epoch, 4),
                      "loss": mean_loss, "lr": lr, "momentum": momentum,
                      "grad_norm": float(grad_norm), "img_per_s": interval_images / interval_time,
                      "data_wait": interval_wait / interval_time, "skipped_files": len(skipped),
                      "time": time.time()}
            if group.is_main:
                metrics.write(record)
            if progress:
                progress.update(last_step, mean_loss, record["img_per_s"], record["data_wait"], lr)
            interval_loss, interval_images, interval_time, interval_wait = [], 0, 0.0, 0.0
        periodic = (eval_interval and last_step % eval_interval == 0
                    and final_stop - last_step >= eval_interval // 2)  # else the final one covers it
        if monitor and (last_step == final_stop or periodic):
            # Outside the timed interval: the next step's clock starts after this.
            last_eval = evaluate_now(last_step)
        if last_step % cfg.checkpoint_every == 0 and last_step < final_stop and group.is_main:
            _save(out, model, optimizer, scaler, cfg, last_step, position, schedule)

    if progress:
        progress.close()
    curve = None
    if group.is_main:
        _save(out, model, optimizer, scaler, cfg, last_step, position, schedule)
        curve = plot_loss_curve(metrics.read(), out / "loss_curve.png",
                                title=f"SIM pre-training loss ({cfg.preset})")
    log(f"done: step {last_step}/{total_steps}; checkpoint {out / CHECKPOINT_NAME}, metrics "
        f"{out / 'metrics.jsonl'}" + (f", plot {curve}" if curve else "")
        + (f"; {len(skipped)} unreadable images skipped" if skipped else ""), quiet)
    shutdown(group)
    return {"out": out, "step": last_step, "total_steps": total_steps, "model": model,
            "knn": last_eval,
            "skipped_files": sorted(skipped), "kernels": kernels_used.backend}


def _save(out, model, optimizer, scaler, cfg, step, position, schedule) -> None:
    """Everything a resume needs. The lr and momentum are functions of the step; `schedule`
    records their parameters (total/warm-up steps, peak lr) so a reader can recompute them."""
    save_checkpoint(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict(), "config": cfg.to_dict(), "step": step,
                          "schedule": schedule, "data_position": position, "rng": rng_state(),
                          "versions": {"torch": torch.__version__}})


RESUMABLE_OVERRIDES = ("steps", "epochs", "workers", "log_every", "checkpoint_every", "loader",
                       "eval_every")


def _config_for_resume(checkpoint: dict, overrides: dict) -> PretrainConfig:
    """The run's own configuration; only its length and runtime knobs may change on resume."""
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    for key, value in overrides.items():
        if key not in RESUMABLE_OVERRIDES:
            raise RunError(f"--{key.replace('_', '-')} cannot change when resuming (the run keeps "
                           f"its own configuration): drop it, or start a new run in another --out")
        setattr(cfg, key, value)
    return cfg


__all__ = ["pretrain", "RunOptions", "RunError", "DataError"]
