"""engine.export for detector methods: the whole pre-trained DETR / Deformable DETR in the official
repos' checkpoint layout ({"model": official names, "pretext_heads": ...}), the key sets checked
against lists written out here from the official module code (facebookresearch/detr @ 29901c5
models/detr.py, transformer.py, backbone.py; fundamentalvision/Deformable-DETR @ 11169a6
models/deformable_detr.py, deformable_transformer.py, ops/modules/ms_deform_attn.py), the tensors
against the model's, plus the backbone export beside it and the non-detector path unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from engine.checkpoint import save_checkpoint
from engine.encoders import export_detector, load_encoder
from engine.export import main
from engine.methods import METHODS, build_method
from engine.methods.base import Method
from engine.models.detr import DETR
from engine.presets import PretrainConfig, preset_config
from engine.trainer import seed_everything

# ------------------------------------------------------------------ the official key lists

# torchvision's resnet18 under DETR's IntermediateLayerGetter (conv1 .. layer4, no fc) with
# FrozenBatchNorm2d (four buffers, no num_batches_tracked): BasicBlock conv1, bn1, conv2, bn2 and,
# in the first block of layer2..4, downsample.0 (conv) and downsample.1 (norm).
FROZEN_BN = ("weight", "bias", "running_mean", "running_var")
R18_BODY = ["conv1.weight"] + [f"bn1.{t}" for t in FROZEN_BN]
for _layer in (1, 2, 3, 4):
    for _block in (0, 1):
        _p = f"layer{_layer}.{_block}."
        R18_BODY += [_p + "conv1.weight"] + [_p + f"bn1.{t}" for t in FROZEN_BN]
        R18_BODY += [_p + "conv2.weight"] + [_p + f"bn2.{t}" for t in FROZEN_BN]
        if _layer > 1 and _block == 0:
            R18_BODY += [_p + "downsample.0.weight"] + [_p + f"downsample.1.{t}" for t in FROZEN_BN]
BACKBONE = [f"backbone.0.body.{name}" for name in R18_BODY]
assert len(BACKBONE) == 1 + 4 + 16 * 5 + 3 * 5 == 100

# Deformable DETR, 1 encoder + 1 decoder layer, 1 feature level (C5: input_proj.0 = conv 1x1 +
# GroupNorm), no box refinement (class_embed.0 / bbox_embed.0: the one shared head per decoder
# layer), single stage (reference_points Linear).
DEFORMABLE_1x1 = [
    "transformer.level_embed",
    "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "transformer.encoder.layers.0.self_attn.sampling_offsets.bias",
    "transformer.encoder.layers.0.self_attn.attention_weights.weight",
    "transformer.encoder.layers.0.self_attn.attention_weights.bias",
    "transformer.encoder.layers.0.self_attn.value_proj.weight",
    "transformer.encoder.layers.0.self_attn.value_proj.bias",
    "transformer.encoder.layers.0.self_attn.output_proj.weight",
    "transformer.encoder.layers.0.self_attn.output_proj.bias",
    "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.norm1.bias",
    "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.0.linear1.bias",
    "transformer.encoder.layers.0.linear2.weight", "transformer.encoder.layers.0.linear2.bias",
    "transformer.encoder.layers.0.norm2.weight", "transformer.encoder.layers.0.norm2.bias",
    "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight",
    "transformer.decoder.layers.0.cross_attn.sampling_offsets.bias",
    "transformer.decoder.layers.0.cross_attn.attention_weights.weight",
    "transformer.decoder.layers.0.cross_attn.attention_weights.bias",
    "transformer.decoder.layers.0.cross_attn.value_proj.weight",
    "transformer.decoder.layers.0.cross_attn.value_proj.bias",
    "transformer.decoder.layers.0.cross_attn.output_proj.weight",
    "transformer.decoder.layers.0.cross_attn.output_proj.bias",
    "transformer.decoder.layers.0.norm1.weight", "transformer.decoder.layers.0.norm1.bias",
    "transformer.decoder.layers.0.self_attn.in_proj_weight",
    "transformer.decoder.layers.0.self_attn.in_proj_bias",
    "transformer.decoder.layers.0.self_attn.out_proj.weight",
    "transformer.decoder.layers.0.self_attn.out_proj.bias",
    "transformer.decoder.layers.0.norm2.weight", "transformer.decoder.layers.0.norm2.bias",
    "transformer.decoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.bias",
    "transformer.decoder.layers.0.linear2.weight", "transformer.decoder.layers.0.linear2.bias",
    "transformer.decoder.layers.0.norm3.weight", "transformer.decoder.layers.0.norm3.bias",
    "transformer.reference_points.weight", "transformer.reference_points.bias",
    "class_embed.0.weight", "class_embed.0.bias",
    "bbox_embed.0.layers.0.weight", "bbox_embed.0.layers.0.bias",
    "bbox_embed.0.layers.1.weight", "bbox_embed.0.layers.1.bias",
    "bbox_embed.0.layers.2.weight", "bbox_embed.0.layers.2.bias",
    "query_embed.weight",
    "input_proj.0.0.weight", "input_proj.0.0.bias", "input_proj.0.1.weight",
    "input_proj.0.1.bias",
] + BACKBONE

# The same with 2 decoder layers, 4 feature levels (C3, C4, C5 1x1 convs + one 3x3 stride-2 conv,
# each + GroupNorm) and --with_box_refine: a class / box head per decoder layer, the box heads also
# registered in the decoder (transformer.decoder.bbox_embed.N, after its layers).
_DEC1 = [k.replace("decoder.layers.0.", "decoder.layers.1.") for k in DEFORMABLE_1x1
         if k.startswith("transformer.decoder.layers.0.")]
_BOX = [f"layers.{i}.{t}" for i in range(3) for t in ("weight", "bias")]
DEFORMABLE_REFINE = (
    [k for k in DEFORMABLE_1x1 if k.startswith(("transformer.level_embed",
                                                "transformer.encoder.", "transformer.decoder."))]
    + _DEC1
    + [f"transformer.decoder.bbox_embed.{n}.{b}" for n in (0, 1) for b in _BOX]
    + ["transformer.reference_points.weight", "transformer.reference_points.bias",
       "class_embed.0.weight", "class_embed.0.bias", "class_embed.1.weight", "class_embed.1.bias"]
    + [f"bbox_embed.{n}.{b}" for n in (0, 1) for b in _BOX]
    + ["query_embed.weight"]
    + [f"input_proj.{n}.{m}.{t}" for n in range(4) for m in (0, 1) for t in ("weight", "bias")]
    + BACKBONE)

# DETR (UP-DETR's --pre_norm: the encoder has its final LayerNorm), 1 + 1 layers.
DETR_PRE_NORM_1x1 = [
    "transformer.encoder.layers.0.self_attn.in_proj_weight",
    "transformer.encoder.layers.0.self_attn.in_proj_bias",
    "transformer.encoder.layers.0.self_attn.out_proj.weight",
    "transformer.encoder.layers.0.self_attn.out_proj.bias",
    "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.0.linear1.bias",
    "transformer.encoder.layers.0.linear2.weight", "transformer.encoder.layers.0.linear2.bias",
    "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.norm1.bias",
    "transformer.encoder.layers.0.norm2.weight", "transformer.encoder.layers.0.norm2.bias",
    "transformer.encoder.norm.weight", "transformer.encoder.norm.bias",
    "transformer.decoder.layers.0.self_attn.in_proj_weight",
    "transformer.decoder.layers.0.self_attn.in_proj_bias",
    "transformer.decoder.layers.0.self_attn.out_proj.weight",
    "transformer.decoder.layers.0.self_attn.out_proj.bias",
    "transformer.decoder.layers.0.multihead_attn.in_proj_weight",
    "transformer.decoder.layers.0.multihead_attn.in_proj_bias",
    "transformer.decoder.layers.0.multihead_attn.out_proj.weight",
    "transformer.decoder.layers.0.multihead_attn.out_proj.bias",
    "transformer.decoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.bias",
    "transformer.decoder.layers.0.linear2.weight", "transformer.decoder.layers.0.linear2.bias",
    "transformer.decoder.layers.0.norm1.weight", "transformer.decoder.layers.0.norm1.bias",
    "transformer.decoder.layers.0.norm2.weight", "transformer.decoder.layers.0.norm2.bias",
    "transformer.decoder.layers.0.norm3.weight", "transformer.decoder.layers.0.norm3.bias",
    "transformer.decoder.norm.weight", "transformer.decoder.norm.bias",
    "class_embed.weight", "class_embed.bias",
    "bbox_embed.layers.0.weight", "bbox_embed.layers.0.bias",
    "bbox_embed.layers.1.weight", "bbox_embed.layers.1.bias",
    "bbox_embed.layers.2.weight", "bbox_embed.layers.2.bias",
    "query_embed.weight", "input_proj.weight", "input_proj.bias",
] + BACKBONE

TINY_DETREG = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                   num_queries=12, num_feature_levels=1, crop_size=8, max_boxes=6)


# ------------------------------------------------------------------ checkpoints

def detreg_config(**args) -> PretrainConfig:
    values = preset_config("detreg-demo-cpu").to_dict()
    values.update(img_size=32, batch_size=4, preset="test-export",
                  method_args={**TINY_DETREG, **args})
    return PretrainConfig.from_dict(values).validate()


def saved_run(out: Path, cfg: PretrainConfig, seed: int = 0):
    """A checkpoint in the trainer's format of `cfg`'s method, every float tensor moved off its
    initial value (so an export of the initialisation could not pass)."""
    seed_everything(seed)
    model = build_method(cfg)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.rand_like(tensor))
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"model": model.state_dict(), "config": cfg.to_dict(), "step": 7,
                          "optimizer": {}, "scaler": {}, "schedule": {},
                          "data_position": {"epoch": 0, "batch": 0}, "rng": {}})
    return model


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


class TinyDETRMethod(Method):
    """A stand-in detector method holding a DETR (UP-DETR's layout: pre-norm, 2 classes + no
    object) under a name of its own choosing, and a pretext head beside it."""
    name = "tinydetr"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.net = DETR("resnet18", num_classes=2, num_queries=6, hidden_dim=16, nheads=2,
                        enc_layers=1, dec_layers=1, dim_feedforward=32, pre_norm=True,
                        train_backbone=False, cifar_stem=True)
        self.encoder = self.net.backbone[0].body
        self.patch2query = nn.Linear(512, 16)


# ------------------------------------------------------------------ tests

def test_detreg_export_has_the_official_deformable_detr_keys_and_the_models_tensors(tmp_path):
    model = saved_run(tmp_path / "run", detreg_config())
    out = tmp_path / "export" / "encoder.pth"
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    file = tmp_path / "export" / "encoder-detector.pth"
    payload = torch.load(file, weights_only=True)               # tensors and dicts only
    assert set(payload) == {"model", "pretext_heads"}
    assert sorted(payload["model"]) == sorted(DEFORMABLE_1x1)
    state = model.state_dict()
    for key, tensor in payload["model"].items():
        assert torch.equal(tensor, state["detector." + key]), key
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    # DETReg's own name for its pretext head; the frozen embedding encoder is not exported
    assert sorted(payload["pretext_heads"]) == [f"feature_embed.layers.{i}.{t}" for i in (0, 1)
                                                for t in ("bias", "weight")]
    for key, tensor in payload["pretext_heads"].items():
        assert torch.equal(tensor, state[key])
    meta = json.loads(file.with_name(file.name + ".json").read_text())
    assert meta["format"] == "deformable-detr" and meta["missing_official_keys"] == []
    assert meta["architecture"]["num_classes"] == 91 and not meta["architecture"]["with_box_refine"]
    assert "--num_queries 12" in meta["official_args"] and "--with_box_refine" not in \
        meta["official_args"]
    detreg_loader = meta["loading"]["amirbar/DETReg (fine-tune)"]
    assert "--pretrain FILE" in detreg_loader and "class_embed" in detreg_loader
    assert "strict=False" in meta["loading"]["fundamentalvision/Deformable-DETR"]
    assert meta["source"]["method"] == "detreg" and meta["source"]["step"] == 7

    # the backbone beside it, in torchvision's names (frozen BN: batch counters filled with 0),
    # loads back into our ResNet with the same outputs, and a run of detreg evaluates
    backbone = torch.load(out, weights_only=True)
    assert "layer1.0.bn1.num_batches_tracked" in backbone and "fc.weight" not in backbone
    for name, tensor in backbone.items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, state["encoder." + name]), name
    images = torch.randn(2, 3, 32, 32)
    for source in (out, tmp_path / "run"):
        encoder, _ = load_encoder(source)      # BatchNorm2d in eval mode = FrozenBatchNorm2d
        with torch.no_grad():
            torch.testing.assert_close(encoder(images), model.encoder.eval()(images),
                                       rtol=1e-5, atol=0)


def test_box_refinement_and_four_levels_follow_the_official_layout(tmp_path):
    cfg = detreg_config(dec_layers=2, num_feature_levels=4, with_box_refine=True)
    model = saved_run(tmp_path / "run", cfg)
    payload, meta = export_detector(tmp_path / "run")
    assert sorted(payload["model"]) == sorted(DEFORMABLE_REFINE)
    assert meta["architecture"]["with_box_refine"] and "--with_box_refine" in meta["official_args"]
    assert "--num_feature_levels 4" in meta["official_args"]
    state = model.state_dict()
    for key, tensor in payload["model"].items():
        assert torch.equal(tensor, state["detector." + key]), key
    # the per-layer heads are distinct tensors, and the decoder's copies are the same heads
    assert not torch.equal(payload["model"]["bbox_embed.0.layers.0.weight"],
                           payload["model"]["bbox_embed.1.layers.0.weight"])
    assert torch.equal(payload["model"]["transformer.decoder.bbox_embed.1.layers.2.bias"],
                       payload["model"]["bbox_embed.1.layers.2.bias"])


def test_a_detr_found_by_type_exports_with_detr_names(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "tinydetr", ("tests.test_export_detr", "TinyDETRMethod"))
    cfg = PretrainConfig(method="tinydetr", backbone="resnet18", cifar_stem=True, img_size=32,
                         batch_size=4, preset="test-export").validate()
    model = saved_run(tmp_path / "run", cfg)
    out = tmp_path / "e.pth"
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--detector",
                 str(tmp_path / "updetr.pth")]) == 0
    printed = capsys.readouterr().out
    assert "updetr.pth (the whole DETR" in printed and "--pre_norm" in printed
    payload = torch.load(tmp_path / "updetr.pth", weights_only=True)
    assert sorted(payload["model"]) == sorted(DETR_PRE_NORM_1x1)
    state = model.state_dict()
    for key, tensor in payload["model"].items():
        assert torch.equal(tensor, state["net." + key]), key
    assert sorted(payload["pretext_heads"]) == ["patch2query.bias", "patch2query.weight"]
    meta = json.loads((tmp_path / "updetr.pth.json").read_text())
    assert meta["format"] == "detr" and meta["architecture"]["num_classes"] == 2
    assert meta["architecture"]["pre_norm"] and meta["source"]["detector_module"] == "net"
    assert "--pretrain FILE" in meta["loading"]["dddzg/up-detr (fine-tune)"]
    assert "3 logits" in meta["loading"]["dddzg/up-detr (fine-tune)"]


@pytest.mark.parametrize("method", ["updetr", "pairdetr", "detreg"])
def test_every_registered_detector_method_exports(method, tmp_path):
    """Whatever the detector methods name their detector: the export finds it, writes only
    official names under "model" and keeps every trained tensor (official or pretext)."""
    if method not in METHODS:
        pytest.skip(f"{method} is not registered")
    values = preset_config(f"{method}-demo-cpu").to_dict()
    values.update(img_size=32, batch_size=4, preset="test-export")
    small = {"updetr": dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                            dim_feedforward=32, num_queries=20, num_patches=4, patch_size=16),
             "pairdetr": dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                              dim_feedforward=32, num_queries=30, pair_dim=16),
             "detreg": TINY_DETREG}[method]
    values["method_args"] = dict(values.get("method_args", {}), **small)
    cfg = PretrainConfig.from_dict(values).validate()
    model = saved_run(tmp_path / "run", cfg)
    payload, meta = export_detector(tmp_path / "run")
    if meta["format"] == "deformable-detr":
        official = set(DEFORMABLE_1x1)
    else:      # the encoder's final norm exists only with pre_norm
        official = {k for k in DETR_PRE_NORM_1x1 if meta["architecture"]["pre_norm"]
                    or not k.startswith("transformer.encoder.norm.")}
    assert set(payload["model"]) | set(meta["missing_official_keys"]) == official
    assert set(payload["model"]).isdisjoint(meta["missing_official_keys"])
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    prefix = meta["source"]["detector_module"] + "."
    exported = {prefix + k for k in payload["model"]} | set(payload["pretext_heads"])
    assert trained <= exported


def test_non_detector_checkpoints_export_as_before_and_bad_inputs(tmp_path, capsys):
    values = preset_config("mocov2-demo-cpu").to_dict()
    values.update(method_args=dict(queue_length=64, hidden=32, dim=8), preset="test-export")
    saved_run(tmp_path / "moco", PretrainConfig.from_dict(values).validate())
    out = tmp_path / "e" / "encoder.pth"
    assert main(["--checkpoint", str(tmp_path / "moco"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("wrote") == 1 and "torchvision resnet18" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["encoder.pth", "encoder.pth.json"]

    assert main(["--checkpoint", str(tmp_path / "moco"), "--out", str(out), "--detector",
                 str(tmp_path / "d.pth")]) == 2
    assert "holds no DETR or Deformable DETR" in one_line_error(capsys.readouterr().err)
    saved_run(tmp_path / "detreg", detreg_config())
    assert main(["--checkpoint", str(tmp_path / "detreg"), "--out", str(out), "--detector",
                 str(out)]) == 2
    assert "same file" in one_line_error(capsys.readouterr().err)
    assert main(["--checkpoint", str(tmp_path / "detreg"), "--out", str(tmp_path / "x.pth"),
                 "--detector", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "x.pth").exists()              # nothing written when one part fails
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in one_line_error(capsys.readouterr().err)
    # --no-detector: only the backbone
    out2 = tmp_path / "only" / "encoder.pth"
    assert main(["--checkpoint", str(tmp_path / "detreg"), "--out", str(out2),
                 "--no-detector"]) == 0
    assert sorted(p.name for p in out2.parent.iterdir()) == ["encoder.pth", "encoder.pth.json"]
