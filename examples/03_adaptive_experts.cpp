// Example 03: DynMoE's adaptive expert count. A top-any layer with 8 expert slots starts with a
// single active expert on data drawn from 5 clusters, each with its own target map. Tokens that
// fire no expert are recorded; every `interval` optimizer steps the adapter removes experts that
// received no token and seeds one new expert from the summed unrouted inputs. The program prints
// each update (experts added and removed, active count, mean k, loss) and the count it settles on.
// It exits non-zero if the layer did not grow beyond two experts or did not learn.
//
// Usage: 03_adaptive_experts [--quick]

#include <cmath>
#include <cstdio>
#include <cstring>
#include <dmoe/dmoe.hpp>

using namespace dmoe;
using rowsf = row_matrix<float>;

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  constexpr index_t d = 16, slots = 8, width = 8, clusters = 5, batch = 64;
  const int steps = quick ? 3000 : 6000;  // 3000 steps take well under a second
  const long interval = 25;

  // Data: x = 3 u_c + noise for a random unit direction u_c per cluster; y = x A_c.
  detail::rng g(42);
  std::vector<rowsf> maps;
  rowsf centers(clusters, d);
  for (index_t c = 0; c < clusters; ++c) {
    for (index_t j = 0; j < d; ++j) centers(c, j) = float(g.normal());
    centers.row(c).normalize();
    rowsf a(d, d);
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j < d; ++j) a(i, j) = float(g.normal() / std::sqrt(double(d)));
    maps.push_back(a);
  }
  auto sample = [&](rowsf& x, rowsf& y) {
    for (index_t t = 0; t < x.rows(); ++t) {
      const index_t c = index_t(g.below(clusters));
      for (index_t j = 0; j < d; ++j) x(t, j) = 3.0f * centers(c, j) + 0.3f * float(g.normal());
      y.row(t) = x.row(t) * maps[std::size_t(c)];
    }
  };

  moe_layer<float, cpu, top_any, relu> layer({d, slots, width}, {true});
  layer.randomize(7);
  layer.router().randomize(8, /*initial_active=*/1);
  expert_count_adapter<float> adapter(d, slots, interval);
  aux_losses aux;
  aux.diversity = aux.simplicity = 0.01;
  aux.efficiency = 0.02;  // pushes thresholds up, so tokens that no expert serves well go unrouted
  auto grads = layer.make_gradients();
  adamw<float> opt(layer.parameters(), {3e-3, 0.9, 0.999, 1e-8, 0.0});
  workspace_buffer ws(layer.workspace_size({batch, 1}));
  rowsf x(batch, d), target(batch, d), y(batch, d), dy(batch, d), dx(batch, d);
  routing_stats stats(slots);

  std::printf("dmoe example 03: top-any layer, %td slots, starts with 1 active expert; data from %td clusters\n", slots,
              clusters);
  std::printf("%6s  %-22s %7s %7s %9s\n", "step", "change", "active", "mean k", "loss");
  double loss = 0, first_loss = -1;
  for (int step = 1; step <= steps; ++step) {
    sample(x, target);
    throw_if_error(layer.forward(context<cpu>{}, x, y, ws, &stats));
    loss = double((y - target).squaredNorm()) / double(y.size());
    if (first_loss < 0) first_loss = loss;
    dy = (2.0f / float(y.size())) * (y - target);
    throw_if_error(layer.backward(context<cpu>{}, x, dy, dx, grads, ws, &aux));
    throw_if_error(adapter.record(layer.router(), x, layer.scores(ws, batch)));
    throw_if_error(opt.step(grads.parameters()));
    const adapt_report rep = adapter.on_optimizer_step(layer.router());
    if (rep.updated && (!rep.removed.empty() || rep.added >= 0)) {
      char change[64] = "";
      int n = 0;
      if (rep.added >= 0) n += std::snprintf(change + n, sizeof change - std::size_t(n), "+%td ", rep.added);
      for (index_t e : rep.removed) n += std::snprintf(change + n, sizeof change - std::size_t(n), "-%td ", e);
      std::printf("%6d  %-22s %7td %7.2f %9.4f\n", step, change, rep.active_after, stats.mean_k(), loss);
    }
  }
  const index_t settled = layer.router().num_active();
  std::printf("settled on %td active experts (of %td slots); mean k %.2f; loss %.4f (first batch %.4f)\n", settled, slots,
              stats.mean_k(), loss, first_loss);
  return settled > 2 && loss < 0.5 * first_loss ? 0 : 1;
}
