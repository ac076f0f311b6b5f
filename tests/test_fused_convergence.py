"""--fused vs --no-fused: a tiny SIM trained 50 steps from the same seed gives the same loss curve.

On a machine without CUDA the fused path runs the Triton kernels in the interpreter
(TRITON_INTERPRET=1, set by the root conftest), so this checks the kernels inside real training.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine.fused import choose_kernels
from engine.presets import PretrainConfig
from engine.trainer import RunOptions, pretrain

STEPS = 50
# fp32 on both paths; the kernels reorder fp32 sums, and 50 steps of training amplify that a
# little. A wrong gradient or a wrong query embedding shows up as a gap of several percent.
RELATIVE_TOLERANCE = 0.01


def tiny_config() -> PretrainConfig:
    return PretrainConfig(img_size=32, patch_size=8, dim=32, depth=2, heads=2, decoder_dim=32,
                          decoder_heads=2, projector_depth=1, predictor_depth=1, batch_size=8,
                          steps=STEPS, warmup_steps=5, blr=3e-2, crop_scale=(0.2, 1.0),
                          blur=False, workers=0, log_every=1, checkpoint_every=1000,
                          # the same loader on both sides: --fused also prefers the fast loaders
                          loader="torch", preset="test-convergence").validate()


def curve(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fused_and_reference_loss_curves_agree(tmp_path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set: the fused path cannot run")
    chosen = choose_kernels(True, device)
    assert chosen.any_fused, chosen.message
    runs = {}
    for fused in (False, True):
        out = tmp_path / ("fused" if fused else "reference")
        pretrain(tiny_config(), RunOptions(out=out, device=device.type, fused=fused, quiet=True))
        runs[fused] = curve(out)
    reference, fused = runs[False], runs[True]
    assert len(reference) == len(fused) == STEPS
    gaps = [abs(a - b) / abs(a) for a, b in zip(reference, fused)]
    assert max(gaps) < RELATIVE_TOLERANCE, (max(gaps), reference[-5:], fused[-5:])
    assert fused[-1] < 0.8 * fused[0]  # and it trains


DENSE_TINY_ARGS = {
    "mocov2": dict(queue_length=64, hidden=32, dim=16),
    "densecl": dict(queue_length=64, hidden=32, dim=16),
    "pixpro": dict(hidden=32, dim=16),
    "densesiam": dict(global_dim=32, global_pred_hidden=8, dense_hidden=32, dense_dim=16,
                      dense_pred_hidden=8, regions=4),
    "lcloss": dict(hidden=32, dim=16, dense_hidden=32, dense_dim=16),
}


@pytest.mark.parametrize("method", list(DENSE_TINY_ARGS))
def test_fused_and_reference_steps_agree_for_each_dense_method(method, tmp_path):
    """Three steps of every dense method with its Triton kernels (queue_infonce, dense_match,
    pixpro_loss, pixel_propagation) vs the reference path: the same losses and weights."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set: the fused path cannot run")
    from engine.presets import preset_config

    values = preset_config(f"{method}-demo-cpu").to_dict()
    values.update(backbone="vit", img_size=32, patch_size=8, dim=32, depth=1, heads=2,
                  batch_size=4, steps=3, warmup_steps=1, workers=0, log_every=1, loader="torch",
                  precision="fp32", checkpoint_every=1000, method_args=DENSE_TINY_ARGS[method],
                  preset="test-fused")
    states = {}
    for fused in (False, True):
        out = tmp_path / ("fused" if fused else "reference")
        result = pretrain(PretrainConfig.from_dict(values).validate(),
                          RunOptions(out=out, device=device.type, fused=fused, quiet=True))
        assert any(b == "triton" for b in result["kernels"].values()) == fused
        states[fused] = (curve(out), result["model"].state_dict())
    (ref_curve, ref_state), (fused_curve, fused_state) = states[False], states[True]
    torch.testing.assert_close(torch.tensor(fused_curve), torch.tensor(ref_curve), rtol=1e-4,
                               atol=1e-5)
    for name, value in ref_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(fused_state[name], value, rtol=1e-3, atol=1e-4, msg=name)
