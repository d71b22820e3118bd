// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Attention projections -> MLPs (docs/algorithms.md section 5.5, D2DMoE's extension): a d x d
/// linear map y = x W + b becomes an MLP d -> h -> d of the same cost, h = round((d^2 + d) /
/// (2d + 1)), trained on the map's inputs to reproduce its outputs, with a small activation-
/// sparsity term so that the hidden units, once split into experts, switch off per token. The
/// result is a dense_ffn, then split and routed like an FFN (split_neurons, to_moe, fit_router).
///
/// Layout: `weight` is (in x out) with y = x W + b (weight_layout::in_out, dmoe's row-vector
/// convention), or PyTorch's nn.Linear weight (out x in) with y = x W^T + b (weight_layout::out_in).
///
/// Loss per minibatch: ||MLP(x) - y||^2 / (B d ms) + lambda_t * hoyer(a) / h, where ms is the
/// mean square of the map's outputs on the training inputs (so the first term is the relative
/// squared error and the weights carry over between scales), a = act(x W1 + b1) the hidden
/// activations, hoyer the squared Hoyer measure (sum |a|)^2 / sum a^2 averaged over tokens (in
/// [1, h], so hoyer / h lies in (0, 1]), and lambda_t ramps linearly from 0 to sparsity_weight
/// over the first sparsity_ramp of the steps. AdamW (train/optimizers.hpp) over the dense_ffn's
/// four tensors, seeded shuffling and init. Cold path: allocates, throws dmoe::error.
///
/// The MLP has about half the hidden units needed to represent a general full-rank d x d map
/// exactly (ReLU needs a pair of units per direction), so it reproduces the map well only where
/// the map's inputs occupy a low-dimensional subspace, as transformer activations do; on
/// isotropic inputs expect the error of a rank-h/2 approximation.

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include "../core/layout.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../cpu/dense_ffn.hpp"
#include "../cpu/router_regression.hpp"
#include "../detail/random.hpp"
#include "../experts/activation.hpp"
#include "../routing/routers.hpp"
#include "../train/optimizers.hpp"
#include "../train/parameters.hpp"

DMOE_NAMESPACE_BEGIN

/// Hidden width of the MLP replacing a d x d projection at equal cost: round((d^2 + d) / (2d + 1)).
inline index_t attention_mlp_hidden(index_t d) {
  if (d <= 0) detail::raisef(errc::invalid_argument, "attention_mlp_hidden: d must be positive, got %td", d);
  const double h = std::round((double(d) * double(d) + double(d)) / (2.0 * double(d) + 1.0));
  return (std::max)(index_t(1), index_t(h));
}

struct attention_mlp_options {
  index_t hidden = 0;        ///< 0: attention_mlp_hidden(d)
  int epochs = 20;           ///< passes over the training inputs
  index_t batch_size = 64;   ///< tokens per AdamW step
  /// lr 3e-3 (converges in ~1000 steps on the test shapes; 1e-3 needs about 3x more), no weight
  /// decay: it would bias the fit away from the map
  adamw_options optimizer{3e-3, 0.9, 0.999, 1e-8, 0.0};
  double sparsity_weight = 1e-2;  ///< lambda: weight of hoyer(a) / h once ramped up (0 disables the term)
  double sparsity_ramp = 0.5;     ///< fraction of the steps over which lambda ramps up linearly from 0
  std::uint64_t seed = 0;         ///< initial weights and shuffling
};

/// What the progress callback receives, once per epoch.
struct attention_mlp_progress {
  index_t tokens_seen = 0;  ///< training tokens processed so far
  double loss = 0;          ///< mean minibatch loss of the epoch (relative squared error + sparsity term)
  double seconds = 0;       ///< since the fit started
  int epoch = 0;            ///< 1-based
  int epochs = 0;
  long steps = 0;
  double relative_mse = 0;   ///< mean of the epoch's relative squared error term alone
  double sparsity_weight = 0;  ///< lambda at the epoch's last step
};
using attention_mlp_callback = std::function<void(const attention_mlp_progress&)>;

