"""The official UP-DETR and DETReg training steps beside ours, on one GPU in one call: issue 13's bar
"each method >= 3x the images/s of its official code run side by side on the same GPU in the same
call". Published anchors: UP-DETR ~22 img/s per V100 (README: an ImageNet epoch in ~2 h on 8
V100), DETReg ~6 img/s per V100.

    python -m bench.official_detr --json OUT.json [--smoke] [--methods updetr,detreg]
                                  [--ours fused] [--steps 8] [--warmup 2] [--budget 150]
                                  [--updetr PATH] [--detreg PATH] [--no-build] [--build-dir DIR]

The official code (dddzg/up-detr @ 44c0c6eb and amirbar/DETReg @ a4b63635, both Apache-2.0) is not
part of this repository and is never committed: `bash bench/carry_official_detr.sh` copies the files
the training step needs into the ignored folders `.official/up-detr` and `.official/DETReg` (from git
mirrors of the public repositories, with a PROVENANCE file), a GPU call brings them with
`carry=[".official"]`, and `DENSESIM_OFFICIAL_UPDETR` / `DENSESIM_OFFICIAL_DETREG` (or --updetr /
--detreg) name them elsewhere. A missing folder is recorded in the JSON's `failures` (with the
command that makes it) and the rest still runs.

Every measured part runs in a process of its own (`--worker METHOD:VARIANT`, spawned by this
script): the two official code bases both have top-level packages `models` and `util` (and an
`engine.py` where ours is the `engine` package), a CUDA error or an OOM poisons only its own
process, and each part's peak memory is its own. The parts, in order: UP-DETR official, UP-DETR
ours, DETReg ours, DETReg official (last, so that the MSDeformAttn build, started in the background
at the beginning, has the most time). Each part gets a share of --budget (wall seconds for the
whole call) and fits its timed steps into it after the warm-up (at least 2); a part that fails,
times out or cannot start (import error, build failure, OOM) is recorded with its error and the
next one runs. The JSON is rewritten after every part, so a call cut short keeps what it measured;
each part's output is in `<json stem>.<method>-<variant>.log` beside it.

The inputs (`make_batch`, identical on both sides, fixed seed, generated on the CPU): images
N(0, 1) at the recipe size (square, no padding: the padding mask is all False) and per image
random boxes drawn as UP-DETR's `get_random_patch_from_img` draws its patches (integer sides
w, h ~ U{8 .. S-8}, corner x ~ U{0 .. S-w-1}); UP-DETR: 10 boxes, DETReg: 30 (its top-30
selective-search proposals, here random boxes of the same count). The official side also gets
what its data loader would have made (not timed, as in its training): each box cut from the
image and resized to 128 x 128 (bilinear, antialiased; the release: PIL crop + resize + a SimCLR
colour jitter per patch), the targets in its format (cxcywh / S, label 1, orig_size, size, area,
iscrowd). Ours gets the same images and boxes as a loader batch ('view1'; DETReg: 'proposals'
with every box fully visible) and cuts the patches itself on the device, inside its timed step
(RoIAlign): the official side is spared that work. UP-DETR's patch boxes reach our method through
its `draws` (replaced in this process to return the shared boxes; the query dropout is drawn as
usual).

Sizes ("recipe"): UP-DETR at its per-GPU batch of 32 (README: 8 x 32) on 448 px squares (our
updetr-r50 preset's views), num_queries 100, num_patches 10, pre-norm, feature reconstruction,
frozen ResNet-50, hidden 256, 6 + 6 layers; DETReg at its per-GPU batch of 24 (README: 8 x 24) on
448 px, Deformable DETR with 300 queries, 4 levels, object embedding loss, top-30 targets, frozen
backbone (--lr_backbone 0). "smoke" (--smoke; the CPU default): a 64 px batch of 2 on small
transformers (UP-DETR on a ResNet-18; DETReg's official code only runs on a ResNet-50 at hidden 256:
its channel lists are hard-coded), for a quick check of the harness.

What is timed, the official side: its own `engine.train_one_epoch` (the function is read from its
engine.py; the file's evaluation imports -- pycocotools, panopticapi, matplotlib -- are not run)
over batches already on the device, with the model, criterion and optimiser built as its main.py
builds them: arguments from its own parser (UP-DETR: main.get_args_parser read from the file, on
the README's pre-training flags, then main()'s `dataset_file='ImageNet'`, `masks=None`,
`lr_backbone = 0` (--fre_cnn); DETReg: util/default_args.get_args_parser + set_model_defaults on
configs/DETReg_top30_in.sh's flags and the README's --batch_size 24), `models.build_model(args)`
(DETReg: after `build_swav_backbone_old`, its frozen SwAV ResNet-50 that embeds the crops, as
main.py orders them), AdamW over main.py's parameter groups (DETReg: lr x 0.1 on
sampling_offsets / reference_points), clip 0.1, fp32 (neither release uses autocast), seeds as
main.py (42). One step is the time between two consecutive batch fetches of its loop -- forward,
the SwAV crop embeddings (DETReg), the criterion with its Hungarian matching (the cost matrix is
copied to the host and solved by scipy's linear_sum_assignment, once per image per decoder layer:
counted and timed), `loss.item()`, backward, clip, AdamW, the metric logging -- with a device
synchronisation before each fetch (so each step's work is inside its own time; ours is synchronised
at the end of each step the same way). No DDP (the releases run DistributedDataParallel on 8 GPUs;
on one GPU without it the official step is at its fastest).

Ours: one `engine.trainer.optimisation_step` of the updetr-r50 / detreg-r50 preset (accum 1) built
as bench/test_train_step.py builds its sessions (`bench_session`: AdamW, lr 1e-4, the precision of
the preset -- bf16 autocast on CUDA), variants `fused` (`--fused`: the Triton kernels
`engine.fused.choose_kernels(True)` picks -- roi_align, linear_sum_assignment on the device,
ms_deform_attn), `reference` (`--no-fused`) and `fused_fp32` (fused in fp32, the official
precision). Default: fused on CUDA, reference on a CPU.

DETReg's MSDeformAttn CUDA extension: built with nvcc in the background (`--build-ext DIR`, a
process of its own) from the carried sources, copied into DIR (default: a new temp folder) so that
.official/ stays untouched: `torch.utils.cpp_extension.load` (ninja; else their setup.py
`build_ext --inplace` in DIR/ops), with setup.py's flags, for the GPU's own architecture
(TORCH_CUDA_ARCH_LIST, unless set). Build compatibility patches (each applied only when the
installed torch headers need it, each listed in the result): `#include <THC/THCAtomics.cuh>` ->
`<ATen/cuda/Atomic.cuh>` (THC is gone from torch), `AT_DISPATCH_FLOATING_TYPES(value.type(), ...)`
-> `value.scalar_type()` (the DeprecatedTypeProperties overload is gone); the kernels are unchanged.
Checked on the dev machine (no GPU): build_extension with CUDA pretended ran cpp_extension.load's
ninja build to its end -- both patches applied, the three sources compiled (nvcc 13.0, sm_90,
torch 2.13 headers) -- and stopped only at the link (no libtorch_cuda in a CPU torch); unpatched,
the .cu fails on both points. The result records the build time, the patches and the error of a
failed build. The official DETReg step then uses the extension (after
a forward check against the official `ms_deform_attn_core_pytorch` on a small case), or -- if the
build failed or did not finish in time -- the official pure-PyTorch `ms_deform_attn_core_pytorch`
(a SHIM, said in the result's `ms_deform_attn` and `shims`; slower than the extension, so the ratio
of that run flatters us).

Compatibility shims (the 2021 code on today's stack; each one applied is listed in the result,
nothing else in the official code is changed):
  * no SwAV download: `torch.hub.load_state_dict_from_url` returns {} while the official models
    are built (the GPU machine reaches no network; both backbones load with strict=False, so they
    keep their random initialisation, as ours does without a backbone_checkpoint: the step's cost
    does not depend on the weights);
  * torchvision: `pretrained=` mapped to `weights=None` and `torchvision._is_tracing` added, each
    only where the installed torchvision lacks it (0.26 still has both);
  * CPU only (the smoke run): DETReg's data_prefetcher without its CUDA side stream (prefetch=False).
  * the matcher's `linear_sum_assignment` is wrapped to count its calls and time (it observes only).

Checked on the dev machine with a CPU torchvision (not installed there normally): the whole
comparison at the smoke size (both official steps and ours, `DENSESIM_OFFICIAL_CPU=1 pytest
bench/test_official_detr.py`), and one step of each side at the recipe's model sizes (batch 2 / 1):
the official and our models have the same number of trainable parameters (UP-DETR 19,164,167,
DETReg 16,812,129) and losses of the same size. Never run on a GPU so far.

Results: pytest-benchmark's JSON shape (area and group `official_detr`; `bench.report` adds a
"vs official" column, the official step's median / ours at the same batch), a `bar` text (ours /
official images/s per method, against 3x), `failures` (part -> error), `extension` (the build),
`anchors`, and per part: images/s, step ms, peak memory, precision, backends, parameters
(trainable and total), the loss, the inputs' checksum (the same on both sides), and for the
official side its shims, provenance, arguments and matcher figures (scipy calls and seconds per
step, on the host).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import importlib.util
import io
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
METHODS = ("updetr", "detreg")
OURS_VARIANTS = ("fused", "reference", "fused_fp32")
PATH_ENV = {"updetr": "DENSESIM_OFFICIAL_UPDETR", "detreg": "DENSESIM_OFFICIAL_DETREG"}
DEFAULT_PATH = {"updetr": REPO / ".official" / "up-detr", "detreg": REPO / ".official" / "DETReg"}
MARKER = {"updetr": "models/updetr.py", "detreg": "models/deformable_detr.py"}
NAMES = {"updetr": "UP-DETR", "detreg": "DETReg"}
PRESETS = {"updetr": "updetr-r50", "detreg": "detreg-r50"}
GOAL = 3.0
ANCHORS = {"updetr": "UP-DETR ~22 img/s per V100 (README: an ImageNet epoch in ~2 h on 8 V100)",
           "detreg": "DETReg ~6 img/s per V100"}
# The README's pre-training command (paths left out); main() then sets dataset_file, masks and
# lr_backbone (see updetr_args).
UPDETR_FLAGS = ["--lr_drop", "40", "--epochs", "60", "--pre_norm", "--num_patches", "10",
                "--batch_size", "32", "--feature_recon", "--fre_cnn"]
# configs/DETReg_top30_in.sh and the README's launch (--batch_size 24 --num_workers 8).
DETREG_FLAGS = ["--dataset", "imagenet", "--strategy", "topk", "--load_backbone", "swav",
                "--max_prop", "30", "--object_embedding_loss", "--lr_backbone", "0",
                "--epochs", "5", "--batch_size", "24", "--num_workers", "8"]
# setup.py's nvcc flags
NVCC_FLAGS = ["-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
MIN_PIXEL = 8          # selfdet.get_random_patch_from_img's min_pixel
# Shares of the budget: our first part also compiles the Triton kernels (choose_kernels' probes
# and the recipe-size kernels; the second finds them in Triton's cache), DETReg's official step is
# the slowest.
PART_WEIGHT = {"updetr:official": 1.0, "updetr:ours": 1.4, "detreg:ours": 1.0,
               "detreg:official": 1.4}
MIN_PART_SECONDS = 20
GRACE = 10


@dataclass(frozen=True)
class Size:
    """The model and batch both sides of one method run at."""
    img: int
    batch: int
    backbone: str
    hidden: int
    nheads: int
    enc_layers: int
    dec_layers: int
    ffn: int
    queries: int
    boxes: int             # UP-DETR: num_patches; DETReg: targets (proposals) per image
    patch_px: int          # the query patches / proposal crops are resized to this side
    levels: int = 1        # DETReg: feature levels


SIZES = {
    ("updetr", "recipe"): Size(img=448, batch=32, backbone="resnet50", hidden=256, nheads=8,
                               enc_layers=6, dec_layers=6, ffn=2048, queries=100, boxes=10,
                               patch_px=128),
    ("detreg", "recipe"): Size(img=448, batch=24, backbone="resnet50", hidden=256, nheads=8,
                               enc_layers=6, dec_layers=6, ffn=1024, queries=300, boxes=30,
                               patch_px=128, levels=4),
    # num_queries = num_patches² as in the release: UPDETR.__init__ opens the attention mask's
    # diagonal blocks in a loop over query_per_patch (not num_patches), so only then is every
    # group's block open (else whole rows stay -inf and the softmax gives NaN)
    ("updetr", "smoke"): Size(img=64, batch=2, backbone="resnet18", hidden=64, nheads=4,
                              enc_layers=2, dec_layers=2, ffn=128, queries=16, boxes=4,
                              patch_px=32),
    # the official DETReg needs a ResNet-50 (hard-coded channels) and hidden 256 (its object
    # embedding head outputs 2 x hidden = ResNet-50's 512 C3 channels)
    ("detreg", "smoke"): Size(img=64, batch=2, backbone="resnet50", hidden=256, nheads=8,
                              enc_layers=1, dec_layers=1, ffn=256, queries=30, boxes=5,
                              patch_px=32, levels=4),
}


# ------------------------------------------------------------------------------ paths
def official_path(method: str, path: str | os.PathLike | None = None) -> Path | None:
    """The official checkout of `method` (the argument, else $DENSESIM_OFFICIAL_<NAME>, else
    .official/<name>), or None where it holds no model file."""
    path = Path(path or os.environ.get(PATH_ENV[method]) or DEFAULT_PATH[method])
    if not path.is_absolute():
        path = REPO / path
    return path if (path / MARKER[method]).is_file() else None


def missing_reason(method: str, path: str | None = None) -> str:
    where = path or os.environ.get(PATH_ENV[method]) or DEFAULT_PATH[method]
    return (f"no official {NAMES[method]} checkout at {where} (no {MARKER[method]}): run "
            f"bash bench/carry_official_detr.sh and carry .official (run(..., carry=[\".official\"]))")


def provenance(path: Path) -> dict:
    info = {}
    file = path / "PROVENANCE"
    if file.is_file():
        for line in file.read_text().splitlines():
            key, _, value = line.partition(" ")
            info[key] = value
    return info


def torchvision_problem() -> str | None:
    """None where torchvision imports (the official code needs it), else why not."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:   # noqa: BLE001 - any failure means the official code cannot load
        return f"torchvision is not importable ({type(exc).__name__}: {exc}); the official code needs it"
    return None


