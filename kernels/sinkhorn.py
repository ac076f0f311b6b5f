"""SwAV's Sinkhorn-Knopp codes (DENSE.md K5 and section 5 "Sinkhorn"), log-domain and overflow-safe.

sinkhorn(scores, epsilon=0.05, iterations=3, *, process_group=None, backend="auto") -> Q (R, K)

Shapes and dtypes
    scores   (R, K)  prototype scores of R samples against K prototypes (SwAV: z @ C^T, cosines in
                     [-1, 1]; R = bs rows, or queue + bs rows, per GPU; K = 3000). Any float dtype
                     (fp32/bf16/fp16/fp64), any strides; assumed finite (not checked: no host sync).
    epsilon          a positive finite Python number (SwAV: 0.05).
    iterations       a Python int >= 1 (SwAV: 3).
    Returns Q (R, K), contiguous: fp32 for fp32/bf16/fp16 scores, float64 for float64 scores (the
    reference maths in float64; the Triton kernels are fp32). Each row sums to 1 (a soft
    assignment of the sample to the prototypes). Autocast is ignored: everything is fp32 inside.

No gradient. SwAV runs it under torch.no_grad: the codes are targets. The result is always
detached (requires_grad False, whatever `scores` requires), so calling backward through it is
autograd's usual "does not require grad" error. The registered ops have no autograd formula.

Maths: exactly SwAV's `distributed_sinkhorn` (spec/OFFICIAL.md section 4), which in SwAV's
notation, with Q of shape (K, B_local), is
    Q = exp(scores / eps)^T;  Q /= allreduce(sum Q)
    repeat `iterations` times:
        Q /= allreduce(Q.sum(dim=1)) ; Q /= K     (rows = prototypes: each sums to 1/K)
        Q /= Q.sum(dim=0)            ; Q /= B     (columns = samples, local: each sums to 1/B)
    return (Q * B)^T                              (B = R * world_size)
Written as Q_kb = exp(L_bk + g_k + h_b) with L = scores / eps, every normalisation only changes
the prototype scale g (row steps) or the sample scale h (column steps), and constants cancel:
    g_k  = -logsumexp_b(L_bk)                                      (the first row step; the
                                                                   initial global sum is a constant)
    repeat iterations - 1 times:  P = softmax_k(L + g)  (the column step, per sample)
                                  g_k -= log( (K / B) sum_b P_bk ) (the next row step: SwAV's
                                      rows, with columns of mass 1/B, scaled to sum to 1/K)
    return softmax_k(L + g)                                        (the last column step, times B)
(Distributed, each rank's sum_b P_bk is weighted K / (R_rank world) before the all-reduce: SwAV's
column mass 1/B_rank. The K / B keeps g from drifting by log(B / K) per iteration, which would
cost fp32 accuracy over many iterations; any constant in g cancels in the softmax.)
This is the algorithm (the two are equal in exact arithmetic, for any R per rank); it is never
exp(L) itself. Every exponent is <= 0 after a max shift, so it does not overflow where SwAV's
exp(scores / eps) does (|scores| > ~4.4 at eps = 0.05 in fp32, ~35 in float64, ~0.55 in fp16), and
prototypes no sample favours keep their exact weight (a single global max shift would underflow
them to 0/0 at eps = 0.05 and |scores| ~ 5). The sums of the later row steps need no shift: after
a column step sum_b P_bk lies in [1/K, B] (P's rows sum to 1; SwAV's prototype rows summed to 1/K
just before), so no sum underflows. Accuracy: fp32 rounding of L and g, about |L| * 2^-23
relative (~1e-6 for cosine scores at eps = 0.05, ~1e-4 at |scores| = 50); rows sum to 1 within a
few fp32 ulps.

Distributed (torch.distributed initialised and `process_group` -- the default group if None --
has more than one rank): the prototype sums are over all ranks' samples, the per-sample
normalisation is local, as in SwAV. Collectives, each over K floats: one MAX all-reduce and one
SUM all-reduce for the first row step (per-prototype max, then the sum of exp(L - max)), then one
SUM all-reduce per later row step: iterations + 1 in all (SwAV: 1 scalar + iterations x K). They
run in the public function between the registered stage ops below (never inside an op), so ranks
may hold different R (each sample then weighs 1/(R_rank * world), as in SwAV). backend="reference"
runs sinkhorn_reference with the same collectives.

Registered ops (namespace densesim, torch.library.custom_op, device_types cpu and cuda; fake
implementations for torch.compile / FakeTensor; one function per op runs the reference maths, or
the Triton launchers when use_triton is set; none has an autograd formula (no gradient)):
    densesim::sinkhorn(scores, epsilon, iterations, use_triton) -> Q (R, K)
        the whole single-process algorithm (one launch when it fits, see below).
    densesim::sinkhorn_col_stats(scores, epsilon, use_triton) -> (max_b L_bk, sum_b exp(L_bk - max))
        (K,) each, this rank's half of the first row step.
    densesim::sinkhorn_row_sums(scores, log_scale, epsilon, use_triton) -> sum_b softmax_k(L+g)_bk
        (K,), this rank's half of a later row step (log_scale = g, (K,) fp32).
    densesim::sinkhorn_assign(scores, log_scale, epsilon, use_triton) -> softmax_k(L + g)  (R, K)
sinkhorn(backend="auto") calls the ops with use_triton=True on CUDA tensors where triton imports
(and fp16/bf16/fp32 scores), with the reference maths otherwise; backend="triton" sets use_triton on
CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1, and raises a one-line RuntimeError
anywhere else (and for float64 scores: the kernels are fp32); backend="reference" runs
sinkhorn_reference (plain torch). "auto" on a device the ops do not serve runs sinkhorn_reference.
Bad input (not a float 2-D tensor, R or K = 0, epsilon not a positive finite number, iterations
not an int >= 1, an unknown backend) raises a one-line ValueError before any launch, also under
torch.compile (fullgraph=True: inside dynamo's "Observed exception"). There is no index or value
argument, so nothing needs a device-side check (no _check_on_device): the kernels mask every load
and store by the row and prototype bounds.

No host sync: nothing reads a tensor value back (no .item(), no data-dependent shape), in the
single-process op and in the distributed loop (the collectives are asynchronous on CUDA).
Less Python per launch: the launch plan is cached per shape (_cached_launch_plan, lru_cache keyed on
shapes, strides and device); _CONFIG is read when a plan is made (after editing it, call
_cached_launch_plan.cache_clear()). Scores are read by their strides and dtype (no copies).

Triton version (all fp32 in registers, tiles upcast right after tl.load; exp2/log2 with log2(e)/eps
folded into one multiply)
    _sk_fused_kernel  ONE program, ONE launch for the whole single-process algorithm when K <=
        _CONFIG["fused"]["max_keys"] and R K <= ["max_elements"] (SwAV's 64 x 3000 per crop: the
        matrix stays in L2). The prototype vectors (g, running max / sums, row sums) live in
        registers; the program streams BLOCK_R x K tiles iterations + 1 times (online column
        logsumexp; then per tile the row softmax and its column sums; then the output).
    Otherwise, and in the distributed stages (a few launches; the all-reduces go between them):
    _sk_cols_kernel   grid cdiv(K, BLOCK_K): per prototype, online max and sum of exp2 down all rows
        (single process: g written directly).
    _sk_rows_kernel   grid cdiv(R, BLOCK_R): per sample, the online logsumexp over K of L + g, then
        softmax_k(L + g): written (ASSIGN, the output) or summed over the block's rows into per-block
        partial prototype sums (P, K) fp32 (deterministic, no atomics).
    _sk_update_kernel grid cdiv(K, BLOCK_K): g -= log(K/R sum of the partials) (single process; the
        distributed stage sums the partials, all-reduces, and updates g in torch).
    Single process: 1 launch (fused) or 2 * iterations launches (split); distributed: 2 * iterations
    launches plus the collectives and a few tiny torch ops on (K,) vectors.
    Under TRITON_INTERPRET=1 (CPU) the blocks are small (_CONFIG["interpret"]) so the tests cross
    several row blocks and key chunks.

Roofline (bytes and FLOPs the op must move)
    Bytes: the scores read once and Q written once: R K (e + 4) bytes (e = 2 for bf16, 4 for fp32)
    -- 1.5 MB for SwAV's fp32 64 x 3000 per crop, 24.6 MB at 1,024 x 3000 (64 + 960 queue rows);
    the kernels re-read the scores iterations + 1 times, from L2 at these sizes. FLOPs: ~10 R K
    per pass (an exp2, max, sums), negligible. So the op is latency-bound (launches, and across
    GPUs the chain of tiny all-reduces): the single-process goal is one launch, and on many GPUs
    iterations + 1 collectives of K floats. The eager reference runs ~10 kernels per iteration;
    SwAV's loop ~8 plus its all-reduces. bench/test_sinkhorn.py measures them.
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
_OP = "sinkhorn"
# The devices the registered ops serve (CPU and CUDA implementations; meta through the fake ones)
_OP_DEVICES = ("cpu", "cuda", "meta")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device, dtype):
    """Called after validation. 'auto': Triton on CUDA tensors (fp16/bf16/fp32 scores) where triton
    imports, else the reference maths. 'triton' runs the kernels on CUDA tensors, or on CPU tensors
    under the interpreter (TRITON_INTERPRET=1); anywhere else it raises, never falling back."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        fits = _TRITON_IMPORTABLE and device.type == "cuda" and dtype != torch.float64
        return "triton" if fits else "reference"
    if dtype == torch.float64:
        raise RuntimeError(f"{op_name}: backend='triton' computes in fp32; float64 scores run the "
                           f"reference maths in float64 (backend='auto' or 'reference')")
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which cannot be "
                           f"imported here; use backend='auto' or backend='reference'")
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return "triton"
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type} tensors); "
                       f"CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")


