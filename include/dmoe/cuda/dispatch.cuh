// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Dispatch on the device: the plan's slots in expert-major order, stable in token order, without
/// the host ever learning the counts.
///  - the sort runs over slot_capacity entries built from the compacted plan (the slot bound of
///    dynamic-k and top-any, tokens * k for top-k: a length the host knows); entries past the
///    plan's nnz carry the sentinel E and sort last.
///  - slot_capacity > small_dispatch_max_items: cub::DeviceRadixSort on key_bits(E) bits of
///    (expert id | sentinel E), then one pass that finds the expert boundaries.
///  - otherwise (decode): one block does a counting sort in shared memory (histogram, scan, a
///    warp-synchronous stable scatter) in a single launch.
/// Both are stable, so both give the same order: token order within an expert.
/// Then the M-tile offsets of the grouped GEMMs are scanned on the device from the expert offsets.

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "common.cuh"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

/// The sort's input, slot_capacity entries (the slot bound, not tokens * max_k): entry j < nnz
/// is plan slot j (compacted, token-major), key its expert, value its strided slot t max_k + i
/// (token t found by binary search over token_offsets); entries past nnz carry the sentinel E and
/// sort last. Everything downstream addresses slots by their strided index, as before.
template <class = void>  // templates: header kernels must not clash across TUs
__global__ void sort_input_kernel(layer_buffers b, int E, int max_k) {
  const index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= b.slot_capacity) return;
  const index_t nnz = b.token_offsets[b.tokens];
  if (j >= nnz) {
    b.sort_keys[j] = E;
    b.sort_vals[j] = 0;
    return;
  }
  index_t lo = 0, hi = b.tokens;  // largest t with token_offsets[t] <= j
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    if (b.token_offsets[mid] <= j)
      lo = mid;
    else
      hi = mid;
  }
  b.sort_keys[j] = b.plan_expert[j];
  b.sort_vals[j] = static_cast<std::int32_t>(lo * max_k + (j - b.token_offsets[lo]));
}

/// After the radix sort: expert_offsets from the boundaries of the sorted keys, sorted_token and
/// slot_row (the inverse permutation) for the used slots. Thread r looks at sorted rows r - 1, r.
template <class = void>
__global__ void finish_dispatch_kernel(layer_buffers b, int E, int max_k) {
  const index_t r = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t n = b.slot_capacity;
  if (r > n) return;
  expert_boundaries(b.sort_keys_out, n, E, r, b.expert_offsets);
  if (r < n && b.sort_keys_out[r] < E) {
    const std::int32_t v = b.sort_vals_out[r];
    b.sorted_token[r] = v / max_k;
    b.slot_row[v] = static_cast<std::int32_t>(r);
  }
}

/// The decode path: one block, items <= small_dispatch_max_items, E + 1 bins in shared memory.
template <class = void>
__global__ void __launch_bounds__(single_block_threads) small_dispatch_kernel(layer_buffers b, int E, int max_k) {
  extern __shared__ int cursor[];  // (E + 1)
  const int tid = static_cast<int>(threadIdx.x);
  const int items = static_cast<int>(b.slot_capacity);
  for (int e = tid; e <= E; e += blockDim.x) cursor[e] = 0;
  __syncthreads();
  for (int j = tid; j < items; j += blockDim.x) atomicAdd(&cursor[b.sort_keys[j]], 1);  // counts: order-free
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int e = 0; e <= E; ++e) {
      const int c = cursor[e];
      cursor[e] = run;
      b.expert_offsets[e] = run;
      run += c;
    }
  }
  __syncthreads();
  if (tid < 32) {
    // Warp 0 scatters 32 items at a time in item order; lanes with equal keys take consecutive
    // positions in lane order, so the result is stable.
    const unsigned lt = (1u << tid) - 1u;
    for (int j0 = 0; j0 < items; j0 += 32) {
      const int j = j0 + tid;
      const int key = j < items ? b.sort_keys[j] : E + 1 + tid;  // distinct dummy keys past the end
      const unsigned same = __match_any_sync(0xffffffffu, key);
      const int rank = __popc(same & lt);
      int pos = 0;
      if (j < items) pos = cursor[key] + rank;
      __syncwarp();
      if (j < items && (same >> tid) == 1u) cursor[key] += __popc(same);  // highest lane of its group
      __syncwarp();
      if (j < items && key < E) {
        const int v = b.sort_vals[j];  // strided slot
        b.sort_vals_out[pos] = v;
        b.sorted_token[pos] = v / max_k;
        b.slot_row[v] = pos;
      }
    }
  }
}

/// tile_offsets[e] = sum over experts before e of ceil(rows_e / gemm_bm); tile_offsets[E] is the
/// number of M-tiles. Serial (E is small); one thread.
template <class = void>
__global__ void tile_offsets_kernel(layer_buffers b, int E) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  scan_tiles(b.expert_offsets, E, b.tile_offsets);
}

/// The slot bound (dynamic-k and top-any with fewer activation rows than tokens * max_k): when
/// the batch routed more slots than the rows, records how many in slot_overflow and empties the
/// tile list, so the GEMMs write nothing and the combine gives y = b2; the host reports it
/// (read_error). One thread.
template <class = void>
__global__ void slot_bound_kernel(layer_buffers b, int E) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const index_t nnz = b.token_offsets[b.tokens];  // the sort saw at most slot_capacity of them
  if (nnz <= b.slot_capacity) return;
  *b.slot_overflow = static_cast<unsigned long long>(nnz);
  for (int e = 0; e <= E; ++e) b.tile_offsets[e] = 0;
}

