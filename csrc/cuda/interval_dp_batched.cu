// Batched exact interval DP (see interval_dp_batched.h). Block b solves problem b; thread t
// owns the end positions i = i_lo + t, i_lo + t + blockDim.x, ... of each layer and scans its
// candidate splits j in increasing order, so for a fixed j a warp reads one contiguous row
// segment of the cost matrix. Layers live in global scratch (any T); the previous layer's
// entries are warp-uniform broadcasts and stay in L1.
#include "interval_dp_batched.h"

#include <math_constants.h>

namespace ant_cuda {
namespace {

template <typename scalar_t>
__global__ void interval_dp_kernel(const scalar_t* __restrict__ costs, int64_t T, int64_t K,
                                   int64_t mn, int64_t mx, double* __restrict__ layers,
                                   int32_t* __restrict__ arg, int64_t* __restrict__ boundaries,
                                   double* __restrict__ costs_by_k) {
  const int64_t b = blockIdx.x;
  const scalar_t* C = costs + b * T * T;
  const int64_t n = T + 1;
  double* value[2] = {layers + b * 4 * n, layers + b * 4 * n + 2 * n};
  double* balance[2] = {layers + b * 4 * n + n, layers + b * 4 * n + 3 * n};
  int32_t* A = arg + b * K * n;

  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    value[0][i] = i == 0 ? 0.0 : CUDART_INF;
    balance[0][i] = i == 0 ? 0.0 : CUDART_INF;
  }
  __syncthreads();

  for (int64_t k = 1; k <= K; ++k) {
    const double* pv = value[(k - 1) & 1];
    const double* pb = balance[(k - 1) & 1];
    double* cv = value[k & 1];
    double* cb = balance[k & 1];
    int32_t* ak = A + (k - 1) * n;
    const int64_t i_lo = k * mn, i_hi = min(T, k * mx);
    const int64_t j_lo_all = (k - 1) * mn, j_hi_all = min(T, (k - 1) * mx);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      double best = CUDART_INF, best_b = CUDART_INF;
      int32_t bj = -1;
      if (i >= i_lo && i <= i_hi) {
        const int64_t lo = max(j_lo_all, i - mx), hi = min(j_hi_all, i - mn);
        for (int64_t j = lo; j <= hi; ++j) {
          const double v = pv[j] + static_cast<double>(C[j * T + (i - 1)]);
          const double w = static_cast<double>(i - j);
          const double bal = __dadd_rn(pb[j], __dmul_rn(w, w));  // no FMA: match the CPU
          if (v < best || (v == best && bal < best_b)) {
            best = v;
            best_b = bal;
            bj = static_cast<int32_t>(j);
          }
        }
      }
      cv[i] = best;
      cb[i] = best_b;
      ak[i] = bj;
    }
    __syncthreads();
    if (threadIdx.x == 0) costs_by_k[b * K + (k - 1)] = cv[T];
  }
  if (threadIdx.x == 0) {
    int64_t* out = boundaries + b * (K + 1);
    out[K] = T;
    int64_t i = T;
    for (int64_t k = K; k >= 1; --k) {
      // No split recorded (every candidate NaN): -1 from here on, never an index; costs_by_k
      // is then not finite and the caller reports it.
      i = i < 0 ? -1 : A[(k - 1) * n + i];
      out[k - 1] = i;
    }
  }
}

}  // namespace

cudaError_t interval_dp_batched(const void* costs, CostType type, int64_t B, int64_t T, int64_t K,
                                int64_t min_size, int64_t max_size, double* layers, int32_t* arg,
                                int64_t* boundaries, double* costs_by_k, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int threads = T + 1 >= 512 ? 512 : static_cast<int>(((T + 1 + 31) / 32) * 32);
  const dim3 grid(static_cast<unsigned>(B));
  if (type == CostType::Float32)
    interval_dp_kernel<float><<<grid, threads, 0, stream>>>(
        static_cast<const float*>(costs), T, K, min_size, max_size, layers, arg, boundaries,
        costs_by_k);
  else
    interval_dp_kernel<double><<<grid, threads, 0, stream>>>(
        static_cast<const double*>(costs), T, K, min_size, max_size, layers, arg, boundaries,
        costs_by_k);
  return cudaGetLastError();
}

}  // namespace ant_cuda
