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
