"""Each method's micro-batch loss against a float64 reference written here, from the maths alone.

For mocov2, densecl and pixpro the authority is spec/OFFICIAL.md (the official code, line by
line); densesiam and lcloss have no released pre-training code, so their method file's docstring
is the specification. Every reference below is plain torch (einsum, cross_entropy, our own box
geometry and bilinear interpolation): it never calls a method's loss code, the kernels
(queue_infonce, dense_match, pixpro_loss, pixel_propagation) or their reference functions, nor
engine/models/correspondence.py. It does call the method's NETWORKS (a float64 deep copy of the
method: encoder, heads, predictors), since those are not what is under test.

Each test checks, for one micro-batch (`method(batch, StepContext(...))`):
  * the loss (and the logged terms) equals the float64 reference;
  * the gradient of every trainable online parameter equals the reference's gradient -- this pins
    the detach points: no gradient through keys / targets / queues / argmax, SimSiam's stop-
    gradient on z, DenseSiam's region contrast WITHOUT stop-gradient;
  * target (EMA) parameters, frozen parameters and queues get no gradient.
The target networks are perturbed away from the online ones first (as after some EMA steps), so a
method that used the online network where the target belongs (or the reverse) changes the value.

The synthetic batch covers: an unflipped pair, a flipped view 1, a pair that does NOT overlap (its
PixPro term is 0 but still counts in the mean; it has no DenseSiam/LC cells), and a pair with both
views flipped; image sizes differ per image (PixPro's (W-1, H-1) normalisation). LC-loss adds a
fifth pair with identical dyadic boxes (every correspondence exactly on a cell centre, so the
neighbours sit exactly 1 cell away: the negatives' exclusion boundary). The ResNet-18 cases take a
real batch from the embedded photos (TwoViewLoader, byol recipe at 32 px).

Losses are compared with float64 at 2e-5 relative, gradients at 2e-4 relative plus 4x the
rounding the same reference maths shows in float32 (a ResNet's first layers, behind eight train-
mode BatchNorms over a 4-image batch, lose ~1e-2 relative in fp32 whoever computes them; see
check_gradients). The ViT's LayerNorm runs in fp32 even in the float64 copy (FP32LayerNorm),
which is well inside these tolerances.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.methods import build_method
from engine.methods.base import StepContext
from engine.models.vit import VisionTransformer
from engine.presets import PretrainConfig

GRID = 4                       # 32 px images: ViT patch 8 -> 4x4; ResNet-18 CIFAR stem -> 4x4
LOSS_RTOL = 2e-5
GRAD_RTOL = 2e-4

SMALL_ARGS = {
    "mocov2": {"queue_length": 64, "hidden": 48, "dim": 16},
    "densecl": {"queue_length": 64, "hidden": 48, "dim": 16},
    "pixpro": {"hidden": 48, "dim": 24},
    "densesiam": {"global_dim": 48, "global_pred_hidden": 16, "dense_hidden": 40, "dense_dim": 24,
                  "dense_pred_hidden": 12, "regions": 4},
    "lcloss": {"hidden": 48, "dim": 24, "dense_hidden": 40, "dense_dim": 24},
}


# ------------------------------------------------------------------------------------ set-up

def make_method(name: str, backbone: str = "vit", seed: int = 0, **overrides):
    args = dict(SMALL_ARGS[name], **overrides)
    if backbone == "vit":
        cfg = PretrainConfig(method=name, backbone="vit", img_size=32, patch_size=8, dim=32,
                             depth=1, heads=2, batch_size=4, method_args=args)
    else:
        cfg = PretrainConfig(method=name, backbone=backbone, cifar_stem=True, img_size=32,
                             batch_size=4, method_args=args)
    torch.manual_seed(seed)
    method = build_method(cfg)
    method.train()
    params = dict(method.named_parameters())
    with torch.no_grad():   # the targets as after some EMA steps: no longer equal to the online nets
        for pname, p in params.items():    # (frozen pieces, the ViT's patch embedding, stay equal)
            if pname.startswith("target_") and params[pname[len("target_"):]].requires_grad:
                p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
    return method


def synthetic_batch(batch: int = 4, seed: int = 1) -> dict:
    """Random views with hand-made geometry; boxes (y, x, h, w) in source pixels, view 1 first."""
    g = torch.Generator().manual_seed(seed)
    boxes = [
        [[2, 4, 30, 36], [8, 10, 28, 30]],        # overlapping, no flip
        [[0, 0, 40, 40], [16, 12, 44, 48]],       # view 1 flipped
        [[0, 0, 30, 40], [25, 50, 35, 40]],       # NO overlap (columns 0-40 vs 50-90), view 2 flipped
        [[5, 10, 40, 50], [0, 20, 45, 45]],       # both flipped
        [[4, 4, 32, 32], [4, 4, 32, 32]],         # identical dyadic boxes: exact cell-centre matches
    ][:batch]
    flips = [[False, False], [True, False], [False, True], [True, True], [False, False]][:batch]
    sizes = [[40, 50], [64, 64], [60, 90], [50, 70], [40, 40]][:batch]
    return {"view1": torch.randn(batch, 3, 32, 32, generator=g),
            "view2": torch.randn(batch, 3, 32, 32, generator=g),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "flips": torch.tensor(flips, dtype=torch.bool),
            "image_size": torch.tensor(sizes, dtype=torch.int64)}


def photo_batch(batch: int = 4) -> dict:
    """A real batch of the embedded photos (byol recipe at 32 px, no blur)."""
    from pipelines.augment import augment_recipe
    from pipelines.datasets import sample_photos
    from pipelines.torch_loader import TwoViewLoader
    loader = TwoViewLoader(sample_photos(), augment_recipe("byol", 32, blur=False),
                           batch_size=batch, workers=0, seed=3, pin_memory=False)
    return next(iter(loader.epoch_batches(0)))


def as64(batch: dict) -> dict:
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in batch.items()}


def feature_map(encoder, images):
    """The backbone's dense map (B, C, G, G): ViT patch tokens (cls dropped), or ResNet C5."""
    if isinstance(encoder, VisionTransformer):
        tokens = encoder(images)[:, 1:]
        b, n, d = tokens.shape
        side = round(n ** 0.5)
        return tokens.transpose(1, 2).reshape(b, d, side, side)
    return encoder(images)


