// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// A second translation unit that includes the CUDA umbrella and instantiates a layer's forward,
// linked into the same executable as test_cuda_forward.cu: a kernel or function defined in a
// header without template or inline linkage would be defined twice and break the link.
#include <doctest/doctest.h>

#include <dmoe/cuda.cuh>

TEST_SUITE("cuda") {
  TEST_CASE("the CUDA headers link from two translation units (no device needed)") {
    using layer = dmoe::moe_layer<__half, dmoe::cuda, dmoe::top_k, dmoe::relu>;
    auto forward = &layer::forward;  // instantiates forward and every kernel it launches
    CHECK(forward != nullptr);
    CHECK(dmoe::is_cuda_storage_v<__nv_bfloat16>);
    CHECK_FALSE(dmoe::is_cuda_storage_v<double>);
  }
}
