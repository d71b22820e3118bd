// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Expert parallelism on the CPU: the E experts of a layer split over the R ranks of a
/// communicator in contiguous ranges (rank r owns [r E / R, (r + 1) E / R), so uneven E / R is
/// fine), the router replicated. Protocol of one forward (docs/distributed.md):
///  1. every rank routes its own tokens (cpu/route.hpp) and sorts its slots expert-major
///     (cpu/dispatch.hpp), exactly as the single-process layer does;
///  2. header exchange: every rank sends every rank its status and its per-expert slot counts
///     (E + 2 integers). A rank whose input or routing failed says so here, and every rank returns
///     an error naming it, instead of the others waiting in the next exchange;
///  3. all-to-all-v of the slots' token rows to the experts' owners (no padding, no dropped slot);
///  4. the owner runs its experts (cpu/experts.hpp) on the received rows grouped by expert, in
///     (source rank, token) order;
///  5. the reverse all-to-all-v returns each slot's expert output to the token's home rank, into
///     the position the single-process layer's sorted buffer has, and the combine
///     (cpu/combine.hpp) runs there in the plan's slot order.
/// Why the bits equal the single-process layer's on the concatenation of the ranks' batches (in
/// rank order): the expert products are batch invariant (one in-order FMA chain per element,
/// cpu/detail/panel_kernels.hpp), so a row's output does not depend on the rows beside it; the
/// owner's rows of an expert come in (rank, token) order, which is the global token order, so
/// the per-expert weight-gradient sums (one FMA chain per element over the expert's rows in
/// order, however they are cut into blocks) see the same rows in the same order; the combine and
/// dx sums run per token in slot order on the home rank.
/// Backward: g = w_s dy_t goes to the owner (forward direction), dx per slot comes back (reverse
/// direction); the router gradients (and top-any thresholds) are replicated parameters whose
/// single-process sums run over all tokens in token order with batch-wide statistics (load
/// balance counts, top-any balance terms), so every rank gathers the router's inputs (x, scores,
/// plan, dL/dw_s) of all ranks in rank order and runs the single-process router backward on the
/// whole batch: the same sums in the same order, on every rank. The shared output bias db2 is a
/// chain over tokens: it is passed from rank to rank in rank order.
///
/// Every call is collective over the communicator. Not thread safe; one forward's state is kept
/// in the object for its backward. Allocates (per call) on the host heap, unlike moe_layer.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/backend.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../cpu/combine.hpp"
#include "../cpu/dispatch.hpp"
#include "../cpu/experts.hpp"
#include "../cpu/layout.hpp"
#include "../cpu/moe_layer.hpp"
#include "../cpu/route.hpp"
#include "../cpu/route_backward.hpp"
#include "../experts/expert_weights.hpp"
#include "../layer/parameters.hpp"
#include "../routing/aux_loss.hpp"
#include "communicator.hpp"

DMOE_NAMESPACE_BEGIN

namespace detail::parallel {

/// First expert of rank r when E experts are split over R ranks in contiguous ranges.
inline index_t first_expert(index_t E, int R, int r) noexcept { return index_t(r) * E / index_t(R); }

/// A copy of experts [first, first + count) of w (the shared output bias comes along).
template <class T>
expert_weights<T> slice_experts(const expert_weights<T>& w, index_t first, index_t count) {
  expert_shape s = w.shape();
  s.num_experts = count;
  expert_weights<T> out(s);
  const index_t w1 = s.d_model * s.first_width(), w2 = s.width * s.d_model;
  std::copy(w.w1_ptr(first), w.w1_ptr(first) + count * w1, out.w1_storage().begin());
  std::copy(w.w2_ptr(first), w.w2_ptr(first) + count * w2, out.w2_storage().begin());
  if (s.hidden_bias) std::copy(w.b1_ptr(first), w.b1_ptr(first) + count * s.first_width(), out.b1_storage().begin());
  if (s.expert_bias) std::copy(w.b2e_ptr(first), w.b2e_ptr(first) + count * s.d_model, out.expert_bias_storage().begin());
  out.output_bias_storage() = w.output_bias_storage();
  return out;
}

/// Rows src[index[i]] (d values each, row stride ld) to dst row i, for i < rows.
template <class T>
void gather_rows(const T* src, index_t ld, const index_t* index, index_t rows, index_t d, T* dst) noexcept {
  for (index_t i = 0; i < rows; ++i) std::copy(src + index[i] * ld, src + index[i] * ld + d, dst + i * d);
}

inline std::vector<std::size_t> bytes_of(const std::vector<index_t>& rows, std::size_t row_bytes) {
  std::vector<std::size_t> out(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) out[i] = static_cast<std::size_t>(rows[i]) * row_bytes;
  return out;
}

}  // namespace detail::parallel

