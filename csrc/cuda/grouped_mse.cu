// CUDA kernels of ant_core::grouped_mse (see grouped_mse.h for the design). No ATen here.
#include "cuda/grouped_mse.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ant_core {
namespace cuda {
namespace {

constexpr int kThreads = kGroupedMseBlockThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;            // vector accesses in flight per thread
constexpr int kBlocksPerSm = 2048 / kThreads;
constexpr int64_t kMinUnitsPerTile = int64_t{kThreads} * 4;    // >= 4 vector units per thread
constexpr int64_t kMaxUnitsPerTile = int64_t{kThreads} * 64;   // bounds each thread's fp32 sum
constexpr int64_t kMaxSubWarpUnits = 32 * 16;                  // samples up to this use <= a warp

// ---- scalar types ------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename TP, typename TT>
using AccType = std::conditional_t<std::is_same_v<TP, double> || std::is_same_v<TT, double>,
                                   double, float>;

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<Acc>(__half2float(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<Acc>(__bfloat162float(v));
  } else {
    return static_cast<Acc>(v);
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  if constexpr (std::is_same_v<T, __half>) {
    if constexpr (std::is_same_v<Acc, double>) {
      return __double2half(v);
    } else {
      return __float2half_rn(v);
    }
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if constexpr (std::is_same_v<Acc, double>) {
      return __double2bfloat16(v);
    } else {
      return __float2bfloat16_rn(v);
    }
  } else {
    return static_cast<T>(v);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc quiet_nan() {
  if constexpr (std::is_same_v<Acc, double>) {
    return __longlong_as_double(0x7ff8000000000000LL);
  } else {
    return __int_as_float(0x7fc00000);
  }
}

// V consecutive elements; one or more 128-bit accesses when V > 1 (alignment 16, never more:
// the pointers are only known to be 16-byte aligned).
template <typename T, int V>
struct alignas(V * sizeof(T) >= 16 ? 16 : V * sizeof(T)) Pack {
  T v[V];
};

// Vector width (elements) that makes the narrower of the two dtypes one 128-bit access.
template <typename TP, typename TT>
constexpr int vector_width() {
  return 16 / static_cast<int>(sizeof(TP) < sizeof(TT) ? sizeof(TP) : sizeof(TT));
}

__device__ __forceinline__ int64_t load_group(const void* groups, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<int64_t>(static_cast<const long long*>(groups)[i])
                  : static_cast<int64_t>(static_cast<const int*>(groups)[i]);
}

__device__ __forceinline__ double load_weight(const void* weight, DType dtype, int64_t i) {
  if (weight == nullptr) return 1.0;
  switch (dtype) {
    case DType::F16:
      return static_cast<double>(__half2float(static_cast<const __half*>(weight)[i]));
    case DType::BF16:
      return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(weight)[i]));
    case DType::F64:
      return static_cast<const double*>(weight)[i];
    default:
      return static_cast<double>(static_cast<const float*>(weight)[i]);
  }
}

// Sum over the `width` lanes of an aligned sub-warp (width a power of two <= 32). Every lane of
// the warp must call it. Fixed shuffle pattern: deterministic.
template <typename T>
__device__ __forceinline__ T subwarp_sum(T v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// ---- tiles --------------------------------------------------------------------------------------
struct Tile {
  int64_t index;   // tile number, >= num_tiles for idle threads
  int lane;        // thread within the tile
  int64_t sample;
  int64_t begin;   // element range [begin, end) within the sample
  int64_t end;
};

__device__ __forceinline__ Tile locate_tile(int tile_threads, int64_t chunks, int64_t chunk_len,
                                            int64_t per_sample) {
  Tile t;
  t.index = static_cast<int64_t>(blockIdx.x) * (kThreads / tile_threads) +
            threadIdx.x / tile_threads;
  t.lane = threadIdx.x & (tile_threads - 1);
  t.sample = chunks == 1 ? t.index : t.index / chunks;  // skip the 64-bit division if we can
  t.begin = (t.index - t.sample * chunks) * chunk_len;
  t.end = min(t.begin + chunk_len, per_sample);
  return t;
}

// Kernel parameters: the launcher's arguments plus the plan's tiling (passed by value).
struct Tiling {
  bool groups_int64;
  int64_t chunks, chunk_len, num_tiles;
  int tile_threads;
  Tiling(IndexType groups_dtype, const GroupedMsePlan& plan)
      : groups_int64(groups_dtype == IndexType::I64), chunks(plan.chunks),
        chunk_len(plan.chunk_len), num_tiles(plan.num_tiles), tile_threads(plan.tile_threads) {}
};

struct ForwardParams : GroupedMseForwardArgs, Tiling {
  ForwardParams(const GroupedMseForwardArgs& a, const GroupedMsePlan& plan)
      : GroupedMseForwardArgs(a), Tiling(a.groups_dtype, plan) {}
};

// Sum of squared differences over this thread's share of a tile: vector units first, first +
// stride, ... below last.
template <typename TP, typename TT, typename Acc, int V>
__device__ __forceinline__ Acc thread_square_sum(const TP* __restrict__ pred,
                                                 const TT* __restrict__ target, int64_t first,
                                                 int64_t last, int stride) {
  using PP = Pack<TP, V>;
  using PT = Pack<TT, V>;
  const PP* p = reinterpret_cast<const PP*>(pred);
  const PT* t = reinterpret_cast<const PT*>(target);
  Acc acc[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) acc[u] = Acc(0);
  int64_t v = first;
  for (; v + (kUnroll - 1) * int64_t{stride} < last; v += kUnroll * int64_t{stride}) {
    PP pv[kUnroll];
    PT tv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pv[u] = p[v + u * stride];
      tv[u] = t[v + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const Acc d = to_acc<Acc>(pv[u].v[j]) - to_acc<Acc>(tv[u].v[j]);
        acc[u] += d * d;
      }
    }
  }
  for (; v < last; v += stride) {
    const PP pv = p[v];
    const PT tv = t[v];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Acc d = to_acc<Acc>(pv.v[j]) - to_acc<Acc>(tv.v[j]);
      acc[0] += d * d;
    }
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Run by the last block only: partials -> sample_mse -> group_loss / group_count; resets ticket.
template <typename Acc>
__device__ __forceinline__ void finalize_groups(const ForwardParams& prm) {
  Acc* sample_mse = static_cast<Acc*>(prm.sample_mse);
  Acc* group_loss = static_cast<Acc*>(prm.group_loss);
  const double inv_n = 1.0 / static_cast<double>(prm.per_sample);
  bool bad = false;
  for (int64_t i = threadIdx.x; i < prm.batch; i += kThreads) {
    const double* part = prm.partials + i * prm.chunks;
    double s = 0.0;
    for (int64_t c = 0; c < prm.chunks; ++c) s += __ldcg(part + c);  // L2: written by other SMs
    sample_mse[i] = static_cast<Acc>(s * inv_n);
    const int64_t g = load_group(prm.groups, prm.groups_int64, i);
    bad |= (g < 0 || g >= prm.num_groups);
  }
  bad = __syncthreads_or(bad);  // also publishes sample_mse to the whole block
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t k = warp; k < prm.num_groups; k += kWarps) {
    double sum = 0.0;
    long long count = 0;
    for (int64_t i = lane; i < prm.batch; i += 32) {
      if (load_group(prm.groups, prm.groups_int64, i) == k) {
        sum += load_weight(prm.weight, prm.weight_dtype, i) * static_cast<double>(sample_mse[i]);
        ++count;
      }
    }
    sum = subwarp_sum(sum, 32);
    count = subwarp_sum(count, 32);
    if (lane == 0) {
      prm.group_count[k] = count;
      const Acc mean = count > 0 ? static_cast<Acc>(sum / static_cast<double>(count)) : Acc(0);
      group_loss[k] = bad ? quiet_nan<Acc>() : mean;
    }
  }
  if (threadIdx.x == 0) *prm.ticket = 0u;  // every other block has taken its ticket already
}

template <typename TP, typename TT, int V>
__global__ void __launch_bounds__(kThreads) grouped_mse_forward_kernel(ForwardParams prm) {
  using Acc = AccType<TP, TT>;
  const int width = prm.tile_threads;
  const Tile tile = locate_tile(width, prm.chunks, prm.chunk_len, prm.per_sample);
  const bool active = tile.index < prm.num_tiles;

  Acc local = Acc(0);
  if (active) {
    const int64_t base = tile.sample * prm.per_sample;
    local = thread_square_sum<TP, TT, Acc, V>(static_cast<const TP*>(prm.pred) + base,
                                              static_cast<const TT*>(prm.target) + base,
                                              tile.begin / V + tile.lane, tile.end / V, width);
  }
  // Reduce the tile's threads in double (all threads take part: the shuffles need full warps).
  double sum = static_cast<double>(local);
  __shared__ double warp_sums[kWarps];
  if (width <= 32) {
    sum = subwarp_sum(sum, width);
  } else {
    sum = subwarp_sum(sum, 32);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      sum = 0.0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_sums[w];
    }
  }
  if (active && tile.lane == 0) {
    prm.partials[tile.index] = sum;
    __threadfence();  // the partial is visible device-wide before this block takes its ticket
  }

  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int taken = atomicAdd(prm.ticket, 1u);
    is_last = (taken == gridDim.x - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  finalize_groups<Acc>(prm);
}

struct BackwardParams : GroupedMseBackwardArgs, Tiling {
  BackwardParams(const GroupedMseBackwardArgs& a, const GroupedMsePlan& plan)
      : GroupedMseBackwardArgs(a), Tiling(a.groups_dtype, plan) {}
};

template <typename Acc>
__device__ __forceinline__ Acc sample_coefficient(const BackwardParams& prm, int64_t sample) {
  const int64_t g = load_group(prm.groups, prm.groups_int64, sample);
  if (g < 0 || g >= prm.num_groups) return quiet_nan<Acc>();  // never an out-of-bounds read
  const Acc* grad_group = static_cast<const Acc*>(prm.grad_group);
  double c = static_cast<double>(grad_group[g * prm.grad_group_stride]) /
             static_cast<double>(prm.group_count[g]);
  c *= load_weight(prm.weight, prm.weight_dtype, sample);
  if (prm.grad_sample != nullptr) {
    const Acc* grad_sample = static_cast<const Acc*>(prm.grad_sample);
    c += static_cast<double>(grad_sample[sample * prm.grad_sample_stride]);
  }
  return static_cast<Acc>(2.0 / static_cast<double>(prm.per_sample) * c);
}

template <typename TP, typename TT, int V, bool kGradTarget>
__global__ void __launch_bounds__(kThreads) grouped_mse_backward_kernel(BackwardParams prm) {
  using Acc = AccType<TP, TT>;
  using PP = Pack<TP, V>;
  using PT = Pack<TT, V>;
  const int stride = prm.tile_threads;
  const Tile tile = locate_tile(stride, prm.chunks, prm.chunk_len, prm.per_sample);
  if (tile.index >= prm.num_tiles) return;
  const Acc coef = sample_coefficient<Acc>(prm, tile.sample);

  const int64_t base = tile.sample * prm.per_sample;
  const PP* __restrict__ p = reinterpret_cast<const PP*>(static_cast<const TP*>(prm.pred) + base);
  const PT* __restrict__ t = reinterpret_cast<const PT*>(static_cast<const TT*>(prm.target) + base);
  PP* __restrict__ gp = reinterpret_cast<PP*>(static_cast<TP*>(prm.grad_pred) + base);
  PT* __restrict__ gt =
      kGradTarget ? reinterpret_cast<PT*>(static_cast<TT*>(prm.grad_target) + base) : nullptr;

  auto apply = [&](const PP& pv, const PT& tv, int64_t v) {
    PP gpv;
    PT gtv;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Acc g = coef * (to_acc<Acc>(pv.v[j]) - to_acc<Acc>(tv.v[j]));
      gpv.v[j] = from_acc<TP>(g);
      if constexpr (kGradTarget) gtv.v[j] = from_acc<TT>(-g);
    }
    gp[v] = gpv;
    if constexpr (kGradTarget) gt[v] = gtv;
  };

  const int64_t last = tile.end / V;
  int64_t v = tile.begin / V + tile.lane;
  for (; v + (kUnroll - 1) * int64_t{stride} < last; v += kUnroll * int64_t{stride}) {
    PP pv[kUnroll];
    PT tv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pv[u] = p[v + u * stride];
      tv[u] = t[v + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) apply(pv[u], tv[u], v + u * stride);
  }
  for (; v < last; v += stride) apply(p[v], t[v], v);
}

// ---- host side ----------------------------------------------------------------------------------
int dtype_size(DType d) {
  switch (d) {
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::F64:
      return 8;
    default:
      return 4;
  }
}

template <typename F>
void dispatch_one(DType d, F&& f) {
  switch (d) {
    case DType::F16:
      f(TypeTag<__half>{});
      break;
    case DType::BF16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    case DType::F64:
      f(TypeTag<double>{});
      break;
    default:
      f(TypeTag<float>{});
      break;
  }
}

// Calls f(TypeTag<TP>{}, TypeTag<TT>{}) for the dtypes of pred and target.
template <typename F>
void dispatch_pair(DType pred, DType target, F&& f) {
  dispatch_one(pred, [&](auto tp) { dispatch_one(target, [&](auto tt) { f(tp, tt); }); });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

GroupedMsePlan grouped_mse_plan(int64_t batch, int64_t per_sample, DType pred_dtype,
                                DType target_dtype, const void* const* pointers, int num_pointers,
                                int num_sms) {
  GroupedMsePlan plan;
  const int vec = 16 / std::min(dtype_size(pred_dtype), dtype_size(target_dtype));
  bool aligned = per_sample % vec == 0;
  for (int i = 0; i < num_pointers; ++i) {
    if (pointers[i] != nullptr && reinterpret_cast<uintptr_t>(pointers[i]) % 16 != 0) {
      aligned = false;
    }
  }
  plan.vector_width = aligned ? vec : 1;
  const int64_t units = per_sample / plan.vector_width;  // vector accesses per sample
  if (units <= kMaxSubWarpUnits) {
    // Small samples: a power-of-two group of <= 32 threads per sample, several per block.
    int width = 1;
    while (width < 32 && width * int64_t{4} < units) width *= 2;
    plan.tile_threads = width;
    plan.chunks = 1;
  } else {
    // Large samples: a block per (sample, chunk); enough chunks to fill the GPU, each chunk
    // neither tiny (>= 4 accesses per thread) nor long (<= 64 per thread, for fp32 accuracy).
    plan.tile_threads = kThreads;
    const int64_t target_blocks = int64_t{std::max(num_sms, 1)} * kBlocksPerSm;
    int64_t chunks = std::min(ceil_div(target_blocks, batch), ceil_div(units, kMinUnitsPerTile));
    chunks = std::max({chunks, ceil_div(units, kMaxUnitsPerTile), int64_t{1}});
    plan.chunks = ceil_div(units, ceil_div(units, chunks));
  }
  const int64_t chunk_units = ceil_div(units, plan.chunks);
  plan.chunk_len = chunk_units * plan.vector_width;
  plan.num_tiles = batch * plan.chunks;
  plan.num_blocks = ceil_div(plan.num_tiles, kThreads / plan.tile_threads);
  return plan;
}

cudaError_t grouped_mse_forward(const GroupedMseForwardArgs& a, const GroupedMsePlan& plan,
                                cudaStream_t stream) {
  const ForwardParams prm(a, plan);
  if (plan.num_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(plan.num_blocks));
  dispatch_pair(a.pred_dtype, a.target_dtype, [&](auto tp, auto tt) {
    using TP = typename decltype(tp)::type;
    using TT = typename decltype(tt)::type;
    constexpr int kVec = vector_width<TP, TT>();
    if (plan.vector_width == kVec) {
      grouped_mse_forward_kernel<TP, TT, kVec><<<grid, kThreads, 0, stream>>>(prm);
    } else {
      grouped_mse_forward_kernel<TP, TT, 1><<<grid, kThreads, 0, stream>>>(prm);
    }
  });
  return cudaGetLastError();
}

cudaError_t grouped_mse_backward(const GroupedMseBackwardArgs& a, const GroupedMsePlan& plan,
                                 cudaStream_t stream) {
  const BackwardParams prm(a, plan);
  if (plan.num_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(plan.num_blocks));
  const bool grad_target = a.grad_target != nullptr;
  dispatch_pair(a.pred_dtype, a.target_dtype, [&](auto tp, auto tt) {
    using TP = typename decltype(tp)::type;
    using TT = typename decltype(tt)::type;
    constexpr int kVec = vector_width<TP, TT>();
    if (plan.vector_width == kVec) {
      if (grad_target) {
        grouped_mse_backward_kernel<TP, TT, kVec, true><<<grid, kThreads, 0, stream>>>(prm);
      } else {
        grouped_mse_backward_kernel<TP, TT, kVec, false><<<grid, kThreads, 0, stream>>>(prm);
      }
    } else if (grad_target) {
      grouped_mse_backward_kernel<TP, TT, 1, true><<<grid, kThreads, 0, stream>>>(prm);
    } else {
      grouped_mse_backward_kernel<TP, TT, 1, false><<<grid, kThreads, 0, stream>>>(prm);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ant_core
