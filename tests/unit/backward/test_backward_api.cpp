// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// backward's contract beyond the numbers: it can be called again after one
// forward with identical results (it does not modify the forward state),
// strided views give the dense results, and bad arguments return non-ok
// statuses whose message names the argument.
#include <cstring>

#include "backward_common.hpp"

using namespace dmoe_fd;

namespace {

template <class G>
std::vector<std::vector<double>> grad_buffers(const G& g) {
  const auto& e = g.experts;
  std::vector<std::vector<double>> b = {e.w1_storage(), e.b1_storage(), e.w2_storage(), e.expert_bias_storage(),
                                        e.output_bias_storage()};
  if constexpr (std::is_same_v<std::decay_t<decltype(g.router)>, dmoe::dynamic_k_router<double>>) {
    b.emplace_back(g.router.w_in().data(), g.router.w_in().data() + g.router.w_in().size());
    b.emplace_back(g.router.w_out().data(), g.router.w_out().data() + g.router.w_out().size());
  } else if constexpr (std::is_same_v<std::decay_t<decltype(g.router)>, dmoe::top_k_router<double>>) {
    b.emplace_back(g.router.weight().data(), g.router.weight().data() + g.router.weight().size());
    b.emplace_back(g.router.bias().data(), g.router.bias().data() + g.router.bias().size());
  } else {
    b.emplace_back(g.router.weight().data(), g.router.weight().data() + g.router.weight().size());
    b.emplace_back(g.router.threshold().data(), g.router.threshold().data() + g.router.threshold().size());
  }
  return b;
}

bool same_buffers(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same_bytes(a[i], b[i])) return false;
  return true;
}

case_cfg api_case(const char* tag) {
  case_cfg c = random_cfg(seed_of(tag, 0), 7, 3);
  c.d = 6;
  c.E = 4;
  c.n = 5;
  c.tokens = 9;
  c.k = 2;
  c.tau = 0.3;
  c.training = true;
  c.use_aux = true;
  c.aux.load_balance = 0.5;
  c.aux.z_loss = 0.2;
  c.aux.diversity = 0.7;
  c.aux.simplicity = 1.3;
  c.aux.balance = 0.9;
  c.aux.efficiency = 1.1;
  return c;
}

template <class P, class A>
void twice(const case_cfg& c) {
  layer_t<P, A> layer(config_of(c), options_of<P>(c));
  rng g(c.seed);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  const mat x = random_rows(g, c.tokens, c.d), dy = random_rows(g, c.tokens, c.d);
  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{c.tokens, 1}));
  mat y(c.tokens, c.d);
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  const plan_snapshot plan0 = snapshot(layer.plan(ws, c.tokens));
  const dmoe::aux_losses aux0 = layer.aux_loss_values(ws, c.tokens);

  auto g1 = layer.make_gradients();
  auto g2 = layer.make_gradients();
  poison(g2.experts);
  poison(g2.router);
  mat dx1(c.tokens, c.d), dx2 = mat::Constant(c.tokens, c.d, nan_v);
  REQUIRE(layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx1, g1, ws, &c.aux).ok());
  const dmoe::aux_losses aux1 = layer.aux_loss_values(ws, c.tokens);
  REQUIRE(layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx2, g2, ws, &c.aux).ok());
  CHECK(same_bytes(dx1, dx2));
  CHECK(same_buffers(grad_buffers(g1), grad_buffers(g2)));
  // Same gradients object again (overwritten, not accumulated).
  REQUIRE(layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx2, g1, ws, &c.aux).ok());
  CHECK(same_buffers(grad_buffers(g1), grad_buffers(g2)));
  // The forward state is unchanged: same plan, same aux values, and a fresh
  // forward agrees.
  const plan_snapshot plan1 = snapshot(layer.plan(ws, c.tokens));
  CHECK(plan1.same_selection(plan0));
  CHECK(same_bytes(plan1.weight, plan0.weight));
  CHECK(std::memcmp(&aux0, &aux1, sizeof aux0) == 0);
  mat y2(c.tokens, c.d);
  dmoe::workspace_buffer ws2(ws.size());
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y2, ws2).ok());
  CHECK(same_bytes(y, y2));
  auto g3 = layer.make_gradients();
  mat dx3(c.tokens, c.d);
  REQUIRE(layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx3, g3, ws2, &c.aux).ok());
  CHECK(same_bytes(dx1, dx3));
  CHECK(same_buffers(grad_buffers(g1), grad_buffers(g3)));
}

