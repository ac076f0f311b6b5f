"""`python -m bench.report RESULTS.json [MORE.json ...] [-o BENCHMARKS.md]`: tables and a chart.

One section per area (the benchmark module: masking, patch_gather, relpos_embed, unigrad_loss,
dense_match, train_step, pipeline, ...), and in it, per result file, the device, versions, commit,
date and the device ceilings measured in that run, then one table per benchmark group: each case's
median time, its speed-up over the `reference` (and `compiled`) variant of the same case measured
in the same file, and the figures the benchmark stored in extra_info (achieved rate and fraction
of the device floor; on CUDA the GPU kernel time per call and the host overhead = wall / GPU kernel
time, from `bench.measure.host_overhead`). Results with a per-stage breakdown (train_step) get a stage table too. A PNG
bar chart of the speed-ups (drawn with Pillow) is written beside the markdown and linked from it.
Nothing is typed in by hand: every number comes from the JSON files named.

`python -m bench.report --strip-data RESULTS.json ...` removes the raw per-round timings
(`stats["data"]`) from result files in place, as they are committed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

VARIANTS = ("reference", "compiled", "triton", "triton_unique", "fused", "official")
# "official": the official code's own step (bench/test_official_sim.py), measured beside ours.
BASELINES = ("reference", "compiled", "official")
# Areas in the order of the tables; others follow in the order first seen.
AREAS = ("masking", "patch_gather", "relpos_embed", "unigrad_loss", "dense_match", "queue_infonce",
         "pixel_propagation", "train_step", "pipeline")
# extra_info keys shown when present, in this order, with their column titles; any other numeric
# key ending in "_per_s" (a rate, e.g. images_per_s) is shown after these.
FIGURES = [
    ("gbps", "GB/s"), ("achieved_gbps", "GB/s"), ("gb_per_s", "GB/s"), ("tflops", "TFLOP/s"),
    ("roofline_fraction", "of floor"), ("fraction_of_copy_floor", "of copy floor"),
    ("fraction_of_matmul_peak", "of matmul peak"), ("gflop_per_img", "GFLOP/img"),
    ("mfu", "MFU"), ("img_per_s", "img/s"), ("masks_per_s", "masks/s"),
    ("data_wait_fraction", "data wait"), ("peak_extra_over_inputs", "peak extra / (P+T)"),
    ("peak_extra_bytes", "peak extra MB"), ("peak_memory_bytes", "peak MB"),
    # bench.measure.host_overhead: wall time per call / GPU kernel time per call (CUDA only)
    ("gpu_kernel_ms", "GPU kernels ms"), ("host_overhead", "wall / GPU"),
]
# The stages of a training step in step order (as engine.stage_timer.STAGES); others follow.
STAGES = ("data_wait", "ema", "target_forward", "online_forward", "loss", "backward", "optimizer")


def variant_of(bench: dict) -> str | None:
    variant = bench.get("extra_info", {}).get("variant")
    if variant:
        return variant
    params = bench.get("param") or ""
    return next((v for v in VARIANTS if re.search(rf"(^|-){v}(-|$)", params)), None)


def case_key(bench: dict, variant: str | None) -> str:
    name = bench["name"]
    return re.sub(rf"(?<=[\[-]){re.escape(variant)}(?=[\]-])", "*", name) if variant else name


def area_of(bench: dict) -> str:
    """The benchmark module the result came from (bench/test_<area>.py), else its group."""
    match = re.search(r"(?:^|/)test_(\w+)\.py::", bench.get("fullname", ""))
    return match.group(1) if match else (bench.get("group") or bench["name"].split("[")[0])


def group_of(bench: dict) -> str:
    return bench.get("group") or bench["name"].split("[")[0]


def fmt(key: str, value) -> str:
    if value is None:
        return "–"
    if key.endswith("bytes"):
        return f"{value / 1e6:.1f}"
    if "fraction" in key or key == "mfu":
        return f"{100 * value:.1f}%"
    if key == "host_overhead":            # a ratio, but no "×": those cells are speed-ups
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"
    return str(value)


def figure_columns(benches: list[dict]) -> list[tuple[str, str]]:
    def present(key):
        return any(isinstance(b.get("extra_info", {}).get(key), (int, float))
                   and not isinstance(b["extra_info"][key], bool) for b in benches)

    known = [(k, t) for k, t in FIGURES if present(k)]
    names = {k for k, _ in FIGURES}
    rates = []
    for bench in benches:
        for key in bench.get("extra_info", {}):
            if key.endswith("_per_s") and key not in names and present(key) \
                    and key not in (k for k, _ in rates):
                rates.append((key, key.removesuffix("_per_s").replace("_", " ") + "/s"))
    return known + rates


def speedups(benches: list[dict]) -> dict[str, dict[str, float]]:
    """Per benchmark name: {baseline: baseline median / this median} for every baseline variant
    of the same case in `benches` (one group of one result file), other than its own variant."""
    medians = {}
    for bench in benches:
        variant = variant_of(bench)
        medians[(case_key(bench, variant), variant)] = bench["stats"]["median"]
    ratios = {}
    for bench in benches:
        variant = variant_of(bench)
        key, median = case_key(bench, variant), bench["stats"]["median"]
        ratios[bench["name"]] = {base: medians[(key, base)] / median for base in BASELINES
                                 if variant != base and medians.get((key, base)) and median}
    return ratios


def run_ceilings(data: dict) -> dict | None:
    """The device ceilings measured in the run that wrote `data` (machine_info, else the first
    benchmark that stored them: every benchmark of a session gets the same ones)."""
    ceilings = data.get("machine_info", {}).get("densesim", {}).get("ceilings")
    if ceilings:
        return ceilings
    return next((b["extra_info"]["ceilings"] for b in data["benchmarks"]
                 if b.get("extra_info", {}).get("ceilings")), None)


def provenance(path: Path, data: dict) -> str:
    env = data.get("machine_info", {}).get("densesim", {})
    commit = env.get("git_commit") or data.get("commit_info", {}).get("id")
    if not commit or commit == "unknown":
        commit = "not recorded (see the results README)"
    elif env.get("git_dirty"):
        commit += " + uncommitted changes"
    line = (f"Run `{path}`: device **{env.get('device_name', '?')}**, torch {env.get('torch')}, "
            f"triton {env.get('triton')}, CUDA {env.get('cuda')}, commit {commit}, "
            f"date {env.get('date_utc') or data.get('datetime')}")
    if env.get("device_type") == "cpu" and env.get("torch_threads"):
        line += f", {env['torch_threads']} torch thread(s) on {env.get('cpu_count', '?')} CPUs"
    ceilings = run_ceilings(data)
    if ceilings:
        line += (f"; ceilings measured in this run: copy {fmt('gbps', ceilings['copy_gbps'])} "
                 f"GB/s, {ceilings.get('matmul_dtype', '?')} matmul "
                 f"{fmt('tflops', ceilings['matmul_tflops'])} TFLOP/s")
    else:
        line += "; no device ceilings stored"
    return line + "."


def group_table(benches: list[dict], ratios: dict) -> list[str]:
    variants = {variant_of(b) for b in benches}
    bases = [base for base in BASELINES
             if base in variants and any(v != base for v in variants)]
    figures = figure_columns(benches)
    header = ["case", "median"] + [f"vs {base}" for base in bases] + [t for _, t in figures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bench in sorted(benches, key=lambda b: b["name"]):
        extra = bench.get("extra_info", {})
        row = [bench["name"].split("::")[-1], f"{bench['stats']['median'] * 1e3:.3f} ms"]
        row += [f"{ratios[bench['name']][base]:.2f}×" if base in ratios[bench["name"]] else ""
                for base in bases]
        row += [fmt(k, extra.get(k)) for k, _ in figures]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def stage_table(benches: list[dict]) -> list[str]:
    """ms per step and share of the stages' sum, for results that stored `stages_ms`."""
    staged = [b for b in sorted(benches, key=lambda b: b["name"])
              if b.get("extra_info", {}).get("stages_ms")]
    if not staged:
        return []
    seen = dict.fromkeys(s for b in staged for s in b["extra_info"]["stages_ms"])
    stages = [s for s in STAGES if s in seen] + [s for s in seen if s not in STAGES]
    header = ["case", "step (median)"] + stages + ["sum of stages", "sync overhead"]
    lines = [("Stage breakdown: ms per step (share of the sum of stages), from steps timed with a "
              "device sync at every stage boundary (`engine.stage_timer.StageTimer`); the sync "
              "overhead is how much longer those steps took than the free-running median."), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bench in staged:
        extra = bench["extra_info"]
        total = extra.get("stages_total_ms") or sum(extra["stages_ms"].values())
        row = [bench["name"].split("::")[-1], f"{bench['stats']['median'] * 1e3:,.1f} ms"]
        for stage in stages:
            ms = extra["stages_ms"].get(stage)
            row.append("–" if ms is None else f"{ms:,.1f} ({100 * ms / total:.0f}%)")
        overhead = extra.get("stage_sync_overhead")
        row += [f"{total:,.1f} ms", "–" if overhead is None else f"{100 * overhead:+.1f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def collect(paths: list[Path]) -> list[tuple[Path, dict, dict]]:
    """Per file: (path, its JSON, {area: {group: [benchmarks]}}) with areas in table order."""
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        areas: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for bench in data["benchmarks"]:
            areas[area_of(bench)][group_of(bench)].append(bench)
        runs.append((path, data, areas))
    return runs


def area_order(runs) -> list[str]:
    seen = [a for _, _, areas in runs for a in areas]
    return [a for a in AREAS if a in seen] + list(dict.fromkeys(a for a in seen if a not in AREAS))


def speedup_entries(paths: list[Path]) -> list[tuple[str, str, str, float]]:
    """(section, case, baseline, ratio) for every fused/Triton variant against each baseline
    measured beside it; the same ratios as the tables' "vs" columns."""
    runs, entries = collect(paths), []
    for area in area_order(runs):
        for path, data, areas in runs:
            device = data.get("machine_info", {}).get("densesim", {}).get("device_name", "?")
            for group, benches in areas.get(area, {}).items():
                ratios = speedups(benches)
                for bench in sorted(benches, key=lambda b: b["name"]):
                    variant = variant_of(bench)
                    if variant in (*BASELINES, None) or variant.startswith("official"):
                        continue              # baselines (and the official code's DDP form)
                    case = bench.get("param") or bench["name"]
                    for base, ratio in ratios[bench["name"]].items():
                        where = f"{Path(path).parent.name}/{Path(path).name}"
                        entries.append((f"{group} ({device}, {where})", case, base, ratio))
    return entries


def render(paths: list[Path], chart: str | None = None) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `python -m bench.report " + " ".join(str(p) for p in paths) + "`.",
             ("Speed-ups compare variants of the same case measured in the same run; fractions of "
              "the floor are against the device ceilings (a large device copy, a large matmul) "
              "measured at the start of that run and shown above each table."), ""]
    if chart:
        lines += [f"![Speed-ups over the reference and torch.compile variants]({chart})", "",
                  (f"`{chart}`: the \"vs reference\" / \"vs compiled\" columns below as bars "
                   "(log scale; right of 1× is faster)."), ""]
    runs = collect(paths)
    for area in area_order(runs):
        lines += [f"## {area}", ""]
        for path, data, areas in runs:
            if area not in areas:
                continue
            lines += [provenance(path, data), ""]
            for group, benches in areas[area].items():
                lines += [f"### {group}", "", *group_table(benches, speedups(benches)), ""]
                staged = stage_table(benches)
                if staged:
                    lines += [*staged, ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the chart
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)   # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


COLOURS = {("reference", True): (46, 139, 87), ("reference", False): (192, 57, 43),
           ("compiled", True): (52, 101, 164), ("compiled", False): (230, 126, 34),
           ("official", True): (117, 80, 123), ("official", False): (143, 89, 2)}


def draw_chart(entries: list[tuple[str, str, str, float]], path: Path,
               title: str = "Speed-up of the fused/Triton variants (same case, same run)") -> None:
    """Horizontal bars on a log2 axis from 1x, one per (case, baseline), under a heading per
    benchmark group. Pillow only (its default font has no "×": the chart writes "x")."""
    from PIL import Image, ImageDraw

    font, small, bold = _font(13), _font(11), _font(15)
    row_h, head_h, top, bottom, width = 18, 26, 70, 40, 1200
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [f"{case}  vs {base}" for _, case, base, _ in entries]
    label_w = min(520, max(measure.textlength(t, font=font) for t in labels) + 16)
    x0, x1 = int(label_w + 20), width - 80
    low = min(-1, math.floor(min(math.log2(r) for *_, r in entries)))
    high = max(1, math.ceil(max(math.log2(r) for *_, r in entries)))

    def x_of(ratio: float) -> float:
        return x0 + (math.log2(ratio) - low) / (high - low) * (x1 - x0)

    sections = list(dict.fromkeys(section for section, *_ in entries))
    height = top + bottom + len(entries) * row_h + len(sections) * head_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), title, fill="black", font=bold)
    legend_x = 12
    drawn = {base for _, _, base, _ in entries}
    for (base, faster), colour in COLOURS.items():
        if base == "official" and base not in drawn:   # the legend of the classic chart unchanged
            continue
        text = f"vs {base}, {'faster' if faster else 'slower'}"
        draw.rectangle([legend_x, 40, legend_x + 12, 52], fill=colour)
        draw.text((legend_x + 18, 39), text, fill="black", font=small)
        legend_x += 40 + int(measure.textlength(text, font=small))
    for k in range(low, high + 1):                  # grid lines at powers of two
        x = x_of(2.0 ** k)
        draw.line([x, top - 6, x, height - bottom], fill=(120, 120, 120) if k == 0
                  else (225, 225, 225), width=2 if k == 0 else 1)
        tick = f"{2.0 ** k:g}x"
        draw.text((x - measure.textlength(tick, font=small) / 2, height - bottom + 6), tick,
                  fill="black", font=small)
    y, current = top, None
    for (section, case, base, ratio), label in zip(entries, labels):
        if section != current:
            current = section
            draw.text((12, y + 8), section, fill="black", font=bold)
            y += head_h
        draw.text((12, y + 2), label, fill=(40, 40, 40), font=font)
        one, end = x_of(1.0), x_of(ratio)
        draw.rectangle([min(one, end), y + 3, max(one, end), y + row_h - 3],
                       fill=COLOURS[(base, ratio >= 1)])
        value = f"{ratio:.2f}x"
        tx = end + 4 if ratio >= 1 else end - 4 - measure.textlength(value, font=small)
        draw.text((tx, y + 3), value, fill="black", font=small)
        y += row_h
    # a 256-colour palette keeps the committed file small (text is anti-aliased in greys)
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path, format="PNG",
                                                                       optimize=True)


def strip_data(path: Path) -> bool:
    """Drop the raw per-round timings (stats["data"]) from a result file; True if it changed."""
    data = json.loads(Path(path).read_text())
    changed = False
    for bench in data["benchmarks"]:
        changed |= bench.get("stats", {}).pop("data", None) is not None
    if changed:
        Path(path).write_text(json.dumps(data, indent=4) + "\n")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("-o", "--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--chart", type=Path, default=None,
                        help="PNG bar chart of the speed-ups (default: OUT with suffix .png)")
    parser.add_argument("--no-chart", action="store_true", help="write the tables only")
    parser.add_argument("--strip-data", action="store_true",
                        help="only remove raw per-round timings from the files, in place")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    if args.strip_data:
        for path in args.results:
            print(f"{path}: {'stripped' if strip_data(path) else 'no raw data'}")
        return 0
    chart = None
    entries = [] if args.no_chart else speedup_entries(args.results)
    if entries:
        chart_path = args.chart or args.out.with_suffix(".png")
        draw_chart(entries, chart_path)
        chart = os.path.relpath(chart_path, args.out.parent).replace(os.sep, "/")
        print(f"wrote {chart_path}")
    args.out.write_text(render(args.results, chart=chart))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
