// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Experts as grouped GEMMs over variable-size groups (one group per expert, rows in expert-major
/// order), on tensor cores through WMMA: fp16 and bf16 as 16x16x16 with fp32 accumulators, fp32
/// storage as TF32 16x16x8 (inputs rounded to TF32, fp32 accumulation). Persistent grid: the host
/// launches enough blocks for the worst case (or to fill the GPU); each block walks the linear
/// tile list whose length, tile_offsets[E] * column tiles, only the device knows; blocks past it
/// exit. Needs sm_80 or newer (bf16 WMMA).
///  - first GEMM: rows of x gathered through sorted_token as the tile is loaded (no copy of the
///    activations), + b1, activation (gated: act(gate) * up from two accumulator tiles of the same
///    block) in the epilogue, stored as T into `hidden` (sorted rows, width n);
///  - second GEMM: hidden rows (already sorted, contiguous) times W2_e, + b2_e, stored as T into
///    `out` (sorted rows, width d). The combine (combine.cuh) weights and sums them per token.
/// Each output element is one warp's fragment accumulated over K in a fixed order: deterministic.

#include <mma.h>

#include "../experts/activation.hpp"
#include "common.cuh"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

template <class T>
struct mma_traits;
template <>
struct mma_traits<float> {
  static constexpr int wk = 8;  // TF32 m16n16k8
  static constexpr int pad = 4;
  using a_frag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                        nvcuda::wmma::row_major>;
  using b_frag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                        nvcuda::wmma::col_major>;
  using c_frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
};
template <>
struct mma_traits<__half> {
  static constexpr int wk = 16;
  static constexpr int pad = 8;
  using a_frag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major>;
  using b_frag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::col_major>;
  using c_frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
};
template <>
struct mma_traits<__nv_bfloat16> {
  static constexpr int wk = 16;
  static constexpr int pad = 8;
  using a_frag =
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
  using b_frag =
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
  using c_frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
};

/// Shared-memory plan of one GEMM block (host-visible so the size is checked at compile time).
/// 16-bit storage gets two stages (cp.async double buffering); fp32 tiles are twice as large and
/// two stages would not fit the static 48 KiB, so fp32 keeps one.
template <class T, int NB>
struct gemm_smem {
  static constexpr int stages = sizeof(T) == 2 ? 2 : 1;
  static constexpr int lds = gemm_bk + mma_traits<T>::pad;  // row length of the A and B tiles
  static constexpr int ldc = gemm_bn + 4;                   // row length of the fp32 epilogue tile
  static constexpr std::size_t a_bytes = sizeof(T) * gemm_bm * lds;
  static constexpr std::size_t b_bytes = sizeof(T) * NB * gemm_bn * lds;
  static constexpr std::size_t stage_bytes = a_bytes + b_bytes;
  static constexpr std::size_t c_bytes = sizeof(float) * NB * gemm_bm * ldc;
  static constexpr std::size_t main_bytes = stages * stage_bytes;
  static constexpr std::size_t bytes = main_bytes > c_bytes ? main_bytes : c_bytes;
  static_assert(bytes + gemm_bm * sizeof(int) <= 48 * 1024, "GEMM tile exceeds static shared memory");
  // WMMA loads and stores need 256-bit aligned pointers: every fragment offset below is a multiple
  // of 16 rows or of wk columns, which these keep 32-byte aligned.
  static_assert((16 * lds * sizeof(T)) % 32 == 0 && (mma_traits<T>::wk * sizeof(T)) % 32 == 0, "WMMA alignment");
  static_assert((16 * ldc * sizeof(float)) % 32 == 0 && a_bytes % 32 == 0 && stage_bytes % 32 == 0,
                "WMMA alignment");
};

// cp.async (sm_80+): 16 bytes global -> shared, bypassing registers; src_bytes = 0 zero-fills.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  // "memory": the compiler must not move ordinary shared / global accesses across the copy.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

