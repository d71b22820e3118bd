// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Attention projection -> MLP (convert/attention.hpp): the width formula, the fit's loss gradient
// against finite differences, the fitted MLP reproducing a random linear map on its input
// distribution (checked with plain loops), layouts, the sparsity term, determinism, the MLP's
// split + route with every expert equal to the MLP, and errors.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include <dmoe/convert/attention.hpp>
#include <dmoe/convert/convert_ffn.hpp>

#include "test_random.hpp"

namespace {

using dmoe::index_t;
using dmoe::row_matrix;

class rng : public dmoe_testing::splitmix {
 public:
  explicit rng(std::uint64_t seed) : splitmix(seed, 0x94D049BB133111EBull, 0xA77ull) {}
};

/// A random linear map and inputs on an r-dimensional subspace plus small isotropic noise (the
/// regime of real projection inputs, where an MLP of the same cost can reproduce the map).
template <class T>
struct problem {
  dmoe::col_matrix<T> w;
  dmoe::column_vector<T> b;
  row_matrix<T> x, heldout;
};

template <class T>
problem<T> make_problem(std::uint64_t seed, index_t d, index_t r, index_t tokens, index_t heldout) {
  rng g(seed);
  problem<T> p;
  p.w.resize(d, d);
  p.b.resize(d);
  for (index_t i = 0; i < d; ++i) {
    for (index_t j = 0; j < d; ++j) p.w(i, j) = T(g.normal() / std::sqrt(double(d)));
    p.b(i) = T(0.1 * g.normal());
  }
  std::vector<double> basis(std::size_t(r * d));
  for (auto& v : basis) v = g.normal();
  const auto sample = [&](index_t n) {
    row_matrix<T> x(n, d);
    std::vector<double> z(static_cast<std::size_t>(r));
    for (index_t t = 0; t < n; ++t) {
      for (auto& v : z) v = g.normal();
      for (index_t j = 0; j < d; ++j) {
        double s = 0.01 * g.normal();
        for (index_t k = 0; k < r; ++k) s += z[std::size_t(k)] * basis[std::size_t(k * d + j)];
        x(t, j) = T(s);
      }
    }
    return x;
  };
  p.x = sample(tokens);
  p.heldout = sample(heldout);
  return p;
}

/// ||MLP(x) - (x W + b)|| / ||x W + b||: the MLP through the library's dense forward, the map in
/// plain double loops.
template <class T, class Act>
double relative_error(const dmoe::dense_ffn<T, Act>& mlp, const problem<T>& p, const row_matrix<T>& x) {
  const index_t n = x.rows(), d = x.cols();
  row_matrix<T> y(n, d);
  dmoe::context<dmoe::cpu> ctx;
  dmoe::workspace_buffer ws(mlp.workspace_size(ctx, n));
  REQUIRE(mlp.forward(ctx, x, y, ws).ok());
  double num = 0, den = 0;
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) {
      double want = double(p.b(j));
      for (index_t i = 0; i < d; ++i) want += double(x(t, i)) * double(p.w(i, j));
      num += (double(y(t, j)) - want) * (double(y(t, j)) - want);
      den += want * want;
    }
  return std::sqrt(num / den);
}

dmoe::attention_mlp_options fit_options() {
  dmoe::attention_mlp_options o;
  o.epochs = 40;
  o.seed = 5;
  return o;
}

}  // namespace

