// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// Static-or-dynamic sizes, the mdspan way: a size known at compile time costs no storage and
/// lets the compiler fold it; `dynamic_extent` defers it to run time.

#include <cstddef>
#include <limits>

#include "config.hpp"

DMOE_NAMESPACE_BEGIN

/// Marks an extent whose value is given at run time.
inline constexpr std::size_t dynamic_extent = (std::numeric_limits<std::size_t>::max)();

namespace detail {
/// Holds one extent: a constant when N is static, a runtime value otherwise.
template <std::size_t N>
struct extent_value {
  static constexpr bool is_static = true;
  constexpr extent_value() noexcept = default;
  constexpr explicit extent_value(index_t) noexcept {}
  static constexpr index_t value() noexcept { return static_cast<index_t>(N); }
  /// A runtime value given for a static extent must agree with it.
  static constexpr bool accepts(index_t v) noexcept { return v == static_cast<index_t>(N); }
};

template <>
struct extent_value<dynamic_extent> {
  static constexpr bool is_static = false;
  constexpr extent_value() noexcept = default;
  constexpr explicit extent_value(index_t v) noexcept : v_(v) {}
  constexpr index_t value() const noexcept { return v_; }
  static constexpr bool accepts(index_t v) noexcept { return v > 0; }

 private:
  index_t v_ = 0;
};
}  // namespace detail
DMOE_NAMESPACE_END  // namespace dmoe
