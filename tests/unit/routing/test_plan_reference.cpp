// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Random sweep of the routing plans of the three policies against the reference routers, over
// many shapes, seeds and options. Expert ids must match exactly and weights closely.
// Borderline tokens: a float layer computes the router scores in float, so a token whose scores
// lie within 1e-5 (relative to the rounding scale of the compared quantities, see
// reference.hpp) of a decision boundary may be decided either way; such tokens are skipped for
// float layers (and must stay a small fraction). Double layers use 1e-12 and must skip none.
#include <doctest/doctest.h>

#include "sweep.hpp"

using namespace dmoe_test;

namespace {

template <class T, class P>
void plan_sweep(int cases) {
  const std::string tag = std::string("plan/") + policy_name<P>() + "/" + type_name<T>();
  // Coverage of the sweep: tokens with no expert, one, several, and every expert of the layer.
  index_t k0 = 0, k1 = 0, k_some = 0, k_all = 0;
  for (int i = 0; i < cases; ++i) {
    case_params p = random_params(seed_of(tag, i), policy_of<P>(), 0.03);
    const auto st = i % 2 ? check_case<T, P, dmoe::relu>(p, false) : check_case<T, P, dmoe::swiglu>(p, false);
    k0 += st.k_histogram[0];
    k1 += st.k_histogram[1];
    for (int k = 2; k < p.E; ++k) k_some += st.k_histogram[std::size_t(k)];
    if (p.E > 1) k_all += st.k_histogram[std::size_t(p.E)];
  }
  CAPTURE(k0);
  CAPTURE(k1);
  CAPTURE(k_some);
  CAPTURE(k_all);
  CHECK(k1 > 100);
  CHECK(k_some > 100);
  CHECK(k_all > 100);
  if (std::is_same_v<P, dmoe::top_any>)
    CHECK(k0 > 100);  // training tokens that fire nothing
  else
    CHECK(k0 == 0);  // top_k and dynamic_k always run at least one expert
}

}  // namespace

TEST_SUITE("routing") {
  TEST_CASE_TEMPLATE("top_k plan matches the reference router", T, float, double) { plan_sweep<T, dmoe::top_k>(300); }
  TEST_CASE_TEMPLATE("dynamic_k plan matches the reference router", T, float, double) {
    plan_sweep<T, dmoe::dynamic_k>(300);
  }
  TEST_CASE_TEMPLATE("top_any plan matches the reference router", T, float, double) {
    plan_sweep<T, dmoe::top_any>(300);
  }

  TEST_CASE("top_any plan with thresholds near typical cosines") {
    // Thresholds drawn around the spread of cos for random x and w (about 1/sqrt(d)), so that K
    // varies from 0 to E within a batch, in training and inference.
    for (int i = 0; i < 60; ++i) {
      case_params p = random_params(seed_of("plan/top_any/near", i), ref::policy_kind::top_any);
      const double s = 1.0 / std::sqrt(double(p.d));
      p.top_any_g_lo = -s;
      p.top_any_g_hi = s;
      check_case<double, dmoe::top_any, dmoe::relu>(p, true);
      check_case<float, dmoe::top_any, dmoe::relu>(p, true);
    }
  }

  TEST_CASE("dynamic_k plan over a sweep of tau and k_max") {
    for (int i = 0; i < 40; ++i) {
      case_params p = random_params(seed_of("plan/dynamic_k/tau", i), ref::policy_kind::dynamic_k);
      for (double tau : {0.0, 0.25, 0.5, 0.9, 1.0})
        for (int k_max : {0, 1, p.E}) {
          p.tau = tau;
          p.k_max = k_max;
          check_case<double, dmoe::dynamic_k, dmoe::relu>(p, false);
        }
    }
  }
}
