"""One full SIM optimiser step, `--no-fused` (reference) vs `--fused` (Triton kernels).

On CUDA: the recipe model (ViT-B/16, 224 px, 118/196 masked, batch 128, bf16 autocast). On CPU: the
demo preset at batch 8 (reference only; the fused variant skips: Triton runs compiled only on CUDA).
Inputs are synthetic (random pixels, crop boxes drawn by the loader's own sampler) so the figure is
the model step alone: EMA update, target forward, F, online forward, loss, backward, clip, AdamW.
extra_info: step time, img/s, model GFLOP per image, achieved TFLOP/s and the fraction of the
measured matmul ceiling (MFU).
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.fused import choose_kernels
from engine.models.sim import SIM, sim_flops_per_image
from engine.presets import preset_config
from engine.trainer import StepSession, autocast_dtype, make_optimizer, optimisation_step
from pipelines.augment import random_resized_crop_box

CUDA = torch.cuda.is_available()


def synthetic_batch(cfg, batch_size: int, device: torch.device) -> dict:
    rng = random.Random(0)
    height = width = 256
    boxes = torch.tensor([[random_resized_crop_box(height, width, cfg.crop_scale, cfg.crop_ratio,
                                                   rng) for _ in range(2)]
                          for _ in range(batch_size)], dtype=torch.float32)
    return {"view1": torch.randn(batch_size, 3, cfg.img_size, cfg.img_size, device=device),
            "view2": torch.randn(batch_size, 3, cfg.img_size, cfg.img_size, device=device),
            "boxes": boxes, "flips": torch.rand(batch_size, 2) < 0.5,
            "image_size": torch.tensor([[height, width]] * batch_size)}


@pytest.mark.benchmark(group="train_step")
@pytest.mark.parametrize("variant", ["reference", "fused"])
def test_sim_train_step(benchmark, bench_device, sync, device_ceilings, variant):
    if variant == "fused" and not CUDA:
        pytest.skip("the Triton kernels run compiled only on a CUDA device")
    if CUDA:
        cfg = preset_config("sim-vit-b16")
        cfg.accum = 1
    else:
        cfg = preset_config("sim-demo-cpu")
        cfg.batch_size = 8
    torch.manual_seed(0)
    model = SIM(cfg).to(bench_device).train()
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    amp_dtype = autocast_dtype(cfg, bench_device)
    scaler = torch.amp.GradScaler(bench_device.type, enabled=amp_dtype is torch.float16)
    kernels = choose_kernels(variant == "fused", bench_device)
    session = StepSession(cfg, model, model, optimizer, scaler, bench_device, amp_dtype,
                          kernels.backend)
    batch = synthetic_batch(cfg, cfg.batch_size, bench_device)
    step = [0]

    def run():
        loss, _ = optimisation_step(session, [batch], step[0], 0.996)
        step[0] += 1
        sync()
        return loss

    for _ in range(2):  # warm-up: allocator, autotuning, the mask's CUDA graph
        run()
    loss = benchmark.pedantic(run, rounds=10 if CUDA else 3, iterations=1)
    assert torch.isfinite(loss).item()
    if variant == "fused":
        assert kernels.any_fused, kernels.message

    flops = sim_flops_per_image(cfg)
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None
    img_per_s = cfg.batch_size / seconds if seconds else None
    achieved = flops * img_per_s / 1e12 if img_per_s else None
    benchmark.extra_info.update(
        variant=variant, preset=cfg.preset, batch=cfg.batch_size, img_size=cfg.img_size,
        precision=str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        backends=kernels.backend, gflop_per_img=flops / 1e9, step_ms=seconds and 1e3 * seconds,
        img_per_s=img_per_s, tflops=achieved,
        mfu=achieved / device_ceilings["matmul_tflops"] if achieved else None,
        ceilings=device_ceilings)
