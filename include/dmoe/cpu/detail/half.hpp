// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../../core/namespace.hpp"
/// \file
/// The 16-bit formats the CPU kernels can read expert weights in (dmoe::weight_storage): bf16
/// (8 exponent bits, 7 stored mantissa bits: float's range) and IEEE fp16 (5 and 10: finite up
/// to 65504). Values are rounded from float once, when the panels are packed (round to nearest,
/// ties to even), and widened back exactly inside the kernels, so a product
/// over 16-bit panels is bitwise the product over float panels holding the rounded values.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <Eigen/Core>

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// A bf16 value as stored in panels (its bits).
enum class bf16_t : std::uint16_t {};
/// An IEEE binary16 value as stored in panels (its bits).
enum class f16_t : std::uint16_t {};

template <class S>
inline constexpr bool is_16bit_v = std::is_same_v<S, bf16_t> || std::is_same_v<S, f16_t>;

/// Rounds to the format, to nearest even (NaN stays NaN; fp16 overflows to +-inf beyond 65504).
/// bf16 by integer arithmetic on the bits (what Eigen's bfloat16 does, without its branches, so
/// that the packing loops vectorize: repacking shape S's transposes took 7 ns a value through
/// Eigen::bfloat16); fp16 through Eigen::half. Both tested against an independent rounding.
template <class H>
inline H narrow(float v) noexcept {
  if constexpr (std::is_same_v<H, bf16_t>) {
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    const std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // ties to even; inf stays inf
    return static_cast<H>(static_cast<std::uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded));
  } else {
    return static_cast<H>(Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(v)));
  }
}
/// The float a 16-bit value stands for (exact: float holds every bf16 and fp16 value).
inline float widen(bf16_t h) noexcept {
  const std::uint32_t bits = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(f16_t h) noexcept {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(static_cast<std::uint16_t>(h)));
}
/// v rounded to the format and widened back: what a kernel multiplies by.
template <class H>
inline float round_through(float v) noexcept {
  return widen(narrow<H>(v));
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
