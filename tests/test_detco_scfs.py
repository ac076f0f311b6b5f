"""DetCo and SCFS: the losses against float64 references written here, the jigsaw, the queues and
centres, the CLI, resume and the no-host-sync rule.

References follow the methods' docstrings (DetCo: DENSE.md §7, no released code; SCFS: the
official skyoux/scfs `models/scfs.py` / `main_scfs.py` with local crops, and the two-view variant
its docstring describes). They
call the method's networks (a float64 deep copy: backbone blocks, heads) but never its loss code,
`jigsaw`, `dense_levels`, `search` or the queue kernel: patches, levels, the feature search,
InfoNCE and DINO's cross-entropy are recomputed here with plain torch.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from engine.methods import build_method
from engine.methods.base import StepContext
from engine.methods.detco import jigsaw, jigsaw_side
from engine.models.backbones import dense_levels, dense_map, vit_level_blocks
from engine.models.resnet import build_resnet
from engine.models.vit import VisionTransformer
from engine.presets import PRESETS, PretrainConfig, preset_config
from engine.pretrain import main
from engine.trainer import RunOptions, StepSession, make_optimizer, optimisation_step, pretrain
from kernels import absolute_sincos_table

from host_sync import count_host_syncs

DETCO_ARGS = {"queue_length": 64, "hidden": 32, "dim": 16}
SCFS_ARGS = {"dim": 64, "hidden": 32, "bottleneck": 16, "layer_dim": 16, "layer_hidden": 24,
             "layer_bottleneck": 8}
# The demo preset's method_args that SCFS (DINO-based: no queue) asks the lead to set.
SCFS_DEMO_ARGS = {"dim": 4096, "hidden": 512, "layer_hidden": 512, "layer_bottleneck": 64,
                  "teacher_temp_warmup_steps": 20}


def make(method: str, args: dict, backbone: str = "vit", depth: int = 4, seed: int = 0):
    if backbone == "vit":
        cfg = PretrainConfig(method=method, backbone="vit", img_size=32, patch_size=8, dim=32,
                             depth=depth, heads=2, batch_size=4, method_args=args)
    else:
        cfg = PretrainConfig(method=method, backbone=backbone, cifar_stem=True, img_size=32,
                             batch_size=4, method_args=args)
    torch.manual_seed(seed)
    model = build_method(cfg).train()
    params = dict(model.named_parameters())
    with torch.no_grad():   # targets as after some EMA steps, so online/target mix-ups show
        for name, p in params.items():
            if name.startswith("target_") and params[name[len("target_"):]].requires_grad:
                p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
    return model


def views(batch: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.randn(batch, 3, 32, 32, generator=g),
            "view2": torch.randn(batch, 3, 32, 32, generator=g)}


def l2n(x, dim=1):
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def infonce(query, positive, queue_rows, tau):
    logits = torch.cat([(query * positive).sum(1, keepdim=True), query @ queue_rows.t()], 1) / tau
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long))


def rel(actual, expected) -> float:
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).abs().max()
                 / expected.abs().max().clamp_min(1e-30))


def check_gradients(model, ref, rtol=2e-3, zero=()):
    """Online parameters: the reference's gradient (relative to the tensor's largest entry);
    targets and buffers: none; `zero`: parameters whose gradient must be exactly zero."""
    ref_params = dict(ref.named_parameters())
    overall = max(float(p.grad.abs().max()) for p in ref_params.values() if p.grad is not None)
    compared = 0
    for name, p in model.named_parameters():
        if name.startswith("target_") or not p.requires_grad:
            assert p.grad is None, f"{name} has a gradient"
            continue
        if name in zero:
            assert p.grad is not None and not p.grad.any(), f"{name}: gradient should be zero"
            continue
        r = ref_params[name].grad
        assert p.grad is not None and r is not None, f"{name}: gradient missing"
        scale = float(r.abs().max())      # (a bias before a BatchNorm has ~0 gradient)
        err = float((p.grad.double() - r).abs().max())
        assert err <= rtol * scale + 1e-6 * overall, f"{name}: {err:.3e} vs |ref| {scale:.3e}"
        compared += 1
    for name, buf in model.named_buffers():
        assert not buf.requires_grad, name
    assert compared >= 8
    return compared


# ------------------------------------------------------------------------------ levels, jigsaw

def reference_levels(encoder, images, levels):
    """Our own level maps: ViT tokens after blocks ceil(k·depth/4) (k = 2..5 for c2..c5 -> 1..4),
    cls dropped, any grid (sin-cos positions of that grid); ResNet: layer1..layer4 outputs."""
    if not isinstance(encoder, VisionTransformer):
        out, x = {}, encoder.stem(images)
        for level, stage in zip(("c2", "c3", "c4", "c5"), encoder.stages):
            x = stage(x)
            out[level] = x
        return {lv: out[lv] for lv in levels}
    depth, grid = len(encoder.blocks), images.shape[-1] // encoder.patch_size
    after = {f"c{k + 1}": -(-k * depth // 4) for k in range(1, 5)}       # 1-based block numbers
    x = encoder.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = x + absolute_sincos_table(grid, encoder.dim).to(x)
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1).to(x), x], 1)
    maps = []
    for block in encoder.blocks:
        x = block(x)
        maps.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, grid, grid))
    return {lv: maps[after[lv] - 1] for lv in levels}


def test_levels_of_both_backbones():
    assert vit_level_blocks(12) == {"c2": 2, "c3": 5, "c4": 8, "c5": 11}
    assert vit_level_blocks(1) == {"c2": 0, "c3": 0, "c4": 0, "c5": 0}
    assert vit_level_blocks(6) == {"c2": 1, "c3": 2, "c4": 4, "c5": 5}
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 32, 4, 2)
    x = torch.randn(2, 3, 32, 32)
    got = dense_levels(vit, x)
    ref = reference_levels(vit, x, ("c2", "c3", "c4", "c5"))
    for level in ref:
        torch.testing.assert_close(got[level], ref[level], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["c5"], dense_map(vit, x), rtol=1e-5, atol=1e-5)
    small = dense_levels(vit, x[..., :16, :16], ("c3",))["c3"]           # another grid
    torch.testing.assert_close(small, reference_levels(vit, x[..., :16, :16], ("c3",))["c3"],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown feature level"):
        dense_levels(vit, x, ("c6",))
    resnet = build_resnet("resnet18", cifar_stem=True).eval()
    got = dense_levels(resnet, x, ("c2", "c4"))
    ref = reference_levels(resnet, x, ("c2", "c4"))
    assert list(got) == ["c2", "c4"] and got["c2"].shape == (2, 64, 32, 32)
    for level in ref:
        torch.testing.assert_close(got[level], ref[level])


def test_jigsaw_side_rule():
    assert jigsaw_side(224, None) == 64 and jigsaw_side(224, 16) == 64
    assert jigsaw_side(32, None) == 16 and jigsaw_side(32, 8) == 16
    assert jigsaw_side(96, 16) == 32 and jigsaw_side(64, None) == 18
    assert jigsaw_side(224, None, requested=40) == 40 and jigsaw_side(224, 16, requested=44) == 48


@pytest.mark.parametrize("size,side", [(32, 16), (48, 16), (33, 20), (224, 64)])
def test_jigsaw_patch_is_its_third_of_the_view_resized(size, side):
    """A coordinate image (channel 0: column, 1: row, 2: image index): pixel (r, c) of cell (i, j)
    of image b holds the source coordinate j·W/3 + (c+½)·(W/3)/P − ½ (rows alike), clamped to the
    image: bilinear resampling of a linear ramp is exact."""
    batch = 2
    cols = torch.arange(size, dtype=torch.float64).expand(size, size)
    image = torch.stack([cols, cols.t(), torch.zeros(size, size, dtype=torch.float64)])
    images = image.expand(batch, -1, -1, -1).clone()
    images[:, 2] = torch.arange(batch, dtype=torch.float64)[:, None, None] * 100
    patches = jigsaw(images, side)
    assert patches.shape == (batch * 9, 3, side, side)
    third = size / 3
    offsets = (torch.arange(side, dtype=torch.float64) + 0.5) * third / side - 0.5
    for b in range(batch):
        for i in range(3):
            for j in range(3):
                patch = patches[b * 9 + i * 3 + j]
                x = (j * third + offsets).clamp(0, size - 1)
                y = (i * third + offsets).clamp(0, size - 1)
                torch.testing.assert_close(patch[0], x.expand(side, side), rtol=0, atol=1e-9)
                torch.testing.assert_close(patch[1], y[:, None].expand(side, side), rtol=0,
                                           atol=1e-9)
                assert ((patch[2] - 100 * b).abs() < 1e-9).all()


def test_jigsaw_of_an_image_equals_resized_slices():
    """Sides that are multiples of 3: each patch is F.interpolate of its slice (exact thirds)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 48, 48, generator=g, dtype=torch.float64)
    for side, antialias in ((16, False), (8, False)):
        patches = jigsaw(images, side).reshape(3, 9, 3, side, side)
        for i in range(3):
            for j in range(3):
                part = images[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
                ref = F.interpolate(part, size=side, mode="bilinear", align_corners=False,
                                    antialias=antialias)
                torch.testing.assert_close(patches[:, i * 3 + j], ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- DetCo

def detco_reference(ref, batch, side):
    """Per level: global/local queries (view 1) and keys (view 2, no grad); 12 InfoNCE terms."""
    levels = ("c2", "c3", "c4", "c5")
    height = batch["view1"].shape[-1]

    def patches(images):          # our own crop + bilinear resize (border clamp), row-major cells
        third = height / 3
        offsets = (torch.arange(side, dtype=torch.float64) + 0.5) * third / side - 0.5
        out = []
        for i in range(3):
            ys = (i * third + offsets).clamp(0, height - 1)
            y0 = ys.floor().long()
            y1, wy = (y0 + 1).clamp(max=height - 1), (ys - y0)[:, None]
            for j in range(3):
                xs = (j * third + offsets).clamp(0, height - 1)
                x0 = xs.floor().long()
                x1, wx = (x0 + 1).clamp(max=height - 1), (xs - x0)[None, :]

                def at(r, c):
                    return images[:, :, r][:, :, :, c]
                out.append((1 - wy) * (1 - wx) * at(y0, x0) + (1 - wy) * wx * at(y0, x1)
                           + wy * (1 - wx) * at(y1, x0) + wy * wx * at(y1, x1))
        return torch.stack(out, 1).flatten(0, 1)                          # (B·9, C, P, P)

    def embed(encoder, heads, images):
        b = images.shape[0]
        whole = reference_levels(encoder, images, levels)
        parts = reference_levels(encoder, patches(images), levels)
        g = [l2n(heads.global_heads[i](whole[lv].mean((2, 3)))) for i, lv in enumerate(levels)]
        loc = [l2n(heads.local_heads[i](parts[lv].mean((2, 3)).reshape(b, -1)))
               for i, lv in enumerate(levels)]
        return g, loc

    b64 = {k: v.double() for k, v in batch.items()}
    q_g, q_l = embed(ref.encoder, ref.heads, b64["view1"])
    with torch.no_grad():
        k_g, k_l = embed(ref.target_encoder, ref.target_heads, b64["view2"])
    weights = (0.1, 0.4, 0.7, 1.0)
    total, per_level = 0.0, {}
    for i, level in enumerate(levels):
        gg = infonce(q_g[i], k_g[i], ref.queues_global[i].keys, 0.2)
        ll = infonce(q_l[i], k_l[i], ref.queues_local[i].keys, 0.2)
        lg = infonce(q_l[i], k_g[i], ref.queues_global[i].keys, 0.2)     # local query, global key
        total = total + weights[i] * (gg + ll + lg)
        per_level[level] = gg + ll + lg
    return total, per_level, k_g, k_l


@pytest.mark.parametrize("backbone", ["vit"])    # ResNet levels: test_levels_of_both_backbones
def test_detco_loss_gradients_and_queues(backbone):
    model = make("detco", DETCO_ARGS, backbone)
    with torch.no_grad():     # distinct known keys in all 8 queues
        for queue in [*model.queues_global, *model.queues_local]:
            queue.keys.copy_(F.normalize(torch.randn_like(queue.keys), dim=1))
    assert model.patch_side == 16
    ref = copy.deepcopy(model).double()
    batch = views()
    loss, figures = model(batch, StepContext(step=0))
    loss.backward()
    expected, per_level, k_g, k_l = detco_reference(ref, batch, model.patch_side)
    expected.backward()
    assert rel(loss, expected) < 1e-4, (float(loss), float(expected))
    for level, value in per_level.items():
        assert rel(figures[f"loss_{level}"], value) < 1e-4, level
    check_gradients(model, ref, rtol=2e-3 if backbone == "vit" else 2e-2)

    before = [q.keys.clone() for q in [*model.queues_global, *model.queues_local]]
    model.after_step(StepContext(step=0, ok=torch.tensor(False)))    # a skipped step: nothing
    for queue, old in zip([*model.queues_global, *model.queues_local], before):
        assert torch.equal(queue.keys, old) and int(queue.ptr) == 0
    for micro in range(2):                    # a step of two micro-batches (the same keys)
        model(batch, StepContext(step=0, micro=micro, micro_batches=2))
    model.after_step(StepContext(step=0, ok=torch.tensor(True)))
    # both micro-batches' keys, in order, at the pointer; the rest of every queue untouched
    for queue, keys, old in zip([*model.queues_global, *model.queues_local], [*k_g, *k_l], before):
        assert int(queue.ptr) == 8
        torch.testing.assert_close(queue.keys[:4].double(), keys, rtol=0, atol=2e-4)
        torch.testing.assert_close(queue.keys[4:8].double(), keys, rtol=0, atol=2e-4)
        assert torch.equal(queue.keys[8:], old[8:])


def test_detco_weights_and_shuffle_options():
    args = dict(DETCO_ARGS, level_weights="0,0,0,1", shuffle_patches=True)
    model = make("detco", args, depth=2)
    assert model.hyper.level_weights == (0.0, 0.0, 0.0, 1.0)
    batch = views()
    loss, figures = model(batch, StepContext(step=3, seed=7))
    torch.testing.assert_close(loss, figures["loss_c5"])
    again, _ = model(batch, StepContext(step=3, seed=7))       # seeded: the same permutation
    torch.testing.assert_close(loss, again)
    other, _ = model(batch, StepContext(step=4, seed=7))
    assert not torch.equal(loss, other)


# -------------------------------------------------------------------------------------- SCFS

def scfs_reference(ref, batch, teacher_temp, levels=("c3", "c4", "c5")):
    """OFFICIAL skyoux/scfs, two views: DINO on the final head; per level the centred global
    term and the uncentred searched term, (glob + search)/2 each, summed with the final term."""
    x = torch.cat([batch["view1"], batch["view2"]]).double()
    b = batch["view1"].shape[0]

    def final(head, features):
        z = l2n(head.mlp(features.mean((2, 3))), -1)
        return z @ l2n(head.last_layer.weight, 1).t()

    def h(t, s, center=None):
        t = t if center is None else t - center
        t = F.softmax(t / teacher_temp, -1)
        s = F.log_softmax(s / 0.1, -1)
        return (-(t[:b] * s[b:]).sum(-1).mean() - (t[b:] * s[:b]).sum(-1).mean()) / 2

    s_maps = reference_levels(ref.encoder, x, levels)
    s_final = final(ref.head, s_maps["c5"])
    s_layers = [head(s_maps[lv]) for head, lv in zip(ref.layer_heads, levels)]
    with torch.no_grad():
        t_maps = reference_levels(ref.target_encoder, x, levels)
        t_final = final(ref.target_head, t_maps["c5"])
        t_layers, t_search = [], []
        for head, lv in zip(ref.target_layer_heads, levels):
            t_layers.append(head(t_maps[lv]))
            u = l2n(s_maps[lv].mean((2, 3)))                      # the student's own views
            u = torch.cat([u[b:], u[:b]])                          # teacher v1 <- student v2, ...
            attention = (l2n(t_maps[lv]) * u[:, :, None, None]).sum(1, keepdim=True)
            t_search.append(head(attention * t_maps[lv]))
    loss = h(t_final, s_final, ref.center)
    terms = {"loss_final": loss}
    for i, lv in enumerate(levels):
        glob = h(t_layers[i], s_layers[i], ref.layer_centers[i])
        search = h(t_search[i], s_layers[i])
        terms[f"loss_{lv}_global"], terms[f"loss_{lv}_search"] = glob, search
        loss = loss + (glob + search) / 2
    return loss, terms, t_final, torch.stack(t_layers)


@pytest.mark.parametrize("backbone", ["vit"])    # ResNet levels: test_levels_of_both_backbones
def test_scfs_loss_gradients_and_centres(backbone):
    args = dict(SCFS_ARGS, teacher_temp_warmup_steps=10)
    model = make("scfs", args, backbone)
    with torch.no_grad():    # centres away from zero, so centring shows
        model.center.normal_(0, 0.3)
        model.layer_centers.normal_(0, 0.3)
    ref = copy.deepcopy(model).double()
    batch = views()
    assert model.teacher_temperature(5) == pytest.approx(0.055)
    loss, figures = model(batch, StepContext(step=5))
    loss.backward()
    expected, terms, t_final, t_layers = scfs_reference(ref, batch, 0.055)
    expected.backward()
    assert rel(loss, expected) < 1e-4, (float(loss), float(expected))
    for name, value in terms.items():
        assert rel(figures[name], value) < 1e-4, name
    # the searched term is not the global one with another name
    assert rel(terms["loss_c5_search"], terms["loss_c5_global"]) > 1e-3
    check_gradients(model, ref, rtol=2e-3 if backbone == "vit" else 2e-2)

    center, layer_centers = model.center.clone(), model.layer_centers.clone()
    model.after_step(StepContext(step=5, ok=torch.tensor(False)))
    assert torch.equal(model.center, center) and torch.equal(model.layer_centers, layer_centers)
    for micro in range(2):    # two micro-batches of the same teacher outputs: one batch's mean
        model(batch, StepContext(step=5, micro=micro, micro_batches=2))
    model.after_step(StepContext(step=5, ok=torch.tensor(True)))
    expected_center = 0.9 * center.double() + 0.1 * t_final.mean(0, keepdim=True)
    expected_layers = 0.9 * layer_centers.double() + 0.1 * t_layers.mean(1)
    torch.testing.assert_close(model.center.double(), expected_center, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.layer_centers.double(), expected_layers, rtol=0, atol=1e-5)


def scfs_multicrop_reference(ref, crops, teacher_temp, levels=("c3", "c4", "c5")):
    """OFFICIAL skyoux/scfs main_scfs.py with local crops, step by step: the student on images[:2]
    and on images[2:] (two calls); the teacher on images[:2]; per level each local crop i's
    pooled student map (l2n) weights the l2n teacher map of global view 1 (chunk(2)[0]) at every
    location, times that map; DINOLoss over (2 + n) student chunks against 2 teacher chunks
    (v != iq); DINOShallowLoss: centred global pairs 0.5 (t0 s1 + t1 s0) and the uncentred local
    term mean_i H(t_i, s_i); loss = final + sum_l (global_l + local_l) * 0.5."""
    n = len(crops) - 2
    g, loc = torch.cat(crops[:2]).double(), torch.cat(crops[2:]).double()

    def final(head, features):
        z = l2n(head.mlp(features.mean((2, 3))), -1)
        return z @ l2n(head.last_layer.weight, 1).t()

    sg, sl = reference_levels(ref.encoder, g, levels), reference_levels(ref.encoder, loc, levels)
    stu_all = torch.cat([final(ref.head, sg["c5"]), final(ref.head, sl["c5"])])
    stu_g = [head(sg[lv]) for head, lv in zip(ref.layer_heads, levels)]
    stu_l = [head(sl[lv]) for head, lv in zip(ref.layer_heads, levels)]
    with torch.no_grad():
        tm = reference_levels(ref.target_encoder, g, levels)
        tea_final = final(ref.target_head, tm["c5"])
        tea_g, tea_l = [], []
        for head, lv in zip(ref.target_layer_heads, levels):
            tea_g.append(head(tm[lv]))
            queries = l2n(sl[lv].mean((2, 3), keepdim=True)).chunk(n)
            f_nom = l2n(tm[lv]).chunk(2)
            local = torch.cat([(f_nom[0] * queries[i]).sum(1, keepdim=True) * tm[lv].chunk(2)[0]
                               for i in range(n)])
            tea_l.append(head(local))
    s_out = (stu_all / 0.1).chunk(n + 2)
    t_out = F.softmax((tea_final - ref.center) / teacher_temp, -1).chunk(2)
    pairs = [(iq, v) for iq in range(2) for v in range(n + 2) if v != iq]
    loss = sum((-t_out[iq] * F.log_softmax(s_out[v], -1)).sum(-1).mean()
               for iq, v in pairs) / len(pairs)
    terms = {"loss_final": loss}
    for i, lv in enumerate(levels):
        s, t = (stu_g[i] / 0.1).chunk(2), F.softmax((tea_g[i] - ref.layer_centers[i])
                                                    / teacher_temp, -1).chunk(2)
        glob = ((-t[0] * F.log_softmax(s[1], -1)).sum(-1).mean()
                + (-t[1] * F.log_softmax(s[0], -1)).sum(-1).mean()) * 0.5
        s, t = (stu_l[i] / 0.1).chunk(n), F.softmax(tea_l[i] / teacher_temp, -1).chunk(n)
        local = sum((-t[j] * F.log_softmax(s[j], -1)).sum(-1).mean() for j in range(n)) / n
        terms[f"loss_{lv}_global"], terms[f"loss_{lv}_search"] = glob, local
        loss = loss + (glob + local) * 0.5
    return loss, terms, tea_final, torch.stack(tea_g)


@pytest.mark.parametrize("backbone", ["vit", "resnet18"])
def test_scfs_multicrop_matches_the_official_step(backbone):
    """Two global crops and 3 local ones (16 px), as the loaders deliver them (batch["crops"])."""
    model = make("scfs", dict(SCFS_ARGS, local_crops=3), backbone)
    assert [(c.count, c.size) for c in model.views.crops] == [(2, 32), (3, 16)]
    with torch.no_grad():
        model.center.normal_(0, 0.3)
        model.layer_centers.normal_(0, 0.3)
    ref = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(3)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    batch = {"crops": crops, "view1": crops[0], "view2": crops[1]}
    loss, figures = model(batch, StepContext(step=100))
    loss.backward()
    expected, terms, t_final, t_layers = scfs_multicrop_reference(ref, crops, 0.07)
    expected.backward()
    assert rel(loss, expected) < 1e-4, (float(loss), float(expected))
    for name, value in terms.items():
        assert rel(figures[name], value) < 1e-4, name
    check_gradients(model, ref, rtol=2e-3 if backbone == "vit" else 2e-2)
    center = model.center.clone()
    model.after_step(StepContext(step=100, ok=torch.tensor(True)))   # centres: global views only
    torch.testing.assert_close(model.center.double(),
                               0.9 * center.double() + 0.1 * t_final.mean(0, keepdim=True),
                               rtol=0, atol=1e-5)


def test_scfs_last_layer_freeze_and_temperature_schedule():
    model = make("scfs", dict(SCFS_ARGS, freeze_last_layer_steps=3, teacher_temp_warmup_steps=4),
                 depth=1)
    assert [model.teacher_temperature(s) for s in (0, 2, 4, 100)] == pytest.approx(
        [0.04, 0.055, 0.07, 0.07])
    batch = views()
    for step, frozen in ((2, True), (3, False)):
        model.zero_grad(set_to_none=True)
        loss, _ = model(batch, StepContext(step=step))
        loss.backward()
        grad = model.head.last_layer.weight.grad
        assert grad is not None and bool(grad.any()) != frozen
        assert model.head.mlp[0].weight.grad.any()


# ------------------------------------------------------------------- entry points, resume, sync

@pytest.fixture
def scfs_demo_args(monkeypatch):
    """Until the demo preset carries SCFS's own arguments (it was written with MoCo's
    queue_length), run the CLI with the ones the method file asks for."""
    preset = PRESETS["scfs-demo-cpu"]
    if "queue_length" in preset.get("method_args", {}):
        monkeypatch.setitem(PRESETS, "scfs-demo-cpu", dict(preset, method_args=SCFS_DEMO_ARGS))


@pytest.mark.parametrize("method,backbone", [("detco", "resnet18"), ("detco", "vit"),
                                             ("scfs", "resnet18"), ("scfs", "vit")])
def test_cli_runs(method, backbone, tmp_path, capsys, monkeypatch, scfs_demo_args):
    args = DETCO_ARGS if method == "detco" else dict(SCFS_ARGS, dim=256)
    if backbone == "vit":     # a tiny ViT in the demo preset (the CLI has no ViT-width flags)
        name = f"{method}-demo-cpu"
        monkeypatch.setitem(PRESETS, name, dict(PRESETS[name], patch_size=8, dim=32, depth=2,
                                                heads=2))
    extra = ["--backbone", backbone]
    out = tmp_path / "run"
    code = main(["--method", method, "--steps", "3", "--batch-size", "8", "--workers", "0",
                 "--device", "cpu", "--no-fused", "--out", str(out), *extra,
                 *[part for k, v in args.items() for part in ("--method-arg", f"{k}={v}")]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "done: step 3/3" in captured.out + captured.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["method"] == method
    model = saved["model"]
    if method == "detco":
        assert model["queues.ptr"].tolist() == [3 * 8 % 64] * 8   # all 8 queues of the bank
    else:
        assert model["center"].abs().sum() > 0 and model["layer_centers"].abs().sum() > 0


def tiny(method: str, args: dict, **changes) -> PretrainConfig:
    values = dict(preset_config("mocov2-demo-cpu").to_dict())
    values.update(method=method, backbone="vit", img_size=32, patch_size=8, dim=32, depth=2,
                  heads=2, batch_size=4, steps=4, warmup_steps=1, workers=0, log_every=1,
                  checkpoint_every=1000, method_args=args, preset="test-tiny")
    values.update(changes)
    return PretrainConfig.from_dict(values).validate()


def test_detco_resume_is_bit_exact(tmp_path):
    args = dict(DETCO_ARGS, shuffle_patches=True)
    run = dict(device="cpu", fused=False, quiet=True)
    pretrain(tiny("detco", args), RunOptions(out=tmp_path / "straight", **run))
    pretrain(tiny("detco", args), RunOptions(out=tmp_path / "split", stop_after=2, **run))
    pretrain(tiny("detco", args), RunOptions(out=tmp_path / "split", resume=True, **run))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert int(a["model"]["queues.ptr"][7]) == 16   # Q^l_C5


@pytest.mark.parametrize("method,args", [("detco", dict(DETCO_ARGS, shuffle_patches=True)),
                                         ("scfs", SCFS_ARGS)])
def test_optimisation_step_reads_no_device_value(method, args):
    from pipelines.augment import augment_recipe
    from pipelines.datasets import sample_photos
    from pipelines.torch_loader import TwoViewLoader

    cfg = tiny(method, args, accum=2, precision="fp32")
    torch.manual_seed(0)
    model = build_method(cfg).train()
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    session = StepSession(cfg, model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          torch.device("cpu"), None, {"queue_infonce": "reference"})
    loader = TwoViewLoader(sample_photos(), augment_recipe("mocov2", 32, blur=False),
                           batch_size=4, workers=0, seed=2)
    batches = list(loader.epoch_batches(0))[:4]
    optimisation_step(session, batches[:2], 0, 0.99)
    with count_host_syncs() as syncs:
        loss, grad_norm, _ = optimisation_step(session, batches[2:], 1, 0.99)
    assert not syncs, syncs.report()
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
