"""SIM's fixed 2-D sin-cos tables (absolute, and relative view-2-in-view-1) and the fused query block.

Frequencies (SIM spec section 4.2): for an embedding width `dim` (divisible by 4),
    omega_k = 10000 ** (-k / (dim / 4)),  k = 0 .. dim/4 - 1,
and a scalar u is encoded as the two blocks E(u) = [sin(u * omega), cos(u * omega)] (dim/4 each).

absolute_sincos_table(grid, dim) -> (grid*grid, dim) float32
    row r = a*grid + b (raster order) holds [sin(a w), cos(a w), sin(b w), cos(b w)]: ROW first,
    then column (the halves are swapped relative to MAE; SIM is consistent with itself).

relpos_embed(rel, grid, dim, backend="auto") -> (B, grid*grid, 2*dim) float32, no gradient
    rel (B, 6) float = (di, dj, dh, dw, relflip, dj_flip), SIM's per-sample numbers (spec section
    1.2; pipelines/geometry.py::relative_geometry makes them from crop boxes). For view-2 patch
    (a, b) in raster order, its centre in view-1 patch units (view-1 patch (a', b') has its centre
    at (a', b')) and the two log-scale terms (spec section 4.3):
        y(a) = dh (a + 1/2) + g di - 1/2
        x(b) = dw (b + 1/2) + g dj - 1/2              if relflip = 0
        x(b) = -dw (b + 1/2) + g dj_flip - 1/2        if relflip = 1
        s_h = 10 ln dh,  s_w = 10 ln dw
    and the embedding is the eight blocks R(a, b) = [E(y(a)), E(x(b)), E(s_h), E(s_w)] =
        [sin y w, cos y w, sin x w, cos x w, sin s_h w, cos s_h w, sin s_w w, cos s_w w].
    relpos_coordinates(rel, grid) returns the (B, grid*grid, 4) values (y, x, s_h, s_w) alone.
    dh and dw must be > 0 and relflip must be 0 or 1.

relpos_query_embed(rel, grid, weight, bias, mask_token, out=None, backend="auto") -> (B, G*G, D)
    SIM's predictor queries (spec section 4.1): queries[b, n] = mask_token + W R_n + bias, with
    weight W (D, 2*dim) (dim = weight.shape[1] // 2, divisible by 4; in SIM D = dim = 768), bias
    (D,), mask_token (D,) or (1, 1, D). `out`, if given, is a (B, G*G, D) float tensor, typically the
    view `buffer[:, 1 + K:]` of a preallocated (B, 1 + K + G*G, D) predictor-input buffer (strided
    in the batch); the queries are written into it and `out` is returned, with autograd through the
    buffer exactly as for torch.cat (the autograd.Function marks `out` dirty).
    Gradients: weight, bias and mask_token (rel gets none: geometry is data).
    Dtype policy (Triton path): computed in fp32 whatever the input dtypes (fp32 / bf16 / fp16); the
    result is stored in out.dtype when `out` is given, else in weight.dtype (also under autocast:
    with fp32 parameters under bf16 autocast, pass an `out` in the autocast dtype, as the model's
    preallocated predictor buffer is, or cast the result). Gradients come back in each parameter's
    dtype. Precision class: tf32x3 products (~fp32) and fp32 weight-gradient GEMMs for fp32 weights
    outside autocast; tf32 products and weight-gradient GEMMs in the half dtype (weight's, or
    autocast's) otherwise -- never less precise than the reference's autocast Linear. The reference
    runs F.linear(table.to(weight.dtype)), so it follows autocast like the model's nn.Linear does.

Precision: the references compute coordinates and angles in float64 and store float32, one block at
a time (so the float64 scratch is one (B, G*G, dim/4) block, never the whole embedding). The Triton
kernels compute coordinates, angles and sin/cos in fp32 (abs error ~1e-6 per entry for the recipe's
|y|, |x| <~ 40), with the frequencies computed in float64 on the host once per (dim, device).

Validation: the rel checks (finite, dh, dw > 0, relflip in {0, 1}) need ONE host sync per call (one
combined flag; the detailed message is computed only on failure). Bad geometry cannot cause an
out-of-bounds access (it only gives NaN/garbage values), so the check guards semantics, not memory.

Triton path
-----------
relpos_embed (the table, stand-alone): `_relpos_table_kernel`, grid (B, cdiv(G*G, BLOCK_N),
cdiv(dim/4, BLOCK_K)). A program takes BLOCK_N cells x BLOCK_K frequencies and writes the eight
(BLOCK_N, BLOCK_K) slabs (sin/cos of y, x, s_h, s_w), so every sin/cos is evaluated exactly once.
Roofline (recipe B=128, G=14, dim=768 -> width 1536): B*196*1536*4 B = 154 MB written, 19.3 M
sin/cos for y and x; write-bound, ~50 us at ~3 TB/s.

relpos_query_embed (fused): uses that y depends only on the row a, x only on the column c and
(s_h, s_w) only on the sample b, so with W = [W_y | W_x | W_sh | W_sw] (column blocks of dim/2):
    W R(a, c) + bias + m = Y[b, a] + X[b, c] + S[b],
    Y[b, a] = W_y E(y_a),  X[b, c] = W_x E(x_c),  S[b] = W_sh E(s_h) + W_sw E(s_w) + bias + m.
That is G + G + 1 products of width dim/2 (the scale one of width dim) per sample, instead of G*G
rows of a 2*dim-wide GEMM. Two kernels (chosen over one kernel for simplicity and because a single
per-sample program would re-read all of W from L2 once per sample, ~B * 2.4 MB):
  1. `_relpos_axis_products_kernel`: one tl.dot GEMM launch for the three kinds of rows. Grid
     (2*T + T_s, cdiv(D, BLOCK_N)) with T = cdiv(B*G, BLOCK_M) row tiles for Y and for X and
     T_s = cdiv(B, BLOCK_M) for S. The E tile (BLOCK_M x BLOCK_K) is built in registers from the
     row's coordinate and a chunk of omega (sin chunk and cos chunk evaluated once each, two dots
     per chunk; the S rows run two such (coordinate, column block) pairs); W is read in its own
     dtype and upcast. fp32 accumulation; tl.dot input_precision "tf32x3" for fp32 weights (~fp32
     accuracy) and "tf32" for bf16/fp16 weights (those are exact in tf32). Result: an fp32 scratch
     [Y (B,G,D) | X (B,G,D) | S (B,D)] (B*(2G+1)*D*4 B = 11 MB at B=128).
  2. `_relpos_broadcast_write_kernel`: grid (B, cdiv(D, BLOCK_D)); loads X (G_PAD x BLOCK_D) and
     S once, then for each row a writes the (G, BLOCK_D) slab Y[a] + X + S into out[b, a*G:(a+1)*G]
     (any strides), converted to out's dtype. The (B, G*G, 2*dim) table is never materialised.
     (Under the interpreter only, bf16 stores round by bit arithmetic: the interpreter's own
     fp32 -> bf16 cast truncates.)
Backward: `_relpos_grad_reduce_kernel` (grid (B, cdiv(D, BLOCK_D))) reads grad_out once (any
strides, any float dtype) and writes fp32 gY[b,a] = sum_c g[b,a,c], gX[b,c] = sum_a g[b,a,c] and
gS[b] = sum_{a,c} g[b,a,c] into the same [Y | X | S] layout. Then in torch: grad_bias = grad_mask =
sum_b gS[b]; grad_W = [gY^T E_y | gX^T E_x | gS^T [E(s_h), E(s_w)]] as one bmm (K = B*G) and one mm
(K = B) on the reduced tensors. The embeddings E come from the forward: when weight needs a gradient,
kernel 1's first column of programs also stores the E tiles it built (fp32 [E_y | E_x | E_s],
B*(2G+2)*dim/2*4 B = 5.9 MB at B=128, saved for backward instead of the reference's 77 MB bf16
table), so backward launches one Triton kernel and ~6 small torch ops. GEMM operands are in
weight.dtype, or in the autocast dtype when the forward ran under autocast (fp32 accumulation in
cuBLAS), as the model's Linear computes its weight gradient.
Roofline at the recipe (B=128, G=14, D=dim=768, bf16 out): forward must write B*196*768*2 B = 38.5
MB (the reference writes the 154 MB fp32 table, converts it and runs a 2*B*196*1536*768 = 59 GFLOP
GEMM); the fused decomposition is 2*D*(2*B*G*dim/2 + B*dim) = 2.3 GFLOP (26x fewer). Backward must
read grad_out once (38.5 MB) and runs the same 2.3 GFLOP for grad_W (reference: 59 GFLOP).
"""
import math
import os

