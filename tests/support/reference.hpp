// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// An independent, slow reference of the dmoe forward pass (docs/algorithms.md sections 1-4 and 6: experts, top-k, dynamic-k, top-any, cost accounting),
/// written in plain loops in double precision over std::vector. It shares no code with the
/// library: no Eigen products, no dmoe::detail::select_* functions; every rule is re-derived from
/// the document. The only contact with the library is reading weights through the public
/// accessors (never the raw storage vectors, whose order is internal).
///
/// Besides the selection, the reference reports for every token a `margin`: how far (relative
/// to the scale of the quantities compared) the token's scores lie from the nearest decision
/// boundary. A library computing in float may legitimately decide a token whose margin is below
/// its rounding error the other way; tests skip such tokens (see borderline()).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <dmoe/dmoe.hpp>

namespace dmoe_test::ref {

// ------------------------------------------------------------------------------------------
// Activations (section 1).
enum class act_kind { relu, gelu_erf, gelu_tanh, silu, swiglu, geglu };

inline double relu(double x) { return x > 0.0 ? x : 0.0; }
inline double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
inline double gelu_tanh(double x) {
  const double c = std::sqrt(2.0 / 3.14159265358979323846);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}
inline double silu(double x) { return x / (1.0 + std::exp(-x)); }

inline bool is_gated(act_kind k) { return k == act_kind::swiglu || k == act_kind::geglu; }

/// Non-gated activation (for gated kinds: their base applied to the gate).
inline double act_base(act_kind k, double x) {
  switch (k) {
    case act_kind::relu: return relu(x);
    case act_kind::gelu_erf: return gelu_erf(x);
    case act_kind::gelu_tanh: return gelu_tanh(x);
    case act_kind::silu: return silu(x);
    case act_kind::swiglu: return silu(x);
    case act_kind::geglu: return gelu_erf(x);
  }
  return 0.0;
}

inline const char* name(act_kind k) {
  switch (k) {
    case act_kind::relu: return "relu";
    case act_kind::gelu_erf: return "gelu_erf";
    case act_kind::gelu_tanh: return "gelu_tanh";
    case act_kind::silu: return "silu";
    case act_kind::swiglu: return "swiglu";
    case act_kind::geglu: return "geglu";
  }
  return "?";
}

/// The reference kind of a dmoe activation type.
template <class Act>
constexpr act_kind act_of() {
  if constexpr (std::is_same_v<Act, dmoe::relu>) return act_kind::relu;
  else if constexpr (std::is_same_v<Act, dmoe::gelu_erf>) return act_kind::gelu_erf;
  else if constexpr (std::is_same_v<Act, dmoe::gelu_tanh>) return act_kind::gelu_tanh;
  else if constexpr (std::is_same_v<Act, dmoe::silu>) return act_kind::silu;
  else if constexpr (std::is_same_v<Act, dmoe::swiglu>) return act_kind::swiglu;
  else {
    static_assert(std::is_same_v<Act, dmoe::geglu>, "unknown activation");
    return act_kind::geglu;
  }
}

// ------------------------------------------------------------------------------------------
// Experts (section 1), read through the accessors.
struct experts_model {
  int d = 0, E = 0, n = 0;
  act_kind act = act_kind::relu;
  // w1[(e * d + i) * fn + j]: input i -> first-layer output j (gated: j < n gate, j >= n up).
  std::vector<double> w1;
  std::vector<double> b1;   // [e * fn + j], empty without hidden bias
  std::vector<double> w2;   // [(e * n + j) * d + c]: hidden j -> output c
  std::vector<double> b2e;  // [e * d + c], empty without per-expert bias
  std::vector<double> b2;   // [c], empty without shared output bias
  int fn() const { return is_gated(act) ? 2 * n : n; }
};

template <class T>
experts_model read_experts(const dmoe::expert_weights<T>& w, act_kind act) {
  experts_model m;
  m.d = int(w.d_model());
  m.E = int(w.num_experts());
  m.n = int(w.width());
  m.act = act;
  const int d = m.d, n = m.n, fn = m.fn();
  m.w1.assign(size_t(m.E) * size_t(d) * size_t(fn), 0.0);
  m.w2.assign(size_t(m.E) * size_t(n) * size_t(d), 0.0);
  const bool hb = w.b1(0).size() > 0, eb = w.expert_bias(0).size() > 0;
  if (hb) m.b1.assign(size_t(m.E) * size_t(fn), 0.0);
  if (eb) m.b2e.assign(size_t(m.E) * size_t(d), 0.0);
  for (int e = 0; e < m.E; ++e) {
    const auto W1 = w.w1(e);
    const auto W2 = w.w2(e);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < fn; ++j) m.w1[(size_t(e) * d + i) * fn + j] = double(W1(i, j));
    for (int j = 0; j < n; ++j)
      for (int c = 0; c < d; ++c) m.w2[(size_t(e) * n + j) * d + c] = double(W2(j, c));
    if (hb) {
      const auto b1 = w.b1(e);
      for (int j = 0; j < fn; ++j) m.b1[size_t(e) * fn + j] = double(b1(j));
    }
    if (eb) {
      const auto b = w.expert_bias(e);
      for (int c = 0; c < d; ++c) m.b2e[size_t(e) * d + c] = double(b(c));
    }
  }
  const auto ob = w.output_bias();
  for (Eigen::Index c = 0; c < ob.size(); ++c) m.b2.push_back(double(ob(c)));
  return m;
}

