"""DETReg (engine/methods/detreg.py) against spec/OFFICIAL.md §7, read line by line: the set losses
and the object-embedding loss recomputed in float64 the way DETReg's SetCriterion computes them
(per-image target lists, scipy's Hungarian matching on DETReg's focal cost, its focal / L1 / GIoU
/ F.l1_loss formulas, aux layers without the embedding term), the embedding target against a
plain-torch bilinear crop through the frozen encoder, the proposal filter (nothing kept, degenerate
and out-of-view boxes), the initial weights from a densesim run or a SwAV-style state dict, the
step without host syncs, the CLI and a bit-exact resume. Tiny shapes: ResNet-18 with the CIFAR
stem at 32 px, hidden 32, reference kernels."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from engine.checkpoint import save_checkpoint
from engine.methods import StepContext, build_method
from engine.methods.base import skip_initial_weights
from engine.presets import ConfigError, PretrainConfig, preset_config
from engine.trainer import (RunOptions, StepSession, make_optimizer, optimisation_step, pretrain,
                            seed_everything)

from host_sync import count_host_syncs

REFERENCE = {"roi_align": "reference", "ms_deform_attn": "reference",
             "linear_sum_assignment": "reference"}
SMALL = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3, dim_feedforward=64,
             num_queries=12, num_feature_levels=1, crop_size=8, max_boxes=6)


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(img_size: int = 32, batch_size: int = 4, **args) -> PretrainConfig:
    values = preset_config("detreg-demo-cpu").to_dict()
    values.update(img_size=img_size, batch_size=batch_size, precision="fp32", preset="test-detreg",
                  method_args={**SMALL, **args})
    return PretrainConfig.from_dict(values).validate()


def model_for(cfg: PretrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(cfg).train()


def ctx(step: int = 0, micro: int = 0) -> StepContext:
    return StepContext(step=step, micro=micro, backends=REFERENCE, seed=3)


def make_batch(batch_size: int = 4, size: int = 32, slots: int = 8, seed: int = 0) -> dict:
    """Random views and view-1 proposals as the loaders give them (clipped x1 y1 x2 y2 in view
    pixels, visible fraction, zeros for padding); image 3 has nothing worth keeping."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch_size, 2, slots, 2, generator=g) * size * 0.7
    extent = 2 + torch.rand(batch_size, 2, slots, 2, generator=g) * size * 0.5
    boxes = torch.cat([corner, corner + extent], -1).clamp(0, size)
    visible = 0.3 + 0.7 * torch.rand(batch_size, 2, slots, generator=g)
    boxes[:, :, -1], visible[:, :, -1] = 0, 0                       # a padding slot
    boxes[0, 0, 1] = torch.tensor([5.0, 5.0, 5.4, 20.0])            # 0.4 px wide: degenerate
    visible[0, 0, 1] = 1.0
    boxes[1, 0, 2] = torch.tensor([size, 3.0, size, 9.0])           # clipped away: out of view
    visible[1, 0, 2] = 0.0
    visible[2, 0, 0] = 0.49                                         # just under the threshold
    if batch_size > 3:
        visible[3, 0] = 0.2                                         # image 3: nothing kept
    return dict(view1=torch.randn(batch_size, 3, size, size, generator=g),
                view2=torch.randn(batch_size, 3, size, size, generator=g),
                proposals=boxes, proposal_visible=visible)


# ------------------------------------------------------------------ float64 references

def kept_proposals(batch: dict, max_boxes: int, size: int) -> list[torch.Tensor]:
    """Per image, the view-1 proposals DETReg's targets are made of (in their order): clipped to
    the view, at least half visible and at least one pixel wide and high."""
    kept = []
    for boxes, visible in zip(batch["proposals"][:, 0, :max_boxes].double(),
                              batch["proposal_visible"][:, 0, :max_boxes].double()):
        rows = []
        for (x1, y1, x2, y2), v in zip(boxes.tolist(), visible.tolist()):
            x1, x2 = min(max(x1, 0), size), min(max(x2, 0), size)
            y1, y2 = min(max(y1, 0), size), min(max(y2, 0), size)
            if v > 0 and v >= 0.5 and x2 - x1 >= 1 and y2 - y1 >= 1:
                rows.append([x1, y1, x2, y2])
        kept.append(torch.tensor(rows, dtype=torch.float64).reshape(-1, 4))
    return kept


