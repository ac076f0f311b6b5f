"""ms_deform_attn (kernels/ms_deform_attn.py) against Deformable DETR's semantics, written out here a
second time as a plain per-sample Python loop in float64 (the bilinear blend with zero corners of
grid_sample, align_corners=False; independent of the module's grid_sample reference), with all
three gradients by their formulas, and against ms_deform_attn_reference run in float64.

Three paths: "reference" (backend="reference": plain autograd through grid_sample), "op"
(backend="auto" on CPU tensors: densesim::ms_deform_attn with the reference maths and its
written-out backward) and "triton" (backend="triton": the kernels -- in the interpreter on a
CPU-only machine, TRITON_INTERPRET=1 from the root conftest; compiled on CUDA tensors on a GPU).
Odd sizes: N=2, L=3 levels (5,7),(3,4),(1,2), heads=3, d=5, P=3, Lq=11; locations include 0 and
1, pixel centres and borders, the support edges x = -1 and x = W, and points outside [0, 1].

The location gradient jumps where a pixel coordinate x = loc*W - 0.5 is an integer (the bilinear
blend has a kink there). Where x is exactly an integer in every precision (W a power of two) the
paths must agree on grid_sample's one-sided convention; where x is only within rounding of an
integer (W = 7, 5, 3) the side depends on the rounding, and that component is not compared.
"""
import importlib
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_sync import count_host_syncs

msda = importlib.import_module("kernels.ms_deform_attn")
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not msda._TRITON_IMPORTABLE, reason="triton is not importable")
# path -> (device, backend, dtype of the inputs compared against float64)
PATHS = {"reference": ("cpu", "reference", torch.float64), "op": ("cpu", "auto", torch.float64),
         "triton": (TRITON_DEVICE, "triton", torch.float32)}
PATH_PARAMS = ["reference", "op", pytest.param("triton", marks=needs_triton)]
N, HEADS, D, P, LQ = 2, 3, 5, 3, 11
SIZES = [(5, 7), (3, 4), (1, 2)]


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def _levels(sizes, device, dtype=torch.int64):
    shapes = torch.tensor(sizes, dtype=dtype, device=device)
    areas = [h * w for h, w in sizes]
    starts = torch.tensor([sum(areas[:i]) for i in range(len(sizes))], dtype=dtype, device=device)
    return shapes, starts


def _special(extent):
    """Normalised coordinates on one axis of a level of this extent: 0, 1, every pixel centre and
    border, the support edges (pixel coordinate -1 and extent), and points well outside."""
    centres = [(j + 0.5) / extent for j in range(extent)]
    borders = [j / extent for j in range(extent + 1)]
    return [0.0, 1.0, -0.5 / extent, (extent + 0.5) / extent, -0.3, 1.25, -2.0, 3.0] + centres + borders


