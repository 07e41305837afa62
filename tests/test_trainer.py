"""The training loop (ant_core.trainer): optimisation, exact resume, DDP, failure handling."""
import datetime
import json
import math
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from ant_core import checkpoint as ckpt
from ant_core import interval_clustering
from ant_core.data import ProceduralShapes
from ant_core.losses import reference_grouped_mse
from ant_core.trainer import EMA, TrainConfig, Trainer, TrainingError, train
from ant_core.visualize import (has_matplotlib, image_grid, plot_training_curves,
                                read_metrics, save_image_grid, write_png)
from ant_core.weighting import min_snr_weight

TINY_DIT = {"patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, name="run", **overrides):
    values = dict(data="shapes", num_images=24, image_size=8, model="dit", model_config=TINY_DIT,
                  T=50, k=3, steps=4, batch_size=6, lr=1e-3, out=str(tmp_path / name),
                  num_samples=4, sample_steps=2, log_every=1, progress=False, ema_decay=0.9)
    values.update(overrides)
    return TrainConfig(**values)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- optimisation


def test_overfits_a_fixed_batch(tmp_path):
    image = ProceduralShapes(1, 8, seed=3).images.numpy()
    np.save(tmp_path / "one.npy", np.repeat(image, 4, axis=0))  # the batch is always the same
    cfg = tiny(tmp_path, data=str(tmp_path / "one.npy"), batch_size=4, prediction="x0",
               steps=120, lr=3e-3)
    result = train(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 121))
    first = np.mean([r["loss"] for r in records[:5]])
    last = np.mean([r["loss"] for r in records[-5:]])
    assert first / last >= 10, (first, last)
    assert result["step"] == 120 and os.path.exists(result["checkpoint"])


def _one_batch(trainer):
    """(x_t, t, target, group) of the trainer's next batch, as train_step builds them."""
    x0, _ = next(trainer.loader)
    t, group = trainer.sampler.sample(x0.shape[0])
    noise = torch.randn(x0.shape)
    return (trainer.diffusion.q_sample(x0, t, noise), t, trainer.diffusion.target(x0, noise, t),
            group)


def test_losses_match_an_independent_reference(tmp_path):
    """compute_losses == per-sample mean squared error x Min-SNR weight, averaged per cluster."""
    trainer = Trainer(tiny(tmp_path, weighting="min_snr", prediction="v", k=4))
    x_t, t, target, group = _one_batch(trainer)
    weight = trainer.per_sample_weight(t)
    got = trainer.compute_losses(x_t, t, None, target, group, weight)
    with torch.no_grad():
        pred = trainer.model(x_t, t)
    snr = trainer.diffusion.alphas_cumprod[t] / (1 - trainer.diffusion.alphas_cumprod[t])
    w = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    per_sample = ((pred - target).double() ** 2).mean(dim=(1, 2, 3)) * w
    want = torch.stack([per_sample[group == k].mean() if (group == k).any()
                        else torch.zeros((), dtype=torch.float64) for k in range(4)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight, min_snr_weight(trainer.diffusion.snr(t), 5.0, "v"))
    assert torch.allclose(got, reference_grouped_mse(pred, target, group, 4, weight=weight))
    trainer.close()


def test_edm2_weighting_matches_its_formula_and_learns(tmp_path):
    """weighting='edm2': cluster means of ``mse · e^{−u(λ)} + u(λ)`` per sample, u trained by the
    optimizer (model lr, no weight decay) and saved in the checkpoint."""
    trainer = Trainer(tiny(tmp_path, weighting="edm2", method="ew", weight_decay=0.1))
    group_of_u = [g for g in trainer.optimizer.param_groups
                  if g["params"][0] is next(trainer.uncertainty.parameters())]
    assert len(group_of_u) == 1 and group_of_u[0]["lr"] == trainer.config.lr
    assert group_of_u[0]["weight_decay"] == 0.0
    with torch.no_grad():  # a non-zero u, so that the reference has something to check
        trainer.uncertainty.net[-1].weight.normal_()
    x_t, t, target, group = _one_batch(trainer)
    assert trainer.per_sample_weight(t) is None
    got = trainer.compute_losses(x_t, t, None, target, group, None)
    with torch.no_grad():
        mse = ((trainer.model(x_t, t) - target).double() ** 2).mean(dim=(1, 2, 3))
        ac = trainer.diffusion.alphas_cumprod[t]
        u = trainer.uncertainty.log_variance((ac / (1 - ac)).log().float()).double()
    per_sample = mse * torch.exp(-u) + u
    want = torch.stack([per_sample[group == k].mean() for k in range(trainer.K)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in trainer.uncertainty.parameters()]
    for _ in range(3):
        # logged: each cluster's mean of e^{−u(λ_t)} over its timesteps, with this step's u
        with torch.no_grad():
            every_t = torch.arange(trainer.clusters.T)
            ac = trainer.diffusion.alphas_cumprod[every_t].double()
            w = torch.exp(-trainer.uncertainty.log_variance((ac / (1 - ac)).log().float()))
        want = [float(w[s:e].double().mean()) for s, e in trainer.clusters.bounds]
        stats = trainer.train_step()
        assert stats["edm2_weights"] == pytest.approx(want, rel=1e-6)
        assert max(want) > 1.5 * min(want)  # u differs across clusters: the test can fail
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.uncertainty.parameters()))
    path = trainer.save_checkpoint()
    saved = ckpt.load_checkpoint(path)["uncertainty"]
    for name, value in trainer.uncertainty.state_dict().items():
        assert torch.equal(saved[name], value), name
    with torch.no_grad():  # a non-finite u is never saved, like a non-finite model
        trainer.uncertainty.net[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite parameters"):
        trainer.save_checkpoint()
    trainer.close()


def test_vanilla_warmup_and_logged_fields(tmp_path):
    cfg = tiny(tmp_path, method="vanilla", warmup_steps=4, steps=5, lr=2e-3)
    train(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for r in records:
        assert set(r) >= {"step", "loss", "cluster_losses", "weights", "lr", "time"}
        assert len(r["cluster_losses"]) == 1 and r["weights"] == [1.0]
        assert r["loss"] == pytest.approx(r["cluster_losses"][0])
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3])
    clusters = json.loads((tmp_path / "run" / "clusters.json").read_text())
    assert clusters["bounds"] == [[0, 50]]


