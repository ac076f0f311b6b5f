"""UniGrad loss as used by Siamese Image Modeling: the released dense form and the paper's form.

Shapes and dtypes
    pred, target  (B, N, C) or (M, C), same shape, any float dtype (fp32/bf16/fp16), any strides.
                  Everything is computed in fp32 with autocast disabled, as SIM does. `target` is a
                  constant (detached); gradients flow to `pred` only. Returns a 0-d fp32 tensor.
    covariance    optional precomputed negatives' correlation: (C, C) for form="dense",
                  (F_global, F_dense) for form="paper" (as returned by unigrad_covariance).

Dense form (SIM spec section 6.2, the default and the released recipe). Flatten to R rows:
    t = LayerNorm_noaffine(target, eps=1e-5)   (if normalize_target; per row, across C)
    F = (1/R) sum_r t_r t_r^T                  (C x C, fp32, no grad; averaged over ranks)
    L = (1/C) [ (1/R) sum_r |p_r - t_r|^2 + lambda (1/R) sum_r p_r^T F p_r ],   lambda = neg_weight
    dL/dP = 2 (P - T + lambda P F) / (R C)
The negative term is evaluated row-wise as rowdot(P F, P), never as diag(P F P^T): the N x N
matrix of the released code is 2.3 GiB at 128 images per GPU and impossible on one GPU.

Distributed: when torch.distributed is initialised, F (each rank's mean over its own rows) is
all-reduced (SUM over `process_group`, default group if None) and divided by the group's size, so F
is the mean over the global batch (ranks hold equal row counts, as in SIM). A `covariance` passed in
is used as is (no all-reduce): that is how gradient accumulation gets one F for the whole
accumulated batch -- the caller runs unigrad_covariance over all micro-batch targets (or averages
per-micro-batch F's of equal size) and passes it to every micro-batch's loss. With equal
micro-batches, mean_i loss(micro_i, F_full) == loss(full batch).

Paper form (SIM spec section 12; needs (B, N, C)). With t the LayerNorm-ed target tokens:
    global: p_bar_b = mean_n p_bn, t_bar_b = mean_n t_bn             (B, C)
            F_global = (1/B) sum_b t_bar_b t_bar_b^T
            L_global = (1/C)[ mean_b |p_bar_b - t_bar_b|^2 + lambda mean_b p_bar_b^T F_global p_bar_b ]
    dense:  p~_bn = p_bn - p_bar_b, t~_bn = t_bn - t_bar_b            (per-image token mean removed)
            F_dense = (1/(B N)) sum_bn t~_bn t~_bn^T
            L_dense = (1/C)[ mean_bn |p~ - t~|^2 + lambda mean_bn p~^T F_dense p~ ]
    L = global_weight * L_global + dense_weight * L_dense
The spec gives no values for the paper's alpha_1, alpha_2, so both default to 1.0, and the same
lambda (neg_weight) is used in both terms; the averaged targets are used as they come out of the
per-token LayerNorm (not re-normalised). These are choices of this implementation, not the paper's.

Triton version (backend="triton", or "auto" on CUDA tensors)
    Kernels, in launch order (dense form, covariance not given):
    1. _ug_row_stats_kernel      grid (cdiv(R, 8),): per-row mean / rstd of the target (the
                                 non-affine LayerNorm), fp32, 8 bytes per row. Reads T once.
    2. _ug_covariance_partial_kernel   grid (n_tiles^2, S): F is cut into 128 x 128 tiles
                                 (n_tiles = 6 at C = 768; only the 21 upper-triangle tiles work,
                                 the others exit at once) and the rows into S contiguous splits
                                 (S ~ 2 waves of SMs / 21). A program streams its split in blocks of
                                 32 rows, LayerNorms them on the fly from the row stats and
                                 accumulates t_i^T t_j with tl.dot into an fp32 tile, written as a
                                 per-split partial (S x 21 x 128 x 128 fp32; 16.5 MB on an H100).
    3. _ug_covariance_finalize_kernel  grid (n_tiles, n_tiles): sums the partials over the splits
                                 in a fixed order (deterministic, no atomics), divides by R,
                                 mirrors the upper tiles and symmetrises the diagonal ones, so F is
                                 exactly symmetric. Then the all-reduce (mean over ranks) on F.
    4. _ug_loss_grad_kernel      grid (cdiv(R, 128) * cdiv(C, 128),): one (row block, column
                                 block) of Q = P F per program (K loop over C in steps of 64,
                                 32 for an fp32 pred; F streamed tile by tile from L2; programs
                                 of one row block are adjacent, so P's row block is read from
                                 HBM once), and in the epilogue the same
                                 program loads its P and T tiles (T LayerNorm-ed on the fly), adds
                                 |p - t|^2 + lambda q p over its tile into one fp32 partial, and
                                 writes G = 2(P - T + lambda Q)/(R C) in pred's dtype. The loss is
                                 the (deterministic) torch sum of the partials times 1/(R C).
    Backward: _ug_scale_kernel, grad_pred = grad_loss * G (fp32 multiply, one read of G, one
    write); P is not read again. G is stored in pred's dtype: the reference's gradient reaches a
    bf16 pred rounded to bf16 too, and an fp32 G would double the saved memory.
    A given `covariance` skips kernels 2-3 (it is symmetrised, (F + F^T)/2: same loss value, and
    the gradient 2(P - T + lambda P F_sym)/(R C) is then right even for a non-symmetric F).
    unigrad_covariance(..., backend=) runs kernels 1-3 (plus the image-mean kernel for the paper
    form). The launch parameters live in _CONFIG (H100 defaults, untuned).

    Precision: all accumulation is fp32. Tensor-core operands are bf16; values that are not exact
    in bf16 are split x = hi + lo (both bf16, hi + lo = x to ~16 bits) and multiplied as
    hi*hi + hi*lo + lo*hi ("bf16x3", relative error ~1e-5; half the tensor-core time of tf32x3 on
    paper, and true-fp32 FMA would be no faster than the fp32 cuBLAS reference). F is split
    once on the host (F_hi, F_lo, bf16). A bf16 pred is an exact operand (2 MMAs per product,
    P F_hi + P F_lo); an fp32/fp16 pred, the centred paper-form pred and the LayerNorm-ed target
    are split in registers (3 MMAs). Under TRITON_INTERPRET=1 (CPU) the bf16 rounding (to nearest
    even) is emulated with integer ops on the fp32 bits (the interpreter's bf16 arithmetic is
    wrong) and the MMAs are fp32 matmuls of the bf16-exact pieces, so the same sums are exercised.

    Paper form, by composition: _ug_image_mean_kernel (grid (B, cdiv(C, 128))) gives p_bar and
    t_bar (fp32, B x C; t_bar from the LayerNorm-ed rows, using the row stats); the global part runs
    kernels 2-4 on those (B x C) rows (G_global, fp32); the dense part runs kernels 2-4 on P and T
    with the per-image means subtracted on the fly (no centred copy is made), and kernel 4 adds
    global_weight * G_global[b] / N to every row of image b, so the saved gradient is the whole
    gradient. (d L_dense / d p = G~ exactly: the per-image mean of G~ is zero because p~ and t~ have
    zero per-image means, so the centring's projection drops out.)

Roofline (recipe: 128 images per GPU, R = 128*196 = 25,088 rows, C = 768):
    F = T^T T is 2 R C^2 = 29.6 GFLOP, Q = P F another 29.6 GFLOP; the rest is O(R C).
    Bytes: read P and T once (77 MB each in fp32, 38.5 MB in bf16), write dL/dP (same size as P)
    and F (2.4 MB). A fused kernel writes the gradient in the forward pass (it is
    2(P - T + lambda Q)/(RC), nothing the backward needs to recompute), so P is read exactly once.
    The Triton path moves from HBM: T three times (stats, F, epilogue; the re-reads of P and T row
    blocks across column tiles hit L2), P once, G written once, backward G read + grad written:
    at bf16 ~5 x 38.5 MB forward + 2 x 38.5 MB backward. MMA work: F 3 x 17.3 GFLOP (21 of 36 tiles,
    bf16x3), Q 2 x 29.6 GFLOP (bf16 pred) or 3 x 29.6 (fp32 pred), all bf16 tensor-core FLOPs.
    Extra memory: G (size of P), the covariance partials (S * 21 * 64 KiB), F + F_hi + F_lo
    (4.7 MB), row stats (8 R bytes): ~60 MB (1.6 x size(P)) at bf16 B = 128 against a budget of
    1.2 x (size(P) + size(T)) = 92 MB; no fp32 copy of P or T is made. (A non-contiguous pred or
    target is read through its strides, never copied.)
"""
import os

