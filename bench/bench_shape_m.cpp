// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// Shape M, a large fine-grained MoE FFN: d_model 2048, 128 experts x 768, SwiGLU, softmax top-8,
/// fp32 (2.4 GB of expert weights), tokens {1, 8, 256}, threads {1, 2}. Read against peers in the
/// same run:
///   moe_top_k        dmoe::moe_layer<float, cpu, top_k, swiglu>, k = 8 (f = 8/128 = 0.0625)
///   loop_top_k       the PyTorch-style per-expert loop on OpenBLAS (bench_peers.hpp) on dmoe's
///                    routing plan, checked once against dmoe's output (relative 1e-4)
///   dense_eq         dmoe::dense_ffn<float, swiglu>(2048, 8 x 768 = 6144): the dense FFN with the
///                    same FLOPs per token as the MoE's 8 active experts. The dense FFN of the
///                    whole hidden width (128 x 768) would hold 6.4 GB of fp32 weights; the
///                    equal-FLOPs one answers "what does the same arithmetic cost as one GEMM".
///   dense_eq_eigen   the same with plain Eigen (1 thread)
///   dense_eq_openblas the same with OpenBLAS cblas_sgemm
/// So here speedup = t_dense_eq / t_moe is the MoE's overhead (1.0 = as fast as a dense GEMM of
/// the same FLOPs); at 8 and 256 tokens the experts a batch touches (about 60 and all 128 of the
/// 18.9 MB experts) do not fit any cache, so those runs also stream weights from DRAM.
/// Counters as in bench_forward (flops, GFLOP/s, pct_peak, f, experts_used).
///
///   bench_shape_m --benchmark_out=m.json --benchmark_out_format=json
///   python3 scripts/bench_table.py m.json
/// --dmoe_smoke (CTest) builds 16 experts instead of 128 and runs a quick limits probe.

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "bench_limits.hpp"
#include "bench_peers.hpp"

