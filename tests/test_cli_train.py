"""`ant train`, `ant sample` and `ant demo`."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ant_core import checkpoint as ckpt
from ant_core.cli import main
from ant_core.cli.train import TRAIN_FIELDS
from ant_core.diffusion import GaussianDiffusion
from ant_core.models import create_model
from ant_core.trainer import TrainConfig
from ant_core.visualize import has_matplotlib, read_metrics

TINY = ["--data", "shapes", "--num-images", "24", "--image-size", "8", "--model", "dit",
        "--model-config", '{"patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}',
        "--T", "20", "--k", "3", "--batch-size", "6", "--num-samples", "4",
        "--sample-steps", "2", "--log-every", "1", "--no-progress", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ant_core.cli", *args], capture_output=True,
                          text=True, env=env, **kwargs)


def test_flag_table_covers_every_config_field():
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"out"}
    assert {name for name, _, _ in TRAIN_FIELDS} == fields


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--steps", "3", "--out", str(out)]) == 0
    return out


def test_sample_defaults_to_at_most_t_steps(trained_run, tmp_path):
    # the run has T=20: a fixed default of 50 DDIM steps was an error
    assert main(["sample", str(trained_run), "--num", "2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_sample_output_names_are_kept_and_checked_first(trained_run, tmp_path, capsys):
    """--out samples.v2 wrote samples.npz; a file or folder in the way was a traceback after
    the sampling."""
    assert main(["sample", str(trained_run), "--num", "1", "--out", str(tmp_path / "s.v2")]) == 0
    assert (tmp_path / "s.v2.npz").is_file() and (tmp_path / "s.v2.png").is_file()
    (tmp_path / "afile").write_text("")
    (tmp_path / "taken.npz").mkdir()
    for out, message in ((tmp_path / "afile" / "x", "is not a folder"),
                         (tmp_path / "taken", "is a folder"), ("", "must not be empty")):
        with pytest.raises(SystemExit) as exc:
            main(["sample", str(trained_run), "--num", "1", "--out", str(out)])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_train_writes_the_run_folder(trained_run, capsys):
    for name in ("config.json", "clusters.json", "metrics.jsonl", "samples.png"):
        assert (trained_run / name).is_file(), name
    if has_matplotlib():
        assert (trained_run / "cluster_losses.png").is_file()
        assert (trained_run / "task_weights.png").is_file()
    config = json.loads((trained_run / "config.json").read_text())
    assert config["T"] == 20 and config["method"] == "uw" and config["model_config"]["depth"] == 1
    assert [r["step"] for r in read_metrics(trained_run / "metrics.jsonl")] == [1, 2, 3]
    assert ckpt.latest_checkpoint(trained_run / "checkpoints").name == "ckpt_00000003.pt"


def _reference_model(run):
    """The EMA model rebuilt from the raw checkpoint file, independently of the CLI."""
    state = torch.load(ckpt.latest_checkpoint(run / "checkpoints"), weights_only=True)
    mc = state["model_config"]
    model = create_model("dit", **mc)
    model.load_state_dict(state["ema"]["model"])
    return model.eval(), mc


@pytest.mark.parametrize("sampler, extra", [("ddim", ["--steps", "5"]), ("ddpm", [])])
def test_sample_shapes_determinism_and_reference(trained_run, tmp_path, sampler, extra):
    outs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main(["sample", str(trained_run), "--num", "5", "--sampler", sampler,
                     "--seed", seed, "--out", str(tmp_path / name), "--threads", "1",
                     *extra]) == 0
        assert (tmp_path / f"{name}.png").is_file()
        outs.append(np.load(tmp_path / f"{name}.npz")["images"])
    assert outs[0].shape == (5, 3, 8, 8) and outs[0].dtype == np.float32
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    assert np.abs(outs[0]).max() <= 1
    if sampler == "ddpm":  # DDIM's options are refused, not ignored
        for option in ("--eta=0.3", "--steps=5"):
            with pytest.raises(SystemExit) as exc:
                main(["sample", str(trained_run), "--sampler", "ddpm", option])
            assert exc.value.code == 2
    model, _ = _reference_model(trained_run)
    diffusion = GaussianDiffusion("linear", 20, "eps")
    if sampler == "ddim":
        want = diffusion.sample_ddim(model, (5, 3, 8, 8), steps=5, seed=0)
    else:
        want = diffusion.sample_ddpm(model, (5, 3, 8, 8), seed=0)
    np.testing.assert_array_equal(outs[0], want.clamp(-1, 1).numpy())


def test_sample_with_classifier_free_guidance_and_one_label(trained_run, tmp_path, capsys):
    out = tmp_path / "cond"
    assert main(["train", *TINY, "--steps", "3", "--class-conditional", "--label-dropout", "0.2",
                 "--out", str(out)]) == 0
    assert main(["sample", str(out), "--num", "4", "--steps", "3", "--guidance-scale", "2.5"]) == 0
    got = np.load(out / "samples_ddim_cfg2p5_seed0.npz")
    model, mc = _reference_model(out)
    y = torch.arange(4) % mc["num_classes"]
    np.testing.assert_array_equal(got["labels"], y.numpy())
    want = GaussianDiffusion("linear", 20, "eps").sample_ddim(
        model, (4, 3, 8, 8), steps=3, seed=0, y=y, guidance_scale=2.5)
    np.testing.assert_array_equal(got["images"], want.clamp(-1, 1).numpy())
    # --label: every image of one class
    assert main(["sample", str(out), "--num", "3", "--steps", "2", "--label", "4"]) == 0
    one = np.load(out / "samples_ddim_class4_seed0.npz")
    np.testing.assert_array_equal(one["labels"], [4, 4, 4])
    want = GaussianDiffusion("linear", 20, "eps").sample_ddim(
        model, (3, 3, 8, 8), steps=2, seed=0, y=torch.full((3,), 4))
    np.testing.assert_array_equal(one["images"], want.clamp(-1, 1).numpy())
    # refused: an unconditional model, a null label that was never trained, a bad scale,
    # a label out of range or for an unconditional model
    plain = tmp_path / "plain"
    assert main(["train", *TINY, "--steps", "1", "--class-conditional", "--out", str(plain)]) == 0
    for run, option, message in (
            (trained_run, "--guidance-scale=2", "needs a class-conditional model"),
            (plain, "--guidance-scale=2", "label_dropout=0"),
            (out, "--guidance-scale=-1", "--guidance-scale must be a finite number"),
            (out, "--label=5", "--label must be a class in [0, 5)"),
            (out, "--label=-1", "--label must be a class in [0, 5)"),
            (trained_run, "--label=0", "in [0, 0) of this unconditional"),
            (trained_run, "--steps=0", "--steps must be in [1, "),  # were named steps / eta
            (trained_run, "--eta=-1", "--eta must lie in [0, 1]")):
        with pytest.raises(SystemExit) as exc:
            main(["sample", str(run), option, "--out", str(tmp_path / "x")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_resume_with_a_config_file_takes_only_the_fields_it_sets(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--lr", "0.003", "--out", str(out)]) == 0
    config = tmp_path / "more.json"
    config.write_text(json.dumps({"steps": 4}))  # defaults must not override the run's config
    assert main(["train", "--resume", "--out", str(out), "--config", str(config),
                 "--no-progress"]) == 0
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert state["step"] == 4 and state["config"]["lr"] == 0.003


def test_config_file_then_flags_then_resume(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"method": "pcgrad", "steps": 2, "lr": 0.002}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), *TINY, "--lr", "0.003",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["method"], saved["steps"], saved["lr"]) == ("pcgrad", 2, 0.003)
    assert main(["train", "--resume", "--out", str(out), "--steps", "4", "--no-progress"]) == 0
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert state["step"] == 4 and state["config"]["method"] == "pcgrad"


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "lr must be > 0"),
    (["--method", "magic"], "method must be one of"),
    (["--data", "/nonexistent/data.npy"], "data="),
    (["--sampler", "sorted"], "sampler must be one of"),
    (["--data", ""], "data must not be empty"),
    (["--device", "cudax"], "device must be"),
    (["--threads", "0"], "--threads: must be an int >= 1"),
])
def test_bad_values_are_clear_errors_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, *flags, "--out", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_checkpoint_cli(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    (run / "checkpoints").mkdir(parents=True)
    bad = run / "checkpoints" / "ckpt_00000003.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", "--out", str(run), "--steps", "5"])
    assert exc.value.code == 2 and "corrupt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(bad)])
    assert exc.value.code == 2 and "corrupt" in capsys.readouterr().err
    assert bad.read_bytes() == b"\x00garbage"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "ckpt_00000003.pt"]


def test_a_signal_during_the_final_save_does_not_kill_the_run(tmp_path):
    """The handlers stay installed until the final checkpoint is written: a SIGTERM arriving
    while it is saved only sets the stop flag (it used to kill the process, losing the file)."""
    script = f"""
