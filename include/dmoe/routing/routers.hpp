// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The three routers: their parameters, options and cost. Backend-neutral (host storage);
/// the backends' route drivers apply detail::select_* (selection.hpp) per token.
/// Router math runs in the layer's scalar type (fp32 for float and 16-bit layers).

#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "../core/checked.hpp"
#include "../core/status.hpp"
#include "../detail/random.hpp"
#include "options.hpp"

DMOE_NAMESPACE_BEGIN

/// Column-major dense matrix: column e of a gate matrix is expert e's vector.
template <class T>
using col_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using column_vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

namespace detail {
inline void check_router_dims(const char* who, index_t d_model, index_t num_experts) {
  if (d_model <= 0) raisef(errc::invalid_argument, "%s: d_model must be positive, got %td", who, d_model);
  if (num_experts <= 0 || num_experts > INT32_MAX)
    raisef(errc::invalid_argument, "%s: num_experts must be in [1, 2^31), got %td", who, num_experts);
}
/// A zero (rows x cols) parameter of a router, checked: the element count in checked arithmetic,
/// an allocation failure as dmoe::error(out_of_memory) naming `who` and the bytes.
template <class M>
M zero_parameter(const char* who, index_t rows, index_t cols) {
  const index_t count = checked_product_or_throw(who, rows, cols);
  M m;
  allocate_or_throw(who, count, sizeof(typename M::Scalar), [&] { m = M::Zero(rows, cols); });
  return m;
}
template <class M>
void fill_uniform(M& m, rng& g, double bound) {
  for (index_t j = 0; j < m.cols(); ++j)
    for (index_t i = 0; i < m.rows(); ++i) m(i, j) = static_cast<typename M::Scalar>(g.uniform(-bound, bound));
}
}  // namespace detail

/// Softmax top-k router: z = x Wr + br, p = softmax(z), the k largest p (ties: lower id).
template <class T>
class top_k_router {
 public:
  using options_type = top_k_options;
  static constexpr const char* name = "top_k";

  top_k_router(index_t d_model, index_t num_experts, top_k_options opt = {})
      : weight_((detail::check_router_dims("top_k_router", d_model, num_experts),
                 detail::zero_parameter<col_matrix<T>>("top_k_router: weight (d_model x num_experts)", d_model,
                                                       num_experts))),
        bias_(detail::zero_parameter<column_vector<T>>("top_k_router: bias", num_experts, 1)) {
    set_options(opt);
  }

  /// Validates and applies options; throws dmoe::error naming the bad value.
  void set_options(const top_k_options& opt) {
    detail::check_options("top_k_router", num_experts(), opt);
    opt_ = opt;
  }
  const top_k_options& options() const noexcept { return opt_; }

  index_t d_model() const noexcept { return weight_.rows(); }
  index_t num_experts() const noexcept { return weight_.cols(); }
  /// Most experts one token can get.
  index_t max_k() const noexcept { return detail::max_k(num_experts(), opt_); }
  /// Router multiply-add FLOPs per token (bias and softmax not counted).
  double flops_per_token() const noexcept { return 2.0 * double(d_model()) * double(num_experts()); }

  col_matrix<T>& weight() noexcept { return weight_; }  ///< (d_model, num_experts)
  const col_matrix<T>& weight() const noexcept { return weight_; }
  column_vector<T>& bias() noexcept { return bias_; }  ///< (num_experts)
  const column_vector<T>& bias() const noexcept { return bias_; }

  /// Uniform(-1/sqrt(d), 1/sqrt(d)) weights, zero bias.
  void randomize(std::uint64_t seed) {
    detail::rng g(seed);
    detail::fill_uniform(weight_, g, 1.0 / std::sqrt(double(d_model())));
    bias_.setZero();
  }
  /// Zeroes every parameter (gradient buffers start here).
  void set_zero() noexcept {
    weight_.setZero();
    bias_.setZero();
  }

 private:
  col_matrix<T> weight_;
  column_vector<T> bias_;
  top_k_options opt_;
};

/// D2DMoE router r = |ReLU(x Wa) Wb| (two layers, no biases); r_e predicts the L2 norm of expert
/// e's output. The reference code writes the rule as r_e >= (1 - tau') max r: tau = 1 - tau'.
template <class T>
class dynamic_k_router {
 public:
  using options_type = dynamic_k_options;
  static constexpr const char* name = "dynamic_k";
  static constexpr index_t default_hidden = 128;

