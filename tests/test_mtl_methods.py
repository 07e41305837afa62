"""MTL methods: the gradient contract, each method against an independent reference."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ant_core import grouped_mse, mtl
from ant_core.mtl import gradient_solvers as solvers

K = 3


def _problem(seed=0, num_tasks=K, batch=12):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3)).double()
    x = torch.randn(batch, 5, dtype=torch.float64)
    y = torch.randn(batch, 3, dtype=torch.float64)
    group = torch.arange(batch) % num_tasks
    return model, x, y, group


def _losses(model, x, y, group, num_tasks=K):
    per_sample = (model(x) - y).pow(2).mean(1)
    return torch.stack([per_sample[group == k].mean() for k in range(num_tasks)])


def _explicit_task_grads(model, x, y, group, num_tasks=K):
    """Per-task gradient vectors (K, P) by separate forward/backward per task."""
    rows = []
    for k in range(num_tasks):
        loss = _losses(model, x, y, group, num_tasks)[k]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", mtl.available())
def test_gradient_is_weighted_sum_and_accumulates(name):
    model, x, y, group = _problem()
    method = mtl.create(name, num_tasks=K)
    reference = _explicit_task_grads(model, x, y, group)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for step in range(3):  # several steps: stateful methods (dwa, nash, famo) move
        before = _flat_grad(model).clone()
        weights = method.backward(_losses(model, x, y, group), model.parameters())
        assert weights.shape == (K,) and weights.dtype == torch.float32
        expected = before + weights.double() @ reference
        torch.testing.assert_close(_flat_grad(model), expected, rtol=2e-6, atol=1e-9)
        if name == "famo":
            with torch.no_grad():
                method.update(_losses(model, x, y, group) * 0.9)


@pytest.mark.parametrize("name", mtl.available())
def test_detached_losses_are_refused(name):
    model, x, y, group = _problem()
    with torch.no_grad():
        losses = _losses(model, x, y, group)
    with pytest.raises(ValueError, match="losses do not require grad"):
        mtl.create(name, num_tasks=K).backward(losses, model.parameters())


def _absent_task_problem():
    """Task 1 has no sample in the batch: grouped_mse gives it a loss of exactly 0."""
    model, x, y, _ = _problem()
    group = torch.tensor([0, 2] * 6)
    per_sample = (model(x) - y).pow(2).mean(1)
    losses = torch.stack([per_sample[group == 0].mean(), per_sample.sum() * 0,
                          per_sample[group == 2].mean()])
    return model, losses, group


def test_absent_task_is_left_out_of_the_weighting_statistics():
    # FAMO: weight 0 for the absent task, the others as FAMO on the present ones
    model, losses, group = _absent_task_problem()
    famo = mtl.create("famo", num_tasks=K)
    w = famo.backward(losses, model.parameters(), group=group).double()
    present = losses.detach()[[0, 2]]
    expected = (1 / present) / (1 / present).sum()  # z uniform: w_k ∝ 1 / D_k
    torch.testing.assert_close(w[[0, 2]], expected, rtol=1e-6, atol=0)
    assert w[1] == 0
    delta = famo.update(losses.detach() * 0.5, group=group)
    assert delta[1] == 0 and torch.all(delta[[0, 2]] > 0)
    lagged = mtl.create("famo", num_tasks=K, reevaluate=False)
    for step in range(3):
        model.zero_grad()
        model, losses, group = _absent_task_problem()
        w = lagged.backward(losses * (1 - 0.1 * step), model.parameters(), group=group)
        assert w[1] == 0 and torch.isfinite(w).all()
    assert torch.isfinite(lagged.logits).all()
    # UW: the absent task's log-variance gets no gradient (a loss of 0 would push it down)
    model, losses, group = _absent_task_problem()
    uw = mtl.create("uw", num_tasks=K).double()
    uw.backward(losses, model.parameters(), group=group)
    assert uw.log_vars.grad[1] == 0 and torch.all(uw.log_vars.grad[[0, 2]] != 0)
    # DWA: the absent task keeps its previous loss in the history, ratios stay finite
    dwa = mtl.create("dwa", num_tasks=K)
    for step in range(4):
        model, losses, group = _absent_task_problem()
        if step != 1:  # every task present
            group = torch.arange(12) % K
            losses = losses + torch.tensor([0.0, 1.0 + step, 0.0], dtype=losses.dtype)
        w = dwa.backward(losses, model.parameters(), group=group)
        assert torch.isfinite(w).all()
    # history after steps 2 and 3 (both full): ratio 4/3 for task 1
    assert dwa.loss_history[:, 1].tolist() == [3.0, 4.0]
    # GradNorm: a task's initial loss is its first loss while present
    gradnorm = mtl.create("gradnorm", num_tasks=K)
    model, losses, group = _absent_task_problem()
    gradnorm.backward(losses, model.parameters(), group=group)
    assert gradnorm.initialised.tolist() == [True, False, True]
    assert gradnorm.task_weights.grad[1] == 0
    full = torch.arange(12) % K
    model, x, y, _ = _problem()
    losses = _losses(model, x, y, full)
    gradnorm.backward(losses, model.parameters(), group=full)
    assert gradnorm.initialised.all()
    assert gradnorm.initial_losses[1] == losses[1].item()
    old_checkpoint = {**gradnorm.state_dict(), "initialised": torch.tensor(True)}
    restored = mtl.create("gradnorm", num_tasks=K)
    restored.load_state_dict(old_checkpoint)
    assert restored.initialised.tolist() == [True] * K


def test_famo_skips_a_step_with_a_non_finite_loss():
    for bad in (float("nan"), float("inf")):
        famo = mtl.create("famo", num_tasks=2)
        x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
        famo.backward(torch.tensor([0.5, 0.4], dtype=torch.float64) * x, [x])
        state = {k: v.clone() for k, v in famo.state_dict().items()}
        famo.update(torch.tensor([bad, 0.3], dtype=torch.float64))
        for key in ("logits", "adam_exp_avg", "adam_exp_avg_sq", "adam_step"):
            assert torch.equal(famo.state_dict()[key], state[key]), key
        w = famo.backward(torch.tensor([0.5, 0.4], dtype=torch.float64) * x, [x])
        assert torch.isfinite(w).all()
        famo.update(torch.tensor([0.4, 0.3], dtype=torch.float64))
        assert famo.adam_step.item() == 1 and torch.isfinite(famo.logits).all()


def test_frozen_and_unused_parameters():
    model, x, y, group = _problem()
    model[0].bias.requires_grad_(False)
    unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    for name in ["uw", "pcgrad"]:
        mtl.create(name, num_tasks=K).backward(_losses(model, x, y, group),
                                               [*model.parameters(), unused])
        assert model[0].bias.grad is None and unused.grad is None
        assert model[0].weight.grad is not None


def test_uncertainty_weighting_closed_form():
    model, x, y, group = _problem()
    uw = mtl.create("uw", num_tasks=K).double()
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2, 0.0]))
    losses = _losses(model, x, y, group)
    weights = uw.backward(losses, model.parameters())
    s = uw.log_vars.detach()
    torch.testing.assert_close(weights.double(), 0.5 * torch.exp(-s) / K, rtol=1e-6, atol=0)
    torch.testing.assert_close(uw.log_vars.grad, 0.5 * (1 - torch.exp(-s) * losses.detach() / K))
    (group_,) = uw.param_groups()
    assert group_["lr"] == 0.025 and group_["weight_decay"] == 0.0


def test_famo_weights_and_update_match_paper():
    losses = torch.tensor([0.5, 1.5, 0.2], dtype=torch.float64, requires_grad=True)
    famo = mtl.create("famo", num_tasks=K, lr=0.1, weight_decay=0.01)
    logits_ref = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([logits_ref], lr=0.1, weight_decay=0.01)
    current = losses.detach()
    for step in range(4):
        x = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        weights = famo.backward(losses * x, [x])
        z = torch.softmax(logits_ref.detach(), 0)
        d = current + 1e-8
        expected = (z / d) / (z / d).sum()
        torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
        new = current * torch.tensor([0.9, 0.99, 1.05], dtype=torch.float64)
        famo.update(new)
        delta = torch.log(d) - torch.log(new + 1e-8)
        optimiser.zero_grad()
        torch.softmax(logits_ref, 0).backward(delta)  # J_softmaxᵀ δ by autograd
        optimiser.step()
        torch.testing.assert_close(famo.logits, logits_ref.detach(), rtol=1e-10, atol=1e-12)
        current = new
        losses = new.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="before backward"):
        famo.update(current)


def test_famo_without_reevaluation_updates_from_the_next_losses():
    """reevaluate=False takes the next backward's losses as the "after" losses: on a loss
    sequence where the re-evaluated losses equal the next step's, both variants agree."""
    torch.manual_seed(0)
    sequence = [torch.rand(K, dtype=torch.float64) + 0.1 for _ in range(5)]
    paper = mtl.create("famo", num_tasks=K, lr=0.1)
    lagged = mtl.create("famo", num_tasks=K, lr=0.1, reevaluate=False)
    for step, losses in enumerate(sequence):
        x = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        w_paper = paper.backward(losses * x, [x])
        w_lagged = lagged.backward(losses * x, [x])
        torch.testing.assert_close(w_lagged, w_paper)
        torch.testing.assert_close(lagged.logits, paper.logits)
        if step + 1 < len(sequence):
            paper.update(sequence[step + 1])
    assert not torch.equal(paper.logits, torch.zeros(K, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not call update"):
        lagged.update(sequence[0])
    with pytest.raises(TypeError, match="reevaluate"):
        mtl.create("famo", num_tasks=K, reevaluate="no")


def test_famo_warns_once_when_update_is_never_called():
    """With reevaluate=True the logits move only in update(); a loop that forgets it silently
    trained with fixed weights."""
    famo = mtl.create("famo", num_tasks=K)
    x = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    losses = torch.tensor([0.5, 1.5, 0.2], dtype=torch.float64)
    famo.backward(losses * x, [x])
    famo.update(losses * 0.9)  # the right order: no warning
    famo.backward(losses * x, [x])
    with pytest.warns(UserWarning, match="without update") as record:
        famo.backward(losses * x, [x])
        famo.backward(losses * x, [x])  # once only
    assert len(record) == 1 and record[0].filename == __file__


def test_dwa_uses_loss_ratios():
    dwa = mtl.create("dwa", num_tasks=K, temperature=2.0)
    history = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 3.3]),
               torch.tensor([0.4, 1.0, 3.0])]
    x = torch.nn.Parameter(torch.ones(()))
    for i, loss in enumerate(history):
        w = dwa.backward(loss * x, [x])
        if i < 2:
            torch.testing.assert_close(w, torch.full((K,), 1 / K))
    ratio = history[1] / history[0]
    torch.testing.assert_close(w, torch.softmax(ratio / 2.0, 0))


