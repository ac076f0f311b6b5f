"""bench.report: the committed H100 results render into tables with the right speed-ups."""
from __future__ import annotations

import json
from pathlib import Path

from bench.report import main, render

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "h100-kernels"


def test_report_ratios_come_from_the_json(tmp_path):
    text = render([RESULTS / "bench.json"])
    data = json.loads((RESULTS / "bench.json").read_text())
    medians = {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}
    ref = medians["test_dense_match[g56-c256-cudaB128-reference]"]
    tri = medians["test_dense_match[g56-c256-cudaB128-triton]"]
    row = next(line for line in text.splitlines()
               if line.startswith("| test_dense_match[g56-c256-cudaB128-triton]"))
    assert f"{ref / tri:.2f}×" in row
    assert "NVIDIA H100" in text
    out = tmp_path / "B.md"
    assert main([str(RESULTS / "bench.json"), "-o", str(out)]) == 0
    assert out.read_text() == text
