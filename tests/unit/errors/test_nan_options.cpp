// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// NaN and infinite option values are refused where they are set, with a message naming the value:
// top-any thresholds (a NaN one silently disabled its expert), dynamic-k tau, optimizer
// hyperparameters (set at construction, or later through options()), the conversion fits'
// optimizer options, and auxiliary-loss weights. The load path is tested in
// tests/unit/io/test_io_bad_input.cpp.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <dmoe/dmoe.hpp>

namespace {

using dmoe::index_t;
constexpr double nan_d = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_d = std::numeric_limits<double>::infinity();

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

/// Runs f, which must throw dmoe::error with code `code` and a message containing every part.
template <class F>
void expect_error(F&& f, dmoe::errc code, std::initializer_list<const char*> parts) {
  bool thrown = false;
  try {
    f();
  } catch (const dmoe::error& e) {
    thrown = true;
    const std::string msg = e.what();
    CAPTURE(msg);
    CHECK(e.code() == code);
    for (const char* p : parts) CHECK_MESSAGE(contains(msg, p), p);
  }
  CHECK_MESSAGE(thrown, "no dmoe::error thrown");
}
void expect_status(const dmoe::status& s, dmoe::errc code, std::initializer_list<const char*> parts) {
  const std::string msg = s.message();
  CAPTURE(msg);
  REQUIRE(!s.ok());
  CHECK(s.code() == code);
  for (const char* p : parts) CHECK_MESSAGE(contains(msg, p), p);
}

}  // namespace

