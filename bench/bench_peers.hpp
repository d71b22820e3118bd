// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// The peers every dmoe figure is read against, in the same binary and run: what a user would
/// pick instead of dmoe on this machine.
///  - dense_eigen_peer:  plain Eigen, Y = act(X W1 + b1) W2 + b2 with Eigen matrices, allocated
///                       once (Eigen is single-threaded here: no OpenMP).
///  - dense_blas_peer:   the same with OpenBLAS cblas_sgemm (Debian libopenblas-dev), bias
///                       broadcast then beta = 1 as torch.addmm does, on the benchmark's thread
///                       count (openblas_set_num_threads).
///  - expert_loop_peer:  a per-expert loop as PyTorch users write it, on OpenBLAS: for each expert,
///                       gather its rows, cblas_sgemm, bias + activation, cblas_sgemm, weighted
///                       scatter-add into y (index_add_). Its routing is the plan dmoe computed
///                       (moe_layer::plan), so the loop times the experts only: the router,
///                       which dmoe's forward includes, is not in the peer's time.
/// Weights use nn.Linear's layout, (out x in) row-major, which is dmoe's column-major (in x out)
/// storage read as is; where an accessor does not return a plain map the peer copies.
/// Everything is float: OpenBLAS peers are sgemm. Without OpenBLAS (DMOE_BENCH_HAVE_OPENBLAS 0)
/// the BLAS peers report that they are skipped, and nothing fails.
///
/// Cold-path set-up may allocate and throw; forward() does not allocate.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cerrno>
#include <strings.h>
#include <unistd.h>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <dmoe/dmoe.hpp>

#include "bench_limits.hpp"

#ifndef DMOE_BENCH_HAVE_OPENBLAS
#define DMOE_BENCH_HAVE_OPENBLAS 0
#endif
#if DMOE_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace dmoe_bench {

using dmoe::index_t;

// ---- failures that must fail the run ------------------------------------------------------------
/// Set when a cross-check between dmoe and a peer fails: main() then exits nonzero, so that a
/// CTest smoke run catches a peer (or dmoe) computing another function.
inline bool& check_failed() {
  static bool failed = false;
  return failed;
}

// ---- timing and FLOP counters shared by the benchmarks ---------------------------------------------
/// Runs the timed loop: body() once per iteration (returns false to stop after an error). Returns
/// the mean wall seconds per iteration, by our own clock, for the GFLOP/s counters.
template <class Body>
double timed(benchmark::State& state, Body&& body) {
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (!body()) break;
    benchmark::ClobberMemory();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return state.iterations() > 0 ? secs / double(state.iterations()) : 0.0;
}

/// flops = product FLOPs of one iteration; GFLOP/s and % of the measured FMA peak of `threads`.
inline void set_flops(benchmark::State& state, double flops, double secs, int threads) {
  state.counters["flops"] = flops;
  const double gflops = secs > 0 ? flops / secs / 1e9 : 0.0;
  state.counters["GFLOP/s"] = gflops;
  const double peak = probe().fma_peak(threads);
  state.counters["pct_peak"] = peak > 0 ? 100.0 * gflops / peak : 0.0;
}

/// A failed cross-check: reported on the benchmark and in the exit status.
inline void fail_check(benchmark::State& state, const std::string& what) {
  check_failed() = true;
  std::fprintf(stderr, "dmoe benchmark check failed: %s\n", what.c_str());
  state.SkipWithError(what.c_str());
}

/// max |a - b| / max |b|: 0 for equal outputs, whatever their scale.
template <class A, class B>
double relative_difference(const A& a, const B& b) {
  const double scale = double(b.cwiseAbs().maxCoeff());
  const double diff = double((a - b).cwiseAbs().maxCoeff());
  return scale > 0 ? diff / scale : diff;
}

// ---- OpenBLAS -------------------------------------------------------------------------------------
inline constexpr bool have_openblas = DMOE_BENCH_HAVE_OPENBLAS != 0;
inline constexpr const char* no_openblas_message =
    "OpenBLAS not found at build time: the OpenBLAS peers are skipped (install Debian's libopenblas-dev "
    "and re-run CMake)";

