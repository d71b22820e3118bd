// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Host-side logic of the CUDA backend in plain C++17 (no CUDA headers, so g++ unit-tests it):
/// tile sizes, worst-case bounds from which every buffer is sized before a launch, the launch
/// configuration, the workspace layout, and float <-> fp16 / bf16 bit conversions used to upload
/// weights. Everything a forward needs to know about sizes is computed here from the call's token
/// count and the layer's shape, never from device results: nothing waits for the GPU.

#include <cstdint>
#include <cstring>

#include "../core/config.hpp"
#include "../core/workspace.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

// ---------------------------------------------------------------------------------------------
// Tiles and launch constants (the kernels static_assert against the same names).

/// Grouped-GEMM block tile: gemm_bm sorted rows x gemm_bn output columns, K stepped by gemm_bk;
/// gemm_threads = 4 warps, each owning a 32 x 32 quarter of the tile.
inline constexpr int gemm_bm = 64;
inline constexpr int gemm_bn = 64;
inline constexpr int gemm_bk = 32;
inline constexpr int gemm_threads = 128;
/// Resident GEMM blocks per SM assumed for the persistent grid (the tile needs <= 48 KiB of static
/// shared memory and 128 threads, so 2 fit on sm_80 and sm_90 with room to spare).
inline constexpr int gemm_blocks_per_sm = 2;
/// Router product tile (SIMT fp32): router_tile x router_tile outputs per 256-thread block.
inline constexpr int router_tile = 32;
inline constexpr int router_threads = 256;
/// Selection: one warp per token, select_warps tokens per block.
inline constexpr int select_warps = 4;
/// Combine: one block of combine_threads per token.
inline constexpr int combine_threads = 256;
/// Up to this many (token, slot) items the dispatch is a one-block counting sort (the decode
/// path: one launch, no CUB radix sort passes); above it, cub::DeviceRadixSort.
inline constexpr std::int64_t small_dispatch_max_items = 4096;
/// Threads of the one-block dispatch, the tile-offset scan and the statistics kernel.
inline constexpr int single_block_threads = 512;

inline constexpr index_t ceil_div(index_t a, index_t b) noexcept { return (a + b - 1) / b; }

/// Bits of the radix-sort key: expert ids are in [0, E) and the sentinel E marks unused slots,
/// so keys are in [0, E]; the sort looks at bits [0, key_bits(E)).
inline constexpr int key_bits(index_t num_experts) noexcept {
  int b = 0;
  while ((index_t{1} << b) <= num_experts) ++b;
  return b;
}

/// Upper bound on sum_e ceil(c_e / bm) over expert row counts c_e >= 0 with sum c_e <= nnz_max:
/// each non-empty expert wastes at most bm - 1 rows of its last tile, and at most min(E, nnz_max)
/// experts are non-empty.
inline constexpr index_t max_m_tiles(index_t nnz_max, index_t num_experts, index_t bm = gemm_bm) noexcept {
  const index_t nonempty = nnz_max < num_experts ? nnz_max : num_experts;
  return (nnz_max + nonempty * (bm - 1)) / bm;
}

/// Column tiles of a product with `cols` output columns.
inline constexpr index_t n_tiles(index_t cols, index_t bn = gemm_bn) noexcept { return ceil_div(cols, bn); }

/// Blocks of a persistent grid: enough to fill the GPU, never more than the worst-case tile count
/// (blocks beyond the real count, which only the device knows, find no tile and exit). At least 1.
inline constexpr index_t persistent_grid(index_t worst_tiles, index_t sm_count,
                                         index_t blocks_per_sm = gemm_blocks_per_sm) noexcept {
  const index_t fill = (sm_count > 0 ? sm_count : 1) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const index_t g = worst_tiles < fill ? worst_tiles : fill;
  return g > 0 ? g : 1;
}

/// Blocks of a one-thread-per-item launch (at least 1, so a launch is always well formed).
inline constexpr index_t blocks_for(index_t items, index_t threads) noexcept {
  const index_t b = ceil_div(items, threads);
  return b > 0 ? b : 1;
}

/// Blocks of a grid-stride loop over `items` (capped; the loop covers the rest). At least 1.
inline constexpr unsigned stride_grid(index_t items, index_t threads) noexcept {
  const index_t b = blocks_for(items, threads);
  return static_cast<unsigned>(b < 65535 * 16 ? b : 65535 * 16);
}

