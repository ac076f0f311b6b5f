"""MoCo-style queue InfoNCE (DENSE.md K1) without materialising the (M, K+1) logits.

queue_infonce(query, positive, queue, temperature, backend="auto") -> 0-d fp32 tensor
queue_infonce_grouped(query (G, M, D), positive (G, M, D), queues (Q, K, D), queue_index (G ints),
                      temperature) -> (G,) fp32: G terms, each against its own queue of the bank,
    in one forward and one backward launch (a third grid axis; densesim::queue_infonce_grouped).
    The single op is the grouped launch with G = Q = 1.

Shapes and dtypes
    query     (M, D)  the online embeddings, L2-normalised by the caller (the op does not normalise).
    positive  (M, D)  each row's positive key k+_i (momentum encoder output; DenseCL's matched
                      k_grid), L2-normalised.
    queue     (K, D)  the negatives, ONE KEY PER ROW, L2-normalised. MoCo/DenseCL keep the queue
                      as a (D, K) buffer of columns: pass `buffer.t()` (a strided view, no copy).
    temperature       a positive finite Python number (tau; DenseCL/MoCo v2: 0.2).
    Any float dtype (fp32/bf16/fp16; mixed dtypes allowed), any strides. Everything is accumulated
    in fp32 with autocast disabled, whatever the surrounding AMP does. Returns a 0-d fp32 tensor.

Maths (the official ContrastiveHead: cross-entropy of cat([l_pos, l_neg]) / tau with label 0)
    s_i0 = <q_i, k+_i>,   s_ij = <q_i, queue_j>  (j = 1..K),   x_ij = s_ij / tau
    lse_i = logsumexp_{j=0..K} x_ij
    L = (1/M) sum_i ( lse_i - x_i0 )
Gradient: to `query` only. `positive` and `queue` are constants (the momentum encoder's keys and
the queue carry no gradient in MoCo/DenseCL): they get no gradient even if they require grad.
    dL/dq_i = (1/(M tau)) ( sum_{j=0..K} p_ij v_j - k+_i ),   p_i = softmax_j(x_i),
    v_0 = k+_i, v_j = queue_j.   The gradient has query's dtype (and shape, contiguous).
Double backward is not supported. The backward re-reads query, positive and queue (saved, not
copied): enqueue into the queue buffer after the backward, as MoCo does (an in-place write
before it is caught by autograd's version check).

Registered ops (namespace densesim, torch.library.custom_op; fake implementations for
torch.compile / FakeTensor; the CPU and CUDA implementations are one function that runs the
reference maths, or the Triton launchers when use_triton is set):
    densesim::queue_infonce(query, positive, queue, temperature, use_triton) -> (row_loss, lse)
        row_loss (M,) fp32 = lse_i - x_i0; lse (M,) fp32 (the only thing saved for backward,
        besides the inputs themselves). Autograd through torch.library.register_autograd.
    densesim::queue_infonce_backward(query, positive, queue, lse, grad_loss, grad_lse,
                                     temperature, use_triton) -> grad_query
        grad_query_i = (1/tau) [ (grad_loss_i + grad_lse_i) sum_j p_ij v_j - grad_loss_i k+_i ]
        (grad_lse is the gradient reaching the lse output, usually zero.)
queue_infonce(backend="auto") calls the op with use_triton=True on CUDA tensors where triton
imports, and with use_triton=False (reference maths) otherwise; backend="triton" sets use_triton
on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the interpreter), and raises a
one-line RuntimeError anywhere else; backend="reference" runs queue_infonce_reference (plain torch
autograd, what the `compiled` benchmark compiles). Under autocast, call it as is: the op ignores
autocast and computes in fp32 (query may be a bf16 autocast output, the queue an fp32 buffer).
The row losses (e.g. for a weighted mean) are torch.ops.densesim.queue_infonce(...)[0].
"auto" on a device the ops do not serve (neither CPU, CUDA nor meta) runs queue_infonce_reference.
The ops are opaque inside a user's torch.compile (fullgraph=True works: the fake implementations
give the shapes, the backward is an op too); a temperature that changes between calls becomes a
SymFloat there, which the validation only compares (a guard, no graph break). A bad input raises
the same one-line ValueError under torch.compile (without fullgraph it propagates as is; with
fullgraph=True dynamo raises Unsupported "Observed exception" whose text contains the message).

No host sync (tests/host_sync.py counts them: zero, forward + backward, both implementations).
    The op has no value checks: the host validates shapes, dtypes, devices and the Python
    temperature only (never a tensor value), and raises before any launch. There is no index
    argument, so nothing needs a device-side check (no _check_on_device / torch._assert_async);
    the kernels mask every load and store by the row, key and feature bounds, so no input can
    make an out-of-bounds access.
    Nothing in forward or backward reads a value back (no .item(), no data-dependent shapes).
Edge inputs (tested against float64 on both implementations): M = 1, K = 1, D = 1; all logits
    negative (masked key padding is -inf, never a zero logit); identical queue keys (equal logits,
    an even softmax: the op has no argmax, so there is no tie to break) and identical query rows
    (equal row losses); stride-0, transposed and column-strided views; float64 inputs (fp32
    compute, the gradient in float64). M = 0 has no mean: a one-line ValueError ("query must have
    at least one row"), as is K = 0 and D = 0.
Less Python per launch: the launch plan (blocks, warps, stages, the queue split, dot precision,
    int64 offsets) is cached per shape by functools.lru_cache (_cached_launch_plan) keyed on plain
    values -- shapes, strides, dtypes, device type and index, the fp32 dot precision -- so a
    repeated step costs a dict lookup; _CONFIG is read when a plan is made (after editing it, call
    _cached_launch_plan.cache_clear()). The kernels take every input by its strides and dtype
    (no .contiguous() or dtype copies of query, positive, queue, nor of the backward's per-row
    vectors lse / grad_loss / grad_lse: the gradient of a sum arrives as a stride-0 expand and is
    read as it is). Contiguous per-row vectors (the usual case: row_loss.mean()) specialise to the
    same kernel as before.

Memory: the reference materialises cat([l_pos, l_neg]) / tau (M x (K+1) fp32), its log-softmax
for backward and a same-size gradient: about 3 x 4 M (K+1) bytes at peak. At DenseCL's dense term
with 256 images on one GPU, M = 49 * 256 = 12,544 rows and K = 65,536, the logits alone are
3.3 GB (411 MB at 32 images per GPU, M = 1,568). The Triton path never stores anything of size
M x K: its extra memory is O((M + K) D) -- the row statistics (a few floats per row), and in
backward, when the queue is split across programs, per-split fp32 partial gradients (S x M x D;
S shrinks as M grows, S = 1 once the row blocks fill 4 waves: on a 132-SM GPU 8 MB at M = 1,568
and 13 MB at M = 12,544).

Triton version (backend="triton", or "auto" on CUDA; D <= 256 -- "auto" runs the reference for a
larger D, "triton" raises)
    _qi_forward_kernel   grid (cdiv(M, BLOCK_M), S). A program holds BLOCK_M query rows (the
        whole feature dim, D padded to a power of two and masked) and streams its 1/S slice of the
        queue in BLOCK_K-row tiles: s = q k^T with tl.dot (fp32 accumulation), then a running max
        and running sum of exp (online logsumexp, flash-style, fp32, exp2 with log2(e)/tau folded
        into one multiply). The split-0 program also computes s_i0 = <q_i, k+_i> in fp32, writes
        it, and starts its running state from x_i0. Each program writes its slice's lse (natural
        log) to an (M, S) fp32 buffer; lse = logsumexp over S and row_loss = lse - s0/tau are
        tiny torch ops; the scalar is row_loss.mean().
    _qi_backward_kernel  grid (cdiv(M, BLOCK_M), S) with its own blocks. Recomputes each tile's s,
        p = exp(s/tau - lse) (masked keys -> 0), accumulates acc += p @ queue_tile with tl.dot
        (fp32 accumulator, BLOCK_M x D), scales by (grad_loss + grad_lse)/tau per row; split 0
        starts acc at p_i0 k+_i and subtracts grad_loss/tau k+_i at the end (fp32; k+ is read
        before and after the loop so that no fp32 tile stays live in it). With S = 1 it writes dq in
        query's dtype; otherwise fp32 partials (S, M, D) summed by one torch op. Deterministic
        (no atomics).
    S (the queue split) is chosen so that cdiv(M, BLOCK_M) * S fills whole waves of the GPU's SMs
    (at M = 1,568 the 13 row blocks alone would leave 90% of an H100/H200 idle).
    MMA operands: bf16/fp16 query and queue of the same dtype go to the tensor cores as they are
    (exact products, fp32 accumulation); p is rounded to that dtype for the dq MMA (the stored
    gradient is rounded to query's 16-bit dtype anyway). fp32 (or mixed-dtype) inputs are
    upcast to fp32 in registers and use _FP32_DOT_PRECISION on the GPU: "tf32x3" (three tf32
    MMAs per product, ~fp32 accuracy, ~1e-6 relative on the logits) -- an exact "ieee" FMA dot
    would be slower than the cuBLAS fp32 reference; set it to "ieee" to trade speed for the last
    bits. Under TRITON_INTERPRET=1 (CPU) every tile is upcast to fp32 right after tl.load (the
    interpreter's bf16 arithmetic is wrong), dots are exact fp32, and the bf16 rounding of p and
    of the stored gradient is emulated with integer ops, so the same sums are exercised.
    Launch parameters: _CONFIG (H100/H200 defaults; untuned, see the notes there).

Roofline (FLOPs and bytes the op must move)
    FLOPs: 2 M K D forward (s = q queue^T), 2 M K D backward recompute of s, 2 M K D for
    dq = p queue: 6 M K D in all (+ O(M K) exp). DenseCL dense term, M = 12,544, K = 65,536,
    D = 128: 211 GFLOP each, 632 GFLOP forward + backward; at M = 1,568: 79 GFLOP.
    Bytes from HBM: query, positive read once per pass, queue once (K D elem: 16 MiB bf16,
    32 MiB fp32 -- it fits in the 50 MB L2 of an H100/H200), dq written once. The queue is re-read
    once per row block from L2: cdiv(M, BLOCK_M) K D elem per pass (forward, BLOCK_M = 128:
    98 x 16 MiB = 1.6 GB at M = 12,544, bf16; the backward's 64-row blocks read twice that). So
    the op is compute-bound: the floor is 6 M K D / the MMA rate. The
    reference also moves ~5 x 4 M (K+1) bytes of logits through HBM (16 GB at M = 12,544).
    GPU goal (bench/test_queue_infonce.py, forward + backward): >= 3x the eager reference,
    >= 1.5x torch.compile of the reference, extra memory O((M + K) D).
"""
import functools
import math
import os

