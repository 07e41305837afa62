"""`ant train`: a TrainConfig from defaults, a checkpoint (--resume), a config file and flags."""
import argparse
import json
import os

from .common import positive_int


# (field, type, help) for every TrainConfig field; a test checks it matches the dataclass.
# Kept here, not derived from the dataclass, so that building the parser does not import torch.
TRAIN_FIELDS = (
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


def add_parser(sub):
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
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    _add_config_flags(p)
    p.set_defaults(func=run)


def _add_config_flags(p):
    group = p.add_argument_group("training configuration (TrainConfig fields)")
    for name, kind, help_text in TRAIN_FIELDS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, help=help_text,
                               type=_json_object if kind == "json" else kind)


def _given_fields(args) -> dict:
    return {name: getattr(args, name) for name, _, _ in TRAIN_FIELDS
            if getattr(args, name, None) is not None}


def _train_config_from_args(args):
    """defaults <- checkpoint config (--resume) <- --config file <- flags; also the resume arg."""
    from pathlib import Path

    from ..checkpoint import latest_checkpoint, load_checkpoint
    from ..train_config import read_config_file
    from ..trainer import TrainConfig

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
        folder = Path(resume).absolute().parent  # not resolve(): a symlinked file stays here
        if not (args.out or file_values.get("out")) and folder.name != "checkpoints":
            raise ValueError(f"--resume {resume}: the file is not in a run's checkpoints/ "
                             "folder, so the run folder is unknown; pass --out DIR")
        values["out"] = args.out or str(folder.parent)
    values.update(file_values)  # only the fields the file sets: over a resumed run's config
    values.update(_given_fields(args))
    if args.out:
        values["out"] = args.out
    return TrainConfig.from_dict(values), resume


def run(args) -> int:
    import torch

    from ..trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    config, resume = _train_config_from_args(args)
    result = train(config, resume=resume)
    print_train_result(result)
    return 0


def print_train_result(result: dict) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if result["stopped_by"]:
        print(f"ant train: stopped by {result['stopped_by']} at step {result['step']}; "
              f"checkpoint saved to {result['checkpoint']} (continue with --resume)")
        return
    print(f"ant train: finished {result['step']} steps, final loss {result['loss']:.4g}")
    for name, path in result["files"].items():
        print(f"  {name:<15} {path}")
