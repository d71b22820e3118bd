// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Neuron split (convert/split.hpp): balance and permutation validity for every method, the
// reported inertia against a plain-loop computation, determinism for a seed, recovery of planted
// clusters, the k-means fixed point being an optimal balanced assignment for its own centroids,
// gated features, and errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include <dmoe/convert/split.hpp>

#include "test_random.hpp"

namespace {

using dmoe::index_t;
using mat = dmoe::col_matrix<double>;

class rng : public dmoe_testing::splitmix {
 public:
  explicit rng(std::uint64_t seed) : splitmix(seed, 0xD1B54A32D192ED03ull, 0x5b117ull) {}
};

template <class T>
dmoe::col_matrix<T> random_weights(rng& g, index_t d, index_t F) {
  dmoe::col_matrix<T> w(d, F);
  for (index_t j = 0; j < F; ++j)
    for (index_t i = 0; i < d; ++i) w(i, j) = T(g.normal());
  return w;
}

/// Every expert has exactly width neurons, each neuron appears once, ascending within an expert.
void check_valid(const dmoe::neuron_split& s, index_t F, index_t E) {
  REQUIRE(s.num_experts == E);
  REQUIRE(s.width * E == F);
  REQUIRE(index_t(s.neurons.size()) == F);
  std::vector<int> seen(std::size_t(F), 0);
  for (index_t e = 0; e < E; ++e)
    for (index_t j = 0; j < s.width; ++j) {
      const index_t v = s.neurons[std::size_t(e * s.width + j)];
      REQUIRE(v >= 0);
      REQUIRE(v < F);
      ++seen[std::size_t(v)];
      if (j > 0) CHECK(s.neurons[std::size_t(e * s.width + j - 1)] < v);
    }
  for (index_t v = 0; v < F; ++v) CHECK(seen[std::size_t(v)] == 1);
}

/// Plain loops: unit-normalise columns, centroid of each expert, sum of squared distances.
template <class T>
double reference_inertia(const dmoe::col_matrix<T>& w, const dmoe::neuron_split& s) {
  const index_t d = w.rows();
  double total = 0;
  for (index_t e = 0; e < s.num_experts; ++e) {
    std::vector<std::vector<double>> pts;
    for (index_t j = 0; j < s.width; ++j) {
      const index_t v = s.neurons[std::size_t(e * s.width + j)];
      std::vector<double> x(static_cast<std::size_t>(d));
      double nrm = 0;
      for (index_t i = 0; i < d; ++i) nrm += double(w(i, v)) * double(w(i, v));
      nrm = std::sqrt(nrm);
      for (index_t i = 0; i < d; ++i) x[std::size_t(i)] = nrm > 0 ? double(w(i, v)) / nrm : 0.0;
      pts.push_back(x);
    }
    std::vector<double> mu(std::size_t(d), 0.0);
    for (const auto& x : pts)
      for (index_t i = 0; i < d; ++i) mu[std::size_t(i)] += x[std::size_t(i)] / double(pts.size());
    for (const auto& x : pts)
      for (index_t i = 0; i < d; ++i) total += (x[std::size_t(i)] - mu[std::size_t(i)]) * (x[std::size_t(i)] - mu[std::size_t(i)]);
  }
  return total;
}

}  // namespace

