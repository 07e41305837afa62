"""A small ADM-style UNet (Dhariwal & Nichol, 2021) for diffusion training.

Residual blocks (GroupNorm, SiLU, 3x3 conv) with the timestep (and class) embedding injected by
scale-shift normalisation (AdaGN), optional multi-head self-attention at low resolutions,
strided-conv downsampling, nearest + conv upsampling and skip connections. Residual branches and
the output convolution start at zero, so the untrained model predicts 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_float, check_int, check_int_sequence
from .layers import (LabelEmbedder, TimestepEmbedder,
                     prepare_inputs, zero_module)

__all__ = ["UNet", "ResBlock", "AttentionBlock"]


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, AdaGN (scale, shift from the embedding), SiLU-dropout-conv."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the block to (B, C_in, H, W) features with a (B, emb_dim) embedding."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions of one sample, with a residual."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply attention to (B, C, H, W) features."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ADM-style UNet predicting a tensor of the input's shape from ``(x, t, y)``.

    Args:
        image_size: height = width of the input.
        in_channels: channels of the input.
        out_channels: channels of the output (default: ``in_channels``).
        base_channels: channels of the first level.
        channel_mult: per-level channel multipliers; the image is downsampled by 2 between levels,
            so ``image_size`` must be divisible by ``2 ** (len(channel_mult) - 1)``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (e.g. ``(16, 8)``) that get self-attention after
            each residual block; every size must be one of the levels' sizes. ``None`` means the
            lowest level only; ``()`` none (apart from the middle block).
        mid_attention: self-attention in the middle block.
        num_heads: attention heads (each attention layer's channels must divide evenly).
        dropout: dropout probability inside residual blocks.
        num_classes: number of classes for class conditioning (``None``: unconditional). Label
            ``num_classes`` is the null label, also used when ``y`` is None.
        num_groups: GroupNorm groups; every level's channel count must be divisible by it.
        time_scale: multiplies ``t`` before its sinusoidal embedding (1000 for t in [0, 1]).

    ``forward(x, t, y=None)``: x (B, C, H, W), t (B,) or scalar, y (B,) long or None.
    """

    kind = "unet"  #: registry name in :data:`ant_core.models.MODELS`

    def __init__(self, image_size: int = 32, in_channels: int = 3, out_channels: int | None = None,
                 base_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions: Sequence[int] | None = None,
                 mid_attention: bool = True, num_heads: int = 4, dropout: float = 0.0,
                 num_classes: int | None = None, num_groups: int = 32, time_scale: float = 1.0):
        super().__init__()
        image_size = check_int("image_size", image_size, 1)
        in_channels = check_int("in_channels", in_channels, 1)
        out_channels = in_channels if out_channels is None else out_channels
        out_channels = check_int("out_channels", out_channels, 1)
        base_channels = check_int("base_channels", base_channels, 1)
        num_res_blocks = check_int("num_res_blocks", num_res_blocks, 1)
        num_heads = check_int("num_heads", num_heads, 1)
        num_groups = check_int("num_groups", num_groups, 1)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, 1)
        channel_mult = check_int_sequence("channel_mult", channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult must not be empty")
        check_bool("mid_attention", mid_attention)
        dropout = check_float("dropout", dropout, 0)
        if dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by {factor} "
                             f"(2 ** (len(channel_mult) - 1))")
        level_sizes = [image_size // 2 ** i for i in range(len(channel_mult))]
        if attention_resolutions is None:
            attention_resolutions = (level_sizes[-1],)
        attention_resolutions = check_int_sequence("attention_resolutions", attention_resolutions)
        for r in attention_resolutions:
            if r not in level_sizes:
                raise ValueError(f"attention_resolutions entry {r} is not a feature-map size of "
                                 f"this UNet (sizes: {level_sizes})")
        widths = [base_channels * m for m in channel_mult]
        if any(w % num_groups for w in [base_channels, *widths]):
            raise ValueError(f"num_groups={num_groups} must divide base_channels={base_channels} "
                             f"and every level's channels (base_channels * channel_mult = "
                             f"{widths})")
        for size, w in zip(level_sizes, widths):
            if size in attention_resolutions and w % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide the channels of attention "
                                 f"layers ({w})")
        if mid_attention and widths[-1] % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channels of the middle "
                             f"attention layer ({widths[-1]})")

        time_scale = check_float("time_scale", time_scale, 0, strict=True)  # a float in config
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.num_classes = num_classes
        self.config = dict(
            image_size=image_size, in_channels=in_channels, out_channels=out_channels,
            base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, mid_attention=mid_attention,
            num_heads=num_heads, dropout=dropout, num_classes=num_classes, num_groups=num_groups,
            time_scale=time_scale)

        emb_dim = 4 * base_channels
        self.time_embed = TimestepEmbedder(emb_dim, frequency_dim=max(64, base_channels),
                                           time_scale=time_scale)
        self.label_embed = LabelEmbedder(num_classes, emb_dim) if num_classes else None
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin, cout, size):
            layers = nn.ModuleList([ResBlock(cin, cout, emb_dim, dropout, num_groups)])
            if size in attention_resolutions:
                layers.append(AttentionBlock(cout, num_heads, num_groups))
            return layers

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, width, level_sizes[level]))
                ch = width
                skip_channels.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.ModuleList([_Downsample(ch)]))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, num_groups)])
        if mid_attention:
            self.mid.append(AttentionBlock(ch, num_heads, num_groups))
        self.mid.append(ResBlock(ch, ch, emb_dim, dropout, num_groups))

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(num_res_blocks + 1):
                layers = block(ch + skip_channels.pop(), widths[level], level_sizes[level])
                ch = widths[level]
                if level > 0 and i == num_res_blocks:
                    layers.append(_Upsample(ch))
                self.up.append(layers)

        self.out_norm = nn.GroupNorm(num_groups, ch)
        self.out_conv = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict a (B, out_channels, H, W) tensor from x (B, C, H, W), timesteps t, labels y."""
        t, y = prepare_inputs(self, x, t, y)
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        h = self.input_conv(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))