/// x, dy and dx as views with row stride d + 3 give the dense results.
template <class P, class A>
void strided(const case_cfg& c) {
  layer_t<P, A> layer(config_of(c), options_of<P>(c));
  rng g(c.seed ^ 77);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  const mat x = random_rows(g, c.tokens, c.d), dy = random_rows(g, c.tokens, c.d);
  const index_t ld = c.d + 3;
  mat xs = mat::Constant(c.tokens, ld, 1e300), dys = mat::Constant(c.tokens, ld, 1e300),
      dxs = mat::Constant(c.tokens, ld, -5.0), ys(c.tokens, ld);
  xs.leftCols(c.d) = x;
  dys.leftCols(c.d) = dy;
  const dmoe::matrix_view<const double> xv(xs.data(), c.tokens, c.d, ld), dyv(dys.data(), c.tokens, c.d, ld);
  const dmoe::matrix_view<double> dxv(dxs.data(), c.tokens, c.d, ld), yv(ys.data(), c.tokens, c.d, ld);

  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{c.tokens, 1}));
  mat y(c.tokens, c.d), dx(c.tokens, c.d);
  auto gd = layer.make_gradients(), gs = layer.make_gradients();
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  REQUIRE(layer.backward(dmoe::context<dmoe::cpu>{}, x, dy, dx, gd, ws, &c.aux).ok());
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, xv, yv, ws).ok());
  REQUIRE(layer.backward(dmoe::context<dmoe::cpu>{}, xv, dyv, dxv, gs, ws, &c.aux).ok());
  const auto a = grad_buffers(gd), b = grad_buffers(gs);
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t j = 0; j < a[i].size(); ++j) CHECK(b[i][j] == doctest::Approx(a[i][j]).epsilon(1e-13).scale(1));
  for (index_t t = 0; t < c.tokens; ++t) {
    for (index_t j = 0; j < c.d; ++j) CHECK(dxs(t, j) == doctest::Approx(dx(t, j)).epsilon(1e-13).scale(1));
    for (index_t j = c.d; j < ld; ++j) CHECK(dxs(t, j) == -5.0);  // padding untouched
  }
}

bool mentions(const dmoe::status& s, const char* word) { return std::strstr(s.message(), word) != nullptr; }

#define DMOE_BWD_EXPECT_ERROR(EXPR, CODE, WORD)                                                         \
  do {                                                                                                  \
    const dmoe::status s_ = (EXPR);                                                                     \
    CHECK_FALSE(s_.ok());                                                                               \
    CHECK(s_.code() == (CODE));                                                                         \
    CHECK_MESSAGE(mentions(s_, WORD),                                                                   \
                  "message \"" << std::string(s_.message()) << "\" should name " << std::string(WORD)); \
  } while (0)

