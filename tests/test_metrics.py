"""Metrics against closed forms and brute force: Fréchet distance, precision/recall, extractors."""
import math

import numpy as np
import pytest
import torch

from ant_core.metrics import (PixelFeatures, RandomConvFeatures, evaluate, frechet_distance,
                              frechet_distance_from_features, precision_recall)


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    # torch inputs work too
    assert frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(s1)), torch.tensor(mu2),
                            torch.tensor(np.diag(s2))) == pytest.approx(expected, rel=1e-10)


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T + (0 if rank else 0.1 * np.eye(d))


def test_fd_2x2_closed_form():
    # for 2x2 PSD matrices: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))
    rng = np.random.default_rng(1)
    for _ in range(20):
        s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        prod = s1 @ s2
        tr_sqrt = math.sqrt(np.trace(prod) + 2 * math.sqrt(max(np.linalg.det(prod), 0)))
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fd_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 12), _random_spd(rng, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_singular_covariances_are_stable():
    # fewer samples than features: rank-deficient covariances must not give NaN or < 0
    rng = np.random.default_rng(3)
    f1 = rng.normal(size=(10, 40))
    f2 = rng.normal(size=(10, 40)) + 0.5
    fd = frechet_distance_from_features(f1, f2)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance_from_features(f1, f1) == pytest.approx(0, abs=1e-8)
    s = _random_spd(rng, 30, rank=3)
    assert frechet_distance(np.zeros(30), s, np.zeros(30), s) == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("dim,n,noise", [(512, 40, 1e-2), (512, 40, 1e-3), (224, 64, 1e-3)])
def test_fd_rank_deficient_matches_the_exact_singular_value_form(dim, n, noise):
    """Fewer samples than features: tr((S1 S2)^(1/2)) is the sum of the singular values of
    X1c X2cᵀ / sqrt((n1 - 1)(n2 - 1)); rounding-level eigenvalues must not bias the FD low."""
    rng = np.random.default_rng(dim + n)
    base = rng.normal(size=(n, dim))
    f1, f2 = base + noise * rng.normal(size=(n, dim)), base + noise * rng.normal(size=(n, dim))
    c1, c2 = f1 - f1.mean(0), f2 - f2.mean(0)
    cross = np.linalg.svd(c1 @ c2.T / (n - 1), compute_uv=False).sum()
    exact = (np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.sum(c1 ** 2) / (n - 1)
             + np.sum(c2 ** 2) / (n - 1) - 2 * cross)
    assert frechet_distance_from_features(f1, f2) == pytest.approx(exact, rel=1e-6)


def test_fd_from_features_identity_symmetry_and_reference():
    rng = np.random.default_rng(4)
    f1 = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5))
    f2 = rng.normal(size=(400, 5)) * 2 + 1
    assert frechet_distance_from_features(f1, f1) == pytest.approx(0, abs=1e-9)
    ab = frechet_distance_from_features(f1, f2)
    assert ab == pytest.approx(frechet_distance_from_features(f2, f1), rel=1e-9)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    expected = frechet_distance(mu1, np.cov(f1.T), mu2, np.cov(f2.T))
    assert ab == pytest.approx(expected, rel=1e-12)
    # FD grows with a mean shift exactly by |shift|^2
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    shifted = frechet_distance_from_features(f1, f1 + shift)
    assert shifted == pytest.approx((shift ** 2).sum(), rel=1e-9)


def test_fd_invariances():
    # FD is invariant to a common rotation + translation and scales quadratically
    rng = np.random.default_rng(6)
    f1 = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    f2 = rng.normal(size=(250, 6)) * 1.5 - 0.3
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    shift = rng.normal(size=6)
    base = frechet_distance_from_features(f1, f2)
    moved = frechet_distance_from_features(f1 @ q + shift, f2 @ q + shift)
    assert moved == pytest.approx(base, rel=1e-9)
    assert frechet_distance_from_features(3 * f1, 3 * f2) == pytest.approx(9 * base, rel=1e-9)
    for scale in (1e80, 1e-150):  # the covariance products overflowed / underflowed
        assert frechet_distance_from_features(scale * f1, scale * f2) / scale**2 == \
            pytest.approx(base, rel=1e-9)


