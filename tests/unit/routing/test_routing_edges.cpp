// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Edge cases of the three selection rules (docs/algorithms.md sections 2-4: top-k, dynamic-k, top-any): exact ties (built
// from small integers and dyadic values, so they are exact in float and double whatever the
// summation order), thresholds met with equality, k = E, tau = 0 and 1, all-zero router scores,
// masked slots, tokens that fire nothing, x = 0, experts that get no tokens and every expert
// selected. Each run is also checked against the reference (plan and output).
#include <doctest/doctest.h>

#include <vector>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::row_matrix;
using ivec = std::vector<int>;

namespace {

template <class T, class P, class A = dmoe::relu>
layer_t<T, P, A> make_layer(int d, int E, int n, const typename P::options& opt, std::uint64_t seed = 1,
                            int router_hidden = 8) {
  dmoe::moe_config c;
  c.d_model = d;
  c.num_experts = E;
  c.expert_width = n;
  c.hidden_bias = true;
  c.expert_bias = false;
  c.output_bias = true;
  c.router_hidden = router_hidden;
  layer_t<T, P, A> l(c, opt);
  test_rng g(seed);
  randomize_experts(l.experts(), g);
  return l;
}

template <class T>
row_matrix<T> rows(std::initializer_list<std::initializer_list<double>> v) {
  row_matrix<T> x(index_t(v.size()), index_t(v.begin()->size()));
  index_t i = 0;
  for (const auto& r : v) {
    index_t j = 0;
    for (double e : r) x(i, j++) = T(e);
    ++i;
  }
  return x;
}

template <class T>
bool row_equals_bias(const row_matrix<T>& y, index_t t, const dmoe::expert_weights<T>& w) {
  for (index_t c = 0; c < y.cols(); ++c) {
    const T want = w.output_bias().size() ? w.output_bias()(c) : T(0);
    if (y(t, c) != want) return false;
  }
  return true;
}

}  // namespace

