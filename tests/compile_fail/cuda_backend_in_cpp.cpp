// SPDX-License-Identifier: MIT
// The CUDA backend named from a plain C++ translation unit stops with a message saying what to do.
// DMOE_EXPECT: Backend must be dmoe::cpu \(include <dmoe/dmoe.hpp>\) or dmoe::cuda \(include <dmoe/cuda.cuh>
#include <dmoe/dmoe.hpp>

using layer = dmoe::moe_layer<float, dmoe::cuda, dmoe::top_k, dmoe::relu>;
int dmoe_compile_fail_probe() { return sizeof(layer) > 0 ? 0 : 1; }
