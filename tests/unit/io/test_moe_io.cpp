// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// MoE layer save/load: for every policy, a random layer written and read back has bitwise equal
// parameters, options and mask, and gives bitwise equal forward outputs; mismatched layer types
// and inconsistent files are clear errors.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <dmoe/dmoe.hpp>
#include <dmoe/io/moe_io.hpp>

#include "test_random.hpp"

namespace {

using dmoe::index_t;
using dmoe::row_matrix;

template <class T>
bool same_bits(const T* a, const T* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(T)) == 0;
}
template <class M>
bool same_bits(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         same_bits(a.data(), b.data(), static_cast<std::size_t>(a.size()));
}

template <class Layer>
void expect_same_parameters(const Layer& a, const Layer& b) {
  using T = typename Layer::scalar_type;
  CHECK(a.config().d_model == b.config().d_model);
  CHECK(a.num_experts() == b.num_experts());
  CHECK(a.expert_width() == b.expert_width());
  CHECK(a.experts().shape() == b.experts().shape());
  const auto& ea = a.experts();
  const auto& eb = b.experts();
  for (index_t e = 0; e < a.num_experts(); ++e) {
    CHECK(same_bits(ea.w1(e), eb.w1(e)));
    CHECK(same_bits(ea.w2(e), eb.w2(e)));
    CHECK(same_bits(ea.b1(e), eb.b1(e)));
    CHECK(same_bits(ea.expert_bias(e), eb.expert_bias(e)));
  }
  CHECK(same_bits(ea.output_bias(), eb.output_bias()));
  using P = typename Layer::policy_type;
  const auto& ra = a.router();
  const auto& rb = b.router();
  if constexpr (std::is_same_v<P, dmoe::top_k>) {
    CHECK(same_bits(ra.weight(), rb.weight()));
    CHECK(same_bits(ra.bias(), rb.bias()));
    CHECK(ra.options().k == rb.options().k);
    CHECK(ra.options().renormalize == rb.options().renormalize);
  } else if constexpr (std::is_same_v<P, dmoe::dynamic_k>) {
    CHECK(same_bits(ra.w_in(), rb.w_in()));
    CHECK(same_bits(ra.w_out(), rb.w_out()));
    CHECK(ra.options().tau == rb.options().tau);
    CHECK(ra.options().k_max == rb.options().k_max);
  } else {
    CHECK(same_bits(ra.weight(), rb.weight()));
    CHECK(same_bits(ra.threshold(), rb.threshold()));
    CHECK(ra.active() == rb.active());
    CHECK(ra.options().training == rb.options().training);
  }
  (void)sizeof(T);
}

template <class Layer>
row_matrix<typename Layer::scalar_type> run(const Layer& layer, const row_matrix<typename Layer::scalar_type>& x) {
  using T = typename Layer::scalar_type;
  row_matrix<T> y(x.rows(), x.cols());
  dmoe::context<dmoe::cpu> ctx{};
  dmoe::workspace_buffer ws(layer.workspace_size(ctx, x.rows()));
  const auto s = layer.forward(ctx, x, y, ws);
  REQUIRE_MESSAGE(s.ok(), std::string(s.message()));
  return y;
}

template <class Layer>
void round_trip(const dmoe::moe_config& cfg, const typename Layer::options_type& opt, std::uint64_t seed) {
  using T = typename Layer::scalar_type;
  Layer layer(cfg, opt);
  layer.randomize(seed);
  dmoe_testing::splitmix g(seed, 0x9e37, 0x60);
  dmoe_testing::fill_experts_uniform(layer.experts(), g);
  if constexpr (std::is_same_v<typename Layer::policy_type, dmoe::top_any>) {
    for (index_t e = 0; e < layer.num_experts(); ++e) layer.router().threshold()(e) = T(g.uniform(-0.2, 0.2));
    layer.router().active()[0] = 0;  // a free slot must come back free
  } else if constexpr (std::is_same_v<typename Layer::policy_type, dmoe::top_k>) {
    for (index_t e = 0; e < layer.num_experts(); ++e) layer.router().bias()(e) = T(g.uniform(-0.5, 0.5));
  }
  dmoe::safetensors_writer w;
  dmoe::save_moe_layer(w, layer);
  const auto file = dmoe::safetensors_file::from_bytes(w.to_bytes(), "layer.safetensors");
  for (const auto& t : file.tensors())
    if (t.name != "router.active") CHECK(t.dtype == dmoe::native_dtype<T>);
  const Layer back = dmoe::load_moe_layer<Layer>(file);
  expect_same_parameters(layer, back);
  row_matrix<T> x(29, cfg.d_model);
  for (index_t t = 0; t < x.rows(); ++t)
    for (index_t i = 0; i < x.cols(); ++i) x(t, i) = T(g.uniform(-1.0, 1.0));
  const auto y0 = run(layer, x), y1 = run(back, x);
  CHECK(same_bits(y0, y1));
}

}  // namespace