/// A MoE layer whose experts are spread over the ranks of a communicator (see the file comment).
template <class T, class Policy, class Activation>
class expert_parallel_layer {
  using single_layer = moe_layer<T, cpu, Policy, Activation>;
  static constexpr bool fixed_k = detail::fixed_k_v<Policy>;

 public:
  using scalar_type = T;
  using router_type = typename single_layer::router_type;

  /// Rank comm.rank()'s part of `full` (which every rank builds alike, e.g. from the same seed or
  /// file): the router and the shared output bias, replicated, and its range of experts.
  /// Collective: the ranks exchange hashes of their configuration and of their replicated
  /// weights (router, output bias, `weights_version`); any difference throws dmoe::error
  /// (invalid_argument) on every rank, naming the ranks. Also throws when there are fewer
  /// experts than ranks.
  template <std::size_t Ex, std::size_t Wd>
  expert_parallel_layer(communicator& comm, const moe_layer<T, cpu, Policy, Activation, Ex, Wd>& full,
                        std::uint64_t weights_version = 0)
      : comm_(&comm), cfg_(full.config()), E_(full.num_experts()), router_(full.router()),
        local_(slice(comm, full)), packed_(local_.shape()) {
    first_ = detail::parallel::first_expert(E_, comm.size(), comm.rank());
    check_same_setup(weights_version);
  }

  int rank() const noexcept { return comm_->rank(); }
  int ranks() const noexcept { return comm_->size(); }
  index_t num_experts() const noexcept { return E_; }
  index_t d_model() const noexcept { return cfg_.d_model; }
  /// Experts [first_expert(), first_expert() + local_experts().num_experts()) live on this rank.
  index_t first_expert() const noexcept { return first_; }
  index_t first_expert_of(int r) const noexcept { return detail::parallel::first_expert(E_, ranks(), r); }
  expert_weights<T>& local_experts() noexcept { return local_; }
  const expert_weights<T>& local_experts() const noexcept { return local_; }
  router_type& router() noexcept { return router_; }
  const router_type& router() const noexcept { return router_; }

  /// Gradients this rank holds: its experts' (local shape) and the replicated router's (the same
  /// on every rank after backward).
  struct gradients {
    expert_weights<T> experts;
    router_type router;
    param_list<T> parameters(param_group group = param_group::all) { return parameters_of(experts, router, group); }
  };
  gradients make_gradients() const {
    gradients g{expert_weights<T>(local_.shape()), router_};
    g.router.set_zero();
    return g;
  }
  /// This rank's parameters (its experts, then the router), in the order of gradients::parameters.
  param_list<T> parameters(param_group group = param_group::all) { return parameters_of(local_, router_, group); }

  /// Bytes this rank sent in the last forward's row exchange (token rows to the owners).
  std::size_t last_sent_bytes() const noexcept { return sent_bytes_; }

