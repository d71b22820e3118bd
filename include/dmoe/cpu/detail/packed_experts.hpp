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
/// access, any optimizer step) or the instruction set changed. Storage is allocated once per
/// format, for the widest panel any instruction set uses, so a rebuild never allocates. With
/// float storage the backward products read the canonical storage directly (its layouts are
/// already the row-major transposes those products need); with 16-bit storage they read 16-bit
/// panels of those transposes, so that backward multiplies by the same rounded weights.

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
#include "../../experts/weight_storage.hpp"
#include "amx_kernels.hpp"
#include "half.hpp"
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

/// What the expert products read for one storage format BS (T, or bf16_t / f16_t for float):
/// W1_e and W2_e as packed panels (the forward products), and W2_e^T, W1_e^T (backward's
/// products towards the input): for BS = T the canonical storage read in place (its layouts are
/// those row-major transposes), for 16-bit panels packed from it.
template <class T, class BS>
struct expert_panels {
  const expert_weights<T>* w = nullptr;
  const BS* w1p = nullptr;
  const BS* w2p = nullptr;
  const BS* w2tp = nullptr;  // 16-bit only
  const BS* w1tp = nullptr;  // 16-bit only
  index_t w1_stride = 0, w2_stride = 0, w2t_stride = 0, w1t_stride = 0;

  panel_b<BS> w1(index_t e, index_t nr) const noexcept {
    return panel_b<BS>::packed(w1p + e * w1_stride, w->d_model(), nr);
  }
  panel_b<BS> w2(index_t e, index_t nr) const noexcept { return panel_b<BS>::packed(w2p + e * w2_stride, w->width(), nr); }
  /// W2_e^T (d x n), the B of dpost = g W2_e^T.
  panel_b<BS> w2t(index_t e, index_t nr) const noexcept {
    if constexpr (std::is_same_v<BS, T>)
      return panel_b<T>::row_major(w->w2_ptr(e), w->width(), nr);
    else
      return panel_b<BS>::packed(w2tp + e * w2t_stride, w->d_model(), nr);
  }
  /// W1_e^T (f n x d), the B of dx = dpre W1_e^T.
  panel_b<BS> w1t(index_t e, index_t nr) const noexcept {
    if constexpr (std::is_same_v<BS, T>)
      return panel_b<T>::row_major(w->w1_ptr(e), w->d_model(), nr);
    else
      return panel_b<BS>::packed(w1tp + e * w1t_stride, w->shape().first_width(), nr);
  }
};

/// What infer's tile products (amx_kernels.hpp) read: W1_e (d x f n) and W2_e (n x d) packed by
/// amx_pack_b, and the expert biases b1_e, b2_e zero padded to whole tiles (null without them).
struct expert_tiles {
  const bf16_t* w1 = nullptr;
  const bf16_t* w2 = nullptr;
  const float* b1 = nullptr;
  const float* b2e = nullptr;
  index_t w1_stride = 0, w2_stride = 0, b1_stride = 0, b2_stride = 0;
  const bf16_t* w1_of(index_t e) const noexcept { return w1 + e * w1_stride; }
  const bf16_t* w2_of(index_t e) const noexcept { return w2 + e * w2_stride; }
  const float* b1_of(index_t e) const noexcept { return b1 ? b1 + e * b1_stride : nullptr; }
  const float* b2e_of(index_t e) const noexcept { return b2e ? b2e + e * b2_stride : nullptr; }
};

/// The kernels' copy of the expert matrices in the layer's weight_storage: float panels of W1 and
/// W2, or 16-bit panels of W1, W2 and (packed on the first backward) of W2^T and W1^T. Only the
/// format in use is allocated (set_storage, cold path).
template <class T>
class packed_experts {
  template <class H>
  struct half_arrays {
    aligned_array<H> w1, w2, w2t, w1t;
  };
  // Everything but the stamps and the lock: copied as a whole.
  // infer_precision::bf16's tiles (float layers only; allocated by set_tiles).
  struct tile_arrays {
    bool enabled = false;
    aligned_array<bf16_t> w1, w2;
    aligned_array<float> b1, b2e;
  };
  struct arrays {
    weight_storage storage = weight_storage::f32;
    index_t w1_stride = 0, w2_stride = 0, w2t_stride = 0, w1t_stride = 0;
    aligned_array<T> w1, w2;
    half_arrays<bf16_t> bf;
    half_arrays<f16_t> hf;
    tile_arrays tiles;
  };

