// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Router backward and auxiliary-loss gradients on the device (the CPU side's cpu/route_backward.hpp,
/// whose formulas docs/algorithms.md derives). Inputs: the forward's scores and strided plan
/// (layer_buffers), dL/dw_s per strided slot (backward_buffers::dweight). Outputs: fp32 router
/// gradients (overwritten) and the router's part of dL/dx (backward_buffers::dx_router). Every
/// float sum runs in a fixed order (per-token warps with warp_sum, per-parameter loops over tokens
/// in token order); the only atomics add integers (slot counts), whose result has no order.

#include "../routing/aux_loss.hpp"
#include "../routing/routers.hpp"
#include "common.cuh"
#include "route.cuh"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

/// Fp32 router gradients on the device (null where the policy has no such parameter).
struct router_grads {
  float* w = nullptr;   ///< top_k: dWr, top_any: dW (d x E column-major); dynamic_k: dWa
  float* b = nullptr;   ///< top_k: dbias; top_any: d thresholds
  float* w2 = nullptr;  ///< dynamic_k: dWb
  index_t w_size = 0, b_size = 0, w2_size = 0;
};

inline constexpr int router_bwd_threads = 256;

// --- top_k ---------------------------------------------------------------------------------

/// token_aux[t] = logsumexp_e z_te with z = x W + b recomputed in fp32 (the forward keeps only
/// softmax p): one block per token, one warp per expert, the sum over experts by thread 0 in
/// expert order. The logits go to dscores (overwritten by topk_dz_kernel).
template <class T>
__global__ void __launch_bounds__(router_bwd_threads)
    topk_logsumexp_kernel(const T* __restrict__ x, index_t ldx, int d, int E, router_params rp, backward_buffers w) {
  const index_t t = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x) % 32, warps = router_bwd_threads / 32;
  float* z = w.dscores + t * E;
  for (int e = static_cast<int>(threadIdx.x) / 32; e < E; e += warps) {
    float acc = 0.f;
    for (int i = lane; i < d; i += 32) acc = fmaf(to_float(x[t * ldx + i]), rp.w[static_cast<index_t>(e) * d + i], acc);
    acc = warp_sum(acc);
    if (lane == 0) z[e] = acc + (rp.b ? rp.b[e] : 0.f);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = -INFINITY, s = 0.f;
    for (int e = 0; e < E; ++e) m = fmaxf(m, z[e]);
    for (int e = 0; e < E; ++e) s += expf(z[e] - m);
    w.token_aux[t] = m + logf(s);
  }
}

/// Slots per expert (integer atomics: the count has no order). expert_count zeroed before.
template <class = void>
__global__ void expert_count_kernel(layer_buffers b, int max_k, backward_buffers w) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t s = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < b.items; s += stride)
    if (s % max_k < b.counts[s / max_k]) atomicAdd(&w.expert_count[b.slot_expert[s]], 1);
}

/// dz_t (dL/dlogits) per token, one warp each: dp = load-balance gradient + the combine weights'
/// gradients (through the renormalisation when on); dz = p (dp - <p, dp>) + z-loss term.
template <class = void>
__global__ void __launch_bounds__(router_bwd_threads)
    topk_dz_kernel(layer_buffers b, backward_buffers w, int E, int max_k, bool renorm, float lb, float zc,
                   bool use_counts) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const index_t t = static_cast<index_t>(blockIdx.x) * (router_bwd_threads / 32) + threadIdx.x / 32;
  if (t >= b.tokens) return;
  const index_t tokens = b.tokens, nnz = b.token_offsets[tokens];
  const float* p = b.scores + t * E;
  float* dz = w.dscores + t * E;
  for (int e = lane; e < E; e += 32)
    dz[e] = use_counts && nnz > 0
                ? lb * float(E) * (float(w.expert_count[e]) / float(nnz)) / float(tokens)
                : 0.f;
  __syncwarp();
  if (lane == 0) {
    const index_t base = t * max_k;
    const int cnt = b.counts[t];
    float sel = 0.f, dot = 0.f;
    for (int i = 0; i < cnt; ++i) {
      const float pe = p[b.slot_expert[base + i]];
      sel += pe;
      dot += w.dweight[base + i] * pe;
    }
    for (int i = 0; i < cnt; ++i) {
      const float dw = w.dweight[base + i];
      dz[b.slot_expert[base + i]] += renorm ? dw / sel - dot / (sel * sel) : dw;
    }
  }
  __syncwarp();
  float pdp = 0.f;
  for (int e = lane; e < E; e += 32) pdp = fmaf(p[e], dz[e], pdp);
  pdp = warp_sum(pdp);
  const float zg = zc * 2.f * (zc != 0.f ? w.token_aux[t] : 0.f) / float(tokens);
  for (int e = lane; e < E; e += 32) dz[e] = p[e] * (dz[e] - pdp) + zg * p[e];
}

