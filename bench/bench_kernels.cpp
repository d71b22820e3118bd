// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// The expert product alone (cpu/detail/panel_kernels.hpp), at the shapes one expert of shape S
/// sees, for every instruction set this CPU runs and for a set of register tiles: the numbers
/// behind tile_for() (docs/benchmarks.md, "Tile shapes"). pct_peak is against the FMA probe of
/// this binary (bench_limits.hpp), so a run states how close the kernel is to the core's limit.
///
///   bench_kernels --benchmark_filter=tile     every tile at the two expert products
///   bench_kernels --benchmark_filter=rows     the chosen tile at 1..512 rows (the layer's range)
///   bench_kernels --benchmark_filter=cold     the chosen tile when every call finds another expert's
///                                             panels (24 experts, as in a layer: they come from L3
///                                             or memory, not L2)
///   bench_kernels --benchmark_filter=bf16     where the CPU has AMX-BF16: infer's tile product
///                                             (amx_kernels.hpp) at the expert shapes, and the peak
///                                             of tdpbf16ps and of vdpbf16ps against fp32 FMA
///                                             (docs/design.md, "bf16 tiles for inference")
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include <dmoe/cpu/detail/amx_kernels.hpp>
#include <dmoe/cpu/detail/panel_kernels.hpp>
#include <dmoe/detail/random.hpp>

#include "bench_limits.hpp"

