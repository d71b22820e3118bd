// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The communicator over NCCL, for GPU ranks (one GPU per rank): the same all-to-all-v as the
/// MPI communicator, as one group of ncclSend/ncclRecv pairs on a CUDA stream (NCCL has no
/// all-to-all-v of its own; a grouped send/receive per peer is how it is written). Buffers are
/// device memory. Compile with nvcc and link libnccl; the program creates the ncclComm_t (e.g.
/// ncclGetUniqueId on rank 0, broadcast by MPI or a file, then ncclCommInitRank) and owns it.
///
/// alltoallv enqueues the exchange on the stream and waits for it (cudaStreamSynchronize), so a
/// caller may read the result on the host after it returns, as with MPI; the expert-parallel
/// CUDA layer (not written yet, docs/distributed.md) would instead keep it asynchronous and
/// overlap it with expert compute. abort() is ncclCommAbort, then std::abort.

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>

#include "communicator.hpp"

DMOE_NAMESPACE_BEGIN

class nccl_communicator final : public communicator {
 public:
  /// Uses `comm` (initialised by the caller, who keeps ownership) on `stream`.
  nccl_communicator(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
    if (ncclCommUserRank(comm_, &rank_) != ncclSuccess || ncclCommCount(comm_, &size_) != ncclSuccess)
      detail::raisef(errc::invalid_argument, "nccl_communicator: the ncclComm_t is not initialised");
  }
  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }
  ncclComm_t native() const noexcept { return comm_; }
  cudaStream_t stream() const noexcept { return stream_; }

  status alltoallv(const void* send, const std::size_t* send_bytes, const std::size_t* send_offsets, void* recv,
                   const std::size_t* recv_bytes, const std::size_t* recv_offsets) noexcept override {
    const auto* s = static_cast<const char*>(send);
    auto* r = static_cast<char*>(recv);
    ncclResult_t rc = ncclGroupStart();
    // Zero-byte pairs are skipped: with variable k a rank often has nothing for a peer.
    for (int p = 0; p < size_ && rc == ncclSuccess; ++p) {
      if (send_bytes[p] > 0) rc = ncclSend(s + send_offsets[p], send_bytes[p], ncclUint8, p, comm_, stream_);
      if (rc == ncclSuccess && recv_bytes[p] > 0)
        rc = ncclRecv(r + recv_offsets[p], recv_bytes[p], ncclUint8, p, comm_, stream_);
    }
    const ncclResult_t end = ncclGroupEnd();  // always close the group, even after an error
    if (rc == ncclSuccess) rc = end;
    if (rc != ncclSuccess)
      return status::failure(errc::cuda_error, "nccl_communicator::alltoallv on rank %d of %d failed: %s", rank_,
                             size_, ncclGetErrorString(rc));
    const cudaError_t ce = cudaStreamSynchronize(stream_);
    if (ce != cudaSuccess)
      return status::failure(errc::cuda_error, "nccl_communicator::alltoallv on rank %d of %d: stream failed: %s",
                             rank_, size_, cudaGetErrorString(ce));
    return {};
  }

  [[noreturn]] void abort(const char* message) noexcept override {
    std::fprintf(stderr, "dmoe: rank %d of %d aborts the NCCL group: %s\n", rank_, size_, message);
    std::fflush(stderr);
    ncclCommAbort(comm_);
    std::abort();
  }

 private:
  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1;
};

DMOE_NAMESPACE_END  // namespace dmoe
