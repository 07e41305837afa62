"""Loss-weighting methods: one backward of ``Σ_k w_k L_k`` per step.

DDP cost of every method here: one all-reduce of 2K numbers (task counts and losses, so the
weights are computed from the union-batch losses and agree on all ranks) plus one all-reduce of
the P gradient entries (what DDP itself costs). GradNorm adds K·|W| for its chosen layer W.
Own parameters (UW's log-variances, GradNorm's weights) receive loss-scaled ``.grad`` like the
model, so put :meth:`MTLMethod.param_groups` in the optimizer the GradScaler steps.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..checks import TORCH_SEEDS, check_bool, check_float, check_int
from ..sampling import group_counts
from . import distributed
from .base import MTLMethod, register

__all__ = ["EqualWeighting", "UncertaintyWeighting", "DynamicWeightAverage",
           "RandomLossWeighting", "GradNorm", "FAMO"]


class _LossWeighting(MTLMethod):
    """Shared ``backward``: global losses -> ``_weights`` -> one weighted backward.

    ``_weights(global_losses, present, scale)`` gets the union-batch losses and which tasks have
    a sample in the union batch (known from ``task_counts`` / ``group``; else all True): an
    absent task's loss is 0 and must not enter the method's statistics.
    """

    def _weights(self, global_losses, present, scale):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, losses, shared_parameters, *, task_counts=None, group=None,
                 grad_scaler=None):
        """Fill ``.grad`` of ``shared_parameters`` with ``Σ w_k ∇L_k``; return ``w`` (float32)."""
        losses, params, shares, scale = self._prepare(losses, shared_parameters, task_counts,
                                                      group, grad_scaler)
        self._params, self._shares = params, shares  # for methods needing layer gradients
        self._losses = losses
        try:
            weights = self._weights(
                *distributed.global_losses(losses, shares, self.process_group), scale)
        finally:
            del self._params, self._shares, self._losses
        weights = self._weighted_backward(losses, params, weights.detach().double(), shares,
                                          scale)
        return weights.float()


@register("ew")
class EqualWeighting(_LossWeighting):
    """Equal weights ``w_k = 1/K`` (vanilla training on a stratified batch)."""

    def _weights(self, global_losses, present, scale):
        return torch.full_like(global_losses, 1.0 / self.num_tasks)


@register("uw")
class UncertaintyWeighting(_LossWeighting):
    """Uncertainty weighting in the paper's form ``Σ_k ½(e^{−s_k} L_k / K + s_k)``.

    ``s`` (``log_vars``, init 0) is an ``nn.Parameter``; ``backward`` also adds the objective's
    gradient to ``log_vars.grad`` (computed on the union-batch losses). The paper trains ``s``
    in its own optimizer group: ``AdamW(model_groups + uw.param_groups())`` where
    ``param_groups()`` gives lr 0.025 and no weight decay. Weights ``w_k = ½ e^{−s_k} / K``.
    A task absent from the batch contributes nothing to the objective (its ``s_k`` is not
    pushed down by a loss of 0).
    """

    def __init__(self, num_tasks, *, process_group=None):
        super().__init__(num_tasks, process_group=process_group)
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def _weights(self, global_losses, present, scale):
        s = self.log_vars
        losses = global_losses.to(device=s.device, dtype=s.dtype)
        terms = torch.exp(-s) * losses / self.num_tasks + s
        objective = 0.5 * torch.where(present.to(s.device), terms, 0.0).sum()
        (grad,) = torch.autograd.grad(objective, s)
        grad = grad * scale.to(device=s.device, dtype=s.dtype)
        s.grad = grad if s.grad is None else s.grad + grad
        weights = 0.5 * torch.exp(-s.detach().double()) / self.num_tasks
        return weights.to(global_losses.device)


@register("dwa")
class DynamicWeightAverage(_LossWeighting):
    """Dynamic Weight Average (Liu et al. 2019): ``w = softmax(r / temperature)``.

    ``r_k = L_k(t−1) / L_k(t−2)`` from the union-batch losses of the two previous calls;
    ``w = 1/K`` until two calls have been seen. Weights sum to 1. A task absent from a batch
    keeps its previous loss in the history, and a ratio that is not a finite positive number
    (a task not seen yet, a non-finite loss) counts as 1.
    """

    def __init__(self, num_tasks, *, temperature: float = 2.0, process_group=None):
        super().__init__(num_tasks, process_group=process_group)
        self.temperature = check_float("temperature", temperature, 0, strict=True)
        self.register_buffer("loss_history", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def _weights(self, global_losses, present, scale):
        before, last = self.loss_history
        if int(self.calls) >= 2:
            ratio = last / before
            ratio = torch.where((before > 0) & torch.isfinite(ratio) & (ratio > 0), ratio, 1.0)
            weights = torch.softmax(ratio / self.temperature, dim=0)
        else:
            weights = torch.full_like(global_losses, 1.0 / self.num_tasks)
        current = torch.where(present.to(last.device), global_losses.to(last), last)
        self.loss_history.copy_(torch.stack([last, current]))
        self.calls += 1
        return weights.to(global_losses.device)


@register("rlw")
class RandomLossWeighting(_LossWeighting):
    """Random loss weighting (Lin et al. 2022): ``w = softmax(z)``, ``z ~ N(0, I)`` each step.

    Drawn from a private generator seeded with ``seed`` (identical on all ranks).
    """

    def __init__(self, num_tasks, *, seed: int = 0, process_group=None):
        super().__init__(num_tasks, process_group=process_group)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed, *TORCH_SEEDS))

    def _weights(self, global_losses, present, scale):
        z = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
        return torch.softmax(z, dim=0).to(global_losses.device)

    def get_extra_state(self):
        """The generator's state, so state_dict() resumes exactly."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])


