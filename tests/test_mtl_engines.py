"""The one-backward engine against the K-backward reference engine (float64)."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ant_core import mtl
from ant_core.mtl.engines import AutogradEngine, OneBackwardEngine
from ant_core.mtl.task_gradients import task_gramian


def _group_losses(per_sample, group, num_tasks):
    return torch.stack([per_sample[group == k].mean() if (group == k).any()
                        else per_sample.sum() * 0 for k in range(num_tasks)])


class ConvNet(nn.Module):
    """Small UNet-like conv net: Conv2d, GroupNorm, Conv1d, Embedding time conditioning."""

    def __init__(self):
        super().__init__()
        self.time = nn.Embedding(10, 8)
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv_mid = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.conv1d = nn.Conv1d(8, 4, 3, padding=1, dilation=1)
        self.out = nn.Linear(4, 3)

    def forward(self, x, t):
        h = self.conv_in(x) + self.time(t)[:, :, None, None]
        h = F.silu(self.norm(h))
        h = self.conv_mid(h).flatten(2)
        h = self.conv1d(h).mean(-1)
        return self.out(h)


class TransformerBlock(nn.Module):
    """DiT-like block: patch Linear, free position embedding, LN + attention within a sample."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.patch = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.1)  # fallback path
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.patch(x) + self.pos
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        h = h + self.proj(a)
        h = h + self.mlp(self.norm2(h))
        return self.head(h)


