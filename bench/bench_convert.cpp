// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// Dense -> MoE conversion cost (convert/): neuron split and to_moe for the BERT-base FFN shape
/// (d_model 768, F 3072, 24 experts of 128), single thread (the conversion is sequential).
///   convert_total     split_neurons (default options: balanced k-means, 3 restarts, at most 25
///                     rounds each) + to_moe<dynamic_k>: the figure the 2 s budget is about
///   split/<method>    split_neurons alone, for each method
///   kmeans_round      one assignment + update round, the unit the restarts and rounds multiply
/// Counters: rounds = k-means rounds over all restarts, inertia = the kept split's inertia.
/// Weights: PyTorch-style uniform init (dense_ffn::randomize) and a "clustered" variant whose
/// neurons lie around 24 random directions (easy to cluster, converges in a few rounds).
///
///   bench_convert --benchmark_out=convert.json --benchmark_out_format=json

#include <cstdint>

#include <benchmark/benchmark.h>

#include <dmoe/convert/convert_ffn.hpp>
#include <dmoe/convert/split.hpp>
#include <dmoe/detail/random.hpp>
#include <dmoe/dmoe.hpp>

namespace {

using dmoe::index_t;
constexpr index_t d_model = 768, hidden = 3072, experts = 24;
using dense_t = dmoe::dense_ffn<float, dmoe::gelu_erf>;

const dense_t& dense(bool clustered) {
  static dense_t plain = [] {
    dense_t f(d_model, hidden);
    f.randomize(0xD30E);
    return f;
  }();
  static dense_t grouped = [] {
    dense_t f(d_model, hidden);
    f.randomize(0xD30E);
    dmoe::detail::rng g(99);
    dmoe::col_matrix<float> dirs(d_model, experts);
    for (index_t j = 0; j < experts; ++j)
      for (index_t i = 0; i < d_model; ++i) dirs(i, j) = float(g.normal());
    for (index_t j = 0; j < hidden; ++j)
      f.w1().col(j) = dirs.col(index_t(g.below(std::uint64_t(experts)))) + 0.5f * f.w1().col(j) * 27.7f;
    return f;
  }();
  return clustered ? grouped : plain;
}

void convert_total(benchmark::State& state) {
  const auto& f = dense(state.range(0) != 0);
  dmoe::neuron_split s;
  for (auto _ : state) {
    s = dmoe::split_neurons(f, experts);
    auto layer = dmoe::to_moe<dmoe::dynamic_k>(f, s, {0.5});
    benchmark::DoNotOptimize(layer.experts().w1_storage().data());
  }
  state.counters["rounds"] = s.total_iterations;
  state.counters["inertia"] = s.inertia;
  state.SetLabel(state.range(0) ? "clustered" : "uniform_init");
}
BENCHMARK(convert_total)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->MinTime(2.0);

void split(benchmark::State& state) {
  const auto& f = dense(false);
  dmoe::split_options opt;
  opt.method = static_cast<dmoe::split_method>(state.range(0));
  dmoe::neuron_split s;
  for (auto _ : state) {
    s = dmoe::split_neurons(f, experts, opt);
    benchmark::DoNotOptimize(s.neurons.data());
  }
  state.counters["rounds"] = s.total_iterations;
  state.counters["inertia"] = s.inertia;
  const char* names[] = {"balanced_kmeans", "contiguous", "random"};
  state.SetLabel(names[state.range(0)]);
}
BENCHMARK(split)->DenseRange(0, 2)->Unit(benchmark::kMillisecond);

/// One restart capped at 1, 2 or 5 rounds (the uniform-init weights need more than 5): the
/// difference between two caps divided by the difference in rounds is the cost of one round; the
/// worst case of the default options is 3 x 25 rounds plus 3 starts.
void kmeans_round(benchmark::State& state) {
  const auto& f = dense(false);
  dmoe::split_options opt;
  opt.restarts = 1;
  opt.max_iterations = int(state.range(0));
  dmoe::neuron_split s;
  for (auto _ : state) {
    s = dmoe::split_neurons(f, experts, opt);
    benchmark::DoNotOptimize(s.neurons.data());
  }
  state.counters["rounds"] = s.total_iterations;
}
BENCHMARK(kmeans_round)->Arg(1)->Arg(2)->Arg(5)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
