// CUDA kernels of ant_core::grouped_mse: raw pointers and a cudaStream_t, no ATen/torch, so this
// header and grouped_mse.cu compile with plain nvcc. The torch glue is
// csrc/ops/grouped_mse_cuda.cpp.
//
// Layout: pred and target are contiguous (B, N) arrays (N = elements per sample). Work is split
// into tiles: a tile is `chunk_len` consecutive elements of one sample, handled by `tile_threads`
// threads (a power of two <= 32, several tiles sharing a 256-thread block; or the whole block).
// Both directions are one kernel launch each:
//  * forward: every tile writes its sum of squares to `partials` (double); the last block to finish
//    (threadfence + atomic ticket) reduces them in a fixed order into sample_mse, then the K group
//    sums and counts (deterministic; a warp owns a group and its lanes stride over the samples).
//    The ticket counter must be zero before the launch; the last block resets it to zero, so a
//    counter that starts zeroed stays valid for every later launch on the same stream.
//    A group id outside [0, K) is never used as an index: it makes every group loss NaN.
//  * backward: one pass writing grad_pred (and grad_target = -grad_pred) with the per-sample
//    coefficient 2/N * (w_i * grad_group[g_i] / count[g_i] + grad_sample_i) (NaN for a bad id).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ant_core {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
enum class IndexType : int { I32 = 0, I64 = 1 };

constexpr int kGroupedMseBlockThreads = 256;

struct GroupedMsePlan {
  int64_t chunks = 1;        // tiles per sample
  int64_t chunk_len = 1;     // elements per tile (the last tile of a sample may be shorter)
  int tile_threads = 1;      // threads per tile: 1, 2, ..., 32 or kGroupedMseBlockThreads
  int vector_width = 1;      // elements per vector access (1: scalar path)
  int64_t num_tiles = 1;     // batch * chunks (= number of partial sums)
  int64_t num_blocks = 1;
};

// Plans the tiling for B samples of N elements. The vector path (128-bit loads and stores) is
// chosen when every pointer in `pointers` is 16-byte aligned and N is a multiple of the widest
// vector width of the two dtypes.
GroupedMsePlan grouped_mse_plan(int64_t batch, int64_t per_sample, DType pred_dtype,
                                DType target_dtype, const void* const* pointers, int num_pointers,
                                int num_sms);

struct GroupedMseForwardArgs {
  const void* pred;
  DType pred_dtype;
  const void* target;
  DType target_dtype;
  const void* groups;
  IndexType groups_dtype;
  const void* weight;  // nullptr: no weights
  DType weight_dtype;
  int64_t batch;
  int64_t per_sample;
  int64_t num_groups;
  // Outputs: float when neither input is F64, double otherwise.
  void* group_loss;        // (K,)
  void* sample_mse;        // (B,)
  int64_t* group_count;    // (K,)
  double* partials;        // scratch, plan.num_tiles entries
  unsigned int* ticket;    // one zero-initialised counter, private to the stream
};

struct GroupedMseBackwardArgs {
  const void* grad_group;      // (K,), accumulation type (float, or double with F64 inputs)
  int64_t grad_group_stride;   // in elements; 0 for an expanded gradient (e.g. from loss.sum())
  const void* grad_sample;     // (B,) accumulation type, or nullptr
  int64_t grad_sample_stride;
  const void* pred;
  DType pred_dtype;
  const void* target;
  DType target_dtype;
  const void* groups;
  IndexType groups_dtype;
  const int64_t* group_count;
  const void* weight;  // nullptr: no weights
  DType weight_dtype;
  int64_t batch;
  int64_t per_sample;
  int64_t num_groups;
  void* grad_pred;    // pred's dtype, (B, N)
  void* grad_target;  // target's dtype, (B, N), or nullptr
};

// Each launches exactly one kernel on `stream` and returns cudaGetLastError().
cudaError_t grouped_mse_forward(const GroupedMseForwardArgs& args, const GroupedMsePlan& plan,
                                cudaStream_t stream);
cudaError_t grouped_mse_backward(const GroupedMseBackwardArgs& args, const GroupedMsePlan& plan,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace ant_core
