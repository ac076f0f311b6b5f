"""The SIM model: shapes, frozen parts, fixed tables, EMA, parameter groups, schedules."""
from __future__ import annotations

import math

import pytest
import torch

from engine.masking import make_mask, visible_indices
from engine.methods.sim import SIM, sim_flops_per_image
from engine.presets import PRESETS, PretrainConfig, preset_config
from engine.schedules import ema_momentum, learning_rate
from engine.optim import parameter_groups
from kernels import absolute_sincos_table


def tiny_config(**changes) -> PretrainConfig:
    values = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=2, decoder_dim=32,
                  decoder_heads=2, projector_depth=1, predictor_depth=1, batch_size=4)
    values.update(changes)
    return PretrainConfig(**values).validate()


def test_forward_shapes_and_target_equals_online_at_start():
    cfg = tiny_config()
    model = SIM(cfg)
    view1, view2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    mask = make_mask("block", 4, cfg.grid, cfg.num_masked, generator=torch.Generator().manual_seed(0))
    visible = visible_indices(mask)
    rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]).repeat(4, 1)
    pred = model.forward_online(view1, visible, rel)
    assert pred.shape == (4, cfg.grid ** 2, cfg.decoder_dim)
    target = model.forward_target(view2)
    assert target.shape == (4, cfg.grid ** 2, cfg.decoder_dim) and not target.requires_grad
    for (name, p_online), (_, p_target) in zip(model.encoder.named_parameters(),
                                              model.target_encoder.named_parameters()):
        assert torch.equal(p_online, p_target), name
    # the target on the full view equals the online encoder + projector on all patches
    online_full = model.projector(model.encoder(view2))[:, 1:]
    torch.testing.assert_close(online_full, target)