def _fp32_region(device):
    """Autocast off: the whole computation is fp32 (or float64) whatever the surrounding AMP does."""
    return torch.autocast(device_type="cuda" if device.type == "cuda" else "cpu", enabled=False)


def _validate(op_name, scores, epsilon, iterations):
    """Shapes, dtype, epsilon and iterations only: never reads a tensor's values."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{op_name}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise ValueError(f"{op_name}: scores must be a floating tensor (fp32/bf16/fp16/fp64), "
                         f"got {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{op_name}: scores must have shape (R, K) (samples x prototypes), "
                         f"got {tuple(scores.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{op_name}: scores must have at least one sample and one prototype "
                         f"(R, K > 0), got {tuple(scores.shape)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise ValueError(f"{op_name}: epsilon must be a positive finite Python number, "
                         f"got {type(epsilon).__name__}")
    # comparisons, not math.isfinite: inside torch.compile a float that changed between calls is
    # a SymFloat, which compares (a guard) but has no math.isfinite (a graph break); NaN fails both
    if not (0 < epsilon < math.inf):
        raise ValueError(f"{op_name}: epsilon must be a positive finite number, got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise ValueError(f"{op_name}: iterations must be a Python int >= 1, "
                         f"got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"{op_name}: iterations must be >= 1, got {iterations}")


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _distributed_group(process_group):
    """The group to all-reduce over, or None for a single process (not initialised, or one rank)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size(process_group) == 1:
        return None
    return process_group if process_group is not None else torch.distributed.group.WORLD


