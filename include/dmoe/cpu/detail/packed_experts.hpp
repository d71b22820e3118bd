// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../../core/namespace.hpp"
/// \file
/// Expert weights in the panel layout of the CPU kernels (panel_kernels.hpp), kept beside the
/// canonical expert_weights by the CPU layer:
///   w1 of expert e: d x (f n), as panels of nr columns (neurons), each d rows of nr values;
///   w2 of expert e: n x d, as panels of nr columns (outputs), each n rows of nr values.
/// nr is the active instruction set's panel width. The panels are a cache of the weights: they
/// are rebuilt, on the next forward, whenever the weights' version stamp moved (any non-const
/// access, any optimizer step) or the instruction set changed. Storage is allocated once, for
/// the widest panel any instruction set uses, so a rebuild never allocates. The backward
/// products read the canonical storage directly (its layouts are already the row-major
/// transposes those products need).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>

#include "../../core/checked.hpp"
#include "../../core/config.hpp"
#include "../../core/status.hpp"
#include "../../experts/expert_weights.hpp"
#include "isa.hpp"
#include "panel_kernels.hpp"

DMOE_NAMESPACE_BEGIN namespace detail::cpu_backend {

/// 64-byte aligned array that reports allocation failure as dmoe::error (cold path).
template <class T>
class aligned_array {
 public:
  aligned_array() = default;
  aligned_array(const char* what, index_t count) { allocate(what, count); }
  aligned_array(const aligned_array& o) : aligned_array() {
    if (o.size_ > 0) {
      allocate("packed weights (copy)", o.size_);
      std::copy(o.data(), o.data() + o.size_, data());
    }
  }
  aligned_array(aligned_array&& o) noexcept : ptr_(std::move(o.ptr_)), size_(o.size_) { o.size_ = 0; }
  aligned_array& operator=(aligned_array o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
    return *this;
  }
  T* data() noexcept { return ptr_.get(); }
  const T* data() const noexcept { return ptr_.get(); }
  index_t size() const noexcept { return size_; }

 private:
  struct deleter {
    void operator()(T* p) const noexcept { ::operator delete(p, std::align_val_t{64}); }
  };
  void allocate(const char* what, index_t count) {
    std::size_t bytes = 0;
    if (count < 0 || !detail::mul_ok(static_cast<std::size_t>(count), sizeof(T), bytes))
      detail::raisef(errc::invalid_argument, "%s: %td elements do not fit in memory sizes", what, count);
    void* p = ::operator new(bytes == 0 ? 64 : bytes, std::align_val_t{64}, std::nothrow);
    if (p == nullptr) detail::raisef(errc::out_of_memory, "%s: could not allocate %zu bytes", what, bytes);
    ptr_.reset(static_cast<T*>(p));
    size_ = count;
  }
  std::unique_ptr<T, deleter> ptr_;
  index_t size_ = 0;
};

template <class T>
class packed_experts {
 public:
  packed_experts() = default;
  explicit packed_experts(const expert_shape& s)
      : shape_(s),
        w1_stride_(detail::checked_product_or_throw(
            "packed expert weights (w1)", s.d_model,
            packed_panel_elems(1, s.first_width(), max_panel_width<T>()))),
        w2_stride_(detail::checked_product_or_throw("packed expert weights (w2)", s.width,
                                                    packed_panel_elems(1, s.d_model, max_panel_width<T>()))),
        w1p_("packed expert weights (w1)", detail::checked_product_or_throw("packed expert weights (w1)", w1_stride_,
                                                                             s.num_experts)),
        w2p_("packed expert weights (w2)", detail::checked_product_or_throw("packed expert weights (w2)", w2_stride_,
                                                                             s.num_experts)) {}
  packed_experts(const packed_experts& o)
      : shape_(o.shape_), w1_stride_(o.w1_stride_), w2_stride_(o.w2_stride_), w1p_(o.w1p_), w2p_(o.w2p_) {
    packed_version_.store(o.packed_version_.load(std::memory_order_acquire), std::memory_order_relaxed);
    packed_nr_.store(o.packed_nr_.load(std::memory_order_acquire), std::memory_order_relaxed);
  }
  packed_experts& operator=(const packed_experts& o) {
    if (this != &o) {
      packed_experts tmp(o);
      shape_ = tmp.shape_;
      w1_stride_ = tmp.w1_stride_;
      w2_stride_ = tmp.w2_stride_;
      w1p_ = std::move(tmp.w1p_);
      w2p_ = std::move(tmp.w2p_);
      packed_version_.store(tmp.packed_version_.load(), std::memory_order_release);
      packed_nr_.store(tmp.packed_nr_.load(), std::memory_order_release);
    }
    return *this;
  }
  packed_experts(packed_experts&& o) noexcept
      : shape_(o.shape_),
        w1_stride_(o.w1_stride_),
        w2_stride_(o.w2_stride_),
        w1p_(std::move(o.w1p_)),
        w2p_(std::move(o.w2p_)) {
    packed_version_.store(o.packed_version_.load(std::memory_order_acquire), std::memory_order_relaxed);
    packed_nr_.store(o.packed_nr_.load(std::memory_order_acquire), std::memory_order_relaxed);
    o.packed_version_.store(0);
  }
  packed_experts& operator=(packed_experts&& o) noexcept {
    if (this != &o) {
      shape_ = o.shape_;
      w1_stride_ = o.w1_stride_;
      w2_stride_ = o.w2_stride_;
      w1p_ = std::move(o.w1p_);
      w2p_ = std::move(o.w2p_);
      packed_version_.store(o.packed_version_.load(), std::memory_order_release);
      packed_nr_.store(o.packed_nr_.load(), std::memory_order_release);
      o.packed_version_.store(0);
    }
    return *this;
  }

  /// Rebuilds the panels if `w` changed since they were packed, or the panel width did (another
  /// instruction set or AVX-512 tile).
  /// Safe to call from concurrent forwards (one packs, the others wait); the weights must not be
  /// written meanwhile (as for any read of them). Allocates nothing.
  void refresh(const expert_weights<T>& w, cpu_isa isa) const noexcept {
    if (is_current(w, isa)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (is_current(w, isa)) return;
    const std::uint64_t version = w.version();
    const index_t nr = tile_for<T>(isa).nr();
    pack_all(w, nr);
    packed_nr_.store(nr, std::memory_order_relaxed);
    packed_version_.store(version, std::memory_order_release);
  }
  bool is_current(const expert_weights<T>& w, cpu_isa isa) const noexcept {
    return packed_version_.load(std::memory_order_acquire) == w.version() &&
           packed_nr_.load(std::memory_order_relaxed) == tile_for<T>(isa).nr();
  }

  /// Panels of expert e (valid after refresh with the same instruction set).
  panel_b<T> w1(index_t e, index_t nr) const noexcept {
    return panel_b<T>::packed(w1p_.data() + e * w1_stride_, shape_.d_model, nr);
  }
  panel_b<T> w2(index_t e, index_t nr) const noexcept {
    return panel_b<T>::packed(w2p_.data() + e * w2_stride_, shape_.width, nr);
  }
  /// Bytes held by the panels.
  std::size_t bytes() const noexcept { return std::size_t(w1p_.size() + w2p_.size()) * sizeof(T); }

 private:
  void pack_all(const expert_weights<T>& w, index_t nr) const noexcept {
    const index_t d = shape_.d_model, fn = shape_.first_width(), n = shape_.width;
    for (index_t e = 0; e < shape_.num_experts; ++e) {
      // w1_e is column-major d x fn: element (k, j) at w1[j d + k]; w2_e column-major n x d.
      pack_panels<T>(d, fn, w.w1_ptr(e), 1, d, nr, w1p_.data() + e * w1_stride_);
      pack_panels<T>(n, d, w.w2_ptr(e), 1, n, nr, w2p_.data() + e * w2_stride_);
    }
  }

  expert_shape shape_{};
  index_t w1_stride_ = 0, w2_stride_ = 0;
  mutable aligned_array<T> w1p_, w2p_;  // a cache of the weights: rebuilt inside const forwards
  mutable std::atomic<std::uint64_t> packed_version_{0};  // 0: never packed (stamps start at 1)
  mutable std::atomic<index_t> packed_nr_{-1};  // panel width packed (tile_for(isa).nr())
  mutable std::mutex mutex_;  // each copy has its own
};

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
