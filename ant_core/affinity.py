"""Gradient task affinity between denoising tasks (ANT's task affinity score, TAS).

TAS(t1, t2) is the cosine similarity of the loss gradients (w.r.t. the model parameters) at two
timesteps. :func:`estimate_affinity` estimates it on a grid of M timesteps and returns the T x T
matrix; memory is O(M d) instead of the reference's O(T P):

* **Grid.** The T timesteps are split into M bins ``[floor(m T / M), floor((m + 1) T / M))``
  (width T/M; M = T gives one timestep per bin). ``timesteps="center"`` evaluates each bin at
  its middle timestep ``(lo + hi - 1) // 2``; ``timesteps="random"`` draws, per batch, one t
  uniformly inside each bin (the estimate is then the affinity of the bins' average tasks).
* **Sketch.** Each timestep's gradient is compressed on the device as soon as it is produced
  by a fixed CountSketch of dimension d (:class:`ant_core.sketch.CountSketch`, unbiased inner
  products, applied per parameter tensor in chunks); the M sketches form one M x d matrix and
  the cosines come from its Gram matrix. Memory: the M x d sketches, one gradient, and one
  int32 hash code per parameter (the sketch's cache). ``exact=True`` keeps the full M x P
  gradients instead (small models, tests).
* **Batching over timesteps.** With the default loss, ``timesteps_per_pass`` grid timesteps share
  one forward and one backward: the batch is repeated once per timestep and the per-timestep
  gradients are split from that single backward by
  :class:`ant_core.mtl.OneBackwardEngine` (each timestep is a task; samples must not interact,
  as in every diffusion network — BatchNorm in eval mode is fine). ``"auto"``: on a GPU, up to
  256 samples and 1 GiB of per-timestep gradients per pass (small batches leave a GPU idle); on
  a CPU one timestep per pass, as packing bought 0.94–1.11x there for 2–13x the memory
  (``benchmarks/bench_affinity.py``). 1 runs one backward per timestep (the only mode for a
  custom ``loss_fn``, which returns one scalar).
* **Averaging.** Per checkpoint, the gradient of each timestep is averaged over the batches
  (the same images and the same noise for every timestep) and the cosine is taken of these
  averaged gradients; the cosine matrices are then averaged over the checkpoints. Averaging the
  gradient before the cosine estimates the cosine between the gradients of the *expected*
  losses; a mean of per-batch cosines is biased towards 0 by minibatch noise, by an amount that
  depends on the batch size. Checkpoints are averaged as cosines, as in the paper, because the
  gradient scale changes by orders of magnitude over training.
* **Interpolation.** The M x M grid matrix is expanded to T x T piecewise-constant over the bins
  (``interpolation="constant"``, the default: pairs in one bin get 1) or bilinearly between the
  bins' timesteps (``"linear"``, the diagonal set to 1). Both keep the matrix symmetric.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checks import check_int
from .atomic import atomic_write, prepare_outputs
from .checkpoint import list_checkpoints, load_checkpoint, load_model
from .sketch import CountSketch
from .train_config import require_available

__all__ = ["estimate_affinity", "AffinityResult", "timestep_grid",
           "diffusion_loss", "expand_grid"]


def timestep_grid(T: int, M: int):
    """(lo, hi) int64 arrays of the M bins ``[floor(m T / M), floor((m + 1) T / M))``."""
    T = check_int("T", T, 1)
    M = check_int("M", M, 1)
    if M > T:
        raise ValueError(f"M must be <= T={T}, got M={M}")
    edges = (np.arange(M + 1, dtype=np.int64) * T) // M
    return edges[:-1], edges[1:]


INTERPOLATIONS = ("constant", "linear")


def expand_grid(grid: np.ndarray, T: int, interpolation: str = "constant",
                centers=None) -> np.ndarray:
    """The T x T matrix of an M x M grid matrix (see the module docstring)."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"grid must be a square (M, M) matrix, got shape {grid.shape}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    M = grid.shape[0]
    lo, hi = timestep_grid(T, M)
    if interpolation == "constant":
        bin_of = np.repeat(np.arange(M), hi - lo)
        return grid[np.ix_(bin_of, bin_of)].copy()
    centers = (lo + hi - 1) / 2.0 if centers is None else np.asarray(centers, dtype=np.float64)
    W = np.zeros((T, M))
    for m in range(M):  # column m: the hat function of grid point m
        e = np.zeros(M)
        e[m] = 1.0
        W[:, m] = np.interp(np.arange(T), centers, e)
    A = W @ grid @ W.T
    A = (A + A.T) / 2
    np.fill_diagonal(A, 1.0)
    return A


