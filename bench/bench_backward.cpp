// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// CPU backward benchmarks of shape S (docs/performance.md), read as ratios within one run:
///   moe_forward / moe_backward   the same layer and setting (policy, active fraction, threads):
///                                backward is timed after one forward (it reads the forward's
///                                workspace and leaves it intact), forward alone for the ratio
///   dense_layer_forward/backward the dense FFN as a dmoe layer with one expert of width 3072 and
///                                top-1 routing (same kernels and executor; its router is 768
///                                multiply-adds per token)
///   dense_eigen_backward         plain Eigen dense MLP backward (dW1, db1, dW2, db2, dx), threads 1
///   moe_top_k{,_bf16}_{forward,backward}/.../k:6   with W1, W2 read as bf16 (set_weight_storage)
///   moe_top_k{,_bf16}_step/.../k:6  what a training step costs the layer: weights marked
///                                modified (as an optimizer step does), so the kernels' panels are
///                                repacked, then forward and backward; against forward + backward,
///                                the repack
/// Counters: f, mean_k; flops = executed expert product FLOPs of the timed pass (forward: slots x
/// flops_per_slot; backward: twice that, its four products dpost, dW2, dW1, dx each being the size of
/// one forward product); GFLOP/s and pct_peak against the FMA peak the binary measured
/// (bench_limits.hpp, also in the JSON context).
/// Settings: tokens {8, 512}, threads {1, 2}; top-k k in {2, 6, 12, 24}; dynamic-k and top-any
/// calibrated to f in {0.1, 0.25, 0.5, 1.0} as in bench_forward (top-any backward runs in training
/// mode with the calibrated threshold, so its measured f is reported separately).
///
///   bench_backward --benchmark_out=backward.json --benchmark_out_format=json
///   python3 scripts/bench_table.py --backward backward.json

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
#include "bench_peers.hpp"

namespace {

using namespace dmoe_bench;
using benchmark::Counter;

constexpr index_t token_counts[] = {8, 512};
constexpr int thread_counts[] = {1, 2};
constexpr index_t top_k_values[] = {2, 6, 12, 24};
constexpr int target_percents[] = {10, 25, 50, 100};

using dense_layer_t = dmoe::moe_layer<scalar, dmoe::cpu, dmoe::top_k, activation>;

dense_layer_t& dense_layer() {
  static std::unique_ptr<dense_layer_t> l;
  if (!l) {
    dmoe::moe_config c = shape_s();
    c.num_experts = 1;
    c.expert_width = dense_hidden;
    l = std::make_unique<dense_layer_t>(c, dmoe::top_k_options{1, true});
    l->randomize(weight_seed);
  }
  return *l;
}

const matrix& upstream(index_t tokens) {
  static std::map<index_t, matrix> cache;
  if (auto it = cache.find(tokens); it != cache.end()) return it->second;
  matrix g(tokens, d_model);
  dmoe::detail::rng r(7);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < d_model; ++j) g(t, j) = static_cast<scalar>(r.normal());
  return cache.emplace(tokens, g).first->second;
}

/// What one timed iteration runs: forward; backward of the forward done before timing; or a
/// training step's layer part after a weight update (weights marked modified, so the kernels'
/// panels are repacked, then forward and backward).
enum class pass_kind { forward, backward, step };

