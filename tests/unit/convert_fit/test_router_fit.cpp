// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Router fitting (convert/router_fit.hpp): MoEfication targets against plain loops, the first
// full-batch AdamW step against a gradient computed here by finite differences of a plain-loop
// loss, loss reduction on synthetic layers, determinism, progress reports and bad inputs.
#include <doctest/doctest.h>

#include <cmath>
#include <dmoe/convert/router_fit.hpp>

#include "convert_fit_common.hpp"

using namespace dmoe;
using namespace convert_fit_test;

namespace {

/// Plain-loop regression loss: mean over tokens x experts of (r_te - y_te)^2.
double plain_loss(const dynamic_k_router<double>& r, const rows<double>& x, const rows<double>& y) {
  double s = 0;
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto sc = router_scores(r, x.row(t).data());
    for (index_t e = 0; e < r.num_experts(); ++e) s += (sc[std::size_t(e)] - y(t, e)) * (sc[std::size_t(e)] - y(t, e));
  }
  return s / (double(x.rows()) * double(r.num_experts()));
}

}  // namespace

TEST_SUITE("convert") {
  TEST_CASE("expert_summed_activations and router_targets match plain loops") {
    for (int i = 0; i < 4; ++i) {
      auto g = make_gen(100 + std::uint64_t(i));
      const index_t d = 3 + g.integer(0, 6), E = 2 + g.integer(0, 4), n = 1 + g.integer(0, 5), T = 1 + g.integer(0, 20);
      const auto dense = random_dense<double, gelu_erf>(d, E * n, 200 + std::uint64_t(i));
      auto layer = contiguous_moe(dense, E, 4);
      const rows<double> x = random_rows<double>(T, d, 300 + std::uint64_t(i));
      const rows<double> sa = router_targets<gelu_erf>(layer.experts(), matrix_view<const double>(x),
                                                       router_target::summed_activation);
      const rows<double> on = router_targets<gelu_erf>(layer.experts(), matrix_view<const double>(x),
                                                       router_target::output_norm);
      REQUIRE(sa.rows() == T);
      REQUIRE(sa.cols() == E);
      for (index_t t = 0; t < T; ++t) {
        const auto h = dense_hidden(dense, x.row(t).data());
        for (index_t e = 0; e < E; ++e) {
          double want = 0;
          for (index_t j = e * n; j < (e + 1) * n; ++j) want += std::max(h[std::size_t(j)], 0.0);
          CHECK(sa(t, e) == doctest::Approx(want).epsilon(1e-12));
          const auto y = expert_out(dense, h, e, n);
          double nn = 0;
          for (double v : y) nn += v * v;
          CHECK(on(t, e) == doctest::Approx(std::sqrt(nn)).epsilon(1e-12));
        }
      }
    }
  }

  TEST_CASE("fit_router: the first full-batch AdamW step follows the plain-loop gradient") {
    // With one step over the whole set (batch >= tokens), AdamW's first update is
    // -lr (g / (|g| + eps) + wd p): its sign pattern and size reveal the gradient the fit used.
    for (int i = 0; i < 3; ++i) {
      auto g = make_gen(400 + std::uint64_t(i));
      const index_t d = 3 + g.integer(0, 4), E = 2 + g.integer(0, 3), H = 2 + g.integer(0, 4), T = 5 + g.integer(0, 10);
      dynamic_k_router<double> r(d, E, {}, H);
      r.randomize(500 + std::uint64_t(i));
      const rows<double> x = random_rows<double>(T, d, 600 + std::uint64_t(i));
      const rows<double> y = random_rows<double>(T, E, 700 + std::uint64_t(i)).cwiseAbs();
      dynamic_k_router<double> before = r;
      router_fit_options opt;
      opt.epochs = 1;
      opt.batch_size = T + 3;
      opt.optimizer.lr = 1e-3;
      opt.optimizer.weight_decay = 0.0;
      const auto rep = fit_router(r, matrix_view<const double>(x), matrix_view<const double>(y), opt);
      CHECK(rep.steps == 1);
      CHECK(rep.initial_loss == doctest::Approx(plain_loss(before, x, y)).epsilon(1e-12));
      CHECK(rep.final_loss == doctest::Approx(plain_loss(r, x, y)).epsilon(1e-12));
      int checked = 0;
      auto check_param = [&](double& p_before, double p_after) {
        const double old = p_before, h = 1e-6;
        p_before = old + h;
        const double lp = plain_loss(before, x, y);
        p_before = old - h;
        const double lm = plain_loss(before, x, y);
        p_before = old;
        const double grad = (lp - lm) / (2 * h);
        if (std::fabs(grad) < 1e-5) return;  // too small for the finite difference to be sure of its sign
        const double want = old - opt.optimizer.lr * grad / (std::fabs(grad) + opt.optimizer.eps);
        CHECK(p_after == doctest::Approx(want).epsilon(1e-9));
        ++checked;
      };
      for (index_t k = 0; k < H; ++k) {
        for (index_t j = 0; j < d; ++j) check_param(before.w_in()(j, k), r.w_in()(j, k));
        for (index_t e = 0; e < E; ++e) check_param(before.w_out()(k, e), r.w_out()(k, e));
      }
      CHECK(checked > (d * H + H * E) / 3);
    }
  }

  TEST_CASE("fit_router reduces the D2DMoE and the MoEfication losses on a synthetic layer") {
    const index_t d = 16, E = 8, n = 6;
    const auto dense = random_dense<float, gelu_erf>(d, E * n, 11);
    const rows<float> x = random_rows<float>(512, d, 12), xh = random_rows<float>(128, d, 13);
    for (router_target target : {router_target::output_norm, router_target::summed_activation}) {
      CAPTURE(to_string(target));
      auto layer = contiguous_moe(dense, E, 32);
      router_fit_options opt;
      opt.epochs = 30;
      opt.batch_size = 32;
      opt.optimizer.lr = 3e-3;
      opt.seed = 5;
      std::vector<router_fit_progress> seen;
      const auto rep = fit_router(layer, matrix_view<const float>(x), target, opt, matrix_view<const float>(xh),
                                  [&](const router_fit_progress& p) { seen.push_back(p); });
      // The zero router was randomized first (otherwise nothing could move).
      CHECK_FALSE(layer.router().w_in().isZero(0));
      CHECK(rep.steps == 30 * 16);
      CHECK(rep.tokens_seen == 30 * 512);
      REQUIRE(seen.size() == 30);
      for (std::size_t i = 0; i < seen.size(); ++i) {
        CHECK(seen[i].epoch == int(i) + 1);
        CHECK(seen[i].epochs == 30);
        CHECK(seen[i].tokens_seen == index_t(i + 1) * 512);
        CHECK(seen[i].steps == long(i + 1) * 16);
        CHECK(std::isfinite(seen[i].loss));
        if (i) CHECK(seen[i].seconds >= seen[i - 1].seconds);
      }
      CHECK(seen.back().loss < seen.front().loss);
      // A learned predictor: well below both its start and the loss of predicting zero.
      CHECK(rep.final_loss < 0.2 * rep.initial_loss);
      CHECK(rep.final_loss < 0.2 * rep.target_mean_square);
      CHECK(rep.heldout_loss < 0.3 * rep.heldout_initial_loss);
      // The report's losses are exact means over the sets.
      const rows<float> yt = router_targets<gelu_erf>(layer.experts(), matrix_view<const float>(x), target);
      CHECK(rep.final_loss == doctest::Approx(double(router_regression_loss(
                                  layer.router(), matrix_view<const float>(x), matrix_view<const float>(yt))))
                                  .epsilon(1e-6));
    }
  }

  TEST_CASE("fit_router is deterministic for a seed, and the seed matters") {
    const auto dense = random_dense<float, relu>(6, 12, 21);
    const rows<float> x = random_rows<float>(100, 6, 22);
    router_fit_options opt;
    opt.epochs = 3;
    opt.batch_size = 16;
    auto a = contiguous_moe(dense, 3, 8), b = contiguous_moe(dense, 3, 8), c = contiguous_moe(dense, 3, 8);
    fit_router(a, matrix_view<const float>(x), router_target::output_norm, opt);
    fit_router(b, matrix_view<const float>(x), router_target::output_norm, opt);
    opt.seed = 1;
    fit_router(c, matrix_view<const float>(x), router_target::output_norm, opt);
    CHECK(a.router().w_in() == b.router().w_in());
    CHECK(a.router().w_out() == b.router().w_out());
    CHECK(a.router().w_out() != c.router().w_out());
  }

  TEST_CASE("fit_router rejects bad inputs with messages naming them") {
    dynamic_k_router<double> r(4, 3, {}, 5);
    rows<double> x = random_rows<double>(10, 4, 1), y = random_rows<double>(10, 3, 2).cwiseAbs();
    const auto msg = [&](auto&& f) {
      try {
        f();
      } catch (const dmoe::error& e) {
        return std::string(e.what());
      }
      return std::string("no error");
    };
    const rows<double> bad_cols = random_rows<double>(10, 5, 3), bad_y = random_rows<double>(9, 3, 4);
    CHECK(msg([&] { fit_router(r, matrix_view<const double>(bad_cols), matrix_view<const double>(y)); })
              .find("x is (10 x 5)") != std::string::npos);
    CHECK(msg([&] { fit_router(r, matrix_view<const double>(x), matrix_view<const double>(bad_y)); })
              .find("targets (9 x 3)") != std::string::npos);
    router_fit_options opt;
    opt.batch_size = 0;
    CHECK(msg([&] { fit_router(r, matrix_view<const double>(x), matrix_view<const double>(y), opt); })
              .find("batch_size") != std::string::npos);
    CHECK(msg([&] { fit_router(r, matrix_view<const double>(x.data(), 0, 4), matrix_view<const double>(y.data(), 0, 3)); })
              .find("at least one token") != std::string::npos);
    x(3, 2) = std::nan("");
    CHECK(msg([&] { fit_router(r, matrix_view<const double>(x), matrix_view<const double>(y)); })
              .find("x(3, 2) is not finite") != std::string::npos);
    x(3, 2) = 0;
    CHECK(msg([&] {
            fit_router(r, matrix_view<const double>(x), matrix_view<const double>(y), {},
                       matrix_view<const double>(bad_cols), matrix_view<const double>(y));
          }).find("heldout_x") != std::string::npos);
  }
}
