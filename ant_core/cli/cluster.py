"""`ant cluster`: exact interval clustering of the timesteps (does not import torch)."""
import json

import numpy as np

from .. import schedules
from ..clustering import OBJECTIVES, IntervalClusters, interval_clustering


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read {what} from {path}: {exc}") from None


def add_parser(sub):
    p = sub.add_parser(
        "cluster",
        help="split the timesteps into k intervals (exact interval clustering)",
        description="Exact interval clustering of diffusion timesteps (ANT). Prints the "
        "intervals with their SNR range; defaults: linear DDPM schedule, T=1000, k=5, log-SNR.",
    )
    p.add_argument("--schedule", default=None, choices=sorted(schedules.SCHEDULES),
                   help="noise schedule (default: linear)")
    p.add_argument("--alphas-cumprod", metavar="FILE.npy",
                   help="use this alphas_cumprod array instead of a named schedule")
    p.add_argument("--T", type=int, default=None, help="number of timesteps (default 1000)")
    p.add_argument("--k", type=int, default=5, help="number of intervals (default 5)")
    p.add_argument("--objective", default=None, choices=sorted(OBJECTIVES),
                   help="clustering objective (default: log_snr; sse with --values, affinity "
                   "with --affinity, cost_matrix with --cost-matrix)")
    p.add_argument("--values", metavar="FILE.npy", help="1-D series for objectives abs / sse")
    p.add_argument("--affinity", metavar="FILE.npy", help="T x T task-affinity matrix")
    p.add_argument("--cost-matrix", metavar="FILE.npy", help="T x T interval cost matrix")
    p.add_argument("--min-size", type=int, default=1, help="minimum interval length")
    p.add_argument("--max-size", type=int, default=None, help="maximum interval length")
    p.add_argument("--method", default="auto", choices=("auto", "exact", "monge"))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot the intervals over log-SNR "
                   "(over t with --values / --affinity / --cost-matrix; needs matplotlib)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.schedule and args.alphas_cumprod:
        raise ValueError("give --schedule or --alphas-cumprod, not both")
    inputs = {}
    for name in ("values", "affinity", "cost_matrix"):
        path = getattr(args, name)
        if path:
            inputs[name] = _load_npy(path, name)
    uses_schedule = not inputs
    if inputs and (args.schedule or args.alphas_cumprod):
        raise ValueError("--schedule / --alphas-cumprod do not apply to --values, --affinity or "
                         "--cost-matrix, which alone define the costs")
    sched = (schedules.from_alphas_cumprod(_load_npy(args.alphas_cumprod, "alphas_cumprod"))
             if args.alphas_cumprod else args.schedule or "linear")
    if args.plot:  # before printing anything: no table followed by a failure
        from ..visualize import check_plot_path
        check_plot_path(args.plot)
    clusters = interval_clustering(
        args.k, args.objective,
        schedule=sched if uses_schedule else None,
        T=args.T,
        min_size=args.min_size,
        max_size=args.max_size,
        method=args.method,
        **inputs,
    )
    log_snr = None
    if uses_schedule:
        log_snr = schedules.get_schedule(sched, args.T if isinstance(sched, str) else None).log_snr
    if args.json:
        out = clusters.to_dict()
        out["T"] = clusters.T
        print(json.dumps(out))
    else:
        print(cluster_table(clusters, log_snr))
    if args.plot:
        from ..visualize import plot_clusters
        written = plot_clusters(clusters, log_snr, args.plot)
        if not args.json:
            print(f"plot written to {written}")
    return 0


def cluster_table(c: IntervalClusters, log_snr) -> str:
    head = f"{c.k} intervals of T={c.T} timesteps, objective={c.objective}, cost={c.cost:.6g}"
    rows = [head, ""]
    cols = f"{'#':>3}  {'start':>6}  {'end':>6}  {'size':>6}"
    if log_snr is not None:
        cols += f"  {'logSNR(start)':>13}  {'logSNR(end-1)':>13}"
    rows += [cols, "-" * len(cols)]
    for i, (s, e) in enumerate(c.bounds):
        row = f"{i:>3}  {s:>6}  {e:>6}  {e - s:>6}"
        if log_snr is not None:
            row += f"  {log_snr[s]:>13.4f}  {log_snr[e - 1]:>13.4f}"
        rows.append(row)
    rows += ["", "optimal cost by k: " + ", ".join(
        f"{k}: {v:.6g}" for k, v in enumerate(c.costs_by_k, start=1))]
    return "\n".join(rows)
