"""Sample-quality metrics that need no download: Fréchet distance and k-NN precision / recall.

The Fréchet distance (FD) between Gaussians fitted to two feature sets is FID when the features
are Inception-v3 pool features. Inception weights are a download, so the built-in extractors here
are raw pixels (:class:`PixelFeatures`) and a fixed random conv net (:class:`RandomConvFeatures`):
their FD is a *relative* metric, good for comparing runs scored with the same extractor and
reference set, and not comparable to published FID numbers. Any callable mapping (N, C, H, W)
images to (N, D) features can be used instead.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_int, check_int_sequence, real_array

__all__ = [
    "frechet_distance", "frechet_distance_from_features", "precision_recall", "PixelFeatures",
    "RandomConvFeatures", "evaluate",
]


def _matrix(name, value, ndim):
    array = real_array(name, value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _precision(value) -> float:
    """Machine epsilon of an input's floating dtype (float64's for anything else)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return torch.finfo(value.dtype).eps
    dtype = getattr(value, "dtype", None)
    if dtype is not None and np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def _covariance_eigh(name: str, s: np.ndarray, eps: float, vectors: bool):
    """Eigenvalues (and eigenvectors) of a covariance; ValueError unless it is symmetric and
    PSD up to 10 d eps of its largest entry (``eps`` the input's own precision)."""
    tolerance = 10 * s.shape[0] * eps * np.abs(s).max(initial=0.0)
    if not np.allclose(s, s.T, rtol=0.0, atol=tolerance):
        raise ValueError(f"{name} must be a symmetric covariance matrix")
    sym = (s + s.T) / 2
    result = np.linalg.eigh(sym) if vectors else (np.linalg.eigvalsh(sym), None)
    if s.size and result[0][0] < -tolerance:
        raise ValueError(f"{name} must be positive semi-definite (a covariance matrix)")
    return result


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``, computed in
    float64 as ``tr((A sigma2 A)^(1/2))`` with ``A = sigma1^(1/2)``: both roots are of symmetric
    PSD matrices (eigendecomposition, negative round-off eigenvalues clipped to 0), which is
    stable for singular covariances (fewer samples than features). Accepts numpy or torch;
    ``sigma1`` / ``sigma2`` must be symmetric and positive semi-definite up to rounding
    (ValueError otherwise, never silently symmetrised or clipped).
    """
    mu1, mu2 = _matrix("mu1", mu1, 1), _matrix("mu2", mu2, 1)
    checked = _matrix("sigma1", sigma1, 2), _matrix("sigma2", sigma2, 2)
    # rounding of the inputs' own precision (a float32 or bf16 covariance is PSD only up to it)
    eps = max(_precision(sigma1), _precision(sigma2))
    sigma1, sigma2 = checked
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 must have shape ({d},) like mu1, got {mu2.shape}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {s.shape}")
    if 10 * d * eps >= 1:  # the PSD check would pass a matrix with eigenvalue -max|entry|
        raise TypeError(f"sigma1, sigma2: a {d} x {d} covariance in a precision with epsilon "
                        f"{eps:.3g} is too coarse to check or use; pass float32 or float64")
    # in units of the largest entry: products of 1e80 covariances overflowed, 1e-150 underflowed
    unit = max(np.abs(sigma1).max(initial=0.0), np.abs(sigma2).max(initial=0.0))
    unit = unit if unit > 0 else 1.0
    sigma1, sigma2 = sigma1 / unit, sigma2 / unit
    values1, vectors1 = _covariance_eigh("sigma1", sigma1, eps, vectors=True)
    _covariance_eigh("sigma2", sigma2, eps, vectors=False)
    root1 = (vectors1 * np.sqrt(np.clip(values1, 0, None))) @ vectors1.T
    inner = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    # Eigenvalues at rounding level are zeros of a singular product (fewer samples than
    # features): their square roots, ~sqrt(eps * largest), would bias the distance low.
    values[values <= values.max(initial=0.0) * d * np.finfo(np.float64).eps] = 0.0
    trace_sqrt = np.sqrt(values).sum()
    diff = mu1 - mu2
    fd = diff @ diff + unit * (np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return float(max(fd, 0.0))


def _mean_cov(name, features):
    f = _matrix(name, features, 2)
    if f.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_features(features1, features2) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (unbiased cov)."""
    mu1, sigma1 = _mean_cov("features1", features1)
    mu2, sigma2 = _mean_cov("features2", features2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"features1 and features2 must have the same feature dimension, got "
                         f"{mu1.shape[0]} and {mu2.shape[0]}")
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def _features_tensor(name, features):
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(np.asarray(features))
    features = features.detach().double()
    if features.dim() != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def _kth_neighbour_radii(features, k, chunk):
    """Distance from each row to its k-th nearest other row (self excluded)."""
    radii = []
    for start in range(0, features.shape[0], chunk):
        d = torch.cdist(features[start:start + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself (0)
    return torch.cat(radii)


def _inside_manifold(points, centres, radii, chunk):
    """For each point: does some ball (centre_j, radius_j) contain it? (Both sets centred
    alike.) The tolerance for cdist's rounding follows the scale of the pair compared, so one
    far outlier does not widen every ball (it had turned precision 0.015 into 0.13)."""
    point_scale, centre_scale = points.abs().amax(dim=1), centres.abs().amax(dim=1)
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start:start + chunk], centres)
        tol = 1e-9 * torch.maximum(point_scale[start:start + chunk, None], centre_scale[None])
        inside.append((d <= radii[None] + tol).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_features, fake_features, k: int = 3, chunk: int = 1024):
    """k-NN manifold precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision: the fraction of fake samples inside
    the real manifold; recall: the fraction of real samples inside the fake manifold. Distances
    are Euclidean in float64, computed in chunks of ``chunk`` rows. Returns ``(precision,
    recall)`` as floats in [0, 1].
    """
    real = _features_tensor("real_features", real_features)
    fake = _features_tensor("fake_features", fake_features)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features and fake_features must have the same feature "
                         f"dimension, got {real.shape[1]} and {fake.shape[1]}")
    k = check_int("k", k, 1)
    if real.shape[1] < 1:
        raise ValueError("real_features and fake_features need at least one feature dimension")
    chunk = check_int("chunk", chunk, 1)
    if k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k={k} must be smaller than the number of real ({real.shape[0]}) and "
                         f"fake ({fake.shape[0]}) samples")
    # distances are translation invariant; cdist's matrix-product form is not accurate for
    # features far from their origin (a shared offset of 1e7 halved the precision)
    centre = real.mean(dim=0)
    real, fake = real - centre, fake - centre
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _inside_manifold(fake, real, real_radii, chunk).double().mean().item()
    recall = _inside_manifold(real, fake, fake_radii, chunk).double().mean().item()
    return precision, recall


