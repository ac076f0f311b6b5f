"""Gather selected image patches (optionally embedded) and gather selected tokens.

patch_gather(images, idx, patch_size, weight=None, bias=None, pos_embed=None, backend="auto",
             check_index=True)
    images     (B, C, H, W)   fp32 / bf16 / fp16, any strides (channels-last or sliced is fine);
                              H and W divisible by p = patch_size.
    idx        (B, K)         int64 (any strides), raster-order patch indices over the
                              (H/p) x (W/p) grid, every entry in [0, N), N = (H/p)(W/p).
                              Duplicates are allowed.
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
    Gradients flow to images, weight, bias and pos_embed; backward scatters (accumulates) into the
    patches that were gathered, so duplicate indices add up.

token_gather(tokens, idx, backend="auto", check_index=True, unique_indices=False)
    tokens (B, N, D) any dtype, idx (B, K) int64 in [0, N)  ->  (B, K, D), out[b, k] = tokens[b, idx[b, k]].
    Backward scatter-adds into tokens (duplicates accumulate).

Index checking. By default idx is range-checked before anything runs (idx.min()/idx.max(): one
small reduction plus a host sync on the GPU, which also drains the CPU's launch queue; tens of
microseconds per call). Callers that guarantee the range (e.g. visible indices built from a mask)
may pass check_index=False to skip it. The Triton kernels still mask every access by the index, so
an out-of-range index can never read or write out of bounds: its embedded row holds just the bias
(pixels and position read as 0; the plain gather and token_gather give zeros) and it neither
receives nor contributes gradient. The reference path raises torch's own index error instead.

Triton path (backend="triton", or "auto" on CUDA tensors; fp32/bf16/fp16 only — float64 and other
dtypes run the reference under "auto", and "triton" refuses them):
  * embedded forward, one fused kernel `_embed_fwd_kernel`. The B*K gathered tokens are flattened to
    M = B*K rows, so a row block spans samples and no block is wasted on K=78 not being a power of
    two. 1-D grid of cdiv(M, BLOCK_M) * cdiv(D, BLOCK_D) programs, the D-blocks of one row block
    adjacent (they re-read the same pixels from L2). Each program loads its BLOCK_M indices once,
    turns them into pixel row offsets (row = idx // grid_w, col = idx % grid_w, all four image
    strides), then loops over the reduction R = C*p*p in BLOCK_R chunks: gathers a
    (BLOCK_M x BLOCK_R) pixel tile straight from the image, loads the (BLOCK_R x BLOCK_D) tile of
    weight^T and accumulates with tl.dot in fp32 (operands in promote(images, weight): bf16/fp16
    tensor cores, or fp32 as tf32x3 — fp32-accurate — unless torch allows tf32 matmuls, then tf32).
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
    buffer and no cast pass. If the promise is broken one of the duplicates wins (never out of bounds).

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


def _check_index(op_name, idx, batch, num_items, device, check_range=True):
    """idx must be (batch, K) int64 on `device` with all values in [0, num_items) (the range is
    checked only when check_range: it costs a reduction and, on the GPU, a host sync)."""
    _check_tensor(op_name, "idx", idx)
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"{op_name}: idx must be int64 of shape (B, K) with B={batch}, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{op_name}: idx must be on the same device as the data ({device}), "
                         f"got {idx.device}")
    # A bad index must never reach a kernel as an out-of-bounds read or write. Checking costs one
    # small reduction (and a host sync on GPU); meta tensors carry no values to check.
    if check_range and idx.numel() > 0 and idx.device.type != "meta":
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= num_items:
            raise ValueError(f"{op_name}: idx values must lie in [0, {num_items}), "
                             f"got min {low}, max {high}")


def _validate_patch_gather(images, idx, patch_size, weight, bias, pos_embed, check_index=True):
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
    _check_index(op, idx, batch, num_patches, images.device, check_index)

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


def _validate_token_gather(tokens, idx, check_index=True):
    op = "token_gather"
    _check_tensor(op, "tokens", tokens)
    if tokens.dim() != 3:
        raise ValueError(f"{op}: tokens must have shape (B, N, D), got {_describe(tokens)}")
    _check_index(op, idx, tokens.shape[0], tokens.shape[1], tokens.device, check_index)


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
# launchers (inputs already validated; every tensor may have arbitrary strides)
# ---------------------------------------------------------------------------------------------
def _pow2_block(n, cap, floor):
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _dot_settings(compute_dtype):
    """(DOT_DTYPE code, fp32 input precision, UPCAST) for the embedding matmul."""
    if _interpreting():
        return 0, "ieee", True
    if compute_dtype == torch.bfloat16:
        return 1, "ieee", False
    if compute_dtype == torch.float16:
        return 2, "ieee", False
    # fp32 operands: match torch's own fp32 matmul setting (exact-ish fp32 unless tf32 is allowed)
    return 0, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"), False


def _embed_out_dtype(images, weight2d, pos_embed):
    dtype = torch.promote_types(images.dtype, weight2d.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


def _launch_embed_forward(images, idx, weight2d, bias, pos_embed, patch_size, out=None):
    """(B, K, D) embedded tokens; `out` (contiguous, right shape/dtype) is overwritten if given."""
    batch, _, height, width = images.shape
    count = idx.shape[1]
    embed_dim, patch_dim = weight2d.shape
    rows = batch * count
    if out is None:
        out = torch.empty((batch, count, embed_dim), device=images.device,
                          dtype=_embed_out_dtype(images, weight2d, pos_embed))
    if rows == 0 or embed_dim == 0:
        return out
    grid_w = width // patch_size
    num_patches = (height // patch_size) * grid_w
    out2d = out.view(rows, embed_dim)
    dot_dtype, precision, upcast = _dot_settings(torch.promote_types(images.dtype, weight2d.dtype))
    args = (images, idx, weight2d,
            bias if bias is not None else out2d, pos_embed if pos_embed is not None else out2d,
            out2d, rows, count, patch_dim, embed_dim, num_patches, grid_w,
            *images.stride(), *idx.stride(), *weight2d.stride(),
            bias.stride(0) if bias is not None else 0,
            *(pos_embed.stride() if pos_embed is not None else (0, 0)), *out2d.stride())
    meta = dict(PATCH=patch_size, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
                DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, UPCAST=upcast)
    if images.is_cuda and not _interpreting():
        def grid(cfg):
            return (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(embed_dim, cfg["BLOCK_D"]),)
        _embed_fwd_kernel_tuned[grid](*args, **meta)
    else:
        block_m, block_d = _pow2_block(rows, 64, 16), _pow2_block(embed_dim, 64, 16)
        block_r = _pow2_block(patch_dim, 64, 16)
        grid = (triton.cdiv(rows, block_m) * triton.cdiv(embed_dim, block_d),)
        _embed_fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r)
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
    block_m, block_r = 16, _pow2_block(patch_dim, 256, 16)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(patch_dim, block_r))
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
        block_m, block_r = 16, _pow2_block(patch_dim, 256, 16)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(patch_dim, block_r))
        _patch_scatter_kernel[grid](src2d, idx, grad, rows, count, patch_dim,
                                    (height // patch_size) * grid_w, grid_w,
                                    *grad.stride(), *idx.stride(), *src2d.stride(),
                                    PATCH=patch_size, BLOCK_M=block_m, BLOCK_R=block_r,
                                    num_warps=4)
    return grad if dtype == torch.float32 else grad.to(dtype)


def _token_blocks(dim):
    return 16, _pow2_block(dim, 256, 1)


def _launch_token_gather(tokens, idx, out=None):
    batch, num_tokens, dim = tokens.shape
    count = idx.shape[1]
    rows = batch * count
    if out is None:
        out = torch.empty((batch, count, dim), dtype=tokens.dtype, device=tokens.device)
    if rows == 0 or dim == 0:
        return out
    out2d = out.view(rows, dim)
    block_m, block_d = _token_blocks(dim)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(dim, block_d))
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
        block_m, block_d = _token_blocks(dim)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(dim, block_d))
        _token_scatter_kernel[grid](src, idx, grad, rows, count, num_rows, dim,
                                    *src.stride(), *idx.stride(), s_db, s_dn, s_dd,
                                    ATOMIC=atomic, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return grad if grad.dtype == dtype else grad.to(dtype)


class _PatchGatherFunction(torch.autograd.Function):
    """Triton patch_gather; weight2d is None for the plain gather."""

    @staticmethod
    def forward(ctx, images, idx, weight2d, bias, pos_embed, patch_size):
        if weight2d is None:
            out = _launch_patch_pixels(images, idx, patch_size)
        else:
            out = _launch_embed_forward(images, idx, weight2d, bias, pos_embed, patch_size)
        ctx.patch_size = patch_size
        ctx.image_shape = tuple(images.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype
        ctx.num_patches = None if pos_embed is None else pos_embed.shape[0]
        ctx.save_for_backward(images, idx, weight2d)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        images, idx, weight2d = ctx.saved_tensors
        need_images, _, need_weight, need_bias, need_pos, _ = ctx.needs_input_grad
        grad_images = grad_weight = grad_bias = grad_pos = None
        batch, count = idx.shape
        rows, patch_size = batch * count, ctx.patch_size
        if weight2d is None:
            if need_images:
                grad_images = _launch_patch_scatter(grad_out.reshape(rows, -1), idx,
                                                    ctx.image_shape, patch_size, images.dtype)
            return grad_images, None, None, None, None, None
        compute_dtype = torch.promote_types(images.dtype, weight2d.dtype)
        grad2d = grad_out.reshape(rows, weight2d.shape[0])
        if need_images:
            grad_patches = grad2d.to(compute_dtype) @ weight2d.to(compute_dtype)
            grad_images = _launch_patch_scatter(grad_patches, idx, ctx.image_shape, patch_size,
                                                images.dtype)
        if need_weight:
            patches = _launch_patch_pixels(images, idx, patch_size).view(rows, -1)
            grad_weight = (grad2d.to(compute_dtype).t() @ patches.to(compute_dtype))
            grad_weight = grad_weight.to(weight2d.dtype)
        if need_bias:
            grad_bias = grad2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if need_pos:
            grad_pos = _launch_token_scatter(grad_out, idx, ctx.num_patches, ctx.pos_dtype,
                                             shared_table=True)
        return grad_images, None, grad_weight, grad_bias, grad_pos, None


class _TokenGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, idx, unique_indices):
        ctx.num_tokens, ctx.dtype, ctx.unique = tokens.shape[1], tokens.dtype, unique_indices
        ctx.save_for_backward(idx)
        return _launch_token_gather(tokens, idx)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (idx,) = ctx.saved_tensors
        grad = _launch_token_scatter(grad_out, idx, ctx.num_tokens, ctx.dtype,
                                     atomic=not ctx.unique)
        return grad, None, None


def patch_gather(images, idx, patch_size, weight=None, bias=None, pos_embed=None, backend="auto",
                 check_index=True):
    """Gather (and optionally embed) the patches `idx` of `images`; see the module docstring.
    check_index=False skips the idx range check (and its host sync on the GPU); out-of-range
    indices then still never touch memory out of bounds on the Triton path."""
    _check_backend_name("patch_gather", backend)
    _validate_patch_gather(images, idx, patch_size, weight, bias, pos_embed, check_index)
    dtypes = [t.dtype for t in (images, weight, bias, pos_embed) if t is not None]
    if _select_backend("patch_gather", backend, images.device, dtypes) == "reference":
        return patch_gather_reference(images, idx, patch_size, weight, bias, pos_embed)
    weight2d = None if weight is None else weight.reshape(weight.shape[0], -1)
    return _PatchGatherFunction.apply(images, idx, weight2d, bias, pos_embed, patch_size)


def token_gather(tokens, idx, backend="auto", check_index=True, unique_indices=False):
    """out[b, k] = tokens[b, idx[b, k]]; backward scatter-adds (duplicate indices accumulate).
    unique_indices=True (Triton path): the caller promises no duplicates within a row of idx, so
    the backward writes plain stores (deterministic, no fp32 buffer)."""
    _check_backend_name("token_gather", backend)
    _validate_token_gather(tokens, idx, check_index)
    if _select_backend("token_gather", backend, tokens.device, [tokens.dtype]) == "reference":
        return token_gather_reference(tokens, idx)
    return _TokenGatherFunction.apply(tokens, idx, bool(unique_indices))
