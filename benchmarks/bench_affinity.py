"""Benchmark: gradient task affinity on M timesteps, sketched (ours) vs the reference approach.

For each model, in the same run and with the same loss (eps-MSE, fixed images and noise,
linear schedule, T = 1000, one batch, M timesteps at the bins' middles):
  sketch     ant_core.estimate_affinity(..., d=4096, timesteps_per_pass=1): one backward per
             timestep, each gradient CountSketched as produced, cosines from the M x d Gram
             matrix (memory O(M d))
  sketch-batched  the same with as many timesteps per forward/backward as "auto" packs on a
             GPU (also on a CPU, where "auto" itself picks 1); the per-timestep gradients
             are split by the one-backward engine
  exact      ant_core.estimate_affinity(..., exact=True): M full gradients, one Gram matrix
  reference  the published script's approach: keep all M full gradients (a list of flattened
             parameter gradients, O(M P) memory), then a Python loop of pairwise cosines
Each method runs in its own subprocess after one untimed warm-up forward/backward (the same
for every method); the table shows its wall time and its peak resident
memory above the process's memory after building the model (``ru_maxrss``; on a GPU
``torch.cuda.max_memory_allocated``), the ratios
reference / sketch, and the largest |cosine difference| of sketch and exact against reference.

    python benchmarks/bench_affinity.py --quick        (dit-tiny only, < 2 minutes)
    python benchmarks/bench_affinity.py                (dit-tiny and dit-s: ~20 minutes and 13 GB,
                                                        almost all of it the reference on dit-s)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CASES = {  # model preset -> (image_size, batch_size)
    "dit-tiny": (32, 8),
    "dit-s": (16, 2),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(method: str, preset: str, M: int, d: int, threads: int, out: str,
           device: str) -> None:
    import torch

    from ant_core.affinity import (_timesteps_per_pass, diffusion_loss, estimate_affinity,
                                   timestep_grid)
    from ant_core.diffusion import GaussianDiffusion
    from ant_core.models import count_parameters, create_model

    torch.set_num_threads(threads)
    image_size, batch = CASES[preset]
    torch.manual_seed(0)
    model = create_model(preset, image_size=image_size)
    with torch.no_grad():  # adaLN-zero: make every layer receive gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.to(device)
    diffusion = GaussianDiffusion("linear", 1000)
    x0 = torch.randn(batch, 3, image_size, image_size,
                     generator=torch.Generator().manual_seed(1)).clamp(-1, 1).to(device)
    # estimate_affinity's noise for seed=0: one CPU randn per batch from a generator seeded 0
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.startswith("cuda")

    def peak_mb():
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _rss_mb()
    mse = diffusion_loss(diffusion)

    def loss_fn(m, x, t):
        return mse(m, x, t, None, noise)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = peak_mb()
    # warm-up, not timed: one forward/backward loads the kernels and fills the allocator's caches
    loss_fn(model, x0, torch.full((batch,), 500, device=device)).backward()
    model.zero_grad(set_to_none=True)
    if cuda:  # the peak of the warm-up is not the method's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method != "reference":
        per_pass = 1
        if method == "sketch-batched":  # what "auto" packs on a GPU
            per_pass = _timesteps_per_pass("auto", None, M, batch, count_parameters(model),
                                           torch.device("cuda"))
        grid = estimate_affinity(model, [x0], diffusion=diffusion, M=M, d=d, seed=0,
                                 exact=method == "exact", timesteps_per_pass=per_pass)
        per_pass = grid.metadata["timesteps_per_pass"]
        grid = grid.grid
    else:  # the reference approach
        lo, hi = timestep_grid(1000, M)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = []
        for t in (lo + hi - 1) // 2:
            model.zero_grad()
            loss_fn(model, x0, torch.full((batch,), int(t), device=device)).backward()
            grads.append(torch.cat([p.grad.reshape(-1).clone() for p in params]))
        grid = np.ones((M, M))
        for i in range(M):
            for j in range(i + 1, M):
                grid[i, j] = grid[j, i] = float(
                    torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(out, grid)
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb() - base,
                      "parameters": count_parameters(model),
                      "per_pass": per_pass if method != "reference" else 1}))


def run_method(method, preset, M, d, threads, tmp, device):
    out = os.path.join(tmp, f"{preset}_{method}.npy")
    cmd = [sys.executable, __file__, "--worker", method, "--models", preset, "--M", str(M),
           "--d", str(d), "--threads", str(threads), "--grid-out", out, "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {preset} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["grid"] = np.load(out)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="dit-tiny only (< 2 minutes)")
    p.add_argument("--models", default=None, help="comma-separated presets (default: all)")
    p.add_argument("--M", type=int, default=100)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; on a GPU the "
                   "peak memory is torch.cuda.max_memory_allocated")
    p.add_argument("--max-full-gb", type=float, default=14.0,
                   help="skip the full-gradient methods when M x P x 4 bytes exceeds this")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--grid-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.models, args.M, args.d, args.threads, args.grid_out,
                      args.device)
    presets = ["dit-tiny"] if args.quick else (args.models.split(",") if args.models
                                               else list(CASES))
    print(f"# bench_affinity: M={args.M}, d={args.d}, T=1000, device={args.device}, "
          f"threads={args.threads}, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    header = ("| model | params | method | timesteps per pass | time (s) | peak memory (MB) "
              "| max |cos - ref| |")
    print(header)
    print("|" + "---|" * 7)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            results = {m: run_method(m, preset, args.M, args.d, args.threads, tmp, args.device)
                       for m in ("sketch", "sketch-batched")}
            P = results["sketch"]["parameters"]
            full_gb = args.M * P * 4 / 2**30
            methods = ["exact", "reference"] if full_gb <= args.max_full_gb else []
            if preset == "dit-s" and methods:
                methods = ["reference"]  # our exact mode needs the same M x P memory
            for m in methods:
                results[m] = run_method(m, preset, args.M, args.d, args.threads, tmp, args.device)
            ref = results.get("reference")
            for m, r in results.items():
                err = "–" if ref is None else f"{np.abs(r['grid'] - ref['grid']).max():.4f}"
                print(f"| {preset} | {P / 1e6:.2f} M | {m} | {r['per_pass']} | "
                      f"{r['seconds']:.2f} | {r['peak_mb']:.0f} | {err} |")
            print(f"#   {preset}: sketch / sketch-batched time "
                  f"{results['sketch']['seconds'] / results['sketch-batched']['seconds']:.2f}x")
            if ref is not None:
                s = results["sketch"]
                print(f"#   {preset}: reference / sketch: time "
                      f"{ref['seconds'] / s['seconds']:.2f}x, peak memory "
                      f"{ref['peak_mb'] / max(s['peak_mb'], 1.0):.1f}x "
                      f"(M x P x 4 B = {full_gb * 1024:.0f} MB of gradients vs M x d x 4 B = "
                      f"{args.M * args.d * 4 / 2**20:.1f} MB of sketches)")
            else:
                print(f"#   {preset}: full-gradient methods skipped (M x P x 4 B = "
                      f"{full_gb:.1f} GB > --max-full-gb {args.max_full_gb})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
