"""SCFS: semantics-consistent feature search, on DINO, at three depths of the backbone.

Paper: Song, Zhang, An, Luo, Wang, Xie, "Semantics-Consistent Feature Search for Self-Supervised
Visual Representation Learning", ICCV 2023 (arXiv 2212.06486). Official code: skyoux/scfs @
4b2a486f (`main_scfs.py`, `models/scfs.py`: DINOHead, DINOShallowHead, DINOLoss,
DINOShallowLoss, StudentWrapper, TeacherWrapper; README: ResNet-50, SGD lr 0.1, teacher
temperature 0.04 -> 0.07 over 50 epochs). spec/DENSE.md §7 had no code ("likely computation");
spec/OFFICIAL.md points to this release, which this file follows where it is explicit.

The method. A student (backbone + heads, trained) and a teacher (EMA of the student, no
gradient), both run on the two views x_1, x_2 (concatenated: one BatchNorm batch of 2B). Heads:
  final  DINO head on GAP(C5): MLP C -> 2048 -> 2048 -> 256 (GELU, no BN, trunc-normal 0.02
         init) -> l2n -> weight-normalised Linear 256 -> 65,536 (no bias, norm fixed at 1);
  layer  per level ℓ in (C3, C4, C5) a "shallow head" on the MAP F_ℓ: a residual bottleneck
         (1×1 C->256, BN, ReLU, 3×3 256->256, BN, ReLU, 1×1 256->C, BN, + F_ℓ, ReLU), GAP,
         Linear C->2048, BN, ReLU, Linear 2048->256, BN, l2n.
Views (official main_scfs.py): two global crops x_1, x_2 at img_size (scale 0.25-1 in the
released script) and n = 8 local crops of 96 px at 224 (scale 0.05-0.25), `local_crops` /
`local_size` / `local_scale`. The student runs on the globals and, in a second call (its own
BatchNorm batch), on the locals; the teacher on the globals only.
Feature search (teacher side, no gradient): at level ℓ the query of local crop i is the student's
pooled map u_i = l2n(GAP(F^s_ℓ(local_i))) (detached); every location p of the teacher map of
GLOBAL VIEW 1 gets the cosine weight α_p = <l2n(F^t_ℓ(x_1)_p), u_i> (not softmaxed, not clipped:
weights in [-1, 1]); the searched feature is the re-weighted map α ⊙ F^t_ℓ(x_1), which the
teacher's layer head (one BatchNorm batch of the n·B searched maps) turns into a 256-d target for
the student's layer head on crop i ("feature-to-data").

Losses (DINO's cross-entropy H(t, s) = −Σ_k softmax((t − c)/τ_t)_k · log_softmax(s/τ_s)_k, mean
over the batch; τ_s = 0.1, τ_t linear 0.04 -> 0.07 over the warm-up then 0.07):
    L_final   = mean over teacher global a and student crop v ≠ a (2 + n crops: 2(n+1) terms)
                of H(final^t(x_a) centred by c, final^s(crop_v))
    L_ℓ,glob  = mean_{a≠b ∈ {1,2}} H(layer^t_ℓ(x_a) centred by c_ℓ, layer^s_ℓ(x_b))
    L_ℓ,search= mean_i H(layer^t_ℓ(α_i ⊙ F^t_ℓ(x_1)) NOT centred, layer^s_ℓ(local_i))
    L = L_final + Σ_ℓ (L_ℓ,glob + L_ℓ,search) / 2
Centres c (65,536-d) and c_ℓ (256-d) are buffers: after the step, c ← 0.9 c + 0.1 · mean of the
teacher's final (resp. layer-ℓ global) outputs over the step's whole batch, all-reduced over ranks.
With local_crops = 0 (two views), each global view is the query for (and the student against)
the other view's teacher map, symmetrically, as L_ℓ,glob pairs them, and L_final is two-view DINO.

Departures from the official code:
  * the official box generator and RoIAlign layers are built but unused in the loss; they are
    left out. The local crops' side is 96/224 of img_size rounded to a multiple of 8 (of the
    patch on a ViT), e.g. 16 px on 32 px CIFAR images;
  * the final centre and the layer centres are updated once per optimiser step (after every
    micro-batch, all-gathered), not inside the loss, so every micro-batch of a step uses the same
    centres (identical for accum = 1), and a skipped (non-finite) step leaves them unchanged;
  * the weight-normalised last layer is Linear(weight / ‖weight‖_row) with the norm fixed at 1
    (DINO's norm_last_layer=True, what the release uses; parameter `last_layer.weight` instead of
    weight_v/weight_g). freeze_last_layer zeroes its gradient (rather than dropping it) for the
    first `freeze_last_layer_steps` steps: with the rows normalised, weight decay cannot change the
    layer's function;
  * the teacher-temperature warm-up is in steps (`teacher_temp_warmup_steps`, the README's 50
    epochs in steps), linear from `warmup_teacher_temp` and then constant (DINO's schedule per
    iteration instead of per epoch);
  * the EMA update runs before each step's forward (engine/methods/base.py), DINO's after each
    optimiser step: the same sequence of teachers; the momentum schedule (0.996 -> 1, cosine) and
    lr / weight-decay schedules are the trainer's;
  * on a ViT, the levels are the patch-token grids after evenly spaced blocks (backbones.py
    `dense_levels`: C3, C4, C5 = after blocks depth/2, 3·depth/4, depth), and GAP is their mean.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine.methods.base import ConfigError, CropSpec, Method, StepContext, ViewSpec
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     dense_grid, dense_levels, describe_backbone, level_channels,
                                     pooled)
from pipelines.augment import recipe_scale


@dataclass
class SCFSHyper:
    dim: int = 65536                   # DINO head output (out_dim)
    hidden: int = 2048                 # DINO head hidden width
    bottleneck: int = 256              # DINO head bottleneck (before the last layer)
    layer_dim: int = 256               # shallow heads: output
    layer_hidden: int = 2048           #                MLP hidden width
    layer_bottleneck: int = 256        #                residual bottleneck width
    temperature: float = 0.1           # student temperature τ_s
    teacher_temp: float = 0.07         # τ_t after the warm-up
    warmup_teacher_temp: float = 0.04  # τ_t at step 0
    teacher_temp_warmup_steps: int = 0
    center_momentum: float = 0.9
    freeze_last_layer_steps: int = 0
    local_crops: int = 8               # small crops (the search queries); 0: two views only
    local_size: int = 0                # their side; 0: 96/224 of img_size (a multiple of 8 or
    #                                    of the ViT patch)
    local_scale: tuple[float, float] = (0.05, 0.25)   # scripts/run_pretrain.sh

    def validate(self) -> None:
        if min(self.dim, self.hidden, self.bottleneck, self.layer_dim, self.layer_hidden,
               self.layer_bottleneck) < 1:
            raise ValueError("dim, hidden, bottleneck and the layer_* widths must be at least 1")
        if not (self.temperature > 0 and self.teacher_temp > 0 and self.warmup_teacher_temp > 0):
            raise ValueError("temperature, teacher_temp and warmup_teacher_temp must be positive")
        if not 0 <= self.center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {self.center_momentum}")
        if self.teacher_temp_warmup_steps < 0 or self.freeze_last_layer_steps < 0:
            raise ValueError("teacher_temp_warmup_steps and freeze_last_layer_steps must be >= 0")
        if self.local_crops < 0 or self.local_size < 0:
            raise ValueError("local_crops and local_size must be >= 0")
        if len(self.local_scale) != 2 or not 0 < self.local_scale[0] <= self.local_scale[1] <= 1:
            raise ValueError(f"local_scale must be (low, high) with 0 < low <= high <= 1, got "
                             f"{self.local_scale}")


class DINOHead(nn.Module):
    """MLP (GELU, no BN) -> l2n -> weight-normalised Linear (norm 1, no bias)."""

    def __init__(self, channels: int, hidden: int, bottleneck: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.Linear(bottleneck, dim, bias=False)

    def forward(self, x: torch.Tensor, frozen_last_layer: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        weight = self.last_layer.weight
        if frozen_last_layer:   # a zero gradient (see the module docstring)
            weight = weight.detach() + 0.0 * (weight - weight.detach())
        return F.linear(x, F.normalize(weight, dim=1))

    def flops(self) -> float:
        fc = [m for m in self.mlp if isinstance(m, nn.Linear)] + [self.last_layer]
        return float(sum(2 * m.in_features * m.out_features for m in fc))


class ShallowHead(nn.Module):
    """The official DINOShallowHead: residual bottleneck on the map, GAP, MLP with BN, l2n."""

    def __init__(self, channels: int, bottleneck: int, hidden: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, bottleneck, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.conv3 = nn.Conv2d(bottleneck, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim), nn.BatchNorm1d(dim))
        self.dims = (channels, bottleneck, hidden, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(features)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.relu(self.bn3(self.conv3(out)) + features)
        return F.normalize(self.mlp(pooled(out)), dim=-1)

    def flops(self, cells: int) -> float:
        c, b, hidden, dim = self.dims
        return float(2 * cells * (c * b + 9 * b * b + b * c) + 2 * (c * hidden + hidden * dim))


def search(teacher_map: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """α ⊙ F: teacher_map (N, C, H, W) re-weighted at every location by its cosine with the
    matching query row (N, C) (l2n(query) expected); no softmax, no clipping (official)."""
    weights = (F.normalize(teacher_map, dim=1) * query[:, :, None, None]).sum(1, keepdim=True)
    return weights * teacher_map


def dino_cross_entropy(teacher: torch.Tensor, student: torch.Tensor, teacher_temp: float,
                       student_temp: float, center: torch.Tensor | None = None) -> torch.Tensor:
    """DINO's loss (official DINOLoss): teacher rows are [view 1 ; view 2] (2B), student rows
    [view 1 ; view 2 ; local 1 ; ... ; local n] ((2 + n)B); every teacher view a against every
    student crop v ≠ a, the 2(2 + n) − 2 terms averaged; softmax of (teacher − center) / τ_t,
    in fp32. Two views (n = 0): the pairs (1, 2) and (2, 1)."""
    with torch.autocast(device_type=teacher.device.type, enabled=False):
        teacher, student = teacher.float(), student.float()
        if center is not None:
            teacher = teacher - center
        targets = F.softmax(teacher / teacher_temp, dim=-1).chunk(2)
        crops = student.shape[0] // targets[0].shape[0]
        log_probs = F.log_softmax(student / student_temp, dim=-1).chunk(crops)
        terms = [-(targets[a] * log_probs[v]).sum(-1).mean()
                 for a in range(2) for v in range(crops) if v != a]
        return sum(terms) / len(terms)


def paired_cross_entropy(teacher: torch.Tensor, student: torch.Tensor, teacher_temp: float,
                         student_temp: float) -> torch.Tensor:
    """Row i of the teacher against row i of the student (official DINOShallowLoss's local part:
    searched target of local crop i vs the student on crop i), no centring; mean over rows (=
    the mean over crops of the per-crop batch means), fp32."""
    with torch.autocast(device_type=teacher.device.type, enabled=False):
        targets = F.softmax(teacher.float() / teacher_temp, dim=-1)
        log_probs = F.log_softmax(student.float() / student_temp, dim=-1)
        return -(targets * log_probs).sum(-1).mean()


class SCFS(Method):
    name = "scfs"
    paper = ("Song et al., Semantics-Consistent Feature Search for Self-Supervised Visual "
             "Representation Learning, ICCV 2023")
    official_code = "skyoux/scfs @ 4b2a486f"
    sync_batchnorm = True      # DINO converts the ResNet's BatchNorms to SyncBatchNorm
    Hyper = SCFSHyper
    levels = ("c3", "c4", "c5")

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        self.channels = [level_channels(self.encoder, lv) for lv in self.levels]
        self.head = DINOHead(backbone_channels(self.encoder), h.hidden, h.bottleneck, h.dim)
        self.layer_heads = nn.ModuleList(
            ShallowHead(c, h.layer_bottleneck, h.layer_hidden, h.layer_dim) for c in self.channels)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        self.target_layer_heads = copy.deepcopy(self.layer_heads).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, h.dim))
        self.register_buffer("layer_centers", torch.zeros(len(self.levels), h.layer_dim))
        self._step_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.head, self.target_head),
                (self.layer_heads, self.target_layer_heads)]

    # -------------------------------------------------------------- the views it asks for
    def local_side(self) -> int:
        h, cfg = self.hyper, self.cfg
        if h.local_size:
            return h.local_size
        multiple = cfg.patch_size if cfg.backbone == "vit" else 8
        return max(multiple, round(cfg.img_size * 96 / 224 / multiple) * multiple)

    @property
    def views(self) -> ViewSpec:
        """Two global crops at img_size (the recipe's crop_scale) and `local_crops` small ones."""
        h = self.hyper
        if not h.local_crops:
            return ViewSpec()
        scale = self.cfg.crop_scale or recipe_scale(self.cfg.augmentation)
        return ViewSpec(crops=(CropSpec(2, self.cfg.img_size, tuple(scale)),
                               CropSpec(h.local_crops, self.local_side(), tuple(h.local_scale))))

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        h = cls.hyperparameters(cfg)
        if cfg.backbone == "vit" and h.local_size and h.local_size % cfg.patch_size:
            raise ConfigError(f"scfs: local_size {h.local_size} must be a multiple of the ViT "
                              f"patch size {cfg.patch_size}")

    def teacher_temperature(self, step: int) -> float:
        h = self.hyper
        if step >= h.teacher_temp_warmup_steps:
            return h.teacher_temp
        return h.warmup_teacher_temp + (h.teacher_temp - h.warmup_teacher_temp) * (
            step / h.teacher_temp_warmup_steps)

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        h = self.hyper
        crops = batch.get("crops") or [batch["view1"], batch["view2"]]
        crops = [c.to(ctx.device, non_blocking=True) for c in crops]
        views, locals_ = torch.cat(crops[:2]), crops[2:]
        half, n_local = views.shape[0] // 2, len(crops) - 2
        frozen = ctx.step < h.freeze_last_layer_steps
        # the student on the two global views, then on the local crops (official: two calls, two
        # BatchNorm batches)
        student_maps = dense_levels(self.encoder, views, self.levels)
        student_final = self.head(pooled(student_maps["c5"]), frozen_last_layer=frozen)
        student_layers = [head(student_maps[lv])
                          for head, lv in zip(self.layer_heads, self.levels)]
        if n_local:
            local_maps = dense_levels(self.encoder, torch.cat(locals_), self.levels)
            student_final = torch.cat([student_final, self.head(pooled(local_maps["c5"]),
                                                                frozen_last_layer=frozen)])
            local_layers = [head(local_maps[lv])
                            for head, lv in zip(self.layer_heads, self.levels)]
        ctx.mark("online_forward")
        with torch.no_grad():
            teacher_maps = dense_levels(self.target_encoder, views, self.levels)
            teacher_final = self.target_head(pooled(teacher_maps["c5"]))
            teacher_layers, teacher_searched = [], []
            for head, lv in zip(self.target_layer_heads, self.levels):
                teacher_layers.append(head(teacher_maps[lv]))
                if n_local:
                    # each local crop (crop-major rows) searches the teacher map of global view 1
                    query = F.normalize(pooled(local_maps[lv].detach()), dim=1)
                    target_map = teacher_maps[lv][:half].repeat(n_local, 1, 1, 1)
                else:
                    # teacher view a searched with the student's view b ≠ a (rows [v1 ; v2])
                    query = F.normalize(pooled(student_maps[lv].detach()), dim=1)
                    query = torch.cat([query[half:], query[:half]])
                    target_map = teacher_maps[lv]
                teacher_searched.append(head(search(target_map, query)))
        ctx.mark("target_forward")
        t_temp, s_temp = self.teacher_temperature(ctx.step), h.temperature
        loss_final = dino_cross_entropy(teacher_final, student_final, t_temp, s_temp, self.center)
        loss = loss_final
        terms = {"loss_final": loss_final.detach()}
        for index, level in enumerate(self.levels):
            glob = dino_cross_entropy(teacher_layers[index], student_layers[index], t_temp,
                                      s_temp, self.layer_centers[index])
            if n_local:
                searched = paired_cross_entropy(teacher_searched[index], local_layers[index],
                                                t_temp, s_temp)
            else:
                searched = dino_cross_entropy(teacher_searched[index], student_layers[index],
                                              t_temp, s_temp)
            loss = loss + (glob + searched) / 2
            terms[f"loss_{level}_global"] = glob.detach()
            terms[f"loss_{level}_search"] = searched.detach()
        ctx.mark("loss")
        self._step_outputs.append((teacher_final.detach(),
                                   torch.stack([t.detach() for t in teacher_layers])))
        return loss, terms

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """The centres: c ← m·c + (1 − m)·mean of the step's teacher outputs (all ranks)."""
        if not self._step_outputs:
            return
        finals = torch.cat([f for f, _ in self._step_outputs]).float()        # (R, dim)
        layers = torch.cat([lay for _, lay in self._step_outputs], dim=1).float()  # (L, R, ld)
        rows = finals.shape[0] * ctx.world_size
        sums = torch.cat([finals.sum(0), layers.sum(1).flatten()])
        if ctx.world_size > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        means = sums / rows
        m = self.hyper.center_momentum
        new_center = self.center * m + means[:self.center.shape[1]].view_as(self.center) * (1 - m)
        new_layers = (self.layer_centers * m
                      + means[self.center.shape[1]:].view_as(self.layer_centers) * (1 - m))
        if ctx.ok is not None:
            new_center = torch.where(ctx.ok, new_center, self.center)
            new_layers = torch.where(ctx.ok, new_layers, self.layer_centers)
        self.center.copy_(new_center)
        self.layer_centers.copy_(new_layers)
        self._step_outputs = []

    def flops_per_image(self) -> float:
        def parts(cfg):   # (backbone, layer heads) of one crop at cfg.img_size
            grid = dense_grid(cfg)   # C5's side; a ResNet's C4 is twice it, C3 4 times
            scale = {"c3": 4, "c4": 2, "c5": 1} if cfg.backbone != "vit" else {}
            layer = sum(head.flops((scale.get(lv, 1) * grid) ** 2)
                        for head, lv in zip(self.layer_heads, self.levels))
            return backbone_flops_per_image(cfg), layer

        backbone, layer = parts(self.cfg)
        final = self.head.flops()
        n_local = self.hyper.local_crops
        student = 2 * (backbone + final + layer)
        if n_local:
            local_backbone, local_layer = parts(
                dataclasses.replace(self.cfg, img_size=self.local_side()))
            student += n_local * (local_backbone + final + local_layer)
            searched = n_local * layer          # each local crop's search of view 1's maps
        else:
            searched = 2 * layer                # each view's maps searched by the other view
        teacher = 2 * (backbone + final + layer) + searched
        return 3 * student + teacher

    def describe(self) -> str:
        h = self.hyper
        return (f"SCFS (DINO) on {describe_backbone(self.cfg)}, search at "
                f"{'/'.join(self.levels)}, out {h.dim}, layer heads {h.layer_dim}-d, τ_s "
                f"{h.temperature}, τ_t {h.warmup_teacher_temp}->{h.teacher_temp}; "
                f"{super().describe()}")


__all__ = ["SCFS", "SCFSHyper", "DINOHead", "ShallowHead", "dino_cross_entropy",
           "paired_cross_entropy", "search"]
