// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// CPU routing: one driver over a per-policy step. A step computes the router scores of a chunk
/// of tokens (router products through cpu/gemm.hpp, then the policy's per-token preprocessing)
/// and applies the per-token rule of routing/selection.hpp to one token.
///
/// The plan is written in compressed rows without a strided intermediate, so its slot buffers
/// need only the workspace's slot bound, not tokens * max_k:
///  - top-k gives every token exactly k slots: token t's slots are [t k, (t + 1) k), written in
///    one pass (the bound must hold tokens * k);
///  - dynamic-k and top-any count first (pass 1: scores, selection into a per-worker scratch,
///    count per token), then a prefix sum gives each token's offset, the total is checked against
///    the bound (a clear error, never a dropped slot), and pass 2 re-applies the rule, which reads
///    the stored scores and does not modify them, writing straight into the plan.
/// Both passes cut tokens into the fixed tasks of cpu/tasks.hpp: deterministic for any executor,
/// and no allocation.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "../core/backend.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../routing/options.hpp"
#include "../routing/plan.hpp"
#include "../routing/routers.hpp"
#include "../routing/selection.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "tasks.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Router scratch inside a layer workspace (kept after forward: backward reads it).
template <class T>
struct router_buffers {
  T* scores = nullptr;      ///< (tokens, E): p for top_k, r for dynamic_k, cos for top_any
  T* hidden = nullptr;      ///< (tokens, h): ReLU(x Wa) for dynamic_k
  T* token_aux = nullptr;   ///< (tokens): logsumexp z (top_k), |x| (top_any)
  T* expert_aux = nullptr;  ///< (E): |w_e| (top_any)
};

/// Transient scratch of the counting pass: one token's selection per worker (max_k entries).
template <class T>
struct select_scratch {
  worker_scratch<std::int32_t> expert;
  worker_scratch<T> weight;
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

// --- per-policy steps ------------------------------------------------------------------------
// scores(t0, rows, worker): router scores of tokens [t0, t0 + rows) into buf.scores;
// select(t, expert, weight): the policy's rule for token t, returns its count or -1 (bad score).

template <class T>
struct route_step_top_k {
  const top_k_router<T>& router;
  matrix_view<const T> x;
  const router_buffers<T>& buf;
  worker_scratch<T> pack;
  static constexpr const char* bad_score =
      "top_k route: router logits of token %td are NaN or infinite (check x and the router weights)";

  void scores(index_t t0, index_t rows, index_t worker) const noexcept {
    const index_t d = router.d_model(), E = router.num_experts();
    T* z = buf.scores + t0 * E;
    init_rows_with(z, rows, E, E, router.bias().data());
    product_nt<T>(rows, E, d, {x.row(t0), x.row_stride, nullptr}, router.weight().data(), d, z, E,
                  {nullptr, pack.get(worker), plan_gemm<T>(rows_per_task, E, d)});
  }
  /// Turns token t's logits into probabilities in place: call once per token.
  index_t select(index_t t, std::int32_t* expert, T* weight) const noexcept {
    const index_t E = router.num_experts();
    return detail::select_top_k(buf.scores + t * E, E, router.max_k(), router.options().renormalize, expert, weight,
                                buf.token_aux + t);
  }
};

template <class T>
struct route_step_dynamic_k {
  const dynamic_k_router<T>& router;
  matrix_view<const T> x;
  const router_buffers<T>& buf;
  worker_scratch<T> pack;
  static constexpr const char* bad_score =
      "dynamic_k route: router score r of token %td is NaN or infinite (check x and the router weights)";

  void scores(index_t t0, index_t rows, index_t worker) const noexcept {
    const index_t d = router.d_model(), E = router.num_experts(), h = router.hidden();
    T* hid = buf.hidden + t0 * h;
    T* r = buf.scores + t0 * E;
    init_rows_with<T>(hid, rows, h, h, nullptr);
    product_nt<T>(rows, h, d, {x.row(t0), x.row_stride, nullptr}, router.w_in().data(), d, hid, h,
                  {nullptr, pack.get(worker), plan_gemm<T>(rows_per_task, h, d)});
    // ReLU that keeps NaN (NaN < 0 is false), so a NaN input reaches r and is reported.
    for (index_t i = 0; i < rows * h; ++i) hid[i] = hid[i] < T(0) ? T(0) : hid[i];
    init_rows_with<T>(r, rows, E, E, nullptr);
    product_nt<T>(rows, E, h, {hid, h, nullptr}, router.w_out().data(), h, r, E,
                  {nullptr, pack.get(worker), plan_gemm<T>(rows_per_task, E, h)});
    for (index_t i = 0; i < rows * E; ++i) r[i] = std::abs(r[i]);
  }
  index_t select(index_t t, std::int32_t* expert, T* weight) const noexcept {
    const index_t E = router.num_experts();
    return detail::select_dynamic_k(buf.scores + t * E, E, static_cast<T>(router.options().tau),
                                    router.options().k_max, expert, weight);
  }
};

template <class T>
struct route_step_top_any {
  const top_any_router<T>& router;
  matrix_view<const T> x;
  const router_buffers<T>& buf;
  worker_scratch<T> pack;
  static constexpr const char* bad_score =
      "top_any route: cosine score of token %td is NaN (x contains NaN or infinity?)";

