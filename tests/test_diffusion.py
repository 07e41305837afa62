"""Forward process, targets and samplers against closed forms."""
import warnings

import numpy as np
import pytest
import torch

from ant_core import schedules
from ant_core.diffusion import PREDICTIONS, GaussianDiffusion


def oracle(diffusion, x_star):
    """The exact denoiser when the data is a single point x_star (predicts eps)."""
    ac = diffusion.alphas_cumprod

    def model(x, t):
        a = ac[t].reshape(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    return model


def test_q_sample_statistics():
    d = GaussianDiffusion("linear", 1000)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    for t_val in (0, 250, 999):
        t = torch.full((20000,), t_val)
        xt = d.q_sample(x0, t)
        a = d.alphas_cumprod[t_val]
        assert xt.mean().item() == pytest.approx(a.sqrt().item() * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx((1 - a).item(), rel=0.05, abs=1e-4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_targets_are_consistent_with_split_prediction(prediction):
    d = GaussianDiffusion("cosine", 100, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (8,), generator=g)
    xt = d.q_sample(x0, t, eps)
    x0_hat, eps_hat = d.split_prediction(d.target(x0, eps, t), xt, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_v_target_closed_form():
    d = GaussianDiffusion("linear", 10, prediction="v")
    x0, eps, t = torch.ones(1, 1), torch.full((1, 1), 2.0), torch.tensor([4])
    a = d.alphas_cumprod[4]
    want = a.sqrt() * 2.0 - (1 - a).sqrt() * 1.0
    assert d.target(x0, eps, t).item() == pytest.approx(want.item(), rel=1e-6)
    np.testing.assert_allclose(d.snr(t).numpy(), schedules.linear(10).snr[[4]], rtol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddim-stochastic", "ddpm"])
def test_samplers_recover_the_single_data_point(sampler):
    d = GaussianDiffusion("linear", 200)
    x_star = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    model = oracle(d, x_star)
    if sampler == "ddpm":
        out = d.sample_ddpm(model, x_star.shape, seed=1)
    else:
        out = d.sample_ddim(model, x_star.shape, steps=20, eta=1.0 if "stoch" in sampler else 0.0)
    torch.testing.assert_close(out, x_star, rtol=0, atol=1e-3)


def test_samplers_are_deterministic_under_seed_and_shapes():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = lambda x, t: net(x) * 0.1  # noqa: E731
    d = GaussianDiffusion("linear", 50)
    a = d.sample_ddim(model, (2, 3, 8, 8), steps=10, eta=0.5, seed=3)
    b = d.sample_ddim(model, (2, 3, 8, 8), steps=10, eta=0.5, seed=3)
    c = d.sample_ddim(model, (2, 3, 8, 8), steps=10, eta=0.5, seed=4)
    assert a.shape == (2, 3, 8, 8) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert torch.equal(d.sample_ddpm(model, (1, 3, 8, 8), seed=0), d.sample_ddpm(model, (1, 3, 8, 8), seed=0))


def test_class_labels_are_passed_to_the_model():
    seen = []

    def model(x, t, y):
        seen.append(y)
        return torch.zeros_like(x)

    d = GaussianDiffusion("linear", 10)
    y = torch.tensor([1, 2])
    d.sample_ddim(model, (2, 1, 2, 2), steps=3, y=y)
    assert len(seen) == 3 and all(torch.equal(s, y) for s in seen)


def test_bad_input():
    with pytest.raises(ValueError, match="prediction must be one of"):
        GaussianDiffusion(prediction="score")
    with pytest.raises(ValueError, match="strictly inside"):
        GaussianDiffusion(schedule=np.array([1.0, 0.5, 0.0]))
    d = GaussianDiffusion("linear", 10)
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        d.q_sample(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        d.q_sample(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="noise must have"):
        d.q_sample(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="steps must be"):
        d.sample_ddim(lambda x, t: x, (1, 1), steps=11)
    for eta in (-1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eta must"):
            d.sample_ddim(lambda x, t: x, (1, 1), eta=eta)
    for eta in ("0.5", True, np.array([0.5, 0.2])):
        with pytest.raises(TypeError, match="eta must be a number"):
            d.sample_ddim(lambda x, t: x, (1, 1), eta=eta)
    for bad in (-1, 10):  # -1 must not silently mean the last timestep
        t = torch.tensor([0, bad])
        with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
            d.q_sample(torch.zeros(2, 3), t)
        with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):   # was IndexError
            d.snr(t.reshape(2, 1))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_forward_process_refuses_what_it_would_silently_get_wrong(prediction):
    """Integer images (coefficients cast to uint8 were 0: an all-zero x_t), a target from
    mismatched noise, float timesteps (truncated), a bad clip_x0 or seed."""
    d = GaussianDiffusion("linear", 10, prediction)
    t, x0, noise = torch.tensor([1, 5]), torch.rand(2, 3), torch.randn(2, 3)
    for bad in (torch.full((2, 3), 200, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.long)):
        with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
            d.q_sample(bad, t, noise)
        with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
            d.target(bad, noise, t)
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        d.target(x0, noise.long(), t)
    for bad_noise in (torch.randn(5), torch.randn(1, 3)):
        with pytest.raises(ValueError, match="noise must have x0's shape"):
            d.target(x0, bad_noise, t)
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        d.snr(torch.tensor([1.7]))
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        d.split_prediction(x0, x0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="output must have x_t's shape"):
        d.split_prediction(x0[:, :2], x0, t)
    for clip, error in ((-1.0, ValueError), (0.0, ValueError), (float("nan"), ValueError),
                        (float("inf"), ValueError), ("1", TypeError)):
        with pytest.raises(error, match="clip_x0 must be"):
            d.sample_ddim(lambda x, t: x, (1, 1), steps=2, clip_x0=clip)
    for seed, error in ((1.7, TypeError), (None, TypeError), ("abc", TypeError),
                        (2**64, ValueError), (-(2**63) - 1, ValueError)):
        with pytest.raises(error, match="seed"):
            d.sample_ddim(lambda x, t: x, (1, 1), steps=2, seed=seed)
    for seed in (np.int64(3), -1, torch.tensor(5)):  # what torch.Generator takes
        assert d.sample_ddim(lambda x, t: x, (1, 1), steps=2, seed=seed, clip_x0=None).shape \
            == (1, 1)
    for dtype in (torch.int16, torch.uint8, torch.int32):  # any integer timesteps
        torch.testing.assert_close(d.snr(t.to(dtype)), d.snr(t))
        torch.testing.assert_close(d.q_sample(x0, t.to(dtype), noise), d.q_sample(x0, t, noise))


def test_one_step_ddim_starts_from_the_noisiest_timestep():
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    d = GaussianDiffusion("linear", 10)
    for steps, expected in ((1, [[9]]), (2, [[9], [0]]), (3, [[9], [4], [0]])):
        seen.clear()
        d.sample_ddim(model, (1, 1, 2, 2), steps=steps)
        assert seen == expected


class _Smooth(torch.nn.Module):
    """A fixed smooth denoiser with one parameter (its dtype is the model's dtype)."""

    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))

    def forward(self, x, t):
        assert x.dtype == self.w.dtype       # the sampler feeds the model its own dtype
        return torch.sin(self.w * x + 0.01 * t.reshape(-1, 1, 1, 1).to(x.dtype))


def reference_ddim(ac, model, x, ts, eta, noises, prediction, clip):
    """DDIM (Song et al. 2021, eq. 12) in float64 from the paper's formulas, on the decreasing
    timesteps ``ts``; ``noises`` are the injected noises of the eta > 0 steps."""
    for n, t in enumerate(ts):
        a = ac[t]
        out = model(x, torch.full((x.shape[0],), t, dtype=torch.long)).double()
        if prediction == "eps":
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        elif prediction == "x0":
            x0 = out
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        else:
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = (1 - a).sqrt() * x + a.sqrt() * out
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if n == len(ts) - 1:
            return x0
        prev = ac[ts[n + 1]]
        sigma = eta * ((1 - prev) / (1 - a) * (1 - a / prev)).sqrt()
        x = prev.sqrt() * x0 + (1 - prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * noises[n]
    return x


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta, clip", [(0.0, None), (0.0, 1.0), (1.0, 1.0), (0.5, None)])
def test_ddim_matches_the_papers_update_in_float64(prediction, eta, clip):
    """A float64 model samples in float64 end to end (the model saw a float32-rounded x);
    a bfloat16 model gets bfloat16 inputs (it failed with a dtype error)."""
    d = GaussianDiffusion("linear", 20, prediction)
    shape, steps, seed = (2, 1, 3, 3), 5, 7
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    noises = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    ts = np.round(np.linspace(0, 19, steps)).astype(np.int64)[::-1].tolist()
    want = reference_ddim(d.alphas_cumprod, _Smooth(torch.float64), x, ts, eta, noises,
                          prediction, clip)
    got = d.sample_ddim(_Smooth(torch.float64), shape, steps=steps, eta=eta, seed=seed,
                        clip_x0=clip)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    low = d.sample_ddim(_Smooth(torch.bfloat16), shape, steps=steps, eta=eta, seed=seed,
                        clip_x0=clip)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


class _Conditional(torch.nn.Module):
    """A class-conditional toy denoiser whose output depends on x, t and the label (num_classes
    is the null label)."""

    num_classes = 3

    def forward(self, x, t, y):
        shift = (y.double() - 1.5).reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return 0.3 * x + 0.01 * t.reshape(shift.shape).to(x.dtype) + shift


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 3.5])
def test_guidance_matches_a_model_that_applies_the_formula(prediction, scale):
    """Classifier-free guidance == unguided sampling of uncond + s (cond - uncond), the combination
    written out in a wrapper model; s = 0 is sampling with the null label."""
    d = GaussianDiffusion("cosine", 30, prediction)
    model = _Conditional()
    y = torch.tensor([0, 1, 2, 0])

    def guided(x, t, labels):
        null = torch.full_like(labels, model.num_classes)
        return model(x, t, null) + scale * (model(x, t, labels) - model(x, t, null))

    got = d.sample_ddim(model, (4, 2, 3, 3), steps=7, eta=0.6, seed=5, y=y, guidance_scale=scale)
    want = d.sample_ddim(guided, (4, 2, 3, 3), steps=7, eta=0.6, seed=5, y=y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if scale == 0:
        null = torch.full_like(y, 3)
        torch.testing.assert_close(got, d.sample_ddim(model, (4, 2, 3, 3), steps=7, eta=0.6,
                                                      seed=5, y=null), rtol=1e-5, atol=1e-5)
    if scale == 1:  # no guidance: the null label is never asked for
        calls = []
        d.sample_ddim(lambda x, t, labels: calls.append(labels) or model(x, t, labels),
                      (4, 2, 3, 3), steps=3, y=y, guidance_scale=1.0)
        assert all(torch.equal(c, y) for c in calls)
    ddpm = d.sample_ddpm(model, (4, 2, 3, 3), seed=1, y=y, guidance_scale=scale)
    torch.testing.assert_close(ddpm, d.sample_ddpm(guided, (4, 2, 3, 3), seed=1, y=y),
                               rtol=1e-5, atol=1e-5)


def test_guidance_bad_input():
    d = GaussianDiffusion("linear", 10)
    model, y = _Conditional(), torch.tensor([0, 1])
    for bad in (-0.5, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            d.sample_ddim(model, (2, 1, 2, 2), steps=2, y=y, guidance_scale=bad)
    with pytest.raises(ValueError, match="needs class labels y"):
        d.sample_ddim(model, (2, 1, 2, 2), steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_classes"):
        d.sample_ddim(lambda x, t, labels: x, (2, 1, 2, 2), steps=2, y=y, guidance_scale=2.0)
    for bad_y in (torch.tensor([0, 1, 2]), torch.tensor(1), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match=r"y must be integer labels of shape \(2,\)"):
            d.sample_ddim(model, (2, 1, 2, 2), steps=2, y=bad_y, guidance_scale=2.0)
    # a list of labels and numpy scalars as the scale work as they do without guidance
    want = d.sample_ddim(model, (2, 1, 2, 2), steps=2, y=y, guidance_scale=2.0)
    for scale in (np.float32(2.0), np.int64(2)):
        torch.testing.assert_close(d.sample_ddim(model, (2, 1, 2, 2), steps=2, y=[0, 1],
                                                 guidance_scale=scale), want)
    # a (Distributed)DataParallel wrapper: the null label comes from the wrapped model
    wrapped = torch.nn.DataParallel(model)
    assert not hasattr(wrapped, "num_classes")
    torch.testing.assert_close(d.sample_ddim(wrapped, (2, 1, 2, 2), steps=2, y=y,
                                             guidance_scale=2.0), want)


def test_forward_process_compiles_without_graph_breaks():
    """t's range check reads t back on the CPU; under torch.compile it is skipped (three graph
    breaks per call before), so fullgraph compiles. backend="eager": no inductor here."""
    diffusion = GaussianDiffusion("linear", 50, "v")
    x0, noise, t = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.tensor([0, 5, 20, 49])

    def forward(x0, noise, t):
        return diffusion.q_sample(x0, t, noise), diffusion.target(x0, noise, t), diffusion.snr(t)

    got = torch.compile(forward, fullgraph=True, backend="eager")(x0, noise, t)
    for a, b in zip(got, forward(x0, noise, t)):
        torch.testing.assert_close(a, b)


def test_sampling_warns_where_the_schedule_does_not_end_in_noise():
    """Sampling starts from N(0, I) at t = T - 1: with the linear schedule at T = 50
    (alphas_cumprod[-1] = 0.6) the samples of a Bayes-optimal model had variance 0.45 for data
    of variance 0.25, silently."""
    def model(x, t):
        return torch.zeros_like(x)

    with pytest.warns(UserWarning, match="alphas_cumprod=0.6") as record:
        GaussianDiffusion("linear", 50).sample_ddim(model, (2, 1, 2, 2), steps=2)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="far from pure noise") as record:
        GaussianDiffusion("linear", 50).sample_ddpm(model, (2, 1, 2, 2))
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianDiffusion("linear", 1000).sample_ddim(model, (2, 1, 2, 2), steps=2)
        GaussianDiffusion("cosine", 50).sample_ddim(model, (2, 1, 2, 2), steps=2)
