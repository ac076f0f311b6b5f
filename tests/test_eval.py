"""engine.eval: the weighted kNN against constructed features and a brute-force reference, the
linear probe, the eval transform, feature extraction on real images, and the CLI.

Quality bar (issue 5): features separable by construction give 100 % (k=20 and 200); random
labels give chance within 4 binomial standard deviations; the kNN agrees exactly with a per-query
Python implementation of the DINO formula on a small set.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoint import save_checkpoint
from engine.eval import (
    DecodedImages,
    EvalDataset,
    EvalTransform,
    OnlineKnn,
    build_encoder,
    decode_images,
    extract_features,
    knn_classify,
    linear_probe,
    load_encoder,
    normalize_images,
    subsample_indices,
)
from engine.eval.__main__ import main
from engine.methods.sim import SIM
from engine.presets import PretrainConfig
from engine.trainer import seed_everything
from pipelines.datasets import ImageFolder

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def tiny_config(**changes) -> PretrainConfig:
    values = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2,
              "decoder_dim": 32, "decoder_heads": 2, "projector_depth": 1, "predictor_depth": 1,
              "batch_size": 4, "seed": 3, "preset": "tiny-test"}
    values.update(changes)
    return PretrainConfig(**values).validate()


def save_sim_checkpoint(out: Path, cfg: PretrainConfig | None = None,
                        step: int = 7) -> tuple[Path, SIM]:
    """A checkpoint in the trainer's format (engine/trainer.py _save), online != target."""
    cfg = cfg or tiny_config()
    seed_everything(cfg.seed)
    model = SIM(cfg)
    with torch.no_grad():  # a "trained" online encoder that differs from its EMA copy
        for name, param in model.encoder.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    out.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(out, {"model": model.state_dict(), "config": cfg.to_dict(),
                                 "step": step, "optimizer": {}, "scaler": {}, "schedule": {},
                                 "data_position": {"epoch": 0, "batch": 0}, "rng": {}})
    return path, model


