"""SwAV and RegionCL-M against float64 transcriptions of their official code (spec/OFFICIAL.md §4,
§5): the swapped prediction with SwAV's own exp(s/ε) Sinkhorn, the prototype freeze and the queue;
RegionCL's box rule, the region swap, the canvas/paste pairing and both InfoNCE terms."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from engine.methods import StepContext, build_method
from engine.presets import PretrainConfig, preset_config


def tiny(method: str, backbone: str = "resnet18", **args) -> PretrainConfig:
    cfg = preset_config(f"{method}-demo-cpu")
    cfg.backbone = backbone
    if backbone == "vit":
        cfg.img_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads = 32, 8, 32, 2, 2
    cfg.method_args = dict(hidden=32, dim=16, **args)
    return cfg.validate()


def same_gradients(model, reference) -> None:
    """The fp32 method's gradients are the float64 transcription's: the same parameters get one
    (the key branch none), the whole gradient agrees in direction and size, and the heads' (few
    layers from the loss) agree entry by entry. (Deep in a ResNet with BatchNorm over batch 4 and
    a 1x1 map, fp32 and fp64 differ by up to 1% in a few tensors: that is conditioning.)"""
    ours, theirs = [], []
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (p64.grad is None), name
        if p.grad is not None:
            ours.append(p.grad.double().flatten())
            theirs.append(p64.grad.flatten())
            if not name.startswith("encoder."):
                scale = float(p64.grad.abs().max()) + 1e-12
                torch.testing.assert_close(p.grad.double(), p64.grad, rtol=0,
                                           atol=1e-3 * scale + 1e-7, msg=name)
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    assert float(F.cosine_similarity(ours, theirs, dim=0)) > 1 - 1e-5
    assert abs(float(ours.norm() / theirs.norm()) - 1) < 1e-3


# ---------------------------------------------------------------------------------------- SwAV
def official_sinkhorn(out: torch.Tensor, epsilon=0.05, iterations=3) -> torch.Tensor:
    """main_swav.py's distributed_sinkhorn for one process, in float64."""
    Q = torch.exp(out / epsilon).t()
    B, K = Q.shape[1], Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


def official_swav_loss(scores: torch.Tensor, bs: int, views: int, tau=0.1,
                       queue_scores=None) -> torch.Tensor:
    """main_swav.py's train loop body (crops_for_assign 0 1), float64."""
    loss = 0.0
    for i, a in enumerate([0, 1]):
        out = scores[bs * a:bs * (a + 1)].detach()
        if queue_scores is not None:
            out = torch.cat([queue_scores[i], out])
        q = official_sinkhorn(out)[-bs:]
        sub = 0.0
        for v in [v for v in range(views) if v != a]:
            x = scores[bs * v:bs * (v + 1)] / tau
            sub = sub - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + sub / (views - 1)
    return loss / 2


def multicrop(bs: int, large: int, small: int, generator=None):
    return ([torch.randn(bs, 3, large, large, generator=generator) for _ in range(2)]
            + [torch.randn(bs, 3, small, small, generator=generator) for _ in range(6)])


@pytest.mark.parametrize("backbone", ["resnet18", "vit"])
def test_swav_loss_and_gradients_match_the_official_code(backbone):
    torch.manual_seed(0)
    cfg = tiny("swav", backbone, prototypes=24, freeze_prototypes_steps=0)
    model = build_method(cfg).train()
    assert model.views.count == 8 and model.small_size == (16 if backbone == "vit" else 16)
    model.before_step(0.0)
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(24))
    crops = multicrop(4, 32, model.small_size)
    reference = copy.deepcopy(model).double()
    loss, _ = model({"crops": crops}, StepContext(step=5))
    loss.backward()

    z = reference.embed([c.double() for c in crops])
    scores = z @ reference.prototypes.weight.t()
    want = official_swav_loss(scores, 4, 8)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    same_gradients(model, reference)


def test_swav_prototypes_are_frozen_for_the_first_steps():
    torch.manual_seed(1)
    model = build_method(tiny("swav", prototypes=12, freeze_prototypes_steps=3)).train()
    crops = multicrop(4, 32, model.small_size)
    for step, frozen in ((2, True), (3, False)):
        model.zero_grad()
        loss, _ = model({"crops": crops}, StepContext(step=step))
        loss.backward()
        grad = model.prototypes.weight.grad
        assert grad is not None and bool((grad == 0).all()) == frozen
        assert model.head[0].weight.grad.abs().sum() > 0