def _check_images(name, images):
    if hasattr(images, "images") and isinstance(images.images, torch.Tensor):
        images = images.images  # an ImageDataset
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{name} must be (N, C, H, W) images with N >= 1, got shape "
                         f"{tuple(images.shape)}")
    return images


def _check_scored_images(name, images):
    """What :func:`evaluate` scores: float (N, C, H, W) images, finite, in [-1, 1] (uint8 or
    [0, 255] images would be scored without an error, and meaninglessly)."""
    images = _check_images(name, images)
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating-point images in [-1, 1], got {images.dtype}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        raise ValueError(f"{name} of shape {tuple(images.shape)} look channels-last; pass "
                         "(N, C, H, W) (e.g. images.permute(0, 3, 1, 2))")
    low, high = float(images.min()), float(images.max())  # NaN fails both comparisons below
    if not (-1 - 1e-6 <= low and high <= 1 + 1e-6):
        raise ValueError(f"{name} must lie in [-1, 1] (clamp model samples; map [0, 255] or "
                         f"[0, 1] images), got values in [{low}, {high}]")
    return images


class PixelFeatures(nn.Module):
    """Raw pixels as features, optionally average-pooled to ``pool_size`` x ``pool_size`` first.

    Output: (N, C * H * W) without pooling, (N, C * pool_size ** 2) with it.
    """

    def __init__(self, pool_size: int | None = None):
        super().__init__()
        self.pool_size = None if pool_size is None else check_int("pool_size", pool_size, 1)

    def output_dim(self, channels: int, image_size: int) -> int:
        """Feature dimension for images of ``channels`` x ``image_size`` x ``image_size``."""
        side = image_size if self.pool_size is None else self.pool_size
        return channels * side * side

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, D) float32 features."""
        x = _check_images("images", images).float()
        if self.pool_size is not None:
            x = F.adaptive_avg_pool2d(x, self.pool_size)
        return x.flatten(1)


class RandomConvFeatures(nn.Module):
    """A fixed random conv net as a feature extractor, determined entirely by ``seed``.

    Each stage is a 3x3 conv (orthogonal weights with gain sqrt(2), zero bias) + ReLU followed by
    2x2 average pooling (skipped once the map is 1x1). The features are the global averages of
    every stage's output, concatenated, so they describe fine and coarse structure: output
    (N, sum(widths)), 224 with the default widths. 1-channel images are repeated to
    ``in_channels`` when ``in_channels`` is 3.

    This is a *relative* metric: scores are comparable only between runs using the same seed,
    widths and reference set, never with Inception-based FID.
    """

    def __init__(self, seed: int = 0, in_channels: int = 3, widths=(32, 64, 128),
                 batch_size: int = 256):
        super().__init__()
        seed = check_int("seed", seed)
        widths = check_int_sequence("widths", widths)
        if not widths:
            raise ValueError("widths must be a non-empty sequence of ints >= 1")
        in_channels = check_int("in_channels", in_channels, 1)
        self.seed, self.in_channels, self.widths = seed, in_channels, widths
        self.batch_size = check_int("batch_size", batch_size, 1)
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        channels = in_channels
        for width in widths:
            conv = nn.Conv2d(channels, width, 3, padding=1)
            nn.init.orthogonal_(conv.weight.view(width, -1), gain=math.sqrt(2.0),
                                generator=generator)
            nn.init.zeros_(conv.bias)
            self.convs.append(conv)
            channels = width
        self.requires_grad_(False)
        self.eval()

    @property
    def output_dim(self) -> int:
        """Feature dimension: ``sum(widths)``."""
        return sum(self.widths)

    def _features(self, x):
        pooled = []
        for conv in self.convs:
            x = F.relu(conv(x))
            pooled.append(x.mean(dim=(2, 3)))
            if x.shape[-1] > 1 or x.shape[-2] > 1:
                x = F.avg_pool2d(x, 2, ceil_mode=True)
        return torch.cat(pooled, dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images (in [-1, 1]) -> (N, sum(widths)) float32 features."""
        x = _check_images("images", images)
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"images must have {self.in_channels} channels, got {x.shape[1]}")
        device = self.convs[0].weight.device
        out = [self._features(x[i:i + self.batch_size].to(device, torch.float32))
               for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out).cpu()


