"""The detectors that detector pre-training trains (UP-DETR, DETReg, Pair DETR): DETR and Deformable
DETR, with their Hungarian matcher and set criterion, without torchvision.

Follows facebookresearch/detr, fundamentalvision/Deformable-DETR and the two pre-training repos that
build on them (dddzg/up-detr, amirbar/DETReg; `../shared/spec/OFFICIAL.md` §6, §7). Modules carry the
official names, so a pre-trained detector's state dict maps onto the official repos' key for key:

    backbone.0.body.<torchvision ResNet names>   (FrozenBatchNorm2d: weight/bias/running_mean/var)
    input_proj (DETR: one Conv2d) | input_proj.N.0 conv, input_proj.N.1 GroupNorm (Deformable)
    transformer.encoder.layers.N.{self_attn, linear1, linear2, norm1, norm2}, transformer.encoder.norm
        (DETR pre-norm only), transformer.decoder.layers.N.{self_attn, multihead_attn, linear1,
        linear2, norm1, norm2, norm3}, transformer.decoder.norm                     (DETR)
    transformer.level_embed, transformer.reference_points, transformer.encoder.layers.N.self_attn.
        {sampling_offsets, attention_weights, value_proj, output_proj}, transformer.decoder.layers.N.
        {cross_attn, self_attn, norm1..3, linear1, linear2}                          (Deformable)
    query_embed, class_embed[.N], bbox_embed[.N].layers.{0,1,2}
        (Deformable with_box_refine also lists transformer.decoder.bbox_embed.N, the same modules,
        exactly as the official state dict does)

Differences from the official code, all without effect on the parameters or the maths unless said:
- Images come as a (B, 3, H, W) tensor and an optional padding mask (B, H, W) (True = padding)
  instead of a NestedTensor; `mask=None` means no padding (no key-padding mask is built).
- The transformers run batch-first (the official code is sequence-first); parameter names and shapes
  of nn.MultiheadAttention are the same either way.
- Targets are padded tensors: boxes (B, T, 4) cxcywh normalised, labels (B, T) int64, num_targets (B,)
  int64 (`pad_targets` builds them from per-image lists), so neither the matcher nor the criterion
  reads a value on the host. A matching is `Matching.query_index` (B, T): for each valid target the
  query matched to it (-1 in padded columns), instead of per-image (query, target) index lists.
- `num_boxes` stays a device tensor (official: `.item()`); the same value: total targets all-reduced
  over ranks, divided by the world size, clamped at 1.
- GIoU clamps the union and enclosing areas at 1e-7 (`box_ops`), so degenerate boxes give 0, not
  NaN; the values equal the official ones on real boxes.
- Logging-only terms (class_error, cardinality_error) are not computed.
- `frozen_bn` is an option (official DETR / Deformable DETR always use FrozenBatchNorm2d); the
  backbone is a densesim ResNet (`engine/models/resnet.py`, torchvision names, no avgpool/fc, as the
  official IntermediateLayerGetter) under `.body`. Not implemented: dilated C5 (DC5), learned position
  embeddings, two-stage Deformable DETR, segmentation heads.
- Hooks the pre-training methods need (UP-DETR's transformer takes the same): `tgt_mask`, an
  additive float or boolean decoder self-attention mask (UP-DETR's block-diagonal -inf mask), and
  `query_pos` (replaces the learned query positions; may have fewer queries, as UP-DETR's eval) /
  `query_pos_add` (added to them: UP-DETR's patch features).

Two hot paths are kernels being written beside this file; until they exist, private fallbacks here
stand in behind the same signatures (each clearly marked "FALLBACK"): multi-scale deformable
attention (`kernels.ms_deform_attn.ms_deform_attn`; fallback = Deformable DETR's
ms_deform_attn_core_pytorch formulation with grid_sample) and the batched assignment
(`kernels.linear_sum_assignment.batched_linear_sum_assignment`; fallback = scipy per image, which
reads the cost on the host). The kernel module is looked up (imported) once per process and used
whenever it is present; the fallbacks can go once both kernel files are in the repository.
"""
from __future__ import annotations

import copy
import importlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.box_ops import (
    box_cxcywh_to_xyxy,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from engine.models.resnet import ResNet, build_resnet

# ============================================================================ kernel lookup

_MISSING = object()
_kernel_cache: dict[tuple[str, str], object] = {}


def _optional_kernel(module: str, name: str):
    """`module.name` when the kernel file exists, else None. Only the module itself being absent
    counts as missing: an error inside an existing kernel module propagates."""
    key = (module, name)
    found = _kernel_cache.get(key, _MISSING)
    if found is _MISSING:
        try:
            found = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            found = None
        _kernel_cache[key] = found
    return found


def _check_fallback_backend(backend: str, op: str) -> None:
    if backend not in ("auto", "reference"):
        raise RuntimeError(f"{op}: backend={backend!r} asked for, but kernels/{op.split('.')[0]}.py "
                           f"is not there yet; only the in-file fallback (backend 'auto' or "
                           f"'reference') can run")


# ============================================================================ backbone


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (torchvision / DETR
    semantics): y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, eps = 1e-5.
    Loading a BatchNorm2d state dict works (its num_batches_tracked is dropped)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None].to(x.dtype) + shift[None, :, None, None].to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under `module` (in place) by a FrozenBatchNorm2d holding its
    current statistics and affine values; returns `module` (or the replacement if it is one)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen.to(module.running_mean.device if module.running_mean is not None
                         else torch.device("cpu"))
    for name, child in module.named_children():
        new = convert_frozen_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


