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
is the mean over the global batch (ranks hold equal row counts, as in SIM). The all-reduce is done
by the public functions (unigrad_covariance, and unigrad_loss when it makes F itself), on the
output of densesim::unigrad_covariance, never inside a registered op. A `covariance` passed in is
used as is (no all-reduce): that is how gradient accumulation gets one F for the whole accumulated
batch -- the caller (engine/methods/sim.py) runs unigrad_covariance over all micro-batch targets
(all-reduced there) and passes it to every micro-batch's loss. With equal micro-batches,
mean_i loss(micro_i, F_full) == loss(full batch).

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

Registered ops (namespace densesim, torch.library.custom_op, device_types cpu and cuda; fake
implementations for torch.compile / FakeTensor / meta tensors; the CPU and the CUDA
implementation are one function that runs the reference maths, or the Triton launchers when
use_triton is set -- CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):
    densesim::unigrad_covariance(Tensor target, bool normalize_target, str form, bool use_triton)
        -> Tensor[]   [F] (form="dense") or [F_global, F_dense] (form="paper"), (C, C) fp32 each,
        this rank's rows only (no all-reduce). No autograd (F is a constant).
    densesim::unigrad_loss(Tensor pred, Tensor target, Tensor? covariance,
                           Tensor? covariance_dense, float[] weights, bool normalize_target,
                           str form, bool write_grad, bool use_triton) -> (Tensor loss, Tensor G)
        weights = [neg_weight, global_weight, dense_weight] (one argument, not three: torch's
        custom-op autograd wrapper rebuilds the schema's argument list once per argument on every
        call, O(arguments^2), ~20 us at 9 arguments); covariance None: F from these rows,
        made inside the op; else F (dense) or F_global with covariance_dense = F_dense (paper), a
        caller's matrix, used as (F + F^T)/2 by the gradient (and by the Triton loss). loss: 0-d
        fp32. G: dloss/dpred computed in the forward pass when write_grad (pred's shape,
        contiguous; pred's dtype on the Triton path, fp32 on the reference path), else an empty
        (0,) fp32 tensor. G is not differentiable. Autograd through
        torch.library.register_autograd: setup_context saves G, the backward calls
    densesim::unigrad_loss_backward(Tensor grad, Tensor grad_loss, ScalarType out_dtype,
                                    bool use_triton) -> Tensor
        out_dtype(grad_loss * grad): the fp32 product rounded once, grad's shape, contiguous.
unigrad_loss(backend="auto") calls densesim::unigrad_loss with use_triton=True on CUDA tensors
where triton imports, else with use_triton=False (the reference maths: on CPU "auto" runs the op,
not the plain-autograd function); backend="triton" sets use_triton on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1, and raises a one-line RuntimeError anywhere else;
backend="reference" runs unigrad_loss_reference / the reference covariance (plain torch autograd,
what the `compiled` benchmark compiles and what --no-fused runs). write_grad is set when grad mode
is on and pred requires grad. The reference maths give unigrad_loss_reference's loss bit for bit
(the same ops in the same order) and its gradient in closed form (fp32, to rounding): under
torch.autocast (SIM runs the loss under bf16 autocast) the ops ignore autocast and compute in fp32,
as the reference does, with the same dtypes out (an fp32 loss, a gradient in pred's dtype).

No host sync: nothing on the hot path reads a tensor value on the host (no .item(), no
data-dependent shapes, no `if tensor`); the inputs are checked for shape, dtype and device only,
with the one-line ValueErrors raised before any launch (tests/host_sync.py counts zero syncs over
forward + backward, both implementations). This op has no value checks (no indices, no flags in
tensors), so there is nothing to check on the device; every Triton load and store is masked to its
tensor's extent whatever the values.

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
                                 exactly symmetric, and writes F (fp32) and, for the loss, its
                                 bf16 split (F_hi, F_lo) from the same values.
    4. _ug_loss_grad_kernel      grid (cdiv(R, 128) * cdiv(C, 128),): one (row block, column
                                 block) of Q = P F per program (K loop over C in steps of 64,
                                 32 for an fp32 pred; F streamed tile by tile from L2; programs
                                 of one row block are adjacent, so P's row block is read from
                                 HBM once), and in the epilogue the same
                                 program loads its P and T tiles (T LayerNorm-ed on the fly), adds
                                 |p - t|^2 + lambda q p over its tile into one fp32 partial, and
                                 writes G = 2(P - T + lambda Q)/(R C) in pred's dtype. The loss is
                                 the (deterministic) torch sum of the partials times 1/(R C).
    Given a covariance (SIM's call: F over the accumulated batch), kernels 2-3 are skipped and
    kernel 1 and the split of F are ONE launch, _ug_prologue_kernel: its first cdiv(R, 8) programs
    compute the row stats (as kernel 1, same blocks), the next ones split
    the caller's F -- read in its own dtype through its strides, symmetrised (F + F^T)/2 in fp32,
    then F_hi, F_lo (the same bits as the torch ops F.float(), (F + F.t()) * 0.5, .to(bf16),
    (F - F_hi.float()).to(bf16)) -- 64 x 64 tiles per program (both F's of the paper form). The
    symmetrisation gives the same loss value and makes the gradient 2(P - T + lambda P F_sym)/(RC)
    right even for a non-symmetric F. So SIM's step is 2 Triton launches + 2 tiny torch ops
    (the sum and scale of the partials) forward, 1 launch backward.
    Backward: _ug_scale_kernel, grad_pred = grad_loss * G (fp32 multiply, one read of G, one
    write); P is not read again. G is stored in pred's dtype: the reference's gradient reaches a
    bf16 pred rounded to bf16 too, and an fp32 G would double the saved memory. (It stays a Triton
    kernel: an aten bf16 x 0-d-fp32-CUDA-tensor multiply is not guaranteed to multiply by the fp32
    value -- TensorIterator's common dtype is bf16.)
    unigrad_covariance(..., backend=) runs kernels 1-3 (plus the image-mean kernel for the paper
    form). The launch parameters live in _CONFIG (H100 defaults, untuned).

    Launch plans: every launch decision (grids, block sizes clamped to the extents, num_warps,
    num_stages, the covariance's row splits from the SM count) comes from a functools.lru_cache'd
    plan keyed on plain Python values: the shapes, the pred's element size, the SM count (0 under
    the interpreter) and the kernel's _CONFIG entry as a tuple (so a patched _CONFIG gets its own
    plan). The kernels' INTERPRET flag is fixed at import (whether triton.jit made interpreted
    functions), the device guard is entered only when the tensors are not on the current device,
    and autocast is only switched off when it is on. No .contiguous() copy and no dtype
    conversion is made of pred, target or a given F: the kernels take any strides and any float
    dtype (only the backward's saved G, always contiguous, is read flat). Offsets into P, T and G
    are int64; F's (C x C) offsets are int32 (2 C^2 < 2^31), so the Triton path takes C <= 32,767
    ("auto" runs the reference above that, "triton" raises).

    Precision: all accumulation is fp32. Tensor-core operands are bf16; values that are not exact
    in bf16 are split x = hi + lo (both bf16, hi + lo = x to ~16 bits) and multiplied as
    hi*hi + hi*lo + lo*hi ("bf16x3", relative error ~1e-5; half the tensor-core time of tf32x3 on
    paper, and true-fp32 FMA would be no faster than the fp32 cuBLAS reference). F is split once
    per call (F_hi, F_lo, bf16; by the finalize or the prologue kernel). A bf16 pred is an exact
    operand (2 MMAs per product, P F_hi + P F_lo); an fp32/fp16 pred, the centred paper-form pred
    and the LayerNorm-ed target are split in registers (3 MMAs). Under TRITON_INTERPRET=1 (CPU)
    the bf16 rounding (to nearest even) is emulated with integer ops on the fp32 bits (the
    interpreter's bf16 arithmetic is wrong) and the MMAs are fp32 matmuls of the bf16-exact
    pieces, so the same sums are exercised.

    Paper form, by composition: _ug_image_mean_kernel (grid (B, cdiv(C, 128))) gives p_bar and
    t_bar (fp32, B x C; t_bar from the LayerNorm-ed rows, using the row stats); the global part runs
    kernels 2-4 on those (B x C) rows (G_global, fp32); the dense part runs kernels 2-4 on P and T
    with the per-image means subtracted on the fly (no centred copy is made; given F_global and
    F_dense, both are split by the one prologue launch instead of kernels 2-3), and kernel 4 adds
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
    (4.7 MB; F_hi + F_lo only, 2.4 MB, for a given F), row stats (8 R bytes): ~60 MB
    (1.6 x size(P)) at bf16 B = 128 against a budget of 1.2 x (size(P) + size(T)) = 92 MB; no
    fp32 copy of P or T is made. (A non-contiguous pred or target is read through its strides,
    never copied.)
"""
import contextlib
import functools
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
_MAX_CHANNELS = 32767  # the Triton kernels' int32 offsets into F and its bf16 split: 2 C^2 < 2^31


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device, channels):
    """Called after validation. 'auto': Triton on CUDA tensors with C <= 32,767 where triton
    imports, else the reference. 'triton' runs the kernels on CUDA tensors, or on CPU tensors under
    the interpreter (TRITON_INTERPRET=1); anywhere else (or a larger C) it raises instead of
    silently running something else."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        fits = _TRITON_IMPORTABLE and device.type == "cuda" and channels <= _MAX_CHANNELS
        return "triton" if fits else "reference"
    if channels > _MAX_CHANNELS:
        raise RuntimeError(f"{op_name}: backend='triton' supports C <= {_MAX_CHANNELS} (int32 "
                           f"offsets into F), got C = {channels}; use backend='auto' or 'reference'")
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


def _no_autocast(device):
    """_fp32_region for the registered ops' bodies, free when no autocast is active (the common
    case on the Triton path: entering an autocast context costs a few microseconds of Python)."""
    device_type = "cuda" if device.type == "cuda" else "cpu"
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_mean_(tensor, process_group):
    if _distributed():
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


def _rowwise_unigrad_terms(pred_rows, target_rows, covariance, neg_weight):
    """(loss, P - T, P F): loss = [mean_r |p_r - t_r|^2 + lambda mean_r rowdot(P F, P)] / C for
    (R, C) fp32 rows (the other two are what the closed-form gradient reuses)."""
    channels = pred_rows.shape[-1]
    residual = pred_rows - target_rows
    negatives = pred_rows @ covariance  # Q = P F, (R, C): the only C x C-sized work per row
    per_row = residual.pow(2).sum(dim=-1) + neg_weight * (negatives * pred_rows).sum(dim=-1)
    return per_row.mean() / channels, residual, negatives


def _rowwise_unigrad(pred_rows, target_rows, covariance, neg_weight):
    """[mean_r |p_r - t_r|^2 + lambda mean_r rowdot(P F, P)] / C for (R, C) fp32 rows."""
    return _rowwise_unigrad_terms(pred_rows, target_rows, covariance, neg_weight)[0]


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


def _local_covariances(normalized_target, form):
    """[F] or [F_global, F_dense] from the (already LayerNorm-ed) fp32 target, no all-reduce:
    the same ops as _covariance_from_normalized."""
    channels = normalized_target.shape[-1]
    if form == "dense":
        return [_second_moment(normalized_target.reshape(-1, channels))]
    image_mean, centred = _centred_paper_terms(normalized_target)
    return [_second_moment(image_mean), _second_moment(centred.reshape(-1, channels))]


def _symmetrized(covariance):
    """(F + F^T) / 2: the F of the gradient for a caller's matrix (d(p^T F p)/dp = p (F + F^T))."""
    return (covariance + covariance.t()) * 0.5


def _reference_loss_and_grad(pred, target, covariances, neg_weight, global_weight, dense_weight,
                             normalize_target, form, write_grad):
    """The loss op's reference maths (its CPU implementation): the loss exactly as
    unigrad_loss_reference computes it (same ops, same order: bit-equal; a given F is used as it
    is), and, if write_grad, the closed-form dL/dpred (fp32, pred's shape, contiguous):
        dense  G = 2 (P - T + lambda P F_sym) / (R C)
        paper  G = dw * (G~ - mean_n G~) + gw * G_bar[b] / N,
               G~ = 2 (p~ - t~ + lambda p~ F_dense,sym) / (R C),
               G_bar = 2 (p_bar - t_bar + lambda p_bar F_global,sym) / (B C)
    F_sym = (F + F^T)/2 for a given F, F itself when made here (symmetric by construction). The
    mean over each image's tokens is subtracted from G~ (the centring's projection, zero up to
    rounding since p~ and t~ have zero image means)."""
    channels = pred.shape[-1]
    rows = pred.numel() // channels
    t = _normalized_target(target, normalize_target)
    p = pred.detach().to(torch.float32)
    given = len(covariances) > 0
    if not given:
        covariances = _local_covariances(t, form)
    covariance = covariances[0].detach().to(torch.float32)
    if form == "dense":
        loss, residual, negatives = _rowwise_unigrad_terms(
            p.reshape(-1, channels), t.reshape(-1, channels), covariance, neg_weight)
        if not write_grad:
            return loss, None
        if given:
            negatives = p.reshape(-1, channels) @ _symmetrized(covariance)
        grad = (2.0 / (rows * channels)) * (residual + neg_weight * negatives)
        return loss, grad.reshape(pred.shape)
    dense_cov = covariances[1].detach().to(torch.float32)
    images, tokens = pred.shape[0], pred.shape[1]
    pred_mean, pred_centred = _centred_paper_terms(p)
    target_mean, target_centred = _centred_paper_terms(t)
    global_loss, global_residual, global_negatives = _rowwise_unigrad_terms(
        pred_mean, target_mean, covariance, neg_weight)
    centred_rows = pred_centred.reshape(-1, channels)
    dense_loss, dense_residual, dense_negatives = _rowwise_unigrad_terms(
        centred_rows, target_centred.reshape(-1, channels), dense_cov, neg_weight)
    loss = global_weight * global_loss + dense_weight * dense_loss
    if not write_grad:
        return loss, None
    if given:
        global_negatives = pred_mean @ _symmetrized(covariance)
        dense_negatives = centred_rows @ _symmetrized(dense_cov)
    global_grad = ((2.0 * global_weight / (images * channels))
                   * (global_residual + neg_weight * global_negatives))
    dense_grad = ((2.0 * dense_weight / (rows * channels))
                  * (dense_residual + neg_weight * dense_negatives)).reshape(pred.shape)
    dense_grad = dense_grad - dense_grad.mean(dim=1, keepdim=True)
    return loss, dense_grad + global_grad[:, None, :] * (1.0 / tokens)


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
    # the prologue's split of a caller's F into (F_hi, F_lo), symmetrised, in BLOCK x BLOCK
    # tiles (its row-stats programs use "stats"; the launch takes the larger num_warps)
    "split": {"BLOCK": 64, "num_warps": 4},
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


def _on_device(device):
    """Launch on the tensors' GPU (Triton launches on the current device): a device guard only
    when that is not already the current device (the guard costs Python on every call)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


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
    def _ug_row_stats_block(x_ptr, mean_ptr, rstd_ptr, block, n_rows, channels, n_tokens,
                            stride_b, stride_n, stride_c, eps,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-row mean and 1/sqrt(biased var + eps) of rows [block * BLOCK_R, + BLOCK_R) (two
        passes; the second hits L1/L2)."""
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
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
    def _ug_row_stats_kernel(x_ptr, mean_ptr, rstd_ptr, n_rows, channels, n_tokens,
                             stride_b, stride_n, stride_c, eps,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """The target's row stats (the LayerNorm), one BLOCK_R-row block per program."""
        _ug_row_stats_block(x_ptr, mean_ptr, rstd_ptr, tl.program_id(0), n_rows, channels,
                            n_tokens, stride_b, stride_n, stride_c, eps, BLOCK_R, BLOCK_C)

    @triton.jit
    def _ug_store_split(out_ptr, value, rows, cols, mask, channels, INTERPRET: tl.constexpr):
        """out[0][rows, cols] = F_hi, out[1][rows, cols] = F_lo (bf16, (C, C) each, contiguous,
        F_hi + F_lo = value to ~16 bits): the same fp32 ops as torch's F.to(bf16),
        (F - F_hi.float()).to(bf16), so the same bits."""
        high, low = _ug_split_bf16(value, INTERPRET)  # bf16-exact fp32 values when interpreted
        offsets = rows[:, None] * channels + cols[None, :]  # int32: 2 C^2 < 2^31 (C <= 32,767)
        tl.store(out_ptr + offsets, high.to(tl.bfloat16), mask=mask)
        tl.store(out_ptr + channels * channels + offsets, low.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _ug_split_given_tile(f_ptr, out_ptr, tile, n_tiles, channels, stride_0, stride_1,
                             INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
        """One BLOCK x BLOCK tile of a caller's F (any float dtype, any strides): (F + F^T) / 2 in
        fp32 -- torch's (F.float() + F.float().t()) * 0.5 -- split into out (F_hi, F_lo)."""
        rows = (tile // n_tiles) * BLOCK + tl.arange(0, BLOCK)
        cols = (tile % n_tiles) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < channels)[:, None] & (cols < channels)[None, :]
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        x = tl.load(f_ptr + rows64[:, None] * stride_0 + cols64[None, :] * stride_1, mask=mask,
                    other=0.0).to(tl.float32)
        x_t = tl.load(f_ptr + rows64[:, None] * stride_1 + cols64[None, :] * stride_0, mask=mask,
                      other=0.0).to(tl.float32)
        _ug_store_split(out_ptr, (x + x_t) * 0.5, rows, cols, mask, channels, INTERPRET)

    @triton.jit
    def _ug_prologue_kernel(x_ptr, mean_ptr, rstd_ptr, n_rows, channels, n_tokens,
                            stride_b, stride_n, stride_c, eps, n_stats_blocks,
                            f_ptr, f_stride_0, f_stride_1, g_ptr, g_stride_0, g_stride_1,
                            split_ptr, n_split_tiles,
                            NORMALIZE: tl.constexpr, INTERPRET: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
        """Everything the loss kernel needs before it starts, in one launch, when the caller gives
        F: programs [0, n_stats_blocks) compute the target's row stats (NORMALIZE), the next
        n_split_tiles^2 split the tiles of F (f_ptr) into split[0], and (paper form) the next
        n_split_tiles^2 those of F_dense (g_ptr) into split[1]."""
        pid = tl.program_id(0)
        tile = pid - n_stats_blocks
        per_matrix = n_split_tiles * n_split_tiles
        if tile < 0:
            if NORMALIZE:
                _ug_row_stats_block(x_ptr, mean_ptr, rstd_ptr, pid, n_rows, channels, n_tokens,
                                    stride_b, stride_n, stride_c, eps, BLOCK_R, BLOCK_C)
        elif tile < per_matrix:
            _ug_split_given_tile(f_ptr, split_ptr, tile, n_split_tiles, channels, f_stride_0,
                                 f_stride_1, INTERPRET, BLOCK_F)
        else:
            _ug_split_given_tile(g_ptr, split_ptr + 2 * channels * channels, tile - per_matrix,
                                 n_split_tiles, channels, g_stride_0, g_stride_1, INTERPRET,
                                 BLOCK_F)

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
    def _ug_covariance_finalize_kernel(partial_ptr, out_ptr, split_ptr, channels, n_splits,
                                       n_tiles, n_upper, inv_rows, WRITE_SPLIT: tl.constexpr,
                                       INTERPRET: tl.constexpr, BLOCK_C: tl.constexpr):
        """F tile (i, j) = (1/R) sum_s partial[s, u(min, max)], mirrored below the diagonal and
        symmetrised on it; the sum over splits runs in a fixed order (deterministic). With
        WRITE_SPLIT also (F_hi, F_lo) of the tile into split (the loss kernel's operands)."""
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
        if WRITE_SPLIT:
            _ug_store_split(split_ptr, value, rows, cols, mask, channels, INTERPRET)

    @triton.jit
    def _ug_loss_grad_kernel(p_ptr, t_ptr, mean_ptr, rstd_ptr, p_centre_ptr, t_centre_ptr,
                             f_split_ptr, bias_ptr, grad_ptr, partial_ptr,
                             n_rows, channels, n_tokens, p_sb, p_sn, p_sc, t_sb, t_sn, t_sc,
                             n_col_tiles, neg_weight, grad_scale, bias_scale,
                             NORMALIZE: tl.constexpr, CENTRED: tl.constexpr,
                             SPLIT_A: tl.constexpr, HAS_BIAS: tl.constexpr,
                             WRITE_GRAD: tl.constexpr, INTERPRET: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Q = P F for one (row block, column block), then in the epilogue: partial[pid] =
        sum over the tile of |p - t|^2 + lambda q p, and G = grad_scale (P - T + lambda Q)
        (+ bias_scale * bias[image]) written in grad's dtype. f_split: (2, C, C) bf16, F_hi then
        F_lo (contiguous). Every load and store is masked to the (R, C) / (C, C) extents."""
        pid = tl.program_id(0)
        pid_m = pid // n_col_tiles
        pid_n = pid % n_col_tiles
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < channels
        p_row_offsets = _ug_row_offsets(rows, n_tokens, p_sb, p_sn)
        f_lo_offset = channels * channels  # int32 like f_offsets: C * C < 2^31
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, channels, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < channels
            f_mask = k_mask[:, None] & col_mask[None, :]
            f_offsets = ks[:, None] * channels + cols[None, :]
            f_hi = _ug_mma_operand(tl.load(f_split_ptr + f_offsets, mask=f_mask, other=0.0),
                                   INTERPRET)
            f_lo = _ug_mma_operand(tl.load(f_split_ptr + f_lo_offset + f_offsets, mask=f_mask,
                                           other=0.0), INTERPRET)
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


# The kernels' INTERPRET constexpr: whether triton.jit made them interpreted functions (it decides
# once, at import, from TRITON_INTERPRET), so that the interpreter's bf16 workarounds are never
# compiled into a GPU kernel and the environment is not read on every launch.
_KERNELS_INTERPRETED = _TRITON_IMPORTABLE and type(_ug_loss_grad_kernel).__name__ == "InterpretedFunction"


def _config_key(kernel):
    """One kernel's launch parameters as a hashable key: part of every cached plan's key, so a
    changed _CONFIG entry (the tests patch it) gets a fresh plan."""
    return tuple(_CONFIG[kernel].items())


@functools.lru_cache(maxsize=512)
def _stats_plan(rows, channels, cfg):
    """(grid, BLOCK_R, BLOCK_C, num_warps) of the row-stats kernel."""
    cfg = dict(cfg)
    block_c = min(cfg["BLOCK_C"], triton.next_power_of_2(channels))
    return (triton.cdiv(rows, cfg["BLOCK_R"]),), cfg["BLOCK_R"], block_c, cfg["num_warps"]


@functools.lru_cache(maxsize=512)
def _prologue_plan(rows, channels, normalize, matrices, stats_cfg, split_cfg):
    """(grid, stats blocks, F tiles per side, BLOCK_R, BLOCK_C, BLOCK_F, num_warps) of the
    prologue kernel: the row stats (if normalize) and the split of `matrices` given F's."""
    _, block_r, block_c, num_warps = _stats_plan(rows, channels, stats_cfg)
    stats_blocks = triton.cdiv(rows, block_r) if normalize else 0
    split_cfg = dict(split_cfg)
    block_f = max(16, min(split_cfg["BLOCK"], triton.next_power_of_2(channels)))
    tiles = triton.cdiv(channels, block_f)
    grid = (stats_blocks + matrices * tiles * tiles,)
    return grid, stats_blocks, tiles, block_r, block_c, block_f, max(num_warps,
                                                                     split_cfg["num_warps"])


@functools.lru_cache(maxsize=512)
def _covariance_plan(rows, channels, sm_count, cfg, finalize_cfg):
    """(partial grid, finalize grid, splits, rows_per_split, n_tiles, n_upper, BLOCK_R, BLOCK_C,
    num_warps, num_stages, finalize num_warps). sm_count = 0: the interpreter's split count."""
    cfg = dict(cfg)
    block_c = _mma_block(cfg["BLOCK_C"], channels)
    block_r = _mma_block(cfg["BLOCK_R"], rows)
    n_tiles = triton.cdiv(channels, block_c)
    n_upper = n_tiles * (n_tiles + 1) // 2
    row_blocks = triton.cdiv(rows, block_r)
    splits = (cfg["waves"] * sm_count) // n_upper if sm_count else cfg["interpret_splits"]
    splits = max(1, min(splits, row_blocks))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_r
    splits = triton.cdiv(rows, rows_per_split)  # no empty split
    return ((n_tiles * n_tiles, splits), (n_tiles, n_tiles), splits, rows_per_split, n_tiles,
            n_upper, block_r, block_c, cfg["num_warps"], cfg["num_stages"],
            dict(finalize_cfg)["num_warps"])


@functools.lru_cache(maxsize=512)
def _image_mean_plan(images, channels, cfg):
    """(grid, BLOCK_N, BLOCK_C, num_warps) of the image-mean kernel."""
    cfg = dict(cfg)
    block_c = min(cfg["BLOCK_C"], triton.next_power_of_2(channels))
    return (images, triton.cdiv(channels, block_c)), cfg["BLOCK_N"], block_c, cfg["num_warps"]


@functools.lru_cache(maxsize=512)
def _loss_plan(rows, channels, pred_element_size, centred, cfg):
    """(grid, n_col_tiles, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the loss kernel."""
    cfg = dict(cfg)
    block_m = _mma_block(cfg["BLOCK_M"], rows)
    block_n = _mma_block(cfg["BLOCK_N_CENTRED" if centred else "BLOCK_N"], channels)
    block_k = _mma_block(cfg["BLOCK_K_FP32" if pred_element_size == 4 else "BLOCK_K"], channels)
    n_col_tiles = triton.cdiv(channels, block_n)
    n_programs = triton.cdiv(rows, block_m) * n_col_tiles
    return ((n_programs,), n_col_tiles, block_m, block_n, block_k, cfg["num_warps"],
            cfg["num_stages"])


def _launch_row_stats(x):
    """Per-row LayerNorm mean and rstd of x (fp32, R each)."""
    images, tokens, stride_b, stride_n, stride_c = _row_layout(x)
    rows, channels = images * tokens, x.shape[-1]
    grid, block_r, block_c, num_warps = _stats_plan(rows, channels, _config_key("stats"))
    mean = _new_buffer((rows,), torch.float32, x.device)
    rstd = _new_buffer((rows,), torch.float32, x.device)
    _ug_row_stats_kernel[grid](
        x, mean, rstd, rows, channels, tokens, stride_b, stride_n, stride_c, _TARGET_LAYERNORM_EPS,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return mean, rstd


def _launch_prologue(target, normalize, covariances):
    """(stats or None, split): one launch for the target's row stats (if normalize) and the
    (F_hi, F_lo) split of each caller's F, symmetrised ((F + F^T) / 2), read through its strides
    in its own dtype (no fp32 copy, no transpose). split: (len(covariances), 2, C, C) bf16."""
    images, tokens, stride_b, stride_n, stride_c = _row_layout(target)
    rows, channels = images * tokens, target.shape[-1]
    grid, stats_blocks, tiles, block_r, block_c, block_f, num_warps = _prologue_plan(
        rows, channels, normalize, len(covariances), _config_key("stats"), _config_key("split"))
    split = _new_buffer((len(covariances), 2, channels, channels), torch.bfloat16, target.device)
    if normalize:
        stats = (_new_buffer((rows,), torch.float32, target.device),
                 _new_buffer((rows,), torch.float32, target.device))
    else:
        stats = None
    f = covariances[0]
    g = covariances[-1]
    mean, rstd = stats if normalize else (split, split)
    _ug_prologue_kernel[grid](
        target, mean, rstd, rows, channels, tokens, stride_b, stride_n, stride_c,
        _TARGET_LAYERNORM_EPS, stats_blocks, f, f.stride(0), f.stride(1), g, g.stride(0),
        g.stride(1), split, tiles, NORMALIZE=normalize, INTERPRET=_KERNELS_INTERPRETED,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_F=block_f, num_warps=num_warps)
    return stats, split


def _launch_covariance(x, stats, centre, write_split=False):
    """(F, split or None): F = (1/R) sum_r t_r t_r^T, (C, C) fp32, exactly symmetric, with t_r
    row r of x LayerNorm-ed (stats = (mean, rstd)) and/or minus its image's centre (B, C); local
    (no all-reduce). write_split: also its (F_hi, F_lo) split, (1, 2, C, C) bf16, written by the
    finalize kernel from the same values."""
    images, tokens, stride_b, stride_n, stride_c = _row_layout(x)
    rows, channels = images * tokens, x.shape[-1]
    sm_count = _sm_count(x.device) if x.device.type == "cuda" else 0
    (grid, finalize_grid, splits, rows_per_split, n_tiles, n_upper, block_r, block_c, num_warps,
     num_stages, finalize_warps) = _covariance_plan(rows, channels, sm_count,
                                                    _config_key("covariance"),
                                                    _config_key("finalize"))
    partials = _new_buffer((splits, n_upper, block_c, block_c), torch.float32, x.device)
    normalize, centred = stats is not None, centre is not None
    mean, rstd = stats if normalize else (partials, partials)
    exact_rows = x.dtype == torch.bfloat16 and not normalize and not centred
    _ug_covariance_partial_kernel[grid](
        x, mean, rstd, centre if centred else partials, partials,
        rows, channels, tokens, stride_b, stride_n, stride_c, rows_per_split, n_tiles, n_upper,
        NORMALIZE=normalize, CENTRED=centred, SPLIT=not exact_rows,
        INTERPRET=_KERNELS_INTERPRETED, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
        num_stages=num_stages)
    covariance = _new_buffer((channels, channels), torch.float32, x.device)
    split = (_new_buffer((1, 2, channels, channels), torch.bfloat16, x.device) if write_split
             else covariance)
    _ug_covariance_finalize_kernel[finalize_grid](
        partials, covariance, split, channels, splits, n_tiles, n_upper, 1.0 / rows,
        WRITE_SPLIT=write_split, INTERPRET=_KERNELS_INTERPRETED, BLOCK_C=block_c,
        num_warps=finalize_warps)
    return covariance, (split if write_split else None)


def _launch_image_mean(x, stats):
    """(B, C) fp32 per-image token mean of x, of its LayerNorm-ed rows when stats are given."""
    images, tokens, stride_b, stride_n, stride_c = _row_layout(x)
    channels = x.shape[-1]
    grid, block_n, block_c, num_warps = _image_mean_plan(images, channels,
                                                         _config_key("image_mean"))
    out = _new_buffer((images, channels), torch.float32, x.device)
    mean, rstd = stats if stats is not None else (out, out)
    _ug_image_mean_kernel[grid](
        x, mean, rstd, out, tokens, channels, stride_b, stride_n, stride_c,
        NORMALIZE=stats is not None, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    return out


def _launch_loss_grad(pred, target, stats, centres, f_split, neg_weight, grad_scale, bias,
                      bias_scale, write_grad):
    """(partials, grad): fp32 per-program sums of |p - t|^2 + lambda <q, p>, and (if write_grad)
    G = grad_scale (P - T + lambda P F) + bias_scale bias[image], pred's shape and dtype
    (contiguous). f_split: F_hi then F_lo, (2, C, C) bf16 contiguous (any leading dims of 1)."""
    images, tokens, p_sb, p_sn, p_sc = _row_layout(pred)
    _, _, t_sb, t_sn, t_sc = _row_layout(target)
    rows, channels = images * tokens, pred.shape[-1]
    centred = centres is not None
    grid, n_col_tiles, block_m, block_n, block_k, num_warps, num_stages = _loss_plan(
        rows, channels, pred.element_size(), centred, _config_key("loss"))
    partials = _new_buffer(grid, torch.float32, pred.device)
    grad = _new_buffer(pred.shape, pred.dtype, pred.device) if write_grad else partials
    normalize = stats is not None
    mean, rstd = stats if normalize else (partials, partials)
    p_centre, t_centre = centres if centred else (partials, partials)
    _ug_loss_grad_kernel[grid](
        pred, target, mean, rstd, p_centre, t_centre, f_split,
        bias if bias is not None else partials, grad, partials,
        rows, channels, tokens, p_sb, p_sn, p_sc, t_sb, t_sn, t_sc, n_col_tiles,
        neg_weight, grad_scale, bias_scale,
        NORMALIZE=normalize, CENTRED=centred, SPLIT_A=centred or pred.dtype != torch.bfloat16,
        HAS_BIAS=bias is not None, WRITE_GRAD=write_grad, INTERPRET=_KERNELS_INTERPRETED,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
    return partials, (grad if write_grad else None)


@functools.lru_cache(maxsize=512)
def _scale_plan(numel, cfg):
    """(grid, BLOCK, num_warps) of the backward's scale kernel."""
    cfg = dict(cfg)
    return (triton.cdiv(numel, cfg["BLOCK"]),), cfg["BLOCK"], cfg["num_warps"]


def _launch_scale(grad, scale, out_dtype):
    """out_dtype(scale * grad): the fp32 product rounded once, grad's shape, contiguous."""
    if not grad.is_contiguous():  # never on the hot path: the saved G is contiguous
        grad = grad.contiguous()
    if scale.dtype != torch.float32:
        scale = scale.to(torch.float32)
    out = _new_buffer(grad.shape, out_dtype, grad.device)
    numel = grad.numel()
    grid, block, num_warps = _scale_plan(numel, _config_key("scale"))
    _ug_scale_kernel[grid](grad, scale, out, numel, INTERPRET=_KERNELS_INTERPRETED, BLOCK=block,
                           num_warps=num_warps)
    return out


def _triton_covariance(target, normalize_target, form):
    """[F] or [F_global, F_dense] (fp32, local to this rank) from the Triton kernels."""
    stats = _launch_row_stats(target) if normalize_target else None
    if form == "dense":
        return [_launch_covariance(target, stats, None)[0]]
    target_mean = _launch_image_mean(target, stats)
    return [_launch_covariance(target_mean, None, None)[0],
            _launch_covariance(target, stats, target_mean)[0]]


def _triton_forward(pred, target, covariances, neg_weight, global_weight, dense_weight,
                    normalize_target, form, write_grad):
    """(loss, G or None): the whole UniGrad forward; G is dL/dpred, pred's shape and dtype.
    covariances (): F from the target here (symmetric by construction); else the caller's F
    ((F,) or (F_global, F_dense)), used as (F + F^T) / 2."""
    channels = pred.shape[-1]
    rows = pred.numel() // channels
    given = len(covariances) > 0
    if given:  # row stats and the F split(s) in one launch
        stats, split = _launch_prologue(target, normalize_target, covariances)
    else:
        stats = _launch_row_stats(target) if normalize_target else None
    if form == "dense":
        if not given:
            _, split = _launch_covariance(target, stats, None, write_split=True)
        partials, grad = _launch_loss_grad(pred, target, stats, None, split, neg_weight,
                                           2.0 / (rows * channels), None, 0.0, write_grad)
        return partials.sum() * (1.0 / (rows * channels)), grad
    images, tokens = pred.shape[0], pred.shape[1]
    pred_mean = _launch_image_mean(pred, None)
    target_mean = _launch_image_mean(target, stats)
    if given:
        global_split, dense_split = split[0], split[1]
    else:
        _, global_split = _launch_covariance(target_mean, None, None, write_split=True)
        _, dense_split = _launch_covariance(target, stats, target_mean, write_split=True)
    global_partials, global_grad = _launch_loss_grad(
        pred_mean, target_mean, None, None, global_split, neg_weight,
        2.0 * global_weight / (images * channels), None, 0.0, write_grad)
    # d p_bar_b / d p_bn = 1/N: the global gradient reaches every token of its image
    dense_partials, grad = _launch_loss_grad(
        pred, target, stats, (pred_mean, target_mean), dense_split, neg_weight,
        2.0 * dense_weight / (rows * channels), global_grad, 1.0 / tokens, write_grad)
    loss = (global_partials.sum() * (global_weight / (images * channels))
            + dense_partials.sum() * (dense_weight / (rows * channels)))
    return loss, grad


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library): fake implementations, autograd, CPU/CUDA implementations
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("densesim::unigrad_covariance", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _unigrad_covariance_op(target: torch.Tensor, normalize_target: bool, form: str,
                           use_triton: bool) -> list[torch.Tensor]:
    """[F] (form='dense') or [F_global, F_dense] (form='paper'), (C, C) fp32 each, THIS rank's
    rows only (the public unigrad_covariance all-reduces). use_triton: the Triton kernels (CUDA,
    or CPU under TRITON_INTERPRET=1), else the reference maths (the CPU implementation)."""
    with torch.no_grad(), _no_autocast(target.device):
        if use_triton:
            with _on_device(target.device):
                return _triton_covariance(target, normalize_target, form)
        return _local_covariances(_normalized_target(target, normalize_target), form)


@_unigrad_covariance_op.register_fake
def _unigrad_covariance_fake(target, normalize_target, form, use_triton):
    channels = target.shape[-1]
    return [target.new_empty((channels, channels), dtype=torch.float32)
            for _ in range(1 if form == "dense" else 2)]


@torch.library.custom_op("densesim::unigrad_loss", mutates_args=(), device_types=("cpu", "cuda"))
def _unigrad_loss_op(pred: torch.Tensor, target: torch.Tensor, covariance: torch.Tensor | None,
                     covariance_dense: torch.Tensor | None, weights: list[float],
                     normalize_target: bool, form: str, write_grad: bool,
                     use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, G): the 0-d fp32 loss and, when write_grad, G = dloss/dpred (pred's shape,
    contiguous; pred's dtype on the Triton path, fp32 on the reference path), else an empty (0,)
    fp32 tensor. covariance: None (F made here from target), F (form='dense') or F_global
    (form='paper', with covariance_dense = F_dense); weights: [neg_weight, global_weight,
    dense_weight]."""
    neg_weight, global_weight, dense_weight = weights
    covariances = () if covariance is None else (
        (covariance,) if form == "dense" else (covariance, covariance_dense))
    with torch.no_grad(), _no_autocast(pred.device):
        if use_triton:
            with _on_device(pred.device):
                loss, grad = _triton_forward(pred, target, covariances, neg_weight, global_weight,
                                             dense_weight, normalize_target, form, write_grad)
        else:
            loss, grad = _reference_loss_and_grad(pred, target, covariances, neg_weight,
                                                  global_weight, dense_weight, normalize_target,
                                                  form, write_grad)
        if grad is None:
            grad = pred.new_empty((0,), dtype=torch.float32)
        return loss, grad


@_unigrad_loss_op.register_fake
def _unigrad_loss_fake(pred, target, covariance, covariance_dense, weights, normalize_target, form,
                       write_grad, use_triton):
    loss = pred.new_empty((), dtype=torch.float32)
    if not write_grad:
        return loss, pred.new_empty((0,), dtype=torch.float32)
    return loss, pred.new_empty(pred.shape, dtype=pred.dtype if use_triton else torch.float32)


@torch.library.custom_op("densesim::unigrad_loss_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _unigrad_loss_backward_op(grad: torch.Tensor, grad_loss: torch.Tensor,
                              out_dtype: torch.dtype, use_triton: bool) -> torch.Tensor:
    """out_dtype(grad_loss * grad): the fp32 product, grad's shape, contiguous (grad is the G
    saved by densesim::unigrad_loss, grad_loss the 0-d gradient reaching the loss)."""
    if use_triton:
        with _on_device(grad.device):
            return _launch_scale(grad, grad_loss, out_dtype)
    product = grad_loss.to(torch.float32) * grad.to(torch.float32)
    return product.to(out_dtype).contiguous()


@_unigrad_loss_backward_op.register_fake
def _unigrad_loss_backward_fake(grad, grad_loss, out_dtype, use_triton):
    return grad.new_empty(grad.shape, dtype=out_dtype)


def _loss_setup_context(ctx, inputs, output):
    pred, write_grad, use_triton = inputs[0], inputs[7], inputs[8]
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad if write_grad else None)
    ctx.write_grad, ctx.use_triton, ctx.pred_dtype = write_grad, use_triton, pred.dtype


def _loss_backward(ctx, grad_loss, _grad_of_grad_output):
    grad_pred = None
    if ctx.needs_input_grad[0]:
        if not ctx.write_grad:
            raise RuntimeError("densesim::unigrad_loss: the gradient to pred needs write_grad=True "
                               "(unigrad_loss sets it when grad mode is on and pred requires grad)")
        grad, = ctx.saved_tensors
        grad_pred = _unigrad_loss_backward_op(grad, grad_loss, ctx.pred_dtype, ctx.use_triton)
    # target and the covariances are constants (no gradient, by definition of the op)
    return grad_pred, None, None, None, None, None, None, None, None


torch.library.register_autograd("densesim::unigrad_loss", _loss_backward,
                                setup_context=_loss_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _constant(tensor):
    return tensor.detach() if tensor is not None and tensor.requires_grad else tensor


def unigrad_covariance(target, normalize_target=True, form="dense", process_group=None,
                       backend="auto"):
    """Negatives' correlation, fp32, no grad: F (C, C) for form='dense', (F_global, F_dense) for
    form='paper' (see the module docstring). All-reduced (mean over ranks) when distributed.
    backend='triton' runs the row-stats / covariance kernels (fp32 accumulation, deterministic)."""
    _check_backend_name("unigrad_covariance", backend)
    _validate_unigrad_covariance(target, form)
    use_triton = _select_backend("unigrad_covariance", backend, target.device,
                                 target.shape[-1]) == "triton"
    if backend == "reference":
        with torch.no_grad(), _fp32_region(target.device):
            return _covariance_from_normalized(_normalized_target(target, normalize_target), form,
                                               process_group)
    covariances = _unigrad_covariance_op(_constant(target), bool(normalize_target), form,
                                         use_triton)
    if _distributed():
        for covariance in covariances:
            _all_reduce_mean_(covariance, process_group)
    return covariances[0] if form == "dense" else tuple(covariances)


def unigrad_loss(pred, target, neg_weight=0.02, normalize_target=True, process_group=None,
                 covariance=None, form="dense", global_weight=1.0, dense_weight=1.0, backend="auto"):
    """UniGrad loss (fp32 scalar); gradient w.r.t. pred only. See the module docstring.
    'auto'/'triton' call densesim::unigrad_loss, which computes the gradient in the forward pass
    and keeps it (pred's size) until backward; 'reference' is plain autograd."""
    _check_backend_name("unigrad_loss", backend)
    _validate_unigrad_loss(pred, target, neg_weight, covariance, form, global_weight, dense_weight)
    use_triton = _select_backend("unigrad_loss", backend, pred.device,
                                 pred.shape[-1]) == "triton"
    if backend == "reference":
        return unigrad_loss_reference(pred, target, neg_weight, normalize_target, process_group,
                                      covariance, form, global_weight, dense_weight)
    normalize_target = bool(normalize_target)
    target = _constant(target)
    if covariance is not None:  # the caller's F (the op uses (F + F^T) / 2)
        covariances = (covariance,) if form == "dense" else covariance
    elif _distributed():
        # F over the global batch: this rank's F from the op, the mean over ranks here (the
        # loss op then symmetrises it: a no-op unless the all-reduce summed F[i, j] and F[j, i]
        # in different orders)
        covariances = _unigrad_covariance_op(target, normalize_target, form, use_triton)
        for matrix in covariances:
            _all_reduce_mean_(matrix, process_group)
    else:
        covariances = (None, None)  # F of these rows, made inside the op
    write_grad = torch.is_grad_enabled() and pred.requires_grad
    loss, _ = _unigrad_loss_op(pred, target, _constant(covariances[0]),
                               _constant(covariances[1]) if form == "paper" else None,
                               [float(neg_weight), float(global_weight), float(dense_weight)],
                               normalize_target, form, write_grad, use_triton)
    return loss
