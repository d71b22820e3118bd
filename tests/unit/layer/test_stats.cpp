// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// routing_stats after forward (docs/algorithms.md section 6, cost accounting), against counts taken from the
// reference routing: k histogram, tokens per expert, slots, mean k, and the FLOP counts
// (expert: slots * 2 d n * (2, or 3 if gated); router: tokens * router FLOPs per token;
// dense: tokens * E * 2 d n * (2 or 3)).
#include <doctest/doctest.h>

#include <numeric>

#include "sweep.hpp"

using namespace dmoe_test;

namespace {

template <class P, class A>
void check_stats(int i, int tokens) {
  case_params p = random_params(seed_of(std::string("stats/") + policy_name<P>() + A::name, i), policy_of<P>());
  p.tokens = tokens;
  prepared_case<double, P, A> c(p);
  dmoe::routing_stats st(p.E);
  // Stale values from an earlier, bigger call must be overwritten, not accumulated.
  REQUIRE(c.forward({}, &st).ok());
  REQUIRE(c.forward({}, &st).ok());
  const auto ref = c.reference();
  const auto rs = count_routes(ref.routes, p.E);
  INFO(p.describe());

  CHECK(st.num_experts() == p.E);
  CHECK(st.tokens == tokens);
  CHECK(st.slots == rs.slots);
  CHECK(std::accumulate(st.k_histogram.begin(), st.k_histogram.end(), index_t(0)) == tokens);
  CHECK(std::accumulate(st.tokens_per_expert.begin(), st.tokens_per_expert.end(), index_t(0)) == st.slots);
  for (int k = 0; k <= p.E; ++k) CHECK(st.k_histogram[std::size_t(k)] == rs.k_histogram[std::size_t(k)]);
  for (int e = 0; e < p.E; ++e) CHECK(st.tokens_per_expert[std::size_t(e)] == rs.tokens_per_expert[std::size_t(e)]);
  CHECK(st.mean_k() == doctest::Approx(tokens ? double(rs.slots) / tokens : 0.0));

  const double gate = A::gated ? 3.0 : 2.0;
  const double per_slot = 2.0 * p.d * p.n * gate;
  double router_per_token = 2.0 * p.d * p.E;
  if (std::is_same_v<P, dmoe::dynamic_k>) router_per_token = 2.0 * p.d * p.router_hidden + 2.0 * p.router_hidden * p.E;
  CHECK(c.layer.flops_per_slot() == per_slot);
  CHECK(c.layer.router().flops_per_token() == router_per_token);
  CHECK(st.expert_flops == doctest::Approx(double(rs.slots) * per_slot));
  CHECK(st.router_flops == doctest::Approx(double(tokens) * router_per_token));
  CHECK(st.dense_flops == doctest::Approx(double(tokens) * p.E * per_slot));
  if (tokens > 0) {
    CHECK(st.active_fraction() == doctest::Approx(double(rs.slots) / (double(tokens) * p.E)));
    CHECK(st.executed_fraction() ==
          doctest::Approx((double(tokens) * router_per_token + double(rs.slots) * per_slot) /
                          (double(tokens) * p.E * per_slot)));
  }
}

template <class P>
void stats_for_policy() {
  for (int i = 0; i < 8; ++i) {
    check_stats<P, dmoe::relu>(i, i == 0 ? 300 : 1 + 9 * i);
    check_stats<P, dmoe::geglu>(i, i == 0 ? 300 : 1 + 9 * i);
  }
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE("routing_stats of top_k") { stats_for_policy<dmoe::top_k>(); }
  TEST_CASE("routing_stats of dynamic_k") { stats_for_policy<dmoe::dynamic_k>(); }
  TEST_CASE("routing_stats of top_any") { stats_for_policy<dmoe::top_any>(); }
}
