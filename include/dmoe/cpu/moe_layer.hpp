// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// The dmoe::cpu specialisation of moe_layer: Eigen kernels, executor threads.
///
/// forward(x) does, with no heap allocation:
///  1. route: router products per chunk of tokens, per-token selection, compressed plan;
///  2. dispatch: counting sort of the plan's slots into expert-major order, stable in token order;
///  3. experts: tasks of up to rows_per_task rows of one expert: product of the token rows (read
///     in place through the sorted index) with W1_e onto b1_e, activation, product with W2_e onto
///     b2_e, into the slot's row of `out` (cpu/kernels.hpp);
///  4. combine: per token, y = b2 + sum over its slots in slot order of w_s * out[slot].
/// No atomics on data, task boundaries independent of the thread count: results are bitwise
/// identical for any executor. Everything step 3 writes stays in the workspace for backward.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "../core/backend.hpp"
#include "../core/extents.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../experts/activation.hpp"
#include "../experts/expert_weights.hpp"
#include "../layer/moe_layer.hpp"
#include "../routing/plan.hpp"
#include "../routing/stats.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "route.hpp"
#include "route_backward.hpp"
#include "../routing/aux_loss.hpp"
#include "../train/parameters.hpp"

namespace dmoe {
namespace cpu_detail {

/// Applies the activation on one task's rows: post = act(pre) (gated: act(gate) * up).
template <class Act, class T>
void activate_rows(const T* pre, T* post, index_t rows, index_t n, index_t ld) noexcept {
  using Arr = Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Arr, 0, Eigen::OuterStride<>>;
  using MMap = Eigen::Map<Arr, 0, Eigen::OuterStride<>>;
  MMap out(post, rows, n, Eigen::OuterStride<>(ld));
  if constexpr (Act::gated) {
    CMap gate(pre, rows, n, Eigen::OuterStride<>(ld));
    CMap up(pre + n, rows, n, Eigen::OuterStride<>(ld));
    out = gate;
    Act::base::apply_inplace(out);
    out *= up;
  } else {
    out = CMap(pre, rows, n, Eigen::OuterStride<>(ld));
    Act::apply_inplace(out);
  }
}

/// Where every buffer of a layer call lives in the workspace. The same routine computes the
/// size (null base) and the pointers (real base), so they cannot disagree.
template <class T>
struct layer_buffers {
  detail::workspace_stamp* stamp = nullptr;  ///< what forward left here (backward checks it)
  routing_plan<T> plan;
  router_buffers<T> router;
  index_t* expert_offsets = nullptr;  ///< (E + 1) start of each expert's rows in sorted order
  index_t* sorted_token = nullptr;    ///< (nnz_max) token of each sorted row
  index_t* sorted_slot = nullptr;     ///< (nnz_max) plan slot of each sorted row
  index_t* slot_pos = nullptr;        ///< (nnz_max) sorted row of each plan slot
  index_t* task_expert = nullptr;     ///< (max_tasks)
  index_t* task_begin = nullptr;      ///< (max_tasks) first sorted row of the task
  T* hidden = nullptr;                ///< (nnz_max, hidden_ld): [pre-activation (f n) | post (n)]
  T* out = nullptr;                   ///< (nnz_max, d): expert output per sorted row (b2_e included)
  worker_scratch<T> gather;           ///< per worker (rows_per_task, d)
  worker_scratch<T> pack;             ///< per worker GEMM packing panels
  index_t hidden_ld = 0;
  // backward only
  T* dweight = nullptr;               ///< (nnz_max) dL/dw_s
  T* dx_slot = nullptr;               ///< (nnz_max, d) dL/dx through each slot's expert
  worker_scratch<T> bwd;              ///< per worker: g (R d) | dpost (R n) | dpre (R f n)
  router_grad_scratch<T> rgrad;
};

struct layer_dims {
  index_t d = 0, E = 0, n = 0, f = 1, max_k = 0, router_hidden = 0, pack_elems = 0;
};

inline index_t round16(index_t v) noexcept { return (v + 15) / 16 * 16; }

template <class T>
layer_buffers<T> carve_layer(detail::carver& c, const layer_dims& dm, index_t tokens, index_t threads) noexcept {
  layer_buffers<T> b;
  // Every product in checked arithmetic (carver::mul): absurd token counts mark the layout
  // overflowed instead of wrapping to a small size that check_io would accept.
  const index_t nnz_max = c.mul(tokens, dm.max_k);
  const index_t max_tasks = c.add(dm.E, (nnz_max + rows_per_task - 1) / rows_per_task);
  b.stamp = c.take<detail::workspace_stamp>(1);
  b.plan.tokens = tokens;
  b.plan.num_experts = dm.E;
  b.plan.token_offsets = c.take<index_t>(c.add(tokens, 1));
  b.plan.expert = c.take<std::int32_t>(nnz_max);
  b.plan.weight = c.take<T>(nnz_max);
  b.router.scores = c.take<T>(c.mul(tokens, dm.E));
  b.router.hidden = c.take<T>(c.mul(tokens, dm.router_hidden));
  b.router.token_aux = c.take<T>(tokens);
  b.router.expert_aux = c.take<T>(dm.E);
  b.expert_offsets = c.take<index_t>(dm.E + 1);
  b.sorted_token = c.take<index_t>(nnz_max);
  b.sorted_slot = c.take<index_t>(nnz_max);
  b.slot_pos = c.take<index_t>(nnz_max);
  b.task_expert = c.take<index_t>(max_tasks);
  b.task_begin = c.take<index_t>(max_tasks);
  b.hidden_ld = dm.f * dm.n + dm.n;
  b.hidden = c.take<T>(c.mul(nnz_max, b.hidden_ld));
  b.out = c.take<T>(c.mul(nnz_max, dm.d));
  b.gather.stride = round16(rows_per_task * dm.d);
  b.gather.base = c.take<T>(c.mul(threads, b.gather.stride));
  b.pack.stride = round16(dm.pack_elems);
  b.pack.base = c.take<T>(c.mul(threads, b.pack.stride));
  b.dweight = c.take<T>(nnz_max);
  b.dx_slot = c.take<T>(c.mul(nnz_max, dm.d));
  b.bwd.stride = round16(rows_per_task * (dm.d + dm.n + dm.f * dm.n));
  b.bwd.base = c.take<T>(c.mul(threads, b.bwd.stride));
  b.rgrad.dscores = c.take<T>(c.mul(tokens, dm.E));
  b.rgrad.expert_tmp = c.take<T>(4 * dm.E);
  b.rgrad.rows_tmp = c.take<T>(rows_per_task * 2 * dm.E);
  b.rgrad.pack = b.pack.base;  // the router backward runs on the calling thread (worker 0)
  return b;
}

}  // namespace cpu_detail

/// MoE layer on the CPU. See layer/moe_layer.hpp for the template parameters.
///
/// Thread safety: const methods (forward) may run concurrently with distinct workspaces.
/// Determinism: output bits do not depend on the executor or its thread count.
template <class T, class Policy, class Activation, std::size_t Experts, std::size_t Width>
class moe_layer<T, cpu, Policy, Activation, Experts, Width>
    : detail::layer_checks<T, Policy, Activation, Experts, Width> {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "dmoe::moe_layer<T, dmoe::cpu, ...>: the CPU backend computes in float or double; 16-bit "
                "storage types are for the CUDA backend");

