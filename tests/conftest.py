"""Shared fixtures: real images from ../shared/data (unpacked at test time, never committed)."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("DENSESIM_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_archive(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{name} not found in {SHARED_DATA} (the shared data folder sits beside the "
                    f"checkout in development and CI; set DENSESIM_SHARED_DATA to point at it)")
    return path


@pytest.fixture(scope="session")
def cifar_train_subset(tmp_path_factory) -> Path:
    """The first 64 training JPEGs of each CIFAR-10 class (640 real 32×32 photos), class folders."""
    archive = shared_archive("cifar10_jpg.tar.gz")
    root = tmp_path_factory.mktemp("cifar")
    per_class: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or "train" not in parts or not member.name.endswith(".jpg"):
                continue
            label = parts[-2]
            if per_class.get(label, 0) >= 64:
                if len(per_class) == 10 and all(v >= 64 for v in per_class.values()):
                    break
                continue
            per_class[label] = per_class.get(label, 0) + 1
            target = root / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return root
