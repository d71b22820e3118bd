// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Bad input to the IO layer, each a clear dmoe::error naming the file and the value: paths that
// are not regular files (a directory used to throw std::bad_alloc: its tellg is 2^63 - 1; a FIFO
// blocked; /dev/zero never ended), allocations that cannot succeed (out_of_memory with the bytes),
// shapes whose sizes overflow, and NaN or infinite top-any thresholds and dynamic-k tau in a saved
// layer.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#define DMOE_TEST_POSIX 1
#else
#define DMOE_TEST_POSIX 0
#endif

// AddressSanitizer aborts on an impossible allocation instead of throwing std::bad_alloc, so the
// out-of-memory cases run in the release build only.
#if defined(__SANITIZE_ADDRESS__)
#define DMOE_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DMOE_TEST_ASAN 1
#endif
#endif
#ifndef DMOE_TEST_ASAN
#define DMOE_TEST_ASAN 0
#endif

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

/// A fresh directory under the system temp directory, removed with everything in it at the end.
struct temp_dir {
  std::filesystem::path path;
  temp_dir() {
    const auto base = std::filesystem::temp_directory_path();
    for (int i = 0;; ++i) {
      path = base / ("dmoe_io_bad_input_" + std::to_string(
#if DMOE_TEST_POSIX
                                               static_cast<long>(::getpid())
#else
                                               0L
#endif
                                               ) +
                     "_" + std::to_string(i));
      std::error_code ec;
      if (std::filesystem::create_directory(path, ec)) break;
      REQUIRE(i < 1000);
    }
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

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

  TEST_CASE("io: from_path refuses a directory, naming it (it used to throw std::bad_alloc)") {
    temp_dir dir;
    const std::string p = dir.path.string();
    expect_error([&] { (void)dmoe::safetensors_file::from_path(p); }, dmoe::errc::invalid_argument,
                 {("safetensors: '" + p + "' is a directory, not a safetensors file").c_str()});
    expect_error([&] { (void)dmoe::load_moe_layer<top_any_layer>(p); }, dmoe::errc::invalid_argument,
                 {"is a directory"});
    // A path that does not exist is still the open error, with the system's reason.
    const std::string missing = (dir.path / "missing.safetensors").string();
    expect_error([&] { (void)dmoe::safetensors_file::from_path(missing); }, dmoe::errc::invalid_argument,
                 {("cannot open '" + missing + "' for reading").c_str()});
    // The control: a regular file there reads.
    const std::string good = (dir.path / "good.safetensors").string();
    top_any_layer layer({4, 3, 2}, {false});
    layer.randomize(1);
    dmoe::save_moe_layer(good, layer);
    CHECK(dmoe::load_moe_layer<top_any_layer>(good).router().weight() == layer.router().weight());
  }

#if DMOE_TEST_POSIX
  TEST_CASE("io: from_path refuses FIFOs and devices without opening them") {
    temp_dir dir;
    const std::string fifo = (dir.path / "pipe.safetensors").string();
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    // Opening a FIFO for reading would block until a writer came: this must return at once.
    expect_error([&] { (void)dmoe::safetensors_file::from_path(fifo); }, dmoe::errc::invalid_argument,
                 {("safetensors: '" + fifo + "' is a FIFO, not a regular file").c_str()});
    if (std::filesystem::exists("/dev/zero")) {  // endless: reading it whole never finishes
      expect_error([] { (void)dmoe::safetensors_file::from_path("/dev/zero"); }, dmoe::errc::invalid_argument,
                   {"safetensors: '/dev/zero' is a character device, not a regular file"});
    }
    if (std::filesystem::exists("/dev/null")) {
      expect_error([] { (void)dmoe::safetensors_file::from_path("/dev/null"); }, dmoe::errc::invalid_argument,
                   {"'/dev/null' is a character device"});
    }
  }
#endif

  TEST_CASE("io: writer sizes are checked: overflowing shapes are refused, impossible allocations are out_of_memory") {
    dmoe::safetensors_writer w;
    const float one = 1.0f;
    const std::int64_t big = std::int64_t(1) << 32;
    expect_error([&] { w.add("a", dmoe::st_dtype::F32, {big, big}, &one); }, dmoe::errc::invalid_argument,
                 {"tensor 'a': shape [4294967296, 4294967296] has more elements than fit in 64 bits"});
    const std::int64_t half = std::int64_t(1) << 31;  // 2^62 elements fit, 2^65 bytes do not
    expect_error([&] { w.add("b", dmoe::st_dtype::F64, {half, half}, &one); }, dmoe::errc::invalid_argument,
                 {"tensor 'b': shape [2147483648, 2147483648] in F64 has more bytes than fit in 64 bits"});
    expect_error([&] { w.add("c", dmoe::st_dtype::F32, {big, big}, std::vector<float>(3)); },
                 dmoe::errc::invalid_argument, {"tensor 'c'", "more elements than fit in 64 bits"});
    CHECK(!w.has("a"));
    CHECK(!w.has("b"));
#if !DMOE_TEST_ASAN
    // 2^50 elements of 4 bytes: a valid shape whose bytes exceed any address space. Nothing is
    // read from `data` before the allocation fails.
    const std::int64_t e25 = std::int64_t(1) << 25;
    expect_error([&] { w.add("d", dmoe::st_dtype::F32, {e25, e25}, &one); }, dmoe::errc::out_of_memory,
                 {"safetensors_writer: tensor 'd': allocating 4503599627370496 bytes"});
    CHECK(!w.has("d"));
#else
    MESSAGE("out-of-memory case not run: AddressSanitizer aborts on impossible allocations");
#endif
  }

  TEST_CASE("io: from_path on a file larger than memory is out_of_memory with the bytes") {
#if DMOE_TEST_ASAN
    MESSAGE("DMOE_SKIP: AddressSanitizer aborts on impossible allocations");
#else
    // A sparse 2^50-byte file (no disk used) on a file system that allows one (tmpfs does, ext4
    // stops at 16 TiB). Reading it whole must fail at the allocation, before reading a byte.
    const std::filesystem::path dirs[] = {"/dev/shm", std::filesystem::temp_directory_path()};
    bool ran = false;
    for (const auto& base : dirs) {
      std::error_code ec;
      if (!std::filesystem::is_directory(base, ec)) continue;
      const auto p = base / ("dmoe_sparse_" + std::to_string(
#if DMOE_TEST_POSIX
                                                 static_cast<long>(::getpid())
#else
                                                 0L
#endif
                                                 ) +
                             ".safetensors");
      { std::ofstream(p.string(), std::ios::binary); }
      std::filesystem::resize_file(p, std::uintmax_t(1) << 50, ec);
      if (ec) {
        std::filesystem::remove(p, ec);
        continue;
      }
      const std::string ps = p.string();
      expect_error([&] { (void)dmoe::safetensors_file::from_path(ps); }, dmoe::errc::out_of_memory,
                   {("safetensors: reading '" + ps + "': allocating 1125899906842624 bytes").c_str()});
      std::filesystem::remove(p, ec);
      ran = true;
      break;
    }
    if (!ran) MESSAGE("DMOE_SKIP: no file system here holds a sparse 2^50-byte file");
#endif
  }
}
