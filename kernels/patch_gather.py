"""Gather selected image patches (optionally embedded) and gather selected tokens.

patch_gather(images, idx, patch_size, weight=None, bias=None, pos_embed=None, backend="auto",
             check_index=True)
    images     (B, C, H, W)   fp32 / bf16 / fp16, any strides (channels-last or sliced is fine);
                              H and W divisible by p = patch_size. B = 0 is allowed (empty output).
    idx        (B, K)         int64 (any strides), raster-order patch indices over the
                              (H/p) x (W/p) grid, every entry in [0, N), N = (H/p)(W/p).
                              Duplicates are allowed; K = 0 and K = 1 are allowed.
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
    promotion (SIM adds an fp32 table to an fp16 projection and keeps the fp32 sum). So the output
    dtype is promote(images, weight), or promote(images, weight, pos_embed) with a table.
    Gradients flow to images, weight, bias and pos_embed (only those that require grad are
    computed); backward scatters (accumulates) into the patches that were gathered, so duplicate
    indices add up.

token_gather(tokens, idx, backend="auto", check_index=True, unique_indices=False)
    tokens (B, N, D) any dtype, idx (B, K) int64 in [0, N)  ->  (B, K, D), out[b, k] = tokens[b, idx[b, k]].
    Backward scatter-adds into tokens (duplicates accumulate).

Registered ops (namespace densesim, torch.library.custom_op, device_types cpu and cuda; each has a
fake (meta) implementation, so both work inside a user's torch.compile'd function and on meta
tensors; the backward ops are registered ops too, so a compiled graph keeps them opaque):
    densesim::patch_gather(Tensor images, Tensor idx, int patch_size, Tensor? weight,
                           Tensor? bias, Tensor? pos_embed, ScalarType? matmul_dtype,
                           bool use_triton) -> Tensor
        weight is the (D, C*p*p) matrix (the public function flattens a Conv2d weight outside the
        op, so autograd sees that reshape). matmul_dtype: the dtype of the matmul operands, None
        meaning promote(images, weight) (see "Autocast" below); the output dtype is
        matmul_dtype, promoted with promote(images, weight) when there is a bias and with
        pos_embed's dtype when there is a table. Autograd through torch.library.register_autograd;
        only the inputs with ctx.needs_input_grad get a gradient.
    densesim::patch_gather_backward(Tensor grad_out, Tensor images, Tensor idx, int patch_size,
                                    Tensor? weight, ScalarType? matmul_dtype,
                                    ScalarType? bias_dtype, ScalarType? pos_dtype,
                                    bool need_images, bool need_weight, bool need_bias,
                                    bool need_pos, bool use_triton)
            -> (grad_images, grad_weight, grad_bias, grad_pos)
        bias_dtype / pos_dtype: None when the forward had no bias / no table. A gradient that is
        not needed comes back as an empty (0,) tensor (custom ops cannot return None).
    densesim::token_gather(Tensor tokens, Tensor idx, bool unique_indices, bool use_triton)
            -> Tensor
    densesim::token_gather_backward(Tensor grad_out, Tensor idx, int num_tokens,
                                    bool unique_indices, bool use_triton) -> Tensor
        the (B, num_tokens, D) gradient in grad_out's dtype (= the tokens' dtype).
    use_triton=False runs the reference maths (the CPU implementation; also what CUDA runs for
    dtypes the kernels do not take, e.g. float64); True runs the Triton launchers (CUDA, or CPU
    tensors under TRITON_INTERPRET=1). The reference-maths backward is written out (not autograd
    inside the op) with the same ops, casts and reductions autograd records for the reference, so
    its gradients are the reference's, bit for bit on CPU. All op outputs are fresh, contiguous
    tensors (never an input or a view of one).
    The public functions keep their signatures: backend="reference" runs the plain-autograd
    <op>_reference (what the benchmarks' `compiled` variant compiles and what `--no-fused` runs);
    "auto" calls the op with use_triton=True on CUDA tensors of fp32/bf16/fp16 where triton
    imports and with use_triton=False otherwise; "triton" sets use_triton (CUDA, or CPU under the
    interpreter) and raises a one-line RuntimeError anywhere else.

Autocast. Custom ops are not autocast-aware: under torch.autocast the op receives its inputs as
they are (as the old torch.autograd.Function did), and its implementations run with autocast
disabled, so the Triton path computes in promote(images, weight) whatever autocast says (the ViT
runs it under bf16 autocast on CUDA; the output is unchanged by this refactor). The reference
maths reproduce what the plain reference does under autocast: patch_gather_reference's matmul is
an autocast op, so when autocast is enabled for the tensors' device and the matmul dtype is not
float64, the public function passes matmul_dtype = the autocast dtype (operands cast to it, as
autocast would) and the op path equals backend="reference" bit for bit (the CPU "auto" path under
torch.autocast("cpu", dtype=torch.bfloat16), which used to run the reference itself, is tested).

No host sync. Nothing on the call path reads a tensor value on the host. Shapes, dtypes and
devices are checked in Python (one-line ValueErrors, before anything runs); the index range
(every idx value in [0, N)) is a device-side check, _check_on_device: on CUDA (and inside
torch.compile) torch._assert_async, so the step goes on and a bad index stops the next
synchronisation (a device-side assert, carrying "<op>: idx values must lie in [0, N)" where torch's
CUDA assert reports the message); on CPU the same check raises that ValueError at once (inside a compiled graph it is the _assert_async: a RuntimeError with that
message when the graph runs). It costs a few tiny device kernels (compare, and, all). check_index=False
skips it (callers that guarantee the range, e.g. engine/models/vit.py with indices built by
engine.masking). Either way the Triton kernels mask every access by the index, so an
out-of-range index can never read or write out of bounds: its embedded row holds just the bias
(pixels and position read as 0; the plain gather and token_gather give zeros) and it neither
receives nor contributes gradient. The reference maths raise torch's own index error instead.

Launch-plan cache. The per-shape launch decisions (block sizes, grids, the dot dtype/precision)
are computed once per (shape, dtype, mode) key by functools.lru_cache'd plan functions
(_embed_plan, _pixels_plan, _token_plan) keyed on plain Python values; a launch is then the
kernel call itself. Every launcher takes arbitrary strides (no .contiguous() copy of an input).

Triton path (backend="triton", or "auto" on CUDA tensors; fp32/bf16/fp16 only — float64 and other
dtypes run the reference maths under "auto", and "triton" refuses them):
  * embedded forward, one fused kernel `_embed_fwd_kernel`. The B*K gathered tokens are flattened to
    M = B*K rows, so a row block spans samples and no block is wasted on K=78 not being a power of
    two. 1-D grid of cdiv(M, BLOCK_M) * cdiv(D, BLOCK_D) programs, the D-blocks of one row block
    adjacent (they re-read the same pixels from L2). Each program loads its BLOCK_M indices once,
    turns them into pixel row offsets (row = idx // grid_w, col = idx % grid_w, all four image
    strides), then loops over the reduction R = C*p*p in BLOCK_R chunks: gathers a
    (BLOCK_M x BLOCK_R) pixel tile straight from the image, loads the (BLOCK_R x BLOCK_D) tile of
    weight^T and accumulates with tl.dot in fp32 (operands in the matmul dtype: bf16/fp16 tensor
    cores, or fp32 as tf32x3 — fp32-accurate — unless torch allows tf32 matmuls, then tf32; the
    interpreter upcasts everything to fp32).
    The epilogue adds bias and pos_embed[idx] in fp32 and stores once in the output dtype. Masked
    patches are never read, embedded or written. On CUDA the block sizes are autotuned (key M, D, R).
  * no weight: `_patch_pixels_kernel` copies the K patches' pixels into (B, K, C*p*p).
  * backward (only what ctx.needs_input_grad asks for):
      grad_bias   = sum of g over (B, K) in fp32;
      grad_pos    = fp32 atomic scatter-add of the rows of g into (N, D) (`_token_scatter_kernel`);
      grad_weight = g^T @ patches with ONE torch GEMM on patches re-gathered by the Triton gather
                    kernel. Chosen over a fused Triton reduction: the output is only D x C*p*p
                    (36 tiles of 128x128) while the reduction runs over M ~ 10-20 k rows, which
                    needs split-K; cuBLAS does that well, and the price is one (M, C*p*p) patch
                    round trip (~30 MB bf16 at B=128, ~10 us) on a path SIM never runs (the patch
                    embedding is frozen);
      grad_images = (g @ weight) scattered with fp32 atomics into a zeroed fp32 image
                    (`_patch_scatter_kernel`), then cast; untouched patches get exact zeros.
  * token_gather: `_token_gather_kernel`, grid (cdiv(B*K, BLOCK_M), cdiv(D, BLOCK_D)), a masked
    row copy. Backward `_token_scatter_kernel`: fp32 tl.atomic_add into a zeroed fp32 (B, N, D)
    buffer, then a cast (non-deterministic summation order only where idx has duplicates). With
    unique_indices=True (caller guarantees no duplicates within a row, e.g. visible indices) it
    writes plain stores straight into a zeroed buffer of the tokens' dtype: deterministic, no fp32
    buffer and no cast pass. If the promise is broken one of the duplicates wins (never out of
    bounds). The reference maths ignore unique_indices (scatter_add is right either way).

Roofline (the recipe: ViT-B/16, 224 px, B=128, G=14, N=196, K=78 visible, C*p*p=768, D=768):
    patch_gather with weight must read only the gathered pixels, B*K*C*p*p = 7.67 M values
    (15.3 MB bf16 / 30.7 MB fp32), the weight (1.2 MB bf16), the 196-row pos table (0.6 MB fp32),
    and write B*K*D = 7.67 M outputs (15.3 MB bf16, 30.7 MB fp32 when the fp32 table promotes);
    it does 2*B*K*768*768 = 11.8 GFLOP. That is 250-370 FLOP/byte, at or above the H100's bf16
    ridge (~250-300 FLOP/byte for ~700 TFLOP/s over ~2.6-3 TB/s), so the fused kernel is bound by
    tensor-core throughput first and bandwidth second (bench/test_patch_gather.py reports both
    fractions). The unfused path (Conv2d on the whole image, then gather) moves 196/78 = 2.5x the
    pixels and FLOPs and writes the (B, 196, D) token tensor for masked patches too; the fused
    kernel avoids that.
    token_gather moves 2*B*K*D values (read + write), no FLOPs: 30.7 MB at bf16 for the sizes
    above; its backward reads B*K*D and must write all B*N*D gradient values (zeros included).
"""
import functools
import os

