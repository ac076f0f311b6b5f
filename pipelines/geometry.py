"""Crop geometry of the two views: the one place that turns boxes and flips into SIM's numbers.

Convention (used by both loaders and everywhere else): a view is resize(crop(image, box)), mirrored
left-right afterwards if its flip flag is set. box = (y, x, h, w) in pixels of the ORIGINAL,
UNFLIPPED image of size (H, W). Output pixel (r, c) of an S x S view comes from source row
y + (r + 1/2) h/S - 1/2 and source column x + (c' + 1/2) w/S - 1/2, with c' = S-1-c when the view is
flipped and c' = c otherwise (pixel-index coordinates: pixel k has its centre at k).

SIM's reference code flips the whole image before cropping and measures boxes in that flipped frame.
Mirroring the crop window maps the box's left edge x to W - x - w, so in SIM's frame view k has
    i_k = y_k,  j_k = (W - x_k - w_k) if flipped else x_k,  h_k, w_k unchanged,
and the per-sample numbers of SIM spec section 1.2 are
    di = (i2 - i1)/h1, dj = (j2 - j1)/w1, dh = h2/h1, dw = w2/w1,
    relflip = f1 xor f2, dj_flip = (W - j1 - j2)/w1.
kernels/relpos_embed.py turns them into each view-2 patch's position in view-1 patch units.

Arguments: boxes (B, 2, 4) float (views 1 and 2), flips (B, 2) bool (or 0/1), image_size (H, W) for
the whole batch or a (B, 2) tensor of per-image sizes. Arithmetic is float64; results are float32.
This module imports no model code (pipelines/ must not import engine/ or kernels/).
"""
import torch


def _as_tensor(value, name, device=None):
    try:
        return torch.as_tensor(value, device=device)
    except Exception as error:  # numpy arrays, lists and tensors all pass; anything else is a bug
        raise ValueError(f"{name} must be a tensor or array-like, got {type(value).__name__}") from error


def _check_on_device(ok: torch.Tensor, message: str) -> None:
    """A value check without a host sync (this runs inside the training step, where the boxes may
    be CUDA tensors from the device-resident loader): on CUDA, and inside torch.compile, a
    device-side assert (torch._assert_async; a failure stops the next synchronisation with
    `message`); on CPU the same check raises ValueError(message) at once."""
    if ok.device.type == "meta":
        return
    if torch.compiler.is_compiling() or ok.device.type != "cpu":
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


def _validated_views(boxes, flips):
    """(boxes float64 (B, 2, 4), flips bool (B, 2)) after checking shapes and positive sizes."""
    boxes = _as_tensor(boxes, "boxes")
    if boxes.dim() != 3 or tuple(boxes.shape[1:]) != (2, 4) or boxes.is_complex():
        raise ValueError(f"boxes must have shape (B, 2, 4) = (y, x, h, w) per view, "
                         f"got {boxes.dtype} {tuple(boxes.shape)}")
    flips = _as_tensor(flips, "flips", device=boxes.device)
    if tuple(flips.shape) != (boxes.shape[0], 2):
        raise ValueError(f"flips must have shape (B, 2) with B={boxes.shape[0]}, "
                         f"got {tuple(flips.shape)}")
    if flips.dtype != torch.bool:
        _check_on_device(((flips == 0) | (flips == 1)).all(), "flips must be bool (or 0/1)")
        flips = flips != 0
    boxes = boxes.to(torch.float64)
    _check_on_device((boxes[..., 2:] > 0).all(), "boxes h and w (boxes[..., 2:]) must be > 0")
    return boxes, flips


def _image_sizes(image_size, batch, device):
    """(B, 2) float64 (H, W)."""
    sizes = _as_tensor(image_size, "image_size").to(device=device, dtype=torch.float64)
    if sizes.shape == (2,):
        sizes = sizes.expand(batch, 2)
    if tuple(sizes.shape) != (batch, 2):
        raise ValueError(f"image_size must be (H, W) or have shape (B, 2) with B={batch}, "
                         f"got shape {tuple(sizes.shape)}")
    _check_on_device((sizes > 0).all(), "image_size H and W must be > 0")
    return sizes


def flipped_frame_boxes(boxes, flips, image_size):
    """(B, 2, 4) float64 boxes (i, j, h, w) in SIM's frame: a flipped view's box is measured in
    the mirrored image, j = W - x - w."""
    boxes, flips = _validated_views(boxes, flips)
    sizes = _image_sizes(image_size, boxes.shape[0], boxes.device)
    y, x, h, w = boxes.unbind(dim=-1)
    mirrored_x = sizes[:, 1:2] - x - w
    return torch.stack([y, torch.where(flips, mirrored_x, x), h, w], dim=-1)


def relative_geometry(boxes, flips, image_size):
    """(B, 6) float32 (di, dj, dh, dw, relflip, dj_flip) of SIM spec section 1.2 (view 2 relative
    to view 1), computed from flipped-frame boxes exactly as the reference code does."""
    boxes, flips = _validated_views(boxes, flips)
    sizes = _image_sizes(image_size, boxes.shape[0], boxes.device)
    sim_boxes = flipped_frame_boxes(boxes, flips, sizes)
    (i1, j1, h1, w1), (i2, j2, h2, w2) = sim_boxes[:, 0].unbind(-1), sim_boxes[:, 1].unbind(-1)
    width = sizes[:, 1]
    relflip = (flips[:, 0] ^ flips[:, 1]).to(torch.float64)
    rel = torch.stack([
        (i2 - i1) / h1,
        (j2 - j1) / w1,
        h2 / h1,
        w2 / w1,
        relflip,
        (width - j1 - j2) / w1,
    ], dim=1)
    return rel.to(torch.float32)


