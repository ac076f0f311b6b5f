"""roi_align (kernels/roi_align.py) against torchvision's semantics, written out here a second time
as a plain per-RoI, per-bin, per-sample Python loop in float64 (the loops of torchvision's
roi_align_kernel.cpp; independent of the module's vectorised reference). The loop builds the
op's linear map M (K, oh, ow, N, H, W): out = M . input, d input = M^T . grad.

Three paths: "reference" (backend="reference": plain autograd), "op" (backend="auto" on CPU
tensors: densesim::roi_align with the reference maths) and "triton" (backend="triton": the
kernels -- in the interpreter on a CPU-only machine, TRITON_INTERPRET=1 from the root conftest;
compiled on CUDA tensors on a GPU). The interpreter is slow, so the shapes are small (N=2, C=5,
H=13, W=9) and the Triton cases few.
"""
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import roi_align, roi_align_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_sync import count_host_syncs

ra = importlib.import_module("kernels.roi_align")
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not ra._TRITON_IMPORTABLE, reason="triton is not importable")
# path -> (device, backend, dtype of the input compared against float64)
PATHS = {"reference": ("cpu", "reference", torch.float64), "op": ("cpu", "auto", torch.float64),
         "triton": (TRITON_DEVICE, "triton", torch.float32)}
PATH_PARAMS = ["reference", "op", pytest.param("triton", marks=needs_triton)]
N, C, H, W = 2, 5, 13, 9


# ----------------------------------------------------------------------------------------------
# the float64 loop reference (torchvision's roi_align_kernel.cpp, line by line)
# ----------------------------------------------------------------------------------------------

def _loop_matrix(rois, n_images, height, width, pooled, scale, sampling_ratio, aligned):
    """M (K, oh, ow, N, H, W) float64: out[k, c, ph, pw] = sum M[k, ph, pw, n, h, w] x[n, c, h, w]."""
    oh, ow = (pooled, pooled) if isinstance(pooled, int) else pooled
    rows = rois.detach().double().cpu().tolist()
    m = np.zeros((len(rows), oh, ow, n_images, height, width))
    for k, (index, x1, y1, x2, y2) in enumerate(rows):
        b = int(index)
        offset = 0.5 if aligned else 0.0
        start_w, start_h = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = (x2 * scale - offset) - start_w, (y2 * scale - offset) - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / oh, roi_w / ow
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
        count = max(grid_h * grid_w, 1)
        for ph in range(oh):
            for pw in range(ow):
                for iy in range(grid_h):
                    for ix in range(grid_w):
                        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        if y < -1.0 or y > height or x < -1.0 or x > width:
                            continue
                        y, x = max(y, 0.0), max(x, 0.0)
                        y_low, x_low = int(y), int(x)
                        if y_low >= height - 1:
                            y_high = y_low = height - 1
                            y = float(y_low)
                        else:
                            y_high = y_low + 1
                        if x_low >= width - 1:
                            x_high = x_low = width - 1
                            x = float(x_low)
                        else:
                            x_high = x_low + 1
                        ly, lx = y - y_low, x - x_low
                        hy, hx = 1.0 - ly, 1.0 - lx
                        for yy, xx, weight in ((y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
                                               (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)):
                            m[k, ph, pw, b, yy, xx] += weight / count
    return torch.from_numpy(m)


def _apply(m, x):
    return torch.einsum("kpqnhw,nchw->kcpq", m, x.detach().double().cpu())


def _apply_t(m, grad):
    return torch.einsum("kpqnhw,kcpq->nchw", m, grad.detach().double().cpu())


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def _features(gen, dtype, device, shape=(N, C, H, W)):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _boxes(gen, scale, count=6, n_images=N, height=H, width=W, extra=True):
    """(K, 5) float64 boxes in the image frame (feature frame / scale): random ones, some partly
    outside the map, some with x2 < x1 or y2 < y1; plus a zero-size, a reversed and an
    almost-whole-map box."""
    u = torch.rand(count, 4, generator=gen, dtype=torch.float64)
    x1 = u[:, 0] * 1.3 * width - 0.2 * width
    y1 = u[:, 1] * 1.3 * height - 0.2 * height
    x2 = x1 + u[:, 2] * 1.0 * width - 0.15 * width
    y2 = y1 + u[:, 3] * 1.0 * height - 0.15 * height
    index = torch.randint(0, n_images, (count,), generator=gen).double()
    rows = torch.stack([index, x1, y1, x2, y2], dim=1)
    if extra:
        rows = torch.cat([rows, torch.tensor([[0, 3.3, 4.1, 3.3, 4.1],          # zero size
                                              [n_images - 1, 6.2, 9.5, 1.7, 2.2],  # reversed
                                              [0, -0.6, -1.3, width + 0.4, height + 0.9]],
                                             dtype=torch.float64)])
    rows[:, 1:] /= scale
    return rows


def _tolerance(expected, dtype):
    scale = max(1.0, float(expected.abs().max()))
    return (1e-12 if dtype == torch.float64 else 2e-6) * scale


def _run(path, x, boxes, output_size, scale, sampling_ratio, aligned, grad=None):
    """(output, d input) on the path (the input a fresh leaf; grad defaults to random)."""
    _, backend, _ = PATHS[path]
    leaf = x.detach().clone().requires_grad_()
    out = roi_align(leaf, boxes, output_size, scale, sampling_ratio, aligned, backend=backend)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(99),
                           dtype=torch.float64).to(out)
    out.backward(grad)
    return out.detach(), leaf.grad, grad