def test_rlw_is_random_softmax_and_seeded():
    a, b = (mtl.create("rlw", num_tasks=K, seed=4) for _ in range(2))
    x = torch.nn.Parameter(torch.ones(()))
    wa = [a.backward(torch.ones(K) * x, [x]) for _ in range(2)]
    wb = b.backward(torch.ones(K) * x, [x])
    assert torch.equal(wa[0], wb) and not torch.equal(wa[0], wa[1])
    assert math.isclose(float(wa[1].sum()), 1.0, rel_tol=1e-6) and bool((wa[1] > 0).all())


def test_gradnorm_weight_gradient():
    model, x, y, group = _problem()
    gn = mtl.create("gradnorm", num_tasks=K, alpha=1.5).double()
    with torch.no_grad():
        gn.task_weights.copy_(torch.tensor([1.0, 2.0, 3.0]))
    losses = _losses(model, x, y, group)
    weights = gn.backward(losses, model.parameters())
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * K / 6
    torch.testing.assert_close(weights.double(), w / K, rtol=1e-6, atol=0)
    layer = list(model.parameters())[-1]
    norms = torch.stack([torch.autograd.grad(_losses(model, x, y, group)[k], layer)[0].norm()
                         for k in range(K)])
    target = (w * norms).mean()  # first call: every loss ratio is 1
    torch.testing.assert_close(gn.task_weights.grad, torch.sign(w * norms - target) * norms)


