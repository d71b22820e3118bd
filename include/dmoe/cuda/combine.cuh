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

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
