// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Independent references for the backward tests (tests/unit/backward/),
/// written in plain loops over the layer's public accessors, in double, without
/// any dmoe kernel:
///  - the finite-difference criterion;
///  - the expert forward (own activation formulas) and the relu kink margin;
///  - the top-any straight-through SURROGATE of docs/algorithms.md section 4.3 (top-any backward):
///  at the base point
///    theta0 record the fired set F = {(t, e): active_e and cos_te > g_e} and
///    K_t = |F_t|; then
///      a_te(theta) = 1 + [s(cos_te(theta)) - s(g_e(theta))] -
///      [s(cos_te(theta0)) - s(g_e(theta0))]
///    on F (0 elsewhere, s = sigmoid), y_t = sum_{e in F_t} a_te / K_t *
///    y_e(x_t) + b2 with K_t held constant, and the auxiliary terms efficiency
///    / balance written with this a (balance's ce at theta0, constant),
///    diversity and simplicity with their true values. Its gradient is, by
///    construction, what the straight-through estimator claims, so its central
///    differences check the library's backward. In inference mode a token with
///    K_t = 0 uses the best active expert (recorded at theta0) with the
///    constant weight 1.
///  - the auxiliary-loss values of top_k (load balance, z-loss) and top_any.
/// Free of doctest, so any test binary can use it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <dmoe/dmoe.hpp>
#include <dmoe/routing/aux_loss.hpp>

