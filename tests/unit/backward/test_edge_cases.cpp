// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Backward edge cases, each also checked against finite differences
// (backward_common.hpp): a top_any token that fires nothing, masked slots, a
// batch where nothing fires, inference fallback, experts that get no token, k =
// E, and zero tokens.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/wait.h>
#include <unistd.h>
#define DMOE_BWD_HAVE_FORK 1
#else
#define DMOE_BWD_HAVE_FORK 0
#endif

#include "backward_common.hpp"

using namespace dmoe_fd;

namespace {

dmoe::aux_losses all_top_any_terms() {
  dmoe::aux_losses a;
  a.diversity = 0.7;
  a.simplicity = 1.3;
  a.balance = 0.9;
  a.efficiency = 1.1;
  return a;
}

/// Raises the thresholds so that token t fires nothing (each active g_e >=
/// cos_te + 0.05).
template <class L>
void silence_token(L& layer, const mat& x, index_t t) {
  auto& r = layer.router();
  for (index_t e = 0; e < r.num_experts(); ++e)
    r.threshold()(e) = std::max(r.threshold()(e), cosine(r, x.data() + t * x.cols(), e) + 0.05);
}

/// The layer's aux values after a fresh forward on x.
template <class L>
dmoe::aux_losses aux_after_forward(const L& layer, const mat& x) {
  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{x.rows(), 1}));
  mat y(x.rows(), x.cols());
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  return layer.aux_loss_values(ws, x.rows());
}

template <class L>
void check_rows_are_output_bias(const L& layer, const mat& y, const std::vector<index_t>& rows) {
  const auto b2 = layer.experts().output_bias();
  for (index_t t : rows)
    for (index_t j = 0; j < y.cols(); ++j) CHECK(y(t, j) == (b2.size() ? b2(j) : 0.0));
}

}  // namespace

