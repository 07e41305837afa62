"""The argument checks (ant_core.checks) every module uses."""
import numpy as np
import pytest

from ant_core.checks import check_float, check_int, real_array


@pytest.mark.parametrize("value", [0, 7, -3, np.int64(5), np.int32(-2), np.uint8(9)])
def test_integers_come_back_as_int(value):
    got = check_int("n", value)
    assert type(got) is int and got == int(value)


@pytest.mark.parametrize("value", [True, False, 2.0, np.float64(3), "4", None, [1], 1 + 0j])
def test_non_integers_are_a_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match=r"^batch_size must be an int, got "):
        check_int("batch_size", value, 1)


@pytest.mark.parametrize("value, low, high, message", [
    (0, 1, None, "k must be >= 1, got 0"),
    (np.int64(-1), 0, None, "k must be >= 0, got -1"),
    (11, 1, 10, r"k must be in \[1, 10\], got 11"),
    (0, 1, 10, r"k must be in \[1, 10\], got 0"),
    (6, None, 5, "k must be <= 5, got 6"),
])
def test_out_of_range_is_a_value_error_with_the_bounds(value, low, high, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_int("k", value, low, high)


def test_bounds_are_inclusive():
    assert check_int("k", 1, 1, 1) == 1
    assert check_int("k", 10, None, 10) == 10


def test_check_float():
    assert check_float("lr", np.float32(0.5), 0, strict=True) == 0.5
    assert type(check_float("lr", 3)) is float
    assert check_float("wd", 0, 0) == 0.0
    for value in (True, "1", None):
        with pytest.raises(TypeError, match="^lr must be a number, got"):
            check_float("lr", value)
    for value, low, strict, message in ((float("nan"), None, False, "lr must be a finite number, "
                                         "got nan"),
                                        (float("inf"), 0, False, "lr must be a finite number >= 0"),
                                        (0.0, 0, True, "lr must be a finite number > 0, got 0.0"),
                                        (-1e-9, 0, False, "lr must be a finite number >= 0"),
                                        (10**400, None, False, "lr must be a finite number, "
                                         "got inf"),
                                        (-10**400, None, False, "lr must be a finite number")):
        with pytest.raises(ValueError, match=f"^{message}"):
            check_float("lr", value, low, strict=strict)


def test_zero_dim_tensors_and_arrays_count_as_their_value():
    import torch

    assert check_int("seed", torch.tensor(3)) == 3 and check_int("n", np.array(4), 1) == 4
    assert check_float("lr", torch.tensor(0.5), 0, strict=True) == 0.5
    with pytest.raises(TypeError, match="seed must be an int"):
        check_int("seed", torch.tensor(1.5))
    with pytest.raises(TypeError, match="seed must be an int"):
        check_int("seed", torch.tensor([1, 2]))


def test_real_array_copies_real_numbers_and_refuses_the_rest():
    torch = pytest.importorskip("torch")
    mine = np.array([1, 2, 3], dtype=np.int32)
    got = real_array("values", mine)
    assert got.dtype == np.float64 and got.tolist() == [1.0, 2.0, 3.0]
    got[0] = 9
    assert mine[0] == 1                                   # a copy, not a view
    for value in ([0.5, 2], np.uint8([7]), torch.tensor([0.25], dtype=torch.bfloat16),
                  torch.arange(3), torch.ones(2, 2, dtype=torch.float16)):
        np.testing.assert_array_equal(real_array("values", value),
                                      np.asarray(torch.as_tensor(value).double()))
    for value in ([True, False], ["1", "2"], "abc", [1 + 1j], [object()], {"a": 1},
                  torch.tensor([1 + 1j]), torch.tensor([True])):
        with pytest.raises(TypeError, match="^values must be an array of real numbers, got "):
            real_array("values", value)