#include "test_random.hpp"
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace dmoe_fd {

using dmoe::index_t;

/// The backward tests' generator (its own seed scrambling, see test_random.hpp).
class rng : public dmoe_testing::splitmix {
 public:
  explicit rng(std::uint64_t seed) : splitmix(seed, 0x9E3779B97F4A7C15ull, 0x632BE59BD9B4E019ull) {}
};

// --- finite-difference criterion
// ---------------------------------------------------------------
/// Central differences num = (L(p + h) - L(p - h)) / 2h agree with the analytic
/// gradient an iff
///   |num - an| <= rtol * max(1, |num| + |an|),
/// i.e. relative error rtol for gradients of magnitude >= 1/2 and absolute
/// error rtol below.
inline double fd_bound(double num, double an, double rtol) {
  return rtol * std::max(1.0, std::fabs(num) + std::fabs(an));
}
inline bool fd_close(double num, double an, double rtol) { return std::fabs(num - an) <= fd_bound(num, an, rtol); }

// --- activations (own formulas)
// -----------------------------------------------------------------
template <class A>
inline constexpr bool gated_v = std::is_same_v<A, dmoe::swiglu> || std::is_same_v<A, dmoe::geglu>;

/// The elementwise function of A (of its gate for gated A).
template <class A>
double base_act(double v) {
  if constexpr (std::is_same_v<A, dmoe::relu>) {
    return v > 0 ? v : 0.0;
  } else if constexpr (std::is_same_v<A, dmoe::gelu_erf> || std::is_same_v<A, dmoe::geglu>) {
    return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  } else if constexpr (std::is_same_v<A, dmoe::gelu_tanh>) {
    const double c = std::sqrt(2.0 / 3.14159265358979323846);
    return 0.5 * v * (1.0 + std::tanh(c * (v + 0.044715 * v * v * v)));
  } else {
    static_assert(std::is_same_v<A, dmoe::silu> || std::is_same_v<A, dmoe::swiglu>, "unknown activation");
    return v / (1.0 + std::exp(-v));
  }
}
/// True when A has a kink (relu): finite differences need a margin from it.
template <class A>
inline constexpr bool has_kink_v = std::is_same_v<A, dmoe::relu>;

/// y_e(x) of one expert in plain loops: pre = x W1_e + b1_e, h = act(pre)
/// (gated: act(gate) up), y = h W2_e + b2_e. `pre` gets the f*n
/// pre-activations.
template <class A, class T>
void expert_forward(const dmoe::expert_weights<T>& w, index_t e, const T* x, std::vector<double>& pre,
                    std::vector<double>& y) {
  const index_t d = w.d_model(), n = w.width(), fn = gated_v<A> ? 2 * n : n;
  const auto W1 = w.w1(e);
  const auto b1 = w.b1(e);
  const auto W2 = w.w2(e);
  const auto be = w.expert_bias(e);
  pre.assign(std::size_t(fn), 0.0);
  for (index_t j = 0; j < fn; ++j) {
    double s = b1.size() ? double(b1(j)) : 0.0;
    for (index_t i = 0; i < d; ++i) s += double(x[i]) * double(W1(i, j));
    pre[std::size_t(j)] = s;
  }
  std::vector<double> h(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j)
    h[std::size_t(j)] =
        gated_v<A> ? base_act<A>(pre[std::size_t(j)]) * pre[std::size_t(n + j)] : base_act<A>(pre[std::size_t(j)]);
  y.assign(std::size_t(d), 0.0);
  for (index_t c = 0; c < d; ++c) {
    double s = be.size() ? double(be(c)) : 0.0;
    for (index_t j = 0; j < n; ++j) s += h[std::size_t(j)] * double(W2(j, c));
    y[std::size_t(c)] = s;
  }
}

/// Smallest |pre-activation| of the kinked unit over the (token, expert) pairs
/// of `pairs` (pairs of token, expert); +inf for smooth activations.
template <class A, class T>
double kink_margin(const dmoe::expert_weights<T>& w, const T* x, index_t ld,
                   const std::vector<std::pair<index_t, index_t>>& pairs) {
  double m = HUGE_VAL;
  if constexpr (has_kink_v<A>) {
    std::vector<double> pre, y;
    for (const auto& p : pairs) {
      expert_forward<A>(w, p.second, x + p.first * ld, pre, y);
      for (double v : pre) m = std::min(m, std::fabs(v));
    }
  }
  return m;
}

// --- routing plans
// ------------------------------------------------------------------------------
/// A copy of a routing plan's structure (which experts each token runs) and
/// weights.
struct plan_snapshot {
  std::vector<index_t> offsets;
  std::vector<std::int32_t> expert;
  std::vector<double> weight;
  /// Same selection (offsets and experts); weights are continuous and not
  /// compared.
  bool same_selection(const plan_snapshot& o) const { return offsets == o.offsets && expert == o.expert; }
  std::vector<std::pair<index_t, index_t>> pairs() const {
    std::vector<std::pair<index_t, index_t>> r;
    for (std::size_t t = 0; t + 1 < offsets.size(); ++t)
      for (index_t s = offsets[t]; s < offsets[t + 1]; ++s) r.emplace_back(index_t(t), index_t(expert[std::size_t(s)]));
    return r;
  }
};
template <class T>
plan_snapshot snapshot(const dmoe::routing_plan<T>& p) {
  plan_snapshot s;
  if (p.tokens == 0) return s;
  s.offsets.assign(p.token_offsets, p.token_offsets + p.tokens + 1);
  s.expert.assign(p.expert, p.expert + p.nnz());
  for (index_t i = 0; i < p.nnz(); ++i) s.weight.push_back(double(p.weight[i]));
  return s;
}

// --- top_k references
// ---------------------------------------------------------------------------
/// Softmax probabilities, log-sum-exp and selection of one token (own loops).
/// Returns the gap between the k-th and (k+1)-th probability (inf when k = E).
template <class T>
double top_k_token(const dmoe::top_k_router<T>& r, const T* x, index_t k, std::vector<double>& p, double& lse,
                   std::vector<int>& sel) {
  const index_t E = r.num_experts(), d = r.d_model();
  std::vector<double> z(static_cast<std::size_t>(E));
  double zmax = -HUGE_VAL;
  for (index_t e = 0; e < E; ++e) {
    double s = double(r.bias()(e));
    for (index_t i = 0; i < d; ++i) s += double(x[i]) * double(r.weight()(i, e));
    z[std::size_t(e)] = s;
    zmax = std::max(zmax, s);
  }
  double sum = 0;
  for (double v : z) sum += std::exp(v - zmax);
  lse = zmax + std::log(sum);
  p.resize(std::size_t(E));
  for (index_t e = 0; e < E; ++e) p[std::size_t(e)] = std::exp(z[std::size_t(e)] - lse);
  std::vector<int> order(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e) order[std::size_t(e)] = int(e);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[std::size_t(a)] > p[std::size_t(b)]; });
  sel.assign(order.begin(), order.begin() + k);
  std::sort(sel.begin(), sel.end());
  return k < E ? p[std::size_t(order[std::size_t(k - 1)])] - p[std::size_t(order[std::size_t(k)])] : HUGE_VAL;
}

