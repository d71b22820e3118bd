// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// Portability macros and the basic index type.

#include <cstddef>

#if defined(__CUDACC__) && !defined(DMOE_DISABLE_CUDA)
#define DMOE_HAS_CUDA 1
#define DMOE_HOST_DEVICE __host__ __device__
#else
#define DMOE_HAS_CUDA 0
#define DMOE_HOST_DEVICE
#endif

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
#define DMOE_HAS_EXCEPTIONS 1
#else
#define DMOE_HAS_EXCEPTIONS 0
#endif

DMOE_NAMESPACE_BEGIN
/// Signed index type used for every extent and offset (matches Eigen::Index).
using index_t = std::ptrdiff_t;
DMOE_NAMESPACE_END  // namespace dmoe
