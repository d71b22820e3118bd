// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// The machine's limits, measured by the benchmark binary itself so that every figure it reports
/// can be read against them:
///  - fp32 FMA peak: independent chains of vector FMAs (enough of them to cover the FMA latency
///    on two FMA ports), AVX-512 where the CPU has it, else AVX2+FMA, else scalar. Chosen at run
///    time with __builtin_cpu_supports and compiled with target attributes, so the probe needs no
///    -march flag and still measures the widest unit the CPU has.
///  - memory bandwidth: read (sum of 64-bit words in 16 concurrent streams) and copy (memcpy between the halves of one
///    buffer) over a buffer of at least 4x the last-level cache, read at run time
///    (sysconf(_SC_LEVEL3_CACHE_SIZE), else /sys), capped by a quarter of the available memory.
/// Both single-thread and all-threads (one std::thread per hardware thread). Each figure is the
/// best of several passes: on a shared machine the fastest pass is the least disturbed one.
///
/// probe() runs once per process (cold path: allocates and spawns threads); add_limits_context()
/// writes the figures into the Google Benchmark context, so every JSON carries them.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DMOE_BENCH_X86 1
#else
#define DMOE_BENCH_X86 0
#endif

#include <benchmark/benchmark.h>

namespace dmoe_bench {

/// What probe() measured. GFLOP/s count an FMA as 2 FLOPs; GB/s are 1e9 bytes per second, copy
/// counting the bytes read plus the bytes written (STREAM's convention).
struct machine_limits {
  int hw_threads = 1;
  std::size_t llc_bytes = 0;
  std::string llc_source;        ///< where llc_bytes came from
  std::string fma_isa;           ///< "avx512f", "avx2+fma" or "scalar"
  double fma_gflops_1t = 0;      ///< one thread
  double fma_gflops_all = 0;     ///< hw_threads threads at once
  std::size_t bw_bytes = 0;      ///< buffer size of the bandwidth probe
  bool bw_capped = false;        ///< true if free memory capped the buffer below 4x the LLC
  double read_gbs_1t = 0, read_gbs_all = 0;
  double copy_gbs_1t = 0, copy_gbs_all = 0;
  bool smoke = false;            ///< quick probe for a smoke run: figures are not limits

  /// Peak for a benchmark run on `threads` threads: the measured figure for 1 and for all
  /// hardware threads, else one thread's times the count (capped at all threads').
  double fma_peak(int threads) const noexcept {
    if (threads <= 1) return fma_gflops_1t;
    if (threads >= hw_threads) return fma_gflops_all;
    return std::min(fma_gflops_1t * threads, fma_gflops_all);
  }
  double read_bw(int threads) const noexcept {
    if (threads <= 1) return read_gbs_1t;
    if (threads >= hw_threads) return read_gbs_all;
    return std::min(read_gbs_1t * threads, read_gbs_all);
  }
};

namespace limits_detail {

using clock = std::chrono::steady_clock;
inline double seconds_since(clock::time_point t0) {
  return std::chrono::duration<double>(clock::now() - t0).count();
}

// ---- FMA chains --------------------------------------------------------------------------------
// Each kernel runs `iters` rounds of `chains` independent FMAs a = a * m + c. With m just below 1
// the chains converge to c / (1 - m) = 1: no overflow, no denormals. The sum of the accumulators is
// returned so the compiler cannot drop the work. FLOPs = iters * chains * lanes * 2.
#if DMOE_BENCH_X86
/// 16 zmm chains: FMA latency 4 x 2 ports needs 8 in flight; 16 leaves margin and fits the 32
/// registers.
__attribute__((target("avx512f"))) inline float fma_chains_avx512(std::int64_t iters) {
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
  __m512 a0 = _mm512_set1_ps(0.10f), a1 = _mm512_set1_ps(0.11f), a2 = _mm512_set1_ps(0.12f),
         a3 = _mm512_set1_ps(0.13f), a4 = _mm512_set1_ps(0.14f), a5 = _mm512_set1_ps(0.15f),
         a6 = _mm512_set1_ps(0.16f), a7 = _mm512_set1_ps(0.17f), a8 = _mm512_set1_ps(0.18f),
         a9 = _mm512_set1_ps(0.19f), a10 = _mm512_set1_ps(0.20f), a11 = _mm512_set1_ps(0.21f),
         a12 = _mm512_set1_ps(0.22f), a13 = _mm512_set1_ps(0.23f), a14 = _mm512_set1_ps(0.24f),
         a15 = _mm512_set1_ps(0.25f);
  for (std::int64_t i = 0; i < iters; ++i) {
    a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c); a2 = _mm512_fmadd_ps(a2, m, c);
    a3 = _mm512_fmadd_ps(a3, m, c); a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
    a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c); a8 = _mm512_fmadd_ps(a8, m, c);
    a9 = _mm512_fmadd_ps(a9, m, c); a10 = _mm512_fmadd_ps(a10, m, c); a11 = _mm512_fmadd_ps(a11, m, c);
    a12 = _mm512_fmadd_ps(a12, m, c); a13 = _mm512_fmadd_ps(a13, m, c); a14 = _mm512_fmadd_ps(a14, m, c);
    a15 = _mm512_fmadd_ps(a15, m, c);
  }
  const __m512 s = _mm512_add_ps(
      _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                    _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7))),
      _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)),
                    _mm512_add_ps(_mm512_add_ps(a12, a13), _mm512_add_ps(a14, a15))));
  alignas(64) float out[16];
  _mm512_store_ps(out, s);
  float r = 0;
  for (float v : out) r += v;
  return r;
}