/// load_balance = E sum_e f_e P_e (f_e share of slots, P_e mean p_e), z_loss =
/// mean_t lse_t^2.
template <class T>
dmoe::aux_losses top_k_aux_ref(const dmoe::top_k_router<T>& r, const T* x, index_t ld, index_t tokens) {
  dmoe::aux_losses v;
  if (tokens == 0) return v;
  const index_t E = r.num_experts(), k = r.options().k;
  std::vector<double> f(std::size_t(E), 0.0), P(std::size_t(E), 0.0), p;
  std::vector<int> sel;
  double lse = 0, z = 0;
  for (index_t t = 0; t < tokens; ++t) {
    top_k_token(r, x + t * ld, k, p, lse, sel);
    for (int e : sel) f[std::size_t(e)] += 1.0 / double(tokens * k);
    for (index_t e = 0; e < E; ++e) P[std::size_t(e)] += p[std::size_t(e)] / double(tokens);
    z += lse * lse / double(tokens);
  }
  double lb = 0;
  for (index_t e = 0; e < E; ++e) lb += f[std::size_t(e)] * P[std::size_t(e)];
  v.load_balance = double(E) * lb;
  v.z_loss = z;
  return v;
}

// --- top_any references
// -------------------------------------------------------------------------
inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

/// cos_te with max(|.|, 1e-12) norms.
template <class T>
double cosine(const dmoe::top_any_router<T>& r, const T* x, index_t e) {
  const index_t d = r.d_model();
  double xx = 0, ww = 0, xw = 0;
  for (index_t i = 0; i < d; ++i) {
    const double a = double(x[i]), b = double(r.weight()(i, e));
    xx += a * a;
    ww += b * b;
    xw += a * b;
  }
  return xw / (std::max(std::sqrt(xx), 1e-12) * std::max(std::sqrt(ww), 1e-12));
}

/// || (What^T What - I) over active x active ||_F with unit columns.
template <class T>
double diversity_ref(const dmoe::top_any_router<T>& r) {
  const index_t d = r.d_model(), E = r.num_experts();
  std::vector<double> nrm(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e) {
    double s = 0;
    for (index_t i = 0; i < d; ++i) s += double(r.weight()(i, e)) * double(r.weight()(i, e));
    nrm[std::size_t(e)] = std::max(std::sqrt(s), 1e-12);
  }
  double sq = 0;
  for (index_t a = 0; a < E; ++a)
    for (index_t b = 0; b < E; ++b) {
      if (!r.active()[std::size_t(a)] || !r.active()[std::size_t(b)]) continue;
      double s = 0;
      for (index_t i = 0; i < d; ++i) s += double(r.weight()(i, a)) * double(r.weight()(i, b));
      const double m = s / (nrm[std::size_t(a)] * nrm[std::size_t(b)]) - (a == b ? 1.0 : 0.0);
      sq += m * m;
    }
  return std::sqrt(sq);
}

/// (1/E) sum over all slots of |w_e|.
template <class T>
double simplicity_ref(const dmoe::top_any_router<T>& r) {
  const index_t d = r.d_model(), E = r.num_experts();
  double s = 0;
  for (index_t e = 0; e < E; ++e) {
    double q = 0;
    for (index_t i = 0; i < d; ++i) q += double(r.weight()(i, e)) * double(r.weight()(i, e));
    s += std::sqrt(q);
  }
  return s / double(E);
}

