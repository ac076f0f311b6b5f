"""Backbones out of checkpoints and exports, and into exports: the one home of that code.

Every method (engine/methods/) names its online backbone `encoder` and its EMA copy, where it has
one, `target_encoder`, so a checkpoint's model state dict holds the backbone under `encoder.*`
(`target_encoder.*`) whatever the method. A checkpoint (engine/trainer.py `_save`) is a dict with
`method`, `model` (the method's state dict) and `config` (PretrainConfig.to_dict()); a run folder
holding `checkpoint.pt` is accepted in place of the file.

Export formats (`python -m engine.export`, FILE + FILE.json):
  timm-vit             our ViT already uses timm's names and layouts: every tensor keeps its name
                       once the `encoder.` prefix is dropped — patch_embed.proj.weight (D, 3, p, p),
                       patch_embed.proj.bias, cls_token (1, 1, D), pos_embed (1, 1 + G², D) with a
                       zero cls row (timm's class_token=True, no_embed_class=False layout; ours is a
                       fixed 2-D sin-cos table, row half first), blocks.i.{norm1, attn.qkv,
                       attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}. SIM's ViT has NO final
                       LayerNorm and timm's has one, so the export has no norm tensors: build the
                       timm model with `final_norm=False` (checked with timm 1.0.31: strict load,
                       same tokens and pooled features), or set `model.norm = model.fc_norm =
                       torch.nn.Identity()` before `load_state_dict`.
  torchvision-resnet   our ResNet uses torchvision's names, shapes and order (engine/models/
                       resnet.py): the export is exactly torchvision's `resnet18()` / `resnet50()`
                       state dict without `fc.weight`/`fc.bias` (the encoder has no classifier).
                       Load it into torchvision with `model.fc = torch.nn.Identity()` then
                       `model.load_state_dict(state)` (strict), or `strict=False` keeping fc. With
                       the CIFAR stem, conv1 is 3×3 (64, 3, 3, 3) and the max-pool is skipped: build
                       torchvision's model with `model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)`
                       and `model.maxpool = nn.Identity()` (the JSON says so).
An exported file is accepted wherever a checkpoint is (evaluation), so an export can be evaluated
without its training run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from engine.checkpoint import CHECKPOINT_NAME, CheckpointError
from engine.models.backbones import build_backbone
from engine.models.resnet import ResNet, build_resnet, torchvision_resnet_state_keys
from engine.models.vit import VisionTransformer
from engine.presets import PretrainConfig

BRANCH_PREFIXES = {"online": "encoder.", "target": "target_encoder."}
# Wrappers that may prefix a state dict's keys (DDP, torch.compile); stripped when present.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding `checkpoint.pt`; CheckpointError otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            raise CheckpointError(f"{path} is a folder without {CHECKPOINT_NAME}: pass the "
                                  f"checkpoint file or a run folder that holds one")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the checkpoint.pt of a "
                              f"run (or its run folder)")
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Load a densesim checkpoint (on the CPU) and check that it has a model and its config."""
    path = resolve_checkpoint_path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: one line, no deep traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= set(checkpoint):
        raise CheckpointError(f"{path} is not a densesim checkpoint (expected the 'model' and "
                              f"'config' entries written by python -m engine.pretrain)")
    return checkpoint


def encoder_state(model_state: dict, branch: str = "online") -> dict[str, torch.Tensor]:
    """The encoder's own state dict (prefix removed) out of a SIM state dict."""
    if branch not in BRANCH_PREFIXES:
        raise ValueError(f"unknown encoder branch {branch!r}: use online or target")
    prefix = BRANCH_PREFIXES[branch]
    state = {}
    for key, value in model_state.items():
        for wrapper in _WRAPPER_PREFIXES:
            key = key.removeprefix(wrapper)
        if key.startswith(prefix):
            state[key[len(prefix):]] = value
    if not state:
        raise CheckpointError(f"the checkpoint's model has no '{prefix}*' entries"
                              + (" (this method has no EMA encoder)" if branch == "target" else
                                 ": it is not a densesim model state dict"))
    return state


