"""The `ant` command line."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ant_core import interval_clustering
from ant_core.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ant_core.cli", *args], capture_output=True, text=True)


def test_cluster_default_table(capsys):
    assert main(["cluster"]) == 0
    out = capsys.readouterr().out
    assert "5 intervals of T=1000 timesteps, objective=log_snr" in out
    for s, e in interval_clustering(5).bounds:
        assert f"{s:>6}  {e:>6}" in out


def test_cluster_json_matches_api(capsys):
    assert main(["cluster", "--objective", "snr", "--k", "4", "--T", "500", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = interval_clustering(4, "snr", T=500)
    assert [tuple(b) for b in got["bounds"]] == list(want.bounds)
    assert got["T"] == 500 and got["cost"] == pytest.approx(want.cost)


def test_cluster_from_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    np.save(tmp_path / "x.npy", x)
    A = rng.normal(size=(30, 30))
    np.save(tmp_path / "a.npy", A)
    np.save(tmp_path / "ac.npy", np.linspace(0.999, 0.01, 60))
    assert main(["cluster", "--values", str(tmp_path / "x.npy"), "--k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["objective"] == "sse"
    assert [tuple(b) for b in got["bounds"]] == list(interval_clustering(3, values=x).bounds)
    assert main(["cluster", "--affinity", str(tmp_path / "a.npy"), "--objective",
                 "affinity_medoid", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = interval_clustering(5, "affinity_medoid", affinity=A)
    assert [tuple(b) for b in got["bounds"]] == list(want.bounds)
    assert main(["cluster", "--alphas-cumprod", str(tmp_path / "ac.npy"), "--k", "2"]) == 0
    assert "T=60" in capsys.readouterr().out


def test_cluster_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "clusters.png"
    assert main(["cluster", "--plot", str(path)]) == 0
    assert path.stat().st_size > 1000
    # without a suffix matplotlib writes FILE.png: that is the path reported (it said FILE)
    assert main(["cluster", "--plot", str(tmp_path / "bare")]) == 0
    assert f"plot written to {tmp_path / 'bare.png'}" in capsys.readouterr().out
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["cluster", "--plot", str(tmp_path / "dir.png")])
    assert exc.value.code == 2 and "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["cluster", "--k", "0"], "k must be >= 1"),
    (["cluster", "--k", "2000"], "k must be <= T"),
    (["cluster", "--values", "/nonexistent.npy"], "values file not found"),
    (["cluster", "--min-size", "300"], "infeasible size bounds"),
    (["cluster", "--values", "VALUES", "--schedule", "cosine"], "do not apply to --values"),
    (["cluster", "--schedule", "cosine", "--alphas-cumprod", "VALUES"], "not both"),
    (["cluster", "--plot", "OUT/x.txt"], "matplotlib cannot write '.txt' files"),
])
def test_cluster_errors(args, message, tmp_path):
    if "--plot" in args:
        pytest.importorskip("matplotlib")
    np.save(tmp_path / "v.npy", np.linspace(0.9, 0.1, 20))
    args = [a.replace("VALUES", str(tmp_path / "v.npy")).replace("OUT", str(tmp_path))
            for a in args]
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""  # nothing printed before failing


def test_a_closed_pipe_is_not_a_traceback():
    """`ant cluster --k 300 | head -1`: the reader leaves before the table is written."""
    proc = subprocess.Popen([sys.executable, "-m", "ant_core.cli", "cluster", "--k", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