TEST_SUITE("convert") {
  TEST_CASE("attention: hidden width round((d^2 + d) / (2d + 1))") {
    for (index_t d = 1; d <= 1100; ++d) {
      // Integer rounding of the exact fraction (half up; the fraction is never exactly .5 here).
      const index_t num = d * d + d, den = 2 * d + 1;
      const index_t want = (2 * num + den) / (2 * den);
      CHECK(dmoe::attention_mlp_hidden(d) == (want > 0 ? want : 1));
    }
    CHECK(dmoe::attention_mlp_hidden(768) == 384);
    CHECK(dmoe::attention_mlp_hidden(384) == 192);
    CHECK(dmoe::attention_mlp_hidden(16) == 8);
    CHECK_THROWS_AS(dmoe::attention_mlp_hidden(0), dmoe::error);
  }

  TEST_CASE("attention: the fit's loss gradient matches finite differences") {
    for (int c = 0; c < 4; ++c) {
      rng g(std::uint64_t(40 + c));
      const index_t d = g.integer(2, 9), h = g.integer(1, 7), n = g.integer(1, 12);
      dmoe::dense_ffn<double, dmoe::gelu_erf> f(d, h), grad(d, h);
      f.randomize(std::uint64_t(c));
      row_matrix<double> x(n, d), y(n, d);
      for (index_t t = 0; t < n; ++t)
        for (index_t j = 0; j < d; ++j) {
          x(t, j) = g.normal();
          y(t, j) = g.normal();
        }
      const double scale = 0.37, lambda = c % 2 ? 0.5 : 0.0;
      double mse = 0;
      const double loss = dmoe::detail::conversion::mlp_loss(f, x, y, scale, lambda, grad, mse);
      CHECK(mse <= loss + 1e-15);
      const double eps = 1e-6;
      int bad = 0;
      const auto probe = [&](auto& param, auto& gparam) {
        for (index_t i = 0; i < param.size(); ++i) {
          const double keep = param.data()[i];
          double m1 = 0, m2 = 0;
          dmoe::dense_ffn<double, dmoe::gelu_erf> tmp(d, h);
          param.data()[i] = keep + eps;
          const double lp = dmoe::detail::conversion::mlp_loss(f, x, y, scale, lambda, tmp, m1);
          param.data()[i] = keep - eps;
          const double lm = dmoe::detail::conversion::mlp_loss(f, x, y, scale, lambda, tmp, m2);
          param.data()[i] = keep;
          const double fd = (lp - lm) / (2 * eps);
          if (std::fabs(fd - gparam.data()[i]) > 1e-5 * (1 + std::fabs(fd))) ++bad;
        }
      };
      probe(f.w1(), grad.w1());
      probe(f.b1(), grad.b1());
      probe(f.w2(), grad.w2());
      probe(f.b2(), grad.b2());
      CHECK(bad == 0);
    }
  }

  TEST_CASE_TEMPLATE("attention: the trained MLP reproduces a random linear map on its input distribution", T, float,
                     double) {
    const auto p = make_problem<T>(11, 16, 3, 2048, 512);
    int calls = 0;
    index_t last_tokens = 0;
    const auto res = dmoe::fit_attention_mlp(p.w, p.b, p.x, fit_options(), p.heldout, dmoe::weight_layout::in_out,
                                             [&](const dmoe::attention_mlp_progress& pr) {
                                               ++calls;
                                               CHECK(pr.epoch == calls);
                                               CHECK(pr.tokens_seen > last_tokens);
                                               CHECK(std::isfinite(pr.loss));
                                               last_tokens = pr.tokens_seen;
                                             });
    const auto& rep = res.report;
    CHECK(calls == 40);
    CHECK(rep.hidden == 8);
    CHECK(res.mlp.hidden() == 8);
    CHECK(rep.tokens_seen == 40 * 2048);
    CHECK(rep.steps == 40 * 32);
    CHECK(rep.initial_relative_error > 0.5);
    const double train = relative_error(res.mlp, p, p.x), held = relative_error(res.mlp, p, p.heldout);
    INFO("train ", train, " held-out ", held);
    CHECK(held < 0.05);  // 0.020 here; 0.006-0.014 over other seeds of this setting
    CHECK(rep.relative_error == doctest::Approx(train).epsilon(1e-3));
    CHECK(rep.heldout_relative_error == doctest::Approx(held).epsilon(1e-3));
    CHECK(rep.active_fraction > 0.0);
    CHECK(rep.active_fraction < 1.0);
  }

  TEST_CASE("attention: PyTorch (out, in) layout gives the same MLP; no bias means zero bias") {
    const auto p = make_problem<double>(12, 10, 2, 256, 0);
    auto o = fit_options();
    o.epochs = 3;
    const auto a = dmoe::fit_attention_mlp(p.w, p.b, p.x, o);
    const dmoe::col_matrix<double> wt = p.w.transpose();
    const auto b = dmoe::fit_attention_mlp(wt, p.b, p.x, o, {}, dmoe::weight_layout::out_in);
    CHECK(a.mlp.w1() == b.mlp.w1());
    CHECK(a.mlp.w2() == b.mlp.w2());
    CHECK(a.mlp.b2() == b.mlp.b2());
    CHECK(std::isnan(a.report.heldout_relative_error));
    const auto c = dmoe::fit_attention_mlp(p.w, dmoe::column_vector<double>(), p.x, o);
    const auto z = dmoe::fit_attention_mlp(p.w, dmoe::column_vector<double>::Zero(10).eval(), p.x, o);
    CHECK(c.mlp.w1() == z.mlp.w1());
    // Same seed, same result; another seed, another init.
    const auto a2 = dmoe::fit_attention_mlp(p.w, p.b, p.x, o);
    CHECK(a2.mlp.w1() == a.mlp.w1());
    o.seed = 6;
    CHECK(dmoe::fit_attention_mlp(p.w, p.b, p.x, o).mlp.w1() != a.mlp.w1());
  }

  TEST_CASE("attention: the Hoyer term makes the hidden activations sparser") {
    const auto p = make_problem<float>(13, 16, 3, 1024, 256);
    auto o = fit_options();
    o.epochs = 30;
    o.sparsity_weight = 0.0;
    const auto dense = dmoe::fit_attention_mlp(p.w, p.b, p.x, o, p.heldout);
    o.sparsity_weight = 0.3;
    const auto sparse = dmoe::fit_attention_mlp(p.w, p.b, p.x, o, p.heldout);
    INFO("active ", dense.report.heldout_active_fraction, " -> ", sparse.report.heldout_active_fraction);
    CHECK(sparse.report.heldout_active_fraction < 0.9 * dense.report.heldout_active_fraction);
    CHECK(sparse.report.heldout_relative_error < 0.1);
  }

  TEST_CASE("attention: the fitted MLP, split and routed with every expert on, equals the MLP") {
    const auto p = make_problem<double>(14, 24, 4, 1024, 128);
    auto o = fit_options();
    o.epochs = 10;
    const auto res = dmoe::fit_attention_mlp(p.w, p.b, p.x, o);
    REQUIRE(res.mlp.hidden() == 12);
    for (index_t E : {1, 2, 3, 4, 6, 12}) {
      const auto s = dmoe::split_neurons(res.mlp, E);
      const auto moe = dmoe::to_moe<dmoe::dynamic_k>(res.mlp, s, {0.0}, 8);
      dmoe::context<dmoe::cpu> ctx;
      const index_t n = p.heldout.rows();
      row_matrix<double> y1(n, 24), y2(n, 24);
      dmoe::workspace_buffer ws(std::max(moe.workspace_size(ctx, n), res.mlp.workspace_size(ctx, n)));
      REQUIRE(moe.forward(ctx, p.heldout, y1, ws).ok());
      REQUIRE(res.mlp.forward(ctx, p.heldout, y2, ws).ok());
      CHECK((y1 - y2).cwiseAbs().maxCoeff() <= 1e-12 * (1 + y2.cwiseAbs().maxCoeff()));
    }
  }

  TEST_CASE("attention: bad inputs are clear errors") {
    const auto p = make_problem<float>(15, 6, 2, 32, 0);
    const auto message_of = [&](auto&& f) {
      try {
        f();
      } catch (const dmoe::error& e) {
        return std::string(e.what());
      }
      return std::string("no error");
    };
    const dmoe::col_matrix<float> rect(6, 5);
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(rect, p.b, p.x); }).find("square") != std::string::npos);
    const dmoe::column_vector<float> b3(3);
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, b3, p.x); }).find("bias has 3") != std::string::npos);
    const row_matrix<float> x5(4, 5), x0(0, 6);
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, p.b, x5); }).find("x is (4 x 5)") != std::string::npos);
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, p.b, x0); }).find("tokens >= 1") != std::string::npos);
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, p.b, p.x, {}, x5); }).find("heldout_x") !=
          std::string::npos);
    auto bad = p.x;
    bad(3, 2) = std::numeric_limits<float>::infinity();
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, p.b, bad); }).find("x(3, 2) is not finite") !=
          std::string::npos);
    auto o = fit_options();
    o.batch_size = 0;
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, p.b, p.x, o); }).find("batch_size") != std::string::npos);
    o = fit_options();
    o.sparsity_ramp = 2;
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, p.b, p.x, o); }).find("sparsity_ramp") !=
          std::string::npos);
    o = fit_options();
    o.optimizer.lr = 1e20;  // diverges: float overflows
    CHECK(message_of([&] { (void)dmoe::fit_attention_mlp(p.w, p.b, p.x, o); }).find("loss became") !=
          std::string::npos);
  }
}
