// SPDX-License-Identifier: MIT
// A type that is not an activation.
// DMOE_EXPECT: Activation must be dmoe::relu
#include <dmoe/dmoe.hpp>

struct not_an_activation {};
using layer = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, not_an_activation>;
int dmoe_compile_fail_probe() { return sizeof(layer) > 0 ? 0 : 1; }
