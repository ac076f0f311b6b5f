"""linear_sum_assignment / batched_linear_sum_assignment (DENSE.md K7: DETR's Hungarian matching on
the device) against scipy.optimize.linear_sum_assignment, on every path: "op_reference" (CPU
tensors, backend="auto": densesim::linear_sum_assignment with the torch reference),
"plain_reference" (backend="reference") and "triton" (the kernel; in the interpreter on a CPU-only
machine, TRITON_INTERPRET=1 from the root conftest, compiled on CUDA tensors on a GPU).

    * exactness: the total cost of the matching equals scipy's (1e-9 relative; every path computes
      in float64 on the exactly upcast costs, so float32/bf16/fp16 inputs get the same tolerance),
      on random float64 and float32 costs of many shapes, integer costs with many ties, all-equal
      costs, duplicated rows and columns, large-magnitude and negative costs, structured
      worst cases (c = i j: long augmenting paths), +inf entries (feasible: scipy's cost;
      infeasible: the fewest +inf entries), padded batches with varying num_cols (0 included);
      on continuous random costs (a unique optimum) the very same indices as scipy;
    * the result is a valid matching: distinct rows in range, -1 exactly in the padding columns;
    * the 2-D API: scipy's form (lengths min(n, m), rows ascending), n < m, n = m, n > m, empty;
    * strided views, requires_grad input (no gradient), meta tensors;
    * NaN / -inf and num_cols out of range: a one-line ValueError on CPU (padding is never read);
      one-line ValueErrors for bad shapes, dtypes, devices; RuntimeError for triton above n = 1024;
    * zero host syncs (tests/host_sync.py), torch.library.opcheck, torch.compile(fullgraph=True).
"""
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import batched_linear_sum_assignment, linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_sync import count_host_syncs

scipy_optimize = pytest.importorskip("scipy.optimize")
lsa = importlib.import_module("kernels.linear_sum_assignment")
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not lsa._TRITON_IMPORTABLE, reason="triton is not importable")
PATHS = {"op_reference": ("cpu", "auto"), "plain_reference": ("cpu", "reference"),
         "triton": (TRITON_DEVICE, "triton")}
PATH_PARAMS = ["op_reference", "plain_reference", pytest.param("triton", marks=needs_triton)]


def scipy_total(cost2d):
    """scipy's optimal total cost of a (n, m) tensor (float64 maths)."""
    host = cost2d.detach().cpu().double().numpy()
    rows, cols = scipy_optimize.linear_sum_assignment(host)
    return float(host[rows, cols].sum())


def solve(path, cost, num_cols=None):
    device, backend = PATHS[path]
    cost = cost.to(device)
    if num_cols is not None:
        num_cols = num_cols.to(device)
    return batched_linear_sum_assignment(cost, num_cols, backend=backend)


def assert_optimal(cost, num_cols, assignment, rtol=1e-9):
    """assignment is a valid matching of each element's valid columns, -1 in its padding, and its
    total cost equals scipy's on cost[b, :, :num_cols[b]]."""
    batch, rows, cols = cost.shape
    assert assignment.shape == (batch, cols) and assignment.dtype == torch.int64
    assignment = assignment.cpu()
    cost64 = cost.detach().cpu().double()
    for b in range(batch):
        k = cols if num_cols is None else int(num_cols[b])
        matched = assignment[b, :k]
        assert (assignment[b, k:] == -1).all(), (b, assignment[b])
        assert ((matched >= 0) & (matched < rows)).all(), (b, matched)
        assert len(set(matched.tolist())) == k, (b, matched)
        if k == 0:
            continue
        got = float(cost64[b, matched, torch.arange(k)].sum())
        expected = scipy_total(cost64[b, :, :k])
        assert abs(got - expected) <= rtol * max(1.0, abs(expected)), (b, got, expected)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def random_num_cols(batch, cols, seed):
    num_cols = torch.randint(0, cols + 1, (batch,), generator=generator(seed))
    num_cols[0] = cols                       # a full element and an empty one in every batch
    if batch > 1:
        num_cols[1] = 0
    return num_cols


# ----------------------------------------------------------------------------------------------
# exactness against scipy
# ----------------------------------------------------------------------------------------------

