"""SIM's fixed 2-D sin-cos tables (absolute, and relative view-2-in-view-1) and the fused query block.

Frequencies (SIM spec section 4.2): for an embedding width `dim` (divisible by 4),
    omega_k = 10000 ** (-k / (dim / 4)),  k = 0 .. dim/4 - 1,
and a scalar u is encoded as the two blocks E(u) = [sin(u * omega), cos(u * omega)] (dim/4 each).

absolute_sincos_table(grid, dim) -> (grid*grid, dim) float32
    row r = a*grid + b (raster order) holds [sin(a w), cos(a w), sin(b w), cos(b w)]: ROW first,
    then column (the halves are swapped relative to MAE; SIM is consistent with itself).

relpos_embed(rel, grid, dim, backend="auto", check_values=True) -> (B, grid*grid, 2*dim) float32,
no gradient
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
    dh and dw must be > 0 and relflip must be 0 or 1. B = 0 is legal (an empty result).

relpos_query_embed(rel, grid, weight, bias, mask_token, out=None, backend="auto",
                   check_values=True) -> (B, G*G, D)
    SIM's predictor queries (spec section 4.1): queries[b, n] = mask_token + W R_n + bias, with
    weight W (D, 2*dim) (dim = weight.shape[1] // 2, divisible by 4; in SIM D = dim = 768), bias
    (D,), mask_token (D,) or (1, 1, D). `out`, if given, is a (B, G*G, D) float tensor, typically the
    view `buffer[:, 1 + K:]` of a preallocated (B, 1 + K + G*G, D) predictor-input buffer (strided
    in the batch); the queries are written into it and `out` is returned, with autograd through the
    buffer exactly as for torch.cat (an autograd.Function marks `out` dirty). B = 0 is legal.
    Gradients: weight, bias and mask_token (rel gets none: geometry is data).
    Dtype policy (Triton path): computed in fp32 whatever the input dtypes (fp32 / bf16 / fp16); the
    result is stored in out.dtype when `out` is given, else in weight.dtype (also under autocast:
    with fp32 parameters under bf16 autocast, pass an `out` in the autocast dtype, as the model's
    preallocated predictor buffer is, or cast the result). Gradients come back in each parameter's
    dtype. Precision class: tf32x3 products (~fp32) and fp32 weight-gradient GEMMs for fp32 weights
    outside autocast; tf32 products and weight-gradient GEMMs in the half dtype (weight's, or
    autocast's) otherwise -- never less precise than the reference's autocast Linear. The reference
    runs F.linear(table.to(weight.dtype)), so it follows autocast like the model's nn.Linear does:
    its result dtype is promote(mask_token.dtype, the Linear's dtype) (fp32 for SIM's fp32 mask
    token under bf16 autocast, with bf16-rounded products).

Registered ops (namespace densesim, torch.library.custom_op, device_types cpu and cuda; a fake
(meta) implementation each, so they are opaque nodes inside a user's torch.compile graph). Every op
takes `use_triton`: False runs the reference maths (the CPU implementation), True the Triton
launchers (CUDA, or CPU tensors under TRITON_INTERPRET=1). The public functions pick it:
backend="auto" -> Triton on CUDA tensors where triton imports, the reference maths otherwise;
"triton" -> Triton on CUDA (or under the interpreter), a one-line RuntimeError anywhere else;
"reference" -> relpos_embed_reference / relpos_query_embed_reference, plain torch autograd (what
the benchmarks' `compiled` variant compiles and `--no-fused` runs), no registered op.
    densesim::relpos_embed(rel, grid, dim, check_values, use_triton) -> table
        (B, G*G, 2*dim) fp32. Autograd registered (register_autograd): the table is marked
        non-differentiable (geometry is data), so there is no backward op to run.
    densesim::relpos_query_embed(rel, weight, bias, mask_token, grid, gemm_dtype,
                                 keep_for_weight_grad, check_values, use_triton) -> (queries, saved)
        queries (B, G*G, D) in weight.dtype (Triton) or promote(mask_token.dtype, gemm_dtype)
        (reference maths, exactly the reference's result). gemm_dtype is the dtype of the
        Linear's operands: the autocast dtype when autocast is on for rel's device type, else
        weight.dtype (the public function reads the autocast state and passes it, so the op's
        result depends on its arguments only; autocast is off inside the op). `saved` (not
        differentiable) is what backward needs for grad_weight, in gemm_dtype, empty unless
        keep_for_weight_grad: Triton -- the flat [E_y | E_x | E_s] embeddings the forward kernel
        built (B*(2G+2)*dim/2 values); reference maths -- the (B, G*G, 2*dim) table (as the
        reference's Linear saves its input). Autograd via register_autograd.
    densesim::relpos_query_embed_into(out!, rel, weight, bias, mask_token, grid, gemm_dtype,
                                      keep_for_weight_grad, check_values, use_triton) -> saved
        The same, writing the queries into `out` (mutated in place, any strides, stored in
        out.dtype; the reference maths copy their result into it, as the reference does). A
        mutating op cannot carry register_autograd, so the public function wraps it in a small
        autograd.Function (mark_dirty(out), backward = the op below); that Function traces under
        torch.compile as well.
    densesim::relpos_query_embed_backward(grad_queries, saved, grid, two_dim, gemm_dtype,
                                          queries_dtype, weight_dtype, bias_dtype, mask_dtype,
                                          mask_shape, need_weight, use_triton)
        -> (grad_weight, grad_bias, grad_mask)
        All the backward's glue is in this op: the grad_out reductions, grad_bias, grad_mask and
        the grad_weight GEMMs. grad_weight is (D, 2*dim) in weight_dtype, or empty when not
        need_weight. Reference maths: the gradient is rounded to queries_dtype, then exactly the
        reference's autograd formulas (grad_mask = sum over (B, G*G); the Linear's grad_weight =
        g^T @ table and grad_bias = sum of g, in gemm_dtype), so "auto" on CPU gives the
        reference's gradients bit for bit.

No host sync: nothing on the op path reads a tensor value on the host (no .item(), bool(tensor),
data-dependent shapes). Shape, dtype, device and argument checks read no values and raise one-line
ValueErrors before any launch, in the public function. The value checks on rel (finite, dh and dw
> 0, relflip in {0, 1}; check_values=True, the default) run inside the registered forward op, before
its launches, through _check_on_device: on CUDA they are torch._assert_async (the step goes on; a
failure stops the next synchronisation with the message), on CPU the same check raises the
ValueError at once (also in compiled code, where the op's implementation runs eagerly). With
check_values=False they are skipped; bad geometry cannot cause an out-of-bounds access anyway (every
load and store of the kernels is masked by shape; bad values only give NaN/garbage numbers), so the
check guards semantics, not memory. (backend="reference" runs the same checks in Python.)

Launch plans: block sizes, launch grids, the tl.dot precision and the interpreter-only rounding
flags are made once per (shapes, dtypes, device type) by functools.lru_cache'd functions
(_table_plan, _query_plan, _reduce_plan); the float32 frequencies once per (dim, device)
(_omega32). The kernels take strides, so no input is copied or converted before a launch.

Precision: the references compute coordinates and angles in float64 and store float32, one block at
a time (so the float64 scratch is one (B, G*G, dim/4) block, never the whole embedding). The Triton
kernels compute coordinates, angles and sin/cos in fp32 (abs error ~1e-6 per entry for the recipe's
|y|, |x| <~ 40), with the frequencies computed in float64 on the host once per (dim, device).

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
Backward (densesim::relpos_query_embed_backward, use_triton): `_relpos_grad_reduce_kernel` (grid
(B, cdiv(D, BLOCK_D))) reads grad_out once (any strides, any float dtype) and writes gY[b,a] =
sum_c g[b,a,c] and gX[b,c] = sum_a g[b,a,c] straight in the GEMM dtype ([gY | gX], the only use of
those) and gS[b] = sum_{a,c} g[b,a,c] in fp32. Then in torch, inside the op: grad_bias = grad_mask =
sum_b gS[b] (fp32, then each parameter's dtype); grad_W = [gY^T E_y | gX^T E_x | gS^T [E(s_h),
E(s_w)]] as one bmm (K = B*G) and one mm (K = B) on the reduced tensors. The embeddings E come from
the forward: when weight needs a gradient, kernel 1's first column of programs also stores the E
tiles it built, directly in the GEMM dtype ([E_y | E_x | E_s], B*(2G+2)*dim/2 values: 2.9 MB bf16
at B=128, instead of the reference's 77 MB bf16 table), so backward is one Triton kernel and ~5
small torch ops, in one registered op. GEMM operands are in weight.dtype, or in the autocast dtype
when the forward ran under autocast (fp32 accumulation in cuBLAS), as the model's Linear computes
its weight gradient. (The stores in the GEMM dtype round to nearest exactly as the former fp32
buffers followed by .to(gemm dtype) did: the same numbers, fewer launches and bytes.)
Roofline at the recipe (B=128, G=14, D=dim=768, bf16 out): forward must write B*196*768*2 B = 38.5
MB (the reference writes the 154 MB fp32 table, converts it and runs a 2*B*196*1536*768 = 59 GFLOP
GEMM); the fused decomposition is 2*D*(2*B*G*dim/2 + B*dim) = 2.3 GFLOP (26x fewer). Backward must
read grad_out once (38.5 MB) and runs the same 2.3 GFLOP for grad_W (reference: 59 GFLOP).
"""
import functools
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
_TABLE = "relpos_embed"
_QUERY = "relpos_query_embed"


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


