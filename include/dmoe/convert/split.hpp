// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Neuron split of a dense FFN into E experts of equal width (docs/algorithms.md section 5.2,
/// after MoEfication): balanced k-means on the neurons' unit-normalised input-weight vectors,
/// or the contiguous and random baselines.
///
/// Balanced k-means: k-means++ initialisation (seeded), then alternate an exact balanced
/// assignment (each cluster gets exactly n = F / E neurons, minimising the total squared distance
/// to the centroids; convert/detail/balanced_assignment.hpp) and the centroid update (mean),
/// until the assignment stops changing or max_iterations; several restarts, the lowest inertia
/// wins. Because every cluster holds exactly n unit vectors, sum ||x - mu||^2 differs from
/// -2 sum <x, mu> by a constant, so the assignment maximises the total dot product.
/// Cold path: allocates, throws dmoe::error on bad input.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include "../core/status.hpp"
#include "../cpu/dense_ffn.hpp"
#include "../detail/random.hpp"
#include "../routing/routers.hpp"
#include "detail/balanced_assignment.hpp"

DMOE_NAMESPACE_BEGIN

/// How neurons are grouped into experts.
enum class split_method {
  balanced_kmeans,  ///< MoEfication-style clustering of the input-weight directions (default)
  contiguous,       ///< expert e takes neurons [e n, (e + 1) n) (baseline)
  random            ///< a seeded random permutation (baseline)
};

/// Which first-layer columns describe a neuron of a gated FFN (SwiGLU, GeGLU).
enum class gated_features {
  gate,         ///< the gate column only (default): the gate decides when a unit is on
  gate_and_up   ///< the gate and up columns, each normalised, concatenated
};

struct split_options {
  split_method method = split_method::balanced_kmeans;
  std::uint64_t seed = 0;
  int restarts = 3;         ///< k-means runs from different k-means++ seeds; the lowest inertia is kept
  int max_iterations = 25;  ///< assignment + update rounds per run (stops earlier when stable)
  gated_features gated = gated_features::gate;
};

/// A neuron split. Expert e owns neurons[e * width, (e + 1) * width), ascending within an expert
/// (the dense model's order is kept inside each expert).
struct neuron_split {
  index_t num_experts = 0;
  index_t width = 0;
  std::vector<index_t> neurons;
  /// Sum over neurons of the squared distance of the unit-normalised feature vector to the mean of
  /// its expert's vectors (reported for every method, so the baselines can be compared).
  double inertia = 0;
  int iterations = 0;  ///< k-means rounds of the kept restart (0 for the baselines)
  int restart = 0;     ///< index of the kept restart
  bool converged = false;  ///< the kept restart stopped because the assignment stopped changing
  int total_iterations = 0;  ///< k-means rounds over all restarts (the cost driver)
  std::vector<double> restart_inertia;  ///< final inertia of every restart, in order

  index_t hidden() const noexcept { return num_experts * width; }
  /// The neuron at position j of expert e.
  index_t neuron(index_t e, index_t j) const noexcept { return neurons[static_cast<std::size_t>(e * width + j)]; }
  /// expert_of()[i] is the expert that owns dense neuron i.
  std::vector<index_t> expert_of() const {
    std::vector<index_t> out(neurons.size(), -1);
    for (std::size_t s = 0; s < neurons.size(); ++s)
      out[static_cast<std::size_t>(neurons[s])] = width > 0 ? index_t(s) / width : 0;
    return out;
  }
};

