// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// How the CPU backend cuts work into tasks: a fixed number of rows per task (never derived
/// from the thread count, so results are bitwise identical for any executor), per-worker scratch
/// slices, and the small row helpers every room shares.

#include <algorithm>

#include "../core/config.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Tokens (or slots) per task. Fixed, never derived from the thread count, so results are
/// bitwise identical for any number of threads.
inline constexpr index_t rows_per_task = 128;

/// Tasks covering `rows` rows, at most rows_per_task each.
/// (Written so that it cannot overflow: layouts size absurd slot counts before refusing them.)
inline constexpr index_t task_count(index_t rows) noexcept {
  return rows / rows_per_task + (rows % rows_per_task != 0 ? 1 : 0);
}

/// First row of task i of the `tasks` = task_count(rows) tasks over `rows` rows: an even cut (sizes
/// differ by at most one), so an expert with 130 rows runs two tasks of 65, not 128 and a 2-row
/// sliver whose every B load feeds 2 FMAs. A function of the row count only, never of the threads.
inline constexpr index_t task_row_begin(index_t rows, index_t tasks, index_t i) noexcept {
  return rows / tasks * i + rows % tasks * i / tasks;
}

/// Calls f(r0, rows) for the even cut (task_row_begin) of sorted rows [begin, end) into blocks of
/// at most rows_per_task, in order.
template <class F>
void for_each_row_block(index_t begin, index_t end, F&& f) {
  const index_t rows = end - begin, tasks = task_count(rows);
  for (index_t i = 0; i < tasks; ++i) {
    const index_t r0 = task_row_begin(rows, tasks, i);
    f(begin + r0, task_row_begin(rows, tasks, i + 1) - r0);
  }
}

/// Per-worker scratch: a slice per worker id, each 64-byte aligned.
template <class T>
struct worker_scratch {
  T* base = nullptr;
  index_t stride = 0;  ///< elements per worker (multiple of 16)
  T* get(index_t worker) const noexcept { return base + worker * stride; }
};

/// Rounds an element count up to a multiple of 16 (64 bytes of float: worker slices stay aligned).
inline index_t round16(index_t v) noexcept { return (v + 15) / 16 * 16; }

/// Sets `rows` rows of `cols` values (row stride ld) to `bias`, or to zero without one: the
/// accumulator a product then adds onto.
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

/// Runs f(t) for every token, in tasks of rows_per_task consecutive tokens.
template <class Ctx, class F>
void for_each_token(const Ctx& ctx, index_t tokens, F&& f) noexcept {
  ctx.parallel_for(task_count(tokens), [&](index_t task, index_t) noexcept {
    const index_t t0 = task * rows_per_task, t1 = (std::min)(tokens, t0 + rows_per_task);
    for (index_t t = t0; t < t1; ++t) f(t);
  });
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
