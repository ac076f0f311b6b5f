"""Hot-path ops for dense self-supervised pre-training, one op per file.

Each `kernels/<op>.py` stands alone (imports only torch, and triton where available), so a single
file can be copied into another codebase. Every public op takes `backend="auto" | "reference" |
"triton"`: "auto" runs the Triton kernel on CUDA tensors (where triton is importable) and the
PyTorch reference otherwise; "triton" runs the kernel or raises a one-line error, never falling
back silently (CPU tensors are accepted under TRITON_INTERPRET=1, the interpreter).
"""
from .dense_match import (
    dense_match,
    dense_match_reference,
    geometric_correspondence,
    grid_sample_coordinates,
    pixpro_loss,
    pixpro_loss_reference,
    pixpro_normalised_boxes,
    pixpro_positive_mask,
)
from .patch_gather import (
    patch_gather,
    patch_gather_reference,
    token_gather,
    token_gather_reference,
)
from .pixel_propagation import pixel_propagation, pixel_propagation_reference
from .queue_infonce import (
    queue_infonce,
    queue_infonce_reference,
)
from .relpos_embed import (
    absolute_sincos_table,
    relpos_coordinates,
    relpos_embed,
    relpos_embed_reference,
    relpos_query_embed,
    relpos_query_embed_reference,
)
from .unigrad_loss import (
    unigrad_covariance,
    unigrad_loss,
    unigrad_loss_reference,
)

__all__ = [
    "absolute_sincos_table",
    "dense_match",
    "dense_match_reference",
    "geometric_correspondence",
    "grid_sample_coordinates",
    "patch_gather",
    "patch_gather_reference",
    "pixel_propagation",
    "pixel_propagation_reference",
    "pixpro_loss",
    "pixpro_loss_reference",
    "pixpro_normalised_boxes",
    "pixpro_positive_mask",
    "queue_infonce",
    "queue_infonce_reference",
    "relpos_coordinates",
    "relpos_embed",
    "relpos_embed_reference",
    "relpos_query_embed",
    "relpos_query_embed_reference",
    "token_gather",
    "token_gather_reference",
    "unigrad_covariance",
    "unigrad_loss",
    "unigrad_loss_reference",
]
