"""Step-level semantics of the dense methods through `optimisation_step`, as tests/
test_step_semantics.py states them for SIM: the loss divided by the number of micro-batches, one
queue per step (enqueued after the last micro-batch), and accumulation equal to a bigger batch where
no BatchNorm sits in the way."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.methods import StepContext, build_method
from engine.loaders import build_augment
from engine.presets import PretrainConfig, preset_config
from engine.trainer import StepSession, make_optimizer, optimisation_step
from pipelines.augment import augment_recipe
from pipelines.datasets import sample_photos
from pipelines.torch_loader import TwoViewLoader

SMALL = {
    "mocov2": dict(queue_length=32, hidden=32, dim=16),
    "densecl": dict(queue_length=32, hidden=32, dim=16),
    "pixpro": dict(hidden=32, dim=16),
    "densesiam": dict(global_dim=32, global_pred_hidden=8, dense_hidden=32, dense_dim=16,
                      dense_pred_hidden=8, regions=4),
    "lcloss": dict(hidden=32, dim=16, dense_hidden=32, dense_dim=16),
    "swav": dict(prototypes=16, hidden=32, dim=16, freeze_prototypes_steps=0),
    "regioncl": dict(queue_length=32, hidden=32, dim=16),
    "detco": dict(queue_length=32, hidden=32, dim=16),
    "scfs": dict(dim=64, hidden=32, bottleneck=16, layer_dim=16, layer_hidden=24,
                 layer_bottleneck=8),
}
REFERENCE = {op: "reference" for op in ("patch_gather", "relpos_embed", "unigrad_loss",
                                         "dense_match", "pixpro_loss", "queue_infonce",
                                         "pixel_propagation")}


def config(method: str, batch_size: int) -> PretrainConfig:
    values = preset_config(f"{method}-demo-cpu").to_dict()
    values.update(backbone="vit", img_size=32, patch_size=8, dim=32, depth=1, heads=2,
                  batch_size=batch_size, precision="fp32", method_args=SMALL[method],
                  clip_grad=0.0, preset="test-step")
    return PretrainConfig.from_dict(values).validate()


def photo_batches(batch_size: int, count: int, recipe: str, method: str | None = None
                  ) -> list[dict]:
    """Batches of the embedded photos as the method's views ask (multi-crop for SwAV)."""
    augment = augment_recipe(recipe, 32, blur=False)
    if method is not None:
        cfg = config(method, batch_size)
        views = build_method(cfg).views
        if views.crops:
            augment = build_augment(cfg, views)
    loader = TwoViewLoader(sample_photos(), augment, batch_size=batch_size, workers=0, seed=1)
    return list(loader.epoch_batches(0))[:count]


def merge(batches: list[dict]) -> dict:
    merged = {}
    for key in ("view1", "view2", "boxes", "flips", "image_size"):
        merged[key] = torch.cat([b[key] for b in batches])
    return merged


def session(method: str, batch_size: int) -> StepSession:
    cfg = config(method, batch_size)
    torch.manual_seed(0)
    model = build_method(cfg).train()
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 0.0   # the test reads the gradients; nothing needs to move
    return StepSession(cfg, model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                       torch.device("cpu"), None, REFERENCE)


def step_gradients(s: StepSession, batches: list[dict], step: int = 0):
    grads = {}

    def capture(optimizer, args, kwargs):
        for name, p in s.method.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()

    handle = s.optimizer.register_step_pre_hook(capture)
    try:
        loss, _, figures = optimisation_step(s, batches, step, 0.99)
    finally:
        handle.remove()
    return loss, grads, figures


@pytest.mark.parametrize("method", ["mocov2", "densecl"])
def test_accum_two_of_b_equals_one_of_2b_without_batchnorm(method):
    """MoCo v2 and DenseCL on a ViT have no BatchNorm anywhere (LayerNorm backbone, BN-free
    heads), so two micro-batches of 4 must give the step of one batch of 8: same loss, same
    gradients, the same keys enqueued in the same order."""
    batches = photo_batches(4, 2, "mocov2")
    split, whole = session(method, 4), session(method, 8)
    whole.method.load_state_dict(split.method.state_dict())
    loss_split, grads_split, _ = step_gradients(split, batches)
    loss_whole, grads_whole, _ = step_gradients(whole, [merge(batches)])
    torch.testing.assert_close(loss_split, loss_whole, rtol=1e-5, atol=1e-6)
    assert grads_split.keys() == grads_whole.keys()
    for name in grads_split:
        torch.testing.assert_close(grads_split[name], grads_whole[name], rtol=1e-4, atol=1e-6,
                                   msg=name)
    for name, value in split.method.state_dict().items():
        if "queue" in name:
            torch.testing.assert_close(value, whole.method.state_dict()[name], rtol=1e-5,
                                       atol=1e-6, msg=name)
    assert int(split.method.queue.ptr) == 8


@pytest.mark.parametrize("method", list(SMALL))
def test_step_gradient_is_the_mean_of_the_micro_batch_gradients(method):
    """For every method (BatchNorm included): the step's gradient with accum = 2 is the mean of
    each micro-batch's own gradient, computed with the same targets and the same queue — the loss
    is divided by the number of micro-batches, and nothing is enqueued between them."""
    recipe = preset_config(f"{method}-demo-cpu").augmentation
    batches = photo_batches(4, 2, recipe, method)
    s = session(method, 4)
    before = copy.deepcopy(s.method.state_dict())
    loss, grads, figures = step_gradients(s, batches, step=0)

    fresh = session(method, 4)
    fresh.method.load_state_dict(before)
    fresh.method.before_step(0.99)
    per_micro, losses = [], []
    for micro, batch in enumerate(batches):
        ctx = StepContext(step=0, micro=micro, micro_batches=2, backends=REFERENCE, seed=0)
        fresh.method.zero_grad(set_to_none=True)
        value, _ = fresh.method(batch, ctx)
        value.backward()
        losses.append(value.detach())
        per_micro.append({n: p.grad.detach().clone() for n, p in fresh.method.named_parameters()
                          if p.grad is not None})
    torch.testing.assert_close(loss, sum(losses) / 2, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        expected = (per_micro[0][name] + per_micro[1][name]) / 2
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in figures.items():
        assert torch.isfinite(value), name


def test_queue_is_enqueued_after_the_step_with_every_micro_batch_in_order():
    batches = photo_batches(4, 3, "mocov2")
    s = session("mocov2", 4)
    queues_seen = []
    real = type(s.method).forward

    def spy(self, batch, ctx, prepared=None):
        queues_seen.append(self.queue.keys.detach().clone())
        return real(self, batch, ctx, prepared)

    type(s.method).forward = spy
    try:
        before = s.method.queue.keys.detach().clone()
        step_gradients(s, batches)
    finally:
        type(s.method).forward = real
    assert len(queues_seen) == 3 and all(torch.equal(q, before) for q in queues_seen)
    assert int(s.method.queue.ptr) == 12
    assert not torch.equal(s.method.queue.keys[:12], before[:12])
    assert torch.equal(s.method.queue.keys[12:], before[12:])
