"""Built-in data and loaders: determinism, ranges, non-trivial structure, round trips, errors."""
import sys

import numpy as np
import pytest
import torch

from ant_core.data import (SHAPE_KINDS, ImageDataset, ProceduralShapes, get_dataset, load_array,
                           load_digits, load_image_folder, make_loader)


@pytest.fixture(scope="module")
def shapes():
    return ProceduralShapes(600, image_size=32, seed=0)


def test_shapes_shape_range_labels(shapes):
    assert shapes.images.shape == (600, 3, 32, 32) and shapes.images.dtype == torch.float32
    assert shapes.images.min() >= -1 and shapes.images.max() <= 1
    assert shapes.labels.shape == (600,) and shapes.labels.dtype == torch.long
    assert shapes.num_classes == len(SHAPE_KINDS)
    counts = torch.bincount(shapes.labels, minlength=shapes.num_classes)
    assert counts.min() > 600 / len(SHAPE_KINDS) / 2  # every kind present, roughly balanced
    image, label = shapes[3]
    assert image.shape == (3, 32, 32) and int(label) == int(shapes.labels[3])
    few = ProceduralShapes(50, image_size=16, seed=0, num_classes=2)
    assert few.images.shape == (50, 3, 16, 16) and set(few.labels.tolist()) <= {0, 1}


def test_shapes_deterministic_and_seed_dependent(shapes):
    again = ProceduralShapes(600, image_size=32, seed=0)
    assert torch.equal(again.images, shapes.images) and torch.equal(again.labels, shapes.labels)
    prefix = ProceduralShapes(37, image_size=32, seed=0)
    assert torch.equal(prefix.images, shapes.images[:37])
    other = ProceduralShapes(600, image_size=32, seed=1)
    assert (other.images - shapes.images).abs().mean() > 0.1
    # the global RNGs are neither used nor disturbed
    torch.manual_seed(0)
    np.random.seed(0)
    state = torch.get_rng_state(), np.random.get_state()[1].copy()
    ProceduralShapes(10, seed=5)
    assert torch.equal(torch.get_rng_state(), state[0])
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_shapes_not_trivial(shapes):
    x = shapes.images.double()
    per_image_std = x.std(dim=(1, 2, 3))
    assert per_image_std.min() > 0.05
    # images differ from each other
    assert (x[:300] - x[300:]).abs().mean() > 0.2
    # energy at both coarse and fine scales: radial power spectrum, DC removed
    spectrum = torch.fft.fft2(x - x.mean(dim=(2, 3), keepdim=True)).abs().pow(2).mean(dim=(0, 1))
    f = torch.fft.fftfreq(32).abs() * 32
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    total = spectrum.sum()
    low = spectrum[(radius > 0) & (radius <= 3)].sum() / total
    high = spectrum[radius >= 8].sum() / total
    assert low > 0.2, low  # coarse structure (gradients, shapes)
    assert high > 0.05, high  # fine structure (textures, edges)
    # white noise has ~3% of its energy at radius <= 3; natural-looking data has far more
    noise = torch.randn(64, 32, 32, dtype=torch.float64)
    noise_spec = torch.fft.fft2(noise).abs().pow(2).mean(0)
    assert low > 3 * noise_spec[(radius > 0) & (radius <= 3)].sum() / noise_spec.sum()


