"""Gradient task affinity (ant_core.affinity, ant_core.sketch) and `ant affinity`."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from ant_core import checkpoint as ckpt
from ant_core import interval_clustering
from ant_core.affinity import AffinityResult, estimate_affinity, expand_grid, timestep_grid
from ant_core.cli import main
from ant_core.data import ProceduralShapes
from ant_core.diffusion import GaussianDiffusion
from ant_core.models import create_model
from ant_core.sketch import CountSketch
from ant_core.trainer import TrainConfig, train
from ant_core.visualize import has_matplotlib

TINY_DIT = {"patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(image_size=8, **TINY_DIT)
    config.update(overrides)
    model = create_model("dit", **config)
    with torch.no_grad():  # adaLN-zero starts with zero output layers: make every layer active
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def fixed_batches(n=2, size=6, seed=0):
    images = ProceduralShapes(n * size, 8, seed=seed).images
    return [images[i * size:(i + 1) * size] for i in range(n)]


def make_loss(batches, T=50, seed=1):
    """A loss with fixed noise per batch (keyed by the batch's identity), the same for every t."""
    diffusion = GaussianDiffusion("linear", T)
    gen = torch.Generator().manual_seed(seed)
    noise = {id(x): torch.randn(x.shape, generator=gen) for x in batches}

    def loss_fn(model, x0, t):
        eps = noise[id(x0)]
        return (model(diffusion.q_sample(x0, t, eps), t) - eps).pow(2).mean()
    return loss_fn


def brute_force(models, batches, loss_fn, timesteps):
    """The reference: every timestep's full gradient (mean over batches) via .backward(), then
    pairwise cosines, averaged over the models."""
    total = np.zeros((len(timesteps), len(timesteps)))
    for model in models:
        grads = []
        for t in timesteps:
            model.zero_grad()
            for x in batches:
                loss = loss_fn(model, x, torch.full((x.shape[0],), int(t))) / len(batches)
                loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
        for i, gi in enumerate(grads):
            for j, gj in enumerate(grads):
                total[i, j] += float(torch.nn.functional.cosine_similarity(gi, gj, dim=0))
    return total / len(models)


# ----------------------------------------------------------------------------- the sketch


def test_count_sketch_inner_products_are_unbiased():
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(30, 20, generator=gen), torch.randn(700, generator=gen)]
    y = [a + torch.randn(a.shape, generator=gen) for a in x]
    exact = float(sum((a * b).sum() for a, b in zip(x, y)))
    norm = float(sum((a * a).sum() for a in x).sqrt() * sum((b * b).sum() for b in y).sqrt())
    estimates = []
    for seed in range(300):
        cs = CountSketch([a.numel() for a in x], 64, seed=seed, chunk=97)
        estimates.append(float(cs.apply(x) @ cs.apply(y)))
    estimates = np.array(estimates)
    # standard deviation of one estimate <= sqrt(2 / d) |x| |y|
    assert abs(estimates.mean() - exact) < 4 * np.sqrt(2 / 64) * norm / np.sqrt(300)
    assert estimates.std() < 1.2 * np.sqrt(2 / 64) * norm


@pytest.mark.parametrize("vector", ["constant", "ramp", "periodic"])
def test_count_sketch_norm_error_meets_the_bound_on_smooth_vectors(vector):
    """|sketch(x)|² / |x|² has std <= sqrt(2 / d) over seeds. It needs 4-wise independent signs:
    with a linear sign hash, neighbouring coordinates got correlated signs (std 25-57x that)."""
    n, d = 20000, 1024
    i = torch.arange(n, dtype=torch.float64)
    x = {"constant": torch.ones(n, dtype=torch.float64), "ramp": i / n,
         "periodic": torch.sin(i / 7)}[vector]
    ratios = torch.tensor([(CountSketch([n], d, seed=seed).apply([x]).double().norm() ** 2
                            / x.norm() ** 2).item() for seed in range(60)])
    assert abs(ratios.mean().item() - 1) < 4 * math.sqrt(2 / d / 60)
    assert ratios.std().item() < 1.5 * math.sqrt(2 / d)


