// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Dense FFN y = act(x W1 + b1) W2 + b2 on the CPU, with the same kernels, task cut and
/// executor as the MoE layer. It is the baseline every benchmark ratio is taken against and the
/// source model of the dense-to-MoE conversion (convert/).

#include <algorithm>
#include <cstdint>

#include <Eigen/Core>

#include "../core/backend.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../detail/random.hpp"
#include "../experts/activation.hpp"
#include "../routing/routers.hpp"
#include "experts.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "tasks.hpp"

namespace dmoe {

/// Dense feed-forward block. Layout as one big expert: W1 (d_model x f*F) column-major
/// (neuron-major; gated: [gate F | up F]), b1 (f*F), W2 (F x d_model) column-major, b2 (d_model).
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
  }

  index_t d_model() const noexcept { return w2_.cols(); }
  index_t hidden() const noexcept { return w2_.rows(); }
  double flops_per_token() const noexcept {
    return 2.0 * double(d_model()) * double(hidden()) * (Activation::gated ? 3.0 : 2.0);
  }

  col_matrix<T>& w1() noexcept { return w1_; }  ///< (d_model, f*hidden)
  const col_matrix<T>& w1() const noexcept { return w1_; }
  column_vector<T>& b1() noexcept { return b1_; }
  const column_vector<T>& b1() const noexcept { return b1_; }
  col_matrix<T>& w2() noexcept { return w2_; }  ///< (hidden, d_model)
  const col_matrix<T>& w2() const noexcept { return w2_; }
  column_vector<T>& b2() noexcept { return b2_; }
  const column_vector<T>& b2() const noexcept { return b2_; }

  /// PyTorch-style uniform(+-1/sqrt(fan_in)) init.
  void randomize(std::uint64_t seed) {
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
    const auto blk1 = cpu_detail::plan_gemm<T>(cpu_detail::rows_per_task, fF, d);
    const auto blk2 = cpu_detail::plan_gemm<T>(cpu_detail::rows_per_task, d, F);
    const index_t ld = fF + F;
    const index_t tasks = (x.rows + cpu_detail::rows_per_task - 1) / cpu_detail::rows_per_task;
    ctx.parallel_for(tasks, [&](index_t task, index_t worker) noexcept {
      const index_t t0 = task * cpu_detail::rows_per_task, rows = (std::min)(cpu_detail::rows_per_task, x.rows - t0);
      T* pre = s.hidden.get(worker);
      T* post = pre + fF;
      cpu_detail::init_rows_with(pre, rows, fF, ld, b1_.data());
      cpu_detail::product_nt<T>(rows, fF, d, {x.row(t0), x.row_stride, nullptr}, w1_.data(), d, pre, ld,
                                {nullptr, s.pack.get(worker), blk1});
      cpu_detail::activate_rows<Activation>(pre, post, rows, F, ld);
      for (index_t i = 0; i < rows; ++i) std::copy(b2_.data(), b2_.data() + d, y.row(t0 + i));
      cpu_detail::product_nt<T>(rows, d, F, {post, ld, nullptr}, w2_.data(), F, y.row(t0), y.row_stride,
                                {nullptr, s.pack.get(worker), blk2});
    });
    return {};
  }

 private:
  struct scratch {
    cpu_detail::worker_scratch<T> hidden, pack;
  };
  scratch carve(detail::carver& c, index_t threads) const noexcept {
    const index_t d = d_model(), F = hidden(), fF = width_factor<Activation> * F;
    scratch s;
    s.hidden.stride = cpu_detail::round16(cpu_detail::rows_per_task * (fF + F));
    s.hidden.base = c.take<T>(c.mul(threads, s.hidden.stride));
    s.pack.stride = cpu_detail::round16((std::max)(cpu_detail::plan_gemm<T>(cpu_detail::rows_per_task, fF, d).pack_elems(),
                                                 cpu_detail::plan_gemm<T>(cpu_detail::rows_per_task, d, F).pack_elems()));
    s.pack.base = c.take<T>(c.mul(threads, s.pack.stride));
    return s;
  }

  col_matrix<T> w1_;
  column_vector<T> b1_;
  col_matrix<T> w2_;
  column_vector<T> b2_;
};

}  // namespace dmoe
