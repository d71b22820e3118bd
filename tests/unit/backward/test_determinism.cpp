// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Backward determinism: y, dx and every gradient buffer are bitwise identical
// (memcmp) for context<cpu>{} (no executor), thread_pool(1) and thread_pool(2),
// on float layers with 300 tokens (so some expert gets more than 128 rows and
// runs several tasks), for each policy with its auxiliary terms. Each workspace
// is sized for its thread count.
#include "backward_common.hpp"

using namespace dmoe_fd;

namespace {

using fmat = dmoe::row_matrix<float>;

std::vector<std::vector<float>> router_buffers(const dmoe::top_k_router<float>& r) {
  return {{r.weight().data(), r.weight().data() + r.weight().size()},
          {r.bias().data(), r.bias().data() + r.bias().size()}};
}
std::vector<std::vector<float>> router_buffers(const dmoe::dynamic_k_router<float>& r) {
  return {{r.w_in().data(), r.w_in().data() + r.w_in().size()},
          {r.w_out().data(), r.w_out().data() + r.w_out().size()}};
}
std::vector<std::vector<float>> router_buffers(const dmoe::top_any_router<float>& r) {
  return {{r.weight().data(), r.weight().data() + r.weight().size()},
          {r.threshold().data(), r.threshold().data() + r.threshold().size()}};
}

struct run_result {
  fmat y, dx;
  std::vector<std::vector<float>> buffers;  ///< expert gradients, then router gradients
  plan_snapshot plan;
};

template <class L>
run_result run_once(const L& layer, const dmoe::context<dmoe::cpu>& ctx, const fmat& x, const fmat& dy,
                    const dmoe::aux_losses* aux) {
  run_result r;
  dmoe::workspace_buffer ws(layer.workspace_size(ctx, x.rows()));
  r.y = fmat::Constant(x.rows(), x.cols(), -1.0f);
  r.dx = fmat::Constant(x.rows(), x.cols(), -1.0f);
  const dmoe::status f = layer.forward(ctx, x, r.y, ws);
  REQUIRE_MESSAGE(f.ok(), f.message());
  r.plan = snapshot(layer.plan(ws, x.rows()));
  auto g = layer.make_gradients();
  const dmoe::status b = layer.backward(ctx, x, dy, r.dx, g, ws, aux);
  REQUIRE_MESSAGE(b.ok(), b.message());
  const auto& e = g.experts;
  r.buffers = {e.w1_storage(), e.b1_storage(), e.w2_storage(), e.expert_bias_storage(), e.output_bias_storage()};
  for (auto& v : router_buffers(g.router)) r.buffers.push_back(v);
  return r;
}

void check_same(const run_result& a, const run_result& b, const char* what) {
  INFO(what);
  CHECK(b.plan.same_selection(a.plan));
  CHECK(same_bytes(a.y, b.y));
  CHECK(same_bytes(a.dx, b.dx));
  REQUIRE(a.buffers.size() == b.buffers.size());
  for (std::size_t i = 0; i < a.buffers.size(); ++i) {
    INFO("gradient buffer " << i << " (w1, b1, w2, expert_bias, output_bias, router...)");
    CHECK(same_bytes(a.buffers[i], b.buffers[i]));
  }
}

template <class P, class A>
void determinism(const case_cfg& c) {
  INFO((std::string(P::template router<float>::name) + " " + A::name + " " + c.describe()));
  layer_t<P, A, float> layer(config_of(c), options_of<P>(c));
  rng g(c.seed);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  const fmat x = random_rows<float>(g, c.tokens, c.d), dy = random_rows<float>(g, c.tokens, c.d);
  const dmoe::aux_losses* aux = c.use_aux ? &c.aux : nullptr;

  const run_result base = run_once(layer, dmoe::context<dmoe::cpu>{}, x, dy, aux);
  // Several 128-row tasks for at least one expert, and finite results.
  std::vector<index_t> rows(std::size_t(c.E), 0);
  for (auto e : base.plan.expert) ++rows[std::size_t(e)];
  CHECK(*std::max_element(rows.begin(), rows.end()) > 128);
  CHECK(base.dx.allFinite());
  CHECK(!base.dx.isZero(0.0f));
  {
    dmoe::thread_pool pool(1);
    check_same(base, run_once(layer, dmoe::context<dmoe::cpu>{&pool}, x, dy, aux), "thread_pool(1)");
  }
  {
    dmoe::thread_pool pool(2);
    const dmoe::context<dmoe::cpu> ctx{&pool};
    check_same(base, run_once(layer, ctx, x, dy, aux), "thread_pool(2)");
    check_same(base, run_once(layer, ctx, x, dy, aux), "thread_pool(2), again");
  }
}

case_cfg big_case(const char* tag, int E) {
  case_cfg c = random_cfg(seed_of(tag, 0), 7);
  c.d = 16;
  c.E = E;
  c.n = 12;
  c.tokens = 300;
  c.k = 2;
  c.tau = 0.4;
  c.k_max = 0;
  c.router_hidden = 16;
  c.training = true;
  c.g_lo = -0.1;
  c.g_hi = 0.35;
  c.p_active = 0.8;
  c.use_aux = true;
  c.aux.load_balance = 0.5;
  c.aux.z_loss = 0.1;
  c.aux.diversity = 0.7;
  c.aux.simplicity = 1.3;
  c.aux.balance = 0.9;
  c.aux.efficiency = 1.1;
  return c;
}

}  // namespace

