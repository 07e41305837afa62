"""Infinite, seeded, DDP-sharded batch iterators over a dataset."""
from __future__ import annotations

import numpy as np
import torch

from ..checks import check_int
from .dataset import ImageDataset

__all__ = ["InfiniteLoader", "make_loader"]


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
        # an ImageDataset's tensors are indexed at once; anything else (a subclass with its own
        # __getitem__ too) goes through __getitem__
        if type(self.dataset).__getitem__ is ImageDataset.__getitem__:
            return self.dataset.images[index], self.dataset.labels[index]
        items = [self.dataset[int(i)] for i in indices]
        if isinstance(items[0], (tuple, list)) and len(items[0]) == 1:  # images only
            items = [it[0] for it in items]
        if isinstance(items[0], (tuple, list)):
            images = torch.stack([torch.as_tensor(it[0]) for it in items])
            labels = torch.as_tensor([it[1] for it in items])
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"dataset labels must be integers, got {labels.dtype} "
                                f"(e.g. {items[0][1]!r}): 2.7 would be truncated to 2")
            labels = labels.long()
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
