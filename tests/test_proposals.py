"""Region proposals: selective-search boxes in original-image pixels, the cache file (resumable
after kill -9, updated for changed / removed / new files), `load_proposals`, and the CLI's
one-line errors."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.proposals import DELAY_ENV, main
from pipelines.datasets import ImageFolder, sample_photos
from pipelines.proposals import (ProposalCache, ProposalCacheError, compute_proposals,
                                 default_cache_path, encode_record, file_digest, load_proposals,
                                 relative_key)

pytest.importorskip("cv2.ximgproc", reason="needs opencv-contrib-python-headless")

ROOT = Path(__file__).resolve().parents[1]


def picture(seed: int, size=(96, 64), rects: int = 2) -> Image.Image:
    """A noisy flat background with `rects` filled rectangles of clearly different colours."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), np.int16)
    arr[:] = rng.integers(80, 170, 3)
    for _ in range(rects):
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x2, y2 = int(rng.integers(x1 + 8, w)), int(rng.integers(y1 + 8, h))
        arr[y1:y2, x1:x2] = rng.integers(0, 256, 3)
    arr += rng.integers(-6, 7, arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_folder(root: Path, count: int, size=(96, 64), ext="png", start=0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        picture(i, (size[0] + 8 * (i % 3), size[1] + 4 * (i % 2))).save(root / f"img{i:02d}.{ext}")
    return root


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x1, y1 = torch.maximum(a[:, 0], b[0]), torch.maximum(a[:, 1], b[1])
    x2, y2 = torch.minimum(a[:, 2], b[2]), torch.minimum(a[:, 3], b[3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    return inter / (area + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_inside(boxes: torch.Tensor, width: int, height: int) -> None:
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()


# ----------------------------------------------------------------------------- boxes

def test_boxes_in_original_pixels_of_a_non_square_image():
    """A 240x120 image with one clear rectangle: selective search at 128x128, boxes rescaled to
    the original pixels, one of them on the rectangle; deterministic; --top keeps the first."""
    arr = np.full((120, 240, 3), 128, np.uint8)
    arr += np.random.default_rng(0).integers(0, 5, arr.shape, dtype=np.uint8)
    arr[30:90, 60:150] = (220, 30, 30)           # edges x 60..150, y 30..90
    image = Image.fromarray(arr)
    boxes = compute_proposals(image)
    assert 0 < len(boxes) <= 100
    assert_inside(boxes, 240, 120)
    assert iou(boxes, torch.tensor([60.0, 30.0, 150.0, 90.0])).max() > 0.85
    # x scales by 240/128, y by 120/128: every coordinate is a multiple of that step
    steps = torch.tensor([240 / 128, 120 / 128] * 2)
    k = boxes / steps
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert torch.equal(compute_proposals(image), boxes)                     # srand per image
    assert torch.equal(compute_proposals(image, top=7), boxes[:7])
    full = compute_proposals(image, size=0)                                 # original pixels
    assert_inside(full, 240, 120) and torch.equal(full, full.round())
    assert iou(full, torch.tensor([60.0, 30.0, 150.0, 90.0])).max() > 0.95


def test_sample_photos_boxes_stay_inside():
    photos = sample_photos()
    for index in (0, 5):
        image = photos.load(index)
        assert image.size[0] != image.size[1]
        boxes = compute_proposals(image, top=30)
        assert 0 < len(boxes) <= 30
        assert_inside(boxes, *image.size)


# ----------------------------------------------------------------------------- the CLI

def test_cli_small_folder_and_rerun(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 6)
    code, out, err = run_cli(["--data", data, "--workers", "2", "--quiet"], capsys)
    assert code == 0, err
    assert "6 images" in out and "6 computed (6 new, 0 changed)" in out
    cache_file = Path(default_cache_path(data))
    assert cache_file.is_file() and cache_file.name.startswith(".")   # hidden: loaders skip it
    assert len(ImageFolder(str(data))) == 6
    dataset = ImageFolder(str(data))
    boxes, counts, missing = load_proposals(cache_file, dataset, top=100)
    assert missing == [] and boxes.shape == (6, 100, 4) and (counts > 0).all()
    for i, path in enumerate(dataset.paths):
        image = dataset.load(i)
        assert_inside(boxes[i, :counts[i]], *image.size)
        assert torch.equal(boxes[i, :counts[i]], compute_proposals(image))   # same as in-process
    before = cache_file.read_bytes()
    code, out, _ = run_cli(["--data", data, "--workers", "1", "--quiet"], capsys)
    assert code == 0 and "0 computed" in out and "6 unchanged" in out
    assert cache_file.read_bytes() == before


def _entries(path: Path) -> int:
    try:
        with ProposalCache.open(path) as cache:
            return len(cache)
    except (ProposalCacheError, OSError, ValueError):
        return 0


def test_cache_survives_kill_9(tmp_path):
    """kill -9 after a few flushes, a torn record at the end, then the same command: only the
    rest is computed and the cache equals a clean run's, byte for byte."""
    data = make_folder(tmp_path / "data", 20, size=(64, 48))
    cache_file = tmp_path / "out" / "proposals.bin"
    command = [sys.executable, "-m", "engine.proposals", "--data", str(data), "--out",
               str(cache_file), "--workers", "1", "--flush-every", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{DELAY_ENV: "0.3"})
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while _entries(cache_file) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no flush seen"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    kept = _entries(cache_file)
    assert 4 <= kept < 20
    with open(cache_file, "ab") as handle:          # a record cut by the kill
        handle.write(encode_record("img19.png", 1, 2, b"x" * 16, 3, 4, np.ones((5, 4)))[:-9])

    env.pop(DELAY_ENV)
    rerun = subprocess.run(command + ["--quiet"], env=env, capture_output=True, text=True,
                           timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{20 - kept} computed ({20 - kept} new, 0 changed), {kept} unchanged" in rerun.stdout
    assert "1 damaged records dropped" in rerun.stdout

    clean = tmp_path / "clean.bin"
    assert main(["--data", str(data), "--out", str(clean), "--workers", "1", "--quiet"]) == 0
    assert clean.read_bytes() == cache_file.read_bytes()


def test_changed_removed_and_new_files(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 5, ext="bmp")   # BMP: same size for the same shape
    assert run_cli(["--data", data, "--workers", "0", "--quiet"], capsys)[0] == 0
    cache_file = Path(default_cache_path(data))

    changed = data / "img00.bmp"
    st = changed.stat()
    with Image.open(changed) as old:
        shape = old.size
    picture(100, shape).save(changed)           # new content, same byte size
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))          # ... and the old mtime
    assert changed.stat().st_size == st.st_size
    (data / "img01.bmp").unlink()                                   # removed
    make_folder(data, 1, ext="bmp", start=7)                        # new: img07.bmp
    touched = data / "img02.bmp"                                    # same content, new mtime
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    dataset = ImageFolder(str(data))
    _, counts, missing = load_proposals(cache_file, dataset, top=10)
    # the load-time check is (size, mtime_ns): the new file and the touched one are missing,
    # the same-size same-mtime rewrite is not seen until the CLI hashes it
    assert sorted(Path(p).name for p in missing) == ["img02.bmp", "img07.bmp"]
    assert counts.tolist()[dataset.paths.index(str(data / "img07.bmp"))] == 0

    code, out, _ = run_cli(["--data", data, "--workers", "0", "--quiet"], capsys)
    assert code == 0
    assert "2 computed (1 new, 1 changed), 3 unchanged" in out
    assert "1 entries of files no longer in the folder dropped" in out
    boxes, counts, missing = load_proposals(cache_file, dataset, top=100)
    assert missing == []
    i = dataset.paths.index(str(changed))
    assert torch.equal(boxes[i, :counts[i]], compute_proposals(Image.open(changed)))
    with ProposalCache.open(cache_file) as cache:
        assert sorted(cache.entries) == ["img00.bmp", "img02.bmp", "img03.bmp", "img04.bmp",
                                         "img07.bmp"]
        assert cache.record_keys == sorted(cache.entries)            # compacted, one each


# ----------------------------------------------------------------------------- the loader side

def test_load_proposals_padding_counts_and_missing(tmp_path):
    data = make_folder(tmp_path / "data", 4, size=(32, 24))
    dataset = ImageFolder(str(data))
    cache_file = tmp_path / "c.bin"
    rng = np.random.default_rng(0)
    written = {}
    with ProposalCache.open(cache_file, size=128, top=100, writable=True) as cache:
        for i, n in [(0, 2), (1, 5), (2, 0)]:
            path = dataset.paths[i]
            st = os.stat(path)
            written[i] = rng.uniform(0, 20, (n, 4)).astype(np.float32)
            cache.update(relative_key(path, dataset.root), st.st_size, st.st_mtime_ns,
                         file_digest(Path(path).read_bytes()), 32, 24, written[i],
                         failed=(n == 0))
        cache.flush()
    boxes, counts, missing = load_proposals(cache_file, dataset, top=3)
    assert boxes.shape == (4, 3, 4) and boxes.dtype == torch.float32
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 3, 0, 0]
    assert torch.equal(boxes[0, :2], torch.from_numpy(written[0]))
    assert torch.equal(boxes[1], torch.from_numpy(written[1][:3]))
    assert (boxes[0, 2:] == 0).all() and (boxes[2:] == 0).all()
    assert missing == [dataset.paths[3]]                 # a failed image has a (valid) entry
    st = os.stat(dataset.paths[0])
    os.utime(dataset.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, counts, missing = load_proposals(cache_file, dataset, top=8)
    assert counts.tolist() == [0, 5, 0, 0] and missing == [dataset.paths[0], dataset.paths[3]]
    with pytest.raises(ProposalCacheError, match="no proposal cache"):
        load_proposals(tmp_path / "absent.bin", dataset, top=3)


# ----------------------------------------------------------------------------- errors

def test_read_only_data_folder_needs_out(tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "data", 2, size=(40, 30))
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):   # root ignores chmod: refuse writes here
        if str(path).startswith(str(data)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    os.chmod(data, 0o555)
    try:
        code, _, err = run_cli(["--data", data, "--workers", "0"], capsys)
        line = one_line_error(err)
        assert code == 2 and "read-only" in line and "--out" in line
        code, out, err = run_cli(["--data", data, "--out", tmp_path / "p.bin", "--workers", "0",
                                  "--quiet"], capsys)
        assert code == 0 and "2 computed" in out, err
    finally:
        os.chmod(data, 0o755)


def test_corrupt_cache_file_is_one_line_with_the_fix(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 2, size=(40, 30))
    cache_file = Path(default_cache_path(data))
    for junk in (b"", b"not a cache at all" * 10, b"DENSESIM-PROPOSALS\n\x05\x00"):
        cache_file.write_bytes(junk)
        code, _, err = run_cli(["--data", data, "--workers", "0"], capsys)
        line = one_line_error(err)
        assert code == 2 and "delete it and rerun" in line and str(cache_file) in line
        with pytest.raises(ProposalCacheError, match="delete it and rerun"):
            load_proposals(cache_file, ImageFolder(str(data)), top=4)
    cache_file.unlink()
    assert run_cli(["--data", data, "--workers", "0", "--quiet"], capsys)[0] == 0


def test_bad_input_one_line_errors(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["--data", tmp_path / "nope"], capsys)
    assert code == 2 and "does not exist" in one_line_error(err)
    data = make_folder(tmp_path / "data", 2, size=(40, 30))
    code, _, err = run_cli(["--data", data, "--top", "0"], capsys)
    assert code == 2 and "--top" in one_line_error(err)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, _, err = run_cli(["--data", data, "--out", blocker / "p.bin"], capsys)
    assert code == 2 and "--out" in one_line_error(err)
    # another size/top than the cache holds
    assert run_cli(["--data", data, "--out", tmp_path / "p.bin", "--workers", "0", "--quiet"],
                   capsys)[0] == 0
    code, _, err = run_cli(["--data", data, "--out", tmp_path / "p.bin", "--top", "30"], capsys)
    assert code == 2 and "--top 100" in one_line_error(err)
    # a second writer at the same time
    with ProposalCache.open(tmp_path / "p.bin", 128, 100, writable=True):
        code, _, err = run_cli(["--data", data, "--out", tmp_path / "p.bin"], capsys)
        assert code == 2 and "another process" in one_line_error(err)
    # OpenCV missing
    monkeypatch.setitem(sys.modules, "cv2", None)
    code, _, err = run_cli(["--data", data, "--out", tmp_path / "q.bin"], capsys)
    assert code == 2 and "pip install opencv-contrib-python-headless" in one_line_error(err)
    assert not (tmp_path / "q.bin").exists()
    shutil.rmtree(data)
