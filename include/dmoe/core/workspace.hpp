// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// Caller-provided scratch memory. Hot-path calls never allocate: a layer says how many bytes
/// it needs for given worst-case bounds, the caller provides them once and reuses them.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#include "checked.hpp"
#include "config.hpp"

DMOE_NAMESPACE_BEGIN

/// A block of caller-owned memory.
struct workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

/// Worst-case bounds from which workspace sizes are computed on the host.
struct workspace_bounds {
  index_t max_tokens = 0;   ///< most tokens passed to one call
  index_t max_threads = 1;  ///< largest executor concurrency the workspace will be used with
  /// Most (token, expert) slots one call may route (MoE layers; ignored elsewhere). 0 = the
  /// policy's worst case, max_tokens * max_k (for top-k exactly tokens * k; for dynamic-k without
  /// k_max and for top-any tokens * num_experts). A smaller bound shrinks the slot buffers; a
  /// forward whose batch routes more slots fails with errc::workspace_too_small instead of
  /// dropping any (routing_stats::max_slots_seen tells how many a workload needs).
  index_t max_slots = 0;
};

/// Owning, 64-byte aligned buffer for callers who want dmoe to hold the scratch memory.
/// Allocates only in its constructor / resize (cold path).
class workspace_buffer {
 public:
  workspace_buffer() = default;
  explicit workspace_buffer(std::size_t bytes) { resize(bytes); }
  /// Grows to at least `bytes`; throws dmoe::error(out_of_memory) naming the size when the
  /// allocation fails.
  void resize(std::size_t bytes) {
    if (bytes <= bytes_) return;
    void* p = ::operator new(bytes, std::align_val_t{64}, std::nothrow);
    if (!p)
      detail::raisef(errc::out_of_memory, "workspace_buffer: allocating %zu bytes failed", bytes);
    data_.reset(static_cast<std::byte*>(p));
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
/// the hot path share one layout routine and cannot disagree. Every size goes through checked
/// arithmetic: a layout whose size does not fit in size_t (absurd token counts or shapes) sets
/// overflowed() instead of wrapping, and the caller reports it before touching memory.
class carver {
 public:
  explicit carver(void* base = nullptr) noexcept : base_(static_cast<std::byte*>(base)) {}

  template <class T>
  T* take(index_t count) noexcept {
    std::size_t aligned = 0, bytes = 0, end = 0;
    const bool fits = add_ok(offset_, workspace_alignment - 1, aligned) &&
                      mul_ok(static_cast<std::size_t>(count > 0 ? count : 0), sizeof(T), bytes);
    aligned = aligned / workspace_alignment * workspace_alignment;
    if (!fits || !add_ok(aligned, bytes, end)) {
      overflow_ = true;
      return nullptr;
    }
    T* p = base_ && !overflow_ ? reinterpret_cast<T*>(base_ + aligned) : nullptr;
    offset_ = end;
    return p;
  }
  /// a * b (* c) as an element count; on overflow (or a negative factor) marks the layout
  /// overflowed and returns 0, so one check at the end covers every product of a layout.
  index_t mul(index_t a, index_t b, index_t c = 1) noexcept {
    checked_size s(a);
    s.mul(b).mul(c);
    if (!s.ok()) {
      overflow_ = true;
      return 0;
    }
    return s.value();
  }
  /// a + b as an element count, checked as mul.
  index_t add(index_t a, index_t b) noexcept {
    index_t out = 0;
    if (!add_ok(a, b, out)) {
      overflow_ = true;
      return 0;
    }
    return out;
  }
  /// True when some size of the layout did not fit; bytes() is then meaningless.
  bool overflowed() const noexcept { return overflow_; }
  /// Bytes used so far, plus slack so that an unaligned base still fits (0 after an overflow).
  std::size_t bytes() const noexcept {
    std::size_t b = 0;
    return !overflow_ && add_ok(offset_, workspace_alignment, b) ? b : 0;
  }

  /// Realigns a caller's base pointer to the carving alignment.
  static void* align(void* p) noexcept {
    auto v = reinterpret_cast<std::uintptr_t>(p);
    v = (v + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
    return reinterpret_cast<void*>(v);
  }

 private:
  std::byte* base_;
  std::size_t offset_ = 0;
  bool overflow_ = false;
};

/// What a forward leaves at the start of its workspace so that a later call that reads the
/// forward state (backward) can verify it holds a completed forward of this very layer, this
/// layout and this token count, instead of reading garbage.
struct workspace_stamp {
  static constexpr std::uint64_t magic_value = 0x646d6f6557534631ull;  // "dmoeWSF1"
  enum : std::uint64_t { running = 1, complete = 2, inference = 3 };
  std::uint64_t magic = 0;
  std::uint64_t layer = 0;   ///< instance_id of the layer that wrote it
  std::uint64_t layout = 0;  ///< hash of the buffer layout (shape, max_k, slot bound)
  std::uint64_t tokens = 0;
  std::uint64_t slots = 0;   ///< slot capacity the forward carved (the layout of the slot buffers)
  std::uint64_t state = 0;   ///< running while the forward runs, complete once it succeeded
};

/// FNV-1a over a few integers: the layout key of a stamp.
inline std::uint64_t layout_hash(const index_t* values, std::size_t count) noexcept {
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t k = 0; k < count; ++k)
    for (int i = 0; i < 8; ++i) {
      const index_t v = values[k];
      h ^= (static_cast<std::uint64_t>(v) >> (8 * i)) & 0xffu;
      h *= 1099511628211ull;
    }
  return h;
}

/// A process-unique id per layer object. A copy or a move gets a fresh id: a workspace filled
/// by one layer object is never taken for another's.
class instance_id {
 public:
  instance_id() noexcept : v_(next()) {}
  instance_id(const instance_id&) noexcept : v_(next()) {}
  instance_id& operator=(const instance_id&) noexcept { return *this; }
  std::uint64_t value() const noexcept { return v_; }

 private:
  static std::uint64_t next() noexcept {
    static std::atomic<std::uint64_t> counter{0};
    return counter.fetch_add(1, std::memory_order_relaxed) + 1;
  }
  std::uint64_t v_;
};

}  // namespace detail
DMOE_NAMESPACE_END  // namespace dmoe