def _inputs(gen, dtype, device, sizes=SIZES, batch=N, queries=LQ, heads=HEADS, head_dim=D,
            points=P, special=0.6):
    """(value, sampling_locations, attention_weights): random values and weights (any sign), and
    locations uniform in [-0.15, 1.15] of which a fraction `special` per axis is replaced by a
    special coordinate of that level."""
    levels = len(sizes)
    positions = sum(h * w for h, w in sizes)
    value = torch.randn(batch, positions, heads, head_dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    loc = loc * 1.3 - 0.15
    for level, (h, w) in enumerate(sizes):
        for axis, extent in ((0, w), (1, h)):
            choices = torch.tensor(_special(extent), dtype=torch.float64)
            pick = choices[torch.randint(0, len(choices), loc.shape[:3] + (points,), generator=gen)]
            use = torch.rand(pick.shape, generator=gen, dtype=torch.float64) < special
            loc[:, :, :, level, :, axis] = torch.where(use, pick, loc[:, :, :, level, :, axis])
    weights = torch.randn(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (value, loc, weights))


# ----------------------------------------------------------------------------------------------
# the float64 loop (grid_sample's bilinear blend with zero padding, per sample)
# ----------------------------------------------------------------------------------------------

def _loop(value, sizes, loc, weights, grad):
    """(out (N, Lq, heads*d), grad_value, grad_loc, grad_weights) in float64, by the formulas of
    the module docstring (the location gradient one-sided from the right at integer x, y)."""
    v = value.detach().double().cpu().numpy()
    locs = loc.detach().double().cpu().numpy()
    a = weights.detach().double().cpu().numpy()
    batch, _, heads, head_dim = v.shape
    _, queries, _, _, points, _ = locs.shape
    g = grad.detach().double().cpu().numpy().reshape(batch, queries, heads, head_dim)
    starts = np.cumsum([0] + [h * w for h, w in sizes])
    out = np.zeros((batch, queries, heads, head_dim))
    grad_value = np.zeros_like(v)
    grad_loc = np.zeros_like(locs)
    grad_weights = np.zeros_like(a)
    for n in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lev, (height, width) in enumerate(sizes):
                    for p in range(points):
                        x = locs[n, q, h, lev, p, 0] * width - 0.5
                        y = locs[n, q, h, lev, p, 1] * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0

                        def corner(yy, xx, n=n, h=h, start=starts[lev], height=height,
                                   width=width):
                            if 0 <= yy < height and 0 <= xx < width:
                                row = start + yy * width + xx
                                return v[n, row, h], row
                            return np.zeros(head_dim), None

                        (v00, s00), (v01, s01) = corner(y0, x0), corner(y0, x0 + 1)
                        (v10, s10), (v11, s11) = corner(y0 + 1, x0), corner(y0 + 1, x0 + 1)
                        blend = ((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy)
                        sample = blend[0] * v00 + blend[1] * v01 + blend[2] * v10 + blend[3] * v11
                        weight = a[n, q, h, lev, p]
                        gq = g[n, q, h]
                        out[n, q, h] += weight * sample
                        grad_weights[n, q, h, lev, p] = gq @ sample
                        dx = (1 - fy) * (v01 - v00) + fy * (v11 - v10)
                        dy = (1 - fx) * (v10 - v00) + fx * (v11 - v01)
                        grad_loc[n, q, h, lev, p] = (weight * width * (gq @ dx),
                                                     weight * height * (gq @ dy))
                        for s, b in zip((s00, s01, s10, s11), blend):
                            if s is not None:
                                grad_value[n, s, h] += weight * b * gq
    return tuple(torch.from_numpy(t) for t in (out.reshape(batch, queries, heads * head_dim),
                                               grad_value, grad_loc, grad_weights))


def _comparable_locations(loc, sizes):
    """(N, Lq, heads, L, P, 2) bool: False where the pixel coordinate is within rounding of an
    integer without being one (the location gradient's side of the kink is then rounding)."""
    loc = loc.detach().double().cpu()
    keep = torch.ones(loc.shape, dtype=torch.bool)
    for level, (h, w) in enumerate(sizes):
        for axis, extent in ((0, w), (1, h)):
            coords = loc[:, :, :, level, :, axis]
            flags = []
            for x in coords.flatten().tolist():
                pixel = Fraction(x) * extent - Fraction(1, 2)  # exact: no rounding onto a kink
                distance = abs(pixel - round(pixel))
                flags.append(distance == 0 or distance > Fraction(1, 10000))
            keep[:, :, :, level, :, axis] = torch.tensor(flags).view(coords.shape)
    return keep


def _tolerance(expected, dtype):
    scale = max(1.0, float(expected.abs().max()))
    return (1e-12 if dtype == torch.float64 else 4e-6) * scale


def _run(path, value, loc, weights, sizes=SIZES, grad=None, level_args=None):
    """(out, grad_value, grad_loc, grad_weights, grad) on the path, the inputs fresh leaves."""
    _, backend, _ = PATHS[path]
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    shapes, starts = level_args if level_args is not None else _levels(sizes, value.device)
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(99),
                           dtype=torch.float64).to(out)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad for t in leaves) + (grad,)


def _assert_matches(got, expected, loc, sizes, dtype, what=""):
    """got/expected: (out, grad_value, grad_loc, grad_weights); the location gradient compared
    where it is well defined (see the module docstring)."""
    keep = _comparable_locations(loc, sizes)
    for name, g, e in zip(("out", "grad_value", "grad_loc", "grad_weights"), got, expected):
        g = g.detach().double().cpu()
        e = e.detach().double().cpu()
        assert g.shape == e.shape, (what, name)
        assert torch.isfinite(g).all(), (what, name)
        if name == "grad_loc":
            g, e = torch.where(keep, g, 0.0), torch.where(keep, e, 0.0)
        torch.testing.assert_close(g, e, rtol=0, atol=_tolerance(e, dtype), msg=f"{what} {name}")


