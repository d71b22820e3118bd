// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// CPU combine and its backward, per token in fixed tasks of tokens (no atomics, no reduction
/// across threads): y_t = b2 + sum over t's slots in slot order of w_s out[slot]; the slot
/// weights' gradients dL/dw_s = <dy_t, out[slot]>; the slots' parts of dL/dx; dL/db2.

#include <algorithm>

#include "../core/backend.hpp"
#include "../core/views.hpp"
#include "detail/panel_kernels.hpp"
#include "layout.hpp"
#include "tasks.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// y = b2 (or 0) + sum_s w_s out[slot_pos[s]] per token, in slot order (ascending expert id), each
/// term one fused multiply-add: the same bits as infer's fused path
/// (experts.hpp, experts_combined_in_order), on every instruction set.
template <class T>
void combine(const context<cpu>& ctx, cpu_isa isa, matrix_view<T> y, const layer_buffers<T>& b, index_t d,
             const T* b2) noexcept {
  for_each_token(ctx, b.plan.tokens, [&](index_t t) noexcept {
    T* yt = y.row(t);
    if (b2)
      std::copy(b2, b2 + d, yt);
    else
      std::fill(yt, yt + d, T(0));
    for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s)
      scaled_add<T>(isa, d, b.plan.weight[s], b.out + b.slot_pos[s] * d, yt);
  });
}

/// dL/dw_s = <dy_t, y_e(x_t)> for every slot (the combine weights' gradient), into b.dweight.
/// One fixed summation order (dot: 64 bytes of partial chains, then a pairwise sum), the same on
/// every instruction set; a serial loop here was a latency-bound chain of d additions per slot.
template <class T>
void slot_weight_grads(const context<cpu>& ctx, matrix_view<const T> dy, const layer_buffers<T>& b,
                       index_t d) noexcept {
  const cpu_isa isa = active_cpu_isa();
  for_each_token(ctx, b.plan.tokens, [&](index_t t) noexcept {
    for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s)
      b.dweight[s] = dot<T>(isa, d, dy.row(t), b.out + b.slot_pos[s] * d);
  });
}

/// dx_t (holding the router's part) += the slots' parts in slot order.
template <class T>
void input_grads(const context<cpu>& ctx, matrix_view<T> dx, const layer_buffers<T>& b, index_t d) noexcept {
  for_each_token(ctx, b.plan.tokens, [&](index_t t) noexcept {
    T* o = dx.row(t);
    for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s) {
      const T* src = b.dx_slot + b.slot_pos[s] * d;
      for (index_t j = 0; j < d; ++j) o[j] += src[j];
    }
  });
}

/// db2 += sum over tokens of dy_t, in token order (the shared output bias is added once per token).
template <class T>
void output_bias_grad(matrix_view<const T> dy, T* db2, index_t d) noexcept {
  if (!db2) return;
  for (index_t t = 0; t < dy.rows; ++t)
    for (index_t j = 0; j < d; ++j) db2[j] += dy(t, j);
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