 public:
  using scalar_type = T;
  using backend_type = cpu;
  using policy_type = Policy;
  using activation_type = Activation;
  using router_type = typename Policy::template router<T>;
  using options_type = typename Policy::options;

  /// Builds a layer with zero weights (fill them, or call randomize). Throws dmoe::error on a bad
  /// configuration, naming the field.
  moe_layer(const moe_config& cfg, const options_type& opt)
      : cfg_(checked(cfg)), experts_(make_shape(cfg_)), router_(make_router(cfg_, opt)) {}

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

  /// Multiply-add FLOPs of one (token, expert) slot: 2 d n (2, or 3 if gated).
  double flops_per_slot() const noexcept {
    return 2.0 * double(cfg_.d_model) * double(cfg_.expert_width) * (Activation::gated ? 3.0 : 2.0);
  }

  /// Bytes of workspace forward needs for these bounds. Depends on the router's max_k: call again
  /// after changing the top-k k or the dynamic-k k_max. Throws dmoe::error(invalid_argument)
  /// naming the bounds when the size does not fit in size_t.
  std::size_t workspace_size(const workspace_bounds& b) const {
    std::size_t bytes = 0;
    throw_if_error(required_bytes("moe_layer::workspace_size", b.max_tokens, b.max_threads < 1 ? 1 : b.max_threads,
                                  bytes));
    return bytes;
  }
  /// Workspace size for `max_tokens` with the concurrency of ctx's executor.
  std::size_t workspace_size(const context<cpu>& ctx, index_t max_tokens) const {
    return workspace_size(workspace_bounds{max_tokens, ctx.concurrency()});
  }

