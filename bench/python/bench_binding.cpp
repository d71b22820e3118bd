// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// The C++ side of the binding-overhead benchmark (bench/python/bench_binding.py, which builds and
/// runs this program): the forward that dmoe.MoELayer.forward calls, on the very layer and input
/// the Python side used, so that the difference of the two times is what the binding adds.
///
///   bench_binding --layer=L.safetensors --x=X.f32 --rows=R [--tokens=1,512] [--threads=1,2]
///                 [--ref_dir=DIR] [Google Benchmark flags]
///
/// --layer   a layer written by dmoe.MoELayer.save (top_k policy, relu; what the script builds)
/// --x       R x d_model float32 values, row-major, no header (numpy's tofile); a run on T tokens
///           uses its first T rows, as the Python side does
/// --ref_dir where the script wrote y_<tokens>_<threads>.f32, Python's output of the same call;
///           each is compared with this program's output before timing (the run exits 1 on a
///           difference: then the two sides do not run the same function and no overhead exists)
///
/// Benchmarks, per tokens x threads:
///   cpp_forward          forward(ctx, x, y, ws, &stats): what the binding calls (it always keeps
///                        the routing statistics, for routing_stats())
///   cpp_forward_nostats  forward(ctx, x, y, ws): the cheapest C++ call, for how much the
///                        statistics cost
/// threads:1 runs on the calling thread only (no executor); threads:N on a dmoe::thread_pool(N),
/// exactly as MoELayer(threads=N) does. Workspace and output are allocated once, outside the
/// timed loop, as the binding's own workspace is after its first call.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <dmoe/dmoe.hpp>
#include <dmoe/io/moe_io.hpp>

namespace {

using dmoe::index_t;
using layer_t = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu>;

struct options {
  std::string layer, x, ref_dir;
  index_t rows = 0;
  std::vector<index_t> tokens{1, 512};
  std::vector<int> threads{1, 2};
};

std::vector<long> parse_list(const std::string& s, const char* flag) {
  std::vector<long> v;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    const long n = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || n < 1) {
      std::fprintf(stderr, "bench_binding: %s expects a comma-separated list of positive integers, got '%s'\n", flag,
                   s.c_str());
      std::exit(2);
    }
    v.push_back(n);
  }
  return v;
}

/// Takes our own --name=value flags out of argv (the rest goes to Google Benchmark).
options parse_options(std::vector<char*>& args) {
  options o;
  std::vector<char*> rest;
  for (char* a : args) {
    auto value = [&](const char* flag) -> const char* {
      const std::size_t n = std::strlen(flag);
      return std::strncmp(a, flag, n) == 0 && a[n] == '=' ? a + n + 1 : nullptr;
    };
    if (const char* v = value("--layer")) o.layer = v;
    else if (const char* v = value("--x")) o.x = v;
    else if (const char* v = value("--ref_dir")) o.ref_dir = v;
    else if (const char* v = value("--rows")) o.rows = index_t(parse_list(v, "--rows").at(0));
    else if (const char* v = value("--tokens")) {
      o.tokens.clear();
      for (long t : parse_list(v, "--tokens")) o.tokens.push_back(index_t(t));
    } else if (const char* v = value("--threads")) {
      o.threads.clear();
      for (long t : parse_list(v, "--threads")) o.threads.push_back(int(t));
    } else
      rest.push_back(a);
  }
  args = rest;
  return o;
}

/// count float32 values from a raw file; exits with a message if its size is not exactly that.
std::vector<float> read_f32(const std::string& path, std::size_t count) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::fprintf(stderr, "bench_binding: cannot open '%s'\n", path.c_str());
    std::exit(2);
  }
  std::vector<float> v(count + 1);
  const std::size_t got = std::fread(v.data(), sizeof(float), count + 1, f);
  std::fclose(f);
  if (got != count) {
    std::fprintf(stderr, "bench_binding: '%s' holds %zu float32 values, expected %zu\n", path.c_str(), got, count);
    std::exit(2);
  }
  v.resize(count);
  return v;
}

/// Context on `threads` threads, pools kept for the whole run (as a Python layer keeps its own).
dmoe::context<dmoe::cpu> context_for(int threads) {
  static std::map<int, std::unique_ptr<dmoe::thread_pool>> pools;
  dmoe::context<dmoe::cpu> ctx;
  if (threads <= 1) return ctx;
  auto& p = pools[threads];
  if (!p) p = std::make_unique<dmoe::thread_pool>(threads);
  ctx.exec = p.get();
  return ctx;
}

