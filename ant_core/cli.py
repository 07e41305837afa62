"""The `ant` command.

    ant cluster [--schedule linear] [--T 1000] [--k 5] [--objective log_snr] [--json] [--plot F]
    ant train   [--config FILE.json|yaml] [--out DIR] [--resume [CKPT]] [--<field> VALUE ...]
    ant sample  CHECKPOINT|RUN_DIR [--sampler ddim|ddpm] [--steps 50] [--num 16] [--seed 0]
    ant demo    [--out DIR] [--steps N] [--quick]
    ant affinity RUN_DIR|CKPT... [--M 100] [--d 4096] [--batches 4] [--out F.npy] [--plot F]

`ant cluster` does not import torch; the other subcommands import it inside their functions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from . import schedules
from .clustering import OBJECTIVES, IntervalClusters, interval_clustering


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read {what} from {path}: {exc}") from None


def _cluster_parser(sub):
    p = sub.add_parser(
        "cluster",
        help="split the timesteps into k intervals (exact interval clustering)",
        description="Exact interval clustering of diffusion timesteps (ANT). Prints the "
        "intervals with their SNR range; defaults: linear DDPM schedule, T=1000, k=5, log-SNR.",
    )
    p.add_argument("--schedule", default="linear", choices=sorted(schedules.SCHEDULES),
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
                   "(needs matplotlib)")
    p.set_defaults(func=_cmd_cluster)


def _cmd_cluster(args) -> int:
    sched = (schedules.from_alphas_cumprod(_load_npy(args.alphas_cumprod, "alphas_cumprod"))
             if args.alphas_cumprod else args.schedule)
    inputs = {}
    for name in ("values", "affinity", "cost_matrix"):
        path = getattr(args, name)
        if path:
            inputs[name] = _load_npy(path, name)
    uses_schedule = not inputs
    if args.plot:  # before printing anything: no table followed by a failure
        from .visualize import check_plot_path
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
        print(_table(clusters, log_snr))
    if args.plot:
        from .visualize import plot_clusters
        plot_clusters(clusters, log_snr, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def _table(c: IntervalClusters, log_snr) -> str:
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


# ----------------------------------------------------------------------------- ant train
# (field, type, help) for every TrainConfig field; a test checks it matches the dataclass.
# Kept here, not derived from the dataclass, so that building the parser does not import torch.
_TRAIN_FIELDS = (
    ("data", str, "'shapes' (built in, default), 'digits', an image folder or a .npy/.npz"),
    ("num_images", int, "built-in shapes: number of training images (default 2000)"),
    ("image_size", int, "built-in data / image folders: side in pixels (default 16)"),
    ("data_seed", int, "seed of the built-in data (default 0)"),
    ("class_conditional", bool, "condition the model on the data's labels"),
    ("label_dropout", float, "share of labels replaced by the null label, which classifier-free "
                             "guidance needs (ant sample --guidance-scale); default 0, DiT uses "
                             "0.1"),
    ("model", str, "model preset (unet-tiny, dit-tiny, unet-small, dit-s, ...; default "
                   "dit-tiny) or 'unet' / 'dit'"),
    ("model_config", "json", "JSON object of model overrides, e.g. '{\"depth\": 2}'"),
    ("schedule", str, "noise schedule (default linear)"),
    ("T", int, "number of diffusion timesteps (default 1000)"),
    ("prediction", str, "network target: eps (default), v or x0"),
    ("objective", str, "clustering objective: timestep, snr, log_snr (default), affinity, "
                       "affinity_medoid, affinity_average"),
    ("k", int, "number of timestep clusters (default 5; 1 = plain training)"),
    ("affinity", str, "T x T task-affinity .npy for the affinity objectives"),
    ("sampler", str, "timestep sampler: stratified (default, the paper) or uniform"),
    ("weighting", str, "per-sample loss weight: none (default), min_snr, p2, or edm2 (EDM2's "
                       "learned loss·exp(-u(log-SNR)) + u, trained with the model's lr; with "
                       "--method vanilla or ew)"),
    ("min_snr_gamma", float, "Min-SNR gamma (default 5)"),
    ("p2_k", float, "P2 k (default 1)"),
    ("p2_gamma", float, "P2 gamma (default 1)"),
    ("method", str, "MTL method: uw (default), vanilla, ew, famo, pcgrad, nashmtl, ..."),
    ("method_config", "json", "JSON object of method hyper-parameters, e.g. "
                              "'{\"update_weights_every\": 25}'"),
    ("engine", str, "per-task gradients of gradient methods: autograd (default), "
                    "one-backward, one-backward-lean"),
    ("uw_lr", float, "learning rate of the method's own parameters (UW; default 0.025)"),
    ("steps", int, "training steps (default 1000)"),
    ("batch_size", int, "batch size per process (default 32)"),
    ("lr", float, "AdamW learning rate of the model (default 1e-3)"),
    ("weight_decay", float, "AdamW weight decay of the model (default 0)"),
    ("warmup_steps", int, "linear learning-rate warm-up steps (default 0)"),
    ("grad_clip", float, "max gradient norm of the model, 0 = off (default)"),
    ("ema_decay", float, "EMA decay (default 0.999)"),
    ("amp", str, "mixed precision: none (default), bf16, fp16 (with a GradScaler)"),
    ("compile", bool, "torch.compile the model"),
    ("seed", int, "random seed (default 0)"),
    ("device", str, "auto (default), cpu, cuda, cuda:N"),
    ("log_every", int, "write a metrics record every N steps (default 10)"),
    ("save_every", int, "checkpoint every N steps, 0 = at the end only (default)"),
    ("keep_last", int, "checkpoints to keep (default 3; 0 = all)"),
    ("sample_every", int, "sample grid every N steps, 0 = at the end only (default)"),
    ("num_samples", int, "images in a sample grid (default 16)"),
    ("sample_steps", int, "DDIM steps for sample grids (default 50)"),
    ("progress", bool, "show the progress bar (default on)"),
)


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _train_parser(sub):
    p = sub.add_parser(
        "train", help="train a diffusion model with ANT (clusters + MTL method)",
        description="Train a diffusion model with ANT: interval clustering of the timesteps, a "
        "stratified sampler, per-cluster losses and an MTL method (UW by default). Values come "
        "from the defaults, then --config, then the flags. Writes config, checkpoints, a JSONL "
        "metrics log, sample grids and loss/weight plots into --out.")
    p.add_argument("--config", metavar="FILE", help="a .json (or .yaml with PyYAML) config")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/ant)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from the newest checkpoint in --out (or from CKPT)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_train)


def _add_config_flags(p):
    group = p.add_argument_group("training configuration (TrainConfig fields)")
    for name, kind, help_text in _TRAIN_FIELDS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, help=help_text,
                               type=_json_object if kind == "json" else kind)


def _given_fields(args) -> dict:
    return {name: getattr(args, name) for name, _, _ in _TRAIN_FIELDS
            if getattr(args, name, None) is not None}


def _train_config_from_args(args):
    """defaults <- checkpoint config (--resume) <- --config file <- flags; also the resume arg."""
    from pathlib import Path

    from .checkpoint import latest_checkpoint, load_checkpoint
    from .train_config import read_config_file
    from .trainer import TrainConfig

    values = {}
    file_values = read_config_file(args.config) if args.config else {}
    resume = args.resume
    if resume is not None:
        if resume is True:
            out = args.out or file_values.get("out")
            if out is None:
                raise ValueError("--resume needs --out DIR (the run folder) or a checkpoint path")
            resume = latest_checkpoint(Path(out) / "checkpoints")
            if resume is None:
                raise ValueError(f"--resume: no checkpoint in {Path(out) / 'checkpoints'}")
        values.update(load_checkpoint(resume, mmap=True)["config"])  # the config only
        values["out"] = args.out or str(Path(resume).resolve().parent.parent)
    values.update(file_values)  # only the fields the file sets: over a resumed run's config
    values.update(_given_fields(args))
    if args.out:
        values["out"] = args.out
    return TrainConfig.from_dict(values), resume


def _cmd_train(args) -> int:
    import torch

    from .trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    config, resume = _train_config_from_args(args)
    result = train(config, resume=resume)
    _print_train_result(result)
    return 0


def _print_train_result(result: dict) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if result["stopped_by"]:
        print(f"ant train: stopped by {result['stopped_by']} at step {result['step']}; "
              f"checkpoint saved to {result['checkpoint']} (continue with --resume)")
        return
    print(f"ant train: finished {result['step']} steps, final loss {result['loss']:.4g}")
    for name, path in result["files"].items():
        print(f"  {name:<15} {path}")


# ----------------------------------------------------------------------------- ant sample


def _sample_parser(sub):
    p = sub.add_parser(
        "sample", help="generate images from a checkpoint (EMA weights by default)",
        description="Sample images from a training checkpoint (or the newest checkpoint of a "
        "run folder) with DDIM or DDPM; writes a PNG grid and an .npz of the images (float32, "
        "(N, C, H, W), in [-1, 1]).")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder")
    p.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default min(50, T); DDPM uses T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--guidance-scale", type=float, default=1.0, metavar="S",
                   help="classifier-free guidance scale of class-conditional models trained with "
                   "--label-dropout > 0 (default 1: no guidance; 0: unconditional)")
    p.add_argument("--label", type=int, default=None, metavar="C",
                   help="class-conditional models: every image of class C (default: the classes "
                   "in turn, 0, 1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw model weights")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", metavar="PREFIX", help="output path without extension (default: "
                   "<run>/samples_<sampler>[_cfg<S>][_class<C>]_seed<seed>, 2.5 written 2p5)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args) -> int:
    from pathlib import Path

    import torch

    from .checkpoint import latest_checkpoint, load_model
    from .train_config import resolve_device
    from .visualize import save_image_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if not 0 <= args.guidance_scale < float("inf"):
        raise ValueError(f"--guidance-scale must be a finite number >= 0, got "
                         f"{args.guidance_scale}")
    path = Path(args.checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise ValueError(f"no checkpoint found in {path} or {path / 'checkpoints'}")
        path = found
    device = resolve_device(args.device)
    model, diffusion, state = load_model(path, ema=not args.no_ema, device=device)
    model.requires_grad_(False)
    mc = state["model_config"]
    scale = args.guidance_scale
    if scale != 1:
        if not mc.get("num_classes"):
            raise ValueError("--guidance-scale needs a class-conditional model; this one is "
                             "unconditional")
        if not state["config"].get("label_dropout", 0.0) > 0:
            raise ValueError("--guidance-scale: this model was trained with label_dropout=0, so "
                             "its null label never saw training; train with --label-dropout "
                             "(e.g. 0.1) to use classifier-free guidance")
    if args.label is not None and not 0 <= args.label < (mc.get("num_classes") or 0):
        raise ValueError(f"--label must be a class in [0, {mc.get('num_classes') or 0}) of this "
                         f"{'class-conditional' if mc.get('num_classes') else 'unconditional'} "
                         f"model, got {args.label}")
    shape = (args.num, mc["in_channels"], mc["image_size"], mc["image_size"])
    y = None
    if mc.get("num_classes"):
        y = torch.arange(args.num, device=device) % mc["num_classes"]
        if args.label is not None:
            y = torch.full_like(y, args.label)
    if args.sampler == "ddpm":
        images = diffusion.sample_ddpm(model, shape, seed=args.seed, y=y, guidance_scale=scale,
                                       device=device)
    else:
        steps = min(50, diffusion.T) if args.steps is None else args.steps  # for the report
        images = diffusion.sample_ddim(model, shape, steps=steps, eta=args.eta,
                                       seed=args.seed, y=y, guidance_scale=scale, device=device)
    images = images.clamp(-1, 1).cpu()
    run_dir = path.resolve().parent.parent if path.parent.name == "checkpoints" else path.parent
    guided = '' if scale == 1 else f"_cfg{scale:.15g}".replace(".", "p")  # 2.5 -> _cfg2p5
    labelled = '' if args.label is None else f"_class{args.label}"
    name = f"samples_{args.sampler}{guided}{labelled}_seed{args.seed}"
    prefix = Path(args.out) if args.out else run_dir / name
    prefix.parent.mkdir(parents=True, exist_ok=True)
    png = save_image_grid(images, prefix.with_suffix(".png"))
    npz = prefix.with_suffix(".npz")
    extra = {} if y is None else {"labels": y.cpu().numpy()}
    np.savez(npz, images=images.numpy(), **extra)
    print(f"ant sample: {args.num} images ({args.sampler}"
          f"{'' if args.sampler == 'ddpm' else f', {steps} steps'}"
          f"{'' if scale == 1 else f', guidance scale {scale:.15g}'}, "
          f"{'raw' if args.no_ema else 'EMA'} weights, step {state['step']}) -> {png}, {npz}")
    return 0


# ----------------------------------------------------------------------------- ant demo


def _demo_parser(sub):
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
    p.add_argument("--image-size", type=int, default=16, help="16 (default) to 32")
    p.add_argument("--method", default="uw", help="MTL method (default uw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    import time
    from pathlib import Path

    import torch

    from .data import ProceduralShapes
    from .metrics import evaluate
    from .trainer import TrainConfig, Trainer
    from .visualize import has_matplotlib, plot_clusters

    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    steps = args.steps if args.steps is not None else \
        (20 if quick else 1000 if args.model == "dit-tiny" else 500)
    num_eval = 16 if quick else 100
    out = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if args.overwrite and (out / "checkpoints").is_dir():
        import shutil

        shutil.rmtree(out / "checkpoints")
    print(f"ant demo: run folder {out}")
    # 1. clusters
    clusters = interval_clustering(5, "log_snr", schedule="linear", T=1000)
    log_snr = schedules.get_schedule("linear", 1000).log_snr
    print(_table(clusters, log_snr))
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
        _print_train_result(result)
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


# ----------------------------------------------------------------------------- ant affinity


def _affinity_parser(sub):
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
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_affinity)


def _positive_int(text: str) -> int:
    """argparse type of --threads: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _int_or_auto(name, value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an int or 'auto', got {value!r}") from None


def _cmd_affinity(args) -> int:
    from pathlib import Path

    import torch

    from .affinity import _checkpoint_files, estimate_affinity
    from .checkpoint import load_checkpoint
    from .train_config import TrainConfig, resolve_device
    from .trainer import build_dataset
    from .visualize import check_plot_path, plot_affinity

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:  # before the (long) estimate, not after it
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        check_plot_path(args.plot)
    files = [f for c in args.checkpoints for f in _checkpoint_files(c)]
    if args.last is not None:
        if args.last < 1:
            raise ValueError(f"--last must be >= 1, got {args.last}")
        files = files[-args.last:]
    config = TrainConfig.from_dict(load_checkpoint(files[-1], mmap=True)["config"])
    device = resolve_device(args.device)
    result = estimate_affinity(
        files, build_dataset(config), M=args.M, d=args.d, exact=args.exact,
        batches=args.batches, batch_size=args.batch_size, timesteps=args.timesteps,
        interpolation=args.interpolation, seed=args.seed, ema=not args.no_ema, device=device,
        timesteps_per_pass=_int_or_auto("--timesteps-per-pass", args.timesteps_per_pass),
        progress=not args.no_progress)
    first = Path(args.checkpoints[0])
    run_dir = first if first.is_dir() else (
        first.resolve().parent.parent if first.parent.name == "checkpoints" else first.parent)
    out = Path(args.out) if args.out else run_dir / "affinity.npy"
    npy, side = result.save(out)
    A = result.matrix
    off = A[~np.eye(len(A), dtype=bool)]
    print(f"ant affinity: T={len(A)}, M={result.metadata['M']}, "
          f"{'exact' if args.exact else f'd={args.d}'}, {len(files)} checkpoint(s), "
          f"{args.batches} x {args.batch_size} images; off-diagonal mean "
          f"{off.mean() if off.size else 1.0:.4f} -> {npy}, {side}")
    if args.plot:
        k = min(args.k, len(A))
        clusters = interval_clustering(k, "affinity", affinity=A)
        log_snr = schedules.get_schedule(config.schedule, config.T).log_snr
        plot_affinity(A, args.plot, log_snr=log_snr, clusters=clusters,
                      title=f"task affinity, {config.model}, T={config.T}")
        print(f"plot written to {args.plot} (k={k}: {list(clusters.bounds)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ant", description="ANT for diffusion training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _cluster_parser(sub)
    _train_parser(sub)
    _sample_parser(sub)
    _demo_parser(sub)
    _affinity_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        parser.exit(2, f"ant {args.command}: error: {exc}\n")
    except RuntimeError as exc:
        from .trainer import TrainingError

        if not isinstance(exc, TrainingError):
            raise
        parser.exit(1, f"ant {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