def bilinear_crop(image: torch.Tensor, box, crop: int) -> torch.Tensor:
    """image (3, H, W), box x1 y1 x2 y2 (pixel edges) -> (3, crop, crop): output pixel (i, j) is
    the mean of n x n bilinear samples (n = ceil(box side / crop): one sample, a plain bilinear
    resize, for boxes up to `crop`) at x = x1 + (j + (k + ½)/n)·w/crop − ½ (pixel centres at
    integers), borders replicated: torchvision's Resize on the crop without antialias."""
    _, height, width = image.shape
    x1, y1, x2, y2 = [float(v) for v in box]
    bw, bh = (x2 - x1) / crop, (y2 - y1) / crop
    ny, nx = max(1, -(-(y2 - y1) // crop)), max(1, -(-(x2 - x1) // crop))
    ny, nx = int(ny), int(nx)
    ys = y1 - 0.5 + (torch.arange(crop, dtype=torch.float64)[:, None]
                     + (torch.arange(ny, dtype=torch.float64)[None] + 0.5) / ny) * bh
    xs = x1 - 0.5 + (torch.arange(crop, dtype=torch.float64)[:, None]
                     + (torch.arange(nx, dtype=torch.float64)[None] + 0.5) / nx) * bw
    gy = (ys.reshape(-1) + 0.5) / height * 2 - 1                   # align_corners=False
    gx = (xs.reshape(-1) + 0.5) / width * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    samples = F.grid_sample(image[None].double(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)[0]                 # (3, crop·ny, crop·nx)
    return samples.reshape(3, crop, ny, crop, nx).mean(dim=(2, 4))


def c3_embedding(encoder, crops: torch.Tensor) -> torch.Tensor:
    """Global average of layer2 (C3) of a float64 copy of the embedding encoder."""
    net = copy.deepcopy(encoder).double()
    x = net.maxpool(net.relu(net.bn1(net.conv1(crops))))
    return net.layer2(net.layer1(x)).mean(dim=(2, 3))


def giou64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """util/box_ops.generalized_box_iou of xyxy boxes (pairwise), no clamps."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    area = (rb - lt).clamp(min=0).prod(-1)
    return iou - (area - union) / area


def xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def official_layer(logits, boxes, targets, num_boxes, alpha=0.25):
    """One decoder layer of DETReg's criterion: (loss_ce, loss_bbox, loss_giou, indices)."""
    q, c = logits.shape[1:]
    indices = []
    for b, tgt in enumerate(targets):                  # def_matcher.HungarianMatcher, per image
        prob = logits[b].sigmoid()[:, [1] * len(tgt)]
        neg = (1 - alpha) * prob ** 2 * (-(1 - prob + 1e-8).log())
        pos = alpha * (1 - prob) ** 2 * (-(prob + 1e-8).log())
        cost = (5 * torch.cdist(boxes[b], tgt, p=1) + 2 * (pos - neg)
                - 2 * giou64(xyxy(boxes[b]), xyxy(tgt)))
        rows, cols = linear_sum_assignment(cost.detach().numpy()) if len(tgt) else ([], [])
        indices.append((torch.as_tensor(rows, dtype=torch.long),
                        torch.as_tensor(cols, dtype=torch.long)))
    classes = torch.full((logits.shape[0], q), c, dtype=torch.long)
    for b, (rows, _) in enumerate(indices):
        classes[b, rows] = 1
    onehot = F.one_hot(classes, c + 1)[..., :c].double()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    focal = (alpha * onehot + (1 - alpha) * (1 - onehot)) * ce * (1 - p_t) ** 2
    loss_ce = focal.mean(1).sum() / num_boxes * q
    src = torch.cat([boxes[b, rows] for b, (rows, _) in enumerate(indices)])
    tgt = torch.cat([targets[b][cols] for b, (_, cols) in enumerate(indices)])
    loss_bbox = (src - tgt).abs().sum() / num_boxes
    loss_giou = (1 - torch.diag(giou64(xyxy(src), xyxy(tgt)))).sum() / num_boxes
    return loss_ce, loss_bbox, loss_giou, indices


def official_losses(model, out: dict, batch: dict, size: int) -> dict:
    h = model.hyper
    kept = kept_proposals(batch, h.max_boxes, size)
    targets = []
    for boxes in kept:
        b = boxes / size
        targets.append(torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], -1))
    num_boxes = max(sum(len(t) for t in targets), 1)
    outputs = out["outputs"]
    losses = {}
    ce, bbox, giou, indices = official_layer(outputs["pred_logits"].double(),
                                             outputs["pred_boxes"].double(), targets, num_boxes)
    losses.update(loss_ce=ce, loss_bbox=bbox, loss_giou=giou)
    # the object embedding: final layer's matching, F.l1_loss(mean) over the matched pairs
    layers = model.feature_embed.layers
    hs = outputs["hs"][-1].double()
    features = F.linear(F.relu(F.linear(hs, layers[0].weight.double(), layers[0].bias.double())),
                        layers[1].weight.double(), layers[1].bias.double())
    src, tgt = [], []
    for b, (rows, cols) in enumerate(indices):
        if len(rows):
            crops = torch.stack([bilinear_crop(batch["view1"][b], box, h.crop_size)
                                 for box in kept[b]])
            src.append(features[b, rows])
            tgt.append(c3_embedding(model.embedding_encoder, crops)[cols])
    losses["loss_object_embedding"] = F.l1_loss(torch.cat(src), torch.cat(tgt))
    total = 2 * ce + 5 * bbox + 2 * giou + losses["loss_object_embedding"]
    for i, aux in enumerate(outputs["aux_outputs"]):
        ce, bbox, giou, _ = official_layer(aux["pred_logits"].double(),
                                           aux["pred_boxes"].double(), targets, num_boxes)
        losses.update({f"loss_ce_{i}": ce, f"loss_bbox_{i}": bbox, f"loss_giou_{i}": giou})
        total = total + 2 * ce + 5 * bbox + 2 * giou
    losses["total"] = total
    return losses


def perturbed(model):
    """Break the zero / shared initialisation of the heads so queries predict distinct boxes."""
    with torch.no_grad():
        for head in {id(m): m for m in model.detector.bbox_embed}.values():
            head.layers[-1].weight.normal_(0, 0.2)
        for head in {id(m): m for m in model.detector.class_embed}.values():
            head.weight.normal_(0, 0.3)
    return model


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("levels", [1, 3])
def test_losses_match_the_official_formulas_in_float64(levels):
    cfg = config(num_feature_levels=levels)
    model = perturbed(model_for(cfg)).eval()        # eval: no dropout, the same outputs twice
    batch = make_batch()
    out = model.compute(batch, ctx())
    assert out["num_targets"].tolist() == [len(k) for k in kept_proposals(batch, 6, 32)]
    assert out["num_targets"][3] == 0 and out["num_targets"][:3].min() > 0
    losses = model.losses(out)
    reference = official_losses(model, out, batch, 32)
    for name, value in reference.items():
        if name != "total":
            torch.testing.assert_close(losses[name].double(), value, rtol=2e-5, atol=1e-6,
                                       msg=name)
    assert set(losses) == set(reference) - {"total"}          # no embedding term on aux layers
    loss, figures = model(batch, ctx())
    torch.testing.assert_close(loss.double(), reference["total"], rtol=2e-5, atol=1e-6)
    assert figures["boxes_per_image"] == out["num_targets"].float().mean()
    assert reference["loss_object_embedding"] > 0


def test_embedding_target_is_c3_average_of_a_bilinear_crop():
    model = model_for(config(crop_size=8))
    view = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [3.5, 2.0, 9.0, 13.25], [20.0, 1.0, 32.0, 7.0]],
                          [[0.0, 0.0, 32.0, 32.0], [10.0, 12.0, 30.0, 15.0],   # larger: 4x4, 3x1
                           [1.0, 1.0, 2.0, 2.0]]])                            # upsampled
    ours = model.embed_boxes(view, boxes, "reference")
    assert ours.shape == (2, 3, 128) and not ours.requires_grad
    for b in range(2):
        crops = torch.stack([bilinear_crop(view[b], box, 8) for box in boxes[b]])
        torch.testing.assert_close(ours[b].double(), c3_embedding(model.embedding_encoder, crops),
                                   rtol=1e-4, atol=1e-5)
    # frozen, C3 only, not normalised
    assert not any(p.requires_grad for p in model.embedding_encoder.parameters())
    assert isinstance(model.embedding_encoder.layer3, torch.nn.Identity)
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(2, 3))


