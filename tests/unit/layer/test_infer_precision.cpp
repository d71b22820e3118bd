// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// infer_precision::bf16 (moe_layer<float, cpu>::set_infer_precision): on a CPU with bf16 matrix
// tiles, infer rounds x rows, W1, W2 and the hidden activations to bf16 and multiplies on the
// tiles. Checked against a plain-loop reference in double that rounds the same operands with its
// own rounding (std::nearbyint on the scaled value): |y - ref| within bf16's step of the
// magnitudes summed (a hidden value near a rounding boundary may round the other way in float
// than in double). And bitwise: a token's output the same alone, in any batch, any order, on 1-3
// workers, fused or not; a weight change repacks; exact is forward's bits again; without tiles
// (another instruction set) bf16 is not taken. The tile tests report themselves skipped on CPUs
// without AMX-BF16; the fallback and bad-input tests run everywhere.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::index_t;
using dmoe::infer_precision;
using dmoe::row_matrix;
namespace cb = dmoe::detail::cpu_backend;

namespace {

/// v rounded to bf16 (8 significant bits, ties to even); zero, inf and NaN pass through.
/// Written here, independent of the library's bit arithmetic.
double bf16_round(double v) {
  if (!std::isfinite(v) || v == 0.0) return v;
  const double a = std::fabs(float(v));  // as the library, from the float value
  int e = 0;
  (void)std::frexp(a, &e);
  const int ulp = std::max(e - 1, -126) - 7;
  return std::copysign(std::ldexp(std::nearbyint(std::ldexp(a, -ulp)), ulp), v);
}

/// One expert on one token with x, W1, W2 and the hidden values rounded to bf16 (biases,
/// activation and sums in double); `abs_out` bounds the magnitudes summed into each output.
void expert_forward_bf16(const ref::experts_model& m, int e, const std::vector<double>& x, double* out,
                         double* abs_out) {
  const int d = m.d, n = m.n, fn = m.fn();
  std::vector<double> pre(static_cast<size_t>(fn)), h(static_cast<size_t>(n));
  for (int j = 0; j < fn; ++j) {
    double s = m.b1.empty() ? 0.0 : m.b1[size_t(e) * fn + j];
    for (int i = 0; i < d; ++i) s += bf16_round(x[size_t(i)]) * bf16_round(m.w1[(size_t(e) * d + i) * fn + j]);
    pre[size_t(j)] = s;
  }
  for (int j = 0; j < n; ++j)
    h[size_t(j)] = bf16_round(ref::is_gated(m.act) ? ref::act_base(m.act, pre[size_t(j)]) * pre[size_t(n + j)]
                                                   : ref::act_base(m.act, pre[size_t(j)]));
  for (int c = 0; c < d; ++c) {
    double s = m.b2e.empty() ? 0.0 : m.b2e[size_t(e) * d + c], a = std::fabs(s);
    for (int j = 0; j < n; ++j) {
      const double p = h[size_t(j)] * bf16_round(m.w2[(size_t(e) * n + j) * d + c]);
      s += p;
      a += std::fabs(p);
    }
    out[c] = s;
    abs_out[c] = a;
  }
}

/// The bf16 reference of a batch: routes from the float reference router, outputs through
/// expert_forward_bf16.
ref::batch_result reference_bf16(const ref::model& m, const row_matrix<float>& x) {
  ref::batch_result b;
  const int d = m.d(), tokens = int(x.rows());
  b.y.assign(size_t(tokens) * d, 0.0);
  b.y_abs.assign(size_t(tokens) * d, 0.0);
  std::vector<double> xr(static_cast<size_t>(d)), ye(static_cast<size_t>(d)), ya(static_cast<size_t>(d));
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < d; ++i) xr[size_t(i)] = double(x(t, i));
    b.routes.push_back(ref::route_token(m.router, xr.data()));
    double* y = b.y.data() + size_t(t) * d;
    double* ya_t = b.y_abs.data() + size_t(t) * d;
    for (int c = 0; c < d; ++c) {
      y[c] = m.experts.b2.empty() ? 0.0 : m.experts.b2[size_t(c)];
      ya_t[c] = std::fabs(y[c]);
    }
    for (const ref::slot& s : b.routes.back().slots) {
      expert_forward_bf16(m.experts, s.expert, xr, ye.data(), ya.data());
      for (int c = 0; c < d; ++c) {
        y[c] += s.weight * ye[size_t(c)];
        ya_t[c] += std::fabs(s.weight) * ya[size_t(c)];
      }
    }
  }
  return b;
}

/// The tolerance against reference_bf16, relative to the magnitudes summed: one bf16 step
/// (2^-8) for hidden values that round the other way, and float sums besides.
constexpr double bf16_tolerance = 1.0 / 256 + 1e-4;