def _all_reduce_(tensor, group, op="sum"):
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def _first_log_scale(col_max, col_sum, group):
    """g = -logsumexp over all ranks' samples of L, from each rank's (max, sum of exp(L - max))."""
    if group is None:
        return -(col_max + torch.log(col_sum))
    local_max = col_max.clone()
    _all_reduce_(col_max, group, "max")
    col_sum = col_sum * torch.exp(local_max - col_max)  # this rank's sum relative to the global max
    _all_reduce_(col_sum, group)
    return -(col_max + torch.log(col_sum))


# ----------------------------------------------------------------------------------------------
# Reference (the definition; the CPU path)
# ----------------------------------------------------------------------------------------------

def _logits(scores, epsilon):
    return scores.to(_compute_dtype(scores.dtype)) / epsilon


def _reference_col_stats(logits):
    col_max = logits.amax(dim=0)
    return col_max, torch.exp(logits - col_max).sum(dim=0)


def _reference_row_sums(logits, log_scale):
    return torch.softmax(logits + log_scale, dim=1).sum(dim=0)


def _reference_assign(logits, log_scale):
    return torch.softmax(logits + log_scale, dim=1)


def _row_sums_weight(scores, group):
    """K / (R world): this rank's prototype sums as a fraction of 1/K (SwAV's row step)."""
    world = 1 if group is None else torch.distributed.get_world_size(group)
    return scores.shape[1] / (scores.shape[0] * world)


