// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Shared drivers of the backward tests (TEST_SUITE "backward"): random double
/// layers set through the public accessors, the list of every parameter with
/// its analytic gradient, and the central finite-difference loop.
///
/// Finite differences: h = 1e-6, num = (L(p + h) - L(p - h)) / 2h, accepted iff
///   |num - an| <= 1e-6 * max(1, |num| + |an|)          (dmoe_fd::fd_close)
/// for every scalar parameter (experts, router, and the input x against dx).
/// Borderline routing: top_k and dynamic_k differentiate the layer's true loss,
/// so after each perturbation the plan must select exactly what the base plan
/// selected; a perturbation that flips a selection is skipped (counted; at most
/// max(2, 2%) of the samples may be skipped). top_any differentiates the
/// surrogate of fd_reference.hpp, which holds the base selection fixed by
/// definition, so nothing is skipped; its base point must have every |cos - g|
/// >= 1e-7 so that the library's selection provably equals the surrogate's.
/// ReLU layers need every pre-activation of a used (token, expert) pair at
/// least 1e-4 away from the kink (h moves it by < 1e-5); a random case that
/// misses either margin is redrawn with the next seed (try_seeds).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "fd_reference.hpp"

namespace dmoe_fd {

template <class P, class A, class T = double>
using layer_t = dmoe::moe_layer<T, dmoe::cpu, P, A>;
using mat = dmoe::row_matrix<double>;

inline constexpr double fd_h = 1e-6;
inline constexpr double fd_rtol = 1e-6;
inline constexpr double nan_v = std::numeric_limits<double>::quiet_NaN();

/// One random case.
struct case_cfg {
  std::uint64_t seed = 1;
  int d = 4, E = 3, n = 3, tokens = 6;
  bool hb = true, eb = false, ob = true;
  // top_k
  int k = 1;
  bool renorm = true;
  // dynamic_k
  double tau = 0.5;
  int k_max = 0, router_hidden = 6;
  // top_any
  bool training = true;
  double g_lo = -0.3, g_hi = 0.4, p_active = 0.75;
  // loss
  bool use_aux = false;  ///< pass &aux to backward (else nullptr)
  dmoe::aux_losses aux;

