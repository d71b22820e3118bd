// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Shared by the convert_fit tests: random data, a contiguous dense -> dynamic-k conversion written
// independently of convert/ (expert e takes neurons [e n, (e+1) n)), and plain-loop references of
// the router, the expert outputs and the dense FFN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <dmoe/dmoe.hpp>

#include "test_random.hpp"

namespace convert_fit_test {

using dmoe::index_t;

template <class T>
using rows = dmoe::row_matrix<T>;

inline dmoe_testing::splitmix make_gen(std::uint64_t seed) { return dmoe_testing::splitmix(seed, 0x2545F4914F6CDD1Dull, 77); }

template <class T>
rows<T> random_rows(index_t n, index_t d, std::uint64_t seed, double scale = 1.0) {
  auto g = make_gen(seed);
  rows<T> m(n, d);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) m(i, j) = T(scale * g.normal());
  return m;
}

template <class T, class Act>
dmoe::dense_ffn<T, Act> random_dense(index_t d, index_t F, std::uint64_t seed) {
  dmoe::dense_ffn<T, Act> f(d, F);
  auto g = make_gen(seed);
  const double a1 = 1.0 / std::sqrt(double(d)), a2 = 1.0 / std::sqrt(double(F));
  dmoe_testing::fill_uniform(f.w1(), g, -a1, a1);
  dmoe_testing::fill_uniform(f.b1(), g, -a1, a1);
  dmoe_testing::fill_uniform(f.w2(), g, -a2, a2);
  dmoe_testing::fill_uniform(f.b2(), g, -a2, a2);
  return f;
}

/// Contiguous split of a non-gated dense FFN into E experts; router left zero.
template <class T, class Act>
dmoe::moe_layer<T, dmoe::cpu, dmoe::dynamic_k, Act> contiguous_moe(const dmoe::dense_ffn<T, Act>& dense, index_t E,
                                                                  index_t router_hidden, double tau = 0.0) {
  const index_t d = dense.d_model(), n = dense.hidden() / E;
  dmoe::moe_config cfg{d, E, n};
  cfg.router_hidden = router_hidden;
  dmoe::moe_layer<T, dmoe::cpu, dmoe::dynamic_k, Act> layer(cfg, {tau, 0});
  for (index_t e = 0; e < E; ++e)
    for (index_t j = 0; j < n; ++j) {
      for (index_t i = 0; i < d; ++i) {
        layer.experts().w1(e)(i, j) = dense.w1()(i, e * n + j);
        layer.experts().w2(e)(j, i) = dense.w2()(e * n + j, i);
      }
      layer.experts().b1(e)(j) = dense.b1()(e * n + j);
    }
  for (index_t i = 0; i < d; ++i) layer.experts().output_bias()(i) = dense.b2()(i);
  return layer;
}

/// Activations h (F values) of the dense FFN for token row x (plain loops, double).
template <class T, class Act>
std::vector<double> dense_hidden(const dmoe::dense_ffn<T, Act>& f, const T* x) {
  const index_t d = f.d_model(), F = f.hidden();
  std::vector<double> h(static_cast<std::size_t>(F));
  for (index_t j = 0; j < F; ++j) {
    double s = double(f.b1()(j));
    for (index_t i = 0; i < d; ++i) s += double(x[i]) * double(f.w1()(i, j));
    h[std::size_t(j)] = Act::apply(s);
  }
  return h;
}

/// Output of expert e (neurons [e n, (e+1) n) of the dense FFN) without b2.
template <class T, class Act>
std::vector<double> expert_out(const dmoe::dense_ffn<T, Act>& f, const std::vector<double>& h, index_t e, index_t n) {
  const index_t d = f.d_model();
  std::vector<double> y(static_cast<std::size_t>(d), 0.0);
  for (index_t j = e * n; j < (e + 1) * n; ++j)
    for (index_t i = 0; i < d; ++i) y[std::size_t(i)] += h[std::size_t(j)] * double(f.w2()(j, i));
  return y;
}

/// r = |ReLU(x Wa) Wb| (plain loops, double).
template <class T>
std::vector<double> router_scores(const dmoe::dynamic_k_router<T>& r, const T* x) {
  const index_t d = r.d_model(), H = r.hidden(), E = r.num_experts();
  std::vector<double> h(static_cast<std::size_t>(H)), out(static_cast<std::size_t>(E));
  for (index_t k = 0; k < H; ++k) {
    double s = 0;
    for (index_t i = 0; i < d; ++i) s += double(x[i]) * double(r.w_in()(i, k));
    h[std::size_t(k)] = s > 0 ? s : 0;
  }
  for (index_t e = 0; e < E; ++e) {
    double s = 0;
    for (index_t k = 0; k < H; ++k) s += h[std::size_t(k)] * double(r.w_out()(k, e));
    out[std::size_t(e)] = std::fabs(s);
  }
  return out;
}

}  // namespace convert_fit_test
