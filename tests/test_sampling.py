"""Cluster-aware samplers: exact counts, labels, marginals, determinism, per-rank streams."""
import numpy as np
import pytest
import torch

from ant_core.clustering import IntervalClusters
from ant_core.sampling import StratifiedSampler, UniformSampler

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
