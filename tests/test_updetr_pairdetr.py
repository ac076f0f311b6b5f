"""UP-DETR and Pair DETR (engine/methods/updetr.py, pairdetr.py): UP-DETR's losses against a
float64 reading of spec/OFFICIAL.md §6 (every decoder layer with its own Hungarian matching,
recomputed with scipy), its query construction and group mask, the random patches and their crops;
Pair DETR's box from the pair, joint class score, set losses and pair InfoNCE against float64, its
proposal targets; both: bad boxes, no host sync, the CLI, bit-exact resume and the initial weights
of the frozen CNN. Tiny shapes (ResNet-18 with the CIFAR stem at 32 px), reference kernels."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from engine.checkpoint import save_checkpoint
from engine.methods import StepContext, build_method
from engine.methods.pairdetr import pair_boxes, pair_infonce, proposal_targets
from engine.methods.updetr import crop_patches, group_attention_mask, random_patch_boxes
from engine.presets import ConfigError, PretrainConfig, preset_config
from engine.trainer import RunOptions, StepSession, make_optimizer, optimisation_step, pretrain

from host_sync import count_host_syncs

REFERENCE = {"roi_align": "reference", "linear_sum_assignment": "reference"}
UPDETR_ARGS = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3, dim_feedforward=32,
                   num_queries=20, num_patches=4, patch_size=16)
PAIRDETR_ARGS = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3, dim_feedforward=32,
                     num_queries=30, pair_dim=16)


def config(method: str, **changes) -> PretrainConfig:
    values = preset_config(f"{method}-demo-cpu").to_dict()
    values.update(img_size=32, batch_size=4, steps=4, warmup_steps=1, workers=0, log_every=1,
                  checkpoint_every=1000, precision="fp32", preset="test-tiny",
                  method_args=dict(UPDETR_ARGS if method == "updetr" else PAIRDETR_ARGS))
    args = changes.pop("args", {})
    values["method_args"].update(args)
    values.update(changes)
    return PretrainConfig.from_dict(values).validate()


def model_for(cfg: PretrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(cfg).train()


def ctx(step: int = 0, micro: int = 0, seed: int = 3) -> StepContext:
    return StepContext(step=step, micro=micro, backends=REFERENCE, seed=seed)


def proposal_batch(batch_size: int = 4, size: int = 32, boxes: int = 30, seed: int = 0) -> dict:
    """Two random views with random proposals in view pixels (view 1 and 2 alike), most of them
    visible."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch_size, 2, boxes, 2, generator=g) * size * 0.7
    extent = (0.1 + 0.5 * torch.rand(batch_size, 2, boxes, 2, generator=g)) * size
    proposals = torch.cat([corner, corner + extent], dim=-1).clamp(0, size)
    visible = 0.3 + 0.7 * torch.rand(batch_size, 2, boxes, generator=g)
    return dict(view1=torch.randn(batch_size, 3, size, size, generator=g),
                view2=torch.randn(batch_size, 3, size, size, generator=g),
                proposals=proposals, proposal_visible=visible)