def build_encoder(cfg: PretrainConfig, seed: int | None = None) -> nn.Module:
    """The backbone of `cfg` (ViT or ResNet), initialised exactly as at step 0 of training.

    The trainer seeds torch with `cfg.seed` (+ rank 0) and then builds the method, whose first
    module is its backbone, so seeding and building the backbone alone draws the same weights
    (tested against a real run). The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        return build_backbone(cfg)


def with_batch_counters(state: dict, expected) -> dict:
    """`state` with a 0 `num_batches_tracked` added for every BatchNorm of `expected` (names) whose
    other statistics are there but whose counter is not: a backbone with FrozenBatchNorm2d (the
    detector methods' frozen-BN ResNet, DETR's convention) has no counters, and torchvision's
    layout does. The counter only matters to BatchNorm's momentum=None mode, which nothing uses."""
    missing = [name for name in expected if name.endswith("num_batches_tracked")
               and name not in state
               and name.removesuffix("num_batches_tracked") + "running_mean" in state]
    if not missing:
        return state
    state = dict(state)
    for name in missing:
        state[name] = torch.zeros((), dtype=torch.int64)
    return state


# ----------------------------------------------------------------------------- export: ViT (timm)
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


def _check_shapes(state: dict, expected: dict, what: str, layout: str = "timm ViT") -> None:
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {v}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != v]
    if missing or extra or wrong:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:4])}" if missing else "",
            f"unexpected {', '.join(extra[:4])}" if extra else "",
            f"shape {', '.join(wrong[:3])}" if wrong else ""]))
        raise CheckpointError(f"{what} does not match the {layout} layout of its config: {details}")


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


# ----------------------------------------------------------------------------- export: ResNet
RESNET_FORMAT = "torchvision-resnet"


def export_torchvision_state_dict(checkpoint: str | Path | dict,
                                  branch: str = "online") -> dict[str, torch.Tensor]:
    """The ResNet encoder of `checkpoint` as torchvision's resnet18/resnet50 state dict without
    fc, keys in torchvision's order, fp32 CPU tensors (num_batches_tracked stays int64)."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    ours = encoder_state(checkpoint["model"], branch)
    expected = dict(torchvision_resnet_state_keys(cfg.backbone))
    if cfg.cifar_stem:
        expected["conv1.weight"] = (64, 3, 3, 3)
    ours = with_batch_counters(ours, expected)
    _check_shapes(ours, expected, "the checkpoint's encoder", "torchvision ResNet")
    return {name: (ours[name].detach().to("cpu", torch.float32) if ours[name].is_floating_point()
                   else ours[name].detach().to("cpu")).contiguous().clone() for name in expected}


def export_state_dict(checkpoint: str | Path | dict, branch: str = "online"
                      ) -> dict[str, torch.Tensor]:
    """The encoder in its export format: timm names for a ViT, torchvision's for a ResNet."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    if cfg.backbone == "vit":
        return export_timm_state_dict(checkpoint, branch)
    return export_torchvision_state_dict(checkpoint, branch)


def resnet_export_metadata(cfg: PretrainConfig, source: str | None = None,
                           step: int | None = None, branch: str = "online") -> dict:
    stem = ("model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
            "model.maxpool = torch.nn.Identity(); ") if cfg.cifar_stem else ""
    return {
        "format": RESNET_FORMAT,
        "architecture": {"backbone": cfg.backbone, "cifar_stem": cfg.cifar_stem,
                         "img_size": cfg.img_size, "fc": False},
        "torchvision_model_name": cfg.backbone,
        "usage": (f"model = torchvision.models.{cfg.backbone}(); {stem}model.fc = "
                  f"torch.nn.Identity(); model.load_state_dict(torch.load(FILE, "
                  f"weights_only=True))"),
        "input": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "note": "RGB in [0, 1], ImageNet-normalised, as in pre-training"},
        "notes": ["no fc: the encoder ends at layer4 (C5); torchvision's avgpool + an Identity fc "
                  "give the pooled 512/2048-d feature"]
                 + (["CIFAR stem: conv1 is 3x3 stride 1 and there is no max-pool"]
                    if cfg.cifar_stem else []),
        "source": {"checkpoint": source, "step": step, "preset": cfg.preset, "seed": cfg.seed,
                   "method": cfg.method, "branch": branch, "torch": torch.__version__},
    }


def write_export(checkpoint_path: str | Path, out: str | Path,
                 branch: str = "online", checkpoint: dict | None = None) -> tuple[Path, Path]:
    """Write FILE (the state dict) and FILE.json (metadata), each atomically; returns both.
    `checkpoint`: the file already loaded (it is read otherwise)."""
    path = resolve_checkpoint_path(checkpoint_path)
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    state = export_state_dict(checkpoint, branch)
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    meta = (export_metadata if cfg.backbone == "vit" else resnet_export_metadata)(
        cfg, str(path), checkpoint.get("step"), branch)
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


