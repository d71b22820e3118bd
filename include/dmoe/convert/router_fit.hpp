// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Fitting the router of a converted dynamic-k layer on calibration inputs (docs/algorithms.md
/// sections 3 and 5.3), with the experts frozen. Two kinds of target, one regression machinery:
///  - router_target::output_norm (D2DMoE): y_te = || h_te W2_e ||_2, the norm of expert e's output
///    for token t without b2 (expert_output_norms, cpu/router_regression.hpp);
///  - router_target::summed_activation (MoEfication baseline): y_te = sum over expert e's neurons
///    of max(h_tj, 0), the positive part of the activations of the token.
/// Loss: mean squared error over tokens x experts on the raw scale (router_regression_loss),
/// minimised by minibatch AdamW (dmoe::adamw, lr 1e-3 as in the D2DMoE reference recipe) over
/// seeded shuffles of the calibration tokens. Cold path: allocates freely, throws dmoe::error.
///
/// The MoEfication baseline then runs the same layer type with tau = 0 and k_max = k: every
/// expert passes the threshold, the cap keeps the k largest predictions (ties: lower index), and
/// the combine (weight 1, plain sum, shared b2) is exactly MoEfication's top-k.

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../cpu/moe_layer.hpp"
#include "../cpu/router_regression.hpp"
#include "../detail/random.hpp"
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "../routing/routers.hpp"
#include "../train/optimizers.hpp"
#include "../train/parameters.hpp"

DMOE_NAMESPACE_BEGIN

/// What the router learns to predict per (token, expert).
enum class router_target {
  output_norm,       ///< D2DMoE: L2 norm of the expert's output (without b2)
  summed_activation  ///< MoEfication: sum of the positive part of the expert's activations
};

inline const char* to_string(router_target t) noexcept {
  return t == router_target::output_norm ? "output_norm" : "summed_activation";
}

/// Options of fit_router.
struct router_fit_options {
  int epochs = 40;           ///< passes over the calibration tokens
  index_t batch_size = 64;   ///< tokens per AdamW step (the last batch of an epoch may be smaller)
  adamw_options optimizer{};  ///< lr 1e-3 (the D2DMoE reference recipe), decoupled weight decay 0.01
  std::uint64_t seed = 0;    ///< shuffling, and the initial router weights when they start all zero
};

/// What the progress callback receives, once per epoch.
struct router_fit_progress {
  index_t tokens_seen = 0;  ///< calibration tokens processed so far (epochs x tokens)
  double loss = 0;          ///< mean of this epoch's minibatch losses (weighted by batch size)
  double seconds = 0;       ///< since the fit started
  int epoch = 0;            ///< 1-based, the epoch just finished
  int epochs = 0;           ///< total epochs
  long steps = 0;           ///< optimizer steps so far
};
using router_fit_callback = std::function<void(const router_fit_progress&)>;

/// Result of a fit. Losses are exact means over the whole set (not minibatch estimates);
/// held-out figures are NaN when no held-out inputs were given.
struct router_fit_report {
  double initial_loss = 0;   ///< calibration loss before the first step
  double final_loss = 0;     ///< calibration loss after the last step
  double heldout_initial_loss = std::numeric_limits<double>::quiet_NaN();
  double heldout_loss = std::numeric_limits<double>::quiet_NaN();
  double target_mean_square = 0;  ///< mean of y^2 over calibration tokens x experts (loss of r = 0)
  long steps = 0;
  index_t tokens_seen = 0;
  double seconds = 0;
};

/// MoEfication's per-expert score: targets(t, e) = sum_j max(h_te[j], 0), h_te the activations
/// of expert e's neurons for token t (gated: act(gate) * up); (tokens, num_experts).
template <class Activation, class T>
row_matrix<T> expert_summed_activations(const expert_weights<T>& experts, input_view<T> x) {
  return detail::per_expert_rows<Activation>("expert_summed_activations", experts, x, [](const auto& h, index_t) {
    return h.cwiseMax(T(0)).rowwise().sum().matrix().eval();
  });
}

/// The regression targets of `target` for inputs x, (tokens, num_experts).
template <class Activation, class T>
row_matrix<T> router_targets(const expert_weights<T>& experts, input_view<T> x, router_target target) {
  return target == router_target::output_norm ? expert_output_norms<Activation>(experts, x)
                                              : expert_summed_activations<Activation>(experts, x);
}

namespace detail::conversion {

template <class T>
void check_finite(const char* who, const char* what, matrix_view<const T> m) {
  for (index_t t = 0; t < m.rows; ++t)
    for (index_t j = 0; j < m.cols; ++j)
      if (!std::isfinite(m(t, j)))
        detail::raisef(errc::invalid_argument, "%s: %s(%td, %td) is not finite (%g)", who, what, t, j, double(m(t, j)));
}

template <class T>
bool all_zero(const dynamic_k_router<T>& r) {
  return r.w_in().isZero(0) && r.w_out().isZero(0);
}

template <class T>
param_list<T> router_params(dynamic_k_router<T>& r) {
  param_list<T> out;
  detail::add_router_params(out, r);
  return out;
}

}  // namespace detail::conversion

