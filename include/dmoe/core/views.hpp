// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Non-owning views over the caller's storage. Tokens are rows (row-vector convention of
/// docs/algorithms.md): a batch of T tokens of width d is a row-major T x d matrix whose rows
/// may be strided (row_stride >= cols).

#include <type_traits>

#include <Eigen/Core>

#include "config.hpp"

namespace dmoe {

/// Row-major matrix view: element (r, c) is data[r * row_stride + c].
template <class T>
struct matrix_view {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t row_stride = 0;

  constexpr matrix_view() noexcept = default;
  /// Dense rows (row_stride = cols).
  constexpr matrix_view(T* p, index_t r, index_t c) noexcept : data(p), rows(r), cols(c), row_stride(c) {}
  constexpr matrix_view(T* p, index_t r, index_t c, index_t stride) noexcept
      : data(p), rows(r), cols(c), row_stride(stride) {}

  /// From a view of non-const elements.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr matrix_view(const matrix_view<U>& o) noexcept  // NOLINT: implicit by design
      : data(o.data), rows(o.rows), cols(o.cols), row_stride(o.row_stride) {}

  /// From any row-major Eigen dense object with direct access (Matrix, Map, Block of rows).
  template <class Derived,
            class = std::enable_if_t<(Derived::Flags & Eigen::RowMajorBit) != 0 &&
                                     (Derived::Flags & Eigen::DirectAccessBit) != 0>>
  matrix_view(Eigen::PlainObjectBase<Derived>& m) noexcept  // NOLINT: implicit by design
      : data(m.data()), rows(m.rows()), cols(m.cols()), row_stride(m.outerStride()) {}
  template <class Derived,
            class = std::enable_if_t<(Derived::Flags & Eigen::RowMajorBit) != 0 &&
                                     std::is_const_v<T>>>
  matrix_view(const Eigen::PlainObjectBase<Derived>& m) noexcept  // NOLINT: implicit by design
      : data(m.data()), rows(m.rows()), cols(m.cols()), row_stride(m.outerStride()) {}
  template <class P, int Opt, class S>
  matrix_view(const Eigen::Map<P, Opt, S>& m) noexcept  // NOLINT: implicit by design
      : data(m.data()), rows(m.rows()), cols(m.cols()), row_stride(m.outerStride()) {
    static_assert((P::Flags & Eigen::RowMajorBit) != 0,
                  "dmoe::matrix_view: tokens are rows; map a row-major Eigen matrix "
                  "(Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>)");
  }

  constexpr T* row(index_t r) const noexcept { return data + r * row_stride; }
  constexpr T& operator()(index_t r, index_t c) const noexcept { return data[r * row_stride + c]; }
  constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
};

/// Contiguous vector view.
template <class T>
struct vector_view {
  T* data = nullptr;
  index_t size = 0;
  constexpr vector_view() noexcept = default;
  constexpr vector_view(T* p, index_t n) noexcept : data(p), size(n) {}
  constexpr T& operator[](index_t i) const noexcept { return data[i]; }
};

namespace detail {
template <class T>
struct nondeduced {
  using type = T;
};
}  // namespace detail

/// matrix_view<const T> in a non-deduced context. Cold-path function templates (conversion,
/// fitting, sweeps) take their inputs as input_view<T> with T deduced from another argument (a
/// layer, weights), so that callers can pass Eigen row-major matrices directly.
template <class T>
using input_view = typename detail::nondeduced<matrix_view<const T>>::type;

/// Row-major dynamic Eigen matrix, the natural owner type for token batches.
template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace dmoe
