"""`python -m engine.pretrain` end to end on the embedded photos, and its answers to bad input."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
# The root conftest turns on the Triton interpreter on CPU machines; these CLI tests check the
# engine's behaviour, not the kernels, so they run the reference path.
FAST = ["--steps", "2", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--no-fused"]


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_cli_end_to_end_on_embedded_photos(tmp_path):
    """The README's main command, shortened: a real subprocess, as a user runs it."""
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # as on a user's CPU machine
    proc = subprocess.run([sys.executable, "-m", "engine.pretrain", "--fused", "--out", str(out),
                           "--steps", "4", "--workers", "1", "--log-every", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    # --fused on a CPU machine says so in one line and runs the reference path
    assert sum("--fused" in line for line in text.splitlines()) == 1
    assert "reference path" in text
    assert "step 4/4" in text and "img/s" in text and "data-wait" in text
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss", "lr", "momentum", "grad_norm", "img_per_s", "data_wait"):
        assert key in records[-1]
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    with Image.open(out / "loss_curve.png") as png:
        assert png.format == "PNG" and png.size[0] >= 400


def test_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--preset", "--data", "--epochs", "--steps", "--batch-size", "--accum", "--out",
                 "--resume", "--fused", "--no-fused", "--device", "--seed", "--workers"):
        assert flag in text


def write_jpeg(path: Path, size=(40, 30), mode="RGB", color=(200, 30, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path, "JPEG")


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = run_cli(["--data", tmp_path / "nope", "--out", tmp_path / "o", *FAST], capsys)
    assert code == 2
    assert "nope" in one_line_error(err)


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["--data", tmp_path / "empty", "--out", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "no images" in one_line_error(err)


def test_folder_of_non_images(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"note{i}.txt").write_text("not an image")
    code, _, err = run_cli(["--data", folder, "--out", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "no images" in one_line_error(err)


def test_odd_and_broken_images_are_decoded_or_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "odd"
    for i in range(8):
        write_jpeg(folder / f"good{i}.jpg", size=(48 + i, 40))
    Image.new("L", (50, 40), 100).save(folder / "gray.jpg", "JPEG")
    Image.new("CMYK", (50, 40), (10, 20, 30, 40)).save(folder / "cmyk.jpg", "JPEG")
    Image.new("RGBA", (50, 40), (1, 2, 3, 100)).save(folder / "alpha.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "tiny.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (50, 60, 70)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    out = tmp_path / "o"
    code, stdout, err = run_cli(["--data", folder, "--out", out, "--steps", "3", "--batch-size",
                                 "4", "--workers", "0", "--log-every", "1", "--no-fused"], capsys)
    assert code == 0, err
    text = stdout + err
    assert "truncated.jpg" in text and "garbage.jpg" in text
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_files"] >= 1  # those met so far are counted and named


def test_batch_larger_than_dataset(tmp_path, capsys):
    folder = tmp_path / "few"
    for i in range(5):
        write_jpeg(folder / f"{i}.jpg")
    code, _, err = run_cli(["--data", folder, "--out", tmp_path / "o", "--steps", "1",
                            "--batch-size", "16", "--workers", "0", "--no-fused"], capsys)
    assert code == 2 and "batch" in one_line_error(err).lower()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, _, err = run_cli(["--out", blocker / "run", *FAST], capsys)
    assert code == 2 and "--out" in one_line_error(err)


def test_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "fresh").mkdir()
    code, _, err = run_cli(["--out", tmp_path / "fresh", "--resume", *FAST], capsys)
    assert code == 2 and "no checkpoint" in one_line_error(err)


def test_existing_checkpoint_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--out", out, *FAST], capsys)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(["--out", out, *FAST], capsys)
    assert code == 2 and "--resume" in one_line_error(err)
    assert (out / "checkpoint.pt").read_bytes() == before
    # and --resume continues it: extend to 4 steps
    code, _, err = run_cli(["--out", out, "--resume", "--steps", "4", "--workers", "0",
                            "--no-fused"], capsys)
    assert code == 0, err
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_corrupt_checkpoint_gives_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    code, _, err = run_cli(["--out", out, "--resume", *FAST], capsys)
    assert code == 2 and "cannot read checkpoint" in one_line_error(err)


def test_bad_config_values(tmp_path, capsys):
    code, _, err = run_cli(["--out", tmp_path / "o", "--steps", "0", "--no-fused"], capsys)
    assert code == 2 and "--steps" in one_line_error(err)
    code, _, err = run_cli(["--out", tmp_path / "o", "--optimizer", "lamb", *FAST], capsys)
    # NVIDIA apex is not installed here: the option says so instead of failing deep inside
    assert code == 2 and "apex" in one_line_error(err)
