// ant_core::interval_dp_batched on CUDA: allocation, stream and launch of the batched DP kernel.
#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/interval_dp_batched.h"
#include "ops/interval_dp_batched.h"

namespace ant_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> interval_dp_batched_cuda(const at::Tensor& costs, int64_t k,
                                                            int64_t min_size, int64_t max_size) {
  const int64_t mx = check_interval_dp_batched(costs, k, min_size, max_size);
  const c10::cuda::CUDAGuard guard(costs.device());
  const at::Tensor c = costs.contiguous();
  const int64_t B = c.size(0), T = c.size(1);
  TORCH_CHECK_VALUE(T < (int64_t(1) << 31), "interval_dp_batched: T must fit in int32");
  const auto opts = c.options();
  at::Tensor layers = at::empty({B, 4, T + 1}, opts.dtype(at::kDouble));
  at::Tensor arg = at::empty({B, k, T + 1}, opts.dtype(at::kInt));
  at::Tensor boundaries = at::empty({B, k + 1}, opts.dtype(at::kLong));
  at::Tensor costs_by_k = at::empty({B, k}, opts.dtype(at::kDouble));
  const cudaError_t err = ant_cuda::interval_dp_batched(
      c.data_ptr(),
      c.scalar_type() == at::kFloat ? ant_cuda::CostType::Float32 : ant_cuda::CostType::Float64,
      B, T, k, min_size, mx, layers.data_ptr<double>(), arg.data_ptr<int32_t>(),
      boundaries.data_ptr<int64_t>(), costs_by_k.data_ptr<double>(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "interval_dp_batched: CUDA launch failed: ",
              cudaGetErrorString(err));
  return {boundaries, costs_by_k};
}

}  // namespace
}  // namespace ant_ops

TORCH_LIBRARY_IMPL(ant_core, CUDA, m) {
  m.impl("interval_dp_batched", &ant_ops::interval_dp_batched_cuda);
}
#endif  // WITH_CUDA
