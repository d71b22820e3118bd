// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Routing on the device: router products (fp32 SIMT tiles, fixed summation order), the per-token
/// rule of routing/selection.hpp (the very functions the CPU backend calls), and the compaction of
/// the strided per-token selections into the plan's compressed rows. Every size is known on the
/// host from the token count; a NaN score is recorded on the device (error_token), never waited on.

#include <cstdint>
#include <type_traits>

#include "../routing/options.hpp"
#include "../routing/selection.hpp"
#include "common.cuh"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

enum class router_epilogue : int { none = 0, relu = 1, abs = 2 };

/// C (rows x M, dense) = epi(A (rows x K, row stride lda) B + bias), B column-major (K x M), fp32
/// accumulate. One 32 x 32 tile per block; each thread owns 4 rows of one column.
template <class TA>
__global__ void __launch_bounds__(router_threads)
    router_product_kernel(const TA* __restrict__ A, index_t lda, int rows, int K, const float* __restrict__ B, int M,
                          const float* __restrict__ bias, float* __restrict__ C, router_epilogue epi) {
  static_assert(router_tile == 32 && router_threads == 256, "router_product_kernel assumes a 32 x 32 tile, 8 warps");
  __shared__ float As[router_tile][router_tile + 1];
  __shared__ float Bs[router_tile][router_tile + 1];
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 32, ty = tid / 32;
  // Row tiles on x (up to 2^31 - 1 blocks), column tiles (E or the router width) on y.
  const int row0 = static_cast<int>(blockIdx.x) * router_tile, col0 = static_cast<int>(blockIdx.y) * router_tile;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k0 = 0; k0 < K; k0 += router_tile) {
    for (int idx = tid; idx < router_tile * router_tile; idx += router_threads) {
      const int r = idx / router_tile, kk = idx % router_tile;
      const int gr = row0 + r, gk = k0 + kk;
      As[r][kk] = (gr < rows && gk < K) ? to_float(A[static_cast<index_t>(gr) * lda + gk]) : 0.f;
      const int gc = col0 + r;  // here r indexes the column, kk the reduction
      Bs[kk][r] = (gc < M && gk < K) ? B[static_cast<index_t>(gc) * K + gk] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < router_tile; ++kk) {
      const float b = Bs[kk][tx];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = fmaf(As[ty * 4 + i][kk], b, acc[i]);
    }
    __syncthreads();
  }
  const int c = col0 + tx;
  if (c >= M) return;
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty * 4 + i;
    if (r >= rows) continue;
    float v = acc[i] + (bias ? bias[c] : 0.f);
    if (epi == router_epilogue::relu) v = v < 0.f ? 0.f : v;  // keeps NaN, as the CPU router does
    if (epi == router_epilogue::abs) v = fabsf(v);
    C[static_cast<index_t>(r) * M + c] = v;
  }
}

template <class TA>
cudaError_t router_product(const TA* A, index_t lda, index_t rows, index_t K, const float* B, index_t M,
                           const float* bias, float* C, router_epilogue epi, cudaStream_t stream) noexcept {
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, router_tile)), static_cast<unsigned>(ceil_div(M, router_tile)));
  router_product_kernel<TA><<<grid, router_threads, 0, stream>>>(A, lda, static_cast<int>(rows), static_cast<int>(K), B,
                                                                 static_cast<int>(M), bias, C, epi);
  return cudaGetLastError();
}

/// Device parameters of the selection rule (the policy itself is the kernel's template argument).
struct select_params {
  int E = 0;
  int max_k = 0;   ///< stride of the per-token selections
  int k = 0;       ///< top_k: k; dynamic_k: k_max cap (0 = none)
  bool renormalize = true;
  float tau = 0.f;
  bool training = false;
  const float* expert_norm = nullptr;      ///< top_any: max(|w_e|, eps)
  const float* threshold = nullptr;        ///< top_any: g
  const std::uint8_t* active = nullptr;    ///< top_any: mask
  float norm_eps = 1e-12f;
};