def test_gradnorm_initial_losses_skip_a_non_finite_first_loss():
    """A NaN first loss (an fp16 step a GradScaler skips) was kept as the task's initial loss:
    every later ratio was NaN and the balancing gradient 0 for good."""
    model, x, y, group = _problem()
    gn = mtl.create("gradnorm", num_tasks=K).double()
    losses = _losses(model, x, y, group)
    gn.backward(losses * torch.tensor([1.0, float("nan"), 1.0], dtype=losses.dtype),
                model.parameters())
    assert gn.initialised.tolist() == [True, False, True]
    for p in model.parameters():
        p.grad = None
    gn.task_weights.grad = None
    gn.backward(_losses(model, x, y, group), model.parameters())
    assert gn.initialised.all() and torch.isfinite(gn.initial_losses).all()
    assert gn.task_weights.grad.abs().sum() > 0


def test_nash_solution_is_the_bargaining_point():
    rng = np.random.default_rng(0)
    for k in [1, 2, 5, 32]:
        grads = rng.normal(size=(k, 3 * k + 2)) * rng.uniform(0.1, 10, size=(k, 1))
        gram = grads @ grads.T
        alpha = solvers.nash_mtl_weights(gram)
        assert np.all(alpha > 0)
        np.testing.assert_allclose(gram @ alpha, 1 / alpha, rtol=1e-7)
        np.testing.assert_allclose(solvers.nash_mtl_weights(4.0 * gram), alpha / 2, rtol=1e-7)


def test_nash_failures_are_loud():
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])
    with pytest.raises(solvers.NashMTLSolveError):
        solvers.nash_mtl_weights(g @ g.T)
    g = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])  # a task with zero gradient
    alpha = solvers.nash_mtl_weights(g @ g.T)
    np.testing.assert_allclose(alpha, [1.0, 0.0, 1 / 3])


def test_nash_update_every_and_max_norm():
    model, x, y, group = _problem()
    nash = mtl.create("nashmtl", num_tasks=K, update_weights_every=3, max_norm=0.01)
    ref = _explicit_task_grads(model, x, y, group)
    w0 = nash.backward(_losses(model, x, y, group), model.parameters())
    assert float((w0.double() @ ref).norm()) <= 0.01 * (1 + 1e-5)
    model.zero_grad()
    w1 = nash.backward(_losses(model, x, y, group), model.parameters())
    torch.testing.assert_close(w1, w0)  # same batch, cached alpha, same clipping
    torch.testing.assert_close(_flat_grad(model), w1.double() @ ref, rtol=1e-5, atol=1e-9)


def _simplex_grid(k, steps):
    for idx in itertools.product(range(steps + 1), repeat=k - 1):
        if sum(idx) <= steps:
            yield np.array([*idx, steps - sum(idx)], dtype=np.float64) / steps


def test_mgda_min_norm():
    rng = np.random.default_rng(1)
    for k in [2, 3, 6]:
        grads = rng.normal(size=(k, 4))
        gram = grads @ grads.T
        alpha = solvers.mgda_weights(gram)
        assert abs(alpha.sum() - 1) < 1e-9 and np.all(alpha >= 0)
        value = alpha @ gram @ alpha
        assert np.all(gram @ alpha >= value - 1e-6)  # KKT: optimal over all vertices
        if k <= 3:
            best = min(a @ gram @ a for a in _simplex_grid(k, 200))
            assert value <= best + 1e-9


