"""Data parallelism under `torchrun`: one process per GPU (or per CPU rank, with gloo).

`torchrun --nproc_per_node 8 -m engine.pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
`python -m engine.pretrain` is one process and none of this is active. Under data parallelism the
loader shards each global batch over the ranks, gradients are averaged by DDP, the UniGrad F is
all-reduced (kernels.unigrad_covariance), BatchNorm becomes SyncBatchNorm on CUDA, and only rank 0
writes logs, metrics and checkpoints.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroupInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_environment(device_name: str) -> ProcessGroupInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroupInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    global _CONTROL
    # host-side agreement between ranks (stop requests) without touching the device: gloo always
    _CONTROL = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return ProcessGroupInfo(rank, world_size, local_rank)


_CONTROL = None


def control_group():
    """The process group for small host-side collectives (the default group on gloo runs, a gloo
    group beside NCCL on GPU runs)."""
    return _CONTROL


def mean_over_ranks(value: torch.Tensor, group: ProcessGroupInfo) -> torch.Tensor:
    """The mean of a tensor over all ranks (for logging); the tensor itself when alone."""
    if not group.active:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / group.world_size


def shutdown(group: ProcessGroupInfo) -> None:
    """Leave the process group together: without the barrier a rank that finished first (the
    others skip rank 0's checkpoint and plot) tore its gloo connections down while rank 0 still
    used them, and aborted at exit ("terminate called without an active exception") now and then
    on a loaded 2-core CI machine.

    The teardown could also deadlock (about one run in 15 on the loaded VM; py-spy): the main
    thread, holding the GIL, destroyed the ProcessGroupGloo and joined its worker thread, while
    that worker was still freeing a finished work whose tensors are Python objects -- which needs
    the GIL. So the caller drops DDP (whose reducer holds the group) first, and after the barrier
    the main thread sleeps briefly without the GIL so the workers free their finished works
    before the group is destroyed."""
    if not (group.active and dist.is_initialized()):
        return
    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()