TEST_SUITE("backward") {
  TEST_CASE(
      "backward top_any: a token that fires nothing in training gets b2 "
      "only and no gradient") {
    int i = 0;
    for (int act = 0; act < 2; ++act, ++i)
      try_seeds(seed_of("edge/silent_token", i), [&](std::uint64_t s) {
        case_cfg c = random_cfg(s, 7, 3);
        c.training = true;
        c.use_aux = true;
        c.aux = all_top_any_terms();
        auto prepare = [](auto& layer, mat& x) { silence_token(layer, x, 0); };
        auto accept = [](const top_any_state& st) { return st.K[0] == 0 && st.fired_tokens >= 1; };
        auto post = [](auto& layer, const mat&, const mat&, const mat& y, const mat& dx, auto&, const top_any_state&) {
          check_rows_are_output_bias(layer, y, {0});
          for (index_t j = 0; j < dx.cols(); ++j) CHECK(dx(0, j) == 0.0);  // neither expert nor gate path
        };
        return act == 0 ? check_fd_top_any<dmoe::gelu_tanh>(c, prepare, accept, post)
                        : check_fd_top_any<dmoe::swiglu>(c, prepare, accept, post);
      });
  }

  TEST_CASE(
      "backward top_any: masked slots get no selection and only the "
      "simplicity gradient") {
    for (int training = 0; training < 2; ++training)
      try_seeds(seed_of("edge/masked", training), [&](std::uint64_t s) {
        case_cfg c = random_cfg(s, 1, 3);
        c.E = 5;
        c.tokens = 10;
        c.training = training != 0;
        c.use_aux = true;
        c.aux = all_top_any_terms();
        auto prepare = [](auto& layer, mat&) {
          auto& act = layer.router().active();
          for (std::size_t e = 0; e < act.size(); ++e) act[e] = (e == 1 || e == 3) ? 0 : 1;
        };
        auto accept = [](const top_any_state& st) { return st.fired_tokens >= 1; };
        auto post = [&](auto& layer, const mat& x, const mat&, const mat&, const mat&, auto& grads,
                        const top_any_state&) {
          auto& r = layer.router();
          for (index_t e : {index_t(1), index_t(3)}) {
            INFO("masked slot " << e);
            CHECK(grads.router.threshold()(e) == 0.0);
            const Eigen::VectorXd want = c.aux.simplicity / double(c.E) * r.weight().col(e) / r.weight().col(e).norm();
            CHECK((grads.router.weight().col(e) - want).cwiseAbs().maxCoeff() <= 1e-14);
            // Experts of masked slots get no token (check_unused_experts_zero
            // covers their gradients).
          }
          // Diversity ignores masked columns: changing them moves simplicity,
          // not diversity.
          const dmoe::aux_losses before = aux_after_forward(layer, x);
          const Eigen::MatrixXd saved = r.weight();
          r.weight().col(1) *= -3.0;
          r.weight().col(3) = r.weight().col(0);
          const dmoe::aux_losses after = aux_after_forward(layer, x);
          r.weight() = saved;
          CHECK(after.diversity == before.diversity);
          CHECK(after.balance == before.balance);
          CHECK(after.efficiency == before.efficiency);
          CHECK(after.simplicity != before.simplicity);
        };
        return check_fd_top_any<dmoe::silu>(c, prepare, accept, post);
      });
  }

  TEST_CASE("backward top_any: a batch where nothing fires") {
    for (int i = 0; i < 4; ++i)
      try_seeds(seed_of("edge/nothing_fires", i), [&](std::uint64_t s) {
        case_cfg c = random_cfg(s, (i & 1) ? 7 : 3,
                                2);  // with and without the output bias
        c.training = true;
        c.use_aux = i < 2;
        if (c.use_aux) c.aux = all_top_any_terms();
        auto prepare = [](auto& layer, mat&) { layer.router().threshold().setConstant(1.5); };
        auto accept = [](const top_any_state& st) { return st.fired_tokens == 0; };
        auto post = [&](auto& layer, const mat& x, const mat& dy, const mat& y, const mat& dx, auto& grads,
                        const top_any_state&) {
          std::vector<index_t> all;
          for (index_t t = 0; t < y.rows(); ++t) all.push_back(t);
          check_rows_are_output_bias(layer, y, all);
          CHECK(dx.isZero(0.0));
          const auto& ge = grads.experts;
          for (const auto* v : {&ge.w1_storage(), &ge.b1_storage(), &ge.w2_storage(), &ge.expert_bias_storage()})
            CHECK(std::all_of(v->begin(), v->end(), [](double q) { return q == 0.0; }));
          for (index_t j = 0; j < ge.output_bias().size(); ++j) {
            double col = 0;
            for (index_t t = 0; t < dy.rows(); ++t) col += dy(t, j);
            CHECK(ge.output_bias()(j) == doctest::Approx(col).epsilon(1e-14));
          }
          CHECK(grads.router.threshold().isZero(0.0));
          if (!c.use_aux) CHECK(grads.router.weight().isZero(0.0));
          // (with aux, W gets the diversity and simplicity gradients: the
          // finite differences check them)
          const dmoe::aux_losses v = aux_after_forward(layer, x);
          CHECK(v.balance == 0.0);
          CHECK(v.efficiency == 0.0);
        };
        return (i & 2) ? check_fd_top_any<dmoe::relu>(c, prepare, accept, post)
                       : check_fd_top_any<dmoe::geglu>(c, prepare, accept, post);
      });
  }

  // Inference: a token that fires nothing falls back to the best active expert
  // with weight 1. Backward: that slot did not fire, so it passes no gradient
  // to the gate (W, g, nor x through the gate); its expert gets the task
  // gradient with weight 1 (and x through that expert). The surrogate models
  // exactly this (constant weight 1), so the finite differences check it; here
  // every token falls back, so the router gradient must be exactly zero without
  // aux terms, and only the parameter-only terms (diversity, simplicity) with
  // them.
  TEST_CASE(
      "backward top_any inference: fallback slots give the expert weight "
      "1 and the gate nothing") {
    for (int i = 0; i < 4; ++i)
      try_seeds(seed_of("edge/fallback", i), [&](std::uint64_t s) {
        case_cfg c = random_cfg(s, i * 2 + 1, 2);
        c.training = false;
        c.use_aux = i >= 2;
        if (c.use_aux) c.aux = all_top_any_terms();
        auto prepare = [](auto& layer, mat&) { layer.router().threshold().setConstant(1.5); };
        auto accept = [](const top_any_state& st) { return st.fired_tokens == 0; };
        auto post = [&](auto&, const mat&, const mat&, const mat&, const mat&, auto& grads, const top_any_state& st) {
          CHECK(grads.router.threshold().isZero(0.0));
          if (!c.use_aux) CHECK(grads.router.weight().isZero(0.0));
          for (int f : st.fallback) CHECK(f >= 0);
        };
        return (i & 1) ? check_fd_top_any<dmoe::gelu_erf>(c, prepare, accept, post)
                       : check_fd_top_any<dmoe::swiglu>(c, prepare, accept, post);
      });
  }

  TEST_CASE(
      "backward top_any: an active expert that never fires gets zero "
      "gradients") {
    try_seeds(seed_of("edge/top_any_idle", 0), [&](std::uint64_t s) {
      case_cfg c = random_cfg(s, 3, 3);
      c.E = 4;
      c.training = true;
      c.p_active = 1.0;
      auto prepare = [](auto& layer, mat&) { layer.router().threshold()(2) = 1.5; };
      auto accept = [](const top_any_state& st) { return st.fired_tokens >= 1; };
      auto post = [](auto&, const mat&, const mat&, const mat&, const mat&, auto& grads, const top_any_state&) {
        CHECK(grads.router.threshold()(2) == 0.0);
        CHECK(grads.router.weight().col(2).isZero(0.0));  // no aux: nothing reaches its gate
      };
      return check_fd_top_any<dmoe::gelu_erf>(c, prepare, accept, post);
    });
  }

  TEST_CASE("backward top_k: an expert that gets no token has zero gradients") {
    for (int renorm = 0; renorm < 2; ++renorm)
      try_seeds(seed_of("edge/top_k_idle", renorm), [&](std::uint64_t s) {
        case_cfg c = random_cfg(s, 7);
        c.E = 4;
        c.k = 2;
        c.renorm = renorm != 0;
        c.use_aux = true;
        c.aux.load_balance = 0.5;
        c.aux.z_loss = 0.25;
        auto prepare = [](auto& layer, mat&) { layer.router().bias()(1) = -60.0; };
        auto accept = [](const plan_snapshot& p) {
          return std::find(p.expert.begin(), p.expert.end(), 1) == p.expert.end();
        };
        // check_unused_experts_zero (in check_fd_library) asserts expert 1's
        // gradients are zero.
        return check_fd_library<dmoe::top_k, dmoe::silu>(c, prepare, accept);
      });
  }

  TEST_CASE("backward top_k with k = E") {
    int i = 0;
    for (int renorm = 0; renorm < 2; ++renorm)
      for (int aux = 0; aux < 2; ++aux, ++i)
        try_seeds(seed_of("edge/k_eq_E", i), [&](std::uint64_t s) {
          case_cfg c = random_cfg(s, i * 2 + 1);
          c.E = 2 + i;
          c.k = c.E;
          c.renorm = renorm != 0;
          c.use_aux = aux != 0;
          c.aux.load_balance = 0.9;
          c.aux.z_loss = 0.4;
          auto post = [&](auto&, const mat& x, const mat&, const mat&, const mat&, auto&, const plan_snapshot& p) {
            for (index_t t = 0; t < x.rows(); ++t)
              CHECK(p.offsets[std::size_t(t + 1)] - p.offsets[std::size_t(t)] == c.E);
          };
          return check_fd_library<dmoe::top_k, dmoe::gelu_tanh>(c, no_hook{}, accept_all{}, post);
        });
  }
}

