"""The DETR-family detector (engine/models/detr.py) and its box ops (engine/models/box_ops.py).

References are written here from the official formulas (`../shared/spec/OFFICIAL.md` §6 UP-DETR,
§7 DETReg; DETR / Deformable DETR's SetCriterion and HungarianMatcher), in float64, with Python
loops where that makes them obviously right. Models are tiny (ResNet-18 at 64 px, hidden 32).
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from engine.models import box_ops, detr
from engine.models.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from engine.models.detr import (
    DETR,
    DeformableDETR,
    HungarianMatcher,
    Matching,
    MSDeformAttn,
    SetCriterion,
    TransformerDecoderLayer,
    pad_targets,
    weighted_total,
)
from tests.host_sync import count_host_syncs


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_cxcywh(*shape, generator=None, dtype=torch.float32):
    centre = torch.rand(*shape, 2, generator=generator, dtype=dtype)
    size = torch.rand(*shape, 2, generator=generator, dtype=dtype) * 0.6 + 0.02
    return torch.cat([centre, size], -1)


# ------------------------------------------------------------------------------------- box ops

def _giou_reference(a, b):
    """float64 GIoU of two xyxy boxes as Python floats (the module's clamp at EPS)."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area_a + area_b - inter
    ew = max(0.0, max(a[2], b[2]) - min(a[0], b[0]))
    eh = max(0.0, max(a[3], b[3]) - min(a[1], b[1]))
    enclose = ew * eh
    iou = inter / max(union, box_ops.EPS)
    return iou, iou - (enclose - union) / max(enclose, box_ops.EPS)


def _mixed_boxes(n, seed):
    """xyxy boxes: ordinary, zero-width, zero-height, points, out-of-image, duplicates."""
    g = torch.Generator().manual_seed(seed)
    boxes = box_cxcywh_to_xyxy(random_cxcywh(n, generator=g, dtype=torch.float64))
    boxes[0, 2] = boxes[0, 0]                                  # zero width
    boxes[1, 3] = boxes[1, 1]                                  # zero height
    boxes[2] = torch.tensor([0.3, 0.3, 0.3, 0.3], dtype=torch.float64)    # a point
    boxes[3] = torch.tensor([-0.4, 0.8, 1.5, 1.9], dtype=torch.float64)   # out of the image
    boxes[4] = boxes[5]                                        # a duplicate
    return boxes


def test_box_conversions_and_area():
    g = torch.Generator().manual_seed(0)
    cxcywh = random_cxcywh(3, 5, generator=g, dtype=torch.float64)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy[..., 0], cxcywh[..., 0] - cxcywh[..., 2] / 2)
    torch.testing.assert_close(xyxy[..., 3], cxcywh[..., 1] + cxcywh[..., 3] / 2)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(box_area(xyxy), cxcywh[..., 2] * cxcywh[..., 3])


def test_pairwise_iou_and_giou_match_float64_formulas_with_degenerate_boxes():
    a, b = _mixed_boxes(8, 1), _mixed_boxes(6, 2)
    b[0] = a[2]                                               # the same point in both sets
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    assert iou.shape == giou.shape == (8, 6)
    for i in range(8):
        for j in range(6):
            ref_iou, ref_giou = _giou_reference(a[i].tolist(), b[j].tolist())
            assert iou[i, j].item() == pytest.approx(ref_iou, abs=1e-12)
            assert giou[i, j].item() == pytest.approx(ref_giou, abs=1e-12)
    assert torch.isfinite(giou).all() and (giou >= -1 - 1e-12).all() and (giou <= 1 + 1e-12).all()
    assert giou[2, 0] == 0 and iou[2, 0] == 0                  # identical points: 0, not NaN
    # batched broadcasting = per-batch calls; elementwise = the diagonal
    batch_a, batch_b = torch.stack([a[:6], a[2:]]), torch.stack([b, b.flip(0)])
    batched = generalized_box_iou(batch_a, batch_b)
    torch.testing.assert_close(batched[1], generalized_box_iou(a[2:], b.flip(0)))
    torch.testing.assert_close(elementwise_generalized_box_iou(batch_a, batch_b),
                               torch.diagonal(batched, dim1=-2, dim2=-1))


