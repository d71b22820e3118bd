// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The synchronising paths of the CUDA backend: the NaN flag the selection kernel raised, and
/// routing statistics read back from the device (expert offsets and the k histogram). Everything
/// else in a forward is enqueued without waiting; these two are what check_numerics and a
/// forward given a routing_stats wait for.

#include <cstring>

#include "../routing/stats.hpp"
#include "common.cuh"
#include "dispatch.cuh"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

/// Waits for `stream` and reports the smallest token whose router score was NaN or infinite.
/// Also reports a batch that routed more slots than the workspace's activation rows.
inline status read_error(cudaStream_t stream, const layer_buffers& b, const char* router_name) noexcept {
  unsigned long long bad = 0, overflow = 0;
  cudaError_t err = cudaMemcpyAsync(&bad, b.error_token, sizeof bad, cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(&overflow, b.slot_overflow, sizeof overflow, cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return cuda_failure(err, "moe_layer<cuda>: reading the error flag");
  if (overflow != 0)
    return status::failure(errc::workspace_too_small,
                           "moe_layer<cuda>::forward: this batch of %td tokens routed %llu slots, more than the %td "
                           "the workspace holds, and ran no expert (raise workspace_bounds::max_slots, or split the "
                           "batch)",
                           b.tokens, overflow, b.slot_capacity);
  if (bad != ~0ull)
    return status::failure(errc::numerical_error,
                           "%s route: router score of token %llu is NaN or infinite (check x and the router "
                           "weights)",
                           router_name, bad);
  return {};
}

/// Fills `st` from the device: copies expert offsets and the k histogram (E + 1 ints each) into
/// the stats' own vectors, which have E + 1 and E index_t entries, so nothing is allocated.
inline status read_stats(cudaStream_t stream, const layer_buffers& b, int E, const char* router_name,
                         double flops_per_slot, double router_flops_per_token, routing_stats& st) noexcept {
  cudaError_t err = cudaSuccess;
  if (k_histogram_in_shared(E)) {
    k_histogram_kernel<><<<1, single_block_threads, static_cast<std::size_t>(E + 1) * sizeof(int), stream>>>(b, E);
  } else {
    // More than 12287 experts: E + 1 shared bins would exceed 48 KiB and the launch would fail.
    err = cudaMemsetAsync(b.k_histogram, 0, static_cast<std::size_t>(E + 1) * sizeof(std::int32_t), stream);
    if (err != cudaSuccess) return cuda_failure(err, "k_histogram cudaMemsetAsync");
    k_histogram_global_kernel<><<<static_cast<unsigned>(blocks_for((std::min)(b.tokens, index_t{1} << 20), 256)), 256,
                                  0, stream>>>(b);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_failure(err, "k_histogram_kernel launch");
  DMOE_TRY(read_error(stream, b, router_name));  // also synchronises
  const auto fetch = [&](const std::int32_t* src) -> cudaError_t {
    // E + 1 int32 land in the first half of k_histogram's E + 1 index_t, then widen in place
    // from the back (slot e is written only after int32 entries e..2e+1 have been read).
    index_t* dst = st.k_histogram.data();
    // On `stream`, not the default stream: a legacy-default-stream copy would wait for (and,
    // in global capture mode, invalidate a capture on) every other blocking stream.
    cudaError_t e2 = cudaMemcpyAsync(dst, src, static_cast<std::size_t>(E + 1) * sizeof(std::int32_t),
                                     cudaMemcpyDeviceToHost, stream);
    if (e2 == cudaSuccess) e2 = cudaStreamSynchronize(stream);
    if (e2 != cudaSuccess) return e2;
    auto* bytes = reinterpret_cast<unsigned char*>(dst);
    for (int e = E; e >= 0; --e) {
      std::int32_t v;
      std::memcpy(&v, bytes + static_cast<std::size_t>(e) * sizeof(std::int32_t), sizeof v);
      dst[e] = v;
    }
    return cudaSuccess;
  };
  if ((err = fetch(b.expert_offsets)) != cudaSuccess) return cuda_failure(err, "reading expert offsets");
  for (int e = 0; e < E; ++e)
    st.tokens_per_expert[static_cast<std::size_t>(e)] =
        st.k_histogram[static_cast<std::size_t>(e + 1)] - st.k_histogram[static_cast<std::size_t>(e)];
  st.slots = st.k_histogram[static_cast<std::size_t>(E)];
  st.note_slots();
  if ((err = fetch(b.k_histogram)) != cudaSuccess) return cuda_failure(err, "reading the k histogram");
  st.tokens = b.tokens;
  st.router_flops = router_flops_per_token * double(b.tokens);
  st.expert_flops = flops_per_slot * double(st.slots);
  st.dense_flops = flops_per_slot * double(E) * double(b.tokens);
  return {};
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
