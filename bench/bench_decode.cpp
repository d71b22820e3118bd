// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// Decode with the weights streaming from DRAM: a stack of L independent shape-S MoE layers
/// (d_model 768, 24 experts x 128, ReLU, top-k k = 6, so f = 0.25), each with its own random
/// weights and router, and 1 or 8 tokens stepped through all of them, one forward per layer (every
/// layer sees the same input rows: the memory traffic is that of a real decode step, without the
/// numerics of a deep random network).
///
/// L is chosen at run time so that the weight bytes ONE token touches in one step with 16-bit
/// storage (its 6 experts in every layer, plus the routers) are at least twice the last-level
/// cache (read at run time, bench_limits.hpp): between two visits of a layer's expert, twice the
/// cache has gone through it, so the weights come from DRAM (fp32 touches twice as much). On a
/// machine with a 480 MiB L3 that is about 400 layers. The layers (float master weights plus the
/// kernels' panels, 2 x 18.9 MB each) are capped at half the free memory (the label then says by
/// how much the touched bytes fall short). --dmoe_decode_layers=N overrides L.
///
///   decode_dram/S/tokens:N/threads:P   all L layers, expert matrices read in storage S
///                                      (fp32, bf16 or f16: moe_layer::set_weight_storage)
///   decode_hot/S/tokens:N/threads:P    the first 4 layers only (<= 80 MB: cache-resident after the
///                                      first pass), the same code from cache, for comparison
/// Counters: layers; weights_GB (all layers, as the kernels read them); touched_MB (weight bytes
/// the step reads: for each layer, the experts its tokens use plus the router and output bias,
/// from the routing of the benchmark's input, W1 and W2 at the storage's bytes per value);
/// touched_vs_llc; GB/s = touched bytes / step time; pct_read_bw = that over the measured read
/// bandwidth of the same thread count (bench_limits.hpp). The tokens/s of bf16 against fp32 is the
/// figure that matters: the same layers, half the expert bytes.
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

namespace {

using namespace dmoe_bench;

constexpr index_t decode_k = 6;     // f = 6 / 24 = 0.25
constexpr index_t hot_layers = 4;   // 4 x 19 MB: well inside any LLC this benchmark targets
constexpr index_t token_counts[] = {1, 8};
constexpr int thread_counts[] = {1, 2};

index_t layers_override = 0;  // --dmoe_decode_layers=N

using decode_layer = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu>;

double matrix_value_bytes(dmoe::weight_storage s) { return s == dmoe::weight_storage::f32 ? 4.0 : 2.0; }

/// Weight bytes the kernels read for one expert (W1 and W2 in storage s, b1 in float; no
/// per-expert bias in shape S) and for the router + output bias (float).
double expert_bytes(const decode_layer& l, dmoe::weight_storage s) {
  const double d = double(l.d_model()), n = double(l.expert_width());
  return 2.0 * d * n * matrix_value_bytes(s) + (n + (l.config().expert_bias ? d : 0.0)) * 4.0;
}
double shared_bytes(const decode_layer& l) {
  const double d = double(l.d_model()), E = double(l.num_experts());
  return (d * E + E + (l.config().output_bias ? d : 0.0)) * 4.0;
}

/// The stack of layers, built once (cold path: seconds for hundreds of layers).
struct decode_stack {
  std::vector<std::unique_ptr<decode_layer>> layers;
  std::string note;  ///< how L was chosen

  static decode_stack& get() {
    static decode_stack s = build();
    return s;
  }

  static decode_stack build() {
    decode_stack s;
    const machine_limits& lim = probe();
    auto make = [](index_t i) {
      auto l = std::make_unique<decode_layer>(shape_s(), dmoe::top_k_options{decode_k, true});
      l->randomize(weight_seed + 7919u * std::uint64_t(i));
      return l;
    };
    auto first = make(0);
    const auto half = dmoe::weight_storage::bf16;
    // Memory per layer: the float master weights and the kernels' panels of the same size.
    const double per_layer_memory = 2.0 * expert_bytes(*first, dmoe::weight_storage::f32) * double(first->num_experts());
    const double per_layer_touched_1 = expert_bytes(*first, half) * double(decode_k) + shared_bytes(*first);
    index_t L = index_t(std::ceil(2.0 * double(lim.llc_bytes) / per_layer_touched_1));
    s.note = "L: 1 token touches >= 2x LLC in 16 bits";
    const double avail = double(limits_detail::available_memory());
    if (avail > 0 && double(L) * per_layer_memory > avail / 2) {
      L = std::max<index_t>(hot_layers, index_t(avail / 2 / per_layer_memory));
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
    return s;
  }
};

/// Steps `tokens` rows through the first `count` layers of the stack per iteration, the expert
/// matrices read in `storage`.
void bm_decode(benchmark::State& state, dmoe::weight_storage storage, index_t tokens, int threads, bool hot) {
  try {
    auto& stack = decode_stack::get();
    const index_t count = hot ? hot_layers : index_t(stack.layers.size());
    const auto ctx = context_for(threads);
    const auto& l0 = *stack.layers[0];
    dmoe::workspace_buffer ws(l0.workspace_size(ctx, tokens));
    dmoe::row_matrix<float> x = input(tokens);
    dmoe::row_matrix<float> y(tokens, l0.d_model());
    // Set-up pass: the storage (packed by this first forward), the routing of every layer, hence
    // the weight bytes one step touches.
    double touched = 0;
    dmoe::routing_stats stats(l0.num_experts());
    for (index_t i = 0; i < count; ++i) {
      auto& l = *stack.layers[std::size_t(i)];
      l.set_weight_storage(storage);
      if (auto s = l.forward(ctx, x, y, ws, &stats); !s.ok()) return state.SkipWithError(s.message());
      index_t used = 0;
      for (index_t c : stats.tokens_per_expert) used += c > 0 ? 1 : 0;
      touched += double(used) * expert_bytes(l, storage) + shared_bytes(l);
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
    state.counters["weights_GB"] =
        double(count) * (expert_bytes(l0, storage) * double(l0.num_experts()) + shared_bytes(l0)) / 1e9;
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

void register_storage(dmoe::weight_storage storage) {
  for (index_t tokens : token_counts)
    for (int threads : thread_counts)
      for (bool hot : {true, false}) {
        const std::string name = std::string(hot ? "decode_hot/" : "decode_dram/") +
                                 (storage == dmoe::weight_storage::f32 ? "fp32" : dmoe::to_string(storage)) +
                                 "/tokens:" + std::to_string(tokens) + "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(),
                                     [=](benchmark::State& s) { bm_decode(s, storage, tokens, threads, hot); })
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
  for (auto storage : {dmoe::weight_storage::f32, dmoe::weight_storage::bf16, dmoe::weight_storage::f16})
    register_storage(storage);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data(), print_help);
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  add_limits_context(probe());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
