"""Print the markdown tables of this folder's results from the committed JSON files, so no figure
is typed in by hand:
    python bench/results/cpu-cifar10-methods/table.py
"""
from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = [("sim", "SIM (ViT 128d×6, patch 4)", "random-vit"),
        ("mocov2", "MoCo v2", "random-resnet18"), ("densecl", "DenseCL", "random-resnet18"),
        ("pixpro", "PixPro", "random-resnet18"), ("densesiam", "DenseSiam", "random-resnet18"),
        ("lcloss", "LC-loss", "random-resnet18"),
        # issue 12 (same protocol and budget; trained at 8341b8a, SCFS at 7d71fc8, CCOP at d6430ff)
        ("swav", "SwAV (2×32 + 6×16 crops)", "random-resnet18"),
        ("regioncl", "RegionCL-M", "random-resnet18"), ("detco", "DetCo", "random-resnet18"),
        ("scfs", "SCFS (2×32 + 8×16 crops)", "random-resnet18"), ("ccop", "CCOP (FPN, boxes at 32 px)", "random-resnet18")]
EXTRA = [("densecl-warmup", "DenseCL, λ warm-up (first half λ = 0)", "random-resnet18"),
         ("densesiam-2x", "DenseSiam, twice the budget", "random-resnet18"),
         ("densesiam-global-only", "DenseSiam, global term only (SimSiam)", "random-resnet18")]


def load(kind: str, name: str) -> dict | None:
    path = HERE / f"eval_{kind}_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def knn(name):
    report = load("knn", name)
    return None if report is None else report["results"]["patch"]["200"]["top1"]


def linear(name):
    report = load("linear", name)
    return None if report is None else report["results"]["patch"]["top1"]


def corr(name, key="displaced_hit@1", suffix=""):
    report = load("correspondence", name + suffix)
    return None if report is None else report["results"].get(key)


def minutes(name) -> str:
    log = HERE / f"train_{name}.log"
    if not log.is_file():
        return "–"
    match = re.search(r"([0-9.]+) s wall", log.read_text())
    return f"{float(match.group(1)) / 60:.1f}" if match else "–"


def config(name) -> dict | None:
    path = HERE / f"config_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def steps(name) -> str:
    metrics = HERE / f"metrics_{name}.jsonl"
    if not metrics.is_file():
        return "–"
    last = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    return f"{last[-1]['step']} ({last[-1]['epoch']:.2f} ep)" if last else "–"


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def main() -> None:
    rows = ROWS + [row for row in EXTRA if config(row[0])]
    print("| method | steps (epochs) | train min | kNN top-1 | (random init) | linear top-1 | "
          "(random init) |")
    print("|---|---|---|---|---|---|---|")
    for name, title, baseline in rows:
        print(f"| {title} | {steps(name)} | {minutes(name)} | {pct(knn(name))} | "
              f"{pct(knn(baseline))} | {pct(linear(name))} | {pct(linear(baseline))} |")
    print()
    print("| method | map | displaced hit@1 | (random init) | (chance) | hit@1, all overlap cells "
          "| (same-position shortcut) | 2× input: map | displaced hit@1 | (random init) | "
          "(chance) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, title, baseline in rows:
        grid = corr(name, "grid")
        grid64 = corr(name, "grid", "-64")
        if grid is None:
            continue
        print(f"| {title} | {grid}×{grid} | {pct(corr(name))} | {pct(corr(baseline))} | "
              f"{pct(corr(name, 'chance_displaced_hit@1'))} | {pct(corr(name, 'hit@1'))} | "
              f"{pct(corr(name, 'identity_hit@1'))} | "
              + (f"{grid64}×{grid64} | {pct(corr(name, suffix='-64'))} | "
                 f"{pct(corr(baseline, suffix='-64'))} | "
                 f"{pct(corr(name, 'chance_displaced_hit@1', '-64'))} |"
                 if grid64 else "– | – | – | – |"))

    monitored = [(name, title) for name, title, _ in rows if monitor(name)]
    if monitored:
        print()
        print("Online kNN monitor (k = 200, 1,000 train / 500 test images per class), top-1 %:")
        print()
        for name, title in monitored:
            print(f"- {title}: " + " → ".join(f"{100 * top1:.1f} ({epoch:.2f} ep)"
                                               for epoch, top1 in monitor(name)))


def monitor(name) -> list[tuple[float, float]]:
    metrics = HERE / f"metrics_{name}.jsonl"
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(row["epoch"], row["knn_top1"]) for row in rows if "knn_top1" in row]


if __name__ == "__main__":
    main()
