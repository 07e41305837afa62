"""The pure-PyTorch diffusion training loop with ANT built in.

One :class:`TrainConfig` (from CLI flags or a JSON/YAML file) and one loop (:class:`Trainer`)::

    clusters = interval_clustering(k, objective)            # K timestep intervals
    t, group = sampler.sample(B)                             # stratified (or uniform) t
    losses   = grouped_mse(model(x_t, t), target, group, K, weight=per_sample_weight)
    weights  = method.backward(losses, model.parameters())   # UW / PCGrad / Nash-MTL / ...
    clip, optimizer.step(), FAMO's update(), EMA update

The parts (data, model, clusters, EMA, process group) come from :mod:`ant_core.training_setup`.
Everything a run needs to continue exactly lives in its checkpoints (see
:mod:`ant_core.checkpoint`); ``method="vanilla"`` (or ``k=1``) is plain diffusion training.
DDP: run under ``torchrun``; the MTL methods all-reduce the gradients themselves, so the bare
model is used, its parameters broadcast from rank 0 once.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import mtl
from .clustering import IntervalClusters
from .diffusion import GaussianDiffusion
from .sampling import StratifiedSampler, UniformSampler
from .train_config import (GRADIENT_METHODS, RESUME_MUTABLE, TrainConfig, TrainingError,
                           jsonable, resolve_device)
from .training_setup import (EMA, build_clusters, build_dataset, build_model, build_model_config,
                             distributed_setup)

__all__ = ["TrainConfig", "Trainer", "TrainingError", "EMA", "train", "RESUME_MUTABLE",
           "build_model", "GRADIENT_METHODS"]


class Trainer:
    """One training run: ``Trainer(config, resume=None).train()``.

    ``resume``: None (fresh run), True (the newest checkpoint in ``<out>/checkpoints``) or a
    checkpoint path. A resumed run must use the checkpoint's config except for the fields in
    :data:`RESUME_MUTABLE` (ValueError otherwise). Nothing is written before the data, model
    and checkpoint have been loaded successfully.
    """

    def __init__(self, config: TrainConfig, resume=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = cfg = config.validate()
        self.out = Path(cfg.out)
        self.checkpoint_dir = self.out / "checkpoints"
        resume_state = ckpt.load_resume_checkpoint(resume, self.checkpoint_dir, self.config)
        if resume_state is None and ckpt.list_checkpoints(self.checkpoint_dir):
            raise ValueError(f"out={cfg.out!r} already holds checkpoints of a run; resume it "
                             "(resume=True / --resume) or choose another out folder")
        if cfg.compile and cfg.amp != "none" and resolve_device(cfg.device) == "cpu":
            raise ValueError(
                f"compile=True with amp={cfg.amp!r} on a CPU: torch.compile under CPU autocast "
                "gave the UNet zero gradients in many layers (torch 2.13's inductor; eager AMP "
                "and compiled float32 are right), so this pair is refused: drop one of them "
                "(a resumed run can drop compile)")
        self.dataset = build_dataset(cfg)
        self.rank, self.world_size, self.device, self._created_group = \
            distributed_setup(cfg.device)
        self.is_main = self.rank == 0
        if self.is_main and Path(cfg.data).is_file() and \
                self.dataset.image_size != cfg.image_size:  # arrays keep their own size
            print(f"ant train: {cfg.data} holds {self.dataset.image_size} px images; the model "
                  f"is built for them (image_size={cfg.image_size} applies to the built-in data "
                  "and image folders only)")
        self.clusters = build_clusters(cfg)
        if resume_state is not None and \
                IntervalClusters.from_dict(resume_state["clusters"]).bounds != self.clusters.bounds:
            raise ValueError(
                f"resume: the clusters built from the config now, {self.clusters.bounds}, differ "
                f"from the checkpoint's, {tuple(map(tuple, resume_state['clusters']['bounds']))} "
                "(did the affinity file change?); the method's state belongs to the old ones")
        self.K = self.clusters.k
        self.diffusion = GaussianDiffusion(cfg.schedule, cfg.T, cfg.prediction)

        torch.manual_seed(cfg.seed)
        self.model_config = build_model_config(cfg, self.dataset)
        self.model = build_model(cfg.model, self.model_config).to(self.device)
        if self.world_size > 1:  # the MTL methods all-reduce gradients: bare model, same init
            with torch.no_grad():
                for tensor in [*self.model.parameters(), *self.model.buffers()]:
                    dist.broadcast(tensor.data, 0)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.engine = None
        hparams = dict(cfg.method_config)
        if cfg.method_key in GRADIENT_METHODS and cfg.engine != "autograd":
            self.engine = mtl.OneBackwardEngine(self.model,
                                                low_memory=cfg.engine == "one-backward-lean")
            hparams["engine"] = self.engine
        name = "ew" if cfg.method_key == "vanilla" else cfg.method_key
        try:
            self.method = mtl.create(name, num_tasks=self.K, **hparams).to(self.device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method_config {cfg.method_config} does not fit method "
                             f"{cfg.method!r}: {exc}") from None
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        # EDM2's continuous uncertainty u(log-SNR): trained with the model's lr, no weight decay
        self.uncertainty = None
        if cfg.weighting == "edm2":
            from .weighting import ContinuousUncertainty

            self.uncertainty = ContinuousUncertainty().to(self.device)
            # for the log: every timestep's log-SNR and cluster, to average e^{-u} per cluster
            self._all_log_snr = self.diffusion.snr(
                torch.arange(self.clusters.T, device=self.device)).log()
            self._all_groups = torch.tensor(self.clusters.labels, device=self.device)
            self._cluster_sizes = torch.tensor(self.clusters.sizes, dtype=torch.float64,
                                               device=self.device)
        extra = [] if self.uncertainty is None else [
            {"params": list(self.uncertainty.parameters()), "lr": cfg.lr, "weight_decay": 0.0}]
        # what the method's backward fills: the model's parameters (and EDM2's u)
        self.trained_parameters = [*self.model.parameters(),
                                   *(p for g in extra for p in g["params"])]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": cfg.lr,
              "weight_decay": cfg.weight_decay}, *extra,
             *self.method.param_groups(lr=cfg.uw_lr, weight_decay=0.0)])
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None

        sampler_cls = UniformSampler if (cfg.sampler == "uniform" or cfg.method_key == "vanilla") \
            else StratifiedSampler
        self.sampler = sampler_cls(self.clusters, seed=cfg.seed, rank=self.rank,
                                   world_size=self.world_size)
        from .data import make_loader

        self.loader = make_loader(self.dataset, cfg.batch_size, seed=cfg.seed, rank=self.rank,
                                  world_size=self.world_size, device=self.device)
        state = np.random.SeedSequence([cfg.seed, self.rank, 7]).generate_state(2, np.uint32)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(
            int(state[0]) << 31 ^ int(state[1]))
        self.step = 0
        self.last_samples = None
        self.last_checkpoint = None
        self._stop_signal = None  # set by our signal handler (or another rank's, via the stats)
        self._stop_agreed = False  # under DDP: every rank saw a stop flag in the same all-reduce
        # the resumed run's last metrics record is off the log schedule when it was written only
        # because that run ended there (judged by that run's own steps and log_every)
        self._drop_resumed_record = resume_state is not None and (
            resume_state["config"]["steps"] == resume_state["step"]
            and resume_state["step"] % resume_state["config"]["log_every"] != 0)
        if resume_state is not None:
            try:
                self._restore(resume_state)
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise ckpt.CheckpointError(
                    f"checkpoint {resume_state['_path']} does not fit this run "
                    f"({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------ resume
    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        if self.uncertainty is not None:
            self.uncertainty.load_state_dict(state["uncertainty"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        ranks = state["rank_states"]
        if len(ranks) == self.world_size:
            mine = ranks[self.rank]
            self.sampler.load_state_dict(mine["sampler"])
            self.loader.load_state_dict(mine["loader"])
            self.noise_generator.set_state(mine["noise_generator"].to(
                self.noise_generator.get_state().device))
            ckpt.restore_rng_state(mine["rng"])
        elif self.is_main:
            batch = self.config.batch_size
            print(f"ant train: resuming {len(ranks)}-process state on {self.world_size} "
                  "processes: data order and noise streams restart (model and optimizer exact), "
                  f"and with batch_size={batch} per process the global batch changes from "
                  f"{len(ranks) * batch} to {self.world_size * batch}")
        self.last_checkpoint = Path(state["_path"])

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "loader": self.loader.state_dict(),
                "noise_generator": self.noise_generator.get_state().cpu(),
                "rng": ckpt.capture_rng_state()}

    def save_checkpoint(self) -> Path:
        """Write ``<out>/checkpoints/ckpt_<step>.pt`` (rank 0; every rank's streams gathered)
        and return its path (on every rank).

        Parameters that are not finite (an overflowing gradient with a finite loss) are a
        TrainingError instead: such a file would replace the last good checkpoint."""
        tensors = [*self.trained_parameters, *self.ema.model.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all()):
            raise TrainingError(
                f"non-finite parameters after step {self.step} (an overflowing gradient?); not "
                f"saved. Last good checkpoint: {self.last_checkpoint or 'none'}")
        mine = self._rank_state()
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if self.is_main:
            state = {
                "format": "ant-core-checkpoint", "version": ckpt.FORMAT_VERSION,
                "step": self.step, "config": jsonable(self.config.to_dict()),
                "clusters": jsonable(self.clusters.to_dict()),
                "model_kind": self.config.model, "model_config": jsonable(self.model_config),
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "uncertainty": (self.uncertainty.state_dict() if self.uncertainty is not None
                                else {}),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "world_size": self.world_size, "rank_states": ranks,
            }
            ckpt.atomic_save(state, ckpt.checkpoint_path(self.checkpoint_dir, self.step))
            ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_last)
        if self.world_size > 1:
            dist.barrier()
        path = ckpt.checkpoint_path(self.checkpoint_dir, self.step)  # every rank's answer
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ one step
    def per_sample_weight(self, t: torch.Tensor):
        cfg = self.config
        if cfg.weighting in ("none", "edm2"):  # edm2: a learned transform in compute_losses
            return None
        from .weighting import min_snr_weight, p2_weight

        snr = self.diffusion.snr(t)
        if cfg.weighting == "min_snr":
            return min_snr_weight(snr, cfg.min_snr_gamma, cfg.prediction)
        return p2_weight(snr, cfg.p2_k, cfg.p2_gamma)

    def compute_losses(self, x_t, t, y, target, group, weight):
        """The K per-cluster losses (float32) of one batch (with weighting='edm2' the cluster
        means of EDM2's per-sample ``loss · e^{−u} + u``)."""
        from .losses import grouped_mse

        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            pred = self.forward(x_t, t, y)
        if self.uncertainty is None:
            return grouped_mse(pred, target, group, self.K, weight=weight)
        _, per_sample = grouped_mse(pred, target, group, self.K, return_per_sample=True)
        # the schedule's log-SNR table is finite (GaussianDiffusion checks it): no host sync
        transformed = self.uncertainty(per_sample, self.diffusion.snr(t).log(), check=False)
        counts = _group_counts(group, self.K).clamp_min(1).to(transformed.dtype)
        return transformed.new_zeros(self.K).index_add(0, group, transformed) / counts

    def _lr_factor(self) -> float:
        warm = self.config.warmup_steps
        return min(1.0, (self.step + 1) / warm) if warm else 1.0

    def train_step(self) -> dict:
        """One optimisation step; returns the union-batch statistics of the step."""
        cfg = self.config
        x0, labels = next(self.loader)
        y = labels if cfg.class_conditional else None
        t, group = self.sampler.sample(x0.shape[0], device=self.device)
        noise = torch.randn(x0.shape, generator=self.noise_generator, device=self.device)
        if cfg.label_dropout > 0:  # the null label (index num_classes) for classifier-free guidance
            drop = torch.rand(labels.shape, generator=self.noise_generator,
                              device=self.device) < cfg.label_dropout
            y = labels.masked_fill(drop, self.model_config["num_classes"])
        x_t = self.diffusion.q_sample(x0, t, noise)
        target = self.diffusion.target(x0, noise, t)
        weight = self.per_sample_weight(t)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * self._lr_factor()
        self.optimizer.zero_grad(set_to_none=True)
        recording = self.engine.record() if self.engine is not None else _null_context()
        with recording:
            losses = self.compute_losses(x_t, t, y, target, group, weight)
        counts = _group_counts(group, self.K)  # the sampler's ids: in range by construction
        stats = self._reduce_stats(losses.detach(), counts, self._edm2_cluster_weights())
        present = [v for v in stats["cluster_losses"] if v is not None]
        if not math.isfinite(stats["loss"]) or not all(map(math.isfinite, present)):
            if self.engine is not None:
                self.engine.discard()
            kept = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise TrainingError(
                f"non-finite loss at step {self.step + 1}: loss={stats['loss']}, per-cluster "
                f"losses {stats['cluster_losses']}; training stopped before the update and "
                f"nothing was saved. Last good checkpoint: {kept}")
        try:
            weights = self.method.backward(losses, self.trained_parameters, group=group,
                                           task_counts=counts,
                                           grad_scaler=self.scaler)
        except mtl.NashMTLSolveError as exc:
            raise TrainingError(
                f"{cfg.method} failed at step {self.step + 1}: {exc}. Last good checkpoint: "
                f"{self.last_checkpoint or 'none'}") from exc
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if cfg.method_key == "famo" and self.method.reevaluate:  # losses after the step
            with torch.no_grad():
                self.method.update(self.compute_losses(x_t, t, y, target, group, weight),
                                   task_counts=counts)
        self.ema.update(self.model)
        self.step += 1
        stats["weights"] = [float(w) for w in weights.detach().cpu()]
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return stats

    @torch.no_grad()
    def _edm2_cluster_weights(self):
        """With weighting='edm2': the K per-cluster means of EDM2's weight e^{−u(λ_t)} over each
        cluster's timesteps (this step's u, the same on every rank); None otherwise."""
        if self.uncertainty is None:
            return None
        w = torch.exp(-self.uncertainty.log_variance(self._all_log_snr, check=False)).double()
        return w.new_zeros(self.K).index_add(0, self._all_groups, w) / self._cluster_sizes

    def _reduce_stats(self, losses, counts, edm2_weights=None) -> dict:
        """Union-batch per-cluster losses and mean loss (one all-reduce of 2K + 2 numbers, which
        also carries the stop flag so every rank stops together); ``edm2_weights`` (K,), equal
        on every rank, comes back with them as ``stats["edm2_weights"]``."""
        stop = 1.0 if self._stop_signal is not None else 0.0
        packed = torch.cat([losses.double() * counts, counts,
                            torch.tensor([stop], dtype=torch.float64, device=counts.device),
                            torch.zeros(1, dtype=torch.float64, device=counts.device)])
        if self.world_size > 1:
            dist.all_reduce(packed)
        if edm2_weights is not None:
            packed = torch.cat([packed, edm2_weights])
        packed = packed.cpu()  # the step's one read-back to the host
        sums, n = packed[:self.K], packed[self.K:2 * self.K]
        if self.world_size > 1 and packed[2 * self.K] > 0:
            self._stop_agreed = True
            if self._stop_signal is None:
                self._stop_signal = "SIGTERM (from another rank)"
        # a cluster without samples in the union batch has no loss: None (JSON null), not 0
        cluster = [s / c if c > 0 else None for s, c in zip(sums.tolist(), n.tolist())]
        stats = {"loss": float(sums.sum() / n.sum()), "cluster_losses": cluster}
        if edm2_weights is not None:
            stats["edm2_weights"] = packed[2 * self.K + 2:].tolist()
        return stats

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, num: int, steps: int, seed: int = 0) -> torch.Tensor:
        """``num`` images from the EMA model with DDIM (``steps`` steps), in [-1, 1]."""
        ds = self.dataset
        shape = (num, ds.channels, ds.image_size, ds.image_size)
        y = None
        if self.config.class_conditional:
            y = torch.arange(num, device=self.device) % ds.num_classes
        return self.diffusion.sample_ddim(self.ema.model, shape, steps=steps, seed=seed, y=y,
                                          device=self.device).clamp(-1, 1)

    def _write_samples(self, name: str) -> Path:
        """A PNG grid of samples (1 or 3 channels) or, for other channel counts (latents),
        the samples as ``.npy`` next to where the grid would be."""
        from .visualize import save_image_grid

        images = self.sample(self.config.num_samples, self.config.sample_steps)
        self.last_samples = images.cpu()
        if images.shape[1] in (1, 3):
            return save_image_grid(self.last_samples, self.out / name)
        path = (self.out / name).with_suffix(".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, self.last_samples.numpy())
        return path

    # ------------------------------------------------------------------ the loop
    def _handle_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum).name

    def _log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _prepare_output(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(jsonable(self.config.to_dict()),
                                                         indent=2))
        (self.out / "clusters.json").write_text(json.dumps(self.clusters.to_dict(), indent=2,
                                                               allow_nan=False))
        log = self.out / "metrics.jsonl"
        if self.step == 0:
            log.write_text("")
        elif log.exists():  # keep what an uninterrupted run logs up to the resumed step
            from .visualize import read_metrics

            last = self.step - 1 if self._drop_resumed_record else self.step
            keep = [r for r in read_metrics(log) if r.get("step", 0) <= last]
            log.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def train(self) -> dict:
        """Run to ``config.steps`` (or a SIGTERM/SIGINT: checkpoint, then return). Returns
        ``{"step", "stopped_by", "checkpoint", "out", "loss", "files"}``."""
        cfg = self.config
        if self.is_main:
            self._prepare_output()
        if self.world_size > 1:
            dist.barrier()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._handle_signal)
        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"ant train ({cfg.method})",
                       dynamic_ncols=True)
        start, last = time.perf_counter(), {}
        try:
            while self.step < cfg.steps:
                last = self.train_step()
                if self.is_main:
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log({"step": self.step, **last,
                                   "time": round(time.perf_counter() - start, 4)})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(_postfix(last), refresh=False)
                # under DDP only the all-reduced flag: a signal that lands after this step's
                # all-reduce is acted on one step later, by every rank at once
                if self._stop_signal is not None and (self.world_size == 1 or self._stop_agreed):
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if (cfg.sample_every and self.step % cfg.sample_every == 0 and self.is_main
                        and self.step < cfg.steps):
                    self._write_samples(f"samples/step_{self.step:08d}.png")
            path = self.save_checkpoint()  # still under our handlers: a signal cannot cut it
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        files = {}
        if self.is_main:
            files["checkpoint"] = str(path)
            files["metrics"] = str(self.out / "metrics.jsonl")
            if self._stop_signal is None:
                files["samples"] = str(self._write_samples("samples.png"))
                from .visualize import plot_training_curves

                files.update({k: str(v) for k, v in
                              plot_training_curves(self.out / "metrics.jsonl", self.out).items()})
        if self.world_size > 1:
            dist.barrier()
        return {"step": self.step, "stopped_by": self._stop_signal, "checkpoint": str(path),
                "out": str(self.out), "loss": last.get("loss"), "files": files}

    def close(self) -> None:
        """Remove engine hooks; destroy the process group if this trainer created it."""
        if self.engine is not None:
            self.engine.remove()
        if self._created_group and dist.is_initialized():
            dist.destroy_process_group()
            self._created_group = False


def train(config: TrainConfig, resume=None) -> dict:
    """``Trainer(config, resume).train()``, closing the trainer afterwards."""
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.train()
    finally:
        trainer.close()


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _group_counts(group, num_groups):
    """Samples per cluster (float64, (K,)) of in-range ids, without bincount's host read-back
    of the largest id on a GPU."""
    return torch.zeros(num_groups, dtype=torch.float64, device=group.device).index_add_(
        0, group, torch.ones(group.shape, dtype=torch.float64, device=group.device))


def _postfix(stats: dict) -> str:
    losses = " ".join("–" if v is None else f"{v:.3g}" for v in stats["cluster_losses"])
    key = "edm2_weights" if "edm2_weights" in stats else "weights"
    weights = " ".join(f"{v:.3g}" for v in stats[key])
    return f"loss={stats['loss']:.4g} L_k=[{losses}] w=[{weights}]"