TEST_SUITE("convert") {
  TEST_CASE("split: every method gives a valid balanced split and reports its inertia") {
    for (int i = 0; i < 30; ++i) {
      rng g(std::uint64_t(100 + i));
      const index_t d = g.integer(1, 24), E = g.integer(1, 8), n = g.integer(1, 12), F = E * n;
      const auto w = random_weights<float>(g, d, F);
      for (auto m : {dmoe::split_method::balanced_kmeans, dmoe::split_method::contiguous, dmoe::split_method::random}) {
        INFO("d=", d, " E=", E, " n=", n, " method=", int(m));
        dmoe::split_options opt;
        opt.method = m;
        opt.seed = std::uint64_t(i);
        const auto s = dmoe::split_neurons(w, E, opt);
        check_valid(s, F, E);
        CHECK(s.inertia == doctest::Approx(reference_inertia(w, s)).epsilon(1e-9).scale(1.0));
        CHECK_NOTHROW(dmoe::validate_split(s, F));
        const auto owner = s.expert_of();
        for (index_t e = 0; e < E; ++e)
          for (index_t j = 0; j < n; ++j) CHECK(owner[std::size_t(s.neuron(e, j))] == e);
        if (m == dmoe::split_method::contiguous)
          for (index_t v = 0; v < F; ++v) CHECK(s.neurons[std::size_t(v)] == v);
        if (m == dmoe::split_method::balanced_kmeans) {
          CHECK(int(s.restart_inertia.size()) == opt.restarts);
          CHECK(s.inertia == *std::min_element(s.restart_inertia.begin(), s.restart_inertia.end()));
          CHECK(s.iterations >= 1);
          CHECK(s.iterations <= opt.max_iterations);
        }
      }
    }
  }

  TEST_CASE("split: deterministic for a seed, different across seeds") {
    rng g(42);
    const index_t d = 32, E = 8, F = 8 * 16;
    const auto w = random_weights<double>(g, d, F);
    for (auto m : {dmoe::split_method::balanced_kmeans, dmoe::split_method::random}) {
      dmoe::split_options opt;
      opt.method = m;
      opt.seed = 7;
      const auto a = dmoe::split_neurons(w, E, opt), b = dmoe::split_neurons(w, E, opt);
      CHECK(a.neurons == b.neurons);
      CHECK(a.inertia == b.inertia);
      CHECK(a.iterations == b.iterations);
      int differ = 0;
      for (std::uint64_t s = 8; s < 12; ++s) {
        opt.seed = s;
        differ += dmoe::split_neurons(w, E, opt).neurons != a.neurons;
      }
      CHECK(differ >= 3);  // random unit directions: a different seed almost surely changes the split
    }
  }

  TEST_CASE("split: balanced k-means recovers planted clusters, the baselines do not") {
    for (int i = 0; i < 6; ++i) {
      rng g(std::uint64_t(900 + i));
      const index_t d = 16, E = g.integer(2, 6), n = g.integer(3, 20), F = E * n;
      // E well-separated unit centres; each neuron is a centre plus small noise, scaled by a
      // random positive factor (the split must only look at directions), in shuffled order.
      mat centres(d, E);
      for (index_t e = 0; e < E; ++e) {
        for (index_t r = 0; r < d; ++r) centres(r, e) = g.normal();
        centres.col(e).normalize();
      }
      std::vector<index_t> truth(static_cast<std::size_t>(F));
      for (index_t p = 0; p < F; ++p) truth[std::size_t(p)] = p % E;
      for (index_t p = F - 1; p > 0; --p) std::swap(truth[std::size_t(p)], truth[std::size_t(g.integer(0, int(p)))]);
      mat w(d, F);
      for (index_t p = 0; p < F; ++p) {
        const double scale = g.uniform(0.1, 10.0);
        for (index_t r = 0; r < d; ++r) w(r, p) = scale * (centres(r, truth[std::size_t(p)]) + 0.03 * g.normal());
      }
      const auto count_pure = [&](const dmoe::neuron_split& s) {
        int pure = 0;
        for (index_t e = 0; e < E; ++e) {
          bool same = true;
          for (index_t j = 1; j < n; ++j) same = same && truth[std::size_t(s.neuron(e, j))] == truth[std::size_t(s.neuron(e, 0))];
          pure += same;
        }
        return pure;
      };
      dmoe::split_options opt;
      opt.seed = std::uint64_t(i);
      const auto s = dmoe::split_neurons(w, E, opt);
      INFO("E=", E, " n=", n);
      check_valid(s, F, E);
      CHECK(count_pure(s) == E);
      opt.method = dmoe::split_method::random;
      const auto r = dmoe::split_neurons(w, E, opt);
      CHECK(count_pure(r) < E);
      CHECK(r.inertia > s.inertia);
    }
  }

  TEST_CASE("split: a converged k-means split is an optimal balanced assignment for its own centroids") {
    // The fixed point of the alternation: assigning the unit vectors to the final centroids with
    // the exact balanced assignment gives back the same split (checked with a plain Bellman-Ford
    // over every single-neuron move: no improving exchange cycle).
    for (int i = 0; i < 8; ++i) {
      rng g(std::uint64_t(300 + i));
      const index_t d = g.integer(2, 20), E = g.integer(2, 7), n = g.integer(2, 15), F = E * n;
      const auto w = random_weights<double>(g, d, F);
      dmoe::split_options opt;
      opt.seed = std::uint64_t(i);
      opt.max_iterations = 200;
      const auto s = dmoe::split_neurons(w, E, opt);
      REQUIRE(s.converged);
      mat x = w;
      for (index_t p = 0; p < F; ++p) x.col(p).normalize();
      mat mu = mat::Zero(d, E);
      const auto owner = s.expert_of();
      for (index_t p = 0; p < F; ++p) mu.col(owner[std::size_t(p)]) += x.col(p) / double(n);
      // cost(p, k) = squared distance; an improving cycle would move neurons along a -> b -> ... -> a.
      std::vector<double> dist(std::size_t(E), 0.0);
      bool changed = true;
      for (int round = 0; round <= E && changed; ++round) {
        changed = false;
        for (index_t p = 0; p < F; ++p) {
          const index_t a = owner[std::size_t(p)];
          for (index_t b = 0; b < E; ++b) {
            if (b == a) continue;
            const double wgt = (x.col(p) - mu.col(b)).squaredNorm() - (x.col(p) - mu.col(a)).squaredNorm();
            if (dist[std::size_t(a)] + wgt < dist[std::size_t(b)] - 1e-9) {
              dist[std::size_t(b)] = dist[std::size_t(a)] + wgt;
              changed = true;
            }
          }
        }
      }
      CHECK_FALSE(changed);
    }
  }

  TEST_CASE("split: gated FFNs cluster on the gate columns, or on gate and up") {
    rng g(5);
    const index_t d = 12, E = 4, F = 4 * 6;
    dmoe::dense_ffn<double, dmoe::swiglu> f(d, F);
    for (index_t j = 0; j < 2 * F; ++j)
      for (index_t i = 0; i < d; ++i) f.w1()(i, j) = g.normal();
    dmoe::split_options opt;
    opt.seed = 3;
    const dmoe::col_matrix<double> gate = f.w1().leftCols(F);
    const auto s = dmoe::split_neurons(f, E, opt);
    CHECK(s.neurons == dmoe::split_neurons(gate, E, opt).neurons);
    opt.gated = dmoe::gated_features::gate_and_up;
    const auto both = dmoe::split_neurons(f, E, opt);
    check_valid(both, F, E);
    dmoe::col_matrix<double> stacked(2 * d, F);
    for (index_t j = 0; j < F; ++j) {
      stacked.col(j).head(d) = f.w1().col(j).normalized();
      stacked.col(j).tail(d) = f.w1().col(F + j).normalized();
    }
    CHECK(both.neurons == dmoe::split_neurons(stacked, E, opt).neurons);
  }

  TEST_CASE("split: Eigen expressions (a PyTorch (F x d) weight's transpose) split like the matrix") {
    rng g(21);
    const auto w = random_weights<float>(g, 9, 20);
    const dmoe::col_matrix<float> torch_layout = w.transpose();
    dmoe::split_options opt;
    opt.seed = 4;
    CHECK(dmoe::split_neurons(torch_layout.transpose(), 5, opt).neurons == dmoe::split_neurons(w, 5, opt).neurons);
    CHECK(dmoe::split_neurons(w.leftCols(10), 2, opt).neurons.size() == 10);
  }

  TEST_CASE("split: degenerate inputs (E = 1, E = F, zero and duplicate columns)") {
    rng g(11);
    auto w = random_weights<float>(g, 5, 12);
    const auto one = dmoe::split_neurons(w, 1);
    check_valid(one, 12, 1);
    const auto each = dmoe::split_neurons(w, 12);
    check_valid(each, 12, 12);
    w.col(3).setZero();
    w.col(4) = w.col(5);
    w.col(6) = w.col(5);
    const auto s = dmoe::split_neurons(w, 4);
    check_valid(s, 12, 4);
    CHECK(std::isfinite(s.inertia));
    dmoe::col_matrix<float> zeros = dmoe::col_matrix<float>::Zero(3, 6);
    check_valid(dmoe::split_neurons(zeros, 3), 6, 3);
  }

  TEST_CASE("split: bad inputs are clear errors") {
    rng g(12);
    const auto w = random_weights<double>(g, 4, 12);
    const auto message_of = [&](auto&& f) {
      try {
        f();
      } catch (const dmoe::error& e) {
        CHECK(e.code() == dmoe::errc::invalid_argument);
        return std::string(e.what());
      }
      return std::string("no error");
    };
    CHECK(message_of([&] { (void)dmoe::split_neurons(w, 5); }).find("F % num_experts") != std::string::npos);
    CHECK(message_of([&] { (void)dmoe::split_neurons(w, 13); }).find("num_experts must be in [1, F = 12]") !=
          std::string::npos);
    CHECK(message_of([&] { (void)dmoe::split_neurons(w, 0); }).find("num_experts") != std::string::npos);
    CHECK(message_of([&] { (void)dmoe::split_neurons(w, -2); }).find("num_experts") != std::string::npos);
    CHECK(message_of([&] { (void)dmoe::split_neurons(dmoe::col_matrix<double>(4, 0), 1); }).find("empty") !=
          std::string::npos);
    CHECK(message_of([&] { (void)dmoe::split_neurons(dmoe::col_matrix<double>(0, 6), 2); }).find("empty") !=
          std::string::npos);
    auto bad = w;
    bad(2, 7) = std::numeric_limits<double>::quiet_NaN();
    CHECK(message_of([&] { (void)dmoe::split_neurons(bad, 3); }).find("NaN") != std::string::npos);
    dmoe::split_options opt;
    opt.restarts = 0;
    CHECK(message_of([&] { (void)dmoe::split_neurons(w, 3, opt); }).find("restarts") != std::string::npos);
    // validate_split: wrong size, duplicate, out of range, not ascending.
    auto s = dmoe::split_neurons(w, 3);
    CHECK_THROWS_AS(dmoe::validate_split(s, 15), dmoe::error);
    auto dup = s;
    dup.neurons[1] = dup.neurons[0];
    CHECK(message_of([&] { dmoe::validate_split(dup, 12); }).find("duplicate") != std::string::npos);
    auto out = s;
    out.neurons[5] = 12;
    CHECK(message_of([&] { dmoe::validate_split(out, 12); }).find("out of range") != std::string::npos);
    auto desc = s;
    std::swap(desc.neurons[0], desc.neurons[1]);
    CHECK(message_of([&] { dmoe::validate_split(desc, 12); }).find("ascending") != std::string::npos);
  }
}