def test_clusters_without_samples_are_logged_as_null(tmp_path):
    """A uniform sampler with batch 2 and K = 5 leaves at least 3 clusters empty every step:
    their loss is null in metrics.jsonl (it was 0.0, a value a real loss can take with
    weighting='edm2'), the others are the means of their samples, and the plots cope."""
    trainer = Trainer(tiny(tmp_path, k=5, sampler="uniform", batch_size=2, steps=6))
    seen = []
    sample = trainer.sampler.sample

    def recording_sample(*args, **kwargs):
        t, group = sample(*args, **kwargs)
        seen.append(group.clone())
        return t, group

    trainer.sampler.sample = recording_sample
    trainer.train()
    trainer.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == len(seen) == 6
    for record, group in zip(records, seen):
        present = torch.bincount(group, minlength=5) > 0
        assert [v is not None for v in record["cluster_losses"]] == present.tolist()
        values = [v for v in record["cluster_losses"] if v is not None]
        counts = torch.bincount(group, minlength=5)[present].double()
        assert record["loss"] == pytest.approx(float((torch.tensor(values) * counts).sum()
                                                     / counts.sum()))
    if has_matplotlib():
        assert set(plot_training_curves(tmp_path / "run" / "metrics.jsonl", tmp_path)) == {
            "cluster_losses", "weights"}


def test_method_wiring_uw_group_famo_update_and_ema(tmp_path):
    trainer = Trainer(tiny(tmp_path, "uw", uw_lr=0.025, weight_decay=0.01))
    uw_group = trainer.optimizer.param_groups[1]
    assert uw_group["lr"] == 0.025 and uw_group["weight_decay"] == 0.0
    assert uw_group["params"] == [trainer.method.log_vars]
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    trainer.train()
    trainer.close()
    assert trainer.ema.num_updates == 4 and not torch.all(trainer.method.log_vars == 0)

    famo = Trainer(tiny(tmp_path, "famo", method="famo", steps=3))
    famo.train()
    famo.close()
    assert int(famo.method.adam_step) == 3 and torch.any(famo.method.logits != 0)

    lagged = Trainer(tiny(tmp_path, "famo-lagged", method="famo", steps=3,
                          method_config={"reevaluate": False}))
    lagged.train()
    lagged.close()  # no re-evaluation: the logits move from the second backward on
    assert int(lagged.method.adam_step) == 2 and torch.any(lagged.method.logits != 0)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_label_dropout_feeds_the_null_label_and_trains_its_row(tmp_path, p):
    trainer = Trainer(tiny(tmp_path, class_conditional=True, label_dropout=p, batch_size=16))
    null = trainer.model_config["num_classes"]
    loaded, fed = [], []
    loader, forward = trainer.loader, trainer.forward

    def recording_loader():
        while True:
            batch = next(loader)
            loaded.append(batch[1].clone())
            yield batch

    trainer.loader = recording_loader()
    trainer.forward = lambda x, t, y: fed.append(y.clone()) or forward(x, t, y)
    table = trainer.model.label_embed.embedding.weight
    null_row_grads = []
    for _ in range(25):
        trainer.train_step()
        null_row_grads.append(table.grad[null].abs().sum().item())
    labels, y = torch.cat(loaded), torch.cat(fed)
    dropped = y == null
    assert torch.equal(y[~dropped], labels[~dropped]) and (labels < null).all()
    # binomial(400, p): the share lies within 4.5 standard deviations
    share, sd = dropped.double().mean().item(), (p * (1 - p) / len(y)) ** 0.5
    assert abs(share - p) <= 4.5 * sd + 1e-12, share
    # the null row gets a gradient exactly when the batch has a dropped label (from step 3 on:
    # DiT's zero-initialised modulation passes no gradient to the embeddings at first)
    per_step = dropped.reshape(25, 16).any(dim=1).tolist()
    assert [g > 0 for g in null_row_grads][2:] == per_step[2:]
    assert any(per_step) == (p > 0)
    trainer.close()


