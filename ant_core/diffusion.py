"""Gaussian diffusion maths for discrete schedules: the forward process, training targets and
the DDPM / DDIM samplers.

x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t in [0, T) (t = 0 least noisy).
Targets: ``"eps"`` (the noise), ``"v"`` (sqrt(a) eps - sqrt(1 - a) x_0, Salimans & Ho 2022)
and ``"x0"``. Per-sample loss weightings (Min-SNR-gamma, P2, ...) live in
``ant_core.weighting``.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

from .checks import TORCH_SEEDS, check_float, check_int, values_checkable
from .schedules import NoiseSchedule, get_schedule

__all__ = ["GaussianDiffusion", "PREDICTIONS"]

PREDICTIONS = ("eps", "v", "x0")


def _check_integer_t(t) -> None:
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() \
            or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor of timesteps, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")


class GaussianDiffusion:
    """The forward process and samplers of a discrete-time Gaussian diffusion.

    Args:
        schedule: anything ``ant_core.schedules.get_schedule`` accepts (a name, a NoiseSchedule,
            an ``alphas_cumprod`` array, a diffusers scheduler).
        T: number of timesteps for a named schedule.
        prediction: what the network predicts: ``"eps"``, ``"v"`` or ``"x0"``.
    """

    def __init__(self, schedule="linear", T: int | None = None, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.schedule: NoiseSchedule = get_schedule(schedule, T)
        ac = self.schedule.alphas_cumprod
        if ac.min() <= 0.0 or ac.max() >= 1.0:
            raise ValueError("schedule: alphas_cumprod must lie strictly inside (0, 1)")
        self.prediction = prediction
        self.T = self.schedule.T
        f64 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
        self.alphas_cumprod = f64(ac)
        self.sqrt_ac = self.alphas_cumprod.sqrt()
        self.sqrt_1m_ac = (1 - self.alphas_cumprod).sqrt()
        self.snr_table = f64(self.schedule.snr)
        self._on_device = {}  # (table name, device) -> that table on the device, see _gather

    # ------------------------------------------------------------------ forward process

    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``getattr(self, name)[t]`` reshaped to broadcast against a (B, ...) tensor of ``ndim``
        dims (index_select: a negative t is an error, not an index from the end). The table is
        copied to t's device once, not per call (a blocking host-to-device copy on a GPU)."""
        key = (name, t.device)
        table = self._on_device.get(key)
        if table is None:
            table = self._on_device[key] = getattr(self, name).to(t.device)
        return table.index_select(0, t.long()).reshape(-1, *([1] * (ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        _check_integer_t(t)
        if batch is not None and t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        # a clear error where t can be read (else index_select's bounds check catches it)
        if values_checkable(t) and t.numel() and not 0 <= int(t.min()) <= int(t.max()) < self.T:
            raise ValueError(f"t must lie in [0, {self.T}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t.long()

    def _check_x0_noise_t(self, x0, noise, t):
        """``t`` checked (as int64) after ``x0`` and ``noise`` are floating tensors of one shape."""
        for name, value in (("x0", x0), ("noise", noise)):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got "
                                f"{getattr(value, 'dtype', type(value).__name__)}")
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got "
                             f"{tuple(noise.shape)}")
        return self._check_t(t, x0.shape[0])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Sample x_t ~ q(x_t | x_0)."""
        if noise is None and isinstance(x0, torch.Tensor) and x0.is_floating_point():
            noise = torch.randn_like(x0)
        t = self._check_x0_noise_t(x0, noise, t)
        a = self._gather("sqrt_ac", t, x0.dim()).to(x0.dtype)
        s = self._gather("sqrt_1m_ac", t, x0.dim()).to(x0.dtype)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the chosen prediction type."""
        t = self._check_x0_noise_t(x0, noise, t)
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = self._gather("sqrt_ac", t, x0.dim()).to(x0.dtype)
        s = self._gather("sqrt_1m_ac", t, x0.dim()).to(x0.dtype)
        return a * noise - s * x0

    def split_prediction(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(x0_hat, eps_hat) from a network output of the chosen prediction type."""
        if output.shape != x_t.shape:
            raise ValueError(f"output must have x_t's shape {tuple(x_t.shape)}, got "
                             f"{tuple(output.shape)}")
        t = self._check_t(t, x_t.shape[0])
        a = self._gather("sqrt_ac", t, x_t.dim()).to(torch.float64)
        s = self._gather("sqrt_1m_ac", t, x_t.dim()).to(torch.float64)
        out, xt = output.double(), x_t.double()
        if self.prediction == "eps":
            eps = out
            x0 = (xt - s * eps) / a
        elif self.prediction == "x0":
            x0 = out
            eps = (xt - a * x0) / s
        else:  # v: x0 = a x_t - s v, eps = s x_t + a v
            x0 = a * xt - s * out
            eps = s * xt + a * out
        return x0, eps

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = alpha_bar / (1 - alpha_bar) for integer timesteps t (float32)."""
        return self._gather("snr_table", self._check_t(t).reshape(-1), 1).reshape(t.shape).float()

    # ------------------------------------------------------------------ samplers

    def _model_step(self, model, x, t_scalar, y, guidance_scale, null_label, dtype):
        """(x0, eps) in float64 from the model's output on ``x`` (float64) cast to ``dtype``."""
        t = torch.full((x.shape[0],), t_scalar, device=x.device, dtype=torch.long)
        inputs = x.to(dtype)
        if guidance_scale == 1.0:
            out = model(inputs, t) if y is None else model(inputs, t, y)
        else:  # one call on [conditional; null label] halves
            null = torch.full_like(y, null_label)
            cond, uncond = model(torch.cat([inputs, inputs]), torch.cat([t, t]),
                                 torch.cat([y, null])).double().chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return self.split_prediction(out, x, t)

    @staticmethod
    def _check_guidance(model, y, guidance_scale, batch: int, device):
        """The guidance scale as a float, ``y`` (as a (batch,) tensor when it guides) and the
        null label (the model's ``num_classes``; None without guidance)."""
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not 0 <= guidance_scale < float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if guidance_scale == 1:
            return 1.0, y, None
        if y is None:
            raise ValueError("guidance_scale != 1 needs class labels y (classifier-free "
                             "guidance contrasts them with the null label)")
        wrapped = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
        inner = model.module if isinstance(model, wrapped) else model
        num_classes = getattr(inner, "num_classes", None)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError("guidance_scale != 1 needs a class-conditional model with an int "
                             "attribute num_classes (the index of its null label), got "
                             f"num_classes={num_classes!r}")
        y = torch.as_tensor(y, device=device)
        if y.dtype not in (torch.int32, torch.int64) or y.shape != (batch,):
            raise ValueError(f"y must be integer labels of shape ({batch},), got "
                             f"{tuple(y.shape)} {y.dtype}")
        return float(guidance_scale), y, num_classes

    def _warn_terminal_signal(self):
        terminal = float(self.alphas_cumprod[-1])
        if terminal > 0.01:
            warnings.warn(
                f"the {self.schedule.name} schedule with T={self.T} ends at alphas_cumprod="
                f"{terminal:.3g}, far from pure noise, while sampling starts from N(0, I) at "
                "t = T - 1: samples come out biased. Use a larger T, "
                "the cosine schedule, or betas scaled to T (e.g. schedules.linear(T, 1e-4 * "
                "1000 / T, 0.02 * 1000 / T) for T > 20)", stacklevel=4)

    @torch.no_grad()
    def sample_ddpm(self, model, shape, *, seed: int = 0, y=None, guidance_scale: float = 1.0,
                    device=None, clip_x0: float | None = 1.0,
                    progress: bool = False) -> torch.Tensor:
        """Ancestral sampling with the posterior variance (Ho et al. 2020), T model calls.

        Deterministic under ``seed``. ``clip_x0`` clamps the predicted x_0 (None: no clamp);
        ``y`` and ``guidance_scale`` as in :meth:`sample_ddim`.
        """
        self._warn_terminal_signal()
        return self._sample(model, shape, steps=self.T, eta=1.0, seed=seed, y=y,
                            guidance_scale=guidance_scale, device=device, clip_x0=clip_x0,
                            progress=progress)

    @torch.no_grad()
    def sample_ddim(self, model, shape, *, steps: int | None = None, eta: float = 0.0, seed: int = 0,
                    y=None, guidance_scale: float = 1.0, device=None,
                    clip_x0: float | None = 1.0, progress: bool = False) -> torch.Tensor:
        """DDIM (Song et al. 2021) on ``steps`` evenly spaced timesteps (default min(50, T));
        eta=0 is deterministic, eta=1 with steps=T is DDPM's ancestral sampler. Deterministic
        under ``seed``; ``y`` (class labels) is passed to the model as ``model(x, t, y)``.

        ``guidance_scale`` s != 1 is classifier-free guidance (Ho & Salimans 2022): the output
        is ``uncond + s (cond - uncond)``, with ``uncond`` the prediction for the null label
        ``model.num_classes`` (one model call on the doubled batch per step). s = 0 samples
        unconditionally, s = 1 (default) conditionally without guidance. The null label must
        have been trained (``TrainConfig.label_dropout`` > 0).

        The sampler's state is float64; the model sees it in its parameters' floating dtype
        (float32 for a model without parameters), e.g. bfloat16 for a bf16 model.

        Sampling starts from N(0, I) at t = T - 1, which is right only where the schedule ends
        near pure noise: where ``alphas_cumprod[T - 1]`` exceeds 0.01 (the linear schedule below
        T of about 460, whose betas are not rescaled with T) a warning says so."""
        self._warn_terminal_signal()
        return self._sample(model, shape, steps=steps, eta=eta, seed=seed, y=y,
                            guidance_scale=guidance_scale, device=device, clip_x0=clip_x0,
                            progress=progress)

    def _sample(self, model, shape, *, steps, eta, seed, y, guidance_scale, device, clip_x0,
                progress):
        steps = min(50, self.T) if steps is None else steps
        steps = check_int("steps", steps, 1, self.T)
        eta = check_float("eta", eta, 0)
        if eta > 1:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        seed = check_int("seed", seed, *TORCH_SEEDS)
        if clip_x0 is not None:
            clip_x0 = check_float("clip_x0", clip_x0, 0, strict=True)
        # the model's device (else the CPU) and floating dtype (else float32) for its inputs
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        if device is None:
            device = params[0].device if params else "cpu"
        device = torch.device(device)
        guidance_scale, y, null_label = self._check_guidance(model, y, guidance_scale, shape[0],
                                                             device)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        x = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float64)
        ts = np.unique(np.round(np.linspace(0, self.T - 1, steps)).astype(np.int64))[::-1]
        if steps == 1:  # one step denoises from the noisiest timestep (linspace gives t = 0)
            ts = np.array([self.T - 1])
        ac = self.alphas_cumprod.to(device)
        iterator = range(len(ts))
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="sampling", leave=False)
        for n in iterator:
            t = int(ts[n])
            x0, eps = self._model_step(model, x, t, y, guidance_scale, null_label, dtype)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
            if n == len(ts) - 1:
                x = x0
                break
            a_t, a_prev = ac[t], ac[int(ts[n + 1])]
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            dir_xt = torch.sqrt(torch.clamp(1 - a_prev - sigma**2, min=0.0)) * eps
            x = a_prev.sqrt() * x0 + dir_xt
            if eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype)
        return x.float()

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(schedule={self.schedule.name!r}, T={self.T}, "
                f"prediction={self.prediction!r})")