# ----------------------------------------------------------------------------------------------
# against the loop reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("scale,output_size", [(1.0, 7), (0.25, (3, 5))])
def test_forward_and_backward_match_the_loop(path, aligned, sampling_ratio, scale, output_size):
    device, _, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(hash((aligned, sampling_ratio, scale)) % 2**31)
    x = _features(gen, dtype, device)
    boxes = _boxes(gen, scale).to(device)
    out, grad_x, grad = _run(path, x, boxes, output_size, scale, sampling_ratio, aligned)
    m = _loop_matrix(boxes, N, H, W, output_size, scale, sampling_ratio, aligned)
    expected = _apply(m, x)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    assert out.shape == (boxes.shape[0], C, oh, ow) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=_tolerance(expected, dtype))
    expected_grad = _apply_t(m, grad)
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    torch.testing.assert_close(grad_x.cpu().double(), expected_grad, rtol=0,
                               atol=_tolerance(expected_grad, dtype))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_boxes_as_a_list_equal_the_tensor_form(path):
    """A list of (Ki, 4) tensors, one per image (an empty one included), is
    convert_boxes_to_roi_format's (K, 5): image i's boxes get index i, in order."""
    device, backend, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(1)
    x = _features(gen, dtype, device, shape=(3, C, H, W))
    per_image = [_boxes(gen, 1.0, count=3, extra=False)[:, 1:], torch.zeros(0, 4, dtype=torch.float64),
                 _boxes(gen, 1.0, count=2, extra=False)[:, 1:]]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=torch.float64), b], 1)
                      for i, b in enumerate(per_image)])
    as_list = roi_align(x, [b.to(device) for b in per_image], (3, 4), 1.0, 2, True, backend=backend)
    as_tensor = roi_align(x, rois.to(device), (3, 4), 1.0, 2, True, backend=backend)
    assert as_list.shape == (5, C, 3, 4)
    torch.testing.assert_close(as_list, as_tensor, rtol=0, atol=0)
    expected = _apply(_loop_matrix(rois, 3, H, W, (3, 4), 1.0, 2, True), x)
    torch.testing.assert_close(as_list.cpu().double(), expected, rtol=0,
                               atol=_tolerance(expected, dtype))
    # a tuple works too; fewer tensors than images is allowed (torchvision does not check)
    torch.testing.assert_close(roi_align(x, tuple(b.to(device) for b in per_image[:2]), (3, 4), 1.0,
                                         2, True, backend=backend), as_tensor[:3])


