"""Built-in training data (no download) and loaders for user data.

Every dataset here is an in-memory :class:`ImageDataset`: float32 images in [-1, 1] of shape
(N, C, H, W) plus int64 labels. ``get_dataset`` resolves a name or a path, ``make_loader`` turns a
dataset into an infinite, seeded, shuffling batch iterator that shards across DDP ranks.

Pillow (image folders) and scikit-learn (the bundled digits) are optional extras, imported only
when used.
"""
from .dataset import ImageDataset
from .files import IMAGE_EXTENSIONS, get_dataset, load_array, load_digits, load_image_folder
from .loader import InfiniteLoader, make_loader
from .shapes import SHAPE_KINDS, ProceduralShapes

for _cls in (ImageDataset, ProceduralShapes, InfiniteLoader):  # pickled by the public path
    _cls.__module__ = __name__

__all__ = [
    "ImageDataset", "ProceduralShapes", "SHAPE_KINDS", "load_image_folder", "load_array",
    "load_digits", "get_dataset", "make_loader", "InfiniteLoader", "IMAGE_EXTENSIONS",
]