/// Pins OpenBLAS to `threads` (it otherwise uses every core, whatever the benchmark compares).
inline void openblas_threads(int threads) {
#if DMOE_BENCH_HAVE_OPENBLAS
  openblas_set_num_threads(threads < 1 ? 1 : threads);
#else
  (void)threads;
#endif
}

/// OpenBLAS (DYNAMIC_ARCH) picks its kernels from CPUID when it loads. Under some hypervisors it
/// does not recognise the CPU and falls back to its oldest x86-64 kernels (seen on an Intel Xeon
/// KVM guest with AVX-512: "Prescott", SSE3 only, 18% of the FMA peak for a dense GEMM against 84%
/// with its SkylakeX kernels), which would make the OpenBLAS peers look several times slower than
/// OpenBLAS is. When that happened on a CPU with AVX-512 or AVX2+FMA and OPENBLAS_CORETYPE is not
/// set, this re-executes the binary with OPENBLAS_CORETYPE=SkylakeX (AVX-512) or Haswell (AVX2),
/// saying so on stderr; the JSON context's `openblas` key records the core in use. Call first in
/// main, with main's argv.
inline void openblas_choose_core(char** argv) {
#if DMOE_BENCH_HAVE_OPENBLAS && (defined(__x86_64__) || defined(__i386__))
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  const char* core = openblas_get_corename();
  static const char* const pre_avx[] = {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom",
                                        "opteron", "opteron_sse3", "barcelona", "bobcat", "katmai",
                                        "coppermine", "northwood", "banias"};
  bool old = false;
  for (const char* c : pre_avx) old = old || strcasecmp(core, c) == 0;
  if (!old) return;
  __builtin_cpu_init();
  const char* want = nullptr;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    want = "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    want = "Haswell";
  if (want == nullptr) return;
  std::fprintf(stderr,
               "dmoe bench: OpenBLAS chose its %s kernels on a CPU with %s (it did not recognise this CPU); "
               "running again with OPENBLAS_CORETYPE=%s so that the OpenBLAS peers use the kernels it has for it\n",
               core, std::strcmp(want, "SkylakeX") == 0 ? "AVX-512" : "AVX2+FMA", want);
  setenv("OPENBLAS_CORETYPE", want, 1);
  execv("/proc/self/exe", argv);
  std::fprintf(stderr, "dmoe bench: re-executing failed (%s); the OpenBLAS peers keep the %s kernels\n",
               std::strerror(errno), core);
#else
  (void)argv;
#endif
}

/// "corename; config" of the OpenBLAS in use, or a note that there is none.
inline std::string openblas_info() {
#if DMOE_BENCH_HAVE_OPENBLAS
  return std::string(openblas_get_corename()) + "; " + openblas_get_config();
#else
  return "not built (no OpenBLAS found)";
#endif
}

/// C (rows x n, ldc) = A (rows x k, lda) * B^T + beta C with B (n x k, ldb) row-major: one
/// nn.Linear product.
inline void linear_sgemm(index_t rows, index_t n, index_t k, const float* a, index_t lda, const float* b,
                         index_t ldb, float beta, float* c, index_t ldc) {
#if DMOE_BENCH_HAVE_OPENBLAS
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(n), int(k), 1.0f, a, int(lda), b, int(ldb),
              beta, c, int(ldc));
#else
  (void)rows, (void)n, (void)k, (void)a, (void)lda, (void)b, (void)ldb, (void)beta, (void)c, (void)ldc;
  throw std::logic_error(no_openblas_message);
#endif
}

