"""The training step's semantics, stated directly (each test fails if one line of the step is wrong).

Each property is checked against something computed here by hand, never against the trainer itself:
  * one SIM optimiser step (accum = 2) against a float64 step written from the spec: EMA first
    (ξ ← m·ξ + (1−m)·θ), targets of every micro-batch, ONE F over all of them, per micro-batch the
    block mask, its visible set, the view-1 → view-2 relative geometry, the UniGrad loss divided by
    the number of micro-batches; then the gradient clip and AdamW's first update with the lr given;
  * the target after one EMA step equals m·ξ + (1−m)·θ with θ the online weights before the update;
  * masks differ between steps and micro-batches, hold exactly G² − K visible patches none of which
    is masked, and are the same after a resume;
  * the peak learning rate is blr × (batch × accum × ranks) / 256.
Everything runs on the embedded photos, so nothing here skips on a clone without ../shared/data.
"""
from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn.functional as F

from engine.masking import make_mask, mask_generator
from engine.presets import PretrainConfig
from engine.trainer import RunOptions, StepSession, make_optimizer, optimisation_step, pretrain
from pipelines.augment import recipe_augment
from pipelines.datasets import sample_photos
from pipelines.geometry import relative_geometry
from pipelines.torch_loader import TwoViewLoader



def tiny_sim(**changes) -> PretrainConfig:
    values = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=2, decoder_dim=32,
                  decoder_heads=2, projector_depth=1, predictor_depth=1, batch_size=4, accum=1,
                  steps=6, warmup_steps=2, blr=1e-2, crop_scale=(0.2, 1.0), blur=False,
                  workers=0, log_every=1, checkpoint_every=1000, precision="fp32",
                  preset="test-semantics")
    values.update(changes)
    return PretrainConfig(**values).validate()


def photo_batches(cfg: PretrainConfig, count: int, seed: int = 0) -> list[dict]:
    loader = TwoViewLoader(sample_photos(), recipe_augment(cfg.img_size, scale=cfg.crop_scale,
                                                           blur=False),
                           batch_size=cfg.batch_size, workers=0, seed=seed)
    batches = list(loader.epoch_batches(0))[:count]
    assert len(batches) == count
    return batches


def sim_session(cfg: PretrainConfig, model_dtype=torch.float32) -> StepSession:
    from engine.methods.sim import SIM

    torch.manual_seed(0)
    model = SIM(cfg).to(model_dtype).train()
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return StepSession(cfg, model, model, optimizer, scaler, torch.device("cpu"), None,
                       {"patch_gather": "reference", "relpos_embed": "reference",
                        "unigrad_loss": "reference"})


def mask_seed_generator(cfg: PretrainConfig, step: int, micro: int) -> torch.Generator:
    return mask_generator(cfg.seed, 0, step, micro, torch.device("cpu"))


def ema_pairs(model) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    pairs = []
    for online_name, target_name in (("encoder", "target_encoder"),
                                     ("projector", "target_projector")):
        online, target = getattr(model, online_name), getattr(model, target_name)
        for (name, p_online), (_, p_target) in zip(online.named_parameters(),
                                                   target.named_parameters()):
            if p_online.requires_grad:
                pairs.append((f"{online_name}.{name}", p_online, p_target))
    return pairs


