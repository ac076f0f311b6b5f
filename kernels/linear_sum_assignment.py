"""Linear sum assignment (the Hungarian matching of DETR-family detectors, DENSE.md K7 and
section 8) on the device, for a whole padded batch, exact, without a host sync.

linear_sum_assignment(cost, *, backend="auto") -> (row_ind, col_ind)
batched_linear_sum_assignment(cost, num_cols=None, *, backend="auto") -> assignment

Shapes and dtypes
    linear_sum_assignment: cost (n, m), any floating dtype (fp16/bf16/fp32/float64), any device,
        any strides; n < m, n = m and n > m all allowed. Returns (row_ind, col_ind), two int64
        tensors of length min(n, m) on cost's device, row_ind ascending -- exactly the form of
        scipy.optimize.linear_sum_assignment(cost) (minimisation): cost[row_ind, col_ind].sum() is
        the minimum over all matchings of min(n, m) pairs.
    batched_linear_sum_assignment: cost (B, n, m) with n >= m (DETR: rows = queries, columns =
        targets; 300 x 30 for DETReg, 100 x 10 for UP-DETR), floating, any strides.
        num_cols: None (all m columns valid) or a (B,) int64 (or int32) tensor on cost's device,
        the number of valid leading columns of each element (targets of image b); columns
        j >= num_cols[b] are padding and never read. Returns assignment (B, m) int64: for each
        valid column j of element b the row assigned to it (distinct rows, minimising the total
        cost over the valid columns), -1 in padding columns; num_cols[b] = 0 gives all -1.
        DETR's (query, target) index pairs of image b are assignment[b, :T_b] and arange(T_b).
    Everything is computed in float64 (the costs are upcast after loading; scipy also solves in
    float64), so the result does not depend on the input dtype beyond its rounding. No gradient:
    the outputs are integers (the costs are detached; nothing flows back through the matching).

Non-finite costs
    +inf means "forbidden": it is replaced by BIG = (2k + 1) max|finite cost| + 1 (k = the valid
    columns of that element), larger than any difference of two finite matchings' costs, so a
    matching using no +inf entry is found whenever one exists, and it is optimal (scipy gives the
    same cost). Where none exists scipy raises "cost matrix is infeasible"; here the result is a
    valid matching with as few +inf entries as possible (and the least finite cost among those).
    NaN and -inf (in a valid column) are errors, as in scipy ("invalid numeric entries"): a
    ValueError at once for CPU tensors, torch._assert_async on CUDA (the step goes on; the next
    synchronisation fails with the message). Finite magnitudes must stay below ~1e300 / (2k + 1)
    (BIG must be finite); scipy has no such limit, no DETR cost comes near it.

Algorithm (the same as scipy's: Crouse 2016, "On implementing 2D rectangular assignment
algorithms", the shortest augmenting path method of Jonker-Volgenant with dual potentials).
Per element, with workers = the k valid columns and jobs = the n rows (k <= n):
    u (workers) = 0, v (jobs) = 0; worker_of_job = -1
    for each worker w in turn: Dijkstra from w over the reduced costs c[i, j] - u[i] - v[j] >= 0:
        the running distances d[j] of the unscanned jobs are relaxed from the last reached worker
        i; the unscanned job with the least distance is scanned next (ties: the Triton kernel
        takes a free job first, as scipy does, then the lowest index; the reference the lowest
        index -- any choice among equal distances is a valid Dijkstra order); if it is free it is
        the sink, else its worker is reached and relaxed from next.
        then the potentials are updated (u[w] += d_min; u[i] += d_min - d[job of i] for every
        reached worker; v[j] -= d_min - d[j] for every scanned job): the reduced costs stay
        >= 0 and are 0 along the matching, and the path from w to the sink is flipped.
    Exactness: after every augmentation the matching is a minimum-cost matching of the workers
    handled so far (the potentials are a dual certificate: complementary slackness holds), so
    after the k-th it is optimal. It is exactly scipy's procedure up to the order among equal
    distances; with ties the assignment may differ from scipy's (and between the backends),
    never its cost (to float64 rounding: the tests compare the totals to 1e-9 relative). With a
    unique optimum (continuous random costs) every backend returns scipy's indices. Deterministic:
    the same input gives the same output (no atomics; the reference's scatters write distinct
    indices, and torch's deterministic mode accepts them).
    Termination is guaranteed for any input (each Dijkstra step scans a new job, and one of the
    at most w + 1 scanned jobs is free), so a NaN that slipped past the check cannot hang a
    kernel: non-finite costs are read as BIG by the solver.

Backends
    "triton": _lsa_kernel, ONE program per batch element (grid B), one launch. The job vectors
        (v, the distances, the Dijkstra predecessors, worker_of_job, the potential u of each job's
        worker, the scanned flags) live in registers as float64/int32 vectors of BLOCK_N =
        next_power_of_2(n) <= 1024 (n up to 1024; larger n is a one-line error on this backend;
        "auto" runs the reference there). Each Dijkstra step loads one cost column (n strided
        values, from L1/L2 after the first pass), and does a few vector ops and four
        reductions; a worker's potential is carried with its job, so no gather is needed. A first
        pass over the valid columns finds max|finite cost| for BIG. float64 in registers: Triton
        supports it on CUDA (the H200's fp64 rate is 1/2 of fp32) and in the interpreter; fp32
        would accumulate potentials with 2^-24 relative error over up to k augmentations and
        could return a matching a few ulps from optimal (not scipy's cost).
    "reference": the same algorithm in plain torch, vectorised across the batch: a Python loop
        over the m workers; the Dijkstra of worker w runs a FIXED w + 1 steps (it scans at most
        the w assigned jobs and one free one), every update masked by "this element is still
        searching"; the path is flipped at once: its jobs are the sink's ancestors in the tree
        job -> job of its predecessor worker, marked by pointer doubling in ceil(log2(w + 1))
        rounds. So it runs on any device with no host sync and no data-dependent shape:
        m (m + 1) / 2 steps of ~18 small ops on (B, n) tensors. Measured on one CPU core
        (OMP_NUM_THREADS=1, bench/test_linear_sum_assignment.py): 39 ms for B = 24, 300 x 30 and
        4.6 ms for B = 32, 100 x 10, against 0.66 ms / 0.23 ms for scipy image by image.
    "auto": the Triton kernel on CUDA tensors where triton imports (n <= 1024), else the reference
        through the registered op. scipy is not used by the op: it is the ground truth in tests.

Registered op (namespace densesim, torch.library.custom_op, device_types cpu and cuda; a fake
implementation, so it traces inside a user's torch.compile(fullgraph=True) as one opaque node; no
autograd formula -- integer output):
    densesim::linear_sum_assignment(cost (B, n, m), num_cols (B,) or None, use_triton) -> (B, m)
linear_sum_assignment (2-D) calls it on cost[None] (cost.T[None] when n < m) and sorts the rows
on the device (torch.sort, fixed shapes).
backend="auto"/"triton" call the op (use_triton set for "triton", and for "auto" as above);
backend="triton" on a machine that cannot run the kernel (no triton, a CPU tensor without
TRITON_INTERPRET=1, n > 1024) raises a one-line RuntimeError, never falling back;
backend="reference" runs batched_linear_sum_assignment_reference (plain torch).
Bad input (not a floating tensor, wrong rank, n < m for the batched op, num_cols of the wrong
shape/dtype/device, an unknown backend) raises a one-line ValueError before anything runs.

No host sync (tests/host_sync.py: zero, every path): shapes, dtypes and devices are checked on the
host; the values (num_cols in [0, m], no NaN / -inf in a valid column) are checked on the device
(_check_on_device: torch._assert_async on CUDA and inside torch.compile, an immediate ValueError
for CPU tensors). num_cols is also clamped to [0, m] where it is used, so a bad value never
becomes an out-of-bounds access.

Complexity and roofline (per element, k valid columns, n rows)
    Work: the Dijkstra of worker w scans at most w + 1 jobs, each O(n): O(k^2 n) worst case
    (k (k + 1) / 2 = 465 scans of ~10 n flops for k = 30: ~1.4 MFLOP per element at 300 x 30;
    the Triton loop stops at the sink, usually after 1-3 scans). Bytes: the cost read once
    from HBM (B n m x element size: 864 KB for B = 24, 300 x 30 fp32; the kernel's first pass),
    each scan re-reads one column from L1/L2, and B m x 8 bytes are written. Both are
    negligible for the device: the op is latency-bound -- a chain of dependent steps (four
    reductions each) inside one program per element -- and its point is one launch and no
    host sync instead of scipy's device->host copy plus B calls on the CPU.
"""
import os