// ---- activation as a peer computes it ----------------------------------------------------------
/// post (rows x n, ld_post) = act(pre) for plain activations, act(gate) * up for gated ones
/// (pre = [gate n | up n] per row, ld_pre), with dmoe's own scalar definitions so the peers and
/// dmoe compute the same function.
template <class Act>
void peer_activation(const float* pre, index_t ld_pre, float* post, index_t ld_post, index_t rows, index_t n) {
  for (index_t i = 0; i < rows; ++i) {
    const float* p = pre + i * ld_pre;
    float* q = post + i * ld_post;
    if constexpr (Act::gated) {
      using B = typename Act::base;
      for (index_t j = 0; j < n; ++j) q[j] = B::apply(p[j]) * p[n + j];
    } else {
      for (index_t j = 0; j < n; ++j) q[j] = Act::apply(p[j]);
    }
  }
}

// ---- weights in nn.Linear layout ------------------------------------------------------------------
/// A weight matrix as (out x in) row-major: points into the layer's storage when the accessor
/// returns a plain column-major map of (in x out), else owns a copy.
struct linear_weight {
  const float* data = nullptr;
  index_t ld = 0;  ///< row stride (>= in)
  std::vector<float> own;

  template <class X>
  struct is_map : std::false_type {};
  template <class P, int O, class S>
  struct is_map<Eigen::Map<P, O, S>> : std::true_type {};

  /// m: the (in x out) logical matrix. Its storage is used in place only if it outlives this
  /// call: a map (a view of the layer's storage) or an lvalue; a temporary matrix is copied.
  template <class M>
  static linear_weight of(M&& m) {
    linear_weight w;
    using plain = std::decay_t<M>;
    constexpr bool lasting = is_map<plain>::value || std::is_lvalue_reference_v<M>;
    if constexpr (lasting && !(plain::Flags & Eigen::RowMajorBit) &&
                  Eigen::internal::has_direct_access<plain>::ret != 0) {
      if (m.innerStride() == 1) {
        w.data = m.data();
        w.ld = m.outerStride();
        return w;
      }
    }
    w.own.resize(std::size_t(m.rows()) * std::size_t(m.cols()));
    Eigen::Map<Eigen::MatrixXf>(w.own.data(), m.rows(), m.cols()) = m;
    w.data = w.own.data();
    w.ld = m.rows();
    return w;
  }
};

/// Vector copied out of an accessor (empty if the accessor is empty).
template <class V>
std::vector<float> vector_of(const V& v) {
  std::vector<float> out(std::size_t(v.size()));
  for (index_t i = 0; i < index_t(v.size()); ++i) out[std::size_t(i)] = float(v(i));
  return out;
}

// ---- dense peers ------------------------------------------------------------------------------------
/// Plain Eigen dense FFN with the weights of `net` (a dmoe::dense_ffn), buffers for `tokens` rows.
template <class Act>
class dense_eigen_peer {
 public:
  template <class Dense>
  dense_eigen_peer(const Dense& net, index_t tokens)
      : w1_(net.w1()), w2_(net.w2()), b1_(net.b1().transpose()), b2_(net.b2().transpose()),
        h_(tokens, net.w1().cols()), post_(tokens, net.hidden()), n_(net.hidden()) {}

  /// y = act(x W1 + b1) W2 + b2 (x, y: col-major Eigen, tokens rows).
  void forward(const Eigen::MatrixXf& x, Eigen::MatrixXf& y) {
    h_.noalias() = x * w1_;
    h_.rowwise() += b1_;
    if constexpr (Act::gated) {
      using B = typename Act::base;
      post_ = h_.leftCols(n_).unaryExpr([](float v) { return B::apply(v); }).cwiseProduct(h_.rightCols(n_));
      y.noalias() = post_ * w2_;
    } else {
      h_ = h_.unaryExpr([](float v) { return Act::apply(v); });
      y.noalias() = h_ * w2_;
    }
    y.rowwise() += b2_;
  }

 private:
  Eigen::MatrixXf w1_, w2_;
  Eigen::RowVectorXf b1_, b2_;
  Eigen::MatrixXf h_, post_;
  index_t n_;
};

