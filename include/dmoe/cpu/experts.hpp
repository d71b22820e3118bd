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
/// storage, whose layouts are the row-major transposes those products need; the weight gradients
/// (sums over an expert's rows, accumulated block after block of rows in sorted order) read the
/// gradient rows down their columns (panel_accumulate_at), so nothing is transposed or packed.
/// They compute every element as one in-order FMA chain, so a token's output and dx do not depend
/// on its batch, and the weight gradients not on the thread count.

#include <algorithm>
#include <atomic>
#include <cstddef>

#include <Eigen/Core>

#include "../core/backend.hpp"
#include "../core/views.hpp"
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "detail/packed_experts.hpp"
#include "detail/panel_kernels.hpp"
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

/// Whether infer() fuses the combine into the expert tasks (experts_combined_in_order): on at most
/// this many workers (default 1). The fused path visits the experts in order on one worker, so on
/// more workers the per-expert tasks (run_experts, then combine) run in parallel instead. Both
/// paths give the same bits, so the choice is free; tests raise and lower it to run both paths on
/// any thread count.
inline std::atomic<index_t>& fused_combine_max_workers() noexcept {
  static std::atomic<index_t> workers{1};
  return workers;
}
inline bool fused_combine_pays(index_t workers) noexcept {
  return workers <= fused_combine_max_workers().load(std::memory_order_relaxed);
}

/// First product and activation of one task: hidden = [b1_e + x_rows W1_e | act(.)], rows of x
/// read in place through the sorted index, W1 from the packed panels `p` (current for `w` and
/// `isa`: the layer refreshes them first).
template <class Act, class T, class P>
void task_hidden(cpu_isa isa, matrix_view<const T> x, const expert_weights<T>& w, const P& p,
                 const layer_buffers<T>& b, index_t e, index_t r0, index_t rows) noexcept {
  const index_t d = w.d_model(), n = w.width(), fn = width_factor<Act> * n, ld = b.hidden_ld;
  T* pre = b.hidden + r0 * ld;
  // product: pre = b1_e + x[sorted rows] W1_e
  panel_product<T>(isa, rows, fn, d, {x.data, x.row_stride, b.sorted_token + r0}, p.w1(e, tile_for<T>(isa).nr()),
                   w.b1_ptr(e), pre, ld);
  activate_rows<Act>(pre, pre + fn, rows, n, ld);
}

/// Expert and first sorted row of a task, and its row count (at most rows_per_task).
struct task_rows {
  index_t expert, begin, rows;
};
template <class T>
task_rows rows_of_task(const layer_buffers<T>& b, index_t task) noexcept {
  return {b.task_expert[task], b.task_begin[task], b.task_begin[task + 1] - b.task_begin[task]};
}

/// Second product of sorted rows [r0, r0 + rows) of expert e, output columns [c0, c0 + nc):
/// dst (row stride ldd) = b2_e + post W2_e.
template <class T, class P>
void expert_output_columns(cpu_isa isa, const expert_weights<T>& w, const P& p,
                           const layer_buffers<T>& b, index_t fn, index_t e, index_t r0, index_t rows, index_t c0,
                           index_t nc, T* dst, index_t ldd) noexcept {
  const index_t n = w.width(), nr = tile_for<T>(isa).nr();
  const T* b2e = w.b2e_ptr(e);
  // product: out = b2_e + post W2_e
  panel_product<T>(isa, rows, nc, n, {b.hidden + r0 * b.hidden_ld + fn, b.hidden_ld, nullptr},
                   p.w2(e, nr).columns_from(c0, nr), b2e ? b2e + c0 : nullptr, dst, ldd);
}

/// Both products of every task, one task after the other on the same worker (its hidden rows are
/// still in cache for the second), the expert outputs into b.out (per sorted row): forward keeps
/// them for backward, and the expert-parallel owner sends them back before the combine.
template <class Act, class T, class P>
void run_experts(const context<cpu>& ctx, cpu_isa isa, matrix_view<const T> x, const expert_weights<T>& w,
                 const P& p, const layer_buffers<T>& b, index_t n_tasks) noexcept {
  const index_t d = w.d_model(), fn = width_factor<Act> * w.width();
  ctx.parallel_for(n_tasks, [&](index_t task, index_t) noexcept {
    const task_rows t = rows_of_task(b, task);
    task_hidden<Act>(isa, x, w, p, b, t.expert, t.begin, t.rows);
    expert_output_columns(isa, w, p, b, fn, t.expert, t.begin, t.rows, 0, d, b.out + t.begin * d, d);
  });
}

