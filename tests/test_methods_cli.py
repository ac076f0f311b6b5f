"""Every method through the real entry points: `--method NAME` smoke runs on the embedded photos,
bit-exact resume, one-line errors for bad configurations, and the contract's bookkeeping."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.methods import METHODS, build_method
from engine.presets import PRESETS, PretrainConfig, preset_config
from engine.pretrain import main
from engine.trainer import RunOptions, pretrain

ROOT = Path(__file__).resolve().parents[1]
DENSE = [m for m in METHODS if m != "sim"]
# Small widths so a step of any method takes well under a second on one core.
SMALL_ARGS = {
    "mocov2": ["queue_length=64", "hidden=64", "dim=16"],
    "densecl": ["queue_length=64", "hidden=64", "dim=16"],
    "pixpro": ["hidden=64", "dim=16"],
    "densesiam": ["global_dim=32", "global_pred_hidden=8", "dense_hidden=32", "dense_dim=16",
                  "dense_pred_hidden=8", "regions=4"],
    "lcloss": ["hidden=64", "dim=16", "dense_hidden=32", "dense_dim=16"],
    "swav": ["prototypes=32", "hidden=64", "dim=16"],
    "regioncl": ["queue_length=64", "hidden=64", "dim=16"],
    "detco": ["queue_length=64", "hidden=64", "dim=16"],
    "ccop": ["queue_length=64", "hidden=64", "dim=16", "fpn_channels=16", "max_boxes=8"],
    "scfs": ["dim=64", "hidden=32", "bottleneck=16", "layer_dim=16", "layer_hidden=24",
             "layer_bottleneck=8"],
    "updetr": ["hidden_dim=32", "nheads=2", "enc_layers=1", "dec_layers=2", "dim_feedforward=32",
               "num_queries=20", "num_patches=4", "patch_size=16"],
    "pairdetr": ["hidden_dim=32", "nheads=2", "enc_layers=1", "dec_layers=2",
                 "dim_feedforward=32", "num_queries=30", "pair_dim=16"],
    "detreg": ["hidden_dim=32", "nheads=2", "enc_layers=1", "dec_layers=2",
               "dim_feedforward=64", "num_queries=12", "crop_size=8", "max_boxes=6"],
}
# Detector pre-training trains a DETR on a ResNet (no ViT) and keeps no EMA target.
DETECTORS = {"updetr", "pairdetr", "detreg"}


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def method_args(method: str) -> list[str]:
    return [part for arg in SMALL_ARGS.get(method, []) for part in ("--method-arg", arg)]


@pytest.mark.parametrize("method", DENSE)
def test_method_alone_runs_its_demo_preset_on_the_embedded_photos(method, tmp_path, capsys):
    out = tmp_path / method
    code, stdout, err = run_cli(["--method", method, "--steps", "3", "--batch-size", "8",
                                 "--workers", "0", "--log-every", "1", "--no-fused", "--out", out,
                                 *method_args(method)], capsys)
    assert code == 0, err
    text = stdout + err
    assert "done: step 3/3" in text and "47 images" in text    # the embedded photos
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["preset"] == f"{method}-demo-cpu"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["method"] == method
    assert any(key.startswith("encoder.") for key in saved["model"])
    if method in ("mocov2", "densecl"):
        assert int(saved["model"]["queue.ptr"]) == 3 * 8 % 64  # every step's keys enqueued


def tiny(method: str, **changes) -> PretrainConfig:
    """A tiny configuration of `method` on a ViT (or a ResNet-18 with changes)."""
    args = dict(arg.split("=") for arg in SMALL_ARGS.get(method, []))
    values = dict(preset_config(f"{method}-demo-cpu" if method != "sim" else "sim-demo-cpu")
                  .to_dict())
    values.update(backbone="vit", img_size=32, patch_size=8, dim=32, depth=1, heads=2,
                  decoder_dim=32, decoder_heads=2, projector_depth=1, predictor_depth=1,
                  batch_size=4, steps=4, warmup_steps=1, workers=0, log_every=1,
                  checkpoint_every=1000, method_args=args, preset="test-tiny")
    if method in DETECTORS:
        values.update(backbone="resnet18", cifar_stem=True)
    values.update(changes)
    return PretrainConfig.from_dict(values).validate()


@pytest.mark.parametrize("method,backbone", [(m, "resnet18" if m in DETECTORS else "vit")
                                             for m in METHODS]
                         + [("densecl", "resnet18"), ("pixpro", "resnet18")])
def test_resume_is_bit_exact_for_every_method(method, backbone, tmp_path):
    """4 straight steps == 2 steps, stop, resume, 2 more: every parameter, buffer (queues,
    pointers, BN statistics), optimiser moment and logged loss, bit for bit."""
    changes = {} if backbone == "vit" else dict(backbone="resnet18", cifar_stem=True)
    run = dict(device="cpu", fused=False, quiet=True)
    straight = pretrain(tiny(method, **changes), RunOptions(out=tmp_path / "straight", **run))
    pretrain(tiny(method, **changes), RunOptions(out=tmp_path / "split", stop_after=2, **run))
    resumed = pretrain(tiny(method, **changes), RunOptions(out=tmp_path / "split", resume=True,
                                                           **run))
    assert resumed["step"] == straight["step"] == 4
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    read = lambda out: [json.loads(line)["loss"]  # noqa: E731
                        for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert read(tmp_path / "straight") == read(tmp_path / "split")


@pytest.mark.parametrize("method", DENSE)
def test_every_method_keeps_its_backbone_under_encoder(method):
    torch.manual_seed(0)
    model = build_method(tiny(method))
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert "encoder" in names
    # SimSiam / SwAV and the detectors (frozen CNN): no momentum target
    has_target = method not in ("densesiam", "swav", *DETECTORS)
    assert ("target_encoder" in names) == has_target
    # EMA targets are never trained by the optimiser
    for name, p in model.named_parameters():
        if name.startswith("target_"):
            assert not p.requires_grad, name


@pytest.mark.parametrize("args,needle", [
    (["--method", "densecl", "--method-arg", "nope=1"], "unknown --method-arg nope"),
    (["--method", "densecl", "--method-arg", "temperature=abc"], "temperature"),
    (["--method", "densecl", "--method-arg", "temperature=-1"], "temperature"),
    (["--method", "mocov2", "--method-arg", "queue_length=0"], "queue_length"),
    (["--method", "pixpro", "--method-arg", "justakey"], "KEY=VALUE"),
    (["--method", "densecl", "--loss", "paper"], "--loss applies to --method sim only"),
    (["--method", "sim", "--backbone", "resnet18"], "ViT"),
    (["--preset", "densecl-r50", "--method", "pixpro"], "densecl recipe"),
    (["--method", "densesiam", "--method-arg", "regions=1"], "regions"),
])
def test_bad_method_config_gets_one_line(args, needle, tmp_path, capsys):
    code, _, err = run_cli([*args, "--out", tmp_path / "o", "--steps", "1", "--workers", "0",
                            "--no-fused"], capsys)
    assert code == 2
    assert needle in one_line_error(err)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_published_presets_hold_the_papers_recipes():
    r50 = {name: preset_config(name) for name in PRESETS if name.endswith("-r50")}
    assert set(r50) == {f"{m}-r50" for m in DENSE}
    for cfg in r50.values():
        # the detector recipes see whole-image-sized views (448 px, about a 400 x 533 image)
        assert cfg.backbone == "resnet50"
        assert cfg.img_size == (448 if cfg.method in DETECTORS else 224)
    moco, dense, pix = r50["mocov2-r50"], r50["densecl-r50"], r50["pixpro-r50"]
    for cfg in (moco, dense):  # 8 x 32, SGD lr 0.03 at 256, wd 1e-4 on all, m 0.999 constant
        assert (cfg.optimizer, cfg.blr, cfg.weight_decay, cfg.weight_decay_filter) == \
            ("sgd", 0.03, 1e-4, "none")
        assert (cfg.momentum, cfg.ema_schedule, cfg.batch_size, cfg.epochs) == \
            (0.999, "constant", 32, 200)
        assert cfg.augmentation == "mocov2" and cfg.clip_grad == 0
    assert build_method_hyper("densecl").loss_lambda == 0.5
    assert build_method_hyper("densecl").queue_length == 65536
    assert build_method_hyper("mocov2").temperature == 0.2
    # PixPro: LARS base lr 1.0 per 256, wd 1e-5, 5 warm-up epochs, 100 epochs, EMA 0.99 cosine,
    # BYOL augmentation resized bilinearly, crop (0.08, 1).
    assert (pix.optimizer, pix.blr, pix.weight_decay, pix.warmup_epochs, pix.epochs) == \
        ("lars", 1.0, 1e-5, 5, 100)
    assert (pix.momentum, pix.ema_schedule, pix.augmentation, pix.interpolation) == \
        (0.99, "cosine", "byol", "bilinear")
    hyper = build_method_hyper("pixpro")
    assert (hyper.gamma, hyper.threshold, hyper.transform_layers, hyper.instance_weight) == \
        (2.0, 0.7, 1, 0.0)
    # SwAV 800 ep: 64 x 64, LARC around SGD, 0.3 per 256 (4.8 at 4096), wd 1e-6, 10 warm-up
    # epochs, cosine to 0.0048; 3000 prototypes, eps 0.05, 3 iterations, tau 0.1, 2x224 + 6x96.
    swav = r50["swav-r50"]
    assert (swav.optimizer, swav.blr, swav.weight_decay, swav.batch_size, swav.epochs,
            swav.warmup_epochs, swav.min_lr, swav.augmentation) == \
        ("lars", 0.3, 1e-6, 64, 800, 10, 0.0048, "swav")
    model = build_method(swav)
    h = model.hyper
    assert (h.prototypes, h.epsilon, h.sinkhorn_iterations, h.temperature, h.queue_length,
            h.freeze_prototypes_steps) == (3000, 0.05, 3, 0.1, 0, 313)
    assert [(c.count, c.size, c.scale) for c in model.views.crops] == \
        [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]
    # RegionCL-M: 8 x 128, SGD 0.15 at 1024, tau 0.2, 65,536 keys, boxes 3..5 cells of 7
    rcl = r50["regioncl-r50"]
    assert (rcl.optimizer, rcl.blr * 1024 / 256, rcl.batch_size, rcl.epochs, rcl.momentum) == \
        ("sgd", 0.15, 128, 200, 0.999)
    h = build_method_hyper("regioncl")
    assert (h.temperature, h.queue_length, h.cut_lower, h.cut_upper) == (0.2, 65536, 3, 6)
    # CCOP: 8 x 32, SGD 0.3 per 256, 10 warm-up epochs, 800 epochs, crops (0.1, 1), 100 boxes
    ccop = r50["ccop-r50"]
    assert (ccop.blr, ccop.warmup_epochs, ccop.epochs, ccop.crop_scale, ccop.momentum) == \
        (0.3, 10, 800, (0.1, 1.0), 0.999)
    h = build_method_hyper("ccop")
    assert (h.max_boxes, h.jitters, h.margin, h.iou_thr, h.temperature) == \
        (100, 10, 0.4, (0.8, 0.4), 0.2)
    assert r50["detco-r50"].blr == 0.03 and build_method_hyper("detco").level_weights == \
        (0.1, 0.4, 0.7, 1.0)
    scfs = r50["scfs-r50"]
    assert (scfs.optimizer, scfs.blr, scfs.momentum, scfs.ema_schedule) == \
        ("sgd", 0.1, 0.996, "cosine")


def build_method_hyper(method: str):
    from engine.methods import method_class
    return method_class(method).hyperparameters(PretrainConfig(method=method))


def test_fused_on_a_cpu_says_so_once_for_a_dense_method(tmp_path):
    """The README's `python -m engine.pretrain --fused --method NAME`, as a user runs it."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "engine.pretrain", "--fused", "--method",
                           "densecl", "--steps", "2", "--batch-size", "8", "--workers", "0",
                           "--log-every", "1", "--out", str(out), *method_args("densecl")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert sum("--fused" in line for line in text.splitlines()) == 1
    assert "DenseCL on resnet18" in text and "loss_dense" in (out / "metrics.jsonl").read_text()