TEST_SUITE("io") {

TEST_CASE("moe io: every policy round-trips bit-exactly (parameters, options, mask, forward)") {
  dmoe::moe_config cfg{12, 5, 7};
  round_trip<dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::gelu_erf>>(cfg, {3, false}, 1);
  round_trip<dmoe::moe_layer<double, dmoe::cpu, dmoe::top_k, dmoe::relu>>(cfg, {2, true}, 2);
  cfg.router_hidden = 9;
  round_trip<dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::gelu_erf>>(cfg, {0.3141592653589793, 3}, 3);
  round_trip<dmoe::moe_layer<double, dmoe::cpu, dmoe::dynamic_k, dmoe::swiglu>>(cfg, {0.7, 0}, 4);
  cfg.expert_bias = true;
  cfg.output_bias = false;
  round_trip<dmoe::moe_layer<float, dmoe::cpu, dmoe::top_any, dmoe::silu>>(cfg, {true}, 5);
  cfg.hidden_bias = false;
  round_trip<dmoe::moe_layer<double, dmoe::cpu, dmoe::top_any, dmoe::geglu>>(cfg, {false}, 6);
  round_trip<dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::gelu_tanh, 5, 7>>(cfg, {1, true}, 7);
}

TEST_CASE("moe io: file on disk, metadata contents, 16-bit storage, and a float file into a double layer") {
  using layer_f = dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::relu>;
  using layer_d = dmoe::moe_layer<double, dmoe::cpu, dmoe::dynamic_k, dmoe::relu>;
  dmoe::moe_config cfg{8, 4, 6};
  cfg.router_hidden = 5;
  layer_f layer(cfg, {0.25, 2});
  layer.randomize(9);
  const std::string path = "dmoe_io_test_layer.safetensors";
  dmoe::save_moe_layer(path, layer);
  const auto f = dmoe::safetensors_file::from_path(path);
  CHECK(f.metadata_value("dmoe.policy") == "dynamic_k");
  CHECK(f.metadata_value("dmoe.activation") == "relu");
  CHECK(f.metadata_value("dmoe.scalar") == "float");
  CHECK(f.metadata_value("dmoe.format_version") == "1");
  CHECK(f.metadata_value("dmoe.dynamic_k.tau") == "0.25");
  CHECK(f.info("experts.w1").shape == std::vector<std::int64_t>{4, 6, 8});
  CHECK(f.info("experts.w2").shape == std::vector<std::int64_t>{4, 8, 6});
  CHECK(f.info("router.w_in").shape == std::vector<std::int64_t>{5, 8});
  CHECK(f.info("router.w_out").shape == std::vector<std::int64_t>{4, 5});
  CHECK_FALSE(f.has("experts.expert_bias"));
  // (out, in) layout: experts.w1[e][j][i] is the weight of input i into neuron j of expert e.
  const auto w1 = f.read<float>("experts.w1");
  CHECK(w1[std::size_t((2 * 6 + 3) * 8 + 5)] == layer.experts().w1(2)(5, 3));
  const auto back = dmoe::load_moe_layer<layer_f>(path);
  expect_same_parameters(layer, back);
  std::remove(path.c_str());

  // A float file loads into a double layer with the same values.
  dmoe::safetensors_writer w;
  dmoe::save_moe_layer(w, layer);
  const auto as_double = dmoe::load_moe_layer<layer_d>(dmoe::safetensors_file::from_bytes(w.to_bytes()));
  CHECK(as_double.experts().w2(1).template cast<float>() == layer.experts().w2(1));
  CHECK(as_double.router().options().k_max == 2);

  // BF16 storage rounds (relative 2^-9), and the forward stays close.
  dmoe::safetensors_writer wb;
  dmoe::save_moe_layer(wb, layer, dmoe::st_dtype::BF16);
  const auto fb = dmoe::safetensors_file::from_bytes(wb.to_bytes());
  CHECK(fb.info("experts.w1").dtype == dmoe::st_dtype::BF16);
  const auto lb = dmoe::load_moe_layer<layer_f>(fb);
  const float diff = (lb.experts().w1(0) - layer.experts().w1(0)).cwiseAbs().maxCoeff();
  CHECK(diff > 0.0f);
  CHECK(diff <= layer.experts().w1(0).cwiseAbs().maxCoeff() * 0x1p-8f);
}

TEST_CASE("moe io: the weight storage is recorded and restored; a BF16 file holds what bf16 kernels read") {
  using layer_f = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::swiglu>;
  using layer_d = dmoe::moe_layer<double, dmoe::cpu, dmoe::top_k, dmoe::swiglu>;
  dmoe::moe_config cfg{40, 5, 24};
  layer_f layer(cfg, {2, true});
  layer.randomize(11);
  dmoe::row_matrix<float> x = dmoe::row_matrix<float>::Random(7, 40), y16(7, 40), y(7, 40);
  dmoe::workspace_buffer ws(layer.workspace_size({}, 7));
  for (auto s : {dmoe::weight_storage::bf16, dmoe::weight_storage::f16}) {
    CAPTURE(dmoe::to_string(s));
    layer.set_weight_storage(s);
    REQUIRE(layer.forward({}, x, y16, ws).ok());
    dmoe::safetensors_writer w;
    dmoe::save_moe_layer(w, layer);  // F32 tensors: the master weights, losslessly
    const auto f = dmoe::safetensors_file::from_bytes(w.to_bytes());
    CHECK(f.metadata_value("dmoe.weight_storage") == dmoe::to_string(s));
    const auto back = dmoe::load_moe_layer<layer_f>(f);
    CHECK(back.weight_storage() == s);
    expect_same_parameters(layer, back);
    REQUIRE(back.forward({}, x, y, ws).ok());
    CHECK(y == y16);
    CHECK(dmoe::load_moe_layer<layer_d>(f).weight_storage() == dmoe::weight_storage::f32);
    // Tensors in the storage's own dtype hold exactly the values the kernels multiply by.
    const auto dt = s == dmoe::weight_storage::bf16 ? dmoe::st_dtype::BF16 : dmoe::st_dtype::F16;
    dmoe::safetensors_writer w16;
    dmoe::save_moe_layer(w16, layer, dt);
    const auto rounded = dmoe::load_moe_layer<layer_f>(dmoe::safetensors_file::from_bytes(w16.to_bytes()));
    for (dmoe::index_t e = 0; e < 5; ++e)
      for (dmoe::index_t i = 0; i < 40; ++i)
        for (dmoe::index_t j = 0; j < 48; ++j) {
          const float v = layer.experts().w1(e)(i, j);
          const float want = s == dmoe::weight_storage::bf16 ? dmoe::detail::cpu_backend::round_through<dmoe::detail::cpu_backend::bf16_t>(v)
                                                             : dmoe::detail::cpu_backend::round_through<dmoe::detail::cpu_backend::f16_t>(v);
          REQUIRE(rounded.experts().w1(e)(i, j) == want);
        }
  }
  // A storage name no version writes is refused, naming the key.
  dmoe::safetensors_writer w;
  dmoe::save_moe_layer(w, layer);
  w.set_metadata("dmoe.weight_storage", "fp8");
  try {
    (void)dmoe::load_moe_layer<layer_f>(dmoe::safetensors_file::from_bytes(w.to_bytes()));
    FAIL("loaded a layer with weight_storage fp8");
  } catch (const dmoe::error& e) {
    CHECK(std::string(e.what()).find("dmoe.weight_storage") != std::string::npos);
  }
}

TEST_CASE("moe io: loading into another policy, activation or extent, or from an inconsistent file, is an error") {
  using topk = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu>;
  dmoe::moe_config cfg{6, 4, 3};
  topk layer(cfg, {2, true});
  layer.randomize(3);
  dmoe::safetensors_writer w;
  dmoe::save_moe_layer(w, layer);
  const auto good = w.to_bytes();
  const auto f = dmoe::safetensors_file::from_bytes(good, "topk.safetensors");
  auto expect = [](auto load, const std::string& what) {
    INFO("expected an error containing: ", what);
    try {
      load();
      FAIL("no error");
    } catch (const dmoe::error& e) {
      INFO("message: ", e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
  };
  expect([&] { (void)dmoe::load_moe_layer<dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::relu>>(f); },
         "load_moe_layer 'topk.safetensors': metadata 'dmoe.policy' is 'top_k' but the layer type has 'dynamic_k'");
  expect([&] { (void)dmoe::load_moe_layer<dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::gelu_erf>>(f); },
         "metadata 'dmoe.activation' is 'relu' but the layer type has 'gelu_erf'");
  expect([&] { (void)dmoe::load_moe_layer<dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu, 8>>(f); },
         "load_moe_layer 'topk.safetensors': moe_layer: config.num_experts = 4 does not fit");

  // Rebuild the file with one tensor or metadata entry changed.
  auto variant = [&](const std::string& tensor, std::vector<std::int64_t> shape, const std::string& key,
                     const std::string& value) {
    dmoe::safetensors_writer v;
    for (const auto& t : f.tensors()) {
      if (t.name == tensor) {
        if (shape.empty()) continue;  // dropped
        std::size_t n = 1;
        for (auto s : shape) n *= std::size_t(s);
        v.add(t.name, dmoe::st_dtype::F32, shape, std::vector<float>(n, 0.0f));
      } else {
        v.add(t.name, t.dtype, t.shape, f.read<double>(t.name));
      }
    }
    for (const auto& kv : f.metadata()) v.set_metadata(kv.first, kv.first == key ? value : kv.second);
    return dmoe::safetensors_file::from_bytes(v.to_bytes(), "variant.safetensors");
  };
  using shape_t = std::vector<std::int64_t>;
  CHECK_NOTHROW((void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "", "")));
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("router.weight", shape_t{6, 4}, "", "")); },
         "tensor 'router.weight' has shape [6, 4], expected [4, 6]");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("experts.w1", shape_t{}, "", "")); },
         "no tensor named 'experts.w1'");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.num_experts", "5")); },
         "tensor 'experts.w1' has shape [4, 3, 6], expected [5, 3, 6]");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.d_model", "six")); },
         "metadata 'dmoe.d_model' = 'six', expected an integer");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.top_k.k", "9")); },
         "variant.safetensors': top_k_router: k must be in [1, num_experts = 4], got k = 9");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.top_k.renormalize", "yes")); },
         "metadata 'dmoe.top_k.renormalize' = 'yes', expected true or false");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.format_version", "2")); },
         "metadata 'dmoe.format_version' is '2' but the layer type has '1'");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.output_bias", "false")); },
         "tensor 'experts.output_bias' is present but the recorded configuration has no such bias");
  // Sizes in the metadata are checked against the tensors before anything is allocated.
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.d_model", "1000000000000")); },
         "'experts.w1' has shape [4, 3, 6], expected [4, 3, 1000000000000]");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.num_experts", "-4")); },
         "metadata 'dmoe.num_experts' = -4, expected a positive size");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.expert_width", "9223372036854775807")); },
         "metadata 'dmoe.expert_width' = 9223372036854775807, expected a positive size");
  expect([&] { (void)dmoe::load_moe_layer<topk>(variant("", shape_t{}, "dmoe.d_model", "99999999999999999999")); },
         "metadata 'dmoe.d_model' = '99999999999999999999', expected an integer");
  const auto plain = dmoe::safetensors_file::from_bytes(dmoe::safetensors_writer{}.to_bytes(), "plain.safetensors");
  expect([&] { (void)dmoe::load_moe_layer<topk>(plain); }, "metadata key 'dmoe.format' is missing");

  // top-any: the mask must be U8 zeros and ones.
  using topany = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_any, dmoe::relu>;
  topany ta(cfg, {});
  ta.randomize(4);
  dmoe::safetensors_writer wa;
  dmoe::save_moe_layer(wa, ta);
  const auto fa = dmoe::safetensors_file::from_bytes(wa.to_bytes());
  CHECK(fa.info("router.active").dtype == dmoe::st_dtype::U8);
  auto mask_variant = [&](dmoe::st_dtype dt, float value) {
    dmoe::safetensors_writer v;
    for (const auto& t : fa.tensors())
      if (t.name == "router.active") v.add(t.name, dt, t.shape, std::vector<float>(4, value));
      else v.add(t.name, t.dtype, t.shape, fa.read<double>(t.name));
    for (const auto& kv : fa.metadata()) v.set_metadata(kv.first, kv.second);
    return dmoe::safetensors_file::from_bytes(v.to_bytes(), "mask.safetensors");
  };
  CHECK(dmoe::load_moe_layer<topany>(mask_variant(dmoe::st_dtype::U8, 0.0f)).router().num_active() == 0);
  expect([&] { (void)dmoe::load_moe_layer<topany>(mask_variant(dmoe::st_dtype::F32, 1.0f)); },
         "tensor 'router.active' has dtype F32, expected U8");
  expect([&] { (void)dmoe::load_moe_layer<topany>(mask_variant(dmoe::st_dtype::U8, 2.0f)); },
         "router.active[0] = 2, expected 0 or 1");
}

}  // TEST_SUITE
