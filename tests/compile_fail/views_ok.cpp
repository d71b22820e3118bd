// SPDX-License-Identifier: MIT
// Control for column_major_input and read_only_output: the same calls with a row-major input and
// a writable Map output compile.
#include <dmoe/dmoe.hpp>

int dmoe_compile_fail_probe() {
  dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu> layer({8, 4, 6}, {2, true});
  Eigen::MatrixXf x_cols = Eigen::MatrixXf::Zero(8, 16);  // column-major d x tokens
  dmoe::row_matrix<float> y(16, 8);
  Eigen::Map<dmoe::row_matrix<float>> y_map(y.data(), 16, 8);
  dmoe::workspace_buffer ws(layer.workspace_size({16, 1}));
  return layer.forward(dmoe::context<dmoe::cpu>{}, x_cols.transpose(), y_map, ws).ok() ? 0 : 1;
}