class Backbone(nn.Module):
    """A densesim ResNet as `body` returning the requested levels ("c3".."c5") and the padding mask
    resized to each (nearest, as DETR). DETR's freezing rule: with `train_backbone` only layer2-4
    train (stem and layer1 stay frozen); without it nothing does (`--lr_backbone 0`, `--fre_cnn`)."""

    def __init__(self, body: ResNet | str = "resnet50", levels: Sequence[str] = ("c5",),
                 train_backbone: bool = True, frozen_bn: bool = True, cifar_stem: bool = False):
        super().__init__()
        if isinstance(body, str):
            body = build_resnet(body, cifar_stem=cifar_stem)
        if not isinstance(body, ResNet):
            raise TypeError(f"the DETR backbone must be a densesim ResNet, got {type(body).__name__}")
        if frozen_bn:
            body = convert_frozen_batchnorm(body)
        for name, parameter in body.named_parameters():
            if not train_backbone or not any(f"layer{k}" in name for k in (2, 3, 4)):
                parameter.requires_grad_(False)
        self.body = body
        self.levels = tuple(levels)
        self.num_channels = [body.channels[lv] for lv in self.levels]
        self.strides = [body.stride[lv] for lv in self.levels]

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        maps = self.body.forward_features(images, self.levels)
        features = [maps[lv] for lv in self.levels]
        masks = [None if mask is None else resize_mask(mask, f.shape[-2:]) for f in features]
        return features, masks


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) bool padding mask -> (B, h, w), nearest (DETR's F.interpolate default)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine position embedding with normalize=True: the (valid-pixel) cumulative row and
    column counts scaled to (0, 2π], each encoded with `num_pos_feats` sin/cos channels at
    temperatures T^(2⌊i/2⌋/n); output (B, 2·num_pos_feats, h, w), y channels first.
    `offset` is -0.5 in Deformable DETR (cell centres) and 0 in DETR."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 scale: float = 2 * math.pi, offset: float = 0.0):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if mask is None:
            mask = torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor")
                                     / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Joiner(nn.Sequential):
    """[0] the Backbone, [1] the position embedding (DETR's layout, hence `backbone.0.body...`).
    Returns the feature maps, their masks (None without padding) and their position embeddings."""

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        features, masks = self[0](images, mask)
        pos = [self[1](f, m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, pos


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (DETR's MLP: `layers.0` ...)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(n, k)
                                    for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


# ============================================================================ DETR transformer


class TransformerEncoderLayer(nn.Module):
    """Self-attention (positions added to queries and keys, not values) + FFN; post-norm (DETR's
    default) or pre-norm (`normalize_before`, UP-DETR's `--pre_norm`)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src, src_key_padding_mask=None, pos=None):
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=src_key_padding_mask,
                                                     need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(
            q, k, src, key_padding_mask=src_key_padding_mask, need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention (`tgt_mask`: the decoder self-attention mask) -> cross-attention to the
    memory -> FFN; query positions are added to self-attention queries/keys and to the
    cross-attention query, memory positions to its keys. Post- or pre-norm as the encoder layer."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                    batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt, memory, tgt_mask=None, memory_key_padding_mask=None, pos=None,
                query_pos=None):
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = _with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, x, attn_mask=tgt_mask,
                                                     need_weights=False)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(
                _with_pos(x, query_pos), _with_pos(memory, pos), memory,
                key_padding_mask=memory_key_padding_mask, need_weights=False)[0])
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=tgt_mask,
                                                            need_weights=False)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(
            _with_pos(tgt, query_pos), _with_pos(memory, pos), memory,
            key_padding_mask=memory_key_padding_mask, need_weights=False)[0]))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """Returns every layer's output through the shared final LayerNorm `norm` (L, B, Q, D), as
    DETR's return_intermediate decoder."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt, memory, tgt_mask=None, memory_key_padding_mask=None, pos=None,
                query_pos=None):
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, tgt_mask=tgt_mask,
                        memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                        query_pos=query_pos)
            hs.append(self.norm(tgt))
        return torch.stack(hs)


class Transformer(nn.Module):
    """DETR's encoder-decoder (xavier-uniform initialised matrices). `forward(src (B, D, h, w),
    mask (B, h, w) | None, query_pos (B, Q, D), pos (B, D, h, w), tgt_mask)` -> (hs (L, B, Q, D),
    memory (B, h·w, D)); the decoder input is zeros, the queries live in `query_pos`."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False):
        super().__init__()
        enc = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(enc, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        dec = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.decoder = TransformerDecoder(dec, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model, self.nhead = d_model, nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_pos, pos, tgt_mask=None):
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        mask = None if mask is None else mask.flatten(1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=mask, pos=pos,
                          query_pos=query_pos)
        return hs, memory


def _queries(weight, batch, query_pos, query_pos_add):
    queries = weight if query_pos is None else query_pos
    if query_pos_add is not None:
        queries = queries + query_pos_add
    if queries.dim() == 2:
        queries = queries.unsqueeze(0).expand(batch, -1, -1)
    return queries


class DETR(nn.Module):
    """DETR (Carion et al. 2020): ResNet C5 -> 1x1 `input_proj` -> transformer with sine positions
    -> per decoder layer `class_embed` (num_classes + 1 logits, the last is no-object) and
    `bbox_embed` (MLP, 3 layers, sigmoid cxcywh).

    UP-DETR settings: num_classes=2, num_queries=100, pre_norm=True, train_backbone=False,
    frozen_bn=True (`--fre_cnn`); its patch features enter through `query_pos_add` and its group
    mask through `tgt_mask`. `model.backbone[0].body` is the ResNet (UP-DETR embeds its query
    patches with it; `body(patches)` is C5).

    forward(images (B, 3, H, W), mask (B, H, W) bool | None, query_pos (Q', D) | (B, Q', D) | None,
    query_pos_add (broadcast to (B, Q, D)) | None, tgt_mask (Q, Q) | (B·heads, Q, Q), bool or
    additive float | None) -> {"pred_logits" (B, Q, C+1), "pred_boxes" (B, Q, 4), "aux_outputs":
    [{"pred_logits", "pred_boxes"}] for decoder layers 0..L-2 (when aux_loss), "hs" (L, B, Q, D)
    every decoder layer's normed output, "memory" (B, h·w, D)}.
    """

    def __init__(self, backbone: ResNet | str = "resnet50", num_classes: int = 91,
                 num_queries: int = 100, hidden_dim: int = 256, nheads: int = 8,
                 enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, pre_norm: bool = False, aux_loss: bool = True,
                 train_backbone: bool = True, frozen_bn: bool = True, cifar_stem: bool = False):
        super().__init__()
        self.num_queries, self.num_classes, self.aux_loss = num_queries, num_classes, aux_loss
        self.transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward,
                                       dropout, pre_norm)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        body = Backbone(backbone, ("c5",), train_backbone, frozen_bn, cifar_stem)
        self.input_proj = nn.Conv2d(body.num_channels[0], hidden_dim, kernel_size=1)
        self.backbone = Joiner(body, PositionEmbeddingSine(hidden_dim // 2))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                query_pos: torch.Tensor | None = None, query_pos_add: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> dict:
        features, masks, pos = self.backbone(images, mask)
        queries = _queries(self.query_embed.weight, images.shape[0], query_pos, query_pos_add)
        hs, memory = self.transformer(self.input_proj(features[-1]), masks[-1], queries, pos[-1],
                                      tgt_mask)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs": hs, "memory": memory}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out


# ============================================================================ deformable attention


def _ms_deform_attn_fallback(value, shapes, sampling_locations, attention_weights):
    """FALLBACK until kernels/ms_deform_attn.py lands (Deformable DETR's ms_deform_attn_core_pytorch
    formulation): per level, bilinear grid_sample (align_corners=False, zero padding) of the
    (N·heads, d, H, W) value map at 2·loc - 1, weighted sum over levels x points.
    value (N, S, M, d), shapes ((H, W), ...) as Python ints, sampling_locations (N, Lq, M, L, P, 2)
    (x, y) in [0, 1], attention_weights (N, Lq, M, L, P) -> (N, Lq, M·d)."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)          # (N·M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))             # (N·M, d, Lq, P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights.to(value.dtype)).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


def ms_deform_attn_dispatch(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, shapes, backend: str = "auto"):
    """`kernels.ms_deform_attn.ms_deform_attn` when it exists, else the fallback above.

    `shapes` are the same level sizes as Python ints. The kernel gets the device tensors where it
    may run Triton (CUDA), and the Python lists where it runs its reference maths (CPU tensors, or
    backend "reference"), which would otherwise read the tensor on the host; turning a list into a
    CUDA tensor inside the kernel would be a blocking copy."""
    kernel = _optional_kernel("kernels.ms_deform_attn", "ms_deform_attn")
    if kernel is not None:
        if value.device.type == "cpu" or backend == "reference":
            starts = [0]
            for h, w in shapes[:-1]:
                starts.append(starts[-1] + h * w)
            spatial_shapes, level_start_index = [tuple(hw) for hw in shapes], starts
        return kernel(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights, backend=backend)
    _check_fallback_backend(backend, "ms_deform_attn")
    return _ms_deform_attn_fallback(value, shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al. 2021): each query samples `n_points` points per
    level and head around its reference point (offsets from `sampling_offsets`, normalised by the
    level's (W, H); for 4-d reference boxes, by P and half the box size) and mixes them with
    softmax weights over levels x points (`attention_weights`); `value_proj` / `output_proj` as
    the official module, with its initialisation (offsets a fixed ring per head, zero weights)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, spatial_shapes, level_start_index,
                shapes, input_padding_mask=None):
        """query (N, Lq, D), reference_points (N, Lq, L, 2 | 4) normalised, input_flatten (N, S, D),
        spatial_shapes (L, 2) int64 (H, W), level_start_index (L,), shapes the same as Python
        ints, input_padding_mask (N, S) bool | None -> (N, Lq, D)."""
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lv * p).softmax(-1)
        weights = weights.view(n, lq, m, lv, p)
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)            # (L, 2) = (W, H)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference points must end in 2 or 4, got "
                             f"{tuple(reference_points.shape)}")
        out = ms_deform_attn_dispatch(value, spatial_shapes, level_start_index, locations,
                                      weights, shapes, backend=self.backend)
        return self.output_proj(out)


