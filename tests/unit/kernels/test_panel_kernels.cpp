// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The CPU panel kernels (cpu/detail/panel_kernels.hpp) against a plain loop that computes each
// output element as one std::fma chain over k in order: every instruction set this CPU runs must
// give exactly those bits, for any row count, panel form, bias and row index. That one property
// is what makes layer outputs batch-, thread- and instruction-set-invariant.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <dmoe/cpu/detail/packed_experts.hpp>
#include <dmoe/cpu/detail/panel_kernels.hpp>

#include "sweep.hpp"

using dmoe::cpu_isa;
using dmoe::index_t;
namespace cd = dmoe::detail::cpu_backend;

namespace {

std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }

/// One kernel: an instruction set and, for AVX-512, one of its two register tiles.
struct kernel_choice {
  cpu_isa isa;
  cd::avx512_tile tile;
  std::string name() const {
    return std::string(dmoe::to_string(isa)) +
           (isa == cpu_isa::avx512 ? (tile == cd::avx512_tile::wide ? "/wide" : "/tall") : "");
  }
};
/// Every kernel this CPU runs.
std::vector<kernel_choice> runnable_kernels() {
  std::vector<kernel_choice> v;
  for (int i = 0; i <= int(dmoe::supported_cpu_isa()); ++i) {
    v.push_back({cpu_isa(i), cd::avx512_tile::tall});
    if (cpu_isa(i) == cpu_isa::avx512) v.push_back({cpu_isa(i), cd::avx512_tile::wide});
  }
  return v;
}
/// Selects a kernel's AVX-512 tile for a scope, restoring the previous one after.
struct tile_scope {
  cd::avx512_tile before = cd::active_avx512_tile();
  explicit tile_scope(const kernel_choice& k) { cd::set_avx512_tile(k.tile); }
  ~tile_scope() { cd::set_avx512_tile(before); }
};

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// One random product checked bitwise against the plain fma loop; returns mismatches.
template <class T>
int check_product(dmoe_test::test_rng& g, cpu_isa isa, index_t m, index_t N, index_t K, bool packed, bool bias,
                  bool indexed) {
  const index_t lda = K + g.integer(0, 3), ldb = N + g.integer(0, 3), ldc = N + g.integer(0, 5);
  const index_t src_rows = m + g.integer(0, 4);
  std::vector<T> A(sz(src_rows * lda + 1)), B(sz(K * ldb + 1)), init(sz(N));
  for (auto& v : A) v = T(g.normal());
  for (auto& v : B) v = T(g.normal());
  for (auto& v : init) v = T(g.normal());
  std::vector<index_t> idx(sz(m));
  for (auto& v : idx) v = g.integer(0, int(src_rows - 1));
  const index_t nr = cd::tile_for<T>(isa).nr();
  std::vector<T> P(sz(cd::packed_panel_elems(K, N, nr) + 1));
  cd::pack_panels<T>(K, N, B.data(), ldb, 1, nr, P.data());
  const auto pb = packed ? cd::panel_b<T>::packed(P.data(), K, nr) : cd::panel_b<T>::row_major(B.data(), ldb, nr);
  const T sentinel = T(-12345.0);
  std::vector<T> C(sz(m * ldc + 1), sentinel);
  const cd::row_source<T> a{A.data(), lda, indexed ? idx.data() : nullptr};
  cd::panel_product<T>(isa, m, N, K, a, pb, bias ? init.data() : nullptr, C.data(), ldc);
  int bad = 0;
  for (index_t i = 0; i < m; ++i) {
    const T* ar = A.data() + (indexed ? idx[std::size_t(i)] : i) * lda;
    for (index_t j = 0; j < ldc; ++j) {
      const T got = C[std::size_t(i * ldc + j)];
      if (j >= N) {  // padding columns of C are never written
        bad += !same_bits(got, sentinel);
        continue;
      }
      T acc = bias ? init[std::size_t(j)] : T(0);
      for (index_t k = 0; k < K; ++k) acc = std::fma(ar[k], B[std::size_t(k * ldb + j)], acc);
      bad += !same_bits(acc, got);
    }
  }
  return bad;
}

