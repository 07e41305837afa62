"""Does ANT improve sample quality? A small-scale, multi-seed reproduction of the paper's claim.

    python benchmarks/quality.py --preset cpu|gpu|smoke|<probe> [--seeds N] [--configs a,b,...]
                                 [--k K] [--out DIR] [--device cpu|cuda] [--threads N] [--jobs N]

(<probe>: a variant of the cpu preset that changes one thing, listed in ``quality_presets.py``:
cpu-long, cpu-8k, cpu-wide, cpu-v, cpu-x0.)

Grid: the configurations in ``quality_presets.GRID`` (vanilla, Min-SNR-5, ANT-UW with the
timestep / log-SNR / affinity objectives, ANT-Nash-MTL and ANT-PCGrad on log-SNR clusters,
ANT-FAMO; K = 5) x seeds 0..N-1 (default 3); two ablations run when ``--configs`` names them:
``ew_log_snr`` (the log-SNR clusters with equal weights: vanilla's loss with t stratified over
the clusters) and ``uw_log_snr_slow`` (ANT-UW with its log-variances at lr 0.0025, 10x slower).
Everything else is fixed by the preset and equal for all configurations: ProceduralShapes data
(data_seed 0), model, steps, batch, optimiser (AdamW, lr with linear warm-up, gradient-norm clip
1.0 for every configuration, as the paper clips Nash-MTL), EMA, and the evaluation. Method
settings: UW's log-variances at lr 0.025 (the TrainConfig default, as in the paper); Nash-MTL
re-solves its weights every 25 steps (the paper's setting); PCGrad's projection order is seeded
with the run seed; stratified sampling over the K = 5 clusters for the ANT configurations,
uniform t for vanilla and Min-SNR. The per-task gradients of PCGrad and Nash-MTL come from K
backward passes on the CPU presets and from the one-backward engine on the gpu preset
(``--engine``: the same gradients, faster).

Protocol
* Training goes through the public API only: ``TrainConfig`` + ``train(config, resume=True)``.
  Training seed = benchmark seed, so for one seed every configuration starts from the same
  initialisation and sees the same data order ("paired by seed").
* Metric vs step: each run is trained to the first evaluation step, evaluated, then continued
  with exact resume to the next one, and so on (``preset.eval_steps``).
* Evaluation of a checkpoint: its EMA model (``ant_core.checkpoint.load_checkpoint`` +
  ``ant_core.models.create_model``) generates ``num_eval`` samples with
  ``GaussianDiffusion.sample_ddim`` (eta 0, ``sample_steps`` steps, noise seed = run seed, the
  same for every configuration), scored by ``ant_core.metrics.evaluate`` (random-conv features:
  a *relative* Fréchet distance, not Inception FID; k-NN precision / recall, k = 3) against
  ``num_eval`` held-out ProceduralShapes images (data seed 1).
* Affinity configuration: per seed, the vanilla run's checkpoint at ``affinity_step`` (copied to
  ``<out>/affinity/warmup_seed<S>.pt``; trained on its own if vanilla was not run) goes to
  ``ant_core.affinity.estimate_affinity`` (EMA weights, M bins, CountSketch of dimension d,
  training images, seed S). The T x T matrix is saved as ``<out>/affinity/seed<S>.npy`` and the
  ANT-UW run uses ``TrainConfig(objective="affinity", affinity=that path)``. The ANT-UW affinity
  run itself starts from scratch (same init as the others) for the full number of steps.
* Statistics: per configuration, mean ± sample std (ddof 1) over seeds at every evaluation step.
  Difference from vanilla: the per-seed paired differences d_s = metric(config, s) -
  metric(vanilla, s); reported as mean(d) with a two-sided 95 % Student-t interval
  mean ± t_{0.975, n-1} · sd(d) / sqrt(n) (t quantile computed here, no scipy). Verdict per
  configuration on the final-step FD: "better" if the whole interval is below 0, "worse" if it is
  above 0, otherwise "no significant difference" (needs >= 2 paired seeds).

Output folder (default ``runs/quality-<preset>``): ``runs/<config>/seed<S>/`` (the trainer's run
folders), ``results/<config>/seed<S>.json`` (one per finished run: every evaluation with the
seed, versions, machine and wall time), ``results.json`` and ``results.md`` (the summary table),
``fd_vs_step.png`` (with matplotlib), ``settings.json``. Resumable: a run whose results JSON
exists is skipped, an interrupted run continues from its newest checkpoint (Ctrl-C / SIGTERM
make the trainer save one), and an output folder made with other settings is refused.

CPU preset estimate, from a measured 100-step, 1-seed, all-configuration pass of the cpu preset
(2-core Xeon VM, 1 torch thread, load average ~3.5 from another job): training steps/s of
dit-tiny 16 px at batch 64 (segment overheads included) vanilla 12-15, Min-SNR / UW 15,
Nash-MTL (solve every 25 steps) 14, FAMO 10.8, PCGrad 5.5; one evaluation (256 samples x 25 DDIM
steps + metrics) ~2.1 s; one affinity estimate (M=50, 4 batches of 64) 10 s. Per seed: 1200 steps
x 8 configurations ~ 6 x 79 s + 218 s + 111 s = 800 s, plus 32 evaluations ~ 70 s and the
affinity 10 s ~ 880 s; 3 seeds ~ 44 minutes sequentially (``--jobs 1``, the default). With
``--jobs 2 --threads 1`` two runs go at a time in worker processes (same numbers, tested): about
25 minutes on a quiet 2-core machine (measured only at smoke scale here).
GPU preset, measured on one H100 with 16 host cores (torch 2.11, CUDA 13): one run (1000 steps
of a 4.2 M-parameter DiT at batch 128 + 3 evaluations of 1000 samples) takes ~50 s (vanilla) to
~90 s (FAMO) when 4 share the GPU, ~70-130 s when 8 do; 15 runs (5 configurations x 3 seeds)
took 271 s with the defaults (``--jobs 8 --threads 2``), so the 24-run grid should take about
8 minutes. The script prints an ETA after every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_presets import CONFIGS, GRID, PRESETS, Preset  # noqa: E402
from quality_report import (CONFIDENCE, LOWER_IS_BETTER, METRICS,  # noqa: E402
                            curve_table, paired_difference, plot_curves, summary_table, verdict,
                            verdict_lines, write_markdown)


# ----------------------------------------------------------------------------- records


def environment_record(device: str) -> dict:
    import torch

    import ant_core

    gpu = None
    if torch.cuda.is_available():
        try:
            gpu = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - best-effort description only
            gpu = "unknown CUDA device"
    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__,
                     "ant_core": getattr(ant_core, "__version__", "unknown")},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": gpu, "device": device, "hostname": platform.node()},
    }


def _write_json(path: Path, obj) -> None:
    """Atomic JSON write (a results file is either complete or absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- runs


class _Progress:
    """One line per finished run with an ETA from the mean wall time per configuration."""

    def __init__(self, pending, jobs: int = 1):
        self.pending, self.finished, self.spent, self.jobs = list(pending), 0, {}, max(1, jobs)
        self.started = time.perf_counter()

    def done(self, name, seed, record):
        self.finished += 1
        wall = record["record"]["wall_seconds"]
        self.spent.setdefault(name, []).append(wall)
        if (name, seed) in self.pending:
            self.pending.remove((name, seed))
        mean_all = float(np.mean([w for ws in self.spent.values() for w in ws]))
        eta = sum(float(np.mean(self.spent[c])) if c in self.spent else mean_all
                  for c, _ in self.pending) / self.jobs
        final = record["final"]
        print(f"  [{self.finished}/{self.finished + len(self.pending)}] {name:<16} seed {seed}: "
              f"FD {final['fd']:.4g} P {final['precision']:.3f} R {final['recall']:.3f}  "
              f"({wall:.1f} s; elapsed {time.perf_counter() - self.started:.0f} s, "
              f"ETA {eta:.0f} s)", flush=True)


class Benchmark:
    def __init__(self, preset: Preset, out: Path, device: str, seeds, configs,
                 engine: str = "autograd"):
        self.preset, self.out, self.device, self.engine = preset, Path(out), device, engine
        self.seeds, self.configs = list(seeds), list(configs)
        self._held_out = None
        self._train_images = None

    # --------------------------------------------------------------- configs
    def train_config(self, name: str, seed: int, out: Path, steps: int, affinity=None):
        from ant_core import TrainConfig
        from ant_core.train_config import GRADIENT_METHODS

        p = self.preset
        overrides = dict(CONFIGS[name][1])
        if overrides["method"] in GRADIENT_METHODS:
            overrides["engine"] = self.engine
        if overrides.get("method") == "pcgrad":  # projection order follows the run seed
            overrides["method_config"] = {**overrides.get("method_config", {}), "seed": seed}
        if overrides.get("objective") == "affinity":
            overrides["affinity"] = str(affinity)
        return TrainConfig(
            data="shapes", num_images=p.num_images, image_size=p.image_size, data_seed=0,
            model=p.model, model_config=dict(p.model_config), schedule="linear", T=p.T,
            prediction=p.prediction, k=p.k, sampler="stratified", steps=steps,
            batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps,
            grad_clip=p.grad_clip, ema_decay=p.ema_decay, seed=seed, device=self.device,
            out=str(out), log_every=max(1, p.steps // 100), keep_last=2, num_samples=16,
            sample_steps=min(10, p.sample_steps), progress=False, **overrides)

    def run_dir(self, name, seed) -> Path:
        return self.out / "runs" / name / f"seed{seed}"

    def result_path(self, name, seed) -> Path:
        return self.out / "results" / name / f"seed{seed}.json"

    # --------------------------------------------------------------- evaluation
    def held_out(self):
        if self._held_out is None:
            from ant_core.data import ProceduralShapes

            self._held_out = ProceduralShapes(num_images=self.preset.num_eval,
                                              image_size=self.preset.image_size, seed=1).images
        return self._held_out

    def evaluate_checkpoint(self, path: Path, seed: int) -> dict:
        """FD / precision / recall of the EMA model in checkpoint ``path``."""
        import torch

        from ant_core.checkpoint import load_model
        from ant_core.metrics import evaluate

        start = time.perf_counter()
        model, diffusion, state = load_model(path, ema=True, device=self.device)
        p = self.preset
        shape = (p.num_eval, model.in_channels, p.image_size, p.image_size)
        with torch.no_grad():
            samples = diffusion.sample_ddim(model, shape, steps=p.sample_steps, eta=0.0,
                                            seed=seed, device=self.device).clamp(-1, 1).cpu()
        metrics = evaluate(samples, self.held_out())
        return {"step": int(state["step"]), "seed": seed,
                **{m: float(metrics[m]) for m in METRICS},
                "num_samples": metrics["num_samples"], "feature_dim": metrics["feature_dim"],
                "eval_seconds": round(time.perf_counter() - start, 3)}

    # --------------------------------------------------------------- training
    def _train_to(self, config, steps: int, run: Path) -> None:
        from ant_core import checkpoint as ckpt
        from ant_core import train

        latest = ckpt.latest_checkpoint(run / "checkpoints")
        result = train(config.replace(steps=steps), resume=True if latest else None)
        if result["stopped_by"]:
            raise KeyboardInterrupt(f"training stopped by {result['stopped_by']} at step "
                                    f"{result['step']} (checkpoint saved; rerun to continue)")

    def run_one(self, name: str, seed: int, env: dict) -> dict:
        """Train + evaluate one (configuration, seed); returns the run record."""
        from ant_core import checkpoint as ckpt

        p = self.preset
        run = self.run_dir(name, seed)
        affinity = self.ensure_affinity(seed, env) if name == "uw_affinity" else None
        config = self.train_config(name, seed, run, p.steps, affinity)
        partial_path = run / "benchmark_evals.json"
        partial = json.loads(partial_path.read_text()) if partial_path.is_file() else \
            {"evaluations": [], "train_seconds": 0.0}
        done = {e["step"] for e in partial["evaluations"]}
        for step in p.eval_steps:
            if step in done:
                continue
            latest = ckpt.latest_checkpoint(run / "checkpoints")
            latest_step = int(latest.stem.split("_")[-1]) if latest else 0
            target = ckpt.checkpoint_path(run / "checkpoints", step)
            if latest_step < step:
                start = time.perf_counter()
                self._train_to(config, step, run)
                partial["train_seconds"] += time.perf_counter() - start
            elif not Path(target).is_file():
                raise RuntimeError(f"{run}: the checkpoint of step {step} is gone but was never "
                                   "evaluated; delete this run folder to redo the run")
            record = self.evaluate_checkpoint(Path(target), seed)
            record["train_seconds_cumulative"] = round(partial["train_seconds"], 3)
            partial["evaluations"].append(record)
            _write_json(partial_path, partial)
            if name == "vanilla" and step == p.affinity_step:
                warm = self.out / "affinity" / f"warmup_seed{seed}.pt"
                if not warm.is_file():
                    warm.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(target, warm)
        evaluations = sorted(partial["evaluations"], key=lambda e: e["step"])
        return {"config": name, "label": CONFIGS[name][0], "seed": seed,
                "train_config": config.to_dict(), "affinity": None if affinity is None else
                str(affinity), "evaluations": evaluations, "final": evaluations[-1],
                "train_seconds": round(partial["train_seconds"], 3),
                "eval_seconds": round(sum(e["eval_seconds"] for e in evaluations), 3)}

    def ensure_affinity(self, seed: int, env: dict) -> Path:
        """The T x T affinity .npy of ``seed`` (estimated once, see the module docstring)."""
        from ant_core import checkpoint as ckpt
        from ant_core.affinity import estimate_affinity
        from ant_core.data import ProceduralShapes

        p = self.preset
        folder = self.out / "affinity"
        path = folder / f"seed{seed}.npy"
        if path.is_file():
            return path
        start = time.perf_counter()
        warm = folder / f"warmup_seed{seed}.pt"
        if not warm.is_file():  # vanilla was not run (yet): the same warm-up on its own
            run = folder / f"warmup_seed{seed}"
            config = self.train_config("vanilla", seed, run, p.affinity_step)
            if not ckpt.latest_checkpoint(run / "checkpoints"):
                self._train_to(config, p.affinity_step, run)
            shutil.copyfile(ckpt.checkpoint_path(run / "checkpoints", p.affinity_step), warm)
        data = ProceduralShapes(num_images=p.num_images, image_size=p.image_size, seed=0)
        result = estimate_affinity(str(warm), data, M=p.affinity_M, d=p.affinity_d,
                                   batches=p.affinity_batches,
                                   batch_size=p.affinity_batch_size, seed=seed,
                                   device=self.device)
        result.metadata.update({"benchmark_seed": seed, "warmup_step": p.affinity_step,
                                "wall_seconds": round(time.perf_counter() - start, 3), **env})
        result.save(path)
        print(f"  affinity seed {seed}: {p.affinity_M} bins from the vanilla checkpoint at step "
              f"{p.affinity_step} -> {path} ({time.perf_counter() - start:.1f} s)", flush=True)
        return path

    # --------------------------------------------------------------- the grid
    def finish_run(self, name: str, seed: int, env: dict):
        """Run one (configuration, seed) and write its results JSON."""
        t0 = time.perf_counter()
        record = self.run_one(name, seed, env)
        wall = time.perf_counter() - t0
        record["record"] = {"seed": seed, **env, "wall_seconds": round(wall, 3),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(self.result_path(name, seed), record)
        return record

    def run_all(self, jobs: int = 1, worker_command=None) -> dict:
        """Every pending run, one after the other (``jobs=1``) or ``jobs`` worker processes at
        a time (``worker_command(name, seed)`` -> argv; vanilla runs first, as the affinity
        configuration reuses their warm-up checkpoints)."""
        env = environment_record(self.device)
        todo = [(c, s) for s in self.seeds for c in self.configs]
        pending = [(c, s) for c, s in todo if not self.result_path(c, s).is_file()]
        print(f"quality benchmark, preset {self.preset.name}: {len(todo)} runs "
              f"({len(todo) - len(pending)} already done), {self.preset.steps} steps each, "
              f"device {self.device}, {jobs} job(s), out {self.out}", flush=True)
        progress = _Progress(pending, jobs)
        if jobs <= 1:
            for name, seed in pending:
                progress.done(name, seed, self.finish_run(name, seed, env))
            return env
        phases = [[r for r in pending if r[0] == "vanilla"],
                  [r for r in pending if r[0] != "vanilla"]]
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        running = {}
        failed = []
        try:
            for phase in phases:
                queue = list(phase)
                while queue or running:
                    while queue and len(running) < jobs and not failed:
                        name, seed = queue.pop(0)
                        log = logs / f"{name}_seed{seed}.log"
                        handle = open(log, "w")
                        proc = subprocess.Popen(worker_command(name, seed), stdout=handle,
                                                stderr=subprocess.STDOUT)
                        running[proc] = (name, seed, log, handle, time.perf_counter())
                    if failed and not running:
                        break
                    time.sleep(0.2)
                    for proc in [p for p in running if p.poll() is not None]:
                        name, seed, log, handle, t0 = running.pop(proc)
                        handle.close()
                        if proc.returncode == 0 and self.result_path(name, seed).is_file():
                            record = json.loads(self.result_path(name, seed).read_text())
                            progress.done(name, seed, record)
                        else:
                            tail = "".join(log.read_text().splitlines(True)[-15:])
                            print(f"  FAILED {name} seed {seed} (exit {proc.returncode}); "
                                  f"log {log}:\n{tail}", flush=True)
                            failed.append((name, seed, log))
                if failed:
                    break
        except KeyboardInterrupt:
            for proc in running:  # the workers got the same Ctrl-C and save a checkpoint
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) failed: " + ", ".join(
                f"{n} seed {s} (log {log})" for n, s, log in failed))
        return env

    # --------------------------------------------------------------- summary
    def load_results(self) -> dict:
        results = {}
        for name in CONFIGS:
            for seed in self.seeds:
                path = self.result_path(name, seed)
                if path.is_file():
                    results.setdefault(name, {})[seed] = json.loads(path.read_text())
        return results

    def reference_floor(self) -> dict:
        """Real training images vs the held-out set: the best score the metric can give."""
        from ant_core.data import ProceduralShapes
        from ant_core.metrics import evaluate

        train = ProceduralShapes(num_images=self.preset.num_eval,
                                 image_size=self.preset.image_size, seed=0).images
        m = evaluate(train, self.held_out())
        return {k: float(m[k]) for k in METRICS}

    def summarise(self, env: dict, wall_seconds: float) -> dict:
        results = self.load_results()
        summary = {"preset": self.preset.to_dict(), "seeds_requested": self.seeds,
                   "record": {**env, "wall_seconds_this_invocation": round(wall_seconds, 3),
                              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                   "reference_floor": self.reference_floor(),
                   "statistics": {"spread": "sample std (ddof 1) over seeds",
                                  "difference": f"paired by seed, mean difference with a "
                                  f"two-sided {CONFIDENCE:.0%} Student-t interval",
                                  "verdict_metric": "fd at the final step"},
                   "configs": {}}
        base = results.get("vanilla", {})
        for name, runs in results.items():
            entry = {"label": CONFIGS[name][0], "seeds": sorted(runs),
                     "wall_seconds": {s: r["record"]["wall_seconds"] for s, r in runs.items()},
                     "train_config": next(iter(runs.values()))["train_config"],
                     "by_step": {}}
            for step in self.preset.eval_steps:
                row = {}
                for metric in METRICS:
                    vals = {s: e[metric] for s, r in runs.items() for e in r["evaluations"]
                            if e["step"] == step}
                    arr = np.array(list(vals.values()), dtype=np.float64)
                    stat = {"values": vals, "n": len(arr),
                            "mean": float(arr.mean()) if len(arr) else None,
                            "std": float(arr.std(ddof=1)) if len(arr) > 1 else None}
                    if name != "vanilla" and base:
                        bvals = {s: e[metric] for s, r in base.items() for e in r["evaluations"]
                                 if e["step"] == step}
                        stat["vs_vanilla"] = paired_difference(vals, bvals)
                        stat["vs_vanilla"]["verdict"] = verdict(stat["vs_vanilla"],
                                                                LOWER_IS_BETTER[metric])
                    row[metric] = stat
                entry["by_step"][str(step)] = row
            final = entry["by_step"][str(self.preset.steps)]
            entry["final"] = final
            if "vs_vanilla" in final["fd"]:
                entry["verdict"] = final["fd"]["vs_vanilla"]["verdict"]
            summary["configs"][name] = entry
        return summary


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample quality of ANT vs vanilla diffusion "
                                "training: a multi-seed grid with FD / precision / recall.")
    p.add_argument("--preset", required=True, help=f"one of {sorted(PRESETS)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 (default 3)")
    p.add_argument("--configs", default="all",
                   help=f"comma-separated names from {list(CONFIGS)}; default 'all': the grid "
                   f"{list(GRID)}")
    p.add_argument("--out", default=None, help="output folder (default runs/quality-<preset>)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the preset's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: the preset's; 0 leaves torch's "
                   "default)")
    p.add_argument("--k", type=int, default=None,
                   help="number of clusters of the ANT configurations (default: the preset's, 5)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, each in its own worker process (default: the "
                   "preset's, 1 on a CPU, 8 for gpu; e.g. 2 with --threads 1 on 2 cores)")
    p.add_argument("--engine", default=None, choices=("autograd", "one-backward",
                                                      "one-backward-lean"),
                   help="per-task gradients of PCGrad / Nash-MTL (default: the preset's, "
                   "one-backward for gpu, autograd otherwise); the same gradients, another speed")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # worker: CONFIG:SEED
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    preset = PRESETS[args.preset]
    if args.k is not None:
        if args.k < 1 or args.k > preset.T:
            parser.error(f"--k: must be in [1, {preset.T}], got {args.k}")
        if args.k != preset.k:
            preset = dataclasses.replace(preset, k=args.k)
    if args.configs == "all":
        configs = list(GRID)
    else:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown or not configs:
            parser.error(f"--configs: unknown configuration(s) {unknown}; choose from "
                         f"{list(CONFIGS)}")
        configs = [c for c in CONFIGS if c in configs]  # canonical order: vanilla first
    if args.seeds < 1:
        parser.error(f"--seeds: must be >= 1, got {args.seeds}")
    device = args.device or preset.default_device
    if device != "cpu" and not device.startswith("cuda"):
        parser.error(f"--device: must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device: {device!r} requested but CUDA is not available "
                         "(use --device cpu)")
    threads = preset.default_threads if args.threads is None else args.threads
    if threads < 0:
        parser.error(f"--threads: must be >= 0, got {threads}")
    if args.run is not None and (args.run.partition(":")[0] not in CONFIGS
                                 or not args.run.partition(":")[2].isdigit()):
        parser.error(f"--run: expected CONFIG:SEED with CONFIG in {list(CONFIGS)}, got "
                     f"{args.run!r}")
    if args.jobs is None:
        args.jobs = preset.default_jobs
    if args.engine is None:
        args.engine = preset.default_engine
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    default_k = PRESETS[args.preset].k
    out = Path(args.out or f"runs/quality-{preset.name}"
               + ("" if preset.k == default_k else f"-k{preset.k}"))
    return preset, configs, list(range(args.seeds)), out, device, threads, args