import torch

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton
    import triton.language as tl
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device, dtypes):
    """Called after validation. 'auto': Triton for CUDA tensors of supported dtypes when triton is
    importable, else the reference. 'triton' runs Triton or raises RuntimeError saying why; it
    never silently falls back. CPU tensors run Triton only under TRITON_INTERPRET=1."""
    if backend == "reference":
        return "reference"
    supported = all(dtype in _TRITON_DTYPES for dtype in dtypes)
    if backend == "auto":
        ok = _TRITON_IMPORTABLE and device.type == "cuda" and supported
        return "triton" if ok else "reference"
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which is not "
                           f"importable here; use backend='auto' or backend='reference'")
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got CPU tensors and "
                           f"TRITON_INTERPRET is not '1'); use backend='auto' or 'reference'")
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"{op_name}: backend='triton' cannot run on {device.type} tensors")
    if not supported:
        bad = sorted({str(dtype) for dtype in dtypes if dtype not in _TRITON_DTYPES})
        raise RuntimeError(f"{op_name}: the Triton kernels take fp32/bf16/fp16 tensors, got "
                           f"{', '.join(bad)}; use backend='reference' for those")
    return "triton"


def _describe(tensor):
    return f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"


def _check_tensor(op_name, name, value):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_on_device(ok: torch.Tensor, message: str) -> None:
    """A value check without a host sync. `ok` is a 0-d bool tensor on the inputs' device.
    On CUDA (and inside torch.compile) it is torch._assert_async: the step goes on and a
    failure stops the next synchronisation with `message`. On CPU there is no device to
    wait for, so the same check raises ValueError(message) at once."""
    if ok.device.type == "meta":
        return
    if torch.compiler.is_compiling() or ok.device.type != "cpu":
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


