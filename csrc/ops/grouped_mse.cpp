// ant_core::grouped_mse and ant_core::grouped_mse_backward: input checks (shared with the CUDA
// glue in grouped_mse_cuda.cpp) and the CPU kernels.
//
// Work is split into (sample, chunk) tiles of kChunk elements, so a batch of a few huge samples
// still uses every thread. A tile is summed in the accumulation type (float; double for float64
// inputs) with kLanes independent accumulators (explicit 8-lane vectors for float), and the tile
// sums are combined in double in a fixed order: the result does not depend on the thread count.
// The backward is one pass per tile writing grad_pred (and grad_target), each value rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// The 32-byte vector types below are only passed between always-inlined functions, so GCC's
// note that their ABI depends on AVX does not apply (it is emitted at the end of the file, so
// it cannot be silenced around the functions alone).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace ant_core {
namespace grouped_mse_detail {

namespace {

bool is_floating(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

}  // namespace

// The accumulation type of a (pred, target) dtype pair, as a C++ type and as a ScalarType:
// float64 when pred or target is float64, float32 otherwise.
template <typename TP, typename TT>
using AccType = std::conditional_t<std::is_same_v<TP, double> || std::is_same_v<TT, double>,
                                   double, float>;

at::ScalarType accumulate_type(const at::Tensor& pred, const at::Tensor& target) {
  return (pred.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble) ? at::kDouble
                                                                                    : at::kFloat;
}

// Checks shared by the CPU and CUDA forward kernels. Group ids are range-checked separately
// (on the host for CPU; on the device, with NaN poisoning, for CUDA).
void check_forward_inputs(const at::Tensor& pred, const at::Tensor& target,
                          const at::Tensor& groups, int64_t num_groups,
                          const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(num_groups >= 1, "grouped_mse: num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK_TYPE(is_floating(pred),
                   "grouped_mse: pred must be a floating-point tensor (float32, float16, "
                   "bfloat16 or float64), got ",
                   pred.scalar_type());
  TORCH_CHECK_TYPE(is_floating(target),
                   "grouped_mse: target must be a floating-point tensor (float32, float16, "
                   "bfloat16 or float64), got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() >= 1 && pred.size(0) >= 1,
                    "grouped_mse: pred must have shape (B, ...) with B >= 1, got ", pred.sizes());
  TORCH_CHECK_VALUE(pred.sizes() == target.sizes(),
                    "grouped_mse: target must have the shape of pred ", pred.sizes(), ", got ",
                    target.sizes());
  const int64_t batch = pred.size(0);
  TORCH_CHECK_VALUE(pred.numel() / batch >= 1,
                    "grouped_mse: pred must have at least one element per sample, got shape ",
                    pred.sizes());
  TORCH_CHECK_VALUE(target.device() == pred.device(), "grouped_mse: target is on ",
                    target.device(), " but pred is on ", pred.device());
  TORCH_CHECK_TYPE(groups.scalar_type() == at::kLong || groups.scalar_type() == at::kInt,
                   "grouped_mse: groups must be an int64 or int32 tensor, got ",
                   groups.scalar_type());
  TORCH_CHECK_VALUE(groups.dim() == 1 && groups.size(0) == batch,
                    "grouped_mse: groups must have shape (B,) = (", batch, ",), got ",
                    groups.sizes());
  TORCH_CHECK_VALUE(groups.device() == pred.device(), "grouped_mse: groups is on ",
                    groups.device(), " but pred is on ", pred.device());
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_TYPE(is_floating(w),
                     "grouped_mse: weight must be a floating-point tensor, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == batch,
                      "grouped_mse: weight must have shape (B,) = (", batch, ",), got ", w.sizes());
    TORCH_CHECK_VALUE(w.device() == pred.device(), "grouped_mse: weight is on ", w.device(),
                      " but pred is on ", pred.device());
  }
}

// Checks of the backward op's own arguments (pred/target/groups/weight via check_forward_inputs).
void check_backward_inputs(const at::Tensor& grad_group,
                           const std::optional<at::Tensor>& grad_sample,
                           const at::Tensor& pred, const at::Tensor& target,
                           const at::Tensor& groups, const at::Tensor& group_count,
                           const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(group_count.dim() == 1,
                    "grouped_mse_backward: group_count must have shape (K,), got ",
                    group_count.sizes());
  const int64_t num_groups = group_count.size(0);
  check_forward_inputs(pred, target, groups, num_groups, weight);
  TORCH_CHECK_TYPE(group_count.scalar_type() == at::kLong,
                   "grouped_mse_backward: group_count must be int64, got ",
                   group_count.scalar_type());
  TORCH_CHECK_VALUE(group_count.device() == pred.device(),
                    "grouped_mse_backward: group_count is on ", group_count.device(),
                    " but pred is on ", pred.device());
  TORCH_CHECK_TYPE(is_floating(grad_group),
                   "grouped_mse_backward: grad_group must be a floating-point tensor, got ",
                   grad_group.scalar_type());
  TORCH_CHECK_VALUE(grad_group.dim() == 1 && grad_group.size(0) == num_groups,
                    "grouped_mse_backward: grad_group must have shape (K,) = (", num_groups,
                    ",), got ", grad_group.sizes());
  TORCH_CHECK_VALUE(grad_group.device() == pred.device(), "grouped_mse_backward: grad_group is on ",
                    grad_group.device(), " but pred is on ", pred.device());
  if (grad_sample.has_value()) {
    const at::Tensor& gs = *grad_sample;
    TORCH_CHECK_TYPE(is_floating(gs),
                     "grouped_mse_backward: grad_sample must be a floating-point tensor, got ",
                     gs.scalar_type());
    TORCH_CHECK_VALUE(gs.dim() == 1 && gs.size(0) == pred.size(0),
                      "grouped_mse_backward: grad_sample must have shape (B,) = (", pred.size(0),
                      ",), got ", gs.sizes());
    TORCH_CHECK_VALUE(gs.device() == pred.device(), "grouped_mse_backward: grad_sample is on ",
                      gs.device(), " but pred is on ", pred.device());
  }
}

}  // namespace grouped_mse_detail