def test_swav_queue_fills_from_its_start_step_then_prepends_its_scores():
    torch.manual_seed(2)
    bs = 4
    model = build_method(tiny("swav", prototypes=16, queue_length=8, queue_start_step=2,
                              freeze_prototypes_steps=0)).train()
    crops = multicrop(bs, 32, model.small_size)
    ok = torch.tensor(True)
    # before queue_start_step nothing is enqueued
    model({"crops": crops}, StepContext(step=1))
    model.after_step(StepContext(step=1, ok=ok))
    assert bool((model.queue == 0).all())
    # steps 2, 3 fill it (8 rows = 2 steps of 4); a skipped step writes nothing
    model({"crops": crops}, StepContext(step=2))
    model.after_step(StepContext(step=2, ok=torch.tensor(False)))
    assert bool((model.queue == 0).all()) and int(model.queue_ptr) == 0
    for step in (2, 3):   # other images than the step that uses the queue
        model({"crops": multicrop(bs, 32, model.small_size)}, StepContext(step=step))
        model.after_step(StepContext(step=step, ok=ok))
    assert not model.queue_in_use(3, bs) and model.queue_in_use(4, bs)
    assert bool((model.queue.norm(dim=2) > 0.99).all())
    # step 4 uses it: the queue's scores against the current prototypes come first in Sinkhorn
    model.before_step(0.0)
    reference = copy.deepcopy(model).double()
    loss, _ = model({"crops": crops}, StepContext(step=4))
    z = reference.embed([c.double() for c in crops])
    weight = reference.prototypes.weight
    queue_scores = [reference.queue[i] @ weight.t() for i in range(2)]
    want = official_swav_loss(z @ weight.t(), bs, 8, queue_scores=queue_scores)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    without = official_swav_loss(z @ weight.t(), bs, 8)
    assert abs(float(without) - float(want)) > 1e-4          # the queue changed the codes


# ------------------------------------------------------------------------------------ RegionCL
def official_box(rng: random.Random, W: int = 224, H: int = 224):
    """RegionSwapping as released (numpy randint(a, b) = randrange(a, b)), same draw order."""
    bw = 32 * rng.randrange(3, 6)
    bh = 32 * rng.randrange(3, 6)
    sx = min(round(rng.randrange(0, W) / 32) * 32, W - 1 - bw)
    sy = min(round(rng.randrange(0, H) / 32) * 32, H - 1 - bh)
    return sx, sy, bw, bh, int(sx / 32), int(sy / 32), bw // 32, bh // 32


def test_regioncl_box_rule_is_the_released_one_at_224():
    from engine.methods.regioncl import draw_swap_box

    clamped = 0
    for seed in range(200):
        box = draw_swap_box(random.Random(seed), 224, 7)
        assert (box.x, box.y, box.w, box.h, box.cell_x, box.cell_y, box.cells_w,
                box.cells_h) == official_box(random.Random(seed))
        assert box.w in (96, 128, 160) and box.h in (96, 128, 160)
        clamped += box.x % 32 != 0
        assert box.cell_x + box.cells_w <= 7 and box.cell_y + box.cells_h <= 7
    assert clamped > 0        # the misaligned (clamped) starts occur and keep the truncation


def test_regioncl_swap_pastes_the_reversed_batch():
    from engine.methods.regioncl import SwapBox, box_means, swap_regions

    images = torch.arange(5, dtype=torch.float32)[:, None, None, None].expand(5, 3, 8, 8)
    box = SwapBox(x=2, y=4, w=3, h=2, cell_x=1, cell_y=2, cells_w=1, cells_h=1)
    mixed = swap_regions(images, box)
    for i in range(5):
        inside = mixed[i, :, 4:6, 2:5]
        assert bool((inside == 4 - i).all())
        outside = mixed[i].clone()
        outside[:, 4:6, 2:5] = i
        assert bool((outside == i).all())
    features = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    paste, canvas = box_means(features, box)
    torch.testing.assert_close(paste, features[:, :, 2, 1])
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2, 1] = False
    torch.testing.assert_close(canvas, features[:, :, mask].mean(dim=2))


