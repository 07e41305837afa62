#include <ant/costs.hpp>
#include <ant/interval_dp.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<double> t(1000);
  for (int i = 0; i < 1000; ++i) t[i] = i;
  const ant::Partition p = ant::solve(ant::AbsDeviationCost(t.data(), 1000), 1000, 5);
  for (size_t k = 0; k < p.boundaries.size(); ++k) std::printf("%lld ", (long long)p.boundaries[k]);
  std::printf("\n");
  return p.boundaries[1] == 200 && p.boundaries[4] == 800 ? 0 : 1;
}
