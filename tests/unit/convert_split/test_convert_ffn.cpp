// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Dense FFN -> MoE (convert/convert_ffn.hpp). The invariant of docs/algorithms.md section 5.2 (neuron split and the MoE layer): with
// every expert on (dynamic_k, tau = 0) the converted layer computes the dense FFN, to rounding,
// for float and double, every activation (gated ones included), random shapes and all three
// split methods. Both are compared with the plain-loop reference of tests/support and with each
// other; the weight moves are checked element by element.
#include <doctest/doctest.h>

#include <dmoe/convert/convert_ffn.hpp>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::row_matrix;

namespace {

template <class T, class A>
void check_weights_moved(const dmoe::dense_ffn<T, A>& f, const dmoe::neuron_split& s,
                         const dmoe::moe_layer<T, dmoe::cpu, dmoe::dynamic_k, A>& m) {
  const index_t d = f.d_model(), F = f.hidden(), n = s.width;
  const auto& ex = m.experts();
  int bad = 0;
  for (index_t e = 0; e < s.num_experts; ++e)
    for (index_t j = 0; j < n; ++j) {
      const index_t i = s.neurons[std::size_t(e * n + j)];
      for (index_t r = 0; r < d; ++r) {
        bad += ex.w1(e)(r, j) != f.w1()(r, i);
        if (A::gated) bad += ex.w1(e)(r, n + j) != f.w1()(r, F + i);
        bad += ex.w2(e)(j, r) != f.w2()(i, r);
      }
      bad += ex.b1(e)(j) != f.b1()(i);
      if (A::gated) bad += ex.b1(e)(n + j) != f.b1()(F + i);
    }
  for (index_t r = 0; r < d; ++r) bad += ex.output_bias()(r) != f.b2()(r);
  CHECK(bad == 0);
  CHECK(ex.shape().expert_bias == false);
  CHECK(ex.shape().output_bias == true);
  CHECK(m.router().w_in().cwiseAbs().maxCoeff() == T(0));  // left for router fitting
}

template <class T, class A>
void invariant_cases(int cases) {
  for (int i = 0; i < cases; ++i) {
    test_rng g(seed_of(std::string("convert/") + A::name + type_name<T>(), i));
    const int d = g.integer(1, 40), E = g.integer(1, 6), n = g.integer(1, 12), F = E * n;
    const int tokens = i == 0 ? 300 : g.integer(0, 70);
    const auto method = static_cast<dmoe::split_method>(i % 3);
    INFO(std::string(A::name), " ", type_name<T>(), " d=", d, " E=", E, " n=", n, " tokens=", tokens,
         " method=", int(method));
    const auto f = random_dense<T, A>(g, d, F);
    dmoe::split_options opt;
    opt.method = method;
    opt.seed = std::uint64_t(i);
    const auto s = dmoe::split_neurons(f, E, opt);
    auto m = dmoe::to_moe<dmoe::dynamic_k>(f, s, {0.0}, g.integer(1, 16));
    REQUIRE(m.num_experts() == E);
    REQUIRE(m.expert_width() == n);
    check_weights_moved(f, s, m);
    // A random router: with tau = 0 every expert runs whatever it predicts.
    if (i % 2) m.router().randomize(std::uint64_t(i));
    const auto x = random_tokens<T>(g, tokens, d);
    row_matrix<T> y_moe = row_matrix<T>::Constant(tokens, d, T(-7)), y_dense = y_moe;
    dmoe::thread_pool pool(2);
    const dmoe::context<dmoe::cpu> ctx{i % 2 ? &pool : nullptr};
    dmoe::workspace_buffer ws(std::max(m.workspace_size(ctx, tokens), f.workspace_size(ctx, tokens)));
    dmoe::routing_stats stats(E);
    auto st = m.forward(ctx, x, y_moe, ws, &stats);
    REQUIRE_MESSAGE(st.ok(), std::string(st.message()));
    st = f.forward(ctx, x, y_dense, ws);
    REQUIRE_MESSAGE(st.ok(), std::string(st.message()));
    if (tokens > 0) CHECK(stats.mean_k() == doctest::Approx(double(E)));
    // Reference: the dense FFN in plain double loops, with a magnitude bound per element.
    ref::batch_result ref;
    ref.routes.resize(std::size_t(tokens));
    ref.y.assign(std::size_t(tokens * d), 0.0);
    ref.y_abs.assign(std::size_t(tokens * d), 0.0);
    const auto model = ref::read_dense(f);
    std::vector<double> xr(static_cast<std::size_t>(d));
    for (int t = 0; t < tokens; ++t) {
      for (int c = 0; c < d; ++c) xr[std::size_t(c)] = double(x(t, c));
      ref::dense_forward(model, xr.data(), ref.y.data() + t * d, ref.y_abs.data() + t * d);
    }
    const auto cm = compare_output<T>(y_moe, ref, -1.0, output_tolerance<T>());
    CHECK_MESSAGE(cm.ok(), cm.first);
    const auto cd = compare_output<T>(y_dense, ref, -1.0, output_tolerance<T>());
    CHECK_MESSAGE(cd.ok(), cd.first);
    // And directly: MoE vs dense differ by summation order only.
    double worst = 0;
    for (int t = 0; t < tokens; ++t)
      for (int c = 0; c < d; ++c)
        worst = std::max(worst, std::fabs(double(y_moe(t, c)) - double(y_dense(t, c))) /
                                    (ref.y_abs[std::size_t(t * d + c)] + 1e-30));
    CHECK(worst <= (std::is_same_v<T, float> ? 1e-5 : 1e-13));
  }
}

}  // namespace