_SETUP_KEYS = ("T", "schedule", "prediction", "model", "image_size", "class_conditional")


def _check_same_setup(files, first_state):
    """Every checkpoint must come from the same diffusion and model as the first."""
    for path in files[1:]:
        state = load_checkpoint(path, mmap=True)
        differ = [k for k in _SETUP_KEYS if state["config"].get(k) != first_state["config"].get(k)]
        if state["model_config"] != first_state["model_config"]:
            differ.append("model_config")
        if differ:
            raise ValueError(f"checkpoint {path} differs from {files[0]} in {differ}: its "
                             "gradients are not of the same tasks and model")


def diffusion_loss(diffusion, reduction: str = "mean"):
    """The default loss: mean squared error of the diffusion's prediction target (eps / v / x0)
    with the noise given; ``loss(model, x0, t, y, noise)`` (a scalar, or per-sample (B,) with
    ``reduction="none"``)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    def loss(model, x0, t, y, noise):
        x_t = diffusion.q_sample(x0, t, noise)
        out = model(x_t, t) if y is None else model(x_t, t, y)
        err = (out.float() - diffusion.target(x0, noise, t).float()).pow(2)
        return err.mean() if reduction == "mean" else err.flatten(1).mean(1)
    return loss


def _checkpoint_files(source) -> list:
    path = Path(source)
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise ValueError(f"checkpoints: no checkpoint found in {path} or "
                             f"{path / 'checkpoints'}")
        return found
    if not path.is_file():
        raise ValueError(f"checkpoints: {path} does not exist")
    return [path]


def _npy_path(path) -> Path:
    """``path`` as the .npy name AffinityResult saves to (".npy" appended where missing)."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"path {str(path)!r}: give the .npy name; the .json sidecar is "
                         "written next to it")
    return path if path.suffix == ".npy" else path.with_name(path.name + ".npy")


def output_paths(path, name: str = "path") -> tuple:
    """The (.npy, .json) files :meth:`AffinityResult.save` writes for ``path``, checked before
    anything is written (or estimated): neither is a folder, and their folder can be made."""
    npy = _npy_path(path)
    return prepare_outputs(name, path, npy, npy.with_suffix(".json"))[1:]


@dataclass
class AffinityResult:
    """``matrix`` (T x T), ``grid`` (M x M), the bins' ``timesteps`` (M; -1 for "random") and
    ``metadata`` (JSON-able)."""

    matrix: np.ndarray
    grid: np.ndarray
    timesteps: np.ndarray
    metadata: dict = field(default_factory=dict)

    def save(self, path) -> tuple:
        """Write ``path`` (.npy, the T x T matrix) and its JSON sidecar ``path.json``."""
        path, side = output_paths(path)
        meta = {**self.metadata, "grid_timesteps": [int(t) for t in self.timesteps],
                "grid": np.asarray(self.grid, dtype=np.float64).tolist()}

        def plain(value):  # numpy numbers and arrays in user metadata
            if hasattr(value, "tolist"):
                return value.tolist()
            raise TypeError(f"metadata: {type(value).__name__} is not JSON-serialisable")

        try:  # before writing anything: no matrix without its sidecar
            text = json.dumps(meta, indent=2, default=plain, allow_nan=False)
        except ValueError:
            raise ValueError("metadata: NaN or infinite values are not valid JSON") from None
        # atomic: the matrix feeds training runs; a killed write must not leave half a file
        atomic_write(path, lambda f: np.save(f, self.matrix.astype(np.float64)))
        atomic_write(side, lambda f: f.write(text.encode()))
        return path, side

    @classmethod
    def load(cls, path) -> "AffinityResult":
        """The result :meth:`save` wrote to ``path`` (named as for save) and its sidecar;
        ``grid`` is None for files saved before the sidecar held it."""
        path = _npy_path(path)
        side = path.with_suffix(".json")
        for name in (path, side):
            if not name.is_file():
                raise ValueError(f"path: {name} not found (AffinityResult.load reads the .npy "
                                 "and its .json sidecar that save() wrote)")
        try:
            meta = json.loads(side.read_text())
            grid, timesteps = meta.pop("grid", None), meta.pop("grid_timesteps")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"path: {side} is not an affinity sidecar written by "
                             "AffinityResult.save") from None
        return cls(np.load(path, allow_pickle=False),
                   None if grid is None else np.asarray(grid, dtype=np.float64),
                   np.asarray(timesteps, dtype=np.int64), meta)


