// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Routing policies without Eigen: the policy tags (the layer's template argument), their
/// options, and the rules on those options (validation, most experts per token). The routers
/// (routers.hpp, host parameters in Eigen) and both backends' layers call these, so there is one
/// copy of each rule and each message.

#include <type_traits>

#include "../core/config.hpp"
#include "../core/status.hpp"

DMOE_NAMESPACE_BEGIN

/// Options of the softmax top-k router.
struct top_k_options {
  index_t k = 2;            ///< experts per token, in [1, num_experts]
  bool renormalize = true;  ///< weights p_e / sum of selected p (true) or p_e (false)
};

/// Options of the D2DMoE dynamic-k router.
struct dynamic_k_options {
  double tau = 0.5;   ///< in [0, 1]: expert e runs iff r_e >= tau * max r (0 = all, 1 = best only)
  index_t k_max = 0;  ///< if > 0, keep at most the k_max largest r among the selected
};

/// Options of the DynMoE top-any router.
struct top_any_options {
  /// Training: a token that fires nothing gets no expert. Inference: it falls back to the active
  /// expert with the highest cosine score.
  bool training = false;
};

template <class T>
class top_k_router;
template <class T>
class dynamic_k_router;
template <class T>
class top_any_router;

/// Routing policy tags, the layer's template argument; each names its router and options.
struct top_k {
  template <class T>
  using router = top_k_router<T>;
  using options = top_k_options;
  static constexpr const char* name = "top_k";
};
struct dynamic_k {
  template <class T>
  using router = dynamic_k_router<T>;
  using options = dynamic_k_options;
  static constexpr const char* name = "dynamic_k";
};
struct top_any {
  template <class T>
  using router = top_any_router<T>;
  using options = top_any_options;
  static constexpr const char* name = "top_any";
};

template <class P>
inline constexpr bool is_routing_policy_v =
    std::is_same_v<P, top_k> || std::is_same_v<P, dynamic_k> || std::is_same_v<P, top_any>;

namespace detail {

/// Throws dmoe::error(invalid_argument) naming `who` and the bad value.
inline void check_options(const char* who, index_t num_experts, const top_k_options& opt) {
  if (opt.k < 1 || opt.k > num_experts)
    raisef(errc::invalid_argument, "%s: k must be in [1, num_experts = %td], got k = %td", who, num_experts, opt.k);
}
inline void check_options(const char* who, index_t num_experts, const dynamic_k_options& opt) {
  if (!(opt.tau >= 0.0 && opt.tau <= 1.0))
    raisef(errc::invalid_argument, "%s: tau must be in [0, 1], got %g", who, opt.tau);
  if (opt.k_max < 0 || opt.k_max > num_experts)
    raisef(errc::invalid_argument, "%s: k_max must be 0 (no cap) or in [1, num_experts = %td], got %td", who,
           num_experts, opt.k_max);
}
inline void check_options(const char*, index_t, const top_any_options&) noexcept {}

/// Most experts one token can get under the options.
constexpr index_t max_k(index_t, const top_k_options& opt) noexcept { return opt.k; }
constexpr index_t max_k(index_t num_experts, const dynamic_k_options& opt) noexcept {
  return opt.k_max > 0 ? opt.k_max : num_experts;
}
constexpr index_t max_k(index_t num_experts, const top_any_options&) noexcept { return num_experts; }

/// Whether every token gets exactly max_k slots (top-k): its plan is known before routing.
template <class Policy>
inline constexpr bool fixed_k_v = std::is_same_v<Policy, top_k>;

}  // namespace detail
DMOE_NAMESPACE_END  // namespace dmoe
