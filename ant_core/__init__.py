"""ant-core: ANT (Addressing Negative Transfer in Diffusion Models) as a library.

The interval-clustering solver and the noise schedules import without torch; everything that
needs torch (grouped losses, MTL methods, samplers, training) is loaded on first use.
"""
from importlib import import_module

from .clustering import IntervalClusters, interval_clustering, interval_clustering_batched
from .schedules import NoiseSchedule, get_schedule

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (these need torch).
_LAZY = {
    "grouped_mse": "ant_core.losses",
    "reference_grouped_mse": "ant_core.losses",
    "check_groups": "ant_core.losses",
    "mtl": "ant_core.mtl",
    "sampling": "ant_core.sampling",
    "weighting": "ant_core.weighting",
    "diffusion": "ant_core.diffusion",
    "models": "ant_core.models",
    "data": "ant_core.data",
    "metrics": "ant_core.metrics",
    "affinity": "ant_core.affinity",
    "estimate_affinity": "ant_core.affinity",
    "TrainConfig": "ant_core.trainer",
    "Trainer": "ant_core.trainer",
    "train": "ant_core.trainer",
}

__all__ = [
    "IntervalClusters",
    "NoiseSchedule",
    "get_schedule",
    "interval_clustering",
    "interval_clustering_batched",
    *_LAZY,
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ant_core' has no attribute {name!r}")
    mod = import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