/// Largest token count a layer call accepts: device indices are int32, so tokens * max_k
/// (and tokens * max(E, router hidden)) must stay below 2^31.
inline constexpr bool fits_int32(index_t tokens, index_t per_token) noexcept {
  return tokens >= 0 && per_token >= 0 && (per_token == 0 || tokens <= (index_t{INT32_MAX} - 1) / per_token);
}

// ---------------------------------------------------------------------------------------------
// Index logic shared by the kernels and the host tests (DMOE_HOST_DEVICE: plain inline in g++).

/// After a stable sort of the strided slots by key (expert id, sentinel E for unused slots), the
/// work of position r in [0, items]: expert_offsets[e] = r for every e in (key[r - 1], key[r]]
/// (key[-1] = -1, key[items] = E). Over all r this writes each of the E + 1 offsets exactly once.
DMOE_HOST_DEVICE inline void expert_boundaries(const std::int32_t* sorted_keys, index_t items, int E, index_t r,
                                               std::int32_t* expert_offsets) noexcept {
  const int prev = r == 0 ? -1 : sorted_keys[r - 1];
  const int cur = r == items ? E : sorted_keys[r];
  for (int e = prev + 1; e <= cur; ++e) expert_offsets[e] = static_cast<std::int32_t>(r);
}

/// tile_offsets[e] = sum over experts before e of ceil(rows_e / bm); tile_offsets[E] = M-tiles.
DMOE_HOST_DEVICE inline void scan_tiles(const std::int32_t* expert_offsets, int E, std::int32_t* tile_offsets,
                                        int bm = gemm_bm) noexcept {
  std::int32_t run = 0;
  for (int e = 0; e < E; ++e) {
    tile_offsets[e] = run;
    run += (expert_offsets[e + 1] - expert_offsets[e] + bm - 1) / bm;
  }
  tile_offsets[E] = run;
}

/// Expert of M-tile mt < tile_offsets[E]: the largest e < E with tile_offsets[e] <= mt (empty
/// experts share their successor's offset and are skipped this way).
DMOE_HOST_DEVICE inline int expert_of_tile(const std::int32_t* tile_offsets, int E, int mt) noexcept {
  int lo = 0, hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_offsets[mid] <= mt)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// Workspace layout

/// The layer's shape as far as buffer sizes are concerned.
struct layer_dims {
  index_t d = 0;              ///< d_model
  index_t E = 0;              ///< experts
  index_t n = 0;              ///< expert width
  index_t f = 1;              ///< 2 for gated activations
  index_t max_k = 0;          ///< most slots one token can get
  index_t router_hidden = 0;  ///< dynamic-k router hidden width, else 0
  index_t storage_bytes = 4;  ///< sizeof(T): 4 for float, 2 for __half / __nv_bfloat16
};

/// Every device buffer of one forward, carved from the caller's workspace. Storage-typed buffers
/// (hidden, out) are raw bytes here; the CUDA side casts them to T.
struct layer_buffers {
  index_t tokens = 0;
  index_t items = 0;  ///< tokens * max_k: the strided slot layout, the sort length
  // routing
  unsigned long long* error_token = nullptr;  ///< (1) smallest token with a NaN score, or ~0
  unsigned long long* slot_overflow = nullptr;  ///< (1) 0, or the slots a batch routed beyond slot_capacity
  index_t slot_capacity = 0;                  ///< rows `hidden` and `out` hold (<= items)
  float* scores = nullptr;                    ///< (tokens, E) p / r / cos
  float* router_hidden = nullptr;             ///< (tokens, router_hidden) ReLU(x Wa)
  std::int32_t* counts = nullptr;             ///< (tokens + 1) experts per token, last entry 0
  std::int32_t* slot_expert = nullptr;        ///< (items) strided: token t's i-th expert at t max_k + i
  float* slot_weight = nullptr;               ///< (items) strided combine weights
  // public plan (compressed rows, the CPU backend's layout)
  index_t* token_offsets = nullptr;  ///< (tokens + 1)
  std::int32_t* plan_expert = nullptr;  ///< (slot_capacity)
  float* plan_weight = nullptr;         ///< (slot_capacity)
  // dispatch: the sort runs over slot_capacity entries (the slot bound), never tokens * E
  std::int32_t* sort_keys = nullptr;       ///< (slot_capacity) expert id, or E past the plan
  std::int32_t* sort_keys_out = nullptr;   ///< (slot_capacity)
  std::int32_t* sort_vals = nullptr;       ///< (slot_capacity) strided slot index t max_k + i
  std::int32_t* sort_vals_out = nullptr;   ///< (slot_capacity) strided slot of each sorted row
  std::int32_t* sorted_token = nullptr;    ///< (slot_capacity) token of each sorted row
  std::int32_t* slot_row = nullptr;        ///< (items) sorted row of each strided slot
  std::int32_t* expert_offsets = nullptr;  ///< (E + 1) first sorted row of each expert
  std::int32_t* tile_offsets = nullptr;    ///< (E + 1) first M-tile of each expert
  std::int32_t* k_histogram = nullptr;     ///< (E + 1) statistics: tokens that ran k experts
  // experts
  std::byte* hidden = nullptr;  ///< (slot_capacity, n) T: act(x W1 + b1) per sorted row
  std::byte* out = nullptr;     ///< (slot_capacity, d) T: expert output per sorted row (b2_e included)
  // CUB temporaries
  void* sort_temp = nullptr;
  std::size_t sort_temp_bytes = 0;
  void* scan_temp = nullptr;
  std::size_t scan_temp_bytes = 0;
};

