// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The dense FFN against the reference, and the D2DMoE invariant (docs/algorithms.md sections 3,
// dynamic-k, and 5.2, neuron split and the MoE layer): a dynamic-k layer with tau = 0 runs every
// expert with weight 1, so a layer whose experts are the contiguous slices of a dense FFN equals
// that FFN.
#include <doctest/doctest.h>

#include <cstring>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::row_matrix;

namespace {

template <class T>
ref::batch_result dense_reference(const ref::experts_model& m, const row_matrix<T>& x) {
  ref::batch_result b;
  const int d = m.d;
  b.y.assign(std::size_t(x.rows() * d), 0.0);
  b.y_abs.assign(std::size_t(x.rows() * d), 0.0);
  b.routes.resize(std::size_t(x.rows()));
  std::vector<double> xr(static_cast<std::size_t>(d));
  for (index_t t = 0; t < x.rows(); ++t) {
    for (int i = 0; i < d; ++i) xr[std::size_t(i)] = double(x(t, i));
    ref::dense_forward(m, xr.data(), b.y.data() + t * d, b.y_abs.data() + t * d);
  }
  return b;
}

template <class T, class A>
void dense_matches_reference(int cases) {
  for (int i = 0; i < cases; ++i) {
    test_rng g(seed_of(std::string("dense/") + A::name + type_name<T>(), i));
    const int d = g.integer(1, 40), F = g.integer(1, 80), tokens = i == 0 ? 300 : g.integer(0, 70);
    INFO(std::string(A::name), " d=", d, " F=", F, " tokens=", tokens);
    auto f = random_dense<T, A>(g, d, F);
    CHECK(f.d_model() == d);
    CHECK(f.hidden() == F);
    CHECK(f.flops_per_token() == 2.0 * d * F * (A::gated ? 3.0 : 2.0));
    const auto x = random_tokens<T>(g, tokens, d);
    row_matrix<T> y = row_matrix<T>::Constant(tokens, d, T(-5));
    dmoe::thread_pool pool(2);
    const dmoe::context<dmoe::cpu> ctx{i % 2 ? &pool : nullptr};
    dmoe::workspace_buffer ws(f.workspace_size(ctx, tokens));
    const auto s = f.forward(ctx, x, y, ws);
    REQUIRE_MESSAGE(s.ok(), std::string(s.message()));
    const auto ref = dense_reference(ref::read_dense(f), x);
    const auto oc = compare_output<T>(y, ref, -1.0, output_tolerance<T>());
    CHECK_MESSAGE(oc.ok(), oc.first);
  }
}

/// Copies a dense FFN into the experts of a layer: expert e = hidden units [e n, (e+1) n);
/// gated: gate columns [e n, (e+1) n) and up columns [F + e n, F + (e+1) n); b2 -> output bias.
template <class T, class A, class Layer>
void copy_dense_into(const dmoe::dense_ffn<T, A>& f, Layer& layer) {
  auto& w = layer.experts();
  const index_t E = layer.num_experts(), n = layer.expert_width(), d = f.d_model(), F = f.hidden();
  for (index_t e = 0; e < E; ++e) {
    auto w1 = w.w1(e);
    auto b1 = w.b1(e);
    auto w2 = w.w2(e);
    for (index_t j = 0; j < n; ++j) {
      for (index_t i = 0; i < d; ++i) {
        w1(i, j) = f.w1()(i, e * n + j);
        if (A::gated) w1(i, n + j) = f.w1()(i, F + e * n + j);
      }
      b1(j) = f.b1()(e * n + j);
      if (A::gated) b1(n + j) = f.b1()(F + e * n + j);
      for (index_t c = 0; c < d; ++c) w2(j, c) = f.w2()(e * n + j, c);
    }
  }
  for (index_t c = 0; c < d; ++c) w.output_bias()(c) = f.b2()(c);
}

template <class T, class A>
void tau_zero_equals_dense(int cases) {
  for (int i = 0; i < cases; ++i) {
    test_rng g(seed_of(std::string("tau0/") + A::name + type_name<T>(), i));
    const int d = g.integer(1, 40), E = g.integer(1, 12), n = g.integer(1, 20);
    const int tokens = i == 0 ? 300 : g.integer(1, 70);
    INFO(std::string(A::name), " d=", d, " E=", E, " n=", n, " tokens=", tokens);
    auto f = random_dense<T, A>(g, d, E * n);
    dmoe::moe_config cfg;
    cfg.d_model = d;
    cfg.num_experts = E;
    cfg.expert_width = n;
    cfg.hidden_bias = true;
    cfg.expert_bias = false;
    cfg.output_bias = true;
    cfg.router_hidden = g.integer(1, 16);
    layer_t<T, dmoe::dynamic_k, A> layer(cfg, {0.0, 0});
    case_params p;
    randomize_router(layer.router(), g, p);
    copy_dense_into(f, layer);
    const auto x = random_tokens<T>(g, tokens, d);

    row_matrix<T> yd(tokens, d);
    dmoe::workspace_buffer wsd(f.workspace_size(dmoe::workspace_bounds{tokens, 1}));
    REQUIRE(f.forward({}, x, yd, wsd).ok());
    const auto r = run_layer(layer, x);
    check_run(r);  // the layer against the MoE reference
    for (index_t t = 0; t < tokens; ++t) CHECK(r.plan.k(t) == E);
    // Both against the dense reference (same magnitude bounds, the dense sum regrouped).
    const auto ref = dense_reference(ref::read_dense(f), x);
    const auto od = compare_output<T>(yd, ref, -1.0, output_tolerance<T>());
    CHECK_MESSAGE(od.ok(), od.first);
    const auto om = compare_output<T>(r.y, ref, -1.0, output_tolerance<T>());
    CHECK_MESSAGE(om.ok(), om.first);
  }
}

}  // namespace

