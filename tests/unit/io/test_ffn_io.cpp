// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Dense FFN loading by tensor name: checkpoints in BERT (nn.Linear, (out, in)), GPT-2 (Conv1D,
// (in, out)) and LLaMA (gated, no biases) naming are built here element by element, loaded,
// and the loaded FFN's forward is compared with a plain-loop forward over the checkpoint's own
// arrays. Also save/load round trips, shape errors, and the MiniLM fixture when present.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <dmoe/dmoe.hpp>
#include <dmoe/io/ffn_io.hpp>

#include "test_random.hpp"

namespace {

using dmoe::index_t;
using dmoe::row_matrix;

/// A checkpoint FFN as plain arrays in the math convention: w1[i][o] input i -> hidden o,
/// w2[o][j] hidden o -> output j (and wg for the gate of gated FFNs).
struct plain_ffn {
  int d = 0, F = 0;
  std::vector<double> w1, wg, b1, w2, b2;  // w1, wg: d*F (i*F+o); w2: F*d (o*d+j)
};

plain_ffn random_plain(dmoe_testing::splitmix& g, int d, int F, bool gated, bool biases) {
  plain_ffn p;
  p.d = d;
  p.F = F;
  auto fill = [&](std::vector<double>& v, std::size_t n, double a) {
    v.resize(n);
    for (auto& x : v) x = g.uniform(-a, a);
  };
  fill(p.w1, std::size_t(d * F), 1.0 / std::sqrt(double(d)));
  if (gated) fill(p.wg, std::size_t(d * F), 1.0 / std::sqrt(double(d)));
  fill(p.w2, std::size_t(F * d), 1.0 / std::sqrt(double(F)));
  if (biases) {
    fill(p.b1, std::size_t(F), 0.5);
    fill(p.b2, std::size_t(d), 0.5);
  }
  return p;
}

double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double silu(double x) { return x / (1.0 + std::exp(-x)); }

/// y = act(x W1 + b1) W2 + b2 (gated: silu(x Wg) * (x W1)), plain loops in double.
std::vector<double> plain_forward(const plain_ffn& p, const std::vector<double>& x, int tokens) {
  std::vector<double> y(std::size_t(tokens * p.d));
  std::vector<double> h(std::size_t(p.F));
  for (int t = 0; t < tokens; ++t) {
    for (int o = 0; o < p.F; ++o) {
      double a = p.b1.empty() ? 0.0 : p.b1[std::size_t(o)], gsum = 0.0;
      for (int i = 0; i < p.d; ++i) {
        a += x[std::size_t(t * p.d + i)] * p.w1[std::size_t(i * p.F + o)];
        if (!p.wg.empty()) gsum += x[std::size_t(t * p.d + i)] * p.wg[std::size_t(i * p.F + o)];
      }
      h[std::size_t(o)] = p.wg.empty() ? gelu(a) : silu(gsum) * a;
    }
    for (int j = 0; j < p.d; ++j) {
      double s = p.b2.empty() ? 0.0 : p.b2[std::size_t(j)];
      for (int o = 0; o < p.F; ++o) s += h[std::size_t(o)] * p.w2[std::size_t(o * p.d + j)];
      y[std::size_t(t * p.d + j)] = s;
    }
  }
  return y;
}

/// Stores an (in x out) math matrix m[i*out+o] as the checkpoint does.
std::vector<double> stored(const std::vector<double>& m, int in, int out, dmoe::weight_layout layout,
                           std::vector<std::int64_t>& shape) {
  if (layout == dmoe::weight_layout::in_out) {
    shape = {in, out};
    return m;
  }
  shape = {out, in};
  std::vector<double> t(m.size());
  for (int i = 0; i < in; ++i)
    for (int o = 0; o < out; ++o) t[std::size_t(o * in + i)] = m[std::size_t(i * out + o)];
  return t;
}

void write_plain(dmoe::safetensors_writer& w, const plain_ffn& p, const dmoe::ffn_names& n, dmoe::st_dtype dt) {
  std::vector<std::int64_t> shape;
  auto v = stored(p.w1, p.d, p.F, n.layout, shape);
  w.add(n.w1, dt, shape, v);
  if (!p.wg.empty()) {
    v = stored(p.wg, p.d, p.F, n.layout, shape);
    w.add(n.w_gate, dt, shape, v);
  }
  v = stored(p.w2, p.F, p.d, n.layout, shape);
  w.add(n.w2, dt, shape, v);
  if (!n.b1.empty()) w.add(n.b1, dt, {p.F}, p.b1);
  if (!n.b2.empty()) w.add(n.b2, dt, {p.d}, p.b2);
}

template <class Act>
double max_error_vs_plain(const dmoe::dense_ffn<float, Act>& ffn, const plain_ffn& p, dmoe_testing::splitmix& g) {
  const int tokens = 37;
  std::vector<double> x(std::size_t(tokens * p.d));
  for (auto& v : x) v = g.uniform(-1.0, 1.0);
  row_matrix<float> xm(tokens, p.d), y(tokens, p.d);
  for (int t = 0; t < tokens; ++t)
    for (int i = 0; i < p.d; ++i) xm(t, i) = float(x[std::size_t(t * p.d + i)]);
  for (auto& v : x) v = double(float(v));
  dmoe::context<dmoe::cpu> ctx{};
  dmoe::workspace_buffer ws(ffn.workspace_size(ctx, tokens));
  const auto s = ffn.forward(ctx, xm, y, ws);
  REQUIRE_MESSAGE(s.ok(), std::string(s.message()));
  const auto ref = plain_forward(p, x, tokens);
  double err = 0.0;
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < p.d; ++j) err = (std::max)(err, std::fabs(double(y(t, j)) - ref[std::size_t(t * p.d + j)]));
  return err;
}

