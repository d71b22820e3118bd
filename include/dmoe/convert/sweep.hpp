// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Cost/accuracy sweeps of a converted dynamic-k layer (docs/algorithms.md sections 3, 5.4, 6):
/// the router is trained once, then tau (dynamic-k) or k (top-k by the router's score, i.e. tau = 0
/// with the k_max cap) is swept; each setting is one point measured on held-out inputs against a
/// reference output (usually the dense FFN the layer came from).
///
/// Per point:
///  - mean k and the k histogram (tokens that ran 0..E experts);
///  - flops_fraction = (router FLOPs + sum over tokens of the selected experts' 2 d n (2, or 3 if
///    gated)) / dense FLOPs (2 d (E n) (2|3) per token). Matrix products only, a multiply-add
///    counted as 2; biases, activations, the |.| and the selection are not counted (routing_stats);
///  - rel_error = ||Y - Y_ref||_F / ||Y_ref||_F over all tokens (outputs include the shared b2);
///  - token_rel_error = mean over tokens of |y_t - y_ref_t| / |y_ref_t| (every token weighs the
///    same; rel_error is dominated by the tokens with the largest outputs);
///  - mean_cosine = mean over tokens of <y_t, y_ref_t> / (|y_t| |y_ref_t|) (1 when both are zero,
///    0 when only one is).
/// Cold path: allocates, throws dmoe::error.

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <ostream>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../core/backend.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../cpu/dense_ffn.hpp"
#include "../cpu/moe_layer.hpp"
#include "../routing/routers.hpp"
#include "../routing/stats.hpp"

DMOE_NAMESPACE_BEGIN

/// One measured setting of a sweep.
struct sweep_point {
  std::string router;        ///< the router's name, e.g. "d2dmoe" or "moefication"
  std::string policy;        ///< "dynamic_k" (tau swept) or "top_k" (k swept: tau = 0, k_max = k)
  double tau = 0;            ///< threshold of the point
  index_t k = 0;             ///< top_k: k; dynamic_k: the k_max cap in force (0 = none)
  index_t tokens = 0;
  double mean_k = 0;
  std::vector<index_t> k_histogram;  ///< (E + 1): tokens that ran 0, 1, ..., E experts
  double flops_fraction = 0;   ///< (router + executed experts) / dense
  double expert_fraction = 0;  ///< executed experts / dense
  double router_fraction = 0;  ///< router / dense
  double rel_error = 0;        ///< ||Y - Y_ref||_F / ||Y_ref||_F
  double token_rel_error = 0;  ///< mean over tokens of |y_t - y_ref_t| / |y_ref_t|
  double mean_cosine = 0;      ///< mean over tokens of cos(y_t, y_ref_t)
};

/// Dense FFN output for x (convenience for the sweep's reference).
template <class T, class Activation>
row_matrix<T> dense_output(const context<cpu>& ctx, const dense_ffn<T, Activation>& dense,
                           input_view<T> x) {
  row_matrix<T> y(x.rows, dense.d_model());
  workspace_buffer ws(dense.workspace_size(ctx, x.rows));
  throw_if_error(dense.forward(ctx, x, y, ws));
  return y;
}

