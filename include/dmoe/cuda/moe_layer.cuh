// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The dmoe::cuda specialisation of moe_layer: weights in device memory, work on the caller's
/// stream, storage float / __half / __nv_bfloat16 with fp32 accumulation and fp32 router math.
///
/// This file holds the public API and the orchestration; the work is in rooms that mirror cpu/
/// (docs/design.md). forward(x) enqueues, with no allocation and no host synchronisation:
///  1. route (route.cuh): router products (fp32), the per-token rule of routing/selection.hpp
///     (one warp per token, the policy a template argument), selections written at stride max_k
///     with radix keys (expert id | sentinel E); a CUB exclusive scan of the counts and a
///     compaction give the CPU backend's plan layout;
///  2. dispatch (dispatch.cuh): stable expert-major order over all tokens * max_k strided slots
///     (CUB radix sort, or a one-block counting sort for decode sizes), expert and M-tile offsets;
///  3. experts (experts.cuh): two grouped GEMMs on tensor cores, persistent grid sized on the host
///     from worst-case bounds, tile list read on the device;
///  4. combine (combine.cuh): per token, y = b2 + sum over its slots in slot order of w_s out.
/// Buffers: layout.hpp; device parameters: weights.cuh; statistics and the NaN flag (the synchronising paths): stats.cuh; checks
/// and FLOPs shared with the CPU backend: layer/spec.hpp. Every buffer size comes from the token
/// count and the layer shape, so the sequence can be captured in a CUDA graph and replayed.

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
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "../layer/moe_layer.hpp"
#include "../layer/spec.hpp"
#include "../routing/aux_loss.hpp"
#include "../routing/plan.hpp"
#include "../routing/routers.hpp"
#include "../routing/stats.hpp"
#include "combine.cuh"
#include "common.cuh"
#include "dispatch.cuh"
#include "experts.cuh"
#include "route.cuh"
#include "route_backward.cuh"
#include "stats.cuh"
#include "weights.cuh"

