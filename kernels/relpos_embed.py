"""SIM's fixed 2-D sin-cos tables: the absolute one and the relative view-2-in-view-1 one.

Frequencies (SIM spec section 4.2): for an embedding width `dim` (divisible by 4),
    omega_k = 10000 ** (-k / (dim / 4)),  k = 0 .. dim/4 - 1,
and a scalar u is encoded as the two blocks [sin(u * omega), cos(u * omega)] (dim/4 each).

absolute_sincos_table(grid, dim) -> (grid*grid, dim) float32
    row r = a*grid + b (raster order) holds [sin(a w), cos(a w), sin(b w), cos(b w)]: ROW first,
    then column (the halves are swapped relative to MAE; SIM is consistent with itself).

relpos_embed(rel, grid, dim) -> (B, grid*grid, 2*dim) float32, no gradient (geometry only)
    rel (B, 6) float = (di, dj, dh, dw, relflip, dj_flip), SIM's per-sample numbers (spec section
    1.2; pipelines/geometry.py::relative_geometry makes them from crop boxes). For view-2 patch
    (a, b) in raster order, its centre in view-1 patch units (view-1 patch (a', b') has its centre
    at (a', b')) and the two log-scale terms (spec section 4.3):
        y(a) = dh (a + 1/2) + g di - 1/2
        x(b) = dw (b + 1/2) + g dj - 1/2              if relflip = 0
        x(b) = -dw (b + 1/2) + g dj_flip - 1/2        if relflip = 1
        s_h = 10 ln dh,  s_w = 10 ln dw
    and the embedding is the eight blocks
        [sin y w, cos y w, sin x w, cos x w, sin s_h w, cos s_h w, sin s_w w, cos s_w w].
    relpos_coordinates(rel, grid) returns the (B, grid*grid, 4) values (y, x, s_h, s_w) alone.
    dh and dw must be > 0 and relflip must be 0 or 1.

Precision: the reference computes coordinates and angles in float64 and stores float32, one block
at a time (so the float64 scratch is one (B, G*G, dim/4) block, never the whole embedding).

Roofline (recipe: B=128, G=14, dim=768 -> output width 1536): the inputs are 6 floats per sample;
the output is B*196*1536 fp32 = 154 MB to write, with 2 * B*196*384 = 19.3 M sin/cos evaluations
for the position blocks (the scale blocks are constant per sample). Stand-alone the op is purely
write-bandwidth bound (~50 us at 3 TB/s). The fused form planned for the Triton kernel applies the
1536 -> 768 Linear (2*B*196*1536*768 = 59 GFLOP) and adds the mask token without ever writing the
154 MB embedding.
"""
import torch

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton  # noqa: F401
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
# 10 turns |ln(size ratio)| (<= ~1.5 for the recipe's crops) into a range comparable to grid
# coordinates (spec section 4.3).
LOG_SCALE_FACTOR = 10.0


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _select_backend(op_name, backend):
    """Called after validation. No Triton kernel yet: 'auto' means the reference everywhere, and an
    explicit 'triton' request fails loudly instead of silently running something else."""
    if backend == "triton":
        raise RuntimeError(
            f"{op_name}: the Triton kernel for this op is not available in this build "
            f"(backend='triton'); use backend='auto' or backend='reference'")
    return "reference"


def _check_grid_and_dim(op_name, grid, dim):
    if isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0:
        raise ValueError(f"{op_name}: grid must be a positive int, got {grid!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 4):
        raise ValueError(f"{op_name}: dim must be a positive int divisible by 4, got {dim!r}")


def _validate_relpos_embed(rel, grid, dim, op_name="relpos_embed"):
    _check_grid_and_dim(op_name, grid, dim)
    if not isinstance(rel, torch.Tensor):
        raise ValueError(f"{op_name}: rel must be a torch.Tensor, got {type(rel).__name__}")
    if rel.dim() != 2 or rel.shape[1] != 6 or not rel.is_floating_point():
        raise ValueError(f"{op_name}: rel must be a float tensor of shape (B, 6) = "
                         f"(di, dj, dh, dw, relflip, dj_flip), got {rel.dtype} {tuple(rel.shape)}")
    if rel.device.type == "meta" or rel.shape[0] == 0:
        return
    scale_ratios = rel[:, 2:4]
    if not bool(torch.isfinite(rel).all()):
        raise ValueError(f"{op_name}: rel must be finite")
    if bool((scale_ratios <= 0).any()):
        raise ValueError(f"{op_name}: rel[:, 2] (dh) and rel[:, 3] (dw) must be > 0, "
                         f"got min dh {float(rel[:, 2].min())}, min dw {float(rel[:, 3].min())}")
    relflip = rel[:, 4]
    if not bool(((relflip == 0) | (relflip == 1)).all()):
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


def _relpos_coordinates64(rel, grid):
    """(B, grid*grid, 4) float64 (y, x, s_h, s_w) of spec section 4.3, raster order over view 2."""
    rel64 = rel.detach().to(torch.float64)
    d_i, d_j, d_h, d_w, relflip, d_j_flip = rel64.unbind(dim=1)
    centres = torch.arange(grid, dtype=torch.float64, device=rel.device) + 0.5  # a + 1/2
    y = d_h[:, None] * centres + grid * d_i[:, None] - 0.5                     # (B, G)
    x_same = d_w[:, None] * centres + grid * d_j[:, None] - 0.5
    x_mirrored = -d_w[:, None] * centres + grid * d_j_flip[:, None] - 0.5
    x = torch.where(relflip[:, None] > 0.5, x_mirrored, x_same)                # (B, G)
    batch = rel.shape[0]
    y_cells = y[:, :, None].expand(batch, grid, grid).reshape(batch, grid * grid)
    x_cells = x[:, None, :].expand(batch, grid, grid).reshape(batch, grid * grid)
    s_h = (LOG_SCALE_FACTOR * torch.log(d_h))[:, None].expand(batch, grid * grid)
    s_w = (LOG_SCALE_FACTOR * torch.log(d_w))[:, None].expand(batch, grid * grid)
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
    _select_backend("relpos_embed", backend)
    with torch.no_grad():
        return relpos_embed_reference(rel, grid, dim)