/// Figures of a fit: relative errors ||MLP(x) - (x W + b)||_F / ||x W + b||_F over the given
/// inputs, and the share of hidden activations that are > 0. Held-out figures are NaN without
/// held-out inputs.
struct attention_mlp_report {
  index_t hidden = 0;
  long steps = 0;
  index_t tokens_seen = 0;
  double seconds = 0;
  double initial_relative_error = 0;  ///< on the training inputs, at the random init
  double relative_error = 0;          ///< on the training inputs, after the fit
  double heldout_relative_error = std::numeric_limits<double>::quiet_NaN();
  double active_fraction = 0;  ///< on the training inputs
  double heldout_active_fraction = std::numeric_limits<double>::quiet_NaN();
};

/// The fitted MLP and its report.
template <class T, class Act>
struct attention_mlp {
  dense_ffn<T, Act> mlp;
  attention_mlp_report report;
};

namespace detail::conversion {

/// Keeps a parameter out of template argument deduction (std::type_identity is C++20), so that
/// row-major Eigen matrices convert to matrix_view<const T> with T taken from the weight.
template <class U>
struct mlp_no_deduce {
  using type = U;
};

template <class T>
using mlp_rows = Eigen::Map<const row_matrix<T>, 0, Eigen::OuterStride<>>;

template <class T>
mlp_rows<T> mlp_map(matrix_view<const T> x) {
  return mlp_rows<T>(x.data, x.rows, x.cols, Eigen::OuterStride<>(x.row_stride));
}

template <class T>
void mlp_check_finite(const char* what, matrix_view<const T> m) {
  for (index_t t = 0; t < m.rows; ++t)
    for (index_t j = 0; j < m.cols; ++j)
      if (!std::isfinite(m(t, j)))
        detail::raisef(errc::invalid_argument, "fit_attention_mlp: %s(%td, %td) is not finite", what, t, j);
}

/// Hidden activations act(x W1 + b1) of a non-gated dense FFN (pre-activation kept in `pre`).
template <class Act, class T, class X>
row_matrix<T> mlp_hidden(const dense_ffn<T, Act>& f, const X& x, row_matrix<T>& pre) {
  pre.noalias() = x * f.w1();
  pre.rowwise() += f.b1().transpose();
  Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> a = pre.array();
  Act::apply_inplace(a);
  return a.matrix();
}

/// Relative error of the MLP against targets y, and the share of activations > 0.
template <class Act, class T, class X, class Y>
void mlp_evaluate(const dense_ffn<T, Act>& f, const X& x, const Y& y, double& rel, double& active) {
  row_matrix<T> pre;
  const row_matrix<T> a = mlp_hidden(f, x, pre);
  row_matrix<T> out = a * f.w2();
  out.rowwise() += f.b2().transpose();
  const double den = double(y.squaredNorm());
  rel = std::sqrt(double((out - y).squaredNorm()) / (den > 0 ? den : 1.0));
  active = a.size() ? double((a.array() > T(0)).count()) / double(a.size()) : 0.0;
}

/// Minibatch loss of the fit: ||MLP(x) - y||^2 * scale + lambda * hoyer(a) / h, with the gradient
/// of every MLP tensor written into `grad` (same shape). `mse` receives the first term alone.
template <class Act, class T, class X, class Y>
double mlp_loss(const dense_ffn<T, Act>& f, const X& x, const Y& y, T scale, double lambda, dense_ffn<T, Act>& grad,
                double& mse) {
  const index_t h = f.hidden();
  row_matrix<T> pre;
  row_matrix<T> a = mlp_hidden(f, x, pre);
  row_matrix<T> dout = a * f.w2();
  dout.rowwise() += f.b2().transpose();
  dout -= y;
  mse = double(dout.squaredNorm() * scale);
  dout *= T(2) * scale;
  grad.w2().noalias() = a.transpose() * dout;
  grad.b2() = dout.colwise().sum().transpose();
  row_matrix<T> da = dout * f.w2().transpose();
  double sparsity = 0;
  if (lambda > 0) {
    row_matrix<T> hoyer_grad(a.rows(), h);
    sparsity = double(activation_sparsity(sparsity_penalty::hoyer_squared, matrix_view<const T>(a),
                                          matrix_view<T>(hoyer_grad))) / double(h);
    da += T(lambda / double(h)) * hoyer_grad;
  }
  // Through the activation: dpre = da * act'(pre).
  da.array() *= pre.unaryExpr([](T v) { return Act::derivative(v); }).array();
  grad.w1().noalias() = x.transpose() * da;
  grad.b1() = da.colwise().sum().transpose();
  return mse + lambda * sparsity;
}

}  // namespace detail::conversion

