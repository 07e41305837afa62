"""The K task gradients of a parameter list in one (K, n) matrix per dtype/device
(:class:`TaskGradients`, what the engines of :mod:`ant_core.mtl.engines` return) and the
(K, K) Gramian of per-task gradients (:func:`task_gramian`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["TaskGradients", "task_gramian"]


class TaskGradients(Sequence):
    """The K task gradients of a parameter list, in one (K, n) matrix per (dtype, device).

    Task-major: row k of a matrix holds task k's gradients of all its parameters one after the
    other, so the Gramian is one matmul per matrix and the combination one matrix-vector
    product (not one per parameter: on a GPU every launch counts). ``tg[i]`` is parameter i's
    (K, *shape) gradient (a view of some columns of a matrix; ``tg[i][k]`` is contiguous) or
    None when no loss depends on it. ``storage`` (the ``buffers`` of an earlier instance) is
    reused when the layout matches, so an earlier instance's blocks are overwritten: use a
    result before asking its engine for the next one.
    """

    def __init__(self, params, num_tasks, storage=None):
        self.num_tasks = num_tasks
        self._shapes = [p.shape for p in params]
        self._where, sizes, self._numels = [], {}, {}
        for p in params:
            key = (p.dtype, p.device)
            offset = sizes.get(key, 0)
            self._where.append((key, offset, p.numel()))
            self._numels.setdefault(key, []).append(p.numel())  # in offset order
            sizes[key] = offset + p.numel()
        shapes = {key: (num_tasks, n) for key, n in sizes.items()}
        if storage is not None and {k: tuple(b.shape) for k, b in storage.items()} == shapes:
            self.buffers = storage
        else:
            self.buffers = {key: torch.empty(shape, dtype=key[0], device=key[1])
                            for key, shape in shapes.items()}
        self._used = [False] * len(params)

    def _block(self, i):
        key, offset, numel = self._where[i]
        return self.buffers[key][:, offset: offset + numel].view(self.num_tasks, *self._shapes[i])

    def __len__(self):
        return len(self._where)

    def __getitem__(self, i):
        return self._block(i) if self._used[i] else None

    def claim(self, i):
        """Parameter i's block for a writer to overwrite, or None when it is already written
        (then write elsewhere and :meth:`add`)."""
        if self._used[i]:
            return None
        self._used[i] = True
        return self._block(i)

    def add(self, i, grad):
        """Add a (K, *shape) gradient to parameter i's block."""
        block = self.claim(i)
        (block.copy_ if block is not None else self._block(i).add_)(grad)

    def add_task(self, i, k, grad):
        """Add task k's gradient (*shape) of parameter i (other tasks' rows start at 0)."""
        block = self.claim(i)
        if block is not None:
            block.zero_()
        self._block(i)[k].add_(grad)

    def _zero_unused(self):
        for i, used in enumerate(self._used):
            if not used:
                self._block(i).zero_()

    def reduce(self, fn):
        """Apply ``fn`` (e.g. a DDP SUM all-reduce of a list of tensors) in place to the
        buffers; all parameters count as used afterwards (one unused here may be used on
        another rank)."""
        self._zero_unused()
        fn(list(self.buffers.values()))
        self._used = [True] * len(self._used)

    def gramian(self, reduce=None):
        """(K, K) float64 Gramian ``G[a, b] = Σ_p <g_a, g_b>`` (one matmul per buffer).

        With ``reduce``, the Gramian of ``reduce`` applied to a copy (the gradients stay local).
        """
        self._zero_unused()
        matrices = list(self.buffers.values())
        if reduce is not None:
            matrices = [m.clone() for m in matrices]
            reduce(matrices)
        return task_gramian(matrices, self.num_tasks)

    def combine(self, coeffs):
        """Per-parameter ``Σ_k c_k g_k`` (None where unused): views of one matrix-vector
        product per buffer."""
        coeffs = torch.as_tensor(coeffs)
        pieces = {key: iter(torch.mv(b.T, coeffs.to(b)).split(self._numels[key]))
                  for key, b in self.buffers.items()}
        return [g.view(shape) if used else None for g, shape, used in
                zip((next(pieces[key]) for key, _, _ in self._where), self._shapes, self._used)]


def task_gramian(task_grads, num_tasks, small_numel: int = 1 << 14):
    """Gramian (K, K) float64 of per-parameter (K, *shape) task gradients (None skipped).

    One matmul per (K, n) block (fp16/bf16 in float32); blocks smaller than ``small_numel``
    per task are concatenated first so that many tiny ones cost one matmul.
    """
    gramian = None
    small, big = [], []
    for g in task_grads:
        if g is not None:
            (small if g[0].numel() < small_numel else big).append(g.reshape(num_tasks, -1))
    by_dtype = {}
    for flat in small:
        by_dtype.setdefault((flat.dtype, flat.device), []).append(flat)
    blocks = big + [torch.cat(group, dim=1) for group in by_dtype.values()]
    for flat in blocks:
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        part = (flat @ flat.T).double()
        gramian = part if gramian is None else gramian + part.to(gramian.device)
    if gramian is None:
        return torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    return gramian