@register("gradnorm")
class GradNorm(_LossWeighting):
    """GradNorm (Chen et al. 2018) with learnable weights ``task_weights`` (sum K).

    Per-task gradient norms ``n_k = ‖∇_W L_k‖`` are taken at one shared parameter ``W``:
    ``gradnorm_parameter`` (a tensor among the shared parameters, or an index into them);
    default the **last** shared parameter with ``requires_grad`` (the output layer's last
    tensor in a usual ``model.parameters()`` order). The balancing loss
    ``Σ_k |w_k n_k − mean(w n) · r_k^α|`` (``r_k`` the relative inverse training rate from the
    first finite loss of each task, target held constant; the means are over the tasks present
    in the batch with a finite loss) gives ``task_weights.grad``; the weights are renormalised to sum to K at each call.
    Gradient written: ``Σ (w_k / K) ∇L_k``.
    Costs K extra backward passes restricted to ``W``.
    """

    def __init__(self, num_tasks, *, alpha: float = 1.5, gradnorm_parameter=None,
                 process_group=None):
        super().__init__(num_tasks, process_group=process_group)
        self.alpha = check_float("alpha", alpha, 0)
        if gradnorm_parameter is not None and not isinstance(gradnorm_parameter, torch.Tensor):
            check_int("gradnorm_parameter", gradnorm_parameter)  # its range: at the first call
        self.gradnorm_parameter = gradnorm_parameter
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("initialised", torch.zeros(num_tasks, dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "initialised"
        if key in state_dict and state_dict[key].dim() == 0:  # saved by ant-core <= 0.1.0
            state_dict[key] = state_dict[key].expand(self.num_tasks).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _layer(self):
        chosen = self.gradnorm_parameter
        if chosen is None:
            return self._params[-1]
        if not isinstance(chosen, torch.Tensor):  # an index into the shared parameters
            n = len(self._params)
            return self._params[check_int("gradnorm_parameter", chosen, -n, n - 1)]
        if not any(chosen is p for p in self._params):
            raise ValueError("gradnorm_parameter must be one of the shared parameters")
        return chosen

    def _weights(self, global_losses, present, scale):
        with torch.no_grad():
            self.task_weights.mul_(self.num_tasks / self.task_weights.sum())
        # each task's first finite loss (a NaN one, e.g. from an fp16 step the GradScaler
        # skips, made every later ratio NaN: the balancing gradient was 0 for good)
        finite = torch.isfinite(global_losses).to(self.initialised.device)
        present = present.to(self.initialised.device) & finite
        first = present & ~self.initialised
        self.initial_losses.copy_(torch.where(first, global_losses.to(self.initial_losses),
                                              self.initial_losses))
        self.initialised |= first
        layer = self._layer()
        scaled = self._losses * (self._shares * scale.double()).to(self._losses.dtype)
        layer_grads = []
        for k in range(self.num_tasks):
            g = torch.autograd.grad(scaled[k], layer, retain_graph=True, allow_unused=True,
                                    materialize_grads=True)[0]
            layer_grads.append(g.detach())
        distributed.all_reduce_sum(layer_grads, self.process_group)
        device = self.task_weights.device
        norms = (torch.stack([g.double().norm() for g in layer_grads]) / scale.double()).to(device)
        w = self.task_weights.detach().double()
        weighted = w * norms
        present = present.to(device)
        mean = lambda x: torch.where(present, x, 0.0).sum() / present.sum()
        ratio = torch.where(present, global_losses.to(device)
                            / self.initial_losses.to(device).clamp_min(1e-12), 0.0)
        target = mean(weighted) * (ratio / mean(ratio)) ** self.alpha
        grad = torch.sign(weighted - target) * norms * scale.double().to(device)
        tw = self.task_weights
        grad = grad.to(tw)
        tw.grad = grad if tw.grad is None else tw.grad + grad
        return (w / self.num_tasks).to(global_losses.device)


@register("famo")
class FAMO(_LossWeighting):
    """FAMO (Liu et al. 2023): fast adaptive multitask optimisation, O(1) extra backward.

    Task logits ``ξ`` (buffer ``logits``), ``z = softmax(ξ)``, ``D_k = L_k − min_loss_k + ε``.
    ``backward`` writes the gradient of ``Σ_k z_k log D_k / c`` with ``c = Σ_j z_j / D_j``, i.e.
    weights ``w_k = z_k / (c D_k)`` (sum 1). The logit update needs the losses after the step:
    ``δ_k = log D_k(before) − log D_k(after)``, the logit gradient ``J_softmax(ξ)ᵀ δ``, then one
    Adam step (``lr``, betas (0.9, 0.999), eps 1e-8, L2 ``weight_decay`` added to the gradient,
    as torch.optim.Adam) on ``ξ``; the Adam state lives in buffers (checkpointed).

    ``reevaluate=True`` (default, the paper's algorithm): after ``optimizer.step()`` call
    :meth:`update` with the losses recomputed (under ``torch.no_grad()``) on the same batch —
    one extra forward pass per step (+30% step time in ``benchmarks/bench_mtl.py``).
    ``reevaluate=False``: no extra forward; each ``backward`` first updates the logits with its
    own losses as the "after" losses of the previous step (a new batch, so δ is noisier; with a
    stratified sampler every task's loss is still an estimate over the same cluster).

    A task absent from the batch gets weight 0 (the others renormalised) and ``δ_k = 0``; a
    step whose ``δ`` is not finite (a NaN or inf loss) leaves the logits and Adam state as they
    were, so one bad step (e.g. an fp16 overflow the GradScaler skips) does not poison them.
    """

    def __init__(self, num_tasks, *, lr: float = 0.025, weight_decay: float = 1e-3,
                 epsilon: float = 1e-8, min_losses=None, reevaluate: bool = True,
                 process_group=None):
        super().__init__(num_tasks, process_group=process_group)
        self.reevaluate = check_bool("reevaluate", reevaluate)
        self._awaiting_update = False  # backward ran, update not yet (reevaluate=True)
        self._warned_no_update = False
        self.lr = check_float("lr", lr, 0, strict=True)
        self.weight_decay = check_float("weight_decay", weight_decay, 0)
        self.epsilon = check_float("epsilon", epsilon, 0, strict=True)
        mins = torch.zeros(num_tasks) if min_losses is None else torch.as_tensor(min_losses)
        if mins.shape != (num_tasks,) or not bool(torch.isfinite(mins.double()).all()):
            raise ValueError(f"min_losses must be {num_tasks} finite numbers, got "
                             f"{mins.tolist()}")
        self.register_buffer("min_losses", mins.double())
        self.register_buffer("logits", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("adam_exp_avg", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("adam_exp_avg_sq", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("previous_losses", torch.full((num_tasks,), float("nan"),
                                                           dtype=torch.float64))

    def _shifted(self, global_losses):
        return global_losses - self.min_losses.to(global_losses.device) + self.epsilon

    def _weights(self, global_losses, present, scale):
        if not self.reevaluate:
            self._step_logits(global_losses, present)
        elif self._awaiting_update and not self._warned_no_update:
            self._warned_no_update = True
            warnings.warn("FAMO: backward ran again without update() after the previous one; "
                          "with reevaluate=True the task weights adapt only in update(losses "
                          "after optimizer.step()): call it every step, or use "
                          "reevaluate=False", stacklevel=3)
        shifted = self._shifted(global_losses)
        z = torch.softmax(self.logits.to(shifted.device), dim=0)
        ratios = torch.where(present, z / shifted, 0.0)
        # previous_losses: NaN marks "no loss" (an absent task, or no step yet)
        self.previous_losses.copy_(torch.where(present, global_losses, float("nan")))
        self._awaiting_update = self.reevaluate
        return ratios / ratios.sum()

    @torch.no_grad()
    def update(self, new_losses, *, task_counts=None, group=None):
        """Update the logits from the losses after the step (same batch); returns ``δ``."""
        if not self.reevaluate:
            raise RuntimeError("FAMO(reevaluate=False) updates its logits in backward; "
                               "do not call update")
        new_losses = self._check_losses(new_losses)
        if not self._awaiting_update:
            raise RuntimeError("FAMO.update called before backward")
        if task_counts is None and group is not None:
            task_counts = group_counts(group, self.num_tasks)
        shares = distributed.task_shares(self.num_tasks, task_counts, new_losses.device,
                                         self.process_group)
        delta = self._step_logits(*distributed.global_losses(new_losses, shares,
                                                             self.process_group))
        self.previous_losses.fill_(float("nan"))
        self._awaiting_update = False
        return delta

    def _step_logits(self, new, present):
        """One Adam step on the logits from ``previous_losses`` → ``new``; returns ``δ``.

        ``δ_k`` is 0 for a task without a loss on either side; the step is taken only when some
        task has both and every such ``δ_k`` is finite, decided on the device: the state is never
        read back to the host (a sync per step on a GPU).
        """
        previous = self.previous_losses.to(new.device)
        both = present & ~torch.isnan(previous)
        delta = torch.where(both, torch.log(self._shifted(previous))
                            - torch.log(self._shifted(new)), 0.0)
        finite = torch.isfinite(delta)
        active = (both.any() & finite.all()).to(self.logits.device)
        delta = torch.where(finite, delta, 0.0).to(self.logits.device)
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * self.logits
        step = self.adam_step + 1
        exp_avg = torch.add(self.adam_exp_avg * 0.9, grad, alpha=0.1)
        exp_avg_sq = torch.addcmul(self.adam_exp_avg_sq * 0.999, grad, grad, value=0.001)
        t = step.to(exp_avg.dtype)
        denom = (exp_avg_sq / (1 - 0.999 ** t)).sqrt() + 1e-8
        logits = self.logits - self.lr * (exp_avg / (1 - 0.9 ** t)) / denom
        for state, value in ((self.adam_step, step), (self.adam_exp_avg, exp_avg),
                             (self.adam_exp_avg_sq, exp_avg_sq), (self.logits, logits)):
            state.copy_(torch.where(active, value, state))
        return delta
