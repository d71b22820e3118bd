// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// doctest-side drivers of the random reference sweeps (unit tests only).

#include <cstdint>
#include <string>
#include <type_traits>

#include <doctest/doctest.h>

#include "test_util.hpp"

namespace dmoe_test {

template <class T>
std::string type_name() {
  return std::is_same_v<T, float> ? "float" : "double";
}
template <class P>
std::string policy_name() {
  return P::template router<float>::name;
}

/// Calls f(Act{}) for each of the six activations.
template <class F>
void for_each_activation(F&& f) {
  f(dmoe::relu{});
  f(dmoe::gelu_erf{});
  f(dmoe::gelu_tanh{});
  f(dmoe::silu{});
  f(dmoe::swiglu{});
  f(dmoe::geglu{});
}

/// A seed that differs per (tag, index).
inline std::uint64_t seed_of(const std::string& tag, int i) {
  std::uint64_t h = 1469598103934665603ull;
  for (char c : tag) h = (h ^ std::uint64_t(static_cast<unsigned char>(c))) * 1099511628211ull;
  return h ^ (std::uint64_t(i) * 0x9E3779B97F4A7C15ull);
}

/// Weight tolerance of a plan comparison (weights lie in [0, 1]).
template <class T>
constexpr double weight_tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

/// Tolerance of router scores, relative to the reference's score_scale.
template <class T>
constexpr double score_tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

/// Runs one random case: forward with stats on the calling thread, then compares the plan slot by
/// slot, the output element by element, and the statistics with the reference. Returns the
/// layer's statistics (for coverage checks of a sweep).
template <class T, class P, class A>
dmoe::routing_stats check_case(const case_params& p, bool check_output = true) {
  INFO((type_name<T>() + " " + policy_name<P>() + " " + A::name + " " + p.describe()));
  prepared_case<T, P, A> c(p);
  dmoe::routing_stats st(p.E);
  const dmoe::status s = c.forward(dmoe::context<dmoe::cpu>{}, &st);
  REQUIRE_MESSAGE(s.ok(), std::string(s.message()));
  const auto ref = c.reference();

  const auto pc = compare_plan(c.plan(), ref.routes, borderline_margin<T>(), weight_tolerance<T>());
  CHECK_MESSAGE(pc.ok(), pc.first);
  CHECK_MESSAGE(pc.few_skipped(), "skipped ", pc.skipped, " borderline tokens of ", p.tokens);
  if (std::is_same_v<T, double>) CHECK(pc.skipped == 0);
  if (std::is_same_v<P, dmoe::top_k> && p.tokens > 0) {
    const auto plan = c.plan();
    bool regular = true;
    for (index_t t = 0; t <= p.tokens; ++t) regular = regular && plan.token_offsets[t] == t * p.k;
    CHECK_MESSAGE(regular, "top_k plan must have token_offsets[t] = k t");
  }

  const auto sc = compare_scores<T>(c.layer.scores(c.ws, p.tokens), ref.routes, score_tolerance<T>());
  CHECK_MESSAGE(sc.ok(), sc.first);

  if (check_output) {
    const auto oc = compare_output<T>(c.y, ref, borderline_margin<T>(), output_tolerance<T>());
    CHECK_MESSAGE(oc.ok(), oc.first);
  }

  if (pc.skipped == 0) {
    const auto rs = count_routes(ref.routes, p.E);
    CHECK(st.tokens == rs.tokens);
    CHECK(st.slots == rs.slots);
    bool hist = true, per = true;
    for (int k = 0; k <= p.E; ++k) hist = hist && st.k_histogram[std::size_t(k)] == rs.k_histogram[std::size_t(k)];
    for (int e = 0; e < p.E; ++e)
      per = per && st.tokens_per_expert[std::size_t(e)] == rs.tokens_per_expert[std::size_t(e)];
    CHECK_MESSAGE(hist, "k_histogram differs from the reference routing");
    CHECK_MESSAGE(per, "tokens_per_expert differs from the reference routing");
  }
  return st;
}

/// A forward run of a given layer on given tokens, with the reference's view of the same call.
template <class Layer>
struct layer_run {
  using T = typename Layer::scalar_type;
  dmoe::status status;
  dmoe::row_matrix<T> y;
  dmoe::workspace_buffer ws;
  dmoe::routing_stats stats;
  dmoe::routing_plan<T> plan;
  dmoe::matrix_view<const T> scores;
  ref::batch_result ref;
  index_t tokens = 0;

  /// Experts of token t in the plan, in slot order.
  std::vector<int> experts(index_t t) const {
    std::vector<int> v;
    for (index_t s = plan.token_offsets[t]; s < plan.token_offsets[t + 1]; ++s) v.push_back(plan.expert[s]);
    return v;
  }
  std::vector<double> weights(index_t t) const {
    std::vector<double> v;
    for (index_t s = plan.token_offsets[t]; s < plan.token_offsets[t + 1]; ++s) v.push_back(double(plan.weight[s]));
    return v;
  }
};

/// Runs layer.forward on x (with statistics) and the reference on the same weights and tokens.
template <class Layer>
layer_run<Layer> run_layer(const Layer& layer, const dmoe::row_matrix<typename Layer::scalar_type>& x,
                           const dmoe::context<dmoe::cpu>& ctx = {}) {
  using T = typename Layer::scalar_type;
  layer_run<Layer> r;
  r.tokens = x.rows();
  r.y = dmoe::row_matrix<T>::Constant(x.rows(), x.cols(), T(-777));
  r.ws.resize(layer.workspace_size(ctx, x.rows()));
  r.stats = dmoe::routing_stats(layer.num_experts());
  r.status = layer.forward(ctx, x, r.y, r.ws, &r.stats);
  r.plan = layer.plan(r.ws, x.rows());
  r.scores = layer.scores(r.ws, x.rows());
  r.ref = ref::run(ref::read_layer(layer), x.data(), int(x.rows()), x.cols());
  return r;
}

/// Checks a run against its reference: status ok, plan slot by slot, output element by element.
/// Here no token may be skipped as borderline: the edge-case tests build exact ties on purpose.
template <class Layer>
void check_run(const layer_run<Layer>& r) {
  using T = typename Layer::scalar_type;
  REQUIRE_MESSAGE(r.status.ok(), std::string(r.status.message()));
  const auto pc = compare_plan(r.plan, r.ref.routes, -1.0, weight_tolerance<T>());
  CHECK_MESSAGE(pc.ok(), pc.first);
  const auto oc = compare_output<T>(r.y, r.ref, -1.0, output_tolerance<T>());
  CHECK_MESSAGE(oc.ok(), oc.first);
  if (r.tokens > 0) {
    const auto sc = compare_scores<T>(r.scores, r.ref.routes, score_tolerance<T>());
    CHECK_MESSAGE(sc.ok(), sc.first);
  }
}

}  // namespace dmoe_test

namespace doctest {
template <class V>
struct StringMaker<std::vector<V>> {
  static String convert(const std::vector<V>& v) {
    std::string s = "{";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : " ") + std::to_string(v[i]);
    return String((s + " }").c_str());
  }
};
}  // namespace doctest
