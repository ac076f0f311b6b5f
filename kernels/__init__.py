"""Hot-path ops for dense self-supervised pre-training, one op per file.

Each `kernels/<op>.py` stands alone (imports only torch, and triton where available), so a single
file can be copied into another codebase. Every public op takes `backend="auto" | "reference" |
"triton"`: "auto" runs the Triton kernel on CUDA tensors (where triton is importable) and the
PyTorch reference otherwise; "triton" runs the kernel or raises a one-line error, never falling
back silently (CPU tensors are accepted under TRITON_INTERPRET=1, the interpreter).

Every op is also a registered torch op (`torch.ops.densesim.<name>`, torch.library.custom_op): a
fake implementation (so it traces inside a user's `torch.compile(fullgraph=True)` as one opaque
node), its backward a registered op joined by `register_autograd`, the reference maths as the CPU
implementation and the Triton launchers on CUDA. "auto"/"triton" call the op; "reference" runs the
plain-autograd `<op>_reference` (what inductor can fuse, and what `--no-fused` runs). No op reads a
tensor value on the host: shape/dtype/device errors are `ValueError`s raised before any launch,
and value checks (index range, finite geometry, positive sizes) run on the device
(`torch._assert_async`; on CPU tensors they raise the same `ValueError` at once).
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
from .linear_sum_assignment import (
    batched_linear_sum_assignment,
    batched_linear_sum_assignment_reference,
    linear_sum_assignment,
)
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from .patch_gather import (
    patch_gather,
    patch_gather_reference,
    token_gather,
    token_gather_reference,
)
from .pixel_propagation import pixel_propagation, pixel_propagation_reference
from .queue_infonce import (
    queue_infonce,
    queue_infonce_grouped,
    queue_infonce_grouped_reference,
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
from .roi_align import roi_align, roi_align_reference
from .sinkhorn import sinkhorn, sinkhorn_reference
from .unigrad_loss import (
    unigrad_covariance,
    unigrad_loss,
    unigrad_loss_reference,
)

__all__ = [
    "absolute_sincos_table",
    "batched_linear_sum_assignment",
    "batched_linear_sum_assignment_reference",
    "dense_match",
    "dense_match_reference",
    "geometric_correspondence",
    "grid_sample_coordinates",
    "linear_sum_assignment",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "patch_gather",
    "patch_gather_reference",
    "pixel_propagation",
    "pixel_propagation_reference",
    "pixpro_loss",
    "pixpro_loss_reference",
    "pixpro_normalised_boxes",
    "pixpro_positive_mask",
    "queue_infonce",
    "queue_infonce_grouped",
    "queue_infonce_grouped_reference",
    "queue_infonce_reference",
    "relpos_coordinates",
    "relpos_embed",
    "relpos_embed_reference",
    "relpos_query_embed",
    "relpos_query_embed_reference",
    "roi_align",
    "roi_align_reference",
    "sinkhorn",
    "sinkhorn_reference",
    "token_gather",
    "token_gather_reference",
    "unigrad_covariance",
    "unigrad_loss",
    "unigrad_loss_reference",
]
