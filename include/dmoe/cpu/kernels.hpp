// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The router's product: C += A B^T with both operands read along contiguous rows
/// ("dot-product form"). A's rows are tokens; B's rows are the router's weight vectors (one per
/// expert, or per hidden unit), stored so that no packing is needed. The expert products, where
/// the FLOPs are, use the packed-panel kernels of cpu/detail/panel_kernels.hpp instead.
///
/// On x86-64 with GCC/Clang an AVX2+FMA kernel is compiled with a target attribute and used when
/// the active instruction set (cpu/detail/isa.hpp) has it; otherwise a plain loop. Each output
/// element is reduced in a fixed order that depends only on K, never on the number of rows, so a
/// token's scores (and so its routing) do not depend on the batch it is in nor on the threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../core/config.hpp"
#include "detail/isa.hpp"
#include "detail/panel_kernels.hpp"
#include "gemm.hpp"

#if DMOE_HAVE_X86_KERNELS
#define DMOE_HAVE_AVX2_KERNEL 1
#define DMOE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DMOE_HAVE_AVX2_KERNEL 0
#endif

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Scratch a product may need on the fallback path (gathered A rows, Eigen packing panels).
template <class T>
struct product_scratch {
  T* gather = nullptr;  ///< rows_capacity * K elements
  T* pack = nullptr;    ///< blocking.pack_elems() elements, 64-byte aligned
  gemm_blocking blocking;
};

#if DMOE_HAVE_AVX2_KERNEL

/// Sums each of the four accumulators and returns the four totals.
DMOE_TARGET_AVX2 inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) noexcept {
  const __m256 s01 = _mm256_hadd_ps(a0, a1);
  const __m256 s23 = _mm256_hadd_ps(a2, a3);
  const __m256 s = _mm256_hadd_ps(s01, s23);
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/// MR tokens x NR outputs over the full depth K; adds the results into C.
template <int MR, int NR>
DMOE_TARGET_AVX2 inline void dot_block(index_t K, const float* const* a, const float* b, index_t ldb,
                                       float* const* c) noexcept {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  index_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm256_loadu_ps(b + j * ldb + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(a[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  if (k < K) {
    alignas(32) static const std::int32_t mask_src[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask_src + 8 - (K - k)));
    __m256 bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm256_maskload_ps(b + j * ldb + k, mask);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_maskload_ps(a[i] + k, mask);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int i = 0; i < MR; ++i) {
    const __m128 r = reduce4(acc[i][0], NR > 1 ? acc[i][NR > 1 ? 1 : 0] : zero, NR > 2 ? acc[i][NR > 2 ? 2 : 0] : zero,
                             NR > 3 ? acc[i][NR > 3 ? 3 : 0] : zero);
    if constexpr (NR == 4) {
      _mm_storeu_ps(c[i], _mm_add_ps(_mm_loadu_ps(c[i]), r));
    } else {
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, r);
      for (int j = 0; j < NR; ++j) c[i][j] += tmp[j];
    }
  }
}

template <int MR>
DMOE_TARGET_AVX2 inline void dot_row_block(index_t nr, index_t K, const float* const* a, const float* b, index_t ldb,
                                           float* const* c) noexcept {
  switch (nr) {
    case 4: dot_block<MR, 4>(K, a, b, ldb, c); break;
    case 3: dot_block<MR, 3>(K, a, b, ldb, c); break;
    case 2: dot_block<MR, 2>(K, a, b, ldb, c); break;
    default: dot_block<MR, 1>(K, a, b, ldb, c); break;
  }
}

/// C (m x N, row-major, ldc) += A B^T, A = m rows of K, B = N rows of K (row j at b + j*ldb).
/// Tokens are taken in blocks of 3, outputs in blocks of 4 (12 accumulators; measured best of
/// 3x4, 4x3, 2x4, 4x2 on Zen, 65-72 GFLOP/s per core at 64-128 rows against Eigen's 50). Token rows are visited in chunks that stay in L2 while every
/// output block streams past them.
template <index_t MR = 3, index_t NR = 4>
DMOE_TARGET_AVX2 inline void product_nt_avx2(index_t m, index_t N, index_t K, row_source<float> a, const float* b,
                                             index_t ldb, float* c, index_t ldc) noexcept {
  constexpr index_t a_chunk_bytes = 96 * 1024;  // token rows kept in L2 while every output block passes
  const index_t mc = (std::max<index_t>)(MR, a_chunk_bytes / (4 * (std::max<index_t>)(K, 1)) / MR * MR);
  for (index_t i_begin = 0; i_begin < m; i_begin += mc) {
    const index_t i_end = (std::min)(m, i_begin + mc);
    for (index_t j0 = 0; j0 < N; j0 += NR) {
      const index_t nr = (std::min)(NR, N - j0);
      const float* bj = b + j0 * ldb;
      for (index_t i0 = i_begin; i0 < i_end; i0 += MR) {
        const index_t mr = (std::min)(MR, i_end - i0);
        const float* ap[MR];
        float* cp[MR];
        for (index_t i = 0; i < mr; ++i) {
          ap[i] = a.row(i0 + i);
          cp[i] = c + (i0 + i) * ldc + j0;
        }
        switch (mr) {
          case 4: dot_row_block<4>(nr, K, ap, bj, ldb, cp); break;
          case 3: dot_row_block<3>(nr, K, ap, bj, ldb, cp); break;
          case 2: dot_row_block<2>(nr, K, ap, bj, ldb, cp); break;
          default: dot_row_block<1>(nr, K, ap, bj, ldb, cp); break;
        }
      }
    }
  }
}
#endif

/// C (m x N, row-major, ldc) += A B^T with B's rows contiguous (row j at b + j * ldb), i.e. B^T is
/// a column-major K x N matrix with leading dimension ldb. `scratch` is unused (kept for callers
/// that size it); no path depends on m, so results are batch-invariant.
template <class T>
inline void product_nt(index_t m, index_t N, index_t K, row_source<T> a, const T* b, index_t ldb, T* c, index_t ldc,
                       const product_scratch<T>& scratch) noexcept {
  (void)scratch;
  if (m <= 0 || N <= 0 || K <= 0) return;
#if DMOE_HAVE_AVX2_KERNEL
  if constexpr (std::is_same_v<T, float>) {
    if (active_cpu_isa() >= cpu_isa::avx2) {
      product_nt_avx2(m, N, K, a, b, ldb, c, ldc);
      return;
    }
  }
#endif
  for (index_t i = 0; i < m; ++i) {
    const T* ai = a.row(i);
    T* ci = c + i * ldc;
    for (index_t j = 0; j < N; ++j) {
      const T* bj = b + j * ldb;
      T acc = T(0);
      for (index_t k = 0; k < K; ++k) acc = std::fma(ai[k], bj[k], acc);
      ci[j] += acc;
    }
  }
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
