"""Cluster-aware samplers: exact counts, labels, marginals, determinism, per-rank streams; labels
of continuous noise levels."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ant_core
from ant_core.clustering import IntervalClusters
from ant_core.sampling import NoiseLevelGroups, StratifiedSampler, UniformSampler, group_counts

BOUNDS = [(0, 3), (3, 10), (10, 11), (11, 40), (40, 50)]


@pytest.fixture
def clusters():
    return IntervalClusters.from_bounds(BOUNDS)


def _label_of(t):
    for k, (s, e) in enumerate(BOUNDS):
        if s <= t < e:
            return k
    raise AssertionError(t)


@pytest.mark.parametrize("batch_size", range(1, 3 * len(BOUNDS) + 1))
def test_stratified_exact_counts_and_labels(clusters, batch_size):
    k = len(BOUNDS)
    sampler = StratifiedSampler(clusters, seed=1)
    total = torch.zeros(k, dtype=torch.long)
    for _ in range(k):  # one full round-robin cycle
        t, group = sampler.sample(batch_size)
        assert t.dtype == group.dtype == torch.long and t.shape == group.shape == (batch_size,)
        counts = torch.bincount(group, minlength=k)
        base, rem = divmod(batch_size, k)
        assert set(counts.tolist()) <= {base, base + 1}
        assert int((counts == base + 1).sum()) == rem
        assert [_label_of(int(x)) for x in t] == group.tolist()
        assert torch.all(group[1:] >= group[:-1])  # contiguous ascending segments
        total += counts
    # over a full cycle every cluster gets exactly the same number of samples
    assert torch.all(total == total[0])


def test_stratified_within_cluster_uniform(clusters):
    sampler = StratifiedSampler(clusters, seed=3)
    t = torch.cat([sampler.sample(50)[0] for _ in range(400)])
    for s, e in BOUNDS:
        hist = torch.bincount(t[(t >= s) & (t < e)] - s, minlength=e - s).double()
        n = hist.sum()
        expected = n / (e - s)
        chi2 = ((hist - expected) ** 2 / expected).sum().item()
        dof = e - s - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10


def test_uniform_marginal_and_labels(clusters):
    sampler = UniformSampler(clusters, seed=5)
    ts, gs = zip(*(sampler.sample(97) for _ in range(300)))
    t, g = torch.cat(ts), torch.cat(gs)
    assert g.tolist() == [_label_of(int(x)) for x in t]
    hist = torch.bincount(t, minlength=50).double()
    expected = t.numel() / 50
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 49 + 6 * np.sqrt(98)
    assert t.min() >= 0 and t.max() < 50


def test_unsorted_order_is_a_permutation(clusters):
    a = StratifiedSampler(clusters, seed=7, sort_by_group=False).sample(40)
    b = StratifiedSampler(clusters, seed=7, sort_by_group=True).sample(40)
    assert not torch.all(a[1][1:] >= a[1][:-1])
    assert sorted(a[1].tolist()) == b[1].tolist()


@pytest.mark.parametrize("cls", [StratifiedSampler, UniformSampler])
def test_determinism_and_rank_streams(clusters, cls):
    a = cls(clusters, seed=11).sample(64)
    b = cls(clusters, seed=11).sample(64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    r0 = cls(clusters, seed=11, rank=0, world_size=2).sample(64)
    r1 = cls(clusters, seed=11, rank=1, world_size=2).sample(64)
    assert not torch.equal(r0[0], r1[0])
    gen = torch.Generator().manual_seed(3)
    c = cls(clusters, generator=gen).sample(8)
    d = cls(clusters, generator=torch.Generator().manual_seed(3)).sample(8)
    assert torch.equal(c[0], d[0])


def test_ranks_spread_remainder_like_one_process(clusters):
    """Two ranks together give the remainder the same clusters as one process over two calls."""
    k, batch = len(BOUNDS), 7
    single = StratifiedSampler(clusters, seed=0)
    ranks = [StratifiedSampler(clusters, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        union = sum(torch.bincount(s.sample(batch)[1], minlength=k) for s in ranks)
        one = sum(torch.bincount(single.sample(batch)[1], minlength=k) for _ in range(2))
        assert torch.equal(union, one)


def test_state_dict_resumes(clusters):
    s = StratifiedSampler(clusters, seed=2)
    s.sample(7)
    state = s.state_dict()
    x = s.sample(7)
    s2 = StratifiedSampler(clusters, seed=99)
    s2.load_state_dict(state)
    y = s2.sample(7)
    assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    uniform = UniformSampler(clusters, seed=2)
    for bad in ({}, {"generator": state["generator"]}, uniform.state_dict(), [state]):
        with pytest.raises(ValueError, match="state: a StratifiedSampler state has the keys"):
            s2.load_state_dict(bad)
    with pytest.raises(ValueError, match="state: a UniformSampler state"):
        uniform.load_state_dict(state)
    assert torch.equal(s2.sample(7)[0], s.sample(7)[0])      # the refusals changed nothing


def test_device_argument(clusters):
    t, g = UniformSampler(clusters, seed=0).sample(4, device="cpu")
    assert t.device.type == "cpu"


def test_bad_arguments(clusters):
    s = StratifiedSampler(clusters, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        s.sample(0)
    with pytest.raises(TypeError, match="batch_size"):
        s.sample(2.0)
    with pytest.raises(TypeError, match="batch_size"):
        UniformSampler(clusters, seed=0).sample(True)
    with pytest.raises(TypeError, match="clusters"):
        StratifiedSampler([(0, 3)])
    with pytest.raises(ValueError, match="rank"):
        StratifiedSampler(clusters, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        StratifiedSampler(clusters, seed=-1)
    with pytest.raises(ValueError, match="generator"):
        StratifiedSampler(clusters, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="sort_by_group"):
        StratifiedSampler(clusters, sort_by_group=1)


# ----- continuous noise levels -------------------------------------------------------------

def _nearest_grid_label(clusters, grid_log_snr, log_snr):
    """Brute force: the label of the grid timestep nearest in log-SNR (first on ties)."""
    lam = torch.as_tensor(grid_log_snr, dtype=torch.float64)
    nearest = torch.argmin((log_snr.double().reshape(-1, 1) - lam).abs(), dim=1)
    return torch.tensor(np.array(clusters.labels))[nearest].reshape(log_snr.shape)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["linear", "cosine", "log_snr_grid"]), st.integers(2, 60),
       st.data())
def test_noise_level_groups_match_nearest_grid_timestep(schedule_name, T, data):
    from ant_core import schedules

    schedule = schedules.get_schedule(schedule_name, T)
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), min_size=0, max_size=min(7, T - 1))))
    edges = [0, *cuts, T]
    clusters = IntervalClusters.from_bounds(list(zip(edges[:-1], edges[1:])))
    to_group = NoiseLevelGroups(clusters, schedule)
    grid = torch.tensor(schedule.log_snr)
    # every grid point gets its own label, as sigma and as log-SNR
    assert torch.equal(to_group(log_snr=grid), torch.tensor(np.array(clusters.labels)))
    labels = torch.tensor(np.array(clusters.labels))
    assert torch.equal(to_group(sigma=torch.tensor(schedule.sigmas)), labels)
    # random levels inside and beyond the grid, in float32 and float64, any shape
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    span = float(grid[0] - grid[-1])
    uniform = torch.rand(4, 50, generator=gen, dtype=torch.float64)
    levels = grid[-1] - 0.2 * span + 1.4 * span * uniform
    for dtype in (torch.float64, torch.float32):
        values = levels.to(dtype)
        expected = _nearest_grid_label(clusters, schedule.log_snr, values)
        assert torch.equal(to_group(log_snr=values), expected)
        sigma = torch.exp(-values.double() / 2)
        assert torch.equal(to_group(sigma=sigma), expected)


def test_noise_level_groups_boundaries_edges_and_nan():
    from ant_core import schedules

    schedule = schedules.log_snr_grid(10, sigma_min=0.01, sigma_max=100.0)
    clusters = IntervalClusters.from_bounds([(0, 4), (4, 7), (7, 10)])
    to_group = NoiseLevelGroups(clusters, schedule)
    lam = schedule.log_snr
    on_boundaries = torch.tensor([(lam[3] + lam[4]) / 2, (lam[6] + lam[7]) / 2],
                                 dtype=torch.float64)
    assert to_group(log_snr=on_boundaries).tolist() == [0, 1]  # ties go to the less noisy cluster
    nudged = on_boundaries - 1e-9
    assert to_group(log_snr=nudged).tolist() == [1, 2]
    edges = torch.tensor([0.0, 1e-30, 1e30, float("inf")], dtype=torch.float64)
    assert to_group(sigma=edges).tolist() == [0, 0, 2, 2]  # beyond the grid: the end clusters
    bad = torch.tensor([float("nan"), -1.0, 1.0])  # NaN and a negative sigma: label k
    assert to_group(sigma=bad).tolist() == [3, 3, 1]
    pred = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="group"):  # grouped_mse reports it
        ant_core.grouped_mse(pred, pred, to_group(sigma=bad), clusters.k)


def test_noise_level_groups_bad_input():
    from ant_core import schedules

    schedule = schedules.linear(50)
    clusters = IntervalClusters.from_bounds(BOUNDS)
    to_group = NoiseLevelGroups(clusters, schedule)
    with pytest.raises(ValueError, match="exactly one"):
        to_group()
    with pytest.raises(ValueError, match="exactly one"):
        to_group(sigma=torch.ones(2), log_snr=torch.ones(2))
    with pytest.raises(TypeError, match="sigma"):
        to_group(sigma=[1.0])
    with pytest.raises(TypeError, match="log_snr"):
        to_group(log_snr=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="T=50"):
        NoiseLevelGroups(clusters, schedules.linear(60))
    with pytest.raises(TypeError, match="clusters"):
        NoiseLevelGroups(BOUNDS, schedule)
    zero_terminal = np.concatenate([schedule.alphas_cumprod[:-1], [0.0]])
    with pytest.raises(ValueError, match="finite"):
        NoiseLevelGroups(IntervalClusters.from_bounds([(0, 49), (49, 50)]), zero_terminal)
    # an infinite log-SNR away from the boundaries is fine
    assert NoiseLevelGroups(clusters, zero_terminal)(log_snr=torch.tensor([-1e9])).item() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_level_groups_cuda_matches_cpu():
    from ant_core import schedules

    schedule = schedules.cosine(1000)
    clusters = ant_core.interval_clustering(5, "log_snr", schedule=schedule)
    to_group = NoiseLevelGroups(clusters, schedule)
    sigma = torch.exp(torch.randn(4096, dtype=torch.float64) * 3)
    on_cuda = to_group(sigma=sigma.cuda())
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), to_group(sigma=sigma))


def test_group_counts_checks_the_ids():
    torch.testing.assert_close(group_counts(torch.tensor([0, 2, 2, 1]), np.int64(4)),
                               torch.tensor([1, 1, 2, 0]))
    assert group_counts(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]
    for bad, error in ((torch.tensor([0, 7]), ValueError), (torch.tensor([-1, 0]), ValueError),
                       (torch.tensor([0.0, 1.0]), TypeError), (torch.tensor([True]), TypeError),
                       ([0, 1], TypeError)):
        with pytest.raises(error, match="group"):
            group_counts(bad, 4)
    with pytest.raises(ValueError, match="num_groups"):
        group_counts(torch.tensor([0]), 0)