/// OpenBLAS dense FFN with the weights of `net`, buffers for `tokens` rows (x, y row-major).
template <class Act>
class dense_blas_peer {
 public:
  template <class Dense>
  dense_blas_peer(const Dense& net, index_t tokens)
      : d_(net.d_model()), n_(net.hidden()), fn_(net.w1().cols()), w1_(linear_weight::of(net.w1())),
        w2_(linear_weight::of(net.w2())), b1_(vector_of(net.b1())), b2_(vector_of(net.b2())),
        h_(std::size_t(tokens) * std::size_t(fn_)), post_(Act::gated ? std::size_t(tokens) * std::size_t(n_) : 0) {}

  void forward(const float* x, index_t ldx, index_t tokens, float* y, index_t ldy) {
    for (index_t t = 0; t < tokens; ++t) std::copy(b1_.begin(), b1_.end(), h_.data() + t * fn_);
    linear_sgemm(tokens, fn_, d_, x, ldx, w1_.data, w1_.ld, 1.0f, h_.data(), fn_);
    float* post = h_.data();
    index_t ldp = fn_;
    if constexpr (Act::gated) {
      post = post_.data();
      ldp = n_;
    }
    peer_activation<Act>(h_.data(), fn_, post, ldp, tokens, n_);
    for (index_t t = 0; t < tokens; ++t) std::copy(b2_.begin(), b2_.end(), y + t * ldy);
    linear_sgemm(tokens, d_, n_, post, ldp, w2_.data, w2_.ld, 1.0f, y, ldy);
  }

 private:
  index_t d_, n_, fn_;
  linear_weight w1_, w2_;
  std::vector<float> b1_, b2_;
  std::vector<float> h_, post_;
};

// ---- the per-expert loop -----------------------------------------------------------------------------
/// An owned copy of a routing plan (the workspace it came from is reused by later forwards).
struct plan_copy {
  index_t tokens = 0, num_experts = 0;
  std::vector<index_t> token_offsets;
  std::vector<std::int32_t> expert;
  std::vector<float> weight;

  template <class Plan>
  static plan_copy of(const Plan& p) {
    plan_copy c;
    c.tokens = p.tokens;
    c.num_experts = p.num_experts;
    c.token_offsets.assign(p.token_offsets, p.token_offsets + p.tokens + 1);
    c.expert.assign(p.expert, p.expert + p.nnz());
    c.weight.assign(p.weight, p.weight + p.nnz());
    return c;
  }
  index_t nnz() const noexcept { return tokens > 0 ? token_offsets[std::size_t(tokens)] : 0; }
};

/// The PyTorch-style per-expert loop over the weights of a dmoe layer (float), on OpenBLAS:
///   y = b2; for e: idx = tokens routed to e; h = act(x[idx] W1_e^T + b1_e);
///           y.index_add_(0, idx, w[idx, None] * (h W2_e^T + b2_e))
/// The index lists are rebuilt from the plan on every call (what torch.where on the router's
/// output costs a user), so only the router itself is left out.
template <class Act>
class expert_loop_peer {
 public:
  template <class Layer>
  expert_loop_peer(const Layer& l, index_t capacity)
      : d_(l.d_model()), E_(l.num_experts()), n_(l.expert_width()), fn_(Act::gated ? 2 * n_ : n_),
        b2_(vector_of(l.experts().output_bias())) {
    const auto& ex = l.experts();
    for (index_t e = 0; e < E_; ++e) {
      w1_.push_back(linear_weight::of(ex.w1(e)));
      w2_.push_back(linear_weight::of(ex.w2(e)));
      b1_.push_back(vector_of(ex.b1(e)));
      b2e_.push_back(vector_of(ex.expert_bias(e)));
    }
    const std::size_t rows = std::size_t(capacity);
    offsets_.resize(std::size_t(E_) + 1);
    cursor_.resize(std::size_t(E_));
    const std::size_t nnz_max = rows * std::size_t(E_);
    token_.resize(nnz_max);
    wt_.resize(nnz_max);
    xe_.resize(rows * std::size_t(d_));
    h_.resize(rows * std::size_t(fn_));
    post_.resize(Act::gated ? rows * std::size_t(n_) : 0);
    ye_.resize(rows * std::size_t(d_));
  }