import torch

try:  # Triton is optional: the reference below is the CPU path and the definition of the op.
    import triton
    import triton.language as tl
    _TRITON_IMPORTABLE = True
except Exception:  # pragma: no cover - depends on the machine
    _TRITON_IMPORTABLE = False

_BACKENDS = ("auto", "reference", "triton")
_OP = "linear_sum_assignment"
_BATCHED_OP = "batched_linear_sum_assignment"
# The devices the registered op serves (CPU and CUDA implementations; meta through the fake one)
_OP_DEVICES = ("cpu", "cuda", "meta")
# The Triton kernel holds the job vectors of one element in registers: n <= this
MAX_TRITON_ROWS = 1024
_NUM_COLS_DTYPES = (torch.int64, torch.int32)


def _check_backend_name(op_name, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {_BACKENDS}, got {backend!r}")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select_backend(op_name, backend, device, rows):
    """Called after validation. 'auto': Triton on CUDA tensors where triton imports and rows <=
    MAX_TRITON_ROWS, else the reference. 'triton' runs the kernel on CUDA tensors, or on CPU tensors
    under the interpreter (TRITON_INTERPRET=1); anywhere else it raises, never falling back."""
    if backend == "reference":
        return "reference"
    if backend == "auto":
        fits = _TRITON_IMPORTABLE and device.type == "cuda" and rows <= MAX_TRITON_ROWS
        return "triton" if fits else "reference"
    if not _TRITON_IMPORTABLE:
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which cannot be "
                           f"imported here; use backend='auto' or backend='reference'")
    if rows > MAX_TRITON_ROWS:
        raise RuntimeError(f"{op_name}: the Triton kernel holds one element's rows in registers, "
                           f"at most {MAX_TRITON_ROWS}, got {rows}; use backend='auto' or "
                           f"'reference'")
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return "triton"
    raise RuntimeError(f"{op_name}: backend='triton' needs CUDA tensors (got {device.type} "
                       f"tensors); CPU tensors run the Triton kernel only under TRITON_INTERPRET=1")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    return type(value).__name__


