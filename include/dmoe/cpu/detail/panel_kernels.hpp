// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../../core/namespace.hpp"
/// \file
/// The CPU product of the expert hot path: C = init + A B, computed by register-blocked
/// outer-product tiles (broadcast one A value, multiply-add it into a row of B vectors).
///
/// - B is read in place, as column panels of `nr` columns: either panels packed once from the
///   weights (panel p is a contiguous K x nr block, zero padded: packed_experts.hpp) or the rows of
///   a row-major matrix (panel p starts at column p nr; the last one is read with masked loads).
///   Weights are constant between optimizer steps, so packing them once removes the per-call
///   packing that made a general GEMM slow at the few rows per expert that sparse routing gives.
/// - A's rows (tokens, read through an index: expert inputs are never gathered) are read in place,
///   MR row pointers per tile, one value broadcast at a time.
/// - Each element of C is one chain of fused multiply-adds over k = 0..K-1, in order, starting at
///   init: independent of the row count, the tile shape and the instruction set. A token's output
///   is therefore bitwise the same whatever batch it is in, on any thread count and any of the
///   kernels below (tested against a plain std::fma loop for exact equality).
///
/// Kernels are compiled for AVX-512 and AVX2+FMA inside target regions (no -march flag needed)
/// and picked at run time (isa.hpp); the portable one is plain C++.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../../core/config.hpp"
#include "half.hpp"
#include "isa.hpp"

#if DMOE_HAVE_X86_KERNELS
#include <immintrin.h>
#endif

// Full unrolling of the tile loops keeps the accumulators in registers. nvcc's front end (a .cu
// file that includes the CPU layer as a reference) does not know the pragma; host code there is
// only a test reference, so it goes without.
#define DMOE_PRAGMA_STR(x) #x
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define DMOE_UNROLL(n) _Pragma(DMOE_PRAGMA_STR(GCC unroll n))
#else
#define DMOE_UNROLL(n)
#endif

#ifndef DMOE_PANEL_DEPTH_BYTES
#define DMOE_PANEL_DEPTH_BYTES 4096
#endif

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// Operand A of a product: rows of K contiguous values, row i at data + row(i) * ld.
template <class T>
struct row_source {
  const T* data = nullptr;
  index_t ld = 0;
  const index_t* index = nullptr;  ///< optional: row i is data + index[i] * ld
  const T* row(index_t i) const noexcept { return data + (index ? index[i] : i) * ld; }
};

/// Operand B (K x N) as column panels: element (k, j) of panel p = j / nr is at
/// data[p * panel_stride + k * ld + j % nr].
template <class T>
struct panel_b {
  const T* data = nullptr;
  index_t ld = 0;            ///< distance between rows k and k + 1 inside a panel
  index_t panel_stride = 0;  ///< distance between panels
  bool padded = false;       ///< every panel holds nr readable columns (zero padded past N)

  /// A row-major K x N matrix with row stride ldb, used in place (the last panel masked).
  static panel_b row_major(const T* b, index_t ldb, index_t nr) noexcept { return {b, ldb, nr, false}; }
  /// Packed panels of K rows of nr values each (pack_panels).
  static panel_b packed(const T* b, index_t K, index_t nr) noexcept { return {b, nr, K * nr, true}; }
  /// Columns [c0, N) of this operand; c0 must be a multiple of the panel width nr.
  panel_b columns_from(index_t c0, index_t nr) const noexcept {
    return {data + (c0 / nr) * panel_stride, ld, panel_stride, padded};
  }
};

/// Register tile of one instruction set and scalar type: MR rows x NV vectors.
struct tile_shape {
  int mr, nv, lanes;
  constexpr index_t nr() const noexcept { return index_t(nv) * lanes; }
};

/// The two AVX-512 register tiles. Which is faster depends on the core, not on the instruction
/// set (bench_kernels, docs/benchmarks.md "Tile shapes"): `tall` (14 rows x 2 vectors: 28
/// accumulators, 16 loads per 28 FMAs) on Intel cores with two 512-bit FMA ports; `wide` (6 x 4:
/// 24 accumulators, 10 loads per 24 FMAs, a 6-row A block that stays in a 32 KiB L1) on AMD Zen 4,
/// which splits 512-bit FMAs over its 256-bit units and measured 93% of peak with `tall`, 97-99%
/// with `wide`. Every element is the same FMA chain under either: the choice changes no bit.
enum class avx512_tile : int { tall = 0, wide = 1 };

