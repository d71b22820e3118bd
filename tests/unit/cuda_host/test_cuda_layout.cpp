// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Host-side logic of the CUDA backend (include/dmoe/cuda/layout.hpp is plain C++): launch bounds,
// the workspace layout and the 16-bit conversions, checked here on the CPU so they run in every CI
// job, GPU or not.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <dmoe/cuda/layout.hpp>

#include "test_random.hpp"

namespace cd = dmoe::detail::cuda_backend;
using dmoe::index_t;

namespace {

// Independent references: round a float to bf16 / fp16 through double arithmetic.
double round_to_grid_even(double v, double ulp) {
  const double q = v / ulp, f = std::floor(q), r = q - f;
  double m = f;
  if (r > 0.5 || (r == 0.5 && std::fmod(f, 2.0) != 0.0)) m = f + 1.0;
  return m * ulp;
}
float ref_bf16(float v) {
  if (std::isnan(v) || std::isinf(v) || v == 0.0f) return v;
  int e;
  std::frexp(double(v), &e);  // |v| in [2^(e-1), 2^e)
  const double ulp = std::ldexp(1.0, (std::max)(e - 1, -126) - 7);  // float subnormals: fixed ulp
  const double r = round_to_grid_even(double(v), ulp);
  if (r == 0.0) return std::signbit(v) ? -0.0f : 0.0f;
  if (std::fabs(r) >= std::ldexp(1.0, 128)) return v > 0 ? std::numeric_limits<float>::infinity()
                                                          : -std::numeric_limits<float>::infinity();
  return float(r);
}
float ref_half(float v) {
  if (std::isnan(v) || std::isinf(v)) return v;
  if (v == 0.0f) return v;
  int e;
  std::frexp(double(v), &e);
  const double ulp = std::ldexp(1.0, (std::max)(e - 1, -14) - 10);
  const double r = round_to_grid_even(double(v), ulp);
  if (std::fabs(r) > 65504.0) return v > 0 ? std::numeric_limits<float>::infinity()
                                           : -std::numeric_limits<float>::infinity();
  if (r == 0.0) return std::signbit(v) ? -0.0f : 0.0f;
  return float(r);
}
bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

}  // namespace