def test_fd_errors():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="features1"):
        frechet_distance_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="same feature dimension"):
        frechet_distance_from_features(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
    for bad in (torch.eye(2, dtype=torch.complex64), [["1", "0"], ["0", "1"]]):
        with pytest.raises(TypeError, match="sigma2 must be an array of real numbers"):
            frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), bad)
    # not covariances: refused, not symmetrised or clipped (-I against I used to give 0)
    with pytest.raises(ValueError, match="sigma1 must be positive semi-definite"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma2 must be a symmetric"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    # a covariance computed in bf16 is PSD only up to bf16 rounding: accepted
    x = torch.randn(20, 8).bfloat16()
    low = (x.T @ x) / 19
    assert frechet_distance(torch.zeros(8), low, torch.zeros(8), low) >= 0
    # ... but where that rounding (10 d eps) reaches the largest entry, the check means
    # nothing: -I in bf16 at d = 64 gave FD 0 ("identical")
    for dtype, d in ((torch.bfloat16, 64), (torch.bfloat16, 13), (torch.float16, 103)):
        with pytest.raises(TypeError, match="too coarse to check"):
            frechet_distance(torch.zeros(d), torch.eye(d), torch.zeros(d), (-torch.eye(d)).to(dtype))


def _brute_force_precision_recall(real, fake, k):
    def radii(points):
        out = []
        for i, p in enumerate(points):
            d = sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)
            out.append(d[k - 1])
        return out

    def inside(points, centres, rad):
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, rad))
                        for p in points])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 8))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_known_subset_case():
    # real: 0..9 on a line; fake: 0..4 on the same spacing plus far outliers at 100, 101
    real = np.arange(10, dtype=float)[:, None]
    fake = np.concatenate([np.arange(5.0), [100.0, 101.0]])[:, None]
    # k=1: real radii are all 1, so fake 0..4 are inside, the outliers are not -> 5/7.
    # fake radii: 1 for 0..4 and for 100/101 -> real 0..5 covered (5 is within 1 of 4) -> 6/10.
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(5 / 7) and recall == pytest.approx(6 / 10)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(40, 3))
    fake = rng.normal(size=(30, 3)) * 1.5 + 0.7
    got = precision_recall(torch.tensor(real), torch.tensor(fake), k=k, chunk=7)
    assert got == pytest.approx(_brute_force_precision_recall(real, fake, k))


@pytest.mark.parametrize("scale, offset", [(1e-9, 0.0), (1.0, 1e7), (1e-2, 1e5)])
def test_precision_recall_does_not_depend_on_the_features_scale_or_origin(scale, offset):
    """An absolute 1e-9 tolerance inflated the balls of tiny features (0.18 -> 0.6), and a
    shared offset made cdist's matrix-product form lose the distances (0.1 -> 0.05)."""
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(80, 8)), rng.normal(size=(60, 8)) * 1.5
    want = _brute_force_precision_recall(real, fake, 3)
    got = precision_recall(real * scale + offset, fake * scale + offset, k=3)
    assert got == pytest.approx(want)