def _reference_sinkhorn(scores, epsilon, iterations, group):
    logits = _logits(scores, epsilon)
    log_scale = _first_log_scale(*_reference_col_stats(logits), group)
    for _ in range(iterations - 1):
        row_sums = _reference_row_sums(logits, log_scale) * _row_sums_weight(scores, group)
        if group is not None:
            _all_reduce_(row_sums, group)
        log_scale = log_scale - torch.log(row_sums)
    return _reference_assign(logits, log_scale)


def sinkhorn_reference(scores, epsilon=0.05, iterations=3, *, process_group=None):
    """Plain PyTorch definition: SwAV's distributed_sinkhorn in the log domain (see the module
    docstring), in fp32 (float64 for float64 scores), autocast off, no gradient (the result is
    detached). All-reduced over `process_group` when torch.distributed is initialised with more
    than one rank. Overflow-safe, unlike exp(scores / epsilon)."""
    _validate("sinkhorn_reference", scores, epsilon, iterations)
    with _fp32_region(scores.device), torch.no_grad():
        return _reference_sinkhorn(scores.detach(), epsilon, iterations,
                                   _distributed_group(process_group))


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

# Launch parameters: H100/H200 defaults, NOT yet timed on a GPU (untuned). Compiled offline for
# sm_90 (triton 3.7, ptxas; fp32 and bf16 scores): no kernel spills -- the fused kernel at
# BLOCK_K = 4096 with 16 warps and 4-row tiles uses 128 registers (8 warps with 2-row tiles: 213),
# the rows kernel (16 x 512, 4 warps) 128.
# fused: one program holds K (padded to a power of two) prototype values in registers and streams
#   tiles of ~tile_elements (BLOCK_R = tile_elements // BLOCK_K rows); used for a single process when
#   K <= max_keys and R K <= max_elements (one SM streams the matrix iterations + 1 times: beyond
#   ~1 MB of fp32 the multi-program split path is faster than saving its 2 * iterations - 1 launches).
# cols / rows / update: the split path's kernels (see the module docstring).
# interpret: small blocks under TRITON_INTERPRET=1, so that the tests cross several blocks.
_CONFIG = {
    "fused": {"max_keys": 4096, "max_elements": 1 << 18, "tile_elements": 16384, "num_warps": 16},
    "cols": {"BLOCK_R": 32, "BLOCK_K": 64, "num_warps": 4},
    "rows": {"BLOCK_R": 16, "BLOCK_K": 512, "num_warps": 4},
    "update": {"BLOCK_P": 16, "BLOCK_K": 256, "num_warps": 4},
    "interpret": {"tile_elements": 1024, "cols": (8, 64), "rows": (4, 128), "update": (4, 64)},
}

_I32_LIMIT = 2**31 - 1


def _new_buffer(shape, dtype, device):
    """Every buffer the Triton path writes comes from here (uninitialised; the kernels overwrite
    all of it that is read later)."""
    return torch.empty(shape, dtype=dtype, device=device)


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


def _launch_plan(scores):
    device = scores.device
    return _cached_launch_plan(scores.shape[0], scores.shape[1], tuple(scores.stride()),
                               device.type, device.index)