def _result_preset(settings: dict) -> dict:
    """The preset settings that can change a result (not its description or run defaults); a
    preset field added later takes its default (the behaviour from before it existed), a field
    since removed is dropped."""
    ignored = ("description", "default_device", "default_threads", "default_jobs",
               "default_engine")
    fields = {f.name: f.default for f in dataclasses.fields(Preset)}
    preset = {**fields, **settings.get("preset", {})}
    return {k: v for k, v in preset.items() if k in fields and k not in ignored}


def check_settings(out: Path, preset: Preset) -> None:
    """Refuse to mix results of different preset settings in one output folder. A
    configuration added since the folder was made is recorded in it (it does not change the
    others' results); one whose settings changed is refused like a changed preset."""
    path = out / "settings.json"
    settings = {"preset": preset.to_dict(), "configs": {k: v[1] for k, v in CONFIGS.items()}}
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        saved = json.loads(path.read_text())
        saved_configs = saved.get("configs", {})
        changed = [k for k in saved_configs.keys() & settings["configs"].keys()
                   if saved_configs[k] != settings["configs"][k]]
        if changed or _result_preset(saved) != _result_preset(settings):
            what = f"configuration(s) {sorted(changed)}" if changed else "preset"
            raise SystemExit(f"--out: {out} holds results made with other settings ({what}; "
                             f"preset {saved.get('preset', {}).get('name')!r}); choose another "
                             "--out or delete it")
        configs = {**settings["configs"], **saved_configs}
        if configs != saved_configs:
            _write_json(path, {**saved, "configs": configs})
    else:
        _write_json(path, settings)


