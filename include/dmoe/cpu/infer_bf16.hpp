// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// infer() with infer_precision::bf16 on the CPU's matrix tiles (detail/amx_kernels.hpp): x rounded
/// to bf16 once (b.x_bf16), then per row block of an expert its x rows gathered, the first product into float, bias and
/// activation in float, the hidden rows rounded to bf16, the second product in groups of 32 rows,
/// each group's outputs added into y (one worker: experts in order, as experts_combined_in_order)
/// or written to the per-slot outputs that combine.hpp then sums (several workers). The two give
/// the same bits: y receives each token's terms in the plan's slot order either way.

#include <algorithm>

#include "../core/backend.hpp"
#include "../core/views.hpp"
#include "combine.hpp"
#include "detail/amx_kernels.hpp"
#include "experts.hpp"
#include "layout.hpp"
#include "tasks.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Rows of the second product per group: its float outputs (32 x d) stay in L1/L2 for the adds.
inline constexpr index_t tile_output_rows = 2 * amx_rows;

/// One worker's scratch for tile_rows, carved from its slice of b.bwd (infer runs no backward;
/// layout.hpp sizes the slice for both through infer_tile_scratch_elems).
struct tile_scratch {
  bf16_t* a1 = nullptr;  // rows_per_task x kp1: x rows in bf16
  float* c1 = nullptr;   // rows_per_task x hidden_ld: [pre | post] in float
  bf16_t* a2 = nullptr;  // rows_per_task x kp2: post in bf16
  float* c2 = nullptr;   // tile_output_rows x ld2: expert outputs
  index_t kp1 = 0, kp2 = 0, ld1 = 0, ld2 = 0;
};
inline tile_scratch carve_tile_scratch(float* base, index_t d, index_t n, index_t hidden_ld) noexcept {
  tile_scratch s;
  s.kp1 = round_up(d, amx_k_chunk);
  s.kp2 = round_up(n, amx_k_chunk);
  s.ld1 = hidden_ld;
  s.ld2 = round_up(d, amx_rows);
  // Every part is a whole number of 64-byte lines, so each starts aligned as the slice does.
  s.a1 = reinterpret_cast<bf16_t*>(base);
  s.c1 = base + rows_per_task * s.kp1 / 2;
  s.a2 = reinterpret_cast<bf16_t*>(s.c1 + rows_per_task * s.ld1);
  s.c2 = reinterpret_cast<float*>(s.a2 + rows_per_task * s.kp2);
  return s;
}

/// Both products of sorted rows [r0, r0 + rows) of expert e (rows <= rows_per_task); calls
/// emit(i0, count, out, ld) for each group of output rows (out: b2_e + post W2_e, float).
template <class Act, class Emit>
void tile_rows(const expert_weights<float>& w, const expert_tiles& t,
               const layer_buffers<float>& b, const tile_scratch& s, index_t e, index_t r0, index_t rows,
               Emit&& emit) noexcept {
  const index_t d = w.d_model(), n = w.width(), fn = width_factor<Act> * n;
  // x rows in bf16 (rounded once per call, not once per slot), zero rows up to the 16-row tiles.
  for (index_t i = 0; i < rows; ++i) {
    const bf16_t* src = b.x_bf16 + b.sorted_token[r0 + i] * s.kp1;
    std::copy(src, src + s.kp1, s.a1 + i * s.kp1);
  }
  std::fill(s.a1 + rows * s.kp1, s.a1 + round_up(rows, amx_rows) * s.kp1, bf16_t{});
  // product (bf16 tiles): pre = b1_e + x[sorted rows] W1_e
  amx_product(round_up(rows, amx_rows) / amx_rows, fn, s.kp1 / amx_k_chunk, s.a1, s.kp1, t.w1_of(e), t.b1_of(e),
              s.c1, s.ld1);
  activate_rows<Act>(s.c1, s.c1 + fn, rows, n, s.ld1);
  amx_narrow_rows(s.c1 + fn, s.ld1, nullptr, rows, n, s.kp2, s.a2);
  for (index_t i0 = 0; i0 < rows; i0 += tile_output_rows) {
    const index_t count = (std::min)(tile_output_rows, rows - i0);
    // product (bf16 tiles): out = b2_e + post W2_e
    amx_product(round_up(count, amx_rows) / amx_rows, d, s.kp2 / amx_k_chunk, s.a2 + i0 * s.kp2, s.kp2,
                t.w2_of(e), t.b2e_of(e), s.c2, s.ld2);
    emit(i0, count, static_cast<const float*>(s.c2), s.ld2);
  }
}

/// infer's expert products and combine on the tiles (the tiles current for w: the layer
/// refreshes them first). `in_order`: one worker walks the experts in order adding into y;
/// otherwise n_tasks tasks in parallel write b.out, then combine.
template <class Act>
void infer_on_tiles(const context<cpu>& ctx, cpu_isa isa, matrix_view<const float> x, matrix_view<float> y,
                    const expert_weights<float>& w, const expert_tiles& tiles, const layer_buffers<float>& b,
                    index_t n_tasks, bool in_order) noexcept {
  const index_t d = w.d_model(), E = w.num_experts(), kp1 = round_up(d, amx_k_chunk);
  auto narrow_x = [&](index_t t) noexcept { amx_narrow_row(x.row(t), d, kp1, b.x_bf16 + t * kp1); };
  if (in_order) {
    for (index_t t = 0; t < x.rows; ++t) narrow_x(t);
    const float* b2 = w.output_bias_ptr();
    for (index_t i = 0; i < y.rows; ++i) {
      float* yt = y.row(i);
      if (b2)
        std::copy(b2, b2 + d, yt);
      else
        std::fill(yt, yt + d, 0.0f);
    }
    const tile_scratch s = carve_tile_scratch(b.bwd.get(0), d, w.width(), b.hidden_ld);
    amx_begin();
    for (index_t e = 0; e < E; ++e)
      for_each_row_block(b.expert_offsets[e], b.expert_offsets[e + 1], [&](index_t r0, index_t rows) noexcept {
        tile_rows<Act>(w, tiles, b, s, e, r0, rows, [&](index_t i0, index_t count, const float* out, index_t ld) noexcept {
          for (index_t i = 0; i < count; ++i) {
            const index_t r = r0 + i0 + i;
            scaled_add<float>(isa, d, b.plan.weight[b.sorted_slot[r]], out + i * ld, y.row(b.sorted_token[r]));
          }
        });
      });
    amx_end();
    return;
  }
  for_each_token(ctx, x.rows, narrow_x);
  ctx.parallel_for(n_tasks, [&](index_t task, index_t worker) noexcept {
    const task_rows tr = rows_of_task(b, task);
    const tile_scratch s = carve_tile_scratch(b.bwd.get(worker), d, w.width(), b.hidden_ld);
    amx_begin();
    tile_rows<Act>(w, tiles, b, s, tr.expert, tr.begin, tr.rows,
                   [&](index_t i0, index_t count, const float* out, index_t ld) noexcept {
                     for (index_t i = 0; i < count; ++i)
                       std::copy(out + i * ld, out + i * ld + d, b.out + (tr.begin + i0 + i) * d);
                   });
    amx_end();
  });
  combine(ctx, isa, y, b, d, w.output_bias_ptr());
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