# ------------------------------------------------------------------------------ the inputs
def random_boxes(batch: int, count: int, size: int, generator: torch.Generator,
                 min_pixel: int = MIN_PIXEL) -> torch.Tensor:
    """(batch, count, 4) float32 x1 y1 x2 y2 in pixel edges, integers, as UP-DETR's
    get_random_patch_from_img: w, h ~ U{min_pixel .. size - min_pixel}, x ~ U{0 .. size - w - 1},
    y ~ U{0 .. size - h - 1}."""
    sides = torch.randint(min_pixel, size - min_pixel + 1, (batch, count, 2), generator=generator)
    uniform = torch.rand((batch, count, 2), generator=generator)
    corner = torch.minimum(torch.floor(uniform * (size - sides)), (size - sides - 1).float())
    return torch.cat([corner, corner + sides], dim=-1).float()


def make_batch(method: str, size: Size, seed: int = 0) -> dict:
    """The shared inputs, on the CPU, the same in every process: images N(0, 1) (B, 3, S, S) and
    random boxes (B, P, 4) x1 y1 x2 y2 pixel edges."""
    generator = torch.Generator().manual_seed(seed + (0 if method == "updetr" else 1))
    images = torch.randn(size.batch, 3, size.img, size.img, generator=generator)
    boxes = random_boxes(size.batch, size.boxes, size.img, generator)
    return {"method": method, "images": images, "boxes": boxes, "img": size.img}


def checksum(batch: dict) -> dict:
    return {"images_sum": float(batch["images"].double().sum()),
            "boxes_sum": float(batch["boxes"].double().sum()),
            "shape": list(batch["images"].shape), "boxes_shape": list(batch["boxes"].shape)}


def cxcywh_normalised(boxes: torch.Tensor, size: int) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) / size


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """(B, P, 3, side, side): each box cut from its image and resized (bilinear, antialiased) --
    what the official loaders make on the CPU with PIL (crop, Resize((128, 128)))."""
    batch, count = boxes.shape[:2]
    out = images.new_empty(batch, count, images.shape[1], side, side)
    corners = boxes.detach().cpu().long().tolist()
    for b in range(batch):
        for p, (x1, y1, x2, y2) in enumerate(corners[b]):
            crop = images[b:b + 1, :, y1:y2, x1:x2]
            out[b, p] = F.interpolate(crop, size=(side, side), mode="bilinear",
                                      align_corners=False, antialias=True)[0]
    return out


def official_inputs(batch: dict, size: Size, device: torch.device) -> dict:
    """The official loader's output for the shared batch, on `device`: images, an all-False
    padding mask, the patches / crops (B, P, 3, px, px) and the per-image target dicts (UP-DETR:
    boxes, labels, orig_size, size, area, iscrowd; DETReg: the same with the crops as 'patches')."""
    images = batch["images"].to(device)
    boxes = batch["boxes"].to(device)
    side = batch["img"]
    patches = crop_resize(images, boxes, size.patch_px)
    normalised = cxcywh_normalised(boxes, side)
    count = boxes.shape[1]
    targets = []
    for b in range(images.shape[0]):
        target = {"boxes": normalised[b].contiguous(),
                  "labels": torch.ones(count, dtype=torch.int64, device=device),
                  "orig_size": torch.tensor([side, side], device=device),
                  "size": torch.tensor([side, side], device=device),
                  "area": (boxes[b, :, 2] - boxes[b, :, 0]) * (boxes[b, :, 3] - boxes[b, :, 1]),
                  "iscrowd": torch.zeros(count, dtype=torch.int64, device=device)}
        if batch["method"] == "detreg":
            target["patches"] = patches[b].contiguous()
            target["iscrowd"] = target["iscrowd"].float()
        targets.append(target)
    mask = torch.zeros(images.shape[0], side, side, dtype=torch.bool, device=device)
    return {"images": images, "mask": mask, "patches": patches, "targets": targets}


def our_inputs(batch: dict, device: torch.device) -> tuple[dict, torch.Tensor]:
    """(our loader-style batch on `device`, the boxes on `device`): 'view1' the images; DETReg
    also 'proposals' (B, 2, P, 4) and 'proposal_visible' (B, 2, P) = 1 (every box fully inside
    view 1; view 2's copy is unused)."""
    images, boxes = batch["images"].to(device), batch["boxes"].to(device)
    out = {"view1": images}
    if batch["method"] == "detreg":
        count = boxes.shape[1]
        out["proposals"] = boxes[:, None].expand(-1, 2, count, 4).contiguous()
        out["proposal_visible"] = torch.ones(images.shape[0], 2, count, device=device)
    return out, boxes


# ------------------------------------------------------------------------------ timing
class TimedBatches:
    """The official data loader: `steps` fresh batches from `make()`, stamping the clock (after a
    device synchronisation) each time the engine's loop fetches the next one, and once more when
    it finds the loader exhausted; stamps[k + 1] - stamps[k] is one whole step of the loop."""

    def __init__(self, make, steps: int, sync=lambda: None):
        self.make, self.steps, self.sync, self.stamps = make, steps, sync, []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            self.sync()
            self.stamps.append(time.perf_counter())
            yield self.make()
        self.sync()
        self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def fit_steps(wanted: int, per_step: float, deadline: float | None, margin: float = 3.0,
              least: int = 2) -> int:
    """How many timed steps fit before `deadline` (time.time()) at `per_step` seconds each: at
    most `wanted`, at least `least`."""
    if deadline is None or per_step <= 0:
        return wanted
    room = deadline - time.time() - margin
    return max(least, min(wanted, int(room / per_step)))


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timing(seconds: list[float], batch: int) -> dict:
    median = statistics.median(seconds)
    return {"seconds": seconds, "median": median, "img_per_s": batch / median,
            "step_ms": 1e3 * median, "batch": batch}


# ------------------------------------------------------------------------------ official: shims
def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def apply_shims(device: torch.device) -> list[str]:
    """What the 2021 code needs on today's stack (see the module docstring); returns what it did."""
    import torchvision

    applied = []
    if not hasattr(torchvision, "_is_tracing"):
        torchvision._is_tracing = lambda: torch._C._get_tracing_state() is not None
        applied.append("torchvision._is_tracing (added)")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torchvision.models.resnet18(pretrained=False)
    except TypeError:
        for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
            builder = getattr(torchvision.models, name)

            def legacy(*args, _builder=builder, pretrained=False, **kwargs):
                if pretrained:
                    raise RuntimeError("pretrained weights need a download")
                return _builder(*args, weights=None, **kwargs)

            setattr(torchvision.models, name, legacy)
        applied.append("torchvision.models.resnet*(pretrained=False) -> weights=None")
    if device.type != "cuda":
        applied.append("CPU: DETReg's data_prefetcher without its CUDA side stream (prefetch=False)")
    return applied


@contextlib.contextmanager
def no_download(shims: list[str]):
    """torch.hub.load_state_dict_from_url returns {} (the SwAV checkpoint; no network there)."""
    real = torch.hub.load_state_dict_from_url
    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        return {}

    torch.hub.load_state_dict_from_url = offline
    try:
        yield asked
    finally:
        torch.hub.load_state_dict_from_url = real
        if asked:
            shims.append(f"no download: torch.hub.load_state_dict_from_url returned {{}} for "
                         f"{sorted(set(asked))} ({len(asked)} call(s)): random initial weights, "
                         f"as ours without a backbone_checkpoint")


class ScipyCounter:
    """Wraps the matcher module's `linear_sum_assignment` (scipy's, on the host): counts calls and
    their seconds; changes nothing else."""

    def __init__(self, module):
        self.module, self.real = module, module.linear_sum_assignment
        self.calls, self.seconds = 0, 0.0
        module.linear_sum_assignment = self

    def __call__(self, cost):
        started = time.perf_counter()
        try:
            return self.real(cost)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def restore(self) -> None:
        self.module.linear_sum_assignment = self.real


class PyTorchMSDeformAttnFunction:
    """SHIM (only when the CUDA extension is not available): MSDeformAttnFunction.apply computed by
    the official `ms_deform_attn_core_pytorch` (same file, the release's reference path)."""
    core = None            # set to that function (a plain function: not bound through the class)

    @classmethod
    def apply(cls, value, value_spatial_shapes, value_level_start_index, sampling_locations,
              attention_weights, im2col_step):
        return cls.core(value, value_spatial_shapes, sampling_locations, attention_weights)