# ----------------------------------------------------------------------------- export: detectors
DETR_FORMAT = "detr"                        # facebookresearch/detr, dddzg/up-detr
DEFORMABLE_DETR_FORMAT = "deformable-detr"  # fundamentalvision/Deformable-DETR, amirbar/DETReg
DETECTOR_FORMATS = (DETR_FORMAT, DEFORMABLE_DETR_FORMAT)
_LINEAR = ("weight", "bias")
_ATTENTION = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_DEFORM_ATTENTION = tuple(f"{m}.{t}" for m in ("sampling_offsets", "attention_weights",
                                                "value_proj", "output_proj") for t in _LINEAR)


def _names(prefix: str, modules, tensors=_LINEAR) -> list[str]:
    return [f"{prefix}{m}.{t}" for m in modules for t in tensors]


def official_backbone_keys(backbone: str) -> list[str]:
    """`backbone.0.body.*` of DETR / Deformable DETR: torchvision's ResNet under
    IntermediateLayerGetter (stem to layer4, no fc) with FrozenBatchNorm2d (weight, bias,
    running_mean, running_var: no num_batches_tracked)."""
    return [f"backbone.0.body.{name}" for name in torchvision_resnet_state_keys(backbone)
            if not name.endswith("num_batches_tracked")]


def official_detr_keys(arch: dict) -> list[str]:
    """The state-dict keys of facebookresearch/detr's DETR (models/detr.py, transformer.py,
    backbone.py; UP-DETR's models/updetr.py adds only its pretext heads), for `arch` as
    `detector_architecture` gives it: transformer (encoder norm only with pre_norm), class_embed,
    bbox_embed (3-layer MLP), query_embed, input_proj (one 1x1 conv), backbone."""
    keys = []
    for i in range(arch["enc_layers"]):
        p = f"transformer.encoder.layers.{i}."
        keys += [p + "self_attn." + t for t in _ATTENTION]
        keys += _names(p, ("linear1", "linear2", "norm1", "norm2"))
    if arch["pre_norm"]:
        keys += _names("transformer.encoder.", ("norm",))
    for i in range(arch["dec_layers"]):
        p = f"transformer.decoder.layers.{i}."
        keys += [p + a + "." + t for a in ("self_attn", "multihead_attn") for t in _ATTENTION]
        keys += _names(p, ("linear1", "linear2", "norm1", "norm2", "norm3"))
    keys += _names("transformer.decoder.", ("norm",))
    keys += _names("", ("class_embed",) + tuple(f"bbox_embed.layers.{k}" for k in range(3)))
    keys += ["query_embed.weight"] + _names("", ("input_proj",))
    return keys + official_backbone_keys(arch["backbone"])


def official_deformable_detr_keys(arch: dict) -> list[str]:
    """The state-dict keys of fundamentalvision/Deformable-DETR's single-stage DeformableDETR
    (models/deformable_detr.py, deformable_transformer.py, ops/modules/ms_deform_attn.py; DETReg's
    models/deformable_detr.py adds only its pretext head `feature_embed`): one class / box head
    per decoder layer in the state dict (shared modules without box refinement, clones with it,
    which the decoder also lists as transformer.decoder.bbox_embed.N), input_proj.N (conv +
    GroupNorm) per feature level, level_embed and reference_points."""
    keys = ["transformer.level_embed"]
    for i in range(arch["enc_layers"]):
        p = f"transformer.encoder.layers.{i}."
        keys += [p + "self_attn." + t for t in _DEFORM_ATTENTION]
        keys += _names(p, ("norm1", "linear1", "linear2", "norm2"))
    for i in range(arch["dec_layers"]):
        p = f"transformer.decoder.layers.{i}."
        keys += [p + "cross_attn." + t for t in _DEFORM_ATTENTION]
        keys += _names(p, ("norm1",)) + [p + "self_attn." + t for t in _ATTENTION]
        keys += _names(p, ("norm2", "linear1", "linear2", "norm3"))
    box_layers = [f"layers.{k}" for k in range(3)]
    if arch["with_box_refine"]:
        keys += _names("transformer.decoder.bbox_embed.",
                       [f"{i}.{m}" for i in range(arch["dec_layers"]) for m in box_layers])
    keys += _names("transformer.", ("reference_points",))
    keys += _names("class_embed.", [str(i) for i in range(arch["dec_layers"])])
    keys += _names("bbox_embed.", [f"{i}.{m}" for i in range(arch["dec_layers"])
                                   for m in box_layers])
    keys += ["query_embed.weight"]
    keys += _names("input_proj.", [f"{i}.{k}" for i in range(arch["num_feature_levels"])
                                   for k in (0, 1)])
    return keys + official_backbone_keys(arch["backbone"])


