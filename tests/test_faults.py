"""Training that survives faults (issue 11), on the CPU: every fault injected for real.

  * checkpoints: the last --keep N numbered ones kept, each checksummed; a truncated or corrupt
    newest one is detected on --resume and the one before is used (the log says so); a crash in the
    middle of a save (the bytes half written) and a full disk leave the previous checkpoint
    loadable and the run resumable, with a one-line error;
  * SIGTERM (a scheduler's pre-emption) and SIGINT: the current step finishes, a checkpoint is
    saved, the process exits 0 saying how to resume, and the resumed run ends where an
    uninterrupted one does, bit for bit;
  * the identical command line runs again after a crash: --resume with the same config flags is
    accepted, and --auto-resume continues (or starts) the run;
  * kill -9 at a random step, then the same command with --resume: final parameters, queues and
    metrics equal an uninterrupted run's, bit for bit.
The runs are SIM's and MoCo v2's demo presets at 32 px (seconds each).
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.checkpoint import CheckpointError, load_latest, numbered_checkpoints, save_checkpoint
from engine.pretrain import main

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
SIM_TINY = ["--steps", "6", "--batch-size", "4", "--workers", "0", "--log-every", "1",
            "--checkpoint-every", "1", "--no-fused", "--device", "cpu", "--seed", "3"]


def cli(out: Path, *extra: str) -> int:
    return main([*SIM_TINY, "--out", str(out), *extra])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict:
    return load_latest(out).state["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted 6-step run every fault is compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli(out) == 0
    return out


# ------------------------------------------------------------------------------ checkpoints
def test_keep_n_numbered_checkpoints_each_checksummed(tmp_path):
    assert cli(tmp_path / "run", "--keep", "3") == 0
    kept = numbered_checkpoints(tmp_path / "run")
    assert [step for step, _ in kept] == [6, 5, 4]
    for _, path in kept:
        assert ckpt._verify(path) is None
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == kept[0][1].read_bytes()
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, straight, damage):
    out = tmp_path / "run"
    assert cli(out, "--stop-after", "4") == 0
    newest = numbered_checkpoints(out)[0][1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli(out, "--resume") == 0
    text = capsys.readouterr().out
    assert "resume: skipped checkpoint-00000004.pt" in text
    assert "from checkpoint-00000003.pt" in text
    assert_same_state(final_state(out), final_state(straight))      # the lost step is redone
    assert [r["step"] for r in records(out)] == list(range(1, 7))   # logged once each


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                      straight):
    out = tmp_path / "run"
    assert cli(out, "--stop-after", "3") == 0
    real_fsync = os.fsync

    def half_written_then_crash(fd):       # the process dies after writing half the bytes
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name.endswith(".pt.tmp"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise SystemExit("killed during the save")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", half_written_then_crash)
    with pytest.raises(SystemExit):
        cli(out, "--resume", "--stop-after", "1")
    monkeypatch.undo()
    assert load_latest(out).state["step"] == 3        # intact, and no half file published
    assert not list(out.glob("*.tmp"))
    assert cli(out, "--resume") == 0
    assert_same_state(final_state(out), final_state(straight))


def test_full_disk_is_a_one_line_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch,
                                                                            capsys):
    out = tmp_path / "run"
    assert cli(out, "--stop-after", "2") == 0
    real_write = ckpt._write_atomically

    def no_space(path, data):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data[:10])                # partly written, then the disk is full
        tmp.unlink()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write_atomically", no_space)
    capsys.readouterr()
    assert cli(out, "--resume", "--stop-after", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "No space left on device" in err[0]
    assert "checkpoint-00000002.pt is intact" in err[0]
    monkeypatch.setattr(ckpt, "_write_atomically", real_write)
    assert load_latest(out).state["step"] == 2


def test_save_checkpoint_unit_keeps_and_rejects(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, {"step": step, "x": torch.full((3,), float(step))}, keep=2)
    assert [s for s, _ in numbered_checkpoints(tmp_path)] == [4, 3]
    for _, path in numbered_checkpoints(tmp_path):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_latest(tmp_path)
    with pytest.raises(CheckpointError, match="keep must be"):
        save_checkpoint(tmp_path, {"step": 9}, keep=0)


# ------------------------------------------------------------------------ the same command again
def test_identical_command_resumes_and_auto_resume_continues(tmp_path, straight, capsys):
    out = tmp_path / "run"
    assert cli(out, "--stop-after", "2") == 0
    # the same command line (with its --seed and --batch-size) and --resume: accepted
    assert cli(out, "--resume", "--stop-after", "2") == 0
    assert load_latest(out).state["step"] == 4
    # a changed config flag is still refused, in one line
    capsys.readouterr()
    assert main([*SIM_TINY[:-1], "4", "--out", str(out), "--resume"]) == 2
    assert "--seed cannot change when resuming" in capsys.readouterr().err
    # --auto-resume: continues the run in --out ...
    assert cli(out, "--auto-resume") == 0
    assert_same_state(final_state(out), final_state(straight))
    # ... and starts one where there is none
    fresh = tmp_path / "fresh"
    assert cli(fresh, "--auto-resume", "--stop-after", "1") == 0
    assert load_latest(fresh).state["step"] == 1


# ------------------------------------------------------------------- signals and kill -9, for real
def launch(out: Path, *extra: str, steps: int = 30) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    args = [sys.executable, "-m", "engine.pretrain", "--method", "mocov2", "--steps", str(steps),
            "--batch-size", "4", "--workers", "0", "--log-every", "1", "--checkpoint-every",
            "1", "--no-fused", "--device", "cpu", "--seed", "1", "--out", str(out),
            "--method-arg", "queue_length=64", "--method-arg", "hidden=32",
            "--method-arg", "dim=16", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(records(out)) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def mocov2_straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mocov2") / "run"
    proc = launch(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_0(tmp_path, mocov2_straight, signum):
    out = tmp_path / "run"
    proc = launch(out)
    wait_for_step(out, 3, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step" in stdout + stderr
    assert "--resume" in stdout + stderr
    stopped_at = load_latest(out).state["step"]
    assert 3 <= stopped_at < 30
    proc = launch(out, "--resume")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert_same_state(final_state(out), final_state(mocov2_straight))   # queues included
    same = ("step", "loss", "lr", "momentum", "grad_norm")
    assert [{k: r[k] for k in same} for r in records(out)] == \
        [{k: r[k] for k in same} for r in records(mocov2_straight)]


def test_sigterm_to_one_torchrun_rank_stops_every_rank_after_the_same_step(tmp_path):
    """A signal that reaches one rank only: the ranks agree (a host-side all-reduce after every
    step), all stop after the same step, rank 0 saves, and torchrun exits 0."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "engine.pretrain", "--device", "cpu", "--no-fused", "--out", str(out),
         "--steps", "200", "--batch-size", "8", "--workers", "0", "--log-every", "1",
         "--checkpoint-every", "1000"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(pid) for pid in workers.stdout.split()]
    assert len(pids) == 2, workers
    os.kill(pids[-1], signal.SIGTERM)                    # one rank only
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    text = stdout + stderr
    assert text.count("stopped by SIGTERM after step") == 1     # rank 0 talks
    stopped_at = load_latest(out).state["step"]
    assert 2 <= stopped_at < 200
    assert records(out)[-1]["step"] == stopped_at