def test_compiled_model_trains_like_the_eager_one(tmp_path, monkeypatch):
    """compile=True runs the model through torch.compile (here with the aot_eager backend, so no
    C++ toolchain or long inductor compile is involved) and follows the eager run's losses."""
    calls = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        calls.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    eager = train(tiny(tmp_path, "eager", steps=3))
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    compiled = train(tiny(tmp_path, "compiled", steps=3, compile=True))
    assert len(calls) == 1 and compiled["step"] == eager["step"] == 3
    a = [r["loss"] for r in read_metrics(tmp_path / "eager" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "compiled" / "metrics.jsonl")]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_compile_with_amp_on_a_cpu_is_refused(tmp_path):
    """torch.compile of the UNet under CPU autocast gave zero gradients in many layers
    (torch 2.13 inductor), so the pair is refused before anything is built or written."""
    for amp in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"compile=True with amp='{amp}' on a CPU"):
            Trainer(tiny(tmp_path, compile=True, amp=amp, device="cpu"))
    assert not (tmp_path / "run").exists()
    # compile is an execution mode: a run may resume with it switched (e.g. a GPU run with
    # compile and amp, continued on a CPU without compile)
    train(tiny(tmp_path, steps=2))
    Trainer(tiny(tmp_path, steps=3, compile=True), resume=True).close()


def test_ema_matches_the_closed_form():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    values, want = [1.0, -2.0, 3.0], start.clone()
    for n, value in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        decay = min(0.5, (1 + n) / (10 + n))
        want = decay * want + (1 - decay) * value
    torch.testing.assert_close(ema.model.weight, want)


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    train(tiny(tmp_path, steps=2))
    before = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").read_bytes()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny(tmp_path, steps=5))
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").read_bytes() == before


