"""One full training step of every method, reference (`--no-fused`) vs fused (`--fused`), broken
down by stage.

A step is what `engine.trainer.pretrain` does per optimiser step: wait for the next batch, then
`optimisation_step` (EMA update, the method's prepare / forward / loss, backward, enqueue, clip +
optimiser step). `test_sim_train_step` is SIM's (as before); `test_method_train_step` runs every
method of engine/methods/ on its published recipe: on CUDA the `<method>-r50` preset (ResNet-50,
224 px) at the paper's per-GPU batch (MoCo v2 / DenseCL 32, DenseSiam 64, PixPro / LC-loss 128) in
bf16, on CPU the `<method>-demo-cpu` preset (ResNet-18, CIFAR stem, 32 px) at batch 16, fp32,
device batch only. The `reference` variant computes each hot op as the official code does
(DenseCL's materialised logits and similarity matrix, PixPro's (B, N, N) mask and cosines, the
eager PPM), so `fused / reference` is "ours vs the method in its official code's formulation" in
the same step; `<method> / mocov2` is the dense method's overhead over its instance baseline
(DenseCL's paper: < 1%). `extra_info` carries `method` for bench.report.

Parametrised by
  variant  `reference`: the PyTorch ops (`choose_kernels(False)`); `fused`: the Triton kernels that
           `choose_kernels(True)` picks (CUDA only: on CPU the Triton interpreter would time the
           interpreter, so the case skips).
  feed     `loader`: the batch comes from the PyTorch two-view loader
           (`pipelines.torch_loader.TwoViewLoader`, Pillow workers; not DALI, not a device-resident
           loader) and the wait for it is part of the step, as in training;
           `device_batch`: one loader batch reused with its views already on the device, i.e. the
           model step alone (what the earlier results, taken on synthetic batches, measured).
Sizes: on CUDA the recipe (preset `sim-vit-b16`: ViT-B/16, 224 px, 118/196 masked), batch 128,
accum 1, bf16 autocast; on CPU the `sim-demo-cpu` preset (ViT 128d x 6, 64 px, patch 8), batch 32,
fp32. Data: the embedded photos (`pipelines.datasets.sample_photos()`: 47 JPEGs, short side 96 px,
cheaper to decode than ImageNet-size JPEGs), repeated to fill the batch where it is larger;
`DENSESIM_BENCH_DATA=DIR` uses an image folder instead. Loader workers: the preset's
(`DENSESIM_BENCH_WORKERS=N` overrides), capped at the CPU count.

Timing. The headline (pytest-benchmark's rounds) is the free-running step, synchronised once at
its end. The breakdown comes from further steps run with an `engine.stage_timer.StageTimer` as
`optimisation_step`'s `stages` hook, which synchronises the device at every stage boundary (so
each stage's kernels are charged to it); that removes the host/device overlap, so the stages add
up to a little more than the free-running step (`stage_sync_overhead`).

extra_info: variant, feed, preset, batch, precision, backends, loader/data/workers;
gflop_per_img (`model.flops_per_image()`: online forward + backward + target forward), step_ms
(median), img_per_s, tflops (achieved model FLOP rate) and mfu (= tflops / the matmul ceiling
measured in this run: bf16 on CUDA, fp32 on CPU); stages_ms (ms per step for each stage),
stage_fraction (of the stages' sum), stages_total_ms, stage_rounds, stage_sync_overhead and
data_wait_fraction; ceilings (from conftest).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from engine.fused import choose_kernels
from engine.loaders import build_augment
from engine.methods import build_method
from engine.methods.sim import SIM
from engine.presets import preset_config
from engine.stage_timer import StageTimer
from engine.trainer import load_run_proposals
from engine.trainer import (
    StepSession,
    autocast_dtype,
    make_optimizer,
    optimisation_step,
)
from pipelines.datasets import ImageFolder, sample_photos
from pipelines.torch_loader import TwoViewLoader

CUDA = torch.cuda.is_available()
CPU_BATCH = 32
WARMUP = 2                                   # allocator, autotuning, the mask's CUDA graph, workers
ROUNDS, STAGE_ROUNDS = (10, 10) if CUDA else (8, 5)


class Repeated:
    """`dataset` indexed modulo its length, `length` items long (fills a batch from few photos)."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


