"""`--compile`: regional torch.compile of a method's networks.

Whole-model compilation of a two-branch self-supervised step is slow to start (one big graph per
branch, mode and micro-batch shape) and breaks on the parts that are not tensor programs (mask
sampling, queues, collectives). Instead the repeated building blocks are compiled one by one, in
place (`nn.Module.compile`, so parameter names, checkpoints and DDP are unchanged):

  * every transformer `Block` (the ViT's, SIM's projector/predictor BatchNorm blocks),
  * every ResNet `BasicBlock` / `Bottleneck`,
  * every projection/prediction head built by `engine.models.heads.mlp` (an `nn.Sequential` of
    Linear/1x1-conv, BatchNorm and ReLU),
  * every fp32 LayerNorm / token BatchNorm not inside one of the above (the casts around them fuse
    into one kernel).

Identical blocks share one graph: dynamo treats module parameters as graph inputs, so the 12
blocks of a ViT-B compile once (per grad mode, autocast state and input shape), which keeps the cold
start to a few graphs. The `densesim::` kernel ops stay opaque calls inside the graphs (they are
registered torch ops with fake implementations), and everything between the regions -- masks,
geometry, gathers, losses, queues, EMA -- runs eagerly. The optimiser is already one fused kernel
(`AdamW(fused=True)`) or `_foreach` ops (SGD, LARS), and so is the EMA update (`_foreach_lerp_`);
they are not compiled.

`mode` is torch.compile's: "default", "max-autotune-no-cudagraphs", or "reduce-overhead" (CUDA
graphs per region via inductor's cudagraph trees; fixed-shape batches only -- the loaders drop the
last partial batch, so every training step has the same shapes).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from engine.models.resnet import BasicBlock, Bottleneck
from engine.models.vit import Block, FP32LayerNorm, TokenBatchNorm

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
_BLOCKS = (Block, BasicBlock, Bottleneck)
_NORMS = (FP32LayerNorm, TokenBatchNorm)
_HEAD_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU)


@dataclass
class CompiledRegions:
    mode: str
    regions: Counter = field(default_factory=Counter)   # region kind -> how many instances
    graphs_before: int = field(default_factory=lambda: CompiledRegions.graphs())

    def describe(self) -> str:
        kinds = ", ".join(f"{count} × {kind}" for kind, count in self.regions.items())
        return f"torch.compile ({self.mode}, regional): {kinds or 'no region found'}"

    def first_step_message(self, seconds: float) -> str:
        """After the first step (which compiles): its time and the number of graphs made."""
        graphs = self.graphs() - self.graphs_before
        return (f"torch.compile: {graphs} graph{'s' * (graphs != 1)} for the "
                f"{sum(self.regions.values())} regions, compiled during the first step "
                f"({seconds:.1f} s)")

    @staticmethod
    def graphs() -> int:
        """Distinct graphs dynamo has compiled in this process so far."""
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _is_head(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) > 0
            and all(isinstance(layer, _HEAD_LAYERS) for layer in module)
            and any(isinstance(layer, (nn.Linear, nn.Conv2d)) for layer in module))


def _region_kind(module: nn.Module) -> str | None:
    if isinstance(module, _BLOCKS):
        norm = getattr(module, "norm1", None)
        return (f"{type(module).__name__}" + ("(BN)" if isinstance(norm, TokenBatchNorm) else "")
                if isinstance(module, Block) else type(module).__name__)
    if _is_head(module):
        return "head"
    if isinstance(module, _NORMS):
        return type(module).__name__
    return None


def compile_regions(model: nn.Module, mode: str = "default") -> CompiledRegions:
    """Compile `model`'s regions in place (see the module docstring); returns what was compiled.
    Call before wrapping the model in DDP and after moving it to its device."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    # Every region compiles the same wrapper code (nn.Module._call_impl): one cache entry per
    # distinct (region kind, grad mode, autocast, shape) combination; the default limit of 8 per
    # code object is too low for a two-branch method with several region kinds.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 512)
    report = CompiledRegions(mode)
    options = {} if mode == "default" else {"mode": mode}
    def visit(module: nn.Module) -> None:
        kind = _region_kind(module)
        if kind is not None:
            module.compile(**options)
            report.regions[kind] += 1
            return  # a region's own submodules are part of its graph
        for child in module.children():
            visit(child)

    visit(model)
    return report


__all__ = ["COMPILE_MODES", "CompiledRegions", "compile_regions"]
