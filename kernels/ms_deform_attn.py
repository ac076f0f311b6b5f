"""Multi-scale deformable attention (DENSE.md K7: Deformable DETR's MSDeformAttn, used by DETReg
and UP-DETR's deformable variant), forward and backward, with Deformable DETR's own argument layout.

ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *,
               backend="auto") -> (N, Lq, heads * d) in value's dtype

Shapes and dtypes (N images, S = sum_l H_l W_l flattened value positions over L levels, heads
attention heads of d channels each, Lq queries, P sampling points per head and level)
    value               (N, S, heads, d) floating (fp32/bf16/fp16/float64), any strides (a view
                        such as value_proj(x).view(N, S, heads, d) or a transpose is read as it is).
    spatial_shapes      (L, 2) integer tensor of (H_l, W_l), on value's device (never read on the
                        host by the Triton path); or a list/tuple of L (H, W) pairs of Python ints.
    level_start_index   (L,) integer tensor, the start of level l on the S axis (the exclusive
                        cumulative sum of H_l W_l); or a list/tuple of L Python ints.
    sampling_locations  (N, Lq, heads, L, P, 2) floating, (x, y) normalised to [0, 1] per level
                        (anything outside samples zero padding), any strides.
    attention_weights   (N, Lq, heads, L, P) floating, any strides (Deformable DETR: a softmax
                        over L * P; not required here).
    Returns (N, Lq, heads * d), contiguous, in value's dtype. Compute precision: float64 when any
    of the three floating inputs is float64, else fp32 (16-bit inputs are upcast, accumulated in
    fp32 and the result rounded once). Lq = 0 or N = 0 gives an empty output.
    The dtypes of the three floating inputs may differ; each gradient has its input's dtype.

Maths (Deformable DETR's ms_deform_attn_core_pytorch, i.e. F.grid_sample with align_corners=False
and zero padding; the official CUDA op computes the same values)
    for query q, head h, level l (H, W = spatial_shapes[l], start = level_start_index[l]), point p:
        (lx, ly) = sampling_locations[n, q, h, l, p];  x = lx * W - 0.5,  y = ly * H - 0.5
        x0 = floor(x), y0 = floor(y), fx = x - x0, fy = y - y0
        sample = (1-fx)(1-fy) V(y0, x0) + fx(1-fy) V(y0, x0+1) + (1-fx)fy V(y0+1, x0) + fx fy V(y0+1, x0+1)
        with V(i, j) = value[n, start + i*W + j, h, :] when 0 <= i < H and 0 <= j < W, else 0
        out[n, q, h*d:(h+1)*d] = sum_{l, p} attention_weights[n, q, h, l, p] * sample
    So a location on a pixel centre ((j + 0.5)/W, (i + 0.5)/H) reads exactly pixel (i, j); 0 and 1
    are the outer edges of the border pixels (half weight on them, half on the zero padding); a
    sample with x <= -1 or x >= W (likewise y) is zero.
Gradients (all three, as the official CUDA op), with a = attention_weights[n, q, h, l, p] and
g = grad_out[n, q, h*d:(h+1)*d]:
    d value[corner] += a * w_corner * g             (w_corner the bilinear weight above)
    d attention_weights = <g, sample>
    d lx = a * W * <g, (1-fy)(V(y0,x0+1) - V(y0,x0)) + fy (V(y0+1,x0+1) - V(y0+1,x0))>
    d ly = a * H * <g, (1-fx)(V(y0+1,x0) - V(y0,x0)) + fx (V(y0+1,x0+1) - V(y0,x0+1))>
    The location gradient is grid_sample's: at an integer x (a pixel centre, or x = -1) it is the
    one-sided derivative from the right, with the out-of-range corners as zeros (the official CUDA
    op returns 0 at x = -1 exactly; everywhere else the two agree). grad_value is contiguous
    (N, S, heads, d) in value's dtype.

Registered ops (namespace densesim, torch.library.custom_op; fake implementations for
torch.compile / FakeTensor; CPU and CUDA implementations are one function running the reference
maths, or the Triton launchers when use_triton is set):
    densesim::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, host_shapes, use_triton) -> (N, Lq, heads * d)
    densesim::ms_deform_attn_backward(grad, value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights, host_shapes,
                                      use_triton)
        -> (grad_value, grad_sampling_locations, grad_attention_weights)
    host_shapes: the level sizes flattened [H0, W0, H1, W1, ...] when the caller passed them as a
    Python list (the reference maths then read no tensor), else [] (they read spatial_shapes).
    Autograd through torch.library.register_autograd (the five tensor inputs are saved).
ms_deform_attn(backend="auto") calls the op with use_triton=True on CUDA tensors of fp32/bf16/fp16
where triton imports, use_triton=False (the reference maths) otherwise; backend="triton" sets
use_triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1, and raises a one-line
RuntimeError anywhere else (also for a float64 input); backend="reference" runs
ms_deform_attn_reference (plain torch autograd: what the `compiled` benchmark compiles). The op
ignores autocast (fp32 compute, output in value's dtype). Inside a user's torch.compile the ops are
opaque nodes (fullgraph=True works with tensor level arguments; backend="reference" with a
spatial_shapes tensor breaks the graph at its .tolist()).

Host syncs
    The Triton path reads no tensor value on the host: every kernel loads H_l, W_l and start_l from
    the spatial_shapes / level_start_index tensors itself (tests/host_sync.py: zero, forward and
    backward). The reference maths (ms_deform_attn_reference, and the ops with use_triton=False)
    split value per level with Python sizes, as Deformable DETR's grid_sample path does: with a
    spatial_shapes TENSOR they read it with one .tolist() per call (forward and backward each: a
    host sync on CUDA). Pass spatial_shapes as a list of (H, W) pairs (Deformable DETR knows the
    shapes on the host: it builds the tensor from that list) and no path reads a tensor value: the
    list also travels to the op as host_shapes.
Validation: shapes, dtypes, devices and the Python arguments on the host (one-line ValueErrors,
    before anything runs; never a tensor value). The level arguments' values (H, W >= 1,
    sum_l H_l W_l == S, level_start_index == the exclusive cumulative sum) are checked on the
    device for tensors (torch._assert_async on CUDA and inside torch.compile: the step goes on and
    the next synchronisation fails with "ms_deform_attn: spatial_shapes ..."; on CPU tensors the
    same ValueError at once), and on the host for Python lists. Either way the kernels mask every
    access by the level's bounds AND by [0, S), so no input makes an out-of-bounds access
    (non-finite locations give unspecified values, never a stray access).

Triton version (backend="triton", or "auto" on CUDA; fp32/bf16/fp16)
    _msda_forward_kernel  grid (cdiv(Lq, BLOCK_Q) * heads, N): one program per (image, query
        block, head), heads fastest (neighbouring programs read neighbouring heads of the same
        positions). It holds a [BLOCK_Q, BLOCK_D] fp32 accumulator (BLOCK_D = next power of two of
        d, masked), loops over the levels (H, W, start loaded from the level tensors) and the P
        points (unrolled), loads the BLOCK_Q locations and weights of the point, and gathers the
        four corner d-vectors by value's strides (upcast to fp32 right after tl.load), weighted by
        the bilinear weight times the attention weight. The output is stored once in value's dtype.
    _msda_backward_kernel the same grid and loops: loads grad_out's [BLOCK_Q, BLOCK_D] tile (by its
        strides: the stride-0 expand of a sum works), gathers the four corners again, stores
        grad_attention_weights and grad_sampling_locations per sample directly (each sample belongs
        to exactly one program: no atomics, in their input's dtype), and tl.atomic_add's
        a * w_corner * g into an fp32 (N, S, heads, d) buffer (zeroed; converted to value's dtype
        by one torch op unless fp32). Atomics: the summation order of grad_value is not
        deterministic on a GPU.
    Pixel coordinates are clamped to [-2, W + 1] before the floor (exactly the same samples: all
    corners are outside beyond it), so a huge location cannot overflow the int32 conversion.
    Offsets are int32 unless one of the tensors spans 2^30 elements or more (then int64); image
    bases are int64. Under TRITON_INTERPRET=1 the query block is _CONFIG["interpret"] (a test
    shrinks it to cross query blocks); bf16 stores round to nearest with integer ops (the
    interpreter's own conversion truncates).
    Launch parameters: _CONFIG (H100/H200 guesses, NOT timed on a GPU yet).

Roofline (e = bytes per element; samples = N * Lq * heads * L * P)
    Forward: HBM at the least: value once (N S heads d e), the locations (2 e) and weights (e) per
    sample, the output (N Lq heads d e). The gathers: 4 corners x d x e per sample, mostly L2 hits
    (neighbouring queries sample neighbouring pixels). FLOPs ~ 10 d per sample (four multiply-adds
    for the bilinear blend, one for the attention weight). Deformable DETR's encoder at N = 2,
    levels (100,150),(50,75),(25,38),(13,19) (S = Lq = 19,947), heads 8, d 32, L 4, P 4, bf16:
    5.1 M samples, 71 MB of HBM traffic (15 us at 4.8 TB/s), 1.3 GB of corner gathers, 1.6 GFLOP;
    the gathers (L2 bandwidth and latency) set the practical ceiling. The decoder (Lq = 300) is
    ~66x smaller in samples: launch- and host-bound.
    Backward: reads grad_out, the four corners again and the locations and weights, writes the
    location and weight gradients (3 e per sample), and 4 x d fp32 atomics per sample into the
    (N, S, heads, d) buffer (zeroing + dtype conversion: 2-3 passes over it); FLOPs ~ 3x forward.
    The reference moves far more: per level a permuted copy of value, grid_sample's
    (N heads, d, Lq, P) samples (samples x d floats over the levels: 650 MB fp32 at the encoder
    size), then torch.stack copies them, the weighted product writes them once more and the sum
    reads them: ~2.6 GB of HBM traffic forward, about twice that with autograd's backward.
    GPU goal (bench/test_ms_deform_attn.py): triton >= 3x the eager reference forward + backward.
"""
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
_OP = "ms_deform_attn"
# The devices the registered ops serve (CPU and CUDA implementations; meta through the fake ones)
_OP_DEVICES = ("cpu", "cuda", "meta")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device, dtypes):
    """Called after validation. 'auto': Triton on CUDA tensors of fp32/bf16/fp16 where triton
    imports, else the reference. 'triton' runs the kernels on CUDA tensors, or on CPU tensors
    under the interpreter (TRITON_INTERPRET=1); anywhere else it raises instead of silently
    running something else."""
    if backend == "reference":
        return "reference"
    supported = all(dtype in _TRITON_DTYPES for dtype in dtypes)
    if backend == "auto":
        fits = _TRITON_IMPORTABLE and device.type == "cuda" and supported
        return "triton" if fits else "reference"
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which cannot be "
                           f"imported here; use backend='auto' or backend='reference'")
    if not supported:
        raise RuntimeError(f"{op_name}: the Triton kernels take fp32/bf16/fp16 inputs, got "
                           f"{', '.join(str(d) for d in dtypes)}; use backend='auto' or 'reference'")
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return "triton"
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type} tensors); "
                       f"CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")