// --- zero tokens
// -----------------------------------------------------------------------------------
namespace {

template <class P>
void zero_token_backward(const dmoe::aux_losses* aux) {
  case_cfg c = random_cfg(seed_of("edge/zero_tokens", 0), 7, 2);
  c.tokens = 0;
  layer_t<P, dmoe::gelu_erf> layer(config_of(c), options_of<P>(c));
  rng g(c.seed);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  mat x(0, c.d), y(0, c.d), dy(0, c.d), dx(0, c.d);
  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{0, 1}));
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  auto grads = layer.make_gradients();
  poison(grads.experts);
  poison(grads.router);
  const dmoe::status s = layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx, grads, ws, aux);
  REQUIRE_MESSAGE(s.ok(), s.message());
  const auto& ge = grads.experts;
  for (const auto* v :
       {&ge.w1_storage(), &ge.b1_storage(), &ge.w2_storage(), &ge.expert_bias_storage(), &ge.output_bias_storage()})
    CHECK(std::all_of(v->begin(), v->end(), [](double q) { return q == 0.0; }));
  if constexpr (std::is_same_v<P, dmoe::top_k>) {
    CHECK(grads.router.weight().isZero(0.0));
    CHECK(grads.router.bias().isZero(0.0));
  } else if constexpr (std::is_same_v<P, dmoe::dynamic_k>) {
    CHECK(grads.router.w_in().isZero(0.0));
    CHECK(grads.router.w_out().isZero(0.0));
  } else {
    CHECK(grads.router.threshold().isZero(0.0));
    CHECK(grads.router.weight().isZero(0.0));
  }
}