class SharedTable(nn.Module):
    """A Linear called on a non-batch tensor (its parameters must take the fallback path)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Linear(3, 6)
        self.body = nn.Linear(6, 2)
        self.register_buffer("codes", torch.randn(4, 3))

    def forward(self, x, t):
        return self.body(x + self.table(self.codes)[t])


def _compare(model, make_input, group, num_tasks, fallback=()):
    model = model.double()
    inputs = make_input()
    target = torch.randn_like(model(*inputs))
    params = list(model.parameters())

    def per_sample():
        return (model(*inputs) - target).pow(2).flatten(1).mean(1)

    reference = AutogradEngine().task_gradients(
        _group_losses(per_sample(), group, num_tasks), params)
    engine = OneBackwardEngine(model)
    with engine.record():
        out = per_sample()
    fast = engine.task_gradients(_group_losses(out, group, num_tasks), params, group=group)
    for p, r, f in zip(params, reference, fast):
        assert (r is None) == (f is None), p.shape
        if r is not None:
            torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(task_gramian(fast, num_tasks), task_gramian(reference, num_tasks))
    assert {id(p) for p in engine.fallback_parameters} == {id(p) for p in fallback}
    engine.remove()


@pytest.mark.parametrize("layout", ["sorted", "shuffled", "equal"])
def test_conv_net(layout):
    """Unequal tasks take the per-task path, equal sorted ones the grouped-convolution path."""
    torch.manual_seed(0)
    group = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    if layout == "shuffled":
        group = group[torch.randperm(8)]
    elif layout == "equal":
        group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    _compare(ConvNet(), lambda: (torch.randn(8, 3, 6, 6, dtype=torch.float64),
                                 torch.randint(0, 10, (8,))), group, 4)


def test_transformer_block_with_empty_task():
    torch.manual_seed(1)
    group = torch.tensor([0, 0, 0, 2, 2, 3])  # task 1 has no sample
    model = TransformerBlock()
    _compare(model, lambda: (torch.randn(6, 5, 4, dtype=torch.float64),), group, 4,
             fallback=[model.pos])


def test_random_stacks():
    for seed in range(4):
        torch.manual_seed(seed)
        layers = [nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(), nn.LayerNorm(6, bias=False),
                  nn.Linear(6, 6, bias=False)]
        order = torch.randperm(len(layers)).tolist()
        model = nn.Sequential(nn.Linear(3, 6), *[layers[i] for i in order], nn.Linear(6, 2))
        group = torch.randint(0, 3, (9,))
        _compare(model, lambda: (torch.randn(9, 2, 3, dtype=torch.float64),), group, 3)


def test_non_batch_call_falls_back():
    torch.manual_seed(2)
    group = torch.tensor([0, 1, 1, 0, 2])
    model = SharedTable()
    _compare(model, lambda: (torch.randn(5, 6, dtype=torch.float64),
                             torch.randint(0, 4, (5,))), group, 3,
             fallback=list(model.table.parameters()))


def test_multihead_attention_falls_back():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(3)
    model = Attn()
    _compare(model, lambda: (torch.randn(4, 3, 4, dtype=torch.float64),),
             torch.tensor([0, 0, 1, 1]), 2, fallback=list(model.attn.parameters()))


def test_methods_agree_across_engines():
    torch.manual_seed(4)
    model = TransformerBlock().double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    target = torch.randn(6, 5, 4, dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    for name in ["pcgrad", "nashmtl", "mgda", "cagrad", "imtlg", "alignedmtl"]:
        grads = []
        for engine in ["autograd", OneBackwardEngine(model), OneBackwardEngine(model,
                                                                       low_memory=True)]:
            method = mtl.create(name, num_tasks=3, engine=engine)
            model.zero_grad()
            recorder = engine.record() if not isinstance(engine, str) else torch.enable_grad()
            with recorder:
                per_sample = (model(x) - target).pow(2).flatten(1).mean(1)
            method.backward(_group_losses(per_sample, group, 3), model.parameters(), group=group)
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            if not isinstance(engine, str):
                engine.remove()
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(grads[2], grads[0], rtol=1e-7, atol=1e-10)


def test_refuses_batch_norm_and_inplace_outputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    engine = OneBackwardEngine(model)
    group = torch.tensor([0, 1, 0, 1])
    with engine.record():
        out = model(torch.randn(4, 3, dtype=torch.float64)).squeeze(1)
    with pytest.raises(ValueError, match="BatchNorm"):
        engine.task_gradients(_group_losses(out, group, 2), list(model.parameters()), group=group)

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1)).double()
    engine = OneBackwardEngine(model)
    with engine.record():
        out = model(torch.randn(4, 3, dtype=torch.float64)).squeeze(1)
    with pytest.raises(ValueError, match="in place"):
        engine.task_gradients(_group_losses(out, group, 2), list(model.parameters()), group=group)
    with pytest.raises(ValueError, match="group"):
        engine.task_gradients(_group_losses(out, group, 2), list(model.parameters()))
    # a layer's input modified in place after the forward (autograd would refuse it too)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).double()
    engine = OneBackwardEngine(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    with engine.record():
        out = model(x).squeeze(1)
    x.mul_(2)
    with pytest.raises(ValueError, match="input of Linear.* in place"):
        engine.task_gradients(_group_losses(out, group, 2), list(model.parameters()), group=group)
    with pytest.raises(TypeError, match="model"):
        OneBackwardEngine("model")
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).double()
    engine = OneBackwardEngine(model)
    for bad in ([0, 1, 2, 1], [0, -1, 0, 1]):  # ids outside [0, K) with K = 2
        with engine.record():
            out = model(torch.randn(4, 3, dtype=torch.float64)).squeeze(1)
        losses = torch.stack([out[:2].mean(), out[2:].mean()])
        with pytest.raises(ValueError, match="group ids must lie in \\[0, 2\\)"):
            engine.task_gradients(losses, list(model.parameters()), group=torch.tensor(bad))


def test_norm_layers_with_zero_scale_recompute():
    """A zero affine scale (x̂ unrecoverable from the output): x̂ comes from the input."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(12, 6),
                          nn.LayerNorm(6), nn.Linear(6, 1))
    with torch.no_grad():
        model[1].weight[1] = 0.0
        model[4].weight[2] = 0.0
    _compare(model, lambda: (torch.randn(6, 2, 3, dtype=torch.float64),),
             torch.tensor([0, 1, 1, 2, 2, 2]), 3)


def test_forward_outside_record_warns_and_falls_back():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    engine = OneBackwardEngine(model)
    group = torch.tensor([0, 1, 1, 0])
    params = list(model.parameters())
    out = model(torch.randn(4, 3, dtype=torch.float64)).squeeze(1)
    losses = _group_losses(out, group, 2)
    reference = AutogradEngine().task_gradients(losses, params, retain_graph=True)
    with pytest.warns(RuntimeWarning, match="record"):
        fast = engine.task_gradients(losses, params, group=group)
    for r, f in zip(reference, fast):
        torch.testing.assert_close(f, r)


