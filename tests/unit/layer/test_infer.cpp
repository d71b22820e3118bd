// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// moe_layer::infer: the fused combine (experts in order, each row block's outputs added as w_s out
// into y) gives the same bits as forward (per-expert tasks, then the combine), for every policy,
// activation, scalar type, thread count and instruction set, on random shapes; and backward
// refuses the workspace infer filled.
#include <doctest/doctest.h>

#include <cstring>
#include <string>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::row_matrix;

namespace {

namespace cb = dmoe::detail::cpu_backend;

/// Moves infer's fused/unfused cut for the scope of a test: fused on at most `workers` workers
/// (0: never).
struct fused_cut {
  dmoe::index_t before = cb::fused_combine_max_workers().load();
  explicit fused_cut(dmoe::index_t workers) { cb::fused_combine_max_workers().store(workers); }
  ~fused_cut() { cb::fused_combine_max_workers().store(before); }
};

template <class T>
bool same(const row_matrix<T>& a, const row_matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0;
}

/// `crowded`: 300 tokens of d = 300 over at most 3 experts, so an expert has several 128-row
/// tasks and the fused path adds each task's outputs in several blocks of rows.
template <class T, class P, class A>
void check_infer(std::uint64_t seed, bool crowded = false) {
  case_params p = random_params(seed, policy_of<P>(), 0.5);
  test_rng g(seed ^ 0x1f3d);
  if (g.coin(0.5)) p.d = g.integer(129, 300);  // wider rows: fewer of them per fused output block
  if (crowded) {
    p.d = 300;
    p.tokens = 300;
    p.E = std::min(p.E, 3);
    p.k = std::min(p.k, p.E);
    p.k_max = std::min(p.k_max, p.E);
  }
  p.tokens = std::max(p.tokens, 1);
  INFO(p.describe());
  prepared_case<T, P, A> c(p, 3);
  dmoe::thread_pool pool2(2), pool3(3);
  const dmoe::context<dmoe::cpu> ctxs[] = {{}, {&pool2}, {&pool3}};
  row_matrix<T> y_fwd = row_matrix<T>::Constant(p.tokens, p.d, T(-1));
  REQUIRE(c.layer.forward({}, c.x, y_fwd, c.ws).ok());
  for (dmoe::index_t cut : {dmoe::index_t(0), dmoe::index_t(1), dmoe::index_t(1) << 20}) {
    fused_cut scope(cut);  // never, on one worker, on any number of workers
    for (const auto& ctx : ctxs) {
      CAPTURE(cut);
      CAPTURE(ctx.concurrency());
      row_matrix<T> y = row_matrix<T>::Constant(p.tokens, p.d, T(-2));
      dmoe::routing_stats st(p.E);
      const auto s = c.layer.infer(ctx, c.x, y, c.ws, &st);
      REQUIRE_MESSAGE(s.ok(), std::string(s.message()));
      CHECK(same(y, y_fwd));
      CHECK(st.tokens == p.tokens);
    }
  }
  // And the instruction sets (both AVX-512 tiles), fused.
  fused_cut scope(1 << 20);
  const dmoe::cpu_isa before = dmoe::active_cpu_isa();
  for (int i = int(dmoe::cpu_isa::portable); i <= int(dmoe::supported_cpu_isa()); ++i) {
    REQUIRE(dmoe::set_cpu_isa(dmoe::cpu_isa(i)).ok());
    INFO("instruction set " << dmoe::to_string(dmoe::cpu_isa(i)));
    for (cb::avx512_tile t : {cb::avx512_tile::tall, cb::avx512_tile::wide}) {
      const cb::avx512_tile tile = cb::active_avx512_tile();
      cb::set_avx512_tile(t);
      row_matrix<T> y_i = row_matrix<T>::Constant(p.tokens, p.d, T(-3)), y_f = y_i;
      REQUIRE(c.layer.forward({}, c.x, y_f, c.ws).ok());
      REQUIRE(c.layer.infer({}, c.x, y_i, c.ws).ok());
      CHECK(same(y_i, y_f));
      cb::set_avx512_tile(tile);
    }
  }
  REQUIRE(dmoe::set_cpu_isa(before).ok());
  // Right against the plain-loop reference, not only equal to forward.
  row_matrix<T> y = row_matrix<T>::Constant(p.tokens, p.d, T(-4));
  REQUIRE(c.layer.infer({}, c.x, y, c.ws).ok());
  const auto oc = compare_output<T>(y, c.reference(), borderline_margin<T>(), output_tolerance<T>());
  CHECK_MESSAGE(oc.ok(), oc.first);
}

template <class T>
void check_all(int seeds) {
  for (int i = 0; i < seeds; ++i) {
    const std::uint64_t s = seed_of(std::string("infer/") + type_name<T>(), i);
    check_infer<T, dmoe::top_k, dmoe::relu>(s);
    check_infer<T, dmoe::top_k, dmoe::swiglu>(s + 1);
    check_infer<T, dmoe::dynamic_k, dmoe::gelu_erf>(s + 2);
    check_infer<T, dmoe::dynamic_k, dmoe::geglu>(s + 3);
    check_infer<T, dmoe::top_any, dmoe::silu>(s + 4);
    check_infer<T, dmoe::top_any, dmoe::gelu_tanh>(s + 5);
  }
  const std::uint64_t s = seed_of(std::string("infer/crowded/") + type_name<T>(), 0);
  check_infer<T, dmoe::top_k, dmoe::swiglu>(s, true);
  check_infer<T, dmoe::dynamic_k, dmoe::relu>(s + 1, true);
  check_infer<T, dmoe::top_any, dmoe::gelu_erf>(s + 2, true);
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE_TEMPLATE("infer gives forward's bits on every path, thread count and instruction set", T, float,
                     double) {
    check_all<T>(4);
  }

  TEST_CASE("backward refuses a workspace that infer filled, and accepts it after forward") {
    case_params p = random_params(seed_of("infer/backward", 0), ref::policy_kind::top_k);
    p.tokens = 40;
    prepared_case<float, dmoe::top_k, dmoe::relu> c(p);
    auto grads = c.layer.make_gradients();
    row_matrix<float> dy = row_matrix<float>::Ones(p.tokens, p.d), dx(p.tokens, p.d);
    REQUIRE(c.layer.infer({}, c.x, c.y, c.ws).ok());
    const auto s = c.layer.backward({}, c.x, dy, dx, grads, c.ws);
    CHECK(s.code() == dmoe::errc::invalid_argument);
    CHECK(std::string(s.message()).find("infer()") != std::string::npos);
    // The plan and scores are there after infer.
    CHECK(c.layer.plan(c.ws, p.tokens).tokens == p.tokens);
    REQUIRE(c.layer.forward({}, c.x, c.y, c.ws).ok());
    CHECK(c.layer.backward({}, c.x, dy, dx, grads, c.ws).ok());
  }
}
