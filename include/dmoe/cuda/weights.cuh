// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// A CUDA layer's parameters in device memory (the CPU side keeps them in expert_weights and the
/// router): allocation with checked sizes, upload from host experts and a router (weights rounded
/// to the storage type, router in fp32), seeded device-side initialisation, and the device query
/// a layer starts with. All cold paths: they allocate and synchronise.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../core/checked.hpp"
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "../layer/spec.hpp"
#include "../routing/routers.hpp"
#include "common.cuh"
#include "experts.cuh"
#include "route.cuh"

DMOE_NAMESPACE_BEGIN namespace detail::cuda_backend {

/// Streaming multiprocessors of the current device; throws dmoe::error without a device or on a
/// device older than sm_80.
inline int current_device_sm_count() {
  int dev = 0, major = 0;
  throw_on_cuda(cudaGetDevice(&dev), "moe_layer<cuda>: cudaGetDevice (is there a CUDA device?)");
  throw_on_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
                "moe_layer<cuda>: cudaDeviceGetAttribute");
  if (major < 8)
    detail::raisef(errc::unsupported,
                   "moe_layer<cuda>: device %d has compute capability %d.x; the CUDA backend needs sm_80 or newer",
                   dev, major);
  int sms = 0;
  throw_on_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                "moe_layer<cuda>: cudaDeviceGetAttribute");
  return sms;
}

/// Device copies of a layer's experts (storage T) and router (fp32) under policy Policy.
template <class T, class Policy, class Activation>
struct device_weights {
  using router_type = typename Policy::template router<float>;

  device_array<T> w1, b1, w2, b2e, b2;
  device_array<float> router_w, router_b, router_w2, expert_norm;
  device_array<std::uint8_t> active;
  index_t num_active = 0;
  index_t router_hidden = 0;
  int device = 0;  ///< the device the arrays live on (current at allocate)

