"""The engine with each loader (`--loader`), the auto choice, and the online kNN monitor."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import pipelines.resident as resident
import engine.loaders as loaders
from engine.loaders import build_loader
from engine.pretrain import main as pretrain_main
from engine.trainer import RunOptions, pretrain
from tests.test_training import losses, tiny_run_config


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_auto_loader_choice(cifar_train_subset, monkeypatch):
    cfg = tiny_run_config(batch_size=8)
    cpu = torch.device("cpu")
    for fused in (False, True):  # on a CPU, auto is the Pillow loader (workers overlap the step)
        loader, message = build_loader(cfg, str(cifar_train_subset), cpu, fused=fused)
        assert type(loader).__name__ == "TwoViewLoader"
        assert message.startswith("data: torch loader")
    # On a GPU with --fused, auto tries the resident loader first; a folder over its budget falls
    # back (to DALI where installed, else torch) and the one line says why. The device check is
    # the only CUDA-specific part, so it is faked here and the loaders run on the CPU.
    monkeypatch.setattr(loaders, "_auto_prefers_fast_loaders", lambda device, fused: fused)
    loader, message = build_loader(cfg, str(cifar_train_subset), cpu, fused=True)
    assert type(loader).__name__ == "ResidentTwoViewLoader", message
    monkeypatch.setattr(resident, "memory_budget", lambda *a, **k: (1000, "test budget"))
    loader, message = build_loader(cfg, str(cifar_train_subset), cpu, fused=True)
    expected = "DaliTwoViewLoader" if loaders._dali_ready() else "TwoViewLoader"
    assert type(loader).__name__ == expected
    assert "not resident" in message and "budget" in message
    # ... but an explicit --loader resident stops with the reason.
    cfg.loader = "resident"
    with pytest.raises(resident.ResidentBudgetError, match="--loader torch"):
        build_loader(cfg, str(cifar_train_subset), cpu, fused=True)


def test_resident_loader_trains_and_resumes_exactly(cifar_train_subset, tmp_path):
    cfg = dict(steps=12, batch_size=16, checkpoint_every=4, loader="resident")
    data = str(cifar_train_subset)
    straight = pretrain(tiny_run_config(**cfg), RunOptions(out=tmp_path / "straight", data=data,
                                                          device="cpu", fused=False, quiet=True))
    pretrain(tiny_run_config(**cfg), RunOptions(out=tmp_path / "split", data=data, device="cpu",
                                                fused=False, quiet=True, stop_after=6))
    resumed = pretrain(tiny_run_config(**cfg), RunOptions(out=tmp_path / "split", data=data,
                                                         device="cpu", fused=False, quiet=True,
                                                         resume=True))
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(straight["out"]) == losses(resumed["out"])
    curve = losses(straight["out"])
    assert all(map(lambda v: v == v, curve)) and curve[-1] < curve[0]


def test_dali_loader_trains(cifar_train_subset, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e '.[dali]')")
    result = pretrain(tiny_run_config(steps=3, batch_size=8, loader="dali"),
                      RunOptions(out=tmp_path / "dali", data=str(cifar_train_subset),
                                 device="cpu", fused=True, quiet=True))
    assert result["step"] == 3 and len(losses(result["out"])) == 3


def test_online_knn_monitor_logs_and_plots(cifar_train_subset, tmp_path):
    data = str(cifar_train_subset)
    cfg = tiny_run_config(steps=17, batch_size=16, eval_every=0.2)  # 40 steps/epoch: every 8
    result = pretrain(cfg, RunOptions(out=tmp_path / "knn", data=data, device="cpu",
                                      fused=False, quiet=True, eval_data=(data, data)))
    evals = [r for r in _records(result["out"]) if "knn_top1" in r]
    # the random-init baseline, every 8 steps, and the end (step 16 is left to it: 1 step before)
    assert [r["step"] for r in evals] == [0, 8, 17]
    for record in evals:
        assert 0.0 <= record["knn_top1"] <= 1.0
        assert {"knn_top1_patch@20", "knn_top1_cls@200", "knn_seconds", "elapsed"} <= record.keys()
    assert result["knn"]["knn_top1"] == evals[-1]["knn_top1"]
    assert (result["out"] / "loss_curve.png").is_file()


@pytest.mark.parametrize("value", ["only_one_folder", "a,b,c", ",x"])
def test_eval_data_needs_two_folders(value, tmp_path, capsys):
    code = pretrain_main(["--no-fused", "--eval-data", value, "--steps", "1",
                          "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-data takes two folders" in err[0]


def test_eval_data_without_classes_is_one_line_error(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(flat / f"{i}.png")
    proc = subprocess.run([sys.executable, "-m", "engine.pretrain", "--no-fused", "--steps", "1",
                           "--eval-data", f"{flat},{flat}", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "class" in lines[0]
