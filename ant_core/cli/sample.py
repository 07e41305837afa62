"""`ant sample`: images from a checkpoint with DDIM / DDPM, optionally with guidance."""
import numpy as np

from .common import positive_int


def add_parser(sub):
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
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
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
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..checkpoint import latest_checkpoint, load_model
    from ..train_config import resolve_device
    from ..visualize import save_image_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.sampler == "ddpm" and (args.steps is not None or args.eta is not None):
        raise ValueError("--steps and --eta apply to --sampler ddim (DDPM runs all T steps "
                         "with eta 1)")
    if args.eta is not None and not 0 <= args.eta <= 1:  # (NaN too)
        raise ValueError(f"--eta must lie in [0, 1], got {args.eta}")
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
    if args.steps is not None and not 1 <= args.steps <= diffusion.T:
        raise ValueError(f"--steps must be in [1, {diffusion.T}] (the model's T), got "
                         f"{args.steps}")
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
    run_dir = path.resolve().parent.parent if path.parent.name == "checkpoints" else path.parent
    guided = '' if scale == 1 else f"_cfg{scale:.15g}".replace(".", "p")  # 2.5 -> _cfg2p5
    labelled = '' if args.label is None else f"_class{args.label}"
    name = f"samples_{args.sampler}{guided}{labelled}_seed{args.seed}"
    npz, png = _outputs(args.out, run_dir / name)  # checked before the sampling
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
        images = diffusion.sample_ddim(model, shape, steps=steps, eta=args.eta or 0.0,
                                       seed=args.seed, y=y, guidance_scale=scale, device=device)
    images = images.clamp(-1, 1).cpu()
    extra = {} if y is None else {"labels": y.cpu().numpy()}
    np.savez(npz, images=images.numpy(), **extra)
    written = str(npz)
    if images.shape[1] in (1, 3):  # a picture; other channel counts (latents) only as .npz
        written = f"{save_image_grid(images, png)}, {npz}"
    print(f"ant sample: {args.num} images ({args.sampler}"
          f"{'' if args.sampler == 'ddpm' else f', {steps} steps'}"
          f"{'' if scale == 1 else f', guidance scale {scale:.15g}'}, "
          f"{'raw' if args.no_ema else 'EMA'} weights, step {state['step']}) -> {written}")
    return 0


def _outputs(out, default):
    """The .npz and .png paths of ``--out`` (a prefix; a trailing .npz or .png is dropped, any
    other dot stays: samples.v2 -> samples.v2.npz), checked: not folders, folder made."""
    from pathlib import Path

    from ..atomic import prepare_outputs

    if out is not None and not out:
        raise ValueError("--out must not be empty")
    prefix = Path(out) if out else default
    if prefix.suffix.lower() in (".npz", ".png"):
        prefix = prefix.with_suffix("")
    return prepare_outputs("--out", *(prefix.with_name(prefix.name + ext)
                                      for ext in (".npz", ".png")))
