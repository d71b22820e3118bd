// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// CPU forward benchmarks of shape S (docs/performance.md): d_model 768, 24 experts x 128 (dense
/// hidden 3072), ReLU, fp32, tokens {1, 8, 512}, threads {1, 2}. Every MoE figure is meant to be
/// read as a ratio to the dense baselines measured in the same binary and run:
///   dense                  dmoe::dense_ffn<float, relu>(768, 3072) (same kernels and executor)
///   dense_eigen            plain Eigen, y = max(x W1 + b1, 0) W2 + b2, preallocated, threads 1 only
///   dense_openblas         the same with OpenBLAS cblas_sgemm, pinned to the run's thread count
///                          (skipped with a message when the build found no OpenBLAS)
///   moe_top_k      k:K     softmax top-k, k in {2, 6, 12, 24}: f = k/24 = 0.083, 0.25, 0.5, 1.0
///                          (2/24 = 0.083 is the closest k to f = 0.1)
///   moe_dynamic_k  f_pct:P D2DMoE dynamic-k, random router; tau bisected at set-up so that the
///                          measured f is closest to P/100. With 1 token f can only be k/24, so
///                          there tau = 0 and the cap k_max = round(24 P/100) sets f instead.
///   moe_top_any    f_pct:P DynMoE top-any (inference mode), one threshold g for every expert,
///                          bisected at set-up so that the measured f is closest to P/100.
///   loop_top_k, loop_dynamic_k   the PyTorch-style per-expert loop on OpenBLAS (bench_peers.hpp)
///                          over the same layer, setting and routing plan as the moe_ run of the
///                          same name; checked once against dmoe's output (relative 1e-4) and the
///                          run fails (exit status 1) if they differ. The router is not in its time.
/// Counters: tokens/s; f (measured active fraction: executed expert FLOPs / dense FLOPs);
/// target_f; mean_k; exec_frac (router + expert FLOPs over dense FLOPs); experts_used (experts
/// that got at least one token: what bounds small-token runs); flops (executed product FLOPs
/// of one forward: the expert products for MoE and loop runs, 2 d F (2 or 3) per token for the
/// dense ones); GFLOP/s (flops over the mean wall time of the timed iterations) and pct_peak (that
/// over the measured FMA peak of the run's thread count, bench_limits.hpp). Times are wall clock
/// (UseRealTime). The router runs inside the timed forward. The machine's limits (FMA peak,
/// read/copy bandwidth, LLC) are measured once at start and written into the JSON context.
///
///   bench_forward --benchmark_out=forward.json --benchmark_out_format=json
///   python3 scripts/bench_table.py forward.json
///
/// With Google Benchmark's default minimum time (0.5 s per benchmark) a full run of the 81
/// benchmarks takes about 1.5 minutes on a 2-core machine, calibration included (about 10 s of it);
/// --benchmark_min_time=0.2 shortens it, --benchmark_min_time=0.001 --dmoe_smoke makes a smoke run
/// (--dmoe_smoke: a quick limits probe whose figures are not limits; ~15 s in
/// Release; in an -O0 build the calibration at 512 tokens alone takes minutes: filter to
/// tokens:(1|8)/ there). On a shared machine, --benchmark_repetitions=5 adds a "min" aggregate
/// that scripts/bench_table.py --stat min reads. Refuses to run from a build without NDEBUG or
/// without optimisation unless --force is given (exit status 2).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "bench_limits.hpp"
#include "bench_peers.hpp"