def view_to_source(box, flip, rows, cols, view_size):
    """Map view pixel coordinates to original-image pixel coordinates (float64).

    box (B, 4) = (y, x, h, w), flip (B,) bool, rows and cols broadcastable to (B, P) (view pixel
    coordinates, fractional allowed: a patch centre of patch size p is p*(a + 1/2) - 1/2),
    view_size S (the view is S x S). Returns (source_rows, source_cols), each (B, P).
    """
    box = _as_tensor(box, "box").to(torch.float64)
    if box.dim() != 2 or box.shape[1] != 4:
        raise ValueError(f"box must have shape (B, 4) = (y, x, h, w), got {tuple(box.shape)}")
    flip = _as_tensor(flip, "flip", device=box.device).to(torch.bool)
    if tuple(flip.shape) != (box.shape[0],):
        raise ValueError(f"flip must have shape (B,) with B={box.shape[0]}, got {tuple(flip.shape)}")
    if not isinstance(view_size, int) or view_size <= 0:
        raise ValueError(f"view_size must be a positive int, got {view_size!r}")
    rows = _as_tensor(rows, "rows", device=box.device).to(torch.float64)
    cols = _as_tensor(cols, "cols", device=box.device).to(torch.float64)
    y, x, h, w = (v[:, None] for v in box.unbind(dim=-1))
    source_cols_index = torch.where(flip[:, None], (view_size - 1) - cols, cols)
    source_rows = y + (rows + 0.5) * h / view_size - 0.5
    source_cols = x + (source_cols_index + 0.5) * w / view_size - 0.5
    return torch.broadcast_tensors(source_rows, source_cols)


def patch_centres_in_source(box, flip, grid):
    """(B, grid*grid, 2) float64 (row, col) original-image pixel coordinates of the centres of a
    view's grid x grid patches, raster order (patch a*grid + b), columns in the view's output
    orientation. Independent of the view's pixel size."""
    view_size = grid  # one "pixel" per patch: a patch centre is then simply pixel (a, b)
    cells = torch.arange(grid, dtype=torch.float64)
    rows = cells.repeat_interleave(grid)[None, :]
    cols = cells.repeat(grid)[None, :]
    box_tensor = _as_tensor(box, "box")
    source_rows, source_cols = view_to_source(box_tensor, flip, rows.to(box_tensor.device),
                                              cols.to(box_tensor.device), view_size)
    return torch.stack([source_rows, source_cols], dim=-1)


def boxes_in_view(boxes, box, flip, view_size):
    """Boxes of the ORIGINAL image mapped into a view's pixel frame (region proposals carried into
    every view: CCOP, DetReg).

    boxes: (..., P, 4) float (x1, y1, x2, y2) in edge coordinates of the original, unflipped image
    (pixel k spans [k, k+1]; selective search's (x, y, w, h) is (x, y, x+w, y+h)). box: (..., 4)
    the view's crop (y, x, h, w); flip: (...) bool; view_size: S (square) or (S_h, S_w).
    Under the convention above, edge coordinate u of the source maps to (u - x)·S_w/w in the view
    (and S_w - that when flipped, which also swaps x1 and x2).

    Returns (mapped, visible): mapped (..., P, 4) float32 (x1, y1, x2, y2) in view pixels, CLIPPED
    to [0, S]; visible (..., P) float32, the fraction of the box's area inside the view (0 for a box
    entirely outside, or of zero area). A method keeps the boxes it wants, e.g. CCOP: area >= 144
    view pixels and visible >= 0.6.
    """
    boxes = _as_tensor(boxes, "boxes").to(torch.float64)
    box = _as_tensor(box, "box", boxes.device).to(torch.float64)
    flip = _as_tensor(flip, "flip", boxes.device).to(torch.bool)
    if boxes.shape[-1:] != (4,) or box.shape[-1:] != (4,):
        raise ValueError(f"boxes (..., P, 4) and box (..., 4) expected, got {tuple(boxes.shape)} "
                         f"and {tuple(box.shape)}")
    size_h, size_w = (view_size, view_size) if isinstance(view_size, int) else view_size
    y, x, h, w = (box[..., k, None] for k in range(4))
    x1 = (boxes[..., 0] - x) * size_w / w
    x2 = (boxes[..., 2] - x) * size_w / w
    y1 = (boxes[..., 1] - y) * size_h / h
    y2 = (boxes[..., 3] - y) * size_h / h
    flipped = flip[..., None]
    x1, x2 = torch.where(flipped, size_w - x2, x1), torch.where(flipped, size_w - x1, x2)
    full = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    cx1, cx2 = x1.clamp(0, size_w), x2.clamp(0, size_w)
    cy1, cy2 = y1.clamp(0, size_h), y2.clamp(0, size_h)
    inside = (cx2 - cx1).clamp(min=0) * (cy2 - cy1).clamp(min=0)
    visible = torch.where(full > 0, inside / full.clamp(min=1e-12), torch.zeros_like(full))
    mapped = torch.stack([cx1, cy1, torch.maximum(cx2, cx1), torch.maximum(cy2, cy1)], dim=-1)
    return mapped.to(torch.float32), visible.to(torch.float32)
