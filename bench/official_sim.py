"""The official SIM training step beside ours, in one process: the issue-10 bar "ours >= 2x the
official code's images/s at the same model, batch and precision".

    python -m bench.official_sim --json OUT.json [--official bf16,bf16-ddp,fp16]
                                 [--ours reference,fused,compiled_fused] [--steps 10] [--tiny]

The official code (OpenGVLab/Siamese-Image-Modeling, CC BY-NC 4.0) is not part of this repository
and is never committed: `bench/carry_official_sim.sh` copies the files its training step needs into
the ignored folder `.official/Siamese-Image-Modeling` (from a git mirror of its public repository),
a GPU call brings that folder with `carry=[".official"]`, and `DENSESIM_OFFICIAL_SIM` (or --path)
names it (default: `.official/Siamese-Image-Modeling` under the repository root).

What is timed is the official code itself, set up as `main_pretrain.py` sets it up:
  * arguments from main_pretrain.py's own `get_args_parser` (read from the file, not copied) with
    the flags of `configs/pretrain/dist_sim_base_1600ep.sh` (ViT-B/16, decoder 768, 118 of 196
    patches block-masked, blr 6.25e-5, wd 0.05, mm 0.995 cosine, clip 1.0, neg_weight 0.02) at its
    per-GPU batch of 128 (4,096 over 32 GPUs), 224 px;
  * `models_sim.sim_vit_base_patch16(norm_pix_loss=False, args=args)`, AdamW over timm's
    `param_groups_weight_decay` with betas (0.9, 0.95), `NativeScalerWithGradNormCount`, TF32 off
    and cudnn.benchmark on (main_pretrain.main sets both; restored afterwards);
  * `engine_pretrain.train_one_epoch` over batches already on the device in its own input format
    ((x1, x2, delta_i, delta_j, delta_h, delta_w, relative_flip, flip_delta_j), label, block mask),
    the six geometry numbers computed as its `DataAugmentationForSIM` does from random crops, the
    masks drawn by its `MaskingGenerator`: every step of the engine -- lr and momentum schedules,
    forward with the EMA update, `loss.item()`, GradScaler backward, unscale + clip, AdamW,
    zero_grad, `torch.cuda.synchronize()`, metric logging. One step's time is the time between two
    consecutive batch fetches of the engine's loop (so the loop's own work is inside it).
  * variants: `official` (the model alone on one GPU, the fastest form of the official code),
    `official_ddp` (as its launcher runs it on one GPU: a 1-rank process group, SyncBatchNorm and
    DistributedDataParallel(find_unused_parameters=True)); precision `bf16` (autocast bf16, the
    precision of ours) or `fp16` (the official default: `torch.cuda.amp.autocast()` is fp16).
    Every variant needs a process group (its loss all-reduces F): a 1-rank group is made, and
    destroyed before ours runs.

Ours: one SIM optimiser step of `engine.trainer.optimisation_step` as `bench/test_train_step.py`
builds it (`bench_session`, the `sim-vit-b16` preset at batch 128, accum 1, bf16; one loader batch
reused on the device, i.e. its `device_batch` feed), `reference` (--no-fused), `fused` (the Triton
kernels) and `compiled_fused` (fused + `engine.compile.compile_regions`, the blocks compiled;
where that module exists), each step synchronised at its end.

Compatibility shims (the 2022 code on today's stack; each one applied is listed in the result's
`shims`, nothing else is changed in the official code):
  * `torch._six` (removed in torch 2.0; util/misc.py imports `inf` from it);
  * `numpy.float`, `numpy.int` (removed in NumPy 1.24; util/pos_embed.py, util/masking_generator.py);
  * `turtle` (an unused `from turtle import update` in models_sim.py / engine_pretrain.py; only if
    the real module cannot be imported, e.g. no tkinter);
  * timm: `timm.models.layers.helpers` aliased to `timm.layers.helpers` (timm >= 0.9 moved it);
    where timm is not installed at all (a CPU dev machine beside a newer torch), a minimal stand-in
    for the three names models_vit.py imports (Mlp, DropPath, to_2tuple; the fine-tuning
    VisionTransformer base is a placeholder SIM never builds). The GPU machine has the real timm.
  * `torch.cuda.amp.autocast` with a bf16 default, only while a `bf16` variant steps (the official
    engine calls it without a dtype, which means fp16);
  * CPU only (the tiny smoke run): `torch.cuda.synchronize` a no-op, fp32 (the engine's fp16
    scaler needs CUDA), and the metric logger's end-of-epoch reduction skipped (it puts its
    tensor on 'cuda'; with one rank it is an identity).
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
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PATH_ENV = "DENSESIM_OFFICIAL_SIM"
DEFAULT_PATH = REPO / ".official" / "Siamese-Image-Modeling"
# configs/pretrain/dist_sim_base_1600ep.sh, at its per-GPU batch (4,096 / 4 nodes / 8 GPUs)
RELEASED_FLAGS = ["--model", "sim_vit_base_patch16", "--decoder_embed_dim", "768",
                  "--batch_size", "128", "--epochs", "1600", "--warmup_epochs", "40",
                  "--crop_min", "0.08", "--with_blockwise_mask",
                  "--blockwise_num_masking_patches", "118", "--blr", "6.25e-5",
                  "--weight_decay", "0.05", "--mm", "0.995", "--mmschedule", "cosine",
                  "--clip_grad", "1.0", "--loss_type", "sim", "--neg_weight", "0.02"]
OFFICIAL_VARIANTS = ("bf16", "bf16-ddp", "fp16", "fp16-ddp", "fp32", "fp32-ddp")
OURS_VARIANTS = ("reference", "fused", "compiled_fused")


@dataclass(frozen=True)
class Size:
    """The model and batch both sides run at."""
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_num_heads: int = 16
    projector_depth: int = 2
    predictor_depth: int = 4
    batch_size: int = 128
    num_masked: int = 118

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


RECIPE = Size()                                          # sim-vit-b16 / the released script
TINY = Size(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=64,
            decoder_num_heads=2, projector_depth=1, predictor_depth=1, batch_size=4, num_masked=6)


def official_path(path: str | os.PathLike | None = None) -> Path | None:
    """The official checkout (--path, else $DENSESIM_OFFICIAL_SIM, else the default), or None
    where it holds no models_sim.py."""
    path = Path(path or os.environ.get(PATH_ENV) or DEFAULT_PATH)
    if not path.is_absolute():
        path = REPO / path
    return path if (path / "models_sim.py").is_file() else None


def provenance(path: Path) -> dict:
    info = {}
    file = path / "PROVENANCE"
    if file.is_file():
        for line in file.read_text().splitlines():
            key, _, value = line.partition(" ")
            info[key] = value
    return info


# ------------------------------------------------------------------------------ the shims
class _Mlp(torch.nn.Module):
    """SHIM (only where timm is not installed): timm 0.6.12's `Mlp` as models_vit.py uses it."""

    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer=torch.nn.GELU, bias=True, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = torch.nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = torch.nn.Dropout(drop)
        self.fc2 = torch.nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = torch.nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class _DropPath(torch.nn.Module):
    """SHIM (only where timm is not installed): timm's stochastic depth."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep if self.scale_by_keep else x * mask


class _VisionTransformerPlaceholder(torch.nn.Module):
    """SHIM (only where timm is not installed): the fine-tuning model's base class; SIM never
    builds it."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("timm is not installed: only the SIM pre-training model can be "
                                  "built with the timm stand-in")


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def apply_shims(cuda: bool) -> list[str]:
    """Make the official files importable here (see the module docstring); returns what it did.
    Idempotent."""
    applied = []
    if importlib.util.find_spec("torch._six") is None and "torch._six" not in sys.modules:
        sys.modules["torch._six"] = _module("torch._six", inf=math.inf,
                                            string_classes=(str, bytes))
        applied.append("torch._six (inf)")
    for alias, value in (("float", float), ("int", int)):
        if alias not in np.__dict__:
            setattr(np, alias, value)
            applied.append(f"numpy.{alias}")
    try:
        importlib.import_module("turtle")
    except Exception:       # no tkinter: the import is unused by the step
        sys.modules["turtle"] = _module("turtle", update=lambda *a, **k: None)
        applied.append("turtle (stub: unused import)")
    if importlib.util.find_spec("timm") is not None:
        try:
            importlib.import_module("timm.models.layers.helpers")
        except ImportError:
            sys.modules["timm.models.layers.helpers"] = importlib.import_module(
                "timm.layers.helpers")
            applied.append("timm.models.layers.helpers -> timm.layers.helpers")
    elif "timm" not in sys.modules:
        helpers = _module("timm.models.layers.helpers", to_2tuple=_to_2tuple)
        layers = _module("timm.models.layers", Mlp=_Mlp, DropPath=_DropPath, to_2tuple=_to_2tuple,
                         helpers=helpers, __path__=[])
        vision_transformer = _module("timm.models.vision_transformer",
                                     VisionTransformer=_VisionTransformerPlaceholder)
        models = _module("timm.models", layers=layers, vision_transformer=vision_transformer,
                         __path__=[])
        timm = _module("timm", models=models, __version__="stand-in (bench/official_sim.py)",
                       __path__=[])
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                            "timm.models.layers.helpers": helpers,
                            "timm.models.vision_transformer": vision_transformer})
        applied.append("timm stand-in (Mlp, DropPath, to_2tuple; timm is not installed)")
    if not cuda:
        applied.append("CPU: torch.cuda.synchronize no-op, fp32, no end-of-epoch metric reduction")
    return applied


