"""`python -m engine.export`: the online encoder of a densesim checkpoint as a plain state dict in
timm's ViT naming, the format detection / segmentation codebases (ViTDet, mmdet/mmseg, MAE/BEiT
fine-tuning code) load.

    python -m engine.export --checkpoint runs/x/checkpoint.pt --out sim_vit_b16.pth

writes `sim_vit_b16.pth` (torch.save of {name: fp32 tensor}; loads with weights_only=True) and
`sim_vit_b16.pth.json` (architecture, how to build the timm model, provenance).

Mapping (checked against timm 1.0.31's VisionTransformer): our ViT already uses timm's names and
layouts, so every tensor keeps its name once the `encoder.` prefix is dropped —
  patch_embed.proj.weight (D, 3, p, p) conv weight, patch_embed.proj.bias (D,),
  cls_token (1, 1, D), pos_embed (1, 1 + G², D) with a zero cls row (timm's layout with
  class_token=True, no_embed_class=False; ours is a fixed 2-D sin-cos table, row half first),
  blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}.
The blocks compute what timm's do (pre-norm, LayerNorm eps 1e-6, qkv with bias, scaled-dot-product
attention with scale head_dim^-½, exact GELU MLP of width mlp_ratio·D).
What differs: SIM's ViT has NO final LayerNorm (the raw residual stream is the output), and timm's
has one (`norm`, or `fc_norm` with global_pool='avg'). A LayerNorm cannot be written as an identity,
so the export has no norm tensors; build the timm model with `final_norm=False` (recent timm;
checked with timm 1.0.31: strict load, same tokens and pooled features), or set
`model.norm = model.fc_norm = torch.nn.Identity()` before `load_state_dict`. A downstream
codebase that adds its own norm after the backbone (ViTDet, mmseg's `final_norm`) trains it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError
from engine.eval.encoder import encoder_state, read_checkpoint, resolve_checkpoint_path
from engine.models.vit import VisionTransformer
from engine.presets import PretrainConfig

EXPORT_FORMAT = "timm-vit"
BLOCK_TENSORS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                 "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                 "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
# timm's standard ViT model names, by (patch, dim, depth, heads): a hint in the metadata only.
TIMM_NAMES = {(16, 192, 12, 3): "vit_tiny_patch16_224", (16, 384, 12, 6): "vit_small_patch16_224",
              (16, 768, 12, 12): "vit_base_patch16_224", (16, 1024, 24, 16): "vit_large_patch16_224",
              (8, 384, 12, 6): "vit_small_patch8_224", (8, 768, 12, 12): "vit_base_patch8_224"}


def timm_vit_shapes(img_size: int, patch_size: int, dim: int, depth: int,
                    mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a timm ViT's backbone tensors (no norm, no head), in timm's order."""
    tokens = 1 + (img_size // patch_size) ** 2
    hidden = int(dim * mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
        "patch_embed.proj.weight": (dim, 3, patch_size, patch_size),
        "patch_embed.proj.bias": (dim,)}
    per_block = {"norm1.weight": (dim,), "norm1.bias": (dim,),
                 "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
                 "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                 "norm2.weight": (dim,), "norm2.bias": (dim,),
                 "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
                 "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
    for i in range(depth):
        for name in BLOCK_TENSORS:
            shapes[f"blocks.{i}.{name}"] = per_block[name]
    return shapes


def _our_name(timm_name: str) -> str:
    """timm name -> our VisionTransformer's name (the identity today; the one place to change if
    either side renames)."""
    return timm_name


def _check_shapes(state: dict, expected: dict, what: str) -> None:
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {v}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != v]
    if missing or extra or wrong:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:4])}" if missing else "",
            f"unexpected {', '.join(extra[:4])}" if extra else "",
            f"shape {', '.join(wrong[:3])}" if wrong else ""]))
        raise CheckpointError(f"{what} does not match the timm ViT layout of its config: {details}")