enum class gemm_stage : int { first = 1, second = 2 };

/// Arguments of one grouped GEMM: out[row, c] = epi(sum_k A[src(row), k] W_e[k, c]) for sorted rows
/// row of expert e, W_e column-major (K x columns), column c contiguous.
template <class T>
struct gemm_args {
  const T* a = nullptr;
  index_t lda = 0;
  const std::int32_t* gather = nullptr;  ///< token of each sorted row (first GEMM), or null: row itself
  const T* w = nullptr;
  index_t w_expert_stride = 0;  ///< elements between experts' matrices
  const T* bias = nullptr;      ///< per expert, bias_expert_stride apart; null: none
  index_t bias_expert_stride = 0;
  T* out = nullptr;  ///< (rows, N) dense
  int K = 0;
  int N = 0;  ///< output columns (gated: hidden units; the up columns follow at N in W and bias)
  int E = 0;
  const std::int32_t* expert_offsets = nullptr;
  const std::int32_t* tile_offsets = nullptr;
  /// 16-byte loads allowed: K, lda and the expert stride are multiples of 16 / sizeof(T) and a, w
  /// are 16-byte aligned (vector_loads_ok, decided on the host).
  bool vec = false;
};

/// Whether a GEMM's operands allow 16-byte vector loads (host).
template <class T>
bool vector_loads_ok(const void* a, index_t lda, const void* w, index_t w_expert_stride, index_t K) noexcept {
  constexpr index_t v = 16 / static_cast<index_t>(sizeof(T));
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return K % v == 0 && lda % v == 0 && w_expert_stride % v == 0 && aligned(a) && aligned(w);
}