bool same(const row_matrix<float>& a, const row_matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())) == 0;
}

struct fused_cut {
  index_t before = cb::fused_combine_max_workers().load();
  explicit fused_cut(index_t workers) { cb::fused_combine_max_workers().store(workers); }
  ~fused_cut() { cb::fused_combine_max_workers().store(before); }
};

const bool no_tiles = !dmoe::cpu_has_bf16_tiles();

template <class P, class A>
void check_tiles(std::uint64_t seed, bool wide) {
  case_params p = random_params(seed, policy_of<P>(), 0.4);
  test_rng g(seed ^ 0x7a11);
  if (wide) {  // whole and partial tiles: d and n across 16 / 32 boundaries, several row blocks
    p.d = g.integer(20, 200);
    p.n = g.integer(1, 70);
  }
  p.tokens = std::max(p.tokens, 1);
  p.expert_bias = g.coin(0.5);
  p.hidden_bias = g.coin(0.7);
  INFO(p.describe());
  prepared_case<float, P, A> c(p, 3);
  c.layer.set_infer_precision(infer_precision::bf16);
  REQUIRE(c.layer.infer_precision() == infer_precision::bf16);
  REQUIRE(c.layer.infer_uses_bf16_tiles());

  row_matrix<float> y = row_matrix<float>::Constant(p.tokens, p.d, -1.0f);
  REQUIRE(c.layer.infer({}, c.x, y, c.ws).ok());
  const auto want = reference_bf16(ref::read_layer(c.layer), c.x);
  const auto oc = compare_output<float>(y, want, borderline_margin<float>(), bf16_tolerance);
  CHECK_MESSAGE(oc.ok(), oc.first);

  // Bitwise the same on 1-3 workers, fused (one worker) or per-task + combine.
  dmoe::thread_pool pool2(2), pool3(3);
  const dmoe::context<dmoe::cpu> ctxs[] = {{}, {&pool2}, {&pool3}};
  for (index_t cut : {index_t(0), index_t(1) << 20}) {
    fused_cut scope(cut);
    for (const auto& ctx : ctxs) {
      CAPTURE(cut);
      CAPTURE(ctx.concurrency());
      row_matrix<float> y2 = row_matrix<float>::Constant(p.tokens, p.d, -2.0f);
      REQUIRE(c.layer.infer(ctx, c.x, y2, c.ws).ok());
      CHECK(same(y2, y));
    }
  }
  // A token's output does not depend on its batch: each token alone, and the batch reversed.
  dmoe::workspace_buffer ws1(c.layer.workspace_size(dmoe::workspace_bounds{p.tokens, 1}));
  int moved = 0;
  for (index_t t = 0; t < p.tokens; t += std::max<index_t>(1, p.tokens / 7)) {
    row_matrix<float> x1 = c.x.row(t), y1(1, p.d);
    REQUIRE(c.layer.infer({}, x1, y1, ws1).ok());
    moved += std::memcmp(y1.data(), y.row(t).data(), sizeof(float) * size_t(p.d)) != 0;
  }
  CHECK(moved == 0);
  row_matrix<float> xr = c.x.colwise().reverse(), yr(p.tokens, p.d);
  REQUIRE(c.layer.infer({}, xr, yr, c.ws).ok());
  CHECK(same(row_matrix<float>(yr.colwise().reverse()), y));

  // A weight change repacks the tiles on the next infer.
  c.layer.experts().w2(0) *= -0.5f;
  c.layer.experts().w1(c.layer.num_experts() - 1) *= 2.0f;
  REQUIRE(c.layer.infer({}, c.x, y, c.ws).ok());
  const auto oc2 = compare_output<float>(y, reference_bf16(ref::read_layer(c.layer), c.x), borderline_margin<float>(),
                                         bf16_tolerance);
  CHECK_MESSAGE(oc2.ok(), oc2.first);

  // Back to exact: forward's bits; forward never used the tiles.
  row_matrix<float> y_fwd(p.tokens, p.d), y_inf(p.tokens, p.d);
  REQUIRE(c.layer.forward({}, c.x, y_fwd, c.ws).ok());
  const auto of = compare_output<float>(y_fwd, c.reference(), borderline_margin<float>(), output_tolerance<float>());
  CHECK_MESSAGE(of.ok(), of.first);
  c.layer.set_infer_precision(infer_precision::exact);
  REQUIRE(c.layer.infer({}, c.x, y_inf, c.ws).ok());
  CHECK(same(y_inf, y_fwd));
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE("infer_precision::bf16 on the tiles: against the bf16 reference, batch and thread invariant" *
            doctest::skip(no_tiles)) {
    for (int i = 0; i < 3; ++i) {
      const std::uint64_t s = seed_of("infer_precision/tiles", i);
      const bool wide = i > 0;
      check_tiles<dmoe::top_k, dmoe::relu>(s, wide);
      check_tiles<dmoe::top_k, dmoe::swiglu>(s + 1, wide);
      check_tiles<dmoe::dynamic_k, dmoe::gelu_erf>(s + 2, wide);
      check_tiles<dmoe::dynamic_k, dmoe::geglu>(s + 3, wide);
      check_tiles<dmoe::top_any, dmoe::silu>(s + 4, wide);
      check_tiles<dmoe::top_any, dmoe::gelu_tanh>(s + 5, wide);
    }
  }

  TEST_CASE("infer_precision::bf16 on the tiles: 16-bit weight storage, crowded experts" * doctest::skip(no_tiles)) {
    // bf16 storage rounds W1, W2 the same way, so the tiles see what forward multiplies by.
    case_params p = random_params(seed_of("infer_precision/crowded", 0), ref::policy_kind::top_k);
    p.d = 300;
    p.n = 40;
    p.tokens = 300;
    p.E = 3;
    p.k = 2;
    prepared_case<float, dmoe::top_k, dmoe::swiglu> c(p, 2);
    c.layer.set_weight_storage(dmoe::weight_storage::bf16);
    c.layer.set_infer_precision(infer_precision::bf16);
    row_matrix<float> y(p.tokens, p.d);
    REQUIRE(c.layer.infer({}, c.x, y, c.ws).ok());
    const auto oc = compare_output<float>(y, reference_bf16(ref::read_layer(c.layer), c.x), borderline_margin<float>(),
                                          bf16_tolerance);
    CHECK_MESSAGE(oc.ok(), oc.first);
    dmoe::thread_pool pool(2);
    row_matrix<float> y2(p.tokens, p.d);
    fused_cut scope(0);
    REQUIRE(c.layer.infer({&pool}, c.x, y2, c.ws).ok());
    CHECK(same(y2, y));
    // Not exact: the operands were rounded (the check that the tiles ran at all).
    row_matrix<float> y_fwd(p.tokens, p.d);
    REQUIRE(c.layer.forward({}, c.x, y_fwd, c.ws).ok());
    CHECK_FALSE(same(y_fwd, y));
  }

  TEST_CASE("infer_precision::bf16 without tiles is infer's exact path") {
    case_params p = random_params(seed_of("infer_precision/fallback", 0), ref::policy_kind::dynamic_k);
    p.tokens = std::max(p.tokens, 5);
    prepared_case<float, dmoe::dynamic_k, dmoe::relu> c(p);
    c.layer.set_infer_precision(infer_precision::bf16);
    const dmoe::cpu_isa before = dmoe::active_cpu_isa();
    REQUIRE(dmoe::set_cpu_isa(dmoe::cpu_isa::portable).ok());
    CHECK_FALSE(c.layer.infer_uses_bf16_tiles());
    row_matrix<float> y(p.tokens, p.d), y_fwd(p.tokens, p.d);
    REQUIRE(c.layer.infer({}, c.x, y, c.ws).ok());
    REQUIRE(c.layer.forward({}, c.x, y_fwd, c.ws).ok());
    REQUIRE(dmoe::set_cpu_isa(before).ok());
    CHECK(same(y, y_fwd));
    CHECK(c.layer.infer_uses_bf16_tiles() == dmoe::cpu_has_bf16_tiles());
  }

  TEST_CASE("set_infer_precision: bad input is a clear error") {
    case_params p = random_params(seed_of("infer_precision/errors", 0), ref::policy_kind::top_k);
    prepared_case<double, dmoe::top_k, dmoe::relu> cd(p);
    CHECK_THROWS_WITH_AS(cd.layer.set_infer_precision(infer_precision::bf16),
                         doctest::Contains("need a float layer"), dmoe::error);
    CHECK(cd.layer.infer_precision() == infer_precision::exact);
    cd.layer.set_infer_precision(infer_precision::exact);  // always fine
    prepared_case<float, dmoe::top_k, dmoe::relu> cf(p);
    CHECK_THROWS_WITH_AS(cf.layer.set_infer_precision(static_cast<infer_precision>(7)),
                         doctest::Contains("7 is not an infer_precision"), dmoe::error);
    infer_precision parsed = infer_precision::exact;
    CHECK(dmoe::parse_infer_precision("bf16", parsed));
    CHECK(parsed == infer_precision::bf16);
    CHECK_FALSE(dmoe::parse_infer_precision("fp8", parsed));
    CHECK(std::string(dmoe::to_string(infer_precision::exact)) == "exact");
  }
}
