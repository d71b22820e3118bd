// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Test helpers: a seeded generator (independent of dmoe::detail::rng), random layer shapes,
/// options and weights (set through the public accessors), and comparisons of a layer's plan and
/// output against the reference of reference.hpp. Free of doctest so that every test binary can
/// use it; the comparisons return a summary the tests assert on.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <dmoe/dmoe.hpp>

#include "reference.hpp"
#include "test_random.hpp"

namespace dmoe_test {

using dmoe::index_t;

/// The forward tests' generator (its own seed scrambling, see test_random.hpp).
class test_rng : public dmoe_testing::splitmix {
 public:
  explicit test_rng(std::uint64_t seed) : splitmix(seed, 0x2545F4914F6CDD1Dull, 0x1234567ull) {}
};

template <class P>
constexpr ref::policy_kind policy_of() {
  if constexpr (std::is_same_v<P, dmoe::top_k>) return ref::policy_kind::top_k;
  else if constexpr (std::is_same_v<P, dmoe::dynamic_k>) return ref::policy_kind::dynamic_k;
  else return ref::policy_kind::top_any;
}

/// Everything that defines one random test case.
struct case_params {
  std::uint64_t seed = 0;
  int d = 1, E = 1, n = 1, tokens = 0, router_hidden = 8;
  bool hidden_bias = true, expert_bias = false, output_bias = true;
  // policy options
  int k = 1;
  bool renormalize = true;
  double tau = 0.5;
  int k_max = 0;
  bool training = false;
  // router weights
  double top_any_g_lo = -0.2, top_any_g_hi = 0.25;  ///< thresholds drawn uniformly in this range
  bool random_mask = true;                           ///< top_any: random active mask

  std::string describe() const {
    std::ostringstream s;
    s << "seed=" << seed << " d=" << d << " E=" << E << " n=" << n << " tokens=" << tokens << " h=" << router_hidden
      << " hidden_bias=" << hidden_bias << " expert_bias=" << expert_bias << " output_bias=" << output_bias
      << " k=" << k << " renorm=" << renormalize << " tau=" << tau << " k_max=" << k_max << " training=" << training;
    return s.str();
  }
};

/// Random shape and options: d in [1, 40], E in [1, 12], n in [1, 20], tokens in [0, 70], and
/// with probability `p_big` 300 tokens (several 128-row tasks per expert).
inline case_params random_params(std::uint64_t seed, ref::policy_kind pol, double p_big = 0.0) {
  test_rng g(seed);
  case_params p;
  p.seed = seed;
  p.d = g.integer(1, 40);
  p.E = g.integer(1, 12);
  p.n = g.integer(1, 20);
  p.tokens = g.coin(p_big) ? 300 : g.integer(0, 70);
  p.router_hidden = g.coin(0.2) ? 128 : g.integer(1, 32);
  p.hidden_bias = g.coin();
  p.expert_bias = g.coin();
  p.output_bias = g.coin();
  p.k = g.integer(1, p.E);
  p.renormalize = g.coin(0.6);
  const int t = g.integer(0, 9);
  p.tau = t == 0 ? 0.0 : t == 1 ? 1.0 : g.uniform(0.0, 1.0);
  p.k_max = g.coin(0.6) ? 0 : g.integer(1, p.E);
  p.training = g.coin();
  p.random_mask = g.coin(0.5);
  (void)pol;
  return p;
}

template <class P>
typename P::options make_options(const case_params& p) {
  if constexpr (std::is_same_v<P, dmoe::top_k>) return dmoe::top_k_options{p.k, p.renormalize};
  else if constexpr (std::is_same_v<P, dmoe::dynamic_k>) return dmoe::dynamic_k_options{p.tau, p.k_max};
  else return dmoe::top_any_options{p.training};
}

inline dmoe::moe_config make_config(const case_params& p) {
  dmoe::moe_config c;
  c.d_model = p.d;
  c.num_experts = p.E;
  c.expert_width = p.n;
  c.hidden_bias = p.hidden_bias;
  c.expert_bias = p.expert_bias;
  c.output_bias = p.output_bias;
  c.router_hidden = p.router_hidden;
  return c;
}

template <class T, class P, class A, std::size_t Ex = dmoe::dynamic_extent, std::size_t Wd = dmoe::dynamic_extent>
using layer_t = dmoe::moe_layer<T, dmoe::cpu, P, A, Ex, Wd>;

template <class T>
void randomize_experts(dmoe::expert_weights<T>& w, test_rng& g) {
  dmoe_testing::fill_experts_uniform(w, g);
}
using dmoe_testing::fill_uniform;

/// A dense FFN with PyTorch-scale weights (+-1/sqrt(fan_in)) and biases in +-0.5.
template <class T, class A>
dmoe::dense_ffn<T, A> random_dense(test_rng& g, int d, int F) {
  dmoe::dense_ffn<T, A> f(d, F);
  fill_uniform(f.w1(), g, -1.0 / std::sqrt(double(d)), 1.0 / std::sqrt(double(d)));
  fill_uniform(f.b1(), g, -0.5, 0.5);
  fill_uniform(f.w2(), g, -1.0 / std::sqrt(double(F)), 1.0 / std::sqrt(double(F)));
  fill_uniform(f.b2(), g, -0.5, 0.5);
  return f;
}

template <class T>
void randomize_router(dmoe::top_k_router<T>& r, test_rng& g, const case_params&) {
  fill_uniform(r.weight(), g, -1.0, 1.0);
  fill_uniform(r.bias(), g, -0.5, 0.5);
}
template <class T>
void randomize_router(dmoe::dynamic_k_router<T>& r, test_rng& g, const case_params&) {
  const double a = 1.0 / std::sqrt(double(r.d_model())), b = 1.0 / std::sqrt(double(r.hidden()));
  fill_uniform(r.w_in(), g, -a, a);
  fill_uniform(r.w_out(), g, -b, b);
}
template <class T>
void randomize_router(dmoe::top_any_router<T>& r, test_rng& g, const case_params& p) {
  for (index_t j = 0; j < r.weight().cols(); ++j)
    for (index_t i = 0; i < r.weight().rows(); ++i) r.weight()(i, j) = T(g.normal());
  fill_uniform(r.threshold(), g, p.top_any_g_lo, p.top_any_g_hi);
  if (p.random_mask) {
    for (auto& a : r.active()) a = g.coin(0.7) ? 1 : 0;
    r.active()[std::size_t(g.integer(0, int(r.num_experts()) - 1))] = 1;  // at least one active
  }
}

template <class Layer>
void randomize_layer(Layer& layer, test_rng& g, const case_params& p) {
  randomize_experts(layer.experts(), g);
  randomize_router(layer.router(), g, p);
}

/// Random tokens: mostly uniform in [-1, 1], some rows scaled or zero.
template <class T>
dmoe::row_matrix<T> random_tokens(test_rng& g, index_t tokens, index_t d) {
  dmoe::row_matrix<T> x(tokens, d);
  for (index_t t = 0; t < tokens; ++t) {
    const double scale = g.coin(0.1) ? g.uniform(0.01, 5.0) : 1.0;
    for (index_t i = 0; i < d; ++i) x(t, i) = T(scale * g.uniform(-1.0, 1.0));
  }
  return x;
}

/// Borderline margins below which a layer of scalar T may decide a selection differently from
/// the double reference: the reference's margins are relative to the scale of the compared
/// quantities' rounding errors (see reference.hpp), so 1e-5 for float (about 100 ulps, more than
/// the products of d <= 40 and h <= 128 terms can lose) and 1e-12 for double.
template <class T>
constexpr double borderline_margin() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}
/// Relative output tolerance (against the reference's magnitude bound of each element).
template <class T>
constexpr double output_tolerance() {
  return std::is_same_v<T, float> ? 1e-4 : 1e-10;
}

