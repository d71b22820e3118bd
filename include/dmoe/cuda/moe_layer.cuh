// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// The dmoe::cuda specialisation of moe_layer: weights in device memory, work on the caller's
/// stream, storage float / __half / __nv_bfloat16 with fp32 accumulation and fp32 router math.
///
/// forward(x) enqueues, with no allocation and no host synchronisation:
///  1. route: router products (fp32), the per-token rule of routing/selection.hpp (one warp per
///     token), selections written at stride max_k with radix keys (expert id | sentinel E);
///     a CUB exclusive scan of the counts and a compaction give the CPU backend's plan layout;
///  2. dispatch: stable expert-major order over all tokens * max_k strided slots (CUB radix sort,
///     or a one-block counting sort for decode sizes), expert offsets, M-tile offsets;
///  3. experts: two grouped GEMMs on tensor cores (experts.cuh), persistent grid sized on the host
///     from worst-case bounds, tile list read on the device;
///  4. combine: per token, y = b2 + sum over its slots in slot order of w_s out[slot].
/// Every buffer size comes from the token count and the layer shape (layout.hpp), so the sequence
/// can be captured in a CUDA graph and replayed.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/backend.hpp"
#include "../core/extents.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../cpu/moe_layer.hpp"
#include "../experts/activation.hpp"
#include "../layer/moe_layer.hpp"
#include "../routing/plan.hpp"
#include "../routing/routers.hpp"
#include "../routing/stats.hpp"
#include "common.cuh"
#include "dispatch.cuh"
#include "experts.cuh"
#include "route.cuh"

namespace dmoe {

/// MoE layer on a CUDA device. See layer/moe_layer.hpp for the template parameters; T is the
/// storage type of x, y and the expert weights (float, __half or __nv_bfloat16).
///
/// Weights live on the device that was current at construction (sm_80 or newer). forward is
/// const and may run concurrently on different streams with distinct workspaces.
template <class T, class Policy, class Activation, std::size_t Experts, std::size_t Width>
class moe_layer<T, cuda, Policy, Activation, Experts, Width>
    : detail::layer_checks<T, Policy, Activation, Experts, Width> {
  static_assert(is_cuda_storage_v<T>,
                "dmoe::moe_layer<T, dmoe::cuda, ...>: T must be float, __half or __nv_bfloat16 (storage type; "
                "accumulation is fp32)");

 public:
  using scalar_type = T;
  using backend_type = cuda;
  using policy_type = Policy;
  using activation_type = Activation;
  using options_type = typename Policy::options;
  /// The CPU layer whose weights copy_from uploads.
  using cpu_layer_type = moe_layer<float, cpu, Policy, Activation, Experts, Width>;

  /// Zero weights on the current device. Throws dmoe::error on a bad configuration (naming the
  /// field), without a device, on a device older than sm_80, or when allocation fails.
  moe_layer(const moe_config& cfg, const options_type& opt) : cfg_(cfg) {
    // The CPU layer type validates config and options with the CPU backend's messages; a router
    // of the policy (small) holds the validated options.
    validate(cfg, opt);
    opt_ = opt;
    init_device();
    allocate();
  }
  /// Copies the weights of a CPU layer of the same policy, activation and shape.
  explicit moe_layer(const cpu_layer_type& src) : moe_layer(src.config(), src.router().options()) { copy_from(src); }

  /// Uploads weights and router options from a CPU layer (cold path: converts on the host and
  /// copies synchronously). Weights are rounded to T; router parameters stay fp32.
  void copy_from(const cpu_layer_type& src) {
    const moe_config& c = src.config();
    if (c.d_model != cfg_.d_model || c.num_experts != cfg_.num_experts || c.expert_width != cfg_.expert_width ||
        c.hidden_bias != cfg_.hidden_bias || c.expert_bias != cfg_.expert_bias || c.output_bias != cfg_.output_bias ||
        (std::is_same_v<Policy, dynamic_k> && c.router_hidden != cfg_.router_hidden))
      detail::raisef(errc::invalid_argument,
                     "moe_layer<cuda>::copy_from: source config (d_model %td, experts %td, width %td) differs from "
                     "this layer's (%td, %td, %td) or in its bias flags / router_hidden",
                     c.d_model, c.num_experts, c.expert_width, cfg_.d_model, cfg_.num_experts, cfg_.expert_width);
    const auto& ex = src.experts();
    upload_converted(w1_, ex.w1_storage());
    upload_converted(b1_, ex.b1_storage());
    upload_converted(w2_, ex.w2_storage());
    upload_converted(b2e_, ex.expert_bias_storage());
    upload_converted(b2_, ex.output_bias_storage());
    const auto& r = src.router();
    opt_ = r.options();
    if constexpr (std::is_same_v<Policy, top_k>) {
      router_w_.upload(r.weight().data(), static_cast<std::size_t>(r.weight().size()));
      router_b_.upload(r.bias().data(), static_cast<std::size_t>(r.bias().size()));
    } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
      router_w_.upload(r.w_in().data(), static_cast<std::size_t>(r.w_in().size()));
      router_w2_.upload(r.w_out().data(), static_cast<std::size_t>(r.w_out().size()));
    } else {
      router_w_.upload(r.weight().data(), static_cast<std::size_t>(r.weight().size()));
      router_b_.upload(r.threshold().data(), static_cast<std::size_t>(r.threshold().size()));
      std::vector<float> norms(static_cast<std::size_t>(num_experts()));
      for (index_t e = 0; e < num_experts(); ++e)
        norms[static_cast<std::size_t>(e)] = (std::max)(r.weight().col(e).norm(), top_any_router<float>::norm_eps);
      expert_norm_.upload(norms);
      active_.upload(r.active());
      num_active_ = r.num_active();
    }
  }