template <class T, class Act, gemm_stage Stage>
__global__ void __launch_bounds__(gemm_threads) grouped_gemm_kernel(gemm_args<T> g) {
  using namespace nvcuda;
  constexpr bool gated = Stage == gemm_stage::first && Act::gated;
  constexpr int NB = gated ? 2 : 1;
  using tr = mma_traits<T>;
  using sm = gemm_smem<T, NB>;
  static_assert(gemm_threads == 128 && gemm_bm == 64 && gemm_bn == 64, "4 warps of 32 x 32");
  static_assert(gemm_bk % tr::wk == 0, "BK must be a multiple of the MMA K");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 / tf32 WMMA need sm_80+; the host side refuses older devices
#else
  __shared__ __align__(128) unsigned char smem[sm::bytes];
  __shared__ int row_src[gemm_bm];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + sm::a_bytes);
  float* Cs = reinterpret_cast<float*>(smem);  // reused after the main loop

  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int ntn = (g.N + gemm_bn - 1) / gemm_bn;
  // 64-bit tile counters: M-tiles x N-tiles may pass 2^31 at large token counts and widths.
  const index_t total = static_cast<index_t>(g.tile_offsets[g.E]) * ntn;
  const T zero = from_float<T>(0.f);

  for (index_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int mt = static_cast<int>(tile / ntn), nt = static_cast<int>(tile % ntn);
    const int e = expert_of_tile(g.tile_offsets, g.E, mt);
    const int row0 = g.expert_offsets[e] + (mt - g.tile_offsets[e]) * gemm_bm;
    const int row_end = g.expert_offsets[e + 1];
    const int col0 = nt * gemm_bn;
    const T* w = g.w + static_cast<index_t>(e) * g.w_expert_stride;

    for (int r = tid; r < gemm_bm; r += gemm_threads) {
      const int row = row0 + r;
      row_src[r] = row < row_end ? (g.gather ? g.gather[row] : row) : -1;
    }
    __syncthreads();

    typename tr::c_frag acc[NB][2][2];
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[b][i][j], 0.f);

    // The MMAs of one BK slice held in shared memory at (A, B).
    const auto mma_slice = [&](const T* A, const T* B) {
#pragma unroll
      for (int kk = 0; kk < gemm_bk; kk += tr::wk) {
        typename tr::a_frag af[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(af[i], A + (wm * 32 + i * 16) * sm::lds + kk, sm::lds);
          if constexpr (std::is_same_v<T, float>)
            for (int q = 0; q < af[i].num_elements; ++q) af[i].x[q] = wmma::__float_to_tf32(af[i].x[q]);
        }
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            typename tr::b_frag bf;
            wmma::load_matrix_sync(bf, B + (b * gemm_bn + wn * 32 + j * 16) * sm::lds + kk, sm::lds);
            if constexpr (std::is_same_v<T, float>)
              for (int q = 0; q < bf.num_elements; ++q) bf.x[q] = wmma::__float_to_tf32(bf.x[q]);
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[b][i][j], af[i], bf, acc[b][i][j]);
          }
      }
    };

    bool done = false;
    if constexpr (sm::stages == 2) {
      if (g.vec) {
        // Two-stage cp.async pipeline (16-bit storage, 16-byte aligned operands): the copies of
        // slice kt + 1 are in flight while the MMAs of slice kt run. Stage s is rewritten only
        // after the __syncthreads that ends the MMAs which read it.
        constexpr int v = 8, per_row = gemm_bk / v;
        const auto stage_a = [&](int st) { return reinterpret_cast<T*>(smem + st * sm::stage_bytes); };
        const auto stage_b = [&](int st) { return reinterpret_cast<T*>(smem + st * sm::stage_bytes + sm::a_bytes); };
        const auto issue = [&](int st, int k0) {
          T* A = stage_a(st);
          T* B = stage_b(st);
          for (int idx = tid; idx < gemm_bm * per_row; idx += gemm_threads) {
            const int r = idx / per_row, kk = (idx % per_row) * v, k = k0 + kk;
            const int src = row_src[r];
            const bool ok = src >= 0 && k < g.K;
            cp_async16(A + r * sm::lds + kk, ok ? g.a + static_cast<index_t>(src) * g.lda + k : g.a, ok);
          }
#pragma unroll
          for (int b = 0; b < NB; ++b)
            for (int idx = tid; idx < gemm_bn * per_row; idx += gemm_threads) {
              const int c = idx / per_row, kk = (idx % per_row) * v, k = k0 + kk, col = col0 + c;
              const bool ok = col < g.N && k < g.K;
              cp_async16(B + (b * gemm_bn + c) * sm::lds + kk, ok ? w + static_cast<index_t>(col + b * g.N) * g.K + k : w,
                         ok);
            }
        };
        const int nk = (g.K + gemm_bk - 1) / gemm_bk;
        issue(0, 0);
        cp_async_commit();
        for (int kt = 0; kt < nk; ++kt) {
          if (kt + 1 < nk) {
            issue((kt + 1) & 1, (kt + 1) * gemm_bk);
            cp_async_commit();
            cp_async_wait<1>();  // slice kt has landed; kt + 1 may still be in flight
          } else {
            cp_async_wait<0>();
          }
          __syncthreads();
          mma_slice(stage_a(kt & 1), stage_b(kt & 1));
          __syncthreads();
        }
        done = true;
      }
    }
    if (!done) {
      for (int k0 = 0; k0 < g.K; k0 += gemm_bk) {
        // Load: consecutive threads read consecutive k of one row (gathered) / one weight column;
        // 16 bytes at a time when the host allowed it (K a multiple of the vector, so a vector is
        // either wholly inside K or wholly past it), element by element otherwise.
        if (g.vec) {
          constexpr int v = 16 / static_cast<int>(sizeof(T)), per_row = gemm_bk / v;
          static_assert((sm::lds * sizeof(T)) % 16 == 0, "shared rows must keep 16-byte alignment");
          for (int idx = tid; idx < gemm_bm * per_row; idx += gemm_threads) {
            const int r = idx / per_row, kk = (idx % per_row) * v, k = k0 + kk;
            const int src = row_src[r];
            uint4 val = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are 0 in every storage type
            if (src >= 0 && k < g.K) val = *reinterpret_cast<const uint4*>(g.a + static_cast<index_t>(src) * g.lda + k);
            *reinterpret_cast<uint4*>(As + r * sm::lds + kk) = val;
          }
#pragma unroll
          for (int b = 0; b < NB; ++b)
            for (int idx = tid; idx < gemm_bn * per_row; idx += gemm_threads) {
              const int c = idx / per_row, kk = (idx % per_row) * v, k = k0 + kk, col = col0 + c;
              uint4 val = make_uint4(0u, 0u, 0u, 0u);
              if (col < g.N && k < g.K)
                val = *reinterpret_cast<const uint4*>(w + static_cast<index_t>(col + b * g.N) * g.K + k);
              *reinterpret_cast<uint4*>(Bs + (b * gemm_bn + c) * sm::lds + kk) = val;
            }
        } else {
          for (int idx = tid; idx < gemm_bm * gemm_bk; idx += gemm_threads) {
            const int r = idx / gemm_bk, kk = idx % gemm_bk, k = k0 + kk;
            const int src = row_src[r];
            As[r * sm::lds + kk] = (src >= 0 && k < g.K) ? g.a[static_cast<index_t>(src) * g.lda + k] : zero;
          }
#pragma unroll
          for (int b = 0; b < NB; ++b)
            for (int idx = tid; idx < gemm_bn * gemm_bk; idx += gemm_threads) {
              const int c = idx / gemm_bk, kk = idx % gemm_bk, k = k0 + kk, col = col0 + c;
              Bs[(b * gemm_bn + c) * sm::lds + kk] =
                  (col < g.N && k < g.K) ? w[static_cast<index_t>(col + b * g.N) * g.K + k] : zero;
            }
        }
        __syncthreads();
        mma_slice(As, Bs);
        __syncthreads();
      }
    }

    // Epilogue through shared memory: bias, activation, conversion to T, masked store.
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(Cs + b * gemm_bm * sm::ldc + (wm * 32 + i * 16) * sm::ldc + wn * 32 + j * 16,
                                  acc[b][i][j], sm::ldc, wmma::mem_row_major);
    __syncthreads();
    const T* bias = g.bias ? g.bias + static_cast<index_t>(e) * g.bias_expert_stride : nullptr;
    for (int idx = tid; idx < gemm_bm * gemm_bn; idx += gemm_threads) {
      const int r = idx / gemm_bn, c = idx % gemm_bn, row = row0 + r, col = col0 + c;
      if (row >= row_end || col >= g.N) continue;
      float v = Cs[r * sm::ldc + c] + (bias ? to_float(bias[col]) : 0.f);
      if constexpr (gated) {
        const float up = Cs[gemm_bm * sm::ldc + r * sm::ldc + c] + (bias ? to_float(bias[g.N + col]) : 0.f);
        v = Act::base::template apply<float>(v) * up;
      } else if constexpr (Stage == gemm_stage::first) {
        v = Act::template apply<float>(v);
      }
      g.out[static_cast<index_t>(row) * g.N + col] = from_float_saturating<T>(v);  // fp16: no inf (common.cuh)
    }
    __syncthreads();  // Cs aliases the next tile's A/B tiles and row_src is rewritten
  }