  dynamic_k_router(index_t d_model, index_t num_experts, dynamic_k_options opt = {},
                   index_t hidden = default_hidden) {
    detail::check_router_dims("dynamic_k_router", d_model, num_experts);
    if (hidden <= 0)
      detail::raisef(errc::invalid_argument, "dynamic_k_router: hidden width must be positive, got %td", hidden);
    w_in_ = detail::zero_parameter<col_matrix<T>>("dynamic_k_router: w_in (d_model x hidden)", d_model, hidden);
    w_out_ = detail::zero_parameter<col_matrix<T>>("dynamic_k_router: w_out (hidden x num_experts)", hidden,
                                                   num_experts);
    set_options(opt);
  }

  void set_options(const dynamic_k_options& opt) {
    detail::check_options("dynamic_k_router", num_experts(), opt);
    opt_ = opt;
  }
  const dynamic_k_options& options() const noexcept { return opt_; }
  /// Shorthand for set_options with a new tau.
  void set_tau(double tau) { set_options({tau, opt_.k_max}); }

  index_t d_model() const noexcept { return w_in_.rows(); }
  index_t hidden() const noexcept { return w_in_.cols(); }
  index_t num_experts() const noexcept { return w_out_.cols(); }
  index_t max_k() const noexcept { return detail::max_k(num_experts(), opt_); }
  double flops_per_token() const noexcept {
    return 2.0 * double(d_model()) * double(hidden()) + 2.0 * double(hidden()) * double(num_experts());
  }

  col_matrix<T>& w_in() noexcept { return w_in_; }  ///< Wa (d_model, hidden)
  const col_matrix<T>& w_in() const noexcept { return w_in_; }
  col_matrix<T>& w_out() noexcept { return w_out_; }  ///< Wb (hidden, num_experts)
  const col_matrix<T>& w_out() const noexcept { return w_out_; }

  void randomize(std::uint64_t seed) {
    detail::rng g(seed);
    detail::fill_uniform(w_in_, g, 1.0 / std::sqrt(double(d_model())));
    detail::fill_uniform(w_out_, g, 1.0 / std::sqrt(double(hidden())));
  }
  void set_zero() noexcept {
    w_in_.setZero();
    w_out_.setZero();
  }

 private:
  col_matrix<T> w_in_, w_out_;
  dynamic_k_options opt_;
};

/// DynMoE top-any gate: cos_te = <x/|x|, w_e/|w_e|>; e fires iff active and cos_te > g_e.
/// Holds E slots (the maximum); the active mask says which are in use (adapt/ changes it).
template <class T>
class top_any_router {
 public:
  using options_type = top_any_options;
  static constexpr const char* name = "top_any";
  /// Norm floor of the cosine, as in DynMoE: x / max(|x|, eps).
  static constexpr T norm_eps = T(1e-12);

  top_any_router(index_t d_model, index_t num_experts, top_any_options opt = {})
      : weight_((detail::check_router_dims("top_any_router", d_model, num_experts),
                 detail::zero_parameter<col_matrix<T>>("top_any_router: weight (d_model x num_experts)", d_model,
                                                       num_experts))),
        threshold_(detail::zero_parameter<column_vector<T>>("top_any_router: threshold", num_experts, 1)),
        active_(static_cast<std::size_t>(num_experts), std::uint8_t{1}),
        opt_(opt) {}

  void set_options(const top_any_options& opt) noexcept { opt_ = opt; }
  const top_any_options& options() const noexcept { return opt_; }
  void set_training(bool training) noexcept { opt_.training = training; }

  index_t d_model() const noexcept { return weight_.rows(); }
  index_t num_experts() const noexcept { return weight_.cols(); }
  index_t max_k() const noexcept { return detail::max_k(num_experts(), opt_); }
  double flops_per_token() const noexcept { return 2.0 * double(d_model()) * double(num_experts()); }

