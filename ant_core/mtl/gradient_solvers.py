"""Gradient-method solvers: Gramian (K×K) -> combination coefficients (K,).

Each gradient method's update is ``Σ_k c_k g_k`` where ``c`` depends on the per-task gradients
only through their Gramian ``G_kl = <g_k, g_l>``. The functions here take ``G`` as a float64
numpy array and return ``c`` as a float64 numpy array; they are cheap (K×K work) and exact up to
solver tolerance (MGDA's min-norm point exactly, by Wolfe's finite algorithm; CAGrad's inner
problem by projected gradient descent). Tasks whose gradient is exactly zero (``G_kk == 0``, e.g.
a cluster with no sample in the batch) get coefficient 0 in Nash-MTL, IMTL-G and MGDA, and no
share of CAGrad's worst-case direction ``g_w``: otherwise MGDA's min-norm point would be that
zero gradient (a lost step) and CAGrad would collapse to ``g0 / (1 + c²)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NashMTLSolveError", "nash_mtl_weights", "mgda_weights", "cagrad_coefficients",
           "imtlg_coefficients", "aligned_mtl_coefficients", "pcgrad_coefficients",
           "project_to_simplex", "min_norm_point"]


class NashMTLSolveError(RuntimeError):
    """The Nash-MTL bargaining problem has no solution or Newton did not converge."""


def _check_gramian(gramian):
    G = np.asarray(gramian, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"gramian must be square (K, K), got shape {G.shape}")
    if not np.all(np.isfinite(G)):
        raise ValueError("gramian must be finite")
    return 0.5 * (G + G.T)


def nash_mtl_weights(gramian, *, max_iter: int = 100, tol: float = 1e-10):
    """Nash-MTL bargaining weights: the ``α > 0`` with ``G α = 1 / α``.

    Solves the strictly convex ``min_α ½ αᵀGα − Σ log α_k`` by damped Newton with backtracking
    (self-concordant, so a handful of K×K solves). Raises :class:`NashMTLSolveError` when the
    problem is unbounded (a non-negative combination of the gradients vanishes, e.g. ``g_1 = −g_2``)
    or Newton fails to converge in ``max_iter`` steps.
    """
    G = _check_gramian(gramian)
    K = G.shape[0]
    alpha_full = np.zeros(K)
    active = np.flatnonzero(np.diag(G) > 0)
    if active.size == 0:
        raise NashMTLSolveError("all task gradients are zero; Nash-MTL weights are undefined")
    M = G[np.ix_(active, active)]
    trace_scale = np.trace(M) / active.size
    M = M / trace_scale
    n = active.size
    total = M.sum()
    alpha = np.full(n, np.sqrt(n / total) if total > 0 else 1.0)

    def objective(a):
        return 0.5 * a @ M @ a - np.log(a).sum()

    converged = False
    for _ in range(max_iter):
        residual = M @ alpha - 1.0 / alpha
        hessian = M + np.diag(1.0 / alpha**2)
        try:
            step = np.linalg.solve(hessian, residual)
        except np.linalg.LinAlgError:
            break
        if alpha.max() > 1e12 or not np.all(np.isfinite(step)):
            break  # diverging: the objective is unbounded below
        decrement = float(residual @ step)
        if decrement < 1e-12:
            # Quadratic-convergence region: the full step is safe, and the objective can no
            # longer resolve progress, so stop on the (relative) step size instead.
            candidate = alpha - step
            if np.all(candidate > 0):
                alpha = candidate
            if np.max(np.abs(step) / alpha) < tol:
                converged = True
                break
            continue
        t, f0 = 1.0, objective(alpha)
        while True:
            candidate = alpha - t * step
            if np.all(candidate > 0) and objective(candidate) <= f0 - 0.25 * t * decrement:
                break
            t *= 0.5
            if t < 1e-14:
                raise NashMTLSolveError("Nash-MTL line search failed (ill-conditioned Gramian)")
        alpha = candidate
    if not converged or not np.all(np.isfinite(alpha)):
        raise NashMTLSolveError(
            f"Nash-MTL Newton did not converge in {max_iter} iterations: the problem is likely "
            "unbounded (task gradients with a vanishing non-negative combination)")
    alpha_full[active] = alpha / np.sqrt(trace_scale)
    return alpha_full


def project_to_simplex(v):
    """Euclidean projection of ``v`` onto the probability simplex (sort-based, exact)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    index = np.arange(1, v.size + 1)
    rho = np.nonzero(u - cumulative / index > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)