/// The one layout routine: with a measuring carver it gives the size, with a real base the
/// pointers (so workspace_size and forward cannot disagree). CUB's temporary sizes come from the
/// caller (asked of CUB on the host for a sort of exactly `slots` entries). `slots` bounds the
/// activation rows (n + d values of T each), the plan, and the sort and its index buffers
/// (negative: all tokens * max_k); only the strided selection (slot_expert, slot_weight,
/// slot_row: 12 bytes per token and possible slot) keeps tokens * max_k entries. Offsets of the
/// error words, scores, counts and strided selection do not depend on `slots`.
inline layer_buffers carve_layer(detail::carver& c, const layer_dims& dm, index_t tokens, std::size_t sort_temp_bytes,
                                 std::size_t scan_temp_bytes, index_t slots = -1) noexcept {
  layer_buffers b;
  // Sizes through the carver's checked arithmetic: an overflow marks the layout, and the
  // layer refuses it (check_tokens bounds tokens * max_k to int32 before this runs).
  const index_t items = c.mul(tokens, dm.max_k);
  const index_t tokens1 = c.add(tokens, 1);
  b.tokens = tokens;
  b.items = items;
  b.error_token = c.take<unsigned long long>(1);
  b.slot_overflow = c.take<unsigned long long>(1);
  b.scores = c.take<float>(c.mul(tokens, dm.E));
  b.router_hidden = c.take<float>(c.mul(tokens, dm.router_hidden));
  b.counts = c.take<std::int32_t>(tokens1);
  b.slot_expert = c.take<std::int32_t>(items);
  b.slot_weight = c.take<float>(items);
  b.slot_row = c.take<std::int32_t>(items);
  b.token_offsets = c.take<index_t>(tokens1);
  b.expert_offsets = c.take<std::int32_t>(dm.E + 1);
  b.tile_offsets = c.take<std::int32_t>(dm.E + 1);
  b.k_histogram = c.take<std::int32_t>(dm.E + 1);
  b.slot_capacity = slots < 0 || slots > items ? items : slots;
  const index_t cap = b.slot_capacity;
  b.plan_expert = c.take<std::int32_t>(cap);
  b.plan_weight = c.take<float>(cap);
  b.sort_keys = c.take<std::int32_t>(cap);
  b.sort_keys_out = c.take<std::int32_t>(cap);
  b.sort_vals = c.take<std::int32_t>(cap);
  b.sort_vals_out = c.take<std::int32_t>(cap);
  b.sorted_token = c.take<std::int32_t>(cap);
  b.sort_temp_bytes = sort_temp_bytes;
  b.sort_temp = c.take<std::byte>(static_cast<index_t>(sort_temp_bytes));
  b.scan_temp_bytes = scan_temp_bytes;
  b.scan_temp = c.take<std::byte>(static_cast<index_t>(scan_temp_bytes));
  b.hidden = c.take<std::byte>(c.mul(cap, dm.n, dm.storage_bytes));
  b.out = c.take<std::byte>(c.mul(cap, dm.d, dm.storage_bytes));
  return b;
}