def test_giou_equals_unclamped_formula_on_real_boxes_and_gradients_are_finite():
    g = torch.Generator().manual_seed(3)
    a = box_cxcywh_to_xyxy(random_cxcywh(7, generator=g))
    b = box_cxcywh_to_xyxy(random_cxcywh(5, generator=g))
    area_a, area_b = box_area(a)[:, None], box_area(b)[None]
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    enc = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2]))
    enc = enc.clamp(min=0).prod(-1)
    torch.testing.assert_close(generalized_box_iou(a, b), inter / union - (enc - union) / enc)
    # degenerate pairs: finite gradients
    deg = torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.1, 0.2, 0.1, 0.6], [0.5, 0.5, 0.9, 0.5]],
                       requires_grad=True)
    same = deg.detach().clone().requires_grad_(True)
    (generalized_box_iou(deg, same).sum() + elementwise_generalized_box_iou(deg, same).sum()
     ).backward()
    assert torch.isfinite(deg.grad).all() and torch.isfinite(same.grad).all()


# ------------------------------------------------------------------------------------- matcher

def _padded_batch(seed, batch=4, queries=9, max_t=5, classes=3, counts=(5, 0, 3, 1)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=g)
    boxes = random_cxcywh(batch, queries, generator=g)
    tgt = [random_cxcywh(c, generator=g) for c in counts]
    labels = [torch.randint(0, classes - 1, (c,), generator=g) for c in counts]
    return logits, boxes, pad_targets(tgt, labels, max_targets=max_t)


def _cost_reference(logits, boxes, tgt_boxes, tgt_labels, weights, focal):
    """DETR / Deformable DETR's per-image cost matrix in float64 (Q, n)."""
    w_class, w_bbox, w_giou = weights
    logits, boxes, tgt_boxes = logits.double(), boxes.double(), tgt_boxes.double()
    if focal:
        p = logits.sigmoid()
        pos = 0.25 * (1 - p) ** 2 * (-(p + 1e-8).log())
        neg = 0.75 * p ** 2 * (-(1 - p + 1e-8).log())
        cost_class = (pos - neg)[:, tgt_labels]
    else:
        cost_class = -logits.softmax(-1)[:, tgt_labels]
    cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou


@pytest.mark.parametrize("focal", [False, True])
def test_matcher_reaches_scipy_optimum_on_padded_batches(focal):
    weights = (2.0, 5.0, 2.0) if focal else (1.0, 5.0, 2.0)
    matcher = HungarianMatcher(*weights, class_cost="focal" if focal else "softmax")
    for seed in range(3):
        logits, boxes, targets = _padded_batch(seed)
        matching = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        assert matching.query_index.shape == (4, 5) and matching.query_index.dtype == torch.int64
        for b, n in enumerate(targets["num_targets"].tolist()):
            q = matching.query_index[b]
            assert (q[n:] == -1).all() and (q[:n] >= 0).all() and len(set(q[:n].tolist())) == n
            cost = _cost_reference(logits[b], boxes[b], targets["boxes"][b, :n],
                                   targets["labels"][b, :n], weights, focal)
            if n == 0:
                continue
            rows, cols = linear_sum_assignment(cost.numpy())
            optimum = cost[rows, cols].sum().item()
            ours = cost[q[:n], torch.arange(n)].sum().item()
            assert ours == pytest.approx(optimum, rel=1e-5, abs=1e-5)
            # the cost matrix itself, on valid columns
            ours_cost = matcher.cost_matrix(logits, boxes, targets["labels"], targets["boxes"],
                                            matching.valid)[b, :, :n]
            torch.testing.assert_close(ours_cost.double(), cost, rtol=1e-5, atol=1e-5)


def test_matching_helpers():
    matching = Matching(torch.tensor([[2, 0, -1], [-1, -1, -1]]),
                        torch.tensor([[True, True, False], [False, False, False]]))
    per_query = torch.arange(2 * 4 * 2).view(2, 4, 2)
    gathered = matching.gather(per_query)
    assert gathered.shape == (2, 3, 2)
    assert gathered[0, 0].tolist() == per_query[0, 2].tolist()
    assert gathered[0, 1].tolist() == per_query[0, 0].tolist()
    assert matching.query_mask(4).tolist() == [[True, False, True, False], [False] * 4]
    labels = torch.tensor([[5, 7, 9], [1, 1, 1]])
    assert matching.scatter_queries(labels, 4, -1).tolist() == [[7, -1, 5, -1], [-1] * 4]


