// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The CPU layer's workspace layout: which buffers one call uses and where they live. One
/// routine (carve_layer) gives both the size (measuring carver) and the pointers (real base), so
/// workspace_size and forward cannot disagree. Sizes go through the carver's checked arithmetic.
///
/// Order: the stamp, then the forward state backward reads (plan, router scores, sorted order,
/// activations, expert outputs), then per-worker scratch, then backward-only buffers. The forward
/// state's offsets depend only on (tokens, slot capacity), never on the thread count.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../core/config.hpp"
#include "../core/workspace.hpp"
#include "../routing/plan.hpp"
#include "detail/half.hpp"
#include "route.hpp"
#include "route_backward.hpp"
#include "tasks.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Where every buffer of a layer call lives in the workspace.
template <class T>
struct layer_buffers {
  detail::workspace_stamp* stamp = nullptr;  ///< what forward left here (backward checks it)
  index_t slot_capacity = 0;                 ///< slots the plan buffers hold
  routing_plan<T> plan;
  router_buffers<T> router;
  index_t* expert_offsets = nullptr;  ///< (E + 1) start of each expert's rows in sorted order
  index_t* sorted_token = nullptr;    ///< (slots) token of each sorted row
  index_t* sorted_slot = nullptr;     ///< (slots) plan slot of each sorted row
  index_t* slot_pos = nullptr;        ///< (slots) sorted row of each plan slot
  index_t* task_expert = nullptr;     ///< (max_tasks)
  index_t* task_begin = nullptr;      ///< (max_tasks + 1) first sorted row of the task, then the end of the last
  T* hidden = nullptr;                ///< (slots, hidden_ld): [pre-activation (f n) | post (n)]
  T* out = nullptr;                   ///< (slots, d): expert output per sorted row (b2_e included)
  T* out_tile = nullptr;              ///< (rows_per_task, d): infer's fused path (one worker)
  bf16_t* x_bf16 = nullptr;           ///< (tokens, round32(d)), float layers: x in bf16 for infer on tiles
  worker_scratch<T> pack;             ///< per worker GEMM packing panels
  select_scratch<T> select;           ///< per worker one token's selection (counting pass)
  index_t hidden_ld = 0;
  // backward only
  T* dweight = nullptr;               ///< (slots) dL/dw_s
  T* dx_slot = nullptr;               ///< (slots, d) dL/dx through each slot's expert
  worker_scratch<T> bwd;              ///< per worker: g (R d) | dpost (R n) | dpre (R f n); infer: bf16 tile scratch
  router_grad_scratch<T> rgrad;
};

/// The layer's shape as far as buffer sizes are concerned.
struct layer_dims {
  index_t d = 0, E = 0, n = 0, f = 1, max_k = 0, router_hidden = 0, pack_elems = 0;
  bool fixed_k = false;  ///< top-k: every token has exactly max_k slots
};

/// Dims of a layer: d, E, n, f (2 if gated), max_k, router hidden width, and the largest GEMM
/// packing buffer the router's products, forward and backward, need.
template <class T>
layer_dims make_dims(index_t d, index_t E, index_t n, index_t f, index_t max_k, index_t router_hidden,
                     bool fixed_k) {
  layer_dims dm;
  dm.d = d;
  dm.E = E;
  dm.n = n;
  dm.f = f;
  dm.max_k = max_k;
  dm.router_hidden = router_hidden;
  dm.fixed_k = fixed_k;
  // Only the router's products pack (Eigen's GEMM); the expert products, forward and backward, are
  // panel products, which read their operands in place.
  dm.pack_elems = router_pack_elems<T>(d, E, router_hidden);
  router_grad_shapes<T>(d, E, dm.pack_elems);
  return dm;
}

