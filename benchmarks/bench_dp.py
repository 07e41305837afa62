"""Interval-clustering solver speed: ant-core vs what a user has today.

Baselines, timed in the same run:
  * python-DP: the published reference's approach, a Python triple loop over (k, i, j) that
    recomputes every interval cost in O(T) with numpy (objective snr, middle-index centre);
  * numpy-DP: a vectorised O(K T^2) DP over a precomputed cost matrix (the best a user writes
    in numpy: prefix-sum cost matrix, then one broadcast min per layer).
ant-core is timed through the public API (interval_clustering, method 'auto' -> Monge fast
path where allowed, and 'exact').

    python benchmarks/bench_dp.py            # full run (about a minute on 2 cores)
    python benchmarks/bench_dp.py --quick    # skips the pure-Python baseline (~6 s)
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

import ant_core
from ant_core import _dp, interval_clustering, schedules


def timeit(fn, repeat=5, min_time=0.2):
    """Median seconds per call (auto-scaled inner loop for fast calls)."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    inner = max(1, int(min_time / max(one, 1e-7) / repeat))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def python_dp(x, K):
    """The reference's DP: O(K T^2) Python loop, each interval cost recomputed in O(T)."""
    T = len(x)
    D = np.full((K + 1, T + 1), np.inf)
    D[0, 0] = 0.0
    for k in range(1, K + 1):
        for i in range(k, T + 1):
            best = np.inf
            for j in range(k - 1, i):
                c = j + (i - 1 - j) // 2
                v = D[k - 1, j] + np.abs(x[j:i] - x[c]).sum()
                if v < best:
                    best = v
            D[k, i] = best
    return D[K, T]


def numpy_dp(x, K):
    """Vectorised O(K T^2): cost matrix from prefix sums, then a broadcast min per layer."""
    T = len(x)
    s = np.sign(x[-1] - x[0]) or 1.0
    y = s * x
    P = np.concatenate(([0.0], np.cumsum(y)))
    l = np.arange(T)[:, None]
    r = np.arange(T)[None, :]
    c = l + (r - l) // 2
    cc = np.clip(c, 0, T - 1)
    rr = np.clip(r, 0, T - 1)
    C = y[cc] * (cc - l) - (P[cc] - P[l]) + (P[rr + 1] - P[cc + 1]) - y[cc] * (rr - cc)
    C = np.where(r >= l, C, np.inf)  # C[j, i - 1] = cost of [j, i)
    D = np.full(T + 1, np.inf)
    D[0] = 0.0
    for _ in range(K):
        cand = D[:-1, None] + C  # (j, i - 1)
        D = np.concatenate(([np.inf], cand.min(axis=0)))
    return D[T]


def batched_rows(args):
    """B=64 affinity-like problems (T=1000, K=5): the batched op vs looping the CPU solver."""
    try:
        import torch

        from ant_core import interval_clustering_batched
    except ImportError:
        return []
    B, T, K = 64, 1000, 5
    rng = np.random.default_rng(0)
    G = rng.normal(size=(B, T, 8))
    A = np.einsum("btd,bsd->bts", G, G) / 8
    costs = np.stack([_dp.affinity_cost_matrix(a, "middle") for a in A])
    t_loop = timeit(lambda: [interval_clustering(K, cost_matrix=c, method="exact") for c in costs],
                    repeat=3)
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        ct = torch.tensor(costs, device=device)

        def run():
            interval_clustering_batched(K, cost_matrices=ct)
            if device == "cuda":
                torch.cuda.synchronize()

        t = timeit(run, repeat=5)
        ref = [interval_clustering(K, cost_matrix=c, method="exact").bounds for c in costs]
        assert [r.bounds for r in interval_clustering_batched(K, cost_matrices=ct)] == ref
        rows.append(dict(case=f"batched B={B} T={T} K={K} {device}", ours_auto_ms=t * 1e3,
                         ours_exact_ms=None, numpy_ms=None, python_ms=None,
                         loop_ms=t_loop * 1e3))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the slow pure-Python baseline")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args()

    rows = []
    print(f"# machine: {platform.machine()}, {platform.processor() or '?'}; python "
          f"{platform.python_version()}; numpy {np.__version__}; ant-core {ant_core.__version__}")

    # 1. T=1000, K=5 on the linear schedule: all three paper objectives.
    sched = schedules.linear(1000)
    series = {"snr": sched.snr, "log_snr": sched.log_snr, "timestep": np.arange(1000.0)}
    t_py = None
    if not args.quick:
        t0 = time.perf_counter()
        py_cost = python_dp(series["snr"], 5)
        t_py = time.perf_counter() - t0
        assert abs(py_cost - interval_clustering(5, "snr").cost) < 1e-6 * py_cost
    for name, x in series.items():
        t_np = timeit(lambda: numpy_dp(x, 5), repeat=3)
        assert abs(numpy_dp(x, 5) - interval_clustering(5, name).cost) <= 1e-6 * (1 + abs(numpy_dp(x, 5)))
        t_auto = timeit(lambda: interval_clustering(5, name))
        t_exact = timeit(lambda: interval_clustering(5, name, method="exact"))
        rows.append(dict(case=f"T=1000 K=5 {name}", ours_auto_ms=t_auto * 1e3,
                         ours_exact_ms=t_exact * 1e3, numpy_ms=t_np * 1e3,
                         python_ms=(t_py * 1e3 if name == "snr" and t_py else None)))

    # 2. T=10^4, K=10, exact path (log-SNR on a log-SNR grid schedule).
    big = schedules.log_snr_grid(10_000)
    t_exact = timeit(lambda: interval_clustering(10, "log_snr", schedule=big, method="exact"), repeat=3)
    t_auto = timeit(lambda: interval_clustering(10, "log_snr", schedule=big), repeat=3)
    rows.append(dict(case="T=10^4 K=10 log_snr", ours_auto_ms=t_auto * 1e3,
                     ours_exact_ms=t_exact * 1e3, numpy_ms=None, python_ms=None))

    # 3. T=10^5, K=32 through the Monge fast path.
    huge = schedules.log_snr_grid(100_000)
    t_auto = timeit(lambda: interval_clustering(32, "log_snr", schedule=huge), repeat=3)
    rows.append(dict(case="T=10^5 K=32 log_snr", ours_auto_ms=t_auto * 1e3,
                     ours_exact_ms=None, numpy_ms=None, python_ms=None))

    rows += batched_rows(args)

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"{'case':<22} {'ours auto ms':>13} {'ours exact ms':>14} {'numpy ms':>10} "
          f"{'python ms':>10} {'numpy/auto':>11} {'python/auto':>12}")
    for r in rows:
        ratio_np = r["numpy_ms"] / r["ours_auto_ms"] if r["numpy_ms"] else None
        ratio_py = r["python_ms"] / r["ours_auto_ms"] if r["python_ms"] else None
        print(f"{r['case']:<22} {f(r['ours_auto_ms']):>13} {f(r['ours_exact_ms']):>14} "
              f"{f(r['numpy_ms']):>10} {f(r['python_ms']):>10} "
              f"{('-' if ratio_np is None else f'{ratio_np:.0f}x'):>11} "
              f"{('-' if ratio_py is None else f'{ratio_py:.0f}x'):>12}")
    for r in rows:
        if "loop_ms" in r:
            print(f"{r['case']}: {r['ours_auto_ms']:.2f} ms vs looping the CPU solver "
                  f"{r['loop_ms']:.2f} ms -> {r['loop_ms'] / r['ours_auto_ms']:.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
