"""RoIAlign (DENSE.md K6: CCOP's RoIAlignV2 7x7 on FPN levels; RegionCL's box mean; DenseSiam's
crop-and-resample), with the signature and semantics of torchvision.ops.roi_align.

roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
          backend="auto") -> (K, C, oh, ow) in input's dtype

Shapes and dtypes
    input          (N, C, H, W) floating (fp32/bf16/fp16/float64), any strides (channels-last is
                   read as it is, no copy); H, W >= 1.
    boxes          a Tensor (K, 5), rows [batch_index, x1, y1, x2, y2], or a list/tuple of (Ki, 4)
                   tensors [x1, y1, x2, y2], one per image (image i's boxes get batch index i; as
                   torchvision's convert_boxes_to_roi_format: concatenated in order, so K = sum Ki;
                   at most N tensors). Floating, on input's device, any strides. Coordinates are in
                   the image frame: spatial_scale maps them onto the feature map (1/stride).
                   The batch index is truncated toward zero (as the C++ `int` cast) and must lie in
                   [0, N); it is checked on the device (see "No host sync").
    output_size    int or (oh, ow), positive.
    spatial_scale  finite Python number; sampling_ratio int (<= 0: adaptive); aligned bool.
    Returns (K, C, oh, ow), contiguous, in input's dtype. K = 0 gives an empty (0, C, oh, ow).
    Compute precision: float64 when input is float64, else fp32 (the geometry too: boxes are
    rounded to that dtype first; bf16/fp16 features are upcast, accumulated in fp32 and the result
    rounded once). torchvision insists on boxes.dtype == input.dtype and computes fp16 in fp16;
    here any floating boxes dtype is accepted, and 16-bit inputs are more accurate.

Maths (torchvision's roi_align_kernel.cpp, CPU and CUDA alike; one RoI k, batch b = int(box[0]))
    offset = 0.5 if aligned else 0;  sx = x1*scale - offset, sy = y1*scale - offset,
    ex = x2*scale - offset, ey = y2*scale - offset;  rw = ex - sx, rh = ey - sy;
    if not aligned: rw = max(rw, 1), rh = max(rh, 1)      (malformed RoIs forced to >= 1x1)
    bin_h = rh / oh, bin_w = rw / ow
    grid_h = sampling_ratio if sampling_ratio > 0 else ceil(rh / oh)   (adaptive: per RoI)
    grid_w = sampling_ratio if sampling_ratio > 0 else ceil(rw / ow)
    count  = max(grid_h * grid_w, 1)
    sample (iy, ix) of bin (ph, pw), iy < grid_h, ix < grid_w:
        y = sy + ph*bin_h + (iy + 0.5)*bin_h/grid_h,   x = sx + pw*bin_w + (ix + 0.5)*bin_w/grid_w
    bilinear value of a sample (per axis, shown for y; x likewise with W):
        if y < -1 or y > H or x < -1 or x > W: the sample contributes 0 (it still counts in count)
        y = max(y, 0); y_low = floor(y);
        if y_low >= H - 1: y_low = y_high = H - 1, y = y_low   else: y_high = y_low + 1
        ly = y - y_low, hy = 1 - ly;  weights hy*hx, hy*lx, ly*hx, ly*lx on the four corners
    out[k, c, ph, pw] = (1/count) sum_{iy, ix} bilinear(input[b, c], y, x)
    So aligned=True with a box whose samples sit on pixel centres is an exact pixel average:
    RegionCL's box mean over integer cells [x0, x0+w) x [y0, y0+h) is
    roi_align(F, [b, x0, y0, x0+w, y0+h], 1, aligned=True, sampling_ratio=0) (grid = w x h samples
    at the cell centres). Degenerate boxes (x2 < x1, zero size, outside the image) give finite
    values: aligned=False forces them to 1x1; aligned=True with a non-positive size and adaptive
    sampling has no samples (zeros); samples outside [-1, H] x [-1, W] are zeros. Non-finite box
    coordinates are not checked (never an out-of-bounds access; the values are unspecified).
Gradient: to input only (boxes get none, as in torchvision), the same weights scattered back:
    d input[b, c, corner] += grad[k, c, ph, pw] * w_corner / count for every valid sample.
    The gradient has input's dtype, contiguous (N, C, H, W).

Registered ops (namespace densesim, torch.library.custom_op; fake implementations for
torch.compile / FakeTensor; CPU and CUDA implementations are one function running the reference
maths, or the Triton launchers when use_triton is set):
    densesim::roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                        aligned, use_triton) -> (K, C, oh, ow)
    densesim::roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width,
                                 batch_size, height, width, sampling_ratio, aligned, use_triton)
        -> grad_input (N, C, H, W) in grad's dtype (torchvision's _roi_align_backward, less C).
    Autograd through torch.library.register_autograd (rois is the only tensor saved).
roi_align(backend="auto") calls the op with use_triton=True on CUDA tensors of fp32/bf16/fp16
where triton imports, use_triton=False (the reference maths) otherwise; backend="triton" sets
use_triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1, and raises a one-line
RuntimeError anywhere else (also for float64 input); backend="reference" runs
roi_align_reference (plain torch autograd: what the `compiled` benchmark compiles). The op ignores
autocast (fp32 compute, output in input's dtype, as torchvision's autocast rule). "auto" on a
device the ops do not serve (neither CPU, CUDA nor meta) runs roi_align_reference. Inside a user's
torch.compile the ops are opaque nodes (fullgraph=True works, list boxes too).

No host sync (tests/host_sync.py: zero, forward + backward, every path, tensor or list boxes).
    Shapes, dtypes, devices and the Python arguments are validated on the host (one-line
    ValueErrors, before anything runs; never a tensor value). The batch-index range is a value
    check, _check_on_device: on CUDA (and inside torch.compile) torch._assert_async -- the step
    goes on and a bad index stops the next synchronisation with "roi_align: boxes[:, 0] (the
    batch index) must lie in [0, N) ..."; on CPU the same ValueError at once. List boxes need no
    check (their indices are 0..L-1, L <= N, validated on the host). Either way the Triton kernels
    mask every access by the index (an out-of-range RoI reads and writes nothing: zeros) and the
    reference maths clamp it and zero that RoI, so no input makes an out-of-bounds access.
    The adaptive grid depends on box values. The Triton kernels compute it per RoI on the device
    and loop with dynamic bounds; the reference has a static bound instead (see below). Nothing
    reads a value back (no .item(), no value-dependent shape).

Reference maths (roi_align_reference, and the CPU implementation of both ops)
    The sample weights are separable: a sample's validity and bilinear weight are products of a
    y factor and an x factor, and the samples form a grid_h x grid_w product grid. So
        out[k, c] = Ay[k] @ input[b_k, c] @ Ax[k]^T,   Ay (K, oh, H), Ax (K, ow, W)
    where Ay[k, ph, h] = (1/count) sum_iy (y weight of sample iy of bin ph on row h); Ax likewise
    (1/count folded into Ay). Ay and Ax come from scatter_add over the samples, vectorised over
    RoIs and bins. With sampling_ratio > 0 the samples per bin are exactly sampling_ratio; with
    adaptive sampling grid_h = ceil(bin_h) is value-dependent and unbounded (a box far larger
    than the map), but the samples that can be valid are bounded: for grid >= 2 the spacing
    bin/grid is in ((grid-1)/grid, 1], so at most H + 2 samples of a bin fall in [-1, H]. The
    reference takes, per bin, the H + 6 consecutive sample indices from (two before) the first
    one that can be valid (computed on the device) and masks those >= grid or invalid: static
    shapes, no host sync, exact. The contraction gathers input[b_k] for a chunk of RoIs at a time
    (at most _CHUNK_ELEMENTS elements, so memory stays bounded at CCOP's 35,200 RoIs) and runs
    two matmuls; the backward runs the transposed matmuls and index_add_ into (N, C, H, W).
    Dense Ay/Ax multiply every pixel of the image by a (mostly zero) weight: a non-finite feature
    anywhere in image b makes every RoI of image b non-finite here (torchvision reads only the
    corners it samples; finite features give identical results).

Triton version (backend="triton", or "auto" on CUDA; fp32/bf16/fp16)
    _ra_forward_kernel   grid (K, cdiv(C, BLOCK_C), cdiv(oh*ow, BLOCK_P)). A program holds one
        RoI, BLOCK_C channels and BLOCK_P output bins (a [BLOCK_C, BLOCK_P] fp32 accumulator).
        It loads the RoI row (5 scalars, any dtype, upcast to fp32), computes the geometry as
        above, and loops over the sample rows iy and columns ix with dynamic bounds: for
        sampling_ratio > 0, [0, sampling_ratio); adaptive, only the sample indices that can
        lie in [-1, H] in some bin of the RoI (_ra_window: the global sample index
        j = bin*grid + i runs over a contiguous range there, wrapped onto i = j mod grid; one
        index of slack either side), so a box far larger than the map costs at most
        ~(2H + 6) x (2W + 6) iterations, and a box inside it exactly grid_h x grid_w
        (per-sample validity is still tested exactly; box coordinates beyond ~2^22 feature
        pixels lose the fp32 precision this needs). Each iteration gathers the four corners
        of BLOCK_C x BLOCK_P samples by input's strides (upcast to fp32 right after tl.load) and
        accumulates the weighted sum; the result / count is stored once in input's dtype.
    _ra_backward_kernel  the same grid and loops: grad (read by its strides, e.g. the stride-0
        expand of a sum) / count times the four weights, tl.atomic_add into an fp32 (N, C, H, W)
        buffer (zeroed; converted to input's dtype by one torch op unless fp32). Atomics: the
        summation order is not deterministic on a GPU.
    Offsets: the image and RoI bases are int64; in-image offsets int32 unless an image slice or
    C*oh*ow can pass 2^31 (then int64). The launch plan (blocks, warps, int64 offsets) is cached
    per shape by functools.lru_cache on plain values (_cached_launch_plan; K is not in the key:
    the number of boxes changes every step); an output smaller than BLOCK_P bins takes more
    channels per program instead. Under TRITON_INTERPRET=1 the blocks are _CONFIG["interpret"]
    (one program per RoI at the tests' sizes; a test shrinks them to cross channel and bin
    blocks); bf16 stores round to nearest with integer ops (the interpreter's own conversion
    truncates).
    Launch parameters: _CONFIG (H100/H200 defaults, NOT timed on a GPU yet).

Roofline (what the op must move; L = oh*ow bins, S = grid_h*grid_w samples per bin)
    Forward: writes K*C*L outputs; reads each touched input pixel at least once (at most the
    whole input, N*C*H*W); FLOPs ~ 8*K*C*L*S (four multiply-adds per sample). The 4*K*C*L*S
    corner gathers mostly hit L1/L2 (neighbouring bins share corners). The "fpn_level" bench size:
    input (16, 256, 50, 50) fp32 = 41 MB, K = 512, 7x7, S = 4: output 25.7 MB, 0.2 GFLOP, so the
    HBM floor is ~(41 + 26) MB / 4.8 TB/s = 14 us; the gathers (103 M, 411 MB of L2 traffic) set
    the practical ceiling. Backward: reads grad (K*C*L), 4*K*C*L*S fp32 atomics into an
    N*C*H*W fp32 buffer (zeroing + dtype conversion: 2-3 passes over it).
    The reference moves more: per chunk it gathers input[b_k] (K*C*H*W elements in all: 1.3 GB
    fp32 at the bench size) and its matmuls do 2*K*C*oh*H*W + 2*K*C*oh*W*ow FLOPs, whatever the
    boxes' sizes (an empty box costs as much as a whole-map one; the Triton kernels skip it).
    GPU goal (bench/test_roi_align.py): triton >= 3x the eager reference forward + backward.
"""
import functools
import math
import os