template <class T>
layer_buffers<T> carve_layer(detail::carver& c, const layer_dims& dm, index_t tokens, index_t threads,
                             index_t slots) noexcept {
  layer_buffers<T> b;
  // Every product in checked arithmetic (carver::mul): absurd token counts mark the layout
  // overflowed instead of wrapping to a small size that check_io would accept.
  const index_t max_tasks = c.add(dm.E, task_count(slots));
  b.stamp = c.take<detail::workspace_stamp>(1);
  b.slot_capacity = slots;
  b.plan.tokens = tokens;
  b.plan.num_experts = dm.E;
  b.plan.token_offsets = c.take<index_t>(c.add(tokens, 1));
  b.plan.expert = c.take<std::int32_t>(slots);
  b.plan.weight = c.take<T>(slots);
  b.router.scores = c.take<T>(c.mul(tokens, dm.E));
  b.router.hidden = c.take<T>(c.mul(tokens, dm.router_hidden));
  b.router.token_aux = c.take<T>(tokens);
  b.router.expert_aux = c.take<T>(dm.E);
  b.expert_offsets = c.take<index_t>(dm.E + 1);
  b.sorted_token = c.take<index_t>(slots);
  b.sorted_slot = c.take<index_t>(slots);
  b.slot_pos = c.take<index_t>(slots);
  b.task_expert = c.take<index_t>(max_tasks);
  b.task_begin = c.take<index_t>(c.add(max_tasks, 1));
  // Rows padded to 16 elements: every row's pre and post then sit at the same address modulo 64
  // bytes. Eigen's vectorised activation (activate_rows) peels scalar elements until its output
  // is aligned, and its scalar exp differs from its packet exp in the last bits, so an unpadded
  // row's result depended on its position in the buffer, i.e. on the batch (expert parallelism,
  // which moves rows between buffers, showed it).
  b.hidden_ld = round16(dm.f * dm.n + dm.n);
  b.hidden = c.take<T>(c.mul(slots, b.hidden_ld));
  b.out = c.take<T>(c.mul(slots, dm.d));
  b.out_tile = c.take<T>(c.mul(rows_per_task, dm.d));
  b.x_bf16 = c.take<bf16_t>(std::is_same_v<T, float> ? c.mul(tokens, (dm.d + 31) / 32 * 32) : 0);
  b.pack.stride = round16(dm.pack_elems);
  b.pack.base = c.take<T>(c.mul(threads, b.pack.stride));
  const index_t sel = dm.fixed_k ? 0 : round16(dm.max_k);
  b.select.expert.stride = sel;
  b.select.expert.base = c.take<std::int32_t>(c.mul(threads, sel));
  b.select.weight.stride = sel;
  b.select.weight.base = c.take<T>(c.mul(threads, sel));
  b.dweight = c.take<T>(slots);
  b.dx_slot = c.take<T>(c.mul(slots, dm.d));
  // Backward's g | dpost | dpre, or (float layers; infer runs no backward) infer_bf16.hpp's tile
  // scratch: x rows and post rows in bf16 (rows padded to 32 values), [pre | post] in float, and
  // 32 rows of expert outputs.
  const index_t bwd_elems = rows_per_task * (dm.d + dm.n + dm.f * dm.n);
  const index_t tile_elems = std::is_same_v<T, float> ? rows_per_task * ((dm.d + 31) / 32 * 16 + b.hidden_ld +
                                                                         (dm.n + 31) / 32 * 16) +
                                                            32 * round16(dm.d)
                                                      : 0;
  b.bwd.stride = round16((std::max)(bwd_elems, tile_elems));
  b.bwd.base = c.take<T>(c.mul(threads, b.bwd.stride));
  b.rgrad.dscores = c.take<T>(c.mul(tokens, dm.E));
  b.rgrad.expert_tmp = c.take<T>(4 * dm.E);
  b.rgrad.rows_tmp = c.take<T>(rows_per_task * 2 * dm.E);
  b.rgrad.pack = b.pack.base;  // the router backward runs on the calling thread (worker 0)
  return b;
}

/// Bytes of the layout for (tokens, threads, slots), 0 with overflowed = true when it does not fit.
template <class T>
std::size_t layout_bytes(const layer_dims& dm, index_t tokens, index_t threads, index_t slots,
                         bool& overflowed) noexcept {
  detail::carver c;
  carve_layer<T>(c, dm, tokens, threads, slots);
  overflowed = c.overflowed();
  return c.bytes();
}

/// The largest slot capacity in [0, worst] whose layout fits `bytes`, or -1 if not even 0 fits.
/// Layout size grows with the slot count, so a binary search over it is exact.
template <class T>
index_t fitting_slots(const layer_dims& dm, index_t tokens, index_t threads, index_t worst, std::size_t bytes) noexcept {
  bool ovf = false;
  const std::size_t full = layout_bytes<T>(dm, tokens, threads, worst, ovf);
  if (!ovf && full <= bytes) return worst;
  const std::size_t none = layout_bytes<T>(dm, tokens, threads, 0, ovf);
  if (ovf || none > bytes) return -1;
  index_t lo = 0, hi = worst;  // fits(lo), !fits(hi)
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    const std::size_t need = layout_bytes<T>(dm, tokens, threads, mid, ovf);
    if (!ovf && need <= bytes)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
