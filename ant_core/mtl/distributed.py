"""DDP helpers for the MTL methods: process-group info and count-weighted reductions.

Semantics every method follows: the result on every rank equals what one process computes on the
union of the ranks' batches. With per-task losses ``L_{k,r}`` (a mean over ``n_{k,r}`` samples on
rank r), the union loss is ``L_k = Σ_r n_{k,r} L_{k,r} / N_k`` with ``N_k = Σ_r n_{k,r}``, and its
gradient is ``Σ_r (n_{k,r} / N_k) ∇L_{k,r}``. So each rank scales its task terms by
``share_{k,r} = n_{k,r} / N_k`` and the ranks' contributions are SUM-all-reduced.

When ``task_counts`` is not given, every rank is assumed to hold the same number of samples per
task (``share = 1 / world_size``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "task_shares", "all_reduce_sum", "global_losses"]


def world_size(process_group=None) -> int:
    """Size of ``process_group`` (default group), 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def all_reduce_sum(tensors, process_group=None):
    """SUM-all-reduce a list of tensors in place, coalesced into one flat buffer per dtype."""
    if world_size(process_group) == 1 or not tensors:
        return tensors
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        if len(group) == 1 and group[0].is_contiguous():  # e.g. a TaskGradients buffer
            dist.all_reduce(group[0], op=dist.ReduceOp.SUM, group=process_group)
            continue
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        offset = 0
        for t in group:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors


def task_shares(num_tasks, task_counts, device, process_group=None):
    """Per-task factor ``n_{k,r} / N_k`` of this rank (float64, shape (K,)); 0 where N_k = 0.

    One all-reduce of K numbers when distributed and ``task_counts`` is given. Negative counts
    raise ValueError when given on the CPU (a list, numpy array or CPU tensor); counts already
    on a GPU are not read back (that would synchronise every step): a negative one makes
    every share NaN instead, so the step's loss and weights are NaN.
    """
    size = world_size(process_group)
    if task_counts is None:
        return torch.full((num_tasks,), 1.0 / size, dtype=torch.float64, device=device)
    counts = torch.as_tensor(task_counts)
    if counts.shape != (num_tasks,):
        raise ValueError(f"task_counts must have shape ({num_tasks},), got {tuple(counts.shape)}")
    if counts.device.type == "cpu" and not bool(torch.all(counts >= 0)):  # also refuses NaN
        raise ValueError(f"task_counts must be non-negative numbers, got {counts.tolist()}")
    counts = counts.to(device=device, dtype=torch.float64)
    total = counts.clone()
    all_reduce_sum([total], process_group)
    shares = torch.where(total > 0, counts / total.clamp_min(1), torch.zeros_like(counts))
    if counts.device.type != "cpu":
        shares = torch.where((counts < 0).any(), float("nan"), shares)
    return shares


def global_losses(losses, shares, process_group=None):
    """Union-batch task losses ``Σ_r share_{k,r} L_{k,r}`` (detached float64) and which tasks
    have a sample in the union batch (bool; all True when no ``task_counts`` were given), the
    same on every rank; one all-reduce of 2K numbers.

    An absent task's loss is 0 (``grouped_mse`` of an empty group): a method that reads loss
    values (ratios, logs, per-task statistics) must leave it out rather than take the 0."""
    values = losses.detach().to(torch.float64)
    if world_size(process_group) == 1:
        return values, shares > 0
    reduced = torch.stack([values * shares, shares])
    all_reduce_sum([reduced], process_group)
    return reduced[0], reduced[1] > 0
