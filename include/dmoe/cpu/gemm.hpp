// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Matrix products for the CPU hot path. We drive Eigen's own blocked GEMM kernel
/// (general_matrix_matrix_product) with packing buffers carved from the caller's workspace:
/// Eigen's public product API would heap-allocate those buffers for our shapes (they exceed
/// EIGEN_STACK_ALLOCATION_LIMIT), which the hot-path rules forbid. Single-row products go to
/// Eigen's GEMV, which needs no packing. The blocking sizes are fixed per shape (never per
/// thread count), so results do not depend on how tasks are spread over threads.
/// This uses Eigen::internal, checked against Eigen 3.4 (see the static_assert below).

#include <algorithm>

#include <Eigen/Core>

#include "../core/config.hpp"

static_assert(EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4,
              "dmoe/cpu/gemm.hpp drives Eigen 3.4's internal GEMM; other Eigen versions need a port");

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Storage order of a matrix operand.
enum class order { row_major, col_major };

/// Packing-buffer sizes of one GEMM shape, fixed per shape.
struct gemm_blocking {
  index_t kc = 0, mc = 0, nc = 0;
  /// Elements before the B panel; keeps it 64-byte aligned like the A panel (Eigen uses aligned
  /// SIMD loads on packed panels, so the buffer itself must be 64-byte aligned too).
  index_t b_offset() const noexcept { return (kc * mc + 15) / 16 * 16; }
  index_t pack_elems() const noexcept { return b_offset() + kc * nc; }
};

/// Blocking for C(m x n, row-major) += A(m x k) * B(k x n) with m at most max_m. Eigen computes a
/// row-major product as the column-major transposed one, so its "rows" are our n.
template <class T>
inline gemm_blocking plan_gemm(index_t max_m, index_t n, index_t k) {
  index_t kc = k, mc = n, nc = max_m;
  Eigen::internal::computeProductBlockingSizes<T, T, 1, index_t>(kc, mc, nc, index_t{1});
  return {kc, mc, nc};
}

template <class T>
class borrowed_blocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  borrowed_blocking(const gemm_blocking& b, T* pack) noexcept {
    this->m_kc = b.kc;
    this->m_mc = b.mc;
    this->m_nc = b.nc;
    this->m_blockA = pack;
    this->m_blockB = pack + b.b_offset();
  }
};

/// C(m x n, row-major, ldc) += A(m x k, storage AO, lda) * B(k x n, storage BO, ldb).
/// `pack` is 64-byte aligned and holds blocking.pack_elems() elements. Any m works with any
/// blocking (Eigen loops over blocks); the blocking only decides the block sizes. Single-row products with a row-major A go to GEMV and do not touch `pack`.
template <order AO, order BO, class T>
inline void gemm(index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb, T* c, index_t ldc,
                 const gemm_blocking& blocking, T* pack) noexcept {
  if (m <= 0 || n <= 0 || k <= 0) return;
  constexpr int AStorage = AO == order::row_major ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int BStorage = BO == order::row_major ? Eigen::RowMajor : Eigen::ColMajor;
  if (AO == order::row_major && m == 1) {
    // GEMV: c (1 x n) += a (1 x k) * B (k x n); Eigen dispatches row-vector products to GEMV.
    using Row = Eigen::Matrix<T, 1, Eigen::Dynamic, Eigen::RowMajor>;
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, BStorage>;
    Eigen::Map<const Row> av(a, 1, k);
    Eigen::Map<Row> cv(c, 1, n);
    Eigen::Map<const Mat, 0, Eigen::OuterStride<>> bm(b, k, n, Eigen::OuterStride<>(ldb));
    cv.noalias() += av * bm;
    return;
  }
  borrowed_blocking<T> blk(blocking, pack);
  Eigen::internal::general_matrix_matrix_product<index_t, T, AStorage, false, T, BStorage, false, Eigen::RowMajor,
                                                 1>::run(m, n, k, a, lda, b, ldb, c, 1, ldc, T(1), blk, nullptr);
}

/// gemm with a row-major A (the forward products).
template <order BO, class T>
inline void gemm_acc(index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb, T* c,
                     index_t ldc, const gemm_blocking& blocking, T* pack) noexcept {
  gemm<order::row_major, BO>(m, n, k, a, lda, b, ldb, c, ldc, blocking, pack);
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