DMOE_NAMESPACE_BEGIN

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
  using spec = detail::layer_spec<Policy, Activation, Experts, Width>;

 public:
  using scalar_type = T;
  using backend_type = cuda;
  using policy_type = Policy;
  using activation_type = Activation;
  using options_type = typename Policy::options;
  /// The host router whose parameters copy_from uploads.
  using router_type = typename Policy::template router<float>;
  /// The CPU layer whose weights copy_from uploads. Only named here (cuda/ does not include
  /// cpu/): the constructor and copy_from below are instantiated where a CPU layer is passed,
  /// and the caller has included cpu/moe_layer.hpp (or dmoe.hpp) to make one.
  using cpu_layer_type = moe_layer<float, cpu, Policy, Activation, Experts, Width>;

  /// Zero weights on the current device. Throws dmoe::error on a bad configuration (naming the
  /// field), without a device, on a device older than sm_80, or when allocation fails.
  moe_layer(const moe_config& cfg, const options_type& opt) : cfg_(spec::checked_config(cfg, detail::cuda_limits)) {
    spec::check_options(cfg_, opt);
    opt_ = opt;
    sm_count_ = detail::cuda_backend::current_device_sm_count();
    w_.allocate(cfg_);
  }
  /// Copies the weights of a CPU layer of the same policy, activation and shape.
  explicit moe_layer(const cpu_layer_type& src) : moe_layer(src.config(), src.router().options()) { copy_from(src); }

  /// Uploads weights and router options from a CPU layer (cold path: converts on the host and
  /// copies synchronously). Weights are rounded to T; router parameters stay fp32.
  void copy_from(const cpu_layer_type& src) { copy_from(src.config(), src.experts(), src.router()); }

  /// Uploads host experts and router of a layer with configuration `c` (the same shape as this
  /// one): what copy_from(cpu layer) does, from the parts.
  void copy_from(const moe_config& c, const expert_weights<float>& ex, const router_type& r) {
    if (c.d_model != cfg_.d_model || c.num_experts != cfg_.num_experts || c.expert_width != cfg_.expert_width ||
        c.hidden_bias != cfg_.hidden_bias || c.expert_bias != cfg_.expert_bias || c.output_bias != cfg_.output_bias ||
        (std::is_same_v<Policy, dynamic_k> && c.router_hidden != cfg_.router_hidden))
      detail::raisef(errc::invalid_argument,
                     "moe_layer<cuda>::copy_from: source config (d_model %td, experts %td, width %td) differs from "
                     "this layer's (%td, %td, %td) or in its bias flags / router_hidden",
                     c.d_model, c.num_experts, c.expert_width, cfg_.d_model, cfg_.num_experts, cfg_.expert_width);
    if (ex.shape() != expert_shape{cfg_.d_model, cfg_.num_experts, cfg_.expert_width, Activation::gated,
                                   cfg_.hidden_bias, cfg_.expert_bias, cfg_.output_bias})
      detail::raisef(errc::invalid_argument, "moe_layer<cuda>::copy_from: the experts' shape differs from the config");
    if (r.d_model() != cfg_.d_model || r.num_experts() != cfg_.num_experts)
      detail::raisef(errc::invalid_argument,
                     "moe_layer<cuda>::copy_from: router is (d_model %td, %td experts), the layer (%td, %td)",
                     r.d_model(), r.num_experts(), cfg_.d_model, cfg_.num_experts);
    w_.upload(ex, r);
    opt_ = r.options();
  }

  /// Seeded random weights generated on the device: uniform(+-1/sqrt(fan_in)) for expert weights
  /// and biases and for the router (top_any: thresholds 0, all slots active). Not the CPU
  /// layer's sequence (use copy_from to compare backends); for benchmarks, where uploading a
  /// large layer from the host would dominate. Cold path: synchronises the device.
  void randomize(std::uint64_t seed) { w_.randomize(cfg_, seed); }

  /// Validates and applies router options (the CPU router's rules and messages, routing/options.hpp).
  void set_options(const options_type& opt) {
    spec::check_options(cfg_, opt);
    opt_ = opt;
  }
  const options_type& options() const noexcept { return opt_; }

  const moe_config& config() const noexcept { return cfg_; }
  index_t d_model() const noexcept { return cfg_.d_model; }
  index_t num_experts() const noexcept { return cfg_.num_experts; }
  index_t expert_width() const noexcept { return cfg_.expert_width; }
  /// Most experts one token can get under the current options.
  index_t max_k() const noexcept { return spec::max_k(cfg_, opt_); }
  double flops_per_slot() const noexcept { return spec::flops_per_slot(cfg_); }
  double router_flops_per_token() const noexcept { return spec::router_flops_per_token(cfg_); }

  /// Bytes of device workspace forward needs for up to b.max_tokens tokens (max_threads is
  /// ignored). b.max_slots (dynamic-k and top-any; 0 = tokens * max_k) bounds the rows of the
  /// expert activations, the plan, the sort and its index buffers; only the strided selection
  /// (12 bytes per token and possible slot) keeps tokens * max_k entries.
  /// Depends on max_k: call again after changing k or k_max. Returns 0 if the CUDA runtime
  /// cannot answer CUB's size query (no device); throws dmoe::error(invalid_argument) when
  /// tokens * max_k exceeds the backend's 32-bit indices or the size does not fit in size_t.
  std::size_t workspace_size(const workspace_bounds& b) const {
    throw_if_error(check_tokens("moe_layer<cuda>::workspace_size", b.max_tokens));
    const index_t items = b.max_tokens * max_k();
    const index_t slots = fixed_k || b.max_slots <= 0 || b.max_slots > items ? items : b.max_slots;
    std::size_t bytes = 0;
    if (!layout_bytes(b.max_tokens, slots, bytes).ok()) return 0;
    if (bytes == 0)
      detail::raisef(errc::invalid_argument, "moe_layer<cuda>::workspace_size: the workspace for %td tokens does not "
                     "fit in size_t", b.max_tokens);
    return bytes;
  }
  std::size_t workspace_size(const context<cuda>&, index_t max_tokens) const {
    return workspace_size(workspace_bounds{max_tokens, 1});
  }

  /// Inference entry, mirroring moe_layer<cpu>::infer. On CUDA the combine is its own kernel
  /// over the per-slot outputs either way (no fused path yet), so this runs forward; the
  /// workspace stays usable by backward here.
  status infer(const context<cuda>& ctx, matrix_view<const T> x, matrix_view<T> y, workspace ws,
               routing_stats* stats = nullptr) const noexcept {
    return forward(ctx, x, y, ws, stats);
  }

  /// y = MoE(x), enqueued on ctx.stream.
  /// \param x (tokens, d_model) device rows of T; \param y (tokens, d_model) device rows (not aliasing x)
  /// \param ws device memory of at least workspace_size({tokens}) bytes; afterwards it holds the
  ///        plan (plan()) and the router scores (scores()) once the stream has reached that point.
  ///        For dynamic-k and top-any the activation rows take what the workspace has room for
  ///        (workspace_bounds::max_slots): a batch routing more slots runs no expert (y = b2)
  ///        and is reported as errc::workspace_too_small by check_numerics() (or by this call
  ///        when stats are given), never as a result with slots dropped silently.
  /// \param stats optional: when given, forward synchronises ctx.stream to fill it (the one
  ///        synchronising path; not for graph capture) and reports NaN router scores.
  /// Without stats nothing is waited on: a NaN router score makes that token run no expert
  /// (y = b2) and is reported by check_numerics().
  status forward(const context<cuda>& ctx, matrix_view<const T> x, matrix_view<T> y, workspace ws,
                 routing_stats* stats = nullptr) const noexcept {
    DMOE_TRY(check_io(x, y, stats));
    DMOE_TRY(detail::cuda_backend::check_current_device(w_.device, "moe_layer<cuda>::forward"));
    const index_t tokens = x.rows;
    if (tokens == 0) {
      if (stats) stats->record(routing_plan<float>{0, num_experts(), nullptr, nullptr, nullptr}, flops_per_slot(), 0.0);
      return {};
    }
    detail::cuda_backend::layer_buffers b;
    DMOE_TRY(buffers(ws, tokens, b, true));
    cudaStream_t stream = ctx.stream;
    const int E = static_cast<int>(num_experts()), mk = static_cast<int>(max_k());
    cudaError_t err = cudaMemsetAsync(b.error_token, 0xff, sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return detail::cuda_backend::cuda_failure(err, "moe_layer<cuda>::forward: cudaMemsetAsync");
    err = cudaMemsetAsync(b.slot_overflow, 0, sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return detail::cuda_backend::cuda_failure(err, "moe_layer<cuda>::forward: cudaMemsetAsync");

    // 1. route
    DMOE_TRY(detail::cuda_backend::route<Policy>(x.data, x.row_stride, tokens, cfg_.d_model, num_experts(), max_k(), opt_,
                                        w_.router(), b, stream));
    std::size_t scan_bytes = b.scan_temp_bytes;
    err = cub::DeviceScan::ExclusiveSum(b.scan_temp, scan_bytes, b.counts, b.token_offsets,
                                        static_cast<int>(tokens + 1), stream);
    if (err != cudaSuccess) return detail::cuda_backend::cuda_failure(err, "moe_layer<cuda>::forward: cub::DeviceScan");
    detail::cuda_backend::compact_plan_kernel<><<<static_cast<unsigned>(detail::cuda_backend::blocks_for(b.items, 256)), 256, 0, stream>>>(
        b, mk);
    if ((err = cudaGetLastError()) != cudaSuccess) return detail::cuda_backend::cuda_failure(err, "compact_plan_kernel launch");

    // 2. dispatch
    DMOE_TRY(detail::cuda_backend::dispatch(b, E, mk, stream));
    if (b.slot_capacity < b.items) DMOE_TRY(detail::cuda_backend::enforce_slot_bound(b, E, stream));

    // 3. experts
    DMOE_TRY((detail::cuda_backend::run_experts<T, Activation>(x.data, x.row_stride, b, w_.experts(), cfg_.d_model,
                                                      expert_width(), E, sm_count_, stream)));

    // 4. combine
    DMOE_TRY(detail::cuda_backend::combine<T>(b, reinterpret_cast<const T*>(b.out), w_.output_bias(), y.data,
                                     y.row_stride, tokens, cfg_.d_model, mk, stream));

    if (stats)
      DMOE_TRY(detail::cuda_backend::read_stats(stream, b, E, router_type::name, flops_per_slot(), router_flops_per_token(),
                                       *stats));
    return {};
  }

  /// Synchronises ctx.stream and reports a NaN / infinite router score met by the last forward
  /// on `tokens` tokens in `ws` (numerical_error naming the first such token), or a CUDA error.
  status check_numerics(const context<cuda>& ctx, workspace ws, index_t tokens) const noexcept {
    if (tokens <= 0) return {};
    detail::cuda_backend::layer_buffers b;
    DMOE_TRY(buffers(ws, tokens, b));
    return detail::cuda_backend::read_error(ctx.stream, b, router_type::name);
  }

  /// The routing plan a forward on `tokens` tokens left in `ws` (device pointers; read it after
  /// the stream has passed that forward).
  routing_plan<float> plan(workspace ws, index_t tokens) const noexcept {
    detail::cuda_backend::layer_buffers b;
    if (tokens <= 0 || !buffers(ws, tokens, b).ok()) return routing_plan<float>{0, num_experts(), nullptr, nullptr, nullptr};
    return routing_plan<float>{tokens, num_experts(), b.token_offsets, b.plan_expert, b.plan_weight};
  }

  /// Router scores of that forward (device, tokens x num_experts, fp32): softmax probabilities
  /// (top_k), predicted norms r (dynamic_k) or cosines (top_any).
  matrix_view<const float> scores(workspace ws, index_t tokens) const noexcept {
    detail::cuda_backend::layer_buffers b;
    if (tokens <= 0 || !buffers(ws, tokens, b).ok()) return {};
    return matrix_view<const float>(b.scores, tokens, num_experts());
  }

  /// Gradients of every parameter in device memory, fp32 whatever T is (the CPU layer's
  /// gradients, shaped like the parameters; null arrays where the layer has no such bias).
  struct gradients {
    device_array<float> w1, b1, w2, b2e, b2, router_w, router_b, router_w2;

    /// Copies into the gradients of the CPU twin layer (cold path): waits for ctx.stream first,
    /// so the copy sees a backward enqueued there on a non-blocking stream.
    template <class CpuGradients>
    void download_to(const context<cuda>& ctx, CpuGradients& g) const {
      detail::cuda_backend::throw_on_cuda(cudaStreamSynchronize(ctx.stream), "gradients::download_to: cudaStreamSynchronize");
      copy(w1, g.experts.w1_storage());
      copy(b1, g.experts.b1_storage());
      copy(w2, g.experts.w2_storage());
      copy(b2e, g.experts.expert_bias_storage());
      copy(b2, g.experts.output_bias_storage());
      if constexpr (std::is_same_v<Policy, top_k>) {
        copy(router_w, g.router.weight().data(), g.router.weight().size());
        copy(router_b, g.router.bias().data(), g.router.bias().size());
      } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
        copy(router_w, g.router.w_in().data(), g.router.w_in().size());
        copy(router_w2, g.router.w_out().data(), g.router.w_out().size());
      } else {
        copy(router_w, g.router.weight().data(), g.router.weight().size());
        copy(router_b, g.router.threshold().data(), g.router.threshold().size());
      }
    }

   private:
    static void copy(const device_array<float>& a, std::vector<float>& v) { copy(a, v.data(), static_cast<index_t>(v.size())); }
    static void copy(const device_array<float>& a, float* dst, index_t count) {
      if (static_cast<std::size_t>(count) != a.size())
        detail::raisef(errc::invalid_argument, "moe_layer<cuda>::gradients::download_to: a tensor of %zu elements "
                       "into one of %td (gradients of another shape)", a.size(), count);
      const std::vector<float> h = a.download();
      std::copy(h.begin(), h.end(), dst);
    }
  };

  /// Gradient arrays of this layer's shape (cold path: allocates on the current device; backward
  /// overwrites every element, so they are not cleared).
  gradients make_gradients() const {
    gradients g;
    g.w1 = device_array<float>(w_.w1.size());
    g.b1 = device_array<float>(w_.b1.size());
    g.w2 = device_array<float>(w_.w2.size());
    g.b2e = device_array<float>(w_.b2e.size());
    g.b2 = device_array<float>(w_.b2.size());
    g.router_w = device_array<float>(w_.router_w.size());
    g.router_b = device_array<float>(w_.router_b.size());
    g.router_w2 = device_array<float>(w_.router_w2.size());
    return g;
  }

  /// Bytes of the backward's own scratch (the second workspace of backward) for these bounds:
  /// the same bounds as the forward's workspace_size, so that its rows match the forward's slot
  /// capacity (max_slots for dynamic-k and top-any). fp32 per activation row: 2 d + n + f n.
  std::size_t backward_workspace_size(const workspace_bounds& bw) const {
    throw_if_error(check_tokens("moe_layer<cuda>::backward_workspace_size", bw.max_tokens));
    detail::carver c;
    const index_t slots = fixed_k || bw.max_slots <= 0 ? -1 : bw.max_slots;
    detail::cuda_backend::carve_backward(c, dims(), bw.max_tokens, slots, std::is_same_v<Policy, top_any>);
    if (c.overflowed())
      detail::raisef(errc::invalid_argument, "moe_layer<cuda>::backward_workspace_size: the scratch for %td tokens "
                     "does not fit in size_t", bw.max_tokens);
    return c.bytes();
  }

  /// Backward of the last forward on ctx.stream, as the CPU layer defines it (cpu/moe_layer.hpp):
  /// overwrites `grads` (fp32) and `dx` (T) with dL/dparams and dL/dx for L = <dy, y> (+ sum_i
  /// aux_i * aux loss_i when `aux` is given). Enqueued only: no allocation, no host
  /// synchronisation, capturable in a CUDA graph; every float sum in a fixed order, so the result
  /// is bitwise reproducible.
  /// \param x, ws the input and workspace of that forward, unchanged since (ws holds its plan,
  ///        scores and activations; the device has them once the stream reaches this call). A
  ///        batch the forward refused on the device (beyond the slot bound) gives zero expert
  ///        gradients, as its y was b2.
  /// \param bws at least backward_workspace_size(bounds of that forward) bytes of scratch.
  status backward(const context<cuda>& ctx, matrix_view<const T> x, matrix_view<const T> dy, matrix_view<T> dx,
                  gradients& grads, workspace ws, workspace bws, const aux_losses* aux = nullptr) const noexcept {
    DMOE_TRY(spec::check_backward("moe_layer<cuda>::backward", cfg_, x, dy, dx));
    DMOE_TRY(check_tokens("moe_layer<cuda>::backward", x.rows));
    DMOE_TRY(check_gradients(grads));
    if (aux) DMOE_TRY(check_aux_weights(*aux));
    DMOE_TRY(detail::cuda_backend::check_current_device(w_.device, "moe_layer<cuda>::backward"));
    const index_t tokens = x.rows;
    cudaStream_t stream = ctx.stream;
    detail::cuda_backend::layer_buffers b;
    if (tokens > 0) DMOE_TRY(buffers(ws, tokens, b, true));
    detail::cuda_backend::backward_buffers w;
    {
      detail::carver m;
      detail::cuda_backend::carve_backward(m, dims(), tokens, tokens > 0 ? b.slot_capacity : 0, std::is_same_v<Policy, top_any>);
      if (bws.data == nullptr || bws.bytes < m.bytes())
        return status::failure(errc::workspace_too_small,
                               "moe_layer<cuda>::backward: scratch workspace has %zu bytes at %p, %td tokens need %zu "
                               "(backward_workspace_size)",
                               bws.bytes, bws.data, tokens, m.bytes());
      detail::carver c(detail::carver::align(bws.data));
      w = detail::cuda_backend::carve_backward(c, dims(), tokens, tokens > 0 ? b.slot_capacity : 0,
                                               std::is_same_v<Policy, top_any>);
    }
    const int E = static_cast<int>(num_experts()), mk = static_cast<int>(max_k());
    const index_t d = cfg_.d_model;
    cudaError_t err = cudaSuccess;
    const detail::cuda_backend::expert_grads eg{grads.w1.data(), grads.b1.empty() ? nullptr : grads.b1.data(), grads.w2.data(),
                                                grads.b2e.empty() ? nullptr : grads.b2e.data()};
    if (tokens == 0) {  // expert gradients are sums over no rows; top_any's parameter-only terms remain
      for (auto* a : {&grads.w1, &grads.b1, &grads.w2, &grads.b2e, &grads.b2})
        if (!a->empty() && (err = cudaMemsetAsync(a->data(), 0, a->size() * sizeof(float), stream)) != cudaSuccess)
          return detail::cuda_backend::cuda_failure(err, "moe_layer<cuda>::backward: cudaMemsetAsync");
    } else {
      // combine backward: dL/dw_s per slot
      detail::cuda_backend::slot_weight_grad_kernel<T><<<static_cast<unsigned>(tokens), detail::cuda_backend::combine_threads, 0, stream>>>(
          b, reinterpret_cast<const T*>(b.out), dy.data, dy.row_stride, static_cast<int>(d), mk, w.dweight);
      DMOE_TRY(detail::cuda_backend::launch_check("slot_weight_grad_kernel launch"));
      // experts
      DMOE_TRY((detail::cuda_backend::expert_backward<T, Activation>(x.data, x.row_stride, dy.data, dy.row_stride, b, w,
                                                                    w_.experts(), eg, d, expert_width(), E, stream)));
    }
    // router (and its part of dx)
    const detail::cuda_backend::router_grads rg{grads.router_w.empty() ? nullptr : grads.router_w.data(),
                                                grads.router_b.empty() ? nullptr : grads.router_b.data(),
                                                grads.router_w2.empty() ? nullptr : grads.router_w2.data(),
                                                static_cast<index_t>(grads.router_w.size()),
                                                static_cast<index_t>(grads.router_b.size()),
                                                static_cast<index_t>(grads.router_w2.size())};
    DMOE_TRY((detail::cuda_backend::route_backward<Policy, T>(x.data, x.row_stride, d, num_experts(), max_k(), opt_,
                                                               w_.router(), b, w, aux, rg, stream)));
    if (tokens == 0) return {};
    detail::cuda_backend::input_grad_kernel<T><<<static_cast<unsigned>(tokens), detail::cuda_backend::combine_threads, 0, stream>>>(
        b, w, dx.data, dx.row_stride, static_cast<int>(d), mk);
    DMOE_TRY(detail::cuda_backend::launch_check("input_grad_kernel launch"));
    if (!grads.b2.empty()) {
      detail::cuda_backend::output_bias_grad_kernel<T><<<static_cast<unsigned>(detail::cuda_backend::blocks_for(d, 256)), 256, 0, stream>>>(
          dy.data, dy.row_stride, tokens, static_cast<int>(d), grads.b2.data());
      DMOE_TRY(detail::cuda_backend::launch_check("output_bias_grad_kernel launch"));
    }
    return {};
  }

 private:
  using experts_extent = detail::extent_value<Experts>;
  using width_extent = detail::extent_value<Width>;




  detail::cuda_backend::layer_dims dims() const noexcept {
    detail::cuda_backend::layer_dims dm;
    dm.d = cfg_.d_model;
    dm.E = num_experts();
    dm.n = expert_width();
    dm.f = width_factor<Activation>;
    dm.max_k = max_k();
    dm.router_hidden = std::is_same_v<Policy, dynamic_k> ? cfg_.router_hidden : 0;
    dm.storage_bytes = static_cast<index_t>(sizeof(T));
    return dm;
  }

  /// The layout in `ws` for `tokens` tokens: as many activation rows as the workspace holds (the
  /// device refuses a batch that needs more), the same count for the forward and for the calls
  /// that read its results. A forward of top-k needs all tokens * k rows; reading results (plan,
  /// scores, the error flags, whose offsets do not depend on the rows) needs only the rest.
  /// Bytes of the layout for `tokens` tokens and `slots` activation rows, CUB's temporaries asked
  /// for a sort of `slots` entries; 0 when the size overflows.
  status layout_bytes(index_t tokens, index_t slots, std::size_t& bytes) const noexcept {
    std::size_t sort_bytes = 0, scan_bytes = 0;
    DMOE_TRY(detail::cuda_backend::cub_temp_bytes(slots, tokens, detail::cuda_backend::key_bits(num_experts()), sort_bytes,
                                                  scan_bytes));
    detail::carver m;
    detail::cuda_backend::carve_layer(m, dims(), tokens, sort_bytes, scan_bytes, slots);
    bytes = m.overflowed() ? 0 : m.bytes();
    return {};
  }

  status buffers(workspace ws, index_t tokens, detail::cuda_backend::layer_buffers& b, bool forward = false) const noexcept {
    const index_t items = tokens * max_k();
    const int bits = detail::cuda_backend::key_bits(num_experts());
    std::size_t sort_bytes = 0, scan_bytes = 0;
    DMOE_TRY(detail::cuda_backend::cub_temp_bytes(items, tokens, bits, sort_bytes, scan_bytes));
    detail::carver m;
    detail::cuda_backend::carve_layer(m, dims(), tokens, sort_bytes, scan_bytes, items);
    const std::size_t full = m.overflowed() ? 0 : m.bytes();
    index_t slots = items;
    if (ws.data == nullptr || full == 0 || ws.bytes < full) {  // one CUB size query when the workspace is full-size
      std::size_t least = 0;
      DMOE_TRY(layout_bytes(tokens, 0, least));
      if (ws.data == nullptr || least == 0 || ws.bytes < least || (forward && fixed_k))
        return status::failure(errc::workspace_too_small,
                               "moe_layer<cuda>::forward: workspace has %zu bytes at %p, %td tokens need %zu "
                               "(workspace_size)",
                               ws.bytes, ws.data, tokens, full);
      index_t lo = 0, hi = items;  // largest row count that fits: the size grows with it
      while (hi - lo > 1) {
        const index_t mid = lo + (hi - lo) / 2;
        std::size_t need = 0;
        DMOE_TRY(layout_bytes(tokens, mid, need));
        (need != 0 && need <= ws.bytes ? lo : hi) = mid;
      }
      slots = lo;
      DMOE_TRY(detail::cuda_backend::cub_temp_bytes(slots, tokens, bits, sort_bytes, scan_bytes));
    }
    detail::carver c(detail::carver::align(ws.data));
    b = detail::cuda_backend::carve_layer(c, dims(), tokens, sort_bytes, scan_bytes, slots);
    return {};
  }

  /// The backend's own limit on top of the shared checks: device indices are int32, so
  /// tokens * max(max_k, E, router width, n, d) must stay below 2^31.
  status check_tokens(const char* who, index_t tokens) const noexcept {
    const index_t per_token =
        (std::max)({max_k(), num_experts(), cfg_.router_hidden, expert_width(), cfg_.d_model});
    if (!detail::cuda_backend::fits_int32(tokens, per_token) || tokens > INT32_MAX / 2)
      return status::failure(errc::unsupported,
                             "%s: %td tokens x %td per token exceed the backend's 32-bit indices; split the batch", who,
                             tokens, per_token);
    return {};
  }

  status check_io(matrix_view<const T> x, matrix_view<T> y, const routing_stats* stats) const noexcept {
    DMOE_TRY(spec::check_forward("moe_layer<cuda>::forward", cfg_, x, y, stats));
    DMOE_TRY(check_tokens("moe_layer<cuda>::forward", x.rows));
    // Router products put column tiles on grid.y (at most 65535 blocks of router_tile columns).
    if ((std::max)(num_experts(), cfg_.router_hidden) > index_t{65535} * detail::cuda_backend::router_tile)
      return status::failure(errc::unsupported,
                             "moe_layer<cuda>::forward: %td experts / router width %td exceed the router kernel's "
                             "grid (65535 x %d columns)",
                             num_experts(), cfg_.router_hidden, detail::cuda_backend::router_tile);
    if constexpr (std::is_same_v<Policy, top_any>)
      if (w_.num_active == 0)
        return status::failure(errc::invalid_argument,
                               "top_any route: no active expert (all %td slots masked off); activate at least one "
                               "slot in router().active() and copy_from again",
                               num_experts());
    return {};
  }


  static constexpr bool fixed_k = detail::fixed_k_v<Policy>;

  status check_gradients(const gradients& g) const noexcept {
    const std::size_t have[] = {g.w1.size(), g.b1.size(), g.w2.size(), g.b2e.size(), g.b2.size(),
                                g.router_w.size(), g.router_b.size(), g.router_w2.size()};
    const std::size_t want[] = {w_.w1.size(), w_.b1.size(), w_.w2.size(), w_.b2e.size(), w_.b2.size(),
                                w_.router_w.size(), w_.router_b.size(), w_.router_w2.size()};
    for (int i = 0; i < 8; ++i)
      if (have[i] != want[i])
        return status::failure(errc::invalid_argument,
                               "moe_layer<cuda>::backward: grads tensor %d has %zu elements, the layer's %zu (make "
                               "them with make_gradients())",
                               i, have[i], want[i]);
    return {};
  }

  moe_config cfg_;
  options_type opt_{};
  int sm_count_ = 1;
  detail::cuda_backend::device_weights<T, Policy, Activation> w_;
};

DMOE_NAMESPACE_END  // namespace dmoe
