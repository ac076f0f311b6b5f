"""The encoder an evaluation runs on: the online (or EMA target) ViT of a densesim checkpoint, or
the same architecture freshly initialised as the trainer initialises it (the random-init baseline).

A checkpoint (engine/trainer.py `_save`) is a dict with `model` (the SIM state dict, encoder under
`encoder.`, the EMA copy under `target_encoder.`) and `config` (PretrainConfig.to_dict()). A run
folder holding `checkpoint.pt` is accepted in place of the file. An exported encoder
(`python -m engine.export`, a plain timm-named state dict with `FILE.json` beside it) is accepted
too, so an exported file can be evaluated without its training run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.checkpoint import CHECKPOINT_NAME, CheckpointError
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
        raise CheckpointError(f"the checkpoint's model has no '{prefix}*' entries: it is not a "
                              f"SIM model state dict")
    return state


def build_encoder(cfg: PretrainConfig, seed: int | None = None) -> VisionTransformer:
    """The encoder architecture of `cfg`, initialised exactly as at step 0 of training.

    The trainer seeds torch with `cfg.seed` (+ rank 0) and then builds SIM, whose first module is
    the encoder, so seeding and building the encoder alone draws the same weights (tested against
    the patch embedding of a real run, which stays frozen). The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        return VisionTransformer(cfg.img_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads,
                                 cfg.mlp_ratio)


def load_encoder(checkpoint_path: str | Path | None, device: torch.device | str = "cpu",
                 random_init: bool = False, cfg: PretrainConfig | None = None,
                 branch: str = "online") -> tuple[VisionTransformer, PretrainConfig]:
    """(encoder in eval mode on `device`, its PretrainConfig).

    checkpoint_path: a densesim checkpoint / run folder, or an exported timm state dict with its
      `.json` beside it. With `random_init`, only its config is used (the architecture and seed),
      and the weights are the trainer's initialisation. `cfg` (e.g. a preset) replaces the
      checkpoint when random_init is set and checkpoint_path is None.
    branch: "online" (the encoder SIM trains, the one exported and evaluated by default) or
      "target" (the EMA copy).
    """
    encoder, cfg, _ = load_encoder_with_info(checkpoint_path, device, random_init, cfg, branch)
    return encoder, cfg


def load_encoder_with_info(checkpoint_path: str | Path | None, device: torch.device | str = "cpu",
                           random_init: bool = False, cfg: PretrainConfig | None = None,
                           branch: str = "online") -> tuple[VisionTransformer, PretrainConfig,
                                                            dict]:
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
        # imported here: engine.export imports this module
        from engine.export import load_exported_encoder

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
        try:
            encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(f"the encoder in {path} does not match its own config "
                                  f"({first[1].strip() if len(first) > 1 else first[0]})") from exc
    return encoder.to(device).eval(), cfg, {"source": "checkpoint", "path": str(path),
                                             "step": checkpoint.get("step")}


def _is_export_metadata(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == "timm-vit"
    except (OSError, ValueError, AttributeError):
        return False


__all__ = [
    "build_encoder",
    "encoder_state",
    "load_encoder",
    "load_encoder_with_info",
    "read_checkpoint",
    "resolve_checkpoint_path",
]