def test_conv3d_dilated_conv1d_and_a_layer_called_twice():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv3 = nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1)
            self.conv1 = nn.Conv1d(3, 3, 3, dilation=2, padding=2, bias=False)
            self.shared = nn.Linear(3, 3)

        def forward(self, x):
            h = self.conv3(x).flatten(2)
            h = self.conv1(h).mean(-1)
            return self.shared(torch.tanh(self.shared(h)))  # same layer twice

    torch.manual_seed(7)
    _compare(Net(), lambda: (torch.randn(5, 2, 3, 4, 3, dtype=torch.float64),),
             torch.tensor([0, 0, 1, 2, 2]), 3)


class _Branchy(nn.Module):
    """Two heads; the second only runs when asked (its parameters are then unused)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x, use_b):
        return self.a(x) + self.b(x) if use_b else self.a(x)


@pytest.mark.parametrize("engine_name", ["autograd", "one-backward"])
def test_reused_storage_leaves_nothing_stale(engine_name):
    """Engines reuse their gradient storage from call to call: a parameter used in one call and
    not in the next, or a task with samples in one call and none in the next, must not carry
    the previous call's values (per-parameter gradients, Gramian and combination checked)."""
    torch.manual_seed(0)
    model = _Branchy().double()
    params = list(model.parameters())
    engine = AutogradEngine() if engine_name == "autograd" else OneBackwardEngine(model)
    storage = []
    for use_b, ids in [(True, [0, 0, 1, 1, 2, 2]), (False, [0, 0, 0, 1, 1, 1]),
                       (True, [2, 2, 2, 2, 1, 1])]:
        x = torch.randn(6, 3, dtype=torch.float64)
        group = torch.tensor(ids)
        per_sample = model(x, use_b).pow(2).mean(1)
        reference = AutogradEngine().task_gradients(_group_losses(per_sample, group, 3), params)
        with engine.record() if engine_name != "autograd" else torch.enable_grad():
            out = model(x, use_b).pow(2).mean(1)
        fast = engine.task_gradients(_group_losses(out, group, 3), params, group=group)
        storage.append(fast.buffers)
        for r, f in zip(reference, fast):
            assert (r is None) == (f is None)
            if r is not None:
                torch.testing.assert_close(f, r)
        expected = task_gramian(list(reference), 3)
        torch.testing.assert_close(fast.gramian(), expected)
        coeffs = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        for r, f in zip(reference, fast.combine(coeffs)):
            assert (r is None) == (f is None)
            if r is not None:
                torch.testing.assert_close(f, torch.tensordot(coeffs, r, dims=1))
    assert storage[0] is storage[1] is storage[2]


def test_task_gradients_mixed_dtypes():
    """Parameters of two dtypes: one buffer each; the Gramian sums both (fp32 Gramian of the
    bf16 block, not bf16)."""
    torch.manual_seed(0)
    params = [torch.randn(5, 7, requires_grad=True),
              torch.randn(300, dtype=torch.bfloat16, requires_grad=True)]
    losses = torch.stack([(params[0] * k).sum() + (params[1].float() ** 2 * (k + 1)).sum()
                          for k in range(3)])
    fast = AutogradEngine().task_gradients(losses, params)
    assert len(fast.buffers) == 2
    expected = sum(g.reshape(3, -1).double() @ g.reshape(3, -1).double().T for g in fast)
    torch.testing.assert_close(fast.gramian(), expected, rtol=1e-5, atol=0)
    coeffs = torch.tensor([0.25, -0.5, 1.0], dtype=torch.float64)
    for p, g, combined in zip(params, fast, fast.combine(coeffs)):
        assert combined.dtype == p.dtype and combined.shape == p.shape
        torch.testing.assert_close(combined.double(), torch.tensordot(coeffs, g.double(), dims=1),
                                   rtol=1e-2, atol=1e-2)


class _Scale(nn.Module):
    """y = x · w with a per-feature w: not a built-in layer, so it needs a handler."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.w


def test_register_layer_handler_for_a_custom_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Scale(4), nn.Linear(4, 2)).double()
    engine = OneBackwardEngine(model)
    assert model[1] not in engine.handled_modules
    engine.remove()

    def handler(module, x, gy, tasks, out):
        tasks.sum_per_task(gy * x, out["w"])

    mtl.register_layer_handler(_Scale, handler)
    try:
        group = torch.tensor([0, 1, 1, 2, 0, 2])
        _compare(model, lambda: (torch.randn(6, 3, dtype=torch.float64),), group, 3)
        engine = OneBackwardEngine(model)
        assert model[1] in engine.handled_modules
        engine.remove()
    finally:
        from ant_core.mtl import layer_gradients
        layer_gradients._HANDLERS[:] = [h for h in layer_gradients._HANDLERS
                                        if h[0] is not _Scale]


class TiedEmbedding(nn.Module):
    """An Embedding whose weight is reused by F.linear: a use the engine cannot see."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens)))
        return F.linear(h, self.embed.weight).mean(-1)


