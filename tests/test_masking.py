"""Tests for engine/masking.py (spec/SIM.md §2)."""
import math

import pytest
import torch

from engine.masking import (
    MASK_KINDS,
    block_mask,
    make_mask,
    num_masked_for_grid,
    random_mask,
    visible_indices,
)

@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """These tests run a few large CPU batches of tiny ops; on a busy machine OpenMP's spinning
    threads make them 10x slower (2.6 s vs 33 s measured on 2 shared cores). One thread is also the
    faster setting here. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRIDS = [(14, 118), (8, 39), (8, 38), (4, 10), (7, 30), (16, 154), (3, 1)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def components_4(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Number of 4-connected components of the masked cells, per row (min-label propagation)."""
    b = mask.shape[0]
    m = mask.view(b, grid, grid)
    big = grid * grid
    idx = torch.arange(big).view(1, grid, grid).expand(b, grid, grid)
    lab = torch.where(m, idx, torch.full_like(idx, big))
    while True:
        pad = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=big)
        nb = torch.stack(
            (lab, pad[:, :-2, 1:-1], pad[:, 2:, 1:-1], pad[:, 1:-1, :-2], pad[:, 1:-1, 2:])
        ).amin(0)
        new = torch.where(m, nb, lab)
        if torch.equal(new, lab):
            break
        lab = new
    return (m & (lab == idx)).sum((1, 2))


def isolated_fraction(mask: torch.Tensor, grid: int) -> float:
    """Fraction of masked cells without any masked 4-neighbour."""
    m = mask.view(-1, grid, grid).float()
    pad = torch.nn.functional.pad(m, (1, 1, 1, 1))
    nb = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    return float(((m > 0) & (nb == 0)).sum() / m.sum())


# ---------------------------------------------------------------- exact counts