/// y_e = act(x W1_e + b1_e) W2_e (+ b2_e) for one token. `abs_out` (optional) receives an upper
/// bound of the magnitudes summed into each output (for rounding-aware tolerances).
inline void expert_forward(const experts_model& m, int e, const double* x, double* out, double* abs_out) {
  const int d = m.d, n = m.n, fn = m.fn();
  std::vector<double> pre(size_t(fn), 0.0), pre_abs(size_t(fn), 0.0);
  for (int j = 0; j < fn; ++j) {
    double s = m.b1.empty() ? 0.0 : m.b1[size_t(e) * fn + j];
    double a = std::fabs(s);
    for (int i = 0; i < d; ++i) {
      const double p = x[i] * m.w1[(size_t(e) * d + i) * fn + j];
      s += p;
      a += std::fabs(p);
    }
    pre[size_t(j)] = s;
    pre_abs[size_t(j)] = a;
  }
  std::vector<double> h(static_cast<size_t>(n)), h_abs(static_cast<size_t>(n));
  for (int j = 0; j < n; ++j) {
    if (is_gated(m.act)) {
      const double g = pre[size_t(j)], u = pre[size_t(n + j)];
      h[size_t(j)] = act_base(m.act, g) * u;
      // |act(g)| <= 1.2 |g| + 0.2 for every base here; |d act| <= 1.2.
      h_abs[size_t(j)] = (1.2 * pre_abs[size_t(j)] + 0.2) * pre_abs[size_t(n + j)];
    } else {
      h[size_t(j)] = act_base(m.act, pre[size_t(j)]);
      h_abs[size_t(j)] = 1.2 * pre_abs[size_t(j)];
    }
  }
  for (int c = 0; c < d; ++c) {
    double s = m.b2e.empty() ? 0.0 : m.b2e[size_t(e) * d + c];
    double a = std::fabs(s);
    for (int j = 0; j < n; ++j) {
      const double w = m.w2[(size_t(e) * n + j) * d + c];
      s += h[size_t(j)] * w;
      a += h_abs[size_t(j)] * std::fabs(w);
    }
    out[c] = s;
    if (abs_out) abs_out[c] = a;
  }
}

// ------------------------------------------------------------------------------------------
// Routers (sections 2-4).
enum class policy_kind { top_k, dynamic_k, top_any };

