// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The backend-neutral specification of a layer: configuration and option rules, the argument
/// checks of forward and backward, FLOP counts and max_k. Both backends' moe_layer call these,
/// so each rule and each message exists once; a backend adds only what is its own (workspace
/// layout, index width limits). Views are template parameters (anything with rows, cols, data
/// and row_stride), so this file needs neither Eigen nor CUDA.

#include <cstddef>
#include <type_traits>

#include "../core/checked.hpp"
#include "../core/config.hpp"
#include "../core/extents.hpp"
#include "../core/status.hpp"
#include "../routing/options.hpp"
#include "../routing/stats.hpp"

DMOE_NAMESPACE_BEGIN

/// Runtime shape of a layer. num_experts / expert_width must match static extents if given.
struct moe_config {
  index_t d_model = 0;
  index_t num_experts = 0;
  index_t expert_width = 0;  ///< n, hidden units per expert
  bool hidden_bias = true;   ///< b1 in every expert
  bool expert_bias = false;  ///< per-expert output bias b2_e (classic MoE layers)
  bool output_bias = true;   ///< shared output bias b2 added once per token (converted layers)
  index_t router_hidden = 128;  ///< dynamic_k router hidden width (ignored by other policies)
};

namespace detail {

/// What a backend's index types allow (the CUDA kernels index with int32).
struct backend_limits {
  const char* who;          ///< "moe_layer" or "moe_layer<cuda>": the prefix of every message
  index_t max_d_model;      ///< inclusive
  index_t max_experts;      ///< inclusive
  index_t max_width;        ///< inclusive
};
// CPU: d_model and width up to 2^40 keep every per-task product (128 rows x (d + n + f n)) far from
// overflow; far beyond any real layer.
inline constexpr backend_limits cpu_limits{"moe_layer", index_t{1} << 40, INT32_MAX, index_t{1} << 40};
inline constexpr backend_limits cuda_limits{"moe_layer<cuda>", INT32_MAX, INT32_MAX - 1, INT32_MAX / 2};

template <class Policy, class Activation, std::size_t Experts, std::size_t Width>
struct layer_spec {
  using options = typename Policy::options;
  static constexpr index_t width_factor = Activation::gated ? 2 : 1;

  /// The configuration if it is valid for the layer type and the backend; else throws
  /// dmoe::error(invalid_argument) naming the field, its value and what is allowed.
  static moe_config checked_config(const moe_config& c, const backend_limits& lim) {
    if (c.d_model <= 0 || c.d_model > lim.max_d_model)
      raisef(errc::invalid_argument, "%s: config.d_model must be in [1, %td], got %td", lim.who, lim.max_d_model,
             c.d_model);
    if (!extent_value<Experts>::accepts(c.num_experts) || c.num_experts > lim.max_experts)
      raisef(errc::invalid_argument,
             "%s: config.num_experts = %td does not fit the layer's Experts extent (%s, at most %td)", lim.who,
             c.num_experts, Experts == dynamic_extent ? "dynamic: must be positive" : "static", lim.max_experts);
    if (!extent_value<Width>::accepts(c.expert_width) || c.expert_width > lim.max_width)
      raisef(errc::invalid_argument,
             "%s: config.expert_width = %td does not fit the layer's Width extent (%s, at most %td)", lim.who,
             c.expert_width, Width == dynamic_extent ? "dynamic: must be positive" : "static", lim.max_width);
    if (std::is_same_v<Policy, dynamic_k> && c.router_hidden <= 0)
      raisef(errc::invalid_argument, "%s: config.router_hidden must be positive, got %td", lim.who,
             c.router_hidden);
    // The expert tensors' sizes: refused with the numbers before anything is allocated.
    checked_size w1(c.num_experts);
    w1.mul(c.d_model).mul(width_factor).mul(c.expert_width);
    if (!w1.ok())
      raisef(errc::invalid_argument,
             "%s: config num_experts x d_model x expert_width = %td x %td x %td%s does not fit in a signed 64-bit "
             "element count",
             lim.who, c.num_experts, c.d_model, c.expert_width, Activation::gated ? " x 2 (gated)" : "");
    if (std::is_same_v<Policy, dynamic_k>) {
      checked_size r(c.router_hidden);
      r.mul(c.d_model > c.num_experts ? c.d_model : c.num_experts);
      if (!r.ok())
        raisef(errc::invalid_argument, "%s: config.router_hidden = %td x d_model %td / num_experts %td overflows",
               lim.who, c.router_hidden, c.d_model, c.num_experts);
    }
    return c;
  }

  /// The router's rules for the options (one copy, in routing/options.hpp).
  static void check_options(const moe_config& c, const options& opt) {
    detail::check_options(router_name(), c.num_experts, opt);
  }
  static constexpr const char* router_name() noexcept {
    if constexpr (std::is_same_v<Policy, top_k>)
      return "top_k_router";
    else if constexpr (std::is_same_v<Policy, dynamic_k>)
      return "dynamic_k_router";
    else
      return "top_any_router";
  }

