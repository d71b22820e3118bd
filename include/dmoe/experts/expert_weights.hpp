// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Expert weights, stored expert-major so that one expert is one contiguous block:
///  - w1: expert e is a column-major (d_model x f*n) matrix, i.e. neuron-major: neuron j's input
///    vector (column j of W1_e) is contiguous. f = 2 for gated activations: [gate n | up n].
///  - b1: (f*n) per expert.
///  - w2: expert e is a column-major (n x d_model) matrix: the n weights feeding output j are
///    contiguous. Both products then read their operands along contiguous rows (dot-product
///    form), so the hot path needs no packing of the weights.
///  - expert_bias (optional): b2_e, d_model per expert, added to y_e before the combine.
///  - output_bias (optional): the shared b2, added once per token after the combine
///    (converted layers have this one).
/// Use the accessors (Eigen maps of the logical matrices); the flat storage order is internal.
///
/// Every non-const accessor takes a new version stamp (version()): the CPU layer keeps packed
/// copies of w1 and w2 for its kernels and rebuilds them when the stamp moved. Writing through a
/// pointer or map kept from earlier (after a forward has run) needs mark_modified(); dmoe's
/// optimizers call it for you after each step.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "../core/checked.hpp"
#include "../core/status.hpp"
#include "../core/version_tag.hpp"
#include "../detail/random.hpp"

DMOE_NAMESPACE_BEGIN

/// Shape of the experts of one layer.
struct expert_shape {
  index_t d_model = 0;
  index_t num_experts = 0;
  index_t width = 0;            ///< n: hidden units per expert
  bool gated = false;           ///< first layer has 2n outputs (gate, up)
  bool hidden_bias = true;      ///< b1
  bool expert_bias = false;     ///< per-expert b2_e
  bool output_bias = true;      ///< shared b2

  index_t first_width() const noexcept { return gated ? 2 * width : width; }
  friend bool operator==(const expert_shape& a, const expert_shape& b) noexcept {
    return a.d_model == b.d_model && a.num_experts == b.num_experts && a.width == b.width && a.gated == b.gated &&
           a.hidden_bias == b.hidden_bias && a.expert_bias == b.expert_bias && a.output_bias == b.output_bias;
  }
  friend bool operator!=(const expert_shape& a, const expert_shape& b) noexcept { return !(a == b); }
};

/// Owning storage of all experts of one layer (host memory).
template <class T>
class expert_weights {
 public:
  using matrix_w1 = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;
  using matrix_w2 = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;
  using vector_map = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>;
  using cmatrix_w1 = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;
  using cmatrix_w2 = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;
  using cvector_map = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;

  explicit expert_weights(const expert_shape& s) : shape_(s) {
    if (s.d_model <= 0 || s.num_experts <= 0 || s.width <= 0)
      detail::raisef(errc::invalid_argument,
                     "expert_weights: d_model, num_experts and width must be positive, got %td, %td, %td",
                     s.d_model, s.num_experts, s.width);
    // Every size in checked arithmetic: an absurd shape is refused with its numbers instead of
    // wrapping to a small allocation that the accessors would then read past.
    const index_t E = s.num_experts, d = s.d_model, n = s.width;
    const index_t f = detail::checked_product_or_throw("expert_weights: first-layer width (gated: 2 x width)",
                                                       s.gated ? 2 : 1, n);
    const index_t w1 = detail::checked_product_or_throw("expert_weights: w1 (num_experts x d_model x first width)", E, d, f);
    const index_t w2 = detail::checked_product_or_throw("expert_weights: w2 (num_experts x width x d_model)", E, n, d);
    const index_t b1 = s.hidden_bias ? detail::checked_product_or_throw("expert_weights: b1 (num_experts x first width)", E, f) : 0;
    const index_t b2e = s.expert_bias ? detail::checked_product_or_throw("expert_weights: expert_bias (num_experts x d_model)", E, d) : 0;
    index_t total = 0;
    if (!detail::add_ok(w1, w2, total) || !detail::add_ok(total, b1, total) || !detail::add_ok(total, b2e, total) ||
        !detail::add_ok(total, d, total) || total > index_t((std::numeric_limits<std::size_t>::max)() / sizeof(T)))
      detail::raisef(errc::invalid_argument,
                     "expert_weights: %td experts of d_model %td and width %td hold more elements than fit in memory",
                     E, d, n);
    detail::allocate_or_throw("expert_weights", total, sizeof(T), [&] {
      w1_.assign(static_cast<std::size_t>(w1), T(0));
      b1_.assign(static_cast<std::size_t>(b1), T(0));
      w2_.assign(static_cast<std::size_t>(w2), T(0));
      b2e_.assign(static_cast<std::size_t>(b2e), T(0));
      b2_.assign(s.output_bias ? static_cast<std::size_t>(d) : 0, T(0));
    });
  }

  const expert_shape& shape() const noexcept { return shape_; }
  index_t d_model() const noexcept { return shape_.d_model; }
  index_t num_experts() const noexcept { return shape_.num_experts; }
  index_t width() const noexcept { return shape_.width; }