TEST_SUITE("cuda_host") {
  TEST_CASE("key_bits covers the experts and the sentinel") {
    for (index_t E = 1; E < 5000; ++E) {
      const int b = cd::key_bits(E);
      CHECK((index_t{1} << b) > E);        // E itself (the sentinel) fits
      CHECK((index_t{1} << (b - 1)) <= E);  // and no bit is wasted
    }
  }

  TEST_CASE("max_m_tiles bounds the tile count of every split of the rows") {
    dmoe_testing::splitmix g(11, 3, 5);
    for (int trial = 0; trial < 2000; ++trial) {
      const index_t E = g.integer(1, 40), max_k = g.integer(1, int(E)), tokens = g.integer(0, 300);
      const index_t nnz_max = tokens * max_k;
      const index_t nnz = nnz_max > 0 ? g.integer(0, int(nnz_max)) : 0;
      // random split of nnz rows over E experts, sometimes concentrated on a few
      std::vector<index_t> c(static_cast<std::size_t>(E), 0);
      const int hot = g.integer(1, int(E));
      for (index_t i = 0; i < nnz; ++i) ++c[static_cast<std::size_t>(g.integer(0, hot - 1))];
      index_t tiles = 0;
      for (index_t v : c) tiles += cd::ceil_div(v, cd::gemm_bm);
      CHECK(tiles <= cd::max_m_tiles(nnz_max, E));
    }
    // tight when every expert gets one row past a full tile
    CHECK(cd::max_m_tiles(4 * (cd::gemm_bm + 1), 4) == 8);
    CHECK(cd::max_m_tiles(0, 7) == 0);
  }

  TEST_CASE("persistent grid: fills the GPU, never exceeds the worst case, never empty") {
    CHECK(cd::persistent_grid(0, 132) == 1);
    CHECK(cd::persistent_grid(10, 132) == 10);
    CHECK(cd::persistent_grid(100000, 132) == 132 * cd::gemm_blocks_per_sm);
    CHECK(cd::persistent_grid(5, 0) == 2);  // unknown SM count: treated as 1 SM
    CHECK(cd::blocks_for(0, 256) == 1);
    CHECK(cd::blocks_for(257, 256) == 2);
  }

  TEST_CASE("int32 index guard") {
    CHECK(cd::fits_int32(1000, 128));
    CHECK(cd::fits_int32(0, 1 << 30));
    CHECK_FALSE(cd::fits_int32(index_t{1} << 24, 256));
    CHECK_FALSE(cd::fits_int32(-1, 1));
  }

  TEST_CASE("workspace layout: aligned, disjoint, sized by the same routine") {
    dmoe_testing::splitmix g(5, 7, 1);
    for (int trial = 0; trial < 200; ++trial) {
      cd::layer_dims dm;
      dm.d = g.integer(1, 300);
      dm.E = g.integer(1, 64);
      dm.n = g.integer(1, 200);
      dm.f = g.integer(1, 2);
      dm.max_k = g.integer(1, int(dm.E));
      dm.router_hidden = g.coin() ? g.integer(1, 64) : 0;
      dm.storage_bytes = g.coin() ? 2 : 4;
      const index_t tokens = g.integer(1, 500);
      const std::size_t sort_b = std::size_t(g.integer(0, 100000)), scan_b = std::size_t(g.integer(0, 5000));
      dmoe::detail::carver measure;
      cd::carve_layer(measure, dm, tokens, sort_b, scan_b);
      const std::size_t bytes = measure.bytes();
      // carve into a real buffer at an odd offset, as a caller's pointer may be
      std::vector<unsigned char> mem(bytes + 1);
      void* base = dmoe::detail::carver::align(mem.data() + 1);
      REQUIRE(static_cast<unsigned char*>(base) >= mem.data() + 1);
      dmoe::detail::carver c(base);
      const cd::layer_buffers b = cd::carve_layer(c, dm, tokens, sort_b, scan_b);
      const index_t items = tokens * dm.max_k;
      CHECK(b.items == items);
      struct span { const void* p; std::size_t n; };
      const std::size_t st = std::size_t(dm.storage_bytes);
      const std::vector<span> spans = {
          {b.error_token, 8},
          {b.slot_overflow, 8},
          {b.scores, 4 * std::size_t(tokens * dm.E)},
          {b.router_hidden, 4 * std::size_t(tokens * dm.router_hidden)},
          {b.counts, 4 * std::size_t(tokens + 1)},
          {b.slot_expert, 4 * std::size_t(items)},
          {b.slot_weight, 4 * std::size_t(items)},
          {b.slot_row, 4 * std::size_t(items)},
          {b.token_offsets, sizeof(index_t) * std::size_t(tokens + 1)},
          {b.expert_offsets, 4 * std::size_t(dm.E + 1)},
          {b.tile_offsets, 4 * std::size_t(dm.E + 1)},
          {b.k_histogram, 4 * std::size_t(dm.E + 1)},
          {b.plan_expert, 4 * std::size_t(items)},
          {b.plan_weight, 4 * std::size_t(items)},
          {b.sort_keys, 4 * std::size_t(items)},
          {b.sort_keys_out, 4 * std::size_t(items)},
          {b.sort_vals, 4 * std::size_t(items)},
          {b.sort_vals_out, 4 * std::size_t(items)},
          {b.sorted_token, 4 * std::size_t(items)},
          {b.sort_temp, sort_b},
          {b.scan_temp, scan_b},
          {b.hidden, st * std::size_t(items * dm.n)},
          {b.out, st * std::size_t(items * dm.d)}};
      const auto* lo = mem.data();
      const auto* hi = mem.data() + mem.size();
      for (std::size_t i = 0; i < spans.size(); ++i) {
        const auto* p = static_cast<const unsigned char*>(spans[i].p);
        CHECK(reinterpret_cast<std::uintptr_t>(p) % dmoe::detail::workspace_alignment == 0);  // CUB wants 256
        CHECK(p >= lo);
        CHECK(p + spans[i].n <= hi);
        if (i + 1 < spans.size()) CHECK(p + spans[i].n <= static_cast<const unsigned char*>(spans[i + 1].p));
      }
      CHECK(b.sort_temp_bytes == sort_b);
      CHECK(b.scan_temp_bytes == scan_b);
      CHECK(b.slot_capacity == items);
      // more tokens never need less
      dmoe::detail::carver bigger;
      cd::carve_layer(bigger, dm, tokens + 1, sort_b, scan_b);
      CHECK(bigger.bytes() >= bytes);
      // A slot bound shrinks the activation rows, the plan and the sort (everything after the
      // strided selection and the offsets): those pointers stay where they were, and the size
      // drops by the rows left out, (n + d) values of T and 7 int32/float entries each.
      const index_t slots = g.integer(0, int(items));
      dmoe::detail::carver cs(base);
      const cd::layer_buffers bs = cd::carve_layer(cs, dm, tokens, sort_b, scan_b, slots);
      CHECK(bs.slot_capacity == slots);
      CHECK(bs.error_token == b.error_token);
      CHECK(bs.scores == b.scores);
      CHECK(bs.slot_row == b.slot_row);
      CHECK(bs.token_offsets == b.token_offsets);
      CHECK(bs.k_histogram == b.k_histogram);
      CHECK(bs.plan_expert == b.plan_expert);
      dmoe::detail::carver ms;
      cd::carve_layer(ms, dm, tokens, sort_b, scan_b, slots);
      const std::size_t saved = std::size_t(items - slots) * (st * std::size_t(dm.n + dm.d) + 7 * 4);
      CHECK(ms.bytes() <= bytes - saved + 10 * dmoe::detail::workspace_alignment);
      CHECK(ms.bytes() + saved <= bytes + 10 * dmoe::detail::workspace_alignment);
    }
  }

  TEST_CASE("backward scratch layout: aligned, disjoint, rows bounded by the forward's slot capacity") {
    dmoe_testing::splitmix g(9, 3, 1);
    for (int trial = 0; trial < 200; ++trial) {
      cd::layer_dims dm;
      dm.d = g.integer(1, 300);
      dm.E = g.integer(1, 64);
      dm.n = g.integer(1, 200);
      dm.f = g.integer(1, 2);
      dm.max_k = g.integer(1, int(dm.E));
      const index_t tokens = g.integer(0, 500), items = tokens * dm.max_k;
      const index_t slots = g.coin() ? -1 : g.integer(0, int(items));
      const bool gram = g.coin();
      dmoe::detail::carver measure;
      cd::carve_backward(measure, dm, tokens, slots, gram);
      std::vector<unsigned char> mem(measure.bytes() + 1);
      void* base = dmoe::detail::carver::align(mem.data() + 1);
      dmoe::detail::carver c(base);
      const cd::backward_buffers b = cd::carve_backward(c, dm, tokens, slots, gram);
      const index_t cap = slots < 0 ? items : slots;
      CHECK(b.slot_capacity == cap);
      CHECK(b.tokens == tokens);
      struct span { const void* p; std::size_t n; };
      const auto f4 = [](index_t k) { return 4 * std::size_t(k); };
      const std::vector<span> spans = {{b.dweight, f4(items)},           {b.g, f4(cap * dm.d)},
                                       {b.dpost, f4(cap * dm.n)},        {b.dpre, f4(cap * dm.f * dm.n)},
                                       {b.dx_slot, f4(cap * dm.d)},      {b.dx_router, f4(tokens * dm.d)},
                                       {b.dscores, f4(tokens * dm.E)},   {b.da, f4(tokens * dm.E)},
                                       {b.token_aux, f4(tokens)},        {b.token_sum, f4(tokens)},
                                       {b.fired, f4(tokens)},            {b.expert_count, f4(dm.E + 1)},
                                       {b.expert_tmp, f4(4 * dm.E)},     {b.gram, f4(gram ? dm.E * dm.E : 0)},
                                       {b.scalar, 4}};
      const auto* lo = mem.data();
      const auto* hi = mem.data() + mem.size();
      for (std::size_t i = 0; i < spans.size(); ++i) {
        const auto* p = static_cast<const unsigned char*>(spans[i].p);
        CHECK(reinterpret_cast<std::uintptr_t>(p) % dmoe::detail::workspace_alignment == 0);
        CHECK(p >= lo);
        CHECK(p + spans[i].n <= hi);
        if (i + 1 < spans.size()) CHECK(p + spans[i].n <= static_cast<const unsigned char*>(spans[i + 1].p));
      }
      // The per-row buffers scale with the slot capacity, not with tokens * max_k: a bound of
      // `cap` rows costs (2 d + n + f n) floats per row and no more.
      dmoe::detail::carver none;
      cd::carve_backward(none, dm, tokens, 0, gram);
      const std::size_t per_row = 4 * std::size_t(2 * dm.d + dm.n + dm.f * dm.n);
      CHECK(measure.bytes() <= none.bytes() + per_row * std::size_t(cap) + 4 * dmoe::detail::workspace_alignment);
      CHECK(measure.bytes() + 4 * dmoe::detail::workspace_alignment >= none.bytes() + per_row * std::size_t(cap));
    }
  }

  TEST_CASE("float -> bf16 / fp16 conversions round to nearest even") {
    std::vector<float> vals = {0.0f, -0.0f, 1.0f, -1.0f, 1.5f, 3.14159265f, 65504.0f, 65519.996f, 65520.0f, 1e6f,
                               -1e6f, 6.0e-8f, 5.9604645e-8f, 2.9802322e-8f, 2.98023259e-8f, 1e-8f, 6.1035156e-5f,
                               6.1e-5f, 3.0e38f, 3.4028235e38f, -3.4028235e38f, 1.0e-40f, 1.00390625f, 1.01171875f,
                               std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min()};
    dmoe_testing::splitmix g(3, 9, 4);
    for (int i = 0; i < 20000; ++i) {
      vals.push_back(float(g.normal() * std::ldexp(1.0, g.integer(-30, 20))));
      vals.push_back(cd::bits_float(std::uint32_t(g.next())));  // any bit pattern
    }
    // exact ties of both formats
    for (int e = -20; e < 15; ++e) {
      vals.push_back(float(std::ldexp(1.0 + 1.0 / 256.0, e)));         // bf16 tie, lower even
      vals.push_back(float(std::ldexp(1.0 + 3.0 / 256.0, e)));         // bf16 tie, upper even
      vals.push_back(float(std::ldexp(1.0 + 1.0 / 2048.0, e)));        // fp16 tie
      vals.push_back(float(std::ldexp(1.0 + 3.0 / 2048.0, e)));
    }
    for (float v : vals) {
      CAPTURE(v);
      const float b = cd::bf16_bits_to_float(cd::float_to_bf16_bits(v));
      CHECK(same_float(b, ref_bf16(v)));
      const float h = cd::half_bits_to_float(cd::float_to_half_bits(v));
      CHECK(same_float(h, ref_half(v)));
    }
  }

  TEST_CASE("16-bit values survive a round trip through float") {
    for (std::uint32_t u = 0; u < 65536; ++u) {
      const auto h = static_cast<std::uint16_t>(u);
      const float fh = cd::half_bits_to_float(h);
      if (std::isnan(fh)) {
        CHECK(std::isnan(cd::half_bits_to_float(cd::float_to_half_bits(fh))));
      } else {
        CHECK(cd::float_to_half_bits(fh) == h);
      }
      const float fb = cd::bf16_bits_to_float(h);
      if (std::isnan(fb)) {
        CHECK(std::isnan(cd::bf16_bits_to_float(cd::float_to_bf16_bits(fb))));
      } else {
        CHECK(cd::float_to_bf16_bits(fb) == h);
      }
    }
  }
}