  std::string describe() const {
    std::ostringstream s;
    s << "seed=" << seed << " d=" << d << " E=" << E << " n=" << n << " tokens=" << tokens << " hidden_bias=" << hb
      << " expert_bias=" << eb << " output_bias=" << ob << " k=" << k << " renorm=" << renorm << " tau=" << tau
      << " k_max=" << k_max << " h=" << router_hidden << " training=" << training << " aux=" << (use_aux ? "" : "null ")
      << "{lb " << aux.load_balance << ", z " << aux.z_loss << ", div " << aux.diversity << ", simp " << aux.simplicity
      << ", bal " << aux.balance << ", eff " << aux.efficiency << "}";
    return s.str();
  }
};

/// Random shape (d <= 8, E <= 5, n <= 6, tokens <= 12) and options; biases from
/// `bias_combo` bits (1 hidden, 2 expert, 4 output).
inline case_cfg random_cfg(std::uint64_t seed, int bias_combo, int min_d = 1) {
  rng g(seed);
  case_cfg c;
  c.seed = seed;
  c.d = g.integer(min_d, 8);
  c.E = g.integer(1, 5);
  c.n = g.integer(1, 6);
  c.tokens = g.integer(1, 12);
  c.hb = (bias_combo & 1) != 0;
  c.eb = (bias_combo & 2) != 0;
  c.ob = (bias_combo & 4) != 0;
  c.k = g.integer(1, c.E);
  c.renorm = g.coin();
  const int t = g.integer(0, 5);
  c.tau = t == 0 ? 0.0 : t == 1 ? 1.0 : g.uniform(0.05, 0.95);
  c.k_max = g.coin(0.6) ? 0 : g.integer(1, c.E);
  c.router_hidden = g.integer(1, 8);
  return c;
}

template <class P>
typename P::options options_of(const case_cfg& c) {
  if constexpr (std::is_same_v<P, dmoe::top_k>)
    return dmoe::top_k_options{c.k, c.renorm};
  else if constexpr (std::is_same_v<P, dmoe::dynamic_k>)
    return dmoe::dynamic_k_options{c.tau, c.k_max};
  else
    return dmoe::top_any_options{c.training};
}

inline dmoe::moe_config config_of(const case_cfg& c) {
  dmoe::moe_config m;
  m.d_model = c.d;
  m.num_experts = c.E;
  m.expert_width = c.n;
  m.hidden_bias = c.hb;
  m.expert_bias = c.eb;
  m.output_bias = c.ob;
  m.router_hidden = c.router_hidden;
  return m;
}

template <class T>
void fill_experts(dmoe::expert_weights<T>& w, rng& g) {
  dmoe_testing::fill_experts_uniform(w, g);
}
using dmoe_testing::fill_uniform;

template <class T>
void fill_router(dmoe::top_k_router<T>& r, rng& g, const case_cfg&) {
  fill_uniform(r.weight(), g, -1.0, 1.0);
  fill_uniform(r.bias(), g, -0.5, 0.5);
}
template <class T>
void fill_router(dmoe::dynamic_k_router<T>& r, rng& g, const case_cfg&) {
  const double a = 1.0 / std::sqrt(double(r.d_model())), b = 1.0 / std::sqrt(double(r.hidden()));
  fill_uniform(r.w_in(), g, -a, a);
  fill_uniform(r.w_out(), g, -b, b);
}
template <class T>
void fill_router(dmoe::top_any_router<T>& r, rng& g, const case_cfg& c) {
  for (index_t j = 0; j < r.weight().cols(); ++j)
    for (index_t i = 0; i < r.weight().rows(); ++i) r.weight()(i, j) = T(g.normal() * g.uniform(0.5, 2.0));
  fill_uniform(r.threshold(), g, c.g_lo, c.g_hi);
  for (auto& a : r.active()) a = g.coin(c.p_active) ? 1 : 0;
  r.active()[std::size_t(g.integer(0, int(r.num_experts()) - 1))] = 1;
}

template <class T = double>
dmoe::row_matrix<T> random_rows(rng& g, index_t rows, index_t d, double lo = -1.0, double hi = 1.0) {
  dmoe::row_matrix<T> m(rows, d);
  for (index_t t = 0; t < rows; ++t)
    for (index_t i = 0; i < d; ++i) m(t, i) = T(g.uniform(lo, hi));
  return m;
}

/// Fills every gradient buffer and dx with NaN: backward must overwrite all of
/// them.
template <class T>
void poison(dmoe::expert_weights<T>& g) {
  for (auto* v :
       {&g.w1_storage(), &g.b1_storage(), &g.w2_storage(), &g.expert_bias_storage(), &g.output_bias_storage()})
    std::fill(v->begin(), v->end(), T(nan_v));
}
template <class T>
void poison(dmoe::top_k_router<T>& r) {
  r.weight().setConstant(T(nan_v));
  r.bias().setConstant(T(nan_v));
}
template <class T>
void poison(dmoe::dynamic_k_router<T>& r) {
  r.w_in().setConstant(T(nan_v));
  r.w_out().setConstant(T(nan_v));
}
template <class T>
void poison(dmoe::top_any_router<T>& r) {
  r.weight().setConstant(T(nan_v));
  r.threshold().setConstant(T(nan_v));
}

/// One scalar parameter and its analytic gradient.
struct param_ref {
  std::string name;
  double* p = nullptr;
  double g = 0;
};

inline void add_block(std::vector<param_ref>& out, const std::string& name, double* p, const double* g, index_t size,
                      index_t per_expert = 0) {
  for (index_t i = 0; i < size; ++i) {
    std::ostringstream s;
    s << name << "[";
    if (per_expert > 0)
      s << "e" << i / per_expert << ":" << i % per_expert;
    else
      s << i;
    s << "]";
    out.push_back({s.str(), p + i, g[i]});
  }
}
inline void add_flat(std::vector<param_ref>& out, const std::string& name, std::vector<double>& p,
                     const std::vector<double>& g, index_t E) {
  REQUIRE(p.size() == g.size());
  add_block(out, name, p.data(), g.data(), index_t(p.size()), E > 0 ? index_t(p.size()) / E : 0);
}

inline void add_router(std::vector<param_ref>& out, dmoe::top_k_router<double>& r,
                       const dmoe::top_k_router<double>& g) {
  add_block(out, "router.weight", r.weight().data(), g.weight().data(), r.weight().size(), r.d_model());
  add_block(out, "router.bias", r.bias().data(), g.bias().data(), r.bias().size());
}
inline void add_router(std::vector<param_ref>& out, dmoe::dynamic_k_router<double>& r,
                       const dmoe::dynamic_k_router<double>& g) {
  add_block(out, "router.w_in", r.w_in().data(), g.w_in().data(), r.w_in().size());
  add_block(out, "router.w_out", r.w_out().data(), g.w_out().data(), r.w_out().size());
}
inline void add_router(std::vector<param_ref>& out, dmoe::top_any_router<double>& r,
                       const dmoe::top_any_router<double>& g) {
  add_block(out, "router.weight", r.weight().data(), g.weight().data(), r.weight().size(), r.d_model());
  add_block(out, "router.threshold", r.threshold().data(), g.threshold().data(), r.threshold().size());
}

/// Every parameter of the layer, then every element of x (against dx).
template <class L>
std::vector<param_ref> all_params(L& layer, const typename L::gradients& g, mat& x, const mat& dx) {
  std::vector<param_ref> out;
  auto& w = layer.experts();
  const index_t E = layer.num_experts();
  add_flat(out, "w1", w.w1_storage(), g.experts.w1_storage(), E);
  add_flat(out, "b1", w.b1_storage(), g.experts.b1_storage(), E);
  add_flat(out, "w2", w.w2_storage(), g.experts.w2_storage(), E);
  add_flat(out, "expert_bias", w.expert_bias_storage(), g.experts.expert_bias_storage(), E);
  add_flat(out, "output_bias", w.output_bias_storage(), g.experts.output_bias_storage(), 0);
  add_router(out, layer.router(), g.router);
  REQUIRE(dx.rows() == x.rows());
  REQUIRE(dx.cols() == x.cols());
  add_block(out, "x", x.data(), dx.data(), x.size(), x.cols());
  return out;
}

struct fd_report {
  int checked = 0, skipped = 0, failed = 0;
  std::string first;
  bool few_skipped() const { return skipped <= std::max(2, (checked + skipped) / 50); }
};

/// Central differences of loss() over every parameter; stable() says whether
/// the last loss() call kept the base routing.
template <class Loss, class Stable>
fd_report run_fd(std::vector<param_ref>& ps, Loss&& loss, Stable&& stable, double h = fd_h, double rtol = fd_rtol) {
  fd_report r;
  for (auto& p : ps) {
    const double orig = *p.p;
    *p.p = orig + h;
    const double lp = loss();
    const bool s1 = stable();
    *p.p = orig - h;
    const double lm = loss();
    const bool s2 = stable();
    *p.p = orig;
    if (!s1 || !s2) {
      ++r.skipped;
      continue;
    }
    ++r.checked;
    const double num = (lp - lm) / (2 * h);
    if (!fd_close(num, p.g, rtol)) {
      if (r.failed++ < 6) {
        std::ostringstream m;
        m.precision(12);
        m << "  " << p.name << ": backward " << p.g << ", finite difference " << num << " (|diff| "
          << std::fabs(num - p.g) << " > " << fd_bound(num, p.g, rtol) << ")\n";
        r.first += m.str();
      }
    }
  }
  return r;
}

inline double dot(const mat& a, const mat& b) {
  double s = 0;
  for (index_t t = 0; t < a.rows(); ++t)
    for (index_t c = 0; c < a.cols(); ++c) s += a(t, c) * b(t, c);
  return s;
}

/// L = <dy, y> + aux_loss_values(ws, tokens).weighted_sum(aux) from the layer's
/// forward; the plan it used goes to *plan.
template <class L>
double library_loss(const L& layer, const mat& x, const mat& dy, const dmoe::aux_losses& aux, dmoe::workspace ws,
                    plan_snapshot* plan) {
  mat y(x.rows(), x.cols());
  const dmoe::status s = layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws);
  if (!s.ok()) return nan_v;
  if (plan) *plan = snapshot(layer.plan(ws, x.rows()));
  return dot(dy, y) + layer.aux_loss_values(ws, x.rows()).weighted_sum(aux);
}