/// The default for this CPU (AMD: wide, others: tall), or DMOE_AVX512_TILE=tall|wide.
inline avx512_tile default_avx512_tile() noexcept {
  if (const char* v = std::getenv("DMOE_AVX512_TILE")) {
    if (std::strcmp(v, "wide") == 0) return avx512_tile::wide;
    if (std::strcmp(v, "tall") == 0) return avx512_tile::tall;
  }
#if DMOE_HAVE_X86_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_is("amd")) return avx512_tile::wide;
#endif
  return avx512_tile::tall;
}
inline std::atomic<int>& avx512_tile_storage() noexcept {
  static std::atomic<int> t{static_cast<int>(default_avx512_tile())};
  return t;
}
inline avx512_tile active_avx512_tile() noexcept {
  return static_cast<avx512_tile>(avx512_tile_storage().load(std::memory_order_relaxed));
}
/// For tests and benchmarks, like set_cpu_isa: not while forward/backward run. Layers repack
/// their weights for the new panel width on next use.
inline void set_avx512_tile(avx512_tile t) noexcept {
  avx512_tile_storage().store(static_cast<int>(t), std::memory_order_relaxed);
}

/// Tile shapes, chosen by measurement (docs/benchmarks.md, "Tile shapes"): enough independent
/// accumulators to cover FMA latency on two FMA ports, and few enough loads per FMA.
template <class T>
constexpr tile_shape tile_for(cpu_isa isa, avx512_tile variant) noexcept {
  constexpr int w = sizeof(T) == 4 ? 1 : 0;  // float lanes are twice the double lanes
  switch (isa) {
    case cpu_isa::avx512: return variant == avx512_tile::wide ? tile_shape{6, 4, 8 << w} : tile_shape{14, 2, 8 << w};
    case cpu_isa::avx2: return {6, 2, 4 << w};
    case cpu_isa::portable: break;
  }
  return {4, 4, 1};
}
/// The tile the kernels use now for `isa`.
template <class T>
inline tile_shape tile_for(cpu_isa isa) noexcept {
  return tile_for<T>(isa, active_avx512_tile());
}

/// Bytes of B panels one pass over a row block reads: a share of a 1-2 MiB L2 that leaves room
/// for the rows and the output.
inline constexpr index_t panel_chunk_bytes = 512 * 1024;
/// Bytes of one A row a tile reads before its chains are stored and continued (deep products
/// only; the expert products of the usual shapes are never cut).
inline constexpr index_t panel_depth_bytes = DMOE_PANEL_DEPTH_BYTES;

/// Widest panel any instruction set uses for T: storage sized for it fits every kernel.
template <class T>
constexpr index_t max_panel_width() noexcept {
  return (std::max)(tile_for<T>(cpu_isa::avx512, avx512_tile::tall).nr(),
                    tile_for<T>(cpu_isa::avx512, avx512_tile::wide).nr());
}

/// Column jj of a panel at position jj of its row (float panels, fp16 panels).
struct same_position {
  constexpr index_t operator()(index_t jj) const noexcept { return jj; }
};