def _check_index(op_name, idx, batch, device):
    """idx must be (batch, K) int64 on `device` (shape, dtype and device only: no value read)."""
    _check_tensor(op_name, "idx", idx)
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"{op_name}: idx must be int64 of shape (B, K) with B={batch}, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{op_name}: idx must be on the same device as the data ({device}), "
                         f"got {idx.device}")


def _check_index_range(op_name, idx, num_items):
    """Every idx value in [0, num_items), checked on the device (no host sync; see
    _check_on_device). A bad index must never reach a kernel as an out-of-bounds access: the
    Triton kernels mask every access by the index as well, so this check is about a clear error,
    not memory safety."""
    if idx.numel() == 0:
        return
    ok = ((idx >= 0) & (idx < num_items)).all()
    _check_on_device(ok, f"{op_name}: idx values must lie in [0, {num_items})")


def _validate_patch_gather(images, idx, patch_size, weight, bias, pos_embed):
    """Shapes, dtypes and devices only (no value read); returns N, the number of patches."""
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
    _check_index(op, idx, batch, images.device)

    patch_dim = channels * patch_size * patch_size
    if weight is None:
        if bias is not None or pos_embed is not None:
            raise ValueError(f"{op}: bias and pos_embed need weight (they act on embedded tokens); "
                             f"got weight=None")
        return num_patches
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
    return num_patches


def _validate_token_gather(tokens, idx):
    """Shapes, dtypes and devices only (no value read); returns N, the number of tokens."""
    op = "token_gather"
    _check_tensor(op, "tokens", tokens)
    if tokens.dim() != 3:
        raise ValueError(f"{op}: tokens must have shape (B, N, D), got {_describe(tokens)}")
    _check_index(op, idx, tokens.shape[0], tokens.device)
    return tokens.shape[1]


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


# ---------------------------------------------------------------------------------------------
# Reference maths of the registered ops (the CPU implementation): the reference above with an
# explicit matmul dtype, and its backward written out with the ops autograd records for it
# ---------------------------------------------------------------------------------------------
def _embed_dtypes(images_dtype, weight_dtype, matmul_dtype, has_bias, pos_dtype):
    """(compute, matmul, after-bias, output) dtypes of the embedded forward."""
    compute = torch.promote_types(images_dtype, weight_dtype)
    matmul = compute if matmul_dtype is None else matmul_dtype
    biased = torch.promote_types(matmul, compute) if has_bias else matmul
    out = biased if pos_dtype is None else torch.promote_types(biased, pos_dtype)
    return compute, matmul, biased, out