def _fp32_region(device):
    """Autocast off: the op computes in fp32 (float64 for float64 input) whatever AMP does."""
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _compute_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


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


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_index_tensor(t):
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _validate(op_name, value, spatial_shapes, level_start_index, sampling_locations,
              attention_weights):
    """Shapes, dtypes, devices (never a tensor value). Returns (spatial_shapes, level_start_index)
    as given, with Python sequences checked in full (they are host values) and turned into tuples."""
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op_name}: {name} must be a floating tensor (fp32/bf16/fp16/float64), "
                             f"got {t.dtype}")
    if value.dim() != 4:
        raise ValueError(f"{op_name}: value must have shape (N, S, heads, d), got {_describe(value)}")
    batch, positions, heads, head_dim = value.shape
    loc = sampling_locations
    if loc.dim() != 6 or loc.shape[-1] != 2:
        raise ValueError(f"{op_name}: sampling_locations must have shape (N, Lq, heads, L, P, 2), "
                         f"got {_describe(loc)}")
    if loc.shape[0] != batch or loc.shape[2] != heads:
        raise ValueError(f"{op_name}: sampling_locations (N, Lq, heads, L, P, 2) must match value's "
                         f"N = {batch} and heads = {heads}, got {_describe(loc)}")
    levels, points = loc.shape[3], loc.shape[4]
    if tuple(attention_weights.shape) != tuple(loc.shape[:5]):
        raise ValueError(f"{op_name}: attention_weights must have shape (N, Lq, heads, L, P) = "
                         f"{tuple(loc.shape[:5])}, got {_describe(attention_weights)}")
    if levels == 0 or points == 0 or heads == 0 or head_dim == 0:
        raise ValueError(f"{op_name}: need L >= 1 levels, P >= 1 points, heads >= 1 and d >= 1, got "
                         f"L = {levels}, P = {points}, heads = {heads}, d = {head_dim}")
    for name, t in (("sampling_locations", loc), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{op_name}: {name} must be on value's device ({value.device}), "
                             f"got {t.device}")
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.shape != (levels, 2) or not _is_index_tensor(spatial_shapes):
            raise ValueError(f"{op_name}: spatial_shapes must be an integer tensor (L, 2) of (H, W) "
                             f"with L = {levels}, got {_describe(spatial_shapes)}")
        if spatial_shapes.device != value.device:
            raise ValueError(f"{op_name}: spatial_shapes must be on value's device ({value.device}), "
                             f"got {spatial_shapes.device}")
    elif isinstance(spatial_shapes, (list, tuple)):
        pairs = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in spatial_shapes)
        if len(pairs) != levels or not all(isinstance(p, tuple) and len(p) == 2
                                           and _is_int(p[0]) and _is_int(p[1]) for p in pairs):
            raise ValueError(f"{op_name}: spatial_shapes must be an integer tensor (L, 2) or a list of "
                             f"L = {levels} (H, W) pairs of ints, got {spatial_shapes!r}")
        if any(h < 1 or w < 1 for h, w in pairs) or sum(h * w for h, w in pairs) != positions:
            raise ValueError(f"{op_name}: spatial_shapes must hold H, W >= 1 with sum of H*W == S = "
                             f"{positions}, got {list(pairs)}")
        spatial_shapes = pairs
    else:
        raise ValueError(f"{op_name}: spatial_shapes must be an integer tensor (L, 2) or a list of "
                         f"(H, W) pairs, got {type(spatial_shapes).__name__}")
    if isinstance(level_start_index, torch.Tensor):
        if level_start_index.shape != (levels,) or not _is_index_tensor(level_start_index):
            raise ValueError(f"{op_name}: level_start_index must be an integer tensor (L,) with "
                             f"L = {levels}, got {_describe(level_start_index)}")
        if level_start_index.device != value.device:
            raise ValueError(f"{op_name}: level_start_index must be on value's device "
                             f"({value.device}), got {level_start_index.device}")
    elif isinstance(level_start_index, (list, tuple)):
        starts = tuple(level_start_index)
        if len(starts) != levels or not all(_is_int(s) for s in starts):
            raise ValueError(f"{op_name}: level_start_index must be an integer tensor (L,) or a list "
                             f"of L = {levels} ints, got {level_start_index!r}")
        if isinstance(spatial_shapes, tuple):
            expected = [sum(h * w for h, w in spatial_shapes[:i]) for i in range(levels)]
            if list(starts) != expected:
                raise ValueError(f"{op_name}: level_start_index must be the exclusive cumulative "
                                 f"sum of H*W, {expected}, got {list(starts)}")
        level_start_index = starts
    else:
        raise ValueError(f"{op_name}: level_start_index must be an integer tensor (L,) or a list of "
                         f"ints, got {type(level_start_index).__name__}")
    return spatial_shapes, level_start_index


