// Exact interval clustering by dynamic programming.
//
// Split the positions [0, T) into K non-empty contiguous half-open intervals
// [b_0, b_1), [b_1, b_2), ..., [b_{K-1}, b_K) with b_0 = 0 and b_K = T, minimising
// the sum of the interval costs cost(b_k, b_{k+1}).
//
//   D[0][0] = 0,   D[k][i] = min_j  D[k-1][j] + cost(j, i)
//
// Two solvers share this recurrence:
//   * solve_exact: O(K * T * W) for interval widths W <= T, valid for any cost.
//   * solve_monge: divide and conquer over each layer, O(K * T log T) cost evaluations,
//     valid only when the cost satisfies the quadrangle (Monge) inequality
//     cost(a, c) + cost(b, d) <= cost(a, d) + cost(b, c) for a <= b < c <= d.
//
// Tie-breaking is the same in both and fully deterministic. Partitions are compared by the
// pair (cost, sum of squared interval sizes) lexicographically, so among equally good
// partitions the most balanced one wins (the `timestep` objective gives exactly uniform
// intervals when T is divisible by K); remaining ties keep the smallest split j for every
// (k, i) ("leftmost argmin"), i.e. the smallest boundaries compared from the last one backwards.
// The squared-size term is itself Monge, so the pair cost is Monge whenever the cost is, and
// for Monge costs the leftmost argmin is non-decreasing in i: solve_monge reproduces it exactly.
//
// Cost functors are callables `double operator()(int64_t j, int64_t i) const` returning the
// cost of the half-open interval [j, i), j < i. Header-only, C++17, no dependencies.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ant {

/// Optional per-interval size bounds; max_size == 0 means "no upper bound".
struct SizeBounds {
  int64_t min_size = 1;
  int64_t max_size = 0;
};

/// The optimal partition and what the DP learned on the way.
struct Partition {
  std::vector<int64_t> boundaries;  ///< K + 1 entries: 0 = b_0 < b_1 < ... < b_K = T.
  double cost = 0.0;                ///< Optimal objective for K intervals.
  std::vector<double> costs_by_k;   ///< Entry k - 1: optimum with k intervals (+inf if infeasible).
  bool fast_path = false;           ///< Whether solve_monge produced it.
};

enum class Method { Exact, Monge };