import torch
import torch.nn.functional as F

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton
    import triton.language as tl
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
# 10 turns |ln(size ratio)| (<= ~1.5 for the recipe's crops) into a range comparable to grid
# coordinates (spec section 4.3).
LOG_SCALE_FACTOR = 10.0
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def _check_grid_and_dim(op_name, grid, dim):
    if isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0:
        raise ValueError(f"{op_name}: grid must be a positive int, got {grid!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 4):
        raise ValueError(f"{op_name}: dim must be a positive int divisible by 4, got {dim!r}")


def _validate_relpos_embed(rel, grid, dim, op_name="relpos_embed", check_values=True):
    _check_grid_and_dim(op_name, grid, dim)
    if not isinstance(rel, torch.Tensor):
        raise ValueError(f"{op_name}: rel must be a torch.Tensor, got {type(rel).__name__}")
    if rel.dim() != 2 or rel.shape[1] != 6 or not rel.is_floating_point():
        raise ValueError(f"{op_name}: rel must be a float tensor of shape (B, 6) = "
                         f"(di, dj, dh, dw, relflip, dj_flip), got {rel.dtype} {tuple(rel.shape)}")
    if not check_values or rel.device.type == "meta" or rel.shape[0] == 0:
        return
    scale_ratios = rel[:, 2:4]
    relflip = rel[:, 4]
    finite = torch.isfinite(rel).all()
    positive = (scale_ratios > 0).all()
    binary = ((relflip == 0) | (relflip == 1)).all()
    if bool(finite & positive & binary):  # the one host sync of the validation
        return
    if not bool(finite):
        raise ValueError(f"{op_name}: rel must be finite")
    if not bool(positive):
        raise ValueError(f"{op_name}: rel[:, 2] (dh) and rel[:, 3] (dw) must be > 0, "
                         f"got min dh {float(rel[:, 2].min())}, min dw {float(rel[:, 3].min())}")
    raise ValueError(f"{op_name}: rel[:, 4] (relflip) must be 0 or 1")


def _frequencies(dim, device):
    quarter = dim // 4
    exponents = torch.arange(quarter, dtype=torch.float64, device=device) / quarter
    return torch.pow(10000.0, -exponents)  # (dim/4,) float64


def absolute_sincos_table(grid, dim, device=None):
    """(grid*grid, dim) float32: row a*grid+b = [sin(a w), cos(a w), sin(b w), cos(b w)]."""
    _check_grid_and_dim("absolute_sincos_table", grid, dim)
    omega = _frequencies(dim, device)
    cells = torch.arange(grid, dtype=torch.float64, device=device)
    rows = cells.repeat_interleave(grid)  # a of raster cell a*grid+b
    cols = cells.repeat(grid)             # b
    row_angles = rows[:, None] * omega
    col_angles = cols[:, None] * omega
    table = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1)
    return table.to(torch.float32)