import os, signal
from ant_core import checkpoint
from ant_core.cli import main
real = checkpoint.atomic_save
def save_with_a_signal(obj, path):
    if obj["step"] == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(obj, path)
checkpoint.atomic_save = save_with_a_signal
raise SystemExit(main(["train", *{TINY!r}, "--steps", "2", "--out", {str(tmp_path / "run")!r}]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt")["step"] == 2


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ant_core.cli", "train", *TINY,
                             "--steps", "100000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(read_metrics(out / "metrics.jsonl")) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    path = ckpt.latest_checkpoint(out / "checkpoints")
    state = ckpt.load_checkpoint(path)
    last_logged = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert state["step"] == last_logged >= 2
    result = run_cli("train", "--resume", "--out", str(out), "--steps", str(state["step"] + 1),
                     "--no-progress", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["step"] == \
        state["step"] + 1


def test_divergence_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr=1e30 blows the parameters up within a few steps: the loss becomes non-finite."""
    out = tmp_path / "run"
    result = run_cli("train", *TINY, "--lr", "1e30", "--steps", "50", "--save-every", "1",
                     "--keep-last", "0", "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert "non-finite loss at step" in result.stderr
    assert "Last good checkpoint" in result.stderr
    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert kept and str(kept[-1]) in result.stderr
    failed_step = int(result.stderr.split("non-finite loss at step ")[1].split(":")[0])
    state = ckpt.load_checkpoint(kept[-1])
    assert state["step"] == failed_step - 1


def test_non_finite_data_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    data = np.full((4, 3, 8, 8), 0.5, dtype=np.float32)
    data[0, 0, 0, 0] = np.inf
    np.save(tmp_path / "bad.npy", data)
    result = run_cli("train", *TINY, "--data", str(tmp_path / "bad.npy"), "--out", str(out))
    assert result.returncode == 2 and "NaN or infinite" in result.stderr
    assert not out.exists()


def test_latent_like_data_with_four_channels_trains_and_samples_to_npy(tmp_path, capsys):
    """C = 4 (e.g. VAE latents) trains like images; grids become .npy (a PNG needs 1 or 3
    channels: this failed after training had finished)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "latents.npy", rng.uniform(-1, 1, (12, 4, 8, 8)).astype(np.float32))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(tmp_path / "latents.npy"), "--steps", "2",
                 "--out", str(out)]) == 0
    samples = np.load(out / "samples.npy")
    assert samples.shape == (4, 4, 8, 8) and not (out / "samples.png").exists()
    assert main(["sample", str(out), "--num", "2", "--steps", "2", "--out",
                 str(tmp_path / "s")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 4, 8, 8)
    assert not (tmp_path / "s.png").exists() and "s.npz" in capsys.readouterr().out


def test_resume_from_a_file_never_writes_into_an_unrelated_folder(tmp_path, capsys):
    """A checkpoint outside <run>/checkpoints/ has no known run folder (its grandparent was
    used, e.g. the home folder); resuming run B's checkpoint into run A's folder mixed them."""
    import shutil

    for name in ("a", "b"):
        assert main(["train", *TINY, "--steps", "2", "--out", str(tmp_path / name)]) == 0
    loose = tmp_path / "loose" / "sub"
    loose.mkdir(parents=True)
    shutil.copy(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"), loose / "c.pt")
    capsys.readouterr()
    for args, message in ((["--resume", str(loose / "c.pt")], "pass --out DIR"),
                          (["--resume", str(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints")),
                            "--out", str(tmp_path / "a")], "would mix two runs")):
        with pytest.raises(SystemExit) as exc:
            main(["train", *args, "--steps", "3"])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "loose").iterdir()) == ["sub"]
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path / "a" / "checkpoints")] \
        == [2]
    # with --out, a loose checkpoint continues into a new folder
    assert main(["train", "--resume", str(loose / "c.pt"), "--steps", "3", "--out",
                 str(tmp_path / "c")]) == 0
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path / "c" / "checkpoints")) == 3


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1",
                     "--steps", "6")
    assert result.returncode == 0, result.stderr
    for name in ("samples.png", "samples.npz", "metrics.json", "metrics.jsonl", "clusters.json",
                 "config.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in result.stdout or name in ("clusters.json", "config.json")
    if has_matplotlib():
        for name in ("clusters.png", "cluster_losses.png", "task_weights.png"):
            assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["method"] == "uw"
    assert set(metrics["samples_vs_heldout"]) >= {"fd", "precision", "recall"}
    assert np.isfinite(metrics["samples_vs_heldout"]["fd"])
    clusters = json.loads((out / "clusters.json").read_text())
    assert len(clusters["bounds"]) == 5 and clusters["objective"] == "log_snr"
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    assert Path(out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # again into the same folder: the error names demo's own remedy (it named --resume)
    again = run_cli("demo", "--quick", "--out", str(out), "--no-progress", "--steps", "6")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert "--resume" not in again.stderr
