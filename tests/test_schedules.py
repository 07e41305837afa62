"""Noise schedules against their defining formulas."""
import math

import numpy as np
import pytest

from ant_core import schedules


def test_linear_matches_ddpm_definition():
    s = schedules.linear(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    assert s.T == len(s) == 1000 and s.name == "linear"


def test_scaled_linear_matches_stable_diffusion_definition():
    s = schedules.scaled_linear(1000)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    np.testing.assert_allclose(s.betas, betas, rtol=1e-10)


def test_cosine_matches_closed_form_until_clipping():
    T, s_ = 1000, 0.008
    s = schedules.cosine(T)
    f = lambda u: math.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert s.betas.max() <= 0.999 + 1e-12


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_derived_quantities(name):
    s = schedules.get_schedule(name, 200)
    ac = s.alphas_cumprod
    assert np.all(np.diff(ac) <= 0)
    np.testing.assert_allclose(s.snr, ac / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(np.exp(s.log_snr), s.snr, rtol=1e-9)
    np.testing.assert_allclose(s.sigmas, 1 / np.sqrt(s.snr), rtol=1e-9)
    np.testing.assert_allclose(np.cumprod(s.alphas), ac, rtol=1e-9)
    np.testing.assert_allclose(schedules.from_betas(s.betas).alphas_cumprod, ac, rtol=1e-9)


def test_log_snr_grid_is_uniform_in_log_snr():
    s = schedules.log_snr_grid(100, sigma_min=0.01, sigma_max=10.0)
    lam = s.log_snr
    assert lam[0] == pytest.approx(-2 * math.log(0.01)) and lam[-1] == pytest.approx(-2 * math.log(10.0))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="sigma_min"):
        schedules.log_snr_grid(10, sigma_min=5, sigma_max=1)
    assert schedules.log_snr_grid(10, sigma_min=1e-6).sigmas[0] == pytest.approx(1e-6, rel=1e-4)
    for tiny in (3e-7, 1e-8):  # alpha_bar rounds towards 1: sigma 1e-8 came back as 0
        with pytest.raises(ValueError, match="sigma_min=.* is too small"):
            schedules.log_snr_grid(10, sigma_min=tiny)


def test_from_any_object_with_alphas_cumprod_and_tensors():
    torch = pytest.importorskip("torch")

    class FakeDiffusersScheduler:  # diffusers keeps alphas_cumprod as a torch tensor
        alphas_cumprod = torch.tensor(schedules.linear(50).alphas_cumprod, dtype=torch.float32)

    s = schedules.get_schedule(FakeDiffusersScheduler())
    assert s.T == 50 and s.name == "FakeDiffusersScheduler"
    np.testing.assert_allclose(s.alphas_cumprod, schedules.linear(50).alphas_cumprod, rtol=1e-6)
    assert schedules.get_schedule(torch.linspace(0.99, 0.01, 7)).T == 7


@pytest.mark.parametrize("bad,match", [
    ([], "non-empty"),
    ([0.9, 0.95], "non-increasing"),
    ([1.5, 0.5], r"\[0, 1\]"),
    ([0.9, np.nan], "finite"),
    (np.ones((2, 2)) * 0.5, "1-D"),
])
def test_bad_alphas_cumprod(bad, match):
    with pytest.raises(ValueError, match=match):
        schedules.from_alphas_cumprod(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedules.get_schedule("quadratic")
    with pytest.raises(TypeError, match="T must be an int"):
        schedules.linear(10.5)
    with pytest.raises(ValueError, match="T must be >= 1"):
        schedules.linear(0)
    with pytest.raises(ValueError, match="does not match"):
        schedules.get_schedule(schedules.linear(10), T=11)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        schedules.from_scheduler(object())
    torch = pytest.importorskip("torch")
    # complex lost its imaginary part, text was parsed, bools became 0/1
    for bad in ("abc", [0.9 + 0.5j, 0.5], ["0.9", "0.5"], [True, False], [object()],
                torch.tensor([1 + 1j]), torch.tensor([True])):
        with pytest.raises(TypeError, match="alphas_cumprod must be an array of real numbers"):
            schedules.from_alphas_cumprod(bad)
    for bad in (None, 5, 0.5):
        with pytest.raises(TypeError, match="schedule must be one of"):
            schedules.get_schedule(bad)
    mine = np.array([0.9, 0.5])
    s = schedules.from_alphas_cumprod(mine)
    mine[0] = 7.0                      # was stored without a copy: the schedule changed too
    assert s.alphas_cumprod.tolist() == [0.9, 0.5]
    for make, kwargs, name in ((schedules.linear, {"beta_start": -1.0}, "beta_start"),
                               (schedules.linear, {"beta_end": 1.5}, "beta_end"),
                               (schedules.scaled_linear, {"beta_start": -1.0}, "beta_start"),
                               (schedules.scaled_linear, {"beta_end": float("nan")}, "beta_end"),
                               (schedules.cosine, {"s": -1.0}, "s must be"),
                               (schedules.cosine, {"max_beta": 1.0}, "max_beta"),
                               (schedules.log_snr_grid, {"sigma_min": 0.0}, "sigma_min")):
        with pytest.raises(ValueError, match=name):  # was "math domain error" and the like
            make(10, **kwargs)
