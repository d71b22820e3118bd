// SPDX-License-Identifier: MIT
// Control for the compile-fail tests: the same skeleton with valid arguments compiles.
#include <dmoe/dmoe.hpp>

using layer = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu>;
int dmoe_compile_fail_probe() { return sizeof(layer) > 0 ? 0 : 1; }
