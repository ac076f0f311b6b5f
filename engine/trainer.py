"""The training loop, one for every method. It reads top to bottom: set up, (resume), then one
optimiser step at a time, and knows no method by name (engine/methods/base.py has the contract).

One optimiser step, with `accum` micro-batches:
  1. method.before_step(m): the EMA update of its target networks (before any target forward),
  2. method.prepare(batches): work over the whole accumulated batch (SIM: every target and one F),
  3. per micro-batch: method(batch) -> loss, backward of loss / accum (DDP all-reduces the
     gradients on the last micro-batch only),
  4. unscale, clip the global grad norm (if the recipe clips); ok = loss and grad norm finite
     (a device tensor: a bad step is skipped without a host sync, see _step_unless_bad),
  5. method.after_step(): enqueue the step's keys (all-gathered over ranks) if ok,
  6. optimiser step if ok, zero grads.
Learning rate and EMA momentum are functions of the step, so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from engine.checkpoint import (CHECKPOINT_NAME, CheckpointError, has_checkpoint, load_latest, restore_rng_state,
                               rng_state, save_checkpoint)
from engine.checkpointing import checkpoint_activations
from engine.compile import CompiledRegions, compile_regions
from engine.distributed import (ProcessGroupInfo, control_group, init_from_environment,
                                mean_over_ranks, shutdown)
from engine.eval import OnlineKnn
from engine.fused import choose_kernels
from engine.loaders import build_loader as choose_loader
from engine.methods import Method, StepContext, build_method, check_method_config
from engine.methods.base import skip_initial_weights
from engine.monitor import MetricsLog, ProgressBar, plot_loss_curve
from engine.optim import LARS, make_optimizer
from engine.preemption import StopRequest
from engine.presets import PretrainConfig
from engine.schedules import ema_momentum, learning_rate
from engine.sharding import (gradient_sync, is_sharded, load_training_state, shard_model,
                             training_state)
from pipelines.datasets import DataError


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
    # --compile [MODE]: regional torch.compile (engine/compile.py); None runs eagerly.
    compile: str | None = None
    # --keep N: numbered checkpoints kept (the newest N; a corrupt newest one falls back).
    keep: int = 2
    # --checkpoint-activations: recompute the ViT blocks in backward (engine/checkpointing.py)
    checkpoint_activations: bool = False
    # --fsdp: shard parameters, gradients and optimiser state over the ranks (engine/sharding.py)
    fsdp: bool = False
    # --proposals FILE: the selective-search cache for methods that ask for proposals (CCOP);
    # None: the default cache of the data folder (python -m engine.proposals --data DIR)
    proposals: str | None = None
    # Steps with a non-finite loss/gradient are skipped; after this many in a row (seen at the
    # next log step) the run stops ("stop"), says so and goes on ("continue"), or goes back to
    # the newest checkpoint from before the streak with the data stream left where it is
    # ("restore", at most MAX_RESTORES times per invocation).
    max_bad_steps: int = 20
    on_bad_steps: str = "stop"


MAX_RESTORES = 3


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
    if not resume and has_checkpoint(out):
        raise RunError(f"{out} already holds a checkpoint: pass --resume to continue that run, "
                       f"or choose another --out (nothing was overwritten)")
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loader(cfg: PretrainConfig, data: str | None, device: torch.device,
                 group: ProcessGroupInfo, fused: bool = True, views=None, proposals=None):
    """The run's loader (engine/loaders.py picks it) for the method's views, and its one-line
    description."""
    loader, message = choose_loader(cfg, data, device, group.rank, group.world_size, fused,
                                    views=views, proposals=proposals)
    if loader.batches_per_epoch < cfg.accum:
        raise RunError(f"an optimiser step needs {cfg.effective_batch * group.world_size} images "
                       f"(--batch-size {cfg.batch_size} × --accum {cfg.accum}"
                       + (f" × {group.world_size} ranks" if group.active else "")
                       + f") but the data has {loader.num_images}: lower --batch-size or --accum")
    return loader, message


def load_run_proposals(data: str | None, cache_file: str | None, top: int,
                       method: str) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    """((boxes (N, top, 4), counts (N,)), one log line) from the selective-search cache of the
    run's images (python -m engine.proposals). The embedded sample photos get theirs computed
    once into ~/.cache/densesim (a few seconds); any other folder must have been run through
    engine.proposals first (a one-line error says how)."""
    import os

    from pipelines.datasets import resolve_source
    from pipelines.proposals import default_cache_path, describe_missing, load_proposals

    dataset = resolve_source(data)
    if cache_file is None:
        cache_file = default_cache_path(dataset.root)
        if data is None:
            cache_file = os.path.join(os.path.expanduser("~"), ".cache", "densesim",
                                      "sample-photos-proposals.bin")
            # computed once; brought up to date (hashes only, nothing recomputed) when this
            # checkout's copies of the photos are not the ones it recorded (another clone)
            fresh = os.path.isfile(cache_file) and not load_proposals(cache_file, dataset, top)[2]
            if not fresh:
                from engine.proposals import main as compute_proposals
                os.makedirs(os.path.dirname(cache_file), exist_ok=True)
                if compute_proposals(["--data", dataset.root, "--out", cache_file, "--quiet"]):
                    raise RunError(f"could not compute proposals for the sample photos into "
                                   f"{cache_file}")
    if not os.path.isfile(cache_file):
        raise RunError(f"method {method} needs region proposals and {cache_file} does not exist: "
                       f"run python -m engine.proposals --data {data or dataset.root} first "
                       f"(or pass --proposals FILE)")
    boxes, counts, missing = load_proposals(cache_file, dataset, top)
    if len(missing) == len(dataset.paths):
        raise RunError(f"no image of {dataset.root} has cached proposals in {cache_file}: rerun "
                       f"python -m engine.proposals --data {data or dataset.root}")
    return (boxes, counts), describe_missing(missing, len(dataset.paths), cache_file)


def wrap_data_parallel(model: Method, device: torch.device, group: ProcessGroupInfo):
    """The module the micro-batch losses go through: DDP over ranks, else the method itself (also
    when it is sharded with --fsdp: FSDP is applied to the method in place)."""
    if not group.active or is_sharded(model):
        return model
    # broadcast_buffers=False keeps BatchNorm statistics rank-local between steps, but it also
    # skips DDP's start-of-run sync of the buffers: start every rank from rank 0's, or each rank
    # keeps the queue (KeyQueue.keys, drawn after seeding with seed + rank) it initialised itself.
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None, broadcast_buffers=False)


def compile_model(model: Method, mode: str | None, device: torch.device,
                  quiet: bool) -> CompiledRegions | None:
    """--compile: the method's blocks, heads and norms compiled in place (engine/compile.py)."""
    if mode is None:
        return None
    if mode == "reduce-overhead" and device.type != "cuda":
        log(f"--compile reduce-overhead captures CUDA graphs; on {device.type} it compiles in "
            f"the default mode", quiet)
        mode = "default"
    compiled = compile_regions(model, mode)
    log(compiled.describe() + " (compiled on the first step)", quiet)
    return compiled