def l2n(x, dim):
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def run_method(method, batch, step: int = 0):
    ctx = StepContext(step=step)
    loss, figures = method(batch, ctx)
    loss.backward()
    return loss.detach(), figures


def rel_err(actual, expected) -> float:
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).abs().max()
                 / expected.abs().max().clamp_min(1e-30))


def assert_loss(actual, expected, what="loss", rtol=LOSS_RTOL):
    actual, expected = actual.detach(), expected.detach()
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: {float(actual):.8g} vs reference {float(expected):.8g} (rel {err:.2e})"


def check_gradients(method, ref, ref32=None, rtol=GRAD_RTOL):
    """Every trainable online parameter's gradient equals the float64 reference's; targets,
    frozen parameters and buffers (queues) get none. `ref32`, the same reference maths run on a
    float32 copy, measures fp32's own rounding for each tensor (a ResNet's first layers, behind
    eight train-mode BatchNorms over tiny batches, lose ~1e-2 relative in fp32 whatever computes
    them): the engine may differ from float64 by rtol plus 4x that. A wrong detach point or
    pairing moves a gradient by O(1). Returns the worst relative error."""
    ref_params = dict(ref.named_parameters())
    ref32_params = dict(ref32.named_parameters()) if ref32 is not None else {}
    scale = max(float(p.grad.abs().max()) for p in ref_params.values() if p.grad is not None)
    worst, compared = 0.0, 0
    for name, p in method.named_parameters():
        r = ref_params[name]
        if name.startswith("target_"):
            assert not p.requires_grad and p.grad is None, f"target parameter {name} has a gradient"
            continue
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {name} has a gradient"
            continue
        assert (p.grad is None) == (r.grad is None), \
            f"{name}: gradient {'missing' if p.grad is None else 'unexpected'}"
        if r.grad is None:
            continue
        err = float((p.grad.double() - r.grad).abs().max())
        fp32_noise = 0.0
        if name in ref32_params and ref32_params[name].grad is not None:
            fp32_noise = float((ref32_params[name].grad.double() - r.grad).abs().max())
        bound = rtol * float(r.grad.abs().max()) + 4 * fp32_noise + 1e-6 * scale
        assert err <= bound, (f"{name}: gradient differs from the reference by {err:.3e} "
                              f"(|ref| max {float(r.grad.abs().max()):.3e}, fp32 noise "
                              f"{fp32_noise:.1e})")
        worst = max(worst, err / max(float(r.grad.abs().max()), 1e-6 * scale))
        compared += 1
    for name, buf in method.named_buffers():
        assert buf.grad is None and not buf.requires_grad, f"buffer {name} takes a gradient"
    assert compared >= 4
    return worst


def infonce(query, positive, queue_rows, tau):
    """CE(cat([q·k+, q·queueᵀ]) / τ, label 0), mean over rows (OFFICIAL.md ContrastiveHead)."""
    logits = torch.cat([(query * positive).sum(1, keepdim=True), query @ queue_rows.t()], 1) / tau
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long))


# ------------------------------------------------------------------- geometry (our own maps)