/// Throws dmoe::error unless `s` is a valid split of `hidden` neurons: num_experts * width ==
/// hidden, every neuron exactly once, ascending within each expert.
inline void validate_split(const neuron_split& s, index_t hidden, const char* who = "validate_split") {
  if (s.num_experts < 1 || s.width < 1 || s.num_experts * s.width != hidden ||
      index_t(s.neurons.size()) != hidden)
    detail::raisef(errc::invalid_argument,
                   "%s: split has %td experts of width %td and %zu neurons, the FFN has %td hidden units "
                   "(need num_experts * width == neurons.size() == hidden)",
                   who, s.num_experts, s.width, s.neurons.size(), hidden);
  std::vector<char> seen(static_cast<std::size_t>(hidden), 0);
  for (index_t e = 0; e < s.num_experts; ++e)
    for (index_t j = 0; j < s.width; ++j) {
      const index_t v = s.neuron(e, j);
      if (v < 0 || v >= hidden || seen[static_cast<std::size_t>(v)])
        detail::raisef(errc::invalid_argument, "%s: neuron %td at expert %td position %td is %s", who, v, e, j,
                       (v < 0 || v >= hidden) ? "out of range" : "a duplicate");
      seen[static_cast<std::size_t>(v)] = 1;
      if (j > 0 && s.neuron(e, j - 1) > v)
        detail::raisef(errc::invalid_argument, "%s: expert %td's neurons are not ascending at position %td", who, e,
                       j);
    }
}