def make_loader(cfg, device: torch.device) -> tuple[TwoViewLoader, dict]:
    folder = os.environ.get("DENSESIM_BENCH_DATA")
    dataset = ImageFolder(folder) if folder else sample_photos()
    source = folder or "embedded sample photos (pipelines.datasets.sample_photos)"
    if len(dataset) < cfg.batch_size:
        source += f", {len(dataset)} images repeated to fill a batch of {cfg.batch_size}"
        dataset = Repeated(dataset, cfg.batch_size)
    workers = int(os.environ.get("DENSESIM_BENCH_WORKERS", cfg.workers))
    workers = min(workers, os.cpu_count() or 1)
    views = views_of(cfg)
    augment = build_augment(cfg, views)           # multi-crop for SwAV
    proposals = None
    if views.proposals:                           # CCOP: the cached selective-search boxes
        (boxes, counts), _ = load_run_proposals(folder, None, views.proposals, cfg.method)
        index = torch.arange(len(dataset)) % len(boxes)
        proposals = (boxes[index], counts[index])
    loader = TwoViewLoader(dataset, augment, batch_size=cfg.batch_size, workers=workers,
                           seed=cfg.seed, pin_memory=device.type == "cuda", proposals=proposals)
    return loader, {"loader": "torch (pipelines.torch_loader.TwoViewLoader, Pillow workers)",
                    "data": source, "workers": workers}


def device_batch(cfg, device: torch.device) -> tuple[dict, dict]:
    """One loader batch with its views on `device` (the model step alone, no loader wait)."""
    loader, data_info = make_loader(cfg, device)
    stream = loader.stream()
    batch = next(stream)
    stream.close()                # no idle workers prefetching beside the timed steps
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "crops" in batch:      # multi-crop: view1/view2 are its first two crops
        moved["crops"] = [c.to(device) for c in batch["crops"]]
        moved["view1"], moved["view2"] = moved["crops"][0], moved["crops"][1]
    return moved, data_info


def views_of(cfg):
    """The views cfg's method asks the loader for (built on the meta device: no weights)."""
    with torch.device("meta"):
        return build_method(cfg).views


def device_batch_step(session, batch: dict, momentum: float, sync, cuda_graphs: bool = False):
    """run(stages=None) -> loss: one optimisation step on `batch`, synchronised at its end."""
    step = [0]

    def run(stages=None):
        if stages is not None:
            stages.start()
        if cuda_graphs:           # the last step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss, _, _ = optimisation_step(session, [batch], step[0], momentum, stages=stages)
        step[0] += 1
        sync()
        return loss

    return run


def step_config():
    if CUDA:
        cfg = preset_config("sim-vit-b16")      # batch 128 per GPU, bf16 autocast
    else:
        cfg = preset_config("sim-demo-cpu")
        cfg.batch_size = CPU_BATCH
    cfg.accum = 1
    return cfg


def bench_session(cfg, device: torch.device, variant: str):
    """(StepSession of cfg's method on `device`, the kernel choice) for one benchmark case."""
    torch.manual_seed(0)
    model = (SIM(cfg) if cfg.method == "sim" else build_method(cfg)).to(device).train()
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    kernels = choose_kernels(variant == "fused", device)
    if variant == "fused":
        assert kernels.any_fused, kernels.message
    return StepSession(cfg, model, model, optimizer, scaler, device, amp_dtype,
                       kernels.backend), kernels


def record_step(benchmark, cfg, session: StepSession, kernels, timer: StageTimer,
                device_ceilings: dict, **info) -> None:
    """The step's figures into extra_info: rate, model FLOP rate and MFU, and the stage table."""
    flops = session.method.flops_per_image()
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None
    img_per_s = cfg.batch_size / seconds if seconds else None
    achieved = flops * img_per_s / 1e12 if img_per_s else None
    stages_ms = timer.mean_ms()
    total_ms = sum(stages_ms.values())
    amp_dtype = session.amp_dtype
    benchmark.extra_info.update(
        preset=cfg.preset, batch=cfg.batch_size, img_size=cfg.img_size,
        precision=str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        backends=kernels.backend, gflop_per_img=flops / 1e9,
        step_ms=seconds and 1e3 * seconds, img_per_s=img_per_s, tflops=achieved,
        mfu=achieved / device_ceilings["matmul_tflops"] if achieved else None,
        mfu_matmul_dtype=device_ceilings["matmul_dtype"],
        stages_ms=stages_ms, stage_fraction={k: v / total_ms for k, v in stages_ms.items()},
        stages_total_ms=total_ms, stage_rounds=timer.steps,
        stage_sync_overhead=total_ms / (1e3 * seconds) - 1 if seconds else None,
        data_wait_fraction=stages_ms["data_wait"] / total_ms if "data_wait" in stages_ms
        else None, **info)