def _check_cost(op_name, cost, dims):
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"{op_name}: cost must be a torch.Tensor, got {type(cost).__name__}")
    if not cost.is_floating_point():
        raise ValueError(f"{op_name}: cost must be a floating tensor (fp16/bf16/fp32/float64), "
                         f"got {cost.dtype}")
    if cost.dim() != dims:
        shape = "(n, m)" if dims == 2 else "(B, n, m)"
        raise ValueError(f"{op_name}: cost must have shape {shape}, got {tuple(cost.shape)}")


def _validate_batched(op_name, cost, num_cols):
    """Shapes, dtypes and devices only: never reads a tensor's values."""
    _check_cost(op_name, cost, 3)
    batch, rows, cols = cost.shape
    if rows < cols:
        raise ValueError(f"{op_name}: needs n >= m (rows = queries >= columns = targets), got cost "
                         f"{tuple(cost.shape)}; transpose it (or use linear_sum_assignment)")
    if num_cols is None:
        return
    if not isinstance(num_cols, torch.Tensor):
        raise ValueError(f"{op_name}: num_cols must be None or a (B,) int64 tensor, "
                         f"got {type(num_cols).__name__}")
    if num_cols.dtype not in _NUM_COLS_DTYPES:
        raise ValueError(f"{op_name}: num_cols must be an int64 (or int32) tensor, "
                         f"got {num_cols.dtype}")
    if tuple(num_cols.shape) != (batch,):
        raise ValueError(f"{op_name}: num_cols must have shape (B,) = ({batch},), "
                         f"got {tuple(num_cols.shape)}")
    if num_cols.device != cost.device:
        raise ValueError(f"{op_name}: num_cols must be on cost's device ({cost.device}), "
                         f"got {num_cols.device}")


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