def test_proposal_filter_and_an_image_without_targets():
    model = model_for(config())
    batch = make_batch()
    boxes, valid, count = model.select_targets(batch, 32, 32, torch.device("cpu"))
    kept = kept_proposals(batch, 6, 32)
    for b in range(4):
        assert valid[b].tolist() == [i < len(kept[b]) for i in range(6)]
        torch.testing.assert_close(boxes[b, :len(kept[b])].double(), kept[b])
        assert (boxes[b, len(kept[b]):] == 0).all()
    assert count.tolist() == [len(k) for k in kept] and count[3] == 0
    # NaN and out-of-view garbage in the batch are dropped, not propagated
    batch["proposals"][0, 0, 0] = torch.tensor([2.0, 2.0, 12.0, 12.0])
    batch["proposal_visible"][0, 0, 0] = 1.0
    before = len(kept_proposals(batch, 6, 32)[0])
    batch["proposals"][0, 0, 0, 1] = float("nan")
    batch["proposals"][1, 0, 0] = torch.tensor([40.0, 40.0, 60.0, 60.0])
    batch["proposal_visible"][1, 0, 0] = 1.0
    boxes, valid, count = model.select_targets(batch, 32, 32, torch.device("cpu"))
    kept = kept_proposals(batch, 6, 32)
    assert torch.isfinite(boxes).all() and count[0] == before - 1
    assert count.tolist() == [len(k) for k in kept]
    # a micro-batch in which no image has a kept proposal: finite loss and gradients
    batch["proposal_visible"].zero_()
    loss, figures = model(batch, ctx())
    assert torch.isfinite(loss) and figures["loss_object_embedding"] == 0
    assert figures["loss_bbox"] == 0 and figures["boxes_per_image"] == 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.encoder.parameters())       # frozen backbone