/// 12 ymm chains (latency 4-5 x 2 ports; 16 registers).
__attribute__((target("avx2,fma"))) inline float fma_chains_avx2(std::int64_t iters) {
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
  __m256 a0 = _mm256_set1_ps(0.10f), a1 = _mm256_set1_ps(0.11f), a2 = _mm256_set1_ps(0.12f),
         a3 = _mm256_set1_ps(0.13f), a4 = _mm256_set1_ps(0.14f), a5 = _mm256_set1_ps(0.15f),
         a6 = _mm256_set1_ps(0.16f), a7 = _mm256_set1_ps(0.17f), a8 = _mm256_set1_ps(0.18f),
         a9 = _mm256_set1_ps(0.19f), a10 = _mm256_set1_ps(0.20f), a11 = _mm256_set1_ps(0.21f);
  for (std::int64_t i = 0; i < iters; ++i) {
    a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
    a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
    a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
    a9 = _mm256_fmadd_ps(a9, m, c); a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
  }
  const __m256 s = _mm256_add_ps(
      _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), _mm256_add_ps(a4, a5)),
      _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a6, a7), _mm256_add_ps(a8, a9)), _mm256_add_ps(a10, a11)));
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}
#endif

/// Portable fallback: 8 scalar chains (what the compiler makes of it is the machine's scalar rate).
inline float fma_chains_scalar(std::int64_t iters) {
  float a[8] = {0.10f, 0.11f, 0.12f, 0.13f, 0.14f, 0.15f, 0.16f, 0.17f};
  const float m = 0.999999f, c = 1e-6f;
  for (std::int64_t i = 0; i < iters; ++i)
    for (float& v : a) v = v * m + c;
  float s = 0;
  for (float v : a) s += v;
  return s;
}

struct fma_kernel {
  const char* isa;
  double flops_per_iter;
  float (*run)(std::int64_t);
};

inline fma_kernel pick_fma_kernel() {
#if DMOE_BENCH_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {"avx512f", 16.0 * 16.0 * 2.0, fma_chains_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {"avx2+fma", 12.0 * 8.0 * 2.0, fma_chains_avx2};
#endif
  return {"scalar", 8.0 * 2.0, fma_chains_scalar};
}

/// Runs fn(worker) on `threads` threads (the caller is worker 0) released together; returns the
/// wall time from the release to the last one's end.
template <class Fn>
double run_on_threads(int threads, Fn&& fn) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w)
    pool.emplace_back([&, w] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      fn(w);
    });
  while (ready.load() < threads - 1) std::this_thread::yield();
  const auto t0 = clock::now();
  go.store(true, std::memory_order_release);
  fn(0);
  for (auto& t : pool) t.join();
  return seconds_since(t0);
}

inline volatile float fma_sink = 0;