def _level_tensors(spatial_shapes, level_start_index, device):
    """Both level arguments as device tensors (a Python list becomes an int64 tensor: a small
    non_blocking host-to-device copy of a fresh CPU tensor, not a sync -- torch.tensor(list,
    device="cuda") would copy synchronously and wait for the stream)."""
    if not isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = torch.tensor(spatial_shapes, dtype=torch.int64).to(device,
                                                                            non_blocking=True)
    if not isinstance(level_start_index, torch.Tensor):
        level_start_index = torch.tensor(level_start_index, dtype=torch.int64).to(
            device, non_blocking=True)
    return spatial_shapes, level_start_index


def _check_levels(op_name, positions, spatial_shapes, level_start_index):
    """On the device (one boolean, no host read): H, W >= 1, sum H*W == S, and level_start_index
    the exclusive cumulative sum. Nothing to do when both are host lists (checked in _validate)."""
    if not isinstance(spatial_shapes, torch.Tensor) and not isinstance(level_start_index,
                                                                      torch.Tensor):
        return
    shapes, starts = _level_tensors(spatial_shapes, level_start_index,
                                    (spatial_shapes if isinstance(spatial_shapes, torch.Tensor)
                                     else level_start_index).device)
    if shapes.device.type == "meta":
        return
    shapes = shapes.detach().long()
    sizes = shapes[:, 0] * shapes[:, 1]
    ends = sizes.cumsum(0)
    ok = (shapes.amin() > 0) & (ends[-1] == positions) & (starts.detach() == ends - sizes).all()
    _check_on_device(ok, f"{op_name}: spatial_shapes must hold H, W >= 1 with sum of H*W == S = "
                         f"{positions}, and level_start_index their exclusive cumulative sum")


