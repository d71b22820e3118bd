// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Bad input that used to crash or pass silently: size arithmetic that overflows (token counts,
// absurd configs), allocation failure, and a backward whose workspace does not hold a completed
// forward of this layer and this token count. Each gets a clear error naming the numbers.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "sweep.hpp"

using namespace dmoe_test;
using dmoe::errc;
using dmoe::row_matrix;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

template <class F>
void check_throws(F&& f, errc code, std::initializer_list<const char*> parts) {
  bool thrown = false;
  try {
    f();
  } catch (const dmoe::error& e) {
    thrown = true;
    CHECK(e.code() == code);
    for (const char* p : parts)
      CHECK_MESSAGE(contains(e.what(), p), (std::string("message \"") + e.what() + "\" lacks \"" + p + "\""));
  }
  CHECK_MESSAGE(thrown, "expected dmoe::error");
}

void check_status(const dmoe::status& s, errc code, std::initializer_list<const char*> parts) {
  CHECK(!s.ok());
  CHECK(s.code() == code);
  for (const char* p : parts)
    CHECK_MESSAGE(contains(s.message(), p), (std::string("message \"") + s.message() + "\" lacks \"" + p + "\""));
}

dmoe::moe_config config(dmoe::index_t d, dmoe::index_t E, dmoe::index_t n) {
  dmoe::moe_config c;
  c.d_model = d;
  c.num_experts = E;
  c.expert_width = n;
  c.router_hidden = 8;
  return c;
}

template <class P>
typename P::options opts() {
  return typename P::options{};
}

}  // namespace

TEST_SUITE("errors") {
  TEST_CASE_TEMPLATE("huge token counts: workspace_size throws and forward refuses, naming the tokens", P,
                     dmoe::top_k, dmoe::dynamic_k, dmoe::top_any) {
    layer_t<float, P, dmoe::relu> layer(config(4, 3, 5), opts<P>());
    const dmoe::index_t huge = (std::numeric_limits<dmoe::index_t>::max)() / 2;
    check_throws([&] { (void)layer.workspace_size(dmoe::workspace_bounds{huge, 1}); }, errc::invalid_argument,
                 {"workspace_size", "tokens", "size_t"});
    check_throws([&] { (void)layer.workspace_size(dmoe::workspace_bounds{4, huge}); }, errc::invalid_argument,
                 {"workspace_size", "threads"});
    // A view that claims huge rows over a small buffer: the checked size refuses it before any
    // read, even though the small workspace would pass a wrapped size comparison.
    row_matrix<float> x(2, 4), y(2, 4);
    x.setZero();
    dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{2, 1}));
    check_status(layer.forward({}, dmoe::matrix_view<const float>(x.data(), huge, 4),
                               dmoe::matrix_view<float>(y.data(), huge, 4), ws),
                 errc::invalid_argument, {"moe_layer::forward", "tokens", "size_t"});
  }

  TEST_CASE("absurd configs throw dmoe::error naming the field and the numbers") {
    using L = layer_t<float, dmoe::top_k, dmoe::relu>;
    const dmoe::index_t big = dmoe::index_t{1} << 30;
    // E * d * n overflows a signed 64-bit count.
    check_throws([&] { L layer(config(big, big, big), {}); }, errc::invalid_argument,
                 {"moe_layer", "config", "num_experts x d_model x expert_width", "1073741824"});
    check_throws([&] { dmoe::expert_weights<float> w(dmoe::expert_shape{big, big, big}); }, errc::invalid_argument,
                 {"expert_weights", "w1", "1073741824"});
    // Each factor fine, the router's d x E product alone too large for memory.
    check_throws([&] { dmoe::top_k_router<float> r(dmoe::index_t{1} << 62, 4); }, errc::invalid_argument,
                 {"top_k_router", "weight"});
    check_throws([&] { dmoe::dynamic_k_router<float> r(8, 4, {}, dmoe::index_t{1} << 62); }, errc::invalid_argument,
                 {"dynamic_k_router", "w_in"});
    // Gated width doubles n: 2 n overflowing is caught too.
    check_throws([&] { dmoe::expert_weights<float> w(dmoe::expert_shape{4, 2, (std::numeric_limits<dmoe::index_t>::max)() / 2 + 1, true}); },
                 errc::invalid_argument, {"expert_weights", "first-layer width"});
  }