/// One warp per token: applies the rule of Policy (routing/selection.hpp) to the token's scores,
/// writes its selections at stride max_k, its count, and its radix-sort keys (expert id, or the
/// sentinel E for unused slots) with values = the strided slot index. Policy is a template
/// argument, as everywhere else in the library: each instantiation holds one rule only.
template <class T, class Policy>
__global__ void __launch_bounds__(select_warps * 32)
    select_kernel(select_params p, const T* __restrict__ x, index_t ldx, int d, int tokens, float* __restrict__ scores,
                  layer_buffers b) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int t = static_cast<int>(blockIdx.x) * select_warps + static_cast<int>(threadIdx.x) / 32;
  if (blockIdx.x == 0 && threadIdx.x == 0) b.counts[tokens] = 0;
  if (t >= tokens) return;
  float* s = scores + static_cast<index_t>(t) * p.E;
  const index_t base = static_cast<index_t>(t) * p.max_k;
  if constexpr (std::is_same_v<Policy, top_any>) {
    // cos_te = <x, w_e> / (max(|x|, eps) max(|w_e|, eps)); |x| reduced in a fixed lane order.
    const T* xr = x + static_cast<index_t>(t) * ldx;
    float sq = 0.f;
    for (int j = lane; j < d; j += 32) {
      const float v = to_float(xr[j]);
      sq = fmaf(v, v, sq);
    }
    for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    const float xn = fmaxf(sqrtf(sq), p.norm_eps);
    for (int e = lane; e < p.E; e += 32) s[e] = s[e] / (xn * p.expert_norm[e]);
    __syncwarp();
  }
  int c = 0;
  if (lane == 0) {
    index_t cnt = 0;
    if constexpr (std::is_same_v<Policy, top_k>) {
      float lse = 0.f;
      cnt = detail::select_top_k(s, p.E, p.k, p.renormalize, b.slot_expert + base, b.slot_weight + base, &lse);
    } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
      cnt = detail::select_dynamic_k(s, p.E, p.tau, p.k, b.slot_expert + base, b.slot_weight + base);
    } else {
      cnt = detail::select_top_any(s, p.threshold, p.active, p.E, p.training, b.slot_expert + base,
                                   b.slot_weight + base);
    }
    if (cnt < 0) {
      atomicMin(b.error_token, static_cast<unsigned long long>(t));  // min is order-independent
      cnt = 0;
    }
    c = static_cast<int>(cnt);
    b.counts[t] = c;
  }
  (void)c;  // the sort's input is built from the compacted plan (dispatch.cuh sort_input_kernel)
}

/// A layer's router parameters on the device (fp32), whichever the policy uses.
struct router_params {
  const float* w = nullptr;            ///< top_k: Wr, top_any: W (d x E, column-major); dynamic_k: Wa (d x h)
  const float* b = nullptr;            ///< top_k: bias (E); top_any: thresholds g (E)
  const float* w2 = nullptr;           ///< dynamic_k: Wb (h x E)
  const float* expert_norm = nullptr;  ///< top_any: max(|w_e|, eps) (E)
  const std::uint8_t* active = nullptr;  ///< top_any: mask (E)
  index_t hidden = 0;                  ///< dynamic_k router width h
};

template <class Policy>
select_params make_select_params(index_t E, index_t max_k, const typename Policy::options& opt,
                                 const router_params& r) noexcept {
  select_params p;
  p.E = static_cast<int>(E);
  p.max_k = static_cast<int>(max_k);
  if constexpr (std::is_same_v<Policy, top_k>) {
    p.k = static_cast<int>(opt.k);
    p.renormalize = opt.renormalize;
  } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
    p.k = static_cast<int>(opt.k_max);
    p.tau = static_cast<float>(opt.tau);
  } else {
    p.training = opt.training;
    p.expert_norm = r.expert_norm;
    p.threshold = r.b;
    p.active = r.active;
  }
  return p;
}

/// Enqueues routing of `tokens` rows of x: router products into b.scores (dynamic_k: through
/// b.router_hidden), then the selection kernel of Policy.
template <class Policy, class T>
status route(const T* x, index_t ldx, index_t tokens, index_t d, index_t E, index_t max_k,
             const typename Policy::options& opt, const router_params& r, layer_buffers& b,
             cudaStream_t stream) noexcept {
  cudaError_t err = cudaSuccess;
  if constexpr (std::is_same_v<Policy, top_k>) {
    err = router_product(x, ldx, tokens, d, r.w, E, r.b, b.scores, router_epilogue::none, stream);
  } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
    const index_t h = r.hidden;
    err = router_product(x, ldx, tokens, d, r.w, h, nullptr, b.router_hidden, router_epilogue::relu, stream);
    if (err == cudaSuccess)
      err = router_product(static_cast<const float*>(b.router_hidden), h, tokens, h, r.w2, E, nullptr, b.scores,
                           router_epilogue::abs, stream);
  } else {
    err = router_product(x, ldx, tokens, d, r.w, E, nullptr, b.scores, router_epilogue::none, stream);
  }
  if (err != cudaSuccess) return cuda_failure(err, "router product launch");
  select_kernel<T, Policy><<<static_cast<unsigned>(blocks_for(tokens, select_warps)), select_warps * 32, 0, stream>>>(
      make_select_params<Policy>(E, max_k, opt, r), x, ldx, static_cast<int>(d), static_cast<int>(tokens), b.scores, b);
  if ((err = cudaGetLastError()) != cudaSuccess) return cuda_failure(err, "select_kernel launch");
  return {};
}

/// Copies each token's selections from the strided layout into the compressed plan rows.
// (Kernels are templates, even with nothing to vary, so that every .cu TU may include this header:
// a non-template __global__ function would be defined once per TU and clash at link time.)
template <class = void>
__global__ void compact_plan_kernel(layer_buffers b, int max_k) {
  const index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= b.items) return;
  const index_t t = j / max_k, i = j % max_k;
  if (i >= b.counts[t]) return;
  const index_t dst = b.token_offsets[t] + i;
  if (dst >= b.slot_capacity) return;  // beyond the slot bound: the batch is refused (slot_bound_kernel)
  b.plan_expert[dst] = b.slot_expert[j];
  b.plan_weight[dst] = b.slot_weight[j];
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