@pytest.mark.parametrize("path", ["reference", "op"])
@pytest.mark.parametrize("sampling_ratio,aligned", [(-1, False), (0, True), (2, True), (3, False)])
def test_gradcheck_float64(path, sampling_ratio, aligned):
    _, backend, _ = PATHS[path]
    gen = torch.Generator().manual_seed(2)
    x = _features(gen, torch.float64, "cpu", shape=(2, 2, 5, 4)).requires_grad_()
    boxes = _boxes(gen, 0.5, count=3, n_images=2, height=5, width=4)

    def fn(features):
        return roi_align(features, boxes, (2, 3), 0.5, sampling_ratio, aligned, backend=backend)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_hand_computed_values(path):
    device, backend, dtype = PATHS[path]
    x = _features(torch.Generator().manual_seed(3), dtype, device)

    def run(box, output_size=1, sampling_ratio=-1, aligned=False, features=x):
        rois = torch.tensor([box], dtype=torch.float64, device=device)
        return roi_align(features, rois, output_size, 1.0, sampling_ratio, aligned,
                         backend=backend)[0, :, 0, 0].double()

    atol = 1e-12 if dtype == torch.float64 else 2e-6
    x64 = x.double()
    # aligned=True: a 2x2 box whose (adaptive: 2 x 2) samples sit on pixel centres = the mean
    torch.testing.assert_close(run([1, 0, 0, 2, 2], aligned=True), x64[1, :, 0:2, 0:2].mean((1, 2)),
                               rtol=0, atol=atol)
    # RegionCL's box mean over integer cells [x0, x0 + w) x [y0, y0 + h), here 3 x 4 cells
    torch.testing.assert_close(run([0, 2, 5, 5, 9], sampling_ratio=0, aligned=True),
                               x64[0, :, 5:9, 2:5].mean((1, 2)), rtol=0, atol=atol)
    # aligned=False, one sample at (0.5, 0.5): the four pixels around it, a quarter each
    torch.testing.assert_close(run([0, 0, 0, 1, 1], sampling_ratio=1),
                               x64[0, :, 0:2, 0:2].mean((1, 2)), rtol=0, atol=atol)
    # x in (W-1, W]: clamped onto the last column; y = 0.5 between rows 0 and 1
    torch.testing.assert_close(run([0, W - 1, 0, W, 1], sampling_ratio=1),
                               x64[0, :, 0:2, W - 1].mean(1), rtol=0, atol=atol)
    # x in [-1, 0]: clamped onto column 0
    torch.testing.assert_close(run([0, -1, 0, 0, 1], sampling_ratio=1),
                               x64[0, :, 0:2, 0].mean(1), rtol=0, atol=atol)
    # a sample beyond W (x > W) is a zero, still counted: 2 samples across, one outside
    torch.testing.assert_close(run([0, W - 1, 0, W + 3, 1], sampling_ratio=2)[:1] * 0,
                               torch.zeros(1, dtype=torch.float64))
    half = run([0, W - 2, 4, W + 2, 6], sampling_ratio=0, aligned=True,
               features=torch.ones_like(x))  # 4 x 2 samples at x = W-2.5..W+0.5: 3 of 4 inside
    torch.testing.assert_close(half, torch.full_like(half, 0.75), rtol=0, atol=atol)
    # entirely outside: zeros; aligned=True with a negative size and adaptive sampling: zeros
    assert float(run([0, W + 2, 0, W + 3, 1], sampling_ratio=2).abs().max()) == 0.0
    assert float(run([0, 5, 5, 3, 3], aligned=True).abs().max()) == 0.0
    # a constant map: every box whose samples are all inside gives the constant
    ones = torch.full_like(x, 2.5)
    for box, sr, aligned in (([0, 1.3, 2.2, 7.9, 11.1], 0, False), ([1, 0.5, 0.5, 2.5, 8.5], 2, True),
                             ([1, 4, 4, 4, 4], -1, False)):
        value = run(box, (3, 2), sr, aligned, features=ones)
        torch.testing.assert_close(value, torch.full_like(value, 2.5), rtol=0, atol=atol)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_no_boxes(path):
    """K = 0 (a (0, 5) tensor, an empty list, a list of empty tensors): an empty (0, C, oh, ow)
    output that still backpropagates (a zero gradient)."""
    device, backend, dtype = PATHS[path]
    x = _features(torch.Generator().manual_seed(4), dtype, device).requires_grad_()
    for boxes in (torch.zeros(0, 5, dtype=dtype, device=device), [],
                  [torch.zeros(0, 4, dtype=dtype, device=device)] * 2):
        out = roi_align(x, boxes, (3, 5), 0.5, -1, True, backend=backend)
        assert out.shape == (0, C, 3, 5) and out.dtype == dtype
        x.grad = None
        (out.sum() * 2).backward()
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_degenerate_and_far_boxes_are_finite_and_exact(path):
    """Boxes far larger than the map (adaptive grids 47 x 47 and 15 x 15 per bin; in the second
    a bin boundary falls inside the map, so the Triton kernels' sample window wraps around the
    grid), zero-size, reversed and far-away boxes."""
    device, _, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(5)
    x = _features(gen, dtype, device)
    boxes = torch.tensor([[0, -60, -60, 80, 80], [1, -25, -25, 20, 20], [1, 4, 4, 4, 4],
                          [1, 8, 12, -3, -1], [0, 1e4, 2e4, 1e4 + 3, 2e4 + 2],
                          [1, -50, 3, -40, 7]], dtype=torch.float64, device=device)
    for sampling_ratio, aligned in ((0, False), (-1, True), (2, True)):
        out, grad_x, grad = _run(path, x, boxes, 3, 1.0, sampling_ratio, aligned)
        m = _loop_matrix(boxes, N, H, W, 3, 1.0, sampling_ratio, aligned)
        expected, expected_grad = _apply(m, x), _apply_t(m, grad)
        assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
        torch.testing.assert_close(out.cpu().double(), expected, rtol=0,
                                   atol=_tolerance(expected, dtype))
        torch.testing.assert_close(grad_x.cpu().double(), expected_grad, rtol=0,
                                   atol=_tolerance(expected_grad, dtype))