import torch
import torch.nn.functional as F_nn

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton
    import triton.language as tl
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
_OP = "queue_infonce"
# The devices the registered ops serve (CPU and CUDA implementations; meta through the fake ones)
_OP_DEVICES = ("cpu", "cuda", "meta")
_LOG2E = 1.4426950408889634
# The fp32 tl.dot precision on a GPU (fp32 or mixed-dtype inputs): "tf32x3" (~fp32 accuracy on
# the tensor cores) or "ieee" (exact fp32 FMA, several times slower). The interpreter is exact.
_FP32_DOT_PRECISION = "tf32x3"


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device, dim):
    """Called after validation. 'auto': Triton on CUDA tensors with D <= 256 where triton imports,
    else the reference. 'triton' runs the kernels on CUDA tensors, or on CPU tensors under the
    interpreter (TRITON_INTERPRET=1); anywhere else (or D > 256) it raises instead of silently
    running something else."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        fits = _TRITON_IMPORTABLE and device.type == "cuda" and dim <= _MAX_DIM
        return "triton" if fits else "reference"
    if dim > _MAX_DIM:
        raise RuntimeError(f"{op_name}: backend='triton' supports D <= {_MAX_DIM} (a whole feature row "
                           f"per query row in registers), got D = {dim}; use backend='auto' or 'reference'")
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which cannot be "
                           f"imported here; use backend='auto' or backend='reference'")
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return "triton"
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type} tensors); "
                       f"CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")


def _fp32_region(device):
    """Autocast off: the logits and the softmax are fp32 whatever the surrounding AMP does."""
    # Only CUDA and CPU autocast can be active around this code; other device types use the CPU one.
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _validate(op_name, query, positive, queue, temperature):
    """Shapes, dtypes, devices and the temperature only: never reads a tensor's values."""
    for name, value, rows in (("query", query, "M"), ("positive", positive, "M"),
                              ("queue", queue, "K")):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{op_name}: {name} must be a floating tensor (fp32/bf16/fp16), "
                             f"got {value.dtype}")
        if value.dim() != 2:
            raise ValueError(f"{op_name}: {name} must have shape ({rows}, D), "
                             f"got {tuple(value.shape)}")
    rows, dim = query.shape
    if rows == 0:
        raise ValueError(f"{op_name}: query must have at least one row (M > 0), got {tuple(query.shape)}")
    if dim == 0:
        raise ValueError(f"{op_name}: query must have a non-empty feature dim (D > 0), "
                         f"got {tuple(query.shape)}")
    if positive.shape[1] != dim:
        raise ValueError(f"{op_name}: positive must have the same D as query ({dim}), "
                         f"got {tuple(positive.shape)}")
    if positive.shape[0] != rows:
        raise ValueError(f"{op_name}: positive must have one row per query row (M = {rows}), "
                         f"got {tuple(positive.shape)}")
    if queue.shape[1] != dim:
        raise ValueError(f"{op_name}: queue must have shape (K, D) with D = {dim} as query (one key "
                         f"per row; pass a (D, K) buffer as buffer.t()), got {tuple(queue.shape)}")
    if queue.shape[0] == 0:
        raise ValueError(f"{op_name}: queue must hold at least one key (K > 0), got {tuple(queue.shape)}")
    for name, value in (("positive", positive), ("queue", queue)):
        if value.device != query.device:
            raise ValueError(f"{op_name}: {name} must be on the same device as query ({query.device}), "
                             f"got {value.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{op_name}: temperature must be a positive finite Python number, "
                         f"got {type(temperature).__name__}")
    # comparisons, not math.isfinite: inside torch.compile a float that changed between calls is
    # a SymFloat, which compares (a guard) but has no math.isfinite (a graph break); NaN fails both
    if not (0 < temperature < math.inf):
        raise ValueError(f"{op_name}: temperature must be a positive finite number, got {temperature!r}")


