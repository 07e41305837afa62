"""Reference networks: shapes, training signal, per-sample independence, determinism, errors."""
import math

import pytest
import torch
from torch import nn

from ant_core.models import MODELS, PRESETS, DiT, UNet, count_parameters, create_model
from ant_core.models.dit import sincos_pos_embed_2d
from ant_core.models.layers import timestep_embedding

# Small configurations (fast on CPU) covering the configuration space.
CONFIGS = [
    ("unet", dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  num_groups=8, num_heads=2)),
    ("unet", dict(image_size=8, in_channels=1, out_channels=2, base_channels=8,
                  channel_mult=(1, 1, 2), num_res_blocks=2, attention_resolutions=(4, 2),
                  num_groups=4, num_heads=2, dropout=0.1)),
    ("unet", dict(image_size=12, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(), mid_attention=False, num_groups=4)),
    ("dit", dict(image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=4)),
    ("dit", dict(image_size=8, in_channels=1, out_channels=3, patch_size=2, hidden_size=16,
                 depth=1, num_heads=2, learn_pos_embed=True, mlp_ratio=2.0)),
]
IDS = [f"{kind}{i}" for i, (kind, _) in enumerate(CONFIGS)]


def _inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


@pytest.mark.parametrize("num_classes", [None, 5])
@pytest.mark.parametrize("kind,config", CONFIGS, ids=IDS)
def test_output_shape(kind, config, num_classes):
    torch.manual_seed(0)
    model = create_model(kind, num_classes=num_classes, **config)
    x, t = _inputs(model)
    y = None if num_classes is None else torch.tensor([0, 4, num_classes])  # incl. null label
    out = model(x, t, y)
    assert out.shape == (3, model.out_channels, model.image_size, model.image_size)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    # continuous timesteps and a scalar timestep work too
    assert model(x, t.float() + 0.5, y).shape == out.shape
    assert model(x, 7, y).shape == out.shape
    if num_classes is not None:  # y=None is the null label
        torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), num_classes)))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_zero_init_output_and_gradients_reach_all_parameters(kind):
    torch.manual_seed(0)
    config = CONFIGS[0][1] if kind == "unet" else CONFIGS[3][1]
    model = create_model(kind, num_classes=3, **config)
    x, t = _inputs(model)
    assert torch.all(model(x, t) == 0)  # zero-initialised output layer
    # once the zero-initialised layers have moved, every parameter receives a gradient
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        model(x, t, torch.tensor([0, 1, 2])).sub(x).pow(2).mean().backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_overfits_fixed_batch(kind):
    torch.manual_seed(0)
    if kind == "unet":
        model = create_model("unet", image_size=8, base_channels=16, channel_mult=(1, 2),
                             num_res_blocks=1, num_groups=8)
    else:
        model = create_model("dit", image_size=8, patch_size=2, hidden_size=64, depth=2,
                             num_heads=4)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 3, 8, 8, generator=g)
    eps = torch.randn(8, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    abar = torch.cos(t.float() / 1000 * math.pi / 2)[:, None, None, None] ** 2
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = (model(xt, t) - eps).pow(2).mean()
        first = loss.item() if first is None else first
        if loss.item() < first / 10:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def _active_model(kind, **config):
    """A seeded model whose zero-initialised layers are perturbed, so the whole net is active."""
    torch.manual_seed(0)
    model = create_model(kind, **config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind,config", CONFIGS, ids=IDS)
def test_per_sample_independence(kind, config):
    model = _active_model(kind, num_classes=4, **config).eval()
    x, t = _inputs(model, batch=4, seed=1)
    y = torch.tensor([0, 1, 2, 3])
    out = model(x, t, y)
    x2, t2 = _inputs(model, batch=4, seed=2)
    x2[0], t2[0] = x[0], t[0]
    y2 = torch.tensor([0, 3, 4, 1])
    out2 = model(x2, t2, y2)
    torch.testing.assert_close(out2[0], out[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out2[1:], out[1:])
    # a batch of one gives the same answer as inside a batch
    torch.testing.assert_close(model(x[2:3], t[2:3], y[2:3])[0], out[2], rtol=1e-5, atol=1e-5)
    # the gradient of sample 0's output reaches only sample 0's input
    xg = x.clone().requires_grad_(True)
    model(xg, t, y)[0].sum().backward()
    assert xg.grad[0].abs().sum() > 0 and torch.all(xg.grad[1:] == 0)


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny"])
def test_deterministic_init(name):
    torch.manual_seed(123)
    a = create_model(name, image_size=16)
    torch.manual_seed(123)
    b = create_model(name, image_size=16)
    torch.manual_seed(124)
    c = create_model(name, image_size=16)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kind,config", [CONFIGS[0], CONFIGS[3]], ids=["unet", "dit"])
def test_autocast_bf16(kind, config):
    model = _active_model(kind, num_classes=2, **config)
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 2])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
        out.float().pow(2).mean().backward()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.grad is not None)


