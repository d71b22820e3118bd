// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// CPU route drivers: router products over fixed chunks of tokens (Eigen GEMM through
/// cpu/gemm.hpp), then the per-token rule of routing/selection.hpp, then an in-place
/// compaction into the plan's compressed rows.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "../core/backend.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../routing/plan.hpp"
#include "../routing/routers.hpp"
#include "../routing/selection.hpp"
#include "gemm.hpp"
#include "kernels.hpp"

namespace dmoe::cpu_detail {

/// Tokens (or slots) per task. Fixed, never derived from the thread count, so results are
/// bitwise identical for any number of threads.
inline constexpr index_t rows_per_task = 128;

/// Per-worker scratch: a slice per worker id, each 64-byte aligned.
template <class T>
struct worker_scratch {
  T* base = nullptr;
  index_t stride = 0;  ///< elements per worker (multiple of 16)
  T* get(index_t worker) const noexcept { return base + worker * stride; }
};

/// Router scratch inside a layer workspace (kept after forward: backward reads it).
template <class T>
struct router_buffers {
  T* scores = nullptr;      ///< (tokens, E): p for top_k, r for dynamic_k, cos for top_any
  T* hidden = nullptr;      ///< (tokens, h): ReLU(x Wa) for dynamic_k
  T* token_aux = nullptr;   ///< (tokens): logsumexp z (top_k), |x| (top_any)
  T* expert_aux = nullptr;  ///< (E): |w_e| (top_any)
};

template <class T>
index_t router_hidden_width(const top_k_router<T>&) noexcept { return 0; }
template <class T>
index_t router_hidden_width(const dynamic_k_router<T>& r) noexcept { return r.hidden(); }
template <class T>
index_t router_hidden_width(const top_any_router<T>&) noexcept { return 0; }

/// Largest packing buffer the router products need (h = 0 for single-layer routers).
template <class T>
index_t router_pack_elems(index_t d, index_t E, index_t h) {
  index_t m = plan_gemm<T>(rows_per_task, E, d).pack_elems();
  if (h > 0) {
    m = (std::max)(m, plan_gemm<T>(rows_per_task, h, d).pack_elems());
    m = (std::max)(m, plan_gemm<T>(rows_per_task, E, h).pack_elems());
  }
  return m;
}

/// Records the first token whose scores were not usable.
struct bad_token {
  std::atomic<index_t> first{-1};
  void note(index_t t) noexcept {
    index_t cur = first.load(std::memory_order_relaxed);
    while ((cur < 0 || t < cur) && !first.compare_exchange_weak(cur, t, std::memory_order_relaxed)) {
    }
  }
};

/// Turns per-token selections written at stride max_k into compressed rows, in place.
/// On entry token_offsets[t + 1] holds token t's count.
template <class T>
void compact_plan(routing_plan<T>& plan, index_t max_k) noexcept {
  plan.token_offsets[0] = 0;
  for (index_t t = 0; t < plan.tokens; ++t) {
    const index_t count = plan.token_offsets[t + 1];
    const index_t dst = plan.token_offsets[t], src = t * max_k;
    if (dst != src)
      for (index_t i = 0; i < count; ++i) {  // dst <= src: a forward copy is safe
        plan.expert[dst + i] = plan.expert[src + i];
        plan.weight[dst + i] = plan.weight[src + i];
      }
    plan.token_offsets[t + 1] = dst + count;
  }
}

template <class T>
void init_rows_with(T* dst, index_t rows, index_t cols, index_t ld, const T* bias) noexcept {
  for (index_t i = 0; i < rows; ++i) {
    T* r = dst + i * ld;
    if (bias)
      std::copy(bias, bias + cols, r);
    else
      std::fill(r, r + cols, T(0));
  }
}

// --- top_k ---------------------------------------------------------------------------------
template <class T>
status route(const context<cpu>& ctx, const top_k_router<T>& router, matrix_view<const T> x, routing_plan<T>& plan,
             const router_buffers<T>& buf, worker_scratch<T> scratch) noexcept {
  const index_t tokens = x.rows, d = router.d_model(), E = router.num_experts(), k = router.max_k();
  const bool renorm = router.options().renormalize;
  const gemm_blocking blk = plan_gemm<T>(rows_per_task, E, d);
  bad_token bad;
  const index_t tasks = (tokens + rows_per_task - 1) / rows_per_task;
  ctx.parallel_for(tasks, [&](index_t task, index_t worker) noexcept {
    const index_t t0 = task * rows_per_task, rows = (std::min)(rows_per_task, tokens - t0);
    T* z = buf.scores + t0 * E;
    init_rows_with(z, rows, E, E, router.bias().data());
    product_nt<T>(rows, E, d, {x.row(t0), x.row_stride, nullptr}, router.weight().data(), d, z, E,
                  {nullptr, scratch.get(worker), blk});
    for (index_t i = 0; i < rows; ++i) {
      const index_t t = t0 + i;
      const index_t c = detail::select_top_k(z + i * E, E, k, renorm, plan.expert + t * k, plan.weight + t * k,
                                             buf.token_aux + t);
      if (c < 0) bad.note(t);
      plan.token_offsets[t + 1] = c < 0 ? 0 : c;
    }
  });
  if (bad.first.load() >= 0)
    return status::failure(errc::numerical_error,
                           "top_k route: router logits of token %td are NaN or infinite (check x and the router "
                           "weights)",
                           bad.first.load());
  compact_plan(plan, k);
  return {};
}

// --- dynamic_k -----------------------------------------------------------------------------
template <class T>
status route(const context<cpu>& ctx, const dynamic_k_router<T>& router, matrix_view<const T> x,
             routing_plan<T>& plan, const router_buffers<T>& buf, worker_scratch<T> scratch) noexcept {
  const index_t tokens = x.rows, d = router.d_model(), E = router.num_experts(), h = router.hidden();
  const index_t k_cap = router.options().k_max, max_k = router.max_k();
  const T tau = static_cast<T>(router.options().tau);
  const gemm_blocking blk_a = plan_gemm<T>(rows_per_task, h, d), blk_b = plan_gemm<T>(rows_per_task, E, h);
  bad_token bad;
  const index_t tasks = (tokens + rows_per_task - 1) / rows_per_task;
  ctx.parallel_for(tasks, [&](index_t task, index_t worker) noexcept {
    const index_t t0 = task * rows_per_task, rows = (std::min)(rows_per_task, tokens - t0);
    T* hid = buf.hidden + t0 * h;
    T* r = buf.scores + t0 * E;
    init_rows_with<T>(hid, rows, h, h, nullptr);
    product_nt<T>(rows, h, d, {x.row(t0), x.row_stride, nullptr}, router.w_in().data(), d, hid, h,
                  {nullptr, scratch.get(worker), blk_a});
    // ReLU that keeps NaN (NaN < 0 is false), so a NaN input reaches r and is reported.
    for (index_t i = 0; i < rows * h; ++i) hid[i] = hid[i] < T(0) ? T(0) : hid[i];
    init_rows_with<T>(r, rows, E, E, nullptr);
    product_nt<T>(rows, E, h, {hid, h, nullptr}, router.w_out().data(), h, r, E, {nullptr, scratch.get(worker), blk_b});
    for (index_t i = 0; i < rows * E; ++i) r[i] = std::abs(r[i]);
    for (index_t i = 0; i < rows; ++i) {
      const index_t t = t0 + i;
      const index_t c = detail::select_dynamic_k(r + i * E, E, tau, k_cap, plan.expert + t * max_k,
                                                 plan.weight + t * max_k);
      if (c < 0) bad.note(t);
      plan.token_offsets[t + 1] = c < 0 ? 0 : c;
    }
  });
  if (bad.first.load() >= 0)
    return status::failure(errc::numerical_error,
                           "dynamic_k route: router score r of token %td is NaN or infinite (check x and the "
                           "router weights)",
                           bad.first.load());
  compact_plan(plan, max_k);
  return {};
}

// --- top_any -------------------------------------------------------------------------------
template <class T>
status route(const context<cpu>& ctx, const top_any_router<T>& router, matrix_view<const T> x,
             routing_plan<T>& plan, const router_buffers<T>& buf, worker_scratch<T> scratch) noexcept {
  const index_t tokens = x.rows, d = router.d_model(), E = router.num_experts();
  if (router.num_active() == 0)
    return status::failure(errc::invalid_argument,
                           "top_any route: no active expert (all %td slots masked off); activate at least one "
                           "slot in router().active()",
                           E);
  const bool training = router.options().training;
  const T eps = top_any_router<T>::norm_eps;
  for (index_t e = 0; e < E; ++e) buf.expert_aux[e] = (std::max)(router.weight().col(e).norm(), eps);
  const gemm_blocking blk = plan_gemm<T>(rows_per_task, E, d);
  bad_token bad;
  const index_t tasks = (tokens + rows_per_task - 1) / rows_per_task;
  ctx.parallel_for(tasks, [&](index_t task, index_t worker) noexcept {
    const index_t t0 = task * rows_per_task, rows = (std::min)(rows_per_task, tokens - t0);
    T* c = buf.scores + t0 * E;
    init_rows_with<T>(c, rows, E, E, nullptr);
    product_nt<T>(rows, E, d, {x.row(t0), x.row_stride, nullptr}, router.weight().data(), d, c, E,
                  {nullptr, scratch.get(worker), blk});
    for (index_t i = 0; i < rows; ++i) {
      const index_t t = t0 + i;
      const T* xr = x.row(t);
      T sq = 0;
      for (index_t j = 0; j < d; ++j) sq += xr[j] * xr[j];
      const T xn = (std::max)(std::sqrt(sq), eps);
      buf.token_aux[t] = xn;
      T* ct = c + i * E;
      for (index_t e = 0; e < E; ++e) ct[e] /= xn * buf.expert_aux[e];
      const index_t cnt = detail::select_top_any(ct, router.threshold().data(), router.active().data(), E,
                                                 training, plan.expert + t * E, plan.weight + t * E);
      if (cnt < 0) bad.note(t);
      plan.token_offsets[t + 1] = cnt < 0 ? 0 : cnt;
    }
  });
  if (bad.first.load() >= 0)
    return status::failure(errc::numerical_error,
                           "top_any route: cosine score of token %td is NaN (x contains NaN or infinity?)",
                           bad.first.load());
  compact_plan(plan, E);
  return {};
}

}  // namespace dmoe::cpu_detail