/// Best GFLOP/s of `passes` runs on `threads` threads, each thread running `iters` rounds.
inline double fma_gflops(const fma_kernel& k, int threads, std::int64_t iters, int passes) {
  double best = 0;
  for (int p = 0; p < passes; ++p) {
    std::vector<float> sinks(static_cast<std::size_t>(threads));
    const double t = run_on_threads(threads, [&](int w) { sinks[static_cast<std::size_t>(w)] = k.run(iters); });
    for (float s : sinks) fma_sink = fma_sink + s;
    best = std::max(best, k.flops_per_iter * double(iters) * threads / t / 1e9);
  }
  return best;
}

// ---- cache and memory size ------------------------------------------------------------------------
/// Size strings of /sys (e.g. "491520K", "32M") in bytes; 0 if unparsable.
inline std::size_t parse_size(const std::string& s) {
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (end == s.c_str()) return 0;
  switch (*end) {
    case 'K': case 'k': return std::size_t(v) << 10;
    case 'M': case 'm': return std::size_t(v) << 20;
    case 'G': case 'g': return std::size_t(v) << 30;
    default: return std::size_t(v);
  }
}

/// Largest cache of cpu0 (the last level), from sysconf, else from /sys; 0 if neither knows.
inline std::size_t last_level_cache(std::string& source) {
#if defined(_SC_LEVEL3_CACHE_SIZE)
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) {
    source = "sysconf(_SC_LEVEL3_CACHE_SIZE)";
    return std::size_t(l3);
  }
#endif
  std::size_t best = 0;
  for (int i = 0; i < 16; ++i) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
    std::string s;
    if (!(f >> s)) continue;
    best = std::max(best, parse_size(s));
  }
  if (best > 0) source = "/sys/devices/system/cpu/cpu0/cache";
  return best;
}

/// MemAvailable from /proc/meminfo, else free pages from sysconf; 0 if unknown.
inline std::size_t available_memory() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  unsigned long long kb = 0;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return std::size_t(kb) << 10;
#if defined(_SC_AVPHYS_PAGES)
  const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return std::size_t(pages) * std::size_t(page);
#endif
  return 0;
}

// ---- bandwidth ------------------------------------------------------------------------------------
inline volatile std::uint64_t read_sink = 0;

/// Sum of n words read as 16 concurrent streams (16 equal slices of the range, advanced
/// together): one stream leaves a core's line-fill buffers and prefetchers underused (on the
/// development VM 12.7 GB/s against 15.4 with 16 streams, which is also what a layer reading many
/// expert matrices at once gets). Vector loads where the CPU has them, chosen at run time.
inline constexpr int read_streams = 16;

#if DMOE_BENCH_X86
__attribute__((target("avx512f"))) inline std::uint64_t sum_streams_avx512(const std::uint64_t* p, std::size_t q) {
  __m512i acc[read_streams];
  for (auto& a : acc) a = _mm512_setzero_si512();
  for (std::size_t i = 0; i + 8 <= q; i += 8)
    for (int s = 0; s < read_streams; ++s)
      acc[s] = _mm512_add_epi64(acc[s], _mm512_loadu_si512(static_cast<const void*>(p + std::size_t(s) * q + i)));
  alignas(64) std::uint64_t lanes[8];
  std::uint64_t total = 0;
  for (auto& a : acc) {
    _mm512_store_si512(static_cast<void*>(lanes), a);
    for (std::uint64_t v : lanes) total += v;
  }
  return total;
}
__attribute__((target("avx2"))) inline std::uint64_t sum_streams_avx2(const std::uint64_t* p, std::size_t q) {
  __m256i acc[read_streams];
  for (auto& a : acc) a = _mm256_setzero_si256();
  for (std::size_t i = 0; i + 4 <= q; i += 4)
    for (int s = 0; s < read_streams; ++s)
      acc[s] = _mm256_add_epi64(
          acc[s], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + std::size_t(s) * q + i)));
  alignas(32) std::uint64_t lanes[4];
  std::uint64_t total = 0;
  for (auto& a : acc) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
    for (std::uint64_t v : lanes) total += v;
  }
  return total;
}
#endif

inline std::uint64_t sum_streams_scalar(const std::uint64_t* p, std::size_t q) {
  std::uint64_t acc[read_streams] = {};
  for (std::size_t i = 0; i < q; ++i)
    for (int s = 0; s < read_streams; ++s) acc[s] += p[std::size_t(s) * q + i];
  std::uint64_t total = 0;
  for (std::uint64_t v : acc) total += v;
  return total;
}

