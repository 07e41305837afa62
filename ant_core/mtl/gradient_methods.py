"""Gradient methods: per-task gradients -> Gramian -> coefficients -> ``Σ_k c_k g_k``.

The per-task gradients come from an engine (``engine="autograd"``, the K-backward reference, by
default; or a :class:`~ant_core.mtl.engines.OneBackwardEngine` for one backward on a model whose
batch is split into disjoint task segments). The solvers live in
:mod:`ant_core.mtl.gradient_solvers`.

With ``engine=AutogradEngine(chunk_numel=n)`` the per-task gradients are never all held: the
Gramian is accumulated over parameter chunks of at most ``n`` entries (K backward passes per
chunk, K·n extra memory), then one backward of ``Σ c_k L_k`` writes the gradient.

DDP cost: one all-reduce of the K·P per-task gradient entries (K times what DDP costs; the
Gramian then needs no communication) plus 2K numbers for counts. Nash-MTL on steps where it does
not refresh its weights costs what a loss-weighting method costs (P entries, one backward).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from ..checks import check_float, check_int
from . import distributed, gradient_solvers
from .base import MTLMethod, _add_grad, register, warn_non_finite
from .engines import OneBackwardEngine, resolve_engine

__all__ = ["PCGrad", "NashMTL", "MGDA", "CAGrad", "IMTLG", "AlignedMTL"]


class _GradientMethod(MTLMethod):
    """Shared ``backward`` of the Gramian-based methods (subclasses implement ``_solve``)."""

    def __init__(self, num_tasks, *, engine="autograd", process_group=None):
        super().__init__(num_tasks, process_group=process_group)
        self.engine = resolve_engine(engine)
        if isinstance(self.engine, OneBackwardEngine):  # its verdict's all-reduce: our group
            self.engine.verdict_reduce = functools.partial(distributed.all_reduce_sum,
                                                           process_group=process_group)

    def _solve(self, gramian: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _post_scale(self, coeffs, gramian):
        return coeffs

    def task_gradients(self, losses, shared_parameters, *, task_counts=None, group=None,
                       grad_scaler=None):
        """Union-batch per-task gradients (a :class:`~ant_core.mtl.task_gradients.TaskGradients`)
        and the Gramian.

        Gradients are loss-scaled (by the GradScaler's scale); the Gramian (float64 numpy) is
        unscaled. Returns ``(params, task_grads, gramian, scale)``.
        """
        losses, params, shares, scale = self._prepare(losses, shared_parameters, task_counts,
                                                      group, grad_scaler)
        scaled = losses * (shares * scale.double()).to(losses.dtype)
        grads = self._reduced(self.engine.task_gradients(scaled, params, group=group))
        gramian = grads.gramian().to(losses.device) / scale.double() ** 2
        return params, grads, gramian.cpu().numpy(), scale

    def _reducer(self):
        """The in-place SUM all-reduce of a tensor list under DDP, None in one process."""
        if distributed.world_size(self.process_group) == 1:
            return None
        return lambda tensors: distributed.all_reduce_sum(tensors, self.process_group)

    def _reduced(self, grads):
        reduce = self._reducer()
        if reduce is not None:
            grads.reduce(reduce)
        return grads

    def _coefficients(self, gramian, grad_scaler):
        """``(coeffs, finite)``: the method's coefficients for a finite Gramian (float64
        numpy). For a non-finite one: with a GradScaler, NaN, so that the written gradient is
        not finite and the scaler skips the step and lowers its scale (the Gramian of scaled
        gradients can overflow while the gradients are finite); without one, equal weights
        and a warning."""
        if np.all(np.isfinite(gramian)):
            return self._post_scale(self._solve(gramian), gramian), True
        if grad_scaler is not None and grad_scaler.is_enabled():
            return np.full(self.num_tasks, np.nan), False
        warn_non_finite(self.method_name)
        return np.full(self.num_tasks, 1.0 / self.num_tasks), False

    def _returned(self, coeffs, finite, device):
        """What ``backward`` returns: ``coeffs`` as float32, or NaN when the Gramian was not
        finite."""
        if not finite:
            return torch.full((self.num_tasks,), float("nan"), device=device)
        return torch.as_tensor(coeffs, dtype=torch.float32, device=device)

    @staticmethod
    def _write(params, grads, coeffs):
        for p, g in zip(params, grads.combine(torch.as_tensor(coeffs, dtype=torch.float64))):
            if g is not None:
                _add_grad(p, g, owned=True)

    def _backward_chunked(self, losses, shared_parameters, task_counts, group, grad_scaler):
        """Memory-bounded path: Gramian chunk by chunk, then one backward of ``Σ c_k L_k``."""
        losses, params, shares, scale = self._prepare(losses, shared_parameters, task_counts,
                                                      group, grad_scaler)
        scaled = losses * (shares * scale.double()).to(losses.dtype)
        gramian = torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64)
        for chunk in self.engine.chunks(params):
            grads = self._reduced(self.engine.task_gradients(scaled, chunk, group=group,
                                                             retain_graph=True))
            gramian += grads.gramian().cpu()
            del grads
        gramian = (gramian / scale.double().cpu() ** 2).numpy()
        coeffs, finite = self._coefficients(gramian, grad_scaler)
        self._weighted_backward(losses, params, torch.as_tensor(coeffs, device=losses.device),
                                shares, scale)
        return self._returned(coeffs, finite, losses.device)

    def _backward_lean(self, losses, shared_parameters, task_counts, group, grad_scaler):
        """One-backward engine path: Gramian layer by layer, then one combined weight pass."""
        losses, params, shares, scale = self._prepare(losses, shared_parameters, task_counts,
                                                      group, grad_scaler)
        scaled = losses * (shares * scale.double()).to(losses.dtype)
        reduce = self._reducer()
        gramian, write = self.engine.gramian_and_writer(scaled, params, group=group,
                                                        reduce=reduce)
        gramian = (gramian.cpu() / scale.double().cpu() ** 2).numpy()
        coeffs, finite = self._coefficients(gramian, grad_scaler)
        combined = write(torch.as_tensor(coeffs, dtype=torch.float64))
        if reduce is not None:
            combined = [torch.zeros_like(p) if g is None else g
                        for p, g in zip(params, combined)]
            reduce(combined)
        for p, g in zip(params, combined):
            if g is not None:
                _add_grad(p, g, owned=True)
        return self._returned(coeffs, finite, losses.device)

    def backward(self, losses, shared_parameters, *, task_counts=None, group=None,
                 grad_scaler=None):
        """Fill ``.grad`` with ``Σ c_k g_k`` (union batch); return ``c`` as float32 (K,)."""
        if getattr(self.engine, "low_memory", False):
            return self._backward_lean(losses, shared_parameters, task_counts, group,
                                       grad_scaler)
        if getattr(self.engine, "chunk_numel", None) is not None:
            return self._backward_chunked(losses, shared_parameters, task_counts, group,
                                          grad_scaler)
        params, grads, gramian, _ = self.task_gradients(
            losses, shared_parameters, task_counts=task_counts, group=group,
            grad_scaler=grad_scaler)
        coeffs, finite = self._coefficients(gramian, grad_scaler)
        self._write(params, grads, coeffs)
        return self._returned(coeffs, finite, losses.device)


@register("pcgrad")
class PCGrad(_GradientMethod):
    """PCGrad (Yu et al. 2020), mean over tasks, computed from the Gramian.

    Random projection orders come from a numpy generator seeded with ``seed`` (the same on all
    ranks, so all ranks agree without communication).
    """

    def __init__(self, num_tasks, *, seed: int = 0, engine="autograd", process_group=None):
        super().__init__(num_tasks, engine=engine, process_group=process_group)
        self.rng = np.random.default_rng(check_int("seed", seed, 0))

    def _solve(self, gramian):
        return gradient_solvers.pcgrad_coefficients(gramian, self.rng)

    def get_extra_state(self):
        """The projection-order generator's state, so state_dict() resumes exactly."""
        return {"rng": self.rng.bit_generator.state}

    def set_extra_state(self, state):
        self.rng.bit_generator.state = state["rng"]