  /// y = MoE(x) for this rank's tokens (x may have zero rows). Collective.
  status forward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<T> y) noexcept {
    try {
      return forward_impl(ctx, x, y);
    } catch (const error& e) {
      return status::failure(e.code(), "expert_parallel_layer::forward: %s", e.what());
    } catch (const std::exception& e) {
      return status::failure(errc::out_of_memory, "expert_parallel_layer::forward: %s", e.what());
    }
  }

  /// Backward of the last forward (same x), L = <dy, y> (+ aux terms): this rank's expert
  /// gradients, the router's (summed over all ranks' tokens, identical on every rank), the
  /// shared output bias's (the same on every rank) and dx for this rank's tokens. Collective.
  status backward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<const T> dy, matrix_view<T> dx,
                  gradients& grads, const aux_losses* aux = nullptr) noexcept {
    try {
      return backward_impl(ctx, x, dy, dx, grads, aux);
    } catch (const error& e) {
      return status::failure(e.code(), "expert_parallel_layer::backward: %s", e.what());
    } catch (const std::exception& e) {
      return status::failure(errc::out_of_memory, "expert_parallel_layer::backward: %s", e.what());
    }
  }

 private:
  using buffers = detail::cpu_backend::layer_buffers<T>;

  template <class Full>
  static expert_weights<T> slice(communicator& comm, const Full& full) {
    const index_t E = full.num_experts();
    if (E < comm.size())
      detail::raisef(errc::invalid_argument,
                     "expert_parallel_layer: %td experts cannot be split over %d ranks (every rank owns at least "
                     "one expert)",
                     E, comm.size());
    const index_t a = detail::parallel::first_expert(E, comm.size(), comm.rank());
    const index_t b = detail::parallel::first_expert(E, comm.size(), comm.rank() + 1);
    return detail::parallel::slice_experts(full.experts(), a, b - a);
  }

  /// Setup hash exchange: configuration and replicated weights must agree on every rank.
  void check_same_setup(std::uint64_t weights_version) {
    detail::parallel::fnv1a c, w;
    const index_t key[] = {cfg_.d_model, E_, cfg_.expert_width, detail::cpu_backend::router_hidden_width(router_),
                           router_.max_k(), index_t(sizeof(T)), index_t(cfg_.hidden_bias), index_t(cfg_.expert_bias),
                           index_t(cfg_.output_bias), index_t(Activation::gated)};
    c.bytes(key, sizeof key);
    c.bytes(Policy::template router<T>::name, std::strlen(Policy::template router<T>::name));
    c.bytes(Activation::name, std::strlen(Activation::name));
    param_list<T> ps;
    detail::add_router_params(ps, router_);
    for (const auto& p : ps) w.bytes(p.data, static_cast<std::size_t>(p.size) * sizeof(T));
    w.bytes(local_.output_bias_storage().data(), local_.output_bias_storage().size() * sizeof(T));
    w.value(weights_version);
    const std::uint64_t mine[2] = {c.h, w.h};
    std::vector<std::uint64_t> all(static_cast<std::size_t>(2 * ranks()));
    throw_if_error(detail::parallel::allgather(*comm_, mine, 2, all.data()));
    for (int which = 0; which < 2; ++which) {
      std::string bad;
      for (int q = 1; q < ranks(); ++q)
        if (all[static_cast<std::size_t>(2 * q + which)] != all[static_cast<std::size_t>(which)]) bad += " " + std::to_string(q);
      if (!bad.empty())
        detail::raisef(errc::invalid_argument,
                       "expert_parallel_layer: rank(s)%s %s rank 0's (setup hash exchange on rank %d of %d); build "
                       "every rank's layer from the same configuration and weights",
                       bad.c_str(),
                       which == 0 ? "have another layer configuration (shape, policy, k, activation or scalar) than"
                                  : "have other replicated weights (router, output bias) or weights_version than",
                       rank(), ranks());
    }
  }

  detail::cpu_backend::layer_dims home_dims() const {
    return detail::cpu_backend::make_dims<T>(cfg_.d_model, E_, cfg_.expert_width, width_factor<Activation>,
                                             router_.max_k(), detail::cpu_backend::router_hidden_width(router_),
                                             fixed_k);
  }

  static buffers carve(workspace_buffer& ws, const detail::cpu_backend::layer_dims& dm, index_t tokens,
                       index_t threads, index_t slots) {
    bool ovf = false;
    const std::size_t need = detail::cpu_backend::layout_bytes<T>(dm, tokens, threads, slots, ovf);
    if (ovf)
      detail::raisef(errc::invalid_argument, "%td tokens, %td slots: the buffers do not fit in size_t", tokens, slots);
    ws.resize(need + detail::workspace_alignment);
    detail::carver c(detail::carver::align(ws.view().data));
    return detail::cpu_backend::carve_layer<T>(c, dm, tokens, threads, slots);
  }

  /// Header exchange: every rank's status code, token count and per-expert counts (E + 2 values).
  /// Returns a failure on every rank if any rank failed.
  status exchange_header(const char* who, const status& local, index_t tokens, const index_t* expert_counts) {
    const auto R = static_cast<std::size_t>(ranks()), W = static_cast<std::size_t>(E_ + 2);
    std::vector<std::int64_t> mine(W, 0), all(R * W);
    mine[0] = std::int64_t(local.code());
    mine[1] = tokens;
    for (index_t e = 0; expert_counts && e < E_; ++e) mine[static_cast<std::size_t>(e + 2)] = expert_counts[e];
    DMOE_TRY(detail::parallel::allgather(*comm_, mine.data(), W, all.data()));
    std::string bad;
    for (std::size_t q = 0; q < R; ++q)
      if (all[q * W] != 0) bad += " " + std::to_string(q) + " (" + to_string(errc(all[q * W])) + ")";
    if (!bad.empty()) {
      if (!local.ok()) return local;  // the failing rank returns its own message
      return status::failure(errc::invalid_argument, "%s: rank(s)%s failed; no exchange was made (rank %d of %d)",
                             who, bad.c_str(), rank(), ranks());
    }
    tokens_of_.assign(R, 0);
    counts_.assign(R * static_cast<std::size_t>(E_), 0);
    for (std::size_t q = 0; q < R; ++q) {
      tokens_of_[q] = index_t(all[q * W + 1]);
      for (index_t e = 0; e < E_; ++e) counts_[q * static_cast<std::size_t>(E_) + static_cast<std::size_t>(e)] = index_t(all[q * W + 2 + static_cast<std::size_t>(e)]);
    }
    return {};
  }

  index_t count(int q, index_t e) const noexcept { return counts_[static_cast<std::size_t>(q) * static_cast<std::size_t>(E_) + static_cast<std::size_t>(e)]; }

  status check_rows(const char* who, const char* name, matrix_view<const T> m, index_t rows) const noexcept {
    if (m.cols != cfg_.d_model || m.rows != rows || (rows > 0 && m.data == nullptr) || m.row_stride < m.cols)
      return status::failure(errc::invalid_argument,
                             "%s: %s is (%td x %td, row stride %td) at %p, expected (%td x %td) (tokens x d_model)",
                             who, name, m.rows, m.cols, m.row_stride, static_cast<const void*>(m.data), rows,
                             cfg_.d_model);
    return {};
  }

  status forward_impl(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<T> y) {
    const char* who = "expert_parallel_layer::forward";
    const index_t d = cfg_.d_model, tokens = x.rows;
    valid_ = false;
    threads_ = ctx.concurrency() < 1 ? 1 : ctx.concurrency();
    // 1. route and sort locally; a failure is only reported in the header exchange.
    status local = check_rows(who, "x", x, x.rows);
    if (local.ok()) local = check_rows(who, "y", matrix_view<const T>(y.data, y.rows, y.cols, y.row_stride), x.rows);
    if (local.ok()) {
      index_t worst = 0;
      if (!detail::layer_spec<Policy, Activation, dynamic_extent, dynamic_extent>::slot_bound(tokens, router_.max_k(),
                                                                                           0, worst))
        local = status::failure(errc::invalid_argument, "%s: %td tokens: the slot count overflows", who, tokens);
      else {
        home_ = carve(home_ws_, home_dims(), tokens, threads_, worst);
        home_.plan.token_offsets[0] = 0;
        local = tokens > 0 ? detail::cpu_backend::route(ctx, router_, x, home_.plan, home_.slot_capacity, home_.router,
                                                         home_.pack, home_.select)
                           : detail::cpu_backend::route_prepare(router_, home_.router);
      }
    }
    if (local.ok()) detail::cpu_backend::dispatch(home_, E_);
    std::vector<index_t> mine(static_cast<std::size_t>(E_), 0);
    if (local.ok())
      for (index_t e = 0; e < E_; ++e) mine[static_cast<std::size_t>(e)] = home_.expert_offsets[e + 1] - home_.expert_offsets[e];
    // 2. header
    DMOE_TRY(exchange_header(who, local, tokens, mine.data()));
    const int R = ranks(), me = rank();
    const index_t lo = first_, hi = first_expert_of(me + 1), nloc = hi - lo;
    // 3. token rows to the owners, in the sorted order (expert-major, token order within).
    const index_t nnz = home_.plan.nnz();
    send_rows_.assign(R, 0);
    for (int p = 0; p < R; ++p)
      send_rows_[static_cast<std::size_t>(p)] = home_.expert_offsets[first_expert_of(p + 1)] - home_.expert_offsets[first_expert_of(p)];
    recv_rows_.assign(R, 0);
    recv_base_.assign(static_cast<std::size_t>(R) + 1, 0);
    for (int q = 0; q < R; ++q) {
      for (index_t e = lo; e < hi; ++e) recv_rows_[static_cast<std::size_t>(q)] += count(q, e);
      recv_base_[static_cast<std::size_t>(q) + 1] = recv_base_[static_cast<std::size_t>(q)] + recv_rows_[static_cast<std::size_t>(q)];
    }
    const index_t nrecv = recv_base_[static_cast<std::size_t>(R)];
    sendbuf_.resize(static_cast<std::size_t>(nnz * d));
    detail::parallel::gather_rows(x.data, x.row_stride, home_.sorted_token, nnz, d, sendbuf_.data());
    xrecv_.resize(static_cast<std::size_t>(nrecv * d));
    DMOE_TRY(exchange(sendbuf_.data(), send_rows_, home_offsets(), xrecv_.data(), recv_rows_, recv_base_));
    sent_bytes_ = static_cast<std::size_t>(nnz) * static_cast<std::size_t>(d) * sizeof(T);
    // 4. the owner's buffers: rows grouped by local expert in (source rank, token) order.
    own_ = carve(own_ws_, detail::cpu_backend::make_dims<T>(d, nloc, cfg_.expert_width, width_factor<Activation>, 1, 0,
                                                            true),
                 nrecv, threads_, nrecv);
    own_.expert_offsets[0] = 0;
    index_t pos = 0, n_tasks = 0;
    for (index_t e = lo; e < hi; ++e) {
      for (int q = 0; q < R; ++q) {
        index_t at = recv_base_[static_cast<std::size_t>(q)];
        for (index_t e2 = lo; e2 < e; ++e2) at += count(q, e2);
        for (index_t i = 0; i < count(q, e); ++i, ++pos) {
          own_.sorted_token[pos] = at + i;
          own_.sorted_slot[pos] = pos;
          own_.slot_pos[pos] = pos;
          own_.plan.weight[pos] = T(1);  // g = w_s dy_t arrives pre-multiplied (w * 1 is exact)
        }
      }
      own_.expert_offsets[e - lo + 1] = pos;
      n_tasks = detail::cpu_backend::append_expert_tasks(own_, e - lo, own_.expert_offsets[e - lo], pos, n_tasks);
    }
    const cpu_isa isa = active_cpu_isa();
    packed_.refresh(local_, isa);
    const matrix_view<const T> xr(xrecv_.data(), nrecv, d, d);
    detail::cpu_backend::run_experts<Activation>(ctx, isa, xr, local_, packed_.template panels<T>(local_), own_,
                                                 n_tasks);
    // 5. outputs back to the home ranks, straight into the sorted positions of home_.out.
    sendbuf_.resize(static_cast<std::size_t>(nrecv * d));
    for (index_t r = 0; r < nrecv; ++r)
      std::copy(own_.out + r * d, own_.out + (r + 1) * d, sendbuf_.data() + own_.sorted_token[r] * d);
    DMOE_TRY(exchange(sendbuf_.data(), recv_rows_, recv_base_, home_.out, send_rows_, home_offsets()));
    detail::cpu_backend::combine(ctx, isa, y, home_, d, local_.output_bias_ptr());
    tokens_ = tokens;
    valid_ = true;
    return {};
  }

  std::vector<index_t> home_offsets() const {
    std::vector<index_t> off(static_cast<std::size_t>(ranks()) + 1);
    for (int p = 0; p <= ranks(); ++p) off[static_cast<std::size_t>(p)] = home_.expert_offsets[first_expert_of(p)];
    return off;
  }

  /// Rows of d values: send_rows[p] from send + send_at[p] rows to rank p, recv_rows[q] into recv
  /// + recv_at[q] rows from rank q.
  status exchange(const T* send, const std::vector<index_t>& send_rows, const std::vector<index_t>& send_at, T* recv,
                  const std::vector<index_t>& recv_rows, const std::vector<index_t>& recv_at) {
    const std::size_t rb = static_cast<std::size_t>(cfg_.d_model) * sizeof(T);
    const auto sb = detail::parallel::bytes_of(send_rows, rb), rcv = detail::parallel::bytes_of(recv_rows, rb);
    std::vector<index_t> sa(send_at.begin(), send_at.begin() + ranks()), ra(recv_at.begin(), recv_at.begin() + ranks());
    const auto so = detail::parallel::bytes_of(sa, rb), ro = detail::parallel::bytes_of(ra, rb);
    return comm_->alltoallv(send, sb.data(), so.data(), recv, rcv.data(), ro.data());
  }

  status backward_impl(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<const T> dy, matrix_view<T> dx,
                       gradients& grads, const aux_losses* aux) {
    const char* who = "expert_parallel_layer::backward";
    const index_t d = cfg_.d_model;
    status local = valid_ ? status{}
                          : status::failure(errc::invalid_argument,
                                            "%s: no completed forward to differentiate (call forward first)", who);
    if (local.ok()) local = check_rows(who, "x", x, tokens_);
    if (local.ok()) local = check_rows(who, "dy", dy, tokens_);
    if (local.ok()) local = check_rows(who, "dx", matrix_view<const T>(dx.data, dx.rows, dx.cols, dx.row_stride), tokens_);
    if (local.ok() && (ctx.concurrency() > threads_))
      local = status::failure(errc::invalid_argument, "%s: %td threads, the forward was sized for %td", who,
                              ctx.concurrency(), threads_);
    if (local.ok() && (grads.experts.shape() != local_.shape() || grads.router.num_experts() != E_))
      local = status::failure(errc::invalid_argument, "%s: grads have another shape (make them with make_gradients())",
                              who);
    // Status exchange before any row moves (a failing rank must not leave the others waiting).
    {
      const std::int32_t code = std::int32_t(local.code());
      std::vector<std::int32_t> all(static_cast<std::size_t>(ranks()));
      DMOE_TRY(detail::parallel::allgather(*comm_, &code, 1, all.data()));
      std::string bad;
      for (int q = 0; q < ranks(); ++q)
        if (all[static_cast<std::size_t>(q)] != 0) bad += " " + std::to_string(q);
      if (!bad.empty()) {
        if (!local.ok()) return local;
        return status::failure(errc::invalid_argument, "%s: rank(s)%s failed; no exchange was made (rank %d of %d)",
                               who, bad.c_str(), rank(), ranks());
      }
    }
    const index_t nnz = home_.plan.nnz(), nrecv = recv_base_[static_cast<std::size_t>(ranks())];
    // dL/dw_s on the home rank (it holds the outputs), then g = w_s dy_t to the owners.
    detail::cpu_backend::slot_weight_grads(ctx, dy, home_, d);
    sendbuf_.resize(static_cast<std::size_t>(nnz * d));
    for (index_t r = 0; r < nnz; ++r) {
      const T ws = home_.plan.weight[home_.sorted_slot[r]];
      const T* src = dy.row(home_.sorted_token[r]);
      T* dst = sendbuf_.data() + r * d;
      for (index_t j = 0; j < d; ++j) dst[j] = ws * src[j];
    }
    grecv_.resize(static_cast<std::size_t>(nrecv * d));
    DMOE_TRY(exchange(sendbuf_.data(), send_rows_, home_offsets(), grecv_.data(), recv_rows_, recv_base_));
    grads.experts.set_zero();
    const matrix_view<const T> xr(xrecv_.data(), nrecv, d, d), gr(grecv_.data(), nrecv, d, d);
    detail::cpu_backend::expert_backward<Activation>(ctx, active_cpu_isa(), xr, gr, local_,
                                                     packed_.template panels<T>(local_), grads.experts, own_);
    // dx per slot back to the home ranks, into the single-process layer's sorted positions.
    sendbuf_.resize(static_cast<std::size_t>(nrecv * d));
    for (index_t r = 0; r < nrecv; ++r)
      std::copy(own_.dx_slot + r * d, own_.dx_slot + (r + 1) * d, sendbuf_.data() + own_.sorted_token[r] * d);
    DMOE_TRY(exchange(sendbuf_.data(), recv_rows_, recv_base_, home_.dx_slot, send_rows_, home_offsets()));
    DMOE_TRY(router_backward(x, dx, grads.router, aux));
    detail::cpu_backend::input_grads(ctx, dx, home_, d);
    DMOE_TRY(output_bias_chain(dy, grads.experts));
    return {};
  }

  /// The router's gradient over every rank's tokens: gather its inputs in rank order, run the
  /// single-process router backward on the whole batch (identical on every rank), keep this
  /// rank's rows of the router's dx.
  status router_backward(matrix_view<const T> x, matrix_view<T> dx, router_type& grad, const aux_losses* aux) {
    using namespace detail::cpu_backend;
    const index_t d = cfg_.d_model, E = E_, tokens = tokens_;
    const int R = ranks(), me = rank();
    if constexpr (std::is_same_v<Policy, dynamic_k>) {
      route_backward(router_, x, home_.plan, home_.router, home_.dweight, aux, grad, dx, home_.rgrad);  // zeros
      return {};
    }
    index_t N = 0, row0 = 0;
    std::vector<std::size_t> rows(static_cast<std::size_t>(R)), slots(static_cast<std::size_t>(R)), rows_d(static_cast<std::size_t>(R)), rows_e(static_cast<std::size_t>(R));
    for (int q = 0; q < R; ++q) {
      if (q == me) row0 = N;
      N += tokens_of_[static_cast<std::size_t>(q)];
      rows[static_cast<std::size_t>(q)] = static_cast<std::size_t>(tokens_of_[static_cast<std::size_t>(q)]);
      index_t s = 0;
      for (index_t e = 0; e < E; ++e) s += count(q, e);
      slots[static_cast<std::size_t>(q)] = static_cast<std::size_t>(s);
      rows_d[static_cast<std::size_t>(q)] = rows[static_cast<std::size_t>(q)] * static_cast<std::size_t>(d);
      rows_e[static_cast<std::size_t>(q)] = rows[static_cast<std::size_t>(q)] * static_cast<std::size_t>(E);
    }
    if (N == 0) {  // no token anywhere: the single-process layer's zero-token path
      grad.set_zero();
      if constexpr (std::is_same_v<Policy, top_any>) top_any_parameter_terms(router_, aux, grad);
      return {};
    }
    index_t S = 0;
    for (auto s : slots) S += index_t(s);
    std::vector<T> xg(static_cast<std::size_t>(N * d)), scores(static_cast<std::size_t>(N * E)), taux(static_cast<std::size_t>(N)), w(static_cast<std::size_t>(S)),
        dw(static_cast<std::size_t>(S)), dxg(static_cast<std::size_t>(N * d)), dscores(static_cast<std::size_t>(N * E)), etmp(static_cast<std::size_t>(4 * E)),
        rtmp(static_cast<std::size_t>(rows_per_task * 2 * E));
    std::vector<std::int32_t> ex(static_cast<std::size_t>(S));
    std::vector<index_t> k_of(static_cast<std::size_t>(N)), off(static_cast<std::size_t>(N) + 1, 0);
    std::vector<T> xmine(static_cast<std::size_t>(tokens * d));
    for (index_t t = 0; t < tokens; ++t) std::copy(x.row(t), x.row(t) + d, xmine.data() + t * d);
    std::vector<index_t> kmine(static_cast<std::size_t>(tokens));
    for (index_t t = 0; t < tokens; ++t) kmine[static_cast<std::size_t>(t)] = home_.plan.k(t);
    namespace par = detail::parallel;
    DMOE_TRY(par::allgatherv(*comm_, xmine.data(), rows_d, xg.data()));
    DMOE_TRY(par::allgatherv(*comm_, home_.router.scores, rows_e, scores.data()));
    DMOE_TRY(par::allgatherv(*comm_, home_.router.token_aux, rows, taux.data()));
    DMOE_TRY(par::allgatherv(*comm_, kmine.data(), rows, k_of.data()));
    DMOE_TRY(par::allgatherv(*comm_, home_.plan.expert, slots, ex.data()));
    DMOE_TRY(par::allgatherv(*comm_, home_.plan.weight, slots, w.data()));
    DMOE_TRY(par::allgatherv(*comm_, home_.dweight, slots, dw.data()));
    for (index_t t = 0; t < N; ++t) off[static_cast<std::size_t>(t + 1)] = off[static_cast<std::size_t>(t)] + k_of[static_cast<std::size_t>(t)];
    routing_plan<T> plan{N, E, off.data(), ex.data(), w.data()};
    router_buffers<T> buf{scores.data(), nullptr, taux.data(), home_.router.expert_aux};
    router_grad_scratch<T> s{dscores.data(), etmp.data(), rtmp.data(), home_.pack.base};
    route_backward(router_, matrix_view<const T>(xg.data(), N, d, d), plan, buf, dw.data(), aux, grad,
                   matrix_view<T>(dxg.data(), N, d, d), s);
    for (index_t t = 0; t < tokens; ++t) std::copy(dxg.data() + (row0 + t) * d, dxg.data() + (row0 + t + 1) * d, dx.row(t));
    return {};
  }

  /// db2 = sum over all tokens of dy_t in token order: rank q continues rank q-1's running sum,
  /// the last rank sends the total to everyone (the single-process sum's exact order).
  status output_bias_chain(matrix_view<const T> dy, expert_weights<T>& g) {
    auto& db2 = g.output_bias_storage();
    if (db2.empty()) return {};
    const index_t d = cfg_.d_model;
    const int R = ranks(), me = rank();
    std::vector<T> acc(static_cast<std::size_t>(d), T(0)), in(static_cast<std::size_t>(d), T(0));
    for (int q = 1; q < R; ++q) {
      if (me == q - 1) detail::cpu_backend::output_bias_grad(dy, acc.data(), d);
      DMOE_TRY(detail::parallel::send_one(*comm_, q - 1, q, acc.data(), in.data(), static_cast<std::size_t>(d)));
      if (me == q) acc = in;
    }
    if (me == R - 1) detail::cpu_backend::output_bias_grad(dy, acc.data(), d);
    std::vector<T> all(static_cast<std::size_t>(R * d));
    DMOE_TRY(detail::parallel::allgather(*comm_, acc.data(), static_cast<std::size_t>(d), all.data()));
    std::copy(all.data() + (R - 1) * d, all.data() + R * d, db2.begin());
    return {};
  }

  communicator* comm_;
  moe_config cfg_;
  index_t E_ = 0, first_ = 0;
  router_type router_;
  expert_weights<T> local_;
  detail::cpu_backend::packed_experts<T> packed_;
  // The last forward's state (for backward).
  workspace_buffer home_ws_, own_ws_;
  buffers home_, own_;
  index_t tokens_ = 0, threads_ = 1;
  bool valid_ = false;
  std::vector<index_t> tokens_of_, counts_, send_rows_, recv_rows_, recv_base_;
  std::vector<T> sendbuf_, xrecv_, grecv_;
  std::size_t sent_bytes_ = 0;
};

DMOE_NAMESPACE_END  // namespace dmoe