/// Fits `router` to predict `targets` (tokens x num_experts) from `x` (tokens x d_model).
/// If the router's weights are all zero (as to_moe leaves them), they are first randomized from
/// opt.seed: at zero every gradient vanishes (ReLU of 0), so zero is a fixed point.
/// Optional held-out inputs and targets (same columns) are evaluated before and after.
/// `progress` is called after every epoch.
template <class T>
router_fit_report fit_router(dynamic_k_router<T>& router, input_view<T> x,
                             input_view<T> targets, const router_fit_options& opt = {},
                             input_view<T> heldout_x = {}, input_view<T> heldout_targets = {},
                             const router_fit_callback& progress = {}) {
  const index_t d = router.d_model(), E = router.num_experts(), N = x.rows;
  if (x.cols != d || targets.rows != N || targets.cols != E)
    detail::raisef(errc::invalid_argument,
                   "fit_router: x is (%td x %td) and targets (%td x %td), expected (T x %td) and (T x %td)", x.rows,
                   x.cols, targets.rows, targets.cols, d, E);
  if (N <= 0) detail::raisef(errc::invalid_argument, "fit_router: x has %td rows, need at least one token", N);
  if (heldout_x.rows > 0 &&
      (heldout_x.cols != d || heldout_targets.rows != heldout_x.rows || heldout_targets.cols != E))
    detail::raisef(errc::invalid_argument,
                   "fit_router: heldout_x is (%td x %td) and heldout_targets (%td x %td), expected (H x %td) and "
                   "(H x %td)",
                   heldout_x.rows, heldout_x.cols, heldout_targets.rows, heldout_targets.cols, d, E);
  if (opt.epochs < 0) detail::raisef(errc::invalid_argument, "fit_router: options.epochs = %d is negative", opt.epochs);
  if (opt.batch_size <= 0)
    detail::raisef(errc::invalid_argument, "fit_router: options.batch_size must be positive, got %td", opt.batch_size);
  if (const status os = check_options(opt.optimizer); !os.ok())
    detail::raisef(errc::invalid_argument, "fit_router: options.optimizer: %s", os.message());
  detail::conversion::check_finite("fit_router", "x", x);
  detail::conversion::check_finite("fit_router", "targets", targets);
  if (heldout_x.rows > 0) {
    detail::conversion::check_finite("fit_router", "heldout_x", heldout_x);
    detail::conversion::check_finite("fit_router", "heldout_targets", heldout_targets);
  }

  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  if (detail::conversion::all_zero(router)) router.randomize(opt.seed ^ 0xD2D0E5EEDULL);

  router_fit_report rep;
  {
    Eigen::Map<const row_matrix<T>, 0, Eigen::OuterStride<>> Y(targets.data, N, E,
                                                               Eigen::OuterStride<>(targets.row_stride));
    rep.target_mean_square = double(Y.squaredNorm()) / (double(N) * double(E));
  }
  rep.initial_loss = double(router_regression_loss(router, x, targets));
  const bool has_heldout = heldout_x.rows > 0;
  if (has_heldout) rep.heldout_initial_loss = double(router_regression_loss(router, heldout_x, heldout_targets));

  dynamic_k_router<T> grad(d, E, router.options(), router.hidden());
  adamw<T> optimizer(detail::conversion::router_params(router), opt.optimizer);
  const param_list<T> grad_params = detail::conversion::router_params(grad);

  const index_t B = (std::min)(opt.batch_size, N);
  row_matrix<T> xb(B, d), yb(B, E);
  std::vector<index_t> order(static_cast<std::size_t>(N));
  std::iota(order.begin(), order.end(), index_t{0});
  detail::rng g(opt.seed);
  for (int epoch = 1; epoch <= opt.epochs; ++epoch) {
    g.shuffle(order.begin(), order.end());  // platform-independent: the same order everywhere
    double epoch_loss = 0;
    for (index_t b0 = 0; b0 < N; b0 += B) {
      const index_t rows = (std::min)(B, N - b0);
      for (index_t i = 0; i < rows; ++i) {
        const index_t t = order[std::size_t(b0 + i)];
        for (index_t j = 0; j < d; ++j) xb(i, j) = x(t, j);
        for (index_t j = 0; j < E; ++j) yb(i, j) = targets(t, j);
      }
      const T loss = router_regression_loss(router, matrix_view<const T>(xb.data(), rows, d),
                                            matrix_view<const T>(yb.data(), rows, E), &grad);
      throw_if_error(optimizer.step(grad_params));
      epoch_loss += double(loss) * double(rows);
      ++rep.steps;
    }
    rep.tokens_seen += N;
    if (!std::isfinite(epoch_loss))
      detail::raisef(errc::numerical_error,
                     "fit_router: the loss became %g in epoch %d (lower options.optimizer.lr = %g?)", epoch_loss, epoch,
                     opt.optimizer.lr);
    if (progress)
      progress(router_fit_progress{rep.tokens_seen, epoch_loss / double(N), elapsed(), epoch, opt.epochs, rep.steps});
  }
  rep.final_loss = double(router_regression_loss(router, x, targets));
  if (has_heldout) rep.heldout_loss = double(router_regression_loss(router, heldout_x, heldout_targets));
  rep.seconds = elapsed();
  return rep;
}

/// Fits the router of a dynamic-k layer on calibration inputs x, the experts frozen: targets
/// from the layer's own experts (`target`), then fit_router. Held-out inputs are optional.
template <class T, class Activation, std::size_t Experts, std::size_t Width>
router_fit_report fit_router(moe_layer<T, cpu, dynamic_k, Activation, Experts, Width>& layer,
                             input_view<T> x, router_target target = router_target::output_norm,
                             const router_fit_options& opt = {}, input_view<T> heldout_x = {},
                             const router_fit_callback& progress = {}) {
  const row_matrix<T> y = router_targets<Activation>(layer.experts(), x, target);
  row_matrix<T> yh;
  if (heldout_x.rows > 0) yh = router_targets<Activation>(layer.experts(), heldout_x, target);
  return fit_router<T>(layer.router(), x, matrix_view<const T>(y), opt, heldout_x, matrix_view<const T>(yh), progress);
}

DMOE_NAMESPACE_END  // namespace dmoe