def function_from_file(file: Path, name: str, namespace: dict):
    """The top-level function `name` of `file`, compiled alone (its module's imports are not run)
    in `namespace`."""
    tree = ast.parse(file.read_text())
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise RuntimeError(f"{file} has no function {name}")
    scope = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(file), "exec"), scope)  # noqa: S102
    return scope[name]


def module_from_file(name: str, file: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_official(path: Path, names: list[str]) -> dict:
    """Import `names` from the checkout at `path` (first on sys.path), checking that each comes
    from there (no other 'models' / 'util' shadows it)."""
    for top in ("models", "util", "datasets"):
        clash = sys.modules.get(top)
        where = getattr(clash, "__file__", None) or "/"
        if clash is not None and path.resolve() not in Path(where).resolve().parents:
            raise RuntimeError(f"a module named {top!r} is already imported ({clash}): the official "
                               f"code's package would clash with it")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    modules = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            module = importlib.import_module(name)
            where = Path(module.__file__).resolve()
            if path.resolve() not in where.parents:
                raise RuntimeError(f"{name!r} was imported from {where}, not from the official "
                                   f"checkout {path}")
            modules[name] = module
    return modules


def parser_from_file(file: Path) -> argparse.ArgumentParser:
    """`get_args_parser()` of `file`, read from the file (UP-DETR's main.py imports its datasets)."""
    return function_from_file(file, "get_args_parser", {"argparse": argparse})()


def updetr_args(path: Path, size: Size, device: torch.device) -> argparse.Namespace:
    """main.py's parser on the README's pre-training flags, then what main() sets, then the size."""
    args = parser_from_file(path / "main.py").parse_args(UPDETR_FLAGS)
    args.dataset_file, args.masks = "ImageNet", None            # main()
    args.lr_backbone = 0 if args.fre_cnn else args.lr           # main(): --fre_cnn
    args.distributed, args.device = False, str(device)
    args.batch_size, args.backbone = size.batch, size.backbone
    args.hidden_dim, args.nheads, args.dim_feedforward = size.hidden, size.nheads, size.ffn
    args.enc_layers, args.dec_layers = size.enc_layers, size.dec_layers
    args.num_queries, args.num_patches = size.queries, size.boxes
    return args


def detreg_args(path: Path, size: Size, device: torch.device) -> argparse.Namespace:
    """util/default_args.py's parser (as main.py wraps it) on DETReg_top30_in.sh's flags and the
    README's batch, set_model_defaults, then the size."""
    defaults = module_from_file("detreg_default_args", path / "util" / "default_args.py")
    parser = argparse.ArgumentParser("Deformable DETR training and evaluation script",
                                     parents=[defaults.get_args_parser()])
    args = defaults.set_model_defaults(parser.parse_args(DETREG_FLAGS))
    args.distributed, args.device = False, str(device)
    args.batch_size, args.backbone = size.batch, size.backbone
    args.hidden_dim, args.nheads, args.dim_feedforward = size.hidden, size.nheads, size.ffn
    args.enc_layers, args.dec_layers = size.enc_layers, size.dec_layers
    args.num_queries, args.max_prop = size.queries, size.boxes
    args.num_feature_levels = size.levels
    return args


def _scalar_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in sorted(vars(args).items())
            if isinstance(v, (int, float, str, bool)) or v is None}


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _run_engine(train_one_epoch, make, warmup: int, steps: int, deadline: float | None,
                device: torch.device, counter: ScipyCounter) -> dict:
    """Two 'epochs' of the official loop: `warmup` untimed steps, then as many of `steps` as fit
    before `deadline`; returns the timed steps' seconds, the engine's stats and log, and the
    matcher figures per timed step."""
    sync, log = _sync(device), io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # at least one: the engines divide by the loader's length
        first = TimedBatches(make, max(1, warmup), sync)
        started = time.perf_counter()
        train_one_epoch(first, 0)
        warm_seconds = first.step_seconds()
        per_step = warm_seconds[-1] if warm_seconds else time.perf_counter() - started
        timed_steps = fit_steps(steps, per_step, deadline)
        counter.reset()
        data = TimedBatches(make, timed_steps, sync)
        stats = train_one_epoch(data, 1)
    seconds = data.step_seconds()
    return {"seconds": seconds, "stats": stats or {}, "warmup_seconds": warm_seconds,
            "steps_asked": steps, "log_tail": log.getvalue().strip().splitlines()[-3:],
            "matcher": {"where": "scipy.optimize.linear_sum_assignment on the host (the cost "
                                 "matrix copied to the CPU: a device sync per matcher call)",
                        "scipy_calls_per_step": counter.calls / len(seconds),
                        "scipy_seconds_per_step": counter.seconds / len(seconds),
                        "scipy_fraction_of_step": counter.seconds / sum(seconds)}}