class _Bf16Autocast(torch.amp.autocast):
    """SHIM: `torch.cuda.amp.autocast(...)` with bf16 as its default dtype (the official engine
    calls it without a dtype, which is fp16), installed only while a bf16 variant steps."""

    def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.bfloat16,
                 cache_enabled: bool = True):
        super().__init__("cuda", enabled=enabled, dtype=dtype, cache_enabled=cache_enabled)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ------------------------------------------------------------------------------ the official code
def load(path: Path, cuda: bool) -> types.SimpleNamespace:
    """Import the official modules from `path` (shims first)."""
    shims = apply_shims(cuda)
    clash = sys.modules.get("util")
    if clash is not None and not str(getattr(clash, "__path__", [""])[0]).startswith(str(path)):
        raise RuntimeError(f"a module named 'util' is already imported ({clash}); the official "
                           f"code's util/ package would clash with it")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # deprecated APIs the 2022 code uses
        modules = {name: importlib.import_module(name) for name in
                   ("models_sim", "engine_pretrain", "util.misc", "util.masking_generator")}
    misc_file = Path(modules["util.misc"].__file__).resolve()
    if path.resolve() not in misc_file.parents:
        raise RuntimeError(f"'util.misc' was imported from {misc_file}, not from the official "
                           f"checkout {path}: another package named 'util' shadows it")
    timm = sys.modules.get("timm")
    return types.SimpleNamespace(path=path, shims=shims, models_sim=modules["models_sim"],
                                 engine=modules["engine_pretrain"], misc=modules["util.misc"],
                                 masking=modules["util.masking_generator"],
                                 timm_version=getattr(timm, "__version__", None),
                                 provenance=provenance(path))