def test_affinity_objective_and_periodic_sample_grids(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 50))
    np.save(tmp_path / "affinity.npy", (a + a.T) / 2)
    cfg = tiny(tmp_path, objective="affinity", affinity=str(tmp_path / "affinity.npy"), k=4,
               steps=5, sample_every=2)
    train(cfg)
    got = json.loads((tmp_path / "run" / "clusters.json").read_text())
    want = interval_clustering(4, "affinity", affinity=(a + a.T) / 2)
    assert [tuple(b) for b in got["bounds"]] == list(want.bounds)
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step_00000002.png", "step_00000004.png"]
    assert (tmp_path / "run" / "samples.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- exact resume


def _flat_state(obj):
    """Every tensor of a nested state, by path (for exact comparison)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value

    walk("", obj)
    return out


@pytest.mark.parametrize("overrides", [
    dict(method="uw"),
    dict(method="pcgrad", sampler="uniform"),
    dict(method="famo", weighting="p2"),
    dict(method="rlw", amp="bf16", grad_clip=0.5),
    dict(method="nashmtl", method_config={"update_weights_every": 2}, engine="one-backward"),
    dict(method="uw", amp="fp16", weighting="min_snr", warmup_steps=3),
    dict(method="uw", class_conditional=True, label_dropout=0.5),
    dict(method="ew", weighting="edm2", warmup_steps=2),
], ids=["uw", "pcgrad-uniform", "famo-p2", "rlw-bf16-clip", "nash-onebackward", "uw-fp16",
        "uw-label-dropout", "ew-edm2"])
def test_resume_is_exact(tmp_path, overrides):
    whole = train(tiny(tmp_path, "whole", steps=6, **overrides))
    train(tiny(tmp_path, "split", steps=3, **overrides))
    resumed = train(tiny(tmp_path, "split", steps=6, **overrides), resume=True)
    a = ckpt.load_checkpoint(whole["checkpoint"])
    b = ckpt.load_checkpoint(resumed["checkpoint"])
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer", "method", "scaler", "uncertainty"):
        fa, fb = _flat_state(a[key]), _flat_state(b[key])
        assert fa.keys() == fb.keys(), key
        for name in fa:
            if isinstance(fa[name], torch.Tensor):
                torch.testing.assert_close(fa[name], fb[name], rtol=0, atol=0, equal_nan=True,
                                           msg=f"{key}{name}")
            else:
                assert fa[name] == fb[name], f"{key}{name}"
    # the metrics log of the resumed run continues where the checkpoint stopped
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    logged = "edm2_weights" if overrides.get("weighting") == "edm2" else "weights"
    for key in ("loss", logged):
        a = [r[key] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
        b = [r[key] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
        assert a == b and len(a) == 6, key
    if has_matplotlib() and logged == "edm2_weights":
        assert Path(resumed["files"]["edm2_weights"]).is_file()


def test_resumed_metrics_log_equals_an_uninterrupted_runs(tmp_path):
    """A run stopped at a step between two log records (3 with log_every=2) logged that step as
    its last; the resumed run drops it, so its log equals the uninterrupted run's."""
    whole = tiny(tmp_path, "whole", steps=7, log_every=2)
    train(whole)
    train(whole.replace(out=str(tmp_path / "split"), steps=3))
    first = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert first == [2, 3]
    train(whole.replace(out=str(tmp_path / "split")), resume=True)
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 7]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # judged by the earlier run's own log_every (it may change on resume): an on-schedule
    # record is kept although the new interval does not divide it, an off-schedule one dropped
    # although the new interval divides it
    base = tiny(tmp_path, "other", steps=4, log_every=2)
    train(base)
    train(base.replace(steps=8, log_every=3), resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "other" / "metrics.jsonl")] == [2, 4, 6, 8]
    base = tiny(tmp_path, "third", steps=3, log_every=2)
    train(base)
    train(base.replace(steps=7, log_every=3), resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "third" / "metrics.jsonl")] == [2, 6, 7]