@pytest.mark.parametrize("grid,k", GRIDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_exact_count_every_draw(kind, grid, k):
    g = gen(1)
    for _ in range(5):
        m = make_mask(kind, 512, grid, k, generator=g, device="cpu")
        assert m.dtype == torch.bool and m.shape == (512, grid * grid)
        assert torch.equal(m.sum(1), torch.full((512,), k))


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("grid,k", [(14, 0), (14, 196), (14, 1), (14, 195), (1, 0), (1, 1), (5, 3)])
def test_edge_counts(kind, grid, k):
    m = make_mask(kind, 64, grid, k, generator=gen(2))
    assert torch.equal(m.sum(1), torch.full((64,), k))


def test_empty_batch():
    assert block_mask(0, 14, 118).shape == (0, 196)
    assert random_mask(0, 14, 118).shape == (0, 196)


def test_block_exact_count_with_few_rounds():
    # Truncating the block rounds only shifts work to the top-up; the count stays exact.
    for rounds in (0, 1, 3):
        m, topup = block_mask(256, 14, 118, max_rounds=rounds, generator=gen(3), return_topup=True)
        assert torch.equal(m.sum(1), torch.full((256,), 118))
        if rounds == 0:
            assert torch.equal(topup, torch.full((256,), 118))


# ---------------------------------------------------------------- block semantics


def _reference_block_phase(u, grid, k, min_block=16.0, lo=0.3, hi=1 / 0.3, attempts=10):
    """Transcription of §2.1 (the block rounds, before the top-up), one sample at a time, fed with
    the same uniforms as the vectorised version: u[round, {area, aspect, top, left}, attempt]."""
    m = [[0] * grid for _ in range(grid)]
    count = 0
    la, lb = math.log(lo), math.log(hi)
    for r in range(u.shape[0]):
        if count >= k:
            break
        budget = k - count
        added = 0
        for p in range(attempts):
            area = min_block + (budget - min_block) * float(u[r, 0, p])
            aspect = math.exp(la + (lb - la) * float(u[r, 1, p]))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if w < grid and h < grid:
                top = min(int(float(u[r, 2, p]) * (grid - h + 1)), grid - h)
                left = min(int(float(u[r, 3, p]) * (grid - w + 1)), grid - w)
                cov = sum(m[i][j] for i in range(top, top + h) for j in range(left, left + w))
                new = h * w - cov
                if 0 < new <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            m[i][j] = 1
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return torch.tensor(m, dtype=torch.bool).view(-1), count


@pytest.mark.parametrize("grid,k", [(14, 118), (8, 39), (4, 10)])
def test_block_phase_matches_sequential_reference(grid, k):
    """The batched rounds are exactly the per-image sequential algorithm given the same draws."""
    b, rounds, attempts = 64, 24, 10
    m, topup = block_mask(b, grid, k, max_rounds=rounds, generator=gen(4), return_topup=True)
    u = torch.rand(rounds, 4, b, attempts, generator=gen(4))  # the draws block_mask made first
    for i in range(b):
        ref, count = _reference_block_phase(u[:, :, i, :], grid, k)
        assert int(topup[i]) == k - count
        assert not bool((ref & ~m[i]).any()), "every block cell of the reference must be masked"
        assert int((m[i] & ~ref).sum()) == k - count  # the rest is exactly the top-up


@pytest.mark.parametrize("grid,k", [(14, 118), (4, 10), (14, 5)])
def test_fixed_trip_count_path_is_identical(monkeypatch, grid, k):
    """The CPU early exit and the sync-free fixed number of rounds (the CUDA path) agree exactly."""
    import engine.masking as masking

    monkeypatch.setattr(masking, "_EARLY_EXIT_ON_CPU", True)
    early = block_mask(256, grid, k, generator=gen(15), return_topup=True)
    monkeypatch.setattr(masking, "_EARLY_EXIT_ON_CPU", False)
    fixed = block_mask(256, grid, k, generator=gen(15), return_topup=True)
    assert torch.equal(early[0], fixed[0]) and torch.equal(early[1], fixed[1])


def test_block_structure_vs_random():
    g = gen(5)
    blk = block_mask(500, 14, 118, generator=g)
    rnd = random_mask(500, 14, 118, generator=g)
    c_blk = components_4(blk, 14).float().mean().item()
    c_rnd = components_4(rnd, 14).float().mean().item()
    assert c_blk < 0.3 * c_rnd, (c_blk, c_rnd)  # measured: ~1.4 vs ~9.9
    iso_blk, iso_rnd = isolated_fraction(blk, 14), isolated_fraction(rnd, 14)
    assert iso_blk < 0.01 and iso_blk < iso_rnd, (iso_blk, iso_rnd)  # >99% have a masked neighbour


def test_block_topup_statistics_match_spec():
    """Spec §2.1: over 5000 masks at 14/118, 31% need a top-up, 0.48 top-up patches on average."""
    _, topup = block_mask(5000, 14, 118, generator=gen(6), return_topup=True)
    frac = (topup > 0).float().mean().item()
    mean = topup.float().mean().item()
    assert 0.26 <= frac <= 0.36, frac  # binomial s.e. ~0.0065
    assert 0.36 <= mean <= 0.60, mean
    assert int(topup.max()) < 16  # a top-up is only ever a remainder smaller than a block


def test_block_mask_position_profile():
    """Blocks are placed uniformly, so the edges are masked less than the centre. The reference
    (a Python transcription of §2.1, 20000 draws) gives 0.09 at the corners, 0.94 at the centre."""
    m = block_mask(4000, 14, 118, generator=gen(7)).float().mean(0).view(14, 14)
    corners = m[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert bool(((corners > 0.06) & (corners < 0.12)).all()), corners
    centre = m[6:8, 6:8].mean().item()
    assert 0.91 < centre < 0.97, centre
    assert abs(m.mean().item() - 118 / 196) < 1e-6
    for flipped in (m.flip(0), m.flip(1), m.t()):  # the proposal distribution is symmetric
        assert (m - flipped).abs().max() < 0.05


# ---------------------------------------------------------------- random mask


def test_random_mask_is_mae_procedure():
    b, n, k = 32, 196, 118
    m = random_mask(b, 14, k, generator=gen(8))
    noise = torch.rand(b, n, generator=gen(8))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ref = torch.ones(b, n)
    ref[:, : n - k] = 0
    ref = torch.gather(ref, 1, ids_restore).bool()
    assert torch.equal(m, ref)


def test_random_mask_uniform_positions():
    m = random_mask(8000, 14, 118, generator=gen(9))
    freq = m.float().mean(0)
    assert (freq - 118 / 196).abs().max() < 0.03


# ---------------------------------------------------------------- visible indices


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("grid,k", [(14, 118), (8, 39), (4, 10), (14, 0), (14, 196)])
def test_visible_indices(kind, grid, k):
    n = grid * grid
    m = make_mask(kind, 128, grid, k, generator=gen(10))
    for vis in (visible_indices(m), visible_indices(m, n - k, check=False)):
        assert vis.dtype == torch.int64 and vis.shape == (128, n - k)
        if n - k > 1:
            assert bool((vis[:, 1:] > vis[:, :-1]).all()), "raster order"
        assert not bool(m.gather(1, vis).any()), "disjoint from the masked patches"
        # Together with the masked ones they cover everything exactly once.
        covered = m.clone().scatter_(1, vis, True)
        assert bool(covered.all())
        # Same as boolean selection (the reference way, §2.2).
        assert torch.equal(vis, torch.arange(n).expand(128, n)[~m].view(128, n - k))


def test_visible_indices_stable_on_long_rows():
    # Stability must hold past small-sort thresholds too.
    m = random_mask(16, 64, 2000, generator=gen(11))
    vis = visible_indices(m)
    assert torch.equal(vis, torch.arange(64 * 64).expand(16, -1)[~m].view(16, -1))


def test_visible_indices_rejects_ragged_and_bad_input():
    m = random_mask(4, 14, 118, generator=gen(12))
    m[2, (~m[2]).nonzero()[0]] = True  # one row with one more masked patch
    with pytest.raises(ValueError):
        visible_indices(m)
    with pytest.raises(ValueError):
        visible_indices(m, 78)
    with pytest.raises(ValueError):
        visible_indices(m.float())
    with pytest.raises(ValueError):
        visible_indices(m.view(4, 14, 14))
    with pytest.raises(ValueError):
        visible_indices(m, 197, check=False)


# ---------------------------------------------------------------- determinism, devices, args


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_determinism(kind):
    a = make_mask(kind, 64, 14, 118, generator=gen(13))
    b = make_mask(kind, 64, 14, 118, generator=gen(13))
    c = make_mask(kind, 64, 14, 118, generator=gen(14))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_device_follows_generator(kind):
    g = torch.Generator(device="cpu").manual_seed(0)
    assert make_mask(kind, 8, 14, 118, generator=g).device.type == "cpu"
    assert make_mask(kind, 8, 14, 118, generator=None, device="cpu").device.type == "cpu"
    assert make_mask(kind, 8, 14, 118, generator=None).device.type == "cpu"
    with pytest.raises(ValueError):
        make_mask(kind, 8, 14, 118, generator=g, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_cuda_generator(kind):
    g = torch.Generator(device="cuda").manual_seed(0)
    m = make_mask(kind, 256, 14, 118, generator=g)
    assert m.is_cuda and torch.equal(m.sum(1).cpu(), torch.full((256,), 118))
    vis = visible_indices(m, 78, check=False)
    assert vis.is_cuda and not bool(m.gather(1, vis).any())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grid,k", [(14, 118), (8, 39), (4, 10)])
def test_cuda_graph_matches_eager(grid, k):
    """The captured-graph path makes the same draws and the same masks as the eager path."""
    for seed in (0, 1):  # the second call replays the cached graph
        g1 = torch.Generator(device="cuda").manual_seed(seed)
        g2 = torch.Generator(device="cuda").manual_seed(seed)
        a, ta = block_mask(300, grid, k, generator=g1, return_topup=True, cuda_graph=True)
        b, tb = block_mask(300, grid, k, generator=g2, return_topup=True, cuda_graph=False)
        assert torch.equal(a, b) and torch.equal(ta, tb)
        assert torch.equal(a.sum(1).cpu(), torch.full((300,), k))
        # The outputs are copies: the next replay does not overwrite them.
        c = block_mask(300, grid, k, generator=g1, cuda_graph=True)
        assert torch.equal(a, b) and not torch.equal(a, c)
    _, t = block_mask(5000, 14, 118, generator=torch.Generator(device="cuda").manual_seed(0),
                      return_topup=True)
    assert 0.26 <= (t > 0).float().mean().item() <= 0.36


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(
    "args",
    [(8, 14, 197), (8, 14, -1), (8, 0, 0), (-1, 14, 118), (8, 14, 1.5), (8, 14.0, 118),
     (True, 4, 1)],
)
def test_bad_args(kind, args):
    with pytest.raises(ValueError):
        make_mask(kind, *args)


def test_bad_block_options_and_kind():
    with pytest.raises(ValueError):
        make_mask("grid", 8, 14, 118)
    with pytest.raises(ValueError):
        block_mask(8, 14, 118, aspect=(2.0, 1.0))
    with pytest.raises(ValueError):
        block_mask(8, 14, 118, min_block=0)
    with pytest.raises(ValueError):
        block_mask(8, 14, 118, attempts=0)
    with pytest.raises(ValueError):
        block_mask(8, 14, 118, max_rounds=-1)


def test_num_masked_for_grid():
    assert num_masked_for_grid(14) == 118
    assert num_masked_for_grid(8) == 39  # 38.53
    assert num_masked_for_grid(7) == 30  # 29.5 exactly: half up
    assert num_masked_for_grid(4) == 10  # 9.63
    assert num_masked_for_grid(16) == 154
    assert num_masked_for_grid(28) == 472
    assert num_masked_for_grid(3, 0.5) == 5  # 4.5: half up
    assert num_masked_for_grid(10, 0.75) == 75
    assert num_masked_for_grid(2, 1.0) == 4 and num_masked_for_grid(2, 0.0) == 0
    for bad in [(0,), (14, 1.5), (14, -0.1)]:
        with pytest.raises(ValueError):
            num_masked_for_grid(*bad)
