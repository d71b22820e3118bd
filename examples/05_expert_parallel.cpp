// Example 05: expert parallelism. A small MoE layer (top-k, k = 2, 6 experts) learns a synthetic
// regression task twice from the same initial weights and data:
//  - expert parallel: the experts split over the MPI ranks (run it with mpirun -np 2), one
//    thread per rank, each rank holding half of every batch; tokens travel to their experts'
//    ranks by all-to-all-v (dmoe::expert_parallel_layer);
//  - single process: rank 0 alone trains a dmoe::moe_layer on the whole batch with 2 threads.
// Both use SGD with momentum. The loss of each step is the sum over tokens in token order (each
// rank's per-token losses are gathered), so it is comparable bit for bit. Rank 0 prints both
// loss curves and exits non-zero unless they are identical to the last bit and the loss fell.
//
// Usage: mpirun -np 2 05_expert_parallel [--quick]     (any -np from 1 to 6 works)

#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include <dmoe/dmoe.hpp>
#include <dmoe/parallel/expert_parallel.hpp>
#include <dmoe/parallel/mpi.hpp>

using namespace dmoe;
using rowsf = row_matrix<float>;

namespace {
constexpr index_t d = 16, experts = 6, width = 16;
using layer_t = moe_layer<float, cpu, top_k, relu>;

/// 0.5 |y - target|^2 / N per token (the loss) and dy = (y - target) / N.
void loss_rows(const rowsf& y, const rowsf& target, index_t N, std::vector<double>& loss, rowsf& dy) {
  loss.resize(std::size_t(y.rows()));
  dy = (y - target) / float(N);
  for (index_t t = 0; t < y.rows(); ++t) {  // a plain loop: Eigen's reductions' order depends on alignment
    double sq = 0;
    for (index_t j = 0; j < y.cols(); ++j) sq += double(y(t, j) - target(t, j)) * double(y(t, j) - target(t, j));
    loss[static_cast<std::size_t>(t)] = 0.5 * sq / double(N);
  }
}
double sum_in_order(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s;
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  {
    const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    const int steps = quick ? 8 : 40;
    mpi_communicator comm;
    const int R = comm.size(), me = comm.rank();
    const index_t N = 256;  // tokens per batch, split over the ranks (uneven when R does not divide it)

    moe_config cfg;
    cfg.d_model = d;
    cfg.num_experts = experts;
    cfg.expert_width = width;
    layer_t single(cfg, top_k_options{2, true});
    single.randomize(7);
    expert_parallel_layer<float, top_k, relu> ep(comm, single);

    // Data: a fixed random teacher (a dense ReLU FFN) on random inputs, the same on every rank.
    dense_ffn<float, relu> teacher(d, 64);
    teacher.randomize(99);
    detail::rng g(5);
    rowsf X(N, d), T(N, d);
    for (index_t i = 0; i < N; ++i)
      for (index_t j = 0; j < d; ++j) X(i, j) = float(g.uniform(-1, 1));
    {
      workspace_buffer tw(teacher.workspace_size(context<cpu>{}, N));
      throw_if_error(teacher.forward(context<cpu>{}, X, T, tw));
    }
    std::vector<int> rows(static_cast<std::size_t>(R)), at(static_cast<std::size_t>(R));
    for (int r = 0; r < R; ++r) {
      at[static_cast<std::size_t>(r)] = int(N * r / R);
      rows[static_cast<std::size_t>(r)] = int(N * (r + 1) / R) - at[static_cast<std::size_t>(r)];
    }
    const index_t row0 = at[std::size_t(me)], mine = rows[std::size_t(me)];
    const rowsf x = X.middleRows(row0, mine), target = T.middleRows(row0, mine);

    const sgd_options opt{0.05, 0.9, 0.0};
    auto ep_grads = ep.make_gradients();
    sgd<float> ep_opt(ep.parameters(), opt);
    std::vector<double> ep_curve, sp_curve;
    rowsf y(mine, d), dy, dx(mine, d);
    std::vector<double> loss, all_loss(static_cast<std::size_t>(N));
    const context<cpu> one_thread{};
    for (int s = 0; s < steps; ++s) {
      throw_if_error(ep.forward(one_thread, x, y));
      loss_rows(y, target, N, loss, dy);
      MPI_Allgatherv(loss.data(), int(mine), MPI_DOUBLE, all_loss.data(), rows.data(), at.data(), MPI_DOUBLE,
                     MPI_COMM_WORLD);
      ep_curve.push_back(sum_in_order(all_loss));
      throw_if_error(ep.backward(one_thread, x, dy, dx, ep_grads));
      throw_if_error(ep_opt.step(ep_grads.parameters()));
    }

    if (me == 0) {  // the single-process run: whole batch, 2 threads
      thread_pool pool(2);
      const context<cpu> two_threads{&pool};
      auto grads = single.make_gradients();
      sgd<float> opt1(single.parameters(), opt);
      workspace_buffer ws(single.workspace_size(two_threads, N));
      rowsf Y(N, d), DY, DX(N, d);
      for (int s = 0; s < steps; ++s) {
        throw_if_error(single.forward(two_threads, X, Y, ws));
        loss_rows(Y, T, N, loss, DY);
        sp_curve.push_back(sum_in_order(loss));
        throw_if_error(single.backward(two_threads, X, DY, DX, grads, ws));
        throw_if_error(opt1.step(grads.parameters()));
      }
      int same = 0;
      std::printf("step  %d ranks x 1 thread     1 rank x 2 threads   bitwise\n", R);
      for (int s = 0; s < steps; ++s) {
        const bool eq = std::memcmp(&ep_curve[static_cast<std::size_t>(s)], &sp_curve[static_cast<std::size_t>(s)], sizeof(double)) == 0;
        same += eq;
        std::printf("%4d  %.17g  %.17g  %s\n", s, ep_curve[static_cast<std::size_t>(s)], sp_curve[static_cast<std::size_t>(s)], eq ? "=" : "DIFFERS");
      }
      const bool fell = ep_curve.back() < 0.5 * ep_curve.front();
      std::printf("%s; loss %s (%.4g -> %.4g)\n",
                  same == steps ? "the loss curves are identical to the last bit" : "the loss curves DIFFER",
                  fell ? "fell" : "did NOT fall enough", ep_curve.front(), ep_curve.back());
      rc = same == steps && fell ? 0 : 1;
    }
    MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  }
  MPI_Finalize();
  return rc;
}