@pytest.mark.benchmark(group="train_step")
@pytest.mark.parametrize("feed", ["loader", "device_batch"])
@pytest.mark.parametrize("variant", ["reference", "fused"])
def test_sim_train_step(benchmark, bench_device, sync, device_ceilings, variant, feed):
    if variant == "fused" and not CUDA:
        pytest.skip("the Triton kernels run compiled only on a CUDA device (under the CPU "
                    "interpreter a step would time the interpreter)")
    cfg = step_config()
    session, kernels = bench_session(cfg, bench_device, variant)
    loader, data_info = make_loader(cfg, bench_device)
    stream = loader.stream()
    step = [0]
    if feed == "device_batch":
        resident = next(stream)
        stream.close()                # no idle workers prefetching beside the timed steps
        resident = {k: v.to(bench_device) if k in ("view1", "view2") else v
                    for k, v in resident.items()}

    def run(stages=None):
        if stages is not None:
            stages.start()
        if feed == "loader":
            batch = next(stream)
            if stages is not None:
                stages("data_wait")
        else:
            batch = resident
        loss, _, _ = optimisation_step(session, [batch], step[0], 0.996, stages=stages)
        step[0] += 1
        sync()
        return loss

    disabled = getattr(benchmark, "disabled", False)   # --benchmark-disable: one of each, fast
    timer = StageTimer(bench_device)
    try:
        for _ in range(1 if disabled else WARMUP):
            run()
        loss = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
        for _ in range(1 if disabled else STAGE_ROUNDS):
            run(timer)
    finally:
        stream.close()                                  # stops the loader's workers
    assert torch.isfinite(loss).item()

    record_step(benchmark, cfg, session, kernels, timer, device_ceilings, variant=variant,
                feed=feed, **data_info)


def test_stage_hook_changes_nothing():
    """The `stages` hook only observes: two accumulated steps with a StageTimer give bit-identical
    losses, gradient norms and parameters to the same steps without one, and every stage is
    marked in step order (a plain test, run by `pytest bench --benchmark-disable`)."""
    from engine.presets import PretrainConfig
    from engine.stage_timer import STAGES

    cfg = PretrainConfig(img_size=32, patch_size=8, dim=32, depth=1, heads=2, decoder_dim=32,
                         decoder_heads=2, projector_depth=1, predictor_depth=1, batch_size=8,
                         accum=2, blur=False, crop_scale=(0.2, 1.0), workers=0).validate()
    loader, _ = make_loader(cfg, torch.device("cpu"))
    stream = loader.stream()
    batches = [next(stream) for _ in range(4)]
    stream.close()
    marks = []

    cpu = torch.device("cpu")

    def train(stages=None):
        torch.manual_seed(0)
        model = SIM(cfg).train()
        optimizer = make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        session = StepSession(cfg, model, model, optimizer, scaler, cpu, None,
                              choose_kernels(False, cpu).backend)
        results = [optimisation_step(session, batches[2 * i:2 * i + 2], i, 0.99, stages=stages)
                   for i in range(2)]
        return results, model.state_dict()

    plain, plain_state = train()
    timed, timed_state = train(stages=marks.append)
    for (loss_a, norm_a, _), (loss_b, norm_b, _) in zip(plain, timed):
        assert torch.equal(loss_a, loss_b) and torch.equal(norm_a, norm_b)
    assert all(torch.equal(plain_state[k], timed_state[k]) for k in plain_state)
    per_micro = ["online_forward", "loss", "backward"]
    assert marks == 2 * (["ema", "target_forward", "loss"] + 2 * per_micro
                         + ["queue", "optimizer"])
    assert set(marks) <= set(STAGES)

    timer = StageTimer("cpu")
    timer.start()
    timer("data_wait")
    timer("ema")
    timer("ema")
    assert list(timer.mean_ms()) == ["data_wait", "ema"] and timer.steps == 1
    with pytest.raises(RuntimeError, match="start"):
        StageTimer("cpu")("ema")


