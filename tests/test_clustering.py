"""Interval clustering against exhaustive brute force and direct O(T) cost evaluation."""
import itertools
import json
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ant_core import IntervalClusters, interval_clustering
from ant_core import schedules

# ----------------------------------------------------------------------------- brute force


def all_partitions(T, k, min_size=1, max_size=None):
    """Every split of [0, T) into k non-empty contiguous intervals, as bounds tuples."""
    max_size = max_size or T
    for cuts in itertools.combinations(range(1, T), k - 1):
        edges = (0,) + cuts + (T,)
        bounds = tuple(zip(edges[:-1], edges[1:]))
        if all(min_size <= e - s <= max_size for s, e in bounds):
            yield bounds


def tie_key(bounds, cost):
    """The documented tie-breaking: cost, then sum of squared sizes, then the boundaries
    compared from the last one backwards."""
    sizes = [e - s for s, e in bounds]
    return (cost, sum(n * n for n in sizes), tuple(reversed([s for s, _ in bounds])))


def total(interval_cost, bounds):
    """The exact sum of a partition's interval costs (Fractions: no rounding)."""
    return sum(Fraction(interval_cost(s, e - 1)) for s, e in bounds)


def brute_force(interval_cost, T, k, min_size=1, max_size=None):
    """(best bounds under the tie rule, best cost) or None if infeasible."""
    best = None
    for bounds in all_partitions(T, k, min_size, max_size):
        cost = total(interval_cost, bounds)
        key = tie_key(bounds, cost)
        if best is None or key < best[0]:
            best = (key, bounds, cost)
    return None if best is None else (best[1], float(best[2]))


def middle(l, r):
    return l + (r - l) // 2


def direct_cost(objective, x=None, A=None):
    """O(T) evaluation of an objective's cost for the inclusive interval l..r, in exact
    rational arithmetic (a Fraction)."""
    x = None if x is None else [Fraction(v) for v in np.asarray(x, dtype=float).tolist()]
    A = None if A is None else [[Fraction(v) for v in row] for row in np.asarray(A).tolist()]
    if objective == "abs":
        return lambda l, r: sum(abs(v - x[middle(l, r)]) for v in x[l:r + 1])
    if objective == "sse":
        def sse(l, r):
            mean = sum(x[l:r + 1]) / (r - l + 1)
            return sum((v - mean) ** 2 for v in x[l:r + 1])
        return sse
    if objective == "affinity":
        return lambda l, r: -sum(A[middle(l, r)][l:r + 1])
    if objective == "affinity_medoid":
        return lambda l, r: -max(sum(A[c][l:r + 1]) for c in range(l, r + 1))
    if objective == "affinity_average":
        return lambda l, r: -sum(sum(row[l:r + 1]) for row in A[l:r + 1]) / (r - l + 1)
    raise AssertionError(objective)