/// The routing state at theta0 that the surrogate holds fixed.
struct top_any_state {
  index_t tokens = 0, E = 0;
  bool training = true;
  std::vector<double> cos0, g0;  ///< (tokens x E), (E)
  std::vector<char> fired;       ///< (tokens x E)
  std::vector<int> K,
      fallback;              ///< (tokens): K_t; inference fallback expert or -1
  int fired_tokens = 0;      ///< tokens with K_t > 0
  std::vector<double> ce;    ///< (E) mean of a at theta0 over tokens with K_t > 0
  double margin = HUGE_VAL;  ///< min over active slots |cos - g|, and fallback
                             ///< best-vs-second gaps

  bool is_fired(index_t t, index_t e) const { return fired[std::size_t(t * E + e)] != 0; }
  /// The selection the layer must have made: per token, ascending experts.
  plan_snapshot expected_plan() const {
    plan_snapshot s;
    s.offsets.push_back(0);
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t e = 0; e < E; ++e)
        if (is_fired(t, e)) {
          s.expert.push_back(std::int32_t(e));
          s.weight.push_back(1.0 / double(K[std::size_t(t)]));
        }
      if (K[std::size_t(t)] == 0 && fallback[std::size_t(t)] >= 0) {
        s.expert.push_back(std::int32_t(fallback[std::size_t(t)]));
        s.weight.push_back(1.0);
      }
      s.offsets.push_back(index_t(s.expert.size()));
    }
    return s;
  }
};

template <class T>
top_any_state record_top_any(const dmoe::top_any_router<T>& r, const T* x, index_t ld, index_t tokens) {
  top_any_state s;
  const index_t E = r.num_experts();
  s.tokens = tokens;
  s.E = E;
  s.training = r.options().training;
  s.cos0.assign(std::size_t(tokens * E), 0.0);
  s.g0.resize(std::size_t(E));
  for (index_t e = 0; e < E; ++e) s.g0[std::size_t(e)] = double(r.threshold()(e));
  s.fired.assign(std::size_t(tokens * E), 0);
  s.K.assign(std::size_t(tokens), 0);
  s.fallback.assign(std::size_t(tokens), -1);
  s.ce.assign(std::size_t(E), 0.0);
  for (index_t t = 0; t < tokens; ++t) {
    int best = -1;
    double best_c = 0, second_c = -HUGE_VAL;
    for (index_t e = 0; e < E; ++e) {
      const double c = cosine(r, x + t * ld, e);
      s.cos0[std::size_t(t * E + e)] = c;
      if (!r.active()[std::size_t(e)]) continue;
      s.margin = std::min(s.margin, std::fabs(c - s.g0[std::size_t(e)]));
      if (c > s.g0[std::size_t(e)]) {
        s.fired[std::size_t(t * E + e)] = 1;
        ++s.K[std::size_t(t)];
      }
      if (best < 0 || c > best_c) {
        second_c = best < 0 ? second_c : best_c;
        best = int(e);
        best_c = c;
      } else {
        second_c = std::max(second_c, c);
      }
    }
    if (s.K[std::size_t(t)] == 0 && !s.training) {
      s.fallback[std::size_t(t)] = best;
      s.margin = std::min(s.margin, best_c - second_c);
    }
    if (s.K[std::size_t(t)] > 0) {
      ++s.fired_tokens;
      for (index_t e = 0; e < E; ++e) s.ce[std::size_t(e)] += s.is_fired(t, e) ? 1.0 : 0.0;
    }
  }
  if (s.fired_tokens > 0)
    for (auto& c : s.ce) c /= double(s.fired_tokens);
  return s;
}

/// Parts of the surrogate loss.
struct surrogate_value {
  double task = 0;        ///< sum_t <dy_t, y_t>
  dmoe::aux_losses aux;   ///< the four top_any terms (surrogate a for efficiency and balance)
  std::vector<double> y;  ///< (tokens x d) surrogate output
  double total(const dmoe::aux_losses& weights) const { return task + aux.weighted_sum(weights); }
};