  /// Seeded random weights generated on the device: uniform(+-1/sqrt(fan_in)) for expert weights
  /// and biases and for the router (top_any: thresholds 0, all slots active). Not the CPU
  /// layer's sequence (use copy_from to compare backends); for benchmarks, where uploading a
  /// large layer from the host would dominate. Cold path: synchronises the device.
  void randomize(std::uint64_t seed) {
    const float a1 = 1.f / std::sqrt(float(cfg_.d_model)), a2 = 1.f / std::sqrt(float(cfg_.expert_width));
    cuda_detail::fill_uniform(w1_.data(), w1_.size(), seed ^ 0x1ull, a1);
    cuda_detail::fill_uniform(b1_.data(), b1_.size(), seed ^ 0x2ull, a1);
    cuda_detail::fill_uniform(w2_.data(), w2_.size(), seed ^ 0x3ull, a2);
    cuda_detail::fill_uniform(b2e_.data(), b2e_.size(), seed ^ 0x4ull, a2);
    cuda_detail::fill_uniform(b2_.data(), b2_.size(), seed ^ 0x5ull, a2);
    cuda_detail::fill_uniform(router_w_.data(), router_w_.size(), seed ^ 0x6ull, a1);
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      cuda_detail::fill_uniform(router_w2_.data(), router_w2_.size(), seed ^ 0x7ull,
                                1.f / std::sqrt(float(cfg_.router_hidden)));
    if constexpr (std::is_same_v<Policy, top_k>)
      cuda_detail::throw_on_cuda(cudaMemset(router_b_.data(), 0, router_b_.size() * sizeof(float)), "cudaMemset");
    if constexpr (std::is_same_v<Policy, top_any>) {
      cuda_detail::throw_on_cuda(cudaMemset(router_b_.data(), 0, router_b_.size() * sizeof(float)), "cudaMemset");
      const std::vector<float> w = router_w_.download();  // (d, E) column-major: small
      std::vector<float> norms(static_cast<std::size_t>(num_experts()));
      for (index_t e = 0; e < num_experts(); ++e) {
        double sq = 0;
        for (index_t i = 0; i < cfg_.d_model; ++i) {
          const double v = w[static_cast<std::size_t>(e * cfg_.d_model + i)];
          sq += v * v;
        }
        norms[static_cast<std::size_t>(e)] = (std::max)(float(std::sqrt(sq)), top_any_router<float>::norm_eps);
      }
      expert_norm_.upload(norms);
      active_.upload(std::vector<std::uint8_t>(norms.size(), std::uint8_t{1}));
      num_active_ = num_experts();
    }
    // The router-bias cudaMemset may still be in flight (see allocate()).
    cuda_detail::throw_on_cuda(cudaStreamSynchronize(nullptr), "moe_layer<cuda>::randomize: cudaStreamSynchronize");
  }