def test_detections_are_the_detector_on_view_one_and_the_kept_proposals():
    model = perturbed(model_for(config())).eval()
    batch = make_batch()
    out = model.detections(batch, ctx())
    assert out["pred_boxes"].shape == (4, 12, 4) and out["scores"].shape == (4, 12)
    assert out["target_boxes"].shape == (4, 6, 4)
    raw = model.detector(batch["view1"])
    centre, size = raw["pred_boxes"][..., :2], raw["pred_boxes"][..., 2:]
    torch.testing.assert_close(out["pred_boxes"], torch.cat([centre - size / 2,
                                                             centre + size / 2], -1))
    torch.testing.assert_close(out["scores"], raw["pred_logits"][..., 1].sigmoid())
    kept = kept_proposals(batch, 6, 32)
    assert out["num_targets"].tolist() == [len(k) for k in kept]
    for b in range(4):
        torch.testing.assert_close(out["target_boxes"][b, :len(kept[b])].double(), kept[b] / 32)


def test_optimisation_step_reads_no_device_value():
    values = config().to_dict()
    values.update(accum=2)
    cfg = PretrainConfig.from_dict(values).validate()
    torch.manual_seed(0)
    model = build_method(cfg).train()
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    session = StepSession(cfg, model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          torch.device("cpu"), None, REFERENCE)
    batches = [make_batch(seed=k) for k in range(4)]
    optimisation_step(session, batches[:2], 0, 0.99)
    with count_host_syncs() as syncs:
        loss, grad_norm, _ = optimisation_step(session, batches[2:], 1, 0.99)
    assert not syncs, syncs.report()
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
    # only the transformer, heads and input projections train: the optimiser holds nothing else
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in model.encoder.parameters())
    assert not any(id(p) in trained for p in model.embedding_encoder.parameters())
    assert all(id(p) in trained for p in model.feature_embed.parameters())


