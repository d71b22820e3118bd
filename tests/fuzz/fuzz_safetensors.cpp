// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// libFuzzer target: any byte string given to the safetensors reader must either parse (and then
// every tensor reads as float and double) or fail with dmoe::error; a crash, a sanitizer report
// or any other exception is a finding. Built and run by scripts/fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include <dmoe/io/safetensors.hpp>

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
  } catch (const dmoe::error&) {
    // a clear error is the expected outcome for a corrupt file
  }
  return 0;
}