TEST_SUITE("cuda_host") {
  TEST_CASE("dispatch index logic: expert boundaries, tile scan, tile -> expert") {
    dmoe_testing::splitmix g(21, 5, 9);
    for (int trial = 0; trial < 500; ++trial) {
      const int E = g.integer(1, 30), max_k = g.integer(1, E), tokens = g.integer(1, 200);
      const index_t items = index_t(tokens) * max_k;
      // strided keys as select_kernel writes them: a token's used slots, then sentinels
      std::vector<std::int32_t> keys(static_cast<std::size_t>(items));
      const int hot = g.integer(1, E);  // sometimes most experts stay idle
      for (int t = 0; t < tokens; ++t) {
        const int c = g.integer(0, max_k);
        for (int i = 0; i < max_k; ++i)
          keys[std::size_t(t * max_k + i)] = i < c ? g.integer(0, hot - 1) : E;
      }
      std::vector<std::int32_t> sorted = keys;
      std::stable_sort(sorted.begin(), sorted.end());
      std::vector<std::int32_t> off(std::size_t(E + 1), -7);
      for (index_t r = 0; r <= items; ++r) cd::expert_boundaries(sorted.data(), items, E, r, off.data());
      // reference: a histogram
      std::vector<std::int32_t> ref(std::size_t(E + 1), 0);
      for (auto k : keys)
        if (k < E) ++ref[std::size_t(k + 1)];
      for (int e = 0; e < E; ++e) ref[std::size_t(e + 1)] += ref[std::size_t(e)];
      REQUIRE(off == ref);
      std::vector<std::int32_t> tiles(std::size_t(E + 1));
      cd::scan_tiles(off.data(), E, tiles.data());
      CHECK(tiles[std::size_t(E)] <= cd::max_m_tiles(items, E));
      // every M-tile maps to the expert whose rows it covers, and tiles cover each expert exactly
      std::vector<index_t> covered(std::size_t(E), 0);
      for (int mt = 0; mt < tiles[std::size_t(E)]; ++mt) {
        const int e = cd::expert_of_tile(tiles.data(), E, mt);
        REQUIRE(e >= 0);
        REQUIRE(e < E);
        CHECK(tiles[std::size_t(e)] <= mt);
        CHECK(mt < tiles[std::size_t(e + 1)]);
        const index_t row0 = off[std::size_t(e)] + index_t(mt - tiles[std::size_t(e)]) * cd::gemm_bm;
        CHECK(row0 < off[std::size_t(e + 1)]);
        covered[std::size_t(e)] += (std::min)(index_t(cd::gemm_bm), index_t(off[std::size_t(e + 1)]) - row0);
      }
      for (int e = 0; e < E; ++e) CHECK(covered[std::size_t(e)] == off[std::size_t(e + 1)] - off[std::size_t(e)]);
    }
  }
}