/// Sum of all n words (the streams cover n rounded down to 16 x 8 words; the rest is added plainly).
inline std::uint64_t sum_words(const std::uint64_t* p, std::size_t n) {
  const std::size_t q = n / read_streams / 8 * 8;  // words per stream, whole vectors
  std::uint64_t total = 0;
#if DMOE_BENCH_X86
  static const int isa = __builtin_cpu_supports("avx512f") ? 2 : (__builtin_cpu_supports("avx2") ? 1 : 0);
  total = isa == 2 ? sum_streams_avx512(p, q) : (isa == 1 ? sum_streams_avx2(p, q) : sum_streams_scalar(p, q));
#else
  total = sum_streams_scalar(p, q);
#endif
  for (std::size_t i = q * read_streams; i < n; ++i) total += p[i];
  return total;
}

/// Best read GB/s over `passes` passes of the whole buffer split into `threads` equal parts.
inline double read_gbs(const std::uint64_t* buf, std::size_t words, int threads, int passes) {
  double best = 0;
  const std::size_t part = words / std::size_t(threads);
  for (int p = 0; p < passes; ++p) {
    std::vector<std::uint64_t> sums(static_cast<std::size_t>(threads));
    const double t = run_on_threads(threads, [&](int w) {
      sums[std::size_t(w)] = sum_words(buf + std::size_t(w) * part, part);
    });
    for (auto s : sums) read_sink = read_sink + s;
    best = std::max(best, double(part * std::size_t(threads) * sizeof(std::uint64_t)) / t / 1e9);
  }
  return best;
}

/// Best copy GB/s (read + written bytes) of memcpy from the first half of the buffer into the
/// second, each thread copying its share.
inline double copy_gbs(std::uint64_t* buf, std::size_t words, int threads, int passes) {
  double best = 0;
  const std::size_t half = words / 2, part = half / std::size_t(threads);
  for (int p = 0; p < passes; ++p) {
    const double t = run_on_threads(threads, [&](int w) {
      std::memcpy(buf + half + std::size_t(w) * part, buf + std::size_t(w) * part, part * sizeof(std::uint64_t));
    });
    best = std::max(best, 2.0 * double(part * std::size_t(threads) * sizeof(std::uint64_t)) / t / 1e9);
  }
  read_sink = read_sink + buf[words - 1];
  return best;
}

inline std::string fmt1(double v) {
  char b[48];
  std::snprintf(b, sizeof(b), "%.1f", v);
  return b;
}

}  // namespace limits_detail

/// Set by --dmoe_smoke (see strip_smoke_flag): the probe then uses a small buffer and short runs,
/// and says so in the context; its figures are not the machine's limits.
inline bool& smoke_mode() {
  static bool smoke = false;
  return smoke;
}

/// Removes "--dmoe_smoke" from argv (before Google Benchmark parses it) and sets smoke_mode().
inline void strip_smoke_flag(std::vector<char*>& args) {
  auto it = std::remove_if(args.begin(), args.end(), [](char* a) { return a && std::strcmp(a, "--dmoe_smoke") == 0; });
  if (it != args.end()) smoke_mode() = true;
  args.erase(it, args.end());
}