TEST_SUITE("errors") {
  TEST_CASE("errors: top_any thresholds: NaN and infinity refused when set, checked when written directly") {
    dmoe::top_any_router<float> r(6, 4);
    r.set_threshold(2, 0.25f);
    CHECK(r.threshold()[2] == 0.25f);
    CHECK(r.check_thresholds().ok());
    const float nan_f = std::numeric_limits<float>::quiet_NaN(), inf_f = std::numeric_limits<float>::infinity();
    expect_error([&] { r.set_threshold(1, nan_f); }, dmoe::errc::invalid_argument,
                 {"set_threshold", "g[1] is NaN", "silently disable expert 1"});
    expect_error([&] { r.set_threshold(3, inf_f); }, dmoe::errc::invalid_argument,
                 {"set_threshold", "g[3] = inf is infinite", "g >= 1 never fires"});
    expect_error([&] { r.set_threshold(0, -inf_f); }, dmoe::errc::invalid_argument, {"g[0] = -inf is infinite"});
    expect_error([&] { r.set_threshold(4, 0.0f); }, dmoe::errc::invalid_argument,
                 {"expert 4 is not in [0, num_experts = 4)"});
    expect_error([&] { r.set_threshold(-1, 0.0f); }, dmoe::errc::invalid_argument, {"expert -1"});
    CHECK(r.threshold()[1] == 0.0f);  // refused values never land
    CHECK(r.threshold()[3] == 0.0f);

    dmoe::column_vector<float> g(4);
    g << 0.1f, -0.2f, nan_f, 0.3f;
    expect_error([&] { r.set_thresholds(g); }, dmoe::errc::invalid_argument, {"set_thresholds", "g[2] is NaN"});
    CHECK(r.threshold()[0] == 0.0f);  // all or nothing
    CHECK(r.threshold()[2] == 0.25f);
    expect_error([&] { r.set_thresholds(dmoe::column_vector<float>::Zero(3)); }, dmoe::errc::invalid_argument,
                 {"3 values for num_experts = 4"});
    g[2] = 0.5f;
    r.set_thresholds(g);
    CHECK(r.threshold() == g);

    // threshold() is a writable parameter (an optimizer writes it): check_thresholds reports it.
    r.threshold()[3] = nan_f;
    expect_status(r.check_thresholds(), dmoe::errc::numerical_error, {"threshold g[3] = nan is not finite"});
    r.threshold()[3] = 0.0f;
    r.threshold()[0] = -inf_f;
    expect_status(r.check_thresholds(), dmoe::errc::numerical_error, {"g[0] = -inf"});
  }

  TEST_CASE("errors: dynamic_k tau: NaN and infinity refused at construction and when set") {
    expect_error([] { dmoe::dynamic_k_router<float> r(4, 3, {nan_d, 0}); }, dmoe::errc::invalid_argument,
                 {"tau must be in [0, 1], got nan"});
    using layer_t = dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::relu>;
    expect_error([] { layer_t l({4, 3, 2}, {inf_d, 0}); }, dmoe::errc::invalid_argument, {"got inf"});
    layer_t l({4, 3, 2}, {0.5, 0});
    expect_error([&] { l.router().set_tau(nan_d); }, dmoe::errc::invalid_argument, {"tau", "nan"});
    expect_error([&] { l.router().set_options({-inf_d, 2}); }, dmoe::errc::invalid_argument, {"got -inf"});
    CHECK(l.router().options().tau == 0.5);  // unchanged
  }

  TEST_CASE("errors: optimizer hyperparameters: NaN, infinity and out-of-range refused") {
    std::vector<float> p(3, 1.0f), gbuf(3, 0.5f);
    const dmoe::param_list<float> params = {{"p", p.data(), 3}}, grads = {{"g", gbuf.data(), 3}};
    expect_error([&] { dmoe::adamw<float> o(params, {nan_d, 0.9, 0.999, 1e-8, 0.0}); }, dmoe::errc::invalid_argument,
                 {"adamw: lr must be finite and >= 0, got nan"});
    expect_error([&] { dmoe::adamw<float> o(params, {1e-3, 1.0, 0.999, 1e-8, 0.0}); }, dmoe::errc::invalid_argument,
                 {"adamw: beta1 must be finite and in [0, 1), got 1"});
    expect_error([&] { dmoe::adamw<float> o(params, {1e-3, 0.9, nan_d, 1e-8, 0.0}); }, dmoe::errc::invalid_argument,
                 {"beta2", "got nan"});
    expect_error([&] { dmoe::adamw<float> o(params, {1e-3, 0.9, 0.999, 0.0, 0.0}); }, dmoe::errc::invalid_argument,
                 {"adamw: eps must be finite and > 0, got 0"});
    expect_error([&] { dmoe::adamw<float> o(params, {1e-3, 0.9, 0.999, 1e-8, inf_d}); }, dmoe::errc::invalid_argument,
                 {"weight_decay", "got inf"});
    expect_error([&] { dmoe::sgd<float> o(params, {inf_d, 0.9, 0.0}); }, dmoe::errc::invalid_argument,
                 {"sgd: lr must be finite and >= 0, got inf"});
    expect_error([&] { dmoe::sgd<float> o(params, {0.1, nan_d, 0.0}); }, dmoe::errc::invalid_argument,
                 {"sgd: momentum", "got nan"});
    expect_error([&] { dmoe::sgd<float> o(params, {0.1, 0.5, -1.0}); }, dmoe::errc::invalid_argument,
                 {"sgd: weight_decay must be finite and >= 0, got -1"});

    // options() is writable: step() checks again and changes nothing on a bad value.
    dmoe::adamw<float> a(params);
    a.options().lr = nan_d;
    expect_status(a.step(grads), dmoe::errc::invalid_argument, {"adamw: lr", "nan"});
    CHECK(p == std::vector<float>(3, 1.0f));
    CHECK(a.steps() == 0);
    a.options().lr = 1e-2;
    CHECK(a.step(grads).ok());
    CHECK(p[0] < 1.0f);
    dmoe::sgd<float> s(params);
    s.options().momentum = nan_d;
    const std::vector<float> before = p;
    expect_status(s.step(grads), dmoe::errc::invalid_argument, {"sgd: momentum"});
    CHECK(p == before);
  }

  TEST_CASE("errors: conversion fits refuse NaN optimizer options before doing any work") {
    dmoe::dynamic_k_router<float> r(4, 3, {0.5, 0}, 8);
    const dmoe::row_matrix<float> x = dmoe::row_matrix<float>::Random(16, 4);
    const dmoe::row_matrix<float> t = dmoe::row_matrix<float>::Random(16, 3).cwiseAbs();
    dmoe::router_fit_options o;
    o.optimizer.lr = nan_d;
    expect_error([&] { (void)dmoe::fit_router<float>(r, x, t, o); }, dmoe::errc::invalid_argument,
                 {"fit_router: options.optimizer: adamw: lr must be finite and >= 0, got nan"});
    CHECK(r.w_in().isZero(0));  // refused before the router was touched
    dmoe::attention_mlp_options ao;
    ao.sparsity_weight = inf_d;
    const dmoe::col_matrix<float> w = dmoe::col_matrix<float>::Random(4, 4);
    const dmoe::column_vector<float> b = dmoe::column_vector<float>::Zero(4);
    expect_error([&] { (void)dmoe::fit_attention_mlp(w, b, x, ao); }, dmoe::errc::invalid_argument,
                 {"sparsity_weight = inf must be finite"});
    ao.sparsity_weight = 0.0;
    ao.optimizer.beta2 = nan_d;
    expect_error([&] { (void)dmoe::fit_attention_mlp(w, b, x, ao); }, dmoe::errc::invalid_argument,
                 {"fit_attention_mlp: options.optimizer: adamw: beta2"});
  }

  TEST_CASE("errors: auxiliary-loss weights: NaN, infinity and negative values named") {
    dmoe::aux_losses w;
    CHECK(dmoe::check_aux_weights(w).ok());
    w.load_balance = 0.01;
    w.efficiency = 2.0;
    CHECK(dmoe::check_aux_weights(w).ok());
    w.balance = nan_d;
    expect_status(dmoe::check_aux_weights(w), dmoe::errc::invalid_argument,
                  {"aux_losses: weight balance must be finite and >= 0, got nan"});
    w.balance = 0;
    w.z_loss = inf_d;
    expect_status(dmoe::check_aux_weights(w), dmoe::errc::invalid_argument, {"weight z_loss", "inf"});
    w.z_loss = -0.5;
    expect_status(dmoe::check_aux_weights(w), dmoe::errc::invalid_argument, {"weight z_loss", "got -0.5"});
  }
}