@functools.lru_cache(maxsize=512)
def _cached_launch_plan(rows, keys, strides, device_type, device_index):
    """Blocks and warps of every kernel, and whether the single process fits the fused kernel, made
    once per shape (a dict lookup afterwards). Shared: read it, never modify it."""
    interpret = device_type != "cuda"
    fused_cfg = _CONFIG["fused"]
    tile_elements = _CONFIG["interpret"]["tile_elements"] if interpret else fused_cfg["tile_elements"]
    fused_block_k = triton.next_power_of_2(keys)
    fused = keys <= fused_cfg["max_keys"] and rows * keys <= fused_cfg["max_elements"]
    if interpret:
        cols, rows_blocks, update = (_CONFIG["interpret"][name]
                                     for name in ("cols", "rows", "update"))
        warps = {"fused": 4, "cols": 4, "rows": 4, "update": 4}
    else:
        cols = (_CONFIG["cols"]["BLOCK_R"], _CONFIG["cols"]["BLOCK_K"])
        rows_blocks = (_CONFIG["rows"]["BLOCK_R"], _CONFIG["rows"]["BLOCK_K"])
        update = (_CONFIG["update"]["BLOCK_P"], _CONFIG["update"]["BLOCK_K"])
        warps = {name: _CONFIG[name]["num_warps"] for name in ("fused", "cols", "rows", "update")}
    next_pow2 = triton.next_power_of_2
    cols = (min(cols[0], next_pow2(rows)), min(cols[1], next_pow2(keys)))
    rows_blocks = (min(rows_blocks[0], next_pow2(rows)), min(rows_blocks[1], next_pow2(keys)))
    row_programs = triton.cdiv(rows, rows_blocks[0])
    update = (min(update[0], next_pow2(row_programs)), min(update[1], next_pow2(keys)))
    # the largest element offset an address can reach (padded rows and keys; partials; output)
    padded_rows = max(row_programs * rows_blocks[0], triton.cdiv(rows, cols[0]) * cols[0])
    span = max(padded_rows * abs(strides[0]) + next_pow2(keys) * 2 * abs(strides[1]),
               (padded_rows + 1) * keys)
    return dict(fused=fused, fused_block_k=fused_block_k,
                fused_block_r=max(1, tile_elements // fused_block_k),
                cols=cols, rows=rows_blocks, update=update, row_programs=row_programs,
                offsets_i64=span >= _I32_LIMIT, warps=warps)


if _TRITON_IMPORTABLE:

    @triton.jit
    def _sk_index(index, OFFSETS_I64: tl.constexpr):
        """Row indices for address arithmetic: int64 only when an offset can pass 2^31."""
        if OFFSETS_I64:
            y = index.to(tl.int64)
        else:
            y = index
        return y

    @triton.jit
    def _sk_load_logits(s_ptr, row_off, row_mask, col_off, key_mask, scale2):
        """A tile of L * log2(e) = scores * log2(e) / eps in fp32 (upcast right after the load:
        the interpreter's bf16 arithmetic is wrong); masked entries are 0."""
        x = tl.load(s_ptr + row_off[:, None] + col_off[None, :],
                    mask=row_mask[:, None] & key_mask[None, :], other=0.0)
        return x.to(tl.float32) * scale2

    @triton.jit
    def _sk_row_softmax(x, g2, key_mask):
        """softmax over the keys of x + g (log2 units), per row of the tile (padded keys -> 0)."""
        t = tl.where(key_mask[None, :], x + g2[None, :], float("-inf"))
        row_max = tl.max(t, axis=1)
        e = tl.exp2(t - row_max[:, None])
        return e / tl.sum(e, axis=1)[:, None]

    @triton.jit
    def _sk_fused_kernel(s_ptr, out_ptr, n_rows, n_keys, stride_r, stride_k, scale2, sums_weight,
                         n_iters, OFFSETS_I64: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        """The whole single-process Sinkhorn in one program (all K prototypes in registers)."""
        keys = tl.arange(0, BLOCK_K)
        key_mask = keys < n_keys
        col_off = _sk_index(keys, OFFSETS_I64) * stride_k
        # the first row step: g = -log2sumexp2 over all rows, online (running max and sum)
        m = tl.full([BLOCK_K], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < n_rows
            x = _sk_load_logits(s_ptr, _sk_index(rows, OFFSETS_I64) * stride_r, row_mask, col_off,
                                key_mask, scale2)
            x = tl.where(row_mask[:, None], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every tile holds a valid row
            acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[None, :]), axis=0)
            m = m_new
        g2 = tl.where(key_mask, -(m + tl.log2(acc)), 0.0)
        # each later iteration: the column step (row softmax) and the next row step (its sums)
        for _ in range(1, n_iters):
            row_sums = tl.zeros([BLOCK_K], tl.float32)
            for r0 in range(0, n_rows, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                row_mask = rows < n_rows
                x = _sk_load_logits(s_ptr, _sk_index(rows, OFFSETS_I64) * stride_r, row_mask,
                                    col_off, key_mask, scale2)
                p = _sk_row_softmax(x, g2, key_mask)
                row_sums += tl.sum(tl.where(row_mask[:, None], p, 0.0), axis=0)
            g2 = g2 - tl.log2(tl.where(key_mask, row_sums * sums_weight, 1.0))
        # the last column step: Q = softmax_k(L + g)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < n_rows
            rows_i = _sk_index(rows, OFFSETS_I64)
            x = _sk_load_logits(s_ptr, rows_i * stride_r, row_mask, col_off, key_mask, scale2)
            p = _sk_row_softmax(x, g2, key_mask)
            tl.store(out_ptr + rows_i[:, None] * n_keys + keys[None, :], p,
                     mask=row_mask[:, None] & key_mask[None, :])

    @triton.jit
    def _sk_cols_kernel(s_ptr, max_ptr, sum_ptr, n_rows, n_keys, stride_r, stride_k, scale2,
                        WRITE_LOG_SCALE: tl.constexpr, OFFSETS_I64: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """Per prototype: max_b L_bk and sum_b exp(L_bk - max) (natural units), or, with
        WRITE_LOG_SCALE (single process), g_k = -(max + log sum) into max_ptr."""
        keys = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        key_mask = keys < n_keys
        col_off = _sk_index(keys, OFFSETS_I64) * stride_k
        m = tl.full([BLOCK_K], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_mask = rows < n_rows
            x = _sk_load_logits(s_ptr, _sk_index(rows, OFFSETS_I64) * stride_r, row_mask, col_off,
                                key_mask, scale2)
            x = tl.where(row_mask[:, None], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[None, :]), axis=0)
            m = m_new
        if WRITE_LOG_SCALE:
            tl.store(max_ptr + keys, -(m + tl.log2(acc)) * 0.6931471805599453, mask=key_mask)
        else:
            tl.store(max_ptr + keys, m * 0.6931471805599453, mask=key_mask)
            tl.store(sum_ptr + keys, acc, mask=key_mask)

    @triton.jit
    def _sk_rows_kernel(s_ptr, g_ptr, out_ptr, n_rows, n_keys, stride_r, stride_k, scale2,
                        ASSIGN: tl.constexpr, OFFSETS_I64: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_R samples: P = softmax_k(L + g) (g natural units), written (ASSIGN) or summed over
        the block's rows into out[program, :] (partial prototype sums)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        rows_i = _sk_index(rows, OFFSETS_I64)
        row_off = rows_i * stride_r
        # online log2sumexp2 over the keys of L + g (padded rows read 0: finite, discarded)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for k0 in range(0, n_keys, BLOCK_K):
            keys = k0 + tl.arange(0, BLOCK_K)
            key_mask = keys < n_keys
            x = _sk_load_logits(s_ptr, row_off, row_mask, _sk_index(keys, OFFSETS_I64) * stride_k,
                                key_mask, scale2)
            g2 = tl.load(g_ptr + keys, mask=key_mask, other=0.0) * 1.4426950408889634
            t = tl.where(key_mask[None, :], x + g2[None, :], float("-inf"))
            m_new = tl.maximum(m, tl.max(t, axis=1))
            acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
            m = m_new
        lse2 = m + tl.log2(acc)
        for k0 in range(0, n_keys, BLOCK_K):
            keys = k0 + tl.arange(0, BLOCK_K)
            key_mask = keys < n_keys
            x = _sk_load_logits(s_ptr, row_off, row_mask, _sk_index(keys, OFFSETS_I64) * stride_k,
                                key_mask, scale2)
            g2 = tl.load(g_ptr + keys, mask=key_mask, other=0.0) * 1.4426950408889634
            p = tl.exp2(tl.where(key_mask[None, :], x + g2[None, :] - lse2[:, None], float("-inf")))
            if ASSIGN:
                tl.store(out_ptr + rows_i[:, None] * n_keys + keys[None, :], p,
                         mask=row_mask[:, None] & key_mask[None, :])
            else:
                part = tl.sum(tl.where(row_mask[:, None], p, 0.0), axis=0)
                tl.store(out_ptr + _sk_index(pid, OFFSETS_I64) * n_keys + keys, part, mask=key_mask)

    @triton.jit
    def _sk_update_kernel(part_ptr, g_ptr, n_parts, n_keys, sums_weight,
                          OFFSETS_I64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """g_k -= log(K/R x the sum over the row blocks of the partial prototype sums), in place."""
        keys = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        key_mask = keys < n_keys
        acc = tl.zeros([BLOCK_K], tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            parts = p0 + tl.arange(0, BLOCK_P)
            mask = (parts < n_parts)[:, None] & key_mask[None, :]
            tile = tl.load(part_ptr + _sk_index(parts, OFFSETS_I64)[:, None] * n_keys + keys[None, :],
                           mask=mask, other=0.0)
            acc += tl.sum(tile, axis=0)
        g = tl.load(g_ptr + keys, mask=key_mask, other=0.0)
        tl.store(g_ptr + keys, g - tl.log(tl.where(key_mask, acc * sums_weight, 1.0)),
                 mask=key_mask)


def _scale2(epsilon):
    return _LOG2E / epsilon


def _triton_col_stats(scores, epsilon, plan, write_log_scale):
    keys = scores.shape[1]
    col_max = _new_buffer((keys,), torch.float32, scores.device)
    col_sum = col_max if write_log_scale else _new_buffer((keys,), torch.float32, scores.device)
    block_r, block_k = plan["cols"]
    _sk_cols_kernel[(triton.cdiv(keys, block_k),)](
        scores, col_max, col_sum, scores.shape[0], keys, scores.stride(0), scores.stride(1),
        _scale2(epsilon), WRITE_LOG_SCALE=write_log_scale, OFFSETS_I64=plan["offsets_i64"],
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=plan["warps"]["cols"])
    return col_max, col_sum


def _triton_rows(scores, log_scale, epsilon, plan, assign):
    rows, keys = scores.shape
    if assign:
        out = _new_buffer((rows, keys), torch.float32, scores.device)
    else:
        out = _new_buffer((plan["row_programs"], keys), torch.float32, scores.device)
    block_r, block_k = plan["rows"]
    _sk_rows_kernel[(plan["row_programs"],)](
        scores, log_scale, out, rows, keys, scores.stride(0), scores.stride(1), _scale2(epsilon),
        ASSIGN=assign, OFFSETS_I64=plan["offsets_i64"], BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=plan["warps"]["rows"])
    return out


def _triton_update_(log_scale, parts, rows, plan):
    block_p, block_k = plan["update"]
    keys = log_scale.shape[0]
    _sk_update_kernel[(triton.cdiv(keys, block_k),)](
        parts, log_scale, parts.shape[0], keys, keys / rows, OFFSETS_I64=plan["offsets_i64"],
        BLOCK_P=block_p, BLOCK_K=block_k, num_warps=plan["warps"]["update"])


def _triton_sinkhorn(scores, epsilon, iterations):
    """The single-process algorithm: one fused launch, or 2 * iterations split launches."""
    rows, keys = scores.shape
    plan = _launch_plan(scores)
    if plan["fused"]:
        out = _new_buffer((rows, keys), torch.float32, scores.device)
        _sk_fused_kernel[(1,)](
            scores, out, rows, keys, scores.stride(0), scores.stride(1), _scale2(epsilon),
            keys / rows, iterations, OFFSETS_I64=plan["offsets_i64"], BLOCK_R=plan["fused_block_r"],
            BLOCK_K=plan["fused_block_k"], num_warps=plan["warps"]["fused"])
        return out
    log_scale, _ = _triton_col_stats(scores, epsilon, plan, write_log_scale=True)
    for _ in range(iterations - 1):
        _triton_update_(log_scale, _triton_rows(scores, log_scale, epsilon, plan, False), rows,
                        plan)
    return _triton_rows(scores, log_scale, epsilon, plan, True)


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library): fake implementations, CPU/CUDA implementations; no autograd
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("densesim::sinkhorn", mutates_args=(), device_types=("cpu", "cuda"))
def _sinkhorn_op(scores: torch.Tensor, epsilon: float, iterations: int,
                 use_triton: bool) -> torch.Tensor:
    """Q (R, K), single process (see the module docstring). use_triton: the Triton kernels (CUDA,
    or CPU under TRITON_INTERPRET=1), else the reference maths."""
    with _fp32_region(scores.device), torch.no_grad():
        if use_triton:
            with _on_device(scores.device):
                return _triton_sinkhorn(scores, epsilon, iterations)
        return _reference_sinkhorn(scores, epsilon, iterations, None)


@_sinkhorn_op.register_fake
def _sinkhorn_fake(scores, epsilon, iterations, use_triton):
    return scores.new_empty(scores.shape, dtype=_compute_dtype(scores.dtype))


@torch.library.custom_op("densesim::sinkhorn_col_stats", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _sinkhorn_col_stats_op(scores: torch.Tensor, epsilon: float,
                           use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_b L_bk, sum_b exp(L_bk - max)), (K,) each, over this rank's samples."""
    with _fp32_region(scores.device), torch.no_grad():
        if use_triton:
            with _on_device(scores.device):
                return _triton_col_stats(scores, epsilon, _launch_plan(scores), False)
        return _reference_col_stats(_logits(scores, epsilon))


@_sinkhorn_col_stats_op.register_fake
def _sinkhorn_col_stats_fake(scores, epsilon, use_triton):
    dtype = _compute_dtype(scores.dtype)
    return (scores.new_empty((scores.shape[1],), dtype=dtype),
            scores.new_empty((scores.shape[1],), dtype=dtype))


@torch.library.custom_op("densesim::sinkhorn_row_sums", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _sinkhorn_row_sums_op(scores: torch.Tensor, log_scale: torch.Tensor, epsilon: float,
                          use_triton: bool) -> torch.Tensor:
    """sum_b softmax_k(L + log_scale)_bk, (K,), over this rank's samples."""
    with _fp32_region(scores.device), torch.no_grad():
        if use_triton:
            with _on_device(scores.device):
                parts = _triton_rows(scores, log_scale.to(torch.float32).contiguous(), epsilon,
                                     _launch_plan(scores), False)
                return parts.sum(dim=0)
        logits = _logits(scores, epsilon)
        return _reference_row_sums(logits, log_scale.to(logits.dtype))


@_sinkhorn_row_sums_op.register_fake
def _sinkhorn_row_sums_fake(scores, log_scale, epsilon, use_triton):
    return scores.new_empty((scores.shape[1],), dtype=_compute_dtype(scores.dtype))


@torch.library.custom_op("densesim::sinkhorn_assign", mutates_args=(), device_types=("cpu", "cuda"))
def _sinkhorn_assign_op(scores: torch.Tensor, log_scale: torch.Tensor, epsilon: float,
                        use_triton: bool) -> torch.Tensor:
    """softmax_k(L + log_scale), (R, K): the codes."""
    with _fp32_region(scores.device), torch.no_grad():
        if use_triton:
            with _on_device(scores.device):
                return _triton_rows(scores, log_scale.to(torch.float32).contiguous(), epsilon,
                                    _launch_plan(scores), True)
        logits = _logits(scores, epsilon)
        return _reference_assign(logits, log_scale.to(logits.dtype))


@_sinkhorn_assign_op.register_fake
def _sinkhorn_assign_fake(scores, log_scale, epsilon, use_triton):
    return scores.new_empty(scores.shape, dtype=_compute_dtype(scores.dtype))


def _distributed_sinkhorn(scores, epsilon, iterations, use_triton, group):
    """The stage ops with the collectives between them (see the module docstring)."""
    col_max, col_sum = _sinkhorn_col_stats_op(scores, epsilon, use_triton)
    log_scale = _first_log_scale(col_max, col_sum, group)
    for _ in range(iterations - 1):
        row_sums = _sinkhorn_row_sums_op(scores, log_scale, epsilon, use_triton)
        row_sums = _all_reduce_(row_sums * _row_sums_weight(scores, group), group)
        log_scale = log_scale - torch.log(row_sums)
    return _sinkhorn_assign_op(scores, log_scale, epsilon, use_triton)


def sinkhorn(scores, epsilon=0.05, iterations=3, *, process_group=None, backend="auto"):
    """SwAV's Sinkhorn-Knopp codes Q (R, K) for scores (R, K): each row sums to 1; no gradient
    (detached). Equal to SwAV's distributed_sinkhorn(scores) (its returned Q^T), overflow-safe.

    Distributed when torch.distributed is initialised and process_group (default: the default
    group) has more than one rank: the prototype sums are all-reduced, iterations + 1 all-reduces of
    K floats. backend="auto": the registered op(s) with the Triton kernels on CUDA tensors, with the
    reference maths otherwise; "triton": the kernels or a one-line RuntimeError; "reference":
    sinkhorn_reference. Validation (one-line ValueError) reads no tensor value and comes before any
    launch; nothing here syncs the host. See the module docstring for the maths and the kernels."""
    _check_backend_name(_OP, backend)
    _validate(_OP, scores, epsilon, iterations)
    use_triton = _select_backend(_OP, backend, scores.device, scores.dtype) == "triton"
    if backend == "reference" or scores.device.type not in _OP_DEVICES:
        return sinkhorn_reference(scores, epsilon, iterations, process_group=process_group)
    scores = scores.detach()
    group = _distributed_group(process_group)
    if group is None:
        return _sinkhorn_op(scores, float(epsilon), int(iterations), use_triton)
    with _fp32_region(scores.device), torch.no_grad():
        return _distributed_sinkhorn(scores, float(epsilon), int(iterations), use_triton, group)