# ----------------------------------------------------------------------------------------------
# Reference (the definition; the CPU path)
# ----------------------------------------------------------------------------------------------

def queue_infonce_reference(query, positive, queue, temperature, *, extra_negative=None,
                            reduction="mean"):
    """Plain PyTorch definition, as the official ContrastiveHead computes it: the (M, K+1) logits
    cat([l_pos, l_neg]) / tau and cross-entropy with label 0, in fp32 (autocast off). Gradient to
    query only. Materialises the logits (that is what the Triton path avoids). With
    `extra_negative` (M,) the logits are cat([l_pos, extra, l_neg]) / tau (RegionCL's column)."""
    _validate("queue_infonce_reference", query, positive, queue, temperature)
    _validate_extras("queue_infonce_reference", query, extra_negative, reduction)
    with _fp32_region(query.device):
        q = query.to(torch.float32)
        keys = queue.detach().to(torch.float32)
        l_pos = (q * positive.detach().to(torch.float32)).sum(dim=1, keepdim=True)
        l_neg = q @ keys.t()
        columns = [l_pos] if extra_negative is None else [l_pos,
                                                          extra_negative.to(torch.float32)[:, None]]
        logits = torch.cat([*columns, l_neg], dim=1).div_(temperature)  # cat keeps no output
        labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F_nn.cross_entropy(logits, labels, reduction=reduction)


def _validate_extras(op_name, query, extra_negative, reduction):
    if reduction not in ("mean", "none"):
        raise ValueError(f"{op_name}: reduction must be 'mean' or 'none', got {reduction!r}")
    if extra_negative is None:
        return
    if not isinstance(extra_negative, torch.Tensor) or not extra_negative.is_floating_point():
        raise ValueError(f"{op_name}: extra_negative must be a floating tensor of shape (M,)")
    if tuple(extra_negative.shape) != (query.shape[0],):
        raise ValueError(f"{op_name}: extra_negative must have shape (M,) = ({query.shape[0]},), "
                         f"got {tuple(extra_negative.shape)}")
    if extra_negative.device != query.device:
        raise ValueError(f"{op_name}: extra_negative must be on {query.device}, got "
                         f"{extra_negative.device}")


def _reference_logits(query, positive, queue, temperature):
    """(x0 (M,), x (M, K)) fp32: the positive and the queue logits, divided by tau (no_grad use:
    the op's reference maths work in place, one M x K buffer)."""
    q = query.to(torch.float32)
    x0 = (q * positive.to(torch.float32)).sum(dim=1) / temperature
    x = (q @ queue.to(torch.float32).t()).div_(temperature)
    return x0, x


def _reference_forward(query, positive, queue, temperature):
    x0, x = _reference_logits(query, positive, queue, temperature)
    lse = torch.logaddexp(x0, torch.logsumexp(x, dim=1))
    return lse - x0, lse


def _reference_backward(query, positive, queue, lse, grad_loss, grad_lse, temperature):
    x0, x = _reference_logits(query, positive, queue, temperature)
    keys, pos = queue.to(torch.float32), positive.to(torch.float32)
    softmax_weight = (grad_loss + grad_lse) / temperature   # on sum_j p_ij v_j
    positive_weight = grad_loss / temperature               # on -k+_i
    p = x.sub_(lse[:, None]).exp_()
    p0 = torch.exp(x0 - lse)
    grad = softmax_weight[:, None] * (p0[:, None] * pos + p @ keys) - positive_weight[:, None] * pos
    return grad.to(query.dtype)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

