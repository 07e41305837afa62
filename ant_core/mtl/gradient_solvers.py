"""Gradient-method solvers: Gramian (K×K) -> combination coefficients (K,).

Each gradient method's update is ``Σ_k c_k g_k`` where ``c`` depends on the per-task gradients
only through their Gramian ``G_kl = <g_k, g_l>``. The functions here take ``G`` as a float64
numpy array and return ``c`` as a float64 numpy array; they are cheap (K×K work) and exact up to
solver tolerance (MGDA's min-norm point exactly, by Wolfe's finite algorithm; CAGrad's inner
problem exactly too, by Wolfe projections and a closed form per face of the hull). Tasks whose
gradient is exactly zero (``G_kk == 0``, e.g. a cluster with no sample in the batch) get
coefficient 0 in Nash-MTL, IMTL-G and MGDA, and no share of CAGrad's worst-case direction
``g_w``: otherwise MGDA's min-norm point would be that zero gradient (a lost step) and CAGrad
would collapse to ``g0 / (1 + c²)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NashMTLSolveError", "nash_mtl_weights", "mgda_weights", "cagrad_coefficients",
           "imtlg_coefficients", "aligned_mtl_coefficients", "pcgrad_coefficients",
           "min_norm_point"]


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


def _bordered_solve(G, rhs):
    """The first ``n`` rows of the least-squares solution of ``[[G, 1], [1ᵀ, 0]] Z = rhs``
    (``rhs``: ``(n + 1, m)``), the KKT system of quadratics in ``n`` weights with a fixed sum.

    Solved as ``(T A T)(T⁻¹ Z) = T rhs`` with ``T = diag(1/‖p_i‖, min‖p‖)``: gradient norms orders
    of magnitude apart would otherwise cost as many digits.
    """
    n = G.shape[0]
    norms = np.sqrt(np.maximum(np.diag(G), 0.0))
    d = 1.0 / np.where(norms > 0, norms, max(norms.max(), 1.0))
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = d[:, None] * G * d
    kkt[:n, n] = kkt[n, :n] = d / d.max()
    scaled = np.concatenate([d[:, None] * rhs[:n], rhs[n:] / d.max()])
    return d[:, None] * np.linalg.lstsq(kkt, scaled, rcond=None)[0][:n]


def _affine_min_norm(G):
    """``argmin μᵀGμ`` subject to ``Σμ = 1`` (the min-norm point of the points' affine hull)."""
    rhs = np.zeros((G.shape[0] + 1, 1))
    rhs[-1] = 1.0
    return _bordered_solve(G, rhs)[:, 0]


def _wolfe(G, corral, lam, threshold, rtol=0.0):
    """Wolfe's (1976) iterations for the min-norm point of the convex hull of the points with
    Gramian ``G``, from the affinely independent ``corral`` with barycentric weights ``lam > 0``.

    Minor cycle: move towards the corral's affine min-norm point, dropping points whose weight
    reaches 0, until that point lies inside. Major cycle: add the point most opposed to the
    current ``x = Σ λ_i p_i``, unless none improves on ``‖x‖²`` by more than ``threshold``, or
    than ``rtol (‖p_j‖ + s) s``, ``s = Σ λ_i ‖p_i‖`` (the scale of the rounding in that test,
    which may be far below ``max ‖p‖²`` when the corral's points are small), or when a major
    cycle failed to decrease ``‖x‖²`` (only rounding can do that). Returns the final corral and
    its weights.
    """
    norms = np.sqrt(np.maximum(np.diag(G), 0.0))  # a shifted Gramian's diagonal may round < 0
    previous = np.inf
    for _ in range(10 * G.shape[0] + 10):  # each point enters at most a few times; a safety bound
        while len(corral) > 1:
            mu = _affine_min_norm(G[np.ix_(corral, corral)])
            if np.all(mu > 0):
                lam = mu
                break
            shrinking = mu <= 0
            theta = np.min(lam[shrinking] / (lam[shrinking] - mu[shrinking]))
            lam = lam + theta * (mu - lam)
            keep = lam > 1e-15
            corral, lam = [c for c, k in zip(corral, keep) if k], lam[keep] / lam[keep].sum()
        projections = G[:, corral] @ lam  # <x, p_j> for every j
        norm2 = float(lam @ projections[corral])
        j = int(np.argmin(projections))
        size = lam @ norms[corral]
        if projections[j] >= norm2 - max(threshold, rtol * (norms[j] + size) * size) \
                or j in corral or norm2 >= previous:  # the last, rounding: no progress made
            break
        previous = norm2
        corral, lam = corral + [j], np.append(lam, 0.0)
    return corral, lam


def min_norm_point(gramian, *, tol: float = 1e-12):
    """``argmin_{α ∈ simplex} αᵀGα``: the min-norm point of the convex hull of K points given by
    their Gramian, by Wolfe's (1976) algorithm — finite, exact up to rounding, whatever the
    conditioning (no step size or iteration budget to run out of).

    A corral ``S`` (points whose affine hull's min-norm point lies inside their convex hull)
    grows by the point most opposed to the current ``x = Σ λ_i p_i`` until no point improves on
    ``‖x‖²`` by more than ``tol · max_k G_kk``; points whose barycentric weight reaches 0 leave.
    """
    G = _check_gramian(gramian)
    threshold = tol * max(float(np.max(np.diag(G))), np.finfo(float).tiny)
    corral, lam = _wolfe(G, [int(np.argmin(np.diag(G)))], np.ones(1), threshold)
    alpha = np.zeros(G.shape[0])
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


def _cagrad_face(M, b, r, support):
    """CAGrad's optimality conditions on the affine hull of the points ``p_S``, in closed form.

    The projection of ``−t g0`` onto that hull is ``x(t) = x_0 − t P g0`` (``x_0``: the hull's
    min-norm point, ``P``: the projection onto its directions) with weights ``μ − t v``: one
    bordered solve with two right-hand sides. As ``x_0 ⊥ P g0``, ``‖x(t)‖² − r²t² =
    ‖x_0‖² − t²(r² − ‖P g0‖²)`` vanishes at ``t = ‖x_0‖ / √(r² − ‖P g0‖²)``, and not at all when
    ``r ≤ ‖P g0‖`` (then None). Returns ``(t, w, y)``: the weights of ``x(t)`` and of
    ``x(t)/t = r x/‖x‖``. Where ``x_0 = 0`` up to rounding, ``t = 0`` and ``y = −v``, the limit
    ``x(t)/t → −P g0`` (``μ/t`` would be rounding noise, blown up).
    """
    n = len(support)
    Ms = M[np.ix_(support, support)]
    rhs = np.zeros((n + 1, 2))
    rhs[n, 0], rhs[:n, 1] = 1.0, b[support]
    mu, v = _bordered_solve(Ms, rhs).T
    x0_sq, pg0_sq = max(float(mu @ Ms @ mu), 0.0), float(v @ Ms @ v)
    x0_zero = x0_sq <= 1e-12 * float(np.abs(mu) @ np.abs(Ms) @ np.abs(mu))  # but for rounding
    # with x_0 = 0 and r = ‖P g0‖ (c = 1, g0 in the face's span) every t is a root: 0 is optimal,
    # so only r clearly below ‖P g0‖ rules the face out
    if r * r <= pg0_sq * (1 - 1e-9 if x0_zero else 1):
        return None
    if x0_zero:
        t = 0.0
    else:
        t = np.sqrt(x0_sq / (r * r - pg0_sq))
    w, y = np.zeros(M.shape[0]), np.zeros(M.shape[0])
    w[support] = mu - t * v
    y[support] = w[support] / t if t > 0 else -v
    return t, w, y


def _cagrad_direction(M, b, g0_sq, r, tol=1e-11):
    """Weights ``y`` of ``r x*/‖x*‖``, ``x* = argmin_{x ∈ C} F(x) = <x, g0> + r‖x‖``, ``C`` the
    convex hull of the points ``p`` with Gramian ``M``, ``b = (<p_i, g0>)``, ``g0_sq = ‖g0‖²``.

    ``F`` is convex; ``x* ≠ 0`` is optimal iff ``−(g0 + x*/t) ∈ N_C(x*)`` with ``t = ‖x*‖/r``,
    i.e. iff ``x* = x(t) := proj_C(−t g0)`` and ``‖x(t)‖ = r t``. So ``φ(t) = ‖x(t)‖ − r t`` has
    one root ``t*`` (0 when ``x* = 0``), above which it is negative and below positive, and
    ``x(t)`` is piecewise linear in ``t``, one piece per face, each with the closed form of
    :func:`_cagrad_face`. Iterate: project ``−t g0`` exactly (Wolfe, warm-started: the shifted
    points are translates, so a corral stays a corral), narrow the bracket of ``t*`` by the sign of
    ``φ(t)``, and take the face's root as the next ``t`` (bisect when it leaves the bracket),
    until a face's candidate passes the first-order test ``min_j ∇F_j ≥ ∇F·w − tol·scale``
    (``∇F = b + M y``; at ``x = 0`` a subgradient, with ``‖y‖_M ≤ r``). Once ``t`` lies in a
    piece next to ``t*``, that face's root is ``t*``: finite and exact but for rounding. Should
    rounding defeat the test, the candidate with the least duality gap is returned.
    """
    n = M.shape[0]
    norms = np.sqrt(np.diag(M))
    scale = norms.max() * (np.sqrt(g0_sq) + r)  # bounds |∇F_j|
    lo, hi = 0.0, norms.max() / r  # ‖x(t)‖ ≤ max‖p‖ < r t beyond hi
    t, corral, lam = 0.0, [int(np.argmin(norms))], np.ones(1)
    best, best_gap = np.zeros(n), np.inf
    rtol = 4 * n * np.finfo(float).eps
    for _ in range(50):  # 2-3 rounds as a rule; the bound only guards against rounding
        Mt = M + t * (b[:, None] + b[None, :]) + t * t * g0_sq  # Gramian of p_i + t g0
        # Wolfe's test <p_j − x, x + t g0> ≥ −threshold is t times the first-order test below,
        # hence its threshold; rtol: down to the rounding of the test
        corral, lam = _wolfe(Mt, corral, lam, t * tol * scale, rtol=rtol)
        norm2 = lam @ M[np.ix_(corral, corral)] @ lam  # ‖x(t)‖²
        if t > 0 and norm2 < (r * t) ** 2:
            hi = t  # φ(t) < 0
        else:
            lo = t
        if t == 0:  # the min-norm point: x = 0 as a candidate, if 0 is in the hull
            origin = np.zeros(n)
            origin[corral] = lam
            size = lam @ norms[corral]
            zero_in_hull = norm2 <= rtol * (norms.max() + size) * size  # Wolfe's resolution
        face = _cagrad_face(M, b, r, corral)
        t_face, w, y = face if face is not None else (np.inf, None, None)
        if t_face == 0:
            w = origin
        elif w is not None and np.min(w * norms) < -1e-12 * norms.max():
            w = None  # infeasible: not only rounding moving x by 1e-12 max‖p‖ per weight
        if w is not None:
            w = np.clip(w, 0.0, None) / np.clip(w, 0.0, None).sum()
            if t_face > 0:  # onto the ball ‖y‖_M = r: w / t_face alone is off when t is tiny
                y = w * (r / max(np.sqrt(max(w @ M @ w, 0.0)), np.finfo(float).tiny))
            grad = b + M @ y  # <p_j, d> for d = g0 + Σ y_i p_i, ‖d − g0‖ ≤ r
            rounding = rtol * np.max(np.abs(M) @ np.abs(y) + np.abs(b))
            if grad @ w - grad.min() <= tol * scale + rounding and (t_face > 0 or zero_in_hull):
                return y
            # fallback ranking: the duality gap F(w) − min_j <p_j, d> ≥ F(w) − min F
            gap = w @ b + r * np.sqrt(max(w @ M @ w, 0.0)) - grad.min()
            if gap < best_gap:
                best, best_gap = y, gap
        t = t_face if lo < t_face < hi else np.sqrt(lo * hi) if lo > 0 else hi / 16
    return best


def cagrad_coefficients(gramian, *, c: float = 0.4):
    """CAGrad (Liu et al. 2021) with ``rescale=1``: ``d = (g0 + √φ/‖g_w‖ g_w) / (1 + c²)``.

    ``g0`` is the mean gradient, ``φ = c²‖g0‖²`` and ``w = argmin_{w ∈ simplex} g_wᵀg0 + √φ‖g_w‖``
    over the tasks with a non-zero gradient, solved exactly up to rounding (see
    :func:`_cagrad_direction`). Where that optimum is ``g_w = 0`` (0 in the tasks' convex hull
    and no better point), ``√φ g_w/‖g_w‖`` is its limit ``−P g0`` along the optimal path (``P``:
    projection onto the span of the optimal face), so that ``min_k <g_k, d> ≥ 0`` still holds.
    With ``c = 0`` or ``g0 = 0`` the update is ``g0 / (1 + c²)``.
    """
    G = _check_gramian(gramian)
    K = G.shape[0]
    mean = np.full(K, 1.0 / K)
    scale = max(np.trace(G) / K, np.finfo(float).tiny)
    Gn = G / scale
    Gmean = Gn @ mean
    g0_sq = max(float(mean @ Gmean), 0.0)
    root_phi = c * np.sqrt(g0_sq)
    active = np.flatnonzero(np.diag(G) > 0)
    y = np.zeros(K)  # weights of √φ g_w / ‖g_w‖
    # below 1e-150 (in units of the mean gradient norm) the whole correction is nothing, and
    # the bracket of t (up to max‖g‖ / √φ) would overflow when squared
    if active.size and root_phi > 1e-150:
        y[active] = _cagrad_direction(Gn[np.ix_(active, active)], Gmean[active], g0_sq, root_phi)
    return (mean + y) / (1.0 + c**2)


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