@pytest.mark.parametrize("path", ["reference", "op"])
def test_reference_chunks_over_rois(path, monkeypatch):
    """The reference gathers input[b_k] a chunk of RoIs at a time: 3 RoIs per chunk (ragged last
    chunk) gives what one chunk gives, forward and backward."""
    device, _, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(15)
    x = _features(gen, dtype, device)
    boxes = _boxes(gen, 1.0)
    whole, grad_whole, grad = _run(path, x, boxes, (3, 2), 1.0, 0, False)
    monkeypatch.setattr(ra, "_CHUNK_ELEMENTS", 3 * C * H * W)
    assert len(ra._chunks(boxes.shape[0], C, H, W)) == 3
    chunked, grad_chunked, _ = _run(path, x, boxes, (3, 2), 1.0, 0, False, grad=grad)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=0, atol=1e-14)


@needs_triton
def test_triton_sample_window_covers_every_valid_sample_and_stays_small():
    """_ra_window (adaptive grid, one axis) for random boxes up to 200x the map: the indices it
    visits include every sample of every bin that lies in [-1, extent], and there are at most
    min(grid, (extent + 1)/step + 4) of them (step = bin/grid)."""
    import triton
    import triton.language as tl

    @triton.jit
    def window(starts, bins, grids, out, pooled, extent):
        k = tl.program_id(0)
        first, count, wrap = ra._ra_window(tl.load(starts + k), tl.load(bins + k),
                                           tl.load(grids + k), pooled, extent)
        tl.store(out + 3 * k, first)
        tl.store(out + 3 * k + 1, count)
        tl.store(out + 3 * k + 2, wrap)

    gen = torch.Generator().manual_seed(14)
    extent, pooled, count = 13, 7, 200
    size = torch.exp(torch.rand(count, generator=gen) * math.log(2000.0)) + 0.01
    start = (torch.rand(count, generator=gen) * 1.2 - 1.0) * size + torch.rand(count, generator=gen) * extent
    bin_size = size / pooled
    grid = torch.ceil(size / pooled)
    got = torch.zeros(count, 3, dtype=torch.int32, device=TRITON_DEVICE)
    window[(count,)](start.to(TRITON_DEVICE), bin_size.to(TRITON_DEVICE), grid.to(TRITON_DEVICE),
                     got, pooled, extent)
    for k, (first, steps, wrap) in enumerate(got.cpu().tolist()):
        g, b, s0 = int(grid[k]), float(bin_size[k]), float(start[k])
        assert wrap == g
        visited = {(first + t) % g for t in range(steps)}
        assert len(visited) == steps <= min(g, (extent + 1) / (b / g) + 4)
        for p in range(pooled):
            step = b / g
            lo = max(0, math.floor((-1 - s0 - p * b) / step - 0.5) - 2)
            for i in range(lo, min(g, lo + extent + 8)):
                y = s0 + p * b + (i + 0.5) * b / g
                if -1.0 <= y <= extent:
                    assert i in visited, (k, p, i, y)


