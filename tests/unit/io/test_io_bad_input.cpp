// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Bad input to the IO layer, each a clear dmoe::error naming the file and the value:
// NaN or infinite top-any thresholds and dynamic-k tau in a saved layer.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>

#include <dmoe/dmoe.hpp>
#include <dmoe/io/moe_io.hpp>

namespace {

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

using top_any_layer = dmoe::moe_layer<float, dmoe::cpu, dmoe::top_any, dmoe::relu>;
using dynamic_k_layer = dmoe::moe_layer<float, dmoe::cpu, dmoe::dynamic_k, dmoe::relu>;

}  // namespace

TEST_SUITE("io") {
  TEST_CASE("io: a saved NaN or infinite top-any threshold is refused on load, naming the file and the slot") {
    top_any_layer layer({6, 4, 3}, {false});
    layer.randomize(7);
    {  // the control: finite thresholds load
      dmoe::safetensors_writer w;
      dmoe::save_moe_layer(w, layer);
      const auto back = dmoe::load_moe_layer<top_any_layer>(dmoe::safetensors_file::from_bytes(w.to_bytes(), "ok"));
      CHECK(back.router().threshold() == layer.router().threshold());
    }
    // threshold() is writable, so a diverged training run can save what set_threshold refuses.
    layer.router().threshold()[1] = std::numeric_limits<float>::quiet_NaN();
    {
      dmoe::safetensors_writer w;
      dmoe::save_moe_layer(w, layer);
      expect_error([&] { (void)dmoe::load_moe_layer<top_any_layer>(dmoe::safetensors_file::from_bytes(w.to_bytes(), "nan.st")); },
                   dmoe::errc::invalid_argument,
                   {"load_moe_layer 'nan.st': tensor 'router.threshold'", "threshold g[1] = nan is not finite"});
    }
    layer.router().threshold()[1] = 0.0f;
    layer.router().threshold()[3] = -std::numeric_limits<float>::infinity();
    {  // in half precision too (F16 has infinities)
      dmoe::safetensors_writer w;
      dmoe::save_moe_layer(w, layer, dmoe::st_dtype::F16);
      expect_error([&] { (void)dmoe::load_moe_layer<top_any_layer>(dmoe::safetensors_file::from_bytes(w.to_bytes(), "inf.st")); },
                   dmoe::errc::invalid_argument, {"load_moe_layer 'inf.st'", "g[3] = -inf"});
    }
  }

  TEST_CASE("io: a NaN or infinite dynamic-k tau in the metadata is refused on load") {
    dynamic_k_layer layer({6, 4, 3}, {0.4, 2});
    layer.randomize(3);
    for (const char* bad : {"nan", "inf", "-inf", "1.5"}) {
      CAPTURE(bad);
      dmoe::safetensors_writer w;
      dmoe::save_moe_layer(w, layer);
      w.set_metadata("dmoe.dynamic_k.tau", bad);
      expect_error([&] { (void)dmoe::load_moe_layer<dynamic_k_layer>(dmoe::safetensors_file::from_bytes(w.to_bytes(), "tau.st")); },
                   dmoe::errc::invalid_argument, {"load_moe_layer 'tau.st'", "tau must be in [0, 1], got"});
    }
  }
}