def pixpro_boxes(boxes, flips, sizes):
    """OFFICIAL.md §2 RandomResizedCropCoord + RandomHorizontalFlipCoord: (B, 2, 4) float64
    (x0, y0, x1, y1) normalised by (W-1, H-1); a flip swaps x0 and x1."""
    out = torch.zeros(boxes.shape[0], 2, 4, dtype=torch.float64)
    for b in range(boxes.shape[0]):
        height, width = float(sizes[b, 0]), float(sizes[b, 1])
        for v in range(2):
            i, j, h, w = (float(t) for t in boxes[b, v])
            coord = [j / (width - 1), i / (height - 1), (j + w - 1) / (width - 1),
                     (i + h - 1) / (height - 1)]
            if bool(flips[b, v]):
                coord[0], coord[2] = coord[2], coord[0]
            out[b, v] = torch.tensor(coord, dtype=torch.float64)
    return out


def pixpro_distance(cq, ck, grid):
    """OFFICIAL.md §2 `regression_loss`: normalised centre distances (B, G², G²), q rows, k cols."""
    x = torch.arange(grid, dtype=torch.float64)[None, None, :]
    y = torch.arange(grid, dtype=torch.float64)[None, :, None]
    bw_q = ((cq[:, 2] - cq[:, 0]) / grid)[:, None, None]
    bh_q = ((cq[:, 3] - cq[:, 1]) / grid)[:, None, None]
    bw_k = ((ck[:, 2] - ck[:, 0]) / grid)[:, None, None]
    bh_k = ((ck[:, 3] - ck[:, 1]) / grid)[:, None, None]
    diag = torch.maximum(torch.sqrt(bw_q ** 2 + bh_q ** 2), torch.sqrt(bw_k ** 2 + bh_k ** 2))
    cx_q = ((x + 0.5) * bw_q + cq[:, 0, None, None]).expand(-1, grid, grid)
    cy_q = ((y + 0.5) * bh_q + cq[:, 1, None, None]).expand(-1, grid, grid)
    cx_k = ((x + 0.5) * bw_k + ck[:, 0, None, None]).expand(-1, grid, grid)
    cy_k = ((y + 0.5) * bh_k + ck[:, 1, None, None]).expand(-1, grid, grid)
    b = cq.shape[0]
    n = grid * grid
    return torch.sqrt((cx_q.reshape(b, n, 1) - cx_k.reshape(b, 1, n)) ** 2
                      + (cy_q.reshape(b, n, 1) - cy_k.reshape(b, 1, n)) ** 2) / diag


def cell_map(boxes, flips, grid):
    """Our own K3 inverse map. View a = boxes[:, 0]: its cell (r, c) covers rows y + [r, r+1]h/G
    and columns x + [c', c'+1]w/G (c' = G-1-c if flipped); its centre, located in view b as
    (row, col) in view-b cell units (cell centres at integers, columns in b's OUTPUT orientation).
    Returns location (B, G², 2) float64 and inside (B, G²): within view b's crop."""
    batch = boxes.shape[0]
    location = torch.zeros(batch, grid * grid, 2, dtype=torch.float64)
    for n in range(batch):
        ya, xa, ha, wa = (float(t) for t in boxes[n, 0])
        yb, xb, hb, wb = (float(t) for t in boxes[n, 1])
        for r in range(grid):
            for c in range(grid):
                c_src = grid - 1 - c if bool(flips[n, 0]) else c
                image_y = ya + (r + 0.5) * ha / grid
                image_x = xa + (c_src + 0.5) * wa / grid
                row_b = (image_y - yb) / (hb / grid) - 0.5
                col_b = (image_x - xb) / (wb / grid) - 0.5
                if bool(flips[n, 1]):
                    col_b = grid - 1 - col_b
                location[n, r * grid + c] = torch.tensor([row_b, col_b], dtype=torch.float64)
    inside = ((location >= -0.5) & (location <= grid - 0.5)).all(-1)
    return location, inside


def bilinear(features, location):
    """features (B, C, G, G) sampled at location (B, N, 2) (row, col), cell centres at integers,
    coordinates clamped to the map (border padding) -> (B, C, N). Differentiable in features."""
    _, channels, grid, _ = features.shape
    flat = features.flatten(2)                                         # (B, C, G²)
    pos = location.clamp(0, grid - 1)
    r0, c0 = pos[..., 0].floor(), pos[..., 1].floor()
    wr, wc = (pos[..., 0] - r0).to(features.dtype), (pos[..., 1] - c0).to(features.dtype)
    r0, c0 = r0.long(), c0.long()
    r1, c1 = (r0 + 1).clamp(max=grid - 1), (c0 + 1).clamp(max=grid - 1)

    def at(r, c):
        index = (r * grid + c)[:, None, :].expand(-1, channels, -1)
        return torch.gather(flat, 2, index)
    wr, wc = wr[:, None, :], wc[:, None, :]
    return ((1 - wr) * (1 - wc) * at(r0, c0) + (1 - wr) * wc * at(r0, c1)
            + wr * (1 - wc) * at(r1, c0) + wr * wc * at(r1, c1))