# ------------------------------------------------------------------------------------- criterion

def _focal64(logit, target):
    p = 1 / (1 + math.exp(-logit))
    ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    return (0.25 * target + 0.75 * (1 - target)) * ce * (1 - p_t) ** 2


def _layer_reference(logits, boxes, targets, query_index, focal, eos_coef, num_classes):
    """The official per-layer loss terms from explicit loops, float64, given the matching."""
    logits, boxes = logits.double(), boxes.double()
    batch, queries, _ = logits.shape
    counts = targets["num_targets"].tolist()
    num_boxes = max(float(sum(counts)), 1.0)
    target_class = [[num_classes] * queries for _ in range(batch)]
    l1 = giou = 0.0
    for b in range(batch):
        for t in range(counts[b]):
            q = int(query_index[b, t])
            target_class[b][q] = int(targets["labels"][b, t])
            pred, tgt = boxes[b, q], targets["boxes"][b, t].double()
            l1 += (pred - tgt).abs().sum().item()
            _, g = _giou_reference(box_cxcywh_to_xyxy(pred).tolist(),
                                   box_cxcywh_to_xyxy(tgt).tolist())
            giou += 1 - g
    if focal:
        total = 0.0
        for b in range(batch):
            for q in range(queries):
                for c in range(num_classes):
                    total += _focal64(logits[b, q, c].item(), float(target_class[b][q] == c))
        ce = total / num_boxes            # = mean over queries, summed, / num_boxes, * Q
    else:
        weight = [1.0] * num_classes + [eos_coef]
        num = den = 0.0
        for b in range(batch):
            for q in range(queries):
                y = target_class[b][q]
                nll = -torch.log_softmax(logits[b, q], -1)[y].item()
                num += weight[y] * nll
                den += weight[y]
        ce = num / den
    return {"loss_ce": ce, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


@pytest.mark.parametrize("focal", [False, True])
def test_criterion_matches_float64_reference_with_aux_layers(focal):
    classes = 3
    logits, boxes, targets = _padded_batch(7, classes=classes + (0 if focal else 1))
    g = torch.Generator().manual_seed(8)
    aux = [{"pred_logits": torch.randn(logits.shape, generator=g),
            "pred_boxes": random_cxcywh(4, 9, generator=g)} for _ in range(2)]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": aux}
    matcher = HungarianMatcher(*((2, 5, 2) if focal else (1, 5, 2)),
                               class_cost="focal" if focal else "softmax")
    criterion = SetCriterion(classes, matcher, eos_coef=0.1,
                             class_loss="focal" if focal else "ce")
    losses, matching, aux_matchings = criterion(outputs, targets)
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}
    assert len(aux_matchings) == 2
    for layer, (out, m, suffix) in enumerate(zip([outputs, *aux], [matching, *aux_matchings],
                                                 ["", "_0", "_1"])):
        own = matcher(out, targets)          # each layer matched on its own predictions
        assert torch.equal(m.query_index, own.query_index), layer
        ref = _layer_reference(out["pred_logits"], out["pred_boxes"], targets, m.query_index,
                               focal, 0.1, classes)
        for key, value in ref.items():
            assert losses[key + suffix].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    expected_total = sum((2.0 if focal else 1.0) * losses[f"loss_ce{s}"] + 5 * losses[f"loss_bbox{s}"]
                         + 2 * losses[f"loss_giou{s}"] for s in ("", "_0", "_1"))
    torch.testing.assert_close(criterion.total(losses), expected_total)
    assert weighted_total({"loss_feature_3": torch.tensor(2.0)}, {"loss_feature": 0.5}) == 1.0