TEST_SUITE("convert") {
  TEST_CASE_TEMPLATE("to_moe: all experts on (dynamic_k tau = 0) equals the dense FFN", T, float, double) {
    for_each_activation([](auto a) { invariant_cases<T, decltype(a)>(8); });
  }

  TEST_CASE("to_moe: other policies get the same experts and a zero router") {
    test_rng g(77);
    const auto f = random_dense<float, dmoe::geglu>(g, 10, 12);
    const auto s = dmoe::split_neurons(f, 3);
    auto tk = dmoe::to_moe<dmoe::top_k>(f, s, {2, true});
    CHECK(tk.router().weight().cwiseAbs().maxCoeff() == 0.0f);
    CHECK(tk.router().options().k == 2);
    auto ta = dmoe::to_moe<dmoe::top_any>(f, s, {});
    CHECK(ta.router().weight().cwiseAbs().maxCoeff() == 0.0f);
    auto dk = dmoe::to_moe<dmoe::dynamic_k>(f, s, {0.0});
    CHECK(tk.experts().w1_storage() == dk.experts().w1_storage());
    CHECK(ta.experts().w2_storage() == dk.experts().w2_storage());
    CHECK(dk.router().hidden() == 128);
  }

  TEST_CASE("to_moe: a split that does not fit the FFN is a clear error") {
    test_rng g(78);
    const auto f = random_dense<double, dmoe::relu>(g, 6, 12);
    auto s = dmoe::split_neurons(f, 4);
    dmoe::dense_ffn<double, dmoe::relu> other(6, 16);
    try {
      (void)dmoe::to_moe<dmoe::dynamic_k>(other, s, {0.0});
      FAIL("no error");
    } catch (const dmoe::error& e) {
      CHECK(std::string(e.what()).find("to_moe: split has 4 experts of width 3") != std::string::npos);
      CHECK(std::string(e.what()).find("16 hidden units") != std::string::npos);
    }
    s.neurons[2] = s.neurons[3];
    CHECK_THROWS_AS((void)dmoe::to_moe<dmoe::dynamic_k>(f, s, {0.0}), dmoe::error);
    dmoe::neuron_split empty;
    CHECK_THROWS_AS((void)dmoe::to_moe<dmoe::dynamic_k>(f, empty, {0.0}), dmoe::error);
    // Options are validated by the layer.
    CHECK_THROWS_AS((void)dmoe::to_moe<dmoe::dynamic_k>(f, dmoe::split_neurons(f, 4), {1.5}), dmoe::error);
  }
}
