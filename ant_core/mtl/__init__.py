"""MTL methods over timestep clusters behind one interface.

``method = create(name, num_tasks=K, **hparams)`` returns an ``nn.Module``;
``method.backward(losses, shared_parameters, ...)`` adds the combined gradient to ``.grad`` and
returns the task weights it used. See :mod:`ant_core.mtl.base` for the contract (accumulation,
AMP, DDP), :mod:`ant_core.mtl.weighting_methods` (ew, uw, dwa, rlw, gradnorm, famo),
:mod:`ant_core.mtl.gradient_methods` (pcgrad, nashmtl, mgda, cagrad, imtlg, alignedmtl),
:mod:`ant_core.mtl.engines` (per-task gradient engines) and
:mod:`ant_core.mtl.task_gradients` (what they return).
"""
from . import gradient_methods, gradient_solvers, weighting_methods  # noqa: F401  (registers)
from .base import MTLMethod, available, create, register
from .engines import AutogradEngine, OneBackwardEngine
from .gradient_methods import AlignedMTL, CAGrad, IMTLG, MGDA, NashMTL, PCGrad
from .gradient_solvers import NashMTLSolveError
from .layer_gradients import register_layer_handler
from .task_gradients import TaskGradients, task_gramian
from .weighting_methods import (FAMO, DynamicWeightAverage, EqualWeighting, GradNorm,
                                RandomLossWeighting, UncertaintyWeighting)

__all__ = [
    "MTLMethod", "available", "create", "register",
    "AutogradEngine", "OneBackwardEngine", "TaskGradients", "task_gramian",
    "register_layer_handler",
    "EqualWeighting", "UncertaintyWeighting", "DynamicWeightAverage", "RandomLossWeighting",
    "GradNorm", "FAMO", "PCGrad", "NashMTL", "MGDA", "CAGrad", "IMTLG", "AlignedMTL",
    "NashMTLSolveError",
]
