// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Shared set-up of the CPU forward benchmarks (bench_forward.cpp): shape S, seeded inputs,
/// thread pools kept for the whole run, one layer per routing policy, and the calibration of the
/// dynamic-k tau and the top-any thresholds to a target active fraction f.
///
/// Everything here is cold path: it runs outside the timed loops and may allocate and throw.

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include <dmoe/detail/random.hpp>
#include <dmoe/dmoe.hpp>

namespace dmoe_bench {

using dmoe::index_t;

// ---- shape S (docs/performance.md): BERT/GPT-2 base FFN -------------------------------------
inline constexpr index_t d_model = 768;
inline constexpr index_t num_experts = 24;
inline constexpr index_t expert_width = 128;
inline constexpr index_t dense_hidden = num_experts * expert_width;  // 3072
inline constexpr index_t max_tokens = 512;
using activation = dmoe::relu;
using scalar = float;

inline constexpr std::uint64_t weight_seed = 0xD30Eu;
inline constexpr std::uint64_t input_seed = 42u;

template <class Policy>
using layer_t = dmoe::moe_layer<scalar, dmoe::cpu, Policy, activation>;
using dense_t = dmoe::dense_ffn<scalar, activation>;
using matrix = dmoe::row_matrix<scalar>;

// ---- thread pools -----------------------------------------------------------------------------
/// Context running on `threads` threads. threads == 1 is a null executor (calling thread only);
/// larger counts use a dmoe::thread_pool created on first use and reused by every benchmark.
inline dmoe::context<dmoe::cpu> context_for(int threads) {
  static std::map<int, std::unique_ptr<dmoe::thread_pool>> pools;
  dmoe::context<dmoe::cpu> ctx;
  if (threads <= 1) return ctx;
  auto& p = pools[threads];
  if (!p) p = std::make_unique<dmoe::thread_pool>(threads);
  ctx.exec = p.get();
  return ctx;
}

// ---- inputs -------------------------------------------------------------------------------------
/// The first `tokens` rows of one seeded (max_tokens x d_model) standard-normal matrix, so the
/// 1- and 8-token inputs are prefixes of the 512-token one.
inline const matrix& input(index_t tokens) {
  static std::map<index_t, matrix> cache;
  auto it = cache.find(tokens);
  if (it != cache.end()) return it->second;
  const index_t rows = tokens > max_tokens ? tokens : max_tokens;
  matrix all(rows, d_model);
  dmoe::detail::rng g(input_seed);
  for (index_t t = 0; t < rows; ++t)
    for (index_t j = 0; j < d_model; ++j) all(t, j) = static_cast<scalar>(g.normal());
  return cache.emplace(tokens, matrix(all.topRows(tokens))).first->second;
}

// ---- layers ----------------------------------------------------------------------------------
inline dmoe::moe_config shape_s() {
  dmoe::moe_config c;
  c.d_model = d_model;
  c.num_experts = num_experts;
  c.expert_width = expert_width;
  return c;  // hidden bias, shared output bias, dynamic-k router hidden 128 (defaults)
}

/// One layer per policy, random weights (experts and router), shared by all benchmarks of the
/// policy; each benchmark sets the router options it needs before timing.
template <class Policy>
layer_t<Policy>& layer() {
  static std::unique_ptr<layer_t<Policy>> l;
  if (!l) {
    l = std::make_unique<layer_t<Policy>>(shape_s(), typename Policy::options{});
    l->randomize(weight_seed);
  }
  return *l;
}

/// The dense FFN of the same shape (hidden 3072), random weights.
inline dense_t& dense() {
  static std::unique_ptr<dense_t> d;
  if (!d) {
    d = std::make_unique<dense_t>(d_model, dense_hidden);
    d->randomize(weight_seed);
  }
  return *d;
}

/// Runs one forward on input(tokens) with the layer's current options and returns its routing
/// statistics; throws dmoe::error if forward fails.
template <class Policy>
dmoe::routing_stats measure(layer_t<Policy>& l, index_t tokens, int threads = 2) {
  static dmoe::workspace_buffer ws;
  static matrix y;
  const auto ctx = context_for(threads);
  ws.resize(l.workspace_size(ctx, tokens));
  y.resize(tokens, d_model);
  dmoe::routing_stats stats(l.num_experts());
  dmoe::throw_if_error(l.forward(ctx, input(tokens), y, ws, &stats));
  return stats;
}

// ---- calibration to a target active fraction -----------------------------------------------
/// A setting of a variable-k router and the f it measured on the benchmark input.
struct calibrated {
  double value = 0;    ///< tau (dynamic-k) or the uniform threshold g (top-any)
  index_t k_max = 0;   ///< dynamic-k cap (0 = none)
  double f = 0;        ///< measured active fraction
};

/// Bisection on a parameter p in [lo, hi] where f(p) is non-increasing; returns the bracket end
/// whose f is closest to `target`. `eval(p)` returns the measured f. Stops early once f is within
/// `tol` of the target (half a slot: nothing closer exists).
template <class Eval>
calibrated bisect_non_increasing(double lo, double hi, double target, double tol, Eval&& eval, int steps = 26) {
  double f_lo = eval(lo), f_hi = eval(hi);
  if (target >= f_lo) return {lo, 0, f_lo};
  if (target <= f_hi) return {hi, 0, f_hi};
  for (int i = 0; i < steps; ++i) {
    const double mid = 0.5 * (lo + hi);
    const double fm = eval(mid);
    if (std::abs(fm - target) <= tol) return {mid, 0, fm};
    if (fm > target) {
      lo = mid;
      f_lo = fm;
    } else {
      hi = mid;
      f_hi = fm;
    }
  }
  return std::abs(f_lo - target) <= std::abs(f_hi - target) ? calibrated{lo, 0, f_lo} : calibrated{hi, 0, f_hi};
}

/// f moves in steps of one (token, expert) slot, 1 / (tokens * experts); half of it is the best
/// any setting can guarantee.
inline double half_slot(index_t tokens) { return 0.5 / (double(tokens) * double(num_experts)) + 1e-12; }

/// Dynamic-k setting whose measured f on input(tokens) is closest to `target`.
/// With one token f only takes the values k/24, and tau cannot do better than the cap: there we
/// use tau = 0 with k_max = round(target * 24) instead. Cached per (tokens, target).
inline calibrated calibrate_dynamic_k(index_t tokens, double target) {
  static std::map<std::pair<index_t, double>, calibrated> cache;
  const auto key = std::make_pair(tokens, target);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  auto& l = layer<dmoe::dynamic_k>();
  calibrated c;
  if (tokens == 1) {
    index_t k = static_cast<index_t>(std::lround(target * double(num_experts)));
    k = k < 1 ? 1 : (k > num_experts ? num_experts : k);
    l.router().set_options({0.0, k});
    c = {0.0, k, measure(l, tokens).active_fraction()};
  } else {
    c = bisect_non_increasing(0.0, 1.0, target, half_slot(tokens), [&](double tau) {
      l.router().set_options({tau, 0});
      return measure(l, tokens).active_fraction();
    });
  }
  return cache.emplace(key, c).first->second;
}

/// Sets every top-any threshold to g (all experts active, inference mode).
inline void set_top_any_threshold(layer_t<dmoe::top_any>& l, double g) {
  l.router().set_training(false);
  l.router().threshold().setConstant(static_cast<scalar>(g));
}

/// Uniform top-any threshold whose measured f on input(tokens) is closest to `target`.
/// Cosines are in [-1, 1]: g = -1 fires every expert, g = 1 none (inference then falls back to
/// the best expert, f = 1/24). Cached per (tokens, target).
inline calibrated calibrate_top_any(index_t tokens, double target) {
  static std::map<std::pair<index_t, double>, calibrated> cache;
  const auto key = std::make_pair(tokens, target);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  auto& l = layer<dmoe::top_any>();
  const calibrated c = bisect_non_increasing(-1.0, 1.0, target, half_slot(tokens), [&](double g) {
    set_top_any_threshold(l, g);
    return measure(l, tokens).active_fraction();
  });
  return cache.emplace(key, c).first->second;
}

/// "0.1.0"
inline std::string version_string() {
  const auto v = dmoe::version();
  return std::to_string(v.major) + "." + std::to_string(v.minor) + "." + std::to_string(v.patch);
}

}  // namespace dmoe_bench