def swav_run(out, seed: int = 1):
    """A densesim SwAV checkpoint (ResNet-18, CIFAR stem) whose encoder is not the default init."""
    from engine.methods.swav import SwAV

    values = preset_config("swav-demo-cpu").to_dict()
    values.update(method_args=dict(prototypes=16, hidden=32, dim=8))
    cfg = PretrainConfig.from_dict(values).validate()
    seed_everything(seed)
    model = SwAV(cfg)
    with torch.no_grad():
        for name, tensor in model.encoder.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.rand_like(tensor))     # statistics stay valid (var > 0)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"model": model.state_dict(), "config": cfg.to_dict(), "step": 5,
                          "optimizer": {}, "scaler": {}, "schedule": {},
                          "data_position": {"epoch": 0, "batch": 0}, "rng": {}})
    return model.encoder


def assert_holds(resnet, reference, prefixes=("conv1", "bn1", "layer1", "layer2")):
    ours = resnet.state_dict()
    for name, tensor in reference.state_dict().items():
        if name.startswith(prefixes) and not name.endswith("num_batches_tracked"):
            assert torch.equal(ours[name], tensor), name


def test_initial_weights_from_a_densesim_run_and_a_swav_state_dict(tmp_path):
    from engine.export import main as export

    swav = swav_run(tmp_path / "swav")
    model = model_for(config(backbone_checkpoint=str(tmp_path / "swav"),
                             embedding_checkpoint=str(tmp_path / "swav" / "checkpoint.pt")))
    assert_holds(model.encoder, swav, ("conv1", "bn1", "layer"))      # FrozenBN = BN's values
    assert_holds(model.embedding_encoder, swav)
    assert model.embedding_encoder.layer2[0].conv1.weight is not model.encoder.layer2[0].conv1.weight
    assert model.data_warnings(47, 4, 10) == []
    # an exported encoder (python -m engine.export) as the embedding encoder
    assert export(["--checkpoint", str(tmp_path / "swav"), "--out", str(tmp_path / "e.pth")]) == 0
    model = model_for(config(embedding_checkpoint=str(tmp_path / "e.pth")))
    assert_holds(model.embedding_encoder, swav)
    [warning] = model.data_warnings(47, 4, 10)
    assert "no backbone_checkpoint" in warning

    # SwAV's released layout: "module." names, projection head and prototypes beside the ResNet;
    # a plain ResNet-18 (7x7 stem): the embedding encoder takes the file's architecture
    from engine.models.resnet import build_resnet
    torch.manual_seed(4)
    plain = build_resnet("resnet18")
    raw = {f"module.{k}": v for k, v in plain.state_dict().items()}
    raw.update({"module.projection_head.0.weight": torch.ones(8, 512),
                "module.prototypes.weight": torch.ones(16, 8)})
    torch.save(raw, tmp_path / "swav_800ep_pretrain.pth.tar")
    model = model_for(config(embedding_checkpoint=str(tmp_path / "swav_800ep_pretrain.pth.tar")))
    assert not model.embedding_encoder.cifar_stem and model.encoder.cifar_stem
    assert_holds(model.embedding_encoder, plain)
    assert "7x7" not in model.describe() and "frozen resnet18" in model.describe()
    loss, _ = model(make_batch(), ctx())
    assert torch.isfinite(loss)

    # one-line errors: the wrong architecture for the backbone, a missing file, a foreign file
    with pytest.raises(ConfigError, match="backbone_checkpoint holds a resnet18, the run's"):
        model_for(config(backbone_checkpoint=str(tmp_path / "swav_800ep_pretrain.pth.tar")))
    with pytest.raises(ConfigError, match="embedding_checkpoint.*do not exist"):
        model_for(config(embedding_checkpoint=str(tmp_path / "nope.pth")))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="not a ResNet state dict"):
        model_for(config(backbone_checkpoint=str(tmp_path / "foreign.pth")))
    # the structure-only build reads nothing
    with skip_initial_weights():
        model_for(config(embedding_checkpoint=str(tmp_path / "nope.pth"),
                         backbone_checkpoint=str(tmp_path / "nope.pth")))
    # without either file: one warning line, and the embedding encoder is the backbone's init
    model = model_for(config())
    [warning] = model.data_warnings(47, 4, 10)
    assert "backbone_checkpoint" in warning and "embedding_checkpoint" in warning
    assert_holds(model.embedding_encoder, model.encoder)


