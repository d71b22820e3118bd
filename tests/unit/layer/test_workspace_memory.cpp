// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// docs/training.md states the workspace bytes per slot and per token; these tests hold
// workspace_size to those formulas (up to the 256-byte alignment of each buffer), so the page
// stays exact.
#include <doctest/doctest.h>

#include <cstdint>

#include "sweep.hpp"

using namespace dmoe_test;

namespace {

dmoe::moe_config config(dmoe::index_t d, dmoe::index_t E, dmoe::index_t n, dmoe::index_t h) {
  dmoe::moe_config c;
  c.d_model = d;
  c.num_experts = E;
  c.expert_width = n;
  c.router_hidden = h;
  return c;
}

template <class Scalar, class P, class A>
void per_slot_and_token(dmoe::index_t d, dmoe::index_t E, dmoe::index_t n, dmoe::index_t h) {
  CAPTURE(d);
  CAPTURE(E);
  CAPTURE(n);
  layer_t<Scalar, P, A> layer(config(d, E, n, h), typename P::options{});
  const std::int64_t s = sizeof(Scalar), f = A::gated ? 2 : 1;
  const std::int64_t hidden = std::is_same_v<P, dmoe::dynamic_k> ? h : 0;
  const std::int64_t hidden_ld = (f * n + n + 15) / 16 * 16;  // rows padded to 16 values (cpu/layout.hpp)
  const std::int64_t slot_bytes = 28 + (hidden_ld + 2 * d + 2) * s;
  // float layers: each token's x in bf16, rows padded to 32 values, for infer on bf16 tiles
  const std::int64_t x_bf16 = std::is_same_v<Scalar, float> ? 2 * ((d + 31) / 32 * 32) : 0;
  const std::int64_t token_bytes = 8 + (2 * E + hidden + 1) * s + x_bf16;
  const std::int64_t slack = 40 * 256;  // at most one alignment gap per buffer
  // Slots: at a fixed token count, 128 000 more slots cost 128 000 slot_bytes + 1000 task entries.
  const dmoe::index_t T = 40000, S0 = 1000, S1 = S0 + 128000;
  const auto w0 = static_cast<std::int64_t>(layer.workspace_size(dmoe::workspace_bounds{T, 1, S0}));
  const auto w1 = static_cast<std::int64_t>(layer.workspace_size(dmoe::workspace_bounds{T, 1, S1}));
  const std::int64_t want_slots = (S1 - S0) * slot_bytes + 1000 * 16;
  CHECK(w1 - w0 >= want_slots - slack);
  CHECK(w1 - w0 <= want_slots + slack);
  // Tokens: at a fixed slot bound, 64 000 more tokens cost 64 000 token_bytes.
  const dmoe::index_t S = 2000;
  const auto t0 = static_cast<std::int64_t>(layer.workspace_size(dmoe::workspace_bounds{2000, 1, S}));
  const auto t1 = static_cast<std::int64_t>(layer.workspace_size(dmoe::workspace_bounds{66000, 1, S}));
  const std::int64_t want_tokens = 64000 * token_bytes;
  CHECK(t1 - t0 >= want_tokens - slack);
  CHECK(t1 - t0 <= want_tokens + slack);
  // The default bound is the worst case tokens * E.
  CHECK(layer.workspace_size(dmoe::workspace_bounds{T, 1}) == layer.workspace_size(dmoe::workspace_bounds{T, 1, T * E}));
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE("workspace bytes per slot and per token are those docs/training.md states") {
    per_slot_and_token<float, dmoe::top_any, dmoe::relu>(24, 6, 16, 0);
    per_slot_and_token<double, dmoe::top_any, dmoe::swiglu>(8, 5, 12, 0);
    per_slot_and_token<float, dmoe::dynamic_k, dmoe::gelu_tanh>(16, 7, 9, 10);
    per_slot_and_token<double, dmoe::dynamic_k, dmoe::geglu>(12, 4, 20, 6);
  }
}
