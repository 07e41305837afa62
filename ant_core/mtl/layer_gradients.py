"""Per-task parameter gradients of single layers from their input and output gradient.

Used by :class:`ant_core.mtl.engines.OneBackwardEngine`. When the K tasks are disjoint subsets
of the batch and samples do not interact, a layer's gradient for task k is its ordinary weight
gradient restricted to task k's samples: the same matmul / convolution-weight / reduction,
applied to the task's segment of the batch.

A handler is ``handler(module, input, grad_output, tasks, out)``: ``input`` and ``grad_output``
have the batch on dim 0, ``tasks`` is a :class:`TaskSegments` and ``out`` maps parameter names
to (K, *shape) tensors that the handler overwrites with the per-task gradients (names missing
from ``out`` are not needed, e.g. frozen parameters). Writing into the engine's storage, not
returning new tensors, saves a pass over K × P memory.
Extend the engine with :func:`register_layer_handler` (a ``supports(module) -> bool`` predicate
says whether a given instance can be handled; otherwise its parameters fall back to the
extra-backward path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskSegments", "register_layer_handler", "find_handler"]


class TaskSegments:
    """The batch's task layout: ``group`` (B,) ids in ``[0, K)``, contiguous when sorted."""

    def __init__(self, group: torch.Tensor, num_tasks: int):
        if group.dim() != 1 or group.dtype not in (torch.int64, torch.int32):
            raise ValueError("group must be a 1-D integer tensor of task ids")
        self.group = group.long()
        self.num_tasks = num_tasks
        self.batch_size = group.numel()
        # one host sync for everything: [in range, sorted, counts of tasks 0..K-1]
        ids = self.group.clamp(0, num_tasks - 1)
        summary = torch.cat([
            torch.stack([torch.all(ids == self.group), torch.all(ids[1:] >= ids[:-1])]).long(),
            torch.bincount(ids, minlength=num_tasks)]).tolist()
        if not summary[0]:
            raise ValueError(f"group ids must lie in [0, {num_tasks})")
        counts = summary[2:]
        self.order = None if summary[1] else torch.argsort(self.group, stable=True)
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        self.slices = [slice(s, s + c) for s, c in zip(starts, counts)]
        self._indicators = {}

    def split(self, x: torch.Tensor):
        """The K per-task pieces of ``x`` (batch on dim 0); views when the batch is sorted."""
        if self.order is not None:
            x = x.index_select(0, self.order)
        return [x[s] for s in self.slices]

    def indicator(self, dtype, device):
        """The (K, B) 0/1 matrix of task membership (cached per dtype/device)."""
        key = (dtype, device)
        if key not in self._indicators:
            self._indicators[key] = F.one_hot(self.group.to(device), self.num_tasks).T.to(dtype)
        return self._indicators[key]

    def sum_per_task(self, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write into ``out`` (K, *shape) the sums of ``t`` (B, ..., *shape) over each task's
        samples and the dims in between: one reduction when the tasks are sorted and of equal
        size, else a per-sample reduction and one matmul."""
        if self.equal_segments():
            return torch.sum(t.reshape(self.num_tasks, -1, *out.shape[1:]), 1, out=out)
        flat = t.reshape(t.shape[0], -1, out[0].numel())
        per_sample = flat.sum(1) if flat.shape[1] > 1 else flat[:, 0]
        torch.mm(self.indicator(t.dtype, t.device), per_sample, out=out.view(self.num_tasks, -1))
        return out

    def equal_segments(self) -> bool:
        """True when the batch is sorted and every task has the same number of samples."""
        return self.order is None and len({s.stop - s.start for s in self.slices}) == 1


_HANDLERS = []  # (module type, supports(module), handler)


def register_layer_handler(module_type, handler, supports=lambda module: True):
    """Teach the one-backward engine a layer type (checked before the built-in ones).

    ``handler(module, input, grad_output, tasks, out)`` overwrites each ``out[param_name]``
    (K, *param.shape) with the per-task gradients of that parameter.
    """
    _HANDLERS.insert(0, (module_type, supports, handler))


def find_handler(module):
    """``handler(module, x, grad_output, tasks, out)`` for ``module``, or None (then its
    parameters take the fallback path)."""
    for module_type, supports, handler in _HANDLERS:
        if type(module) is module_type and supports(module):
            return handler
    return None


def _linear(module, x, gy, tasks, out):
    k = tasks.num_tasks
    if "weight" in out:
        if tasks.equal_segments():  # one batched matmul over (K, samples per task · tokens)
            torch.bmm(gy.reshape(k, -1, module.out_features).transpose(1, 2),
                      x.reshape(k, -1, module.in_features), out=out["weight"])
        else:
            for task, (a, g) in enumerate(zip(tasks.split(x), tasks.split(gy))):
                torch.mm(g.reshape(-1, module.out_features).T, a.reshape(-1, module.in_features),
                         out=out["weight"][task])
    if "bias" in out:
        tasks.sum_per_task(gy, out["bias"])


def _conv_weight(module, x, gy, num_groups, weight_shape):
    """The weight gradient of ``module``'s convolution (with ``num_groups`` groups)."""
    placeholder = x.new_empty(1).expand(weight_shape)  # only its shape is read
    return torch.ops.aten.convolution_backward(
        gy, x, placeholder, None, module.stride, module.padding, module.dilation, False,
        [0] * len(module.kernel_size), num_groups, [False, True, False])[1]


def _conv(module, x, gy, tasks, out):
    if "weight" in out:
        k, shape = tasks.num_tasks, module.weight.shape
        if tasks.equal_segments():
            # the K tasks as K times the groups of one convolution: (B, C, ...) sorted by task
            # -> (B / K, K * C, ...); its (K * O, C / groups, ...) weight gradient is the K
            # task gradients. One call instead of K (launches count on a GPU).
            def by_task(t):
                n = t.shape[0] // k
                return t.reshape(k, n, *t.shape[1:]).transpose(0, 1).reshape(n, -1, *t.shape[2:])

            grad = _conv_weight(module, by_task(x), by_task(gy), k * module.groups,
                                (k * shape[0], *shape[1:]))
            out["weight"].copy_(grad.view(k, *shape))
        else:
            for grad, a, g in zip(out["weight"], tasks.split(x), tasks.split(gy)):
                if a.shape[0] == 0:
                    grad.zero_()
                else:
                    grad.copy_(_conv_weight(module, a, g, module.groups, shape))
    if "bias" in out:
        tasks.sum_per_task(gy.reshape(gy.shape[0], gy.shape[1], -1).sum(-1), out["bias"])


def _conv_supported(module):
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _norm_affine(gy, tasks, out, x_hat, arrange=lambda t: t):
    """Per-task affine gradients of a norm layer ``y = x̂ · w + b`` (``x̂`` recomputed from
    the input); ``arrange`` brings a (B, ...) tensor to (B, ..., *w.shape)."""
    if "weight" in out:
        tasks.sum_per_task(arrange(gy * x_hat()), out["weight"])
    if "bias" in out:
        tasks.sum_per_task(arrange(gy), out["bias"])


def _layer_norm(module, x, gy, tasks, out):
    shape = tuple(module.normalized_shape)
    _norm_affine(gy, tasks, out, lambda: F.layer_norm(x, shape, None, None, module.eps))


def _group_norm(module, x, gy, tasks, out):
    _norm_affine(gy, tasks, out, lambda: F.group_norm(x, module.num_groups, None, None, module.eps),
                 lambda t: t.reshape(t.shape[0], t.shape[1], -1).sum(-1))


def _embedding(module, indices, gy, tasks, out):
    if "weight" not in out:
        return
    dim = module.weight.shape[1]
    per_token_task = tasks.group.view(-1, *([1] * (indices.dim() - 1))).expand_as(indices)
    grad = out["weight"].zero_()
    grad.index_put_((per_token_task.reshape(-1), indices.reshape(-1)), gy.reshape(-1, dim),
                    accumulate=True)
    if module.padding_idx is not None:
        grad[:, module.padding_idx] = 0


def _embedding_supported(module):
    return module.max_norm is None and not module.sparse and not module.scale_grad_by_freq


def _affine_supported(module):
    return getattr(module, "elementwise_affine", getattr(module, "affine", True))


for _type, _handler, _supports in [
    (nn.Linear, _linear, lambda m: True),
    (nn.Conv1d, _conv, _conv_supported),
    (nn.Conv2d, _conv, _conv_supported),
    (nn.Conv3d, _conv, _conv_supported),
    (nn.LayerNorm, _layer_norm, _affine_supported),
    (nn.GroupNorm, _group_norm, _affine_supported),
    (nn.Embedding, _embedding, _embedding_supported),
]:
    _HANDLERS.append((_type, _supports, _handler))