@register("mgda")
class MGDA(_GradientMethod):
    """MGDA (Sener & Koltun 2018): the min-norm convex combination of the task gradients."""

    def _solve(self, gramian):
        return gradient_solvers.mgda_weights(gramian)


@register("cagrad")
class CAGrad(_GradientMethod):
    """CAGrad (Liu et al. 2021) with conflict radius ``c`` (default 0.4) and ``rescale=1``."""

    def __init__(self, num_tasks, *, c: float = 0.4, engine="autograd", process_group=None):
        super().__init__(num_tasks, engine=engine, process_group=process_group)
        self.c = check_float("c", c, 0)
        if self.c > 1e150:  # c = 1e200: the solve's c^2 overflowed
            raise ValueError(f"c must be at most 1e150, got {c}")

    def _solve(self, gramian):
        return gradient_solvers.cagrad_coefficients(gramian, c=self.c)


@register("imtlg")
class IMTLG(_GradientMethod):
    """IMTL-G (Liu et al. 2021): equal projection of the update on every task direction."""

    def _solve(self, gramian):
        return gradient_solvers.imtlg_coefficients(gramian)


@register("alignedmtl")
class AlignedMTL(_GradientMethod):
    """Aligned-MTL (Senushkin et al. 2023): condition the task matrix to ``σ_min U Vᵀ``."""

    def _solve(self, gramian):
        return gradient_solvers.aligned_mtl_coefficients(gramian)


