// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The CUDA backward against the CPU backward (itself checked by finite differences in
// tests/unit/backward): every policy, relu / gelu_tanh / swiglu, fp32 / fp16 / bf16, with the
// auxiliary-loss weights on. The CPU runs on the same rounded inputs and weights; a case whose
// GPU plan differs from the CPU's in any token fails (the random weights keep scores far from
// ties at these sizes), so a gradient is never compared under another plan. Tolerance, normwise
// per tensor (||g_cuda - g_cpu||_inf <= tol (||g_cpu||_inf + 1e-6)): the backward is fp32 SIMT,
// but it reads the forward's activations and expert outputs in T (fp16 11 bits, bf16 8 bits) and
// fp32 storage's forward products are TF32: 1e-2, bf16 4e-2 (the forward's tolerances).
// Also: two backwards give bitwise equal gradients, and a captured graph of forward + backward
// replays to the same bits. Each device test prints DMOE_SKIP without a device.
#include <utility>

#include "cuda_test_support.cuh"

namespace {

using dmoe::aux_losses;

template <class P>
aux_losses aux_weights() {
  aux_losses a;
  if constexpr (std::is_same_v<P, dmoe::top_k>) {
    a.load_balance = 0.3;
    a.z_loss = 0.05;
  } else if constexpr (std::is_same_v<P, dmoe::top_any>) {
    a.balance = 0.2;
    a.efficiency = 0.1;
    a.diversity = 0.05;
    a.simplicity = 0.02;
  }
  return a;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::fmax(m, std::fabs(double(x)));
  return m;
}

/// ||a - b||_inf / (||b||_inf + 1e-6); infinity when a has a non-finite value.
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    e = std::fmax(e, std::fabs(double(a[i]) - double(b[i])));
  }
  return e / (max_abs(b) + 1e-6);
}

template <class R>
std::vector<std::vector<float>> router_tensors(const R& r) {
  std::vector<std::vector<float>> v;
  if constexpr (std::is_same_v<R, dmoe::top_k_router<float>>) {
    v.emplace_back(r.weight().data(), r.weight().data() + r.weight().size());
    v.emplace_back(r.bias().data(), r.bias().data() + r.bias().size());
  } else if constexpr (std::is_same_v<R, dmoe::top_any_router<float>>) {
    v.emplace_back(r.weight().data(), r.weight().data() + r.weight().size());
    v.emplace_back(r.threshold().data(), r.threshold().data() + r.threshold().size());
  } else {
    v.emplace_back(r.w_in().data(), r.w_in().data() + r.w_in().size());
    v.emplace_back(r.w_out().data(), r.w_out().data() + r.w_out().size());
  }
  return v;
}

template <class G>
std::vector<std::vector<float>> all_tensors(const G& g) {
  std::vector<std::vector<float>> v{g.experts.w1_storage(), g.experts.b1_storage(), g.experts.w2_storage(),
                                    g.experts.expert_bias_storage(), g.experts.output_bias_storage()};
  for (auto& r : router_tensors(g.router)) v.push_back(std::move(r));
  return v;
}