 public:
  packed_experts() = default;
  explicit packed_experts(const expert_shape& s) : shape_(s) {
    const index_t nr = max_panel_width<T>();
    const char* what = "packed expert weights";
    a_.w1_stride = detail::checked_product_or_throw(what, s.d_model, packed_panel_elems(1, s.first_width(), nr));
    a_.w2_stride = detail::checked_product_or_throw(what, s.width, packed_panel_elems(1, s.d_model, nr));
    a_.w2t_stride = detail::checked_product_or_throw(what, s.d_model, packed_panel_elems(1, s.width, nr));
    a_.w1t_stride = detail::checked_product_or_throw(what, s.first_width(), packed_panel_elems(1, s.d_model, nr));
    allocate(weight_storage::f32);
  }
  packed_experts(const packed_experts& o) : shape_(o.shape_), a_(o.a_) { copy_stamps(o); }
  packed_experts& operator=(const packed_experts& o) {
    if (this != &o) {
      arrays tmp = o.a_;  // may throw: this stays as it was
      shape_ = o.shape_;
      a_ = std::move(tmp);
      copy_stamps(o);
    }
    return *this;
  }
  packed_experts(packed_experts&& o) noexcept : shape_(o.shape_), a_(std::move(o.a_)) {
    copy_stamps(o);
    o.forget();
  }
  packed_experts& operator=(packed_experts&& o) noexcept {
    if (this != &o) {
      shape_ = o.shape_;
      a_ = std::move(o.a_);
      copy_stamps(o);
      o.forget();
    }
    return *this;
  }

  weight_storage storage() const noexcept { return a_.storage; }
  /// Switches the format the kernels read (cold path: allocates the new panels, frees the old;
  /// the next forward packs). 16-bit formats need T = float. Not while forward/backward run.
  void set_storage(weight_storage s) {
    if (s == a_.storage) return;
    if (s != weight_storage::f32 && !std::is_same_v<T, float>)
      detail::raisef(errc::invalid_argument,
                     "set_weight_storage(%s): 16-bit weight storage needs a float layer (this one computes in "
                     "double)",
                     to_string(s));
    if (s != weight_storage::f32 && s != weight_storage::bf16 && s != weight_storage::f16)
      detail::raisef(errc::invalid_argument, "set_weight_storage: %d is not a weight_storage", int(s));
    allocate(s);
  }

  bool tiles_enabled() const noexcept { return a_.tiles.enabled; }
  /// Keeps (or drops) bf16 tile copies of W1, W2 for infer_precision::bf16 (cold path: allocates
  /// them, the next such infer packs). Needs T = float.
  void set_tiles(bool on) {
    if (on == a_.tiles.enabled) return;
    tile_arrays t;
    if (on) {
      if (!std::is_same_v<T, float>)
        detail::raisef(errc::invalid_argument,
                       "set_infer_precision(bf16): bf16 tiles need a float layer (this one computes in double)");
      const expert_shape& s = shape_;
      const char* what = "bf16 expert tiles";
      t.w1 = aligned_array<bf16_t>(what, detail::checked_product_or_throw(what, s.num_experts, tile_w1_stride()));
      t.w2 = aligned_array<bf16_t>(what, detail::checked_product_or_throw(what, s.num_experts, tile_w2_stride()));
      if (s.hidden_bias) t.b1 = aligned_array<float>(what, detail::checked_product_or_throw(what, s.num_experts, round_up(s.first_width(), amx_rows)));
      if (s.expert_bias) t.b2e = aligned_array<float>(what, detail::checked_product_or_throw(what, s.num_experts, round_up(s.d_model, amx_rows)));
      t.enabled = true;
    }
    a_.tiles = std::move(t);
    tile_version_.store(0);
  }
  /// Repacks the tiles if `w` changed since they were packed (as refresh; float layers).
  void refresh_tiles(const expert_weights<T>& w) const noexcept {
    if (tile_version_.load(std::memory_order_acquire) == w.version()) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (tile_version_.load(std::memory_order_acquire) == w.version()) return;
    if constexpr (std::is_same_v<T, float>) {
      const index_t d = shape_.d_model, fn = shape_.first_width(), n = shape_.width;
      const index_t b1s = round_up(fn, amx_rows), b2s = round_up(d, amx_rows);
      tile_arrays& t = a_.tiles;
      for (index_t e = 0; e < shape_.num_experts; ++e) {
        // w1_e is column-major d x fn (element (k, j) at w1[j d + k]); w2_e column-major n x d.
        amx_pack_b(d, fn, w.w1_ptr(e), 1, d, t.w1.data() + e * tile_w1_stride());
        amx_pack_b(n, d, w.w2_ptr(e), 1, n, t.w2.data() + e * tile_w2_stride());
        auto padded = [](const float* src, index_t len, index_t stride, float* dst) noexcept {
          std::copy(src, src + len, dst);
          std::fill(dst + len, dst + stride, 0.0f);
        };
        if (t.b1.size() > 0) padded(w.b1_ptr(e), fn, b1s, t.b1.data() + e * b1s);
        if (t.b2e.size() > 0) padded(w.b2e_ptr(e), d, b2s, t.b2e.data() + e * b2s);
      }
    }
    tile_version_.store(w.version(), std::memory_order_release);
  }
  /// The tiles (valid after refresh_tiles).
  expert_tiles tiles() const noexcept {
    const tile_arrays& t = a_.tiles;
    expert_tiles v;
    v.w1 = t.w1.data();
    v.w2 = t.w2.data();
    v.b1 = t.b1.size() > 0 ? t.b1.data() : nullptr;
    v.b2e = t.b2e.size() > 0 ? t.b2e.data() : nullptr;
    v.w1_stride = tile_w1_stride();
    v.w2_stride = tile_w2_stride();
    v.b1_stride = round_up(shape_.first_width(), amx_rows);
    v.b2_stride = round_up(shape_.d_model, amx_rows);
    return v;
  }

