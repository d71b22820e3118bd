// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Per-token selection rules of the three policies (docs/algorithms.md sections 2-4), written
/// once as plain functions over one token's scores so that every backend applies the same rule.
/// Each writes the selected experts in ascending id with their combine weights and returns how
/// many it selected, or -1 when a score it must compare is NaN or infinite.

#include <cmath>
#include <cstdint>

#include "../core/config.hpp"

DMOE_NAMESPACE_BEGIN namespace detail {

/// Keeps `best` (size <= k) ordered by (score desc, id asc); inserts id if it ranks.
template <class T>
DMOE_HOST_DEVICE inline void rank_insert(std::int32_t* best, index_t& count, index_t k, const T* score,
                                         std::int32_t id) noexcept {
  // A later id only beats an equal score if it is strictly greater: ties keep the lower id.
  index_t pos = count;
  while (pos > 0 && score[best[pos - 1]] < score[id]) --pos;
  if (pos >= k) return;
  index_t last = count < k ? count : k - 1;
  for (index_t i = last; i > pos; --i) best[i] = best[i - 1];
  best[pos] = id;
  if (count < k) ++count;
}

/// Sorts a short id list ascending (insertion sort; k is small).
DMOE_HOST_DEVICE inline void sort_ids(std::int32_t* ids, index_t n) noexcept {
  for (index_t i = 1; i < n; ++i) {
    std::int32_t v = ids[i];
    index_t j = i;
    for (; j > 0 && ids[j - 1] > v; --j) ids[j] = ids[j - 1];
    ids[j] = v;
  }
}

/// top-k over a softmax gate. `scores` holds the logits on entry and the probabilities p on exit.
/// Writes log-sum-exp of the logits to *lse.
template <class T>
DMOE_HOST_DEVICE inline index_t select_top_k(T* scores, index_t num_experts, index_t k, bool renormalize,
                                             std::int32_t* out_expert, T* out_weight, T* lse) noexcept {
  T zmax = scores[0];
  for (index_t e = 0; e < num_experts; ++e) {
    if (!std::isfinite(scores[e])) return -1;
    zmax = scores[e] > zmax ? scores[e] : zmax;
  }
  T sum = 0;
  for (index_t e = 0; e < num_experts; ++e) {
    scores[e] = std::exp(scores[e] - zmax);
    sum += scores[e];
  }
  for (index_t e = 0; e < num_experts; ++e) scores[e] /= sum;
  *lse = zmax + std::log(sum);
  index_t count = 0;
  for (index_t e = 0; e < num_experts; ++e) rank_insert(out_expert, count, k, scores, static_cast<std::int32_t>(e));
  sort_ids(out_expert, count);
  T selected = 0;
  for (index_t i = 0; i < count; ++i) selected += scores[out_expert[i]];
  for (index_t i = 0; i < count; ++i)
    out_weight[i] = renormalize ? scores[out_expert[i]] / selected : scores[out_expert[i]];
  return count;
}

/// dynamic-k (D2DMoE): expert e runs iff r_e >= tau * max_j r_j; optional cap k_max (> 0) keeps
/// the k_max largest r among those (ties: lower id). Weights are 1. The arg-max always runs.
template <class T>
DMOE_HOST_DEVICE inline index_t select_dynamic_k(const T* r, index_t num_experts, T tau, index_t k_max,
                                                 std::int32_t* out_expert, T* out_weight) noexcept {
  T rmax = 0;
  for (index_t e = 0; e < num_experts; ++e) {
    if (!std::isfinite(r[e])) return -1;
    rmax = r[e] > rmax ? r[e] : rmax;
  }
  const T threshold = tau * rmax;
  index_t count = 0;
  if (k_max > 0) {
    for (index_t e = 0; e < num_experts; ++e)
      if (r[e] >= threshold) rank_insert(out_expert, count, k_max, r, static_cast<std::int32_t>(e));
    sort_ids(out_expert, count);
  } else {
    for (index_t e = 0; e < num_experts; ++e)
      if (r[e] >= threshold) out_expert[count++] = static_cast<std::int32_t>(e);
  }
  for (index_t i = 0; i < count; ++i) out_weight[i] = T(1);
  return count;
}

/// top-any (DynMoE): expert e fires iff active[e] and cos_e > g_e (strict); weight 1/K.
/// With none fired: nothing in training; in inference the active expert with the highest cos
/// (ties: lower id), weight 1. The caller guarantees at least one active expert.
template <class T>
DMOE_HOST_DEVICE inline index_t select_top_any(const T* cos, const T* g, const std::uint8_t* active,
                                               index_t num_experts, bool training, std::int32_t* out_expert,
                                               T* out_weight) noexcept {
  index_t count = 0;
  index_t best = -1;
  for (index_t e = 0; e < num_experts; ++e) {
    if (!active[e]) continue;
    if (std::isnan(cos[e])) return -1;
    if (cos[e] > g[e]) out_expert[count++] = static_cast<std::int32_t>(e);
    if (best < 0 || cos[e] > cos[best]) best = e;
  }
  if (count == 0 && !training && best >= 0) {
    out_expert[0] = static_cast<std::int32_t>(best);
    out_weight[0] = T(1);
    return 1;
  }
  for (index_t i = 0; i < count; ++i) out_weight[i] = T(1) / static_cast<T>(count);
  return count;
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail
