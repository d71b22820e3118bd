// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// CUDA forward benchmark (docs/performance.md): the MoE layer against a cuBLAS dense MLP of the
// same shape measured in the same binary and run. bf16 storage, fp32 accumulation. Times come
// from CUDA events around `reps` back-to-back forwards on one stream (manual time, per forward).
//
// Shapes: S = d 768, 24 x 128, GELU, T = 4096, dynamic-k with tau tuned on the device to the
// active fraction f (0.1, 0.25, 0.5, 1.0); M = d 2048, 128 x 768, SwiGLU, top-8, T = 16384;
// decode T = 1, 8, 16 on M (memory bound: bytes of the experts touched / copy bandwidth).
// Counters: f (active fraction), mean_k, tflops (executed expert FLOPs / time, router time
// included), dense_ms, speedup = t_dense / t_moe, eta = t_dense f / t_moe, sol = speed-of-light
// fraction max(FLOPs / dense rate, bytes touched / copy bandwidth) / t_moe; decode points also
// report graph_ms / graph_sol, the forward replayed from a CUDA graph.
// Without a device it prints a DMOE_SKIP line and exits 0.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <vector>

#include <dmoe/cuda.cuh>

namespace {

using bf16 = __nv_bfloat16;
using dmoe::index_t;

#define BENCH_CUDA(call)                                                                          \
  do {                                                                                            \
    cudaError_t e_ = (call);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)
#define BENCH_CUBLAS(call)                                                               \
  do {                                                                                   \
    cublasStatus_t s_ = (call);                                                          \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                   \
      std::fprintf(stderr, "%s:%d %s: cublas status %d\n", __FILE__, __LINE__, #call, int(s_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

struct gpu_env {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  double copy_gbps = 0;         ///< measured device-to-device copy bandwidth (read + write bytes / s)
  std::map<std::string, double> dense_ms;  ///< cached dense baselines by shape key
  gpu_env() {
    BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    BENCH_CUBLAS(cublasCreate(&blas));
    BENCH_CUBLAS(cublasSetStream(blas, stream));
    BENCH_CUDA(cudaEventCreate(&start));
    BENCH_CUDA(cudaEventCreate(&stop));
  }
};
gpu_env& env() {
  static gpu_env e;
  return e;
}

/// Milliseconds per call of f(), averaged over reps calls between two events (after a warm-up).
template <class F>
double time_ms(F&& f, int reps) {
  auto& g = env();
  f();
  BENCH_CUDA(cudaStreamSynchronize(g.stream));
  BENCH_CUDA(cudaEventRecord(g.start, g.stream));
  for (int i = 0; i < reps; ++i) f();
  BENCH_CUDA(cudaEventRecord(g.stop, g.stream));
  BENCH_CUDA(cudaEventSynchronize(g.stop));
  float ms = 0;
  BENCH_CUDA(cudaEventElapsedTime(&ms, g.start, g.stop));
  return double(ms) / reps;
}

double copy_bandwidth_gbps() {
  auto& g = env();
  if (g.copy_gbps > 0) return g.copy_gbps;
  const std::size_t bytes = std::size_t(1) << 30;
  dmoe::device_array<unsigned char> a(bytes), b(bytes);
  const double ms = time_ms([&] { BENCH_CUDA(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, g.stream)); }, 10);
  g.copy_gbps = 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
  return g.copy_gbps;
}

__global__ void bias_act_kernel(bf16* h, const bf16* bias, index_t rows, index_t cols, int act) {
  // act 0: GELU (erf) on h; act 1: SwiGLU over [gate | up] halves of width cols / 2 in place into the
  // first half.
  const index_t total = act == 0 ? rows * cols : rows * (cols / 2);
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    if (act == 0) {
      const index_t c = i % cols;
      const float v = __bfloat162float(h[i]) + __bfloat162float(bias[c]);
      h[i] = __float2bfloat16(dmoe::gelu_erf::apply(v));
    } else {
      const index_t half = cols / 2, r = i / half, c = i % half;
      const float gte = __bfloat162float(h[r * cols + c]) + __bfloat162float(bias[c]);
      const float up = __bfloat162float(h[r * cols + half + c]) + __bfloat162float(bias[half + c]);
      h[r * cols + c] = __float2bfloat16(dmoe::silu::apply(gte) * up);
    }
  }
}

/// cuBLAS dense MLP y = act(x W1 + b1) W2 + b2 (b2 folded into beta = 0 for simplicity: its cost
/// is negligible), bf16 in / fp32 accumulate (cublasGemmEx, CUBLAS_COMPUTE_32F). Returns ms.
double dense_mlp_ms(index_t T, index_t d, index_t hidden, bool gated, int reps) {
  auto& g = env();
  const std::string key = std::to_string(T) + "/" + std::to_string(d) + "/" + std::to_string(hidden) + (gated ? "g" : "");
  if (auto it = g.dense_ms.find(key); it != g.dense_ms.end()) return it->second;
  const index_t h1 = gated ? 2 * hidden : hidden;
  dmoe::device_array<bf16> x{std::size_t(T * d)}, w1{std::size_t(d * h1)}, b1{std::size_t(h1)},
      h{std::size_t(T * h1)}, w2{std::size_t(hidden * d)}, y{std::size_t(T * d)};
  dmoe::detail::cuda_backend::fill_uniform(x.data(), x.size(), 1, 1.f);
  dmoe::detail::cuda_backend::fill_uniform(w1.data(), w1.size(), 2, 0.03f);
  dmoe::detail::cuda_backend::fill_uniform(b1.data(), b1.size(), 3, 0.03f);
  dmoe::detail::cuda_backend::fill_uniform(w2.data(), w2.size(), 4, 0.03f);
  const float one = 1.f, zero = 0.f;
  const auto run = [&] {
    // Row-major (T x d) x (d x h1) = column-major h^T (h1 x T) = W1^T (h1 x d) x^T (d x T).
    BENCH_CUBLAS(cublasGemmEx(g.blas, CUBLAS_OP_N, CUBLAS_OP_N, int(h1), int(T), int(d), &one, w1.data(), CUDA_R_16BF,
                              int(h1), x.data(), CUDA_R_16BF, int(d), &zero, h.data(), CUDA_R_16BF, int(h1),
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    bias_act_kernel<<<4096, 256, 0, g.stream>>>(h.data(), b1.data(), T, h1, gated ? 1 : 0);
    BENCH_CUBLAS(cublasGemmEx(g.blas, CUBLAS_OP_N, CUBLAS_OP_N, int(d), int(T), int(hidden), &one, w2.data(),
                              CUDA_R_16BF, int(d), h.data(), CUDA_R_16BF, int(h1), &zero, y.data(), CUDA_R_16BF,
                              int(d), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  const double ms = time_ms(run, reps);
  g.dense_ms[key] = ms;
  return ms;
}

/// cuBLAS dense MLP forward + backward: the forward above, then dH = dY W2^T, dW2 = H^T dY,
/// dX = dH W1^T, dW1 = X^T dH (the activation's backward is elementwise and left out: a lower
/// bound for the dense side). bf16 in / fp32 accumulate. Returns ms.
double dense_mlp_train_ms(index_t T, index_t d, index_t hidden, bool gated, int reps) {
  auto& g = env();
  const index_t h1 = gated ? 2 * hidden : hidden;
  dmoe::device_array<bf16> x{std::size_t(T * d)}, w1{std::size_t(d * h1)}, b1{std::size_t(h1)}, h{std::size_t(T * h1)},
      dh{std::size_t(T * h1)}, w2{std::size_t(hidden * d)}, y{std::size_t(T * d)}, dy{std::size_t(T * d)},
      dx{std::size_t(T * d)}, dw1{std::size_t(d * h1)}, dw2{std::size_t(hidden * d)};
  for (auto* a : {&x, &w1, &b1, &w2, &dy}) dmoe::detail::cuda_backend::fill_uniform(a->data(), a->size(), 11, 0.03f);
  const float one = 1.f, zero = 0.f;
  const auto gemm = [&](cublasOperation_t ta, cublasOperation_t tb, index_t m, index_t n, index_t k, const bf16* a,
                        index_t lda, const bf16* b, index_t ldb, bf16* c, index_t ldc) {
    BENCH_CUBLAS(cublasGemmEx(g.blas, ta, tb, int(m), int(n), int(k), &one, a, CUDA_R_16BF, int(lda), b, CUDA_R_16BF,
                              int(ldb), &zero, c, CUDA_R_16BF, int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  const auto run = [&] {
    // column-major views: x^T (d x T), h^T (h1 x T), y^T (d x T); W1^T (h1 x d), W2^T (d x hidden)
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, h1, T, d, w1.data(), h1, x.data(), d, h.data(), h1);
    bias_act_kernel<<<4096, 256, 0, g.stream>>>(h.data(), b1.data(), T, h1, gated ? 1 : 0);
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, d, T, hidden, w2.data(), d, h.data(), h1, y.data(), d);
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, hidden, T, d, w2.data(), d, dy.data(), d, dh.data(), h1);      // dH
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, d, hidden, T, dy.data(), d, h.data(), h1, dw2.data(), d);      // dW2
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, d, T, h1, w1.data(), h1, dh.data(), h1, dx.data(), d);         // dX
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, h1, d, T, dh.data(), h1, x.data(), d, dw1.data(), h1);         // dW1
  };
  return time_ms(run, reps);
}

template <class P, class A>
struct moe_setup {
  using layer_t = dmoe::moe_layer<bf16, dmoe::cuda, P, A>;
  std::unique_ptr<layer_t> layer;
  dmoe::device_array<bf16> x, y;
  dmoe::device_array<unsigned char> ws;
  index_t T = 0;
  moe_setup(const dmoe::moe_config& cfg, const typename P::options& opt, index_t tokens)
      : layer(std::make_unique<layer_t>(cfg, opt)), x(std::size_t(tokens * cfg.d_model)),
        y(std::size_t(tokens * cfg.d_model)), T(tokens) {
    layer->randomize(42);
    dmoe::detail::cuda_backend::fill_uniform(x.data(), x.size(), 7, 1.f);
    ws = dmoe::device_array<unsigned char>(layer->workspace_size(dmoe::workspace_bounds{tokens, 1}));
  }
  /// Backward of the last forward (allocates the gradients and the scratch on first use).
  void backward() {
    if (grads.w1.empty()) {
      grads = layer->make_gradients();
      bws = dmoe::device_array<unsigned char>(layer->backward_workspace_size(dmoe::workspace_bounds{T, 1}));
      dy = dmoe::device_array<bf16>(x.size());
      dx = dmoe::device_array<bf16>(x.size());
      dmoe::detail::cuda_backend::fill_uniform(dy.data(), dy.size(), 9, 1.f);
    }
    const index_t d = layer->d_model();
    const dmoe::status s = layer->backward(dmoe::context<dmoe::cuda>{env().stream},
                                           dmoe::matrix_view<const bf16>(x.data(), T, d),
                                           dmoe::matrix_view<const bf16>(dy.data(), T, d),
                                           dmoe::matrix_view<bf16>(dx.data(), T, d), grads, {ws.data(), ws.size()},
                                           {bws.data(), bws.size()});
    if (!s.ok()) {
      std::fprintf(stderr, "backward: %s\n", s.message());
      std::exit(1);
    }
  }
  typename layer_t::gradients grads;
  dmoe::device_array<unsigned char> bws;
  dmoe::device_array<bf16> dy, dx;
  void forward(dmoe::routing_stats* st = nullptr) {
    const dmoe::status s = layer->forward(dmoe::context<dmoe::cuda>{env().stream},
                                          dmoe::matrix_view<const bf16>(x.data(), T, layer->d_model()),
                                          dmoe::matrix_view<bf16>(y.data(), T, layer->d_model()),
                                          {ws.data(), ws.size()}, st);
    if (!s.ok()) {
      std::fprintf(stderr, "forward: %s\n", s.message());
      std::exit(1);
    }
  }
};

/// Reports the counters of one MoE measurement.
void report(benchmark::State& state, double moe_ms, double dense_ms, const dmoe::routing_stats& st, double bytes_touched,
            double dense_tflops) {
  const double f = st.active_fraction();
  state.counters["f"] = f;
  state.counters["mean_k"] = st.mean_k();
  state.counters["tokens"] = double(st.tokens);
  state.counters["moe_ms"] = moe_ms;
  state.counters["dense_ms"] = dense_ms;
  state.counters["tflops"] = st.expert_flops / (moe_ms * 1e-3) / 1e12;
  state.counters["speedup"] = dense_ms / moe_ms;
  state.counters["eta"] = dense_ms * f / moe_ms;
  const double t_flops = st.expert_flops / (dense_tflops * 1e12);
  // copy bandwidth counts bytes read + written, i.e. the traffic rate; reading the touched
  // experts once at that rate is the memory floor
  const double t_bytes = bytes_touched / (copy_bandwidth_gbps() * 1e9);
  state.counters["sol"] = std::max(t_flops, t_bytes) / (moe_ms * 1e-3);
}

double expert_bytes_touched(const dmoe::routing_stats& st, index_t d, index_t n, bool gated) {
  index_t used = 0;
  for (auto c : st.tokens_per_expert) used += c > 0 ? 1 : 0;
  return double(used) * double(d) * double(n) * (gated ? 3.0 : 2.0) * sizeof(bf16);
}

// ---- shape S: dynamic-k at a target active fraction ----------------------------------------
void BM_S_dynamic_k(benchmark::State& state) {
  const double target_f = double(state.range(0)) / 100.0;
  const index_t T = 4096, d = 768, E = 24, n = 128;
  dmoe::moe_config cfg{d, E, n};
  moe_setup<dmoe::dynamic_k, dmoe::gelu_erf> m(cfg, {0.5, 0}, T);
  // tau by bisection on the measured active fraction (f is decreasing in tau)
  dmoe::routing_stats st(E);
  double lo = 0.0, hi = 1.0;
  for (int it = 0; it < 14; ++it) {
    const double tau = 0.5 * (lo + hi);
    m.layer->set_options({tau, 0});
    m.forward(&st);
    (st.active_fraction() > target_f ? lo : hi) = tau;
  }
  m.layer->set_options({target_f >= 1.0 ? 0.0 : 0.5 * (lo + hi), 0});
  m.forward(&st);
  const double dense = dense_mlp_ms(T, d, E * n, false, 20);
  const double dense_tflops = 2.0 * 2.0 * double(T) * double(d) * double(E * n) / (dense * 1e-3) / 1e12;
  double ms = 0;
  for (auto _ : state) {
    ms = time_ms([&] { m.forward(); }, 20);
    state.SetIterationTime(ms * 1e-3);
  }
  report(state, ms, dense, st, expert_bytes_touched(st, d, n, false), dense_tflops);
}
BENCHMARK(BM_S_dynamic_k)->Arg(10)->Arg(25)->Arg(50)->Arg(100)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

// ---- shape M: top-8 SwiGLU, and decode --------------------------------------------------------
void BM_M_top8(benchmark::State& state) {
  const index_t T = state.range(0), d = 2048, E = 128, n = 768;
  dmoe::moe_config cfg{d, E, n};
  moe_setup<dmoe::top_k, dmoe::swiglu> m(cfg, {8, true}, T);
  dmoe::routing_stats st(E);
  m.forward(&st);
  const index_t dense_T = T >= 1024 ? T : 1024;  // a tiny dense T measures launch cost, not rate
  const double dense_big = dense_mlp_ms(dense_T, d, E * n, true, T >= 1024 ? 5 : 10);
  const double dense_tflops = 2.0 * 3.0 * double(dense_T) * double(d) * double(E * n) / (dense_big * 1e-3) / 1e12;
  const double dense = T >= 1024 ? dense_big : dense_mlp_ms(T, d, E * n, true, 20);
  double ms = 0;
  for (auto _ : state) {
    ms = time_ms([&] { m.forward(); }, T >= 1024 ? 5 : 50);
    state.SetIterationTime(ms * 1e-3);
  }
  report(state, ms, dense, st, expert_bytes_touched(st, d, n, true), dense_tflops);
  if (T < 1024) {
    // Decode: the same forward captured once into a CUDA graph and replayed (no launch gaps).
    auto& g = env();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    BENCH_CUDA(cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeGlobal));
    m.forward();
    BENCH_CUDA(cudaStreamEndCapture(g.stream, &graph));
    BENCH_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    const double graph_ms = time_ms([&] { BENCH_CUDA(cudaGraphLaunch(exec, g.stream)); }, 50);
    state.counters["graph_ms"] = graph_ms;
    state.counters["graph_sol"] = expert_bytes_touched(st, d, n, true) / (copy_bandwidth_gbps() * 1e9) / (graph_ms * 1e-3);
    BENCH_CUDA(cudaGraphExecDestroy(exec));
    BENCH_CUDA(cudaGraphDestroy(graph));
  }
  state.counters["dense_tflops"] = dense_tflops;
  state.counters["copy_gbps"] = copy_bandwidth_gbps();
}
BENCHMARK(BM_M_top8)->Arg(1)->Arg(8)->Arg(16)->Arg(16384)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

// ---- training step: forward + backward of shape M (top-8 SwiGLU) against the dense MLP's -----
// The backward is the first, SIMT version (docs/cuda.md): expect it far below the dense cuBLAS
// rate; the figure is recorded to measure the tensor-core version against.
void BM_M_top8_train(benchmark::State& state) {
  const index_t T = state.range(0), d = 2048, E = 128, n = 768;
  dmoe::moe_config cfg{d, E, n};
  moe_setup<dmoe::top_k, dmoe::swiglu> m(cfg, {8, true}, T);
  dmoe::routing_stats st(E);
  m.forward(&st);
  m.backward();
  const double dense = dense_mlp_train_ms(T, d, E * n, true, 3);
  double ms = 0;
  for (auto _ : state) {
    ms = time_ms([&] { m.forward(); m.backward(); }, 2);
    state.SetIterationTime(ms * 1e-3);
  }
  state.counters["f"] = st.active_fraction();
  state.counters["moe_ms"] = ms;
  state.counters["dense_ms"] = dense;
  state.counters["speedup"] = dense / ms;
  state.counters["eta"] = dense * st.active_fraction() / ms;
  // forward 1x + backward 2x the expert FLOPs (dX and dW products)
  state.counters["tflops"] = 3.0 * st.expert_flops / (ms * 1e-3) / 1e12;
}
BENCHMARK(BM_M_top8_train)->Arg(2048)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(1);

}  // namespace

int main(int argc, char** argv) {
  if (dmoe::cuda_device_count() == 0) {
    std::printf("DMOE_SKIP: no CUDA device; bench_cuda_forward measured nothing\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
