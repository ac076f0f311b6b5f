"""CCOP (engine/methods/ccop.py) against spec/OFFICIAL.md §8, read line by line: the three losses
recomputed in float64 from the method's own embeddings as the release computes them, the jitter
and its IoU validity, the hardest-positive choice, the box filter, the level assignment and the
multi-level RoIAlign, the RoI queue write, and the step: no host sync, no NaN with nothing to
contrast, bit-exact resume. Tiny shapes (ResNet-18 with the CIFAR stem at 16-32 px, or a one-block
ViT), reference kernels."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from engine.methods import StepContext, build_method
from engine.methods.ccop import (assign_levels, enqueue_kept, hardest_positive, intra_image_loss,
                                 jitter_boxes, jitter_generator, jitter_invalid, roi_features)
from engine.models.moco import KeyQueue
from engine.presets import PretrainConfig, preset_config
from engine.trainer import StepSession, make_optimizer, optimisation_step
from pipelines.datasets import DataError
from pipelines.geometry import boxes_in_view

from host_sync import count_host_syncs

REFERENCE = {"queue_infonce": "reference", "roi_align": "reference", "dense_match": "reference"}
SMALL = dict(queue_length=64, hidden=32, dim=16, fpn_channels=16, max_boxes=6)


def config(backbone: str = "resnet18", img_size: int = 32, batch_size: int = 4, **args
           ) -> PretrainConfig:
    values = preset_config("ccop-demo-cpu").to_dict()
    values.update(img_size=img_size, batch_size=batch_size, precision="fp32", preset="test-ccop",
                  clip_grad=0.0, method_args={**SMALL, **args})
    if backbone == "vit":
        values.update(backbone="vit", patch_size=8, dim=32, depth=1, heads=2)
    return PretrainConfig.from_dict(values).validate()


def make_batch(batch_size: int = 4, size: int = 32, boxes: int = 6, seed: int = 0) -> dict:
    """Two views of random images with random proposals of a 64x80 original, mapped into each
    view by geometry.boxes_in_view (view 2 a smaller, flipped crop), as the loaders give them."""
    g = torch.Generator().manual_seed(seed)
    height, width = 64.0, 80.0
    corner = torch.rand(batch_size, boxes, 2, generator=g) * torch.tensor([width, height]) * 0.6
    extent = (0.2 + 0.6 * torch.rand(batch_size, boxes, 2, generator=g)) * torch.tensor(
        [width, height]) * 0.5
    original = torch.cat([corner, corner + extent], dim=-1)
    crops = torch.tensor([[0.0, 0.0, height, width], [6.0, 8.0, height - 14, width - 18]])
    crops = crops.expand(batch_size, 2, 4).contiguous()
    flips = torch.tensor([False, True]).expand(batch_size, 2).contiguous()
    mapped, visible = boxes_in_view(original[:, None].expand(batch_size, 2, boxes, 4), crops,
                                    flips, size)
    return dict(view1=torch.randn(batch_size, 3, size, size, generator=g),
                view2=torch.randn(batch_size, 3, size, size, generator=g),
                boxes=crops, flips=flips, image_size=torch.tensor([[64, 80]] * batch_size),
                proposals=mapped, proposal_visible=visible)


def model_for(cfg: PretrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(cfg).train()


def ctx(step: int = 0, micro: int = 0) -> StepContext:
    return StepContext(step=step, micro=micro, backends=REFERENCE, seed=3)


# ------------------------------------------------------------------ the official loss, float64

def official_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """get_iou_mat / get_jitter_iou_mat of the release (no guard: 0/0 is NaN there too)."""
    right, left = torch.minimum(a[..., 2], b[..., 2]), torch.maximum(a[..., 0], b[..., 0])
    bottom, top = torch.minimum(a[..., 3], b[..., 3]), torch.maximum(a[..., 1], b[..., 1])
    inter = (right - left).clamp(min=0) * (bottom - top).clamp(min=0)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def official_losses(out: dict, img_queue, roi_queue, tau: float = 0.2, margin: float = 0.4):
    """OFFICIAL.md §8 on the kept boxes only (the release's loader drops the others)."""
    d = lambda t: t.detach().double()  # noqa: E731
    img_q, img_k = d(out["img_q"]), d(out["img_k"])
    logits = torch.cat([(img_q * img_k).sum(1, keepdim=True), img_q @ d(img_queue).T], 1) / tau
    loss_img = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    keep = out["keep"].reshape(-1)
    rq, rk = d(out["roi_q"])[keep], d(out["roi_k"])[keep]
    similarity = torch.einsum("nc,njc->nj", rq, rk) + out["invalid"][keep].double() * 5.0
    chosen = similarity.argmin(1)
    positive = rk[torch.arange(len(rk)), chosen]
    logits = torch.cat([(rq * positive).sum(1, keepdim=True), rq @ d(roi_queue).T], 1) / tau
    loss_roi = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    triplets, valids = [], []
    batch_size, slots = out["keep"].shape
    roi_q = d(out["roi_q"]).view(batch_size, slots, -1)
    roi0_k = d(out["roi0_k"]).view(batch_size, slots, -1)
    for b in range(batch_size):
        mine = out["keep"][b]
        x = roi_q[b][mine] @ roi0_k[b][mine].T
        triplets.append(F.relu(x - x.diag()[None, :] + margin).reshape(-1))
        boxes = d(out["boxes_k"][b][mine])
        valids.append((official_iou(boxes[:, None], boxes[None, :]) < 0.05).reshape(-1))
    loss_intra = torch.cat(triplets)[torch.cat(valids)].mean()
    return dict(loss_img=loss_img, loss_roi=loss_roi, loss_intra=loss_intra, chosen=chosen,
                positive=positive)


@pytest.mark.parametrize("backbone", ["resnet18", "vit"])
def test_losses_match_the_official_formulas_in_float64(backbone):
    cfg = config(backbone)
    model = model_for(cfg)
    step = 7
    c = ctx(step)
    out = model.compute(make_batch(), c)
    keep = out["keep"]
    assert keep.sum() >= 8 and (~keep).any()         # kept and dropped boxes both present
    losses = model.losses(out, c)
    reference = official_losses(out, model.img_queue.keys, model.roi_queue.keys)
    for name in ("loss_img", "loss_roi", "loss_intra"):
        torch.testing.assert_close(losses[name].double(), reference[name], rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert reference["loss_intra"] > 0
    # the hardest valid positive: the same copies as argmin in float64
    flat_keep = keep.reshape(-1)
    assert torch.equal(out["chosen"][flat_keep], reference["chosen"])
    torch.testing.assert_close(out["positive"][flat_keep].double(), reference["positive"])

    # the jitter: the release's aug_boxes formula on the same U[0, 1) draws, float64
    iou_thr, mag_xy, mag_wh = model.curriculum(step)
    total = 60   # the demo preset's --steps: the curriculum's T
    r = (step + 1) / total
    assert (iou_thr, mag_xy, mag_wh) == pytest.approx((0.8 - 0.4 * r, 0.15 + 0.45 * r,
                                                       0.35 + 1.05 * r))
    rows = keep.numel()
    u = torch.rand((rows, 10, 4), generator=jitter_generator(3, 0, step, 0, torch.device("cpu")))
    boxes = out["boxes_k"].reshape(rows, 4).double()
    x1, y1, x2, y2 = boxes.unbind(-1)
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    t_xy, t_wh = (u[..., :2].double() - 0.5) * mag_xy, (u[..., 2:].double() - 0.5) * mag_wh
    jx, jy = w[:, None] * t_xy[..., 0] + cx[:, None], h[:, None] * t_xy[..., 1] + cy[:, None]
    jw, jh = torch.exp(t_wh[..., 0]) * w[:, None], torch.exp(t_wh[..., 1]) * h[:, None]
    expected = torch.stack([(jx - jw / 2).clamp(0, 32), (jy - jh / 2).clamp(0, 32),
                            (jx + jw / 2).clamp(0, 32), (jy + jh / 2).clamp(0, 32)], -1)
    expected = torch.cat([expected, boxes[:, None]], 1)
    torch.testing.assert_close(out["jittered"].double(), expected, rtol=1e-5, atol=1e-4)
    invalid = official_iou(boxes[:, None], expected) < iou_thr
    assert torch.equal(out["invalid"][flat_keep], invalid[flat_keep])
    assert not out["invalid"][flat_keep, 10].any()         # the original box is always valid


def test_hardest_positive_is_the_least_similar_valid_copy():
    query = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), dim=1)
    angles = torch.tensor([[0.1, 1.0, 2.5, 0.0], [0.1, 1.0, 2.5, 0.0], [0.1, 1.0, 2.5, 0.0]])
    candidates = torch.stack([angles.cos(), angles.sin()], -1)        # cosines 0.995, 0.54, -0.8, 1
    invalid = torch.tensor([[False, False, False, False],               # -> the lowest cosine
                            [False, False, True, False],                # -> skip the invalid one
                            [True, True, True, True]])                  # all invalid: lowest s + 5
    positive, index = hardest_positive(query, candidates, invalid)
    assert index.tolist() == [2, 1, 2]
    torch.testing.assert_close(positive, candidates[torch.arange(3), index])