/// top_any, zero tokens, aux weights given: the gradient must be that of the
/// parameter-only terms (diversity, simplicity), checked by finite differences
/// of the references; balance and efficiency have no tokens and contribute
/// nothing. `ws` is what the caller passes.
void zero_token_top_any_aux(dmoe::workspace ws) {
  case_cfg c = random_cfg(seed_of("edge/zero_tokens_aux", 0), 7, 3);
  c.tokens = 0;
  c.p_active = 0.6;
  layer_t<dmoe::top_any, dmoe::silu> layer(config_of(c), options_of<dmoe::top_any>(c));
  rng g(c.seed);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  const dmoe::aux_losses aux = all_top_any_terms();
  mat x(0, c.d), y(0, c.d), dy(0, c.d), dx(0, c.d);
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  std::string why;
  dmoe::aux_losses want;
  want.diversity = diversity_ref(layer.router());
  want.simplicity = simplicity_ref(layer.router());
  CHECK_MESSAGE(aux_close(layer.aux_loss_values(ws, 0), want, 1e-12, &why), why);
  auto grads = layer.make_gradients();
  poison(grads.experts);
  poison(grads.router);
  const dmoe::status s = layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx, grads, ws, &aux);
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(grads.router.threshold().isZero(0.0));
  std::vector<param_ref> ps;
  add_block(ps, "router.weight", layer.router().weight().data(), grads.router.weight().data(),
            layer.router().weight().size(), c.d);
  const auto r = run_fd(
      ps,
      [&] { return aux.diversity * diversity_ref(layer.router()) + aux.simplicity * simplicity_ref(layer.router()); },
      [] { return true; });
  check_report(r, "zero tokens, top_any parameter-only aux terms");
}

}  // namespace

TEST_SUITE("backward") {
  TEST_CASE("backward with zero tokens returns ok and zero gradients") {
    dmoe::aux_losses aux;
    aux.load_balance = aux.z_loss = 1.0;
    SUBCASE("top_k") { zero_token_backward<dmoe::top_k>(nullptr); }
    SUBCASE("top_k with aux weights") { zero_token_backward<dmoe::top_k>(&aux); }
    SUBCASE("dynamic_k") { zero_token_backward<dmoe::dynamic_k>(nullptr); }
    SUBCASE("dynamic_k with aux weights") { zero_token_backward<dmoe::dynamic_k>(&aux); }
    SUBCASE("top_any") { zero_token_backward<dmoe::top_any>(nullptr); }
  }

  // The parameter-only terms need no tokens. The workspace is the one forward
  // on 0 tokens was given: zero-filled here (forward on zero tokens writes
  // nothing into it).
  TEST_CASE(
      "backward top_any with zero tokens gives the diversity and "
      "simplicity gradients") {
    case_cfg c = random_cfg(seed_of("edge/zero_tokens_aux", 0), 7, 3);
    layer_t<dmoe::top_any, dmoe::silu> layer(config_of(c), options_of<dmoe::top_any>(c));
    std::vector<unsigned char> buf(layer.workspace_size(dmoe::workspace_bounds{0, 1}), 0);
    zero_token_top_any_aux(dmoe::workspace{buf.data(), buf.size()});
  }

  // forward and backward accept any workspace (even none) for zero tokens;
  // backward with the parameter-only aux terms must then not touch it. Run in a
  // child process: a crash there fails this test instead of ending the whole
  // test run.
  TEST_CASE("backward top_any with zero tokens and no workspace") {
#if DMOE_BWD_HAVE_FORK
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // The child reports through its exit status only: no doctest crash
      // handler, no output.
      for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) std::signal(sig, SIG_DFL);
      bool ok = true;
      {
        case_cfg c = random_cfg(seed_of("edge/zero_tokens_aux", 0), 7, 3);
        layer_t<dmoe::top_any, dmoe::silu> layer(config_of(c), options_of<dmoe::top_any>(c));
        rng g(c.seed);
        fill_router(layer.router(), g, c);
        dmoe::aux_losses aux = all_top_any_terms();
        mat x(0, c.d), dy(0, c.d), dx(0, c.d);
        auto grads = layer.make_gradients();
        const dmoe::status s = layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx, grads, dmoe::workspace{}, &aux);
        ok = s.ok() && grads.router.weight().allFinite() && !grads.router.weight().isZero(0.0);
      }
      std::_Exit(ok ? 0 : 3);
    }
    int wstatus = 0;
    REQUIRE(waitpid(pid, &wstatus, 0) == pid);
    const std::string how = WIFSIGNALED(wstatus) ? "was killed by signal " + std::to_string(WTERMSIG(wstatus))
                                                 : "exited with " + std::to_string(WEXITSTATUS(wstatus));
    INFO(("the child " + how + " (3: status not ok or wrong gradient; a signal: backward crashed)"));
    CHECK((WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0));
#else
    MESSAGE("DMOE_SKIP: needs fork()");
#endif
  }
}
