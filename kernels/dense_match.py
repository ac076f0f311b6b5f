"""Correspondence between two views' token grids: by features (DenseCL) and by crop geometry (K3).

dense_match(q, k) -> (idx, sim)                                  DENSE.md K2, no gradient
    q (B, N, C), k (B, M, C), any float dtype, same B and C.
    idx[b, n] = argmax_m cos(q[b, n], k[b, m])   (B, N) int64
    sim[b, n] = that maximum cosine               (B, N) float32
    Cosines are computed in fp32 (autocast off) from L2-normalised rows (eps 1e-12, so an all-zero
    row has cosine 0 with everything). On exact ties the index is whichever torch.max returns.

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

Roofline. dense_match: 2*B*N*M*C FLOPs, reading q and k once and writing 12 bytes per query row.
DenseCL at C5 (B=32, N=M=49, C=2048): 0.31 GFLOP, 25.7 MB fp32 read -- trivial. SIM-sized grids (B=128,
N=M=196, C=768): 7.6 GFLOP, 77 MB bf16 read; finer strides (S=3136, C=128, B=32): 80 GFLOP over a
(B, S, S) = 315 M-entry similarity the fused kernel never stores (argmax in the GEMM epilogue). The
reference stores it, in chunks of query rows. Geometric helpers: 8 floats per image in, the mask
(B, N, M) bool out; a fused consumer would build it in registers and never store it.
"""
import torch
import torch.nn.functional as F_nn

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton  # noqa: F401
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
# Cap on similarity entries held at once by the reference (64 MB of fp32).
_REFERENCE_CHUNK_ENTRIES = 1 << 24


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


def _fp32_region(device):
    # Only CUDA and CPU autocast can be active around this code; other device types use the CPU one.
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


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
    """Plain-PyTorch definition of dense_match: full cosine matrix, built in query-row chunks."""
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


def dense_match(q, k, backend="auto"):
    """Per query token, the most cosine-similar key token: (idx (B, N) int64, sim (B, N) fp32)."""
    _check_backend_name("dense_match", backend)
    _validate_dense_match(q, k)
    _select_backend("dense_match", backend)
    return dense_match_reference(q, k)


# ---------------------------------------------------------------------------------------------
# Geometric correspondence from crop boxes (K3)
# ---------------------------------------------------------------------------------------------

def _validate_views(op, boxes, flips, grid):
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
    if boxes.device.type == "meta" or batch == 0:
        return
    if flips.dtype != torch.bool and not bool(((flips == 0) | (flips == 1)).all()):
        raise ValueError(f"{op}: flips must be bool (or 0/1)")
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{op}: boxes must be finite")
    if bool((boxes[..., 2:] <= 0).any()):
        raise ValueError(f"{op}: boxes h and w (boxes[..., 2:]) must be > 0")


def _image_size_rows(op, image_size, batch, device):
    """(B, 2) float64 (H, W) from an (H, W) pair or a (B, 2) / (2,) tensor."""
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
    if device.type != "meta" and batch > 0 and bool((sizes <= 1).any()):
        raise ValueError(f"{op}: image_size H and W must be > 1 (PixPro divides by W-1, H-1)")
    return sizes


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


def geometric_correspondence(boxes, flips, grid):
    """For each view-1 token: (row, col) of its centre in view-2 token units (B, G*G, 2) float32 and
    whether it falls inside view 2 (B, G*G) bool. Swap the views for the inverse map."""
    _validate_views("geometric_correspondence", boxes, flips, grid)
    location, in_overlap = _correspondence64(boxes, flips, grid)
    return location.to(torch.float32), in_overlap


def grid_sample_coordinates(location, grid):
    """(..., 2) (row, col) in token units -> (..., 2) (x, y) for grid_sample(align_corners=False)."""
    if not isinstance(location, torch.Tensor) or location.shape[-1:] != (2,):
        raise ValueError(f"grid_sample_coordinates: location must be a tensor of shape (..., 2), "
                         f"got {getattr(location, 'shape', type(location).__name__)}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0:
        raise ValueError(f"grid_sample_coordinates: grid must be a positive int, got {grid!r}")
    normalised = 2.0 * (location + 0.5) / grid - 1.0
    return normalised.flip(-1)


def pixpro_normalised_boxes(boxes, flips, image_size):
    """(B, 2, 4) float64 PixPro boxes (x0, y0, x1, y1); x0 and x1 swapped for flipped views."""
    _validate_views("pixpro_normalised_boxes", boxes, flips, 1)
    sizes = _image_size_rows("pixpro_normalised_boxes", image_size, boxes.shape[0], boxes.device)
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
    _validate_views("pixpro_positive_mask", boxes, flips, grid)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
        raise ValueError(f"pixpro_positive_mask: threshold must be a positive number, got {threshold!r}")
    normalised = pixpro_normalised_boxes(boxes, flips, image_size)
    return pixpro_positive_mask_reference(normalised, grid, float(threshold))