def test_kill_9_at_a_random_step_then_resume_is_bit_exact(tmp_path, mocov2_straight):
    out = tmp_path / "run"
    proc = launch(out)
    wait_for_step(out, random.Random().randint(2, 20), proc)
    proc.kill()                                          # SIGKILL: no handler, no clean-up
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    proc = launch(out, "--resume")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert_same_state(final_state(out), final_state(mocov2_straight))
    same = ("step", "loss", "lr", "momentum", "grad_norm")
    assert [{k: r[k] for k in same} for r in records(out)] == \
        [{k: r[k] for k in same} for r in records(mocov2_straight)]


# ------------------------------------------------------------------------------------ bad data
def photo_folder(root: Path, copies: int = 3) -> Path:
    """The embedded photos copied `copies` times into one flat folder (141 real JPEGs)."""
    from pipelines.datasets import SAMPLE_PHOTOS_DIR

    root.mkdir(parents=True)
    sources = sorted(Path(SAMPLE_PHOTOS_DIR).rglob("*.jpg"))
    for copy_index in range(copies):
        for source in sources:
            (root / f"{copy_index}-{source.parent.name}-{source.name}").write_bytes(
                source.read_bytes())
    return root


def data_cli(out: Path, data: Path, *extra: str) -> int:
    return main(["--data", str(data), "--steps", "40", "--batch-size", "8", "--workers", "0",
                 "--log-every", "10", "--no-fused", "--device", "cpu", "--out", str(out), *extra])


