"""Built-in training data (no download) and loaders for user data.

Every dataset here is an in-memory :class:`ImageDataset`: float32 images in [-1, 1] of shape
(N, C, H, W) plus int64 labels. ``get_dataset`` resolves a name or a path, ``make_loader`` turns a
dataset into an infinite, seeded, shuffling batch iterator that shards across DDP ranks.

Pillow (image folders) and scikit-learn (the bundled digits) are optional extras, imported only
when used.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .checks import check_int

__all__ = [
    "ImageDataset", "ProceduralShapes", "SHAPE_KINDS", "load_image_folder", "load_array",
    "load_digits", "get_dataset", "make_loader", "InfiniteLoader",
]

#: the shape types drawn by :class:`ProceduralShapes`; an image's label indexes this tuple
SHAPE_KINDS = ("circle", "square", "triangle", "stripes", "ring")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CHUNK = 512  # images per independently seeded generation chunk


class ImageDataset(torch.utils.data.Dataset):
    """Images (N, C, H, W) float32 in [-1, 1] with int64 labels (N,).

    ``images``: a finite floating-point tensor (integer images are refused rather than used
    unscaled: :func:`load_array` scales them); C = 1 (grey) or 3 (RGB) make pictures, other
    channel counts (e.g. latents) train the same and are sampled to ``.npy``.
    ``num_classes`` is None for unlabelled data (labels default to 0); labels are integers in
    ``[0, num_classes)`` (>= 0 without ``num_classes``); ``class_names`` names them when known. Indexing returns
    ``(image, label)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 num_classes: int | None = None, class_names: tuple | None = None):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a (N, C, H, W) tensor")
        if images.shape[0] == 0:
            raise ValueError("images must contain at least one image")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got {images.dtype} "
                            "(load_array scales integer images)")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or infinite values")
        self.images = images.float().contiguous()
        self.num_classes = None if num_classes is None else check_int("num_classes",
                                                                      num_classes, 1)
        if labels is None:
            labels = torch.zeros(images.shape[0], dtype=torch.long)
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), "
                             f"got {tuple(labels.shape)}")
        high = self.num_classes or float("inf")  # without num_classes: any label >= 0
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < high:
            raise ValueError(f"labels must lie in [0, {high}) (num_classes={num_classes}), got "
                             f"values in [{int(labels.min())}, {int(labels.max())}]")
        self.labels = labels.long()
        self.class_names = class_names

    @property
    def image_size(self) -> int:
        """Height (= width) of the images."""
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        """Number of image channels."""
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def _render_chunk(rng: np.random.Generator, count: int, size: int, kinds: int):
    """Draw ``_CHUNK`` images' parameters from ``rng`` and render the first ``count``."""
    n = _CHUNK
    labels = rng.integers(0, kinds, n)
    bg0, bg1 = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    bg_angle = rng.uniform(0, 2 * np.pi, n)
    period = rng.integers(1, 4, n)
    checker_amp = rng.uniform(0.03, 0.12, n)
    noise_amp = rng.uniform(0.0, 0.05, n)
    centre = rng.uniform(0.3, 0.7, (n, 2))
    radius = rng.uniform(0.15, 0.32, n)
    theta = rng.uniform(0, 2 * np.pi, n)
    fill_a, fill_b = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    stripe_period = rng.uniform(2.0, 5.0, n) / size
    noise = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    sl = slice(0, count)

    def col(a):  # (n,) -> (count, 1, 1) float32
        return a[sl, None, None].astype(np.float32)

    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    yy, xx = coords[None, :, None], coords[None, None, :]
    # background: a linear gradient between two colours plus a fine checker and pixel noise
    ramp = np.clip((np.cos(col(bg_angle)) * (xx - 0.5) + np.sin(col(bg_angle)) * (yy - 0.5))
                   / np.sqrt(2) + 0.5, 0, 1)[:, None]
    image = bg0[sl, :, None, None] * (1 - ramp) + bg1[sl, :, None, None] * ramp
    ix = np.arange(size)
    checker = ((ix[None, :, None] // period[sl, None, None]
                + ix[None, None, :] // period[sl, None, None]) % 2) * 2.0 - 1.0
    image = image + col(checker_amp)[:, None] * checker[:, None]
    image = image + col(noise_amp)[:, None] * noise[sl]
    # shape: a signed distance (in image units) in coordinates rotated by theta
    dx, dy = xx - col(centre[:, 0]), yy - col(centre[:, 1])
    cos_t, sin_t = np.cos(col(theta)), np.sin(col(theta))
    u, v = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy
    r, dist = col(radius), np.sqrt(dx * dx + dy * dy)
    sdf = np.empty_like(dist)
    kind = labels[sl]
    for k in range(kinds):
        m = kind == k
        if SHAPE_KINDS[k] in ("circle", "stripes"):
            sdf[m] = dist[m] - r[m]
        elif SHAPE_KINDS[k] == "square":
            sdf[m] = np.maximum(np.abs(u[m]), np.abs(v[m])) - 0.8 * r[m]
        elif SHAPE_KINDS[k] == "triangle":
            sides = [np.cos(a) * u[m] + np.sin(a) * v[m] for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
            sdf[m] = np.maximum.reduce(sides) - 0.5 * r[m]
        else:  # ring
            sdf[m] = np.abs(dist[m] - 0.75 * r[m]) - 0.25 * r[m]
    alpha = np.clip(0.5 - sdf * size, 0, 1)[:, None]  # one-pixel anti-aliased edge
    stripes = (np.floor(u / col(stripe_period)) % 2)[:, None]
    is_striped = (kind == SHAPE_KINDS.index("stripes"))[:, None, None, None]
    fill = np.where(is_striped,
                    fill_a[sl, :, None, None] * stripes + fill_b[sl, :, None, None] * (1 - stripes),
                    fill_a[sl, :, None, None] * (0.85 + 0.15 * ramp))
    image = image * (1 - alpha) + fill * alpha
    return np.clip(image, 0, 1).astype(np.float32) * 2 - 1, labels[sl]


class ProceduralShapes(ImageDataset):
    """Procedurally generated RGB images of one coloured shape on a textured background.

    Each image holds a circle, square, triangle, striped disc or ring (its label, see
    :data:`SHAPE_KINDS`) of random size, position, rotation and colour on a background made of a
    smooth two-colour gradient (coarse structure) plus a fine checkerboard (period 1-3 pixels)
    and pixel noise (fine structure), so denoising differs clearly across noise levels.

    Args:
        num_images: number of images.
        image_size: height = width in pixels.
        seed: seed of the numpy generator; equal arguments give identical data, and a smaller
            ``num_images`` gives a prefix of a larger one.
        num_classes: use only the first ``num_classes`` shape types (default: all 5).

    ``images`` is (N, 3, H, W) float32 in [-1, 1]; ``labels`` (N,) int64 in [0, num_classes).
    10k 32x32 images take a few seconds.
    """

    def __init__(self, num_images: int = 10000, image_size: int = 32, seed: int = 0,
                 num_classes: int | None = None):
        num_images = check_int("num_images", num_images, 1)
        image_size = check_int("image_size", image_size, 4)
        seed = check_int("seed", seed, 0)
        kinds = check_int("num_classes",
                          len(SHAPE_KINDS) if num_classes is None else num_classes, 1)
        if kinds > len(SHAPE_KINDS):
            raise ValueError(f"num_classes must be <= {len(SHAPE_KINDS)}, got {kinds}")
        images = np.empty((num_images, 3, image_size, image_size), dtype=np.float32)
        labels = np.empty(num_images, dtype=np.int64)
        for chunk, start in enumerate(range(0, num_images, _CHUNK)):
            count = min(_CHUNK, num_images - start)
            rng = np.random.default_rng([seed, chunk])
            images[start:start + count], labels[start:start + count] = _render_chunk(
                rng, count, image_size, kinds)
        super().__init__(torch.from_numpy(images), torch.from_numpy(labels), kinds,
                         SHAPE_KINDS[:kinds])
        self.seed = seed


def _require_path(path, what="path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or path, got {type(path).__name__}")
    if str(path) == "":
        raise ValueError(f"{what} must not be empty (it would mean the current folder)")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}={str(path)!r} does not exist")
    return p


def load_image_folder(path, image_size: int, grayscale: bool = False) -> ImageDataset:
    """Load every image under a folder (recursively), center-cropped and resized to a square.

    Images directly in sub-folders get the sub-folder's name as class (sorted, like
    torchvision's ImageFolder); with a single folder the data is unlabelled. Needs Pillow
    (``pip install pillow``).
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("load_image_folder needs Pillow: pip install pillow") from None
    root = _require_path(path)
    if not root.is_dir():
        raise ValueError(f"path={str(path)!r} is not a directory")
    image_size = check_int("image_size", image_size, 1)
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
                   and f.is_file())
    if not files:
        raise ValueError(f"path={str(path)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    groups = [str(f.parent.relative_to(root)) for f in files]
    names = tuple(sorted(set(groups)))
    arrays = []
    for f in files:
        try:
            img = Image.open(f)
            img.load()
        except OSError as exc:  # PIL's UnidentifiedImageError too
            raise ValueError(f"path={str(path)!r}: cannot read image {f} ({exc})") from None
        with img:
            img = img.convert("L" if grayscale else "RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((image_size, image_size), Image.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, -1))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if len(names) > 1:
        labels = torch.tensor([names.index(g) for g in groups])
        return ImageDataset(images, labels, len(names), names)
    return ImageDataset(images)


def _to_nchw(array: np.ndarray, layout: str) -> np.ndarray:
    if layout not in ("auto", "NHWC", "NCHW"):
        raise ValueError(f"layout must be 'auto', 'NHWC' or 'NCHW', got {layout!r}")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(f"array must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                         f"got {array.shape}")
    if layout == "auto":
        last, second = array.shape[-1] <= 4, array.shape[1] <= 4
        if last and second:
            layout = "NHWC" if array.dtype == np.uint8 else "NCHW"
        elif last or second:
            layout = "NHWC" if last else "NCHW"
        else:
            raise ValueError(f"cannot tell the channel axis of an array of shape {array.shape}; "
                             "pass layout='NHWC' or 'NCHW'")
    return array.transpose(0, 3, 1, 2) if layout == "NHWC" else array


def _np_load(p: Path):
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError) as exc:  # object arrays, text, truncated files
        raise ValueError(f"path={str(p)!r} is not a numeric .npy/.npz array ({exc})") from None


def load_array(path, value_range="auto", layout: str = "auto",
               image_size: int | None = None) -> ImageDataset:
    """Load images from a ``.npy`` or ``.npz`` file and normalise them to [-1, 1].

    Accepted shapes: (N, H, W), (N, H, W, C) (typical for uint8) or (N, C, H, W) (typical for
    floats) with square images; ``layout`` forces the channel axis. ``.npz`` files hold the
    images under ``images``/``x``/``data``/``arr_0`` (or as their only array) and optional int
    labels under ``labels``/``y``. ``value_range``: ``"auto"`` (uint8 -> [0, 255]; floats: [0, 1]
    if all values lie there, else [-1, 1], else [0, 255]) or an explicit ``(low, high)``.
    Values outside the range raise ValueError; nothing is clipped. ``image_size`` (optional)
    resizes the images (bilinear, antialiased) when it differs from theirs.
    """
    p = _require_path(path)
    labels = None
    if p.suffix.lower() == ".npy":
        array = _np_load(p)
    elif p.suffix.lower() == ".npz":
        with _np_load(p) as data:
            keys = list(data.keys())
            image_key = next((k for k in ("images", "x", "data", "arr_0") if k in keys),
                             keys[0] if len(keys) == 1 else None)
            if image_key is None:
                raise ValueError(f"path={str(path)!r}: no images array among {keys} (use the key "
                                 "'images')")
            array = data[image_key]
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            labels = None if label_key is None else data[label_key]
    else:
        raise ValueError(f"path={str(path)!r} must be a .npy or .npz file")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"array dtype must be integer or float, got {array.dtype}")
    array = _to_nchw(array, layout)
    if array.shape[0] == 0:
        raise ValueError(f"path={str(path)!r} holds no images")
    if array.shape[2] != array.shape[3]:
        raise ValueError(f"images must be square, got array shape (N, C, H, W) = {array.shape}")
    data = array.astype(np.float32)  # exact for uint8; float32 keeps memory bounded
    if not np.isfinite(data).all():
        raise ValueError(f"path={str(path)!r} contains NaN or infinite values")
    low, high = float(data.min()), float(data.max())
    if value_range == "auto":
        if array.dtype == np.uint8 or not np.issubdtype(array.dtype, np.floating):
            value_range = (0.0, 255.0)
        else:
            value_range = next((r for r in ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0))
                                if r[0] <= low and high <= r[1]), None)
            if value_range is None:
                raise ValueError(f"values in [{low}, {high}] fit none of [0, 1], [-1, 1], "
                                 "[0, 255]; pass value_range=(low, high)")
    try:
        lo, hi = map(float, value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be 'auto' or (low, high), got {value_range!r}") \
            from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"value_range={value_range} must be finite")
    if not hi > lo or low < lo or high > hi:
        raise ValueError(f"value_range={value_range} must satisfy low < high and contain the "
                         f"data range [{low}, {high}]")
    scaled = (data - lo) * (2 / (hi - lo)) - 1  # in range by the check above, up to rounding
    images = torch.from_numpy(np.clip(scaled, -1, 1).astype(np.float32))
    if image_size is not None and check_int("image_size", image_size, 1) != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size),
                                                 mode="bilinear", antialias=True).clamp(-1, 1)
    if labels is None:
        return ImageDataset(images)
    labels = np.asarray(labels)  # validated: integer, one per image, non-negative
    if labels.shape != (array.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels < 0).any():
        raise ValueError(f"labels must be {array.shape[0]} non-negative integers, got shape "
                         f"{labels.shape} dtype {labels.dtype}")
    return ImageDataset(images, torch.from_numpy(labels.astype(np.int64)),
                        int(labels.max()) + 1)


def load_digits(image_size: int = 8) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

    Images are 1-channel, scaled from [0, 16] to [-1, 1] and bilinearly resized to
    ``image_size`` (e.g. 16). Needs scikit-learn (``pip install scikit-learn``).
    """
    image_size = check_int("image_size", image_size, 1)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from None
    digits = sk_load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32))[:, None] / 8.0 - 1.0
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size),
                                                 mode="bilinear", align_corners=False)
        images = images.clamp(-1, 1)  # bilinear weights are convex: only rounding is removed
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return ImageDataset(images, labels, 10, tuple(str(d) for d in range(10)))