TEST_SUITE("cuda_host") {
  // grouped_gemm_kernel's persistent loop, with its arithmetic: block b takes linear tiles b,
  // b + grid, ... < tile_offsets[E] * ntn, splits each into (mt = tile / ntn, nt = tile % ntn), finds
  // the expert by expert_of_tile and its rows [row0, min(row0 + bm, row_end)) and columns
  // [nt bn, min(nt bn + bn, N)). Every output element of every expert must be written exactly once,
  // whatever grid the host chose from persistent_grid (small or larger than the tile count).
  TEST_CASE("persistent GEMM walk: every (row, column) of every expert exactly once") {
    dmoe_testing::splitmix g(33, 7, 1);
    for (int trial = 0; trial < 300; ++trial) {
      const int E = g.integer(1, 12), max_k = g.integer(1, E), tokens = g.integer(1, 160);
      const int N = g.integer(1, 200), sms = g.integer(1, 8);
      const index_t items = index_t(tokens) * max_k;
      // a split of at most `items` rows over the experts, some experts idle
      std::vector<std::int32_t> off(std::size_t(E + 1), 0);
      const int hot = g.integer(1, E);
      const int used = g.integer(0, int(items));
      for (int i = 0; i < used; ++i) ++off[std::size_t(g.integer(0, hot - 1) + 1)];
      for (int e = 0; e < E; ++e) off[std::size_t(e + 1)] += off[std::size_t(e)];
      std::vector<std::int32_t> tiles(std::size_t(E + 1));
      cd::scan_tiles(off.data(), E, tiles.data());
      const int ntn = (N + cd::gemm_bn - 1) / cd::gemm_bn;
      const index_t grid = cd::persistent_grid(cd::max_m_tiles(items, E) * cd::n_tiles(N), sms);
      const int total = tiles[std::size_t(E)] * ntn;
      REQUIRE(index_t(total) <= cd::max_m_tiles(items, E) * cd::n_tiles(N));
      std::vector<int> hits(std::size_t(used) * std::size_t(N), 0);  // sorted row x column
      for (index_t blk = 0; blk < grid; ++blk)
        for (int tile = int(blk); tile < total; tile += int(grid)) {
          const int mt = tile / ntn, nt = tile % ntn;
          const int e = cd::expert_of_tile(tiles.data(), E, mt);
          const int row0 = off[std::size_t(e)] + (mt - tiles[std::size_t(e)]) * cd::gemm_bm;
          const int row_end = off[std::size_t(e + 1)];
          REQUIRE(row0 < row_end);  // no tile without rows
          for (int r = 0; r < cd::gemm_bm; ++r)
            for (int c = 0; c < cd::gemm_bn; ++c) {
              const int row = row0 + r, col = nt * cd::gemm_bn + c;
              if (row >= row_end || col >= N) continue;  // the kernel's mask
              ++hits[std::size_t(row) * std::size_t(N) + std::size_t(col)];
            }
        }
      for (int h : hits) REQUIRE(h == 1);
    }
  }
}
