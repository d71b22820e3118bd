// Example 02: an MoE layer learns a synthetic regression task from scratch, once per routing
// policy, with the library's backward and AdamW.
//
// The task: reproduce a random "teacher" FFN (d -> 64 -> d, ReLU) from its inputs. The student
// is one MoE layer with 8 experts of width 8 (same total hidden width as the teacher).
//  - top_k (k = 2, softmax gate, load-balance loss): experts and router train together.
//  - top_any (DynMoE gate, training mode, the paper's diversity + simplicity losses): experts,
//    gate embeddings and thresholds train together; evaluation runs in inference mode. (With the
//    balance term at 0.01 as well, this small task pushes every threshold up until nothing fires:
//    its gradient on the fire indicators is positive for every fired expert.)
//  - dynamic_k (D2DMoE): experts train with tau = 0 (every expert runs: the layer is dense);
//    then the router is fitted by regression on the experts' output norms with the experts
//    frozen (router-only AdamW), and the layer is evaluated at tau = 0.4.
// The program prints the relative error (MSE / variance of the target) before and after, and
// exits non-zero if training did not bring it below the stated bound: a gradient with the
// wrong sign or scale makes it fail.
//
// Usage: 02_train_synthetic [--quick]

#include <cstdio>
#include <cstring>
#include <dmoe/dmoe.hpp>

using namespace dmoe;
using rowsf = row_matrix<float>;

namespace {
constexpr index_t d = 16, experts = 8, width = 8;

struct dataset {
  rowsf x, y;
  double variance = 0;
};

dataset make_data(index_t n, std::uint64_t seed) {
  dense_ffn<float, relu> teacher(d, experts * width);
  teacher.randomize(1234);
  teacher.w2() *= 3.0f;  // a target of order 1
  dataset ds{rowsf(n, d), rowsf(n, d)};
  detail::rng g(seed);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) ds.x(i, j) = static_cast<float>(g.normal());
  workspace_buffer ws(teacher.workspace_size({n, 1}));
  throw_if_error(teacher.forward(context<cpu>{}, ds.x, ds.y, ws));
  const double mean = ds.y.mean();
  ds.variance = (ds.y.array() - float(mean)).square().mean();
  return ds;
}

template <class Layer>
double relative_error(const Layer& layer, const dataset& ds) {
  rowsf y(ds.x.rows(), d);
  workspace_buffer ws(layer.workspace_size({ds.x.rows(), 1}));
  throw_if_error(layer.forward(context<cpu>{}, ds.x, y, ws));
  return double((y - ds.y).squaredNorm()) / double(y.size()) / ds.variance;
}

/// Minibatch AdamW on L = mean squared error (+ aux losses).
template <class Layer>
void train(Layer& layer, const dataset& ds, int steps, param_group group, const aux_losses* aux, float lr) {
  const index_t batch = 64;
  auto grads = layer.make_gradients();
  adamw<float> opt(layer.parameters(group), {lr, 0.9, 0.999, 1e-8, 0.0});
  workspace_buffer ws(layer.workspace_size({batch, 1}));
  rowsf y(batch, d), dy(batch, d), dx(batch, d);
  for (int step = 0; step < steps; ++step) {
    const index_t start = (step * batch) % (ds.x.rows() - batch + 1);
    const auto xb = ds.x.middleRows(start, batch);
    const auto yb = ds.y.middleRows(start, batch);
    matrix_view<const float> xv(xb.data(), batch, d, ds.x.outerStride());
    throw_if_error(layer.forward(context<cpu>{}, xv, y, ws));
    dy = (2.0f / float(batch * d)) * (y - yb);
    throw_if_error(layer.backward(context<cpu>{}, xv, dy, dx, grads, ws, aux));
    throw_if_error(opt.step(grads.parameters(group)));
  }
}

bool report(const char* policy, double before, double after, double bound, const char* extra) {
  const bool ok = after < bound;
  std::printf("%-10s relative error %.3f -> %.3f  (bound %.2f) %s %s\n", policy, before, after, bound, extra,
              ok ? "ok" : "FAILED");
  return ok;
}
}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int steps = quick ? 1500 : 6000;
  const dataset train_set = make_data(4096, 1), test_set = make_data(1024, 2);
  std::printf("dmoe example 02: learning a random teacher FFN (d=%td) with %td experts x %td, %d AdamW steps\n", d,
              experts, width, steps);
  bool ok = true;
  moe_config cfg{d, experts, width};

  {  // top-k
    moe_layer<float, cpu, top_k, relu> layer(cfg, {2, true});
    layer.randomize(7);
    aux_losses aux;
    aux.load_balance = 0.01;
    const double before = relative_error(layer, test_set);
    train(layer, train_set, steps, param_group::all, &aux, 3e-3f);
    ok &= report("top_k", before, relative_error(layer, test_set), 0.35, "(k = 2)");
  }
  {  // top-any
    moe_layer<float, cpu, top_any, relu> layer(cfg, {true});
    layer.randomize(7);
    aux_losses aux;
    aux.diversity = aux.simplicity = 0.01;
    const double before = relative_error(layer, test_set);
    train(layer, train_set, steps, param_group::all, &aux, 3e-3f);
    layer.router().set_training(false);
    workspace_buffer ws(layer.workspace_size({test_set.x.rows(), 1}));
    routing_stats st(experts);
    rowsf y(test_set.x.rows(), d);
    throw_if_error(layer.forward(context<cpu>{}, test_set.x, y, ws, &st));
    char extra[64];
    std::snprintf(extra, sizeof extra, "(mean k %.2f)", st.mean_k());
    ok &= report("top_any", before, relative_error(layer, test_set), 0.35, extra);
  }
  {  // dynamic-k: dense training, router regression, sparse evaluation
    moe_layer<float, cpu, dynamic_k, relu> layer(cfg, {0.0, 0});
    layer.randomize(7);
    const double before = relative_error(layer, test_set);
    train(layer, train_set, steps, param_group::experts, nullptr, 3e-3f);
    const double dense_err = relative_error(layer, test_set);
    const rowsf targets = expert_output_norms<relu, float>(layer.experts(), train_set.x);
    adamw<float> opt(layer.parameters(param_group::router), {1e-3, 0.9, 0.999, 1e-8, 0.0});
    auto grads = layer.make_gradients();
    const float fit_before = router_regression_loss<float>(layer.router(), train_set.x, targets);
    for (int epoch = 0; epoch < (quick ? 150 : 400); ++epoch) {
      router_regression_loss<float>(layer.router(), train_set.x, targets, &grads.router);
      throw_if_error(opt.step(grads.parameters(param_group::router)));
    }
    const float fit_after = router_regression_loss<float>(layer.router(), train_set.x, targets);
    layer.router().set_tau(0.4);
    workspace_buffer ws(layer.workspace_size({test_set.x.rows(), 1}));
    routing_stats st(experts);
    rowsf y(test_set.x.rows(), d);
    throw_if_error(layer.forward(context<cpu>{}, test_set.x, y, ws, &st));
    char extra[128];
    std::snprintf(extra, sizeof extra, "(dense %.3f; router MSE %.3f -> %.3f; tau 0.4: mean k %.2f of %td)", dense_err,
                  double(fit_before), double(fit_after), st.mean_k(), experts);
    ok &= report("dynamic_k", before, relative_error(layer, test_set), 0.35, extra);
    ok &= fit_after < 0.5f * fit_before;
  }
  return ok ? 0 : 1;
}