def perturb_targets(model, scale: float = 0.05) -> None:
    """Make the EMA target differ from the online network, so m and 1−m are distinguishable."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, _, target in ema_pairs(model):
            target.add_(scale * torch.randn(target.shape, generator=generator,
                                            dtype=target.dtype))


# ----------------------------------------------------------------------------- the hand step

def hand_gradients(model, cfg: PretrainConfig, batches: list[dict], step: int, momentum: float):
    """Gradients of one SIM step written from spec/SIM.md §6/§10 (no trainer code): the EMA, F
    and the loss in float64 on the model's outputs (the model's own layers run as they do, in fp32:
    its norms and kernels are fp32 by design)."""
    model = copy.deepcopy(model)
    with torch.no_grad():                                   # 1. EMA, before the target forward
        for _, online, target in ema_pairs(model):
            target.copy_((momentum * target.double() + (1 - momentum) * online.double())
                         .to(target.dtype))
    channels, lam = cfg.decoder_dim, cfg.neg_weight
    with torch.no_grad():                                   # 2. every micro-batch's targets, one F
        targets = [F.layer_norm(model.forward_target(b["view2"]).double(), (channels,), eps=1e-5)
                   for b in batches]
        rows = torch.cat([t.reshape(-1, channels) for t in targets])
        covariance = rows.T @ rows / rows.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    grid, masked = cfg.grid, cfg.num_masked
    for micro, (batch, target) in enumerate(zip(batches, targets)):
        mask = make_mask(cfg.mask_kind, len(batch["view1"]), grid, masked,
                         generator=mask_seed_generator(cfg, step, micro))
        visible_idx = torch.stack([torch.nonzero(~row).flatten() for row in mask])
        assert visible_idx.shape[1] == grid * grid - masked
        rel = relative_geometry(batch["boxes"], batch["flips"], batch["image_size"])
        pred = model.forward_online(batch["view1"], visible_idx, rel,
                                    backends={"patch_gather": "reference",
                                              "relpos_embed": "reference"}).double()
        residual = (pred - target).pow(2).sum(-1).mean()
        negatives = torch.einsum("bnc,cd,bnd->bn", pred, covariance, pred).mean()
        total = total + (residual + lam * negatives) / channels / len(batches)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, [p for _, p in trainable], allow_unused=True)
    grads = {name: (torch.zeros_like(p) if g is None else g).double()
             for (name, p), g in zip(trainable, grads)}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    clip = min(1.0, cfg.clip_grad / (float(norm) + 1e-6))
    return {name: g * clip for name, g in grads.items()}, float(total.detach()), model


def test_one_sim_step_equals_a_float64_step_written_from_the_spec():
    cfg = tiny_sim(accum=2)
    session = sim_session(cfg)
    perturb_targets(session.method)
    batches = photo_batches(cfg, 2)
    step, momentum, lr = 3, 0.9, 0.05
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    before = {name: p.detach().clone() for name, p in session.method.named_parameters()}
    expected_grads, expected_loss, expected_model = hand_gradients(session.method, cfg, batches,
                                                                   step, momentum)
    seen = {}

    def capture(optimizer, args, kwargs):
        for name, p in session.method.named_parameters():
            if p.grad is not None:
                seen[name] = p.grad.detach().clone()

    handle = session.optimizer.register_step_pre_hook(capture)
    try:
        loss, grad_norm, _ = optimisation_step(session, batches, step, momentum)
    finally:
        handle.remove()

    # The loss of the step is the mean of the micro-batch losses (each divided by accum).
    assert math.isclose(float(loss), expected_loss, rel_tol=1e-5), (float(loss), expected_loss)
    # Gradients (after clipping) equal the float64 step's, parameter by parameter.
    assert seen.keys() == expected_grads.keys()
    scale = max(float(g.abs().max()) for g in expected_grads.values())
    for name, grad in expected_grads.items():
        torch.testing.assert_close(seen[name].double(), grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=f"gradient of {name}")
    # EMA: the target equals the hand-updated one (m·ξ + (1−m)·θ with θ before the step).
    for name, p_online, p_target in ema_pairs(session.method):
        hand = dict(expected_model.named_parameters())["target_" + name]
        torch.testing.assert_close(p_target.detach(), hand.detach(), rtol=1e-6, atol=1e-7)
    # AdamW's first step with the lr given: p ← p(1 − lr·wd) − lr·g/(|g| + eps) (bias-corrected
    # moments are g and g² at step 1); no decay on biases, norms and other 1-d tensors.
    decayed = {id(p) for g in session.optimizer.param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    for name, p in session.method.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), before[name]) or name.startswith("target_"), name
            continue
        wd = cfg.weight_decay if id(p) in decayed else 0.0
        assert (wd > 0) == (p.ndim >= 2 and not name.endswith(".bias")), name
        g = seen[name]
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_ema_target_after_one_step_is_m_xi_plus_one_minus_m_theta():
    cfg = tiny_sim()
    session = sim_session(cfg)
    perturb_targets(session.method)
    pairs = ema_pairs(session.method)
    theta = {name: online.detach().clone() for name, online, _ in pairs}
    xi = {name: target.detach().clone() for name, _, target in pairs}
    for group in session.optimizer.param_groups:
        group["lr"] = 0.1   # the online weights move in this step; the EMA must use them before
    momentum = 0.8
    optimisation_step(session, photo_batches(cfg, 1), 0, momentum)
    moved = 0
    for name, online, target in pairs:
        expected = momentum * xi[name] + (1 - momentum) * theta[name]
        torch.testing.assert_close(target.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
        moved += int(not torch.equal(online.detach(), theta[name]))
    assert moved > 0  # the optimiser did update the online network after the EMA


def visible_sets_seen(monkeypatch) -> list[torch.Tensor]:
    """Every visible_idx the online forward receives, in call order."""
    from engine.methods.sim import SIM

    seen = []
    real = SIM.forward_online

    def spy(self, view1, visible_idx, rel_geometry, backends=None):
        seen.append(visible_idx.detach().clone())
        return real(self, view1, visible_idx, rel_geometry, backends)

    monkeypatch.setattr(SIM, "forward_online", spy)
    return seen


def test_masks_differ_between_steps_never_leak_and_repeat_on_resume(monkeypatch, tmp_path):
    cfg = dict(steps=4, batch_size=4, accum=2, checkpoint_every=2)
    seen = visible_sets_seen(monkeypatch)
    pretrain(tiny_sim(**cfg), RunOptions(out=tmp_path / "straight", device="cpu", fused=False,
                                         quiet=True))
    straight = list(seen)
    config = tiny_sim(**cfg)
    grid2, masked = config.grid ** 2, config.num_masked
    assert len(straight) == 8  # 4 steps x 2 micro-batches
    for visible in straight:
        assert visible.shape == (4, grid2 - masked)
        for row in visible:  # sorted, distinct, in range: exactly the unmasked patches
            assert torch.equal(row, torch.unique(row)) and int(row.max()) < grid2
    # Each (step, micro) draws its own mask, and it is the one the hand step would draw.
    flat = [tuple(v.flatten().tolist()) for v in straight]
    assert len(set(flat)) == len(flat)
    for index, visible in enumerate(straight):
        step, micro = divmod(index, 2)
        mask = make_mask(config.mask_kind, 4, config.grid, masked,
                         generator=mask_seed_generator(config, step, micro))
        expected = torch.stack([torch.nonzero(~row).flatten() for row in mask])
        assert torch.equal(visible, expected), (step, micro)
    # A run stopped after 2 steps and resumed sees the same masks at steps 3 and 4.
    seen.clear()
    pretrain(tiny_sim(**cfg), RunOptions(out=tmp_path / "split", device="cpu", fused=False,
                                         quiet=True, stop_after=2))
    pretrain(tiny_sim(**cfg), RunOptions(out=tmp_path / "split", device="cpu", fused=False,
                                         quiet=True, resume=True))
    assert len(seen) == 8
    for a, b in zip(seen, straight):
        assert torch.equal(a, b)


def test_peak_lr_is_blr_times_global_batch_over_256(tmp_path):
    cfg = tiny_sim(batch_size=4, accum=3, steps=1, warmup_steps=0, blr=2e-3)
    result = pretrain(cfg, RunOptions(out=tmp_path / "lr", device="cpu", fused=False, quiet=True))
    record = json.loads((result["out"] / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isclose(record["lr"], 2e-3 * 12 / 256, rel_tol=1e-12)  # step 0: the peak
    saved = torch.load(result["out"] / "checkpoint.pt", weights_only=False)
    assert math.isclose(saved["schedule"]["peak_lr"], 2e-3 * 12 / 256, rel_tol=1e-12)