def directions(batch):
    """(a, b, boxes, flips) for view 1 -> view 2 and view 2 -> view 1."""
    boxes, flips = batch["boxes"], batch["flips"]
    return [(0, 1, boxes, flips), (1, 0, boxes.flip(1), flips.flip(1))]


def test_own_geometry_matches_engine_correspondence():
    """Our map against kernels.geometric_correspondence (so a geometry bug is named directly,
    before it shows up in the DenseSiam / LC-loss losses)."""
    from kernels import geometric_correspondence
    batch = synthetic_batch(5)
    for _, _, boxes, flips in directions(batch):
        location, inside = cell_map(boxes, flips, GRID)
        eng_location, eng_inside = geometric_correspondence(boxes, flips, GRID)
        assert torch.equal(eng_inside, inside)
        assert torch.allclose(eng_location.double(), location, atol=1e-5)
    # the batch exercises what it claims to
    location, inside = cell_map(batch["boxes"], batch["flips"], GRID)
    assert not inside[2].any()                                   # the non-overlapping pair
    assert inside[0].any() and not inside[0].all()               # partial overlaps
    assert inside[4].all() and torch.equal(location[4], location[4].round())   # exact centres


# ------------------------------------------------------------------------------------ MoCo v2

def test_mocov2_loss_and_gradients():
    method = make_method("mocov2")
    dim, length = SMALL_ARGS["mocov2"]["dim"], SMALL_ARGS["mocov2"]["queue_length"]
    with torch.no_grad():   # known random unit vectors in the queue, so its contents matter
        method.queue.keys.copy_(F.normalize(torch.randn(length, dim), dim=1))
    assert method.queue.keys.shape == (length, dim)
    ref = copy.deepcopy(method).double()
    batch = synthetic_batch()
    loss, _ = run_method(method, batch)

    b64 = as64(batch)
    q = l2n(ref.head(feature_map(ref.encoder, b64["view1"]).mean((2, 3))), 1)
    with torch.no_grad():
        k = l2n(ref.target_head(feature_map(ref.target_encoder, b64["view2"]).mean((2, 3))), 1)
    expected = infonce(q, k, ref.queue.keys, 0.2)           # τ = 0.2, the default
    expected.backward()
    assert_loss(loss, expected)
    check_gradients(method, ref)

    # after the step, the keys are enqueued at the pointer, in batch order
    method.after_step(StepContext(step=0))
    assert torch.allclose(method.queue.keys[:4].double(), k, atol=1e-5)
    assert int(method.queue.ptr) == 4


# ------------------------------------------------------------------------------------ DenseCL

def densecl_reference(ref, b64, lam):
    """OFFICIAL.md §1 on the float64 copy; returns (loss, L_global, L_dense, k, k2, diagnostics)."""
    fq = feature_map(ref.encoder, b64["view1"])                          # (N, C, H, W)
    q = l2n(ref.neck.mlp(fq.mean((2, 3))), 1)
    q_grid = l2n(ref.neck.mlp2(fq).flatten(2), 1)                        # (N, D, S)
    with torch.no_grad():
        fk = feature_map(ref.target_encoder, b64["view2"])
        k = l2n(ref.target_neck.mlp(fk.mean((2, 3))), 1)
        dk = ref.target_neck.mlp2(fk)                                    # (N, D, H, W)
        k_grid = l2n(dk.flatten(2), 1)
        k2 = l2n(dk.mean((2, 3)), 1)                                     # dense queue entry
        q_b = l2n(fq.flatten(2), 1)                                      # BACKBONE features
        k_b = l2n(fk.flatten(2), 1)
        sim = torch.einsum("nci,ncj->nij", q_b, k_b)
        ind = sim.argmax(dim=2)                                          # over KEY cells
        k_sel = torch.gather(k_grid, 2, ind[:, None, :].expand(-1, k_grid.shape[1], -1))
    n, d, s = q_grid.shape
    loss_global = infonce(q, k, ref.queue.keys, 0.2)
    l_pos = (q_grid * k_sel).sum(1).reshape(n * s, 1)                    # rows (n, i)
    l_neg = q_grid.transpose(1, 2).reshape(n * s, d) @ ref.queue_dense.keys.t()
    logits = torch.cat([l_pos, l_neg], 1) / 0.2
    loss_dense = F.cross_entropy(logits, torch.zeros(n * s, dtype=torch.long))
    loss = (1 - lam) * loss_global + lam * loss_dense
    # diagnostics: the rule must be discriminative on this batch
    top2 = sim.topk(2, dim=2).values
    with torch.no_grad():
        neck_sim = torch.einsum("nci,ncj->nij", q_grid, k_grid)
    diag = {"margin": float((top2[..., 0] - top2[..., 1]).min()),
            "neck_argmax_differs": bool((neck_sim.argmax(2) != ind).any()),
            "transposed_argmax_differs": bool((sim.argmax(1) != ind).any())}
    return loss, loss_global, loss_dense, k, k2, diag


