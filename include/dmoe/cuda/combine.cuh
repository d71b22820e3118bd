// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Combine on the device (the CPU side's cpu/combine.hpp): per token, y = b2 + sum over its slots
/// in slot order (ascending expert id) of w_s out[slot], a gather-sum with fp32 accumulation,
/// one block per token, no atomics: deterministic.

#include "common.cuh"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

/// y[t] = b2 + sum over t's slots in slot order (ascending expert id) of w_s out[slot_row[s]]:
/// a gather-sum, one block per token, fp32 accumulation, no atomics.
template <class T>
__global__ void __launch_bounds__(combine_threads)
    combine_kernel(layer_buffers b, const T* __restrict__ out, const T* __restrict__ b2, T* __restrict__ y, index_t ldy,
                   int d, int max_k) {
  const index_t t = blockIdx.x;
  // A batch beyond the slot bound ran no expert (slot_bound_kernel): y = b2, reported by the host.
  const int cnt = *b.slot_overflow != 0 ? 0 : b.counts[t];
  const index_t base = t * max_k;
  for (int c = static_cast<int>(threadIdx.x); c < d; c += combine_threads) {
    float acc = b2 ? to_float(b2[c]) : 0.f;
    for (int i = 0; i < cnt; ++i)
      acc = fmaf(b.slot_weight[base + i], to_float(out[static_cast<index_t>(b.slot_row[base + i]) * d + c]), acc);
    y[t * ldy + c] = from_float<T>(acc);
  }
}

/// Enqueues the combine of `tokens` tokens into y (row stride ldy).
template <class T>
status combine(const layer_buffers& b, const T* out, const T* b2, T* y, index_t ldy, index_t tokens, index_t d,
               index_t max_k, cudaStream_t stream) noexcept {
  combine_kernel<T><<<static_cast<unsigned>(tokens), combine_threads, 0, stream>>>(b, out, b2, y, ldy, static_cast<int>(d),
                                                                                   static_cast<int>(max_k));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_failure(err, "combine_kernel launch");
  return {};
}

// --- backward (the CPU side's slot_weight_grads, input_grads, output_bias_grad) -----------------

/// dweight[s] = <dy_t, out[slot_row[s]]> for every strided slot of token t (0 for unused slots and
/// for a batch beyond the slot bound): one block per token, one warp per slot, lanes over d and
/// a warp_sum, so the order is fixed.
template <class T>
__global__ void __launch_bounds__(combine_threads)
    slot_weight_grad_kernel(layer_buffers b, const T* __restrict__ out, const T* __restrict__ dy, index_t ldy, int d,
                            int max_k, float* __restrict__ dweight) {
  const index_t t = blockIdx.x;
  const int cnt = *b.slot_overflow != 0 ? 0 : b.counts[t];
  const index_t base = t * max_k;
  const int lane = static_cast<int>(threadIdx.x) % 32, warps = combine_threads / 32;
  for (int i = static_cast<int>(threadIdx.x) / 32; i < max_k; i += warps) {
    float acc = 0.f;
    if (i < cnt) {
      const T* o = out + static_cast<index_t>(b.slot_row[base + i]) * d;
      for (int c = lane; c < d; c += 32) acc = fmaf(to_float(dy[t * ldy + c]), to_float(o[c]), acc);
      acc = warp_sum(acc);
    }
    if (lane == 0) dweight[base + i] = acc;
  }
}

/// dx_t = router part + the slots' parts in slot order (fp32), rounded once to T: one block per
/// token, no atomics.
template <class T>
__global__ void __launch_bounds__(combine_threads)
    input_grad_kernel(layer_buffers b, backward_buffers w, T* __restrict__ dx, index_t lddx, int d, int max_k) {
  const index_t t = blockIdx.x;
  const int cnt = *b.slot_overflow != 0 ? 0 : b.counts[t];
  const index_t base = t * max_k;
  for (int c = static_cast<int>(threadIdx.x); c < d; c += combine_threads) {
    float acc = w.dx_router[t * d + c];
    for (int i = 0; i < cnt; ++i) acc += w.dx_slot[static_cast<index_t>(b.slot_row[base + i]) * d + c];
    dx[t * lddx + c] = from_float<T>(acc);
  }
}

/// db2[c] = sum over tokens in token order of dy[t, c] (fp32); one thread per column.
template <class T>
__global__ void output_bias_grad_kernel(const T* __restrict__ dy, index_t ldy, index_t tokens, int d,
                                        float* __restrict__ db2) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= d) return;
  float acc = 0.f;
  for (index_t t = 0; t < tokens; ++t) acc += to_float(dy[t * ldy + c]);
  db2[c] = acc;
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
