// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// The communicator over MPI (link dmoe::mpi, which brings MPI::MPI_CXX). Only programs that use
/// MPI include this header; the rest of dmoe::parallel does not need it. The communicator does
/// not own the MPI_Comm and does not call MPI_Init or MPI_Finalize: the program does.
///
/// Errors: the communicator sets MPI_ERRORS_RETURN on its communicator, so a failed exchange
/// comes back as a dmoe::status with MPI's message instead of MPI's default abort; abort() is
/// MPI_Abort, which ends every rank of the job (mpirun prints the message's rank and code).

#include <mpi.h>

#include <climits>
#include <cstdio>
#include <vector>

#include "communicator.hpp"

DMOE_NAMESPACE_BEGIN

class mpi_communicator final : public communicator {
 public:
  /// Uses `comm` (MPI_COMM_WORLD by default); MPI must be initialised.
  explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int init = 0;
    MPI_Initialized(&init);
    if (!init) detail::raisef(errc::invalid_argument, "mpi_communicator: MPI is not initialised (call MPI_Init first)");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }
  MPI_Comm native() const noexcept { return comm_; }

  status alltoallv(const void* send, const std::size_t* send_bytes, const std::size_t* send_offsets, void* recv,
                   const std::size_t* recv_bytes, const std::size_t* recv_offsets) noexcept override {
    // MPI counts and displacements are int: refuse a message that does not fit instead of wrapping.
    const auto R = static_cast<std::size_t>(size_);
    sc_.resize(R);
    sd_.resize(R);
    rc_.resize(R);
    rd_.resize(R);
    for (std::size_t q = 0; q < R; ++q) {
      if (send_bytes[q] > std::size_t(INT_MAX) || send_offsets[q] > std::size_t(INT_MAX) ||
          recv_bytes[q] > std::size_t(INT_MAX) || recv_offsets[q] > std::size_t(INT_MAX))
        return status::failure(errc::invalid_argument,
                               "mpi_communicator::alltoallv: rank %d's exchange with rank %zu needs %zu / %zu bytes "
                               "at offsets %zu / %zu, more than MPI's int counts hold (split the batch)",
                               rank_, q, send_bytes[q], recv_bytes[q], send_offsets[q], recv_offsets[q]);
      sc_[q] = int(send_bytes[q]);
      sd_[q] = int(send_offsets[q]);
      rc_[q] = int(recv_bytes[q]);
      rd_[q] = int(recv_offsets[q]);
    }
    const int rc = MPI_Alltoallv(send, sc_.data(), sd_.data(), MPI_BYTE, recv, rc_.data(), rd_.data(), MPI_BYTE, comm_);
    if (rc != MPI_SUCCESS) {
      char text[MPI_MAX_ERROR_STRING];
      int len = 0;
      MPI_Error_string(rc, text, &len);
      return status::failure(errc::internal, "mpi_communicator::alltoallv on rank %d of %d failed: %s", rank_, size_,
                             text);
    }
    return {};
  }

  [[noreturn]] void abort(const char* message) noexcept override {
    std::fprintf(stderr, "dmoe: rank %d of %d aborts the job: %s\n", rank_, size_, message);
    std::fflush(stderr);
    MPI_Abort(comm_, 3);
    std::abort();  // MPI_Abort does not return; the compiler does not know it
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::vector<int> sc_, sd_, rc_, rd_;  // reused: no allocation per exchange after the first
};

DMOE_NAMESPACE_END  // namespace dmoe
