// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// CPU router backward and auxiliary losses (docs/algorithms.md sections 2-4). Inputs: the
/// forward state in router_buffers, the plan, and dL/dw_s for every slot (the gradient reaching
/// each combine weight). Outputs: router parameter gradients (overwritten) and the router's part
/// of dL/dx (overwritten). Runs on the calling thread in a fixed token order: router products are
/// a few percent of the layer, and a fixed order keeps the gradients deterministic.

#include <algorithm>
#include <cmath>

#include "../core/views.hpp"
#include "../routing/aux_loss.hpp"
#include "../routing/plan.hpp"
#include "../routing/routers.hpp"
#include "detail/panel_kernels.hpp"
#include "gemm.hpp"
#include "route.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Scratch of the router backward (carved from the layer workspace).
template <class T>
struct router_grad_scratch {
  T* dscores = nullptr;     ///< (tokens, E)
  T* expert_tmp = nullptr;  ///< (4 E)
  T* rows_tmp = nullptr;    ///< (rows_per_task, 2 E)
  T* pack = nullptr;
};

template <class T>
void router_grad_shapes(index_t d, index_t E, index_t& pack) {
  pack = (std::max)({pack, plan_gemm<T>(rows_per_task, d, E).pack_elems(), plan_gemm<T>(E, d, rows_per_task).pack_elems()});
}

/// dX_rows (rows x d) = A (rows x E) W^T and dW^T (E x d) += A^T X_rows, W column-major (d x E).
template <class T>
void gate_products(index_t rows, index_t d, index_t E, const T* a, const T* w, matrix_view<const T> x, index_t t0,
                   T* dx_rows, index_t ldx, T* dw, T* pack) noexcept {
  // dX = A W^T on the panel kernel (W column-major d x E is W^T row-major): one in-order chain per
  // element, so a token's dx does not depend on the rows beside it.
  const cpu_isa isa = active_cpu_isa();
  panel_product<T>(isa, rows, d, E, {a, E, nullptr}, panel_b<T>::row_major(w, d, tile_for<T>(isa).nr()), nullptr,
                   dx_rows, ldx);
  gemm<order::col_major, order::row_major>(E, d, rows, a, E, x.row(t0), x.row_stride, dw, d,
                                           plan_gemm<T>(E, d, rows_per_task), pack);
}

template <class T>
void zero_rows(matrix_view<T> m) noexcept {
  for (index_t i = 0; i < m.rows; ++i) std::fill(m.row(i), m.row(i) + m.cols, T(0));
}

// --- top_k ---------------------------------------------------------------------------------
template <class T>
aux_losses aux_values(const top_k_router<T>& r, const routing_plan<T>& plan, const router_buffers<T>& buf,
                      T*) noexcept {
  aux_losses v;
  const index_t E = r.num_experts(), tokens = plan.tokens, nnz = plan.nnz();
  if (tokens == 0) return v;
  double lb = 0, z = 0;
  for (index_t e = 0; e < E; ++e) {
    index_t count = 0;
    double p_mean = 0;
    for (index_t s = 0; s < nnz; ++s) count += plan.expert[s] == e;
    for (index_t t = 0; t < tokens; ++t) p_mean += double(buf.scores[t * E + e]);
    lb += (nnz ? double(count) / double(nnz) : 0.0) * p_mean / double(tokens);
  }
  for (index_t t = 0; t < tokens; ++t) z += double(buf.token_aux[t]) * double(buf.token_aux[t]);
  v.load_balance = double(E) * lb;
  v.z_loss = z / double(tokens);
  return v;
}