@needs_triton
def test_triton_small_blocks_cross_channel_and_bin_blocks(monkeypatch):
    """Blocks smaller than C and oh*ow: ragged channel and bin blocks, forward and backward."""
    monkeypatch.setitem(ra._CONFIG, "interpret", {"BLOCK_C": 2, "BLOCK_P": 16, "num_warps": 1})
    monkeypatch.setitem(ra._CONFIG, "cuda", {"BLOCK_C": 2, "BLOCK_P": 16, "num_warps": 4})
    ra._cached_launch_plan.cache_clear()
    try:
        gen = torch.Generator().manual_seed(6)
        x = _features(gen, torch.float32, TRITON_DEVICE)
        boxes = _boxes(gen, 1.0, count=2, extra=False).to(TRITON_DEVICE)
        out, grad_x, grad = _run("triton", x, boxes, (5, 7), 1.0, 0, True)
    finally:
        monkeypatch.undo()
        ra._cached_launch_plan.cache_clear()
    m = _loop_matrix(boxes, N, H, W, (5, 7), 1.0, 0, True)
    expected, expected_grad = _apply(m, x), _apply_t(m, grad)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=_tolerance(expected, torch.float32))
    torch.testing.assert_close(grad_x.cpu().double(), expected_grad, rtol=0,
                               atol=_tolerance(expected_grad, torch.float32))


# ----------------------------------------------------------------------------------------------
# dtypes, layouts, devices
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["op", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(path, dtype):
    """16-bit features: fp32 accumulation, one rounding. The low-precision rule:
    max|kernel - ref64| <= 2 max|torch_lowp - ref64| + atol, torch_lowp = the linear map applied
    in the 16-bit dtype; forward and gradient (in the input's dtype)."""
    device, _, _ = PATHS[path]
    gen = torch.Generator().manual_seed(7)
    x = _features(gen, dtype, device)
    boxes = _boxes(gen, 0.5).to(device=device, dtype=dtype)  # boxes in the input's dtype too
    out, grad_x, grad = _run(path, x, boxes, (3, 4), 0.5, 0, True)
    assert out.dtype == dtype and grad_x.dtype == dtype
    # the loop sees the same boxes (rounded to 16 bits, then to fp32 by the op)
    m = _loop_matrix(boxes.float(), N, H, W, (3, 4), 0.5, 0, True)
    for got, ref64, lowp in ((out, _apply(m, x), torch.einsum("kpqnhw,nchw->kcpq", m.to(dtype),
                                                               x.cpu())),
                             (grad_x, _apply_t(m, grad), torch.einsum("kpqnhw,kcpq->nchw",
                                                                      m.to(dtype), grad.cpu()))):
        error = float((got.cpu().double() - ref64).abs().max())
        bound = 2 * float((lowp.double() - ref64).abs().max()) + 1e-6 * float(ref64.abs().max())
        assert error <= bound, (error, bound)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_channels_last_and_strided_inputs(path):
    """Channels-last features, boxes as a strided view and a stride-0 gradient (of a sum) give
    what contiguous tensors give."""
    device, backend, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(8)
    x = _features(gen, dtype, device)
    boxes = _boxes(gen, 1.0, extra=False).to(device)
    wide = torch.zeros(boxes.shape[0], 10, dtype=boxes.dtype, device=device)
    wide[:, ::2] = boxes
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    leaf = x.to(memory_format=torch.channels_last).requires_grad_()
    assert not leaf.is_contiguous()
    out = roi_align(leaf, strided, (2, 3), 1.0, -1, False, backend=backend)
    out.sum().backward()
    plain = x.clone().requires_grad_()
    want = roi_align(plain, boxes, (2, 3), 1.0, -1, False, backend=backend)
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, plain.grad, rtol=1e-6, atol=1e-6)


def test_meta_tensors_forward_and_backward():
    """CCOP's P2 level on meta tensors: shapes and dtypes only, no value read."""
    x = torch.empty(32, 256, 56, 56, device="meta", dtype=torch.bfloat16, requires_grad=True)
    boxes = torch.empty(35200, 5, device="meta")
    with count_host_syncs() as syncs:
        out = roi_align(x, boxes, 7, 0.25, 0, True)
        out.sum().backward()
    assert not syncs, syncs.report()
    assert out.shape == (35200, 256, 7, 7) and out.dtype == torch.bfloat16
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16


