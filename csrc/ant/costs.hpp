// Interval cost functors for ant::solve, each O(1) per interval after O(T) (or O(T^2) for
// matrices) preprocessing. All take the half-open interval [j, i), j < i.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

/// (hi + lo) + v as a renormalised pair (Knuth's TwoSum): exact up to about eps^2 |sum|.
inline void add_compensated(double hi, double lo, double v, double& out_hi, double& out_lo) {
  const double s = hi + v, b = s - hi;
  const double err = (hi - (s - b)) + (v - b) + lo;
  out_hi = s + err;
  out_lo = err - (out_hi - s);
}

/// The rounding error of h = fl(a - b): a - b = h + e exactly (Knuth's TwoSum).
inline double difference_error(double a, double b, double h) {
  const double v = h - a;
  return (a - (h - v)) - (b + v);
}

/// a - b = h + e exactly.
inline void exact_difference(double a, double b, double& h, double& e) {
  h = a - b;
  e = difference_error(a, b, h);
}

/// a * b = p + e exactly (Dekker's product with Veltkamp's split; no FMA needed).
inline double product_error(double a, double b, double p) {
  auto split = [](double v, double& h, double& l) {
    const double c = 134217729.0 * v;  // 2^27 + 1
    h = c - (c - v);
    l = v - h;
  };
  double ah, al, bh, bl;
  split(a, ah, al);
  split(b, bh, bl);
  return ((ah * bh - p) + ah * bl + al * bh) + al * bl;
}

/// Prefix sums kept as unevaluated pairs hi + lo (double-double): a difference of two of them,
/// (hi_b - hi_a) + (lo_b - lo_a), is accurate to about eps times the difference itself plus
/// eps^2 times the prefix sums, not eps times the prefix sums. Plain prefix sums lose an
/// interval's cost to a large value anywhere before it: after 1e17, the values 5, 5 and 0 sum
/// to a multiple of 16.
struct Prefix {
  std::vector<double> hi, lo;
  explicit Prefix(size_t n) : hi(n, 0.0), lo(n, 0.0) {}
  /// entry t + 1 = entry t + v (+ e, a small correction of v)
  void extend(size_t t, double v, double e = 0.0) {
    add_compensated(hi[t], lo[t] + e, v, hi[t + 1], lo[t + 1]);
  }
  /// entry b - entry a
  double diff(size_t b, size_t a) const { return (hi[b] - hi[a]) + (lo[b] - lo[a]); }
  /// entry b - entry a as an unevaluated pair h + l
  void diff_pair(size_t b, size_t a, double& h, double& l) const {
    exact_difference(hi[b], hi[a], h, l);
    l += lo[b] - lo[a];
  }
};

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
/// = (P[i] - A[i + j]) + (P[j] - B[i + j]),   A[m] = P[c+1] + (m even ? x_c : 0), B[m] = P[c],
/// c = (m - 1) / 2, because 2c + 1 - i - j is 0 for odd i + j and -1 for even i + j. Indexing
/// A and B by i + j keeps the DP's inner loop (fixed j, increasing i) free of gathers, so it
/// vectorises. P, A and B are compensated pairs: the high parts are differenced, the low parts
/// (each below eps of its high part) summed, so a large value before the interval costs it
/// nothing.
class AbsDeviationCost {
 public:
  AbsDeviationCost(const double* x, int64_t n)
      : prefix_(n + 1), a_(2 * n + 1, 0.0), b_(2 * n + 1, 0.0), low_(2 * n + 1, 0.0),
        runs_(x, n) {
    check_series(x, n);
    const int dir = monotone_direction(x, n);
    if (dir == 0)
      throw std::invalid_argument(
          "values must be monotone for an absolute-deviation objective (timestep/snr/log_snr/"
          "abs); use objective='sse' or a cost_matrix for other series");
    // |.| is invariant under negation and shifts: make the series non-decreasing, and measure
    // it from its middle value (a common offset of 1e12 would otherwise fill the prefix sums),
    // each difference kept exactly as a pair h + e (1 - 1e17 is not a double).
    const double shift = x[n / 2];
    auto value = [&](int64_t t, double& h, double& e) {
      exact_difference(dir < 0 ? shift : x[t], dir < 0 ? x[t] : shift, h, e);
    };
    double h, e;
    for (int64_t t = 0; t < n; ++t) {
      value(t, h, e);
      prefix_.extend(t, h, e);
    }
    for (int64_t m = 1; m <= 2 * n - 1; ++m) {
      const int64_t c = (m - 1) / 2;
      double a_lo = prefix_.lo[c + 1];
      a_[m] = prefix_.hi[c + 1];
      if (m % 2 == 0) {
        value(c, h, e);
        add_compensated(a_[m], a_lo + e, h, a_[m], a_lo);
      }
      b_[m] = prefix_.hi[c];
      low_[m] = a_lo + prefix_.lo[c];
    }
    check_sums_finite(prefix_.hi, 8.0, "values");  // |A| <= 2 max |P|, the cost adds four terms
  }
  double operator()(int64_t j, int64_t i) const {
    const int64_t m = i + j;
    const double right = prefix_.hi[i] - a_[m], left = prefix_.hi[j] - b_[m];
    const double low = (prefix_.lo[i] + prefix_.lo[j]) - low_[m];
    double cost = (right + left) + low;
    // right and left are each about half the interval's deviation from the series' middle
    // value, and each is rounded: far from the middle they can be much larger than the cost
    // they cancel to. There their rounding errors are added back (exact pairs), so the cost is
    // rounded once (to about eps times itself); elsewhere the error is below 4097 eps x cost.
    if (std::fabs(right) + std::fabs(left) > 4096.0 * std::fabs(cost))
      cost = (right + left) + ((difference_error(prefix_.hi[i], a_[m], right) +
                                difference_error(prefix_.hi[j], b_[m], left)) + low);
    return runs_.constant(j, i) ? 0.0 : std::max(cost, 0.0);  // one value: already exactly 0
  }