class SequenceFirst(nn.Module):
    """A Linear applied to (S, B, D) with S == B: the engine takes dim 0 for the batch."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x):  # x (B, S, D)
        return self.proj(x.transpose(0, 1)).transpose(0, 1).pow(2).mean((1, 2))


@pytest.mark.parametrize("case", ["tied", "sequence_first"])
def test_verify_catches_what_the_engine_cannot_see(case):
    torch.manual_seed(0)
    group = torch.tensor([0, 0, 1, 1])
    if case == "tied":
        model, inputs, name = TiedEmbedding().double(), torch.randint(0, 6, (4, 3)), "embed.weight"
    else:
        model, inputs, name = SequenceFirst().double(), torch.randn(4, 4, 3).double(), "proj.weight"

    def task_gradients(engine):
        with engine.record() if isinstance(engine, OneBackwardEngine) else nullcontext():
            out = model(inputs).reshape(4, -1).mean(1)
        return engine.task_gradients(_group_losses(out, group, 2), list(model.parameters()),
                                     group=group)

    with pytest.raises(ValueError, match=f"{name}.*do not combine"):
        task_gradients(OneBackwardEngine(model))
    # without the check the gradients are silently wrong: that is what it is for
    unchecked = task_gradients(OneBackwardEngine(model, verify=False))
    reference = task_gradients(AutogradEngine())
    assert not all(torch.allclose(a, b) for a, b in zip(unchecked, reference))


def test_a_compiled_forward_is_named_in_the_error():
    """The engine hooks the eager modules; a torch.compile'd forward failed with a message about
    tying or in-place edits only (aot_eager here: no inductor compile in the tests)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    engine = OneBackwardEngine(model)
    group = torch.tensor([0, 0, 1, 1])
    with engine.record():
        out = torch.compile(model, backend="aot_eager")(torch.randn(4, 8)).pow(2).mean(1)
    with pytest.raises(ValueError, match="torch.compile"):
        engine.task_gradients(_group_losses(out, group, 2), list(model.parameters()),
                              group=group)


def test_verify_waits_for_non_zero_finite_references_and_covers_low_memory():
    """A zero-initialised head gives the tied embedding a zero gradient at step 0 (nothing to
    check), a non-finite step checks nothing either; the check stays on until it has compared
    every parameter, in both engine modes."""
    group = torch.tensor([0, 0, 1, 1])
    tokens = torch.randint(0, 6, (4, 3))
    for low_memory in (False, True):
        torch.manual_seed(0)
        model = TiedEmbedding().double()
        head = model.mix
        engine = OneBackwardEngine(model, low_memory=low_memory)
        method = mtl.create("mgda", num_tasks=2, engine=engine)

        def step(scale=1.0):
            with engine.record():
                out = model(tokens).reshape(4, -1).mean(1) * scale
            method.backward(_group_losses(out, group, 2), list(model.parameters()), group=group)

        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        step()  # tanh(0) = 0: the tied use contributes nothing yet
        with pytest.warns(RuntimeWarning, match="non-finite"):
            step(float("inf"))  # nothing finite to compare
        assert engine.verify
        with torch.no_grad():
            head.weight.normal_()
        with pytest.raises(ValueError, match="embed.weight.*do not combine"):
            step()


def test_verify_runs_once_and_accepts_a_correct_model():
    model = ConvNet().double()
    engine = OneBackwardEngine(model)
    assert engine.verify
    x, t, group = torch.randn(6, 3, 8, 8).double(), torch.randint(0, 10, (6,)), torch.arange(6) % 3
    for _ in range(2):
        with engine.record():
            out = model(x, t).mean(1)
        engine.task_gradients(_group_losses(out, group, 3), list(model.parameters()), group=group)
        assert not engine.verify  # checked on the first call only
    with pytest.raises(TypeError, match="verify"):
        OneBackwardEngine(model, verify=1)
    with pytest.raises(ValueError, match="verify_rtol"):
        OneBackwardEngine(model, verify_rtol=0)