@pytest.mark.parametrize("backbone", ["vit", "resnet18"])
def test_densecl_loss_gradients_and_queues(backbone):
    method = make_method("densecl", backbone)
    dim, length = SMALL_ARGS["densecl"]["dim"], SMALL_ARGS["densecl"]["queue_length"]
    with torch.no_grad():
        method.queue.keys.copy_(F.normalize(torch.randn(length, dim), dim=1))
        method.queue_dense.keys.copy_(F.normalize(torch.randn(length, dim), dim=1))
        method.queue.ptr.fill_(length - 2)          # the enqueue below wraps around the end
        method.queue_dense.ptr.fill_(length - 2)
    assert method.hyper.loss_lambda == 0.5 and method.hyper.dense_warmup_steps == 0
    ref, ref32 = copy.deepcopy(method).double(), copy.deepcopy(method)
    batch = synthetic_batch() if backbone == "vit" else photo_batch()
    loss, figures = run_method(method, batch)

    expected, l_global, l_dense, k, k2, diag = densecl_reference(ref, as64(batch), 0.5)
    expected.backward()
    densecl_reference(ref32, batch, 0.5)[0].backward()
    # the batch can tell the official rule from its likely mistakes, and the argmax is unambiguous
    assert diag["neck_argmax_differs"] and diag["transposed_argmax_differs"]
    assert diag["margin"] > 1e-4
    assert_loss(figures["loss_global"], l_global, "L_global")
    assert_loss(figures["loss_dense"], l_dense, "L_dense")
    assert_loss(loss, expected)
    check_gradients(method, ref, ref32)

    # after_step: queue <- k, queue_dense <- l2n(GAP(key dense projection)), rows in batch order
    method.after_step(StepContext(step=0))
    slots = [length - 2, length - 1, 0, 1]
    assert torch.allclose(method.queue.keys[slots].double(), k, atol=1e-5)
    assert torch.allclose(method.queue_dense.keys[slots].double(), k2, atol=1e-5)
    assert int(method.queue.ptr) == 2 and int(method.queue_dense.ptr) == 2


def test_densecl_warmup_and_step_enqueue():
    """dense_warmup_steps: λ = 0 before that step (no gradient into the dense branch), 0.5 from it;
    two micro-batches of one step are enqueued together, in order, after the step."""
    method = make_method("densecl", dense_warmup_steps=3)
    length = SMALL_ARGS["densecl"]["queue_length"]
    ref = copy.deepcopy(method).double()
    batch = synthetic_batch()
    second = synthetic_batch(seed=7)

    loss, _ = method(batch, StepContext(step=2, micro=0, micro_batches=2))
    loss.backward()
    expected, l_global, _, k_a, k2_a, _ = densecl_reference(ref, as64(batch), 0.0)
    assert_loss(loss, l_global)
    for name, p in method.neck.mlp2.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) == 0.0, name
    expected.backward()
    check_gradients(method, ref)

    method.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    loss, _ = method(second, StepContext(step=3, micro=1, micro_batches=2))
    loss.backward()
    expected, _, _, k_b, k2_b, _ = densecl_reference(ref, as64(second), 0.5)
    expected.backward()
    assert_loss(loss, expected)
    check_gradients(method, ref)

    # nothing enqueued before after_step (both micro-batches saw the same queue)
    assert int(method.queue.ptr) == 0 and int(method.queue_dense.ptr) == 0
    method.after_step(StepContext(step=3))
    assert int(method.queue.ptr) == 8 % length
    assert torch.allclose(method.queue.keys[:8].double(), torch.cat([k_a, k_b]), atol=1e-5)
    assert torch.allclose(method.queue_dense.keys[:8].double(), torch.cat([k2_a, k2_b]), atol=1e-5)


# ------------------------------------------------------------------------------------- PixPro

def pixpro_reference(ref, b64, threshold=0.7):
    grid = GRID
    views = [b64["view1"], b64["view2"]]
    preds, targets = [], []
    for v in views:                                         # both views through both networks
        x = ref.projector(feature_map(ref.encoder, v))      # (B, C, G, G), unnormalised
        value = l2n(ref.propagation.transform(x), 1).flatten(2)           # l2n(g(x))
        xn = l2n(x, 1).flatten(2)
        sim = torch.einsum("bci,bcj->bij", xn, xn).clamp(min=0) ** 2      # γ = 2, clamp 0
        y = torch.einsum("bcj,bij->bci", value, sim)
        preds.append(l2n(y, 1))
        with torch.no_grad():
            t = ref.target_projector(feature_map(ref.target_encoder, v))
            targets.append(l2n(t, 1).flatten(2))
    coords = pixpro_boxes(b64["boxes"], b64["flips"], b64["image_size"])
    c1, c2 = coords[:, 0], coords[:, 1]

    def regression(q, k, cq, ck):
        mask = (pixpro_distance(cq, ck, grid) < threshold).double()      # strict <
        logit = torch.einsum("bci,bcj->bij", q, k)
        per_image = (logit * mask).sum((1, 2)) / (mask.sum((1, 2)) + 1e-6)
        return -2 * per_image.mean(), mask

    l12, mask12 = regression(preds[0], targets[1], c1, c2)
    l21, _ = regression(preds[1], targets[0], c2, c1)
    return l12 + l21, mask12, coords                        # SUM of both directions, no ½