def _min_norm_by_enumeration(gram):
    """The exact min-norm point: the best over all supports of their affine min-norm point,
    where that point has non-negative weights (independent of Wolfe's iteration)."""
    k = gram.shape[0]
    best = None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            sub = gram[np.ix_(support, support)]
            kkt = np.block([[sub, np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            mu = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if np.all(mu >= -1e-12):
                alpha = np.zeros(k)
                alpha[list(support)] = np.clip(mu, 0, None) / np.clip(mu, 0, None).sum()
                value = alpha @ gram @ alpha
                best = value if best is None else min(best, value)
    return best


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(3, 6), st.integers(1, 9), st.floats(0.0, 3.0), st.integers(0, 10_000))
def test_mgda_exact_on_ill_conditioned_gramians(num_tasks, dim, spread, seed):
    """Task-gradient norms 10^±spread apart: projected gradient descent stalled there (|d| up
    to 766x the optimum); Wolfe's algorithm is exact up to rounding."""
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(num_tasks, dim)) * 10 ** rng.uniform(-spread, spread, (num_tasks, 1))
    gram = grads @ grads.T
    alpha = solvers.mgda_weights(gram)
    assert abs(alpha.sum() - 1) < 1e-12 and np.all(alpha >= 0)
    value, scale = alpha @ gram @ alpha, np.max(np.diag(gram))
    best = _min_norm_by_enumeration(gram)
    assert value <= best * (1 + 1e-9) + 1e-12 * scale
    assert np.all(gram @ alpha >= value - 1e-9 * scale)  # KKT: no vertex improves


def test_mgda_ill_conditioned_case_from_an_audit():
    grads = np.array([[-6.44, 54.9, 16.2, -19.1], [0.188, -0.435, -0.182, 0.241],
                      [-0.042, 0.0, 0.002, 0.0056]])
    gram = grads @ grads.T
    alpha = solvers.mgda_weights(gram)
    np.testing.assert_allclose(np.sqrt(alpha @ gram @ alpha),
                               np.sqrt(_min_norm_by_enumeration(gram)), rtol=1e-9)
    np.testing.assert_allclose(alpha, [0.0016, 0.180, 0.818], atol=1e-3)


def test_cagrad_against_brute_force_and_explicit_vectors():
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(3, 6))
    gram = grads @ grads.T
    c = 0.5
    g0 = grads.mean(0)
    root_phi = c * np.linalg.norm(g0)
    grid = list(_simplex_grid(3, 300))
    values = [w @ grads @ g0 + root_phi * np.linalg.norm(w @ grads) for w in grid]
    w_best = grid[int(np.argmin(values))]
    gw = w_best @ grads
    expected = (g0 + root_phi / np.linalg.norm(gw) * gw) / (1 + c**2)
    coeffs = solvers.cagrad_coefficients(gram, c=c)
    np.testing.assert_allclose(coeffs @ grads, expected, atol=5e-3)


@pytest.mark.parametrize("zero_task", [0, 1, 3])
def test_zero_gradient_task_gets_no_share_in_mgda_and_cagrad(zero_task):
    """A cluster without samples has a zero gradient: MGDA's min-norm point would be that zero
    (no update at all) and CAGrad would collapse to g0 / (1 + c²); both leave it out."""
    rng = np.random.default_rng(zero_task)
    present = rng.normal(size=(3, 6))
    grads = np.insert(present, zero_task, 0.0, axis=0)
    gram = grads @ grads.T
    alpha = solvers.mgda_weights(gram)
    assert alpha[zero_task] == 0
    np.testing.assert_allclose(np.delete(alpha, zero_task),
                               solvers.mgda_weights(present @ present.T), atol=1e-12)
    # CAGrad: g0 is the mean over all 4 tasks (EW's scale), w ranges over the present ones
    c = 0.5
    g0 = grads.mean(0)
    root_phi = c * np.linalg.norm(g0)
    grid = list(_simplex_grid(3, 300))
    values = [w @ present @ g0 + root_phi * np.linalg.norm(w @ present) for w in grid]
    gw = grid[int(np.argmin(values))] @ present
    expected = (g0 + root_phi / np.linalg.norm(gw) * gw) / (1 + c**2)
    coeffs = solvers.cagrad_coefficients(gram, c=c)
    assert coeffs[zero_task] == pytest.approx(0.25 / (1 + c**2))
    np.testing.assert_allclose(coeffs @ grads, expected, atol=5e-3)
    assert np.all(solvers.mgda_weights(np.zeros((3, 3))) == 1 / 3)


def _cagrad_objective(w, grads, c):
    """CAGrad's inner objective ``F(w) = <g_w, g0> + c‖g0‖ ‖g_w‖`` from the explicit vectors."""
    g0, gw = grads.mean(0), w @ grads
    return gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw)


def _adversarial_gradients(rng, kind, num_tasks, spread):
    """Task gradients (rows) with norms 10^±spread apart, some of a degenerate kind."""
    dim = int(rng.integers(1, 12))
    if kind == "rank_deficient":  # more tasks than dimensions spanned
        rank = max(1, min(dim, num_tasks - 2))
        grads = rng.normal(size=(num_tasks, rank)) @ rng.normal(size=(rank, dim + 2))
    elif kind == "duplicated":
        grads = rng.normal(size=(num_tasks, dim))
        grads[-1] = grads[0] * (1.0 if rng.random() < 0.5 else rng.uniform(0.1, 10))
    elif kind == "opposite":  # 0 in the hull: the optimum may be g_w = 0
        grads = rng.normal(size=(num_tasks, dim + 1))
        grads[-1] = -grads[0] * rng.uniform(0.1, 10)
    elif kind == "combination":  # a task in the span of two others
        grads = rng.normal(size=(num_tasks, dim + 3))
        if num_tasks >= 3:
            grads[2] = rng.normal() * grads[0] + rng.normal() * grads[1]
    elif kind == "conflicting":  # nearly (anti)parallel
        base = rng.normal(size=dim + 2)
        signs = rng.choice([-1.0, 1.0], num_tasks) * rng.uniform(0.5, 2.0, num_tasks)
        grads = np.outer(signs, base) + 0.1 * rng.normal(size=(num_tasks, dim + 2))
    else:
        grads = rng.normal(size=(num_tasks, dim))
    grads *= 10 ** rng.uniform(-spread, spread, (num_tasks, 1))
    if num_tasks > 1 and rng.random() < 0.2:
        grads[rng.integers(num_tasks)] = 0.0  # a cluster without samples
    return grads


