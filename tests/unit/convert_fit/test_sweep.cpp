// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Threshold and top-k sweeps (convert/sweep.hpp) against an independent plain-loop computation:
// selection, mean k, k histogram, FLOPs fraction, relative error and cosine; tau = 0 equals the
// dense FFN; options are restored; CSV format; bad inputs.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <dmoe/convert/router_fit.hpp>
#include <dmoe/convert/sweep.hpp>

#include "convert_fit_common.hpp"

using namespace dmoe;
using namespace convert_fit_test;

namespace {

struct ref_point {
  double mean_k = 0, flops_fraction = 0, rel_error = 0, token_rel_error = 0, mean_cosine = 0;
  std::vector<index_t> hist;
};

/// Plain loops: select per token (dynamic-k rule r_e >= tau max r, or the k largest r with ties to
/// the lower index), sum the selected experts' outputs + b2, compare with the dense output.
template <class T, class Act>
ref_point reference(const dense_ffn<T, Act>& dense, const dynamic_k_router<T>& router, const rows<T>& x, index_t E,
                    double tau, index_t k) {
  const index_t d = dense.d_model(), n = dense.hidden() / E, H = router.hidden();
  ref_point p;
  p.hist.assign(std::size_t(E + 1), 0);
  double diff2 = 0, ref2 = 0, cos_sum = 0, tok_sum = 0, slots = 0;
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto r = router_scores(router, x.row(t).data());
    std::vector<char> sel(std::size_t(E), 0);
    if (k > 0) {
      std::vector<index_t> ids(static_cast<std::size_t>(E));
      std::iota(ids.begin(), ids.end(), index_t{0});
      std::stable_sort(ids.begin(), ids.end(), [&](index_t a, index_t b) { return r[std::size_t(a)] > r[std::size_t(b)]; });
      for (index_t i = 0; i < k; ++i) sel[std::size_t(ids[std::size_t(i)])] = 1;
    } else {
      const double mx = *std::max_element(r.begin(), r.end());
      for (index_t e = 0; e < E; ++e) sel[std::size_t(e)] = r[std::size_t(e)] >= tau * mx;
    }
    const auto h = dense_hidden(dense, x.row(t).data());
    std::vector<double> y(static_cast<std::size_t>(d)), yd(static_cast<std::size_t>(d));
    for (index_t i = 0; i < d; ++i) y[std::size_t(i)] = yd[std::size_t(i)] = double(dense.b2()(i));
    index_t kt = 0;
    for (index_t e = 0; e < E; ++e) {
      const auto ye = expert_out(dense, h, e, n);
      for (index_t i = 0; i < d; ++i) {
        yd[std::size_t(i)] += ye[std::size_t(i)];
        if (sel[std::size_t(e)]) y[std::size_t(i)] += ye[std::size_t(i)];
      }
      kt += sel[std::size_t(e)];
    }
    ++p.hist[std::size_t(kt)];
    slots += double(kt);
    double dot = 0, a2 = 0, b2 = 0, e2 = 0;
    for (index_t i = 0; i < d; ++i) {
      const double a = y[std::size_t(i)], b = yd[std::size_t(i)];
      e2 += (a - b) * (a - b);
      dot += a * b;
      a2 += a * a;
      b2 += b * b;
    }
    diff2 += e2;
    ref2 += b2;
    tok_sum += std::sqrt(e2 / b2);
    cos_sum += dot / std::sqrt(a2 * b2);
  }
  const double T_ = double(x.rows());
  p.mean_k = slots / T_;
  const double router_flops = 2.0 * double(d) * double(H) + 2.0 * double(H) * double(E);
  const double expert_flops = 2.0 * double(d) * double(n) * 2.0;
  p.flops_fraction = (router_flops + p.mean_k * expert_flops) / (double(E) * expert_flops);
  p.rel_error = std::sqrt(diff2 / ref2);
  p.mean_cosine = cos_sum / T_;
  p.token_rel_error = tok_sum / T_;
  return p;
}

void check_point(const sweep_point& got, const ref_point& want, double tol) {
  CHECK(got.mean_k == doctest::Approx(want.mean_k).epsilon(1e-12));
  CHECK(got.k_histogram == want.hist);
  CHECK(got.flops_fraction == doctest::Approx(want.flops_fraction).epsilon(1e-12));
  CHECK(std::abs(got.rel_error - want.rel_error) <= tol * (1 + want.rel_error));
  CHECK(std::abs(got.token_rel_error - want.token_rel_error) <= tol * (1 + want.token_rel_error));
  CHECK(std::abs(got.mean_cosine - want.mean_cosine) <= tol);
}

}  // namespace