def _axis_values64(rel, grid):
    """float64 y (B, G) per view-2 row, x (B, G) per view-2 column, s_h (B,), s_w (B,)."""
    rel64 = rel.detach().to(torch.float64)
    d_i, d_j, d_h, d_w, relflip, d_j_flip = rel64.unbind(dim=1)
    centres = torch.arange(grid, dtype=torch.float64, device=rel.device) + 0.5  # a + 1/2
    y = d_h[:, None] * centres + grid * d_i[:, None] - 0.5                     # (B, G)
    x_same = d_w[:, None] * centres + grid * d_j[:, None] - 0.5
    x_mirrored = -d_w[:, None] * centres + grid * d_j_flip[:, None] - 0.5
    x = torch.where(relflip[:, None] > 0.5, x_mirrored, x_same)                # (B, G)
    return y, x, LOG_SCALE_FACTOR * torch.log(d_h), LOG_SCALE_FACTOR * torch.log(d_w)


def _relpos_coordinates64(rel, grid):
    """(B, grid*grid, 4) float64 (y, x, s_h, s_w) of spec section 4.3, raster order over view 2."""
    y, x, s_h, s_w = _axis_values64(rel, grid)
    batch = rel.shape[0]
    y_cells = y[:, :, None].expand(batch, grid, grid).reshape(batch, grid * grid)
    x_cells = x[:, None, :].expand(batch, grid, grid).reshape(batch, grid * grid)
    s_h = s_h[:, None].expand(batch, grid * grid)
    s_w = s_w[:, None].expand(batch, grid * grid)
    return torch.stack([y_cells, x_cells, s_h, s_w], dim=-1)


def relpos_coordinates(rel, grid):
    """(B, grid*grid, 4) float32 values (y, x, s_h, s_w) that relpos_embed encodes."""
    _validate_relpos_embed(rel, grid, None, op_name="relpos_coordinates")
    return _relpos_coordinates64(rel, grid).to(torch.float32)


def relpos_embed_reference(rel, grid, dim):
    """Plain-PyTorch definition of relpos_embed (see the module docstring). Inputs are not validated."""
    coords = _relpos_coordinates64(rel, grid)  # (B, G*G, 4)
    omega = _frequencies(dim, rel.device)
    quarter = dim // 4
    batch, cells = coords.shape[0], grid * grid
    out = torch.empty(batch, cells, 2 * dim, dtype=torch.float32, device=rel.device)
    for slot in range(4):  # y, x, s_h, s_w; each gives a sin block then a cos block
        values = coords[:, :, slot]
        if slot >= 2:  # the scale terms are constant over a sample's cells: evaluate once, broadcast
            values = values[:, :1]
        angles = values[:, :, None] * omega
        start = 2 * slot * quarter
        out[:, :, start:start + quarter] = angles.sin().to(torch.float32)
        out[:, :, start + quarter:start + 2 * quarter] = angles.cos().to(torch.float32)
    return out


