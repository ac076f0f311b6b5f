"""Counting the calls that would make the host wait for the device (a "host sync") on CUDA.

`count_host_syncs()` patches, for the duration of a `with` block, every Python-level way a tensor
value reaches the host -- `Tensor.item/__bool__/__float__/__int__/__index__/tolist/numpy` -- and the
ops whose output shape depends on tensor values (`nonzero`, `unique`, `masked_select`,
`repeat_interleave` without `output_size`, indexing with a boolean mask), which on CUDA all wait for
the device. The patches are on the classes and on `torch`, so they see calls anywhere: in the engine,
inside a method, and inside the Python bodies of the registered `densesim::` ops (which a
TorchFunctionMode/TorchDispatchMode would not see into). Reading a CPU tensor is not a sync, but
the same line on a CUDA tensor is, so counting on CPU proves the step would not sync on CUDA.
`torch._assert_async` (a device-side check, the sanctioned way) is not counted.

    with count_host_syncs() as syncs:
        optimisation_step(...)
    assert not syncs, syncs.report()
"""
from __future__ import annotations

import collections
import contextlib
import traceback
from pathlib import Path

import torch

_TENSOR_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
_SHAPE_FROM_VALUES = ("nonzero", "unique", "masked_select", "argwhere")
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"


class HostSyncs(collections.Counter):
    def report(self) -> str:
        return "; ".join(f"{what} at {where} x{n}" for (what, where), n in self.items())


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__:
            return f"{frame.filename.removeprefix(_ROOT)}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def count_host_syncs():
    syncs = HostSyncs()
    saved: list[tuple[object, str, object]] = []

    def patch(owner, name, counted):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if counted(args, kwargs):
                syncs[(f"{getattr(owner, '__name__', owner)}.{name}", _caller())] += 1
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    always = lambda args, kwargs: True  # noqa: E731

    def bool_index(args, kwargs):
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0
                   for p in parts)

    def no_output_size(args, kwargs):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None

    try:
        for name in _TENSOR_READS:
            patch(torch.Tensor, name, always)
        for name in _SHAPE_FROM_VALUES:
            patch(torch.Tensor, name, always)
            patch(torch, name, always)
        patch(torch.Tensor, "__getitem__", bool_index)
        patch(torch.Tensor, "repeat_interleave", no_output_size)
        patch(torch, "repeat_interleave", no_output_size)
        yield syncs
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