def _host_sizes(spatial_shapes, host_shapes=()):
    """[(H, W), ...] as Python ints: host_shapes (flat [H0, W0, H1, W1, ...]) or a list pass
    through; a tensor is read with .tolist() (a host sync on CUDA: the reference maths need Python
    split sizes)."""
    if host_shapes:
        return [(host_shapes[i], host_shapes[i + 1]) for i in range(0, len(host_shapes), 2)]
    if isinstance(spatial_shapes, torch.Tensor):
        return [tuple(pair) for pair in spatial_shapes.tolist()]
    return [tuple(pair) for pair in spatial_shapes]


# ----------------------------------------------------------------------------------------------
# Reference (the definition; the CPU path)
# ----------------------------------------------------------------------------------------------

def _per_level(value, sizes, dtype):
    """value (N, S, heads, d) -> per level (N*heads, d, H, W) in `dtype` (official layout)."""
    batch, _, heads, head_dim = value.shape
    parts = value.to(dtype).split([h * w for h, w in sizes], dim=1)
    return [part.flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
            for part, (h, w) in zip(parts, sizes)]


def _reference_forward(value, sizes, sampling_locations, attention_weights):
    """Deformable DETR's ms_deform_attn_core_pytorch in the compute dtype (plain autograd)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = _compute_dtype(value.dtype, sampling_locations.dtype, attention_weights.dtype)
    grids = 2 * sampling_locations.to(dtype) - 1
    samples = []
    for level, value_l in enumerate(_per_level(value, sizes, dtype)):
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)         # (N*heads, Lq, P, 2)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))                    # (N*heads, d, Lq, P)
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, 1, queries,
                                                                   levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)      # (N*heads, d, Lq)
    out = out.view(batch, heads * head_dim, queries).transpose(1, 2).contiguous()
    return out.to(value.dtype)


def _reference_backward(grad, value, sizes, sampling_locations, attention_weights):
    """The three gradients of _reference_forward written out (grid_sample's own backward per
    level), for the ops' reference implementation (which runs below autograd)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = _compute_dtype(value.dtype, sampling_locations.dtype, attention_weights.dtype)
    g = grad.to(dtype).reshape(batch, queries, heads, head_dim).permute(0, 2, 3, 1)
    g = g.reshape(batch * heads, head_dim, queries, 1)                        # (N*heads, d, Lq, 1)
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, queries, levels,
                                                                  points)
    grids = 2 * sampling_locations.to(dtype) - 1
    grad_values, grad_grids, grad_weights = [], [], []
    for level, value_l in enumerate(_per_level(value, sizes, dtype)):
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                align_corners=False)                          # (N*heads, d, Lq, P)
        grad_weights.append((g * sampled).sum(1))                            # (N*heads, Lq, P)
        grad_sampled = g * weights[:, :, level].unsqueeze(1)
        grad_value_l, grad_grid_l = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled, value_l, grid_l, 0, 0, False, [True, True])
        h, w = sizes[level]
        grad_values.append(grad_value_l.reshape(batch, heads, head_dim, h * w).permute(0, 3, 1, 2))
        grad_grids.append(grad_grid_l)                                        # (N*heads, Lq, P, 2)
    grad_value = torch.cat(grad_values, dim=1) if grad_values else value.new_zeros(value.shape)
    grad_loc = 2 * torch.stack(grad_grids, dim=2)                            # (N*heads, Lq, L, P, 2)
    grad_loc = grad_loc.view(batch, heads, queries, levels, points, 2).transpose(1, 2)
    grad_weight = torch.stack(grad_weights, dim=2).view(batch, heads, queries, levels, points)
    grad_weight = grad_weight.transpose(1, 2)
    return (grad_value.to(value.dtype).contiguous(),
            grad_loc.to(sampling_locations.dtype).contiguous(),
            grad_weight.to(attention_weights.dtype).contiguous())


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights):
    """Plain-PyTorch ms_deform_attn: Deformable DETR's grid_sample formulation
    (ms_deform_attn_core_pytorch, align_corners=False, zero padding), differentiable by autograd in
    value, sampling_locations and attention_weights; the same validation and level checks as
    ms_deform_attn; autocast off (fp32 compute, float64 if an input is float64), output in value's
    dtype. Reads a spatial_shapes TENSOR on the host (.tolist(): a sync on CUDA; pass a list of
    (H, W) pairs to avoid it). level_start_index is only checked (the split follows the shapes)."""
    op_name = "ms_deform_attn_reference"
    spatial_shapes, level_start_index = _validate(op_name, value, spatial_shapes,
                                                  level_start_index, sampling_locations,
                                                  attention_weights)
    _check_levels(op_name, value.shape[1], spatial_shapes, level_start_index)
    with _fp32_region(value.device):
        return _reference_forward(value, _host_sizes(spatial_shapes), sampling_locations,
                                  attention_weights)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