def test_jitter_validity_is_iou_below_the_threshold():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    copies = torch.tensor([[[0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 7.9], [0.0, 0.0, 10.0, 10.0],
                            [20.0, 20.0, 30.0, 30.0]]])            # IoU 0.8, 0.79, 1, 0
    assert jitter_invalid(box, copies, 0.8).tolist() == [[False, True, False, True]]
    # zero magnitude: every copy is the box itself (and the original is appended unclamped)
    same = jitter_boxes(box, torch.rand(1, 5, 4), 0.0, 0.0, 8.0, 8.0)
    assert same.shape == (1, 6, 4)
    assert torch.equal(same[0, :5], torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 5))   # clamped
    assert torch.equal(same[0, 5], box[0])


def test_boxes_are_kept_when_visible_and_large_in_both_views():
    model = model_for(config("vit"))
    # S = 224: area > 144 and visible > 0.6 in BOTH views (strict, as the release)
    boxes = torch.tensor([[0, 0, 12, 12], [0, 0, 12, 12.1], [0, 0, 20, 20], [0, 0, 20, 20],
                          [0, 0, 20, 20], [0, 0, 0, 0]], dtype=torch.float32)
    visible = torch.tensor([1.0, 1.0, 0.6, 0.61, 1.0, 0.0])
    proposals = boxes[None, None].expand(1, 2, 6, 4).clone()
    seen = visible[None, None].expand(1, 2, 6).clone()
    seen[0, 1, 4] = 0.5                                   # fine in view 1, mostly cut in view 2
    batch = dict(proposals=proposals, proposal_visible=seen)
    _, _, keep = model.select_boxes(batch, 224, 224, torch.device("cpu"))
    assert keep.tolist() == [[False, True, False, True, False, False]]
    # at 32 px the area floor is 144 (32/224)^2 = 2.94 px
    small = dict(proposals=torch.tensor([[0, 0, 1.7, 1.7], [0, 0, 1.8, 1.8]])[None, None]
                 .expand(1, 2, 2, 4), proposal_visible=torch.ones(1, 2, 2))
    assert model.select_boxes(small, 32, 32, torch.device("cpu"))[2].tolist() == [[False, True]]
    # only max_boxes slots are read
    assert model.select_boxes(dict(proposals=torch.zeros(2, 2, 9, 4),
                                   proposal_visible=torch.ones(2, 2, 9)),
                              32, 32, torch.device("cpu"))[2].shape == (2, 6)
    with pytest.raises(DataError, match="python -m engine.proposals --data DIR"):
        model(dict(view1=torch.zeros(2, 3, 32, 32), view2=torch.zeros(2, 3, 32, 32)), ctx())