import torch

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton
    import triton.language as tl
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
_OP = "roi_align"
# The devices the registered ops serve (CPU and CUDA implementations; meta through the fake ones)
_OP_DEVICES = ("cpu", "cuda", "meta")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The reference gathers input[b_k] for this many elements' worth of RoIs at a time (2^25: 128 MB
# fp32) -- bounded memory whatever K is.
_CHUNK_ELEMENTS = 2 ** 25


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device, dtype):
    """Called after validation. 'auto': Triton on CUDA tensors of fp32/bf16/fp16 where triton
    imports, else the reference. 'triton' runs the kernels on CUDA tensors, or on CPU tensors
    under the interpreter (TRITON_INTERPRET=1); anywhere else it raises instead of silently
    running something else."""
    if backend == "reference":
        return "reference"
    supported = dtype in _TRITON_DTYPES
    if backend == "auto":
        fits = _TRITON_IMPORTABLE and device.type == "cuda" and supported
        return "triton" if fits else "reference"
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which cannot be "
                           f"imported here; use backend='auto' or backend='reference'")
    if not supported:
        raise RuntimeError(f"{op_name}: the Triton kernels take fp32/bf16/fp16 input, got {dtype}; "
                           f"use backend='auto' or 'reference'")
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return "triton"
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type} tensors); "
                       f"CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")


