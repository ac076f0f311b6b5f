"""Correspondence between two views' token grids: by features (DenseCL) and by crop geometry (K3),
and PixPro's loss over the geometric positive pairs, each with a fused Triton path.

dense_match(q, k, backend="auto") -> (idx, sim)                  DENSE.md K2, no gradient
    q (B, N, C), k (B, M, C), any float dtype, same B and C; B = 0 and N = 0 are allowed (empty
    outputs), M = 0 is not (nothing to match against).
    idx[b, n] = argmax_m cos(q[b, n], k[b, m])   (B, N) int64
    sim[b, n] = that maximum cosine               (B, N) float32
    Cosines are computed in fp32 (autocast off) from L2-normalised rows (eps 1e-12, so an all-zero
    row has cosine 0 with everything). Ties: the SMALLEST index among exactly equal maxima, in both
    implementations (the reference is torch.max over the key dim, whose documented rule is the first
    maximal index; the Triton kernel takes the leftmost maximum in a tile and keeps an earlier tile's
    maximum unless a later one is strictly larger). An all-zero query (every cosine exactly 0)
    matches key 0. "Exactly equal" is about the computed fp32 cosines: a matmul may round the same
    key differently in different output columns (the interpreter's numpy dot does), so keys that
    are equal only mathematically may resolve to another of the tied keys; exactly representable
    cosines (e.g. rows of +-1 entries) tie exactly and both paths return the smallest index (tested).
    Key padding never wins: keys past M in a tile score -inf, so all-negative cosines still pick a
    real key. Inputs must be finite (a NaN row gives an unspecified index). Nothing is
    differentiable (outputs never require grad).

Geometric correspondence (DENSE.md K3), in the engine's geometry convention:
    boxes (B, 2, 4) = (y, x, h, w) per view in pixels of the ORIGINAL, UNFLIPPED image; flips (B, 2)
    bool; view v is resize(crop(image, box_v)) mirrored left-right afterwards if flips[:, v].
    Both views are cut into the same grid x grid tokens, raster order (token r*grid + c).
    Token (r, c) of view v covers, in continuous image coordinates (pixel k spans [k, k+1)),
        rows    y + [r, r+1] h/grid
        columns x + [c', c'+1] w/grid,   c' = grid-1-c if the view is flipped, else c.

geometric_correspondence(boxes, flips, grid) -> (location, in_overlap)
    location (B, grid*grid, 2) float32: for every view-1 token, the image point under its centre
    expressed in view-2 token units as (row, col), where view-2 token (r, c) has its centre at
    (r, c) and columns count in view 2's OUTPUT orientation (after its flip). in_overlap (B,
    grid*grid) bool: that point lies inside view 2's crop, i.e. -1/2 <= row, col <= grid - 1/2.
    The inverse direction (view-2 tokens in view-1 units) is the same call with the views swapped:
    geometric_correspondence(boxes.flip(1), flips.flip(1), grid). For identical boxes and flips the
    map is the identity; this is the same map SIM's relpos_embed encodes, with the views' roles
    swapped. grid_sample_coordinates() turns a location into grid_sample's (x, y) in [-1, 1]
    (align_corners=False), as LC-loss/DenseSiam sample the other view's feature map.
    (8 floats in, B*grid^2*3 values out: these stay plain PyTorch, float64 inside.) B = 0 is allowed.

pixpro_positive_mask(boxes, flips, grid, threshold=0.7, *, image_size) -> (B, grid*grid, grid*grid) bool
    PixPro's positive pairs A[b, i, j] (i: view-1 token, j: view-2 token), reproducing the released
    code (zdaxie/PixPro): each view becomes a box in normalised original-image coordinates
        x0 = x/(W-1), y0 = y/(H-1), x1 = (x+w-1)/(W-1), y1 = (y+h-1)/(H-1)
    with x0 and x1 swapped when the view is flipped (pixpro_normalised_boxes); token (r, c) has
    centre (x0 + (c+1/2)(x1-x0)/grid, y0 + (r+1/2)(y1-y0)/grid) -- the swapped x makes column c
    count from the right edge, so no flip branch is needed; bin diagonal
    diag_v = sqrt(((x1-x0)/grid)^2 + ((y1-y0)/grid)^2);
        A[i, j] = |centre_1(i) - centre_2(j)|_2 / max(diag_1, diag_2) < threshold.
    x is divided by W-1 and y by H-1, so distances are anisotropic for non-square images -- that is
    what PixPro does. image_size is (H, W) for the whole batch or a (B, 2) tensor of per-image sizes.
    There is no explicit overlap test: pairs outside the intersection simply end up with d >= T.

pixpro_loss(y, z, boxes, flips, grid, threshold=0.7, *, image_size, backend="auto") -> 0-d tensor
    DENSE.md §2 "Loss", one direction: y (B, grid^2, C) view-1 online tokens (PPM output), z (B,
    grid^2, C) view-2 target tokens (PixPro detaches z), A = pixpro_positive_mask(...):
        loss = -2 * mean_b [ Σ_ij A_b(i,j) cos(y_bi, z_bj) / (Σ_ij A_b(i,j) + 1e-6) ]
    An image without positive pairs contributes 0 and still counts in the mean; B = 0 is a
    ValueError (the mean of nothing). PixPro's symmetric loss is pixpro_loss(y1, z2, boxes, flips,
    ...) + pixpro_loss(y2, z1, boxes.flip(1), flips.flip(1), ...). The loss is fp32 (float64 when y
    or z is float64 and the reference maths run, as pixpro_loss_reference). Gradients: dL/dy
    always, dL/dz only if z requires grad.

Registered ops (namespace densesim, torch.library.custom_op, CPU and CUDA implementations, a fake
(meta) implementation each, so they are opaque nodes in a user's torch.compile graph and work on
meta tensors; with no host sync inside, nothing in them blocks a CUDA-graph capture -- not yet
tried on a GPU). use_triton=False runs the reference maths (the CPU
implementation; also what "auto" runs where Triton cannot), use_triton=True the Triton launchers
(CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):
    densesim::dense_match(Tensor q, Tensor k, bool use_triton) -> (Tensor idx, Tensor sim)
        autograd registered as non-differentiable (outputs never require grad).
    densesim::geometric_correspondence(Tensor boxes, Tensor flips, int grid)
        -> (Tensor location, Tensor in_overlap)
        the float64 torch maths on either device (no kernel of its own); runs the box/flip value
        checks; non-differentiable.
    densesim::pixpro_loss(Tensor y, Tensor z, Tensor boxes, Tensor flips, Tensor image_size,
                          int grid, float threshold, bool use_triton)
        -> (loss, rowsum, count, inv_y, norm_y, inv_z, geometry)
        image_size (B, 2) float64 (H, W). Runs the box/flip/image_size value checks, then
        rowsum (B, N) = Σ_j A_ij cos_ij, count (B,) = Σ_ij A_ij, inv_y / norm_y (B, N) =
        1/max(|y_i|, 1e-12) and |y_i|, inv_z (B, M) (fp32, or float64 on the reference maths with
        a float64 input), and geometry: what that path reads A from -- the reference maths, PixPro's
        normalised boxes (B, 2, 4) float64 (pixpro_normalised_boxes); the Triton path, the kernels'
        (B, 8) fp32 token-centre geometry. Only loss is differentiable; the rest is saved for the
        backward (nothing is recomputed there but, for dL/dz, the swapped row sums).
    densesim::pixpro_loss_backward(Tensor y, Tensor z, Tensor geometry, Tensor rowsum, Tensor inv_y,
                                   Tensor norm_y, Tensor inv_z, Tensor weight, int grid,
                                   float threshold, bool need_y, bool need_z, bool use_triton)
        -> (grad_y, grad_z)
        weight (B,) = dL/dcos_ij / A_ij = -2 g / (B (count_b + 1e-6)); grad_y in y's dtype and
        shape (an empty (0,) tensor when need_y is False), grad_z likewise (the same maths with the
        views swapped, A_21 = A_12^T, its row sums recomputed). register_autograd connects the two.
The public functions keep their signatures: backend="reference" runs the plain-autograd
dense_match_reference / pixpro_loss_reference (what the benchmarks' `compiled` variant compiles and
what `--no-fused` runs); "auto"/"triton" call the registered op. grid_sample_coordinates,
pixpro_normalised_boxes and pixpro_positive_mask are plain (traceable) torch functions.

No host sync on the hot path. Shape, dtype and device checks (no value read) raise their one-line
ValueError in the public function before anything runs. The value checks -- flips 0/1 (non-bool
flips), finite boxes, box h and w > 0, image_size H and W > 1 -- are device-side
(_check_on_device: on CPU the same ValueError at once; on CUDA and inside torch.compile
torch._assert_async, which stops the next synchronisation with the message). They run inside the
registered ops geometric_correspondence and pixpro_loss (an opaque op checks when it runs, so in a
compiled CPU graph too the ValueError itself is raised), and in the plain helpers
pixpro_normalised_boxes and pixpro_positive_mask (traced into a compiled graph they are
torch._assert_async: a RuntimeError with the same message). There is no opt-out keyword (none
existed); the checks cost a few tiny reductions per call. dense_match has no value checks (it takes
no indices). The Triton kernels never need them for memory safety: every load and store is masked
by the row/key/channel bounds and the per-image geometry is read at b * 8 + [0, 8) for b < B, so
bad boxes can only give a wrong (e.g. NaN, or no-pair) loss, never an out-of-bounds access. An
(H, W) tuple image_size becomes a small host-to-device copy; pass a (B, 2) tensor where even that
must not happen (e.g. inside a CUDA-graph capture).

Launch plans: the per-shape launch decisions (grid, block sizes, single-tile channels, the dot
precision, num_warps/num_stages) are cached with functools.lru_cache keyed on plain Python values
(batch, token counts, channels, dtype, GPU or interpreter): _norm_plan, _dense_match_plan,
_pixpro_plan. The kernels take strides, so non-contiguous inputs are read in place (a copy happens
only to unify mixed or float64 dtypes).

Triton paths (backend="auto" on CUDA tensors, or "triton"; CPU tensors only under TRITON_INTERPRET=1):
  * _inverse_norm_kernel: one pass over each input, rows' fp32 norm and 1/max(norm, 1e-12).
  * dense_match: grid (ceil(N/BLOCK_N), B). A program keeps BLOCK_N query rows (the whole channel
    dim in registers when C <= 256, else looped in 64-channel chunks) and walks the M keys in
    BLOCK_M tiles: tl.dot in fp32 accumulation (bf16/fp16 operands on tensor cores; fp32 inputs use
    an exact "ieee" fp32 dot), scales by the keys' inverse norms, and folds the tile's row max and
    argmax into a running (max, argmax). Writes idx (int64) and sim = max / |q| (fp32). Nothing of
    size N*M is ever stored. Tiles: 16-bit 128 x 64 (C <= 256, 8 warps) or 128 x 128 x 64; fp32
    64 x 64 x 32 (_dense_match_config).
  * pixpro_loss forward: grid (ceil(N/64), B). A program holds 64 view-1 tokens, walks the view-2
    tokens in 64-token tiles; per tile it builds A in registers from the image's 8 floats (token
    centres' origin and step per view, pre-divided by max(diag_1, diag_2) in float64 on the host:
    A = dx^2 + dy^2 < T^2, evaluated in fp32 -- a pair within ~1e-6 relative of the threshold may
    fall on the other side of the float64 reference's rule), computes the cosines with tl.dot and
    accumulates per row Σ_j A_ij cos_ij and Σ_j A_ij ((B, N) fp32 each; the batch mean is 3 tiny
    torch ops).
  * pixpro_loss backward: with r_i = 1/max(|y_i|, eps) and p_i = Σ_j A_ij cos_ij (saved),
        dL/dy_i = w_b r_i (Σ_j A_ij ẑ_j - p_i r_i y_i),   w_b = -2 g / (B (Σ A + 1e-6)),
    so the only pairwise work is the masked GEMM G = A·Ẑ: grid (ceil(N/64), ceil(C/64), B), A (times
    1/|z_j|) rebuilt in registers per tile, fp32 operands (16-bit inputs are exact in tf32; the
    "tf32x3" split keeps the fp32 weights' accuracy), no cosine recomputed. dL/dz, when asked for,
    is the same two kernels with the views swapped (A_21 = A_12^T). The reference maths of the
    backward op are the same formula in torch (float64 mask, fp32 or float64 arithmetic).

Roofline. dense_match: 2*B*N*M*C FLOPs, reading q and k once (plus a re-read of k per query block
from L2) and writing 12 bytes per query row. DenseCL at C5 (B=32, N=M=49, C=2048): 0.31 GFLOP --
trivial. 224 px grids at C=256, B=128: 14x14 2.5 GFLOP, 28x28 40 GFLOP, 56x56 645 GFLOP, where the
reference's fp32 similarity would be 4*B*N*M = 5.0 GB (it builds it in chunks) and the fused kernel
stores none of it: compute-bound, the floor is FLOPs / bf16 tensor-core rate. pixpro_loss at PixPro's
size (B=128, 7x7, C=256): 0.16 GFLOP forward + 0.16 backward, 3.2 MB each of bf16 y and z: launch-bound;
at 14x14: 2.5 + 2.5 GFLOP, 12.8 MB each -- and no (B, N, M) mask (4.9 MB of bool) or cosine matrix.
"""
import functools
import math
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
# Cap on similarity entries held at once by the reference (64 MB of fp32).
_REFERENCE_CHUNK_ENTRIES = 1 << 24
_NORM_EPS = 1e-12  # F.normalize's eps


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _select_backend(op_name, backend, device):
    """Called after validation: 'reference' or 'triton'. 'auto' picks Triton for CUDA tensors when
    triton imports; an explicit 'triton' that cannot run fails loudly, it never falls back."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if (device.type == "cuda" and _TRITON_IMPORTABLE) else "reference"
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which cannot be "
                           f"imported here; use backend='auto' or backend='reference'")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"  # the Triton interpreter (CPU tests)
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type}) -- no CUDA "
                       f"device here; set TRITON_INTERPRET=1 before importing triton to run the kernels "
                       f"in the interpreter, or use backend='auto'/'reference'")


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


def _pow2_block(size, low, high):
    """Power-of-two block covering `size`, clamped to [low, high] (tl.dot needs >= 16 per dim)."""
    return max(low, min(high, triton.next_power_of_2(max(1, size))))


def _kernel_compute_dtype(*tensors):
    """The dtype the kernels read: fp16/bf16/fp32 as given (promoted when mixed); float64 -> fp32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype not in (torch.float16, torch.bfloat16, torch.float32) else dtype