#if !defined(__SANITIZE_ADDRESS__) && !defined(DMOE_TEST_ASAN)
  TEST_CASE("allocation failure is dmoe::error(out_of_memory) with the bytes asked for") {
    // 2^20 experts of 2^20 x 2^18: representable counts, far more memory than any machine has.
    check_throws([&] { dmoe::expert_weights<float> w(dmoe::expert_shape{dmoe::index_t{1} << 20, dmoe::index_t{1} << 20, dmoe::index_t{1} << 18}); },
                 errc::out_of_memory, {"expert_weights", "bytes"});
    check_throws([&] { dmoe::top_k_router<float> r(dmoe::index_t{1} << 31, dmoe::index_t{1} << 28); },
                 errc::out_of_memory, {"top_k_router", "bytes"});
    check_throws([&] { dmoe::workspace_buffer b(std::size_t{1} << 62); }, errc::out_of_memory,
                 {"workspace_buffer", "bytes"});
  }
#else
  TEST_CASE("allocation failure is dmoe::error(out_of_memory) with the bytes asked for") {
    // AddressSanitizer aborts on an impossible allocation instead of throwing std::bad_alloc.
    MESSAGE("DMOE_SKIP: AddressSanitizer aborts on impossible allocations");
  }
#endif

  TEST_CASE_TEMPLATE("backward refuses a workspace without a completed forward of this layer and token count", P,
                     dmoe::top_k, dmoe::dynamic_k, dmoe::top_any) {
    const int d = 4, E = 3, T = 8;
    layer_t<float, P, dmoe::relu> layer(config(d, E, 5), opts<P>());
    layer.randomize(7);
    test_rng g(3);
    const auto x = random_tokens<float>(g, T, d);
    const auto dy = random_tokens<float>(g, T, d);
    row_matrix<float> y(T, d), dx(T, d);
    auto grads = layer.make_gradients();
    const dmoe::context<dmoe::cpu> ctx{};

    // A fresh workspace, zeroed (so no stale stamp can be there by chance): no forward.
    dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{T, 1}));
    std::fill_n(static_cast<unsigned char*>(ws.view().data), ws.size(), static_cast<unsigned char>(0));
    check_status(layer.backward(ctx, x, dy, dx, grads, ws), errc::invalid_argument, {"backward", "no forward"});

    REQUIRE(layer.forward(ctx, x, y, ws).ok());
    CHECK(layer.backward(ctx, x, dy, dx, grads, ws).ok());
    CHECK(layer.backward(ctx, x, dy, dx, grads, ws).ok());  // backward leaves the forward state intact

    // Another token count than the forward's.
    dmoe::matrix_view<const float> x6(x.data(), 6, d), dy6(dy.data(), 6, d);
    dmoe::matrix_view<float> dx6(dx.data(), 6, d);
    check_status(layer.backward(ctx, x6, dy6, dx6, grads, ws), errc::invalid_argument,
                 {"backward", "forward of 8 tokens", "got 6"});

    // Another layer object of the same shape (and a copy of this one).
    layer_t<float, P, dmoe::relu> other(config(d, E, 5), opts<P>());
    auto other_grads = other.make_gradients();
    check_status(other.backward(ctx, x, dy, dx, other_grads, ws), errc::invalid_argument,
                 {"backward", "another layer"});
    const auto copy = layer;
    check_status(copy.backward(ctx, x, dy, dx, grads, ws), errc::invalid_argument, {"backward", "another layer"});

    // A forward that failed (NaN input) leaves a state backward must not use.
    auto xbad = x;
    xbad(2, 1) = std::numeric_limits<float>::quiet_NaN();
    CHECK(!layer.forward(ctx, xbad, y, ws).ok());
    check_status(layer.backward(ctx, xbad, dy, dx, grads, ws), errc::invalid_argument, {"backward", "failed"});

    // A new successful forward makes it usable again.
    REQUIRE(layer.forward(ctx, x, y, ws).ok());
    CHECK(layer.backward(ctx, x, dy, dx, grads, ws).ok());
  }

  TEST_CASE("backward refuses a forward made under other router options (top_k k changed)") {
    const int d = 4, E = 4, T = 5;
    layer_t<float, dmoe::top_k, dmoe::relu> layer(config(d, E, 3), dmoe::top_k_options{1, true});
    layer.randomize(2);
    test_rng g(4);
    const auto x = random_tokens<float>(g, T, d);
    const auto dy = random_tokens<float>(g, T, d);
    row_matrix<float> y(T, d), dx(T, d);
    auto grads = layer.make_gradients();
    dmoe::workspace_buffer ws(layer.workspace_size(dmoe::workspace_bounds{T, 1}) * 4);
    REQUIRE(layer.forward({}, x, y, ws).ok());
    layer.router().set_options(dmoe::top_k_options{3, true});
    check_status(layer.backward({}, x, dy, dx, grads, ws), errc::invalid_argument, {"backward", "router options", "3"});
    REQUIRE(layer.forward({}, x, y, ws).ok());
    CHECK(layer.backward({}, x, dy, dx, grads, ws).ok());
  }
}

