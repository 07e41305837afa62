"""The in-memory dataset every loader of :mod:`ant_core.data` returns."""
from __future__ import annotations

import torch

from ..checks import check_int

__all__ = ["ImageDataset"]


class ImageDataset(torch.utils.data.Dataset):
    """Images (N, C, H, W) float32 in [-1, 1] with int64 labels (N,).

    ``images``: a finite floating-point tensor (integer images are refused rather than used
    unscaled: :func:`load_array` scales them); C = 1 (grey) or 3 (RGB) make pictures, other
    channel counts (e.g. latents) train the same (the trainer writes their sample grids as
    ``.npy``, ``ant sample`` only the ``.npz``).
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
        low, high = (float(v) for v in torch.aminmax(images))
        if low < -1 - 1e-5 or high > 1 + 1e-5:  # [0, 255] floats trained unscaled, and sampling
            raise ValueError(f"images must lie in [-1, 1], got values in [{low:g}, {high:g}] "
                             "(load_array's value_range scales them)")  # clips at 1
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