  col_matrix<T>& weight() noexcept { return weight_; }  ///< gate embeddings W (d_model, num_experts)
  const col_matrix<T>& weight() const noexcept { return weight_; }
  column_vector<T>& threshold() noexcept { return threshold_; }  ///< g (num_experts), init 0
  const column_vector<T>& threshold() const noexcept { return threshold_; }
  /// Sets expert e's threshold g_e. Throws dmoe::error unless e is a slot and g is finite: a NaN
  /// threshold would silently disable the expert (cos > NaN is never true), and an infinite one
  /// means "never" or "always", which a finite value says as well (cos is in [-1, 1]: g >= 1
  /// never fires, g < -1 always does).
  void set_threshold(index_t e, T g) {
    if (e < 0 || e >= num_experts())
      detail::raisef(errc::invalid_argument, "top_any_router::set_threshold: expert %td is not in [0, num_experts = %td)",
                     e, num_experts());
    check_threshold_value("top_any_router::set_threshold", e, g);
    threshold_[e] = g;
  }
  /// Sets every threshold (num_experts values), with the checks of set_threshold; on error
  /// nothing is changed.
  void set_thresholds(const column_vector<T>& g) {
    if (g.size() != num_experts())
      detail::raisef(errc::invalid_argument, "top_any_router::set_thresholds: %td values for num_experts = %td",
                     index_t(g.size()), num_experts());
    for (index_t e = 0; e < num_experts(); ++e) check_threshold_value("top_any_router::set_thresholds", e, g[e]);
    threshold_ = g;
  }
  /// Checks the thresholds as they are now (threshold() is writable, and an optimizer writes it):
  /// an error status naming the first slot whose threshold is NaN or infinite, ok otherwise.
  status check_thresholds() const noexcept {
    for (index_t e = 0; e < num_experts(); ++e)
      if (!std::isfinite(threshold_[e]))
        return status::failure(errc::numerical_error,
                               "top_any_router: threshold g[%td] = %g is not finite (a NaN threshold disables "
                               "expert %td, an infinite one fires it never or always)",
                               e, double(threshold_[e]), e);
    return {};
  }

  /// Active mask (num_experts), 1 = slot in use.
  std::vector<std::uint8_t>& active() noexcept { return active_; }
  const std::vector<std::uint8_t>& active() const noexcept { return active_; }
  index_t num_active() const noexcept {
    index_t n = 0;
    for (auto a : active_) n += a ? 1 : 0;
    return n;
  }

  /// Random gate embeddings, columns orthonormal when num_experts <= d_model (Gram-Schmidt of
  /// Gaussian columns), unit-norm otherwise; thresholds 0. `initial_active` slots (the lowest)
  /// are active, the rest free (default: all).
  void randomize(std::uint64_t seed, index_t initial_active = -1) {
    detail::rng g(seed);
    const index_t d = d_model(), E = num_experts();
    for (index_t e = 0; e < E; ++e) {
      for (index_t i = 0; i < d; ++i) weight_(i, e) = static_cast<T>(g.normal());
      if (E <= d)
        for (index_t j = 0; j < e; ++j) weight_.col(e) -= weight_.col(j).dot(weight_.col(e)) * weight_.col(j);
      weight_.col(e).normalize();
    }
    threshold_.setZero();
    if (initial_active < 0 || initial_active > E) initial_active = E;
    for (index_t e = 0; e < E; ++e) active_[static_cast<std::size_t>(e)] = e < initial_active ? 1 : 0;
  }
  /// Zeroes gate embeddings and thresholds (the mask is state, not a parameter, and is kept).
  void set_zero() noexcept {
    weight_.setZero();
    threshold_.setZero();
  }

 private:
  static void check_threshold_value(const char* who, index_t e, T g) {
    if (std::isnan(g))
      detail::raisef(errc::invalid_argument,
                     "%s: threshold g[%td] is NaN; a NaN threshold would silently disable expert %td (cos > NaN is "
                     "never true)",
                     who, e, e);
    if (!std::isfinite(g))
      detail::raisef(errc::invalid_argument,
                     "%s: threshold g[%td] = %g is infinite; use a finite value (cos is in [-1, 1]: g >= 1 never "
                     "fires, g < -1 always fires)",
                     who, e, double(g));
  }

  col_matrix<T> weight_;
  column_vector<T> threshold_;
  std::vector<std::uint8_t> active_;
  top_any_options opt_;
};

DMOE_NAMESPACE_END  // namespace dmoe
