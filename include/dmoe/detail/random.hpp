// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// A small seeded generator whose output is the same on every platform (std distributions are
/// not), used for weight initialisation, conversion restarts and tests.

#include <cmath>
#include <cstdint>
#include <iterator>
#include <utility>

DMOE_NAMESPACE_BEGIN namespace detail {

/// splitmix64: tiny, fast, and good enough for initialisation and sampling.
class rng {
 public:
  explicit rng(std::uint64_t seed) noexcept : state_(seed) {}
  std::uint64_t next() noexcept {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1).
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) noexcept { return lo + (hi - lo) * uniform(); }
  /// Standard normal (Box-Muller).
  double normal() noexcept {
    double u1 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }
  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) noexcept { return n ? next() % n : 0; }
  /// Fisher-Yates shuffle of [first, last): the same order on every platform for a seed.
  template <class RandomIt>
  void shuffle(RandomIt first, RandomIt last) noexcept {
    const auto n = static_cast<std::uint64_t>(std::distance(first, last));
    for (std::uint64_t i = n; i > 1; --i) {
      using diff = typename std::iterator_traits<RandomIt>::difference_type;
      std::swap(first[static_cast<diff>(i - 1)], first[static_cast<diff>(below(i))]);
    }
  }

 private:
  std::uint64_t state_;
};

}  DMOE_NAMESPACE_END  // namespace dmoe::detail
