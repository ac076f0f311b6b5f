"""`python -m engine.pretrain`: self-supervised pre-training from the command line.

With no arguments it trains SIM's small CPU demo model on the embedded sample of real photos for a
few minutes and leaves a checkpoint, a JSON-lines metrics log and a loss-curve PNG in its output
folder. `--method NAME` alone does the same for another method (its `NAME-demo-cpu` preset);
`--data DIR --preset sim-vit-b16` (or `densecl-r50`, `pixpro-r50`, ...) on a GPU machine is the
paper's recipe.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.checkpoint import CheckpointError, has_checkpoint
from engine.compile import COMPILE_MODES
from engine.methods import METHODS, check_method_config
from engine.presets import (BACKBONES, DEFAULT_PRESET, LOADERS, PRESETS, ConfigError, demo_preset,
                            preset_config)
from pipelines.augment import AUGMENTATIONS
from engine.trainer import RunError, RunOptions, pretrain
from pipelines.datasets import DataError

# CLI flag -> config field, for the flags that change the configuration.
CONFIG_FLAGS = {"epochs": "epochs", "steps": "steps", "batch_size": "batch_size", "accum": "accum",
                "seed": "seed", "workers": "workers", "blr": "blr", "precision": "precision",
                "loss": "loss_form", "mask": "mask_kind", "optimizer": "optimizer",
                "log_every": "log_every", "checkpoint_every": "checkpoint_every",
                "loader": "loader", "eval_every": "eval_every", "backbone": "backbone",
                "augmentation": "augmentation"}
SIM_ONLY = ("loss", "mask")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.pretrain",
        description="Dense self-supervised pre-training: SIM and its dense family (MoCo v2, "
                    "DenseCL, PixPro, DenseSiam, LC-loss). Without --data it trains a small demo "
                    "model on the embedded sample of real photos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", default=None, choices=list(METHODS),
                        help="the objective; alone, it runs that method's small demo preset "
                             "(NAME-demo-cpu; sim: sim-demo-cpu)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help=f"model + recipe preset (default {DEFAULT_PRESET}, or the "
                             f"method's demo); sim-vit-b16, mocov2-r50, densecl-r50, pixpro-r50,"
                             f" densesiam-r50 and lcloss-r50 are the published recipes")
    parser.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a method hyperparameter (repeatable), e.g. temperature=0.2, "
                             "queue_length=4096, loss_lambda=0.5; see the method's file")
    parser.add_argument("--backbone", choices=list(BACKBONES), default=None,
                        help="vit, resnet18 or resnet50 (default: the preset's); every dense "
                             "method also runs on the ViT's patch grid")
    parser.add_argument("--augmentation", choices=list(AUGMENTATIONS), default=None,
                        help="two-view recipe: sim, byol (asymmetric blur/solarize) or mocov2 "
                             "(default: the preset's)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="image folder (class/img.jpg or flat); default: the embedded photos")
    parser.add_argument("--epochs", type=float, default=None,
                        help="length of the run in epochs (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="length of the run in optimiser steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per micro-batch (default: the preset's)")
    parser.add_argument("--accum", type=int, default=None,
                        help="micro-batches per optimiser step; effective batch = batch × accum")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/<preset>/<date-time>); with --resume "
                             "and no --out, the newest run of the preset that has a checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue the run in --out if it has a checkpoint, else start it "
                             "(for schedulers that re-run the same command after a pre-emption); "
                             "without --out: the newest run of the preset, as --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                        help="use the Triton kernels where this machine can run them (says in "
                             "one line what it falls back to); --no-fused: PyTorch reference path")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=list(COMPILE_MODES), metavar="MODE",
                        help="regional torch.compile of the method's blocks, heads and norms "
                             "(the kernels stay opaque ops); MODE: default, reduce-overhead "
                             "(CUDA graphs; fixed-shape batches) or max-autotune-no-cudagraphs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    parser.add_argument("--loader", choices=list(LOADERS), default=None,
                        help="two-view pipeline: torch (Pillow workers), dali (NVIDIA DALI; GPU, "
                             "or CPU-only mode), resident (images decoded once and kept and "
                             "augmented on the device); auto picks (default: the preset's)")
    parser.add_argument("--eval-data", default=None, metavar="TRAIN_DIR,VAL_DIR",
                        help="online kNN monitor: two labelled folders (class/img.jpg); kNN "
                             "top-1 is logged with the metrics and drawn on the loss plot")
    parser.add_argument("--eval-every", type=float, default=None, metavar="EPOCHS",
                        help="epochs between kNN evaluations (0: at the start and the end only; "
                             "default: the preset's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader worker processes (default: the preset's)")
    parser.add_argument("--blr", type=float, default=None,
                        help="base learning rate; lr = blr × effective batch / 256")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                        help="auto: bf16 autocast on GPU, fp32 on CPU; fp16 uses a GradScaler")
    parser.add_argument("--loss", choices=["dense", "paper"], default=None,
                        help="SIM: dense: released-code UniGrad loss (default); paper: global + "
                             "dense")
    parser.add_argument("--mask", choices=["block", "random"], default=None,
                        help="SIM: block: BEiT-style block-wise masking (default); random: "
                             "MAE-style")
    parser.add_argument("--optimizer", choices=["adamw", "sgd", "lars", "lamb"], default=None,
                        help="adamw (torch fused), sgd, lars (PixPro/BYOL's), lamb (needs "
                             "NVIDIA apex); default: the preset's")
    parser.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints (one is always written at the end)")
    parser.add_argument("--keep", type=int, default=2, metavar="N",
                        help="numbered checkpoints to keep (the newest N, each checksummed; a "
                             "corrupt newest one falls back to the one before on --resume)")
    parser.add_argument("--checkpoint-activations", action="store_true",
                        help="recompute each ViT block in the backward pass instead of keeping "
                             "its activations (less memory, about one more forward)")
    parser.add_argument("--proposals", default=None, metavar="FILE",
                        help="the selective-search cache for methods that use region proposals "
                             "(CCOP); default: the one python -m engine.proposals --data DIR "
                             "wrote in DIR")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard parameters, gradients and optimiser state "
                             "over the ranks (PyTorch FSDP2, one unit per block) instead of "
                             "replicating them (DDP); for ViT-L/H")
    parser.add_argument("--max-bad-steps", type=int, default=20, metavar="N",
                        help="a step with a non-finite loss or gradient is skipped (weights, EMA, "
                             "queues and BatchNorm statistics unchanged) and counted; after N in "
                             "a row the run does what --on-bad-steps says")
    parser.add_argument("--on-bad-steps", choices=["stop", "continue", "restore"],
                        default="stop",
                        help="stop: end with a one-line error (the checkpoint holds the last good "
                             "state); continue: say so and go on with the next batches; restore: "
                             "go back to the newest checkpoint from before the streak and go on "
                             "with the data stream where it is (the bad batches are not seen "
                             "again; at most 3 times)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N steps in this invocation (continue with --resume), "
                             "e.g. to fit a job time limit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def newest_run_with_checkpoint(preset: str) -> Path | None:
    root = Path("runs") / preset
    candidates = sorted(run for run in root.iterdir() if has_checkpoint(run)) \
        if root.is_dir() else []
    return candidates[-1] if candidates else None


def parse_eval_data(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise RunError(f"--eval-data takes two folders separated by a comma (TRAIN_DIR,VAL_DIR), "
                       f"got {value!r}")
    return parts[0], parts[1]


def parse_method_args(items: list[str]) -> dict:
    """["key=value", ...] -> {key: value} (values stay strings; the method converts them)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--method-arg takes KEY=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = value.strip()
    return values