  /// y (plan.tokens x d, row stride ldy) = the layer's output for x under `plan`.
  void forward(const float* x, index_t ldx, const plan_copy& plan, float* y, index_t ldy) {
    const index_t tokens = plan.tokens, nnz = plan.nnz();
    // Per-expert token lists, in token order (torch.where / nonzero on the routing mask).
    std::fill(offsets_.begin(), offsets_.end(), index_t{0});
    for (index_t s = 0; s < nnz; ++s) ++offsets_[std::size_t(plan.expert[std::size_t(s)]) + 1];
    for (index_t e = 0; e < E_; ++e) offsets_[std::size_t(e) + 1] += offsets_[std::size_t(e)];
    std::copy(offsets_.begin(), offsets_.end() - 1, cursor_.begin());
    for (index_t t = 0; t < tokens; ++t)
      for (index_t s = plan.token_offsets[std::size_t(t)]; s < plan.token_offsets[std::size_t(t) + 1]; ++s) {
        const index_t pos = cursor_[std::size_t(plan.expert[std::size_t(s)])]++;
        token_[std::size_t(pos)] = t;
        wt_[std::size_t(pos)] = plan.weight[std::size_t(s)];
      }
    for (index_t t = 0; t < tokens; ++t) {
      float* yt = y + t * ldy;
      if (b2_.empty())
        std::fill(yt, yt + d_, 0.0f);
      else
        std::copy(b2_.begin(), b2_.end(), yt);
    }
    for (index_t e = 0; e < E_; ++e) {
      const index_t r0 = offsets_[std::size_t(e)], rows = offsets_[std::size_t(e) + 1] - r0;
      if (rows == 0) continue;
      for (index_t i = 0; i < rows; ++i) {  // x[idx]
        const float* src = x + token_[std::size_t(r0 + i)] * ldx;
        std::copy(src, src + d_, xe_.data() + i * d_);
      }
      const auto& b1 = b1_[std::size_t(e)];
      for (index_t i = 0; i < rows; ++i)
        if (b1.empty())
          std::fill(h_.data() + i * fn_, h_.data() + (i + 1) * fn_, 0.0f);
        else
          std::copy(b1.begin(), b1.end(), h_.data() + i * fn_);
      linear_sgemm(rows, fn_, d_, xe_.data(), d_, w1_[std::size_t(e)].data, w1_[std::size_t(e)].ld, 1.0f, h_.data(),
                   fn_);
      float* post = h_.data();
      index_t ldp = fn_;
      if constexpr (Act::gated) {
        post = post_.data();
        ldp = n_;
      }
      peer_activation<Act>(h_.data(), fn_, post, ldp, rows, n_);
      const auto& b2e = b2e_[std::size_t(e)];
      for (index_t i = 0; i < rows; ++i)
        if (b2e.empty())
          std::fill(ye_.data() + i * d_, ye_.data() + (i + 1) * d_, 0.0f);
        else
          std::copy(b2e.begin(), b2e.end(), ye_.data() + i * d_);
      linear_sgemm(rows, d_, n_, post, ldp, w2_[std::size_t(e)].data, w2_[std::size_t(e)].ld, 1.0f, ye_.data(), d_);
      for (index_t i = 0; i < rows; ++i) {  // y.index_add_(0, idx, w * ye)
        float* yt = y + token_[std::size_t(r0 + i)] * ldy;
        const float w = wt_[std::size_t(r0 + i)];
        const float* src = ye_.data() + i * d_;
        for (index_t j = 0; j < d_; ++j) yt[j] += w * src[j];
      }
    }
  }

 private:
  index_t d_, E_, n_, fn_;
  std::vector<linear_weight> w1_, w2_;
  std::vector<std::vector<float>> b1_, b2e_;
  std::vector<float> b2_;
  std::vector<index_t> offsets_, cursor_, token_;
  std::vector<float> wt_, xe_, h_, post_, ye_;
};

}  // namespace dmoe_bench
