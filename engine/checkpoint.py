"""Checkpoints that hold everything needed to resume: atomic, checksummed, the last K kept.

A run's folder holds `checkpoint-<step>.pt` for the last `keep` saves, each with a sidecar
`checkpoint-<step>.pt.sha256` (its SHA-256 and size), and `checkpoint.pt`, the newest one under a
fixed name (a hard link where the filesystem allows, else a copy) for evaluation and export.

Every file is written to a temporary name in the same folder, fsync'ed and renamed over its final
name, and the folder is fsync'ed after the renames: a crash, a kill or a full disk mid-save leaves
the previous checkpoints untouched and at worst a stray `*.tmp` (removed by the next save). A save
that fails says so in one line (`CheckpointError`) and names the checkpoint that is still intact.

On resume `load_latest` tries the numbered checkpoints newest first and takes the first whose bytes
match their checksum and that torch can read; one it skips is reported (`Loaded.skipped`), so a
truncated or corrupt latest file costs the steps since the previous save, never the run. A folder
from before numbered checkpoints (only `checkpoint.pt`) still resumes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or cannot be written; the message says what to do."""


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


def numbered_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def numbered_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the folder's numbered checkpoints, newest first."""
    out_dir = Path(out_dir)
    found = []
    for path in out_dir.glob("checkpoint-*.pt") if out_dir.is_dir() else []:
        match = _NUMBERED.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def has_checkpoint(out_dir: Path) -> bool:
    out_dir = Path(out_dir)
    return (out_dir / CHECKPOINT_NAME).is_file() or bool(numbered_checkpoints(out_dir))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are durable before the rename publishes them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders; the renames are still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_latest(numbered: Path, latest: Path) -> None:
    """`latest` becomes the same bytes as `numbered`, atomically (hard link, else a copy)."""
    tmp = latest.with_name(latest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(numbered, tmp)
    except OSError:
        shutil.copyfile(numbered, tmp)
    os.replace(tmp, latest)


def save_checkpoint(out_dir: Path, state: dict, keep: int = 2) -> Path:
    """Write `state` as checkpoint-<state['step']>.pt (+ checksum) and checkpoint.pt, keep the
    newest `keep` numbered checkpoints; returns the path of checkpoint.pt. On any failure (disk
    full, folder unwritable) raises CheckpointError naming the newest checkpoint still intact."""
    out_dir = Path(out_dir)
    if keep < 1:
        raise CheckpointError(f"keep must be >= 1 checkpoint, got {keep}")
    step = int(state.get("step", 0))
    path = out_dir / numbered_name(step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    digest = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "step": step}
    previous = [p for s, p in numbered_checkpoints(out_dir) if s != step]
    try:
        _write_atomically(path, bytes(data))
        _write_atomically(path.with_name(path.name + ".sha256"), json.dumps(digest).encode())
        _publish_latest(path, out_dir / CHECKPOINT_NAME)
        _fsync_dir(out_dir)
    except OSError as exc:
        intact = previous[0] if previous else None
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or exc}; "
            + (f"the previous checkpoint {intact} is intact" if intact else
               "no earlier checkpoint exists in this run") + " (free space or pick another --out)"
        ) from None
    for stale in previous[keep - 1:]:
        stale.unlink(missing_ok=True)
        stale.with_name(stale.name + ".sha256").unlink(missing_ok=True)
    return out_dir / CHECKPOINT_NAME


def _verify(path: Path) -> str | None:
    """None if `path` matches its checksum sidecar, else why not."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        expected = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return "its checksum file is missing or unreadable"
    data = path.read_bytes()
    if len(data) != expected.get("bytes"):
        return f"it has {len(data)} bytes, {expected.get('bytes')} were written (truncated)"
    if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
        return "its bytes do not match their checksum (corrupt)"
    return None


def _read(path: Path, map_location) -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


@dataclass
class Loaded:
    state: dict
    path: Path
    skipped: list[str] = field(default_factory=list)   # "name: why", newest first


def load_latest(out_dir: Path, map_location="cpu", at_most: int | None = None) -> Loaded:
    """The newest intact checkpoint of the run in `out_dir` (see the module docstring); with
    `at_most`, the newest intact one of a step <= at_most (the trainer's restore policy)."""
    out_dir = Path(out_dir)
    skipped = []
    for step, path in numbered_checkpoints(out_dir):
        if at_most is not None and step > at_most:
            continue
        problem = _verify(path)
        if problem is None:
            try:
                return Loaded(_read(path, map_location), path, skipped)
            except Exception as exc:  # noqa: BLE001 -- any unreadable file falls back the same way
                problem = f"torch cannot read it ({type(exc).__name__})"
        skipped.append(f"{path.name}: {problem}")
    legacy = out_dir / CHECKPOINT_NAME
    if at_most is not None:
        raise CheckpointError(f"no intact checkpoint of step <= {at_most} in {out_dir}"
                              + ("" if not skipped else ": " + "; ".join(skipped)))
    if not skipped and legacy.is_file():     # a run from before numbered checkpoints
        try:
            return Loaded(_read(legacy, map_location), legacy, skipped)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {legacy}: {type(exc).__name__}: "
                                  f"{exc}") from exc
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {out_dir}: " + "; ".join(skipped))
    raise CheckpointError(f"no checkpoint to resume in {out_dir} (expected {CHECKPOINT_NAME}): "
                          f"run without --resume to start a new run there")


def load_checkpoint(out_dir: Path, map_location="cpu") -> dict:
    """The state of the newest intact checkpoint in `out_dir`."""
    return load_latest(out_dir, map_location).state
