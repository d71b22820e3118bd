// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Expert parallelism over MPI (run under mpirun -np 1..4, CTest label mpi): forward y, backward
// dx, every expert gradient, the router's and the output bias's gradients, bitwise equal
// (memcmp) to the single-process layer on the concatenation of the ranks' batches, for every
// policy, uneven expert splits, a rank with no tokens, all tokens on one rank, an expert that no
// token picks, and 2 threads per rank against a single-threaded reference. Every rank builds the
// reference itself (the shapes are small). Exit status 0 only when every rank saw every case equal.
//
// Fault modes (argv[1]): config, weights, input, abort. Each prints what every rank saw; the
// CTest entries match the messages (tests/mpi/CMakeLists.txt).
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <dmoe/dmoe.hpp>
#include <dmoe/parallel/expert_parallel.hpp>
#include <dmoe/parallel/mpi.hpp>

#include "test_random.hpp"

namespace {

using dmoe::index_t;
using rng = dmoe_testing::splitmix;
template <class T>
using rows_t = dmoe::row_matrix<T>;

int failures = 0;

void expect(bool ok, const std::string& what, int rank) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, what.c_str());
  }
}

template <class V>
bool same_bytes(const V* a, const V* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(V)) == 0;
}

struct case_t {
  const char* name;
  int d = 12, E = 5, n = 10;
  bool hb = true, eb = true, ob = true;
  int k = 2;
  bool renorm = true;
  double tau = 0.4;
  bool training = true;
  bool use_aux = true;
  bool threads2 = false;
  int dead_expert = -1;        ///< top_k: this expert's bias is very negative (no token picks it)
  std::vector<int> tokens_of;  ///< tokens per rank (the last entry repeats for more ranks)
};

template <class P>
typename P::options options_of(const case_t& c) {
  if constexpr (std::is_same_v<P, dmoe::top_k>)
    return dmoe::top_k_options{c.k, c.renorm};
  else if constexpr (std::is_same_v<P, dmoe::dynamic_k>)
    return dmoe::dynamic_k_options{c.tau, 0};
  else
    return dmoe::top_any_options{c.training};
}

dmoe::moe_config config_of(const case_t& c) {
  dmoe::moe_config m;
  m.d_model = c.d;
  m.num_experts = c.E;
  m.expert_width = c.n;
  m.hidden_bias = c.hb;
  m.expert_bias = c.eb;
  m.output_bias = c.ob;
  m.router_hidden = 8;
  return m;
}

template <class T>
void fill_router(dmoe::top_k_router<T>& r, rng& g, const case_t& c) {
  dmoe_testing::fill_uniform(r.weight(), g, -1.0, 1.0);
  dmoe_testing::fill_uniform(r.bias(), g, -0.5, 0.5);
  if (c.dead_expert >= 0) r.bias()[c.dead_expert] = T(-1e3);
}
template <class T>
void fill_router(dmoe::dynamic_k_router<T>& r, rng& g, const case_t&) {
  const double a = 1.0 / std::sqrt(double(r.d_model())), b = 1.0 / std::sqrt(double(r.hidden()));
  dmoe_testing::fill_uniform(r.w_in(), g, -a, a);
  dmoe_testing::fill_uniform(r.w_out(), g, -b, b);
}
template <class T>
void fill_router(dmoe::top_any_router<T>& r, rng& g, const case_t&) {
  for (index_t j = 0; j < r.weight().cols(); ++j)
    for (index_t i = 0; i < r.weight().rows(); ++i) r.weight()(i, j) = T(g.normal() * g.uniform(0.5, 2.0));
  dmoe_testing::fill_uniform(r.threshold(), g, -0.1, 0.35);
  for (auto& a : r.active()) a = g.coin(0.8) ? 1 : 0;
  r.active()[0] = 1;
}

template <class T>
std::vector<std::vector<T>> router_params(typename dmoe::param_list<T> ps) {
  std::vector<std::vector<T>> out;
  for (auto& p : ps) out.emplace_back(p.data, p.data + p.size);
  return out;
}

int tokens_on(const case_t& c, int r) { return c.tokens_of[std::size_t(std::min<int>(r, int(c.tokens_of.size()) - 1))]; }

template <class T, class P, class A>
void run_case(dmoe::mpi_communicator& comm, const case_t& c) {
  const int R = comm.size(), me = comm.rank();
  const std::string tag = std::string(c.name) + " (" + P::template router<T>::name + ", " + A::name + ", " +
                          (std::is_same_v<T, float> ? "float" : "double") + ", " + std::to_string(R) + " ranks)";
  using single = dmoe::moe_layer<T, dmoe::cpu, P, A>;
  single full(config_of(c), options_of<P>(c));
  rng g(0x9e3779b97f4a7c15ull ^ std::hash<std::string>{}(c.name), 6364136223846793005ull, 1442695040888963407ull);
  full.experts().randomize(g.next());
  fill_router(full.router(), g, c);
  index_t N = 0, row0 = 0;
  for (int r = 0; r < R; ++r) {
    if (r == me) row0 = N;
    N += tokens_on(c, r);
  }
  const index_t mine = tokens_on(c, me), d = c.d;
  rows_t<T> X(N, d), DY(N, d);
  for (index_t i = 0; i < N; ++i)
    for (index_t j = 0; j < d; ++j) X(i, j) = T(g.uniform(-1, 1));
  for (index_t i = 0; i < N; ++i)
    for (index_t j = 0; j < d; ++j) DY(i, j) = T(g.uniform(-1, 1));
  dmoe::aux_losses aux;
  aux.load_balance = 0.5;
  aux.z_loss = 0.1;
  aux.diversity = 0.7;
  aux.simplicity = 1.3;
  aux.balance = 0.9;
  aux.efficiency = 1.1;
  const dmoe::aux_losses* ap = c.use_aux ? &aux : nullptr;

  // The single-process reference on the whole batch, one thread.
  const dmoe::context<dmoe::cpu> one{};
  dmoe::workspace_buffer ws(full.workspace_size(one, N));
  rows_t<T> Y(N, d), DX(N, d);
  auto G = full.make_gradients();
  {
    auto st = full.forward(one, X, Y, ws);
    expect(st.ok(), tag + ": reference forward: " + st.message(), me);
    st = full.backward(one, X, DY, DX, G, ws, ap);
    expect(st.ok(), tag + ": reference backward: " + st.message(), me);
  }

  // Expert parallel on this rank's rows.
  dmoe::thread_pool pool(2);
  const dmoe::context<dmoe::cpu> ctx = c.threads2 ? dmoe::context<dmoe::cpu>{&pool} : dmoe::context<dmoe::cpu>{};
  dmoe::expert_parallel_layer<T, P, A> ep(comm, full);
  rows_t<T> x = X.middleRows(row0, mine), dy = DY.middleRows(row0, mine), y(mine, d), dx(mine, d);
  y.setConstant(T(-7));
  dx.setConstant(T(-7));
  auto eg = ep.make_gradients();
  auto st = ep.forward(ctx, x, y);
  expect(st.ok(), tag + ": ep forward: " + st.message(), me);
  st = ep.backward(ctx, x, dy, dx, eg, ap);
  expect(st.ok(), tag + ": ep backward: " + st.message(), me);
  for (index_t t = 0; t < mine; ++t)
    if (!same_bytes(y.data() + t * d, Y.data() + (row0 + t) * d, std::size_t(d))) {
      expect(false, tag + ": y differs, first at local token " + std::to_string(t) + " (global " +
                        std::to_string(row0 + t) + "), |diff| " + std::to_string((y.row(t) - Y.row(row0 + t)).norm()),
             me);
      break;
    }
  expect(same_bytes(dx.data(), DX.data() + row0 * d, std::size_t(mine * d)), tag + ": dx differs", me);
  // Expert gradients: this rank's slice of the reference's.
  const index_t e0 = ep.first_expert(), ne = ep.local_experts().num_experts();
  const auto& ge = G.experts;
  const auto& le = eg.experts;
  const index_t w1 = d * ge.shape().first_width(), w2 = c.n * d;
  expect(same_bytes(le.w1_storage().data(), ge.w1_ptr(e0), std::size_t(ne * w1)), tag + ": dW1 differs", me);
  expect(same_bytes(le.w2_storage().data(), ge.w2_ptr(e0), std::size_t(ne * w2)), tag + ": dW2 differs", me);
  if (c.hb)
    expect(same_bytes(le.b1_storage().data(), ge.b1_ptr(e0), std::size_t(ne * ge.shape().first_width())),
           tag + ": db1 differs", me);
  if (c.eb) expect(same_bytes(le.expert_bias_storage().data(), ge.b2e_ptr(e0), std::size_t(ne * d)), tag + ": db2_e differs", me);
  if (c.ob)
    expect(le.output_bias_storage() == ge.output_bias_storage() &&
               same_bytes(le.output_bias_storage().data(), ge.output_bias_storage().data(), std::size_t(d)),
           tag + ": db2 differs", me);
  const auto rr = router_params<T>(G.parameters(dmoe::param_group::router));
  const auto re = router_params<T>(eg.parameters(dmoe::param_group::router));
  expect(rr.size() == re.size(), tag + ": router parameter lists differ", me);
  for (std::size_t i = 0; i < rr.size() && i < re.size(); ++i)
    expect(rr[i].size() == re[i].size() && same_bytes(rr[i].data(), re[i].data(), rr[i].size()),
           tag + ": router gradient " + std::to_string(i) + " differs", me);
  // Tests that cannot fail are worthless: the reference must have something non-trivial.
  if (N > 0) expect(Y.allFinite() && !Y.isZero(0), tag + ": reference output is zero or not finite", me);
}

