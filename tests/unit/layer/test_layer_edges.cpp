// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Layer edge cases: zero tokens, one token, static extents, reusing one workspace for batches of
// different sizes, the library's own randomize(), strided input and output views.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::row_matrix;

namespace {

template <class T, class P, class A>
void check_zero_tokens(const case_params& p0) {
  case_params p = p0;
  p.tokens = 12;
  prepared_case<T, P, A> c(p);
  dmoe::routing_stats st(p.E);
  REQUIRE(c.forward({}, &st).ok());  // leaves non-zero statistics behind
  REQUIRE(st.tokens == 12);
  // Zero tokens: null data, no workspace at all. Valid, ok, statistics all zero.
  const dmoe::matrix_view<const T> x0(nullptr, 0, p.d);
  const dmoe::matrix_view<T> y0(nullptr, 0, p.d);
  const dmoe::status s = c.layer.forward(dmoe::context<dmoe::cpu>{}, x0, y0, dmoe::workspace{}, &st);
  CHECK_MESSAGE(s.ok(), std::string(s.message()));
  CHECK(st.tokens == 0);
  CHECK(st.slots == 0);
  CHECK(st.mean_k() == 0.0);
  CHECK(st.router_flops == 0.0);
  CHECK(st.expert_flops == 0.0);
  CHECK(st.dense_flops == 0.0);
  for (auto v : st.k_histogram) CHECK(v == 0);
  for (auto v : st.tokens_per_expert) CHECK(v == 0);
  CHECK(st.k_histogram.size() == std::size_t(p.E + 1));
  // Zero rows of a real matrix, with a real workspace and a thread pool.
  dmoe::thread_pool pool(2);
  row_matrix<T> x(0, p.d), y(0, p.d);
  dmoe::workspace_buffer ws(c.layer.workspace_size(dmoe::workspace_bounds{0, 2}));
  CHECK(c.layer.forward(dmoe::context<dmoe::cpu>{&pool}, x, y, ws, &st).ok());
  CHECK(st.tokens == 0);
  CHECK(c.layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
}

template <class T, class P>
void zero_and_one_token() {
  for (int i = 0; i < 6; ++i) {
    case_params p = random_params(seed_of(std::string("edges/zero/") + policy_name<P>() + type_name<T>(), i),
                                  policy_of<P>());
    check_zero_tokens<T, P, dmoe::relu>(p);
    check_zero_tokens<T, P, dmoe::geglu>(p);
    p.tokens = 1;
    check_case<T, P, dmoe::gelu_erf>(p);
    check_case<T, P, dmoe::swiglu>(p);
  }
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE_TEMPLATE("zero tokens and one token", T, float, double) {
    zero_and_one_token<T, dmoe::top_k>();
    zero_and_one_token<T, dmoe::dynamic_k>();
    zero_and_one_token<T, dmoe::top_any>();
  }

  TEST_CASE("static extents give the same layer as dynamic ones") {
    dmoe::moe_config cfg;
    cfg.d_model = 10;
    cfg.num_experts = 4;
    cfg.expert_width = 8;
    cfg.expert_bias = true;
    layer_t<float, dmoe::top_k, dmoe::relu, 4, 8> fixed(cfg, {2, true});
    layer_t<float, dmoe::top_k, dmoe::relu> dyn(cfg, {2, true});
    CHECK(fixed.num_experts() == 4);
    CHECK(fixed.expert_width() == 8);
    test_rng g1(5), g2(5);
    case_params p;
    randomize_layer(fixed, g1, p);
    randomize_layer(dyn, g2, p);
    test_rng gx(6);
    const auto x = random_tokens<float>(gx, 150, 10);
    const auto a = run_layer(fixed, x);
    const auto b = run_layer(dyn, x);
    check_run(a);
    check_run(b);
    CHECK(a.y.isApprox(b.y, 1e-6f));

    layer_t<double, dmoe::dynamic_k, dmoe::swiglu, 5> e5(
        [] {
          dmoe::moe_config c;
          c.d_model = 6;
          c.num_experts = 5;
          c.expert_width = 3;
          c.router_hidden = 7;
          return c;
        }(),
        {0.3, 2});
    test_rng g3(8);
    randomize_layer(e5, g3, p);
    check_run(run_layer(e5, random_tokens<double>(g3, 20, 6)));

    layer_t<float, dmoe::top_any, dmoe::silu, dmoe::dynamic_extent, 3> w3(
        [] {
          dmoe::moe_config c;
          c.d_model = 6;
          c.num_experts = 5;
          c.expert_width = 3;
          return c;
        }(),
        {false});
    test_rng g4(9);
    randomize_layer(w3, g4, p);
    check_run(run_layer(w3, random_tokens<float>(g4, 20, 6)));
  }

  TEST_CASE_TEMPLATE("one workspace serves batches of different sizes", T, float, double) {
    case_params p = random_params(seed_of("edges/reuse", 0), ref::policy_kind::top_k);
    p.tokens = 300;
    p.E = 6;
    p.k = 3;
    prepared_case<T, dmoe::top_k, dmoe::gelu_tanh> c(p);
    REQUIRE(c.forward({}).ok());
    const auto model = ref::read_layer(c.layer);
    for (index_t tokens : {index_t(5), index_t(300), index_t(129), index_t(1), index_t(0), index_t(77)}) {
      CAPTURE(tokens);
      const dmoe::matrix_view<const T> xs(c.x.data() + (300 - tokens) * p.d, tokens, p.d);
      row_matrix<T> y(tokens, p.d);
      REQUIRE(c.layer.forward({}, xs, y, c.ws).ok());
      const auto ref = ref::run(model, xs.data, int(tokens), p.d);
      const auto pc = compare_plan(c.layer.plan(c.ws, tokens), ref.routes, borderline_margin<T>(),
                                   weight_tolerance<T>());
      CHECK_MESSAGE(pc.ok(), pc.first);
      const auto oc = compare_output<T>(y, ref, borderline_margin<T>(), output_tolerance<T>());
      CHECK_MESSAGE(oc.ok(), oc.first);
    }
  }

  TEST_CASE("layer randomize(seed) is deterministic and matches the reference") {
    dmoe::moe_config cfg;
    cfg.d_model = 12;
    cfg.num_experts = 6;
    cfg.expert_width = 5;
    layer_t<double, dmoe::top_any, dmoe::relu> a(cfg, {false}), b(cfg, {false}), c(cfg, {false});
    a.randomize(42);
    b.randomize(42);
    c.randomize(43);
    test_rng g(1);
    const auto x = random_tokens<double>(g, 40, 12);
    const auto ra = run_layer(a, x), rb = run_layer(b, x), rc = run_layer(c, x);
    check_run(ra);
    check_run(rc);
    CHECK(std::memcmp(ra.y.data(), rb.y.data(), sizeof(double) * std::size_t(ra.y.size())) == 0);
    CHECK_FALSE(ra.y.isApprox(rc.y));
    // top_any init: orthonormal gate columns when E <= d, thresholds 0, every slot active.
    const auto& W = a.router().weight();
    CHECK((W.transpose() * W - Eigen::MatrixXd::Identity(6, 6)).norm() < 1e-10);
    CHECK(a.router().threshold().isZero());
    CHECK(a.router().num_active() == 6);
  }

  TEST_CASE_TEMPLATE("strided views of x and y", T, float, double) {
    const int d = 11, tokens = 140, pad_x = 5, pad_y = 3;
    auto run_policy = [&](auto policy_tag, auto opt) {
      using P = decltype(policy_tag);
      case_params p = random_params(seed_of(std::string("edges/stride/") + policy_name<P>(), 0), policy_of<P>());
      p.d = d;
      p.tokens = tokens;
      p.E = 5;
      p.k = 1;
      p.k_max = 0;
      prepared_case<T, P, dmoe::swiglu> c(p);
      c.layer.router().set_options(opt);
      c.ws.resize(c.layer.workspace_size(dmoe::workspace_bounds{tokens, 1}));
      // x lives in columns [2, 2 + d) of a wider row-major matrix; y likewise in another one.
      row_matrix<T> X = row_matrix<T>::Constant(tokens, d + pad_x, T(1e30));
      X.block(0, 2, tokens, d) = c.x;
      row_matrix<T> Y = row_matrix<T>::Constant(tokens, d + pad_y, T(-3.5));
      const row_matrix<T> X0 = X;
      const dmoe::matrix_view<const T> xv(X.data() + 2, tokens, d, d + pad_x);
      const dmoe::matrix_view<T> yv(Y.data() + 1, tokens, d, d + pad_y);
      dmoe::workspace_buffer ws(c.layer.workspace_size(dmoe::workspace_bounds{tokens, 1}));
      const auto s = c.layer.forward({}, xv, yv, ws);
      REQUIRE_MESSAGE(s.ok(), std::string(s.message()));
      const auto ref = ref::run(ref::read_layer(c.layer), xv.data, tokens, xv.row_stride);
      const auto pc = compare_plan(c.layer.plan(ws, tokens), ref.routes, borderline_margin<T>(),
                                   weight_tolerance<T>());
      CHECK_MESSAGE(pc.ok(), pc.first);
      const auto oc = compare_output<T>(dmoe::matrix_view<const T>(yv), ref, borderline_margin<T>(),
                                        output_tolerance<T>());
      CHECK_MESSAGE(oc.ok(), oc.first);
      // The padding around y is untouched and x is not modified.
      bool pad_ok = true;
      for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < d + pad_y; ++j)
          if (j < 1 || j >= 1 + d) pad_ok = pad_ok && Y(t, j) == T(-3.5);
      CHECK(pad_ok);
      CHECK(X == X0);
      // Same result as the contiguous call.
      REQUIRE(c.forward({}).ok());
      CHECK(Y.block(0, 1, tokens, d).isApprox(c.y, T(1e-5)));
    };
    run_policy(dmoe::top_k{}, dmoe::top_k_options{2, true});
    run_policy(dmoe::dynamic_k{}, dmoe::dynamic_k_options{0.4, 0});
    run_policy(dmoe::top_any{}, dmoe::top_any_options{false});
  }
}