def official_args(path: Path, size: Size, precision: str, ddp: bool) -> argparse.Namespace:
    """main_pretrain.py's parser (its function, read from the file: the module itself imports
    tensorboard and asserts timm == 0.6.12) on the released script's flags, then the size."""
    source = (path / "main_pretrain.py").read_text()
    tree = ast.parse(source)
    function = next(node for node in tree.body
                    if isinstance(node, ast.FunctionDef) and node.name == "get_args_parser")
    namespace = {"argparse": argparse}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path / "main_pretrain.py"),
                 "exec"), namespace)
    args = namespace["get_args_parser"]().parse_args(RELEASED_FLAGS)
    args.batch_size, args.input_size = size.batch_size, size.img_size
    args.decoder_embed_dim = size.decoder_embed_dim
    args.projector_depth, args.predictor_depth = size.projector_depth, size.predictor_depth
    args.blockwise_num_masking_patches = size.num_masked
    args.fp32 = precision == "fp32"
    args.distributed, args.gpu, args.rank, args.world_size = ddp, 0, 0, 1
    eff_batch_size = args.batch_size * args.accum_iter * 1      # main_pretrain.main, one rank
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    return args


def param_groups_weight_decay(model, weight_decay=1e-5, no_weight_decay_list=()):
    """timm's (0.6.12) `param_groups_weight_decay`, the one main_pretrain.py imports; timm's own
    is used where timm is installed."""
    try:
        from timm.optim.optim_factory import param_groups_weight_decay as timm_groups
    except Exception:                      # noqa: BLE001 - timm >= 0.9 moved it; or no timm
        try:
            from timm.optim import param_groups_weight_decay as timm_groups
        except Exception:                  # noqa: BLE001
            timm_groups = None
    if timm_groups is not None:
        return timm_groups(model, weight_decay)
    no_weight_decay_list = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_model(official, args, size: Size):
    """main_pretrain.main's `models_sim.__dict__[args.model](...)`; other sizes through the same
    class with the base model's layer norm."""
    if size == RECIPE:
        return official.models_sim.__dict__[args.model](norm_pix_loss=args.norm_pix_loss,
                                                         args=args)
    return official.models_sim.SiameseIMViT(
        img_size=size.img_size, patch_size=size.patch_size, embed_dim=size.embed_dim,
        depth=size.depth, num_heads=size.num_heads, decoder_embed_dim=size.decoder_embed_dim,
        decoder_depth=1, decoder_num_heads=size.decoder_num_heads, mlp_ratio=4,
        norm_layer=partial(official.misc.LayerNorm, eps=1e-6), norm_pix_loss=args.norm_pix_loss,
        args=args)


