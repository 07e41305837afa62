"""From a plain diffusion training loop to ANT in five lines (runs on CPU in seconds).

The vanilla loop draws ``t ~ U[0, T)`` and minimises ``mse(model(x_t, t), eps)``. ANT:

1. cluster the timesteps into K intervals (``ant_core.interval_clustering``),
2. sample a stratified batch of timesteps with their cluster (``StratifiedSampler``),
3. compute the K per-cluster losses (``ant_core.grouped_mse``),
4. let an MTL method combine them (``method.backward``), then step the optimiser.

    python examples/ant_in_your_loop.py --method uw --steps 300
    python examples/ant_in_your_loop.py --method nashmtl --engine one-backward
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import ant_core
from ant_core import mtl
from ant_core.sampling import StratifiedSampler

T = 1000


class TinyDenoiser(nn.Module):
    """An ε-prediction MLP for 2-D points, conditioned on the timestep by an embedding."""

    def __init__(self, width=64):
        super().__init__()
        self.time = nn.Embedding(T, width)
        self.inp = nn.Linear(2, width)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.LayerNorm(width),
                                  nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        return self.body(self.inp(x) + self.time(t))


def data(batch, generator):
    """Two-moons-like toy data: points on two noisy arcs."""
    angle = torch.rand(batch, generator=generator) * torch.pi
    arc = torch.randint(0, 2, (batch,), generator=generator)
    x = torch.stack([torch.cos(angle) - arc, torch.sin(angle) * (1 - 2 * arc) - 0.25 * arc], 1)
    return x + 0.05 * torch.randn(batch, 2, generator=generator)


def train(method_name="uw", engine_name="autograd", steps=300, batch=100, k=5, seed=0):
    """Train the toy denoiser with ANT; returns (first, last) mean training loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    alphas_cumprod = torch.as_tensor(ant_core.get_schedule("linear", T=T).alphas_cumprod,
                                     dtype=torch.float32)
    model = TinyDenoiser()

    # --- ANT: clusters -> sampler -> grouped loss -> MTL method ------------------------------
    clusters = ant_core.interval_clustering(k=k, objective="log_snr", schedule="linear", T=T)
    sampler = StratifiedSampler(clusters, seed=seed)
    grouped_mse = ant_core.grouped_mse
    engine = mtl.OneBackwardEngine(model) if engine_name == "one-backward" else "autograd"
    hparams = {"engine": engine} if method_name in ("pcgrad", "nashmtl", "mgda", "cagrad",
                                                    "imtlg", "alignedmtl") else {}
    if method_name == "nashmtl":
        hparams["update_weights_every"] = 25
    method = mtl.create(method_name, num_tasks=clusters.k, **hparams)
    optimiser = torch.optim.AdamW([{"params": model.parameters(), "lr": 1e-3,
                                    "weight_decay": 0.0}, *method.param_groups(lr=0.025)])
    # -----------------------------------------------------------------------------------------

    history = []
    for _ in range(steps):
        x0 = data(batch, generator)
        t, group = sampler.sample(batch)  # was: t = torch.randint(0, T, (batch,))
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t][:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise

        optimiser.zero_grad(set_to_none=True)
        recording = engine.record() if engine_name == "one-backward" else torch.enable_grad()
        with recording:
            pred = model(x_t, t)
        losses = grouped_mse(pred, noise, group, clusters.k)  # was: F.mse_loss(pred, noise)
        method.backward(losses, model.parameters(), group=group)  # was: loss.backward()
        optimiser.step()
        if method_name == "famo":  # FAMO compares the losses before/after the step
            with torch.no_grad():
                method.update(grouped_mse(model(x_t, t), noise, group, clusters.k))
        history.append(float(F.mse_loss(pred.detach(), noise)))
    head, tail = history[:20], history[-20:]
    return sum(head) / len(head), sum(tail) / len(tail)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="uw", choices=mtl.available())
    parser.add_argument("--engine", default="autograd", choices=["autograd", "one-backward"])
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--batch", type=positive_int, default=100)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (1 is fastest for this tiny model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    head, tail = train(args.method, args.engine, args.steps, args.batch)
    print(f"{args.method} ({args.engine}): mean eps-MSE {head:.3f} -> {tail:.3f} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