/// The surrogate at the current parameters (w, r, x) with the routing state s
/// of theta0.
template <class A, class T>
surrogate_value top_any_surrogate(const dmoe::expert_weights<T>& w, const dmoe::top_any_router<T>& r, const T* x,
                                  index_t ldx, const T* dy, index_t lddy, const top_any_state& s) {
  surrogate_value v;
  const index_t d = w.d_model(), E = s.E, tokens = s.tokens;
  const auto b2 = w.output_bias();
  v.y.assign(std::size_t(tokens * d), 0.0);
  std::vector<double> a(std::size_t(tokens * E), 0.0), pre, ye;
  for (index_t t = 0; t < tokens; ++t)
    for (index_t e = 0; e < E; ++e)
      if (s.is_fired(t, e)) {
        const double c = cosine(r, x + t * ldx, e), g = double(r.threshold()(e));
        a[std::size_t(t * E + e)] =
            1.0 + (sigmoid(c) - sigmoid(g)) - (sigmoid(s.cos0[std::size_t(t * E + e)]) - sigmoid(s.g0[std::size_t(e)]));
      }
  for (index_t t = 0; t < tokens; ++t) {
    double* yt = v.y.data() + t * d;
    for (index_t c = 0; c < d; ++c) yt[c] = b2.size() ? double(b2(c)) : 0.0;
    const int K = s.K[std::size_t(t)];
    for (index_t e = 0; e < E; ++e) {
      double weight = 0;
      if (s.is_fired(t, e))
        weight = a[std::size_t(t * E + e)] / double(K);
      else if (K == 0 && s.fallback[std::size_t(t)] == int(e))
        weight = 1.0;
      else
        continue;
      expert_forward<A>(w, e, x + t * ldx, pre, ye);
      for (index_t c = 0; c < d; ++c) yt[c] += weight * ye[std::size_t(c)];
    }
    for (index_t c = 0; c < d; ++c) v.task += double(dy[t * lddy + c]) * yt[c];
  }
  double eff = 0;
  for (double q : a) eff += q;
  v.aux.efficiency = tokens > 0 ? eff / (double(tokens) * double(E)) : 0.0;
  double bal = 0;
  if (s.fired_tokens > 0) {
    for (index_t e = 0; e < E; ++e) {
      double me = 0;
      for (index_t t = 0; t < tokens; ++t)
        if (s.is_fired(t, e)) me += a[std::size_t(t * E + e)] / double(s.K[std::size_t(t)]);
      me /= double(s.fired_tokens);
      bal += me * s.ce[std::size_t(e)];
    }
    bal *= double(E);  // E^2 * mean over the E slots
  }
  v.aux.balance = bal;
  v.aux.diversity = diversity_ref(r);
  v.aux.simplicity = simplicity_ref(r);
  return v;
}

// --- comparisons
// --------------------------------------------------------------------------------
/// |a - b| <= tol * max(1, |b|) for each of the six aux_losses fields;
/// describes the first difference in *why.
inline bool aux_close(const dmoe::aux_losses& got, const dmoe::aux_losses& want, double tol, std::string* why) {
  const double g[6] = {got.load_balance, got.z_loss, got.diversity, got.simplicity, got.balance, got.efficiency};
  const double w[6] = {want.load_balance, want.z_loss, want.diversity, want.simplicity, want.balance, want.efficiency};
  const char* names[6] = {"load_balance", "z_loss", "diversity", "simplicity", "balance", "efficiency"};
  for (int i = 0; i < 6; ++i)
    if (!(std::fabs(g[i] - w[i]) <= tol * std::max(1.0, std::fabs(w[i])))) {
      if (why) {
        std::ostringstream m;
        m.precision(17);
        m << names[i] << ": layer " << g[i] << ", reference " << w[i];
        *why = m.str();
      }
      return false;
    }
  return true;
}

}  // namespace dmoe_fd