#endif
}

/// Launches one grouped GEMM on a persistent grid of `grid` blocks.
template <class T, class Act, gemm_stage Stage>
cudaError_t grouped_gemm(const gemm_args<T>& g, index_t grid, cudaStream_t stream) noexcept {
  grouped_gemm_kernel<T, Act, Stage><<<static_cast<unsigned>(grid), gemm_threads, 0, stream>>>(g);
  return cudaGetLastError();
}

/// A layer's expert weights on the device (storage type T); null biases when absent.
template <class T>
struct expert_params {
  const T* w1 = nullptr;   ///< (E, d x f n) column-major per expert
  const T* b1 = nullptr;   ///< (E, f n)
  const T* w2 = nullptr;   ///< (E, n x d) column-major per expert
  const T* b2e = nullptr;  ///< (E, d)
};

/// Enqueues both grouped GEMMs over the dispatched rows: hidden = act(x[sorted] W1_e + b1_e),
/// out = hidden W2_e + b2_e (the CPU side's cpu/experts.hpp run_experts).
template <class T, class Act>
status run_experts(const T* x, index_t ldx, const layer_buffers& b, const expert_params<T>& w, index_t d, index_t n,
                   int E, int sm_count, cudaStream_t stream) noexcept {
  const index_t fn = width_factor<Act> * n;
  const index_t m_tiles = max_m_tiles(b.slot_capacity, E);  // rows never exceed the slot bound
  gemm_args<T> g1;
  g1.a = x;
  g1.lda = ldx;
  g1.gather = b.sorted_token;
  g1.w = w.w1;
  g1.w_expert_stride = d * fn;
  g1.bias = w.b1;
  g1.bias_expert_stride = fn;
  g1.out = reinterpret_cast<T*>(b.hidden);
  g1.K = static_cast<int>(d);
  g1.N = static_cast<int>(n);
  g1.E = E;
  g1.expert_offsets = b.expert_offsets;
  g1.tile_offsets = b.tile_offsets;
  g1.vec = vector_loads_ok<T>(g1.a, g1.lda, g1.w, g1.w_expert_stride, g1.K);
  cudaError_t err = grouped_gemm<T, Act, gemm_stage::first>(g1, persistent_grid(m_tiles * n_tiles(n), sm_count), stream);
  if (err != cudaSuccess) return cuda_failure(err, "grouped GEMM 1 launch");
  gemm_args<T> g2 = g1;
  g2.a = reinterpret_cast<const T*>(b.hidden);
  g2.lda = n;
  g2.gather = nullptr;
  g2.w = w.w2;
  g2.w_expert_stride = n * d;
  g2.bias = w.b2e;
  g2.bias_expert_stride = d;
  g2.out = reinterpret_cast<T*>(b.out);
  g2.K = static_cast<int>(n);
  g2.N = static_cast<int>(d);
  g2.vec = vector_loads_ok<T>(g2.a, g2.lda, g2.w, g2.w_expert_stride, g2.K);
  err = grouped_gemm<T, Act, gemm_stage::second>(g2, persistent_grid(m_tiles * n_tiles(d), sm_count), stream);
  if (err != cudaSuccess) return cuda_failure(err, "grouped GEMM 2 launch");
  return {};
}

