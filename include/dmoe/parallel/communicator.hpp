// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The one communication primitive expert parallelism needs: an all-to-all-v of bytes among the
/// ranks of a group, plus the rank, the group size and an abort. MPI (parallel/mpi.hpp) and NCCL
/// (parallel/nccl.cuh) implement it; this header needs neither, so the expert-parallel layer
/// compiles without them and runs on one rank with self_communicator. Everything else the layer
/// exchanges (counts, status flags, setup hashes, gathers) is built from alltoallv here, so a
/// new transport implements a single call.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../core/config.hpp"
#include "../core/status.hpp"

DMOE_NAMESPACE_BEGIN

/// A group of ranks that can exchange bytes. Every call is collective: all ranks of the group
/// must make it, in the same order (otherwise a transport may hang; MPI has no timeout of its
/// own, which is why dmoe's MPI tests run under CTest timeouts).
class communicator {
 public:
  virtual ~communicator() = default;
  virtual int rank() const noexcept = 0;
  virtual int size() const noexcept = 0;
  /// All-to-all-v: rank r sends send_bytes[p] bytes from send + send_offsets[p] to every rank p,
  /// and receives recv_bytes[q] bytes from rank q at recv + recv_offsets[q]. Arrays have size()
  /// entries. Counts must agree pairwise (what q sends to r is what r expects from q). Buffers
  /// are host memory for MPI, device memory for NCCL.
  virtual status alltoallv(const void* send, const std::size_t* send_bytes, const std::size_t* send_offsets,
                           void* recv, const std::size_t* recv_bytes, const std::size_t* recv_offsets) noexcept = 0;
  /// Ends every rank of the group with a message (a rank that cannot continue: the others would
  /// wait for it forever in the next exchange). Does not return.
  [[noreturn]] virtual void abort(const char* message) noexcept = 0;
};

/// A group of one rank (no transport): alltoallv copies the bytes to itself. Lets the
/// expert-parallel layer run, and be tested, without MPI.
class self_communicator final : public communicator {
 public:
  int rank() const noexcept override { return 0; }
  int size() const noexcept override { return 1; }
  status alltoallv(const void* send, const std::size_t* send_bytes, const std::size_t* send_offsets, void* recv,
                   const std::size_t* recv_bytes, const std::size_t* recv_offsets) noexcept override {
    if (send_bytes[0] != recv_bytes[0])
      return status::failure(errc::invalid_argument,
                             "self_communicator::alltoallv: sends %zu bytes to itself but expects %zu", send_bytes[0],
                             recv_bytes[0]);
    if (send_bytes[0] > 0)
      std::memmove(static_cast<char*>(recv) + recv_offsets[0], static_cast<const char*>(send) + send_offsets[0],
                   send_bytes[0]);
    return {};
  }
  [[noreturn]] void abort(const char* message) noexcept override {
    std::fprintf(stderr, "dmoe: abort: %s\n", message);
    std::abort();
  }
};

namespace detail::parallel {

/// Every rank sends the same `bytes` bytes to all; recv gets size() * bytes, rank q's at q * bytes.
inline status allgather(communicator& c, const void* send, std::size_t bytes, void* recv) {
  const auto R = static_cast<std::size_t>(c.size());
  std::vector<std::size_t> sb(R, bytes), so(R, 0), rb(R, bytes), ro(R);
  for (std::size_t q = 0; q < R; ++q) ro[q] = q * bytes;
  return c.alltoallv(send, sb.data(), so.data(), recv, rb.data(), ro.data());
}

/// Typed allgather of `count` values per rank.
template <class V>
status allgather(communicator& c, const V* send, std::size_t count, V* recv) {
  return allgather(c, static_cast<const void*>(send), count * sizeof(V), static_cast<void*>(recv));
}

/// Every rank sends its `counts[rank]` values to all; recv holds them concatenated in rank order
/// (rank q's at the sum of counts[0..q)). `counts` must be the same on every rank.
template <class V>
status allgatherv(communicator& c, const V* send, const std::vector<std::size_t>& counts, V* recv) {
  const auto R = static_cast<std::size_t>(c.size());
  const std::size_t mine = counts[static_cast<std::size_t>(c.rank())] * sizeof(V);
  std::vector<std::size_t> sb(R, mine), so(R, 0), rb(R), ro(R);
  std::size_t at = 0;
  for (std::size_t q = 0; q < R; ++q) {
    rb[q] = counts[q] * sizeof(V);
    ro[q] = at;
    at += rb[q];
  }
  return c.alltoallv(send, sb.data(), so.data(), recv, rb.data(), ro.data());
}

/// Point-to-point through the collective: `from` sends `count` values to `to`, every other pair
/// sends nothing (all ranks call it).
template <class V>
status send_one(communicator& c, int from, int to, const V* send, V* recv, std::size_t count) {
  const auto R = static_cast<std::size_t>(c.size());
  std::vector<std::size_t> sb(R, 0), so(R, 0), rb(R, 0), ro(R, 0);
  if (c.rank() == from) sb[static_cast<std::size_t>(to)] = count * sizeof(V);
  if (c.rank() == to) rb[static_cast<std::size_t>(from)] = count * sizeof(V);
  return c.alltoallv(send, sb.data(), so.data(), recv, rb.data(), ro.data());
}

/// FNV-1a, for the setup hash exchange (configurations and weights must agree on every rank).
struct fnv1a {
  std::uint64_t h = 1469598103934665603ull;
  void bytes(const void* p, std::size_t n) noexcept {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ull;
    }
  }
  template <class V>
  void value(const V& v) noexcept {
    bytes(&v, sizeof v);
  }
};

}  // namespace detail::parallel

DMOE_NAMESPACE_END  // namespace dmoe
