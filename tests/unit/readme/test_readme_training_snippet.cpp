// The README's training snippet (forward, backward, optimizer step), compiled and run.
// tests/CMakeLists.txt checks that the block between the markers is the one in README.md.
#include <doctest/doctest.h>

// readme-training-begin
#include <dmoe/dmoe.hpp>

// Fits a top-k layer to (x, target) with AdamW; returns the loss of the last step.
float train(const dmoe::row_matrix<float>& x, const dmoe::row_matrix<float>& target, int steps) {
  dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::swiglu> layer({x.cols(), 8, 32}, {2, true});
  layer.randomize(1);
  dmoe::adamw<float> opt(layer.parameters(), {1e-2});  // lr; parameters(dmoe::param_group::router): router only
  auto grads = layer.make_gradients();                 // shaped like the parameters
  const dmoe::context<dmoe::cpu> ctx{};
  dmoe::workspace_buffer ws(layer.workspace_size(ctx, x.rows()));
  dmoe::row_matrix<float> y(x.rows(), x.cols()), dy(x.rows(), x.cols()), dx(x.rows(), x.cols());
  float loss = 0;
  for (int s = 0; s < steps; ++s) {
    dmoe::throw_if_error(layer.forward(ctx, x, y, ws));
    loss = (y - target).squaredNorm() / float(y.size());
    dy = (2.0f / float(y.size())) * (y - target);                     // dL/dy
    dmoe::throw_if_error(layer.backward(ctx, x, dy, dx, grads, ws));  // reads the forward's state in ws
    dmoe::throw_if_error(opt.step(grads.parameters()));
  }
  return loss;
}
// readme-training-end

TEST_CASE("README training snippet trains") {
  const dmoe::row_matrix<float> x = dmoe::row_matrix<float>::Random(64, 12);
  const dmoe::row_matrix<float> target = x.array().sin().matrix();
  const float first = train(x, target, 1);  // the loss before any step
  const float last = train(x, target, 150);
  CHECK(std::isfinite(first));
  CHECK(last < 0.5f * first);
}