template <class T>
void route_backward(const top_k_router<T>& r, matrix_view<const T> x, const routing_plan<T>& plan,
                    const router_buffers<T>& buf, const T* dweight, const aux_losses* aux, top_k_router<T>& grad,
                    matrix_view<T> dx, const router_grad_scratch<T>& s) noexcept {
  const index_t E = r.num_experts(), d = r.d_model(), tokens = plan.tokens, nnz = plan.nnz();
  const bool renorm = r.options().renormalize;
  grad.set_zero();
  const T lb = aux ? T(aux->load_balance) : T(0), zc = aux ? T(aux->z_loss) : T(0);
  // Load-balance gradient dL/dp_te = lb * E * f_e / T, with f_e the share of slots (no gradient).
  T* lb_grad = s.expert_tmp;
  std::fill(lb_grad, lb_grad + E, T(0));
  if (lb != T(0) && nnz > 0) {
    for (index_t q = 0; q < nnz; ++q) lb_grad[plan.expert[q]] += T(1);
    for (index_t e = 0; e < E; ++e) lb_grad[e] = lb * T(E) * (lb_grad[e] / T(nnz)) / T(tokens);
  }
  for (index_t t0 = 0; t0 < tokens; t0 += rows_per_task) {
    const index_t rows = (std::min)(rows_per_task, tokens - t0);
    for (index_t t = t0; t < t0 + rows; ++t) {
      const T* p = buf.scores + t * E;
      T* dz = s.dscores + t * E;
      std::copy(lb_grad, lb_grad + E, dz);  // dp first, then the softmax Jacobian in place
      const index_t b = plan.token_offsets[t], e_end = plan.token_offsets[t + 1];
      T sel = 0, dot = 0;
      for (index_t q = b; q < e_end; ++q) {
        sel += p[plan.expert[q]];
        dot += dweight[q] * p[plan.expert[q]];
      }
      for (index_t q = b; q < e_end; ++q)
        dz[plan.expert[q]] += renorm ? dweight[q] / sel - dot / (sel * sel) : dweight[q];
      T pdp = 0;
      for (index_t e = 0; e < E; ++e) pdp += p[e] * dz[e];
      const T zg = zc * T(2) * buf.token_aux[t] / T(tokens);
      for (index_t e = 0; e < E; ++e) dz[e] = p[e] * (dz[e] - pdp) + zg * p[e];
    }
    zero_rows(matrix_view<T>(dx.row(t0), rows, d, dx.row_stride));
    gate_products(rows, d, E, s.dscores + t0 * E, r.weight().data(), x, t0, dx.row(t0), dx.row_stride,
                  grad.weight().data(), s.pack);
    for (index_t t = t0; t < t0 + rows; ++t)
      for (index_t e = 0; e < E; ++e) grad.bias()[e] += s.dscores[t * E + e];
  }
}

// --- dynamic_k: the router learns from its own regression loss, not from the layer's -------------
template <class T>
aux_losses aux_values(const dynamic_k_router<T>&, const routing_plan<T>&, const router_buffers<T>&, T*) noexcept {
  return {};
}

template <class T>
void route_backward(const dynamic_k_router<T>&, matrix_view<const T>, const routing_plan<T>&, const router_buffers<T>&,
                    const T*, const aux_losses*, dynamic_k_router<T>& grad, matrix_view<T> dx,
                    const router_grad_scratch<T>&) noexcept {
  grad.set_zero();
  zero_rows(dx);
}

// --- top_any -------------------------------------------------------------------------------
template <class T>
bool top_any_fired(const top_any_router<T>& r, const router_buffers<T>& buf, index_t t, index_t e) noexcept {
  const index_t E = r.num_experts();
  return r.active()[static_cast<std::size_t>(e)] && buf.scores[t * E + e] > r.threshold()[e];
}

/// Per-expert balance statistics over tokens that fired something: me_e (mean a/K), ce_e (mean a).
/// Returns the number of such tokens.
template <class T>
index_t top_any_balance_stats(const top_any_router<T>& r, const router_buffers<T>& buf, index_t tokens, T* me,
                              T* ce) noexcept {
  const index_t E = r.num_experts();
  std::fill(me, me + E, T(0));
  std::fill(ce, ce + E, T(0));
  index_t fired_tokens = 0;
  for (index_t t = 0; t < tokens; ++t) {
    index_t K = 0;
    for (index_t e = 0; e < E; ++e) K += top_any_fired(r, buf, t, e);
    if (K == 0) continue;
    ++fired_tokens;
    for (index_t e = 0; e < E; ++e)
      if (top_any_fired(r, buf, t, e)) {
        me[e] += T(1) / T(K);
        ce[e] += T(1);
      }
  }
  for (index_t e = 0; e < E && fired_tokens > 0; ++e) {
    me[e] /= T(fired_tokens);
    ce[e] /= T(fired_tokens);
  }
  return fired_tokens;
}

