// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// A stamp that changes whenever the data it guards may have changed. Weights keep one so that
/// the copies the CPU kernels read (packed panels) know when to be rebuilt: every non-const
/// access to the weights and every optimizer step takes a new stamp. Stamps come from one
/// process-wide counter, so two objects never share a stamp unless one is a copy of the other
/// (and then their data is the same).

#include <atomic>
#include <cstdint>

DMOE_NAMESPACE_BEGIN

class version_tag {
 public:
  version_tag() noexcept : value_(next()) {}
  version_tag(const version_tag& o) noexcept : value_(o.value()) {}
  version_tag& operator=(const version_tag& o) noexcept {
    value_.store(o.value(), std::memory_order_release);
    return *this;
  }
  /// The data may have changed: take a new stamp.
  void touch() noexcept { value_.store(next(), std::memory_order_release); }
  std::uint64_t value() const noexcept { return value_.load(std::memory_order_acquire); }

 private:
  static std::uint64_t next() noexcept {
    static std::atomic<std::uint64_t> counter{1};
    return counter.fetch_add(1, std::memory_order_relaxed);
  }
  std::atomic<std::uint64_t> value_;
};

DMOE_NAMESPACE_END  // namespace dmoe