import torch
import torch.nn.functional as F_nn

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton
    import triton.language as tl
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
_FORMS = ("dense", "paper")
_TARGET_LAYERNORM_EPS = 1e-5  # SIM's teacher_norm


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device):
    """Called after validation. 'auto': Triton on CUDA tensors where triton imports, else the
    reference. 'triton' runs the kernels on CUDA tensors, or on CPU tensors under the interpreter
    (TRITON_INTERPRET=1); anywhere else it raises instead of silently running something else."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if _TRITON_IMPORTABLE and device.type == "cuda" else "reference"
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which cannot be "
                           f"imported here; use backend='auto' or backend='reference'")
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return "triton"
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type} tensors); "
                       f"CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")


def _fp32_region(device):
    """Autocast off: SIM computes the loss and F in true fp32 whatever the surrounding AMP does."""
    # Only CUDA and CPU autocast can be active around this code; other device types use the CPU one.
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _all_reduce_mean_(tensor, process_group):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=process_group)
        tensor /= torch.distributed.get_world_size(process_group)
    return tensor


def _check_form(op_name, form):
    if form not in _FORMS:
        raise ValueError(f"{op_name}: form must be one of {_FORMS}, got {form!r}")


def _check_features(op_name, name, value, form):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{op_name}: {name} must be a floating tensor, got {value.dtype}")
    if form == "paper" and value.dim() != 3:
        raise ValueError(f"{op_name}: {name} must have shape (B, N, C) for form='paper' (it averages "
                         f"over each image's tokens), got {tuple(value.shape)}")
    if value.dim() not in (2, 3):
        raise ValueError(f"{op_name}: {name} must have shape (B, N, C) or (M, C), "
                         f"got {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{op_name}: {name} must not be empty, got {tuple(value.shape)}")


def _check_covariance_matrix(op_name, name, value, channels, device):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point() or tuple(value.shape) != (channels, channels):
        raise ValueError(f"{op_name}: {name} must be a float tensor of shape (C, C) = "
                         f"({channels}, {channels}), got {value.dtype} {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{op_name}: {name} must be on the same device as pred ({device}), "
                         f"got {value.device}")


def _validate_unigrad_covariance(target, form):
    _check_form("unigrad_covariance", form)
    _check_features("unigrad_covariance", "target", target, form)


def _validate_unigrad_loss(pred, target, neg_weight, covariance, form, global_weight, dense_weight):
    op = "unigrad_loss"
    _check_form(op, form)
    _check_features(op, "pred", pred, form)
    _check_features(op, "target", target, form)
    if pred.shape != target.shape:
        raise ValueError(f"{op}: target must have the same shape as pred {tuple(pred.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != pred.device:
        raise ValueError(f"{op}: target must be on the same device as pred ({pred.device}), "
                         f"got {target.device}")
    for name, value in (("neg_weight", neg_weight), ("global_weight", global_weight),
                        ("dense_weight", dense_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{op}: {name} must be a real number, got {value!r}")
    if covariance is None:
        return
    channels = pred.shape[-1]
    if form == "dense":
        _check_covariance_matrix(op, "covariance", covariance, channels, pred.device)
    else:
        if not isinstance(covariance, (tuple, list)) or len(covariance) != 2:
            raise ValueError(f"{op}: covariance must be a pair (F_global, F_dense) for form='paper', "
                             f"got {type(covariance).__name__}")
        _check_covariance_matrix(op, "covariance[0] (F_global)", covariance[0], channels, pred.device)
        _check_covariance_matrix(op, "covariance[1] (F_dense)", covariance[1], channels, pred.device)


def _normalized_target(target, normalize_target):
    target = target.detach().to(torch.float32)
    if normalize_target:
        target = F_nn.layer_norm(target, (target.shape[-1],), eps=_TARGET_LAYERNORM_EPS)
    return target


def _second_moment(rows):
    """(1/R) rows^T rows, symmetrised so that d(p^T F p)/dp is exactly 2 F p."""
    moment = rows.t() @ rows / rows.shape[0]
    return (moment + moment.t()) * 0.5


def _centred_paper_terms(tokens):
    """Split (B, N, C) into the per-image token mean (B, C) and the mean-removed tokens."""
    image_mean = tokens.mean(dim=1)
    return image_mean, tokens - image_mean[:, None, :]


def _covariance_from_normalized(target, form, process_group):
    channels = target.shape[-1]
    if form == "dense":
        covariance = _second_moment(target.reshape(-1, channels))
        return _all_reduce_mean_(covariance, process_group)
    image_mean, centred = _centred_paper_terms(target)
    global_cov = _all_reduce_mean_(_second_moment(image_mean), process_group)
    dense_cov = _all_reduce_mean_(_second_moment(centred.reshape(-1, channels)), process_group)
    return global_cov, dense_cov


def _rowwise_unigrad(pred_rows, target_rows, covariance, neg_weight):
    """[mean_r |p_r - t_r|^2 + lambda mean_r rowdot(P F, P)] / C for (R, C) fp32 rows."""
    channels = pred_rows.shape[-1]
    residual = pred_rows - target_rows
    negatives = pred_rows @ covariance  # Q = P F, (R, C): the only C x C-sized work per row
    per_row = residual.pow(2).sum(dim=-1) + neg_weight * (negatives * pred_rows).sum(dim=-1)
    return per_row.mean() / channels


def unigrad_loss_reference(pred, target, neg_weight=0.02, normalize_target=True, process_group=None,
                           covariance=None, form="dense", global_weight=1.0, dense_weight=1.0):
    """Plain-PyTorch definition of unigrad_loss (see the module docstring). Inputs are not validated."""
    with _fp32_region(pred.device):
        channels = pred.shape[-1]
        target = _normalized_target(target, normalize_target)
        pred = pred.to(torch.float32)
        if covariance is None:
            with torch.no_grad():
                covariance = _covariance_from_normalized(target, form, process_group)
        if form == "dense":
            return _rowwise_unigrad(pred.reshape(-1, channels), target.reshape(-1, channels),
                                    covariance.detach().to(torch.float32), neg_weight)
        global_cov, dense_cov = (c.detach().to(torch.float32) for c in covariance)
        pred_mean, pred_centred = _centred_paper_terms(pred)
        target_mean, target_centred = _centred_paper_terms(target)
        global_loss = _rowwise_unigrad(pred_mean, target_mean, global_cov, neg_weight)
        dense_loss = _rowwise_unigrad(pred_centred.reshape(-1, channels),
                                      target_centred.reshape(-1, channels), dense_cov, neg_weight)
        return global_weight * global_loss + dense_weight * dense_loss


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

# Launch parameters: H100 defaults, not tuned on a GPU yet. They were checked by compiling every
# kernel variant for sm_90 offline (recipe-shape specialisations: unit channel stride, 16-divisible
# sizes): wgmma + cp.async pipelining, no register spills, shared memory <= 180 KB. Every block
# that feeds tl.dot is clamped to [16, next_power_of_2(extent)]; the tests shrink them to 16 to
# exercise the multi-tile paths.
_CONFIG = {
    "stats": {"BLOCK_R": 8, "BLOCK_C": 1024, "num_warps": 8},
    # waves: the row splits are chosen so that n_upper_tiles * S ~ waves * SM count.
    # BLOCK_R = 64 spills nothing either but needs 312 KB of shared memory for centred fp32 rows.
    "covariance": {"BLOCK_R": 32, "BLOCK_C": 128, "num_warps": 8, "num_stages": 3, "waves": 2,
                   "interpret_splits": 3},
    "finalize": {"num_warps": 8},
    # BLOCK_K_FP32: the K step for a pred with 4-byte elements (the fp32 A tiles are pipelined
    # through shared memory too: 196 KB at K = 64). BLOCK_N_CENTRED: the paper form's centred
    # dense part, which spills at 128 x 128.
    "loss": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_N_CENTRED": 64, "BLOCK_K": 64,
             "BLOCK_K_FP32": 32, "num_warps": 8, "num_stages": 3},
    "image_mean": {"BLOCK_N": 32, "BLOCK_C": 128, "num_warps": 4},
    "scale": {"BLOCK": 4096, "num_warps": 8},
}

_SM_COUNT = {}


def _new_buffer(shape, dtype, device):
    """Every buffer the Triton path writes comes from here (uninitialised; the kernels overwrite
    all of it that is read later -- the tests poison it through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _mma_block(configured, extent):
    return max(16, min(configured, triton.next_power_of_2(extent)))


def _row_layout(x):
    """(images, tokens, stride_b, stride_n, stride_c) without copying: row r of the flattened
    (R, C) view is token r % tokens of image r // tokens. An (M, C) tensor is one image of M rows."""
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1), x.stride(2)
    return 1, x.shape[0], 0, x.stride(0), x.stride(1)