def _check_grid_and_dim(op_name, grid, dim):
    if isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0:
        raise ValueError(f"{op_name}: grid must be a positive int, got {grid!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 4):
        raise ValueError(f"{op_name}: dim must be a positive int divisible by 4, got {dim!r}")


def _validate_relpos_embed(rel, grid, dim, op_name=_TABLE):
    """Shapes, dtypes and arguments only: never reads a tensor's values."""
    _check_grid_and_dim(op_name, grid, dim)
    if not isinstance(rel, torch.Tensor):
        raise ValueError(f"{op_name}: rel must be a torch.Tensor, got {type(rel).__name__}")
    if rel.dim() != 2 or rel.shape[1] != 6 or not rel.is_floating_point():
        raise ValueError(f"{op_name}: rel must be a float tensor of shape (B, 6) = "
                         f"(di, dj, dh, dw, relflip, dj_flip), got {rel.dtype} {tuple(rel.shape)}")


def _check_rel_values(rel, op_name):
    """The value checks on rel, on the device (no host sync; see _check_on_device): finite, dh and
    dw > 0, relflip 0 or 1. On CPU the first failing one raises its ValueError."""
    if rel.device.type == "meta" or rel.shape[0] == 0:
        return
    _check_on_device(torch.isfinite(rel).all(), f"{op_name}: rel must be finite")
    _check_on_device((rel[:, 2:4] > 0).all(),
                     f"{op_name}: rel[:, 2] (dh) and rel[:, 3] (dw) must be > 0")
    relflip = rel[:, 4]
    _check_on_device(((relflip == 0) | (relflip == 1)).all(),
                     f"{op_name}: rel[:, 4] (relflip) must be 0 or 1")


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
    _check_rel_values(rel, "relpos_coordinates")
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


def relpos_embed(rel, grid, dim, backend="auto", check_values=True):
    """(B, grid*grid, 2*dim) float32 relative sin-cos embedding of view-2 patches in view-1 units
    (no gradient). check_values=False skips the device-side value checks on rel (finite, dh/dw >
    0, relflip in {0, 1}); shapes are always checked."""
    _check_backend_name(_TABLE, backend)
    _validate_relpos_embed(rel, grid, dim)
    use_triton = _select_backend(_TABLE, backend, rel.device) == "triton"
    if backend == "reference":
        if check_values:
            _check_rel_values(rel, _TABLE)
        with torch.no_grad():
            return relpos_embed_reference(rel, grid, dim)
    return _relpos_embed_op(rel.detach(), grid, dim, bool(check_values), use_triton)


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


def _validate_relpos_query_embed(rel, grid, weight, bias, mask_token, out, op_name=_QUERY):
    """Shapes, dtypes, devices and arguments only: never reads a tensor's values."""
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
    _validate_relpos_embed(rel, grid, weight.shape[1] // 2, op_name=op_name)
    if out is not None:
        expected = (rel.shape[0], grid * grid, d_out)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{op_name}: out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != expected or out.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op_name}: out must be a float32/bfloat16/float16 tensor of shape "
                             f"{expected}, got {out.dtype} {tuple(out.shape)}")
        if out.device != rel.device:
            raise ValueError(f"{op_name}: out must be on rel's device ({rel.device}), got {out.device}")