struct router_model {
  policy_kind policy = policy_kind::top_k;
  int d = 0, E = 0;
  // top_k: z = x Wr + br
  std::vector<double> wr;  // [i * E + e]
  std::vector<double> br;  // [e]
  int k = 1;
  bool renormalize = true;
  // dynamic_k: r = | ReLU(x Wa) Wb |
  int h = 0;
  std::vector<double> wa;  // [i * h + j]
  std::vector<double> wb;  // [j * E + e]
  double tau = 0.5;
  int k_max = 0;
  // top_any
  std::vector<double> wg;  // [i * E + e]
  std::vector<double> g;   // [e]
  std::vector<int> active;
  bool training = false;

  /// Router multiply-add FLOPs per token (section 6; biases, softmax and norms not counted).
  double flops_per_token() const {
    if (policy == policy_kind::dynamic_k) return 2.0 * d * h + 2.0 * h * E;
    return 2.0 * d * E;
  }
};

template <class M>
std::vector<double> read_matrix_row_major(const M& m) {
  std::vector<double> v(static_cast<size_t>(m.rows() * m.cols()));
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) v[size_t(i * m.cols() + j)] = double(m(i, j));
  return v;
}

template <class T>
router_model read_router(const dmoe::top_k_router<T>& r) {
  router_model m;
  m.policy = policy_kind::top_k;
  m.d = int(r.weight().rows());
  m.E = int(r.weight().cols());
  m.wr = read_matrix_row_major(r.weight());
  for (Eigen::Index e = 0; e < r.bias().size(); ++e) m.br.push_back(double(r.bias()(e)));
  m.k = int(r.options().k);
  m.renormalize = r.options().renormalize;
  return m;
}
template <class T>
router_model read_router(const dmoe::dynamic_k_router<T>& r) {
  router_model m;
  m.policy = policy_kind::dynamic_k;
  m.d = int(r.w_in().rows());
  m.h = int(r.w_in().cols());
  m.E = int(r.w_out().cols());
  m.wa = read_matrix_row_major(r.w_in());
  m.wb = read_matrix_row_major(r.w_out());
  m.tau = r.options().tau;
  m.k_max = int(r.options().k_max);
  return m;
}
template <class T>
router_model read_router(const dmoe::top_any_router<T>& r) {
  router_model m;
  m.policy = policy_kind::top_any;
  m.d = int(r.weight().rows());
  m.E = int(r.weight().cols());
  m.wg = read_matrix_row_major(r.weight());
  for (Eigen::Index e = 0; e < r.threshold().size(); ++e) m.g.push_back(double(r.threshold()(e)));
  for (auto a : r.active()) m.active.push_back(a ? 1 : 0);
  m.training = r.options().training;
  return m;
}

struct slot {
  int expert = 0;
  double weight = 0;
};

/// One token's routing decision.
struct token_route {
  std::vector<slot> slots;     ///< ascending expert id
  std::vector<double> scores;  ///< p (top_k), r (dynamic_k), cos (top_any)
  /// Distance of the scores from the nearest decision boundary, relative to their rounding
  /// scale (see each router); +inf when no boundary is close to mattering.
  double margin = std::numeric_limits<double>::infinity();
  /// Size of the scores' rounding errors: max(1, largest sum |x_i Wr_ie| + |br_e|) for top_k
  /// (p = softmax(z) moves by about p dz), the largest sum_j |pre_j| |Wb_je| for dynamic_k, 1 for
  /// top_any (cos lies in [-1, 1]).
  double score_scale = 1.0;
  int k() const { return int(slots.size()); }
};

inline constexpr double inf = std::numeric_limits<double>::infinity();

/// Indices 0..E-1 ordered by (score descending, index ascending).
inline std::vector<int> rank_desc(const std::vector<double>& s) {
  std::vector<int> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return s[size_t(a)] > s[size_t(b)]; });
  return idx;
}

