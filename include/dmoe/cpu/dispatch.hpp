// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// CPU dispatch: a counting sort of the plan's slots into expert-major order, stable in token
/// order (so each expert's rows are in token order, whatever the thread count), then the task
/// list of cpu/tasks.hpp: up to rows_per_task sorted rows of one expert per task.

#include <algorithm>

#include "../core/config.hpp"
#include "layout.hpp"
#include "tasks.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Appends the tasks of expert e, whose sorted rows are [begin, end) (the even cut of
/// for_each_row_block), to b's task list after its first n_tasks entries, and writes the end
/// sentinel: task t ends where task t + 1 begins. Returns the new number of tasks.
template <class T>
index_t append_expert_tasks(layer_buffers<T>& b, index_t e, index_t begin, index_t end, index_t n_tasks) noexcept {
  for_each_row_block(begin, end, [&](index_t r0, index_t) noexcept {
    b.task_expert[n_tasks] = e;
    b.task_begin[n_tasks] = r0;
    ++n_tasks;
  });
  b.task_begin[n_tasks] = end;
  return n_tasks;
}

/// Fills expert_offsets, sorted_token, sorted_slot, slot_pos and the task list from b.plan.
/// Returns the number of tasks.
template <class T>
index_t dispatch(layer_buffers<T>& b, index_t E) noexcept {
  const index_t tokens = b.plan.tokens;
  index_t* off = b.expert_offsets;
  std::fill(off, off + E + 1, index_t{0});
  const index_t nnz = b.plan.nnz();
  for (index_t s = 0; s < nnz; ++s) ++off[b.plan.expert[s] + 1];
  for (index_t e = 0; e < E; ++e) off[e + 1] += off[e];
  // Reuse task_begin as the per-expert cursor (it has >= E entries), then build the tasks.
  index_t* cursor = b.task_begin;
  std::copy(off, off + E, cursor);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s) {
      const index_t pos = cursor[b.plan.expert[s]]++;
      b.sorted_token[pos] = t;
      b.sorted_slot[pos] = s;
      b.slot_pos[s] = pos;
    }
  index_t n_tasks = 0;
  for (index_t e = 0; e < E; ++e) n_tasks = append_expert_tasks(b, e, off[e], off[e + 1], n_tasks);
  return n_tasks;
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