  void scores(index_t t0, index_t rows, index_t worker) const noexcept {
    const index_t d = router.d_model(), E = router.num_experts();
    const T eps = top_any_router<T>::norm_eps;
    T* c = buf.scores + t0 * E;
    init_rows_with<T>(c, rows, E, E, nullptr);
    product_nt<T>(rows, E, d, {x.row(t0), x.row_stride, nullptr}, router.weight().data(), d, c, E,
                  {nullptr, pack.get(worker), plan_gemm<T>(rows_per_task, E, d)});
    for (index_t i = 0; i < rows; ++i) {
      const index_t t = t0 + i;
      const T* xr = x.row(t);
      T sq = 0;
      for (index_t j = 0; j < d; ++j) sq += xr[j] * xr[j];
      const T xn = (std::max)(std::sqrt(sq), eps);
      buf.token_aux[t] = xn;
      T* ct = c + i * E;
      for (index_t e = 0; e < E; ++e) ct[e] /= xn * buf.expert_aux[e];
    }
  }
  index_t select(index_t t, std::int32_t* expert, T* weight) const noexcept {
    const index_t E = router.num_experts();
    return detail::select_top_any(buf.scores + t * E, router.threshold().data(), router.active().data(), E,
                                  router.options().training, expert, weight);
  }
};

template <class T>
route_step_top_k<T> route_step(const top_k_router<T>& r, matrix_view<const T> x, const router_buffers<T>& buf,
                               worker_scratch<T> pack) noexcept {
  return {r, x, buf, pack};
}
template <class T>
route_step_dynamic_k<T> route_step(const dynamic_k_router<T>& r, matrix_view<const T> x,
                                   const router_buffers<T>& buf, worker_scratch<T> pack) noexcept {
  return {r, x, buf, pack};
}
template <class T>
route_step_top_any<T> route_step(const top_any_router<T>& r, matrix_view<const T> x, const router_buffers<T>& buf,
                                 worker_scratch<T> pack) noexcept {
  return {r, x, buf, pack};
}

/// Checks that need the router itself before any score is computed (and its per-expert state).
template <class T>
status route_prepare(const top_k_router<T>&, const router_buffers<T>&) noexcept { return {}; }
template <class T>
status route_prepare(const dynamic_k_router<T>&, const router_buffers<T>&) noexcept { return {}; }
template <class T>
status route_prepare(const top_any_router<T>& router, const router_buffers<T>& buf) noexcept {
  const index_t E = router.num_experts();
  DMOE_TRY(router.check_thresholds());  // a NaN written by an optimizer would silently disable an expert
  if (router.num_active() == 0)
    return status::failure(errc::invalid_argument,
                           "top_any route: no active expert (all %td slots masked off); activate at least one "
                           "slot in router().active()",
                           E);
  const T eps = top_any_router<T>::norm_eps;
  for (index_t e = 0; e < E; ++e) buf.expert_aux[e] = (std::max)(router.weight().col(e).norm(), eps);
  return {};
}

// --- the driver ----------------------------------------------------------------------------

/// Routes x (tokens = x.rows > 0) into `plan`, whose slot buffers hold `slot_capacity` slots.
template <class T, class Router>
status route(const context<cpu>& ctx, const Router& router, matrix_view<const T> x, routing_plan<T>& plan,
             index_t slot_capacity, const router_buffers<T>& buf, worker_scratch<T> pack,
             const select_scratch<T>& sel) noexcept {
  using policy_options = typename Router::options_type;
  constexpr bool fixed_k = std::is_same_v<policy_options, top_k_options>;
  const index_t tokens = x.rows, max_k = router.max_k();
  if (fixed_k && tokens * max_k > slot_capacity)  // tokens * max_k fits: the layout was sized from it
    return status::failure(errc::workspace_too_small,
                           "moe_layer::forward: %td tokens at k = %td need %td slots, the workspace holds %td "
                           "(size it with workspace_size for these tokens)",
                           tokens, max_k, tokens * max_k, slot_capacity);
  DMOE_TRY(route_prepare(router, buf));
  const auto step = route_step(router, x, buf, pack);
  bad_token bad;
  // Pass 1: scores and counts (top-k: also the selection, at its final place t k).
  ctx.parallel_for(task_count(tokens), [&](index_t task, index_t worker) noexcept {
    const index_t t0 = task * rows_per_task, rows = (std::min)(rows_per_task, tokens - t0);
    step.scores(t0, rows, worker);
    for (index_t t = t0; t < t0 + rows; ++t) {
      const index_t c = fixed_k ? step.select(t, plan.expert + t * max_k, plan.weight + t * max_k)
                                : step.select(t, sel.expert.get(worker), sel.weight.get(worker));
      if (c < 0) bad.note(t);
      plan.token_offsets[t + 1] = c < 0 ? 0 : c;
    }
  });
  if (bad.first.load() >= 0) return status::failure(errc::numerical_error, step.bad_score, bad.first.load());
  plan.token_offsets[0] = 0;
  for (index_t t = 0; t < tokens; ++t) plan.token_offsets[t + 1] += plan.token_offsets[t];
  if constexpr (!fixed_k) {
    const index_t slots = plan.token_offsets[tokens];
    if (slots > slot_capacity)
      return status::failure(errc::workspace_too_small,
                             "moe_layer::forward: this batch of %td tokens routes %td slots, more than the %td the "
                             "workspace holds (raise workspace_bounds::max_slots, or split the batch)",
                             tokens, slots, slot_capacity);
    // Pass 2: the same rule on the same scores, straight into each token's compressed row.
    for_each_token(ctx, tokens, [&](index_t t) noexcept {
      (void)step.select(t, plan.expert + plan.token_offsets[t], plan.weight + plan.token_offsets[t]);
    });
  }
  return {};
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