namespace {
using dmoe::index_t;
namespace cb = dmoe::detail::cpu_backend;

/// Operands of one product: A (rows x K, rows read through a shuffled index, as the layer reads
/// token rows), B packed for panels of width nr, C (rows x N).
struct operands {
  index_t m, n, k, nr;
  std::vector<float> a, b, c, bias;
  std::vector<index_t> index;
  operands(index_t m_, index_t n_, index_t k_, index_t nr_, index_t a_rows)
      : m(m_), n(n_), k(k_), nr(nr_), a(std::size_t(a_rows * k_)), b(std::size_t(cb::packed_panel_elems(k_, n_, nr_))),
        c(std::size_t(m_ * n_)), bias(std::size_t(n_)), index(std::size_t(m_)) {
    dmoe::detail::rng rng(7);
    for (auto& v : a) v = float(rng.uniform() - 0.5);
    std::vector<float> w(std::size_t(k_ * n_));
    for (auto& v : w) v = float(rng.uniform() - 0.5);
    for (auto& v : bias) v = float(rng.uniform() - 0.5);
    cb::pack_panels(k_, n_, w.data(), n_, index_t(1), nr_, b.data());
    for (index_t i = 0; i < m_; ++i) index[std::size_t(i)] = (i * 37) % a_rows;  // scattered token rows
  }
};

void report(benchmark::State& st, const operands& o, int threads_peak = 1) {
  const double flops = 2.0 * double(o.m) * double(o.n) * double(o.k);
  st.counters["GFLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  const double peak = dmoe_bench::probe().fma_peak(threads_peak);
  st.counters["pct_peak"] = benchmark::Counter(flops * 100.0 / (peak * 1e9), benchmark::Counter::kIsIterationInvariantRate);
}

bool have_isa(dmoe::cpu_isa isa) { return static_cast<int>(dmoe::supported_cpu_isa()) >= static_cast<int>(isa); }

#if DMOE_HAVE_X86_KERNELS
template <int MR, int NV>
void tile_avx512(benchmark::State& st) {
  if (!have_isa(dmoe::cpu_isa::avx512)) {
    st.SkipWithError("AVX-512 not supported here");
    return;
  }
  using V = cb::avx512_isa::vec<float>;
  const index_t nr = index_t(NV) * V::lanes;
  operands o(st.range(0), st.range(1), st.range(2), nr, 512);
  const auto b = cb::panel_b<float>::packed(o.b.data(), o.k, nr);
  const cb::row_source<float> a{o.a.data(), o.k, o.index.data()};
  for (auto _ : st) {
    cb::avx512_isa::panel_product<V, MR, NV>(o.m, o.n, o.k, a, b, o.bias.data(), o.c.data(), o.n);
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  report(st, o);
}
template <int MR, int NV>
void tile_avx2(benchmark::State& st) {
  if (!have_isa(dmoe::cpu_isa::avx2)) {
    st.SkipWithError("AVX2 not supported here");
    return;
  }
  using V = cb::avx2_isa::vec<float>;
  const index_t nr = index_t(NV) * V::lanes;
  operands o(st.range(0), st.range(1), st.range(2), nr, 512);
  const auto b = cb::panel_b<float>::packed(o.b.data(), o.k, nr);
  const cb::row_source<float> a{o.a.data(), o.k, o.index.data()};
  for (auto _ : st) {
    cb::avx2_isa::panel_product<V, MR, NV>(o.m, o.n, o.k, a, b, o.bias.data(), o.c.data(), o.n);
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  report(st, o);
}
#endif

/// The dispatching entry point with the tile tile_for() chose, over the row counts an expert sees.
void rows_chosen(benchmark::State& st) {
  const auto isa = dmoe::active_cpu_isa();
  const index_t nr = cb::tile_for<float>(isa).nr();
  operands o(st.range(0), st.range(1), st.range(2), nr, 512);
  const auto b = cb::panel_b<float>::packed(o.b.data(), o.k, nr);
  const cb::row_source<float> a{o.a.data(), o.k, o.index.data()};
  for (auto _ : st) {
    cb::panel_product<float>(isa, o.m, o.n, o.k, a, b, o.bias.data(), o.c.data(), o.n);
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  report(st, o);
  st.SetLabel(std::string(dmoe::to_string(isa)));
}

/// The chosen tile over the panels of 24 experts in turn, as a layer's forward meets them (not in
/// L2): against rows/chosen, what cold weights cost the kernel.
void cold_chosen(benchmark::State& st) {
  const auto isa = dmoe::active_cpu_isa();
  const index_t nr = cb::tile_for<float>(isa).nr(), experts = 24;
  operands o(st.range(0), st.range(1), st.range(2), nr, 512);
  const index_t elems = cb::packed_panel_elems(o.k, o.n, nr);
  std::vector<float> panels(std::size_t(elems * experts));
  for (index_t e = 0; e < experts; ++e) std::copy(o.b.begin(), o.b.end(), panels.begin() + e * elems);
  const cb::row_source<float> a{o.a.data(), o.k, o.index.data()};
  index_t e = 0;
  for (auto _ : st) {
    const auto b = cb::panel_b<float>::packed(panels.data() + e * elems, o.k, nr);
    cb::panel_product<float>(isa, o.m, o.n, o.k, a, b, o.bias.data(), o.c.data(), o.n);
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
    e = (e + 1) % experts;
  }
  report(st, o);
  st.SetLabel(std::string(dmoe::to_string(isa)));
}

#if DMOE_HAVE_AMX_KERNELS
/// infer's bf16 tile product (amx_product) at an expert's shape: A rows already in bf16, as infer
/// gathers them; GFLOP/s against the fp32 FMA probe (pct_peak above 100: faster than fp32 can be).
void tiles_bf16(benchmark::State& st) {
  const index_t m = st.range(0), N = st.range(1), K = st.range(2);
  const index_t kp = cb::round_up(K, cb::amx_k_chunk), mp = cb::round_up(m, cb::amx_rows), ldc = cb::round_up(N, 16);
  dmoe::detail::rng rng(7);
  std::vector<float> w(std::size_t(K * N)), x(std::size_t(m * K)), bias(std::size_t(ldc), 0.5f);
  for (auto& v : w) v = float(rng.uniform() - 0.5);
  for (auto& v : x) v = float(rng.uniform() - 0.5);
  std::vector<cb::bf16_t> b(std::size_t(cb::amx_packed_elems(K, N))), a(std::size_t(mp * kp));
  cb::amx_pack_b(K, N, w.data(), N, 1, b.data());  // w row-major K x N
  cb::amx_narrow_rows(x.data(), K, nullptr, m, K, kp, a.data());
  std::vector<float> c(std::size_t(mp * ldc));
  cb::amx_begin();
  for (auto _ : st) {
    cb::amx_product(mp / cb::amx_rows, N, kp / cb::amx_k_chunk, a.data(), kp, b.data(), bias.data(), c.data(), ldc);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  cb::amx_end();
  const double flops = 2.0 * double(m) * double(N) * double(K);
  st.counters["GFLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["pct_peak"] = benchmark::Counter(flops * 100.0 / (dmoe_bench::probe().fma_peak(1) * 1e9),
                                               benchmark::Counter::kIsIterationInvariantRate);
}

/// The instructions' own peaks on one core, operands in registers: tdpbf16ps into 4 independent
/// 16 x 16 accumulator tiles, and vdpbf16ps (AVX512-BF16) into 12 independent zmm chains.
__attribute__((target("amx-tile,amx-bf16"))) void peak_tdpbf16ps(benchmark::State& st) {
  std::vector<std::uint16_t> ab(16 * 32, 0x3c00);  // bf16 2^-7: the sums stay finite
  cb::amx_begin();
  _tile_loadd(4, ab.data(), 64);
  _tile_loadd(5, ab.data(), 64);
  _tile_loadd(6, ab.data(), 64);
  _tile_loadd(7, ab.data(), 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  constexpr int reps = 1000;
  for (auto _ : st)
    for (int i = 0; i < reps; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  std::vector<float> out(256);
  _tile_stored(0, out.data(), 64);
  cb::amx_end();
  benchmark::DoNotOptimize(out.data());
  st.counters["GFLOP/s"] = benchmark::Counter(reps * 4.0 * 16 * 16 * 32 * 2, benchmark::Counter::kIsIterationInvariantRate);
}
__attribute__((target("avx512f,avx512bf16"))) void peak_vdpbf16ps(benchmark::State& st) {
  __m512 acc[12];
  for (auto& v : acc) v = _mm512_setzero_ps();
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3c003c00);
  constexpr int reps = 1000;
  for (auto _ : st)
    for (int i = 0; i < reps; ++i) {
      for (auto& v : acc) v = _mm512_dpbf16_ps(v, a, a);
      benchmark::DoNotOptimize(acc[0]);
    }
  alignas(64) float lanes[12][16];
  for (int j = 0; j < 12; ++j) _mm512_store_ps(lanes[j], acc[j]);
  benchmark::DoNotOptimize(lanes);
  st.counters["GFLOP/s"] = benchmark::Counter(reps * 12.0 * 64, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["vs_fma_probe"] =
      benchmark::Counter(reps * 12.0 * 64 / (dmoe_bench::probe().fma_peak(1) * 1e9), benchmark::Counter::kIsIterationInvariantRate);
}

/// Registered only where they run: the tiles and tdpbf16ps with AMX-BF16, vdpbf16ps with
/// AVX512-BF16 (AMD Zen 4 has it without AMX, so its peak is listed there alone).
void register_bf16() {
  if (dmoe::cpu_has_bf16_tiles()) {
    for (auto shape : {std::vector<std::int64_t>{128, 128, 768}, std::vector<std::int64_t>{128, 768, 128},
                       std::vector<std::int64_t>{32, 768, 128}})
      benchmark::RegisterBenchmark("bf16/tiles", tiles_bf16)->Args(shape);
    benchmark::RegisterBenchmark("bf16/peak/tdpbf16ps", peak_tdpbf16ps);
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16"))
    benchmark::RegisterBenchmark("bf16/peak/vdpbf16ps", peak_vdpbf16ps);
}
#else
void register_bf16() {}
#endif

// Shapes of one expert of shape S (d 768, width 128) at 128 rows (512 tokens, f = 0.25):
// the first product (K = 768 -> N = 128) and the second (K = 128 -> N = 768).
void expert_shapes(benchmark::internal::Benchmark* b) {
  b->Args({128, 128, 768})->Args({128, 768, 128});
}
void row_range(benchmark::internal::Benchmark* b) {
  for (index_t m : {1, 2, 4, 8, 16, 32, 64, 128, 256, 512}) {
    b->Args({m, 128, 768});
    b->Args({m, 768, 128});
  }
}

#if DMOE_HAVE_X86_KERNELS
BENCHMARK(tile_avx512<14, 2>)->Name("tile/avx512/14x2")->Apply(expert_shapes);
BENCHMARK(tile_avx512<12, 2>)->Name("tile/avx512/12x2")->Apply(expert_shapes);
BENCHMARK(tile_avx512<8, 3>)->Name("tile/avx512/8x3")->Apply(expert_shapes);
BENCHMARK(tile_avx512<7, 4>)->Name("tile/avx512/7x4")->Apply(expert_shapes);
BENCHMARK(tile_avx512<6, 4>)->Name("tile/avx512/6x4")->Apply(expert_shapes);
BENCHMARK(tile_avx512<5, 4>)->Name("tile/avx512/5x4")->Apply(expert_shapes);
BENCHMARK(tile_avx512<4, 6>)->Name("tile/avx512/4x6")->Apply(expert_shapes);
BENCHMARK(tile_avx512<3, 8>)->Name("tile/avx512/3x8")->Apply(expert_shapes);
BENCHMARK(tile_avx512<4, 4>)->Name("tile/avx512/4x4")->Apply(expert_shapes);
BENCHMARK(tile_avx2<6, 2>)->Name("tile/avx2/6x2")->Apply(expert_shapes);
BENCHMARK(tile_avx2<4, 3>)->Name("tile/avx2/4x3")->Apply(expert_shapes);
BENCHMARK(tile_avx2<3, 4>)->Name("tile/avx2/3x4")->Apply(expert_shapes);
#endif
BENCHMARK(rows_chosen)->Name("rows/chosen")->Apply(row_range);
BENCHMARK(cold_chosen)->Name("cold/chosen")->Apply(expert_shapes);

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args(argv, argv + argc);
  dmoe_bench::strip_smoke_flag(args);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  dmoe_bench::add_limits_context(dmoe_bench::probe());
  register_bf16();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