namespace {

using grouped_mse_detail::accumulate_type;
using grouped_mse_detail::AccType;

// The per-tile loops are compiled twice on x86-64 Linux (AVX2 and the baseline ISA) and the
// loader picks one for the CPU at hand. Both compute the same lanes in the same order (no FMA
// contraction: the AVX2 clone does not enable FMA), so results do not depend on the clone.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define ANT_CPU_CLONES __attribute__((target_clones("avx2", "default"), noinline))
#else
#define ANT_CPU_CLONES __attribute__((noinline))
#endif

constexpr int64_t kChunk = 4096;  // elements per tile (a multiple of kLanes)
constexpr int kLanes = 16;        // independent accumulators per tile
constexpr int64_t kGrainElements = 1 << 15;

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// IEEE binary16 -> binary32 with integer masks only (no branches, no denormal arithmetic), so the
// loops around it vectorize; exact for all 65536 inputs (subnormals, inf and NaN included).
inline float half_to_float(uint16_t h) {
  const int32_t em = h & 0x7fff;  // exponent and mantissa
  const uint32_t normal = (static_cast<uint32_t>(em) << 13) + ((127u - 15u) << 23);
  const uint32_t subnormal = float_to_bits(bits_to_float(0x3f000000u | em) - 0.5f);  // em * 2^-24
  const uint32_t special = (static_cast<uint32_t>(em) << 13) | 0x7f800000u;          // inf, NaN
  const uint32_t is_subnormal = static_cast<uint32_t>((em - 0x0400) >> 31);          // all ones
  const uint32_t is_special = ~static_cast<uint32_t>((em - 0x7c00) >> 31);
  uint32_t bits = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  bits = (special & is_special) | (bits & ~is_special);
  return bits_to_float(bits | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// Element loads in the accumulation type; the 16-bit formats are widened with integer operations
// so that the loops stay vectorizable.
template <typename Acc, typename T>
inline Acc load(const T* p) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<Acc>(bits_to_float(static_cast<uint32_t>(p->x) << 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<Acc>(half_to_float(p->x));
  } else {
    return static_cast<Acc>(*p);
  }
}

// binary32 -> binary16, round to nearest even, with integer masks only (vectorizable); agrees
// with c10::Half(float) bit for bit (NaN becomes the quiet NaN 0x7e00).
inline uint16_t float_to_half(float f) {
  const uint32_t x = float_to_bits(f);
  const int32_t ax = static_cast<int32_t>(x & 0x7fffffffu);
  const uint32_t normal = (static_cast<uint32_t>(ax) - 0x38000000u + 0x0fffu +
                           ((static_cast<uint32_t>(ax) >> 13) & 1u)) >> 13;
  // |f| < 2^-14: adding 0.5 rounds to a multiple of 2^-24, the half subnormal spacing.
  const uint32_t subnormal =
      float_to_bits(bits_to_float(static_cast<uint32_t>(ax)) + 0.5f) - 0x3f000000u;
  const uint32_t is_subnormal = static_cast<uint32_t>((ax - 0x38800000) >> 31);
  const uint32_t is_overflow = ~static_cast<uint32_t>((ax - 0x47800000) >> 31);
  const uint32_t is_nan = static_cast<uint32_t>((0x7f800000 - ax) >> 31);
  uint32_t h = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  h = (0x7c00u & is_overflow) | (h & ~is_overflow);
  h = (0x7e00u & is_nan) | (h & ~is_nan);
  return static_cast<uint16_t>(h | ((x >> 16) & 0x8000u));
}

template <typename T, typename Acc>
inline T store(Acc v) {
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<Acc, float>) {
    T out;
    out.x = float_to_half(v);
    return out;
  } else {
    return static_cast<T>(v);
  }
}

// Eight float lanes (GCC/Clang vector extensions: two SSE registers in the baseline clone, one
// AVX register in the AVX2 clone). Explicit vectors, because the auto-vectorizer handled the
// 16-bit formats erratically (up to 3x slower depending on inlining and dtype pair).
using f32x8 = float __attribute__((vector_size(32)));
using u32x8 = uint32_t __attribute__((vector_size(32)));
using i32x8 = int32_t __attribute__((vector_size(32)));
using u16x8 = uint16_t __attribute__((vector_size(16)));

// Always inlined: an out-of-line vector function would have a different ABI in the two clones
// (GCC's -Wpsabi note about it is silenced at the top of this file).
template <typename T>
__attribute__((always_inline)) inline f32x8 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    f32x8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else {
    u16x8 raw;
    std::memcpy(&raw, p, sizeof(raw));
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return reinterpret_cast<f32x8>(__builtin_convertvector(raw, u32x8) << 16);
    } else {  // c10::Half: half_to_float on eight lanes
      const i32x8 em = __builtin_convertvector(raw & 0x7fff, i32x8);
      const u32x8 shifted = reinterpret_cast<u32x8>(em) << 13;
      const u32x8 normal = shifted + ((127u - 15u) << 23);
      const u32x8 subnormal = reinterpret_cast<u32x8>(
          reinterpret_cast<f32x8>(reinterpret_cast<u32x8>(em) | 0x3f000000u) - 0.5f);
      const u32x8 special = shifted | 0x7f800000u;
      const u32x8 is_subnormal = reinterpret_cast<u32x8>(em < 0x0400);
      const u32x8 is_special = reinterpret_cast<u32x8>(em >= 0x7c00);
      u32x8 bits = (subnormal & is_subnormal) | (normal & ~is_subnormal);
      bits = (special & is_special) | (bits & ~is_special);
      const u32x8 sign = __builtin_convertvector(raw & 0x8000, u32x8) << 16;
      return reinterpret_cast<f32x8>(bits | sign);
    }
  }
}