def _resolve_extractor(feature_extractor, channels):
    if callable(feature_extractor):
        return feature_extractor
    if feature_extractor == "random_conv":
        return RandomConvFeatures(seed=0, in_channels=3 if channels in (1, 3) else channels)
    if feature_extractor == "pixels":
        return PixelFeatures(pool_size=8)
    raise ValueError(f"feature_extractor must be 'random_conv', 'pixels' or a callable, "
                     f"got {feature_extractor!r}")


def evaluate(samples, reference, feature_extractor: str | Callable = "random_conv",
             k: int = 3) -> dict:
    """Score generated ``samples`` against ``reference`` images (both (N, C, H, W) in [-1, 1],
    tensors, arrays or :class:`~ant_core.data.ImageDataset`).

    ``feature_extractor``: ``"random_conv"`` (:class:`RandomConvFeatures` with seed 0),
    ``"pixels"`` (:class:`PixelFeatures` pooled to 8x8) or any callable images -> (N, D).
    Returns ``{"fd", "precision", "recall", "num_samples", "num_reference", "feature_dim"}``.
    """
    samples = _check_scored_images("samples", samples)
    reference = _check_scored_images("reference", reference)
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples and reference must have the same image shape, got "
                         f"{tuple(samples.shape[1:])} and {tuple(reference.shape[1:])}")
    extractor = _resolve_extractor(feature_extractor, samples.shape[1])
    fake = torch.as_tensor(extractor(samples)).detach().double().cpu()
    real = torch.as_tensor(extractor(reference)).detach().double().cpu()
    if fake.dim() != 2 or real.dim() != 2:
        raise ValueError("feature_extractor must return (N, D) features")
    precision, recall = precision_recall(real, fake, k=k)
    return {"fd": frechet_distance_from_features(real, fake), "precision": precision,
            "recall": recall, "num_samples": int(fake.shape[0]),
            "num_reference": int(real.shape[0]), "feature_dim": int(fake.shape[1])}
