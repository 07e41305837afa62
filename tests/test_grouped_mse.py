"""ant_core.grouped_mse (the fused CPU/CUDA op) against the pure-torch reference_grouped_mse."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ant_core.losses import check_groups, grouped_mse, reference_grouped_mse

CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

OPS = torch.ops.ant_core


def loss_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def loss_tol(*dtypes):
    """Tolerance of the group losses (both sides accumulate in fp32 / fp64, orders differ)."""
    if all(d == torch.float64 for d in dtypes):
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=2e-5, atol=1e-6)


def grad_tol(dtype):
    """Tolerance of a gradient stored in `dtype` (one rounding on each side)."""
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-12),
        torch.float32: dict(rtol=1e-4, atol=1e-7),
        torch.float16: dict(rtol=2e-3, atol=1e-6),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    }[dtype]


def make_case(shape, num_groups, device, pred_dtype, target_dtype=None, *, weighted=False,
              groups_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target_dtype = target_dtype or pred_dtype
    pred = torch.randn(shape, generator=gen).to(device=device, dtype=pred_dtype)
    target = torch.randn(shape, generator=gen).to(device=device, dtype=target_dtype)
    groups = torch.randint(0, num_groups, (shape[0],), generator=gen).to(device, groups_dtype)
    weight_dtype = torch.float64 if pred_dtype == torch.float64 else torch.float32
    weight = torch.rand(shape[0], generator=gen, dtype=weight_dtype).to(device) + 0.5
    weight = weight if weighted else None
    return pred, target, groups, weight


def run_both(pred, target, groups, num_groups, weight=None, *, grads=True, seed=1):
    """Forward and (optionally) gradients of both paths, with the same random upstream grads."""
    results = []
    for fn in (grouped_mse, reference_grouped_mse):
        leaves = [x.detach().clone().requires_grad_(grads) if x is not None else None
                  for x in (pred, target, weight)]
        loss, per_sample = fn(leaves[0], leaves[1], groups, num_groups, leaves[2],
                              return_per_sample=True)
        out = {"loss": loss.detach(), "per_sample": per_sample.detach()}
        if grads:
            gen = torch.Generator().manual_seed(seed)
            up_group = torch.randn(loss.shape, generator=gen).to(loss)
            up_sample = torch.randn(per_sample.shape, generator=gen).to(per_sample)
            total = (loss * up_group).sum() + (per_sample * up_sample).sum()
            inputs = [x for x in leaves if x is not None]
            got = torch.autograd.grad(total, inputs)
            names = ["pred", "target", "weight"][: len(inputs)]
            out.update(zip(names, got))
        results.append(out)
    return results


def assert_matches(ours, ref, pred, target, loss_rtol=None):
    tol = loss_tol(pred.dtype, target.dtype)
    if loss_rtol is not None:  # the reference sums many samples per group in fp32 (index_add)
        tol["rtol"] = loss_rtol
    torch.testing.assert_close(ours["loss"], ref["loss"], **tol)
    torch.testing.assert_close(ours["per_sample"], ref["per_sample"], **tol)
    for name, src in (("pred", pred), ("target", target)):
        if name in ours:
            assert ours[name].dtype == src.dtype
            torch.testing.assert_close(ours[name], ref[name], **grad_tol(src.dtype))
    if "weight" in ours:
        tol = loss_tol(pred.dtype, target.dtype, ours["weight"].dtype)
        torch.testing.assert_close(ours["weight"], ref["weight"], **tol)


# --------------------------------------------------------------------------------------------
# Forward and gradients against the reference
# --------------------------------------------------------------------------------------------
SHAPES = [(7,), (5, 3), (6, 4, 5, 5), (3, 2, 16, 16), (4, 1, 3, 333), (2, 3, 70, 70)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_reference(device, dtype, shape, weighted):
    num_groups = 3
    pred, target, groups, weight = make_case(shape, num_groups, device, dtype, weighted=weighted)
    ours, ref = run_both(pred, target, groups, num_groups, weight)
    assert ours["loss"].shape == (num_groups,)
    assert ours["loss"].dtype == loss_dtype(dtype)
    assert_matches(ours, ref, pred, target)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_mixed_pred_target_dtypes(device, pred_dtype, target_dtype):
    pred, target, groups, weight = make_case((5, 3, 9, 8), 4, device, pred_dtype, target_dtype,
                                             weighted=True)
    ours, ref = run_both(pred, target, groups, 4, weight)
    assert ours["loss"].dtype == loss_dtype(pred_dtype, target_dtype)
    assert ours["pred"].dtype == pred_dtype and ours["target"].dtype == target_dtype
    assert_matches(ours, ref, pred, target)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(device, dtype):
    base = torch.randn(6, 5, 12, 10, device=device).to(dtype)
    flat = base.flatten()
    views = {
        "transposed": (base.transpose(2, 3), torch.randn(6, 5, 10, 12, device=device)),
        "sliced": (base[:, 1:4, ::2], torch.randn(6, 3, 6, 10, device=device).to(dtype)),
        "channels_last": (base.contiguous(memory_format=torch.channels_last), base.flip(0)),
        "expanded_target": (base, torch.randn(1, 5, 12, 10, device=device).expand(6, -1, -1, -1)),
        "offset": (flat[7:7 + 6 * 99].view(6, 99), flat[1:1 + 6 * 99].view(6, 99)),
    }
    groups = torch.tensor([0, 2, 2, 1, 0, 2], device=device)
    for name, (pred, target) in views.items():
        ours, ref = run_both(pred, target, groups, 3, torch.rand(6, device=device))
        assert_matches(ours, ref, pred, target)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize(
    "batch, num_groups, pattern",
    [(8, 4, "one_group"), (8, 4, "all_empty_but_one"), (3, 10, "random"), (1, 1, "random"),
     (1, 5, "random"), (12, 3, "random")],
)
def test_group_patterns(device, groups_dtype, batch, num_groups, pattern):
    pred, target, groups, weight = make_case((batch, 2, 3), num_groups, device, torch.float32,
                                             weighted=True, groups_dtype=groups_dtype)
    if pattern == "one_group":
        groups = torch.zeros(batch, dtype=groups_dtype, device=device)
    elif pattern == "all_empty_but_one":
        groups = torch.full((batch,), num_groups - 1, dtype=groups_dtype, device=device)
    ours, ref = run_both(pred, target, groups, num_groups, weight)
    assert_matches(ours, ref, pred, target)
    present = torch.zeros(num_groups, dtype=torch.bool, device=device)
    present[groups.long()] = True
    assert torch.all(ours["loss"][~present] == 0)
    assert torch.all(torch.isfinite(ours["loss"]))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_group_gets_no_gradient(device):
    pred = torch.randn(4, 3, device=device, requires_grad=True)
    target = torch.randn(4, 3, device=device)
    groups = torch.tensor([0, 0, 2, 2], device=device)
    loss = grouped_mse(pred, target, groups, 3)
    assert loss[1].item() == 0.0
    (grad,) = torch.autograd.grad(loss[1], pred)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_only_and_target_gradient(device):
    pred, target, groups, weight = make_case((6, 8), 3, device, torch.float32, weighted=True)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    _, per_sample = grouped_mse(pred, target, groups, 3, weight, return_per_sample=True)
    expected = weight * ((pred - target) ** 2).mean(dim=1)
    torch.testing.assert_close(per_sample, expected)
    grad_pred, grad_target = torch.autograd.grad(per_sample.sum(), (pred, target))
    ref_pred, ref_target = torch.autograd.grad(expected.sum(), (pred, target))
    torch.testing.assert_close(grad_pred, ref_pred)
    torch.testing.assert_close(grad_target, -grad_pred, rtol=0, atol=0)
    torch.testing.assert_close(grad_target, ref_target)


def test_no_grad_and_inference_mode():
    pred, target, groups, _ = make_case((4, 5), 2, "cpu", torch.float32)
    expected = reference_grouped_mse(pred, target, groups, 2)
    with torch.no_grad():
        torch.testing.assert_close(grouped_mse(pred, target, groups, 2), expected)
    with torch.inference_mode():
        torch.testing.assert_close(grouped_mse(pred, target, groups, 2), expected)


# --------------------------------------------------------------------------------------------
# Properties (CPU)
# --------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 9),
    per_sample=st.integers(1, 50),
    num_groups=st.integers(1, 6),
    weighted=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(batch, per_sample, num_groups, weighted, dtype, seed):
    pred, target, groups, weight = make_case((batch, per_sample), num_groups, "cpu", dtype,
                                             weighted=weighted, seed=seed)
    ours, ref = run_both(pred, target, groups, num_groups, weight, seed=seed)
    assert_matches(ours, ref, pred, target)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 12), num_groups=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_property_permutation_invariant_and_scaling(batch, num_groups, seed):
    pred, target, groups, weight = make_case((batch, 3, 4), num_groups, "cpu", torch.float64,
                                             weighted=True, seed=seed)
    loss = grouped_mse(pred, target, groups, num_groups, weight)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    permuted = grouped_mse(pred[perm], target[perm], groups[perm], num_groups, weight[perm])
    torch.testing.assert_close(permuted, loss)
    # Linear in the weights; quadratic in the residual.
    torch.testing.assert_close(grouped_mse(pred, target, groups, num_groups, 3 * weight), 3 * loss)
    scaled = grouped_mse(2 * pred, 2 * target, groups, num_groups, weight)
    torch.testing.assert_close(scaled, 4 * loss)


# --------------------------------------------------------------------------------------------
# Accuracy and determinism
# --------------------------------------------------------------------------------------------
def test_accumulation_is_accurate_past_2_pow_24():
    # 2^24 + 2^21 squared differences of 1: a naive fp32 running sum stalls at 2^24.
    n = 2**24 + 2**21
    pred = torch.ones(1, n)
    target = torch.zeros(1, n, dtype=torch.float16)
    loss, per_sample = grouped_mse(pred, target, torch.zeros(1, dtype=torch.long), 1,
                                   return_per_sample=True)
    assert loss.item() == 1.0 and per_sample.item() == 1.0
    # A value that is not exact in binary, over two samples of 2^23 + 1 elements.
    pred = torch.full((2, 2**23 + 1), 0.1)
    target = torch.zeros(2, 2**23 + 1, dtype=torch.bfloat16)
    loss = grouped_mse(pred, target, torch.tensor([0, 0]), 1)
    expected = float(torch.tensor(0.1, dtype=torch.float32)) ** 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_value_is_read_exactly(device, dtype):
    # Every finite bit pattern (bf16: those whose square is a normal fp32), 16 per sample so the
    # vectorized paths read them; a wrong conversion of any pattern would show far above 1e-7.
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    magnitude = values.double().abs()
    keep = torch.isfinite(magnitude)
    if dtype == torch.bfloat16:
        keep &= (magnitude == 0) | ((magnitude > 2.0**-60) & (magnitude < 2.0**60))
    values = values[keep]
    values = values[: values.numel() // 16 * 16].view(-1, 16).to(device)
    target = torch.zeros(values.shape, dtype=torch.float32, device=device)
    groups = torch.zeros(values.shape[0], dtype=torch.long, device=device)
    _, per_sample = grouped_mse(values, target, groups, 1, return_per_sample=True)
    expected = values.double().square().mean(dim=1).float()
    # CPU sums the 16 values in separate fp32 lanes (exact here); a CUDA thread sums several
    # in one fp32 accumulator, which may round the last bit (still far below a misread value).
    rtol = 1e-7 if device == "cpu" else 2e-6
    torch.testing.assert_close(per_sample, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradients_round_like_torch(device, dtype):
    # With a coefficient of exactly 1 the gradient is the fp32 difference rounded once to the
    # 16-bit dtype: it must equal torch's own rounding bit for bit, over a wide range of values
    # (half subnormals, overflow to inf, NaN) and exact ties.
    gen = torch.Generator().manual_seed(0)
    exponents = torch.randint(-30, 20, (2**16,), generator=gen)
    diff = torch.randn(2**16, generator=gen) * 2.0**exponents
    halves = torch.arange(0, 2**15, 7, dtype=torch.int32).to(torch.int16).view(dtype).float()
    ties = (halves[:-1] + halves[1:]) / 2
    special = torch.tensor([0.0, -0.0, 65504.0, 65520.0, 65519.99, 1e-8, -1e-8, 2.0**-25,
                            float("inf"), float("-inf"), float("nan")])
    diff = torch.cat([diff, ties[torch.isfinite(ties)], special])
    diff = diff[: diff.numel() // 2 * 2]
    batch = diff.numel() // 2
    pred = torch.zeros(batch, 2, dtype=dtype, device=device)
    target = (-diff).view(batch, 2).to(device)  # fp32
    groups = torch.arange(batch, device=device)
    count = torch.ones(batch, dtype=torch.long, device=device)
    ones = torch.ones(batch, device=device)
    grad_pred, grad_target = OPS.grouped_mse_backward(ones, None, pred, target, groups, count,
                                                      None, True)
    expected = pred.float() - target
    assert torch.equal(grad_pred.view(torch.int16), expected.to(dtype).view(torch.int16))
    assert torch.equal(grad_target[~expected.isnan()], -expected[~expected.isnan()])


def test_result_independent_of_thread_count():
    pred, target, groups, weight = make_case((3, 3, 100, 100), 2, "cpu", torch.float32,
                                             weighted=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grouped_mse(pred, target, groups, 2, weight, return_per_sample=True)
        torch.set_num_threads(max(2, threads))
        many = grouped_mse(pred, target, groups, 2, weight, return_per_sample=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# --------------------------------------------------------------------------------------------
# torch.library checks, gradcheck, torch.compile, AMP
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_opcheck_forward(device, weighted):
    pred, target, groups, weight = make_case((4, 3, 5), 3, device, torch.float32,
                                             weighted=weighted)
    torch.library.opcheck(OPS.grouped_mse.default, (pred, target, groups, 3, weight))
    pred.requires_grad_(True)
    if weight is not None:
        weight.requires_grad_(True)
    torch.library.opcheck(OPS.grouped_mse.default, (pred, target, groups, 3, weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_grad_target", [False, True])
def test_opcheck_backward(device, need_grad_target):
    pred, target, groups, weight = make_case((4, 3, 5), 3, device, torch.float32, weighted=True)
    _, _, count = OPS.grouped_mse(pred, target, groups, 3, weight)
    grad_group = torch.randn(3, device=device)
    grad_sample = torch.randn(4, device=device)
    for gs in (None, grad_sample):
        args = (grad_group, gs, pred, target, groups, count, weight, need_grad_target)
        torch.library.opcheck(OPS.grouped_mse_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    pred, target, groups, weight = make_case((5, 2, 3), 3, device, torch.float64, weighted=True)
    groups = torch.tensor([0, 2, 2, 0, 0], device=device)  # group 1 stays empty
    leaves = [x.requires_grad_(True) for x in (pred, target, weight)]

    def loss_and_per_sample(p, t, w):
        return grouped_mse(p, t, groups, 3, w, return_per_sample=True)

    assert torch.autograd.gradcheck(loss_and_per_sample, leaves)
    assert torch.autograd.gradcheck(lambda p, t, w: grouped_mse(p, t, groups, 3, w), leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_float64(device):
    """create_graph=True (gradient penalties) differentiates the gradient itself."""
    pred, target, groups, weight = make_case((5, 2, 3), 3, device, torch.float64, weighted=True)
    groups = torch.tensor([0, 2, 2, 0, 0], device=device)
    leaves = [x.requires_grad_(True) for x in (pred, target, weight)]

    def loss_and_per_sample(p, t, w):
        return grouped_mse(p, t, groups, 3, w, return_per_sample=True)

    assert torch.autograd.gradgradcheck(loss_and_per_sample, leaves)
    assert torch.autograd.gradgradcheck(lambda p, t: grouped_mse(p, t, groups, 3), leaves[:2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_penalty_matches_reference(device, dtype):
    """A penalty on the input gradient (R1-style) trains like the pure-torch reference."""
    pred, target, groups, weight = make_case((6, 3, 4, 4), 4, device, dtype, weighted=True)
    results = []
    for fn in (grouped_mse, reference_grouped_mse):
        p = pred.detach().clone().requires_grad_(True)
        losses = fn(p, target, groups, 4, weight)
        (grad,) = torch.autograd.grad(losses.sum(), p, create_graph=True)
        penalty = grad.float().square().sum()
        (second,) = torch.autograd.grad(losses.sum() + penalty, p)
        results.append((grad.detach().float(), second.float()))
    (grad, second), (ref_grad, ref_second) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(grad, ref_grad, **tol)
    torch.testing.assert_close(second, ref_second, **tol)


def test_compile_fullgraph_aot_eager():
    pred, target, groups, weight = make_case((6, 3, 8, 8), 3, "cpu", torch.float32, weighted=True)
    pred.requires_grad_(True)
    weight.requires_grad_(True)

    def step(p, t, g, w):
        loss, per_sample = grouped_mse(p, t, g, 3, w, return_per_sample=True)
        return loss.sum() + 0.5 * per_sample.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(pred, target, groups, weight)
    got_grads = torch.autograd.grad(got, (pred, weight))
    want = step(pred, target, groups, weight)
    want_grads = torch.autograd.grad(want, (pred, weight))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_inductor():
    pred, target, groups, _ = make_case((4, 2, 4, 4), 2, "cpu", torch.float32)
    pred.requires_grad_(True)
    compiled = torch.compile(lambda p, t, g: grouped_mse(p, t, g, 2).sum(), fullgraph=True)
    got = compiled(pred, target, groups)
    (got_grad,) = torch.autograd.grad(got, pred)
    want = grouped_mse(pred, target, groups, 2).sum()
    (want_grad,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_autocast_bf16_model_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 3, 3, padding=1)
    )
    x = torch.randn(8, 3, 8, 8)
    target = torch.randn(8, 3, 8, 8)  # fp32 noise target
    groups = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    grads = {}
    for fn in (grouped_mse, reference_grouped_mse):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(x)
            assert pred.dtype == torch.bfloat16
            loss = fn(pred, target, groups, 4)
        assert loss.dtype == torch.float32
        loss.sum().backward()
        grads[fn] = [p.grad.clone() for p in model.parameters()]
    for ours, ref in zip(grads[grouped_mse], grads[reference_grouped_mse]):
        assert torch.all(torch.isfinite(ours)) and ours.abs().sum() > 0
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-3)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = grouped_mse(model(x), target, groups, 4).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def bad_inputs():
    p = torch.randn(4, 3)
    t = torch.randn(4, 3)
    g = torch.tensor([0, 1, 0, 1])
    w = torch.rand(4)
    return [
        ("num_groups_zero", (p, t, g, 0, None), ValueError, "num_groups"),
        ("num_groups_negative", (p, t, g, -2, None), ValueError, "num_groups"),
        ("group_too_large", (p, t, torch.tensor([0, 1, 2, 0]), 2, None), ValueError, "groups"),
        ("group_negative", (p, t, torch.tensor([0, -1, 0, 0]), 2, None), ValueError, "groups"),
        ("target_shape", (p, torch.randn(4, 2), g, 2, None), ValueError, "target"),
        ("target_batch", (p, torch.randn(3, 3), g, 2, None), ValueError, "target"),
        ("groups_shape", (p, t, torch.tensor([0, 1, 0]), 2, None), ValueError, "groups"),
        ("groups_2d", (p, t, g.view(4, 1), 2, None), ValueError, "groups"),
        ("weight_shape", (p, t, g, 2, torch.rand(3)), ValueError, "weight"),
        ("weight_2d", (p, t, g, 2, w.view(2, 2)), ValueError, "weight"),
        ("pred_integer", (p.long(), t, g, 2, None), TypeError, "pred"),
        ("target_integer", (p, t.to(torch.int32), g, 2, None), TypeError, "target"),
        ("pred_complex", (p.to(torch.complex64), t, g, 2, None), TypeError, "pred"),
        ("groups_float", (p, t, g.float(), 2, None), TypeError, "groups"),
        ("groups_bool", (p, t, g.bool(), 2, None), TypeError, "groups"),
        ("weight_integer", (p, t, g, 2, torch.ones(4, dtype=torch.long)), TypeError, "weight"),
        ("pred_scalar", (torch.tensor(1.0), torch.tensor(1.0), g[:1], 1, None), ValueError, "pred"),
        ("empty_batch", (torch.randn(0, 3), torch.randn(0, 3), g[:0], 2, None), ValueError, "pred"),
        ("empty_sample", (torch.randn(4, 0), torch.randn(4, 0), g, 2, None), ValueError, "pred"),
        ("pred_array", (p.numpy(), t, g, 2, None), TypeError, "pred"),
        ("groups_list", (p, t, g.tolist(), 2, None), TypeError, "groups"),
        ("weight_list", (p, t, g, 2, w.tolist()), TypeError, "weight"),
        ("num_groups_float", (p, t, g, 2.0, None), TypeError, "num_groups"),
        ("num_groups_bool", (p, t, g, True, None), TypeError, "num_groups"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises(case):
    _, args, error, name = case
    with pytest.raises(error, match=name):
        grouped_mse(*args)


@pytest.mark.parametrize("case", [c for c in bad_inputs() if isinstance(c[1][0], torch.Tensor)
                                  and not c[0].startswith(("groups_list", "weight_list",
                                                           "group_"))],
                         ids=lambda c: c[0])
def test_reference_refuses_what_the_op_refuses(case):
    """The pure-torch reference broadcast a (1, ...) target and accepted integer pred (its
    checks read no values: group ids stay check_groups' job, and it still compiles)."""
    _, args, error, name = case
    with pytest.raises(error, match=name):
        reference_grouped_mse(*args)


def test_reference_compiles_with_fullgraph():
    """benchmarks/bench_grouped_loss.py compiles the reference with fullgraph=True."""
    p, t = torch.randn(6, 3, 2), torch.randn(6, 3, 2)
    g = torch.tensor([0, 1, 2, 0, 1, 1])
    compiled = torch.compile(reference_grouped_mse, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(p, t, g, 3), reference_grouped_mse(p, t, g, 3))


@pytest.mark.parametrize("case", [c for c in bad_inputs() if not c[0].startswith("group_")
                                  and isinstance(c[1][0], torch.Tensor)], ids=lambda c: c[0])
def test_fake_kernels_raise_like_the_op(case):
    """Shape/dtype errors are the same while tracing (torch.compile) as when running."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, args, error, name = case
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(error, match=name):
            grouped_mse(*fake)


def test_num_groups_accepts_numpy_integers():
    p, g = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    expected = grouped_mse(p, p * 0, g, 2)
    torch.testing.assert_close(grouped_mse(p, p * 0, g, np.int64(2)), expected)


def test_an_argument_on_the_meta_device_is_refused():
    """The fake kernel is also the op's Meta kernel: a CPU pred with a meta target returned
    uninitialised CPU memory as the losses."""
    p, g, w = torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.ones(3)
    for args, name in (((p, p.to("meta"), g, 2, None), "target"),
                       ((p, p, g.to("meta"), 2, None), "groups"),
                       ((p, p, g, 2, w.to("meta")), "weight")):
        for fn in (grouped_mse, reference_grouped_mse):
            with pytest.raises(ValueError, match=f"{name} is on meta but pred is on cpu"):
                fn(*args)


def test_per_sample_losses_alone_give_the_reference_gradient_with_infinite_values():
    """With only the per-sample losses used, the absent group term entered as 0 * inf = NaN:
    weight gradient [nan, 1] and pred gradient [nan, 2] where the reference has inf."""
    for pred, weight in ((torch.tensor([[1e20], [1.0]]), torch.ones(2)),
                         (torch.ones(2, 1), torch.tensor([float("inf"), 1.0]))):
        grads = []
        for fn in (grouped_mse, reference_grouped_mse):
            p, w = pred.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            _, per_sample = fn(p, torch.zeros(2, 1), torch.tensor([0, 1]), 2, w,
                               return_per_sample=True)
            per_sample.sum().backward()
            grads.append((p.grad, w.grad))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want)
        assert not torch.isnan(grads[0][0]).any() and not torch.isnan(grads[0][1]).any()


def test_reference_sums_groups_in_float64():
    """Float32 group sums of 2e5 samples were 2e-4 off (the op's were right)."""
    p, g = torch.full((200_000, 1), 1.0001), torch.zeros(200_000, dtype=torch.long)
    exact = (torch.tensor(1.0001, dtype=torch.float32).double() ** 2).float()
    for fn in (grouped_mse, reference_grouped_mse):
        torch.testing.assert_close(fn(p, p * 0, g, 1), exact.reshape(1), rtol=1e-6, atol=0)


def test_check_groups():
    check_groups(torch.tensor([0, 1, 2]), 3)
    for bad, error in ((1.5, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(error, match="num_groups"):  # 1.5 passed, "2" was a bare TypeError
            check_groups(torch.tensor([0]), bad)
    with pytest.raises(TypeError, match="return_per_sample"):  # "no" counted as true
        grouped_mse(torch.ones(1, 1), torch.ones(1, 1), torch.tensor([0]), 1,
                    return_per_sample="no")
    check_groups(torch.tensor([0, 1], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="groups"):
        check_groups(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="groups"):
        check_groups(torch.tensor([-1, 0]), 3)
    with pytest.raises(ValueError, match="num_groups"):
        check_groups(torch.tensor([0]), 0)
    with pytest.raises(TypeError, match="groups"):
        check_groups(torch.tensor([0.0]), 1)


# --------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in bad_inputs() if not c[0].startswith("group_")],
                         ids=lambda c: c[0])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_bad_input_raises_cuda(case):
    _, args, error, name = case
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(error, match=name):
        grouped_mse(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_device_mismatch_raises():
    p = torch.randn(4, 3, device="cuda")
    g = torch.tensor([0, 1, 0, 1], device="cuda")
    with pytest.raises(ValueError, match="target"):
        grouped_mse(p, torch.randn(4, 3), g, 2)
    with pytest.raises(ValueError, match="groups"):
        grouped_mse(p, p, g.cpu(), 2)
    with pytest.raises(ValueError, match="weight"):
        grouped_mse(p, p, g, 2, torch.rand(4))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bad_id", [-1, 3, 1000])
def test_cuda_bad_group_id_poisons_with_nan(bad_id):
    pred = torch.randn(6, 40, device="cuda", requires_grad=True)
    target = torch.randn(6, 40, device="cuda")
    groups = torch.tensor([0, 1, bad_id, 2, 0, 1], device="cuda")
    loss, per_sample = grouped_mse(pred, target, groups, 3, return_per_sample=True)
    assert torch.all(torch.isnan(loss))
    assert torch.all(torch.isfinite(per_sample))  # per-sample values are still right
    loss.sum().backward()
    assert torch.all(torch.isnan(pred.grad[2]))
    with pytest.raises(ValueError, match="groups"):
        check_groups(groups, 3)
    # The op still works afterwards (no device-side assert, counter left consistent).
    good = groups.clone()
    good[2] = 0
    ours = grouped_mse(pred.detach(), target, good, 3)
    torch.testing.assert_close(ours, reference_grouped_mse(pred.detach(), target, good, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_runs_on_current_stream_and_in_graphs():
    pred, target, groups, weight = make_case((16, 3, 32, 32), 4, "cuda", torch.float32,
                                             weighted=True)
    expected = reference_grouped_mse(pred, target, groups, 4, weight)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            got = grouped_mse(pred, target, groups, 4, weight)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected)
    # Graph capture fails for a kernel launched on another stream than the capturing one.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = grouped_mse(pred, target, groups, 4, weight)
    for scale in (1.0, 2.0):
        pred.mul_(scale)
        graph.replay()
        torch.testing.assert_close(captured, reference_grouped_mse(pred, target, groups, 4, weight))
    # Eager calls still work after the capture (the per-stream counters were left at zero).
    for s in (stream, torch.cuda.current_stream()):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            again = grouped_mse(pred, target, groups, 4, weight)
        torch.cuda.current_stream().wait_stream(s)
        torch.testing.assert_close(again, reference_grouped_mse(pred, target, groups, 4, weight))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 1024, 1024), (1, 5_000_001)], ids=["huge", "odd"])
def test_cuda_few_huge_samples(dtype, shape):
    pred, target, groups, weight = make_case(shape, 2, "cuda", dtype, weighted=True)
    ours, ref = run_both(pred, target, groups, 2, weight)
    assert_matches(ours, ref, pred, target)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(200_000,), (100_000, 3), (50_000, 37), (4096, 64, 8)], ids=str)
def test_cuda_many_tiny_samples(dtype, shape):
    pred, target, groups, weight = make_case(shape, 7, "cuda", dtype, weighted=True)
    ours, ref = run_both(pred, target, groups, 7, weight)
    assert_matches(ours, ref, pred, target, loss_rtol=2e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("pred_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("per_sample", [8 * 1000, 8 * 1000 + 1, 999, 16, 7], ids=str)
@pytest.mark.parametrize("offset", [0, 1, 8])
def test_cuda_vectorized_and_unaligned_paths(pred_dtype, target_dtype, per_sample, offset):
    batch = 5
    flat_p = torch.randn(batch * per_sample + offset, device="cuda").to(pred_dtype)
    flat_t = torch.randn(batch * per_sample + offset, device="cuda").to(target_dtype)
    pred = flat_p[offset:].view(batch, per_sample)  # contiguous, possibly misaligned
    target = flat_t[: batch * per_sample].view(batch, per_sample)
    groups = torch.tensor([0, 1, 1, 2, 0], device="cuda", dtype=torch.int32)
    ours, ref = run_both(pred, target, groups, 3, torch.rand(batch, device="cuda"))
    assert_matches(ours, ref, pred, target)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_deterministic_and_large_num_groups():
    pred, target, _, weight = make_case((300, 3, 20, 20), 2, "cuda", torch.float32, weighted=True)
    groups = torch.randint(0, 1000, (300,), device="cuda")
    first = grouped_mse(pred, target, groups, 1000, weight, return_per_sample=True)
    for _ in range(3):
        again = grouped_mse(pred, target, groups, 1000, weight, return_per_sample=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    ref = reference_grouped_mse(pred, target, groups, 1000, weight, return_per_sample=True)
    torch.testing.assert_close(first[0], ref[0], **loss_tol(torch.float32))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_autocast_bf16():
    model = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(32, 64, device="cuda")
    target = torch.randn(32, 64, device="cuda")
    groups = torch.randint(0, 4, (32,), device="cuda")
    grads = []
    for fn in (grouped_mse, reference_grouped_mse):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(x)
            assert pred.dtype == torch.bfloat16
            fn(pred, target, groups, 4).sum().backward()
        grads.append(model.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-3)
