// SPDX-License-Identifier: MIT
// A read-only Eigen object (Map<const ...>) as the output y: refused with a message, not a
// conversion error (and never written through a cast-away const).
// DMOE_EXPECT: \(an output\) needs writable storage
#include <dmoe/dmoe.hpp>

int dmoe_compile_fail_probe() {
  dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu> layer({8, 4, 6}, {2, true});
  dmoe::row_matrix<float> x = dmoe::row_matrix<float>::Zero(16, 8), y(16, 8);
  const Eigen::Map<const dmoe::row_matrix<float>> y_read_only(y.data(), 16, 8);
  dmoe::workspace_buffer ws(layer.workspace_size({16, 1}));
  return layer.forward(dmoe::context<dmoe::cpu>{}, x, y_read_only, ws).ok() ? 0 : 1;
}
