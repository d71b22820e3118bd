// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The exact balanced assignment (convert/detail/balanced_assignment.hpp) against independent
// checks: enumeration of every balanced assignment on small instances, and the min-cost-flow
// optimality condition (no negative exchange cycle, found by a plain Bellman-Ford over every
// point's move) on larger ones.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include <dmoe/convert/detail/balanced_assignment.hpp>

#include "test_random.hpp"

namespace {

using dmoe::index_t;

class rng : public dmoe_testing::splitmix {
 public:
  explicit rng(std::uint64_t seed) : splitmix(seed, 0x9E3779B97F4A7C15ull, 0xC0575ull) {}
};

/// Lowest total cost over all assignments with exactly `cap` points per cluster (enumeration).
struct brute_force {
  const std::vector<double>& cost;
  int F, E, cap;
  std::vector<int> count;
  double best = std::numeric_limits<double>::infinity();
  long assignments = 0;
  void go(int p, double acc) {
    if (p == F) {
      ++assignments;
      if (acc < best) best = acc;
      return;
    }
    for (int k = 0; k < E; ++k) {
      if (count[std::size_t(k)] == cap) continue;
      ++count[std::size_t(k)];
      go(p + 1, acc + cost[std::size_t(p * E + k)]);
      --count[std::size_t(k)];
    }
  }
};

long multinomial(int F, int E, int cap) {
  // F! / (cap!)^E, computed as a product of binomials.
  long r = 1;
  int left = F;
  for (int k = 0; k < E; ++k) {
    long b = 1;
    for (int i = 1; i <= cap; ++i) b = b * (left - cap + i) / i;
    r *= b;
    left -= cap;
  }
  return r;
}

/// True if some cycle of point moves (a point of cluster a to cluster b, for every point and
/// every b) has total cost below -tol: Bellman-Ford from a virtual source at distance 0 to every
/// cluster, edges listed point by point (not the contracted minimum the solver uses).
bool has_negative_exchange_cycle(const std::vector<double>& cost, const std::vector<index_t>& assign, int E,
                                 double tol) {
  const int F = int(assign.size());
  std::vector<double> dist(std::size_t(E), 0.0);
  for (int round = 0; round <= E; ++round) {
    bool changed = false;
    for (int q = 0; q < F; ++q) {
      const int a = int(assign[std::size_t(q)]);
      for (int b = 0; b < E; ++b) {
        if (b == a) continue;
        const double w = cost[std::size_t(q * E + b)] - cost[std::size_t(q * E + a)];
        if (dist[std::size_t(a)] + w < dist[std::size_t(b)] - tol) {
          dist[std::size_t(b)] = dist[std::size_t(a)] + w;
          changed = true;
        }
      }
    }
    if (!changed) return false;
  }
  return true;
}

std::vector<double> random_costs(rng& g, int F, int E, int kind) {
  std::vector<double> c(std::size_t(F * E));
  for (auto& v : c) {
    if (kind == 0) v = g.uniform(-1, 1);
    else if (kind == 1) v = double(g.integer(0, 3));  // many ties
    else v = g.uniform(-1, 1) * std::pow(10.0, g.uniform(-3, 3));  // wide dynamic range
  }
  return c;
}

void check_balanced(const std::vector<index_t>& a, int E, int cap) {
  std::vector<int> count(std::size_t(E), 0);
  for (auto k : a) {
    REQUIRE(k >= 0);
    REQUIRE(k < E);
    ++count[std::size_t(k)];
  }
  for (int k = 0; k < E; ++k) CHECK(count[std::size_t(k)] == cap);
}

}  // namespace