def test_one_percent_corrupt_files_train_through_counted_and_named(tmp_path, capsys):
    from fixtures_images import corrupt_jpeg_bytes

    data = photo_folder(tmp_path / "photos")
    images = sorted(data.iterdir())
    broken = [images[0], images[len(images) // 2]]            # 2 of 141 files: ~1.4%
    broken[0].write_bytes(b"not a jpeg at all")
    broken[1].write_bytes(corrupt_jpeg_bytes()[:200])          # truncated
    assert data_cli(tmp_path / "run", data) == 0
    text = capsys.readouterr()
    text = text.out + text.err
    for path in broken:
        assert f"skipped unreadable image: {path}" in text
    assert records(tmp_path / "run")[-1]["skipped_files"] == 2
    assert "2 unreadable images skipped" in text


def test_an_all_corrupt_folder_stops_with_one_clear_line(tmp_path, capsys):
    data = tmp_path / "broken"
    data.mkdir()
    for index in range(40):
        (data / f"{index}.jpg").write_bytes(b"\xff\xd8 broken")
    assert data_cli(tmp_path / "run", data) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "unreadable images" in err[0]


def test_a_file_that_disappears_mid_run_is_skipped(tmp_path):
    data = photo_folder(tmp_path / "photos", copies=1)        # 47 images: 5 steps per epoch
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.pretrain", "--data", str(data), "--steps", "15",
         "--batch-size", "8", "--workers", "2", "--log-every", "1", "--no-fused", "--device",
         "cpu", "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 1, proc)
    gone = sorted(data.iterdir())[7]
    gone.unlink()                                             # read again in epochs 2 and 3
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"skipped unreadable image: {gone}" in stdout + stderr
    assert records(out)[-1]["step"] == 15


# ------------------------------------------------------------------------------- memory growth
def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status (not Linux)")


@pytest.mark.parametrize("method", ["sim", "mocov2"])
def test_no_host_memory_growth_over_many_steps(method):
    """Resident memory after 300 more steps stays within 16 MiB of what it was after a 30-step
    warm-up (allocator caches, optimiser state and queues are all made by then): nothing the step
    keeps (logged figures, graphs, batches) accumulates. Device memory is the GPU suite's."""
    from engine.methods import build_method
    from engine.presets import PretrainConfig, preset_config
    from engine.trainer import StepSession, make_optimizer, optimisation_step
    from pipelines.augment import augment_recipe
    from pipelines.datasets import sample_photos
    from pipelines.torch_loader import TwoViewLoader

    values = preset_config("sim-demo-cpu" if method == "sim" else f"{method}-demo-cpu").to_dict()
    values.update(backbone="vit", img_size=32, patch_size=8, dim=32, depth=1, heads=2,
                  decoder_dim=32, decoder_heads=2, projector_depth=1, predictor_depth=1,
                  batch_size=4, precision="fp32", preset="test-memory",
                  method_args={} if method == "sim" else dict(queue_length=64, hidden=32, dim=16))
    cfg = PretrainConfig.from_dict(values).validate()
    torch.manual_seed(0)
    model = build_method(cfg).train()
    optimizer = make_optimizer(model, cfg)
    session = StepSession(cfg, model, model, optimizer,
                          torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None,
                          {})
    loader = TwoViewLoader(sample_photos(), augment_recipe("sim" if method == "sim" else "mocov2",
                                                           32, blur=False),
                           batch_size=4, workers=0, seed=0)
    batches = list(loader.epoch_batches(0))[:8]
    kept = []                       # what the training loop keeps between log steps
    for step in range(30):
        kept.append(optimisation_step(session, [batches[step % 8]], step, 0.99)[0])
    kept.clear()
    before = resident_mib()
    for step in range(30, 330):
        loss, _, figures = optimisation_step(session, [batches[step % 8]], step, 0.99)
        kept.append(loss)
        if len(kept) == 10:         # a log step: read and drop, as pretrain() does
            float(torch.stack(kept).mean())
            kept.clear()
    growth = resident_mib() - before
    assert growth < 16, f"resident memory grew by {growth:.1f} MiB over 300 steps"


# --------------------------------------------------------------------------- non-finite steps
def step_session(method: str):
    from engine.methods import build_method
    from engine.presets import PretrainConfig, preset_config
    from engine.trainer import StepSession, make_optimizer
    from pipelines.augment import augment_recipe
    from pipelines.datasets import sample_photos
    from pipelines.torch_loader import TwoViewLoader

    values = preset_config("sim-demo-cpu" if method == "sim" else f"{method}-demo-cpu").to_dict()
    values.update(img_size=32, batch_size=4, precision="fp32", preset="test-nan")
    if method == "sim":
        values.update(backbone="vit", patch_size=8, dim=32, depth=1, heads=2, decoder_dim=32,
                      decoder_heads=2, projector_depth=1, predictor_depth=1)
    elif method == "densecl":   # ResNet-18: BatchNorm statistics, the queues, SGD
        values.update(method_args=dict(queue_length=32, hidden=32, dim=16))
    else:                       # PixPro: LARS, BatchNorm heads
        values.update(method_args=dict(hidden=32, dim=16))
    cfg = PretrainConfig.from_dict(values).validate()
    torch.manual_seed(0)
    model = build_method(cfg).train()
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    loader = TwoViewLoader(sample_photos(), augment_recipe("sim" if method == "sim" else "mocov2",
                                                           32, blur=False),
                           batch_size=4, workers=0, seed=0)
    session = StepSession(cfg, model, model, optimizer,
                          torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None,
                          {})
    return session, list(loader.epoch_batches(0))[:4]


def snapshot(session) -> dict:
    state = {f"model.{k}": v.clone() for k, v in session.method.state_dict().items()}
    for index, per_param in enumerate(session.optimizer.state.values()):
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                state[f"optim.{index}.{key}"] = value.clone()
    return state


@pytest.mark.parametrize("method", ["sim", "densecl", "pixpro"])   # AdamW, SGD, LARS
@pytest.mark.parametrize("where", ["batch", "gradient"])
def test_a_non_finite_step_changes_nothing_and_is_counted(method, where):
    from engine.trainer import optimisation_step

    session, batches = step_session(method)
    optimisation_step(session, [batches[0]], 0, 0.99)
    optimisation_step(session, [batches[1]], 1, 0.99)
    before = snapshot(session)
    bad = dict(batches[2])
    handle = None
    if where == "batch":
        bad["view1"] = bad["view1"].clone()
        bad["view1"][1] = float("nan")            # one image of the batch
    else:
        first = next(p for p in session.method.parameters() if p.requires_grad)
        handle = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss, grad_norm, figures = optimisation_step(session, [bad], 2, 0.99)
    if handle is not None:
        handle.remove()
    assert float(figures["skipped"]) == 1.0
    after = snapshot(session)
    assert before.keys() == after.keys()
    target_weights = {name for name, p in session.method.named_parameters()
                      if name.startswith("target_") and not p.requires_grad}
    for name, value in before.items():      # weights, queues, BN statistics, optimiser state
        if name.removeprefix("model.") not in target_weights:
            assert torch.equal(after[name], value), name
    # The EMA runs at the start of a step, toward the weights the last step left: the bad step's
    # EMA is the one the next step would have made, and the next step's EMA is skipped instead
    # (on the device). So the target moves exactly as if the bad batch had never come.
    _, _, figures = optimisation_step(session, [batches[3]], 3, 0.99)
    assert float(figures["skipped"]) == 0.0
    state = session.method.state_dict()
    for name in target_weights:
        assert torch.equal(state[name], after[f"model.{name}"]), name
    assert any(not torch.equal(state[k], before[f"model.{k}"]) for k in state
               if k.startswith("encoder."))                       # and training goes on


def test_too_many_bad_steps_in_a_row_stop_or_continue(tmp_path, monkeypatch, capsys):
    import engine.trainer as trainer

    real_step = trainer.optimisation_step

    def poisoned(session, batches, step, momentum, stages=None):
        if 3 <= step < 9:                       # six bad batches in a row
            batches = [dict(b, view1=torch.full_like(b["view1"], float("nan")))
                       for b in batches]
        return real_step(session, batches, step, momentum, stages)

    monkeypatch.setattr(trainer, "optimisation_step", poisoned)
    args = ["--steps", "12", "--batch-size", "4", "--workers", "0", "--log-every", "4",
            "--no-fused", "--device", "cpu", "--max-bad-steps", "5"]
    assert main([*args, "--out", str(tmp_path / "stop")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "5 steps in a row had a non-finite loss or gradient (steps 4-8)" in err[0]
    assert main([*args, "--out", str(tmp_path / "go"), "--on-bad-steps", "continue"]) == 0
    log = records(tmp_path / "go")
    assert [r["skipped_steps"] for r in log] == [1, 5, 6]
    # the logged loss is the mean over the interval's good steps: none in steps 5-8
    assert [r["loss"] == r["loss"] for r in log] == [True, False, True]
    assert load_latest(tmp_path / "go").state["step"] == 12


def test_bad_steps_restore_the_checkpoint_before_the_streak(tmp_path, monkeypatch, capsys):
    """--on-bad-steps restore: back to the newest checkpoint from before the streak, the data
    stream left where it is (the poisoned batches are not seen again), the run completes."""
    import engine.trainer as trainer

    real_step = trainer.optimisation_step
    seen: list[tuple[int, int]] = []

    def poisoned(session, batches, step, momentum, stages=None):
        seen.append((step, batches[0]["batch_index"]))
        if 5 <= batches[0]["batch_index"] < 9 and batches[0]["epoch"] == 0:   # the data is bad
            batches = [dict(b, view1=torch.full_like(b["view1"], float("nan")))
                       for b in batches]
        return real_step(session, batches, step, momentum, stages)

    monkeypatch.setattr(trainer, "optimisation_step", poisoned)
    out = tmp_path / "restore"
    args = ["--steps", "12", "--batch-size", "4", "--workers", "0", "--log-every", "4",
            "--checkpoint-every", "2", "--keep", "4", "--no-fused", "--device", "cpu",
            "--max-bad-steps", "3", "--on-bad-steps", "restore", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    # bad steps 6-8 (batches 5-7) are seen at the step-8 log: checkpoint 4 (<= step 5) comes back
    assert ("3 steps in a row had a non-finite loss or gradient (steps 6-8)" in text
            and "restored the checkpoint of step 4 (restore 1/3)" in text), text
    steps = [step for step, _ in seen]
    assert steps[:8] == list(range(8)) and steps[8:] == list(range(4, 12))
    assert [batch for _, batch in seen][8] == 8     # the stream went on (batch 8 is bad too)
    log = records(out)
    assert [r["step"] for r in log] == [4, 8, 12]   # the undone interval was dropped
    assert load_latest(out).state["step"] == 12
    final = load_latest(out).state["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    # nothing to go back to: a one-line error that says what to do
    seen.clear()
    assert main([*args[:-1], str(tmp_path / "none"), "--checkpoint-every", "100"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "nothing to restore" in err[0] and "--checkpoint-every" in err[0]


# -------------------------------------------------------------------------- queues on small data
def test_a_queue_longer_than_the_dataset_is_a_warning_with_the_fix(tmp_path, capsys):
    base = ["--method", "mocov2", "--batch-size", "8", "--workers", "0", "--no-fused",
            "--device", "cpu", "--log-every", "10"]
    assert main([*base, "--steps", "1", "--out", str(tmp_path / "long")]) == 0
    text = capsys.readouterr()
    lines = [line for line in (text.out + text.err).splitlines() if line.startswith("warning:")]
    assert lines == ["warning: queue: 4096 keys for 47 images: the queue holds each image's own "
                     "keys among its negatives; use --method-arg queue_length=16"]
    # the suggested queue, filled within a tenth of the run: no warning
    assert main([*base, "--steps", "20", "--method-arg", "queue_length=16",
                 "--out", str(tmp_path / "fits")]) == 0
    text = capsys.readouterr()
    assert "warning:" not in text.out + text.err
    # a queue that stays partly random for much of a short run
    assert main([*base, "--steps", "5", "--method-arg", "queue_length=40",
                 "--out", str(tmp_path / "slow")]) == 0
    text = capsys.readouterr()
    assert "the first 5 of 5 steps still see random initial keys" in text.out + text.err
