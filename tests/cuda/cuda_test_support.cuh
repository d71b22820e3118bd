// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Helpers of the CUDA tests (one copy per translation unit: everything is in an unnamed
// namespace): the device-presence skip, rounding to a storage type, a CPU layer with its
// CUDA twin, and a forward on the device with its plan copied back.
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include <dmoe/cuda.cuh>

#include "test_random.hpp"

namespace {

using dmoe::index_t;
using dmoe_testing::splitmix;

bool skip_without_device() {
  if (dmoe::cuda_device_count() > 0) return false;
  std::printf("DMOE_SKIP: no CUDA device\n");
  std::fflush(stdout);
  return true;
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, __half>) return "half";
  else return "bf16";
}
template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return 4e-2;
  else return 1e-2;
}

/// Rounds a float to what storage type T holds (the identity for float).
template <class T>
float round_to(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T t;
    dmoe::detail::cuda_backend::convert_to_storage(&v, 1, &t);
    return dmoe::detail::cuda_backend::storage_to_float(t);
  }
}
template <class T>
void round_all(std::vector<float>& v) {
  for (auto& x : v) x = round_to<T>(x);
}

struct shape {
  int d = 16, E = 4, n = 16, tokens = 10, h = 16;
  bool hidden_bias = true, expert_bias = false, output_bias = true;
};

template <class P>
typename P::options random_options(splitmix& g, int E) {
  if constexpr (std::is_same_v<P, dmoe::top_k>) {
    return dmoe::top_k_options{g.integer(1, E), g.coin(0.6)};
  } else if constexpr (std::is_same_v<P, dmoe::dynamic_k>) {
    return dmoe::dynamic_k_options{g.uniform(0.0, 1.0), g.coin(0.3) ? g.integer(1, E) : 0};
  } else {
    return dmoe::top_any_options{g.coin(0.3)};
  }
}

/// A CPU layer with random weights rounded to T, its CUDA twin, and an input batch.
template <class T, class P, class A>
struct twin {
  using cpu_layer = dmoe::moe_layer<float, dmoe::cpu, P, A>;
  using cuda_layer = dmoe::moe_layer<T, dmoe::cuda, P, A>;
  shape s;
  cpu_layer cpu;
  std::vector<float> x;  // (tokens, d), rounded to T

  static dmoe::moe_config config(const shape& s) {
    dmoe::moe_config c{s.d, s.E, s.n};
    c.hidden_bias = s.hidden_bias;
    c.expert_bias = s.expert_bias;
    c.output_bias = s.output_bias;
    c.router_hidden = s.h;
    return c;
  }

  twin(const shape& s_, const typename P::options& opt, std::uint64_t seed)
      : s(s_), cpu(config(s_), opt), x(static_cast<std::size_t>(s_.tokens) * std::size_t(s_.d)) {
    splitmix g(seed, 0x9E3779B97F4A7C15ull, 77);
    cpu.randomize(seed);
    auto& ex = cpu.experts();
    for (auto* v : {&ex.w1_storage(), &ex.b1_storage(), &ex.w2_storage(), &ex.expert_bias_storage(),
                    &ex.output_bias_storage()}) {
      for (auto& w : *v) w = float(g.uniform(-0.5, 0.5)) * (v == &ex.w2_storage() ? 0.5f : 0.2f);
      round_all<T>(*v);
    }
    if constexpr (std::is_same_v<P, dmoe::top_k>) {
      for (index_t e = 0; e < s.E; ++e) cpu.router().bias()(e) = float(g.uniform(-0.5, 0.5));
    }
    if constexpr (std::is_same_v<P, dmoe::top_any>) {
      for (index_t e = 0; e < s.E; ++e) cpu.router().threshold()(e) = float(g.uniform(-0.1, 0.15));
    }
    for (auto& v : x) v = round_to<T>(float(g.uniform(-1.0, 1.0)));
  }
};

/// Results of one forward, copied to the host.
struct host_result {
  std::vector<float> y;
  std::vector<index_t> offsets;
  std::vector<std::int32_t> expert;
  std::vector<float> weight;
};

template <class T>
std::vector<T> to_storage(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  dmoe::detail::cuda_backend::convert_to_storage(v.data(), v.size(), out.data());
  return out;
}
template <class T>
std::vector<float> from_storage(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = dmoe::detail::cuda_backend::storage_to_float(v[i]);
  return out;
}

/// Runs the CUDA layer on x and copies y and the plan back.
template <class L>
host_result run_cuda(const L& layer, const std::vector<float>& x, index_t tokens, cudaStream_t stream = nullptr,
                     dmoe::routing_stats* stats = nullptr) {
  using T = typename L::scalar_type;
  const index_t d = layer.d_model();
  dmoe::device_array<T> dx(x.size()), dy(x.size());
  dx.upload(to_storage<T>(x));
  dmoe::device_array<unsigned char> ws(layer.workspace_size(dmoe::workspace_bounds{tokens, 1}));
  const dmoe::context<dmoe::cuda> ctx{stream};
  const dmoe::status s = layer.forward(ctx, dmoe::matrix_view<const T>(dx.data(), tokens, d),
                                       dmoe::matrix_view<T>(dy.data(), tokens, d), {ws.data(), ws.size()}, stats);
  REQUIRE_MESSAGE(s.ok(), s.message());
  const dmoe::status num = layer.check_numerics(ctx, {ws.data(), ws.size()}, tokens);
  REQUIRE_MESSAGE(num.ok(), num.message());
  host_result r;
  r.y = from_storage(dy.download());
  if (tokens > 0) {
    const dmoe::routing_plan<float> p = layer.plan({ws.data(), ws.size()}, tokens);
    r.offsets.resize(static_cast<std::size_t>(tokens + 1));
    REQUIRE(cudaMemcpy(r.offsets.data(), p.token_offsets, r.offsets.size() * sizeof(index_t),
                       cudaMemcpyDeviceToHost) == cudaSuccess);
    const auto nnz = static_cast<std::size_t>(r.offsets.back());
    r.expert.resize(nnz);
    r.weight.resize(nnz);
    if (nnz > 0) {
      REQUIRE(cudaMemcpy(r.expert.data(), p.expert, nnz * sizeof(std::int32_t), cudaMemcpyDeviceToHost) == cudaSuccess);
      REQUIRE(cudaMemcpy(r.weight.data(), p.weight, nnz * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
    }
  }
  return r;
}

}  // namespace