TEST_SUITE("convert") {
  TEST_CASE("balanced assignment: optimal against enumeration of every balanced assignment") {
    const int shapes[][2] = {{1, 1}, {2, 1}, {2, 2}, {4, 2}, {6, 2}, {6, 3}, {8, 2}, {8, 4}, {9, 3}, {10, 2}, {10, 5}};
    int cases = 0;
    for (const auto& s : shapes)
      for (int kind = 0; kind < 3; ++kind)
        for (int rep = 0; rep < 6; ++rep) {
          const int F = s[0], E = s[1], cap = F / E;
          rng g(std::uint64_t(F * 1000 + E * 100 + kind * 10 + rep));
          const auto cost = random_costs(g, F, E, kind);
          std::vector<index_t> a(std::size_t(F), -1);
          // Start prices: zero, or random (any start must give the optimum).
          std::vector<double> prices(std::size_t(E), 0.0);
          if (rep % 2)
            for (auto& p : prices) p = g.uniform(-5, 5);
          const double got = dmoe::detail::conversion::balanced_assignment(cost.data(), F, E, cap, a.data(), prices.data());
          brute_force bf{cost, F, E, cap, std::vector<int>(std::size_t(E), 0)};
          bf.go(0, 0.0);
          INFO("F=", F, " E=", E, " kind=", kind, " rep=", rep);
          REQUIRE(bf.assignments == multinomial(F, E, cap));  // the enumeration itself is complete
          check_balanced(a, E, cap);
          double sum = 0;
          for (int p = 0; p < F; ++p) sum += cost[std::size_t(p * E + a[std::size_t(p)])];
          CHECK(got == doctest::Approx(sum).epsilon(1e-12));
          CHECK(got <= bf.best + 1e-9 * (1 + std::fabs(bf.best)));
          CHECK(got >= bf.best - 1e-9 * (1 + std::fabs(bf.best)));
          ++cases;
        }
    CHECK(cases == 11 * 3 * 6);
  }

  TEST_CASE("balanced assignment: no negative exchange cycle on larger random instances") {
    for (int i = 0; i < 24; ++i) {
      rng g(std::uint64_t(7000 + i));
      const int E = g.integer(1, 12), cap = g.integer(1, 40), F = E * cap;
      const auto cost = random_costs(g, F, E, i % 3);
      std::vector<index_t> a(std::size_t(F), -1);
      (void)dmoe::detail::conversion::balanced_assignment(cost.data(), F, E, cap, a.data());
      INFO("F=", F, " E=", E, " case ", i);
      check_balanced(a, E, cap);
      CHECK_FALSE(has_negative_exchange_cycle(cost, a, E, 1e-9));
    }
  }

  TEST_CASE("balanced assignment: the exchange-cycle check does detect a suboptimal assignment") {
    // Guards the check above: a greedy assignment (each point to its cheapest cluster with room,
    // in order) is usually not optimal, and the check must then find the improving cycle.
    int detected = 0;
    for (int i = 0; i < 20; ++i) {
      rng g(std::uint64_t(9100 + i));
      const int E = 4, cap = 10, F = E * cap;
      const auto cost = random_costs(g, F, E, 0);
      std::vector<index_t> greedy(static_cast<std::size_t>(F));
      std::vector<int> count(std::size_t(E), 0);
      for (int p = 0; p < F; ++p) {
        int bk = -1;
        for (int k = 0; k < E; ++k)
          if (count[std::size_t(k)] < cap && (bk < 0 || cost[std::size_t(p * E + k)] < cost[std::size_t(p * E + bk)]))
            bk = k;
        greedy[std::size_t(p)] = bk;
        ++count[std::size_t(bk)];
      }
      std::vector<index_t> opt(static_cast<std::size_t>(F));
      const double best = dmoe::detail::conversion::balanced_assignment(cost.data(), F, E, cap, opt.data());
      double g_cost = 0;
      for (int p = 0; p < F; ++p) g_cost += cost[std::size_t(p * E + greedy[std::size_t(p)])];
      CHECK(best <= g_cost + 1e-12);
      if (g_cost > best + 1e-9) {
        CHECK(has_negative_exchange_cycle(cost, greedy, E, 1e-12));
        ++detected;
      }
    }
    CHECK(detected > 10);
  }

  TEST_CASE("balanced assignment: bad shapes and non-finite costs are errors") {
    std::vector<double> c(12, 0.0);
    std::vector<index_t> a(12);
    CHECK_THROWS_AS(dmoe::detail::conversion::balanced_assignment(c.data(), 12, 5, 2, a.data()), dmoe::error);
    CHECK_THROWS_AS(dmoe::detail::conversion::balanced_assignment(c.data(), 12, 0, 12, a.data()), dmoe::error);
    c[7] = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(dmoe::detail::conversion::balanced_assignment(c.data(), 6, 2, 3, a.data()), dmoe::error);
  }
}