# ------------------------------------------------------------------ float64 references
def xyxy64(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def giou64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes (N, 4) x (M, 4) (torchvision's formula, no clamps)."""
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    lt2 = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb2 = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    enclose = (rb2 - lt2).clamp(min=0).prod(-1)
    return inter / union - (enclose - union) / enclose


def official_layer(logits, boxes, targets, counts, label, num_classes, eos_coef=0.1,
                   features=None, gt=None):
    """One decoder layer of DETR's SetCriterion + UP-DETR's loss_feature, float64, with scipy's
    Hungarian matching on cost 5·L1 − 1·softmax[label] − 2·GIoU (matcher.py). Returns (losses,
    per image (rows, cols))."""
    logits, boxes, targets = logits.double(), boxes.double(), targets.double()
    batch, queries, _ = logits.shape
    prob = logits.softmax(-1)
    num_boxes = max(sum(counts), 1)
    matches = []
    for b, count in enumerate(counts):
        tgt = targets[b, :count]
        cost = (5 * torch.cdist(boxes[b], tgt, p=1) - prob[b, :, label][:, None]
                - 2 * giou64(xyxy64(boxes[b]), xyxy64(tgt)))
        rows, cols = linear_sum_assignment(cost.numpy())
        matches.append((rows, cols))
    classes = torch.full((batch, queries), num_classes, dtype=torch.int64)
    for b, (rows, _) in enumerate(matches):
        classes[b, rows] = label
    weight = torch.ones(num_classes + 1, dtype=torch.float64)
    weight[-1] = eos_coef
    nll = -logits.log_softmax(-1).gather(2, classes[..., None])[..., 0]
    w = weight[classes]
    losses = {"loss_ce": (w * nll).sum() / w.sum(), "loss_bbox": 0.0, "loss_giou": 0.0}
    if features is not None:
        losses["loss_feature"] = 0.0
    for b, (rows, cols) in enumerate(matches):
        tgt = targets[b, cols]
        losses["loss_bbox"] += (boxes[b, rows] - tgt).abs().sum() / num_boxes
        pair_giou = torch.diagonal(giou64(xyxy64(boxes[b, rows]), xyxy64(tgt)))
        losses["loss_giou"] += (1 - pair_giou).sum() / num_boxes
        if features is not None:
            f = F.normalize(features[b, rows].double(), dim=1)
            g = F.normalize(gt[b, cols].double(), dim=1)
            losses["loss_feature"] += ((f - g) ** 2).sum() / num_boxes
    return losses, matches


def assert_same_matching(matching, matches):
    for b, (rows, cols) in enumerate(matches):
        assert matching.query_index[b, torch.as_tensor(cols)].tolist() == list(rows)


# ------------------------------------------------------------------ UP-DETR
def test_updetr_losses_match_the_official_formulas_in_float64():
    """Every decoder layer (final + aux), each with its own Hungarian matching recomputed by scipy
    in float64: CE with the no-object weight, L1, GIoU and ||l2n(f) − l2n(gt)||² per matched pair,
    / num_boxes; the total with weights 1, 5, 2, 1 on every layer."""
    cfg = config("updetr")
    model = model_for(cfg)
    out = model.compute(dict(view1=torch.randn(4, 3, 32, 32)), ctx())
    outputs, losses = out["outputs"], out["losses"]
    features = model.feature_align(outputs["hs"]).detach()
    layers = [*outputs["aux_outputs"], outputs]
    assert len(layers) == 3
    total = 0.0
    for index, layer in enumerate(layers):
        suffix = "" if index == len(layers) - 1 else f"_{index}"
        ref, matches = official_layer(layer["pred_logits"].detach(),
                                      layer["pred_boxes"].detach(), out["targets"]["boxes"],
                                      [4] * 4, label=1, num_classes=2,
                                      features=features[index], gt=out["gt"])
        if not suffix:
            assert_same_matching(out["matching"], matches)
        for name, value in ref.items():
            assert float(losses[name + suffix].detach()) == pytest.approx(float(value), rel=1e-5,
                                                                 abs=1e-6), name + suffix
        total += ref["loss_ce"] + 5 * ref["loss_bbox"] + 2 * ref["loss_giou"] + ref["loss_feature"]
    assert float(model.criterion.total(losses).detach()) == pytest.approx(float(total), rel=1e-5)
    # every feature term is 2 − 2cos ∈ [0, 4]; every patch is matched: the mean is in range
    assert 0 <= float(losses["loss_feature"].detach()) <= 4


def test_updetr_queries_are_patch_features_with_dropout_plus_query_embed():
    """query_pos = repeat_interleave(patch2query(gt), Q/P) · keep + query_embed (or its rows
    permuted with query_shuffle), as models/updetr.py; the decoder input is zeros."""
    for shuffle in (False, True):
        cfg = config("updetr", args=dict(query_shuffle=shuffle, mask_ratio=0.5))
        model = model_for(cfg)
        seen = {}
        original = model.detr.transformer.forward

        def spy(src, mask, query_pos, pos, tgt_mask=None):
            seen.update(query_pos=query_pos.detach(), tgt_mask=tgt_mask)
            return original(src, mask, query_pos, pos, tgt_mask)

        model.detr.transformer.forward = spy
        view = torch.randn(4, 3, 32, 32)
        step = ctx(step=5)
        boxes, keep, order = model.draws(4, 32, step, view.device)
        out = model.compute(dict(view1=view), step)
        assert torch.equal(out["boxes"], boxes)
        patch = model.patch2query(out["gt"]).detach()                          # (B, P, d)
        expected = patch.repeat_interleave(5, dim=1) * keep
        embed = model.detr.query_embed.weight.detach()
        expected = expected + (embed[order] if shuffle else embed)
        assert torch.allclose(seen["query_pos"], expected, atol=1e-6)
        assert (order is not None) == shuffle
        assert 0.3 < float(keep.float().mean()) < 0.7                # mask_ratio 0.5
        assert torch.equal(seen["tgt_mask"], group_attention_mask(20, 4))
        # the same context draws the same patches, another one other patches
        assert torch.equal(model.draws(4, 32, step, view.device)[0], boxes)
        assert not torch.equal(model.draws(4, 32, ctx(step=6), view.device)[0], boxes)


def test_group_mask_is_block_diagonal_and_isolates_the_groups():
    mask = group_attention_mask(20, 4)
    blocks = torch.block_diag(*[torch.ones(5, 5)] * 4).bool()
    assert torch.equal(mask, ~blocks)
    # a group's decoder outputs do not depend on another group's patch
    cfg = config("updetr", args=dict(dropout=0.0))
    model = model_for(cfg).eval()
    view = torch.randn(2, 3, 32, 32)
    gt = torch.randn(2, 4, model.channels)
    with torch.no_grad():
        before = model.predict(view, gt, None, None)["hs"]
        changed = gt.clone()
        changed[:, 2] = torch.randn(2, model.channels)
        after = model.predict(view, changed, None, None)["hs"]
    group = torch.arange(20) // 5
    assert torch.allclose(before[:, :, group != 2], after[:, :, group != 2], atol=1e-6)
    assert not torch.allclose(before[:, :, group == 2], after[:, :, group == 2], atol=1e-3)


def test_patch_boxes_follow_selfdet_and_stay_in_the_view():
    """sides ~ U{min_pixel .. S − min_pixel}, x ~ U{0 .. S − w − 1}: integer boxes inside the view
    (never touching its right or bottom edge, as randint(w − sw))."""
    g = torch.Generator().manual_seed(0)
    boxes = random_patch_boxes(64, 10, 32, 8, g, torch.device("cpu"))
    assert boxes.shape == (64, 10, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    sides = boxes[..., 2:] - boxes[..., :2]
    assert int(sides.min()) == 8 and int(sides.max()) == 24
    assert boxes[..., :2].min() >= 0 and boxes[..., 2:].max() <= 31
    assert int(boxes[..., 0].min()) == 0
    counts = torch.bincount(sides.flatten().long() - 8, minlength=17)
    assert counts.min() > 0                                   # every side drawn
    assert counts.float().std() / counts.float().mean() < 0.3  # roughly uniform


def plain_bilinear_crop(image: torch.Tensor, box: list[float], out: int) -> torch.Tensor:
    """The crop of `box` (pixel edges x1 y1 x2 y2) resized to out x out by plain torch: output pixel
    (i, j) is the mean of ceil(h/out) x ceil(w/out) bilinear samples (grid_sample, border) at
    y1 + (i + (s + ½)/gh)·h/out − ½ (pixel-index coordinates), likewise for x."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    gw, gh = max(math.ceil(w / out), 1), max(math.ceil(h / out), 1)
    size = image.shape[-1]
    ys = torch.tensor([y1 + (i + (s + 0.5) / gh) * h / out - 0.5 for i in range(out)
                       for s in range(gh)], dtype=torch.float64)
    xs = torch.tensor([x1 + (j + (s + 0.5) / gw) * w / out - 0.5 for j in range(out)
                       for s in range(gw)], dtype=torch.float64)
    gy, gx = torch.meshgrid((ys + 0.5) / size * 2 - 1, (xs + 0.5) / size * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None]
    samples = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border",
                            align_corners=False)[0]
    return samples.view(3, out, gh, out, gw).mean(dim=(2, 4))


def test_patch_crops_equal_a_plain_bilinear_crop():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[[0, 0, 8, 8], [3, 5, 31, 29], [10, 2, 19, 30]],
                          [[24, 24, 32, 32], [0, 0, 32, 32], [1, 7, 13, 11]]], dtype=torch.float64)
    for out in (16, 6):        # enlarged (one sample per pixel) and shrunk (averaged samples)
        crops = crop_patches(images, boxes, out, backend="reference")
        assert crops.shape == (6, 3, out, out)
        for k, (b, p) in enumerate((b, p) for b in range(2) for p in range(3)):
            expected = plain_bilinear_crop(images[b], boxes[b, p].tolist(), out)
            assert torch.allclose(crops[k], expected, atol=1e-10), (out, b, p)


# ------------------------------------------------------------------ Pair DETR
def test_box_from_the_pair_in_float64():
    g = torch.Generator().manual_seed(2)
    centre = torch.rand(500, 2, generator=g, dtype=torch.float64)
    logits = 4 * torch.randn(500, 2, generator=g, dtype=torch.float64)
    boxes, corner = pair_boxes(centre, logits)
    reach = torch.minimum(centre, 1 - centre)
    assert torch.allclose(corner, centre - reach / (1 + torch.exp(-logits)), atol=1e-15)
    cx, cy, w, h = boxes.unbind(-1)
    assert torch.equal(torch.stack([cx, cy], -1), centre)
    assert torch.allclose(w, 2 * (cx - corner[:, 0]), atol=1e-15)
    assert torch.allclose(h, 2 * (cy - corner[:, 1]), atol=1e-15)
    xyxy = xyxy64(boxes)
    assert (w >= 0).all() and (h >= 0).all()
    assert xyxy.min() >= -1e-15 and xyxy.max() <= 1 + 1e-15         # inside the image
    assert torch.allclose(xyxy[:, :2], corner, atol=1e-15)          # the corner is top-left
    # float32 and its gradient: finite also at the image border and the centre
    edge = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1e-7, 1 - 1e-7]], requires_grad=True)
    a = torch.zeros(3, 2, requires_grad=True)
    pair_boxes(edge, a)[0].sum().backward()
    assert torch.isfinite(edge.grad).all() and torch.isfinite(a.grad).all()


def official_pair_infonce(zc, zk, matched, tau, num_boxes):
    total = 0.0
    for b in range(zc.shape[0]):
        s = zc[b] @ zk[b].T / tau
        for i in range(s.shape[0]):
            if matched[b, i]:
                total = total + 0.5 * (-s[i].log_softmax(0)[i] - s[:, i].log_softmax(0)[i])
    return total / num_boxes


def test_pair_infonce_matches_float64_with_its_gradient():
    g = torch.Generator().manual_seed(3)
    zc = F.normalize(torch.randn(3, 7, 5, generator=g, dtype=torch.float64), dim=-1)
    zk = F.normalize(torch.randn(3, 7, 5, generator=g, dtype=torch.float64), dim=-1)
    matched = torch.rand(3, 7, generator=g) > 0.5
    matched[2] = False                                      # an image with no matched query
    num_boxes = matched.sum().double()
    a, b = zc.clone().requires_grad_(), zk.clone().requires_grad_()
    ref = official_pair_infonce(a, b, matched, 0.1, num_boxes)
    ref.backward()
    c, d = zc.float().requires_grad_(), zk.float().requires_grad_()
    loss, top1 = pair_infonce(c, d, matched, 0.1, num_boxes.float())
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert torch.allclose(c.grad.double(), a.grad, atol=1e-5)
    assert torch.allclose(d.grad.double(), b.grad, atol=1e-5)
    # top-1: a matched pair whose row and column argmax is itself
    s = zc @ zk.transpose(1, 2)
    idx = torch.arange(7)
    hits = ((s.argmax(2) == idx) & (s.argmax(1) == idx) & matched).sum()
    assert float(top1) == pytest.approx(float(hits) / float(matched.sum()))
    # nothing matched: 0, finite gradient
    none = torch.zeros_like(matched)
    c.grad = d.grad = None
    loss, _ = pair_infonce(c, d, none, 0.1, torch.tensor(1.0))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(c.grad, torch.zeros_like(c)) and torch.equal(d.grad, torch.zeros_like(d))


def test_proposal_targets_keep_visible_boxes_of_a_minimum_size_first():
    proposals = torch.tensor([[[0, 0, 10, 10], [2, 2, 3, 20], [5, 5, 30, 30], [1, 1, 9, 9],
                               [-5, 4, 40, 12], [float("nan"), 0, 4, 4]]], dtype=torch.float32)
    visible = torch.tensor([[0.4, 1.0, 0.9, 0.5, 0.6, 1.0]])
    targets, xyxy = proposal_targets(proposals, visible, 32, 0.5, 2.0, 30)
    # kept: #2 (visible), #3 (exactly 0.5), #4 (clipped to the view); dropped: #0 (0.4 visible),
    # #1 (1 px wide), #5 (NaN)
    assert int(targets["num_targets"][0]) == 3
    expected = torch.tensor([[5, 5, 30, 30], [1, 1, 9, 9], [0, 4, 32, 12]]) / 32
    assert torch.allclose(xyxy[0, :3], expected)
    assert torch.equal(xyxy[0, 3:], torch.zeros(3, 4))
    cx, cy, w, h = targets["boxes"][0, :3].unbind(-1)
    assert torch.allclose(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1),
                          expected)
    assert targets["labels"].unique().tolist() == [0]
    # max_targets: only the first proposals are considered
    targets, _ = proposal_targets(proposals, visible, 32, 0.5, 2.0, 3)
    assert int(targets["num_targets"][0]) == 1


def test_pairdetr_joint_prediction_and_set_losses_match_float64():
    """Joint logits = both decoders' class logits summed; boxes from the pair; DETR's set losses on
    the joint prediction per layer (scipy matching in float64); the pair loss on the final
    layer's matched queries; the total 1·CE + 5·L1 + 2·GIoU (+ aux) + 1·pair."""
    cfg = config("pairdetr")
    model = model_for(cfg)
    batch = proposal_batch()
    out = model.compute(batch, ctx())
    outputs, losses, net = out["outputs"], out["losses"], model.detector
    hs_c, hs_k = outputs["hs_centre"].detach(), outputs["hs_corner"].detach()
    with torch.no_grad():
        logits = net.class_embed(hs_c) + net.corner_class_embed(hs_k)
        boxes, _ = pair_boxes(net.centre_embed(hs_c).sigmoid(), net.corner_embed(hs_k))
    assert torch.allclose(outputs["pred_logits"], logits[-1], atol=1e-6)
    assert torch.allclose(outputs["pred_boxes"], boxes[-1], atol=1e-6)
    counts = out["targets"]["num_targets"].tolist()
    assert 0 < sum(counts) and all(c <= 30 for c in counts)
    total = 0.0
    for index in range(3):
        suffix = "" if index == 2 else f"_{index}"
        ref, matches = official_layer(logits[index], boxes[index], out["targets"]["boxes"],
                                      counts, label=0, num_classes=1)
        if not suffix:
            assert_same_matching(out["matching"], matches)
            matched = torch.zeros(4, 30, dtype=torch.bool)
            for b, (rows, _) in enumerate(matches):
                matched[b, rows] = True
            assert torch.equal(out["matched"], matched)
        for name, value in ref.items():
            assert float(losses[name + suffix].detach()) == pytest.approx(float(value), rel=1e-5,
                                                                 abs=1e-6), name + suffix
        total += ref["loss_ce"] + 5 * ref["loss_bbox"] + 2 * ref["loss_giou"]
    with torch.no_grad():
        zc = F.normalize(net.pair_centre(hs_c[-1]).double(), dim=-1)
        zk = F.normalize(net.pair_corner(hs_k[-1]).double(), dim=-1)
    pair = official_pair_infonce(zc, zk, out["matched"], 0.1, sum(counts))
    assert float(losses["loss_pair"].detach()) == pytest.approx(float(pair), rel=1e-5)
    assert float(model.criterion.total(losses).detach()) == pytest.approx(float(total + pair), rel=1e-5)


# ------------------------------------------------------------------ both
def bad_proposals() -> dict:
    batch = proposal_batch()
    p, v = batch["proposals"], batch["proposal_visible"]
    v[0] = 0.0                                                      # no proposal left
    p[1] = torch.tensor([5.0, 5.0, 5.0, 5.0])                        # degenerate (zero area)
    p[1, :, ::2] = torch.tensor([9.0, 3.0, 12.0, 1.0])               # ... and inverted
    p[2, :, :15] = torch.tensor([40.0, -9.0, 90.0, -1.0])            # out of view, "visible"
    v[2] = 1.0
    p[3, :, 3] = float("nan")                                        # a NaN box
    return batch


@pytest.mark.parametrize("method", ["updetr", "pairdetr"])
def test_bad_boxes_give_finite_losses_and_gradients(method):
    if method == "updetr":   # a blank view: all-zero patch features (l2n of a zero vector)
        cfg = config(method)
        batches = [dict(view1=torch.zeros(4, 3, 32, 32))]
    else:
        cfg = config(method)
        batches = [bad_proposals(), dict(proposal_batch(), proposal_visible=torch.zeros(4, 2, 30))]
    model = model_for(cfg)
    for batch in batches:
        model.zero_grad()
        loss, figures = model(batch, ctx())
        loss.backward()
        assert torch.isfinite(loss), figures
        assert all(torch.isfinite(v) for v in figures.values()), figures
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                assert torch.isfinite(p.grad).all(), name
    if method == "pairdetr":
        assert float(figures["targets_per_image"]) == 0 and float(figures["loss_pair"]) == 0


@pytest.mark.parametrize("method", ["updetr", "pairdetr"])
def test_optimisation_step_reads_no_device_value(method):
    cfg = config(method, accum=2)
    model = model_for(cfg)
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    session = StepSession(cfg, model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          torch.device("cpu"), None, REFERENCE)
    batches = [proposal_batch(seed=k) for k in range(4)]
    optimisation_step(session, batches[:2], 0, 0.99)
    with count_host_syncs() as syncs:
        loss, grad_norm, _ = optimisation_step(session, batches[2:], 1, 0.99)
    assert not syncs, syncs.report()
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)


@pytest.mark.parametrize("method", ["updetr", "pairdetr"])
def test_detections_are_the_pretext_targets_and_predictions(method):
    cfg = config(method)
    model = model_for(cfg).eval()
    batch = proposal_batch()
    out = model.detections(batch, ctx(step=2))
    queries = 20 if method == "updetr" else 30
    assert out["pred_boxes"].shape == (4, queries, 4) and out["scores"].shape == (4, queries)
    assert out["pred_boxes"].min() >= 0 and out["pred_boxes"].max() <= 1
    assert (out["pred_boxes"][..., 2:] >= out["pred_boxes"][..., :2]).all()
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
    if method == "updetr":     # the training step's patches at that context
        boxes, _, _ = model.draws(4, 32, ctx(step=2), torch.device("cpu"))
        assert torch.equal(out["target_boxes"], boxes / 32)
        assert out["num_targets"].tolist() == [4] * 4
    else:
        targets, xyxy = model.select_targets(batch, 32, torch.device("cpu"))
        assert torch.equal(out["target_boxes"], xyxy)
        assert torch.equal(out["num_targets"], targets["num_targets"])


def test_config_errors_and_the_missing_weights_warning(tmp_path):
    with pytest.raises(ConfigError, match="ResNet"):
        build_method(config("updetr", backbone="vit", patch_size=8, dim=32, depth=1, heads=2))
    with pytest.raises(ConfigError, match="multiple of num_patches"):
        build_method(config("updetr", args=dict(num_patches=3)))
    with pytest.raises(ConfigError, match="min_pixel"):
        build_method(config("updetr", img_size=16, args=dict(min_pixel=8)))
    with pytest.raises(ConfigError, match="max_targets"):
        build_method(config("pairdetr", args=dict(num_queries=10)))
    model = model_for(config("pairdetr"))
    assert any("backbone_checkpoint" in line for line in model.data_warnings(47, 4, 10))


@pytest.mark.parametrize("method", ["updetr", "pairdetr"])
def test_backbone_checkpoint_initialises_the_frozen_cnn(method, tmp_path):
    """From a densesim checkpoint of another method (its online encoder) and from a torchvision
    state dict; a checkpoint of another architecture is a one-line ConfigError."""
    source_cfg = config("pairdetr" if method == "updetr" else "updetr")
    torch.manual_seed(7)
    source = build_method(source_cfg)
    with torch.no_grad():
        for p in source.encoder.parameters():
            p.add_(torch.randn_like(p))
    run = tmp_path / "source"
    run.mkdir()
    save_checkpoint(run, {"method": source_cfg.method, "model": source.state_dict(),
                          "config": source_cfg.to_dict(), "step": 3})
    raw = tmp_path / "resnet18.pth"
    torch.save({k: v for k, v in source.encoder.state_dict().items()}, raw)
    for path in (run, raw):
        model = model_for(config(method, args=dict(backbone_checkpoint=str(path))))
        for (name, a), b in zip(model.encoder.state_dict().items(),
                                source.encoder.state_dict().values()):
            assert torch.equal(a, b), name
        assert not any(p.requires_grad for p in model.encoder.parameters())
        assert not any("backbone_checkpoint" in w for w in model.data_warnings(47, 4, 10))
        assert str(path) in model.describe()
    with pytest.raises(ConfigError, match="CIFAR stem"):
        build_method(config(method, cifar_stem=False, img_size=64,
                            args=dict(backbone_checkpoint=str(run))))
    # a structure-only build (detector export) does not read the file
    from engine.methods.base import skip_initial_weights

    with skip_initial_weights():
        build_method(config(method, args=dict(backbone_checkpoint=str(tmp_path / "gone.pth"))))
    with pytest.raises(ConfigError, match="backbone_checkpoint"):
        build_method(config(method, args=dict(backbone_checkpoint=str(tmp_path / "gone.pth"))))


@pytest.mark.parametrize("method", ["updetr", "pairdetr"])
def test_pretrain_cli_three_steps(method, tmp_path, capsys):
    """`python -m engine.pretrain --method NAME --steps 3` on the embedded photos (Pair DETR with
    their cached proposals), tiny widths."""
    from engine.pretrain import main

    args = UPDETR_ARGS if method == "updetr" else PAIRDETR_ARGS
    out = tmp_path / "run"
    code = main(["--method", method, "--steps", "3", "--batch-size", "4", "--workers", "0",
                 "--log-every", "1", "--no-fused", "--out", str(out),
                 *[part for k, v in args.items() for part in ("--method-arg", f"{k}={v}")]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out + captured.err
    assert "done: step 3/3" in text and "backbone_checkpoint" in text        # the warning
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = (("loss_feature", "loss_aux") if method == "updetr"
             else ("loss_pair", "pair_top1", "targets_per_image"))
    for record in records:
        assert all(np.isfinite(record[name]) for name in ("loss", "loss_ce", "loss_giou", *names))
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["method"] == method
    assert any(key.startswith("encoder.layer4") for key in saved["model"])


@pytest.mark.parametrize("method", ["updetr", "pairdetr"])
def test_resume_is_bit_exact(method, tmp_path):
    """4 straight steps == 2, stop, resume, 2: the seeded patches/dropout, transformer dropout
    (global RNG), AdamW moments and the frozen CNN, bit for bit."""
    args = dict(query_shuffle=True) if method == "updetr" else {}
    run = dict(device="cpu", fused=False, quiet=True)
    pretrain(config(method, args=args), RunOptions(out=tmp_path / "straight", **run))
    pretrain(config(method, args=args), RunOptions(out=tmp_path / "split", stop_after=2, **run))
    pretrain(config(method, args=args), RunOptions(out=tmp_path / "split", resume=True, **run))
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


def test_flops_and_describe():
    from engine.models.resnet import resnet_flops_per_image

    r50 = resnet_flops_per_image("resnet50", 448)                      # 32.7 GFLOP
    patches = 10 * resnet_flops_per_image("resnet50", 128)             # 26.7 GFLOP
    for method, name, cnn in (("updetr", "UP-DETR", r50 + patches), ("pairdetr", "Pair DETR", r50)):
        model = build_method(preset_config(f"{method}-r50"))
        assert name in model.describe() and "random (no backbone_checkpoint)" in model.describe()
        # the frozen CNN forward, plus 3x a 6+6-layer d256 transformer over 14 x 14 cells
        # (~6.6 GFLOP forward with one decoder, ~9.5 with two)
        assert cnn + 3 * 5e9 < model.flops_per_image() < cnn + 3 * 11e9, method
