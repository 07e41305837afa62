"""Datasets from files: image folders, .npy/.npz arrays, scikit-learn's bundled digits, and
:func:`get_dataset`, which resolves a name or a path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..checks import check_int
from .dataset import ImageDataset
from .shapes import ProceduralShapes

__all__ = ["load_image_folder", "load_array", "load_digits", "get_dataset", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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

    With sub-folders, each image's class is the top-level sub-folder it lies under (sorted,
    like torchvision's ImageFolder; deeper folders belong to it); with no sub-folders the data
    is unlabelled. 8-bit images only (16-bit and float images would be clipped at 255: convert
    them, or save an array for :func:`load_array`). An alpha channel is dropped, as
    torchvision's ImageFolder does: transparent pixels keep their stored colour, so composite
    such images onto the background you want first. Needs Pillow (``pip install pillow``).
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
    parts = [f.relative_to(root).parts for f in files]
    groups = [p[0] if len(p) > 1 else None for p in parts]  # None: directly in the root
    if len(set(groups)) > 1 and None in groups:
        loose = files[groups.index(None)]
        raise ValueError(f"path={str(path)!r} has class sub-folders and images outside them "
                         f"(e.g. {loose.name}): move them into a class folder")
    names = tuple(sorted(set(groups) - {None}))
    arrays = []
    for f in files:
        try:
            img = Image.open(f)
            img.load()
        except OSError as exc:  # PIL's UnidentifiedImageError too
            raise ValueError(f"path={str(path)!r}: cannot read image {f} ({exc})") from None
        with img:
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                raise ValueError(f"path={str(path)!r}: {f} is a {img.mode} (16-bit or float) "
                                 "image; converting it would clip it at 255: save the images "
                                 "as an array for load_array (with value_range) instead")
            img = img.convert("L" if grayscale else "RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((image_size, image_size), Image.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, -1))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if names:  # class sub-folders (one is one class, as in torchvision's ImageFolder)
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
        if last and second:  # tiny images: the layout that makes them square, else by dtype
            square_nhwc, square_nchw = array.shape[1] == array.shape[2], \
                array.shape[2] == array.shape[3]
            if square_nhwc != square_nchw:
                layout = "NHWC" if square_nhwc else "NCHW"
            else:
                layout = "NHWC" if array.dtype == np.uint8 else "NCHW"
        elif last or second:
            layout = "NHWC" if last else "NCHW"
        else:
            raise ValueError(f"cannot tell the channel axis of an array of shape {array.shape}: "
                             "with layout='auto' (as `ant train` reads arrays) images have at "
                             "most 4 channels; from Python, pass layout='NHWC' or 'NCHW'")
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
    labels under ``labels``/``y``. ``value_range``: ``"auto"`` (integers -> [0, 255]; floats: [0, 1]
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
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            try:  # the arrays are read here (an object array is refused only now)
                array = data[image_key]
                labels = None if label_key is None else data[label_key]
            except ValueError as exc:
                raise ValueError(f"path={str(path)!r} is not a numeric .npy/.npz array "
                                 f"({exc})") from None
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
    if isinstance(value_range, str) and value_range == "auto":  # (a numpy range compares too)
        if not np.issubdtype(array.dtype, np.floating):
            if high > 255 or low < 0:
                raise ValueError(f"{array.dtype} values in [{low}, {high}]: integer images are "
                                 "read as 8-bit, [0, 255]; pass value_range=(low, high)")
            value_range = (0.0, 255.0)
        else:
            value_range = next((r for r in ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0))
                                if r[0] <= low and high <= r[1]), None)
            if value_range is None:
                raise ValueError(f"values in [{low}, {high}] fit none of [0, 1], [-1, 1], "
                                 "[0, 255]; pass value_range=(low, high)")
    try:
        if isinstance(value_range, (str, bytes)):  # "01" is not (0, 1)
            raise TypeError
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
    if labels.size and int(labels.max()) > np.iinfo(np.int64).max - 1:  # uint64: would wrap
        raise ValueError(f"labels must be below 2**63 - 1, got {int(labels.max())}")
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
        if kwargs.get("image_size") is None:
            raise ValueError(f"name_or_path={name!r} is an image folder: give image_size (its "
                             "images are cropped and resized to it)")
        return load_image_folder(path, **kwargs)
    if path.suffix.lower() in (".npy", ".npz"):
        return load_array(_require_path(path, "name_or_path"), **kwargs)
    if path.exists():
        raise ValueError(f"name_or_path={name!r} is neither a directory nor a .npy/.npz file")
    raise ValueError(f"name_or_path={name!r} is not 'shapes', 'digits' or an existing path")