def find_detector(method: nn.Module) -> tuple[str, nn.Module, str]:
    """(state-dict prefix, module, format) of the detector a method holds: the outermost module
    that is a DETR or DeformableDETR (engine/models/detr.py), else the outermost DETR-like one (a
    `transformer` of DETR's or Deformable DETR's type beside a `backbone` Joiner and a
    `query_embed`, e.g. a variant with extra heads). Found by type, whatever the method's name
    for it; CheckpointError when there is none."""
    from engine.models.detr import DETR, DeformableDETR, DeformableTransformer, Joiner, Transformer

    def kind(module):
        if isinstance(module, DETR):
            return DETR_FORMAT
        if isinstance(module, DeformableDETR):
            return DEFORMABLE_DETR_FORMAT
        return None

    def like(module):
        if not (isinstance(getattr(module, "backbone", None), Joiner)
                and isinstance(getattr(module, "query_embed", None), nn.Embedding)):
            return None
        transformer = getattr(module, "transformer", None)
        if isinstance(transformer, Transformer):
            return DETR_FORMAT
        if isinstance(transformer, DeformableTransformer):
            return DEFORMABLE_DETR_FORMAT
        return None

    for test in (kind, like):
        for name, module in method.named_modules():
            found = test(module)
            if found:
                return (name + "." if name else ""), module, found
    raise CheckpointError(f"method {getattr(method, 'name', type(method).__name__)} holds no DETR "
                          f"or Deformable DETR: only its backbone can be exported")


def detector_architecture(module: nn.Module, fmt: str) -> dict:
    """The hyperparameters that fix a detector's official state-dict layout, read off the module."""
    transformer = module.transformer
    body = module.backbone[0].body
    class_embed = module.class_embed
    if isinstance(class_embed, nn.ModuleList):
        class_embed = class_embed[0]
    arch = {"backbone": body.name, "cifar_stem": body.cifar_stem,
            "hidden_dim": transformer.d_model, "nheads": transformer.nhead,
            "enc_layers": len(transformer.encoder.layers),
            "dec_layers": len(transformer.decoder.layers),
            "dim_feedforward": transformer.encoder.layers[0].linear1.out_features,
            "num_queries": module.query_embed.num_embeddings}
    if fmt == DETR_FORMAT:
        arch["num_classes"] = class_embed.out_features - 1        # + the no-object logit
        arch["pre_norm"] = transformer.encoder.norm is not None
    else:
        arch["num_classes"] = class_embed.out_features
        arch["num_feature_levels"] = transformer.level_embed.shape[0]
        arch["enc_n_points"] = transformer.encoder.layers[0].self_attn.n_points
        arch["dec_n_points"] = transformer.decoder.layers[0].cross_attn.n_points
        arch["with_box_refine"] = transformer.decoder.bbox_embed is not None
    return arch


def _official_args(arch: dict, fmt: str) -> str:
    """The official main.py flags that build the same architecture (num_classes comes from
    --dataset_file there, not a flag)."""
    args = [f"--backbone {arch['backbone']}", f"--hidden_dim {arch['hidden_dim']}",
            f"--nheads {arch['nheads']}", f"--enc_layers {arch['enc_layers']}",
            f"--dec_layers {arch['dec_layers']}", f"--dim_feedforward {arch['dim_feedforward']}",
            f"--num_queries {arch['num_queries']}"]
    if fmt == DETR_FORMAT:
        args += ["--pre_norm"] if arch["pre_norm"] else []
    else:
        args += [f"--num_feature_levels {arch['num_feature_levels']}",
                 f"--enc_n_points {arch['enc_n_points']}", f"--dec_n_points {arch['dec_n_points']}"]
        args += ["--with_box_refine"] if arch["with_box_refine"] else []
    return " ".join(args)