def check_against_brute(result, interval_cost, T, k, exact_ties, min_size=1, max_size=None):
    expected = brute_force(interval_cost, T, k, min_size, max_size)
    assert expected is not None
    bounds, cost = expected
    assert result.cost == pytest.approx(cost, rel=1e-9, abs=1e-9)
    if exact_ties:
        assert result.bounds == bounds
    else:  # float costs: the found partition must be optimal when evaluated directly
        assert float(total(interval_cost, result.bounds)) == pytest.approx(cost, rel=1e-9,
                                                                           abs=1e-9)
    for kk in range(1, k + 1):
        sub = brute_force(interval_cost, T, kk, min_size, max_size)
        want = np.inf if sub is None else sub[1]
        assert result.costs_by_k[kk - 1] == pytest.approx(want, rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------- cost matrices


@pytest.mark.parametrize("T", range(1, 13))
def test_integer_cost_matrix_matches_brute_force_with_ties(T):
    rng = np.random.default_rng(T)
    for trial in range(3):
        C = rng.integers(-3, 4, size=(T, T)).astype(float)  # zeros, negatives, many ties
        for k in range(1, T + 1):
            for method in ("exact", "auto"):
                res = interval_clustering(k, cost_matrix=C, method=method)
                check_against_brute(res, lambda l, r: C[l, r], T, k, exact_ties=True)


@pytest.mark.parametrize("T", [10, 12])
def test_float_cost_matrix_matches_brute_force(T):
    rng = np.random.default_rng(100 + T)
    C = rng.normal(size=(T, T))
    for k in (1, 2, 3, T // 2, T - 1, T):
        res = interval_clustering(k, cost_matrix=C)
        check_against_brute(res, lambda l, r: C[l, r], T, k, exact_ties=False)


def test_lower_triangle_is_ignored():
    rng = np.random.default_rng(0)
    C = rng.normal(size=(8, 8))
    D = C.copy()
    D[np.tril_indices(8, -1)] = 1e9
    assert interval_clustering(3, cost_matrix=C) == interval_clustering(3, cost_matrix=D)
    for unused in (np.nan, np.inf, -np.inf):  # "unused" marks below the diagonal are accepted
        D[np.tril_indices(8, -1)] = unused
        assert interval_clustering(3, cost_matrix=D) == interval_clustering(3, cost_matrix=C)
    D[2, 5] = np.nan  # one that is read is not
    with pytest.raises(ValueError, match=r"cost_matrix\[2, 5\] = nan"):
        interval_clustering(3, cost_matrix=D)


@pytest.mark.parametrize("min_size,max_size", [(2, None), (1, 3), (2, 4), (3, 3)])
def test_size_bounds_match_brute_force(min_size, max_size):
    rng = np.random.default_rng(7)
    T = 12
    C = rng.integers(-5, 6, size=(T, T)).astype(float)
    for k in range(1, T + 1):
        feasible = brute_force(lambda l, r: C[l, r], T, k, min_size, max_size) is not None
        if not feasible:
            with pytest.raises(ValueError, match="size"):
                interval_clustering(k, cost_matrix=C, min_size=min_size, max_size=max_size)
            continue
        res = interval_clustering(k, cost_matrix=C, min_size=min_size, max_size=max_size)
        assert all(min_size <= e - s <= (max_size or T) for s, e in res.bounds)
        check_against_brute(res, lambda l, r: C[l, r], T, k, True, min_size, max_size)


# ----------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("objective", ["abs", "sse"])
def test_series_objectives_match_brute_force(objective):
    rng = np.random.default_rng(1)
    for T in (1, 2, 5, 9, 12):
        x = np.sort(rng.normal(size=T))[:: 1 if T % 2 else -1]  # both monotone directions
        for k in range(1, T + 1):
            res = interval_clustering(k, objective, values=x)
            check_against_brute(res, direct_cost(objective, x=x), T, k, exact_ties=False)


def test_sse_on_unsorted_series_uses_exact_path():
    rng = np.random.default_rng(2)
    x = rng.normal(size=11)
    for k in range(1, 12):
        res = interval_clustering(k, "sse", values=x)
        assert not res.fast_path
        check_against_brute(res, direct_cost("sse", x=x), 11, k, exact_ties=False)


def test_integer_series_ties_match_brute_force():
    x = np.array([0, 0, 1, 1, 1, 2, 4, 4, 7, 7, 7, 9], dtype=float)  # many equal costs
    for objective in ("abs", "sse"):
        for k in range(1, 13):
            res = interval_clustering(k, objective, values=x)
            # sse divides by the size, so only abs has exactly representable costs here
            check_against_brute(res, direct_cost(objective, x=x), 12, k,
                                exact_ties=objective == "abs")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.1, 0.2, 0.3, 0.7, 1 / 3]), st.integers(1, 4)),
                min_size=1, max_size=4, unique_by=lambda run: run[0]),
       st.booleans(), st.sampled_from(["abs", "sse"]), st.data())
def test_constant_runs_of_non_integer_values_cost_exactly_zero(runs, descending, objective, data):
    """With k >= the number of constant runs the optimum is 0 and every interval is constant:
    prefix sums of 0.1, 1/3, ... leave rounding residues, yet equally good partitions must tie
    exactly, so both methods return the brute force's most balanced partition."""
    runs = sorted(runs, reverse=descending)
    x = np.concatenate([np.full(n, v) for v, n in runs])
    k = data.draw(st.integers(len(runs), x.size))
    direct = direct_cost(objective, x=x)
    cost = lambda l, r: 0.0 if np.all(x[l:r + 1] == x[l]) else direct(l, r)
    for method in ("exact", "monge"):
        res = interval_clustering(k, objective, values=x, method=method)
        assert res.cost == 0.0
        check_against_brute(res, cost, x.size, k, exact_ties=True)