@register("nashmtl")
class NashMTL(_GradientMethod):
    """Nash-MTL (Navon et al. 2022) in the paper's form: weights ``α / K`` with ``Gα = 1/α``.

    ``update_weights_every`` (default 1; the ANT paper uses 25): the Gramian solve (K per-task
    gradients) happens every that many calls; other calls do one backward with the last
    weights. ``max_norm`` (default 1.0, None disables): the weights are scaled by
    ``min(1, max_norm / ‖Σ w_k g_k‖)`` — the clipping of the reference implementation, folded
    into the returned weights. The solve is damped Newton (no cvxpy); on failure it raises
    :class:`~ant_core.mtl.gradient_solvers.NashMTLSolveError` (``on_failure="raise"``, default)
    or, with ``on_failure="warn"``, warns and reuses the previous weights (raising when there
    are none). It never falls back to equal weights.
    """

    def __init__(self, num_tasks, *, update_weights_every: int = 1, max_norm=1.0,
                 on_failure: str = "raise", max_iter: int = 100, engine="autograd",
                 process_group=None):
        super().__init__(num_tasks, engine=engine, process_group=process_group)
        update_weights_every = check_int("update_weights_every", update_weights_every, 1)
        if max_norm is not None:
            max_norm = check_float("max_norm", max_norm, 0, strict=True)
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        self.update_weights_every = update_weights_every
        self.max_norm = max_norm
        self.on_failure = on_failure
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("alpha", torch.full((num_tasks,), float("nan"), dtype=torch.float64))

    def _solve(self, gramian):
        try:
            alpha = gradient_solvers.nash_mtl_weights(gramian, max_iter=self.max_iter)
        except gradient_solvers.NashMTLSolveError as error:
            if self.on_failure == "raise" or torch.isnan(self.alpha).any():
                raise
            warnings.warn(f"Nash-MTL solve failed ({error}); reusing the previous weights",
                          RuntimeWarning, stacklevel=3)
            alpha = self.alpha.cpu().numpy()
        self.alpha.copy_(torch.as_tensor(alpha))
        return alpha / self.num_tasks

    def _post_scale(self, coeffs, gramian):
        if self.max_norm is None:
            return coeffs
        norm = np.sqrt(max(coeffs @ gramian @ coeffs, 0.0))
        return coeffs * min(1.0, self.max_norm / norm) if norm > 0 else coeffs

    def backward(self, losses, shared_parameters, *, task_counts=None, group=None,
                 grad_scaler=None):
        """As the other gradient methods; every ``update_weights_every`` calls re-solves."""
        refresh = int(self.calls) % self.update_weights_every == 0 or torch.isnan(self.alpha).any()
        self.calls += 1
        if refresh:
            return super().backward(losses, shared_parameters, task_counts=task_counts,
                                    group=group, grad_scaler=grad_scaler)
        discard = getattr(self.engine, "discard", None)
        if discard is not None:  # drop what a one-backward engine recorded
            discard()
        losses, params, shares, scale = self._prepare(losses, shared_parameters, task_counts,
                                                      group, grad_scaler)
        weights = self.alpha.to(losses.device) / self.num_tasks
        weights = self._weighted_backward(losses, params, weights, shares, scale,
                                          max_norm=self.max_norm)
        return weights.float()