  static index_t max_k(const moe_config& c, const options& opt) noexcept { return detail::max_k(c.num_experts, opt); }

  /// Multiply-add FLOPs of one (token, expert) slot: 2 d n (2, or 3 if gated).
  static double flops_per_slot(const moe_config& c) noexcept {
    return 2.0 * double(c.d_model) * double(c.expert_width) * (Activation::gated ? 3.0 : 2.0);
  }
  /// Router multiply-add FLOPs per token (bias, softmax, norms not counted).
  static double router_flops_per_token(const moe_config& c) noexcept {
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      return 2.0 * double(c.d_model) * double(c.router_hidden) + 2.0 * double(c.router_hidden) * double(c.num_experts);
    else
      return 2.0 * double(c.d_model) * double(c.num_experts);
  }

  /// forward's argument checks (shapes, pointers, strides, aliasing, statistics); `who` is e.g.
  /// "moe_layer::forward".
  template <class X, class Y>
  static status check_forward(const char* who, const moe_config& c, const X& x, const Y& y,
                              const routing_stats* stats) noexcept {
    const index_t d = c.d_model;
    if (x.cols != d)
      return status::failure(errc::invalid_argument, "%s: x is (%td x %td), expected %td columns (d_model)", who,
                             x.rows, x.cols, d);
    if (y.rows != x.rows || y.cols != d)
      return status::failure(errc::invalid_argument,
                             "%s: y is (%td x %td), expected (%td x %td) to match x (tokens x d_model)", who, y.rows,
                             y.cols, x.rows, d);
    if (x.rows < 0) return status::failure(errc::invalid_argument, "%s: x has %td rows", who, x.rows);
    if (x.rows > 0 && (x.data == nullptr || y.data == nullptr))
      return status::failure(errc::invalid_argument, "%s: %s is a null pointer with %td rows", who,
                             x.data == nullptr ? "x" : "y", x.rows);
    if (x.row_stride < d || y.row_stride < d)
      return status::failure(errc::invalid_argument, "%s: row strides must be >= d_model = %td, got x %td, y %td", who,
                             d, x.row_stride, y.row_stride);
    if (x.rows > 0 && static_cast<const void*>(x.data) == static_cast<const void*>(y.data))
      return status::failure(errc::invalid_argument, "%s: y must not alias x", who);
    if (stats && stats->num_experts() != c.num_experts)
      return status::failure(errc::invalid_argument,
                             "%s: stats was made for %td experts, the layer has %td (construct "
                             "routing_stats(layer.num_experts()))",
                             who, stats->num_experts(), c.num_experts);
    return {};
  }

  /// backward's shape, pointer, stride and aliasing checks (the gradients' shapes and the
  /// workspace are the backend's).
  template <class X, class DY, class DX>
  static status check_backward(const char* who, const moe_config& c, const X& x, const DY& dy,
                               const DX& dx) noexcept {
    const index_t d = c.d_model;
    if (x.cols != d || dy.cols != d || dx.cols != d || dy.rows != x.rows || dx.rows != x.rows)
      return status::failure(errc::invalid_argument,
                             "%s: x (%td x %td), dy (%td x %td) and dx (%td x %td) must all be (tokens x d_model = "
                             "%td)",
                             who, x.rows, x.cols, dy.rows, dy.cols, dx.rows, dx.cols, d);
    if (x.rows < 0) return status::failure(errc::invalid_argument, "%s: x has %td rows", who, x.rows);
    if (x.rows > 0 && (!x.data || !dy.data || !dx.data))
      return status::failure(errc::invalid_argument, "%s: %s is a null pointer", who,
                             !x.data ? "x" : (!dy.data ? "dy" : "dx"));
    if (x.row_stride < d || dy.row_stride < d || dx.row_stride < d)
      return status::failure(errc::invalid_argument, "%s: row strides must be >= d_model = %td", who, d);
    if (x.rows > 0 && (static_cast<const void*>(dx.data) == static_cast<const void*>(x.data) ||
                       static_cast<const void*>(dx.data) == static_cast<const void*>(dy.data)))
      return status::failure(errc::invalid_argument, "%s: dx must not alias x or dy", who);
    return {};
  }

  /// The slot bound of a workspace: the user's, or the policy's worst case tokens * max_k.
  /// False when the product overflows.
  static bool slot_bound(index_t tokens, index_t max_k, index_t user_bound, index_t& out) noexcept {
    index_t worst = 0;
    if (!mul_ok(tokens, max_k, worst)) return false;
    out = user_bound > 0 && user_bound < worst ? user_bound : worst;
    return true;
  }
};

}  // namespace detail
DMOE_NAMESPACE_END  // namespace dmoe
