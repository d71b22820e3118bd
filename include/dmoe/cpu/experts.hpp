// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// CPU experts: the two products of every expert over its sorted rows, the activation between
/// them, and their backward. Forward runs one task per (expert, up to rows_per_task sorted
/// rows); backward one task per expert, which owns that expert's gradients, so no reduction
/// crosses threads. The products (marked "product:") are panel products (detail/panel_kernels.hpp):
/// forward over the packed panels of W1_e and W2_e; backward's dpost and dx over the canonical
/// storage, whose layouts are the row-major transposes those products need. They compute every
/// element as one in-order FMA chain, so a token's output and dx do not depend on its batch.
/// The weight gradients, sums over an expert's rows, stay on Eigen's GEMM (cpu/gemm.hpp).

#include <algorithm>

#include <Eigen/Core>

#include "../core/backend.hpp"
#include "../core/views.hpp"
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "detail/packed_experts.hpp"
#include "detail/panel_kernels.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "layout.hpp"
#include "tasks.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Applies the activation on one task's rows: post = act(pre) (gated: act(gate) * up).
template <class Act, class T>
void activate_rows(const T* pre, T* post, index_t rows, index_t n, index_t ld) noexcept {
  using Arr = Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Arr, 0, Eigen::OuterStride<>>;
  using MMap = Eigen::Map<Arr, 0, Eigen::OuterStride<>>;
  MMap out(post, rows, n, Eigen::OuterStride<>(ld));
  if constexpr (Act::gated) {
    CMap gate(pre, rows, n, Eigen::OuterStride<>(ld));
    CMap up(pre + n, rows, n, Eigen::OuterStride<>(ld));
    out = gate;
    Act::base::apply_inplace(out);
    out *= up;
  } else {
    out = CMap(pre, rows, n, Eigen::OuterStride<>(ld));
    Act::apply_inplace(out);
  }
}

/// dpre from dpost: act'(pre) elementwise, or for gated units d gate = dpost up base'(gate),
/// d up = dpost base(gate).
template <class Act, class T>
void activation_backward(const T* pre, index_t ld, const T* dpost, T* dpre, index_t rows, index_t n) noexcept {
  for (index_t i = 0; i < rows; ++i) {
    const T* p = pre + i * ld;
    const T* dp = dpost + i * n;
    if constexpr (Act::gated) {
      using B = typename Act::base;
      T* dg = dpre + i * 2 * n;
      T* du = dg + n;
      for (index_t j = 0; j < n; ++j) {
        dg[j] = dp[j] * p[n + j] * B::derivative(p[j]);
        du[j] = dp[j] * B::apply(p[j]);
      }
    } else {
      T* dq = dpre + i * n;
      for (index_t j = 0; j < n; ++j) dq[j] = dp[j] * Act::derivative(p[j]);
    }
  }
}

/// Forward of every task: hidden = [b1_e + x_rows W1_e | act(.)], out = b2_e + post W2_e, rows
/// of x read in place through the sorted index, weights from the packed panels `p` (current for
/// `w` and `isa`: the layer refreshes them first).
template <class Act, class T>
void run_experts(const context<cpu>& ctx, cpu_isa isa, matrix_view<const T> x, const expert_weights<T>& w,
                 const packed_experts<T>& p, const layer_buffers<T>& b, index_t n_tasks) noexcept {
  const index_t d = w.d_model(), n = w.width(), fn = width_factor<Act> * n, ld = b.hidden_ld;
  const index_t nr = tile_for<T>(isa).nr();
  ctx.parallel_for(n_tasks, [&](index_t task, index_t) noexcept {
    const index_t e = b.task_expert[task], r0 = b.task_begin[task];
    const index_t rows = (std::min)(rows_per_task, b.expert_offsets[e + 1] - r0);
    T* pre = b.hidden + r0 * ld;
    T* post = pre + fn;
    // product: pre = b1_e + x[sorted rows] W1_e
    panel_product<T>(isa, rows, fn, d, {x.data, x.row_stride, b.sorted_token + r0}, p.w1(e, nr), w.b1_ptr(e), pre,
                     ld);
    activate_rows<Act>(pre, post, rows, n, ld);
    // product: out = b2_e + post W2_e
    panel_product<T>(isa, rows, d, n, {post, ld, nullptr}, p.w2(e, nr), w.b2e_ptr(e), b.out + r0 * d, d);
  });
}

