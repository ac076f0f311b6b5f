"""`python -m engine.export`: the online backbone of a densesim checkpoint as a plain state dict
that detection and segmentation codebases load: a ViT in timm's names (ViTDet, mmdet/mmseg,
MAE/BEiT fine-tuning code), a ResNet in torchvision's (Detectron2/mmdet's torchvision-style
loaders, torchvision itself) — whatever method trained it.

    python -m engine.export --checkpoint runs/x/checkpoint.pt --out encoder.pth

writes `encoder.pth` (torch.save of {name: tensor}; loads with weights_only=True) and
`encoder.pth.json` (format, architecture, how to build the matching timm/torchvision model,
provenance). The formats and their mapping are documented in engine/encoders.py, the one place
that reads and writes backbones.

A checkpoint of a detector method (updetr, detreg, pairdetr: any method holding a DETR or
Deformable DETR) ALSO gets the whole pre-trained detector in the official repos' checkpoint
layout, `encoder-detector.pth` beside `encoder.pth` (or `--detector FILE`; `--no-detector` skips
it): {"model": state dict with facebookresearch/detr (UP-DETR) or fundamentalvision/
Deformable-DETR (DETReg) names, "pretext_heads": the pre-training-only heads}, + FILE.json saying
which official flags build the same model and how each official fine-tuning script loads it
(UP-DETR / DETReg `--pretrain FILE` drop class_embed and load the rest non-strictly).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.checkpoint import CheckpointError
from engine.encoders import (export_detector, holds_detector, read_checkpoint,
                             resolve_checkpoint_path, write_detector_file, write_export)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.export",
        description="Write the backbone of a densesim checkpoint as a timm-named ViT or a "
                    "torchvision-named ResNet state dict (FILE) with its architecture and "
                    "loading instructions (FILE.json).")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="checkpoint.pt of a run, or the run folder")
    parser.add_argument("--out", required=True, type=Path, help="output file, e.g. encoder.pth")
    parser.add_argument("--encoder", choices=["online", "target"], default="online",
                        help="online: the trained encoder (default); target: its EMA copy")
    detector = parser.add_mutually_exclusive_group()
    detector.add_argument("--detector", type=Path, default=None, metavar="FILE",
                          help="a detector method's checkpoint: where to write the whole "
                               "detector in the official DETR / Deformable DETR layout (default: "
                               "OUT with '-detector' before its suffix)")
    detector.add_argument("--no-detector", action="store_true",
                          help="write only the backbone, also for a detector method")
    return parser


def default_detector_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-detector{out.suffix}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    detector_files = None
    try:
        path = resolve_checkpoint_path(args.checkpoint)
        checkpoint = read_checkpoint(path)
        detector = holds_detector(checkpoint)
        if args.detector is not None and not detector:
            raise CheckpointError(f"--detector: the {checkpoint.get('method', 'method')} "
                                  f"checkpoint {path} holds no DETR or Deformable DETR (only "
                                  f"updetr, detreg and pairdetr train one)")
        target = None
        if detector and not args.no_detector:
            target = Path(args.detector or default_detector_path(Path(args.out))).expanduser()
            if target == Path(args.out).expanduser():
                raise CheckpointError("--detector and --out name the same file")
            if target.is_dir():
                raise CheckpointError(f"--detector {target} is a folder: give a file name, e.g. "
                                      f"{target}/detector.pth")
        payload = None
        if target is not None:              # built and checked before anything is written
            payload, detector_meta = export_detector(checkpoint)
            detector_meta["source"]["checkpoint"] = str(path)
        out, meta_path = write_export(path, args.out, args.encoder, checkpoint)
        if payload is not None:
            detector_files = write_detector_file(target, payload, detector_meta)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    arch = meta["architecture"]
    if meta["format"] == "torchvision-resnet":
        print(f"wrote {out} (torchvision {arch['backbone']} without fc"
              f"{', CIFAR stem' if arch['cifar_stem'] else ''}) and {meta_path.name}")
    else:
        print(f"wrote {out} ({arch['depth']} blocks, width {arch['dim']}, patch "
              f"{arch['patch_size']}, {arch['img_size']} px; no final norm) and {meta_path.name}")
    if detector_files is not None:
        file, detector_meta = detector_files
        info = json.loads(detector_meta.read_text())
        kind = "DETR" if info["format"] == "detr" else "Deformable DETR"
        heads = len(info["pretext_heads"])
        print(f"wrote {file} (the whole {kind}, official names: {info['official_args']}"
              + (f"; {heads} pretext-head tensors under 'pretext_heads'" if heads else "")
              + f") and {detector_meta.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