 private:
  Prefix prefix_;
  std::vector<double> a_, b_, low_;  // high parts of A and B, sum of their low parts
  ConstantRuns runs_;
};

/// Within-interval sum of squared errors around the interval mean (1-D k-means cost). Monge
/// when the series is monotone; any series is accepted (the exact solver then applies).
class SquaredErrorCost {
 public:
  SquaredErrorCost(const double* x, int64_t n) : s1_(n + 1), s2_(n + 1), runs_(x, n) {
    check_series(x, n);
    // Shifting by a data point keeps the prefix sums well conditioned, and integer data
    // integer (so equal costs stay exactly equal and tie-breaking is not decided by rounding).
    const double shift = x[n / 2];
    for (int64_t t = 0; t < n; ++t) {
      double v, e;  // x[t] - shift = v + e exactly, (v + e)^2 = square + its error (to eps^2)
      exact_difference(x[t], shift, v, e);
      const double square = v * v;
      s1_.extend(t, v, e);
      s2_.extend(t, square, product_error(v, v, square) + 2.0 * v * e);
    }
    check_sums_finite(s2_.hi, static_cast<double>(n), "values");  // s^2 <= (i - j) sum v^2
  }
  /// sum v^2 - s^2 / n over [j, i) from compensated prefix sums. Their final difference
  /// cancels to the interval's spread, which can be far below its values' squares (values 0
  /// and 1 next to 1e8): where it drops below 1/4096 of them, it is redone in pairs.
  double operator()(int64_t j, int64_t i) const {
    const double n = static_cast<double>(i - j);
    const double s = s1_.diff(i, j), q = s2_.diff(i, j);
    double sse = q - s * s / n;  // off by at most ~5 eps q: relative 2e-12 above the threshold
    if (sse < q * (1.0 / 4096.0)) sse = precise(j, i, n);
    // One value: exactly 0 (s2 - s * s / 1 would round either way).
    return (i == j + 1 || runs_.constant(j, i)) ? 0.0 : std::max(sse, 0.0);
  }