def _valid_columns(cost, num_cols):
    """(B, 1, m) bool: column j of element b is valid (j < num_cols[b]); None when all are."""
    if num_cols is None:
        return None
    cols = torch.arange(cost.shape[2], device=cost.device)
    return (cols[None, :] < num_cols[:, None])[:, None, :]


def _check_values(op_name, cost, num_cols):
    """On the device: num_cols in [0, m]; no NaN or -inf in a valid column (+inf is allowed)."""
    if num_cols is not None:
        ok = ((num_cols >= 0) & (num_cols <= cost.shape[2])).all()
        _check_on_device(ok, f"{op_name}: num_cols must lie in [0, m] = [0, {cost.shape[2]}]")
    if cost.numel() == 0:
        return
    fine = cost > float("-inf")                   # False for NaN and -inf
    valid = _valid_columns(cost, num_cols)
    if valid is not None:
        fine = fine | ~valid
    _check_on_device(fine.all(), f"{op_name}: cost contains NaN or -inf (in a valid column); "
                                 f"+inf (forbidden pair) is allowed")


# ----------------------------------------------------------------------------------------------
# Reference (the definition; the CPU path): plain torch, vectorised across the batch, fixed
# iteration bounds and masked updates (no host sync, no data-dependent shape)
# ----------------------------------------------------------------------------------------------

def _sanitised_workers_by_jobs(cost, num_cols):
    """(B, m, n) float64 = cost transposed (workers = columns, jobs = rows), every non-finite value
    replaced by BIG = (2k + 1) max|finite valid cost| + 1 per element (k = its valid columns)."""
    batch, _, cols = cost.shape
    work = cost.detach().to(torch.float64).transpose(1, 2)
    finite = torch.isfinite(work)
    magnitude = torch.where(finite, work.abs(), 0.0)
    valid = _valid_columns(cost, num_cols)
    if valid is not None:
        magnitude = magnitude.masked_fill(~valid.transpose(1, 2), 0.0)
        k = num_cols.clamp(0, cols).to(torch.float64)
    else:
        k = torch.full((batch,), float(cols), dtype=torch.float64, device=cost.device)
    big = magnitude.amax(dim=(1, 2)) * (2 * k + 1) + 1.0
    return torch.where(finite, work, big[:, None, None]).contiguous()