def _official_result(method: str, size_name: str, size: Size, run: dict, model, device,
                     shims: list[str], path: Path, args, batch: dict, **extra) -> dict:
    stats = run["stats"]
    return {**_timing(run["seconds"], size.batch), "method": method, "variant": "official",
            "implementation": "official", "size": size_name, "precision": "fp32",
            "wrapper": "none (the model on one device; the release uses DDP on 8 GPUs)",
            "loss": stats.get("loss"), "warmup_seconds": run["warmup_seconds"],
            "steps_asked": run["steps_asked"], "matcher": run["matcher"],
            "params": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_memory_gib": _peak_gib(device), "shims": shims,
            "official": provenance(path), "args": _scalar_args(args), "inputs": checksum(batch),
            "engine_log_tail": run["log_tail"],
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn": torch.backends.cudnn.allow_tf32}, **extra}


def run_official_updetr(path: Path, size_name: str, device: torch.device, warmup: int,
                        steps: int, deadline: float | None) -> dict:
    size = SIZES[("updetr", size_name)]
    shims = apply_shims(device)
    mods = import_official(path, ["util.misc", "models", "models.matcher"])
    misc, models = mods["util.misc"], mods["models"]
    args = updetr_args(path, size, device)
    _seed(args.seed)                                             # main(): seed + rank 0
    with no_download(shims), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, criterion, _ = models.build_model(args)
    model.to(device)
    param_dicts = [                                               # main.py
        {"params": [p for n, p in model.named_parameters()
                    if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters()
                    if "backbone" in n and p.requires_grad], "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    engine_fn = function_from_file(path / "engine.py", "train_one_epoch",
                                   {"math": math, "sys": sys, "torch": torch, "utils": misc,
                                    "Iterable": Iterable})
    batch = make_batch("updetr", size)
    inputs = official_inputs(batch, size, device)
    samples = misc.NestedTensor(inputs["images"], inputs["mask"])

    def make():
        return samples, inputs["patches"], [dict(t) for t in inputs["targets"]]

    counter = ScipyCounter(mods["models.matcher"])
    _reset_peak(device)
    run = _run_engine(lambda data, epoch: engine_fn(model, criterion, data, optimizer, device,
                                                    epoch, args.clip_max_norm),
                      make, warmup, steps, deadline, device, counter)
    counter.restore()
    return _official_result("updetr", size_name, size, run, model, device, shims, path, args,
                            batch, criterion_losses=list(criterion.losses))


def load_msda(path: Path, ext: dict | None, device: torch.device, shims: list[str]) -> dict:
    """Make `import MultiScaleDeformableAttention` work before the official modules load: the
    extension built by --build-ext where it is there, else a stub (the PyTorch path is patched in
    after the import, see use_msda)."""
    info = {"backend": None, "build": ext}
    if device.type == "cuda" and ext and ext.get("ok") and ext.get("so"):
        try:
            module = module_from_file("MultiScaleDeformableAttention", Path(ext["so"]))
            sys.modules["MultiScaleDeformableAttention"] = module
            info["backend"] = "cuda_extension"
            return info
        except Exception as exc:   # noqa: BLE001 - fall back, say why
            info["load_error"] = f"{type(exc).__name__}: {exc}"
    reason = ("no CUDA device" if device.type != "cuda" else
              info.get("load_error") or (ext or {}).get("error") or
              "the extension was not built (--no-build, or the build did not finish in time)")
    sys.modules["MultiScaleDeformableAttention"] = _module(
        "MultiScaleDeformableAttention", __doc__="stub: the CUDA extension is not available")
    info["backend"] = "pytorch_fallback"
    info["fallback_reason"] = reason
    shims.append(f"ms_deform_attn: the official pure-PyTorch ms_deform_attn_core_pytorch (the CUDA "
                 f"extension is not available: {reason})")
    return info


def use_msda(info: dict, mods: dict, device: torch.device, shims: list[str]) -> None:
    """After the import: patch in the PyTorch path, or check the extension against it once."""
    func = mods["models.ops.functions.ms_deform_attn_func"]
    if info["backend"] == "pytorch_fallback":
        PyTorchMSDeformAttnFunction.core = func.ms_deform_attn_core_pytorch
        mods["models.ops.modules.ms_deform_attn"].MSDeformAttnFunction = PyTorchMSDeformAttnFunction
        return
    try:
        _check_extension(info, func, device)
    except Exception as exc:   # noqa: BLE001 - a broken build: the PyTorch path, said so
        info["check_error"] = f"{type(exc).__name__}: {exc}"
        info["backend"] = "pytorch_fallback"
        info["fallback_reason"] = f"the built extension failed its check ({info['check_error']})"
        shims.append(f"ms_deform_attn: the official pure-PyTorch ms_deform_attn_core_pytorch "
                     f"({info['fallback_reason']})")
        PyTorchMSDeformAttnFunction.core = func.ms_deform_attn_core_pytorch
        mods["models.ops.modules.ms_deform_attn"].MSDeformAttnFunction = PyTorchMSDeformAttnFunction


def _check_extension(info: dict, func, device: torch.device) -> None:
    # the extension: forward against the reference path on models/ops/test.py's small case
    generator = torch.Generator().manual_seed(0)
    shapes = torch.as_tensor([(6, 4), (3, 2)], dtype=torch.long, device=device)
    start = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
    n, m, d, lq, lv, p = 1, 2, 2, 2, 2, 2
    s = int(shapes.prod(1).sum())
    value = (torch.rand(n, s, m, d, generator=generator) * 0.01).to(device)
    loc = torch.rand(n, lq, m, lv, p, 2, generator=generator).to(device)
    weights = torch.rand(n, lq, m, lv, p, generator=generator).to(device) + 1e-5
    weights = weights / weights.sum(-1, keepdim=True).sum(-2, keepdim=True)
    ours = func.MSDeformAttnFunction.apply(value.double(), shapes, start, loc.double(),
                                           weights.double(), 2)
    ref = func.ms_deform_attn_core_pytorch(value.double(), shapes, loc.double(), weights.double())
    info["check_max_abs_error"] = error = float((ours - ref).abs().max())
    if not error < 1e-9:                  # float64 on outputs of ~1e-2: a broken build
        raise RuntimeError(f"forward differs from ms_deform_attn_core_pytorch by {error:.3g}")


def run_official_detreg(path: Path, size_name: str, device: torch.device, warmup: int,
                        steps: int, deadline: float | None, ext: dict | None) -> dict:
    size = SIZES[("detreg", size_name)]
    shims = apply_shims(device)
    msda = load_msda(path, ext, device, shims)
    mods = import_official(path, ["util.misc", "models", "models.backbone", "models.def_matcher",
                                  "models.ops.functions.ms_deform_attn_func",
                                  "models.ops.modules.ms_deform_attn"])
    use_msda(msda, mods, device, shims)
    misc, models = mods["util.misc"], mods["models"]
    args = detreg_args(path, size, device)
    _seed(args.seed)                                             # main(): seed + rank 0
    with no_download(shims), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # main(): dataset 'imagenet' with obj_embedding_head 'intermediate'
        swav_model = mods["models.backbone"].build_swav_backbone_old(args, device)
        model, criterion, _ = models.build_model(args)
    model.to(device)

    def match(n, keywords):
        return any(k in n for k in keywords)

    named = list(model.named_parameters())
    param_dicts = [                                               # main.py
        {"params": [p for n, p in named if not match(n, args.lr_backbone_names)
                    and not match(n, args.lr_linear_proj_names) and p.requires_grad],
         "lr": args.lr},
        {"params": [p for n, p in named if match(n, args.lr_backbone_names) and p.requires_grad],
         "lr": args.lr_backbone},
        {"params": [p for n, p in named if match(n, args.lr_linear_proj_names) and p.requires_grad],
         "lr": args.lr * args.lr_linear_proj_mult},
    ]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    prefetcher = module_from_file("detreg_data_prefetcher",
                                  path / "datasets" / "data_prefetcher.py").data_prefetcher
    if device.type != "cuda":
        real_prefetcher = prefetcher

        def prefetcher(loader, device, prefetch=True):   # the CPU shim
            return real_prefetcher(loader, device, prefetch=False)

    engine_fn = function_from_file(path / "engine.py", "train_one_epoch",
                                   {"math": math, "sys": sys, "torch": torch, "utils": misc,
                                    "data_prefetcher": prefetcher, "Iterable": Iterable})
    batch = make_batch("detreg", size)
    inputs = official_inputs(batch, size, device)
    samples = misc.NestedTensor(inputs["images"], inputs["mask"])

    def make():
        return samples, [dict(t) for t in inputs["targets"]]

    counter = ScipyCounter(mods["models.def_matcher"])
    _reset_peak(device)
    run = _run_engine(lambda data, epoch: engine_fn(model, swav_model, criterion, data, optimizer,
                                                    device, epoch, args.clip_max_norm),
                      make, warmup, steps, deadline, device, counter)
    counter.restore()
    return _official_result("detreg", size_name, size, run, model, device, shims, path, args,
                            batch, ms_deform_attn=msda, criterion_losses=list(criterion.losses))


# ------------------------------------------------------------------------------ the extension
def compat_patches(src: Path, torch_include: Path) -> list[str]:
    """Edit the copied MSDeformAttn sources in `src` for the installed torch headers, only where
    they need it; returns what was changed (and why)."""
    applied = []
    cuh = src / "cuda" / "ms_deform_im2col_cuda.cuh"
    text = cuh.read_text()
    if ("#include <THC/THCAtomics.cuh>" in text
            and not (torch_include / "THC" / "THCAtomics.cuh").is_file()):
        cuh.write_text(text.replace("#include <THC/THCAtomics.cuh>", "#include <ATen/cuda/Atomic.cuh>"))
        applied.append("ms_deform_im2col_cuda.cuh: #include <THC/THCAtomics.cuh> -> "
                       "<ATen/cuda/Atomic.cuh> (torch no longer ships THC/)")
    cu = src / "cuda" / "ms_deform_attn_cuda.cu"
    text = cu.read_text()
    dispatch = [torch_include / "ATen" / "Dispatch.h",
                torch_include / "torch" / "headeronly" / "core" / "Dispatch.h"]
    overload = any("DeprecatedTypeProperties" in f.read_text(errors="replace")
                   for f in dispatch if f.is_file())
    old = "AT_DISPATCH_FLOATING_TYPES(value.type(),"
    if old in text and not overload:
        count = text.count(old)
        cu.write_text(text.replace(old, "AT_DISPATCH_FLOATING_TYPES(value.scalar_type(),"))
        applied.append(f"ms_deform_attn_cuda.cu: AT_DISPATCH_FLOATING_TYPES(value.type(), ...) -> "
                       f"value.scalar_type() ({count}x; torch's AT_DISPATCH no longer takes "
                       f"DeprecatedTypeProperties)")
    return applied


def _nvcc_version(cuda_home: str | None) -> str | None:
    nvcc = Path(cuda_home) / "bin" / "nvcc" if cuda_home else None
    exe = str(nvcc) if nvcc and nvcc.exists() else shutil.which("nvcc")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30,
                             check=False)
        return " ".join(out.stdout.strip().splitlines()[-2:])
    except Exception as exc:   # noqa: BLE001
        return f"{exe}: {exc}"


def find_cuda_home() -> tuple[str | None, str]:
    """(the CUDA toolkit folder, how it was found): torch's own search (CUDA_HOME / CUDA_PATH, nvcc
    on PATH, /usr/local/cuda), else the first /usr/local/cuda-*/bin/nvcc or pip-installed
    nvidia/*/bin/nvcc (the GPU image carries nvcc 13.0; where exactly is not recorded)."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        return cpp_extension.CUDA_HOME, "torch.utils.cpp_extension"
    candidates = sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))
    for site in map(Path, sys.path):
        candidates += sorted(site.glob("nvidia/*/bin/nvcc"))
    for nvcc in candidates:
        if nvcc.is_file():
            return str(nvcc.parent.parent), f"found {nvcc}"
    return None, "no nvcc found (CUDA_HOME, PATH, /usr/local/cuda*, nvidia/*/bin in site-packages)"


def build_extension(official: Path, build_dir: Path) -> dict:
    """Build MultiScaleDeformableAttention from `official`/models/ops into `build_dir` (the
    sources copied there and patched as compat_patches says): cpp_extension.load with ninja, else
    setup.py build_ext --inplace. Returns the record (ok, so, seconds, method, patches, error)."""
    from torch.utils import cpp_extension

    started = time.perf_counter()
    cuda_home, how = find_cuda_home()
    if cuda_home and not cpp_extension.CUDA_HOME:       # the module's global is what it uses
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
    info = {"ok": False, "cuda_home": cuda_home, "cuda_home_from": how,
            "nvcc": _nvcc_version(cuda_home), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "build_dir": str(build_dir)}
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: the extension is built for the GPU it runs on")
        if cuda_home is None:
            raise RuntimeError(f"no CUDA toolkit: {how}")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):   # the orchestrator passes the GPU's
            major, minor = torch.cuda.get_device_capability(0)
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
        info["arch_list"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        ops = build_dir / "ops"
        if ops.exists():
            shutil.rmtree(ops)
        shutil.copytree(official / "models" / "ops", ops)
        src = ops / "src"
        info["patches"] = compat_patches(src, Path(torch.__file__).parent / "include")
        sources = [src / "vision.cpp", src / "cpu" / "ms_deform_attn_cpu.cpp",
                   src / "cuda" / "ms_deform_attn_cuda.cu"]
        try:
            cpp_extension.verify_ninja_availability()
            ninja = True
        except RuntimeError:
            ninja = False
        if ninja:
            info["method"] = "torch.utils.cpp_extension.load (ninja)"
            out = build_dir / "build"
            out.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(
                name="MultiScaleDeformableAttention", sources=[str(s) for s in sources],
                extra_include_paths=[str(src)], extra_cflags=["-O2", "-DWITH_CUDA"],
                extra_cuda_cflags=NVCC_FLAGS + ["-DWITH_CUDA"], build_directory=str(out),
                with_cuda=True, verbose=False)
            info["so"] = module.__file__
        else:
            info["method"] = "setup.py build_ext --inplace (no ninja)"
            done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ops,
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"setup.py build_ext failed ({done.returncode}): "
                                   f"{(done.stdout + done.stderr)[-3000:]}")
            info["so"] = str(next(ops.glob("MultiScaleDeformableAttention*.so")))
        info["ok"] = True
    except Exception as exc:   # noqa: BLE001 - recorded; the official step falls back
        info["error"] = f"{type(exc).__name__}: {str(exc)[-3000:]}"
    info["seconds"] = time.perf_counter() - started
    return info


# ------------------------------------------------------------------------------ ours
def our_config(method: str, size_name: str, variant: str):
    """The updetr-r50 / detreg-r50 preset (accum 1) at the recipe; at the smoke size the same
    preset with the size's backbone, views, batch and transformer."""
    from engine.presets import preset_config

    size = SIZES[(method, size_name)]
    cfg = preset_config(PRESETS[method])
    cfg.accum = 1
    if variant == "fused_fp32":
        cfg.precision = "fp32"
    if size_name == "recipe":
        assert (cfg.img_size, cfg.batch_size, cfg.backbone) == (size.img, size.batch, size.backbone)
        return cfg
    cfg.backbone, cfg.cifar_stem, cfg.img_size, cfg.batch_size = size.backbone, False, size.img, size.batch
    cfg.workers = 0
    common = {"hidden_dim": size.hidden, "nheads": size.nheads, "enc_layers": size.enc_layers,
              "dec_layers": size.dec_layers, "dim_feedforward": size.ffn,
              "num_queries": size.queries}
    if method == "updetr":
        cfg.method_args = dict(common, num_patches=size.boxes, patch_size=size.patch_px)
    else:
        cfg.method_args = dict(common, max_boxes=size.boxes, crop_size=size.patch_px,
                               num_feature_levels=size.levels)
    return cfg.validate() or cfg


def run_ours(method: str, size_name: str, device: torch.device, variant: str, warmup: int,
             steps: int, deadline: float | None) -> dict:
    """Time our optimisation_step on the shared batch: `warmup` steps, then as many of `steps` as
    fit before `deadline`, each synchronised at its end."""
    from bench.test_train_step import bench_session
    from engine.trainer import optimisation_step

    size = SIZES[(method, size_name)]
    cfg = our_config(method, size_name, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session, kernels = bench_session(cfg, device, "reference" if variant == "reference"
                                         else "fused")
    model = session.method
    batch = make_batch(method, size)
    ours, boxes = our_inputs(batch, device)
    if method == "updetr":               # the shared patch boxes (query dropout drawn as usual)
        drawn = model.draws

        def draws(batch_size, side, ctx, where):
            _, keep, order = drawn(batch_size, side, ctx, where)
            return boxes, keep, order

        model.draws = draws
    sync = _sync(device)
    _reset_peak(device)
    seconds, losses = [], []
    step = 0

    def one():
        nonlocal step
        started = time.perf_counter()
        loss, _, _ = optimisation_step(session, [ours], step, cfg.momentum)
        sync()
        step += 1
        losses.append(loss)
        return time.perf_counter() - started

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm = [one() for _ in range(warmup)]
        timed_steps = fit_steps(steps, warm[-1] if warm else 0.0, deadline)
        seconds = [one() for _ in range(timed_steps)]
    hyper = getattr(model, "hyper", None)
    return {**_timing(seconds, cfg.batch_size), "method": method, "variant": variant,
            "implementation": "densesim", "size": size_name, "preset": cfg.preset,
            "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
                session.amp_dtype, str(session.amp_dtype)),
            "backends": dict(kernels.backend), "kernels": kernels.message,
            "matcher": {"where": f"linear_sum_assignment backend "
                                 f"{kernels.backend.get('linear_sum_assignment')!r} on the device "
                                 f"(no host sync)"},
            "loss": float(losses[-1]), "warmup_seconds": warm, "steps_asked": steps,
            "first_step_seconds": warm[0] if warm else None,
            "params": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "gflop_per_img": model.flops_per_image() / 1e9,
            "peak_memory_gib": _peak_gib(device), "inputs": checksum(batch),
            "hyper": asdict(hyper) if hyper is not None else None}


# ------------------------------------------------------------------------------ the JSON
def as_benchmark(result: dict) -> dict:
    """One result in pytest-benchmark's JSON shape (area and group `official_detr`; the name's
    variant is what bench.report replaces to pair ours with the official run)."""
    result = dict(result)
    seconds = result.pop("seconds")
    param = f"{result['method']}-{result['size']}-{result['variant']}"
    name = f"official_detr_step[{param}]"
    stats = {"min": min(seconds), "max": max(seconds), "mean": statistics.fmean(seconds),
             "median": result["median"], "stddev": statistics.pstdev(seconds),
             "rounds": len(seconds), "iterations": 1, "data": seconds}
    return {"group": "official_detr", "name": name, "fullname": f"bench/official_detr.py::{name}",
            "param": param, "params": {k: result[k] for k in ("method", "size", "variant")},
            "stats": stats, "extra_info": result}


def bar_summary(benchmarks: list[dict]) -> str:
    """Ours / official images/s per method and size (the bar: >= 3x)."""
    official = {(b["extra_info"]["method"], b["extra_info"]["size"]): b["extra_info"]
                for b in benchmarks if b["extra_info"]["variant"] == "official"}
    lines = []
    for bench in benchmarks:
        info = bench["extra_info"]
        base = official.get((info["method"], info["size"]))
        if info["implementation"] != "densesim" or base is None:
            continue
        ratio = info["img_per_s"] / base["img_per_s"]
        msda = (base.get("ms_deform_attn") or {}).get("backend")
        lines.append(f"bar: {NAMES[info['method']]} ours {info['variant']} ({info['precision']}) "
                     f"{info['img_per_s']:.1f} img/s / official ({base['precision']}"
                     f"{', ' + msda if msda else ''}) {base['img_per_s']:.1f} img/s = "
                     f"{ratio:.2f}x ({'meets' if ratio >= GOAL else 'below'} the {GOAL:.0f}x bar"
                     f"{'' if info['size'] == 'recipe' else '; smoke size, not the bar'})")
    return "\n".join(lines)


def _write(path: Path, benchmarks: list[dict], failures: dict, extension: dict | None,
           env: dict, notes: list[str]) -> None:
    data = {"machine_info": {"densesim": {**env, "ceilings": None}},
            "datetime": env.get("date_utc"), "version": "bench.official_detr",
            "failures": failures, "bar": bar_summary(benchmarks), "extension": extension,
            "anchors": ANCHORS, "goal": f"ours >= {GOAL:.0f}x the official images/s",
            "notes": notes, "inputs_identical": _inputs_identical(benchmarks),
            "benchmarks": benchmarks}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _inputs_identical(benchmarks: list[dict]) -> dict:
    """Per method: whether every part saw the same inputs (checksums)."""
    seen: dict[str, set] = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        seen.setdefault(info["method"], set()).add(json.dumps(info.get("inputs"), sort_keys=True))
    return {method: len(values) == 1 for method, values in seen.items()}


# ------------------------------------------------------------------------------ the processes
def _part_command(args, part: str, part_json: Path, deadline: float, ext_json: Path | None
                  ) -> list[str]:
    command = [sys.executable, "-m", "bench.official_detr", "--worker", part,
               "--part-json", str(part_json), "--deadline", f"{deadline:.3f}",
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
    if args.smoke:
        command.append("--smoke")
    for method in METHODS:
        value = getattr(args, method)
        if value:
            command += [f"--{method}", value]
    if ext_json is not None:
        command += ["--ext-json", str(ext_json)]
    return command


def _run_process(command: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run `command` (its output to `log`) for at most `timeout` s: SIGINT, then SIGKILL after
    GRACE s. Returns (exit code or None when it ran out of time, the log's tail)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        except BaseException:               # SIGINT: the call's time is up, stop it at once
            _stop(proc, grace=2)
            raise
    return code, _tail(log)


def _stop(proc: subprocess.Popen, grace: float = GRACE) -> None:
    """SIGINT to the process's group (its own session), SIGKILL `grace` s later."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan_parts(methods: list[str], ours: list[str], official: dict[str, Path | None]) -> list[str]:
    """The parts in order: UP-DETR official, UP-DETR ours, DETReg ours, DETReg official."""
    parts = []
    for method in methods:
        mine = [f"{method}:{variant}" for variant in ours]
        theirs = [f"{method}:official"] if official.get(method) is not None else []
        parts += theirs + mine if method == "updetr" else mine + theirs
    return parts


def orchestrate(args) -> int:
    from bench.conftest import env_info

    device = torch.device(args.device)
    out = Path(args.json)
    stem = out.with_suffix("")
    started = time.time()
    deadline = started + args.budget
    methods = [m for m in args.methods.split(",") if m]
    ours = [v for v in args.ours.split(",") if v]
    failures, notes, benchmarks = {}, [], []
    official: dict[str, Path | None] = {}
    problem = torchvision_problem()
    for method in methods:
        path = official_path(method, getattr(args, method))
        if path is None:
            failures[f"{method} official"] = "skipped: " + missing_reason(method, getattr(args, method))
        elif problem is not None:
            failures[f"{method} official"] = "skipped: " + problem
            path = None
        elif device.type != "cuda" and not args.smoke:
            failures[f"{method} official"] = "skipped: the recipe sizes need a CUDA device"
            path = None
        official[method] = path
    if device.type != "cuda":
        notes.append("no CUDA device: the official MSDeformAttn extension is not built, DETReg's "
                     "official step (if it runs) uses its PyTorch path; ours runs its reference "
                     "kernels")
    env = env_info()
    extension, build, ext_json = None, None, None
    build_dir = Path(args.build_dir) if args.build_dir else None
    if official.get("detreg") is not None and device.type == "cuda" and not args.no_build:
        build_dir = build_dir or Path(tempfile.mkdtemp(prefix="densesim-msda-"))
        build_dir.mkdir(parents=True, exist_ok=True)
        ext_json = build_dir / "build.json"
        log = Path(f"{stem}.msda-build.log")
        build_env = dict(os.environ)
        if not build_env.get("TORCH_CUDA_ARCH_LIST") and env.get("device_capability"):
            build_env["TORCH_CUDA_ARCH_LIST"] = env["device_capability"]   # no CUDA context there
        with open(log, "w") as build_log:       # the child keeps its own handle
            proc = subprocess.Popen([sys.executable, "-m", "bench.official_detr", "--build-ext",
                                     str(build_dir), "--detreg", str(official["detreg"])],
                                    cwd=REPO, stdout=build_log, stderr=subprocess.STDOUT,
                                    env=build_env, start_new_session=True)
        build = (proc, time.time(), log)
        notes.append("the MSDeformAttn extension was built (nvcc, CPU work) in the background "
                     "while the parts before DETReg's official step ran")
    elif official.get("detreg") is not None and args.no_build:
        extension = {"ok": False, "error": "--no-build"}
    parts = plan_parts(methods, ours, official)
    _write(out, benchmarks, failures, extension, env, notes)
    try:
        for index, part in enumerate(parts):
            method, variant = part.split(":")
            if part == "detreg:official" and build is not None:
                extension = _finish_build(build, ext_json, deadline)
                build = None
            left = deadline - time.time()
            rest = parts[index:]
            weights = [PART_WEIGHT[f"{p.split(':')[0]}:{'official' if p.endswith(':official') else 'ours'}"]
                       for p in rest]
            share = max(MIN_PART_SECONDS, left * weights[0] / sum(weights))
            if left < MIN_PART_SECONDS:
                failures[f"{method} {variant}"] = f"skipped: {left:.0f} s left of the {args.budget:.0f} s budget"
                print(f"{part}: SKIPPED ({left:.0f} s left)", flush=True)
                continue
            part_json = Path(f"{stem}.{method}-{variant}.json.part")
            part_json.unlink(missing_ok=True)
            log = Path(f"{stem}.{method}-{variant}.log")
            part_deadline = time.time() + share - 4       # its timed steps end before it
            t0 = time.time()
            code, tail = _run_process(_part_command(args, part, part_json, part_deadline, ext_json),
                                      log, min(share + GRACE, max(1.0, deadline - time.time())))
            result = _read_json(part_json)
            part_json.unlink(missing_ok=True)
            if result is not None and "error" not in result:
                benchmarks.append(as_benchmark(result))
                print(f"{part}: {result['step_ms']:.1f} ms/step, {result['img_per_s']:.1f} img/s "
                      f"({result['precision']}, {len(result['seconds'])} steps, "
                      f"{time.time() - t0:.0f} s)", flush=True)
            else:
                why = (result or {}).get("error") or (
                    f"ran out of its {share:.0f} s" if code is None else f"exit {code}")
                failures[f"{method} {variant}"] = f"{why}\n{(result or {}).get('traceback') or tail}"
                print(f"{part}: FAILED {why}", flush=True)
            _write(out, benchmarks, failures, extension, env, notes)
    except KeyboardInterrupt:
        failures["interrupted"] = "SIGINT: the call's time ran out; the parts above were measured"
        print("interrupted: writing what was measured", flush=True)
    finally:
        if build is not None:
            _stop(build[0], grace=2)
            extension = _read_json(ext_json) if ext_json else None
            if extension is None:
                extension = {"ok": False, "error": "the build was stopped (DETReg's official step "
                                                   "did not run)", "log_tail": _tail(build[2])}
        _write(out, benchmarks, failures, extension, env, notes)
    summary = bar_summary(benchmarks)
    if summary:
        print(summary, flush=True)
    for key, value in failures.items():
        print(f"failure: {key}: {value.splitlines()[0] if value else ''}", flush=True)
    return 0 if benchmarks and not [k for k, v in failures.items() if not v.startswith("skipped")] else 1


def _finish_build(build, ext_json: Path, deadline: float) -> dict:
    """Wait for the background build, leaving DETReg's official step at least its minimum."""
    proc, t0, log = build
    wait = deadline - time.time() - 2 * MIN_PART_SECONDS
    try:
        proc.wait(timeout=max(0.0, wait))
        info = _read_json(ext_json) or {"ok": False, "error": f"the build process exited "
                                                              f"{proc.returncode} without a record"}
        info["log_tail"] = _tail(log, 10)
    except subprocess.TimeoutExpired:
        _stop(proc, grace=2)
        info = {"ok": False, "error": f"the build did not finish in {time.time() - t0:.0f} s "
                                      f"(stopped to leave DETReg's official step its time)",
                "log_tail": _tail(log)}
    ext_json.write_text(json.dumps(info, default=str))   # what DETReg's official part reads
    print(f"MSDeformAttn extension: {'built' if info.get('ok') else 'NOT built'} in "
          f"{info.get('seconds', time.time() - t0):.0f} s"
          + ("" if info.get("ok") else f": {str(info.get('error'))[:200]}"), flush=True)
    return info


def worker(args) -> int:
    """One part in this process; its result (or error) to --part-json."""
    device = torch.device(args.device)
    method, variant = args.worker.split(":")
    size_name = "smoke" if args.smoke else "recipe"
    deadline = args.deadline
    try:
        if variant == "official":
            path = official_path(method, getattr(args, method))
            if path is None:
                raise RuntimeError(missing_reason(method, getattr(args, method)))
            if method == "updetr":
                result = run_official_updetr(path, size_name, device, args.warmup, args.steps,
                                             deadline)
            else:
                ext = _read_json(Path(args.ext_json)) if args.ext_json else None
                result = run_official_detreg(path, size_name, device, args.warmup, args.steps,
                                             deadline, ext)
        else:
            result = run_ours(method, size_name, device, variant, args.warmup, args.steps,
                              deadline)
    except BaseException as exc:   # noqa: BLE001 - OOM, import errors, SIGINT: recorded
        record = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
        Path(args.part_json).write_text(json.dumps(record))
        traceback.print_exc()
        return 1
    Path(args.part_json).write_text(json.dumps(result, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, default=str)[:4000])
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.official_detr",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="results file to write (the comparison)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (a quick check of the harness; the default on a CPU)")
    parser.add_argument("--methods", default="updetr,detreg",
                        help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--ours", default=None,
                        help=f"our variants, of {', '.join(OURS_VARIANTS)} (default: fused on CUDA, "
                             f"reference on a CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per part, fewer where the budget needs (default 8; 2 --smoke)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 2; 1 --smoke)")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="wall seconds for the whole call (default 150)")
    parser.add_argument("--updetr", default=None, help="official UP-DETR checkout (default: "
                        f"${PATH_ENV['updetr']} or .official/up-detr)")
    parser.add_argument("--detreg", default=None, help="official DETReg checkout (default: "
                        f"${PATH_ENV['detreg']} or .official/DETReg)")
    parser.add_argument("--no-build", action="store_true",
                        help="do not build the MSDeformAttn extension (DETReg official: PyTorch path)")
    parser.add_argument("--build-dir", default=None,
                        help="where to build the extension (default: a new temp folder)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    # internal: one part / the extension build, each in a process of its own
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ext-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build-ext", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    if not cuda and not args.smoke and not args.worker and not args.build_ext:
        args.smoke = True                 # the recipe sizes are for a GPU
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.ours = args.ours or ("fused" if cuda else "reference")
    for method in filter(None, args.methods.split(",")):
        if method not in METHODS:
            parser.error(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    for variant in filter(None, args.ours.split(",")):
        if variant not in OURS_VARIANTS:
            parser.error(f"unknown variant of ours {variant!r} (choose from {', '.join(OURS_VARIANTS)})")
    if args.steps < 1 or args.warmup < 0 or args.budget <= 0:
        parser.error("--steps must be >= 1, --warmup >= 0 and --budget > 0")
    if args.worker:
        method, _, variant = args.worker.partition(":")
        if method not in METHODS or variant not in (*OURS_VARIANTS, "official") or not args.part_json:
            parser.error(f"bad --worker {args.worker!r} (METHOD:VARIANT with --part-json)")
    elif not args.build_ext and args.json is None:
        parser.error("--json is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_ext:
        path = official_path("detreg", args.detreg)
        build_dir = Path(args.build_ext)
        build_dir.mkdir(parents=True, exist_ok=True)
        info = (build_extension(path, build_dir) if path is not None else
                {"ok": False, "error": missing_reason("detreg", args.detreg)})
        (build_dir / "build.json").write_text(json.dumps(info, default=str))
        print(json.dumps(info, default=str)[:3000])
        return 0 if info.get("ok") else 1
    if args.worker:
        return worker(args)
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
