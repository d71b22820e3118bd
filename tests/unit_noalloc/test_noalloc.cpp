// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The hot path never allocates (docs/design.md): forward and infer (float layers: on bf16 tiles,
// where the CPU has them) run with Eigen's run-time malloc guard off (EIGEN_RUNTIME_NO_MALLOC: any
// Eigen heap allocation asserts) and with the global
// operator new/delete replaced by counting versions, for every policy, plain and gated
// activations, no executor and a 2-thread pool (created before counting), small and large
// batches, zero tokens, and the error paths (a status never allocates).
#ifndef EIGEN_RUNTIME_NO_MALLOC
#error "tests/unit_noalloc must be compiled with -DEIGEN_RUNTIME_NO_MALLOC"
#endif

#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <new>

#include "test_util.hpp"

// ---- counting replacements of the global allocation functions --------------------------------
namespace {
std::atomic<long> g_allocs{0};
std::atomic<long> g_frees{0};

void* counted_alloc(std::size_t n, std::size_t align = 0) noexcept {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) n = 1;
  if (align <= alignof(std::max_align_t)) return std::malloc(n);
  void* p = nullptr;
  return posix_memalign(&p, align, n) == 0 ? p : nullptr;
}
void counted_free(void* p) noexcept {
  if (!p) return;
  g_frees.fetch_add(1, std::memory_order_relaxed);
  std::free(p);
}
void* or_throw(void* p) {
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return or_throw(counted_alloc(n)); }
void* operator new[](std::size_t n) { return or_throw(counted_alloc(n)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a) { return or_throw(counted_alloc(n, std::size_t(a))); }
void* operator new[](std::size_t n, std::align_val_t a) { return or_throw(counted_alloc(n, std::size_t(a))); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, std::size_t(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, std::size_t(a));
}
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { counted_free(p); }

using namespace dmoe_test;
using dmoe::row_matrix;

namespace {

/// Allocations and frees seen while f ran, with Eigen's malloc guard off.
template <class F>
std::pair<long, long> count_during(F&& f) {
  const long a0 = g_allocs.load(), f0 = g_frees.load();
  Eigen::internal::set_is_malloc_allowed(false);
  f();
  Eigen::internal::set_is_malloc_allowed(true);
  return {g_allocs.load() - a0, g_frees.load() - f0};
}

template <class T, class P, class A>
void check_no_alloc(typename P::options opt) {
  INFO((std::string(P::template router<float>::name) + " " + A::name + (std::is_same_v<T, float> ? " float" : " double")));
  dmoe::thread_pool pool(2);  // before counting: its threads allocate when they start
  const int d = 24, E = 6, n = 12;
  dmoe::moe_config cfg;
  cfg.d_model = d;
  cfg.num_experts = E;
  cfg.expert_width = n;
  cfg.expert_bias = true;
  cfg.router_hidden = 32;
  layer_t<T, P, A> layer(cfg, opt);
  layer.randomize(11);
  if constexpr (std::is_same_v<P, dmoe::top_any>) layer.router().threshold().setConstant(T(0.05));
  test_rng g(3);
  const auto x = random_tokens<T>(g, 300, d);
  row_matrix<T> y(300, d);
  row_matrix<T> x_bad(300, d + 1);
  x_bad.setZero();
  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{300, 2}));
  dmoe::routing_stats stats(E), wrong_stats(E + 1);
  // infer on bf16 tiles where the CPU has them (the tiles are allocated here, packed in the loop).
  if constexpr (std::is_same_v<T, float>) layer.set_infer_precision(dmoe::infer_precision::bf16);

  for (int threads : {1, 2}) {
    CAPTURE(threads);
    const dmoe::context<dmoe::cpu> ctx{threads == 2 ? &pool : nullptr};
    bool all_ok = true;
    const auto counts = count_during([&] {
      for (dmoe::index_t tokens : {dmoe::index_t(300), dmoe::index_t(1), dmoe::index_t(0), dmoe::index_t(129)}) {
        const dmoe::matrix_view<const T> xv(x.data(), tokens, d);
        const dmoe::matrix_view<T> yv(y.data(), tokens, d);
        all_ok = all_ok && layer.forward(ctx, xv, yv, ws).ok();
        all_ok = all_ok && layer.forward(ctx, xv, yv, ws, &stats).ok();
        all_ok = all_ok && layer.infer(ctx, xv, yv, ws, &stats).ok();
      }
      // Error paths format their message into the status: still no allocation.
      all_ok = all_ok && !layer.forward(ctx, x_bad, y, ws).ok();
      all_ok = all_ok && !layer.forward(ctx, x, y, dmoe::workspace{}).ok();
      all_ok = all_ok && !layer.forward(ctx, x, y, ws, &wrong_stats).ok();
    });
    CHECK(all_ok);
    CHECK(counts.first == 0);
    CHECK(counts.second == 0);
  }
}

}  // namespace

TEST_SUITE("noalloc") {
  TEST_CASE("the counting operator new sees allocations (self-test)") {
    const auto counts = count_during([] {
      auto* p = new int(3);
      delete p;
    });
    CHECK(counts.first == 1);
    CHECK(counts.second == 1);
  }

  TEST_CASE_TEMPLATE("forward and infer do not allocate", T, float, double) {
    check_no_alloc<T, dmoe::top_k, dmoe::relu>({2, true});
    check_no_alloc<T, dmoe::top_k, dmoe::swiglu>({6, false});
    check_no_alloc<T, dmoe::dynamic_k, dmoe::gelu_erf>({0.2, 0});
    check_no_alloc<T, dmoe::dynamic_k, dmoe::geglu>({0.5, 3});
    check_no_alloc<T, dmoe::top_any, dmoe::gelu_tanh>({false});
    check_no_alloc<T, dmoe::top_any, dmoe::swiglu>({true});
  }

  TEST_CASE("dense_ffn forward does not allocate") {
    dmoe::thread_pool pool(2);
    dmoe::dense_ffn<float, dmoe::geglu> f(20, 48);
    f.randomize(1);
    test_rng g(2);
    const auto x = random_tokens<float>(g, 200, 20);
    row_matrix<float> y(200, 20);
    dmoe::workspace_buffer ws(f.workspace_size(dmoe::workspace_bounds{200, 2}));
    for (dmoe::executor* ex : {static_cast<dmoe::executor*>(nullptr), static_cast<dmoe::executor*>(&pool)}) {
      bool ok = true;
      const auto counts = count_during([&] {
        ok = ok && f.forward(dmoe::context<dmoe::cpu>{ex}, x, y, ws).ok();
        ok = ok && f.forward(dmoe::context<dmoe::cpu>{ex}, dmoe::matrix_view<const float>(x.data(), 1, 20),
                             dmoe::matrix_view<float>(y.data(), 1, 20), ws)
                       .ok();
      });
      CHECK(ok);
      CHECK(counts.first == 0);
      CHECK(counts.second == 0);
    }
  }
}