def _reference_solve(cost, num_cols):
    """assignment (B, m) int64 for cost (B, n, m), n >= m; no checks (see _check_values)."""
    batch, rows, cols = cost.shape
    device = cost.device
    if batch == 0 or cols == 0:
        return torch.full((batch, cols), -1, dtype=torch.int64, device=device)
    work = _sanitised_workers_by_jobs(cost, num_cols)          # (B, m, n)
    if num_cols is None:
        limit = torch.full((batch,), cols, dtype=torch.int64, device=device)
    else:
        limit = num_cols.to(torch.int64).clamp(0, cols)
    inf = float("inf")
    f64 = {"dtype": torch.float64, "device": device}
    i64 = {"dtype": torch.int64, "device": device}
    every = torch.arange(batch, device=device)
    jobs = torch.arange(rows, device=device).expand(batch, rows)
    v = torch.zeros(batch, rows, **f64)                         # job potentials
    u = torch.zeros(batch, cols + 1, **f64)                     # worker potentials; slot m: trash
    worker_of_job = torch.full((batch, rows), -1, **i64)
    job_of_worker = torch.full((batch, cols + 1), -1, **i64)    # slot m: trash
    trash_job = torch.full((batch,), rows, **i64)
    for w in range(cols):
        active = limit > w
        # Dijkstra from w. `key`: the distances of the unscanned jobs (+inf once scanned);
        # `blocked`: +inf where nothing may be relaxed (scanned jobs; every job of an element that
        # is not searching); `final`: each scanned job's distance (+inf while unscanned; slot n:
        # trash).
        key = torch.full((batch, rows), inf, **f64)
        blocked = torch.zeros(batch, rows, **f64).masked_fill_(~active[:, None], inf)
        final = torch.full((batch, rows + 1), inf, **f64)
        path = torch.full((batch, rows), w, **i64)
        worker = torch.full((batch,), w, **i64)
        min_dist = torch.zeros(batch, **f64)
        sink = torch.zeros(batch, **i64)
        searching = active
        for _ in range(w + 1):       # at most w assigned jobs are scanned before a free one
            shift = u.gather(1, worker[:, None]) - min_dist[:, None]
            reduced = work[every, worker] - v - shift + blocked
            better = reduced < key
            path = torch.where(better, worker[:, None], path)
            key = torch.minimum(key, reduced)
            lowest, chosen = key.min(dim=1)                     # ties: the lowest index
            owner = worker_of_job.gather(1, chosen[:, None]).squeeze(1)
            min_dist = torch.where(searching, lowest, min_dist)
            final.scatter_(1, torch.where(searching, chosen, trash_job)[:, None],
                           lowest[:, None])
            key.scatter_(1, chosen[:, None], inf)
            blocked.scatter_(1, chosen[:, None], inf)
            found = searching & (owner < 0)
            sink = torch.where(found, chosen, sink)
            blocked.masked_fill_(found[:, None], inf)
            worker = torch.where(owner >= 0, owner, worker)
            searching = searching & (owner >= 0)
        # dual update: v of the scanned jobs, u of their workers and of w
        final = final[:, :rows]
        scanned = final < inf
        delta = torch.where(scanned, min_dist[:, None] - final, 0.0)
        v = v - delta
        u.scatter_add_(1, torch.where(scanned & (worker_of_job >= 0), worker_of_job, cols), delta)
        u[:, w] += torch.where(active, min_dist, 0.0)
        # flip the path sink -> ... -> w: the jobs on it are the sink's ancestors in the tree
        # job -> job_of_worker[path[job]] (the root's parent: the trash node n), marked by pointer
        # doubling in ceil(log2(w + 1)) rounds
        parent = job_of_worker.gather(1, path)
        jump = torch.cat([torch.where(parent >= 0, parent, rows), trash_job[:, None]], dim=1)
        on_path = torch.zeros(batch, rows + 1, **f64)
        on_path.scatter_(1, sink[:, None], active.to(torch.float64)[:, None])
        for _ in range(w.bit_length()):
            on_path = on_path.scatter_reduce(1, jump, on_path, reduce="amax")
            jump = jump.gather(1, jump)
        on_path = on_path[:, :rows] > 0
        worker_of_job = torch.where(on_path, path, worker_of_job)
        job_of_worker.scatter_(1, torch.where(on_path, path, cols), jobs)
    return job_of_worker[:, :cols].clone()


def batched_linear_sum_assignment_reference(cost, num_cols=None):
    """The definition, plain torch (any device, no host sync): assignment (B, m) int64, the row of
    each valid column (-1 in padding columns), minimising the total cost. See the module
    docstring."""
    op_name = "batched_linear_sum_assignment_reference"
    _validate_batched(op_name, cost, num_cols)
    _check_values(op_name, cost, num_cols)
    with torch.no_grad():
        return _reference_solve(cost, num_cols)


# ----------------------------------------------------------------------------------------------
# Triton kernel: one program per batch element
# ----------------------------------------------------------------------------------------------

