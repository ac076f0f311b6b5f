"""Run configurations: one dataclass holding every knob, and the named presets.

A run is a method (engine/methods/) on a backbone (ViT or ResNet) with a data recipe and an
optimiser. The fields shared by every method live here; a method's own hyperparameters (queue
length, temperature, λ, ...) are its `Hyper` dataclass, overridden through `method_args`
(`--method-arg KEY=VALUE`). SIM's fields predate that and stay flat (neg_weight, loss_form,
mask_kind, decoder sizes).

`sim-vit-b16` is the released SIM recipe (spec/SIM.md §0.1, §7); `<method>-r50` presets are each
dense method's published ResNet-50 recipe; `<method>-demo-cpu` (what `--method NAME` alone runs,
on the embedded photos) and `<method>-r18-cifar-cpu` (CIFAR-10 on 2 CPU cores) scale them down.
The effective batch is `batch_size × accum` (per optimiser step); the learning rate follows the
linear scaling rule lr = blr × global batch / 256.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


LOADERS = ("auto", "torch", "dali", "resident")
BACKBONES = ("vit", "resnet18", "resnet50")
EMA_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class PretrainConfig:
    # the objective (engine/methods/<method>.py) and its own hyperparameters (its Hyper dataclass)
    method: str = "sim"
    method_args: dict = field(default_factory=dict)
    # backbone: "vit" (the fields below), "resnet18" or "resnet50" (torchvision layout)
    backbone: str = "vit"
    cifar_stem: bool = False          # ResNet: 3x3 stride-1 stem, no max-pool (32 px images)
    zero_init_residual: bool = False  # ResNet: last BN of every block starts at 0
    # model (ViT backbone; decoder_* and the depths are SIM's)
    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 768
    decoder_heads: int = 16
    projector_depth: int = 2
    predictor_depth: int = 4
    # masking (view 1)
    mask_kind: str = "block"          # "block" (BEiT-style, the recipe) or "random" (MAE-style)
    mask_ratio: float = 118 / 196      # scaled to the grid: exactly round(ratio·G²) masked
    # loss
    neg_weight: float = 0.02
    loss_form: str = "dense"          # "dense" (released code) or "paper" (global + dense, §12)
    global_weight: float = 1.0
    dense_weight: float = 1.0
    # optimisation
    batch_size: int = 128             # micro-batch per forward
    accum: int = 1                    # micro-batches per optimiser step
    epochs: float = 1600
    steps: int | None = None          # overrides epochs when set
    blr: float = 6.25e-5
    min_lr: float = 0.0
    warmup_epochs: float = 40
    warmup_steps: int | None = None   # overrides warmup_epochs when set
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0            # global grad-norm clip; 0 = off (MoCo, DenseCL, PixPro)
    momentum: float = 0.995           # EMA start
    ema_schedule: str = "cosine"      # cosine: m -> 1 over the run (SIM, BYOL, PixPro); constant (MoCo)
    optimizer: str = "adamw"          # adamw (torch fused), sgd, lars, or lamb (needs NVIDIA apex)
    sgd_momentum: float = 0.9         # SGD / LARS momentum
    lars_trust: float = 1e-3          # LARS trust coefficient η
    weight_decay_filter: str = "bias_norm"  # bias_norm: none on biases/norms; none: decay on all
    precision: str = "auto"           # auto: bf16 on CUDA, fp32 on CPU; or bf16 / fp16 / fp32
    # augmentation: a named two-view recipe (pipelines/augment.py: sim, byol, mocov2); crop scale
    # and interpolation default to the recipe's own when None
    augmentation: str = "sim"
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str | None = None
    blur: bool = True
    # data: which two-view pipeline feeds the run (see engine/loaders.py)
    loader: str = "auto"              # auto, torch (Pillow workers), dali, resident (decoded once,
                                      # kept and augmented on the device)
    # online kNN monitor (needs --eval-data TRAIN_DIR,VAL_DIR): every this many epochs, 0 = only
    # at the end of the run
    eval_every: float = 0.0
    # bookkeeping
    seed: int = 0
    workers: int = 8
    log_every: int = 10
    checkpoint_every: int = 500
    preset: str = "custom"
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        """The ViT's patch grid (SIM's masking grid)."""
        return self.img_size // self.patch_size

    @property
    def num_masked(self) -> int:
        return int(round(self.mask_ratio * self.grid ** 2))

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum

    @property
    def lr(self) -> float:
        return self.blr * self.effective_batch / 256

    def validate(self) -> "PretrainConfig":
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}: use {', '.join(BACKBONES)}")
        if self.backbone == "vit":
            if self.img_size % self.patch_size:
                raise ConfigError(f"image size {self.img_size} is not a multiple of the patch "
                                  f"size {self.patch_size}")
            if self.dim % 4 or self.decoder_dim % 4:
                raise ConfigError("encoder and decoder widths must be multiples of 4 (sin-cos "
                                  "tables)")
            if self.dim % self.heads:
                raise ConfigError(f"ViT width {self.dim} is not divisible by {self.heads} heads")
        else:
            stride = 8 if self.cifar_stem else 32
            if self.img_size < stride or self.img_size % stride:
                raise ConfigError(f"a {self.backbone}{' with the CIFAR stem' if self.cifar_stem else ''}"
                                  f" needs an image size that is a multiple of {stride}, got "
                                  f"{self.img_size}")
        if self.method == "sim":
            if self.backbone != "vit":
                raise ConfigError(f"SIM masks ViT patches: use --backbone vit (got "
                                  f"{self.backbone})")
            if not 0 < self.num_masked < self.grid ** 2:
                raise ConfigError(f"mask ratio {self.mask_ratio} leaves no visible or no masked "
                                  f"patch on a {self.grid}x{self.grid} grid")
        if self.batch_size < 1 or self.accum < 1:
            raise ConfigError("--batch-size and --accum must be at least 1")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be at least 2: BatchNorm needs more than one "
                              "image")
        if self.mask_kind not in ("block", "random"):
            raise ConfigError(f"unknown mask kind {self.mask_kind!r}: use block or random")
        if self.loss_form not in ("dense", "paper"):
            raise ConfigError(f"unknown loss form {self.loss_form!r}: use dense or paper")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"unknown precision {self.precision!r}: use auto, bf16, fp16 or fp32")
        if self.optimizer not in ("adamw", "sgd", "lars", "lamb"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: use adamw, sgd, lars or "
                              f"lamb")
        if self.weight_decay_filter not in ("bias_norm", "none"):
            raise ConfigError(f"unknown weight-decay filter {self.weight_decay_filter!r}: use "
                              f"bias_norm or none")
        if self.ema_schedule not in EMA_SCHEDULES:
            raise ConfigError(f"unknown EMA schedule {self.ema_schedule!r}: use "
                              f"{', '.join(EMA_SCHEDULES)}")
        if not 0 <= self.momentum <= 1:
            raise ConfigError(f"--momentum (EMA) must be in [0, 1], got {self.momentum}")
        if self.clip_grad < 0:
            raise ConfigError("--clip-grad must be >= 0 (0: no clipping)")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got "
                              f"{self.crop_scale}")
        from pipelines.augment import AUGMENTATIONS, INTERPOLATIONS
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augmentation!r}: use "
                              f"{', '.join(AUGMENTATIONS)}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}: use "
                              f"{', '.join(INTERPOLATIONS)}")
        if not isinstance(self.method_args, dict):
            raise ConfigError("method_args must be a dict of the method's hyperparameters")
        if self.loader not in LOADERS:
            raise ConfigError(f"unknown loader {self.loader!r}: use {', '.join(LOADERS)}")
        if self.eval_every < 0:
            raise ConfigError("--eval-every must be >= 0 (0: evaluate at the end only)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps must be at least 1")
        if self.steps is None and self.epochs <= 0:
            raise ConfigError("--epochs must be positive")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in known})
        cfg.betas, cfg.crop_ratio = tuple(cfg.betas), tuple(cfg.crop_ratio)
        if cfg.crop_scale is not None:
            cfg.crop_scale = tuple(cfg.crop_scale)
        cfg.method_args = dict(cfg.method_args)
        return cfg


PRESETS: dict[str, dict] = {
    # The released ViT-B/16 recipe: batch 4096 = 128 × 32 accumulated on one GPU (the original ran
    # 128 per GPU on 32 GPUs; F covers the whole 4096, BatchNorm statistics only each 128).
    "sim-vit-b16": dict(img_size=224, patch_size=16, dim=768, depth=12, heads=12,
                        decoder_dim=768, decoder_heads=16, batch_size=128, accum=32,
                        epochs=1600, warmup_epochs=40, blr=6.25e-5, workers=10),
    "sim-vit-s16": dict(img_size=224, patch_size=16, dim=384, depth=12, heads=6,
                        decoder_dim=384, decoder_heads=8, batch_size=256, accum=4,
                        epochs=800, warmup_epochs=40, blr=1.5e-4, workers=10),
    # CIFAR-10: ViT-Tiny, patch 4 on 32 px (grid 8, 39 of 64 masked); small images get a gentler
    # crop and no blur, as is usual for CIFAR.
    "sim-vit-t4-cifar": dict(img_size=32, patch_size=4, dim=192, depth=12, heads=3,
                             decoder_dim=192, decoder_heads=4, batch_size=512, accum=1,
                             epochs=400, warmup_epochs=20, blr=1.5e-4, crop_scale=(0.2, 1.0),
                             blur=False, workers=8),
    # Imagenette at 128 px (lightly's benchmark resolution), for the "kNN >= 0.85 in a 10-minute
    # H100 run" goal: ViT-S with patch 8 (grid 16, 154 of 256 masked), the 9,469 training images
    # decoded once and augmented on the GPU. The epoch count and lr are first guesses sized for
    # about 9 minutes at an estimated ~2,000 img/s (48.7 GFLOP/img); not yet calibrated on a GPU.
    "sim-vit-s-imagenette": dict(img_size=128, patch_size=8, dim=384, depth=12, heads=6,
                                 decoder_dim=384, decoder_heads=8, batch_size=256, accum=1,
                                 epochs=100, warmup_epochs=10, blr=1.5e-4, workers=10,
                                 loader="resident", eval_every=10, checkpoint_every=1000),
    # The default: a small model that trains in a few minutes on 2 CPU cores on the embedded
    # photos. 64 px, patch 8 (grid 8), 6 blocks of width 128.
    "sim-demo-cpu": dict(img_size=64, patch_size=8, dim=128, depth=6, heads=4,
                         decoder_dim=128, decoder_heads=4, projector_depth=2, predictor_depth=2,
                         batch_size=32, accum=1, epochs=0, steps=500, warmup_steps=50,
                         blr=3e-3, crop_scale=(0.2, 1.0), workers=2, log_every=5,
                         checkpoint_every=100),
    # The CPU proof that pre-training learns: the demo model at 32 px, patch 4 (grid 8) on
    # CIFAR-10, two epochs (about 20 minutes on 2 cores), kNN monitored every half epoch.
    "sim-demo-cifar-cpu": dict(img_size=32, patch_size=4, dim=128, depth=6, heads=4,
                               decoder_dim=128, decoder_heads=4, projector_depth=2,
                               predictor_depth=2, batch_size=64, accum=1, epochs=2,
                               warmup_epochs=0.2, blr=1.5e-3, crop_scale=(0.2, 1.0), blur=False,
                               workers=2, log_every=20, checkpoint_every=400, eval_every=0.5),
}

# ------------------------------------------------------------------ the dense CNN family
# Published ResNet-50 recipes. `batch_size` is the PER-GPU batch of the paper's run (launch with
# torchrun on that many GPUs, or raise --accum on fewer: the lr follows the global batch); the
# hyperparameters of each method (queue, τ, λ, head widths) are its Hyper defaults
# (engine/methods/<method>.py), which are the official values.
_SGD_MOCO = dict(optimizer="sgd", sgd_momentum=0.9, weight_decay=1e-4, weight_decay_filter="none",
                 clip_grad=0.0, warmup_epochs=0, min_lr=0.0)
_R50 = dict(backbone="resnet50", img_size=224, workers=10, checkpoint_every=1000)

PRESETS.update({
    # MoCo v2 (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos): 8 GPUs x 32, lr 0.03 at 256,
    # 200 epochs, key momentum 0.999 (constant), MoCo v2 augmentation (bilinear).
    "mocov2-r50": dict(method="mocov2", **_R50, **_SGD_MOCO, augmentation="mocov2",
                       batch_size=32, epochs=200, blr=0.03, momentum=0.999,
                       ema_schedule="constant"),
    # DenseCL (densecl_imagenet_200ep.py): MoCo v2's recipe, λ 0.5, two 65,536-key queues.
    "densecl-r50": dict(method="densecl", **_R50, **_SGD_MOCO, augmentation="mocov2",
                        batch_size=32, epochs=200, blr=0.03, momentum=0.999,
                        ema_schedule="constant"),
    # PixPro (tools/pixpro_base_r50_100ep.sh): 8 GPUs x 128, LARS base lr 1.0 per 256 (4.0 at
    # 1024), wd 1e-5, 5 warm-up epochs, cosine to 1e-6, 100 epochs, EMA 0.99 -> 1 (cosine),
    # "--aug BYOL --crop 0.08" with bilinear resizing, zero-init last BN of each block.
    "pixpro-r50": dict(method="pixpro", **_R50, zero_init_residual=True, augmentation="byol",
                       interpolation="bilinear", batch_size=128, epochs=100, warmup_epochs=5,
                       optimizer="lars", blr=1.0, weight_decay=1e-5,
                       weight_decay_filter="bias_norm", min_lr=1e-6, clip_grad=0.0,
                       momentum=0.99, ema_schedule="cosine"),
    # DenseSiam: the ResNet-50 recipe is not released; this is SimSiam's (main_simsiam.py: SGD
    # lr 0.05 per 256, wd 1e-4 on every tensor, cosine, batch 512 = 8 x 64, zero-init residual,
    # MoCo v2 augmentation), 200 epochs as the dense papers' ImageNet runs. No EMA.
    "densesiam-r50": dict(method="densesiam", **_R50, **_SGD_MOCO, zero_init_residual=True,
                          augmentation="mocov2", batch_size=64, epochs=200, blr=0.05),
    # LC-loss on its BYOL base (deepmind-research/byol, 300-epoch preset): LARS base lr 0.3 per
    # 256, wd 1e-6 (biases and norms excluded), 10 warm-up epochs, EMA 0.99 -> 1, BYOL's
    # augmentation (bicubic). Per-GPU batch 128 (BYOL: 4096 in all). LC constants: unverified.
    "lcloss-r50": dict(method="lcloss", **_R50, augmentation="byol", batch_size=128,
                       epochs=300, warmup_epochs=10, optimizer="lars", blr=0.3,
                       weight_decay=1e-6, weight_decay_filter="bias_norm", clip_grad=0.0,
                       momentum=0.99, ema_schedule="cosine"),
    # SwAV (scripts/swav_800ep_pretrain.sh): 64 GPUs x 64 = 4096, 2x224 (0.14-1) + 6x96
    # (0.05-0.14), LARC (trust 0.001, no clip) around SGD 0.9, lr 4.8 (0.3 per 256) cosine to
    # 0.0048, 10 warm-up epochs, wd 1e-6, 800 epochs, prototypes frozen for 313 iterations, no
    # queue. The official warm-up starts at 0.3; ours starts at 0 (both reach 4.8 at epoch 10).
    "swav-r50": dict(method="swav", **_R50, augmentation="swav", interpolation="bilinear",
                     batch_size=64, epochs=800, warmup_epochs=10, optimizer="lars", blr=0.3,
                     weight_decay=1e-6, weight_decay_filter="none", min_lr=0.0048,
                     clip_grad=0.0),
    # RegionCL-M (configs/selfsup/regionCL-M/regionCLM-r50.py): MoCo v2's recipe at 8 x 128,
    # SGD lr 0.15 at 1024 (0.0375 per 256), wd 1e-4, cosine, 200 epochs, key momentum 0.999.
    # DetCo (no pre-training code released): MoCo v2's 200-epoch recipe, as the paper builds on.
    "detco-r50": dict(method="detco", **_R50, **_SGD_MOCO, augmentation="mocov2",
                      batch_size=32, epochs=200, blr=0.03, momentum=0.999,
                      ema_schedule="constant"),
    # SCFS (skyoux/scfs README, DINO ResNet-50 recipe): 8 GPUs x 32, SGD lr 0.1 per 256 cosine to
    # 0.0048, 10 warm-up epochs, wd 1e-4, clip 3, teacher EMA 0.996 -> 1, teacher temperature
    # warm-up over 50 epochs and the last layer frozen for the first (ImageNet steps at 256).
    "scfs-r50": dict(method="scfs", **_R50, augmentation="byol", crop_scale=(0.25, 1.0),
                     batch_size=32, epochs=200, warmup_epochs=10, optimizer="sgd",
                     sgd_momentum=0.9, blr=0.1, min_lr=0.0048, weight_decay=1e-4,
                     weight_decay_filter="bias_norm", clip_grad=3.0, momentum=0.996,
                     ema_schedule="cosine",
                     method_args=dict(teacher_temp_warmup_steps=250200,
                                      freeze_last_layer_steps=5004)),
    # CCOP (configs/selfsup/ccop/r50_d2.py): 8 GPUs x 32 on COCO train2017 with selective-search
    # boxes (python -m engine.proposals); SGD lr 0.3 per 256, wd 1e-4, cosine, 10 warm-up epochs,
    # 800 epochs, key momentum 0.999, two 224 crops of scale (0.1, 1). Its kornia colour is
    # ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 0.5 on both views ("mocov2"
    # here: saturation 0.4). The curriculum spans the run (curriculum_steps=0: the paper's
    # 800 x 462 when the run is given in epochs).
    "ccop-r50": dict(method="ccop", **_R50, **dict(_SGD_MOCO, warmup_epochs=10),
                     augmentation="mocov2", crop_scale=(0.1, 1.0), batch_size=32, epochs=800,
                     blr=0.3, momentum=0.999, ema_schedule="constant"),
    "regioncl-r50": dict(method="regioncl", **_R50, **_SGD_MOCO, augmentation="mocov2",
                         batch_size=128, epochs=200, blr=0.0375, momentum=0.999,
                         ema_schedule="constant"),
})

# Small CPU presets. `<method>-demo-cpu`: what `--method NAME` alone runs, a ResNet-18 with the
# CIFAR stem at 32 px on the embedded photos, a few CPU minutes; narrow heads and a short queue.
# `<method>-r18-cifar-cpu`: the same network on CIFAR-10 for the "does it learn" comparison
# (bench/results/cpu-cifar10-methods/): every method gets the same CPU budget (epochs chosen so each
# run takes about 15 minutes on 2 cores), blur off as usual for 32 px images, EMA 0.99.
_SMALL_ARGS = {
    "mocov2": dict(queue_length=4096, hidden=512),
    "densecl": dict(queue_length=4096, hidden=512),
    "pixpro": dict(hidden=1024),
    "densesiam": dict(global_dim=512, global_pred_hidden=128, dense_hidden=256, dense_dim=128,
                      dense_pred_hidden=32, regions=8),
    "lcloss": dict(hidden=1024, dense_hidden=512, dense_dim=128),
    "swav": dict(prototypes=300, hidden=512, dim=128),
    "regioncl": dict(queue_length=4096, hidden=512),
    "detco": dict(queue_length=4096, hidden=512),
    # 256 FPN channels x 100 boxes would cost minutes per step on 2 CPU cores
    "ccop": dict(queue_length=4096, hidden=512, fpn_channels=64, max_boxes=16),
    "scfs": dict(dim=4096, hidden=512, layer_hidden=512, layer_bottleneck=64,
                 teacher_temp_warmup_steps=20),
}
_SMALL_RECIPE = {   # each method's own optimiser family, scaled for a short CPU run
    "mocov2": dict(augmentation="mocov2", optimizer="sgd", blr=0.3, weight_decay=5e-4,
                   weight_decay_filter="none", momentum=0.99, ema_schedule="constant"),
    "densecl": dict(augmentation="mocov2", optimizer="sgd", blr=0.3, weight_decay=5e-4,
                    weight_decay_filter="none", momentum=0.99, ema_schedule="constant"),
    # LARS: blr 4 (lr 1.0 at batch 64), i.e. a layer moves by lr x 1e-3 of its norm per step;
    # the recipes' 1.0 / 0.3 per 256 would barely move the weights in a few hundred steps.
    "pixpro": dict(augmentation="byol", interpolation="bilinear", optimizer="lars", blr=4.0,
                   weight_decay=1e-5, momentum=0.99, ema_schedule="cosine"),
    "densesiam": dict(augmentation="mocov2", optimizer="sgd", blr=0.3, weight_decay=5e-4,
                      weight_decay_filter="none"),
    "lcloss": dict(augmentation="byol", optimizer="lars", blr=4.0, weight_decay=1e-5,
                   momentum=0.99, ema_schedule="cosine"),
    "swav": dict(augmentation="swav", optimizer="lars", blr=4.0, weight_decay=1e-6,
                 weight_decay_filter="none"),
    "regioncl": dict(augmentation="mocov2", optimizer="sgd", blr=0.3, weight_decay=5e-4,
                     weight_decay_filter="none", momentum=0.99, ema_schedule="constant"),
    "detco": dict(augmentation="mocov2", optimizer="sgd", blr=0.3, weight_decay=5e-4,
                  weight_decay_filter="none", momentum=0.99, ema_schedule="constant"),
    "ccop": dict(augmentation="mocov2", optimizer="sgd", blr=0.3, weight_decay=5e-4,
                 weight_decay_filter="none", momentum=0.99, ema_schedule="constant"),
    # SCFS is DINO-based (no queue): DINO's augmentation (BYOL's table), a cosine EMA
    "scfs": dict(augmentation="byol", optimizer="sgd", blr=0.3, weight_decay=1e-4,
                 weight_decay_filter="bias_norm", momentum=0.99, ema_schedule="cosine"),
}
# Epochs of CIFAR-10 that fill the same CPU budget, 15 minutes of training on an idle 2-core VM,
# from each method's measured throughput there (img/s at batch 64: MoCo v2 67, DenseCL 64,
# DenseSiam 43, LC-loss 33, PixPro 31; bench/results/cpu-cifar10-methods/README.md).
_CIFAR_EPOCHS = {"mocov2": 1.2, "densecl": 1.15, "pixpro": 0.55, "densesiam": 0.75,
                 "lcloss": 0.6}
# Issue 12's methods, measured the same way (30 steps at batch 64 on the idle VM, 2 workers):
# RegionCL 40.7 img/s, SwAV 24.0 (8 crops), SCFS 23.5, DetCo 17.7, CCOP 13.6 (RoIAlign on 4 levels).
# SCFS with its 8 local crops (16 px at 32): 23.5 img/s was two-view SCFS; its FLOPs per image
# grow 1.78x with the crops (flops_per_image), so 0.42 / 1.78 epochs (not re-timed: estimated).
_CIFAR_EPOCHS.update({"swav": 0.43, "regioncl": 0.73, "detco": 0.32, "scfs": 0.24,
                      "ccop": 0.245})
for _method in _SMALL_ARGS:
    _small = dict(method=_method, backbone="resnet18", cifar_stem=True, img_size=32,
                  crop_scale=(0.2, 1.0), blur=False, clip_grad=0.0, sgd_momentum=0.9,
                  **_SMALL_RECIPE[_method], method_args=_SMALL_ARGS[_method])
    PRESETS[f"{_method}-demo-cpu"] = dict(_small, batch_size=32, epochs=0, steps=60,
                                          warmup_steps=5, workers=2, log_every=5,
                                          checkpoint_every=30)
    PRESETS[f"{_method}-r18-cifar-cpu"] = dict(_small, batch_size=64, epochs=_CIFAR_EPOCHS[_method],
                                               warmup_epochs=0.05, workers=2, log_every=20,
                                               checkpoint_every=200, eval_every=0)

# CCOP's curriculum spans the run: CIFAR-10's 0.245 epochs are 191 steps at batch 64 (its boxes
# come from python -m engine.proposals --data <cifar folder>).
PRESETS["ccop-r18-cifar-cpu"]["method_args"] = dict(_SMALL_ARGS["ccop"], curriculum_steps=191)

# ------------------------------------------------------------------ detector pre-training
# DETReg (configs/DETReg_top30_in.sh + README: 8 GPUs x 24 on ImageNet, Deformable DETR, top-30
# proposals, SwAV backbone frozen (--lr_backbone 0), 5 epochs; util/default_args.py: AdamW lr 2e-4,
# weight decay 1e-4 on every tensor, clip 0.1, step drop at epoch 40, i.e. never in 5 epochs).
# Here: the lr is blr x global batch / 256 = 2e-4 at 8 x 24, no warm-up, and the engine's cosine
# to 0 over the 5 epochs (the trainer has no constant schedule: the mean lr is half DETReg's), one
# lr for every tensor (DETReg: 0.1x on sampling_offsets / reference_points). Square 448 px views (DETReg: short side 320..480, max 600,
# aspect kept) of crop scale (0.3, 1) (DETReg: the whole image or a DETR random size crop); colour
# "mocov2" = DETReg's per-crop SimCLR table, drawn per image (see engine/methods/detreg.py).
# backbone_checkpoint / embedding_checkpoint: pass SwAV's weights with --method-arg.
_DETREG_OPTIM = dict(optimizer="adamw", betas=(0.9, 0.999), weight_decay=1e-4,
                     weight_decay_filter="none", clip_grad=0.1, warmup_epochs=0)
PRESETS["detreg-r50"] = dict(method="detreg", **dict(_R50, img_size=448), **_DETREG_OPTIM,
                             augmentation="mocov2", crop_scale=(0.3, 1.0), batch_size=24,
                             epochs=5, blr=2e-4 * 256 / 192, min_lr=0.0)
# The CPU demo: ResNet-18 (CIFAR stem) at 64 px on the embedded photos, a 2+2-layer Deformable
# DETR of width 64 on C5 only, 50 queries, 16 px proposal crops; 60 steps of batch 16.
PRESETS["detreg-demo-cpu"] = dict(
    method="detreg", backbone="resnet18", cifar_stem=True, img_size=64, **_DETREG_OPTIM,
    augmentation="mocov2", crop_scale=(0.3, 1.0), blur=False, batch_size=16, epochs=0, steps=60,
    warmup_steps=5, blr=6.4e-3, workers=2, log_every=5, checkpoint_every=30,
    method_args=dict(hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                     num_queries=50, num_feature_levels=1, crop_size=16))

# UP-DETR (README's pre-training command + main.py defaults: 8 GPUs x 32 on ImageNet, 60 epochs,
# AdamW lr 1e-4 at that batch of 256, weight decay 1e-4 on every tensor, clip 0.1, lr x 0.1 at
# epoch 40, the SwAV CNN frozen, pre-norm transformer). Here: no warm-up, then the engine's cosine
# from 1e-4 to 1e-5 (the release's rate after its drop: the trainer has no step schedule); square
# 448 px views (about the area of a 400 x 533 ImageNet image; the release resizes the whole image
# to a short side in 320..480, max 600, aspect kept, no crop or flip) of crop scale (0.3, 1) [ours];
# colour "mocov2" = the release's SimCLR table of its query patches, here drawn once per image and
# shared by the image and its patches (see engine/methods/updetr.py). Pass SwAV's weights with
# --method-arg backbone_checkpoint=PATH.
_DETR_OPTIM = dict(optimizer="adamw", betas=(0.9, 0.999), weight_decay=1e-4,
                   weight_decay_filter="none", clip_grad=0.1, warmup_epochs=0)
PRESETS["updetr-r50"] = dict(method="updetr", **dict(_R50, img_size=448), **_DETR_OPTIM,
                             augmentation="mocov2", crop_scale=(0.3, 1.0), batch_size=32,
                             epochs=60, blr=1e-4, min_lr=1e-5)
# Pair DETR has no released recipe [ours]: DETR's optimiser (AdamW 1e-4, wd 1e-4 on every tensor,
# clip 0.1) on UP-DETR's ImageNet schedule, views and batch (8 x 32, 60 epochs, 448 px), with
# each image's top-30 selective-search proposals as targets (python -m engine.proposals).
PRESETS["pairdetr-r50"] = dict(method="pairdetr", **dict(_R50, img_size=448), **_DETR_OPTIM,
                               augmentation="mocov2", crop_scale=(0.3, 1.0), batch_size=32,
                               epochs=60, blr=1e-4, min_lr=1e-5)
# The CPU demos: ResNet-18 (CIFAR stem) at 64 px on the embedded photos, a 2+2-layer DETR of width
# 64, 60 steps of batch 16 at lr 2e-4 (about 2 s and 1 s a step on 2 cores); UP-DETR's patches cut
# to 32 px (C5 4 x 4), 100 queries in 10 groups as the recipe.
_DETR_DEMO = dict(backbone="resnet18", cifar_stem=True, img_size=64, **_DETR_OPTIM,
                  augmentation="mocov2", crop_scale=(0.3, 1.0), blur=False, batch_size=16,
                  epochs=0, steps=60, warmup_steps=5, blr=2e-4 * 256 / 16, workers=2, log_every=5,
                  checkpoint_every=30)
_DETR_DEMO_ARGS = dict(hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128)
PRESETS["updetr-demo-cpu"] = dict(method="updetr", **_DETR_DEMO,
                                  method_args=dict(_DETR_DEMO_ARGS, patch_size=32))
PRESETS["pairdetr-demo-cpu"] = dict(method="pairdetr", **_DETR_DEMO,
                                    method_args=dict(_DETR_DEMO_ARGS, pair_dim=32))

DEFAULT_PRESET = "sim-demo-cpu"


def demo_preset(method: str) -> str:
    """The preset `--method NAME` runs when no --preset is given."""
    return f"{method}-demo-cpu"


def preset_config(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values["method_args"] = dict(values.get("method_args", {}))
    return PretrainConfig(preset=name, **values)