/// top-k: z = x Wr + br, p = softmax(z), the k largest p (ties: lower index), weights p or
/// p / sum of the selected p. Margin: gap between the k-th and (k+1)-th logit over the largest
/// sum |x_i Wr_ie| + |br_e| (the size of the logits' rounding errors).
inline token_route route_top_k(const router_model& m, const double* x) {
  const int E = m.E, d = m.d;
  std::vector<double> z(static_cast<size_t>(E)), zabs(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) {
    double s = m.br[size_t(e)], a = std::fabs(s);
    for (int i = 0; i < d; ++i) {
      const double p = x[i] * m.wr[size_t(i) * E + e];
      s += p;
      a += std::fabs(p);
    }
    z[size_t(e)] = s;
    zabs[size_t(e)] = a;
  }
  double zmax = z[0];
  for (double v : z) zmax = std::max(zmax, v);
  std::vector<double> p(static_cast<size_t>(E));
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += (p[size_t(e)] = std::exp(z[size_t(e)] - zmax));
  for (auto& v : p) v /= sum;

  token_route r;
  r.scores = p;
  const auto order = rank_desc(z);  // same order as p, without exp's rounding
  std::vector<int> chosen(order.begin(), order.begin() + m.k);
  std::sort(chosen.begin(), chosen.end());
  double psel = 0;
  for (int e : chosen) psel += p[size_t(e)];
  for (int e : chosen) r.slots.push_back({e, m.renormalize ? p[size_t(e)] / psel : p[size_t(e)]});
  r.score_scale = std::max(1.0, *std::max_element(zabs.begin(), zabs.end()));
  if (m.k < E) {
    const double scale = *std::max_element(zabs.begin(), zabs.end());
    const double gap = z[size_t(order[size_t(m.k - 1)])] - z[size_t(order[size_t(m.k)])];
    r.margin = scale > 0 ? gap / scale : inf;
  }
  return r;
}

/// dynamic-k (D2DMoE): r = |ReLU(x Wa) Wb|; e runs iff r_e >= tau * max r; the optional cap
/// k_max keeps the k_max largest (ties: lower index); weight 1.
/// Margin, relative to the largest sum_j |pre_j| |Wb_je| (the size of r's rounding errors): the
/// smallest |r_e - tau max r| over e other than the arg-max, and the gap at the k_max cut. When
/// every hidden unit is <= 0, r is exactly 0 (every expert runs, an exact tie the cap resolves
/// by index); the margin is then how far the largest pre-activation lies below 0, relative to
/// its own sum of |x_i Wa_ij|, since a unit rounding to > 0 would make r nonzero.
inline token_route route_dynamic_k(const router_model& m, const double* x) {
  const int E = m.E, d = m.d, h = m.h;
  std::vector<double> hid(static_cast<size_t>(h)), pre_abs(static_cast<size_t>(h));
  double q = -inf;  // largest pre_j / sum_i |x_i Wa_ij|
  for (int j = 0; j < h; ++j) {
    double s = 0, a = 0;
    for (int i = 0; i < d; ++i) {
      const double p = x[i] * m.wa[size_t(i) * h + j];
      s += p;
      a += std::fabs(p);
    }
    hid[size_t(j)] = relu(s);
    pre_abs[size_t(j)] = a;
    if (a > 0) q = std::max(q, s / a);
  }
  std::vector<double> r(static_cast<size_t>(E));
  double rscale = 0;
  for (int e = 0; e < E; ++e) {
    double s = 0, a = 0;
    for (int j = 0; j < h; ++j) {
      s += hid[size_t(j)] * m.wb[size_t(j) * E + e];
      a += pre_abs[size_t(j)] * std::fabs(m.wb[size_t(j) * E + e]);
    }
    r[size_t(e)] = std::fabs(s);
    rscale = std::max(rscale, a);
  }
  double rmax = 0;
  int argmax = 0;
  for (int e = 0; e < E; ++e)
    if (r[size_t(e)] > rmax) {
      rmax = r[size_t(e)];
      argmax = e;
    }
  const double thr = m.tau * rmax;
  std::vector<int> sel;
  for (int e = 0; e < E; ++e)
    if (r[size_t(e)] >= thr) sel.push_back(e);
  token_route out;
  out.scores = r;
  out.score_scale = rscale > 0 ? rscale : 1.0;
  double margin = inf;
  if (rmax > 0) {
    for (int e = 0; e < E; ++e)
      if (e != argmax) margin = std::min(margin, std::fabs(r[size_t(e)] - thr) / rscale);
  }
  if (m.k_max > 0 && int(sel.size()) > m.k_max) {
    std::stable_sort(sel.begin(), sel.end(), [&](int a, int b) { return r[size_t(a)] > r[size_t(b)]; });
    if (rmax > 0)
      margin = std::min(margin, (r[size_t(sel[size_t(m.k_max - 1)])] - r[size_t(sel[size_t(m.k_max)])]) / rscale);
    sel.resize(size_t(m.k_max));
    std::sort(sel.begin(), sel.end());
  }
  if (q <= 0) margin = std::min(margin, -q);  // (q = -inf when x = 0: r = 0 exactly)
  out.margin = margin;
  for (int e : sel) out.slots.push_back({e, 1.0});
  return out;
}

