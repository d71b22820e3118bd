// Training utilities: router regression loss, activation-sparsity penalties, optimizers,
// DynMoE adaptive expert count. Gradients are checked by central finite differences in double.
#include <doctest/doctest.h>

#include <cmath>
#include <dmoe/dmoe.hpp>

using namespace dmoe;

namespace {
row_matrix<double> random_rows(index_t rows, index_t cols, std::uint64_t seed) {
  detail::rng g(seed);
  row_matrix<double> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) m(i, j) = g.uniform(-1, 1);
  return m;
}

template <class F>
double central_difference(double& p, F&& f, double h = 1e-6) {
  const double old = p;
  p = old + h;
  const double lp = f();
  p = old - h;
  const double lm = f();
  p = old;
  return (lp - lm) / (2 * h);
}

bool close(double num, double an) { return std::abs(num - an) <= 1e-6 * std::max(1.0, std::abs(num) + std::abs(an)); }
}  // namespace

TEST_SUITE("train") {
  TEST_CASE("router regression loss: value and gradient") {
    for (std::uint64_t seed = 1; seed <= 4; ++seed) {
      detail::rng g(seed);
      const index_t d = 3 + index_t(g.below(6)), E = 2 + index_t(g.below(5)), h = 2 + index_t(g.below(6));
      const index_t T = 1 + index_t(g.below(9));
      dynamic_k_router<double> r(d, E, {}, h), grad(d, E, {}, h);
      r.randomize(seed);
      const auto x = random_rows(T, d, seed + 10);
      const auto y = random_rows(T, E, seed + 20).cwiseAbs().eval();
      const double loss = router_regression_loss<double>(r, x, y, &grad);
      // independent value: plain loops
      double ref = 0;
      for (index_t t = 0; t < T; ++t)
        for (index_t e = 0; e < E; ++e) {
          double z = 0;
          for (index_t k = 0; k < h; ++k) {
            double a = 0;
            for (index_t i = 0; i < d; ++i) a += x(t, i) * r.w_in()(i, k);
            z += std::max(a, 0.0) * r.w_out()(k, e);
          }
          ref += (std::abs(z) - y(t, e)) * (std::abs(z) - y(t, e));
        }
      CHECK(loss == doctest::Approx(ref / double(T * E)).epsilon(1e-12));
      auto f = [&] { return router_regression_loss<double>(r, x, y); };
      for (index_t i = 0; i < r.w_in().size(); ++i)
        CHECK(close(central_difference(r.w_in().data()[i], f), grad.w_in().data()[i]));
      for (index_t i = 0; i < r.w_out().size(); ++i)
        CHECK(close(central_difference(r.w_out().data()[i], f), grad.w_out().data()[i]));
    }
  }

  TEST_CASE("expert output norms are the all-experts forward norms without b2") {
    moe_config cfg{5, 3, 4};
    cfg.expert_bias = false;
    moe_layer<double, cpu, dynamic_k, gelu_erf> layer(cfg, {0.0, 0});
    layer.randomize(7);
    const auto x = random_rows(6, 5, 3);
    const auto norms = expert_output_norms<gelu_erf, double>(layer.experts(), x);
    for (index_t t = 0; t < 6; ++t)
      for (index_t e = 0; e < 3; ++e) {
        double sq = 0;
        for (index_t j = 0; j < 5; ++j) {
          double y = 0;
          for (index_t k = 0; k < 4; ++k) {
            double a = layer.experts().b1(e)[k];
            for (index_t i = 0; i < 5; ++i) a += x(t, i) * layer.experts().w1(e)(i, k);
            y += 0.5 * a * (1 + std::erf(a / std::sqrt(2.0))) * layer.experts().w2(e)(k, j);
          }
          sq += y * y;
        }
        CHECK(norms(t, e) == doctest::Approx(std::sqrt(sq)).epsilon(1e-12));
      }
  }

  TEST_CASE("activation sparsity penalties: values and gradients") {
    auto a = random_rows(4, 7, 11);
    a(1, 3) = 0.0;  // a zero activation: |a| has a kink; the subgradient used is 0
    row_matrix<double> g(4, 7);
    for (auto kind : {sparsity_penalty::hoyer_squared, sparsity_penalty::l1}) {
      const double v = activation_sparsity<double>(kind, a, g);
      double ref = 0;
      for (index_t t = 0; t < 4; ++t) {
        double s1 = 0, s2 = 0;
        for (index_t j = 0; j < 7; ++j) {
          s1 += std::abs(a(t, j));
          s2 += a(t, j) * a(t, j);
        }
        ref += kind == sparsity_penalty::l1 ? s1 : s1 * s1 / (s2 + 1e-15);
      }
      CHECK(v == doctest::Approx(ref / 4).epsilon(1e-12));
      auto f = [&] { return activation_sparsity<double>(kind, a); };
      for (index_t t = 0; t < 4; ++t)
        for (index_t j = 0; j < 7; ++j)
          if (a(t, j) != 0.0) CHECK(close(central_difference(a(t, j), f), g(t, j)));
      CHECK(g(1, 3) == 0.0);
    }
  }

  TEST_CASE("optimizers: AdamW and SGD steps follow their formulas; router-only groups freeze experts") {
    moe_config cfg{4, 3, 2};
    moe_layer<double, cpu, top_k, relu> layer(cfg, {2, true});
    layer.randomize(1);
    auto grads = layer.make_gradients();
    for (auto& p : grads.parameters())
      for (index_t i = 0; i < p.size; ++i) p.data[i] = 0.1 * double(i % 5) - 0.2;
    const auto before = layer.parameters();
    std::vector<std::vector<double>> old;
    for (auto& p : before) old.emplace_back(p.data, p.data + p.size);

    adamw<double> opt(layer.parameters(param_group::router), {0.01, 0.9, 0.999, 1e-8, 0.1});
    REQUIRE(opt.step(grads.parameters(param_group::router)).ok());
    const auto after = layer.parameters();
    for (std::size_t i = 0; i < after.size(); ++i) {
      const bool router = std::string(after[i].name).rfind("router", 0) == 0;
      for (index_t j = 0; j < after[i].size; ++j) {
        const double p0 = old[i][std::size_t(j)];
        if (!router) {
          CHECK(after[i].data[j] == p0);  // frozen
          continue;
        }
        // first step: m_hat = g, v_hat = g^2 -> update g/(|g|+eps) + wd p
        const auto& gl = grads.parameters(param_group::router);
        const double gv = gl[i - (after.size() - gl.size())].data[j];
        const double expect = p0 - 0.01 * (gv / (std::abs(gv) + 1e-8) + 0.1 * p0);
        CHECK(after[i].data[j] == doctest::Approx(expect).epsilon(1e-12));
      }
    }
    // mismatched gradient lists are an error, not a crash
    CHECK_FALSE(opt.step(grads.parameters(param_group::all)).ok());

    sgd<double> s(layer.parameters(param_group::experts), {0.5, 0.9, 0.0});
    auto gl = grads.parameters(param_group::experts);
    const double p0 = layer.parameters(param_group::experts)[0].data[0];
    REQUIRE(s.step(gl).ok());
    REQUIRE(s.step(gl).ok());
    // v1 = g, p1 = p0 - 0.5 g; v2 = 0.9 g + g, p2 = p1 - 0.5 * 1.9 g
    CHECK(layer.parameters(param_group::experts)[0].data[0] == doctest::Approx(p0 - 0.5 * gl[0].data[0] * 2.9));
  }

  TEST_CASE("adaptive expert count: removal, addition, full layer, zero inputs") {
    const index_t d = 3, E = 4;
    top_any_router<double> r(d, E, {true});
    r.randomize(5, 2);  // slots 0, 1 active; 2, 3 free
    expert_count_adapter<double> ad(d, E, /*interval=*/2);
    row_matrix<double> x(3, d);
    x << 1, 0, 0, 0, 1, 0, 0, 0, 2;
    row_matrix<double> cos(3, E);
    // token 0 fires slot 0; tokens 1, 2 fire nothing (threshold 0, cos <= 0); slot 1 idle.
    cos << 0.5, -0.1, 0.9, 0.9, -0.2, -0.3, 0.9, 0.9, 0.0, -0.4, 0.9, 0.9;
    REQUIRE(ad.record(r, x, cos).ok());
    CHECK(ad.window_counts()[0] == 1.0);
    CHECK(ad.window_counts()[2] == 0.0);  // free slots never count, whatever their cos
    CHECK(ad.window_unrouted()[1] == 1.0);
    CHECK(ad.window_unrouted()[2] == 2.0);
    // counted in optimizer steps: the first step does nothing
    CHECK_FALSE(ad.on_optimizer_step(r).updated);
    const auto rep = ad.on_optimizer_step(r);
    REQUIRE(rep.updated);
    REQUIRE(rep.removed.size() == 1);
    CHECK(rep.removed[0] == 1);
    CHECK(rep.added == 1);  // lowest free slot after removal is 1 again: seeded from R_S
    CHECK(r.active()[1] == 1);
    CHECK(r.weight()(0, 1) == doctest::Approx(0.0));
    CHECK(r.weight()(1, 1) == doctest::Approx(1.0 / std::sqrt(5.0)));
    CHECK(r.weight()(2, 1) == doctest::Approx(2.0 / std::sqrt(5.0)));
    CHECK(r.threshold()[1] == 0.0);
    CHECK(rep.active_after == 2);
    CHECK(ad.window_counts()[0] == 0.0);  // window restarted

    // full layer: every slot active and used, unrouted input present -> nothing added
    top_any_router<double> full(d, 2, {true});
    full.randomize(1);
    expert_count_adapter<double> ad2(d, 2);
    row_matrix<double> c2(2, 2);
    c2 << 0.5, -0.5, -0.5, 0.5;
    row_matrix<double> x2 = row_matrix<double>::Ones(2, d);
    REQUIRE(ad2.record(full, x2, c2).ok());
    ad2.window_unrouted()[0] = 1.0;  // as if another replica saw an unrouted token
    const auto rep2 = ad2.update(full);
    CHECK(rep2.removed.empty());
    CHECK(rep2.added == -1);
    CHECK(rep2.active_after == 2);

    // zero inputs, nothing fires: every expert idle, R_S = 0 -> guard keeps the lowest slot
    top_any_router<double> z(d, 3, {true});
    z.randomize(2);
    expert_count_adapter<double> ad3(d, 3);
    row_matrix<double> c3 = row_matrix<double>::Zero(2, 3);
    row_matrix<double> x3 = row_matrix<double>::Zero(2, d);
    REQUIRE(ad3.record(z, x3, c3).ok());
    const auto rep3 = ad3.update(z);
    CHECK(rep3.kept_by_guard == 0);
    CHECK(rep3.active_after == 1);
    CHECK(z.active()[0] == 1);

    // shape errors are reported
    row_matrix<double> bad(2, 5);
    CHECK_FALSE(ad3.record(z, x3, bad).ok());
  }
}