@pytest.mark.parametrize("objective", ["abs", "sse"])
@pytest.mark.parametrize("values", [[0.7, 1 / 3, 0.3, 0.2], [0.1, 0.25, 0.7, 1.3, 2.9, 3.1, 4.7],
                                    [0.1, 0.25, 0.7, 0.7, 1.3]])
def test_one_value_intervals_cost_exactly_zero(objective, values):
    """With k = T every interval holds one value: cost exactly 0 whether or not the series has
    equal neighbours elsewhere (s2 - s * s / 1 rounds either way for non-integer values)."""
    for method in ("exact", "monge"):
        res = interval_clustering(len(values), objective, values=values, method=method)
        assert res.cost == 0.0 and res.costs_by_k[-1] == 0.0


@pytest.mark.parametrize("kwargs", [
    dict(k=2, objective="sse", values=[0.0, 1e200, 2e200, 3e200]),
    dict(k=2, objective="abs", values=[0.0, 1e308, 1.5e308]),
    dict(k=2, objective="abs", values=[-1.7e308, 1.7e308]),  # their difference overflows
    dict(k=3, affinity=np.full((3, 3), 1e308)),
    dict(k=3, affinity=np.full((3, 3), 1e308), method="exact"),
    dict(k=2, affinity=np.full((3, 3), 1e308), objective="affinity_average"),
    dict(k=4, cost_matrix=np.diag([1e308] * 4)),
    dict(k=4, cost_matrix=np.diag([1e308, 1e308, -1e308, -1e308])),  # partial sums overflow
    # a partial sum overflowed on the optimum's path while the final one stayed finite: the
    # solver stepped around it and returned a worse partition
    dict(k=3, cost_matrix=np.array([[1e308, 1e308, 0, 0], [0, 1e308, 0, 0], [0, 0, 0, -1.5e308],
                                    [0, 0, 0, 0]])),
    dict(k=3, cost_matrix=np.array([[1e308, 1e308, 0, 0], [0, 1e308, 0, 0], [0, 0, 0, -1.5e308],
                                    [0, 0, 0, 0]]), method="exact"),
])
def test_finite_input_whose_costs_overflow_is_a_clear_error(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error, not a numpy overflow warning before it
        with pytest.raises(ValueError, match="overflow double precision"):
            interval_clustering(**kwargs)


@pytest.mark.parametrize("objective", ["affinity", "affinity_medoid", "affinity_average"])
def test_affinity_objectives_match_brute_force(objective):
    rng = np.random.default_rng(3)
    for T in (1, 4, 9, 12):
        G = rng.normal(size=(T, 3))
        A = G @ G.T  # symmetric, like a gradient-cosine matrix
        if objective == "affinity":
            A = A + rng.normal(scale=0.1, size=(T, T))  # the middle centre accepts any matrix
        for k in sorted({1, 2, 3, T}):
            if k > T:
                continue
            res = interval_clustering(k, objective, affinity=A)
            check_against_brute(res, direct_cost(objective, A=A), T, k, exact_ties=False)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "log_snr_grid"])
@pytest.mark.parametrize("objective", ["timestep", "snr", "log_snr"])
def test_schedule_objectives_match_brute_force(name, objective):
    T = 12
    sched = schedules.get_schedule(name, T)
    x = {"timestep": np.arange(T, dtype=float), "snr": sched.snr, "log_snr": sched.log_snr}[objective]
    for k in range(1, T + 1):
        res = interval_clustering(k, objective, schedule=name, T=T)
        check_against_brute(res, direct_cost("abs", x=x), T, k, exact_ties=objective == "timestep")


def test_paper_reference_results():
    uniform = tuple((200 * i, 200 * (i + 1)) for i in range(5))
    assert interval_clustering(5, "timestep", T=1000).bounds == uniform
    assert interval_clustering(5, "snr", schedule="linear", T=1000).bounds == (
        (0, 1), (1, 2), (2, 5), (5, 18), (18, 1000))
    assert interval_clustering(5, "log_snr", schedule="linear", T=1000).bounds == (
        (0, 153), (153, 394), (394, 624), (624, 823), (823, 1000))
    assert interval_clustering(5).bounds == interval_clustering(5, "log_snr").bounds


