// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The activation functors (scalar apply, derivative, vectorised apply_inplace) against the
// reference formulas, and the executors' contract (every task exactly once, worker ids in range,
// nested calls run inline).
#include <doctest/doctest.h>

#include <atomic>
#include <vector>

#include "sweep.hpp"

using namespace dmoe_test;

namespace {

template <class A>
void check_activation() {
  INFO(A::name);
  constexpr auto kind = ref::act_of<A>();
  Eigen::ArrayXXd ad(1, 201);
  Eigen::ArrayXXf af(1, 201);
  for (int i = 0; i <= 200; ++i) {
    ad(0, i) = -8.0 + 0.08 * i;
    af(0, i) = float(ad(0, i));
  }
  if constexpr (!A::gated) {
    for (int i = 0; i <= 200; ++i) {
      const double x = ad(0, i);
      CHECK(A::apply(x) == doctest::Approx(ref::act_base(kind, x)).epsilon(1e-12));
      CHECK(A::apply(float(x)) == doctest::Approx(ref::act_base(kind, x)).epsilon(1e-5));
      const double h = 1e-6;
      const double fd = (ref::act_base(kind, x + h) - ref::act_base(kind, x - h)) / (2 * h);
      if (kind != ref::act_kind::relu || std::fabs(x) > 1e-3)
        CHECK(A::derivative(x) == doctest::Approx(fd).epsilon(1e-6));
    }
    Eigen::ArrayXXd bd = ad;
    Eigen::ArrayXXf bf = af;
    A::apply_inplace(bd);
    A::apply_inplace(bf);
    for (int i = 0; i <= 200; ++i) {
      CHECK(bd(0, i) == doctest::Approx(ref::act_base(kind, ad(0, i))).epsilon(1e-12));
      CHECK(bf(0, i) == doctest::Approx(ref::act_base(kind, ad(0, i))).epsilon(1e-5));
    }
  } else {
    using B = typename A::base;
    for (int i = 0; i <= 200; ++i) CHECK(B::apply(ad(0, i)) == doctest::Approx(ref::act_base(kind, ad(0, i))));
  }
}

}  // namespace

TEST_SUITE("layer") {
  TEST_CASE("activations match the reference formulas") {
    check_activation<dmoe::relu>();
    check_activation<dmoe::gelu_erf>();
    check_activation<dmoe::gelu_tanh>();
    check_activation<dmoe::silu>();
    check_activation<dmoe::swiglu>();
    check_activation<dmoe::geglu>();
    CHECK(dmoe::width_factor<dmoe::swiglu> == 2);
    CHECK(dmoe::width_factor<dmoe::geglu> == 2);
    CHECK(dmoe::width_factor<dmoe::relu> == 1);
  }

  TEST_CASE("executors run every task exactly once") {
    dmoe::inline_executor inl;
    dmoe::thread_pool p1(1), p2(2), p4(4);
    dmoe::executor* execs[] = {&inl, &p1, &p2, &p4};
    for (dmoe::executor* ex : execs) {
      CAPTURE(ex->concurrency());
      for (index_t n : {index_t(0), index_t(1), index_t(3), index_t(1000)}) {
        std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
        std::atomic<bool> worker_ok{true};
        ex->parallel_for(n, [&](index_t task, index_t worker) noexcept {
          hits[std::size_t(task)].fetch_add(1);
          if (worker < 0 || worker >= ex->concurrency()) worker_ok = false;
          if (task == 0) {  // a nested call runs inline on the same worker
            ex->parallel_for(4, [&](index_t, index_t w2) noexcept {
              if (w2 < 0 || w2 >= ex->concurrency()) worker_ok = false;
            });
          }
        });
        bool once = true;
        for (auto& h : hits) once = once && h.load() == 1;
        CHECK(once);
        CHECK(worker_ok.load());
      }
    }
    dmoe::context<dmoe::cpu> none{};
    CHECK(none.concurrency() == 1);
    dmoe::context<dmoe::cpu> with{&p4};
    CHECK(with.concurrency() == 4);
  }
}