# ============================================================================ deformable transformer


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels (post-norm) + FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4,
                 backend="auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, shapes,
                padding_mask=None):
        src = self.norm1(src + self.dropout1(self.self_attn(
            _with_pos(src, pos), reference_points, src, spatial_shapes, level_start_index, shapes,
            padding_mask)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerDecoderLayer(nn.Module):
    """Query self-attention (nn.MultiheadAttention, `tgt_mask`) -> deformable cross-attention at the
    reference points -> FFN, post-norm (norm2, norm1, norm3 in that order, as the official)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4,
                 backend="auto"):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index,
                shapes, src_padding_mask=None, tgt_mask=None):
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=tgt_mask,
                                                            need_weights=False)[0]))
        tgt = self.norm1(tgt + self.dropout1(self.cross_attn(
            _with_pos(tgt, query_pos), reference_points, src, spatial_shapes, level_start_index,
            shapes, src_padding_mask)))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


def _encoder_reference_points(shapes, valid_ratios):
    """Cell centres of every level, normalised by the valid extent, then scaled into each level's
    valid extent: (B, S, L, 2) (x, y), as the official get_reference_points."""
    device = valid_ratios.device
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers

    def forward(self, src, spatial_shapes, level_start_index, shapes, valid_ratios, pos=None,
                padding_mask=None):
        reference_points = _encoder_reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, shapes,
                        padding_mask)
        return src


class DeformableTransformerDecoder(nn.Module):
    """Runs the layers from 2-d reference points; with `bbox_embed` set (iterative box refinement,
    set by DeformableDETR) each layer's box head refines the reference in inverse-sigmoid space and
    the next layer uses the refined 4-d box, detached. Returns (hs (L, B, Q, D), references after
    each layer (L, B, Q, 2 | 4))."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed = None      # DeformableDETR assigns its per-layer box heads here (refine)

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, shapes,
                valid_ratios, query_pos=None, src_padding_mask=None, tgt_mask=None):
        hs, references = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = (reference_points[:, :, None]
                             * torch.cat([valid_ratios, valid_ratios], -1)[:, None])
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            tgt = layer(tgt, query_pos, ref_input, src, spatial_shapes, level_start_index, shapes,
                        src_padding_mask, tgt_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](tgt)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points),
                                         delta[..., 2:]], -1)
                reference_points = refined.sigmoid().detach()
            hs.append(tgt)
            references.append(reference_points)
        return torch.stack(hs), torch.stack(references)


