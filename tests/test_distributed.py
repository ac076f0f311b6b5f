"""Two data-parallel processes on the CPU (gloo), launched the way users launch it: torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_cpu_ranks_train_and_rank0_writes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "engine.pretrain", "--device", "cpu", "--no-fused", "--out", str(out),
         "--steps", "3", "--batch-size", "8", "--workers", "0", "--log-every", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "8×1×2 ranks" in text          # the global batch is split over the two ranks
    assert text.count("done: step 3/3") == 1  # only rank 0 talks
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # written once, by rank 0
    assert (out / "checkpoint.pt").is_file()