namespace detail {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// D[k][.] for one k: the optimal cost and, as tie-breaker, the optimal sum of squared sizes.
struct Layer {
  std::vector<double> value, balance;
  explicit Layer(int64_t n) : value(n, kInf), balance(n, kInf) {}
  void reset() {
    std::fill(value.begin(), value.end(), kInf);
    std::fill(balance.begin(), balance.end(), kInf);
  }
};

/// Validates (T, K, bounds) and returns the effective maximum size.
inline int64_t checked_max_size(int64_t T, int64_t K, const SizeBounds& b) {
  if (T < 1) throw std::invalid_argument("T must be >= 1, got " + std::to_string(T));
  if (K < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(K));
  if (K > T)
    throw std::invalid_argument("k must be <= T (each interval needs a timestep), got k=" +
                                std::to_string(K) + " > T=" + std::to_string(T));
  if (b.min_size < 1)
    throw std::invalid_argument("min_size must be >= 1, got " + std::to_string(b.min_size));
  if (b.max_size < 0)
    throw std::invalid_argument("max_size must be >= 1 (or 0/None for no bound), got " +
                                std::to_string(b.max_size));
  if (b.min_size > T)
    throw std::invalid_argument("min_size must be <= T, got min_size=" +
                                std::to_string(b.min_size) + " > T=" + std::to_string(T));
  const int64_t mx = b.max_size == 0 ? T : std::min(b.max_size, T);
  if (mx < b.min_size)
    throw std::invalid_argument("max_size (" + std::to_string(b.max_size) +
                                ") must be >= min_size (" + std::to_string(b.min_size) + ")");
  // K * min_size > T or K * mx < T, by division: the products can overflow int64
  if (b.min_size > T / K || mx < T / K + (T % K != 0))
    throw std::invalid_argument(
        "infeasible size bounds: k=" + std::to_string(K) + " intervals of size in [min_size=" +
        std::to_string(b.min_size) + ", max_size=" + std::to_string(mx) +
        "] cannot cover T=" + std::to_string(T));
  return mx;
}

/// One DP layer, exact. prev = D[k-1][.], writes cur = D[k][.] and arg = argmin split.
/// Loop order j-outer / i-inner keeps memory access contiguous for matrix costs; candidates for
/// each i are visited in increasing j with a strict '<', so the leftmost argmin is kept.
template <class Cost>
void exact_layer(const Cost& cost, int64_t T, int64_t k, int64_t mn, int64_t mx,
                 const Layer& prev, Layer& cur, int32_t* arg) {
  const int64_t i_lo = k * mn, i_hi = std::min(T, k * mx);
  const int64_t j_lo_all = (k - 1) * mn, j_hi_all = std::min(T, (k - 1) * mx);
  double* cv = cur.value.data();
  double* cb = cur.balance.data();
  constexpr int64_t kBlock = 512;
  const int64_t n_blocks = (i_hi - i_lo + kBlock) / kBlock;
#ifdef _OPENMP
  // Threads only pay off for big layers (and spin badly on a busy machine for small ones).
  const bool parallel = (i_hi - i_lo) * std::min<int64_t>(mx, T) > (int64_t(1) << 24);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t b0 = i_lo + blk * kBlock, b1 = std::min(i_hi + 1, b0 + kBlock);
    for (int64_t i = b0; i < b1; ++i) {
      cv[i] = kInf;
      cb[i] = kInf;
      arg[i] = -1;
    }
    const int64_t j0 = std::max(j_lo_all, b0 - mx), j1 = std::min(j_hi_all, b1 - 1 - mn);
    for (int64_t j = j0; j <= j1; ++j) {
      const double pv = prev.value[j], pb = prev.balance[j];
      const int64_t s = std::max(b0, j + mn), e = std::min(b1 - 1, j + mx);
      const int32_t jj = static_cast<int32_t>(j);
      for (int64_t i = s; i <= e; ++i) {
        const double v = pv + cost(j, i);
        const double w = static_cast<double>(i - j);
        const double b = pb + w * w;
        const bool better = v < cv[i] || (v == cv[i] && b < cb[i]);
        cv[i] = better ? v : cv[i];
        cb[i] = better ? b : cb[i];
        arg[i] = better ? jj : arg[i];
      }
    }
  }
}

/// One DP layer for a Monge cost: divide and conquer on the monotone leftmost argmin.
template <class Cost>
void monge_layer(const Cost& cost, int64_t T, int64_t k, int64_t mn, int64_t mx,
                 const Layer& prev, Layer& cur, int32_t* arg) {
  const int64_t i_lo = k * mn, i_hi = std::min(T, k * mx);
  const int64_t j_lo_all = (k - 1) * mn, j_hi_all = std::min(T, (k - 1) * mx);
  struct Task {
    int64_t ilo, ihi, olo, ohi;
  };
  std::vector<Task> stack;
  stack.push_back({i_lo, i_hi, j_lo_all, j_hi_all});
  while (!stack.empty()) {
    const Task t = stack.back();
    stack.pop_back();
    if (t.ilo > t.ihi) continue;
    const int64_t mid = t.ilo + (t.ihi - t.ilo) / 2;
    // Feasible splits of `mid`, intersected with the range allowed by monotonicity.
    const int64_t flo = std::max(j_lo_all, mid - mx), fhi = std::min(j_hi_all, mid - mn);
    int64_t lo = std::max(t.olo, flo), hi = std::min(t.ohi, fhi);
    if (lo > hi) {  // cannot happen for a Monge cost; stay correct regardless
      lo = flo;
      hi = fhi;
    }
    double best = kInf, best_b = kInf;
    int64_t bj = lo;
    for (int64_t j = lo; j <= hi; ++j) {
      const double v = prev.value[j] + cost(j, mid);
      const double w = static_cast<double>(mid - j);
      const double b = prev.balance[j] + w * w;
      if (v < best || (v == best && b < best_b)) {
        best = v;
        best_b = b;
        bj = j;
      }
    }
    cur.value[mid] = best;
    cur.balance[mid] = best_b;
    arg[mid] = static_cast<int32_t>(bj);
    stack.push_back({t.ilo, mid - 1, t.olo, bj});
    stack.push_back({mid + 1, t.ihi, bj, t.ohi});
  }
}