/// dx_router[t, i] = sum_e dz_te W[i, e] (expert order): one thread per element.
template <class = void>
__global__ void gate_dx_kernel(backward_buffers w, const float* __restrict__ W, int d, int E) {
  const index_t total = w.tokens * d, stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    const index_t t = q / d;
    const int i = static_cast<int>(q % d);
    float acc = 0.f;
    for (int e = 0; e < E; ++e) acc = fmaf(w.dscores[t * E + e], W[static_cast<index_t>(e) * d + i], acc);
    w.dx_router[q] = acc;
  }
}

/// dW[i, e] = sum_t dz_te x_t[i] and db_e = sum_t dz_te, in token order: one thread per element.
template <class T>
__global__ void topk_weight_grad_kernel(backward_buffers w, const T* __restrict__ x, index_t ldx, int d, int E,
                                        float* __restrict__ gw, float* __restrict__ gb) {
  const index_t nw = static_cast<index_t>(E) * d, total = nw + E, stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    float acc = 0.f;
    if (q < nw) {
      const int e = static_cast<int>(q / d), i = static_cast<int>(q % d);
      for (index_t t = 0; t < w.tokens; ++t) acc = fmaf(w.dscores[t * E + e], to_float(x[t * ldx + i]), acc);
      gw[q] = acc;
    } else {
      const int e = static_cast<int>(q - nw);
      for (index_t t = 0; t < w.tokens; ++t) acc += w.dscores[t * E + e];
      gb[e] = acc;
    }
  }
}

// --- top_any -------------------------------------------------------------------------------

__device__ __forceinline__ bool top_any_fired(const layer_buffers& b, const router_params& rp, int E, index_t t, int e) {
  return rp.active[e] && b.scores[t * E + e] > rp.b[e];
}
__device__ __forceinline__ float sigmoidf(float v) { return 1.f / (1.f + expf(-v)); }

/// Per token (one warp): K_t = slots fired and |x_t| = max(sqrt(sum x^2), eps); the token count
/// with K > 0 into expert_count[E] (zeroed before; an integer atomic).
template <class T>
__global__ void __launch_bounds__(router_bwd_threads)
    top_any_token_kernel(layer_buffers b, backward_buffers w, const T* __restrict__ x, index_t ldx, int d, int E,
                         router_params rp) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const index_t t = static_cast<index_t>(blockIdx.x) * (router_bwd_threads / 32) + threadIdx.x / 32;
  if (t >= b.tokens) return;
  int k = 0;
  for (int e = lane; e < E; e += 32) k += top_any_fired(b, rp, E, t, e);
  for (int o = 16; o > 0; o /= 2) k += __shfl_xor_sync(0xffffffffu, k, o);
  float sq = 0.f;
  for (int i = lane; i < d; i += 32) {
    const float v = to_float(x[t * ldx + i]);
    sq = fmaf(v, v, sq);
  }
  sq = warp_sum(sq);
  if (lane == 0) {
    w.fired[t] = k;
    w.token_aux[t] = fmaxf(sqrtf(sq), top_any_router<float>::norm_eps);
    if (k > 0) atomicAdd(&w.expert_count[E], 1);
  }
}

/// Balance statistics per expert over tokens that fired (token order): me_e = mean 1/K, ce_e =
/// mean 1, into expert_tmp[0, E) and [E, 2E). One thread per expert.
template <class = void>
__global__ void top_any_balance_kernel(layer_buffers b, backward_buffers w, int E, router_params rp) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= E) return;
  float me = 0.f, ce = 0.f;
  for (index_t t = 0; t < b.tokens; ++t) {
    const int K = w.fired[t];
    if (K == 0 || !top_any_fired(b, rp, E, t, e)) continue;
    me += 1.f / float(K);
    ce += 1.f;
  }
  const int ft = w.expert_count[E];
  w.expert_tmp[e] = ft > 0 ? me / float(ft) : 0.f;
  w.expert_tmp[E + e] = ft > 0 ? ce / float(ft) : 0.f;
}

