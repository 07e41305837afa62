"""`ant demo`: cluster, train with ANT, sample and evaluate on the built-in data."""
import json

import numpy as np

from .. import schedules
from ..clustering import interval_clustering
from .cluster import cluster_table
from .common import positive_int
from .train import print_train_result


def add_parser(sub):
    p = sub.add_parser(
        "demo", help="cluster, train with ANT-UW, sample and evaluate on built-in data",
        description="The whole ANT pipeline on the built-in shapes data in a few minutes on a "
        "CPU: log-SNR interval clustering (K=5), ANT-UW training of a small model, sampling "
        "with the EMA weights, and metrics against held-out images. Everything goes into one "
        "run folder.")
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<date-time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints of an earlier run in --out first")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1000 for "
                   "dit-tiny, 500 for the slower unet-tiny; --quick: 20)")
    p.add_argument("--quick", action="store_true", help="a tiny run for CI (seconds)")
    p.add_argument("--model", default="dit-tiny", choices=("dit-tiny", "unet-tiny"))
    p.add_argument("--image-size", type=int, default=16, help="side in pixels (default 16)")
    p.add_argument("--method", default="uw", help="MTL method (default uw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    import torch

    from ..checkpoint import list_checkpoints
    from ..data import ProceduralShapes
    from ..metrics import evaluate
    from ..trainer import TrainConfig, Trainer
    from ..visualize import has_matplotlib, plot_clusters

    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    steps = args.steps if args.steps is not None else \
        (20 if quick else 1000 if args.model == "dit-tiny" else 500)
    num_eval = 16 if quick else 100
    out = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if list_checkpoints(out / "checkpoints"):  # the trainer's own test of "holds a run"
        if not args.overwrite:
            raise ValueError(f"--out {out} already holds a run's checkpoints: pass "
                             "--overwrite to replace them, or choose another --out")
        import shutil

        shutil.rmtree(out / "checkpoints")
    print(f"ant demo: run folder {out}")
    # 1. clusters
    clusters = interval_clustering(5, "log_snr", schedule="linear", T=1000)
    log_snr = schedules.get_schedule("linear", 1000).log_snr
    print(cluster_table(clusters, log_snr))
    # 2. train
    config = TrainConfig(
        data="shapes", num_images=256 if quick else 2000, image_size=args.image_size,
        model=args.model, schedule="linear", T=1000, objective="log_snr", k=5,
        method=args.method, steps=steps, batch_size=16 if quick else 32, lr=2e-3,
        warmup_steps=min(20, steps), ema_decay=0.995, seed=args.seed, out=str(out),
        log_every=2 if quick else 10, num_samples=num_eval, sample_steps=10 if quick else 50,
        progress=not args.no_progress, keep_last=1)
    trainer = Trainer(config)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    train_seconds = time.perf_counter() - start
    files = dict(result["files"])
    if result["stopped_by"]:
        print_train_result(result)
        return 0
    if has_matplotlib():
        plot_clusters(clusters, log_snr, str(out / "clusters.png"))
        files["clusters_plot"] = str(out / "clusters.png")
    # 3. samples + 4. metrics against held-out images (another seed of the generator)
    samples = trainer.last_samples
    np.savez(out / "samples.npz", images=samples.numpy())
    files["samples_npz"] = str(out / "samples.npz")
    held_out = ProceduralShapes(num_images=num_eval, image_size=args.image_size,
                                seed=config.data_seed + 1)
    metrics = evaluate(samples, held_out.images)
    reference = evaluate(trainer.dataset.images[:num_eval], held_out.images)
    report = {
        "model": args.model, "method": args.method, "steps": result["step"],
        "image_size": args.image_size, "final_train_loss": result["loss"],
        "samples_vs_heldout": metrics,
        "train_vs_heldout_reference": reference,
        "feature_extractor": "random_conv (relative metric, not Inception FID)",
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    files["metrics_json"] = str(out / "metrics.json")
    print(f"\nant demo: {result['step']} steps of ANT-{args.method.upper()} on {args.model} "
          f"{args.image_size}px in {report['wall_seconds']} s")
    print(f"  samples vs held-out:  FD {metrics['fd']:.4g}, precision "
          f"{metrics['precision']:.3f}, recall {metrics['recall']:.3f}")
    print(f"  real vs held-out (reference floor): FD {reference['fd']:.4g}, precision "
          f"{reference['precision']:.3f}, recall {reference['recall']:.3f}")
    print("  files:")
    for name, path in files.items():
        print(f"    {name:<15} {path}")
    return 0
