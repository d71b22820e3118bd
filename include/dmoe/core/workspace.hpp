// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Caller-provided scratch memory. Hot-path calls never allocate: a layer says how many bytes
/// it needs for given worst-case bounds, the caller provides them once and reuses them.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#include "config.hpp"

namespace dmoe {

/// A block of caller-owned memory.
struct workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

/// Worst-case bounds from which workspace sizes are computed on the host.
struct workspace_bounds {
  index_t max_tokens = 0;   ///< most tokens passed to one call
  index_t max_threads = 1;  ///< largest executor concurrency the workspace will be used with
};

/// Owning, 64-byte aligned buffer for callers who want dmoe to hold the scratch memory.
/// Allocates only in its constructor / resize (cold path).
class workspace_buffer {
 public:
  workspace_buffer() = default;
  explicit workspace_buffer(std::size_t bytes) { resize(bytes); }
  void resize(std::size_t bytes) {
    if (bytes <= bytes_) return;
    data_.reset(static_cast<std::byte*>(::operator new(bytes, std::align_val_t{64})));
    bytes_ = bytes;
  }
  workspace view() const noexcept { return workspace{data_.get(), bytes_}; }
  operator workspace() const noexcept { return view(); }  // NOLINT: implicit by design
  std::size_t size() const noexcept { return bytes_; }

 private:
  struct deleter {
    void operator()(std::byte* p) const noexcept { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<std::byte, deleter> data_;
  std::size_t bytes_ = 0;
};

namespace detail {

inline constexpr std::size_t workspace_alignment = 256;  // as CUB aliases its temporaries

/// Bump allocator over a workspace. With a null base it only measures, so the size function and
/// the hot path share one layout routine and cannot disagree.
class carver {
 public:
  explicit carver(void* base = nullptr) noexcept : base_(static_cast<std::byte*>(base)) {}

  template <class T>
  T* take(index_t count) noexcept {
    offset_ = (offset_ + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
    T* p = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<std::size_t>(count > 0 ? count : 0) * sizeof(T);
    return p;
  }
  /// Bytes used so far, plus slack so that an unaligned base still fits.
  std::size_t bytes() const noexcept { return offset_ + workspace_alignment; }

  /// Realigns a caller's base pointer to the carving alignment.
  static void* align(void* p) noexcept {
    auto v = reinterpret_cast<std::uintptr_t>(p);
    v = (v + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
    return reinterpret_cast<void*>(v);
  }

 private:
  std::byte* base_;
  std::size_t offset_ = 0;
};

}  // namespace detail
}  // namespace dmoe