DENSE_METHODS = ("mocov2", "densecl", "pixpro", "densesiam", "lcloss", "swav", "regioncl", "detco",
                 "ccop", "scfs", "updetr", "detreg", "pairdetr")
CPU_METHOD_BATCH = 16


def method_config(method: str):
    if CUDA:
        cfg = preset_config(f"{method}-r50")      # the paper's per-GPU batch, bf16 autocast
    else:
        cfg = preset_config(f"{method}-demo-cpu")
        cfg.batch_size = CPU_METHOD_BATCH
    cfg.accum = 1
    return cfg


@pytest.mark.benchmark(group="train_step_methods")
@pytest.mark.parametrize("variant", ["reference", "fused"])
@pytest.mark.parametrize("method", DENSE_METHODS)
def test_method_train_step(benchmark, bench_device, sync, device_ceilings, method, variant):
    if variant == "fused" and not CUDA:
        pytest.skip("the Triton kernels run compiled only on a CUDA device (under the CPU "
                    "interpreter a step would time the interpreter)")
    cfg = method_config(method)
    session, kernels = bench_session(cfg, bench_device, variant)
    batch, data_info = device_batch(cfg, bench_device)
    run = device_batch_step(session, batch, cfg.momentum, sync)

    disabled = getattr(benchmark, "disabled", False)
    timer = StageTimer(bench_device)
    for _ in range(1 if disabled else WARMUP):
        run()
    loss = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    for _ in range(1 if disabled else STAGE_ROUNDS):
        run(timer)
    assert torch.isfinite(loss).item()

    peak = (torch.cuda.max_memory_allocated(bench_device) / 2 ** 30
            if bench_device.type == "cuda" else None)
    record_step(benchmark, cfg, session, kernels, timer, device_ceilings, method=method,
                variant=variant, feed="device_batch", backbone=cfg.backbone,
                peak_memory_gib=peak, **data_info)


# ------------------------------------------------------------------ compiled steps (issue 10)
COMPILED_VARIANTS = {
    # name: (kernels, torch.compile mode or None)
    "eager_reference": ("reference", None),
    "eager_fused": ("fused", None),
    "compiled_reference": ("reference", "default"),
    "compiled_fused": ("fused", "default"),
    "cudagraph_fused": ("fused", "reduce-overhead"),
}


@pytest.mark.benchmark(group="compiled_step")
@pytest.mark.parametrize("variant", list(COMPILED_VARIANTS))
def test_compiled_step(benchmark, bench_device, sync, device_ceilings, variant):
    """SIM's step (device batch) eager vs `--compile` (engine.compile.compile_regions: the blocks,
    heads and norms compiled, the kernels opaque ops), reference vs fused kernels, and the CUDA-graph
    variant (`--compile reduce-overhead`). extra_info adds `compile_mode`, `cold_step_s` (the first
    step, which compiles; eager: its first step) and `graphs` (distinct graphs compiled)."""
    from engine.compile import CompiledRegions, compile_regions

    kernel_variant, mode = COMPILED_VARIANTS[variant]
    if kernel_variant == "fused" and not CUDA:
        pytest.skip("the Triton kernels run compiled only on a CUDA device (under the CPU "
                    "interpreter a step would time the interpreter)")
    if mode == "reduce-overhead" and not CUDA:
        pytest.skip("CUDA graphs need a CUDA device")
    cfg = step_config()
    session, kernels = bench_session(cfg, bench_device, kernel_variant)
    graphs_before = CompiledRegions.graphs()
    regions = compile_regions(session.method, mode) if mode else None
    batch, data_info = device_batch(cfg, bench_device)
    run = device_batch_step(session, batch, 0.996, sync,
                            cuda_graphs=mode == "reduce-overhead")
    started = time.perf_counter()
    run()                                                # compiles (or the eager first step)
    cold = time.perf_counter() - started
    disabled = getattr(benchmark, "disabled", False)
    timer = StageTimer(bench_device)
    for _ in range(0 if disabled else WARMUP):
        run()
    loss = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    for _ in range(1 if disabled else STAGE_ROUNDS):
        run(timer)
    assert torch.isfinite(loss).item()
    record_step(benchmark, cfg, session, kernels, timer, device_ceilings, variant=variant,
                feed="device_batch", compile_mode=mode or "eager", cold_step_s=cold,
                graphs=CompiledRegions.graphs() - graphs_before,
                compiled_regions=regions.describe() if regions else None, **data_info)