# ----------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
@pytest.mark.parametrize("objective", ["timestep", "snr", "log_snr"])
def test_fast_path_equals_exact_on_schedules(name, objective):
    for T in (97, 1000):
        for k in (1, 2, 3, 5, 8, 16):
            for bounds in ({}, {"min_size": min(10, T // k)}, {"max_size": 2 * T // k + 1}):
                fast = interval_clustering(k, objective, schedule=name, T=T, method="monge", **bounds)
                exact = interval_clustering(k, objective, schedule=name, T=T, method="exact", **bounds)
                assert fast.fast_path and not exact.fast_path
                assert fast.bounds == exact.bounds
                assert fast.cost == pytest.approx(exact.cost, rel=1e-12)
                np.testing.assert_allclose(fast.costs_by_k, exact.costs_by_k, rtol=1e-12)


@pytest.mark.parametrize("objective", ["abs", "sse"])
def test_fast_path_equals_exact_on_monotone_series(objective):
    rng = np.random.default_rng(4)
    for trial in range(5):
        x = np.cumsum(rng.exponential(size=300))
        if trial % 2:
            x = np.round(x)  # integer values: exact ties
        for k in (1, 4, 9, 30):
            fast = interval_clustering(k, objective, values=x, method="monge", min_size=trial + 1)
            exact = interval_clustering(k, objective, values=x, method="exact", min_size=trial + 1)
            assert fast.bounds == exact.bounds
            np.testing.assert_allclose(fast.costs_by_k, exact.costs_by_k, rtol=1e-10)


def test_fast_path_equals_exact_on_verified_monge_matrix():
    rng = np.random.default_rng(5)
    T = 60
    lengths = np.subtract.outer(np.arange(T), np.arange(T)).T + 1  # r - l + 1
    C = np.floor(lengths.astype(float) ** 2 / 4)  # integer, convex in length: Monge, tied
    w = rng.integers(0, 3, size=T).astype(float)
    C += np.add.outer(np.cumsum(w), -np.cumsum(w))  # + f(r) - f(l): still Monge
    C[np.tril_indices(T, -1)] = 0.0
    auto = interval_clustering(7, cost_matrix=C)
    exact = interval_clustering(7, cost_matrix=C, method="exact")
    assert auto.fast_path
    assert auto.bounds == exact.bounds and auto.costs_by_k == exact.costs_by_k


def test_monge_refused_when_not_allowed():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="Monge"):
        interval_clustering(3, cost_matrix=rng.normal(size=(20, 20)), method="monge")
    with pytest.raises(ValueError, match="Monge"):
        interval_clustering(3, "sse", values=rng.normal(size=20), method="monge")


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8).flatmap(lambda T: st.tuples(
        st.just(T), st.integers(1, T),
        st.lists(st.integers(-4, 4), min_size=T * T, max_size=T * T))))
def test_property_integer_matrix(args):
    T, k, flat = args
    C = np.array(flat, dtype=float).reshape(T, T)
    res = interval_clustering(k, cost_matrix=C)
    check_against_brute(res, lambda l, r: C[l, r], T, k, exact_ties=True)


MIXED = st.one_of(st.integers(-6, 6).map(float), st.floats(-1, 1),
                  st.sampled_from([1e8, -1e8, 1e17, -1e17]))


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 7).flatmap(lambda T: st.tuples(
    st.just(T), st.integers(1, T), st.lists(MIXED, min_size=T * T, max_size=T * T))),
    st.sampled_from(["abs", "sse", "affinity", "affinity_medoid", "affinity_average"]),
    st.sampled_from(["exact", "auto"]))