@pytest.mark.parametrize("backbone", ["vit", "resnet18"])
def test_pixpro_loss_and_gradients(backbone):
    method = make_method("pixpro", backbone)
    h = method.hyper
    assert (h.gamma, h.threshold, h.transform_layers, h.instance_weight) == (2.0, 0.7, 1, 0.0)
    ref, ref32 = copy.deepcopy(method).double(), copy.deepcopy(method)
    batch = synthetic_batch() if backbone == "vit" else photo_batch()
    loss, figures = run_method(method, batch)

    b64 = as64(batch)
    expected, mask, _ = pixpro_reference(ref, b64)
    expected.backward()
    pixpro_reference(ref32, batch)[0].backward()
    if backbone == "vit":
        counts = mask.sum((1, 2))
        assert counts[2] == 0 and (counts[[0, 1, 3]] > 0).all()   # image 2: no pair, still in mean
        # the flip matters: without the x swap, image 1 (view 1 flipped) would pair other cells
        unflipped = pixpro_boxes(batch["boxes"], torch.zeros_like(batch["flips"]),
                                 batch["image_size"])
        alt = pixpro_distance(unflipped[:, 0], unflipped[:, 1], GRID) < 0.7
        assert not torch.equal(alt[1], mask[1].bool())
    assert_loss(figures["loss_pixel"], expected, "loss_pixel")
    assert_loss(loss, expected)
    check_gradients(method, ref, ref32)


def test_pixpro_instance_branch():
    """instance_weight > 0 (off in the released scripts): + w·(−2·mean cos(p_1, t_2) − 2·mean
    cos(p_2, t_1)), p = l2n(GAP(predictor(projector_instance(f)))), t = l2n(GAP(projector_k(f_k)))."""
    weight = 0.5
    method = make_method("pixpro", instance_weight=weight)
    ref = copy.deepcopy(method).double()
    batch = synthetic_batch()
    loss, figures = run_method(method, batch)

    b64 = as64(batch)
    pixel = pixpro_reference(ref, b64)[0]
    preds, targets = [], []
    for v in (b64["view1"], b64["view2"]):
        f = feature_map(ref.encoder, v)
        preds.append(l2n(ref.instance_predictor(ref.instance_projector(f)).mean((2, 3)), 1))
        with torch.no_grad():
            t = ref.target_instance_projector(feature_map(ref.target_encoder, v))
            targets.append(l2n(t.mean((2, 3)), 1))
    instance = (-2 * (preds[0] * targets[1]).sum(1).mean()
                - 2 * (preds[1] * targets[0]).sum(1).mean())
    expected = pixel + weight * instance
    expected.backward()
    assert_loss(figures["loss_instance"], instance, "loss_instance")
    assert_loss(loss, expected)
    check_gradients(method, ref)


def test_pixpro_threshold_is_strict():
    """Identical dyadic boxes make the diagonal neighbours' distance exactly 1 cell diagonal:
    with threshold 1.0 they are NOT positives (d < T), only the same and edge-adjacent cells."""
    method = make_method("pixpro", threshold=1.0)
    ref = copy.deepcopy(method).double()
    batch = synthetic_batch()
    batch["boxes"][0] = torch.tensor([[0, 0, 33, 33], [0, 0, 33, 33]], dtype=torch.float32)
    batch["flips"][0] = torch.tensor([False, False])
    batch["image_size"][0] = torch.tensor([65, 65])          # (33 - 1) / 64 = 1/2: exact bins
    loss, _ = run_method(method, batch)

    b64 = as64(batch)
    coords = pixpro_boxes(b64["boxes"], b64["flips"], b64["image_size"])
    distance = pixpro_distance(coords[:, 0], coords[:, 1], GRID)
    assert int((distance[0] == 1.0).sum()) == 2 * (GRID - 1) ** 2 * 2   # the ties exist
    expected, mask, _ = pixpro_reference(ref, b64, threshold=1.0)
    assert int(mask[0].sum()) == GRID * GRID + 4 * GRID * (GRID - 1)   # self + 4-neighbours
    expected.backward()
    assert_loss(loss, expected)
    check_gradients(method, ref)


