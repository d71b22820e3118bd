// The README's IO snippet (a checkpoint's FFN in; an MoE layer to a file and back), compiled and
// run. tests/CMakeLists.txt checks that the block between the markers is the one in README.md.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <string>

// readme-io-begin
#include <dmoe/dmoe.hpp>
#include <dmoe/io/ffn_io.hpp>  // these two need the target dmoe::io
#include <dmoe/io/moe_io.hpp>

using moe_t = dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::gelu_erf>;

// Layer i's FFN from a BERT checkpoint; an MoE layer to a file and back (bit-exact in F32).
dmoe::dense_ffn<float, dmoe::gelu_erf> load_bert_ffn(const std::string& checkpoint, int i) {
  const auto file = dmoe::safetensors_file::from_path(checkpoint);  // validated; errors name the file
  return dmoe::load_dense_ffn<float, dmoe::gelu_erf>(file, dmoe::bert_ffn_names(i));
}
moe_t save_and_load(const moe_t& layer, const std::string& path) {
  dmoe::save_moe_layer(path, layer);
  return dmoe::load_moe_layer<moe_t>(path);  // checks policy, activation and every shape
}
// readme-io-end

namespace {
std::string fixture_path() {
  std::string f = __FILE__;  // .../tests/unit/io/test_readme_io_snippet.cpp
  for (int i = 0; i < 3; ++i) f = f.substr(0, f.find_last_of("/\\"));
  return f + "/data/minilm_l6_ffn.safetensors";
}
}  // namespace

TEST_SUITE("io") {
  TEST_CASE("README IO snippet: a BERT FFN loads and matches PyTorch, an MoE layer round-trips bit for bit") {
    const auto dense = load_bert_ffn(fixture_path(), 1);
    CHECK(dense.d_model() == 384);
    CHECK(dense.hidden() == 1536);
    const auto file = dmoe::safetensors_file::from_path(fixture_path());
    const dmoe::row_matrix<float> ref = file.read_matrix<float>("calibration.layer.1.ffn_output");
    const dmoe::row_matrix<float> x =
        file.read_matrix<float>("calibration.layer.1.ffn_input").topRows(ref.rows());
    const dmoe::context<dmoe::cpu> ctx{};
    const dmoe::row_matrix<float> y = dmoe::dense_output(ctx, dense, x);
    CHECK(double((y - ref).norm() / ref.norm()) < 1e-2);  // fp16-stored weights against the fp32 reference

    moe_t layer({12, 4, 6}, {0.3, 0});
    layer.randomize(9);
    const std::string path = "dmoe_readme_io_snippet.safetensors";
    const moe_t back = save_and_load(layer, path);
    std::remove(path.c_str());
    const dmoe::row_matrix<float> xs = dmoe::row_matrix<float>::Random(20, 12);
    dmoe::row_matrix<float> y1(20, 12), y2(20, 12);
    dmoe::workspace_buffer ws(layer.workspace_size(ctx, 20));
    REQUIRE(layer.forward(ctx, xs, y1, ws).ok());
    REQUIRE(back.forward(ctx, xs, y2, ws).ok());
    CHECK(std::memcmp(y1.data(), y2.data(), sizeof(float) * std::size_t(y1.size())) == 0);
    CHECK(back.router().options().tau == 0.3);
    CHECK(back.router().w_in() == layer.router().w_in());
  }
}