def _batches(data, batches, batch_size, seed, device):
    from .data import make_loader

    if isinstance(data, torch.Tensor) and batch_size is None:
        if batches > 1:
            raise ValueError(f"data: a tensor without batch_size is one batch; give batch_size "
                             f"to draw batches={batches} from its images")
        data = [data]  # one batch: all of it
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(
            data, (list, tuple)):  # a dataset (a tensor with a batch_size too)
        batch_size = 16 if batch_size is None else batch_size
        if len(data) == 0:
            raise ValueError("data: the dataset is empty")
        if check_int("batch_size", batch_size, 1) > len(data):
            raise ValueError(f"batch_size={batch_size} exceeds the dataset's {len(data)} images "
                             "(a batch would repeat them)")
        data = make_loader(data, batch_size, seed=seed)
    out = []
    for item in data:
        if len(out) == batches:
            break
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
            raise ValueError("data: every batch must be a non-empty tensor or (x, y) pair")
        out.append((x.to(device), None if y is None else torch.as_tensor(y).to(device)))
    if not out:
        raise ValueError("data: the loader yielded no batch")
    if len(out) < batches:
        raise ValueError(f"data: batches={batches} requested, the loader yielded {len(out)}")
    return out


def _trainable(model, i):
    if not isinstance(model, nn.Module):
        raise TypeError(f"models[{i}] must be an nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"models[{i}]: the model has no parameters requiring grad")
    return params


def estimate_affinity(models, data, *, diffusion=None, loss_fn=None, T: int | None = None,
                      M: int | None = None, d: int = 4096, exact: bool = False,
                      batches: int = 1, batch_size: int | None = None,
                      timesteps: str = "center",
                      interpolation: str = "constant", seed: int = 0, ema: bool = True,
                      timesteps_per_pass="auto", model=None, device=None,
                      progress: bool = False) -> AffinityResult:
    """Estimate the T x T gradient task affinity (see the module docstring for the maths).

    Args:
        models: an ``nn.Module``, a checkpoint file / run folder (all its checkpoints), or a list
            of modules, paths or state dicts (state dicts are loaded into ``model``).
        data: a dataset (``len`` + indexing; batched with ``make_loader``, ``batch_size``
            images per batch, default 16), a list / other iterable of batches (tensors or
            ``(x, y)`` pairs), or an (N, C, H, W) tensor: one batch, or a dataset of images
            when ``batch_size`` is given. The first ``batches`` batches are used for every
            timestep and checkpoint.
        diffusion: a :class:`GaussianDiffusion` for the default loss and for T (from the
            checkpoint's config when loading checkpoints).
        loss_fn: ``loss_fn(model, x0, t)`` (``loss_fn(model, x0, t, y)`` when the model has a
            truthy ``num_classes``: labels are used only then) -> scalar, with ``t`` an int64
            tensor of shape (B,). Default: the diffusion's MSE with noise fixed per batch (the
            same for every timestep and checkpoint).
        T: number of timesteps (default ``diffusion.T``). M: grid size, 1 <= M <= T (default
            min(T, 100)). d: sketch dimension (ignored with ``exact=True``).
        ema: use the EMA weights of checkpoints. seed: noise, random timesteps and the sketch.
        timesteps_per_pass: grid timesteps per forward/backward (an int >= 1 or ``"auto"``;
            see the module docstring); the result does not depend on it beyond rounding.
        device: where the gradients are computed (default: the first model's); given modules
            are moved there, run in eval mode, and left in the train / eval mode they had.
    """
    require_available(device)
    files, cfg = None, None
    if isinstance(models, (str, Path)) or (isinstance(models, (list, tuple)) and models
                                           and all(isinstance(m, (str, Path)) for m in models)):
        sources = [models] if isinstance(models, (str, Path)) else list(models)
        files = [f for s in sources for f in _checkpoint_files(s)]
        # the first is loaded before any work; the others are loaded one at a time, when used,
        # but their configs (memory-mapped) are compared with the first's now
        first, ckpt_diffusion, state = load_model(files[0], ema, device or "cpu")
        cfg = state["config"]
        _check_same_setup(files, state)
        models = [first] + files[1:]
        if diffusion is None and loss_fn is None:
            diffusion = ckpt_diffusion
        if T is None:
            T = cfg["T"]
    elif isinstance(models, nn.Module):
        models = [models]
    elif isinstance(models, (list, tuple)):
        resolved = []
        for i, m in enumerate(models):
            if isinstance(m, dict):
                if not isinstance(model, nn.Module):
                    raise ValueError("model: a template nn.Module is needed for state dicts")
                m_ = copy.deepcopy(model)
                m_.load_state_dict(m)
                m = m_
            elif not isinstance(m, nn.Module):
                raise TypeError(f"models[{i}] must be an nn.Module, a state dict or a path "
                                f"(all paths), got {type(m).__name__}")
            resolved.append(m)
        models = resolved
    else:
        raise TypeError(f"models must be an nn.Module, a path or a list, got "
                        f"{type(models).__name__}")
    if not models:
        raise ValueError("models: no model or checkpoint given")
    params0 = _trainable(models[0], 0)
    if T is None:
        if diffusion is None:
            raise ValueError("T: pass T (or a diffusion) when a custom loss_fn is used")
        T = diffusion.T
    T = check_int("T", T, 1)
    if diffusion is not None and loss_fn is None and T != diffusion.T:
        raise ValueError(f"T={T} does not match the diffusion's T={diffusion.T}")
    M = min(T, 100) if M is None else M
    lo, hi = timestep_grid(T, M)
    d = None if exact else check_int("d", d, 1)  # exact: no sketch, d is not used
    batches = check_int("batches", batches, 1)
    if timesteps not in ("center", "random"):
        raise ValueError(f"timesteps must be 'center' or 'random', got {timesteps!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    seed = check_int("seed", seed, 0)
    base = None
    if loss_fn is None:
        if diffusion is None:
            raise ValueError("diffusion: needed for the default loss (or pass loss_fn)")
        base = diffusion_loss(diffusion, reduction="none")
    device = torch.device(device) if device is not None else params0[0].device
    data_batches = _batches(data, batches, batch_size, seed, device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noises = [torch.randn(x.shape, generator=gen).to(device, x.dtype) for x, _ in data_batches]
    centers = (lo + hi - 1) // 2
    if timesteps == "center":
        t_of = np.tile(centers, (batches, 1))
    else:
        rng = np.random.default_rng([int(seed), 1])
        t_of = lo + np.floor(rng.random((batches, M)) * (hi - lo)).astype(np.int64)

    numel0 = sum(p.numel() for p in params0)
    group_size = _timesteps_per_pass(timesteps_per_pass, loss_fn, M,
                                     max(x.shape[0] for x, _ in data_batches), numel0, device)
    chunks = [list(range(s, min(s + group_size, M))) for s in range(0, M, group_size)]
    total = np.zeros((M, M))
    iterator = [(c, chunk) for c in range(len(models)) for chunk in chunks]
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="affinity", leave=False)
    rows, sketch, engine = None, None, None
    # eval() for the estimate; the caller's modules go back to train / eval as they were
    modes = [(s, s.training) for m in models if isinstance(m, nn.Module) for s in m.modules()]
    try:
        for c, chunk in iterator:
            if chunk[0] == 0:
                mod = models[c]
                if not isinstance(mod, nn.Module):  # a checkpoint file, loaded when its turn comes
                    mod = load_model(mod, ema, device)[0]
                params = _trainable(mod, c)
                mod.to(device).eval()
                numel = sum(p.numel() for p in params)
                if exact:
                    rows = torch.zeros(M, numel, dtype=torch.float32, device=device)
                else:
                    numels = [p.numel() for p in params]
                    if sketch is None or sketch.numels != numels:  # keeps its hash-code cache
                        sketch = CountSketch(numels, d, seed=seed)
                    rows = torch.zeros(M, d, dtype=torch.float32, device=device)
                if group_size > 1:
                    from .mtl import OneBackwardEngine
                    engine = OneBackwardEngine(mod)
            conditional = bool(getattr(mod, "num_classes", None))
            for b, (x, y) in enumerate(data_batches):
                y = y if conditional else None
                ts = [int(t_of[b, m]) for m in chunk]
                if engine is None:
                    grads_of = (_gradients_one(mod, params, base, loss_fn, x, y, noises[b], t)
                                for t in ts)
                else:
                    grads_of = _gradients_batched(mod, params, engine, base, x, y, noises[b], ts)
                for m, grads in zip(chunk, grads_of):
                    if exact:
                        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                          for g, p in zip(grads, params)])
                        rows[m].add_(flat.float(), alpha=1.0 / batches)
                    else:
                        sketch.apply(grads, out=rows[m], scale=1.0 / batches)
                del grads_of
            if chunk[-1] == M - 1:
                gram = torch.zeros(M, M, dtype=torch.float64, device=rows.device)
                for start in range(0, rows.shape[1], 1 << 16):  # float64 Gram, chunked over P
                    block = rows[:, start:start + (1 << 16)].double()
                    gram += block @ block.T
                gram = gram.cpu().numpy()
                if not np.isfinite(gram).all():
                    raise ValueError(f"models[{c}]: the gradients are not finite (NaN or infinite "
                                     "weights or data, or an overflow); no affinity from them")
                norm = np.sqrt(np.clip(np.diag(gram), 0, None))
                if np.any(norm == 0):
                    raise ValueError(f"models[{c}]: a timestep's gradient is exactly zero; the "
                                     "cosine is undefined")
                cos = gram / np.outer(norm, norm)
                cos = np.clip((cos + cos.T) / 2, -1.0, 1.0)
                np.fill_diagonal(cos, 1.0)
                total += cos
                rows = None
                if engine is not None:
                    engine.remove()
                    engine = None
                if files is not None:
                    models[c] = files[c]  # drop the loaded model
    finally:
        if engine is not None:  # an error mid-model left its hooks on the caller's module
            engine.remove()
        for module, training in modes:
            module.training = training  # each submodule's own flag (a frozen BatchNorm too)
    grid = total / len(models)
    matrix = expand_grid(grid, T, interpolation,
                         centers=centers if timesteps == "center" else None)
    meta = {
        "T": T, "M": M, "d": None if exact else d, "exact": bool(exact), "batches": batches,
        "batch_size": int(data_batches[0][0].shape[0]), "seed": int(seed),
        "timesteps": timesteps, "interpolation": interpolation,
        "timesteps_per_pass": group_size,
        "num_checkpoints": len(models), "ema": bool(ema),
        "checkpoints": None if files is None else [str(f) for f in files],
        "model": type(mod).__name__,
        "parameters": int(sum(p.numel() for p in params0)),
        "loss": "custom" if loss_fn is not None else f"mse({diffusion.prediction})",
        "schedule": None if diffusion is None else diffusion.schedule.name,
        "averaging": "gradient mean over batches, cosine per checkpoint, mean over checkpoints",
    }
    if cfg is not None:
        meta["model"] = cfg.get("model", meta["model"])
    ts = centers if timesteps == "center" else np.full(M, -1)
    return AffinityResult(matrix=matrix, grid=grid, timesteps=ts, metadata=meta)