def test_config_errors_and_bookkeeping():
    values = config().to_dict()
    values.update(backbone="vit", patch_size=8, dim=32, depth=1, heads=2)
    with pytest.raises(ConfigError, match="detreg trains a Deformable DETR on a ResNet"):
        build_method(PretrainConfig.from_dict(values))
    for args, needle in [(dict(num_feature_levels=2), "num_feature_levels"),
                         (dict(max_boxes=20), "max_boxes"), (dict(hidden_dim=48), "hidden_dim"),
                         (dict(num_classes=1), "num_classes"), (dict(min_visible=2.0),
                                                                "min_visible")]:
        with pytest.raises(ConfigError, match=needle):
            config(**args) and build_method(config(**args))
    model = model_for(config())
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert {"encoder", "detector", "embedding_encoder", "feature_embed"} <= names
    assert model.encoder is model.detector.backbone[0].body
    r50 = preset_config("detreg-r50")
    assert (r50.batch_size, r50.epochs, r50.optimizer, r50.weight_decay, r50.clip_grad) == (
        24, 5, "adamw", 1e-4, 0.1)
    assert r50.blr * 24 * 8 / 256 == pytest.approx(2e-4)
    big = build_method(r50.validate())
    assert big.hyper.num_queries == 300 and big.embedding_dim == 512
    assert not any(p.requires_grad for p in big.encoder.parameters())
    flops = big.flops_per_image()
    # a frozen R50 at 448 (~33 GFLOP), 30 crops of 128² to C3 (~1 GFLOP each) and the
    # transformer: tens to a few hundred GFLOP per image
    assert 5e10 < flops < 5e11
    assert "300 queries" in big.describe() and "C3 512-d" in big.describe()


def test_cli_three_steps_on_the_embedded_photos(tmp_path, capsys):
    pytest.importorskip("cv2")
    from engine.pretrain import main

    out = tmp_path / "run"
    args = [part for key, value in SMALL.items() for part in ("--method-arg", f"{key}={value}")]
    code = main(["--method", "detreg", "--steps", "3", "--batch-size", "4", "--workers", "0",
                 "--log-every", "1", "--no-fused", "--out", str(out), *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out + captured.err
    assert "done: step 3/3" in text and "warning: detreg: no backbone_checkpoint" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    keys = saved["model"].keys()
    assert any(k.startswith("encoder.") for k in keys)
    assert any(k.startswith("embedding_encoder.layer2.") for k in keys)
    assert not any(k.startswith(("target_encoder.", "embedding_encoder.layer3")) for k in keys)


def test_resume_is_bit_exact(tmp_path):
    values = config().to_dict()
    values.update(steps=4, warmup_steps=1, workers=0, log_every=1, checkpoint_every=1000)
    cfg = lambda: PretrainConfig.from_dict(values).validate()  # noqa: E731
    run = dict(device="cpu", fused=False, quiet=True)
    pretrain(cfg(), RunOptions(out=tmp_path / "straight", **run))
    pretrain(cfg(), RunOptions(out=tmp_path / "split", stop_after=2, **run))
    pretrain(cfg(), RunOptions(out=tmp_path / "split", resume=True, **run))
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
    first = torch.load(tmp_path / "split" / "checkpoint-00000002.pt", weights_only=False)
    moved = [n for n in a["model"] if n.startswith("detector.transformer.")
             and not torch.equal(a["model"][n], first["model"][n])]
    assert moved                                       # the last two steps did train