/// Outcome of a comparison: how many items agreed, were skipped as borderline, or differed,
/// and a description of the first few differences.
struct compare_result {
  int checked = 0, skipped = 0, mismatches = 0;
  std::string first;
  void fail(const std::string& msg) {
    if (mismatches++ < 4) first += msg + "\n";
  }
  bool ok() const { return mismatches == 0; }
  /// Skipped tokens must stay a small fraction, or the comparison proves little.
  bool few_skipped() const { return skipped <= 2 + (checked + skipped) / 20; }
};

inline bool is_borderline(const ref::token_route& r, double margin) { return r.margin < margin; }

/// Compares a plan with the reference routes slot by slot: expert ids exactly, weights within
/// `wtol` (relative to 1: weights lie in [0, 1]). Tokens whose reference margin is below
/// `margin` are skipped.
template <class T>
compare_result compare_plan(const dmoe::routing_plan<T>& plan, const std::vector<ref::token_route>& routes,
                            double margin, double wtol) {
  compare_result res;
  if (plan.tokens != index_t(routes.size())) {
    res.fail("plan has " + std::to_string(plan.tokens) + " tokens, expected " + std::to_string(routes.size()));
    return res;
  }
  if (plan.tokens > 0 && plan.token_offsets[0] != 0) res.fail("token_offsets[0] != 0");
  for (index_t t = 0; t < plan.tokens; ++t) {
    const auto& r = routes[std::size_t(t)];
    if (is_borderline(r, margin)) {
      ++res.skipped;
      continue;
    }
    ++res.checked;
    std::ostringstream msg;
    const index_t k = plan.k(t);
    bool bad = k != index_t(r.slots.size());
    for (index_t i = 0; !bad && i < k; ++i) {
      const index_t s = plan.token_offsets[t] + i;
      if (plan.expert[s] != r.slots[std::size_t(i)].expert) bad = true;
      if (!(std::fabs(double(plan.weight[s]) - r.slots[std::size_t(i)].weight) <= wtol)) bad = true;
    }
    if (bad) {
      msg << "token " << t << ": plan {";
      for (index_t i = 0; i < k; ++i)
        msg << " " << plan.expert[plan.token_offsets[t] + i] << ":" << double(plan.weight[plan.token_offsets[t] + i]);
      msg << " } reference {";
      for (const auto& s : r.slots) msg << " " << s.expert << ":" << s.weight;
      msg << " } margin " << r.margin << " scores {";
      for (double v : r.scores) msg << " " << v;
      msg << " }";
      res.fail(msg.str());
    }
  }
  return res;
}