/// Trains an MLP d -> h -> d (activation Act, ReLU by default) to reproduce the linear map
/// y = x W + b on the inputs x (tokens x d, the projection's real inputs).
/// \param weight (d x d), laid out as `layout` says; \param bias (d) or empty for none
/// \param heldout_x optional inputs for the report's held-out figures
/// Throws dmoe::error on shapes that do not fit, no training tokens, non-finite inputs or a
/// diverging loss.
template <class Act = relu, class T>
attention_mlp<T, Act> fit_attention_mlp(const col_matrix<T>& weight, const column_vector<T>& bias,
                                        typename detail::conversion::mlp_no_deduce<matrix_view<const T>>::type x,
                                        const attention_mlp_options& opt = {},
                                        typename detail::conversion::mlp_no_deduce<matrix_view<const T>>::type heldout_x = {},
                                        weight_layout layout = weight_layout::in_out,
                                        const attention_mlp_callback& progress = {}) {
  static_assert(!Act::gated,
                "dmoe::fit_attention_mlp: the replacement MLP has one first-layer matrix; gated activations "
                "(swiglu, geglu) would change its cost, use relu, gelu_erf, gelu_tanh or silu");
  const index_t d = weight.rows();
  if (d <= 0 || weight.cols() != d)
    detail::raisef(errc::invalid_argument, "fit_attention_mlp: weight is (%td x %td), expected a square d x d matrix",
                   weight.rows(), weight.cols());
  if (bias.size() != 0 && bias.size() != d)
    detail::raisef(errc::invalid_argument, "fit_attention_mlp: bias has %td entries, expected %td (d) or 0", bias.size(),
                   d);
  if (x.cols != d || x.rows <= 0)
    detail::raisef(errc::invalid_argument, "fit_attention_mlp: x is (%td x %td), expected (tokens >= 1 x %td)", x.rows,
                   x.cols, d);
  if (heldout_x.rows > 0 && heldout_x.cols != d)
    detail::raisef(errc::invalid_argument, "fit_attention_mlp: heldout_x is (%td x %td), expected (tokens x %td)",
                   heldout_x.rows, heldout_x.cols, d);
  if (opt.hidden < 0 || opt.epochs < 0 || opt.batch_size <= 0)
    detail::raisef(errc::invalid_argument,
                   "fit_attention_mlp: options hidden = %td (>= 0), epochs = %d (>= 0), batch_size = %td (> 0)",
                   opt.hidden, opt.epochs, opt.batch_size);
  if (!(std::isfinite(opt.sparsity_weight) && opt.sparsity_weight >= 0) ||
      !(opt.sparsity_ramp >= 0 && opt.sparsity_ramp <= 1))
    detail::raisef(errc::invalid_argument,
                   "fit_attention_mlp: sparsity_weight = %g must be finite and >= 0 and sparsity_ramp = %g in [0, 1]",
                   opt.sparsity_weight, opt.sparsity_ramp);
  if (const status os = check_options(opt.optimizer); !os.ok())
    detail::raisef(errc::invalid_argument, "fit_attention_mlp: options.optimizer: %s", os.message());
  if (!weight.allFinite() || !bias.allFinite())
    detail::raisef(errc::invalid_argument, "fit_attention_mlp: weight or bias contains NaN or infinity");
  detail::conversion::mlp_check_finite("x", x);
  if (heldout_x.rows > 0) detail::conversion::mlp_check_finite("heldout_x", heldout_x);

  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  const index_t h = opt.hidden > 0 ? opt.hidden : attention_mlp_hidden(d), N = x.rows;
  const col_matrix<T> W = layout == weight_layout::in_out ? col_matrix<T>(weight) : col_matrix<T>(weight.transpose());
  const column_vector<T> b = bias.size() ? bias : column_vector<T>(column_vector<T>::Zero(d));
  const auto targets_of = [&](matrix_view<const T> in) {
    row_matrix<T> y = detail::conversion::mlp_map(in) * W;
    y.rowwise() += b.transpose();
    return y;
  };
  const auto X = detail::conversion::mlp_map(x);
  const row_matrix<T> Y = targets_of(x);
  const double ms_raw = double(Y.squaredNorm()) / (double(N) * double(d));
  const T inv_ms = T(1.0 / (ms_raw > 0 ? ms_raw : 1.0));

  attention_mlp<T, Act> res{dense_ffn<T, Act>(d, h), {}};
  dense_ffn<T, Act>& f = res.mlp;
  f.randomize(opt.seed ^ 0xA77E2710ULL);
  attention_mlp_report& rep = res.report;
  rep.hidden = h;
  double dummy = 0;
  detail::conversion::mlp_evaluate(f, X, Y, rep.initial_relative_error, dummy);

  dense_ffn<T, Act> grad(d, h);
  const auto params_of = [](dense_ffn<T, Act>& m) {
    param_list<T> p;
    detail::add_param(p, "mlp.w1", m.w1().data(), m.w1().size());
    detail::add_param(p, "mlp.b1", m.b1().data(), m.b1().size());
    detail::add_param(p, "mlp.w2", m.w2().data(), m.w2().size());
    detail::add_param(p, "mlp.b2", m.b2().data(), m.b2().size());
    return p;
  };
  adamw<T> optimizer(params_of(f), opt.optimizer);
  const param_list<T> grad_params = params_of(grad);

  const index_t B = (std::min)(opt.batch_size, N);
  const long steps_per_epoch = long((N + B - 1) / B), total_steps = steps_per_epoch * long(opt.epochs);
  const double ramp_steps = opt.sparsity_ramp * double(total_steps);
  row_matrix<T> xb(B, d), yb(B, d);
  std::vector<index_t> order(static_cast<std::size_t>(N));
  std::iota(order.begin(), order.end(), index_t{0});
  detail::rng g(opt.seed);
  for (int epoch = 1; epoch <= opt.epochs; ++epoch) {
    g.shuffle(order.begin(), order.end());
    double epoch_loss = 0, epoch_mse = 0, lambda = 0;
    for (index_t b0 = 0; b0 < N; b0 += B) {
      const index_t rows = (std::min)(B, N - b0);
      for (index_t i = 0; i < rows; ++i) {
        const index_t t = order[std::size_t(b0 + i)];
        xb.row(i) = X.row(t);
        yb.row(i) = Y.row(t);
      }
      lambda = ramp_steps > 0 ? opt.sparsity_weight * (std::min)(1.0, double(rep.steps + 1) / ramp_steps)
                              : opt.sparsity_weight;
      double mse = 0;
      const double loss = detail::conversion::mlp_loss(f, xb.topRows(rows), yb.topRows(rows),
                                                   inv_ms / (T(rows) * T(d)), lambda, grad, mse);
      throw_if_error(optimizer.step(grad_params));
      ++rep.steps;
      epoch_loss += loss * double(rows);
      epoch_mse += mse * double(rows);
    }
    rep.tokens_seen += N;
    if (!std::isfinite(epoch_loss))
      detail::raisef(errc::numerical_error,
                     "fit_attention_mlp: the loss became %g in epoch %d (lower options.optimizer.lr = %g?)", epoch_loss,
                     epoch, opt.optimizer.lr);
    if (progress)
      progress(attention_mlp_progress{rep.tokens_seen, epoch_loss / double(N), elapsed(), epoch, opt.epochs, rep.steps,
                                      epoch_mse / double(N), lambda});
  }
  detail::conversion::mlp_evaluate(f, X, Y, rep.relative_error, rep.active_fraction);
  if (heldout_x.rows > 0) {
    const row_matrix<T> Yh = targets_of(heldout_x);
    detail::conversion::mlp_evaluate(f, detail::conversion::mlp_map(heldout_x), Yh, rep.heldout_relative_error,
                                 rep.heldout_active_fraction);
  }
  rep.seconds = elapsed();
  return res;
}

DMOE_NAMESPACE_END  // namespace dmoe
