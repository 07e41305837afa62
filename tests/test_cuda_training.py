"""Training on a GPU: the MTL engines and methods, the trainer, AMP and resume on CUDA.

Everything here also runs on the CPU in the rest of the suite; these tests check that the CUDA
paths (device placement of the per-task gradient buffers, the methods' small tensors, the
trainer's generators, GradScaler) agree with it. Skipped without a CUDA device.
"""
import numpy as np
import pytest
import torch

from ant_core import checkpoint as ckpt
from ant_core import mtl
from ant_core.mtl.engines import OneBackwardEngine
from ant_core.trainer import train
from ant_core.visualize import read_metrics
from test_mtl_engines import ConvNet, TransformerBlock, _compare, _group_losses
from test_trainer import _flat_state, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GRADIENT_METHODS = ["pcgrad", "nashmtl", "mgda", "cagrad", "imtlg", "alignedmtl"]


def test_one_backward_engine_matches_autograd_on_cuda():
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    group = torch.tensor([0, 2, 1, 1, 0, 2, 3, 3], device=cuda)
    _compare(ConvNet().to(cuda), lambda: (torch.randn(8, 3, 6, 6, dtype=torch.float64, device=cuda),
                                          torch.randint(0, 10, (8,), device=cuda)), group, 4)
    group = torch.tensor([0, 0, 0, 2, 2, 3], device=cuda)  # task 1 empty
    model = TransformerBlock().to(cuda)
    _compare(model, lambda: (torch.randn(6, 5, 4, dtype=torch.float64, device=cuda),), group, 4,
             fallback=[model.pos])


def _method_gradient(name, device, engine):
    torch.manual_seed(4)
    model = TransformerBlock().double().to(device)
    x = torch.randn(6, 5, 4, dtype=torch.float64).to(device)
    target = torch.randn(6, 5, 4, dtype=torch.float64).to(device)
    group = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    if engine != "autograd":
        engine = OneBackwardEngine(model, low_memory=engine == "low-memory")
    method = mtl.create(name, num_tasks=3, engine=engine).to(device)
    recorder = engine.record() if not isinstance(engine, str) else torch.enable_grad()
    with recorder:
        per_sample = (model(x) - target).pow(2).flatten(1).mean(1)
    weights = method.backward(_group_losses(per_sample, group, 3), model.parameters(), group=group)
    if not isinstance(engine, str):
        engine.remove()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grad.cpu(), None if weights is None else torch.as_tensor(weights).cpu()


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("engine", ["autograd", "one-backward", "low-memory"])
def test_gradient_methods_on_cuda_equal_the_cpu(name, engine):
    """Every engine on CUDA gives the CPU's K-backward result (float64)."""
    expected, _ = _method_gradient(name, "cpu", "autograd")
    got, _ = _method_gradient(name, "cuda", engine)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["uw", "famo", "dwa", "gradnorm", "rlw", "ew"])
def test_weighting_methods_on_cuda_equal_the_cpu(name):
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 2)).double().to(device)
        x = torch.randn(9, 4, dtype=torch.float64).to(device)
        group = torch.arange(9, device=device) % 3
        method = mtl.create(name, num_tasks=3).to(device)
        grads = []
        for step in range(3):  # several steps: DWA / FAMO / GradNorm carry state
            model.zero_grad()
            per_sample = model(x).pow(2).mean(1) * (1 + step)
            method.backward(_group_losses(per_sample, group, 3), model.parameters())
            if hasattr(method, "update") and name == "famo":
                method.update(_group_losses(model(x).pow(2).mean(1), group, 3).detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).cpu())
        results.append(torch.stack(grads))
    torch.testing.assert_close(results[1], results[0], rtol=1e-7, atol=1e-10)


def test_negative_task_counts_on_cuda_poison_instead_of_syncing():
    x = torch.nn.Parameter(torch.ones((), device="cuda"))
    mtl.create("uw", num_tasks=2).to("cuda").backward(
        torch.ones(2, device="cuda") * x, [x], task_counts=torch.tensor([3, -1], device="cuda"))
    assert torch.isnan(x.grad).all()


@pytest.mark.parametrize("overrides", [
    dict(method="uw"),
    dict(method="pcgrad", engine="one-backward", amp="bf16"),
    dict(method="nashmtl", engine="one-backward", method_config={"update_weights_every": 2}),
    dict(method="famo", method_config={"reevaluate": False}, amp="fp16"),
    dict(method="vanilla", weighting="min_snr", model="unet",
         model_config={"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                       "attention_resolutions": [4], "num_groups": 8}),
    dict(method="ew", weighting="edm2", amp="bf16"),
], ids=["uw", "pcgrad-onebackward-bf16", "nash-onebackward", "famo-lagged-fp16", "unet-minsnr",
        "ew-edm2-bf16"])
def test_trainer_on_cuda_trains_and_resumes(tmp_path, overrides):
    """The trainer runs on the GPU and resume continues the same run. Not bit for bit as on the
    CPU (tests/test_trainer.py): CUDA's atomics (nearest-upsampling backward, index_add) reorder
    sums, and Adam turns those last-bit differences on the zero-initialised output convs into
    steps of +-lr; so the losses must agree closely and the weights as a whole."""
    whole = train(tiny(tmp_path, "whole", steps=6, device="cuda", **overrides))
    train(tiny(tmp_path, "split", steps=3, device="cuda", **overrides))
    resumed = train(tiny(tmp_path, "split", steps=6, device="cuda", **overrides), resume=True)
    a = ckpt.load_checkpoint(whole["checkpoint"])
    b = ckpt.load_checkpoint(resumed["checkpoint"])
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        fa, fb = _flat_state(a[key]), _flat_state(b[key])
        assert fa.keys() == fb.keys()
        va = torch.cat([fa[n].double().flatten() for n in sorted(fa)
                        if isinstance(fa[n], torch.Tensor)])
        vb = torch.cat([fb[n].double().flatten() for n in sorted(fb)
                        if isinstance(fb[n], torch.Tensor)])
        assert ((va - vb).norm() / va.norm()).item() < 1e-3, key
    losses_a = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    losses_b = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert np.all(np.isfinite(losses_a)) and len(losses_a) == 6
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-3)