# ------------------------------------------------------------------------------------ one step
@dataclass
class StepSession:
    """What one optimiser step needs (built once by `pretrain`; also used by bench/)."""
    cfg: PretrainConfig
    method: Method
    online: torch.nn.Module            # the method, or its DDP wrapper (the micro-batch losses)
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
                      stages=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One optimiser step over `accum` micro-batches; returns (loss, grad norm, figures) as
    tensors (no host sync): the loss is the mean of the micro-batch losses, `figures` the
    method's logged terms averaged likewise. The optimiser's lr must already be set.

    `stages` (optional, `stages(name: str) -> None`) is called with a stage's name as each stage
    ends: "ema", whatever the method marks in prepare (SIM: "target_forward", "loss"), per
    micro-batch the method's marks (SIM: "online_forward", "loss") and "backward", then "queue"
    (unscale, clip, the finite check, after_step) and "optimizer" (step, zero_grad). bench/ passes an
    `engine.stage_timer.StageTimer`, which synchronises the device at each mark; the default None
    adds no call and no sync."""
    mark = stages if stages is not None else (lambda stage: None)
    method, accum = s.method, len(batches)
    ctx = StepContext(step=step, micro=0, micro_batches=accum, device=s.device,
                      backends=s.backends, rank=s.group.rank, world_size=s.group.world_size,
                      seed=s.cfg.seed, mark=mark)
    method.before_step(momentum)
    mark("ema")
    norm_buffers = _norm_statistics(method)
    saved_statistics = torch._foreach_mul(norm_buffers, 1) if norm_buffers else []
    if isinstance(method, FSDPModule):  # prepare runs branches outside the root's forward
        method.unshard()
    with s.autocast():
        prepared = method.prepare(batches, ctx)

    step_loss = torch.zeros((), device=s.device)
    figures: dict[str, torch.Tensor] = {}
    for micro, batch in enumerate(batches):
        ctx.micro = micro
        last_micro = micro == accum - 1
        with gradient_sync(s.online, last_micro or not s.group.active):
            with s.autocast():
                loss, terms = s.online(batch, ctx, prepared)
            loss = loss / accum
            s.scaler.scale(loss).backward()
            mark("backward")
        step_loss += loss.detach()
        for name, value in terms.items():
            figures[name] = figures.get(name, 0.0) + value.detach().float() / accum

    s.scaler.unscale_(s.optimizer)
    trainable = [p for group in s.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(
        trainable, s.cfg.clip_grad if s.cfg.clip_grad > 0 else float("inf"), foreach=True)
    if isinstance(grad_norm, DTensor):     # FSDP2: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    # A non-finite loss or gradient skips the whole step -- queues, optimiser, the next EMA --
    # decided on the device (no host sync): the optimiser's found_inf, torch.where elsewhere.
    # grad_norm is over the all-reduced gradients, so every rank decides the same.
    ctx.ok = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    for buffer, saved in zip(norm_buffers, saved_statistics):   # a bad batch's BN statistics
        buffer.copy_(torch.where(ctx.ok, buffer, saved))
    method.after_step(ctx)
    mark("queue")
    _step_unless_bad(s, ctx.ok)
    s.optimizer.zero_grad(set_to_none=True)
    method.last_step_ok = ctx.ok
    mark("optimizer")
    figures["skipped"] = (~ctx.ok).float()
    return step_loss, grad_norm, figures


def _mean_of_good(values: list[torch.Tensor], good: torch.Tensor) -> torch.Tensor:
    """The mean over the steps that were not skipped (NaN when all were)."""
    stacked = torch.stack(values)
    return torch.where(good > 0, stacked, 0).sum() / good.sum()


def _norm_statistics(method: Method) -> list[torch.Tensor]:
    """The running statistics of every BatchNorm of the method (a few floats per channel): kept
    aside at the start of a step so that a skipped step leaves them as they were."""
    found = getattr(method, "_norm_statistics_cache", None)
    if found is None:
        found = [buffer for module in method.modules()
                 if isinstance(module, torch.nn.modules.batchnorm._NormBase)
                 for buffer in (module.running_mean, module.running_var,
                                module.num_batches_tracked)
                 if buffer is not None]
        method._norm_statistics_cache = found
    return found


def _step_unless_bad(s: StepSession, ok: torch.Tensor) -> None:
    """The optimiser step, skipped on the device when `ok` is False. The fused AdamW/SGD and our
    LARS read `found_inf` (the GradScaler's protocol); with fp16 the GradScaler sets it itself
    (non-finite gradients after scaling are its own skip, and it lowers the scale). Any other
    optimiser (apex's LAMB) is skipped by reading `ok` on the host: one sync per step."""
    optimizer = s.optimizer
    if s.scaler.is_enabled():
        s.scaler.step(optimizer)
        s.scaler.update()
        return
    if getattr(optimizer, "_step_supports_amp_scaling", False) or isinstance(optimizer, LARS):
        optimizer.grad_scale, optimizer.found_inf = None, (~ok).float()   # 0-d, as state steps
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif bool(ok):
        optimizer.step()


def momentum_at(cfg: PretrainConfig, step: int, total_steps: int) -> float:
    """The EMA momentum of `step`: cosine from cfg.momentum to 1 (SIM, BYOL, PixPro) or constant
    (MoCo, DenseCL)."""
    if cfg.ema_schedule == "constant":
        return cfg.momentum
    return ema_momentum(step, total_steps, cfg.momentum)


# ------------------------------------------------------------------------------------ the loop
def pretrain(cfg: PretrainConfig, run: RunOptions) -> dict:
    group = init_from_environment(run.device)
    quiet = run.quiet or not group.is_main
    out = prepare_output_dir(run.out, run.resume, write=group.is_main)
    loaded = load_latest(out) if run.resume else None
    checkpoint = loaded.state if loaded else None
    for problem in loaded.skipped if loaded else []:
        log(f"resume: skipped {problem}", quiet)
    if checkpoint is not None:
        cfg = _config_for_resume(checkpoint, run.resume_overrides)
    cfg.validate()
    check_method_config(cfg)
    device = resolve_device(run.device, group)
    kernels_used = choose_kernels(run.fused, device)
    log(kernels_used.message, quiet)
    amp_dtype = autocast_dtype(cfg, device)
    seed_everything(cfg.seed + group.rank)

    # The method first (it says which views the loader makes); the loader never touches the
    # global RNGs, so building it after the networks draws the same weights as before.
    # A resumed run restores every tensor from its checkpoint: the pre-trained weight files a
    # method's hyperparameters name (DETReg's embedding_checkpoint, ...) are not read again, so
    # a run resumes even after they moved.
    with skip_initial_weights() if checkpoint is not None else contextlib.nullcontext():
        model = build_method(cfg)
    views = model.views
    proposals = None
    if views.proposals:
        proposals, note = load_run_proposals(run.data, run.proposals, views.proposals, cfg.method)
        log(note, quiet)
    loader, loader_message = build_loader(cfg, run.data, device, group, run.fused, views,
                                          proposals)
    log(loader_message, quiet)
    steps_per_epoch = loader.batches_per_epoch // cfg.accum
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                    else round(cfg.warmup_epochs * steps_per_epoch))
    global_batch = cfg.effective_batch * group.world_size
    peak_lr = cfg.blr * global_batch / 256
    schedule = {"total_steps": total_steps, "warmup_steps": warmup_steps, "peak_lr": peak_lr,
                "min_lr": cfg.min_lr, "base_momentum": cfg.momentum,
                "ema_schedule": cfg.ema_schedule, "world_size": group.world_size}

    # SyncBatchNorm where the method's paper used it (it runs on CUDA only); MoCo-style methods
    # shuffle the keys' batch instead.
    if group.active and device.type == "cuda" and model.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if run.checkpoint_activations:
        wrapped = checkpoint_activations(model)
        log(f"activation checkpointing: {wrapped} transformer blocks recomputed in backward"
            + ("" if wrapped else " (none: only LayerNorm ViT blocks are wrapped)"), quiet)
    if run.fsdp:
        if run.compile or run.eval_data:
            raise RunError("--fsdp does not combine with --compile or the kNN monitor yet: drop "
                           "one (evaluate the checkpoint with python -m engine.eval)")
        try:
            units = shard_model(model)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        log(f"FSDP2: {units} blocks and the rest of the model sharded over "
            f"{group.world_size} ranks", quiet)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    start_step, position = 0, {"epoch": 0, "batch": 0}
    if checkpoint is not None:
        try:
            load_training_state(model, optimizer, checkpoint)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        start_step, position = checkpoint["step"], checkpoint["data_position"]
        log(f"resuming {out} at step {start_step}/{total_steps} from {loaded.path.name}", quiet)
    compiled = compile_model(model, run.compile, device, quiet)
    online = wrap_data_parallel(model, device, group)
    if group.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log(f"{model.describe()}; data: {loader.num_images} images, {steps_per_epoch} steps/epoch, "
        f"batch {cfg.batch_size}×{cfg.accum}"
        + (f"×{group.world_size} ranks" if group.active else "")
        + f", lr {peak_lr:.2e}, device {device}"
        + ("" if amp_dtype is None else f" ({str(amp_dtype).removeprefix('torch.')})"), quiet)

    for warning in model.data_warnings(loader.num_images, global_batch, total_steps):
        log(f"warning: {warning}", quiet)

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
    if checkpoint is not None and group.is_main:
        redone = metrics.truncate_after(start_step)
        if redone:
            log(f"metrics: dropped {redone} records after step {start_step} (the steps a crash "
                f"lost since that checkpoint are run again)", quiet)
    elif group.is_main:   # a fresh start in a folder where a run died before its first checkpoint
        stale = metrics.truncate_after(0)
        if stale:
            log(f"metrics: dropped {stale} records of an earlier run in {out} that left no "
                f"checkpoint", quiet)
    progress = None if quiet else ProgressBar(total_steps)
    stream = loader.stream(position["epoch"], position["batch"])
    skipped: set[str] = set()
    interval_loss, interval_images, interval_time, interval_wait = [], 0, 0.0, 0.0
    interval_figures: dict[str, list[torch.Tensor]] = {}
    skipped_steps = 0       # steps skipped for a non-finite loss or gradient, and the longest run
    bad_streak = torch.zeros((), device=device)
    worst_streak = torch.zeros((), device=device)
    worst_start = torch.zeros((), device=device)   # the first step of the longest streak
    restores = 0
    last_step = start_step
    final_stop = min(total_steps, start_step + run.stop_after if run.stop_after else total_steps)

    run_started, last_eval = time.perf_counter(), None

    def evaluate_now(at_step: int) -> dict:
        # the monitor's batches differ from training's: no compiles for them
        with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
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
    stop = StopRequest(control_group(), group.active)   # SIGTERM/SIGINT: finish the step, save
    step = start_step
    while step < final_stop:
        step_started = time.perf_counter()
        lr = learning_rate(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
        momentum = momentum_at(cfg, step, total_steps)
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

        if compiled and compiled.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free
        step_loss, grad_norm, figures = optimisation_step(session, batches, step, momentum)
        if compiled and step == start_step:
            log(compiled.first_step_message(time.perf_counter() - step_started), quiet)

        # Bookkeeping: host syncs only at log steps.
        last_step = step + 1
        log_now = last_step % cfg.log_every == 0 or last_step == final_stop
        if device.type == "cuda" and log_now:
            torch.cuda.synchronize(device)
        interval_loss.append(step_loss)
        for name, value in figures.items():
            interval_figures.setdefault(name, []).append(value)
        bad_streak = (bad_streak + 1) * figures["skipped"]        # on the device
        worst_start = torch.where(bad_streak > worst_streak, step + 1 - bad_streak, worst_start)
        worst_streak = torch.maximum(worst_streak, bad_streak)
        interval_images += global_batch
        interval_time += time.perf_counter() - step_started
        interval_wait += data_wait
        if log_now:
            good = 1.0 - torch.stack(interval_figures.pop("skipped"))
            skipped_now = round(float(len(good) - good.sum()))
            skipped_steps += skipped_now
            worst, streak_from = int(worst_streak), int(worst_start)
            worst_streak, worst_start = bad_streak.clone(), step + 1 - bad_streak
            if worst >= run.max_bad_steps:
                message = (f"{worst} steps in a row had a non-finite loss or gradient (steps "
                           f"{streak_from + 1}-{streak_from + worst}); each was skipped, so the "
                           f"weights, EMA, queues and BatchNorm statistics are those of the last "
                           f"good step")
                if run.on_bad_steps == "stop":
                    raise RunError(message + f"; the last checkpoint in {out} is intact: lower "
                                   f"--blr, use --precision fp32, or check the data")
                if run.on_bad_steps == "restore":
                    restores += 1
                    step = _restore_before(out, streak_from, model, optimizer, scaler, restores,
                                           message)
                    log(f"{message}; restored the checkpoint of step {step} (restore "
                        f"{restores}/{MAX_RESTORES}); the data stream goes on from batch "
                        f"{position['batch']} of epoch {position['epoch']}, so the batches since "
                        f"are not seen again", quiet)
                    if group.is_main:
                        metrics.truncate_after(step)
                    bad_streak.zero_(), worst_streak.zero_(), worst_start.zero_()
                    interval_loss, interval_images, interval_time, interval_wait = [], 0, 0.0, 0.0
                    interval_figures = {}
                    last_step = step
                    if stop.should_stop():
                        break
                    continue
                log(message + "; continuing (--on-bad-steps continue)", quiet)
            mean_loss = mean_over_ranks(_mean_of_good(interval_loss, good), group).item()
            record = {"step": last_step, "epoch": round(last_step / steps_per_epoch, 4),
                      "loss": mean_loss,
                      **{name: mean_over_ranks(_mean_of_good(values, good), group).item()
                         for name, values in interval_figures.items()},
                      "skipped_steps": skipped_steps,
                      "lr": lr, "momentum": momentum,
                      "grad_norm": float(grad_norm), "img_per_s": interval_images / interval_time,
                      "data_wait": interval_wait / interval_time, "skipped_files": len(skipped),
                      "time": time.time()}
            if group.is_main:
                metrics.write(record)
            if progress:
                progress.update(last_step, mean_loss, record["img_per_s"], record["data_wait"], lr,
                                skipped_steps)
            interval_loss, interval_images, interval_time, interval_wait = [], 0, 0.0, 0.0
            interval_figures = {}
        periodic = (eval_interval and last_step % eval_interval == 0
                    and final_stop - last_step >= eval_interval // 2)  # else the final one covers it
        if monitor and (last_step == final_stop or periodic):
            # Outside the timed interval: the next step's clock starts after this.
            last_eval = evaluate_now(last_step)
        if last_step % cfg.checkpoint_every == 0 and last_step < final_stop:
            _save(out, model, optimizer, scaler, cfg, last_step, position, schedule, run.keep,
                  group)

        if stop.should_stop():
            break
        step += 1
    stop.restore()

    if progress:
        progress.close()
    curve = None
    _save(out, model, optimizer, scaler, cfg, last_step, position, schedule, run.keep, group)
    if group.is_main:
        curve = plot_loss_curve(metrics.read(), out / "loss_curve.png",
                                title=f"{model.name} pre-training loss ({cfg.preset})")
    if stop.signal is not None:
        log(f"stopped by {stop.name} after step {last_step}/{total_steps}; checkpoint saved: "
            f"continue with the same command and --resume --out {out}", quiet)
    log(f"done: step {last_step}/{total_steps}; checkpoint {out / CHECKPOINT_NAME}, metrics "
        f"{out / 'metrics.jsonl'}" + (f", plot {curve}" if curve else "")
        + (f"; {len(skipped)} unreadable images skipped" if skipped else ""), quiet)
    # DDP's reducer holds the process group: release it while the group is alive, or the group's
    # last reference goes with this frame and its teardown can deadlock (engine/distributed.py)
    session = online = None
    gc.collect()
    shutdown(group)
    return {"out": out, "step": last_step, "total_steps": total_steps, "model": model,
            "knn": last_eval, "stopped_by": stop.name,
            "skipped_files": sorted(skipped), "kernels": kernels_used.backend}


def _restore_before(out: Path, streak_from: int, model: Method, optimizer, scaler,
                    restores: int, message: str) -> int:
    """--on-bad-steps restore: load the newest intact checkpoint of a step <= `streak_from` (the
    state before the bad streak began) into the model, optimiser and scaler; returns its step.
    Every rank reads it (as --resume does); the RNG and data stream are not rewound."""
    if restores > MAX_RESTORES:
        raise RunError(f"{message}; already restored {MAX_RESTORES} times in this run: lower "
                       f"--blr, use --precision fp32, or check the data")
    try:
        loaded = load_latest(out, at_most=streak_from)
    except CheckpointError as exc:
        raise RunError(f"{message}; nothing to restore ({exc}): save more often with "
                       f"--checkpoint-every, or use --on-bad-steps continue") from None
    load_training_state(model, optimizer, loaded.state)
    scaler.load_state_dict(loaded.state["scaler"])
    model.last_step_ok = None          # the checkpoint's step was a good one
    return int(loaded.state["step"])


def _save(out, model, optimizer, scaler, cfg, step, position, schedule, keep: int = 2,
          group: ProcessGroupInfo = ProcessGroupInfo()) -> None:
    """Everything a resume needs, written by rank 0 (every rank calls this: a sharded model is
    gathered first). The lr and momentum are functions of the step; `schedule` records their
    parameters (total/warm-up steps, peak lr) so a reader can recompute them."""
    model_state, optimizer_state = training_state(model, optimizer)
    if not group.is_main:
        return
    save_checkpoint(out, {"method": cfg.method, "model": model_state,
                          "optimizer": optimizer_state,
                          "scaler": scaler.state_dict(), "config": cfg.to_dict(), "step": step,
                          "schedule": schedule, "data_position": position, "rng": rng_state(),
                          "versions": {"torch": torch.__version__}}, keep=keep)


RESUMABLE_OVERRIDES = ("steps", "epochs", "workers", "log_every", "checkpoint_every", "loader",
                       "eval_every")


def _config_for_resume(checkpoint: dict, overrides: dict) -> PretrainConfig:
    """The run's own configuration; only its length and runtime knobs may change on resume."""
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    for key, value in overrides.items():
        if key not in RESUMABLE_OVERRIDES and _same_value(getattr(cfg, key, None), value):
            continue  # the identical command line a scheduler re-runs: nothing changes
        if key not in RESUMABLE_OVERRIDES:
            raise RunError(f"--{key.replace('_', '-')} cannot change when resuming (the run keeps "
                           f"its own configuration): drop it, or start a new run in another --out")
        setattr(cfg, key, value)
    return cfg


def _same_value(stored, given) -> bool:
    """A CLI value equal to the run's own (JSON turned tuples into lists, ints into floats)."""
    if isinstance(stored, (list, tuple)) and isinstance(given, (list, tuple)):
        return len(stored) == len(given) and all(map(_same_value, stored, given))
    if isinstance(stored, dict) and isinstance(given, dict):
        return stored.keys() == given.keys() and all(_same_value(stored[k], given[k])
                                                     for k in stored)
    return stored == given


__all__ = ["pretrain", "RunOptions", "RunError", "DataError"]