template <class T>
void random_products(const char* tag) {
  for (const kernel_choice& kc : runnable_kernels()) {
    const tile_scope scope(kc);
    const cpu_isa isa = kc.isa;
    dmoe_test::test_rng g(dmoe_test::seed_of(std::string("panel/") + tag + kc.name(), 0));
    for (int rep = 0; rep < 120; ++rep) {
      const index_t m = g.integer(1, 40), N = g.integer(1, 100), K = g.integer(0, 70);
      const bool packed = g.integer(0, 1) == 1, bias = g.integer(0, 1) == 1, indexed = g.integer(0, 1) == 1;
      INFO(kc.name(), " m=", m, " N=", N, " K=", K, " packed=", packed, " bias=", bias);
      CHECK(check_product<T>(g, isa, m, N, K, packed, bias, indexed) == 0);
    }
  }
}

/// panel_accumulate_at (C += A B with A given transposed, K x m) against the plain fma loop that
/// continues each element's chain from C; returns mismatches.
template <class T>
int check_accumulate_at(dmoe_test::test_rng& g, cpu_isa isa, index_t m, index_t N, index_t K) {
  const index_t lda = m + g.integer(0, 3), ldb = N + g.integer(0, 3), ldc = N + g.integer(0, 5);
  std::vector<T> At(sz(K * lda + 1)), B(sz(K * ldb + 1)), C(sz(m * ldc + 1));
  for (auto& v : At) v = T(g.normal());
  for (auto& v : B) v = T(g.normal());
  for (auto& v : C) v = T(g.normal());
  const std::vector<T> C0 = C;
  const index_t nr = cd::tile_for<T>(isa).nr();
  cd::panel_accumulate_at<T>(isa, m, N, K, At.data(), lda, cd::panel_b<T>::row_major(B.data(), ldb, nr), C.data(),
                             ldc);
  int bad = 0;
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < ldc; ++j) {
      T want = C0[std::size_t(i * ldc + j)];
      if (j < N)
        for (index_t k = 0; k < K; ++k) want = std::fma(At[std::size_t(k * lda + i)], B[std::size_t(k * ldb + j)], want);
      bad += !same_bits(want, C[std::size_t(i * ldc + j)]);
    }
  return bad;
}

/// The order cd::dot promises, written out: 64 bytes of partial fma chains, then halves added.
template <class T>
T dot_in_order(index_t n, const T* a, const T* b) {
  constexpr int P = int(64 / sizeof(T));
  T part[P] = {};
  for (index_t j = 0; j < n; ++j) part[j % P] = std::fma(a[j], b[j], part[j % P]);
  for (int l = 0; l < P; ++l)  // the kernels' masked tail: fma(0, 0, .) on the partials past n
    if (n % P != 0 && l >= n % P) part[l] = std::fma(T(0), T(0), part[l]);
  for (int w = P / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) part[i] += part[i + w];
  return part[0];
}

}  // namespace

