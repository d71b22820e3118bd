// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// libFuzzer target: any byte string given to the safetensors reader must either parse (and then
// every tensor reads as float and double) or fail with dmoe::error; a parsed file is also handed
// to the MoE layer loader (each policy) and the dense FFN loader (BERT and GPT-2 names), which
// must build a layer or fail with dmoe::error. A crash, a sanitizer report, any other exception
// or an abort below is a finding. Built and run by scripts/fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include <dmoe/dmoe.hpp>
#include <dmoe/io/ffn_io.hpp>
#include <dmoe/io/moe_io.hpp>

namespace {
template <class F>
void expect_ok_or_error(F&& f) {
  try {
    f();
  } catch (const dmoe::error&) {
    // a clear error is an expected outcome for a corrupt file
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto f = dmoe::safetensors_file::from_bytes(data, size, "fuzz");
    for (const auto& t : f.tensors()) {
      try {
        const auto v = f.read<float>(t.name);
        const auto w = f.read<double>(t.name);
        if (v.size() != static_cast<std::size_t>(t.numel()) || w.size() != v.size()) std::abort();
        std::size_t bytes = 0;
        (void)f.data(t.name, &bytes);
        if (bytes != static_cast<std::size_t>(t.end - t.begin)) std::abort();
        if (t.shape.size() == 2) (void)f.read_matrix<float>(t.name);
      } catch (const dmoe::error& e) {
        if (e.code() != dmoe::errc::unsupported) std::abort();  // only F8 tensors may refuse to convert
      }
    }
    for (const auto& kv : f.metadata()) (void)f.metadata_value(kv.first);
    expect_ok_or_error([&] { (void)dmoe::load_moe_layer<dmoe::moe_layer<float, dmoe::cpu, dmoe::top_k, dmoe::relu>>(f); });
    expect_ok_or_error(
        [&] { (void)dmoe::load_moe_layer<dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::gelu_erf>>(f); });
    expect_ok_or_error([&] { (void)dmoe::load_moe_layer<dmoe::moe_layer<double, dmoe::cpu, dmoe::top_any, dmoe::swiglu>>(f); });
    expect_ok_or_error([&] { (void)dmoe::load_dense_ffn<float, dmoe::gelu_erf>(f, dmoe::bert_ffn_names(0)); });
    expect_ok_or_error([&] { (void)dmoe::load_dense_ffn<float, dmoe::gelu_erf>(f, dmoe::gpt2_ffn_names(0)); });
  } catch (const dmoe::error&) {
  }
  return 0;
}