namespace detail::conversion {

using dmat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;

/// Sum of squared distances of the columns of X to the mean of their cluster.
inline double split_inertia(const dmat& X, const std::vector<index_t>& assign, index_t E) {
  dmat mu = dmat::Zero(X.rows(), E);
  std::vector<index_t> count(static_cast<std::size_t>(E), 0);
  for (index_t p = 0; p < X.cols(); ++p) {
    mu.col(assign[static_cast<std::size_t>(p)]) += X.col(p);
    ++count[static_cast<std::size_t>(assign[static_cast<std::size_t>(p)])];
  }
  for (index_t k = 0; k < E; ++k)
    if (count[static_cast<std::size_t>(k)]) mu.col(k) /= double(count[static_cast<std::size_t>(k)]);
  double total = 0;
  for (index_t p = 0; p < X.cols(); ++p) total += (X.col(p) - mu.col(assign[static_cast<std::size_t>(p)])).squaredNorm();
  return total;
}

/// The split whose expert e holds the neurons with assign == e, ascending.
inline neuron_split split_from_assignment(const std::vector<index_t>& assign, index_t E) {
  neuron_split s;
  const index_t F = index_t(assign.size());
  s.num_experts = E;
  s.width = F / E;
  s.neurons.resize(assign.size());
  std::vector<index_t> cursor(static_cast<std::size_t>(E));
  for (index_t k = 0; k < E; ++k) cursor[static_cast<std::size_t>(k)] = k * s.width;
  for (index_t p = 0; p < F; ++p) s.neurons[static_cast<std::size_t>(cursor[static_cast<std::size_t>(assign[static_cast<std::size_t>(p)])]++)] = p;
  return s;
}

/// k-means++: the first centre is a uniform point, each next one a point drawn with probability
/// proportional to its squared distance to the nearest centre chosen so far.
inline dmat kmeanspp(const dmat& X, index_t E, detail::rng& g) {
  const index_t F = X.cols();
  dmat C(X.rows(), E);
  // ||x - c||^2 = ||x||^2 + ||c||^2 - 2 <x, c>: one matrix-vector product per centre (the
  // direct form costs several times more at E in the hundreds).
  const Eigen::VectorXd xn = X.colwise().squaredNorm().transpose();
  Eigen::VectorXd dots(F);
  const auto dist_to = [&](index_t col) {
    dots.noalias() = X.transpose() * C.col(col);
    return ((xn.array() + C.col(col).squaredNorm()) - 2.0 * dots.array()).cwiseMax(0.0).matrix();
  };
  C.col(0) = X.col(index_t(g.below(std::uint64_t(F))));
  Eigen::VectorXd d2 = dist_to(0);
  for (index_t k = 1; k < E; ++k) {
    const double total = d2.sum();
    index_t pick = F - 1;
    if (total > 0) {
      const double u = g.uniform() * total;
      double acc = 0;
      for (index_t p = 0; p < F; ++p) {
        acc += d2(p);
        if (u < acc) {
          pick = p;
          break;
        }
      }
    } else {
      pick = index_t(g.below(std::uint64_t(F)));  // all points coincide with centres already
    }
    C.col(k) = X.col(pick);
    d2 = d2.cwiseMin(dist_to(k));
  }
  return C;
}

/// One balanced k-means run from a k-means++ start.
struct kmeans_run {
  std::vector<index_t> assign;
  double inertia = 0;
  int iterations = 0;
  bool converged = false;
};

inline kmeans_run balanced_kmeans_run(const dmat& X, index_t E, int max_iterations, detail::rng& g) {
  const index_t F = X.cols(), n = F / E;
  kmeans_run r;
  dmat C = kmeanspp(X, E, g);
  r.assign.assign(static_cast<std::size_t>(F), -1);
  std::vector<index_t> next(static_cast<std::size_t>(F));
  dmat S(E, F);
  std::vector<double> prices(static_cast<std::size_t>(E), 0.0);  // warm start of each assignment
  for (int it = 0; it < max_iterations; ++it) {
    // S(k, p) = -<mu_k, x_p>; column p is point p's row of the (F x E) cost matrix.
    S.noalias() = -(C.transpose() * X);
    balanced_assignment(S.data(), F, E, n, next.data(), prices.data());
    r.iterations = it + 1;
    if (next == r.assign) {
      r.converged = true;
      break;
    }
    r.assign.swap(next);
    C.setZero();
    for (index_t p = 0; p < F; ++p) C.col(r.assign[static_cast<std::size_t>(p)]) += X.col(p);
    C /= double(n);
  }
  r.inertia = split_inertia(X, r.assign, E);
  return r;
}

/// Columns of `w` scaled to unit L2 norm, in double (zero columns stay zero).
template <class Derived>
dmat unit_columns(const Eigen::MatrixBase<Derived>& w) {
  dmat X = w.template cast<double>();
  for (index_t p = 0; p < X.cols(); ++p) {
    const double nrm = X.col(p).norm();
    if (nrm > 0) X.col(p) /= nrm;
  }
  return X;
}

inline neuron_split split_features(const dmat& X, index_t E, const split_options& opt, const char* who) {
  const index_t F = X.cols();
  if (F < 1 || X.rows() < 1)
    detail::raisef(errc::invalid_argument, "%s: the weights are empty (%td x %td); need d_model >= 1 and F >= 1 neurons",
                   who, X.rows(), F);
  if (E < 1 || E > F)
    detail::raisef(errc::invalid_argument, "%s: num_experts must be in [1, F = %td], got %td", who, F, E);
  if (F % E != 0)
    detail::raisef(errc::invalid_argument,
                   "%s: F = %td neurons do not split into %td experts of equal width (F %% num_experts = %td)", who, F,
                   E, F % E);
  if (!X.allFinite())
    detail::raisef(errc::invalid_argument, "%s: the weights contain NaN or infinity", who);
  const auto sz = [](index_t v) { return static_cast<std::size_t>(v); };
  neuron_split best;
  switch (opt.method) {
    case split_method::contiguous: {
      std::vector<index_t> a(sz(F));
      for (index_t p = 0; p < F; ++p) a[sz(p)] = p / (F / E);
      best = split_from_assignment(a, E);
      best.inertia = split_inertia(X, a, E);
      return best;
    }
    case split_method::random: {
      std::vector<index_t> perm(sz(F)), a(sz(F));
      std::iota(perm.begin(), perm.end(), index_t{0});
      detail::rng g(opt.seed ^ 0x7a11d0f5e1ecULL);
      g.shuffle(perm.begin(), perm.end());
      for (index_t s = 0; s < F; ++s) a[sz(perm[sz(s)])] = s / (F / E);
      best = split_from_assignment(a, E);
      best.inertia = split_inertia(X, a, E);
      return best;
    }
    case split_method::balanced_kmeans: break;
    default: detail::raisef(errc::invalid_argument, "%s: unknown split_method %d", who, int(opt.method));
  }
  if (opt.restarts < 1 || opt.max_iterations < 1)
    detail::raisef(errc::invalid_argument, "%s: restarts and max_iterations must be >= 1, got %d and %d", who,
                   opt.restarts, opt.max_iterations);
  std::vector<double> inertias;
  kmeans_run kept;
  int kept_index = 0, total_iterations = 0;
  for (int r = 0; r < opt.restarts; ++r) {
    // Each restart has its own generator derived from (seed, r): runs are independent of each other.
    detail::rng seeder(opt.seed * 0x9E3779B97F4A7C15ULL + std::uint64_t(r) + 1);
    detail::rng g(seeder.next());
    kmeans_run run = balanced_kmeans_run(X, E, opt.max_iterations, g);
    inertias.push_back(run.inertia);
    total_iterations += run.iterations;
    if (r == 0 || run.inertia < kept.inertia) {
      kept = std::move(run);
      kept_index = r;
    }
  }
  best = split_from_assignment(kept.assign, E);
  best.inertia = kept.inertia;
  best.iterations = kept.iterations;
  best.converged = kept.converged;
  best.restart = kept_index;
  best.total_iterations = total_iterations;
  best.restart_inertia = std::move(inertias);
  return best;
}

}  // namespace detail::conversion

