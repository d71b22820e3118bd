// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Choosing a dynamic-k layer's tau for a FLOPs budget (docs/python.md, "Conversion").
///
/// The executed FLOPs fraction of a dynamic-k layer (sweep_point::flops_fraction: router plus
/// the selected experts, over the dense FFN) does not increase with tau: a token runs the experts
/// with r_e >= tau * max r, a set that can only shrink as tau grows (the k_max cap, if any, keeps
/// the largest r of that set, so it shrinks too). So the smallest tau whose fraction is within
/// budget, the most accurate setting that fits, is found by bisection on [0, 1], one forward over
/// the given tokens per step. The result is measured on those tokens: on other tokens the
/// fraction differs, so pass tokens like the ones the layer will see.
/// Cold path: allocates, throws dmoe::error.

#include <cmath>
#include <limits>

#include "sweep.hpp"

DMOE_NAMESPACE_BEGIN

/// Result of tau_for_flops.
struct tau_search_result {
  double tau = 0;          ///< the smallest tau found whose flops_fraction <= the target
  sweep_point point;       ///< the layer measured at that tau (errors against y_ref)
  int evaluations = 0;     ///< forwards run (each one over all tokens)
  double lower_tau = 0;    ///< largest tau seen whose fraction was above the target (0 if none)
};

/// Options of tau_for_flops.
struct tau_search_options {
  double tolerance = 1e-3;  ///< stop when the bracket [lower_tau, tau] is narrower than this
  int max_evaluations = 40; ///< forwards at most (2 for the ends of [0, 1], then one per halving)
};

/// Finds the smallest tau in [0, 1] whose executed FLOPs fraction on x is at most
/// `target_fraction`, keeping the layer's k_max. `y_ref` (tokens x d_model, usually the dense
/// FFN's output) is what the returned point's errors are measured against; if it has no rows,
/// the layer's own output with every expert (tau = 0, no cap) is used. The layer's options are
/// restored afterwards. Throws if x is empty, the target is not a number in (0, inf), or no tau
/// reaches it (the message gives the smallest attainable fraction, that of tau = 1).
template <class T, class Activation, std::size_t Experts, std::size_t Width>
tau_search_result tau_for_flops(const context<cpu>& ctx,
                                moe_layer<T, cpu, dynamic_k, Activation, Experts, Width>& layer, input_view<T> x,
                                input_view<T> y_ref, double target_fraction, const tau_search_options& opt = {}) {
  if (!(target_fraction > 0.0) || !std::isfinite(target_fraction))
    detail::raisef(errc::invalid_argument, "tau_for_flops: target_fraction must be a positive number, got %g",
                   target_fraction);
  if (!(opt.tolerance > 0.0))
    detail::raisef(errc::invalid_argument, "tau_for_flops: options.tolerance must be positive, got %g", opt.tolerance);
  if (opt.max_evaluations < 2)
    detail::raisef(errc::invalid_argument, "tau_for_flops: options.max_evaluations must be >= 2, got %d",
                   opt.max_evaluations);
  if (x.rows <= 0 || x.cols != layer.d_model())
    detail::raisef(errc::invalid_argument, "tau_for_flops: x is (%td x %td), expected (tokens >= 1 x d_model = %td)",
                   x.rows, x.cols, layer.d_model());
  detail::conversion::options_guard<std::decay_t<decltype(layer)>> guard(layer);
  const index_t k_max = guard.saved.k_max;

  row_matrix<T> y_all;
  if (y_ref.rows == 0) {
    layer.router().set_options({0.0, 0});
    y_all.resize(x.rows, layer.d_model());
    workspace_buffer ws(layer.workspace_size(ctx, x.rows));
    throw_if_error(layer.forward(ctx, x, matrix_view<T>(y_all), ws));
    y_ref = matrix_view<const T>(y_all);
  }
  detail::conversion::check_sweep_inputs("tau_for_flops", layer, x, y_ref);

  tau_search_result r;
  const auto measure = [&](double tau) {
    layer.router().set_options({tau, k_max});
    ++r.evaluations;
    return measure_point<T>(ctx, layer, x, y_ref, "tau_for_flops", "dynamic_k");
  };
  sweep_point lo = measure(0.0);
  if (lo.flops_fraction <= target_fraction) {
    r.tau = 0.0;
    r.point = lo;
    return r;
  }
  sweep_point hi = measure(1.0);
  if (hi.flops_fraction > target_fraction)
    detail::raisef(errc::invalid_argument,
                   "tau_for_flops: target_fraction %g is below the smallest fraction this layer reaches on these "
                   "tokens (%g at tau = 1: every token runs at least its best expert, plus the router)",
                   target_fraction, hi.flops_fraction);
  double tau_lo = 0.0, tau_hi = 1.0;
  while (tau_hi - tau_lo > opt.tolerance && r.evaluations < opt.max_evaluations) {
    const double mid = 0.5 * (tau_lo + tau_hi);
    sweep_point p = measure(mid);
    if (p.flops_fraction <= target_fraction) {
      tau_hi = mid;
      hi = std::move(p);
    } else {
      tau_lo = mid;
    }
  }
  r.tau = tau_hi;
  r.lower_tau = tau_lo;
  r.point = std::move(hi);
  return r;
}

DMOE_NAMESPACE_END  // namespace dmoe
