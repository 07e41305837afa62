"""Per-task gradient engines: the K task gradients of shared parameters, one interface.

``engine.task_gradients(losses, parameters, group=None)`` returns a :class:`TaskGradients`:
``∇_p losses[k]`` for every parameter p and task k, in one flat buffer per dtype/device (K × P
memory; a DDP all-reduce is one call per buffer). The one-backward engine's layer handlers
write straight into it, and the engines reuse it from call to call (a fresh K × P allocation
every step costs more than the gradients on a CPU). Both engines have a
memory-bounded mode for the gradient methods (``AutogradEngine(chunk_numel=...)``,
``OneBackwardEngine(model, low_memory=True)``) that trades K × P memory for one more pass.

* :class:`AutogradEngine` — the reference: K ``autograd.grad`` calls with ``retain_graph``;
  with ``chunk_numel`` the gradient methods only ever hold K × chunk_numel gradient entries.
* :class:`OneBackwardEngine` — one backward: needs the tasks to be disjoint subsets of the batch
  (``group`` gives each sample's task) and samples not to interact in the network. A single
  backward of ``Σ_k L_k`` w.r.t. the *outputs* of the supported layers gives each sample's
  output gradient (and skips the ordinary weight-gradient matmuls); each layer's per-task weight
  gradient is then its weight-gradient formula on the task's batch segment
  (:mod:`ant_core.mtl.layer_gradients`). Parameters outside supported layers fall back to
  K extra backward passes restricted to them.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..checks import check_bool, check_int
from .layer_gradients import TaskSegments, find_handler
from .task_gradients import TaskGradients, task_gramian

__all__ = ["AutogradEngine", "OneBackwardEngine", "resolve_engine"]


def _autograd_task_gradients(losses, params, out, indices=None, retain_last=False):
    """K ``autograd.grad`` calls adding ``∇ losses[k]`` of ``params`` into ``out`` (a
    :class:`TaskGradients`) at ``indices`` (default 0..len-1)."""
    indices = range(len(params)) if indices is None else indices
    num_tasks = losses.numel()
    if not losses.requires_grad or not params:
        return out
    for k in range(num_tasks):
        retain = retain_last or k < num_tasks - 1
        grads = torch.autograd.grad(losses[k], params, retain_graph=retain, allow_unused=True)
        for i, g in zip(indices, grads):
            if g is not None:
                out.add_task(i, k, g)
    return out


class AutogradEngine:
    """Reference engine: K backward passes (``torch.autograd.grad`` with ``retain_graph``).

    ``chunk_numel`` (default None: all parameters at once, K × P memory) bounds the memory of
    the gradient methods: they then accumulate the Gramian over parameter chunks of at most
    ``chunk_numel`` entries (a parameter larger than that is its own chunk) with K backward
    passes per chunk, and write the result with one more backward of ``Σ_k c_k L_k``.
    """

    def __init__(self, chunk_numel=None):
        self.chunk_numel = None if chunk_numel is None else check_int("chunk_numel", chunk_numel, 1)
        self._storage = None

    def chunks(self, parameters):
        """Consecutive groups of parameters with at most ``chunk_numel`` entries each."""
        chunk, size = [], 0
        for p in parameters:
            if chunk and size + p.numel() > self.chunk_numel:
                yield chunk
                chunk, size = [], 0
            chunk.append(p)
            size += p.numel()
        if chunk:
            yield chunk

    def task_gradients(self, losses, parameters, *, group=None, retain_graph=False):
        """:class:`TaskGradients` of ``parameters`` from K backward passes."""
        params = list(parameters)
        out = TaskGradients(params, losses.numel(), self._storage)
        self._storage = out.buffers
        return _autograd_task_gradients(losses, params, out, retain_last=retain_graph)

    def discard(self):
        """Nothing recorded; present for interface parity with :class:`OneBackwardEngine`."""


def resolve_engine(engine):
    """``"autograd"`` -> :class:`AutogradEngine`; an engine object is returned unchanged."""
    if engine == "autograd" or engine is None:
        return AutogradEngine()
    if isinstance(engine, str):
        raise ValueError(f"engine must be 'autograd' or an engine object, got {engine!r}")
    if not hasattr(engine, "task_gradients"):
        raise TypeError("engine must provide task_gradients(losses, parameters, group=...)")
    return engine


class OneBackwardEngine:
    """One-backward per-task gradients for models whose samples do not interact.

    Usage::

        engine = OneBackwardEngine(model)
        method = ant_core.mtl.create("pcgrad", num_tasks=K, engine=engine)
        with engine.record():
            pred = model(x_t, t)
        losses = ant_core.grouped_mse(pred, target, group, K)
        method.backward(losses, model.parameters(), group=group)

    The engine hooks the eager modules: run the model itself under ``record()``, not a
    ``torch.compile`` of it.

    Supported layers: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (zero padding, numeric padding), the
    affine parameters of ``nn.LayerNorm`` / ``nn.GroupNorm`` and ``nn.Embedding`` (dense, no
    ``max_norm``); add more with :func:`ant_core.mtl.layer_gradients.register_layer_handler`.
    Every call of a supported layer must see the batch on dim 0 (B = ``len(group)``); a layer
    called on anything else, parameters of unsupported layers (e.g. ``nn.MultiheadAttention``'s
    packed projection, free ``nn.Parameter`` such as position embeddings) and parameters not in
    ``model`` take the fallback path (K backward passes restricted to them — keep them few).

    Memory: by default the gradient methods hold all K task gradients (K × P) and combine
    them. With ``low_memory=True`` they use :meth:`gramian_and_writer` instead: per-task
    gradients live one layer at a time and the combination costs one more weight-gradient pass
    (slower: about +1 weight-gradient computation per step). Under DDP every rank must run the
    same supported layers (the per-layer all-reduces are matched by order).

    Requirements: ``losses[k]`` depends only on the samples of task k; a supported layer's
    parameters are used only through that layer's ``forward`` (no weight tying through
    ``F.linear``); every call of it sees the batch on dim 0 (not sequence-first with a
    sequence as long as the batch); its input and output are not modified in place afterwards
    (checked). BatchNorm in training mode (or without running stats) mixes samples and is
    refused with ValueError. The rest the engine cannot see, so with ``verify=True`` (default)
    its first calls also run one ordinary backward and check that the task gradients combine to
    it (``Σ_k c_k ∇L_k = ∇ Σ_k c_k L_k`` for distinct fixed ``c_k``, to ``verify_rtol`` per
    parameter), raising ValueError with the offending parameters' names otherwise. A parameter
    counts as checked once its reference gradient was finite and non-zero (a zero-initialised
    output layer leaves most gradients 0 at step 0); checking stops when all are checked, or
    after ``VERIFY_CALLS`` calls. Under DDP the verdict is all-reduced over the process group
    of the gradient method the engine is given to (``verdict_reduce``, set by that method), so
    ranks agree; used on its own (e.g. by ``estimate_affinity``) it stays local.
    """

    VERIFY_CALLS = 10

    def __init__(self, model: nn.Module, *, low_memory: bool = False, verify: bool = True,
                 verify_rtol: float = 1e-2):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_bool("low_memory", low_memory)
        check_bool("verify", verify)
        if not verify_rtol > 0:
            raise ValueError(f"verify_rtol must be > 0, got {verify_rtol}")
        self.model = model
        self.verdict_reduce = None  # the DDP all-reduce of the verdict; None: local (see above)
        self.low_memory = low_memory
        self.verify, self.verify_rtol = verify, float(verify_rtol)
        self._verify_calls, self._unverified = 0, None
        self._storage = None
        self._records = []
        self._recording = False
        self._handles = []
        self.handled_modules = []
        #: parameters that took the K-backward path in the last ``task_gradients`` call
        self.fallback_parameters = []
        for module in model.modules():
            handler = find_handler(module)
            if handler is not None:
                self.handled_modules.append(module)
                self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output):
        if self._recording and torch.is_grad_enabled() and isinstance(output, torch.Tensor) \
                and output.requires_grad and inputs and isinstance(inputs[0], torch.Tensor):
            x = inputs[0]
            self._records.append((module, x.detach(), x._version, output, output._version))

    @contextlib.contextmanager
    def record(self):
        """Record the supported layers' inputs/outputs during the forward pass inside."""
        self._records = []
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def discard(self):
        """Drop what was recorded (e.g. on steps that need no per-task gradients)."""
        self._records = []

    def remove(self):
        """Remove the hooks from the model and free the reused gradient storage."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._storage = None

    def _check_no_interaction(self):
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    module.training or not module.track_running_stats):
                raise ValueError(
                    f"model contains {type(module).__name__} using batch statistics: samples "
                    "interact, so per-task gradients cannot be split; use AutogradEngine")

    def _check_records(self, group):
        """The checks that need no backward: group given, no sample mixing, no in-place edits."""
        if group is None:
            raise ValueError("group (the per-sample task ids) is required by OneBackwardEngine")
        self._check_no_interaction()
        for module, x, x_version, y, y_version in self._records:
            if x._version != x_version or y._version != y_version:
                which = "input" if x._version != x_version else "output"
                raise ValueError(f"the {which} of {module} was modified in place after its "
                                 "forward; use out-of-place ops (e.g. inplace=False). (A model "
                                 "run through torch.compile looks like this too: the engine "
                                 "needs the eager model.)")

    def _one_backward(self, losses, params, group, out=None):
        """The shared first half: fallback task gradients, then one backward to layer outputs.

        The fallback parameters' task gradients go into ``out`` (a :class:`TaskGradients` of
        ``params``) or, when it is None, into a new one of the fallback parameters alone.
        Returns ``(tasks, items, fallback, fallback_out)``: ``items`` a list of
        ``(module, input, output_grad)`` in the parameters' dtype, ``fallback`` the fallback
        parameters' indices in ``params``.
        """
        self._check_records(group)
        reference = self._reference(losses, params)
        records, self._records = self._records, []
        tasks = TaskSegments(group.reshape(-1).to(losses.device), losses.numel())
        batch = tasks.batch_size
        usable, rejected = [], set()
        for module, x, _, y, _ in records:
            if x.dim() == 0 or y.dim() == 0 or x.shape[0] != batch or y.shape[0] != batch:
                rejected.add(module)
            else:
                usable.append((module, x, y))
        usable = [r for r in usable if r[0] not in rejected]
        owned = {id(p) for module, _, _ in usable for p in module.parameters(recurse=False)}
        fallback = [i for i, p in enumerate(params) if id(p) not in owned]
        fallback_params = self.fallback_parameters = [params[i] for i in fallback]
        if not records and params:
            warnings.warn("OneBackwardEngine recorded nothing: run the forward inside "
                          "engine.record(); using K backward passes", RuntimeWarning, stacklevel=4)
        if out is None:
            out, indices = TaskGradients(fallback_params, losses.numel()), None
        else:
            indices = fallback
        _autograd_task_gradients(losses, fallback_params, out, indices, retain_last=bool(usable))
        if not usable or not losses.requires_grad:
            return tasks, [], fallback, out, reference
        output_grads = torch.autograd.grad(losses.sum(), [y for _, _, y in usable],
                                           allow_unused=True)
        items = []
        for (module, x, y), gy in zip(usable, output_grads):
            if gy is not None:
                dtype = module_dtype(module)
                if x.is_floating_point() and x.dtype != dtype:
                    x = x.to(dtype)
                items.append((module, x, gy if gy.dtype == dtype else gy.to(dtype)))
        return tasks, items, fallback, out, reference

    def task_gradients(self, losses, parameters, *, group=None):
        """:class:`TaskGradients` from one backward (see the class docstring)."""
        params = list(parameters)
        out = TaskGradients(params, losses.numel(), self._storage)
        self._storage = out.buffers
        tasks, items, _, _, reference = self._one_backward(losses, params, group, out)
        index = {id(p): i for i, p in enumerate(params)}
        for module, x, gy in items:
            targets, shared = {}, []
            for name, i, p in _owned(module, index):
                targets[name] = out.claim(i)
                if targets[name] is None:  # a parameter of several layers: add the others
                    targets[name] = p.new_empty((tasks.num_tasks, *p.shape))
                    shared.append((i, targets[name]))
            find_handler(module)(module, x, gy, tasks, targets)
            for i, g in shared:
                out.add(i, g)
        if reference is not None:
            self._check_combination(params, reference, out.combine(reference[0]))
        return out

    def _reference(self, losses, params):
        """While verifying: ``(c, ∇ Σ_k c_k L_k)`` from one more (ordinary) backward, else None.
        Distinct ``c_k``: a plain sum would not see samples given to the wrong task."""
        if not (self.verify and losses.requires_grad):
            return None
        coeffs = torch.linspace(0.5, 1.5, losses.numel(), dtype=torch.float64)
        full = torch.autograd.grad((coeffs.to(losses) * losses).sum(), params, retain_graph=True,
                                   allow_unused=True)
        return coeffs, full

    def _check_combination(self, params, reference, combined):
        """Raise unless ``combined`` (per parameter ``Σ_k c_k g_k``, None where unused) matches
        the reference gradient, for every parameter whose reference is finite and non-zero."""
        if self._unverified is None:
            self._unverified = {id(p) for p in params}
        norm = torch.linalg.vector_norm

        def norms(p, f, g):  # one parameter's float64 copies at a time
            zero = torch.zeros((), dtype=torch.float64, device=p.device)
            f = zero if f is None else f.double()
            g = zero if g is None else g.double()
            return norm(f), norm(g), norm(f - g)

        ref, own, err = (torch.stack(v).to(params[0].device) for v in
                         zip(*[norms(*t) for t in zip(params, reference[1], combined)]))
        checked = torch.isfinite(ref) & torch.isfinite(own) & (ref > 0)
        floor = 1e-6 * torch.linalg.vector_norm(torch.where(checked, ref, 0.0))
        wrong = checked & (err > self.verify_rtol * (ref + own) + floor)
        flags = torch.stack([wrong, checked]).double()
        reduce = getattr(self, "verdict_reduce", None)  # (absent from engines pickled earlier)
        if reduce is not None:  # the same verdict and next step on every rank
            reduce([flags])
        wrong, checked = (flags > 0).cpu().tolist()
        self._unverified -= {id(p) for p, c in zip(params, checked) if c}
        self._verify_calls += 1
        if not self._unverified or self._verify_calls >= self.VERIFY_CALLS:
            self.verify = False
        names = {id(p): name for name, p in self.model.named_parameters()}
        wrong = [names.get(id(p), f"parameter {i}") for i, (p, w) in enumerate(zip(params, wrong))
                 if w]
        if wrong:
            raise ValueError(
                f"OneBackwardEngine: the per-task gradients of {', '.join(wrong[:5])}"
                f"{' …' if len(wrong) > 5 else ''} do not combine to the ordinary gradient: a "
                "parameter used outside its layer's forward (weight tying), a layer that does not "
                "see the batch on dim 0, samples that interact, or a model run through "
                "torch.compile (the engine needs the eager model). Use the autograd engine for "
                "this model (or verify=False to skip this check)")

    def gramian_and_writer(self, losses, parameters, *, group=None, reduce=None):
        """Gramian without holding all task gradients, and a writer of ``Σ_k c_k g_k``.

        Per-task gradients live one layer at a time (K × largest layer; a parameter shared by
        several layers is kept until all of them are done); ``reduce`` (e.g. a DDP SUM
        all-reduce, in place) is applied to them before they enter the Gramian. Returns
        ``(gramian, write)``: ``gramian`` a (K, K) float64 tensor and ``write(coeffs)`` the
        per-parameter **local** combined gradients (None where unused), computed with one more
        weight-gradient pass on output gradients scaled by ``coeffs[group]``.
        """
        params = list(parameters)
        num_tasks = losses.numel()
        tasks, items, fallback, fallback_out, reference = self._one_backward(losses, params,
                                                                             group)
        index = {id(p): i for i, p in enumerate(params)}
        users = {}
        for module, _, _ in items:
            for p in module.parameters(recurse=False):
                users[id(p)] = users.get(id(p), 0) + 1
        pending, parts = {}, []
        gramian = fallback_out.gramian(reduce).to(losses.device)
        for module, x, gy in items:
            targets = {name: p.new_empty((num_tasks, *p.shape))
                       for name, _, p in _owned(module, index)}
            find_handler(module)(module, x, gy, tasks, targets)
            for name, g in targets.items():
                key = id(getattr(module, name))
                pending[key] = g if key not in pending else pending[key] + g
                users[key] -= 1
                if users[key] == 0:
                    parts.append(pending.pop(key))
            if parts:
                if reduce is not None:
                    reduce(parts)
                gramian += task_gramian(parts, num_tasks).to(gramian.device)
                parts = []

        def write(coeffs):
            coeffs = torch.as_tensor(coeffs)
            out = [None] * len(params)
            for i, g in zip(fallback, fallback_out.combine(coeffs)):
                out[i] = g
            single = TaskSegments(torch.zeros_like(tasks.group), 1)
            per_sample = coeffs.to(tasks.group.device)[tasks.group]
            for module, x, gy in items:
                factor = per_sample.to(gy.dtype).view(-1, *([1] * (gy.dim() - 1)))
                owned = list(_owned(module, index))
                targets = {name: p.new_empty((1, *p.shape)) for name, _, p in owned}
                find_handler(module)(module, x, gy * factor, single, targets)
                for name, i, _ in owned:
                    g = targets[name][0]
                    out[i] = g if out[i] is None else out[i] + g
            return out

        if reference is not None:
            self._check_combination(params, reference, write(reference[0]))
        return gramian, write


def _owned(module, index):
    """``(name, position in index, parameter)`` of the module's own parameters in ``index``."""
    for name, p in module.named_parameters(recurse=False):
        i = index.get(id(p))
        if i is not None:
            yield name, i, p


def module_dtype(module):
    """The floating dtype of a module's parameters (computation dtype of its gradients)."""
    for p in module.parameters(recurse=False):
        return p.dtype
    return torch.get_default_dtype()