def test_count_sketch_is_linear_deterministic_and_chunk_independent():
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(50, 7, generator=gen), torch.randn(13, generator=gen)]
    y = [torch.randn(a.shape, generator=gen) for a in x]
    a = CountSketch([t.numel() for t in x], 32, seed=5, chunk=1 << 20)
    b = CountSketch([t.numel() for t in x], 32, seed=5, chunk=11)
    torch.testing.assert_close(a.apply(x), b.apply(x))
    # cached int32 codes and on-the-fly hashing are the same map
    c = CountSketch([t.numel() for t in x], 32, seed=5, chunk=11, cache=False)
    torch.testing.assert_close(a.apply(x, scale=0.5), c.apply(x, scale=0.5), rtol=1e-5,
                               atol=1e-5)
    # against an explicit dense d x P matrix built from the hashes
    dense = torch.zeros(32, sum(t.numel() for t in x))
    offset = 0
    for k, t in enumerate(x):
        bucket, sign = a._hash(k, 0, t.numel(), "cpu")
        dense[bucket, offset + torch.arange(t.numel())] = sign.float()
        offset += t.numel()
    flat = torch.cat([t.reshape(-1) for t in x])
    torch.testing.assert_close(a.apply(x), dense @ flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.apply([u + 2 * v for u, v in zip(x, y)]),
                               a.apply(x) + 2 * a.apply(y), rtol=1e-5, atol=1e-5)
    # a None gradient counts as zeros
    torch.testing.assert_close(a.apply([x[0], None]), a.apply([x[0], torch.zeros(13)]))
    with pytest.raises(ValueError, match="d"):
        CountSketch([3], 0)


# ----------------------------------------------------------------------------- grid maths


def test_timestep_grid_and_constant_expansion():
    lo, hi = timestep_grid(10, 4)
    assert lo.tolist() == [0, 2, 5, 7] and hi.tolist() == [2, 5, 7, 10]
    lo, hi = timestep_grid(7, 7)
    assert (hi - lo).tolist() == [1] * 7
    grid = np.array([[1.0, 0.5, 0.1, 0.0], [0.5, 1.0, 0.4, 0.2],
                     [0.1, 0.4, 1.0, 0.3], [0.0, 0.2, 0.3, 1.0]])
    A = expand_grid(grid, 10, "constant")
    lo, hi = timestep_grid(10, 4)
    for t in range(10):
        for s in range(10):
            bt = next(m for m in range(4) if lo[m] <= t < hi[m])
            bs = next(m for m in range(4) if lo[m] <= s < hi[m])
            assert A[t, s] == grid[bt, bs]
    L = expand_grid(grid, 10, "linear", centers=np.array([0, 3, 6, 9]))
    np.testing.assert_allclose(L, L.T)
    assert np.all(np.diag(L) == 1.0)
    np.testing.assert_allclose(L[np.ix_([0, 3, 6, 9], [0, 3, 6, 9])], grid)
    np.testing.assert_allclose(L[0, 4], grid[0, 1] + (grid[0, 2] - grid[0, 1]) / 3)


# ----------------------------------------------------------------------------- estimator


def test_exact_mode_equals_brute_force_over_batches_and_checkpoints():
    models = [small_model(0), small_model(1)]
    batches = fixed_batches(2)
    loss_fn = make_loss(batches)
    T, M = 50, 5
    result = estimate_affinity([copy.deepcopy(m) for m in models], batches, loss_fn=loss_fn,
                               T=T, M=M, exact=True, batches=2)
    lo, hi = timestep_grid(T, M)
    centers = (lo + hi - 1) // 2
    assert result.timesteps.tolist() == centers.tolist()
    reference = brute_force(models, batches, loss_fn, centers)
    np.testing.assert_allclose(result.grid, reference, atol=1e-5)
    assert result.matrix.shape == (T, T)
    assert result.metadata["num_checkpoints"] == 2 and result.metadata["exact"]


