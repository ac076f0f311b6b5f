"""UniGrad loss as used by Siamese Image Modeling: the released dense form and the paper's form.

Shapes and dtypes
    pred, target  (B, N, C) or (M, C), same shape, any float dtype (fp32/bf16/fp16). Everything is
                  computed in fp32 with autocast disabled, as SIM does. `target` is a constant
                  (detached); gradients flow to `pred` only. Returns a 0-d fp32 tensor.
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

Roofline (recipe: 128 images per GPU, R = 128*196 = 25,088 rows, C = 768):
    F = T^T T is 2 R C^2 = 29.6 GFLOP, Q = P F another 29.6 GFLOP; the rest is O(R C).
    Bytes: read P and T once (77 MB each in fp32, 38.5 MB in bf16), write dL/dP (same size as P)
    and F (2.4 MB). A fused kernel writes the gradient in the forward pass (it is
    2(P - T + lambda Q)/(RC), nothing the backward needs to recompute), so P is read exactly once.
"""
import torch
import torch.nn.functional as F_nn

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton  # noqa: F401
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
_FORMS = ("dense", "paper")
_TARGET_LAYERNORM_EPS = 1e-5  # SIM's teacher_norm


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _select_backend(op_name, backend):
    """Called after validation. No Triton kernel yet: 'auto' means the reference everywhere, and an
    explicit 'triton' request fails loudly instead of silently running something else."""
    if backend == "triton":
        raise RuntimeError(
            f"{op_name}: the Triton kernel for this op is not available in this build "
            f"(backend='triton'); use backend='auto' or backend='reference'")
    return "reference"


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


def unigrad_covariance(target, normalize_target=True, form="dense", process_group=None):
    """Negatives' correlation, fp32, no grad: F (C, C) for form='dense', (F_global, F_dense) for
    form='paper' (see the module docstring). All-reduced (mean over ranks) when distributed."""
    _validate_unigrad_covariance(target, form)
    with torch.no_grad(), _fp32_region(target.device):
        return _covariance_from_normalized(_normalized_target(target, normalize_target), form,
                                           process_group)


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


def unigrad_loss(pred, target, neg_weight=0.02, normalize_target=True, process_group=None,
                 covariance=None, form="dense", global_weight=1.0, dense_weight=1.0, backend="auto"):
    """UniGrad loss (fp32 scalar); gradient w.r.t. pred only. See the module docstring."""
    _check_backend_name("unigrad_loss", backend)
    _validate_unigrad_loss(pred, target, neg_weight, covariance, form, global_weight, dense_weight)
    _select_backend("unigrad_loss", backend)
    return unigrad_loss_reference(pred, target, neg_weight, normalize_target, process_group,
                                  covariance, form, global_weight, dense_weight)
