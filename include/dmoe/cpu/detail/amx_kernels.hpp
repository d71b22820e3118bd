// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../../core/namespace.hpp"
/// \file
/// bf16 products on the CPU's matrix tiles (Intel AMX-BF16), for infer() with
/// infer_precision::bf16: C = init + A B with A and B in bf16 and C in float.
///
/// - B (a weight matrix, K x N) is packed once into tiles (amx_pack_b): for each 16-column block,
///   K/32 tiles of 16 rows x 64 bytes, row r holding the pairs (B[2r][j], B[2r+1][j]) of its 16
///   columns j, the layout TDPBF16PS reads. K and N are zero padded to 32 and 16.
/// - A (token rows, M x K) is rounded to bf16 per call (amx_narrow_rows), rows padded to 16 and
///   K to 32 with zeros.
/// - amx_product runs 2 x 2 blocks of 16 x 16 float tiles. The tile unit's order of summation is
///   its own (it is not one float chain over k: measured, it matches neither k-order nor pairwise
///   rounding), so results are not bitwise those of the float kernels; but each row of C depends
///   only on its row of A, so a token's output does not depend on its batch or the thread count.
///
/// Compiled inside target attributes (no -march flag); used only when amx_bf16_usable() (the CPU
/// has AMX-BF16 and AVX512-BF16, and Linux granted the process the tile state).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../../core/config.hpp"
#include "half.hpp"
#include "isa.hpp"

#if DMOE_HAVE_X86_KERNELS && defined(__linux__) && !defined(__CUDACC__) && !defined(DMOE_NO_AMX_KERNELS)
#define DMOE_HAVE_AMX_KERNELS 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define DMOE_HAVE_AMX_KERNELS 0
#endif

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Tile geometry: 16 rows of 64 bytes (16 floats of C, 32 bf16 of A, 16 pairs of B).
inline constexpr index_t amx_rows = 16;
inline constexpr index_t amx_k_chunk = 32;
inline constexpr index_t amx_b_tile_elems = amx_rows * amx_k_chunk;  // bf16 values of one B tile

inline index_t round_up(index_t v, index_t m) noexcept { return (v + m - 1) / m * m; }

/// bf16 values of the packed B of a K x N matrix.
inline index_t amx_packed_elems(index_t K, index_t N) noexcept {
  return round_up(K, amx_k_chunk) * round_up(N, amx_rows);
}

/// Packs B (element (k, j) at src[k * sk + j * sn]) into amx_product's tile layout, each value
/// rounded to nearest even (narrow<bf16_t>, as weight_storage::bf16 rounds).
inline void amx_pack_b(index_t K, index_t N, const float* src, index_t sk, index_t sn, bf16_t* dst) noexcept {
  const index_t kc = round_up(K, amx_k_chunk) / amx_k_chunk, nt = round_up(N, amx_rows) / amx_rows;
  for (index_t jt = 0; jt < nt; ++jt)
    for (index_t c = 0; c < kc; ++c) {
      bf16_t* tile = dst + (jt * kc + c) * amx_b_tile_elems;
      for (index_t r = 0; r < amx_rows; ++r)
        for (index_t n = 0; n < amx_rows; ++n)
          for (index_t p = 0; p < 2; ++p) {
            const index_t k = c * amx_k_chunk + 2 * r + p, j = jt * amx_rows + n;
            tile[r * amx_k_chunk + 2 * n + p] = (k < K && j < N) ? narrow<bf16_t>(src[k * sk + j * sn]) : bf16_t{};
          }
    }
}

#if DMOE_HAVE_AMX_KERNELS

/// Whether this process can run the tile kernels: CPUID reports AMX-TILE, AMX-BF16 and
/// AVX512-BF16, the AVX-512 kernels are supported, and Linux grants the tile data state
/// (arch_prctl ARCH_REQ_XCOMP_PERM; refused on kernels before 5.16 or where the hypervisor hides it).
inline bool amx_bf16_usable() noexcept {
  static const bool ok = [] {
    if (supported_isa() != cpu_isa::avx512) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    __cpuid_count(7, 1, a, b, c, d);
    const bool avx512_bf16 = (a >> 5) & 1u;
    if (!amx_bf16 || !amx_tile || !avx512_bf16) return false;
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
  }();
  return ok;
}

