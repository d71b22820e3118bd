// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// Backend tags and their runtime contexts. A user switches backend by changing one template
/// argument of the layer.

#include "config.hpp"
#include "executor.hpp"

// cudaStream_t is `CUstream_st*`; declaring the struct lets context<cuda> name a stream in plain
// C++ (no CUDA headers), so a CPU-only build compiles this file unchanged.
struct CUstream_st;

DMOE_NAMESPACE_BEGIN

/// CPU backend: Eigen kernels, parallelism through an executor.
struct cpu {};
/// CUDA backend: kernels on the caller's stream. Only usable from a .cu translation unit that
/// includes <dmoe/cuda.cuh>.
struct cuda {};

template <class Backend>
struct context;

/// CPU context. A null executor runs everything on the calling thread.
template <>
struct context<cpu> {
  executor* exec = nullptr;

  index_t concurrency() const noexcept { return exec ? exec->concurrency() : 1; }
  template <class F>
  void parallel_for(index_t n, F&& f) const noexcept {
    if (exec) {
      exec->parallel_for(n, std::forward<F>(f));
    } else {
      for (index_t i = 0; i < n; ++i) f(i, index_t{0});
    }
  }
};

/// CUDA context: the stream every kernel of a call is enqueued on (null = the legacy default
/// stream). A forward never synchronises it.
template <>
struct context<cuda> {
  CUstream_st* stream = nullptr;
};

DMOE_NAMESPACE_END  // namespace dmoe
