// Interval cost functors for ant::solve, each O(1) per interval after O(T) (or O(T^2) for
// matrices) preprocessing. All take the half-open interval [j, i), j < i.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ant {

inline void check_finite(const double* x, int64_t n, const char* name) {
  for (int64_t t = 0; t < n; ++t)
    if (!std::isfinite(x[t]))
      throw std::invalid_argument(std::string(name) + " must be finite; entry " +
                                  std::to_string(t) + " is " + std::to_string(x[t]));
}

/// Finite values can still overflow the sums a cost is computed from: every |sum| times
/// `headroom` (a bound on how the cost combines them) must stay finite.
inline void check_sums_finite(const std::vector<double>& sums, double headroom, const char* name) {
  for (double v : sums)
    if (!std::isfinite(v * headroom))
      throw std::invalid_argument(std::string(name) +
                                  ": too large, the interval costs overflow double precision; "
                                  "rescale");
}

/// A 1-D series for the series costs: finite and non-empty.
inline void check_series(const double* x, int64_t n) {
  check_finite(x, n, "values");
  if (n < 1) throw std::invalid_argument("values must not be empty");
}

/// Which intervals [j, i) of a series hold one repeated value. Their cost is exactly 0:
/// prefix-sum differences would leave a rounding residue of either sign, and equally good
/// partitions would no longer tie.
class ConstantRuns {
 public:
  ConstantRuns(const double* x, int64_t n) : run_end_(n + 1, n) {  // reads x only for n >= 2
    // run_end_[j]: the end of the run of equal values that covers j
    for (int64_t t = n - 2; t >= 0; --t) {
      run_end_[t] = x[t + 1] == x[t] ? run_end_[t + 1] : t + 1;
      has_runs_ = has_runs_ || run_end_[t] > t + 1;
    }
  }
  /// Runs longer than one value, looked up only if the series has any (the lookup costs 10-30%
  /// of the DP's time). One-value intervals are the cost's own business.
  bool constant(int64_t j, int64_t i) const { return has_runs_ && i <= run_end_[j]; }

 private:
  std::vector<int64_t> run_end_;
  bool has_runs_ = false;
};

/// +1 if non-decreasing, -1 if non-increasing (constant counts as non-decreasing), 0 otherwise.
inline int monotone_direction(const double* x, int64_t n) {
  bool up = true, down = true;
  for (int64_t t = 1; t < n; ++t) {
    up = up && x[t] >= x[t - 1];
    down = down && x[t] <= x[t - 1];
  }
  return up ? 1 : (down ? -1 : 0);
}

/// Sum of absolute deviations from the value at the interval's middle index
/// c = j + (i - 1 - j) / 2 (the paper's `timestep` and `snr` objectives). For a monotone series
/// this is the 1-D k-median cost, which satisfies the quadrangle inequality.
/// Requires a monotone series: only then is the cost O(1) from prefix sums.
///
/// With P the prefix sums of the (non-decreasing) series, the cost of [j, i) is
///   x_c (c - j) - (P[c] - P[j]) + (P[i] - P[c+1]) - x_c (i - 1 - c)
/// = P[i] + P[j] - G[i + j],   G[m] = P[c] + P[c+1] + (m even ? x_c : 0), c = (m - 1) / 2,
/// because 2c + 1 - i - j is 0 for odd i + j and -1 for even i + j. Indexing G by i + j keeps
/// the DP's inner loop (fixed j, increasing i) free of gathers, so it vectorises.
class AbsDeviationCost {
 public:
  AbsDeviationCost(const double* x, int64_t n)
      : prefix_(n + 1, 0.0), g_(2 * n + 1, 0.0), runs_(x, n) {
    check_series(x, n);
    const int dir = monotone_direction(x, n);
    if (dir == 0)
      throw std::invalid_argument(
          "values must be monotone for an absolute-deviation objective (timestep/snr/log_snr/"
          "abs); use objective='sse' or a cost_matrix for other series");
    // |.| is invariant under negation: make the series non-decreasing.
    auto value = [&](int64_t t) { return dir < 0 ? -x[t] : x[t]; };
    for (int64_t t = 0; t < n; ++t) prefix_[t + 1] = prefix_[t] + value(t);
    for (int64_t m = 1; m <= 2 * n - 1; ++m) {
      const int64_t c = (m - 1) / 2;
      g_[m] = prefix_[c] + prefix_[c + 1] + (m % 2 == 0 ? value(c) : 0.0);
    }
    check_sums_finite(prefix_, 8.0, "values");  // |G| <= 4 max |P|, the cost adds three terms
  }
  double operator()(int64_t j, int64_t i) const {
    const double cost = prefix_[i] + prefix_[j] - g_[i + j];
    return runs_.constant(j, i) ? 0.0 : std::max(cost, 0.0);  // one value: already exactly 0
  }

