"""Per-sample diffusion loss weightings: Min-SNR-γ, P2, and continuous uncertainty (EDM2).

All take the per-sample SNR (or log-SNR) as a tensor of shape (B,) and return per-sample weights
(or weighted losses) of the same shape, to multiply the per-sample loss with (e.g. the
``weight=`` argument of ``ant_core.grouped_mse``).

* :func:`min_snr_weight` — Hang et al. 2023: ``min(SNR, γ)/SNR`` (ε target),
  ``min(SNR, γ)/(SNR + 1)`` (v target), ``min(SNR, γ)`` (x0 target).
* :func:`p2_weight` — Choi et al. 2022: ``1 / (k + SNR)^γ``.
* :class:`ContinuousUncertainty` — Karras et al. 2024 (EDM2): ``loss · e^{−u(λ)} + u(λ)`` with
  ``u`` a small learned network of the log-SNR ``λ`` (uncertainty weighting made continuous).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .checks import TORCH_SEEDS, check_float, check_int, values_checkable

__all__ = ["min_snr_weight", "p2_weight", "ContinuousUncertainty"]

# SNR / log-SNR values are checked (ValueError) for CPU tensors in eager mode only
# (checks.values_checkable).

_TARGETS = ("eps", "v", "x0")


def _check_snr(snr, name="snr", allow_negative=False):
    if not isinstance(snr, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B,), got {type(snr).__name__}")
    if snr.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(snr.shape)}")
    if not snr.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {snr.dtype}")
    if not values_checkable(snr):
        return snr
    bad = ~torch.isfinite(snr) if allow_negative else torch.isnan(snr) | (snr < 0)
    if bad.any():
        raise ValueError(f"{name} must be {'finite' if allow_negative else 'non-negative'}"
                         " and not NaN")
    return snr


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, target: str = "eps") -> torch.Tensor:
    """Min-SNR-γ per-sample weight for prediction ``target`` in {"eps", "v", "x0"}.

    ``SNR = 0`` gives 1 for ε (the limit of ``min(SNR, γ)/SNR``), 0 for v and x0.
    """
    snr = _check_snr(snr)
    gamma = check_float("gamma", gamma, 0, strict=True)
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    clipped = torch.clamp(snr, max=gamma)
    if target == "eps":
        positive = snr > 0  # also for -0.0; the unused branch stays finite (its gradient too)
        return torch.where(positive, torch.clamp(gamma / torch.where(positive, snr, 1.0),
                                                 max=1.0), 1.0)
    if target == "v":
        return clipped / (snr + 1.0)
    return clipped


def p2_weight(snr: torch.Tensor, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2 weight ``1 / (k + SNR)^γ`` (γ = 0 gives 1, vanilla)."""
    snr = _check_snr(snr)
    k = check_float("k", k, 0, strict=True)
    gamma = check_float("gamma", gamma, 0)
    return (k + snr).pow(-gamma)


class ContinuousUncertainty(nn.Module):
    """EDM2 continuous uncertainty: ``loss · e^{−u(λ)} + u(λ)`` per sample.

    ``u`` maps the log-SNR ``λ`` (B,) through fixed random Fourier features
    ``√2 cos(2π(f · input_scale · λ + φ))`` (``f ~ N(0, 1)``, ``φ ~ U[0, 1)``, buffers) and a
    small MLP (``hidden`` units, 0 for a single linear layer as in EDM2) whose last layer
    starts at zero, so ``u ≡ 0`` (weight 1) at initialisation. For a fixed λ the objective is
    minimised at ``u = log E[loss]``: the learned weight ``e^{−u}`` is the inverse expected loss.
    Train its parameters with the model (EDM2 uses the model's learning rate). Differences from
    EDM2's code: the zero-initialised last layer (EDM2: a random weight-normalised one), the
    input λ·input_scale (EDM2 feeds ln σ / 4 = −λ / 8), and the trainer applies it to the plain
    per-sample MSE of the prediction target (EDM2: its preconditioned, λ-weighted loss).
    The Fourier frequencies and phases stay at least float32 when the module is cast to a half
    type (bfloat16 frequencies put λ = 60 a quarter turn off), and the features are computed
    in at least float32. ``input_scale`` is a constructor argument, not part of the state dict.
    """

    def __init__(self, num_features: int = 64, hidden: int = 0, input_scale: float = 0.25,
                 seed: int = 0):
        super().__init__()
        num_features = check_int("num_features", num_features, 1)
        hidden = check_int("hidden", hidden, 0)
        gen = torch.Generator().manual_seed(check_int("seed", seed, *TORCH_SEEDS))
        self.input_scale = check_float("input_scale", input_scale, 0, strict=True)
        self.register_buffer("frequencies", torch.randn(num_features, generator=gen))
        self.register_buffer("phases", torch.rand(num_features, generator=gen))
        if hidden:
            self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(num_features, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _apply(self, fn, *args, **kwargs):
        kept = {name: self._buffers[name] for name in ("frequencies", "phases")}
        super()._apply(fn, *args, **kwargs)
        for name, old in kept.items():  # a cast to a half type moves them but keeps float32
            new = self._buffers[name]
            if new.dtype.itemsize < 4:
                self._buffers[name] = old.to(new.device)
        return self

    def log_variance(self, log_snr: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """``u(λ)`` of shape (B,). ``check=False`` skips validating ``log_snr`` (its shape and
        dtype; its finiteness too, which is only tested for CPU tensors in eager mode)."""
        if check:
            log_snr = _check_snr(log_snr, "log_snr", allow_negative=True)
        # the phase f·λ·s + φ in at least float32: in bfloat16, λ = 60 was off by a quarter turn
        dtype = torch.promote_types(self.frequencies.dtype, torch.float32)
        x = log_snr.to(dtype)[:, None] * self.input_scale
        phase = x * self.frequencies.to(dtype) + self.phases.to(dtype)
        features = math.sqrt(2.0) * torch.cos(2 * math.pi * phase)
        return self.net(features.to(self.net[0].weight.dtype)).squeeze(-1)

    def forward(self, loss: torch.Tensor, log_snr: torch.Tensor, *,
                check: bool = True) -> torch.Tensor:
        """Per-sample ``loss · e^{−u} + u`` (B,); average it for the training loss. ``check`` as
        in :meth:`log_variance`."""
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
            raise TypeError(f"loss must be a floating-point tensor (B,), got "
                            f"{getattr(loss, 'dtype', type(loss).__name__)}")
        u = self.log_variance(log_snr, check=check)
        if loss.shape != u.shape:
            raise ValueError(f"loss must have the shape of log_snr {tuple(u.shape)}, got "
                             f"{tuple(loss.shape)}")
        return loss * torch.exp(-u) + u
