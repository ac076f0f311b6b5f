"""Gather selected image patches (optionally embedded) and gather selected tokens.

patch_gather(images, idx, patch_size, weight=None, bias=None, pos_embed=None)
    images     (B, C, H, W)   fp32 / bf16 / fp16, any strides (channels-last or sliced is fine);
                              H and W divisible by p = patch_size.
    idx        (B, K)         int64, raster-order patch indices over the (H/p) x (W/p) grid,
                              every entry in [0, N), N = (H/p)(W/p). Duplicates are allowed.
    weight     (D, C*p*p)     optional patch-embedding matrix (a Conv2d weight (D, C, p, p) is also
                              accepted and flattened), any float dtype.
    bias       (D,)           optional, only with weight.
    pos_embed  (N, D)         optional, only with weight: row idx[b, k] is added to token (b, k).

    Without weight: out[b, k] = patch(images[b], idx[b, k]) flattened in (channel, row, col) order,
    shape (B, K, C*p*p), dtype of images. That order is the one of a Conv2d weight reshaped to
    (D, C*p*p), so with weight:
        out[b, k] = weight @ patch + bias + pos_embed[idx[b, k]]           (B, K, D)
    which equals Conv2d(images, weight, bias, stride=p) flattened to (B, N, D) and gathered at idx.
    The matmul runs in promote(images.dtype, weight.dtype); adding pos_embed follows PyTorch type
    promotion (SIM adds an fp32 table to an fp16 projection and keeps the fp32 sum).
    Gradients flow to images, weight, bias and pos_embed; backward scatters (accumulates) into the
    patches that were gathered, so duplicate indices add up.

token_gather(tokens, idx)
    tokens (B, N, D) any dtype, idx (B, K) int64 in [0, N)  ->  (B, K, D), out[b, k] = tokens[b, idx[b, k]].
    Backward scatter-adds into tokens (duplicates accumulate).

Roofline (the recipe: ViT-B/16, 224 px, B=128, G=14, N=196, K=78 visible, C*p*p=768, D=768):
    patch_gather with weight must read only the gathered pixels, B*K*C*p*p = 7.67 M values
    (15.3 MB bf16 / 30.7 MB fp32), the weight (1.2 MB bf16), the 196-row pos table (0.6 MB fp32),
    and write B*K*D = 7.67 M outputs (15.3 MB bf16); it does 2*B*K*768*768 = 11.8 GFLOP. That is
    250-370 FLOP/byte (fp32 or bf16 pixels), around the H100's bf16 ridge (~300 FLOP/byte), so a
    fused kernel is bound by both bandwidth and tensor-core throughput. The unfused
    path (Conv2d on the whole image, then gather) moves 196/78 = 2.5x the pixels and FLOPs and writes
    the (B, 196, D) token tensor for masked patches too; the fused kernel must avoid that.
    token_gather moves 2*B*K*D values (read + write), no FLOPs: 30.7 MB at bf16 for the sizes above.
"""
import torch

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton  # noqa: F401
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def _describe(tensor):
    return f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"


def _check_tensor(op_name, name, value):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_index(op_name, idx, batch, num_items, device):
    """idx must be (batch, K) int64 on `device` with all values in [0, num_items)."""
    _check_tensor(op_name, "idx", idx)
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"{op_name}: idx must be int64 of shape (B, K) with B={batch}, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{op_name}: idx must be on the same device as the data ({device}), "
                         f"got {idx.device}")
    # A bad index must never reach a kernel as an out-of-bounds read or write. Checking costs one
    # small reduction (and a host sync on GPU); meta tensors carry no values to check.
    if idx.numel() > 0 and idx.device.type != "meta":
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= num_items:
            raise ValueError(f"{op_name}: idx values must lie in [0, {num_items}), "
                             f"got min {low}, max {high}")


