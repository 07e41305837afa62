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
* :class:`NoiseLevelGroups` labels *continuous* noise levels (EDM's log-normal sigma, flow
  matching's t) with the cluster of the nearest grid timestep in log-SNR, on the device.

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

from .checks import check_bool, check_int

__all__ = ["StratifiedSampler", "UniformSampler", "NoiseLevelGroups", "group_counts"]


def _distributed_rank_and_size(rank, world_size):
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return rank, world_size


def group_counts(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Number of samples per cluster, an int64 tensor of shape (num_groups,), from an integer
    tensor of cluster ids in [0, num_groups) (ValueError naming ``group`` otherwise: checked
    before counting on the CPU; on a GPU by the counts' length, which needs no extra host sync,
    and a negative id there is torch's error)."""
    num_groups = check_int("num_groups", num_groups, 1)
    if not isinstance(group, torch.Tensor) or group.is_floating_point() or group.is_complex() \
            or group.dtype == torch.bool:
        raise TypeError(f"group must be an integer tensor of cluster ids, got "
                        f"{getattr(group, 'dtype', type(group).__name__)}")
    flat = group.reshape(-1)
    if flat.device.type == "cpu" and flat.numel() and \
            not 0 <= int(flat.min()) <= int(flat.max()) < num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups}), got values in "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    counts = torch.bincount(flat, minlength=num_groups)
    if counts.numel() != num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups}), got one >= {num_groups}")
    return counts


class _ClusterSampler:
    """Shared machinery: cluster validation, per-rank generator, argument checks."""

    def __init__(self, clusters, *, sort_by_group=True, seed=None, generator=None,
                 rank=None, world_size=None):
        for attr in ("bounds", "labels", "k", "T", "starts", "sizes"):
            if not hasattr(clusters, attr):
                raise TypeError(f"clusters must be an IntervalClusters (missing {attr!r})")
        check_bool("sort_by_group", sort_by_group)
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
            seed = check_int("seed", seed, 0)
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
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: a {type(self).__name__} state has the keys "
                             f"{sorted(expected)}, got {got}")
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
        batch_size = check_int("batch_size", batch_size, 1)
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
        batch_size = check_int("batch_size", batch_size, 1)
        t = torch.randint(0, self.T, (batch_size,), generator=self.generator)
        return self._finish(t, self._labels[t], device)


class NoiseLevelGroups:
    """Cluster labels for continuous noise levels: EDM / k-diffusion code that draws ``sigma``
    itself (e.g. log-normal), flow matching, any continuous-time diffusion.

    Cluster the timesteps of a grid that covers the noise levels you train on (for EDM:
    ``schedules.log_snr_grid(T, sigma_min, sigma_max)``), then label each sample with the cluster
    of the grid timestep nearest to its log-SNR ``λ = −2 log σ``::

        schedule = ant_core.schedules.log_snr_grid(1000, sigma_min=0.002, sigma_max=80.0)
        clusters = ant_core.interval_clustering(5, "log_snr", schedule=schedule)
        to_group = NoiseLevelGroups(clusters, schedule)
        sigma = (torch.randn(B, device="cuda") * 1.2 - 1.2).exp()     # your sampling, unchanged
        denoised = D(x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x), sigma)
        losses = ant_core.grouped_mse(denoised, x, to_group(sigma=sigma), clusters.k,
                                      weight=edm_loss_weight(sigma))

    The cluster boundaries in log-SNR are the midpoints between the log-SNRs of the last
    timestep of a cluster and the first of the next; a noise level exactly on a boundary goes to
    the less noisy cluster; levels beyond the grid go to the first (least noisy) or last cluster.
    A NaN log-SNR (or a NaN or negative ``sigma``) gets the out-of-range label ``k``, which
    :func:`ant_core.grouped_mse` reports (an error on the CPU, NaN losses on CUDA) instead of
    hiding it. No host sync.
    """

    def __init__(self, clusters, schedule):
        from .schedules import get_schedule

        for attr in ("k", "T", "ends"):
            if not hasattr(clusters, attr):
                raise TypeError(f"clusters must be an IntervalClusters (missing {attr!r})")
        schedule = get_schedule(schedule)
        if schedule.T != clusters.T:
            raise ValueError(f"schedule has {schedule.T} timesteps, clusters have T={clusters.T}")
        log_snr = schedule.log_snr
        ends = np.asarray(clusters.ends[:-1], dtype=np.int64)
        last, first = log_snr[ends - 1], log_snr[ends]
        if not (np.all(np.isfinite(last)) and np.all(np.isfinite(first))):
            raise ValueError("schedule's log-SNR must be finite on both sides of every cluster "
                             "boundary (an infinite log-SNR has no midpoint)")
        self.num_groups = int(clusters.k)
        # Negated so that they ascend, as torch.bucketize needs.
        self.negative_boundaries = -(last + first) / 2
        self._on_device = {}

    def __call__(self, *, sigma=None, log_snr=None) -> torch.Tensor:
        """The cluster of every noise level: a LongTensor of the input's shape and device.

        Pass exactly one of ``sigma`` (noise-to-signal ratio, > 0) or ``log_snr``, as a floating
        tensor.
        """
        if (sigma is None) == (log_snr is None):
            raise ValueError("pass exactly one of sigma or log_snr")
        name, values = ("sigma", sigma) if sigma is not None else ("log_snr", log_snr)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{getattr(values, 'dtype', type(values).__name__)}")
        values = values.double()
        negative_log_snr = 2 * torch.log(values) if sigma is not None else -values
        boundaries = self._on_device.get(values.device)
        if boundaries is None:
            boundaries = torch.tensor(self.negative_boundaries, dtype=torch.float64,
                                      device=values.device)
            self._on_device[values.device] = boundaries
        group = torch.bucketize(negative_log_snr, boundaries, right=False)
        return torch.where(torch.isnan(negative_log_snr), self.num_groups, group)