/// top-any (DynMoE): cos_e = <x / max(|x|, 1e-12), w_e / max(|w_e|, 1e-12)>; e fires iff active and
/// cos_e > g_e (strict); weights 1/K; K = 0: nothing in training, in inference the active expert
/// with the highest cos (ties: lower index), weight 1. Margin: smallest |cos_e - g_e| over active
/// e, and, when the fallback is taken, the gap between the best and second best active cos
/// (cos lies in [-1, 1], so the scale is 1).
inline token_route route_top_any(const router_model& m, const double* x) {
  const int E = m.E, d = m.d;
  double xn = 0;
  for (int i = 0; i < d; ++i) xn += x[i] * x[i];
  xn = std::max(std::sqrt(xn), 1e-12);
  std::vector<double> c(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) {
    double wn = 0;
    for (int i = 0; i < d; ++i) wn += m.wg[size_t(i) * E + e] * m.wg[size_t(i) * E + e];
    wn = std::max(std::sqrt(wn), 1e-12);
    double s = 0;
    for (int i = 0; i < d; ++i) s += (x[i] / xn) * (m.wg[size_t(i) * E + e] / wn);
    c[size_t(e)] = s;
  }
  token_route out;
  out.scores = c;
  std::vector<int> fired;
  double margin = inf;
  for (int e = 0; e < E; ++e) {
    if (!m.active[size_t(e)]) continue;
    margin = std::min(margin, std::fabs(c[size_t(e)] - m.g[size_t(e)]));
    if (c[size_t(e)] > m.g[size_t(e)]) fired.push_back(e);
  }
  if (fired.empty() && !m.training) {
    int best = -1, second = -1;
    for (int e = 0; e < E; ++e) {
      if (!m.active[size_t(e)]) continue;
      if (best < 0 || c[size_t(e)] > c[size_t(best)]) {
        second = best;
        best = e;
      } else if (second < 0 || c[size_t(e)] > c[size_t(second)]) {
        second = e;
      }
    }
    if (best >= 0) out.slots.push_back({best, 1.0});
    // Cosines of exactly 0 or +-1 (x = 0, w = 0, or d = 1) are exact in any precision, so a tie
    // between them is a real tie that the lower index must win; other near-ties are borderline.
    const auto exact = [](double v) { return v == 0.0 || std::fabs(v) == 1.0; };
    if (second >= 0 && !(exact(c[size_t(best)]) && c[size_t(best)] == c[size_t(second)]))
      margin = std::min(margin, c[size_t(best)] - c[size_t(second)]);
  } else {
    for (int e : fired) out.slots.push_back({e, 1.0 / double(fired.size())});
  }
  out.margin = margin;
  return out;
}

inline token_route route_token(const router_model& m, const double* x) {
  switch (m.policy) {
    case policy_kind::top_k: return route_top_k(m, x);
    case policy_kind::dynamic_k: return route_dynamic_k(m, x);
    case policy_kind::top_any: return route_top_any(m, x);
  }
  return {};
}

