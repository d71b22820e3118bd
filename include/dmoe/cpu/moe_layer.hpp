// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The dmoe::cpu specialisation of moe_layer: the public API and the orchestration. The work is
/// in rooms that mirror cuda/ (docs/design.md):
///  1. route (cpu/route.hpp): router products per chunk of tokens, per-token selection,
///     compressed plan within the workspace's slot bound;
///  2. dispatch (cpu/dispatch.hpp): counting sort of the plan's slots into expert-major order,
///     stable in token order, and the task list;
///  3. experts (cpu/experts.hpp): per task, the token rows times W1_e, activation, times W2_e;
///  4. combine (cpu/combine.hpp): per token, y = b2 + sum over its slots in slot order of w_s out.
/// infer with infer_precision::bf16 runs 3 and 4 on bf16 matrix tiles (cpu/infer_bf16.hpp).
/// Buffers: cpu/layout.hpp; task cut: cpu/tasks.hpp; checks and FLOPs shared with CUDA:
/// layer/spec.hpp. No heap allocation, no atomics on data, task boundaries independent of the
/// thread count: results are bitwise identical for any executor.

#include <cstdint>
#include <type_traits>

#include "../core/backend.hpp"
#include "../core/extents.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "../experts/infer_precision.hpp"
#include "../experts/weight_storage.hpp"
#include "../layer/moe_layer.hpp"
#include "../layer/parameters.hpp"
#include "../layer/spec.hpp"
#include "../routing/aux_loss.hpp"
#include "../routing/plan.hpp"
#include "../routing/stats.hpp"
#include "combine.hpp"
#include "dispatch.hpp"
#include "experts.hpp"
#include "infer_bf16.hpp"
#include "layout.hpp"
#include "route.hpp"
#include "route_backward.hpp"

DMOE_NAMESPACE_BEGIN

