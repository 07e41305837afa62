"""Fused grouped MSE: the per-group mean losses of a batch in one pass over pred and target.

The C++/CUDA kernels are the torch ops ``torch.ops.ant_core.grouped_mse`` and
``torch.ops.ant_core.grouped_mse_backward`` (see csrc/ops/library.cpp for their schemas); the
autograd formula is a C++ kernel too (csrc/ops/grouped_mse_autograd.cpp: the Python autograd
path cost more host time per step than the kernels take on a GPU). This module registers the
fake (meta) kernels used by torch.compile and FakeTensor tracing, and provides the public
function :func:`grouped_mse`, the pure-torch :func:`reference_grouped_mse` (same semantics; the
reference for tests and a fallback users may call explicitly) and :func:`check_groups`.
"""
from __future__ import annotations

import operator

import torch

from ._extension import torch_ops
from .checks import check_bool

__all__ = ["grouped_mse", "reference_grouped_mse", "check_groups"]

_ops = torch_ops()
# The OpOverloads themselves: calling them skips the overload resolution of the packet.
_grouped_mse_op = _ops.grouped_mse.default
_grouped_mse_backward_op = _ops.grouped_mse_backward.default
_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _accumulate_dtype(pred: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    if pred.dtype == torch.float64 or target.dtype == torch.float64:
        return torch.float64
    return torch.float32


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only; torch.compile and FakeTensor tracing run these).
# ---------------------------------------------------------------------------------------------
def _check_metadata(pred, target, groups, num_groups, weight, op="grouped_mse"):
    """The metadata checks of the C++ op, so that traced code fails the same way."""
    if num_groups < 1:
        raise ValueError(f"{op}: num_groups must be >= 1, got {num_groups}")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in _FLOATING:
            raise TypeError(
                f"{op}: {name} must be a floating-point tensor (float32, float16, bfloat16 or "
                f"float64), got {t.dtype}"
            )
    if pred.dim() < 1 or pred.shape[0] < 1:
        raise ValueError(
            f"{op}: pred must have shape (B, ...) with B >= 1, got {tuple(pred.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"{op}: pred must have at least one element per sample, got shape "
                         f"{tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(
            f"{op}: target must have the shape of pred {tuple(pred.shape)}, "
            f"got {tuple(target.shape)}"
        )
    batch = pred.shape[0]
    if groups.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: groups must be an int64 or int32 tensor, got {groups.dtype}")
    if groups.dim() != 1 or groups.shape[0] != batch:
        raise ValueError(
            f"{op}: groups must have shape (B,) = ({batch},), got {tuple(groups.shape)}"
        )
    if weight is not None:
        if weight.dtype not in _FLOATING:
            raise TypeError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
        if weight.dim() != 1 or weight.shape[0] != batch:
            raise ValueError(
                f"{op}: weight must have shape (B,) = ({batch},), got {tuple(weight.shape)}"
            )
    # (also the op's Meta kernel: a CPU pred with a meta target returned uninitialised memory)
    for name, t in (("target", target), ("groups", groups), ("weight", weight)):
        if t is not None and t.device != pred.device:
            raise ValueError(f"{op}: {name} is on {t.device} but pred is on {pred.device}")


def _num_groups(num_groups, op):
    """``num_groups`` as an int >= 1: an int or numpy integer, not a bool, naming it."""
    if isinstance(num_groups, bool) or not hasattr(num_groups, "__index__"):
        raise TypeError(f"{op}: num_groups must be an int, got {type(num_groups).__name__}")
    num_groups = operator.index(num_groups)  # numpy integers too (e.g. labels.max() + 1)
    if num_groups < 1:
        raise ValueError(f"{op}: num_groups must be >= 1, got {num_groups}")
    return num_groups


@torch.library.register_fake("ant_core::grouped_mse")
def _grouped_mse_fake(pred, target, groups, num_groups, weight):
    _check_metadata(pred, target, groups, num_groups, weight)
    acc = _accumulate_dtype(pred, target)
    group_loss = pred.new_empty((num_groups,), dtype=acc)
    sample_mse = pred.new_empty((pred.shape[0],), dtype=acc)
    group_count = pred.new_empty((num_groups,), dtype=torch.int64)
    return group_loss, sample_mse, group_count


@torch.library.register_fake("ant_core::grouped_mse_backward")
def _grouped_mse_backward_fake(
    grad_group, grad_sample, pred, target, groups, group_count, weight, need_grad_target
):
    _check_metadata(pred, target, groups, group_count.shape[0], weight, "grouped_mse_backward")
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if need_grad_target:
        grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device)
    else:
        grad_target = target.new_empty((0,))
    return grad_pred, grad_target


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------
def grouped_mse(pred, target, groups, num_groups, weight=None, *, return_per_sample=False):
    """Per-group mean squared error of a batch, fused into one pass over ``pred`` and ``target``.

    For sample ``i`` the loss is ``l_i = w_i * mean((pred[i] - target[i]) ** 2)`` (mean over every
    non-batch dimension) and the result is, for each group ``k`` in ``[0, num_groups)``,
    ``L_k = mean_{i : groups[i] == k} l_i``. A group with no sample gives exactly 0 (never NaN)
    and receives no gradient.

    Args:
        pred: tensor of shape (B, ...), B >= 1, on CPU or CUDA; float32, float16, bfloat16 or
            float64. Need not be contiguous (a non-contiguous input is copied once).
        target: tensor of pred's shape and device; any of the same floating dtypes, which may
            differ from pred's (e.g. a bf16 model output under autocast against an fp32 noise
            target: both are read in their own dtype, no conversion copy is made).
        groups: int64 or int32 tensor of shape (B,), the group id of every sample.
        num_groups: K >= 1.
        weight: optional floating tensor of shape (B,), per-sample loss weights. Weights are
            differentiable: if ``weight.requires_grad`` it receives
            ``grad_L[g_i] / count[g_i] * mse_i`` (plus the per-sample path when used).
        return_per_sample: also return the (B,) per-sample losses ``l_i`` (computed in the same
            pass; no extra read of pred/target).

    Returns:
        ``L`` of shape (K,), or ``(L, per_sample)`` when ``return_per_sample``. The losses are
        float32 (accumulated in float32, tile sums combined in float64), or float64 when pred or
        target is float64. Gradients for pred and target come back in their own dtypes.

    Errors and group-id validation:
        Bad arguments raise ``ValueError`` (K < 1, shape or device mismatches) or ``TypeError``
        (non-floating pred/target/weight, non-integer groups), naming the argument. On CPU the
        group ids are checked on the host and an id outside ``[0, K)`` raises ``ValueError``.
        On CUDA they are checked on the device so the call never synchronizes with the host:
        the kernels never read or write out of bounds for a bad id, and if any id is out of
        range *every* group loss is NaN (poison), so a training loop sees NaN at once (samples
        with a bad id also get NaN gradients). Call :func:`check_groups` (which synchronizes)
        to get a ``ValueError`` instead.

    Works under autograd (gradients of any order: with ``create_graph=True`` the gradient comes
    from differentiable torch ops instead of the fused kernel), ``torch.compile(fullgraph=True)``
    (fake kernels are registered; give ``num_groups`` as a Python int there: dynamo traces a
    numpy integer as a tensor, which the op cannot take), AMP and CUDA graphs; CUDA kernels run
    on the current stream, one launch per direction, and give bitwise-identical results from run
    to run (as does the CPU path, whatever the thread count). Not under ``torch.func``
    transforms (``grad``, ``jacrev``, ...) or forward-mode AD: its autograd is a C++ function,
    which those cannot trace (``vmap`` works, slowly). :func:`reference_grouped_mse` computes
    the same thing with plain torch ops and works everywhere.
    """
    tensors = (("pred", pred), ("target", target), ("groups", groups))
    for name, value in tensors if weight is None else (*tensors, ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"grouped_mse: {name} must be a torch.Tensor, got "
                            f"{type(value).__name__}")
    num_groups = _num_groups(num_groups, "grouped_mse")
    check_bool("return_per_sample", return_per_sample)
    group_loss, sample_mse, _ = _grouped_mse_op(pred, target, groups, num_groups, weight)
    if not return_per_sample:
        return group_loss
    per_sample = sample_mse if weight is None else sample_mse * weight.to(sample_mse.dtype)
    return group_loss, per_sample


def reference_grouped_mse(
    pred, target, groups, num_groups, weight=None, *, return_per_sample=False
):
    """Pure-torch :func:`grouped_mse` (same arguments, semantics, dtypes and gradients).

    Several passes over the data (difference, square, mean): the reference for tests and a
    slower path that needs no compiled extension. Its arguments' shapes and dtypes are checked
    as the op's are (traceable: it compiles with ``fullgraph=True``); group ids are not (index_add
    raises on the CPU and asserts on CUDA; use :func:`check_groups`).
    """
    num_groups = _num_groups(num_groups, "reference_grouped_mse")
    check_bool("return_per_sample", return_per_sample)
    _check_metadata(pred, target, groups, num_groups, weight, op="reference_grouped_mse")
    acc = _accumulate_dtype(pred, target)
    batch = pred.shape[0]
    diff = pred.to(acc) - target.to(acc)
    sample_mse = diff.square().reshape(batch, -1).mean(dim=1)
    per_sample = sample_mse if weight is None else sample_mse * weight.to(acc)
    # group sums in float64 as the op's (float32 sums of 2e5 samples were 2e-4 off)
    index = groups.long()
    sums = torch.zeros(num_groups, dtype=torch.float64, device=pred.device).index_add(
        0, index, per_sample.double())
    counts = torch.zeros(num_groups, dtype=torch.float64, device=pred.device).index_add(
        0, index, torch.ones_like(per_sample, dtype=torch.float64))
    group_loss = (sums / counts.clamp_min(1)).to(acc)
    if return_per_sample:
        return group_loss, per_sample
    return group_loss


def check_groups(groups, num_groups):
    """Raise ``ValueError`` unless every id in ``groups`` lies in ``[0, num_groups)``.

    Synchronizes with the device (it reads the min and max back to the host). :func:`grouped_mse`
    itself does not do this on CUDA; it poisons the losses with NaN instead.
    """
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"check_groups: groups must be a tensor, got {type(groups).__name__}")
    if groups.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"check_groups: groups must be an int64 or int32 tensor, got {groups.dtype}"
        )
    if groups.dim() != 1:
        raise ValueError(f"check_groups: groups must be 1-D, got shape {tuple(groups.shape)}")
    num_groups = _num_groups(num_groups, "check_groups")
    if groups.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(groups))
    if low < 0 or high >= num_groups:
        bad = low if low < 0 else high
        raise ValueError(
            f"check_groups: groups contains id {bad}, outside [0, num_groups) = [0, {num_groups})"
        )
