"""Measurement helpers shared by the benchmark modules."""
from __future__ import annotations

import torch


def peak_extra_bytes(fn, device) -> int | None:
    """Peak memory one call of `fn` allocates above what was allocated before it (CUDA only;
    None elsewhere). The result of `fn` is dropped before returning."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak
