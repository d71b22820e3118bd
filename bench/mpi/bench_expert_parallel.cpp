// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Expert parallelism on one machine (loopback MPI): shape S (d 768, 24 experts of width 128,
// ReLU, top-k k = 6, i.e. f = 0.25 of the experts per token), 512 tokens per step in all.
//  - mpirun -np 2 bench_expert_parallel: BM_ep_forward / BM_ep_train_step, 2 ranks x 1 thread,
//    256 tokens per rank. Counters: comm_ms (time inside the communicator per step: header,
//    row exchanges, and in the train step the router's gathers and the bias chain), bytes_sent
//    (this rank's token rows per forward).
//  - bench_expert_parallel (no mpirun, or -np 1): BM_single_forward / BM_single_train_step, the
//    single-process layer on all 512 tokens with 2 threads (the baseline), and the same EP
//    benchmarks on 1 rank.
// Every rank runs a fixed number of iterations (the exchanges are collective, so ranks must
// agree on it); only rank 0 prints. docs/distributed.md gives the figures and the command.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <benchmark/benchmark.h>

#include <dmoe/dmoe.hpp>
#include <dmoe/parallel/expert_parallel.hpp>
#include <dmoe/parallel/mpi.hpp>

namespace {

using dmoe::index_t;
using rowsf = dmoe::row_matrix<float>;
using layer_t = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu>;
constexpr index_t d = 768, E = 24, n = 128, k = 6, N = 512;
constexpr int iterations = 20;

/// Forwards to MPI and adds up the time spent in it.
class timed_communicator final : public dmoe::communicator {
 public:
  explicit timed_communicator(dmoe::communicator& c) : c_(c) {}
  int rank() const noexcept override { return c_.rank(); }
  int size() const noexcept override { return c_.size(); }
  dmoe::status alltoallv(const void* s, const std::size_t* sb, const std::size_t* so, void* r, const std::size_t* rb,
                         const std::size_t* ro) noexcept override {
    const auto t0 = std::chrono::steady_clock::now();
    const auto st = c_.alltoallv(s, sb, so, r, rb, ro);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return st;
  }
  [[noreturn]] void abort(const char* m) noexcept override {
    c_.abort(m);
    std::abort();  // c_.abort does not return; a virtual call is not known to be noreturn
  }
  double seconds = 0;

 private:
  dmoe::communicator& c_;
};

dmoe::mpi_communicator* world = nullptr;

layer_t make_layer() {
  dmoe::moe_config cfg;
  cfg.d_model = d;
  cfg.num_experts = E;
  cfg.expert_width = n;
  layer_t l(cfg, dmoe::top_k_options{k, true});
  l.randomize(3);
  return l;
}

rowsf rows_of_batch(index_t first, index_t count) {
  rowsf X(N, d);
  dmoe::detail::rng g(11);
  for (index_t i = 0; i < N; ++i)
    for (index_t j = 0; j < d; ++j) X(i, j) = float(g.uniform(-1, 1));
  return X.middleRows(first, count);
}

void ep_bench(benchmark::State& state, bool train) {
  timed_communicator comm(*world);
  const layer_t full = make_layer();
  dmoe::expert_parallel_layer<float, dmoe::top_k, dmoe::relu> ep(comm, full);
  const int R = comm.size(), me = comm.rank();
  const index_t first = N * me / R, count = N * (me + 1) / R - first;
  const rowsf x = rows_of_batch(first, count), dy = rowsf::Constant(count, d, 1e-3f);
  rowsf y(count, d), dx(count, d);
  auto g = ep.make_gradients();
  const dmoe::context<dmoe::cpu> ctx{};
  dmoe::throw_if_error(ep.forward(ctx, x, y));  // warm-up (allocations, packed weights)
  MPI_Barrier(MPI_COMM_WORLD);
  comm.seconds = 0;
  for (auto _ : state) {
    dmoe::throw_if_error(ep.forward(ctx, x, y));
    if (train) dmoe::throw_if_error(ep.backward(ctx, x, dy, dx, g));
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["ranks"] = R;
  state.counters["comm_ms"] = 1e3 * comm.seconds / double(state.iterations());
  state.counters["bytes_sent"] = double(ep.last_sent_bytes());
}

void single_bench(benchmark::State& state, bool train) {
  const layer_t layer = make_layer();
  dmoe::thread_pool pool(2);
  const dmoe::context<dmoe::cpu> ctx{&pool};
  const rowsf x = rows_of_batch(0, N), dy = rowsf::Constant(N, d, 1e-3f);
  rowsf y(N, d), dx(N, d);
  auto g = layer.make_gradients();
  dmoe::workspace_buffer ws(layer.workspace_size(ctx, N));
  dmoe::throw_if_error(layer.forward(ctx, x, y, ws));
  for (auto _ : state) {
    dmoe::throw_if_error(layer.forward(ctx, x, y, ws));
    if (train) dmoe::throw_if_error(layer.backward(ctx, x, dy, dx, g, ws));
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["threads"] = 2;
}

class quiet_reporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    dmoe::mpi_communicator comm;
    world = &comm;
    if (comm.size() == 1) {
      benchmark::RegisterBenchmark("BM_single_forward", single_bench, false)->Unit(benchmark::kMillisecond)->UseRealTime();
      benchmark::RegisterBenchmark("BM_single_train_step", single_bench, true)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    // Fixed iterations: the ranks must make the same collective calls.
    benchmark::RegisterBenchmark("BM_ep_forward", ep_bench, false)
        ->Iterations(iterations)->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark("BM_ep_train_step", ep_bench, true)
        ->Iterations(iterations)->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::Initialize(&argc, argv);
    quiet_reporter quiet;
    if (comm.rank() == 0)
      benchmark::RunSpecifiedBenchmarks();
    else
      benchmark::RunSpecifiedBenchmarks(&quiet);
    benchmark::Shutdown();
  }
  MPI_Finalize();
  return 0;
}