def _autocast_matmul_dtype(device, images_dtype, weight_dtype):
    """The matmul dtype patch_gather_reference gets from autocast here, or None (no autocast, or
    float64 operands, which autocast leaves alone)."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    if torch.promote_types(images_dtype, weight_dtype) == torch.float64:
        return None
    return torch.get_autocast_dtype(device.type)


def _patch_index(images, idx, patch_size):
    """(the (B, Gh, Gw, C, p, p) view of images, the index tuple of the gathered patches)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patch_view = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patch_view = patch_view.permute(0, 2, 4, 1, 3, 5)
    batch_index = torch.arange(batch, device=images.device).unsqueeze(1)
    return patch_view, (batch_index, idx // grid_w, idx % grid_w)


def _reference_patch_forward(images, idx, patch_size, weight2d, bias, pos_embed, matmul_dtype):
    """patch_gather_reference with the matmul operands cast to matmul_dtype (None: no cast
    beyond promote(images, weight)), i.e. what the reference computes under autocast."""
    batch, channels = images.shape[:2]
    patch_view, index = _patch_index(images, idx, patch_size)
    patches = patch_view[index].reshape(batch, idx.shape[1], channels * patch_size * patch_size)
    if weight2d is None:
        return patches
    compute, matmul, _, _ = _embed_dtypes(images.dtype, weight2d.dtype, matmul_dtype,
                                          bias is not None, None)
    tokens = patches.to(compute).to(matmul) @ weight2d.to(compute).to(matmul).t()
    if bias is not None:
        tokens = tokens + bias.to(compute)
    if pos_embed is not None:
        tokens = tokens + pos_embed[idx]
    return tokens


def _scatter_patches(grad_patches, images, idx, patch_size):
    """d images of gathering patches: zeros with grad_patches (B, K, C*p*p) accumulated into the
    gathered patches (index_put_ with accumulate, as autograd's index backward)."""
    batch, channels, height, width = images.shape
    patch_view, index = _patch_index(images, idx, patch_size)
    grad_view = torch.zeros(patch_view.shape, dtype=images.dtype, device=images.device)
    grad_view.index_put_(index, grad_patches.reshape(batch, idx.shape[1], channels, patch_size,
                                                     patch_size), accumulate=True)
    return grad_view.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def _reference_patch_backward(grad_out, images, idx, patch_size, weight2d, matmul_dtype,
                              bias_dtype, pos_dtype, need_images, need_weight, need_bias,
                              need_pos):
    """The gradients autograd computes for _reference_patch_forward (same ops, casts and
    reductions; None for those not needed)."""
    grad_images = grad_weight = grad_bias = grad_pos = None
    if weight2d is None:
        if need_images:
            grad_images = _scatter_patches(grad_out.to(images.dtype), images, idx, patch_size)
        return grad_images, grad_weight, grad_bias, grad_pos
    compute, matmul, biased, _ = _embed_dtypes(images.dtype, weight2d.dtype, matmul_dtype,
                                               bias_dtype is not None, pos_dtype)
    if need_pos:
        grad_pos = torch.zeros(_num_patches(images, patch_size), weight2d.shape[0],
                               dtype=pos_dtype, device=grad_out.device)
        grad_pos.index_put_((idx,), grad_out.to(pos_dtype), accumulate=True)
    grad_biased = grad_out.to(biased)
    if need_bias:  # sum_to over (B, K) in the dtype of the sum, then bias.to(compute)'s casts
        grad_bias = grad_biased.sum((0, 1)).to(compute).to(bias_dtype)
    if need_images or need_weight:
        batch, count = idx.shape
        grad2d = grad_biased.to(matmul).reshape(batch * count, weight2d.shape[0])
        mat1 = None
        if need_weight:
            mat1 = _reference_patch_forward(images, idx, patch_size, None, None, None, None)
            mat1 = mat1.to(compute).to(matmul).reshape(batch * count, weight2d.shape[1])
        mat2 = weight2d.to(compute).to(matmul).t()
        grad_mat1, grad_mat2 = _mm_backward(grad2d, mat1, mat2, need_images, need_weight)
        if need_images:
            grad_patches = grad_mat1.to(compute).to(images.dtype)
            grad_images = _scatter_patches(grad_patches, images, idx, patch_size)
        if need_weight:
            grad_weight = grad_mat2.t().to(compute).to(weight2d.dtype)
    return grad_images, grad_weight, grad_bias, grad_pos


def _mm_backward(grad, mat1, mat2, need_mat1, need_mat2):
    """The gradients of mat1 @ mat2 as autograd's mm backward forms them (a column-major operand
    gets its gradient computed transposed, so the products, and their rounding, are the same)."""
    grad_mat1 = grad_mat2 = None
    if need_mat1:
        if mat1 is not None and mat1.stride(0) == 1 and mat1.stride(1) == mat1.shape[0]:
            grad_mat1 = (mat2 @ grad.t()).t()
        else:
            grad_mat1 = grad @ mat2.t()
    if need_mat2:
        if mat2.stride(0) == 1 and mat2.stride(1) == mat2.shape[0]:
            grad_mat2 = (grad.t() @ mat1).t()
        else:
            grad_mat2 = mat1.t() @ grad
    return grad_mat1, grad_mat2


def _num_patches(images, patch_size):
    return (images.shape[2] // patch_size) * (images.shape[3] // patch_size)


def _reference_token_backward(grad_out, idx, num_tokens):
    """gather's backward: zeros(B, N, D).scatter_add_(1, idx, grad) (duplicates accumulate)."""
    batch, count, dim = grad_out.shape
    grad = torch.zeros((batch, num_tokens, dim), dtype=grad_out.dtype, device=grad_out.device)
    return grad.scatter_add_(1, idx.unsqueeze(-1).expand(batch, count, dim), grad_out)


# ---------------------------------------------------------------------------------------------
# Triton kernels (see the module docstring for the launch structure)
# ---------------------------------------------------------------------------------------------
if _TRITON_IMPORTABLE:

    @triton.jit
    def _patch_rows(idx_ptr, offs_m, M, K, num_patches, grid_w, s_xb, s_xk, s_ib, s_ih, s_iw,
                    PATCH: tl.constexpr):
        """For gathered rows m = b*K + k: the image offset of the patch's top-left pixel, the patch
        index (0 where invalid) and whether the row is valid (in range, index in [0, N))."""
        in_rows = offs_m < M
        b = (offs_m // K).to(tl.int64)
        k = (offs_m % K).to(tl.int64)
        patch = tl.load(idx_ptr + b * s_xb + k * s_xk, mask=in_rows, other=0)
        valid = in_rows & (patch >= 0) & (patch < num_patches)
        patch = tl.where(valid, patch, 0)
        patch_row = patch // grid_w
        patch_col = patch - patch_row * grid_w
        row_off = b * s_ib + patch_row * (PATCH * s_ih) + patch_col * (PATCH * s_iw)
        return row_off, patch, valid

    @triton.jit
    def _patch_cols(offs_r, s_ic, s_ih, s_iw, PATCH: tl.constexpr):
        """Offset inside a patch of the flattened position r = (c*p + i)*p + j."""
        c = (offs_r // (PATCH * PATCH)).to(tl.int64)
        i = ((offs_r // PATCH) % PATCH).to(tl.int64)
        j = (offs_r % PATCH).to(tl.int64)
        return c * s_ic + i * s_ih + j * s_iw

    @triton.jit
    def _embed_fwd_kernel(img_ptr, idx_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
                          M, K, R, D, num_patches, grid_w,
                          s_ib, s_ic, s_ih, s_iw, s_xb, s_xk, s_wd, s_wr, s_bd, s_pn, s_pd,
                          s_om, s_od,
                          PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_R: tl.constexpr):
        """out[m, d] = sum_r pixel(m, r) * w[d, r] + bias[d] + pos[idx[m], d]; DOT_DTYPE: 0 fp32
        (with INPUT_PRECISION), 1 bf16, 2 fp16 operands; always fp32 accumulation."""
        pid = tl.program_id(0)
        num_d_blocks = tl.cdiv(D, BLOCK_D)
        pid_m = pid // num_d_blocks
        pid_d = pid % num_d_blocks
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        row_off, patch, valid = _patch_rows(idx_ptr, offs_m, M, K, num_patches, grid_w,
                                            s_xb, s_xk, s_ib, s_ih, s_iw, PATCH)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for r_start in range(0, R, BLOCK_R):
            offs_r = r_start + tl.arange(0, BLOCK_R)
            in_r = offs_r < R
            col_off = _patch_cols(offs_r, s_ic, s_ih, s_iw, PATCH)
            pixels = tl.load(img_ptr + row_off[:, None] + col_off[None, :],
                             mask=valid[:, None] & in_r[None, :], other=0.0)
            w_t = tl.load(w_ptr + offs_r[:, None] * s_wr + offs_d[None, :] * s_wd,
                          mask=in_r[:, None] & in_d[None, :], other=0.0)
            if UPCAST:  # the interpreter gets low-precision arithmetic wrong: work in fp32 there
                pixels = pixels.to(tl.float32)
                w_t = w_t.to(tl.float32)
            if DOT_DTYPE == 1:
                acc = tl.dot(pixels.to(tl.bfloat16), w_t.to(tl.bfloat16), acc)
            elif DOT_DTYPE == 2:
                acc = tl.dot(pixels.to(tl.float16), w_t.to(tl.float16), acc)
            else:
                acc = tl.dot(pixels.to(tl.float32), w_t.to(tl.float32), acc,
                             input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d * s_bd, mask=in_d, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if HAS_POS:
            pos = tl.load(pos_ptr + patch[:, None] * s_pn + offs_d[None, :] * s_pd,
                          mask=valid[:, None] & in_d[None, :], other=0.0).to(tl.float32)
            acc += pos
        out_mask = (offs_m < M)[:, None] & in_d[None, :]
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :] * s_od,
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    # Hopper-friendly candidates; configs that exceed shared memory are skipped by the autotuner.
    _EMBED_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_R": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_D": 256, "BLOCK_R": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_D": 256, "BLOCK_R": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_R": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_R": 64}, num_warps=4, num_stages=4),
    ]
    _embed_fwd_kernel_tuned = triton.autotune(configs=_EMBED_CONFIGS,
                                              key=["M", "D", "R"])(_embed_fwd_kernel)

    @triton.jit
    def _patch_pixels_kernel(img_ptr, idx_ptr, out_ptr, M, K, R, num_patches, grid_w,
                             s_ib, s_ic, s_ih, s_iw, s_xb, s_xk, s_om, s_or,
                             PATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[m, r] = pixel r of patch idx[m] (zeros for an invalid index)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        row_off, patch, valid = _patch_rows(idx_ptr, offs_m, M, K, num_patches, grid_w,
                                            s_xb, s_xk, s_ib, s_ih, s_iw, PATCH)
        col_off = _patch_cols(offs_r, s_ic, s_ih, s_iw, PATCH)
        pixels = tl.load(img_ptr + row_off[:, None] + col_off[None, :],
                         mask=valid[:, None] & in_r[None, :], other=0.0)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * s_om + offs_r[None, :] * s_or, pixels,
                 mask=(offs_m < M)[:, None] & in_r[None, :])

    @triton.jit
    def _patch_scatter_kernel(src_ptr, idx_ptr, dst_ptr, M, K, R, num_patches, grid_w,
                              s_db, s_dc, s_dh, s_dw, s_xb, s_xk, s_sm, s_sr,
                              PATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
        """dst (fp32 image) pixel r of patch idx[m] += src[m, r]; invalid indices add nothing."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        row_off, patch, valid = _patch_rows(idx_ptr, offs_m, M, K, num_patches, grid_w,
                                            s_xb, s_xk, s_db, s_dh, s_dw, PATCH)
        col_off = _patch_cols(offs_r, s_dc, s_dh, s_dw, PATCH)
        mask = valid[:, None] & in_r[None, :]
        values = tl.load(src_ptr + offs_m[:, None].to(tl.int64) * s_sm + offs_r[None, :] * s_sr,
                         mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(dst_ptr + row_off[:, None] + col_off[None, :], values, mask=mask,
                      sem="relaxed")

    @triton.jit
    def _token_gather_kernel(src_ptr, idx_ptr, out_ptr, M, K, N, D,
                             s_sb, s_sn, s_sd, s_xb, s_xk, s_om, s_od,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[m, d] = src[b, idx[b, k], d] for m = b*K + k (zeros for an invalid index)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_m = offs_m < M
        in_d = offs_d < D
        b = (offs_m // K).to(tl.int64)
        k = (offs_m % K).to(tl.int64)
        row = tl.load(idx_ptr + b * s_xb + k * s_xk, mask=in_m, other=0)
        valid = in_m & (row >= 0) & (row < N)
        row = tl.where(valid, row, 0)
        values = tl.load(src_ptr + (b * s_sb + row * s_sn)[:, None] + offs_d[None, :] * s_sd,
                         mask=valid[:, None] & in_d[None, :], other=0.0)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :] * s_od, values,
                 mask=in_m[:, None] & in_d[None, :])

    @triton.jit
    def _token_scatter_kernel(src_ptr, idx_ptr, dst_ptr, M, K, N, D,
                              s_sb, s_sk, s_sd, s_xb, s_xk, s_db, s_dn, s_dd,
                              ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """dst[b, idx[b, k], d] (+)= src[b, k, d]. s_db = 0 folds every sample into one (N, D)
        table (the pos_embed gradient). ATOMIC: fp32 atomic add; else a plain store (caller
        promises no duplicate within a row)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_m = offs_m < M
        in_d = offs_d < D
        b = (offs_m // K).to(tl.int64)
        k = (offs_m % K).to(tl.int64)
        row = tl.load(idx_ptr + b * s_xb + k * s_xk, mask=in_m, other=0)
        valid = in_m & (row >= 0) & (row < N)
        row = tl.where(valid, row, 0)
        mask = valid[:, None] & in_d[None, :]
        values = tl.load(src_ptr + (b * s_sb + k * s_sk)[:, None] + offs_d[None, :] * s_sd,
                         mask=mask, other=0.0)
        dst = dst_ptr + (b * s_db + row * s_dn)[:, None] + offs_d[None, :] * s_dd
        if ATOMIC:
            tl.atomic_add(dst, values.to(tl.float32), mask=mask, sem="relaxed")
        else:
            tl.store(dst, values.to(dst_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers (inputs already validated; every tensor may have arbitrary strides). The per-shape
# launch decisions come from the lru_cache'd *_plan functions, keyed on plain Python values.
# ---------------------------------------------------------------------------------------------
def _pow2_block(n, cap, floor):
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _dot_settings(matmul_dtype, interpreting=None, allow_tf32=None):
    """(DOT_DTYPE code, fp32 input precision, UPCAST) for the embedding matmul."""
    if interpreting is None:
        interpreting = _interpreting()
    if interpreting:
        return 0, "ieee", True
    if matmul_dtype == torch.bfloat16:
        return 1, "ieee", False
    if matmul_dtype == torch.float16:
        return 2, "ieee", False
    # fp32 operands: match torch's own fp32 matmul setting (exact-ish fp32 unless tf32 is allowed)
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return 0, ("tf32" if allow_tf32 else "tf32x3"), False


@functools.lru_cache(maxsize=256)
def _embed_plan(rows, embed_dim, patch_dim, matmul_dtype, tuned, interpreting, allow_tf32):
    """(grid, constexpr meta) of the embedded forward. tuned: the autotuned kernel (CUDA, not
    interpreting) picks BLOCK_M/D/R itself, so its grid is a function of the chosen config."""
    dot_dtype, precision, upcast = _dot_settings(matmul_dtype, interpreting, allow_tf32)
    meta = {"DOT_DTYPE": dot_dtype, "INPUT_PRECISION": precision, "UPCAST": upcast}
    if tuned:
        def grid(cfg):
            return (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(embed_dim, cfg["BLOCK_D"]),)
        return grid, meta
    block_m, block_d = _pow2_block(rows, 64, 16), _pow2_block(embed_dim, 64, 16)
    meta.update(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=_pow2_block(patch_dim, 64, 16))
    return (triton.cdiv(rows, block_m) * triton.cdiv(embed_dim, block_d),), meta


@functools.lru_cache(maxsize=256)
def _pixels_plan(rows, patch_dim):
    """(grid, BLOCK_M, BLOCK_R) of the patch copy / scatter kernels."""
    block_m, block_r = 16, _pow2_block(patch_dim, 256, 16)
    return (triton.cdiv(rows, block_m), triton.cdiv(patch_dim, block_r)), block_m, block_r


@functools.lru_cache(maxsize=256)
def _token_plan(rows, dim):
    """(grid, BLOCK_M, BLOCK_D) of the token gather / scatter kernels."""
    block_m, block_d = 16, _pow2_block(dim, 256, 1)
    return (triton.cdiv(rows, block_m), triton.cdiv(dim, block_d)), block_m, block_d


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


def _embed_out_dtype(images, weight2d, pos_embed, bias=None, matmul_dtype=None):
    return _embed_dtypes(images.dtype, weight2d.dtype, matmul_dtype, bias is not None,
                         None if pos_embed is None else pos_embed.dtype)[3]


def _launch_embed_forward(images, idx, weight2d, bias, pos_embed, patch_size, out=None,
                          matmul_dtype=None):
    """(B, K, D) embedded tokens; `out` (contiguous, right shape/dtype) is overwritten if given.
    matmul_dtype: the dot operands' dtype (None: promote(images, weight))."""
    batch, _, height, width = images.shape
    count = idx.shape[1]
    embed_dim, patch_dim = weight2d.shape
    rows = batch * count
    if matmul_dtype is None:
        matmul_dtype = torch.promote_types(images.dtype, weight2d.dtype)
    if out is None:
        out = torch.empty((batch, count, embed_dim), device=images.device,
                          dtype=_embed_out_dtype(images, weight2d, pos_embed, bias, matmul_dtype))
    if rows == 0 or embed_dim == 0:
        return out
    grid_w = width // patch_size
    num_patches = (height // patch_size) * grid_w
    out2d = out.view(rows, embed_dim)
    interpreting = _interpreting()
    tuned = images.is_cuda and not interpreting
    grid, meta = _embed_plan(rows, embed_dim, patch_dim, matmul_dtype, tuned, interpreting,
                             torch.backends.cuda.matmul.allow_tf32)
    kernel = _embed_fwd_kernel_tuned if tuned else _embed_fwd_kernel
    kernel[grid](images, idx, weight2d,
                 bias if bias is not None else out2d, pos_embed if pos_embed is not None else out2d,
                 out2d, rows, count, patch_dim, embed_dim, num_patches, grid_w,
                 *images.stride(), *idx.stride(), *weight2d.stride(),
                 bias.stride(0) if bias is not None else 0,
                 *(pos_embed.stride() if pos_embed is not None else (0, 0)), *out2d.stride(),
                 PATCH=patch_size, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
                 **meta)
    return out


def _launch_patch_pixels(images, idx, patch_size, out=None):
    """(B, K, C*p*p) gathered pixels in the images' dtype."""
    batch, channels, height, width = images.shape
    count = idx.shape[1]
    patch_dim = channels * patch_size * patch_size
    rows = batch * count
    if out is None:
        out = torch.empty((batch, count, patch_dim), dtype=images.dtype, device=images.device)
    if rows == 0 or patch_dim == 0:
        return out
    grid_w = width // patch_size
    out2d = out.view(rows, patch_dim)
    grid, block_m, block_r = _pixels_plan(rows, patch_dim)
    _patch_pixels_kernel[grid](images, idx, out2d, rows, count, patch_dim,
                               (height // patch_size) * grid_w, grid_w,
                               *images.stride(), *idx.stride(), *out2d.stride(),
                               PATCH=patch_size, BLOCK_M=block_m, BLOCK_R=block_r, num_warps=4)
    return out


def _launch_patch_scatter(src2d, idx, image_shape, patch_size, dtype):
    """Zero image of `image_shape` with src2d[b*K + k] accumulated (fp32) into patch idx[b, k]."""
    _, _, height, width = image_shape
    count = idx.shape[1]
    rows, patch_dim = src2d.shape
    grad = torch.zeros(image_shape, dtype=torch.float32, device=src2d.device)
    if rows and patch_dim:
        grid_w = width // patch_size
        grid, block_m, block_r = _pixels_plan(rows, patch_dim)
        _patch_scatter_kernel[grid](src2d, idx, grad, rows, count, patch_dim,
                                    (height // patch_size) * grid_w, grid_w,
                                    *grad.stride(), *idx.stride(), *src2d.stride(),
                                    PATCH=patch_size, BLOCK_M=block_m, BLOCK_R=block_r,
                                    num_warps=4)
    return grad if dtype == torch.float32 else grad.to(dtype)


def _launch_token_gather(tokens, idx, out=None):
    batch, num_tokens, dim = tokens.shape
    count = idx.shape[1]
    rows = batch * count
    if out is None:
        out = torch.empty((batch, count, dim), dtype=tokens.dtype, device=tokens.device)
    if rows == 0 or dim == 0:
        return out
    out2d = out.view(rows, dim)
    grid, block_m, block_d = _token_plan(rows, dim)
    _token_gather_kernel[grid](tokens, idx, out2d, rows, count, num_tokens, dim,
                               *tokens.stride(), *idx.stride(), *out2d.stride(),
                               BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return out


def _launch_token_scatter(src, idx, num_rows, dtype, shared_table=False, atomic=True):
    """Gradient of a row gather: (B, num_rows, D), or one (num_rows, D) table summed over the
    batch when shared_table. atomic: fp32 accumulation then a cast; else plain stores (rows of
    idx must hold no duplicates)."""
    batch, count, dim = src.shape
    shape = (num_rows, dim) if shared_table else (batch, num_rows, dim)
    grad = torch.zeros(shape, dtype=torch.float32 if atomic else dtype, device=src.device)
    rows = batch * count
    if rows and dim:
        s_dn, s_dd = grad.stride()[-2:]
        s_db = 0 if shared_table else grad.stride(0)
        grid, block_m, block_d = _token_plan(rows, dim)
        _token_scatter_kernel[grid](src, idx, grad, rows, count, num_rows, dim,
                                    *src.stride(), *idx.stride(), s_db, s_dn, s_dd,
                                    ATOMIC=atomic, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return grad if grad.dtype == dtype else grad.to(dtype)


def _triton_patch_backward(grad_out, images, idx, patch_size, weight2d, matmul_dtype, pos_dtype,
                           bias_dtype, need_images, need_weight, need_bias, need_pos):
    """The Triton path's gradients (None for those not needed); see the module docstring."""
    grad_images = grad_weight = grad_bias = grad_pos = None
    batch, count = idx.shape
    rows = batch * count
    if weight2d is None:
        if need_images:
            patch_dim = images.shape[1] * patch_size * patch_size
            grad_images = _launch_patch_scatter(grad_out.reshape(rows, patch_dim), idx,
                                                tuple(images.shape), patch_size, images.dtype)
        return grad_images, grad_weight, grad_bias, grad_pos
    compute = torch.promote_types(images.dtype, weight2d.dtype)
    matmul = compute if matmul_dtype is None else matmul_dtype
    grad2d = grad_out.reshape(rows, weight2d.shape[0])
    if need_images:
        grad_patches = grad2d.to(matmul) @ weight2d.to(compute).to(matmul)
        grad_images = _launch_patch_scatter(grad_patches, idx, tuple(images.shape), patch_size,
                                            images.dtype)
    if need_weight:
        patches = _launch_patch_pixels(images, idx, patch_size).view(rows, weight2d.shape[1])
        grad_weight = (grad2d.to(matmul).t() @ patches.to(matmul)).to(weight2d.dtype)
    if need_bias:
        grad_bias = grad2d.sum(0, dtype=torch.float32).to(bias_dtype)
    if need_pos:
        grad_pos = _launch_token_scatter(grad_out, idx, _num_patches(images, patch_size),
                                         pos_dtype, shared_table=True)
    return grad_images, grad_weight, grad_bias, grad_pos


# ---------------------------------------------------------------------------------------------
# Registered ops (torch.library): fake implementations, autograd, CPU/CUDA implementations
# ---------------------------------------------------------------------------------------------
def _no_autocast(device):
    """The ops' bodies run with autocast off (their dtypes are explicit: see "Autocast")."""
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _fresh(tensor):
    """An op output: contiguous (what the fake implementations promise)."""
    return tensor.contiguous()


@torch.library.custom_op("densesim::patch_gather", mutates_args=(), device_types=("cpu", "cuda"))
def _patch_gather_op(images: torch.Tensor, idx: torch.Tensor, patch_size: int,
                     weight: torch.Tensor | None, bias: torch.Tensor | None,
                     pos_embed: torch.Tensor | None, matmul_dtype: torch.dtype | None,
                     use_triton: bool) -> torch.Tensor:
    """(B, K, C*p*p) patches, or (B, K, D) embedded tokens when weight (D, C*p*p) is given."""
    with _no_autocast(images.device), torch.no_grad():
        if use_triton:
            with _on_device(images.device):
                if weight is None:
                    return _launch_patch_pixels(images, idx, patch_size)
                return _launch_embed_forward(images, idx, weight, bias, pos_embed, patch_size,
                                             matmul_dtype=matmul_dtype)
        return _fresh(_reference_patch_forward(images, idx, patch_size, weight, bias, pos_embed,
                                               matmul_dtype))


@_patch_gather_op.register_fake
def _patch_gather_fake(images, idx, patch_size, weight, bias, pos_embed, matmul_dtype,
                       use_triton):
    batch, channels = images.shape[:2]
    count = idx.shape[1]
    if weight is None:
        return images.new_empty((batch, count, channels * patch_size * patch_size))
    dtype = _embed_out_dtype(images, weight, pos_embed, bias, matmul_dtype)
    return images.new_empty((batch, count, weight.shape[0]), dtype=dtype)


@torch.library.custom_op("densesim::patch_gather_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _patch_gather_backward_op(grad_out: torch.Tensor, images: torch.Tensor, idx: torch.Tensor,
                              patch_size: int, weight: torch.Tensor | None,
                              matmul_dtype: torch.dtype | None,
                              bias_dtype: torch.dtype | None, pos_dtype: torch.dtype | None,
                              need_images: bool, need_weight: bool, need_bias: bool,
                              need_pos: bool, use_triton: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_images, grad_weight, grad_bias, grad_pos); an unneeded one is an empty (0,) tensor."""
    with _no_autocast(images.device), torch.no_grad():
        if use_triton:
            with _on_device(images.device):
                grads = _triton_patch_backward(grad_out, images, idx, patch_size, weight,
                                               matmul_dtype, pos_dtype, bias_dtype, need_images,
                                               need_weight, need_bias, need_pos)
        else:
            grads = _reference_patch_backward(grad_out, images, idx, patch_size, weight,
                                              matmul_dtype, bias_dtype, pos_dtype, need_images,
                                              need_weight, need_bias, need_pos)
    return tuple(images.new_empty((0,)) if grad is None else _fresh(grad) for grad in grads)


@_patch_gather_backward_op.register_fake
def _patch_gather_backward_fake(grad_out, images, idx, patch_size, weight, matmul_dtype,
                                bias_dtype, pos_dtype, need_images, need_weight, need_bias,
                                need_pos, use_triton):
    grad_images = images.new_empty(images.shape) if need_images else images.new_empty((0,))
    if weight is None:
        return grad_images, images.new_empty((0,)), images.new_empty((0,)), images.new_empty((0,))
    embed_dim = weight.shape[0]
    grad_weight = weight.new_empty(weight.shape) if need_weight else images.new_empty((0,))
    grad_bias = (images.new_empty((embed_dim,), dtype=bias_dtype) if need_bias
                 else images.new_empty((0,)))
    grad_pos = (images.new_empty((_num_patches(images, patch_size), embed_dim), dtype=pos_dtype)
                if need_pos else images.new_empty((0,)))
    return grad_images, grad_weight, grad_bias, grad_pos


def _patch_gather_setup_context(ctx, inputs, output):
    images, idx, patch_size, weight, bias, pos_embed, matmul_dtype, use_triton = inputs
    ctx.save_for_backward(images, idx, weight)
    ctx.patch_size, ctx.matmul_dtype, ctx.use_triton = patch_size, matmul_dtype, use_triton
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _patch_gather_backward(ctx, grad_out):
    images, idx, weight = ctx.saved_tensors
    need_images, _, _, need_weight, need_bias, need_pos, _, _ = ctx.needs_input_grad
    needs = (need_images, need_weight, need_bias, need_pos)
    if not any(needs):
        return None, None, None, None, None, None, None, None
    grads = _patch_gather_backward_op(grad_out, images, idx, ctx.patch_size, weight,
                                      ctx.matmul_dtype, ctx.bias_dtype, ctx.pos_dtype, *needs,
                                      ctx.use_triton)
    grad_images, grad_weight, grad_bias, grad_pos = (g if need else None
                                                     for g, need in zip(grads, needs))
    return grad_images, None, None, grad_weight, grad_bias, grad_pos, None, None


torch.library.register_autograd("densesim::patch_gather", _patch_gather_backward,
                                setup_context=_patch_gather_setup_context)


@torch.library.custom_op("densesim::token_gather", mutates_args=(), device_types=("cpu", "cuda"))
def _token_gather_op(tokens: torch.Tensor, idx: torch.Tensor, unique_indices: bool,
                     use_triton: bool) -> torch.Tensor:
    """(B, K, D): out[b, k] = tokens[b, idx[b, k]]. unique_indices only affects the backward."""
    with torch.no_grad():
        if use_triton:
            with _on_device(tokens.device):
                return _launch_token_gather(tokens, idx)
        return _fresh(token_gather_reference(tokens, idx))


@_token_gather_op.register_fake
def _token_gather_fake(tokens, idx, unique_indices, use_triton):
    return tokens.new_empty((tokens.shape[0], idx.shape[1], tokens.shape[2]))


@torch.library.custom_op("densesim::token_gather_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _token_gather_backward_op(grad_out: torch.Tensor, idx: torch.Tensor, num_tokens: int,
                              unique_indices: bool, use_triton: bool) -> torch.Tensor:
    """(B, num_tokens, D) in grad_out's dtype: grad_out's rows scatter-added at idx."""
    with torch.no_grad():
        if use_triton:
            with _on_device(grad_out.device):
                return _launch_token_scatter(grad_out, idx, num_tokens, grad_out.dtype,
                                             atomic=not unique_indices)
        return _fresh(_reference_token_backward(grad_out, idx, num_tokens))


@_token_gather_backward_op.register_fake
def _token_gather_backward_fake(grad_out, idx, num_tokens, unique_indices, use_triton):
    return grad_out.new_empty((grad_out.shape[0], num_tokens, grad_out.shape[2]))


def _token_gather_setup_context(ctx, inputs, output):
    tokens, idx, unique_indices, use_triton = inputs
    ctx.save_for_backward(idx)
    ctx.num_tokens, ctx.dtype = tokens.shape[1], tokens.dtype
    ctx.unique_indices, ctx.use_triton = unique_indices, use_triton


def _token_gather_backward(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    (idx,) = ctx.saved_tensors
    grad = _token_gather_backward_op(grad_out.to(ctx.dtype), idx, ctx.num_tokens,
                                     ctx.unique_indices, ctx.use_triton)
    return grad, None, None, None


torch.library.register_autograd("densesim::token_gather", _token_gather_backward,
                                setup_context=_token_gather_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def patch_gather(images, idx, patch_size, weight=None, bias=None, pos_embed=None, backend="auto",
                 check_index=True):
    """Gather (and optionally embed) the patches `idx` of `images`; see the module docstring.
    The idx range check runs on the device (no host sync: on CUDA a bad index fails at the next
    synchronisation, on CPU it raises ValueError at once); check_index=False skips it, and
    out-of-range indices then still never touch memory out of bounds on the Triton path."""
    op = "patch_gather"
    _check_backend_name(op, backend)
    num_patches = _validate_patch_gather(images, idx, patch_size, weight, bias, pos_embed)
    if check_index:
        _check_index_range(op, idx, num_patches)
    dtypes = [t.dtype for t in (images, weight, bias, pos_embed) if t is not None]
    use_triton = _select_backend(op, backend, images.device, dtypes) == "triton"
    if backend == "reference":
        return patch_gather_reference(images, idx, patch_size, weight, bias, pos_embed)
    # "auto" without Triton: the same op with its reference maths
    weight2d = matmul_dtype = None
    if weight is not None:
        weight2d = weight.reshape(weight.shape[0], -1)
        if not use_triton:  # the reference maths take autocast's matmul dtype, as the reference
            matmul_dtype = _autocast_matmul_dtype(images.device, images.dtype, weight.dtype)
    return _patch_gather_op(images, idx, patch_size, weight2d, bias, pos_embed, matmul_dtype,
                            use_triton)


def token_gather(tokens, idx, backend="auto", check_index=True, unique_indices=False):
    """out[b, k] = tokens[b, idx[b, k]]; backward scatter-adds (duplicate indices accumulate).
    unique_indices=True (Triton path): the caller promises no duplicates within a row of idx, so
    the backward writes plain stores (deterministic, no fp32 buffer). The idx range check runs on
    the device (see patch_gather); check_index=False skips it."""
    op = "token_gather"
    _check_backend_name(op, backend)
    num_tokens = _validate_token_gather(tokens, idx)
    if check_index:
        _check_index_range(op, idx, num_tokens)
    use_triton = _select_backend(op, backend, tokens.device, [tokens.dtype]) == "triton"
    if backend == "reference":
        return token_gather_reference(tokens, idx)
    return _token_gather_op(tokens, idx, bool(unique_indices), use_triton)