/// MoE layer on the CPU. See layer/moe_layer.hpp for the template parameters.
///
/// Thread safety: const methods (forward) may run concurrently with distinct workspaces.
/// Determinism: output bits do not depend on the executor or its thread count.
template <class T, class Policy, class Activation, std::size_t Experts, std::size_t Width>
class moe_layer<T, cpu, Policy, Activation, Experts, Width>
    : detail::layer_checks<T, Policy, Activation, Experts, Width> {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "dmoe::moe_layer<T, dmoe::cpu, ...>: the CPU backend computes in float or double; for 16-bit "
                "expert weights use moe_layer<float, cpu>::set_weight_storage(dmoe::weight_storage::bf16)");
  using spec = detail::layer_spec<Policy, Activation, Experts, Width>;

 public:
  using scalar_type = T;
  using backend_type = cpu;
  using policy_type = Policy;
  using activation_type = Activation;
  using router_type = typename Policy::template router<T>;
  using options_type = typename Policy::options;

  /// Builds a layer with zero weights (fill them, or call randomize). Throws dmoe::error on a bad
  /// configuration, naming the field, or when the weights cannot be allocated (out_of_memory).
  moe_layer(const moe_config& cfg, const options_type& opt)
      : cfg_(spec::checked_config(cfg, detail::cpu_limits)), experts_(make_shape(cfg_)),
        router_(make_router(cfg_, opt)) {}

  const moe_config& config() const noexcept { return cfg_; }
  index_t d_model() const noexcept { return cfg_.d_model; }
  index_t num_experts() const noexcept { return experts_extent_.value(); }
  index_t expert_width() const noexcept { return width_extent_.value(); }

  expert_weights<T>& experts() noexcept { return experts_; }
  const expert_weights<T>& experts() const noexcept { return experts_; }
  router_type& router() noexcept { return router_; }
  const router_type& router() const noexcept { return router_; }

  /// Seeded random weights for experts and router.
  void randomize(std::uint64_t seed) {
    experts_.randomize(seed);
    router_.randomize(seed ^ 0x5eedULL);
  }

  /// The format the expert products read W1 and W2 in (dmoe::weight_storage; default f32).
  /// With bf16 or f16 the kernels read copies rounded to nearest even (half the bytes per token:
  /// decode, which streams the weights, runs up to twice as fast), widened exactly and accumulated
  /// in float: forward, infer and backward give exactly the bits of a float layer whose W1 and W2
  /// hold the rounded values. The float weights stay the master copy: experts(), optimizers and
  /// IO see them unchanged, and gradients are float. Biases and the router stay float. Memory:
  /// the 16-bit copies of W1, W2, W1^T, W2^T replace the float panels (the same bytes).
  /// Throws dmoe::error: invalid_argument for 16-bit formats on a double layer, out_of_memory.
  /// Cold path (allocates; the next forward packs); not while forward/backward run.
  void set_weight_storage(dmoe::weight_storage s) { packed_.set_storage(s); }
  dmoe::weight_storage weight_storage() const noexcept { return packed_.storage(); }

  /// What infer() may compute with (dmoe::infer_precision; default exact: forward's bits). With
  /// bf16, on a CPU with bf16 matrix tiles (dmoe::cpu_has_bf16_tiles(), active instruction set
  /// avx512), infer rounds x rows, hidden activations, W1 and W2 to bf16 and multiplies on the
  /// tiles in float: not forward's bits (about bf16's precision from them), but deterministic and
  /// batch invariant; elsewhere it stays exact. The layer keeps bf16 tile copies of W1 and W2
  /// (half the bytes of the float weights), repacked on the first infer after a weight change.
  /// forward and backward are unaffected. Throws dmoe::error: invalid_argument on a double layer
  /// or a value that is no infer_precision, out_of_memory. Cold path; not while infer runs.
  void set_infer_precision(dmoe::infer_precision p) {
    if (p != dmoe::infer_precision::exact && p != dmoe::infer_precision::bf16)
      detail::raisef(errc::invalid_argument, "set_infer_precision: %d is not an infer_precision", int(p));
    packed_.set_tiles(p == dmoe::infer_precision::bf16);
  }
  dmoe::infer_precision infer_precision() const noexcept {
    return packed_.tiles_enabled() ? dmoe::infer_precision::bf16 : dmoe::infer_precision::exact;
  }
  /// Whether infer() runs on bf16 tiles now (infer_precision bf16, and the CPU and active
  /// instruction set allow it).
  bool infer_uses_bf16_tiles() const noexcept {
    return packed_.tiles_enabled() && active_cpu_isa() == cpu_isa::avx512 && cpu_has_bf16_tiles();
  }

  /// Multiply-add FLOPs of one (token, expert) slot: 2 d n (2, or 3 if gated).
  double flops_per_slot() const noexcept { return spec::flops_per_slot(cfg_); }

  /// Bytes of workspace forward (and backward) need for these bounds: b.max_tokens tokens,
  /// b.max_threads workers, and b.max_slots (token, expert) slots (0: the policy's worst case
  /// max_tokens * max_k). Depends on the router's max_k: call again after changing the top-k k or
  /// the dynamic-k k_max. Throws dmoe::error(invalid_argument) naming the bounds when the size
  /// does not fit in size_t. docs/training.md gives the bytes per token and per slot.
  std::size_t workspace_size(const workspace_bounds& b) const {
    const index_t threads = b.max_threads < 1 ? 1 : b.max_threads;
    index_t slots = 0;
    bool ovf = !spec::slot_bound(b.max_tokens, router_.max_k(), fixed_k ? 0 : b.max_slots, slots);
    const std::size_t bytes = ovf ? 0 : detail::cpu_backend::layout_bytes<T>(dims(), b.max_tokens, threads, slots, ovf);
    if (ovf || b.max_tokens < 0) throw_if_error(size_overflow("moe_layer::workspace_size", b.max_tokens, threads));
    return bytes;
  }
  /// Workspace size for `max_tokens` with the concurrency of ctx's executor.
  std::size_t workspace_size(const context<cpu>& ctx, index_t max_tokens) const {
    return workspace_size(workspace_bounds{max_tokens, ctx.concurrency()});
  }

  /// y = MoE(x).
  /// \param x (tokens, d_model) input rows; \param y (tokens, d_model) output rows (not aliasing x)
  /// \param ws at least workspace_size({tokens, ctx.concurrency()}) bytes; after the call it holds
  ///        the routing plan (see plan()) and the activations backward needs. For dynamic-k and
  ///        top-any the slot buffers take what the workspace has room for (workspace_bounds::
  ///        max_slots); a batch routing more slots returns errc::workspace_too_small.
  /// \param stats optional; must have been constructed with num_experts().
  status forward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<T> y, workspace ws,
                 routing_stats* stats = nullptr) const noexcept {
    return run_forward("moe_layer::forward", ctx, x, y, ws, stats, true);
  }

  /// y = MoE(x) for inference: the same bits as forward. On one worker the expert outputs are
  /// added into y as they are computed instead of being kept for backward (docs/design.md,
  /// "Fused combine"); on more, the per-expert tasks and the combine run as in forward. The workspace then holds the plan and router scores
  /// (plan(), scores(), aux_loss_values() work) but no expert outputs: backward refuses it.
  /// Arguments as for forward.
  status infer(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<T> y, workspace ws,
               routing_stats* stats = nullptr) const noexcept {
    return run_forward("moe_layer::infer", ctx, x, y, ws, stats, false);
  }

  /// The routing plan a forward on `tokens` tokens left in `ws`.
  routing_plan<T> plan(workspace ws, index_t tokens) const noexcept { return state_buffers(ws, tokens).plan; }

  /// Router scores of the last forward on `tokens` tokens in `ws`, (tokens, num_experts):
  /// softmax probabilities (top_k), predicted norms r (dynamic_k) or cosines (top_any).
  matrix_view<const T> scores(workspace ws, index_t tokens) const noexcept {
    return matrix_view<const T>(state_buffers(ws, tokens).router.scores, tokens, num_experts());
  }

  /// Parameters in a fixed order, for optimizers (train/).
  param_list<T> parameters(param_group group = param_group::all) { return parameters_of(experts_, router_, group); }

  /// Gradients of every parameter, shaped like the parameters themselves.
  struct gradients {
    expert_weights<T> experts;
    router_type router;
    /// Gradient tensors in the order of moe_layer::parameters(group).
    param_list<T> parameters(param_group group = param_group::all) { return parameters_of(experts, router, group); }
  };
  /// Zero gradients of this layer's shape (cold path: allocates).
  gradients make_gradients() const {
    gradients g{expert_weights<T>(experts_.shape()), router_};
    g.router.set_zero();
    return g;
  }

  /// Values of the auxiliary losses for the last forward on `tokens` tokens in `ws` (terms of other
  /// policies are 0).
  aux_losses aux_loss_values(workspace ws, index_t tokens) const noexcept {
    auto b = state_buffers(ws, tokens);
    return detail::cpu_backend::aux_values(router_, b.plan, b.router, b.rgrad.expert_tmp);
  }

  /// Backward of the last forward. Overwrites `grads` and `dx` with dL/dparams and dL/dx for
  /// L = <dy, y> (+ sum_i aux_i * aux loss_i when `aux` is given).
  /// \param x  the same (tokens, d_model) input the forward that filled `ws` saw
  /// \param dy (tokens, d_model) dL/dy; \param dx (tokens, d_model) output, may not alias x or dy
  /// \param ws the workspace of that forward, unchanged since (it holds the plan and activations:
  ///        backward reads it and does not modify the forward state, so it may be called again).
  ///        A workspace that holds no completed forward of this layer object on `tokens` tokens
  ///        under the current options is refused (invalid_argument).
  /// Routing decisions have no gradient; dynamic-k routers get zero gradient (they learn from
  /// their own regression loss, convert/); top-any uses the straight-through rules.
  status backward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<const T> dy, matrix_view<T> dx,
                  gradients& grads, workspace ws, const aux_losses* aux = nullptr) const noexcept {
    DMOE_TRY(spec::check_backward("moe_layer::backward", cfg_, x, dy, dx));
    DMOE_TRY(check_gradients(grads));
    if (aux) DMOE_TRY(check_aux_weights(*aux));
    const index_t tokens = x.rows;
    if (tokens == 0) {
      grads.experts.set_zero();
      grads.router.set_zero();
      if constexpr (std::is_same_v<Policy, top_any>)  // parameter-only terms need no tokens
        detail::cpu_backend::top_any_parameter_terms(router_, aux, grads.router);
      return {};
    }
    detail::cpu_backend::layer_buffers<T> b;
    DMOE_TRY(backward_buffers(ws, tokens, ctx.concurrency(), b));
    // expert_backward overwrites every expert's gradients; the shared output bias accumulates.
    std::fill(grads.experts.output_bias_storage().begin(), grads.experts.output_bias_storage().end(), T(0));
    grads.experts.mark_modified();
    detail::cpu_backend::slot_weight_grads(ctx, dy, b, cfg_.d_model);
    const cpu_isa isa = active_cpu_isa();
    packed_.refresh(experts_, isa, true);  // 16-bit storage: the transposed panels too
    with_panels([&](const auto& p) {
      detail::cpu_backend::expert_backward<Activation>(ctx, isa, x, dy, experts_, p, grads.experts, b);
    });
    detail::cpu_backend::route_backward(router_, x, b.plan, b.router, b.dweight, aux, grads.router, dx, b.rgrad);
    detail::cpu_backend::input_grads(ctx, dx, b, cfg_.d_model);
    detail::cpu_backend::output_bias_grad(
        dy, grads.experts.output_bias_storage().empty() ? nullptr : grads.experts.output_bias_storage().data(),
        cfg_.d_model);
    return {};
  }

 private:
  using experts_extent = detail::extent_value<Experts>;
  using width_extent = detail::extent_value<Width>;
  static constexpr bool fixed_k = detail::fixed_k_v<Policy>;

  static expert_shape make_shape(const moe_config& c) {
    return expert_shape{c.d_model,      c.num_experts,  c.expert_width, Activation::gated,
                        c.hidden_bias, c.expert_bias, c.output_bias};
  }
  static router_type make_router(const moe_config& c, const options_type& opt) {
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      return router_type(c.d_model, c.num_experts, opt, c.router_hidden);
    else
      return router_type(c.d_model, c.num_experts, opt);
  }

  detail::cpu_backend::layer_dims dims() const noexcept {
    return detail::cpu_backend::make_dims<T>(cfg_.d_model, num_experts(), expert_width(), width_factor<Activation>,
                                    router_.max_k(), detail::cpu_backend::router_hidden_width(router_), fixed_k);
  }

  status run_forward(const char* who, const context<cpu>& ctx, matrix_view<const T> x, matrix_view<T> y,
                     workspace ws, routing_stats* stats, bool keep_outputs) const noexcept {
    DMOE_TRY(spec::check_forward(who, cfg_, x, y, stats));
    const index_t tokens = x.rows;
    if (tokens == 0) {
      if (stats) stats->record(routing_plan<T>{0, num_experts(), nullptr, nullptr, nullptr}, flops_per_slot(), 0.0);
      return {};
    }
    detail::cpu_backend::layer_buffers<T> b;
    DMOE_TRY(forward_buffers(who, ws, tokens, ctx.concurrency(), b));
    *b.stamp = stamp(tokens, b.slot_capacity, detail::workspace_stamp::running);  // a failed forward stays so
    DMOE_TRY(detail::cpu_backend::route(ctx, router_, x, b.plan, b.slot_capacity, b.router, b.pack, b.select));
    const index_t n_tasks = detail::cpu_backend::dispatch(b, num_experts());
    const cpu_isa isa = active_cpu_isa();
    if constexpr (std::is_same_v<T, float>) {
      if (!keep_outputs && infer_uses_bf16_tiles()) {
        packed_.refresh_tiles(experts_);  // no-op unless the weights changed
        detail::cpu_backend::infer_on_tiles<Activation>(ctx, isa, x, y, experts_, packed_.tiles(), b, n_tasks,
                                                        detail::cpu_backend::fused_combine_pays(ctx.concurrency()));
        return finish_forward(b, stats, keep_outputs);
      }
    }
    packed_.refresh(experts_, isa);  // no-op unless the weights or the instruction set changed
    // The bits are the same either way; fused_combine_pays says which is faster.
    with_panels([&](const auto& p) {
      if (keep_outputs || !detail::cpu_backend::fused_combine_pays(ctx.concurrency())) {
        detail::cpu_backend::run_experts<Activation>(ctx, isa, x, experts_, p, b, n_tasks);
        detail::cpu_backend::combine(ctx, isa, y, b, cfg_.d_model, experts_.output_bias_ptr());
      } else {
        detail::cpu_backend::experts_combined_in_order<Activation>(isa, x, y, experts_, p, b);
      }
    });
    return finish_forward(b, stats, keep_outputs);
  }
  status finish_forward(const detail::cpu_backend::layer_buffers<T>& b, routing_stats* stats,
                        bool keep_outputs) const noexcept {
    b.stamp->state = keep_outputs ? detail::workspace_stamp::complete : detail::workspace_stamp::inference;
    if (stats) stats->record(b.plan, flops_per_slot(), spec::router_flops_per_token(cfg_));
    return {};
  }

  /// Calls f with the expert panels in the current weight storage (float, bf16 or fp16 panels).
  template <class F>
  void with_panels(F&& f) const noexcept {
    if constexpr (std::is_same_v<T, float>) {
      switch (packed_.storage()) {
        case weight_storage::bf16: f(packed_.template panels<detail::cpu_backend::bf16_t>(experts_)); return;
        case weight_storage::f16: f(packed_.template panels<detail::cpu_backend::f16_t>(experts_)); return;
        case weight_storage::f32: break;
      }
    }
    f(packed_.template panels<T>(experts_));
  }

  status size_overflow(const char* who, index_t tokens, index_t threads) const noexcept {
    return status::failure(errc::invalid_argument,
                           "%s: the workspace for %td tokens (max_k %td, %td experts, d_model %td, width %td, %td "
                           "threads) does not fit in size_t; split the batch",
                           who, tokens, router_.max_k(), num_experts(), cfg_.d_model, expert_width(), threads);
  }

  /// The forward's layout: top-k needs room for tokens * k slots; dynamic-k and top-any take the
  /// largest slot capacity the workspace has room for (route refuses a batch that needs more).
  status forward_buffers(const char* who, workspace ws, index_t tokens, index_t threads,
                         detail::cpu_backend::layer_buffers<T>& b) const noexcept {
    index_t worst = 0;
    if (!spec::slot_bound(tokens, router_.max_k(), 0, worst)) return size_overflow(who, tokens, threads);
    const auto dm = dims();
    bool ovf = false;
    const std::size_t need = detail::cpu_backend::layout_bytes<T>(dm, tokens, threads, worst, ovf);
    const std::size_t least = ovf || fixed_k ? need : detail::cpu_backend::layout_bytes<T>(dm, tokens, threads, 0, ovf);
    if (ovf) return size_overflow(who, tokens, threads);
    if (ws.data == nullptr || ws.bytes < least)
      return status::failure(errc::workspace_too_small,
                             "%s: workspace has %zu bytes at %p, %td tokens with %td threads need %zu (workspace_size)",
                             who, ws.bytes, ws.data, tokens, threads, need);
    const index_t slots = fixed_k ? worst : detail::cpu_backend::fitting_slots<T>(dm, tokens, threads, worst, ws.bytes);
    detail::carver c(detail::carver::align(ws.data));
    b = detail::cpu_backend::carve_layer<T>(c, dm, tokens, threads, slots);
    return {};
  }

  detail::workspace_stamp stamp(index_t tokens, index_t slots, std::uint64_t state) const noexcept {
    const auto dm = dims();
    const index_t key[] = {dm.d, dm.E, dm.n, dm.f, dm.max_k, dm.router_hidden, index_t(sizeof(T))};
    detail::workspace_stamp s;
    s.magic = detail::workspace_stamp::magic_value;
    s.layer = id_.value();
    s.layout = detail::layout_hash(key, sizeof key / sizeof key[0]);
    s.tokens = static_cast<std::uint64_t>(tokens);
    s.slots = static_cast<std::uint64_t>(slots);
    s.state = state;
    return s;
  }

  /// The forward state in `ws`, verified: it must hold a completed forward of this layer object
  /// on `tokens` tokens under the current options, and have room for `threads` workers.
  status backward_buffers(workspace ws, index_t tokens, index_t threads, detail::cpu_backend::layer_buffers<T>& b) const noexcept {
    const std::size_t stamp_bytes = detail::workspace_alignment + sizeof(detail::workspace_stamp);
    if (ws.data == nullptr || ws.bytes < stamp_bytes)
      return status::failure(errc::workspace_too_small,
                             "moe_layer::backward: workspace has %zu bytes at %p: it cannot hold the forward of %td "
                             "tokens",
                             ws.bytes, ws.data, tokens);
    const auto& s = *static_cast<const detail::workspace_stamp*>(detail::carver::align(ws.data));
    if (s.magic != detail::workspace_stamp::magic_value)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the workspace holds no forward (call forward with this workspace "
                             "first)");
    const detail::workspace_stamp want = stamp(tokens, index_t(s.slots), detail::workspace_stamp::complete);
    if (s.layer != want.layer)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the workspace holds a forward of another layer object (pass the "
                             "workspace this layer's forward filled)");
    if (s.layout != want.layout)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the workspace holds a forward under other router options (max_k "
                             "is now %td; run forward again after set_options)",
                             router_.max_k());
    if (s.tokens != want.tokens)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the workspace holds a forward of %llu tokens, backward got %td",
                             static_cast<unsigned long long>(s.tokens), tokens);
    if (s.state == detail::workspace_stamp::inference)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the workspace holds an infer() of %td tokens, which keeps no expert "
                             "outputs; call forward() before backward()",
                             tokens);
    if (s.state != want.state)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the forward that filled the workspace failed (it returned an "
                             "error); its state is unusable");
    bool ovf = false;
    const std::size_t need = detail::cpu_backend::layout_bytes<T>(dims(), tokens, threads, index_t(s.slots), ovf);
    if (ovf) return size_overflow("moe_layer::backward", tokens, threads);
    if (ws.bytes < need)
      return status::failure(errc::workspace_too_small,
                             "moe_layer::backward: workspace has %zu bytes, %td tokens with %td threads need %zu",
                             ws.bytes, tokens, threads, need);
    detail::carver c(detail::carver::align(ws.data));
    b = detail::cpu_backend::carve_layer<T>(c, dims(), tokens, threads, index_t(s.slots));
    return {};
  }

  /// The forward state's pointers for the unchecked accessors (plan, scores, aux_loss_values):
  /// the slot capacity comes from the stamp when this layer wrote it.
  detail::cpu_backend::layer_buffers<T> state_buffers(workspace ws, index_t tokens) const noexcept {
    index_t slots = 0;
    (void)spec::slot_bound(tokens, router_.max_k(), 0, slots);
    if (ws.data && ws.bytes >= detail::workspace_alignment + sizeof(detail::workspace_stamp)) {
      const auto& s = *static_cast<const detail::workspace_stamp*>(detail::carver::align(ws.data));
      if (s.magic == detail::workspace_stamp::magic_value && s.layer == id_.value()) slots = index_t(s.slots);
    }
    detail::carver c(detail::carver::align(ws.data));
    return detail::cpu_backend::carve_layer<T>(c, dims(), tokens, 1, slots);
  }

  status check_gradients(const gradients& g) const noexcept {
    if (g.experts.shape() != experts_.shape() || g.router.d_model() != router_.d_model() ||
        g.router.num_experts() != router_.num_experts())
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: grads have another shape than the layer (make them with "
                             "make_gradients())");
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      if (g.router.hidden() != router_.hidden())
        return status::failure(errc::invalid_argument, "moe_layer::backward: grads router hidden %td, layer %td",
                               g.router.hidden(), router_.hidden());
    return {};
  }

  moe_config cfg_;
  detail::instance_id id_;
  experts_extent experts_extent_{cfg_.num_experts};
  width_extent width_extent_{cfg_.expert_width};
  expert_weights<T> experts_;
  detail::cpu_backend::packed_experts<T> packed_{experts_.shape()};  // the kernels' copy of w1/w2 (experts.hpp)
  router_type router_;
};

DMOE_NAMESPACE_END  // namespace dmoe
