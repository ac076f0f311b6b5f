"""Evaluation and export of every method's backbone: ResNet checkpoints in kNN/linear, the dense
correspondence metric, torchvision-named exports; one home for loading (engine/encoders.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from engine.checkpoint import CheckpointError, save_checkpoint
from engine.encoders import build_encoder, load_encoder, write_export
from engine.eval.__main__ import main as eval_main
from engine.eval.correspondence import CropPairs, correspondence_accuracy
from engine.export import main as export_main
from engine.methods import build_method
from engine.presets import PretrainConfig
from engine.trainer import seed_everything
from pipelines.datasets import ImageFolder, sample_photos

from fixtures_images import write_class_folder, write_coordinate_sizes


def torchvision_resnet_names(depth: int) -> list[tuple[str, tuple[int, ...]]]:
    """torchvision.models.resnet18 / resnet50's state-dict keys and shapes, minus fc, written
    from torchvision's documented architecture (v1.5), independently of engine/models/resnet.py."""
    def bn(prefix, c):
        return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)),
                (f"{prefix}.running_mean", (c,)), (f"{prefix}.running_var", (c,)),
                (f"{prefix}.num_batches_tracked", ())]
    keys = [("conv1.weight", (64, 3, 7, 7))] + bn("bn1", 64)
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for index in range(count):
            p = f"layer{stage}.{index}"
            if depth == 18:
                keys += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + bn(f"{p}.bn1", planes)
                keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn(f"{p}.bn2", planes)
                out = planes
            else:
                keys += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + bn(f"{p}.bn1", planes)
                keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn(f"{p}.bn2", planes)
                keys += [(f"{p}.conv3.weight", (4 * planes, planes, 1, 1))] + bn(f"{p}.bn3",
                                                                                  4 * planes)
                out = 4 * planes
            if index == 0 and (stage > 1 or inplanes != out):
                keys += [(f"{p}.downsample.0.weight", (out, inplanes, 1, 1))]
                keys += bn(f"{p}.downsample.1", out)
            inplanes = out
    return keys