namespace {

using namespace dmoe_bench;

constexpr index_t m_d_model = 2048, m_width = 768, m_k = 8;
constexpr index_t m_max_tokens = 256;
constexpr index_t token_counts[] = {1, 8, 256};
constexpr int thread_counts[] = {1, 2};
using m_act = dmoe::swiglu;
using m_layer_t = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, m_act>;
using m_dense_t = dmoe::dense_ffn<float, m_act>;

index_t m_experts() { return smoke_mode() ? 16 : 128; }

m_layer_t& m_layer() {
  static std::unique_ptr<m_layer_t> l;
  if (!l) {
    dmoe::moe_config c;
    c.d_model = m_d_model;
    c.num_experts = m_experts();
    c.expert_width = m_width;
    l = std::make_unique<m_layer_t>(c, dmoe::top_k_options{m_k, true});
    l->randomize(weight_seed);
  }
  return *l;
}

m_dense_t& m_dense() {
  static std::unique_ptr<m_dense_t> d;
  if (!d) {
    d = std::make_unique<m_dense_t>(m_d_model, m_k * m_width);
    d->randomize(weight_seed);
  }
  return *d;
}

const matrix& m_input(index_t tokens) {
  static std::map<index_t, matrix> cache;
  if (auto it = cache.find(tokens); it != cache.end()) return it->second;
  matrix all(m_max_tokens, m_d_model);
  dmoe::detail::rng g(input_seed);
  for (index_t t = 0; t < m_max_tokens; ++t)
    for (index_t j = 0; j < m_d_model; ++j) all(t, j) = static_cast<float>(g.normal());
  return cache.emplace(tokens, matrix(all.topRows(tokens))).first->second;
}

const matrix& dense_reference(index_t tokens) {
  static std::map<index_t, matrix> cache;
  if (auto it = cache.find(tokens); it != cache.end()) return it->second;
  const auto& net = m_dense();
  const auto ctx = context_for(1);
  dmoe::workspace_buffer ws(net.workspace_size(ctx, tokens));
  matrix y(tokens, m_d_model);
  dmoe::throw_if_error(net.forward(ctx, m_input(tokens), y, ws));
  return cache.emplace(tokens, std::move(y)).first->second;
}

void set_common(benchmark::State& state, index_t tokens) {
  state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
}

void bm_dense_eq(benchmark::State& state, index_t tokens, int threads) {
  try {
    const auto& net = m_dense();
    const auto ctx = context_for(threads);
    dmoe::workspace_buffer ws(net.workspace_size(ctx, tokens));
    const matrix& x = m_input(tokens);
    matrix y(tokens, m_d_model);
    dmoe::throw_if_error(net.forward(ctx, x, y, ws));
    const double secs = timed(state, [&] { return net.forward(ctx, x, y, ws).ok(); });
    set_common(state, tokens);
    set_flops(state, net.flops_per_token() * double(tokens), secs, threads);
    state.counters["f"] = 1.0;
    state.SetLabel("dense_ffn 2048x6144 swiglu threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_dense_eq_eigen(benchmark::State& state, index_t tokens) {
  try {
    const auto& net = m_dense();
    dense_eigen_peer<m_act> peer(net, tokens);
    const Eigen::MatrixXf x = m_input(tokens);
    Eigen::MatrixXf y(tokens, m_d_model);
    peer.forward(x, y);
    if (const double rel = relative_difference(y, dense_reference(tokens)); !(rel <= 1e-4))
      return fail_check(state, "shape M: dense_eq_eigen and dense_ffn disagree: max |diff| / max |y| = " +
                                   std::to_string(rel));
    const double secs = timed(state, [&] {
      peer.forward(x, y);
      return true;
    });
    set_common(state, tokens);
    set_flops(state, net.flops_per_token() * double(tokens), secs, 1);
    state.counters["f"] = 1.0;
    state.SetLabel("eigen threads=1");
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_dense_eq_openblas(benchmark::State& state, index_t tokens, int threads) {
  if (!have_openblas) return state.SkipWithError(no_openblas_message);
  try {
    const auto& net = m_dense();
    openblas_threads(threads);
    dense_blas_peer<m_act> peer(net, tokens);
    const matrix& x = m_input(tokens);
    matrix y(tokens, m_d_model);
    peer.forward(x.data(), m_d_model, tokens, y.data(), m_d_model);
    if (const double rel = relative_difference(y, dense_reference(tokens)); !(rel <= 1e-4))
      return fail_check(state, "shape M: dense_eq_openblas and dense_ffn disagree: max |diff| / max |y| = " +
                                   std::to_string(rel));
    const double secs = timed(state, [&] {
      peer.forward(x.data(), m_d_model, tokens, y.data(), m_d_model);
      return true;
    });
    set_common(state, tokens);
    set_flops(state, net.flops_per_token() * double(tokens), secs, threads);
    state.counters["f"] = 1.0;
    state.SetLabel("openblas threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

index_t experts_used(const dmoe::routing_stats& s) {
  index_t n = 0;
  for (index_t c : s.tokens_per_expert) n += c > 0 ? 1 : 0;
  return n;
}

void moe_counters(benchmark::State& state, const dmoe::routing_stats& stats, double secs, int threads, index_t tokens) {
  set_common(state, tokens);
  set_flops(state, stats.expert_flops, secs, threads);
  state.counters["f"] = stats.active_fraction();
  state.counters["target_f"] = double(m_k) / double(m_experts());
  state.counters["mean_k"] = stats.mean_k();
  state.counters["exec_frac"] = stats.executed_fraction();
  state.counters["experts_used"] = double(experts_used(stats));
}

/// forward, or infer (with `precision`: infer_top_k_bf16_tiles runs it on bf16 tiles).
void bm_moe(benchmark::State& state, index_t tokens, int threads, bool infer = false,
            dmoe::infer_precision precision = dmoe::infer_precision::exact) {
  try {
    auto& l = m_layer();
    l.set_infer_precision(precision);  // the first such call packs the tiles, outside the timing
    const auto ctx = context_for(threads);
    dmoe::workspace_buffer ws(l.workspace_size(ctx, tokens));
    const matrix& x = m_input(tokens);
    matrix y(tokens, m_d_model);
    dmoe::routing_stats stats(l.num_experts());
    auto run = [&](dmoe::routing_stats* st) { return infer ? l.infer(ctx, x, y, ws, st) : l.forward(ctx, x, y, ws, st); };
    dmoe::throw_if_error(run(&stats));
    const double secs = timed(state, [&] { return run(nullptr).ok(); });
    moe_counters(state, stats, secs, threads, tokens);
    state.SetLabel("top_k k=8 of " + std::to_string(l.num_experts()) + " threads=" + std::to_string(threads) +
                   (precision == dmoe::infer_precision::bf16 ? " on bf16 tiles" : ""));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_loop(benchmark::State& state, index_t tokens, int threads) {
  if (!have_openblas) return state.SkipWithError(no_openblas_message);
  try {
    const auto& l = m_layer();
    static std::unique_ptr<expert_loop_peer<m_act>> peer;
    if (!peer) peer = std::make_unique<expert_loop_peer<m_act>>(l, m_max_tokens);
    const auto ctx = context_for(threads);
    dmoe::workspace_buffer ws(l.workspace_size(ctx, tokens));
    const matrix& x = m_input(tokens);
    matrix y_dmoe(tokens, m_d_model), y(tokens, m_d_model);
    dmoe::routing_stats stats(l.num_experts());
    dmoe::throw_if_error(l.forward(ctx, x, y_dmoe, ws, &stats));
    const plan_copy plan = plan_copy::of(l.plan(ws, tokens));
    openblas_threads(threads);
    peer->forward(x.data(), m_d_model, plan, y.data(), m_d_model);
    const double rel = relative_difference(y, y_dmoe);
    if (!(rel <= 1e-4))
      return fail_check(state, "shape M: per-expert loop and dmoe forward disagree: max |diff| / max |y| = " +
                                   std::to_string(rel));
    state.counters["check_rel_diff"] = rel;
    const double secs = timed(state, [&] {
      peer->forward(x.data(), m_d_model, plan, y.data(), m_d_model);
      return true;
    });
    moe_counters(state, stats, secs, threads, tokens);
    state.SetLabel("loop(openblas) top_k k=8 threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void register_all() {
  auto min_of = [](const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); };
  for (index_t tokens : token_counts)
    for (int threads : thread_counts) {
      const std::string suffix = "/tokens:" + std::to_string(tokens) + "/threads:" + std::to_string(threads);
      auto reg = [&](const std::string& name, auto fn) {
        benchmark::RegisterBenchmark(name.c_str(), fn)->UseRealTime()->ComputeStatistics("min", min_of);
      };
      reg("dense_eq" + suffix, [=](benchmark::State& s) { bm_dense_eq(s, tokens, threads); });
      if (threads == 1) reg("dense_eq_eigen" + suffix, [=](benchmark::State& s) { bm_dense_eq_eigen(s, tokens); });
      reg("dense_eq_openblas" + suffix, [=](benchmark::State& s) { bm_dense_eq_openblas(s, tokens, threads); });
      reg("moe_top_k" + suffix + "/k:8", [=](benchmark::State& s) { bm_moe(s, tokens, threads); });
      reg("infer_top_k" + suffix + "/k:8", [=](benchmark::State& s) { bm_moe(s, tokens, threads, true); });
      if (dmoe::cpu_has_bf16_tiles())
        reg("infer_top_k_bf16_tiles" + suffix + "/k:8", [=](benchmark::State& s) {
          bm_moe(s, tokens, threads, true, dmoe::infer_precision::bf16);
        });
      reg("loop_top_k" + suffix + "/k:8", [=](benchmark::State& s) { bm_loop(s, tokens, threads); });
    }
}

void print_help() {
  std::printf(
      "bench_shape_m: shape M (d_model 2048, 128 experts x 768, swiglu, top-8, fp32) against its peers\n"
      "  --dmoe_smoke  16 experts and a quick limits probe (a smoke run: figures mean nothing)\n"
      "  --force       run from a non-optimised build\n\n");
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
#if !defined(NDEBUG) || !defined(__OPTIMIZE__)
  if (!force) {
    std::fprintf(stderr, "bench_shape_m: refusing to time a non-optimised build; use Release or pass --force\n");
    return 2;
  }
#endif
  (void)force;
  benchmark::AddCustomContext("dmoe_version", version_string());
  benchmark::AddCustomContext("dmoe_shape", std::string("M: d_model 2048, ") + std::to_string(m_experts()) +
                                                " experts x 768, swiglu, top-8, fp32; dense_eq = hidden 8x768");
  benchmark::AddCustomContext("openblas", openblas_info());
  register_all();
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data(), print_help);
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  add_limits_context(probe());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (check_failed()) {
    std::fprintf(stderr, "bench_shape_m: a peer and dmoe computed different outputs (see above)\n");
    return 1;
  }
  return 0;
}