# ----------------------------------------------------------------------------------------------
# against the loop and the float64 reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
def test_forward_and_backward_match_the_loop_and_the_float64_reference(path):
    device, _, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(0)
    value, loc, weights = _inputs(gen, dtype, device)
    out, grad_value, grad_loc, grad_weights, grad = _run(path, value, loc, weights)
    assert out.shape == (N, LQ, HEADS * D) and out.dtype == dtype and out.is_contiguous()
    assert grad_value.dtype == grad_loc.dtype == grad_weights.dtype == dtype
    got = (out, grad_value, grad_loc, grad_weights)
    _assert_matches(got, _loop(value, SIZES, loc, weights, grad), loc, SIZES, dtype, "loop")
    # ms_deform_attn_reference in float64 on the same (rounded) inputs
    leaves = [t.detach().cpu().double().requires_grad_() for t in (value, loc, weights)]
    shapes, starts = _levels(SIZES, "cpu")
    ref = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    ref.backward(grad.detach().cpu().double())
    _assert_matches(got, (ref,) + tuple(t.grad for t in leaves), loc, SIZES, dtype, "reference64")


def test_exact_kinks_follow_grid_sample():
    """Pixel centres of power-of-two extents, x = -1 and x = W: exact integers in every
    precision, so every path takes grid_sample's side (the loop checks it): nothing is masked."""
    gen = torch.Generator().manual_seed(1)
    sizes = [(2, 4), (1, 2)]
    value, loc, weights = _inputs(gen, torch.float64, "cpu", sizes=sizes, queries=6, special=1.0)
    assert bool(_comparable_locations(loc, sizes).all())
    paths = ["reference", "op"] + (["triton"] if msda._TRITON_IMPORTABLE else [])
    expected = None
    for path in paths:
        device, _, dtype = PATHS[path]
        out, grad_value, grad_loc, grad_weights, grad = _run(
            path, value.to(device, dtype), loc.to(device, dtype), weights.to(device, dtype), sizes)
        if expected is None:
            expected = _loop(value, sizes, loc, weights, grad)
        _assert_matches((out, grad_value, grad_loc, grad_weights), expected, loc, sizes, dtype, path)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_hand_computed_values(path):
    device, backend, dtype = PATHS[path]
    value = torch.randn(1, 7 * 5 + 2, 1, 4, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64).to(device, dtype)
    shapes, starts = _levels([(5, 7), (1, 2)], device)

    def run(x, y, level=0, v=value):
        loc = torch.zeros(1, 1, 1, 2, 1, 2, dtype=dtype, device=device)
        loc[0, 0, 0, level, 0] = torch.tensor([x, y], dtype=dtype)
        weights = torch.zeros(1, 1, 1, 2, 1, dtype=dtype, device=device)
        weights[0, 0, 0, level, 0] = 1.0
        return ms_deform_attn(v, shapes, starts, loc, weights, backend=backend)[0, 0].double()

    atol = 1e-12 if dtype == torch.float64 else 2e-6
    v = value.double()[0, :, 0]
    pixel = lambda i, j: v[i * 7 + j]  # level 0: H = 5, W = 7
    # a pixel centre reads that pixel
    torch.testing.assert_close(run(3.5 / 7, 2.5 / 5), pixel(2, 3), rtol=0, atol=atol)
    # (0, 0) and (1, 1): a quarter of the corner pixel (the rest is zero padding)
    torch.testing.assert_close(run(0.0, 0.0), 0.25 * pixel(0, 0), rtol=0, atol=atol)
    torch.testing.assert_close(run(1.0, 1.0), 0.25 * pixel(4, 6), rtol=0, atol=atol)
    # the border between two pixels: their mean
    torch.testing.assert_close(run(3.0 / 7, 2.5 / 5), 0.5 * (pixel(2, 2) + pixel(2, 3)),
                               rtol=0, atol=atol)
    # outside the support: zero
    for x, y in ((-0.6 / 7, 0.5), (1 + 0.6 / 7, 0.5), (0.5, -0.1 - 0.5 / 5), (-3.0, 7.0)):
        assert float(run(x, y).abs().max()) == 0.0
    # level 1 (H = 1, W = 2, starting at 35): y = 0.5 is its only row
    torch.testing.assert_close(run(0.75, 0.5, level=1), v[36], rtol=0, atol=atol)
    # a constant map: any location whose corners are all inside gives the constant
    ones = torch.full_like(value, 2.5)
    torch.testing.assert_close(run(0.33, 0.61, v=ones), torch.full((4,), 2.5, dtype=torch.float64),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("path", ["reference", "op"])
def test_gradcheck_float64(path):
    """torch.autograd.gradcheck (finite differences) in float64, locations away from kinks and
    from the support edges, all three inputs."""
    _, backend, _ = PATHS[path]
    gen = torch.Generator().manual_seed(3)
    sizes = [(3, 4), (2, 3)]
    value, loc, weights = _inputs(gen, torch.float64, "cpu", sizes=sizes, batch=1, queries=4,
                                  heads=2, head_dim=3, points=2, special=0.0)
    extent = torch.tensor([[w, h] for h, w in sizes], dtype=torch.float64).view(1, 1, 1, -1, 1, 2)
    pixel = loc * extent - 0.5
    frac = pixel - pixel.floor()
    loc = torch.where((frac - 0.5).abs() > 0.45, loc + 0.1 / extent, loc)  # off the kinks
    shapes, starts = _levels(sizes, "cpu")

    def fn(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a, backend=backend)

    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@needs_triton
def test_triton_small_query_blocks(monkeypatch):
    """Query blocks of 4 (ragged last block), d = 8 (a full head block), forward and backward."""
    monkeypatch.setitem(msda._CONFIG, "interpret", dict(msda._CONFIG["interpret"],
                                                         forward_block_q=4, backward_block_q=4))
    monkeypatch.setitem(msda._CONFIG, "cuda", dict(msda._CONFIG["cuda"], forward_block_q=4,
                                                    backward_block_q=4))
    gen = torch.Generator().manual_seed(4)
    value, loc, weights = _inputs(gen, torch.float32, TRITON_DEVICE, head_dim=8, heads=2)
    assert msda._launch_plan("forward", LQ, 8, (value,), value.device)["query_blocks"] == 3
    out, grad_value, grad_loc, grad_weights, grad = _run("triton", value, loc, weights)
    _assert_matches((out, grad_value, grad_loc, grad_weights),
                    _loop(value, SIZES, loc, weights, grad), loc, SIZES, torch.float32)


# ----------------------------------------------------------------------------------------------
# dtypes, layouts, empty inputs
# ----------------------------------------------------------------------------------------------

def _core_pytorch(value, sizes, sampling_locations, attention_weights):
    """Deformable DETR's ms_deform_attn_core_pytorch verbatim: torch's own maths in the inputs'
    dtype (no upcast), for the low-precision rule."""
    N_, _, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in sizes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(sizes):
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_l_ = F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear",
                                          padding_mode="zeros", align_corners=False)
        sampling_value_list.append(sampling_value_l_)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1)
    return output.view(N_, M_ * D_, Lq_).transpose(1, 2).contiguous()