enum class outcome { ran, borderline };

/// Experts that no slot of `plan` uses must have exactly zero gradients.
template <class T>
void check_unused_experts_zero(const dmoe::expert_weights<T>& g, const plan_snapshot& plan) {
  for (index_t e = 0; e < g.num_experts(); ++e) {
    if (std::find(plan.expert.begin(), plan.expert.end(), std::int32_t(e)) != plan.expert.end()) continue;
    INFO("expert " << e << " got no token");
    CHECK(g.w1(e).isZero(0.0));
    CHECK(g.b1(e).isZero(0.0));
    CHECK(g.w2(e).isZero(0.0));
    CHECK(g.expert_bias(e).isZero(0.0));
  }
}

/// A seed per (tag, index).
inline std::uint64_t seed_of(const std::string& tag, int i) {
  std::uint64_t h = 1469598103934665603ull;
  for (char ch : tag) h = (h ^ std::uint64_t(static_cast<unsigned char>(ch))) * 1099511628211ull;
  return h ^ (std::uint64_t(i + 1) * 0x9E3779B97F4A7C15ull);
}

/// Runs make(seed) for seed, seed+1000003, ... until a case is not borderline
/// (at most 40 tries).
template <class F>
void try_seeds(std::uint64_t seed, F&& run_one) {
  for (int i = 0; i < 40; ++i)
    if (run_one(seed + std::uint64_t(i) * 1000003ull) == outcome::ran) return;
  FAIL("40 consecutive random cases were borderline (seed " << seed << ")");
}