/// Times `pass` of `l` after `configure(l)`.
template <class Layer, class Configure>
void bm_layer(benchmark::State& state, Layer& l, index_t tokens, int threads, pass_kind pass, Configure configure) {
  try {
    const std::string setting = configure(l);
    const auto ctx = context_for(threads);
    dmoe::workspace_buffer ws(l.workspace_size(ctx, tokens));
    const matrix& x = input(tokens);
    const matrix& dy = upstream(tokens);
    matrix y(tokens, d_model), dx(tokens, d_model);
    auto grads = l.make_gradients();
    dmoe::routing_stats stats(l.num_experts());
    dmoe::throw_if_error(l.forward(ctx, x, y, ws, &stats));
    dmoe::throw_if_error(l.backward(ctx, x, dy, dx, grads, ws));
    const double secs = timed(state, [&] {
      dmoe::status s;
      if (pass == pass_kind::step) {
        l.experts().mark_modified();  // as an optimizer step does
        s = l.forward(ctx, x, y, ws);
        if (s.ok()) s = l.backward(ctx, x, dy, dx, grads, ws);
      } else {
        s = pass == pass_kind::backward ? l.backward(ctx, x, dy, dx, grads, ws) : l.forward(ctx, x, y, ws);
      }
      if (!s.ok()) state.SkipWithError(s.message());
      return s.ok();
    });
    state.counters["tokens/s"] = Counter(double(tokens), Counter::kIsIterationInvariantRate);
    const double passes = pass == pass_kind::forward ? 1.0 : pass == pass_kind::backward ? 2.0 : 3.0;
    set_flops(state, passes * stats.expert_flops, secs, threads);
    state.counters["f"] = stats.active_fraction();
    state.counters["mean_k"] = stats.mean_k();
    state.SetLabel(setting + " threads=" + std::to_string(threads));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_dense_eigen_backward(benchmark::State& state, index_t tokens) {
  const auto& net = dense();
  const Eigen::MatrixXf w1 = net.w1(), w2 = net.w2();
  const Eigen::RowVectorXf b1 = net.b1().transpose();
  const Eigen::MatrixXf x = input(tokens), dy = upstream(tokens);
  Eigen::MatrixXf pre = (x * w1).rowwise() + b1, h = pre.cwiseMax(0.0f);
  Eigen::MatrixXf dw1(w1.rows(), w1.cols()), dw2(w2.rows(), w2.cols()), dh(tokens, dense_hidden), dx(tokens, d_model);
  Eigen::RowVectorXf db1(dense_hidden), db2(d_model);
  for (auto _ : state) {
    db2 = dy.colwise().sum();
    dw2.noalias() = h.transpose() * dy;
    dh.noalias() = dy * w2.transpose();
    dh = dh.cwiseProduct((pre.array() > 0.0f).cast<float>().matrix());
    db1 = dh.colwise().sum();
    dw1.noalias() = x.transpose() * dh;
    dx.noalias() = dh * w1.transpose();
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] = Counter(double(tokens), Counter::kIsIterationInvariantRate);
  state.SetLabel("eigen threads=1");
}

void register_all() {
  for (index_t tokens : token_counts)
    for (int threads : thread_counts) {
      const std::string suffix = "/tokens:" + std::to_string(tokens) + "/threads:" + std::to_string(threads);
      auto reg = [](const std::string& name, auto fn) { benchmark::RegisterBenchmark(name.c_str(), fn)->UseRealTime(); };
      for (pass_kind bwd : {pass_kind::forward, pass_kind::backward, pass_kind::step}) {
        const std::string pass =
            bwd == pass_kind::forward ? "forward" : bwd == pass_kind::backward ? "backward" : "step";
        if (bwd == pass_kind::step) {  // top-k k = 6 only, fp32 and bf16: what a training step pays
          for (auto st : {dmoe::weight_storage::f32, dmoe::weight_storage::bf16})
            reg(std::string(st == dmoe::weight_storage::f32 ? "moe_top_k_" : "moe_top_k_bf16_") + pass + suffix + "/k:6",
                [=](benchmark::State& s) {
                  bm_layer(s, layer<dmoe::top_k>(), tokens, threads, bwd, [st](layer_t<dmoe::top_k>& l) {
                    l.router().set_options({6, true});
                    l.set_weight_storage(st);
                    return std::string("top_k k=6 ") + dmoe::to_string(st) + " weights, repacked every step";
                  });
                });
          continue;
        }
        reg("dense_layer_" + pass + suffix, [=](benchmark::State& s) {
          bm_layer(s, dense_layer(), tokens, threads, bwd, [](dense_layer_t&) { return std::string("dense 1x3072"); });
        });
        for (index_t k : top_k_values)
          reg("moe_top_k_" + pass + suffix + "/k:" + std::to_string(k), [=](benchmark::State& s) {
            bm_layer(s, layer<dmoe::top_k>(), tokens, threads, bwd, [k](layer_t<dmoe::top_k>& l) {
              l.router().set_options({k, true});
              l.set_weight_storage(dmoe::weight_storage::f32);
              return "top_k k=" + std::to_string(k);
            });
          });
        // The same layer with W1, W2 read as bf16 (set_weight_storage; float accumulation and
        // gradients), k = 6 only.
        reg("moe_top_k_bf16_" + pass + suffix + "/k:6", [=](benchmark::State& s) {
          bm_layer(s, layer<dmoe::top_k>(), tokens, threads, bwd, [](layer_t<dmoe::top_k>& l) {
            l.router().set_options({6, true});
            l.set_weight_storage(dmoe::weight_storage::bf16);  // packed by bm_layer's first forward
            return std::string("top_k k=6 bf16 weights");
          });
        });
        for (int p : target_percents)
          reg("moe_dynamic_k_" + pass + suffix + "/f_pct:" + std::to_string(p), [=](benchmark::State& s) {
            bm_layer(s, layer<dmoe::dynamic_k>(), tokens, threads, bwd, [=](layer_t<dmoe::dynamic_k>& l) {
              const calibrated c = calibrate_dynamic_k(tokens, p / 100.0);
              l.router().set_options({c.value, c.k_max});
              return "dynamic_k tau=" + std::to_string(c.value);
            });
          });
        for (int p : target_percents)
          reg("moe_top_any_" + pass + suffix + "/f_pct:" + std::to_string(p), [=](benchmark::State& s) {
            bm_layer(s, layer<dmoe::top_any>(), tokens, threads, bwd, [=](layer_t<dmoe::top_any>& l) {
              const calibrated c = calibrate_top_any(tokens, p / 100.0);
              set_top_any_threshold(l, c.value);
              l.router().set_training(true);
              return "top_any(training) g=" + std::to_string(c.value);
            });
          });
      }
      if (threads == 1)
        reg("dense_eigen_backward" + suffix, [=](benchmark::State& s) { bm_dense_eigen_backward(s, tokens); });
    }
}

}  // namespace

int main(int argc, char** argv) {
#if !defined(NDEBUG) || !defined(__OPTIMIZE__)
  bool force = false;
  for (int i = 1; i < argc; ++i) force |= std::strcmp(argv[i], "--force") == 0;
  if (!force) {
    std::fprintf(stderr, "bench_backward: refusing to time a non-optimised build; use Release or pass --force\n");
    return 2;
  }
#endif
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i)
    if (i == 0 || std::strcmp(argv[i], "--force") != 0) args.push_back(argv[i]);
  strip_smoke_flag(args);
  benchmark::AddCustomContext("dmoe_version", version_string());
  benchmark::AddCustomContext("dmoe_shape", "S: d_model 768, 24 experts x 128 (dense hidden 3072), relu, fp32");
  register_all();
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  add_limits_context(probe());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
