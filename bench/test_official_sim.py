"""bench/official_sim.py (the official SIM step beside ours) on a CPU: the pieces that need no
official code, and -- where the official checkout is present (`bash bench/carry_official_sim.sh`
puts it into the ignored .official/; never committed) -- the whole comparison at a tiny size in a
subprocess (its compatibility shims never touch this test process). A plain test file; the GPU
measurement is `python -m bench.official_sim` in bench/gpu_suite.sh."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from bench.official_sim import (
    RECIPE,
    TINY,
    TimedBatches,
    as_benchmark,
    bar_summary,
    official_args,
    official_path,
)
from bench.report import render

OFFICIAL = official_path()
needs_official = pytest.mark.skipif(
    OFFICIAL is None, reason="no official SIM checkout (.official/ or $DENSESIM_OFFICIAL_SIM): "
                             "run bash bench/carry_official_sim.sh")


def test_timed_batches_time_whole_loop_steps():
    data = TimedBatches("batch", 3)
    assert len(data) == 3
    for item in data:
        assert item == "batch"
        time.sleep(0.01)
    seconds = data.step_seconds()
    assert len(seconds) == 3 and all(s >= 0.009 for s in seconds)


def _result(variant, implementation, img_per_s, precision="bf16"):
    return {"seconds": [128 / img_per_s] * 3, "median": 128 / img_per_s, "img_per_s": img_per_s,
            "step_ms": 128e3 / img_per_s, "batch": 128, "variant": variant,
            "precision": precision, "implementation": implementation}


def test_results_render_with_a_vs_official_column(tmp_path):
    benches = [as_benchmark(_result("official", "official", 600.0), "vit_b16"),
               as_benchmark(_result("official_ddp", "official", 550.0), "vit_b16"),
               as_benchmark(_result("fused", "densesim", 1500.0), "vit_b16")]
    assert benches[2]["name"] == "official_sim_step[vit_b16-bf16-fused]"
    assert "seconds" not in benches[0]["extra_info"] and benches[0]["stats"]["rounds"] == 3
    assert bar_summary(benches) == ("bar: ours fused / official at bf16: 2.50x (meets the 2x bar)")
    path = tmp_path / "official_sim.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    text = render([path])
    assert "## official_sim" in text
    row = next(line for line in text.splitlines() if "[vit_b16-bf16-fused]" in line)
    assert "2.50×" in row


def test_sizes():
    assert RECIPE.grid == 14 and RECIPE.num_masked == 118 and RECIPE.batch_size == 128
    assert TINY.grid == 4 and TINY.num_masked < TINY.grid ** 2


@needs_official
def test_official_arguments_are_its_released_recipe():
    args = official_args(OFFICIAL, RECIPE, "bf16", ddp=False)
    assert (args.model, args.decoder_embed_dim, args.batch_size) == ("sim_vit_base_patch16", 768, 128)
    assert args.with_blockwise_mask and args.blockwise_num_masking_patches == 118
    assert (args.projector_depth, args.predictor_depth, args.loss_type) == (2, 4, "sim")
    assert (args.mm, args.mmschedule, args.clip_grad, args.neg_weight) == (0.995, "cosine", 1.0, 0.02)
    assert args.lr == pytest.approx(6.25e-5 * 128 / 256) and not args.fp32


@needs_official
def test_official_step_runs_beside_ours_at_a_tiny_size(tmp_path):
    out = tmp_path / "official_sim.json"
    done = subprocess.run([sys.executable, "-m", "bench.official_sim", "--tiny", "--steps", "2",
                           "--official", "fp32,fp32-ddp", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["failures"] == {}
    by_variant = {b["extra_info"]["variant"]: b for b in data["benchmarks"]}
    assert set(by_variant) == {"official", "official_ddp", "reference"}
    official, ours = by_variant["official"]["extra_info"], by_variant["reference"]["extra_info"]
    # the same model: the trainable parameters agree exactly
    assert official["params_trainable"] == ours["params_trainable"]
    assert official["official"]["commit"] and official["shims"]
    assert all(b["stats"]["rounds"] == 2 and b["stats"]["median"] > 0 for b in data["benchmarks"])
    assert "bar: ours reference / official at fp32" in data["bar"]
    assert "vs official" in render([out])
