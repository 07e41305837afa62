"""The built-in procedural shapes: labelled images drawn from a seed, no download."""
from __future__ import annotations

import numpy as np
import torch

from ..checks import check_int
from .dataset import ImageDataset

__all__ = ["ProceduralShapes", "SHAPE_KINDS"]

#: the shape types drawn by :class:`ProceduralShapes`; an image's label indexes this tuple
SHAPE_KINDS = ("circle", "square", "triangle", "stripes", "ring")
_CHUNK = 512  # images per independently seeded generation chunk


def _render_chunk(rng: np.random.Generator, count: int, size: int, kinds: int):
    """Draw ``_CHUNK`` images' parameters from ``rng`` and render the first ``count``."""
    n = _CHUNK
    labels = rng.integers(0, kinds, n)
    bg0, bg1 = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    bg_angle = rng.uniform(0, 2 * np.pi, n)
    period = rng.integers(1, 4, n)
    checker_amp = rng.uniform(0.03, 0.12, n)
    noise_amp = rng.uniform(0.0, 0.05, n)
    centre = rng.uniform(0.3, 0.7, (n, 2))
    radius = rng.uniform(0.15, 0.32, n)
    theta = rng.uniform(0, 2 * np.pi, n)
    fill_a, fill_b = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    stripe_period = rng.uniform(2.0, 5.0, n) / size
    noise = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    sl = slice(0, count)

    def col(a):  # (n,) -> (count, 1, 1) float32
        return a[sl, None, None].astype(np.float32)

    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    yy, xx = coords[None, :, None], coords[None, None, :]
    # background: a linear gradient between two colours plus a fine checker and pixel noise
    ramp = np.clip((np.cos(col(bg_angle)) * (xx - 0.5) + np.sin(col(bg_angle)) * (yy - 0.5))
                   / np.sqrt(2) + 0.5, 0, 1)[:, None]
    image = bg0[sl, :, None, None] * (1 - ramp) + bg1[sl, :, None, None] * ramp
    ix = np.arange(size)
    checker = ((ix[None, :, None] // period[sl, None, None]
                + ix[None, None, :] // period[sl, None, None]) % 2) * 2.0 - 1.0
    image = image + col(checker_amp)[:, None] * checker[:, None]
    image = image + col(noise_amp)[:, None] * noise[sl]
    # shape: a signed distance (in image units) in coordinates rotated by theta
    dx, dy = xx - col(centre[:, 0]), yy - col(centre[:, 1])
    cos_t, sin_t = np.cos(col(theta)), np.sin(col(theta))
    u, v = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy
    r, dist = col(radius), np.sqrt(dx * dx + dy * dy)
    sdf = np.empty_like(dist)
    kind = labels[sl]
    for k in range(kinds):
        m = kind == k
        if SHAPE_KINDS[k] in ("circle", "stripes"):
            sdf[m] = dist[m] - r[m]
        elif SHAPE_KINDS[k] == "square":
            sdf[m] = np.maximum(np.abs(u[m]), np.abs(v[m])) - 0.8 * r[m]
        elif SHAPE_KINDS[k] == "triangle":
            sides = [np.cos(a) * u[m] + np.sin(a) * v[m] for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
            sdf[m] = np.maximum.reduce(sides) - 0.5 * r[m]
        else:  # ring
            sdf[m] = np.abs(dist[m] - 0.75 * r[m]) - 0.25 * r[m]
    alpha = np.clip(0.5 - sdf * size, 0, 1)[:, None]  # one-pixel anti-aliased edge
    stripes = (np.floor(u / col(stripe_period)) % 2)[:, None]
    is_striped = (kind == SHAPE_KINDS.index("stripes"))[:, None, None, None]
    fill = np.where(is_striped,
                    fill_a[sl, :, None, None] * stripes + fill_b[sl, :, None, None] * (1 - stripes),
                    fill_a[sl, :, None, None] * (0.85 + 0.15 * ramp))
    image = image * (1 - alpha) + fill * alpha
    return np.clip(image, 0, 1).astype(np.float32) * 2 - 1, labels[sl]


class ProceduralShapes(ImageDataset):
    """Procedurally generated RGB images of one coloured shape on a textured background.

    Each image holds a circle, square, triangle, striped disc or ring (its label, see
    :data:`SHAPE_KINDS`) of random size, position, rotation and colour on a background made of a
    smooth two-colour gradient (coarse structure) plus a fine checkerboard (period 1-3 pixels)
    and pixel noise (fine structure), so denoising differs clearly across noise levels.

    Args:
        num_images: number of images.
        image_size: height = width in pixels.
        seed: seed of the numpy generator; equal arguments give identical data, and a smaller
            ``num_images`` gives a prefix of a larger one.
        num_classes: use only the first ``num_classes`` shape types (default: all 5).

    ``images`` is (N, 3, H, W) float32 in [-1, 1]; ``labels`` (N,) int64 in [0, num_classes).
    10k 32x32 images take a few seconds.
    """

    def __init__(self, num_images: int = 10000, image_size: int = 32, seed: int = 0,
                 num_classes: int | None = None):
        num_images = check_int("num_images", num_images, 1)
        image_size = check_int("image_size", image_size, 4)
        seed = check_int("seed", seed, 0)
        kinds = check_int("num_classes",
                          len(SHAPE_KINDS) if num_classes is None else num_classes, 1)
        if kinds > len(SHAPE_KINDS):
            raise ValueError(f"num_classes must be <= {len(SHAPE_KINDS)}, got {kinds}")
        images = np.empty((num_images, 3, image_size, image_size), dtype=np.float32)
        labels = np.empty(num_images, dtype=np.int64)
        for chunk, start in enumerate(range(0, num_images, _CHUNK)):
            count = min(_CHUNK, num_images - start)
            rng = np.random.default_rng([seed, chunk])
            images[start:start + count], labels[start:start + count] = _render_chunk(
                rng, count, image_size, kinds)
        super().__init__(torch.from_numpy(images), torch.from_numpy(labels), kinds,
                         SHAPE_KINDS[:kinds])
        self.seed = seed