  /// y = MoE(x).
  /// \param x (tokens, d_model) input rows; \param y (tokens, d_model) output rows (not aliasing x)
  /// \param ws at least workspace_size({tokens, ctx.concurrency()}) bytes; after the call it holds
  ///        the routing plan (see plan()) and the activations backward needs.
  /// \param stats optional; must have been constructed with num_experts().
  status forward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<T> y, workspace ws,
                 routing_stats* stats = nullptr) const noexcept {
    DMOE_TRY(check_io(x, y, ws, ctx.concurrency(), stats));
    const index_t tokens = x.rows;
    if (tokens == 0) {
      if (stats) stats->record(routing_plan<T>{0, num_experts(), nullptr, nullptr, nullptr}, flops_per_slot(), 0.0);
      return {};
    }
    auto b = buffers(ws, tokens, ctx.concurrency());
    *b.stamp = stamp(tokens, detail::workspace_stamp::running);  // a failed forward stays "running"
    DMOE_TRY(cpu_detail::route(ctx, router_, x, b.plan, b.router, b.pack));
    const index_t n_tasks = dispatch(b);
    run_experts(ctx, x, b, n_tasks);
    combine(ctx, y, b);
    b.stamp->state = detail::workspace_stamp::complete;
    if (stats) stats->record(b.plan, flops_per_slot(), router_.flops_per_token());
    return {};
  }

  /// The routing plan a forward on `tokens` tokens left in `ws`.
  routing_plan<T> plan(workspace ws, index_t tokens) const noexcept {
    return buffers(ws, tokens, 1).plan;
  }

  /// Router scores of the last forward on `tokens` tokens in `ws`, (tokens, num_experts):
  /// softmax probabilities (top_k), predicted norms r (dynamic_k) or cosines (top_any).
  matrix_view<const T> scores(workspace ws, index_t tokens) const noexcept {
    return matrix_view<const T>(buffers(ws, tokens, 1).router.scores, tokens, num_experts());
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
    auto b = buffers(ws, tokens, 1);
    return cpu_detail::aux_values(router_, b.plan, b.router, b.rgrad.expert_tmp);
  }

  /// Backward of the last forward. Overwrites `grads` and `dx` with dL/dparams and dL/dx for
  /// L = <dy, y> (+ sum_i aux_i * aux loss_i when `aux` is given).
  /// \param x  the same (tokens, d_model) input the forward that filled `ws` saw
  /// \param dy (tokens, d_model) dL/dy; \param dx (tokens, d_model) output, may not alias x or dy
  /// \param ws the workspace of that forward, unchanged since (it holds the plan and activations:
  ///        backward reads it and does not modify the forward state, so it may be called again)
  /// Routing decisions have no gradient; dynamic-k routers get zero gradient (they learn from
  /// their own regression loss, convert/); top-any uses the straight-through rules.
  status backward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<const T> dy, matrix_view<T> dx,
                  gradients& grads, workspace ws, const aux_losses* aux = nullptr) const noexcept {
    DMOE_TRY(check_backward(x, dy, dx, grads, ws, ctx.concurrency()));
    const index_t tokens = x.rows;
    grads.experts.set_zero();
    if (tokens == 0) {
      grads.router.set_zero();
      if constexpr (std::is_same_v<Policy, top_any>)  // parameter-only terms need no tokens
        cpu_detail::top_any_parameter_terms(router_, aux, grads.router);
      return {};
    }
    auto b = buffers(ws, tokens, ctx.concurrency());
    slot_weight_grads(ctx, dy, b);
    expert_backward(ctx, x, dy, grads.experts, b);
    cpu_detail::route_backward(router_, x, b.plan, b.router, b.dweight, aux, grads.router, dx, b.rgrad);
    input_grads(ctx, dx, b);
    if (T* db2 = grads.experts.output_bias_storage().empty() ? nullptr : grads.experts.output_bias_storage().data())
      for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < cfg_.d_model; ++j) db2[j] += dy(t, j);
    return {};
  }

 private:
  using experts_extent = detail::extent_value<Experts>;
  using width_extent = detail::extent_value<Width>;

  static moe_config checked(const moe_config& c) {
    if (c.d_model <= 0)
      detail::raisef(errc::invalid_argument, "moe_layer: config.d_model must be positive, got %td", c.d_model);
    if (!experts_extent::accepts(c.num_experts) || c.num_experts > INT32_MAX)
      detail::raisef(errc::invalid_argument,
                     "moe_layer: config.num_experts = %td does not fit the layer's Experts extent (%s)",
                     c.num_experts, Experts == dynamic_extent ? "dynamic: must be in [1, 2^31)" : "static");
    if (!width_extent::accepts(c.expert_width))
      detail::raisef(errc::invalid_argument,
                     "moe_layer: config.expert_width = %td does not fit the layer's Width extent (%s)",
                     c.expert_width, Width == dynamic_extent ? "dynamic: must be positive" : "static");
    if (std::is_same_v<Policy, dynamic_k> && c.router_hidden <= 0)
      detail::raisef(errc::invalid_argument, "moe_layer: config.router_hidden must be positive, got %td",
                     c.router_hidden);
    return c;
  }
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

  cpu_detail::layer_dims dims() const noexcept {
    cpu_detail::layer_dims dm;
    dm.d = cfg_.d_model;
    dm.E = num_experts();
    dm.n = expert_width();
    dm.f = width_factor<Activation>;
    dm.max_k = router_.max_k();
    dm.router_hidden = cpu_detail::router_hidden_width(router_);
    const index_t R = cpu_detail::rows_per_task, fn = dm.f * dm.n;
    dm.pack_elems = (std::max)({cpu_detail::router_pack_elems<T>(dm.d, dm.E, dm.router_hidden),
                              // forward products
                              cpu_detail::plan_gemm<T>(R, fn, dm.d).pack_elems(),
                              cpu_detail::plan_gemm<T>(R, dm.d, dm.n).pack_elems(),
                              // backward products
                              cpu_detail::plan_gemm<T>(R, dm.n, dm.d).pack_elems(),
                              cpu_detail::plan_gemm<T>(dm.d, dm.n, R).pack_elems(),
                              cpu_detail::plan_gemm<T>(fn, dm.d, R).pack_elems(),
                              cpu_detail::plan_gemm<T>(R, dm.d, fn).pack_elems()});
    cpu_detail::router_grad_shapes<T>(dm.d, dm.E, dm.pack_elems);
    return dm;
  }

  /// Workspace bytes for `tokens` tokens and `threads` workers, or an error naming `who` and the
  /// numbers when the size does not fit in size_t.
  status required_bytes(const char* who, index_t tokens, index_t threads, std::size_t& bytes) const noexcept {
    detail::carver c;
    cpu_detail::carve_layer<T>(c, dims(), tokens, threads);
    bytes = c.bytes();
    if (c.overflowed() || tokens < 0)
      return status::failure(errc::invalid_argument,
                             "%s: the workspace for %td tokens (max_k %td, %td experts, d_model %td, width %td, %td "
                             "threads) does not fit in size_t; split the batch",
                             who, tokens, router_.max_k(), num_experts(), cfg_.d_model, expert_width(), threads);
    return {};
  }

  detail::workspace_stamp stamp(index_t tokens, std::uint64_t state) const noexcept {
    const auto dm = dims();
    return detail::workspace_stamp{detail::workspace_stamp::magic_value, id_.value(),
                                   detail::layout_hash({dm.d, dm.E, dm.n, dm.f, dm.max_k, dm.router_hidden,
                                                        index_t(sizeof(T))}),
                                   static_cast<std::uint64_t>(tokens), state};
  }

  /// Refuses a workspace that does not hold a completed forward of this layer on `tokens` tokens.
  status check_stamp(const detail::workspace_stamp& s, index_t tokens) const noexcept {
    const detail::workspace_stamp want = stamp(tokens, detail::workspace_stamp::complete);
    if (s.magic != want.magic)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the workspace holds no forward (call forward with this workspace "
                             "first)");
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
    if (s.state != want.state)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: the forward that filled the workspace failed (it returned an "
                             "error); its state is unusable");
    return {};
  }

  cpu_detail::layer_buffers<T> buffers(workspace ws, index_t tokens, index_t threads) const noexcept {
    detail::carver c(detail::carver::align(ws.data));
    return cpu_detail::carve_layer<T>(c, dims(), tokens, threads);
  }

  status check_io(matrix_view<const T> x, matrix_view<T> y, workspace ws, index_t threads,
                  const routing_stats* stats) const noexcept {
    const index_t d = cfg_.d_model;
    if (x.cols != d)
      return status::failure(errc::invalid_argument, "moe_layer::forward: x is (%td x %td), expected %td columns (d_model)",
                             x.rows, x.cols, d);
    if (y.rows != x.rows || y.cols != d)
      return status::failure(errc::invalid_argument,
                             "moe_layer::forward: y is (%td x %td), expected (%td x %td) to match x (tokens x d_model)",
                             y.rows, y.cols, x.rows, d);
    if (x.rows < 0) return status::failure(errc::invalid_argument, "moe_layer::forward: x has %td rows", x.rows);
    if (x.rows > 0 && (x.data == nullptr || y.data == nullptr))
      return status::failure(errc::invalid_argument, "moe_layer::forward: %s is a null pointer with %td rows",
                             x.data == nullptr ? "x" : "y", x.rows);
    if (x.row_stride < d || y.row_stride < d)
      return status::failure(errc::invalid_argument,
                             "moe_layer::forward: row strides must be >= d_model = %td, got x %td, y %td", d,
                             x.row_stride, y.row_stride);
    if (x.rows > 0 && static_cast<const void*>(x.data) == static_cast<const void*>(y.data))
      return status::failure(errc::invalid_argument, "moe_layer::forward: y must not alias x");
    if (stats && stats->num_experts() != num_experts())
      return status::failure(errc::invalid_argument,
                             "moe_layer::forward: stats was made for %td experts, the layer has %td "
                             "(construct routing_stats(layer.num_experts()))",
                             stats->num_experts(), num_experts());
    if (x.rows == 0) return {};
    std::size_t need = 0;
    DMOE_TRY(required_bytes("moe_layer::forward", x.rows, threads, need));
    if (ws.data == nullptr || ws.bytes < need)
      return status::failure(errc::workspace_too_small,
                             "moe_layer::forward: workspace has %zu bytes at %p, %td tokens with %td threads need "
                             "%zu (workspace_size)",
                             ws.bytes, ws.data, x.rows, threads, need);
    return {};
  }

  /// Counting sort of the plan's slots by expert, stable in token order; then the task list.
  /// Returns the number of tasks.
  index_t dispatch(cpu_detail::layer_buffers<T>& b) const noexcept {
    const index_t E = num_experts(), tokens = b.plan.tokens;
    index_t* off = b.expert_offsets;
    std::fill(off, off + E + 1, index_t{0});
    const index_t nnz = b.plan.nnz();
    for (index_t s = 0; s < nnz; ++s) ++off[b.plan.expert[s] + 1];
    for (index_t e = 0; e < E; ++e) off[e + 1] += off[e];
    // Reuse task_begin as the per-expert cursor (it has >= E entries), then build the tasks.
    index_t* cursor = b.task_begin;
    std::copy(off, off + E, cursor);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s) {
        const index_t pos = cursor[b.plan.expert[s]]++;
        b.sorted_token[pos] = t;
        b.sorted_slot[pos] = s;
        b.slot_pos[s] = pos;
      }
    index_t n_tasks = 0;
    for (index_t e = 0; e < E; ++e)
      for (index_t r = off[e]; r < off[e + 1]; r += cpu_detail::rows_per_task) {
        b.task_expert[n_tasks] = e;
        b.task_begin[n_tasks] = r;
        ++n_tasks;
      }
    return n_tasks;
  }

  void run_experts(const context<cpu>& ctx, matrix_view<const T> x, const cpu_detail::layer_buffers<T>& b,
                   index_t n_tasks) const noexcept {
    const index_t d = cfg_.d_model, n = expert_width(), fn = width_factor<Activation> * n, ld = b.hidden_ld;
    const auto blk1 = cpu_detail::plan_gemm<T>(cpu_detail::rows_per_task, fn, d);
    const auto blk2 = cpu_detail::plan_gemm<T>(cpu_detail::rows_per_task, d, n);
    ctx.parallel_for(n_tasks, [&](index_t task, index_t worker) noexcept {
      const index_t e = b.task_expert[task], r0 = b.task_begin[task];
      const index_t rows = (std::min)(cpu_detail::rows_per_task, b.expert_offsets[e + 1] - r0);
      T* pre = b.hidden + r0 * ld;
      T* post = pre + fn;
      const cpu_detail::product_scratch<T> scratch1{b.gather.get(worker), b.pack.get(worker), blk1};
      const cpu_detail::product_scratch<T> scratch2{nullptr, b.pack.get(worker), blk2};
      cpu_detail::init_rows_with(pre, rows, fn, ld, experts_.b1_ptr(e));
      cpu_detail::product_nt<T>(rows, fn, d, {x.data, x.row_stride, b.sorted_token + r0}, experts_.w1_ptr(e), d, pre,
                                ld, scratch1);
      cpu_detail::activate_rows<Activation>(pre, post, rows, n, ld);
      T* out = b.out + r0 * d;
      cpu_detail::init_rows_with(out, rows, d, d, experts_.b2e_ptr(e));
      cpu_detail::product_nt<T>(rows, d, n, {post, ld, nullptr}, experts_.w2_ptr(e), n, out, d, scratch2);
    });
  }

  void combine(const context<cpu>& ctx, matrix_view<T> y, const cpu_detail::layer_buffers<T>& b) const noexcept {
    const index_t d = cfg_.d_model, tokens = b.plan.tokens;
    const T* b2 = experts_.output_bias_ptr();
    using Row = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
    using CRow = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
    const index_t tasks = (tokens + cpu_detail::rows_per_task - 1) / cpu_detail::rows_per_task;
    ctx.parallel_for(tasks, [&](index_t task, index_t) noexcept {
      const index_t t0 = task * cpu_detail::rows_per_task, t1 = (std::min)(tokens, t0 + cpu_detail::rows_per_task);
      for (index_t t = t0; t < t1; ++t) {
        Row yt(y.row(t), d);
        if (b2)
          yt = CRow(b2, d);
        else
          yt.setZero();
        for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s)
          yt += b.plan.weight[s] * CRow(b.out + b.slot_pos[s] * d, d);
      }
    });
  }

  status check_backward(matrix_view<const T> x, matrix_view<const T> dy, matrix_view<T> dx, const gradients& g,
                        workspace ws, index_t threads) const noexcept {
    const index_t d = cfg_.d_model;
    if (x.cols != d || dy.cols != d || dx.cols != d || dy.rows != x.rows || dx.rows != x.rows)
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: x (%td x %td), dy (%td x %td) and dx (%td x %td) must all be "
                             "(tokens x d_model = %td)",
                             x.rows, x.cols, dy.rows, dy.cols, dx.rows, dx.cols, d);
    if (x.rows > 0 && (!x.data || !dy.data || !dx.data))
      return status::failure(errc::invalid_argument, "moe_layer::backward: %s is a null pointer",
                             !x.data ? "x" : (!dy.data ? "dy" : "dx"));
    if (x.row_stride < d || dy.row_stride < d || dx.row_stride < d)
      return status::failure(errc::invalid_argument, "moe_layer::backward: row strides must be >= d_model = %td", d);
    if (x.rows > 0 && (static_cast<const void*>(dx.data) == static_cast<const void*>(x.data) ||
                       static_cast<const void*>(dx.data) == static_cast<const void*>(dy.data)))
      return status::failure(errc::invalid_argument, "moe_layer::backward: dx must not alias x or dy");
    if (g.experts.shape() != experts_.shape() || g.router.d_model() != router_.d_model() ||
        g.router.num_experts() != router_.num_experts())
      return status::failure(errc::invalid_argument,
                             "moe_layer::backward: grads have another shape than the layer (make them with "
                             "make_gradients())");
    if constexpr (std::is_same_v<Policy, dynamic_k>)
      if (g.router.hidden() != router_.hidden())
        return status::failure(errc::invalid_argument, "moe_layer::backward: grads router hidden %td, layer %td",
                               g.router.hidden(), router_.hidden());
    if (x.rows == 0) return {};
    std::size_t need = 0;
    DMOE_TRY(required_bytes("moe_layer::backward", x.rows, threads, need));
    if (ws.data == nullptr || ws.bytes < need)
      return status::failure(errc::workspace_too_small,
                             "moe_layer::backward: workspace has %zu bytes, %td tokens with %td threads need %zu",
                             ws.bytes, x.rows, threads, need);
    return check_stamp(*buffers(ws, x.rows, threads).stamp, x.rows);
  }

  /// dL/dw_s = <dy_t, y_e(x_t)> for every slot (the combine weights' gradient).
  void slot_weight_grads(const context<cpu>& ctx, matrix_view<const T> dy, const cpu_detail::layer_buffers<T>& b) const noexcept {
    const index_t d = cfg_.d_model, tokens = b.plan.tokens;
    const index_t tasks = (tokens + cpu_detail::rows_per_task - 1) / cpu_detail::rows_per_task;
    ctx.parallel_for(tasks, [&](index_t task, index_t) noexcept {
      const index_t t0 = task * cpu_detail::rows_per_task, t1 = (std::min)(tokens, t0 + cpu_detail::rows_per_task);
      for (index_t t = t0; t < t1; ++t)
        for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s) {
          const T* o = b.out + b.slot_pos[s] * d;
          const T* g = dy.row(t);
          T acc = 0;
          for (index_t j = 0; j < d; ++j) acc += g[j] * o[j];
          b.dweight[s] = acc;
        }
    });
  }

  /// Expert parameter gradients and dx per slot. One task per expert owns that expert's gradients,
  /// so no reduction crosses threads; rows are visited in sorted order in chunks of rows_per_task.
  void expert_backward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<const T> dy,
                       expert_weights<T>& g, const cpu_detail::layer_buffers<T>& b) const noexcept {
    const index_t d = cfg_.d_model, n = expert_width(), fn = width_factor<Activation> * n, ld = b.hidden_ld;
    const index_t R = cpu_detail::rows_per_task;
    using cpu_detail::order;
    const auto blk_dpost = cpu_detail::plan_gemm<T>(R, n, d), blk_dw2 = cpu_detail::plan_gemm<T>(d, n, R);
    const auto blk_dw1 = cpu_detail::plan_gemm<T>(fn, d, R), blk_dx = cpu_detail::plan_gemm<T>(R, d, fn);
    ctx.parallel_for(num_experts(), [&](index_t e, index_t worker) noexcept {
      T* gbuf = b.bwd.get(worker);  // w_s * dy_t rows, then gathered x rows
      T* dpost = gbuf + R * d;
      T* dpre = dpost + R * n;
      T* pack = b.pack.get(worker);
      T* gw1 = g.w1_ptr(e);
      T* gw2 = g.w2_ptr(e);
      T* gb1 = g.b1_ptr(e);
      T* gb2e = g.b2e_ptr(e);
      for (index_t r0 = b.expert_offsets[e]; r0 < b.expert_offsets[e + 1]; r0 += R) {
        const index_t rows = (std::min)(R, b.expert_offsets[e + 1] - r0);
        const T* pre = b.hidden + r0 * ld;
        const T* post = pre + fn;
        for (index_t i = 0; i < rows; ++i) {
          const T w = b.plan.weight[b.sorted_slot[r0 + i]];
          const T* src = dy.row(b.sorted_token[r0 + i]);
          T* dst = gbuf + i * d;
          for (index_t j = 0; j < d; ++j) dst[j] = w * src[j];
          if (gb2e)
            for (index_t j = 0; j < d; ++j) gb2e[j] += dst[j];
        }
        // dpost = g W2^T; dW2^T += g^T post (W2 is stored as its transpose, row-major d x n).
        std::fill(dpost, dpost + rows * n, T(0));
        cpu_detail::gemm<order::row_major, order::row_major>(rows, n, d, gbuf, d, experts_.w2_ptr(e), n, dpost, n,
                                                             blk_dpost, pack);
        cpu_detail::gemm<order::col_major, order::row_major>(d, n, rows, gbuf, d, post, ld, gw2, n, blk_dw2, pack);
        activation_backward(pre, ld, dpost, dpre, rows, n);
        if (gb1)
          for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < fn; ++j) gb1[j] += dpre[i * fn + j];
        // dW1^T += dpre^T x (W1 stored as its transpose, row-major f n x d); dx_slot = dpre W1^T.
        for (index_t i = 0; i < rows; ++i) {
          const T* src = x.row(b.sorted_token[r0 + i]);
          std::copy(src, src + d, gbuf + i * d);
        }
        cpu_detail::gemm<order::col_major, order::row_major>(fn, d, rows, dpre, fn, gbuf, d, gw1, d, blk_dw1, pack);
        T* dxs = b.dx_slot + r0 * d;
        std::fill(dxs, dxs + rows * d, T(0));
        cpu_detail::gemm<order::row_major, order::row_major>(rows, d, fn, dpre, fn, experts_.w1_ptr(e), d, dxs, d,
                                                             blk_dx, pack);
      }
    });
  }

  /// dpre from dpost: act'(pre) elementwise, or for gated units d gate = dpost up base'(gate),
  /// d up = dpost base(gate).
  static void activation_backward(const T* pre, index_t ld, const T* dpost, T* dpre, index_t rows, index_t n) noexcept {
    for (index_t i = 0; i < rows; ++i) {
      const T* p = pre + i * ld;
      const T* dp = dpost + i * n;
      if constexpr (Activation::gated) {
        using B = typename Activation::base;
        T* dg = dpre + i * 2 * n;
        T* du = dg + n;
        for (index_t j = 0; j < n; ++j) {
          dg[j] = dp[j] * p[n + j] * B::derivative(p[j]);
          du[j] = dp[j] * B::apply(p[j]);
        }
      } else {
        T* dq = dpre + i * n;
        for (index_t j = 0; j < n; ++j) dq[j] = dp[j] * Activation::derivative(p[j]);
      }
    }
  }

  /// dx_t (holding the router's part) += the slots' parts in slot order.
  void input_grads(const context<cpu>& ctx, matrix_view<T> dx, const cpu_detail::layer_buffers<T>& b) const noexcept {
    const index_t d = cfg_.d_model, tokens = b.plan.tokens;
    const index_t tasks = (tokens + cpu_detail::rows_per_task - 1) / cpu_detail::rows_per_task;
    ctx.parallel_for(tasks, [&](index_t task, index_t) noexcept {
      const index_t t0 = task * cpu_detail::rows_per_task, t1 = (std::min)(tokens, t0 + cpu_detail::rows_per_task);
      for (index_t t = t0; t < t1; ++t) {
        T* o = dx.row(t);
        for (index_t s = b.plan.token_offsets[t]; s < b.plan.token_offsets[t + 1]; ++s) {
          const T* src = b.dx_slot + b.slot_pos[s] * d;
          for (index_t j = 0; j < d; ++j) o[j] += src[j];
        }
      }
    });
  }

  moe_config cfg_;
  detail::instance_id id_;
  experts_extent experts_extent_{cfg_.num_experts};
  width_extent width_extent_{cfg_.expert_width};
  expert_weights<T> experts_;
  router_type router_;
};

}  // namespace dmoe