/// Diversity loss || (W^T W - I) over active pairs ||_F with unit columns; adds weight * its
/// gradient to grad (column-major d x E) when grad is not null.
template <class T>
T top_any_diversity(const top_any_router<T>& r, T weight, T* grad) noexcept {
  const index_t E = r.num_experts(), d = r.d_model();
  const auto& W = r.weight();
  const T eps = top_any_router<T>::norm_eps;
  T sq = 0;
  for (index_t i = 0; i < E; ++i)
    for (index_t j = 0; j < E; ++j) {
      if (!r.active()[std::size_t(i)] || !r.active()[std::size_t(j)]) continue;
      const T m = W.col(i).dot(W.col(j)) / ((std::max)(W.col(i).norm(), eps) * (std::max)(W.col(j).norm(), eps)) -
                  (i == j ? T(1) : T(0));
      sq += m * m;
    }
  const T loss = std::sqrt(sq);
  if (grad == nullptr || weight == T(0) || loss == T(0)) return loss;
  for (index_t i = 0; i < E; ++i) {
    if (!r.active()[std::size_t(i)]) continue;
    const T ni = (std::max)(W.col(i).norm(), eps);
    column_vector<T> dhat = column_vector<T>::Zero(d);  // dL/d(w_i / |w_i|)
    for (index_t j = 0; j < E; ++j) {
      if (!r.active()[std::size_t(j)]) continue;
      const T nj = (std::max)(W.col(j).norm(), eps);
      const T m = W.col(i).dot(W.col(j)) / (ni * nj) - (i == j ? T(1) : T(0));
      dhat += (T(2) * m / loss) * (W.col(j) / nj);
    }
    const column_vector<T> what = W.col(i) / ni;
    Eigen::Map<column_vector<T>> g(grad + i * d, d);
    g += weight * (dhat - dhat.dot(what) * what) / ni;
  }
  return loss;
}

template <class T>
aux_losses aux_values(const top_any_router<T>& r, const routing_plan<T>& plan, const router_buffers<T>& buf,
                      T* expert_tmp) noexcept {
  aux_losses v;
  const index_t E = r.num_experts(), tokens = plan.tokens;
  v.diversity = double(top_any_diversity<T>(r, T(0), nullptr));
  double simp = 0;
  for (index_t e = 0; e < E; ++e) simp += double(r.weight().col(e).norm());
  v.simplicity = simp / double(E);
  if (tokens == 0) return v;
  T* me = expert_tmp;
  T* ce = expert_tmp + E;
  const index_t fired_tokens = top_any_balance_stats(r, buf, tokens, me, ce);
  double bal = 0, fired = 0;
  for (index_t e = 0; e < E; ++e) bal += double(me[e]) * double(ce[e]);
  v.balance = fired_tokens ? double(E) * bal : 0.0;  // E^2 * mean over E slots
  for (index_t t = 0; t < tokens; ++t)
    for (index_t e = 0; e < E; ++e) fired += top_any_fired(r, buf, t, e);
  v.efficiency = fired / (double(tokens) * double(E));
  return v;
}

/// Adds the gradients of the terms that depend on the gate embeddings alone (simplicity,
/// diversity): they exist with or without tokens.
template <class T>
void top_any_parameter_terms(const top_any_router<T>& r, const aux_losses* aux, top_any_router<T>& grad) noexcept {
  const index_t E = r.num_experts();
  if (aux && aux->simplicity != 0.0)
    for (index_t e = 0; e < E; ++e) {
      const T n = (std::max)(r.weight().col(e).norm(), top_any_router<T>::norm_eps);
      grad.weight().col(e) += T(aux->simplicity) / T(E) * r.weight().col(e) / n;
    }
  if (aux && aux->diversity != 0.0) top_any_diversity<T>(r, T(aux->diversity), grad.weight().data());
}