/// Measures the limits once per process (about 2-4 s on a 2-core machine with a 480 MiB L3,
/// most of it the bandwidth buffer's first touch and passes).
inline const machine_limits& probe() {
  static const machine_limits lim = [] {
    using namespace limits_detail;
    machine_limits m;
    m.smoke = smoke_mode();
    m.hw_threads = std::max(1, int(std::thread::hardware_concurrency()));
    m.llc_bytes = last_level_cache(m.llc_source);
    if (m.llc_bytes == 0) {
      m.llc_bytes = std::size_t(32) << 20;
      m.llc_source = "unknown (assumed 32 MiB)";
    }

    const fma_kernel k = pick_fma_kernel();
    m.fma_isa = k.isa;
    // Grow the round count until one pass takes >= 50 ms (5 ms in a smoke run), then best of 5.
    std::int64_t iters = 1 << 16;
    const double want = m.smoke ? 0.005 : 0.05;
    for (;;) {
      const auto t0 = clock::now();
      fma_sink = fma_sink + k.run(iters);
      if (seconds_since(t0) >= want || iters > (std::int64_t(1) << 40)) break;
      iters *= 2;
    }
    const int passes = m.smoke ? 1 : 5;
    m.fma_gflops_1t = fma_gflops(k, 1, iters, passes);
    m.fma_gflops_all = m.hw_threads > 1 ? fma_gflops(k, m.hw_threads, iters, passes) : m.fma_gflops_1t;

    // Bandwidth buffer: 4x the LLC (at least 64 MiB), at most a quarter of the free memory.
    std::size_t bytes = std::max(m.llc_bytes * 4, std::size_t(64) << 20);
    const std::size_t avail = available_memory();
    if (avail > 0 && bytes > avail / 4) {
      bytes = avail / 4;
      m.bw_capped = true;
    }
    if (m.smoke) bytes = std::size_t(32) << 20;
    const std::size_t words = bytes / sizeof(std::uint64_t) / 64 * 64;
    m.bw_bytes = words * sizeof(std::uint64_t);
    std::unique_ptr<std::uint64_t[]> buf(new std::uint64_t[words]);
    // First touch from all threads, each on the share it will read (pages fault in outside the timing).
    run_on_threads(m.hw_threads, [&](int w) {
      const std::size_t part = words / std::size_t(m.hw_threads);
      for (std::size_t i = std::size_t(w) * part; i < std::size_t(w + 1) * part; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;
    });
    const int bw_passes = m.smoke ? 1 : 3;
    m.read_gbs_1t = read_gbs(buf.get(), words, 1, bw_passes);
    m.read_gbs_all = m.hw_threads > 1 ? read_gbs(buf.get(), words, m.hw_threads, bw_passes) : m.read_gbs_1t;
    m.copy_gbs_1t = copy_gbs(buf.get(), words, 1, bw_passes);
    m.copy_gbs_all = m.hw_threads > 1 ? copy_gbs(buf.get(), words, m.hw_threads, bw_passes) : m.copy_gbs_1t;
    return m;
  }();
  return lim;
}

/// Writes the limits into the benchmark context (limit_* keys), so every JSON carries them.
inline void add_limits_context(const machine_limits& m) {
  using limits_detail::fmt1;
  const std::string all = std::to_string(m.hw_threads);
  benchmark::AddCustomContext("limit_fma_isa", m.fma_isa);
  benchmark::AddCustomContext("limit_fma_gflops_1t", fmt1(m.fma_gflops_1t));
  benchmark::AddCustomContext("limit_fma_gflops_all", fmt1(m.fma_gflops_all));
  benchmark::AddCustomContext("limit_threads_all", all);
  benchmark::AddCustomContext("limit_llc_mib", fmt1(double(m.llc_bytes) / double(1 << 20)) + " (" + m.llc_source + ")");
  benchmark::AddCustomContext("limit_bw_buffer_mib", fmt1(double(m.bw_bytes) / double(1 << 20)) +
                                                        (m.bw_capped ? " (capped by free memory)" : ""));
  benchmark::AddCustomContext("limit_read_gbs_1t", fmt1(m.read_gbs_1t));
  benchmark::AddCustomContext("limit_read_gbs_all", fmt1(m.read_gbs_all));
  benchmark::AddCustomContext("limit_copy_gbs_1t", fmt1(m.copy_gbs_1t));
  benchmark::AddCustomContext("limit_copy_gbs_all", fmt1(m.copy_gbs_all));
  if (m.smoke) benchmark::AddCustomContext("limit_smoke", "1 (quick probe for a smoke run: these are not limits)");
  std::fprintf(stderr,
               "dmoe limits%s: fp32 FMA (%s) %.1f GFLOP/s 1 thread, %.1f on %d; read %.1f / %.1f GB/s, copy %.1f / "
               "%.1f GB/s (1 / %d threads) over %.0f MiB; LLC %.0f MiB\n",
               m.smoke ? " (smoke, not limits)" : "", m.fma_isa.c_str(), m.fma_gflops_1t, m.fma_gflops_all,
               m.hw_threads, m.read_gbs_1t, m.read_gbs_all, m.copy_gbs_1t, m.copy_gbs_all, m.hw_threads,
               double(m.bw_bytes) / double(1 << 20), double(m.llc_bytes) / double(1 << 20));
}

}  // namespace dmoe_bench