def _check_cagrad_optimal(grads, c, coeffs, reference=None, tol=1e-10):
    """Certify CAGrad's output from the explicit vectors, whatever solver produced it.

    With ``d = (1 + c²) Σ coeffs_k g_k = g0 + Σ y_k g_k``, weak duality gives, for any ``d`` with
    ``‖d − g0‖ ≤ r = c‖g0‖`` and any ``w`` on the simplex of the present tasks,
    ``min_k <g_k, d> ≤ min F ≤ F(w)``: a gap below ``tol ‖g0‖ max‖g_k‖`` certifies both, with
    ``w = y / Σy`` where the optimum has ``g_w ≠ 0``. Where the solver finds ``g_w = 0``
    (``Σy = 0``), ``min F = 0``: ``d`` must certify ``min F ≥ 0`` and a point of the hull
    (MGDA's min-norm point, or ``reference``) ``min F ≤ 0``, the latter only as far as MGDA's
    tolerance goes with norms orders of magnitude apart. Returns ``min_k <g_k, d>``.
    """
    num_tasks = grads.shape[0]
    g0 = grads.mean(0)
    r = c * np.linalg.norm(g0)
    present = np.flatnonzero(np.any(grads != 0, axis=1))
    scale = np.linalg.norm(g0) * np.linalg.norm(grads, axis=1).max()
    assert np.all(np.isfinite(coeffs))
    if r == 0:
        np.testing.assert_allclose(coeffs, np.full(num_tasks, 1 / num_tasks) / (1 + c**2))
        return 0.0
    y = coeffs * (1 + c**2) - 1 / num_tasks
    assert np.all(y[np.setdiff1d(np.arange(num_tasks), present)] == 0)
    d = g0 + y @ grads
    assert np.linalg.norm(d - g0) <= r * (1 + 1e-9)
    dual = min(grads[k] @ d for k in present)
    if y.sum() > 1e-6 * np.abs(y).sum():  # g_w ≠ 0: w is y, normalised
        w = y / y.sum()
        assert w.min() >= -1e-12
        assert _cagrad_objective(w, grads, c) - dual <= tol * scale  # w and d both optimal
    else:  # g_w = 0
        assert dual >= -tol * scale
        upper = _cagrad_objective(solvers.mgda_weights(grads @ grads.T), grads, c)
        assert min(upper, np.inf if reference is None else reference) <= 1e-6 * scale
    return dual


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sampled_from([1, 2, 3, 5, 8, 16]),
       st.sampled_from(["random", "rank_deficient", "duplicated", "opposite", "combination",
                        "conflicting"]),
       st.floats(0.0, 3.0), st.sampled_from([0.1, 0.4, 0.9, 1.5]), st.integers(0, 10_000))
def test_cagrad_exact_on_adversarial_gradients(num_tasks, kind, spread, c, seed):
    """CAGrad's inner problem solved to rounding level, certified by a primal-dual gap computed
    from the explicit vectors. Projected gradient descent left gaps up to ~1e-3 of ‖g0‖ max‖g_k‖
    with norms 10^±2 apart; the exact solver is at ~1e-14."""
    grads = _adversarial_gradients(np.random.default_rng(seed), kind, num_tasks, spread)
    _check_cagrad_optimal(grads, c, solvers.cagrad_coefficients(grads @ grads.T, c=c))


def _golden_section(f, lo=0.0, hi=1.0, iters=80):
    """Minimum of a convex function on [lo, hi] (golden-section search)."""
    ratio = (np.sqrt(5) - 1) / 2
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return min(fa, fb, f(lo), f(hi))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(["random", "duplicated", "opposite", "conflicting"]),
       st.floats(0.0, 3.0), st.sampled_from([0.1, 0.4, 0.9]), st.integers(0, 10_000))
def test_cagrad_against_golden_section_on_three_tasks(kind, spread, c, seed):
    """Independent reference on K = 3: ``F`` is convex, so ``min_a min_s F(a, (1−a)s, (1−a)(1−s))``
    by nested golden-section searches (the inner minimum is convex in ``a``)."""
    grads = _adversarial_gradients(np.random.default_rng(seed), kind, 3, spread)
    present = grads[np.any(grads != 0, axis=1)]
    g0 = grads.mean(0)
    r = c * np.linalg.norm(g0)

    def objective(w):
        gw = w @ present
        return gw @ g0 + r * np.linalg.norm(gw)

    if len(present) == 3:
        reference = _golden_section(lambda a: _golden_section(
            lambda s: objective(np.array([a, (1 - a) * s, (1 - a) * (1 - s)]))))
    else:
        reference = _golden_section(lambda a: objective(np.array([a, 1 - a])))
    coeffs = solvers.cagrad_coefficients(grads @ grads.T, c=c)
    scale = np.linalg.norm(g0) * np.linalg.norm(grads, axis=1).max()
    dual = _check_cagrad_optimal(grads, c, coeffs, reference=reference)
    assert dual >= reference - 1e-10 * scale  # d is as good as the reference's optimum


