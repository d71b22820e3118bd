// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// 16-bit weight storage (moe_layer<float, cpu>::set_weight_storage): the kernels read W1 and W2
// rounded to bf16 or fp16, so a layer with bf16/f16 storage must give exactly the bits of a float
// layer whose W1 and W2 were rounded the same way. The rounding used here is written in this file
// (scaling to an integer and std::nearbyint, ties to even), independent of the library's. Checked:
// the rounding itself on ties, subnormals, overflow, NaN; the 16-bit panel products on every
// kernel; forward, infer and backward (dx and every gradient) for every policy and several
// activations, on 1 and 2 threads; forward on every instruction set; the master weights untouched; a
// weight update repacked; and the bad input (a double layer, a value that is no format).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <dmoe/cpu/detail/packed_experts.hpp>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::index_t;
using dmoe::row_matrix;
using dmoe::weight_storage;
namespace cb = dmoe::detail::cpu_backend;

namespace {

/// v rounded to nearest (ties to even) with `mant` stored mantissa bits and normal exponents down
/// to `emin`; beyond `max_finite` after rounding it is inf. NaN and inf pass through.
float reference_round(float v, int mant, int emin, float max_finite) {
  if (!std::isfinite(v) || v == 0.0f) return v;
  const double a = std::fabs(double(v));
  int e = 0;
  (void)std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1): leading bit at 2^(e-1)
  const int ulp = std::max(e - 1, emin) - mant;
  const double q = std::ldexp(std::nearbyint(std::ldexp(a, -ulp)), ulp);  // exact: < 2^(mant+2) steps
  const double r = q > double(max_finite) ? double(std::numeric_limits<float>::infinity()) : q;
  return float(std::copysign(r, double(v)));
}
float reference_round(float v, weight_storage s) {
  switch (s) {
    case weight_storage::bf16: return reference_round(v, 7, -126, 3.38953139e38f);
    case weight_storage::f16: return reference_round(v, 10, -14, 65504.0f);
    case weight_storage::f32: break;
  }
  return v;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

template <class T>
bool same(const row_matrix<T>& a, const row_matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0;
}
bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
}

/// W1 and W2 of every expert rounded in place through the reference rounding.
void round_expert_matrices(dmoe::expert_weights<float>& w, weight_storage s) {
  for (auto* v : {&w.w1_storage(), &w.w2_storage()})
    for (float& x : *v) x = reference_round(x, s);
}

template <class H>
weight_storage storage_of() {
  return std::is_same_v<H, cb::bf16_t> ? weight_storage::bf16 : weight_storage::f16;
}

/// One random 16-bit panel product against the plain fma loop over the rounded B; mismatches.
template <class H>
int check_product16(test_rng& g, dmoe::cpu_isa isa, index_t m, index_t N, index_t K, bool bias) {
  const index_t lda = K + g.integer(0, 3), ldc = N + g.integer(0, 5);
  std::vector<float> A(std::size_t(m * lda + 1)), B(std::size_t(K * N + 1)), init(static_cast<std::size_t>(N));
  for (auto& v : A) v = float(g.normal());
  for (auto& v : B) v = float(g.normal()) * (g.coin(0.1) ? 1e-6f : 1.0f);
  for (auto& v : init) v = float(g.normal());
  const cb::tile_shape t = cb::tile_for<float>(isa);
  std::vector<H> P(std::size_t(cb::packed_panel_elems(K, N, t.nr()) + 1));
  if (g.coin(0.5)) {  // B row-major (the transposes' source) or column-major (W1, W2's)
    cb::pack_panels_16<H>(isa, K, N, B.data(), N, 1, t.nr(), t.lanes, P.data());
  } else {
    std::vector<float> Bt(std::size_t(K * N + 1));
    for (index_t k = 0; k < K; ++k)
      for (index_t j = 0; j < N; ++j) Bt[std::size_t(j * K + k)] = B[std::size_t(k * N + j)];
    cb::pack_panels_16<H>(isa, K, N, Bt.data(), 1, K, t.nr(), t.lanes, P.data());
  }
  std::vector<float> C(std::size_t(m * ldc + 1), -12345.0f);
  cb::panel_product<float>(isa, m, N, K, {A.data(), lda, nullptr}, cb::panel_b<H>::packed(P.data(), K, t.nr()),
                           bias ? init.data() : nullptr, C.data(), ldc);
  int bad = 0;
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < ldc; ++j) {
      const float got = C[std::size_t(i * ldc + j)];
      if (j >= N) {
        bad += !same_bits(got, -12345.0f);
        continue;
      }
      float acc = bias ? init[std::size_t(j)] : 0.0f;
      for (index_t k = 0; k < K; ++k)
        acc = std::fma(A[std::size_t(i * lda + k)], reference_round(B[std::size_t(k * N + j)], storage_of<H>()), acc);
      bad += !same_bits(acc, got);
    }
  return bad;
}

