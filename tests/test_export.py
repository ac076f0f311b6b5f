"""engine.export: the online encoder as a timm-named ViT state dict, checked against a written list
of names and shapes, round-tripped into our own ViT, and (where timm is installed) into timm's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import save_checkpoint
from engine.eval import load_encoder
from engine.encoders import encoder_from_timm_state_dict, export_timm_state_dict
from engine.export import main
from engine.methods.sim import SIM
from engine.presets import PretrainConfig
from engine.trainer import seed_everything

# The timm ViT backbone of img 32, patch 8, width 32, depth 2, mlp ratio 4 (G = 4, 17 tokens),
# in timm's state-dict order — written out by hand, not generated.
EXPECTED = [
    ("cls_token", (1, 1, 32)),
    ("pos_embed", (1, 17, 32)),
    ("patch_embed.proj.weight", (32, 3, 8, 8)),
    ("patch_embed.proj.bias", (32,)),
    ("blocks.0.norm1.weight", (32,)),
    ("blocks.0.norm1.bias", (32,)),
    ("blocks.0.attn.qkv.weight", (96, 32)),
    ("blocks.0.attn.qkv.bias", (96,)),
    ("blocks.0.attn.proj.weight", (32, 32)),
    ("blocks.0.attn.proj.bias", (32,)),
    ("blocks.0.norm2.weight", (32,)),
    ("blocks.0.norm2.bias", (32,)),
    ("blocks.0.mlp.fc1.weight", (128, 32)),
    ("blocks.0.mlp.fc1.bias", (128,)),
    ("blocks.0.mlp.fc2.weight", (32, 128)),
    ("blocks.0.mlp.fc2.bias", (32,)),
    ("blocks.1.norm1.weight", (32,)),
    ("blocks.1.norm1.bias", (32,)),
    ("blocks.1.attn.qkv.weight", (96, 32)),
    ("blocks.1.attn.qkv.bias", (96,)),
    ("blocks.1.attn.proj.weight", (32, 32)),
    ("blocks.1.attn.proj.bias", (32,)),
    ("blocks.1.norm2.weight", (32,)),
    ("blocks.1.norm2.bias", (32,)),
    ("blocks.1.mlp.fc1.weight", (128, 32)),
    ("blocks.1.mlp.fc1.bias", (128,)),
    ("blocks.1.mlp.fc2.weight", (32, 128)),
    ("blocks.1.mlp.fc2.bias", (32,)),
]


def tiny_config() -> PretrainConfig:
    return PretrainConfig(img_size=32, patch_size=8, dim=32, depth=2, heads=2, decoder_dim=32,
                          decoder_heads=2, projector_depth=1, predictor_depth=1, batch_size=4,
                          preset="tiny-test").validate()


def trained_checkpoint(out: Path) -> tuple[Path, SIM]:
    """A checkpoint in the trainer's format whose online encoder differs from the EMA target."""
    cfg = tiny_config()
    seed_everything(0)
    model = SIM(cfg)
    with torch.no_grad():
        for param in model.encoder.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    out.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(out, {"model": model.state_dict(), "config": cfg.to_dict(), "step": 11,
                                 "optimizer": {}, "scaler": {}, "schedule": {},
                                 "data_position": {"epoch": 0, "batch": 0}, "rng": {}})
    return path, model


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_export_names_and_shapes_match_the_written_list(tmp_path):
    path, model = trained_checkpoint(tmp_path / "run")
    state = export_timm_state_dict(path)
    assert [(name, tuple(t.shape)) for name, t in state.items()] == EXPECTED
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for t in state.values())
    # the online encoder, not the EMA target; pos_embed with timm's zero cls row
    assert torch.equal(state["blocks.0.attn.qkv.weight"], model.encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(state["blocks.0.attn.qkv.weight"],
                           model.target_encoder.blocks[0].attn.qkv.weight)
    assert torch.all(state["pos_embed"][0, 0] == 0)
    target = export_timm_state_dict(path, branch="target")
    assert torch.equal(target["cls_token"], model.target_encoder.cls_token)


def test_round_trip_into_our_vit_gives_identical_outputs(tmp_path):
    path, model = trained_checkpoint(tmp_path / "run")
    state = export_timm_state_dict(path)
    encoder = encoder_from_timm_state_dict(state, img_size=32, patch_size=8, dim=32, depth=2,
                                           heads=2).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(images), model.encoder.eval()(images))
    with pytest.raises(ValueError, match="unexpected norm.weight"):
        encoder_from_timm_state_dict({**state, "norm.weight": torch.ones(32)}, 32, 8, 32, 2, 2)


def test_cli_writes_state_dict_and_metadata(tmp_path, capsys):
    _, model = trained_checkpoint(tmp_path / "run")
    out = tmp_path / "export" / "encoder.pth"
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "encoder.pth" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)  # plain tensors only
    assert [(name, tuple(t.shape)) for name, t in state.items()] == EXPECTED
    meta = json.loads(out.with_name("encoder.pth.json").read_text())
    assert meta["format"] == "timm-vit" and meta["architecture"]["final_norm"] is False
    assert meta["timm_kwargs"] == {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                   "num_heads": 2, "mlp_ratio": 4.0, "qkv_bias": True,
                                   "class_token": True, "no_embed_class": False,
                                   "global_pool": "avg", "final_norm": False, "num_classes": 0}
    assert meta["source"]["step"] == 11 and meta["source"]["branch"] == "online"
    # the exported file can be evaluated directly
    encoder, cfg = load_encoder(out, "cpu")
    assert (cfg.img_size, cfg.dim, cfg.depth) == (32, 32, 2)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(images), model.encoder.eval()(images))


def test_cli_bad_inputs(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "e.pth")]) == 2
    assert "nope.pt" in one_line_error(capsys.readouterr().err)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    assert main(["--checkpoint", str(tmp_path / "foreign.pt"), "--out",
                 str(tmp_path / "e.pth")]) == 2
    assert "not a densesim checkpoint" in one_line_error(capsys.readouterr().err)
    trained_checkpoint(tmp_path / "run")
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys.readouterr().err)


def test_loads_into_timm_with_identical_features(tmp_path):
    """Only where timm is installed (it is not a dependency): timm's VisionTransformer built from
    the metadata loads the file strictly and computes the same tokens and pooled features."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    path, model = trained_checkpoint(tmp_path / "run")
    out = tmp_path / "encoder.pth"
    assert main(["--checkpoint", str(path), "--out", str(out)]) == 0
    meta = json.loads(out.with_name("encoder.pth.json").read_text())
    timm_model = timm_vit.VisionTransformer(**meta["timm_kwargs"]).eval()
    timm_model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encoder.eval()(images)
        torch.testing.assert_close(timm_model.forward_features(images), ours)
        torch.testing.assert_close(timm_model(images), ours[:, 1:].mean(1))
