"""Does ANT improve sample quality? A small-scale, multi-seed reproduction of the paper's claim.

    python benchmarks/quality.py --preset cpu|gpu|smoke|<probe> [--seeds N] [--configs a,b,...]
                                 [--k K] [--out DIR] [--device cpu|cuda] [--threads N] [--jobs N]

(<probe>: a variant of the cpu preset that changes one thing, listed in ``quality_presets.py``:
cpu-long, cpu-8k, cpu-wide, cpu-v, cpu-x0.)

Grid: the configurations in ``quality_presets.GRID`` (vanilla, Min-SNR-5, ANT-UW with the
timestep / log-SNR / affinity objectives, ANT-Nash-MTL and ANT-PCGrad on log-SNR clusters,
ANT-FAMO; K = 5) x seeds 0..N-1 (default 3); three more run when ``--configs`` names them:
``ew_log_snr`` (the log-SNR clusters with equal weights: vanilla's loss with t stratified over
the clusters), ``uw_log_snr_slow`` (ANT-UW with its log-variances at lr 0.0025, 10x slower) and
``edm2`` (EDM2's continuous uncertainty weighting, uniform t: a baseline, not ANT).
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
took 271 s with the defaults (``--jobs 8 --threads 2``) and the other 9 (Nash-MTL, PCGrad,
FAMO) 161 s with ``--jobs 9``: the 24-run grid took about 7 minutes in those two calls. The
script prints an ETA after every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_presets import CONFIGS, GRID, PRESETS, Preset  # noqa: E402
from quality_report import (curve_table, plot_curves, summary_table,  # noqa: E402
                            verdict_lines, write_markdown)
from quality_runs import Benchmark, environment_record, write_json  # noqa: E402


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
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    if args.engine is None:
        args.engine = preset.default_engine
    default_k = PRESETS[args.preset].k
    out = Path(args.out or f"runs/quality-{preset.name}"
               + ("" if preset.k == default_k else f"-k{preset.k}"))
    return preset, configs, list(range(args.seeds)), out, device, threads, args


def _result_preset(settings: dict) -> dict:
    """The preset settings that can change a result (not its description or run defaults); a
    preset field added later takes its default (the behaviour from before it existed), a field
    since removed is dropped."""
    fields = {f.name: f.default for f in dataclasses.fields(Preset)}
    preset = {**fields, **settings.get("preset", {})}
    return {k: v for k, v in preset.items()
            if k in fields and k != "description" and not k.startswith("default_")}


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
            write_json(path, {**saved, "configs": configs})
    else:
        write_json(path, settings)


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
    write_json(out / "results.json", summary)
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