TEST_SUITE("kernels") {
  TEST_CASE("panel kernels equal a std::fma chain bitwise, every ISA, float") { random_products<float>("f"); }
  TEST_CASE("panel kernels equal a std::fma chain bitwise, every ISA, double") { random_products<double>("d"); }

  TEST_CASE("panel kernels: tile edges (every row count up to 3 tiles, panel remainders)") {
    for (const kernel_choice& kc : runnable_kernels()) {
    const tile_scope scope(kc);
    const cpu_isa isa = kc.isa;
      dmoe_test::test_rng g(dmoe_test::seed_of(std::string("panel-edges/") + kc.name(), 0));
      const auto t = cd::tile_for<float>(isa);
      for (index_t m = 1; m <= 3 * t.mr + 1; ++m)
        for (index_t N : {index_t(1), t.nr() - 1, t.nr(), t.nr() + 1, 3 * t.nr() + 5}) {
          INFO(kc.name(), " m=", m, " N=", N);
          CHECK(check_product<float>(g, isa, m, N, 33, true, true, true) == 0);
          CHECK(check_product<float>(g, isa, m, N, 17, false, false, false) == 0);
        }
    }
  }

  TEST_CASE("panel kernels: a row's result does not depend on the other rows (batch invariance)") {
    for (const kernel_choice& kc : runnable_kernels()) {
    const tile_scope scope(kc);
    const cpu_isa isa = kc.isa;
      dmoe_test::test_rng g(dmoe_test::seed_of(std::string("panel-batch/") + kc.name(), 0));
      const index_t m = 37, N = 70, K = 129;
      std::vector<float> A(sz(m * K)), B(sz(K * N)), C(sz(m * N)), C1(sz(N));
      for (auto& v : A) v = float(g.normal());
      for (auto& v : B) v = float(g.normal());
      const index_t nr = cd::tile_for<float>(isa).nr();
      std::vector<float> P(sz(cd::packed_panel_elems(K, N, nr)));
      cd::pack_panels<float>(K, N, B.data(), N, 1, nr, P.data());
      const auto pb = cd::panel_b<float>::packed(P.data(), K, nr);
      cd::panel_product<float>(isa, m, N, K, {A.data(), K, nullptr}, pb, nullptr, C.data(), N);
      for (index_t i = 0; i < m; ++i) {
        cd::panel_product<float>(isa, 1, N, K, {A.data() + i * K, K, nullptr}, pb, nullptr, C1.data(), N);
        CHECK(std::memcmp(C1.data(), C.data() + i * N, sizeof(float) * std::size_t(N)) == 0);
      }
    }
  }

  TEST_CASE("panel_accumulate_at (weight gradients) equals a std::fma chain from C bitwise, every ISA") {
    for (const kernel_choice& kc : runnable_kernels()) {
      const tile_scope scope(kc);
      dmoe_test::test_rng g(dmoe_test::seed_of(std::string("panel-at/") + kc.name(), 0));
      const auto t = cd::tile_for<float>(kc.isa);
      for (int rep = 0; rep < 80; ++rep) {
        const index_t m = g.integer(1, 3 * t.mr + 1), N = g.integer(1, 3 * int(t.nr()) + 5), K = g.integer(0, 140);
        INFO(kc.name(), " m=", m, " N=", N, " K=", K);
        CHECK(check_accumulate_at<float>(g, kc.isa, m, N, K) == 0);
        CHECK(check_accumulate_at<double>(g, kc.isa, m, N, K) == 0);
      }
      // Deeper than one depth chunk (chains continued across chunks).
      CHECK(check_accumulate_at<float>(g, kc.isa, 20, 40, 1500) == 0);
    }
  }

  TEST_CASE("dot: one summation order on every ISA, the documented one") {
    for (const kernel_choice& kc : runnable_kernels()) {
      dmoe_test::test_rng g(dmoe_test::seed_of(std::string("dot/") + kc.name(), 0));
      for (index_t n : {0, 1, 7, 8, 15, 16, 17, 31, 33, 100, 768, 771}) {
        std::vector<float> a(sz(n) + 1), b(sz(n) + 1);
        std::vector<double> ad(sz(n) + 1), bd(sz(n) + 1);
        for (std::size_t i = 0; i < a.size(); ++i) {
          a[i] = float(g.normal()), b[i] = float(g.normal());
          ad[i] = g.normal(), bd[i] = g.normal();
        }
        INFO(kc.name(), " n=", n);
        CHECK(same_bits(cd::dot<float>(kc.isa, n, a.data(), b.data()), dot_in_order<float>(n, a.data(), b.data())));
        CHECK(same_bits(cd::dot<double>(kc.isa, n, ad.data(), bd.data()), dot_in_order<double>(n, ad.data(), bd.data())));
      }
    }
  }

  TEST_CASE("pack_panels: layout and zero padding") {
    const index_t K = 3, N = 5, nr = 4;
    std::vector<double> src(sz(K * N));
    for (index_t k = 0; k < K; ++k)
      for (index_t j = 0; j < N; ++j) src[std::size_t(j * K + k)] = double(10 * k + j);  // column-major
    std::vector<double> dst(sz(cd::packed_panel_elems(K, N, nr)), -1.0);
    CHECK(dst.size() == 24);
    cd::pack_panels<double>(K, N, src.data(), 1, K, nr, dst.data());
    for (index_t p = 0; p < 2; ++p)
      for (index_t k = 0; k < K; ++k)
        for (index_t jj = 0; jj < nr; ++jj) {
          const index_t j = p * nr + jj;
          CHECK(dst[std::size_t(p * K * nr + k * nr + jj)] == (j < N ? double(10 * k + j) : 0.0));
        }
  }

  TEST_CASE("pack_panels per ISA (AVX-512: 16 x 16 register transposes) equals the element-wise pack") {
    dmoe_test::test_rng g(dmoe_test::seed_of("pack/isa", 0));
    for (const kernel_choice& kc : runnable_kernels()) {
      const tile_scope scope(kc);
      const index_t nr = cd::tile_for<float>(kc.isa).nr();
      for (int rep = 0; rep < 60; ++rep) {
        const index_t K = g.integer(0, 70), N = g.integer(1, 150), extra = g.integer(0, 5);
        const bool columns = g.coin(0.7);  // sk = 1 (W1, W2 as stored) or sn = 1
        const index_t sk = columns ? 1 : N + extra, sn = columns ? K + extra : 1;
        std::vector<float> src(sz((columns ? N * sn : K * sk) + 1));
        for (auto& v : src) v = float(g.normal());
        std::vector<float> want(sz(cd::packed_panel_elems(K, N, nr) + 1), -1.0f), got = want;
        cd::pack_panels<float>(K, N, src.data(), sk, sn, nr, want.data());
        cd::pack_panels<float>(kc.isa, K, N, src.data(), sk, sn, nr, got.data());
        INFO(kc.name(), " K=", K, " N=", N, " columns=", columns);
        CHECK(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0);
      }
    }
  }

  TEST_CASE("set_cpu_isa: refuses what the CPU lacks, and changes no result") {
    const cpu_isa best = dmoe::supported_cpu_isa();
    CHECK_FALSE(dmoe::set_cpu_isa(cpu_isa(int(best) + 1)).ok());
    CHECK(std::string(dmoe::set_cpu_isa(cpu_isa(int(best) + 1)).message()).find("not supported") != std::string::npos);
    CHECK_FALSE(dmoe::set_cpu_isa(cpu_isa(-1)).ok());
    const cpu_isa before = dmoe::active_cpu_isa();
    CHECK(dmoe::set_cpu_isa(cpu_isa::portable).ok());
    CHECK(dmoe::active_cpu_isa() == cpu_isa::portable);
    CHECK(dmoe::set_cpu_isa(before).ok());
  }

  TEST_CASE("packed_experts: rebuilt when the weights' stamp moves or the ISA changes") {
    dmoe::expert_shape s{20, 3, 9, true, true, false, true};
    dmoe::expert_weights<float> w(s);
    w.randomize(7);
    cd::packed_experts<float> p(s);
    const cpu_isa isa = dmoe::active_cpu_isa();
    CHECK_FALSE(p.is_current(w, isa));
    p.refresh(w, isa);
    CHECK(p.is_current(w, isa));
    const index_t nr = cd::tile_for<float>(isa).nr();
    auto element_w1 = [&](index_t e, index_t k, index_t j) {
      return p.panels<float>(w).w1(e, nr).data[(j / nr) * s.d_model * nr + k * nr + j % nr];
    };
    CHECK(element_w1(2, 5, 17) == std::as_const(w).w1(2)(5, 17));
    w.w1(2)(5, 17) = 42.0f;  // a non-const access takes a new stamp
    CHECK_FALSE(p.is_current(w, isa));
    p.refresh(w, isa);
    CHECK(element_w1(2, 5, 17) == 42.0f);
    const auto stamp = w.version();
    w.mark_modified();
    CHECK(w.version() != stamp);
    if (isa != cpu_isa::portable) CHECK_FALSE(p.is_current(w = w, cpu_isa::portable));
    cd::packed_experts<float> q = p;  // copies carry the panels and their stamp
    CHECK(q.is_current(w, isa) == p.is_current(w, isa));
    if (isa == cpu_isa::avx512) {  // the other AVX-512 tile has another panel width: repacked
      p.refresh(w, isa);
      const kernel_choice other{isa, cd::active_avx512_tile() == cd::avx512_tile::wide ? cd::avx512_tile::tall
                                                                                       : cd::avx512_tile::wide};
      const tile_scope scope(other);
      CHECK_FALSE(p.is_current(w, isa));
      p.refresh(w, isa);
      CHECK(p.is_current(w, isa));
      const index_t nr2 = cd::tile_for<float>(isa).nr();
      CHECK(nr2 != nr);
      CHECK(p.panels<float>(w).w1(2, nr2).data[(17 / nr2) * s.d_model * nr2 + 5 * nr2 + 17 % nr2] == 42.0f);
    }
  }
}