# Launch parameters: H100/H200 guesses, NOT timed on a GPU yet. A program holds BLOCK_Q queries of
# one head of one image and the whole head dimension (BLOCK_D = next power of two of d): for
# d = 32, a 64 x 32 forward tile (4 corner tiles + the accumulator in flight per point) and a
# 32 x 32 backward tile (grad_out, 4 corners, the two location terms). Larger d shrinks BLOCK_Q to
# keep BLOCK_Q * BLOCK_D. "interpret": under TRITON_INTERPRET=1 (the interpreter's cost is per
# program and op, not per lane).
_CONFIG = {
    "cuda": {"forward_block_q": 64, "backward_block_q": 32, "tile": 2048, "num_warps": 4},
    "interpret": {"forward_block_q": 16, "backward_block_q": 16, "tile": 4096, "num_warps": 1},
}
_I64_LIMIT = 2 ** 30  # a tensor spanning this many elements (or more) gets int64 offsets


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


def _span(t):
    """The largest element offset a tensor's own indexing reaches, plus one."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _launch_plan(phase, queries, head_dim, tensors, device):
    cfg = _CONFIG["cuda" if device.type == "cuda" else "interpret"]
    block_d = max(2, triton.next_power_of_2(head_dim))
    block_q = cfg[f"{phase}_block_q"]
    block_q = max(2, min(block_q, max(1, cfg["tile"] // block_d),
                         triton.next_power_of_2(max(queries, 1))))
    block_q = triton.next_power_of_2(block_q)
    offsets_i64 = any(_span(t) >= _I64_LIMIT for t in tensors)
    return {"block_q": block_q, "block_d": block_d, "query_blocks": triton.cdiv(queries, block_q),
            "offsets_i64": offsets_i64, "interpret": device.type != "cuda",
            "num_warps": cfg["num_warps"]}


if _TRITON_IMPORTABLE:

    @triton.jit
    def _msda_index(index, OFFSETS_I64: tl.constexpr):
        """Indices for address arithmetic: int64 only when an offset can pass 2^31."""
        if OFFSETS_I64:
            y = index.to(tl.int64)
        else:
            y = index
        return y

    @triton.jit
    def _msda_store_value(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 x in the output dtype, rounded to nearest (the interpreter's fp32 -> bf16
        conversion truncates: round with integer ops first; finite values only)."""
        if INTERPRET and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _msda_corners(loc_x, loc_y, height, width, start, n_values, OFFSETS_I64: tl.constexpr):
        """For BLOCK_Q samples of one level: the four corner rows on the S axis (row00 = (y0, x0),
        row01 = (y0, x0+1), row10 = (y0+1, x0), row11 = (y0+1, x0+1)), their validity and the
        fractions fx, fy (grid_sample, align_corners=False)."""
        width_f = width.to(tl.float32)
        height_f = height.to(tl.float32)
        x = loc_x * width_f - 0.5
        y = loc_y * height_f - 0.5
        # beyond [-2, W + 1] every corner is outside: clamping changes no sample, and keeps the
        # int32 conversion in range for any finite location
        x = tl.minimum(tl.maximum(x, -2.0), width_f + 1.0)
        y = tl.minimum(tl.maximum(y, -2.0), height_f + 1.0)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        fx = x - x0f
        fy = y - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        x1 = x0 + 1
        y1 = y0 + 1
        ok_x0 = (x0 >= 0) & (x0 < width)
        ok_x1 = (x1 >= 0) & (x1 < width)
        ok_y0 = (y0 >= 0) & (y0 < height)
        ok_y1 = (y1 >= 0) & (y1 < height)
        row00 = start + y0 * width + x0
        row01 = row00 + 1
        row10 = row00 + width
        row11 = row10 + 1
        # [0, S) as well: inconsistent level tensors (caught by the device check) read nothing
        ok00 = ok_y0 & ok_x0 & (row00 >= 0) & (row00 < n_values)
        ok01 = ok_y0 & ok_x1 & (row01 >= 0) & (row01 < n_values)
        ok10 = ok_y1 & ok_x0 & (row10 >= 0) & (row10 < n_values)
        ok11 = ok_y1 & ok_x1 & (row11 >= 0) & (row11 < n_values)
        return (_msda_index(row00, OFFSETS_I64), _msda_index(row01, OFFSETS_I64),
                _msda_index(row10, OFFSETS_I64), _msda_index(row11, OFFSETS_I64),
                ok00, ok01, ok10, ok11, fx, fy)

    @triton.jit
    def _msda_forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                             n_queries, n_heads, head_dim, n_values, n_levels,
                             stride_vn, stride_vs, stride_vh, stride_vd,
                             stride_shape_l, stride_shape_c, stride_start,
                             stride_ln, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
                             stride_an, stride_aq, stride_ah, stride_al, stride_ap,
                             N_POINTS: tl.constexpr, OFFSETS_I64: tl.constexpr,
                             INTERPRET: tl.constexpr, BLOCK_Q: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        """One image x BLOCK_Q queries x one head: sum over levels and points of the attention
        weight times the bilinear sample, stored once."""
        pid = tl.program_id(0)
        head = pid % n_heads
        image = tl.program_id(1).to(tl.int64)
        queries = (pid // n_heads) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = tl.arange(0, BLOCK_D)
        q_mask = queries < n_queries
        d_mask = dims < head_dim
        q_idx = _msda_index(queries, OFFSETS_I64)
        v_base = value_ptr + image * stride_vn + head.to(tl.int64) * stride_vh
        d_off = (_msda_index(dims, OFFSETS_I64) * stride_vd)[None, :]
        loc_base = loc_ptr + image * stride_ln + head.to(tl.int64) * stride_lh + q_idx * stride_lq
        attn_base = attn_ptr + image * stride_an + head.to(tl.int64) * stride_ah + q_idx * stride_aq
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for level in range(n_levels):
            height = tl.load(shapes_ptr + level * stride_shape_l).to(tl.int32)
            width = tl.load(shapes_ptr + level * stride_shape_l + stride_shape_c).to(tl.int32)
            start = tl.load(starts_ptr + level * stride_start).to(tl.int32)
            for point in tl.static_range(N_POINTS):
                loc = loc_base + level * stride_ll + point * stride_lp
                loc_x = tl.load(loc, mask=q_mask, other=0.0).to(tl.float32)
                loc_y = tl.load(loc + stride_lc, mask=q_mask, other=0.0).to(tl.float32)
                attn = tl.load(attn_base + level * stride_al + point * stride_ap, mask=q_mask,
                               other=0.0).to(tl.float32)
                row00, row01, row10, row11, ok00, ok01, ok10, ok11, fx, fy = _msda_corners(
                    loc_x, loc_y, height, width, start, n_values, OFFSETS_I64)
                m = q_mask[:, None] & d_mask[None, :]
                v = tl.load(v_base + (row00 * stride_vs)[:, None] + d_off, mask=m & ok00[:, None],
                            other=0.0).to(tl.float32)
                acc += (attn * (1.0 - fx) * (1.0 - fy))[:, None] * v
                v = tl.load(v_base + (row01 * stride_vs)[:, None] + d_off, mask=m & ok01[:, None],
                            other=0.0).to(tl.float32)
                acc += (attn * fx * (1.0 - fy))[:, None] * v
                v = tl.load(v_base + (row10 * stride_vs)[:, None] + d_off, mask=m & ok10[:, None],
                            other=0.0).to(tl.float32)
                acc += (attn * (1.0 - fx) * fy)[:, None] * v
                v = tl.load(v_base + (row11 * stride_vs)[:, None] + d_off, mask=m & ok11[:, None],
                            other=0.0).to(tl.float32)
                acc += (attn * fx * fy)[:, None] * v
        # out (N, Lq, heads * d), contiguous
        channels = n_heads * head_dim
        out = out_ptr + image * n_queries * channels + head.to(tl.int64) * head_dim
        offsets = (q_idx * channels)[:, None] + dims[None, :]
        tl.store(out + offsets, _msda_store_value(acc, out_ptr.dtype.element_ty, INTERPRET),
                 mask=q_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _msda_backward_kernel(grad_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
                              grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                              n_queries, n_heads, head_dim, n_values, n_levels,
                              stride_gn, stride_gq, stride_gc,
                              stride_vn, stride_vs, stride_vh, stride_vd,
                              stride_shape_l, stride_shape_c, stride_start,
                              stride_ln, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
                              stride_an, stride_aq, stride_ah, stride_al, stride_ap,
                              N_POINTS: tl.constexpr, OFFSETS_I64: tl.constexpr,
                              INTERPRET: tl.constexpr, BLOCK_Q: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        """The three gradients of one image x BLOCK_Q queries x one head. grad_value: fp32
        atomics into the contiguous (N, S, heads, d) buffer; the location (N, Lq, heads, L, P, 2)
        and weight (N, Lq, heads, L, P) gradients (contiguous) stored per sample."""
        pid = tl.program_id(0)
        head = pid % n_heads
        image = tl.program_id(1).to(tl.int64)
        queries = (pid // n_heads) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = tl.arange(0, BLOCK_D)
        q_mask = queries < n_queries
        d_mask = dims < head_dim
        m = q_mask[:, None] & d_mask[None, :]
        q_idx = _msda_index(queries, OFFSETS_I64)
        d_idx = _msda_index(dims, OFFSETS_I64)
        head64 = head.to(tl.int64)
        grad = tl.load(grad_ptr + image * stride_gn + (q_idx * stride_gq)[:, None]
                       + ((head64 * head_dim + d_idx) * stride_gc)[None, :], mask=m,
                       other=0.0).to(tl.float32)
        v_base = value_ptr + image * stride_vn + head64 * stride_vh
        d_off = (d_idx * stride_vd)[None, :]
        # grad_value buffer: contiguous (N, S, heads, d)
        gv_base = grad_value_ptr + image * n_values * n_heads * head_dim + head64 * head_dim
        gv_row = n_heads * head_dim
        loc_base = loc_ptr + image * stride_ln + head64 * stride_lh + q_idx * stride_lq
        attn_base = attn_ptr + image * stride_an + head64 * stride_ah + q_idx * stride_aq
        # gradient outputs: contiguous (N, Lq, heads, L, P[, 2])
        lp = n_levels * N_POINTS
        sample0 = (image * n_queries + q_idx) * n_heads * lp + head64 * lp  # (n, q, head, 0, 0)
        for level in range(n_levels):
            height = tl.load(shapes_ptr + level * stride_shape_l).to(tl.int32)
            width = tl.load(shapes_ptr + level * stride_shape_l + stride_shape_c).to(tl.int32)
            start = tl.load(starts_ptr + level * stride_start).to(tl.int32)
            for point in tl.static_range(N_POINTS):
                loc = loc_base + level * stride_ll + point * stride_lp
                loc_x = tl.load(loc, mask=q_mask, other=0.0).to(tl.float32)
                loc_y = tl.load(loc + stride_lc, mask=q_mask, other=0.0).to(tl.float32)
                attn = tl.load(attn_base + level * stride_al + point * stride_ap, mask=q_mask,
                               other=0.0).to(tl.float32)
                row00, row01, row10, row11, ok00, ok01, ok10, ok11, fx, fy = _msda_corners(
                    loc_x, loc_y, height, width, start, n_values, OFFSETS_I64)
                v00 = tl.load(v_base + (row00 * stride_vs)[:, None] + d_off,
                              mask=m & ok00[:, None], other=0.0).to(tl.float32)
                v01 = tl.load(v_base + (row01 * stride_vs)[:, None] + d_off,
                              mask=m & ok01[:, None], other=0.0).to(tl.float32)
                v10 = tl.load(v_base + (row10 * stride_vs)[:, None] + d_off,
                              mask=m & ok10[:, None], other=0.0).to(tl.float32)
                v11 = tl.load(v_base + (row11 * stride_vs)[:, None] + d_off,
                              mask=m & ok11[:, None], other=0.0).to(tl.float32)
                gx = 1.0 - fx
                gy = 1.0 - fy
                w00 = gx * gy
                w01 = fx * gy
                w10 = gx * fy
                w11 = fx * fy
                sample = (w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10
                          + w11[:, None] * v11)
                d_x = gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
                d_y = gx[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
                grad_attn = tl.sum(grad * sample, axis=1)
                grad_x = attn * width.to(tl.float32) * tl.sum(grad * d_x, axis=1)
                grad_y = attn * height.to(tl.float32) * tl.sum(grad * d_y, axis=1)
                sample_idx = sample0 + level * N_POINTS + point
                tl.store(grad_attn_ptr + sample_idx,
                         _msda_store_value(grad_attn, grad_attn_ptr.dtype.element_ty, INTERPRET),
                         mask=q_mask)
                tl.store(grad_loc_ptr + 2 * sample_idx,
                         _msda_store_value(grad_x, grad_loc_ptr.dtype.element_ty, INTERPRET),
                         mask=q_mask)
                tl.store(grad_loc_ptr + 2 * sample_idx + 1,
                         _msda_store_value(grad_y, grad_loc_ptr.dtype.element_ty, INTERPRET),
                         mask=q_mask)
                weighted = grad * attn[:, None]
                tl.atomic_add(gv_base + (row00 * gv_row)[:, None] + d_idx[None, :],
                              weighted * w00[:, None], mask=m & ok00[:, None])
                tl.atomic_add(gv_base + (row01 * gv_row)[:, None] + d_idx[None, :],
                              weighted * w01[:, None], mask=m & ok01[:, None])
                tl.atomic_add(gv_base + (row10 * gv_row)[:, None] + d_idx[None, :],
                              weighted * w10[:, None], mask=m & ok10[:, None])
                tl.atomic_add(gv_base + (row11 * gv_row)[:, None] + d_idx[None, :],
                              weighted * w11[:, None], mask=m & ok11[:, None])


def _level_args(spatial_shapes, level_start_index):
    return (spatial_shapes.stride(0), spatial_shapes.stride(1), level_start_index.stride(0))


def _triton_forward(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights):
    batch, positions, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out = torch.empty((batch, queries, heads * head_dim), dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    plan = _launch_plan("forward", queries, head_dim,
                        (value, sampling_locations, attention_weights, out), value.device)
    _msda_forward_kernel[(plan["query_blocks"] * heads, batch)](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
        queries, heads, head_dim, positions, levels, *value.stride(),
        *_level_args(spatial_shapes, level_start_index), *sampling_locations.stride(),
        *attention_weights.stride(), N_POINTS=points, OFFSETS_I64=plan["offsets_i64"],
        INTERPRET=plan["interpret"], BLOCK_Q=plan["block_q"], BLOCK_D=plan["block_d"],
        num_warps=plan["num_warps"])
    return out


def _triton_backward(grad, value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights):
    batch, positions, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    grad_value = torch.zeros((batch, positions, heads, head_dim), dtype=torch.float32,
                             device=value.device)
    grad_loc = torch.empty(sampling_locations.shape, dtype=sampling_locations.dtype,
                           device=value.device)
    grad_attn = torch.empty(attention_weights.shape, dtype=attention_weights.dtype,
                            device=value.device)
    if grad_attn.numel() > 0:
        plan = _launch_plan("backward", queries, head_dim,
                            (grad, value, sampling_locations, attention_weights, grad_value,
                             grad_loc), value.device)
        _msda_backward_kernel[(plan["query_blocks"] * heads, batch)](
            grad, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_value, grad_loc, grad_attn, queries, heads, head_dim, positions, levels,
            *grad.stride(), *value.stride(), *_level_args(spatial_shapes, level_start_index),
            *sampling_locations.stride(), *attention_weights.stride(), N_POINTS=points,
            OFFSETS_I64=plan["offsets_i64"], INTERPRET=plan["interpret"],
            BLOCK_Q=plan["block_q"], BLOCK_D=plan["block_d"], num_warps=plan["num_warps"])
    if value.dtype != torch.float32:
        grad_value = grad_value.to(value.dtype)
    return grad_value, grad_loc, grad_attn


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library): fake implementations, autograd, CPU/CUDA implementations
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("densesim::ms_deform_attn", mutates_args=(), device_types=("cpu", "cuda"))
def _ms_deform_attn_op(value: torch.Tensor, spatial_shapes: torch.Tensor,
                       level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor, host_shapes: list[int],
                       use_triton: bool) -> torch.Tensor:
    """(N, Lq, heads * d) in value's dtype. use_triton: the Triton kernels (CUDA, or CPU under
    TRITON_INTERPRET=1), else the reference maths (with the level sizes from host_shapes, or read
    from spatial_shapes on the host when host_shapes is empty)."""
    with _fp32_region(value.device), torch.no_grad():
        if use_triton:
            with _on_device(value.device):
                return _triton_forward(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights)
        return _reference_forward(value, _host_sizes(spatial_shapes, host_shapes),
                                  sampling_locations, attention_weights).contiguous()


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights, host_shapes, use_triton):
    batch, _, heads, head_dim = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * head_dim))


@torch.library.custom_op("densesim::ms_deform_attn_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _ms_deform_attn_backward_op(grad: torch.Tensor, value: torch.Tensor,
                                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                                sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                                host_shapes: list[int], use_triton: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_value (N, S, heads, d), grad_sampling_locations, grad_attention_weights), each
    contiguous in its input's dtype (see the module docstring)."""
    with _fp32_region(value.device), torch.no_grad():
        if use_triton:
            with _on_device(value.device):
                return _triton_backward(grad, value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights)
        return _reference_backward(grad, value, _host_sizes(spatial_shapes, host_shapes),
                                   sampling_locations, attention_weights)


@_ms_deform_attn_backward_op.register_fake
def _ms_deform_attn_backward_fake(grad, value, spatial_shapes, level_start_index,
                                  sampling_locations, attention_weights, host_shapes, use_triton):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, host_shapes,
     use_triton) = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights)
    ctx.host_shapes = host_shapes
    ctx.use_triton = use_triton