/// The element-wise packing that pack_panels and pack_panels_16 are: a K x N operand into panels
/// of nr columns, zero padded, dst[p][k][position(jj)] = convert(src(k, p nr + jj)) where
/// src(k, j) = src[k * sk + j * sn]. Runs after every optimizer step (the layer repacks on the
/// next forward), so it is blocked: 16 depth rows of a panel at a time, whose writes (16 x nr
/// values) stay in L1 while each source column gives one cache line; column by column over the
/// whole depth took twice as long (shape S, 18.9 MB: 6.3-7 ms against 3.0-3.4 ms on an Intel Xeon
/// core). When the source's rows are contiguous (sn = 1: the transposes) it walks row segments.
template <class D, class S, class Pos, class Conv>
void pack_panels_as(index_t K, index_t N, const S* src, index_t sk, index_t sn, index_t nr, D* dst, Pos position,
                    Conv convert) noexcept {
  constexpr bool same_order = std::is_same_v<Pos, same_position>;
  index_t table[256];  // the positions, computed once (a pair interleave costs a division each)
  const bool tabled = !same_order && nr <= 256;
  if (tabled)
    for (index_t jj = 0; jj < nr; ++jj) table[jj] = position(jj);
  auto pos = [&](index_t jj) noexcept { return tabled ? table[jj] : position(jj); };
  for (index_t j0 = 0; j0 < N; j0 += nr) {
    const index_t cols = (std::min)(nr, N - j0);
    D* panel = dst + (j0 / nr) * K * nr;
    if (sn == 1) {
      for (index_t k = 0; k < K; ++k) {
        const S* r = src + k * sk + j0;
        D* row = panel + k * nr;
        if constexpr (same_order) {
          for (index_t jj = 0; jj < cols; ++jj) row[jj] = convert(r[jj]);
          std::fill(row + cols, row + nr, D{});
        } else {
          for (index_t jj = 0; jj < nr; ++jj) row[pos(jj)] = jj < cols ? convert(r[jj]) : D{};
        }
      }
      continue;
    }
    constexpr index_t kb = 16;
    for (index_t k0 = 0; k0 < K; k0 += kb) {
      const index_t k1 = (std::min)(K, k0 + kb);
      for (index_t jj = 0; jj < nr; ++jj) {
        const index_t q = pos(jj);
        if (jj < cols) {
          const S* c = src + (j0 + jj) * sn;
          for (index_t k = k0; k < k1; ++k) panel[k * nr + q] = convert(c[k * sk]);
        } else {
          for (index_t k = k0; k < k1; ++k) panel[k * nr + q] = D{};
        }
      }
    }
  }
}

/// Packs a K x N operand into panels of nr columns, zero padded: dst[p][k][jj] = src(k, p nr + jj),
/// where src(k, j) = src[k * sk + j * sn]. dst holds ceil(N / nr) * nr * K values.
template <class T>
void pack_panels(index_t K, index_t N, const T* src, index_t sk, index_t sn, index_t nr, T* dst) noexcept {
  pack_panels_as(K, N, src, sk, sn, nr, dst, same_position{}, [](T v) noexcept { return v; });
}

/// Values pack_panels writes for a K x N operand.
constexpr index_t packed_panel_elems(index_t K, index_t N, index_t nr) noexcept { return (N + nr - 1) / nr * nr * K; }

/// pack_panels into 16-bit panels (H = bf16_t or f16_t), each value rounded to nearest even. fp16
/// panels keep the column order. bf16 panels interleave each pair of `lanes`-wide vectors: within
/// columns [2 g L, 2 (g + 1) L) of a panel row, column 2 g L + l goes to position 2 g L + 2 l and
/// column (2 g + 1) L + l to position 2 g L + 2 l + 1, so one load of 2 L values gives both
/// vectors by a shift and a mask (load_bf16_pair). nr must be a multiple of 2 lanes.
template <class H>
void pack_panels_16(index_t K, index_t N, const float* src, index_t sk, index_t sn, index_t nr, int lanes,
                    H* dst) noexcept {
  static_assert(is_16bit_v<H>, "pack_panels_16: bf16_t or f16_t");
  auto convert = [](float v) noexcept { return narrow<H>(v); };
  if constexpr (std::is_same_v<H, f16_t>) {
    (void)lanes;
    pack_panels_as(K, N, src, sk, sn, nr, dst, same_position{}, convert);
  } else {
    const index_t L = lanes;
    auto pair = [L](index_t jj) noexcept {
      const index_t g = jj / (2 * L), r = jj % (2 * L);
      return g * 2 * L + (r < L ? 2 * r : 2 * (r - L) + 1);
    };
    pack_panels_as(K, N, src, sk, sn, nr, dst, pair, convert);
  }
}