struct isa_scope {
  dmoe::cpu_isa before = dmoe::active_cpu_isa();
  cb::avx512_tile tile = cb::active_avx512_tile();
  ~isa_scope() {
    (void)dmoe::set_cpu_isa(before);
    cb::set_avx512_tile(tile);
  }
};

/// Every (instruction set, AVX-512 tile) this CPU runs, made active in turn.
template <class F>
void for_each_kernel(F&& f) {
  isa_scope scope;
  for (int i = 0; i <= int(dmoe::supported_cpu_isa()); ++i)
    for (cb::avx512_tile tile : {cb::avx512_tile::tall, cb::avx512_tile::wide}) {
      if (dmoe::cpu_isa(i) != dmoe::cpu_isa::avx512 && tile == cb::avx512_tile::wide) continue;
      REQUIRE(dmoe::set_cpu_isa(dmoe::cpu_isa(i)).ok());
      cb::set_avx512_tile(tile);
      const std::string name =
          std::string(dmoe::to_string(dmoe::cpu_isa(i))) + (tile == cb::avx512_tile::wide ? "/wide" : "");
      INFO("kernel " << name);
      f(dmoe::cpu_isa(i));
    }
}

/// Forward, infer and backward of a layer with storage s against a float layer holding the rounded
/// W1, W2: the same bits everywhere, on 1 and 2 threads.
template <class P, class A>
void check_layer(std::uint64_t seed, weight_storage s) {
  case_params p = random_params(seed, policy_of<P>(), 0.3);
  p.tokens = std::max(p.tokens, 1);
  INFO(p.describe() << " storage " << dmoe::to_string(s));
  prepared_case<float, P, A> c(p, 2);
  layer_t<float, P, A> rounded = c.layer;  // the reference: float storage, rounded W1 and W2
  round_expert_matrices(rounded.experts(), s);
  const std::vector<float> master_w1 = c.layer.experts().w1_storage();
  c.layer.set_weight_storage(s);
  CHECK(c.layer.weight_storage() == s);

  dmoe::thread_pool pool2(2);
  const dmoe::context<dmoe::cpu> ctxs[] = {{}, {&pool2}};
  test_rng g(seed ^ 0x77);
  const row_matrix<float> dy = random_tokens<float>(g, p.tokens, p.d);
  dmoe::workspace_buffer ws_ref(rounded.workspace_size(dmoe::workspace_bounds{p.tokens, 2}));
  row_matrix<float> y_ref(p.tokens, p.d), dx_ref(p.tokens, p.d);
  auto g_ref = rounded.make_gradients();
  REQUIRE(rounded.forward({}, c.x, y_ref, ws_ref).ok());
  REQUIRE(rounded.backward({}, c.x, dy, dx_ref, g_ref, ws_ref).ok());
  for (const auto& ctx : ctxs) {
    CAPTURE(ctx.concurrency());
    row_matrix<float> y(p.tokens, p.d), yi(p.tokens, p.d), dx(p.tokens, p.d);
    REQUIRE(c.layer.forward(ctx, c.x, y, c.ws).ok());
    CHECK(same(y, y_ref));
    auto gr = c.layer.make_gradients();
    const auto st = c.layer.backward(ctx, c.x, dy, dx, gr, c.ws);
    REQUIRE_MESSAGE(st.ok(), std::string(st.message()));
    CHECK(same(dx, dx_ref));
    CHECK(same(gr.experts.w1_storage(), g_ref.experts.w1_storage()));
    CHECK(same(gr.experts.w2_storage(), g_ref.experts.w2_storage()));
    CHECK(same(gr.experts.b1_storage(), g_ref.experts.b1_storage()));
    CHECK(same(gr.experts.output_bias_storage(), g_ref.experts.output_bias_storage()));
    const auto pa = gr.parameters(), pb = g_ref.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i)
      CHECK_MESSAGE(std::memcmp(pa[i].data, pb[i].data, sizeof(float) * std::size_t(pa[i].size)) == 0, pa[i].name);
    REQUIRE(c.layer.infer(ctx, c.x, yi, c.ws).ok());
    CHECK(same(yi, y_ref));
  }
  // The float weights are the master copy: untouched by the rounding.
  CHECK(same(c.layer.experts().w1_storage(), master_w1));
}

