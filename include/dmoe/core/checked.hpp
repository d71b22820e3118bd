// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// Overflow-checked size arithmetic: the one helper every place that multiplies or adds sizes
/// uses (configs, weight storage, workspace sizes, file offsets). A size that does not fit is an
/// error the caller reports with the numbers, never a wrapped value that allocates too little.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <stdexcept>

#include "config.hpp"
#include "status.hpp"

DMOE_NAMESPACE_BEGIN
namespace detail {

/// a * b into `out`; false (out untouched) on overflow or a negative operand.
constexpr bool mul_ok(index_t a, index_t b, index_t& out) noexcept {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > (std::numeric_limits<index_t>::max)() / a) return false;
  out = a * b;
  return true;
}
/// a + b into `out`; false on overflow or a negative operand.
constexpr bool add_ok(index_t a, index_t b, index_t& out) noexcept {
  if (a < 0 || b < 0) return false;
  if (a > (std::numeric_limits<index_t>::max)() - b) return false;
  out = a + b;
  return true;
}
/// a * b into `out` for byte counts; false on overflow.
constexpr bool mul_ok(std::size_t a, std::size_t b, std::size_t& out) noexcept {
  if (a != 0 && b > (std::numeric_limits<std::size_t>::max)() / a) return false;
  out = a * b;
  return true;
}
/// a + b into `out` for byte counts; false on overflow.
constexpr bool add_ok(std::size_t a, std::size_t b, std::size_t& out) noexcept {
  if (a > (std::numeric_limits<std::size_t>::max)() - b) return false;
  out = a + b;
  return true;
}

/// Accumulates a product of non-negative factors and remembers whether it ever overflowed, so
/// that a chain of multiplications is checked once at the end:
///   checked_size s; s.mul(E).mul(d).mul(f); if (!s.ok()) ... else use s.value()
class checked_size {
 public:
  constexpr checked_size() noexcept = default;
  constexpr explicit checked_size(index_t v) noexcept : value_(v), ok_(v >= 0) {}
  constexpr checked_size& mul(index_t v) noexcept {
    ok_ = ok_ && mul_ok(value_, v, value_);
    return *this;
  }
  constexpr checked_size& add(index_t v) noexcept {
    ok_ = ok_ && add_ok(value_, v, value_);
    return *this;
  }
  constexpr bool ok() const noexcept { return ok_; }
  /// The value; meaningful only when ok().
  constexpr index_t value() const noexcept { return value_; }

 private:
  index_t value_ = 1;
  bool ok_ = true;
};

/// Product of `count` factors as an element count, or throws dmoe::error(invalid_argument) that
/// names `what` and the factors (cold paths: construction, loading).
inline index_t checked_product_or_throw(const char* what, index_t a, index_t b, index_t c = 1) {
  checked_size s(a);
  s.mul(b).mul(c);
  if (!s.ok())
    raisef(errc::invalid_argument, "%s: size %td x %td x %td does not fit in a signed 64-bit element count", what, a,
           b, c);
  return s.value();
}

/// Runs `alloc` (which fills owning containers with `count` elements of `elem_bytes` each in
/// total) and turns std::bad_alloc / std::length_error into dmoe::error(out_of_memory) naming
/// `what` and the bytes asked for (cold paths).
template <class F>
void allocate_or_throw(const char* what, index_t count, std::size_t elem_bytes, F&& alloc) {
  const double bytes = double(count) * double(elem_bytes);
#if DMOE_HAS_EXCEPTIONS
  try {
    alloc();
  } catch (const std::bad_alloc&) {
    raisef(errc::out_of_memory, "%s: allocating %.0f bytes (%td elements) failed", what, bytes, count);
  } catch (const std::length_error&) {
    raisef(errc::out_of_memory, "%s: allocating %.0f bytes (%td elements) failed", what, bytes, count);
  }
#else
  (void)bytes;
  alloc();
#endif
}

}  // namespace detail
DMOE_NAMESPACE_END  // namespace dmoe
