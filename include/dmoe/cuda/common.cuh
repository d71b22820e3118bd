// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// CUDA backend basics: error translation, owning device memory (cold path), storage types and
/// their conversions, and the device-presence check the tests use.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/backend.hpp"
#include "../core/status.hpp"
#include "layout.hpp"

#if !defined(__CUDACC__)
#error "dmoe/cuda/*.cuh must be compiled by nvcc (a .cu translation unit)"
#endif

DMOE_NAMESPACE_BEGIN

/// Storage types the CUDA backend accepts: float, __half, __nv_bfloat16 (accumulation is fp32).
template <class T>
inline constexpr bool is_cuda_storage_v =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

namespace detail::cuda_backend {

/// A failed CUDA call as a status (hot path).
inline status cuda_failure(cudaError_t e, const char* what) noexcept {
  status s = status::failure(errc::cuda_error, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
  s.set_native_code(static_cast<int>(e));
  return s;
}

/// Throws dmoe::error on a failed CUDA call (cold path).
inline void throw_on_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    detail::raisef(e == cudaErrorMemoryAllocation ? errc::out_of_memory : errc::cuda_error, "%s: %s (%s)", what,
                   cudaGetErrorString(e), cudaGetErrorName(e));
}

// --- storage conversions (device) ------------------------------------------------------------
template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else
    return __bfloat162float(v);
}
template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(v);
  else
    return __float2bfloat16_rn(v);
}

/// Sum over the 32 lanes of a warp by an xor-shuffle tree: the order of the additions depends
/// only on the lane, so the result is bitwise reproducible (the backward's reductions use it).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// Fails (invalid_argument) when the current device is not `dev`, the device a layer's weights
/// live on: a launch there would read another device's pointers. One cudaGetDevice, no sync.
inline status check_current_device(int dev, const char* who) noexcept {
  int cur = -1;
  const cudaError_t e = cudaGetDevice(&cur);
  if (e != cudaSuccess) return cuda_failure(e, who);
  if (cur != dev)
    return status::failure(errc::invalid_argument,
                           "%s: the current device is %d, the layer's weights are on device %d (cudaSetDevice(%d) "
                           "first)",
                           who, cur, dev, dev);
  return {};
}

/// from_float for the expert activations and outputs the forward keeps in T: an fp16 value
/// beyond +-65504 saturates to +-65504 instead of becoming inf (and then NaN in the next
/// product) where the fp32 CPU stays finite; NaN stays NaN. float and bf16 (the float
/// exponent range) convert as from_float.
template <class T>
__device__ __forceinline__ T from_float_saturating(float v) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(v != v ? v : fminf(fmaxf(v, -65504.f), 65504.f));
  else
    return from_float<T>(v);
}

/// Host conversion of float weights to the storage type's bit pattern (cold path).
template <class T>
void convert_to_storage(const float* src, std::size_t count, T* dst) {
  for (std::size_t i = 0; i < count; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      dst[i] = src[i];
    } else {
      if constexpr (std::is_same_v<T, __half>) {
        __half_raw r;
        r.x = float_to_half_bits(src[i]);
        dst[i] = __half(r);
      } else {
        __nv_bfloat16_raw r;
        r.x = float_to_bf16_bits(src[i]);
        dst[i] = __nv_bfloat16(r);
      }
    }
  }
}
template <class T>
float storage_to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    if constexpr (std::is_same_v<T, __half>)
      return half_bits_to_float(static_cast<__half_raw>(v).x);
    else
      return bf16_bits_to_float(static_cast<__nv_bfloat16_raw>(v).x);
  }
}

/// Seeded uniform(-bound, bound) values, one splitmix64 draw per element (cold path helper).
template <class T>
__global__ void fill_uniform_kernel(T* p, std::size_t count, std::uint64_t seed, float bound) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < count;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = float(z >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
    p[i] = from_float<T>((2.f * u - 1.f) * bound);
  }
}