@pytest.mark.parametrize("path", ["op", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(path, dtype):
    """16-bit inputs: fp32 maths, one rounding. The low-precision rule, forward and all three
    gradients: max|kernel - ref64| <= 2 max|torch_lowp - ref64| + atol, torch_lowp = Deformable
    DETR's grid_sample formulation run in the 16-bit dtype (autograd for its gradients)."""
    device, _, _ = PATHS[path]
    gen = torch.Generator().manual_seed(5)
    value, loc, weights = _inputs(gen, dtype, device, special=0.3)
    out, grad_value, grad_loc, grad_weights, grad = _run(path, value, loc, weights)
    assert out.dtype == grad_value.dtype == grad_loc.dtype == grad_weights.dtype == dtype
    expected = _loop(value, SIZES, loc, weights, grad)
    leaves = [t.detach().cpu().requires_grad_() for t in (value, loc, weights)]
    lowp = _core_pytorch(leaves[0], SIZES, leaves[1], leaves[2])
    lowp.backward(grad.cpu())
    keep = _comparable_locations(loc, SIZES)
    for name, got, ref64, low in zip(("out", "grad_value", "grad_loc", "grad_weights"),
                                     (out, grad_value, grad_loc, grad_weights), expected,
                                     (lowp,) + tuple(t.grad for t in leaves)):
        got, low = got.detach().cpu().double(), low.detach().double()
        if name == "grad_loc":
            got, low, ref64 = (torch.where(keep, t, 0.0) for t in (got, low, ref64))
        error = float((got - ref64).abs().max())
        bound = 2 * float((low - ref64).abs().max()) + 1e-5 * float(ref64.abs().max())
        assert error <= bound, (name, error, bound)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_strided_inputs_and_level_arguments(path):
    """value as a transposed view, locations and weights as strided views, a stride-0 gradient
    (of a sum), level tensors as int32 / strided / Python lists: what contiguous inputs give."""
    device, backend, dtype = PATHS[path]
    gen = torch.Generator().manual_seed(6)
    value, loc, weights = _inputs(gen, dtype, device)
    v_view = value.transpose(1, 2).contiguous().transpose(1, 2)           # (N, S, heads, d) view
    l_wide = torch.zeros(loc.shape[:-1] + (5,), dtype=dtype, device=device)
    l_wide[..., ::3] = loc
    l_view = l_wide[..., ::3]
    a_view = weights.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    assert not (v_view.is_contiguous() or l_view.is_contiguous() or a_view.is_contiguous())
    shapes, starts = _levels(SIZES, device)
    wide = torch.zeros(2, len(SIZES), 2, dtype=torch.int32, device=device)
    wide[0] = shapes
    level_variants = [(wide[0], starts.int()), (shapes.t().contiguous().t(), torch.stack([starts, starts], 1)[:, 0]),
                      (list(map(tuple, SIZES)), [0, 35, 47])]
    grad_ones = torch.ones(N, LQ, HEADS * D, dtype=dtype, device=device)
    expected = _run(path, value, loc, weights, grad=grad_ones)
    for level_args in level_variants:
        leaves = [t.detach().requires_grad_() for t in (v_view, l_view, a_view)]
        out = ms_deform_attn(leaves[0], *level_args, leaves[1], leaves[2], backend=backend)
        out.sum().backward()  # a stride-0 gradient
        for got, want in zip((out,) + tuple(t.grad for t in leaves), expected[:4]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_no_queries_and_no_images(path):
    device, _, dtype = PATHS[path]
    for batch, queries in ((N, 0), (0, 4)):
        value, loc, weights = _inputs(torch.Generator().manual_seed(7), dtype, device,
                                      batch=batch, queries=queries)
        out, grad_value, grad_loc, grad_weights, _ = _run(path, value, loc, weights)
        assert out.shape == (batch, queries, HEADS * D)
        assert grad_value.shape == value.shape and not grad_value.any()
        assert grad_loc.shape == loc.shape and grad_weights.shape == weights.shape


def test_float64_on_triton_is_refused_and_auto_runs_the_reference():
    value, loc, weights = _inputs(torch.Generator().manual_seed(8), torch.float64, "cpu")
    shapes, starts = _levels(SIZES, "cpu")
    if msda._TRITON_IMPORTABLE:
        with pytest.raises(RuntimeError, match=r"^ms_deform_attn: the Triton kernels take "
                                               r"fp32/bf16/fp16"):
            ms_deform_attn(value, shapes, starts, loc.float(), weights.float(), backend="triton")
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, weights),
                               ms_deform_attn_reference(value, shapes, starts, loc, weights))


# ----------------------------------------------------------------------------------------------
# registration, compile, host syncs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_opcheck(use_triton):
    device = TRITON_DEVICE if use_triton else "cpu"
    sizes = [(3, 4), (1, 2)]
    value, loc, weights = _inputs(torch.Generator().manual_seed(9), torch.float32, device,
                                  sizes=sizes, queries=3, heads=2, head_dim=3, points=2,
                                  special=0.0)
    shapes, starts = _levels(sizes, device)
    torch.library.opcheck(torch.ops.densesim.ms_deform_attn.default,
                          (value.requires_grad_(), shapes, starts, loc.requires_grad_(),
                           weights.requires_grad_(), [], use_triton))
    grad = torch.randn(2, 3, 12, device=device)[..., ::2]  # strided
    torch.library.opcheck(torch.ops.densesim.ms_deform_attn_backward.default,
                          (grad, value.detach().to(torch.bfloat16), shapes, starts, loc.detach(),
                           weights.detach(), [3, 4, 1, 2], use_triton))


@pytest.mark.parametrize("path", ["op", pytest.param("triton", marks=needs_triton)])
def test_inside_torch_compile_fullgraph(path):
    """A user's compiled step, forward and backward, equals eager."""
    device, backend, _ = PATHS[path]
    value, loc, weights = _inputs(torch.Generator().manual_seed(10), torch.float32, device,
                                  queries=5)
    shapes, starts = _levels(SIZES, device)

    def user_step(v, l, a):
        out = ms_deform_attn(v * 2.0, shapes, starts, l.clamp(-0.5, 1.5), a.softmax(-1),
                             backend=backend)
        return out.square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(user_step, fullgraph=True, backend="aot_eager")
    eager_inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    compiled_inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    eager = user_step(*eager_inputs)
    eager.backward()
    got = compiled(*compiled_inputs)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_host_syncs_forward_and_backward(path):
    """The Triton path reads no tensor value, with level tensors; every path reads none with the
    level arguments as Python lists; the reference maths read a spatial_shapes tensor once per
    forward and once per backward (.tolist(): the documented sync), and nothing else."""
    device, backend, dtype = PATHS[path]
    value, loc, weights = _inputs(torch.Generator().manual_seed(11), dtype, device, queries=4)
    shapes, starts = _levels(SIZES, device)
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    with count_host_syncs() as syncs:
        ms_deform_attn(leaves[0], list(SIZES), [0, 35, 47], leaves[1], leaves[2],
                       backend=backend).sum().backward()
    assert not syncs, syncs.report()
    with count_host_syncs() as syncs:
        ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2],
                       backend=backend).sum().backward()
    if path == "triton":
        assert not syncs, syncs.report()
    else:
        assert syncs and {what for what, _ in syncs} == {"Tensor.tolist"}, syncs.report()
    assert all(t.grad is not None for t in leaves)