def _validate_patch_gather(images, idx, patch_size, weight, bias, pos_embed):
    op = "patch_gather"
    _check_tensor(op, "images", images)
    if images.dim() != 4:
        raise ValueError(f"{op}: images must have shape (B, C, H, W), got {_describe(images)}")
    if images.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: images must be a floating tensor (fp32/bf16/fp16), got {images.dtype}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"{op}: images H and W must be divisible by patch_size={patch_size}, "
                         f"got H={height}, W={width}")
    num_patches = (height // patch_size) * (width // patch_size)
    _check_index(op, idx, batch, num_patches, images.device)

    patch_dim = channels * patch_size * patch_size
    if weight is None:
        if bias is not None or pos_embed is not None:
            raise ValueError(f"{op}: bias and pos_embed need weight (they act on embedded tokens); "
                             f"got weight=None")
        return
    _check_tensor(op, "weight", weight)
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: weight must be a floating tensor, got {weight.dtype}")
    conv_shape_ok = weight.dim() == 4 and tuple(weight.shape[1:]) == (channels, patch_size, patch_size)
    if not (conv_shape_ok or (weight.dim() == 2 and weight.shape[1] == patch_dim)):
        raise ValueError(f"{op}: weight must have shape (D, C*p*p) = (D, {patch_dim}) or "
                         f"(D, {channels}, {patch_size}, {patch_size}), got {tuple(weight.shape)}")
    if weight.device != images.device:
        raise ValueError(f"{op}: weight must be on the same device as images ({images.device}), "
                         f"got {weight.device}")
    embed_dim = weight.shape[0]
    for name, value, shape in (("bias", bias, (embed_dim,)),
                               ("pos_embed", pos_embed, (num_patches, embed_dim))):
        if value is None:
            continue
        _check_tensor(op, name, value)
        if value.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(value.shape)}")
        if value.device != images.device:
            raise ValueError(f"{op}: {name} must be on the same device as images "
                             f"({images.device}), got {value.device}")


def _validate_token_gather(tokens, idx):
    op = "token_gather"
    _check_tensor(op, "tokens", tokens)
    if tokens.dim() != 3:
        raise ValueError(f"{op}: tokens must have shape (B, N, D), got {_describe(tokens)}")
    _check_index(op, idx, tokens.shape[0], tokens.shape[1], tokens.device)


def patch_gather_reference(images, idx, patch_size, weight=None, bias=None, pos_embed=None):
    """Plain-PyTorch definition of patch_gather (see the module docstring). Inputs are not validated."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    # Splitting H and W into (grid, patch) is a view for any strides, so only the K gathered
    # patches are ever copied (never all N patches of the image).
    patch_view = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patch_view = patch_view.permute(0, 2, 4, 1, 3, 5)  # (B, Gh, Gw, C, p, p)
    batch_index = torch.arange(batch, device=images.device).unsqueeze(1)
    patches = patch_view[batch_index, idx // grid_w, idx % grid_w]  # (B, K, C, p, p)
    patches = patches.reshape(batch, idx.shape[1], channels * patch_size * patch_size)
    if weight is None:
        return patches
    flat_weight = weight.reshape(weight.shape[0], -1)
    compute_dtype = torch.promote_types(images.dtype, weight.dtype)
    tokens = patches.to(compute_dtype) @ flat_weight.to(compute_dtype).t()
    if bias is not None:
        tokens = tokens + bias.to(compute_dtype)
    if pos_embed is not None:
        tokens = tokens + pos_embed[idx]
    return tokens


def token_gather_reference(tokens, idx):
    """Plain-PyTorch definition of token_gather: out[b, k] = tokens[b, idx[b, k]]."""
    expanded = idx.unsqueeze(-1).expand(idx.shape[0], idx.shape[1], tokens.shape[2])
    return torch.gather(tokens, 1, expanded)


def patch_gather(images, idx, patch_size, weight=None, bias=None, pos_embed=None, backend="auto"):
    """Gather (and optionally embed) the patches `idx` of `images`; see the module docstring."""
    _check_backend_name("patch_gather", backend)
    _validate_patch_gather(images, idx, patch_size, weight, bias, pos_embed)
    _select_backend("patch_gather", backend)
    return patch_gather_reference(images, idx, patch_size, weight, bias, pos_embed)


def token_gather(tokens, idx, backend="auto"):
    """out[b, k] = tokens[b, idx[b, k]]; backward scatter-adds (duplicate indices accumulate)."""
    _check_backend_name("token_gather", backend)
    _validate_token_gather(tokens, idx)
    _select_backend("token_gather", backend)
    return token_gather_reference(tokens, idx)
