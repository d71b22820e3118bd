// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../../core/namespace.hpp"
/// \file
/// Which instruction set the CPU product kernels use, chosen at run time: users need no -march
/// flag. The best one the CPU runs is taken by default; the environment variable DMOE_CPU_ISA
/// (portable, avx2, avx512), read once, or dmoe::set_cpu_isa() caps it (for comparisons and
/// tests). Every path computes each output element with the same chain of fused multiply-adds in
/// the same order (panel_kernels.hpp), so the choice changes speed, never a result bit.

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../../core/status.hpp"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DMOE_NO_SIMD_KERNELS)
#define DMOE_HAVE_X86_KERNELS 1
#else
#define DMOE_HAVE_X86_KERNELS 0
#endif

DMOE_NAMESPACE_BEGIN

/// Instruction sets of the CPU product kernels, in increasing order.
enum class cpu_isa : int {
  portable = 0,  ///< plain C++ (std::fma), any CPU
  avx2 = 1,      ///< AVX2 + FMA (x86-64, Haswell / Zen and later)
  avx512 = 2     ///< AVX-512 F/BW/DQ/VL (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later)
};

inline const char* to_string(cpu_isa i) noexcept {
  switch (i) {
    case cpu_isa::portable: return "portable";
    case cpu_isa::avx2: return "avx2";
    case cpu_isa::avx512: return "avx512";
  }
  return "unknown";
}

namespace detail::cpu_backend {

/// The best instruction set this CPU runs (and this build compiled kernels for).
inline cpu_isa supported_isa() noexcept {
#if DMOE_HAVE_X86_KERNELS
  static const cpu_isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
      return cpu_isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return cpu_isa::avx2;
    return cpu_isa::portable;
  }();
  return best;
#else
  return cpu_isa::portable;
#endif
}

/// The cap from DMOE_CPU_ISA, or the supported one when unset or unknown.
inline cpu_isa env_isa_cap() noexcept {
  const char* v = std::getenv("DMOE_CPU_ISA");
  if (v == nullptr) return supported_isa();
  if (std::strcmp(v, "portable") == 0) return cpu_isa::portable;
  if (std::strcmp(v, "avx2") == 0) return cpu_isa::avx2;
  return supported_isa();
}

inline std::atomic<int>& active_isa_storage() noexcept {
  static std::atomic<int> isa{static_cast<int>(
      static_cast<int>(env_isa_cap()) < static_cast<int>(supported_isa()) ? env_isa_cap() : supported_isa())};
  return isa;
}

}  // namespace detail::cpu_backend

/// The instruction set the CPU kernels use now.
inline cpu_isa active_cpu_isa() noexcept {
  return static_cast<cpu_isa>(detail::cpu_backend::active_isa_storage().load(std::memory_order_relaxed));
}

/// The best instruction set this CPU and build support.
inline cpu_isa supported_cpu_isa() noexcept { return detail::cpu_backend::supported_isa(); }

/// Makes the CPU kernels use `isa` (for comparisons and tests). Fails if the CPU (or the build:
/// DMOE_NO_SIMD_KERNELS, non-x86) lacks it. Not to be called while forward/backward run.
/// Results do not change; layers repack their weights for the new panel width on next use.
inline status set_cpu_isa(cpu_isa isa) noexcept {
  if (static_cast<int>(isa) < 0 || static_cast<int>(isa) > static_cast<int>(detail::cpu_backend::supported_isa()))
    return status::failure(errc::unsupported, "set_cpu_isa: %s is not supported here (best: %s)", to_string(isa),
                           to_string(detail::cpu_backend::supported_isa()));
  detail::cpu_backend::active_isa_storage().store(static_cast<int>(isa), std::memory_order_relaxed);
  return {};
}

DMOE_NAMESPACE_END  // namespace dmoe
