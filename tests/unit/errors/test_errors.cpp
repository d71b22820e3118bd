// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Every bad input is refused: hot-path calls return a non-ok status with the right category,
// cold paths (constructors, set_options) throw dmoe::error; each message names the argument.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::errc;
using dmoe::row_matrix;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

/// Runs f, which must throw dmoe::error with code `code` and a message containing every part.
template <class F>
void check_throws(F&& f, errc code, std::initializer_list<const char*> parts) {
  bool thrown = false;
  try {
    f();
  } catch (const dmoe::error& e) {
    thrown = true;
    CHECK(e.code() == code);
    for (const char* p : parts) CHECK_MESSAGE(contains(e.what(), p), (std::string("message \"") + e.what() + "\" lacks \"" + p + "\""));
  }
  CHECK_MESSAGE(thrown, "expected dmoe::error");
}

void check_status(const dmoe::status& s, errc code, std::initializer_list<const char*> parts) {
  CHECK(!s.ok());
  CHECK(!bool(s));
  CHECK(s.code() == code);
  for (const char* p : parts)
    CHECK_MESSAGE(contains(s.message(), p), (std::string("message \"") + s.message() + "\" lacks \"" + p + "\""));
}

dmoe::moe_config config(int d, int E, int n) {
  dmoe::moe_config c;
  c.d_model = d;
  c.num_experts = E;
  c.expert_width = n;
  c.router_hidden = 8;
  return c;
}

template <class P>
void bad_views() {
  const int d = 4, E = 3, T = 6;
  layer_t<float, P, dmoe::relu> layer(config(d, E, 5), typename P::options{});
  layer.randomize(3);
  test_rng g(1);
  const auto x = random_tokens<float>(g, T, d);
  row_matrix<float> y(T, d);
  dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{T, 1}));
  const dmoe::context<dmoe::cpu> ctx{};
  REQUIRE(layer.forward(ctx, x, y, ws).ok());

  row_matrix<float> x5(T, d + 1);
  x5.setZero();
  check_status(layer.forward(ctx, x5, y, ws), errc::invalid_argument, {"x", "d_model"});
  row_matrix<float> y_rows(T + 1, d), y_cols(T, d - 1);
  check_status(layer.forward(ctx, x, y_rows, ws), errc::invalid_argument, {"y"});
  check_status(layer.forward(ctx, x, y_cols, ws), errc::invalid_argument, {"y"});
  check_status(layer.forward(ctx, dmoe::matrix_view<const float>(nullptr, T, d), y, ws), errc::invalid_argument,
               {"x", "null"});
  check_status(layer.forward(ctx, x, dmoe::matrix_view<float>(nullptr, T, d), ws), errc::invalid_argument,
               {"y", "null"});
  check_status(layer.forward(ctx, dmoe::matrix_view<const float>(x.data(), T, d, d - 1), y, ws),
               errc::invalid_argument, {"stride"});
  check_status(layer.forward(ctx, x, dmoe::matrix_view<float>(y.data(), T, d, 2), ws), errc::invalid_argument,
               {"stride"});
  row_matrix<float> xy = x;
  check_status(layer.forward(ctx, xy, xy, ws), errc::invalid_argument, {"alias"});
  check_status(layer.forward(ctx, dmoe::matrix_view<const float>(x.data(), -1, d), dmoe::matrix_view<float>(y.data(), -1, d), ws),
               errc::invalid_argument, {"rows"});

  // Workspace: too small by one byte, null, and sized for fewer threads than the executor has.
  const std::size_t need = layer.workspace_size(dmoe::workspace_bounds{T, 1});
  dmoe::workspace_buffer big(need);
  if constexpr (std::is_same_v<P, dmoe::top_k>) {
    check_status(layer.forward(ctx, x, y, dmoe::workspace{big.view().data, need - 1}), errc::workspace_too_small,
                 {"workspace"});
  } else {
    // dynamic-k and top-any: one byte less holds fewer slots than the worst case T * E; the batch
    // is refused only if it routes more slots than that (test_bad_input.cpp checks the refusal),
    // and a workspace without room for the per-token buffers is refused up front.
    const dmoe::status s1 = layer.forward(ctx, x, y, dmoe::workspace{big.view().data, need - 1});
    CHECK((s1.ok() || s1.code() == errc::workspace_too_small));
    const std::size_t one_slot = layer.workspace_size(dmoe::workspace_bounds{T, 1, 1});
    check_status(layer.forward(ctx, x, y, dmoe::workspace{big.view().data, one_slot / 2}), errc::workspace_too_small,
                 {"workspace"});
  }
  check_status(layer.forward(ctx, x, y, dmoe::workspace{nullptr, need}), errc::workspace_too_small, {"workspace"});
  check_status(layer.forward(ctx, x, y, dmoe::workspace{}), errc::workspace_too_small, {"workspace"});
  dmoe::thread_pool pool(2);
  const dmoe::context<dmoe::cpu> ctx2{&pool};
  if (layer.workspace_size(ctx2, T) > need)
    check_status(layer.forward(ctx2, x, y, big), errc::workspace_too_small, {"workspace"});
  CHECK(layer.forward(ctx, x, y, big).ok());

  // Statistics made for another expert count.
  dmoe::routing_stats wrong(E + 1), none;
  check_status(layer.forward(ctx, x, y, ws, &wrong), errc::invalid_argument, {"stats"});
  check_status(layer.forward(ctx, x, y, ws, &none), errc::invalid_argument, {"stats"});
  // ... also with zero tokens.
  check_status(layer.forward(ctx, dmoe::matrix_view<const float>(nullptr, 0, d), dmoe::matrix_view<float>(nullptr, 0, d),
                             dmoe::workspace{}, &wrong),
               errc::invalid_argument, {"stats"});
}

