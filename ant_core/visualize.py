"""Pictures: sample grids as PNG, training curves, interval clusterings, affinity heatmaps.

PNG files are written with Pillow when it is installed, else by a small built-in writer (zlib +
the PNG chunk format), so a grid can always be saved with only numpy. The plots need matplotlib:
the training curves are skipped without it (an empty dict), the other plots raise ImportError.
Nothing here imports torch.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .checks import check_int

__all__ = ["image_grid", "write_png", "save_image_grid", "read_metrics", "plot_training_curves",
           "plot_clusters", "plot_affinity", "has_matplotlib", "check_plot_path"]


def _as_images(images) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError("images must have shape (N, C, H, W) with every size >= 1, got "
                         f"{images.shape}")
    return images


def image_grid(images, nrow: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] (tensor or array) into one uint8 (H', W', C) array
    (C = 1 or 3), ``nrow`` images per row (default ~sqrt(N)), ``padding`` white pixels between;
    ``scale`` enlarges every image by pixel repetition first. For display only: values outside
    [-1, 1] are clipped and NaN drawn as mid-grey (keep the raw arrays, e.g. ``ant sample``'s
    .npz, for anything else)."""
    images = _as_images(images)
    scale = check_int("scale", scale, 1)
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    nrow = None if nrow is None else check_int("nrow", nrow, 1)
    padding = check_int("padding", padding, 0)
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    pixels = np.round((np.clip(np.nan_to_num(images), -1, 1) + 1) * 127.5).astype(np.uint8)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255,
                   dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = pixels[i].transpose(1, 2, 0)
    return grid


