"""The MoCo machinery of the queue methods on two data-parallel CPU ranks (gloo).

What is pinned here (He et al., CVPR 2020, §3.3 and `moco/builder.py`):
  * `gather_keys`: the keys of every rank, in rank order (rank 0's then rank 1's), identical on
    every rank;
  * `shuffled_forward` (shuffle-BN): with an encoder that treats each sample on its own, every rank
    gets exactly its own samples back, in its own order; with an encoder that depends on the whole
    local batch (subtracting the batch mean, a BatchNorm stand-in) the batch really was shuffled
    across ranks, and both ranks used the same permutation (the outputs split the global batch
    into exactly `world_size` disjoint groups, each normalised by its own mean, and that split is
    the one `shuffle_generator` draws);
  * mocov2 and densecl trained by `engine.trainer.pretrain` on two ranks: the queues hold the keys
    of both ranks in rank order, step after step, and stay identical on both ranks (whole queue,
    pointer included), and so does every other tensor of the method's state;
  * the same methods launched the way users launch them (torchrun, `python -m engine.pretrain`):
    the run finishes, rank 0 alone writes the metrics, and the checkpoint's queues advanced by
    steps × per-rank batch × ranks keys.

The in-process checks run in ONE pair of spawned workers (a module fixture), so the torch import
and the process-group set-up are paid once.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 4                      # images per rank per step
STEPS = 2
QUEUE = 32                     # > STEPS · BATCH · WORLD: part of the queue is still the initial one
SHUFFLE = (7, 3, 0)            # (seed, step, micro) of the shuffle-BN probes
METHODS = ("mocov2", "densecl")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(method: str):
    from engine.presets import PretrainConfig

    return PretrainConfig(method=method, backbone="vit", img_size=32, patch_size=8, dim=32,
                          depth=1, heads=2, batch_size=BATCH, steps=STEPS, warmup_steps=1,
                          workers=0, optimizer="sgd", clip_grad=0, ema_schedule="constant",
                          momentum=0.99, augmentation="mocov2", log_every=1,
                          checkpoint_every=1000, preset="test-ddp",
                          method_args=dict(queue_length=QUEUE, hidden=32, dim=16)).validate()


def local_images(rank: int) -> torch.Tensor:
    """Distinct per-rank probe samples (B, 3), reproducible in the parent."""
    return torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(100 + rank),
                       dtype=torch.float64)


# ------------------------------------------------------------------------------------ the workers
def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import engine.trainer as trainer
    from engine.methods.densecl import DenseCL
    from engine.methods.mocov2 import MoCoV2
    from engine.models.moco import gather_keys, shuffle_generator, shuffled_forward
    from engine.trainer import RunOptions

    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict = {}

    # (a) the all-gather of keys.
    keys = torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank
    result["gathered"] = gather_keys(keys.requires_grad_(), world)

    # (b) shuffle-BN, each rank drawing its own generator for the same (seed, step, micro).
    images = local_images(rank)
    result["per_sample"] = shuffled_forward(lambda x: (x * 2 + 1, x.sum(dim=1)), images, rank,
                                            world, shuffle_generator(*SHUFFLE))
    result["batch_mean"] = shuffled_forward(lambda x: x - x.mean(dim=0, keepdim=True), images,
                                            rank, world, shuffle_generator(*SHUFFLE))

    # (d) real optimisation steps through the trainer. Each step's local keys are recorded as the
    # method holds them just before after_step enqueues them.
    local_keys: dict[str, list] = {name: [] for name in METHODS}

    def recording(cls, name):
        real = cls.after_step

        def after_step(self, ctx):
            local_keys[name].append([tuple(t.clone() for t in (k if isinstance(k, tuple) else (k,)))
                                     for k in self._step_keys])
            return real(self, ctx)
        return after_step

    MoCoV2.after_step = recording(MoCoV2, "mocov2")
    DenseCL.after_step = recording(DenseCL, "densecl")
    trainer.shutdown = lambda group: None  # keep the group for the next run; destroyed below
    for name in METHODS:
        run = trainer.pretrain(tiny_config(name), RunOptions(out=Path(out) / name, device="cpu",
                                                             fused=False, quiet=True))
        state = {k: v.detach().clone() for k, v in run["model"].state_dict().items()}
        result[name] = {"state": state, "local_keys": local_keys[name], "step": run["step"]}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the workers once; {rank: what it saved}."""
    out = tmp_path_factory.mktemp("two_ranks")
    saved = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned children
    try:
        context = mp.start_processes(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + 180
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                pytest.fail("the two ranks did not finish within 180 s (a collective mismatch?)")
    finally:
        if saved["OMP_NUM_THREADS"] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved["OMP_NUM_THREADS"]
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)}


# ------------------------------------------------------------------------------------ (a), (b)
def test_gather_keys_is_rank_order_and_identical_on_every_rank(two_ranks):
    base = torch.arange(6, dtype=torch.float32).view(3, 2)
    expected = torch.cat([base, base + 100])
    for rank in range(WORLD):
        gathered = two_ranks[rank]["gathered"]
        assert torch.equal(gathered, expected), rank
        assert not gathered.requires_grad  # keys are constants