def _sm_count(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


class _on_device:
    """Launch on the tensors' GPU (Triton launches on the current device)."""

    def __init__(self, device):
        self._guard = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self._guard is not None:
            self._guard.__enter__()

    def __exit__(self, *exc):
        if self._guard is not None:
            self._guard.__exit__(*exc)


if _TRITON_IMPORTABLE:

    @triton.jit
    def _ug_round_to_bf16_bits(x):
        """fp32 -> the nearest bf16 value (ties to even), kept as fp32: the GPU's cvt.rn.bf16.f32,
        emulated with integer ops for the interpreter (finite inputs only)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)

    @triton.jit
    def _ug_store_cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """x (fp32) in the output dtype, rounded to nearest (the interpreter's fp32 -> bf16
        conversion truncates, so it is given a value that is already bf16-exact)."""
        if INTERPRET and dtype == tl.bfloat16:
            x = _ug_round_to_bf16_bits(x)
        return x.to(dtype)

    @triton.jit
    def _ug_split_bf16(x, INTERPRET: tl.constexpr):
        """fp32 x -> (hi, lo), bf16 MMA operands with hi + lo = x to ~16 significant bits."""
        if INTERPRET:  # the interpreter's bf16 is wrong: bf16-exact values kept in fp32
            hi = _ug_round_to_bf16_bits(x)
            lo = _ug_round_to_bf16_bits(x - hi)
        else:
            hi = x.to(tl.bfloat16)
            lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
        return hi, lo

    @triton.jit
    def _ug_mma_operand(x, INTERPRET: tl.constexpr):
        """A bf16 tile as an MMA operand (fp32 under the interpreter, whose bf16 dot is wrong)."""
        if INTERPRET:
            y = x.to(tl.float32)
        else:
            y = x
        return y

    @triton.jit
    def _ug_row_offsets(rows, n_tokens, stride_b, stride_n):
        rows64 = rows.to(tl.int64)
        return (rows64 // n_tokens) * stride_b + (rows64 % n_tokens) * stride_n

    @triton.jit
    def _ug_rows_tile(x_ptr, mean_ptr, rstd_ptr, centre_ptr, rows, row_mask, cols, col_mask,
                      n_tokens, stride_b, stride_n, stride_c, channels,
                      NORMALIZE: tl.constexpr, CENTRED: tl.constexpr):
        """fp32 tile of LayerNorm(x) (if NORMALIZE) minus the per-image centre (if CENTRED) at
        (rows, cols); exactly 0 outside the masks."""
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = (_ug_row_offsets(rows, n_tokens, stride_b, stride_n)[:, None]
                   + cols[None, :].to(tl.int64) * stride_c)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            x = (x - mean[:, None]) * rstd[:, None]
        if CENTRED:
            image = (rows // n_tokens).to(tl.int64)
            x = x - tl.load(centre_ptr + image[:, None] * channels + cols[None, :], mask=mask,
                            other=0.0)
        return tl.where(mask, x, 0.0)

    @triton.jit
    def _ug_row_stats_kernel(x_ptr, mean_ptr, rstd_ptr, n_rows, channels, n_tokens,
                             stride_b, stride_n, stride_c, eps,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-row mean and 1/sqrt(biased var + eps) (two passes; the second hits L1/L2)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        row_offsets = _ug_row_offsets(rows, n_tokens, stride_b, stride_n)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < channels)[None, :]
            x = tl.load(x_ptr + row_offsets[:, None] + cols[None, :].to(tl.int64) * stride_c,
                        mask=mask, other=0.0).to(tl.float32)
            total += tl.sum(x, axis=1)
        mean = total / channels
        squares = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < channels)[None, :]
            x = tl.load(x_ptr + row_offsets[:, None] + cols[None, :].to(tl.int64) * stride_c,
                        mask=mask, other=0.0).to(tl.float32)
            centred = tl.where(mask, x - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt_rn(squares / channels + eps)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    @triton.jit
    def _ug_covariance_partial_kernel(x_ptr, mean_ptr, rstd_ptr, centre_ptr, partial_ptr,
                                      n_rows, channels, n_tokens, stride_b, stride_n, stride_c,
                                      rows_per_split, n_tiles, n_upper,
                                      NORMALIZE: tl.constexpr, CENTRED: tl.constexpr,
                                      SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
                                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """partial[split, u(i, j)] = sum over the split's rows of t[:, tile i]^T t[:, tile j], for
        the upper-triangle tile pairs i <= j (the lower ones run zero iterations, store nothing)."""
        pair = tl.program_id(0)
        split = tl.program_id(1)
        tile_i = pair // n_tiles
        tile_j = pair % n_tiles
        upper = tile_i <= tile_j
        row_start = split * rows_per_split
        row_stop = tl.minimum(row_start + rows_per_split, n_rows)
        n_steps = tl.where(upper, tl.cdiv(row_stop - row_start, BLOCK_R), 0)
        cols_i = tile_i * BLOCK_C + tl.arange(0, BLOCK_C)
        cols_j = tile_j * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_i = cols_i < channels
        mask_j = cols_j < channels
        acc = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
        for step in range(0, n_steps):
            rows = row_start + step * BLOCK_R + tl.arange(0, BLOCK_R)
            row_mask = rows < row_stop
            if SPLIT:
                t_i = _ug_rows_tile(x_ptr, mean_ptr, rstd_ptr, centre_ptr, rows, row_mask, cols_i,
                                    mask_i, n_tokens, stride_b, stride_n, stride_c, channels,
                                    NORMALIZE, CENTRED)
                t_j = _ug_rows_tile(x_ptr, mean_ptr, rstd_ptr, centre_ptr, rows, row_mask, cols_j,
                                    mask_j, n_tokens, stride_b, stride_n, stride_c, channels,
                                    NORMALIZE, CENTRED)
                hi_i, lo_i = _ug_split_bf16(t_i, INTERPRET)
                hi_j, lo_j = _ug_split_bf16(t_j, INTERPRET)
                acc = tl.dot(tl.trans(hi_i), hi_j, acc)
                acc = tl.dot(tl.trans(hi_i), lo_j, acc)
                acc = tl.dot(tl.trans(lo_i), hi_j, acc)
            else:  # raw bf16 rows (no LayerNorm, no centring): exact MMA operands
                row_offsets = _ug_row_offsets(rows, n_tokens, stride_b, stride_n)
                x_i = tl.load(x_ptr + row_offsets[:, None] + cols_i[None, :].to(tl.int64) * stride_c,
                              mask=row_mask[:, None] & mask_i[None, :], other=0.0)
                x_j = tl.load(x_ptr + row_offsets[:, None] + cols_j[None, :].to(tl.int64) * stride_c,
                              mask=row_mask[:, None] & mask_j[None, :], other=0.0)
                acc = tl.dot(tl.trans(_ug_mma_operand(x_i, INTERPRET)),
                             _ug_mma_operand(x_j, INTERPRET), acc)
        upper_index = tile_i * n_tiles - (tile_i * (tile_i - 1)) // 2 + (tile_j - tile_i)
        lanes = tl.arange(0, BLOCK_C)
        offsets = ((split * n_upper + upper_index).to(tl.int64) * (BLOCK_C * BLOCK_C)
                   + lanes[:, None] * BLOCK_C + lanes[None, :])
        store_mask = (lanes[:, None] < BLOCK_C) & (lanes[None, :] < BLOCK_C) & upper
        tl.store(partial_ptr + offsets, acc, mask=store_mask)

    @triton.jit
    def _ug_covariance_finalize_kernel(partial_ptr, out_ptr, channels, n_splits, n_tiles, n_upper,
                                       inv_rows, BLOCK_C: tl.constexpr):
        """F tile (i, j) = (1/R) sum_s partial[s, u(min, max)], mirrored below the diagonal and
        symmetrised on it; the sum over splits runs in a fixed order (deterministic)."""
        tile_i = tl.program_id(0)
        tile_j = tl.program_id(1)
        low = tl.minimum(tile_i, tile_j)
        high = tl.maximum(tile_i, tile_j)
        upper_index = low * n_tiles - (low * (low - 1)) // 2 + (high - low)
        lanes = tl.arange(0, BLOCK_C)
        tile_offsets = lanes[:, None] * BLOCK_C + lanes[None, :]
        acc = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
        for split in range(0, n_splits):
            base = (split * n_upper + upper_index).to(tl.int64) * (BLOCK_C * BLOCK_C)
            acc += tl.load(partial_ptr + base + tile_offsets)
        acc_t = tl.trans(acc)
        mirrored = tl.where(tile_i < tile_j, acc, acc_t)
        value = tl.where(tile_i == tile_j, (acc + acc_t) * 0.5, mirrored) * inv_rows
        rows = tile_i * BLOCK_C + lanes
        cols = tile_j * BLOCK_C + lanes
        mask = (rows < channels)[:, None] & (cols < channels)[None, :]
        tl.store(out_ptr + rows[:, None] * channels + cols[None, :], value, mask=mask)

    @triton.jit
    def _ug_loss_grad_kernel(p_ptr, t_ptr, mean_ptr, rstd_ptr, p_centre_ptr, t_centre_ptr,
                             f_hi_ptr, f_lo_ptr, bias_ptr, grad_ptr, partial_ptr,
                             n_rows, channels, n_tokens, p_sb, p_sn, p_sc, t_sb, t_sn, t_sc,
                             n_col_tiles, neg_weight, grad_scale, bias_scale,
                             NORMALIZE: tl.constexpr, CENTRED: tl.constexpr,
                             SPLIT_A: tl.constexpr, HAS_BIAS: tl.constexpr,
                             WRITE_GRAD: tl.constexpr, INTERPRET: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Q = P F for one (row block, column block), then in the epilogue: partial[pid] =
        sum over the tile of |p - t|^2 + lambda q p, and G = grad_scale (P - T + lambda Q)
        (+ bias_scale * bias[image]) written in grad's dtype."""
        pid = tl.program_id(0)
        pid_m = pid // n_col_tiles
        pid_n = pid % n_col_tiles
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < channels
        p_row_offsets = _ug_row_offsets(rows, n_tokens, p_sb, p_sn)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, channels, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < channels
            f_mask = k_mask[:, None] & col_mask[None, :]
            f_offsets = ks[:, None] * channels + cols[None, :]
            f_hi = _ug_mma_operand(tl.load(f_hi_ptr + f_offsets, mask=f_mask, other=0.0), INTERPRET)
            f_lo = _ug_mma_operand(tl.load(f_lo_ptr + f_offsets, mask=f_mask, other=0.0), INTERPRET)
            if SPLIT_A:
                a = _ug_rows_tile(p_ptr, mean_ptr, rstd_ptr, p_centre_ptr, rows, row_mask, ks,
                                  k_mask, n_tokens, p_sb, p_sn, p_sc, channels, False, CENTRED)
                a_hi, a_lo = _ug_split_bf16(a, INTERPRET)
                acc = tl.dot(a_hi, f_hi, acc)
                acc = tl.dot(a_hi, f_lo, acc)
                acc = tl.dot(a_lo, f_hi, acc)
            else:  # bf16 pred: an exact operand
                a = tl.load(p_ptr + p_row_offsets[:, None] + ks[None, :].to(tl.int64) * p_sc,
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                a = _ug_mma_operand(a, INTERPRET)
                acc = tl.dot(a, f_hi, acc)
                acc = tl.dot(a, f_lo, acc)
        p = _ug_rows_tile(p_ptr, mean_ptr, rstd_ptr, p_centre_ptr, rows, row_mask, cols, col_mask,
                          n_tokens, p_sb, p_sn, p_sc, channels, False, CENTRED)
        t = _ug_rows_tile(t_ptr, mean_ptr, rstd_ptr, t_centre_ptr, rows, row_mask, cols, col_mask,
                          n_tokens, t_sb, t_sn, t_sc, channels, NORMALIZE, CENTRED)
        residual = p - t
        # p, t and acc are 0 outside the masks, so the padding adds nothing
        terms = residual * residual + neg_weight * acc * p
        tl.store(partial_ptr + pid, tl.sum(tl.sum(terms, axis=1), axis=0))
        if WRITE_GRAD:
            mask = row_mask[:, None] & col_mask[None, :]
            grad = grad_scale * (residual + neg_weight * acc)
            if HAS_BIAS:
                image = (rows // n_tokens).to(tl.int64)
                grad += bias_scale * tl.load(bias_ptr + image[:, None] * channels + cols[None, :],
                                             mask=mask, other=0.0)
            tl.store(grad_ptr + rows.to(tl.int64)[:, None] * channels + cols[None, :],
                     _ug_store_cast(grad, grad_ptr.dtype.element_ty, INTERPRET), mask=mask)

    @triton.jit
    def _ug_image_mean_kernel(x_ptr, mean_ptr, rstd_ptr, out_ptr, n_tokens, channels,
                              stride_b, stride_n, stride_c, NORMALIZE: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[b] = mean over image b's tokens of LayerNorm(x) (or of x), fp32."""
        image = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < channels
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n0 in range(0, n_tokens, BLOCK_N):
            tokens = n0 + tl.arange(0, BLOCK_N)
            rows = image * n_tokens + tokens
            x = _ug_rows_tile(x_ptr, mean_ptr, rstd_ptr, x_ptr, rows, tokens < n_tokens, cols,
                              col_mask, n_tokens, stride_b, stride_n, stride_c, channels,
                              NORMALIZE, False)
            acc += tl.sum(x, axis=0)
        tl.store(out_ptr + image.to(tl.int64) * channels + cols, acc / n_tokens, mask=col_mask)

    @triton.jit
    def _ug_scale_kernel(grad_ptr, scale_ptr, out_ptr, numel, INTERPRET: tl.constexpr,
                         BLOCK: tl.constexpr):
        """out = scale * grad, multiplied in fp32 (backward: grad_loss * saved G)."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        scale = tl.load(scale_ptr)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, _ug_store_cast(grad * scale, out_ptr.dtype.element_ty, INTERPRET),
                 mask=mask)


def _launch_row_stats(x):
    """Per-row LayerNorm mean and rstd of x (fp32, R each)."""
    images, tokens, stride_b, stride_n, stride_c = _row_layout(x)
    rows, channels = images * tokens, x.shape[-1]
    mean = _new_buffer((rows,), torch.float32, x.device)
    rstd = _new_buffer((rows,), torch.float32, x.device)
    cfg = _CONFIG["stats"]
    block_c = min(cfg["BLOCK_C"], triton.next_power_of_2(channels))
    _ug_row_stats_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
        x, mean, rstd, rows, channels, tokens, stride_b, stride_n, stride_c, _TARGET_LAYERNORM_EPS,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=block_c, num_warps=cfg["num_warps"])
    return mean, rstd


def _covariance_splits(device, n_upper, row_blocks, cfg):
    if device.type == "cuda":
        splits = (cfg["waves"] * _sm_count(device)) // n_upper
    else:
        splits = cfg["interpret_splits"]
    return max(1, min(splits, row_blocks))


def _launch_covariance(x, stats, centre, process_group):
    """F = (1/R) sum_r t_r t_r^T, (C, C) fp32, exactly symmetric, with t_r row r of x LayerNorm-ed
    (stats = (mean, rstd)) and/or minus its image's centre (B, C); all-reduced over ranks."""
    images, tokens, stride_b, stride_n, stride_c = _row_layout(x)
    rows, channels = images * tokens, x.shape[-1]
    cfg = _CONFIG["covariance"]
    block_c = _mma_block(cfg["BLOCK_C"], channels)
    block_r = _mma_block(cfg["BLOCK_R"], rows)
    n_tiles = triton.cdiv(channels, block_c)
    n_upper = n_tiles * (n_tiles + 1) // 2
    row_blocks = triton.cdiv(rows, block_r)
    splits = _covariance_splits(x.device, n_upper, row_blocks, cfg)
    rows_per_split = triton.cdiv(row_blocks, splits) * block_r
    splits = triton.cdiv(rows, rows_per_split)  # no empty split
    partials = _new_buffer((splits, n_upper, block_c, block_c), torch.float32, x.device)
    normalize, centred = stats is not None, centre is not None
    mean, rstd = stats if normalize else (partials, partials)
    exact_rows = x.dtype == torch.bfloat16 and not normalize and not centred
    _ug_covariance_partial_kernel[(n_tiles * n_tiles, splits)](
        x, mean, rstd, centre if centred else partials, partials,
        rows, channels, tokens, stride_b, stride_n, stride_c, rows_per_split, n_tiles, n_upper,
        NORMALIZE=normalize, CENTRED=centred, SPLIT=not exact_rows, INTERPRET=_interpreting(),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    covariance = _new_buffer((channels, channels), torch.float32, x.device)
    _ug_covariance_finalize_kernel[(n_tiles, n_tiles)](
        partials, covariance, channels, splits, n_tiles, n_upper, 1.0 / rows,
        BLOCK_C=block_c, num_warps=_CONFIG["finalize"]["num_warps"])
    return _all_reduce_mean_(covariance, process_group)


def _launch_image_mean(x, stats):
    """(B, C) fp32 per-image token mean of x, of its LayerNorm-ed rows when stats are given."""
    images, tokens, stride_b, stride_n, stride_c = _row_layout(x)
    channels = x.shape[-1]
    out = _new_buffer((images, channels), torch.float32, x.device)
    cfg = _CONFIG["image_mean"]
    block_c = min(cfg["BLOCK_C"], triton.next_power_of_2(channels))
    mean, rstd = stats if stats is not None else (out, out)
    _ug_image_mean_kernel[(images, triton.cdiv(channels, block_c))](
        x, mean, rstd, out, tokens, channels, stride_b, stride_n, stride_c,
        NORMALIZE=stats is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_C=block_c,
        num_warps=cfg["num_warps"])
    return out


def _split_covariance(covariance):
    """F = F_hi + F_lo, both bf16 (the MMA operands of Q = P F)."""
    high = covariance.to(torch.bfloat16)
    low = (covariance - high.to(torch.float32)).to(torch.bfloat16)
    return high, low


def _given_covariance(covariance):
    covariance = covariance.detach().to(torch.float32)
    return (covariance + covariance.t()) * 0.5


def _launch_loss_grad(pred, target, stats, centres, covariance, neg_weight, grad_scale, bias,
                      bias_scale, write_grad):
    """(partials, grad): fp32 per-program sums of |p - t|^2 + lambda <q, p>, and (if write_grad)
    G = grad_scale (P - T + lambda P F) + bias_scale bias[image] as (R, C) in pred's dtype."""
    images, tokens, p_sb, p_sn, p_sc = _row_layout(pred)
    _, _, t_sb, t_sn, t_sc = _row_layout(target)
    rows, channels = images * tokens, pred.shape[-1]
    cfg = _CONFIG["loss"]
    block_m = _mma_block(cfg["BLOCK_M"], rows)
    block_n = _mma_block(cfg["BLOCK_N_CENTRED" if centres is not None else "BLOCK_N"], channels)
    block_k = _mma_block(cfg["BLOCK_K_FP32" if pred.element_size() == 4 else "BLOCK_K"], channels)
    n_col_tiles = triton.cdiv(channels, block_n)
    n_programs = triton.cdiv(rows, block_m) * n_col_tiles
    partials = _new_buffer((n_programs,), torch.float32, pred.device)
    grad = _new_buffer((rows, channels), pred.dtype, pred.device) if write_grad else partials
    f_hi, f_lo = _split_covariance(covariance)
    normalize, centred = stats is not None, centres is not None
    mean, rstd = stats if normalize else (partials, partials)
    p_centre, t_centre = centres if centred else (partials, partials)
    _ug_loss_grad_kernel[(n_programs,)](
        pred, target, mean, rstd, p_centre, t_centre, f_hi, f_lo,
        bias if bias is not None else partials, grad, partials,
        rows, channels, tokens, p_sb, p_sn, p_sc, t_sb, t_sn, t_sc, n_col_tiles,
        float(neg_weight), float(grad_scale), float(bias_scale),
        NORMALIZE=normalize, CENTRED=centred, SPLIT_A=centred or pred.dtype != torch.bfloat16,
        HAS_BIAS=bias is not None, WRITE_GRAD=write_grad, INTERPRET=_interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return partials, (grad if write_grad else None)


def _launch_scale(grad, scale):
    out = _new_buffer(grad.shape, grad.dtype, grad.device)
    cfg = _CONFIG["scale"]
    numel = grad.numel()
    _ug_scale_kernel[(triton.cdiv(numel, cfg["BLOCK"]),)](
        grad, scale.detach().to(torch.float32).reshape(1), out, numel, INTERPRET=_interpreting(),
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return out


def _triton_covariance(target, normalize_target, form, process_group):
    stats = _launch_row_stats(target) if normalize_target else None
    if form == "dense":
        return _launch_covariance(target, stats, None, process_group)
    target_mean = _launch_image_mean(target, stats)
    return (_launch_covariance(target_mean, None, None, process_group),
            _launch_covariance(target, stats, target_mean, process_group))


def _triton_forward(pred, target, neg_weight, normalize_target, process_group, covariance, form,
                    global_weight, dense_weight, write_grad):
    """(loss, G or None): the whole UniGrad forward; G is dL/dpred as (R, C) in pred's dtype."""
    channels = pred.shape[-1]
    rows = pred.numel() // channels
    stats = _launch_row_stats(target) if normalize_target else None
    if form == "dense":
        if covariance is None:
            covariance = _launch_covariance(target, stats, None, process_group)
        else:
            covariance = _given_covariance(covariance)
        partials, grad = _launch_loss_grad(pred, target, stats, None, covariance, neg_weight,
                                           2.0 / (rows * channels), None, 0.0, write_grad)
        return partials.sum() * (1.0 / (rows * channels)), grad
    images, tokens = pred.shape[0], pred.shape[1]
    pred_mean = _launch_image_mean(pred, None)
    target_mean = _launch_image_mean(target, stats)
    if covariance is None:
        global_cov = _launch_covariance(target_mean, None, None, process_group)
        dense_cov = _launch_covariance(target, stats, target_mean, process_group)
    else:
        global_cov, dense_cov = (_given_covariance(c) for c in covariance)
    global_partials, global_grad = _launch_loss_grad(
        pred_mean, target_mean, None, None, global_cov, neg_weight,
        2.0 * global_weight / (images * channels), None, 0.0, write_grad)
    # d p_bar_b / d p_bn = 1/N: the global gradient reaches every token of its image
    dense_partials, grad = _launch_loss_grad(
        pred, target, stats, (pred_mean, target_mean), dense_cov, neg_weight,
        2.0 * dense_weight / (rows * channels), global_grad, 1.0 / tokens, write_grad)
    loss = (global_partials.sum() * (global_weight / (images * channels))
            + dense_partials.sum() * (dense_weight / (rows * channels)))
    return loss, grad


class _UniGradLossFunction(torch.autograd.Function):
    """Forward computes the loss and dL/dpred together; backward only scales the saved gradient."""

    @staticmethod
    def forward(ctx, pred, target, neg_weight, normalize_target, process_group, covariance, form,
                global_weight, dense_weight, write_grad):
        with _fp32_region(pred.device), _on_device(pred.device):
            loss, grad = _triton_forward(pred, target, neg_weight, normalize_target, process_group,
                                         covariance, form, global_weight, dense_weight, write_grad)
        if write_grad:
            ctx.save_for_backward(grad)
            ctx.pred_shape = pred.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, = ctx.saved_tensors
        with _on_device(grad.device):
            grad_pred = _launch_scale(grad, grad_loss).view(ctx.pred_shape)
        return grad_pred, None, None, None, None, None, None, None, None, None


def unigrad_covariance(target, normalize_target=True, form="dense", process_group=None,
                       backend="auto"):
    """Negatives' correlation, fp32, no grad: F (C, C) for form='dense', (F_global, F_dense) for
    form='paper' (see the module docstring). All-reduced (mean over ranks) when distributed.
    backend='triton' runs the row-stats / covariance kernels (fp32 accumulation, deterministic)."""
    _check_backend_name("unigrad_covariance", backend)
    _validate_unigrad_covariance(target, form)
    if _select_backend("unigrad_covariance", backend, target.device) == "triton":
        with torch.no_grad(), _fp32_region(target.device), _on_device(target.device):
            return _triton_covariance(target.detach(), normalize_target, form, process_group)
    with torch.no_grad(), _fp32_region(target.device):
        return _covariance_from_normalized(_normalized_target(target, normalize_target), form,
                                           process_group)


def unigrad_loss(pred, target, neg_weight=0.02, normalize_target=True, process_group=None,
                 covariance=None, form="dense", global_weight=1.0, dense_weight=1.0, backend="auto"):
    """UniGrad loss (fp32 scalar); gradient w.r.t. pred only. See the module docstring.
    The Triton path (backend='triton', or 'auto' on CUDA) computes the gradient in the forward pass
    and keeps it (pred's dtype, pred's size) until backward."""
    _check_backend_name("unigrad_loss", backend)
    _validate_unigrad_loss(pred, target, neg_weight, covariance, form, global_weight, dense_weight)
    if _select_backend("unigrad_loss", backend, pred.device) == "triton":
        write_grad = torch.is_grad_enabled() and pred.requires_grad
        return _UniGradLossFunction.apply(pred, target.detach(), float(neg_weight),
                                          bool(normalize_target), process_group, covariance, form,
                                          float(global_weight), float(dense_weight), write_grad)
    return unigrad_loss_reference(pred, target, neg_weight, normalize_target, process_group,
                                  covariance, form, global_weight, dense_weight)
