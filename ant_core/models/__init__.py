"""Reference networks for diffusion training: an ADM-style UNet and a DiT.

Both follow one interface, ``model(x, t, y=None)`` -> tensor shaped like ``x``, and carry
``image_size``, ``in_channels``, ``out_channels``, ``num_classes`` and ``config`` (the keyword
arguments that rebuild them: ``create_model(kind, **model.config)``).

``create_model(name, **config)`` takes a registry name (``"unet"``, ``"dit"``) or a preset name;
keyword arguments override the preset. Parameter counts below are for 32x32 RGB input without
classes (``count_parameters(create_model(name))``); the two tiny presets train a few hundred
steps on 2 CPU cores in about a minute, the others are meant for a GPU.

=============  ==========  =====================================================
preset         parameters  architecture
=============  ==========  =====================================================
``unet-tiny``  0.88 M      base 32, mult (1, 1, 2), 1 block/level, attn lowest
``unet-small`` 6.9 M       base 64, mult (1, 2, 2), 2 blocks/level, attn lowest
``unet-base``  38.3 M      base 128, mult (1, 2, 2, 2), 2 blocks/level, attn 16
``dit-tiny``   0.73 M      patch 4, width 96, depth 4, 4 heads
``dit-s``      32.5 M      DiT-S/2: patch 2, width 384, depth 12, 6 heads
``dit-b``      129.5 M     DiT-B/2: patch 2, width 768, depth 12, 12 heads
=============  ==========  =====================================================
"""
from __future__ import annotations

from torch import nn

from .dit import DiT
from .unet import UNet

__all__ = ["MODELS", "PRESETS", "create_model", "count_parameters", "UNet", "DiT"]

#: registry name -> model class
MODELS = {"unet": UNet, "dit": DiT}

#: preset name -> (registry name, default configuration)
PRESETS = {
    "unet-tiny": ("unet", dict(base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
                               num_heads=4, num_groups=8)),
    "unet-small": ("unet", dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                                num_heads=4, num_groups=32)),
    "unet-base": ("unet", dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                               attention_resolutions=(16,), num_heads=4, num_groups=32,
                               dropout=0.1)),
    "dit-tiny": ("dit", dict(patch_size=4, hidden_size=96, depth=4, num_heads=4)),
    "dit-s": ("dit", dict(patch_size=2, hidden_size=384, depth=12, num_heads=6)),
    "dit-b": ("dit", dict(patch_size=2, hidden_size=768, depth=12, num_heads=12)),
}


def create_model(name: str, **config) -> nn.Module:
    """Build a model from a registry name (``"unet"``, ``"dit"``) or a preset name.

    Keyword arguments are passed to the model class (see :class:`UNet`, :class:`DiT`) and
    override a preset's defaults, e.g. ``create_model("unet-tiny", image_size=16,
    num_classes=5)``. ``model.kind`` is the registry name, ``model.config`` the full config.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key in PRESETS:
        kind, defaults = PRESETS[key]
        config = {**defaults, **config}
    elif key in MODELS:
        kind = key
    else:
        raise ValueError(f"unknown model name={name!r}; choose one of "
                         f"{sorted(MODELS) + sorted(PRESETS)}")
    cls = MODELS[kind]
    try:
        return cls(**config)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"{cls.__name__} ({name!r}): {err}") from None
        raise


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