def test_one_far_outlier_does_not_widen_every_ball():
    """The rounding tolerance came from the largest coordinate of either set: one fake at 1e6
    next to features of scale 1e-3 turned precision 0.015 into 0.13."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 2)) * 1e-3
    fake = np.vstack([rng.normal(size=(200, 2)) * 1e-3 + 4e-3, [[1e6, 0.0]]])
    got = precision_recall(real, fake, k=3)
    assert got == pytest.approx(_brute_force_precision_recall(real, fake, 3))


def test_precision_recall_errors():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="k="):
        precision_recall(x, x, k=5)
    with pytest.raises(ValueError, match="k must"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="same feature dimension"):
        precision_recall(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="real_features"):
        precision_recall(np.zeros(5), x)
    with pytest.raises(ValueError, match="chunk"):
        precision_recall(x, x, chunk=0)
    with pytest.raises(ValueError, match="feature dimension"):
        precision_recall(np.zeros((5, 0)), np.zeros((5, 0)))


def test_pixel_features_shapes_and_values():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert PixelFeatures()(x).shape == (4, 768)
    torch.testing.assert_close(PixelFeatures()(x), x.flatten(1))
    pooled = PixelFeatures(pool_size=4)(x)
    assert pooled.shape == (4, 48) == (4, PixelFeatures(4).output_dim(3, 16))
    # each pooled value is the mean of a 4x4 block
    torch.testing.assert_close(pooled[:, 0], x[:, 0, :4, :4].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="pool_size"):
        PixelFeatures(pool_size=0)


def test_random_conv_features_deterministic_and_shapes():
    x = torch.rand(10, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    a = RandomConvFeatures(seed=3)
    torch.manual_seed(1)  # the global RNG does not matter
    b = RandomConvFeatures(seed=3)
    c = RandomConvFeatures(seed=4)
    fa = a(x)
    assert fa.shape == (10, a.output_dim) == (10, 32 + 64 + 128)
    assert torch.equal(fa, b(x)) and not torch.allclose(fa, c(x))
    # batching does not change the features (no interaction between samples)
    torch.testing.assert_close(RandomConvFeatures(seed=3, batch_size=3)(x), fa)
    # weights are orthogonal: rows of each flattened conv weight are orthogonal (gain sqrt 2)
    w = a.convs[1].weight.flatten(1)
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(w.shape[0]), atol=1e-5, rtol=0)
    # tiny and grayscale images work
    small = RandomConvFeatures(seed=0, widths=(8, 8, 8, 8))
    assert small(torch.zeros(2, 1, 4, 4)).shape == (2, 32)
    with pytest.raises(ValueError, match="channels"):
        a(torch.zeros(2, 2, 8, 8))


def test_evaluate_end_to_end():
    from ant_core.data import ProceduralShapes
    real = ProceduralShapes(200, image_size=16, seed=0)
    same = ProceduralShapes(200, image_size=16, seed=1)
    noise = torch.rand(200, 3, 16, 16) * 2 - 1
    for extractor in ["random_conv", "pixels", PixelFeatures(pool_size=2)]:
        good = evaluate(same, real, feature_extractor=extractor, k=3)
        bad = evaluate(noise, real, feature_extractor=extractor, k=3)
        assert set(good) >= {"fd", "precision", "recall"}
        assert good["fd"] < bad["fd"]
        # uniform noise has almost no diversity in these features: it misses most real modes
        assert good["recall"] > bad["recall"] + 0.3
        assert good["num_samples"] == 200 and good["num_reference"] == 200
    # mode collapse onto one real image: every sample is real (precision 1) and the samples'
    # manifold is that single point (radius 0), which holds 1 of the 200 real images
    collapsed = real.images[5:6].repeat(50, 1, 1, 1)
    score = evaluate(collapsed, real)
    assert score["precision"] == 1.0 and score["recall"] == pytest.approx(1 / 200)
    self_score = evaluate(real, real)
    assert self_score["fd"] == pytest.approx(0, abs=1e-6)
    assert self_score["precision"] == self_score["recall"] == 1.0
    with pytest.raises(ValueError, match="same image shape"):
        evaluate(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match="feature_extractor"):
        evaluate(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8), feature_extractor="inception")


def test_evaluate_refuses_images_it_would_score_meaninglessly():
    real = torch.rand(12, 3, 8, 8) * 2 - 1
    for bad, error, message in (
            ((real * 127.5 + 127.5).to(torch.uint8), TypeError, "samples must be floating"),
            (real.permute(0, 2, 3, 1), ValueError, "look channels-last"),
            (real * 127.5 + 127.5, ValueError, r"samples must lie in \[-1, 1\]"),
            (real.masked_fill(real > 0.9, float("nan")), ValueError, "samples must lie in"),
            (real[:0], ValueError, "N >= 1")):
        with pytest.raises(error, match=message):
            evaluate(bad, real)
    with pytest.raises(ValueError, match=r"reference must lie in \[-1, 1\]"):
        evaluate(real, real + 2)
    four = torch.rand(12, 4, 8, 8) * 2 - 1  # any channel count with a fitting extractor
    assert evaluate(four, four.flip(0), feature_extractor="pixels")["num_samples"] == 12
    for batch_size, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="batch_size"):
            RandomConvFeatures(batch_size=batch_size)
