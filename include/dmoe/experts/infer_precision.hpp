// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// How far infer() may round its operands: a layer option (moe_layer<float, cpu>::
/// set_infer_precision, docs/design.md "bf16 tiles for inference").

#include <cstring>
#include <initializer_list>

DMOE_NAMESPACE_BEGIN

/// What infer() computes with. exact (the default): the bits of forward. bf16: where the CPU has
/// bf16 matrix tiles (Intel AMX-BF16: dmoe::cpu_has_bf16_tiles()), infer rounds the expert
/// inputs, the hidden activations and W1, W2 to bf16 (to nearest even) and multiplies them on the
/// tiles with float accumulation, several times faster at batch sizes where the products are
/// compute bound; the router, biases, activation and combine stay float. Results then differ from
/// forward's by about bf16's precision (8 significant bits per operand), but stay deterministic:
/// a token's output does not depend on its batch or the thread count. Where there are no tiles
/// (or set_cpu_isa / DMOE_CPU_ISA caps the kernels below avx512), bf16 is a permission not taken:
/// infer stays exact. Like PyTorch's set_float32_matmul_precision("medium"), it is opt-in.
enum class infer_precision : int {
  exact = 0,  ///< infer gives forward's bits
  bf16 = 1    ///< infer may multiply in bf16 on the CPU's matrix tiles
};

/// "exact" or "bf16".
inline const char* to_string(infer_precision p) noexcept {
  switch (p) {
    case infer_precision::exact: return "exact";
    case infer_precision::bf16: return "bf16";
  }
  return "unknown";
}

/// Parses to_string's names; false (out untouched) for anything else.
inline bool parse_infer_precision(const char* name, infer_precision& out) noexcept {
  if (name == nullptr) return false;
  for (infer_precision p : {infer_precision::exact, infer_precision::bf16})
    if (std::strcmp(name, to_string(p)) == 0) {
      out = p;
      return true;
    }
  return false;
}

DMOE_NAMESPACE_END  // namespace dmoe
