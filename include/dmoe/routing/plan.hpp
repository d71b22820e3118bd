// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The routing plan: one representation for every policy. Compressed rows over tokens:
/// token t's slots are [token_offsets[t], token_offsets[t+1]); slot s sends the token to
/// expert[s] with combine weight weight[s]. Within a token, slots are in ascending expert id.
/// Top-k is the case token_offsets[t] = k t; dynamic-k and top-any give each token its own k,
/// zero included where the policy allows it.

#include <cstdint>

#include "../core/config.hpp"

DMOE_NAMESPACE_BEGIN

/// Non-owning routing plan (storage usually lives in a layer's workspace).
template <class T>
struct routing_plan {
  index_t tokens = 0;
  index_t num_experts = 0;
  index_t* token_offsets = nullptr;  ///< (tokens + 1)
  std::int32_t* expert = nullptr;    ///< (nnz)
  T* weight = nullptr;               ///< (nnz)

  /// Total number of (token, expert) slots.
  index_t nnz() const noexcept { return tokens > 0 ? token_offsets[tokens] : 0; }
  /// Number of experts token t runs.
  index_t k(index_t t) const noexcept { return token_offsets[t + 1] - token_offsets[t]; }
};

DMOE_NAMESPACE_END  // namespace dmoe