def test_patch_embedding_frozen_positions_fixed_row_half_first():
    cfg = tiny_config()
    model = SIM(cfg)
    assert not model.encoder.patch_embed.proj.weight.requires_grad
    assert not model.encoder.patch_embed.proj.bias.requires_grad
    assert "encoder.pos_embed" in dict(model.named_buffers())
    pos = model.encoder.pos_embed[0]
    assert torch.all(pos[0] == 0)  # cls slot
    torch.testing.assert_close(pos[1:], absolute_sincos_table(cfg.grid, cfg.dim))
    quarter = cfg.dim // 4
    # patch (row 1, col 0): the row half varies (sin(1·ω0) = sin 1), the column half is sin(0)=0
    row1col0 = pos[1 + cfg.grid]
    assert row1col0[0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert row1col0[2 * quarter].item() == pytest.approx(0.0, abs=1e-7)


def test_masked_patches_do_not_influence_online_encoder():
    cfg = tiny_config()
    model = SIM(cfg).eval()
    view1 = torch.randn(2, 3, 32, 32)
    visible = torch.tensor([[0, 3, 5, 6, 9, 12], [1, 2, 7, 8, 10, 15]])
    changed = view1.clone()
    changed[:, :, 8:16, 0:8] += 100.0  # patch 4 (row 1, col 0): masked in both samples
    tokens_a = model.encoder.embed_patches(view1, visible)
    tokens_b = model.encoder.embed_patches(changed, visible)
    torch.testing.assert_close(tokens_a, tokens_b)


def test_ema_update_is_lerp_and_skips_frozen():
    cfg = tiny_config()
    model = SIM(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for (p_online, p_target, old) in zip(model.encoder.parameters(),
                                         model.target_encoder.parameters(), before):
        if p_online.requires_grad:
            torch.testing.assert_close(p_target, 0.9 * old + 0.1 * p_online)
        else:
            assert torch.equal(p_target, old)


def test_weight_decay_groups_cover_tokens_not_biases_or_frozen():
    model = SIM(tiny_config())
    decay, no_decay = parameter_groups(model, 0.05)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(model.encoder.cls_token) in ids(decay)
    assert id(model.mask_token) in ids(decay)
    assert id(model.decoder_pos_mlp.weight) in ids(decay)
    assert id(model.decoder_pos_mlp.bias) in ids(no_decay)
    assert id(model.encoder.blocks[0].norm1.weight) in ids(no_decay)
    frozen = {id(p) for p in model.target_encoder.parameters()} | {
        id(model.encoder.patch_embed.proj.weight)}
    assert not frozen & (ids(decay) | ids(no_decay))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == ids(decay) | ids(no_decay)


def test_schedules():
    assert learning_rate(0, 100, 10, 1e-3) == 0.0
    assert learning_rate(5, 100, 10, 1e-3) == pytest.approx(5e-4)
    assert learning_rate(10, 100, 10, 1e-3) == pytest.approx(1e-3)
    assert learning_rate(55, 100, 10, 1e-3) == pytest.approx(5e-4)
    assert learning_rate(100, 100, 10, 1e-3) == pytest.approx(0.0, abs=1e-12)
    assert ema_momentum(0, 100) == pytest.approx(0.995)
    assert ema_momentum(50, 100) == pytest.approx(0.9975)
    assert ema_momentum(100, 100) == pytest.approx(1.0)


def test_presets_are_valid_and_recipe_constants():
    for name in PRESETS:
        preset_config(name).validate()
    b16 = preset_config("sim-vit-b16")
    assert (b16.grid, b16.num_masked, b16.effective_batch) == (14, 118, 4096)
    assert b16.lr == pytest.approx(1.0e-3)
    assert b16.betas == (0.9, 0.95) and b16.weight_decay == 0.05 and b16.clip_grad == 1.0
    # spec §9.2: ≈ 141 GFLOP per image per step (its estimate runs decoder_pred on all 275
    # tokens and counts the backward of the 0.23 GFLOP frozen patch embedding; we do neither)
    assert sim_flops_per_image(b16) / 1e9 == pytest.approx(141, rel=0.03)
    cifar = preset_config("sim-vit-t4-cifar")
    assert (cifar.grid, cifar.patch_size, cifar.img_size) == (8, 4, 32)


def test_predictor_buffer_matches_concatenation_values_and_gradients():
    """forward_online writes the queries straight into the predictor-input buffer; the result and
    every gradient must equal the plain torch.cat formulation of spec §4.1."""
    from kernels import relpos_embed

    cfg = tiny_config()
    model = SIM(cfg)
    view1 = torch.randn(3, 3, 32, 32)
    visible = visible_indices(make_mask("block", 3, cfg.grid, cfg.num_masked,
                                        generator=torch.Generator().manual_seed(1)))
    rel = torch.tensor([[0.1, -0.2, 1.3, 0.8, 1.0, 0.4], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                        [-0.3, 0.5, 0.7, 1.2, 0.0, 0.2]])

    def concatenated():
        tokens = model.encoder.embed_patches(view1, visible, backend="reference")
        hidden = model.projector(model.encoder.forward_tokens(tokens))
        queries = model.mask_token + model.decoder_pos_mlp(relpos_embed(rel, cfg.grid,
                                                                        cfg.decoder_dim))
        x = torch.cat([hidden[:, :1], hidden[:, 1:] + model.decoder_pos_embed[visible], queries], 1)
        for block in model.predictor:
            x = block(x)
        return model.decoder_pred(x[:, 1 + visible.shape[1]:])

    params = [model.mask_token, model.decoder_pos_mlp.weight, model.decoder_pos_mlp.bias,
              model.encoder.cls_token, model.encoder.blocks[0].attn.qkv.weight]
    outputs, grads = [], []
    for forward in (lambda: model.forward_online(view1, visible, rel), concatenated):
        pred = forward()
        outputs.append(pred)
        grads.append(torch.autograd.grad((pred * torch.linspace(-1, 1, pred.numel())
                                          .reshape(pred.shape)).sum(), params))
    torch.testing.assert_close(outputs[0], outputs[1])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
