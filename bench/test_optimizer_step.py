"""The optimiser step and the EMA update: fused/_foreach (what the engine runs) vs torch.compile.

Issue 10 asks for "the optimiser step and EMA update compiled or fused where it measures better".
The engine runs AdamW with `fused=True` (one multi-tensor kernel per dtype/device group) and the
EMA as one `torch._foreach_lerp_`; this benchmark times those against torch.compile of the same
updates (inductor's generated multi-tensor kernels), on SIM's parameters: on CUDA the
`sim-vit-b16` recipe (ViT-B/16 encoder + projector + predictor, ~100 M trainable parameters and
their EMA copies), on a CPU the `sim-demo-cpu` model. Gradients are random (the update's cost does
not depend on their values). extra_info: parameters, tensors, bytes the update must move (AdamW:
read param, grad, exp_avg, exp_avg_sq and write three of them, fp32: 28 B/param; EMA: read two,
write one: 12 B/param), the achieved GB/s and the fraction of the measured copy ceiling, and the
cold compile seconds of the compiled variants.
"""
from __future__ import annotations

import time

import pytest
import torch

from engine.methods.sim import SIM
from engine.presets import preset_config
from engine.optim import make_optimizer

CUDA = torch.cuda.is_available()


def sim_model(device):
    cfg = preset_config("sim-vit-b16" if CUDA else "sim-demo-cpu")
    torch.manual_seed(0)
    return cfg, SIM(cfg).to(device).train()


def params_with_grads(model):
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=params[0].device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, device=p.device, dtype=p.dtype, generator=generator)
    return params


def record(benchmark, device_ceilings, params, bytes_per_param, **info):
    count = sum(p.numel() for p in params)
    moved = bytes_per_param * count
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None
    rate = moved / seconds / 1e9 if seconds else None
    benchmark.extra_info.update(
        parameters=count, tensors=len(params), bytes=moved, gb_per_s=rate,
        fraction_of_copy_ceiling=rate / device_ceilings["copy_gbps"] if rate else None,
        **info)


@pytest.mark.benchmark(group="optimizer_step")
@pytest.mark.parametrize("variant", ["fused", "compiled"])
def test_adamw_step(benchmark, bench_device, sync, device_ceilings, variant):
    """AdamW over SIM's trainable parameters: `fused=True` (the engine) vs torch.compile of the
    step (the foreach implementation traced and fused by inductor)."""
    cfg, model = sim_model(bench_device)
    optimizer = make_optimizer(model, cfg)          # AdamW(fused=True), the recipe's groups
    params = params_with_grads(model)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    if variant == "compiled":
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = False, True
        step = torch.compile(optimizer.step)
    else:
        step = optimizer.step

    def run():
        step()
        sync()

    started = time.perf_counter()
    run()
    cold = time.perf_counter() - started
    benchmark.pedantic(run, rounds=10 if CUDA else 5, iterations=1, warmup_rounds=1)
    record(benchmark, device_ceilings, params, 28, variant=variant, preset=cfg.preset,
           cold_step_s=cold)


@pytest.mark.benchmark(group="ema_update")
@pytest.mark.parametrize("variant", ["foreach", "compiled"])
def test_ema_update(benchmark, bench_device, sync, device_ceilings, variant):
    """ξ ← m·ξ + (1−m)·θ over SIM's online/target pairs: `_foreach_lerp_` (the engine's
    Method.before_step) vs torch.compile of the same loop."""
    cfg, model = sim_model(bench_device)
    model.before_step(0.996)                         # builds the pair lists
    online, target = model._ema_pairs

    @torch.no_grad()
    def lerp(momentum: float):
        torch._foreach_lerp_(target, online, 1.0 - momentum)

    update = torch.compile(lerp) if variant == "compiled" else lerp

    def run():
        update(0.996)
        sync()

    started = time.perf_counter()
    run()
    cold = time.perf_counter() - started
    benchmark.pedantic(run, rounds=10 if CUDA else 5, iterations=1, warmup_rounds=1)
    record(benchmark, device_ceilings, online, 12, variant=variant, preset=cfg.preset,
           cold_step_s=cold)