// --- backward (the CPU side's expert_backward) ----------------------------------------------------
// Plain fp32 SIMT kernels, written for correctness and bitwise reproducibility first (docs/cuda.md:
// what the tensor-core version will change): every sum runs in a fixed order, sorted rows of an
// expert in ascending row order (the CPU's order), no atomics. Each launch size comes from host
// bounds (slot capacity, layer shape); work past the device's real row count exits.

inline constexpr int backward_threads = 256;

/// Per sorted row r (one block each): g = w_s dy_t, pre = b1_e + x_t W1_e (recomputed in fp32: the
/// forward keeps only the activation), dpost = g W2_e^T, dpre = act'(pre) dpost (in place of pre),
/// dx_slot = dpre W1_e^T. Rows past the plan, and every row of a batch beyond the slot bound, exit.
template <class T, class Act>
__global__ void __launch_bounds__(backward_threads)
    expert_row_backward_kernel(layer_buffers b, backward_buffers w, const T* __restrict__ x, index_t ldx,
                               const T* __restrict__ dy, index_t ldy, expert_params<T> p, int d, int n, int E) {
  const int r = static_cast<int>(blockIdx.x);
  if (*b.slot_overflow != 0 || r >= b.expert_offsets[E]) return;
  const int e = expert_of_tile(b.expert_offsets, E, r);  // largest e with expert_offsets[e] <= r
  const index_t tok = b.sorted_token[r];
  const float ws = b.slot_weight[b.sort_vals_out[r]];
  const int fn = width_factor<Act> * n;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warps = backward_threads / 32;
  float* g = w.g + static_cast<index_t>(r) * d;
  float* dpost = w.dpost + static_cast<index_t>(r) * n;
  float* dpre = w.dpre + static_cast<index_t>(r) * fn;
  float* dxs = w.dx_slot + static_cast<index_t>(r) * d;
  const T* xt = x + tok * ldx;
  const T* w1 = p.w1 + static_cast<index_t>(e) * d * fn;  // column j of W1_e contiguous (j d + i)
  const T* w2 = p.w2 + static_cast<index_t>(e) * n * d;   // W2_e^T row-major (c n + j)
  for (int c = tid; c < d; c += backward_threads) g[c] = ws * to_float(dy[tok * ldy + c]);
  for (int j = tid / 32; j < fn; j += warps) {  // one warp per column, lanes over d (coalesced)
    float acc = 0.f;
    for (int i = lane; i < d; i += 32) acc = fmaf(to_float(xt[i]), to_float(w1[static_cast<index_t>(j) * d + i]), acc);
    acc = warp_sum(acc);
    if (lane == 0) dpre[j] = acc + (p.b1 ? to_float(p.b1[static_cast<index_t>(e) * fn + j]) : 0.f);
  }
  __syncthreads();
  for (int j = tid; j < n; j += backward_threads) {
    float acc = 0.f;
    for (int c = 0; c < d; ++c) acc = fmaf(g[c], to_float(w2[static_cast<index_t>(c) * n + j]), acc);
    dpost[j] = acc;
  }
  __syncthreads();
  for (int j = tid; j < n; j += backward_threads) {
    if constexpr (Act::gated) {
      using B = typename Act::base;
      const float pg = dpre[j], pu = dpre[n + j];
      dpre[j] = dpost[j] * pu * B::template derivative<float>(pg);
      dpre[n + j] = dpost[j] * B::template apply<float>(pg);
    } else {
      dpre[j] = dpost[j] * Act::template derivative<float>(dpre[j]);
    }
  }
  __syncthreads();
  for (int i = tid; i < d; i += backward_threads) {
    float acc = 0.f;
    for (int j = 0; j < fn; ++j) acc = fmaf(dpre[j], to_float(w1[static_cast<index_t>(j) * d + i]), acc);
    dxs[i] = acc;
  }
}

