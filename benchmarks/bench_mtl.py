"""Step time of each MTL method relative to equal weighting (EW), per gradient engine (CPU or GPU).

The project's two small models (``unet-tiny`` and ``dit-tiny`` at 16 px), K = 5 timestep
clusters, a stratified batch. A step is forward + grouped loss +
``method.backward`` + SGD step; the ratio is the median step time over the median EW step time
measured in the same run. Also times the Gramian solves (Nash-MTL, MGDA, CAGrad) for K = 5
and 32, with gradient norms alike and 10^±2 apart.

    python benchmarks/bench_mtl.py --quick      # < 3 minutes on 2 cores
    python benchmarks/bench_mtl.py --steps 30
    python benchmarks/bench_mtl.py --device cuda --steps 30 --threads 4

Reference points (ANT paper, LDM FFHQ on GPU): PCGrad 1.38x, Nash-MTL (every 25 steps) 1.05x,
UW 1.00x vanilla.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ant_core import mtl
from ant_core.models import create_model
from ant_core.mtl.gradient_solvers import cagrad_coefficients, mgda_weights, nash_mtl_weights

K = 5
CUDA = False


def grouped_losses(pred, target, group):
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    sums = per_sample.new_zeros(K).index_add(0, group, per_sample)
    return sums / torch.bincount(group, minlength=K).clamp_min(1)


def make_step(model, method, engine, batch):
    """A closure running one training step of ``method`` (None: vanilla mean loss)."""
    torch.manual_seed(0)
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, 16, 16, device=device)
    target = torch.randn_like(x)
    group = (torch.arange(batch, device=device) % K).sort().values
    width = 1000 // K  # K equal timestep intervals of [0, 1000)
    t = group * width + torch.randint(0, width, (batch,), device=device)
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        optimiser.zero_grad(set_to_none=True)
        if method is None:
            F.mse_loss(model(x, t), target).backward()
        else:
            with engine.record() if engine is not None else torch.enable_grad():
                pred = model(x, t)
            method.backward(grouped_losses(pred, target, group), model.parameters(), group=group)
        optimiser.step()
        if method is not None and method.method_name == "famo" and method.reevaluate:
            with torch.no_grad():
                method.update(grouped_losses(model(x, t), target, group))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def ratio_to(base_step, step, steps, period=1):
    """Median step time over the median base time, the two interleaved (robust to load).

    A method whose cost repeats every ``period`` steps (Nash-MTL solving every 25 steps) is
    timed over whole periods and compared by means instead: a median would never see the one
    expensive step of a period.

    With one intra-op thread on a CPU the CPU time of this process is measured
    (``process_time``), which other processes on a shared machine disturb much less than
    wall-clock time; on a GPU (steps end with a synchronize) and with more threads, wall time.
    """
    clock = time.process_time if torch.get_num_threads() == 1 and not CUDA else \
        time.perf_counter
    for _ in range(2):
        base_step(), step()
    base_times, times = [], []
    for _ in range(-(-steps // period) * period):
        for fn, out in ((base_step, base_times), (step, times)):
            start = clock()
            fn()
            out.append(clock() - start)
    average = statistics.median if period == 1 else statistics.fmean
    return average(times) / average(base_times), statistics.median(base_times)


def run(steps, batch, quick, device):
    weighting = ["uw", "famo"] if quick else ["uw", "dwa", "rlw", "famo", "gradnorm"]
    gradient = ["pcgrad", "nashmtl", "mgda"] if quick else \
        ["pcgrad", "nashmtl", "mgda", "cagrad", "imtlg", "alignedmtl"]
    for name in ("unet-tiny", "dit-tiny"):
        model = create_model(name, image_size=16).to(device)
        params = sum(p.numel() for p in model.parameters())
        ew = make_step(model, mtl.create("ew", num_tasks=K), None, batch)
        vanilla, base = ratio_to(ew, make_step(model, None, None, batch), steps)
        print(f"\n{name} on {device}: {params / 1e6:.2f}M params, batch {batch}, K={K}; "
              f"EW step {base * 1e3:.1f} ms (vanilla {vanilla:.2f}x EW)")
        print(f"{'method':<22}{'engine':<17}{'x EW':>8}")
        rows = [(m, "-", {}) for m in weighting] + [("famo (no re-eval.)", "-",
                                                      {"reevaluate": False})]
        engines = ("autograd", "one-backward") if quick else \
            ("autograd", "one-backward", "one-bwd/low-mem")
        rows += [(m, e, {}) for m in gradient for e in engines]
        rows += [("nashmtl/25", e, {"update_weights_every": 25}) for e in engines]
        for method_name, engine_name, hparams in rows:
            engine = None
            if engine_name.startswith("one-b"):
                engine = mtl.OneBackwardEngine(model, low_memory=engine_name.endswith("low-mem"))
            kwargs = dict(hparams)
            if engine_name != "-":
                kwargs["engine"] = engine or "autograd"
            method = mtl.create(method_name.split("/")[0].split(" ")[0], num_tasks=K, **kwargs)
            step = make_step(model, method, engine, batch)
            ratio, _ = ratio_to(ew, step, steps, hparams.get("update_weights_every", 1))
            if engine is not None:
                engine.remove()
            print(f"{method_name:<22}{engine_name:<17}{ratio:>8.2f}")
    rng = np.random.default_rng(0)
    solvers = {"Nash-MTL Newton": nash_mtl_weights, "MGDA min-norm": mgda_weights,
               "CAGrad inner": cagrad_coefficients}
    for k in (5, 32):
        for spread in (0, 2):  # gradient norms alike / 10^±2 apart
            grads = rng.normal(size=(k, 4 * k)) * 10.0 ** rng.uniform(-spread, spread, (k, 1))
            gram = grads @ grads.T
            for name, solve in solvers.items():
                start = time.perf_counter()
                repeats = 50
                for _ in range(repeats):
                    solve(gram)
                elapsed = (time.perf_counter() - start) / repeats
                print(f"{name} solve, K={k}, norms 10^±{spread}: {elapsed * 1e3:.2f} ms")


def main():
    global K, CUDA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer methods and steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method")
    parser.add_argument("--batch", type=int, default=40, help="batch size")
    parser.add_argument("--k", type=int, default=K, help="number of clusters (tasks)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps ratios stable on a shared machine)")
    args = parser.parse_args()
    if not 1 <= args.k <= args.batch:
        parser.error(f"--k must be in [1, --batch], got {args.k}")
    K = args.k
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    CUDA = device.type == "cuda"
    torch.set_num_threads(args.threads)
    run(args.steps or (6 if args.quick else 20), args.batch, args.quick, device)


if __name__ == "__main__":
    main()