// ------------------------------------------------------------------------------------------
// The layer (section 1): y = sum over selected e of w_e y_e (+ b2).
struct model {
  experts_model experts;
  router_model router;

  int d() const { return experts.d; }
  int num_experts() const { return experts.E; }
  /// 2 d n (2, or 3 if gated): expert multiply-add FLOPs per slot (section 6).
  double flops_per_slot() const {
    return 2.0 * experts.d * experts.n * (is_gated(experts.act) ? 3.0 : 2.0);
  }

  /// y for one token given its route; `abs_out` (optional) bounds the magnitudes summed.
  void combine(const token_route& r, const double* x, double* y, double* abs_out) const {
    const int d = experts.d;
    std::vector<double> ye(static_cast<size_t>(d)), ya(static_cast<size_t>(d));
    for (int c = 0; c < d; ++c) {
      y[c] = experts.b2.empty() ? 0.0 : experts.b2[size_t(c)];
      if (abs_out) abs_out[c] = std::fabs(y[c]);
    }
    for (const slot& s : r.slots) {
      expert_forward(experts, s.expert, x, ye.data(), ya.data());
      for (int c = 0; c < d; ++c) {
        y[c] += s.weight * ye[size_t(c)];
        if (abs_out) abs_out[c] += std::fabs(s.weight) * ya[size_t(c)];
      }
    }
  }
};

template <class Layer>
model read_layer(const Layer& layer) {
  model m;
  m.experts = read_experts(layer.experts(), act_of<typename Layer::activation_type>());
  m.router = read_router(layer.router());
  return m;
}

/// A batch's reference results.
struct batch_result {
  std::vector<token_route> routes;
  std::vector<double> y;      ///< tokens x d, row-major
  std::vector<double> y_abs;  ///< magnitude bounds, same shape
};

/// Runs the reference on rows of x (tokens x d, row-major with the given stride).
template <class T>
batch_result run(const model& m, const T* x, int tokens, std::ptrdiff_t stride) {
  batch_result b;
  const int d = m.d();
  b.y.assign(size_t(tokens) * size_t(d), 0.0);
  b.y_abs.assign(size_t(tokens) * size_t(d), 0.0);
  std::vector<double> xr(static_cast<size_t>(d));
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < d; ++i) xr[size_t(i)] = double(x[t * stride + i]);
    b.routes.push_back(route_token(m.router, xr.data()));
    m.combine(b.routes.back(), xr.data(), b.y.data() + size_t(t) * d, b.y_abs.data() + size_t(t) * d);
  }
  return b;
}

// ------------------------------------------------------------------------------------------
// Dense FFN y = act(x W1 + b1) W2 + b2, as one expert of width F (section 5's source model).
template <class T, class Act>
experts_model read_dense(const dmoe::dense_ffn<T, Act>& f) {
  experts_model m;
  m.act = act_of<Act>();
  m.d = int(f.d_model());
  m.E = 1;
  m.n = int(f.hidden());
  const int fn = m.fn();
  for (int i = 0; i < m.d; ++i)
    for (int j = 0; j < fn; ++j) m.w1.push_back(double(f.w1()(i, j)));
  for (int j = 0; j < fn; ++j) m.b1.push_back(double(f.b1()(j)));
  for (int j = 0; j < m.n; ++j)
    for (int c = 0; c < m.d; ++c) m.w2.push_back(double(f.w2()(j, c)));
  for (int c = 0; c < m.d; ++c) m.b2.push_back(double(f.b2()(c)));
  return m;
}

/// Dense forward of one token: expert 0 of the model plus the shared bias.
inline void dense_forward(const experts_model& m, const double* x, double* y, double* abs_out) {
  expert_forward(m, 0, x, y, abs_out);
  for (int c = 0; c < m.d; ++c) {
    y[c] += m.b2[size_t(c)];
    if (abs_out) abs_out[c] += std::fabs(m.b2[size_t(c)]);
  }
}

}  // namespace dmoe_test::ref
