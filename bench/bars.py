"""`python -m bench.bars RESULTS.json ...`: the issue-10 bars, read off result files.

* the SIM step: images/s and MFU of every `test_train_step` case at the recipe (sim-vit-b16,
  batch 128, bf16) -- bar: >= 2,500 img/s (>= 45% MFU) on one H100/H200, and the fused compiled step
  faster than the reference compiled step;
* the official code side by side (`bench.official_sim`): ours / official images/s at the same
  precision -- bar: >= 2x;
* host overhead of every op benchmark case that stored one (`bench.measure.host_overhead`):
  wall / GPU kernel time -- bar: <= 1.3x for the fused (Triton) variants.

Only prints what the files hold (nothing measured here); a figure that is absent says so.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

STEP_GOAL_IMG_S, MFU_GOAL, OFFICIAL_GOAL, HOST_GOAL = 2500.0, 0.45, 2.0, 1.3
FUSED = ("triton", "triton_unique", "fused")
LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def precision(label) -> str | None:
    return LABELS.get(label, label)


def _benches(paths):
    for path in paths:
        data = json.loads(Path(path).read_text())
        for bench in data.get("benchmarks", []):
            yield Path(path), data, bench


def step_lines(paths) -> list[str]:
    lines, medians = [], {}
    for path, _, bench in _benches(paths):
        for variant in ("compiled_fused", "compiled_reference"):
            if bench["name"].endswith(f"[{variant}]"):
                medians[(path, variant)] = bench["stats"]["median"]
        info = bench.get("extra_info", {})
        if "train_step" not in bench.get("fullname", "") or info.get("method") not in (None, "sim"):
            continue
        if info.get("img_per_s") is None:
            continue
        mark = "meets" if info["img_per_s"] >= STEP_GOAL_IMG_S else "below"
        mfu = info.get("mfu")
        lines.append(f"  {bench['name']}: {info['img_per_s']:,.0f} img/s"
                     + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
                     + f" ({mark} {STEP_GOAL_IMG_S:,.0f} img/s) [{path.name}]")
    for path in dict.fromkeys(p for p, _ in medians):
        fused, reference = medians.get((path, "compiled_fused")), medians.get((path, "compiled_reference"))
        if fused and reference:
            ratio = reference / fused
            lines.append(f"  compiled fused vs compiled reference: {ratio:.2f}x "
                         f"({'faster' if ratio > 1 else 'NOT faster'}) [{path.name}]")
    return lines


def official_lines(paths) -> list[str]:
    lines, official = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("version") == "bench.official_sim":
            bar = data.get("bar") or "no ours/official pair measured"
            lines += [f"  {line} [{Path(path).name}]" for line in bar.splitlines()]
            lines += [f"  failed: {k}: {v}" for k, v in (data.get("failures") or {}).items()]
            for bench in data.get("benchmarks", []):
                info = bench["extra_info"]
                if info.get("variant") == "official":
                    official[(precision(info["precision"]), info["batch"])] = info["img_per_s"]
    # the same call's train-step results (another process, same machine) against the official
    # step at the same precision and batch: e.g. the compiled cases of test_train_step.py
    for path, _, bench in _benches(paths):
        info = bench.get("extra_info", {})
        if "train_step" not in bench.get("fullname", "") or info.get("method") not in (None, "sim"):
            continue
        base = official.get((precision(info.get("precision")), info.get("batch")))
        if base and info.get("img_per_s"):
            ratio = info["img_per_s"] / base
            lines.append(f"  {bench['name']} / official at {precision(info['precision'])}: {ratio:.2f}x "
                         f"({'meets' if ratio >= OFFICIAL_GOAL else 'below'} the 2x bar) "
                         f"[{path.name}]")
    return lines


def host_lines(paths) -> list[str]:
    lines = []
    for path, _, bench in _benches(paths):
        info = bench.get("extra_info", {})
        ratio = info.get("host_overhead")
        if ratio is None:
            continue
        fused = info.get("variant") in FUSED
        mark = ("meets" if ratio <= HOST_GOAL else "ABOVE") if fused else "(not a fused op)"
        lines.append(f"  {bench['name']}: wall {info['wall_ms']:.3f} ms / GPU "
                     f"{info['gpu_kernel_ms']:.3f} ms = {ratio:.2f}x {mark} "
                     f"[{path.name}]")
    return lines


def render(paths) -> str:
    sections = [
        ((f"SIM step (bar: >= {STEP_GOAL_IMG_S:,.0f} img/s, >= {100 * MFU_GOAL:.0f}% MFU; fused "
          "compiled faster than reference compiled)"), step_lines(paths)),
        (f"Official SIM code side by side (bar: ours >= {OFFICIAL_GOAL:.0f}x its img/s)",
         official_lines(paths)),
        (f"Host overhead, wall / GPU kernel time (bar: <= {HOST_GOAL}x for fused ops)",
         host_lines(paths)),
    ]
    out = []
    for title, lines in sections:
        out.append(title + ":")
        out += lines or ["  (no result in these files)"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bars", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print(render([p for p in args.results if p.is_file()]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
