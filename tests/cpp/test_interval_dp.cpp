// Unit tests of the header-only interval DP against exhaustive enumeration. Run by ctest.
#include <ant/costs.hpp>
#include <ant/interval_dp.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <stdexcept>
#include <vector>

namespace {

int failures = 0;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                       \
    }                                                                   \
  } while (0)

using IntervalCost = std::function<double(int64_t, int64_t)>;  // half-open [j, i)

// whether f() throws std::invalid_argument (the library's error for bad arguments)
template <class F>
bool throws_invalid_argument(F f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

struct Best {
  double cost = INFINITY;
  double balance = INFINITY;
  std::vector<int64_t> bounds;
};

// Enumerates every composition of T into K parts within the size bounds, applying the documented
// tie rule: cost, then sum of squared sizes, then boundaries compared from the last backwards.
void enumerate(const IntervalCost& cost, int64_t T, int64_t K, int64_t mn, int64_t mx,
               std::vector<int64_t>& cur, Best& best) {
  const int64_t start = cur.back();
  if (static_cast<int64_t>(cur.size()) == K) {
    const int64_t n = T - start;
    if (n < mn || n > mx) return;
    std::vector<int64_t> b = cur;
    b.push_back(T);
    double c = 0, bal = 0;
    for (size_t q = 0; q + 1 < b.size(); ++q) {
      c += cost(b[q], b[q + 1]);
      bal += double(b[q + 1] - b[q]) * double(b[q + 1] - b[q]);
    }
    bool better = c < best.cost || (c == best.cost && bal < best.balance);
    if (!better && c == best.cost && bal == best.balance)
      better = std::lexicographical_compare(b.rbegin(), b.rend(), best.bounds.rbegin(),
                                            best.bounds.rend());
    if (better) best = {c, bal, b};
    return;
  }
  for (int64_t e = start + mn; e <= std::min(T - 1, start + mx); ++e) {
    cur.push_back(e);
    enumerate(cost, T, K, mn, mx, cur, best);
    cur.pop_back();
  }
}

Best brute(const IntervalCost& cost, int64_t T, int64_t K, int64_t mn = 1, int64_t mx = 0) {
  Best best;
  std::vector<int64_t> cur{0};
  enumerate(cost, T, K, mn, mx == 0 ? T : mx, cur, best);
  return best;
}

void test_integer_matrices_with_ties() {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> val(-3, 3);
  for (int64_t T = 1; T <= 9; ++T)
    for (int trial = 0; trial < 4; ++trial) {
      std::vector<double> C(T * T);
      for (auto& c : C) c = val(rng);
      ant::MatrixCost cost(C.data(), T);
      for (int64_t K = 1; K <= T; ++K) {
        const ant::Partition p = ant::solve(cost, T, K);
        const Best b = brute(cost, T, K);
        CHECK(p.cost == b.cost);
        CHECK(p.boundaries == b.bounds);
        for (int64_t k = 1; k <= K; ++k) CHECK(p.costs_by_k[k - 1] == brute(cost, T, k).cost);
      }
    }
}

void test_size_bounds() {
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> val(-5, 5);
  const int64_t T = 11;
  std::vector<double> C(T * T);
  for (auto& c : C) c = val(rng);
  ant::MatrixCost cost(C.data(), T);
  for (int64_t mn = 1; mn <= 3; ++mn)
    for (int64_t mx : {0, 3, 5})
      for (int64_t K = 1; K <= T; ++K) {
        const int64_t emx = mx == 0 ? T : mx;
        if (K * mn > T || K * emx < T) {
          CHECK(throws_invalid_argument([&] { ant::solve(cost, T, K, ant::SizeBounds{mn, mx}); }));
          continue;
        }
        const ant::Partition p = ant::solve(cost, T, K, ant::SizeBounds{mn, mx});
        const Best b = brute(cost, T, K, mn, mx);
        CHECK(p.cost == b.cost);
        CHECK(p.boundaries == b.bounds);
      }
}

void test_monge_equals_exact_on_monotone_series() {
  std::mt19937 rng(3);
  std::exponential_distribution<double> step(1.0);
  for (int trial = 0; trial < 6; ++trial) {
    const int64_t T = 400;
    std::vector<double> x(T);
    double acc = 0;
    for (auto& v : x) v = trial % 2 ? std::round(acc += step(rng)) : (acc += step(rng));
    if (trial >= 4) std::reverse(x.begin(), x.end());  // non-increasing works too
    const ant::AbsDeviationCost abs_cost(x.data(), T);
    const ant::SquaredErrorCost sse_cost(x.data(), T);
    for (int64_t K : {1, 2, 7, 40}) {
      const ant::SizeBounds sb{1 + trial, (trial % 3 == 0 || K == 1) ? 0 : 200};
      for (int which = 0; which < 2; ++which) {
        const ant::Partition e = which ? ant::solve(abs_cost, T, K, sb, ant::Method::Exact)
                                       : ant::solve(sse_cost, T, K, sb, ant::Method::Exact);
        const ant::Partition m = which ? ant::solve(abs_cost, T, K, sb, ant::Method::Monge)
                                       : ant::solve(sse_cost, T, K, sb, ant::Method::Monge);
        CHECK(m.fast_path && !e.fast_path);
        CHECK(e.boundaries == m.boundaries);
        for (int64_t k = 0; k < K; ++k)
          CHECK(e.costs_by_k[k] == m.costs_by_k[k] ||  // both +inf when k is infeasible
                std::fabs(e.costs_by_k[k] - m.costs_by_k[k]) <= 1e-9 * (1 + std::fabs(e.costs_by_k[k])));
      }
    }
  }
}

void test_costs_against_direct_evaluation() {
  std::mt19937 rng(4);
  std::normal_distribution<double> g;
  const int64_t T = 30;
  std::vector<double> x(T), y(T), A(T * T);
  for (auto& v : y) v = g(rng);
  x = y;
  std::sort(x.begin(), x.end());
  for (auto& v : A) v = g(rng);
  const ant::AbsDeviationCost abs_cost(x.data(), T);
  const ant::SquaredErrorCost sse_cost(y.data(), T);
  const std::vector<double> mid = ant::affinity_cost_matrix(A.data(), T, ant::AffinityCentre::Middle);
  const std::vector<double> med = ant::affinity_cost_matrix(A.data(), T, ant::AffinityCentre::Medoid);
  const std::vector<double> avg = ant::affinity_cost_matrix(A.data(), T, ant::AffinityCentre::Average);
  for (int64_t j = 0; j < T; ++j)
    for (int64_t i = j + 1; i <= T; ++i) {
      const int64_t c = j + (i - 1 - j) / 2;
      double a = 0, mean = 0, s = 0, row_c = 0, block = 0, best = -INFINITY;
      for (int64_t t = j; t < i; ++t) {
        a += std::fabs(x[t] - x[c]);
        mean += y[t] / double(i - j);
        row_c += A[c * T + t];
      }
      for (int64_t t = j; t < i; ++t) s += (y[t] - mean) * (y[t] - mean);
      for (int64_t u = j; u < i; ++u) {
        double r = 0;
        for (int64_t t = j; t < i; ++t) r += A[u * T + t];
        block += r;
        best = std::max(best, r);
      }
      const int64_t l = j, r = i - 1;
      CHECK(std::fabs(abs_cost(j, i) - a) < 1e-9);
      CHECK(std::fabs(sse_cost(j, i) - s) < 1e-9);
      CHECK(std::fabs(mid[l * T + r] + row_c) < 1e-9);
      CHECK(std::fabs(med[l * T + r] + best) < 1e-9);
      CHECK(std::fabs(avg[l * T + r] + block / double(i - j)) < 1e-9);
    }
}

void test_uniform_timestep_and_errors() {
  std::vector<double> t(1000);
  for (int i = 0; i < 1000; ++i) t[i] = i;
  const ant::AbsDeviationCost cost(t.data(), 1000);
  for (auto method : {ant::Method::Exact, ant::Method::Monge}) {
    const ant::Partition p = ant::solve(cost, 1000, 5, {}, method);
    CHECK((p.boundaries == std::vector<int64_t>{0, 200, 400, 600, 800, 1000}));
    CHECK(p.cost == 5 * 10000.0);
  }
  auto throws = [&](int64_t K, ant::SizeBounds sb) {
    return throws_invalid_argument([&] { ant::solve(cost, 1000, K, sb); });
  };
  CHECK(throws(0, {}));
  CHECK(throws(1001, {}));
  CHECK(throws(5, {0, 0}));
  CHECK(throws(5, {300, 0}));
  CHECK(throws(5, {1, 100}));
  CHECK(throws(5, {50, 40}));
  CHECK(throws(5, {201, 0}));  // 5 x 201 > 1000
  CHECK(throws(5, {1, 199}));  // 5 x 199 < 1000
  CHECK(!throws(5, {200, 200}));
  // bounds near int64's limits: K * min_size overflowed (undefined behaviour) before the check
  const int64_t big = int64_t{4000000000};
  CHECK(throws_invalid_argument([&] { ant::detail::checked_max_size(big, big, {big, 0}); }));
  CHECK(ant::detail::checked_max_size(big, 2, {big / 2, big / 2}) == big / 2);
  std::vector<double> wiggly{0, 2, 1}, huge{0, 1e200, 2e200, 3e200};
  CHECK(throws_invalid_argument([&] { ant::AbsDeviationCost bad(wiggly.data(), 3); }));
  // an empty series (nothing to read, not x[0]) and sums that overflow double precision
  CHECK(throws_invalid_argument([&] { ant::AbsDeviationCost bad(wiggly.data(), 0); }));
  CHECK(throws_invalid_argument([&] { ant::SquaredErrorCost bad(wiggly.data(), 0); }));
  CHECK(throws_invalid_argument([&] { ant::SquaredErrorCost bad(huge.data(), 4); }));
  // a partial sum that overflows on the optimum's path, with a finite final optimum
  std::vector<double> c{1e308, 1e308, 0, 0, 0, 1e308, 0, 0, 0, 0, 0, -1.5e308, 0, 0, 0, 0};
  CHECK(throws_invalid_argument([&] { ant::solve(ant::MatrixCost(c.data(), 4), 4, 3); }));
}

void test_is_monge() {
  const int64_t T = 12;
  std::vector<double> convex(T * T), random(T * T);
  std::mt19937 rng(5);
  std::normal_distribution<double> g;
  for (int64_t l = 0; l < T; ++l)
    for (int64_t r = 0; r < T; ++r) {
      convex[l * T + r] = double(r - l + 1) * double(r - l + 1);
      random[l * T + r] = g(rng);
    }
  CHECK(ant::is_monge(ant::MatrixCost(convex.data(), T), T));
  CHECK(!ant::is_monge(ant::MatrixCost(random.data(), T), T));
}

}  // namespace

int main() {
  test_integer_matrices_with_ties();
  test_size_bounds();
  test_monge_equals_exact_on_monotone_series();
  test_costs_against_direct_evaluation();
  test_uniform_timestep_and_errors();
  test_is_monge();
  if (failures) {
    std::fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  std::printf("all interval DP tests passed\n");
  return 0;
}