template <class T, class P, class A>
void check_backward_case(const shape& s, const typename P::options& opt, std::uint64_t seed) {
  twin<T, P, A> tw(s, opt, seed);
  const index_t tokens = s.tokens, d = s.d;
  const std::string what = std::string(type_name<T>()) + " " + A::name + " seed " + std::to_string(seed) + " d=" +
                           std::to_string(s.d) + " E=" + std::to_string(s.E) + " n=" + std::to_string(s.n) +
                           " tokens=" + std::to_string(tokens);
  INFO(what);
  splitmix g(seed, 5, 11);
  std::vector<float> dy(static_cast<std::size_t>(tokens * d));
  for (auto& v : dy) v = round_to<T>(float(g.uniform(-1.0, 1.0)));
  const aux_losses aux = aux_weights<P>();

  // CPU reference
  dmoe::row_matrix<float> x(tokens, d), y(tokens, d), dyc(tokens, d), dxc(tokens, d);
  for (index_t i = 0; i < tokens * d; ++i) {
    x.data()[i] = tw.x[static_cast<std::size_t>(i)];
    dyc.data()[i] = dy[static_cast<std::size_t>(i)];
  }
  dmoe::workspace_buffer cws(tw.cpu.workspace_size(dmoe::workspace_bounds{tokens, 1}));
  const dmoe::context<dmoe::cpu> cctx{};
  REQUIRE(tw.cpu.forward(cctx, x, y, cws).ok());
  auto cg = tw.cpu.make_gradients();
  const dmoe::status cs = tw.cpu.backward(cctx, x, dyc, dxc, cg, cws, &aux);
  REQUIRE_MESSAGE(cs.ok(), cs.message());
  const auto cplan = tw.cpu.plan(cws, tokens);

  // device
  typename twin<T, P, A>::cuda_layer gpu(tw.cpu);
  const dmoe::workspace_bounds bounds{tokens, 1};
  dmoe::device_array<unsigned char> ws(gpu.workspace_size(bounds)), bws(gpu.backward_workspace_size(bounds));
  // poisoned: every buffer the backward reads must have been written by this forward / backward
  REQUIRE(cudaMemset(ws.data(), 0xff, ws.size()) == cudaSuccess);
  REQUIRE(cudaMemset(bws.data(), 0xff, bws.size()) == cudaSuccess);
  dmoe::device_array<T> xd(tw.x.size()), yd(tw.x.size()), dyd(dy.size()), dxd(dy.size());
  xd.upload(to_storage<T>(tw.x));
  dyd.upload(to_storage<T>(dy));
  auto gg = gpu.make_gradients();
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  const dmoe::context<dmoe::cuda> ctx{stream};
  const auto run = [&] {
    REQUIRE(gpu.forward(ctx, dmoe::matrix_view<const T>(xd.data(), tokens, d), dmoe::matrix_view<T>(yd.data(), tokens, d),
                        {ws.data(), ws.size()})
                .ok());
    const dmoe::status st = gpu.backward(ctx, dmoe::matrix_view<const T>(xd.data(), tokens, d),
                                         dmoe::matrix_view<const T>(dyd.data(), tokens, d),
                                         dmoe::matrix_view<T>(dxd.data(), tokens, d), gg, {ws.data(), ws.size()},
                                         {bws.data(), bws.size()}, &aux);
    REQUIRE_MESSAGE(st.ok(), st.message());
    REQUIRE(gpu.check_numerics(ctx, {ws.data(), ws.size()}, tokens).ok());
  };
  const auto fetch = [&] {
    auto hg = tw.cpu.make_gradients();
    gg.download_to(ctx, hg);
    std::vector<T> dxh(dy.size());
    REQUIRE(cudaMemcpy(dxh.data(), dxd.data(), dxh.size() * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    auto t = all_tensors(hg);
    t.push_back(from_storage(dxh));
    return t;
  };
  run();
  const auto first = fetch();

  // the plan, token by token
  const dmoe::routing_plan<float> gp = gpu.plan({ws.data(), ws.size()}, tokens);
  std::vector<index_t> off(static_cast<std::size_t>(tokens + 1));
  REQUIRE(cudaMemcpy(off.data(), gp.token_offsets, off.size() * sizeof(index_t), cudaMemcpyDeviceToHost) == cudaSuccess);
  std::vector<std::int32_t> ex(static_cast<std::size_t>(off.back()));
  if (!ex.empty())
    REQUIRE(cudaMemcpy(ex.data(), gp.expert, ex.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost) == cudaSuccess);
  for (index_t t = 0; t < tokens; ++t) {
    INFO("token " << t);
    REQUIRE(cplan.k(t) == off[std::size_t(t) + 1] - off[std::size_t(t)]);
    for (index_t i = 0; i < cplan.k(t); ++i)
      REQUIRE(cplan.expert[cplan.token_offsets[t] + i] == ex[std::size_t(off[std::size_t(t)] + i)]);
  }

  auto ref = all_tensors(cg);
  ref.emplace_back(dxc.data(), dxc.data() + tokens * d);
  const char* names[] = {"dW1", "db1", "dW2", "db2e", "db2", "drouter_w", "drouter_b/w2", "dx"};
  REQUIRE(first.size() == ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) {
    INFO(names[i]);
    CHECK(rel_diff(first[i], ref[i]) <= tolerance<T>());
  }

  // bitwise reproducible
  run();
  CHECK(fetch() == first);

  // forward + backward captured in a graph replay to the same bits
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
  REQUIRE(gpu.forward(ctx, dmoe::matrix_view<const T>(xd.data(), tokens, d), dmoe::matrix_view<T>(yd.data(), tokens, d),
                      {ws.data(), ws.size()})
              .ok());
  REQUIRE(gpu.backward(ctx, dmoe::matrix_view<const T>(xd.data(), tokens, d),
                       dmoe::matrix_view<const T>(dyd.data(), tokens, d), dmoe::matrix_view<T>(dxd.data(), tokens, d),
                       gg, {ws.data(), ws.size()}, {bws.data(), bws.size()}, &aux)
              .ok());
  REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
  REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
  REQUIRE(cudaMemsetAsync(dxd.data(), 0xff, dxd.size() * sizeof(T), stream) == cudaSuccess);
  REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
  CHECK(fetch() == first);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

template <class T, class P, class A>
void backward_sweep(std::uint64_t seed0, int cases) {
  for (int i = 0; i < cases; ++i) {
    const std::uint64_t seed = seed0 * 1000 + std::uint64_t(i);
    splitmix g(seed, 31, 7);
    shape s;
    s.d = g.coin() ? 8 * g.integer(1, 12) : g.integer(1, 70);
    s.E = g.integer(1, 10);
    s.n = g.coin() ? 8 * g.integer(1, 10) : g.integer(1, 60);
    s.tokens = i % 3 == 2 ? g.integer(600, 1200) : g.integer(1, 64);
    s.h = g.integer(1, 24);
    s.hidden_bias = g.coin();
    s.expert_bias = g.coin();
    s.output_bias = g.coin();
    check_backward_case<T, P, A>(s, random_options<P>(g, s.E), seed);
  }
}

template <class P>
void backward_policy_sweep(std::uint64_t seed) {
  backward_sweep<float, P, dmoe::relu>(seed + 1, 3);
  backward_sweep<__half, P, dmoe::gelu_tanh>(seed + 2, 3);
  backward_sweep<__nv_bfloat16, P, dmoe::swiglu>(seed + 3, 3);
  backward_sweep<float, P, dmoe::swiglu>(seed + 4, 3);
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("top_k backward matches the CPU backward with aux losses and is bitwise reproducible") {
    if (skip_without_device()) return;
    backward_policy_sweep<dmoe::top_k>(500);
  }
  TEST_CASE("dynamic_k backward matches the CPU backward and is bitwise reproducible") {
    if (skip_without_device()) return;
    backward_policy_sweep<dmoe::dynamic_k>(600);
  }
  TEST_CASE("top_any backward matches the CPU backward with aux losses and is bitwise reproducible") {
    if (skip_without_device()) return;
    backward_policy_sweep<dmoe::top_any>(700);
  }
  TEST_CASE("fp16 activations above 65504 saturate instead of becoming inf") {
    if (skip_without_device()) return;
    // 16 inputs of 8000 through unit W1: each hidden unit is 128000, beyond fp16's 65504. Saturated,
    // out = 16 x 65504 / 1024 = 1023.5 exactly (W2 = 1/1024, fp32 accumulation), weight 1 (top-1,
    // renormalised); unsaturated it would be inf.
    const index_t d = 16, tokens = 3;
    dmoe::moe_config c{d, 2, 16};
    c.hidden_bias = c.expert_bias = c.output_bias = false;
    dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu> cpu(c, dmoe::top_k_options{1, true});
    for (auto& w : cpu.experts().w1_storage()) w = 1.f;
    for (auto& w : cpu.experts().w2_storage()) w = 1.f / 1024.f;
    cpu.router().weight().setZero();
    cpu.router().bias()(0) = 1.f;
    cpu.router().bias()(1) = 0.f;
    dmoe::moe_layer<__half, dmoe::cuda, dmoe::top_k, dmoe::relu> gpu(cpu);
    const std::vector<float> x(static_cast<std::size_t>(tokens * d), 8000.f);
    const host_result r = run_cuda(gpu, x, tokens);
    for (float v : r.y) CHECK(v == 1023.5f);
  }
  TEST_CASE("row strides and offset pointers and two streams at once give the packed run's bits") {
    if (skip_without_device()) return;
    shape s;
    s.d = 40, s.E = 6, s.n = 24, s.tokens = 700, s.expert_bias = true;
    twin<__nv_bfloat16, dmoe::top_k, dmoe::swiglu> tw(s, dmoe::top_k_options{2, true}, 91);
    using T = __nv_bfloat16;
    dmoe::moe_layer<T, dmoe::cuda, dmoe::top_k, dmoe::swiglu> gpu(tw.cpu);
    const index_t tokens = s.tokens, d = s.d, ld = d + 5, off = 3;  // odd offset: no 16-byte loads
    const dmoe::workspace_bounds bounds{tokens, 1};
    const aux_losses aux = aux_weights<dmoe::top_k>();
    splitmix g(17, 5, 3);
    std::vector<float> dyh(std::size_t(tokens * d));
    for (auto& v : dyh) v = round_to<T>(float(g.uniform(-1.0, 1.0)));
    struct run_state {
      dmoe::device_array<unsigned char> ws, bws;
      dmoe::device_array<T> x, y, dy, dx;
      typename dmoe::moe_layer<T, dmoe::cuda, dmoe::top_k, dmoe::swiglu>::gradients grads;
      cudaStream_t stream = nullptr;
    };
    // layout: rows of `stride` elements starting `base` elements into each array
    const auto make = [&](index_t stride, index_t base) {
      run_state r;
      r.ws = dmoe::device_array<unsigned char>(gpu.workspace_size(bounds));
      r.bws = dmoe::device_array<unsigned char>(gpu.backward_workspace_size(bounds));
      const std::size_t count = std::size_t(base + tokens * stride);
      std::vector<float> xs(count, 0.f), dys(count, 0.f);
      for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < d; ++j) {
          xs[std::size_t(base + t * stride + j)] = tw.x[std::size_t(t * d + j)];
          dys[std::size_t(base + t * stride + j)] = dyh[std::size_t(t * d + j)];
        }
      r.x = dmoe::device_array<T>(count);
      r.dy = dmoe::device_array<T>(count);
      r.y = dmoe::device_array<T>(count);
      r.dx = dmoe::device_array<T>(count);
      r.x.upload(to_storage<T>(xs));
      r.dy.upload(to_storage<T>(dys));
      REQUIRE(cudaMemset(r.ws.data(), 0xff, r.ws.size()) == cudaSuccess);
      REQUIRE(cudaMemset(r.bws.data(), 0xff, r.bws.size()) == cudaSuccess);
      r.grads = gpu.make_gradients();
      REQUIRE(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking) == cudaSuccess);
      return r;
    };
    const auto enqueue = [&](run_state& r, index_t stride, index_t base) {
      const dmoe::context<dmoe::cuda> ctx{r.stream};
      REQUIRE(gpu.forward(ctx, dmoe::matrix_view<const T>(r.x.data() + base, tokens, d, stride),
                          dmoe::matrix_view<T>(r.y.data() + base, tokens, d, stride), {r.ws.data(), r.ws.size()})
                  .ok());
      REQUIRE(gpu.backward(ctx, dmoe::matrix_view<const T>(r.x.data() + base, tokens, d, stride),
                           dmoe::matrix_view<const T>(r.dy.data() + base, tokens, d, stride),
                           dmoe::matrix_view<T>(r.dx.data() + base, tokens, d, stride), r.grads,
                           {r.ws.data(), r.ws.size()}, {r.bws.data(), r.bws.size()}, &aux)
                  .ok());
    };
    const auto fetch = [&](run_state& r, index_t stride, index_t base) {
      std::vector<std::vector<float>> out;
      const auto rows = [&](const dmoe::device_array<T>& a) {
        const std::vector<float> all = from_storage(a.download(r.stream));
        std::vector<float> v(std::size_t(tokens * d));
        for (index_t t = 0; t < tokens; ++t)
          for (index_t j = 0; j < d; ++j) v[std::size_t(t * d + j)] = all[std::size_t(base + t * stride + j)];
        return v;
      };
      out.push_back(rows(r.y));
      out.push_back(rows(r.dx));
      auto hg = tw.cpu.make_gradients();
      r.grads.download_to(dmoe::context<dmoe::cuda>{r.stream}, hg);
      for (auto& t : all_tensors(hg)) out.push_back(std::move(t));
      cudaStreamDestroy(r.stream);
      return out;
    };
    run_state packed = make(d, 0);
    enqueue(packed, d, 0);
    const auto want = fetch(packed, d, 0);
    run_state a = make(ld, off), b = make(d, 0);
    enqueue(a, ld, off);  // two streams in flight at once, distinct workspaces
    enqueue(b, d, 0);
    CHECK(fetch(a, ld, off) == want);
    CHECK(fetch(b, d, 0) == want);
  }
  TEST_CASE("slot bound: a batch within it gives the unbounded bits and a batch beyond it is refused") {
    if (skip_without_device()) return;
    shape s;
    s.d = 32, s.E = 8, s.n = 16, s.tokens = 600;  // 600 x 8 strided slots: the radix-sort path
    twin<float, dmoe::top_any, dmoe::relu> tw(s, dmoe::top_any_options{true}, 123);
    dmoe::moe_layer<float, dmoe::cuda, dmoe::top_any, dmoe::relu> gpu(tw.cpu);
    const index_t tokens = s.tokens, d = s.d;
    dmoe::device_array<float> x(tw.x.size()), y(tw.x.size()), dy(tw.x.size()), dx(tw.x.size());
    x.upload(tw.x);
    dy.upload(tw.x);  // any dy
    const dmoe::context<dmoe::cuda> ctx{};
    const dmoe::matrix_view<const float> xv(x.data(), tokens, d);
    const auto run = [&](index_t max_slots, dmoe::status& numerics, std::vector<float>& grads_out) {
      const dmoe::workspace_bounds bounds{tokens, 1, max_slots};
      dmoe::device_array<unsigned char> ws(gpu.workspace_size(bounds)), bws(gpu.backward_workspace_size(bounds));
      REQUIRE(cudaMemset(ws.data(), 0xff, ws.size()) == cudaSuccess);
      REQUIRE(cudaMemset(bws.data(), 0xff, bws.size()) == cudaSuccess);
      REQUIRE(gpu.forward(ctx, xv, dmoe::matrix_view<float>(y.data(), tokens, d), {ws.data(), ws.size()}).ok());
      auto g2 = gpu.make_gradients();
      REQUIRE(gpu.backward(ctx, xv, dmoe::matrix_view<const float>(dy.data(), tokens, d),
                           dmoe::matrix_view<float>(dx.data(), tokens, d), g2, {ws.data(), ws.size()},
                           {bws.data(), bws.size()})
                  .ok());
      numerics = gpu.check_numerics(ctx, {ws.data(), ws.size()}, tokens);
      index_t nnz = 0;
      const dmoe::routing_plan<float> p = gpu.plan({ws.data(), ws.size()}, tokens);
      REQUIRE(cudaMemcpy(&nnz, p.token_offsets + tokens, sizeof nnz, cudaMemcpyDeviceToHost) == cudaSuccess);
      grads_out = g2.w1.download();
      const auto w2 = g2.w2.download();
      grads_out.insert(grads_out.end(), w2.begin(), w2.end());
      return std::make_pair(nnz, std::make_pair(y.download(), dx.download()));
    };
    dmoe::status st;
    std::vector<float> g_full, g_fit, g_over;
    const auto full = run(0, st, g_full);
    REQUIRE(st.ok());
    const index_t nnz = full.first;
    REQUIRE(nnz > 1);
    REQUIRE(nnz < tokens * s.E);  // the bound below is smaller than tokens x E
    const auto fit = run(nnz, st, g_fit);
    CHECK(st.ok());
    CHECK(fit.second.first == full.second.first);
    CHECK(fit.second.second == full.second.second);
    CHECK(g_fit == g_full);
    const auto over = run(nnz - 1, st, g_over);
    CHECK(st.code() == dmoe::errc::workspace_too_small);
    const std::vector<float>& b2 = tw.cpu.experts().output_bias_storage();
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < d; ++j)
        CHECK(over.second.first[std::size_t(t * d + j)] == (b2.empty() ? 0.f : b2[std::size_t(j)]));
    for (float v : g_over) CHECK(v == 0.f);  // no expert ran: zero expert gradients
  }
  TEST_CASE("backward refuses a scratch workspace too small and gradients of another shape") {
    if (skip_without_device()) return;
    shape s;
    twin<float, dmoe::top_k, dmoe::relu> tw(s, dmoe::top_k_options{2, true}, 3);
    dmoe::moe_layer<float, dmoe::cuda, dmoe::top_k, dmoe::relu> gpu(tw.cpu);
    const dmoe::workspace_bounds bounds{s.tokens, 1};
    dmoe::device_array<unsigned char> ws(gpu.workspace_size(bounds)), bws(gpu.backward_workspace_size(bounds));
    dmoe::device_array<float> xd(tw.x.size()), yd(tw.x.size()), dxd(tw.x.size());
    xd.upload(tw.x);
    auto gg = gpu.make_gradients();
    const dmoe::context<dmoe::cuda> ctx{};
    const dmoe::matrix_view<const float> xv(xd.data(), s.tokens, s.d);
    REQUIRE(gpu.forward(ctx, xv, dmoe::matrix_view<float>(yd.data(), s.tokens, s.d), {ws.data(), ws.size()}).ok());
    const dmoe::status small = gpu.backward(ctx, xv, xv, dmoe::matrix_view<float>(dxd.data(), s.tokens, s.d), gg,
                                            {ws.data(), ws.size()}, {bws.data(), bws.size() - 1});
    CHECK(small.code() == dmoe::errc::workspace_too_small);
    shape s2 = s;
    s2.n = s.n + 1;
    twin<float, dmoe::top_k, dmoe::relu> other(s2, dmoe::top_k_options{2, true}, 4);
    dmoe::moe_layer<float, dmoe::cuda, dmoe::top_k, dmoe::relu> gpu2(other.cpu);
    auto wrong = gpu2.make_gradients();
    const dmoe::status shape_err = gpu.backward(ctx, xv, xv, dmoe::matrix_view<float>(dxd.data(), s.tokens, s.d), wrong,
                                                {ws.data(), ws.size()}, {bws.data(), bws.size()});
    CHECK(shape_err.code() == dmoe::errc::invalid_argument);
  }
}