namespace detail::conversion {

/// Relative Frobenius error, mean per-token relative error and mean per-token cosine of y against
/// y_ref, accumulated in double.
template <class T>
void compare_outputs(matrix_view<const T> y, matrix_view<const T> ref, double& rel_error, double& token_rel_error,
                     double& mean_cosine) {
  double diff2 = 0, ref2 = 0, cos_sum = 0, tok_sum = 0;
  for (index_t t = 0; t < y.rows; ++t) {
    double dot = 0, yy = 0, rr = 0, dd = 0;
    for (index_t j = 0; j < y.cols; ++j) {
      const double a = double(y(t, j)), b = double(ref(t, j));
      dot += a * b;
      yy += a * a;
      rr += b * b;
      dd += (a - b) * (a - b);
    }
    diff2 += dd;
    ref2 += rr;
    if (rr > 0)
      tok_sum += std::sqrt(dd / rr);
    else if (dd > 0)
      tok_sum += std::numeric_limits<double>::infinity();
    if (yy > 0 && rr > 0)
      cos_sum += dot / (std::sqrt(yy) * std::sqrt(rr));
    else if (yy == 0 && rr == 0)
      cos_sum += 1.0;
  }
  rel_error = ref2 > 0 ? std::sqrt(diff2 / ref2) : (diff2 > 0 ? std::numeric_limits<double>::infinity() : 0.0);
  mean_cosine = y.rows > 0 ? cos_sum / double(y.rows) : 1.0;
  token_rel_error = y.rows > 0 ? tok_sum / double(y.rows) : 0.0;
}

template <class Layer, class T>
void check_sweep_inputs(const char* who, const Layer& layer, matrix_view<const T> x, matrix_view<const T> y_ref) {
  if (x.cols != layer.d_model() || y_ref.cols != layer.d_model() || y_ref.rows != x.rows)
    detail::raisef(errc::invalid_argument,
                   "%s: x is (%td x %td) and y_ref (%td x %td), expected both (tokens x d_model = %td)", who, x.rows,
                   x.cols, y_ref.rows, y_ref.cols, layer.d_model());
  if (x.rows <= 0) detail::raisef(errc::invalid_argument, "%s: x has %td rows, need at least one token", who, x.rows);
}

/// Restores a layer's router options when a sweep ends, also by exception.
template <class Layer>
struct options_guard {
  Layer& layer;
  dynamic_k_options saved;
  explicit options_guard(Layer& l) : layer(l), saved(l.router().options()) {}
  ~options_guard() { layer.router().set_options(saved); }
  options_guard(const options_guard&) = delete;
  options_guard& operator=(const options_guard&) = delete;
};

}  // namespace detail::conversion

/// Measures the layer with its current router options on x against y_ref.
template <class T, class Activation, std::size_t Experts, std::size_t Width>
sweep_point measure_point(const context<cpu>& ctx, const moe_layer<T, cpu, dynamic_k, Activation, Experts, Width>& layer,
                          input_view<T> x, input_view<T> y_ref,
                          const std::string& router_name, const std::string& policy = "dynamic_k") {
  detail::conversion::check_sweep_inputs("measure_point", layer, x, y_ref);
  row_matrix<T> y(x.rows, layer.d_model());
  workspace_buffer ws(layer.workspace_size(ctx, x.rows));
  routing_stats stats(layer.num_experts());
  throw_if_error(layer.forward(ctx, x, y, ws, &stats));
  sweep_point p;
  p.router = router_name;
  p.policy = policy;
  p.tau = layer.router().options().tau;
  p.k = layer.router().options().k_max;
  p.tokens = x.rows;
  p.mean_k = stats.mean_k();
  p.k_histogram = stats.k_histogram;
  p.flops_fraction = stats.executed_fraction();
  p.expert_fraction = stats.active_fraction();
  p.router_fraction = stats.dense_flops > 0 ? stats.router_flops / stats.dense_flops : 0.0;
  detail::conversion::compare_outputs<T>(matrix_view<const T>(y), y_ref, p.rel_error, p.token_rel_error,
                                     p.mean_cosine);
  return p;
}

/// Dynamic-k sweep: one point per tau (k_max as the layer has it). The layer's options are
/// restored afterwards.
template <class T, class Activation, std::size_t Experts, std::size_t Width>
std::vector<sweep_point> sweep_dynamic_k(const context<cpu>& ctx,
                                         moe_layer<T, cpu, dynamic_k, Activation, Experts, Width>& layer,
                                         input_view<T> x, input_view<T> y_ref,
                                         const std::vector<double>& taus, const std::string& router_name = "d2dmoe") {
  detail::conversion::check_sweep_inputs("sweep_dynamic_k", layer, x, y_ref);
  detail::conversion::options_guard<std::decay_t<decltype(layer)>> guard(layer);
  std::vector<sweep_point> out;
  for (double tau : taus) {
    layer.router().set_options({tau, guard.saved.k_max});  // throws on tau outside [0, 1]
    out.push_back(measure_point<T>(ctx, layer, x, y_ref, router_name, "dynamic_k"));
  }
  return out;
}