/// The tile configuration every call uses: tiles 0-3 C (16 x 16 floats), 4-5 A, 6-7 B.
struct alignas(64) amx_config {
  std::uint8_t palette = 1, start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
  amx_config() noexcept {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};
static_assert(sizeof(amx_config) == 64, "the tile configuration is 64 bytes");

/// Loads the tile configuration on this thread (before amx_product) and releases the tile state
/// (after: a thread holding it makes every context switch save 8 KB more).
__attribute__((target("amx-tile"))) inline void amx_begin() noexcept {
  static const amx_config cfg;
  _tile_loadconfig(&cfg);
}
__attribute__((target("amx-tile"))) inline void amx_end() noexcept { _tile_release(); }

/// One block of up to 2 x 2 C tiles over kc chunks of K. C tiles start from the bias row (a tile
/// load of stride 0 repeats it in every row) or from zero.
template <bool TwoM, bool TwoN>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_block(const bf16_t* a, index_t lda_bytes,
                                                                    const bf16_t* b0, index_t kc,
                                                                    const float* bias, float* c,
                                                                    index_t ldc_bytes) noexcept {
  const bf16_t* b1 = b0 + kc * amx_b_tile_elems;
  char* c0 = reinterpret_cast<char*>(c);
  char* c2 = c0 + amx_rows * ldc_bytes;
  if (bias) {
    _tile_loadd(0, bias, 0);
    if (TwoN) _tile_loadd(1, bias + amx_rows, 0);
    if (TwoM) _tile_loadd(2, bias, 0);
    if (TwoM && TwoN) _tile_loadd(3, bias + amx_rows, 0);
  } else {
    _tile_zero(0);
    if (TwoN) _tile_zero(1);
    if (TwoM) _tile_zero(2);
    if (TwoM && TwoN) _tile_zero(3);
  }
  const char* a0 = reinterpret_cast<const char*>(a);
  const char* a1 = a0 + amx_rows * lda_bytes;
  for (index_t k = 0; k < kc; ++k) {
    _tile_loadd(4, a0 + k * 64, lda_bytes);
    _tile_loadd(6, b0 + k * amx_b_tile_elems, 64);
    if (TwoN) _tile_loadd(7, b1 + k * amx_b_tile_elems, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (TwoN) _tile_dpbf16ps(1, 4, 7);
    if (TwoM) {
      _tile_loadd(5, a1 + k * 64, lda_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if (TwoN) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c0, ldc_bytes);
  if (TwoN) _tile_stored(1, c0 + 64, ldc_bytes);
  if (TwoM) _tile_stored(2, c2, ldc_bytes);
  if (TwoM && TwoN) _tile_stored(3, c2 + 64, ldc_bytes);
}

/// C (mt * 16 rows of round_up(N, 16) floats, row stride ldc) = bias + A B: A is mt * 16 rows of
/// kc * 32 bf16 (row stride lda elements), B packed by amx_pack_b for (K <= kc * 32, N), bias
/// (round_up(N, 16) floats, zero padded) or null. Between amx_begin and amx_end.
inline void amx_product(index_t mt, index_t N, index_t kc, const bf16_t* a, index_t lda, const bf16_t* b,
                        const float* bias, float* c, index_t ldc) noexcept {
  const index_t nt = round_up(N, amx_rows) / amx_rows;
  const index_t lda_b = lda * 2, ldc_b = ldc * 4;
  for (index_t j = 0; j < nt; j += 2) {
    const bool two_n = j + 1 < nt;
    const bf16_t* bj = b + j * kc * amx_b_tile_elems;
    const float* bias_j = bias ? bias + j * amx_rows : nullptr;
    for (index_t i = 0; i < mt; i += 2) {
      const bf16_t* ai = a + i * amx_rows * lda;
      float* cij = c + i * amx_rows * ldc + j * amx_rows;
      if (i + 1 < mt) {
        if (two_n)
          amx_block<true, true>(ai, lda_b, bj, kc, bias_j, cij, ldc_b);
        else
          amx_block<true, false>(ai, lda_b, bj, kc, bias_j, cij, ldc_b);
      } else {
        if (two_n)
          amx_block<false, true>(ai, lda_b, bj, kc, bias_j, cij, ldc_b);
        else
          amx_block<false, false>(ai, lda_b, bj, kc, bias_j, cij, ldc_b);
      }
    }
  }
}

/// Rounds one row of n floats to bf16 (to nearest even, NaN kept quiet: narrow<bf16_t>'s bits),
/// zero padding it to npad values (a multiple of 32).
__attribute__((target("avx512f,avx512bw"))) inline void amx_narrow_row(const float* x, index_t n, index_t npad,
                                                                       bf16_t* out) noexcept {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i quiet = _mm512_set1_epi32(0x00400000);
  const __mmask16 all = 0xFFFF;  // the maskz forms: GCC 12 warns on the plain ones' undefined source
  for (index_t j = 0; j < npad; j += 16) {
    const index_t left = n - j;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
    const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, x + j));
    const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all, u, 16), one);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, half));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        _mm512_maskz_cvtepi32_epi16(all, _mm512_maskz_srli_epi32(all, r, 16)));
  }
}

#else

inline bool amx_bf16_usable() noexcept { return false; }
inline void amx_begin() noexcept {}
inline void amx_end() noexcept {}
inline void amx_product(index_t, index_t, index_t, const bf16_t*, index_t, const bf16_t*, const float*, float*,
                        index_t) noexcept {}
inline void amx_narrow_row(const float*, index_t, index_t, bf16_t*) noexcept {}

#endif

/// A's rows for amx_product: rows x[row(i)] (i < rows) rounded to bf16, padded with zeros to
/// kpad values and round_up(rows, 16) rows; row stride kpad.
inline void amx_narrow_rows(const float* x, index_t ldx, const index_t* index, index_t rows, index_t K, index_t kpad,
                            bf16_t* out) noexcept {
  const index_t padded = round_up(rows, amx_rows);
  for (index_t i = 0; i < rows; ++i) amx_narrow_row(x + (index ? index[i] : i) * ldx, K, kpad, out + i * kpad);
  std::fill(out + rows * kpad, out + padded * kpad, bf16_t{});
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend

DMOE_NAMESPACE_BEGIN

/// Whether this CPU and process run infer_precision::bf16 on bf16 matrix tiles (AMX-BF16 with
/// AVX512-BF16, the tile state granted by Linux, and a build with x86 kernels). The active
/// instruction set must also be avx512 (active_cpu_isa()) for infer to use them.
inline bool cpu_has_bf16_tiles() noexcept { return detail::cpu_backend::amx_bf16_usable(); }

DMOE_NAMESPACE_END  // namespace dmoe
