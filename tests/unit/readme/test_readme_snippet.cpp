// The README's usage snippet, compiled and run. tests/CMakeLists.txt checks that the block between
// the markers is the one in README.md, character for character.
#include <doctest/doctest.h>

// readme-snippet-begin
#include <dmoe/dmoe.hpp>

int readme_example() {
  dmoe::moe_config cfg{768, 24, 128};  // d_model, experts, expert width
  dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::gelu_erf> layer(cfg, {0.5});  // tau = 0.5
  layer.randomize(42);
  dmoe::thread_pool pool(2);
  dmoe::context<dmoe::cpu> ctx{&pool};
  dmoe::row_matrix<float> x = dmoe::row_matrix<float>::Random(512, 768), y(512, 768);
  dmoe::workspace_buffer ws(layer.workspace_size(ctx, 512));  // sized once, reused: no allocation
  dmoe::routing_stats stats(layer.num_experts());
  dmoe::status s = layer.infer(ctx, x, y, ws, &stats);  // forward() if backward follows
  if (!s.ok()) return 1;  // s.message() names the argument and the shapes
  return stats.mean_k() >= 1.0 ? 0 : 1;  // k varies per token; every token runs its best expert
}
// readme-snippet-end

TEST_CASE("README usage snippet runs") { CHECK(readme_example() == 0); }
