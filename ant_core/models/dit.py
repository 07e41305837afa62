"""A small Diffusion Transformer (DiT, Peebles & Xie, 2023).

Patchify (strided conv), 2-D sin-cos positional embedding (fixed, or learned starting from
sin-cos), transformer blocks conditioned on the timestep (+ class) embedding with adaLN-Zero,
a final adaLN + linear layer, unpatchify. All modulation and output layers start at zero, so the
untrained model predicts 0 and every block starts as the identity.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_float, check_int
from .layers import LabelEmbedder, TimestepEmbedder, prepare_inputs

__all__ = ["DiT", "DiTBlock", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding of a ``grid_size`` x ``grid_size`` grid.

    Half of the ``dim`` features encode the row, half the column (each half: sin then cos).
    Returns a (grid_size ** 2, dim) float32 tensor in row-major patch order.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    coords = np.arange(grid_size, dtype=np.float64)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([encode(rows), encode(cols)], axis=1)
    return torch.from_numpy(emb).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block (attention + MLP) with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Apply the block to (B, N, D) tokens with a (B, D) conditioning vector."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        b, n, d = x.shape
        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, d // self.num_heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1[:, None] * self.proj(h)
        x = x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


class DiT(nn.Module):
    """Diffusion Transformer predicting a tensor of the input's shape from ``(x, t, y)``.

    Args:
        image_size: height = width of the input; must be divisible by ``patch_size``.
        in_channels: channels of the input.
        out_channels: channels of the output (default: ``in_channels``).
        patch_size: side of the square patches (tokens = (image_size / patch_size) ** 2).
        hidden_size: token width; divisible by ``num_heads`` and by 4 (2-D sin-cos embedding).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``hidden_size``.
        num_classes: number of classes for class conditioning (``None``: unconditional). Label
            ``num_classes`` is the null label, also used when ``y`` is None.
        learn_pos_embed: learn the positional embedding (initialised to sin-cos) instead of
            keeping it fixed.
        time_scale: multiplies ``t`` before its sinusoidal embedding (1000 for t in [0, 1]).

    ``forward(x, t, y=None)``: x (B, C, H, W), t (B,) or scalar, y (B,) long or None.
    """

    kind = "dit"  #: registry name in :data:`ant_core.models.MODELS`

    def __init__(self, image_size: int = 32, in_channels: int = 3, out_channels: int | None = None,
                 patch_size: int = 2, hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, num_classes: int | None = None,
                 learn_pos_embed: bool = False, time_scale: float = 1.0):
        super().__init__()
        image_size = check_int("image_size", image_size, 1)
        in_channels = check_int("in_channels", in_channels, 1)
        out_channels = in_channels if out_channels is None else out_channels
        out_channels = check_int("out_channels", out_channels, 1)
        patch_size = check_int("patch_size", patch_size, 1)
        hidden_size = check_int("hidden_size", hidden_size, 1)
        depth = check_int("depth", depth, 1)
        num_heads = check_int("num_heads", num_heads, 1)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, 1)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by "
                             f"patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by "
                             f"num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 "
                             "(2-D sin-cos positional embedding)")
        mlp_ratio = check_float("mlp_ratio", mlp_ratio, 0, strict=True)
        if int(hidden_size * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} leaves the MLP no hidden unit "
                             f"(int(hidden_size * mlp_ratio) = 0)")
        check_bool("learn_pos_embed", learn_pos_embed)

        time_scale = check_float("time_scale", time_scale, 0, strict=True)  # a float in config
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.patch_size, self.num_classes = patch_size, num_classes
        self.config = dict(
            image_size=image_size, in_channels=in_channels, out_channels=out_channels,
            patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, num_classes=num_classes, learn_pos_embed=learn_pos_embed,
            time_scale=time_scale)

        self.grid_size = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        pos = sincos_pos_embed_2d(hidden_size, self.grid_size)[None]
        if learn_pos_embed:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.time_embed = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.label_embed = LabelEmbedder(num_classes, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in self.time_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.embedding.weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_modulation[-1], self.final_linear]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p * C) patch tokens -> (B, C, H, W) image."""
        b, p, g, c = tokens.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = tokens.reshape(b, g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict a (B, out_channels, H, W) tensor from x (B, C, H, W), timesteps t, labels y."""
        t, y = prepare_inputs(self, x, t, y)
        c = self.time_embed(t)
        if self.label_embed is not None:
            c = c + self.label_embed(y)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        h = self.final_linear(_modulate(self.final_norm(h), shift, scale))
        return self.unpatchify(h)
