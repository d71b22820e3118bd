// SPDX-License-Identifier: MIT
// A column-major Eigen matrix as the input batch: tokens must be contiguous rows, and the
// diagnostic says what to pass instead (row_matrix, a copy, or the transpose of d x tokens).
// DMOE_EXPECT: is column-major\. Store the batch as dmoe::row_matrix<T>
#include <dmoe/dmoe.hpp>

int dmoe_compile_fail_probe() {
  dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu> layer({8, 4, 6}, {2, true});
  Eigen::MatrixXf x = Eigen::MatrixXf::Zero(16, 8);  // column-major
  dmoe::row_matrix<float> y(16, 8);
  dmoe::workspace_buffer ws(layer.workspace_size({16, 1}));
  return layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok() ? 0 : 1;
}