 private:
  std::vector<double> prefix_, g_;
  ConstantRuns runs_;
};

/// Within-interval sum of squared errors around the interval mean (1-D k-means cost). Monge
/// when the series is monotone; any series is accepted (the exact solver then applies).
class SquaredErrorCost {
 public:
  SquaredErrorCost(const double* x, int64_t n)
      : s1_(n + 1, 0.0), s2_(n + 1, 0.0), runs_(x, n) {
    check_series(x, n);
    // Shifting by a data point keeps the prefix sums well conditioned, and integer data
    // integer (so equal costs stay exactly equal and tie-breaking is not decided by rounding).
    const double shift = x[n / 2];
    for (int64_t t = 0; t < n; ++t) {
      const double v = x[t] - shift;
      s1_[t + 1] = s1_[t] + v;
      s2_[t + 1] = s2_[t] + v * v;
    }
    check_sums_finite(s2_, static_cast<double>(n), "values");  // s^2 <= (i - j) * sum v^2
  }
  double operator()(int64_t j, int64_t i) const {
    const double s = s1_[i] - s1_[j];
    const double sse = (s2_[i] - s2_[j]) - s * s / static_cast<double>(i - j);
    // One value: exactly 0 (s2 - s * s / 1 would round either way).
    return (i == j + 1 || runs_.constant(j, i)) ? 0.0 : std::max(sse, 0.0);
  }

 private:
  std::vector<double> s1_, s2_;
  ConstantRuns runs_;
};

/// A dense row-major T x T matrix C where C[l * T + r] is the cost of the inclusive interval
/// l..r (only l <= r is read). Does not own the memory.
class MatrixCost {
 public:
  MatrixCost(const double* c, int64_t T) : c_(c), T_(T) {}
  double operator()(int64_t j, int64_t i) const { return c_[j * T_ + (i - 1)]; }

 private:
  const double* c_;
  int64_t T_;
};

enum class AffinityCentre { Middle, Medoid, Average };

/// Turns a T x T affinity matrix A (higher = more alike) into a dense cost matrix
/// (row-major, C[l * T + r] for the inclusive interval l..r; the lower triangle is 0):
///   Middle:  -sum_{t in I} A[c, t],          c the middle index l + (r - l) / 2 (the paper)
///   Medoid:  -max_{c in I} sum_{t in I} A[c, t]   (best centre per interval; O(T^3 / 6))
///   Average: -(1 / |I|) sum_{s, t in I} A[s, t]   (average linkage, scaled like the others)
inline std::vector<double> affinity_cost_matrix(const double* A, int64_t T, AffinityCentre centre) {
  check_finite(A, T * T, "affinity");
  std::vector<double> C(static_cast<size_t>(T) * T, 0.0);
  if (centre == AffinityCentre::Average) {
    // 2-D prefix sums S[(a) * (T+1) + b] = sum_{s < a, t < b} A[s, t].
    std::vector<double> S(static_cast<size_t>(T + 1) * (T + 1), 0.0);
    for (int64_t s = 0; s < T; ++s)
      for (int64_t t = 0; t < T; ++t)
        S[(s + 1) * (T + 1) + t + 1] =
            A[s * T + t] + S[s * (T + 1) + t + 1] + S[(s + 1) * (T + 1) + t] - S[s * (T + 1) + t];
    for (int64_t l = 0; l < T; ++l)
      for (int64_t r = l; r < T; ++r) {
        const double block = S[(r + 1) * (T + 1) + r + 1] - S[l * (T + 1) + r + 1] -
                             S[(r + 1) * (T + 1) + l] + S[l * (T + 1) + l];
        C[l * T + r] = -block / static_cast<double>(r - l + 1);
      }
    check_sums_finite(C, 1.0, "affinity");
    return C;
  }
  // Row prefix sums R[c * (T+1) + t] = sum_{s < t} A[c, s].
  std::vector<double> R(static_cast<size_t>(T) * (T + 1), 0.0);
  for (int64_t c = 0; c < T; ++c)
    for (int64_t t = 0; t < T; ++t) R[c * (T + 1) + t + 1] = R[c * (T + 1) + t] + A[c * T + t];
  auto row_sum = [&](int64_t c, int64_t l, int64_t r) {
    return R[c * (T + 1) + r + 1] - R[c * (T + 1) + l];
  };
  for (int64_t l = 0; l < T; ++l)
    for (int64_t r = l; r < T; ++r) {
      if (centre == AffinityCentre::Middle) {
        C[l * T + r] = -row_sum(l + (r - l) / 2, l, r);
      } else {
        double best = row_sum(l, l, r);
        for (int64_t c = l + 1; c <= r; ++c) best = std::max(best, row_sum(c, l, r));
        C[l * T + r] = -best;
      }
    }
  check_sums_finite(C, 1.0, "affinity");
  return C;
}

}  // namespace ant