def resnet_checkpoint(tmp_path, backbone="resnet18", cifar_stem=False, method="densecl"):
    cfg = PretrainConfig(method=method, backbone=backbone, cifar_stem=cifar_stem,
                         img_size=32 if cifar_stem else 64, batch_size=4,
                         method_args={"queue_length": 8, "hidden": 16, "dim": 8}
                         if method in ("densecl", "mocov2") else {}).validate()
    seed_everything(cfg.seed)
    model = build_method(cfg)
    out = tmp_path / f"{method}-{backbone}"
    out.mkdir(parents=True)
    save_checkpoint(out, {"method": method, "model": model.state_dict(), "config": cfg.to_dict(),
                          "step": 7})
    return out, model, cfg


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_export_is_exactly_torchvisions_state_dict(depth, tmp_path, capsys):
    run, model, _ = resnet_checkpoint(tmp_path, f"resnet{depth}")
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "r.pth")]) == 0
    assert f"torchvision resnet{depth}" in capsys.readouterr().out
    state = torch.load(tmp_path / "r.pth", weights_only=True)
    expected = torchvision_resnet_names(depth)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    # torchvision's totals (documented) minus the 1000-way fc
    params = sum(v.numel() for k, v in state.items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")))
    assert params == {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}[depth]
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(state[name], tensor.float() if tensor.is_floating_point() else tensor)
    meta = json.loads((tmp_path / "r.pth.json").read_text())
    assert meta["format"] == "torchvision-resnet" and meta["torchvision_model_name"] == \
        f"resnet{depth}"
    assert "model.fc = torch.nn.Identity()" in meta["usage"]


def test_cifar_stem_export_says_how_to_build_it_and_round_trips(tmp_path):
    run, model, _ = resnet_checkpoint(tmp_path, cifar_stem=True, method="pixpro")
    out, meta_path = write_export(run, tmp_path / "c.pth")
    meta = json.loads(meta_path.read_text())
    assert meta["architecture"]["cifar_stem"] and "maxpool = torch.nn.Identity()" in meta["usage"]
    state = torch.load(out, weights_only=True)
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    from_export, cfg = load_encoder(out)
    from_checkpoint, _ = load_encoder(run)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(from_export(images), from_checkpoint(images), rtol=0, atol=0)
    torch.testing.assert_close(from_checkpoint(images), model.encoder.eval()(images))
    assert cfg.backbone == "resnet18" and cfg.cifar_stem


def test_build_encoder_draws_the_trainers_initial_weights_for_a_resnet_method():
    cfg = PretrainConfig(method="pixpro", backbone="resnet18", cifar_stem=True, img_size=32,
                         batch_size=4, seed=3).validate()
    seed_everything(cfg.seed)
    trained_from = build_method(cfg).encoder.state_dict()
    again = build_encoder(cfg).state_dict()
    for name in trained_from:
        assert torch.equal(trained_from[name], again[name]), name


def test_target_branch_of_a_method_without_one_is_a_one_line_error(tmp_path, capsys):
    run, _, _ = resnet_checkpoint(tmp_path, cifar_stem=True, method="densesiam")
    photos = sample_photos().root
    code = eval_main(["correspondence", "--checkpoint", str(run), "--val-data", str(photos),
                      "--encoder", "target", "--workers", "0", "--quiet",
                      "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no EMA encoder" in err and len(err.strip().splitlines()) == 1


def test_knn_and_linear_accept_a_resnet_checkpoint(tmp_path, capsys):
    run, _, _ = resnet_checkpoint(tmp_path, cifar_stem=True, method="mocov2")
    data = write_class_folder(tmp_path / "data", per_class=4, size=(36, 40))
    for task in ("knn", "linear"):
        code = eval_main([task, "--checkpoint", str(run), "--train-data", str(data),
                          "--val-data", str(data), "--workers", "0", "--k", "3", "--epochs", "2",
                          "--quiet", "--out", str(tmp_path / f"{task}.json")])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        report = json.loads((tmp_path / f"{task}.json").read_text())
        assert report["features"] == ["patch"] and report["method"] == "mocov2"
        assert report["model"]["backbone"] == "resnet18"
        assert any("no cls token" in note for note in report["notes"])
    code = eval_main(["knn", "--checkpoint", str(run), "--train-data", str(data), "--val-data",
                      str(data), "--features", "cls", "--workers", "0", "--quiet"])
    assert code == 2 and "cls" in capsys.readouterr().err


class CoordinateEncoder(nn.Module):
    """A stand-in backbone whose dense map encodes WHERE in the source image each cell is: the
    coordinate images (R = 2.5·row, G = 2.0·col) are decoded back to (row, col) and expanded in
    Gaussian bumps over anchors, so cosine similarity peaks at the same source point."""

    def __init__(self, grid: int, img_size: int):
        super().__init__()
        self.grid, self.img_size = grid, img_size
        self.anchor = nn.Parameter(torch.linspace(0, 130, 27), requires_grad=False)

    def forward(self, images):
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        rgb = (images * std + mean) * 255
        cells = nn.functional.adaptive_avg_pool2d(rgb, self.grid)
        row, col = cells[:, 0] / 2.5, cells[:, 1] / 2.0                  # source coordinates
        bump = lambda v: torch.exp(-((v[:, None] - self.anchor.view(1, -1, 1, 1)) / 6) ** 2)  # noqa: E731
        return torch.einsum("bihw,bjhw->bijhw", bump(row), bump(col)).flatten(1, 2)


def test_correspondence_metric_is_perfect_for_position_features_and_chance_for_noise(tmp_path):
    folder = ImageFolder(str(write_coordinate_sizes(tmp_path / "ramps")))
    exact = correspondence_accuracy(CoordinateEncoder(8, 64), folder, 64, workers=0,
                                    indices=[0, 1, 2, 3] * 8)
    assert exact.grid == 8 and exact.cells > 100
    assert exact.hit1 > 0.97 and exact.hit_half > 0.6
    assert exact.hit1 > 3 * exact.chance_hit1
    assert exact.displaced_cells > 20 and exact.displaced_hit1 > 0.9

    class PositionOnly(nn.Module):
        """Each cell knows only its grid position (what zero padding gives border cells)."""

        def forward(self, images):
            return torch.eye(64).reshape(64, 8, 8).expand(images.shape[0], -1, -1, -1)

    shortcut = correspondence_accuracy(PositionOnly(), folder, 64, workers=0,
                                       indices=[0, 1, 2, 3] * 8, device="cpu")
    assert shortcut.hit1 == pytest.approx(shortcut.identity_hit1)
    assert shortcut.displaced_hit1 == 0.0      # the headline gives the shortcut nothing

    class Noise(nn.Module):
        def forward(self, images):
            return torch.randn(images.shape[0], 16, 8, 8, generator=torch.Generator()
                               .manual_seed(int(images.abs().sum() * 1000) % 2 ** 31))

    noise = correspondence_accuracy(Noise(), folder, 64, workers=0, indices=list(range(4)) * 30,
                                    device="cpu")
    sd = math.sqrt(noise.chance_hit1 * (1 - noise.chance_hit1) / noise.cells)
    assert abs(noise.hit1 - noise.chance_hit1) < 5 * sd + 0.02
    sd = math.sqrt(noise.displaced_chance * (1 - noise.displaced_chance)
                   / max(noise.displaced_cells, 1))
    assert abs(noise.displaced_hit1 - noise.displaced_chance) < 5 * sd + 0.03


def test_crop_pairs_are_a_function_of_the_image_index():
    folder = sample_photos()
    a, b = CropPairs(folder, 32), CropPairs(folder, 32)
    for index in (0, 5):
        for x, y in zip(a[index], b[index]):
            assert torch.equal(x, y)
    assert not torch.equal(a[0][1], a[1][1])


def test_correspondence_cli_on_a_checkpoint_and_random_init(tmp_path, capsys):
    run, _, _ = resnet_checkpoint(tmp_path, cifar_stem=True, method="densecl")
    photos = sample_photos().root
    code = eval_main(["correspondence", "--checkpoint", str(run), "--val-data", str(photos),
                      "--workers", "0", "--quiet", "--out", str(tmp_path / "c.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "c.json").read_text())
    results = report["results"]
    assert report["method"] == "densecl" and report["step"] == 7 and results["grid"] == 4
    assert 0 <= results["hit@0.5"] <= results["hit@1"] <= 1
    assert 0 < results["chance_hit@0.5"] < results["chance_hit@1"] < 1
    assert 0 < results["displaced_cells"] < results["overlap_cells"]
    assert 0 <= results["displaced_hit@1"] <= 1 and 0 < results["identity_hit@1"] < 1
    assert "hit@1" in capsys.readouterr().out
    code = eval_main(["correspondence", "--random-init", "--preset", "densecl-demo-cpu",
                      "--val-data", str(photos), "--workers", "0", "--quiet",
                      "--out", str(tmp_path / "r.json")])
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["random_init"]
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "missing")
