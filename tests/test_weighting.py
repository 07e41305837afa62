"""Per-sample diffusion weightings against their closed forms."""
import copy

import pytest
import torch

from ant_core.weighting import ContinuousUncertainty, min_snr_weight, p2_weight

SNR = torch.tensor([0.0, 0.01, 0.5, 1.0, 4.999, 5.0, 7.0, 1e4], dtype=torch.float64)


def test_min_snr_closed_forms():
    for gamma in [1.0, 5.0]:
        for target in ["eps", "v", "x0"]:
            got = min_snr_weight(SNR, gamma=gamma, target=target)
            for s, w in zip(SNR.tolist(), got.tolist()):
                m = min(s, gamma)
                expected = {"eps": (m / s) if s > 0 else 1.0, "v": m / (s + 1), "x0": m}[target]
                assert w == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_p2_closed_form():
    for k, gamma in [(1.0, 1.0), (0.5, 0.5), (1.0, 0.0)]:
        got = p2_weight(SNR, k=k, gamma=gamma)
        expected = torch.tensor([1 / (k + s) ** gamma for s in SNR.tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, expected)


def test_continuous_uncertainty_form_and_optimum():
    torch.manual_seed(0)
    cu = ContinuousUncertainty(num_features=16, hidden=8).double()
    log_snr = torch.linspace(-6, 6, 5, dtype=torch.float64)
    loss = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    torch.testing.assert_close(cu(loss, log_snr), loss)  # u starts at 0
    with torch.no_grad():
        cu.net[-1].bias.fill_(0.7)
    u = cu.log_variance(log_snr)
    torch.testing.assert_close(cu(loss, log_snr), loss * torch.exp(-u) + u)
    # trained on a fixed loss per noise level, e^{-u} converges to 1 / loss
    optimiser = torch.optim.Adam(cu.parameters(), lr=0.05)
    for _ in range(600):
        optimiser.zero_grad()
        cu(loss, log_snr).mean().backward()
        optimiser.step()
    torch.testing.assert_close(cu.log_variance(log_snr), loss.log(), atol=0.05, rtol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="snr"):
        min_snr_weight(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="snr"):
        p2_weight(torch.ones(2, 2))
    with pytest.raises(TypeError, match="snr"):
        min_snr_weight([1.0])
    with pytest.raises(ValueError, match="target"):
        min_snr_weight(SNR, target="score")
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(SNR, gamma=0)
    with pytest.raises(ValueError, match="log_snr"):
        ContinuousUncertainty()(torch.ones(2), torch.tensor([float("nan"), 0.0]))
    with pytest.raises(ValueError, match="log_snr"):  # a zero-terminal-SNR schedule's -inf
        ContinuousUncertainty()(torch.ones(2), torch.tensor([float("-inf"), 0.0]))
    for fn, kwargs, error in ((min_snr_weight, {"gamma": float("inf")}, ValueError),
                              (min_snr_weight, {"gamma": "5"}, TypeError),
                              (min_snr_weight, {"gamma": True}, TypeError),
                              (p2_weight, {"gamma": float("inf")}, ValueError),
                              (p2_weight, {"k": float("nan")}, ValueError),
                              (p2_weight, {"k": torch.ones(2)}, TypeError)):
        with pytest.raises(error, match=next(iter(kwargs))):  # inf gave NaN / inf weights
            fn(SNR, **kwargs)
    u = ContinuousUncertainty()
    with pytest.raises(TypeError, match="log_snr"):
        u(torch.ones(2), [1.0, 2.0])
    for loss, error in ((torch.ones(2, dtype=torch.long), TypeError),
                        (torch.ones(2).bool(), TypeError), (torch.ones(3), ValueError)):
        with pytest.raises(error, match="loss"):
            u(loss, torch.tensor([1.0, 2.0]))


def test_min_snr_eps_weight_of_zero_snr_is_one_for_both_signed_zeros():
    weights = min_snr_weight(torch.tensor([0.0, -0.0, 1.0, float("inf")]), 5.0, "eps")
    assert weights.tolist() == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_min_snr_gradient_is_finite_at_zero_snr(target):
    """A differentiable SNR got a NaN gradient at 0 (the unused gamma / 0 branch)."""
    snr = torch.tensor([0.0, 2.0, 10.0], dtype=torch.float64, requires_grad=True)
    min_snr_weight(snr, 5.0, target).sum().backward()
    five = torch.tensor(5.0, dtype=torch.float64)
    formula = {"eps": lambda s: torch.cat([s[:1] * 0 + 1, five / s[1:].clamp(min=five)]),
               "v": lambda s: torch.minimum(s, five) / (s + 1),
               "x0": lambda s: torch.minimum(s, five)}[target]
    reference = torch.func.grad(lambda s: formula(s).sum())(snr.detach())
    assert torch.isfinite(snr.grad).all()
    torch.testing.assert_close(snr.grad, reference)


def test_edm2_fourier_features_keep_float32_in_a_half_precision_module():
    """module.to(bfloat16) rounded the frequencies and formed the phase f·λ·s + φ in bfloat16:
    λ = 60 lost about a quarter turn and u was off by up to 65%."""
    m = ContinuousUncertainty(seed=0)
    torch.nn.init.normal_(m.net[-1].weight, generator=torch.Generator().manual_seed(1))
    lam = torch.tensor([15.3, -12.7, 60.1])
    want = copy.deepcopy(m).double().log_variance(lam.double()).detach()
    m = m.to(torch.bfloat16)
    assert m.frequencies.dtype == torch.float32 and m.net[0].weight.dtype == torch.bfloat16
    got = m.log_variance(lam).detach().double()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)  # the net's bf16 rounding only


def test_weights_compile_without_graph_breaks():
    """The value check reads the tensor back; under torch.compile it is skipped (it broke the
    graph once per call), so fullgraph compiles. backend="eager": no inductor in the tests."""
    snr = torch.rand(8) * 10
    uncertainty = ContinuousUncertainty()
    for fn in (lambda s: min_snr_weight(s, 5.0), lambda s: p2_weight(s, 1.0, 0.5),
               lambda s: uncertainty(s, s.log())):
        got = torch.compile(fn, fullgraph=True, backend="eager")(snr)
        torch.testing.assert_close(got, fn(snr))
