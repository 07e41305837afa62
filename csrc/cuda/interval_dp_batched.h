// Batched exact interval DP on the GPU: one thread block per problem. Raw pointers + stream,
// no ATen, so this compiles with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ant_cuda {

enum class CostType { Float32, Float64 };

/// Solves B independent problems given dense cost matrices costs[b, l, r] (row-major, B x T x T,
/// inclusive interval l..r) with K intervals of size in [min_size, max_size] (max_size already
/// resolved: 1 <= min_size <= max_size <= T, feasibility checked by the caller).
/// Scratch: layers (B * 4 * (T + 1) doubles), arg (B * K * (T + 1) int32).
/// Outputs: boundaries (B * (K + 1) int64), costs_by_k (B * K doubles).
/// Same recurrence, visiting order and tie-breaking as ant::solve(..., Method::Exact), so the
/// results equal the CPU solver's bit for bit.
cudaError_t interval_dp_batched(const void* costs, CostType type, int64_t B, int64_t T, int64_t K,
                                int64_t min_size, int64_t max_size, double* layers, int32_t* arg,
                                int64_t* boundaries, double* costs_by_k, cudaStream_t stream);

}  // namespace ant_cuda
