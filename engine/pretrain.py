"""`python -m engine.pretrain`: SIM pre-training from the command line.

With no arguments it trains the small CPU demo model on the embedded sample of real photos for a
few minutes and leaves a checkpoint, a JSON-lines metrics log and a loss-curve PNG in its output
folder. `--data DIR --preset sim-vit-b16` on a GPU machine is the paper's recipe.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.checkpoint import CHECKPOINT_NAME, CheckpointError
from engine.presets import DEFAULT_PRESET, LOADERS, PRESETS, ConfigError, preset_config
from engine.trainer import RunError, RunOptions, pretrain
from pipelines.datasets import DataError

# CLI flag -> config field, for the flags that change the configuration.
CONFIG_FLAGS = {"epochs": "epochs", "steps": "steps", "batch_size": "batch_size", "accum": "accum",
                "seed": "seed", "workers": "workers", "blr": "blr", "precision": "precision",
                "loss": "loss_form", "mask": "mask_kind", "optimizer": "optimizer",
                "log_every": "log_every", "checkpoint_every": "checkpoint_every",
                "loader": "loader", "eval_every": "eval_every"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.pretrain",
        description="Siamese Image Modeling (SIM) pre-training. Without --data it trains a small "
                    "demo model on the embedded sample of real photos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help="model + recipe preset; sim-vit-b16 is the released SIM recipe")
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
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                        help="use the Triton kernels where this machine can run them (says in "
                             "one line what it falls back to); --no-fused: PyTorch reference path")
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
                        help="dense: released-code UniGrad loss (default); paper: global + dense")
    parser.add_argument("--mask", choices=["block", "random"], default=None,
                        help="block: BEiT-style block-wise masking (default); random: MAE-style")
    parser.add_argument("--optimizer", choices=["adamw", "lamb"], default=None,
                        help="adamw: torch fused AdamW (default); lamb: needs NVIDIA apex")
    parser.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints (one is always written at the end)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N steps in this invocation (continue with --resume), "
                             "e.g. to fit a job time limit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def newest_run_with_checkpoint(preset: str) -> Path | None:
    root = Path("runs") / preset
    candidates = sorted(root.glob(f"*/{CHECKPOINT_NAME}")) if root.is_dir() else []
    return candidates[-1].parent if candidates else None


def parse_eval_data(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise RunError(f"--eval-data takes two folders separated by a comma (TRAIN_DIR,VAL_DIR), "
                       f"got {value!r}")
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = preset_config(args.preset)
        overrides = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
                     if getattr(args, flag) is not None}
        if "epochs" in overrides and "steps" not in overrides:
            overrides["steps"] = None  # an explicit --epochs replaces a preset's step count
        for field, value in overrides.items():
            setattr(cfg, field, value)
        cfg.validate()
        out = args.out
        if out is None and args.resume:
            out = newest_run_with_checkpoint(args.preset)
            if out is None:
                raise RunError(f"--resume: no run of preset {args.preset} with a checkpoint under "
                               f"runs/{args.preset}: pass --out RUN_FOLDER")
        if out is None:
            out = Path("runs") / args.preset / time.strftime("%Y%m%d-%H%M%S")
        run = RunOptions(out=out, data=args.data, device=args.device, fused=args.fused,
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
