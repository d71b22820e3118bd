// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// Decode with the weights streaming from DRAM: a stack of L independent shape-S MoE layers
/// (d_model 768, 24 experts x 128, ReLU, top-k k = 6, so f = 0.25), each with its own random
/// weights and router, and 1 or 8 tokens stepped through all of them, one forward per layer (every
/// layer sees the same input rows: the memory traffic is that of a real decode step, without the
/// numerics of a deep random network).
///
/// L is chosen at run time so that the weight bytes ONE token touches in one step (its 6 experts in
/// every layer, plus the routers) are at least twice the last-level cache (read at run time,
/// bench_limits.hpp): between two visits of a layer's expert, twice the cache has gone through it,
/// so the weights come from DRAM. On a machine with a 480 MiB L3 that is about 210 layers, 4 GB of
/// fp32 weights. Total weights are capped at a third of the free memory (the label then says by
/// how much the touched bytes fall short). --dmoe_decode_layers=N overrides L.
///
///   decode_dram/T/tokens:N/threads:P   all L layers
///   decode_hot/T/tokens:N/threads:P    the first 4 layers only (<= 80 MB: cache-resident after the
///                                      first pass), the same code from cache, for comparison
/// Counters: layers; weights_GB (all layers); touched_MB (weight bytes the step reads: for each
/// layer, the experts its tokens use plus the router and output bias, from the routing of the
/// benchmark's input); touched_vs_llc; GB/s = touched bytes / step time; pct_read_bw = that over
/// the measured read bandwidth of the same thread count (bench_limits.hpp).
///
/// fp32 now. The bf16 variant is one template argument away (bm_decode<Eigen::bfloat16, float>),
/// registered only when DMOE_BENCH_DECODE_BF16 is 1: moe_layer<Eigen::bfloat16, dmoe::cpu, ...>
/// does not compile yet (the CPU backend computes in float or double; bf16 weight storage is
/// issue 10 item 6). Turn it on when it does.
///
///   bench_decode --benchmark_out=decode.json --benchmark_out_format=json
///   python3 scripts/bench_table.py --decode decode.json

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "bench_limits.hpp"

#ifndef DMOE_BENCH_DECODE_BF16
#define DMOE_BENCH_DECODE_BF16 0
#endif

namespace {

using namespace dmoe_bench;

constexpr index_t decode_k = 6;     // f = 6 / 24 = 0.25
constexpr index_t hot_layers = 4;   // 4 x 19 MB: well inside any LLC this benchmark targets
constexpr index_t token_counts[] = {1, 8};
constexpr int thread_counts[] = {1, 2};

index_t layers_override = 0;  // --dmoe_decode_layers=N

template <class T>
using decode_layer = dmoe::moe_layer<T, dmoe::cpu, dmoe::top_k, dmoe::relu>;

/// Weight bytes of one expert (W1, b1, W2; no per-expert bias in shape S) and of the router +
/// output bias, as stored in T.
template <class T>
double expert_bytes(const decode_layer<T>& l) {
  const double d = double(l.d_model()), n = double(l.expert_width());
  return (d * n + n + n * d + (l.config().expert_bias ? d : 0.0)) * double(sizeof(T));
}
template <class T>
double shared_bytes(const decode_layer<T>& l) {
  const double d = double(l.d_model()), E = double(l.num_experts());
  return (d * E + E + (l.config().output_bias ? d : 0.0)) * double(sizeof(T));
}

/// The stack of layers for scalar T, built once (cold path: seconds for hundreds of layers).
template <class T>
struct decode_stack {
  std::vector<std::unique_ptr<decode_layer<T>>> layers;
  std::string note;  ///< how L was chosen
  double total_bytes = 0;

  static decode_stack& get() {
    static decode_stack s = build();
    return s;
  }

