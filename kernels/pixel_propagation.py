"""PixPro's pixel propagation module (PPM) core, DENSE.md K4: a "ReLU^γ attention" with no softmax.

pixel_propagation(x, value, gamma=2.0, backend="auto") -> y
    x      (B, N, C)   projector output tokens (PixPro: the online projection, C = 256, N = 7*7)
    value  (B, N, Cv)  the already-transformed values (PixPro: value = l2n(g(x)), g a 1x1 conv,
                       computed by the caller in eager code)
    y      (B, N, Cv)  in value's dtype
    Any float dtypes and strides; x and value may differ in dtype. Everything is computed in fp32
    (float64 inputs: float64 in the reference, fp32 in the kernels) with autocast off.

The maths (zdaxie/PixPro `featprop`, clamp_value 0, OFFICIAL.md §2), per image b:
    x̂_i  = x_i / max(|x_i|, eps)                 L2 over channels, F.normalize, eps = 1e-12
    a_ij = <x̂_i, x̂_j>                            j over all N tokens of the image, including i
    s_ij = f(a_ij) = (max(a_ij, 0) + δ)^γ          δ = 1e-6 if γ < 1 else 0 (as PixPro)
    y_i  = Σ_j s_ij value_j                        no softmax, no division by Σ_j s_ij
PixPro then takes pred = l2n(y); that normalisation stays with the caller (F.normalize(y, dim=-1)).

Gradient (to x and to value; both are in PixPro's graph). With dy = dL/dy:
    dvalue_i = Σ_j s_ji dy_j = Σ_j s_ij dy_j       (s is symmetric)
    ds_ij    = <dy_i, value_j>
    f'(a)    = γ (max(a, 0) + δ)^(γ-1) [a >= 0]    (torch.clamp passes the gradient at a = 0; only
                                                    matters for γ <= 1 at a cosine of exactly 0)
    w_ij     = f'(a_ij) (ds_ij + ds_ji)            (da_ij + da_ji, a is symmetric)
    dx̂_i     = Σ_j w_ij x̂_j
    dx_i     = (dx̂_i - [|x_i| >= eps] x̂_i <x̂_i, dx̂_i>) / max(|x_i|, eps)     (F.normalize's gradient)
and <x̂_i, dx̂_i> = Σ_j w_ij a_ij, so the projection needs no full row of dx̂. An all-zero token has
x̂ = 0, a = 0 with everything, and for γ > 1 a zero gradient; below |x| < eps the gradient is
dx̂ / eps, as torch's.

Registered ops (namespace densesim, torch.library.custom_op with device_types ("cpu", "cuda");
fake/meta implementations; autograd by torch.library.register_autograd, so the op works inside a
user's torch.compile -- opaque, fullgraph=True works -- and in CUDA graphs):
    densesim::pixel_propagation(Tensor x, Tensor value, float gamma, bool use_triton) -> Tensor
    densesim::pixel_propagation_backward(Tensor grad_y, Tensor x, Tensor value, float gamma,
                                         bool use_triton) -> (Tensor grad_x, Tensor grad_value)
    use_triton=False is the reference maths (plain torch ops: the CPU implementation; the backward
    by the formulas above, _reference_backward); use_triton=True launches the Triton kernels (CUDA
    tensors; CPU tensors only under TRITON_INTERPRET=1). The outputs are fresh and contiguous; the
    backward op has no autograd of its own (no double backward through the op;
    pixel_propagation_reference has it).
The public function: backend="auto" runs the op -- with the Triton kernels on CUDA tensors where
triton imports, with the reference maths otherwise (CPU; meta tensors get the fake) -- and
pixel_propagation_reference on any other device; "reference" always runs pixel_propagation_reference
(plain autograd: what --no-fused runs and the `compiled` benchmark compiles); "triton" the kernels
or a one-line RuntimeError, never a silent fallback. Validation (one-line ValueError naming the
argument: ranks, matching B and N, float dtypes, devices, N > 0, gamma a positive finite number,
backend name) runs before any launch and never reads a tensor value. Under torch.compile a bad
input raises the same ValueError (with fullgraph=True inside dynamo's Unsupported "Observed
exception", whose text contains the message); a gamma that changes between calls becomes a
SymFloat there, which the validation only compares (a guard, no graph break).

No host sync (tests/host_sync.py counts them: zero, forward + backward, both implementations).
    The op has no value checks -- no index argument, nothing a device-side check
    (_check_on_device / torch._assert_async) would need -- and nothing in forward or backward reads
    a value back. The kernels mask every load and store by the token and channel bounds, so no
    input can make an out-of-bounds access.
Edge inputs (tested against float64 PixPro on both implementations): every off-diagonal cosine
    negative (only s_ii survives the clamp; masked key padding adds s = 0), all tokens equal (a
    stride-0 expand or scaled copies: every y_i = Σ_j value_j, dx = 0 up to rounding -- the op has
    no argmax, so there is no tie to break; equal rows in give equal rows out), N = 1, an empty
    batch B = 0 (legal: empty outputs and gradients, no launch), transposed and strided views,
    float64 inputs.
Less Python per launch: the grid, block sizes, constexpr flags and dot precisions are cached per
    shape by functools.lru_cache (_launch_plan) keyed on plain values -- B, N, C, Cv, the kernel
    dtypes, whether the tensors are on a GPU -- so a repeated step costs a dict lookup (_ppm_config
    is read when a plan is made: after editing it, call _launch_plan.cache_clear()). The kernels
    take x, value and grad_y by their strides and dtypes: no .contiguous() copies, and float64
    inputs are read as they are and converted to fp32 tile by tile after tl.load (no host-side
    fp32 copy); each output is written once in its final dtype (16-bit outputs under the
    interpreter excepted: there the kernel writes fp32 and torch rounds, as the interpreter's
    fp32 -> 16-bit store truncates). grad_y is cast only when its kernel dtype differs from value's.

Triton kernels (fp32 accumulation everywhere; inverse norms computed in the kernels, no pre-pass):
  * forward, grid (cdiv(N, BLOCK_N), cdiv(Cv, OUT_V), B): a program holds BLOCK_N rows of x (the
    whole channel dim when C <= BLOCK_C, else looped in BLOCK_C chunks) and their inverse norms,
    walks the N key tokens in BLOCK_M tiles: a = tl.dot(x_i, x_jᵀ) · inv_i · inv_j (the keys' norms
    from the same loads), s = f(a) in registers, y += tl.dot(s, value_j). One launch.
  * backward, grid (cdiv(N, BLOCK_N), cdiv(Cv, OUT_V) + cdiv(C, OUT_C), B): the first programs of
    each row block write a chunk of dvalue (recompute s, dvalue_i += tl.dot(s, dy_j)); the others a
    chunk of dx (recompute a, ds_ij + ds_ji = tl.dot(dy_i, value_jᵀ) + tl.dot(value_i, dy_jᵀ),
    acc += tl.dot(w · inv_j, x_j), p_i += Σ_j w_ij a_ij, then the normalisation's backward). One
    launch, no atomics, nothing of size N x N in global memory.
  Operands: 16-bit inputs feed the tensor cores as they are (the Gram and ds GEMMs are then exact
  products); s is rounded to the value's 16-bit dtype for s·value and s·dy (as flash-attention does
  with P), and w · inv_j is split into two 16-bit parts (hi + lo, two MMAs) for the dx GEMM -- one
  rounding there would exceed 2x torch's own bf16 error on dx. fp32 inputs use exact "ieee" fp32
  dots (CUDA cores). Under TRITON_INTERPRET=1 every load is upcast to fp32 at once (the
  interpreter's 16-bit arithmetic is wrong) and every dot is fp32, so the 16-bit roundings above
  are exercised only on a GPU. Block sizes: _ppm_config (checked by compiling for sm_90: no register
  spills, <= 82 KB of shared memory at C = Cv = 256; not tuned on a GPU. A later offline compile,
  triton 3.7, unit channel strides, shows 32 bytes of spill per thread in the fp32 backward, and
  the float64 variants compile with the same blocks).

Roofline. Forward FLOPs 2·B·N²·(C + Cv) (the Gram matrix and s·value); the minimal backward is
twice that (recompute a, dS = dY Vᵀ, S dY, W X̂); the kernel spends 2·B·N²·(4C + 3Cv) with 16-bit
inputs at C, Cv <= 256 (both program kinds recompute the Gram, ds and dsᵀ are two GEMMs, the split
dx GEMM is two). Bytes: read x and value once, write y (forward); read x, value, dy, write dx,
dvalue (backward); key tiles are re-read from L2 by every row block.
  PixPro's recipe (B = 128 per GPU, 7x7 -> N = 49, C = Cv = 256, bf16 under AMP): forward
  0.31 GFLOP and 9.6 MB (x, value, y), backward 0.63 GFLOP minimal and 16 MB -- microseconds of an
  H100/H200 at either ceiling, so the op is launch-bound. Eager PyTorch runs ~8 kernels forward
  (casts, norm, clamp_min, div, bmm, clamp, pow, bmm, cast) and ~15 backward; the fused op is
  1 forward + 1 backward launch.
  At stride-16/8/4 maps (N = 196, 784, 3136) the forward is 5.0, 81, 1290 GFLOP: compute-bound,
  and the (B, N, N) matrices eager materialises grow to 20 MB, 315 MB and 5.0 GB of fp32 each (it
  keeps several for backward); the fused op stores none of them.
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
_NORM_EPS = 1e-12          # F.normalize's default eps
_SMALL_GAMMA_OFFSET = 1e-6  # PixPro: `if self.pixpro_p < 1: sim += 1e-6` before the power
_OP = "pixel_propagation"
# The devices the registered ops serve (CPU and CUDA implementations; meta through the fake ones)
_OP_DEVICES = ("cpu", "cuda", "meta")


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    if device.type == "cpu" and _interpreting():
        return "triton"  # the Triton interpreter (CPU tests)
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type}) -- no CUDA "
                       f"device here; set TRITON_INTERPRET=1 before importing triton to run the kernels "
                       f"in the interpreter, or use backend='auto'/'reference'")


def _fp32_region(device):
    # Only CUDA and CPU autocast can be active around this code; other device types use the CPU one.
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _compute_dtype(x, value):
    """fp32, or float64 when either input is float64 (the reference's precision)."""
    return torch.promote_types(torch.promote_types(x.dtype, value.dtype), torch.float32)


def _small_gamma_offset(gamma):
    return _SMALL_GAMMA_OFFSET if gamma < 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Validation and the reference
# ---------------------------------------------------------------------------------------------

def _validate(x, value, gamma):
    for name, tensor, shape in (("x", x, "(B, N, C)"), ("value", value, "(B, N, Cv)")):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{_OP}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 3 or not tensor.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be a float tensor of shape {shape}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")
    if tuple(value.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(f"{_OP}: value must have shape (B, N, Cv) with B={x.shape[0]}, N={x.shape[1]} "
                         f"as x, got {tuple(value.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{_OP}: x must have at least one token (N > 0), got {tuple(x.shape)}")
    if value.device != x.device:
        raise ValueError(f"{_OP}: value must be on the same device as x ({x.device}), got {value.device}")
    # comparisons, not math.isfinite: inside torch.compile a float that changed between calls is
    # a SymFloat, which compares (a guard) but has no math.isfinite (a graph break); NaN fails both
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 < gamma < math.inf):
        raise ValueError(f"{_OP}: gamma must be a positive finite number, got {gamma!r}")


def pixel_propagation_reference(x, value, gamma=2.0):
    """Plain-PyTorch definition (and CPU path): y = max(x̂ x̂ᵀ, 0)^γ value, per image.

    x (B, N, C), value (B, N, Cv) -> y (B, N, Cv) in value's dtype; computed in fp32 (float64 for
    float64 inputs) with autocast off; differentiable in x and value (to any order)."""
    dtype = _compute_dtype(x, value)
    with _fp32_region(x.device):
        x_unit = F_nn.normalize(x.to(dtype), dim=-1, eps=_NORM_EPS)
        sim = torch.bmm(x_unit, x_unit.transpose(1, 2)).clamp(min=0)   # (B, N, N)
        if gamma < 1:
            sim = sim + _SMALL_GAMMA_OFFSET
        sim = sim.pow(gamma)
        return torch.bmm(sim, value.to(dtype)).to(value.dtype)


def _reference_backward(grad_y, x, value, gamma):
    """The gradient formulas of the module docstring in plain torch ops: (dx, dvalue), contiguous,
    in x's and value's dtypes (the op's use_triton=False backward)."""
    dtype = _compute_dtype(x, value)
    with torch.no_grad(), _fp32_region(x.device):
        x_c, v_c, dy = x.to(dtype), value.to(dtype), grad_y.to(dtype)
        norms = torch.linalg.vector_norm(x_c, dim=-1, keepdim=True)
        inv = 1.0 / norms.clamp_min(_NORM_EPS)
        x_unit = x_c * inv
        cos = torch.bmm(x_unit, x_unit.transpose(1, 2))
        base = cos.clamp(min=0) + _small_gamma_offset(gamma)
        sim = base.pow(gamma)
        slope = torch.where(cos >= 0, gamma * base.pow(gamma - 1), torch.zeros_like(cos))
        grad_value = torch.bmm(sim.transpose(1, 2), dy)
        dsim = torch.bmm(dy, v_c.transpose(1, 2))
        weights = slope * (dsim + dsim.transpose(1, 2))
        grad_unit = torch.bmm(weights, x_unit)
        along = (x_unit * grad_unit).sum(-1, keepdim=True) * (norms >= _NORM_EPS)
        grad_x = inv * (grad_unit - along * x_unit)
        return grad_x.to(x.dtype).contiguous(), grad_value.to(value.dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if _TRITON_IMPORTABLE:

    @triton.jit
    def _ppm_load(base, rows, cols, row_ok, col_ok, stride_r, stride_c, UPCAST: tl.constexpr):
        tile = tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # two static branches: a constexpr, then the loaded dtype
            # the interpreter's 16-bit arithmetic is wrong; the GPU keeps them native
            tile = tile.to(tl.float32)
        elif tile.dtype == tl.float64:  # float64 inputs are read as they are, computed in fp32
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def _ppm_inverse_norm(sum_sq, eps):
        """1 / max(|x|, eps) from the fp32 sum of squares (IEEE sqrt and division)."""
        return tl.div_rn(tl.zeros_like(sum_sq) + 1.0, tl.maximum(tl.sqrt_rn(sum_sq), eps))

    @triton.jit
    def _ppm_row_sum_sq(x_base, rows, row_ok, C, stride_n, stride_c,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            xc = _ppm_load(x_base, rows, cs, row_ok, cs < C, stride_n, stride_c, UPCAST).to(tl.float32)
            acc += tl.sum(xc * xc, 1)
        return acc

    @triton.jit
    def _ppm_gram_chunked(x_base, rows, cols, row_ok, col_ok, C, stride_n, stride_c,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                          UPCAST: tl.constexpr, X_PREC: tl.constexpr):
        """<x_i, x_j> for a (rows, cols) tile looped over C, and the columns' sums of squares."""
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            xi = _ppm_load(x_base, rows, cs, row_ok, c_ok, stride_n, stride_c, UPCAST)
            xj = _ppm_load(x_base, cols, cs, col_ok, c_ok, stride_n, stride_c, UPCAST)
            acc = tl.dot(xi, tl.trans(xj), acc, input_precision=X_PREC)
            xjf = xj.to(tl.float32)
            sum_sq += tl.sum(xjf * xjf, 1)
        return acc, sum_sq

    @triton.jit
    def _ppm_cross_chunked(dy_base, v_base, rows, cols, row_ok, col_ok, CV,
                           stride_gn, stride_gc, stride_vn, stride_vc,
                           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                           UPCAST: tl.constexpr, V_PREC: tl.constexpr):
        """<dy_i, value_j> + <value_i, dy_j> for a (rows, cols) tile looped over Cv."""
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for v0 in range(0, CV, BLOCK_V):
            vs = v0 + tl.arange(0, BLOCK_V)
            v_ok = vs < CV
            dy_i = _ppm_load(dy_base, rows, vs, row_ok, v_ok, stride_gn, stride_gc, UPCAST)
            v_i = _ppm_load(v_base, rows, vs, row_ok, v_ok, stride_vn, stride_vc, UPCAST)
            dy_j = _ppm_load(dy_base, cols, vs, col_ok, v_ok, stride_gn, stride_gc, UPCAST)
            v_j = _ppm_load(v_base, cols, vs, col_ok, v_ok, stride_vn, stride_vc, UPCAST)
            acc = tl.dot(dy_i, tl.trans(v_j), acc, input_precision=V_PREC)
            acc = tl.dot(v_i, tl.trans(dy_j), acc, input_precision=V_PREC)
        return acc

    @triton.jit
    def _ppm_scores(cos, gamma, offset, GAMMA_MODE: tl.constexpr):
        """s = (max(cos, 0) + offset)^gamma; GAMMA_MODE 2 / 1 are the exact γ = 2 / γ = 1 forms."""
        base = tl.maximum(cos, 0.0) + offset
        if GAMMA_MODE == 2:
            s = base * base
        elif GAMMA_MODE == 1:
            s = base
        else:
            positive = base > 0.0
            s = tl.where(positive, tl.exp2(gamma * tl.log2(tl.where(positive, base, 1.0))), 0.0)
        return s

    @triton.jit
    def _ppm_score_slopes(cos, gamma, offset, GAMMA_MODE: tl.constexpr):
        """ds/dcos = γ (max(cos, 0) + offset)^(γ-1) [cos >= 0] (torch.clamp's gradient gate)."""
        base = tl.maximum(cos, 0.0) + offset
        if GAMMA_MODE == 2:
            d = 2.0 * base
        elif GAMMA_MODE == 1:
            d = tl.where(cos >= 0.0, 1.0, 0.0)
        else:
            positive = base > 0.0
            power = tl.exp2((gamma - 1.0) * tl.log2(tl.where(positive, base, 1.0)))
            d = tl.where((cos >= 0.0) & positive, gamma * power, 0.0)
        return d

    @triton.jit
    def _ppm_row_block(x_base, rows, row_ok, C, stride_n, stride_c, eps,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr,
                       UPCAST: tl.constexpr):
        """The program's rows: (x tile, held when SINGLE_C; 1/max(|x_i|, eps); |x_i| >= eps)."""
        chans = tl.arange(0, BLOCK_C)
        if SINGLE_C:  # the whole channel dim in one tile: load the row block once
            x_rows = _ppm_load(x_base, rows, chans, row_ok, chans < C, stride_n, stride_c, UPCAST)
            x_rows_f = x_rows.to(tl.float32)
            sum_sq = tl.sum(x_rows_f * x_rows_f, 1)
        else:
            sum_sq = _ppm_row_sum_sq(x_base, rows, row_ok, C, stride_n, stride_c, BLOCK_N, BLOCK_C, UPCAST)
            x_rows = sum_sq  # unused placeholder
        return x_rows, _ppm_inverse_norm(sum_sq, eps), tl.sqrt_rn(sum_sq) >= eps

    @triton.jit
    def _ppm_cosine_tile(x_base, x_rows, inv_i, rows, cols, row_ok, col_ok, C, stride_n, stride_c, eps,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                         SINGLE_C: tl.constexpr, UPCAST: tl.constexpr, X_PREC: tl.constexpr):
        """cos_ij = <x_i, x_j> inv_i inv_j for a (rows, cols) tile, the keys' inverse norms from the
        same loads; also the keys' x tile (SINGLE_C; else a placeholder)."""
        if SINGLE_C:
            chans = tl.arange(0, BLOCK_C)
            x_cols = _ppm_load(x_base, cols, chans, col_ok, chans < C, stride_n, stride_c, UPCAST)
            dots = tl.dot(x_rows, tl.trans(x_cols), input_precision=X_PREC)
            x_cols_f = x_cols.to(tl.float32)
            sum_sq_j = tl.sum(x_cols_f * x_cols_f, 1)
        else:
            dots, sum_sq_j = _ppm_gram_chunked(x_base, rows, cols, row_ok, col_ok, C, stride_n, stride_c,
                                               BLOCK_N, BLOCK_M, BLOCK_C, UPCAST, X_PREC)
            x_cols = dots  # unused placeholder
        inv_j = _ppm_inverse_norm(sum_sq_j, eps)
        return dots * inv_i[:, None] * inv_j[None, :], inv_j, x_cols

    @triton.jit
    def _ppm_weighted_sum(acc, weights, tile, LOWP: tl.constexpr, SPLIT: tl.constexpr, W_PREC: tl.constexpr):
        """acc += weights @ tile. A 16-bit tile takes the fp32 weights rounded to its dtype (tensor
        cores, fp32 accumulation); SPLIT adds the rounding remainder as a second MMA (weights =
        hi + lo, ~16 significant bits). An fp32 tile gets an fp32 dot."""
        if LOWP:
            high = weights.to(tile.dtype)
            acc = tl.dot(high, tile, acc)
            if SPLIT:
                acc = tl.dot((weights - high.to(tl.float32)).to(tile.dtype), tile, acc)
        else:
            acc = tl.dot(weights, tile.to(tl.float32), acc, input_precision=W_PREC)
        return acc

    @triton.jit
    def _ppm_fwd_kernel(x_ptr, v_ptr, y_ptr, N, C, CV, gamma, offset, eps,
                        stride_xb, stride_xn, stride_xc, stride_vb, stride_vn, stride_vc,
                        stride_yb, stride_yn, stride_yc,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        OUT_V: tl.constexpr, SINGLE_C: tl.constexpr, GAMMA_MODE: tl.constexpr,
                        UPCAST: tl.constexpr, V_LOWP: tl.constexpr, X_PREC: tl.constexpr,
                        W_PREC: tl.constexpr):
        """One program: y for BLOCK_N rows x OUT_V value channels of one image."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        vch = pid_v * OUT_V + tl.arange(0, OUT_V)
        vch_ok = vch < CV
        x_base = x_ptr + b * stride_xb
        v_base = v_ptr + b * stride_vb
        x_rows, inv_i, _norm_ok_i = _ppm_row_block(x_base, rows, row_ok, C, stride_xn, stride_xc, eps,
                                                   BLOCK_N, BLOCK_C, SINGLE_C, UPCAST)
        acc = tl.zeros([BLOCK_N, OUT_V], dtype=tl.float32)
        for j0 in range(0, N, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_ok = cols < N
            cos, _inv_j, _x_cols = _ppm_cosine_tile(x_base, x_rows, inv_i, rows, cols, row_ok, col_ok, C,
                                                    stride_xn, stride_xc, eps, BLOCK_N, BLOCK_M, BLOCK_C,
                                                    SINGLE_C, UPCAST, X_PREC)
            s = tl.where(col_ok[None, :], _ppm_scores(cos, gamma, offset, GAMMA_MODE), 0.0)
            v_cols = _ppm_load(v_base, cols, vch, col_ok, vch_ok, stride_vn, stride_vc, UPCAST)
            acc = _ppm_weighted_sum(acc, s, v_cols, V_LOWP, False, W_PREC)
        tl.store(y_ptr + b * stride_yb + rows[:, None] * stride_yn + vch[None, :] * stride_yc,
                 acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & vch_ok[None, :])

    @triton.jit
    def _ppm_bwd_kernel(x_ptr, v_ptr, dy_ptr, dx_ptr, dv_ptr, N, C, CV, gamma, offset, eps, NUM_V_CHUNKS,
                        stride_xb, stride_xn, stride_xc, stride_vb, stride_vn, stride_vc,
                        stride_gb, stride_gn, stride_gc, stride_dxb, stride_dxn, stride_dxc,
                        stride_dvb, stride_dvn, stride_dvc,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_V: tl.constexpr, OUT_C: tl.constexpr, OUT_V: tl.constexpr,
                        SINGLE_C: tl.constexpr, SINGLE_V: tl.constexpr, REUSE_X: tl.constexpr,
                        GAMMA_MODE: tl.constexpr, UPCAST: tl.constexpr, X_LOWP: tl.constexpr,
                        V_LOWP: tl.constexpr, X_PREC: tl.constexpr, V_PREC: tl.constexpr,
                        W_PREC: tl.constexpr):
        """One program: BLOCK_N rows of one image, and either an OUT_V chunk of dvalue
        (pid 1 < NUM_V_CHUNKS) or an OUT_C chunk of dx (the rest). s and the cosines are recomputed
        tile by tile; nothing of size N x N leaves the registers. BLOCK_C / BLOCK_V are the K chunks
        of the Gram and ds GEMMs; REUSE_X: the Gram's key tile is also dx's (one chunk, SINGLE_C)."""
        pid_n = tl.program_id(0)
        pid_o = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        x_base = x_ptr + b * stride_xb
        v_base = v_ptr + b * stride_vb
        dy_base = dy_ptr + b * stride_gb
        x_rows, inv_i, norm_ok_i = _ppm_row_block(x_base, rows, row_ok, C, stride_xn, stride_xc, eps,
                                                  BLOCK_N, BLOCK_C, SINGLE_C, UPCAST)
        if pid_o < NUM_V_CHUNKS:
            # dvalue_i = Σ_j s_ij dy_j
            vch = pid_o * OUT_V + tl.arange(0, OUT_V)
            vch_ok = vch < CV
            acc_v = tl.zeros([BLOCK_N, OUT_V], dtype=tl.float32)
            for j0 in range(0, N, BLOCK_M):
                cols = j0 + tl.arange(0, BLOCK_M)
                col_ok = cols < N
                cos, _inv_j, _x_cols = _ppm_cosine_tile(x_base, x_rows, inv_i, rows, cols, row_ok, col_ok, C,
                                                        stride_xn, stride_xc, eps, BLOCK_N, BLOCK_M, BLOCK_C,
                                                        SINGLE_C, UPCAST, X_PREC)
                s = tl.where(col_ok[None, :], _ppm_scores(cos, gamma, offset, GAMMA_MODE), 0.0)
                dy_cols = _ppm_load(dy_base, cols, vch, col_ok, vch_ok, stride_gn, stride_gc, UPCAST)
                acc_v = _ppm_weighted_sum(acc_v, s, dy_cols, V_LOWP, False, W_PREC)
            tl.store(dv_ptr + b * stride_dvb + rows[:, None] * stride_dvn + vch[None, :] * stride_dvc,
                     acc_v.to(dv_ptr.dtype.element_ty), mask=row_ok[:, None] & vch_ok[None, :])
        else:
            # dx̂_i = Σ_j w_ij x̂_j,  w_ij = f'(a_ij) (<dy_i, v_j> + <v_i, dy_j>), then F.normalize's backward
            cch = (pid_o - NUM_V_CHUNKS) * OUT_C + tl.arange(0, OUT_C)
            cch_ok = cch < C
            vall = tl.arange(0, BLOCK_V)
            if SINGLE_V:
                dy_rows = _ppm_load(dy_base, rows, vall, row_ok, vall < CV, stride_gn, stride_gc, UPCAST)
                v_rows = _ppm_load(v_base, rows, vall, row_ok, vall < CV, stride_vn, stride_vc, UPCAST)
            acc_x = tl.zeros([BLOCK_N, OUT_C], dtype=tl.float32)
            along = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j0 in range(0, N, BLOCK_M):
                cols = j0 + tl.arange(0, BLOCK_M)
                col_ok = cols < N
                cos, inv_j, x_cols = _ppm_cosine_tile(x_base, x_rows, inv_i, rows, cols, row_ok, col_ok, C,
                                                      stride_xn, stride_xc, eps, BLOCK_N, BLOCK_M, BLOCK_C,
                                                      SINGLE_C, UPCAST, X_PREC)
                if not REUSE_X:
                    x_cols = _ppm_load(x_base, cols, cch, col_ok, cch_ok, stride_xn, stride_xc, UPCAST)
                if SINGLE_V:
                    dy_cols = _ppm_load(dy_base, cols, vall, col_ok, vall < CV, stride_gn, stride_gc, UPCAST)
                    v_cols = _ppm_load(v_base, cols, vall, col_ok, vall < CV, stride_vn, stride_vc, UPCAST)
                    cross = tl.dot(dy_rows, tl.trans(v_cols), input_precision=V_PREC)
                    cross = tl.dot(v_rows, tl.trans(dy_cols), cross, input_precision=V_PREC)
                else:
                    cross = _ppm_cross_chunked(dy_base, v_base, rows, cols, row_ok, col_ok, CV,
                                               stride_gn, stride_gc, stride_vn, stride_vc,
                                               BLOCK_N, BLOCK_M, BLOCK_V, UPCAST, V_PREC)
                w = tl.where(col_ok[None, :], _ppm_score_slopes(cos, gamma, offset, GAMMA_MODE) * cross, 0.0)
                along += tl.sum(w * cos, 1)
                # x̂_j = x_j inv_j: the key norms are folded into the weights. One bf16 rounding of
                # them costs more than 2x torch's own bf16 error on dx: split them in two
                acc_x = _ppm_weighted_sum(acc_x, w * inv_j[None, :], x_cols, X_LOWP, True, W_PREC)
            if REUSE_X:
                x_out = x_rows.to(tl.float32)
            else:
                x_out = _ppm_load(x_base, rows, cch, row_ok, cch_ok, stride_xn, stride_xc, UPCAST).to(tl.float32)
            along = tl.where(norm_ok_i, along, 0.0)     # below eps F.normalize is a plain scaling
            grad = inv_i[:, None] * (acc_x - (along * inv_i)[:, None] * x_out)
            tl.store(dx_ptr + b * stride_dxb + rows[:, None] * stride_dxn + cch[None, :] * stride_dxc,
                     grad.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & cch_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _pow2_block(size, low, high):
    """Power-of-two block covering `size`, clamped to [low, high] (tl.dot needs >= 16 per dim)."""
    return max(low, min(high, triton.next_power_of_2(max(1, size))))


def _kernel_dtype(dtype):
    """The dtype a kernel computes a tensor in: fp16/bf16/fp32 as given, float64 as fp32 (the
    kernels read float64 as it is and convert each tile right after tl.load: no host-side copy)."""
    return torch.float32 if dtype == torch.float64 else dtype


def _store_dtype(dtype, on_gpu):
    """The dtype a kernel writes an output in: the output's own (fp32 accumulators rounded once in
    the store), except 16-bit outputs under the interpreter, whose fp32 -> 16-bit store truncates:
    there the kernel writes fp32 and torch rounds to nearest."""
    return dtype if on_gpu or dtype in (torch.float32, torch.float64) else torch.float32


def _gamma_mode(gamma):
    return 2 if gamma == 2 else (1 if gamma == 1 else 0)


def _ppm_config(x_dtype, v_dtype, num_tokens, channels, value_channels, on_gpu, backward):
    """Block sizes and launch parameters; H100/H200 guesses, checked only by compiling for sm_90
    (no spills, <= 82 KB shared memory at C = Cv = 256), untuned: tune here on the GPU.
      BLOCK_N, BLOCK_M  query rows per program, key tokens per loop step
      BLOCK_C, BLOCK_V  K chunks of the Gram (x) and ds (dy, value) GEMMs; >= C (Cv) keeps the
                        program's rows in registers (SINGLE_C / SINGLE_V)
      OUT_C, OUT_V      width of the dx / y and dvalue chunk one program writes (more chunks: more
                        programs, each recomputing the cosines)
    16-bit operands on the GPU keep the whole channel dims (<= 256) in one tile. fp32 operands use
    exact CUDA-core dots, whose operands live in registers: 32-wide K chunks, 128-wide outputs.
    The interpreter (CPU) uses 32-token tiles so that modest test sizes already tile.
    x_dtype, v_dtype: the kernel dtypes (_kernel_dtype: float64 counts as fp32)."""
    if on_gpu and x_dtype != torch.float32 and v_dtype != torch.float32:
        block_n, block_m, k_c, k_v, out_c, out_v, warps = (32 if backward else 64), 32, 256, 256, 256, 256, 8
    elif on_gpu:
        block_n, block_m, k_c, k_v, out_c, out_v, warps = 32, 32, 32, 32, 128, 128, 8
    else:
        block_n, block_m, k_c, k_v, out_c, out_v, warps = 32, 32, 256, 256, 256, 256, 4
    return dict(BLOCK_N=_pow2_block(num_tokens, 16, block_n), BLOCK_M=_pow2_block(num_tokens, 16, block_m),
                BLOCK_C=_pow2_block(channels, 16, k_c), BLOCK_V=_pow2_block(value_channels, 16, k_v),
                OUT_C=_pow2_block(channels, 16, out_c), OUT_V=_pow2_block(value_channels, 16, out_v),
                num_warps=warps, num_stages=2)


def _precisions(x_dtype, v_dtype, on_gpu):
    """Dot precisions: 16-bit operands go to the tensor cores as they are ("tf32" is then ignored);
    fp32 operands use exact fp32 dots ("ieee": CUDA cores on the GPU; "tf32x3" would need more
    registers than these tiles leave); the interpreter computes every dot in fp32.
    x_dtype, v_dtype: the kernel dtypes (_kernel_dtype)."""
    x_lowp = on_gpu and x_dtype != torch.float32
    v_lowp = on_gpu and v_dtype != torch.float32
    return dict(X_LOWP=x_lowp, V_LOWP=v_lowp, X_PREC="tf32" if x_lowp else "ieee",
                V_PREC="tf32" if v_lowp else "ieee", W_PREC="ieee")


def _build_plan(backward, batch, num_tokens, channels, value_channels, x_dtype, v_dtype, on_gpu,
                config=None):
    """Everything a launch needs that depends only on shapes, dtypes and the device kind: the grid,
    the block sizes (config, or _ppm_config's), the constexpr flags and the dot precisions."""
    cfg = config or _ppm_config(x_dtype, v_dtype, num_tokens, channels, value_channels, on_gpu, backward)
    row_blocks = triton.cdiv(num_tokens, cfg["BLOCK_N"])
    num_v_chunks = triton.cdiv(value_channels, cfg["OUT_V"])
    single_c = cfg["BLOCK_C"] >= channels
    consts = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_M": cfg["BLOCK_M"], "BLOCK_C": cfg["BLOCK_C"],
              "OUT_V": cfg["OUT_V"], "SINGLE_C": single_c, "UPCAST": not on_gpu,
              "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    precisions = _precisions(x_dtype, v_dtype, on_gpu)
    if not backward:
        consts.update({name: precisions[name] for name in ("V_LOWP", "X_PREC", "W_PREC")})
        return {"grid": (row_blocks, num_v_chunks, batch), "consts": consts}
    num_c_chunks = triton.cdiv(channels, cfg["OUT_C"])
    consts.update(precisions, BLOCK_V=cfg["BLOCK_V"], OUT_C=cfg["OUT_C"],
                  SINGLE_V=cfg["BLOCK_V"] >= value_channels,
                  REUSE_X=single_c and cfg["OUT_C"] == cfg["BLOCK_C"])
    return {"grid": (row_blocks, num_v_chunks + num_c_chunks, batch), "num_v_chunks": num_v_chunks,
            "consts": consts}


@functools.lru_cache(maxsize=512)
def _launch_plan(backward, batch, num_tokens, channels, value_channels, x_dtype, v_dtype, on_gpu):
    """_build_plan with _ppm_config's blocks, cached per shape: keyed on plain Python values only
    (a bool, ints, torch dtypes -- the kernel dtypes -- and whether the tensors are on a GPU), so a
    repeated shape costs one dict lookup. The plan is shared: read it, never modify it. _ppm_config
    is read when a plan is first made: after editing it, call _launch_plan.cache_clear()."""
    return _build_plan(backward, batch, num_tokens, channels, value_channels, x_dtype, v_dtype, on_gpu)


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


def _check_triton_device(device):
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    raise RuntimeError(f"{_OP}: the Triton kernels need CUDA tensors (got {device.type}), or CPU tensors "
                       f"under TRITON_INTERPRET=1")


def _plan_for(backward, x, value, on_gpu, config):
    batch, num_tokens, channels = x.shape
    key = (backward, batch, num_tokens, channels, value.shape[2], _kernel_dtype(x.dtype),
           _kernel_dtype(value.dtype), on_gpu)
    return _launch_plan(*key) if config is None else _build_plan(*key, config=config)


def _pixel_propagation_triton(x, value, gamma, config=None):
    """Launch the forward kernel: y (B, N, Cv) contiguous, in value's dtype. Any strides and float
    dtypes are read as they are (no .contiguous() or dtype copies of the inputs)."""
    _check_triton_device(x.device)
    batch, num_tokens, _ = x.shape
    value_channels = value.shape[2]
    on_gpu = x.device.type == "cuda"
    y = torch.empty(batch, num_tokens, value_channels, dtype=_store_dtype(value.dtype, on_gpu),
                    device=x.device)
    if batch == 0 or value_channels == 0:
        return y.zero_().to(value.dtype)
    plan = _plan_for(False, x, value, on_gpu, config)
    _ppm_fwd_kernel[plan["grid"]](
        x, value, y, num_tokens, x.shape[2], value_channels, float(gamma), _small_gamma_offset(gamma), _NORM_EPS,
        x.stride(0), x.stride(1), x.stride(2), value.stride(0), value.stride(1), value.stride(2),
        y.stride(0), y.stride(1), y.stride(2), GAMMA_MODE=_gamma_mode(gamma), **plan["consts"])
    return y.to(value.dtype)  # a no-op except for 16-bit outputs under the interpreter


def _pixel_propagation_backward_triton(grad_y, x, value, gamma, config=None):
    """Launch the backward kernel: (dx, dvalue), contiguous, in x's and value's dtypes. Inputs of any
    strides are read as they are; grad_y is cast only where its kernel dtype differs from value's
    (the dy . value GEMMs pair the two; normally grad_y already has y's = value's dtype)."""
    _check_triton_device(x.device)
    batch, num_tokens, channels = x.shape
    value_channels = value.shape[2]
    on_gpu = x.device.type == "cuda"
    v_kernel = _kernel_dtype(value.dtype)
    dy = grad_y if _kernel_dtype(grad_y.dtype) == v_kernel else grad_y.to(v_kernel)
    grad_x = torch.empty(x.shape, dtype=_store_dtype(x.dtype, on_gpu), device=x.device)
    grad_v = torch.empty(value.shape, dtype=_store_dtype(value.dtype, on_gpu), device=x.device)
    if batch == 0:
        return grad_x.to(x.dtype), grad_v.to(value.dtype)
    plan = _plan_for(True, x, value, on_gpu, config)
    if plan["grid"][1] > 0:
        _ppm_bwd_kernel[plan["grid"]](
            x, value, dy, grad_x, grad_v, num_tokens, channels, value_channels, float(gamma),
            _small_gamma_offset(gamma), _NORM_EPS, plan["num_v_chunks"],
            x.stride(0), x.stride(1), x.stride(2), value.stride(0), value.stride(1), value.stride(2),
            dy.stride(0), dy.stride(1), dy.stride(2), grad_x.stride(0), grad_x.stride(1), grad_x.stride(2),
            grad_v.stride(0), grad_v.stride(1), grad_v.stride(2), GAMMA_MODE=_gamma_mode(gamma),
            **plan["consts"])
    # no-ops except for 16-bit outputs under the interpreter
    return grad_x.to(x.dtype), grad_v.to(value.dtype)


# ---------------------------------------------------------------------------------------------
# torch.library registration (namespace densesim) and the public function
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("densesim::pixel_propagation", mutates_args=(), device_types=("cpu", "cuda"))
def _pixel_propagation_op(x: torch.Tensor, value: torch.Tensor, gamma: float, use_triton: bool) -> torch.Tensor:
    """y (B, N, Cv) in value's dtype, contiguous. use_triton: the Triton kernels (CUDA, or CPU under
    TRITON_INTERPRET=1), else the reference maths (the CPU implementation)."""
    if use_triton:
        with _on_device(x.device):
            return _pixel_propagation_triton(x, value, gamma)
    with torch.no_grad():
        return pixel_propagation_reference(x, value, gamma).contiguous()


@_pixel_propagation_op.register_fake
def _pixel_propagation_fake(x, value, gamma, use_triton):
    return value.new_empty(x.shape[0], x.shape[1], value.shape[2])


@torch.library.custom_op("densesim::pixel_propagation_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _pixel_propagation_backward_op(grad_y: torch.Tensor, x: torch.Tensor, value: torch.Tensor, gamma: float,
                                   use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_value), contiguous, in x's and value's dtypes (module docstring)."""
    if use_triton:
        with _on_device(x.device):
            return _pixel_propagation_backward_triton(grad_y, x, value, gamma)
    return _reference_backward(grad_y, x, value, gamma)


@_pixel_propagation_backward_op.register_fake
def _pixel_propagation_backward_fake(grad_y, x, value, gamma, use_triton):
    return x.new_empty(x.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    x, value, gamma, use_triton = inputs
    ctx.save_for_backward(x, value)
    ctx.gamma, ctx.use_triton = gamma, use_triton


def _backward(ctx, grad_y):
    x, value = ctx.saved_tensors
    grad_x, grad_value = torch.ops.densesim.pixel_propagation_backward(grad_y, x, value, ctx.gamma,
                                                                       ctx.use_triton)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_value if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd("densesim::pixel_propagation", _backward, setup_context=_setup_context)


def pixel_propagation(x, value, gamma=2.0, backend="auto"):
    """PixPro's PPM core: y_i = Σ_j max(<x̂_i, x̂_j>, 0)^γ value_j per image (module docstring).

    x (B, N, C), value (B, N, Cv) -> y (B, N, Cv) in value's dtype, fp32 compute, autocast off.
    Differentiable in x and value. PixPro's head: value = F.normalize(conv(x)) in eager code,
    y = pixel_propagation(x, value), pred = F.normalize(y, dim=-1).
    backend="auto": densesim::pixel_propagation (Triton kernels on CUDA, the reference maths on
    CPU); "triton": the kernels or a one-line RuntimeError; "reference": pixel_propagation_reference
    (plain autograd). Validation reads no tensor value and comes before any launch; no host sync."""
    _check_backend_name(_OP, backend)
    _validate(x, value, gamma)
    use_triton = _select_backend(_OP, backend, x.device) == "triton"
    if backend == "reference" or x.device.type not in _OP_DEVICES:
        # the plain-autograd definition (and "auto" on a device the registered op does not serve)
        return pixel_propagation_reference(x, value, gamma)
    # "auto" without Triton: the same op with its reference maths (its backward by formula)
    return _pixel_propagation_op(x, value, float(gamma), use_triton)