def test_property_magnitudes_far_apart(args, objective, method):
    """A value 1e17 before an interval used to swamp the interval's cost (prefix sums): e.g.
    abs on [1e17, 5, 5, 0] with k = 3 returned a partition of cost 5 and reported 0. Each cost
    is a double, so the objective is exact up to rounding of the costs themselves (a few eps
    times the sum of their magnitudes) plus eps^2 times the sums behind them, no longer eps
    times what lies outside their intervals."""
    T, k, flat = args
    if objective.startswith("affinity"):
        A = np.array(flat).reshape(T, T)
        result, cost = interval_clustering(k, objective, affinity=A, method=method), \
            direct_cost(objective, A=A)
    else:
        x = np.array(flat[:T])
        # squares of 1e17 next to 1 span 1e34, beyond double-double's ~1e32: sse is exact for
        # values within about 1e15 of each other
        x = np.sort(x) if objective == "abs" else np.clip(x, -1e8, 1e8)
        result, cost = interval_clustering(k, objective, values=x, method=method), \
            direct_cost(objective, x=x)
    best, _ = brute_force(cost, T, k)
    magnitude = sum(abs(cost(s, e - 1)) for bounds in (best, result.bounds) for s, e in bounds)
    # sse keeps its one-line formula where its rounding stays below 4096 eps of the cost; the
    # compensated prefix sums add ~eps^2 times the sums (from the series' middle value)
    eps = np.finfo(float).eps
    if objective.startswith("affinity"):
        sums = np.abs(A).sum()
    else:
        deviation = np.abs(x - x[len(x) // 2])
        sums = (deviation**2 if objective == "sse" else deviation).sum()
    tolerance = (8 * 4096 if objective == "sse" else 8) * eps * float(magnitude) + \
        64 * eps**2 * sums
    got = total(cost, result.bounds)
    assert float(got - total(cost, best)) <= tolerance          # an optimal partition
    assert abs(result.cost - float(got)) <= tolerance           # and its cost


def test_auto_leaves_monge_where_rounding_reaches_the_data_resolution():
    """Next to values of 1e16 the Monge path's partial sums round by ~2, near-ties among them
    steer its pruning, and it returned cost 3 where the optimum is 2; auto now takes the exact
    path there, and keeps the fast one for the paper's objectives."""
    x = [-2, -1, -1, 0, 2, 1e16, 1e16]
    auto = interval_clustering(3, "abs", values=x, max_size=4)
    exact = interval_clustering(3, "abs", values=x, max_size=4, method="exact")
    assert auto == exact and auto.cost == 2.0 and not auto.fast_path
    for objective in ("timestep", "snr", "log_snr"):
        assert interval_clustering(5, objective).fast_path
    assert interval_clustering(32, "log_snr", T=100_000).fast_path  # exact: not affordable


def test_cancellation_cases_are_exact():
    """Fixed cases of the paths the property test rarely reaches: sse's pair path (values 0, 1
    next to 1e8: its one-line formula gives 0), sse near the overflow bound (the pair path's
    split overflowed: "a sum of 1 interval costs is inf"), abs on a series with a common offset
    of 1e12 (1% off before its middle value was subtracted), and non-negative costs whose
    partial sums overflow away from the optimum (refused, though the optimum is 0)."""
    # (accuracy: about eps * cost + eps^2 * the squares; the 1e153 case has squares 1e25 times
    # its cost)
    # abs: small values far from the series' middle value (the cost of (6, 9) was 32776, not
    # 7.985: its two halves' deviations from the middle, ~1e20 each, were rounded separately)
    far = [-2.3648563937947868e+20, -2.3643928154405641e+20, -2.1372815000653067e+20,
           -1.9527746923108044e+20, -1.611628304810349e+20, -1.0964267893099517e+20,
           0.32705999371858363, 6.0431693130821635, 8.3122415976119015]
    for k, x, rel, objective in ((3, [0, 1, 1e8, 1e8, 2, 3], 1e-12, "sse"),
                                 (2, [1e153, 1e153 * (1 + 1e-12), 0, 0], 1e-6, "sse"),
                                 (3, 1e12 + 0.001 * np.arange(40), 1e-12, "abs"),
                                 (7, far, 1e-12, "abs"),
                                 (2, [-1e17] * 4 + [1, 2, 4], 1e-12, "abs")):
        res = interval_clustering(k, objective, values=x)
        cost = direct_cost(objective, x=x)
        exact = total(cost, res.bounds)
        assert float(exact) == float(total(cost, brute_force(cost, len(x), k)[0]))
        assert res.cost == pytest.approx(float(exact), rel=rel)
    C = np.zeros((3, 3))
    C[0, 0] = C[1, 1] = 1e308
    res = interval_clustering(2, cost_matrix=C)
    assert res.bounds == ((0, 2), (2, 3)) and res.cost == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=60),
       st.integers(1, 10), st.sampled_from(["abs", "sse"]))
def test_property_monotone_series_fast_equals_exact(xs, k, objective):
    x = np.sort(np.array(xs))
    k = min(k, x.size)
    fast = interval_clustering(k, objective, values=x, method="monge")
    exact = interval_clustering(k, objective, values=x, method="exact")
    np.testing.assert_allclose(fast.costs_by_k, exact.costs_by_k, rtol=1e-9, atol=1e-6)
    # splitting never hurts for these costs: costs_by_k is non-increasing
    assert all(a >= b - 1e-6 for a, b in zip(exact.costs_by_k, exact.costs_by_k[1:]))
    labels = exact.labels
    assert labels.shape == (x.size,) and labels.dtype == np.int64
    assert np.all(np.diff(labels) >= 0) and labels[0] == 0 and labels[-1] == k - 1


