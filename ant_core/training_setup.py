"""What a training run is built from, given its :class:`~ant_core.train_config.TrainConfig`:
the dataset, the model's arguments and the model, the timestep clusters, the EMA copy and the
process group (from torchrun's environment)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .clustering import IntervalClusters, interval_clustering
from .train_config import TrainConfig, resolve_device

__all__ = ["build_dataset", "build_model_config", "build_model", "build_clusters", "EMA",
           "distributed_setup"]


def build_dataset(config: TrainConfig):
    """The training dataset of ``config`` (ValueError for a missing path)."""
    from .data import get_dataset

    name = config.data
    if name.lower() == "shapes":
        return get_dataset("shapes", num_images=config.num_images, image_size=config.image_size,
                           seed=config.data_seed)
    if name.lower() == "digits" or Path(name).is_dir():
        return get_dataset(name, image_size=config.image_size)
    if not Path(name).exists():
        raise ValueError(f"data={name!r} is not 'shapes', 'digits' or an existing path")
    return get_dataset(name)


def build_model(kind: str, config: dict):
    from .models import create_model

    return create_model(kind, **config)


def build_model_config(config: TrainConfig, dataset) -> dict:
    """The model's constructor arguments: image size, channels and classes from the data, then
    ``config.model_config`` (ValueError where it contradicts the data or class_conditional)."""
    num_classes = dataset.num_classes if config.class_conditional else None
    if config.class_conditional and not num_classes:
        raise ValueError(f"class_conditional=True but data={config.data!r} has no labels")
    model_config = {"image_size": dataset.image_size, "in_channels": dataset.channels,
                    "num_classes": num_classes}
    # the training target has the data's channels: out_channels (when given; None means
    # in_channels to the models) must be those
    expected = {**model_config, "out_channels": dataset.channels}
    for key, value in config.model_config.items():
        if key in expected and value != expected[key] and \
                not (key == "out_channels" and value is None):
            raise ValueError(
                f"model_config[{key!r}]={value!r} contradicts the data and config "
                f"({key}={expected[key]!r}, from data / class_conditional); "
                "remove it from model_config")
    return {**model_config, **config.model_config}


def build_clusters(config: TrainConfig) -> IntervalClusters:
    if config.num_clusters == 1:
        return IntervalClusters.uniform(config.T, 1)
    kwargs = {}
    if config.affinity is not None:
        try:
            kwargs["affinity"] = np.load(config.affinity, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"affinity: could not read {config.affinity}: {exc}") from None
    else:
        kwargs["schedule"] = config.schedule
    return interval_clustering(config.k, config.objective, T=config.T, **kwargs)


class EMA:
    """Exponential moving average of a model's parameters (buffers copied), updated every step
    with decay ``min(decay, (1 + n) / (10 + n))`` after n updates."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = float(decay)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        n = self.num_updates
        decay = min(self.decay, (1 + n) / (10 + n))
        # one multi-tensor lerp for all parameters (a launch per parameter on a GPU otherwise)
        torch._foreach_lerp_(list(self.model.parameters()),
                             [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


def distributed_setup(device_pref: str):
    """(rank, world_size, device, created_group) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_pref).startswith("cuda")
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        index = local_rank if world > 1 or device_pref in ("auto", "cuda") else \
            torch.device(device_pref).index or 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device, created