/// Per token (one warp): da for fired slots (task part dL/dw_s / K through the strided plan, plus
/// the balance and efficiency terms), dcos = da sigma'(cos) into dscores, da into w.da, and
/// token_sum = sum_e dcos cos.
template <class = void>
__global__ void __launch_bounds__(router_bwd_threads)
    top_any_dcos_kernel(layer_buffers b, backward_buffers w, int E, int max_k, router_params rp, float w_bal,
                        float w_eff) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const index_t t = static_cast<index_t>(blockIdx.x) * (router_bwd_threads / 32) + threadIdx.x / 32;
  if (t >= b.tokens) return;
  float* dcos = w.dscores + t * E;
  float* da = w.da + t * E;
  for (int e = lane; e < E; e += 32) dcos[e] = 0.f;
  __syncwarp();
  const int K = w.fired[t];
  float sx = 0.f;
  if (K > 0) {
    if (lane == 0) {
      const index_t base = t * max_k;
      for (int i = 0; i < b.counts[t]; ++i) {
        const int e = b.slot_expert[base + i];
        if (top_any_fired(b, rp, E, t, e)) dcos[e] += w.dweight[base + i] / float(K);
      }
    }
    __syncwarp();
    const int ft = w.expert_count[E];
    for (int e = lane; e < E; e += 32) {
      float a = 0.f, dc = 0.f;
      if (top_any_fired(b, rp, E, t, e)) {
        a = dcos[e];
        if (w_bal != 0.f && ft > 0) a += w_bal * float(E) * w.expert_tmp[E + e] / (float(ft) * float(K));
        a += w_eff / (float(b.tokens) * float(E));
        const float c = b.scores[t * E + e], sc = sigmoidf(c);
        dc = a * sc * (1.f - sc);
        sx = fmaf(dc, c, sx);
      }
      dcos[e] = dc;
      da[e] = a;
    }
  } else {
    for (int e = lane; e < E; e += 32) da[e] = 0.f;
  }
  sx = warp_sum(sx);
  if (lane == 0) w.token_sum[t] = sx;
}

/// dx_router[t, i] = (sum_e dcos_te W[i, e] / |w_e| - sx_t x_t[i] / |x_t|) / |x_t|.
template <class T>
__global__ void top_any_dx_kernel(backward_buffers w, const T* __restrict__ x, index_t ldx, int d, int E,
                                  router_params rp) {
  const index_t total = w.tokens * d, stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    const index_t t = q / d;
    const int i = static_cast<int>(q % d);
    float acc = 0.f;
    for (int e = 0; e < E; ++e)
      acc = fmaf(w.dscores[t * E + e] / rp.expert_norm[e], rp.w[static_cast<index_t>(e) * d + i], acc);
    const float xn = w.token_aux[t];
    w.dx_router[q] = acc / xn - w.token_sum[t] * to_float(x[t * ldx + i]) / (xn * xn);
  }
}

/// Gram matrix W^T W of the gate embeddings (diversity loss): one thread per (i, j), d in order.
template <class = void>
__global__ void top_any_gram_kernel(backward_buffers w, router_params rp, int d, int E) {
  const index_t total = static_cast<index_t>(E) * E, stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    const int i = static_cast<int>(q / E), j = static_cast<int>(q % E);
    float acc = 0.f;
    for (int k = 0; k < d; ++k) acc = fmaf(rp.w[static_cast<index_t>(i) * d + k], rp.w[static_cast<index_t>(j) * d + k], acc);
    w.gram[q] = acc;
  }
}

/// The diversity loss sqrt(sum over active pairs of (G_ij / (n_i n_j) - delta_ij)^2), pairs in
/// order, by one thread.
template <class = void>
__global__ void top_any_diversity_kernel(backward_buffers w, router_params rp, int E) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  float sq = 0.f;
  for (int i = 0; i < E; ++i)
    for (int j = 0; j < E; ++j) {
      if (!rp.active[i] || !rp.active[j]) continue;
      const float m = w.gram[static_cast<index_t>(i) * E + j] / (rp.expert_norm[i] * rp.expert_norm[j]) - (i == j ? 1.f : 0.f);
      sq += m * m;
    }
  *w.scalar = sqrtf(sq);
}