/// Rows of expert e in sorted order, [begin, end); empty for a batch beyond the slot bound.
__device__ __forceinline__ void expert_rows(const layer_buffers& b, int e, int& begin, int& end) {
  begin = b.expert_offsets[e];
  end = *b.slot_overflow != 0 ? begin : b.expert_offsets[e + 1];
}

/// Expert weight and bias gradients, one thread per gradient element, each a sum over the
/// expert's rows in ascending sorted order (the same order for every run: bitwise reproducible).
/// dW2_e^T[c, j] = sum_r post_r[j] g_r[c]; db2e[c] = sum_r g_r[c]; dW1_e^T[j, i] = sum_r dpre_r[j]
/// x_r[i]; db1[j] = sum_r dpre_r[j]. Grid-stride over the E x (shape) elements.
template <class T>
__global__ void expert_weight_grad_kernel(layer_buffers b, backward_buffers w, const T* __restrict__ x, index_t ldx,
                                          int d, int n, int fn, int E, float* __restrict__ gw1, float* __restrict__ gb1,
                                          float* __restrict__ gw2, float* __restrict__ gb2e) {
  const index_t per_w2 = static_cast<index_t>(d) * n, per_w1 = static_cast<index_t>(fn) * d;
  const index_t n_w2 = E * per_w2, n_w1 = E * per_w1;
  const index_t n_b2 = gb2e ? static_cast<index_t>(E) * d : 0, n_b1 = gb1 ? static_cast<index_t>(E) * fn : 0;
  const index_t total = n_w2 + n_w1 + n_b2 + n_b1;
  const T* post_all = reinterpret_cast<const T*>(b.hidden);
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    int r0, r1;
    float acc = 0.f;
    if (idx < n_w2) {  // (e, c, j), j fastest: post rows coalesced, g broadcast
      const int e = static_cast<int>(idx / per_w2);
      const index_t k = idx % per_w2;
      const int c = static_cast<int>(k / n), j = static_cast<int>(k % n);
      expert_rows(b, e, r0, r1);
      for (int r = r0; r < r1; ++r)
        acc = fmaf(to_float(post_all[static_cast<index_t>(r) * n + j]), w.g[static_cast<index_t>(r) * d + c], acc);
      gw2[idx] = acc;
    } else if (idx < n_w2 + n_w1) {  // (e, j, i), i fastest: x rows coalesced
      const index_t q = idx - n_w2;
      const int e = static_cast<int>(q / per_w1);
      const index_t k = q % per_w1;
      const int j = static_cast<int>(k / d), i = static_cast<int>(k % d);
      expert_rows(b, e, r0, r1);
      for (int r = r0; r < r1; ++r)
        acc = fmaf(w.dpre[static_cast<index_t>(r) * fn + j], to_float(x[b.sorted_token[r] * ldx + i]), acc);
      gw1[q] = acc;
    } else if (idx < n_w2 + n_w1 + n_b2) {
      const index_t q = idx - n_w2 - n_w1;
      const int e = static_cast<int>(q / d), c = static_cast<int>(q % d);
      expert_rows(b, e, r0, r1);
      for (int r = r0; r < r1; ++r) acc += w.g[static_cast<index_t>(r) * d + c];
      gb2e[q] = acc;
    } else {
      const index_t q = idx - n_w2 - n_w1 - n_b2;
      const int e = static_cast<int>(q / fn), j = static_cast<int>(q % fn);
      expert_rows(b, e, r0, r1);
      for (int r = r0; r < r1; ++r) acc += w.dpre[static_cast<index_t>(r) * fn + j];
      gb1[q] = acc;
    }
  }
}

