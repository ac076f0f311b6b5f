"""bench.report: committed results render into tables and a chart whose numbers are the JSON's."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from bench.report import main, render, speedup_entries, strip_data

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
KERNELS = RESULTS / "h100-kernels" / "bench.json"
CPU_STEP = RESULTS / "cpu-train-step" / "train_step.json"


def table_row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} "))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_report_ratios_come_from_the_json(tmp_path):
    text = render([KERNELS])
    data = json.loads(KERNELS.read_text())
    medians = {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}
    ref = medians["test_dense_match[g56-c256-cudaB128-reference]"]
    tri = medians["test_dense_match[g56-c256-cudaB128-triton]"]
    row = table_row(text, "test_dense_match[g56-c256-cudaB128-triton]")
    assert f"{ref / tri:.2f}×" in row
    assert "NVIDIA H100" in text
    out = tmp_path / "B.md"
    assert main([str(KERNELS), "-o", str(out)]) == 0
    assert out.read_text() == render([KERNELS], chart="B.png")


def test_one_section_per_area_with_the_run_and_its_ceilings():
    text = render([KERNELS])
    data = json.loads(KERNELS.read_text())
    ceilings = next(b["extra_info"]["ceilings"] for b in data["benchmarks"]
                    if "ceilings" in b["extra_info"])
    sections = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["masking", "patch_gather", "relpos_embed", "unigrad_loss", "dense_match",
                        "train_step"]
    runs = [line for line in text.splitlines() if line.startswith("Run `")]
    assert len(runs) == len(sections)               # every table says where it came from
    for line in runs:
        assert "NVIDIA H100 80GB HBM3" in line and "torch 2.11.0+cu130" in line
        assert "date 2026-11-22T11:26:40+00:00" in line
        assert f"copy {ceilings['copy_gbps']:,.1f} GB/s" in line
        assert f"bfloat16 matmul {ceilings['matmul_tflops']:,.1f} TFLOP/s" in line


def test_chart_is_written_and_holds_the_tables_ratios(tmp_path):
    out = tmp_path / "report" / "BENCH.md"
    out.parent.mkdir()
    compiled = RESULTS / "h100-kernels" / "bench_unigrad_compiled.json"
    assert main([str(KERNELS), str(compiled), "-o", str(out)]) == 0
    chart = out.with_suffix(".png")
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400
    assert "![Speed-ups over the reference and torch.compile variants](BENCH.png)" \
        in out.read_text()
    entries = speedup_entries([KERNELS, compiled])
    # one bar per fused/Triton case and baseline: the "vs" cells of the tables, nothing else
    text = out.read_text()
    cells = sum(1 for line in text.splitlines() if line.startswith("| test_")
                and not any(base in line.split("|")[1] for base in ("reference", "compiled"))
                for cell in line.split("|") if cell.strip().endswith("×"))
    assert len(entries) == cells
    triton_vs_compiled = [r for _, case, base, r in entries
                          if base == "compiled" and case == "256-bf16-triton-fwd_bwd"]
    medians = {b["name"]: b["stats"]["median"]
               for b in json.loads(compiled.read_text())["benchmarks"]}
    assert triton_vs_compiled == [medians["test_unigrad_loss[256-bf16-compiled-fwd_bwd]"]
                                  / medians["test_unigrad_loss[256-bf16-triton-fwd_bwd]"]]
    assert main([str(KERNELS), "-o", str(tmp_path / "plain.md"), "--no-chart"]) == 0
    assert not (tmp_path / "plain.png").exists()


def test_stage_breakdown_comes_from_the_json():
    data = json.loads(CPU_STEP.read_text())
    text = render([CPU_STEP])
    staged = [b for b in data["benchmarks"] if b["extra_info"].get("stages_ms")]
    assert staged
    header = next(line for line in text.splitlines() if line.startswith("| case | step (median)"))
    columns = [cell.strip() for cell in header.strip().strip("|").split("|")]
    for bench in staged:
        extra = bench["extra_info"]
        rows = [r for r in text.splitlines() if r.startswith(f"| {bench['name']} ")]
        stage_row = [cell.strip() for cell in rows[1].strip().strip("|").split("|")]
        for stage, ms in extra["stages_ms"].items():
            share = 100 * ms / extra["stages_total_ms"]
            assert stage_row[columns.index(stage)] == f"{ms:,.1f} ({share:.0f}%)"
        assert stage_row[1] == f"{bench['stats']['median'] * 1e3:,.1f} ms"
        main_row = [cell.strip() for cell in rows[0].strip().strip("|").split("|")]
        assert f"{100 * extra['mfu']:.1f}%" in main_row
    assert "float32 matmul" in text                   # the CPU ceiling the MFU is a fraction of


def test_other_areas_and_rates_render_generically(tmp_path):
    """A result area the report does not know (the pipelines), with an images/s figure."""
    bench = {"name": "test_two_view_pipeline[torch]", "group": "pipeline", "param": "torch",
             "fullname": "bench/test_pipeline.py::test_two_view_pipeline[torch]",
             "stats": {"median": 0.5, "data": [0.5, 0.5]},
             "extra_info": {"variant": "torch", "images_per_s": 1234.5}}
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"machine_info": {"densesim": {"device_name": "X"}},
                                "benchmarks": [bench]}))
    text = render([path])
    assert "## pipeline" in text and "images/s" in text
    assert table_row(text, "test_two_view_pipeline[torch]")[-1] == "1,234.5"
    assert "no device ceilings stored" in text
    assert strip_data(path) and "data" not in json.loads(path.read_text())["benchmarks"][0]["stats"]
    assert not strip_data(path)


def test_committed_benchmarks_md_is_the_report_of_its_result_files(monkeypatch):
    """BENCHMARKS.md is exactly what the command in its header renders: no number typed by hand."""
    root = RESULTS.parents[1]
    committed = (root / "BENCHMARKS.md").read_text()
    command = committed.splitlines()[2]
    assert command.startswith("Generated by `python -m bench.report ")
    paths = [Path(p) for p in command.split("`")[1].split()[3:]]
    monkeypatch.chdir(root)                         # the header names paths from the root
    assert all(p.is_file() for p in paths), paths
    assert render(paths, chart="BENCHMARKS.png") == committed
    assert Path("BENCHMARKS.png").is_file()