  /// Validates and applies router options (as the CPU router's set_options).
  void set_options(const options_type& opt) {
    validate(cfg_, opt);
    opt_ = opt;
  }
  const options_type& options() const noexcept { return opt_; }

  const moe_config& config() const noexcept { return cfg_; }
  index_t d_model() const noexcept { return cfg_.d_model; }
  index_t num_experts() const noexcept { return cfg_.num_experts; }
  index_t expert_width() const noexcept { return cfg_.expert_width; }
  /// Most experts one token can get under the current options.
  index_t max_k() const noexcept {
    if constexpr (std::is_same_v<Policy, top_k>)
      return opt_.k;
    else if constexpr (std::is_same_v<Policy, dynamic_k>)
      return opt_.k_max > 0 ? opt_.k_max : num_experts();
    else
      return num_experts();
  }
  double flops_per_slot() const noexcept {
    return 2.0 * double(cfg_.d_model) * double(cfg_.expert_width) * (Activation::gated ? 3.0 : 2.0);
  }
  double router_flops_per_token() const noexcept {
    const double d = double(cfg_.d_model), E = double(num_experts());
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      return 2.0 * d * double(cfg_.router_hidden) + 2.0 * double(cfg_.router_hidden) * E;
    else
      return 2.0 * d * E;
  }

  /// Bytes of device workspace forward needs for up to b.max_tokens tokens (max_threads is
  /// ignored). Depends on max_k: call again after changing k or k_max. Returns 0 if the CUDA
  /// runtime cannot answer CUB's size query (no device).
  std::size_t workspace_size(const workspace_bounds& b) const noexcept {
    std::size_t sort_bytes = 0, scan_bytes = 0;
    if (!cuda_detail::cub_temp_bytes(b.max_tokens * max_k(), b.max_tokens, cuda_detail::key_bits(num_experts()),
                                     sort_bytes, scan_bytes)
             .ok())
      return 0;
    detail::carver c;
    cuda_detail::carve_layer(c, dims(), b.max_tokens, sort_bytes, scan_bytes);
    return c.bytes();
  }
  std::size_t workspace_size(const context<cuda>&, index_t max_tokens) const noexcept {
    return workspace_size(workspace_bounds{max_tokens, 1});
  }

  /// y = MoE(x), enqueued on ctx.stream.
  /// \param x (tokens, d_model) device rows of T; \param y (tokens, d_model) device rows (not aliasing x)
  /// \param ws device memory of at least workspace_size({tokens}) bytes; afterwards it holds the
  ///        plan (plan()) and the router scores (scores()) once the stream has reached that point.
  /// \param stats optional: when given, forward synchronises ctx.stream to fill it (the one
  ///        synchronising path; not for graph capture) and reports NaN router scores.
  /// Without stats nothing is waited on: a NaN router score makes that token run no expert
  /// (y = b2) and is reported by check_numerics().
  status forward(const context<cuda>& ctx, matrix_view<const T> x, matrix_view<T> y, workspace ws,
                 routing_stats* stats = nullptr) const noexcept {
    DMOE_TRY(check_io(x, y, stats));
    const index_t tokens = x.rows;
    if (tokens == 0) {
      if (stats) stats->record(routing_plan<float>{0, num_experts(), nullptr, nullptr, nullptr}, flops_per_slot(), 0.0);
      return {};
    }
    cuda_detail::layer_buffers b;
    DMOE_TRY(buffers(ws, tokens, b));
    cudaStream_t stream = ctx.stream;
    const int E = static_cast<int>(num_experts()), mk = static_cast<int>(max_k());
    const index_t d = cfg_.d_model, n = expert_width(), fn = width_factor<Activation> * n;
    cudaError_t err = cudaMemsetAsync(b.error_token, 0xff, sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "moe_layer<cuda>::forward: cudaMemsetAsync");

    // 1. route
    DMOE_TRY(route(x, b, stream));
    std::size_t scan_bytes = b.scan_temp_bytes;
    err = cub::DeviceScan::ExclusiveSum(b.scan_temp, scan_bytes, b.counts, b.token_offsets,
                                        static_cast<int>(tokens + 1), stream);
    if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "moe_layer<cuda>::forward: cub::DeviceScan");
    cuda_detail::compact_plan_kernel<><<<static_cast<unsigned>(cuda_detail::blocks_for(b.items, 256)), 256, 0, stream>>>(
        b, mk);
    if ((err = cudaGetLastError()) != cudaSuccess) return cuda_detail::cuda_failure(err, "compact_plan_kernel launch");

