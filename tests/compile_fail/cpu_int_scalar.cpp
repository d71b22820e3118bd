// SPDX-License-Identifier: MIT
// The CPU backend computes in float or double only.
// DMOE_EXPECT: the CPU backend computes in float or double
#include <dmoe/dmoe.hpp>

using layer = dmoe::moe_layer<int, dmoe::cpu, dmoe::top_k, dmoe::relu>;
int dmoe_compile_fail_probe() { return sizeof(layer) > 0 ? 0 : 1; }