def official_regioncl_losses(q, k, canvas, paste, paste_shuf, canvas_shuf, queue, tau=0.2):
    def ce(logits):
        return F.cross_entropy(logits / tau, torch.zeros(len(logits), dtype=torch.long))
    inst = ce(torch.cat([(q * k).sum(1)[:, None], q @ queue.t()], 1))
    pos = torch.cat([(canvas * k).sum(1), (paste * k).sum(1)])[:, None]
    neg_c = torch.cat([(canvas * paste_shuf.detach()).sum(1)[:, None], canvas @ queue.t()], 1)
    neg_p = torch.cat([(paste * canvas_shuf.detach()).sum(1)[:, None], paste @ queue.t()], 1)
    region = ce(torch.cat([pos, torch.cat([neg_c, neg_p])], 1))
    return inst, region


@pytest.mark.parametrize("backbone", ["resnet18", "vit"])
def test_regioncl_loss_and_gradients_match_the_official_code(backbone):
    from engine.methods.regioncl import swap_regions

    torch.manual_seed(3)
    model = build_method(tiny("regioncl", backbone, queue_length=32)).train()
    batch = {"view1": torch.randn(4, 3, 32, 32), "view2": torch.randn(4, 3, 32, 32)}
    ctx = StepContext(step=7, seed=3)
    reference = copy.deepcopy(model).double()
    loss, figures = model(batch, ctx)
    loss.backward()

    box = model.swap_box(ctx)
    v1, v2 = batch["view1"].double(), batch["view2"].double()
    q = reference.embed(reference.encoder, reference.head, v1)
    regions = reference.region_queries(swap_regions(v1, box), box)
    with torch.no_grad():
        k = reference.embed(reference.target_encoder, reference.target_head, v2)
    inst, region = official_regioncl_losses(q, k, regions["canvas"], regions["paste"],
                                            regions["paste_shuf"], regions["canvas_shuf"],
                                            reference.queue.keys)
    (inst + region).backward()
    torch.testing.assert_close(figures["loss_instance"].double(), inst, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(figures["loss_region"].double(), region, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), inst + region, rtol=1e-4, atol=1e-5)
    same_gradients(model, reference)
    # the paste query of image i holds image i's content: it sits in mixed image B-1-i
    assert torch.equal(regions["paste"], regions["paste_shuf"].flip(0))


def test_regioncl_enqueues_only_the_keys_and_only_if_ok():
    torch.manual_seed(4)
    model = build_method(tiny("regioncl", queue_length=16)).train()
    batch = {"view1": torch.randn(4, 3, 32, 32), "view2": torch.randn(4, 3, 32, 32)}
    before = model.queue.keys.clone()
    model(batch, StepContext(step=0))
    model.after_step(StepContext(step=0, ok=torch.tensor(False)))
    assert torch.equal(model.queue.keys, before)
    model(batch, StepContext(step=0))
    model.after_step(StepContext(step=0, ok=torch.tensor(True)))
    assert int(model.queue.ptr) == 4 and not torch.equal(model.queue.keys[:4], before[:4])
    assert torch.equal(model.queue.keys[4:], before[4:])


# ------------------------------------------------------------------ SwAV across two gloo ranks
def _swav_rank(rank, world_size, port, state, crops, result_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = build_method(tiny("swav", prototypes=24, freeze_prototypes_steps=0))
        model.load_state_dict(state)
        model.eval()                          # BatchNorm per image: the split cannot matter
        mine = [c.chunk(world_size)[rank] for c in crops]
        loss, _ = model({"crops": mine}, StepContext(step=3, rank=rank, world_size=world_size))
        torch.save(loss.detach(), f"{result_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_swav_codes_are_balanced_over_every_rank(tmp_path):
    """Sinkhorn's sums are all-reduced inside kernels.sinkhorn: the mean of two ranks' losses on
    half the batch each is the one-process loss on the whole batch (BatchNorm in eval mode, so
    only the all-reduce can make them equal) -- and differs from two independent halves."""
    import socket

    from tests.spawn import spawn_ranks

    torch.manual_seed(5)
    model = build_method(tiny("swav", prototypes=24, freeze_prototypes_steps=0))
    model.before_step(0.0)
    model.eval()
    crops = multicrop(8, 32, model.small_size)
    whole, _ = model({"crops": crops}, StepContext(step=3))
    halves = [model({"crops": [c.chunk(2)[r] for c in crops]}, StepContext(step=3))[0]
              for r in range(2)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_swav_rank, (2, port, model.state_dict(), crops, str(tmp_path)), 2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, whole.detach(), rtol=1e-5, atol=1e-6)
    assert abs(float((sum(halves) / 2 - whole).detach())) > 1e-4   # no all-reduce: different
