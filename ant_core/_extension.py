"""Loading the compiled parts, with an ImportError that says how to build them."""
from importlib import import_module

_BUILD_HINT = (
    "ant_core.{name} is not built. Build it against the installed torch with\n"
    "    pip install --no-build-isolation -e .\n"
    "from the ant-core source tree (needs a C++17 compiler, pybind11 and ninja; "
    "CUDA kernels are added when torch has CUDA and nvcc is found)."
)


def load(name):
    """Import the extension module ant_core.<name> ('_dp' or '_C')."""
    try:
        return import_module(f"ant_core.{name}")
    except ImportError as exc:
        raise ImportError(_BUILD_HINT.format(name=name) + f"\n(original error: {exc})") from exc


_fakes_registered = False


def torch_ops():
    """torch.ops.ant_core, after loading ant_core._C (which registers the ops) and registering
    the fake kernel of interval_dp_batched (grouped_mse's live in ant_core/losses.py)."""
    import torch

    global _fakes_registered
    load("_C")
    if not _fakes_registered:
        _fakes_registered = True

        @torch.library.register_fake("ant_core::interval_dp_batched")
        def _interval_dp_batched_fake(costs, k, min_size, max_size):
            batch = costs.shape[0]
            return (costs.new_empty((batch, k + 1), dtype=torch.int64),
                    costs.new_empty((batch, k), dtype=torch.float64))

    return torch.ops.ant_core