def _fp32_region(device):
    """Autocast off: the op computes in fp32 (float64 for float64 input) whatever AMP does."""
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _pooled_size(op_name, output_size):
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        sizes = (output_size, output_size)
    elif isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        sizes = tuple(output_size)
    else:
        sizes = None
    if sizes is None or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"{op_name}: output_size must be a positive int or a pair (oh, ow) of "
                         f"positive ints, got {output_size!r}")
    return sizes


def _validate(op_name, input, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """Shapes, dtypes, devices and the Python arguments only (never a tensor value). Returns
    (rois (K, 5), pooled_h, pooled_w, whether the batch index needs the device range check)."""
    if not isinstance(input, torch.Tensor):
        raise ValueError(f"{op_name}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{op_name}: input must have shape (N, C, H, W), got {_describe(input)}")
    if not input.is_floating_point():
        raise ValueError(f"{op_name}: input must be a floating tensor (fp32/bf16/fp16/float64), "
                         f"got {input.dtype}")
    batch, _, height, width = input.shape
    if height == 0 or width == 0:
        raise ValueError(f"{op_name}: input must have H >= 1 and W >= 1, got {_describe(input)}")
    pooled_h, pooled_w = _pooled_size(op_name, output_size)
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)):
        raise ValueError(f"{op_name}: spatial_scale must be a finite Python number, "
                         f"got {type(spatial_scale).__name__}")
    # comparisons, not math.isfinite: a float that changes between compiled calls is a SymFloat
    if not (-math.inf < spatial_scale < math.inf):
        raise ValueError(f"{op_name}: spatial_scale must be a finite number, got {spatial_scale!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"{op_name}: sampling_ratio must be an int (<= 0: adaptive), "
                         f"got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise ValueError(f"{op_name}: aligned must be a bool, got {aligned!r}")
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{op_name}: boxes must be a Tensor (K, 5) [batch_index, x1, y1, x2, "
                             f"y2] or a list of (Ki, 4) tensors, got {_describe(boxes)}")
        _check_boxes_tensor(op_name, "boxes", boxes, input.device)
        return boxes, pooled_h, pooled_w, boxes.shape[0] > 0
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"{op_name}: boxes must be a Tensor (K, 5) or a list of (Ki, 4) tensors, "
                         f"got {type(boxes).__name__}")
    if len(boxes) > batch:
        raise ValueError(f"{op_name}: boxes is a list of {len(boxes)} tensors (one per image) but "
                         f"input has N = {batch} images")
    for i, item in enumerate(boxes):
        if not isinstance(item, torch.Tensor) or item.dim() != 2 or item.shape[1] != 4:
            raise ValueError(f"{op_name}: boxes[{i}] must be a (Ki, 4) tensor [x1, y1, x2, y2], "
                             f"got {_describe(item)}")
        _check_boxes_tensor(op_name, f"boxes[{i}]", item, input.device)
    return _boxes_to_rois(boxes, input), pooled_h, pooled_w, False


def _check_boxes_tensor(op_name, name, value, device):
    if not value.is_floating_point():
        raise ValueError(f"{op_name}: {name} must be a floating tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{op_name}: {name} must be on the same device as input ({device}), "
                         f"got {value.device}")


def _boxes_to_rois(boxes, input):
    """torchvision's convert_boxes_to_roi_format: (K, 5) rows [i, x1, y1, x2, y2] in order, in
    the compute dtype (exact batch indices). An empty list gives K = 0."""
    dtype = _compute_dtype(input.dtype)
    if len(boxes) == 0:
        return torch.zeros((0, 5), dtype=dtype, device=input.device)
    rows = [torch.cat([torch.full_like(b[:, :1], i, dtype=dtype), b.detach().to(dtype)], dim=1)
            for i, b in enumerate(boxes)]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def _check_batch_index(op_name, rois, input):
    """Every batch index (truncated toward zero, in the compute dtype) in [0, N), on the device."""
    batch = input.shape[0]
    index = rois[:, 0].detach().to(_compute_dtype(input.dtype))
    ok = ((index > -1) & (index < batch)).all()
    _check_on_device(ok, f"{op_name}: boxes[:, 0] (the batch index) must lie in [0, N) with "
                         f"N = {batch}")


