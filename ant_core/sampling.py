"""Cluster-aware timestep samplers.

A sampler turns an :class:`~ant_core.clustering.IntervalClusters` into batches of timesteps with
their cluster ("task") labels::

    sampler = StratifiedSampler(clusters, seed=0)
    t, group = sampler.sample(batch_size, device="cuda")   # LongTensor (B,), LongTensor (B,)

* :class:`StratifiedSampler` is the paper's scheme: every cluster gets ``B // K`` samples and the
  remainder ``B % K`` goes to clusters in round-robin order across calls (and across DDP ranks),
  so every cluster receives the same count in the long run; ``t`` is uniform within its cluster.
* :class:`UniformSampler` draws ``t`` uniformly from ``[0, T)`` and reports its cluster; it keeps
  the marginal timestep distribution of vanilla diffusion training.

With ``sort_by_group=True`` (the default for both) the samples of each cluster are contiguous
and clusters appear in ascending order — the layout the one-backward gradient engine
(:class:`ant_core.mtl.engines.OneBackwardEngine`) works with.

Randomness: each sampler owns a ``torch.Generator``. The stream is derived from ``seed`` (or a
seed drawn from torch's global generator) combined with the process rank, so DDP ranks draw
different timesteps from the same ``seed``. ``rank``/``world_size`` default to
``torch.distributed`` when it is initialised, else 0/1.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["StratifiedSampler", "UniformSampler", "group_counts"]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _distributed_rank_and_size(rank, world_size):
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return rank, world_size


def group_counts(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Number of samples per cluster, a LongTensor of shape (num_groups,)."""
    return torch.bincount(group, minlength=num_groups)


class _ClusterSampler:
    """Shared machinery: cluster validation, per-rank generator, argument checks."""

    def __init__(self, clusters, *, sort_by_group=True, seed=None, generator=None,
                 rank=None, world_size=None):
        for attr in ("bounds", "labels", "k", "T", "starts", "sizes"):
            if not hasattr(clusters, attr):
                raise TypeError(f"clusters must be an IntervalClusters (missing {attr!r})")
        if not isinstance(sort_by_group, bool):
            raise TypeError(f"sort_by_group must be a bool, got {type(sort_by_group).__name__}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.clusters = clusters
        self.num_groups = int(clusters.k)
        self.T = int(clusters.T)
        self.sort_by_group = sort_by_group
        self.rank, self.world_size = _distributed_rank_and_size(rank, world_size)
        self._starts = torch.tensor(np.array(clusters.starts), dtype=torch.long)
        self._sizes = torch.tensor(np.array(clusters.sizes), dtype=torch.long)
        self._labels = torch.tensor(np.array(clusters.labels), dtype=torch.long)
        if generator is not None:
            # The caller owns the stream; under DDP it must seed it per rank itself.
            self.generator = generator
            self.seed = None
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            seed = _check_int("seed", seed, 0)
            self.seed = seed
            # Combine seed and rank into independent streams (SeedSequence spawn semantics).
            state = np.random.SeedSequence([seed, self.rank]).generate_state(2, np.uint32)
            self.generator = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))

    def _uniform_within(self, group):
        """One t per entry of ``group``, uniform over that cluster's interval (exact integers)."""
        raw = torch.randint(0, 2**62, group.shape, generator=self.generator)
        return self._starts[group] + raw % self._sizes[group]

    def _finish(self, t, group, device):
        if self.sort_by_group:
            order = torch.argsort(group, stable=True)
        else:
            order = torch.randperm(group.numel(), generator=self.generator)
        t, group = t[order], group[order]
        if device is not None:
            t, group = t.to(device), group.to(device)
        return t, group

    def state_dict(self) -> dict:
        """Generator state (and round-robin position), for exact resumption from a checkpoint."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.generator.set_state(state["generator"])


class StratifiedSampler(_ClusterSampler):
    """Equal share per cluster (the paper's scheme), any batch size B >= 1.

    Each call gives every cluster ``B // K`` samples; the ``B % K`` remaining samples go to
    consecutive clusters in a round-robin that continues across calls and is interleaved across
    DDP ranks (rank r of W takes the slots a single process would take on its (n·W + r)-th call),
    so over calls each cluster receives the same expected — and, per full cycle, the same exact —
    count. ``t`` is uniform within its cluster's interval.

    Args:
        clusters: an ``IntervalClusters``.
        sort_by_group: return the samples grouped by cluster in ascending, contiguous segments
            (default True); False returns them in random order.
        seed / generator: randomness (see the module docstring); mutually exclusive.
        rank / world_size: DDP position; default from ``torch.distributed`` when initialised.
    """

    def __init__(self, clusters, *, sort_by_group=True, seed=None, generator=None,
                 rank=None, world_size=None):
        super().__init__(clusters, sort_by_group=sort_by_group, seed=seed, generator=generator,
                         rank=rank, world_size=world_size)
        self._remainder_position = 0

    def counts(self, batch_size: int) -> torch.Tensor:
        """The per-cluster counts the next :meth:`sample` call will use (does not advance)."""
        batch_size = _check_int("batch_size", batch_size, 1)
        k = self.num_groups
        base, remainder = divmod(batch_size, k)
        counts = torch.full((k,), base, dtype=torch.long)
        start = (self._remainder_position + self.rank * remainder) % k
        counts[(start + torch.arange(remainder)) % k] += 1
        return counts

    def sample(self, batch_size: int, device=None):
        """Draw ``(t, group)``: two LongTensors of shape (batch_size,)."""
        counts = self.counts(batch_size)
        self._remainder_position = (
            self._remainder_position + self.world_size * (batch_size % self.num_groups)
        ) % self.num_groups
        group = torch.repeat_interleave(torch.arange(self.num_groups), counts)
        return self._finish(self._uniform_within(group), group, device)

    def state_dict(self) -> dict:
        """Generator state and round-robin position."""
        return {**super().state_dict(), "remainder_position": self._remainder_position}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self._remainder_position = int(state["remainder_position"])


class UniformSampler(_ClusterSampler):
    """Plain uniform ``t`` in ``[0, T)`` with its cluster label (vanilla marginal over t).

    Arguments as :class:`StratifiedSampler`. Per-cluster counts are random (multinomial with
    probabilities proportional to the interval lengths), so a cluster can be empty in a batch.
    """

    def sample(self, batch_size: int, device=None):
        """Draw ``(t, group)``: two LongTensors of shape (batch_size,)."""
        batch_size = _check_int("batch_size", batch_size, 1)
        t = torch.randint(0, self.T, (batch_size,), generator=self.generator)
        return self._finish(t, self._labels[t], device)