def test_presets_build_and_override():
    assert set(MODELS) == {"unet", "dit"}
    for name, (kind, _) in PRESETS.items():
        assert kind in MODELS
    tiny = create_model("unet-tiny")
    assert isinstance(tiny, UNet) and tiny.kind == "unet"
    assert 0.3e6 <= count_parameters(tiny) <= 1.0e6
    dit = create_model("dit-tiny", image_size=16, num_classes=5)
    assert isinstance(dit, DiT) and dit.num_classes == 5 and dit.image_size == 16
    assert 0.3e6 <= count_parameters(dit) <= 1.0e6
    # config rebuilds an identical architecture
    clone = create_model(dit.kind, **dit.config)
    assert {k: v.shape for k, v in clone.state_dict().items()} == \
        {k: v.shape for k, v in dit.state_dict().items()}


def test_no_batchnorm_in_any_preset():
    for name in ["unet-tiny", "unet-small", "dit-tiny"]:
        model = create_model(name)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 3.0, 999.5])
    emb = timestep_embedding(t, 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = torch.tensor([[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs]
                             for v in t.tolist()])
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_sincos_pos_embed_distinct_positions():
    pos = sincos_pos_embed_2d(16, 4)
    assert pos.shape == (16, 16)
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0  # all positions distinguishable
    # first half depends only on the row, second only on the column
    grid = pos.reshape(4, 4, 16)
    torch.testing.assert_close(grid[:, 0, :8], grid[:, 3, :8])
    torch.testing.assert_close(grid[0, :, 8:], grid[2, :, 8:])


@pytest.mark.parametrize("kind,config,arg", [
    ("dit", dict(image_size=30, patch_size=4), "patch_size"),
    ("dit", dict(hidden_size=30, num_heads=4), "num_heads"),
    ("dit", dict(depth=0), "depth"),
    ("unet", dict(base_channels=24, num_groups=32), "num_groups"),
    ("unet", dict(image_size=30, channel_mult=(1, 2, 2)), "image_size"),
    ("unet", dict(image_size=32, attention_resolutions=(5,)), "attention_resolutions"),
    ("unet", dict(base_channels=32, num_groups=8, num_heads=7), "num_heads"),
    ("unet", dict(channel_mult=()), "channel_mult"),
    ("unet", dict(dropout=1.5), "dropout"),
    ("unet", dict(num_classes=0), "num_classes"),
    ("unet", dict(base_channels=48, channel_mult=(2, 2), num_groups=32), "base_channels=48"),
    ("unet", dict(time_scale=0.0), "time_scale"),
    ("dit", dict(time_scale=float("nan")), "time_scale"),
    ("dit", dict(hidden_size=32, num_heads=2, mlp_ratio=0.001), "mlp_ratio"),
])
def test_bad_config_raises_naming_argument(kind, config, arg):
    with pytest.raises(ValueError, match=arg):
        create_model(kind, **config)


@pytest.mark.parametrize("kind,config,arg", [
    ("unet", dict(image_size=16, attention_resolutions=(16.7,)), "attention_resolutions"),
    ("unet", dict(image_size=16, attention_resolutions=16), "attention_resolutions"),
    ("unet", dict(channel_mult=2), "channel_mult"),
    ("unet", dict(mid_attention="no"), "mid_attention"),
    ("dit", dict(learn_pos_embed="no"), "learn_pos_embed"),
    ("dit", dict(mlp_ratio="4"), "mlp_ratio"),
    ("unet", dict(dropout="0.1"), "dropout"),
])
def test_wrong_types_in_a_config_are_refused_not_coerced(kind, config, arg):
    """A JSON --model-config can carry these: 16.7 must not become 16, "no" must not be True."""
    with pytest.raises(TypeError, match=arg):
        create_model(kind, **config)


def test_timestep_embedding_widths():
    """An odd width is zero-padded; dim=1 (no sinusoid) returned width 0."""
    t = torch.arange(3)
    for dim in (1, 2, 5, 8):
        emb = timestep_embedding(t, dim)
        assert emb.shape == (3, dim) and emb.dtype == torch.float32
    assert torch.equal(timestep_embedding(t, 1), torch.zeros(3, 1))
    assert torch.equal(timestep_embedding(t, 5)[:, :4], timestep_embedding(t, 4))


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="name"):
        create_model("resnet")
    with pytest.raises(TypeError, match="image_size"):
        create_model("unet", image_size=32.0)
    with pytest.raises(TypeError, match="unexpected"):
        create_model("dit-tiny", patch=3)
    model = create_model("dit", image_size=8, patch_size=2, hidden_size=16, depth=1,
                         num_heads=2, num_classes=3)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, torch.zeros(3))
    with pytest.raises(ValueError, match="y must be in"):
        model(x, torch.zeros(2), torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="y must be an integer"):
        model(x, torch.zeros(2), torch.tensor([0.0, 1.0]))
    for bad_t in (torch.tensor([float("nan"), 5.0]), float("inf"), torch.tensor(-float("inf"))):
        with pytest.raises(ValueError, match="t must be finite"):   # was NaN output
            model(x, bad_t)
    for bad_t in (None, "5", object()):
        with pytest.raises(TypeError, match="t must be a number or a tensor"):
            model(x, bad_t)
    for big in (2**70, [1, 2**70]):  # an int: blamed on its type before
        with pytest.raises(ValueError, match="t is out of range"):
            model(x, big)
    for bad_x in (x.long(), x.numpy()):
        with pytest.raises(TypeError, match="x must be a floating torch.Tensor"):
            model(bad_x, torch.zeros(2))
    unconditional = create_model("dit", image_size=8, patch_size=2, hidden_size=16, depth=1,
                                 num_heads=2)
    with pytest.raises(ValueError, match="num_classes=None"):
        unconditional(x, torch.zeros(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("name,channels,classes", [("dit-tiny", 3, None), ("dit-s", 4, 1000)])
def test_dit_parameter_count_closed_form(name, channels, classes):
    model = create_model(name, in_channels=channels, num_classes=classes)
    h, p, depth = model.config["hidden_size"], model.patch_size, model.config["depth"]
    m = int(h * model.config["mlp_ratio"])
    expected = channels * p * p * h + h                       # patch embedding
    expected += 256 * h + h + h * h + h                       # timestep MLP
    expected += 0 if classes is None else (classes + 1) * h   # label table incl. null row
    per_block = (3 * h * h + 3 * h) + (h * h + h) + (h * m + m + m * h + h) + (6 * h * h + 6 * h)
    expected += depth * per_block
    expected += (2 * h * h + 2 * h) + (h * p * p * channels + p * p * channels)  # final layer
    assert count_parameters(model) == expected


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny"])
def test_checkpoint_round_trip_weights_only(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, image_size=16, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"kind": model.kind, "config": model.config, "state": model.state_dict()},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    clone = create_model(ckpt["kind"], **ckpt["config"])
    clone.load_state_dict(ckpt["state"])
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 3])
    torch.testing.assert_close(clone(x, t, y), model(x, t, y))


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny"])
def test_numpy_integer_arguments_are_stored_as_int(name, tmp_path):
    """np.int64 sizes (e.g. from an array's shape arithmetic) work like ints: the model and its
    config hold Python ints, so the config reloads with weights_only=True."""
    import numpy as np

    model = create_model(name, image_size=np.int64(16), in_channels=np.int32(3),
                         num_classes=np.int64(3), time_scale=np.float64(1000))
    assert all(type(v) is int for k, v in model.config.items()
               if k in ("image_size", "in_channels", "out_channels", "num_classes"))
    assert type(model.config["time_scale"]) is float
    assert type(model.num_classes) is int
    torch.save(model.config, tmp_path / "config.pt")
    assert torch.load(tmp_path / "config.pt", weights_only=True) == model.config