@functools.lru_cache(maxsize=256)
def _norm_plan(rows, channels):
    """_inverse_norm_kernel's launch: (grid, BLOCK_R, BLOCK_C) for `rows` rows of `channels`."""
    block_r = 32
    return (triton.cdiv(rows, block_r),), block_r, _pow2_block(channels, 16, 128)


def _inverse_norms(x, eps=_NORM_EPS):
    """(B, T) fp32 1 / max(|x_row|, eps) (F.normalize's eps) and the norms |x_row|, from a Triton
    pre-pass that reads x once in its own dtype (torch.linalg.vector_norm(dtype=fp32) would first
    materialise an fp32 copy of x)."""
    batch, tokens, channels = x.shape
    inv = torch.empty(batch, tokens, dtype=torch.float32, device=x.device)
    norms = torch.empty(batch, tokens, dtype=torch.float32, device=x.device)
    rows = batch * tokens
    if rows == 0:
        return inv, norms
    grid, block_r, block_c = _norm_plan(rows, channels)
    _inverse_norm_kernel[grid](
        x, inv, norms, tokens, channels, rows, x.stride(0), x.stride(1), x.stride(2), eps,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return inv, norms


if _TRITON_IMPORTABLE:

    @triton.jit
    def _inverse_norm_kernel(x_ptr, inv_ptr, norm_ptr, T, C, total_rows, stride_b, stride_t, stride_c, eps,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """BLOCK_R rows (b, t) of x: the fp32 L2 norm (IEEE sqrt) and 1 / max(norm, eps)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < total_rows
        b = (rows // T).to(tl.int64)
        t = (rows % T).to(tl.int64)
        base = x_ptr + b * stride_b + t * stride_t
        chans = tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + chans
            x = tl.load(base[:, None] + cs[None, :] * stride_c, mask=row_ok[:, None] & (cs[None, :] < C),
                        other=0.0).to(tl.float32)
            acc += x * x
        norm = tl.sqrt_rn(tl.sum(acc, 1))
        tl.store(norm_ptr + rows, norm, mask=row_ok)
        tl.store(inv_ptr + rows, tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.maximum(norm, eps)),
                 mask=row_ok)


def _fp32_region(device):
    # Only CUDA and CPU autocast can be active around this code; other device types use the CPU one.
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _register_no_gradient(op_name, num_inputs):
    """register_autograd for an op whose outputs are not differentiable (they never require grad,
    even from inputs that do)."""
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def backward(ctx, *grads):
        return (None,) * num_inputs

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# Feature matching (DenseCL)
# ---------------------------------------------------------------------------------------------

def _validate_dense_match(q, k):
    op = "dense_match"
    for name, value in (("q", q), ("k", k)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 3 or not value.is_floating_point():
            raise ValueError(f"{op}: {name} must be a float tensor of shape (B, tokens, C), "
                             f"got {value.dtype} {tuple(value.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: k must have shape (B, M, C) with B={q.shape[0]}, C={q.shape[2]} "
                         f"as q, got {tuple(k.shape)}")
    if k.shape[1] == 0:
        raise ValueError(f"{op}: k must have at least one token to match against, got {tuple(k.shape)}")
    if k.device != q.device:
        raise ValueError(f"{op}: k must be on the same device as q ({q.device}), got {k.device}")


def dense_match_reference(q, k, chunk_entries=_REFERENCE_CHUNK_ENTRIES):
    """Plain-PyTorch definition of dense_match: full cosine matrix, built in query-row chunks.
    Ties: torch.max's first (smallest) maximal index."""
    with torch.no_grad(), _fp32_region(q.device):
        q_unit = F_nn.normalize(q.detach().to(torch.float32), dim=-1)
        k_unit_t = F_nn.normalize(k.detach().to(torch.float32), dim=-1).transpose(1, 2)
        batch, num_queries, num_keys = q.shape[0], q.shape[1], k.shape[1]
        rows_per_chunk = max(1, chunk_entries // max(1, batch * num_keys))
        best_idx = torch.empty(batch, num_queries, dtype=torch.int64, device=q.device)
        best_sim = torch.empty(batch, num_queries, dtype=torch.float32, device=q.device)
        for start in range(0, num_queries, rows_per_chunk):
            stop = min(num_queries, start + rows_per_chunk)
            cosines = torch.bmm(q_unit[:, start:stop], k_unit_t)  # (B, chunk, M)
            chunk_sim, chunk_idx = cosines.max(dim=-1)
            best_sim[:, start:stop] = chunk_sim
            best_idx[:, start:stop] = chunk_idx
        return best_idx, best_sim


if _TRITON_IMPORTABLE:

    @triton.jit
    def _dense_match_kernel(q_ptr, k_ptr, inv_q_ptr, inv_k_ptr, idx_ptr, sim_ptr,
                            N, M, C,
                            stride_qb, stride_qn, stride_qc, stride_kb, stride_km, stride_kc,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                            SINGLE_C: tl.constexpr, UPCAST: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_N query rows of one image against all M keys, running max/argmax."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        chans = tl.arange(0, BLOCK_C)
        q_base = q_ptr + b * stride_qb
        k_base = k_ptr + b * stride_kb
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int32)
        if SINGLE_C:  # the whole (padded) channel dim fits one tile: load the query block once
            q_tile = tl.load(q_base + rows[:, None] * stride_qn + chans[None, :] * stride_qc,
                             mask=row_ok[:, None] & (chans[None, :] < C), other=0.0)
            if UPCAST:  # the interpreter's 16-bit arithmetic is wrong; the GPU keeps them native
                q_tile = q_tile.to(tl.float32)
        for m0 in range(0, M, BLOCK_M):
            keys = m0 + tl.arange(0, BLOCK_M)
            key_ok = keys < M
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            if SINGLE_C:
                k_tile = tl.load(k_base + keys[:, None] * stride_km + chans[None, :] * stride_kc,
                                 mask=key_ok[:, None] & (chans[None, :] < C), other=0.0)
                if UPCAST:
                    k_tile = k_tile.to(tl.float32)
                acc = tl.dot(q_tile, tl.trans(k_tile), acc, input_precision=DOT_PRECISION)
            else:
                for c0 in range(0, C, BLOCK_C):
                    cs = c0 + chans
                    c_ok = cs < C
                    qc = tl.load(q_base + rows[:, None] * stride_qn + cs[None, :] * stride_qc,
                                 mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                    kc = tl.load(k_base + keys[:, None] * stride_km + cs[None, :] * stride_kc,
                                 mask=key_ok[:, None] & c_ok[None, :], other=0.0)
                    if UPCAST:
                        qc = qc.to(tl.float32)
                        kc = kc.to(tl.float32)
                    acc = tl.dot(qc, tl.trans(kc), acc, input_precision=DOT_PRECISION)
            inv_k = tl.load(inv_k_ptr + b * M + keys, mask=key_ok, other=0.0)
            scores = tl.where(key_ok[None, :], acc * inv_k[None, :], float("-inf"))
            tile_best, tile_arg = tl.max(scores, 1, return_indices=True,
                                         return_indices_tie_break_left=True)
            better = tile_best > best  # strict: on ties the earlier tile (smaller index) wins
            best_idx = tl.where(better, m0 + tile_arg, best_idx)
            best = tl.where(better, tile_best, best)
        inv_q = tl.load(inv_q_ptr + b * N + rows, mask=row_ok, other=0.0)
        tl.store(sim_ptr + b * N + rows, best * inv_q, mask=row_ok)
        tl.store(idx_ptr + b * N + rows, best_idx.to(tl.int64), mask=row_ok)


def _dense_match_config(dtype, channels):
    """Block sizes and launch parameters (tune here on the GPU)."""
    c_pad = triton.next_power_of_2(max(1, channels))
    if dtype == torch.float32:  # exact fp32 ("ieee") dot: CUDA cores, smaller tiles
        return dict(BLOCK_N=64, BLOCK_M=64, BLOCK_C=max(16, min(32, c_pad)), num_warps=4, num_stages=2)
    if c_pad <= 256:  # the query block stays in registers over the whole key loop
        return dict(BLOCK_N=128, BLOCK_M=64, BLOCK_C=max(16, c_pad), num_warps=8,
                    num_stages=2 if c_pad > 128 else 3)
    return dict(BLOCK_N=128, BLOCK_M=128, BLOCK_C=64, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=256)
def _dense_match_plan(batch, num_queries, num_keys, channels, dtype, on_gpu):
    """(grid, launch keywords) of _dense_match_kernel for one shape; read-only (shared by calls)."""
    cfg = _dense_match_config(dtype, channels)
    block_n = min(cfg["BLOCK_N"], _pow2_block(num_queries, 16, 128))
    block_m = min(cfg["BLOCK_M"], _pow2_block(num_keys, 16, 128))
    block_c = cfg["BLOCK_C"]
    grid = (triton.cdiv(num_queries, block_n), batch)
    return grid, dict(
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_C=block_c, SINGLE_C=block_c >= channels,
        UPCAST=not on_gpu, DOT_PRECISION="ieee" if (dtype == torch.float32 or not on_gpu) else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _dense_match_triton(q, k, out_idx=None, out_sim=None):
    """Launch the fused kernel; out_idx/out_sim may be preallocated (B, N) int64 / fp32 buffers."""
    batch, num_queries, channels = q.shape
    num_keys = k.shape[1]
    dtype = _kernel_compute_dtype(q, k)
    q = q.detach().to(dtype)  # no copy unless the dtypes are mixed or float64
    k = k.detach().to(dtype)
    idx = out_idx if out_idx is not None else torch.empty(batch, num_queries, dtype=torch.int64,
                                                          device=q.device)
    sim = out_sim if out_sim is not None else torch.empty(batch, num_queries, dtype=torch.float32,
                                                          device=q.device)
    if batch == 0 or num_queries == 0:
        return idx, sim
    inv_q, _ = _inverse_norms(q)
    inv_k, _ = _inverse_norms(k)
    grid, launch = _dense_match_plan(batch, num_queries, num_keys, channels, dtype,
                                     q.device.type == "cuda")
    _dense_match_kernel[grid](
        q, k, inv_q, inv_k, idx, sim, num_queries, num_keys, channels,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), **launch)
    return idx, sim


@torch.library.custom_op("densesim::dense_match", mutates_args=(), device_types=("cpu", "cuda"))
def _dense_match_op(q: torch.Tensor, k: torch.Tensor, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (B, N) int64, sim (B, N) fp32): the Triton kernel (use_triton) or the reference maths."""
    with torch.no_grad(), _fp32_region(q.device):
        if use_triton:
            with _on_device(q.device):
                return _dense_match_triton(q, k)
        return dense_match_reference(q, k)


@_dense_match_op.register_fake
def _dense_match_fake(q, k, use_triton):
    rows = q.shape[:2]
    return q.new_empty(rows, dtype=torch.int64), q.new_empty(rows, dtype=torch.float32)


_register_no_gradient("densesim::dense_match", 3)


def dense_match(q, k, backend="auto"):
    """Per query token, the most cosine-similar key token: (idx (B, N) int64, sim (B, N) fp32).
    Ties go to the smallest key index. No gradient flows (DENSE.md K2: matching is not
    differentiable)."""
    _check_backend_name("dense_match", backend)
    _validate_dense_match(q, k)
    use_triton = _select_backend("dense_match", backend, q.device) == "triton"
    if backend == "reference":
        return dense_match_reference(q, k)
    return _dense_match_op(q.detach(), k.detach(), use_triton)


# ---------------------------------------------------------------------------------------------
# Geometric correspondence from crop boxes (K3)
# ---------------------------------------------------------------------------------------------

def _validate_views(op, boxes, flips, grid):
    """Shapes, dtypes, devices and grid: reads no tensor value (see _check_view_values)."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or tuple(boxes.shape[1:]) != (2, 4) \
            or not boxes.is_floating_point():
        got = f"{boxes.dtype} {tuple(boxes.shape)}" if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{op}: boxes must be a float tensor of shape (B, 2, 4) = (y, x, h, w) per "
                         f"view, got {got}")
    batch = boxes.shape[0]
    if not isinstance(flips, torch.Tensor) or tuple(flips.shape) != (batch, 2) or flips.is_complex():
        got = f"{flips.dtype} {tuple(flips.shape)}" if isinstance(flips, torch.Tensor) else type(flips).__name__
        raise ValueError(f"{op}: flips must be a bool tensor of shape (B, 2) with B={batch}, got {got}")
    if flips.device != boxes.device:
        raise ValueError(f"{op}: flips must be on the same device as boxes ({boxes.device}), "
                         f"got {flips.device}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0:
        raise ValueError(f"{op}: grid must be a positive int, got {grid!r}")


def _check_view_values(op, boxes, flips):
    """The value checks on boxes and flips, on the device (no host sync; see _check_on_device)."""
    if boxes.shape[0] == 0:
        return
    if flips.dtype != torch.bool:
        _check_on_device(((flips == 0) | (flips == 1)).all(), f"{op}: flips must be bool (or 0/1)")
    _check_on_device(torch.isfinite(boxes).all(), f"{op}: boxes must be finite")
    _check_on_device(torch.logical_not((boxes[..., 2:] <= 0).any()),
                     f"{op}: boxes h and w (boxes[..., 2:]) must be > 0")


def _image_size_rows(op, image_size, batch, device):
    """(B, 2) float64 (H, W) from an (H, W) pair or a (B, 2) / (2,) tensor. Shape only: the values
    are checked by _check_image_size_values."""
    if isinstance(image_size, torch.Tensor):
        sizes = image_size.to(device=device, dtype=torch.float64)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        sizes = torch.tensor([float(image_size[0]), float(image_size[1])], dtype=torch.float64,
                             device=device)
    else:
        raise ValueError(f"{op}: image_size must be (H, W) or a (B, 2) tensor, got {image_size!r}")
    if sizes.shape == (2,):
        sizes = sizes.expand(batch, 2)
    if tuple(sizes.shape) != (batch, 2):
        raise ValueError(f"{op}: image_size must be (H, W) or a (B, 2) tensor with B={batch}, "
                         f"got shape {tuple(sizes.shape)}")
    return sizes


def _check_image_size_values(op, sizes):
    if sizes.shape[0] > 0:
        _check_on_device(torch.logical_not((sizes <= 1).any()),
                         f"{op}: image_size H and W must be > 1 (PixPro divides by W-1, H-1)")


def _token_centre_offsets(grid, device):
    return torch.arange(grid, dtype=torch.float64, device=device) + 0.5  # (G,) r + 1/2


def _view_centres_in_image(boxes64, flipped, grid):
    """Continuous image (row, col) of each view's token-centre rows (B,2,G) and columns (B,2,G)."""
    y, x, h, w = boxes64.unbind(dim=-1)  # each (B, 2)
    offsets = _token_centre_offsets(grid, boxes64.device)
    rows = y[..., None] + offsets * (h[..., None] / grid)
    cols_unflipped = x[..., None] + offsets * (w[..., None] / grid)
    # A flipped view's output column c shows source column c' = grid-1-c, whose centre is
    # x + w - (c + 1/2) w/grid.
    cols_flipped = (x + w)[..., None] - offsets * (w[..., None] / grid)
    return rows, torch.where(flipped[..., None], cols_flipped, cols_unflipped)


def _correspondence64(boxes, flips, grid):
    boxes64 = boxes.detach().to(torch.float64)
    flipped = flips.to(torch.bool)
    rows, cols = _view_centres_in_image(boxes64, flipped, grid)
    y2, x2, h2, w2 = (v[:, 1:2] for v in boxes64.unbind(dim=-1))  # (B, 1) each
    row_in_2 = (rows[:, 0] - y2) / (h2 / grid) - 0.5                # (B, G)
    col_in_2 = (cols[:, 0] - x2) / (w2 / grid) - 0.5
    col_in_2 = torch.where(flipped[:, 1:2], (grid - 1) - col_in_2, col_in_2)
    batch = boxes.shape[0]
    row_cells = row_in_2[:, :, None].expand(batch, grid, grid).reshape(batch, grid * grid)
    col_cells = col_in_2[:, None, :].expand(batch, grid, grid).reshape(batch, grid * grid)
    location = torch.stack([row_cells, col_cells], dim=-1)
    half = 0.5
    in_overlap = ((location >= -half) & (location <= grid - half)).all(dim=-1)
    return location, in_overlap


@torch.library.custom_op("densesim::geometric_correspondence", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _geometric_correspondence_op(boxes: torch.Tensor, flips: torch.Tensor,
                                 grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(location (B, G*G, 2) fp32, in_overlap (B, G*G) bool), after the device-side value checks."""
    _check_view_values("geometric_correspondence", boxes, flips)
    location, in_overlap = _correspondence64(boxes, flips, grid)
    return location.to(torch.float32), in_overlap


@_geometric_correspondence_op.register_fake
def _geometric_correspondence_fake(boxes, flips, grid):
    batch, tokens = boxes.shape[0], grid * grid
    return (boxes.new_empty((batch, tokens, 2), dtype=torch.float32),
            boxes.new_empty((batch, tokens), dtype=torch.bool))


_register_no_gradient("densesim::geometric_correspondence", 3)


def geometric_correspondence(boxes, flips, grid):
    """For each view-1 token: (row, col) of its centre in view-2 token units (B, G*G, 2) float32 and
    whether it falls inside view 2 (B, G*G) bool. Swap the views for the inverse map."""
    _validate_views("geometric_correspondence", boxes, flips, grid)
    return _geometric_correspondence_op(boxes.detach(), flips.detach(), grid)


def grid_sample_coordinates(location, grid):
    """(..., 2) (row, col) in token units -> (..., 2) (x, y) for grid_sample(align_corners=False)."""
    if not isinstance(location, torch.Tensor) or location.shape[-1:] != (2,):
        raise ValueError(f"grid_sample_coordinates: location must be a tensor of shape (..., 2), "
                         f"got {getattr(location, 'shape', type(location).__name__)}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0:
        raise ValueError(f"grid_sample_coordinates: grid must be a positive int, got {grid!r}")
    normalised = 2.0 * (location + 0.5) / grid - 1.0
    return normalised.flip(-1)


def _normalised_boxes64(boxes, flips, sizes):
    """pixpro_normalised_boxes without the checks: sizes is the (B, 2) float64 (H, W)."""
    boxes64 = boxes.detach().to(torch.float64)
    y, x, h, w = boxes64.unbind(dim=-1)
    height_span = (sizes[:, 0] - 1)[:, None]
    width_span = (sizes[:, 1] - 1)[:, None]
    left, right = x / width_span, (x + w - 1) / width_span
    top, bottom = y / height_span, (y + h - 1) / height_span
    flipped = flips.to(torch.bool)
    x0 = torch.where(flipped, right, left)
    x1 = torch.where(flipped, left, right)
    return torch.stack([x0, top, x1, bottom], dim=-1)


def pixpro_normalised_boxes(boxes, flips, image_size):
    """(B, 2, 4) float64 PixPro boxes (x0, y0, x1, y1); x0 and x1 swapped for flipped views."""
    op = "pixpro_normalised_boxes"
    _validate_views(op, boxes, flips, 1)
    sizes = _image_size_rows(op, image_size, boxes.shape[0], boxes.device)
    _check_view_values(op, boxes, flips)
    _check_image_size_values(op, sizes)
    return _normalised_boxes64(boxes, flips, sizes)


def pixpro_positive_mask_reference(normalised_boxes, grid, threshold):
    """PixPro's A (B, G*G, G*G) bool from (B, 2, 4) normalised (x0, y0, x1, y1) boxes."""
    x0, y0, x1, y1 = normalised_boxes.to(torch.float64).unbind(dim=-1)  # (B, 2) each
    bin_w = (x1 - x0) / grid
    bin_h = (y1 - y0) / grid
    diag = torch.sqrt(bin_w ** 2 + bin_h ** 2)
    max_diag = torch.maximum(diag[:, 0], diag[:, 1])                     # (B,)
    offsets = _token_centre_offsets(grid, normalised_boxes.device)
    centre_x = x0[..., None] + offsets * bin_w[..., None]                # (B, 2, G) by column
    centre_y = y0[..., None] + offsets * bin_h[..., None]                # (B, 2, G) by row
    batch = normalised_boxes.shape[0]
    cx = centre_x[:, :, None, :].expand(batch, 2, grid, grid).reshape(batch, 2, grid * grid)
    cy = centre_y[:, :, :, None].expand(batch, 2, grid, grid).reshape(batch, 2, grid * grid)
    dx = cx[:, 0, :, None] - cx[:, 1, None, :]
    dy = cy[:, 0, :, None] - cy[:, 1, None, :]
    distance = torch.sqrt(dx ** 2 + dy ** 2) / max_diag[:, None, None]
    return distance < threshold


def pixpro_positive_mask(boxes, flips, grid, threshold=0.7, *, image_size):
    """PixPro positive pairs (B, G*G view-1 tokens, G*G view-2 tokens) bool; see the docstring."""
    op = "pixpro_positive_mask"
    _validate_views(op, boxes, flips, grid)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
        raise ValueError(f"pixpro_positive_mask: threshold must be a positive number, got {threshold!r}")
    sizes = _image_size_rows(op, image_size, boxes.shape[0], boxes.device)
    _check_view_values(op, boxes, flips)
    _check_image_size_values(op, sizes)
    return pixpro_positive_mask_reference(_normalised_boxes64(boxes, flips, sizes), grid, float(threshold))


# ---------------------------------------------------------------------------------------------
# PixPro's pixel-to-propagation loss as a fused masked cosine (K3 + DENSE.md §2 "Loss")
# ---------------------------------------------------------------------------------------------

_PIXPRO_COUNT_EPS = 1e-6  # PixPro: Σ A·cos / (Σ A + 1e-6)


def _validate_pixpro_loss(y, z, boxes, flips, grid, threshold, image_size):
    """Shapes, dtypes, devices and the Python arguments; returns image_size as (B, 2) float64."""
    op = "pixpro_loss"
    for name, value in (("y", y), ("z", z)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 3 or not value.is_floating_point():
            raise ValueError(f"{op}: {name} must be a float tensor of shape (B, grid*grid, C), "
                             f"got {value.dtype} {tuple(value.shape)}")
    _validate_views(op, boxes, flips, grid)
    batch, tokens = boxes.shape[0], grid * grid
    if batch == 0:
        raise ValueError(f"{op}: boxes must hold at least one image (the loss is a batch mean)")
    if tuple(y.shape[:2]) != (batch, tokens):
        raise ValueError(f"{op}: y must have shape (B, grid*grid, C) = ({batch}, {tokens}, C), "
                         f"got {tuple(y.shape)}")
    if tuple(z.shape) != (batch, tokens, y.shape[2]):
        raise ValueError(f"{op}: z must have shape (B, grid*grid, C) = {(batch, tokens, y.shape[2])} "
                         f"like y, got {tuple(z.shape)}")
    for name, value in (("z", z), ("boxes", boxes)):
        if value.device != y.device:
            raise ValueError(f"{op}: {name} must be on the same device as y ({y.device}), "
                             f"got {value.device}")
    # comparisons, not math.isfinite: under torch.compile a float that changed between calls is a
    # SymFloat, which compares (a guard) but has no math.isfinite (a graph break); NaN fails both
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not (0 < threshold < math.inf):
        raise ValueError(f"{op}: threshold must be a positive number, got {threshold!r}")
    return _image_size_rows(op, image_size, batch, boxes.device)


def pixpro_loss_reference(y, z, boxes, flips, grid, threshold=0.7, *, image_size):
    """Plain-PyTorch definition: materialise PixPro's A (B, N, M) and the cosine matrix.

    loss = -2 * mean_b [ Σ_ij A_b(i,j) cos(y_bi, z_bj) / (Σ_ij A_b(i,j) + 1e-6) ], computed in fp32
    (float64 for float64 inputs), autocast off. Gradients flow to y and z (PixPro detaches z)."""
    mask = pixpro_positive_mask(boxes, flips, grid, threshold, image_size=image_size)
    dtype = torch.promote_types(torch.promote_types(y.dtype, z.dtype), torch.float32)
    with _fp32_region(y.device):
        y_unit = F_nn.normalize(y.to(dtype), dim=-1)
        z_unit = F_nn.normalize(z.to(dtype), dim=-1)
        cosines = torch.bmm(y_unit, z_unit.transpose(1, 2))          # (B, N, M)
        positives = mask.to(dtype)
        per_image = (positives * cosines).sum(dim=(1, 2)) / (positives.sum(dim=(1, 2)) + _PIXPRO_COUNT_EPS)
        return -2.0 * per_image.mean()


def _geometry_from_normalised(nboxes, grid):
    """(B, 8) fp32 per image, per view v: (x of the column-0 token centre, column step, y of the row-0
    centre, row step), all divided by max(diag_1, diag_2), so that in the kernel
    A(i, j) = dx² + dy² < T². Derived in float64 from PixPro's normalised boxes (B, 2, 4), the
    numbers the reference uses."""
    x0, y0, x1, y1 = nboxes.unbind(dim=-1)                                              # (B, 2) each
    bin_w, bin_h = (x1 - x0) / grid, (y1 - y0) / grid
    max_diag = torch.sqrt(bin_w ** 2 + bin_h ** 2).amax(dim=1, keepdim=True)            # (B, 1)
    params = torch.stack([(x0 + 0.5 * bin_w) / max_diag, bin_w / max_diag,
                          (y0 + 0.5 * bin_h) / max_diag, bin_h / max_diag], dim=-1)    # (B, 2, 4)
    return params.reshape(-1, 8).to(torch.float32).contiguous()


def _pixpro_kernel_geometry(boxes, flips, grid, image_size):
    """The kernels' (B, 8) geometry from boxes/flips/image_size (see _geometry_from_normalised)."""
    return _geometry_from_normalised(pixpro_normalised_boxes(boxes, flips, image_size), grid)


if _TRITON_IMPORTABLE:

    @triton.jit
    def _pixpro_positive_tile(geo_ptr, b, rows, cols, row_ok, col_ok, GRID, thr_sq):
        """A(i, j) for a (rows, cols) tile, built in registers from the image's 8 floats."""
        g = geo_ptr + b * 8
        cx1 = tl.load(g + 0)
        sx1 = tl.load(g + 1)
        cy1 = tl.load(g + 2)
        sy1 = tl.load(g + 3)
        cx2 = tl.load(g + 4)
        sx2 = tl.load(g + 5)
        cy2 = tl.load(g + 6)
        sy2 = tl.load(g + 7)
        xi = cx1 + (rows % GRID).to(tl.float32) * sx1
        yi = cy1 + (rows // GRID).to(tl.float32) * sy1
        xj = cx2 + (cols % GRID).to(tl.float32) * sx2
        yj = cy2 + (cols // GRID).to(tl.float32) * sy2
        dx = xi[:, None] - xj[None, :]
        dy = yi[:, None] - yj[None, :]
        return (dx * dx + dy * dy < thr_sq) & row_ok[:, None] & col_ok[None, :]

    @triton.jit
    def _pixpro_fwd_kernel(y_ptr, z_ptr, inv_y_ptr, inv_z_ptr, geo_ptr, rowsum_ptr, rowcnt_ptr,
                           N, M, C, GRID, thr_sq,
                           stride_yb, stride_yn, stride_yc, stride_zb, stride_zm, stride_zc,
                           BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                           SINGLE_C: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_I view-1 tokens of one image. Per row: Σ_j A_ij cos_ij and Σ_j A_ij."""
        pid_i = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < N
        chans = tl.arange(0, BLOCK_C)
        y_base = y_ptr + b * stride_yb
        z_base = z_ptr + b * stride_zb
        inv_y = tl.load(inv_y_ptr + b * N + rows, mask=row_ok, other=0.0)
        row_sum = tl.zeros([BLOCK_I], dtype=tl.float32)
        row_cnt = tl.zeros([BLOCK_I], dtype=tl.float32)
        if SINGLE_C:
            y_tile = tl.load(y_base + rows[:, None] * stride_yn + chans[None, :] * stride_yc,
                             mask=row_ok[:, None] & (chans[None, :] < C), other=0.0)
            if UPCAST:
                y_tile = y_tile.to(tl.float32)
        for j0 in range(0, M, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < M
            acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
            if SINGLE_C:
                z_tile = tl.load(z_base + cols[:, None] * stride_zm + chans[None, :] * stride_zc,
                                 mask=col_ok[:, None] & (chans[None, :] < C), other=0.0)
                if UPCAST:
                    z_tile = z_tile.to(tl.float32)
                acc = tl.dot(y_tile, tl.trans(z_tile), acc, input_precision=DOT_PRECISION)
            else:
                for c0 in range(0, C, BLOCK_C):
                    cs = c0 + chans
                    c_ok = cs < C
                    yc = tl.load(y_base + rows[:, None] * stride_yn + cs[None, :] * stride_yc,
                                 mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                    zc = tl.load(z_base + cols[:, None] * stride_zm + cs[None, :] * stride_zc,
                                 mask=col_ok[:, None] & c_ok[None, :], other=0.0)
                    if UPCAST:
                        yc = yc.to(tl.float32)
                        zc = zc.to(tl.float32)
                    acc = tl.dot(yc, tl.trans(zc), acc, input_precision=DOT_PRECISION)
            positive = _pixpro_positive_tile(geo_ptr, b, rows, cols, row_ok, col_ok, GRID, thr_sq)
            inv_z = tl.load(inv_z_ptr + b * M + cols, mask=col_ok, other=0.0)
            cosines = acc * inv_y[:, None] * inv_z[None, :]
            row_sum += tl.sum(tl.where(positive, cosines, 0.0), 1)
            row_cnt += tl.sum(positive.to(tl.float32), 1)
        tl.store(rowsum_ptr + b * N + rows, row_sum, mask=row_ok)
        tl.store(rowcnt_ptr + b * N + rows, row_cnt, mask=row_ok)

    @triton.jit
    def _pixpro_bwd_kernel(y_ptr, z_ptr, inv_y_ptr, inv_z_ptr, geo_ptr, proj_ptr, weight_ptr, grad_ptr,
                           N, M, C, GRID, thr_sq,
                           stride_yb, stride_yn, stride_yc, stride_zb, stride_zm, stride_zc,
                           stride_gb, stride_gn, stride_gc,
                           BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
        """One program: a (BLOCK_I tokens, BLOCK_C channels) tile of dL/dy for one image:
            G = Σ_j A_ij ẑ_j (the masked GEMM A·Ẑ, A rebuilt in registers),
            dL/dy_i = w_b r_i (G_i - p_i r_i y_i),  r_i = 1/max(|y_i|, eps), p_i = Σ_j A_ij cos_ij
            (p_i = 0 where |y_i| <= eps: F.normalize's clamp has no gradient there)."""
        pid_i = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < N
        chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = chans < C
        z_base = z_ptr + b * stride_zb
        acc = tl.zeros([BLOCK_I, BLOCK_C], dtype=tl.float32)
        for j0 in range(0, M, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < M
            positive = _pixpro_positive_tile(geo_ptr, b, rows, cols, row_ok, col_ok, GRID, thr_sq)
            inv_z = tl.load(inv_z_ptr + b * M + cols, mask=col_ok, other=0.0)
            weights = tl.where(positive, inv_z[None, :], 0.0)          # A_ij / max(|z_j|, eps)
            z_tile = tl.load(z_base + cols[:, None] * stride_zm + chans[None, :] * stride_zc,
                             mask=col_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(weights, z_tile, acc, input_precision=DOT_PRECISION)
        y_tile = tl.load(y_ptr + b * stride_yb + rows[:, None] * stride_yn + chans[None, :] * stride_yc,
                         mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        inv_y = tl.load(inv_y_ptr + b * N + rows, mask=row_ok, other=0.0)
        proj = tl.load(proj_ptr + b * N + rows, mask=row_ok, other=0.0)
        w = tl.load(weight_ptr + b)
        grad = (w * inv_y)[:, None] * (acc - (proj * inv_y)[:, None] * y_tile)
        tl.store(grad_ptr + b * stride_gb + rows[:, None] * stride_gn + chans[None, :] * stride_gc,
                 grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@functools.lru_cache(maxsize=256)
def _pixpro_plan(batch, num_rows, num_cols, channels, dtype, on_gpu):
    """Launches of the forward-rows and backward-rows kernels for one shape and compute dtype:
    ((grid, keywords), (grid, keywords)); read-only (shared by calls)."""
    block_i, block_j = _pow2_block(num_rows, 16, 64), _pow2_block(num_cols, 16, 64)
    c_pad = _pow2_block(channels, 16, 1 << 30)
    forward_c = c_pad if c_pad <= 256 else 64
    forward = ((triton.cdiv(num_rows, block_i), batch), dict(
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_C=forward_c, SINGLE_C=forward_c >= channels,
        UPCAST=not on_gpu, DOT_PRECISION="ieee" if (dtype == torch.float32 or not on_gpu) else "tf32",
        num_warps=8 if block_i * forward_c >= 64 * 128 else 4, num_stages=2))
    # fp32 inputs: exact fp32 dot; 16-bit inputs are exact in tf32 and the fp32 weights A_ij/|z_j|
    # keep ~fp32 accuracy through the 3-pass tf32 split.
    backward_c = _pow2_block(channels, 16, 64)
    backward = ((triton.cdiv(num_rows, block_i), triton.cdiv(channels, backward_c), batch), dict(
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_C=backward_c,
        DOT_PRECISION="ieee" if (dtype == torch.float32 or not on_gpu) else "tf32x3",
        num_warps=4, num_stages=2))
    return forward, backward


def _pixpro_forward_rows(y, z, geo, grid, thr_sq, out_rowsum=None, out_rowcnt=None):
    """Per view-1 token: Σ_j A_ij cos_ij and Σ_j A_ij, (B, N) fp32 each; plus y's inverse norms."""
    batch, num_rows, channels = y.shape
    num_cols = z.shape[1]
    inv_y, norm_y = _inverse_norms(y)
    inv_z, _ = _inverse_norms(z)
    rowsum = out_rowsum if out_rowsum is not None else torch.empty(batch, num_rows, dtype=torch.float32,
                                                                   device=y.device)
    rowcnt = out_rowcnt if out_rowcnt is not None else torch.empty(batch, num_rows, dtype=torch.float32,
                                                                   device=y.device)
    (grid_launch, launch), _ = _pixpro_plan(batch, num_rows, num_cols, channels, y.dtype,
                                            y.device.type == "cuda")
    _pixpro_fwd_kernel[grid_launch](
        y, z, inv_y, inv_z, geo, rowsum, rowcnt, num_rows, num_cols, channels, grid, thr_sq,
        y.stride(0), y.stride(1), y.stride(2), z.stride(0), z.stride(1), z.stride(2), **launch)
    return rowsum, rowcnt, inv_y, norm_y, inv_z


def _pixpro_backward_rows(y, z, inv_y, norm_y, inv_z, rowsum, weight, geo, grid, thr_sq, out_grad=None):
    """dL/dy (B, N, C) in y's dtype for per-image weights w_b = dL/dcos_ij / A_ij ((B,) fp32)."""
    batch, num_rows, channels = y.shape
    num_cols = z.shape[1]
    on_gpu = y.device.type == "cuda"
    # The interpreter truncates fp32 -> 16-bit stores: there the rounding is left to torch.
    store_dtype = y.dtype if on_gpu else torch.float32
    grad = out_grad if out_grad is not None else torch.empty(y.shape, dtype=store_dtype, device=y.device)
    proj = torch.where(norm_y > _NORM_EPS, rowsum, torch.zeros_like(rowsum))
    _, (grid_launch, launch) = _pixpro_plan(batch, num_rows, num_cols, channels, y.dtype, on_gpu)
    _pixpro_bwd_kernel[grid_launch](
        y, z, inv_y, inv_z, geo, proj, weight, grad, num_rows, num_cols, channels, grid, thr_sq,
        y.stride(0), y.stride(1), y.stride(2), z.stride(0), z.stride(1), z.stride(2),
        grad.stride(0), grad.stride(1), grad.stride(2), **launch)
    return grad.to(y.dtype)


def _pixpro_stats_dtype(y_dtype, z_dtype, use_triton):
    """The dtype of the op's loss and saved statistics: fp32, or float64 on the reference maths
    when an input is float64 (as pixpro_loss_reference)."""
    if not use_triton and torch.float64 in (y_dtype, z_dtype):
        return torch.float64
    return torch.float32


def _pixpro_rows_reference(y, z, nboxes, grid, threshold, dtype):
    """The reference maths of _pixpro_forward_rows, in `dtype` from the float64 mask:
    (rowsum, rowcnt, inv_y, norm_y, inv_z)."""
    mask = pixpro_positive_mask_reference(nboxes, grid, threshold).to(dtype)
    y_, z_ = y.to(dtype), z.to(dtype)
    cosines = torch.bmm(F_nn.normalize(y_, dim=-1), F_nn.normalize(z_, dim=-1).transpose(1, 2))
    norm_y = torch.linalg.vector_norm(y_, dim=-1)
    inv_y = 1.0 / norm_y.clamp_min(_NORM_EPS)
    inv_z = 1.0 / torch.linalg.vector_norm(z_, dim=-1).clamp_min(_NORM_EPS)
    return (mask * cosines).sum(dim=2), mask.sum(dim=2), inv_y, norm_y, inv_z


def _pixpro_grad_rows_reference(y, z, nboxes, rowsum, inv_y, norm_y, weight, grid, threshold):
    """The reference maths of _pixpro_backward_rows (the formula in the module docstring)."""
    dtype = rowsum.dtype
    mask = pixpro_positive_mask_reference(nboxes, grid, threshold).to(dtype)
    gathered = torch.bmm(mask, F_nn.normalize(z.to(dtype), dim=-1))        # Σ_j A_ij ẑ_j
    proj = torch.where(norm_y > _NORM_EPS, rowsum, torch.zeros_like(rowsum))
    scale = (weight.to(dtype)[:, None] * inv_y)[..., None]
    grad = scale * (gathered - (proj * inv_y)[..., None] * y.to(dtype))
    return grad.to(y.dtype).contiguous()


def _pixpro_geometry(nboxes, grid, use_triton):
    """What the chosen maths read the positive pairs from: the (B, 8) fp32 kernel geometry
    (_geometry_from_normalised) for the Triton path, the (B, 2, 4) float64 normalised boxes
    themselves (the float64 mask) for the reference maths."""
    return _geometry_from_normalised(nboxes, grid) if use_triton else nboxes


def _swap_geometry(geometry, use_triton):
    """The same geometry with the two views swapped (A_21 = A_12^T)."""
    if use_triton:
        return geometry.view(-1, 2, 4).flip(1).reshape(-1, 8)
    return geometry.flip(1)


def _pixpro_rows(y, z, geometry, grid, threshold, use_triton):
    """(rowsum, rowcnt, inv_y, norm_y, inv_z) by the kernels or the reference maths."""
    if not use_triton:
        return _pixpro_rows_reference(y, z, geometry, grid, threshold,
                                      _pixpro_stats_dtype(y.dtype, z.dtype, False))
    dtype = _kernel_compute_dtype(y, z)
    with _on_device(y.device):
        return _pixpro_forward_rows(y.to(dtype), z.to(dtype), geometry, grid, threshold ** 2)


def _pixpro_grad_rows(y, z, geometry, rowsum, inv_y, norm_y, inv_z, weight, grid, threshold, use_triton):
    """dL/dy (B, N, C) in y's dtype by the kernels or the reference maths."""
    if not use_triton:
        return _pixpro_grad_rows_reference(y, z, geometry, rowsum, inv_y, norm_y, weight, grid, threshold)
    dtype = _kernel_compute_dtype(y, z)
    with _on_device(y.device):
        grad = _pixpro_backward_rows(y.to(dtype), z.to(dtype), inv_y, norm_y, inv_z, rowsum,
                                     weight.to(torch.float32).contiguous(), geometry, grid, threshold ** 2)
    return grad.to(y.dtype)


@torch.library.custom_op("densesim::pixpro_loss", mutates_args=(), device_types=("cpu", "cuda"))
def _pixpro_loss_op(y: torch.Tensor, z: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                    image_size: torch.Tensor, grid: int, threshold: float, use_triton: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
    """(loss, rowsum, count, inv_y, norm_y, inv_z, geometry); see the module docstring."""
    _check_view_values("pixpro_loss", boxes, flips)
    _check_image_size_values("pixpro_loss", image_size)
    with torch.no_grad(), _fp32_region(y.device):
        geometry = _pixpro_geometry(_normalised_boxes64(boxes, flips, image_size), grid, use_triton)
        rowsum, rowcnt, inv_y, norm_y, inv_z = _pixpro_rows(y, z, geometry, grid, threshold, use_triton)
        count = rowcnt.sum(dim=1)                                   # (B,) Σ_ij A
        per_image = rowsum.sum(dim=1) / (count + _PIXPRO_COUNT_EPS)
        loss = -2.0 * per_image.mean()
    return loss, rowsum, count, inv_y, norm_y, inv_z, geometry


@_pixpro_loss_op.register_fake
def _pixpro_loss_fake(y, z, boxes, flips, image_size, grid, threshold, use_triton):
    dtype = _pixpro_stats_dtype(y.dtype, z.dtype, use_triton)
    batch, num_rows, num_cols = y.shape[0], y.shape[1], z.shape[1]
    geometry = (y.new_empty((batch, 8), dtype=torch.float32) if use_triton
                else y.new_empty((batch, 2, 4), dtype=torch.float64))
    return (y.new_empty((), dtype=dtype), y.new_empty((batch, num_rows), dtype=dtype),
            y.new_empty((batch,), dtype=dtype), y.new_empty((batch, num_rows), dtype=dtype),
            y.new_empty((batch, num_rows), dtype=dtype), y.new_empty((batch, num_cols), dtype=dtype),
            geometry)


@torch.library.custom_op("densesim::pixpro_loss_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _pixpro_loss_backward_op(y: torch.Tensor, z: torch.Tensor, geometry: torch.Tensor, rowsum: torch.Tensor,
                             inv_y: torch.Tensor, norm_y: torch.Tensor, inv_z: torch.Tensor,
                             weight: torch.Tensor, grid: int, threshold: float, need_y: bool,
                             need_z: bool, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y, grad_z), each in its input's dtype and shape, or an empty (0,) tensor when not
    needed. grad_z is the same maths with the views swapped (its row sums recomputed)."""
    with torch.no_grad(), _fp32_region(y.device):
        grad_y = y.new_empty((0,))
        grad_z = z.new_empty((0,))
        if need_y:
            grad_y = _pixpro_grad_rows(y, z, geometry, rowsum, inv_y, norm_y, inv_z, weight, grid,
                                       threshold, use_triton)
        if need_z:
            swapped = _swap_geometry(geometry, use_triton)
            colsum, _, inv_z2, norm_z, inv_y2 = _pixpro_rows(z, y, swapped, grid, threshold, use_triton)
            grad_z = _pixpro_grad_rows(z, y, swapped, colsum, inv_z2, norm_z, inv_y2, weight, grid,
                                       threshold, use_triton)
    return grad_y, grad_z


@_pixpro_loss_backward_op.register_fake
def _pixpro_loss_backward_fake(y, z, geometry, rowsum, inv_y, norm_y, inv_z, weight, grid, threshold,
                               need_y, need_z, use_triton):
    return y.new_empty(y.shape if need_y else (0,)), z.new_empty(z.shape if need_z else (0,))


def _pixpro_setup_context(ctx, inputs, output):
    y, z, boxes, flips, image_size, grid, threshold, use_triton = inputs
    loss, rowsum, count, inv_y, norm_y, inv_z, geometry = output
    ctx.mark_non_differentiable(rowsum, count, inv_y, norm_y, inv_z, geometry)
    ctx.save_for_backward(y, z, geometry, rowsum, count, inv_y, norm_y, inv_z)
    ctx.grid, ctx.threshold, ctx.use_triton = grid, threshold, use_triton


def _pixpro_backward(ctx, grad_loss, *unused):
    y, z, geometry, rowsum, count, inv_y, norm_y, inv_z = ctx.saved_tensors
    need_y, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_y = grad_z = None
    if need_y or need_z:
        # dL/dcos_ij = -2 A_ij / (B (Σ A + 1e-6)) * grad_loss
        weight = grad_loss.to(count.dtype) * (-2.0 / y.shape[0]) / (count + _PIXPRO_COUNT_EPS)
        grad_y, grad_z = _pixpro_loss_backward_op(y, z, geometry, rowsum, inv_y, norm_y, inv_z, weight,
                                                  ctx.grid, ctx.threshold, need_y, need_z, ctx.use_triton)
    return (grad_y if need_y else None, grad_z if need_z else None) + (None,) * 6


torch.library.register_autograd("densesim::pixpro_loss", _pixpro_backward,
                                setup_context=_pixpro_setup_context)


def pixpro_loss(y, z, boxes, flips, grid, threshold=0.7, *, image_size, backend="auto"):
    """PixPro's pixel-propagation loss for one direction, A = pixpro_positive_mask(...), 0-d tensor
    (fp32; float64 for float64 inputs on the reference maths):

        loss = -2 * mean_b [ Σ_ij A_b(i,j) cos(y_bi, z_bj) / (Σ_ij A_b(i,j) + 1e-6) ]

    y (B, grid², C) view-1 (online, PPM output) tokens, z (B, grid², C) view-2 (target) tokens, any
    float dtypes; boxes/flips/image_size as pixpro_positive_mask. An image with no positive pair
    contributes 0 and still counts in the mean. PixPro's symmetric loss is
    pixpro_loss(y1, z2, boxes, flips, ...) + pixpro_loss(y2, z1, boxes.flip(1), flips.flip(1), ...).
    Differentiable in y and z (PixPro detaches z: then only dL/dy is computed)."""
    _check_backend_name("pixpro_loss", backend)
    sizes = _validate_pixpro_loss(y, z, boxes, flips, grid, threshold, image_size)
    use_triton = _select_backend("pixpro_loss", backend, y.device) == "triton"
    if backend == "reference":
        return pixpro_loss_reference(y, z, boxes, flips, grid, threshold, image_size=image_size)
    return _pixpro_loss_op(y, z, boxes.detach(), flips.detach(), sizes, grid, float(threshold),
                           use_triton)[0]
