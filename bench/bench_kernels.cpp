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
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

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
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