/// Threshold gradients (-sum_t da sigma'(g), token order) and gate-embedding gradients: the task
/// part (sum_t dcos x_t / |x_t| - sw_e w_e / |w_e|) / |w_e|, then simplicity and diversity.
template <class T>
__global__ void top_any_weight_grad_kernel(layer_buffers b, backward_buffers w, const T* __restrict__ x, index_t ldx,
                                           int d, int E, router_params rp, float w_simp, float w_div,
                                           float* __restrict__ gw, float* __restrict__ gthr) {
  const index_t nw = static_cast<index_t>(E) * d, total = nw + E, stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    if (q >= nw) {
      const int e = static_cast<int>(q - nw);
      const float sg = sigmoidf(rp.b[e]);
      float acc = 0.f;
      for (index_t t = 0; t < b.tokens; ++t) acc -= w.da[t * E + e] * sg * (1.f - sg);
      gthr[e] = acc;
      continue;
    }
    const int e = static_cast<int>(q / d), i = static_cast<int>(q % d);
    float acc = 0.f, sw = 0.f;
    for (index_t t = 0; t < b.tokens; ++t) {
      const float dc = w.dscores[t * E + e];
      acc = fmaf(dc / w.token_aux[t], to_float(x[t * ldx + i]), acc);
      sw = fmaf(dc, b.scores[t * E + e], sw);
    }
    const float wn = rp.expert_norm[e], wv = rp.w[q];
    float gv = acc / wn - (sw / (wn * wn)) * wv;
    if (w_simp != 0.f) gv += w_simp / float(E) * wv / wn;
    const float loss = w_div != 0.f && rp.active[e] ? *w.scalar : 0.f;  // written only when w_div != 0
    if (loss != 0.f) {
      float dhat = 0.f, dot = 0.f;
      for (int j = 0; j < E; ++j) {
        if (!rp.active[j]) continue;
        const float nj = rp.expert_norm[j], gij = w.gram[static_cast<index_t>(e) * E + j];
        const float m = gij / (wn * nj) - (e == j ? 1.f : 0.f);
        const float cj = 2.f * m / loss / nj;
        dhat = fmaf(cj, rp.w[static_cast<index_t>(j) * d + i], dhat);
        dot = fmaf(cj, gij / wn, dot);
      }
      gv += w_div * (dhat - dot * wv / wn) / wn;
    }
    gw[q] = gv;
  }
}

// --- orchestration ---------------------------------------------------------------------------

inline status launch_check(const char* what) noexcept {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? status{} : cuda_failure(err, what);
}

