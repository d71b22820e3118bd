// The training snippet of docs/training.md, compiled and run; tests/CMakeLists.txt checks that the
// block between the markers is the one in the doc.
#include <doctest/doctest.h>

// training-snippet-begin
#include <dmoe/dmoe.hpp>

// One training step of a top-k layer on a batch (x, target) with L = mean squared error.
float train_step(dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::swiglu>& layer,
                 decltype(layer.make_gradients())& grads, dmoe::adamw<float>& opt, dmoe::workspace ws,
                 const dmoe::row_matrix<float>& x, const dmoe::row_matrix<float>& target) {
  const dmoe::context<dmoe::cpu> ctx{};  // or {&pool}: results are identical
  dmoe::row_matrix<float> y(x.rows(), x.cols()), dy(x.rows(), x.cols()), dx(x.rows(), x.cols());
  dmoe::throw_if_error(layer.forward(ctx, x, y, ws));
  const float loss = (y - target).squaredNorm() / float(y.size());
  dy = (2.0f / float(y.size())) * (y - target);  // dL/dy
  dmoe::aux_losses aux;                           // weights of the auxiliary losses
  aux.load_balance = 0.01;
  dmoe::throw_if_error(layer.backward(ctx, x, dy, dx, grads, ws, &aux));  // reads the forward's ws
  dmoe::throw_if_error(opt.step(grads.parameters()));
  return loss;
}
// training-snippet-end

TEST_CASE("docs/training.md snippet trains") {
  dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::swiglu> layer({8, 4, 6}, {2, true});
  layer.randomize(1);
  auto grads = layer.make_gradients();
  dmoe::adamw<float> opt(layer.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.0});
  dmoe::workspace_buffer ws(layer.workspace_size({32, 1}));
  dmoe::row_matrix<float> x = dmoe::row_matrix<float>::Random(32, 8);
  dmoe::row_matrix<float> target = x.array().sin().matrix();
  const float first = train_step(layer, grads, opt, ws, x, target);
  float last = first;
  for (int i = 0; i < 200; ++i) last = train_step(layer, grads, opt, ws, x, target);
  CHECK(last < 0.5f * first);
}