def test_cagrad_zero_worst_case_direction():
    """g_1 = −g_2: 0 is in the hull, and here no point of it does better (F ≥ 0), so g_w = 0.
    The direction r g_w/‖g_w‖ is then its limit −P g0 (P: projection onto span(g_1)): d is
    orthogonal to g_1 and g_2, not g0/(1+c²) which would conflict with one of them."""
    g = np.array([1.0, 0.1])
    grads = np.stack([g, -g, np.array([0.0, 1.0])])
    c = 0.5
    coeffs = solvers.cagrad_coefficients(grads @ grads.T, c=c)
    g0 = grads.mean(0)
    expected = (g0 - (g0 @ g) / (g @ g) * g) / (1 + c**2)
    np.testing.assert_allclose(coeffs @ grads, expected, atol=1e-12)
    assert np.abs(coeffs).max() < 1  # no blown-up rounding noise
    _check_cagrad_optimal(grads, c, coeffs, reference=0.0)


@pytest.mark.filterwarnings("error")  # no RuntimeWarning from a rounded-negative diagonal
@pytest.mark.parametrize("grads, c, optimum_zero", [
    ([[-3e-12, 2e-12], [-2.0, 0.0], [3.0, 3.0]], 0.5, False),  # a tiny task's vertex is optimal
    ([[2.0], [-1.0]], 1.0, True),  # c = 1, 0 in the hull, g0 in its span: every t is a root
    ([[-3.0], [1.0], [3.0]], 0.5, False),  # shifted Gramians whose diagonal rounds below 0
])
def test_cagrad_edge_cases_found_in_review(grads, c, optimum_zero):
    """Regressions of the exact solver: each case broke ‖d − g0‖ ≤ c‖g0‖, or (where the optimum
    is g_w = 0) the promise that d conflicts with no task, or warned, or raised."""
    grads = np.array(grads)
    coeffs = solvers.cagrad_coefficients(grads @ grads.T, c=c)
    _check_cagrad_optimal(grads, c, coeffs, tol=1e-9)
    d = (1 + c**2) * coeffs @ grads
    g0 = grads.mean(0)
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9)
    if optimum_zero:
        assert min(grads @ d) >= -1e-9 * np.abs(grads).max() * np.linalg.norm(g0)


def test_cagrad_negligible_radius_is_the_mean():
    """√φ = 1e-155 ‖g0‖: the correction is nothing (the bracket of t overflowed, LinAlgError)."""
    grads = np.array([[1.0, 0.0], [0.0, 2.0]])
    c = 1e-155
    np.testing.assert_array_equal(solvers.cagrad_coefficients(grads @ grads.T, c=c),
                                  np.full(2, 0.5) / (1 + c**2))


def test_imtlg_equal_projections():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(4, 9))
    coeffs = solvers.imtlg_coefficients(grads @ grads.T)
    update = coeffs @ grads
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    np.testing.assert_allclose(units @ update, np.full(4, (units @ update)[0]), rtol=1e-9)
    assert abs(coeffs.sum() - 1) < 1e-12


def test_aligned_mtl_against_svd():
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(4, 10))
    u, s, vt = np.linalg.svd(grads.T, full_matrices=False)  # task matrix (P, K) = U S Vᵀ
    expected = s.min() * u @ vt @ np.full(4, 0.25)
    np.testing.assert_allclose(solvers.aligned_mtl_coefficients(grads @ grads.T) @ grads,
                               expected, rtol=1e-9, atol=1e-12)


def _explicit_pcgrad(grads, rng):
    out = []
    for i in range(len(grads)):
        g = grads[i].copy()
        for j in rng.permutation(len(grads)):
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return np.mean(out, axis=0)


def test_pcgrad_gramian_matches_explicit_vectors():
    rng = np.random.default_rng(5)
    for k in [2, 3, 5]:
        grads = rng.normal(size=(k, 7))
        coeffs = solvers.pcgrad_coefficients(grads @ grads.T, np.random.default_rng(k))
        expected = _explicit_pcgrad(grads, np.random.default_rng(k))
        np.testing.assert_allclose(coeffs @ grads, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["uw", "famo", "gradnorm", "pcgrad", "nashmtl", "mgda",
                                  "nashmtl/chunked"])
def test_grad_scaler(name):
    model, x, y, group = _problem()

    def make():
        if name.endswith("/chunked"):
            return mtl.create("nashmtl", num_tasks=K, engine=mtl.AutogradEngine(chunk_numel=30))
        return mtl.create(name, num_tasks=K)

    plain = make()
    w_plain = plain.backward(_losses(model, x, y, group), model.parameters())
    g_plain = _flat_grad(model).clone()
    model.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    scaled = make()
    w_scaled = scaled.backward(_losses(model, x, y, group), model.parameters(), grad_scaler=scaler)
    torch.testing.assert_close(w_scaled, w_plain)
    torch.testing.assert_close(_flat_grad(model), g_plain * 2.0**14)


def test_non_finite_gradients_with_scaler_give_nan_weights():
    x = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    losses = torch.stack([x * float("inf"), x])
    scaler = torch.amp.GradScaler("cpu")
    w = mtl.create("pcgrad", num_tasks=2).backward(losses, [x], grad_scaler=scaler)
    assert torch.isnan(w).all() and not torch.isfinite(x.grad)