# ---------------------------------------------------------------------------------- DenseSiam

def densesiam_reference(ref, b64, weights=(1.0, 1.0, 0.1), region_stop_gradient=False):
    """engine/methods/densesiam.py's docstring, with our geometry and bilinear sampling.
    region_stop_gradient: a deliberately WRONG variant (view b's side of the region contrast
    detached), to show the gradient check can see it."""
    h = ref.hyper
    k_regions, tau = h.regions, 0.1
    features = [feature_map(ref.encoder, b64[v]) for v in ("view1", "view2")]
    z = [ref.dense_projector(f) for f in features]
    p = [ref.dense_predictor(zv) for zv in z]
    loss_pixel = torch.zeros((), dtype=torch.float64)
    loss_region = torch.zeros((), dtype=torch.float64)
    for a, b, boxes, flips in directions(b64):
        location, inside = cell_map(boxes, flips, GRID)
        valid = inside.double()                                          # (B, G²)
        z_b = bilinear(z[b], location)                                   # (B, D, G²), in graph
        # PixSim: −cos(p_a,i, sg z_b(T(i))), mean over the overlap cells of the batch
        cos = (l2n(p[a].flatten(2), 1) * l2n(z_b.detach(), 1)).sum(1)
        loss_pixel = loss_pixel + (-(cos * valid).sum() / valid.sum()) / 2
        # RegionSim: soft masks over the overlap, no stop-gradient anywhere
        m_a = torch.softmax(ref.region_head(z[a]), dim=1).flatten(2)     # (B, K, G²)
        m_b = bilinear(torch.softmax(ref.region_head(z[b]), dim=1), location)
        r_a = torch.einsum("bkn,bdn->bkd", m_a * valid[:, None], z[a].flatten(2))
        r_b = torch.einsum("bkn,bdn->bkd", m_b * valid[:, None], z_b)
        if region_stop_gradient:
            r_b = r_b.detach()
        batch, _, dim = r_a.shape
        pz_a = ref.region_projector(r_a.reshape(batch * k_regions, dim))
        pz_b = ref.region_projector(r_b.reshape(batch * k_regions, dim))
        p_hat = l2n(ref.region_predictor(pz_a), 1).reshape(batch, k_regions, dim)
        z_hat = l2n(pz_b, 1).reshape(batch, k_regions, dim)
        logits = torch.einsum("bkd,bld->bkl", p_hat, z_hat) / tau
        log_prob = torch.log_softmax(logits, dim=-1)
        # mean over the images whose views overlap (an image without overlap adds nothing)
        has = inside.any(dim=1).double()
        per_image = -torch.diagonal(log_prob, dim1=1, dim2=2).mean(dim=1)
        loss_region = loss_region + (per_image * has).sum() / has.sum().clamp(min=1) / 2
    zg = [ref.global_projector(f.mean((2, 3))) for f in features]
    pg = [ref.global_predictor(v) for v in zg]
    loss_global = -((l2n(pg[0], 1) * l2n(zg[1].detach(), 1)).sum(1).mean()
                    + (l2n(pg[1], 1) * l2n(zg[0].detach(), 1)).sum(1).mean()) / 2
    w_global, w_pixel, w_region = weights          # docstring defaults: 1, 1, 0.1
    loss = w_global * loss_global + w_pixel * loss_pixel + w_region * loss_region
    return loss, loss_global, loss_pixel, loss_region


def test_densesiam_loss_and_gradients():
    method = make_method("densesiam")
    h = method.hyper
    assert (h.region_temperature, h.global_weight, h.pixel_weight, h.region_weight) == \
        (0.1, 1.0, 1.0, 0.1)
    ref = copy.deepcopy(method).double()
    batch = synthetic_batch()
    loss, figures = run_method(method, batch)

    expected, l_global, l_pixel, l_region = densesiam_reference(ref, as64(batch))
    expected.backward()
    assert_loss(figures["loss_global"], l_global, "loss_global")
    assert_loss(figures["loss_pixel"], l_pixel, "loss_pixel")
    assert_loss(figures["loss_region"], l_region, "loss_region")
    assert_loss(loss, expected)
    check_gradients(method, ref)


def test_densesiam_region_contrast_is_not_stop_gradient():
    """Region term alone (other weights 0): the gradient reaches the dense projector through BOTH
    sides of the region logits; the same reference with ẑ_b detached gives a different gradient
    (so the check above has the power to see a stop-gradient there)."""
    method = make_method("densesiam", global_weight=0.0, pixel_weight=0.0, region_weight=1.0)
    ref = copy.deepcopy(method).double()
    ref_sg = copy.deepcopy(method).double()
    batch = synthetic_batch()
    run_method(method, batch)
    densesiam_reference(ref, as64(batch), weights=(0.0, 0.0, 1.0))[0].backward()
    check_gradients(method, ref)

    # a stop-gradient variant: view b's region embeddings detached
    densesiam_reference(ref_sg, as64(batch), weights=(0.0, 0.0, 1.0),
                        region_stop_gradient=True)[0].backward()
    weight = "dense_projector.0.weight"
    got = dict(method.named_parameters())[weight].grad.double()
    sg = dict(ref_sg.named_parameters())[weight].grad
    assert rel_err(got, sg) > 1e-2