/// Expert parameter gradients (into g, which starts at zero) and dx per slot (b.dx_slot). One
/// task per expert owns that expert's gradients; rows are visited in sorted order in chunks of
/// rows_per_task.
template <class Act, class T>
void expert_backward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<const T> dy,
                     const expert_weights<T>& w, expert_weights<T>& g, const layer_buffers<T>& b) noexcept {
  const index_t d = w.d_model(), n = w.width(), fn = width_factor<Act> * n, ld = b.hidden_ld;
  const index_t R = rows_per_task;
  const auto blk_dw2 = plan_gemm<T>(d, n, R), blk_dw1 = plan_gemm<T>(fn, d, R);
  const cpu_isa isa = active_cpu_isa();
  const index_t nr = tile_for<T>(isa).nr();
  ctx.parallel_for(w.num_experts(), [&](index_t e, index_t worker) noexcept {
    T* gbuf = b.bwd.get(worker);  // w_s * dy_t rows, then gathered x rows
    T* dpost = gbuf + R * d;
    T* dpre = dpost + R * n;
    T* pack = b.pack.get(worker);
    T* gw1 = g.w1_ptr(e);
    T* gw2 = g.w2_ptr(e);
    T* gb1 = g.b1_ptr(e);
    T* gb2e = g.b2e_ptr(e);
    for (index_t r0 = b.expert_offsets[e]; r0 < b.expert_offsets[e + 1]; r0 += R) {
      const index_t rows = (std::min)(R, b.expert_offsets[e + 1] - r0);
      const T* pre = b.hidden + r0 * ld;
      const T* post = pre + fn;
      for (index_t i = 0; i < rows; ++i) {
        const T ws = b.plan.weight[b.sorted_slot[r0 + i]];
        const T* src = dy.row(b.sorted_token[r0 + i]);
        T* dst = gbuf + i * d;
        for (index_t j = 0; j < d; ++j) dst[j] = ws * src[j];
        if (gb2e)
          for (index_t j = 0; j < d; ++j) gb2e[j] += dst[j];
      }
      // dpost = g W2^T; dW2^T += g^T post (W2 is stored as its transpose, row-major d x n).
      // product: dpost = g W2_e^T (w2_e is stored as W2_e^T, row-major d x n)
      panel_product<T>(isa, rows, n, d, {gbuf, d, nullptr}, panel_b<T>::row_major(w.w2_ptr(e), n, nr), nullptr, dpost,
                       n);
      // product: dW2_e^T += g^T post
      gemm<order::col_major, order::row_major>(d, n, rows, gbuf, d, post, ld, gw2, n, blk_dw2, pack);
      activation_backward<Act>(pre, ld, dpost, dpre, rows, n);
      if (gb1)
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < fn; ++j) gb1[j] += dpre[i * fn + j];
      // dW1^T += dpre^T x (W1 stored as its transpose, row-major f n x d); dx_slot = dpre W1^T.
      for (index_t i = 0; i < rows; ++i) {
        const T* src = x.row(b.sorted_token[r0 + i]);
        std::copy(src, src + d, gbuf + i * d);
      }
      // product: dW1_e^T += dpre^T x_rows
      gemm<order::col_major, order::row_major>(fn, d, rows, dpre, fn, gbuf, d, gw1, d, blk_dw1, pack);
      // product: dx_slot = dpre W1_e^T (w1_e is stored as W1_e^T, row-major f n x d)
      panel_product<T>(isa, rows, d, fn, {dpre, fn, nullptr}, panel_b<T>::row_major(w.w1_ptr(e), d, nr), nullptr,
                       b.dx_slot + r0 * d, d);
    }
  });
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
