"""RegionCL-M: MoCo v2 plus region swapping, with the canvas and the pasted region as two more
queries against the same key.

Paper: Xu, Zhang, Zhang, Tao, "RegionCL: Exploring Contrastive Region Pairs for Self-supervised
Representation Learning", ECCV 2022 (arXiv 2111.12309). Official code: Annbless/RegionCL @ 61bbcabb
(`openselfsup/models/RegionCLM.py`, `necks.py::RegionCLNonLinearNeckV1`,
`configs/selfsup/regionCL-M/regionCLM-r50.py`), read in spec/OFFICIAL.md §5.

The method, for a batch of query views x (view 1) and key views (view 2):
  * region swapping, on the device, ONE box for the whole batch: sides 32·randint(3, 6) px (96, 128
    or 160 at 224), each start round(randint(0, W) / 32)·32 clamped to <= W − 1 − side; image i
    receives the box's pixels from image perm[i], perm = reversed(arange(B)):
        mixed[i] = x[i] outside the box, x[B−1−i] inside it;
  * the query encoder runs on x (→ q) and, separately, on the mixed images (→ C5 map F); the box
    in feature cells is (int(start / 32), side / 32) -- truncated, so a clamped start (e.g. 63)
    gives a feature box one cell off the pasted pixels, exactly as released;
        paste_raw_i  = mean of F_i over the box cells       (content of image perm[i])
        canvas_raw_i = mean of F_i over the other cells     (content of image i)
    both through the same MLP head as q (one call on 2B rows), L2-normalised:
        q_canvas = canvas,  q_paste = paste_shuf[perm]      (the paste whose content is image i)
        q_paste_shuf = paste_shuf,  q_canvas_shuf = canvas[perm];
  * the key k = EMA encoder + head on view 2 (no grad, shuffle-BN), m = 0.999;
  * losses, τ = 0.2, the one queue of K = 65,536 keys (kernels/queue_infonce.py, no logits stored):
        L_inst   = InfoNCE(q, k, queue)
        L_region = InfoNCE over 2B rows [q_canvas; q_paste], each positive k_i, negatives the
                   queue plus ONE extra column: <q_canvas, sg(q_paste_shuf)> resp.
                   <q_paste, sg(q_canvas_shuf)> -- the other region of the same composite image
        L = L_inst + L_region; only k is enqueued.

Choices where the release is broken or silent:
  * `head2`: the released model calls `self.head2`, which no commit defines (AttributeError as
    released). As the training log suggests (region loss = instance loss at the start, summed
    1:1), the region term uses the same contrastive head: τ = 0.2, cross-entropy with label 0;
  * the neck of the mixed view is the MoCo v2 head of the query branch (fc-ReLU-fc), shared with q,
    as RegionCLNonLinearNeckV1 applies one MLP to canvas and paste;
  * other input sizes: the box side in feature cells is randint(cut_lower, cut_upper) scaled by
    grid / 7 (the released 3..5 cells of a 7×7 C5), clamped to [1, grid − 1], and the pixel
    stride is img_size / grid, so at 224 on a ResNet-50 it is the released rule exactly;
  * the box is drawn from a generator seeded by (seed, rank, step, micro-batch) (the release uses
    numpy's global RNG in each process), so a resumed run draws the same boxes;
  * the queue is enqueued once per optimiser step (as every queue method here), and the loss is
    not symmetrised (as released).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.methods.base import Method, StepContext
from engine.models.backbones import (backbone_channels, backbone_flops_per_image, build_backbone,
                                     dense_grid, dense_map, describe_backbone, pooled)
from engine.models.heads import head_flops, mlp
from engine.models.moco import KeyQueue, gather_keys, shuffle_generator, shuffled_forward
from kernels import queue_infonce


@dataclass
class RegionCLHyper:
    queue_length: int = 65536
    dim: int = 128
    hidden: int = 2048
    temperature: float = 0.2
    cut_lower: int = 3          # box side in C5 cells: randint(cut_lower, cut_upper), of a 7x7 map
    cut_upper: int = 6
    region_weight: float = 1.0

    def validate(self) -> None:
        if self.queue_length < 1 or self.dim < 1 or self.hidden < 1:
            raise ValueError("queue_length, dim and hidden must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 1 <= self.cut_lower < self.cut_upper <= 7:
            raise ValueError(f"need 1 <= cut_lower < cut_upper <= 7, got {self.cut_lower}, "
                             f"{self.cut_upper}")
        if self.region_weight < 0:
            raise ValueError("region_weight must be >= 0")


@dataclass(frozen=True)
class SwapBox:
    """One region-swapping box: pixels (start, side) and feature cells (start, side)."""
    x: int
    y: int
    w: int
    h: int
    cell_x: int
    cell_y: int
    cells_w: int
    cells_h: int


def draw_swap_box(rng: random.Random, size: int, grid: int, lower: int = 3,
                  upper: int = 6) -> SwapBox:
    """RegionSwapping's box for a size x size batch whose C5 map is grid x grid (module docstring).
    Draw order as released: width, height, then x start, y start."""
    stride = size / grid

    def side() -> int:
        cells = rng.randrange(lower, upper)                  # numpy randint(3, 6): 3, 4 or 5
        return min(grid - 1, max(1, round(cells * grid / 7)))

    cells_w, cells_h = side(), side()
    w, h = round(cells_w * stride), round(cells_h * stride)

    def start(extent: int, length: int) -> int:
        value = round(rng.randrange(0, extent) / stride) * stride
        return int(min(value, extent - 1 - length))

    x, y = start(size, w), start(size, h)
    return SwapBox(x, y, w, h, int(x / stride), int(y / stride), cells_w, cells_h)


def swap_regions(images: torch.Tensor, box: SwapBox) -> torch.Tensor:
    """mixed[i] = images[i] with the box's pixels of images[B−1−i] (the reversed batch)."""
    mixed = images.clone()
    window = (Ellipsis, slice(box.y, box.y + box.h), slice(box.x, box.x + box.w))
    mixed[window] = images.flip(0)[window]
    return mixed