def test_state_dicts_with_a_template_model_match_modules():
    models = [small_model(0), small_model(1)]
    batches = fixed_batches(1)
    loss_fn = make_loss(batches)
    a = estimate_affinity(models, batches, loss_fn=loss_fn, T=50, M=4, exact=True)
    b = estimate_affinity([m.state_dict() for m in models], batches, loss_fn=loss_fn, T=50,
                          M=4, exact=True, model=small_model(7))
    np.testing.assert_allclose(a.grid, b.grid, atol=1e-6)


def test_sketched_cosines_are_close_to_exact_and_symmetric():
    model = small_model(0, hidden_size=48, depth=2)
    batches = fixed_batches(1, size=8)
    loss_fn = make_loss(batches)
    exact = estimate_affinity(model, batches, loss_fn=loss_fn, T=50, M=8, exact=True)
    sketched = estimate_affinity(model, batches, loss_fn=loss_fn, T=50, M=8, d=4096, seed=3)
    assert np.abs(sketched.grid - exact.grid).max() < 0.05
    assert np.abs(exact.grid).min() < 0.9  # the test would be vacuous with all cosines ~ 1
    for r in (exact, sketched):
        for A in (r.grid, r.matrix):
            np.testing.assert_array_equal(A, A.T)
            np.testing.assert_array_equal(np.diag(A), 1.0)
            assert np.all(np.abs(A) <= 1.0)


def test_random_timesteps_with_one_timestep_per_bin_equal_the_centers():
    model = small_model(0)
    batches = fixed_batches(2)
    loss_fn = make_loss(batches, T=6)
    a = estimate_affinity(model, batches, loss_fn=loss_fn, T=6, M=6, exact=True, batches=2)
    b = estimate_affinity(model, batches, loss_fn=loss_fn, T=6, M=6, exact=True, batches=2,
                          timesteps="random", seed=4)
    np.testing.assert_allclose(a.grid, b.grid, atol=1e-6)
    assert b.timesteps.tolist() == [-1] * 6


@pytest.mark.parametrize("kind", ["dit", "unet", "dit-conditional"])
def test_timesteps_per_pass_does_not_change_the_result(kind):
    """Several timesteps per forward/backward (split by the one-backward engine) give the
    one-timestep-per-backward result: exact and sketched, random timesteps, uneven chunks
    (M = 7 in chunks of 3), two batches, two checkpoints, labels for a conditional model."""
    diffusion = GaussianDiffusion("cosine", 40)
    if kind == "unet":
        torch.manual_seed(0)
        models = [create_model("unet", image_size=8, base_channels=8, channel_mult=(1, 2),
                               num_res_blocks=1, attention_resolutions=(4,), num_groups=4,
                               num_heads=2)
                  for _ in range(2)]
        data = fixed_batches(2)
    else:
        extra = {"num_classes": 3} if kind == "dit-conditional" else {}
        models = [small_model(0, **extra), small_model(1, **extra)]
        labels = torch.tensor([0, 1, 2, 0, 1, 2])
        data = [(x, labels) for x in fixed_batches(2)] if extra else fixed_batches(2)
    results = {}
    for per_pass in (1, 3, 7):
        for exact in (True, False):
            results[per_pass, exact] = estimate_affinity(
                [copy.deepcopy(m) for m in models], data, diffusion=diffusion, M=7,
                exact=exact, d=512, batches=2, timesteps="random", seed=5,
                timesteps_per_pass=per_pass)
    assert results[3, True].metadata["timesteps_per_pass"] == 3
    assert results[7, True].metadata["timesteps_per_pass"] == 7
    assert np.abs(results[1, True].grid).min() < 0.95  # not vacuous
    for exact in (True, False):
        for per_pass in (3, 7):
            np.testing.assert_allclose(results[per_pass, exact].grid, results[1, exact].grid,
                                       atol=2e-5)


def test_default_diffusion_loss_on_a_dataset():
    diffusion = GaussianDiffusion("cosine", 40, prediction="v")
    dataset = ProceduralShapes(16, 8, seed=0)
    r = estimate_affinity(small_model(0), dataset, diffusion=diffusion, M=4, d=256,
                          batches=2, batch_size=4)
    assert r.matrix.shape == (40, 40) and r.metadata["loss"] == "mse(v)"
    assert r.metadata["schedule"] == "cosine" and r.metadata["batch_size"] == 4
    assert np.isfinite(r.matrix).all()