TEST_SUITE("dense") {
  TEST_CASE_TEMPLATE("dense_ffn forward matches the reference", T, float, double) {
    for_each_activation([](auto act) { dense_matches_reference<T, decltype(act)>(6); });
  }

  TEST_CASE_TEMPLATE("dynamic_k with tau = 0 equals the dense FFN it came from", T, float, double) {
    for_each_activation([](auto act) { tau_zero_equals_dense<T, decltype(act)>(6); });
  }

  TEST_CASE("dense_ffn with strided views and zero tokens") {
    test_rng g(77);
    auto f = random_dense<float, dmoe::swiglu>(g, 9, 20);
    const auto x = random_tokens<float>(g, 130, 9);
    row_matrix<float> X = row_matrix<float>::Constant(130, 13, 1e30f);
    X.block(0, 3, 130, 9) = x;
    row_matrix<float> Y = row_matrix<float>::Constant(130, 12, -2.0f);
    dmoe::workspace_buffer ws(f.workspace_size(dmoe::workspace_bounds{130, 1}));
    REQUIRE(f.forward({}, dmoe::matrix_view<const float>(X.data() + 3, 130, 9, 13),
                      dmoe::matrix_view<float>(Y.data() + 2, 130, 9, 12), ws)
                .ok());
    const auto ref = dense_reference(ref::read_dense(f), x);
    const auto oc = compare_output<float>(dmoe::matrix_view<const float>(Y.data() + 2, 130, 9, 12), ref, -1.0,
                                          output_tolerance<float>());
    CHECK_MESSAGE(oc.ok(), oc.first);
    bool pad_ok = true;
    for (index_t t = 0; t < 130; ++t)
      for (index_t j : {0, 1, 11}) pad_ok = pad_ok && Y(t, j) == -2.0f;
    CHECK(pad_ok);
    // Zero tokens: ok without a workspace.
    CHECK(f.forward({}, dmoe::matrix_view<const float>(nullptr, 0, 9), dmoe::matrix_view<float>(nullptr, 0, 9),
                    dmoe::workspace{})
              .ok());
  }
}