def _simplex_minimise(value_and_grad, K, max_iter=2000, tol=1e-13):
    """Projected gradient descent with backtracking over the simplex, from the centre."""
    x = np.full(K, 1.0 / K)
    f, g = value_and_grad(x)
    step = 1.0
    for _ in range(max_iter):
        while True:
            candidate = project_to_simplex(x - step * g)
            fc, gc = value_and_grad(candidate)
            diff = candidate - x
            if fc <= f + g @ diff + diff @ diff / (2 * step) + 1e-18 or step < 1e-20:
                break
            step *= 0.5
        moved = np.abs(candidate - x).max()
        x, f, g = candidate, fc, gc
        step *= 2.0
        if moved < tol:
            break
    return x


def _affine_min_norm(G):
    """``argmin μᵀGμ`` subject to ``Σμ = 1`` (the min-norm point of the points' affine hull)."""
    n = G.shape[0]
    kkt = np.block([[G, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    rhs = np.concatenate([np.zeros(n), [1.0]])
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]


def min_norm_point(gramian, *, tol: float = 1e-12):
    """``argmin_{α ∈ simplex} αᵀGα``: the min-norm point of the convex hull of K points given by
    their Gramian, by Wolfe's (1976) algorithm — finite, exact up to rounding, whatever the
    conditioning (no step size or iteration budget to run out of).

    A corral ``S`` (points whose affine hull's min-norm point lies inside their convex hull)
    grows by the point most opposed to the current ``x = Σ λ_i p_i`` until no point improves on
    ``‖x‖²`` by more than ``tol · max_k G_kk``; points whose barycentric weight reaches 0 leave.
    """
    G = _check_gramian(gramian)
    K = G.shape[0]
    threshold = tol * max(float(np.max(np.diag(G))), np.finfo(float).tiny)
    corral, lam = [int(np.argmin(np.diag(G)))], np.ones(1)
    for _ in range(10 * K + 10):  # each point enters at most a few times; a safety bound
        projections = G[:, corral] @ lam  # <x, p_j> for every j
        norm2 = float(lam @ projections[corral])
        j = int(np.argmin(projections))
        if projections[j] >= norm2 - threshold or j in corral:
            break
        corral, lam = corral + [j], np.append(lam, 0.0)
        while True:  # move towards the affine min-norm point, dropping points that reach 0
            mu = _affine_min_norm(G[np.ix_(corral, corral)])
            if np.all(mu > 0):
                lam = mu
                break
            shrinking = mu <= 0
            theta = np.min(lam[shrinking] / (lam[shrinking] - mu[shrinking]))
            lam = lam + theta * (mu - lam)
            keep = lam > 1e-15
            corral, lam = [c for c, k in zip(corral, keep) if k], lam[keep] / lam[keep].sum()
    alpha = np.zeros(K)
    alpha[corral] = lam
    return alpha


def mgda_weights(gramian):
    """MGDA (Sener & Koltun): the min-norm point ``argmin_{α ∈ simplex} αᵀGα`` over the tasks
    with a non-zero gradient (closed form for two, Wolfe's :func:`min_norm_point` beyond)."""
    G = _check_gramian(gramian)
    alpha = np.zeros(G.shape[0])
    active = np.flatnonzero(np.diag(G) > 0)
    if active.size == 0:  # every gradient is zero: any weights give the same (zero) update
        return np.full(G.shape[0], 1.0 / G.shape[0])
    M = G[np.ix_(active, active)]
    if active.size == 1:
        alpha[active] = 1.0
    elif active.size == 2:
        denom = M[0, 0] + M[1, 1] - 2 * M[0, 1]
        a = 0.5 if denom <= 0 else float(np.clip((M[1, 1] - M[0, 1]) / denom, 0.0, 1.0))
        alpha[active] = [a, 1.0 - a]
    else:
        alpha[active] = min_norm_point(M)
    return alpha


def cagrad_coefficients(gramian, *, c: float = 0.4):
    """CAGrad (Liu et al. 2021) with ``rescale=1``: ``d = (g0 + √φ/‖g_w‖ g_w) / (1 + c²)``.

    ``g0`` is the mean gradient, ``φ = c²‖g0‖²`` and ``w = argmin_{w ∈ simplex} g_wᵀg0 + √φ‖g_w‖``
    over the tasks with a non-zero gradient.
    """
    G = _check_gramian(gramian)
    K = G.shape[0]
    mean = np.full(K, 1.0 / K)
    scale = max(np.trace(G) / K, np.finfo(float).tiny)
    Gn = G / scale
    root_phi = c * np.sqrt(max(mean @ Gn @ mean, 0.0))
    Gmean = Gn @ mean
    active = np.flatnonzero(np.diag(G) > 0)
    w = np.zeros(K)
    if active.size:
        Ga, Gmean_a = Gn[np.ix_(active, active)], Gmean[active]

        def value_and_grad(v):
            norm = np.sqrt(max(v @ Ga @ v, 1e-30))
            return v @ Gmean_a + root_phi * norm, Gmean_a + root_phi * (Ga @ v) / norm

        w[active] = _simplex_minimise(value_and_grad, active.size)
    norm_w = np.sqrt(max(w @ Gn @ w, 0.0))
    lam = root_phi / norm_w if norm_w > 0 else 0.0
    return (mean + lam * w) / (1.0 + c**2)


def imtlg_coefficients(gramian):
    """IMTL-G (Liu et al. 2021): ``Σ α = 1`` and the update has equal projection on every ``u_k``.

    ``α_{2:K} = (g_1 Uᵀ)(D Uᵀ)⁻¹`` with ``D`` rows ``g_1 − g_k``, ``U`` rows ``u_1 − u_k``,
    ``u_k = g_k/‖g_k‖``, all written with Gramian entries. Zero-gradient tasks get 0.
    """
    G = _check_gramian(gramian)
    coeffs = np.zeros(G.shape[0])
    active = np.flatnonzero(np.diag(G) > 0)
    if active.size == 0:
        return coeffs
    M = G[np.ix_(active, active)]
    norms = np.sqrt(np.diag(M))
    if active.size == 1:
        coeffs[active] = 1.0
        return coeffs
    proj = M / norms[None, :]  # proj[a, b] = <g_a, u_b>
    first = proj[0, 0] - proj[0, 1:]
    du = (proj[0, 0] - proj[0, 1:])[None, :] - (proj[1:, 0][:, None] - proj[1:, 1:])
    rest = np.linalg.lstsq(du.T, first, rcond=None)[0]
    coeffs[active] = np.concatenate([[1.0 - rest.sum()], rest])
    return coeffs


def aligned_mtl_coefficients(gramian, *, preferences=None, rtol: float = 1e-10):
    """Aligned-MTL (Senushkin et al. 2023): ``σ_min · U Vᵀ w`` for the task matrix ``U Σ Vᵀ``.

    With ``G = V Λ Vᵀ`` (``Σ = Λ^½``) the coefficients are ``σ_min V Σ⁻¹ Vᵀ w``; directions with
    eigenvalue below ``rtol · λ_max`` are dropped (pseudo-inverse). ``w`` defaults to ``1/K``.
    """
    G = _check_gramian(gramian)
    K = G.shape[0]
    w = np.full(K, 1.0 / K) if preferences is None else np.asarray(preferences, np.float64)
    eigenvalues, V = np.linalg.eigh(G)
    if eigenvalues.max() <= 0:
        return np.zeros(K)
    keep = eigenvalues > rtol * eigenvalues.max()
    sigma = np.sqrt(eigenvalues[keep])
    Vk = V[:, keep]
    return sigma.min() * Vk @ ((Vk.T @ w) / sigma)


def pcgrad_coefficients(gramian, rng: np.random.Generator):
    """PCGrad (Yu et al. 2020), mean reduction, from the Gramian alone.

    For each task i (in order) a permutation of all tasks is drawn from ``rng``; for each j in
    it, if ``<g_i^PC, g_j> < 0`` then ``g_i^PC −= <g_i^PC, g_j>/‖g_j‖² g_j`` (projecting against
    the original ``g_j``). Tracking ``g_i^PC = Σ_k A_ik g_k`` needs only inner products.
    Returns ``c = Σ_i A_i / K``.
    """
    G = _check_gramian(gramian)
    K = G.shape[0]
    total = np.zeros(K)
    for i in range(K):
        a = np.zeros(K)
        a[i] = 1.0
        for j in rng.permutation(K):
            dot = a @ G[:, j]
            if dot < 0 and G[j, j] > 0:
                a[j] -= dot / G[j, j]
        total += a
    return total / K