def _timesteps_per_pass(value, loss_fn, M, batch_size, numel, device):
    if value == "auto":
        if loss_fn is not None or device.type == "cpu":
            return 1
        return max(1, min(M, 256 // batch_size, (1 << 30) // (4 * numel)))
    value = check_int("timesteps_per_pass", value, 1)
    if value > 1 and loss_fn is not None:
        raise ValueError("timesteps_per_pass > 1 needs the default loss (a custom loss_fn "
                         "returns one scalar per batch); use 1 or 'auto'")
    return min(value, M)


def _gradients_one(mod, params, base, loss_fn, x, y, noise, t):
    """Parameter gradients (None where unused) of one timestep's loss on one batch."""
    t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if loss_fn is None:
        loss = base(mod, x, t, y, noise).mean()
    else:
        loss = loss_fn(mod, x, t) if y is None else loss_fn(mod, x, t, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    return torch.autograd.grad(loss.reshape(()), params, allow_unused=True)


def _gradients_batched(mod, params, engine, base, x, y, noise, ts):
    """Per-timestep gradients of the timesteps ``ts`` from one forward and one backward."""
    G, B = len(ts), x.shape[0]
    repeat = lambda v: v.repeat(G, *([1] * (v.dim() - 1)))  # noqa: E731
    t = torch.as_tensor(ts, dtype=torch.long, device=x.device).repeat_interleave(B)
    group = torch.arange(G, device=x.device).repeat_interleave(B)
    with engine.record():
        per_sample = base(mod, repeat(x), t, None if y is None else repeat(y), repeat(noise))
    task_grads = engine.task_gradients(per_sample.view(G, B).mean(1), params, group=group)
    for g in range(G):
        yield [None if grads is None else grads[g] for grads in task_grads]