def test_a_tensor_with_a_batch_size_is_a_dataset_and_the_models_keep_their_mode():
    """A bare (N, C, H, W) tensor was one batch whatever batch_size said (without batch_size
    it still is), and the caller's model was left in eval mode (dropout silently off for the
    training that follows)."""
    diffusion = GaussianDiffusion("cosine", 40)
    images = ProceduralShapes(16, 8, seed=0).images
    model = small_model(0).train()
    r = estimate_affinity(model, images, diffusion=diffusion, M=4, d=256, batches=2,
                          batch_size=4)
    assert r.metadata["batch_size"] == 4 and np.isfinite(r.matrix).all()
    assert model.training
    whole = estimate_affinity(model, images, diffusion=diffusion, M=4, d=256)
    assert whole.metadata["batch_size"] == 16
    with pytest.raises(ValueError, match="a tensor without batch_size is one batch"):
        estimate_affinity(model, images, diffusion=diffusion, M=4, d=256, batches=2)
    frozen = small_model(1).eval()
    estimate_affinity(frozen, images, diffusion=diffusion, M=4, d=256, batch_size=4)
    assert not frozen.training
    with pytest.raises(ValueError, match="batch_size=32 exceeds the dataset's 16 images"):
        estimate_affinity(model, images, diffusion=diffusion, M=4, batch_size=32)
    assert model.training  # also after an error
    # each submodule keeps its own mode (a frozen norm layer in a training model)
    model.final_norm.train(False)
    estimate_affinity(model, images, diffusion=diffusion, M=4, d=256, batch_size=4)
    assert model.training and not model.final_norm.training
    # an error half-way through leaves no engine hooks on the caller's model
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ValueError, match="not finite"):
        estimate_affinity(model, images * float("nan"), diffusion=diffusion, M=4, d=256,
                          batch_size=4, timesteps_per_pass=2)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny DiT trained briefly on T=100 (two checkpoints)."""
    out = tmp_path_factory.mktemp("affinity") / "run"
    cfg = TrainConfig(data="shapes", num_images=256, image_size=8, model="dit",
                      model_config={"patch_size": 2, "hidden_size": 32, "depth": 2,
                                    "num_heads": 2},
                      T=100, k=1, method="vanilla", steps=150, save_every=75, batch_size=16,
                      lr=3e-3, out=str(out), num_samples=4, sample_steps=2, progress=False,
                      log_every=50)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped one_thread
    try:
        train(cfg)
    finally:
        torch.set_num_threads(before)
    return out


def test_affinity_decays_with_the_timestep_gap(trained_run):
    """The paper's observation O1 on a briefly trained model."""
    dataset = ProceduralShapes(64, 8, seed=1)
    r = estimate_affinity(trained_run, dataset, M=10, exact=True, batches=2, batch_size=16)
    assert r.metadata["num_checkpoints"] == 2 and r.metadata["T"] == 100
    G = r.grid
    gap = np.abs(np.subtract.outer(np.arange(10), np.arange(10)))
    near, far = G[(gap >= 1) & (gap <= 2)].mean(), G[gap >= 6].mean()
    assert near > far + 0.3, (near, far)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_errors_naming_the_argument(tmp_path):
    model, batches = small_model(0), fixed_batches(1)
    loss_fn = make_loss(batches)
    kw = dict(loss_fn=loss_fn, T=50)
    with pytest.raises(ValueError, match="M must be <= T"):
        estimate_affinity(model, batches, M=51, **kw)
    with pytest.raises(ValueError, match="M must be"):
        estimate_affinity(model, batches, M=0, **kw)
    with pytest.raises(ValueError, match="d must be"):
        estimate_affinity(model, batches, M=4, d=0, **kw)
    with pytest.raises(ValueError, match="data"):
        estimate_affinity(model, [], M=4, **kw)
    with pytest.raises(ValueError, match="data"):
        estimate_affinity(model, torch.utils.data.TensorDataset(torch.zeros(0, 3, 8, 8)), M=4,
                          **kw)
    with pytest.raises(ValueError, match="batches"):
        estimate_affinity(model, batches, M=4, batches=3, **kw)
    frozen = small_model(0).requires_grad_(False)
    with pytest.raises(ValueError, match="models\\[0\\].*requiring grad"):
        estimate_affinity(frozen, batches, M=4, **kw)
    with pytest.raises(ValueError, match="checkpoints"):
        estimate_affinity(str(tmp_path / "missing.pt"), batches, M=4, **kw)
    with pytest.raises(ValueError, match="checkpoints"):
        estimate_affinity(str(tmp_path), batches, M=4, **kw)  # a folder without checkpoints
    with pytest.raises(ValueError, match="T"):
        estimate_affinity(model, batches, loss_fn=loss_fn, M=4)
    with pytest.raises(ValueError, match="timesteps"):
        estimate_affinity(model, batches, M=4, timesteps="middle", **kw)
    with pytest.raises(ValueError, match="timesteps_per_pass"):
        estimate_affinity(model, batches, M=4, timesteps_per_pass=0, **kw)
    with pytest.raises(ValueError, match="timesteps_per_pass > 1 needs the default loss"):
        estimate_affinity(model, batches, M=4, timesteps_per_pass=2, **kw)
    auto = estimate_affinity(model, batches, M=4, diffusion=GaussianDiffusion("linear", 50))
    assert auto.metadata["timesteps_per_pass"] == 1  # on a CPU (see the module docstring)
    diffusion = GaussianDiffusion("linear", 50)
    with pytest.raises(ValueError, match="T=40 does not match the diffusion's T=50"):
        estimate_affinity(model, batches, M=4, diffusion=diffusion, T=40)
    with pytest.raises(ValueError, match="interpolation"):
        estimate_affinity(model, batches, M=4, interpolation="cubic", **kw)
    with pytest.raises(ValueError, match="seed"):
        estimate_affinity(model, batches, M=4, seed=-1, **kw)
    broken = small_model(0)
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    for bad_model, data in ((broken, batches), (model, [x * 1e30 for x in batches])):
        with pytest.raises(ValueError, match=r"models\[0\]: the gradients are not finite"):
            estimate_affinity(bad_model, data, M=4, diffusion=GaussianDiffusion("linear", 50))
    with pytest.raises(ValueError, match="grid must be a square"):
        expand_grid(np.zeros((3, 4)), 10)


