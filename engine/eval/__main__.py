"""`python -m engine.eval knn|linear|correspondence`: evaluate a pre-trained backbone (any method's
ViT or ResNet) on a labelled image folder pair, or on held-out images for the dense metric.

    python -m engine.eval knn --checkpoint runs/x/checkpoint.pt \\
        --train-data cifar10/train --val-data cifar10/test
    python -m engine.eval linear --checkpoint runs/x --train-data DIR --val-data DIR
    python -m engine.eval knn --random-init --preset sim-vit-t4-cifar --train-data ... --val-data ...
    python -m engine.eval correspondence --checkpoint runs/x --val-data DIR   (no labels needed)

`correspondence` (engine/eval/correspondence.py): on pairs of random crops of each held-out image,
the fraction of view-1 cells whose most cosine-similar view-2 cell lies within one cell of its
geometric correspondent, with the chance level; `--random-init` gives the untrained floor.

Features are computed once per image with the deterministic eval transform (engine.eval.features),
then classified by the weighted kNN (k=20 and 200, T=0.07) or a linear probe (BN + Linear, SGD,
cosine lr). Prints a table and writes the result as JSON (default: eval_knn.json /
eval_linear.json next to the checkpoint). Bad input gives one `error:` line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError
from engine.encoders import load_encoder_with_info, resolve_checkpoint_path
from engine.eval.features import EvalDataset, extract_features, subsample_indices
from engine.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_classify
from engine.eval.linear import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, linear_probe
from engine.eval.correspondence import DEFAULT_CROP_SCALE, correspondence_accuracy
from engine.eval.online import labelled_folders
from engine.models.backbones import describe_backbone
from engine.presets import PRESETS, ConfigError, preset_config
from pipelines.datasets import DataError, ImageFolder

SUBSET_SEED = 0


class UsageError(ValueError):
    """Options that do not fit together; the message says which."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.eval",
        description="kNN or linear-probe evaluation of a densesim encoder on frozen features.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("task", choices=["knn", "linear", "correspondence", "pretext"],
                        help="knn: weighted kNN (InstDisc/DINO); linear: linear probe; "
                             "correspondence: dense matching of crop pairs (label-free); "
                             "pretext: a pre-trained detector (updetr, detreg, pairdetr) "
                             "finding its own pretext targets on held-out images (label-free)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint.pt of a run (or the run folder, or an exported .pth "
                             "with its .json)")
    parser.add_argument("--train-data", default=None, metavar="DIR",
                        help="labelled training images, class/img.jpg (knn, linear)")
    parser.add_argument("--val-data", required=True, metavar="DIR",
                        help="labelled validation images, the same class folders (for "
                             "correspondence: any held-out image folder)")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="correspondence: area range of the random crops (default 0.25 1)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="correspondence: render the crops at this size instead of the "
                             "backbone's training size (ResNets only: a finer map)")
    parser.add_argument("--random-init", action="store_true",
                        help="baseline: the checkpoint's (or --preset's) architecture with the "
                             "trainer's initialisation and seed, untrained")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="architecture for --random-init without a checkpoint")
    parser.add_argument("--encoder", choices=["online", "target"], default="online",
                        help="online: the trained encoder; target: its EMA copy")
    parser.add_argument("--features", choices=["patch", "cls", "both"], default="both",
                        help="patch: mean of the patch tokens; cls: the cls token")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_K),
                        help="kNN neighbour counts")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="kNN vote weight exp(similarity / T)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="linear probe epochs")
    parser.add_argument("--lr", type=float, default=None,
                        help="linear probe peak lr (default 0.1 × batch / 256)")
    parser.add_argument("--probe-batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="linear probe batch size")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="linear probe weight decay")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per forward pass when computing features")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="data-loader worker processes for decoding")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-train", type=int, default=None, metavar="N",
                        help="use a fixed random subset of N training images")
    parser.add_argument("--max-val", type=int, default=None, metavar="N",
                        help="use a fixed random subset of N validation images")
    parser.add_argument("--proposals", default=None, metavar="FILE",
                        help="pretext (detreg, pairdetr): the selective-search cache of "
                             "--val-data (default: the folder's own, python -m engine.proposals)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: eval_<task>.json next to the checkpoint)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown --device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return device


def check_options(args) -> None:
    if args.task not in ("correspondence", "pretext") and args.train_data is None:
        raise UsageError(f"{args.task} needs --train-data DIR (labelled training images)")
    if args.crop_scale is not None and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UsageError("--crop-scale needs 0 < MIN <= MAX <= 1")
    if args.checkpoint is None and not args.random_init:
        raise UsageError("--checkpoint is required (or --random-init --preset NAME for the "
                         "untrained baseline)")
    if args.preset is not None and (args.checkpoint is not None or not args.random_init):
        raise UsageError("--preset only applies with --random-init and no --checkpoint (a "
                         "checkpoint brings its own architecture)")
    if args.random_init and args.checkpoint is None and args.preset is None:
        raise UsageError("--random-init without --checkpoint needs --preset NAME for the "
                         "architecture")
    if min(args.k) < 1:
        raise UsageError("--k values must be at least 1")
    if args.temperature <= 0:
        raise UsageError("--temperature must be positive")
    for flag in ("batch_size", "epochs", "probe_batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise UsageError("--workers must be at least 0")
    for flag in ("max_train", "max_val"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.out is not None and args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder: give a file name, e.g. "
                         f"{args.out}/eval_{args.task}.json")


def default_out(args) -> Path:
    suffix = "_random_init" if args.random_init else ""
    if args.checkpoint is not None:
        return resolve_checkpoint_path(args.checkpoint).parent / f"eval_{args.task}{suffix}.json"
    return Path(f"eval_{args.task}{suffix}_{args.preset}.json")


def run(args) -> dict:
    check_options(args)
    if args.task == "correspondence":
        return run_correspondence(args)
    if args.task == "pretext":
        return run_pretext(args)
    started = time.perf_counter()
    train_folder, val_folder = labelled_folders(args.train_data, args.val_data)
    device = resolve_device(args.device)
    cfg = preset_config(args.preset) if args.preset else None
    encoder, cfg, info = load_encoder_with_info(args.checkpoint, device, args.random_init, cfg,
                                                args.encoder)
    step = None if args.random_init else info["step"]
    out = args.out or default_out(args)

    train = EvalDataset(train_folder, cfg.img_size,
                        subsample_indices(len(train_folder), args.max_train, SUBSET_SEED))
    val = EvalDataset(val_folder, cfg.img_size,
                      subsample_indices(len(val_folder), args.max_val, SUBSET_SEED))
    progress = not args.quiet
    if progress:
        print(f"{args.task}: {len(train)} train / {len(val)} val images, "
              f"{len(train_folder.classes)} classes; encoder {describe_backbone(cfg)}"
              f" ({cfg.method})"
              f"{' (random init)' if args.random_init else ''}; device {device}",
              file=sys.stderr, flush=True)
    train_features = extract_features(encoder, train, device, args.batch_size, args.workers,
                                       progress)
    val_features = extract_features(encoder, val, device, args.batch_size, args.workers,
                                    progress)
    features_seconds = time.perf_counter() - started
    kinds = ["patch", "cls"] if args.features == "both" else [args.features]
    num_classes = len(train_folder.classes)
    results: dict[str, dict] = {}
    notes: list[str] = []
    if "cls" in kinds and "cls" not in train_features.kinds:
        if args.features == "cls":
            raise UsageError("--features cls needs a ViT (it has a cls token); this encoder is "
                             "a ResNet: use --features patch (global average of C5)")
        kinds = ["patch"]
        notes.append("a ResNet has no cls token: 'patch' is the global average of C5")
    for kind in kinds:
        if args.task == "knn":
            knn = knn_classify(train_features.kind(kind), train_features.labels,
                               val_features.kind(kind), num_classes, tuple(args.k),
                               args.temperature, query_labels=val_features.labels)
            results[kind] = {str(k): {"top1": knn.top1[k], "top5": knn.top5[k],
                                      "k_used": knn.k_used[k]} for k in knn.k}
            notes += [n for n in knn.notes if n not in notes]
        else:
            probe = linear_probe(train_features.kind(kind), train_features.labels,
                                 val_features.kind(kind), val_features.labels, num_classes,
                                 epochs=args.epochs, batch_size=args.probe_batch_size,
                                 lr=args.lr, weight_decay=args.weight_decay, progress=progress)
            results[kind] = probe.summary()
    skipped = sorted(set(train_features.skipped) | set(val_features.skipped))
    report = {
        "task": args.task,
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "step": step,
        "random_init": args.random_init,
        "encoder": args.encoder,
        "preset": cfg.preset,
        "method": cfg.method,
        "model": ({"backbone": "vit", "img_size": cfg.img_size, "patch_size": cfg.patch_size,
                   "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "seed": cfg.seed}
                  if cfg.backbone == "vit" else
                  {"backbone": cfg.backbone, "cifar_stem": cfg.cifar_stem,
                   "img_size": cfg.img_size, "seed": cfg.seed}),
        "train_data": str(train_folder.root), "val_data": str(val_folder.root),
        "train_images": len(train), "val_images": len(val),
        "train_images_available": len(train_folder), "val_images_available": len(val_folder),
        "subset_seed": SUBSET_SEED, "num_classes": num_classes, "classes": train_folder.classes,
        "features": kinds,
        "transform": "shorter side > img_size: resize to img_size/0.875 + centre crop; else "
                     "resize; bicubic; ImageNet mean/std",
        "config": ({"k": list(args.k), "temperature": args.temperature} if args.task == "knn"
                   else {"epochs": args.epochs, "lr": args.lr, "batch_size":
                         args.probe_batch_size, "weight_decay": args.weight_decay,
                         "momentum": 0.9, "augmentation": "none (features precomputed once)"}),
        "results": results,
        "accuracy_unit": "fraction in [0, 1]",
        "notes": notes,
        "skipped_files": skipped,
        "elapsed_s": {"features": features_seconds,
                      "classify": time.perf_counter() - started - features_seconds,
                      "total": time.perf_counter() - started},
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.type == "cuda" else ""),
        "torch": torch.__version__,
    }
    _write(out, report)
    report["out"] = str(out)
    return report


def run_correspondence(args) -> dict:
    started = time.perf_counter()
    folder = ImageFolder(args.val_data)
    device = resolve_device(args.device)
    cfg = preset_config(args.preset) if args.preset else None
    encoder, cfg, info = load_encoder_with_info(args.checkpoint, device, args.random_init, cfg,
                                                args.encoder)
    out = args.out or default_out(args)
    indices = subsample_indices(len(folder), args.max_val, SUBSET_SEED)
    scale = tuple(args.crop_scale) if args.crop_scale else DEFAULT_CROP_SCALE
    size = args.img_size or cfg.img_size
    if size != cfg.img_size and cfg.backbone == "vit":
        raise UsageError(f"--img-size: a ViT runs at its own size ({cfg.img_size} px, fixed "
                         f"position table); drop --img-size")
    if size < 8:
        raise UsageError("--img-size must be at least 8")
    if not args.quiet:
        print(f"correspondence: {len(indices) if indices else len(folder)} images; encoder "
              f"{describe_backbone(cfg)} ({cfg.method})"
              f"{' (random init)' if args.random_init else ''}; device {device}",
              file=sys.stderr, flush=True)
    result = correspondence_accuracy(encoder, folder, size, indices, device,
                                     args.batch_size, args.workers, scale, seed=SUBSET_SEED,
                                     progress=not args.quiet)
    report = {
        "task": "correspondence",
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "step": None if args.random_init else info["step"],
        "random_init": args.random_init, "encoder": args.encoder, "preset": cfg.preset,
        "method": cfg.method, "backbone": describe_backbone(cfg),
        "val_data": str(folder.root), "images": result.pairs, "crop_scale": list(scale),
        "img_size": size,
        "results": result.summary(),
        "definition": "fraction of view-1 cells in the overlap whose most cosine-similar view-2 "
                      "cell (backbone features, dense_match) lies within 1 cell (hit@1) / 0.5 "
                      "cell (hit@0.5) of the geometric correspondent; displaced_hit@1: the same "
                      "on the cells whose correspondent is more than 1 cell from their own grid "
                      "position (the headline: the same-position shortcut fails there); "
                      "identity_hit@1: the shortcut's score; chance = a uniformly random cell",
        "skipped_files": [],
        "elapsed_s": {"total": time.perf_counter() - started},
        "device": str(device), "torch": torch.__version__,
    }
    _write(out, report)
    report["out"] = str(out)
    return report


def run_pretext(args) -> dict:
    """The detector's pretext detection quality on held-out images (engine/eval/pretext.py)."""
    import dataclasses

    from engine.encoders import read_checkpoint
    from engine.eval.pretext import evaluate_pretext
    from engine.loaders import build_loader
    from engine.methods import build_method
    from engine.methods.base import skip_initial_weights
    from engine.presets import PretrainConfig
    from engine.trainer import RunError, load_run_proposals, seed_everything

    started = time.perf_counter()
    device = resolve_device(args.device)
    checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    cfg = (PretrainConfig.from_dict(checkpoint["config"]) if checkpoint is not None
           else preset_config(args.preset))
    seed_everything(cfg.seed)          # the trainer's initialisation (the random-init floor)
    if checkpoint is not None and not args.random_init:
        with skip_initial_weights():   # every tensor comes from the checkpoint
            method = build_method(cfg)
    else:
        method = build_method(cfg)     # with the initial weights its hyperparameters name
    if not hasattr(method, "detections"):
        raise UsageError(f"pretext: method {cfg.method} trains no detector (updetr, detreg and "
                         f"pairdetr do); use knn, linear or correspondence")
    if checkpoint is not None and not args.random_init:
        method.load_state_dict(checkpoint["model"])
    method.to(device)
    views = method.views
    proposals = None
    if views.proposals:
        try:
            proposals, _ = load_run_proposals(args.val_data, args.proposals, views.proposals,
                                              cfg.method)
        except RunError as exc:
            raise UsageError(str(exc)) from exc
    batch = min(args.batch_size, 16)
    eval_cfg = dataclasses.replace(cfg, loader="torch", batch_size=batch, workers=args.workers,
                                   seed=SUBSET_SEED)
    loader, _ = build_loader(eval_cfg, args.val_data, device, fused=False, views=views,
                             proposals=proposals)
    max_images = args.max_val or 256
    if not args.quiet:
        print(f"pretext: {max_images} images of {args.val_data}; {cfg.method} on "
              f"{describe_backbone(cfg)}{' (random init)' if args.random_init else ''}; "
              f"device {device}", file=sys.stderr, flush=True)
    scores = evaluate_pretext(method, loader, device, max_images, SUBSET_SEED,
                              progress=not args.quiet)
    out = args.out or default_out(args)
    report = {
        "task": "pretext",
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "step": None if checkpoint is None or args.random_init else checkpoint.get("step"),
        "random_init": args.random_init, "preset": cfg.preset, "method": cfg.method,
        "backbone": describe_backbone(cfg), "val_data": str(args.val_data),
        "img_size": cfg.img_size, "seed": SUBSET_SEED,
        "results": scores.summary(),
        "definition": "class-agnostic detection of the method's own pretext targets (UP-DETR: "
                      "the random query patches given as queries; DETReg / Pair DETR: the "
                      "image's selective-search proposals) on one augmented view of each "
                      "held-out image (the training loader's views, fixed seed): AP50 / AP75 "
                      "(greedy matching by score, all-point interpolation), AR@k at IoU 0.5 "
                      "over the top-k predictions per image, mean best IoU per target; "
                      "heldout_loss: the method's training loss and terms on the same batches "
                      "(eval mode, no gradient), averaged over batches",
        "elapsed_s": {"total": time.perf_counter() - started},
        "device": str(device), "torch": torch.__version__,
    }
    _write(out, report)
    report["out"] = str(out)
    return report


def _write(out: Path, report: dict) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    except OSError as exc:
        raise UsageError(f"cannot write {out} ({exc.strerror or exc}): choose a writable "
                         f"--out") from exc


def format_table(report: dict) -> str:
    lines = []
    if report["task"] == "pretext":
        r = report["results"]
        recalls = "  ".join(f"{k} {100 * v:.1f}" for k, v in r.items() if k.startswith("AR@"))
        return (f"AP50 {100 * r['AP50']:.2f}  AP75 {100 * r['AP75']:.2f}  {recalls}  "
                f"mean best IoU {r['mean_best_iou']:.3f}  held-out loss "
                f"{r['heldout_loss'].get('loss', float('nan')):.3f}\n"
                f"{r['images']} images, {r['targets']} "
                f"targets, {r['predictions_per_image']} predictions per image, "
                f"{report['device']}, {report['elapsed_s']['total']:.1f} s"
                + (" (random init)" if report["random_init"] else "")
                + f"; written to {report['out']}")
    if report["task"] == "correspondence":
        r = report["results"]
        return "\n".join([
            f"{'metric':<18} {'value %':>8} {'chance %':>9}",
            f"{'hit@1 (displaced)':<18} {100 * r['displaced_hit@1']:8.2f} "
            f"{100 * r['chance_displaced_hit@1']:9.2f}",
            f"{'hit@1':<18} {100 * r['hit@1']:8.2f} {100 * r['chance_hit@1']:9.2f}",
            f"{'hit@0.5':<18} {100 * r['hit@0.5']:8.2f} {100 * r['chance_hit@0.5']:9.2f}",
            f"{'same-position':<18} {100 * r['identity_hit@1']:8.2f}",
            f"{r['pairs']} crop pairs, {r['overlap_cells']} overlap cells "
            f"({r['displaced_cells']} displaced) on a {r['grid']}x{r['grid']} map, "
            f"{report['device']}, {report['elapsed_s']['total']:.1f} s"
            + (" (random init)" if report["random_init"] else "")
            + f"; written to {report['out']}"])
    if report["task"] == "knn":
        lines.append(f"{'features':<9} {'k':>5} {'top-1 %':>8} {'top-5 %':>8}")
        for kind, per_k in report["results"].items():
            for k, values in per_k.items():
                lines.append(f"{kind:<9} {k:>5} {100 * values['top1']:8.2f} "
                             f"{100 * values['top5']:8.2f}")
    else:
        lines.append(f"{'features':<9} {'top-1 %':>8} {'top-5 %':>8} {'train top-1 %':>14}")
        for kind, values in report["results"].items():
            lines.append(f"{kind:<9} {100 * values['top1']:8.2f} {100 * values['top5']:8.2f} "
                         f"{100 * values['train_top1']:14.2f}")
    lines.append(f"{report['train_images']} train / {report['val_images']} val images, "
                 f"{report['num_classes']} classes, {report['device']}, "
                 f"{report['elapsed_s']['total']:.1f} s"
                 + (" (random init)" if report["random_init"] else "")
                 + f"; written to {report['out']}")
    lines += [f"note: {note}" for note in report["notes"]]
    if report["skipped_files"]:
        lines.append(f"note: {len(report['skipped_files'])} unreadable images were replaced by "
                     f"their neighbours (listed in the JSON)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (UsageError, DataError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
