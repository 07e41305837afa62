"""Training checkpoints: atomic writes, keep-last-N, safe loading, and RNG state capture.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (dict, list,
str, int, float, bool, None), so it loads with ``torch.load(..., weights_only=True)``: no code is
unpickled. Writes go to a temporary file in the same folder, are flushed to disk, then renamed
over the target with ``os.replace`` (atomic on POSIX), so a crash never leaves a half-written
checkpoint and never destroys the previous one.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write

__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "list_checkpoints",
           "latest_checkpoint", "prune_checkpoints", "checkpoint_path", "checkpoint_step",
           "capture_rng_state", "restore_rng_state", "load_model", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt or not an ant-core checkpoint."""


def checkpoint_path(directory, step: int) -> Path:
    """``directory/ckpt_<step, 8 digits>.pt``."""
    return Path(directory) / f"ckpt_{int(step):08d}.pt"


def atomic_save(obj, path) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load an ant-core checkpoint with ``weights_only=True``; CheckpointError when it is absent,
    unreadable, corrupt or not one of ours. ``mmap=True`` maps the tensors instead of reading
    them (cheap when only the config is needed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != "ant-core-checkpoint":
        raise CheckpointError(f"{path} is not an ant-core training checkpoint")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}, "
                              f"this ant-core reads version {FORMAT_VERSION}")
    return state


def load_model(path, ema: bool = True, device="cpu"):
    """``(model, diffusion, state)`` of a checkpoint file: the model (EMA weights unless
    ``ema=False``) in eval mode on ``device``, its GaussianDiffusion, and the whole state."""
    from .diffusion import GaussianDiffusion
    from .models import create_model

    state = load_checkpoint(path)
    try:
        cfg = state["config"]
        model = create_model(state["model_kind"], **state["model_config"])
        model.load_state_dict(state["ema"]["model"] if ema else state["model"])
        diffusion = GaussianDiffusion(cfg["schedule"], cfg["T"], cfg["prediction"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a damaged or edited file
        raise CheckpointError(f"checkpoint {path} does not hold a loadable model "
                              f"({type(exc).__name__}: {exc})") from None
    return model.to(device).eval(), diffusion, state


def checkpoint_step(path) -> int:
    """The step in a checkpoint file's name ``ckpt_<step>.pt``."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named ckpt_<step>.pt")
    return int(match.group(1))


def list_checkpoints(directory) -> list:
    """Checkpoint files ``ckpt_<step>.pt`` in ``directory``, sorted by step (oldest first)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory):
    """The newest checkpoint in ``directory`` or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory, keep: int) -> list:
    """Delete all but the ``keep`` newest checkpoints (keep <= 0: delete none), and temporary
    files that a killed write left behind (call it only after a write has finished)."""
    old = list_checkpoints(directory)[:-keep] if keep > 0 else []
    old += sorted(Path(directory).glob(".ckpt_*.pt.*.tmp"))
    for p in old:
        p.unlink(missing_ok=True)
    return old


def load_resume_checkpoint(resume, directory, config):
    """The checkpoint a run with ``config`` resumes from, loaded and checked: None for ``resume``
    None / False, the newest in ``directory`` for True, else the file ``resume``. ValueError when
    it is missing, when ``directory`` holds checkpoints of another folder's run or later ones
    (another continuation), when a config field outside ``RESUME_MUTABLE`` differs, or when it
    leaves no steps to train.
    The state's ``"_path"`` is the file read."""
    from .train_config import PATH_FIELDS, RESUME_MUTABLE, TrainConfig, jsonable

    if resume is None or resume is False:
        return None
    directory = Path(directory)
    existing = list_checkpoints(directory)
    path = (existing[-1] if existing else None) if resume is True else Path(resume)
    if path is None:
        raise ValueError(f"resume: no checkpoint in {directory}")
    if resume is not True and Path(resume).is_file() and existing and \
            not Path(resume).absolute().parent.samefile(directory):
        raise ValueError(f"resume: {directory} already holds checkpoints of a run; resuming "
                         f"{resume} from elsewhere would mix two runs there; resume one of its "
                         "own checkpoints or choose an empty out folder")
    state = load_checkpoint(path)
    later = [p.name for p in existing if checkpoint_step(p) > state["step"]]
    if later:  # pruning would rank them above the new branch and delete its checkpoints
        raise ValueError(
            f"resume: {directory} holds checkpoints after step {state['step']} of {path} "
            f"({', '.join(later)}): they belong to another continuation; move or delete them "
            "first (nothing was deleted)")
    # a field added after the checkpoint was written has the default that reproduces it
    saved = {**TrainConfig().to_dict(), **state["config"]}
    changed = sorted(k for k, v in config.to_dict().items()
                     if k not in RESUME_MUTABLE and jsonable(saved.get(k)) != jsonable(v)
                     and not (k in PATH_FIELDS and _same_file(saved.get(k), v)))
    if changed:
        raise ValueError(f"resume: config field(s) {changed} differ from the checkpoint "
                         f"{path} (only {list(RESUME_MUTABLE)} may change)")
    for k in PATH_FIELDS:  # the same file named another way (a link): the run keeps its name
        if saved.get(k) != getattr(config, k) and os.path.isabs(saved.get(k) or ""):
            object.__setattr__(config, k, saved[k])
    if state["step"] >= config.steps:
        raise ValueError(f"resume: checkpoint {path} is at step {state['step']}; "
                         f"steps={config.steps} leaves nothing to do")
    state["_path"] = str(path)
    return state


def _same_file(a, b) -> bool:
    """Whether two path strings name one existing file or folder."""
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:
        return False


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy-global and python ``random`` states as tensors
    and plain Python values (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": list(py_state),
                   "gauss": None if py_gauss is None else float(py_gauss)},
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        states = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in states])