# ------------------------------------------------------------------------------------ LC-loss

def lcloss_reference(ref, b64):
    """engine/methods/lcloss.py's docstring, with our geometry and bilinear sampling."""
    tau, lam, radius = 0.1, 1.0, 1.0
    views = [b64["view1"], b64["view2"]]
    features = [feature_map(ref.encoder, v) for v in views]
    q = [ref.predictor(ref.projector(f.mean((2, 3)))) for f in features]
    u = [ref.dense_predictor(ref.dense_projector(f)) for f in features]
    with torch.no_grad():
        target_features = [feature_map(ref.target_encoder, v) for v in views]
        z = [ref.target_projector(f.mean((2, 3))) for f in target_features]
        u_bar = [ref.target_dense_projector(f) for f in target_features]
    loss_byol = sum((2 - 2 * (l2n(q[a], 1) * l2n(z[b], 1)).sum(1)).mean()
                    for a, b in ((0, 1), (1, 0)))
    cells = torch.stack(torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij"),
                        -1).reshape(GRID * GRID, 2).double()
    loss_local = torch.zeros((), dtype=torch.float64)
    for a, b, boxes, flips in directions(b64):
        location, inside = cell_map(boxes, flips, GRID)
        positive = l2n(bilinear(u_bar[b], location), 1)                  # (B, D, N), no grad
        online = l2n(u[a].flatten(2), 1)
        target = l2n(u_bar[b].flatten(2), 1)
        pos = (online * positive).sum(1) / tau                            # (B, N)
        neg = torch.einsum("bdi,bdj->bij", online, target) / tau          # (B, N, N)
        # cells sharing the bilinear support of T(i) (Chebyshev distance < 1 cell) are no negatives
        offset = (location[:, :, None, :] - cells[None, None]).abs()
        near = (offset[..., 0] < radius) & (offset[..., 1] < radius)
        neg = neg.masked_fill(near, float("-inf"))
        ell = torch.logsumexp(torch.cat([pos[..., None], neg], -1), -1) - pos
        valid = inside.double()
        loss_local = loss_local + (ell * valid).sum() / valid.sum() / 2
    return loss_byol + lam * loss_local, loss_byol, loss_local


def test_lcloss_loss_and_gradients():
    method = make_method("lcloss")
    h = method.hyper
    assert (h.temperature, h.lc_weight, h.exclude_radius) == (0.1, 1.0, 1.0)
    ref = copy.deepcopy(method).double()
    batch = synthetic_batch(5)      # + identical dyadic boxes: neighbours exactly 1 cell away
    loss, figures = run_method(method, batch)

    expected, l_byol, l_local = lcloss_reference(ref, as64(batch))
    expected.backward()
    assert_loss(figures["loss_byol"], l_byol, "loss_byol")
    assert_loss(figures["loss_local"], l_local, "loss_local")
    assert_loss(loss, expected)
    check_gradients(method, ref)


# ------------------------------------------------------------------------------- before_step

@pytest.mark.parametrize("name", ["mocov2", "densecl", "pixpro", "lcloss"])
def test_before_step_moves_targets_to_the_ema(name):
    method = make_method(name, backbone="resnet18" if name == "pixpro" else "vit")
    with torch.no_grad():
        for pname, p in method.named_parameters():
            if not pname.startswith("target_") and p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    params = dict(method.named_parameters())
    targets = {n: p for n, p in params.items() if n.startswith("target_")}
    assert targets
    buffers = {n: b.clone() for n, b in method.named_buffers()}
    for momentum in (0.9, 0.99):
        before = {n: p.detach().clone() for n, p in targets.items()}
        online = {n: params[n[len("target_"):]].detach().clone() for n in targets}
        method.before_step(momentum)
        for n, p in targets.items():
            expected = momentum * before[n] + (1 - momentum) * online[n]
            assert torch.allclose(p, expected, rtol=1e-6, atol=1e-7), n
            if params[n[len("target_"):]].requires_grad:
                assert not torch.equal(p, before[n]), f"{n} did not move"
    for n, b in method.named_buffers():     # BN running stats and queues are not averaged
        assert torch.equal(b, buffers[n]), n


def test_densesiam_before_step_changes_nothing():
    method = make_method("densesiam")
    state = {n: t.clone() for n, t in method.state_dict().items()}
    method.before_step(0.9)
    for n, t in method.state_dict().items():
        assert torch.equal(t, state[n]), n