/// Scratch of one backward (a second workspace, so that a forward-only caller does not pay for
/// it), fp32 throughout. Rows follow the forward's sorted rows, so the capacity is the forward's
/// slot_capacity (the slot bound), never tokens * E.
struct backward_buffers {
  index_t tokens = 0;
  index_t slot_capacity = 0;
  float* dweight = nullptr;    ///< (items) dL/dw_s per strided slot (0 for unused slots)
  float* g = nullptr;          ///< (slot_capacity, d) w_s dy_t per sorted row
  float* dpost = nullptr;      ///< (slot_capacity, n) dL/d act per sorted row
  float* dpre = nullptr;       ///< (slot_capacity, f n) pre-activation, then dL/d pre in place
  float* dx_slot = nullptr;    ///< (slot_capacity, d) dL/dx through each sorted row's expert
  float* dx_router = nullptr;  ///< (tokens, d) the router's part of dL/dx
  float* dscores = nullptr;    ///< (tokens, E) dL/dz (top_k), dL/dcos (top_any)
  float* da = nullptr;         ///< (tokens, E) top_any: dL/da of fired slots (threshold gradient)
  float* token_aux = nullptr;  ///< (tokens) logsumexp z (top_k), max(|x_t|, eps) (top_any)
  float* token_sum = nullptr;  ///< (tokens) top_any: sum_e dcos_te cos_te
  std::int32_t* fired = nullptr;         ///< (tokens) top_any: K_t, slots fired
  std::int32_t* expert_count = nullptr;  ///< (E + 1) top_k: slots per expert; last entry top_any fired tokens
  float* expert_tmp = nullptr;           ///< (4 E) lb gradient (top_k); me, ce, sw (top_any)
  float* gram = nullptr;                 ///< (E, E) top_any: W^T W (diversity loss), else empty
  float* scalar = nullptr;               ///< (1) top_any: the diversity loss
};

/// The backward scratch for `tokens` tokens whose forward held `slots` activation rows (the
/// forward's slot_capacity). `gram`: top_any (the E x E diversity product). Same carver rules
/// as carve_layer: checked products, one routine for size and pointers.
inline backward_buffers carve_backward(detail::carver& c, const layer_dims& dm, index_t tokens, index_t slots,
                                       bool gram) noexcept {
  backward_buffers b;
  const index_t items = c.mul(tokens, dm.max_k);
  b.tokens = tokens;
  b.slot_capacity = slots < 0 || slots > items ? items : slots;
  const index_t cap = b.slot_capacity;
  b.dweight = c.take<float>(items);
  b.g = c.take<float>(c.mul(cap, dm.d));
  b.dpost = c.take<float>(c.mul(cap, dm.n));
  b.dpre = c.take<float>(c.mul(cap, dm.f, dm.n));
  b.dx_slot = c.take<float>(c.mul(cap, dm.d));
  b.dx_router = c.take<float>(c.mul(tokens, dm.d));
  b.dscores = c.take<float>(c.mul(tokens, dm.E));
  b.da = c.take<float>(c.mul(tokens, dm.E));
  b.token_aux = c.take<float>(tokens);
  b.token_sum = c.take<float>(tokens);
  b.fired = c.take<std::int32_t>(tokens);
  b.expert_count = c.take<std::int32_t>(c.add(dm.E, 1));
  b.expert_tmp = c.take<float>(c.mul(dm.E, 4));
  b.gram = c.take<float>(gram ? c.mul(dm.E, dm.E) : 0);
  b.scalar = c.take<float>(1);
  return b;
}

// ---------------------------------------------------------------------------------------------
// 16-bit conversions on the host (weights are converted once, at upload). Round to nearest even,
// NaN stays NaN (quiet), overflow goes to infinity, fp16 subnormals are produced exactly.

inline std::uint32_t float_bits(float v) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) noexcept {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

/// float -> bfloat16 bits (the upper half of the float, rounded to nearest even).
inline std::uint16_t float_to_bf16_bits(float v) noexcept {
  const std::uint32_t u = float_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}
inline float bf16_bits_to_float(std::uint16_t h) noexcept { return bits_float(std::uint32_t{h} << 16); }

/// float -> IEEE binary16 bits, round to nearest even.
inline std::uint16_t float_to_half_bits(float v) noexcept {
  const std::uint32_t u = float_bits(v);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): value = m 2^-24 with m = round(a_value 2^24).
    if (a < 0x33000000u) return sign;  // below half of the smallest subnormal 2^-24: +-0
    const std::uint32_t exp = a >> 23;             // biased float exponent, 102..112
    const std::uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // 24-bit significand
    const std::uint32_t shift = 126u - exp;        // m = mant >> shift, rounded (shift in 14..24)
    std::uint32_t m = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (m & 1u))) ++m;
    return static_cast<std::uint16_t>(sign | m);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits; a carry out
  // of the mantissa correctly bumps the exponent.
  std::uint32_t h = ((a >> 13) - (112u << 10));
  const std::uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

inline float half_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    // subnormal: mant 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
