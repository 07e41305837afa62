#pragma once

#include <ATen/ATen.h>

namespace ant_ops {

/// Checks the arguments of ant_core::interval_dp_batched (ValueError / TypeError naming the
/// argument) and returns the effective max_size (0 = unbounded -> T).
int64_t check_interval_dp_batched(const at::Tensor& costs, int64_t k, int64_t min_size,
                                  int64_t max_size);

}  // namespace ant_ops
