"""Data parallelism computes what one process does (issue 11, "Scale"), on two CPU ranks (gloo).

MoCo v2 (a queue method: keys all-gathered in rank order before the enqueue, the momentum encoder,
shuffle-BN machinery) on the ViT backbone: `torchrun --nproc_per_node 2 ... --batch-size 4` and
`python -m engine.pretrain ... --batch-size 8` -- the same global batch of the same crops -- end 4
steps with the same parameters, EMA target and queue (within 1e-5; measured 3.3e-7) and log the
same losses (within 1e-5 relative). The ViT has no BatchNorm, so nothing depends on how the global
batch is split. SIM's projector and predictor use BatchNorm, which is only synchronised across
ranks on CUDA (torch's SyncBatchNorm has no CPU implementation), so its 2-rank CPU run is not the
single-process run; its global F is checked by
tests/kernels/test_unigrad_loss.py::test_covariance_is_averaged_over_ranks, and SIM sharded with
FSDP2 (--fsdp, stopped and resumed) is compared with SIM under DDP on the same two ranks, where
BatchNorm is rank-local in both. MoCo v2 with --fsdp is compared with one process as above.
Activation checkpointing is checked for bit-identical gradients.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["-m", "engine.pretrain", "--method", "mocov2", "--backbone", "vit", "--device", "cpu",
          "--no-fused", "--steps", "4", "--workers", "0", "--log-every", "1",
          "--method-arg", "queue_length=64", "--method-arg", "hidden=32", "--method-arg", "dim=16"]


def run(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def same_state(left: Path, right: Path, steps: int = 4) -> None:
    first = torch.load(left / "checkpoint.pt", weights_only=False)
    second = torch.load(right / "checkpoint.pt", weights_only=False)
    assert first["model"].keys() == second["model"].keys()
    for name, value in first["model"].items():     # online, target, heads, queue and pointer
        torch.testing.assert_close(second["model"][name], value, rtol=0, atol=1e-5, msg=name)
    losses = [[json.loads(line)["loss"] for line in (folder / "metrics.jsonl")
               .read_text().splitlines()] for folder in (left, right)]
    assert len(losses[0]) == steps
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5,
                               atol=0)


def test_two_ranks_with_half_the_batch_equal_one_process(tmp_path):
    """DDP and FSDP2 (--fsdp) on two ranks both end where one process with the whole batch does;
    the sharded run's checkpoint holds the full state under the usual names."""
    run([*COMMON, "--batch-size", "8", "--out", str(tmp_path / "one")], tmp_path)
    run([*TORCHRUN, *COMMON, "--batch-size", "4", "--out", str(tmp_path / "two")], tmp_path)
    run([*TORCHRUN, *COMMON, "--batch-size", "4", "--fsdp", "--out", str(tmp_path / "sharded")],
        tmp_path)
    same_state(tmp_path / "one", tmp_path / "two")
    same_state(tmp_path / "one", tmp_path / "sharded")


def test_detco_two_ranks_equal_one_process(tmp_path):
    """DetCo (issue 12): 12 InfoNCE terms against 8 queues, every key all-gathered before its
    enqueue; on the ViT (no BatchNorm anywhere) two ranks with half the batch end where one
    process does."""
    detco = ["-m", "engine.pretrain", "--method", "detco", "--backbone", "vit", "--device", "cpu",
             "--no-fused", "--steps", "3", "--workers", "0", "--log-every", "1",
             "--method-arg", "queue_length=32", "--method-arg", "hidden=32",
             "--method-arg", "dim=16"]
    run([*detco, "--batch-size", "8", "--out", str(tmp_path / "one")], tmp_path)
    run([*TORCHRUN, *detco, "--batch-size", "4", "--out", str(tmp_path / "two")], tmp_path)
    same_state(tmp_path / "one", tmp_path / "two", steps=3)


def test_fsdp_sim_equals_ddp_and_resumes(tmp_path):
    """SIM (global F, EMA target built in prepare, BatchNorm projector/predictor) sharded with
    FSDP2 computes what DDP does on the same two ranks -- BatchNorm is rank-local in both on a CPU
    -- and a sharded run stopped after 2 steps and resumed with --fsdp ends at the same state."""
    sim = ["-m", "engine.pretrain", "--device", "cpu", "--no-fused", "--steps", "4",
           "--workers", "0", "--log-every", "1", "--batch-size", "4"]
    run([*TORCHRUN, *sim, "--out", str(tmp_path / "ddp")], tmp_path)
    run([*TORCHRUN, *sim, "--fsdp", "--stop-after", "2", "--out", str(tmp_path / "fsdp")],
        tmp_path)
    run([*TORCHRUN, *sim, "--fsdp", "--resume", "--out", str(tmp_path / "fsdp")], tmp_path)
    same_state(tmp_path / "ddp", tmp_path / "fsdp")


def test_fsdp_needs_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *COMMON, "--batch-size", "8", "--fsdp", "--out",
                           str(tmp_path / "alone")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --fsdp shards over torchrun ranks: launch with torchrun "
                      "--nproc_per_node N (N >= 2)"]


def test_activation_checkpointing_keeps_the_gradients_and_saves_less():
    """--checkpoint-activations: SIM's step gives bit-identical gradients with the ViT blocks
    recomputed in backward, and autograd keeps fewer bytes of activations for the backward."""
    import copy

    from engine.checkpointing import checkpoint_activations
    from engine.methods import build_method
    from engine.presets import PretrainConfig
    from engine.trainer import StepSession, make_optimizer, optimisation_step
    from pipelines.augment import augment_recipe
    from pipelines.datasets import sample_photos
    from pipelines.torch_loader import TwoViewLoader

    cfg = PretrainConfig(img_size=32, patch_size=8, dim=32, depth=4, heads=2, decoder_dim=32,
                         decoder_heads=2, projector_depth=1, predictor_depth=1, batch_size=8,
                         blur=False, crop_scale=(0.2, 1.0), workers=0, precision="fp32",
                         preset="test-checkpointing").validate()
    loader = TwoViewLoader(sample_photos(), augment_recipe("sim", 32, blur=False), batch_size=8,
                           workers=0, seed=0)
    batch = next(iter(loader.epoch_batches(0)))
    torch.manual_seed(0)
    plain = build_method(cfg).train()
    recomputed = copy.deepcopy(plain)
    assert checkpoint_activations(recomputed) == 8          # online + target encoder blocks

    def gradients_and_saved_bytes(model):
        optimizer = make_optimizer(model, cfg)
        session = StepSession(cfg, model, model, optimizer,
                              torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"),
                              None, {})
        grads, saved = {}, [0]

        def capture(opt, args, kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None})

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        handle = optimizer.register_step_pre_hook(capture)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            optimisation_step(session, [batch], 0, 0.99)
        handle.remove()
        return grads, saved[0]

    want, plain_bytes = gradients_and_saved_bytes(plain)
    got, recomputed_bytes = gradients_and_saved_bytes(recomputed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert recomputed_bytes < 0.75 * plain_bytes, (recomputed_bytes, plain_bytes)
