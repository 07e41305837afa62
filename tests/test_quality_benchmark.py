"""benchmarks/quality.py: the smoke preset end to end, its statistics and its CLI errors."""
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = _load("quality")
report = _load("quality_report")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_closed_forms(p):
    # df = 1 (Cauchy) and df = 2 have closed-form quantiles
    assert report.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    df2 = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert report.t_quantile(p, 2) == pytest.approx(df2, rel=1e-9)
    assert report.t_quantile(1 - p, 2) == pytest.approx(-df2, rel=1e-9)


def test_t_quantile_table_and_normal_limit():
    # printed t tables (two-sided 95 %)
    for df, value in ((3, 3.182446), (4, 2.776445), (9, 2.262157), (30, 2.042272)):
        assert report.t_quantile(0.975, df) == pytest.approx(value, abs=2e-6)
    assert report.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert report.t_cdf(0.0, 5) == pytest.approx(0.5)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 11, 50):
        for p in (0.55, 0.8, 0.95, 0.975, 0.999):
            assert report.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_paired_difference_hand_computed():
    vanilla = {0: 10.0, 1: 12.0, 2: 11.0}
    ant = {0: 9.0, 1: 10.0, 2: 10.5}
    d = report.paired_difference(ant, vanilla)
    diffs = [-1.0, -2.0, -0.5]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    t = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # the df = 2 closed form at p = 0.975
    assert t == pytest.approx(4.302653, abs=1e-6)
    assert d["n_pairs"] == 3 and d["df"] == 2
    assert d["mean_diff"] == pytest.approx(mean)
    assert d["ci_low"] == pytest.approx(mean - t * sd / math.sqrt(3))
    assert d["ci_high"] == pytest.approx(mean + t * sd / math.sqrt(3))
    # the interval [-3.06, 0.73] covers 0: no significant difference
    assert report.verdict(d) == "no significant difference"
    assert report.verdict({"ci_low": -2.0, "ci_high": -0.1}) == "better"
    assert report.verdict({"ci_low": 0.1, "ci_high": 2.0}) == "worse"
    assert report.verdict({"ci_low": 0.1, "ci_high": 2.0}, lower_is_better=False) == "better"
    # pairing uses only common seeds; one pair gives no interval
    one = report.paired_difference({0: 1.0, 5: 3.0}, {0: 2.0})
    assert one["n_pairs"] == 1 and one["ci_low"] is None
    assert report.verdict(one).startswith("insufficient")
    # a diverged run (NaN metric) gives no interval, not "no significant difference"
    diverged = report.paired_difference({0: 1.0, 1: math.nan, 2: 0.5}, vanilla)
    assert diverged["ci_low"] is None and report.verdict(diverged).startswith("not available")
    # lists are refused: their entries would have been matched as seeds (0 pairs, silently)
    with pytest.raises(TypeError, match="values"):
        report.paired_difference([1.0, 2.0, 3.0], vanilla)


# ----------------------------------------------------------------------------- end to end


