"""DDP: two gloo processes on CPU end with the parameters one process gets on the union batch."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ant_core import mtl
from ant_core.affinity import estimate_affinity
from ant_core.diffusion import GaussianDiffusion
from ant_core.models import create_model
from ant_core.clustering import IntervalClusters
from ant_core.sampling import StratifiedSampler

K = 3
METHODS = ["uw", "famo", "gradnorm", "pcgrad", "nashmtl", "mgda", "pcgrad/one-backward",
           "nashmtl/low-memory", "nashmtl/chunked"]
# An absent task (loss 0, no gradient) must stay out of the methods' statistics the same way on
# two ranks as in one process: task 1 is missing on rank 0 at step 1, task 2 everywhere at step 2.
ABSENT_METHODS = ["uw", "dwa", "famo", "gradnorm", "mgda", "cagrad"]
STEPS = 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 2)).double()


def _batches(step):
    """Per-rank batches of different sizes and task counts (rank 0: 5 samples, rank 1: 8)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for size in (5, 8):
        x = torch.randn(size, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(size, 2, generator=gen, dtype=torch.float64)
        group = torch.randint(0, K, (size,), generator=gen)
        group[:K] = torch.arange(K)  # every rank sees every task at least once
        out.append((x, y, group))
    return out


def _batches_with_absent_tasks(step):
    parts = _batches(step)
    if step == 1:
        parts[0][2][:] = torch.tensor([0, 2, 0, 2, 2])
    if step == 2:
        for _, _, group in parts:
            group[group == 2] = 0
    return parts


def _group_losses(model, x, y, group):
    per_sample = (model(x) - y).pow(2).mean(1)
    return torch.stack([per_sample[group == k].mean() if (group == k).any()
                        else per_sample.sum() * 0 for k in range(K)])  # grouped_mse's 0


def _train(name, batches_for_step, process_group=None):
    model = _model()
    engine = None
    if name.endswith("/one-backward") or name.endswith("/low-memory"):
        engine = mtl.OneBackwardEngine(model, low_memory=name.endswith("/low-memory"))
        method = mtl.create(name.split("/")[0], num_tasks=K, engine=engine,
                            process_group=process_group).double()
    elif name.endswith("/chunked"):
        method = mtl.create(name.split("/")[0], num_tasks=K,
                            engine=mtl.AutogradEngine(chunk_numel=16)).double()
    else:
        method = mtl.create(name, num_tasks=K).double()
    optimiser = torch.optim.SGD([*model.parameters(), *method.parameters()], lr=0.1)
    for step in range(STEPS):
        x, y, group = batches_for_step(step)
        optimiser.zero_grad()
        with engine.record() if engine is not None else torch.enable_grad():
            losses = _group_losses(model, x, y, group)
        method.backward(losses, model.parameters(), group=group)
        optimiser.step()
        if name == "famo":
            with torch.no_grad():
                method.update(_group_losses(model, x, y, group),
                              task_counts=torch.bincount(group, minlength=K))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)  # two processes on a small machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: _train(name, lambda step: _batches(step)[rank]) for name in METHODS}
        # each rank in a group of its own, only rank 0 training: the one-backward engine's
        # verification verdict stays in the method's group (it all-reduced over the world: a hang)
        own = [dist.new_group([0]), dist.new_group([1])][rank]
        if rank == 0:
            results["own_group"] = _train("pcgrad/one-backward", lambda step: _batches(step)[0],
                                          process_group=own)
            # an engine used on its own (the affinity estimate) keeps its verdict local
            torch.manual_seed(0)
            model = create_model("dit", image_size=8, patch_size=4, hidden_size=16, depth=1,
                                 num_heads=2)
            results["affinity"] = torch.as_tensor(estimate_affinity(
                model, torch.rand(8, 3, 8, 8) * 2 - 1, diffusion=GaussianDiffusion("linear", 20),
                M=4, d=64, batch_size=4, timesteps_per_pass=2).matrix)
        absent = lambda step: _batches_with_absent_tasks(step)[rank]  # noqa: E731
        results.update({f"absent/{name}": _train(name, absent) for name in ABSENT_METHODS})
        sampler = StratifiedSampler(IntervalClusters.from_bounds([(0, 4), (4, 10)]), seed=3)
        results["sampler_rank"] = torch.tensor([sampler.rank, sampler.world_size])
        results["sampled_t"] = sampler.sample(32)[0]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _union(step, batches=_batches):
    parts = batches(step)
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_match_one_process_on_union(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # samplers read rank/world size from torch.distributed and draw different streams
    assert [r["sampler_rank"].tolist() for r in ranks] == [[0, 2], [1, 2]]
    assert not torch.equal(ranks[0]["sampled_t"], ranks[1]["sampled_t"])
    for name in METHODS:
        single = _train(name, _union)
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], single, rtol=1e-7, atol=1e-10)
        assert not torch.equal(single, _train("ew", _union)) or name == "ew"
    assert torch.isfinite(ranks[0]["affinity"]).all() and "affinity" not in ranks[1]
    torch.testing.assert_close(ranks[0]["own_group"],
                               _train("pcgrad/one-backward", lambda step: _batches(step)[0]),
                               rtol=0, atol=0)
    absent_union = lambda step: _union(step, _batches_with_absent_tasks)
    for name in ABSENT_METHODS:
        single = _train(name, absent_union)
        assert torch.isfinite(single).all()
        torch.testing.assert_close(ranks[0][f"absent/{name}"], ranks[1][f"absent/{name}"],
                                   rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][f"absent/{name}"], single, rtol=1e-7, atol=1e-10)