  /// Zero weights of configuration c (cudaMalloc does not clear); top-any: all slots active, unit
  /// norm floor. Sizes in checked arithmetic (layer_spec::checked_config bounded E d f n already;
  /// these name the tensor if a product still does not fit).
  void allocate(const moe_config& c) {
    const auto sz = [](const char* what, index_t a, index_t b, index_t f = 1) {
      return static_cast<std::size_t>(detail::checked_product_or_throw(what, a, b, f));
    };
    const index_t d = c.d_model, E = c.num_experts, n = c.expert_width, fn = width_factor<Activation> * n;
    router_hidden = std::is_same_v<Policy, dynamic_k> ? c.router_hidden : 0;
    throw_on_cuda(cudaGetDevice(&device), "moe_layer<cuda>: cudaGetDevice");
    w1 = device_array<T>(sz("moe_layer<cuda>: w1", E, d, fn));
    b1 = device_array<T>(c.hidden_bias ? sz("moe_layer<cuda>: b1", E, fn) : 0);
    w2 = device_array<T>(sz("moe_layer<cuda>: w2", E, n, d));
    b2e = device_array<T>(c.expert_bias ? sz("moe_layer<cuda>: expert_bias", E, d) : 0);
    b2 = device_array<T>(c.output_bias ? static_cast<std::size_t>(d) : 0);
    if constexpr (std::is_same_v<Policy, top_k>) {
      router_w = device_array<float>(sz("moe_layer<cuda>: router weight", d, E));
      router_b = device_array<float>(static_cast<std::size_t>(E));
    } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
      router_w = device_array<float>(sz("moe_layer<cuda>: router w_in", d, c.router_hidden));
      router_w2 = device_array<float>(sz("moe_layer<cuda>: router w_out", c.router_hidden, E));
    } else {
      router_w = device_array<float>(sz("moe_layer<cuda>: router weight", d, E));
      router_b = device_array<float>(static_cast<std::size_t>(E));  // thresholds g
      expert_norm = device_array<float>(static_cast<std::size_t>(E));
      active = device_array<std::uint8_t>(static_cast<std::size_t>(E));
      num_active = E;
    }
    for (auto* a : {&w1, &b1, &w2, &b2e, &b2}) zero_bytes(a->data(), a->size() * sizeof(T), "moe_layer<cuda>: cudaMemsetAsync");
    for (auto* a : {&router_w, &router_b, &router_w2})
      zero_bytes(a->data(), a->size() * sizeof(float), "moe_layer<cuda>: cudaMemsetAsync");
    if constexpr (std::is_same_v<Policy, top_any>) {
      expert_norm.upload(std::vector<float>(static_cast<std::size_t>(E), top_any_router<float>::norm_eps));
      active.upload(std::vector<std::uint8_t>(static_cast<std::size_t>(E), std::uint8_t{1}));
    }
    // zero_bytes, upload and fill_uniform wait for their private streams: a forward on any stream
    // issued afterwards sees the values.
  }

  /// Uploads host experts (rounded to T) and router (fp32); the shapes were checked by the caller.
  void upload(const expert_weights<float>& ex, const router_type& r) {
    upload_converted(w1, ex.w1_storage());
    upload_converted(b1, ex.b1_storage());
    upload_converted(w2, ex.w2_storage());
    upload_converted(b2e, ex.expert_bias_storage());
    upload_converted(b2, ex.output_bias_storage());
    if constexpr (std::is_same_v<Policy, top_k>) {
      router_w.upload(r.weight().data(), static_cast<std::size_t>(r.weight().size()));
      router_b.upload(r.bias().data(), static_cast<std::size_t>(r.bias().size()));
    } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
      router_w.upload(r.w_in().data(), static_cast<std::size_t>(r.w_in().size()));
      router_w2.upload(r.w_out().data(), static_cast<std::size_t>(r.w_out().size()));
    } else {
      router_w.upload(r.weight().data(), static_cast<std::size_t>(r.weight().size()));
      router_b.upload(r.threshold().data(), static_cast<std::size_t>(r.threshold().size()));
      std::vector<float> norms(static_cast<std::size_t>(r.num_experts()));
      for (index_t e = 0; e < r.num_experts(); ++e)
        norms[static_cast<std::size_t>(e)] = (std::max)(r.weight().col(e).norm(), top_any_router<float>::norm_eps);
      expert_norm.upload(norms);
      active.upload(r.active());
      num_active = r.num_active();
    }
  }

  /// Seeded uniform(+-1/sqrt(fan_in)) weights generated on the device (top_any: thresholds 0, all
  /// slots active). Synchronises the device.
  void randomize(const moe_config& c, std::uint64_t seed) {
    const float a1 = 1.f / std::sqrt(float(c.d_model)), a2 = 1.f / std::sqrt(float(c.expert_width));
    fill_uniform(w1.data(), w1.size(), seed ^ 0x1ull, a1);
    fill_uniform(b1.data(), b1.size(), seed ^ 0x2ull, a1);
    fill_uniform(w2.data(), w2.size(), seed ^ 0x3ull, a2);
    fill_uniform(b2e.data(), b2e.size(), seed ^ 0x4ull, a2);
    fill_uniform(b2.data(), b2.size(), seed ^ 0x5ull, a2);
    fill_uniform(router_w.data(), router_w.size(), seed ^ 0x6ull, a1);
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      fill_uniform(router_w2.data(), router_w2.size(), seed ^ 0x7ull, 1.f / std::sqrt(float(c.router_hidden)));
    if constexpr (std::is_same_v<Policy, top_k>)
      zero_bytes(router_b.data(), router_b.size() * sizeof(float), "moe_layer<cuda>::randomize: cudaMemsetAsync");
    if constexpr (std::is_same_v<Policy, top_any>) {
      zero_bytes(router_b.data(), router_b.size() * sizeof(float), "moe_layer<cuda>::randomize: cudaMemsetAsync");
      const std::vector<float> w = router_w.download();  // (d, E) column-major: small
      std::vector<float> norms(static_cast<std::size_t>(c.num_experts));
      for (index_t e = 0; e < c.num_experts; ++e) {
        double sq = 0;
        for (index_t i = 0; i < c.d_model; ++i) {
          const double v = w[static_cast<std::size_t>(e * c.d_model + i)];
          sq += v * v;
        }
        norms[static_cast<std::size_t>(e)] = (std::max)(float(std::sqrt(sq)), top_any_router<float>::norm_eps);
      }
      expert_norm.upload(norms);
      active.upload(std::vector<std::uint8_t>(norms.size(), std::uint8_t{1}));
      num_active = c.num_experts;
    }
  }

  expert_params<T> experts() const noexcept {
    return {w1.data(), b1.empty() ? nullptr : b1.data(), w2.data(), b2e.empty() ? nullptr : b2e.data()};
  }
  const T* output_bias() const noexcept { return b2.empty() ? nullptr : b2.data(); }
  router_params router() const noexcept {
    router_params r;
    r.w = router_w.data();
    r.b = router_b.empty() ? nullptr : router_b.data();
    r.w2 = router_w2.empty() ? nullptr : router_w2.data();
    r.expert_norm = expert_norm.empty() ? nullptr : expert_norm.data();
    r.active = active.empty() ? nullptr : active.data();
    r.hidden = router_hidden;
    return r;
  }

 private:
  static void upload_converted(device_array<T>& dst, const std::vector<float>& src) {
    if (src.empty()) return;
    if constexpr (std::is_same_v<T, float>) {
      dst.upload(src);
    } else {
      std::vector<T> tmp(src.size());
      convert_to_storage(src.data(), src.size(), tmp.data());
      dst.upload(tmp);
    }
  }
};

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cuda_backend