def test_float64_on_triton_is_refused_and_auto_runs_the_reference():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    boxes = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    if ra._TRITON_IMPORTABLE:
        with pytest.raises(RuntimeError, match=r"^roi_align: the Triton kernels take fp32/bf16/fp16"):
            roi_align(x, boxes, 2, backend="triton")
    torch.testing.assert_close(roi_align(x, boxes, 2), roi_align_reference(x, boxes, 2))


# ----------------------------------------------------------------------------------------------
# registration, compile, host syncs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_opcheck(use_triton):
    device = TRITON_DEVICE if use_triton else "cpu"
    gen = torch.Generator().manual_seed(9)
    x = _features(gen, torch.float32, device, shape=(2, 3, 6, 5))
    rois = torch.tensor([[0, 0.5, 1, 4, 5], [1, -1, 2, 3, 3.5], [0, 2, 2, 1, 1]], device=device)
    torch.library.opcheck(torch.ops.densesim.roi_align.default,
                          (x.requires_grad_(), rois, 0.5, 2, 3, -1, True, use_triton))
    torch.library.opcheck(torch.ops.densesim.roi_align.default,
                          (x.detach().to(torch.bfloat16), rois, 1.0, 1, 2, 2, False, use_triton))
    grad = _features(gen, torch.float32, device, shape=(3, 3, 2, 6))[..., ::2]  # strided
    torch.library.opcheck(torch.ops.densesim.roi_align_backward.default,
                          (grad, rois, 0.5, 2, 3, 2, 6, 5, -1, True, use_triton))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_inside_torch_compile_fullgraph(path):
    """A user's compiled step (tensor and list boxes), forward and backward, equals eager."""
    device, backend, _ = PATHS[path]
    gen = torch.Generator().manual_seed(10)
    x = _features(gen, torch.float32, device)
    boxes = _boxes(gen, 0.5, count=3, extra=False).float().to(device)
    per_image = [boxes[:2, 1:], boxes[2:, 1:]]

    def user_step(features, rois, listed):
        a = roi_align(features * 2.0, rois, (2, 3), 0.5, 0, True, backend=backend)
        b = roi_align(features, listed, 2, 0.5, 2, False, backend=backend)
        return a.square().mean() + b.sum()

    torch._dynamo.reset()
    compiled = torch.compile(user_step, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = user_step(x1, boxes, per_image)
    eager.backward()
    got = compiled(x2, boxes, per_image)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_no_host_sync_forward_and_backward(path):
    device, backend, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(11)
    x = _features(gen, dtype, device).requires_grad_()
    boxes = _boxes(gen, 1.0, count=3, extra=False).to(device)
    with count_host_syncs() as syncs:  # default arguments (adaptive grid), tensor and list boxes
        roi_align(x, boxes, 7, backend=backend).sum().backward()
        roi_align(x, [boxes[:2, 1:], boxes[2:, 1:]], (3, 2), 0.5, 0, True,
                  backend=backend).sum().backward()
    assert not syncs, syncs.report()
    assert x.grad is not None


def test_launch_plan_is_cached_without_the_box_count():
    if not ra._TRITON_IMPORTABLE:
        pytest.skip("triton is not importable")
    ra._cached_launch_plan.cache_clear()
    x = _features(torch.Generator().manual_seed(12), torch.float32, TRITON_DEVICE, (1, 2, 4, 4))
    for count in (1, 2, 3):
        roi_align(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]] * count, device=TRITON_DEVICE), 2,
                  sampling_ratio=1, backend="triton")
    info = ra._cached_launch_plan.cache_info()
    assert info.misses == 1 and info.hits == 2


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_out_of_range_index_through_the_raw_op_reads_nothing(use_triton):
    """The raw op (no public-function check): an out-of-range RoI is all zeros and gets and gives
    no gradient; the others are unaffected. Never an out-of-bounds access."""
    device = TRITON_DEVICE if use_triton else "cpu"
    x = _features(torch.Generator().manual_seed(13), torch.float32, device, (2, 3, 5, 5))
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [7, 0.0, 0.0, 3.0, 3.0], [-3, 1.0, 1.0, 2.0, 2.0],
                         [1, 1.0, 1.0, 4.0, 4.0]], device=device)
    leaf = x.clone().requires_grad_()
    out = torch.ops.densesim.roi_align(leaf, rois, 1.0, 2, 2, 2, False, use_triton)
    assert not out[1:3].any()
    good = rois[[0, 3]]
    torch.testing.assert_close(out[[0, 3]], roi_align(x, good, 2, 1.0, 2, False))
    out.sum().backward()
    expected = x.clone().requires_grad_()
    roi_align(expected, good, 2, 1.0, 2, False).sum().backward()
    torch.testing.assert_close(leaf.grad, expected.grad)