def test_meta_tensors_at_the_deformable_detr_encoder_size():
    """Shapes and dtypes only, no value read: N=2, 4 levels, S = Lq = 19,947, 8 heads x 32."""
    sizes = [(100, 150), (50, 75), (25, 38), (13, 19)]
    positions = sum(h * w for h, w in sizes)
    value = torch.empty(2, positions, 8, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    loc = torch.empty(2, positions, 8, 4, 4, 2, device="meta", dtype=torch.bfloat16,
                      requires_grad=True)
    weights = torch.empty(2, positions, 8, 4, 4, device="meta", dtype=torch.bfloat16,
                          requires_grad=True)
    shapes = torch.empty(4, 2, dtype=torch.int64, device="meta")
    starts = torch.empty(4, dtype=torch.int64, device="meta")
    with count_host_syncs() as syncs:
        out = ms_deform_attn(value, shapes, starts, loc, weights)
        out.sum().backward()
    assert not syncs, syncs.report()
    assert out.shape == (2, positions, 256) and out.dtype == torch.bfloat16
    assert value.grad.shape == value.shape and loc.grad.shape == loc.shape
    assert weights.grad.shape == weights.shape


@needs_triton
def test_inconsistent_levels_through_the_raw_op_read_nothing_out_of_range():
    """The raw op (no public-function check) with level tensors that overrun S: finite values,
    the samples beyond S read as zeros, never an out-of-bounds access (the kernels' [0, S) mask;
    the reference maths cannot split such sizes and raise instead)."""
    device = TRITON_DEVICE
    value, loc, weights = _inputs(torch.Generator().manual_seed(12), torch.float32, device,
                                  queries=4)
    shapes = torch.tensor([[9, 9], [3, 4], [1, 2]], device=device)     # 81 > 35 positions
    starts = torch.tensor([0, 35, 60], device=device)                   # the last one beyond S
    out = torch.ops.densesim.ms_deform_attn(value, shapes, starts, loc, weights, [], True)
    assert torch.isfinite(out).all()
    # a level starting at S reads nothing at all: only levels 0 and 1 contribute
    starts = torch.tensor([0, 35, 49], device=device)
    shapes = torch.tensor([[5, 7], [3, 4], [1, 2]], device=device)
    out = torch.ops.densesim.ms_deform_attn(value, shapes, starts, loc, weights, [], True)
    two_levels = ms_deform_attn(value[:, :47], shapes[:2], starts[:2], loc[:, :, :, :2],
                                weights[:, :, :, :2], backend="triton")
    torch.testing.assert_close(out, two_levels)


# ----------------------------------------------------------------------------------------------
# bad input: one-line errors
# ----------------------------------------------------------------------------------------------

def _bad_inputs():
    value, loc, weights = _inputs(torch.Generator().manual_seed(13), torch.float32, "cpu",
                                  queries=2)
    shapes, starts = _levels(SIZES, "cpu")
    ok = (value, shapes, starts, loc, weights)

    def with_(**changes):
        names = ("value", "shapes", "starts", "loc", "weights")
        return tuple(changes.get(n, t) for n, t in zip(names, ok))

    op = "ms_deform_attn: "
    return [
        (with_(value=value[0]), op + "value must have shape (N, S, heads, d)"),
        (with_(value=value.long()), op + "value must be a floating tensor"),
        (with_(value=value.numpy()), op + "value must be a torch.Tensor"),
        (with_(loc=loc[..., :1]), op + "sampling_locations must have shape (N, Lq, heads, L, P, 2)"),
        (with_(loc=loc[:1]), op + "sampling_locations (N, Lq, heads, L, P, 2) must match value's N"),
        (with_(loc=loc[:, :, :2]), op + "sampling_locations (N, Lq, heads, L, P, 2) must match"),
        (with_(loc=loc.int()), op + "sampling_locations must be a floating tensor"),
        (with_(weights=weights[..., :2]), op + "attention_weights must have shape (N, Lq, heads, L, P)"),
        (with_(weights=weights.bool()), op + "attention_weights must be a floating tensor"),
        (with_(loc=loc[:, :, :, :, :0], weights=weights[..., :0]), op + "need L >= 1 levels, P >= 1"),
        (with_(shapes=shapes[:2]), op + "spatial_shapes must be an integer tensor (L, 2)"),
        (with_(shapes=shapes.float()), op + "spatial_shapes must be an integer tensor (L, 2)"),
        (with_(shapes=[(5, 7), (3, 4)]), op + "spatial_shapes must be an integer tensor (L, 2) or a list"),
        (with_(shapes=[(5, 7), (3, 4), (1, 2.0)]), op + "spatial_shapes must be an integer tensor"),
        (with_(shapes=[(5, 7), (3, 4), (1, 3)]), op + "spatial_shapes must hold H, W >= 1 with sum"),
        (with_(shapes="5x7"), op + "spatial_shapes must be an integer tensor (L, 2) or a list"),
        (with_(starts=starts[:2]), op + "level_start_index must be an integer tensor (L,)"),
        (with_(starts=starts.double()), op + "level_start_index must be an integer tensor (L,)"),
        (with_(shapes=list(SIZES), starts=[0, 35, 48]),
         op + "level_start_index must be the exclusive cumulative sum of H*W"),
        # value checks on the device (CPU tensors: the same ValueError at once)
        (with_(shapes=torch.tensor([[5, 7], [3, 4], [1, 3]])),
         op + "spatial_shapes must hold H, W >= 1 with sum of H*W == S = 49, and level_start_index"),
        (with_(shapes=torch.tensor([[5, 7], [3, 4], [2, 1]]), starts=torch.tensor([0, 35, 46])),
         op + "spatial_shapes must hold H, W >= 1 with sum of H*W == S = 49, and level_start_index"),
        (with_(shapes=torch.tensor([[5, 7], [0, 4], [7, 2]])),
         op + "spatial_shapes must hold H, W >= 1 with sum of H*W == S = 49, and level_start_index"),
    ]


@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=needs_triton)])
def test_bad_input_is_a_one_line_value_error(backend):
    """CPU tensors on every backend (validation and the level check come before the backend is
    chosen; on CUDA tensors the level check is a device assert instead)."""
    for args, message in _bad_inputs():
        with pytest.raises(ValueError) as error:
            ms_deform_attn(*args, backend=backend)
        text = str(error.value)
        assert text.startswith(message) and "\n" not in text, (message, text)
    args = _bad_inputs()[0][0]
    with pytest.raises(ValueError, match=r"^ms_deform_attn: backend must be one of"):
        ms_deform_attn(*_inputs_ok(), backend="cuda")
    with pytest.raises(ValueError, match=r"^ms_deform_attn_reference: value must have shape"):
        ms_deform_attn_reference(*args)


def _inputs_ok():
    value, loc, weights = _inputs(torch.Generator().manual_seed(14), torch.float32, "cpu",
                                  queries=2)
    shapes, starts = _levels(SIZES, "cpu")
    return value, shapes, starts, loc, weights
