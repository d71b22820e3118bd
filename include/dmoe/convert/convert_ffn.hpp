// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Dense FFN -> MoE layer (docs/algorithms.md section 5.2): expert e receives the neurons the
/// split gives it, in the split's order. A neuron's W1 column, b1 entry and W2 row move together
/// (gated FFNs: its gate and up columns and both bias entries); the dense b2 becomes the layer's
/// shared output bias, added once per token; there is no per-expert output bias. The router is
/// left zero: it is fitted separately (convert/router_fit.hpp). With every expert selected at
/// weight 1 (dynamic_k, tau = 0) the layer computes the dense FFN, up to the summation order.
/// Cold path: allocates, throws dmoe::error on a split that does not fit the FFN.

#include "../cpu/dense_ffn.hpp"
#include "../cpu/moe_layer.hpp"
#include "split.hpp"

DMOE_NAMESPACE_BEGIN

/// Builds the MoE layer of `dense` split by `split`.
/// \tparam Policy dmoe::dynamic_k (the D2DMoE conversion), dmoe::top_k or dmoe::top_any
/// \param opt the policy's options (e.g. dynamic_k_options{tau})
/// \param router_hidden hidden width of the dynamic_k router (ignored by other policies)
/// Usage: `auto moe = dmoe::to_moe<dmoe::dynamic_k>(dense, split, {0.5});`
template <class Policy, class Act, class T>
moe_layer<T, cpu, Policy, Act> to_moe(const dense_ffn<T, Act>& dense, const neuron_split& split,
                                      const typename Policy::options& opt, index_t router_hidden = 128) {
  const index_t d = dense.d_model(), F = dense.hidden();
  validate_split(split, F, "to_moe");
  moe_config cfg;
  cfg.d_model = d;
  cfg.num_experts = split.num_experts;
  cfg.expert_width = split.width;
  cfg.hidden_bias = true;
  cfg.expert_bias = false;
  cfg.output_bias = true;
  cfg.router_hidden = router_hidden;
  moe_layer<T, cpu, Policy, Act> layer(cfg, opt);
  auto& ex = layer.experts();
  const index_t n = split.width;
  for (index_t e = 0; e < split.num_experts; ++e) {
    auto w1 = ex.w1(e);
    auto b1 = ex.b1(e);
    auto w2 = ex.w2(e);
    for (index_t j = 0; j < n; ++j) {
      const index_t i = split.neuron(e, j);
      w1.col(j) = dense.w1().col(i);
      b1(j) = dense.b1()(i);
      if constexpr (Act::gated) {
        w1.col(n + j) = dense.w1().col(F + i);
        b1(n + j) = dense.b1()(F + i);
      }
      w2.row(j) = dense.w2().row(i);
    }
  }
  ex.output_bias() = dense.b2();
  return layer;
}

DMOE_NAMESPACE_END  // namespace dmoe