def test_level_assignment_and_multi_level_roi_align():
    from kernels import roi_align

    sides = torch.tensor([10.0, 48.0, 48.5, 96.0, 97.0, 192.0, 193.0, 224.0, 230.0])
    boxes = torch.stack([torch.zeros(9), torch.zeros(9), sides, sides], 1)
    assert assign_levels(boxes, 224).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]
    assert assign_levels(boxes / 2, 112).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]   # scaled
    # rectangular: sqrt(area)
    assert assign_levels(torch.tensor([[0.0, 0.0, 96.0, 24.0]]), 224).tolist() == [0]  # sqrt 48
    # the masked sum over levels == RoIAlign of each box on its own level alone
    g = torch.Generator().manual_seed(0)
    strides = (4.0, 8.0, 16.0, 32.0)
    maps = [torch.randn(2, 3, 224 // int(s), 224 // int(s), generator=g) for s in strides]
    side = torch.tensor([6.0, 30, 47, 60, 90, 110, 150, 180, 195, 205, 215, 224])
    wh = side[:, None] * torch.tensor([[1.0, 1.0]] * 6 + [[1.2, 0.8]] * 6)
    xy = torch.rand(12, 2, generator=g) * (224 - wh).clamp(min=0)
    rois = torch.cat([xy, (xy + wh).clamp(max=224)], 1)
    image = torch.arange(12) % 2
    got = roi_features(maps, strides, rois, image, 224.0, 7, "reference")
    levels = assign_levels(rois, 224.0)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    for k in range(12):
        level = int(levels[k])
        alone = roi_align(maps[level], torch.cat([image[k:k + 1, None].float(), rois[k:k + 1]], 1),
                          7, spatial_scale=1 / strides[level], sampling_ratio=0, aligned=True,
                          backend="reference")
        torch.testing.assert_close(got[k:k + 1], alone, rtol=1e-6, atol=1e-6)
    for level, feature in enumerate(maps):   # the empty box stands for "not this level": zeros
        nothing = roi_align(feature, torch.zeros(3, 5), 7, spatial_scale=1 / strides[level],
                            sampling_ratio=0, aligned=True, backend="reference")
        assert torch.equal(nothing, torch.zeros_like(nothing))


def test_intra_loss_is_zero_without_a_valid_pair():
    query = F.normalize(torch.randn(2, 3, 8), dim=2).requires_grad_()
    key = F.normalize(torch.randn(2, 3, 8), dim=2)
    overlapping = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0],
                                [0.0, 0.0, 9.0, 9.0]]).expand(2, 3, 4)
    loss, pairs = intra_image_loss(query, key, overlapping, torch.ones(2, 3, dtype=torch.bool),
                                   0.4, 0.05)
    assert loss.item() == 0.0 and pairs.item() == 0
    loss.backward()
    assert torch.equal(query.grad, torch.zeros_like(query))
    # far-apart boxes: every ordered pair counts
    apart = torch.tensor([[0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 15.0, 15.0],
                          [20.0, 0.0, 25.0, 5.0]]).expand(2, 3, 4)
    _, pairs = intra_image_loss(query, key, apart, torch.ones(2, 3, dtype=torch.bool), 0.4, 0.05)
    assert pairs.item() == 2 * 6