# ----------------------------------------------------------------------------------------------
# Reference (the definition; the CPU path)
# ----------------------------------------------------------------------------------------------

def _axis_matrix(start, bin_size, grid, pooled, extent, sampling_ratio):
    """(K, pooled, extent): A[k, p, e] = sum over the samples i < grid of bin p of their 1-D
    weight on pixel e (zero for a sample outside [-1, extent]); see the module docstring."""
    rois, dtype, device = start.shape[0], start.dtype, start.device
    bins = torch.arange(pooled, dtype=dtype, device=device).view(1, pooled, 1)
    start, bin_size, grid = (t.view(rois, 1, 1) for t in (start, bin_size, grid))
    if sampling_ratio > 0:
        index = torch.arange(sampling_ratio, dtype=dtype, device=device).view(1, 1, -1)
    else:  # extent + 6 indices from (just before) the first sample that can be >= -1, per bin
        first = torch.floor((-1.0 - start - bins * bin_size) / (bin_size / grid) - 0.5) - 2.0
        first = torch.nan_to_num(first, nan=0.0).clamp(min=0.0)
        index = first + torch.arange(extent + 6, dtype=dtype, device=device)
    pos = start + bins * bin_size + (index + 0.5) * bin_size / grid
    valid = (index < grid) & (pos >= -1.0) & (pos <= extent)
    pos = torch.where(valid, pos, 0.0).clamp(min=0.0)
    low = pos.floor()
    edge = low >= extent - 1
    low = torch.where(edge, float(extent - 1), low)
    high = torch.where(edge, low, low + 1.0)
    frac = torch.where(edge, 0.0, pos - low)
    zero = torch.zeros((), dtype=dtype, device=device)
    matrix = torch.zeros((rois, pooled, extent), dtype=dtype, device=device)
    matrix.scatter_add_(2, low.long(), torch.where(valid, 1.0 - frac, zero))
    matrix.scatter_add_(2, high.long(), torch.where(valid, frac, zero))
    return matrix


def _interpolation(rois, batch, height, width, spatial_scale, pooled_h, pooled_w, sampling_ratio,
                   aligned, dtype):
    """(batch index (K,) int64 clamped into range, Ay (K, oh, H) with 1/count folded in and zero
    rows for an out-of-range index, Ax (K, ow, W)), in `dtype`, no autograd (boxes get none)."""
    rois = rois.detach().to(dtype)
    index = rois[:, 0]
    in_range = (index > -1) & (index < batch)
    image = torch.where(in_range, index, 0.0).long()
    offset = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - offset
    start_y = rois[:, 2] * spatial_scale - offset
    size_x = (rois[:, 3] * spatial_scale - offset) - start_x
    size_y = (rois[:, 4] * spatial_scale - offset) - start_y
    if not aligned:  # malformed RoIs are forced to 1 x 1
        size_x, size_y = size_x.clamp(min=1.0), size_y.clamp(min=1.0)
    bin_x, bin_y = size_x / pooled_w, size_y / pooled_h
    if sampling_ratio > 0:
        grid_x = grid_y = torch.full_like(bin_x, float(sampling_ratio))
    else:
        grid_x, grid_y = torch.ceil(size_x / pooled_w), torch.ceil(size_y / pooled_h)
    count = (grid_y * grid_x).clamp(min=1.0)
    scale = torch.where(in_range, 1.0 / count, 0.0)
    ay = _axis_matrix(start_y, bin_y, grid_y, pooled_h, height, sampling_ratio) * scale.view(-1, 1, 1)
    ax = _axis_matrix(start_x, bin_x, grid_x, pooled_w, width, sampling_ratio)
    return image, ay, ax