/// Whether any interval cost is negative (O(T^2) evaluations; asked only after an overflow).
template <class Cost>
bool has_negative_cost(const Cost& cost, int64_t T) {
  for (int64_t j = 0; j < T; ++j)
    for (int64_t i = j + 1; i <= T; ++i)
      if (cost(j, i) < 0) return true;
  return false;
}

}  // namespace detail

/// Solves the interval clustering problem for every k <= K and returns the K-interval optimum.
/// Throws std::invalid_argument for K < 1, K > T, infeasible size bounds, an optimum that
/// overflows double precision, or partial sums that overflow where a negative cost could bring
/// them back (the DP would step around them and return a worse partition).
template <class Cost>
Partition solve(const Cost& cost, int64_t T, int64_t K, SizeBounds bounds = {},
                Method method = Method::Exact) {
  const int64_t mn = bounds.min_size;
  const int64_t mx = detail::checked_max_size(T, K, bounds);
  if (T > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("T is too large (must fit in int32)");

  detail::Layer prev(T + 1), cur(T + 1);
  std::vector<int32_t> arg(static_cast<size_t>(K) * (T + 1), -1);
  Partition out;
  out.costs_by_k.assign(K, detail::kInf);
  out.fast_path = method == Method::Monge;
  prev.value[0] = 0.0;
  prev.balance[0] = 0.0;
  int negative = -1;  // whether some cost is negative: -1 until asked
  for (int64_t k = 1; k <= K; ++k) {
    cur.reset();
    int32_t* a = arg.data() + static_cast<size_t>(k - 1) * (T + 1);
    if (method == Method::Monge)
      detail::monge_layer(cost, T, k, mn, mx, prev, cur, a);
    else
      detail::exact_layer(cost, T, k, mn, mx, prev, cur, a);
    // Every i in [k * mn, min(T, k * mx)] is reachable by k intervals, so a non-finite D[k][i]
    // means partial sums overflowed. A later layer could step around it unnoticed, and return
    // a worse partition, only where a negative cost could bring such a sum back.
    for (int64_t i = k * mn, e = std::min(T, k * mx); i <= e; ++i) {
      const double v = cur.value[i];
      if (!std::isfinite(v) && negative < 0 && v == detail::kInf)
        negative = detail::has_negative_cost(cost, T);  // once
      if (!std::isfinite(v) && (v != detail::kInf || negative == 1))
        throw std::invalid_argument("the interval costs overflow double precision (a sum of " +
                                    std::to_string(k) + " interval costs is " +
                                    std::to_string(v) + "); rescale them");
    }
    out.costs_by_k[k - 1] = cur.value[T];
    std::swap(prev, cur);
  }
  out.cost = out.costs_by_k[K - 1];
  // The size bounds are feasible, so a non-finite optimum means the costs overflowed.
  if (!std::isfinite(out.cost))
    throw std::invalid_argument("the interval costs overflow double precision (the optimum is " +
                                std::to_string(out.cost) + "); rescale them");
  out.boundaries.assign(K + 1, 0);
  out.boundaries[K] = T;
  for (int64_t k = K, i = T; k >= 1; --k) {
    i = arg[static_cast<size_t>(k - 1) * (T + 1) + i];
    if (i < 0) throw std::logic_error("interval DP: no split recorded on the optimal path");
    out.boundaries[k - 1] = i;
  }
  return out;
}

/// True when the matrix cost satisfies the quadrangle inequality on every adjacent quadruple
/// (which implies it for all a <= b < c <= d). Exact comparison, no tolerance.
template <class Cost>
bool is_monge(const Cost& cost, int64_t T) {
  for (int64_t j = 0; j + 2 <= T; ++j)
    for (int64_t i = j + 2; i + 1 <= T; ++i)
      if (cost(j, i) + cost(j + 1, i + 1) > cost(j, i + 1) + cost(j + 1, i)) return false;
  return true;
}

}  // namespace ant