if _TRITON_IMPORTABLE:

    @triton.jit
    def _lsa_load_column(base, jobs_offsets, job_ok, worker, stride_c, big):
        """One worker's costs over the jobs, float64, non-finite values read as BIG (padding jobs
        read 0: they are never candidates)."""
        c = tl.load(base + jobs_offsets + worker.to(tl.int64) * stride_c, mask=job_ok,
                    other=0.0).to(tl.float64)
        return tl.where(tl.abs(c) < float("inf"), c, big)

    @triton.jit
    def _lsa_kernel(cost_ptr, num_cols_ptr, out_ptr, n_rows, n_cols, stride_b, stride_r, stride_c,
                    HAS_NUM_COLS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """Element b: worker = column, job = row. Writes out[b, :m] (the row of each valid column,
        -1 in padding columns). See the module docstring for the algorithm."""
        b = tl.program_id(0).to(tl.int64)
        base = cost_ptr + b * stride_b
        jobs = tl.arange(0, BLOCK_N)
        job_ok = jobs < n_rows
        jobs_offsets = jobs.to(tl.int64) * stride_r
        n_valid = tl.full([], 0, tl.int32) + n_cols
        if HAS_NUM_COLS:
            n_valid = tl.load(num_cols_ptr + b).to(tl.int32)
            n_valid = tl.minimum(tl.maximum(n_valid, 0), n_cols)
        workers = tl.arange(0, BLOCK_M)
        tl.store(out_ptr + b * n_cols + workers, tl.full([BLOCK_M], -1, tl.int64),
                 mask=(workers >= n_valid) & (workers < n_cols))

        # pass 1: BIG = (2k + 1) max |finite cost| + 1 stands for +inf (and NaN / -inf)
        zeros = tl.zeros([BLOCK_N], tl.float64)
        magnitude = zeros
        for w in range(n_valid):
            c = tl.load(base + jobs_offsets + w * stride_c, mask=job_ok, other=0.0).to(tl.float64)
            magnitude = tl.maximum(magnitude, tl.where(tl.abs(c) < float("inf"), tl.abs(c), 0.0))
        big = tl.max(magnitude, axis=0) * (2 * n_valid + 1).to(tl.float64) + 1.0

        v = zeros                                        # job potentials
        u_of_job = zeros                                 # potential of the worker on each job
        worker_of_job = tl.full([BLOCK_N], -1, tl.int32)
        for current in range(n_valid):
            dist = zeros + float("inf")
            path = tl.zeros([BLOCK_N], tl.int32) + current
            scanned = jobs >= n_rows                     # padding jobs are never candidates
            worker = tl.zeros([], tl.int32) + current
            u_worker = tl.zeros([], tl.float64)
            min_dist = tl.zeros([], tl.float64)
            sink = tl.full([], -1, tl.int32)
            while sink < 0:
                c = _lsa_load_column(base, jobs_offsets, job_ok, worker, stride_c, big)
                reduced = min_dist + c - u_worker - v
                better = (reduced < dist) & ~scanned
                dist = tl.where(better, reduced, dist)
                path = tl.where(better, worker, path)
                key = tl.where(scanned, float("inf"), dist)
                lowest = tl.min(key, axis=0)
                # among the least distances: a free job first, then the lowest index
                rank = tl.where((key == lowest) & ~scanned,
                                tl.where(worker_of_job < 0, jobs, jobs + BLOCK_N), 2 * BLOCK_N)
                chosen = tl.min(rank, axis=0) % BLOCK_N
                hit = jobs == chosen
                owner = tl.sum(tl.where(hit, worker_of_job, 0), axis=0)
                owner_u = tl.sum(tl.where(hit, u_of_job, 0.0), axis=0)
                scanned = scanned | hit
                min_dist = lowest
                sink = tl.where(owner < 0, chosen, sink)
                worker = tl.where(owner < 0, worker, owner)
                u_worker = tl.where(owner < 0, u_worker, owner_u)
            # dual update (u[current] becomes min_dist, set when the path is flipped)
            delta = min_dist - dist
            update = scanned & job_ok
            v = tl.where(update, v - delta, v)
            u_of_job = tl.where(update & (worker_of_job >= 0), u_of_job + delta, u_of_job)
            # flip the path from the sink back to `current`; each worker carries its potential
            job = sink
            flipping = tl.full([], 1, tl.int32)
            while flipping > 0:
                hit = jobs == job
                previous = tl.sum(tl.where(hit, path, 0), axis=0)
                own = worker_of_job == previous          # none when previous == current
                previous_job = tl.sum(tl.where(own, jobs, 0), axis=0)
                previous_u = tl.sum(tl.where(own, u_of_job, 0.0), axis=0)
                moved_u = tl.where(previous == current, min_dist, previous_u)
                worker_of_job = tl.where(hit, previous, worker_of_job)
                u_of_job = tl.where(hit, moved_u, u_of_job)
                job = previous_job
                flipping = tl.where(previous == current, 0, 1)
        tl.store(out_ptr + b * n_cols + worker_of_job, jobs.to(tl.int64),
                 mask=(worker_of_job >= 0) & job_ok)


def _num_warps(block_n):
    # every Dijkstra step ends in reductions over the job vectors: few warps, short reductions
    return 1 if block_n <= 256 else (2 if block_n <= 512 else 4)


def _triton_solve(cost, num_cols):
    batch, rows, cols = cost.shape
    out = torch.empty((batch, cols), dtype=torch.int64, device=cost.device)
    if batch == 0 or cols == 0:
        return out
    block_n = triton.next_power_of_2(rows)
    has_num_cols = num_cols is not None
    _lsa_kernel[(batch,)](
        cost, num_cols if has_num_cols else out, out, rows, cols, cost.stride(0), cost.stride(1),
        cost.stride(2), HAS_NUM_COLS=has_num_cols, BLOCK_N=block_n,
        BLOCK_M=triton.next_power_of_2(cols), num_warps=_num_warps(block_n))
    return out


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


# ----------------------------------------------------------------------------------------------
# Registered op (torch.library): fake implementation, CPU/CUDA implementations; no autograd
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("densesim::linear_sum_assignment", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _lsa_op(cost: torch.Tensor, num_cols: torch.Tensor | None, use_triton: bool) -> torch.Tensor:
    """assignment (B, m) int64 for cost (B, n >= m, m) (see the module docstring). use_triton: the
    Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), else the reference maths. The values
    are checked by the caller (_check_values)."""
    with torch.no_grad():
        if use_triton:
            with _on_device(cost.device):
                return _triton_solve(cost, num_cols)
        return _reference_solve(cost, num_cols)


@_lsa_op.register_fake
def _lsa_fake(cost, num_cols, use_triton):
    return cost.new_empty((cost.shape[0], cost.shape[2]), dtype=torch.int64)


def _batched(op_name, cost, num_cols, backend):
    """Validated (B, n >= m, m) cost -> assignment (B, m) on the chosen path."""
    _check_values(op_name, cost, num_cols)
    use_triton = _select_backend(op_name, backend, cost.device, cost.shape[1]) == "triton"
    cost = cost.detach()
    if backend == "reference" or cost.device.type not in _OP_DEVICES:
        with torch.no_grad():
            return _reference_solve(cost, num_cols)
    return _lsa_op(cost, num_cols, use_triton)


def batched_linear_sum_assignment(cost, num_cols=None, *, backend="auto"):
    """Hungarian matching of a padded batch on the device: cost (B, n, m), n >= m; num_cols None
    or (B,) int64 (valid leading columns per element). Returns assignment (B, m) int64: the row
    matched to each valid column (distinct rows, minimum total cost, as scipy's
    linear_sum_assignment on cost[b, :, :num_cols[b]]), -1 in padding columns.

    backend="auto": the Triton kernel on CUDA tensors (n <= 1024, triton importable), the
    reference otherwise; "triton": the kernel or a one-line RuntimeError; "reference": the plain
    torch definition. Shapes are validated on the host (one-line ValueError), values on the device;
    nothing here syncs the host. +inf = forbidden pair; NaN / -inf are errors. See the module
    docstring."""
    _check_backend_name(_BATCHED_OP, backend)
    _validate_batched(_BATCHED_OP, cost, num_cols)
    return _batched(_BATCHED_OP, cost, num_cols, backend)


def linear_sum_assignment(cost, *, backend="auto"):
    """scipy.optimize.linear_sum_assignment(cost) for a 2-D cost (n, m) tensor, on its device:
    (row_ind, col_ind), int64, length min(n, m), row_ind ascending, minimum total cost. No host
    sync. backend as batched_linear_sum_assignment; see the module docstring."""
    _check_backend_name(_OP, backend)
    _check_cost(_OP, cost, 2)
    rows, cols = cost.shape
    if rows >= cols:
        assignment = _batched(_OP, cost[None], None, backend)[0]      # the row of each column
        row_ind, col_ind = torch.sort(assignment)
        return row_ind, col_ind
    col_ind = _batched(_OP, cost.t()[None], None, backend)[0]         # the column of each row
    return torch.arange(rows, dtype=torch.int64, device=cost.device), col_ind