// Sum of squared differences of n elements: kLanes accumulators in Acc, combined in double in a
// fixed order. Out of line (and cloned) on purpose.
template <typename TP, typename TT, typename Acc>
ANT_CPU_CLONES double tile_square_sum(const TP* p, const TT* t, int64_t n) {
  int64_t j = 0;
  double total = 0.0;
  if constexpr (std::is_same_v<Acc, float>) {
    static_assert(kLanes == 16, "two vectors of eight lanes");
    f32x8 acc0 = {}, acc1 = {};
    for (; j + kLanes <= n; j += kLanes) {
      const f32x8 d0 = load8(p + j) - load8(t + j);
      const f32x8 d1 = load8(p + j + 8) - load8(t + j + 8);
      acc0 += d0 * d0;
      acc1 += d1 * d1;
    }
    for (int a = 0; a < 8; ++a) total += static_cast<double>(acc0[a]);
    for (int a = 0; a < 8; ++a) total += static_cast<double>(acc1[a]);
  } else {  // float64 (rare): kLanes double accumulators, left to the auto-vectorizer
    double acc[kLanes] = {};
    for (; j + kLanes <= n; j += kLanes) {
      for (int a = 0; a < kLanes; ++a) {
        const double d = load<double>(p + j + a) - load<double>(t + j + a);
        acc[a] += d * d;
      }
    }
    for (int a = 0; a < kLanes; ++a) total += acc[a];
  }
  Acc tail = Acc(0);
  for (; j < n; ++j) {
    const Acc d = load<Acc>(p + j) - load<Acc>(t + j);
    tail += d * d;
  }
  return total + static_cast<double>(tail);
}