template <class P>
void nan_input() {
  const int d = 5, E = 4, T = 9;
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    CAPTURE(bad);
    layer_t<float, P, dmoe::relu> layer(config(d, E, 3), typename P::options{});
    layer.randomize(5);
    test_rng g(2);
    auto x = random_tokens<float>(g, T, d);
    x(5, 2) = bad;
    row_matrix<float> y(T, d);
    dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{T, 1}));
    const dmoe::status s = layer.forward({}, x, y, ws);
    if (std::isnan(bad)) {
      // NaN in x must be reported, whatever the policy: the router decision depends on it.
      check_status(s, errc::numerical_error, {"token 5"});
    } else if (!s.ok()) {
      // An infinity either is reported, or (where the scores stay finite) gives a finite route.
      check_status(s, errc::numerical_error, {"token 5"});
    }
  }
}

}  // namespace

TEST_SUITE("errors") {
  TEST_CASE("bad views, workspaces and statistics return a status naming the argument") {
    SUBCASE("top_k") { bad_views<dmoe::top_k>(); }
    SUBCASE("dynamic_k") { bad_views<dmoe::dynamic_k>(); }
    SUBCASE("top_any") { bad_views<dmoe::top_any>(); }
  }

  TEST_CASE("NaN in x is a numerical_error for every policy") {
    SUBCASE("top_k") { nan_input<dmoe::top_k>(); }
    SUBCASE("dynamic_k") { nan_input<dmoe::dynamic_k>(); }
    SUBCASE("top_any") { nan_input<dmoe::top_any>(); }
  }

  TEST_CASE("NaN in router weights is a numerical_error") {
    const int d = 5, E = 4, T = 7;
    test_rng g(4);
    const auto x = random_tokens<double>(g, T, d);
    row_matrix<double> y(T, d);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    {
      layer_t<double, dmoe::top_k, dmoe::relu> l(config(d, E, 3), {2, true});
      l.randomize(1);
      l.router().bias()(1) = nan;
      dmoe::workspace_buffer ws(l.workspace_size(dmoe::workspace_bounds{T, 1}));
      check_status(l.forward({}, x, y, ws), errc::numerical_error, {"token 0"});
    }
    {
      layer_t<double, dmoe::dynamic_k, dmoe::relu> l(config(d, E, 3), {0.5, 0});
      l.randomize(1);
      l.router().w_out().setConstant(nan);
      dmoe::workspace_buffer ws(l.workspace_size(dmoe::workspace_bounds{T, 1}));
      check_status(l.forward({}, x, y, ws), errc::numerical_error, {"token 0"});
    }
    {
      layer_t<double, dmoe::top_any, dmoe::relu> l(config(d, E, 3), {false});
      l.randomize(1);
      l.router().weight()(0, 2) = nan;
      dmoe::workspace_buffer ws(l.workspace_size(dmoe::workspace_bounds{T, 1}));
      check_status(l.forward({}, x, y, ws), errc::numerical_error, {"token 0"});
      // A NaN gate column of a masked slot is never looked at.
      l.router().active()[2] = 0;
      CHECK(l.forward({}, x, y, ws).ok());
    }
  }

  TEST_CASE("top_any with every slot masked off") {
    layer_t<float, dmoe::top_any, dmoe::relu> l(config(4, 3, 2), {false});
    l.randomize(1);
    for (auto& a : l.router().active()) a = 0;
    test_rng g(1);
    const auto x = random_tokens<float>(g, 3, 4);
    row_matrix<float> y(3, 4);
    dmoe::workspace_buffer ws(l.workspace_size(dmoe::workspace_bounds{3, 1}));
    check_status(l.forward({}, x, y, ws), errc::invalid_argument, {"active"});
    l.router().set_training(true);
    check_status(l.forward({}, x, y, ws), errc::invalid_argument, {"active"});
  }

  TEST_CASE("top_k options: k in [1, E]") {
    using L = layer_t<float, dmoe::top_k, dmoe::relu>;
    check_throws([] { L l(config(4, 3, 2), {0, true}); }, errc::invalid_argument, {"k", "num_experts"});
    check_throws([] { L l(config(4, 3, 2), {4, true}); }, errc::invalid_argument, {"k", "num_experts"});
    check_throws([] { L l(config(4, 3, 2), {-1, true}); }, errc::invalid_argument, {"k"});
    L l(config(4, 3, 2), {2, true});
    check_throws([&] { l.router().set_options({0, true}); }, errc::invalid_argument, {"k"});
    check_throws([&] { l.router().set_options({4, false}); }, errc::invalid_argument, {"k"});
    CHECK(l.router().options().k == 2);  // unchanged after a refused update
    CHECK(l.router().options().renormalize);
    l.router().set_options({3, false});
    CHECK(l.router().max_k() == 3);
  }

  TEST_CASE("dynamic_k options: tau in [0, 1], k_max in [0, E]") {
    using L = layer_t<double, dmoe::dynamic_k, dmoe::silu>;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (double tau : {-0.01, 1.01, nan, std::numeric_limits<double>::infinity(), -1e300}) {
      CAPTURE(tau);
      check_throws([&] { L l(config(4, 3, 2), {tau, 0}); }, errc::invalid_argument, {"tau"});
    }
    check_throws([] { L l(config(4, 3, 2), {0.5, 4}); }, errc::invalid_argument, {"k_max"});
    check_throws([] { L l(config(4, 3, 2), {0.5, -1}); }, errc::invalid_argument, {"k_max"});
    L l(config(4, 3, 2), {0.5, 3});
    check_throws([&] { l.router().set_tau(1.5); }, errc::invalid_argument, {"tau"});
    check_throws([&] { l.router().set_tau(nan); }, errc::invalid_argument, {"tau"});
    check_throws([&] { l.router().set_options({0.2, 9}); }, errc::invalid_argument, {"k_max"});
    CHECK(l.router().options().tau == 0.5);
    CHECK(l.router().options().k_max == 3);
    l.router().set_tau(0.0);
    l.router().set_tau(1.0);
    CHECK(l.router().options().tau == 1.0);
    CHECK(l.router().options().k_max == 3);  // set_tau keeps the cap
  }

  TEST_CASE("moe_config fields are checked") {
    using L = layer_t<float, dmoe::top_k, dmoe::relu>;
    check_throws([] { L l(config(0, 3, 2), {1, true}); }, errc::invalid_argument, {"d_model"});
    check_throws([] { L l(config(-2, 3, 2), {1, true}); }, errc::invalid_argument, {"d_model"});
    check_throws([] { L l(config(4, 0, 2), {1, true}); }, errc::invalid_argument, {"num_experts"});
    check_throws([] { L l(config(4, -1, 2), {1, true}); }, errc::invalid_argument, {"num_experts"});
    check_throws([] { L l(config(4, 3, 0), {1, true}); }, errc::invalid_argument, {"expert_width"});
    check_throws([] { L l(config(4, 3, -5), {1, true}); }, errc::invalid_argument, {"expert_width"});
    using D = layer_t<float, dmoe::dynamic_k, dmoe::relu>;
    check_throws(
        [] {
          auto c = config(4, 3, 2);
          c.router_hidden = 0;
          D l(c, {0.5, 0});
        },
        errc::invalid_argument, {"router_hidden"});
    using A = layer_t<float, dmoe::top_any, dmoe::swiglu>;
    check_throws([] { A l(config(4, 0, 2), {false}); }, errc::invalid_argument, {"num_experts"});
  }

  TEST_CASE("static extents must match the configuration") {
    using S = layer_t<float, dmoe::top_k, dmoe::relu, 4, 8>;
    check_throws([] { S l(config(6, 5, 8), {1, true}); }, errc::invalid_argument, {"num_experts"});
    check_throws([] { S l(config(6, 4, 7), {1, true}); }, errc::invalid_argument, {"expert_width"});
    check_throws([] { S l(config(6, 0, 8), {1, true}); }, errc::invalid_argument, {"num_experts"});
    S ok(config(6, 4, 8), {4, true});
    CHECK(ok.num_experts() == 4);
    CHECK(ok.expert_width() == 8);
  }

  TEST_CASE("changing options can grow the workspace") {
    layer_t<float, dmoe::top_k, dmoe::relu> l(config(6, 8, 4), {1, true});
    l.randomize(2);
    test_rng g(3);
    const auto x = random_tokens<float>(g, 50, 6);
    row_matrix<float> y(50, 6);
    const auto small = l.workspace_size(dmoe::workspace_bounds{50, 1});
    dmoe::workspace_buffer ws(small);
    REQUIRE(l.forward({}, x, y, ws).ok());
    l.router().set_options({8, true});
    REQUIRE(l.workspace_size(dmoe::workspace_bounds{50, 1}) > small);
    check_status(l.forward({}, x, y, dmoe::workspace{ws.view().data, small}), errc::workspace_too_small,
                 {"workspace"});
    ws.resize(l.workspace_size(dmoe::workspace_bounds{50, 1}));
    CHECK(l.forward({}, x, y, ws).ok());
  }

  TEST_CASE("routers, expert weights and the dense FFN check their shapes") {
    check_throws([] { dmoe::top_k_router<float> r(0, 3); }, errc::invalid_argument, {"d_model"});
    check_throws([] { dmoe::top_k_router<float> r(3, 0); }, errc::invalid_argument, {"num_experts"});
    check_throws([] { dmoe::dynamic_k_router<float> r(3, 2, {}, 0); }, errc::invalid_argument, {"hidden"});
    check_throws([] { dmoe::top_any_router<double> r(3, -1); }, errc::invalid_argument, {"num_experts"});
    check_throws([] { dmoe::expert_weights<float> w(dmoe::expert_shape{4, 0, 2}); }, errc::invalid_argument,
                 {"num_experts"});
    check_throws([] { dmoe::dense_ffn<float, dmoe::relu> f(0, 4); }, errc::invalid_argument, {"d_model"});
    check_throws([] { dmoe::dense_ffn<float, dmoe::relu> f(4, 0); }, errc::invalid_argument, {"hidden"});

    dmoe::dense_ffn<float, dmoe::geglu> f(4, 6);
    row_matrix<float> x = row_matrix<float>::Ones(3, 4), y(3, 4), x5(3, 5), y2(2, 4);
    dmoe::workspace_buffer ws(f.workspace_size(dmoe::workspace_bounds{3, 1}));
    CHECK(f.forward({}, x, y, ws).ok());
    check_status(f.forward({}, x5, y, ws), errc::invalid_argument, {"x"});
    check_status(f.forward({}, x, y2, ws), errc::invalid_argument, {"y"});
    check_status(f.forward({}, dmoe::matrix_view<const float>(nullptr, 3, 4), y, ws), errc::invalid_argument,
                 {"x"});
    check_status(f.forward({}, x, y, dmoe::workspace{}), errc::workspace_too_small, {"workspace"});
  }

  TEST_CASE("dense_ffn refuses row strides below d_model and negative rows, like the layer") {
    // Views with row_stride < cols overlap their own rows (overlapping writes to y race between
    // tasks); moe_layer::forward refuses them, dense_ffn::forward should too.
    dmoe::dense_ffn<float, dmoe::relu> f(4, 6);
    row_matrix<float> x = row_matrix<float>::Ones(3, 4), y(3, 4);
    dmoe::workspace_buffer ws(f.workspace_size(dmoe::workspace_bounds{3, 1}));
    check_status(f.forward({}, dmoe::matrix_view<const float>(x.data(), 3, 4, 2), y, ws), errc::invalid_argument,
                 {"stride"});
    check_status(f.forward({}, x, dmoe::matrix_view<float>(y.data(), 3, 4, 1), ws), errc::invalid_argument,
                 {"stride"});
    check_status(f.forward({}, dmoe::matrix_view<const float>(x.data(), -1, 4), dmoe::matrix_view<float>(y.data(), -1, 4),
                           ws),
                 errc::invalid_argument, {"rows"});
  }

  TEST_CASE("status and throw_if_error") {
    const dmoe::status ok;
    CHECK(ok.ok());
    CHECK(std::string(ok.message()).empty());
    CHECK_NOTHROW(dmoe::throw_if_error(ok));
    const auto s = dmoe::status::failure(errc::invalid_argument, "x is %d", 3);
    CHECK(std::string(s.message()) == "x is 3");
    check_throws([&] { dmoe::throw_if_error(s); }, errc::invalid_argument, {"invalid_argument", "x is 3"});
    CHECK(std::string(dmoe::to_string(errc::workspace_too_small)) == "workspace_too_small");
    CHECK(std::string(dmoe::to_string(errc::numerical_error)) == "numerical_error");
    // A long message is truncated, never overflows.
    const std::string longer(1000, 'a');
    const auto t = dmoe::status::failure(errc::internal, "%s", longer.c_str());
    CHECK(std::string(t.message()).size() < 1000);
  }
}