struct case_state {
  dmoe::workspace_buffer ws;
  std::vector<float> y;
  dmoe::routing_stats stats;
};

void bm_forward(benchmark::State& state, const layer_t* layer, const float* x, index_t tokens, int threads,
                bool with_stats) {
  const index_t d = layer->config().d_model;
  const auto ctx = context_for(threads);
  case_state c{dmoe::workspace_buffer(layer->workspace_size(dmoe::workspace_bounds{tokens, threads})),
               std::vector<float>(std::size_t(tokens * d)), dmoe::routing_stats(layer->num_experts())};
  const dmoe::matrix_view<const float> X(x, tokens, d);
  const dmoe::matrix_view<float> Y(c.y.data(), tokens, d);
  dmoe::routing_stats* stats = with_stats ? &c.stats : nullptr;
  if (auto s = layer->forward(ctx, X, Y, c.ws, stats); !s.ok())  // warm-up
    return state.SkipWithError(s.message());
  for (auto _ : state) {
    auto s = layer->forward(ctx, X, Y, c.ws, stats);
    if (!s.ok()) return state.SkipWithError(s.message());
    benchmark::ClobberMemory();
  }
  state.counters["tokens"] = double(tokens);
  state.counters["threads"] = double(threads);
}

/// This program's output on (tokens, threads) against the Python side's, relative to max |y|.
double compare_with_python(const layer_t& layer, const float* x, index_t tokens, int threads, const std::string& path) {
  const index_t d = layer.config().d_model;
  const auto ref = read_f32(path, std::size_t(tokens * d));
  const auto ctx = context_for(threads);
  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{tokens, threads}));
  std::vector<float> y(ref.size());
  dmoe::routing_stats stats(layer.num_experts());
  dmoe::throw_if_error(layer.forward(ctx, dmoe::matrix_view<const float>(x, tokens, d),
                                     dmoe::matrix_view<float>(y.data(), tokens, d), ws, &stats));
  double scale = 0, diff = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    scale = std::fmax(scale, std::fabs(double(ref[i])));
    diff = std::fmax(diff, std::fabs(double(y[i]) - double(ref[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args(argv, argv + argc);
  const options o = parse_options(args);
  if (o.layer.empty() || o.x.empty() || o.rows < 1) {
    std::fprintf(stderr, "usage: bench_binding --layer=L.safetensors --x=X.f32 --rows=R [--tokens=1,512] "
                         "[--threads=1,2] [--ref_dir=DIR] [benchmark flags]\n");
    return 2;
  }
#ifndef NDEBUG
  std::fprintf(stderr, "bench_binding: built without NDEBUG; its times are not the Release binding's\n");
#endif
  static layer_t layer = dmoe::load_moe_layer<layer_t>(o.layer);
  const index_t d = layer.config().d_model;
  static const std::vector<float> x = read_f32(o.x, std::size_t(o.rows * d));
  for (index_t t : o.tokens) {
    if (t > o.rows) {
      std::fprintf(stderr, "bench_binding: --tokens %td exceeds --rows %td\n", t, o.rows);
      return 2;
    }
  }
  if (!o.ref_dir.empty()) {
    bool ok = true;
    for (index_t t : o.tokens)
      for (int th : o.threads) {
        const std::string p = o.ref_dir + "/y_" + std::to_string(t) + "_" + std::to_string(th) + ".f32";
        const double rel = compare_with_python(layer, x.data(), t, th, p);
        // The same kernels on the same data: anything but a rounding-level difference means the
        // two sides do not run the same layer.
        if (!(rel <= 1e-5)) {
          std::fprintf(stderr, "bench_binding: tokens %td threads %d: C++ and Python outputs differ, max |diff| / "
                               "max |y| = %g\n", t, th, rel);
          ok = false;
        }
      }
    if (!ok) return 1;
  }
  for (index_t t : o.tokens)
    for (int th : o.threads)
      for (bool with_stats : {true, false}) {
        const std::string name = std::string(with_stats ? "cpp_forward" : "cpp_forward_nostats") +
                                 "/tokens:" + std::to_string(t) + "/threads:" + std::to_string(th);
        benchmark::RegisterBenchmark(name.c_str(), bm_forward, &layer, x.data(), t, th, with_stats)->UseRealTime();
      }
  const auto v = dmoe::version();
  benchmark::AddCustomContext("dmoe_version", std::to_string(v.major) + "." + std::to_string(v.minor) + "." +
                                                  std::to_string(v.patch));
#if defined(__VERSION__)
  benchmark::AddCustomContext("compiler", __VERSION__);
#endif
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