def test_shuffled_forward_returns_each_rank_its_own_samples_in_order(two_ranks):
    for rank in range(WORLD):
        x = local_images(rank)
        doubled, summed = two_ranks[rank]["per_sample"]
        assert torch.equal(doubled, x * 2 + 1), rank
        assert torch.equal(summed, x.sum(dim=1)), rank


def test_shuffled_forward_shuffles_with_one_permutation_shared_by_the_ranks(two_ranks):
    x = torch.cat([local_images(rank) for rank in range(WORLD)])                # (W·B, 3)
    out = torch.cat([two_ranks[rank]["batch_mean"] for rank in range(WORLD)])
    local = torch.cat([xs - xs.mean(dim=0, keepdim=True) for xs in x.split(BATCH)])
    # The permutation was applied: not the per-rank (unshuffled) batch statistics.
    assert not torch.allclose(out, local)
    # From the outputs alone: each sample had the mean of its encoding batch subtracted, so
    # x − out is that mean. A permutation shared by the ranks encodes every global sample exactly
    # once, in W disjoint groups of B whose own mean is the one subtracted; different
    # permutations would encode some samples twice and others never, and break this.
    subtracted = x - out
    groups: list[list[int]] = []
    for i in range(len(x)):
        for group in groups:
            if torch.allclose(subtracted[i], subtracted[group[0]], rtol=0, atol=1e-12):
                group.append(i)
                break
        else:
            groups.append([i])
    assert sorted(len(group) for group in groups) == [BATCH] * WORLD, groups
    for group in groups:
        assert torch.allclose(x[group].mean(dim=0), subtracted[group[0]], rtol=0, atol=1e-12)
    # And the split is the one shuffle_generator(seed, step, micro) draws, rank r encoding slice r.
    from engine.models.moco import shuffle_generator

    order = torch.randperm(WORLD * BATCH, generator=shuffle_generator(*SHUFFLE))
    expected = torch.empty_like(x)
    for mine in order.view(WORLD, BATCH):
        expected[mine] = x[mine] - x[mine].mean(dim=0, keepdim=True)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    slices = sorted(sorted(mine.tolist()) for mine in order.view(WORLD, BATCH))
    assert sorted(map(sorted, groups)) == slices


# ------------------------------------------------------------------------------------ (d)
@pytest.mark.parametrize("method", METHODS)
def test_queues_hold_all_ranks_keys_in_rank_order_and_stay_identical(two_ranks, method):
    runs = [two_ranks[rank][method] for rank in range(WORLD)]
    assert [run["step"] for run in runs] == [STEPS] * WORLD
    queues = ["queue"] + (["queue_dense"] if method == "densecl" else [])
    for index, name in enumerate(queues):
        # What the queue must hold: per step, rank 0's keys then rank 1's (component `index` of
        # what the method kept for the step: k, or DenseCL's (k, k2)).
        enqueued = torch.cat([torch.cat([micro[index] for micro in run["local_keys"][step]])
                              for step in range(STEPS) for run in runs])
        assert enqueued.shape[0] == STEPS * BATCH * WORLD
        for rank, run in enumerate(runs):
            keys, ptr = run["state"][f"{name}.keys"], run["state"][f"{name}.ptr"]
            assert int(ptr) == STEPS * BATCH * WORLD % QUEUE, (name, rank)
            assert torch.equal(keys[:len(enqueued)], enqueued), (name, rank)
        # The whole queue (the rows not yet overwritten included) is the same on both ranks, as
        # MoCo's: the negatives every rank contrasts against are one set.
        assert torch.equal(runs[0]["state"][f"{name}.keys"], runs[1]["state"][f"{name}.keys"]), \
            f"{name}.keys differ across ranks"
    # Everything else too: DDP keeps the online weights, the EMA targets follow them.
    differ = [key for key, value in runs[0]["state"].items()
              if not torch.equal(value, runs[1]["state"][key])]
    assert not differ, differ


# ------------------------------------------------------------------------------------ (c) torchrun
@pytest.mark.parametrize("method", METHODS)
def test_torchrun_two_ranks_advance_the_queues_by_all_ranks_keys(tmp_path, method):
    out = tmp_path / method
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(WORLD), "-m", "engine.pretrain", "--method", method, "--preset",
         f"{method}-demo-cpu", "--device", "cpu", "--no-fused", "--steps", str(STEPS),
         "--batch-size", str(BATCH), "--workers", "0", "--log-every", "1", "--out", str(out),
         "--method-arg", f"queue_length={QUEUE}", "--method-arg", "hidden=32",
         "--method-arg", "dim=16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert f"{BATCH}×1×{WORLD} ranks" in text
    assert text.count(f"done: step {STEPS}/{STEPS}") == 1      # only rank 0 talks
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # written once, by rank 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == STEPS
    state = checkpoint["model"]
    queues = ["queue"] + (["queue_dense"] if method == "densecl" else [])
    for name in queues:
        assert state[f"{name}.keys"].shape == (QUEUE, 16)
        assert int(state[f"{name}.ptr"]) == STEPS * BATCH * WORLD % QUEUE, name