def choose_preset(method: str | None, preset: str | None) -> str:
    """--preset wins; --method alone picks that method's demo preset; neither: SIM's demo."""
    if preset is None:
        if method is None:
            return DEFAULT_PRESET
        return DEFAULT_PRESET if method == "sim" else demo_preset(method)
    preset_method = PRESETS[preset].get("method", "sim")
    if method is not None and method != preset_method:
        raise ConfigError(f"--preset {preset} is a {preset_method} recipe but --method is {method}:"
                          f" drop one, or pick a {method}-* preset")
    return preset


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preset = choose_preset(args.method, args.preset)
        cfg = preset_config(preset)
        overrides = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
                     if getattr(args, flag) is not None}
        if cfg.method != "sim":
            used = [flag for flag in SIM_ONLY if getattr(args, flag) is not None]
            if used:
                raise ConfigError(f"--{used[0]} applies to --method sim only (this run is "
                                  f"{cfg.method})")
        if "epochs" in overrides and "steps" not in overrides:
            overrides["steps"] = None  # an explicit --epochs replaces a preset's step count
        for field, value in overrides.items():
            setattr(cfg, field, value)
        if args.max_bad_steps < 1:
            raise RunError(f"--max-bad-steps must be at least 1, got {args.max_bad_steps}")
        if args.keep < 1:
            raise RunError(f"--keep must be at least 1 (the newest checkpoint), got {args.keep}")
        method_args = parse_method_args(args.method_arg)
        if method_args:
            cfg.method_args = {**cfg.method_args, **method_args}
            overrides["method_args"] = cfg.method_args
        cfg.validate()
        check_method_config(cfg)
        out = args.out
        if args.auto_resume:
            found = out if out is not None and has_checkpoint(out) else (
                newest_run_with_checkpoint(preset) if out is None else None)
            args.resume, out = found is not None, found if found is not None else out
        if out is None and args.resume:
            out = newest_run_with_checkpoint(preset)
            if out is None:
                raise RunError(f"--resume: no run of preset {preset} with a checkpoint under "
                               f"runs/{preset}: pass --out RUN_FOLDER")
        if out is None:
            out = Path("runs") / preset / time.strftime("%Y%m%d-%H%M%S")
        run = RunOptions(out=out, data=args.data, device=args.device, fused=args.fused,
                         compile=args.compile, keep=args.keep,
                         max_bad_steps=args.max_bad_steps, on_bad_steps=args.on_bad_steps,
                         checkpoint_activations=args.checkpoint_activations, fsdp=args.fsdp,
                         proposals=args.proposals,
                         eval_data=parse_eval_data(args.eval_data),
                         resume=args.resume, stop_after=args.stop_after, quiet=args.quiet,
                         resume_overrides={k: v for k, v in overrides.items() if v is not None})
        pretrain(cfg, run)
    except (RunError, ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