    // 2. dispatch
    DMOE_TRY(cuda_detail::dispatch(b, E, mk, stream));

    // 3. experts
    T* hidden = reinterpret_cast<T*>(b.hidden);
    T* out = reinterpret_cast<T*>(b.out);
    const index_t m_tiles = cuda_detail::max_m_tiles(b.items, E);
    cuda_detail::gemm_args<T> g1;
    g1.a = x.data;
    g1.lda = x.row_stride;
    g1.gather = b.sorted_token;
    g1.w = w1_.data();
    g1.w_expert_stride = d * fn;
    g1.bias = b1_.empty() ? nullptr : b1_.data();
    g1.bias_expert_stride = fn;
    g1.out = hidden;
    g1.K = static_cast<int>(d);
    g1.N = static_cast<int>(n);
    g1.E = E;
    g1.expert_offsets = b.expert_offsets;
    g1.tile_offsets = b.tile_offsets;
    g1.vec = cuda_detail::vector_loads_ok<T>(g1.a, g1.lda, g1.w, g1.w_expert_stride, g1.K);
    err = cuda_detail::grouped_gemm<T, Activation, cuda_detail::gemm_stage::first>(
        g1, cuda_detail::persistent_grid(m_tiles * cuda_detail::n_tiles(n), sm_count_), stream);
    if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "grouped GEMM 1 launch");
    cuda_detail::gemm_args<T> g2 = g1;
    g2.a = hidden;
    g2.lda = n;
    g2.gather = nullptr;
    g2.w = w2_.data();
    g2.w_expert_stride = n * d;
    g2.bias = b2e_.empty() ? nullptr : b2e_.data();
    g2.bias_expert_stride = d;
    g2.out = out;
    g2.K = static_cast<int>(n);
    g2.N = static_cast<int>(d);
    g2.vec = cuda_detail::vector_loads_ok<T>(g2.a, g2.lda, g2.w, g2.w_expert_stride, g2.K);
    err = cuda_detail::grouped_gemm<T, Activation, cuda_detail::gemm_stage::second>(
        g2, cuda_detail::persistent_grid(m_tiles * cuda_detail::n_tiles(d), sm_count_), stream);
    if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "grouped GEMM 2 launch");

    // 4. combine
    cuda_detail::combine_kernel<T><<<static_cast<unsigned>(tokens), cuda_detail::combine_threads, 0, stream>>>(
        b, out, b2_.empty() ? nullptr : b2_.data(), y.data, y.row_stride, static_cast<int>(d), mk);
    if ((err = cudaGetLastError()) != cudaSuccess) return cuda_detail::cuda_failure(err, "combine_kernel launch");

    if (stats) DMOE_TRY(read_stats(ctx, b, *stats));
    return {};
  }

  /// Synchronises ctx.stream and reports a NaN / infinite router score met by the last forward
  /// on `tokens` tokens in `ws` (numerical_error naming the first such token), or a CUDA error.
  status check_numerics(const context<cuda>& ctx, workspace ws, index_t tokens) const noexcept {
    if (tokens <= 0) return {};
    cuda_detail::layer_buffers b;
    DMOE_TRY(buffers(ws, tokens, b));
    return read_error(ctx, b);
  }

  /// The routing plan a forward on `tokens` tokens left in `ws` (device pointers; read it after
  /// the stream has passed that forward).
  routing_plan<float> plan(workspace ws, index_t tokens) const noexcept {
    cuda_detail::layer_buffers b;
    if (tokens <= 0 || !buffers(ws, tokens, b).ok()) return routing_plan<float>{0, num_experts(), nullptr, nullptr, nullptr};
    return routing_plan<float>{tokens, num_experts(), b.token_offsets, b.plan_expert, b.plan_weight};
  }

  /// Router scores of that forward (device, tokens x num_experts, fp32): softmax probabilities
  /// (top_k), predicted norms r (dynamic_k) or cosines (top_any).
  matrix_view<const float> scores(workspace ws, index_t tokens) const noexcept {
    cuda_detail::layer_buffers b;
    if (tokens <= 0 || !buffers(ws, tokens, b).ok()) return {};
    return matrix_view<const float>(b.scores, tokens, num_experts());
  }

 private:
  using experts_extent = detail::extent_value<Experts>;
  using width_extent = detail::extent_value<Width>;
  using router_type = typename Policy::template router<float>;

  static void validate(const moe_config& c, const options_type& opt) {
    if (c.d_model <= 0)
      detail::raisef(errc::invalid_argument, "moe_layer<cuda>: config.d_model must be positive, got %td", c.d_model);
    if (!experts_extent::accepts(c.num_experts) || c.num_experts > INT32_MAX - 1)
      detail::raisef(errc::invalid_argument,
                     "moe_layer<cuda>: config.num_experts = %td does not fit the layer's Experts extent (%s)",
                     c.num_experts, Experts == dynamic_extent ? "dynamic: must be in [1, 2^31 - 1)" : "static");
    if (!width_extent::accepts(c.expert_width) || c.expert_width > INT32_MAX / 2)
      detail::raisef(errc::invalid_argument,
                     "moe_layer<cuda>: config.expert_width = %td does not fit the layer's Width extent (%s)",
                     c.expert_width, Width == dynamic_extent ? "dynamic: must be positive" : "static");
    if (c.d_model > INT32_MAX)
      detail::raisef(errc::invalid_argument, "moe_layer<cuda>: config.d_model = %td exceeds 2^31 - 1", c.d_model);
    if (std::is_same_v<Policy, dynamic_k> && c.router_hidden <= 0)
      detail::raisef(errc::invalid_argument, "moe_layer<cuda>: config.router_hidden must be positive, got %td",
                     c.router_hidden);
    // The CPU router's checks and messages for the options (k, tau, k_max); it is small.
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      (void)router_type(c.d_model, c.num_experts, opt, c.router_hidden);
    else
      (void)router_type(c.d_model, c.num_experts, opt);
  }

  void init_device() {
    int dev = 0, major = 0;
    cuda_detail::throw_on_cuda(cudaGetDevice(&dev), "moe_layer<cuda>: cudaGetDevice (is there a CUDA device?)");
    cuda_detail::throw_on_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
                               "moe_layer<cuda>: cudaDeviceGetAttribute");
    if (major < 8)
      detail::raisef(errc::unsupported,
                     "moe_layer<cuda>: device %d has compute capability %d.x; the CUDA backend needs sm_80 or newer",
                     dev, major);
    int sms = 0;
    cuda_detail::throw_on_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                               "moe_layer<cuda>: cudaDeviceGetAttribute");
    sm_count_ = sms;
  }

  void allocate() {
    const auto sz = [](index_t v) { return static_cast<std::size_t>(v); };
    const index_t d = cfg_.d_model, E = cfg_.num_experts, n = cfg_.expert_width, fn = width_factor<Activation> * n;
    w1_ = device_array<T>(sz(E * d * fn));
    b1_ = device_array<T>(cfg_.hidden_bias ? sz(E * fn) : 0);
    w2_ = device_array<T>(sz(E * n * d));
    b2e_ = device_array<T>(cfg_.expert_bias ? sz(E * d) : 0);
    b2_ = device_array<T>(cfg_.output_bias ? sz(d) : 0);
    if constexpr (std::is_same_v<Policy, top_k>) {
      router_w_ = device_array<float>(sz(d * E));
      router_b_ = device_array<float>(sz(E));
    } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
      router_w_ = device_array<float>(sz(d * cfg_.router_hidden));
      router_w2_ = device_array<float>(sz(cfg_.router_hidden * E));
    } else {
      router_w_ = device_array<float>(sz(d * E));
      router_b_ = device_array<float>(sz(E));  // thresholds g
      expert_norm_ = device_array<float>(sz(E));
      active_ = device_array<std::uint8_t>(sz(E));
      num_active_ = E;
    }
    // Zero weights (cudaMalloc does not clear); all-active mask, unit norm floor for top_any.
    for (auto* a : {&w1_, &b1_, &w2_, &b2e_, &b2_})
      if (!a->empty()) cuda_detail::throw_on_cuda(cudaMemset(a->data(), 0, a->size() * sizeof(T)), "cudaMemset");
    for (auto* a : {&router_w_, &router_b_, &router_w2_})
      if (!a->empty()) cuda_detail::throw_on_cuda(cudaMemset(a->data(), 0, a->size() * sizeof(float)), "cudaMemset");
    if constexpr (std::is_same_v<Policy, top_any>) {
      expert_norm_.upload(std::vector<float>(sz(E), top_any_router<float>::norm_eps));
      active_.upload(std::vector<std::uint8_t>(sz(E), std::uint8_t{1}));
    }
    // cudaMemset may return before the device has written: wait, so that a forward on a stream
    // not ordered after the default stream (cudaStreamNonBlocking) sees the zeros.
    cuda_detail::throw_on_cuda(cudaStreamSynchronize(nullptr), "moe_layer<cuda>: cudaStreamSynchronize");
  }

  static void upload_converted(device_array<T>& dst, const std::vector<float>& src) {
    if (src.empty()) return;
    if constexpr (std::is_same_v<T, float>) {
      dst.upload(src);
    } else {
      std::vector<T> tmp(src.size());
      cuda_detail::convert_to_storage(src.data(), src.size(), tmp.data());
      dst.upload(tmp);
    }
  }

  cuda_detail::layer_dims dims() const noexcept {
    cuda_detail::layer_dims dm;
    dm.d = cfg_.d_model;
    dm.E = num_experts();
    dm.n = expert_width();
    dm.f = width_factor<Activation>;
    dm.max_k = max_k();
    dm.router_hidden = std::is_same_v<Policy, dynamic_k> ? cfg_.router_hidden : 0;
    dm.storage_bytes = static_cast<index_t>(sizeof(T));
    return dm;
  }

  status buffers(workspace ws, index_t tokens, cuda_detail::layer_buffers& b) const noexcept {
    std::size_t sort_bytes = 0, scan_bytes = 0;
    DMOE_TRY(cuda_detail::cub_temp_bytes(tokens * max_k(), tokens, cuda_detail::key_bits(num_experts()), sort_bytes,
                                         scan_bytes));
    detail::carver measure;
    cuda_detail::carve_layer(measure, dims(), tokens, sort_bytes, scan_bytes);
    if (ws.data == nullptr || ws.bytes < measure.bytes())
      return status::failure(errc::workspace_too_small,
                             "moe_layer<cuda>::forward: workspace has %zu bytes at %p, %td tokens need %zu "
                             "(workspace_size)",
                             ws.bytes, ws.data, tokens, measure.bytes());
    detail::carver c(detail::carver::align(ws.data));
    b = cuda_detail::carve_layer(c, dims(), tokens, sort_bytes, scan_bytes);
    return {};
  }

  status check_io(matrix_view<const T> x, matrix_view<T> y, const routing_stats* stats) const noexcept {
    const index_t d = cfg_.d_model;
    if (x.cols != d)
      return status::failure(errc::invalid_argument,
                             "moe_layer<cuda>::forward: x is (%td x %td), expected %td columns (d_model)", x.rows,
                             x.cols, d);
    if (y.rows != x.rows || y.cols != d)
      return status::failure(errc::invalid_argument,
                             "moe_layer<cuda>::forward: y is (%td x %td), expected (%td x %td) to match x (tokens x "
                             "d_model)",
                             y.rows, y.cols, x.rows, d);
    if (x.rows < 0) return status::failure(errc::invalid_argument, "moe_layer<cuda>::forward: x has %td rows", x.rows);
    if (x.rows > 0 && (x.data == nullptr || y.data == nullptr))
      return status::failure(errc::invalid_argument, "moe_layer<cuda>::forward: %s is a null pointer with %td rows",
                             x.data == nullptr ? "x" : "y", x.rows);
    if (x.row_stride < d || y.row_stride < d)
      return status::failure(errc::invalid_argument,
                             "moe_layer<cuda>::forward: row strides must be >= d_model = %td, got x %td, y %td", d,
                             x.row_stride, y.row_stride);
    if (x.rows > 0 && static_cast<const void*>(x.data) == static_cast<const void*>(y.data))
      return status::failure(errc::invalid_argument, "moe_layer<cuda>::forward: y must not alias x");
    if (stats && stats->num_experts() != num_experts())
      return status::failure(errc::invalid_argument,
                             "moe_layer<cuda>::forward: stats was made for %td experts, the layer has %td "
                             "(construct routing_stats(layer.num_experts()))",
                             stats->num_experts(), num_experts());
    const index_t per_token = (std::max)({max_k(), num_experts(), cfg_.router_hidden, expert_width(), d});
    if (!cuda_detail::fits_int32(x.rows, per_token) || x.rows > INT32_MAX / 2)
      return status::failure(errc::unsupported,
                             "moe_layer<cuda>::forward: %td tokens x %td per token exceed the backend's 32-bit "
                             "indices; split the batch",
                             x.rows, per_token);
    // Router products put column tiles on grid.y (at most 65535 blocks of router_tile columns).
    if ((std::max)(num_experts(), cfg_.router_hidden) > index_t{65535} * cuda_detail::router_tile)
      return status::failure(errc::unsupported,
                             "moe_layer<cuda>::forward: %td experts / router width %td exceed the router kernel's "
                             "grid (65535 x %d columns)",
                             num_experts(), cfg_.router_hidden, cuda_detail::router_tile);
    if constexpr (std::is_same_v<Policy, top_any>)
      if (num_active_ == 0)
        return status::failure(errc::invalid_argument,
                               "top_any route: no active expert (all %td slots masked off); activate at least one "
                               "slot in router().active() and copy_from again",
                               num_experts());
    return {};
  }

  status route(matrix_view<const T> x, cuda_detail::layer_buffers& b, cudaStream_t stream) const noexcept {
    const index_t tokens = x.rows, d = cfg_.d_model, E = num_experts();
    cuda_detail::select_params p;
    p.E = static_cast<int>(E);
    p.max_k = static_cast<int>(max_k());
    cudaError_t err = cudaSuccess;
    if constexpr (std::is_same_v<Policy, top_k>) {
      p.policy = 0;
      p.k = static_cast<int>(opt_.k);
      p.renormalize = opt_.renormalize;
      err = cuda_detail::router_product(x.data, x.row_stride, tokens, d, router_w_.data(), E, router_b_.data(),
                                        b.scores, cuda_detail::router_epilogue::none, stream);
    } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
      p.policy = 1;
      p.k = static_cast<int>(opt_.k_max);
      p.tau = static_cast<float>(opt_.tau);
      const index_t h = cfg_.router_hidden;
      err = cuda_detail::router_product(x.data, x.row_stride, tokens, d, router_w_.data(), h, nullptr, b.router_hidden,
                                        cuda_detail::router_epilogue::relu, stream);
      if (err == cudaSuccess)
        err = cuda_detail::router_product(static_cast<const float*>(b.router_hidden), h, tokens, h,
                                          router_w2_.data(), E, nullptr, b.scores, cuda_detail::router_epilogue::abs,
                                          stream);
    } else {
      p.policy = 2;
      p.training = opt_.training;
      p.expert_norm = expert_norm_.data();
      p.threshold = router_b_.data();
      p.active = active_.data();
      p.norm_eps = top_any_router<float>::norm_eps;
      err = cuda_detail::router_product(x.data, x.row_stride, tokens, d, router_w_.data(), E, nullptr, b.scores,
                                        cuda_detail::router_epilogue::none, stream);
    }
    if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "router product launch");
    cuda_detail::select_kernel<T>
        <<<static_cast<unsigned>(cuda_detail::blocks_for(tokens, cuda_detail::select_warps)),
           cuda_detail::select_warps * 32, 0, stream>>>(p, x.data, x.row_stride, static_cast<int>(d),
                                                        static_cast<int>(tokens), b.scores, b);
    if ((err = cudaGetLastError()) != cudaSuccess) return cuda_detail::cuda_failure(err, "select_kernel launch");
    return {};
  }

  status read_error(const context<cuda>& ctx, const cuda_detail::layer_buffers& b) const noexcept {
    unsigned long long bad = 0;
    cudaError_t err = cudaMemcpyAsync(&bad, b.error_token, sizeof bad, cudaMemcpyDeviceToHost, ctx.stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(ctx.stream);
    if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "moe_layer<cuda>: reading the error flag");
    if (bad != ~0ull)
      return status::failure(errc::numerical_error,
                             "%s route: router score of token %llu is NaN or infinite (check x and the router "
                             "weights)",
                             router_type::name, bad);
    return {};
  }

  /// The synchronising statistics path: copies expert offsets and the k histogram (E + 1 ints
  /// each) into the stats' own vectors, which have E + 1 and E index_t entries, so nothing is
  /// allocated.
  status read_stats(const context<cuda>& ctx, const cuda_detail::layer_buffers& b, routing_stats& st) const noexcept {
    const int E = static_cast<int>(num_experts());
    cudaError_t err = cudaSuccess;
    if (cuda_detail::k_histogram_in_shared(E)) {
      cuda_detail::k_histogram_kernel<><<<1, cuda_detail::single_block_threads,
                                        static_cast<std::size_t>(E + 1) * sizeof(int), ctx.stream>>>(b, E);
    } else {
      // More than 12287 experts: E + 1 shared bins would exceed 48 KiB and the launch would fail.
      err = cudaMemsetAsync(b.k_histogram, 0, static_cast<std::size_t>(E + 1) * sizeof(std::int32_t), ctx.stream);
      if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "k_histogram cudaMemsetAsync");
      cuda_detail::k_histogram_global_kernel<><<<static_cast<unsigned>(cuda_detail::blocks_for(
                                                     (std::min)(b.tokens, index_t{1} << 20), 256)),
                                                 256, 0, ctx.stream>>>(b);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_detail::cuda_failure(err, "k_histogram_kernel launch");
    DMOE_TRY(read_error(ctx, b));  // also synchronises
    const auto fetch = [&](const std::int32_t* src) -> cudaError_t {
      // E + 1 int32 land in the first half of k_histogram's E + 1 index_t, then widen in place
      // from the back (slot e is written only after int32 entries e..2e+1 have been read).
      index_t* dst = st.k_histogram.data();
      // On ctx.stream, not the default stream: a legacy-default-stream copy would wait for (and,
      // in global capture mode, invalidate a capture on) every other blocking stream.
      cudaError_t e2 = cudaMemcpyAsync(dst, src, static_cast<std::size_t>(E + 1) * sizeof(std::int32_t),
                                       cudaMemcpyDeviceToHost, ctx.stream);
      if (e2 == cudaSuccess) e2 = cudaStreamSynchronize(ctx.stream);
      if (e2 != cudaSuccess) return e2;
      auto* bytes = reinterpret_cast<unsigned char*>(dst);
      for (int e = E; e >= 0; --e) {
        std::int32_t v;
        std::memcpy(&v, bytes + static_cast<std::size_t>(e) * sizeof(std::int32_t), sizeof v);
        dst[e] = v;
      }
      return cudaSuccess;
    };
    if ((err = fetch(b.expert_offsets)) != cudaSuccess) return cuda_detail::cuda_failure(err, "reading expert offsets");
    for (int e = 0; e < E; ++e) st.tokens_per_expert[static_cast<std::size_t>(e)] = st.k_histogram[static_cast<std::size_t>(e + 1)] - st.k_histogram[static_cast<std::size_t>(e)];
    st.slots = st.k_histogram[static_cast<std::size_t>(E)];
    if ((err = fetch(b.k_histogram)) != cudaSuccess) return cuda_detail::cuda_failure(err, "reading the k histogram");
    st.tokens = b.tokens;
    st.router_flops = router_flops_per_token() * double(b.tokens);
    st.expert_flops = flops_per_slot() * double(st.slots);
    st.dense_flops = flops_per_slot() * double(num_experts()) * double(b.tokens);
    return {};
  }

  moe_config cfg_;
  options_type opt_{};
  int sm_count_ = 1;
  index_t num_active_ = 0;
  device_array<T> w1_, b1_, w2_, b2e_, b2_;
  device_array<float> router_w_, router_b_, router_w2_, expert_norm_;
  device_array<std::uint8_t> active_;
};

}  // namespace dmoe