/// The report of one FD run as doctest checks.
inline void check_report(const fd_report& r, const std::string& what) {
  INFO(what);
  CHECK_MESSAGE(r.failed == 0, r.failed << " of " << r.checked << " finite differences disagree:\n" << r.first);
  CHECK_MESSAGE(r.few_skipped(), r.skipped << " samples skipped as borderline, " << r.checked << " checked");
  CHECK(r.checked > 0);
}

// --- top_k / dynamic_k: FD of the library's own loss
// ---------------------------------------------
/// Builds the case, runs backward at theta0 and checks every parameter and dx
/// against central differences of L = <dy, y> + weighted aux values. dynamic_k:
/// also checks the router gradient is exactly zero (and FD agrees: with weights
/// 1 the loss does not depend on the router while the selection stays).
struct no_hook {
  template <class... Args>
  void operator()(Args&&...) const {}
};
struct accept_all {
  template <class S>
  bool operator()(const S&) const {
    return true;
  }
};

/// Hooks: prepare(layer, x) edits the random case; accept(base plan snapshot)
/// may reject it as borderline; post(layer, x, dy, y, dx, grads, base plan)
/// adds checks after backward.
template <class P, class A, class Prepare = no_hook, class Accept = accept_all, class Post = no_hook>
outcome check_fd_library(const case_cfg& c, Prepare&& prepare = {}, Accept&& accept = {}, Post&& post = {}) {
  INFO((std::string(P::template router<double>::name) + " " + A::name + " " + c.describe()));
  layer_t<P, A> layer(config_of(c), options_of<P>(c));
  rng g(c.seed ^ 0xF00DULL);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  mat x = random_rows(g, c.tokens, c.d), dy = random_rows(g, c.tokens, c.d);
  prepare(layer, x);
  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{c.tokens, 1}));
  mat y(c.tokens, c.d);
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  const plan_snapshot base = snapshot(layer.plan(ws, c.tokens));
  if (!accept(base)) return outcome::borderline;
  if (kink_margin<A>(layer.experts(), x.data(), x.cols(), base.pairs()) < 1e-4) return outcome::borderline;
  if constexpr (std::is_same_v<P, dmoe::top_k>) {
    // The aux values against the independent reference.
    std::string why;
    const auto want = top_k_aux_ref(layer.router(), x.data(), x.cols(), c.tokens);
    CHECK_MESSAGE(aux_close(layer.aux_loss_values(ws, c.tokens), want, 1e-12, &why), why);
  }
  const dmoe::aux_losses weights = c.use_aux ? c.aux : dmoe::aux_losses{};
  const double L0 = dot(dy, y) + layer.aux_loss_values(ws, c.tokens).weighted_sum(weights);

  auto grads = layer.make_gradients();
  poison(grads.experts);
  poison(grads.router);
  mat dx = mat::Constant(c.tokens, c.d, nan_v);
  const dmoe::status s = layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx, grads, ws, c.use_aux ? &c.aux : nullptr);
  REQUIRE_MESSAGE(s.ok(), s.message());
  if constexpr (std::is_same_v<P, dmoe::dynamic_k>) {
    CHECK(grads.router.w_in().isZero(0.0));
    CHECK(grads.router.w_out().isZero(0.0));
  }
  check_unused_experts_zero(grads.experts, base);
  post(layer, x, dy, y, dx, grads, base);

  auto ps = all_params(layer, grads, x, dx);
  plan_snapshot now;
  dmoe::workspace_buffer ws2(ws.size());
  const auto r = run_fd(
      ps,
      [&] {
        layer.experts().mark_modified();  // run_fd wrote through pointers taken before the forwards
        return library_loss(layer, x, dy, weights, ws2, &now);
      },
      [&] { return now.same_selection(base); });
  check_report(r, "loss at theta0 " + std::to_string(L0));
  return outcome::ran;
}