def main(argv=None) -> int:
    start = time.perf_counter()
    preset, configs, seeds, out, device, threads, args = parse_args(argv)
    import torch

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, preset)
    if args.run:  # worker process of --jobs N: one run, no summary
        name, _, seed = args.run.partition(":")
        bench = Benchmark(preset, out, device, [int(seed)], [name], args.engine)
        try:
            bench.finish_run(name, int(seed), environment_record(device))
        except KeyboardInterrupt as exc:
            print(f"interrupted: {exc or 'Ctrl-C'}", flush=True)
            return 130
        return 0
    bench = Benchmark(preset, out, device, seeds, configs, args.engine)

    def worker_command(name, seed):
        return [sys.executable, str(Path(__file__).resolve()), "--preset", preset.name,
                "--out", str(out), "--device", device, "--threads", str(threads),
                "--k", str(preset.k), "--engine", args.engine, "--run", f"{name}:{seed}"]
    try:
        env = bench.run_all(args.jobs, worker_command)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted: {exc or 'Ctrl-C'}; rerun the same command to continue",
              flush=True)
        return 130
    summary = bench.summarise(env, time.perf_counter() - start)
    _write_json(out / "results.json", summary)
    write_markdown(summary, out / "results.md")
    plot = plot_curves(summary, out / "fd_vs_step.png")
    print()
    print(summary_table(summary))
    print()
    print(curve_table(summary))
    print()
    floor = summary["reference_floor"]
    print(f"reference floor (real training images vs held-out): FD {floor['fd']:.4g}, "
          f"precision {floor['precision']:.3f}, recall {floor['recall']:.3f}")
    for line in verdict_lines(summary):
        print(line)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}"
          + (f", {plot}" if plot else " (no matplotlib: no plot)")
          + f" in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