template <class P>
void errors(const case_cfg& c) {
  using L = layer_t<P, dmoe::relu>;
  L layer(config_of(c), options_of<P>(c));
  rng g(c.seed);
  fill_experts(layer.experts(), g);
  fill_router(layer.router(), g, c);
  const index_t T = c.tokens, d = c.d;
  const mat x = random_rows(g, T, d), dy = random_rows(g, T, d);
  const std::size_t need = layer.workspace_size(dmoe::workspace_bounds{T, 1});
  dmoe::workspace_buffer ws(need);
  mat y(T, d), dx(T, d);
  REQUIRE(layer.forward(dmoe::context<dmoe::cpu>{}, x, y, ws).ok());
  auto grads = layer.make_gradients();
  const dmoe::context<dmoe::cpu> ctx{};
  const auto inv = dmoe::errc::invalid_argument;
  const auto small = dmoe::errc::workspace_too_small;

  mat dy_rows(T - 1, d), dy_cols(T, d + 1), dx_rows(T + 1, d), dx_cols(T, d - 1), x_cols(T, d + 2);
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy_rows, dx, grads, ws), inv, "dy");
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy_cols, dx, grads, ws), inv, "dy");
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dx_rows, grads, ws), inv, "dx");
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dx_cols, grads, ws), inv, "dx");
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x_cols, dy, dx, grads, ws), inv, "x");
  // Null data with rows, aliasing, strides.
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dmoe::matrix_view<const double>(nullptr, T, d), dx, grads, ws), inv,
                        "dy");
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dmoe::matrix_view<double>(nullptr, T, d), grads, ws), inv, "dx");
  mat alias = dy;
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, alias, alias, grads, ws), inv, "dx");
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dmoe::matrix_view<double>(dx.data(), T, d, d - 1), grads, ws), inv,
                        "stride");

  // Gradients of a layer of another shape.
  auto other = [&](auto edit) {
    case_cfg o = c;
    edit(o);
    L l2(config_of(o), options_of<P>(o));
    auto g2 = l2.make_gradients();
    DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dx, g2, ws), inv, "grads");
  };
  other([](case_cfg& o) { o.d += 1; });
  other([](case_cfg& o) {
    o.E += 1;
    o.k = 1;
  });
  other([](case_cfg& o) { o.n += 1; });
  other([](case_cfg& o) { o.hb = !o.hb; });
  other([](case_cfg& o) { o.eb = !o.eb; });
  other([](case_cfg& o) { o.ob = !o.ob; });
  if constexpr (std::is_same_v<P, dmoe::dynamic_k>) other([](case_cfg& o) { o.router_hidden += 1; });
  {  // a gated layer's gradients on a non-gated layer of the same sizes
    layer_t<P, dmoe::swiglu> l2(config_of(c), options_of<P>(c));
    auto g2 = l2.make_gradients();
    typename L::gradients g3{g2.experts, g2.router};
    DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dx, g3, ws), inv, "grads");
  }

  // Workspaces: one byte short, none, and one sized for fewer threads than the
  // executor has.
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dx, grads, dmoe::workspace{ws.view().data, need - 1}), small,
                        "workspace");
  DMOE_BWD_EXPECT_ERROR(layer.backward(ctx, x, dy, dx, grads, dmoe::workspace{}), small, "workspace");
  {
    dmoe::thread_pool pool(2);
    DMOE_BWD_EXPECT_ERROR(layer.backward(dmoe::context<dmoe::cpu>{&pool}, x, dy, dx, grads, ws), small, "workspace");
  }
  // And the right call still works afterwards.
  CHECK(layer.backward(ctx, x, dy, dx, grads, ws).ok());
}

}  // namespace

TEST_SUITE("backward") {
  TEST_CASE("backward can be called twice after one forward with identical results") {
    SUBCASE("top_k") { twice<dmoe::top_k, dmoe::gelu_tanh>(api_case("api/twice/top_k")); }
    SUBCASE("dynamic_k") { twice<dmoe::dynamic_k, dmoe::swiglu>(api_case("api/twice/dynamic_k")); }
    SUBCASE("top_any training") { twice<dmoe::top_any, dmoe::relu>(api_case("api/twice/top_any")); }
    SUBCASE("top_any inference") {
      case_cfg c = api_case("api/twice/top_any_inf");
      c.training = false;
      twice<dmoe::top_any, dmoe::geglu>(c);
    }
  }

  TEST_CASE("backward with strided views gives the dense results") {
    SUBCASE("top_k") { strided<dmoe::top_k, dmoe::silu>(api_case("api/strided/top_k")); }
    SUBCASE("dynamic_k") { strided<dmoe::dynamic_k, dmoe::gelu_erf>(api_case("api/strided/dynamic_k")); }
    SUBCASE("top_any") { strided<dmoe::top_any, dmoe::swiglu>(api_case("api/strided/top_any")); }
  }

  TEST_CASE("backward rejects bad arguments with a message naming them") {
    SUBCASE("top_k") { errors<dmoe::top_k>(api_case("api/errors/top_k")); }
    SUBCASE("dynamic_k") { errors<dmoe::dynamic_k>(api_case("api/errors/dynamic_k")); }
    SUBCASE("top_any") { errors<dmoe::top_any>(api_case("api/errors/top_any")); }
  }
}