def _png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 (H, W), (H, W, 1) or (H, W, 3) array as PNG (no filter, zlib level 6)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    height, width = array.shape[:2]
    color_type = 0 if array.ndim == 2 else 2
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(array))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def write_png(path, array: np.ndarray, use_pillow: bool = True) -> Path:
    """Write a uint8 image array (H, W[, 1|3]) to ``path`` atomically (:func:`atomic_write`)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[2] not in (1, 3)):
        raise ValueError(f"array must be uint8 (H, W), (H, W, 1) or (H, W, 3), got "
                         f"{array.dtype} {array.shape}")
    data = None
    if use_pillow:
        try:
            import io

            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1
                            else array).save(buffer, format="PNG")
            data = buffer.getvalue()
        except ImportError:
            data = None
    if data is None:
        data = _png_bytes(array)
    return atomic_write(path, lambda handle: handle.write(data))


def save_image_grid(images, path, nrow: int | None = None, scale: int | None = None) -> Path:
    """``write_png(path, image_grid(images, nrow, scale=scale))``; ``scale`` defaults to
    enlarging images smaller than 64 pixels to about 64 (for viewing)."""
    images = _as_images(images)
    if scale is None:
        scale = max(1, 64 // images.shape[-1])
    return write_png(path, image_grid(images, nrow, scale=scale))


def read_metrics(path) -> list:
    """The records of a JSONL metrics log (blank or truncated lines skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def check_plot_path(path) -> Path:
    """The file a plot of ``path`` is written to (``.png`` added without a suffix, as
    matplotlib does), checked before any long work: matplotlib is importable, it can write the
    format, the file is not a folder, and its folder can be made."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    path = path if path.suffix else path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"plot path {str(path)!r}: matplotlib cannot write {path.suffix!r} "
                         f"files; use one of {', '.join('.' + f for f in sorted(formats))}")
    if path.is_dir():
        raise ValueError(f"plot path {str(path)!r} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training_curves(metrics_path, out_dir) -> dict:
    """From a metrics JSONL log write ``cluster_losses.png`` (per-cluster loss over steps),
    ``task_weights.png`` (MTL task weights over steps) and, for a weighting='edm2' run,
    ``edm2_weights.png`` (per-cluster mean of EDM2's learned e^{−u}) into ``out_dir``. Returns
    ``{key: path}``; empty without matplotlib or without records."""
    records = [r for r in read_metrics(metrics_path) if "cluster_losses" in r]
    if not records or not has_matplotlib():
        return {}
    plt = _pyplot()

    steps = np.array([r["step"] for r in records])
    out_dir = Path(out_dir)
    written = {}
    panels = [("cluster_losses", "cluster_losses.png", "loss", "per-cluster training loss"),
              ("weights", "task_weights.png", "task weight", "MTL task weights")]
    if "edm2_weights" in records[0]:
        panels.append(("edm2_weights", "edm2_weights.png", "mean e^{-u} over the cluster",
                       "EDM2 learned weights"))
    for key, name, ylabel, title in panels:
        values = np.array([[np.nan if v is None else v for v in r[key]] for r in records],
                          dtype=np.float64)  # null: a cluster without samples in that step
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for k in range(values.shape[1]):
            ax.plot(steps, values[:, k], lw=1.2, label=f"cluster {k}")
        if key == "cluster_losses" and "loss" in records[0]:
            ax.plot(steps, [r["loss"] for r in records], color="k", lw=1.5, ls="--",
                    label="mean")
        shown = values[~np.isnan(values)]
        if shown.size and np.all(shown > 0) and shown.max() > 20 * shown.min():
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[key] = path
    return written


def plot_clusters(c, log_snr, path) -> Path:
    """The intervals of an :class:`~ant_core.IntervalClusters` drawn over timestep (and
    log-SNR when given). Needs matplotlib."""
    if log_snr is not None and np.shape(log_snr) != (c.T,):
        raise ValueError(f"log_snr must have shape ({c.T},), got {np.shape(log_snr)}")
    path = check_plot_path(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    t = np.arange(c.T)
    y = log_snr if log_snr is not None else t
    colors = plt.get_cmap("tab10")
    for i, (s, e) in enumerate(c.bounds):
        ax.plot(t[s:e], y[s:e], color=colors(i % 10), lw=2.5, label=f"[{s}, {e})")
        ax.axvline(s, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("log-SNR" if log_snr is not None else "t")
    ax.set_title(f"interval clustering: k={c.k}, objective={c.objective}")
    ax.legend(fontsize=7, ncol=min(c.k, 5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_affinity(matrix, path, *, log_snr=None, clusters=None, title=None):
    """Heatmap of a T x T affinity over timestep (and over log-SNR when given), with the
    intervals of ``clusters`` (an IntervalClusters) outlined on the diagonal. Needs matplotlib."""
    A = np.asarray(matrix, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"matrix must be square (T, T), got shape {A.shape}")
    T = A.shape[0]
    if clusters is not None and clusters.T != T:
        raise ValueError(f"clusters cover T={clusters.T} timesteps, the matrix {T}")
    path = check_plot_path(path)
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    panels = 1 if log_snr is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(A, origin="lower", cmap="viridis", vmin=min(A.min(), 0.0), vmax=1.0,
                   extent=(-0.5, T - 0.5, -0.5, T - 0.5))
    ax.set_xlabel("timestep t")
    ax.set_ylabel("timestep t")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if clusters is not None:
        for s, e in clusters.bounds:
            ax.add_patch(Rectangle((s - 0.5, s - 0.5), e - s, e - s, fill=False, ec="red",
                                   lw=1.2))
    if log_snr is not None:
        ax2 = axes[0, 1]
        ls = np.asarray(log_snr, dtype=np.float64)
        if ls.shape != (T,):
            raise ValueError(f"log_snr must have shape ({T},), got {ls.shape}")
        mid = (ls[1:] + ls[:-1]) / 2 if T > 1 else ls[:0]
        first = ls[0] - (mid[0] - ls[0]) if T > 1 else ls[0] - 0.5
        last = ls[-1] + (ls[-1] - mid[-1]) if T > 1 else ls[0] + 0.5
        edges = np.concatenate([[first], mid, [last]])  # cell edges of each timestep
        mesh = ax2.pcolormesh(edges, edges, A, cmap="viridis", vmin=min(A.min(), 0.0),
                              vmax=1.0, shading="flat")
        ax2.set_xlabel("log-SNR")
        ax2.set_ylabel("log-SNR")
        fig.colorbar(mesh, ax=ax2, fraction=0.046)
        if clusters is not None:
            for s, e in clusters.bounds:
                x0, x1 = sorted((edges[s], edges[e]))
                ax2.add_patch(Rectangle((x0, x0), x1 - x0, x1 - x0, fill=False, ec="red",
                                        lw=1.2))
    fig.suptitle(title or "gradient task affinity (cosine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
