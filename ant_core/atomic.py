"""Atomic file writes (no torch import: the plots of ``ant cluster`` use them too)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "prepare_outputs"]


def prepare_outputs(name: str, *paths) -> tuple:
    """``paths`` as Paths, checked before any long work that ends in writing them: none is a
    folder, their folder is one (and is made); ValueError naming ``name`` otherwise."""
    paths = tuple(Path(p) for p in paths)
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{name}: {path} is a folder; give a file name")
        if path.parent.exists() and not path.parent.is_dir():
            raise ValueError(f"{name}: {path.parent} is not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
    return paths


def atomic_write(path, write) -> Path:
    """Call ``write(binary_handle)`` for ``path`` atomically: tmp file in the same folder, fsync,
    os.replace, then fsync of the folder; a killed write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX; some filesystems cannot fsync a folder)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except (AttributeError, OSError):
        pass
    return path