class DeformableTransformer(nn.Module):
    """Deformable DETR's transformer (single-stage). forward(srcs [(B, D, h_l, w_l)], masks
    [(B, h_l, w_l) | None], pos [(B, D, h_l, w_l)], query_embed (Q, 2D): first half positions,
    second half decoder input) -> (hs (L, B, Q, D), init_reference (B, Q, 2),
    inter_references (L, B, Q, 2 | 4), memory (B, S, D))."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, num_feature_levels=4, dec_n_points=4,
                 enc_n_points=4, backend="auto"):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.encoder = DeformableTransformerEncoder(DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points, backend),
            num_encoder_layers)
        self.decoder = DeformableTransformerDecoder(DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points, backend),
            num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(B, h, w) padding mask -> (B, 2) the valid fraction of width and height."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs, masks, pos_embeds, query_embed, tgt_mask=None):
        batch, device = srcs[0].shape[0], srcs[0].device
        shapes = tuple((int(s.shape[-2]), int(s.shape[-1])) for s in srcs)
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        padded = any(m is not None for m in masks)
        if padded:
            masks = [torch.zeros(batch, h, w, dtype=torch.bool, device=device) if m is None else m
                     for m, (h, w) in zip(masks, shapes)]
            mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
            valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)
        else:
            mask_flat = None
            valid_ratios = torch.ones(batch, len(shapes), 2, device=device)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        # a non_blocking copy of a fresh CPU tensor: torch.tensor(..., device="cuda") would be a
        # blocking copy that waits for the stream (a host sync in the middle of the step)
        flat = [size for hw in shapes for size in hw] + starts
        levels = torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True)
        spatial_shapes = levels[:2 * len(shapes)].view(len(shapes), 2)
        level_start_index = levels[2 * len(shapes):]

        memory = self.encoder(src_flat, spatial_shapes, level_start_index, shapes, valid_ratios,
                              pos_flat, mask_flat)
        query_pos, tgt = torch.split(query_embed, self.d_model, dim=-1)
        if query_pos.dim() == 2:
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
        init_reference = self.reference_points(query_pos).sigmoid()
        hs, inter_references = self.decoder(tgt, init_reference, memory, spatial_shapes,
                                            level_start_index, shapes, valid_ratios, query_pos,
                                            mask_flat, tgt_mask)
        return hs, init_reference, inter_references, memory


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al. 2021), single stage: ResNet C3-C5 (strides 8/16/32) + one extra
    stride-2 3x3 conv level on C5 (4 levels), each projected to `hidden_dim` with GroupNorm(32);
    sine positions (cell-centre offset) + a learned `level_embed`; deformable encoder/decoder;
    `query_embed` (Q, 2·hidden: positions | decoder input); sigmoid-focal class logits
    (num_classes, no no-object slot; bias at prior 0.01) and boxes sigmoid(bbox_embed(hs) +
    inverse_sigmoid(reference)).

    `with_box_refine` (iterative box refinement): one class/box head per decoder layer (clones),
    each layer's box refines the previous layer's (detached) box, which is also the next layer's
    4-d reference. Without it the heads are shared (class_embed.N are one module), as the official.
    DETReg (IN-1k config): num_classes=91 (COCO head, all proposal labels 1), 300 queries,
    train_backbone=False, frozen_bn=True; the released command does not set with_box_refine.

    forward(images, mask=None, tgt_mask=None) -> {"pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4),
    "aux_outputs" (layers 0..L-2, when aux_loss), "hs" (L, B, Q, D), "init_reference" (B, Q, 2),
    "inter_references" (L, B, Q, 2 | 4), "memory" (B, S, D)}.
    """

    def __init__(self, backbone: ResNet | str = "resnet50", num_classes: int = 91,
                 num_queries: int = 300, hidden_dim: int = 256, nheads: int = 8,
                 enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, num_feature_levels: int = 4, enc_n_points: int = 4,
                 dec_n_points: int = 4, aux_loss: bool = True, with_box_refine: bool = False,
                 train_backbone: bool = True, frozen_bn: bool = True, cifar_stem: bool = False,
                 attn_backend: str = "auto"):
        super().__init__()
        if num_feature_levels == 2:
            raise ValueError("num_feature_levels must be 1 (C5 only) or >= 3 (C3-C5 + extra levels)")
        self.num_queries, self.num_classes = num_queries, num_classes
        self.num_feature_levels, self.aux_loss = num_feature_levels, aux_loss
        self.with_box_refine = with_box_refine
        self.transformer = DeformableTransformer(hidden_dim, nheads, enc_layers, dec_layers,
                                                 dim_feedforward, dropout, num_feature_levels,
                                                 dec_n_points, enc_n_points, attn_backend)
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        levels = ("c3", "c4", "c5") if num_feature_levels > 1 else ("c5",)
        body = Backbone(backbone, levels, train_backbone, frozen_bn, cifar_stem)
        projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1),
                                     nn.GroupNorm(32, hidden_dim)) for c in body.num_channels]
        in_channels = body.num_channels[-1]
        for _ in range(num_feature_levels - len(levels)):
            projections.append(nn.Sequential(
                nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.backbone = Joiner(body, PositionEmbeddingSine(hidden_dim // 2, offset=-0.5))

        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0.0)
        if with_box_refine:
            self.class_embed = _clones(class_embed, dec_layers)
            self.bbox_embed = _clones(bbox_embed, dec_layers)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * dec_layers)
            self.bbox_embed = nn.ModuleList([bbox_embed] * dec_layers)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> dict:
        features, masks, pos = self.backbone(images, mask)
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        for lvl in range(len(features), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
            m = None if mask is None else resize_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone[1](src, m).to(src.dtype))
        hs, init_reference, inter_references, memory = self.transformer(
            srcs, masks, pos, self.query_embed.weight, tgt_mask)

        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(delta.sigmoid())
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs": hs,
               "init_reference": init_reference, "inter_references": inter_references,
               "memory": memory}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out


# ============================================================================ matching


def _scipy_batched_linear_sum_assignment(cost: torch.Tensor, num_cols: torch.Tensor,
                                         backend: str = "auto") -> torch.Tensor:
    """FALLBACK until kernels/linear_sum_assignment.py lands, with its signature and result:
    cost (B, n, m), n >= m, num_cols (B,) int64 -> (B, m) int64, the row matched to each of the
    first num_cols[b] columns, -1 in the others. Solved with scipy on the host, one image at a
    time (as the official repos do): this reads the cost matrix back, a device sync."""
    _check_fallback_backend(backend, "linear_sum_assignment.batched_linear_sum_assignment")
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    batch, _, m = cost.shape
    host = cost.detach().to("cpu", torch.float64).numpy()
    cols = num_cols.detach().cpu().tolist()
    assignment = np.full((batch, m), -1, dtype=np.int64)
    for b in range(batch):
        k = int(cols[b])
        if k > 0:
            rows, columns = linear_sum_assignment(host[b, :, :k])
            assignment[b, columns] = rows
    return torch.from_numpy(assignment).to(cost.device)


def batched_linear_sum_assignment(cost: torch.Tensor, num_cols: torch.Tensor,
                                  backend: str = "auto") -> torch.Tensor:
    """`kernels.linear_sum_assignment.batched_linear_sum_assignment` when it exists, else the scipy
    fallback (same signature)."""
    kernel = _optional_kernel("kernels.linear_sum_assignment", "batched_linear_sum_assignment")
    if kernel is None:
        kernel = _scipy_batched_linear_sum_assignment
    return kernel(cost, num_cols, backend=backend)


@dataclass
class Matching:
    """A batch's Hungarian matching. query_index (B, T) int64: the query matched to target t of
    image b, -1 in padded target columns; valid (B, T) bool: t < num_targets[b]."""

    query_index: torch.Tensor
    valid: torch.Tensor

    def gather(self, per_query: torch.Tensor) -> torch.Tensor:
        """(B, Q, ...) -> (B, T, ...): the matched query's row for every target column (query 0's
        row in padded columns: mask those with `valid`)."""
        index = self.query_index.clamp(min=0)
        index = index.view(*index.shape, *([1] * (per_query.dim() - 2)))
        return per_query.gather(1, index.expand(-1, -1, *per_query.shape[2:]))

    def query_mask(self, num_queries: int) -> torch.Tensor:
        """(B, Q) bool: the queries matched to some target."""
        return self.scatter_queries(torch.ones_like(self.valid), num_queries, False)

    def scatter_queries(self, per_target: torch.Tensor, num_queries: int, fill) -> torch.Tensor:
        """(B, T, ...) values -> (B, Q, ...): each matched query gets its target's value, the
        others `fill`. Padded columns are written to a spare slot that is then dropped."""
        b, t = self.valid.shape
        slot = torch.where(self.valid, self.query_index, torch.full_like(self.query_index,
                                                                         num_queries))
        out = per_target.new_full((b, num_queries + 1, *per_target.shape[2:]), fill)
        slot = slot.view(b, t, *([1] * (per_target.dim() - 2))).expand_as(per_target)
        return out.scatter(1, slot, per_target)[:, :num_queries]


def valid_targets(num_targets: torch.Tensor, max_targets: int) -> torch.Tensor:
    """(B,) counts -> (B, T) bool, column t valid when t < num_targets[b]."""
    return torch.arange(max_targets, device=num_targets.device) < num_targets[:, None]


def pad_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None = None,
                max_targets: int | None = None) -> dict[str, torch.Tensor]:
    """Per-image lists (boxes (n_i, 4) cxcywh, labels (n_i,)) -> the padded targets the matcher and
    the criterion take: {"boxes" (B, T, 4), "labels" (B, T) int64, "num_targets" (B,) int64};
    padded rows hold box (0.5, 0.5, 1, 1) and label 0. Labels default to 0. (A host-side collate
    helper: the counts come from the list lengths.)"""
    counts = [int(b.shape[0]) for b in boxes]
    t = max(counts, default=0) if max_targets is None else max_targets
    if any(c > t for c in counts):
        raise ValueError(f"an image has {max(counts)} targets, more than max_targets={t}")
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    dtype = boxes[0].dtype if len(boxes) else torch.float32
    out_boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=dtype, device=device).repeat(
        len(boxes), t, 1)
    out_labels = torch.zeros(len(boxes), t, dtype=torch.int64, device=device)
    for i, (bx, c) in enumerate(zip(boxes, counts)):
        out_boxes[i, :c] = bx
        if labels is not None:
            out_labels[i, :c] = labels[i]
    return {"boxes": out_boxes, "labels": out_labels,
            "num_targets": torch.tensor(counts, dtype=torch.int64, device=device)}


