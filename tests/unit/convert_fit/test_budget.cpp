// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// tau for a FLOPs budget (convert/budget.hpp) against plain loops: the FLOPs fraction of every
// tau is counted here from the router scores with the dynamic-k rule (r_e >= tau max r, then the
// k_max largest), independently of the layer; the returned tau fits the budget, the bracket's
// lower end does not, and it is narrower than the tolerance; ends of the range, k_max, restored
// options and bad arguments.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <dmoe/convert/budget.hpp>

#include "convert_fit_common.hpp"

using namespace dmoe;
using namespace convert_fit_test;

namespace {

/// Executed FLOPs fraction by plain loops: (router + selected experts' products) / dense.
template <class T, class Act>
double reference_fraction(const moe_layer<T, cpu, dynamic_k, Act>& layer, const rows<T>& x, double tau,
                          index_t k_max) {
  const index_t E = layer.num_experts(), d = layer.d_model(), n = layer.expert_width(), H = layer.router().hidden();
  double slots = 0;
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto r = router_scores(layer.router(), x.row(t).data());
    const double mx = *std::max_element(r.begin(), r.end());
    std::vector<index_t> sel;
    for (index_t e = 0; e < E; ++e)
      if (r[std::size_t(e)] >= tau * mx) sel.push_back(e);
    if (k_max > 0 && index_t(sel.size()) > k_max) {
      std::stable_sort(sel.begin(), sel.end(), [&](index_t a, index_t b) { return r[std::size_t(a)] > r[std::size_t(b)]; });
      sel.resize(std::size_t(k_max));
    }
    slots += double(sel.size());
  }
  const double per_slot = 2.0 * double(d) * double(n) * 2.0;  // non-gated: two products
  const double router = (2.0 * double(d) * double(H) + 2.0 * double(H) * double(E)) * double(x.rows());
  const double dense = per_slot * double(E) * double(x.rows());
  return (router + per_slot * slots) / dense;
}

}  // namespace

TEST_SUITE("convert") {
  TEST_CASE("tau_for_flops: smallest tau within budget, checked against plain-loop FLOPs") {
    context<cpu> ctx;
    for (int i = 0; i < 6; ++i) {
      auto g = make_gen(4200 + std::uint64_t(i));
      const index_t d = 4 + g.integer(0, 8), E = 3 + g.integer(0, 6), n = 1 + g.integer(0, 6), H = 2 + g.integer(0, 8);
      const index_t T = 5 + g.integer(0, 60);
      const index_t k_max = (i % 2) ? 1 + g.integer(0, int(E - 1)) : 0;
      CAPTURE(d);
      CAPTURE(E);
      CAPTURE(T);
      CAPTURE(k_max);
      const auto dense = random_dense<double, gelu_erf>(d, E * n, 4300 + std::uint64_t(i));
      auto layer = contiguous_moe(dense, E, H, 0.37);
      layer.router().set_options({0.37, k_max});
      layer.router().randomize(4400 + std::uint64_t(i));
      const rows<double> x = random_rows<double>(T, d, 4500 + std::uint64_t(i));
      const rows<double> yd = dense_output(ctx, dense, matrix_view<const double>(x));
      const double f_min = reference_fraction(layer, x, 1.0, k_max), f_max = reference_fraction(layer, x, 0.0, k_max);
      for (double w : {0.1, 0.35, 0.6, 0.9}) {
        const double target = f_min + w * (f_max - f_min);
        CAPTURE(target);
        tau_search_options opt;
        opt.tolerance = 1e-4;
        const auto r = tau_for_flops(ctx, layer, matrix_view<const double>(x), matrix_view<const double>(yd), target, opt);
        CHECK(r.point.flops_fraction == doctest::Approx(reference_fraction(layer, x, r.tau, k_max)).epsilon(1e-12));
        CHECK(r.point.flops_fraction <= target);
        CHECK(r.point.tau == r.tau);
        CHECK(r.point.k == k_max);
        if (r.tau > 0) {
          CHECK(reference_fraction(layer, x, r.lower_tau, k_max) > target);
          CHECK(r.tau - r.lower_tau <= opt.tolerance);
        }
        CHECK(r.evaluations <= opt.max_evaluations);
        // The options in force before the search are back.
        CHECK(layer.router().options().tau == 0.37);
        CHECK(layer.router().options().k_max == k_max);
      }
    }
  }

  TEST_CASE("tau_for_flops: the ends of the range, the self reference and bad arguments") {
    context<cpu> ctx;
    const auto dense = random_dense<double, relu>(6, 5 * 3, 77);
    auto layer = contiguous_moe(dense, 5, 4, 0.5);
    layer.router().randomize(78);
    const rows<double> x = random_rows<double>(20, 6, 79);
    const rows<double> yd = dense_output(ctx, dense, matrix_view<const double>(x));
    const matrix_view<const double> xv(x), yv(yd);
    // A budget above everything: tau = 0 (every expert), the dense output up to rounding.
    const auto all = tau_for_flops(ctx, layer, xv, yv, 10.0);
    CHECK(all.tau == 0.0);
    CHECK(all.evaluations == 1);
    CHECK(all.point.mean_k == 5.0);
    CHECK(all.point.rel_error < 1e-12);
    // Empty y_ref: errors against the layer's own all-experts output, so tau = 0 has zero error.
    const auto self = tau_for_flops(ctx, layer, xv, matrix_view<const double>(), 10.0);
    CHECK(self.point.rel_error == 0.0);
    CHECK(self.point.mean_cosine == doctest::Approx(1.0));
    // Below the cheapest setting (tau = 1): an error naming the attainable fraction.
    const double f_min = reference_fraction(layer, x, 1.0, 0);
    try {
      (void)tau_for_flops(ctx, layer, xv, yv, 0.5 * f_min);
      FAIL("no error");
    } catch (const dmoe::error& e) {
      CHECK(std::string(e.what()).find("below the smallest fraction") != std::string::npos);
    }
    CHECK_THROWS_AS((void)tau_for_flops(ctx, layer, xv, yv, 0.0), dmoe::error);
    CHECK_THROWS_AS((void)tau_for_flops(ctx, layer, xv, yv, std::nan("")), dmoe::error);
    CHECK_THROWS_AS((void)tau_for_flops(ctx, layer, matrix_view<const double>(), yv, 0.5), dmoe::error);
    CHECK_THROWS_AS((void)tau_for_flops(ctx, layer, xv, matrix_view<const double>(yd.data(), 19, 6), 0.5), dmoe::error);
    tau_search_options bad;
    bad.tolerance = 0;
    CHECK_THROWS_AS((void)tau_for_flops(ctx, layer, xv, yv, 0.5, bad), dmoe::error);
    CHECK(layer.router().options().tau == 0.5);
  }
}
