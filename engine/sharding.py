"""`--fsdp`: fully sharded data parallelism (PyTorch's FSDP2, `torch.distributed.fsdp.fully_shard`)
for encoders too large to keep a whole copy of parameters, gradients and AdamW state per GPU (ViT-L/H).

The plan: every transformer block (ViT, SIM's projector/predictor) and every ResNet block, online
and target, is its own FSDP unit; the method itself is the root unit, holding the rest (patch
embedding, position embeddings, heads, prototypes). Each unit's parameters are gathered just before
its forward and freed after it (and after its backward), gradients are reduce-scattered, and the
optimiser and the EMA work on each rank's shard only (`torch._foreach_lerp_` on the sharded
DTensors: online and target shards line up because both branches are sharded the same way).

What it changes, and how the engine keeps the rest as it is:
  - every rank must start from the same weights: they are broadcast from rank 0 before sharding
    (DDP does this itself; each rank seeds its own generator with seed + rank);
  - a method's `prepare` runs branches outside the root's forward (SIM's targets): the trainer
    gathers the root's parameters before it (`FSDPModule.unshard`), and the root is initialised
    here, before any block can run first;
  - checkpoints hold the full, unsharded state under the usual names
    (`torch.distributed.checkpoint.state_dict`, gathered to rank 0 on the CPU), so a sharded run's
    checkpoint evaluates, exports and resumes like any other; the optimiser state is stored by
    parameter name, which a run with or without --fsdp can load;
  - gradient accumulation skips the reduce-scatter on all but the last micro-batch
    (`set_requires_gradient_sync`), as DDP's `no_sync`.
Parameters stay fp32 and the step runs under the same autocast as without --fsdp, so a sharded run
computes what a DDP run does (tests/test_scale.py: within 1e-5 on two CPU ranks).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

from engine.models.resnet import BasicBlock, Bottleneck
from engine.models.vit import Block

UNIT_TYPES = (Block, BasicBlock, Bottleneck)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module) -> int:
    """Shard `model` (already on its device, under torchrun) in place; returns the number of
    block units (the root is one more)."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ValueError("--fsdp shards over torchrun ranks: launch with torchrun "
                         "--nproc_per_node N (N >= 2)")
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            dist.broadcast(tensor, src=0)
    units = [module for module in model.modules() if isinstance(module, UNIT_TYPES)]
    for module in units:
        fully_shard(module)
    fully_shard(model)
    # Initialise the root now: a branch run before the root's first forward (SIM's prepare)
    # would otherwise make its first block believe it is the root.
    model._get_fsdp_state()._lazy_init()
    return len(units)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool):
    """A context in which the backward all-reduces (DDP) or reduce-scatters (FSDP) the gradients
    only if `sync` (the last micro-batch of a step)."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimiser) state for a checkpoint. Sharded: gathered in full to rank 0's CPU (a
    collective: every rank calls it; other ranks get empty dicts), the optimiser's by name."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    return (get_model_state_dict(model, options=_FULL),
            get_optimizer_state_dict(model, optimizer, options=_FULL))


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's model and optimiser state into a sharded or plain model; the
    optimiser state may be stored by index (plain runs) or by parameter name (--fsdp runs)."""
    by_name = _optimizer_state_by_name(state["optimizer"])
    if is_sharded(model):
        if not by_name:
            raise ValueError("this checkpoint was written without --fsdp: resume it without "
                             "--fsdp (its optimiser state is stored by index)")
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
        return
    model.load_state_dict(state["model"])
    if by_name:
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])


def _optimizer_state_by_name(optimizer_state: dict) -> bool:
    params = [p for group in optimizer_state.get("param_groups", []) for p in group["params"]]
    return bool(params) and all(isinstance(p, str) for p in params)


__all__ = ["shard_model", "is_sharded", "gradient_sync", "training_state", "load_training_state"]
