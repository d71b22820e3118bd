// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// SGD with momentum and AdamW over a parameter list (train/parameters.hpp). The optimizer owns its
/// state (allocated at construction); step() allocates nothing and visits elements in a fixed
/// order, so training is reproducible.

#include <cmath>
#include <limits>
#include <vector>

#include "../core/status.hpp"
#include "parameters.hpp"

DMOE_NAMESPACE_BEGIN

namespace detail {
template <class T>
status check_grads(const char* who, const param_list<T>& params, const param_list<T>& grads) noexcept {
  if (params.size() != grads.size())
    return status::failure(errc::invalid_argument, "%s::step: %zu gradient tensors for %zu parameter tensors", who,
                           grads.size(), params.size());
  for (std::size_t i = 0; i < params.size(); ++i)
    if (params[i].size != grads[i].size)
      return status::failure(errc::invalid_argument, "%s::step: gradient %zu (%s) has %td elements, parameter has %td",
                             who, i, grads[i].name, grads[i].size, params[i].size);
  return {};
}
/// After a step wrote the parameters: new stamps, so packed copies of them are rebuilt.
template <class T>
void touch_versions(const param_list<T>& params) noexcept {
  for (const auto& p : params)
    if (p.version) p.version->touch();
}
/// One hyperparameter: finite and in [lo, hi] (hi_open: [lo, hi)). A NaN learning rate or beta
/// would turn every parameter NaN at the first step without a word.
inline status check_hyper(const char* who, const char* name, double v, double lo, double hi, bool hi_open) noexcept {
  const bool in = std::isfinite(v) && v >= lo && (hi_open ? v < hi : v <= hi);
  if (in) return {};
  if (std::isinf(hi))
    return status::failure(errc::invalid_argument, "%s: %s must be finite and >= %g, got %g", who, name, lo, v);
  return status::failure(errc::invalid_argument, "%s: %s must be finite and in [%g, %g%c, got %g", who, name, lo, hi,
                         hi_open ? ')' : ']', v);
}
}  // namespace detail

/// SGD: v = momentum v + (g + weight_decay p); p -= lr v.
struct sgd_options {
  double lr = 1e-2;           ///< finite, >= 0
  double momentum = 0.9;      ///< finite, in [0, 1)
  double weight_decay = 0.0;  ///< finite, >= 0
};

/// The options' values, checked: an error status naming the first bad one (NaN, infinite or out
/// of range), ok otherwise. Constructors throw it; step() returns it (options() is writable).
inline status check_options(const sgd_options& o) noexcept {
  constexpr double inf = std::numeric_limits<double>::infinity();
  DMOE_TRY(detail::check_hyper("sgd", "lr", o.lr, 0.0, inf, false));
  DMOE_TRY(detail::check_hyper("sgd", "momentum", o.momentum, 0.0, 1.0, true));
  return detail::check_hyper("sgd", "weight_decay", o.weight_decay, 0.0, inf, false);
}

template <class T>
class sgd {
 public:
  sgd(param_list<T> params, sgd_options opt = {}) : params_(std::move(params)), opt_(opt) {
    throw_if_error(check_options(opt_));
    for (auto& p : params_) velocity_.emplace_back(static_cast<std::size_t>(p.size), T(0));
  }
  sgd_options& options() noexcept { return opt_; }
  /// One update from gradients listed in the same order as the parameters.
  status step(const param_list<T>& grads) noexcept {
    DMOE_TRY(detail::check_grads("sgd", params_, grads));
    DMOE_TRY(check_options(opt_));
    const T lr = T(opt_.lr), mu = T(opt_.momentum), wd = T(opt_.weight_decay);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      T* p = params_[i].data;
      const T* g = grads[i].data;
      T* v = velocity_[i].data();
      for (index_t j = 0; j < params_[i].size; ++j) {
        v[j] = mu * v[j] + g[j] + wd * p[j];
        p[j] -= lr * v[j];
      }
    }
    detail::touch_versions(params_);
    return {};
  }

 private:
  param_list<T> params_;
  sgd_options opt_;
  std::vector<std::vector<T>> velocity_;
};

/// AdamW (decoupled weight decay, Loshchilov & Hutter): p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p).
struct adamw_options {
  double lr = 1e-3;            ///< finite, >= 0
  double beta1 = 0.9;          ///< finite, in [0, 1)
  double beta2 = 0.999;        ///< finite, in [0, 1)
  double eps = 1e-8;           ///< finite, > 0
  double weight_decay = 0.01;  ///< finite, >= 0
};

/// The options' values, checked (see check_options(const sgd_options&)).
inline status check_options(const adamw_options& o) noexcept {
  constexpr double inf = std::numeric_limits<double>::infinity();
  DMOE_TRY(detail::check_hyper("adamw", "lr", o.lr, 0.0, inf, false));
  DMOE_TRY(detail::check_hyper("adamw", "beta1", o.beta1, 0.0, 1.0, true));
  DMOE_TRY(detail::check_hyper("adamw", "beta2", o.beta2, 0.0, 1.0, true));
  if (!(std::isfinite(o.eps) && o.eps > 0.0))
    return status::failure(errc::invalid_argument, "adamw: eps must be finite and > 0, got %g", o.eps);
  return detail::check_hyper("adamw", "weight_decay", o.weight_decay, 0.0, inf, false);
}

template <class T>
class adamw {
 public:
  adamw(param_list<T> params, adamw_options opt = {}) : params_(std::move(params)), opt_(opt) {
    throw_if_error(check_options(opt_));
    for (auto& p : params_) {
      m_.emplace_back(static_cast<std::size_t>(p.size), T(0));
      v_.emplace_back(static_cast<std::size_t>(p.size), T(0));
    }
  }
  adamw_options& options() noexcept { return opt_; }
  long steps() const noexcept { return t_; }

  status step(const param_list<T>& grads) noexcept {
    DMOE_TRY(detail::check_grads("adamw", params_, grads));
    DMOE_TRY(check_options(opt_));
    ++t_;
    const double bc1 = 1.0 - std::pow(opt_.beta1, double(t_)), bc2 = 1.0 - std::pow(opt_.beta2, double(t_));
    const T lr = T(opt_.lr), b1 = T(opt_.beta1), b2 = T(opt_.beta2), eps = T(opt_.eps), wd = T(opt_.weight_decay);
    const T c1 = T(1.0 / bc1), c2 = T(1.0 / bc2);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      T* p = params_[i].data;
      const T* g = grads[i].data;
      T* m = m_[i].data();
      T* v = v_[i].data();
      for (index_t j = 0; j < params_[i].size; ++j) {
        m[j] = b1 * m[j] + (T(1) - b1) * g[j];
        v[j] = b2 * v[j] + (T(1) - b2) * g[j] * g[j];
        p[j] -= lr * ((m[j] * c1) / (std::sqrt(v[j] * c2) + eps) + wd * p[j]);
      }
    }
    detail::touch_versions(params_);
    return {};
  }

 private:
  param_list<T> params_;
  adamw_options opt_;
  std::vector<std::vector<T>> m_, v_;
  long t_ = 0;
};

DMOE_NAMESPACE_END  // namespace dmoe