def _gemm_dtype(device, weight_dtype):
    """The dtype of the Linear's operands: the autocast dtype when autocast is on for this device
    type (as the model's nn.Linear runs), else weight's dtype. Read here, outside the ops, so that
    the ops' results depend on their arguments only."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


def relpos_query_embed(rel, grid, weight, bias, mask_token, out=None, backend="auto",
                       check_values=True):
    """(B, grid*grid, D) queries = mask_token + relpos_embed(rel, grid, dim) @ weight^T + bias.

    rel (B, 6) geometry (no gradient); weight (D, 2*dim); bias (D,); mask_token (D,) or (1, 1, D).
    out: optional (B, grid*grid, D) tensor (e.g. buffer[:, 1+K:], strided) that receives the result
    and is returned; autograd flows to weight, bias, mask_token and, through the buffer, to whatever
    was written into the buffer's other slices. Output dtype: out.dtype if given, else weight.dtype
    (Triton path; computed in fp32) or the reference's promote(mask_token.dtype, Linear dtype)
    (reference maths). See the module docstring for the registered ops, kernels and roofline.
    check_values=False skips the value checks on rel (finite, dh/dw > 0, relflip in {0, 1}; they
    run on the device, with no host sync, see the module docstring), for callers whose geometry is
    valid by construction; shapes, dtypes and devices are still checked, and bad values can only
    give wrong numbers, never an out-of-bounds access.
    """
    _check_backend_name(_QUERY, backend)
    _validate_relpos_query_embed(rel, grid, weight, bias, mask_token, out)
    use_triton = _select_backend(_QUERY, backend, rel.device) == "triton"
    if backend == "reference":
        if check_values:
            _check_rel_values(rel, _QUERY)
        return relpos_query_embed_reference(rel, grid, weight, bias, mask_token, out=out)
    gemm_dtype = _gemm_dtype(rel.device, weight.dtype)
    rel = rel.detach()  # geometry is data: no gradient, no autograd bookkeeping for it
    keep = torch.is_grad_enabled() and weight.requires_grad  # keep what grad_weight needs
    if out is None:
        queries, _ = _relpos_query_embed_op(rel, weight, bias, mask_token, grid, gemm_dtype, keep,
                                            bool(check_values), use_triton)
        return queries
    # `out` goes first: for a dirty view, autograd's CopySlices maps the Function's FIRST input to
    # the view (a dirty view in another position trips an internal assert in torch).
    return _RelposQueryEmbedInto.apply(out, rel, weight, bias, mask_token, grid, gemm_dtype, keep,
                                       bool(check_values), use_triton)


# ---------------------------------------------------------------------------------------------
# Registered ops (torch.library): implementations, fake implementations, autograd
# ---------------------------------------------------------------------------------------------

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


def _no_autocast(device):
    """Autocast off inside the ops: the dtypes are explicit arguments (gemm_dtype)."""
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _reference_queries_dtype(mask_dtype, gemm_dtype):
    """The reference's result dtype: mask_token + (Linear output in gemm_dtype)."""
    return torch.promote_types(mask_dtype, gemm_dtype)