def test_no_nan_when_no_box_is_kept():
    model = model_for(config("vit"))
    batch = make_batch()
    batch["proposal_visible"] = torch.zeros_like(batch["proposal_visible"])   # nothing kept
    roi_queue = model.roi_queue.keys.clone()
    c = ctx()
    loss, figures = model(batch, c)
    assert torch.isfinite(loss)
    assert figures["loss_roi"] == 0 and figures["loss_intra"] == 0
    assert figures["boxes_per_image"] == 0 and figures["loss_img"] > 0
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    model.after_step(c)
    assert torch.equal(model.roi_queue.keys, roi_queue) and int(model.roi_queue.ptr) == 0
    assert int(model.img_queue.ptr) == 4


def python_enqueue(keys: torch.Tensor, ptr: int, new: torch.Tensor, keep: torch.Tensor):
    keys = keys.clone()
    for row in new[keep]:
        keys[ptr] = row
        ptr = (ptr + 1) % len(keys)
    return keys, ptr


@pytest.mark.parametrize("length,start,rows", [(10, 3, 6), (10, 8, 9), (6, 4, 20), (8, 0, 5)])
def test_enqueue_kept_writes_the_kept_keys_in_order_wrapping(length, start, rows):
    g = torch.Generator().manual_seed(length + rows)
    queue = KeyQueue(length, 4)
    queue.ptr.fill_(start)
    keys = torch.randn(rows, 4, generator=g)
    keep = torch.rand(rows, generator=g) > 0.4
    expected, ptr = python_enqueue(queue.keys, start, keys, keep)
    enqueue_kept(queue, keys, keep)
    assert torch.equal(queue.keys, expected) and int(queue.ptr) == ptr
    before = queue.keys.clone()
    enqueue_kept(queue, keys, torch.zeros(rows, dtype=torch.bool))            # nothing kept
    enqueue_kept(queue, keys, keep, ok=torch.tensor(False))                   # a skipped step
    assert torch.equal(queue.keys, before) and int(queue.ptr) == ptr