/// Enqueues the router backward of policy P: gradients into g (overwritten), the router's part of
/// dx into w.dx_router. top_k reads aux->load_balance and z_loss; top_any balance, efficiency,
/// diversity and simplicity; dynamic_k has none (its router learns from its own regression loss).
template <class P, class T>
status route_backward(const T* x, index_t ldx, index_t d, index_t E, index_t max_k, const typename P::options& opt,
                      const router_params& rp, const layer_buffers& b, const backward_buffers& w,
                      const aux_losses* aux, const router_grads& g, cudaStream_t stream) noexcept {
  const int dd = static_cast<int>(d), EE = static_cast<int>(E), mk = static_cast<int>(max_k);
  const index_t tokens = w.tokens;
  const unsigned warp_blocks = static_cast<unsigned>(blocks_for(tokens, router_bwd_threads / 32));
  cudaError_t err = cudaSuccess;
  if constexpr (std::is_same_v<P, dynamic_k>) {
    (void)opt, (void)rp, (void)b, (void)aux, (void)mk, (void)EE, (void)ldx, (void)x;
    if (g.w) err = cudaMemsetAsync(g.w, 0, static_cast<std::size_t>(g.w_size) * sizeof(float), stream);
    if (err == cudaSuccess && g.w2) err = cudaMemsetAsync(g.w2, 0, static_cast<std::size_t>(g.w2_size) * sizeof(float), stream);
    if (err == cudaSuccess && tokens > 0)
      err = cudaMemsetAsync(w.dx_router, 0, static_cast<std::size_t>(tokens * d) * sizeof(float), stream);
    return err == cudaSuccess ? status{} : cuda_failure(err, "dynamic_k route_backward: cudaMemsetAsync");
  } else if constexpr (std::is_same_v<P, top_k>) {
    const float lb = aux ? float(aux->load_balance) : 0.f, zc = aux ? float(aux->z_loss) : 0.f;
    if (tokens > 0) {
      if (zc != 0.f) {
        topk_logsumexp_kernel<T><<<static_cast<unsigned>(tokens), router_bwd_threads, 0, stream>>>(x, ldx, dd, EE, rp, w);
        DMOE_TRY(launch_check("topk_logsumexp_kernel launch"));
      }
      if (lb != 0.f) {
        if ((err = cudaMemsetAsync(w.expert_count, 0, static_cast<std::size_t>(E + 1) * sizeof(std::int32_t), stream)) !=
            cudaSuccess)
          return cuda_failure(err, "top_k route_backward: cudaMemsetAsync");
        expert_count_kernel<><<<stride_grid(b.items, 256), 256, 0, stream>>>(b, mk, w);
        DMOE_TRY(launch_check("expert_count_kernel launch"));
      }
      topk_dz_kernel<><<<warp_blocks, router_bwd_threads, 0, stream>>>(b, w, EE, mk, opt.renormalize, lb, zc, lb != 0.f);
      DMOE_TRY(launch_check("topk_dz_kernel launch"));
      gate_dx_kernel<><<<stride_grid(tokens * d, 256), 256, 0, stream>>>(w, rp.w, dd, EE);
      DMOE_TRY(launch_check("gate_dx_kernel launch"));
    }
    topk_weight_grad_kernel<T><<<stride_grid(E * d + E, 256), 256, 0, stream>>>(w, x, ldx, dd, EE, g.w, g.b);
    return launch_check("topk_weight_grad_kernel launch");
  } else {
    (void)opt;
    const float w_bal = aux ? float(aux->balance) : 0.f, w_eff = aux ? float(aux->efficiency) : 0.f;
    const float w_div = aux ? float(aux->diversity) : 0.f, w_simp = aux ? float(aux->simplicity) : 0.f;
    if (tokens > 0) {
      if ((err = cudaMemsetAsync(w.expert_count, 0, static_cast<std::size_t>(E + 1) * sizeof(std::int32_t), stream)) !=
          cudaSuccess)
        return cuda_failure(err, "top_any route_backward: cudaMemsetAsync");
      top_any_token_kernel<T><<<warp_blocks, router_bwd_threads, 0, stream>>>(b, w, x, ldx, dd, EE, rp);
      DMOE_TRY(launch_check("top_any_token_kernel launch"));
      if (w_bal != 0.f) {
        top_any_balance_kernel<><<<static_cast<unsigned>(blocks_for(E, 256)), 256, 0, stream>>>(b, w, EE, rp);
        DMOE_TRY(launch_check("top_any_balance_kernel launch"));
      }
      top_any_dcos_kernel<><<<warp_blocks, router_bwd_threads, 0, stream>>>(b, w, EE, mk, rp, w_bal, w_eff);
      DMOE_TRY(launch_check("top_any_dcos_kernel launch"));
      top_any_dx_kernel<T><<<stride_grid(tokens * d, 256), 256, 0, stream>>>(w, x, ldx, dd, EE, rp);
      DMOE_TRY(launch_check("top_any_dx_kernel launch"));
    }
    if (w_div != 0.f) {
      top_any_gram_kernel<><<<stride_grid(E * E, 256), 256, 0, stream>>>(w, rp, dd, EE);
      DMOE_TRY(launch_check("top_any_gram_kernel launch"));
      top_any_diversity_kernel<><<<1, 32, 0, stream>>>(w, rp, EE);
      DMOE_TRY(launch_check("top_any_diversity_kernel launch"));
    }
    top_any_weight_grad_kernel<T><<<stride_grid(E * d + E, 256), 256, 0, stream>>>(b, w, x, ldx, dd, EE, rp, w_simp,
                                                                                   w_div, g.w, g.b);
    return launch_check("top_any_weight_grad_kernel launch");
  }
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