std::string fixture_path() {
  std::string f = __FILE__;  // .../tests/unit/io/test_ffn_io.cpp
  for (int i = 0; i < 3; ++i) f = f.substr(0, f.find_last_of("/\\"));
  return f + "/data/minilm_l6_ffn.safetensors";
}

}  // namespace

TEST_SUITE("io") {

TEST_CASE("ffn io: BERT, GPT-2 and LLaMA naming load into a dense FFN equal to the plain forward") {
  dmoe_testing::splitmix g(21, 0x9e37, 0x40);
  for (int c = 0; c < 6; ++c) {
    const int d = g.integer(1, 24), F = g.integer(1, 40), layer = g.integer(0, 11);
    INFO("case ", c, " d=", d, " F=", F, " layer=", layer);
    {
      const auto names = dmoe::bert_ffn_names(layer, c % 2 ? "bert." : "");
      CHECK(names.w1 == (c % 2 ? "bert." : "") + std::string("encoder.layer.") + std::to_string(layer) +
                            ".intermediate.dense.weight");
      CHECK(names.w2.find(".output.dense.weight") != std::string::npos);
      const auto p = random_plain(g, d, F, false, true);
      dmoe::safetensors_writer w;
      write_plain(w, p, names, dmoe::st_dtype::F32);
      w.add("embeddings.word_embeddings.weight", dmoe::st_dtype::F32, {2, 1}, std::vector<float>{1, 2});  // unrelated
      const auto f = dmoe::safetensors_file::from_bytes(w.to_bytes());
      const auto ffn = dmoe::load_dense_ffn<float, dmoe::gelu_erf>(f, names);
      CHECK(ffn.d_model() == d);
      CHECK(ffn.hidden() == F);
      CHECK(max_error_vs_plain(ffn, p, g) < 1e-4);
    }
    {
      const auto names = dmoe::gpt2_ffn_names(layer, c % 2 ? "transformer." : "");
      CHECK(names.w1 == (c % 2 ? "transformer." : "") + std::string("h.") + std::to_string(layer) + ".mlp.c_fc.weight");
      CHECK(names.layout == dmoe::weight_layout::in_out);
      const auto p = random_plain(g, d, F, false, true);
      dmoe::safetensors_writer w;
      write_plain(w, p, names, dmoe::st_dtype::F32);
      const auto ffn = dmoe::load_dense_ffn<float, dmoe::gelu_erf>(dmoe::safetensors_file::from_bytes(w.to_bytes()), names);
      CHECK(max_error_vs_plain(ffn, p, g) < 1e-4);
    }
    {
      const auto names = dmoe::llama_ffn_names(layer, "model.");
      CHECK(names.w_gate == "model.layers." + std::to_string(layer) + ".mlp.gate_proj.weight");
      const auto p = random_plain(g, d, F, true, false);
      dmoe::safetensors_writer w;
      write_plain(w, p, names, dmoe::st_dtype::F32);
      const auto ffn = dmoe::load_dense_ffn<float, dmoe::swiglu>(dmoe::safetensors_file::from_bytes(w.to_bytes()), names);
      CHECK(ffn.hidden() == F);
      CHECK(max_error_vs_plain(ffn, p, g) < 1e-4);
    }
  }
}

TEST_CASE("ffn io: save_dense_ffn then load_dense_ffn is exact in F32/F64, within rounding in F16") {
  dmoe_testing::splitmix g(22, 0x9e37, 0x50);
  dmoe::dense_ffn<double, dmoe::gelu_erf> src(7, 13);
  src.randomize(5);
  for (auto names : {dmoe::bert_ffn_names(2), dmoe::gpt2_ffn_names(0, "transformer.")}) {
    dmoe::safetensors_writer w;
    dmoe::save_dense_ffn(w, src, names);
    CHECK(w.has(names.w1));
    const auto f = dmoe::safetensors_file::from_bytes(w.to_bytes());
    CHECK(f.info(names.w1).dtype == dmoe::st_dtype::F64);
    const auto back = dmoe::load_dense_ffn<double, dmoe::gelu_erf>(f, names);
    CHECK(back.w1() == src.w1());
    CHECK(back.b1() == src.b1());
    CHECK(back.w2() == src.w2());
    CHECK(back.b2() == src.b2());
  }
  dmoe::dense_ffn<float, dmoe::swiglu> gated(5, 6);
  gated.randomize(6);
  gated.b2().setZero();
  auto names = dmoe::llama_ffn_names(1);
  names.b1 = "layers.1.mlp.b1";  // biases are optional per name
  dmoe::safetensors_writer w;
  dmoe::save_dense_ffn(w, gated, names, dmoe::st_dtype::F16);
  const auto f = dmoe::safetensors_file::from_bytes(w.to_bytes());
  CHECK(f.info(names.w_gate).shape == std::vector<std::int64_t>{6, 5});
  CHECK(f.info(names.w2).shape == std::vector<std::int64_t>{5, 6});
  const auto back = dmoe::load_dense_ffn<float, dmoe::swiglu>(f, names);
  CHECK((back.w1() - gated.w1()).cwiseAbs().maxCoeff() <= 1e-3f);  // |w| < 1: half step 2^-11
  CHECK((back.w1() - gated.w1()).cwiseAbs().maxCoeff() > 0.0f);    // it did round
  CHECK((back.b1() - gated.b1()).cwiseAbs().maxCoeff() <= 1e-3f);
  CHECK(back.b2().isZero());
  (void)g;
}

TEST_CASE("ffn io: wrong shapes, missing tensors and gated/non-gated mix-ups are clear errors") {
  dmoe::dense_ffn<float, dmoe::relu> src(4, 6);
  src.randomize(1);
  const auto names = dmoe::bert_ffn_names(0);
  auto build = [&](const std::string& replace, std::vector<std::int64_t> shape) {
    dmoe::safetensors_writer w;
    dmoe::safetensors_writer tmp;
    dmoe::save_dense_ffn(tmp, src, names);
    const auto full = dmoe::safetensors_file::from_bytes(tmp.to_bytes());
    for (const auto& t : full.tensors()) {
      if (t.name == replace) {
        std::size_t n = 1;
        for (auto s : shape) n *= std::size_t(s);
        w.add(t.name, dmoe::st_dtype::F32, shape, std::vector<float>(n, 0.5f));
      } else {
        w.add(t.name, dmoe::st_dtype::F32, t.shape, full.read<float>(t.name));
      }
    }
    return dmoe::safetensors_file::from_bytes(w.to_bytes(), "ckpt.safetensors");
  };
  using shape_t = std::vector<std::int64_t>;
  auto expect = [&](const dmoe::safetensors_file& f, const dmoe::ffn_names& n, bool gated, const std::string& what) {
    INFO("expected an error containing: ", what);
    try {
      if (gated) (void)dmoe::load_dense_ffn<float, dmoe::swiglu>(f, n);
      else (void)dmoe::load_dense_ffn<float, dmoe::relu>(f, n);
      FAIL("no error");
    } catch (const dmoe::error& e) {
      INFO("message: ", e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
  };
  CHECK_NOTHROW((void)dmoe::load_dense_ffn<float, dmoe::relu>(build("", shape_t{}), names));
  expect(build(names.w1, shape_t{4, 6}), names, false,
         "'encoder.layer.0.intermediate.dense.weight' has shape [4, 6], expected [6, 4]");
  expect(build(names.b1, shape_t{5}), names, false, "'encoder.layer.0.intermediate.dense.bias' has shape [5], expected [6]");
  expect(build(names.b2, shape_t{4, 1}), names, false, "has shape [4, 1], expected [4]");
  expect(build(names.w2, shape_t{4, 6, 1}), names, false, "expected a non-empty matrix");
  expect(build("", shape_t{}), dmoe::bert_ffn_names(1), false,
         "ckpt.safetensors': no tensor named 'encoder.layer.1.output.dense.weight'");
  expect(build("", shape_t{}), dmoe::gpt2_ffn_names(0), false, "no tensor named 'h.0.mlp.c_proj.weight'");
  expect(build("", shape_t{}), names, true, "w_gate must name the gate projection");
  expect(build("", shape_t{}), dmoe::llama_ffn_names(0), false, "is not gated");
}

TEST_CASE("ffn io: MiniLM-L6 fixture (F16, BERT naming): dense forward reproduces the stored FFN outputs") {
  const std::string path = fixture_path();
  std::FILE* probe = std::fopen(path.c_str(), "rb");
  if (!probe) {
    MESSAGE("DMOE_SKIP: fixture " << path << " is absent");
    return;
  }
  std::fclose(probe);
  const auto f = dmoe::safetensors_file::from_path(path);
  int checked = 0;
  for (int layer = 0; layer < 12; ++layer) {
    const std::string in = "calibration.layer." + std::to_string(layer) + ".ffn_input";
    const std::string out = "calibration.layer." + std::to_string(layer) + ".ffn_output";
    if (!f.has(dmoe::bert_ffn_names(layer).w1) || !f.has(in) || !f.has(out)) continue;
    INFO("layer ", layer);
    const auto ffn = dmoe::load_dense_ffn<float, dmoe::gelu_erf>(f, dmoe::bert_ffn_names(layer));
    const auto y_ref = f.read_matrix<float>(out);
    const auto x_all = f.read_matrix<float>(in);
    REQUIRE(y_ref.cols() == ffn.d_model());
    REQUIRE(x_all.rows() >= y_ref.rows());
    const row_matrix<float> x = x_all.topRows(y_ref.rows());
    row_matrix<float> y(x.rows(), x.cols());
    dmoe::context<dmoe::cpu> ctx{};
    dmoe::workspace_buffer ws(ffn.workspace_size(ctx, x.rows()));
    REQUIRE(ffn.forward(ctx, x, y, ws).ok());
    // y_ref was computed in fp32 from the fp32 weights; ours come from their F16 rounding. The
    // fixture's own check (tools/check_ffn_fixture.py) measures 3.4e-4 (layer 1) and 1.3e-4
    // (layer 4) relative Frobenius error, worst row 5.6e-4, for that difference.
    const double rel = double((y - y_ref).norm()) / double(y_ref.norm());
    double worst_row = 0.0;
    for (index_t r = 0; r < y.rows(); ++r)
      worst_row = (std::max)(worst_row, double((y.row(r) - y_ref.row(r)).norm()) / double(y_ref.row(r).norm()));
    INFO("relative Frobenius error ", rel, ", worst row ", worst_row);
    CHECK(rel < 1e-3);
    CHECK(worst_row < 2e-3);
    MESSAGE("MiniLM layer " << layer << ": relative Frobenius error " << rel << ", worst row " << worst_row);
    ++checked;
  }
  CHECK(checked > 0);
}

}  // TEST_SUITE