def export_timm_state_dict(checkpoint: str | Path | dict,
                           branch: str = "online") -> dict[str, torch.Tensor]:
    """The encoder of `checkpoint` (a path, a run folder, or a loaded checkpoint dict) as
    {timm name: contiguous fp32 CPU tensor}, in timm's key order; validated name by name and
    shape by shape. branch: "online" (default) or "target" (the EMA encoder)."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    ours = encoder_state(checkpoint["model"], branch)
    expected = timm_vit_shapes(cfg.img_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.mlp_ratio)
    state = {name: ours[_our_name(name)] for name in expected if _our_name(name) in ours}
    extra = sorted(set(ours) - {_our_name(name) for name in expected})
    if extra:
        raise CheckpointError(f"the checkpoint's encoder has tensors the export does not map: "
                              f"{', '.join(extra[:4])}")
    _check_shapes(state, expected, "the checkpoint's encoder")
    return {name: tensor.detach().to("cpu", torch.float32).contiguous().clone()
            for name, tensor in state.items()}


def export_metadata(cfg: PretrainConfig, source: str | None = None, step: int | None = None,
                    branch: str = "online") -> dict:
    """What a user needs to build the matching timm model (stored as FILE.json)."""
    kwargs = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.dim,
              "depth": cfg.depth, "num_heads": cfg.heads, "mlp_ratio": cfg.mlp_ratio,
              "qkv_bias": True, "class_token": True, "no_embed_class": False,
              "global_pool": "avg", "final_norm": False, "num_classes": 0}
    name = TIMM_NAMES.get((cfg.patch_size, cfg.dim, cfg.depth, cfg.heads))
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return {
        "format": EXPORT_FORMAT,
        "architecture": {"img_size": cfg.img_size, "patch_size": cfg.patch_size,
                         "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads,
                         "mlp_ratio": cfg.mlp_ratio, "grid": cfg.grid,
                         "final_norm": False, "layer_norm_eps": 1e-6},
        "timm_model_name": name,
        "timm_kwargs": kwargs,
        "usage": (f"model = timm.models.vision_transformer.VisionTransformer({call}); "
                  f"model.load_state_dict(torch.load(FILE, weights_only=True)). "
                  f"A timm without the final_norm argument (older releases): drop it and set "
                  f"model.norm = model.fc_norm = torch.nn.Identity() before loading."),
        "input": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "note": "RGB in [0, 1], ImageNet-normalised, as in pre-training"},
        "notes": ["no final LayerNorm: SIM's encoder output is the raw residual stream",
                  ("pos_embed is SIM's fixed 2-D sin-cos table (row half first), cls slot "
                   "zeros; timm resamples it for another image size"),
                  "patch_embed is SIM's frozen random projection (MoCo v3 style)"],
        "source": {"checkpoint": source, "step": step, "preset": cfg.preset, "seed": cfg.seed,
                   "branch": branch, "torch": torch.__version__},
    }


def write_export(checkpoint_path: str | Path, out: str | Path,
                 branch: str = "online") -> tuple[Path, Path]:
    """Write FILE (the state dict) and FILE.json (metadata), each atomically; returns both."""
    path = resolve_checkpoint_path(checkpoint_path)
    checkpoint = read_checkpoint(path)
    state = export_timm_state_dict(checkpoint, branch)
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    meta = export_metadata(cfg, str(path), checkpoint.get("step"), branch)
    out = Path(out).expanduser()
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a folder: give a file name, e.g. {out}/encoder.pth")
    meta_path = out.with_name(out.name + ".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, out)
        tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, meta_path)
    except OSError as exc:
        raise CheckpointError(f"cannot write {out} ({exc.strerror or exc}): choose a writable "
                              f"--out") from exc
    return out, meta_path


# ----------------------------------------------------------------------------- the way back
def encoder_from_timm_state_dict(state: dict[str, torch.Tensor], img_size: int, patch_size: int,
                                 dim: int, depth: int, heads: int,
                                 mlp_ratio: float = 4.0) -> VisionTransformer:
    """Our VisionTransformer holding an exported (timm-named) state dict: the inverse mapping.
    Strict: every backbone tensor must be there with its shape; timm's norm/fc_norm/head tensors,
    if present, are refused (our ViT has no final norm, so dropping them would change outputs)."""
    expected = timm_vit_shapes(img_size, patch_size, dim, depth, mlp_ratio)
    _check_shapes(dict(state), expected, "the state dict")
    encoder = VisionTransformer(img_size, patch_size, dim, depth, heads, mlp_ratio)
    encoder.load_state_dict({_our_name(name): tensor for name, tensor in state.items()},
                            strict=True)
    return encoder


def load_exported_encoder(path: str | Path) -> tuple[VisionTransformer, PretrainConfig,
                                                     int | None]:
    """An exported FILE (with FILE.json beside it) back into our VisionTransformer, a
    PretrainConfig holding its architecture and seed (the rest of the config is not exported),
    and the training step it was exported at."""
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    try:
        meta = json.loads(meta_path.read_text())
        arch = meta["architecture"]
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read exported encoder {path} (+ {meta_path.name}): "
                              f"{type(exc).__name__}: {exc}") from exc
    encoder = encoder_from_timm_state_dict(state, arch["img_size"], arch["patch_size"],
                                           arch["dim"], arch["depth"], arch["heads"],
                                           arch.get("mlp_ratio", 4.0))
    source = meta.get("source") or {}
    cfg = PretrainConfig(img_size=arch["img_size"], patch_size=arch["patch_size"],
                         dim=arch["dim"], depth=arch["depth"], heads=arch["heads"],
                         mlp_ratio=arch.get("mlp_ratio", 4.0), seed=source.get("seed", 0),
                         preset=source.get("preset") or "custom")
    return encoder, cfg, source.get("step")


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.export",
        description="Write the encoder of a densesim checkpoint as a timm-named ViT state dict "
                    "(FILE) with its architecture and loading instructions (FILE.json).")
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
    print(f"wrote {out} ({arch['depth']} blocks, width {arch['dim']}, patch "
          f"{arch['patch_size']}, {arch['img_size']} px; no final norm) and {meta_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
