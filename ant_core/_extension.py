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


def torch_ops():
    """torch.ops.ant_core, after loading ant_core._C (which registers the ops)."""
    import torch

    load("_C")
    return torch.ops.ant_core
