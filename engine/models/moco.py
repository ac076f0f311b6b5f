"""The MoCo pieces every queue-based method shares: the key queue, the all-gather of keys before
they are enqueued, and the shuffle-BN of the key encoder's batch (He et al., CVPR 2020, §3.3).

KeyQueue: a ring of `length` keys (rows, L2-normalised), in buffers so the checkpoint holds them
and the write pointer: `keys` (length, dim) initialised to normalize(randn) as MoCo does, `ptr`
(int64 scalar tensor). `enqueue(k)` writes the rows of k at ptr, ptr+1, ... modulo length, so
the oldest keys are replaced first, and advances ptr; it never reads ptr back to the host. MoCo
requires `length % global batch == 0`; here any length works (a write wraps around the end).

Under data parallelism every rank enqueues the keys of ALL ranks in rank order (`gather_keys`),
so the queues stay identical on every rank, as in MoCo's `concat_all_gather`.

Shuffle-BN (`shuffled_forward`): the key encoder's BatchNorm must not see the batch the query saw
as one BN batch, or the model "cheats" through intra-batch statistics. MoCo gathers the key
images of all ranks, permutes them with a permutation shared by every rank, lets each rank encode
its slice, gathers the keys back and undoes the permutation. MoCo draws the permutation on rank 0
and broadcasts it; here every rank draws the same one from a generator seeded by (seed, step,
micro-batch), which needs no broadcast and makes a resumed run draw the same permutations. With one
process the per-process BN batch is the whole batch either way and nothing is shuffled.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class KeyQueue(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        if length < 1 or dim < 1:
            raise ValueError(f"a key queue needs length >= 1 and dim >= 1, got {length}, {dim}")
        self.length, self.dim = length, dim
        self.register_buffer("keys", F.normalize(torch.randn(length, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Write `keys` (n, dim) at the pointer (oldest first), wrapping around; when n > length
        only the last `length` keys are kept (they would overwrite the earlier ones). `ok` (a 0-d
        bool tensor, from a step that may be skipped): when False nothing changes -- decided on
        the device, no host sync."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"enqueue takes keys of shape (n, {self.dim}), got "
                             f"{tuple(keys.shape)}")
        n = keys.shape[0]
        if n == 0:
            return
        start = n - min(n, self.length)
        keys = keys[start:]
        slots = (self.ptr + start + torch.arange(keys.shape[0], device=self.ptr.device)) \
            % self.length
        keys = keys.detach().to(self.keys.dtype)
        if ok is None:
            self.keys[slots] = keys
            self.ptr.copy_((self.ptr + n) % self.length)
        else:
            self.keys[slots] = torch.where(ok, keys, self.keys[slots])
            self.ptr.copy_((self.ptr + n * ok.long()) % self.length)

    def extra_repr(self) -> str:
        return f"length={self.length}, dim={self.dim}"


class QueueView:
    """Queue `index` of a KeyQueueBank, with KeyQueue's interface: `keys` (length, dim) and `ptr`
    (0-d) are views into the bank's buffers."""

    def __init__(self, bank: "KeyQueueBank", index: int):
        self.bank, self.index = bank, index
        self.length, self.dim = bank.length, bank.dim

    @property
    def keys(self) -> torch.Tensor:
        return self.bank.keys[self.index]

    @property
    def ptr(self) -> torch.Tensor:
        return self.bank.ptr[self.index]

    def enqueue(self, keys: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        KeyQueue.enqueue(self, keys, ok)   # the same ring-buffer write, on the views


class KeyQueueBank(nn.Module):
    """`count` queues of `length` keys in one (count, length, dim) buffer, the operand of
    kernels.queue_infonce_grouped (every term of a step in one launch, no stacking copy). Queue i
    (`bank[i]`) behaves as a KeyQueue; its initial keys are the ones `count` KeyQueues built in
    order would draw (the same randn stream)."""

    def __init__(self, count: int, length: int, dim: int):
        super().__init__()
        if count < 1 or length < 1 or dim < 1:
            raise ValueError(f"a key queue bank needs count, length, dim >= 1, got {count}, "
                             f"{length}, {dim}")
        self.count, self.length, self.dim = count, length, dim
        self.register_buffer("keys", torch.stack([F.normalize(torch.randn(length, dim), dim=1)
                                                  for _ in range(count)]))
        self.register_buffer("ptr", torch.zeros(count, dtype=torch.int64))

    def __getitem__(self, index: int) -> QueueView:
        if not 0 <= index < self.count:
            raise IndexError(f"queue {index} of a bank of {self.count}")
        return QueueView(self, index)

    def extra_repr(self) -> str:
        return f"count={self.count}, length={self.length}, dim={self.dim}"


def gather_keys(keys: torch.Tensor, world_size: int) -> torch.Tensor:
    """All ranks' `keys` concatenated in rank order (no gradient); `keys` itself when alone."""
    if world_size <= 1 or not dist.is_initialized():
        return keys
    keys = keys.detach().contiguous()
    parts = [torch.empty_like(keys) for _ in range(world_size)]
    dist.all_gather(parts, keys)
    return torch.cat(parts)


def shuffle_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The same permutation on every rank for (seed, step, micro-batch). (Tuples of ints hash
    the same in every process; strings would not, PYTHONHASHSEED varies.)"""
    return torch.Generator().manual_seed(hash((0x5B5B, seed, step, micro)) % (2 ** 63))


def shuffled_forward(encode: Callable[[torch.Tensor], tuple | torch.Tensor], images: torch.Tensor,
                     rank: int, world_size: int, generator: torch.Generator):
    """encode(images) with shuffle-BN over `world_size` ranks (module docstring). `encode` returns
    a tensor or a tuple of tensors with the batch first; they come back in the caller's order."""
    if world_size <= 1 or not dist.is_initialized():
        return encode(images)
    batch = images.shape[0]
    everything = gather_keys(images, world_size)
    order = torch.randperm(batch * world_size, generator=generator).to(images.device)
    mine = order.view(world_size, batch)[rank]
    outputs = encode(everything[mine])
    single = isinstance(outputs, torch.Tensor)
    outputs = (outputs,) if single else tuple(outputs)
    restore = torch.argsort(order).view(world_size, batch)[rank]
    unshuffled = tuple(gather_keys(out, world_size)[restore] for out in outputs)
    return unshuffled[0] if single else unshuffled


__all__ = ["KeyQueue", "gather_keys", "shuffle_generator", "shuffled_forward"]