def test_num_boxes_is_all_reduced_and_averaged_over_ranks(monkeypatch):
    """DETR: num_boxes = clamp(all_reduce(sum targets) / world_size, min=1); here a fake 2-rank
    group where the other rank holds 6 targets."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(6))
    assert detr.num_boxes_normaliser(torch.tensor([3, 1])).item() == 5.0
    assert detr.num_boxes_normaliser(torch.tensor([0, 0])).item() == 3.0
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t)
    assert detr.num_boxes_normaliser(torch.tensor([0, 0])).item() == 1.0


@pytest.mark.parametrize("focal", [False, True])
def test_bad_targets_give_finite_losses_and_gradients(focal):
    classes = 2
    g = torch.Generator().manual_seed(11)
    raw_logits = torch.randn(3, 6, classes + (0 if focal else 1), generator=g, requires_grad=True)
    raw_boxes = torch.randn(3, 6, 4, generator=g)
    raw_boxes[0, :, 2:] = -200.0                  # predictions whose width/height underflow to 0
    raw_boxes.requires_grad_(True)
    nan = float("nan")
    boxes = torch.tensor([
        [[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.0, 0.4], [0.7, 0.7, 0.3, 0.0], [nan, nan, nan, nan]],
        [[1.4, -0.3, 0.8, 0.9], [-0.5, 1.5, 0.2, 0.2], [0.5, 0.5, 3.0, 3.0], [9.0, 9.0, 0.0, 0.0]],
        [[nan, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],      # no targets, garbage
    ])
    targets = {"boxes": boxes, "labels": torch.tensor([[0, 1, 1, 99], [1, 0, 1, 1], [-5, 0, 0, 0]]),
               "num_targets": torch.tensor([3, 4, 0])}
    criterion = SetCriterion(classes, HungarianMatcher(class_cost="focal" if focal else "softmax"),
                             class_loss="focal" if focal else "ce")
    for tg in (targets,
               {"boxes": torch.zeros(3, 0, 4), "labels": torch.zeros(3, 0, dtype=torch.long),
                "num_targets": torch.zeros(3, dtype=torch.long)},
               {**targets, "num_targets": torch.zeros(3, dtype=torch.long)}):
        raw_logits.grad = raw_boxes.grad = None
        outputs = {"pred_logits": raw_logits, "pred_boxes": raw_boxes.sigmoid()}
        losses, matching, _ = criterion(outputs, tg)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        criterion.total(losses).backward()
        assert torch.isfinite(raw_logits.grad).all() and torch.isfinite(raw_boxes.grad).all()
        if tg["num_targets"].sum() == 0:
            assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
            assert (matching.query_index == -1).all()
    with pytest.raises(ValueError, match="queries >= targets"):
        criterion(outputs, pad_targets([torch.rand(7, 4)] * 3))


# ------------------------------------------------------------------------------------- models

TINY = {"hidden_dim": 32, "nheads": 4, "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 64}


def _images(seed=0, batch=2, size=64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    mask[1, :, 40:] = True                       # image 1 padded on the right
    mask[1, 48:, :] = True
    return images, mask


def _targets(seed=0):
    g = torch.Generator().manual_seed(seed)
    return pad_targets([random_cxcywh(3, generator=g), random_cxcywh(1, generator=g)],
                       [torch.ones(3, dtype=torch.long), torch.ones(1, dtype=torch.long)])


def test_detr_forward_backward_shapes_names_and_frozen_backbone():
    torch.manual_seed(0)
    model = DETR("resnet18", num_classes=2, num_queries=10, pre_norm=True, train_backbone=False,
                 **TINY)
    images, mask = _images()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 10, 3) and out["pred_boxes"].shape == (2, 10, 4)
    assert out["hs"].shape == (2, 2, 10, 32) and out["memory"].shape == (2, 4, 32)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    criterion = SetCriterion(2, HungarianMatcher())
    losses, _, _ = criterion(out, _targets())
    criterion.total(losses).backward()
    body = model.backbone[0].body
    assert all(p.grad is None for p in body.parameters())            # --fre_cnn / lr_backbone 0
    assert model.query_embed.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    keys = model.state_dict().keys()
    for key in ("backbone.0.body.conv1.weight", "backbone.0.body.layer4.1.bn2.running_var",
                "backbone.0.body.layer2.0.downsample.1.weight", "input_proj.weight",
                "transformer.encoder.layers.1.self_attn.in_proj_weight",
                "transformer.encoder.layers.0.linear2.bias", "transformer.encoder.norm.weight",
                "transformer.decoder.layers.1.multihead_attn.out_proj.weight",
                "transformer.decoder.layers.0.norm3.bias", "transformer.decoder.norm.weight",
                "query_embed.weight", "class_embed.weight", "bbox_embed.layers.2.bias"):
        assert key in keys, key
    assert not any("num_batches_tracked" in k for k in keys)           # FrozenBatchNorm2d
    post = DETR("resnet18", num_classes=2, num_queries=10, frozen_bn=False, **TINY)
    assert "transformer.encoder.norm.weight" not in post.state_dict()  # post-norm: no encoder norm
    trainable = {n for n, p in post.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(any(f"layer{k}" in n for k in (2, 3, 4)) for n in trainable)


def test_frozen_batchnorm_matches_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen = detr.convert_frozen_batchnorm(torch.nn.Sequential(bn))[0]
    assert isinstance(frozen, detr.FrozenBatchNorm2d)
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    fresh = detr.FrozenBatchNorm2d(5)
    fresh.load_state_dict(bn.state_dict())                             # num_batches_tracked dropped
    torch.testing.assert_close(fresh(x), bn(x))


def test_position_embedding_follows_the_valid_region():
    pe = detr.PositionEmbeddingSine(8)
    x = torch.zeros(1, 1, 3, 5)
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[:, :, 3:] = True
    pos = pe(x, mask)
    assert pos.shape == (1, 16, 3, 5)
    # normalised by the valid width: the last valid column has x = 2π, like the last column unpadded
    torch.testing.assert_close(pos[:, 8:, :, 2], pe(torch.zeros(1, 1, 3, 3))[:, 8:, :, 2])
    # channel 0 of y is sin(y_embed): y_embed = row / rows · 2π
    rows = torch.arange(1, 4, dtype=torch.float32) / (3 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[0, 0, :, 0], rows.sin())
    centred = detr.PositionEmbeddingSine(8, offset=-0.5)(x, mask)      # Deformable DETR's variant
    rows = (torch.arange(1, 4, dtype=torch.float32) - 0.5) / (3 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(centred[0, 0, :, 0], rows.sin())


def _block_mask(queries, group, as_bool):
    block = torch.arange(queries) // group
    allowed = block[:, None] == block[None, :]
    if as_bool:
        return ~allowed                                     # True = not allowed
    return torch.zeros(queries, queries).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_self_attention_mask_isolates_groups(pre_norm):
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(32, 4, 64, dropout=0.0, normalize_before=pre_norm).eval()
    tgt, pos = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    memory, mem_pos = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    changed = tgt.clone()
    changed[:, 3:] += torch.randn(2, 3, 32)                  # only group 1 (queries 3..5) changes
    for as_bool in (False, True):
        mask = _block_mask(6, 3, as_bool)
        before = layer(tgt, memory, tgt_mask=mask, pos=mem_pos, query_pos=pos)
        after = layer(changed, memory, tgt_mask=mask, pos=mem_pos, query_pos=pos)
        torch.testing.assert_close(after[:, :3], before[:, :3], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, 3:], before[:, 3:])
    unmasked = layer(changed, memory, pos=mem_pos, query_pos=pos)
    assert not torch.allclose(unmasked[:, :3], layer(tgt, memory, pos=mem_pos, query_pos=pos)[:, :3])


def test_detr_query_pos_hooks_and_block_mask_through_the_whole_model():
    """UP-DETR's use: patch features added to the query positions, a block-diagonal decoder mask;
    changing group 1's patch term leaves group 0's predictions (every layer) unchanged."""
    torch.manual_seed(0)
    model = DETR("resnet18", num_classes=2, num_queries=6, pre_norm=True, **TINY).eval()
    images, mask = _images()
    patch = torch.randn(2, 6, 32)
    changed = patch.clone()
    changed[:, 3:] = torch.randn(2, 3, 32)
    attn = _block_mask(6, 3, as_bool=False)
    a = model(images, mask, query_pos_add=patch, tgt_mask=attn)
    b = model(images, mask, query_pos_add=changed, tgt_mask=attn)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(b[key][:, :3], a[key][:, :3], rtol=0, atol=1e-6)
        assert not torch.allclose(b[key][:, 3:], a[key][:, 3:])
    torch.testing.assert_close(b["hs"][:, :, :3], a["hs"][:, :, :3], rtol=0, atol=1e-6)
    # query_pos replaces the learned positions (fewer queries allowed, as UP-DETR's eval)
    replaced = model(images, mask, query_pos=model.query_embed.weight[:3] + patch[:, :3],
                     tgt_mask=attn[:3, :3])
    torch.testing.assert_close(replaced["pred_boxes"], a["pred_boxes"][:, :3], rtol=0, atol=1e-5)


def test_detr_is_deterministic_given_a_seed():
    images, mask = _images()
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = DETR("resnet18", num_classes=2, num_queries=5, **TINY)
        outs.append((model.state_dict(), model(images, mask)["pred_boxes"]))  # train: dropout
    assert all(torch.equal(outs[0][0][k], outs[1][0][k]) for k in outs[0][0])
    assert torch.equal(outs[0][1], outs[1][1])


# ------------------------------------------------------------------------- deformable attention

def _bilinear_zero_pad(value_map, x, y):
    """value_map (H, W, d) float64; (x, y) in [0, 1] (align_corners=False): pixel centres at
    (i + 0.5) / W; samples outside read zeros."""
    h, w, _ = value_map.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_map.shape[-1], dtype=torch.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += weight * value_map[yi, xi]
    return out


def test_ms_deform_attn_layout_against_a_bilinear_loop():
    g = torch.Generator().manual_seed(5)
    shapes = ((4, 5), (2, 3))
    n, lq, heads, d, points = 2, 3, 2, 3, 2
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, heads, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, heads, len(shapes), points, 2, generator=g, dtype=torch.float64)
    loc = loc * 1.4 - 0.2                                     # some samples fall outside
    weights = torch.rand(n, lq, heads, len(shapes), points, generator=g, dtype=torch.float64)
    spatial = torch.tensor(shapes, dtype=torch.long)
    starts = torch.tensor([0, 20], dtype=torch.long)
    kernel_or_fallback = detr.ms_deform_attn_dispatch(value, spatial, starts, loc, weights, shapes)
    fallback = detr._ms_deform_attn_fallback(value, shapes, loc, weights)
    assert kernel_or_fallback.shape == fallback.shape == (n, lq, heads * d)
    ref = torch.zeros(n, lq, heads, d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    start = int(starts[lvl])
                    vmap = value[b, start:start + h * w, m].reshape(h, w, d)
                    for p in range(points):
                        x, y = loc[b, q, m, lvl, p].tolist()
                        ref[b, q, m] += weights[b, q, m, lvl, p] * _bilinear_zero_pad(vmap, x, y)
    torch.testing.assert_close(kernel_or_fallback, ref.reshape(n, lq, heads * d))
    torch.testing.assert_close(fallback, ref.reshape(n, lq, heads * d))


def test_fallbacks_follow_the_kernel_signatures(monkeypatch):
    """The in-file stand-ins used while a kernel file is missing: the scipy solver gives scipy's
    assignment in the kernel's layout, and a kernel backend they do not have is refused."""
    for key in (("kernels.ms_deform_attn", "ms_deform_attn"),
                ("kernels.linear_sum_assignment", "batched_linear_sum_assignment")):
        monkeypatch.setitem(detr._kernel_cache, key, None)                # as if absent
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(3, 6, 4, generator=g)
    num_cols = torch.tensor([4, 0, 2])
    assignment = detr.batched_linear_sum_assignment(cost, num_cols)
    assert assignment[1].tolist() == [-1] * 4 and assignment[2, 2:].tolist() == [-1, -1]
    for b, k in ((0, 4), (2, 2)):
        rows, cols = linear_sum_assignment(cost[b, :, :k].numpy())
        assert assignment[b, torch.as_tensor(cols)].tolist() == rows.tolist()
    with pytest.raises(RuntimeError, match="not there yet"):
        detr.batched_linear_sum_assignment(cost, num_cols, backend="triton")
    with pytest.raises(RuntimeError, match="not there yet"):
        detr.ms_deform_attn_dispatch(torch.zeros(1, 1, 1, 2), torch.tensor([[1, 1]]),
                                     torch.tensor([0]), torch.zeros(1, 1, 1, 1, 1, 2),
                                     torch.ones(1, 1, 1, 1, 1), ((1, 1),), backend="triton")
    torch.manual_seed(0)
    model = DeformableDETR("resnet18", num_classes=3, num_queries=5, **DEFORM_TINY)
    model(*_images())["pred_boxes"].sum().backward()                   # the fallback path runs