namespace {

using namespace dmoe_bench;
using benchmark::Counter;

constexpr index_t token_counts[] = {1, 8, 512};
constexpr int thread_counts[] = {1, 2};
constexpr index_t top_k_values[] = {2, 6, 12, 24};
constexpr int target_percents[] = {10, 25, 50, 100};

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

void skip(benchmark::State& state, const dmoe::status& s) {
  const std::string msg = std::string(dmoe::to_string(s.code())) + ": " + s.message();
  state.SkipWithError(msg.c_str());
}

void set_rate(benchmark::State& state, index_t tokens) {
  state.counters["tokens/s"] = Counter(double(tokens), Counter::kIsIterationInvariantRate);
}

/// dense_ffn's output on input(tokens), 1 thread (the reference of the dense peers' checks).
const matrix& dense_reference(index_t tokens) {
  static std::map<index_t, matrix> cache;
  if (auto it = cache.find(tokens); it != cache.end()) return it->second;
  const auto& net = dense();
  const auto ctx = context_for(1);
  dmoe::workspace_buffer ws(net.workspace_size(ctx, tokens));
  matrix y(tokens, d_model);
  dmoe::throw_if_error(net.forward(ctx, input(tokens), y, ws));
  return cache.emplace(tokens, std::move(y)).first->second;
}

// ---- (a) dense_ffn ----------------------------------------------------------------------------
void bm_dense(benchmark::State& state, index_t tokens, int threads) {
  try {
    const auto& net = dense();
    const auto ctx = context_for(threads);
    dmoe::workspace_buffer ws(net.workspace_size(ctx, tokens));
    const matrix& x = input(tokens);
    matrix y(tokens, d_model);
    if (auto s = net.forward(ctx, x, y, ws); !s.ok()) return skip(state, s);  // warm-up
    const double secs = timed(state, [&] {
      auto s = net.forward(ctx, x, y, ws);
      if (!s.ok()) skip(state, s);
      return s.ok();
    });
    set_rate(state, tokens);
    set_flops(state, net.flops_per_token() * double(tokens), secs, threads);
    state.counters["f"] = 1.0;
    state.counters["exec_frac"] = 1.0;
    state.SetLabel("dense_ffn threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- (b) plain Eigen dense MLP, single-threaded -------------------------------------------------
void bm_dense_eigen(benchmark::State& state, index_t tokens) {
  try {
    const auto& net = dense();
    dense_eigen_peer<activation> peer(net, tokens);
    const Eigen::MatrixXf x = input(tokens);
    Eigen::MatrixXf y(tokens, d_model);
    peer.forward(x, y);
    // Cross-check once: the peer must compute dense_ffn's function.
    if (const double rel = relative_difference(y, dense_reference(tokens)); !(rel <= 1e-4))
      return fail_check(state, "dense_eigen and dense_ffn disagree: max |diff| / max |y| = " + fmt("%g", rel));
    const double secs = timed(state, [&] {
      peer.forward(x, y);
      return true;
    });
    set_rate(state, tokens);
    set_flops(state, net.flops_per_token() * double(tokens), secs, 1);
    state.counters["f"] = 1.0;
    state.counters["exec_frac"] = 1.0;
    state.SetLabel("eigen threads=1");
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- (b') OpenBLAS dense MLP ------------------------------------------------------------------------
void bm_dense_openblas(benchmark::State& state, index_t tokens, int threads) {
  if (!have_openblas) return state.SkipWithError(no_openblas_message);
  try {
    const auto& net = dense();
    openblas_threads(threads);
    dense_blas_peer<activation> peer(net, tokens);
    const matrix& x = input(tokens);
    matrix y(tokens, d_model);
    peer.forward(x.data(), d_model, tokens, y.data(), d_model);
    if (const double rel = relative_difference(y, dense_reference(tokens)); !(rel <= 1e-4))
      return fail_check(state, "dense_openblas and dense_ffn disagree: max |diff| / max |y| = " + fmt("%g", rel));
    const double secs = timed(state, [&] {
      peer.forward(x.data(), d_model, tokens, y.data(), d_model);
      return true;
    });
    set_rate(state, tokens);
    set_flops(state, net.flops_per_token() * double(tokens), secs, threads);
    state.counters["f"] = 1.0;
    state.counters["exec_frac"] = 1.0;
    state.SetLabel("openblas threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- (c, d, e) MoE layers -------------------------------------------------------------------------
/// Experts that got at least one token: at small token counts the layer is bound by loading these
/// experts' weights, so this explains more of the time than f does.
index_t experts_used(const dmoe::routing_stats& s) {
  index_t n = 0;
  for (index_t c : s.tokens_per_expert) n += c > 0 ? 1 : 0;
  return n;
}

/// Times forward (or infer, the inference entry with the fused combine) of the policy's shared
/// layer after `configure(layer)` set its router options; `configure` returns the part of the
/// label that describes the setting.
template <class Policy, class Configure>
void bm_moe(benchmark::State& state, index_t tokens, int threads, double target_f, Configure configure,
            bool infer = false) {
  try {
    auto& l = layer<Policy>();
    const std::string setting = configure(l);  // may calibrate (cached, outside the timing)
    const auto ctx = context_for(threads);
    dmoe::workspace_buffer ws(l.workspace_size(ctx, tokens));
    const matrix& x = input(tokens);
    matrix y(tokens, d_model);
    dmoe::routing_stats stats(l.num_experts());
    auto run = [&](dmoe::routing_stats* st) { return infer ? l.infer(ctx, x, y, ws, st) : l.forward(ctx, x, y, ws, st); };
    if (auto s = run(&stats); !s.ok()) return skip(state, s);  // warm-up + stats
    const double secs = timed(state, [&] {
      auto s = run(nullptr);
      if (!s.ok()) skip(state, s);
      return s.ok();
    });
    set_rate(state, tokens);
    set_flops(state, stats.expert_flops, secs, threads);
    state.counters["f"] = stats.active_fraction();
    state.counters["target_f"] = target_f;
    state.counters["mean_k"] = stats.mean_k();
    state.counters["exec_frac"] = stats.executed_fraction();
    state.counters["experts_used"] = double(experts_used(stats));
    state.SetLabel(setting + " f=" + fmt("%.3f", stats.active_fraction()) + " threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

/// The per-expert loop peer of the policy's shared layer (built once: the weights never change).
template <class Policy>
expert_loop_peer<activation>& loop_peer() {
  static std::unique_ptr<expert_loop_peer<activation>> p;
  if (!p) p = std::make_unique<expert_loop_peer<activation>>(layer<Policy>(), max_tokens);
  return *p;
}

/// Times the per-expert OpenBLAS loop on the routing plan dmoe's forward makes under the same
/// setting; checks once that both give the same y.
template <class Policy, class Configure>
void bm_loop(benchmark::State& state, index_t tokens, int threads, double target_f, Configure configure) {
  if (!have_openblas) return state.SkipWithError(no_openblas_message);
  try {
    auto& l = layer<Policy>();
    const std::string setting = configure(l);
    const auto ctx = context_for(threads);
    dmoe::workspace_buffer ws(l.workspace_size(ctx, tokens));
    const matrix& x = input(tokens);
    matrix y_dmoe(tokens, d_model), y(tokens, d_model);
    dmoe::routing_stats stats(l.num_experts());
    if (auto s = l.forward(ctx, x, y_dmoe, ws, &stats); !s.ok()) return skip(state, s);
    const plan_copy plan = plan_copy::of(l.plan(ws, tokens));
    auto& peer = loop_peer<Policy>();
    openblas_threads(threads);
    peer.forward(x.data(), d_model, plan, y.data(), d_model);
    const double rel = relative_difference(y, y_dmoe);
    if (!(rel <= 1e-4))
      return fail_check(state, "per-expert loop and dmoe forward disagree (" + setting +
                                   "): max |diff| / max |y| = " + fmt("%g", rel));
    state.counters["check_rel_diff"] = rel;
    const double secs = timed(state, [&] {
      peer.forward(x.data(), d_model, plan, y.data(), d_model);
      return true;
    });
    set_rate(state, tokens);
    set_flops(state, stats.expert_flops, secs, threads);
    state.counters["f"] = stats.active_fraction();
    state.counters["target_f"] = target_f;
    state.counters["mean_k"] = stats.mean_k();
    state.counters["experts_used"] = double(experts_used(stats));
    state.SetLabel("loop(openblas) " + setting + " threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

std::string top_k_setting(layer_t<dmoe::top_k>& l, index_t k,
                          dmoe::weight_storage storage = dmoe::weight_storage::f32,
                          dmoe::infer_precision precision = dmoe::infer_precision::exact) {
  l.router().set_options({k, true});
  l.set_weight_storage(storage);  // repacked by the warm-up run, outside the timing
  l.set_infer_precision(precision);
  return "top_k k=" + std::to_string(k) +
         (storage == dmoe::weight_storage::f32 ? "" : std::string(" ") + dmoe::to_string(storage) + " weights") +
         (precision == dmoe::infer_precision::exact ? "" : " on bf16 tiles");
}

std::string dynamic_k_setting(layer_t<dmoe::dynamic_k>& l, index_t tokens, double target) {
  const calibrated c = calibrate_dynamic_k(tokens, target);
  l.router().set_options({c.value, c.k_max});
  return "dynamic_k " + (c.k_max > 0 ? "k_max=" + std::to_string(c.k_max) : "tau=" + fmt("%.4f", c.value));
}

void bm_top_k(benchmark::State& state, index_t tokens, int threads, index_t k, bool infer = false,
              dmoe::weight_storage storage = dmoe::weight_storage::f32,
              dmoe::infer_precision precision = dmoe::infer_precision::exact) {
  bm_moe<dmoe::top_k>(
      state, tokens, threads, double(k) / double(num_experts),
      [k, storage, precision](layer_t<dmoe::top_k>& l) { return top_k_setting(l, k, storage, precision); }, infer);
}

void bm_dynamic_k(benchmark::State& state, index_t tokens, int threads, int percent, bool infer = false) {
  const double target = percent / 100.0;
  bm_moe<dmoe::dynamic_k>(
      state, tokens, threads, target,
      [tokens, target](layer_t<dmoe::dynamic_k>& l) { return dynamic_k_setting(l, tokens, target); }, infer);
}

void bm_top_any(benchmark::State& state, index_t tokens, int threads, int percent) {
  const double target = percent / 100.0;
  bm_moe<dmoe::top_any>(state, tokens, threads, target, [tokens, target](layer_t<dmoe::top_any>& l) {
    const calibrated c = calibrate_top_any(tokens, target);
    set_top_any_threshold(l, c.value);
    return "top_any g=" + fmt("%.4f", c.value);
  });
}

/// With --benchmark_repetitions, a "min" aggregate besides mean/median/stddev: on a shared, noisy
/// machine the fastest repetition is the least disturbed one (scripts/bench_table.py --stat min).
double min_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); }

/// Registers in (tokens, threads) groups, dense first, so that every MoE run is measured close in
/// time to the dense runs it is compared with.
void register_all() {
  for (index_t tokens : token_counts)
    for (int threads : thread_counts) {
      const std::string suffix = "/tokens:" + std::to_string(tokens) + "/threads:" + std::to_string(threads);
      auto reg = [](const std::string& name, auto fn) {
        benchmark::RegisterBenchmark(name.c_str(), fn)->UseRealTime()->ComputeStatistics("min", min_of);
      };
      reg("dense" + suffix, [=](benchmark::State& s) { bm_dense(s, tokens, threads); });
      if (threads == 1) reg("dense_eigen" + suffix, [=](benchmark::State& s) { bm_dense_eigen(s, tokens); });
      reg("dense_openblas" + suffix, [=](benchmark::State& s) { bm_dense_openblas(s, tokens, threads); });
      // Each MoE run is followed by its per-expert loop twin (same setting, same plan).
      for (index_t k : top_k_values) {
        const std::string arg = suffix + "/k:" + std::to_string(k);
        const double f = double(k) / double(num_experts);
        reg("moe_top_k" + arg, [=](benchmark::State& s) { bm_top_k(s, tokens, threads, k); });
        reg("infer_top_k" + arg, [=](benchmark::State& s) { bm_top_k(s, tokens, threads, k, true); });
        reg("infer_top_k_bf16" + arg,
            [=](benchmark::State& s) { bm_top_k(s, tokens, threads, k, true, dmoe::weight_storage::bf16); });
        // infer_precision::bf16 (activations rounded too, on AMX tiles): only where it runs.
        if (dmoe::cpu_has_bf16_tiles())
          reg("infer_top_k_bf16_tiles" + arg, [=](benchmark::State& s) {
            bm_top_k(s, tokens, threads, k, true, dmoe::weight_storage::f32, dmoe::infer_precision::bf16);
          });
        reg("loop_top_k" + arg, [=](benchmark::State& s) {
          bm_loop<dmoe::top_k>(s, tokens, threads, f, [k](layer_t<dmoe::top_k>& l) { return top_k_setting(l, k); });
        });
      }
      for (int p : target_percents) {
        const std::string arg = suffix + "/f_pct:" + std::to_string(p);
        reg("moe_dynamic_k" + arg, [=](benchmark::State& s) { bm_dynamic_k(s, tokens, threads, p); });
        reg("infer_dynamic_k" + arg, [=](benchmark::State& s) { bm_dynamic_k(s, tokens, threads, p, true); });
        reg("loop_dynamic_k" + arg, [=](benchmark::State& s) {
          bm_loop<dmoe::dynamic_k>(s, tokens, threads, p / 100.0, [tokens, p](layer_t<dmoe::dynamic_k>& l) {
            return dynamic_k_setting(l, tokens, p / 100.0);
          });
        });
      }
      for (int p : target_percents)
        reg("moe_top_any" + suffix + "/f_pct:" + std::to_string(p),
            [=](benchmark::State& s) { bm_top_any(s, tokens, threads, p); });
    }
}

#if defined(NDEBUG)
constexpr bool ndebug = true;
#else
constexpr bool ndebug = false;
#endif
#if defined(__OPTIMIZE__)
constexpr bool optimised = true;
#else
constexpr bool optimised = false;
#endif

std::string build_type() {
#if defined(DMOE_BUILD_TYPE)
  std::string s = DMOE_BUILD_TYPE;  // the build system may pass CMAKE_BUILD_TYPE
  s += ", ";
#else
  std::string s;
#endif
  s += ndebug ? "NDEBUG" : "assertions on (no NDEBUG)";
  s += optimised ? ", optimised" : ", NOT optimised";
  return s;
}

/// Vector ISA the compiler targeted (Eigen's own string does not mention AVX2 or FMA).
std::string isa_string() {
  std::string s;
#if defined(__AVX512F__)
  s += "AVX512F ";
#endif
#if defined(__AVX2__)
  s += "AVX2 ";
#endif
#if defined(__FMA__)
  s += "FMA ";
#endif
#if defined(__AVX__)
  s += "AVX ";
#endif
#if defined(__SSE4_2__)
  s += "SSE4.2 ";
#endif
#if defined(__ARM_NEON)
  s += "NEON ";
#endif
  if (s.empty()) s = "baseline ";
  s.pop_back();
  return s;
}

void print_help() {
  std::printf(
      "bench_forward: dmoe CPU forward benchmarks, shape S (d_model 768, 24 experts x 128, relu, fp32)\n"
      "  --force   run even from a build without NDEBUG (timings then mean little)\n"
      "  --dmoe_smoke  quick limits probe (for a smoke run: its figures are not the machine's limits)\n"
      "  Tables:   bench_forward --benchmark_out=f.json --benchmark_out_format=json &&\n"
      "            python3 scripts/bench_table.py f.json\n\n");
  benchmark::PrintDefaultHelp();
}

}  // namespace

int main(int argc, char** argv) {
  dmoe_bench::openblas_choose_core(argv);
  bool force = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--force") == 0)
      force = true;
    else
      args.push_back(argv[i]);
  }
  strip_smoke_flag(args);
  if (!(ndebug && optimised) && !force) {
    std::fprintf(stderr,
                 "bench_forward: refusing to time a non-optimised build (%s). Build with -O3 -DNDEBUG "
                 "(CMake: -DCMAKE_BUILD_TYPE=Release), or pass --force to run anyway.\n",
                 build_type().c_str());
    return 2;
  }
  benchmark::AddCustomContext("dmoe_version", version_string());
  benchmark::AddCustomContext("dmoe_build_type", build_type() + (force && !(ndebug && optimised) ? " (forced)" : ""));
  benchmark::AddCustomContext("dmoe_shape", "S: d_model 768, 24 experts x 128 (dense hidden 3072), relu, fp32");
  benchmark::AddCustomContext("dmoe_threads",
                              "threads:1 = calling thread only (no executor); threads:N = dmoe::thread_pool(N)");
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("compiler_isa", isa_string());
#if defined(__VERSION__)
  benchmark::AddCustomContext("compiler", __VERSION__);
#endif
  benchmark::AddCustomContext("openblas", openblas_info());
  register_all();
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data(), print_help);
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  add_limits_context(probe());  // after Initialize: --help does not wait for the probe
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (check_failed()) {
    std::fprintf(stderr, "bench_forward: a peer and dmoe computed different outputs (see above)\n");
    return 1;
  }
  return 0;
}
