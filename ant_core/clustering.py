"""Interval clustering of diffusion timesteps (ANT): the exact optimum by dynamic programming.

Split the timesteps [0, T) into k contiguous, non-empty, half-open intervals minimising the sum
of interval costs. The solver is C++ (``ant_core._dp``); this module turns an objective into
costs, validates input, picks the solver and wraps the result. It does not import torch.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import schedules as _schedules
from ._extension import load as _load_extension
from .checks import check_bool, check_int, real_array

__all__ = ["IntervalClusters", "interval_clustering", "interval_clustering_batched", "OBJECTIVES"]

#: objective name -> what it clusters (see interval_clustering's docstring)
OBJECTIVES = {
    "timestep": "sum |t - c| over the interval, c its middle index (the paper)",
    "snr": "sum |SNR_t - SNR_c|, c the middle index (the paper)",
    "log_snr": "sum |logSNR_t - logSNR_c|, c the middle index",
    "abs": "sum |x_t - x_c| of a monotone 1-D series `values`, c the middle index",
    "sse": "sum of squared errors around the interval mean of a 1-D series `values`",
    "affinity": "-sum_t A[c, t] of a T x T affinity matrix, c the middle index (the paper)",
    "affinity_medoid": "-max_c sum_t A[c, t]: the best centre of each interval",
    "affinity_average": "-(1/|I|) sum_{s,t} A[s, t]: average linkage",
    "cost_matrix": "a user cost C[l, r] for the inclusive interval l..r",
}
_METHODS = ("auto", "exact", "monge")


_NO_COST = float("nan")  # one NaN object: clusters without a cost compare equal (tuple identity)


def _bound(which, value) -> int:
    """A bound as an int: integers, or floats with an integer value (e.g. from np.loadtxt);
    2.5 is refused, not truncated."""
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise TypeError(f"bounds {which} must be an integer, got {value!r}")
        value = int(value)
    return check_int(f"bounds {which}", value, 0)


@dataclass(frozen=True)
class IntervalClusters:
    """The result of interval clustering.

    ``bounds`` are half-open ``(start, end)`` pairs, ascending, covering [0, T) exactly.
    ``labels[t]`` is the interval of timestep t. ``costs_by_k[j]`` is the optimal objective with
    ``j + 1`` intervals (inf where the size bounds make that many infeasible).
    """

    bounds: tuple
    cost: float = _NO_COST
    costs_by_k: tuple = ()
    objective: str = "custom"
    fast_path: bool = False
    labels: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        try:
            pairs = [tuple(b) for b in self.bounds]
        except TypeError:
            raise TypeError(f"bounds must be (start, end) pairs, got {self.bounds!r}") from None
        if any(len(b) != 2 for b in pairs):
            raise ValueError(f"bounds must be (start, end) pairs, got {self.bounds!r}")
        bounds = tuple((_bound("start", s), _bound("end", e)) for s, e in pairs)
        if not bounds:
            raise ValueError("bounds must hold at least one interval")
        if bounds[0][0] != 0:
            raise ValueError(f"bounds must start at 0, got {bounds[0][0]}")
        for (s, e), nxt in zip(bounds, bounds[1:] + ((None, None),)):
            if e <= s:
                raise ValueError(f"every interval must be non-empty, got ({s}, {e})")
            if nxt[0] is not None and nxt[0] != e:
                raise ValueError(f"bounds must be contiguous, got ({s}, {e}) then {nxt}")
        object.__setattr__(self, "bounds", bounds)
        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            return float(value)

        cost = number("cost", self.cost)
        if math.isinf(cost):
            raise ValueError(f"cost must be finite (NaN: unknown), got {cost}")
        object.__setattr__(self, "cost", _NO_COST if math.isnan(cost) else cost)
        if isinstance(self.costs_by_k, (str, bytes)) or not hasattr(self.costs_by_k, "__iter__"):
            raise TypeError(f"costs_by_k must be a sequence of numbers, got {self.costs_by_k!r}")
        costs = tuple(number("costs_by_k entries", c) for c in self.costs_by_k)
        if any(math.isnan(c) or c == -math.inf for c in costs):
            raise ValueError(f"costs_by_k must be finite (inf: an infeasible k), got {costs}")
        object.__setattr__(self, "costs_by_k", costs)
        if not isinstance(self.objective, str):
            raise TypeError(f"objective must be a str, got {self.objective!r}")
        check_bool("fast_path", self.fast_path)
        labels = np.repeat(np.arange(len(bounds), dtype=np.int64), self.sizes)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)

    def __reduce__(self):  # unpickling re-validates: NaN cost, read-only labels
        return (type(self), (self.bounds, self.cost, self.costs_by_k, self.objective,
                             self.fast_path))

    @classmethod
    def from_bounds(cls, bounds, objective: str = "custom") -> "IntervalClusters":
        """Clusters from explicit bounds, e.g. ``[(0, 200), (200, 1000)]`` (no cost attached)."""
        return cls(bounds=tuple(bounds), objective=objective)

    @classmethod
    def uniform(cls, T: int, k: int) -> "IntervalClusters":
        """k near-equal intervals (the larger ones last), as the reference code's uniform bins."""
        T, k = check_int("T", T, 1), check_int("k", k, 1)
        if k > T:
            raise ValueError(f"k must be <= T, got k={k} > T={T}")
        edges = [round(i * T / k) for i in range(k + 1)]
        return cls.from_bounds(list(zip(edges[:-1], edges[1:])), objective="uniform")

    @property
    def k(self) -> int:
        return len(self.bounds)

    @property
    def T(self) -> int:
        return self.bounds[-1][1]

    @property
    def starts(self) -> np.ndarray:
        return np.array([s for s, _ in self.bounds], dtype=np.int64)

    @property
    def ends(self) -> np.ndarray:
        return np.array([e for _, e in self.bounds], dtype=np.int64)

    @property
    def sizes(self) -> np.ndarray:
        return self.ends - self.starts

    def group_of(self, t):
        """Interval index of timestep(s) t (an int or an integer array)."""
        t_arr = np.asarray(t)
        if t_arr.size and not np.issubdtype(t_arr.dtype, np.integer):
            raise TypeError(f"t must be an integer or an integer array, got {t_arr.dtype}")
        if np.any(t_arr < 0) or np.any(t_arr >= self.T):
            raise ValueError(f"t must lie in [0, {self.T})")
        return np.searchsorted(self.ends, t_arr, side="right")

    def to_dict(self) -> dict:
        """Plain, strict-JSON data: an unknown ``cost`` (NaN) and the ``costs_by_k`` of an
        infeasible k (inf) are written as None (:meth:`from_dict` reads them back)."""
        finite = lambda v: float(v) if math.isfinite(v) else None
        return {
            "bounds": [list(b) for b in self.bounds],
            "cost": finite(self.cost),
            "costs_by_k": [finite(v) for v in self.costs_by_k],
            "objective": self.objective,
            "fast_path": self.fast_path,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "IntervalClusters":
        if not isinstance(d, dict) or "bounds" not in d:
            raise ValueError(f"clusters must be a dict with 'bounds' (to_dict's form), got {d!r}")
        cost, costs = d.get("cost"), d.get("costs_by_k", ())
        if not isinstance(costs, (list, tuple)):
            raise TypeError(f"costs_by_k must be a list of numbers, got {costs!r}")
        return cls(
            bounds=tuple(tuple(b) for b in d["bounds"]),
            cost=_NO_COST if cost is None else cost,
            costs_by_k=tuple(math.inf if v is None else v for v in costs),
            objective=d.get("objective", "custom"),
            fast_path=d.get("fast_path", False),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    def __len__(self) -> int:
        return self.k


# ----------------------------------------------------------------------------- validation


def _float_array(name, value, ndim, upper=False):
    """A checked float64 copy; ``upper``: only the upper triangle (l <= r) must be finite,
    the part a cost matrix is read from (the rest is often NaN / inf as "unused")."""
    arr = real_array(name, value)  # a fresh contiguous float64 copy
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if ndim == 2 and arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be square (T x T), got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if upper:
        bad = np.triu(bad)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite; {name}{list(where)} = {arr[where]}")
    return arr


def _resolve_objective(objective, values, affinity, cost_matrix):
    given = [n for n, v in (("values", values), ("affinity", affinity), ("cost_matrix", cost_matrix)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass only one of values, affinity, cost_matrix (got {', '.join(given)})")
    if objective is None:
        objective = {"values": "sse", "affinity": "affinity", "cost_matrix": "cost_matrix"}.get(
            given[0] if given else "", "log_snr")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    needs = {"abs": "values", "sse": "values", "cost_matrix": "cost_matrix"}
    needs.update({o: "affinity" for o in OBJECTIVES if o.startswith("affinity")})
    need = needs.get(objective)
    if need is not None and need not in given:
        raise ValueError(f"objective={objective!r} needs the argument {need}=")
    if need is None and given:
        raise ValueError(f"objective={objective!r} does not take {given[0]}= (it uses the schedule)")
    return objective


def _series_for(objective, schedule, T):
    """The 1-D series that the timestep / snr / log_snr objectives measure deviations of."""
    if objective == "timestep":
        if T is not None:
            T = check_int("T", T, 1)
        if schedule is not None:  # T from the schedule (a name is checked, T defaults to 1000)
            T = _schedules.get_schedule(schedule, T).T
        return np.arange(1000 if T is None else T, dtype=np.float64)
    sched = _schedules.get_schedule("linear" if schedule is None else schedule, T)
    series = sched.snr if objective == "snr" else sched.log_snr
    bad = np.flatnonzero(~np.isfinite(series))
    if bad.size:
        raise ValueError(
            f"the schedule's {objective} is not finite at t={int(bad[0])} (alphas_cumprod is "
            f"{sched.alphas_cumprod[bad[0]]!r}); clip the schedule or use a cost_matrix")
    return series


# ----------------------------------------------------------------------------- solving


def interval_clustering(
    k: int,
    objective: str | None = None,
    *,
    schedule=None,
    T: int | None = None,
    values=None,
    affinity=None,
    cost_matrix=None,
    min_size: int = 1,
    max_size: int | None = None,
    method: str = "auto",
) -> IntervalClusters:
    """Optimal split of [0, T) into ``k`` contiguous intervals (exact, deterministic).

    Objectives (see ``OBJECTIVES``); the interval's middle index is ``c = l + (r - l) // 2`` for
    the inclusive interval l..r:

    * ``"timestep"``, ``"snr"``, ``"log_snr"`` (default): deviations of t, SNR_t or log-SNR_t
      from their value at c, for ``schedule`` (a name from ``schedules.SCHEDULES``, a
      NoiseSchedule, an ``alphas_cumprod`` array or any object with one; default ``"linear"``)
      with ``T`` timesteps (default 1000 for a named schedule).
    * ``"abs"`` / ``"sse"``: a 1-D series ``values`` (abs needs it monotone).
    * ``"affinity"``, ``"affinity_medoid"``, ``"affinity_average"``: a T x T task-affinity
      matrix ``affinity`` (higher = more alike).
    * ``cost_matrix=C``: any cost, ``C[l, r]`` for l..r inclusive (only the upper triangle is
      read, and only it must be finite).

    ``min_size`` / ``max_size`` bound every interval's length. ``method``: ``"exact"`` is the
    O(k T^2) DP; ``"monge"`` the O(k T log T) divide and conquer, allowed only when the cost
    satisfies the quadrangle inequality (proven for the deviation objectives on monotone series,
    checked exactly otherwise); ``"auto"`` uses monge whenever it is allowed, except for a series
    whose partial sums' rounding (about 8 k eps times the whole series' cost) reaches its
    smallest gap between values (squared for sse) while the exact DP is cheap (k T^2 <= 1e8,
    about 0.1 s on 2 cores): near-ties decided by rounding can lead monge's pruning past the
    optimum (by about that rounding). Both return the same optimum and the same tie-breaking: among
    equally good partitions the most balanced one (smallest sum of squared sizes), then the
    smallest boundaries compared from the last.

    Costs are float64, each accurate to about eps times itself plus eps^2 (~1e-32) times the
    prefix sums behind it (of the values, sse: of their squares, measured from the series'
    middle value; affinity: of the entries): the sums are compensated (double-double), so a
    value of 1e17 elsewhere in the series no longer swamps an interval of 5s and 0s. sse's
    one-line formula, kept where the interval's spread exceeds 1/4096 of its squares, rounds
    to at most ~2e-12 relative. A constant run costs exactly 0. Partitions whose costs differ
    only by rounding (e.g. deviations of 0.1, 0.2, 0.3) may be ordered differently by the two
    methods. Finite input whose costs overflow float64, or whose partial sums overflow where
    a negative cost could bring them back, is a ``ValueError``.
    """
    k = check_int("k", k, 1)
    min_size = check_int("min_size", min_size, 1)
    max_size = None if max_size is None else check_int("max_size", max_size, 1)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    objective = _resolve_objective(objective, values, affinity, cost_matrix)
    if schedule is not None and objective not in ("timestep", "snr", "log_snr"):
        raise ValueError(f"schedule does not apply to objective={objective!r}, whose costs come "
                         "from values / affinity / cost_matrix alone (it would be ignored)")
    dp = _load_extension("_dp")

    if objective in ("timestep", "snr", "log_snr", "abs", "sse"):
        if objective in ("abs", "sse"):
            series = _float_array("values", values, 1)
            if T is not None and check_int("T", T, 1) != series.size:
                raise ValueError(f"T={T} does not match len(values)={series.size}")
        else:
            series = _series_for(objective, schedule, T)
        kind = "sse" if objective == "sse" else "abs"
        monge_ok = _monotone_direction(series) != 0  # proven Monge on monotone series
        if kind == "abs" and not monge_ok:
            raise ValueError(f"values must be monotone for objective={objective!r}; "
                             "use objective='sse' or a cost_matrix")
        n = series.size
        if method == "auto" and monge_ok and k * n * n <= _AFFORDABLE_EXACT:
            monge_ok = _rounding_below_resolution(series, k, kind)

        def solve(m):
            return dp.solve_series(series, kind, k, min_size, size_cap, m)
    else:
        if objective == "cost_matrix":
            matrix = _float_array("cost_matrix", cost_matrix, 2, upper=True)  # (l <= r read)
        else:
            centre = {"affinity": "middle", "affinity_medoid": "medoid", "affinity_average": "average"}
            matrix = dp.affinity_cost_matrix(_float_array("affinity", affinity, 2), centre[objective])
        n = matrix.shape[0]
        if T is not None and check_int("T", T, 1) != n:
            raise ValueError(f"T={T} does not match the matrix size {n}")
        monge_ok = method != "exact" and dp.is_monge(matrix)

        def solve(m):
            return dp.solve_matrix(matrix, k, min_size, size_cap, m)

    if k > n:
        raise ValueError(f"k must be <= T (each interval needs a timestep), got k={k} > T={n}")
    if min_size > n:  # here: beyond int64 it would not even reach the solver's own check
        raise ValueError(f"min_size must be <= T, got min_size={min_size} > T={n}")
    size_cap = min(max_size or 0, n)  # 0: none; one at or beyond T is none either
    if method == "monge" and not monge_ok:
        raise ValueError(
            "method='monge' needs a cost satisfying the quadrangle (Monge) inequality, and this "
            "one does not; use method='exact' or 'auto'")
    result = solve("monge" if monge_ok and method != "exact" else "exact")
    b = result["boundaries"]
    return IntervalClusters(
        bounds=tuple(zip(b[:-1].tolist(), b[1:].tolist())),
        cost=float(result["cost"]),
        costs_by_k=tuple(result["costs_by_k"].tolist()),
        objective=objective,
        fast_path=bool(result["fast_path"]),
    )


_AFFORDABLE_EXACT = 1e8  # k T^2 of an exact solve of about 0.1 s (2-core CPU)


def _rounding_below_resolution(series: np.ndarray, k: int, kind: str) -> bool:
    """Whether the Monge path's pruning is safe from rounding: its partial sums (up to k costs,
    each at most the whole series' cost) are rounded to about eps times themselves, and where
    that reaches the data's own resolution (its smallest gap, squared for sse) near-ties are
    decided by rounding, and the divide and conquer can narrow its search past the optimum
    (abs next to values of 1e16 with max_size: cost 3, where the optimum is 2)."""
    power = 2 if kind == "sse" else 1
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: not safe; the solver says why
        gaps = np.abs(np.diff(series))
        gaps = gaps[gaps > 0]
        if gaps.size == 0:
            return True
        whole = (np.abs(series - series[series.size // 2]) ** power).sum()
        return bool(8 * k * whole * np.finfo(float).eps < gaps.min() ** power)


def _monotone_direction(x: np.ndarray) -> int:
    later, earlier = x[1:], x[:-1]  # compared, not subtracted (1.7e308 - -1.7e308 overflows)
    return 1 if np.all(later >= earlier) else (-1 if np.all(later <= earlier) else 0)


def interval_clustering_batched(
    k: int,
    *,
    cost_matrices=None,
    affinity=None,
    objective: str | None = None,
    min_size: int = 1,
    max_size: int | None = None,
) -> list:
    """Solve B independent problems at once, on the device of the input (CUDA: one thread block
    per problem; CPU: the C++ solver looped in parallel). Needs torch and ant_core._C.

    Give ``cost_matrices`` (B, T, T) — ``C[b, l, r]`` the cost of l..r inclusive — or
    ``affinity`` (B, T, T) with ``objective`` ``"affinity"`` (middle centre, the default) or
    ``"affinity_average"``; torch tensors (float32/float64, any device) or numpy arrays.
    Returns one IntervalClusters per problem, each the exact optimum with the same
    tie-breaking as ``interval_clustering(..., method="exact")`` on the same cost matrix.
    Affinity costs are computed where the input lives, summed outward from inside each interval
    in plain float64 (no large entry outside an interval swamps it), not compensated as
    ``interval_clustering``'s are: they can differ in the last bits, and so can partitions that
    tie up to that rounding. Costs whose k-fold sum overflows float64 are a ``ValueError``.
    """
    import torch

    from ._extension import torch_ops

    k = check_int("k", k, 1)
    min_size = check_int("min_size", min_size, 1)
    max_size = None if max_size is None else check_int("max_size", max_size, 1)
    if (cost_matrices is None) == (affinity is None):
        raise ValueError("pass exactly one of cost_matrices, affinity")
    name = "cost_matrices" if affinity is None else "affinity"
    data = cost_matrices if affinity is None else affinity
    if isinstance(data, torch.Tensor):  # any device, kept there
        if data.is_complex() or data.dtype == torch.bool:
            raise TypeError(f"{name} must be an array of real numbers, got {data.dtype}")
        data = data.detach()
    else:
        data = torch.from_numpy(real_array(name, data, copy=False))
    if data.dim() != 3 or data.shape[1] != data.shape[2] or data.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, T, T) with T >= 1, got {tuple(data.shape)}")
    if data.dtype not in (torch.float32, torch.float64):
        data = data.double()
    # one pass for the range: finiteness (NaN too) now, overflow below
    extremes = [float(v) for v in torch.aminmax(data)] if data.numel() else [0.0]
    if not all(math.isfinite(v) for v in extremes):
        if affinity is not None:
            raise ValueError(f"{name} must be finite")
        data = torch.triu(data)  # a cost matrix is read on l <= r only: the rest may be NaN
        extremes = [float(v) for v in torch.aminmax(data)]
        if not all(math.isfinite(v) for v in extremes):
            raise ValueError(f"{name} must be finite on its upper triangle (l <= r)")
    if affinity is None:
        if objective not in (None, "cost_matrix"):
            raise ValueError(f"objective={objective!r} needs affinity=, not cost_matrices=")
        costs, objective = data, "cost_matrix"
    else:
        objective = "affinity" if objective is None else objective
        if objective not in ("affinity", "affinity_average"):
            raise ValueError("objective must be 'affinity' or 'affinity_average' with affinity= "
                             f"(use interval_clustering for {objective!r}), got {objective!r}")
        costs = _affinity_costs_torch(data, objective)
        extremes = [float(v) for v in torch.aminmax(costs)] if costs.numel() else [0.0]
    if k > data.shape[1]:
        raise ValueError(f"k must be <= T (each interval needs a timestep), got k={k} > T={data.shape[1]}")
    if min_size > data.shape[1]:
        raise ValueError(f"min_size must be <= T, got min_size={min_size} > T={data.shape[1]}")
    # no sum of k costs overflows (the CUDA kernel cannot report one on the way to the optimum);
    # the lower triangle is never read, so a bound over everything is checked on the upper one
    # only when it fails
    if not math.isfinite(k * max(abs(v) for v in extremes)) \
            and not math.isfinite(k * float(torch.triu(costs).abs().max())):
        raise ValueError(f"{name}: the interval costs overflow double precision (k times the "
                         "largest |cost| is not finite); rescale them")
    boundaries, costs_by_k = torch_ops().interval_dp_batched(
        costs, k, min_size, min(max_size or 0, data.shape[1]))
    boundaries, costs_by_k = boundaries.cpu().numpy(), costs_by_k.cpu().numpy()
    return [
        IntervalClusters(
            bounds=tuple(zip(b[:-1].tolist(), b[1:].tolist())),
            cost=float(cbk[-1]),
            costs_by_k=tuple(cbk.tolist()),
            objective=objective,
        )
        for b, cbk in zip(boundaries, costs_by_k)
    ]


def _affinity_costs_torch(A, objective):
    """Cost matrices (B, T, T) of the affinity objectives, computed where A lives (float64).
    Every interval is summed outward from entries inside it (masked cumulative sums), as the
    C++ costs are, so a large entry outside an interval does not swamp its cost; the order of
    the additions differs from the C++ one, so costs can differ from it in the last bits."""
    import torch

    A = A.double()
    T = A.shape[-1]
    idx = torch.arange(T, device=A.device)
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    if objective == "affinity":
        # row c summed outward from c: the entries at distance d are A[c, c - d] and A[c, c + d];
        # the (c, d) that fit, and those with room for one more on the right, listed on the CPU
        c, d = torch.arange(T)[:, None], torch.arange(T)[None, :]
        inside = (c - d >= 0) & (c + d < T)
        ic, id_ = (t.to(A.device) for t in inside.nonzero(as_tuple=True))
        oc, od = (t.to(A.device) for t in (inside & (c + d + 1 < T)).nonzero(as_tuple=True))
        ring = torch.zeros_like(A)
        ring[:, ic, id_] = A[:, ic, ic - id_] + torch.where(id_ > 0, A[:, ic, ic + id_], zero)
        S = ring.cumsum(-1)  # S[b, c, d]: row c over [c - d, c + d]
        C = torch.zeros_like(A)
        C[:, ic - id_, ic + id_] = -S[:, ic, id_]
        C[:, oc - od, oc + od + 1] = -(S[:, oc, od] + A[:, oc, oc + od + 1])  # [c-d, c+d+1]
        return C
    upper = idx[None, :] >= idx[:, None]  # [l, r]: l <= r

    def triangle(M):  # U[b, l, r] = sum_{l <= s <= t <= r} M[b, s, t]
        col = torch.where(upper, M, zero).flip(-2).cumsum(-2).flip(-2)  # sum_{s=l}^{t} M[s, t]
        return torch.where(upper, col, zero).cumsum(-1)

    diag = torch.diagonal(A, dim1=-2, dim2=-1)[:, None, :]
    D = torch.where(upper, diag, zero).cumsum(-1)  # D[b, l, r] = sum_{t=l}^{r} A[t, t]
    block = triangle(A) + triangle(A.transpose(-1, -2)) - D
    sizes = (idx[None, :] - idx[:, None] + 1).clamp(min=1)
    return torch.where(upper, -block / sizes, zero)