# ----------------------------------------------------------------------------------------------
# bad input: one-line errors
# ----------------------------------------------------------------------------------------------

_X = torch.zeros(2, 3, 6, 5)
_B = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]])
BAD_INPUTS = [
    (lambda: (_X[0], _B, 2), "roi_align: input must have shape (N, C, H, W)"),
    (lambda: (_X.long(), _B, 2), "roi_align: input must be a floating tensor"),
    (lambda: (_X[:, :, :0], _B, 2), "roi_align: input must have H >= 1 and W >= 1"),
    (lambda: (_X, _B[:, :3], 2), "roi_align: boxes must be a Tensor (K, 5)"),
    (lambda: (_X, _B[0], 2), "roi_align: boxes must be a Tensor (K, 5)"),
    (lambda: (_X, [_B], 2), "roi_align: boxes[0] must be a (Ki, 4) tensor"),
    (lambda: (_X, [_B[:, 1:]] * 3, 2), "roi_align: boxes is a list of 3 tensors (one per image) but"),
    (lambda: (_X, _B.long(), 2), "roi_align: boxes must be a floating tensor"),
    (lambda: (_X, "boxes", 2), "roi_align: boxes must be a Tensor (K, 5) or a list"),
    (lambda: (_X, _B, 0), "roi_align: output_size must be a positive int or a pair"),
    (lambda: (_X, _B, (3, -1)), "roi_align: output_size must be a positive int or a pair"),
    (lambda: (_X, _B, (3, 2, 1)), "roi_align: output_size must be a positive int or a pair"),
    (lambda: (_X, _B, 2.0), "roi_align: output_size must be a positive int or a pair"),
    (lambda: (_X, _B, 2, math.nan), "roi_align: spatial_scale must be a finite number"),
    (lambda: (_X, _B, 2, 1.0, 1.5), "roi_align: sampling_ratio must be an int"),
    (lambda: (_X, _B, 2, 1.0, 2, 1), "roi_align: aligned must be a bool"),
    (lambda: (_X, torch.tensor([[2, 0.0, 0.0, 2.0, 2.0]]), 2),
     "roi_align: boxes[:, 0] (the batch index) must lie in [0, N) with N = 2"),
    (lambda: (_X, torch.tensor([[0, 0.0, 0.0, 2.0, 2.0], [-1, 0.0, 0.0, 2.0, 2.0]]), 2),
     "roi_align: boxes[:, 0] (the batch index) must lie in [0, N) with N = 2"),
]


@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=needs_triton)])
def test_bad_input_is_a_one_line_value_error(backend):
    """CPU tensors on every backend (validation and the batch-index check come before the backend
    is chosen; on CUDA tensors the index check is a device assert instead)."""
    for make, message in BAD_INPUTS:
        with pytest.raises(ValueError) as error:
            roi_align(*make(), backend=backend)
        text = str(error.value)
        assert text.startswith(message) and "\n" not in text, (message, text)
    with pytest.raises(ValueError, match=r"^roi_align: backend must be one of"):
        roi_align(_X, _B, 2, backend="cuda")
    with pytest.raises(ValueError, match=r"^roi_align_reference: boxes must be a Tensor \(K, 5\)"):
        roi_align_reference(_X, _B[:, 1:], 2)
    # a batch index of 1.9 truncates to 1: in range (as the C++ int cast)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    out = roi_align(_X.to(device), torch.tensor([[1.9, 0.0, 0.0, 2.0, 2.0],
                                                 [-0.5, 0.0, 0.0, 2.0, 2.0]], device=device), 2,
                    backend=backend)
    assert out.shape == (2, 3, 2, 2)
