"""Discrete noise schedules: betas, alphas_cumprod, SNR and log-SNR for timesteps t in [0, T).

numpy only (no torch import). A schedule is defined by its cumulative product of alphas,
alpha_bar_t; everything else follows: SNR_t = alpha_bar_t / (1 - alpha_bar_t) (as in VDM),
log-SNR_t = log(alpha_bar_t) - log1p(-alpha_bar_t), sigma_t = sqrt(1 / SNR_t).
"""
from __future__ import annotations

import math

import numpy as np

from .checks import check_float, check_int, real_array

__all__ = [
    "NoiseSchedule",
    "SCHEDULES",
    "cosine",
    "from_alphas_cumprod",
    "from_betas",
    "from_scheduler",
    "get_schedule",
    "linear",
    "log_snr_grid",
    "scaled_linear",
]


class NoiseSchedule:
    """A discrete diffusion noise schedule, given by alpha_bar_t (``alphas_cumprod``).

    Attributes are numpy float64 arrays of length ``T``; timesteps are 0-indexed (t = 0 is the
    least noisy). ``alphas_cumprod`` must lie in [0, 1] and be non-increasing.
    """

    def __init__(self, alphas_cumprod, name: str = "custom"):
        ac = real_array("alphas_cumprod", alphas_cumprod)
        if ac.ndim != 1 or ac.size == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {ac.shape}")
        if not np.all(np.isfinite(ac)):
            raise ValueError("alphas_cumprod must be finite")
        if ac.min() < 0.0 or ac.max() > 1.0:
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if np.any(np.diff(ac) > 0):
            raise ValueError("alphas_cumprod must be non-increasing in t (t = 0 least noisy)")
        self.alphas_cumprod = ac
        self.name = name

    @property
    def T(self) -> int:
        return int(self.alphas_cumprod.size)

    @property
    def betas(self) -> np.ndarray:
        prev = np.concatenate(([1.0], self.alphas_cumprod[:-1]))
        with np.errstate(divide="ignore", invalid="ignore"):
            alphas = np.where(prev > 0, self.alphas_cumprod / np.where(prev > 0, prev, 1.0), 0.0)
        return 1.0 - alphas

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def snr(self) -> np.ndarray:
        ac = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            return ac / (1.0 - ac)

    @property
    def log_snr(self) -> np.ndarray:
        """log(SNR); -inf where alpha_bar is 0 (zero terminal SNR), +inf where it is 1."""
        ac = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            return np.log(ac) - np.log1p(-ac)

    @property
    def sigmas(self) -> np.ndarray:
        """Noise-to-signal ratio sqrt((1 - alpha_bar) / alpha_bar) (the EDM / k-diffusion sigma)."""
        ac = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            return np.sqrt((1.0 - ac) / ac)

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, T={self.T})"


def from_betas(betas, name: str = "custom") -> NoiseSchedule:
    b = real_array("betas", betas)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or b.min() < 0.0 or b.max() > 1.0:
        raise ValueError("betas must be finite and lie in [0, 1]")
    return NoiseSchedule(np.cumprod(1.0 - b), name=name)


def _check_betas(beta_start, beta_end):
    """Both betas as floats in (0, 1) (a variance must be positive and below 1)."""
    betas = (check_float("beta_start", beta_start, 0, strict=True),
             check_float("beta_end", beta_end, 0, strict=True))
    for name, value in zip(("beta_start", "beta_end"), betas):
        if value >= 1:
            raise ValueError(f"{name} must be < 1, got {value}")
    return betas


def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """DDPM (Ho et al. 2020): betas linear from beta_start to beta_end."""
    T = check_int("T", T, 1)
    beta_start, beta_end = _check_betas(beta_start, beta_end)
    return from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64), name="linear")


def scaled_linear(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """Stable Diffusion / LDM: sqrt(beta) linear (diffusers' 'scaled_linear')."""
    T = check_int("T", T, 1)
    beta_start, beta_end = _check_betas(beta_start, beta_end)
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2
    return from_betas(betas, name="scaled_linear")


def cosine(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Improved DDPM (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2),
    betas clipped at max_beta."""
    T = check_int("T", T, 1)
    s = check_float("s", s, 0)
    max_beta = check_float("max_beta", max_beta, 0, strict=True)
    if max_beta >= 1:
        raise ValueError(f"max_beta must be < 1, got {max_beta}")

    def f(u):
        return np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2

    t = np.arange(T, dtype=np.float64)
    betas = np.minimum(1.0 - f((t + 1) / T) / f(t / T), max_beta)
    return from_betas(betas, name="cosine")


def log_snr_grid(T: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0):
    """A continuous-time schedule discretised on T points, uniform in log-SNR from
    log(1 / sigma_min^2) (t = 0) down to log(1 / sigma_max^2) (t = T - 1); the EDM defaults.
    As a variance-preserving schedule: alpha_bar = sigmoid(log-SNR)."""
    T = check_int("T", T, 1)
    sigma_min = check_float("sigma_min", sigma_min, 0, strict=True)
    sigma_max = check_float("sigma_max", sigma_max, 0, strict=True)
    if not sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    lam = np.linspace(-2 * math.log(sigma_min), -2 * math.log(sigma_max), T)
    schedule = NoiseSchedule(1.0 / (1.0 + np.exp(-lam)), name="log_snr_grid")
    ac = schedule.alphas_cumprod[0]  # alpha_bar -> 1 loses sigma_min (1e-8 rounds it to 1)
    if not abs(math.sqrt((1.0 - ac) / ac) / sigma_min - 1) <= 1e-4:
        raise ValueError(f"sigma_min={sigma_min} is too small for a variance-preserving "
                         "alpha_bar in float64 to keep to 1e-4 (sigma_min >= 1e-6 does)")
    return schedule


def from_alphas_cumprod(alphas_cumprod, name: str = "custom") -> NoiseSchedule:
    return NoiseSchedule(alphas_cumprod, name=name)


def from_scheduler(scheduler) -> NoiseSchedule:
    """Any object with an ``alphas_cumprod`` attribute (a diffusers scheduler, an ADM/DiT
    GaussianDiffusion, ...); diffusers itself is never imported."""
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(
            f"scheduler must have an 'alphas_cumprod' attribute, {type(scheduler).__name__} has none"
        )
    return NoiseSchedule(scheduler.alphas_cumprod, name=type(scheduler).__name__)


SCHEDULES = {
    "linear": linear,
    "cosine": cosine,
    "scaled_linear": scaled_linear,
    "log_snr_grid": log_snr_grid,
}


def get_schedule(schedule="linear", T: int | None = None) -> NoiseSchedule:
    """Resolve a schedule: a name in SCHEDULES (with T, default 1000), a NoiseSchedule, an object
    with ``alphas_cumprod``, or an array of alphas_cumprod. T, when given, must match."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        return SCHEDULES[schedule](1000 if T is None else T)
    if isinstance(schedule, NoiseSchedule):
        result = schedule
    elif hasattr(schedule, "alphas_cumprod"):
        result = from_scheduler(schedule)
    elif schedule is None or np.ndim(schedule) == 0:
        raise TypeError(f"schedule must be one of {sorted(SCHEDULES)}, a NoiseSchedule, an "
                        f"object with alphas_cumprod or an array, got {schedule!r}")
    else:
        result = from_alphas_cumprod(schedule)
    if T is not None and check_int("T", T, 1) != result.T:
        raise ValueError(f"T={T} does not match the schedule's length {result.T}")
    return result