def relpos_embed(rel, grid, dim, backend="auto"):
    """(B, grid*grid, 2*dim) float32 relative sin-cos embedding of view-2 patches in view-1 units."""
    _check_backend_name("relpos_embed", backend)
    _validate_relpos_embed(rel, grid, dim)
    if _select_backend("relpos_embed", backend, rel.device) == "triton":
        with torch.no_grad():
            return _relpos_table_triton(rel, grid, dim)
    with torch.no_grad():
        return relpos_embed_reference(rel, grid, dim)


# ---------------------------------------------------------------------------------------------
# Fused query block: reference, validation, public op
# ---------------------------------------------------------------------------------------------

def relpos_query_embed_reference(rel, grid, weight, bias, mask_token, out=None):
    """mask_token + relpos_embed_reference(rel, grid, dim) @ weight^T + bias, dim = weight.shape[1]//2
    (the model's formulation). With `out`, the result is copied into it and `out` is returned.
    Inputs are not validated."""
    dim = weight.shape[1] // 2
    table = relpos_embed_reference(rel, grid, dim)
    queries = F.linear(table.to(weight.dtype), weight, bias.to(weight.dtype))
    queries = mask_token.reshape(-1) + queries  # type promotion as in the model (fp32 under autocast)
    if out is None:
        return queries
    out.copy_(queries)
    return out