# ----------------------------------------------------------------------------- the result type


def test_interval_clusters_type():
    c = IntervalClusters.from_bounds([(0, 3), (3, 4), (4, 10)])
    assert c.k == 3 and c.T == 10 and len(c) == 3
    assert c.labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    assert c.sizes.tolist() == [3, 1, 6]
    assert c.group_of(3) == 1 and c.group_of(np.array([0, 9])).tolist() == [0, 2]
    with pytest.raises(ValueError, match="t must"):
        c.group_of(10)
    assert IntervalClusters.from_dict(c.to_dict()) == c
    # strict JSON: an unknown cost (NaN) and an infeasible k's cost (inf) are null
    bounded = interval_clustering(3, "timestep", T=10, max_size=4)
    assert bounded.costs_by_k[:2] == (np.inf, np.inf)
    for clusters in (c, bounded):
        assert IntervalClusters.from_dict(json.loads(clusters.to_json())) == clusters
    assert IntervalClusters.uniform(1000, 5).bounds == interval_clustering(5, "timestep").bounds
    with pytest.raises(ValueError, match="contiguous"):
        IntervalClusters.from_bounds([(0, 3), (4, 5)])
    with pytest.raises(ValueError, match="non-empty"):
        IntervalClusters.from_bounds([(0, 0), (0, 5)])
    with pytest.raises(ValueError, match="start at 0"):
        IntervalClusters.from_bounds([(1, 5)])
    with pytest.raises(ValueError):
        c.labels[0] = 5  # read-only


def test_interval_clusters_pickle_and_checked_fields():
    """Pickled clusters without a cost compared unequal (NaN identity) and had writable labels;
    from_dict read "12" as costs (1.0, 2.0), "no" as fast_path and True as a cost."""
    import pickle

    for c in (IntervalClusters.uniform(10, 3), interval_clustering(3, "timestep", T=10)):
        back = pickle.loads(pickle.dumps(c))
        assert back == c and not back.labels.flags.writeable
    base = {"bounds": [[0, 2], [2, 5]]}
    for extra, error, name in (({"costs_by_k": "12"}, TypeError, "costs_by_k"),
                               ({"costs_by_k": None}, TypeError, "costs_by_k"),
                               ({"costs_by_k": [1.0, "2"]}, TypeError, "costs_by_k"),
                               ({"costs_by_k": [float("nan")]}, ValueError, "costs_by_k"),
                               ({"costs_by_k": [-np.inf]}, ValueError, "costs_by_k"),
                               ({"cost": True}, TypeError, "cost"),
                               ({"cost": np.inf}, ValueError, "cost must be finite"),
                               ({"fast_path": "no"}, TypeError, "fast_path"),
                               ({"objective": 3}, TypeError, "objective")):
        with pytest.raises(error, match=name):
            IntervalClusters.from_dict({**base, **extra})
    ok = IntervalClusters.from_dict({**base, "cost": np.float32(1.5), "costs_by_k": [np.inf, 2]})
    assert ok.cost == 1.5 and ok.costs_by_k == (np.inf, 2.0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=6, objective="timestep", T=5), ValueError, "k must be <= T"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=2, objective="nope"), ValueError, "objective must be one of"),
    (dict(k=2, method="fast"), ValueError, "method must be one of"),
    (dict(k=2, values=[1.0, np.nan, 3.0]), ValueError, "values must be finite"),
    (dict(k=2, values=[]), ValueError, "values must not be empty"),
    (dict(k=2, values=np.ones((2, 2))), ValueError, "values must be 1-D"),
    (dict(k=2, objective="abs", values=[3.0, 1.0, 2.0]), ValueError, "monotone"),
    (dict(k=2, cost_matrix=np.ones((3, 4))), ValueError, "cost_matrix must be square"),
    (dict(k=2, cost_matrix=np.full((3, 3), np.inf)), ValueError, "cost_matrix must be finite"),
    (dict(k=2, affinity=np.full((3, 3), np.nan)), ValueError, "affinity must be finite"),
    (dict(k=2, objective="affinity"), ValueError, "needs the argument affinity"),
    (dict(k=2, objective="snr", values=[1.0, 2.0]), ValueError, "does not take values"),
    (dict(k=2, values=[1.0, 2.0], cost_matrix=np.ones((2, 2))), ValueError, "only one of"),
    (dict(k=3, objective="timestep", T=10, min_size=4), ValueError, "infeasible size bounds"),
    (dict(k=2, objective="timestep", T=10, max_size=4), ValueError, "infeasible size bounds"),
    (dict(k=2, objective="timestep", T=10, min_size=0), ValueError, "min_size must be >= 1"),
    (dict(k=2, objective="timestep", T=10, min_size=3, max_size=2), ValueError, "max_size"),
    (dict(k=2, objective="log_snr", T=0), ValueError, "T must be >= 1"),
    (dict(k=2, cost_matrix=np.ones((3, 3)), T=4), ValueError, "does not match"),
    (dict(k=2, objective="timestep", schedule=schedules.linear(50).alphas_cumprod, T=60),
     ValueError, "does not match"),
    (dict(k=2, schedule="quadratic"), ValueError, "schedule must be one of"),
    (dict(k=1, objective="timestep", T=5, min_size=6), ValueError,  # named max_size before
     "min_size must be <= T, got min_size=6 > T=5"),
    (dict(k=2, values=[1.0, 2.0, 3.0], schedule="cosine"), ValueError, "schedule does not apply"),
    (dict(k=2, affinity=np.eye(4), schedule="linear"), ValueError, "schedule does not apply"),
    # an unknown schedule name was ignored by the timestep objective
    (dict(k=2, objective="timestep", schedule="nope", T=10), ValueError, "schedule must be one of"),
    (dict(k=1, values=3.0), ValueError, "values must be 1-D"),  # was a length-1 series
    (dict(k=2, objective="timestep", T=5, min_size=2**70), ValueError,  # was pybind's dump
     "min_size must be <= T"),
    (dict(k=2, values=[True, False, True]), TypeError, "values must be an array of real numbers"),
    (dict(k=2, cost_matrix=np.eye(3) + 0j), TypeError, "cost_matrix must be an array of real"),
])
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        interval_clustering(**kwargs)