@pytest.mark.parametrize("name", ["pcgrad", "nashmtl", "mgda", "cagrad", "imtlg", "alignedmtl"])
def test_a_gramian_overflowing_at_a_large_scale_makes_the_scaler_back_off(name):
    """At scale 2^64 the float32 Gramian of the scaled gradients overflows while the gradients
    stay finite: the step was taken with equal weights and the scale never came down."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    x, target = torch.randn(8, 256), torch.randn(8, 256)
    group = torch.arange(4).repeat_interleave(2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**64)
    losses = grouped_mse(model(x), target, group, 4)
    weights = mtl.create(name, num_tasks=4).backward(losses, model.parameters(), group=group,
                                                     grad_scaler=scaler)
    assert torch.isnan(weights).all()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(torch.optim.SGD(model.parameters(), lr=0.1))
    scaler.update()
    assert scaler.get_scale() < 2.0**64  # skipped, backed off
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        mtl.create("nope", num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks"):
        mtl.create("ew", num_tasks=0)
    with pytest.raises(TypeError, match="num_tasks"):
        mtl.create("ew", num_tasks=2.0)
    x = torch.nn.Parameter(torch.ones(()))
    method = mtl.create("uw", num_tasks=2)
    with pytest.raises(ValueError, match="losses"):
        method.backward(torch.ones(3) * x, [x])
    with pytest.raises(ValueError, match="shared_parameters"):
        method.backward(torch.ones(2) * x, [])
    with pytest.raises(ValueError, match="task_counts"):
        method.backward(torch.ones(2) * x, [x], task_counts=torch.ones(3))
    with pytest.raises(ValueError, match="task_counts must be non-negative"):
        method.backward(torch.ones(2) * x, [x], task_counts=[3, -1])
    with pytest.raises(ValueError, match="update_weights_every"):
        mtl.create("nashmtl", num_tasks=2, update_weights_every=0)
    with pytest.raises(ValueError, match="engine"):
        mtl.create("pcgrad", num_tasks=2, engine="fast")
    with pytest.raises(ValueError, match="gramian"):
        solvers.mgda_weights(np.ones((2, 3)))


@pytest.mark.parametrize("name", mtl.available())
def test_bad_group_names_group(name):
    """``group`` is checked before it is counted: ids outside [0, K) (they used to surface as a
    task_counts shape error or a raw bincount error), float or bool ids."""
    model, x, y, group = _problem()
    for bad, error, message in ((torch.tensor([0, 1, 5]), ValueError, r"group ids must lie in "
                                 r"\[0, 3\), got values in \[0, 5\]"),
                                (torch.tensor([0, -1, 2]), ValueError, "group ids must lie in"),
                                (group.float(), TypeError, "group must be an integer tensor"),
                                (group > 0, TypeError, "group must be an integer tensor")):
        method = mtl.create(name, num_tasks=K)
        with pytest.raises(error, match=message):
            method.backward(_losses(model, x, y, group), list(model.parameters()), group=bad)
    with pytest.raises(ValueError, match="task_counts must be non-negative numbers"):
        mtl.create(name, num_tasks=K).backward(_losses(model, x, y, group),
                                               list(model.parameters()),
                                               task_counts=torch.tensor([float("nan"), 1, 1]))


@pytest.mark.parametrize("name, hparams, error, match", [
    ("famo", {"lr": float("nan")}, ValueError, "lr must be a finite number > 0"),
    ("famo", {"lr": 0.0}, ValueError, "lr"),
    ("famo", {"weight_decay": -1.0}, ValueError, "weight_decay"),
    ("famo", {"epsilon": -1.0}, ValueError, "epsilon"),
    ("famo", {"min_losses": [float("nan")] * K}, ValueError, "min_losses must be 3 finite"),
    ("famo", {"lr": "0.1"}, TypeError, "lr must be a number"),
    ("gradnorm", {"alpha": float("nan")}, ValueError, "alpha"),
    ("gradnorm", {"alpha": -1.0}, ValueError, "alpha"),
    ("gradnorm", {"gradnorm_parameter": True}, TypeError, "gradnorm_parameter"),
    ("gradnorm", {"gradnorm_parameter": 1.5}, TypeError, "gradnorm_parameter"),
    ("nashmtl", {"max_iter": 0}, ValueError, "max_iter"),
    ("nashmtl", {"max_norm": True}, TypeError, "max_norm must be a number"),
    ("nashmtl", {"max_norm": 0}, ValueError, "max_norm"),
    # c = inf wrote a zero gradient, 1e200 overflowed in the solve, True was 1.0
    ("cagrad", {"c": float("inf")}, ValueError, "c must be a finite number"),
    ("cagrad", {"c": 1e200}, ValueError, "c must be at most"),
    ("cagrad", {"c": True}, TypeError, "c must be a number"),
    ("dwa", {"temperature": float("inf")}, ValueError, "temperature"),  # uniform for good
    ("dwa", {"temperature": "2"}, TypeError, "temperature must be a number"),
    ("pcgrad", {"seed": -1}, ValueError, "seed"),
    ("rlw", {"seed": 1.5}, TypeError, "seed"),
])
def test_bad_hyper_parameters_name_the_argument(name, hparams, error, match):
    with pytest.raises(error, match=match):
        mtl.create(name, num_tasks=K, **hparams)


def test_gradnorm_parameter_index_is_checked_against_the_shared_parameters():
    model, x, y, group = _problem()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=rf"gradnorm_parameter must be in \[-{len(params)}, "
                                         rf"{len(params) - 1}\], got 999"):
        mtl.create("gradnorm", num_tasks=K, gradnorm_parameter=999).backward(
            _losses(model, x, y, group), params, group=group)
    for index in (np.int64(0), -1):  # numpy ints and negative indices select as in a list
        model.zero_grad()
        chosen = mtl.create("gradnorm", num_tasks=K, gradnorm_parameter=index)
        chosen.backward(_losses(model, x, y, group), params, group=group)
        model.zero_grad()
        same = mtl.create("gradnorm", num_tasks=K, gradnorm_parameter=params[int(index)])
        same.backward(_losses(model, x, y, group), params, group=group)
        assert chosen.task_weights.grad.abs().sum() > 0
        torch.testing.assert_close(chosen.task_weights.grad, same.task_weights.grad)


def test_autocast_bfloat16_one_backward_close_to_float32():
    """Under CPU autocast (bf16 activations) both engines give the fp32 result up to bf16 error."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 4))
    x, y = torch.randn(10, 8), torch.randn(10, 4)
    group = torch.arange(10) // 4

    def run(autocast, engine):
        model.zero_grad()
        method = mtl.create("nashmtl", num_tasks=3, engine=engine, max_norm=None)
        recorder = engine.record() if not isinstance(engine, str) else torch.enable_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), recorder:
            per_sample = (model(x).float() - y).pow(2).mean(1)
        losses = torch.stack([per_sample[group == k].mean() for k in range(3)])
        method.backward(losses, model.parameters(), group=group,
                        grad_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
        return torch.cat([p.grad.flatten() for p in model.parameters()]) / 1024.0

    reference = run(False, "autograd")
    for engine in ["autograd", mtl.OneBackwardEngine(model)]:
        got = run(True, engine)
        assert torch.isfinite(got).all()
        assert float((got - reference).norm() / reference.norm()) < 0.05


def test_example_trains():
    import importlib.util
    import pathlib

    import ant_core
    if not hasattr(ant_core, "interval_clustering"):
        pytest.skip("ant_core.interval_clustering not available yet")
    path = pathlib.Path(__file__).parents[1] / "examples" / "ant_in_your_loop.py"
    spec = importlib.util.spec_from_file_location("ant_in_your_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only add contention
    try:
        for method, engine in [("uw", "autograd"), ("nashmtl", "one-backward")]:
            head, tail = example.train(method, engine, steps=80, batch=40)
            assert tail < 0.8 * head
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["pcgrad", "nashmtl", "mgda", "cagrad", "imtlg", "alignedmtl"])
def test_chunked_autograd_engine_matches_full(name):
    model, x, y, group = _problem(seed=7)
    results = []
    for engine in [mtl.AutogradEngine(), mtl.AutogradEngine(chunk_numel=20)]:
        model.zero_grad()
        method = mtl.create(name, num_tasks=K, engine=engine)
        weights = method.backward(_losses(model, x, y, group), model.parameters())
        results.append((weights, _flat_grad(model).clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-10)
    assert len(list(mtl.AutogradEngine(chunk_numel=20).chunks(list(model.parameters())))) > 1
    with pytest.raises(ValueError, match="chunk_numel"):
        mtl.AutogradEngine(chunk_numel=0)


def test_nash_on_failure_warn_reuses_previous_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    nash = mtl.create("nashmtl", num_tasks=2, on_failure="warn", max_norm=None)
    good = nash.backward(torch.stack([p[0] ** 2, p[1] ** 2]), [p])
    with pytest.warns(RuntimeWarning, match="reusing"):
        again = nash.backward(torch.stack([p.sum(), -p.sum()]), [p])  # g_1 = -g_2: unbounded
    torch.testing.assert_close(again, good)
    strict = mtl.create("nashmtl", num_tasks=2)
    with pytest.raises(mtl.NashMTLSolveError):
        strict.backward(torch.stack([p.sum(), -p.sum()]), [p])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(2, 6), st.integers(0, 10_000), st.floats(0.01, 100.0))
def test_solver_properties(num_tasks, seed, scale):
    """Permutation equivariance for all solvers; Nash α ∝ 1/√scale; MGDA, IMTL-G, PCGrad (same
    random orders) and Aligned-MTL are invariant to a common rescaling of the gradients."""
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(num_tasks, num_tasks + 3))
    gram = grads @ grads.T
    perm = rng.permutation(num_tasks)
    permuted = gram[np.ix_(perm, perm)]
    for solve in [solvers.nash_mtl_weights, solvers.mgda_weights, solvers.imtlg_coefficients,
                  solvers.aligned_mtl_coefficients, solvers.cagrad_coefficients]:
        np.testing.assert_allclose(solve(permuted), solve(gram)[perm], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(solvers.nash_mtl_weights(scale * gram),
                               solvers.nash_mtl_weights(gram) / np.sqrt(scale), rtol=1e-7)
    for solve in [solvers.mgda_weights, solvers.imtlg_coefficients]:
        np.testing.assert_allclose(solve(scale * gram), solve(gram), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(solvers.aligned_mtl_coefficients(scale * gram),
                               solvers.aligned_mtl_coefficients(gram), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        solvers.pcgrad_coefficients(scale * gram, np.random.default_rng(seed)),
        solvers.pcgrad_coefficients(gram, np.random.default_rng(seed)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("prefill", [False, True])
def test_nash_cached_steps_clip_and_accumulate(prefill):
    """Steps that reuse α: one backward, clipped to max_norm, added to any existing .grad."""
    model, x, y, group = _problem(seed=3)
    reference = _explicit_task_grads(model, x, y, group)
    nash = mtl.create("nashmtl", num_tasks=K, update_weights_every=4, max_norm=0.05)
    for step in range(4):
        model.zero_grad()
        if prefill:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
        before = _flat_grad(model).clone() if prefill else 0.0
        weights = nash.backward(_losses(model, x, y, group), model.parameters())
        combined = weights.double() @ reference
        assert float(combined.norm()) <= 0.05 * (1 + 1e-5)
        torch.testing.assert_close(_flat_grad(model), before + combined, rtol=1e-5, atol=1e-9)