def session(cfg: PretrainConfig, seed: int = 0) -> StepSession:
    model = model_for(cfg, seed)
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    return StepSession(cfg, model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                       torch.device("cpu"), None, REFERENCE)


def test_optimisation_step_reads_no_device_value():
    values = config("resnet18", img_size=16).to_dict()
    values.update(accum=2)
    cfg = PretrainConfig.from_dict(values).validate()
    s = session(cfg)
    batches = [make_batch(size=16, seed=k) for k in range(4)]
    optimisation_step(s, batches[:2], 0, 0.99)              # lazy state made here
    with count_host_syncs() as syncs:
        loss, grad_norm, figures = optimisation_step(s, batches[2:], 1, 0.99)
    assert not syncs, syncs.report()
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
    kept = sum(int(b["proposal_visible"].gt(0.6).all(1).sum()) for b in batches)
    assert kept > 0 and 0 < int(s.method.roi_queue.ptr) <= kept
    assert int(s.method.img_queue.ptr) == 16


def test_resume_from_a_state_dict_is_bit_exact():
    cfg = config("resnet18", img_size=16)
    batches = [[make_batch(size=16, seed=k)] for k in range(3)]
    torch.manual_seed(11)
    a = session(cfg)
    optimisation_step(a, batches[0], 0, 0.99)
    saved = (copy.deepcopy(a.method.state_dict()), copy.deepcopy(a.optimizer.state_dict()),
             torch.get_rng_state())
    for step in (1, 2):
        optimisation_step(a, batches[step], step, 0.99)

    b = session(cfg, seed=5)                                   # a different initialisation
    b.method.load_state_dict(saved[0])
    b.optimizer.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])                              # dropout draws (the trainer's rng)
    for step in (1, 2):
        optimisation_step(b, batches[step], step, 0.99)
    final_a, final_b = a.method.state_dict(), b.method.state_dict()
    for name in ("img_queue.keys", "img_queue.ptr", "roi_queue.keys", "roi_queue.ptr"):
        assert torch.equal(final_a[name], final_b[name]), name
    assert int(final_a["roi_queue.ptr"]) > 0
    for name, value in final_a.items():
        assert torch.equal(value, final_b[name]), name


def test_pretrain_cli_three_steps(tmp_path, capsys):
    """`--method ccop --steps 3` through engine.pretrain.main on two embedded photos, with their
    selective-search proposals computed into the folder's default cache."""
    pytest.importorskip("cv2")
    from engine.pretrain import main
    from pipelines.datasets import sample_photos

    data = tmp_path / "photos"
    data.mkdir()
    for path in sample_photos().paths[:8]:
        shutil.copy(path, data)
    from engine.proposals import main as compute_proposals
    assert compute_proposals(["--data", str(data), "--quiet"]) == 0
    out = tmp_path / "run"
    code = main(["--method", "ccop", "--steps", "3", "--batch-size", "4", "--workers", "0",
                 "--log-every", "1", "--no-fused", "--data", str(data),
                 "--out", str(out), "--method-arg", "queue_length=64", "--method-arg",
                 "hidden=32", "--method-arg", "dim=16", "--method-arg", "fpn_channels=16",
                 "--method-arg", "max_boxes=8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "done: step 3/3" in captured.out + captured.err
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert int(saved["model"]["img_queue.ptr"]) == 12
    assert int(saved["model"]["roi_queue.ptr"]) > 0