namespace portable_isa {
template <class S>
struct vec {
  using scalar = S;
  using reg = S;
  static constexpr int lanes = 1;
  static reg zero() noexcept { return S(0); }
  static reg load(const S* p) noexcept { return *p; }
  static reg load_n(const S* p, int n) noexcept { return n > 0 ? *p : S(0); }
  static void store(S* p, reg r) noexcept { *p = r; }
  static void store_n(S* p, reg r, int n) noexcept {
    if (n > 0) *p = r;
  }
  static reg set1(S s) noexcept { return s; }
  static reg fma(reg a, reg b, reg c) noexcept { return std::fma(a, b, c); }
  // One lane: the pair interleave of pack_panels_16 is the plain order.
  static void load_bf16_pair(const bf16_t* p, reg& lo, reg& hi) noexcept {
    lo = widen(p[0]);
    hi = widen(p[1]);
  }
  static reg load_f16(const f16_t* p) noexcept { return widen(*p); }
};
#include "panel_kernel.inc"
}  // namespace portable_isa

#if DMOE_HAVE_X86_KERNELS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2_isa {
alignas(32) inline constexpr std::int32_t mask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
alignas(32) inline constexpr std::int64_t mask64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
template <class S>
struct vec;
template <>
struct vec<float> {
  using scalar = float;
  using reg = __m256;
  static constexpr int lanes = 8;
  static __m256i mask(int n) noexcept {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask32 + 8 - (n < 0 ? 0 : n > 8 ? 8 : n)));
  }
  static reg zero() noexcept { return _mm256_setzero_ps(); }
  static reg load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static reg load_n(const float* p, int n) noexcept { return _mm256_maskload_ps(p, mask(n)); }
  static void store(float* p, reg r) noexcept { _mm256_storeu_ps(p, r); }
  static void store_n(float* p, reg r, int n) noexcept { _mm256_maskstore_ps(p, mask(n), r); }
  static reg set1(float s) noexcept { return _mm256_set1_ps(s); }
  static reg fma(reg a, reg b, reg c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  // 32-bit lane l holds columns l (low half) and 8 + l (high half): one load, two exact widenings.
  static void load_bf16_pair(const bf16_t* p, reg& lo, reg& hi) noexcept {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  static reg load_f16(const f16_t* p) noexcept {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
template <>
struct vec<double> {
  using scalar = double;
  using reg = __m256d;
  static constexpr int lanes = 4;
  static __m256i mask(int n) noexcept {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask64 + 4 - (n < 0 ? 0 : n > 4 ? 4 : n)));
  }
  static reg zero() noexcept { return _mm256_setzero_pd(); }
  static reg load(const double* p) noexcept { return _mm256_loadu_pd(p); }
  static reg load_n(const double* p, int n) noexcept { return _mm256_maskload_pd(p, mask(n)); }
  static void store(double* p, reg r) noexcept { _mm256_storeu_pd(p, r); }
  static void store_n(double* p, reg r, int n) noexcept { _mm256_maskstore_pd(p, mask(n), r); }
  static reg set1(double s) noexcept { return _mm256_set1_pd(s); }
  static reg fma(reg a, reg b, reg c) noexcept { return _mm256_fmadd_pd(a, b, c); }
};
#include "panel_kernel.inc"
}  // namespace avx2_isa
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif
namespace avx512_isa {
template <class S>
struct vec;
template <>
struct vec<float> {
  using scalar = float;
  using reg = __m512;
  static constexpr int lanes = 16;
  static __mmask16 mask(int n) noexcept {
    return static_cast<__mmask16>(n <= 0 ? 0u : n >= 16 ? 0xFFFFu : (1u << n) - 1u);
  }
  static reg zero() noexcept { return _mm512_setzero_ps(); }
  static reg load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static reg load_n(const float* p, int n) noexcept { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store(float* p, reg r) noexcept { _mm512_storeu_ps(p, r); }
  static void store_n(float* p, reg r, int n) noexcept { _mm512_mask_storeu_ps(p, mask(n), r); }
  static reg set1(float s) noexcept { return _mm512_set1_ps(s); }
  static reg fma(reg a, reg b, reg c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  // 32-bit lane l holds columns l (low half) and 16 + l (high half): one load, two exact widenings
  // (a shift and a mask) instead of two loads and two zero-extensions.
  static void load_bf16_pair(const bf16_t* p, reg& lo, reg& hi) noexcept {
    // (The maskz forms with a full mask: GCC 12 warns that the unmasked ones' undefined
    // pass-through operand "may be used uninitialized".)
    const __m512i raw = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(__mmask16(0xFFFFu), raw, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  static reg load_f16(const f16_t* p) noexcept {
    return _mm512_maskz_cvtph_ps(__mmask16(0xFFFFu), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

/// out[i][j] = in[j][i] for a 16 x 16 block of floats (rows ldi and ldo apart), in registers:
/// pairs unpacked, then 64-bit, 128-bit and 256-bit lanes exchanged (4 x 16 shuffles). (The
/// maskz forms with a full mask: see load_bf16_pair.)
inline void transpose16(const float* in, index_t ldi, float* out, index_t ldo) noexcept {
  const __mmask16 all = 0xFFFFu;
  __m512 r[16], t[16], u[16], v[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ldi);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_ps(all, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_ps(all, r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      v[i + j] = _mm512_maskz_shuffle_f32x4(all, u[i + j], u[i + 4 + j], 0x88);
      v[i + 4 + j] = _mm512_maskz_shuffle_f32x4(all, u[i + j], u[i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_maskz_shuffle_f32x4(all, v[j], v[8 + j], 0x88);
    r[8 + j] = _mm512_maskz_shuffle_f32x4(all, v[j], v[8 + j], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * ldo, r[i]);
}

/// One panel row of nr floats (a multiple of 32) as 16-bit values in pack_panels_16's layout,
/// rounded to nearest even with the bits of narrow<H> (bf16: integer rounding, NaN quieted the
/// same way; fp16: vcvtps2ph, which rounds as Eigen::half does).
template <class H>
inline void narrow_row(const float* x, index_t nr, H* out) noexcept {
  const __mmask16 all = 0xFFFFu;
  if constexpr (std::is_same_v<H, f16_t>) {
    for (index_t j = 0; j < nr; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                          _mm512_maskz_cvtps_ph(all, _mm512_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    const __m512i quiet = _mm512_set1_epi32(0x00400000);
    auto rounded = [&](const float* p) noexcept {  // bf16 bits in the high half of each lane
      const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(p));
      const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all, u, 16), one);
      const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, half));
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
      return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, quiet));
    };
    const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
    for (index_t g = 0; g < nr; g += 32) {  // lane l: column g + l low, g + 16 + l high
      const __m512i lo = _mm512_maskz_srli_epi32(all, rounded(x + g), 16);
      const __m512i hi = _mm512_and_si512(rounded(x + g + 16), high);
      _mm512_storeu_si512(out + g, _mm512_or_si512(lo, hi));
    }
  }
}

/// pack_panels for float when the source's columns are contiguous (sk = 1: W1 and W2 as stored,
/// the panels' transpose): full 16 x 16 blocks through transpose16, the edges element by element.
inline void pack_columns(index_t K, index_t N, const float* src, index_t sn, index_t nr, float* dst) noexcept {
  for (index_t j0 = 0; j0 < N; j0 += nr) {
    const index_t cols = (std::min)(nr, N - j0);
    float* panel = dst + (j0 / nr) * K * nr;
    const index_t kfull = K / 16 * 16, cfull = cols / 16 * 16;
    for (index_t k0 = 0; k0 < kfull; k0 += 16)
      for (index_t c0 = 0; c0 < cfull; c0 += 16) transpose16(src + (j0 + c0) * sn + k0, sn, panel + k0 * nr + c0, nr);
    for (index_t k = 0; k < K; ++k)
      for (index_t jj = k < kfull ? cfull : 0; jj < nr; ++jj)
        panel[k * nr + jj] = jj < cols ? src[(j0 + jj) * sn + k] : 0.0f;
  }
}
template <>
struct vec<double> {
  using scalar = double;
  using reg = __m512d;
  static constexpr int lanes = 8;
  static __mmask8 mask(int n) noexcept {
    return static_cast<__mmask8>(n <= 0 ? 0u : n >= 8 ? 0xFFu : (1u << n) - 1u);
  }
  static reg zero() noexcept { return _mm512_setzero_pd(); }
  static reg load(const double* p) noexcept { return _mm512_loadu_pd(p); }
  static reg load_n(const double* p, int n) noexcept { return _mm512_maskz_loadu_pd(mask(n), p); }
  static void store(double* p, reg r) noexcept { _mm512_storeu_pd(p, r); }
  static void store_n(double* p, reg r, int n) noexcept { _mm512_mask_storeu_pd(p, mask(n), r); }
  static reg set1(double s) noexcept { return _mm512_set1_pd(s); }
  static reg fma(reg a, reg b, reg c) noexcept { return _mm512_fmadd_pd(a, b, c); }
};
#include "panel_kernel.inc"
}  // namespace avx512_isa
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // DMOE_HAVE_X86_KERNELS

/// pack_panels with the fastest data movement `isa` has: the same values (a copy), so the choice
/// changes nothing but the time. AVX-512 transposes float blocks in registers: shape S's W1 and W2
/// (18.9 MB) repacked in about 4.4 ms (bench_backward: moe_top_k_step minus forward and backward)
/// against 5.8-6.5 ms element by element (Intel Xeon guest).
template <class T>
void pack_panels(cpu_isa isa, index_t K, index_t N, const T* src, index_t sk, index_t sn, index_t nr, T* dst) noexcept {
#if DMOE_HAVE_X86_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (isa == cpu_isa::avx512 && sk == 1) {
      avx512_isa::pack_columns(K, N, src, sn, nr, dst);
      return;
    }
  }
#endif
  (void)isa;
  pack_panels<T>(K, N, src, sk, sn, nr, dst);
}

/// pack_panels_16 with the data movement of `isa` (the same values). AVX-512 with its own panel
/// width (lanes 16, nr a multiple of 32): each block of 16 depth rows is gathered as floats
/// (transpose16 when the columns are contiguous), then rounded 16 values per instruction.
template <class H>
void pack_panels_16(cpu_isa isa, index_t K, index_t N, const float* src, index_t sk, index_t sn, index_t nr,
                    int lanes, H* dst) noexcept {
#if DMOE_HAVE_X86_KERNELS
  if (isa == cpu_isa::avx512 && lanes == 16 && nr % 32 == 0 && nr <= 64) {
    alignas(64) float blk[16 * 64];
    for (index_t j0 = 0; j0 < N; j0 += nr) {
      const index_t cols = (std::min)(nr, N - j0);
      H* panel = dst + (j0 / nr) * K * nr;
      if (cols < nr) {  // the edge panel: element by element
        pack_panels_16<H>(K, cols, src + j0 * sn, sk, sn, nr, lanes, panel);
        continue;
      }
      for (index_t k0 = 0; k0 < K; k0 += 16) {
        const index_t kb = (std::min)(index_t(16), K - k0);
        if (sk == 1 && kb == 16) {
          for (index_t c0 = 0; c0 < nr; c0 += 16) avx512_isa::transpose16(src + (j0 + c0) * sn + k0, sn, blk + c0, nr);
        } else {
          for (index_t kk = 0; kk < kb; ++kk)
            for (index_t jj = 0; jj < nr; ++jj) blk[kk * nr + jj] = src[(k0 + kk) * sk + (j0 + jj) * sn];
        }
        for (index_t kk = 0; kk < kb; ++kk) avx512_isa::narrow_row<H>(blk + kk * nr, nr, panel + (k0 + kk) * nr);
      }
    }
    return;
  }
#endif
  (void)isa;
  pack_panels_16<H>(K, N, src, sk, sn, nr, lanes, dst);
}

namespace panel_dispatch {
/// panel_kernel.inc's panel_product with the kernel and tile of `isa`.
template <bool AT, class T, class BS>
inline void run(cpu_isa isa, index_t m, index_t N, index_t K, row_source<T> a, const panel_b<BS>& b, const T* init,
                T* c, index_t ldc, bool accumulate) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "panel_product: float or double");
  static_assert(std::is_same_v<BS, T> || (std::is_same_v<T, float> && is_16bit_v<BS>),
                "panel_product: B panels of T, or 16-bit panels for float");
  if (m <= 0 || N <= 0) return;
  constexpr tile_shape tp = tile_for<T>(cpu_isa::portable, avx512_tile::tall);
#if DMOE_HAVE_X86_KERNELS
  constexpr tile_shape tall = tile_for<T>(cpu_isa::avx512, avx512_tile::tall);
  constexpr tile_shape wide = tile_for<T>(cpu_isa::avx512, avx512_tile::wide);
  constexpr tile_shape t2 = tile_for<T>(cpu_isa::avx2, avx512_tile::tall);
#endif
  switch (isa) {
#if DMOE_HAVE_X86_KERNELS
    case cpu_isa::avx512:
      if (active_avx512_tile() == avx512_tile::wide)
        avx512_isa::panel_product<avx512_isa::vec<T>, wide.mr, wide.nv, AT, BS>(m, N, K, a, b, init, c, ldc, accumulate);
      else
        avx512_isa::panel_product<avx512_isa::vec<T>, tall.mr, tall.nv, AT, BS>(m, N, K, a, b, init, c, ldc, accumulate);
      return;
    case cpu_isa::avx2:
      avx2_isa::panel_product<avx2_isa::vec<T>, t2.mr, t2.nv, AT, BS>(m, N, K, a, b, init, c, ldc, accumulate);
      return;
#endif
    default:
      portable_isa::panel_product<portable_isa::vec<T>, tp.mr, tp.nv, AT, BS>(m, N, K, a, b, init, c, ldc, accumulate);
      return;
  }
}
}  // namespace panel_dispatch

/// C (m x N, row stride ldc) = init + A B with the kernel of `isa`; B's panels must be
/// tile_for<T>(isa).nr() wide. init: N values, or null for 0. B may be 16-bit panels (BS bf16_t or
/// f16_t, packed by pack_panels_16 for this isa) when T is float: the result is then bitwise the
/// product with float panels of the rounded values.
template <class T, class BS>
inline void panel_product(cpu_isa isa, index_t m, index_t N, index_t K, row_source<T> a, const panel_b<BS>& b,
                          const T* init, T* c, index_t ldc) noexcept {
  panel_dispatch::run<false, T, BS>(isa, m, N, K, a, b, init, c, ldc, false);
}

/// C (m x N, row stride ldc) += A B where A is given transposed, at (K x m, row stride lda): the
/// weight gradients (dW^T += G^T H over a block of K token rows), with no transpose copied. Each
/// element continues its chain from C, so blocks of rows accumulated in a fixed order give the
/// same bits on every instruction set and tile. With `overwrite`, C = A B instead: the chains start
/// at +0, the bits of accumulating into a zeroed C, without writing the zeros first.
template <class T>
inline void panel_accumulate_at(cpu_isa isa, index_t m, index_t N, index_t K, const T* at, index_t lda,
                                const panel_b<T>& b, T* c, index_t ldc, bool overwrite = false) noexcept {
  panel_dispatch::run<true, T, T>(isa, m, N, K, row_source<T>{at, lda, nullptr}, b, nullptr, c, ldc, !overwrite);
}

/// dst[j] = fma(w, src[j], dst[j]) for j < n with the kernel of `isa` (the same bits on every one).
template <class T>
inline void scaled_add(cpu_isa isa, index_t n, T w, const T* src, T* dst) noexcept {
  switch (isa) {
#if DMOE_HAVE_X86_KERNELS
    case cpu_isa::avx512: avx512_isa::scaled_add_row<avx512_isa::vec<T>>(n, w, src, dst); return;
    case cpu_isa::avx2: avx2_isa::scaled_add_row<avx2_isa::vec<T>>(n, w, src, dst); return;
#endif
    default: portable_isa::scaled_add_row<portable_isa::vec<T>>(n, w, src, dst); return;
  }
}

/// sum_j a[j] b[j] with the kernel of `isa`, in the one order dot_row defines (the same bits on
/// every instruction set).
template <class T>
inline T dot(cpu_isa isa, index_t n, const T* a, const T* b) noexcept {
  switch (isa) {
#if DMOE_HAVE_X86_KERNELS
    case cpu_isa::avx512: return avx512_isa::dot_row<avx512_isa::vec<T>>(n, a, b);
    case cpu_isa::avx2: return avx2_isa::dot_row<avx2_isa::vec<T>>(n, a, b);
#endif
    default: return portable_isa::dot_row<portable_isa::vec<T>>(n, a, b);
  }
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
