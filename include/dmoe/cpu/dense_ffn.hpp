// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Dense FFN y = act(x W1 + b1) W2 + b2 on the CPU, with the same kernels, task cut and
/// executor as the MoE layer. It is the baseline every benchmark ratio is taken against and the
/// source model of the dense-to-MoE conversion (convert/).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>

#include <Eigen/Core>

#include "../core/backend.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../detail/random.hpp"
#include "../experts/activation.hpp"
#include "../routing/routers.hpp"
#include "experts.hpp"
#include "../core/version_tag.hpp"
#include "detail/packed_experts.hpp"
#include "detail/panel_kernels.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "tasks.hpp"

DMOE_NAMESPACE_BEGIN

/// Dense feed-forward block. Layout as one big expert: W1 (d_model x f*F) column-major
/// (neuron-major; gated: [gate F | up F]), b1 (f*F), W2 (F x d_model) column-major, b2 (d_model).
/// forward runs the MoE layer's panel kernels over a packed copy of W1 and W2, rebuilt on the
/// next forward after any non-const access to the weights (call mark_modified() after writing
/// through a reference kept from before a forward).
template <class T, class Activation>
class dense_ffn {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "dmoe::dense_ffn: T must be float or double");
  static_assert(is_activation_v<Activation>, "dmoe::dense_ffn: Activation must be a dmoe activation type");

 public:
  using scalar_type = T;
  using activation_type = Activation;

  dense_ffn(index_t d_model, index_t hidden) {
    if (d_model <= 0 || hidden <= 0)
      detail::raisef(errc::invalid_argument, "dense_ffn: d_model and hidden must be positive, got %td and %td", d_model,
                     hidden);
    w1_ = col_matrix<T>::Zero(d_model, width_factor<Activation> * hidden);
    b1_ = column_vector<T>::Zero(width_factor<Activation> * hidden);
    w2_ = col_matrix<T>::Zero(hidden, d_model);
    b2_ = column_vector<T>::Zero(d_model);
    const index_t nr = detail::cpu_backend::max_panel_width<T>(), fF = width_factor<Activation> * hidden;
    w1p_ = detail::cpu_backend::aligned_array<T>(
        "dense_ffn packed w1", detail::checked_product_or_throw("dense_ffn packed w1", d_model,
                                                                detail::cpu_backend::packed_panel_elems(1, fF, nr)));
    w2p_ = detail::cpu_backend::aligned_array<T>(
        "dense_ffn packed w2", detail::checked_product_or_throw("dense_ffn packed w2", hidden,
                                                                detail::cpu_backend::packed_panel_elems(1, d_model, nr)));
  }
  dense_ffn(const dense_ffn& o)
      : w1_(o.w1_), b1_(o.b1_), w2_(o.w2_), b2_(o.b2_), version_(o.version_), w1p_(o.w1p_), w2p_(o.w2p_) {
    packed_version_.store(o.packed_version_.load());
    packed_nr_.store(o.packed_nr_.load());
  }
  dense_ffn& operator=(const dense_ffn& o) {
    if (this != &o) {
      dense_ffn tmp(o);
      *this = std::move(tmp);
    }
    return *this;
  }
  dense_ffn(dense_ffn&& o) noexcept
      : w1_(std::move(o.w1_)), b1_(std::move(o.b1_)), w2_(std::move(o.w2_)), b2_(std::move(o.b2_)),
        version_(o.version_), w1p_(std::move(o.w1p_)), w2p_(std::move(o.w2p_)) {
    packed_version_.store(o.packed_version_.load());
    packed_nr_.store(o.packed_nr_.load());
    o.packed_version_.store(0);
  }
  dense_ffn& operator=(dense_ffn&& o) noexcept {
    w1_ = std::move(o.w1_);
    b1_ = std::move(o.b1_);
    w2_ = std::move(o.w2_);
    b2_ = std::move(o.b2_);
    version_ = o.version_;
    w1p_ = std::move(o.w1p_);
    w2p_ = std::move(o.w2p_);
    packed_version_.store(o.packed_version_.load());
    packed_nr_.store(o.packed_nr_.load());
    o.packed_version_.store(0);
    return *this;
  }

  index_t d_model() const noexcept { return w2_.cols(); }
  index_t hidden() const noexcept { return w2_.rows(); }
  double flops_per_token() const noexcept {
    return 2.0 * double(d_model()) * double(hidden()) * (Activation::gated ? 3.0 : 2.0);
  }

  col_matrix<T>& w1() noexcept {  ///< (d_model, f*hidden)
    version_.touch();
    return w1_;
  }
  const col_matrix<T>& w1() const noexcept { return w1_; }
  column_vector<T>& b1() noexcept { return b1_; }
  const column_vector<T>& b1() const noexcept { return b1_; }
  col_matrix<T>& w2() noexcept {  ///< (hidden, d_model)
    version_.touch();
    return w2_;
  }
  /// Declares that W1/W2 were written through a reference or pointer obtained earlier.
  void mark_modified() noexcept { version_.touch(); }
  const col_matrix<T>& w2() const noexcept { return w2_; }
  column_vector<T>& b2() noexcept { return b2_; }
  const column_vector<T>& b2() const noexcept { return b2_; }

  /// PyTorch-style uniform(+-1/sqrt(fan_in)) init.
  void randomize(std::uint64_t seed) {
    version_.touch();
    detail::rng g(seed);
    const double a1 = 1.0 / std::sqrt(double(d_model())), a2 = 1.0 / std::sqrt(double(hidden()));
    detail::fill_uniform(w1_, g, a1);
    detail::fill_uniform(b1_, g, a1);
    detail::fill_uniform(w2_, g, a2);
    detail::fill_uniform(b2_, g, a2);
  }

  std::size_t workspace_size(const workspace_bounds& b) const noexcept {
    detail::carver c;
    carve(c, b.max_threads < 1 ? 1 : b.max_threads);
    return c.bytes();
  }
  std::size_t workspace_size(const context<cpu>& ctx, index_t max_tokens) const noexcept {
    return workspace_size(workspace_bounds{max_tokens, ctx.concurrency()});
  }

  /// y = act(x W1 + b1) W2 + b2, in tasks of rows_per_task tokens.
  status forward(const context<cpu>& ctx, matrix_view<const T> x, matrix_view<T> y, workspace ws) const noexcept {
    const index_t d = d_model(), F = hidden(), fF = width_factor<Activation> * F;
    if (x.cols != d || y.cols != d || y.rows != x.rows)
      return status::failure(errc::invalid_argument,
                             "dense_ffn::forward: x is (%td x %td) and y (%td x %td), expected both (tokens x %td)",
                             x.rows, x.cols, y.rows, y.cols, d);
    if (x.rows < 0)
      return status::failure(errc::invalid_argument, "dense_ffn::forward: x has %td rows", x.rows);
    if (x.row_stride < d || y.row_stride < d)
      return status::failure(errc::invalid_argument,
                             "dense_ffn::forward: row strides must be >= d_model = %td, got x %td, y %td", d,
                             x.row_stride, y.row_stride);
    if (x.rows == 0) return {};
    if (!x.data || !y.data)
      return status::failure(errc::invalid_argument, "dense_ffn::forward: null %s", x.data ? "y" : "x");
    const index_t threads = ctx.concurrency();
    if (!ws.data || ws.bytes < workspace_size(workspace_bounds{x.rows, threads}))
      return status::failure(errc::workspace_too_small, "dense_ffn::forward: workspace has %zu bytes, needs %zu",
                             ws.bytes, workspace_size(workspace_bounds{x.rows, threads}));
    detail::carver c(detail::carver::align(ws.data));
    const auto s = carve(c, threads);
    const cpu_isa isa = active_cpu_isa();
    refresh_packed(isa);
    const index_t nr = detail::cpu_backend::tile_for<T>(isa).nr();
    const auto w1p = detail::cpu_backend::panel_b<T>::packed(w1p_.data(), d, nr);
    const auto w2p = detail::cpu_backend::panel_b<T>::packed(w2p_.data(), F, nr);
    const index_t ld = fF + F;
    const index_t tasks = (x.rows + detail::cpu_backend::rows_per_task - 1) / detail::cpu_backend::rows_per_task;
    ctx.parallel_for(tasks, [&](index_t task, index_t worker) noexcept {
      const index_t t0 = task * detail::cpu_backend::rows_per_task, rows = (std::min)(detail::cpu_backend::rows_per_task, x.rows - t0);
      T* pre = s.hidden.get(worker);
      T* post = pre + fF;
      detail::cpu_backend::panel_product<T>(isa, rows, fF, d, {x.row(t0), x.row_stride, nullptr}, w1p, b1_.data(), pre, ld);
      detail::cpu_backend::activate_rows<Activation>(pre, post, rows, F, ld);
      detail::cpu_backend::panel_product<T>(isa, rows, d, F, {post, ld, nullptr}, w2p, b2_.data(), y.row(t0), y.row_stride);
    });
    return {};
  }

 private:
  struct scratch {
    detail::cpu_backend::worker_scratch<T> hidden;
  };
  /// Packs W1 and W2 into panels of `isa`'s width if they or the width changed since (concurrent forwards: one packs).
  void refresh_packed(cpu_isa isa) const noexcept {
    auto current = [&] {
      return packed_version_.load(std::memory_order_acquire) == version_.value() &&
             packed_nr_.load(std::memory_order_relaxed) == detail::cpu_backend::tile_for<T>(isa).nr();
    };
    if (current()) return;
    std::lock_guard<std::mutex> lock(pack_mutex_);
    if (current()) return;
    const std::uint64_t v = version_.value();
    const index_t d = d_model(), F = hidden(), fF = width_factor<Activation> * F, nr = detail::cpu_backend::tile_for<T>(isa).nr();
    detail::cpu_backend::pack_panels<T>(isa, d, fF, w1_.data(), 1, d, nr, w1p_.data());
    detail::cpu_backend::pack_panels<T>(isa, F, d, w2_.data(), 1, F, nr, w2p_.data());
    packed_nr_.store(nr, std::memory_order_relaxed);
    packed_version_.store(v, std::memory_order_release);
  }
  scratch carve(detail::carver& c, index_t threads) const noexcept {
    const index_t F = hidden(), fF = width_factor<Activation> * F;
    scratch s;
    s.hidden.stride = detail::cpu_backend::round16(detail::cpu_backend::rows_per_task * (fF + F));
    s.hidden.base = c.take<T>(c.mul(threads, s.hidden.stride));
    return s;
  }

  col_matrix<T> w1_;
  column_vector<T> b1_;
  col_matrix<T> w2_;
  column_vector<T> b2_;
  version_tag version_;
  mutable detail::cpu_backend::aligned_array<T> w1p_, w2p_;  // panels: a cache of w1_/w2_ (refresh_packed)
  mutable std::atomic<std::uint64_t> packed_version_{0};
  mutable std::atomic<index_t> packed_nr_{-1};  // panel width packed
  mutable std::mutex pack_mutex_;
};

DMOE_NAMESPACE_END  // namespace dmoe
