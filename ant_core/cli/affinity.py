"""`ant affinity`: the T x T gradient task affinity of a run's checkpoints."""
import numpy as np

from .. import schedules
from ..clustering import interval_clustering
from .common import positive_int


def add_parser(sub):
    p = sub.add_parser(
        "affinity", help="estimate the gradient task affinity (TAS) between timesteps",
        description="Estimate ANT's T x T gradient task affinity (cosine of the loss gradients "
        "at two timesteps) from the checkpoints of a run (EMA weights, averaged over the "
        "checkpoints) on a grid of M timesteps, with each gradient compressed by a CountSketch "
        "of dimension d. Writes FILE.npy (T x T) and FILE.json (metadata); use it with "
        "`ant train --objective affinity --affinity FILE.npy`.")
    p.add_argument("checkpoints", nargs="+", help="run folder(s) (all their checkpoints) or "
                   "checkpoint file(s)")
    p.add_argument("--M", type=int, default=None,
                   help="timestep grid size (default min(100, T))")
    p.add_argument("--d", type=int, default=4096, help="sketch dimension (default 4096)")
    p.add_argument("--exact", action="store_true", help="keep full gradients (small models)")
    p.add_argument("--batches", type=int, default=4, help="batches per timestep (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--timesteps", default="center", choices=("center", "random"),
                   help="one timestep per bin: its middle (default) or random per batch")
    p.add_argument("--interpolation", default="constant", choices=("constant", "linear"))
    p.add_argument("--timesteps-per-pass", default="auto", metavar="N|auto",
                   help="grid timesteps sharing one forward/backward (default auto: packed on "
                   "a GPU, 1 on a CPU)")
    p.add_argument("--last", type=int, default=None, help="use only the N newest checkpoints")
    p.add_argument("--no-ema", action="store_true", help="use the raw model weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", metavar="FILE.npy", help="output (default <run>/affinity.npy)")
    p.add_argument("--plot", metavar="FILE.png", help="heatmap over timestep and log-SNR "
                   "(needs matplotlib)")
    p.add_argument("--k", type=int, default=5, help="intervals outlined on the plot (default 5)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _int_or_auto(name, value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an int or 'auto', got {value!r}") from None


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..affinity import _checkpoint_files, estimate_affinity, output_paths
    from ..checkpoint import load_checkpoint
    from ..train_config import TrainConfig, resolve_device
    from ..training_setup import build_dataset
    from ..visualize import check_plot_path, plot_affinity

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:  # before the (long) estimate, not after it
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        plot = check_plot_path(args.plot)
    files = [f for c in args.checkpoints for f in _checkpoint_files(c)]
    resolved = [Path(f).resolve() for f in files]
    repeated = sorted({str(f) for f in resolved if resolved.count(f) > 1})
    if repeated:  # it would be averaged in twice
        raise ValueError(f"checkpoints: {repeated} given more than once")
    if args.last is not None:
        if args.last < 1:
            raise ValueError(f"--last must be >= 1, got {args.last}")
        files = files[-args.last:]
    first = Path(args.checkpoints[0])
    run_dir = first if first.is_dir() else (
        first.resolve().parent.parent if first.parent.name == "checkpoints" else first.parent)
    if args.out is not None and not args.out:
        raise ValueError("--out must not be empty")
    out, _ = output_paths(args.out or run_dir / "affinity.npy", "--out")  # before the estimate
    config = TrainConfig.from_dict(load_checkpoint(files[-1], mmap=True)["config"])
    if args.plot and args.k > config.T:  # the plot's intervals; refused before the estimate
        raise ValueError(f"--k must be <= T={config.T}, got {args.k}")
    device = resolve_device(args.device)
    result = estimate_affinity(
        files, build_dataset(config), M=args.M, d=args.d, exact=args.exact,
        batches=args.batches, batch_size=args.batch_size, timesteps=args.timesteps,
        interpolation=args.interpolation, seed=args.seed, ema=not args.no_ema, device=device,
        timesteps_per_pass=_int_or_auto("--timesteps-per-pass", args.timesteps_per_pass),
        progress=not args.no_progress)
    npy, side = result.save(out)
    A = result.matrix
    off = A[~np.eye(len(A), dtype=bool)]
    print(f"ant affinity: T={len(A)}, M={result.metadata['M']}, "
          f"{'exact' if args.exact else f'd={args.d}'}, {len(files)} checkpoint(s), "
          f"{args.batches} x {args.batch_size} images; off-diagonal mean "
          f"{off.mean() if off.size else 1.0:.4f} -> {npy}, {side}")
    if args.plot:
        clusters = interval_clustering(args.k, "affinity", affinity=A)
        log_snr = schedules.get_schedule(config.schedule, config.T).log_snr
        plot_affinity(A, plot, log_snr=log_snr, clusters=clusters,
                      title=f"task affinity, {config.model}, T={config.T}")
        print(f"plot written to {plot} (k={args.k}: {list(clusters.bounds)})")
    return 0
