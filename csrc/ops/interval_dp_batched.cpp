// ant_core::interval_dp_batched on CPU: loops the header-only exact solver over the batch
// (in parallel), plus the input checks shared with the CUDA implementation.
#include "ops/interval_dp_batched.h"

#include <ATen/Parallel.h>
#include <exception>
#include <string>
#include <vector>
#include <torch/library.h>

#include "ant/costs.hpp"
#include "ant/interval_dp.hpp"

namespace ant_ops {

int64_t check_interval_dp_batched(const at::Tensor& costs, int64_t k, int64_t min_size,
                                  int64_t max_size) {
  TORCH_CHECK_VALUE(costs.dim() == 3 && costs.size(1) == costs.size(2),
                    "interval_dp_batched: costs must have shape (B, T, T), got ", costs.sizes());
  TORCH_CHECK_TYPE(costs.scalar_type() == at::kFloat || costs.scalar_type() == at::kDouble,
                   "interval_dp_batched: costs must be float32 or float64, got ",
                   costs.scalar_type());
  const int64_t T = costs.size(1);
  std::string error;
  int64_t mx = 0;
  try {  // the same validation (and messages) as the CPU solver
    mx = ant::detail::checked_max_size(T, k, ant::SizeBounds{min_size, max_size});
  } catch (const std::invalid_argument& e) {
    error = e.what();
  }
  TORCH_CHECK_VALUE(error.empty(), "interval_dp_batched: ", error);
  return mx;
}

namespace {

std::tuple<at::Tensor, at::Tensor> interval_dp_batched_cpu(const at::Tensor& costs, int64_t k,
                                                           int64_t min_size, int64_t max_size) {
  check_interval_dp_batched(costs, k, min_size, max_size);
  const at::Tensor c = costs.to(at::kDouble).contiguous();
  const int64_t B = c.size(0), T = c.size(1);
  at::Tensor boundaries = at::empty({B, k + 1}, c.options().dtype(at::kLong));
  at::Tensor costs_by_k = at::empty({B, k}, c.options());
  const double* src = c.data_ptr<double>();
  int64_t* bnd = boundaries.data_ptr<int64_t>();
  double* cbk = costs_by_k.data_ptr<double>();
  std::vector<std::string> errors(B);  // per problem, so that no thread throws
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      try {
        const ant::Partition p = ant::solve(ant::MatrixCost(src + b * T * T, T), T, k,
                                            ant::SizeBounds{min_size, max_size},
                                            ant::Method::Exact);
        std::copy(p.boundaries.begin(), p.boundaries.end(), bnd + b * (k + 1));
        std::copy(p.costs_by_k.begin(), p.costs_by_k.end(), cbk + b * k);
      } catch (const std::exception& e) {
        errors[b] = e.what();
      }
    }
  });
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(errors[b].empty(), "interval_dp_batched: problem ", b, ": ", errors[b]);
  return {boundaries, costs_by_k};
}

}  // namespace
}  // namespace ant_ops

TORCH_LIBRARY_IMPL(ant_core, CPU, m) {
  m.impl("interval_dp_batched", &ant_ops::interval_dp_batched_cpu);
}