def _chunks(rois, channels, height, width):
    """RoI slices whose gathered images hold at most _CHUNK_ELEMENTS elements (one empty slice
    when K = 0, so the output still hangs off input in autograd)."""
    step = max(1, _CHUNK_ELEMENTS // max(1, channels * height * width))
    return [slice(k, k + step) for k in range(0, rois, step)] or [slice(0, 0)]


def _reference_forward(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    """out[k, c] = Ay[k] @ input[b_k, c] @ Ax[k]^T in the compute dtype, chunked over RoIs;
    differentiable in input (plain autograd)."""
    batch, channels, height, width = input.shape
    dtype = _compute_dtype(input.dtype)
    image, ay, ax = _interpolation(rois, batch, height, width, spatial_scale, pooled_h, pooled_w,
                                   sampling_ratio, aligned, dtype)
    features = input.to(dtype)
    outs = []
    for part in _chunks(rois.shape[0], channels, height, width):
        gathered = features[image[part]]                                  # (k, C, H, W)
        rows = torch.matmul(ay[part].unsqueeze(1), gathered)              # (k, C, oh, W)
        outs.append(torch.matmul(rows, ax[part].unsqueeze(1).transpose(-1, -2)))  # (k, C, oh, ow)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.to(input.dtype)


def _reference_backward(grad, rois, spatial_scale, pooled_h, pooled_w, batch, height, width,
                        sampling_ratio, aligned):
    """d input = sum_k scatter(Ay[k]^T @ grad[k, c] @ Ax[k]) into image b_k (index_add_)."""
    channels = grad.shape[1]
    dtype = _compute_dtype(grad.dtype)
    image, ay, ax = _interpolation(rois, batch, height, width, spatial_scale, pooled_h, pooled_w,
                                   sampling_ratio, aligned, dtype)
    grad = grad.to(dtype)
    out = torch.zeros((batch, channels, height, width), dtype=dtype, device=grad.device)
    for part in _chunks(rois.shape[0], channels, height, width):
        rows = torch.matmul(grad[part], ax[part].unsqueeze(1))                 # (k, C, oh, W)
        images = torch.matmul(ay[part].unsqueeze(1).transpose(-1, -2), rows)  # (k, C, H, W)
        out.index_add_(0, image[part], images)
    return out.to(grad.dtype)


def roi_align_reference(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                        aligned=False):
    """Plain-PyTorch roi_align (the same validation, the device check of the batch index, and the
    maths of the module docstring), differentiable in input by autograd; autocast off (fp32
    compute, float64 for float64 input), output in input's dtype."""
    rois, pooled_h, pooled_w, check = _validate("roi_align_reference", input, boxes, output_size,
                                                spatial_scale, sampling_ratio, aligned)
    if check:
        _check_batch_index("roi_align_reference", rois, input)
    with _fp32_region(input.device):
        return _reference_forward(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio,
                                  aligned)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

# Launch parameters: H100/H200 defaults, NOT timed on a GPU yet. A program holds one RoI, BLOCK_C
# channels and BLOCK_P output bins (7x7 = 49 bins fill 77% of 64); each sample gathers four
# [BLOCK_C, BLOCK_P] corner tiles. A small output (oh*ow < BLOCK_P) takes more channels instead,
# keeping BLOCK_C * BLOCK_P elements per program (RegionCL's 1x1: 512 channels x 2 bins).
# Compiled offline for sm_90 (triton 3.7, ptxas; bf16, adaptive, int32 offsets): 16 x 64 at 4
# warps uses 80 registers forward and 72 backward, no spills (24-28 resident warps per SM);
# 32 x 64 at 4 warps needed 160 / 112 (12-16 warps), so the smaller tile leaves more gathers in
# flight. "interpret": the blocks under TRITON_INTERPRET=1 (the interpreter's cost is per program
# and per op, not per lane: one program per RoI at the tests' sizes; a test shrinks them to cross
# channel and bin blocks). Read when a plan is made: plans are cached per shape
# (_cached_launch_plan); call its cache_clear() after editing this.
_CONFIG = {
    "cuda": {"BLOCK_C": 16, "BLOCK_P": 64, "num_warps": 4},
    "interpret": {"BLOCK_C": 8, "BLOCK_P": 64, "num_warps": 1},
}


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


def _launch_plan(phase, channels, pooled_h, pooled_w, height, width, strides, device):
    return _cached_launch_plan(phase, channels, pooled_h, pooled_w, height, width, tuple(strides),
                               device.type)


@functools.lru_cache(maxsize=256)
def _cached_launch_plan(phase, channels, pooled_h, pooled_w, height, width, strides, device_type):
    """Blocks, warps and the offset width for one launch, made once per shape (plain values only;
    K is not part of it: the number of boxes changes every step). `strides`: the (C, H, W)
    strides of what a program reads per image or RoI (input in forward, grad in backward). The
    plan is shared: read it, never modify it."""
    cfg = _CONFIG["interpret" if device_type != "cuda" else "cuda"]
    bins = pooled_h * pooled_w
    block_p = min(cfg["BLOCK_P"], max(2, triton.next_power_of_2(bins)))
    tile = cfg["BLOCK_C"] * cfg["BLOCK_P"]
    block_c = min(max(cfg["BLOCK_C"], tile // block_p), max(2, triton.next_power_of_2(channels)))
    padded_c = triton.cdiv(channels, block_c) * block_c
    padded_p = triton.cdiv(bins, block_p) * block_p
    # the largest in-slice element offset any lane computes (masked lanes included)
    if phase == "forward":
        read = padded_c * strides[0] + height * strides[1] + width * strides[2]
        write = padded_c * bins
    else:
        read = padded_c * strides[0] + (padded_p // pooled_w + 1) * strides[1] + pooled_w * strides[2]
        write = padded_c * height * width
    return dict(block_c=block_c, block_p=block_p, channel_blocks=padded_c // block_c,
                bin_blocks=padded_p // block_p, offsets_i64=max(read, write) >= 2 ** 31 - 1,
                interpret=device_type != "cuda", num_warps=cfg["num_warps"])


if _TRITON_IMPORTABLE:

    @triton.jit
    def _ra_index(index, OFFSETS_I64: tl.constexpr):
        """Indices for address arithmetic: int64 only when an offset can pass 2^31."""
        if OFFSETS_I64:
            y = index.to(tl.int64)
        else:
            y = index
        return y

    @triton.jit
    def _ra_store_value(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 x in the output dtype, rounded to nearest (the interpreter's fp32 -> bf16
        conversion truncates: round with integer ops first; finite values only)."""
        if INTERPRET and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _ra_roi(rois_ptr, roi, stride_rk, stride_rc, spatial_scale, n_images, pooled_h, pooled_w,
                sampling_ratio, ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr):
        """One RoI's geometry (fp32 scalars): the image, whether its index is in range, the start
        and bin size per axis, and the sample grid per axis (as floats)."""
        row = rois_ptr + roi.to(tl.int64) * stride_rk
        index = tl.load(row).to(tl.float32)
        in_range = (index > -1.0) & (index < n_images)  # truncation toward zero lands in [0, N)
        image = tl.where(in_range, index, 0.0).to(tl.int32)
        if ALIGNED:
            offset = 0.5
        else:
            offset = 0.0
        start_x = tl.load(row + stride_rc).to(tl.float32) * spatial_scale - offset
        start_y = tl.load(row + 2 * stride_rc).to(tl.float32) * spatial_scale - offset
        size_x = (tl.load(row + 3 * stride_rc).to(tl.float32) * spatial_scale - offset) - start_x
        size_y = (tl.load(row + 4 * stride_rc).to(tl.float32) * spatial_scale - offset) - start_y
        if not ALIGNED:  # malformed RoIs are forced to 1 x 1
            size_x = tl.maximum(size_x, 1.0)
            size_y = tl.maximum(size_y, 1.0)
        bin_x = size_x / pooled_w
        bin_y = size_y / pooled_h
        if ADAPTIVE:
            grid_x = tl.ceil(size_x / pooled_w)
            grid_y = tl.ceil(size_y / pooled_h)
        else:
            grid_x = start_x * 0.0 + sampling_ratio
            grid_y = grid_x
        return image, in_range, start_y, start_x, bin_y, bin_x, grid_y, grid_x

    @triton.jit
    def _ra_window(start, bin_size, grid, pooled, extent):
        """Adaptive grid along one axis: the sample indices to visit, as (first, how many, grid),
        all int32; index = first + t for t < how many, minus grid once it passes grid.
        Sample i of bin p is, up to rounding, the global sample j = p*grid + i at
        start + (j + 0.5)*step (step = bin_size/grid); the ones that can lie in [-1, extent] are
        the consecutive j in [(-1 - start)/step - 0.5, (extent - start)/step - 0.5] (one index of
        slack either side, clipped to [0, pooled*grid)). Their i = j mod grid is that range
        wrapped onto [0, grid): all of it once the range spans grid, else a run from j_lo mod grid
        (fewer than grid indices). So a box far larger than the map costs at most
        ~(extent + 1)/step + 3 indices per axis (step > 1/2 when grid >= 2). Empty when grid < 1."""
        usable = (grid >= 1.0) & (bin_size > 0.0)  # grid >= 1 means bin_size > 0 (NaN: false)
        whole = tl.where(usable, tl.minimum(grid, 1073741824.0), 1.0)
        step = tl.where(usable, bin_size, 1.0) / whole
        j_lo = tl.maximum(tl.floor((-1.0 - start) / step - 0.5) - 1.0, 0.0)
        j_hi = tl.minimum(tl.floor((extent - start) / step - 0.5) + 1.0, pooled * whole - 1.0)
        span = j_hi - j_lo + 1.0
        span = tl.where(usable & (span == span), tl.maximum(span, 0.0), 0.0)  # NaN -> 0
        spans_all = span >= whole
        first = tl.where(spans_all | (span == 0.0), 0.0, j_lo - tl.floor(j_lo / whole) * whole)
        first = tl.minimum(tl.maximum(first, 0.0), whole - 1.0)  # rounding guard
        count = tl.minimum(span, whole)
        return first.to(tl.int32), count.to(tl.int32), whole.to(tl.int32)

    @triton.jit
    def _ra_axis(start, bin_size, grid, bins, sample, extent):
        """Sample `sample` of the bins `bins` along one axis: (valid, low, high, weight of low,
        weight of high), torchvision's clamping rules (see the module docstring)."""
        pos = start + bins * bin_size + (sample + 0.5) * bin_size / grid
        valid = (pos >= -1.0) & (pos <= extent)
        pos = tl.maximum(tl.where(valid, pos, 0.0), 0.0)
        low = pos.to(tl.int32)
        edge = low >= extent - 1
        low = tl.where(edge, extent - 1, low)
        high = tl.where(edge, low, low + 1)
        pos = tl.where(edge, low.to(tl.float32), pos)
        frac = pos - low.to(tl.float32)
        return valid, low, high, 1.0 - frac, frac

    @triton.jit
    def _ra_forward_kernel(x_ptr, rois_ptr, out_ptr, n_images, channels, height, width,
                           stride_xn, stride_xc, stride_xh, stride_xw, stride_rk, stride_rc,
                           spatial_scale, pooled_h, pooled_w, sampling_ratio,
                           ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr,
                           OFFSETS_I64: tl.constexpr, INTERPRET: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """One RoI x BLOCK_C channels x BLOCK_P bins: sum over the samples, / count, stored once."""
        roi = tl.program_id(0)
        chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        bins = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n_bins = pooled_h * pooled_w
        chan_mask = chans < channels
        bin_y = bins // pooled_w
        bin_x = bins % pooled_w
        image, in_range, start_y, start_x, bin_h, bin_w, grid_y, grid_x = _ra_roi(
            rois_ptr, roi, stride_rk, stride_rc, spatial_scale, n_images, pooled_h, pooled_w,
            sampling_ratio, ALIGNED, ADAPTIVE)
        if ADAPTIVE:
            first_y, steps_y, wrap_y = _ra_window(start_y, bin_h, grid_y, pooled_h, height)
            first_x, steps_x, wrap_x = _ra_window(start_x, bin_w, grid_x, pooled_w, width)
        else:
            first_y = 0
            steps_y = sampling_ratio
            wrap_y = sampling_ratio
            first_x = 0
            steps_x = sampling_ratio
            wrap_x = sampling_ratio
        count = tl.maximum(grid_y * grid_x, 1.0)
        keep = bins < tl.where(in_range, n_bins, 0)  # no bin of an out-of-range RoI
        base = x_ptr + image.to(tl.int64) * stride_xn
        chan_off = (_ra_index(chans, OFFSETS_I64) * stride_xc)[:, None]
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for ty in range(steps_y):
            iy = first_y + ty
            iy = tl.where(iy >= wrap_y, iy - wrap_y, iy)
            ok_y, y_low, y_high, w_yl, w_yh = _ra_axis(start_y, bin_h, grid_y, bin_y, iy, height)
            row_low = _ra_index(y_low, OFFSETS_I64) * stride_xh
            row_high = _ra_index(y_high, OFFSETS_I64) * stride_xh
            for tx in range(steps_x):
                ix = first_x + tx
                ix = tl.where(ix >= wrap_x, ix - wrap_x, ix)
                ok_x, x_low, x_high, w_xl, w_xh = _ra_axis(start_x, bin_w, grid_x, bin_x, ix,
                                                           width)
                mask = chan_mask[:, None] & (keep & ok_y & ok_x)[None, :]
                col_low = _ra_index(x_low, OFFSETS_I64) * stride_xw
                col_high = _ra_index(x_high, OFFSETS_I64) * stride_xw
                v = tl.load(base + chan_off + (row_low + col_low)[None, :], mask=mask, other=0.0)
                acc += (w_yl * w_xl)[None, :] * v.to(tl.float32)
                v = tl.load(base + chan_off + (row_low + col_high)[None, :], mask=mask, other=0.0)
                acc += (w_yl * w_xh)[None, :] * v.to(tl.float32)
                v = tl.load(base + chan_off + (row_high + col_low)[None, :], mask=mask, other=0.0)
                acc += (w_yh * w_xl)[None, :] * v.to(tl.float32)
                v = tl.load(base + chan_off + (row_high + col_high)[None, :], mask=mask, other=0.0)
                acc += (w_yh * w_xh)[None, :] * v.to(tl.float32)
        acc = acc / count
        out = out_ptr + roi.to(tl.int64) * channels * n_bins
        offsets = _ra_index(chans, OFFSETS_I64)[:, None] * n_bins + bins[None, :]
        tl.store(out + offsets, _ra_store_value(acc, out_ptr.dtype.element_ty, INTERPRET),
                 mask=chan_mask[:, None] & (bins < n_bins)[None, :])

    @triton.jit
    def _ra_backward_kernel(grad_ptr, rois_ptr, gin_ptr, n_images, channels, height, width,
                            stride_gk, stride_gc, stride_gh, stride_gw, stride_rk, stride_rc,
                            spatial_scale, pooled_h, pooled_w, sampling_ratio,
                            ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr,
                            OFFSETS_I64: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_P: tl.constexpr):
        """grad[roi, chans, bins] / count times the four weights of every valid sample, atomically
        added into the fp32 (N, C, H, W) buffer."""
        roi = tl.program_id(0)
        chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        bins = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n_bins = pooled_h * pooled_w
        chan_mask = chans < channels
        bin_mask = bins < n_bins
        bin_y = bins // pooled_w
        bin_x = bins % pooled_w
        image, in_range, start_y, start_x, bin_h, bin_w, grid_y, grid_x = _ra_roi(
            rois_ptr, roi, stride_rk, stride_rc, spatial_scale, n_images, pooled_h, pooled_w,
            sampling_ratio, ALIGNED, ADAPTIVE)
        if ADAPTIVE:
            first_y, steps_y, wrap_y = _ra_window(start_y, bin_h, grid_y, pooled_h, height)
            first_x, steps_x, wrap_x = _ra_window(start_x, bin_w, grid_x, pooled_w, width)
        else:
            first_y = 0
            steps_y = sampling_ratio
            wrap_y = sampling_ratio
            first_x = 0
            steps_x = sampling_ratio
            wrap_x = sampling_ratio
        count = tl.maximum(grid_y * grid_x, 1.0)
        keep = bins < tl.where(in_range, n_bins, 0)  # no bin of an out-of-range RoI
        chans_i = _ra_index(chans, OFFSETS_I64)
        grad = tl.load(grad_ptr + roi.to(tl.int64) * stride_gk + chans_i[:, None] * stride_gc
                       + (_ra_index(bin_y, OFFSETS_I64) * stride_gh
                          + _ra_index(bin_x, OFFSETS_I64) * stride_gw)[None, :],
                       mask=chan_mask[:, None] & bin_mask[None, :], other=0.0)
        grad = grad.to(tl.float32) / count
        base = gin_ptr + image.to(tl.int64) * channels * height * width
        chan_off = (chans_i * height * width)[:, None]
        for ty in range(steps_y):
            iy = first_y + ty
            iy = tl.where(iy >= wrap_y, iy - wrap_y, iy)
            ok_y, y_low, y_high, w_yl, w_yh = _ra_axis(start_y, bin_h, grid_y, bin_y, iy, height)
            row_low = _ra_index(y_low, OFFSETS_I64) * width
            row_high = _ra_index(y_high, OFFSETS_I64) * width
            for tx in range(steps_x):
                ix = first_x + tx
                ix = tl.where(ix >= wrap_x, ix - wrap_x, ix)
                ok_x, x_low, x_high, w_xl, w_xh = _ra_axis(start_x, bin_w, grid_x, bin_x, ix,
                                                           width)
                mask = chan_mask[:, None] & (keep & ok_y & ok_x)[None, :]
                col_low = _ra_index(x_low, OFFSETS_I64)
                col_high = _ra_index(x_high, OFFSETS_I64)
                tl.atomic_add(base + chan_off + (row_low + col_low)[None, :],
                              grad * (w_yl * w_xl)[None, :], mask=mask)
                tl.atomic_add(base + chan_off + (row_low + col_high)[None, :],
                              grad * (w_yl * w_xh)[None, :], mask=mask)
                tl.atomic_add(base + chan_off + (row_high + col_low)[None, :],
                              grad * (w_yh * w_xl)[None, :], mask=mask)
                tl.atomic_add(base + chan_off + (row_high + col_high)[None, :],
                              grad * (w_yh * w_xh)[None, :], mask=mask)


def _triton_forward(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    batch, channels, height, width = input.shape
    count = rois.shape[0]
    out = torch.empty((count, channels, pooled_h, pooled_w), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    plan = _launch_plan("forward", channels, pooled_h, pooled_w, height, width,
                        input.stride()[1:], input.device)
    _ra_forward_kernel[(count, plan["channel_blocks"], plan["bin_blocks"])](
        input, rois, out, batch, channels, height, width, *input.stride(), rois.stride(0),
        rois.stride(1), float(spatial_scale), pooled_h, pooled_w, sampling_ratio,
        ALIGNED=aligned, ADAPTIVE=sampling_ratio <= 0, OFFSETS_I64=plan["offsets_i64"],
        INTERPRET=plan["interpret"], BLOCK_C=plan["block_c"], BLOCK_P=plan["block_p"],
        num_warps=plan["num_warps"])
    return out


def _triton_backward(grad, rois, spatial_scale, pooled_h, pooled_w, batch, height, width,
                     sampling_ratio, aligned):
    count, channels = grad.shape[:2]
    out = torch.zeros((batch, channels, height, width), dtype=torch.float32, device=grad.device)
    if grad.numel() > 0 and out.numel() > 0:
        plan = _launch_plan("backward", channels, pooled_h, pooled_w, height, width,
                            grad.stride()[1:], grad.device)
        _ra_backward_kernel[(count, plan["channel_blocks"], plan["bin_blocks"])](
            grad, rois, out, batch, channels, height, width, *grad.stride(), rois.stride(0),
            rois.stride(1), float(spatial_scale), pooled_h, pooled_w, sampling_ratio,
            ALIGNED=aligned, ADAPTIVE=sampling_ratio <= 0, OFFSETS_I64=plan["offsets_i64"],
            BLOCK_C=plan["block_c"], BLOCK_P=plan["block_p"], num_warps=plan["num_warps"])
    return out if grad.dtype == torch.float32 else out.to(grad.dtype)


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library): fake implementations, autograd, CPU/CUDA implementations
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("densesim::roi_align", mutates_args=(), device_types=("cpu", "cuda"))
def _roi_align_op(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
                  pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                  use_triton: bool) -> torch.Tensor:
    """(K, C, oh, ow) in input's dtype. use_triton: the Triton kernels (CUDA, or CPU under
    TRITON_INTERPRET=1), else the reference maths (the CPU implementation)."""
    with _fp32_region(input.device), torch.no_grad():
        if use_triton:
            with _on_device(input.device):
                return _triton_forward(input, rois, spatial_scale, pooled_height, pooled_width,
                                       sampling_ratio, aligned)
        return _reference_forward(input, rois, spatial_scale, pooled_height, pooled_width,
                                  sampling_ratio, aligned).contiguous()


@_roi_align_op.register_fake
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                    aligned, use_triton):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("densesim::roi_align_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _roi_align_backward_op(grad: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
                           pooled_height: int, pooled_width: int, batch_size: int, height: int,
                           width: int, sampling_ratio: int, aligned: bool,
                           use_triton: bool) -> torch.Tensor:
    """grad_input (N, C, H, W) in grad's dtype, contiguous (see the module docstring)."""
    with _fp32_region(grad.device), torch.no_grad():
        if use_triton:
            with _on_device(grad.device):
                return _triton_backward(grad, rois, spatial_scale, pooled_height, pooled_width,
                                        batch_size, height, width, sampling_ratio, aligned)
        return _reference_backward(grad, rois, spatial_scale, pooled_height, pooled_width,
                                   batch_size, height, width, sampling_ratio,
                                   aligned).contiguous()


@_roi_align_backward_op.register_fake
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size,
                             height, width, sampling_ratio, aligned, use_triton):
    return grad.new_empty((batch_size, grad.shape[1], height, width))


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, use_triton = inputs
    ctx.save_for_backward(rois)
    ctx.image_shape = (input.shape[0], input.shape[2], input.shape[3])
    ctx.args = (spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, use_triton)


def _backward(ctx, grad):
    rois, = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, use_triton = ctx.args
        batch, height, width = ctx.image_shape
        grad_input = _roi_align_backward_op(grad, rois, spatial_scale, pooled_h, pooled_w, batch,
                                            height, width, sampling_ratio, aligned, use_triton)
    # boxes get no gradient (as torchvision)
    return grad_input, None, None, None, None, None, None, None


torch.library.register_autograd("densesim::roi_align", _backward, setup_context=_setup_context)


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
              backend="auto"):
    """torchvision.ops.roi_align: (K, C, oh, ow) in input's dtype; gradient to input only.

    backend="auto": densesim::roi_align with the Triton kernels on CUDA tensors (fp32/bf16/fp16,
    triton importable), with the reference maths otherwise; "triton": the kernels or a one-line
    RuntimeError; "reference": roi_align_reference (plain autograd). Validation (one-line
    ValueError) reads no tensor value and comes before any launch; the batch-index range is
    checked on the device; nothing here syncs the host. See the module docstring for shapes,
    maths, edge inputs and backends."""
    _check_backend_name(_OP, backend)
    rois, pooled_h, pooled_w, check = _validate(_OP, input, boxes, output_size, spatial_scale,
                                                sampling_ratio, aligned)
    if check:
        _check_batch_index(_OP, rois, input)
    use_triton = _select_backend(_OP, backend, input.device, input.dtype) == "triton"
    if backend == "reference" or input.device.type not in _OP_DEVICES:
        with _fp32_region(input.device):
            return _reference_forward(input, rois, spatial_scale, pooled_h, pooled_w,
                                      sampling_ratio, aligned)
    return _roi_align_op(input, rois.detach(), float(spatial_scale), pooled_h, pooled_w,
                         sampling_ratio, aligned, use_triton)
