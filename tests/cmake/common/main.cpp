// SPDX-License-Identifier: MIT
// The program every packaging consumer builds: a tiny top-k MoE layer, one forward on 3 tokens.
#include <dmoe/dmoe.hpp>

#include <cstdio>

int main() {
  dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu> layer(dmoe::moe_config{16, 4, 8},
                                                                   dmoe::top_k_options{2, true});
  layer.randomize(1);
  dmoe::row_matrix<float> x = dmoe::row_matrix<float>::Random(3, 16);
  dmoe::row_matrix<float> y(3, 16);
  dmoe::workspace_buffer ws(layer.workspace_size({3, 1}));
  dmoe::context<dmoe::cpu> ctx{};
  dmoe::status s = layer.forward(ctx, x, y, ws);
  if (!s.ok()) return 1;
  if (!y.allFinite()) return 2;
  std::printf("dmoe %d.%d.%d consumer ok: y(0,0) = %g\n", dmoe::version().major, dmoe::version().minor,
              dmoe::version().patch, double(y(0, 0)));
  return 0;
}
