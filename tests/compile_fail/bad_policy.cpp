// SPDX-License-Identifier: MIT
// A type that is not a routing policy.
// DMOE_EXPECT: Policy must be dmoe::top_k, dmoe::dynamic_k or dmoe::top_any
#include <dmoe/dmoe.hpp>

struct not_a_policy {};
using layer = dmoe::moe_layer<float, dmoe::cpu, not_a_policy, dmoe::relu>;
int dmoe_compile_fail_probe() { return sizeof(layer) > 0 ? 0 : 1; }
