// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Determinism: the output bits do not depend on the executor or its thread count
// (docs/design.md: task boundaries independent of threads, combine in fixed slot order).
#include <doctest/doctest.h>

#include <cstring>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::row_matrix;

namespace {

template <class T, class P, class A>
void check_bitwise(typename P::options opt, double g_lo = -0.2, double g_hi = 0.25) {
  case_params p = random_params(seed_of(std::string("determinism/") + policy_name<P>() + type_name<T>(), 0),
                                policy_of<P>());
  p.tokens = 300;
  p.E = 6;
  p.d = 24;
  p.n = 16;
  p.k = 1;
  p.k_max = 0;
  p.top_any_g_lo = g_lo;
  p.top_any_g_hi = g_hi;
  p.random_mask = false;
  prepared_case<T, P, A> c(p);
  c.layer.router().set_options(opt);

  dmoe::thread_pool pool1(1), pool2(2), pool3(3);
  const dmoe::context<dmoe::cpu> ctxs[] = {{}, {&pool1}, {&pool2}, {&pool3}, {&pool2}};
  const auto bytes = c.layer.workspace_size(dmoe::workspace_bounds{p.tokens, 3});
  dmoe::workspace_buffer ws(bytes);
  std::vector<row_matrix<T>> ys;
  for (const auto& ctx : ctxs) {
    row_matrix<T> y = row_matrix<T>::Constant(p.tokens, p.d, T(-1));
    const auto s = c.layer.forward(ctx, c.x, y, ws);
    REQUIRE_MESSAGE(s.ok(), std::string(s.message()));
    ys.push_back(y);
  }
  // Several tasks per expert, so the pool really spreads the work.
  dmoe::routing_stats st(p.E);
  REQUIRE(c.layer.forward({}, c.x, ys[0], ws, &st).ok());
  index_t busiest = 0;
  for (auto v : st.tokens_per_expert) busiest = std::max(busiest, v);
  CHECK(busiest > 128);
  for (std::size_t i = 1; i < ys.size(); ++i) {
    CAPTURE(i);
    CHECK(std::memcmp(ys[0].data(), ys[i].data(), sizeof(T) * std::size_t(ys[0].size())) == 0);
  }
  // And it is the right answer.
  const auto ref = c.reference();
  const auto oc = compare_output<T>(ys[2], ref, borderline_margin<T>(), output_tolerance<T>());
  CHECK_MESSAGE(oc.ok(), oc.first);
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE_TEMPLATE("forward is bitwise identical for any executor and thread count", T, float, double) {
    check_bitwise<T, dmoe::top_k, dmoe::relu>({3, true});
    check_bitwise<T, dmoe::top_k, dmoe::swiglu>({6, false});
    check_bitwise<T, dmoe::dynamic_k, dmoe::gelu_erf>({0.1, 0});
    check_bitwise<T, dmoe::dynamic_k, dmoe::geglu>({0.5, 4});
    check_bitwise<T, dmoe::top_any, dmoe::silu>({false}, -0.4, 0.1);
    check_bitwise<T, dmoe::top_any, dmoe::gelu_tanh>({true}, -0.3, 0.3);
  }
}
