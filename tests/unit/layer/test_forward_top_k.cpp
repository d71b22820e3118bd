// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Random sweep of the top_k layer against the independent reference (tests/support/reference.hpp):
// float and double, all six activations, random shapes, biases and options; compares the
// forward output element by element, the routing plan slot by slot and the statistics.
#include <doctest/doctest.h>

#include "sweep.hpp"

using namespace dmoe_test;

TEST_SUITE("layer") {
  TEST_CASE_TEMPLATE("top_k forward matches the reference over random shapes", T, float, double) {
    for_each_activation([&](auto act) {
      using A = decltype(act);
      const std::string tag = std::string("forward/top_k/") + type_name<T>() + "/" + A::name;
      for (int i = 0; i < 30; ++i) {
        case_params p = random_params(seed_of(tag, i), policy_of<dmoe::top_k>(), 0.05);
        if (i == 0) p.tokens = 300;  // several 128-row tasks per expert
        check_case<T, dmoe::top_k, A>(p);
      }
    });
  }
}
