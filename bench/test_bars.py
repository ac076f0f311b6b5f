"""bench.bars: the issue-10 bars are read off the result files, nothing else (a plain test)."""
from __future__ import annotations

import json

from bench.bars import render


def test_bars_come_from_the_files(tmp_path):
    step = tmp_path / "train_step.json"
    bench = lambda name, median, img: {
        "name": name, "fullname": f"bench/test_train_step.py::{name}", "stats": {"median": median},
        "extra_info": {"img_per_s": img, "mfu": 0.5}}
    step.write_text(json.dumps({"benchmarks": [
        bench("test_compiled_step[compiled_reference]", 0.06, 2133.0),
        bench("test_compiled_step[compiled_fused]", 0.048, 2666.0)]}))
    ops = tmp_path / "bench_ops.json"
    ops.write_text(json.dumps({"benchmarks": [
        {"name": "test_op[triton]", "extra_info": {"variant": "triton", "host_overhead": 1.5,
                                                   "wall_ms": 0.3, "gpu_kernel_ms": 0.2}},
        {"name": "test_op[reference]", "extra_info": {"variant": "reference",
                                                      "host_overhead": None}}]}))
    official = tmp_path / "official_sim.json"
    official.write_text(json.dumps({"version": "bench.official_sim", "benchmarks": [],
                                    "bar": "bar: ours fused / official at bf16: 2.10x (meets the 2x bar)",
                                    "failures": {"official fp16": "OOM"}}))
    text = render([step, ops, official])
    assert "test_compiled_step[compiled_fused]: 2,666 img/s, MFU 50.0% (meets 2,500 img/s)" in text
    assert "compiled fused vs compiled reference: 1.25x (faster)" in text
    assert "test_op[triton]: wall 0.300 ms / GPU 0.200 ms = 1.50x ABOVE" in text
    assert "test_op[reference]" not in text           # no figure (a CPU run): not listed
    assert "2.10x (meets the 2x bar)" in text and "failed: official fp16: OOM" in text
    assert render([]).count("(no result in these files)") == 3


def test_train_step_cases_are_compared_with_the_official_step(tmp_path):
    official = tmp_path / "official_sim.json"
    official.write_text(json.dumps({"version": "bench.official_sim", "bar": "", "failures": {},
                                    "benchmarks": [{"name": "official_sim_step[vit_b16-bf16-official]",
                                                    "extra_info": {"variant": "official",
                                                                   "precision": "bf16", "batch": 128,
                                                                   "img_per_s": 1000.0}}]}))
    step = tmp_path / "train_step.json"
    step.write_text(json.dumps({"benchmarks": [
        {"name": "test_compiled_step[compiled_fused]",
         "fullname": "bench/test_train_step.py::test_compiled_step[compiled_fused]",
         "stats": {"median": 0.05}, "extra_info": {"img_per_s": 2560.0, "precision": "bfloat16",
                                                   "batch": 128}},
        {"name": "test_compiled_step[eager_fused]",
         "fullname": "bench/test_train_step.py::test_compiled_step[eager_fused]",
         "stats": {"median": 0.08}, "extra_info": {"img_per_s": 1600.0, "precision": "bf16",
                                                   "batch": 128}}]}))
    text = render([official, step])
    assert "test_compiled_step[eager_fused] / official at bf16: 1.60x (below the 2x bar)" in text
    assert "test_compiled_step[compiled_fused] / official at bf16: 2.56x (meets the 2x bar)" in text