def _export_tensor(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    return (tensor.to(torch.float32) if tensor.is_floating_point() else tensor).contiguous().clone()


def export_detector(checkpoint: str | Path | dict) -> tuple[dict, dict]:
    """The detector of a detector method's checkpoint (UP-DETR, DETReg, Pair DETR: whatever holds
    a DETR / Deformable DETR, found by type) in the official repos' checkpoint layout:
    ({"model": {official name: tensor}, "pretext_heads": {method name: tensor}}, metadata).

    "model" holds exactly the official key set of the architecture (`official_detr_keys` /
    `official_deformable_detr_keys`), fp32 CPU tensors. A DETR-like module that lacks some
    official tensors (a variant with other heads) gets the ones it has; the metadata lists the
    rest. "pretext_heads" holds every other trained tensor of the method (the detector's extra
    modules and the method's own heads: DETReg's feature_embed, UP-DETR's patch2query and
    feature_align, Pair DETR's second decoder and pair projections) under the method's
    state-dict names; the official loaders read only checkpoint["model"] and never see them.
    Frozen target networks (DETReg's embedding encoder) are not exported."""
    from engine.methods import build_method
    from engine.methods.base import skip_initial_weights

    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    state = {}
    for key, value in checkpoint["model"].items():
        for wrapper in _WRAPPER_PREFIXES:
            key = key.removeprefix(wrapper)
        state[key] = value
    try:
        with skip_initial_weights(), torch.random.fork_rng(devices=[]):
            method = build_method(cfg)      # the structure only: every tensor comes from `state`
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild method {cfg.method} from the checkpoint's config: "
                              f"{exc}") from exc
    prefix, module, fmt = find_detector(method)
    from engine.models.detr import DETR, DeformableDETR
    exact = isinstance(module, (DETR, DeformableDETR))
    arch = detector_architecture(module, fmt)
    official = (official_detr_keys if fmt == DETR_FORMAT else official_deformable_detr_keys)(arch)
    own = module.state_dict()
    model, missing, unmapped = {}, [], []
    for key in official:
        if key in own and prefix + key in state:
            if tuple(state[prefix + key].shape) != tuple(own[key].shape):
                raise CheckpointError(f"{prefix + key} has shape {tuple(state[prefix + key].shape)}"
                                      f", its config builds {tuple(own[key].shape)}")
            model[key] = _export_tensor(state[prefix + key])
        else:
            missing.append(key)
    if missing and (exact or not model):
        raise CheckpointError(f"the checkpoint's detector lacks official tensors "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    official_set = set(model)
    exported_ids = {id(t) for name, t in module.named_parameters(remove_duplicate=False)
                    if name in official_set}
    pretext = {}
    for name, param in method.named_parameters():
        if param.requires_grad and id(param) not in exported_ids:
            if name not in state:
                unmapped.append(name)
            else:
                pretext[name] = _export_tensor(state[name])
    if unmapped:
        raise CheckpointError(f"the checkpoint lacks trained tensors its method has: "
                              f"{', '.join(unmapped[:3])}")
    meta = detector_metadata(cfg, fmt, arch, sorted(pretext), missing, prefix,
                             source_step=checkpoint.get("step"))
    return {"model": model, "pretext_heads": pretext}, meta


def detector_metadata(cfg: PretrainConfig, fmt: str, arch: dict, pretext: list[str],
                      missing: list[str], prefix: str, source: str | None = None,
                      source_step: int | None = None) -> dict:
    """FILE.json of a detector export: the format, the architecture and the official flags that
    build it, how each official fine-tuning script loads the file, what is left out."""
    flags = _official_args(arch, fmt)
    notes = ["backbone.0.body.*: FrozenBatchNorm2d buffers (weight, bias, running_mean, "
             "running_var) as in the official models; torchvision's BatchNorm2d also loads them "
             "(strict=False: its num_batches_tracked stay 0)",
             "input: RGB in [0, 1], ImageNet mean/std normalised, as the official transforms"]
    if arch["cifar_stem"]:
        notes.append("CIFAR stem (3x3 conv1, no max-pool): the official repos build torchvision's "
                     "7x7 stem, so this file does not load there (a test-scale export)")
    if arch["backbone"] != "resnet50" and fmt == DEFORMABLE_DETR_FORMAT:
        notes.append(f"{arch['backbone']}: the official Deformable DETR backbone hard-codes "
                     f"ResNet-50's channels (512/1024/2048) and asserts against resnet18: edit "
                     f"its models/backbone.py to load this file")
    if fmt == DETR_FORMAT:
        loaders = {
            "dddzg/up-detr (fine-tune)": (
                f"python detr_main.py {flags} --pretrain FILE: deletes every key containing "
                f"'class_embed' (the pre-training head has {arch['num_classes'] + 1} logits) "
                f"and loads the rest with strict=False"),
            "facebookresearch/detr": (
                f"python main.py {flags} --resume FILE loads checkpoint['model'] strictly: only "
                f"when num_classes + 1 = {arch['num_classes'] + 1} logits match; otherwise drop "
                f"class_embed.* and load_state_dict(strict=False) yourself (as UP-DETR's "
                f"--pretrain). FILE has no optimizer/lr_scheduler/epoch, so training starts at "
                f"epoch 0"),
        }
    else:
        loaders = {
            "amirbar/DETReg (fine-tune)": (
                f"python main.py {flags} --pretrain FILE: deletes every key containing "
                f"'class_embed' and loads the rest with strict=False (as its "
                f"configs/DETReg_fine_tune_*.sh)"),
            "fundamentalvision/Deformable-DETR": (
                f"python main.py {flags} --resume FILE loads checkpoint['model'] with "
                f"strict=False, but a shape mismatch still fails: class_embed.* has "
                f"{arch['num_classes']} logits (COCO's 91); for another dataset drop class_embed.*"
                f" first. FILE has no optimizer/lr_scheduler/epoch, so training starts at epoch 0"),
        }
    if pretext:
        notes.append("checkpoint['pretext_heads']: the pre-training-only heads under the densesim "
                     "method's names (not read by any official loader)"
                     + ("; DETReg's feature_embed.* has DETReg's own name: "
                        "model.update(pretext_heads) is DETReg's pre-training checkpoint layout"
                        if any(name.startswith("feature_embed.") for name in pretext) else ""))
    if missing:
        notes.append(f"{len(missing)} official tensors are not in this model (a DETR variant with "
                     f"other heads): an official loader with strict=False keeps its own "
                     f"initialisation for them")
    return {
        "format": fmt,
        "file": "torch.save({'model': state_dict, 'pretext_heads': {...}}); loads with "
                "torch.load(FILE, weights_only=True)",
        "architecture": arch,
        "official_args": flags,
        "official_code": ("facebookresearch/detr @ 29901c5, dddzg/up-detr @ 44c0c6e"
                          if fmt == DETR_FORMAT else
                          "fundamentalvision/Deformable-DETR @ 11169a6, amirbar/DETReg @ a4b6363"),
        "loading": loaders,
        "pretext_heads": pretext,
        "missing_official_keys": missing,
        "left_out": ["frozen target networks (DETReg's embedding_encoder.*)",
                     "the backbone alias encoder.* (the same tensors as backbone.0.body.*; "
                     "exported in torchvision names by the backbone export)",
                     "num_batches_tracked of a non-frozen BatchNorm backbone"],
        "notes": notes,
        "source": {"checkpoint": source, "step": source_step, "preset": cfg.preset,
                   "method": cfg.method, "seed": cfg.seed, "detector_module": prefix.rstrip("."),
                   "torch": torch.__version__},
    }


def holds_detector(checkpoint: dict) -> bool:
    """Whether a loaded checkpoint's model has a DETR-family detector (a cheap look at the names;
    export_detector then finds it by type)."""
    return any(key.endswith("query_embed.weight") for key in checkpoint["model"]) and any(
        ".transformer." in f".{key}" for key in checkpoint["model"])


def write_detector_export(checkpoint_path: str | Path, out: str | Path,
                          checkpoint: dict | None = None) -> tuple[Path, Path]:
    """Write the detector export FILE and FILE.json (each atomically); returns both."""
    path = resolve_checkpoint_path(checkpoint_path)
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    payload, meta = export_detector(checkpoint)
    meta["source"]["checkpoint"] = str(path)
    return write_detector_file(out, payload, meta)


def write_detector_file(out: str | Path, payload: dict, meta: dict) -> tuple[Path, Path]:
    """torch.save(payload) to FILE and json meta to FILE.json, each atomically."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder: give a file name, e.g. {out}/detector.pth")
    meta_path = out.with_name(out.name + ".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, out)
        tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, meta_path)
    except OSError as exc:
        raise CheckpointError(f"cannot write {out} ({exc.strerror or exc}): choose a writable "
                              f"path") from exc
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


def encoder_from_torchvision_state_dict(state: dict[str, torch.Tensor], backbone: str,
                                        cifar_stem: bool = False) -> ResNet:
    """Our ResNet holding a torchvision-named state dict (fc tensors, if present, are refused:
    the encoder has no classifier)."""
    encoder = build_backbone(PretrainConfig(backbone=backbone, cifar_stem=cifar_stem,
                                            img_size=32 if cifar_stem else 224))
    expected = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    _check_shapes(dict(state), expected, "the state dict", "torchvision ResNet")
    encoder.load_state_dict(state, strict=True)
    return encoder


def load_exported_encoder(path: str | Path) -> tuple[nn.Module, PretrainConfig, int | None]:
    """An exported FILE (with FILE.json beside it) back into our ViT or ResNet, a PretrainConfig
    holding its architecture and seed (the rest of the config is not exported), and the training
    step it was exported at."""
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    try:
        meta = json.loads(meta_path.read_text())
        arch = meta["architecture"]
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read exported encoder {path} (+ {meta_path.name}): "
                              f"{type(exc).__name__}: {exc}") from exc
    source = meta.get("source") or {}
    if meta.get("format") == RESNET_FORMAT:
        encoder = encoder_from_torchvision_state_dict(state, arch["backbone"],
                                                      arch.get("cifar_stem", False))
        cfg = PretrainConfig(backbone=arch["backbone"], cifar_stem=arch.get("cifar_stem", False),
                             img_size=arch["img_size"], seed=source.get("seed", 0),
                             method=source.get("method", "mocov2"),
                             preset=source.get("preset") or "custom")
        return encoder, cfg, source.get("step")
    encoder = encoder_from_timm_state_dict(state, arch["img_size"], arch["patch_size"],
                                           arch["dim"], arch["depth"], arch["heads"],
                                           arch.get("mlp_ratio", 4.0))
    cfg = PretrainConfig(img_size=arch["img_size"], patch_size=arch["patch_size"],
                         dim=arch["dim"], depth=arch["depth"], heads=arch["heads"],
                         mlp_ratio=arch.get("mlp_ratio", 4.0), seed=source.get("seed", 0),
                         preset=source.get("preset") or "custom")
    return encoder, cfg, source.get("step")


# ----------------------------------------------------------------------------- loading
def load_encoder(checkpoint_path: str | Path | None, device: torch.device | str = "cpu",
                 random_init: bool = False, cfg: PretrainConfig | None = None,
                 branch: str = "online") -> tuple[nn.Module, PretrainConfig]:
    """(backbone in eval mode on `device` — our ViT or ResNet —, its PretrainConfig).

    checkpoint_path: a densesim checkpoint / run folder of any method, or an exported encoder
      (timm-named ViT or torchvision-named ResNet) with its `.json` beside it. With `random_init`, only its config is used (the architecture and seed),
      and the weights are the trainer's initialisation. `cfg` (e.g. a preset) replaces the
      checkpoint when random_init is set and checkpoint_path is None.
    branch: "online" (the backbone the method trains, the one exported and evaluated by default)
      or "target" (the EMA copy, for methods that have one).
    """
    encoder, cfg, _ = load_encoder_with_info(checkpoint_path, device, random_init, cfg, branch)
    return encoder, cfg


def load_encoder_with_info(checkpoint_path: str | Path | None, device: torch.device | str = "cpu",
                           random_init: bool = False, cfg: PretrainConfig | None = None,
                           branch: str = "online") -> tuple[nn.Module, PretrainConfig, dict]:
    """`load_encoder`, plus {"source": "checkpoint" | "export" | "preset", "path", "step"}
    (the checkpoint is read once)."""
    if checkpoint_path is None:
        if not random_init or cfg is None:
            raise ValueError("load_encoder needs a checkpoint, or random_init=True with a cfg")
        encoder = build_encoder(cfg)
        return encoder.to(device).eval(), cfg, {"source": "preset", "path": None, "step": None}
    path = resolve_checkpoint_path(checkpoint_path)
    exported_meta = path.with_name(path.name + ".json")
    if exported_meta.is_file() and _is_export_metadata(exported_meta):
        encoder, cfg, step = load_exported_encoder(path)
        if random_init:
            encoder = build_encoder(cfg)
        return encoder.to(device).eval(), cfg, {"source": "export", "path": str(path),
                                                 "step": step}
    checkpoint = read_checkpoint(path)
    cfg = PretrainConfig.from_dict(checkpoint["config"])
    encoder = build_encoder(cfg)
    if not random_init:
        state = encoder_state(checkpoint["model"], branch)
        if isinstance(encoder, ResNet):
            state = with_batch_counters(state, encoder.state_dict())
        try:
            encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(f"the encoder in {path} does not match its own config "
                                  f"({first[1].strip() if len(first) > 1 else first[0]})") from exc
    return encoder.to(device).eval(), cfg, {"source": "checkpoint", "path": str(path),
                                             "step": checkpoint.get("step")}


# ----------------------------------------------------------------------------- initial weights
# Heads of self-supervised checkpoints that are not part of the ResNet (torchvision's classifier,
# SwAV's projection head and prototypes): dropped when a ResNet is read out of a raw state dict.
_RESNET_HEAD_PREFIXES = ("fc.", "projection_head.", "prototypes.")


def resnet_from_weights(path: str | Path) -> ResNet:
    """A densesim ResNet (torchvision names, BatchNorm2d) holding pre-trained weights, for methods
    that start from them (DETReg's SwAV-initialised backbone and embedding encoder).

    path: a densesim checkpoint or run folder of any method on a ResNet (its online encoder), an
    exported torchvision-resnet file (FILE + FILE.json), or a raw torchvision-named ResNet state
    dict such as SwAV's released `swav_800ep_pretrain.pth.tar` (optionally under "state_dict" or
    "model", keys optionally behind "module." or one common prefix such as "backbone.0.body.";
    fc / projection_head / prototypes tensors are ignored). The architecture (resnet18 or
    resnet50, CIFAR stem or not) is read from the tensors. Anything else: one-line CheckpointError.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"pre-trained weights {path} do not exist: pass a densesim "
                              f"checkpoint / run folder, an exported encoder or a torchvision "
                              f"ResNet state dict")
    meta = path.with_name(path.name + ".json")
    if not path.is_dir() and not (meta.is_file() and _is_export_metadata(meta)):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a densesim checkpoint holds more than tensors (config, RNG states)
            raw = None
        if isinstance(raw, dict) and not {"model", "config"} <= set(raw):
            return _resnet_from_state_dict(raw, path)
    encoder, _, _ = load_encoder_with_info(path)
    if not isinstance(encoder, ResNet):
        raise CheckpointError(f"{path} holds a {type(encoder).__name__}, not a ResNet")
    return encoder.train()


