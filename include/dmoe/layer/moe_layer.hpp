// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The one MoE layer type, declared once and specialised per backend (the CUTLASS way): a user
/// switches backend by changing the Backend argument. cpu/moe_layer.hpp holds the dmoe::cpu
/// specialisation; cuda/ the dmoe::cuda one. What both share (configuration, checks, FLOPs) is
/// in layer/spec.hpp.

#include <cstddef>
#include <type_traits>

#include "../core/backend.hpp"
#include "../core/extents.hpp"
#include "../experts/activation.hpp"
#include "../routing/options.hpp"
#include "../routing/routers.hpp"
#include "spec.hpp"

DMOE_NAMESPACE_BEGIN

namespace detail {
template <class>
inline constexpr bool always_false = false;

/// The checks every backend's layer starts with; each message says what to do.
template <class T, class Policy, class Activation, std::size_t Experts, std::size_t Width>
struct layer_checks {
  static_assert(is_routing_policy_v<Policy>,
                "dmoe::moe_layer: Policy must be dmoe::top_k, dmoe::dynamic_k or dmoe::top_any");
  static_assert(is_activation_v<Activation>,
                "dmoe::moe_layer: Activation must be dmoe::relu, gelu_erf, gelu_tanh, silu, swiglu or geglu "
                "(or a type with the same members)");
  static_assert(Experts == dynamic_extent || (Experts >= 1 && Experts < (std::size_t(1) << 31)),
                "dmoe::moe_layer: Experts must be dmoe::dynamic_extent or in [1, 2^31)");
  static_assert(Width == dynamic_extent || Width >= 1,
                "dmoe::moe_layer: Width must be dmoe::dynamic_extent or at least 1");
};
}  // namespace detail

/// Mixture-of-Experts layer.
/// \tparam T          scalar type (CPU: float or double)
/// \tparam Backend    dmoe::cpu or dmoe::cuda
/// \tparam Policy     dmoe::top_k, dmoe::dynamic_k or dmoe::top_any
/// \tparam Activation dmoe::relu, gelu_erf, gelu_tanh, silu, swiglu, geglu
/// \tparam Experts    expert count, or dmoe::dynamic_extent (given in moe_config)
/// \tparam Width      expert width n, or dmoe::dynamic_extent
template <class T, class Backend, class Policy, class Activation, std::size_t Experts = dynamic_extent,
          std::size_t Width = dynamic_extent>
class moe_layer {
  static_assert(detail::always_false<Backend>,
                "dmoe::moe_layer: Backend must be dmoe::cpu (include <dmoe/dmoe.hpp>) or dmoe::cuda (include "
                "<dmoe/cuda.cuh> from a .cu translation unit compiled by nvcc)");
};

DMOE_NAMESPACE_END  // namespace dmoe