def test_checkpoints_of_different_runs_are_refused(trained_run, tmp_path):
    """Averaging gradients of another diffusion (T, schedule) or model is not one affinity."""
    other = tmp_path / "other"
    cfg = TrainConfig.from_dict({**ckpt.load_checkpoint(ckpt.latest_checkpoint(
        trained_run / "checkpoints"))["config"], "T": 50, "steps": 2, "out": str(other)})
    train(cfg)
    with pytest.raises(ValueError, match=r"other.*differs from .* in \['T'\]"):
        estimate_affinity([str(trained_run), str(other)], ProceduralShapes(8, 8, seed=1), M=4)


# ----------------------------------------------------------------------------- the CLI


def test_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(data="shapes", num_images=24, image_size=8, model="dit",
                      model_config=TINY_DIT, T=20, k=3, steps=4, save_every=2, batch_size=6,
                      out=str(run), num_samples=4, sample_steps=2, progress=False))
    out = tmp_path / "aff" / "A.npy"
    args = ["affinity", str(run), "--M", "5", "--d", "512", "--batches", "2", "--batch-size",
            "6", "--out", str(out), "--k", "3", "--no-progress", "--threads", "1",
            "--timesteps-per-pass", "3"]
    png = tmp_path / "A.png"
    if has_matplotlib():
        args += ["--plot", str(png)]
    assert main(args) == 0
    A = np.load(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert A.shape == (20, 20) and meta["T"] == 20 and meta["M"] == 5 and meta["d"] == 512
    assert meta["num_checkpoints"] == 2 and meta["schedule"] == "linear" and meta["ema"]
    assert len(meta["grid_timesteps"]) == 5 and meta["timesteps_per_pass"] == 3
    np.testing.assert_array_equal(A, A.T)
    if has_matplotlib():
        assert png.stat().st_size > 0
    clusters = interval_clustering(3, "affinity", affinity=A)
    assert clusters.k == 3 and clusters.T == 20
    # the matrix drives an affinity-clustered run
    run2 = tmp_path / "run2"
    assert main(["train", "--data", "shapes", "--num-images", "24", "--image-size", "8",
                 "--model", "dit", "--model-config", json.dumps(TINY_DIT), "--T", "20",
                 "--k", "3", "--batch-size", "6", "--steps", "2", "--num-samples", "4",
                 "--sample-steps", "2", "--no-progress", "--threads", "1", "--out", str(run2),
                 "--objective", "affinity", "--affinity", str(out)]) == 0
    saved = json.loads((run2 / "clusters.json").read_text())
    assert [tuple(b) for b in saved["bounds"]] == list(clusters.bounds)
    # a single checkpoint file, exact mode, default output next to the run
    ckpt_file = sorted((run / "checkpoints").glob("ckpt_*.pt"))[0]
    assert main(["affinity", str(ckpt_file), "--M", "20", "--exact", "--batches", "1",
                 "--batch-size", "4", "--no-progress"]) == 0
    assert np.load(run / "affinity.npy").shape == (20, 20)
    assert main(["affinity", str(run), "--last", "1", "--M", "4", "--d", "64", "--batches",
                 "1", "--batch-size", "4", "--no-progress", "--no-ema"]) == 0
    meta = json.loads((run / "affinity.json").read_text())
    assert meta["num_checkpoints"] == 1 and not meta["ema"]
    assert meta["checkpoints"][0].endswith("ckpt_00000004.pt")
    with pytest.raises(SystemExit) as exc:
        main(["affinity", str(tmp_path / "nope"), "--no-progress"])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list((tmp_path / "aff").glob(".*.tmp"))  # the saves left no temporaries
    # plot arguments are checked before the estimate, which then writes nothing
    late = tmp_path / "late.npy"
    with pytest.raises(SystemExit) as exc:
        main(["affinity", str(run), "--M", "4", "--out", str(late), "--plot", "x.png",
              "--k", "0", "--no-progress"])
    assert exc.value.code == 2 and "--k must be >= 1" in capsys.readouterr().err
    assert not late.exists()
    for args, message in (([str(run), "--plot", str(tmp_path / "x.png"), "--k", "999"],
                           "--k must be <= T=20"),  # was clipped to T silently
                          ([str(ckpt_file)] * 2, "given more than once"),  # averaged twice
                          ([str(run), "--out", str(tmp_path)], "is a folder"),
                          # the matrix was written, then its sidecar failed
                          ([str(run), "--out", str(tmp_path / "side.npy")], "side.json is a folder")):
        (tmp_path / "side.json").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exc:
            main(["affinity", *args, "--M", "4", "--no-progress"])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not late.exists() and not (tmp_path / "x.png").exists()
    assert not (tmp_path / "side.npy").exists()
    # the default grid fits a run with T < 100
    assert main(["affinity", str(run), "--last", "1", "--d", "64", "--batches", "1",
                 "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "d.npy")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["M"] == 20


def test_checkpoints_use_ema_weights_and_load_lazily(trained_run):
    files = ckpt.list_checkpoints(trained_run / "checkpoints")
    assert len(files) == 2
    batches = fixed_batches(1, size=8)
    loss_fn = make_loss(batches, T=100)
    for ema in (True, False):
        by_path = estimate_affinity([str(f) for f in files], batches, loss_fn=loss_fn, M=6,
                                    exact=True, ema=ema)
        modules = []
        for f in files:
            state = ckpt.load_checkpoint(f)
            m = create_model(state["model_kind"], **state["model_config"])
            m.load_state_dict(state["ema"]["model"] if ema else state["model"])
            modules.append(m)
        by_module = estimate_affinity(modules, batches, loss_fn=loss_fn, T=100, M=6,
                                      exact=True)
        np.testing.assert_allclose(by_path.grid, by_module.grid, atol=1e-6)
        assert by_path.metadata["T"] == 100 and by_path.metadata["ema"] == ema
        assert by_path.metadata["checkpoints"] == [str(f) for f in files]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_packs_timesteps_on_a_gpu():
    model = small_model(0).cuda()
    diffusion = GaussianDiffusion("linear", 50)
    data = fixed_batches(2)
    packed = estimate_affinity(model, data, diffusion=diffusion, M=10, exact=True, batches=2)
    single = estimate_affinity(model, data, diffusion=diffusion, M=10, exact=True, batches=2,
                               timesteps_per_pass=1)
    assert packed.metadata["timesteps_per_pass"] == 10
    np.testing.assert_allclose(packed.grid, single.grid, atol=2e-5)


def test_class_conditional_models_get_labels():
    torch.manual_seed(0)
    model = create_model("dit", image_size=8, num_classes=3, **TINY_DIT)
    x = fixed_batches(1)[0]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []

    def loss_fn(m, x0, t, labels):
        seen.append(labels)
        return (m(x0, t, labels) - x0).pow(2).mean()
    estimate_affinity(model, [(x, y)], loss_fn=loss_fn, T=10, M=2, d=64)
    assert len(seen) == 2 and all(torch.equal(s, y) for s in seen)


def test_linear_interpolation_and_saving(tmp_path):
    model, batches = small_model(0), fixed_batches(1)
    r = estimate_affinity(model, batches, loss_fn=make_loss(batches, T=30), T=30, M=5,
                          exact=True, d=0, interpolation="linear")
    assert r.metadata["d"] is None  # d is unused when exact (d=0 is not refused then)
    centers = r.timesteps
    np.testing.assert_allclose(r.matrix[np.ix_(centers, centers)], r.grid, atol=1e-12)
    np.testing.assert_allclose(r.matrix, r.matrix.T)
    npy, side = r.save(tmp_path / "sub" / "aff")
    assert npy.name == "aff.npy" and side.name == "aff.json"
    np.testing.assert_array_equal(np.load(npy), r.matrix)
    meta = json.loads(side.read_text())
    assert meta["interpolation"] == "linear" and meta["grid_timesteps"] == centers.tolist()
    back = AffinityResult.load(npy)
    for name in ("matrix", "grid", "timesteps"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    assert back.metadata == json.loads(json.dumps(r.metadata))
    with pytest.raises(ValueError, match="not found"):
        AffinityResult.load(tmp_path / "sub" / "other.npy")
    np.save(tmp_path / "bare.npy", r.matrix)
    with pytest.raises(ValueError, match="not found"):       # no sidecar
        AffinityResult.load(tmp_path / "bare.npy")
    (tmp_path / "bare.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an affinity sidecar"):
        AffinityResult.load(tmp_path / "bare")          # named as for save: bare.npy
    # a sidecar from before the grid was saved
    (tmp_path / "bare.json").write_text(json.dumps({"grid_timesteps": centers.tolist()}))
    old = AffinityResult.load(tmp_path / "bare.npy")
    assert old.grid is None and old.timesteps.tolist() == centers.tolist()
    r.metadata["numpy"] = np.int64(3)  # serialised as a number
    r.save(tmp_path / "m.npy")
    assert json.loads((tmp_path / "m.json").read_text())["numpy"] == 3
    with pytest.raises(ValueError, match="give the .npy name"):
        r.save(tmp_path / "m.json")  # wrote m.json.npy and m.json.json
    r.metadata["bad"] = float("nan")
    with pytest.raises(ValueError, match="metadata"):
        r.save(tmp_path / "n.npy")
    assert not (tmp_path / "n.npy").exists()  # no matrix without its sidecar
    if has_matplotlib():
        from ant_core.visualize import plot_affinity
        from ant_core.schedules import get_schedule

        clusters = interval_clustering(3, "affinity", affinity=r.matrix)
        png = plot_affinity(r.matrix, tmp_path / "a.png", clusters=clusters,
                            log_snr=get_schedule("linear", 30).log_snr)
        assert png.stat().st_size > 0
        with pytest.raises(ValueError, match="log_snr"):
            plot_affinity(r.matrix, tmp_path / "b.png", log_snr=np.zeros(5))
        with pytest.raises(ValueError, match="square"):
            plot_affinity(r.matrix[:, :5], tmp_path / "c.png")
        with pytest.raises(ValueError, match="clusters cover T=30"):
            plot_affinity(r.matrix[:10, :10], tmp_path / "d.png", clusters=clusters)
        from ant_core.visualize import plot_clusters
        with pytest.raises(ValueError, match="log_snr"):
            plot_clusters(clusters, np.zeros(5), tmp_path / "e.png")
        assert plot_clusters(clusters, None, tmp_path / "new" / "f.png").stat().st_size > 0


def test_count_sketch_checks_its_arguments():
    """chunk=-1 sketched everything to zeros; 10.7 elements became 10; seeds 1.2 and 1.5 were
    the same sketch."""
    for kwargs, error, name in (({"chunk": -1}, ValueError, "chunk"),
                                ({"chunk": 0}, ValueError, "chunk"),
                                ({"numels": [10.7]}, TypeError, r"numels\[0\]"),
                                ({"numels": [4, -1]}, ValueError, r"numels\[1\]"),
                                ({"seed": 1.5}, TypeError, "seed"),
                                ({"seed": -1}, ValueError, "seed")):
        args = {"numels": [10, 12], "d": 8, **kwargs}
        with pytest.raises(error, match=name):
            CountSketch(**args)
    for kwargs, error, name in (({"cache": "no"}, TypeError, "cache"),
                                ({"cache": 0.0}, TypeError, "cache"),
                                ({"numels": 3}, TypeError, "numels")):
        with pytest.raises(error, match=name):
            CountSketch(**{"numels": [4], "d": 3, **kwargs})
    cs, x = CountSketch([4], d=3), [torch.ones(4)]
    # a wrong out was broadcast into (zeros(2, 3): the sketch added to both rows) or truncated
    for out in (torch.zeros(2, 3), torch.zeros(1), torch.zeros(3, dtype=torch.long), [0.0] * 3):
        for cache in (True, False):
            with pytest.raises(ValueError, match=r"out must be a floating tensor of shape \(3,\)"):
                CountSketch([4], d=3, cache=cache).apply(x, out=out)
    for scale, error in ((float("nan"), ValueError), ("2", TypeError)):
        with pytest.raises(error, match="scale"):
            cs.apply(x, scale=scale)
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a tensor"):
        cs.apply([np.ones(4)])
    with pytest.raises(ValueError, match=r"tensors\[0\] has 5 elements"):
        cs.apply([torch.ones(5)])


@pytest.mark.parametrize("cache", [True, False])
def test_count_sketch_sums_in_at_least_float32(cache):
    """A half-precision out was the accumulator (its sums stopped growing: 0.9 relative error);
    a float64 out is exact to double on both paths."""
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1
    cs = CountSketch([g.numel()], d=4, seed=3, cache=cache)
    bucket, sign = cs._hash(0, 0, g.numel(), "cpu")
    exact = torch.zeros(4, dtype=torch.float64).index_add_(0, bucket, g * sign)
    torch.testing.assert_close(cs.apply([g], out=torch.zeros(4, dtype=torch.float64)), exact,
                               rtol=1e-9, atol=0)
    for dtype in (torch.float16, torch.bfloat16):
        got = cs.apply([g.to(dtype)], out=torch.zeros(4, dtype=dtype)).double()
        rounded = torch.zeros(4, dtype=torch.float64).index_add_(0, bucket, g.to(dtype).double()
                                                                  * sign)
        torch.testing.assert_close(got, rounded.to(dtype).double(), rtol=1e-2, atol=0.5)


def test_a_batch_larger_than_the_dataset_is_refused():
    """--batch-size 1000 on 64 images printed "1 x 1000 images" for 64 images repeated."""
    with pytest.raises(ValueError, match="batch_size=8 exceeds the dataset's 4 images"):
        estimate_affinity(small_model(0), ProceduralShapes(4, 8),
                          diffusion=GaussianDiffusion("linear", 10), M=2, d=16, batches=1,
                          batch_size=8)