  matrix_w1 w1(index_t e) noexcept { version_.touch(); return matrix_w1(w1_ptr(e), shape_.d_model, shape_.first_width()); }
  cmatrix_w1 w1(index_t e) const noexcept { return cmatrix_w1(w1_ptr(e), shape_.d_model, shape_.first_width()); }
  matrix_w2 w2(index_t e) noexcept { version_.touch(); return matrix_w2(w2_ptr(e), shape_.width, shape_.d_model); }
  cmatrix_w2 w2(index_t e) const noexcept { return cmatrix_w2(w2_ptr(e), shape_.width, shape_.d_model); }
  /// b1 of expert e; empty without hidden bias.
  vector_map b1(index_t e) noexcept { return vector_map(b1_ptr(e), b1_ptr(e) ? shape_.first_width() : 0); }
  cvector_map b1(index_t e) const noexcept { return cvector_map(b1_ptr(e), b1_ptr(e) ? shape_.first_width() : 0); }
  /// b2_e; empty without per-expert output bias.
  vector_map expert_bias(index_t e) noexcept { return vector_map(b2e_ptr(e), b2e_ptr(e) ? shape_.d_model : 0); }
  cvector_map expert_bias(index_t e) const noexcept {
    return cvector_map(b2e_ptr(e), b2e_ptr(e) ? shape_.d_model : 0);
  }
  /// Shared b2; empty without output bias.
  vector_map output_bias() noexcept { return vector_map(b2_.empty() ? nullptr : b2_.data(), index_t(b2_.size())); }
  cvector_map output_bias() const noexcept {
    return cvector_map(b2_.empty() ? nullptr : b2_.data(), index_t(b2_.size()));
  }

  // Raw pointers (hot path).
  T* w1_ptr(index_t e) noexcept { version_.touch(); return w1_.data() + e * shape_.d_model * shape_.first_width(); }
  const T* w1_ptr(index_t e) const noexcept { return w1_.data() + e * shape_.d_model * shape_.first_width(); }
  T* w2_ptr(index_t e) noexcept { version_.touch(); return w2_.data() + e * shape_.width * shape_.d_model; }
  const T* w2_ptr(index_t e) const noexcept { return w2_.data() + e * shape_.width * shape_.d_model; }
  T* b1_ptr(index_t e) noexcept { return b1_.empty() ? nullptr : b1_.data() + e * shape_.first_width(); }
  const T* b1_ptr(index_t e) const noexcept { return b1_.empty() ? nullptr : b1_.data() + e * shape_.first_width(); }
  T* b2e_ptr(index_t e) noexcept { return b2e_.empty() ? nullptr : b2e_.data() + e * shape_.d_model; }
  const T* b2e_ptr(index_t e) const noexcept { return b2e_.empty() ? nullptr : b2e_.data() + e * shape_.d_model; }
  const T* output_bias_ptr() const noexcept { return b2_.empty() ? nullptr : b2_.data(); }

  /// All parameters of one kind, flat (for optimizers and IO).
  std::vector<T>& w1_storage() noexcept { version_.touch(); return w1_; }
  std::vector<T>& b1_storage() noexcept { return b1_; }
  std::vector<T>& w2_storage() noexcept { version_.touch(); return w2_; }
  std::vector<T>& expert_bias_storage() noexcept { return b2e_; }
  std::vector<T>& output_bias_storage() noexcept { return b2_; }
  const std::vector<T>& w1_storage() const noexcept { return w1_; }
  const std::vector<T>& b1_storage() const noexcept { return b1_; }
  const std::vector<T>& w2_storage() const noexcept { return w2_; }
  const std::vector<T>& expert_bias_storage() const noexcept { return b2e_; }
  const std::vector<T>& output_bias_storage() const noexcept { return b2_; }

  /// Stamp of the weights' contents (see the file comment).
  std::uint64_t version() const noexcept { return version_.value(); }
  /// Declares that w1/w2 were written through a pointer or map obtained earlier.
  void mark_modified() noexcept { version_.touch(); }
  /// The stamp itself, for optimizers (train/parameters.hpp).
  version_tag& version_stamp() noexcept { return version_; }

  /// Zeroes every parameter (gradient buffers start here).
  void set_zero() noexcept {
    version_.touch();
    for (auto* v : {&w1_, &b1_, &w2_, &b2e_, &b2_}) std::fill(v->begin(), v->end(), T(0));
  }

  /// PyTorch-style init: uniform(+-1/sqrt(fan_in)) for weights and biases, seeded.
  void randomize(std::uint64_t seed) {
    version_.touch();
    detail::rng g(seed);
    const double a1 = 1.0 / std::sqrt(double(shape_.d_model)), a2 = 1.0 / std::sqrt(double(shape_.width));
    for (auto& v : w1_) v = static_cast<T>(g.uniform(-a1, a1));
    for (auto& v : b1_) v = static_cast<T>(g.uniform(-a1, a1));
    for (auto& v : w2_) v = static_cast<T>(g.uniform(-a2, a2));
    for (auto& v : b2e_) v = static_cast<T>(g.uniform(-a2, a2));
    for (auto& v : b2_) v = static_cast<T>(g.uniform(-a2, a2));
  }

 private:
  expert_shape shape_;
  std::vector<T> w1_, b1_, w2_, b2e_, b2_;
  version_tag version_;
};

DMOE_NAMESPACE_END  // namespace dmoe
