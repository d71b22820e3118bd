// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The CUDA backend against the CPU backend: every policy and storage type, the activations, the
// CPU edge cases, bad inputs, CUDA graph capture, determinism and batch invariance. Each device
// test prints "DMOE_SKIP: no CUDA device" and returns when there is none (CTest reports it as
// skipped). The conversion test at the end needs no device and always runs. Test names carry no
// commas: CTest's doctest discovery would lose their suite label.
//
// Tolerances (normwise per token, ||y_cuda - y_cpu||_inf <= tol * (1 + ||y_cpu||_inf)): the CPU
// reference runs in fp32 on the SAME rounded inputs and weights, so the differences are the
// backend's own roundings only: fp32 storage uses TF32 tensor cores (10-bit mantissa inputs):
// 1e-2; fp16 rounds the hidden activations and expert outputs to 11 bits: 1e-2; bf16 to 8 bits:
// 4e-2. Router math is fp32 in both backends; a token whose plan differs (a score within float
// rounding of a tie or threshold) is counted and excluded, and at most 2% of tokens (>= 1) may.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include <dmoe/cuda.cuh>

#include "test_random.hpp"

#include "cuda_test_support.cuh"

namespace {

struct comparison {
  index_t plan_mismatch = 0;
  index_t tokens = 0;
  double worst = 0;  ///< worst normwise error / (1 + ||ref||)
};

/// CUDA vs CPU on the twin's batch.
template <class T, class P, class A>
comparison compare(const twin<T, P, A>& tw, dmoe::routing_stats* cuda_stats = nullptr) {
  const index_t tokens = tw.s.tokens, d = tw.s.d;
  typename twin<T, P, A>::cuda_layer gpu(tw.cpu);
  const host_result r = run_cuda(gpu, tw.x, tokens, nullptr, cuda_stats);
  // CPU reference
  dmoe::row_matrix<float> x(tokens, d), y(tokens, d);
  for (index_t i = 0; i < tokens * d; ++i) x.data()[i] = tw.x[static_cast<std::size_t>(i)];
  dmoe::workspace_buffer ws(tw.cpu.workspace_size(dmoe::workspace_bounds{tokens, 1}));
  REQUIRE(tw.cpu.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  const auto plan = tw.cpu.plan(ws, tokens);
  comparison c;
  c.tokens = tokens;
  for (index_t t = 0; t < tokens; ++t) {
    const auto ci = static_cast<std::size_t>(t);
    bool same = plan.k(t) == r.offsets[ci + 1] - r.offsets[ci];
    for (index_t i = 0; same && i < plan.k(t); ++i) {
      const auto gs = static_cast<std::size_t>(r.offsets[ci] + i);
      const index_t cs = plan.token_offsets[t] + i;
      same = plan.expert[cs] == r.expert[gs] && std::fabs(plan.weight[cs] - r.weight[gs]) <= 1e-4f;
    }
    if (!same) {
      ++c.plan_mismatch;
      continue;
    }
    double err = 0, ref = 0;
    for (index_t j = 0; j < d; ++j) {
      const double a = r.y[static_cast<std::size_t>(t * d + j)], b = y(t, j);
      err = std::fmax(err, std::fabs(a - b));
      ref = std::fmax(ref, std::fabs(b));
      if (!std::isfinite(a)) err = INFINITY;
    }
    c.worst = std::fmax(c.worst, err / (1.0 + ref));
  }
  return c;
}

template <class T>
void check_comparison(const comparison& c, const std::string& what) {
  INFO(what);
  CHECK(c.plan_mismatch <= (c.tokens / 50 > 1 ? c.tokens / 50 : 1));
  CHECK(c.worst <= tolerance<T>());
}

shape random_shape(splitmix& g, bool big) {
  shape s;
  // K and N tails of every size; half the time multiples of 8 (the 16-byte vector-load path)
  s.d = g.coin() ? 8 * g.integer(1, 20) : (g.integer(1, 3) == 1 ? g.integer(1, 24) : g.integer(24, 160));
  s.E = g.integer(1, 12);
  s.n = g.coin() ? 8 * g.integer(1, 18) : (g.integer(1, 3) == 1 ? g.integer(1, 20) : g.integer(20, 150));
  s.tokens = big ? g.integer(600, 1500) : g.integer(1, 80);           // big: the CUB sort path
  s.h = g.integer(1, 48);
  s.hidden_bias = g.coin();
  s.expert_bias = g.coin();
  s.output_bias = g.coin();
  return s;
}

template <class T, class P, class A>
void sweep(std::uint64_t seed0, int cases) {
  for (int i = 0; i < cases; ++i) {
    const std::uint64_t seed = seed0 * 1000 + std::uint64_t(i);
    splitmix g(seed, 31, 7);
    const shape s = random_shape(g, i % 3 == 2);
    const auto opt = random_options<P>(g, s.E);
    twin<T, P, A> tw(s, opt, seed);
    const comparison c = compare(tw);
    check_comparison<T>(c, std::string(type_name<T>()) + " " + A::name + " seed " + std::to_string(seed) + " d=" +
                               std::to_string(s.d) + " E=" + std::to_string(s.E) + " n=" + std::to_string(s.n) +
                               " tokens=" + std::to_string(s.tokens));
  }
}

template <class P>
void policy_sweep(std::uint64_t seed) {
  sweep<float, P, dmoe::relu>(seed + 1, 4);
  sweep<__half, P, dmoe::relu>(seed + 2, 4);
  sweep<__nv_bfloat16, P, dmoe::relu>(seed + 3, 4);
  sweep<float, P, dmoe::swiglu>(seed + 4, 3);
  sweep<__half, P, dmoe::swiglu>(seed + 5, 3);
  sweep<__nv_bfloat16, P, dmoe::swiglu>(seed + 6, 3);
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("top_k matches the CPU backend in fp32 (TF32) and fp16 and bf16 with relu and swiglu") {
    if (skip_without_device()) return;
    policy_sweep<dmoe::top_k>(100);
  }
  TEST_CASE("dynamic_k matches the CPU backend in fp32 (TF32) and fp16 and bf16 with relu and swiglu") {
    if (skip_without_device()) return;
    policy_sweep<dmoe::dynamic_k>(200);
  }
  TEST_CASE("top_any matches the CPU backend in fp32 (TF32) and fp16 and bf16 with relu and swiglu") {
    if (skip_without_device()) return;
    policy_sweep<dmoe::top_any>(300);
  }

  TEST_CASE("every activation in bf16 with top_k") {
    if (skip_without_device()) return;
    sweep<__nv_bfloat16, dmoe::top_k, dmoe::gelu_erf>(400, 3);
    sweep<__nv_bfloat16, dmoe::top_k, dmoe::gelu_tanh>(401, 3);
    sweep<__nv_bfloat16, dmoe::top_k, dmoe::silu>(402, 3);
    sweep<__nv_bfloat16, dmoe::top_k, dmoe::geglu>(403, 3);
  }

  TEST_CASE("edge cases: zero tokens / one token / k = E / idle expert / nothing selected") {
    if (skip_without_device()) return;
    shape s;
    s.d = 40;
    s.E = 6;
    s.n = 24;
    // zero tokens: ok with null pointers and no workspace; statistics zeroed
    {
      twin<__nv_bfloat16, dmoe::top_k, dmoe::relu> tw(s, {2, true}, 1);
      dmoe::moe_layer<__nv_bfloat16, dmoe::cuda, dmoe::top_k, dmoe::relu> gpu(tw.cpu);
      dmoe::routing_stats st(s.E);
      st.tokens = 5;
      const dmoe::status z = gpu.forward({}, dmoe::matrix_view<const __nv_bfloat16>(nullptr, 0, s.d),
                                         dmoe::matrix_view<__nv_bfloat16>(nullptr, 0, s.d), {}, &st);
      CHECK_MESSAGE(z.ok(), z.message());
      CHECK(st.tokens == 0);
      CHECK(st.slots == 0);
    }
    // one token, every policy
    s.tokens = 1;
    check_comparison<float>(compare(twin<float, dmoe::top_k, dmoe::gelu_erf>(s, {3, false}, 2)), "one token top_k");
    check_comparison<float>(compare(twin<float, dmoe::dynamic_k, dmoe::relu>(s, {0.3, 0}, 3)), "one token dynamic_k");
    check_comparison<float>(compare(twin<float, dmoe::top_any, dmoe::swiglu>(s, {false}, 4)), "one token top_any");
    // k = E
    s.tokens = 50;
    check_comparison<__half>(compare(twin<__half, dmoe::top_k, dmoe::relu>(s, {s.E, true}, 5)), "k = E");
    // dynamic_k tau = 0: every expert runs
    check_comparison<__half>(compare(twin<__half, dmoe::dynamic_k, dmoe::relu>(s, {0.0, 0}, 6)), "tau = 0");
    // idle expert: a top_k bias of -100 keeps expert 2 from every token
    {
      twin<__nv_bfloat16, dmoe::top_k, dmoe::swiglu> tw(s, {2, true}, 7);
      tw.cpu.router().bias()(2) = -100.f;
      dmoe::routing_stats st(s.E);
      const comparison c = compare(tw, &st);
      check_comparison<__nv_bfloat16>(c, "idle expert");
      CHECK(st.tokens_per_expert[2] == 0);
      CHECK(st.slots == 2 * s.tokens);
      CHECK(st.k_histogram[2] == s.tokens);
    }
    // top_any in training with thresholds no cosine reaches: nothing runs, y = b2
    {
      twin<float, dmoe::top_any, dmoe::relu> tw(s, {true}, 8);
      for (index_t e = 0; e < s.E; ++e) tw.cpu.router().threshold()(e) = 2.f;
      dmoe::moe_layer<float, dmoe::cuda, dmoe::top_any, dmoe::relu> gpu(tw.cpu);
      dmoe::routing_stats st(s.E);
      const host_result r = run_cuda(gpu, tw.x, s.tokens, nullptr, &st);
      CHECK(st.slots == 0);
      CHECK(st.k_histogram[0] == s.tokens);
      CHECK(r.offsets.back() == 0);
      const auto& b2 = tw.cpu.experts().output_bias_storage();
      for (index_t t = 0; t < s.tokens; ++t)
        for (index_t j = 0; j < s.d; ++j) CHECK(r.y[std::size_t(t * s.d + j)] == b2[std::size_t(j)]);
      // and in inference every token falls back to its best active expert
      tw.cpu.router().set_training(false);
      check_comparison<float>(compare(tw), "top_any inference fallback");
      // a masked-off slot never runs
      tw.cpu.router().active()[1] = 0;
      check_comparison<float>(compare(tw), "top_any masked slot");
    }
  }

  TEST_CASE("statistics match the CPU backend") {
    if (skip_without_device()) return;
    splitmix g(9, 1, 2);
    for (int i = 0; i < 4; ++i) {
      shape s = random_shape(g, i == 3);
      twin<float, dmoe::dynamic_k, dmoe::relu> tw(s, {0.4, 0}, 900 + std::uint64_t(i));
      dmoe::routing_stats gs(s.E), cs(s.E);
      const comparison c = compare(tw, &gs);
      if (c.plan_mismatch != 0) continue;  // a near-tie changed a count; the plan test covers it
      dmoe::row_matrix<float> x(s.tokens, s.d), y(s.tokens, s.d);
      for (index_t j = 0; j < x.size(); ++j) x.data()[j] = tw.x[std::size_t(j)];
      dmoe::workspace_buffer ws(tw.cpu.workspace_size(dmoe::workspace_bounds{s.tokens, 1}));
      REQUIRE(tw.cpu.forward({}, x, y, ws, &cs).ok());
      CHECK(gs.k_histogram == cs.k_histogram);
      CHECK(gs.tokens_per_expert == cs.tokens_per_expert);
      CHECK(gs.slots == cs.slots);
      CHECK(gs.tokens == cs.tokens);
      CHECK(gs.expert_flops == doctest::Approx(cs.expert_flops));
      CHECK(gs.router_flops == doctest::Approx(cs.router_flops));
    }
  }

  TEST_CASE("bad inputs are reported and name the argument") {
    if (skip_without_device()) return;
    shape s;
    s.tokens = 8;
    twin<float, dmoe::top_k, dmoe::relu> tw(s, {2, true}, 11);
    dmoe::moe_layer<float, dmoe::cuda, dmoe::top_k, dmoe::relu> gpu(tw.cpu);
    dmoe::device_array<float> x(std::size_t(s.tokens * s.d)), y(std::size_t(s.tokens * s.d));
    x.upload(tw.x);
    dmoe::device_array<unsigned char> ws(gpu.workspace_size(dmoe::workspace_bounds{s.tokens, 1}));
    const dmoe::workspace w{ws.data(), ws.size()};
    const dmoe::context<dmoe::cuda> ctx{};
    using cv = dmoe::matrix_view<const float>;
    using mv = dmoe::matrix_view<float>;
    const auto code = [](const dmoe::status& st) { return st.code(); };
    CHECK(code(gpu.forward(ctx, cv(x.data(), s.tokens, s.d - 1), mv(y.data(), s.tokens, s.d), w)) ==
          dmoe::errc::invalid_argument);
    CHECK(code(gpu.forward(ctx, cv(x.data(), s.tokens, s.d), mv(y.data(), s.tokens - 1, s.d), w)) ==
          dmoe::errc::invalid_argument);
    CHECK(code(gpu.forward(ctx, cv(nullptr, s.tokens, s.d), mv(y.data(), s.tokens, s.d), w)) ==
          dmoe::errc::invalid_argument);
    CHECK(code(gpu.forward(ctx, cv(x.data(), s.tokens, s.d), mv(x.data(), s.tokens, s.d), w)) ==
          dmoe::errc::invalid_argument);
    CHECK(code(gpu.forward(ctx, cv(x.data(), s.tokens, s.d, s.d - 1), mv(y.data(), s.tokens, s.d), w)) ==
          dmoe::errc::invalid_argument);
    CHECK(code(gpu.forward(ctx, cv(x.data(), s.tokens, s.d), mv(y.data(), s.tokens, s.d), {ws.data(), 64})) ==
          dmoe::errc::workspace_too_small);
    dmoe::routing_stats wrong(s.E + 1);
    CHECK(code(gpu.forward(ctx, cv(x.data(), s.tokens, s.d), mv(y.data(), s.tokens, s.d), w, &wrong)) ==
          dmoe::errc::invalid_argument);
    // NaN in token 5: forward enqueues fine; check_numerics names the token
    std::vector<float> xn = tw.x;
    xn[std::size_t(5 * s.d + 3)] = NAN;
    x.upload(xn);
    REQUIRE(gpu.forward(ctx, cv(x.data(), s.tokens, s.d), mv(y.data(), s.tokens, s.d), w).ok());
    const dmoe::status num = gpu.check_numerics(ctx, w, s.tokens);
    CHECK(num.code() == dmoe::errc::numerical_error);
    CHECK(std::string(num.message()).find("token 5") != std::string::npos);
    // the statistics path synchronises and reports it directly
    dmoe::routing_stats st(s.E);
    CHECK(code(gpu.forward(ctx, cv(x.data(), s.tokens, s.d), mv(y.data(), s.tokens, s.d), w, &st)) ==
          dmoe::errc::numerical_error);
    // bad configuration and options throw at construction
    CHECK_THROWS_AS((dmoe::moe_layer<float, dmoe::cuda, dmoe::top_k, dmoe::relu>({0, 4, 8}, {1, true})), dmoe::error);
    CHECK_THROWS_AS((dmoe::moe_layer<float, dmoe::cuda, dmoe::top_k, dmoe::relu>({8, 4, 8}, {5, true})), dmoe::error);
    CHECK_THROWS_AS((dmoe::moe_layer<float, dmoe::cuda, dmoe::dynamic_k, dmoe::relu>({8, 4, 8}, {1.5, 0})),
                    dmoe::error);
    // top_any with every slot masked off
    twin<float, dmoe::top_any, dmoe::relu> ta(s, {false}, 12);
    for (auto& a : ta.cpu.router().active()) a = 0;
    dmoe::moe_layer<float, dmoe::cuda, dmoe::top_any, dmoe::relu> gpu_ta(ta.cpu);
    dmoe::device_array<unsigned char> ws2(gpu_ta.workspace_size(dmoe::workspace_bounds{s.tokens, 1}));
    CHECK(code(gpu_ta.forward(ctx, cv(x.data(), s.tokens, s.d), mv(y.data(), s.tokens, s.d), {ws2.data(), ws2.size()})) ==
          dmoe::errc::invalid_argument);
  }

  TEST_CASE("determinism: repeated runs / graph replay / batch invariance are bitwise equal") {
    if (skip_without_device()) return;
    shape s;
    s.d = 96;
    s.E = 8;
    s.n = 72;
    s.tokens = 900;  // 900 * 8 slots: the CUB radix-sort dispatch
    twin<__nv_bfloat16, dmoe::top_any, dmoe::swiglu> tw(s, {false}, 21);
    dmoe::moe_layer<__nv_bfloat16, dmoe::cuda, dmoe::top_any, dmoe::swiglu> gpu(tw.cpu);
    const host_result a = run_cuda(gpu, tw.x, s.tokens);
    const host_result b = run_cuda(gpu, tw.x, s.tokens);
    CHECK(a.y == b.y);
    CHECK(a.expert == b.expert);
    // Batch invariance: the first 16 tokens alone (the one-block decode dispatch, other tiles)
    // give the same bits: each output element is accumulated over K in the same order whatever
    // rows share its tile, and the combine visits the same slots in the same order.
    const std::vector<float> head(tw.x.begin(), tw.x.begin() + 16 * s.d);
    const host_result h = run_cuda(gpu, head, 16);
    for (std::size_t i = 0; i < h.y.size(); ++i) REQUIRE(h.y[i] == a.y[i]);

    // CUDA graph: capture one forward on a stream, replay it twice on new inputs in place.
    cudaStream_t stream;
    REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
    using T = __nv_bfloat16;
    dmoe::device_array<T> dx(tw.x.size()), dy(tw.x.size());
    dmoe::device_array<unsigned char> ws(gpu.workspace_size(dmoe::workspace_bounds{s.tokens, 1}));
    dx.upload(to_storage<T>(tw.x));
    const dmoe::context<dmoe::cuda> ctx{stream};
    // warm-up outside the capture (CUB caches device attributes on first use)
    REQUIRE(gpu.forward(ctx, dmoe::matrix_view<const T>(dx.data(), s.tokens, s.d), dmoe::matrix_view<T>(dy.data(), s.tokens, s.d),
                        {ws.data(), ws.size()})
                .ok());
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    cudaGraph_t graph;
    REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess);
    const dmoe::status cs = gpu.forward(ctx, dmoe::matrix_view<const T>(dx.data(), s.tokens, s.d),
                                        dmoe::matrix_view<T>(dy.data(), s.tokens, s.d), {ws.data(), ws.size()});
    REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
    REQUIRE_MESSAGE(cs.ok(), cs.message());
    cudaGraphExec_t exec;
    REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    REQUIRE(cudaMemsetAsync(dy.data(), 0, dy.size() * sizeof(T), stream) == cudaSuccess);
    REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    CHECK(from_storage(dy.download()) == a.y);
    // new input, same pointer: the replay follows it
    std::vector<float> x2 = tw.x;
    for (auto& v : x2) v = round_to<T>(-v);
    dx.upload(to_storage<T>(x2));
    REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    const host_result direct = run_cuda(gpu, x2, s.tokens);
    CHECK(from_storage(dy.download()) == direct.y);
    CHECK(cudaGraphExecDestroy(exec) == cudaSuccess);
    CHECK(cudaGraphDestroy(graph) == cudaSuccess);
    CHECK(cudaStreamDestroy(stream) == cudaSuccess);
  }

  TEST_CASE("shape S (768 and 24 x 128) at 512 tokens in bf16 with dynamic_k") {
    if (skip_without_device()) return;
    shape s;
    s.d = 768;
    s.E = 24;
    s.n = 128;
    s.h = 128;
    s.tokens = 512;
    check_comparison<__nv_bfloat16>(compare(twin<__nv_bfloat16, dmoe::dynamic_k, dmoe::gelu_erf>(s, {0.5, 0}, 31)),
                                    "shape S");
  }

  // --- needs no device ----------------------------------------------------------------------
  TEST_CASE("host conversions agree with CUDA's own float -> half / bfloat16 (no device needed)") {
    splitmix g(77, 5, 3);
    for (int i = 0; i < 200000; ++i) {
      const float v = i < 100000 ? float(g.normal() * std::ldexp(1.0, g.integer(-40, 40)))
                                 : dmoe::detail::cuda_backend::bits_float(std::uint32_t(g.next()));
      const __half h = __float2half_rn(v);
      const __nv_bfloat16 b = __float2bfloat16_rn(v);
      const auto hb = static_cast<__half_raw>(h).x, bb = static_cast<__nv_bfloat16_raw>(b).x;
      if (std::isnan(v)) {
        CHECK(std::isnan(dmoe::detail::cuda_backend::half_bits_to_float(dmoe::detail::cuda_backend::float_to_half_bits(v))));
        CHECK(std::isnan(dmoe::detail::cuda_backend::bf16_bits_to_float(dmoe::detail::cuda_backend::float_to_bf16_bits(v))));
        continue;
      }
      REQUIRE(dmoe::detail::cuda_backend::float_to_half_bits(v) == hb);
      REQUIRE(dmoe::detail::cuda_backend::float_to_bf16_bits(v) == bb);
      REQUIRE(dmoe::detail::cuda_backend::storage_to_float(h) == __half2float(h));
      REQUIRE(dmoe::detail::cuda_backend::storage_to_float(b) == __bfloat162float(b));
    }
  }
}