# Launch parameters: H100/H200 defaults, NOT yet timed on a GPU. Each was compiled offline for
# sm_90 (triton 3.7, ptxas; recipe specialisation: unit feature stride, int32 offsets) and chosen
# among the variants tried for wgmma, no register spills and shared memory <= 227 KB, except the
# fp32 backward, which spills 8 bytes per thread at D <= 128 and ~1 KB at D > 128 in every variant
# tried. Keys: "16bit" (bf16/fp16 query and queue of one dtype: native tensor-core operands) and
# "fp32" (fp32 or mixed inputs: fp32 tiles, tf32x3 dots), each a pair for D <= 128 and D <= 256
# (the Triton path's limit, _MAX_DIM). Every tl.dot block is clamped to [16,
# next_power_of_2(extent)]; D is padded to a power of two (>= 16) and masked. The backward holds a
# BLOCK_M x D fp32 accumulator besides the s tile: at BLOCK_M = 128 it spills, so its row blocks
# are 64 (the queue is then re-read from L2 once per 64 rows).
# waves: the queue split S is chosen so that row blocks x S fill whole waves of SMs (at least
# one). interpret: the blocks and split under TRITON_INTERPRET=1 (small, so that the tests cross
# several row blocks, key tiles and splits at small shapes). Read when a launch plan is made:
# plans are cached per shape (_cached_launch_plan); call its cache_clear() after editing this.
# (Register counts re-checked offline for sm_90 after the backward began taking the per-row
# vectors by stride: unchanged for contiguous vectors; a stride-0 grad_loss adds 8 bytes of
# spill to the fp32 D <= 128 backward.)
_CONFIG = {
    "forward": {
        "16bit": ({"BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},   # 227 regs
                  {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2}),   # 236 regs
        "fp32": ({"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},      # 160 KB smem
                 {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}),     # 224 KB smem
    },
    "backward": {
        "16bit": ({"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2},    # 189 regs
                  {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2}),   # mma.sync
        "fp32": ({"BLOCK_M": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
                 {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 1}),     # spills
    },
    "waves": {"min_efficiency": 0.9, "max_factor": 4},
    "interpret": {"BLOCK_M": 32, "BLOCK_K": 32, "splits": 2},
}
# The Triton kernels hold a whole (padded) feature row per query row: D <= 256.
_MAX_DIM = 256

_SM_COUNT = {}


def _new_buffer(shape, dtype, device):
    """Every buffer the Triton path writes comes from here (uninitialised; the kernels overwrite
    all of it that is read later -- the tests poison it and record its sizes through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _sm_count(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


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


def _fp32_mma(query, queue):
    """True unless query and queue are bf16/fp16 of one dtype (then they are native MMA operands)."""
    return _fp32_mma_dtypes(query.dtype, queue.dtype)


def _fp32_mma_dtypes(query_dtype, queue_dtype):
    return not (query_dtype == queue_dtype and query_dtype in (torch.bfloat16, torch.float16))


def _launch_plan(phase, query, positive, queue):
    """The launch plan of one pass for these tensors -- query, positive (G, M, D) and the queue
    bank (Q, K, D) -- a cached lookup (_cached_launch_plan) keyed on plain Python values only: the
    shapes, strides, dtypes, the device and the fp32 dot precision. 2-D tensors are one group."""
    if query.dim() == 2:  # one group: query, positive (M, D), queue (K, D)
        query, positive, queue = query[None], positive[None], queue[None]
    device = query.device
    return _cached_launch_plan(phase, query.shape[1], queue.shape[1], query.shape[2],
                               query.dtype, queue.dtype, tuple(query.stride()[1:]),
                               tuple(positive.stride()[1:]), tuple(queue.stride()[1:]),
                               device.type, device.index, _FP32_DOT_PRECISION, query.shape[0])


@functools.lru_cache(maxsize=512)
def _cached_launch_plan(phase, rows, keys, dim, query_dtype, queue_dtype, query_strides,
                        positive_strides, queue_strides, device_type, device_index, fp32_precision,
                        groups=1):
    """Block sizes, launch parameters and the queue split for one pass, made once per shape (the
    step's shapes repeat, so the Python work of a launch is a dict lookup). The plan is shared:
    read it, never modify it. _CONFIG is read when a plan is first made: after editing it, call
    _cached_launch_plan.cache_clear()."""
    fp32 = _fp32_mma_dtypes(query_dtype, queue_dtype)
    interpret = device_type != "cuda"
    if interpret:
        cfg = dict(_CONFIG["interpret"], num_warps=4, num_stages=1)
    else:
        by_dim = _CONFIG[phase]["fp32" if fp32 else "16bit"]
        cfg = by_dim[0] if dim <= 128 else by_dim[1]
    block_m = max(16, min(cfg["BLOCK_M"], triton.next_power_of_2(rows)))
    block_k = max(16, min(cfg["BLOCK_K"], triton.next_power_of_2(keys)))
    row_blocks, tiles = triton.cdiv(rows, block_m), triton.cdiv(keys, block_k)
    if dim > _MAX_DIM:
        raise RuntimeError(f"{_OP}: the Triton kernels support D <= {_MAX_DIM}, got D = {dim}")
    if interpret:
        splits = min(tiles, cfg["splits"])
    else:
        splits = _queue_splits(row_blocks * groups, tiles,
                               _sm_count(torch.device(device_type, device_index)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty split
    if not fp32:
        precision = "tf32"  # unused: 16-bit operands
    else:
        precision = "ieee" if interpret else fp32_precision
    block_d = max(16, triton.next_power_of_2(dim))
    # the largest element offset any address can reach (padded rows/keys, backward partials)
    span = max(_max_offset(query_strides, block_m * row_blocks, block_d),
               _max_offset(positive_strides, block_m * row_blocks, block_d),
               _max_offset(queue_strides, block_k * tiles, block_d),
               (splits + 1) * block_m * row_blocks * dim)
    return dict(block_m=block_m, block_k=block_k, block_d=block_d, offsets_i64=span >= 2**31 - 1,
                row_blocks=row_blocks, splits=splits, tiles_per_split=tiles_per_split, fp32=fp32,
                precision=precision, interpret=interpret, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def _max_offset(strides, padded_rows, padded_dim):
    return padded_rows * abs(strides[0]) + padded_dim * abs(strides[1])


def _queue_splits(row_blocks, tiles, sm_count):
    """The smallest S with row_blocks * S >= one wave of SMs whose last wave is >= 90% full
    (else the best of the candidates tried); S = 1 once the row blocks alone fill several waves."""
    waves = _CONFIG["waves"]
    if row_blocks >= waves["max_factor"] * sm_count:
        return 1
    first = max(1, triton.cdiv(sm_count, row_blocks))
    best, best_efficiency = 1, 0.0
    for splits in range(first, min(tiles, waves["max_factor"] * first) + 1):
        splits = triton.cdiv(tiles, triton.cdiv(tiles, splits))
        programs = row_blocks * splits
        efficiency = programs / (triton.cdiv(programs, sm_count) * sm_count)
        if efficiency >= waves["min_efficiency"]:
            return splits
        if efficiency > best_efficiency:
            best, best_efficiency = splits, efficiency
    return best


if _TRITON_IMPORTABLE:

    @triton.jit
    def _qi_round_to_bf16_bits(x):
        """fp32 -> the nearest bf16 value (ties to even), kept as fp32: the GPU's cvt.rn.bf16.f32,
        emulated with integer ops for the interpreter (finite inputs only)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)

    @triton.jit
    def _qi_operand(x, FP32_MMA: tl.constexpr, INTERPRET: tl.constexpr):
        """A freshly loaded tile as an MMA operand: fp32 for the fp32 path and in the interpreter
        (whose bf16 arithmetic is wrong; the values are exact), else the 16-bit tile as it is."""
        if FP32_MMA or INTERPRET:
            y = x.to(tl.float32)
        else:
            y = x
        return y

    @triton.jit
    def _qi_round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 x rounded to nearest in `dtype`; under the interpreter kept as fp32 (bf16 rounding
        emulated: the interpreter's fp32 -> bf16 conversion truncates)."""
        if INTERPRET:
            if dtype == tl.bfloat16:
                y = _qi_round_to_bf16_bits(x)
            elif dtype == tl.float16:
                y = x.to(tl.float16).to(tl.float32)
            else:
                y = x
        else:
            y = x.to(dtype)
        return y

    @triton.jit
    def _qi_store_cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 x in the output dtype, rounded to nearest."""
        if INTERPRET and dtype == tl.bfloat16:
            x = _qi_round_to_bf16_bits(x)
        return x.to(dtype)

    @triton.jit
    def _qi_index(index, OFFSETS_I64: tl.constexpr):
        """Row/key indices for address arithmetic: int64 only when an offset can pass 2^31 (the
        int32 form saves the registers the backward's accumulator needs)."""
        if OFFSETS_I64:
            y = index.to(tl.int64)
        else:
            y = index
        return y

    @triton.jit
    def _qi_forward_kernel(q_ptr, pos_ptr, queue_ptr, queue_index_ptr, part_ptr, s0_ptr,
                           n_rows, n_keys, dim, stride_qg, stride_qm, stride_qd, stride_pg,
                           stride_pm, stride_pd, stride_kq, stride_kk, stride_kd, logit_scale2,
                           tiles_per_split, n_splits,
                           FP32_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           OFFSETS_I64: tl.constexpr, INTERPRET: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """BLOCK_M query rows of group program_id(2) against one slice of that group's queue (bank
        entry queue_index[group]): the slice's logsumexp per row."""
        split = tl.program_id(1)
        group = tl.program_id(2).to(tl.int64)   # scalar int64 bases; offsets inside stay int32
        q_ptr += group * stride_qg
        pos_ptr += group * stride_pg
        queue_ptr += tl.load(queue_index_ptr + group).to(tl.int64) * stride_kq
        part_ptr += group * n_rows * n_splits
        s0_ptr += group * n_rows
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        rows64 = _qi_index(rows, OFFSETS_I64)
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < dim
        q = tl.load(q_ptr + rows64[:, None] * stride_qm + dims[None, :] * stride_qd,
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        # running max (log2 units) and running sum of exp2, fp32
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if split == 0:  # the positive column: s0 in fp32, the start of this slice's running state
            pos = tl.load(pos_ptr + rows64[:, None] * stride_pm + dims[None, :] * stride_pd,
                          mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
            s0 = tl.sum(q.to(tl.float32) * pos, axis=1)
            tl.store(s0_ptr + rows, s0, mask=row_mask)
            m_i = s0 * logit_scale2
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        q = _qi_operand(q, FP32_MMA, INTERPRET)
        k_start = split * tiles_per_split * BLOCK_K
        k_stop = tl.minimum(n_keys, k_start + tiles_per_split * BLOCK_K)
        for k0 in range(k_start, k_stop, BLOCK_K):
            keys = k0 + tl.arange(0, BLOCK_K)
            key_mask = keys < n_keys
            k_tile = tl.load(queue_ptr + _qi_index(keys, OFFSETS_I64)[:, None] * stride_kk
                             + dims[None, :] * stride_kd,
                             mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
            k_tile = _qi_operand(k_tile, FP32_MMA, INTERPRET)
            s = tl.dot(q, tl.trans(k_tile), input_precision=DOT_PRECISION)
            x = tl.where(key_mask[None, :], s * logit_scale2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
            m_i = m_new
        # every slice holds at least one key, so m_i is finite and l_i >= 1
        tl.store(part_ptr + rows64 * n_splits + split, (m_i + tl.log2(l_i)) * 0.6931471805599453,
                 mask=row_mask)

    @triton.jit
    def _qi_backward_kernel(q_ptr, pos_ptr, queue_ptr, queue_index_ptr, lse_ptr, grad_loss_ptr,
                            grad_lse_ptr, out_ptr, n_rows, n_keys, dim, stride_qg, stride_qm,
                            stride_qd, stride_pg, stride_pm, stride_pd, stride_kq, stride_kk,
                            stride_kd, stride_lse_g, stride_lse, stride_gl_g, stride_gl,
                            stride_gs_g, stride_gs, logit_scale2, inv_temperature,
                            tiles_per_split, n_splits,
                            FP32_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr, PARTIAL: tl.constexpr,
                            OFFSETS_I64: tl.constexpr, INTERPRET: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """dq for BLOCK_M rows of group program_id(2) from one slice of its queue (plus the
        positive column in split 0)."""
        split = tl.program_id(1)
        group = tl.program_id(2).to(tl.int64)
        q_ptr += group * stride_qg
        pos_ptr += group * stride_pg
        queue_ptr += tl.load(queue_index_ptr + group).to(tl.int64) * stride_kq
        lse_ptr += group * stride_lse_g
        grad_loss_ptr += group * stride_gl_g
        grad_lse_ptr += group * stride_gs_g
        out_ptr += group * n_splits * n_rows * dim   # (G, S, M, D) partials or (G, M, D)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        rows64 = _qi_index(rows, OFFSETS_I64)
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < dim
        tile_mask = row_mask[:, None] & dim_mask[None, :]
        q = tl.load(q_ptr + rows64[:, None] * stride_qm + dims[None, :] * stride_qd,
                    mask=tile_mask, other=0.0)
        # the (M,) fp32 vectors by their strides (autograd's gradient of a sum is a stride-0
        # expand: no copy), with int64 offsets (three vector loads; a strided view may be large)
        lse2 = tl.load(lse_ptr + rows.to(tl.int64) * stride_lse, mask=row_mask, other=0.0) \
            * 1.4426950408889634
        # the positive column first (fp32), so that no fp32 copy of q or k+ stays live in the loop:
        # acc starts as p_i0 k+_i; "- grad_loss/tau k+_i" is added after the loop (k+ re-read)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if split == 0:
            pos = tl.load(pos_ptr + rows64[:, None] * stride_pm + dims[None, :] * stride_pd,
                          mask=tile_mask, other=0.0).to(tl.float32)
            s0 = tl.sum(q.to(tl.float32) * pos, axis=1)
            acc = tl.exp2(s0 * logit_scale2 - lse2)[:, None] * pos
        q = _qi_operand(q, FP32_MMA, INTERPRET)
        k_start = split * tiles_per_split * BLOCK_K
        k_stop = tl.minimum(n_keys, k_start + tiles_per_split * BLOCK_K)
        for k0 in range(k_start, k_stop, BLOCK_K):
            keys = k0 + tl.arange(0, BLOCK_K)
            key_mask = keys < n_keys
            k_tile = tl.load(queue_ptr + _qi_index(keys, OFFSETS_I64)[:, None] * stride_kk
                             + dims[None, :] * stride_kd,
                             mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
            k_tile = _qi_operand(k_tile, FP32_MMA, INTERPRET)
            s = tl.dot(q, tl.trans(k_tile), input_precision=DOT_PRECISION)
            p = tl.where(key_mask[None, :], tl.exp2(s * logit_scale2 - lse2[:, None]), 0.0)
            if FP32_MMA:
                acc = tl.dot(p, k_tile, acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(_qi_round(p, queue_ptr.dtype.element_ty, INTERPRET), k_tile, acc)
        rows_i64 = rows.to(tl.int64)
        grad_loss = tl.load(grad_loss_ptr + rows_i64 * stride_gl, mask=row_mask, other=0.0)
        grad_lse = tl.load(grad_lse_ptr + rows_i64 * stride_gs, mask=row_mask, other=0.0)
        acc = acc * ((grad_loss + grad_lse) * inv_temperature)[:, None]
        if split == 0:
            pos = tl.load(pos_ptr + rows64[:, None] * stride_pm + dims[None, :] * stride_pd,
                          mask=tile_mask, other=0.0).to(tl.float32)
            acc -= (grad_loss * inv_temperature)[:, None] * pos
        offsets = rows64[:, None] * dim + dims[None, :]
        if PARTIAL:  # fp32 partials (S, M, D), summed on the host side by one torch op
            tl.store(out_ptr + _qi_index(split, OFFSETS_I64) * n_rows * dim + offsets, acc,
                     mask=tile_mask)
        else:
            tl.store(out_ptr + offsets, _qi_store_cast(acc, out_ptr.dtype.element_ty, INTERPRET),
                     mask=tile_mask)


@functools.lru_cache(maxsize=64)
def _index_tensor(index, device_type, device_index):
    """The queue index of each group as a device int32 tensor, made once per (index, device): a
    repeated step launches with no host-to-device copy."""
    return torch.tensor(index, dtype=torch.int32, device=torch.device(device_type, device_index))


def _triton_forward(query, positive, queue, temperature):
    """(row_loss, lse), (M,) fp32 each: one group, the grouped launch with G = Q = 1."""
    row_loss, lse = _triton_forward_grouped(
        query[None], positive[None], queue[None],
        _index_tensor((0,), query.device.type, query.device.index), temperature)
    return row_loss[0], lse[0]


def _triton_forward_grouped(query, positive, queues, queue_index, temperature):
    """(row_loss, lse), (G, M) fp32 each, from one launch of the fused forward kernel over all G
    groups (query, positive (G, M, D); queues (Q, K, D); queue_index (G,) int32 on the device);
    nothing of size M x K."""
    groups, rows, dim = query.shape
    plan = _launch_plan("forward", query, positive, queues)
    splits = plan["splits"]
    parts = _new_buffer((groups, rows, splits), torch.float32, query.device)
    s0 = _new_buffer((groups, rows), torch.float32, query.device)
    _qi_forward_kernel[(plan["row_blocks"], plan["splits"], groups)](
        query, positive, queues, queue_index, parts, s0, rows, queues.shape[1], dim,
        query.stride(0), query.stride(1), query.stride(2), positive.stride(0), positive.stride(1),
        positive.stride(2), queues.stride(0), queues.stride(1), queues.stride(2),
        _LOG2E / temperature, plan["tiles_per_split"], splits, FP32_MMA=plan["fp32"],
        DOT_PRECISION=plan["precision"], OFFSETS_I64=plan["offsets_i64"],
        INTERPRET=plan["interpret"], BLOCK_M=plan["block_m"], BLOCK_K=plan["block_k"],
        BLOCK_D=plan["block_d"], num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    lse = torch.logsumexp(parts, dim=2) if splits > 1 else parts[:, :, 0]
    return lse - s0 * (1.0 / temperature), lse


def _triton_backward(query, positive, queue, lse, grad_loss, grad_lse, temperature):
    """dL/dquery (M, D) in query's dtype: one group of the grouped backward."""
    return _triton_backward_grouped(
        query[None], positive[None], queue[None],
        _index_tensor((0,), query.device.type, query.device.index), lse[None], grad_loss[None],
        grad_lse[None], temperature)[0]


def _triton_backward_grouped(query, positive, queues, queue_index, lse, grad_loss, grad_lse,
                             temperature):
    """dL/dquery (G, M, D) in query's dtype from one launch of the fused backward kernel (tiles
    recomputed); lse, grad_loss, grad_lse (G, M) fp32, any strides."""
    groups, rows, dim = query.shape
    plan = _launch_plan("backward", query, positive, queues)
    splits = plan["splits"]
    partial = splits > 1
    if partial:
        out = _new_buffer((groups, splits, rows, dim), torch.float32, query.device)
    else:
        out = _new_buffer((groups, rows, dim), query.dtype, query.device)
    _qi_backward_kernel[(plan["row_blocks"], splits, groups)](
        query, positive, queues, queue_index, lse, grad_loss, grad_lse, out, rows,
        queues.shape[1], dim, query.stride(0), query.stride(1), query.stride(2),
        positive.stride(0), positive.stride(1), positive.stride(2), queues.stride(0),
        queues.stride(1), queues.stride(2), lse.stride(0), lse.stride(1), grad_loss.stride(0),
        grad_loss.stride(1), grad_lse.stride(0), grad_lse.stride(1), _LOG2E / temperature,
        1.0 / temperature, plan["tiles_per_split"], splits, FP32_MMA=plan["fp32"],
        DOT_PRECISION=plan["precision"], PARTIAL=partial, OFFSETS_I64=plan["offsets_i64"],
        INTERPRET=plan["interpret"], BLOCK_M=plan["block_m"], BLOCK_K=plan["block_k"],
        BLOCK_D=plan["block_d"], num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    return out.sum(dim=1).to(query.dtype) if partial else out


def _row_vector(value, rows, device):
    """A per-row gradient as an (M,) fp32 tensor, any stride (zeros when autograd gives None). The
    gradient of row_loss.sum() arrives as a stride-0 expand: the kernel reads it by its stride,
    no copy (and .to is a no-op on the fp32 gradients of the op's fp32 outputs)."""
    if value is None:
        return torch.zeros(rows, dtype=torch.float32, device=device)
    return value.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library): fake implementations, autograd, CPU/CUDA implementations
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("densesim::queue_infonce", mutates_args=(), device_types=("cpu", "cuda"))
def _queue_infonce_op(query: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor,
                      temperature: float, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_loss, lse), (M,) fp32 each. use_triton: the Triton kernels (CUDA, or CPU under
    TRITON_INTERPRET=1), else the reference maths (the CPU implementation)."""
    with _fp32_region(query.device), torch.no_grad():
        if use_triton:
            with _on_device(query.device):
                return _triton_forward(query, positive, queue, temperature)
        return _reference_forward(query, positive, queue, temperature)


@_queue_infonce_op.register_fake
def _queue_infonce_fake(query, positive, queue, temperature, use_triton):
    rows = query.shape[0]
    return (query.new_empty((rows,), dtype=torch.float32),
            query.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("densesim::queue_infonce_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _queue_infonce_backward_op(query: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor,
                               lse: torch.Tensor, grad_loss: torch.Tensor, grad_lse: torch.Tensor,
                               temperature: float, use_triton: bool) -> torch.Tensor:
    """grad_query (M, D) in query's dtype, contiguous (see the module docstring)."""
    with _fp32_region(query.device), torch.no_grad():
        if use_triton:
            with _on_device(query.device):
                return _triton_backward(query, positive, queue, lse.to(torch.float32),
                                        grad_loss.to(torch.float32), grad_lse.to(torch.float32),
                                        temperature)
        return _reference_backward(query, positive, queue, lse.to(torch.float32),
                                   grad_loss.to(torch.float32), grad_lse.to(torch.float32),
                                   temperature)


@_queue_infonce_backward_op.register_fake
def _queue_infonce_backward_fake(query, positive, queue, lse, grad_loss, grad_lse, temperature,
                                 use_triton):
    return query.new_empty(query.shape)


def _setup_context(ctx, inputs, output):
    query, positive, queue, temperature, use_triton = inputs
    _, lse = output
    ctx.save_for_backward(query, positive, queue, lse)
    ctx.temperature = temperature
    ctx.use_triton = use_triton


def _backward(ctx, grad_loss, grad_lse):
    query, positive, queue, lse = ctx.saved_tensors
    grad_query = None
    if ctx.needs_input_grad[0]:
        rows = query.shape[0]
        grad_query = _queue_infonce_backward_op(
            query, positive, queue, lse, _row_vector(grad_loss, rows, query.device),
            _row_vector(grad_lse, rows, query.device), ctx.temperature, ctx.use_triton)
    # positive and queue are constants (no gradient, by definition of the op)
    return grad_query, None, None, None, None


torch.library.register_autograd("densesim::queue_infonce", _backward, setup_context=_setup_context)


def queue_infonce(query, positive, queue, temperature, backend="auto", *, extra_negative=None,
                  reduction="mean"):
    """MoCo/DenseCL queue InfoNCE, mean over the M rows (0-d fp32); gradient to query only.

    extra_negative (M,), optional: one more negative similarity per row, <q_i, e_i> (not divided
    by tau), placed beside the positive -- RegionCL's "other region of the same composite" (its
    gradient reaches whatever made it; detach the key side as RegionCL does). The kernels still
    never store the (M, K) logits: the row loss is logaddexp(lse_i, e_i / tau) - x_i0, from the
    op's per-row lse (which carries a gradient) and x_i0 = <q_i, k+_i> / tau.
    reduction: "mean" (0-d) or "none" (the (M,) row losses, e.g. for a masked mean).

    backend="auto": densesim::queue_infonce with the Triton kernels on CUDA tensors (D <= 256,
    triton importable), with the reference maths otherwise; "triton": the kernels or a one-line
    RuntimeError; "reference": queue_infonce_reference (plain autograd). Validation (one-line
    ValueError) reads no tensor value and comes before any launch; nothing here syncs the host.
    See the module docstring for shapes, maths, edge inputs and backends."""
    _check_backend_name(_OP, backend)
    _validate(_OP, query, positive, queue, temperature)
    _validate_extras(_OP, query, extra_negative, reduction)
    use_triton = _select_backend(_OP, backend, query.device, query.shape[1]) == "triton"
    if backend == "reference" or query.device.type not in _OP_DEVICES:
        # the plain-autograd definition (and "auto" on a device the registered op does not serve)
        return queue_infonce_reference(query, positive, queue, temperature,
                                       extra_negative=extra_negative, reduction=reduction)
    # "auto" without Triton: the same op with its reference maths (saves only lse, like Triton)
    row_loss, lse = _queue_infonce_op(query, positive.detach(), queue.detach(),
                                      float(temperature), use_triton)
    if extra_negative is not None:
        with _fp32_region(query.device):
            x0 = (query.to(torch.float32) * positive.detach().to(torch.float32)).sum(dim=1)
            row_loss = torch.logaddexp(lse, extra_negative.to(torch.float32) / temperature) \
                - x0 / temperature
    return row_loss.mean() if reduction == "mean" else row_loss


# ----------------------------------------------------------------------------------------------
# Several queues in one launch (DetCo's twelve terms)
# ----------------------------------------------------------------------------------------------

def _validate_grouped(op_name, query, positive, queues, queue_index, temperature):
    """(G, M, D) query/positive, a (Q, K, D) queue bank and G Python ints in [0, Q)."""
    for name, value, shape in (("query", query, "(G, M, D)"), ("positive", positive, "(G, M, D)"),
                               ("queues", queues, "(Q, K, D)")):
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{op_name}: {name} must be a tensor of shape {shape}, got {got}")
    if tuple(positive.shape) != tuple(query.shape):
        raise ValueError(f"{op_name}: positive must have query's shape {tuple(query.shape)}, got "
                         f"{tuple(positive.shape)}")
    if not isinstance(queue_index, (list, tuple)) or \
            any(isinstance(i, bool) or not isinstance(i, int) for i in queue_index):
        raise ValueError(f"{op_name}: queue_index must be a list or tuple of Python ints (one per "
                         f"group), got {queue_index!r}")
    if len(queue_index) != query.shape[0]:
        raise ValueError(f"{op_name}: queue_index must name one queue per group (G = "
                         f"{query.shape[0]}), got {len(queue_index)}")
    if any(not 0 <= i < queues.shape[0] for i in queue_index):
        raise ValueError(f"{op_name}: queue_index entries must be in [0, {queues.shape[0]}), got "
                         f"{list(queue_index)}")
    if query.shape[0] == 0:
        raise ValueError(f"{op_name}: at least one group is needed (G > 0)")
    # the per-group rules are the single op's (M, K, D > 0, dtypes, devices, temperature)
    _validate(op_name, query[0], positive[0], queues[0], temperature)


def queue_infonce_grouped_reference(query, positive, queues, queue_index, temperature, *,
                                    reduction="mean"):
    """The definition: queue_infonce_reference per group g with queues[queue_index[g]], stacked
    ((G,) means, or (G, M) row losses with reduction="none"). Plain autograd."""
    _validate_grouped("queue_infonce_grouped_reference", query, positive, queues, queue_index,
                      temperature)
    return torch.stack([queue_infonce_reference(query[g], positive[g], queues[i], temperature,
                                                reduction=reduction)
                        for g, i in enumerate(queue_index)])


def _reference_forward_grouped(query, positive, queues, queue_index, temperature):
    keys = queues.to(torch.float32).index_select(0, queue_index.long())        # (G, K, D)
    q = query.to(torch.float32)
    x0 = (q * positive.to(torch.float32)).sum(dim=2) / temperature
    x = torch.bmm(q, keys.transpose(1, 2)).div_(temperature)
    lse = torch.logaddexp(x0, torch.logsumexp(x, dim=2))
    return lse - x0, lse


def _reference_backward_grouped(query, positive, queues, queue_index, lse, grad_loss, grad_lse,
                                temperature):
    keys = queues.to(torch.float32).index_select(0, queue_index.long())
    q, pos = query.to(torch.float32), positive.to(torch.float32)
    x0 = (q * pos).sum(dim=2) / temperature
    p = torch.bmm(q, keys.transpose(1, 2)).div_(temperature).sub_(lse[..., None]).exp_()
    p0 = torch.exp(x0 - lse)
    softmax_weight = (grad_loss + grad_lse) / temperature
    grad = softmax_weight[..., None] * (p0[..., None] * pos + torch.bmm(p, keys)) \
        - (grad_loss / temperature)[..., None] * pos
    return grad.to(query.dtype)


@torch.library.custom_op("densesim::queue_infonce_grouped", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _queue_infonce_grouped_op(query: torch.Tensor, positive: torch.Tensor, queues: torch.Tensor,
                              queue_index: torch.Tensor, temperature: float,
                              use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_loss, lse), (G, M) fp32 each; queue_index (G,) int32 on the device."""
    with _fp32_region(query.device), torch.no_grad():
        if use_triton:
            with _on_device(query.device):
                return _triton_forward_grouped(query, positive, queues, queue_index, temperature)
        return _reference_forward_grouped(query, positive, queues, queue_index, temperature)


@_queue_infonce_grouped_op.register_fake
def _queue_infonce_grouped_fake(query, positive, queues, queue_index, temperature, use_triton):
    shape = query.shape[:2]
    return (query.new_empty(shape, dtype=torch.float32),
            query.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("densesim::queue_infonce_grouped_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _queue_infonce_grouped_backward_op(query: torch.Tensor, positive: torch.Tensor,
                                       queues: torch.Tensor, queue_index: torch.Tensor,
                                       lse: torch.Tensor, grad_loss: torch.Tensor,
                                       grad_lse: torch.Tensor, temperature: float,
                                       use_triton: bool) -> torch.Tensor:
    """grad_query (G, M, D) in query's dtype."""
    with _fp32_region(query.device), torch.no_grad():
        args = (lse.to(torch.float32), grad_loss.to(torch.float32), grad_lse.to(torch.float32))
        if use_triton:
            with _on_device(query.device):
                return _triton_backward_grouped(query, positive, queues, queue_index, *args,
                                                temperature)
        return _reference_backward_grouped(query, positive, queues, queue_index, *args,
                                           temperature)


@_queue_infonce_grouped_backward_op.register_fake
def _queue_infonce_grouped_backward_fake(query, positive, queues, queue_index, lse, grad_loss,
                                         grad_lse, temperature, use_triton):
    return query.new_empty(query.shape)


def _setup_context_grouped(ctx, inputs, output):
    query, positive, queues, queue_index, temperature, use_triton = inputs
    ctx.save_for_backward(query, positive, queues, queue_index, output[1])
    ctx.temperature, ctx.use_triton = temperature, use_triton


def _grouped_vector(value, like):
    return torch.zeros_like(like) if value is None else value.to(torch.float32)


def _backward_grouped(ctx, grad_loss, grad_lse):
    query, positive, queues, queue_index, lse = ctx.saved_tensors
    grad_query = None
    if ctx.needs_input_grad[0]:
        grad_query = _queue_infonce_grouped_backward_op(
            query, positive, queues, queue_index, lse, _grouped_vector(grad_loss, lse),
            _grouped_vector(grad_lse, lse), ctx.temperature, ctx.use_triton)
    return grad_query, None, None, None, None, None


torch.library.register_autograd("densesim::queue_infonce_grouped", _backward_grouped,
                                setup_context=_setup_context_grouped)


def queue_infonce_grouped(query, positive, queues, queue_index, temperature, backend="auto", *,
                          reduction="mean"):
    """G queue-InfoNCE terms in one launch (forward and backward): term g is
    queue_infonce(query[g], positive[g], queues[queue_index[g]], temperature).

    query, positive (G, M, D); queues (Q, K, D), a bank of Q queues of K keys each (one key per
    row; several terms may share a queue, as DetCo's local-to-global term shares the global
    queue of its level); queue_index: G Python ints in [0, Q) (host structure, validated on the
    host; made into a device tensor once per value and device, no copy per step). Returns the
    (G,) per-term means (fp32), or the (G, M) row losses with reduction="none". Gradient to query
    only; same maths, dtypes, backends and no-host-sync guarantees as queue_infonce. The Triton
    launch adds the groups as a third grid axis, so the twelve small DetCo terms (M = batch) fill
    the GPU together where twelve separate launches would each leave most SMs idle; the queue
    split is chosen for row blocks x G programs. The reference maths index_select the bank into
    (G, K, D) and use batched matmuls (G x M x K logits, as twelve separate calls would)."""
    op = "queue_infonce_grouped"
    _check_backend_name(op, backend)
    _validate_grouped(op, query, positive, queues, queue_index, temperature)
    if reduction not in ("mean", "none"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'none', got {reduction!r}")
    use_triton = _select_backend(op, backend, query.device, query.shape[2]) == "triton"
    if backend == "reference" or query.device.type not in _OP_DEVICES:
        return queue_infonce_grouped_reference(query, positive, queues, queue_index, temperature,
                                               reduction=reduction)
    index = _index_tensor(tuple(queue_index), query.device.type, query.device.index)
    row_loss, _ = _queue_infonce_grouped_op(query, positive.detach(), queues.detach(), index,
                                            float(temperature), use_triton)
    return row_loss.mean(dim=1) if reduction == "mean" else row_loss
