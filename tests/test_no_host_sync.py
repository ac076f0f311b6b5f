"""No host sync in the training step (issue 10, point 2).

A whole `optimisation_step` of every method -- EMA, target forward, masks and geometry, online
forward, loss, backward, queue update, clip and optimiser step, two micro-batches -- with the
PyTorch reference kernels and with the Triton kernels (the interpreter on a CPU, the compiled
kernels on CUDA), must not read a device value on the host:

  * on any machine, `tests/host_sync.py` counts every Python-level read of a tensor value and
    every op whose output shape depends on values (item/bool/float/int/tolist/numpy, nonzero,
    unique, masked_select, boolean-mask indexing, repeat_interleave without output_size), also
    inside the Python bodies of the `densesim::` ops; the count must be zero. Value checks that
    remain run on the device (torch._assert_async), which is not a read;
  * on CUDA, the same steps run under `torch.cuda.set_sync_debug_mode("error")`, which raises on
    any synchronising CUDA call (this part skips on a CPU machine).
The first step of each session runs outside the count (lazy initialisation: optimiser state,
queues), as would a training run's first step.
"""
from __future__ import annotations

import os

import pytest
import torch

from engine.fused import FUSED_OPS
from engine.methods import build_method
from engine.loaders import build_augment
from engine.presets import PretrainConfig, preset_config
from engine.trainer import StepSession, make_optimizer, optimisation_step
from pipelines.augment import augment_recipe
from pipelines.datasets import sample_photos
from pipelines.torch_loader import TwoViewLoader

from host_sync import count_host_syncs

SMALL = {
    "sim": {},
    "mocov2": dict(queue_length=32, hidden=32, dim=16),
    "densecl": dict(queue_length=32, hidden=32, dim=16),
    "pixpro": dict(hidden=32, dim=16),
    "densesiam": dict(global_dim=32, global_pred_hidden=8, dense_hidden=32, dense_dim=16,
                      dense_pred_hidden=8, regions=4),
    "lcloss": dict(hidden=32, dim=16, dense_hidden=32, dense_dim=16),
    "swav": dict(prototypes=16, hidden=32, dim=16, queue_length=16, queue_start_step=0,
                 freeze_prototypes_steps=0),
    "regioncl": dict(queue_length=32, hidden=32, dim=16),
    "detco": dict(queue_length=32, hidden=32, dim=16),
    "scfs": dict(dim=64, hidden=32, bottleneck=16, layer_dim=16, layer_hidden=24,
                 layer_bottleneck=8),
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny(method: str, backbone: str) -> PretrainConfig:
    values = preset_config("sim-demo-cpu" if method == "sim"
                           else f"{method}-demo-cpu").to_dict()
    values.update(img_size=32, batch_size=4, accum=2, precision="fp32",
                  method_args=SMALL[method], preset="test-no-sync")
    if backbone == "vit":
        values.update(backbone="vit", patch_size=8, dim=32, depth=1, heads=2, decoder_dim=32,
                      decoder_heads=2, projector_depth=1, predictor_depth=1)
    return PretrainConfig.from_dict(values).validate()


def session(cfg: PretrainConfig, backend: str) -> StepSession:
    torch.manual_seed(0)
    model = build_method(cfg).to(DEVICE).train()
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    return StepSession(cfg, model, model, optimizer,
                       torch.amp.GradScaler(DEVICE.type, enabled=False), DEVICE, None,
                       {op: backend for op in FUSED_OPS})


def step_batches(cfg: PretrainConfig, count: int) -> list[dict]:
    recipe = "sim" if cfg.method == "sim" else "mocov2"
    augment = augment_recipe(recipe, cfg.img_size, blur=False)
    views = build_method(cfg).views
    if views.crops:                     # multi-crop (SwAV), as the trainer's loader makes them
        augment = build_augment(cfg, views)
    loader = TwoViewLoader(sample_photos(), augment,
                           batch_size=cfg.batch_size, workers=0, seed=2)
    batches = list(loader.epoch_batches(0))[:count]
    if DEVICE.type == "cuda":  # as the device-resident loader gives them: everything on the GPU
        batches = [{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                   for b in batches]
    return batches


def triton_runs_here() -> bool:
    return DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


CASES = [(m, "vit") for m in SMALL] + [(m, "resnet18") for m in SMALL if m != "sim"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method,backbone", CASES)
def test_optimisation_step_reads_no_device_value(method, backbone, backend):
    if backend == "triton" and not triton_runs_here():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    cfg = tiny(method, backbone)
    s = session(cfg, backend)
    batches = step_batches(cfg, 2 * cfg.accum)
    optimisation_step(s, batches[:cfg.accum], 0, 0.99)          # lazy state made here
    with count_host_syncs() as syncs:
        loss, grad_norm, figures = optimisation_step(s, batches[cfg.accum:], 1, 0.99)
    assert not syncs, syncs.report()
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method,backbone", CASES)
def test_optimisation_step_makes_no_synchronising_cuda_call(method, backbone, backend):
    cfg = tiny(method, backbone)
    s = session(cfg, backend)
    batches = step_batches(cfg, 2 * cfg.accum)
    optimisation_step(s, batches[:cfg.accum], 0, 0.99)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimisation_step(s, batches[cfg.accum:], 1, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_the_counter_sees_reads_inside_registered_ops():
    """The harness itself: a read inside a custom op's Python body, a boolean-mask index and an
    `if tensor:` are counted; torch._assert_async is not."""
    @torch.library.custom_op("densesim_test::reads", mutates_args=())
    def reads(x: torch.Tensor) -> torch.Tensor:
        if bool((x > 0).any()):
            return x * 2
        return x.clone()

    x = torch.randn(5)
    with count_host_syncs() as syncs:
        reads(x)
        x[x > 0]
        torch._assert_async((x == x).all())
    assert sum(syncs.values()) == 2, syncs.report()
    with count_host_syncs() as none:
        torch._assert_async(torch.tensor(True))
    assert not none