template <class T>
void all_cases(dmoe::mpi_communicator& comm) {
  case_t a{"uneven tokens", 12, 5, 10, true, true, true, 2, true, 0.4, true, true, false, -1, {70, 33, 91, 5}};
  a.tokens_of = {70, 33, 91, 5};
  run_case<T, dmoe::top_k, dmoe::swiglu>(comm, a);
  case_t b = a;
  b.name = "no renormalisation, 2 threads";
  b.renorm = false;
  b.threads2 = true;
  b.eb = false;
  run_case<T, dmoe::top_k, dmoe::relu>(comm, b);
  case_t c = a;
  c.name = "dynamic_k";
  run_case<T, dmoe::dynamic_k, dmoe::gelu_erf>(comm, c);
  case_t e = a;
  e.name = "top_any training";
  run_case<T, dmoe::top_any, dmoe::silu>(comm, e);
  case_t f = a;
  f.name = "top_any inference, 2 threads";
  f.training = false;
  f.threads2 = true;
  run_case<T, dmoe::top_any, dmoe::geglu>(comm, f);
  case_t z = a;
  z.name = "rank 1 has no tokens";
  z.tokens_of = {60, 0, 40};
  run_case<T, dmoe::top_k, dmoe::relu>(comm, z);
  run_case<T, dmoe::top_any, dmoe::relu>(comm, z);
  case_t one = a;
  one.name = "all tokens on rank 0 (several 128-row chunks per expert)";
  one.tokens_of = {300, 0};
  one.k = 3;
  run_case<T, dmoe::top_k, dmoe::relu>(comm, one);
  case_t dead = a;
  dead.name = "an expert no token picks";
  dead.dead_expert = 3;
  run_case<T, dmoe::top_k, dmoe::silu>(comm, dead);
  case_t none = a;
  none.name = "no tokens anywhere";
  none.tokens_of = {0};
  run_case<T, dmoe::top_any, dmoe::relu>(comm, none);
  case_t big = a;
  big.name = "more tokens than one chunk on every rank";
  big.tokens_of = {150, 140, 130, 160};
  big.E = 7;
  run_case<T, dmoe::top_k, dmoe::relu>(comm, big);
}

/// Fault modes: what every rank sees must be a clear error, within the CTest timeout.
int fault(dmoe::mpi_communicator& comm, const std::string& mode) {
  const int me = comm.rank();
  case_t c{"fault", 12, 5, 10, true, true, true, 2, true, 0.4, true, true, false, -1, {8}};
  using layer = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu>;
  if (mode == "config" || mode == "weights") {
    if (mode == "config" && me == comm.size() - 1) c.k = 3;
    layer full(config_of(c), options_of<dmoe::top_k>(c));
    full.randomize(mode == "weights" && me == comm.size() - 1 ? 2 : 1);
    try {
      dmoe::expert_parallel_layer<float, dmoe::top_k, dmoe::relu> ep(comm, full);
      std::printf("rank %d: no error\n", me);
      return 1;
    } catch (const dmoe::error& e) {
      std::printf("rank %d: dmoe::error: %s\n", me, e.what());
      return 0;
    }
  }
  layer full(config_of(c), options_of<dmoe::top_k>(c));
  full.randomize(1);
  dmoe::expert_parallel_layer<float, dmoe::top_k, dmoe::relu> ep(comm, full);
  const index_t rows = 8;
  rows_t<float> x = rows_t<float>::Ones(rows, c.d), y(rows, c.d);
  if (mode == "input") {  // rank 1 passes x with a wrong width
    rows_t<float> bad = rows_t<float>::Ones(rows, c.d + 1);
    const auto st = me == 1 ? ep.forward({}, bad, y) : ep.forward({}, x, y);
    std::printf("rank %d: %s\n", me, st.ok() ? "no error" : st.message());
    return st.ok() ? 1 : 0;
  }
  if (mode == "abort") {  // rank 1 fails for its own reason: the whole job ends with its message
    if (me == 1) comm.abort("test: rank 1 cannot continue");
    const auto st = ep.forward({}, x, y);  // the others wait here until mpirun ends them
    std::printf("rank %d: forward returned %s\n", me, st.ok() ? "ok" : st.message());
    return 1;
  }
  std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  {
    dmoe::mpi_communicator comm;
    if (argc > 1) {
      rc = fault(comm, argv[1]);
    } else {
      all_cases<float>(comm);
      all_cases<double>(comm);
      int total = 0;
      MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
      if (comm.rank() == 0)
        std::printf("expert parallel on %d ranks: %s (%d failed checks over all ranks)\n", comm.size(),
                    total == 0 ? "all bitwise equal to the single-process layer" : "MISMATCH", total);
      rc = total == 0 ? 0 : 1;
    }
  }
  MPI_Finalize();
  return rc;
}