def get_dataset(name_or_path, **kwargs) -> ImageDataset:
    """Resolve ``"shapes"`` (:class:`ProceduralShapes`), ``"digits"`` (:func:`load_digits`), a
    directory (:func:`load_image_folder`) or a ``.npy``/``.npz`` file (:func:`load_array`).
    Keyword arguments go to the resolved loader; all of them accept ``image_size``.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if name.lower() == "shapes":
        return ProceduralShapes(**kwargs)
    if name.lower() == "digits":
        return load_digits(**kwargs)
    path = Path(name)
    if path.is_dir():
        return load_image_folder(path, **kwargs)
    if path.suffix.lower() in (".npy", ".npz"):
        return load_array(_require_path(path, "name_or_path"), **kwargs)
    if path.exists():
        raise ValueError(f"name_or_path={name!r} is neither a directory nor a .npy/.npz file")
    raise ValueError(f"name_or_path={name!r} is not 'shapes', 'digits' or an existing path")


class InfiniteLoader:
    """Infinite iterator of ``(images, labels)`` batches of an in-memory or map-style dataset.

    Each epoch is a permutation drawn from ``numpy.random.default_rng([seed, epoch])`` (the same
    on every rank), padded by wrapping around to a multiple of ``world_size`` and split
    ``rank::world_size``, so ranks see disjoint samples. Batches run across epoch boundaries,
    so every batch is full. ``state_dict()``/``load_state_dict()`` resume the exact stream.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, device=None):
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank={rank} must be < world_size={world_size}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
        self.dataset, self.shuffle, self.device = dataset, bool(shuffle), device
        self.epoch, self.position = 0, 0
        self._order = None

    def _shard(self) -> np.ndarray:
        n = len(self.dataset)
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        total = -(-n // self.world_size) * self.world_size
        order = np.resize(order, total)  # wraps around, like DistributedSampler's padding
        return order[self.rank::self.world_size]

    def _take(self, indices: np.ndarray):
        index = torch.from_numpy(indices)
        if hasattr(self.dataset, "images") and hasattr(self.dataset, "labels"):
            return self.dataset.images[index], self.dataset.labels[index]
        items = [self.dataset[int(i)] for i in indices]
        if isinstance(items[0], (tuple, list)):
            images = torch.stack([torch.as_tensor(it[0]) for it in items])
            labels = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
        else:
            images = torch.stack([torch.as_tensor(it) for it in items])
            labels = torch.zeros(len(items), dtype=torch.long)
        return images, labels

    def __iter__(self):
        return self

    def __next__(self):
        parts, need = [], self.batch_size
        while need:
            if self._order is None:
                self._order = self._shard()
            chunk = self._order[self.position:self.position + need]
            parts.append(chunk)
            need -= len(chunk)
            self.position += len(chunk)
            if self.position >= len(self._order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        images, labels = self._take(np.concatenate(parts))
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        return images, labels

    def state_dict(self) -> dict:
        """Position in the stream: ``{"epoch": int, "position": int}``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream from a :meth:`state_dict`."""
        shard = -(-len(self.dataset) // self.world_size)  # this rank's samples per epoch
        self.epoch = check_int("state['epoch']", state["epoch"], 0)
        self.position = check_int("state['position']", state["position"], 0, shard - 1)
        self._order = None


def make_loader(dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                shuffle: bool = True, device=None) -> InfiniteLoader:
    """An infinite, seeded, shuffling ``(images, labels)`` iterator; see :class:`InfiniteLoader`.

    Under DDP pass each process's ``rank`` and ``world_size``: ``batch_size`` is per rank.
    """
    return InfiniteLoader(dataset, batch_size, seed=seed, rank=rank, world_size=world_size,
                          shuffle=shuffle, device=device)