def box_means(features: torch.Tensor, box: SwapBox) -> tuple[torch.Tensor, torch.Tensor]:
    """(paste_raw, canvas_raw) (B, C): means of the map over the box cells and over the rest."""
    grid_h, grid_w = features.shape[-2:]
    inside = torch.zeros(grid_h, grid_w, device=features.device, dtype=features.dtype)
    inside[box.cell_y:box.cell_y + box.cells_h, box.cell_x:box.cell_x + box.cells_w] = 1
    outside = 1 - inside
    paste = (features * inside).sum(dim=(2, 3)) / inside.sum()
    canvas = (features * outside).sum(dim=(2, 3)) / outside.sum()
    return paste, canvas


class RegionCL(Method):
    name = "regioncl"
    paper = ("Xu et al., RegionCL: Exploring Contrastive Region Pairs for Self-supervised "
             "Representation Learning, ECCV 2022")
    official_code = "Annbless/RegionCL @ 61bbcabb (RegionCL-M; head2 undefined as released)"
    sync_batchnorm = False     # shuffle-BN, as MoCo v2
    Hyper = RegionCLHyper

    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.hyper
        self.encoder = build_backbone(cfg)
        self.head_dims = [backbone_channels(self.encoder), h.hidden, h.dim]
        self.head = mlp(self.head_dims)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        self.queue = KeyQueue(h.queue_length, h.dim)
        self.grid = dense_grid(cfg)
        self._step_keys: list[torch.Tensor] = []

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        from engine.presets import ConfigError
        if dense_grid(cfg) < 2:
            raise ConfigError(f"regioncl needs a feature map of at least 2x2 cells, got "
                              f"{dense_grid(cfg)}x{dense_grid(cfg)} at {cfg.img_size} px")

    def target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.head, self.target_head)]

    def embed(self, encoder, head, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(pooled(dense_map(encoder, images))), dim=1)

    def swap_box(self, ctx: StepContext) -> SwapBox:
        seed = (((ctx.seed * 1_000_003 + ctx.rank) * 1_000_003 + ctx.step) * 1_000_003
                + ctx.micro) & (2 ** 63 - 1)
        return draw_swap_box(random.Random(seed), self.cfg.img_size, self.grid,
                             self.hyper.cut_lower, self.hyper.cut_upper)

    def region_queries(self, mixed: torch.Tensor, box: SwapBox) -> dict[str, torch.Tensor]:
        """The four region embeddings of the mixed batch (module docstring), each (B, dim)."""
        paste_raw, canvas_raw = box_means(dense_map(self.encoder, mixed), box)
        batch = mixed.shape[0]
        z = F.normalize(self.head(torch.cat([canvas_raw, paste_raw])), dim=1)
        canvas, paste_shuf = z[:batch], z[batch:]
        perm = torch.arange(batch - 1, -1, -1, device=z.device)   # its own inverse
        return {"canvas": canvas, "paste": paste_shuf[perm], "paste_shuf": paste_shuf,
                "canvas_shuf": canvas[perm]}

    def losses(self, q, k, regions, queue, backend="auto") -> tuple[torch.Tensor, torch.Tensor]:
        """(L_inst, L_region) for normalised q, k (B, dim), the region queries and the queue."""
        tau = self.hyper.temperature
        inst = queue_infonce(q, k, queue, tau, backend=backend)
        rows = torch.cat([regions["canvas"], regions["paste"]])
        extra = torch.cat([(regions["canvas"] * regions["paste_shuf"].detach()).sum(1),
                           (regions["paste"] * regions["canvas_shuf"].detach()).sum(1)])
        region = queue_infonce(rows, torch.cat([k, k]), queue, tau, backend=backend,
                               extra_negative=extra)
        return inst, region

    def forward(self, batch: dict, ctx: StepContext, prepared=None):
        view1 = batch["view1"].to(ctx.device, non_blocking=True)
        view2 = batch["view2"].to(ctx.device, non_blocking=True)
        box = self.swap_box(ctx)
        q = self.embed(self.encoder, self.head, view1)
        regions = self.region_queries(swap_regions(view1, box), box)
        ctx.mark("online_forward")
        with torch.no_grad():
            k = shuffled_forward(lambda x: self.embed(self.target_encoder, self.target_head, x),
                                 view2, ctx.rank, ctx.world_size,
                                 shuffle_generator(ctx.seed, ctx.step, ctx.micro))
        ctx.mark("target_forward")
        inst, region = self.losses(q, k, regions, self.queue.keys.to(q.dtype),
                                   ctx.backend("queue_infonce"))
        ctx.mark("loss")
        self._step_keys.append(k)
        loss = inst + self.hyper.region_weight * region
        return loss, {"loss_instance": inst.detach(), "loss_region": region.detach()}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self._step_keys:
            self.queue.enqueue(gather_keys(torch.cat(self._step_keys), ctx.world_size), ctx.ok)
        self._step_keys = []

    def flops_per_image(self) -> float:
        h = self.hyper
        backbone = backbone_flops_per_image(self.cfg)
        head = head_flops(self.head_dims)
        queue = 2 * h.queue_length * h.dim
        online = 2 * backbone + 3 * head + 3 * queue      # q, the mixed view, 3 query rows
        return 3 * online + backbone + head

    def describe(self) -> str:
        h = self.hyper
        return (f"RegionCL-M on {describe_backbone(self.cfg)}; head "
                f"{'-'.join(map(str, self.head_dims))}, queue {h.queue_length}, τ {h.temperature},"
                f" region boxes {h.cut_lower}..{h.cut_upper - 1} of 7 cells; "
                f"{super().describe()}")


__all__ = ["RegionCL", "RegionCLHyper", "draw_swap_box", "swap_regions", "box_means"]
