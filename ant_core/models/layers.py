"""Building blocks shared by the reference networks: embeddings and input checks.

Everything here is per-sample: no layer mixes information between the samples of a batch
(no BatchNorm), so per-cluster losses and gradients in ANT stay independent.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_float, values_checkable

__all__ = [
    "timestep_embedding",
    "TimestepEmbedder",
    "LabelEmbedder",
    "zero_module",
    "prepare_inputs",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly continuous) timesteps.

    Args:
        t: (B,) tensor of timesteps, integer or float (continuous noise levels work too).
        dim: number of output features (cos half first, then sin; odd ``dim`` is zero-padded).
        max_period: the longest wavelength.

    Returns:
        (B, dim) float32 tensor.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # (a zero column; dim=1 has no sinusoid at all)
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP (Linear, SiLU, Linear).

    ``time_scale`` multiplies ``t`` before embedding: keep 1.0 for integer timesteps in
    [0, 1000), use e.g. 1000 for t in [0, 1].
    """

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = check_float("time_scale", time_scale, 0, strict=True)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed (B,) timesteps into (B, dim) features."""
        features = timestep_embedding(t.float() * self.time_scale, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label embedding table with one extra "null" row (index ``num_classes``).

    The null label stands for "no class" and is what classifier-free guidance dropout feeds in.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Embed (B,) long labels in [0, num_classes] into (B, dim) features."""
        return self.embedding(y)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def prepare_inputs(model, x, t, y):
    """Validate the common ``(x, t, y)`` interface and return ``(t, y)`` as tensors.

    ``t`` may be a Python number, a 0-d tensor (broadcast to the batch) or a (B,) tensor.
    ``y`` is None (the null label when the model is class-conditional) or (B,) integer labels
    in [0, num_classes] (``num_classes`` is the null label).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating torch.Tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    expected = (model.in_channels, model.image_size, model.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"x must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                         f"got {tuple(x.shape)}")
    batch = x.shape[0]
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.tensor(t, device=x.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            if "overflow" in str(exc).lower():  # an int beyond int64: a value, not a type
                raise ValueError(f"t is out of range for a tensor ({exc})") from None
            raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}") from None
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"t must have shape ({batch},) or be a scalar, got {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer or float tensor, got {t.dtype}")
    t = t.to(x.device)
    if t.is_floating_point() and values_checkable(t) and not bool(torch.isfinite(t).all()):
        raise ValueError("t must be finite, got NaN or infinite timesteps")
    if model.num_classes is None:
        if y is not None:
            raise ValueError("y was given but the model was built with num_classes=None")
        return t, None
    if y is None:
        return t, torch.full((batch,), model.num_classes, dtype=torch.long, device=x.device)
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y, device=x.device)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"y must be an integer tensor, got {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
    if not torch.compiler.is_compiling() and batch > 0:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high > model.num_classes:
            raise ValueError(f"y must be in [0, {model.num_classes}] ({model.num_classes} is the "
                             f"null label), got values in [{low}, {high}]")
    return t, y.to(device=x.device, dtype=torch.long)