def _validate_relpos_query_embed(rel, grid, weight, bias, mask_token, out, op_name="relpos_query_embed",
                                 check_values=True):
    _check_grid_and_dim(op_name, grid, None)
    if not isinstance(rel, torch.Tensor):
        raise ValueError(f"{op_name}: rel must be a torch.Tensor, got {type(rel).__name__}")
    for name, tensor in (("weight", weight), ("bias", bias), ("mask_token", mask_token)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op_name}: {name} must be float32, bfloat16 or float16, got {tensor.dtype}")
        if tensor.device != rel.device:
            raise ValueError(f"{op_name}: {name} must be on rel's device ({rel.device}), got {tensor.device}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0 or weight.shape[1] % 8:
        raise ValueError(f"{op_name}: weight must be (D, 2*dim) with dim a positive multiple of 4 "
                         f"(the sin-cos width), got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    if tuple(bias.shape) != (d_out,):
        raise ValueError(f"{op_name}: bias must have shape ({d_out},) to match weight "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    if mask_token.dim() == 0 or mask_token.shape[-1] != d_out or mask_token.numel() != d_out:
        raise ValueError(f"{op_name}: mask_token must have shape ({d_out},) or (1, 1, {d_out}), "
                         f"got {tuple(mask_token.shape)}")
    _validate_relpos_embed(rel, grid, weight.shape[1] // 2, op_name=op_name, check_values=check_values)
    if out is not None:
        expected = (rel.shape[0], grid * grid, d_out)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{op_name}: out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != expected or out.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op_name}: out must be a float32/bfloat16/float16 tensor of shape "
                             f"{expected}, got {out.dtype} {tuple(out.shape)}")
        if out.device != rel.device:
            raise ValueError(f"{op_name}: out must be on rel's device ({rel.device}), got {out.device}")


def relpos_query_embed(rel, grid, weight, bias, mask_token, out=None, backend="auto",
                       check_values=True):
    """(B, grid*grid, D) queries = mask_token + relpos_embed(rel, grid, dim) @ weight^T + bias.

    rel (B, 6) geometry (no gradient); weight (D, 2*dim); bias (D,); mask_token (D,) or (1, 1, D).
    out: optional (B, grid*grid, D) tensor (e.g. buffer[:, 1+K:], strided) that receives the result
    and is returned; autograd flows to weight, bias, mask_token and, through the buffer, to whatever
    was written into the buffer's other slices. Output dtype: out.dtype if given, else weight.dtype
    (Triton path; computed in fp32). See the module docstring for the kernels and the roofline.
    check_values=False skips the value checks on rel (finite, dh/dw > 0, relflip in {0, 1}) and
    with them the validation's one host sync, for callers whose geometry is valid by construction;
    shapes, dtypes and devices are still checked, and bad values can only give wrong numbers,
    never an out-of-bounds access.
    """
    _check_backend_name("relpos_query_embed", backend)
    _validate_relpos_query_embed(rel, grid, weight, bias, mask_token, out, check_values=check_values)
    if _select_backend("relpos_query_embed", backend, rel.device) == "triton":
        # `out` goes first: for a dirty view, autograd's CopySlices maps the Function's FIRST input to
        # the view (a dirty view in another position trips an internal assert in torch).
        return _RelposQueryEmbed.apply(out, rel, weight, bias, mask_token, grid)
    return relpos_query_embed_reference(rel, grid, weight, bias, mask_token, out=out)


# ---------------------------------------------------------------------------------------------
# Triton kernels and launchers
# ---------------------------------------------------------------------------------------------

_OMEGA_CACHE = {}


def _omega32(dim, device):
    """(dim/4,) float32 frequencies, computed in float64 once per (dim, device)."""
    key = (dim, str(device))
    omega = _OMEGA_CACHE.get(key)
    if omega is None:
        omega = _frequencies(dim, device).to(torch.float32)
        _OMEGA_CACHE[key] = omega
    return omega


def _pow2_block(size, low, high):
    """Power-of-two block covering `size`, clamped to [low, high] (tl.dot needs >= 16 per dim)."""
    return max(low, min(high, 1 << max(0, math.ceil(math.log2(max(1, size))))))


if _TRITON_IMPORTABLE:

    @triton.jit
    def _relpos_table_kernel(rel_ptr, omega_ptr, out_ptr, stride_rb, stride_rc, stride_ob, stride_on,
                             grid, cells, quarter,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        sample = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < cells
        k_mask = offs_k < quarter
        base = rel_ptr + sample.to(tl.int64) * stride_rb
        d_i = tl.load(base).to(tl.float32)
        d_j = tl.load(base + stride_rc).to(tl.float32)
        d_h = tl.load(base + 2 * stride_rc).to(tl.float32)
        d_w = tl.load(base + 3 * stride_rc).to(tl.float32)
        relflip = tl.load(base + 4 * stride_rc).to(tl.float32)
        d_j_flip = tl.load(base + 5 * stride_rc).to(tl.float32)
        row_centre = (offs_n // grid).to(tl.float32) + 0.5
        col_centre = (offs_n % grid).to(tl.float32) + 0.5
        y = d_h * row_centre + (grid * d_i - 0.5)
        x_same = d_w * col_centre + (grid * d_j - 0.5)
        x_mirrored = -d_w * col_centre + (grid * d_j_flip - 0.5)
        x = tl.where(relflip > 0.5, x_mirrored, x_same)
        s_h = 10.0 * tl.log(d_h)
        s_w = 10.0 * tl.log(d_w)
        omega = tl.load(omega_ptr + offs_k, mask=k_mask, other=0.0)
        y_angle = y[:, None] * omega[None, :]
        x_angle = x[:, None] * omega[None, :]
        zero = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        mask = n_mask[:, None] & k_mask[None, :]
        ptrs = out_ptr + sample.to(tl.int64) * stride_ob + offs_n[:, None] * stride_on + offs_k[None, :]
        tl.store(ptrs, tl.sin(y_angle), mask=mask)
        tl.store(ptrs + quarter, tl.cos(y_angle), mask=mask)
        tl.store(ptrs + 2 * quarter, tl.sin(x_angle), mask=mask)
        tl.store(ptrs + 3 * quarter, tl.cos(x_angle), mask=mask)
        tl.store(ptrs + 4 * quarter, zero + tl.sin(s_h * omega)[None, :], mask=mask)
        tl.store(ptrs + 5 * quarter, zero + tl.cos(s_h * omega)[None, :], mask=mask)
        tl.store(ptrs + 6 * quarter, zero + tl.sin(s_w * omega)[None, :], mask=mask)
        tl.store(ptrs + 7 * quarter, zero + tl.cos(s_w * omega)[None, :], mask=mask)

    @triton.jit
    def _relpos_axis_products_kernel(rel_ptr, omega_ptr, w_ptr, bias_ptr, mask_ptr, scratch_ptr, embed_ptr,
                                     stride_rb, stride_rc, stride_wn, stride_wk, stride_bias, stride_mask,
                                     batch, grid, quarter, d_out, tiles_per_axis,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     DOT_PRECISION: tl.constexpr, STORE_EMBED: tl.constexpr):
        # kind 0: rows (b, a) -> Y = W_y E(y_a); kind 1: rows (b, c) -> X = W_x E(x_c);
        # kind 2: rows b -> S = W_sh E(s_h) + W_sw E(s_w) + bias + mask_token.
        pid = tl.program_id(0)
        kind = (pid >= tiles_per_axis).to(tl.int32) + (pid >= 2 * tiles_per_axis).to(tl.int32)
        pid_m = pid - kind * tiles_per_axis
        is_scale = kind == 2
        scale_i = is_scale.to(tl.int32)
        rows_total = batch * grid - scale_i * (batch * grid - batch)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < rows_total
        sample = tl.where(is_scale, offs_m, offs_m // grid)
        centre = (offs_m % grid).to(tl.float32) + 0.5
        base = rel_ptr + sample.to(tl.int64) * stride_rb
        d_i = tl.load(base, mask=m_mask, other=0.0).to(tl.float32)
        d_j = tl.load(base + stride_rc, mask=m_mask, other=0.0).to(tl.float32)
        d_h = tl.load(base + 2 * stride_rc, mask=m_mask, other=1.0).to(tl.float32)
        d_w = tl.load(base + 3 * stride_rc, mask=m_mask, other=1.0).to(tl.float32)
        relflip = tl.load(base + 4 * stride_rc, mask=m_mask, other=0.0).to(tl.float32)
        d_j_flip = tl.load(base + 5 * stride_rc, mask=m_mask, other=0.0).to(tl.float32)
        y = d_h * centre + (grid * d_i - 0.5)
        x = tl.where(relflip > 0.5, -d_w * centre + (grid * d_j_flip - 0.5), d_w * centre + (grid * d_j - 0.5))
        s_h = 10.0 * tl.log(d_h)
        s_w = 10.0 * tl.log(d_w)
        u_first = tl.where(is_scale, s_h, tl.where(kind == 0, y, x))  # (BLOCK_M,)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < d_out
        two_quarters = 2 * quarter
        col_base = kind * two_quarters  # W column of this kind's first sin block: 0, dim/2, dim
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # embeddings kept for backward: [E_y (B*G, dim/2) | E_x (B*G, dim/2) | E_s (B, dim)], written
        # by the first column of programs only
        embed_rows = embed_ptr + kind.to(tl.int64) * (batch * grid * two_quarters) \
            + offs_m.to(tl.int64)[:, None] * (two_quarters * (1 + scale_i))
        embed_row_mask = m_mask[:, None] & (tl.program_id(1) == 0)
        for pair in range(0, 1 + scale_i):  # (s_h, then s_w) for the scale rows, once otherwise
            u = tl.where(pair == 0, u_first, s_w)
            pair_col = col_base + pair * two_quarters
            for k0 in range(0, quarter, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < quarter
                omega = tl.load(omega_ptr + offs_k, mask=k_mask, other=0.0)
                angle = u[:, None] * omega[None, :]
                w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (pair_col + offs_k)[:, None] * stride_wk
                w_mask = k_mask[:, None] & n_mask[None, :]
                w_sin = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
                w_cos = tl.load(w_ptrs + quarter * stride_wk, mask=w_mask, other=0.0).to(tl.float32)
                e_sin = tl.sin(angle)
                e_cos = tl.cos(angle)
                acc = tl.dot(e_sin, w_sin, acc, input_precision=DOT_PRECISION)
                acc = tl.dot(e_cos, w_cos, acc, input_precision=DOT_PRECISION)
                if STORE_EMBED:
                    e_ptrs = embed_rows + (pair * two_quarters + offs_k)[None, :]
                    e_mask = embed_row_mask & k_mask[None, :]
                    tl.store(e_ptrs, e_sin.to(embed_ptr.dtype.element_ty), mask=e_mask)
                    tl.store(e_ptrs + quarter, e_cos.to(embed_ptr.dtype.element_ty), mask=e_mask)
        extra = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32) \
            + tl.load(mask_ptr + offs_n * stride_mask, mask=n_mask, other=0.0).to(tl.float32)
        acc += extra[None, :] * scale_i.to(tl.float32)
        # scratch layout: [Y (B*G rows) | X (B*G rows) | S (B rows)], rows of d_out fp32
        rows = kind.to(tl.int64) * (batch * grid) + offs_m.to(tl.int64)
        ptrs = scratch_ptr + rows[:, None] * d_out + offs_n[None, :]
        tl.store(ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _relpos_broadcast_write_kernel(scratch_ptr, out_ptr, stride_ob, stride_on, stride_od,
                                       batch, grid, d_out,
                                       G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                                       BF16_BY_BITS: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_c = tl.arange(0, G_PAD)
        d_mask = offs_d < d_out
        mask = (offs_c < grid)[:, None] & d_mask[None, :]
        axis_rows = batch * grid
        y_base = scratch_ptr + sample * grid * d_out
        x_base = scratch_ptr + (axis_rows + sample * grid) * d_out
        s_base = scratch_ptr + (2 * axis_rows + sample) * d_out
        x_tile = tl.load(x_base + offs_c[:, None] * d_out + offs_d[None, :], mask=mask, other=0.0)
        s_row = tl.load(s_base + offs_d, mask=d_mask, other=0.0)
        x_plus_s = x_tile + s_row[None, :]
        out_base = out_ptr + sample * stride_ob + offs_c[:, None] * stride_on + offs_d[None, :] * stride_od
        for a in range(0, grid):
            y_row = tl.load(y_base + a * d_out + offs_d, mask=d_mask, other=0.0)
            value = x_plus_s + y_row[None, :]
            if BF16_BY_BITS:  # interpreter only: its fp32 -> bf16 cast truncates; round to nearest even
                bits = value.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                stored = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                stored = value.to(out_ptr.dtype.element_ty)
            tl.store(out_base + a * grid * stride_on, stored, mask=mask)

    @triton.jit
    def _relpos_grad_reduce_kernel(grad_ptr, reduced_ptr, stride_gb, stride_gn, stride_gd,
                                   batch, grid, d_out,
                                   G_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_c = tl.arange(0, G_PAD)
        d_mask = offs_d < d_out
        mask = (offs_c < grid)[:, None] & d_mask[None, :]
        axis_rows = batch * grid
        y_base = reduced_ptr + sample * grid * d_out
        x_base = reduced_ptr + (axis_rows + sample * grid) * d_out
        s_base = reduced_ptr + (2 * axis_rows + sample) * d_out
        g_base = grad_ptr + sample * stride_gb + offs_c[:, None] * stride_gn + offs_d[None, :] * stride_gd
        x_acc = tl.zeros((G_PAD, BLOCK_D), dtype=tl.float32)
        s_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for a in range(0, grid):
            tile = tl.load(g_base + a * grid * stride_gn, mask=mask, other=0.0).to(tl.float32)
            row_sum = tl.sum(tile, axis=0)
            tl.store(y_base + a * d_out + offs_d, row_sum, mask=d_mask)
            x_acc += tile
            s_acc += row_sum
        tl.store(x_base + offs_c[:, None] * d_out + offs_d[None, :], x_acc, mask=mask)
        tl.store(s_base + offs_d, s_acc, mask=d_mask)


def _relpos_table_triton(rel, grid, dim):
    batch, cells, quarter = rel.shape[0], grid * grid, dim // 4
    out = torch.empty(batch, cells, 2 * dim, dtype=torch.float32, device=rel.device)
    if batch == 0:
        return out
    block_n = _pow2_block(cells, 16, 32)
    block_k = _pow2_block(quarter, 16, 64)
    launch = (batch, triton.cdiv(cells, block_n), triton.cdiv(quarter, block_k))
    _relpos_table_kernel[launch](rel, _omega32(dim, rel.device), out, rel.stride(0), rel.stride(1),
                                 out.stride(0), out.stride(1), grid, cells, quarter,
                                 BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def _query_forward_triton(rel, grid, weight, bias, mask_token, result, keep_embeddings=False,
                          half_precision_dot=False):
    """Writes mask_token + W R + bias into result (B, G*G, D), any strides and float dtype. With
    keep_embeddings, returns the flat fp32 [E_y (B*G, dim/2) | E_x (B*G, dim/2) | E_s (B, dim)]
    that the kernel built on the way (for grad_weight), else None."""
    batch, d_out, dim = rel.shape[0], weight.shape[0], weight.shape[1] // 2
    embed = None
    if keep_embeddings:
        embed = torch.empty(batch * (2 * grid + 2) * (dim // 2), dtype=torch.float32, device=rel.device)
    if batch == 0:
        return embed
    quarter = dim // 4
    mask_flat = mask_token.reshape(-1)
    scratch = torch.empty((2 * grid + 1) * batch * d_out, dtype=torch.float32, device=rel.device)
    block_m = _pow2_block(batch * grid, 16, 64)
    block_n = _pow2_block(d_out, 16, 128)
    block_k = _pow2_block(quarter, 16, 32)
    tiles_per_axis = triton.cdiv(batch * grid, block_m)
    scale_tiles = triton.cdiv(batch, block_m)
    precision = "tf32x3" if weight.dtype == torch.float32 and not half_precision_dot else "tf32"
    _relpos_axis_products_kernel[(2 * tiles_per_axis + scale_tiles, triton.cdiv(d_out, block_n))](
        rel, _omega32(dim, rel.device), weight, bias, mask_flat, scratch, scratch if embed is None else embed,
        rel.stride(0), rel.stride(1), weight.stride(0), weight.stride(1), bias.stride(0), mask_flat.stride(0),
        batch, grid, quarter, d_out, tiles_per_axis,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=precision,
        STORE_EMBED=embed is not None, num_warps=4)
    block_d = _pow2_block(d_out, 16, 128)
    g_pad = _pow2_block(grid, 1, 1 << 30)
    _relpos_broadcast_write_kernel[(batch, triton.cdiv(d_out, block_d))](
        scratch, result, result.stride(0), result.stride(1), result.stride(2), batch, grid, d_out,
        G_PAD=g_pad, BLOCK_D=block_d, num_warps=4,
        BF16_BY_BITS=result.dtype == torch.bfloat16 and result.device.type == "cpu")
    return embed


def _grad_reduce_triton(grad_out, grid):
    """fp32 ([gY ; gX] (2, B*G, D), gS (B, D)): grad_out summed over columns / rows / both."""
    batch, _, d_out = grad_out.shape
    reduced = torch.empty((2 * grid + 1) * batch * d_out, dtype=torch.float32, device=grad_out.device)
    if batch > 0:
        block_d = _pow2_block(d_out, 16, 128)
        g_pad = _pow2_block(grid, 1, 1 << 30)
        _relpos_grad_reduce_kernel[(batch, triton.cdiv(d_out, block_d))](
            grad_out, reduced, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            batch, grid, d_out, G_PAD=g_pad, BLOCK_D=block_d, num_warps=4)
    axis = batch * grid * d_out
    return reduced[:2 * axis].view(2, batch * grid, d_out), reduced[2 * axis:].view(batch, d_out)


class _RelposQueryEmbed(torch.autograd.Function):

    @staticmethod
    def forward(ctx, out, rel, weight, bias, mask_token, grid):
        batch, d_out = rel.shape[0], weight.shape[0]
        if out is None:
            result = torch.empty(batch, grid * grid, d_out, dtype=weight.dtype, device=weight.device)
        else:
            result = out
        need_weight = ctx.needs_input_grad[2]
        # Under autocast the model's Linear would run in the autocast dtype: match that precision
        # class (tf32 products here, autocast-dtype weight-gradient GEMMs in backward).
        device_type = rel.device.type
        autocast_dtype = (torch.get_autocast_dtype(device_type)
                          if torch.is_autocast_enabled(device_type) else None)
        with torch.no_grad():
            embed = _query_forward_triton(rel, grid, weight, bias, mask_token, result,
                                          keep_embeddings=need_weight,
                                          half_precision_dot=autocast_dtype is not None)
        ctx.gemm_dtype = weight.dtype if autocast_dtype is None else autocast_dtype
        if need_weight:
            ctx.save_for_backward(embed)
        ctx.grid = grid
        ctx.batch = batch
        ctx.weight_dtype = weight.dtype
        ctx.weight_shape = tuple(weight.shape)
        ctx.bias_dtype = bias.dtype
        ctx.mask_dtype = mask_token.dtype
        ctx.mask_shape = tuple(mask_token.shape)
        ctx.out_dtype = result.dtype
        if out is not None:
            ctx.mark_dirty(out)  # written in place: autograd rebases the buffer's history
        return result

    @staticmethod
    def backward(ctx, grad_out):
        need_weight, need_bias, need_mask = ctx.needs_input_grad[2:5]
        grad_weight = grad_bias = grad_mask = grad_overwritten = None
        if ctx.needs_input_grad[0]:
            # `out` was overwritten, so what it held before gets a zero gradient. It must be a defined
            # tensor (an undefined one cuts the buffer's earlier history off in CopySlices); a
            # broadcast zero costs no memory.
            grad_overwritten = grad_out.new_zeros((1, 1, 1), dtype=ctx.out_dtype).expand(grad_out.shape)
        if not (need_weight or need_bias or need_mask):
            return grad_overwritten, None, None, None, None, None
        grid, batch = ctx.grid, ctx.batch
        d_out, two_dim = ctx.weight_shape
        grad_axes, grad_scale = _grad_reduce_triton(grad_out, grid)
        if need_bias or need_mask:
            total = grad_scale.sum(dim=0)
            if need_bias:
                grad_bias = total.to(ctx.bias_dtype)
            if need_mask:
                grad_mask = total.reshape(ctx.mask_shape).to(ctx.mask_dtype)
        if need_weight:
            (embed,) = ctx.saved_tensors
            half = two_dim // 4  # dim / 2: the width of E(y), E(x)
            axis = batch * grid * half
            embed_axes = embed[:2 * axis].view(2, batch * grid, half)
            embed_scale = embed[2 * axis:].view(batch, 2 * half)
            # operands in weight.dtype, or in the autocast dtype when the forward ran under autocast
            # (fp32 accumulation in cuBLAS), as the model's Linear computes its weight gradient
            gemm_dtype = ctx.gemm_dtype
            axes = torch.bmm(grad_axes.to(gemm_dtype).transpose(1, 2), embed_axes.to(gemm_dtype))
            scale = grad_scale.to(gemm_dtype).t() @ embed_scale.to(gemm_dtype)
            grad_weight = torch.cat([axes[0], axes[1], scale], dim=1).to(ctx.weight_dtype)
        return grad_overwritten, None, grad_weight, grad_bias, grad_mask, None