def test_load_array_npy_uint8_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", raw)
    data = load_array(tmp_path / "a.npy")
    assert data.images.shape == (7, 3, 8, 8) and data.num_classes is None
    expected = torch.from_numpy(raw).permute(0, 3, 1, 2).double() / 255 * 2 - 1
    torch.testing.assert_close(data.images.double(), expected, atol=1e-6, rtol=0)
    back = ((data.images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back, raw)
    # resizing on load: shape changes, constant images stay constant
    np.save(tmp_path / "c.npy", np.full((2, 8, 8, 3), 255, dtype=np.uint8))
    small = get_dataset(tmp_path / "c.npy", image_size=4)
    assert small.images.shape == (2, 3, 4, 4) and torch.all(small.images == 1)


@pytest.mark.parametrize("low,high", [(0.0, 1.0), (-1.0, 1.0)])
def test_load_array_npz_float_nchw_with_labels(tmp_path, low, high):
    rng = np.random.default_rng(1)
    raw = rng.uniform(low, high, (5, 1, 6, 6)).astype(np.float32)
    raw[0, 0, 0, 0], raw[0, 0, 0, 1] = low, high
    labels = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "b.npz", images=raw, labels=labels)
    data = get_dataset(str(tmp_path / "b.npz"))
    assert data.images.shape == (5, 1, 6, 6) and data.num_classes == 3
    expected = (raw - low) / (high - low) * 2 - 1
    np.testing.assert_allclose(data.images.numpy(), expected, atol=1e-6)
    assert data.labels.tolist() == labels.tolist()


def test_load_array_grayscale_and_explicit_range(tmp_path):
    raw = np.linspace(0, 300, 2 * 4 * 4).reshape(2, 4, 4)  # fits no default range
    np.save(tmp_path / "g.npy", raw)
    with pytest.raises(ValueError, match="value_range"):
        load_array(tmp_path / "g.npy")
    data = load_array(tmp_path / "g.npy", value_range=(0, 300))
    assert data.images.shape == (2, 1, 4, 4)
    assert data.images.min() == -1 and data.images.max() == 1