TEST_SUITE("backward") {
  TEST_CASE("backward is bitwise identical for any executor and thread count") {
    SUBCASE("top_k swiglu") { determinism<dmoe::top_k, dmoe::swiglu>(big_case("det/top_k", 4)); }
    SUBCASE("top_k gelu_erf, no renormalisation") {
      case_cfg c = big_case("det/top_k2", 3);
      c.renorm = false;
      determinism<dmoe::top_k, dmoe::gelu_erf>(c);
    }
    SUBCASE("dynamic_k relu") { determinism<dmoe::dynamic_k, dmoe::relu>(big_case("det/dynamic_k", 4)); }
    SUBCASE("top_any silu, training") { determinism<dmoe::top_any, dmoe::silu>(big_case("det/top_any", 4)); }
    SUBCASE("top_any geglu, inference") {
      case_cfg c = big_case("det/top_any2", 4);
      c.training = false;
      determinism<dmoe::top_any, dmoe::geglu>(c);
    }
  }
}

namespace {

/// Rows `idx` of m, in order.
fmat rows_of(const fmat& m, const std::vector<index_t>& idx) {
  fmat r(index_t(idx.size()), m.cols());
  for (std::size_t i = 0; i < idx.size(); ++i) r.row(index_t(i)) = m.row(idx[i]);
  return r;
}

/// A token's y and dx are bitwise the same whatever tokens share its batch (no auxiliary terms:
/// those are batch statistics by definition), and the same on every SIMD instruction set.
template <class P, class A>
void batch_invariance(case_cfg c) {
  c.use_aux = false;
  INFO((std::string(P::template router<float>::name) + " " + A::name + " " + c.describe()));
  layer_t<P, A, float> layer(config_of(c), options_of<P>(c));
  rng g(c.seed);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  const fmat x = random_rows<float>(g, c.tokens, c.d), dy = random_rows<float>(g, c.tokens, c.d);
  const run_result base = run_once(layer, dmoe::context<dmoe::cpu>{}, x, dy, nullptr);
  const std::vector<std::vector<index_t>> subsets = {{0}, {299}, {17}, {5, 6, 7, 8, 9, 10, 11}, {250, 3, 121, 77}};
  for (const auto& s : subsets) {
    const run_result sub = run_once(layer, dmoe::context<dmoe::cpu>{}, rows_of(x, s), rows_of(dy, s), nullptr);
    for (std::size_t i = 0; i < s.size(); ++i) {
      INFO("token " << s[i] << " in a batch of " << s.size());
      CHECK(std::memcmp(sub.y.row(index_t(i)).data(), base.y.row(s[i]).data(), sizeof(float) * std::size_t(c.d)) == 0);
      CHECK(std::memcmp(sub.dx.row(index_t(i)).data(), base.dx.row(s[i]).data(), sizeof(float) * std::size_t(c.d)) ==
            0);
    }
  }
  // Every SIMD kernel computes the same chains (the portable one differs only in the router's
  // reduction order, so it is compared at the kernel level: tests/unit/kernels).
  const dmoe::cpu_isa before = dmoe::active_cpu_isa();
  for (int i = int(dmoe::cpu_isa::avx2); i <= int(dmoe::supported_cpu_isa()); ++i) {
    REQUIRE(dmoe::set_cpu_isa(dmoe::cpu_isa(i)).ok());
    const run_result other = run_once(layer, dmoe::context<dmoe::cpu>{}, x, dy, nullptr);
    INFO("instruction set " << dmoe::to_string(dmoe::cpu_isa(i)));
    CHECK(same_bytes(base.y, other.y));
    CHECK(same_bytes(base.dx, other.dx));
    if (dmoe::cpu_isa(i) == dmoe::cpu_isa::avx512) {  // both AVX-512 register tiles
      namespace cb = dmoe::detail::cpu_backend;
      const cb::avx512_tile tile = cb::active_avx512_tile();
      for (cb::avx512_tile t : {cb::avx512_tile::tall, cb::avx512_tile::wide}) {
        cb::set_avx512_tile(t);
        const run_result tiled = run_once(layer, dmoe::context<dmoe::cpu>{}, x, dy, nullptr);
        INFO("AVX-512 tile " << (t == cb::avx512_tile::wide ? "wide" : "tall"));
        CHECK(same_bytes(base.y, tiled.y));
        CHECK(same_bytes(base.dx, tiled.dx));
      }
      cb::set_avx512_tile(tile);
    }
  }
  REQUIRE(dmoe::set_cpu_isa(before).ok());
}

}  // namespace

TEST_SUITE("backward") {
  TEST_CASE("a token's output and dx do not depend on its batch nor on the SIMD instruction set") {
    SUBCASE("top_k swiglu") { batch_invariance<dmoe::top_k, dmoe::swiglu>(big_case("inv/top_k", 4)); }
    SUBCASE("dynamic_k relu") { batch_invariance<dmoe::dynamic_k, dmoe::relu>(big_case("inv/dynamic_k", 4)); }
    SUBCASE("top_any gelu_tanh, inference") {
      case_cfg c = big_case("inv/top_any", 4);
      c.training = false;
      batch_invariance<dmoe::top_any, dmoe::gelu_tanh>(c);
    }
  }
}