TEST_SUITE("routing") {
  // --- top-k ----------------------------------------------------------------------------
  TEST_CASE_TEMPLATE("top_k: equal logits go to the lower expert id", T, float, double) {
    // W = 0 and bias = logits: z = [2, 5, 3, 5, 3] exactly.
    for (int k : {1, 2, 3, 4, 5}) {
      CAPTURE(k);
      auto layer = make_layer<T, dmoe::top_k>(3, 5, 4, {k, true});
      layer.router().bias() << T(2), T(5), T(3), T(5), T(3);
      test_rng g(7);
      const auto x = random_tokens<T>(g, 4, 3);
      const auto r = run_layer(layer, x);
      check_run(r);
      const ivec want[] = {{}, {1}, {1, 3}, {1, 2, 3}, {1, 2, 3, 4}, {0, 1, 2, 3, 4}};
      for (index_t t = 0; t < 4; ++t) CHECK(r.experts(t) == want[k]);
    }
  }

  TEST_CASE_TEMPLATE("top_k: identical router columns, lower id wins", T, float, double) {
    auto layer = make_layer<T, dmoe::top_k>(2, 4, 3, {1, true});
    layer.router().weight() << T(1), T(0), T(1), T(-1),  //
        T(1), T(0), T(1), T(0);
    const auto x = rows<T>({{1, 2}, {-1, -2}});  // z = [3, 0, 3, -1] and [-3, 0, -3, 1]
    const ivec want1[] = {{0}, {3}}, want2[] = {{0, 2}, {1, 3}}, want3[] = {{0, 1, 2}, {0, 1, 3}};
    for (int k : {1, 2, 3}) {
      CAPTURE(k);
      layer.router().set_options({k, true});
      const auto r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 2; ++t) CHECK(r.experts(t) == (k == 1 ? want1 : k == 2 ? want2 : want3)[t]);
    }
    layer.router().set_options({2, true});
    const auto r = run_layer(layer, x);
    CHECK(r.weights(0)[0] == doctest::Approx(0.5));  // the two tied experts share the weight
    CHECK(r.weights(0)[1] == doctest::Approx(0.5));
  }

  TEST_CASE_TEMPLATE("top_k: k = E selects every expert", T, float, double) {
    for (bool renorm : {true, false}) {
      auto layer = make_layer<T, dmoe::top_k>(6, 5, 3, {5, renorm}, 3);
      test_rng g(11);
      randomize_router(layer.router(), g, case_params{});
      const auto x = random_tokens<T>(g, 20, 6);
      const auto r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 20; ++t) {
        CHECK(r.experts(t) == ivec{0, 1, 2, 3, 4});
        double sum = 0;
        for (double w : r.weights(t)) sum += w;
        CHECK(sum == doctest::Approx(1.0).epsilon(1e-5));  // p sums to one either way
      }
      CHECK(r.stats.k_histogram[5] == 20);
    }
  }

  TEST_CASE_TEMPLATE("top_k: renormalisation on and off", T, float, double) {
    for (bool renorm : {true, false}) {
      auto layer = make_layer<T, dmoe::top_k>(8, 6, 3, {2, renorm}, 5);
      test_rng g(13);
      randomize_router(layer.router(), g, case_params{});
      const auto x = random_tokens<T>(g, 30, 8);
      const auto r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 30; ++t) {
        const auto w = r.weights(t);
        REQUIRE(w.size() == 2);
        if (renorm)
          CHECK(w[0] + w[1] == doctest::Approx(1.0).epsilon(1e-5));
        else
          CHECK(w[0] + w[1] < 1.0 - 1e-6);  // p of 2 of 6 experts, none near 1 for these weights
      }
    }
  }

  // --- dynamic-k --------------------------------------------------------------------------
  TEST_CASE_TEMPLATE("dynamic_k: ties and thresholds met with equality", T, float, double) {
    // Wa = I (2 x 2); Wb columns (1,0), (0,2), (2,0), (0,-2), (1,1). All exact.
    auto layer = make_layer<T, dmoe::dynamic_k>(2, 5, 3, {0.5, 0}, 1, 2);
    layer.router().w_in() << T(1), T(0), T(0), T(1);
    layer.router().w_out() << T(1), T(0), T(2), T(0), T(1),  //
        T(0), T(2), T(0), T(-2), T(1);
    struct expect {
      double tau;
      int k_max;
      ivec a, b, c;  // for x = (1, 1): r = [1 2 2 2 2]; x = (2, 1): r = [2 2 4 2 3]; x = (-1, -1): r = 0
    };
    const expect cases[] = {
        {1.0, 0, {1, 2, 3, 4}, {2}, {0, 1, 2, 3, 4}},
        {1.0, 2, {1, 2}, {2}, {0, 1}},
        {0.75, 0, {1, 2, 3, 4}, {2, 4}, {0, 1, 2, 3, 4}},
        {0.5, 0, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}},  // r_e == tau max r runs
        {0.0, 0, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}},
        {0.0, 1, {1}, {2}, {0}},
        {0.0, 2, {1, 2}, {2, 4}, {0, 1}},
        {0.0, 3, {1, 2, 3}, {0, 2, 4}, {0, 1, 2}},  // ties at the cap keep the lower ids
        {0.5, 5, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}},
    };
    const auto x = rows<T>({{1, 1}, {2, 1}, {-1, -1}});
    for (const auto& c : cases) {
      CAPTURE(c.tau);
      CAPTURE(c.k_max);
      layer.router().set_options({c.tau, c.k_max});
      const auto r = run_layer(layer, x);
      check_run(r);
      CHECK(r.experts(0) == c.a);
      CHECK(r.experts(1) == c.b);
      CHECK(r.experts(2) == c.c);
      for (index_t t = 0; t < 3; ++t)
        for (double w : r.weights(t)) CHECK(w == 1.0);
    }
  }

  TEST_CASE_TEMPLATE("dynamic_k: zero router weights give r = 0 and every expert runs", T, float, double) {
    for (double tau : {0.0, 0.5, 1.0}) {
      CAPTURE(tau);
      auto layer = make_layer<T, dmoe::dynamic_k>(7, 6, 4, {tau, 0}, 2, 16);  // router weights stay 0
      test_rng g(3);
      const auto x = random_tokens<T>(g, 25, 7);
      const auto r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 25; ++t) CHECK(r.experts(t) == ivec{0, 1, 2, 3, 4, 5});
      layer.router().set_options({tau, 3});
      const auto r3 = run_layer(layer, x);
      check_run(r3);
      for (index_t t = 0; t < 25; ++t) CHECK(r3.experts(t) == ivec{0, 1, 2});
    }
  }

  TEST_CASE_TEMPLATE("dynamic_k: the arg-max always runs, tau = 1 runs only it", T, float, double) {
    for (int i = 0; i < 10; ++i) {
      case_params p = random_params(seed_of("edges/dynamic_k/argmax", i), ref::policy_kind::dynamic_k);
      p.tokens = 40;
      prepared_case<T, dmoe::dynamic_k, dmoe::relu> c(p);
      for (double tau : {1.0, 0.3}) {
        c.layer.router().set_options({tau, 0});
        const auto r = run_layer(c.layer, c.x);
        REQUIRE(r.status.ok());
        for (index_t t = 0; t < p.tokens; ++t) {
          const auto& rt = r.ref.routes[std::size_t(t)];
          if (rt.margin < borderline_margin<T>()) continue;
          int argmax = 0;
          for (int e = 0; e < p.E; ++e)
            if (rt.scores[std::size_t(e)] > rt.scores[std::size_t(argmax)]) argmax = e;
          const auto ex = r.experts(t);
          CHECK(ex.size() >= 1);
          CHECK(std::find(ex.begin(), ex.end(), argmax) != ex.end());
          ivec tied;  // tau = 1: every expert whose r equals the maximum (all of them when r = 0)
          for (int e = 0; e < p.E; ++e)
            if (rt.scores[std::size_t(e)] == rt.scores[std::size_t(argmax)]) tied.push_back(e);
          if (tau == 1.0) CHECK(ex == tied);
        }
      }
    }
  }

  // --- top-any ----------------------------------------------------------------------------
  TEST_CASE_TEMPLATE("top_any: masked slots are never selected", T, float, double) {
    const int d = 5, E = 7;
    for (bool training : {false, true}) {
      auto layer = make_layer<T, dmoe::top_any>(d, E, 3, {training});
      test_rng g(21);
      auto& W = layer.router().weight();
      for (index_t e = 0; e < E; ++e)
        for (index_t i = 0; i < d; ++i) W(i, e) = T(g.normal());
      layer.router().active() = {1, 0, 1, 1, 0, 0, 1};
      auto x = random_tokens<T>(g, 12, d);
      // Masked slots get the token's own direction (cos = 1), the best score of all.
      for (index_t e : {1, 4, 5}) W.col(e) = x.row(0).transpose();
      // Thresholds below every cos: every active slot fires, the masked ones never.
      layer.router().threshold().setConstant(T(-2));
      auto r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 12; ++t) {
        CHECK(r.experts(t) == ivec{0, 2, 3, 6});
        for (double w : r.weights(t)) CHECK(w == doctest::Approx(0.25));
      }
      // Thresholds above every cos: nothing fires; inference falls back to an active slot.
      layer.router().threshold().setConstant(T(2));
      r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 12; ++t) {
        const auto ex = r.experts(t);
        if (training) {
          CHECK(ex.empty());
        } else {
          REQUIRE(ex.size() == 1);
          CHECK(layer.router().active()[std::size_t(ex[0])] == 1);
          CHECK(r.weights(t)[0] == 1.0);
        }
      }
    }
  }

  TEST_CASE_TEMPLATE("top_any: tokens that fire nothing", T, float, double) {
    for (bool output_bias : {true, false}) {
      dmoe::moe_config c;
      c.d_model = 6;
      c.num_experts = 4;
      c.expert_width = 5;
      c.expert_bias = true;
      c.output_bias = output_bias;
      layer_t<T, dmoe::top_any, dmoe::gelu_tanh> layer(c, {true});
      test_rng g(5);
      case_params p;
      p.random_mask = false;
      randomize_layer(layer, g, p);
      layer.router().threshold().setConstant(T(1.5));  // cos <= 1 never exceeds it
      const auto x = random_tokens<T>(g, 9, 6);
      // Training: K = 0, no expert, y = b2 (or 0) exactly.
      auto r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 9; ++t) {
        CHECK(r.plan.k(t) == 0);
        CHECK(row_equals_bias(r.y, t, layer.experts()));
      }
      CHECK(r.stats.k_histogram[0] == 9);
      CHECK(r.stats.slots == 0);
      // Inference: the best active cos, weight 1.
      layer.router().set_training(false);
      r = run_layer(layer, x);
      check_run(r);
      for (index_t t = 0; t < 9; ++t) {
        REQUIRE(r.plan.k(t) == 1);
        CHECK(r.weights(t)[0] == 1.0);
        const auto& sc = r.ref.routes[std::size_t(t)].scores;
        CHECK(r.experts(t)[0] == int(std::max_element(sc.begin(), sc.end()) - sc.begin()));
      }
    }
  }

  TEST_CASE_TEMPLATE("top_any: cos must exceed the threshold strictly; fallback ties go low", T, float, double) {
    // d = 3; columns (1,0,0), (0,1,0), (1,1,0), (1,0,0) (= column 0), (0,0,1).
    auto layer = make_layer<T, dmoe::top_any>(3, 5, 2, {false});
    layer.router().weight() << T(1), T(0), T(1), T(1), T(0),  //
        T(0), T(1), T(1), T(0), T(0),                          //
        T(0), T(0), T(0), T(0), T(1);
    const auto x = rows<T>({{3, 0, 0}});  // cos = [1, 0, 1/sqrt2, 1, 0], exact except the third
    auto& g = layer.router().threshold();
    g << T(1), T(0), T(0.5), T(1), T(0);  // equality never fires
    auto r = run_layer(layer, x);
    check_run(r);
    CHECK(r.experts(0) == ivec{2});
    CHECK(r.weights(0) == std::vector<double>{1.0});
    g << T(0.999), T(-0.001), T(0.8), T(1), T(0);
    r = run_layer(layer, x);
    check_run(r);
    CHECK(r.experts(0) == ivec{0, 1});
    CHECK(r.weights(0) == std::vector<double>{0.5, 0.5});
    // Nothing fires: inference takes the best cos; slots 0 and 3 tie at 1, the lower wins.
    g << T(1), T(0), T(0.8), T(1), T(0);
    r = run_layer(layer, x);
    check_run(r);
    CHECK(r.experts(0) == ivec{0});
    layer.router().active()[0] = 0;  // now slot 3 is the best active one
    r = run_layer(layer, x);
    check_run(r);
    CHECK(r.experts(0) == ivec{3});
    layer.router().set_training(true);
    r = run_layer(layer, x);
    check_run(r);
    CHECK(r.plan.k(0) == 0);
  }

  TEST_CASE_TEMPLATE("top_any: x = 0 gives cos = 0 for every slot", T, float, double) {
    auto layer = make_layer<T, dmoe::top_any>(4, 5, 3, {false});
    test_rng g(9);
    case_params p;
    p.random_mask = false;
    randomize_router(layer.router(), g, p);
    layer.router().active()[0] = 0;
    const row_matrix<T> x = row_matrix<T>::Zero(3, 4);
    layer.router().threshold().setZero();  // 0 > 0 is false: nothing fires
    auto r = run_layer(layer, x);
    check_run(r);
    for (index_t t = 0; t < 3; ++t) CHECK(r.experts(t) == ivec{1});  // all tie at 0: lowest active
    layer.router().set_training(true);
    r = run_layer(layer, x);
    check_run(r);
    for (index_t t = 0; t < 3; ++t) {
      CHECK(r.plan.k(t) == 0);
      CHECK(row_equals_bias(r.y, t, layer.experts()));
    }
    layer.router().threshold().setConstant(T(-0.01));  // 0 > -0.01: every active slot fires
    r = run_layer(layer, x);
    check_run(r);
    for (index_t t = 0; t < 3; ++t) CHECK(r.experts(t) == ivec{1, 2, 3, 4});
  }

  // --- all policies -----------------------------------------------------------------------
  TEST_CASE_TEMPLATE("an expert that gets no tokens", T, float, double) {
    const int d = 9, E = 5, n = 4, tokens = 40;
    test_rng g(31);
    const auto x = random_tokens<T>(g, tokens, d);
    {
      auto layer = make_layer<T, dmoe::top_k, dmoe::silu>(d, E, n, {2, true});
      randomize_router(layer.router(), g, case_params{});
      layer.router().bias()(2) = T(-60);  // p_2 ~ e^-60: never among the top 2
      const auto r = run_layer(layer, x);
      check_run(r);
      CHECK(r.stats.tokens_per_expert[2] == 0);
    }
    {
      auto layer = make_layer<T, dmoe::dynamic_k, dmoe::silu>(d, E, n, {0.2, 0});
      randomize_router(layer.router(), g, case_params{});
      layer.router().w_out().col(2).setZero();  // r_2 = 0 < tau max r whenever max r > 0
      const auto r = run_layer(layer, x);
      check_run(r);
      CHECK(r.stats.tokens_per_expert[2] == 0);
    }
    for (bool training : {true, false}) {
      auto layer = make_layer<T, dmoe::top_any, dmoe::silu>(d, E, n, {training});
      case_params p;
      p.random_mask = false;
      randomize_router(layer.router(), g, p);
      layer.router().threshold()(2) = T(1.5);  // slot 2 can only be a fallback
      layer.router().threshold()(0) = T(-1.5);  // slot 0 always fires, so no fallback happens
      const auto r = run_layer(layer, x);
      check_run(r);
      CHECK(r.stats.tokens_per_expert[2] == 0);
      CHECK(r.stats.tokens_per_expert[0] == tokens);
    }
  }

  TEST_CASE_TEMPLATE("every expert selected", T, float, double) {
    const int d = 7, E = 6, n = 3, tokens = 33;
    test_rng g(41);
    const auto x = random_tokens<T>(g, tokens, d);
    const ivec all{0, 1, 2, 3, 4, 5};
    auto check_all = [&](const auto& r) {
      check_run(r);
      for (index_t t = 0; t < tokens; ++t) CHECK(r.experts(t) == all);
      for (int e = 0; e < E; ++e) CHECK(r.stats.tokens_per_expert[std::size_t(e)] == tokens);
      CHECK(r.stats.k_histogram[std::size_t(E)] == tokens);
    };
    {
      auto layer = make_layer<T, dmoe::top_k, dmoe::geglu>(d, E, n, {E, true});
      randomize_router(layer.router(), g, case_params{});
      check_all(run_layer(layer, x));
    }
    {
      auto layer = make_layer<T, dmoe::dynamic_k, dmoe::geglu>(d, E, n, {0.0, 0});
      randomize_router(layer.router(), g, case_params{});
      check_all(run_layer(layer, x));
    }
    {
      auto layer = make_layer<T, dmoe::top_any, dmoe::geglu>(d, E, n, {true});
      case_params p;
      p.random_mask = false;
      randomize_router(layer.router(), g, p);
      layer.router().threshold().setConstant(T(-1.5));
      const auto r = run_layer(layer, x);
      check_all(r);
      for (index_t t = 0; t < tokens; ++t)
        for (double w : r.weights(t)) CHECK(w == doctest::Approx(1.0 / E));
    }
  }
}
