"""Argument checks shared by the modules (no torch import: ``ant_core.clustering`` uses them)."""
import math
import numbers

import numpy as np

__all__ = ["check_int", "check_float", "check_bool", "check_int_sequence", "real_array",
           "values_checkable", "TORCH_SEEDS"]

#: the seeds torch.Generator.manual_seed takes (negative ones wrap around)
TORCH_SEEDS = (-(2**63), 2**64 - 1)


def _scalar(value):
    """A 0-d tensor or array as its Python number (what ``float()`` / ``int()`` would take)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def check_int(name: str, value, minimum=None, maximum=None) -> int:
    """``value`` as an ``int``: a Python or numpy integer, not a bool (TypeError otherwise), in
    ``[minimum, maximum]`` where given (ValueError otherwise); both errors name ``name``. A 0-d
    tensor or array counts as its value."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bound = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                 else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_float(name: str, value, minimum=None, *, strict: bool = False) -> float:
    """``value`` as a finite ``float``: a real number, not a bool (TypeError otherwise), finite
    and ``>= minimum`` (``> minimum`` when ``strict``) where given (ValueError otherwise). A 0-d
    tensor or array counts as its value."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range is not finite
        value = math.inf if value > 0 else -math.inf
    low_ok = minimum is None or (value > minimum if strict else value >= minimum)
    if not math.isfinite(value) or not low_ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (TypeError naming ``name`` otherwise: 0, 1 or "no" are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_int_sequence(name: str, value) -> tuple:
    """``value`` as a tuple of positive ints (a list/tuple, not a bare int), naming ``name``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    return tuple(check_int(f"{name} entries", v, 1) for v in value)


def real_array(name: str, value, copy: bool = True):
    """Array-like of real numbers (numpy, list, torch tensor on any device) as a float64 numpy
    copy (the caller's array stays theirs; ``copy=False``: only where a conversion needs one),
    without importing torch. Complex, bool and text are a TypeError naming ``name`` (they were
    cast, parsed or lost their imaginary part)."""
    if hasattr(value, "detach"):  # a torch tensor; .cpu() is a no-op for CPU tensors
        if value.is_complex() or str(value.dtype) == "torch.bool":
            raise TypeError(f"{name} must be an array of real numbers, got {value.dtype}")
        value = value.detach().cpu().double().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of real numbers, got "
                        f"{type(value).__name__}") from exc
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be an array of real numbers, got {array.dtype} "
                        f"({type(value).__name__})")
    return np.array(array, dtype=np.float64, copy=copy or None)


def values_checkable(tensor) -> bool:
    """Whether a check may read ``tensor``'s values: a CPU tensor in eager mode. On a GPU the
    read would sync with the device every call, and under torch.compile break the graph; the
    value checks of the training-path functions are skipped there."""
    import torch

    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()