def _saved_shape(batch, grid, dim, keep, use_triton):
    if not keep:
        return (0,)
    if use_triton:
        return (batch * (2 * grid + 2) * (dim // 2),)  # flat [E_y | E_x | E_s]
    return (batch, grid * grid, 2 * dim)                # the reference's Linear input


def _reference_queries(rel, grid, weight, bias, mask_token, gemm_dtype):
    """(queries, table in gemm_dtype): exactly relpos_query_embed_reference's numbers with the
    Linear in gemm_dtype (the dtype autocast would give it), autocast being off here."""
    table = relpos_embed_reference(rel, grid, weight.shape[1] // 2).to(gemm_dtype)
    queries = F.linear(table, weight.to(gemm_dtype), bias.to(gemm_dtype))
    return mask_token.reshape(-1) + queries, table


def _query_forward(out, rel, weight, bias, mask_token, grid, gemm_dtype, keep, check_values,
                   use_triton):
    """The forward of both query ops: (queries, saved). Writes into `out` when given."""
    if check_values:
        _check_rel_values(rel, _QUERY)
    saved = None
    if use_triton:  # (the Triton path runs no autocast-sensitive torch op: no autocast guard)
        result = out
        if result is None:
            result = torch.empty(rel.shape[0], grid * grid, weight.shape[0], dtype=weight.dtype,
                                 device=rel.device)
        with _on_device(rel.device):
            saved = _query_forward_triton(rel, grid, weight, bias, mask_token, result,
                                          keep_embeddings=keep, gemm_dtype=gemm_dtype)
    else:
        with _no_autocast(rel.device):
            result, table = _reference_queries(rel, grid, weight, bias, mask_token, gemm_dtype)
            if out is not None:
                out.copy_(result)
                result = out
        if keep:
            saved = table
    if saved is None:
        saved = rel.new_empty((0,), dtype=gemm_dtype)
    return result, saved


@torch.library.custom_op("densesim::relpos_embed", mutates_args=(), device_types=("cpu", "cuda"))
def _relpos_embed_op(rel: torch.Tensor, grid: int, dim: int, check_values: bool,
                     use_triton: bool) -> torch.Tensor:
    """(B, G*G, 2*dim) fp32 table: the Triton kernel (use_triton) or the reference maths."""
    if check_values:
        _check_rel_values(rel, _TABLE)
    if use_triton:
        with _on_device(rel.device):
            return _relpos_table_triton(rel, grid, dim)
    return relpos_embed_reference(rel, grid, dim)


@_relpos_embed_op.register_fake
def _relpos_embed_fake(rel, grid, dim, check_values, use_triton):
    return rel.new_empty((rel.shape[0], grid * grid, 2 * dim), dtype=torch.float32)


def _relpos_embed_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _relpos_embed_backward(ctx, grad_table):
    return None, None, None, None, None  # geometry is data: no gradient, by definition of the op


torch.library.register_autograd("densesim::relpos_embed", _relpos_embed_backward,
                                setup_context=_relpos_embed_setup_context)


@torch.library.custom_op("densesim::relpos_query_embed", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _relpos_query_embed_op(rel: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           mask_token: torch.Tensor, grid: int, gemm_dtype: torch.dtype,
                           keep_for_weight_grad: bool, check_values: bool,
                           use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, saved): see the module docstring."""
    return _query_forward(None, rel, weight, bias, mask_token, grid, gemm_dtype,
                          keep_for_weight_grad, check_values, use_triton)


@_relpos_query_embed_op.register_fake
def _relpos_query_embed_fake(rel, weight, bias, mask_token, grid, gemm_dtype, keep_for_weight_grad,
                             check_values, use_triton):
    batch, d_out, dim = rel.shape[0], weight.shape[0], weight.shape[1] // 2
    dtype = weight.dtype if use_triton else _reference_queries_dtype(mask_token.dtype, gemm_dtype)
    return (rel.new_empty((batch, grid * grid, d_out), dtype=dtype),
            rel.new_empty(_saved_shape(batch, grid, dim, keep_for_weight_grad, use_triton),
                          dtype=gemm_dtype))


@torch.library.custom_op("densesim::relpos_query_embed_into", mutates_args=("out",),
                         device_types=("cpu", "cuda"))
def _relpos_query_embed_into_op(out: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor, mask_token: torch.Tensor, grid: int,
                                gemm_dtype: torch.dtype, keep_for_weight_grad: bool,
                                check_values: bool, use_triton: bool) -> torch.Tensor:
    """Writes the queries into `out`; returns `saved` (see the module docstring)."""
    _, saved = _query_forward(out, rel, weight, bias, mask_token, grid, gemm_dtype,
                              keep_for_weight_grad, check_values, use_triton)
    return saved


@_relpos_query_embed_into_op.register_fake
def _relpos_query_embed_into_fake(out, rel, weight, bias, mask_token, grid, gemm_dtype,
                                  keep_for_weight_grad, check_values, use_triton):
    return rel.new_empty(_saved_shape(rel.shape[0], grid, weight.shape[1] // 2,
                                      keep_for_weight_grad, use_triton), dtype=gemm_dtype)


@torch.library.custom_op("densesim::relpos_query_embed_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _relpos_query_embed_backward_op(grad_queries: torch.Tensor, saved: torch.Tensor, grid: int,
                                    two_dim: int, gemm_dtype: torch.dtype,
                                    queries_dtype: torch.dtype, weight_dtype: torch.dtype,
                                    bias_dtype: torch.dtype, mask_dtype: torch.dtype,
                                    mask_shape: list[int], need_weight: bool,
                                    use_triton: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """(grad_weight (D, two_dim) or empty, grad_bias (D,), grad_mask (mask_shape))."""
    batch, _, d_out = grad_queries.shape
    with _no_autocast(grad_queries.device):
        if use_triton:
            with _on_device(grad_queries.device):
                grad_axes, grad_scale = _grad_reduce_triton(grad_queries, grid, gemm_dtype)
            total = grad_scale.sum(dim=0)
            grad_bias = total.to(bias_dtype)
            grad_mask = total.reshape(mask_shape).to(mask_dtype, copy=True)  # never grad_bias' storage
            grad_weight = None
            if need_weight:
                half = two_dim // 4  # dim / 2: the width of E(y), E(x)
                axis = batch * grid * half
                embed_axes = saved[:2 * axis].view(2, batch * grid, half)
                embed_scale = saved[2 * axis:].view(batch, 2 * half)
                axes = torch.bmm(grad_axes.transpose(1, 2), embed_axes)
                scale = grad_scale.to(gemm_dtype).t() @ embed_scale
                grad_weight = torch.cat([axes[0], axes[1], scale], dim=1).to(weight_dtype)
        else:
            # the reference's autograd, formula by formula (bit for bit): copy_/add cast the
            # gradient to the queries' and then the Linear's dtype; sum_to for the broadcast mask
            grad = grad_queries.to(queries_dtype)
            grad_mask = grad.sum(dim=(0, 1)).to(mask_dtype).reshape(mask_shape)
            grad_linear = grad.to(gemm_dtype).reshape(-1, d_out)
            grad_bias = grad_linear.sum(dim=0).to(bias_dtype)
            grad_weight = None
            if need_weight:
                grad_weight = grad_linear.t().mm(saved.reshape(-1, two_dim)).to(weight_dtype)
        if grad_weight is None:
            grad_weight = grad_queries.new_empty((0,), dtype=weight_dtype)
    return grad_weight, grad_bias, grad_mask


@_relpos_query_embed_backward_op.register_fake
def _relpos_query_embed_backward_fake(grad_queries, saved, grid, two_dim, gemm_dtype, queries_dtype,
                                      weight_dtype, bias_dtype, mask_dtype, mask_shape, need_weight,
                                      use_triton):
    d_out = grad_queries.shape[2]
    return (grad_queries.new_empty((d_out, two_dim) if need_weight else (0,), dtype=weight_dtype),
            grad_queries.new_empty((d_out,), dtype=bias_dtype),
            grad_queries.new_empty(mask_shape, dtype=mask_dtype))


def _save_query_context(ctx, weight, bias, mask_token, saved, grid, gemm_dtype, keep, use_triton):
    ctx.save_for_backward(saved)
    ctx.grid = grid
    ctx.gemm_dtype = gemm_dtype
    ctx.keep = keep
    ctx.use_triton = use_triton
    ctx.two_dim = weight.shape[1]
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype
    ctx.mask_dtype = mask_token.dtype
    ctx.mask_shape = list(mask_token.shape)
    ctx.queries_dtype = _reference_queries_dtype(mask_token.dtype, gemm_dtype)


def _query_parameter_grads(ctx, grad_queries, need_weight, need_bias, need_mask):
    """(grad_weight, grad_bias, grad_mask), None where not needed, from the backward op."""
    if grad_queries is None or not (need_weight or need_bias or need_mask):
        return None, None, None
    if need_weight and not ctx.keep:
        raise RuntimeError(f"{_QUERY}: weight needs a gradient but the forward ran with "
                           f"keep_for_weight_grad=False (call the public relpos_query_embed)")
    (saved,) = ctx.saved_tensors
    grad_weight, grad_bias, grad_mask = _relpos_query_embed_backward_op(
        grad_queries, saved, ctx.grid, ctx.two_dim, ctx.gemm_dtype, ctx.queries_dtype,
        ctx.weight_dtype, ctx.bias_dtype, ctx.mask_dtype, ctx.mask_shape, need_weight,
        ctx.use_triton)
    return (grad_weight if need_weight else None, grad_bias if need_bias else None,
            grad_mask if need_mask else None)


def _relpos_query_embed_setup_context(ctx, inputs, output):
    _, weight, bias, mask_token, grid, gemm_dtype, keep, _, use_triton = inputs
    _, saved = output
    ctx.mark_non_differentiable(saved)
    _save_query_context(ctx, weight, bias, mask_token, saved, grid, gemm_dtype, keep, use_triton)


def _relpos_query_embed_backward(ctx, grad_queries, grad_saved):
    need_weight, need_bias, need_mask = ctx.needs_input_grad[1:4]
    grads = _query_parameter_grads(ctx, grad_queries, need_weight, need_bias, need_mask)
    return (None, *grads, None, None, None, None, None)  # rel: geometry is data, no gradient


torch.library.register_autograd("densesim::relpos_query_embed", _relpos_query_embed_backward,
                                setup_context=_relpos_query_embed_setup_context)


class _RelposQueryEmbedInto(torch.autograd.Function):
    """Autograd of densesim::relpos_query_embed_into (a mutating op cannot use register_autograd):
    `out` is marked dirty, so autograd rebases the buffer's history on this node exactly as for
    an in-place copy into it; the backward is densesim::relpos_query_embed_backward."""

    @staticmethod
    def forward(ctx, out, rel, weight, bias, mask_token, grid, gemm_dtype, keep, check_values,
                use_triton):
        saved = _relpos_query_embed_into_op(out, rel, weight, bias, mask_token, grid, gemm_dtype,
                                            keep, check_values, use_triton)
        _save_query_context(ctx, weight, bias, mask_token, saved, grid, gemm_dtype, keep,
                            use_triton)
        ctx.out_dtype = out.dtype
        ctx.mark_dirty(out)  # written in place: autograd rebases the buffer's history
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_overwritten = None
        if ctx.needs_input_grad[0]:
            # `out` was overwritten, so what it held before gets a zero gradient. It must be a defined
            # tensor (an undefined one cuts the buffer's earlier history off in CopySlices); a
            # broadcast zero costs no memory.
            grad_overwritten = grad_out.new_zeros((1, 1, 1), dtype=ctx.out_dtype).expand(grad_out.shape)
        need_weight, need_bias, need_mask = ctx.needs_input_grad[2:5]
        grads = _query_parameter_grads(ctx, grad_out, need_weight, need_bias, need_mask)
        return (grad_overwritten, None, *grads, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Triton kernels, launch plans and launchers
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _omega32_cached(dim, device_type, device_index):
    return _frequencies(dim, torch.device(device_type, device_index)).to(torch.float32)


def _omega32(dim, device):
    """(dim/4,) float32 frequencies, computed in float64 once per (dim, device)."""
    return _omega32_cached(dim, device.type, device.index)


def _pow2_block(size, low, high):
    """Power-of-two block covering `size`, clamped to [low, high] (tl.dot needs >= 16 per dim)."""
    return max(low, min(high, 1 << max(0, math.ceil(math.log2(max(1, size))))))


def _cdiv(a, b):
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _table_plan(batch, grid, dim):
    """Blocks and launch grid of _relpos_table_kernel for one shape."""
    cells, quarter = grid * grid, dim // 4
    block_n = _pow2_block(cells, 16, 32)
    block_k = _pow2_block(quarter, 16, 64)
    return {"launch": (batch, _cdiv(cells, block_n), _cdiv(quarter, block_k)),
            "BLOCK_N": block_n, "BLOCK_K": block_k}


@functools.lru_cache(maxsize=256)
def _query_plan(batch, grid, dim, d_out, weight_dtype, gemm_dtype, out_dtype, device_type):
    """Blocks, launch grids, dot precision and the interpreter-only bf16 rounding flags of the two
    forward kernels for one (shape, dtypes, device type)."""
    quarter = dim // 4
    block_m = _pow2_block(batch * grid, 16, 64)
    block_n = _pow2_block(d_out, 16, 128)
    block_k = _pow2_block(quarter, 16, 32)
    tiles_per_axis = _cdiv(batch * grid, block_m)
    scale_tiles = _cdiv(batch, block_m)
    fp32_dot = weight_dtype == torch.float32 and gemm_dtype == torch.float32
    block_d = _pow2_block(d_out, 16, 128)
    interpret = device_type == "cpu"
    return {"products_launch": (2 * tiles_per_axis + scale_tiles, _cdiv(d_out, block_n)),
            "tiles_per_axis": tiles_per_axis, "BLOCK_M": block_m, "BLOCK_N": block_n,
            "BLOCK_K": block_k, "DOT_PRECISION": "tf32x3" if fp32_dot else "tf32",
            "EMBED_BF16_BY_BITS": interpret and gemm_dtype == torch.bfloat16,
            "write_launch": (batch, _cdiv(d_out, block_d)), "BLOCK_D": block_d,
            "G_PAD": _pow2_block(grid, 2, 1 << 30),
            "OUT_BF16_BY_BITS": interpret and out_dtype == torch.bfloat16}


@functools.lru_cache(maxsize=256)
def _reduce_plan(batch, grid, d_out, axes_dtype, device_type):
    block_d = _pow2_block(d_out, 16, 128)
    return {"launch": (batch, _cdiv(d_out, block_d)), "BLOCK_D": block_d,
            "G_PAD": _pow2_block(grid, 2, 1 << 30),
            "AXES_BF16_BY_BITS": device_type == "cpu" and axes_dtype == torch.bfloat16}


if _TRITON_IMPORTABLE:

    @triton.jit
    def _relpos_cast(value, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        """fp32 `value` in `dtype`, rounded to nearest even. BF16_BY_BITS (interpreter only, whose
        own fp32 -> bf16 cast truncates): the rounding done by integer arithmetic."""
        if BF16_BY_BITS:
            bits = value.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            result = value.to(dtype)
        return result

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
                                     DOT_PRECISION: tl.constexpr, STORE_EMBED: tl.constexpr,
                                     EMBED_BF16_BY_BITS: tl.constexpr):
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
        # embeddings kept for backward, in the GEMM dtype: [E_y (B*G, dim/2) | E_x (B*G, dim/2) |
        # E_s (B, dim)], written by the first column of programs only
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
                    tl.store(e_ptrs, _relpos_cast(e_sin, embed_ptr.dtype.element_ty, EMBED_BF16_BY_BITS),
                             mask=e_mask)
                    tl.store(e_ptrs + quarter,
                             _relpos_cast(e_cos, embed_ptr.dtype.element_ty, EMBED_BF16_BY_BITS),
                             mask=e_mask)
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
            tl.store(out_base + a * grid * stride_on,
                     _relpos_cast(value, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)

    @triton.jit
    def _relpos_grad_reduce_kernel(grad_ptr, axes_ptr, scale_ptr, stride_gb, stride_gn, stride_gd,
                                   batch, grid, d_out,
                                   G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                                   AXES_BF16_BY_BITS: tl.constexpr):
        # axes (GEMM dtype): [gY (B*G rows) | gX (B*G rows)]; scale (fp32): gS (B rows); rows of d_out
        sample = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_c = tl.arange(0, G_PAD)
        d_mask = offs_d < d_out
        mask = (offs_c < grid)[:, None] & d_mask[None, :]
        axis_rows = batch * grid
        y_base = axes_ptr + sample * grid * d_out
        x_base = axes_ptr + (axis_rows + sample * grid) * d_out
        s_base = scale_ptr + sample * d_out
        g_base = grad_ptr + sample * stride_gb + offs_c[:, None] * stride_gn + offs_d[None, :] * stride_gd
        x_acc = tl.zeros((G_PAD, BLOCK_D), dtype=tl.float32)
        s_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for a in range(0, grid):
            tile = tl.load(g_base + a * grid * stride_gn, mask=mask, other=0.0).to(tl.float32)
            row_sum = tl.sum(tile, axis=0)
            tl.store(y_base + a * d_out + offs_d,
                     _relpos_cast(row_sum, axes_ptr.dtype.element_ty, AXES_BF16_BY_BITS), mask=d_mask)
            x_acc += tile
            s_acc += row_sum
        tl.store(x_base + offs_c[:, None] * d_out + offs_d[None, :],
                 _relpos_cast(x_acc, axes_ptr.dtype.element_ty, AXES_BF16_BY_BITS), mask=mask)
        tl.store(s_base + offs_d, s_acc, mask=d_mask)


def _relpos_table_triton(rel, grid, dim):
    batch, cells, quarter = rel.shape[0], grid * grid, dim // 4
    out = torch.empty(batch, cells, 2 * dim, dtype=torch.float32, device=rel.device)
    if batch == 0:
        return out
    plan = _table_plan(batch, grid, dim)
    _relpos_table_kernel[plan["launch"]](rel, _omega32(dim, rel.device), out, rel.stride(0), rel.stride(1),
                                         out.stride(0), out.stride(1), grid, cells, quarter,
                                         BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"], num_warps=4)
    return out


def _query_forward_triton(rel, grid, weight, bias, mask_token, result, keep_embeddings=False,
                          gemm_dtype=None):
    """Writes mask_token + W R + bias into result (B, G*G, D), any strides and float dtype. With
    keep_embeddings, returns the flat [E_y (B*G, dim/2) | E_x (B*G, dim/2) | E_s (B, dim)] that the
    kernel built on the way (for grad_weight), stored in gemm_dtype (default weight.dtype), else
    None."""
    batch, d_out, dim = rel.shape[0], weight.shape[0], weight.shape[1] // 2
    gemm_dtype = weight.dtype if gemm_dtype is None else gemm_dtype
    embed = None
    if keep_embeddings:
        embed = torch.empty(batch * (2 * grid + 2) * (dim // 2), dtype=gemm_dtype, device=rel.device)
    if batch == 0:
        return embed
    plan = _query_plan(batch, grid, dim, d_out, weight.dtype, gemm_dtype, result.dtype,
                       rel.device.type)
    mask_flat = mask_token.reshape(-1)
    scratch = torch.empty((2 * grid + 1) * batch * d_out, dtype=torch.float32, device=rel.device)
    _relpos_axis_products_kernel[plan["products_launch"]](
        rel, _omega32(dim, rel.device), weight, bias, mask_flat, scratch, scratch if embed is None else embed,
        rel.stride(0), rel.stride(1), weight.stride(0), weight.stride(1), bias.stride(0), mask_flat.stride(0),
        batch, grid, dim // 4, d_out, plan["tiles_per_axis"],
        BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"],
        DOT_PRECISION=plan["DOT_PRECISION"], STORE_EMBED=embed is not None,
        EMBED_BF16_BY_BITS=plan["EMBED_BF16_BY_BITS"], num_warps=4)
    _relpos_broadcast_write_kernel[plan["write_launch"]](
        scratch, result, result.stride(0), result.stride(1), result.stride(2), batch, grid, d_out,
        G_PAD=plan["G_PAD"], BLOCK_D=plan["BLOCK_D"], BF16_BY_BITS=plan["OUT_BF16_BY_BITS"],
        num_warps=4)
    return embed


def _grad_reduce_triton(grad_out, grid, axes_dtype=torch.float32):
    """([gY ; gX] (2, B*G, D) in axes_dtype, gS (B, D) fp32): grad_out summed over columns / rows /
    both (fp32 sums, rounded once to axes_dtype)."""
    batch, _, d_out = grad_out.shape
    axes = torch.empty((2, batch * grid, d_out), dtype=axes_dtype, device=grad_out.device)
    scale = torch.empty((batch, d_out), dtype=torch.float32, device=grad_out.device)
    if batch > 0:
        plan = _reduce_plan(batch, grid, d_out, axes_dtype, grad_out.device.type)
        _relpos_grad_reduce_kernel[plan["launch"]](
            grad_out, axes, scale, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            batch, grid, d_out, G_PAD=plan["G_PAD"], BLOCK_D=plan["BLOCK_D"],
            AXES_BF16_BY_BITS=plan["AXES_BF16_BY_BITS"], num_warps=4)
    return axes, scale