  /// Rebuilds the forward panels if `w` changed since they were packed, or the panel width did
  /// (another instruction set or AVX-512 tile); with `transposes` (backward, 16-bit formats) the
  /// transposed panels too. Safe to call from concurrent forwards (one packs, the others wait);
  /// the weights must not be written meanwhile (as for any read of them). Allocates nothing.
  void refresh(const expert_weights<T>& w, cpu_isa isa, bool transposes = false) const noexcept {
    const bool need_t = transposes && a_.storage != weight_storage::f32;
    if (is_current(w, isa) && (!need_t || current(t_version_, t_key_, w, isa))) return;
    std::lock_guard<std::mutex> lock(mutex_);
    const tile_shape tile = tile_for<T>(isa);
    if (!is_current(w, isa)) {
      pack_forward(w, isa, tile);
      key_.store(key_of(tile), std::memory_order_relaxed);
      version_.store(w.version(), std::memory_order_release);
    }
    if (need_t && !current(t_version_, t_key_, w, isa)) {
      pack_transposes(w, isa, tile);
      t_key_.store(key_of(tile), std::memory_order_relaxed);
      t_version_.store(w.version(), std::memory_order_release);
    }
  }
  bool is_current(const expert_weights<T>& w, cpu_isa isa) const noexcept { return current(version_, key_, w, isa); }

  /// What the kernels read in format BS (the current storage's; valid after refresh with the same
  /// instruction set, and with transposes for backward).
  template <class BS>
  expert_panels<T, BS> panels(const expert_weights<T>& w) const noexcept {
    expert_panels<T, BS> p;
    p.w = &w;
    p.w1_stride = a_.w1_stride;
    p.w2_stride = a_.w2_stride;
    p.w2t_stride = a_.w2t_stride;
    p.w1t_stride = a_.w1t_stride;
    if constexpr (std::is_same_v<BS, T>) {
      p.w1p = a_.w1.data();
      p.w2p = a_.w2.data();
    } else {
      const half_arrays<BS>& h = halves<BS>();
      p.w1p = h.w1.data();
      p.w2p = h.w2.data();
      p.w2tp = h.w2t.data();
      p.w1tp = h.w1t.data();
    }
    return p;
  }