def test_resume_refuses_changed_config_and_keeps_last_n(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    orphan = folder / ".ckpt_00000007.pt.abc123.tmp"  # what a write killed with -9 leaves
    orphan.write_bytes(b"partial")
    train(tiny(tmp_path, steps=4, save_every=1, keep_last=2))
    names = [p.name for p in ckpt.list_checkpoints(folder)]
    assert names == ["ckpt_00000003.pt", "ckpt_00000004.pt"]
    assert not orphan.exists()
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        Trainer(tiny(tmp_path, steps=8, lr=5e-3), resume=True)
    with pytest.raises(ValueError, match="nothing to do"):
        Trainer(tiny(tmp_path, steps=4), resume=True)


def test_resume_a_checkpoint_written_before_a_config_field_existed(tmp_path):
    """A field added later (label_dropout) is missing from older checkpoints: its default
    reproduces them, so the resume goes on — and ends where an uninterrupted run does."""
    whole = train(tiny(tmp_path, "whole", steps=4))
    first = train(tiny(tmp_path, steps=2))
    state = ckpt.load_checkpoint(first["checkpoint"])
    del state["config"]["label_dropout"]
    ckpt.atomic_save(state, first["checkpoint"])
    resumed = train(tiny(tmp_path, steps=4), resume=True)
    a, b = (ckpt.load_checkpoint(r["checkpoint"]) for r in (whole, resumed))
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def test_data_and_affinity_paths_are_stored_absolute_and_resume_from_anywhere(
        tmp_path, monkeypatch):
    """A relative --data / --affinity path is made absolute, so the run's config.json (read by
    `ant affinity`, by a resume) names the same files from any folder; a checkpoint written
    with the relative string (before this) still resumes with the file named either way."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "shapes").mkdir()  # a folder named like a built-in never shadows it
    images = np.random.default_rng(0).uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32)
    np.save(work / "sub" / "x.npy", images)
    a = np.random.default_rng(1).uniform(0, 1, (50, 50))
    np.save(work / "sub" / "A.npy", (a + a.T) / 2)
    monkeypatch.chdir(work)
    cfg = tiny(tmp_path, steps=2, data="sub/x.npy", objective="affinity", affinity="sub/A.npy")
    assert cfg.validate().data == str(work / "sub" / "x.npy")
    assert cfg.affinity == str(work / "sub" / "A.npy")
    assert tiny(tmp_path).validate().data == "shapes"
    assert tiny(tmp_path, data="missing.npy").validate().data == "missing.npy"  # error later
    train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"] == str(work / "sub" / "x.npy")
    monkeypatch.chdir(work / "sub")  # the same files, named from another folder
    (work / "link.npy").symlink_to(work / "sub" / "x.npy")  # the same file through a link
    again = train(tiny(tmp_path, steps=3, data="../link.npy", objective="affinity",
                       affinity="A.npy"), resume=True)
    assert again["step"] == 3
    # the run keeps the name it was started with, not the link's
    assert ckpt.load_checkpoint(again["checkpoint"])["config"]["data"] == saved["data"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == saved["data"]
    state = ckpt.load_checkpoint(again["checkpoint"])  # as written before: relative strings
    state["config"].update(data="sub/x.npy", affinity="sub/A.npy")
    ckpt.atomic_save(state, again["checkpoint"])
    monkeypatch.chdir(work)  # they resolve from the folder the run was started in
    last = train(tiny(tmp_path, steps=4, data="./sub/x.npy", objective="affinity",
                      affinity=str(work / "sub" / "A.npy")), resume=True)
    assert last["step"] == 4
    np.save(work / "sub" / "y.npy", images)  # another file is another config
    with pytest.raises(ValueError, match=r"\['data'\]"):
        Trainer(tiny(tmp_path, steps=5, data="sub/y.npy", objective="affinity",
                     affinity="sub/A.npy"), resume=True)


def test_resume_from_an_earlier_checkpoint_never_prunes_the_new_branch(tmp_path):
    """Later checkpoints of the run ranked above the new branch by step: pruning deleted the
    checkpoint just written and kept the stale one. Refused now; nothing is deleted."""
    train(tiny(tmp_path, steps=6, save_every=2))
    folder = tmp_path / "run" / "checkpoints"
    before = [p.name for p in ckpt.list_checkpoints(folder)]
    assert before == ["ckpt_00000002.pt", "ckpt_00000004.pt", "ckpt_00000006.pt"]
    with pytest.raises(ValueError, match=r"after step 4 .*ckpt_00000006\.pt.*nothing was deleted"):
        Trainer(tiny(tmp_path, steps=5, keep_last=1), resume=folder / "ckpt_00000004.pt")
    assert [p.name for p in ckpt.list_checkpoints(folder)] == before
    # into another run folder that holds checkpoints (of its own run): refused, any steps
    train(tiny(tmp_path, name="other", steps=8, save_every=8))
    with pytest.raises(ValueError, match="would mix two runs"):
        Trainer(tiny(tmp_path, name="other", steps=5), resume=folder / "ckpt_00000004.pt")
    # once the later ones are moved away, the resume works and prunes only its own branch
    (folder / "ckpt_00000006.pt").rename(tmp_path / "kept.pt")
    result = train(tiny(tmp_path, steps=5, keep_last=1), resume=folder / "ckpt_00000004.pt")
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["ckpt_00000005.pt"]
    assert os.path.exists(result["checkpoint"])


def test_resume_refuses_clusters_that_changed(tmp_path):
    A = np.eye(50) + 0.5
    np.save(tmp_path / "A.npy", A)
    cfg = tiny(tmp_path, steps=2, objective="affinity", affinity=str(tmp_path / "A.npy"))
    train(cfg)
    B = np.zeros((50, 50))
    B[:20, :20] = B[20:, 20:] = 1.0
    np.save(tmp_path / "A.npy", B)  # the affinity file changed between the runs
    with pytest.raises(ValueError, match="clusters .* differ from the checkpoint"):
        Trainer(cfg.replace(steps=4), resume=True)


def test_model_config_contradicting_the_data_writes_nothing(tmp_path):
    for bad in ({"image_size": 12}, {"in_channels": 1}, {"num_classes": 2}, {"out_channels": 6}):
        with pytest.raises(ValueError, match=f"model_config\\['{next(iter(bad))}'\\]"):
            Trainer(tiny(tmp_path, model_config={**TINY_DIT, **bad}))
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="method_config"):
        Trainer(tiny(tmp_path, method="famo", method_config={"lr": "fast"}))
    Trainer(tiny(tmp_path, model_config={**TINY_DIT, "out_channels": None})).close()  # = data's
    for field, value, message in (("out", "", "out must not be empty"),
                                  ("affinity", "", "affinity must not be empty"),
                                  ("seed", 2**64, "seed must be <= 18446744073709551615")):
        with pytest.raises(ValueError, match=message):  # "" wrote the run into the cwd
            tiny(tmp_path, **{field: value}).validate()


# ----------------------------------------------------------------------------- failures


def test_corrupt_checkpoint_is_a_clear_error_and_untouched(tmp_path):
    train(tiny(tmp_path, steps=2))
    path = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(tiny(tmp_path, steps=4), resume=True)
    assert path.read_bytes() == b"this is not a checkpoint"
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") == [path]
    torch.save({"model": torch.zeros(1)}, path)  # readable, but not ours
    with pytest.raises(ckpt.CheckpointError, match="not an ant-core"):
        ckpt.load_checkpoint(path)



def test_config_takes_numpy_numbers_as_python_ones():
    cfg = TrainConfig(T=np.int64(100), steps=np.int32(5), lr=np.float32(0.5)).validate()
    assert (type(cfg.T), type(cfg.steps), type(cfg.lr)) == (int, int, float)
    assert cfg.T == 100 and cfg.lr == 0.5
    json.dumps(cfg.to_dict())  # still serialisable (the run folder's config.json)


def test_load_model_of_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    """Ours by its format tag, but with keys missing or weights that do not fit its model
    config: a CheckpointError (the CLI reports it) instead of a bare KeyError/RuntimeError."""
    result = train(tiny(tmp_path, steps=1))
    good = ckpt.load_checkpoint(result["checkpoint"])
    assert ckpt.load_model(result["checkpoint"])[2]["step"] == 1
    for damage in ({"model_kind": None}, {"config": {}},
                   {"model_config": {**good["model_config"], "hidden_size": 64}}):
        state = {k: v for k, v in good.items() if not (k in damage and damage[k] is None)}
        state.update({k: v for k, v in damage.items() if v is not None})
        torch.save(state, tmp_path / "damaged.pt")
        with pytest.raises(ckpt.CheckpointError, match="does not hold a loadable model"):
            ckpt.load_model(tmp_path / "damaged.pt")


@pytest.mark.parametrize("values, field", [
    ({"lr": -1.0}, "lr"), ({"steps": 0}, "steps"), ({"steps": "10"}, "steps"),
    ({"k": 60, "T": 50}, "k"), ({"method": "magic"}, "method"), ({"amp": "fp8"}, "amp"),
    ({"ema_decay": 1.0}, "ema_decay"), ({"objective": "affinity"}, "affinity"),
    ({"engine": "one-backward", "method": "uw"}, "engine"), ({"lr": float("nan")}, "lr"),
    ({"batch_size": True}, "batch_size"), ({"learning_rate": 1.0}, "learning_rate"),
    ({"lr": 10**400}, "lr"),
    ({"label_dropout": 1.0, "class_conditional": True}, "label_dropout"),
    ({"label_dropout": -0.1, "class_conditional": True}, "label_dropout"),
    ({"label_dropout": 0.1}, "label_dropout"),
    ({"weighting": "edm2", "method": "pcgrad"}, "weighting"),
    ({"weighting": "edm2", "method": "uw"}, "weighting"),
    ({"data": ""}, "data must not be empty"),
    ({1: 2, "foo": 3}, r"unknown config field\(s\) \[\"'foo'\", '1'\]"),  # mixed key types
])
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict(values)


def test_config_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "method": "pcgrad"}))
    cfg = TrainConfig.from_file(tmp_path / "c.json", lr=0.5)
    assert (cfg.steps, cfg.method, cfg.lr, cfg.k) == (7, "pcgrad", 0.5, 5)
    (tmp_path / "bad.json").write_text("{steps: 7")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not found"):
        TrainConfig.from_file(tmp_path / "missing.json")
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"steps": 9, "weighting": "min_snr"}))
    cfg = TrainConfig.from_file(tmp_path / "c.yaml")
    assert (cfg.steps, cfg.weighting) == (9, "min_snr")
    # YAML 1.2 floats (PyYAML's 1.1 default reads "1e-3" as a string); quoted stays a string
    (tmp_path / "f.yaml").write_text("lr: 1e-3\nuw_lr: 25E-3\nsteps: 4\n")
    cfg = TrainConfig.from_file(tmp_path / "f.yaml")
    assert (cfg.lr, cfg.uw_lr, cfg.steps) == (1e-3, 0.025, 4)
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}      # PyYAML's own loader is untouched
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        TrainConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "q.yaml").write_text("lr: '1e-3'\n")
    with pytest.raises((TypeError, ValueError), match="lr"):
        TrainConfig.from_file(tmp_path / "q.yaml")
    # YAML 1.2 numbers otherwise too: -.5 was a string, 010 octal 8, 1:30 base-60 90
    from ant_core.train_config import read_config_file
    (tmp_path / "n.yaml").write_text("a: -.5\nb: +.5\nc: 010\nd: 1:30\ne: 0x1F\nf: 0o10\n"
                                     "g: -.inf\nh: 1.\n")
    assert read_config_file(tmp_path / "n.yaml") == {
        "a": -0.5, "b": 0.5, "c": 10, "d": "1:30", "e": 31, "f": 8, "g": -math.inf, "h": 1.0}
    assert yaml.safe_load("c: 010") == {"c": 8}


def test_array_data_keeps_its_size_and_says_so(tmp_path, capsys):
    """image_size applies to built-in data and folders; an array of 8 px images trained at
    8 px while config.json said 16, without a word."""
    np.save(tmp_path / "x.npy", ProceduralShapes(8, 8, seed=0).images.numpy())
    trainer = Trainer(tiny(tmp_path, data=str(tmp_path / "x.npy"), image_size=16))
    trainer.close()
    assert trainer.model_config["image_size"] == 8
    assert "holds 8 px images; the model is built for them (image_size=16" in \
        capsys.readouterr().out


def test_missing_data_path_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="data"):
        Trainer(tiny(tmp_path, data=str(tmp_path / "nope.npy")))
    assert not (tmp_path / "run").exists()


def test_non_finite_parameters_are_never_saved(tmp_path):
    """A finite loss with an overflowing gradient leaves NaN parameters: saving them would
    replace the last good checkpoint (keep_last=1)."""
    trainer = Trainer(tiny(tmp_path, steps=10, save_every=1, keep_last=1))
    head = list(trainer.model.parameters())[-1]
    head.register_hook(lambda g: g * float("inf") if trainer.step >= 2 else g)
    with pytest.raises(TrainingError, match=r"non-finite parameters after step 3.*ckpt_00000002"):
        trainer.train()
    trainer.close()
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["ckpt_00000002.pt"]
    assert all(torch.isfinite(v).all() for v in ckpt.load_checkpoint(kept[0])["model"].values())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny(tmp_path, steps=10, save_every=2))

    def poison(module, inputs, output):
        return output * float("nan") if trainer.step >= 3 else output

    trainer.model.register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4.*ckpt_00000002\.pt"):
        trainer.train()
    trainer.close()
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["ckpt_00000002.pt"]
    state = ckpt.load_checkpoint(kept[0])
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ----------------------------------------------------------------------------- DDP


def _ddp_config(root, name, **overrides):
    values = dict(data="shapes", num_images=24, image_size=8, model="dit", model_config=TINY_DIT,
                  T=50, k=3, steps=3, batch_size=5, out=os.path.join(root, name),
                  progress=False, num_samples=2, sample_steps=2)
    values.update(overrides)
    return TrainConfig(**values)


def _ddp_worker(rank, world, ports, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    # 1. the trainer creates (and destroys) the process group from torchrun's variables
    for method, port in zip(("uw", "pcgrad"), ports):
        os.environ["MASTER_PORT"] = str(port)
        trainer = Trainer(_ddp_config(root, method, method=method))
        trainer.train()
        torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()},
                   os.path.join(root, f"{method}_rank{rank}.pt"))
        trainer.close()
    # 2. an initialised group is used as is; stop + resume == uninterrupted, under DDP
    os.environ["MASTER_PORT"] = str(ports[2])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    cfg = dict(method="famo", class_conditional=True, label_dropout=0.3)  # per-rank dropout too
    train(_ddp_config(root, "whole", steps=4, **cfg))
    train(_ddp_config(root, "split", steps=2, **cfg))
    train(_ddp_config(root, "split", steps=4, **cfg), resume=True)
    # 3. a SIGTERM reaching one rank after its step's all-reduce stops every rank after the
    # same step (it had left the others waiting in the next all-reduce: a hang)
    trainer = Trainer(_ddp_config(root, "signal", steps=6))
    backward = trainer.method.backward

    def signalled(*args, **kwargs):
        if rank == 0 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return backward(*args, **kwargs)

    trainer.method.backward = signalled
    result = trainer.train()
    trainer.close()
    with open(os.path.join(root, f"signal_rank{rank}.json"), "w") as handle:
        json.dump({"step": result["step"], "stopped_by": result["stopped_by"],
                   "checkpoint": result["checkpoint"]}, handle)
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes_end_identical(tmp_path, capsys):
    ports = (free_port(), free_port(), free_port())
    torch.multiprocessing.spawn(_ddp_worker, args=(2, ports, str(tmp_path)), nprocs=2, join=True)
    whole = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "ckpt_00000004.pt")
    split = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "ckpt_00000004.pt")
    for key in ("model", "ema", "optimizer", "method", "rank_states"):
        fa, fb = _flat_state(whole[key]), _flat_state(split[key])
        assert fa.keys() == fb.keys()
        for name in fa:
            if isinstance(fa[name], torch.Tensor):
                torch.testing.assert_close(fa[name], fb[name], rtol=0, atol=0, equal_nan=True,
                                           msg=f"{key}{name}")
    for method in ("uw", "pcgrad"):
        r0 = torch.load(tmp_path / f"{method}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{method}_rank1.pt", weights_only=True)
        for name in r0:
            assert torch.equal(r0[name], r1[name]), (method, name)
        saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / method / "checkpoints"))
        assert saved["step"] == 3 and saved["world_size"] == 2 and len(saved["rank_states"]) == 2
        for name in r0:
            assert torch.equal(saved["model"][name], r0[name])
        # the two ranks drew different timesteps (sharded streams)
        s0, s1 = (r["sampler"]["generator"] for r in saved["rank_states"])
        assert not torch.equal(s0, s1)
        fresh = Trainer(_ddp_config(str(tmp_path), "fresh"))
        assert not all(torch.equal(fresh.model.state_dict()[n], r0[n]) for n in r0)
        fresh.close()
    signalled = [json.loads((tmp_path / f"signal_rank{r}.json").read_text()) for r in (0, 1)]
    saved = str(tmp_path / "signal" / "checkpoints" / "ckpt_00000004.pt")  # on every rank
    assert signalled == [{"step": 4, "stopped_by": "SIGTERM", "checkpoint": saved},
                         {"step": 4, "stopped_by": "SIGTERM (from another rank)",
                          "checkpoint": saved}]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "signal" / "checkpoints")] == \
        ["ckpt_00000004.pt"]
    # a 2-process run resumed on 1 process says what changes, the global batch included
    capsys.readouterr()
    Trainer(_ddp_config(str(tmp_path), "uw", method="uw", steps=4), resume=True).close()
    assert "global batch changes from 10 to 5" in capsys.readouterr().out


# ----------------------------------------------------------------------------- pictures


def test_image_grid_arguments(tmp_path):
    images = torch.zeros(3, 1, 2, 2)
    assert image_grid(images, nrow=3, padding=0).shape == (2, 6, 1)
    for kwargs, error in (({"nrow": 0}, ValueError), ({"nrow": -1}, ValueError),
                          ({"nrow": 2.5}, TypeError), ({"padding": -1}, ValueError),
                          ({"scale": True}, TypeError)):
        with pytest.raises(error, match=next(iter(kwargs))):
            image_grid(images, **kwargs)
    for shape in ((0, 1, 2, 2), (3, 1, 2, 0), (3, 1, 0, 2), (3, 2, 2)):
        with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\)"):
            image_grid(torch.zeros(shape))
        with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\)"):
            save_image_grid(torch.zeros(shape), tmp_path / "g.png")   # was ZeroDivisionError
    assert not list(tmp_path.iterdir())


def test_builtin_png_writer_roundtrips(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    images = torch.linspace(-1, 1, 2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (7, 17, 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[0, 0, 0] == 255  # -1 -> 0, padding white
    for array in (grid, grid[:, :, :1]):
        path = write_png(tmp_path / "g.png", array, use_pillow=False)
        with Image.open(path) as img:
            back = np.asarray(img)
        np.testing.assert_array_equal(back.reshape(array.shape), array)


def test_device_names_are_checked_against_the_machine(monkeypatch):
    from ant_core.train_config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="this torch has no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("auto") == "cuda"
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:7")  # failed later inside torch.cuda.set_device
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("mps")


def test_resume_with_symlinked_checkpoints_and_a_missing_file(tmp_path):
    """Checkpoint files linked into <run>/checkpoints from other storage belong to that run
    (resolve() made them look foreign); a mistyped path is 'not found', not 'mix two runs'."""
    train(tiny(tmp_path, "run", steps=2, save_every=1, keep_last=0))
    folder = tmp_path / "run" / "checkpoints"
    store = tmp_path / "store"
    store.mkdir()
    for path in ckpt.list_checkpoints(folder):
        path.rename(store / path.name)
        path.symlink_to(store / path.name)
    # a path, as `ant train --resume --out RUN` passes the newest one
    assert train(tiny(tmp_path, "run", steps=3, keep_last=0),
                 resume=ckpt.latest_checkpoint(folder))["step"] == 3
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        Trainer(tiny(tmp_path, "run", steps=5), resume=folder / "ckpt_9.pt")


def test_public_data_classes_pickle_under_ant_core_data():
    import pickle

    from ant_core.data import ImageDataset

    data = ProceduralShapes(num_images=4, image_size=8)
    assert type(data).__module__ == ImageDataset.__module__ == "ant_core.data"
    assert pickle.loads(pickle.dumps(data)).images.equal(data.images)