def _sanitised_targets(targets: Mapping[str, torch.Tensor], num_queries: int):
    boxes, labels, num_targets = targets["boxes"], targets["labels"], targets["num_targets"]
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2]:
        raise ValueError(f"targets must be boxes (B, T, 4) and labels (B, T), got "
                         f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
    b, t = labels.shape
    if num_targets.shape != (b,):
        raise ValueError(f"num_targets must be ({b},), got {tuple(num_targets.shape)}")
    if t > num_queries:
        raise ValueError(f"{t} target columns for {num_queries} queries: the matching needs "
                         f"queries >= targets")
    num_targets = num_targets.to(device=boxes.device, dtype=torch.int64)
    torch._assert_async(((num_targets >= 0) & (num_targets <= t)).all(),
                        "num_targets out of [0, T]")
    valid = valid_targets(num_targets, t)
    # padded columns may hold anything (even NaN): replace them so no NaN enters a where's
    # unselected branch (whose backward would still multiply it by zero)
    # (the filler is made by fills on the device: a Python list would be a blocking copy)
    filler = torch.cat([boxes.new_full((2,), 0.5), boxes.new_ones(2)])
    boxes = torch.where(valid[..., None], boxes, filler)
    labels = torch.where(valid, labels.to(torch.int64), torch.zeros_like(labels, dtype=torch.int64))
    return boxes, labels, num_targets, valid


class HungarianMatcher(nn.Module):
    """Optimal one-to-one matching of queries to targets (DETR), for the whole padded batch at once.

    cost[b, q, t] = cost_bbox · |box_q - box_t|_1 (cxcywh) + cost_class · class cost
                    + cost_giou · (-GIoU(box_q, box_t))
    class cost: "softmax" (DETR / UP-DETR): -softmax(logits)[label_t]; "focal" (Deformable DETR /
    DETReg): α(1-p)^γ(-log(p+1e-8)) - (1-α)p^γ(-log(1-p+1e-8)) at p = sigmoid(logit[label_t]).
    Padded columns get cost 0; the solver ignores them. Built on the device in float32, no grad.
    UP-DETR: (1, 5, 2, "softmax"); DETReg: (2, 5, 2, "focal")."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 class_cost: str = "softmax", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 backend: str = "auto"):
        super().__init__()
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"class_cost must be 'softmax' or 'focal', got {class_cost!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_cost, self.focal_alpha, self.focal_gamma = class_cost, focal_alpha, focal_gamma
        self.backend = backend

    @torch.no_grad()
    def cost_matrix(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                    tgt_labels: torch.Tensor, tgt_boxes: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
        """(B, Q, C), (B, Q, 4), sanitised (B, T), (B, T, 4), (B, T) -> (B, Q, T) float32."""
        b, q, _ = pred_logits.shape
        t = tgt_labels.shape[1]
        index = tgt_labels[:, None, :].expand(b, q, t)
        logits = pred_logits.float()
        if self.class_cost == "softmax":
            class_cost = -logits.softmax(-1).gather(2, index)
        else:
            p = logits.gather(2, index).sigmoid()
            a, g = self.focal_alpha, self.focal_gamma
            pos = a * (1 - p) ** g * (-(p + 1e-8).log())
            neg = (1 - a) * p ** g * (-(1 - p + 1e-8).log())
            class_cost = pos - neg
        pred = pred_boxes.float()
        tgt = tgt_boxes.float()
        l1 = (pred[:, :, None, :] - tgt[:, None, :, :]).abs().sum(-1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
        cost = self.cost_bbox * l1 + self.cost_class * class_cost - self.cost_giou * giou
        return cost.masked_fill(~valid[:, None, :], 0.0)

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, torch.Tensor],
                targets: Mapping[str, torch.Tensor]) -> Matching:
        logits = outputs["pred_logits"]
        boxes, labels, num_targets, valid = _sanitised_targets(targets, logits.shape[1])
        if labels.shape[1] == 0:
            return Matching(labels.new_empty(labels.shape), valid)
        cost = self.cost_matrix(logits, outputs["pred_boxes"], labels, boxes, valid)
        assignment = batched_linear_sum_assignment(cost, num_targets, backend=self.backend)
        return Matching(assignment.to(torch.int64), valid)


# ============================================================================ set criterion


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise focal loss (Lin et al. 2017) on sigmoid logits: α_t (1 - p_t)^γ BCE(logit, t)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def num_boxes_normaliser(num_targets: torch.Tensor) -> torch.Tensor:
    """DETR's num_boxes as a device scalar (float32): the batch's targets summed over ranks (when
    torch.distributed is initialised) / world size, clamped at 1."""
    total = num_targets.sum().to(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        total = total / torch.distributed.get_world_size()
    return total.clamp(min=1)


_LAYER_SUFFIX = re.compile(r"_\d+$")


def weighted_total(losses: Mapping[str, torch.Tensor], weight_dict: Mapping[str, float]):
    """Σ weight · loss, a key's weight found by its name without the aux-layer suffix
    ("loss_giou_3" -> weight_dict["loss_giou"]); keys without a weight are left out."""
    total = None
    for key, value in losses.items():
        weight = weight_dict.get(key, weight_dict.get(_LAYER_SUFFIX.sub("", key)))
        if weight:
            total = weight * value if total is None else total + weight * value
    return total


class SetCriterion(nn.Module):
    """DETR's set loss on padded targets (nothing read on the host when the solver kernel runs).

    For the final layer and (when the outputs have them) each of `aux_outputs`, with its own
    matching: loss_ce (+ "_i" for aux layer i), loss_bbox, loss_giou.
      class_loss "ce" (DETR / UP-DETR): cross-entropy over all (B, Q) slots, unmatched slots target
          the no-object class (index num_classes), class weights 1 and `eos_coef` for no-object,
          torch's weighted mean Σ w_y·nll / Σ w_y.
      class_loss "focal" (Deformable DETR / DETReg): sigmoid focal loss (α, γ) against one-hot
          labels (no-object = all zeros), `.mean(1).sum() / num_boxes * Q`.
      loss_bbox = Σ_matched |b - b̂|_1 / num_boxes; loss_giou = Σ_matched (1 - GIoU) / num_boxes.
    num_boxes = `num_boxes_normaliser(num_targets)`. Default weights: ce {loss_ce 1, loss_bbox 5,
    loss_giou 2} (UP-DETR), focal {loss_ce 2, loss_bbox 5, loss_giou 2} (DETReg).

    forward(outputs, targets {"boxes" (B, T, 4) cxcywh, "labels" (B, T), "num_targets" (B,)}) ->
    (losses dict, final-layer Matching, [Matching per aux layer]); `total(losses)` applies
    `weight_dict` (method losses such as "loss_feature" are weighted when the dict names them).
    Also stored: `self.num_boxes` of the last call, for the methods' own matched losses.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher,
                 weight_dict: Mapping[str, float] | None = None, eos_coef: float = 0.1,
                 class_loss: str = "ce", focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if class_loss not in ("ce", "focal"):
            raise ValueError(f"class_loss must be 'ce' or 'focal', got {class_loss!r}")
        self.num_classes, self.matcher, self.class_loss = num_classes, matcher, class_loss
        self.eos_coef, self.focal_alpha, self.focal_gamma = eos_coef, focal_alpha, focal_gamma
        if weight_dict is None:
            weight_dict = {"loss_ce": 1.0 if class_loss == "ce" else 2.0, "loss_bbox": 5.0,
                           "loss_giou": 2.0}
        self.weight_dict = dict(weight_dict)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.num_boxes: torch.Tensor | None = None

    def _class_loss(self, logits, labels, matching):
        _, q, c = logits.shape
        target_classes = matching.scatter_queries(labels, q, self.num_classes)    # (B, Q)
        if self.class_loss == "ce":
            if c != self.num_classes + 1:
                raise ValueError(f"cross-entropy needs num_classes + 1 = {self.num_classes + 1} "
                                 f"logits, got {c}")
            return F.cross_entropy(logits.transpose(1, 2), target_classes,
                                   weight=self.empty_weight.to(logits.dtype))
        if c != self.num_classes:
            raise ValueError(f"the focal loss needs num_classes = {self.num_classes} logits, got {c}")
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
        return loss.mean(1).sum() / self.num_boxes * q

    def layer_losses(self, outputs, boxes, labels, valid, matching) -> dict[str, torch.Tensor]:
        """One layer's three losses given its matching (targets sanitised, `self.num_boxes` set).
        Computed in float32 whatever the outputs' dtype (they are small)."""
        matched = matching.gather(outputs["pred_boxes"].float())                   # (B, T, 4)
        l1 = (matched - boxes).abs().sum(-1)
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(matched),
                                               box_cxcywh_to_xyxy(boxes))
        zero = l1.new_zeros(())
        return {
            "loss_ce": self._class_loss(outputs["pred_logits"].float(), labels, matching),
            "loss_bbox": torch.where(valid, l1, zero).sum() / self.num_boxes,
            "loss_giou": torch.where(valid, 1 - giou, zero).sum() / self.num_boxes,
        }

    def forward(self, outputs: Mapping, targets: Mapping[str, torch.Tensor]):
        boxes, labels, num_targets, valid = _sanitised_targets(targets,
                                                               outputs["pred_logits"].shape[1])
        self.num_boxes = num_boxes_normaliser(num_targets)
        boxes = boxes.float()
        matching = self.matcher(outputs, targets)
        losses = self.layer_losses(outputs, boxes, labels, valid, matching)
        aux_matchings = []
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            aux_matching = self.matcher(aux, targets)
            aux_matchings.append(aux_matching)
            for key, value in self.layer_losses(aux, boxes, labels, valid, aux_matching).items():
                losses[f"{key}_{i}"] = value
        return losses, matching, aux_matchings

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(losses, self.weight_dict)


__all__ = [
    "DETR",
    "MLP",
    "Backbone",
    "DeformableDETR",
    "DeformableTransformer",
    "FrozenBatchNorm2d",
    "HungarianMatcher",
    "Joiner",
    "MSDeformAttn",
    "Matching",
    "PositionEmbeddingSine",
    "SetCriterion",
    "Transformer",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "batched_linear_sum_assignment",
    "convert_frozen_batchnorm",
    "inverse_sigmoid",
    "ms_deform_attn_dispatch",
    "num_boxes_normaliser",
    "pad_targets",
    "resize_mask",
    "sigmoid_focal_loss",
    "valid_targets",
    "weighted_total",
]