SHAPES = [(3, 7, 5), (2, 6, 6), (3, 12, 4), (2, 33, 7), (3, 5, 1), (2, 1, 1)]


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_costs_match_scipy(path, dtype):
    for i, shape in enumerate(SHAPES):
        cost = torch.randn(*shape, generator=generator(i), dtype=torch.float64).to(dtype)
        assert_optimal(cost, None, solve(path, cost))
        num_cols = random_num_cols(shape[0], shape[2], seed=100 + i)
        assert_optimal(cost, num_cols, solve(path, cost, num_cols))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_unique_optimum_gives_scipys_indices(path):
    """Continuous random costs have one optimal matching (almost surely): the same indices."""
    cost = torch.rand(4, 11, 6, generator=generator(1), dtype=torch.float64)
    num_cols = torch.tensor([6, 3, 1, 5])
    assignment = solve(path, cost, num_cols).cpu()
    for b in range(4):
        k = int(num_cols[b])
        rows, cols = scipy_optimize.linear_sum_assignment(cost[b, :, :k].numpy())
        expected = torch.full((6,), -1, dtype=torch.int64)
        expected[torch.from_numpy(cols)] = torch.from_numpy(rows)
        assert torch.equal(assignment[b], expected)


def degenerate_costs(rows, cols, seed):
    """Named (B=2, rows, cols) float64 costs that stress ties, magnitudes and path lengths."""
    g = generator(seed)
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(cols, dtype=torch.float64)[None, :]
    base = torch.randn(2, rows, cols, generator=g, dtype=torch.float64)
    duplicated = base.clone()
    duplicated[:, 1::2] = duplicated[:, 0:1]                 # duplicated rows
    duplicated[:, :, 1] = duplicated[:, :, 0]                # and a duplicated column
    return {
        "int_0_2": torch.randint(0, 3, (2, rows, cols), generator=g).double(),
        "int_0_9": torch.randint(0, 10, (2, rows, cols), generator=g).double(),
        "all_equal": torch.full((2, rows, cols), 3.5, dtype=torch.float64),
        "zeros": torch.zeros(2, rows, cols, dtype=torch.float64),
        "duplicated": duplicated,
        "large": base * 1e12 + 1e9,
        "negative": -base.abs() * 100 - 50,
        "i_times_j": (i * j).expand(2, rows, cols),          # long augmenting paths
        "minus_i_times_j": (-i * j).expand(2, rows, cols),
        "i_plus_j_mod": ((i + j) % 3).expand(2, rows, cols),
    }


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("shape", [(9, 9), (13, 6)])
def test_degenerate_costs_match_scipy(path, shape):
    for name, cost in degenerate_costs(*shape, seed=shape[0]).items():
        num_cols = torch.tensor([shape[1], shape[1] - 2])
        try:
            assert_optimal(cost, None, solve(path, cost))
            assert_optimal(cost, num_cols, solve(path, cost, num_cols))
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_costs_are_solved_exactly(path, dtype):
    """16-bit costs are upcast exactly: the optimum of the rounded costs, with many ties."""
    cost = torch.rand(3, 10, 5, generator=generator(2)).to(dtype)
    num_cols = torch.tensor([5, 2, 4])
    assert_optimal(cost, num_cols, solve(path, cost, num_cols))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_square_costs_with_long_paths(path):
    """Square problems force every worker to compete for the last rows."""
    cost = torch.rand(2, 16, 16, generator=generator(3), dtype=torch.float64)
    assert_optimal(cost, None, solve(path, cost))


def test_reference_at_detr_sizes():
    """The torch reference (no triton) at DETReg's size, 300 x 30, varying numbers of targets."""
    cost = torch.rand(4, 300, 30, generator=generator(4))
    num_cols = torch.tensor([30, 17, 0, 1])
    for path in ("op_reference", "plain_reference"):
        assert_optimal(cost, num_cols, solve(path, cost, num_cols))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_paths_agree_on_integer_costs(path):
    """Every path returns a deterministic result (the same input twice gives the same output)."""
    cost = torch.randint(0, 4, (3, 12, 8), generator=generator(5)).double()
    first, second = solve(path, cost), solve(path, cost)
    assert torch.equal(first, second)
    assert_optimal(cost, None, first)