def _resnet_from_state_dict(raw: dict, path: Path) -> ResNet:
    for key in ("state_dict", "model"):
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    prefixes = sorted({k[:-len("conv1.weight")] for k in tensors if k.endswith("conv1.weight")
                       and k[:-len("conv1.weight")] + "layer1.0.conv1.weight" in tensors})
    if not prefixes:
        raise CheckpointError(f"{path} is not a ResNet state dict (no conv1.weight beside "
                              f"layer1.0.conv1.weight)")
    if len(prefixes) > 1 and "" not in prefixes:
        raise CheckpointError(f"{path} holds several ResNets (under "
                              f"{', '.join(repr(p) for p in prefixes[:3])}): save the one to use "
                              f"in its own file")
    prefix = "" if "" in prefixes else prefixes[0]
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(_RESNET_HEAD_PREFIXES)}
    name = "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"
    cifar_stem = state["conv1.weight"].shape[-1] == 3
    encoder = build_resnet(name, cifar_stem=cifar_stem)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    state = with_batch_counters(state, expected)
    _check_shapes(state, expected, f"{path}", f"torchvision {name}")
    encoder.load_state_dict(state, strict=True)
    return encoder


def _is_export_metadata(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") in (EXPORT_FORMAT, RESNET_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


__all__ = [
    "BRANCH_PREFIXES", "EXPORT_FORMAT", "RESNET_FORMAT", "build_encoder", "encoder_state",
    "encoder_from_timm_state_dict", "encoder_from_torchvision_state_dict", "export_metadata",
    "export_state_dict", "export_timm_state_dict", "export_torchvision_state_dict",
    "load_encoder", "load_encoder_with_info", "load_exported_encoder", "read_checkpoint",
    "resnet_export_metadata", "resnet_from_weights", "resolve_checkpoint_path", "timm_vit_shapes",
    "with_batch_counters", "write_export", "DETECTOR_FORMATS", "DETR_FORMAT",
    "DEFORMABLE_DETR_FORMAT", "detector_architecture", "detector_metadata", "export_detector",
    "find_detector", "holds_detector", "official_backbone_keys", "official_deformable_detr_keys",
    "official_detr_keys", "write_detector_export", "write_detector_file",
]
