"""SIM trains exactly as it did before the method refactor: 20 CPU steps, bit for bit.

`tests/golden/sim_20_steps.json` was recorded with the trainer as it stood before SIM moved into
`engine/methods/sim.py` (commit "tests: pin the training step's semantics ..."). It holds every
step's loss (as float.hex) and a SHA-256 of every tensor of the final model state (online, EMA
target, BatchNorm buffers) and of the optimiser state. The run: a tiny SIM ViT on the embedded
photos, batch 8 × accum 2 (so F over the accumulated batch is exercised), block masks, fp32, the
PyTorch reference path, one intra-op thread.

Bitwise equality is only meaningful on the same torch build and CPU kernel family (float sums are
not associative and vectorised kernels differ between AVX2 and AVX-512); when either differs from
the recorded one, the test compares the losses and each tensor's float64 sum and sum of squares to
1e-4 relative instead, and says so in its output.

Regenerate (only when SIM's behaviour is MEANT to change, saying why in the commit):
    python tests/test_sim_golden.py --write
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "golden" / "sim_20_steps.json"
CONFIG = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=2, decoder_dim=32,
              decoder_heads=2, projector_depth=1, predictor_depth=1, batch_size=8, accum=2,
              steps=20, warmup_steps=4, blr=5e-3, crop_scale=(0.2, 1.0), blur=False, workers=0,
              log_every=1, checkpoint_every=1000, precision="fp32", preset="test-golden")


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()
                          if data.numel() else b"").hexdigest()


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _flatten(f"{prefix}.{key}", value[key], out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(f"{prefix}.{index}", item, out)


def record(out_dir: Path) -> dict:
    """Run the 20 steps and return the fingerprint."""
    from engine.presets import PretrainConfig
    from engine.trainer import RunOptions, pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pretrain(PretrainConfig(**CONFIG).validate(),
                          RunOptions(out=out_dir, device="cpu", fused=False, quiet=True))
    finally:
        torch.set_num_threads(threads)
    losses = [json.loads(line)["loss"] for line in
              (out_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=False)
    tensors: dict[str, torch.Tensor] = {}
    _flatten("model", checkpoint["model"], tensors)
    _flatten("optimizer", checkpoint["optimizer"]["state"], tensors)
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "steps": result["step"],
        "losses": [float(x).hex() for x in losses],
        "tensors": {name: {"sha256": _tensor_digest(t), "shape": list(t.shape),
                           "sum": float(t.double().sum()), "sumsq": float(t.double().pow(2).sum())}
                    for name, t in tensors.items() if t.is_floating_point()},
    }


def _state_names(tensors: dict) -> set[str]:
    return set(tensors)


def test_sim_20_steps_match_the_recording_made_before_the_refactor(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    now = record(tmp_path / "run")
    assert now["steps"] == golden["steps"] == 20
    # The state holds the same tensors (online, target, buffers, optimiser moments), same shapes.
    assert _state_names(now["tensors"]) == _state_names(golden["tensors"])
    for name, entry in golden["tensors"].items():
        assert now["tensors"][name]["shape"] == entry["shape"], name
    exact = (now["torch"] == golden["torch"]
             and now["cpu_capability"] == golden["cpu_capability"])
    if exact:
        assert now["losses"] == golden["losses"]
        different = [name for name, entry in golden["tensors"].items()
                     if now["tensors"][name]["sha256"] != entry["sha256"]]
        assert not different, f"{len(different)} tensors differ bitwise, e.g. {different[:5]}"
        return
    print(f"note: recorded on torch {golden['torch']} / {golden['cpu_capability']}, running on "
          f"torch {now['torch']} / {now['cpu_capability']}: comparing to 1e-4, not bitwise")
    for a, b in zip(now["losses"], golden["losses"]):
        assert math.isclose(float.fromhex(a), float.fromhex(b), rel_tol=1e-4)
    for name, entry in golden["tensors"].items():
        for key in ("sum", "sumsq"):
            assert math.isclose(now["tensors"][name][key], entry[key], rel_tol=1e-4,
                                abs_tol=1e-6), (name, key)


if __name__ == "__main__":  # python tests/test_sim_golden.py --write
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_sim_golden.py --write")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        fingerprint = record(Path(tmp) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(fingerprint, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(fingerprint['tensors'])} tensors, losses "
          f"{[round(float.fromhex(x), 4) for x in fingerprint['losses']]}")