def _backward(ctx, grad):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[3] or needs[4]):
        return None, None, None, None, None, None, None
    grad_value, grad_loc, grad_attn = _ms_deform_attn_backward_op(
        grad, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        ctx.host_shapes, ctx.use_triton)
    return (grad_value if needs[0] else None, None, None, grad_loc if needs[3] else None,
            grad_attn if needs[4] else None, None, None)


torch.library.register_autograd("densesim::ms_deform_attn", _backward,
                                setup_context=_setup_context)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   *, backend="auto"):
    """Multi-scale deformable attention (Deformable DETR's MSDeformAttnFunction): (N, Lq, heads*d)
    in value's dtype; gradients to value, sampling_locations and attention_weights.

    backend="auto": densesim::ms_deform_attn with the Triton kernels on CUDA tensors
    (fp32/bf16/fp16, triton importable), with the reference maths otherwise; "triton": the kernels
    or a one-line RuntimeError; "reference": ms_deform_attn_reference (plain autograd).
    Validation (one-line ValueError) reads no tensor value and comes before any launch; the level
    tensors are checked on the device; the Triton path never syncs the host. See the module
    docstring for shapes, maths, edge inputs and backends."""
    _check_backend_name(_OP, backend)
    spatial_shapes, level_start_index = _validate(_OP, value, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights)
    _check_levels(_OP, value.shape[1], spatial_shapes, level_start_index)
    use_triton = _select_backend(_OP, backend, value.device,
                                 (value.dtype, sampling_locations.dtype,
                                  attention_weights.dtype)) == "triton"
    if backend == "reference" or value.device.type not in _OP_DEVICES:
        with _fp32_region(value.device):
            return _reference_forward(value, _host_sizes(spatial_shapes), sampling_locations,
                                      attention_weights)
    # level sizes known on the host travel with the op too: its reference maths then read nothing
    host_shapes = [] if isinstance(spatial_shapes, torch.Tensor) else [
        size for pair in spatial_shapes for size in pair]
    shapes, starts = _level_tensors(spatial_shapes, level_start_index, value.device)
    return _ms_deform_attn_op(value, shapes.detach(), starts.detach(), sampling_locations,
                              attention_weights, host_shapes, use_triton)