TEST_SUITE("convert") {
  TEST_CASE("sweep_dynamic_k and sweep_top_k match plain loops on random layers") {
    context<cpu> ctx;
    for (int i = 0; i < 4; ++i) {
      auto g = make_gen(900 + std::uint64_t(i));
      const index_t d = 4 + g.integer(0, 8), E = 2 + g.integer(0, 5), n = 1 + g.integer(0, 6), H = 2 + g.integer(0, 8);
      const index_t T = 1 + g.integer(0, 60);
      CAPTURE(d);
      CAPTURE(E);
      CAPTURE(n);
      CAPTURE(T);
      const auto dense = random_dense<double, gelu_erf>(d, E * n, 1000 + std::uint64_t(i));
      auto layer = contiguous_moe(dense, E, H, 0.37);
      layer.router().randomize(1100 + std::uint64_t(i));
      const rows<double> x = random_rows<double>(T, d, 1200 + std::uint64_t(i));
      const rows<double> yd = dense_output(ctx, dense, matrix_view<const double>(x));
      const std::vector<double> taus{0.0, 0.2, 0.5, 0.8, 1.0};
      const auto pts = sweep_dynamic_k(ctx, layer, matrix_view<const double>(x), matrix_view<const double>(yd), taus);
      REQUIRE(pts.size() == taus.size());
      for (std::size_t j = 0; j < taus.size(); ++j) {
        CAPTURE(taus[j]);
        CHECK(pts[j].router == "d2dmoe");
        CHECK(pts[j].policy == "dynamic_k");
        CHECK(pts[j].tau == taus[j]);
        CHECK(pts[j].k == 0);
        CHECK(pts[j].tokens == T);
        check_point(pts[j], reference(dense, layer.router(), x, E, taus[j], 0), 1e-9);
      }
      std::vector<index_t> ks;
      for (index_t k = 1; k <= E; ++k) ks.push_back(k);
      const auto tk = sweep_top_k(ctx, layer, matrix_view<const double>(x), matrix_view<const double>(yd), ks, "mine");
      REQUIRE(tk.size() == ks.size());
      for (std::size_t j = 0; j < ks.size(); ++j) {
        CAPTURE(ks[j]);
        CHECK(tk[j].router == "mine");
        CHECK(tk[j].policy == "top_k");
        CHECK(tk[j].k == ks[j]);
        CHECK(tk[j].tau == 0.0);
        CHECK(tk[j].mean_k == double(ks[j]));
        check_point(tk[j], reference(dense, layer.router(), x, E, 0.0, ks[j]), 1e-9);
      }
      // The sweeps leave the layer's options as they were.
      CHECK(layer.router().options().tau == 0.37);
      CHECK(layer.router().options().k_max == 0);
    }
  }

  TEST_CASE("tau = 0 reproduces the dense FFN; FLOPs fraction is 1 plus the router's share") {
    thread_pool pool(2);
    context<cpu> ctx{&pool};
    const index_t d = 24, E = 6, n = 8, H = 16, T = 150;
    const auto dense = random_dense<float, gelu_erf>(d, E * n, 77);
    auto layer = contiguous_moe(dense, E, H);
    layer.router().randomize(78);
    const rows<float> x = random_rows<float>(T, d, 79);
    const rows<float> yd = dense_output(ctx, dense, matrix_view<const float>(x));
    const auto p = sweep_dynamic_k(ctx, layer, matrix_view<const float>(x), matrix_view<const float>(yd), {0.0})[0];
    CHECK(p.rel_error < 1e-5);
    CHECK(p.token_rel_error < 1e-5);
    CHECK(p.mean_cosine == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(p.mean_k == double(E));
    CHECK(p.k_histogram[std::size_t(E)] == T);
    CHECK(p.expert_fraction == doctest::Approx(1.0).epsilon(1e-12));
    const double router_share = (2.0 * d * H + 2.0 * H * E) / (2.0 * d * (E * n) * 2.0);
    CHECK(p.router_fraction == doctest::Approx(router_share).epsilon(1e-12));
    CHECK(p.flops_fraction == doctest::Approx(1.0 + router_share).epsilon(1e-12));
    // Top-k with k = E is the same computation.
    const auto q = sweep_top_k(ctx, layer, matrix_view<const float>(x), matrix_view<const float>(yd), {E})[0];
    CHECK(q.rel_error < 1e-5);
    CHECK(q.flops_fraction == doctest::Approx(p.flops_fraction).epsilon(1e-12));
  }

  TEST_CASE("the documented workflow takes Eigen matrices directly (docs/conversion.md)") {
    const auto dense = random_dense<float, gelu_erf>(12, 24, 31);
    auto moe = contiguous_moe(dense, 6, 16, 0.5);
    const rows<float> calib = random_rows<float>(200, 12, 32), held = random_rows<float>(60, 12, 33);
    router_fit_options opt;
    opt.epochs = 10;
    const auto report = fit_router(moe, calib, router_target::output_norm, opt, held);
    CHECK(report.heldout_loss < report.heldout_initial_loss);
    context<cpu> ctx;
    const auto y_dense = dense_output(ctx, dense, held);
    const auto points = sweep_dynamic_k(ctx, moe, held, y_dense, {0.0, 0.5, 1.0});
    const auto base = sweep_top_k(ctx, moe, held, y_dense, {1, 6});
    REQUIRE(points.size() == 3);
    CHECK(points[0].rel_error < 1e-5);
    CHECK(points[2].mean_k < points[0].mean_k);
    CHECK(base[1].rel_error < 1e-5);
    const rows<float> targets = router_targets<gelu_erf>(moe.experts(), held, router_target::summed_activation);
    CHECK(targets.rows() == 60);
  }

  TEST_CASE("interpolate_error: linear in the FLOPs fraction between the bracketing points") {
    auto pt = [](double f, double e) {
      sweep_point p;
      p.flops_fraction = f;
      p.rel_error = e;
      return p;
    };
    const std::vector<sweep_point> curve{pt(0.6, 0.1), pt(0.2, 0.5), pt(0.4, 0.3), pt(0.4, 0.25)};
    CHECK(interpolate_error(curve, 0.2) == 0.5);
    CHECK(interpolate_error(curve, 0.3) == doctest::Approx(0.375));  // between 0.5 and the lower 0.25
    CHECK(interpolate_error(curve, 0.4) == 0.25);                     // tie: the lower error
    CHECK(interpolate_error(curve, 0.5) == doctest::Approx(0.175));
    CHECK(interpolate_error(curve, 0.6) == 0.1);
    CHECK(std::isnan(interpolate_error(curve, 0.1)));
    CHECK(std::isnan(interpolate_error(curve, 0.7)));
    CHECK(std::isnan(interpolate_error({}, 0.5)));
    std::vector<sweep_point> tok = curve;
    for (auto& p : tok) p.token_rel_error = 2 * p.rel_error;
    CHECK(interpolate_error(tok, 0.5, &sweep_point::token_rel_error) == doctest::Approx(0.35));
  }

  TEST_CASE("write_sweep_csv: header, one row per point, ';'-joined histogram") {
    sweep_point a;
    a.router = "d2dmoe";
    a.policy = "dynamic_k";
    a.tau = 0.25;
    a.tokens = 10;
    a.mean_k = 1.5;
    a.k_histogram = {0, 5, 5};
    a.flops_fraction = 0.8;
    a.expert_fraction = 0.75;
    a.router_fraction = 0.05;
    a.rel_error = 0.125;
    a.token_rel_error = 0.25;
    a.mean_cosine = 0.99;
    sweep_point b = a;
    b.router = "moefication";
    b.policy = "top_k";
    b.tau = 0;
    b.k = 2;
    b.k_histogram = {0, 0, 10};
    std::ostringstream os;
    write_sweep_csv(os, {a, b});
    const std::string want =
        "router,policy,tau,k,tokens,mean_k,flops_fraction,expert_fraction,router_fraction,rel_error,token_rel_error,"
        "mean_cosine,k_histogram\n"
        "d2dmoe,dynamic_k,0.25,0,10,1.5,0.8,0.75,0.05,0.125,0.25,0.99,0;5;5\n"
        "moefication,top_k,0,2,10,1.5,0.8,0.75,0.05,0.125,0.25,0.99,0;0;10\n";
    CHECK(os.str() == want);
    // Every row has as many fields as the header.
    std::istringstream is(os.str());
    std::string line;
    while (std::getline(is, line)) CHECK(std::count(line.begin(), line.end(), ',') == 12);
    b.router = "a,b";
    std::ostringstream bad;
    CHECK_THROWS_AS(write_sweep_csv(bad, {b}), dmoe::error);
    CHECK_THROWS_AS(write_sweep_csv("/nonexistent-dir/x.csv", {a}), dmoe::error);
  }

  TEST_CASE("sweeps reject bad taus, ks and shapes, and restore the options on error") {
    context<cpu> ctx;
    const auto dense = random_dense<double, relu>(5, 6, 5);
    auto layer = contiguous_moe(dense, 3, 4, 0.5);
    layer.router().randomize(6);
    const rows<double> x = random_rows<double>(7, 5, 7);
    const rows<double> yd = dense_output(ctx, dense, matrix_view<const double>(x));
    const rows<double> short_y = yd.topRows(6);
    CHECK_THROWS_AS(sweep_dynamic_k(ctx, layer, matrix_view<const double>(x), matrix_view<const double>(yd), {0.2, 1.5}),
                    dmoe::error);
    CHECK(layer.router().options().tau == 0.5);
    CHECK_THROWS_AS(sweep_top_k(ctx, layer, matrix_view<const double>(x), matrix_view<const double>(yd), {1, 4}),
                    dmoe::error);
    CHECK(layer.router().options().k_max == 0);
    CHECK_THROWS_AS(sweep_top_k(ctx, layer, matrix_view<const double>(x), matrix_view<const double>(yd), {0}),
                    dmoe::error);
    try {
      sweep_dynamic_k(ctx, layer, matrix_view<const double>(x), matrix_view<const double>(short_y), {0.1});
      FAIL("no error");
    } catch (const dmoe::error& e) {
      CHECK(std::string(e.what()).find("y_ref (6 x 5)") != std::string::npos);
    }
  }
}
