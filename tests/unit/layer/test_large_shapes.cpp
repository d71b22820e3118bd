// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// A few large shapes against the reference (the random sweeps keep d <= 40, n <= 20, E <= 12):
// long products (d and n in the hundreds, past any kernel blocking), many experts, batches
// that give several 128-row tasks per expert, and a 2-thread pool.
#include <doctest/doctest.h>

#include "sweep.hpp"

using namespace dmoe_test;

namespace {

case_params big(std::uint64_t seed, int d, int E, int n, int tokens, int h) {
  case_params p;
  p.seed = seed;
  p.d = d;
  p.E = E;
  p.n = n;
  p.tokens = tokens;
  p.router_hidden = h;
  p.hidden_bias = true;
  p.expert_bias = seed % 2 == 0;
  p.output_bias = true;
  p.k = std::min(E, 3);
  p.tau = 0.3;
  p.k_max = 0;
  p.training = false;
  p.random_mask = false;
  const double s = 1.0 / std::sqrt(double(d));
  p.top_any_g_lo = -s;
  p.top_any_g_hi = 2 * s;
  return p;
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE_TEMPLATE("large shapes match the reference", T, float, double) {
    check_case<T, dmoe::top_k, dmoe::swiglu>(big(1, 200, 4, 300, 300, 8));
    check_case<T, dmoe::top_k, dmoe::relu>(big(2, 96, 64, 16, 300, 8));
    check_case<T, dmoe::dynamic_k, dmoe::gelu_erf>(big(3, 257, 6, 129, 260, 128));
    check_case<T, dmoe::dynamic_k, dmoe::geglu>(big(4, 64, 48, 24, 300, 200));
    check_case<T, dmoe::top_any, dmoe::silu>(big(5, 130, 40, 33, 257, 8));
    check_case<T, dmoe::top_any, dmoe::gelu_tanh>(big(6, 300, 5, 64, 140, 8));
  }
}