# ----------------------------------------------------------------------------------------------
# +inf (forbidden pairs), NaN / -inf, num_cols range
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
def test_infinite_entries(path):
    g = generator(6)
    cost = torch.rand(3, 10, 6, generator=g, dtype=torch.float64) * 10 - 3
    cost[torch.rand(3, 10, 6, generator=g) < 0.4] = float("inf")
    for b in range(3):                       # keep a finite matching: the diagonal stays finite
        cost[b, torch.arange(6), torch.arange(6)] = torch.rand(6, generator=g, dtype=torch.float64)
    num_cols = torch.tensor([6, 4, 0])
    assignment = solve(path, cost, num_cols).cpu()
    assert_optimal(cost, num_cols, assignment)          # scipy's cost (finite)
    # infeasible: column 0 forbidden everywhere in element 0, two columns share one finite row in
    # element 1 (scipy raises "cost matrix is infeasible"); the result uses as few +inf as possible
    cost[0, :, 0] = float("inf")
    cost[1, :, :2] = float("inf")
    cost[1, 3, :2] = 1.0
    num_cols = torch.tensor([6, 6, 3])
    assignment = solve(path, cost, num_cols).cpu()
    for b in range(3):
        k = int(num_cols[b])
        matched = assignment[b, :k]
        assert len(set(matched.tolist())) == k and (assignment[b, k:] == -1).all()
        used = int(torch.isinf(cost[b, matched, torch.arange(k)]).sum())
        fewest = scipy_total(torch.isinf(cost[b, :, :k]).double())
        assert used == fewest, (b, used, fewest)
    with pytest.raises(ValueError, match="infeasible"):
        scipy_optimize.linear_sum_assignment(cost[0].numpy())


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_nan_and_negative_inf_are_errors(path, bad):
    cost = torch.rand(2, 6, 4, generator=generator(7))
    num_cols = torch.tensor([4, 2])
    padded = cost.clone()
    padded[1, :, 3] = bad                    # padding is never read: no error
    assert_optimal(padded.nan_to_num(0.0, 0.0, 0.0), num_cols, solve(path, padded, num_cols))
    cost[1, 2, 1] = bad
    with pytest.raises(ValueError) as info:
        solve(path, cost, num_cols)
    text = str(info.value)
    assert text.startswith("batched_linear_sum_assignment: cost contains NaN or -inf")
    assert "\n" not in text
    device, backend = PATHS[path]
    with pytest.raises(ValueError, match="^linear_sum_assignment: cost contains NaN or -inf"):
        linear_sum_assignment(cost[1].to(device), backend=backend)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_num_cols_out_of_range_is_an_error(path):
    cost = torch.rand(2, 6, 4, generator=generator(8))
    for num_cols in (torch.tensor([4, 5]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match=r"^batched_linear_sum_assignment: num_cols must lie "
                                             r"in \[0, m\] = \[0, 4\]$"):
            solve(path, cost, num_cols)


def test_num_cols_is_clamped_where_it_is_used():
    """A bad num_cols that escaped the check (CUDA: an asynchronous assert) never reads out of
    bounds: the solvers clamp it to [0, m]."""
    cost = torch.rand(2, 6, 4, generator=generator(9), dtype=torch.float64)
    clamped = lsa._reference_solve(cost, torch.tensor([7, -3]))
    assert_optimal(cost, torch.tensor([4, 0]), clamped)
    if lsa._TRITON_IMPORTABLE:
        triton_out = lsa._lsa_op(cost.to(TRITON_DEVICE), torch.tensor([7, -3]).to(TRITON_DEVICE),
                                 True)
        assert_optimal(cost, torch.tensor([4, 0]), triton_out)


# ----------------------------------------------------------------------------------------------
# the 2-D API (scipy's form)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9), (1, 1), (1, 5), (5, 1), (7, 3)])
def test_two_dimensional_api_equals_scipy(path, shape):
    device, backend = PATHS[path]
    cost = torch.rand(*shape, generator=generator(shape[0] * 10 + shape[1]), dtype=torch.float64)
    row_ind, col_ind = linear_sum_assignment(cost.to(device), backend=backend)
    rows, cols = scipy_optimize.linear_sum_assignment(cost.numpy())
    for got in (row_ind, col_ind):
        assert got.dtype == torch.int64 and got.device.type == torch.device(device).type
        assert got.shape == (min(shape),)
    # a unique optimum: exactly scipy's arrays (rows ascending)
    assert np.array_equal(row_ind.cpu().numpy(), rows) and np.array_equal(col_ind.cpu().numpy(),
                                                                          cols)
    ties = torch.randint(0, 2, shape, generator=generator(11)).float()
    row_ind, col_ind = linear_sum_assignment(ties.to(device), backend=backend)
    row_ind, col_ind = row_ind.cpu(), col_ind.cpu()
    assert torch.equal(row_ind, row_ind.sort().values) and len(set(row_ind.tolist())) == min(shape)
    assert len(set(col_ind.tolist())) == min(shape)
    assert float(ties[row_ind, col_ind].sum()) == scipy_total(ties)


@pytest.mark.parametrize("path", ["op_reference", "plain_reference",
                                  pytest.param("triton", marks=needs_triton)])
def test_empty_inputs(path):
    device, backend = PATHS[path]
    for shape in ((0, 0), (0, 3), (3, 0)):
        row_ind, col_ind = linear_sum_assignment(torch.zeros(shape, device=device), backend=backend)
        assert row_ind.shape == col_ind.shape == (0,) and row_ind.dtype == torch.int64
    out = batched_linear_sum_assignment(torch.zeros(2, 4, 0, device=device), backend=backend)
    assert out.shape == (2, 0) and out.dtype == torch.int64
    out = batched_linear_sum_assignment(torch.zeros(0, 4, 3, device=device),
                                        torch.zeros(0, dtype=torch.int64, device=device),
                                        backend=backend)
    assert out.shape == (0, 3)
    out = batched_linear_sum_assignment(torch.zeros(2, 4, 3, device=device),
                                        torch.zeros(2, dtype=torch.int64, device=device),
                                        backend=backend)
    assert torch.equal(out.cpu(), torch.full((2, 3), -1))


# ----------------------------------------------------------------------------------------------
# views, autograd, meta, registered op
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
def test_strided_views(path):
    g = generator(12)
    transposed = torch.rand(3, 5, 9, generator=g).transpose(1, 2)            # (3, 9, 5)
    stepped = torch.rand(2, 14, 12, generator=g)[:, ::2, ::3]                  # (2, 7, 4)
    broadcast = torch.rand(1, 8, 5, generator=g).expand(3, 8, 5)               # stride 0
    for cost in (transposed, stepped, broadcast):
        num_cols = torch.arange(cost.shape[0]) % (cost.shape[2] + 1)
        assert_optimal(cost, num_cols, solve(path, cost, num_cols))
        assert_optimal(cost, None, solve(path, cost))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_requires_grad_input_gives_integer_output(path):
    cost = torch.rand(2, 6, 3, generator=generator(13)).requires_grad_()
    out = solve(path, cost)
    assert out.dtype == torch.int64 and not out.requires_grad
    assert_optimal(cost, None, out)


def test_meta_tensors():
    out = batched_linear_sum_assignment(torch.empty(3, 8, 5, device="meta"),
                                        torch.empty(3, dtype=torch.int64, device="meta"))
    assert out.shape == (3, 5) and out.dtype == torch.int64 and out.device.type == "meta"
    row_ind, col_ind = linear_sum_assignment(torch.empty(4, 7, device="meta"))
    assert row_ind.shape == col_ind.shape == (4,)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_opcheck(use_triton):
    device = TRITON_DEVICE if use_triton else "cpu"
    cost = torch.rand(2, 7, 4, generator=generator(14)).to(device)
    op = torch.ops.densesim.linear_sum_assignment.default
    torch.library.opcheck(op, (cost, torch.tensor([4, 2], device=device), use_triton))
    torch.library.opcheck(op, (cost.double(), None, use_triton))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

BATCHED_BAD_INPUTS = [
    ((torch.zeros(4, 3),), "cost must have shape (B, n, m)"),
    ((torch.zeros(2, 4, 3, 1),), "cost must have shape (B, n, m)"),
    ((torch.zeros(2, 4, 3, dtype=torch.int64),), "cost must be a floating tensor"),
    ((torch.zeros(2, 4, 3, dtype=torch.complex64),), "cost must be a floating tensor"),
    (([[[0.0]]],), "cost must be a torch.Tensor"),
    ((torch.zeros(2, 3, 4),), "needs n >= m (rows = queries >= columns = targets)"),
    ((torch.zeros(2, 4, 3), [3, 3]), "num_cols must be None or a (B,) int64 tensor"),
    ((torch.zeros(2, 4, 3), torch.tensor([3.0, 3.0])), "num_cols must be an int64"),
    ((torch.zeros(2, 4, 3), torch.tensor([3, 3, 3])), "num_cols must have shape (B,) = (2,)"),
    ((torch.zeros(2, 4, 3), torch.tensor([[3, 3]])), "num_cols must have shape (B,) = (2,)"),
    ((torch.zeros(2, 4, 3), torch.empty(2, dtype=torch.int64, device="meta")),
     "num_cols must be on cost's device (cpu)"),
]


@pytest.mark.parametrize("backend", ["auto", "reference",
                                     pytest.param("triton", marks=needs_triton)])
def test_bad_input_is_a_one_line_value_error(backend):
    for args, message in BATCHED_BAD_INPUTS:
        with pytest.raises(ValueError) as info:
            batched_linear_sum_assignment(*args, backend=backend)
        text = str(info.value)
        assert text.startswith(f"batched_linear_sum_assignment: {message}") and "\n" not in text, \
            text
    for cost, message in [(torch.zeros(2, 3, 4), "cost must have shape (n, m)"),
                          (torch.zeros(3, dtype=torch.float64), "cost must have shape (n, m)"),
                          (torch.zeros(3, 3, dtype=torch.int32), "cost must be a floating"),
                          (np.zeros((3, 3)), "cost must be a torch.Tensor")]:
        with pytest.raises(ValueError) as info:
            linear_sum_assignment(cost, backend=backend)
        text = str(info.value)
        assert text.startswith(f"linear_sum_assignment: {message}") and "\n" not in text, text
    with pytest.raises(ValueError, match="backend must be one of"):
        batched_linear_sum_assignment(torch.zeros(1, 2, 2), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_sum_assignment(torch.zeros(2, 2), backend="scipy")
    with pytest.raises(ValueError, match="^batched_linear_sum_assignment_reference: needs n >= m"):
        lsa.batched_linear_sum_assignment_reference(torch.zeros(1, 2, 3))


@needs_triton
def test_triton_row_limit_is_a_clear_error():
    too_many = torch.zeros(1, lsa.MAX_TRITON_ROWS + 1, 2, device=TRITON_DEVICE)
    with pytest.raises(RuntimeError, match=r"^batched_linear_sum_assignment: the Triton kernel "
                                           r"holds one element's rows in registers, at most 1024"):
        batched_linear_sum_assignment(too_many, backend="triton")
    with pytest.raises(RuntimeError, match="at most 1024"):
        linear_sum_assignment(torch.zeros(2, 1025, device=TRITON_DEVICE), backend="triton")


def test_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    if not lsa._TRITON_IMPORTABLE:
        pytest.skip("triton is not importable")
    monkeypatch.setattr(lsa, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        batched_linear_sum_assignment(torch.zeros(1, 3, 2), backend="triton")
    # "auto" on CPU tensors is the reference, never an error
    assert batched_linear_sum_assignment(torch.zeros(1, 3, 2)).shape == (1, 2)


# ----------------------------------------------------------------------------------------------
# no host sync, torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATH_PARAMS)
def test_no_host_sync(path):
    device, backend = PATHS[path]
    cost = torch.rand(3, 9, 5, generator=generator(15)).to(device)
    num_cols = torch.tensor([5, 0, 3]).to(device)
    with count_host_syncs() as syncs:
        assignment = batched_linear_sum_assignment(cost, num_cols, backend=backend)
        full = batched_linear_sum_assignment(cost, backend=backend)
        row_ind, _ = linear_sum_assignment(cost[0], backend=backend)
        wide = linear_sum_assignment(cost[0].t(), backend=backend)
    assert not syncs, syncs.report()
    assert_optimal(cost, num_cols, assignment)
    assert_optimal(cost, None, full)
    assert row_ind.shape == wide[0].shape == (5,)


@pytest.mark.parametrize("path", ["op_reference", pytest.param("triton", marks=needs_triton)])
def test_inside_torch_compile_fullgraph(path):
    """A DETR-style matcher step compiled whole: the cost is built, matched (one opaque node) and
    the matched costs gathered."""
    device, backend = PATHS[path]
    g = generator(16)
    logits = torch.randn(2, 10, 4, generator=g).to(device)
    boxes = torch.rand(2, 10, 4, generator=g).to(device)
    targets = torch.rand(2, 3, 4, generator=g).to(device)
    labels = torch.randint(0, 4, (2, 3), generator=g).to(device)
    num_targets = torch.tensor([3, 2]).to(device)

    def matcher_step(logits, boxes, targets, labels, num_targets):
        class_cost = -logits.softmax(-1).gather(2, labels[:, None, :].expand(-1, 10, -1))
        cost = class_cost + 5 * torch.cdist(boxes, targets, p=1)
        assignment = batched_linear_sum_assignment(cost, num_targets, backend=backend)
        matched = cost.gather(1, assignment.clamp(min=0)[:, None, :]).squeeze(1)
        return assignment, (matched * (assignment >= 0)).sum(), cost

    expected = matcher_step(logits, boxes, targets, labels, num_targets)
    compiled = torch.compile(matcher_step, fullgraph=True, backend="aot_eager")
    got = compiled(logits, boxes, targets, labels, num_targets)
    assert_optimal(expected[2].cpu(), num_targets.cpu(), got[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs n >= m"):
        torch.compile(lambda c: batched_linear_sum_assignment(c, backend=backend),
                      backend="aot_eager")(torch.zeros(1, 2, 3, device=device))
