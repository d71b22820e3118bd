// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Routing statistics of one call: how many experts each token ran, how many tokens each expert
/// got, and the executed FLOPs (docs/algorithms.md section 6). The caller constructs a
/// routing_stats once for a given expert count; forward fills it without allocating.

#include <algorithm>
#include <numeric>
#include <vector>

#include "../core/config.hpp"
#include "plan.hpp"

DMOE_NAMESPACE_BEGIN

/// Per-call routing statistics. FLOPs count multiply-adds of the matrix products as 2 each;
/// biases, activations, softmax and norms are not counted.
struct routing_stats {
  std::vector<index_t> k_histogram;        ///< (num_experts + 1): tokens that ran k experts
  std::vector<index_t> tokens_per_expert;  ///< (num_experts)
  index_t tokens = 0;
  index_t slots = 0;          ///< total (token, expert) pairs of the last call
  /// Largest `slots` of any call recorded into this object (never reset by record): the
  /// workspace_bounds::max_slots a workload needs. Set it to 0 to start a new measurement.
  index_t max_slots_seen = 0;
  double router_flops = 0;    ///< router products over all tokens
  double expert_flops = 0;    ///< executed expert products: slots * 2 d n (2, or 3 if gated)
  double dense_flops = 0;     ///< the dense FFN of hidden E*n on the same tokens

  routing_stats() = default;
  explicit routing_stats(index_t num_experts)
      : k_histogram(static_cast<std::size_t>(num_experts + 1), 0),
        tokens_per_expert(static_cast<std::size_t>(num_experts), 0) {}

  index_t num_experts() const noexcept { return index_t(tokens_per_expert.size()); }
  /// Mean experts per token.
  double mean_k() const noexcept { return tokens ? double(slots) / double(tokens) : 0.0; }
  /// Active fraction f = executed expert FLOPs / dense FLOPs.
  double active_fraction() const noexcept { return dense_flops > 0 ? expert_flops / dense_flops : 0.0; }
  /// (router + expert FLOPs) / dense FLOPs.
  double executed_fraction() const noexcept {
    return dense_flops > 0 ? (router_flops + expert_flops) / dense_flops : 0.0;
  }

  /// Folds the current `slots` into max_slots_seen (record calls it; backends that fill the
  /// fields themselves call it too).
  void note_slots() noexcept { max_slots_seen = slots > max_slots_seen ? slots : max_slots_seen; }

  /// Fills the statistics from a plan. `flops_per_slot` = 2 d n (2 or 3); `router_per_token` as
  /// the router reports. No allocation if the vectors already have num_experts entries.
  template <class T>
  void record(const routing_plan<T>& plan, double flops_per_slot, double router_per_token) noexcept {
    std::fill(k_histogram.begin(), k_histogram.end(), 0);
    std::fill(tokens_per_expert.begin(), tokens_per_expert.end(), 0);
    tokens = plan.tokens;
    slots = plan.nnz();
    note_slots();
    for (index_t t = 0; t < plan.tokens; ++t) ++k_histogram[static_cast<std::size_t>(plan.k(t))];
    for (index_t s = 0; s < slots; ++s) ++tokens_per_expert[static_cast<std::size_t>(plan.expert[s])];
    router_flops = router_per_token * double(tokens);
    expert_flops = flops_per_slot * double(slots);
    dense_flops = flops_per_slot * double(plan.num_experts) * double(tokens);
  }
};

DMOE_NAMESPACE_END  // namespace dmoe