// grad_pred = c * (pred - target) and grad_target = -grad_pred (when gt is not null) for n
// elements, each rounded once to its own dtype.
template <typename TP, typename TT, typename Acc>
ANT_CPU_CLONES void tile_backward(const TP* __restrict__ p, const TT* __restrict__ t,
                                  TP* __restrict__ gp, TT* __restrict__ gt, int64_t n, Acc c) {
  if (gt != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const Acc v = c * (load<Acc>(p + j) - load<Acc>(t + j));
      gp[j] = store<TP>(v);
      gt[j] = store<TT>(-v);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) gp[j] = store<TP>(c * (load<Acc>(p + j) - load<Acc>(t + j)));
  }
}

// Host-side range check of the group ids (the CPU path raises; it never poisons).
void check_group_ids(const at::Tensor& groups, int64_t num_groups, const char* op) {
  AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "grouped_mse_check_groups", [&] {
    const index_t* g = groups.data_ptr<index_t>();
    for (int64_t i = 0; i < groups.numel(); ++i) {
      TORCH_CHECK_VALUE(g[i] >= 0 && static_cast<int64_t>(g[i]) < num_groups, op,
                        ": groups[", i, "] = ", static_cast<int64_t>(g[i]),
                        " is outside [0, num_groups) = [0, ", num_groups, ")");
    }
  });
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<TP>{}, TypeTag<TT>{}) for the scalar types of pred and target.
template <typename F>
void dispatch_pair(at::ScalarType pred_type, at::ScalarType target_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred_type, "grouped_mse_p", [&] {
    using TP = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_type, "grouped_mse_t", [&] {
      using TT = scalar_t;
      f(TypeTag<TP>{}, TypeTag<TT>{});
    });
  });
}

int64_t chunks_per_sample(int64_t per_sample) { return (per_sample + kChunk - 1) / kChunk; }

// Runs fn(tile, sample, offset, n) in parallel over the batch's tiles: sample-major pieces of at
// most kChunk elements (tile = sample * chunks_per_sample + chunk) starting at element offset.
template <typename F>
void for_each_tile(int64_t batch, int64_t per_sample, const F& fn) {
  const int64_t chunks = chunks_per_sample(per_sample);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(per_sample, kChunk));
  at::parallel_for(0, batch * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t sample = tile / chunks;
      const int64_t first = (tile % chunks) * kChunk;
      fn(tile, sample, sample * per_sample + first, std::min(kChunk, per_sample - first));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mse_cpu(
    const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& groups_in,
    int64_t num_groups, const std::optional<at::Tensor>& weight_in) {
  grouped_mse_detail::check_forward_inputs(pred_in, target_in, groups_in, num_groups, weight_in);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor groups = groups_in.to(at::kLong).contiguous();
  check_group_ids(groups, num_groups, "grouped_mse");

  const auto acc_type = accumulate_type(pred, target);
  const int64_t batch = pred.size(0);
  const int64_t per_sample = pred.numel() / batch;
  const int64_t chunks = chunks_per_sample(per_sample);

  std::vector<double> partial(static_cast<size_t>(batch * chunks));
  dispatch_pair(pred.scalar_type(), target.scalar_type(), [&](auto tp_tag, auto tt_tag) {
    using TP = typename decltype(tp_tag)::type;
    using TT = typename decltype(tt_tag)::type;
    using Acc = AccType<TP, TT>;
    const TP* p = pred.data_ptr<TP>();
    const TT* t = target.data_ptr<TT>();
    for_each_tile(batch, per_sample, [&](int64_t tile, int64_t, int64_t offset, int64_t n) {
      partial[tile] = tile_square_sum<TP, TT, Acc>(p + offset, t + offset, n);
    });
  });

  auto acc_options = pred.options().dtype(acc_type);
  at::Tensor sample_mse = at::empty({batch}, acc_options);
  at::Tensor group_loss = at::empty({num_groups}, acc_options);
  at::Tensor group_count = at::zeros({num_groups}, pred.options().dtype(at::kLong));

  std::vector<double> sample(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[i * chunks + c];
    sample[i] = s / static_cast<double>(per_sample);
  }
  std::vector<double> weights;
  if (weight_in.has_value()) {
    const at::Tensor w = weight_in->to(at::kDouble).contiguous();
    weights.assign(w.data_ptr<double>(), w.data_ptr<double>() + batch);
  }
  std::vector<double> group_sum(static_cast<size_t>(num_groups), 0.0);
  const int64_t* g = groups.data_ptr<int64_t>();
  int64_t* count = group_count.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "grouped_mse_cpu_groups", [&] {
    scalar_t* out_sample = sample_mse.data_ptr<scalar_t>();
    for (int64_t i = 0; i < batch; ++i) {
      // The group loss uses the per-sample value as returned (rounded to the output type).
      const scalar_t value = static_cast<scalar_t>(sample[i]);
      out_sample[i] = value;
      const double w = weights.empty() ? 1.0 : weights[i];
      group_sum[g[i]] += w * static_cast<double>(value);
      count[g[i]] += 1;
    }
    scalar_t* out_group = group_loss.data_ptr<scalar_t>();
    for (int64_t k = 0; k < num_groups; ++k) {
      out_group[k] = count[k] > 0
                         ? static_cast<scalar_t>(group_sum[k] / static_cast<double>(count[k]))
                         : scalar_t(0);
    }
  });
  return {group_loss, sample_mse, group_count};
}

// Per-sample backward coefficient: 2/N * (w_i * grad_group[g_i] / count[g_i] + grad_sample_i).
std::vector<double> sample_coefficients(const at::Tensor& grad_group,
                                        const std::optional<at::Tensor>& grad_sample,
                                        const at::Tensor& groups, const at::Tensor& group_count,
                                        const std::optional<at::Tensor>& weight, int64_t batch,
                                        int64_t per_sample) {
  const at::Tensor gg = grad_group.to(at::kDouble).contiguous();
  const at::Tensor count = group_count.contiguous();
  const double* gg_p = gg.data_ptr<double>();
  const int64_t* count_p = count.data_ptr<int64_t>();
  const int64_t* g = groups.data_ptr<int64_t>();
  at::Tensor gs, w;
  if (grad_sample.has_value()) gs = grad_sample->to(at::kDouble).contiguous();
  if (weight.has_value()) w = weight->to(at::kDouble).contiguous();
  std::vector<double> coef(static_cast<size_t>(batch));
  const double scale = 2.0 / static_cast<double>(per_sample);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t n = count_p[g[i]];
    TORCH_CHECK_VALUE(n > 0, "grouped_mse_backward: group_count[", g[i], "] is ", n,
                      " but sample ", i, " belongs to that group");
    double c = gg_p[g[i]] / static_cast<double>(n);
    if (w.defined()) c *= w.data_ptr<double>()[i];
    if (gs.defined()) c += gs.data_ptr<double>()[i];
    coef[i] = scale * c;
  }
  return coef;
}

std::tuple<at::Tensor, at::Tensor> grouped_mse_backward_cpu(
    const at::Tensor& grad_group, const std::optional<at::Tensor>& grad_sample,
    const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& groups_in,
    const at::Tensor& group_count, const std::optional<at::Tensor>& weight,
    bool need_grad_target) {
  grouped_mse_detail::check_backward_inputs(grad_group, grad_sample, pred_in, target_in,
                                            groups_in, group_count, weight);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor groups = groups_in.to(at::kLong).contiguous();
  check_group_ids(groups, group_count.size(0), "grouped_mse_backward");

  const int64_t batch = pred.size(0);
  const int64_t per_sample = pred.numel() / batch;
  const std::vector<double> coef =
      sample_coefficients(grad_group, grad_sample, groups, group_count, weight, batch, per_sample);

  at::Tensor grad_pred = at::empty(pred.sizes(), pred.options());
  at::Tensor grad_target = need_grad_target ? at::empty(target.sizes(), target.options())
                                            : at::empty({0}, target.options());
  dispatch_pair(pred.scalar_type(), target.scalar_type(), [&](auto tp_tag, auto tt_tag) {
    using TP = typename decltype(tp_tag)::type;
    using TT = typename decltype(tt_tag)::type;
    using Acc = AccType<TP, TT>;
    const TP* p = pred.data_ptr<TP>();
    const TT* t = target.data_ptr<TT>();
    TP* gp = grad_pred.data_ptr<TP>();
    TT* gt = need_grad_target ? grad_target.data_ptr<TT>() : nullptr;
    for_each_tile(batch, per_sample, [&](int64_t, int64_t sample, int64_t offset, int64_t n) {
      tile_backward<TP, TT, Acc>(p + offset, t + offset, gp + offset,
                                 gt != nullptr ? gt + offset : nullptr, n,
                                 static_cast<Acc>(coef[sample]));
    });
  });
  return {grad_pred, grad_target};
}

}  // namespace
}  // namespace ant_core

TORCH_LIBRARY_IMPL(ant_core, CPU, m) {
  m.impl("grouped_mse", &ant_core::grouped_mse_cpu);
  m.impl("grouped_mse_backward", &ant_core::grouped_mse_backward_cpu);
}