def official_batch(official, size: Size, device, seed: int = 0):
    """One batch as the official loader yields it, on the device: ((x1, x2, delta_i, delta_j,
    delta_h, delta_w, relative_flip, flip_delta_j), labels, mask). Views: random normalised
    pixels; geometry: DataAugmentationForSIM's formulas on SingleRandomResizedCrop-style crops
    (scale 0.08-1, ratio 3/4-4/3) of 500x375 images after random flips; masks: its
    MaskingGenerator (BEiT block-wise, exactly num_masked), as util/datasets.ImagenetWithMask."""
    gen = torch.Generator().manual_seed(seed)
    batch, width, height = size.batch_size, 500, 375

    def crop():
        area = width * height
        for _ in range(10):
            target = area * (0.08 + 0.92 * torch.rand(1, generator=gen).item())
            ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(1, generator=gen).item())
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                j = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return i, j, h, w
        return 0, 0, height, width

    rows = []
    for _ in range(batch):
        flip1, flip2 = (bool(torch.rand(1, generator=gen) < 0.5) for _ in range(2))
        (i1, j1, h1, w1), (i2, j2, h2, w2) = crop(), crop()
        relative_flip = (flip1 and not flip2) or (flip2 and not flip1)
        rows.append(((i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1, relative_flip,
                     (width - j1 - j2) / w1))
    columns = list(zip(*rows))
    x1 = torch.randn(batch, 3, size.img_size, size.img_size, generator=gen)
    x2 = torch.randn(batch, 3, size.img_size, size.img_size, generator=gen)
    geometry = [torch.tensor(c, dtype=torch.float64) for c in columns[:4]]
    relative_flip = torch.tensor(columns[4], dtype=torch.bool)
    flip_delta_j = torch.tensor(columns[5], dtype=torch.float64)
    random.seed(seed)
    generator = official.masking.MaskingGenerator(
        (size.grid, size.grid), num_masking_patches=size.num_masked, max_num_patches=None,
        min_num_patches=min(16, size.num_masked), fixed_num_masking_patches=True)
    mask = torch.from_numpy(np.stack([generator() for _ in range(batch)]))
    assert int(mask.sum()) == batch * size.num_masked
    samples = tuple(t.to(device) for t in (x1, x2, *geometry, relative_flip, flip_delta_j))
    return samples, torch.zeros(batch, dtype=torch.int64, device=device), mask.to(device)


class TimedBatches:
    """The engine's data loader: `steps` times the same batch, stamping the clock each time the
    engine's loop asks for the next one (the last stamp is the exhausting call), so
    stamps[k + 1] - stamps[k] is one whole step of the loop."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps, self.stamps = batch, steps, []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            self.stamps.append(time.perf_counter())
            yield self.batch
        self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


@contextlib.contextmanager
def single_rank_group(device: torch.device):
    """A 1-rank process group (what torchrun --nproc_per_node=1 gives the official code): its
    loss all-reduces F. NCCL on CUDA (gloo if NCCL cannot start), gloo on CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.get_backend()
        return
    with tempfile.TemporaryDirectory() as tmp:
        backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
        backend = None
        for candidate in backends:
            try:
                dist.init_process_group(candidate, init_method=f"file://{tmp}/store-{candidate}",
                                        rank=0, world_size=1)
                backend = candidate
                break
            except Exception:      # noqa: BLE001 - try the next backend
                continue
        if backend is None:
            raise RuntimeError("could not start a 1-rank process group (nccl/gloo)")
        try:
            yield backend
        finally:
            dist.destroy_process_group()


def run_official(official, size: Size, device: torch.device, variant: str, steps: int,
                 warmup: int) -> dict:
    """Time `steps` official training steps (after `warmup`) of one variant: 'bf16', 'bf16-ddp',
    'fp16' or 'fp32'."""
    precision, _, wrapper = variant.partition("-")
    ddp = wrapper == "ddp"
    cuda = device.type == "cuda"
    if not cuda and precision != "fp32":
        raise ValueError("on a CPU the official step runs in fp32 only (its GradScaler and autocast "
                         "are CUDA's)")
    args = official_args(official.path, size, precision, ddp)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    log = io.StringIO()
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(single_rank_group(device))
        # main_pretrain.main: cudnn.benchmark on, TF32 off (restored below)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        stack.callback(_restore_flags, flags)
        torch.manual_seed(args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(official, args, size)
            model.to(device)
            model_without_ddp = model
            if ddp:
                if cuda:
                    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[0] if cuda else None, find_unused_parameters=True)
                model_without_ddp = model.module
            param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
            optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, args.beta2))
            loss_scaler = official.misc.NativeScalerWithGradNormCount(
                enabled=(not args.fp32), growth_interval=args.amp_growth_interval)
        batch = official_batch(official, size, device, seed=args.seed)
        data = TimedBatches(batch, warmup + steps)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if precision == "bf16":
            stack.enter_context(_patched(torch.cuda.amp, "autocast", _Bf16Autocast))
        if not cuda:
            stack.enter_context(_patched(torch.cuda, "synchronize", lambda *a, **k: None))
            stack.enter_context(_patched(official.misc, "is_dist_avail_and_initialized",
                                         lambda: False))
        stack.enter_context(contextlib.redirect_stdout(log))
        started = time.perf_counter()
        stats = official.engine.train_one_epoch(model, data, optimizer, device, 0, loss_scaler,
                                                log_writer=None, args=args)
        total = time.perf_counter() - started
    seconds = data.step_seconds()[warmup:]
    trainable = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    params = sum(p.numel() for p in model_without_ddp.parameters())
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    result = _result(seconds, size.batch_size, variant="official_ddp" if ddp else "official",
                     precision=precision, implementation="official",
                     wrapper="DDP(find_unused_parameters=True) + SyncBatchNorm, 1 rank" if ddp
                     else "none (the model on one device)",
                     process_group=backend, loss=stats.get("loss"), loss_sim=stats.get("loss_sim"),
                     epoch_seconds=total, params=params, params_trainable=trainable,
                     peak_memory_gib=peak, shims=official.shims, timm=official.timm_version,
                     official=official.provenance, args={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))
                                                         or v is None},
                     engine_log_tail=log.getvalue().strip().splitlines()[-3:])
    del model, model_without_ddp, optimizer, loss_scaler, batch, data
    _free(device)
    return result