SMOKE_ARGS = ["--preset", "smoke", "--seeds", "2", "--configs", "vanilla,uw_affinity"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke preset, 2 configurations x 2 seeds, run once for the tests below."""
    out = tmp_path_factory.mktemp("quality") / "q"
    before = torch.get_num_threads()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert quality.main([*SMOKE_ARGS, "--out", str(out)]) == 0
    torch.set_num_threads(before)
    return out, buffer.getvalue()


def _final(out, name, seed):
    return json.loads((out / "results" / name / f"seed{seed}.json").read_text())["final"]


def test_smoke_end_to_end(smoke_run):
    out, printed = smoke_run
    assert "| vanilla" in printed and "| ANT-UW affinity" in printed
    verdicts = [line for line in printed.splitlines() if line.startswith("ANT-UW affinity: ")]
    assert len(verdicts) == 1
    assert any(v in verdicts[0] for v in ("better", "worse", "no significant difference"))
    assert (out / "fd_vs_step.png").is_file() or "no matplotlib" in printed

    preset = quality.PRESETS["smoke"]
    for name in ("vanilla", "uw_affinity"):
        for seed in (0, 1):
            run = json.loads((out / "results" / name / f"seed{seed}.json").read_text())
            assert run["seed"] == seed and run["config"] == name
            assert [e["step"] for e in run["evaluations"]] == list(preset.eval_steps)
            for e in run["evaluations"]:
                assert e["seed"] == seed
                assert all(np.isfinite(e[m]) for m in ("fd", "precision", "recall"))
            rec = run["record"]
            assert rec["seed"] == seed and rec["wall_seconds"] > 0
            assert set(rec["versions"]) == {"python", "torch", "numpy", "ant_core"}
            assert {"platform", "cpu_count", "gpu", "device"} <= set(rec["machine"])
            assert len(rec["code"]["sources_sha256"]) == 16  # the code, not just "0.1.0"
            assert run["train_config"]["seed"] == seed
            assert run["train_config"]["steps"] == preset.steps
    # the affinity configuration used the per-seed matrix estimated from vanilla's warm-up
    for seed in (0, 1):
        run = json.loads((out / "results" / "uw_affinity" / f"seed{seed}.json").read_text())
        matrix = np.load(run["affinity"])
        assert matrix.shape == (preset.T, preset.T)
        assert run["train_config"]["objective"] == "affinity"
        meta = json.loads(Path(run["affinity"]).with_suffix(".json").read_text())
        assert meta["warmup_step"] == preset.affinity_step and meta["benchmark_seed"] == seed

    summary = json.loads((out / "results.json").read_text())
    assert set(summary["record"]["versions"]) == {"python", "torch", "numpy", "ant_core"}
    assert summary["record"]["wall_seconds_this_invocation"] > 0
    entry = summary["configs"]["uw_affinity"]
    assert entry["seeds"] == [0, 1] and set(entry["wall_seconds"]) == {"0", "1"}
    fd = entry["final"]["fd"]
    # the summary's interval equals an independent recomputation from the run files
    runs = {s: json.loads((out / "results" / n / f"seed{s}.json").read_text())["final"]["fd"]
            for n in ("uw_affinity",) for s in (0, 1)}
    base = {s: json.loads((out / "results" / "vanilla" / f"seed{s}.json").read_text())
            ["final"]["fd"] for s in (0, 1)}
    diffs = [runs[s] - base[s] for s in (0, 1)]
    half = report.t_quantile(0.975, 1) * np.std(diffs, ddof=1) / math.sqrt(2)
    assert fd["vs_vanilla"]["mean_diff"] == pytest.approx(np.mean(diffs))
    assert fd["vs_vanilla"]["ci_low"] == pytest.approx(np.mean(diffs) - half)
    assert fd["mean"] == pytest.approx(np.mean(list(runs.values())))
    assert fd["std"] == pytest.approx(np.std(list(runs.values()), ddof=1))
    assert entry["verdict"] == report.verdict(fd["vs_vanilla"])
    md = (out / "results.md").read_text()
    assert "ANT-UW affinity" in md and "Versions:" in md and "Machine:" in md
    assert "## Verdicts" in md


def test_second_invocation_reruns_nothing(smoke_run, capsys, monkeypatch):
    out, _ = smoke_run
    argv = [*SMOKE_ARGS, "--out", str(out)]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(quality.Benchmark, "_train_to", forbidden)
    monkeypatch.setattr(quality.Benchmark, "evaluate_checkpoint", forbidden)
    monkeypatch.setattr(quality.Benchmark, "ensure_affinity", forbidden)
    assert quality.main(argv) == 0
    assert "(4 already done)" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}


def test_interrupted_run_continues_exactly(smoke_run, tmp_path, capsys):
    """A run stopped between evaluation steps (here after step 3 of 4, with no evaluation
    recorded) continues from its newest checkpoint and ends with the uninterrupted numbers."""
    out, _ = smoke_run
    preset = quality.PRESETS["smoke"]
    part = tmp_path / "part"
    quality.check_settings(part, preset)
    bench = quality.Benchmark(preset, part, "cpu", [0], ["vanilla"])
    run = bench.run_dir("vanilla", 0)
    config = bench.train_config("vanilla", 0, run, preset.steps)
    bench._train_to(config, 2, run)
    bench._train_to(config, 3, run)
    assert quality.main(["--preset", "smoke", "--seeds", "1", "--configs", "vanilla",
                         "--out", str(part)]) == 0
    capsys.readouterr()
    full = json.loads((out / "results" / "vanilla" / "seed0.json").read_text())
    resumed = json.loads((part / "results" / "vanilla" / "seed0.json").read_text())
    assert [e["step"] for e in resumed["evaluations"]] == list(preset.eval_steps)
    for a, b in zip(full["evaluations"], resumed["evaluations"]):
        for metric in ("fd", "precision", "recall"):
            assert b[metric] == pytest.approx(a[metric], rel=1e-6, abs=1e-9)


def test_parallel_jobs_match_sequential(smoke_run, tmp_path, capsys):
    """--jobs 2 (worker processes) gives the same numbers as the sequential run."""
    out, _ = smoke_run
    par = tmp_path / "par"
    assert quality.main([*SMOKE_ARGS, "--out", str(par), "--jobs", "2"]) == 0
    assert "2 job(s)" in capsys.readouterr().out
    for name in ("vanilla", "uw_affinity"):
        for seed in (0, 1):
            a, b = _final(out, name, seed), _final(par, name, seed)
            for metric in ("fd", "precision", "recall"):
                assert b[metric] == pytest.approx(a[metric], rel=1e-6, abs=1e-9)
    assert (par / "logs" / "uw_affinity_seed1.log").is_file()


def test_every_config_trains_in_smoke(tmp_path, capsys):
    assert quality.parse_args(["--preset", "smoke"])[1] == list(quality.GRID)  # the default
    assert set(quality.GRID) < set(quality.CONFIGS)  # ablations run when named
    out = tmp_path / "all"
    assert quality.main(["--preset", "smoke", "--seeds", "1", "--out", str(out),
                         "--configs", ",".join(quality.CONFIGS)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["configs"]) == set(quality.CONFIGS)
    for name, (label, overrides) in quality.CONFIGS.items():
        cfg = summary["configs"][name]["train_config"]
        for key, value in overrides.items():
            if key != "method_config":
                assert cfg[key] == value, (name, key)
        if name != "vanilla":
            assert f"{label}: insufficient seeds" in printed  # one seed: no interval, said so


def test_k_override_reaches_the_runs_and_the_workers(tmp_path, capsys):
    """--k changes the ANT configurations' cluster count (also in --jobs worker processes),
    names the default output folder after it, and is refused outside [1, T]."""
    preset, *_, out, _, _, _ = quality.parse_args(["--preset", "smoke", "--k", "3"])
    assert preset.k == 3 and preset.name == "smoke" and str(out).endswith("quality-smoke-k3")
    out = tmp_path / "k3"
    assert quality.main(["--preset", "smoke", "--seeds", "1", "--k", "3", "--jobs", "2",
                         "--configs", "vanilla,uw_log_snr", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["preset"]["k"] == 3
    assert summary["configs"]["uw_log_snr"]["train_config"]["k"] == 3
    with pytest.raises(SystemExit):
        quality.parse_args(["--preset", "smoke", "--k", "0"])
    assert "--k" in capsys.readouterr().err


def test_presets_build_valid_configs(tmp_path):
    for preset in quality.PRESETS.values():
        assert list(preset.eval_steps) == sorted(set(preset.eval_steps))
        assert preset.affinity_step in preset.eval_steps
        bench = quality.Benchmark(preset, tmp_path, "cpu", [0], list(quality.CONFIGS))
        for name in quality.CONFIGS:
            cfg = bench.train_config(name, 0, tmp_path / name, preset.steps,
                                     affinity=tmp_path / "a.npy")
            assert cfg.validate() is cfg and cfg.k == 5 and cfg.steps == preset.steps


def test_bad_arguments_name_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--preset", "huge", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "huge" in err and "smoke" in err
    with pytest.raises(SystemExit) as exc:
        quality.main(["--preset", "smoke", "--configs", "vanilla,uw_magic", "--out",
                      str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--configs" in err and "uw_magic" in err
    with pytest.raises(SystemExit):
        quality.main(["--preset", "smoke", "--seeds", "0", "--out", str(tmp_path)])
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--preset", "smoke", "--device", "tpu", "--out", str(tmp_path)])
    assert "--device" in capsys.readouterr().err


def test_other_settings_in_out_folder_refused(tmp_path):
    out = tmp_path / "q"
    quality.check_settings(out, quality.PRESETS["smoke"])
    quality.check_settings(out, quality.PRESETS["smoke"])  # same settings: fine
    # the description and run defaults (device, threads, jobs) do not change a result
    smoke = quality.PRESETS["smoke"]
    quality.check_settings(out, dataclasses.replace(smoke, description="reworded",
                                                    default_jobs=4, default_threads=3))
    with pytest.raises(SystemExit, match="--out"):
        quality.check_settings(out, dataclasses.replace(smoke, lr=smoke.lr * 2))
    with pytest.raises(SystemExit, match="--out"):
        quality.check_settings(out, quality.PRESETS["cpu"])
    # a folder written before a preset field existed holds that field's default
    saved = json.loads((out / "settings.json").read_text())
    del saved["preset"]["prediction"]
    (out / "settings.json").write_text(json.dumps(saved))
    quality.check_settings(out, smoke)
    with pytest.raises(SystemExit, match="--out"):
        quality.check_settings(out, dataclasses.replace(smoke, prediction="v"))
    # ... and a field since removed from the preset is dropped
    saved["preset"]["notes"] = ""
    (out / "settings.json").write_text(json.dumps(saved))
    quality.check_settings(out, smoke)
    # a configuration added since is recorded; a changed one is refused
    del saved["configs"]["ew_log_snr"]
    (out / "settings.json").write_text(json.dumps(saved))
    quality.check_settings(out, smoke)
    assert "ew_log_snr" in json.loads((out / "settings.json").read_text())["configs"]
    saved["configs"]["uw_log_snr"]["uw_lr"] = 0.5
    (out / "settings.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"configuration\(s\) \['uw_log_snr'\]"):
        quality.check_settings(out, smoke)


def test_preset_training_settings_reach_the_train_config(tmp_path):
    preset = dataclasses.replace(quality.PRESETS["smoke"], prediction="x0", k=4)
    bench = quality.Benchmark(preset, tmp_path, "cpu", [0], ["uw_log_snr_slow"])
    cfg = bench.train_config("uw_log_snr_slow", 0, tmp_path / "run", steps=2)
    assert (cfg.prediction, cfg.uw_lr, cfg.k, cfg.method) == ("x0", 0.0025, 4, "uw")
    # the engine applies to the gradient methods only (the trainer refuses it elsewhere)
    bench = quality.Benchmark(preset, tmp_path, "cpu", [0], ["uw_log_snr", "pcgrad_log_snr"],
                              engine="one-backward")
    assert bench.train_config("pcgrad_log_snr", 0, tmp_path / "p", steps=2).engine == \
        "one-backward"
    assert bench.train_config("uw_log_snr", 0, tmp_path / "u", steps=2).engine == "autograd"


def test_engine_reaches_the_workers(tmp_path):
    """--engine goes to PCGrad / Nash-MTL in --jobs worker processes; it changes how their
    gradients are computed, not what they are."""
    runs = {}
    for engine in ("autograd", "one-backward"):
        out = tmp_path / engine
        assert quality.main(["--preset", "smoke", "--seeds", "1", "--jobs", "2", "--engine",
                             engine, "--configs", "pcgrad_log_snr,nashmtl_log_snr",
                             "--out", str(out)]) == 0
        runs[engine] = json.loads((out / "results.json").read_text())["configs"]
    for name in ("pcgrad_log_snr", "nashmtl_log_snr"):
        assert runs["one-backward"][name]["train_config"]["engine"] == "one-backward"
        assert runs["autograd"][name]["train_config"]["engine"] == "autograd"
        a, b = runs["autograd"][name]["final"]["fd"], runs["one-backward"][name]["final"]["fd"]
        assert b["mean"] == pytest.approx(a["mean"], rel=1e-6)  # methods differ by ~1e-3 here
