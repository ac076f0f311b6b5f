"""Checkpoints that hold everything needed to resume, written atomically.

A checkpoint is one file, `checkpoint.pt`, in the run's output folder. It is written to a temporary
file in the same folder and then renamed over the old one, so a crash or a full disk mid-write never
leaves a truncated checkpoint, and an existing checkpoint is never lost.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing or unreadable; the message says what to do."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, state: dict) -> Path:
    path = Path(out_dir) / CHECKPOINT_NAME
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:  # make the bytes durable before the rename publishes them
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path, map_location="cpu") -> dict:
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume in {out_dir} (expected {path.name}): "
                              f"run without --resume to start a new run there")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which, never a deep traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
