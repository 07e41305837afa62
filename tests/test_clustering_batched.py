"""interval_clustering_batched (torch op, CPU and CUDA) against the single-problem solver."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ant_core import interval_clustering, interval_clustering_batched  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_costs(B, T, seed, integer=False):
    rng = np.random.default_rng(seed)
    if integer:
        return rng.integers(-3, 4, size=(B, T, T)).astype(np.float64)  # many exact ties
    return rng.normal(size=(B, T, T))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("integer", [False, True])
def test_equals_cpu_solver_on_cost_matrices(device, dtype, integer):
    for T, K in [(1, 1), (5, 2), (9, 9), (40, 5), (131, 7)]:
        C = random_costs(6, T, seed=T + K, integer=integer)
        Ct = torch.tensor(C, dtype=dtype, device=device)
        got = interval_clustering_batched(K, cost_matrices=Ct)
        for b in range(C.shape[0]):
            # the solver sees exactly the values the op saw (float32 rounds first)
            ref = interval_clustering(K, cost_matrix=Ct[b].double().cpu().numpy(), method="exact")
            assert got[b].bounds == ref.bounds
            assert got[b].costs_by_k == ref.costs_by_k
            assert got[b].cost == ref.cost


@pytest.mark.parametrize("device", DEVICES)
def test_lower_triangle_may_be_nan_but_the_upper_must_be_finite(device):
    C = random_costs(3, 9, seed=4)
    D = C.copy()
    D[0][np.tril_indices(9, -1)] = np.nan  # unused entries, marked as such
    D[1][np.tril_indices(9, -1)] = np.inf
    got = interval_clustering_batched(3, cost_matrices=torch.tensor(D, device=device))
    want = interval_clustering_batched(3, cost_matrices=torch.tensor(C, device=device))
    assert [g.bounds for g in got] == [w.bounds for w in want]
    D[2, 1, 4] = np.nan
    with pytest.raises(ValueError, match="upper triangle"):
        interval_clustering_batched(3, cost_matrices=torch.tensor(D, device=device))
    A = np.stack([np.eye(9)] * 2)
    A[0, 5, 1] = np.nan  # an affinity is read whole
    with pytest.raises(ValueError, match="affinity must be finite"):
        interval_clustering_batched(3, affinity=torch.tensor(A, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_size_bounds(device):
    C = random_costs(4, 30, seed=1, integer=True)
    for mn, mx in [(3, None), (1, 8), (4, 7)]:
        got = interval_clustering_batched(5, cost_matrices=torch.tensor(C, device=device),
                                          min_size=mn, max_size=mx)
        for b in range(4):
            ref = interval_clustering(5, cost_matrix=C[b], min_size=mn, max_size=mx, method="exact")
            assert got[b].bounds == ref.bounds and got[b].costs_by_k == ref.costs_by_k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", ["affinity", "affinity_average"])
def test_affinity_objectives(device, objective):
    rng = np.random.default_rng(2)
    G = rng.normal(size=(3, 25, 4))
    A = G @ G.transpose(0, 2, 1)
    got = interval_clustering_batched(4, affinity=torch.tensor(A, device=device), objective=objective)
    for b in range(3):
        ref = interval_clustering(4, objective, affinity=A[b])
        assert got[b].cost == pytest.approx(ref.cost, rel=1e-10)
        assert got[b].bounds == ref.bounds
        assert got[b].objective == objective


def test_numpy_input_and_result_type():
    C = random_costs(2, 10, seed=3)
    got = interval_clustering_batched(3, cost_matrices=C)
    assert len(got) == 2 and got[0].k == 3 and got[0].T == 10
    assert got[0].labels.shape == (10,)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=2), ValueError, "exactly one of"),
    (dict(k=2, cost_matrices=np.zeros((3, 4, 4)), affinity=np.zeros((3, 4, 4))), ValueError, "exactly one of"),
    (dict(k=2, cost_matrices=np.zeros((4, 4))), ValueError, r"shape \(B, T, T\)"),
    (dict(k=2, cost_matrices=np.zeros((2, 4, 5))), ValueError, r"shape \(B, T, T\)"),
    (dict(k=5, cost_matrices=np.zeros((2, 4, 4))), ValueError, "k must be <= T"),
    (dict(k=0, cost_matrices=np.zeros((2, 4, 4))), ValueError, "k must be >= 1"),
    (dict(k=2, cost_matrices=np.full((2, 4, 4), np.nan)), ValueError, "must be finite"),
    (dict(k=3, cost_matrices=np.zeros((2, 4, 4)), min_size=2), ValueError, "infeasible size bounds"),
    (dict(k=2, affinity=np.zeros((2, 4, 4)), objective="affinity_medoid"), ValueError, "objective must be"),
    (dict(k=2, affinity=np.zeros((2, 4, 4)), objective=""), ValueError, "objective must be"),
    (dict(k=2, cost_matrices=np.zeros((2, 4, 4)), min_size=2**70), ValueError, "min_size must be <= T"),
    # complex lost its imaginary part, bool became 0/1
    (dict(k=2, cost_matrices=np.zeros((1, 4, 4)) + 1j), TypeError, "cost_matrices must be an array of real"),
    (dict(k=2, cost_matrices=torch.zeros(1, 4, 4, dtype=torch.complex64)), TypeError, "cost_matrices must be"),
    (dict(k=2, affinity=np.zeros((1, 4, 4), dtype=bool)), TypeError, "affinity must be an array of real"),
])
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        interval_clustering_batched(**kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [
    dict(k=3, affinity=np.stack([np.eye(3), np.full((3, 3), 1e308)])),
    dict(k=4, cost_matrices=np.stack([np.zeros((4, 4)), np.diag([1e308] * 4)])),
    dict(k=3, cost_matrices=np.array([[[1e308, 1e308, 0, 0], [0, 1e308, 0, 0],
                                       [0, 0, 0, -1.5e308], [0, 0, 0, 0]]])),
])
def test_costs_that_overflow_are_a_clear_error(device, kwargs):
    kwargs = {name: torch.as_tensor(v, device=device) if isinstance(v, np.ndarray) else v
              for name, v in kwargs.items()}
    with pytest.raises(ValueError, match="overflow double precision"):
        interval_clustering_batched(**kwargs)


def test_opcheck_and_fake_kernel():
    import ant_core._extension as ext

    ops = ext.torch_ops()
    for costs in (torch.rand(3, 6, 6, dtype=torch.float64), torch.rand(2, 4, 4)):
        torch.library.opcheck(ops.interval_dp_batched.default, (costs, 2, 1, 0))


def test_op_checks_directly():
    import ant_core._extension as ext

    ops = ext.torch_ops()
    with pytest.raises(ValueError, match="infeasible"):
        ops.interval_dp_batched(torch.zeros(1, 4, 4), 2, 3, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.interval_dp_batched(torch.zeros(1, 4, 4, dtype=torch.int64), 2, 1, 0)


def test_a_tensor_that_requires_grad_is_read_as_is():
    costs = torch.rand(2, 5, 5, dtype=torch.float64, requires_grad=True)   # was a RuntimeError
    got = interval_clustering_batched(2, cost_matrices=costs)
    want = [interval_clustering(2, cost_matrix=c, method="exact") for c in costs.detach().numpy()]
    assert [g.bounds for g in got] == [w.bounds for w in want]


@pytest.mark.parametrize("objective", ["affinity", "affinity_average"])
def test_large_entries_outside_an_interval_do_not_swamp_it(objective):
    """Prefix-sum differences lost the costs of small intervals to a -1e17 entry before them
    (affinity_average reported -28 for an optimum of -25.5); checked against exact rational
    costs of every partition."""
    from fractions import Fraction

    A = np.array([[[5, -1e17, 9, 7], [-1e17, 2, 7, 5], [9, 7, 8, 0], [2, 6, 6, 3]],
                  [[6, -1e17, 3, 8], [-1e17, 6, 0, 6], [2, 8, 9, 4], [9, 7, 3, 8]]])

    def exact(a, bounds):
        a = [[Fraction(v) for v in row] for row in a.tolist()]
        if objective == "affinity":
            return -sum(sum(a[s + (e - 1 - s) // 2][s:e]) for s, e in bounds)
        return -sum(sum(sum(row[s:e]) for row in a[s:e]) / (e - s) for s, e in bounds)

    for got, a in zip(interval_clustering_batched(3, affinity=A, objective=objective), A):
        options = [((0, i), (i, j), (j, 4)) for i in range(1, 3) for j in range(i + 1, 4)]
        best = min(exact(a, b) for b in options)
        assert exact(a, got.bounds) == best and got.cost == float(best)


def test_the_unread_lower_triangle_does_not_count_towards_overflow():
    costs = np.triu(np.random.default_rng(0).random((1, 6, 6))) + np.tril(np.full((6, 6), 1e308), -1)
    got = interval_clustering_batched(2, cost_matrices=costs)[0]
    assert got.bounds == interval_clustering(2, cost_matrix=costs[0], method="exact").bounds
