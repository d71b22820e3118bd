// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Writes the fuzzer's seed corpus: small valid safetensors files (scripts/fuzz.sh).
#include <cstdio>
#include <string>
#include <vector>

#include <dmoe/dmoe.hpp>
#include <dmoe/io/ffn_io.hpp>
#include <dmoe/io/moe_io.hpp>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  const std::vector<float> v = {1.0f, -2.5f, 3.0e-5f, 65504.0f, -0.0f, 7.0f};
  const std::vector<std::uint8_t> mask = {1, 0, 1};
  int n = 0;
  auto emit = [&](const dmoe::safetensors_writer& w) { w.write(dir + "/seed" + std::to_string(n++) + ".safetensors"); };
  for (auto dt : {dmoe::st_dtype::F32, dmoe::st_dtype::F16, dmoe::st_dtype::BF16, dmoe::st_dtype::F64}) {
    dmoe::safetensors_writer w;
    w.add("a.weight", dt, {2, 3}, v.data());
    w.add("b", dt, {6}, v.data());
    emit(w);
  }
  dmoe::safetensors_writer w;
  w.add("x", dmoe::st_dtype::F32, {3, 2}, v.data());
  w.add("mask", dmoe::st_dtype::U8, {3}, mask.data());
  w.add("empty", dmoe::st_dtype::F16, {0, 4}, v.data());
  w.add("scalar", dmoe::st_dtype::BF16, {}, v.data());
  w.set_metadata("format", "pt");
  w.set_metadata("dmoe.policy", "top_k");
  emit(w);
  emit(dmoe::safetensors_writer{});
  // Small files of the layer and FFN loaders the fuzz target also runs.
  const dmoe::moe_config cfg{4, 2, 3};
  dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu> tk(cfg, {1, true});
  tk.randomize(1);
  dmoe::moe_config cfg_dk = cfg;
  cfg_dk.router_hidden = 2;
  dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::gelu_erf> dk(cfg_dk, {0.5, 0});
  dk.randomize(2);
  dmoe::moe_config cfg_ta = cfg;
  cfg_ta.expert_bias = true;
  dmoe::moe_layer<double, dmoe::cpu, dmoe::top_any, dmoe::swiglu> ta(cfg_ta, {});
  ta.randomize(3);
  {
    dmoe::safetensors_writer l;
    dmoe::save_moe_layer(l, tk);
    emit(l);
  }
  {
    dmoe::safetensors_writer l;
    dmoe::save_moe_layer(l, dk, dmoe::st_dtype::F16);
    emit(l);
  }
  {
    dmoe::safetensors_writer l;
    dmoe::save_moe_layer(l, ta, dmoe::st_dtype::BF16);
    emit(l);
  }
  dmoe::dense_ffn<float, dmoe::gelu_erf> ffn(3, 4);
  ffn.randomize(4);
  for (const auto& names : {dmoe::bert_ffn_names(0), dmoe::gpt2_ffn_names(0)}) {
    dmoe::safetensors_writer l;
    dmoe::save_dense_ffn(l, ffn, names, dmoe::st_dtype::F16);
    emit(l);
  }
  std::printf("make_seeds: wrote %d seed files to %s\n", n, dir.c_str());
  return 0;
}
