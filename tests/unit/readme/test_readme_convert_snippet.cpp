// The README's conversion snippet (split -> to_moe -> fit_router -> sweep), compiled and run.
// tests/CMakeLists.txt checks that the block between the markers is the one in README.md.
#include <doctest/doctest.h>

#include <cmath>

// readme-convert-begin
#include <dmoe/dmoe.hpp>

// A dense FFN -> dynamic-k MoE: split the neurons, build the layer, fit its router, sweep tau.
std::vector<dmoe::sweep_point> convert(const dmoe::dense_ffn<float, dmoe::gelu_erf>& dense,
                                       const dmoe::row_matrix<float>& x_calib, const dmoe::row_matrix<float>& x_test) {
  const dmoe::context<dmoe::cpu> ctx{};
  const dmoe::neuron_split split = dmoe::split_neurons(dense, 8);  // balanced k-means, 8 experts
  auto moe = dmoe::to_moe<dmoe::dynamic_k>(dense, split, {0.5});    // tau = 0.5; router still zero
  dmoe::fit_router(moe, x_calib);  // D2DMoE: the router learns each expert's output norm
  const dmoe::row_matrix<float> y_ref = dmoe::dense_output(ctx, dense, x_test);
  return dmoe::sweep_dynamic_k(ctx, moe, x_test, y_ref, {0.0, 0.2, 0.5, 0.8});  // mean k, FLOPs, error
}
// readme-convert-end

TEST_CASE("README conversion snippet converts and sweeps") {
  dmoe::dense_ffn<float, dmoe::gelu_erf> dense(16, 64);
  dense.randomize(5);
  const dmoe::row_matrix<float> xc = dmoe::row_matrix<float>::Random(512, 16);
  const dmoe::row_matrix<float> xt = dmoe::row_matrix<float>::Random(128, 16);
  const auto pts = convert(dense, xc, xt);
  REQUIRE(pts.size() == 4);
  // tau = 0 runs every expert: the dense FFN up to the summation order.
  CHECK(pts[0].tau == 0.0);
  CHECK(pts[0].mean_k == 8.0);
  CHECK(pts[0].rel_error < 1e-5);
  for (std::size_t i = 1; i < pts.size(); ++i) {
    CAPTURE(i);
    CHECK(pts[i].mean_k <= pts[i - 1].mean_k);  // a larger tau never selects more
    CHECK(pts[i].mean_k >= 1.0);                // the best expert always runs
    CHECK(std::isfinite(pts[i].rel_error));
  }
  CHECK(pts[3].mean_k < 8.0);
  CHECK(pts[3].flops_fraction < pts[0].flops_fraction);
  CHECK(pts[3].rel_error > pts[0].rel_error);
}
