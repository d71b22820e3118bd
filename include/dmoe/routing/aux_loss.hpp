// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Auxiliary router losses (docs/algorithms.md sections 2 and 4). Each is its own term: a layer
/// reports their values for the last forward (aux_losses) and backward adds the gradient of
/// sum_i weight_i * loss_i when given the weights. Terms of another policy are ignored.

#include <cmath>

#include "../core/status.hpp"

DMOE_NAMESPACE_BEGIN

/// Values of the auxiliary losses, or their weights in the total loss.
struct aux_losses {
  // top_k
  double load_balance = 0;  ///< E * sum_e f_e P_e (f_e: share of slots, no gradient; P_e: mean p_e)
  double z_loss = 0;        ///< mean_t (logsumexp z_t)^2
  // top_any (DynMoE)
  double diversity = 0;   ///< || (W^T W - I) over active x active ||_F, W with unit columns
  double simplicity = 0;  ///< (1/E) sum over all slots of |w_e| (raw columns)
  double balance = 0;     ///< E^2 mean_e(me_e ce_e) over tokens with K > 0
  double efficiency = 0;  ///< mean of a over tokens x slots

  /// sum of weight_i * value_i.
  double weighted_sum(const aux_losses& w) const noexcept {
    return w.load_balance * load_balance + w.z_loss * z_loss + w.diversity * diversity + w.simplicity * simplicity +
           w.balance * balance + w.efficiency * efficiency;
  }
};

/// Checks a set of auxiliary-loss *weights*: each must be finite and >= 0 (a NaN or infinite
/// weight turns every router gradient NaN; a negative one rewards what the term penalises).
/// Returns an error status naming the first bad weight, ok otherwise.
inline status check_aux_weights(const aux_losses& w) noexcept {
  const struct {
    const char* name;
    double value;
  } terms[] = {{"load_balance", w.load_balance}, {"z_loss", w.z_loss},   {"diversity", w.diversity},
               {"simplicity", w.simplicity},     {"balance", w.balance}, {"efficiency", w.efficiency}};
  for (const auto& t : terms)
    if (!(std::isfinite(t.value) && t.value >= 0.0))
      return status::failure(errc::invalid_argument, "aux_losses: weight %s must be finite and >= 0, got %g", t.name,
                             t.value);
  return {};
}

DMOE_NAMESPACE_END  // namespace dmoe
