"""The common interface of the MTL methods, their registry, and the shared backward machinery.

Every method is an ``nn.Module`` created with :func:`create`::

    method = ant_core.mtl.create("uw", num_tasks=K)
    weights = method.backward(losses, model.parameters(), task_counts=counts)

``backward`` **adds** the combined gradient to ``.grad`` of the shared parameters exactly as
``loss.backward()`` would (existing ``.grad`` is accumulated into, never overwritten; parameters
with ``requires_grad=False`` are skipped; a parameter the losses do not depend on is left
untouched in a single process and receives zeros under DDP). It returns the task weights it used,
a float32 tensor (K,): the gradient written is exactly ``Σ_k w_k ∇L_k`` (for PCGrad, CAGrad,
Aligned-MTL … ``w`` are the combination coefficients of the per-task gradients).

DDP: the method does the gradient communication itself (see :mod:`ant_core.mtl.distributed`
for the semantics and each method module for its cost), so do **not** let
``DistributedDataParallel`` average the shared parameters' gradients as well: use the bare
model (broadcast the initial parameters once, e.g. by constructing them from the same seed), or
call the forward/backward inside ``ddp_model.no_sync()``. Every rank then ends with the same
gradient: the one a single process computes on the union of the ranks' batches.

Scale convention: equal weighting is ``w_k = 1/K``, i.e. plain diffusion training when the batch
is stratified; methods that normalise their weights make them sum to 1.

Keyword arguments of ``backward`` (all optional):

* ``task_counts`` — samples per task on this rank, shape (K,); needed for exact DDP results when
  ranks hold different counts (see :mod:`ant_core.mtl.distributed`).
* ``group`` — the per-sample task ids of the batch (needed by the one-backward engine; also
  gives ``task_counts`` when those are not passed).
* ``grad_scaler`` — a ``torch.amp.GradScaler``: pass *unscaled* losses; the backward runs on
  scaled values (no fp16 underflow) and ``.grad`` holds scaled gradients, so
  ``scaler.unscale_``/``scaler.step`` work as usual. Gradient methods solve on the unscaled
  Gramian; on a non-finite Gramian (fp16 overflow, or the Gramian of finite gradients
  scaled too far) they write a NaN gradient so that the scaler skips the step and lowers its
  scale, and return NaN weights.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..checks import check_int
from ..sampling import group_counts
from . import distributed

__all__ = ["MTLMethod", "create", "available", "register"]

_REGISTRY: dict = {}


def register(name):
    """Class decorator: make a method available to :func:`create` under ``name``."""

    def deco(cls):
        _REGISTRY[name] = cls
        cls.method_name = name
        return cls

    return deco


def available() -> list:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def create(name: str, num_tasks: int, **hparams) -> "MTLMethod":
    """Build the MTL method ``name`` for ``num_tasks`` tasks with its hyper-parameters."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _REGISTRY:
        raise ValueError(f"name must be one of {available()}, got {name!r}")
    return _REGISTRY[key](num_tasks=num_tasks, **hparams)


def _check_parameters(shared_parameters):
    if isinstance(shared_parameters, torch.Tensor):
        shared_parameters = [shared_parameters]
    params, seen = [], set()
    for p in shared_parameters:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"shared_parameters must hold tensors, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError("shared_parameters holds no tensor with requires_grad=True")
    return params


def _add_grad(param, grad, owned=False):
    """Accumulate into ``param.grad``; ``owned``: ``grad`` is a fresh tensor we may keep."""
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    if grad.requires_grad:
        grad = grad.detach()
    if param.grad is None:
        param.grad = grad if owned else grad.clone()
    else:
        param.grad.add_(grad)


def _loss_scale(grad_scaler, device):
    """The GradScaler's current scale as a float32 tensor (1 when absent or disabled)."""
    one = torch.ones((), dtype=torch.float32, device=device)
    if grad_scaler is None:
        return one
    if not hasattr(grad_scaler, "scale"):
        raise TypeError("grad_scaler must be a torch.amp.GradScaler")
    return grad_scaler.scale(one).float()


