"""A short CUDA workload for compute-sanitizer (not collected by pytest): every kernel path of
the grouped loss (fwd + bwd; aligned/unaligned, tiny/huge samples, mixed dtypes, a bad group id)
and the batched interval DP, each checked against the reference.

    compute-sanitizer --tool memcheck python tests/cuda_smoke.py
"""
import torch

import ant_core
from ant_core.losses import reference_grouped_mse

assert torch.cuda.is_available(), "needs a CUDA device"
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
cases = [
    ((1,), torch.float32, torch.float32),
    ((3,), torch.float16, torch.float16),
    ((7, 5, 3), torch.float32, torch.float32),         # N odd: scalar path
    ((16, 3, 8, 8), torch.bfloat16, torch.float32),   # mixed dtypes (AMP)
    ((4, 3, 64, 64), torch.float16, torch.float16),
    ((2, 1, 301, 301), torch.float32, torch.float32),  # few big samples, unaligned size
    ((300, 9), torch.float64, torch.float64),
]
for shape, pdt, tdt in cases:
    B = shape[0]
    pred = torch.randn(shape, device=dev, generator=g).to(pdt).requires_grad_()
    target = torch.randn(shape, device=dev, generator=g).to(tdt).requires_grad_()
    groups = torch.randint(0, 4, (B,), device=dev, generator=g)
    weight = torch.rand(B, device=dev, generator=g)
    for w in (None, weight):
        loss, per_sample = ant_core.grouped_mse(pred, target, groups, 4, w, return_per_sample=True)
        ref, ref_ps = reference_grouped_mse(pred, target, groups, 4, w, return_per_sample=True)
        tol = 1e-2 if torch.float16 in (pdt, tdt) or torch.bfloat16 in (pdt, tdt) else 1e-5
        torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=tol, atol=tol)
        gp, gt = torch.autograd.grad((loss.sum() + per_sample.sum()), (pred, target))
        rp, rt = torch.autograd.grad((ref.sum() + ref_ps.sum()), (pred, target))
        torch.testing.assert_close(gp.float(), rp.float(), rtol=5 * tol, atol=5 * tol)
        torch.testing.assert_close(gt.float(), rt.float(), rtol=5 * tol, atol=5 * tol)
# an out-of-range id must poison the result, not write out of bounds
bad = torch.tensor([0, 7], device=dev)
loss = ant_core.grouped_mse(torch.ones(2, 8, device=dev), torch.zeros(2, 8, device=dev), bad, 3)
assert torch.isnan(loss).all(), loss
costs = torch.randn(8, 120, 120, device=dev, generator=g)
res = ant_core.interval_clustering_batched(5, cost_matrices=costs)
for b in range(8):
    ref = ant_core.interval_clustering(5, cost_matrix=costs[b].double().cpu().numpy(), method="exact")
    assert res[b].bounds == ref.bounds
torch.cuda.synchronize()
print("cuda smoke: all kernel paths ran and matched the references")