def _restore_flags(flags):
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark) = flags


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _result(seconds: list[float], batch: int, **info) -> dict:
    median = statistics.median(seconds)
    return {"seconds": seconds, "median": median, "img_per_s": batch / median,
            "step_ms": 1e3 * median, "batch": batch, **info}


# ------------------------------------------------------------------------------ ours
def precision_label(dtype) -> str:
    """bf16 / fp16 / fp32: one label for both sides (ours store the autocast dtype)."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else "fp32"
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "None": "fp32"}.get(name, name)


def our_config(size: Size):
    """Our SIM config at `size`: the sim-vit-b16 preset (accum 1) at the recipe size, else the
    same fields scaled down (fp32 on a CPU, bf16 autocast on CUDA: precision 'auto')."""
    from engine.presets import PretrainConfig, preset_config

    if size == RECIPE:
        cfg = preset_config("sim-vit-b16")
        cfg.accum = 1
        return cfg
    return PretrainConfig(img_size=size.img_size, patch_size=size.patch_size, dim=size.embed_dim,
                          depth=size.depth, heads=size.num_heads,
                          decoder_dim=size.decoder_embed_dim,
                          decoder_heads=size.decoder_num_heads,
                          projector_depth=size.projector_depth,
                          predictor_depth=size.predictor_depth, batch_size=size.batch_size,
                          accum=1, mask_ratio=size.num_masked / size.grid ** 2, blur=False,
                          crop_scale=(0.2, 1.0), workers=0).validate()


def run_ours(size: Size, device: torch.device, variant: str, steps: int, warmup: int) -> dict:
    """Time `steps` of our optimisation_step (after `warmup`): 'reference', 'fused' or
    'compiled_fused', built as bench/test_train_step.py builds its sessions."""
    from bench.test_train_step import bench_session, make_loader
    from engine.trainer import optimisation_step

    cfg = our_config(size)
    session, kernels = bench_session(cfg, device, "reference" if variant == "reference"
                                     else "fused")
    compiled = None
    if variant == "compiled_fused":
        from engine.compile import compile_regions       # the lead's --compile (issue 10)
        compiled = compile_regions(session.method, "default").describe()
    loader, data_info = make_loader(cfg, device)
    stream = loader.stream()
    try:
        batch = next(stream)
    finally:
        stream.close()
    batch = {k: v.to(device) if k in ("view1", "view2") else v for k, v in batch.items()}
    seconds, losses = [], []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss, _, _ = optimisation_step(session, [batch], step, cfg.momentum)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        losses.append(loss)
    model = session.method
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = _result(seconds[warmup:], cfg.batch_size, variant=variant,
                     precision=precision_label(session.amp_dtype),
                     implementation="densesim", backends=kernels.backend, compiled=compiled,
                     preset=cfg.preset, loss=float(losses[-1]), first_step_seconds=seconds[0],
                     params=params, params_trainable=trainable,
                     gflop_per_img=model.flops_per_image() / 1e9,
                     peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30
                     if device.type == "cuda" else None, **data_info)
    del session, model, batch
    _free(device)
    return result


# ------------------------------------------------------------------------------ the JSON
def as_benchmark(result: dict, size_name: str) -> dict:
    """One result in pytest-benchmark's JSON shape, so `python -m bench.report` renders it (area
    and group `official_sim`, "vs official" = the official step's median / this one's)."""
    seconds = result.pop("seconds")
    param = f"{result['precision']}-{result['variant']}"
    name = f"official_sim_step[{size_name}-{param}]"
    stats = {"min": min(seconds), "max": max(seconds), "mean": statistics.fmean(seconds),
             "median": result["median"], "stddev": statistics.pstdev(seconds),
             "rounds": len(seconds), "iterations": 1, "data": seconds}
    return {"group": "official_sim", "name": name, "fullname": f"bench/official_sim.py::{name}",
            "param": f"{size_name}-{param}", "params": {"size": size_name, **{
                k: result[k] for k in ("precision", "variant")}},
            "stats": stats, "extra_info": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.official_sim",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--path", default=None, help=f"official checkout (default: ${PATH_ENV} "
                        f"or {DEFAULT_PATH.relative_to(REPO)})")
    parser.add_argument("--json", type=Path, required=True, help="results file to write")
    parser.add_argument("--official", default=None,
                        help=f"official variants, comma-separated, of {', '.join(OFFICIAL_VARIANTS)}"
                             " (default: bf16,bf16-ddp,fp16 on CUDA; fp32 on a CPU)")
    parser.add_argument("--ours", default=None,
                        help=f"our variants, of {', '.join(OURS_VARIANTS)} (default: all three on "
                             f"CUDA; reference on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-block ViT at 32 px, batch 4 (the CPU smoke test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    size, size_name = (TINY, "tiny") if args.tiny else (RECIPE, "vit_b16")
    steps = args.steps or (3 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    official_variants = (args.official or ("bf16,bf16-ddp,fp16" if cuda else "fp32")).split(",")
    our_variants = (args.ours or (",".join(OURS_VARIANTS) if cuda else "reference")).split(",")
    for v in official_variants:
        if v not in OFFICIAL_VARIANTS:
            parser.error(f"unknown official variant {v!r}")
    for v in our_variants:
        if v and v not in OURS_VARIANTS:
            parser.error(f"unknown variant of ours {v!r}")
    path = official_path(args.path)
    from bench.conftest import env_info

    benchmarks, failures = [], {}
    if path is None:
        failures["official"] = (f"no official checkout at {args.path or os.environ.get(PATH_ENV) or DEFAULT_PATH}: "
                                f"run bench/carry_official_sim.sh and carry .official")
        print(f"official: skipped: {failures['official']}", flush=True)
    else:
        official = load(path, cuda)
        print(f"official code: {path} ({official.provenance.get('commit', '?')[:12]}), "
              f"timm {official.timm_version}, shims: {'; '.join(official.shims) or 'none'}",
              flush=True)
        for variant in official_variants:
            try:
                result = run_official(official, size, device, variant, steps, warmup)
            except Exception as exc:   # noqa: BLE001 - record it, go on with the others
                failures[f"official {variant}"] = f"{type(exc).__name__}: {exc}"
                print(f"official {variant}: FAILED {failures[f'official {variant}']}", flush=True)
                traceback.print_exc()
                _free(device)
                continue
            print(f"official {variant}: {result['step_ms']:.1f} ms/step, "
                  f"{result['img_per_s']:.1f} img/s", flush=True)
            benchmarks.append(as_benchmark(result, size_name))
            _write(args.json, benchmarks, failures, env_info())
    for variant in filter(None, our_variants):
        try:
            result = run_ours(size, device, variant, steps, warmup)
        except Exception as exc:       # noqa: BLE001
            failures[f"ours {variant}"] = f"{type(exc).__name__}: {exc}"
            print(f"ours {variant}: FAILED {failures[f'ours {variant}']}", flush=True)
            traceback.print_exc()
            _free(device)
            continue
        print(f"ours {variant} ({result['precision']}): {result['step_ms']:.1f} ms/step, "
              f"{result['img_per_s']:.1f} img/s", flush=True)
        benchmarks.append(as_benchmark(result, size_name))
        _write(args.json, benchmarks, failures, env_info())
    _write(args.json, benchmarks, failures, env_info())
    summary = bar_summary(benchmarks)
    if summary:
        print(summary, flush=True)
    return 0 if benchmarks and not failures else 1


def bar_summary(benchmarks: list[dict]) -> str:
    """'ours / official' images/s at the same precision (the bar: >= 2x)."""
    official = {b["extra_info"]["precision"]: b["extra_info"]["img_per_s"] for b in benchmarks
                if b["extra_info"]["variant"] == "official"}
    lines = []
    for bench in benchmarks:
        info = bench["extra_info"]
        if info["implementation"] == "densesim" and info["precision"] in official:
            ratio = info["img_per_s"] / official[info["precision"]]
            lines.append(f"bar: ours {info['variant']} / official at {info['precision']}: "
                         f"{ratio:.2f}x ({'meets' if ratio >= 2 else 'below'} the 2x bar)")
    return "\n".join(lines)


def _write(path: Path, benchmarks: list[dict], failures: dict, env: dict) -> None:
    """Written after every case, so a run cut short still leaves what it measured."""
    data = {"machine_info": {"densesim": {**env, "ceilings": None}},
            "datetime": env.get("date_utc"), "version": "bench.official_sim",
            "failures": failures, "bar": bar_summary(benchmarks),
            "benchmarks": benchmarks}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
