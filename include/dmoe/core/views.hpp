// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// Non-owning views over the caller's storage. Tokens are rows (row-vector convention of
/// docs/algorithms.md, Notation): a batch of T tokens of width d is a row-major T x d matrix whose rows
/// may be strided (row_stride >= cols).

#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "config.hpp"

DMOE_NAMESPACE_BEGIN

namespace detail {
// Detects a class derived from Eigen::DenseBase<D> (Matrix, Array, Map, Ref, Block, Transpose, ...)
// through overload resolution on a base pointer, so no Eigen template is instantiated for
// unrelated types.
template <class D>
std::true_type eigen_dense_probe(const Eigen::DenseBase<D>*);
std::false_type eigen_dense_probe(...);
template <class E>
constexpr bool is_eigen_dense_v = decltype(eigen_dense_probe(std::declval<E*>()))::value;

template <class E, class T, bool = is_eigen_dense_v<E>>
struct eigen_scalar_matches : std::false_type {};
template <class E, class T>
struct eigen_scalar_matches<E, T, true> : std::is_same<typename E::Scalar, std::remove_const_t<T>> {};

// An owning Eigen object (Matrix, Array): constness of the object is constness of its elements,
// and a temporary one dies at the end of the call that writes into it.
template <class D>
std::true_type eigen_plain_probe(const Eigen::PlainObjectBase<D>*);
std::false_type eigen_plain_probe(...);
template <class E>
constexpr bool is_eigen_plain_v = decltype(eigen_plain_probe(std::declval<E*>()))::value;
}  // namespace detail

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

  /// From any Eigen dense object of scalar T whose rows are contiguous in memory: a row-major
  /// `Matrix`/`Array`, a `Map` or `Ref` of one (with `Eigen::OuterStride<>` for strided rows), a
  /// block of one (`x.topRows(8)`, `x.middleRows(i, n)`, `x.block(...)`), or the transpose of a
  /// column-major matrix. matrix_view<const T> takes any of them; matrix_view<T> (an output) only
  /// writable ones: a non-const matrix, a `Map`/`Ref`/block of non-const data.
  ///
  /// The layout is checked here by static_asserts rather than by overload removal so that a
  /// column-major or read-only argument fails with a message saying what to pass instead of a
  /// bare "no conversion" error. Only the scalar type takes part in overload resolution (a float
  /// matrix never matches matrix_view<double>).
  template <class E, class D = std::remove_cv_t<std::remove_reference_t<E>>,
            class = std::enable_if_t<detail::eigen_scalar_matches<D, T>::value>>
  matrix_view(E&& m) noexcept  // NOLINT: implicit by design (forwarding: Map and blocks are temporaries)
      : data(pointer_of<std::remove_reference_t<E>, D>(m)),
        rows(m.rows()),
        cols(m.cols()),
        row_stride(stride_of<std::remove_reference_t<E>, D>(m)) {
    static_assert((D::Flags & Eigen::RowMajorBit) != 0,
                  "dmoe::matrix_view: tokens are rows and must be contiguous in memory, but this Eigen object "
                  "is column-major. Store the batch as dmoe::row_matrix<T> (Eigen::Matrix<T, Eigen::Dynamic, "
                  "Eigen::Dynamic, Eigen::RowMajor>), copy it into one (dmoe::row_matrix<T> r = m;), or, for a "
                  "column-major d x tokens matrix, pass m.transpose()");
    static_assert((D::Flags & Eigen::DirectAccessBit) != 0,
                  "dmoe::matrix_view: this Eigen expression has no storage to view (a product, sum or other "
                  "lazy expression); evaluate it into a dmoe::row_matrix<T> first");
    static_assert((D::Flags & Eigen::DirectAccessBit) == 0 || D::InnerStrideAtCompileTime == 1,
                  "dmoe::matrix_view: elements within a row must be contiguous; use Eigen::OuterStride<> "
                  "(not Eigen::Stride with an inner stride) for Map and Ref");
    static_assert(std::is_const_v<T> || (D::Flags & Eigen::LvalueBit) != 0,
                  "dmoe::matrix_view<T> (an output) needs writable storage, but this Eigen object is read-only "
                  "(Map<const ...>, Ref<const ...> or a block of a const matrix)");
    static_assert(std::is_const_v<T> || !detail::is_eigen_plain_v<D> ||
                      (std::is_lvalue_reference_v<E> && !std::is_const_v<std::remove_reference_t<E>>),
                  "dmoe::matrix_view<T> (an output) needs a non-const matrix that outlives the call; this one is "
                  "const or a temporary");
  }

  constexpr T* row(index_t r) const noexcept { return data + r * row_stride; }
  constexpr T& operator()(index_t r, index_t c) const noexcept { return data[r * row_stride + c]; }
  constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }

 private:
  // Views (Map, Ref, Block, Transpose) are handles: a const handle to writable storage is still
  // writable storage (LvalueBit, checked above), as in Eigen's own advice for functions that write
  // into expressions. Owning matrices keep their constness. Arguments the static_asserts refuse
  // give nullptr / 0 here, so that the assert's message is the only diagnostic.
  template <class E, class D>
  static constexpr bool viewable = (D::Flags & Eigen::DirectAccessBit) != 0 &&
                                   (std::is_const_v<T> || ((D::Flags & Eigen::LvalueBit) != 0 &&
                                                           (!detail::is_eigen_plain_v<D> || !std::is_const_v<E>)));
  template <class E, class D>
  static T* pointer_of(E& m) noexcept {
    if constexpr (!viewable<E, D>) {
      return nullptr;
    } else if constexpr (std::is_const_v<T> || detail::is_eigen_plain_v<D>) {
      return m.data();
    } else {
      return const_cast<T*>(static_cast<const D&>(m).data());
    }
  }
  template <class E, class D>
  static index_t stride_of(const E& m) noexcept {
    if constexpr ((D::Flags & Eigen::DirectAccessBit) != 0) return m.outerStride();
    else return 0;
  }
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

DMOE_NAMESPACE_END  // namespace dmoe