/// Compares the router scores a forward left in the workspace (p, r or cos; tokens x E) with the
/// reference's: |s - s_ref| <= tol * score_scale of the token (see reference.hpp).
template <class T>
compare_result compare_scores(dmoe::matrix_view<const T> s, const std::vector<ref::token_route>& routes, double tol) {
  compare_result res;
  for (index_t t = 0; t < s.rows; ++t) {
    const auto& r = routes[std::size_t(t)];
    ++res.checked;
    for (index_t e = 0; e < s.cols; ++e) {
      const double got = double(s(t, e)), want = r.scores[std::size_t(e)];
      if (!(std::fabs(got - want) <= tol * r.score_scale)) {
        std::ostringstream msg;
        msg.precision(10);
        msg << "score(" << t << ", " << e << ") = " << got << ", reference " << want << " (scale " << r.score_scale
            << ")";
        res.fail(msg.str());
        break;
      }
    }
  }
  return res;
}

/// Compares y (tokens x d view) with the reference: |y - y_ref| <= tol * (magnitude bound + 1e-30)
/// element by element; borderline tokens (reference margin below `margin`) skipped.
template <class T>
compare_result compare_output(dmoe::matrix_view<const T> y, const ref::batch_result& b, double margin, double tol) {
  compare_result res;
  const index_t d = y.cols;
  for (index_t t = 0; t < y.rows; ++t) {
    if (is_borderline(b.routes[std::size_t(t)], margin)) {
      ++res.skipped;
      continue;
    }
    ++res.checked;
    for (index_t c = 0; c < d; ++c) {
      const double want = b.y[std::size_t(t * d + c)], got = double(y(t, c));
      const double bound = tol * (b.y_abs[std::size_t(t * d + c)] + 1e-30);
      if (!(std::fabs(got - want) <= bound)) {
        std::ostringstream msg;
        msg.precision(10);
        msg << "y(" << t << ", " << c << ") = " << got << ", reference " << want << " (bound " << bound << ")";
        res.fail(msg.str());
        break;
      }
    }
  }
  return res;
}

/// Independent routing statistics from the reference routes.
struct ref_stats {
  std::vector<long> k_histogram, tokens_per_expert;
  long tokens = 0, slots = 0;
};
inline ref_stats count_routes(const std::vector<ref::token_route>& routes, int E) {
  ref_stats s;
  s.k_histogram.assign(std::size_t(E + 1), 0);
  s.tokens_per_expert.assign(std::size_t(E), 0);
  for (const auto& r : routes) {
    ++s.tokens;
    s.slots += long(r.slots.size());
    ++s.k_histogram[r.slots.size()];
    for (const auto& sl : r.slots) ++s.tokens_per_expert[std::size_t(sl.expert)];
  }
  return s;
}

/// Layer + inputs + workspace for one random case, ready to run.
template <class T, class P, class A>
struct prepared_case {
  case_params params;
  layer_t<T, P, A> layer;
  dmoe::row_matrix<T> x, y;
  dmoe::workspace_buffer ws;

  explicit prepared_case(const case_params& p, index_t threads = 1)
      : params(p), layer(make_config(p), make_options<P>(p)) {
    test_rng g(p.seed ^ 0xABCDEF12345ull);
    randomize_layer(layer, g, p);
    x = random_tokens<T>(g, p.tokens, p.d);
    y = dmoe::row_matrix<T>::Constant(p.tokens, p.d, T(-777));
    ws.resize(layer.workspace_size(dmoe::workspace_bounds{p.tokens, threads}));
  }
  dmoe::status forward(const dmoe::context<dmoe::cpu>& ctx, dmoe::routing_stats* stats = nullptr) {
    return layer.forward(ctx, x, y, ws, stats);
  }
  dmoe::routing_plan<T> plan() const { return layer.plan(ws, params.tokens); }
  ref::batch_result reference() const {
    return ref::run(ref::read_layer(layer), x.data(), params.tokens, x.cols());
  }
};

}  // namespace dmoe_test
