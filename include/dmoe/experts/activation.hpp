// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Expert activations. Each is a stateless type with scalar `apply`/`derivative` usable on host
/// and device, and a vectorised in-place form over an Eigen array for the CPU hot path.
/// Gated forms (SwiGLU, GeGLU) compute h = act(x Wg) * (x Wu); their first layer has 2n outputs,
/// laid out [gate (n) | up (n)] per expert.

#include <cmath>

#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>  // Array::erf

#include "../core/config.hpp"

DMOE_NAMESPACE_BEGIN

/// max(x, 0).
struct relu {
  static constexpr bool gated = false;
  static constexpr const char* name = "relu";
  template <class T>
  DMOE_HOST_DEVICE static T apply(T x) noexcept { return x > T(0) ? x : T(0); }
  template <class T>
  DMOE_HOST_DEVICE static T derivative(T x) noexcept { return x > T(0) ? T(1) : T(0); }
  template <class A>
  static void apply_inplace(A&& a) noexcept { a = a.cwiseMax(typename std::decay_t<A>::Scalar(0)); }
};

/// GELU, exact form: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
struct gelu_erf {
  static constexpr bool gated = false;
  static constexpr const char* name = "gelu_erf";
  template <class T>
  DMOE_HOST_DEVICE static T apply(T x) noexcept { return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440))); }
  template <class T>
  DMOE_HOST_DEVICE static T derivative(T x) noexcept {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    return cdf + x * pdf;
  }
  template <class A>
  static void apply_inplace(A&& a) noexcept {
    using S = typename std::decay_t<A>::Scalar;
    a = S(0.5) * a * (S(1) + (a * S(0.70710678118654752440)).erf());
  }
};

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
struct gelu_tanh {
  static constexpr bool gated = false;
  static constexpr const char* name = "gelu_tanh";
  template <class T>
  DMOE_HOST_DEVICE static T apply(T x) noexcept {
    return T(0.5) * x * (T(1) + std::tanh(T(0.79788456080286535588) * (x + T(0.044715) * x * x * x)));
  }
  template <class T>
  DMOE_HOST_DEVICE static T derivative(T x) noexcept {
    const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    const T t = std::tanh(u);
    const T du = T(0.79788456080286535588) * (T(1) + T(3 * 0.044715) * x * x);
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
  }
  template <class A>
  static void apply_inplace(A&& a) noexcept {
    using S = typename std::decay_t<A>::Scalar;
    a = S(0.5) * a * (S(1) + (S(0.79788456080286535588) * (a + S(0.044715) * a.cube())).tanh());
  }
};

/// SiLU (swish): x * sigmoid(x).
struct silu {
  static constexpr bool gated = false;
  static constexpr const char* name = "silu";
  template <class T>
  DMOE_HOST_DEVICE static T apply(T x) noexcept { return x / (T(1) + std::exp(-x)); }
  template <class T>
  DMOE_HOST_DEVICE static T derivative(T x) noexcept {
    const T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
  }
  template <class A>
  static void apply_inplace(A&& a) noexcept {
    using S = typename std::decay_t<A>::Scalar;
    a = a / (S(1) + (-a).exp());
  }
};

/// Gated linear unit over a base activation: h = Base(gate) * up.
template <class Base>
struct gated_unit {
  static_assert(!Base::gated, "dmoe::gated_unit: the base activation must not itself be gated");
  static constexpr bool gated = true;
  using base = Base;
};

/// SwiGLU: silu(x Wg) * (x Wu).
struct swiglu : gated_unit<silu> {
  static constexpr const char* name = "swiglu";
};
/// GeGLU: gelu_erf(x Wg) * (x Wu).
struct geglu : gated_unit<gelu_erf> {
  static constexpr const char* name = "geglu";
};

/// Number of first-layer outputs per unit of expert width (2 for gated activations).
template <class Act>
inline constexpr index_t width_factor = Act::gated ? 2 : 1;

namespace detail {
template <class A, class = void>
struct is_activation : std::false_type {};
template <class A>
struct is_activation<A, std::void_t<decltype(A::gated), decltype(A::name)>> : std::true_type {};
}  // namespace detail

/// True for the activation types above (and user types with the same members).
template <class A>
inline constexpr bool is_activation_v = detail::is_activation<A>::value;

DMOE_NAMESPACE_END  // namespace dmoe