// --- top_any: FD of the straight-through surrogate
// -----------------------------------------------
/// Builds the case, checks the layer's plan, output and aux values at theta0
/// against the surrogate, runs backward and checks every parameter and dx
/// against central differences of the surrogate loss. `prepare` may edit the
/// layer and x after the random fill. Hooks: prepare(layer, x) edits the random
/// case; accept(top_any_state at theta0) may reject it; post(layer, x, dy, y,
/// dx, grads, state) adds checks after backward.
template <class A, class Prepare = no_hook, class Accept = accept_all, class Post = no_hook>
outcome check_fd_top_any(const case_cfg& c, Prepare&& prepare = {}, Accept&& accept = {}, Post&& post = {}) {
  INFO((std::string("top_any ") + A::name + " " + c.describe()));
  layer_t<dmoe::top_any, A> layer(config_of(c), options_of<dmoe::top_any>(c));
  rng g(c.seed ^ 0xA11CEULL);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  mat x = random_rows(g, c.tokens, c.d), dy = random_rows(g, c.tokens, c.d);
  prepare(layer, x);
  const top_any_state st = record_top_any(layer.router(), x.data(), x.cols(), c.tokens);
  if (st.margin < 1e-7 || !accept(st)) return outcome::borderline;
  const plan_snapshot want_plan = st.expected_plan();
  if (kink_margin<A>(layer.experts(), x.data(), x.cols(), want_plan.pairs()) < 1e-4) return outcome::borderline;

  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{c.tokens, 1}));
  mat y(c.tokens, c.d);
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  const plan_snapshot plan = snapshot(layer.plan(ws, c.tokens));
  REQUIRE(plan.same_selection(want_plan));
  for (std::size_t i = 0; i < plan.weight.size(); ++i)
    CHECK(plan.weight[i] == doctest::Approx(want_plan.weight[i]).epsilon(1e-15));

  // The surrogate at theta0 is the layer: same output, aux values and loss.
  const surrogate_value v0 =
      top_any_surrogate<A>(layer.experts(), layer.router(), x.data(), x.cols(), dy.data(), dy.cols(), st);
  for (index_t t = 0; t < c.tokens; ++t)
    for (index_t j = 0; j < c.d; ++j) {
      const double want = v0.y[std::size_t(t * c.d + j)];
      CHECK_MESSAGE(std::fabs(y(t, j) - want) <= 1e-12 * (1 + std::fabs(want)), "y(" << t << ", " << j << ")");
    }
  std::string why;
  CHECK_MESSAGE(aux_close(layer.aux_loss_values(ws, c.tokens), v0.aux, 1e-12, &why), why);

  auto grads = layer.make_gradients();
  poison(grads.experts);
  poison(grads.router);
  mat dx = mat::Constant(c.tokens, c.d, nan_v);
  const dmoe::status s = layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx, grads, ws, c.use_aux ? &c.aux : nullptr);
  REQUIRE_MESSAGE(s.ok(), s.message());
  check_unused_experts_zero(grads.experts, want_plan);
  post(layer, x, dy, y, dx, grads, st);

  const dmoe::aux_losses weights = c.use_aux ? c.aux : dmoe::aux_losses{};
  auto ps = all_params(layer, grads, x, dx);
  const auto r = run_fd(
      ps,
      [&] {
        return top_any_surrogate<A>(layer.experts(), layer.router(), x.data(), x.cols(), dy.data(), dy.cols(), st)
            .total(weights);
      },
      [] { return true; });
  check_report(r, "surrogate loss at theta0 " + std::to_string(v0.total(weights)) + ", fired tokens " +
                      std::to_string(st.fired_tokens));
  return outcome::ran;
}

/// Element-by-element byte comparison of two vectors / Eigen objects.
template <class V>
bool same_bytes(const V& a, const V& b) {
  return a.size() == b.size() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(*a.data()) * std::size_t(a.size())) == 0);
}

}  // namespace dmoe_fd

/// Declares one TEST_CASE per activation calling body<Act>().
#define DMOE_BWD_FOR_EACH_ACTIVATION(title, fn)              \
  TEST_CASE(title " - relu") { fn<dmoe::relu>(); }           \
  TEST_CASE(title " - gelu_erf") { fn<dmoe::gelu_erf>(); }   \
  TEST_CASE(title " - gelu_tanh") { fn<dmoe::gelu_tanh>(); } \
  TEST_CASE(title " - silu") { fn<dmoe::silu>(); }           \
  TEST_CASE(title " - swiglu") { fn<dmoe::swiglu>(); }       \
  TEST_CASE(title " - geglu") { fn<dmoe::geglu>(); }
