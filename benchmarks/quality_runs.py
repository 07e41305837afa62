"""The runs of ``benchmarks/quality.py``: training through the public API, evaluation of the
checkpoints, the affinity warm-up and the summary statistics (the protocol is in quality.py's
docstring)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from quality_presets import CONFIGS, Preset
from quality_report import CONFIDENCE, LOWER_IS_BETTER, METRICS, paired_difference, verdict


def code_fingerprint() -> dict:
    """What produced a result: a hash of the ant_core Python and C++/CUDA sources (the version
    number does not change between commits) and the git commit when there is a checkout."""
    import ant_core

    root = Path(ant_core.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    sources = [*(root / "ant_core").rglob("*.py"), *(root / "csrc").rglob("*")]
    for path in sorted(p for p in sources if p.suffix in {".py", ".cpp", ".hpp", ".h", ".cu"}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"sources_sha256": digest.hexdigest()[:16], "git_commit": commit or None}


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
        "code": code_fingerprint(),
    }


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (a results file is either complete or absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


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
                 engine: str | None = None):
        self.preset, self.out, self.device = preset, Path(out), device
        self.engine = preset.default_engine if engine is None else engine
        self.seeds, self.configs = list(seeds), list(configs)
        self._held_out = None

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
            latest_step = ckpt.checkpoint_step(latest) if latest else 0
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
            write_json(partial_path, partial)
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
        write_json(self.result_path(name, seed), record)
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