def test_load_array_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_array(tmp_path / "missing.npy")
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_array(tmp_path / "bad.npy")
    np.save(tmp_path / "rect.npy", np.zeros((3, 4, 6, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="square"):
        load_array(tmp_path / "rect.npy")
    np.save(tmp_path / "nan.npy", np.full((2, 3, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_array(tmp_path / "nan.npy")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=".npy or .npz"):
        load_array(tmp_path / "x.txt")
    np.savez(tmp_path / "nolabel.npz", images=np.zeros((2, 4, 4, 3), np.uint8),
             labels=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        load_array(tmp_path / "nolabel.npz")
    np.savez(tmp_path / "huge.npz", images=np.zeros((2, 4, 4, 3), np.uint8),
             labels=np.array([1, 2**63], dtype=np.uint64))  # would wrap to a negative int64
    with pytest.raises(ValueError, match=r"labels must be below 2\*\*63 - 1, got 9223372036854775808"):
        load_array(tmp_path / "huge.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("1 2 3")
    for name in ("objects.npy", "text.npy"):
        with pytest.raises(ValueError, match=f"{name}.* not a numeric"):
            load_array(tmp_path / name)


def _write_png(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def test_load_image_folder_round_trip(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(2)
    arrays = {}
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            arrays[(cls, i)] = a
            _write_png(tmp_path / cls / f"{i}.png", a)
    data = load_image_folder(tmp_path, image_size=8)
    assert data.images.shape == (6, 3, 8, 8) and data.num_classes == 2
    assert data.class_names == ("cats", "dogs") and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    back = ((data.images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back[4], arrays[("dogs", 1)])  # same size: no resampling


def test_load_image_folder_crop_and_resize(tmp_path):
    pytest.importorskip("PIL")
    # a wide image: left and right quarters red, middle half blue -> center crop is all blue
    a = np.zeros((16, 32, 3), dtype=np.uint8)
    a[:, :8, 0] = a[:, 24:, 0] = 255
    a[:, 8:24, 2] = 255
    _write_png(tmp_path / "wide.png", a)
    data = get_dataset(tmp_path, image_size=4)
    assert data.images.shape == (1, 3, 4, 4) and data.num_classes is None
    torch.testing.assert_close(data.images[0, 2], torch.ones(4, 4))
    torch.testing.assert_close(data.images[0, 0], -torch.ones(4, 4))


def test_get_dataset_asks_for_the_image_size_of_a_folder(tmp_path):
    with pytest.raises(ValueError, match="image folder: give image_size"):  # was a raw TypeError
        get_dataset(tmp_path)


def test_load_image_folder_classes_are_top_level_folders(tmp_path):
    """dog/deep/c.png was a class of its own, and root images a class named '.'."""
    pytest.importorskip("PIL")
    for sub in ("cat", "dog", "dog/deep"):
        (tmp_path / sub).mkdir(parents=True)
        _write_png(tmp_path / sub / "x.png", np.zeros((4, 4, 3), np.uint8))
    data = load_image_folder(tmp_path, image_size=4)
    assert data.class_names == ("cat", "dog") and data.labels.tolist() == [0, 1, 1]
    _write_png(tmp_path / "loose.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="images outside them .*loose.png"):
        load_image_folder(tmp_path, image_size=4)
    one = tmp_path / "one"  # a single class folder is one class (it was unlabelled)
    (one / "only").mkdir(parents=True)
    _write_png(one / "only" / "a.png", np.zeros((4, 4, 3), np.uint8))
    data = load_image_folder(one, image_size=4)
    assert data.num_classes == 1 and data.class_names == ("only",)


def test_loader_uses_a_dataset_subclass_getitem():
    """The loader read .images / .labels of anything that had them, skipping the dataset's own
    __getitem__ (augmentation, a view)."""
    class Flipped(ImageDataset):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return -x, y

    data = Flipped(torch.full((4, 1, 4, 4), 0.5), torch.arange(4))
    x, y = next(iter(make_loader(data, 4, shuffle=False)))
    assert torch.equal(x, torch.full((4, 1, 4, 4), -0.5)) and y.tolist() == [0, 1, 2, 3]


def test_load_image_folder_refuses_16_bit_and_float_images(tmp_path):
    """Converting them to 8 bits clipped every value above 255 (a 16-bit ramp became -1, 1)."""
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a\.png is a I;16.* image; .*load_array"):
        load_image_folder(tmp_path, image_size=8, grayscale=True)


def test_load_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="path"):
        load_image_folder(tmp_path / "nope", image_size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="path=.*no images"):
        load_image_folder(tmp_path / "empty", image_size=8)
    (tmp_path / "broken").mkdir()
    _write_png(tmp_path / "broken" / "good.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        load_image_folder(tmp_path / "broken", image_size=8)
    with pytest.raises(ValueError, match="must not be empty"):
        load_image_folder("", image_size=8)


def test_optional_dependencies_give_clear_import_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_image_folder(".", image_size=8)


def test_load_digits():
    pytest.importorskip("sklearn")
    data = load_digits(image_size=16)
    assert data.images.shape == (1797, 1, 16, 16) and data.num_classes == 10
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_get_dataset_resolution_and_errors(tmp_path):
    data = get_dataset("shapes", num_images=8, image_size=16, seed=2)
    assert isinstance(data, ImageDataset) and data.images.shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="name_or_path"):
        get_dataset("no-such-dataset")
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        get_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(TypeError, match="name_or_path"):
        get_dataset(3)
    with pytest.raises(ValueError, match="num_images"):
        ProceduralShapes(0)
    with pytest.raises(ValueError, match="num_classes"):
        ProceduralShapes(4, num_classes=9)


def _small_dataset(n=10):
    """Image i is filled with i / 64 (image_ids(batch) reads i back)."""
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 2, 2) / 64
    return ImageDataset(images.clone(), torch.arange(n) % 3, 3)


def image_ids(images):
    return (images[:, 0, 0, 0] * 64).round().long()


def test_loader_epochs_are_permutations_and_seeded():
    data = _small_dataset(10)
    loader = make_loader(data, batch_size=5, seed=7)
    ids = image_ids(torch.cat([next(loader)[0] for _ in range(4)]))
    assert sorted(ids[:10].tolist()) == list(range(10))
    assert sorted(ids[10:].tolist()) == list(range(10))
    assert ids[:10].tolist() != ids[10:].tolist()  # reshuffled every epoch
    again = make_loader(data, batch_size=5, seed=7)
    assert torch.equal(image_ids(torch.cat([next(again)[0] for _ in range(4)])), ids)
    other = make_loader(data, batch_size=10, seed=8)
    assert image_ids(next(other)[0]).tolist() != ids[:10].tolist()
    images, labels = next(make_loader(data, batch_size=4, seed=0))
    assert labels.tolist() == (image_ids(images) % 3).tolist()


def test_loader_batches_cross_epochs_and_resume():
    data = _small_dataset(7)
    loader = make_loader(data, batch_size=3, seed=1)
    batches = [image_ids(next(loader)[0]) for _ in range(7)]  # 21 = 3 epochs
    assert all(len(b) == 3 for b in batches)
    flat = torch.cat(batches)
    for e in range(3):
        assert sorted(flat[7 * e:7 * e + 7].tolist()) == list(range(7))
    resumed = make_loader(data, batch_size=3, seed=1)
    for _ in range(3):
        next(resumed)
    state = resumed.state_dict()
    fresh = make_loader(data, batch_size=3, seed=1)
    fresh.load_state_dict(state)
    assert [image_ids(next(fresh)[0]).tolist() for _ in range(4)] == \
        [b.tolist() for b in batches[3:]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_loader_ddp_shards_are_disjoint_and_cover(world_size):
    n = 10
    data = _small_dataset(n)
    per_rank = -(-n // world_size)
    shards = []
    for rank in range(world_size):
        loader = make_loader(data, batch_size=per_rank, seed=4, rank=rank, world_size=world_size)
        shards.append(image_ids(next(loader)[0]).tolist())
    union = sum(shards, [])
    assert sorted(set(union)) == list(range(n))  # every sample seen in one epoch
    assert len(union) == per_rank * world_size  # wrap-around padding only
    assert len(union) - len(set(union)) == per_rank * world_size - n


def test_loader_generic_dataset_and_errors():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), i

    images, labels = next(make_loader(Plain(), batch_size=4, shuffle=False))
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2, 3] and labels.tolist() == [0, 1, 2, 3]

    class FloatLabels(Plain):
        def __getitem__(self, i):
            return torch.zeros(1, 2, 2), i + 0.7

    with pytest.raises(TypeError, match="labels must be integers"):  # 2.7 was read as 2
        next(make_loader(FloatLabels(), batch_size=4, shuffle=False))
    only = torch.utils.data.TensorDataset(torch.zeros(4, 1, 2, 2))  # was an IndexError
    assert next(make_loader(only, batch_size=4))[1].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="rank"):
        make_loader(_small_dataset(), batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(_small_dataset(), batch_size=0)
    with pytest.raises(TypeError, match="seed"):
        make_loader(_small_dataset(), batch_size=2, seed=1.5)
    with pytest.raises(TypeError, match="shuffle"):
        make_loader(_small_dataset(), batch_size=2, shuffle="no")
    assert make_loader(_small_dataset(), batch_size=2, shuffle=np.False_).shuffle is False
    loader = make_loader(_small_dataset(6), batch_size=2, world_size=2)  # 3 samples per rank
    for state, message in (({"epoch": 0, "position": -10}, "position"),
                           ({"epoch": 0, "position": 3}, r"position'\] must be in \[0, 2\]"),
                           ({"epoch": -1, "position": 0}, "epoch")):
        with pytest.raises(ValueError, match=message):  # -10 made next() loop forever
            loader.load_state_dict(state)


def test_image_dataset_refuses_what_it_would_change_silently():
    images = torch.rand(3, 3, 4, 4) * 2 - 1
    for bad_images, error, message in (
            ((images * 100).to(torch.uint8), TypeError, "images must be floating point"),
            (images.masked_fill(images > 0.9, float("nan")), ValueError, "NaN"),
            # [0, 255] floats trained unscaled (and sampling clips at 1)
            ((images + 1) * 127.5, ValueError, r"images must lie in \[-1, 1\], got values in")):
        with pytest.raises(error, match=message):
            ImageDataset(bad_images)
    for labels, num_classes, error, message in (
            (torch.tensor([0.7, 2.9, 1.0]), 3, TypeError, "labels must be integers"),
            (torch.tensor([0, -1, 1]), 3, ValueError, r"labels must lie in \[0, 3\)"),
            (torch.tensor([0, 3, 1]), 3, ValueError, r"labels must lie in \[0, 3\)"),
            (torch.tensor([0, -2, 1]), None, ValueError, r"labels must lie in \[0, inf\)"),
            (torch.tensor([0, 0, 0]), 0, ValueError, "num_classes")):
        with pytest.raises(error, match=message):
            ImageDataset(images, labels, num_classes)
    dataset = ImageDataset(images, np.array([2, 0, 1], dtype=np.int32), np.int64(3))
    assert dataset.labels.dtype == torch.long and dataset.num_classes == 3
    assert ImageDataset(images, torch.tensor([0, 5, 1])).labels.tolist() == [0, 5, 1]
    assert ImageDataset(torch.rand(2, 4, 3, 3), num_classes=torch.tensor(2)).channels == 4


def test_load_array_checks_its_options(tmp_path):
    np.save(tmp_path / "ok.npy", np.zeros((3, 4, 4), np.float32))
    for value_range in ((-np.inf, np.inf), (0, np.inf), "0-1", "01", (0, 1, 2), None):
        with pytest.raises(ValueError, match="value_range"):
            load_array(tmp_path / "ok.npy", value_range=value_range)
    with pytest.raises(ValueError, match="layout must be"):
        load_array(tmp_path / "ok.npy", layout="bogus")
    np.save(tmp_path / "r.npy", np.full((2, 1, 4, 4), 15.0, np.float32))
    data = load_array(tmp_path / "r.npy", value_range=np.array([10, 20]))  # a numpy range
    assert torch.equal(data.images, torch.zeros(2, 1, 4, 4))
    np.save(tmp_path / "i16.npy", np.full((2, 1, 4, 4), 1000, np.int16))
    with pytest.raises(ValueError, match="integer images are read as 8-bit"):
        load_array(tmp_path / "i16.npy")
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npz.* not a numeric"):
        load_array(tmp_path / "obj.npz")
    for shape, dtype in (((5, 3, 4, 4), np.uint8), ((5, 4, 4, 3), np.float32)):
        np.save(tmp_path / "tiny.npy", np.zeros(shape, dtype))  # 4 px: only one layout is square
        assert load_array(tmp_path / "tiny.npy").images.shape == (5, 3, 4, 4)
    np.save(tmp_path / "c5.npy", np.zeros((2, 5, 8, 8), np.float32))  # no axis <= 4
    with pytest.raises(ValueError, match="at most 4 channels.*layout='NHWC' or 'NCHW'"):
        load_array(tmp_path / "c5.npy")
    assert load_array(tmp_path / "c5.npy", layout="NCHW").channels == 5


def test_load_digits_conversion_with_stub_sklearn(monkeypatch):
    # scikit-learn may be absent: check the conversion on a stand-in with known values
    import types
    raw = np.zeros((3, 8, 8))
    raw[0] = 16.0
    raw[1, :, :4] = 8.0
    module = types.ModuleType("sklearn.datasets")
    module.load_digits = lambda: types.SimpleNamespace(images=raw, target=np.array([7, 1, 0]))
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", module)
    data = load_digits()
    assert data.images.shape == (3, 1, 8, 8) and data.labels.tolist() == [7, 1, 0]
    torch.testing.assert_close(data.images[0], torch.ones(1, 8, 8))
    torch.testing.assert_close(data.images[1, 0, :, :4], torch.zeros(8, 4))
    torch.testing.assert_close(data.images[2], -torch.ones(1, 8, 8))
    big = load_digits(image_size=16)
    assert big.images.shape == (3, 1, 16, 16)
    torch.testing.assert_close(big.images[0], torch.ones(1, 16, 16))
    assert big.images.min() >= -1 and big.images.max() <= 1