inline status enforce_slot_bound(layer_buffers& b, int E, cudaStream_t stream) noexcept {
  slot_bound_kernel<><<<1, 32, 0, stream>>>(b, E);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_failure(e, "slot_bound_kernel launch");
  return {};
}

/// k histogram of the statistics (shared-memory counts: integer sums, order-free). One block.
template <class = void>
__global__ void __launch_bounds__(single_block_threads) k_histogram_kernel(layer_buffers b, int E) {
  extern __shared__ int hist[];  // (E + 1)
  for (int e = static_cast<int>(threadIdx.x); e <= E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (index_t t = threadIdx.x; t < b.tokens; t += blockDim.x) atomicAdd(&hist[b.counts[t]], 1);
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e <= E; e += blockDim.x) b.k_histogram[e] = hist[e];
}

/// The same histogram with global integer atomics into a zeroed k_histogram (E + 1 bins too many
/// for the default 48 KiB of dynamic shared memory). Any grid.
template <class = void>
__global__ void k_histogram_global_kernel(layer_buffers b) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < b.tokens; t += stride)
    atomicAdd(&b.k_histogram[b.counts[t]], 1);
}

/// Whether k_histogram_kernel's E + 1 shared-memory bins fit the default dynamic shared memory.
inline bool k_histogram_in_shared(index_t E) noexcept {
  return (E + 1) * static_cast<index_t>(sizeof(int)) <= 48 * 1024;
}

/// No activation rows (a slot bound of 0): every expert empty.
template <class = void>
__global__ void empty_dispatch_kernel(layer_buffers b, int E) {
  for (int e = static_cast<int>(threadIdx.x); e <= E; e += blockDim.x) b.expert_offsets[e] = 0;
}

/// Whether the one-block decode dispatch applies (its bins must fit the default shared memory).
inline bool use_small_dispatch(index_t items, index_t E) noexcept {
  return items <= small_dispatch_max_items && (E + 1) * static_cast<index_t>(sizeof(int)) <= 32 * 1024;
}

/// Bytes of CUB's temporaries for these item counts (host query; CUB launches nothing).
inline status cub_temp_bytes(index_t items, index_t tokens, int key_bit_count, std::size_t& sort_bytes,
                             std::size_t& scan_bytes) noexcept {
  sort_bytes = 0;
  scan_bytes = 0;
  if (items > 0) {
    cudaError_t e = cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const std::int32_t*>(nullptr),
                                                   static_cast<std::int32_t*>(nullptr),
                                                   static_cast<const std::int32_t*>(nullptr),
                                                   static_cast<std::int32_t*>(nullptr), static_cast<int>(items), 0,
                                                   key_bit_count);
    if (e != cudaSuccess) return cuda_failure(e, "cub::DeviceRadixSort::SortPairs (size query)");
  }
  if (tokens > 0) {
    cudaError_t e = cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const std::int32_t*>(nullptr),
                                                  static_cast<index_t*>(nullptr), static_cast<int>(tokens + 1));
    if (e != cudaSuccess) return cuda_failure(e, "cub::DeviceScan::ExclusiveSum (size query)");
  }
  return {};
}

/// Enqueues the dispatch of the strided slots in `b` (keys and values written by select_kernel).
inline status dispatch(layer_buffers& b, int E, int max_k, cudaStream_t stream) noexcept {
  cudaError_t e = cudaSuccess;
  if (b.slot_capacity > 0) {
    sort_input_kernel<><<<static_cast<unsigned>(blocks_for(b.slot_capacity, 256)), 256, 0, stream>>>(b, E, max_k);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_failure(e, "sort_input_kernel launch");
  }
  if (b.slot_capacity == 0) {
    empty_dispatch_kernel<><<<1, 32, 0, stream>>>(b, E);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_failure(e, "empty_dispatch_kernel launch");
  } else if (use_small_dispatch(b.slot_capacity, E)) {
    small_dispatch_kernel<><<<1, single_block_threads, static_cast<std::size_t>(E + 1) * sizeof(int), stream>>>(b, E,
                                                                                                         max_k);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_failure(e, "small_dispatch_kernel launch");
  } else {
    std::size_t bytes = b.sort_temp_bytes;
    e = cub::DeviceRadixSort::SortPairs(b.sort_temp, bytes, b.sort_keys, b.sort_keys_out, b.sort_vals,
                                        b.sort_vals_out, static_cast<int>(b.slot_capacity), 0, key_bits(E), stream);
    if (e != cudaSuccess) return cuda_failure(e, "cub::DeviceRadixSort::SortPairs");
    finish_dispatch_kernel<><<<static_cast<unsigned>(blocks_for(b.slot_capacity + 1, 256)), 256, 0, stream>>>(b, E, max_k);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_failure(e, "finish_dispatch_kernel launch");
  }
  tile_offsets_kernel<><<<1, 32, 0, stream>>>(b, E);
  if ((e = cudaGetLastError()) != cudaSuccess) return cuda_failure(e, "tile_offsets_kernel launch");
  return {};
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
