// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../../core/namespace.hpp"
/// \file
/// Exact balanced assignment: F points, E clusters, every cluster receives exactly `capacity`
/// points (F = E * capacity), minimising the total cost sum_p c(p, cluster(p)).
///
/// It is a transportation problem (min-cost flow: source -> points -> clusters -> sink). We solve
/// it by successive shortest paths, adding one point at a time, on a residual graph contracted to
/// the E cluster nodes: moving a point q from cluster a to cluster b costs c(q, b) - c(q, a), so
/// the edge a -> b weighs w(a, b) = min over q in a of that difference. Point p's augmenting path
/// is p -> b0 (cost c(p, b0)) -> b1 -> ... -> bk, bk a cluster with room; each step moves the
/// minimising point one cluster along. Cluster potentials (prices) pi keep every reduced weight r(a, b) = w(a, b) + pi(a) - pi(b) non-negative, so each
/// search is a dense Dijkstra over E nodes, stopped at the first cluster with room it settles
/// (reduced distance delta). Why the result is optimal:
///  - with D the exact reduced distances from the new point, the update pi(v) += min(D(v), delta) -
///    delta keeps every reduced weight non-negative: min(D(b), delta) <= min(D(a), delta) + r(a, b)
///    by the triangle inequality. The point moved along a path edge a -> b and the new point p
///    create edges b -> k; since D(b) = D(a) + r_q(a, b) <= delta (b lies on the shortest path),
///    their reduced weight is r_q(a, k) + D(a) - min(D(k), delta) >= 0 (for p: c(p, k) - pi(k)
///    - min(D(k), delta) >= 0). So no negative cycle ever exists among the placed points;
///  - at the end every cluster is full, and a balanced assignment whose contracted residual graph
///    has no negative cycle is optimal (min-cost flow optimality: the residual graph of a full
///    assignment has no edge at the source or sink that could lie on a cycle).
/// Cost: F searches of O(E) per settled cluster (with good start prices most settle one), plus,
/// per moved point, O(E) updates and a rescan of its old cluster (O(capacity)) for each pair whose
/// minimum it held. Memory O(E^2 + F). Deterministic: ties go
/// to the lower cluster index, and nothing depends on threads or hashing.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../core/config.hpp"
#include "../../core/status.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::conversion {

/// Solves the balanced assignment for the row-major (F x E) cost matrix `cost` (cost[p * E + k] is
/// c(p, k)). Writes assign[p] in [0, E) and returns the total cost. `potentials` (E values, may be
/// null) are the cluster prices the searches start from and are left holding the final ones: any
/// start is valid (with no point placed there is no edge to violate), and good prices (those of the
/// previous k-means round) make most searches stop at their first pop. Cold path (allocates).
inline double balanced_assignment(const double* cost, index_t F, index_t E, index_t capacity, index_t* assign,
                                  double* potentials = nullptr) {
  if (E < 1 || capacity < 1 || F != E * capacity)
    detail::raisef(errc::invalid_argument,
                   "balanced_assignment: %td points cannot fill %td clusters of exactly %td (need F = E * capacity)",
                   F, E, capacity);
  for (index_t i = 0; i < F * E; ++i)
    if (!std::isfinite(cost[i]))
      detail::raisef(errc::invalid_argument, "balanced_assignment: cost of point %td, cluster %td is not finite", i / E,
                     i % E);
  const double inf = std::numeric_limits<double>::infinity();
  const auto sz = [](index_t v) { return static_cast<std::size_t>(v); };
  const auto c = [&](index_t p, index_t k) { return cost[sz(p * E + k)]; };

  std::vector<std::vector<index_t>> members(sz(E));
  for (auto& m : members) m.reserve(sz(capacity));
  // best[a * E + b] = min over q in a of c(q, b) - c(q, a); arg = that q (-1 when a is empty).
  std::vector<double> best(sz(E * E), inf);
  std::vector<index_t> arg(sz(E * E), -1);
  std::vector<double> pi(sz(E), 0.0), dist(sz(E));
  if (potentials) std::copy(potentials, potentials + E, pi.begin());
  std::vector<index_t> pred(sz(E)), pred_point(sz(E)), popped;
  popped.reserve(sz(E));
  std::vector<char> done(sz(E));

  const auto add_point = [&](index_t q, index_t b) {
    assign[q] = b;
    members[sz(b)].push_back(q);
    for (index_t k = 0; k < E; ++k) {
      if (k == b) continue;
      const double v = c(q, k) - c(q, b);
      const std::size_t i = sz(b * E + k);
      if (arg[i] < 0 || v < best[i] || (v == best[i] && q < arg[i])) {
        best[i] = v;
        arg[i] = q;
      }
    }
  };
  const auto remove_point = [&](index_t q, index_t a) {
    auto& m = members[sz(a)];
    m.erase(std::find(m.begin(), m.end(), q));
    for (index_t k = 0; k < E; ++k) {
      const std::size_t i = sz(a * E + k);
      if (k == a || arg[i] != q) continue;
      best[i] = inf;
      arg[i] = -1;
      for (index_t r : m) {
        const double v = c(r, k) - c(r, a);
        if (arg[i] < 0 || v < best[i] || (v == best[i] && r < arg[i])) {
          best[i] = v;
          arg[i] = r;
        }
      }
    }
  };

  for (index_t p = 0; p < F; ++p) {
    // Dijkstra from p over the clusters with reduced weights (non-negative up to rounding), stopped
    // at the first cluster with room that it settles.
    for (index_t k = 0; k < E; ++k) {
      dist[sz(k)] = c(p, k) - pi[sz(k)];
      pred[sz(k)] = -1;
      done[sz(k)] = 0;
    }
    popped.clear();
    index_t target = -1;
    while (target < 0) {
      index_t a = -1;
      for (index_t k = 0; k < E; ++k)
        if (!done[sz(k)] && (a < 0 || dist[sz(k)] < dist[sz(a)])) a = k;
      done[sz(a)] = 1;
      popped.push_back(a);
      if (index_t(members[sz(a)].size()) < capacity) {
        target = a;
        break;
      }
      for (index_t b = 0; b < E; ++b) {
        const std::size_t i = sz(a * E + b);
        if (done[sz(b)] || arg[i] < 0) continue;
        const double nd = dist[sz(a)] + best[i] + pi[sz(a)] - pi[sz(b)];
        if (nd < dist[sz(b)]) {
          dist[sz(b)] = nd;
          pred[sz(b)] = a;
          pred_point[sz(b)] = arg[i];
        }
      }
    }
    // New prices pi(v) += min(dist(v), delta) - delta: only the settled clusters change. Every
    // reduced weight stays non-negative, those along the path become 0 (see the file comment).
    const double delta = dist[sz(target)];
    for (index_t v : popped) pi[sz(v)] += dist[sz(v)] - delta;
    // Augment: walk back from the target, moving each edge's point one cluster forward.
    index_t b = target;
    while (pred[sz(b)] >= 0) {
      const index_t a = pred[sz(b)], q = pred_point[sz(b)];
      remove_point(q, a);
      add_point(q, b);
      b = a;
    }
    add_point(p, b);
  }
  if (potentials) std::copy(pi.begin(), pi.end(), potentials);
  double total = 0;
  for (index_t p = 0; p < F; ++p) total += c(p, assign[p]);
  return total;
}

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::conversion