/// Inference on one worker: experts in ascending order, each row block's two products and then
/// its scaled adds into the tokens' output rows, so every element of y receives its terms in the
/// plan's slot order as the same fused multiply-adds: the bits of run_experts + combine.hpp. A
/// block's hidden rows and outputs stay in L1/L2 between the products and the adds, and nothing
/// per slot is written to memory and read back.
template <class Act, class T, class P>
void experts_combined_in_order(cpu_isa isa, matrix_view<const T> x, matrix_view<T> y, const expert_weights<T>& w,
                               const P& p, const layer_buffers<T>& b) noexcept {
  const index_t d = w.d_model(), fn = width_factor<Act> * w.width(), E = w.num_experts();
  const T* b2 = w.output_bias_ptr();
  for (index_t t = 0; t < y.rows; ++t) {
    T* yt = y.row(t);
    if (b2)
      std::copy(b2, b2 + d, yt);
    else
      std::fill(yt, yt + d, T(0));
  }
  T* tile = b.out_tile;  // rows_per_task x d
  // The outputs of at most `sub` rows at a time (about 96 KB: they stay in L2 for the adds).
  const index_t sub = (std::max)(index_t(1), (std::min)(rows_per_task, (index_t(96) << 10) / (d * index_t(sizeof(T)))));
  for (index_t e = 0; e < E; ++e) {
    for_each_row_block(b.expert_offsets[e], b.expert_offsets[e + 1], [&](index_t r0, index_t rows) noexcept {
      task_hidden<Act>(isa, x, w, p, b, e, r0, rows);
      for (index_t s0 = 0; s0 < rows; s0 += sub) {
        const index_t sr = (std::min)(sub, rows - s0);
        expert_output_columns(isa, w, p, b, fn, e, r0 + s0, sr, 0, d, tile, d);
        for (index_t i = 0; i < sr; ++i)
          scaled_add<T>(isa, d, b.plan.weight[b.sorted_slot[r0 + s0 + i]], tile + i * d,
                        y.row(b.sorted_token[r0 + s0 + i]));
      }
    });
  }
}

/// Expert parameter gradients (overwriting every expert's part of g) and dx per slot (b.dx_slot).
/// One task per expert owns that expert's gradients; rows are visited in sorted order in blocks of
/// at most rows_per_task (for_each_row_block). Every gradient element is one chain over the
/// expert's rows in sorted order, whatever the blocks: the cut changes no bit. The first block
/// writes dW1, dW2 (chains from +0, as from a zeroed buffer), so the 2 E d n gradient values are
/// not zeroed first (that memset was 3% of backward at shape S); an expert with no rows gets zeros.
template <class Act, class T, class P>
void expert_backward(const context<cpu>& ctx, cpu_isa isa, matrix_view<const T> x, matrix_view<const T> dy,
                     const expert_weights<T>& w, const P& p, expert_weights<T>& g, const layer_buffers<T>& b) noexcept {
  const index_t d = w.d_model(), n = w.width(), fn = width_factor<Act> * n, ld = b.hidden_ld;
  const index_t R = rows_per_task;
  const index_t nr = tile_for<T>(isa).nr();
  ctx.parallel_for(w.num_experts(), [&](index_t e, index_t worker) noexcept {
    T* gbuf = b.bwd.get(worker);  // w_s * dy_t rows, then gathered x rows
    T* dpost = gbuf + R * d;
    T* dpre = dpost + R * n;
    T* gw1 = g.w1_ptr(e);
    T* gw2 = g.w2_ptr(e);
    T* gb1 = g.b1_ptr(e);
    T* gb2e = g.b2e_ptr(e);
    if (gb1) std::fill(gb1, gb1 + fn, T(0));
    if (gb2e) std::fill(gb2e, gb2e + d, T(0));
    const index_t first_row = b.expert_offsets[e];
    if (b.expert_offsets[e + 1] == first_row) {
      std::fill(gw1, gw1 + fn * d, T(0));
      std::fill(gw2, gw2 + n * d, T(0));
    }
    for_each_row_block(b.expert_offsets[e], b.expert_offsets[e + 1], [&](index_t r0, index_t rows) noexcept {
      const bool first = r0 == first_row;
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
      // product: dpost = g W2_e^T (w2_e is stored as W2_e^T, row-major d x n; or its 16-bit panels)
      panel_product<T>(isa, rows, n, d, {gbuf, d, nullptr}, p.w2t(e, nr), nullptr, dpost, n);
      // product: dW2_e^T += g^T post
      panel_accumulate_at<T>(isa, d, n, rows, gbuf, d, panel_b<T>::row_major(post, ld, nr), gw2, n, first);
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
      panel_accumulate_at<T>(isa, fn, d, rows, dpre, fn, panel_b<T>::row_major(gbuf, d, nr), gw1, d, first);
      // product: dx_slot = dpre W1_e^T (w1_e is stored as W1_e^T, row-major f n x d; or 16-bit panels)
      panel_product<T>(isa, rows, d, fn, {dpre, fn, nullptr}, p.w1t(e, nr), nullptr, b.dx_slot + r0 * d, d);
    });
  });
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