/// A private non-blocking stream for the cold paths (uploads, downloads, initialisation): work
/// there never touches the legacy default stream, which would break another thread's
/// global-mode graph capture and serialise with every blocking stream. Waited for before use
/// ends; destroyed with the object.
class cold_stream {
 public:
  cold_stream() { throw_on_cuda(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
  ~cold_stream() {
    if (s_) (void)cudaStreamDestroy(s_);
  }
  cold_stream(const cold_stream&) = delete;
  cold_stream& operator=(const cold_stream&) = delete;
  cudaStream_t get() const noexcept { return s_; }
  void wait(const char* what) const { throw_on_cuda(cudaStreamSynchronize(s_), what); }

 private:
  cudaStream_t s_ = nullptr;
};

/// Fills count elements at p on the device and waits for it (cold path).
template <class T>
void fill_uniform(T* p, std::size_t count, std::uint64_t seed, float bound) {
  if (count == 0) return;
  const cold_stream cs;
  fill_uniform_kernel<T><<<1024, 256, 0, cs.get()>>>(p, count, seed, bound);
  throw_on_cuda(cudaGetLastError(), "fill_uniform_kernel launch");
  cs.wait("fill_uniform_kernel");
}

/// Sets count bytes at p to zero and waits (cold path, on a private stream).
inline void zero_bytes(void* p, std::size_t count, const char* what) {
  if (count == 0) return;
  const cold_stream cs;
  throw_on_cuda(cudaMemsetAsync(p, 0, count, cs.get()), what);
  cs.wait(what);
}

}  // namespace detail::cuda_backend

/// Owning device array (cold path: the constructor allocates, the destructor frees). Move-only.
template <class T>
class device_array {
 public:
  device_array() = default;
  /// Throws dmoe::error(out_of_memory) naming the bytes when the device has not got them.
  explicit device_array(std::size_t count) : count_(count) {
    if (count == 0) return;
    if (count > static_cast<std::size_t>(-1) / sizeof(T))
      detail::raisef(errc::invalid_argument, "device_array: %zu elements of %zu bytes do not fit in size_t", count,
                     sizeof(T));
    const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&ptr_), count * sizeof(T));
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // not sticky: clear it so later calls are unaffected
      ptr_ = nullptr;
      count_ = 0;
      detail::raisef(errc::out_of_memory, "device_array: cudaMalloc of %zu bytes failed (out of device memory)",
                     count * sizeof(T));
    }
    if (e != cudaSuccess) count_ = 0;
    detail::cuda_backend::throw_on_cuda(e, "device_array: cudaMalloc");
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  device_array(device_array&& o) noexcept : ptr_(o.ptr_), count_(o.count_) {
    o.ptr_ = nullptr;
    o.count_ = 0;
  }
  device_array& operator=(device_array&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = o.ptr_;
      count_ = o.count_;
      o.ptr_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  ~device_array() { release(); }

  T* data() const noexcept { return ptr_; }
  std::size_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }

  /// Synchronous copy from host (count elements): the data is on the device when this returns
  /// (a private stream, waited for, so work on any stream issued afterwards sees it).
  void upload(const T* src, std::size_t count) {
    if (count > count_)
      detail::raisef(errc::invalid_argument, "device_array::upload: %zu elements into an array of %zu", count, count_);
    if (count > 0) {
      const detail::cuda_backend::cold_stream cs;
      detail::cuda_backend::throw_on_cuda(cudaMemcpyAsync(ptr_, src, count * sizeof(T), cudaMemcpyHostToDevice, cs.get()),
                                          "device_array::upload: cudaMemcpyAsync");
      cs.wait("device_array::upload: cudaStreamSynchronize");
    }
  }
  void upload(const std::vector<T>& v) { upload(v.data(), v.size()); }
  /// Synchronous copy to host (the whole array) after everything `after` has enqueued: pass the
  /// stream that wrote the array (a non-blocking stream is not ordered after any other).
  std::vector<T> download(cudaStream_t after) const {
    detail::cuda_backend::throw_on_cuda(cudaStreamSynchronize(after), "device_array::download: cudaStreamSynchronize");
    std::vector<T> v(count_);
    if (count_ > 0) {
      const detail::cuda_backend::cold_stream cs;
      detail::cuda_backend::throw_on_cuda(
          cudaMemcpyAsync(v.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost, cs.get()),
          "device_array::download: cudaMemcpyAsync");
      cs.wait("device_array::download: cudaStreamSynchronize");
    }
    return v;
  }
  /// Synchronous copy to host after all work on the device (cudaDeviceSynchronize: not while
  /// another thread captures a graph in global mode; use download(stream) there).
  std::vector<T> download() const {
    detail::cuda_backend::throw_on_cuda(cudaDeviceSynchronize(), "device_array::download: cudaDeviceSynchronize");
    return download(cudaStream_t{});
  }

 private:
  void release() noexcept {
    if (ptr_) (void)cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

/// Number of visible CUDA devices (0 when there is no driver or no device).
inline int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    return 0;
  }
  return n;
}

DMOE_NAMESPACE_END  // namespace dmoe