template <class T>
void route_backward(const top_any_router<T>& r, matrix_view<const T> x, const routing_plan<T>& plan,
                    const router_buffers<T>& buf, const T* dweight, const aux_losses* aux, top_any_router<T>& grad,
                    matrix_view<T> dx, const router_grad_scratch<T>& s) noexcept {
  const index_t E = r.num_experts(), d = r.d_model(), tokens = plan.tokens;
  grad.set_zero();
  const T w_bal = aux ? T(aux->balance) : T(0), w_eff = aux ? T(aux->efficiency) : T(0);
  T* me = s.expert_tmp;
  T* ce = s.expert_tmp + E;
  T* sw = s.expert_tmp + 2 * E;  // sum_t dcos_te cos_te
  const index_t fired_tokens = w_bal != T(0) ? top_any_balance_stats(r, buf, tokens, me, ce) : 0;
  std::fill(sw, sw + E, T(0));
  const auto sig = [](T v) { return T(1) / (T(1) + std::exp(-v)); };
  // dL/da_te for fired (t, e): the combine weight is a/K with K held constant, so the task part is
  // dL/dw_s / K = <dy_t, y_e> / K; plus the balance and efficiency terms.
  for (index_t t = 0; t < tokens; ++t) {
    T* dcos = s.dscores + t * E;
    std::fill(dcos, dcos + E, T(0));
    index_t K = 0;
    for (index_t e = 0; e < E; ++e) K += top_any_fired(r, buf, t, e);
    if (K == 0) continue;
    for (index_t q = plan.token_offsets[t]; q < plan.token_offsets[t + 1]; ++q)
      if (top_any_fired(r, buf, t, plan.expert[q])) dcos[plan.expert[q]] += dweight[q] / T(K);
    for (index_t e = 0; e < E; ++e) {
      if (!top_any_fired(r, buf, t, e)) continue;
      T da = dcos[e];
      if (w_bal != T(0) && fired_tokens > 0) da += w_bal * T(E) * ce[e] / (T(fired_tokens) * T(K));
      da += w_eff / (T(tokens) * T(E));
      const T c = buf.scores[t * E + e], sc = sig(c), sg = sig(r.threshold()[e]);
      dcos[e] = da * sc * (T(1) - sc);
      grad.threshold()[e] -= da * sg * (T(1) - sg);
      sw[e] += dcos[e] * c;
    }
  }
  // cos = <x, w> / (|x| |w|): dx_t = (sum_e dcos w_e/|w_e| - (sum_e dcos cos) x_t/|x_t|) / |x_t|;
  // dw_e = (sum_t dcos x_t/|x_t| - (sum_t dcos cos) w_e/|w_e|) / |w_e|.
  for (index_t t0 = 0; t0 < tokens; t0 += rows_per_task) {
    const index_t rows = (std::min)(rows_per_task, tokens - t0);
    T* u = s.rows_tmp;          // dcos_te / |w_e|, for dx
    T* v = s.rows_tmp + rows_per_task * E;  // dcos_te / |x_t|, for dW
    for (index_t i = 0; i < rows; ++i)
      for (index_t e = 0; e < E; ++e) {
        const T dc = s.dscores[(t0 + i) * E + e];
        u[i * E + e] = dc / buf.expert_aux[e];
        v[i * E + e] = dc / buf.token_aux[t0 + i];
      }
    {  // dx rows = u W^T, batch-invariant (see gate_products)
      const cpu_isa isa = active_cpu_isa();
      panel_product<T>(isa, rows, d, E, {u, E, nullptr},
                       panel_b<T>::row_major(r.weight().data(), d, tile_for<T>(isa).nr()), nullptr, dx.row(t0),
                       dx.row_stride);
    }
    gemm<order::col_major, order::row_major>(E, d, rows, v, E, x.row(t0), x.row_stride, grad.weight().data(), d,
                                             plan_gemm<T>(E, d, rows_per_task), s.pack);
    for (index_t i = 0; i < rows; ++i) {
      const index_t t = t0 + i;
      T sx = 0;
      for (index_t e = 0; e < E; ++e) sx += s.dscores[t * E + e] * buf.scores[t * E + e];
      const T xn = buf.token_aux[t];
      T* dxr = dx.row(t);
      const T* xr = x.row(t);
      for (index_t j = 0; j < d; ++j) dxr[j] = dxr[j] / xn - sx * xr[j] / (xn * xn);
    }
  }
  for (index_t e = 0; e < E; ++e) {
    const T wn = buf.expert_aux[e];
    grad.weight().col(e) = grad.weight().col(e) / wn - (sw[e] / (wn * wn)) * r.weight().col(e);
  }
  top_any_parameter_terms(r, aux, grad);
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
