// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The format the CPU kernels read the expert matrices (W1, W2) in: a layer option
/// (moe_layer<float, cpu>::set_weight_storage, docs/design.md "16-bit weight storage").

#include <cstring>
#include <initializer_list>

DMOE_NAMESPACE_BEGIN

/// How the expert products read W1 and W2. The float weights stay the master copy (accessors,
/// optimizers, IO); with bf16 or f16 the kernels read a copy rounded to nearest even, widened
/// exactly in registers, with float accumulation: forward, infer and backward then give the bits
/// of a float layer whose W1 and W2 hold the rounded values. Biases and routers stay float.
enum class weight_storage : int {
  f32 = 0,   ///< float (the default)
  bf16 = 1,  ///< bfloat16: float's range, 8 significant bits; half the bytes per token
  f16 = 2    ///< IEEE binary16: 11 significant bits, finite only up to 65504 (larger become inf)
};

/// "f32", "bf16" or "f16".
inline const char* to_string(weight_storage s) noexcept {
  switch (s) {
    case weight_storage::f32: return "f32";
    case weight_storage::bf16: return "bf16";
    case weight_storage::f16: return "f16";
  }
  return "unknown";
}

/// Parses to_string's names; false (out untouched) for anything else.
inline bool parse_weight_storage(const char* name, weight_storage& out) noexcept {
  if (name == nullptr) return false;
  for (weight_storage s : {weight_storage::f32, weight_storage::bf16, weight_storage::f16})
    if (std::strcmp(name, to_string(s)) == 0) {
      out = s;
      return true;
    }
  return false;
}

DMOE_NAMESPACE_END  // namespace dmoe