TEST_SUITE("errors") {
  TEST_CASE_TEMPLATE("a slot bound below the batch's slots is refused, never a silent drop, and stats report the slots", P,
                     dmoe::dynamic_k, dmoe::top_any) {
    const int d = 6, E = 5, T = 40;
    layer_t<double, P, dmoe::relu> layer(config(d, E, 4), opts<P>());
    layer.randomize(11);
    test_rng g(5);
    const auto x = random_tokens<double>(g, T, d);
    row_matrix<double> y_full(T, d), y(T, d);
    const dmoe::context<dmoe::cpu> ctx{};
    // Reference: the worst-case workspace (T * E slots).
    dmoe::workspace_buffer full(layer.workspace_size(dmoe::workspace_bounds{T, 1}));
    dmoe::routing_stats st(E);
    REQUIRE(layer.forward(ctx, x, y_full, full, &st).ok());
    const dmoe::index_t used = st.slots;
    CHECK(st.max_slots_seen == used);
    REQUIRE(used > T / 2);
    REQUIRE(used < T * E);

    // A workspace sized for exactly the slots used gives bitwise the same output and backward.
    const std::size_t exact = layer.workspace_size(dmoe::workspace_bounds{T, 1, used});
    CHECK(exact < layer.workspace_size(dmoe::workspace_bounds{T, 1}));
    dmoe::workspace_buffer tight(exact);
    REQUIRE(layer.forward(ctx, x, y, tight).ok());
    CHECK(y == y_full);
    CHECK(layer.plan(tight, T).nnz() == used);
    const auto dy = random_tokens<double>(g, T, d);
    row_matrix<double> dx_full(T, d), dx(T, d);
    auto g_full = layer.make_gradients();
    auto g_tight = layer.make_gradients();
    REQUIRE(layer.backward(ctx, x, dy, dx_full, g_full, full).ok());
    REQUIRE(layer.backward(ctx, x, dy, dx, g_tight, tight).ok());
    CHECK(dx == dx_full);
    CHECK(g_tight.experts.w1_storage() == g_full.experts.w1_storage());

    // A bound well below the slots used (the workspace holds at least the bound; alignment
    // padding may add a few slots, never tens): a clear error naming the slots and the bound.
    dmoe::workspace_buffer small(layer.workspace_size(dmoe::workspace_bounds{T, 1, used / 2}));
    const dmoe::status s = layer.forward(ctx, x, y, small);
    check_status(s, errc::workspace_too_small, {"routes", (std::to_string(used) + " slots").c_str(), "max_slots"});
    // ... and backward refuses that failed forward's state.
    check_status(layer.backward(ctx, x, dy, dx, g_tight, small), errc::invalid_argument, {"failed"});

    // max_slots_seen keeps the largest call: a smaller batch afterwards does not lower it.
    REQUIRE(layer.forward(ctx, dmoe::matrix_view<const double>(x.data(), 3, d), dmoe::matrix_view<double>(y.data(), 3, d), full, &st).ok());
    CHECK(st.slots < used);
    CHECK(st.max_slots_seen == used);
  }

  TEST_CASE("top_k: the slot bound is tokens * k, and a smaller workspace is refused up front") {
    const int d = 4, E = 4, T = 10;
    layer_t<float, dmoe::top_k, dmoe::relu> layer(config(d, E, 3), dmoe::top_k_options{2, true});
    layer.randomize(1);
    // A user bound is ignored for top-k (every token has exactly k slots).
    CHECK(layer.workspace_size(dmoe::workspace_bounds{T, 1, 3}) == layer.workspace_size(dmoe::workspace_bounds{T, 1}));
    test_rng g(6);
    const auto x = random_tokens<float>(g, T, d);
    row_matrix<float> y(T, d);
    const std::size_t need = layer.workspace_size(dmoe::workspace_bounds{T, 1});
    dmoe::workspace_buffer ws(need);
    check_status(layer.forward({}, x, y, dmoe::workspace{ws.view().data, need - 1}), errc::workspace_too_small,
                 {"workspace", "workspace_size"});
    CHECK(layer.forward({}, x, y, ws).ok());
  }
}