def binomial_margin(p: float, n: int, sigmas: float = 4.0) -> float:
    """`sigmas` standard deviations of an accuracy over n independent trials at chance p."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def separable_features(num_classes: int, per_class: int, dim: int, seed: int,
                       spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class around its own orthogonal direction: cosine ~1 within, ~0 across classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = torch.eye(num_classes, dim)[labels] + spread * torch.randn(len(labels), dim,
                                                                          generator=generator)
    return features, labels


def write_png(path: Path, color, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def colour_folder(root: Path, classes=("blue", "green", "red"), per_class: int = 6) -> Path:
    """Lossless solid-colour images, a class per colour (slightly varied per image)."""
    base = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (20, 40, 210)}
    for name in classes:
        for i in range(per_class):
            r, g, b = base[name]
            write_png(root / name / f"{i}.png", (r + i, g, b - i))
    return root


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- kNN
def test_knn_separable_features_are_classified_perfectly():
    train, train_labels = separable_features(10, 100, 32, seed=0)
    query, query_labels = separable_features(10, 30, 32, seed=1)
    result = knn_classify(train, train_labels, query, 10, k=(20, 200), query_labels=query_labels)
    assert result.top1 == {20: 1.0, 200: 1.0} and result.top5 == {20: 1.0, 200: 1.0}
    assert torch.equal(result.predictions(20), query_labels)
    assert not result.notes


def test_knn_random_labels_give_chance():
    """Labels independent of the features: each query is right with probability 1/C, so the
    accuracy is binomial(n, 1/C)/n; the margin is 4 standard deviations (0.027 for n=2000)."""
    generator = torch.Generator().manual_seed(0)
    num_classes, n = 10, 2000
    train = torch.randn(3000, 48, generator=generator)
    query = torch.randn(n, 48, generator=generator)
    train_labels = torch.randint(0, num_classes, (3000,), generator=generator)
    query_labels = torch.randint(0, num_classes, (n,), generator=generator)
    result = knn_classify(train, train_labels, query, num_classes, k=(20, 200),
                          query_labels=query_labels)
    for k in (20, 200):
        assert abs(result.top1[k] - 0.1) <= binomial_margin(0.1, n), result.top1
        assert abs(result.top5[k] - 0.5) <= binomial_margin(0.5, n), result.top5


def brute_force_knn(train, train_labels, query, num_classes, k, temperature=0.07):
    """Per query, in plain Python: cosine similarities, the k largest, exp(s/T) votes, classes
    ranked by score (ties: lower class index first)."""
    def normalised(row):
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]

    train_rows = [normalised(row) for row in train.tolist()]
    labels = train_labels.tolist()
    ranked = []
    for row in query.tolist():
        q = normalised(row)
        sims = sorted(((sum(a * b for a, b in zip(q, x)), j) for j, x in enumerate(train_rows)),
                      key=lambda item: -item[0])[:min(k, len(train_rows))]
        scores = [0.0] * num_classes
        for sim, j in sims:
            scores[labels[j]] += math.exp(sim / temperature)
        ranked.append(sorted(range(num_classes), key=lambda c: (-scores[c], c))[:5])
    return ranked


def test_knn_agrees_with_brute_force():
    generator = torch.Generator().manual_seed(5)
    num_classes = 7
    train = torch.randn(70, 6, generator=generator, dtype=torch.float64)
    query = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    train_labels = torch.randint(0, num_classes, (70,), generator=generator)
    query_labels = torch.randint(0, num_classes, (30,), generator=generator)
    ks = (1, 3, 10, 50, 100)
    result = knn_classify(train, train_labels, query, num_classes, k=ks, chunk=8,
                          query_labels=query_labels)
    assert result.k_used[100] == 70 and any("clamped to 70" in n for n in result.notes)
    for k in ks:
        expected = brute_force_knn(train, train_labels, query, num_classes, k)
        assert result.ranked[k].tolist() == expected, k
        top1 = sum(r[0] == y for r, y in zip(expected, query_labels.tolist())) / 30
        width = min(5, k)
        top5 = sum(y in r[:width] for r, y in zip(expected, query_labels.tolist())) / 30
        assert result.top1[k] == pytest.approx(top1) and result.top5[k] == pytest.approx(top5)


def test_knn_chunking_and_dtype_do_not_change_predictions():
    generator = torch.Generator().manual_seed(2)
    train = torch.randn(500, 16, generator=generator)
    query = torch.randn(97, 16, generator=generator)
    labels = torch.randint(0, 5, (500,), generator=generator)
    whole = knn_classify(train, labels, query, 5, k=(20, 200))
    for chunk in (1, 13):
        chunked = knn_classify(train, labels, query, 5, k=(20, 200), chunk=chunk)
        for k in (20, 200):
            assert torch.equal(whole.ranked[k], chunked.ranked[k])
    half = knn_classify(train.bfloat16(), labels, query.bfloat16(), 5, k=20)
    assert half.ranked[20].shape == (97, 5)  # half inputs are upcast, not rejected


def test_knn_rejects_bad_inputs():
    train, labels = torch.randn(10, 4), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="channels"):
        knn_classify(train, labels, torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="labels must lie"):
        knn_classify(train, labels + 2, torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(train, labels, torch.randn(3, 4), 2, k=0)


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_features_and_random_labels():
    train, train_labels = separable_features(10, 200, 32, seed=0)
    val, val_labels = separable_features(10, 100, 32, seed=1)
    train = train * 3 + 1  # any scale and offset: the BatchNorm takes them out
    val = val * 3 + 1
    result = linear_probe(train, train_labels, val, val_labels, 10, epochs=30)
    assert result.top1 == 1.0 and result.top5 == 1.0 and result.train_top1 == 1.0
    assert result.steps == 30 * (2000 // 256) and result.lr == pytest.approx(0.1)

    generator = torch.Generator().manual_seed(1)
    random_train = torch.randint(0, 10, (2000,), generator=generator)
    random_val = torch.randint(0, 10, (1000,), generator=generator)
    chance = linear_probe(train, random_train, val, random_val, 10, epochs=30)
    assert abs(chance.top1 - 0.1) <= binomial_margin(0.1, 1000), chance.top1
    again = linear_probe(train, random_train, val, random_val, 10, epochs=30)
    assert again.top1 == chance.top1 and again.final_loss == chance.final_loss  # deterministic


# ----------------------------------------------------------------------------- transform
def test_eval_transform_keeps_small_images_and_centre_crops_large_ones():
    transform = EvalTransform(32)
    square = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    out = transform(square)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert torch.equal(out, torch.from_numpy(np.array(square)).permute(2, 0, 1))
    # 64x32 (W x H), at/below the size: its centred 32x32 square, nothing resized
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 255, 0), (16, 0, 48, 32))
    assert transform.box(64, 32) == (16.0, 0.0, 48.0, 32.0)
    out = transform(wide)
    assert torch.all(out[1] == 255) and torch.all(out[0] == 0)
    # larger than the size: shorter side to int(128 / 0.875) = 146, centre crop 128
    big = EvalTransform(128)
    left, upper, right, lower = big.box(300, 200)
    side = 128 * 200 / 146
    assert (right - left, lower - upper) == pytest.approx((side, side))
    assert (left + right) / 2 == pytest.approx(150) and (upper + lower) / 2 == pytest.approx(100)
    assert big(Image.new("RGB", (300, 200))).shape == (3, 128, 128)


def test_subsample_is_deterministic_random_and_sorted():
    first = subsample_indices(1000, 50)
    assert first == subsample_indices(1000, 50) and first == sorted(first) and len(first) == 50
    assert max(first) > 500  # spread over the dataset, not its first images
    assert subsample_indices(10, 20) is None and subsample_indices(10, None) is None


# ----------------------------------------------------------------------------- encoder
def test_random_init_is_the_trainers_initialisation():
    cfg = tiny_config()
    seed_everything(cfg.seed)
    trainer_encoder = SIM(cfg).encoder  # what pretrain() builds after seeding
    before = torch.get_rng_state()
    encoder = build_encoder(cfg)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    for (name, a), (_, b) in zip(trainer_encoder.state_dict().items(),
                                 encoder.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_encoder_from_a_real_training_run(tmp_path):
    """Two real optimiser steps of the CPU demo preset: the online encoder is loaded as trained,
    and the random-init baseline has the run's (frozen) patch embedding."""
    from engine.pretrain import main as pretrain_main

    out = tmp_path / "run"
    assert pretrain_main(["--steps", "2", "--batch-size", "8", "--workers", "0", "--no-fused",
                          "--quiet", "--out", str(out)]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    encoder, cfg = load_encoder(out, "cpu")
    assert cfg.preset == "sim-demo-cpu" and not encoder.training
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, checkpoint["model"][f"encoder.{name}"]), name
    baseline, _ = load_encoder(out / "checkpoint.pt", "cpu", random_init=True)
    assert torch.equal(baseline.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    target, _ = load_encoder(out, "cpu", branch="target")
    assert torch.equal(target.cls_token, checkpoint["model"]["target_encoder.cls_token"])


# ----------------------------------------------------------------------------- features
def test_extract_features_on_real_images(cifar_train_subset):
    folder = ImageFolder(str(cifar_train_subset))
    encoder = build_encoder(tiny_config()).eval()
    features = extract_features(encoder, folder, "cpu", batch_size=128, workers=0)
    assert features.patch_mean.shape == (640, 32) and features.cls.shape == (640, 32)
    assert features.patch_mean.dtype == torch.float32 and features.cls.dtype == torch.float32
    assert features.labels.tolist() == folder.labels and not features.skipped
    assert torch.isfinite(features.patch_mean).all()
    # the definition, on the first images: patch-token mean and cls token of the last block
    transform = EvalTransform(32)
    images = torch.stack([transform(folder[i].image) for i in range(4)])
    with torch.no_grad():
        tokens = encoder(normalize_images(images))
    torch.testing.assert_close(features.patch_mean[:4], tokens[:, 1:].mean(1))
    torch.testing.assert_close(features.cls[:4], tokens[:, 0])
    # deterministic: worker processes, and decoded-once images, give the same bits
    dataset = EvalDataset(folder, 32)
    with_workers = extract_features(encoder, dataset, "cpu", batch_size=128, workers=2)
    decoded = decode_images(dataset, "cpu", batch_size=128)
    assert isinstance(decoded, DecodedImages) and decoded.images.dtype == torch.uint8
    assert decoded.nbytes == 640 * 3 * 32 * 32
    from_cache = extract_features(encoder, decoded, batch_size=128)
    for other in (with_workers, from_cache):
        assert torch.equal(other.patch_mean, features.patch_mean)
        assert torch.equal(other.cls, features.cls)
        assert torch.equal(other.labels, features.labels)


def test_online_monitor_on_colour_classes(tmp_path):
    """Solid-colour classes are separable at the image level: even an untrained encoder's kNN
    gets them all; repeated evaluations reuse the decoded images and agree."""
    root = colour_folder(tmp_path / "colours")
    encoder = build_encoder(tiny_config()).train()
    monitor = OnlineKnn(root, root, img_size=32, device="cpu", k=(3, 200), workers=0)
    assert "cached as uint8 on cpu" in monitor.describe()
    first = monitor.evaluate(encoder)
    assert encoder.training  # mode restored
    assert first["knn_top1"] == first["knn_top1_patch@200"] == 1.0
    assert {"knn_top1_patch@3", "knn_top1_cls@3", "knn_top1_cls@200", "knn_seconds"} <= set(first)
    cached = monitor._cached
    second = monitor.evaluate(encoder)
    assert monitor._cached is cached
    assert {k: v for k, v in first.items() if k != "knn_seconds"} == \
        {k: v for k, v in second.items() if k != "knn_seconds"}


# ----------------------------------------------------------------------------- CLI
def test_cli_knn_end_to_end(tmp_path, cifar_train_subset, capsys):
    ckpt, _ = save_sim_checkpoint(tmp_path / "run")
    code, out, err = run_cli(["knn", "--checkpoint", ckpt, "--train-data", cifar_train_subset,
                              "--val-data", cifar_train_subset, "--max-train", 300,
                              "--max-val", 100, "--workers", 0, "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "eval_knn.json").read_text())
    assert report["train_images"] == 300 and report["val_images"] == 100
    assert report["train_images_available"] == 640 and report["num_classes"] == 10
    assert report["step"] == 7 and report["random_init"] is False
    assert set(report["results"]) == {"patch", "cls"}
    for kind in ("patch", "cls"):
        assert set(report["results"][kind]) == {"20", "200"}
        for values in report["results"][kind].values():
            assert 0.0 <= values["top1"] <= values["top5"] <= 1.0
    assert report["elapsed_s"]["total"] > 0 and report["device"] == "cpu"
    assert "patch" in out and "top-1" in out and "eval_knn.json" in out


def test_cli_linear_and_random_init(tmp_path, capsys):
    root = colour_folder(tmp_path / "colours")
    ckpt, _ = save_sim_checkpoint(tmp_path / "run")
    code, _, err = run_cli(["linear", "--checkpoint", ckpt, "--train-data", root, "--val-data",
                            root, "--epochs", 5, "--probe-batch-size", 6, "--workers", 0,
                            "--features", "cls", "--out", tmp_path / "lin.json", "--quiet"],
                           capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "lin.json").read_text())
    assert list(report["results"]) == ["cls"] and report["config"]["epochs"] == 5
    assert 0.0 <= report["results"]["cls"]["top1"] <= 1.0
    # the untrained baseline of the same run: next to the checkpoint, under its own name
    code, _, err = run_cli(["knn", "--checkpoint", ckpt, "--random-init", "--train-data", root,
                            "--val-data", root, "--k", 3, "--workers", 0, "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "eval_knn_random_init.json").read_text())
    assert report["random_init"] is True and report["results"]["patch"]["3"]["top1"] == 1.0
    # and of a preset, without any checkpoint
    code, _, err = run_cli(["knn", "--random-init", "--preset", "sim-demo-cpu", "--train-data",
                            root, "--val-data", root, "--k", 3, 200, "--workers", 0, "--quiet",
                            "--out", tmp_path / "preset.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "preset.json").read_text())
    assert report["model"]["img_size"] == 64 and report["results"]["patch"]["200"]["k_used"] == 18
    assert any("clamped to 18" in note for note in report["notes"])


def test_cli_as_a_subprocess(tmp_path):
    root = colour_folder(tmp_path / "colours")
    ckpt, _ = save_sim_checkpoint(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "engine.eval", "knn", "--checkpoint", str(ckpt),
                           "--train-data", str(root), "--val-data", str(root), "--workers", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "features [" in proc.stderr  # the progress bar
    assert json.loads((tmp_path / "run" / "eval_knn.json").read_text())["val_images"] == 18


def test_cli_bad_inputs(tmp_path, capsys):
    root = colour_folder(tmp_path / "colours")
    ckpt, _ = save_sim_checkpoint(tmp_path / "run")
    data = ["--train-data", root, "--val-data", root]

    code, _, err = run_cli(["knn", "--checkpoint", tmp_path / "nope.pt", *data], capsys)
    assert code == 2 and "nope.pt" in one_line_error(err)
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    code, _, err = run_cli(["knn", "--checkpoint", tmp_path / "bad.pt", *data], capsys)
    assert code == 2 and "cannot read checkpoint" in one_line_error(err)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    code, _, err = run_cli(["knn", "--checkpoint", tmp_path / "foreign.pt", *data], capsys)
    assert code == 2 and "not a densesim checkpoint" in one_line_error(err)

    code, _, err = run_cli(["knn", "--checkpoint", ckpt, "--train-data", tmp_path / "missing",
                            "--val-data", root], capsys)
    assert code == 2 and "missing" in one_line_error(err)
    flat = tmp_path / "flat"
    for i in range(3):
        write_png(flat / f"{i}.png", (i, i, i))
    code, _, err = run_cli(["knn", "--checkpoint", ckpt, "--train-data", flat, "--val-data",
                            root], capsys)
    assert code == 2 and "no class folders" in one_line_error(err)
    other = colour_folder(tmp_path / "other", classes=("blue", "green"), per_class=2)
    code, _, err = run_cli(["knn", "--checkpoint", ckpt, "--train-data", root, "--val-data",
                            other], capsys)
    assert code == 2 and "only in train: red" in one_line_error(err)

    code, _, err = run_cli(["knn", *data], capsys)
    assert code == 2 and "--checkpoint" in one_line_error(err)
    code, _, err = run_cli(["knn", "--checkpoint", ckpt, "--preset", "sim-demo-cpu",
                            "--random-init", *data], capsys)
    assert code == 2 and "--preset" in one_line_error(err)
    code, _, err = run_cli(["knn", "--random-init", *data], capsys)
    assert code == 2 and "--preset" in one_line_error(err)
    code, _, err = run_cli(["knn", "--checkpoint", ckpt, "--k", 0, *data], capsys)
    assert code == 2 and "--k" in one_line_error(err)