class MTLMethod(nn.Module):
    """Base class: a method combining K task losses into a gradient on shared parameters.

    Subclasses implement the weighting (loss-weighting methods) or the Gramian solve (gradient
    methods). ``process_group`` selects the DDP group (default: the world, when initialised).
    """

    method_name = "base"

    def __init__(self, num_tasks: int, *, process_group=None):
        super().__init__()
        self.num_tasks = check_int("num_tasks", num_tasks, 1)
        self.process_group = process_group

    # ----------------------------------------------------------------- argument handling
    def _check_losses(self, losses):
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"losses must be a tensor of shape ({self.num_tasks},)")
        if losses.shape != (self.num_tasks,):
            raise ValueError(f"losses must have shape ({self.num_tasks},), "
                             f"got {tuple(losses.shape)}")
        if not losses.is_floating_point():
            raise TypeError(f"losses must be floating point, got {losses.dtype}")
        return losses

    def _prepare(self, losses, shared_parameters, task_counts, group, grad_scaler):
        losses = self._check_losses(losses)
        if not losses.requires_grad:
            raise ValueError("losses do not require grad (computed under torch.no_grad() or "
                             "detached?): there is nothing to backpropagate")
        params = _check_parameters(shared_parameters)
        if task_counts is None and group is not None:
            task_counts = group_counts(group, self.num_tasks)
        shares = distributed.task_shares(self.num_tasks, task_counts, losses.device,
                                         self.process_group)
        scale = _loss_scale(grad_scaler, losses.device)
        return losses, params, shares, scale

    def param_groups(self, lr: float = 0.025, weight_decay: float = 0.0) -> list:
        """Optimizer parameter groups for the method's own parameters (empty if it has none)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    # ----------------------------------------------------------------- gradient writing
    def _weighted_backward(self, losses, params, weights, shares, scale, max_norm=None):
        """Add ``Σ_k w_k ∇L_k`` (union batch, loss-scaled) to ``.grad``; one backward.

        With ``max_norm`` the weights are first multiplied by ``min(1, max_norm / ‖Σ w ∇L‖)``
        (norm of the unscaled union gradient); returns the weights actually used.
        """
        coeffs = (weights * shares).to(losses.dtype) * scale.to(losses.dtype)
        objective = (coeffs * losses).sum()
        single = distributed.world_size(self.process_group) == 1
        if single and max_norm is None:  # accumulate straight into .grad, as loss.backward()
            torch.autograd.backward(objective, inputs=params)
            return weights
        if single and all(p.grad is None for p in params):  # clip in place, no copies
            torch.autograd.backward(objective, inputs=params)
            written = [p.grad for p in params if p.grad is not None]
            factor = self._clip_factor(written, scale, max_norm)
            if factor is not None:
                for g in written:
                    g.mul_(factor.to(g.dtype))
                weights = weights * factor
            return weights
        grads = torch.autograd.grad(objective, params, allow_unused=True,
                                    materialize_grads=not single)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        distributed.all_reduce_sum([g for _, g in pairs], self.process_group)
        if max_norm is not None:
            factor = self._clip_factor([g for _, g in pairs], scale, max_norm)
            if factor is not None:
                weights = weights * factor
                pairs = [(p, g * factor.to(g.dtype)) for p, g in pairs]
        for p, g in pairs:
            _add_grad(p, g)
        return weights

    @staticmethod
    def _clip_factor(grads, scale, max_norm):
        """``min(1, max_norm / ‖g‖)`` (float64 scalar tensor) for the unscaled gradient ``g``;
        None when the norm is not finite (the GradScaler then skips the step)."""
        if not grads:
            return None
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.detach()).double() for g in grads]))
        factor = torch.clamp(max_norm / (norm / scale.double() + 1e-12), max=1.0)
        return factor if bool(torch.isfinite(factor)) else None

    def backward(self, losses, shared_parameters, *, task_counts=None, group=None,
                 grad_scaler=None):
        """Fill ``.grad`` of ``shared_parameters``; return the task weights (float32, (K,))."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        """Shown by ``print(method)``."""
        return f"num_tasks={self.num_tasks}"


def warn_non_finite(method_name):
    """Loud warning used when a non-finite Gramian/loss is met without a GradScaler."""
    warnings.warn(f"{method_name}: non-finite task gradients; wrote the non-finite gradient "
                  "(use a GradScaler to skip such steps)", RuntimeWarning, stacklevel=3)