template <class P, class A>
void check_layers(const char* tag, int seeds) {
  for (int i = 0; i < seeds; ++i)
    for (weight_storage s : {weight_storage::bf16, weight_storage::f16})
      check_layer<P, A>(seed_of(std::string("storage/") + tag, i) + std::uint64_t(s), s);
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE("16-bit rounding: the library's equals the reference (ties, subnormals, overflow, NaN)") {
    std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 1.00390625f, 1.01171875f, 65504.0f, 65519.0f, 65520.0f,
                            -70000.0f, 1e-8f, 6.0e-8f, 3e-5f, 1e-40f, -1e-45f, 3.4e38f,
                            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min()};
    test_rng g(seed_of("storage/round", 0));
    for (int i = 0; i < 20000; ++i) {
      float x = float(g.normal()) * std::ldexp(1.0f, g.integer(-30, 30));
      v.push_back(x);
      std::uint32_t bits;  // exact ties: a value halfway between two 16-bit neighbours
      std::memcpy(&bits, &x, sizeof bits);
      bits = (bits & 0xFFFF0000u) | 0x8000u;
      std::memcpy(&x, &bits, sizeof bits);
      v.push_back(x);
    }
    for (float x : v) {
      CAPTURE(x);
      CHECK(same_bits(cb::round_through<cb::bf16_t>(x), reference_round(x, weight_storage::bf16)));
      CHECK(same_bits(cb::round_through<cb::f16_t>(x), reference_round(x, weight_storage::f16)));
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    CHECK(std::isnan(cb::round_through<cb::bf16_t>(nan)));
    CHECK(std::isnan(cb::round_through<cb::f16_t>(nan)));
  }

  TEST_CASE("16-bit panels: the product equals the fma chain over the rounded weights, every kernel") {
    for_each_kernel([](dmoe::cpu_isa isa) {
      test_rng g(seed_of(std::string("storage/panels/") + dmoe::to_string(isa), int(cb::active_avx512_tile())));
      for (int rep = 0; rep < 60; ++rep) {
        const index_t m = g.integer(1, 30), N = g.integer(1, 150), K = g.integer(0, 70);
        const bool bias = g.coin(0.5);
        INFO("m=" << m << " N=" << N << " K=" << K);
        CHECK(check_product16<cb::bf16_t>(g, isa, m, N, K, bias) == 0);
        CHECK(check_product16<cb::f16_t>(g, isa, m, N, K, bias) == 0);
      }
    });
  }

  TEST_CASE("16-bit packing per ISA equals the element-wise packing (ties, subnormals, inf, NaN)") {
    for_each_kernel([](dmoe::cpu_isa isa) {
      test_rng g(seed_of(std::string("storage/pack/") + dmoe::to_string(isa), int(cb::active_avx512_tile())));
      const cb::tile_shape t = cb::tile_for<float>(isa);
      for (int rep = 0; rep < 40; ++rep) {
        const index_t K = g.integer(0, 50), N = g.integer(1, 140);
        const bool columns = g.coin(0.5);
        std::vector<float> src(std::size_t(K * N + 1));
        for (auto& v : src) {
          v = float(g.normal()) * std::ldexp(1.0f, g.integer(-30, 20));
          std::uint32_t bits;
          std::memcpy(&bits, &v, sizeof bits);
          if (g.coin(0.2)) bits = (bits & 0xFFFF0000u) | 0x8000u;  // a bf16 tie
          if (g.coin(0.02)) bits = 0x7F800000u | (g.coin(0.5) ? 0x80000000u : 0u);  // +-inf
          if (g.coin(0.02)) bits = 0x7F800001u + std::uint32_t(g.integer(0, 1000));  // a NaN
          std::memcpy(&v, &bits, sizeof bits);
        }
        const index_t sk = columns ? 1 : N, sn = columns ? K : 1;
        auto check = [&](auto tag) {
          using H = decltype(tag);
          std::vector<H> want(std::size_t(cb::packed_panel_elems(K, N, t.nr()) + 1)), got = want;
          cb::pack_panels_16<H>(K, N, src.data(), sk, sn, t.nr(), t.lanes, want.data());
          cb::pack_panels_16<H>(isa, K, N, src.data(), sk, sn, t.nr(), t.lanes, got.data());
          int bad = 0;
          for (std::size_t i = 0; i < want.size(); ++i) {
            const float a = cb::widen(want[i]), b = cb::widen(got[i]);
            bad += std::isnan(a) ? !std::isnan(b) : !(want[i] == got[i]);  // NaN payloads may differ (fp16)
          }
          INFO("K=" << K << " N=" << N << " columns=" << columns);
          CHECK(bad == 0);
        };
        check(cb::bf16_t{});
        check(cb::f16_t{});
      }
    });
  }

  TEST_CASE("16-bit storage: forward, infer and backward are those of the rounded float layer") {
    check_layers<dmoe::top_k, dmoe::relu>("topk-relu", 3);
    check_layers<dmoe::top_k, dmoe::swiglu>("topk-swiglu", 2);
    check_layers<dmoe::dynamic_k, dmoe::gelu_erf>("dynk-gelu", 2);
    check_layers<dmoe::dynamic_k, dmoe::geglu>("dynk-geglu", 2);
    check_layers<dmoe::top_any, dmoe::silu>("topany-silu", 2);
    check_layers<dmoe::top_any, dmoe::gelu_tanh>("topany-gelutanh", 2);
  }

  TEST_CASE("16-bit storage: the rounded float layer's bits on every instruction set and tile") {
    // (Across instruction sets the router's scores, and so the routing, may differ in the last
    // bit: the router is not on the panel kernels yet. Each kernel is compared with itself.)
    for (weight_storage s : {weight_storage::bf16, weight_storage::f16}) {
      case_params p = random_params(seed_of("storage/isa", int(s)), ref::policy_kind::top_k, 0.5);
      p.tokens = std::max(p.tokens, 5);
      prepared_case<float, dmoe::top_k, dmoe::swiglu> c(p);
      layer_t<float, dmoe::top_k, dmoe::swiglu> rounded = c.layer;
      round_expert_matrices(rounded.experts(), s);
      c.layer.set_weight_storage(s);
      for_each_kernel([&](dmoe::cpu_isa) {
        row_matrix<float> y(p.tokens, p.d), y_ref(p.tokens, p.d);
        REQUIRE(c.layer.forward({}, c.x, y, c.ws).ok());
        REQUIRE(rounded.forward({}, c.x, y_ref, c.ws).ok());
        CHECK(same(y, y_ref));
      });
    }
  }

  TEST_CASE("16-bit storage: weight updates are repacked; switching back restores float") {
    case_params p = random_params(seed_of("storage/update", 0), ref::policy_kind::top_k);
    p.tokens = std::max(p.tokens, 3);
    prepared_case<float, dmoe::top_k, dmoe::relu> c(p);
    row_matrix<float> y32(p.tokens, p.d), y16(p.tokens, p.d), y(p.tokens, p.d);
    REQUIRE(c.layer.forward({}, c.x, y32, c.ws).ok());
    c.layer.set_weight_storage(weight_storage::f16);
    REQUIRE(c.layer.forward({}, c.x, y16, c.ws).ok());
    for (float& v : c.layer.experts().w2_storage()) v *= 0.5f;  // an "optimizer step"
    auto rounded = c.layer;
    rounded.set_weight_storage(weight_storage::f32);
    round_expert_matrices(rounded.experts(), weight_storage::f16);
    row_matrix<float> y_ref(p.tokens, p.d);
    dmoe::workspace_buffer ws2(rounded.workspace_size(dmoe::workspace_bounds{p.tokens, 1}));
    REQUIRE(rounded.forward({}, c.x, y_ref, ws2).ok());
    REQUIRE(c.layer.forward({}, c.x, y, c.ws).ok());
    CHECK(same(y, y_ref));
    for (float& v : c.layer.experts().w2_storage()) v *= 2.0f;  // exact: back to the original
    c.layer.set_weight_storage(weight_storage::f32);
    REQUIRE(c.layer.forward({}, c.x, y, c.ws).ok());
    CHECK(same(y, y32));
    CHECK_FALSE(same(y16, y32));  // the rounding is visible (else this test proves nothing)
  }

  TEST_CASE("16-bit storage: bad input") {
    case_params p = random_params(seed_of("storage/bad", 0), ref::policy_kind::top_k);
    prepared_case<double, dmoe::top_k, dmoe::relu> c(p);
    try {
      c.layer.set_weight_storage(weight_storage::bf16);
      FAIL("a double layer took bf16 storage");
    } catch (const dmoe::error& e) {
      CHECK(e.code() == dmoe::errc::invalid_argument);
      CHECK(std::string(e.what()).find("needs a float layer") != std::string::npos);
    }
    CHECK(c.layer.weight_storage() == weight_storage::f32);
    c.layer.set_weight_storage(weight_storage::f32);  // the one format a double layer has
    prepared_case<float, dmoe::top_k, dmoe::relu> f(p);
    CHECK_THROWS_AS(f.layer.set_weight_storage(static_cast<weight_storage>(7)), dmoe::error);
    CHECK(f.layer.weight_storage() == weight_storage::f32);
    weight_storage out = weight_storage::f32;
    CHECK(dmoe::parse_weight_storage("bf16", out));
    CHECK(out == weight_storage::bf16);
    CHECK_FALSE(dmoe::parse_weight_storage("fp8", out));
    CHECK_FALSE(dmoe::parse_weight_storage(nullptr, out));
    CHECK(out == weight_storage::bf16);
  }
}