/// Splits F neurons into num_experts experts of width F / num_experts.
/// \param w1 (d_model x F): column j is neuron j's input-weight vector (our W1 layout; PyTorch's
///        nn.Linear weight of the first layer is (F x d_model): pass its transpose).
/// Throws dmoe::error if F % num_experts != 0, num_experts is not in [1, F], w1 is empty or not finite.
template <class T>
neuron_split split_neurons(const col_matrix<T>& w1, index_t num_experts, const split_options& opt = {}) {
  return detail::conversion::split_features(detail::conversion::unit_columns(w1), num_experts, opt, "split_neurons");
}

/// The same for any Eigen expression whose columns are the neurons, e.g. the transpose of a
/// PyTorch (F x d_model) first-layer weight: split_neurons(w_torch.transpose(), E).
template <class Derived>
neuron_split split_neurons(const Eigen::MatrixBase<Derived>& w1, index_t num_experts, const split_options& opt = {}) {
  return detail::conversion::split_features(detail::conversion::unit_columns(w1), num_experts, opt, "split_neurons");
}

/// Splits a dense FFN's hidden units. Gated FFNs (SwiGLU, GeGLU) are clustered on their gate
/// columns by default: the gate decides when a unit is active (act(gate) is near zero for most
/// tokens), so units with similar gate directions switch on together, which is what an expert
/// should group; opt.gated = gate_and_up clusters on both columns, each normalised.
template <class T, class Act>
neuron_split split_neurons(const dense_ffn<T, Act>& dense, index_t num_experts, const split_options& opt = {}) {
  const index_t F = dense.hidden();
  if constexpr (Act::gated) {
    if (opt.gated == gated_features::gate_and_up) {
      const index_t d = dense.d_model();
      detail::conversion::dmat X(2 * d, F);
      X.topRows(d) = detail::conversion::unit_columns(dense.w1().leftCols(F));
      X.bottomRows(d) = detail::conversion::unit_columns(dense.w1().rightCols(F));
      return detail::conversion::split_features(detail::conversion::unit_columns(X), num_experts, opt, "split_neurons");
    }
  }
  return detail::conversion::split_features(detail::conversion::unit_columns(dense.w1().leftCols(F)), num_experts, opt,
                                        "split_neurons");
}

DMOE_NAMESPACE_END  // namespace dmoe
