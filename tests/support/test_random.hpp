// Shared by the forward (test_util.hpp) and backward (fd_reference.hpp) test supports: a seeded
// generator with the same sequence on every platform, and uniform fills through the accessors.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <dmoe/experts/expert_weights.hpp>

namespace dmoe_testing {

using dmoe::index_t;

/// splitmix64; the seed is scrambled as seed * mul + add so that each support keeps its own
/// sequences (and so its seeds) independent of dmoe::detail::rng.
class splitmix {
 public:
  splitmix(std::uint64_t seed, std::uint64_t mul, std::uint64_t add) : s_(seed * mul + add) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Integer in [lo, hi] (inclusive).
  int integer(int lo, int hi) { return lo + int(next() % std::uint64_t(hi - lo + 1)); }
  bool coin(double p_true = 0.5) { return uniform() < p_true; }
  double normal() {
    double u1 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * uniform());
  }

 private:
  std::uint64_t s_;
};

template <class M, class G>
void fill_uniform(M&& m, G& g, double lo, double hi) {
  for (index_t j = 0; j < m.cols(); ++j)
    for (index_t i = 0; i < m.rows(); ++i) m(i, j) = typename std::decay_t<M>::Scalar(g.uniform(lo, hi));
}

/// Random expert weights and biases, set element by element through the accessors.
template <class T, class G>
void fill_experts_uniform(dmoe::expert_weights<T>& w, G& g) {
  const double a1 = 1.0 / std::sqrt(double(w.d_model())), a2 = 1.0 / std::sqrt(double(w.width()));
  for (index_t e = 0; e < w.num_experts(); ++e) {
    fill_uniform(w.w1(e), g, -a1, a1);
    fill_uniform(w.b1(e), g, -a1, a1);
    fill_uniform(w.w2(e), g, -a2, a2);
    fill_uniform(w.expert_bias(e), g, -0.5, 0.5);
  }
  fill_uniform(w.output_bias(), g, -0.5, 0.5);
}

}  // namespace dmoe_testing