/// Fp32 gradients of the expert parameters, device pointers; null where the layer has no such bias.
struct expert_grads {
  float* w1 = nullptr;
  float* b1 = nullptr;
  float* w2 = nullptr;
  float* b2e = nullptr;
};

/// Enqueues the expert backward: per-row products, then the weight gradients (which read them).
template <class T, class Act>
status expert_backward(const T* x, index_t ldx, const T* dy, index_t ldy, const layer_buffers& b,
                       const backward_buffers& w, const expert_params<T>& p, const expert_grads& gr, index_t d,
                       index_t n, int E, cudaStream_t stream) noexcept {
  const index_t fn = width_factor<Act> * n;
  if (b.slot_capacity > 0) {
    expert_row_backward_kernel<T, Act><<<static_cast<unsigned>(b.slot_capacity), backward_threads, 0, stream>>>(
        b, w, x, ldx, dy, ldy, p, static_cast<int>(d), static_cast<int>(n), E);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_failure(err, "expert_row_backward_kernel launch");
  }
  const index_t total = E * (d * n + fn * d + (gr.b2e ? d : 0) + (gr.b1 ? fn : 0));
  expert_weight_grad_kernel<T><<<stride_grid(total, backward_threads), backward_threads, 0, stream>>>(
      b, w, x, ldx, static_cast<int>(d), static_cast<int>(n), static_cast<int>(fn), E, gr.w1, gr.b1, gr.w2, gr.b2e);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_failure(err, "expert_weight_grad_kernel launch");
  return {};
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
