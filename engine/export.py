"""`python -m engine.export`: the online backbone of a densesim checkpoint as a plain state dict
that detection and segmentation codebases load: a ViT in timm's names (ViTDet, mmdet/mmseg,
MAE/BEiT fine-tuning code), a ResNet in torchvision's (Detectron2/mmdet's torchvision-style
loaders, torchvision itself) — whatever method trained it.

    python -m engine.export --checkpoint runs/x/checkpoint.pt --out encoder.pth

writes `encoder.pth` (torch.save of {name: tensor}; loads with weights_only=True) and
`encoder.pth.json` (format, architecture, how to build the matching timm/torchvision model,
provenance). The formats and their mapping are documented in engine/encoders.py, the one place
that reads and writes backbones.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.checkpoint import CheckpointError
from engine.encoders import write_export


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out, meta_path = write_export(args.checkpoint, args.out, args.encoder)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