/// Top-k sweep through the same layer: tau = 0 selects every expert and k_max = k keeps the k
/// largest router scores (ties: lower index), weight 1 each. With a router fitted to
/// router_target::summed_activation this is the MoEfication baseline. Options restored afterwards.
template <class T, class Activation, std::size_t Experts, std::size_t Width>
std::vector<sweep_point> sweep_top_k(const context<cpu>& ctx,
                                     moe_layer<T, cpu, dynamic_k, Activation, Experts, Width>& layer,
                                     input_view<T> x, input_view<T> y_ref,
                                     const std::vector<index_t>& ks, const std::string& router_name = "moefication") {
  detail::conversion::check_sweep_inputs("sweep_top_k", layer, x, y_ref);
  detail::conversion::options_guard<std::decay_t<decltype(layer)>> guard(layer);
  std::vector<sweep_point> out;
  for (index_t k : ks) {
    if (k < 1 || k > layer.num_experts())
      detail::raisef(errc::invalid_argument, "sweep_top_k: k = %td is outside [1, num_experts = %td]", k,
                     layer.num_experts());
    layer.router().set_options({0.0, k});
    out.push_back(measure_point<T>(ctx, layer, x, y_ref, router_name, "top_k"));
  }
  return out;
}

/// An error measure of a cost/accuracy curve at FLOPs fraction f (`metric`: rel_error by default,
/// or &sweep_point::token_rel_error): linear interpolation in f between the two points of `curve`
/// that bracket f. Points are sorted by flops_fraction; of points with equal fractions only the
/// lowest error counts. NaN when f lies outside the curve's range or the curve is empty.
inline double interpolate_error(std::vector<sweep_point> curve, double f,
                                double sweep_point::*metric = &sweep_point::rel_error) {
  std::sort(curve.begin(), curve.end(), [metric](const sweep_point& a, const sweep_point& b) {
    return a.flops_fraction < b.flops_fraction || (a.flops_fraction == b.flops_fraction && a.*metric < b.*metric);
  });
  curve.erase(std::unique(curve.begin(), curve.end(),
                          [](const sweep_point& a, const sweep_point& b) { return a.flops_fraction == b.flops_fraction; }),
              curve.end());
  for (std::size_t i = 0; i < curve.size(); ++i) {
    const auto& b = curve[i];
    if (b.flops_fraction == f) return b.*metric;
    if (b.flops_fraction > f) {
      if (i == 0) break;
      const auto& a = curve[i - 1];
      const double w = (f - a.flops_fraction) / (b.flops_fraction - a.flops_fraction);
      return a.*metric + w * (b.*metric - a.*metric);
    }
  }
  return std::numeric_limits<double>::quiet_NaN();
}

/// CSV header of write_sweep_csv, without the newline.
inline const char* sweep_csv_header() noexcept {
  return "router,policy,tau,k,tokens,mean_k,flops_fraction,expert_fraction,router_fraction,rel_error,token_rel_error,"
         "mean_cosine,k_histogram";
}

/// Writes the points as CSV: the header row, then one row per point; numbers with 9 significant
/// digits; k_histogram is one field of ';'-joined token counts for k = 0, 1, ..., E.
inline void write_sweep_csv(std::ostream& os, const std::vector<sweep_point>& points) {
  os << sweep_csv_header() << '\n';
  char buf[512];
  for (const auto& p : points) {
    for (const std::string* s : {&p.router, &p.policy})
      if (s->find_first_of(",\"\n\r") != std::string::npos)
        detail::raisef(errc::invalid_argument, "write_sweep_csv: name '%s' contains a comma, quote or newline",
                       s->c_str());
    std::snprintf(buf, sizeof(buf), "%s,%s,%.9g,%td,%td,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,", p.router.c_str(),
                  p.policy.c_str(), p.tau, p.k, p.tokens, p.mean_k, p.flops_fraction, p.expert_fraction,
                  p.router_fraction, p.rel_error, p.token_rel_error, p.mean_cosine);
    os << buf;
    for (std::size_t i = 0; i < p.k_histogram.size(); ++i) os << (i ? ";" : "") << p.k_histogram[i];
    os << '\n';
  }
}

/// Writes the points as CSV to `path` (see the stream overload).
inline void write_sweep_csv(const std::string& path, const std::vector<sweep_point>& points) {
  errno = 0;
  std::ofstream f(path, std::ios::binary);
  // The reason (no such folder, permission denied, ...) is what the user needs to fix it; std::ofstream
  // keeps it only in errno.
  if (!f)
    detail::raisef(errc::invalid_argument, "write_sweep_csv: cannot open '%s' for writing: %s", path.c_str(),
                   errno ? std::strerror(errno) : "unknown reason");
  write_sweep_csv(f, points);
  f.flush();
  if (!f) detail::raisef(errc::invalid_argument, "write_sweep_csv: writing '%s' failed", path.c_str());
}

DMOE_NAMESPACE_END  // namespace dmoe