  static decode_stack build() {
    decode_stack s;
    const machine_limits& lim = probe();
    auto make = [](index_t i) {
      auto l = std::make_unique<decode_layer<T>>(shape_s(), dmoe::top_k_options{decode_k, true});
      l->randomize(weight_seed + 7919u * std::uint64_t(i));
      return l;
    };
    auto first = make(0);
    const double per_layer_total = expert_bytes(*first) * double(first->num_experts()) + shared_bytes(*first);
    const double per_layer_touched_1 = expert_bytes(*first) * double(decode_k) + shared_bytes(*first);
    index_t L = index_t(std::ceil(2.0 * double(lim.llc_bytes) / per_layer_touched_1));
    s.note = "L: 1 token touches >= 2x LLC";
    const double avail = double(limits_detail::available_memory());
    if (avail > 0 && double(L) * per_layer_total > avail / 3) {
      L = std::max<index_t>(hot_layers, index_t(avail / 3 / per_layer_total));
      s.note = "L capped by free memory (1 token touches " +
               limits_detail::fmt1(double(L) * per_layer_touched_1 / double(lim.llc_bytes)) + "x LLC)";
    }
    if (smoke_mode()) {
      L = hot_layers;
      s.note = "smoke: L = 4, weights in cache";
    }
    if (layers_override > 0) {
      L = layers_override;
      s.note = "L set by --dmoe_decode_layers";
    }
    L = std::max(L, hot_layers);
    s.layers.reserve(std::size_t(L));
    s.layers.push_back(std::move(first));
    for (index_t i = 1; i < L; ++i) s.layers.push_back(make(i));
    s.total_bytes = double(L) * per_layer_total;
    return s;
  }
};

/// Steps `tokens` rows through the first `count` layers of the stack per iteration.
template <class T, class X = T>
void bm_decode(benchmark::State& state, index_t tokens, int threads, bool hot) {
  try {
    auto& stack = decode_stack<T>::get();
    const index_t count = hot ? hot_layers : index_t(stack.layers.size());
    const auto ctx = context_for(threads);
    const auto& l0 = *stack.layers[0];
    dmoe::workspace_buffer ws(l0.workspace_size(ctx, tokens));
    dmoe::row_matrix<X> x = input(tokens).template cast<X>();
    dmoe::row_matrix<X> y(tokens, l0.d_model());
    // Set-up pass: routing of every layer, hence the weight bytes one step touches.
    double touched = 0;
    dmoe::routing_stats stats(l0.num_experts());
    for (index_t i = 0; i < count; ++i) {
      const auto& l = *stack.layers[std::size_t(i)];
      if (auto s = l.forward(ctx, x, y, ws, &stats); !s.ok()) return state.SkipWithError(s.message());
      index_t used = 0;
      for (index_t c : stats.tokens_per_expert) used += c > 0 ? 1 : 0;
      touched += double(used) * expert_bytes(l) + shared_bytes(l);
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (auto _ : state) {
      for (index_t i = 0; i < count; ++i) {
        auto s = stack.layers[std::size_t(i)]->forward(ctx, x, y, ws);
        if (!s.ok()) {
          state.SkipWithError(s.message());
          return;
        }
      }
      benchmark::ClobberMemory();
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                        double(std::max<benchmark::IterationCount>(1, state.iterations()));
    const machine_limits& lim = probe();
    const double gbs = secs > 0 ? touched / secs / 1e9 : 0.0;
    state.counters["layers"] = double(count);
    state.counters["weights_GB"] = double(count) / double(stack.layers.size()) * stack.total_bytes / 1e9;
    state.counters["touched_MB"] = touched / 1e6;
    state.counters["touched_vs_llc"] = touched / double(lim.llc_bytes);
    state.counters["GB/s"] = gbs;
    state.counters["pct_read_bw"] = lim.read_bw(threads) > 0 ? 100.0 * gbs / lim.read_bw(threads) : 0.0;
    state.counters["tokens/s"] =
        benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
    state.SetLabel(std::string(hot ? "hot (4 layers, cache)" : stack.note) + " threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

template <class T, class X = T>
void register_type(const char* type_name) {
  for (index_t tokens : token_counts)
    for (int threads : thread_counts)
      for (bool hot : {true, false}) {
        const std::string name = std::string(hot ? "decode_hot/" : "decode_dram/") + type_name +
                                 "/tokens:" + std::to_string(tokens) + "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { bm_decode<T, X>(s, tokens, threads, hot); })
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond)
            ->ComputeStatistics("min", [](const std::vector<double>& v) {
              return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end());
            });
      }
}

void print_help() {
  std::printf(
      "bench_decode: decode (1 and 8 tokens) through a stack of shape-S MoE layers whose weights exceed the LLC\n"
      "  --dmoe_decode_layers=N  use N layers instead of the computed count (1 token touches >= 2x LLC)\n"
      "  --dmoe_smoke            4 layers and a quick limits probe (a smoke run: figures mean nothing)\n"
      "  --force                 run from a non-optimised build\n\n");
  benchmark::PrintDefaultHelp();
}

}  // namespace

int main(int argc, char** argv) {
  bool force = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--force") == 0) {
      force = true;
    } else if (i > 0 && std::strncmp(argv[i], "--dmoe_decode_layers=", 21) == 0) {
      char* end = nullptr;
      const long v = std::strtol(argv[i] + 21, &end, 10);
      if (end == argv[i] + 21 || *end != '\0' || v < 1 || v > 100000) {
        std::fprintf(stderr, "bench_decode: --dmoe_decode_layers wants a layer count in [1, 100000], got '%s'\n",
                     argv[i] + 21);
        return 2;
      }
      layers_override = index_t(v);
    } else {
      args.push_back(argv[i]);
    }
  }
  strip_smoke_flag(args);
#if !defined(NDEBUG) || !defined(__OPTIMIZE__)
  if (!force) {
    std::fprintf(stderr, "bench_decode: refusing to time a non-optimised build; use Release or pass --force\n");
    return 2;
  }
#endif
  (void)force;
  benchmark::AddCustomContext("dmoe_version", version_string());
  benchmark::AddCustomContext("dmoe_shape", "S: d_model 768, 24 experts x 128, relu, top-k k=6 (f=0.25)");
  register_type<float>("fp32");
#if DMOE_BENCH_DECODE_BF16
  register_type<Eigen::bfloat16, float>("bf16");
#endif
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data(), print_help);
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  add_limits_context(probe());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