 private:
  /// The same in pairs: accurate to about eps sse + eps^2 q.
  double precise(int64_t j, int64_t i, double n) const {
    double sh, sl, qh, ql;
    s1_.diff_pair(i, j, sh, sl);
    s2_.diff_pair(i, j, qh, ql);
    // Veltkamp's split overflows above ~1e300: there, work in units of 2^1000 (exact scaling)
    const bool big = qh > 0x1p900;
    if (big) {
      sh *= 0x1p-500, sl *= 0x1p-500, qh *= 0x1p-1000, ql *= 0x1p-1000;
    }
    const double p = sh * sh, pe = product_error(sh, sh, p) + 2.0 * sh * sl;  // s^2 = p + pe
    const double dh = p / n, t = dh * n;                                      // s^2 / n = dh + dl
    const double dl = (((p - t) - product_error(dh, n, t)) + pe) / n;
    const double sse = (qh - dh) + (ql - dl);
    return big ? sse * 0x1p1000 : sse;
  }

  Prefix s1_, s2_;
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
/// Middle and Average sum each interval outward from entries inside it, Medoid differences row
/// prefix sums, all compensated: a cost is accurate to about eps times itself (plus eps^2 times
/// the entries involved), whatever large entries lie inside or outside its interval.
inline std::vector<double> affinity_cost_matrix(const double* A, int64_t T, AffinityCentre centre) {
  check_finite(A, T * T, "affinity");
  std::vector<double> C(static_cast<size_t>(T) * T, 0.0);
  if (centre == AffinityCentre::Middle) {
    // the intervals with middle c are [c - d, c + d] and [c - d, c + d + 1], d = 0, 1, ...
    for (int64_t c = 0; c < T; ++c) {
      const double* row = A + c * T;
      double hi = row[c], lo = 0.0;
      for (int64_t d = 0; c - d >= 0 && c + d < T; ++d) {
        if (d > 0) {
          add_compensated(hi, lo, row[c - d], hi, lo);
          add_compensated(hi, lo, row[c + d], hi, lo);
        }
        C[(c - d) * T + c + d] = -(hi + lo);
        if (c + d + 1 < T) {
          double h, l;
          add_compensated(hi, lo, row[c + d + 1], h, l);
          C[(c - d) * T + c + d + 1] = -(h + l);
        }
      }
    }
  } else if (centre == AffinityCentre::Average) {
    // For l = T-1 down to 0: col[t] = sum_{s=l}^{t-1} A[s, t] and row[r] = sum_{t=l}^{r} A[r, t];
    // the block of l..r grows by col[r] + row[r] as r does (all compensated pairs).
    Prefix col(T), row(T);  // pairs hi[t] + lo[t], updated in place
    for (int64_t l = T - 1; l >= 0; --l) {
      for (int64_t t = l + 1; t < T; ++t)
        add_compensated(col.hi[t], col.lo[t], A[l * T + t], col.hi[t], col.lo[t]);
      for (int64_t r = l; r < T; ++r)
        add_compensated(row.hi[r], row.lo[r], A[r * T + l], row.hi[r], row.lo[r]);
      double hi = 0.0, lo = 0.0;
      for (int64_t r = l; r < T; ++r) {
        if (r > l) add_compensated(hi, lo + col.lo[r], col.hi[r], hi, lo);
        add_compensated(hi, lo + row.lo[r], row.hi[r], hi, lo);
        C[l * T + r] = -(hi + lo) / static_cast<double>(r - l + 1);
      }
    }
  } else {
    // Compensated row prefix sums R[c * (T+1) + t] = sum_{s < t} A[c, s]; for each l, every
    // centre c updates the best row sum of the intervals l..r, r >= c (r innermost: contiguous).
    Prefix R(static_cast<size_t>(T) * (T + 1));
    for (int64_t c = 0; c < T; ++c)
      for (int64_t t = 0; t < T; ++t) R.extend(c * (T + 1) + t, A[c * T + t]);
    std::vector<double> best(T);
    for (int64_t l = 0; l < T; ++l) {
      std::fill(best.begin() + l, best.end(), -std::numeric_limits<double>::infinity());
      for (int64_t c = l; c < T; ++c) {
        const double* hi = R.hi.data() + c * (T + 1);
        const double* lo = R.lo.data() + c * (T + 1);
        for (int64_t r = c; r < T; ++r)
          best[r] = std::max(best[r], (hi[r + 1] - hi[l]) + (lo[r + 1] - lo[l]));
      }
      for (int64_t r = l; r < T; ++r) C[l * T + r] = -best[r];
    }
  }
  check_sums_finite(C, 1.0, "affinity");
  return C;
}

}  // namespace ant