def test_interval_clusters_refuse_what_they_would_change():
    """2.5 became 2 and "3" was accepted as a bound; uniform(10.6, 2) had T = 11 and
    uniform(10, 0) divided by zero; group_of(nan) returned k."""
    for bounds, error in (([(0, 2.5), (2.5, 5)], TypeError), ([[0, "3"], ["3", 5]], TypeError),
                          ([(0, 2, 3)], ValueError), ([3, 5], TypeError)):
        with pytest.raises(error, match="bounds"):
            IntervalClusters.from_bounds(bounds)
    assert IntervalClusters.from_bounds([(np.int64(0), np.int32(4))]).bounds == ((0, 4),)
    assert IntervalClusters.from_bounds(np.loadtxt(["0 5", "5 9"])).bounds == ((0, 5), (5, 9))
    # a max_size at or beyond T is no bound (sys.maxsize is a common "unbounded")
    assert interval_clustering(2, "timestep", T=10, max_size=sys.maxsize).bounds == \
        interval_clustering(2, "timestep", T=10).bounds
    for T, k, error, name in ((10.6, 2, TypeError, "T"), (10, 0, ValueError, "k"),
                              (3, 5, ValueError, "k must be <= T")):
        with pytest.raises(error, match=name):
            IntervalClusters.uniform(T, k)
    with pytest.raises(ValueError, match="'bounds'"):
        IntervalClusters.from_dict({})
    c = IntervalClusters.uniform(10, 2)
    for t in (np.nan, 2.5):
        with pytest.raises(TypeError, match="t must be an integer"):
            c.group_of(t)
    assert c.group_of(np.array([0, 9])).tolist() == [0, 1] and c.group_of([]).size == 0


def test_zero_terminal_snr_is_a_clear_error_for_log_snr():
    ac = schedules.linear(100).alphas_cumprod.copy()
    ac[-1] = 0.0
    with pytest.raises(ValueError, match="log_snr is not finite at t=99"):
        interval_clustering(3, "log_snr", schedule=ac)
    assert interval_clustering(3, "snr", schedule=ac).k == 3


def test_imports_and_solves_without_torch():
    code = (
        "import sys, ant_core; from ant_core.cli import main;"
        "c = ant_core.interval_clustering(5); main(['cluster', '--json']);"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
