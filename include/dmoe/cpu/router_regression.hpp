// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// D2DMoE router training on the CPU (docs/algorithms.md section 3): targets are the L2 norms of
/// each expert's output without b2, from an all-experts forward; the loss is the mean squared
/// error over tokens x experts on the raw scale. Training utilities (cold path): they allocate
/// temporaries freely.

#include <Eigen/Core>

#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "../routing/routers.hpp"

DMOE_NAMESPACE_BEGIN

namespace detail {
/// For every expert e in turn, h = act(x W1_e + b1_e) (gated: act(gate) * up), (tokens, n), and
/// out.col(e) = per_row(h): the all-experts forward that router targets are computed from.
template <class Activation, class T, class PerRow>
row_matrix<T> per_expert_rows(const char* who, const expert_weights<T>& experts, matrix_view<const T> x,
                              PerRow per_row) {
  const index_t d = experts.d_model(), E = experts.num_experts(), n = experts.width();
  if (x.cols != d) raisef(errc::invalid_argument, "%s: x has %td columns, experts have d_model %td", who, x.cols, d);
  Eigen::Map<const row_matrix<T>, 0, Eigen::OuterStride<>> X(x.data, x.rows, d, Eigen::OuterStride<>(x.row_stride));
  row_matrix<T> out(x.rows, E);
  for (index_t e = 0; e < E; ++e) {
    row_matrix<T> pre = X * experts.w1(e);
    if (experts.b1(e).size()) pre.rowwise() += experts.b1(e).transpose();
    Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> h;
    if constexpr (Activation::gated) {
      h = pre.leftCols(n).array();
      Activation::base::apply_inplace(h);
      h *= pre.rightCols(n).array();
    } else {
      h = pre.array();
      Activation::apply_inplace(h);
    }
    out.col(e) = per_row(h, e);
  }
  return out;
}
}  // namespace detail

/// targets(t, e) = || h_te W2_e ||_2, h_te = act(x_t W1_e + b1_e); (tokens, num_experts).
template <class Activation, class T>
row_matrix<T> expert_output_norms(const expert_weights<T>& experts, matrix_view<const T> x) {
  return detail::per_expert_rows<Activation>("expert_output_norms", experts, x, [&](const auto& h, index_t e) {
    return (h.matrix() * experts.w2(e)).rowwise().norm().eval();
  });
}

/// Mean squared error of the router's predictions r = |ReLU(x Wa) Wb| against `targets`
/// (tokens x E). If `grad` is given, its w_in/w_out are overwritten with the gradient.
template <class T>
T router_regression_loss(const dynamic_k_router<T>& router, matrix_view<const T> x, matrix_view<const T> targets,
                         dynamic_k_router<T>* grad = nullptr) {
  const index_t d = router.d_model(), E = router.num_experts();
  if (x.cols != d || targets.cols != E || targets.rows != x.rows)
    detail::raisef(errc::invalid_argument,
                   "router_regression_loss: x is (%td x %td) and targets (%td x %td), expected (T x %td) and (T x %td)",
                   x.rows, x.cols, targets.rows, targets.cols, d, E);
  if (x.rows == 0) {
    if (grad) grad->set_zero();
    return T(0);
  }
  Eigen::Map<const row_matrix<T>, 0, Eigen::OuterStride<>> X(x.data, x.rows, d, Eigen::OuterStride<>(x.row_stride));
  Eigen::Map<const row_matrix<T>, 0, Eigen::OuterStride<>> Y(targets.data, x.rows, E,
                                                             Eigen::OuterStride<>(targets.row_stride));
  const row_matrix<T> pre_h = X * router.w_in();
  const row_matrix<T> h = pre_h.cwiseMax(T(0));
  const row_matrix<T> z = h * router.w_out();
  const row_matrix<T> diff = z.cwiseAbs() - Y;
  const T count = T(x.rows) * T(E);
  const T loss = diff.squaredNorm() / count;
  if (grad) {
    // d|z|/dz = sign(z); d ReLU = step.
    const row_matrix<T> dz = (T(2) / count) * diff.cwiseProduct(z.unaryExpr([](T v) { return T((v > 0) - (v < 0)); }));
    grad->w_out() = h.transpose() * dz;
    const row_matrix<T> dh = (dz * router.w_out().transpose()).cwiseProduct(
        pre_h.unaryExpr([](T v) { return v > T(0) ? T(1) : T(0); }));
    grad->w_in() = X.transpose() * dh;
  }
  return loss;
}

/// Activation-sparsity penalties on FFN activations a (tokens x F), averaged over tokens, for the
/// sparsity-enhancement phase before conversion. Each returns the value and, if `grad` is given
/// (same shape), overwrites it with the gradient.
enum class sparsity_penalty { hoyer_squared, l1 };

template <class T>
T activation_sparsity(sparsity_penalty kind, matrix_view<const T> a, matrix_view<T> grad = {}) {
  if (grad.data && (grad.rows != a.rows || grad.cols != a.cols))
    detail::raisef(errc::invalid_argument, "activation_sparsity: grad is (%td x %td), a is (%td x %td)", grad.rows,
                   grad.cols, a.rows, a.cols);
  if (a.rows == 0) return T(0);
  const T inv_t = T(1) / T(a.rows);
  T total = 0;
  for (index_t t = 0; t < a.rows; ++t) {
    const T* r = a.row(t);
    T s1 = 0, s2 = 0;
    for (index_t j = 0; j < a.cols; ++j) {
      s1 += std::abs(r[j]);
      s2 += r[j] * r[j];
    }
    const auto sign = [](T v) { return T((v > 0) - (v < 0)); };
    if (kind == sparsity_penalty::l1) {
      total += s1;
      if (grad.data)
        for (index_t j = 0; j < a.cols; ++j) grad(t, j) = inv_t * sign(r[j]);
    } else {
      const T den = s2 + T(1e-15);
      total += s1 * s1 / den;
      if (grad.data)
        for (index_t j = 0; j < a.cols; ++j)
          grad(t, j) = inv_t * (T(2) * s1 * sign(r[j]) / den - T(2) * s1 * s1 * r[j] / (den * den));
    }
  }
  return total * inv_t;
}

DMOE_NAMESPACE_END  // namespace dmoe