 private:
  index_t tile_w1_stride() const noexcept { return amx_packed_elems(shape_.d_model, shape_.first_width()); }
  index_t tile_w2_stride() const noexcept { return amx_packed_elems(shape_.width, shape_.d_model); }
  template <class H>
  const half_arrays<H>& halves() const noexcept {
    if constexpr (std::is_same_v<H, bf16_t>)
      return a_.bf;
    else
      return a_.hf;
  }
  // The panel layout: width and, for bf16's pair interleave, lanes; and the format.
  index_t key_of(tile_shape t) const noexcept { return (t.nr() * 64 + t.lanes) * 4 + index_t(a_.storage); }
  bool current(const std::atomic<std::uint64_t>& version, const std::atomic<index_t>& key, const expert_weights<T>& w,
               cpu_isa isa) const noexcept {
    return version.load(std::memory_order_acquire) == w.version() &&
           key.load(std::memory_order_relaxed) == key_of(tile_for<T>(isa));
  }
  void copy_stamps(const packed_experts& o) noexcept {
    version_.store(o.version_.load(std::memory_order_acquire), std::memory_order_relaxed);
    key_.store(o.key_.load(std::memory_order_acquire), std::memory_order_relaxed);
    t_version_.store(o.t_version_.load(std::memory_order_acquire), std::memory_order_relaxed);
    t_key_.store(o.t_key_.load(std::memory_order_acquire), std::memory_order_relaxed);
    tile_version_.store(o.tile_version_.load(std::memory_order_acquire), std::memory_order_relaxed);
  }
  void forget() noexcept {
    version_.store(0);
    t_version_.store(0);
    tile_version_.store(0);
  }
  void allocate(weight_storage s) {
    const index_t E = shape_.num_experts;
    const char* what = "packed expert weights";
    auto count = [&](index_t stride) { return detail::checked_product_or_throw(what, stride, E); };
    arrays n;
    n.storage = s;
    n.w1_stride = a_.w1_stride;
    n.w2_stride = a_.w2_stride;
    n.w2t_stride = a_.w2t_stride;
    n.w1t_stride = a_.w1t_stride;
    n.tiles = std::move(a_.tiles);  // another storage format leaves infer's tiles as they are
    auto halves_of = [&](auto& h) {
      using H = std::remove_reference_t<decltype(*h.w1.data())>;
      h.w1 = aligned_array<H>(what, count(n.w1_stride));
      h.w2 = aligned_array<H>(what, count(n.w2_stride));
      h.w2t = aligned_array<H>(what, count(n.w2t_stride));
      h.w1t = aligned_array<H>(what, count(n.w1t_stride));
    };
    if (s == weight_storage::f32) {
      n.w1 = aligned_array<T>(what, count(n.w1_stride));
      n.w2 = aligned_array<T>(what, count(n.w2_stride));
    } else if (s == weight_storage::bf16) {
      halves_of(n.bf);
    } else {
      halves_of(n.hf);
    }
    a_ = std::move(n);
    forget();
  }
  void pack_forward(const expert_weights<T>& w, cpu_isa isa, tile_shape t) const noexcept {
    const index_t d = shape_.d_model, fn = shape_.first_width(), n = shape_.width, nr = t.nr();
    for (index_t e = 0; e < shape_.num_experts; ++e) {
      // w1_e is column-major d x fn: element (k, j) at w1[j d + k]; w2_e column-major n x d.
      if (a_.storage == weight_storage::f32) {
        pack_panels<T>(isa, d, fn, w.w1_ptr(e), 1, d, nr, a_.w1.data() + e * a_.w1_stride);
        pack_panels<T>(isa, n, d, w.w2_ptr(e), 1, n, nr, a_.w2.data() + e * a_.w2_stride);
      } else if constexpr (std::is_same_v<T, float>) {
        with_halves([&](auto& h) {
          pack_panels_16(isa, d, fn, w.w1_ptr(e), 1, d, nr, t.lanes, h.w1.data() + e * a_.w1_stride);
          pack_panels_16(isa, n, d, w.w2_ptr(e), 1, n, nr, t.lanes, h.w2.data() + e * a_.w2_stride);
        });
      }
    }
  }
  void pack_transposes(const expert_weights<T>& w, cpu_isa isa, tile_shape t) const noexcept {
    if constexpr (std::is_same_v<T, float>) {
      const index_t d = shape_.d_model, fn = shape_.first_width(), n = shape_.width, nr = t.nr();
      for (index_t e = 0; e < shape_.num_experts; ++e)
        with_halves([&](auto& h) {
          // W2_e^T (d x n) is w2_e read row-major (row stride n); W1_e^T (fn x d) is w1_e (stride d).
          pack_panels_16(isa, d, n, w.w2_ptr(e), n, 1, nr, t.lanes, h.w2t.data() + e * a_.w2t_stride);
          pack_panels_16(isa, fn, d, w.w1_ptr(e), d, 1, nr, t.lanes, h.w1t.data() + e * a_.w1t_stride);
        });
    }
  }
  template <class F>
  void with_halves(F&& f) const noexcept {
    if (a_.storage == weight_storage::bf16)
      f(a_.bf);
    else
      f(a_.hf);
  }

  expert_shape shape_{};
  mutable arrays a_;  // a cache of the weights: rebuilt inside const forwards
  mutable std::atomic<std::uint64_t> version_{0};    // 0: never packed (stamps start at 1)
  mutable std::atomic<index_t> key_{-1};             // layout packed (key_of)
  mutable std::atomic<std::uint64_t> t_version_{0};  // the same for the 16-bit transposes
  mutable std::atomic<index_t> t_key_{-1};
  mutable std::atomic<std::uint64_t> tile_version_{0};  // the same for infer's bf16 tiles
  mutable std::mutex mutex_;  // each copy has its own
};

}  DMOE_NAMESPACE_END  // namespace dmoe::detail::cpu_backend