def test_msdeformattn_initial_offsets_are_the_official_ring():
    attn = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 1 points along +y (theta = π/2), point k at distance k + 1, the same on every level
    torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, :, 0], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 0], bias[:, 1])
    assert (attn.attention_weights.weight == 0).all() and (attn.sampling_offsets.weight == 0).all()


DEFORM_TINY = {"hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 3,
               "dim_feedforward": 64, "enc_n_points": 2, "dec_n_points": 2}


def test_deformable_detr_forward_backward_levels_and_names():
    torch.manual_seed(0)
    model = DeformableDETR("resnet18", num_classes=3, num_queries=12, train_backbone=False,
                           **DEFORM_TINY)
    images, mask = _images()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 12, 3) and out["pred_boxes"].shape == (2, 12, 4)
    assert out["hs"].shape == (3, 2, 12, 32) and len(out["aux_outputs"]) == 2
    assert out["memory"].shape == (2, 8 * 8 + 4 * 4 + 2 * 2 + 1, 32)    # C3, C4, C5, extra
    assert out["inter_references"].shape == (3, 2, 12, 2)               # no refinement: 2-d
    criterion = SetCriterion(3, HungarianMatcher(2, 5, 2, "focal"), class_loss="focal")
    losses, _, _ = criterion(out, _targets())
    criterion.total(losses).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    grads = [p.grad for p in model.transformer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # (level_embed's gradient is 0 at init: it reaches the loss only through sampling_offsets and
    # attention_weights, whose weights start at 0, as the official init)
    assert model.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    # shared heads without refinement (the official ModuleList of one module)
    assert model.class_embed[0] is model.class_embed[2] and model.bbox_embed[0] is model.bbox_embed[1]
    assert model.transformer.decoder.bbox_embed is None
    keys = model.state_dict().keys()
    for key in ("transformer.level_embed", "transformer.reference_points.weight",
                "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
                "transformer.encoder.layers.0.norm2.weight",
                "transformer.decoder.layers.2.cross_attn.value_proj.weight",
                "transformer.decoder.layers.0.self_attn.in_proj_weight",
                "transformer.decoder.layers.1.norm3.bias", "input_proj.0.0.weight",
                "input_proj.3.1.weight", "query_embed.weight", "class_embed.2.bias",
                "bbox_embed.0.layers.2.weight", "backbone.0.body.layer3.1.conv2.weight"):
        assert key in keys, key
    assert model.query_embed.weight.shape == (12, 64)
    assert model.input_proj[3][0].stride == (2, 2) and model.input_proj[3][0].in_channels == 512


def test_deformable_detr_box_refinement_path():
    torch.manual_seed(0)
    model = DeformableDETR("resnet18", num_classes=3, num_queries=12, with_box_refine=True,
                           **DEFORM_TINY).eval()
    with torch.no_grad():                       # break the zero init so refinement moves boxes
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(0, 0.1)
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    assert model.bbox_embed[0] is not model.bbox_embed[1]
    assert model.class_embed[0] is not model.class_embed[1]
    assert (model.bbox_embed[0].layers[-1].bias[2:] == -2).all()
    assert (model.bbox_embed[1].layers[-1].bias == 0).all()
    assert "transformer.decoder.bbox_embed.2.layers.0.weight" in model.state_dict()
    images, mask = _images()
    out = model(images, mask)
    per_layer = [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]
    refs = out["inter_references"]
    assert refs.shape == (3, 2, 12, 4)
    for lvl in range(3):
        # the decoder's refined box after layer l is layer l's prediction ...
        torch.testing.assert_close(refs[lvl], per_layer[lvl])
        # ... and layer l predicts a refinement of layer l-1's box in inverse-sigmoid space
        prev = per_layer[lvl - 1] if lvl else None
        delta = model.bbox_embed[lvl](out["hs"][lvl])
        if prev is None:
            expected = torch.cat([delta[..., :2] + detr.inverse_sigmoid(out["init_reference"]),
                                  delta[..., 2:]], -1).sigmoid()
        else:
            expected = (delta + detr.inverse_sigmoid(prev)).sigmoid()
        torch.testing.assert_close(per_layer[lvl], expected)
    assert not torch.allclose(per_layer[1], per_layer[2])
    # references are detached: the final boxes give no gradient to the first layer's box head
    model.train()
    out = model(images, mask)
    out["pred_boxes"].sum().backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.bbox_embed[0].parameters())
    assert model.bbox_embed[2].layers[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out = model(images, mask)
    out["aux_outputs"][0]["pred_boxes"].sum().backward()
    assert model.bbox_embed[0].layers[0].weight.grad.abs().sum() > 0


def test_deformable_decoder_respects_the_self_attention_mask():
    torch.manual_seed(0)
    model = DeformableDETR("resnet18", num_classes=3, num_queries=6, **DEFORM_TINY).eval()
    images, mask = _images()
    attn = _block_mask(6, 3, as_bool=True)
    a = model(images, mask, tgt_mask=attn)
    with torch.no_grad():
        model.query_embed.weight[3:] += torch.randn(3, 64)
    b = model(images, mask, tgt_mask=attn)
    torch.testing.assert_close(b["pred_boxes"][:, :3], a["pred_boxes"][:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(b["pred_boxes"][:, 3:], a["pred_boxes"][:, 3:])


def test_no_padding_mask_equals_an_all_valid_mask():
    torch.manual_seed(0)
    images, _ = _images()
    valid = torch.zeros(2, 64, 64, dtype=torch.bool)
    for model in (DETR("resnet18", num_classes=2, num_queries=5, **TINY).eval(),
                  DeformableDETR("resnet18", num_classes=3, num_queries=5, **DEFORM_TINY).eval()):
        torch.testing.assert_close(model(images)["pred_boxes"], model(images, valid)["pred_boxes"])


def _sync_free_solver(cost, num_cols, backend="auto"):
    """Stands in for the device solver (a valid, not optimal, assignment from device ops only)."""
    b, _, m = cost.shape
    cols = torch.arange(m, device=cost.device).expand(b, m)
    return torch.where(cols < num_cols[:, None], cols, torch.full_like(cols, -1))


def test_model_and_criterion_do_not_sync_with_a_device_solver(monkeypatch):
    """A whole step (forward, matching, losses, backward) reads nothing on the host, with the
    solver kernel (or, while it is missing, a stand-in: the scipy fallback does read)."""
    key = ("kernels.linear_sum_assignment", "batched_linear_sum_assignment")
    if detr._optional_kernel(*key) is None:
        monkeypatch.setitem(detr._kernel_cache, key, _sync_free_solver)
    images, mask = _images()
    targets = _targets()
    torch.manual_seed(0)
    for model, criterion in (
            (DETR("resnet18", num_classes=2, num_queries=6, **TINY),
             SetCriterion(2, HungarianMatcher())),
            (DeformableDETR("resnet18", num_classes=3, num_queries=6, with_box_refine=True,
                            **DEFORM_TINY),
             SetCriterion(3, HungarianMatcher(2, 5, 2, "focal"), class_loss="focal"))):
        with count_host_syncs() as syncs:
            losses, _, _ = criterion(model(images, mask), targets)
            criterion.total(losses).backward()
        assert not syncs, syncs.report()


def test_pad_targets():
    padded = pad_targets([torch.rand(2, 4), torch.rand(0, 4)], [torch.tensor([1, 1]),
                                                               torch.zeros(0, dtype=torch.long)],
                         max_targets=3)
    assert padded["boxes"].shape == (2, 3, 4) and padded["num_targets"].tolist() == [2, 0]
    assert padded["boxes"][1, 0].tolist() == [0.5, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="more than max_targets"):
        pad_targets([torch.rand(4, 4)], max_targets=3)
