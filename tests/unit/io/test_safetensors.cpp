// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// safetensors reader and writer: exact bytes of a hand-built file, 16-bit rounding against an
// independent reference, round trips, and every corrupt-file case (each must be a dmoe::error
// naming the problem; truncations and bit flips must never crash).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <dmoe/io/safetensors.hpp>

#include "test_random.hpp"

namespace {

using bytes = std::vector<unsigned char>;

/// A file from a header string and a data buffer, the header length written as given.
bytes make_file(const std::string& header, const bytes& data = {}, std::uint64_t header_len = ~0ull) {
  const std::uint64_t n = header_len == ~0ull ? header.size() : header_len;
  bytes b;
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<unsigned char>(n >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

/// Parsing `file` must throw dmoe::error whose message contains `what` (and the label).
void expect_error(const bytes& file, const std::string& what, dmoe::errc code = dmoe::errc::invalid_argument) {
  INFO("expected an error containing: ", what);
  try {
    (void)dmoe::safetensors_file::from_bytes(file, "bad.safetensors");
    FAIL("no error");
  } catch (const dmoe::error& e) {
    const std::string msg = e.what();
    INFO("message: ", msg);
    CHECK(e.code() == code);
    CHECK(msg.find(what) != std::string::npos);
    CHECK(msg.find("bad.safetensors") != std::string::npos);
  }
}

// ---- independent 16-bit references -------------------------------------------------------
/// Value of an IEEE binary16 bit pattern, from the definition.
double half_value(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0) v = std::ldexp(double(m), -24);
  else if (e == 31) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(double(1024 + m), e - 25);
  return s ? -v : v;
}
/// Nearest binary16 to x, ties to even mantissa, overflow to inf past the rounding boundary
/// (65520): binary search over the finite positive patterns (their values increase with the bits).
std::uint16_t half_reference(float xf) {
  const double x = double(xf);
  if (std::isnan(x)) return 0x7e00;
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  if (a >= 65520.0) return sign | 0x7c00;
  int lo = 0, hi = 0x7bff;  // largest pattern with value <= a
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (half_value(std::uint16_t(mid)) <= a) lo = mid;
    else hi = mid - 1;
  }
  std::uint16_t best = std::uint16_t(lo);
  if (lo < 0x7bff) {
    const double dl = a - half_value(std::uint16_t(lo)), dh = half_value(std::uint16_t(lo + 1)) - a;
    if (dh < dl || (dh == dl && (lo & 1))) best = std::uint16_t(lo + 1);
  }
  return sign | best;
}
float bf16_value(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
/// Nearest bfloat16 to x (ties to even), by comparing the two candidates around it.
std::uint16_t bf16_reference(float x) {
  if (std::isnan(x)) return 0x7fc0;
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  const std::uint16_t lo = static_cast<std::uint16_t>(u >> 16), hi = static_cast<std::uint16_t>(lo + 1);
  const double dl = std::fabs(double(bf16_value(lo)) - double(x));
  // Past the largest finite value the next step up is inf, which rounding treats as 2^128.
  const double vh = std::isinf(bf16_value(hi)) ? std::copysign(std::ldexp(1.0, 128), double(x)) : double(bf16_value(hi));
  const double dh = std::fabs(vh - double(x));
  if (dl < dh) return lo;
  if (dh < dl) return hi;
  return (lo & 1) ? hi : lo;
}

std::uint16_t u16_at(const bytes& b, std::size_t off) {
  return static_cast<std::uint16_t>(b[off] | (b[off + 1] << 8));
}

}  // namespace

TEST_SUITE("io") {

TEST_CASE("safetensors: the writer's exact bytes, and a hand-built file reads back") {
  dmoe::safetensors_writer w;
  const float b[2] = {1.0f, 2.0f};
  const float a[1] = {1.0f};
  w.add("b", dmoe::st_dtype::F32, {2}, b);
  w.add("a", dmoe::st_dtype::F16, {1}, a);
  w.set_metadata("k", "v");
  const auto out = w.to_bytes();
  // Larger dtype first, then by name; compact JSON, __metadata__ first, padded to 8 with spaces.
  std::string header =
      "{\"__metadata__\":{\"k\":\"v\"},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"a\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[8,10]}}";
  while (header.size() % 8) header += ' ';
  const bytes expect = make_file(header, {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x3c});
  CHECK(out == expect);

  // The same file built by hand (different key order, extra whitespace) parses to the same data.
  const bytes hand = make_file(
      " {\"a\": {\"shape\": [1], \"dtype\": \"F16\", \"data_offsets\": [8, 10]},\n"
      "  \"b\": {\"data_offsets\": [0, 8], \"dtype\": \"F32\", \"shape\": [2]}, \"__metadata__\": {\"k\": \"v\"}}",
      {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x3c});
  // (a leading space is not accepted: the header must start with '{')
  expect_error(hand, "starting with '{'");
  bytes hand2 = hand;
  hand2.erase(hand2.begin() + 8);  // drop the space, fix the length
  hand2[0] = static_cast<unsigned char>(hand2[0] - 1);
  const auto f = dmoe::safetensors_file::from_bytes(hand2);
  REQUIRE(f.tensors().size() == 2);
  CHECK(f.tensors()[0].name == "b");
  CHECK(f.info("a").dtype == dmoe::st_dtype::F16);
  CHECK(f.info("b").shape == std::vector<std::int64_t>{2});
  CHECK(f.read<float>("b") == std::vector<float>{1.0f, 2.0f});
  CHECK(f.read<double>("a") == std::vector<double>{1.0});
  CHECK(f.metadata_value("k") == "v");
  CHECK(f.metadata_value("absent", "x") == "x");
  CHECK(f.metadata().size() == 1);
  std::size_t nb = 0;
  const unsigned char* p = f.data("a", &nb);
  CHECK(nb == 2);
  CHECK(p[1] == 0x3c);

  // An empty file is "{}" padded to 8.
  const auto empty = dmoe::safetensors_writer{}.to_bytes();
  CHECK(empty == make_file("{}      "));
  CHECK(dmoe::safetensors_file::from_bytes(empty).tensors().empty());
}

TEST_CASE("safetensors: F16 and BF16 rounding against known bit patterns and an independent reference") {
  struct known {
    float x;
    std::uint16_t half, bf16;
  };
  const known cases[] = {
      {1.0f, 0x3c00, 0x3f80},       {-2.0f, 0xc000, 0xc000},        {0.0f, 0x0000, 0x0000},
      {-0.0f, 0x8000, 0x8000},      {65504.0f, 0x7bff, 0x4780},     {65520.0f, 0x7c00, 0x4780},
      {0.1f, 0x2e66, 0x3dcd},       {5.9604645e-8f, 0x0001, 0x3380}, {1.00048828125f, 0x3c00, 0x3f80},  // half tie -> even
      {1.00146484375f, 0x3c02, 0x3f80},                                 // half tie -> even (up)
      {1.00390625f, 0x3c04, 0x3f80},                                    // bf16 tie 0x3f808000 -> even
      {1.01171875f, 0x3c0c, 0x3f82},                                    // bf16 tie 0x3f818000 -> even (up)
      {std::numeric_limits<float>::infinity(), 0x7c00, 0x7f80}};
  std::vector<float> xs;
  for (const auto& c : cases) xs.push_back(c.x);
  dmoe::safetensors_writer w;
  w.add("h", dmoe::st_dtype::F16, {std::int64_t(xs.size())}, xs.data());
  w.add("b", dmoe::st_dtype::BF16, {std::int64_t(xs.size())}, xs.data());
  const auto file = w.to_bytes();
  const auto f = dmoe::safetensors_file::from_bytes(file);
  const std::uint64_t header_len = std::uint64_t(file[0]) | (std::uint64_t(file[1]) << 8);
  const std::uint64_t off_b = 8 + header_len + f.info("b").begin;
  const std::uint64_t off_h = 8 + header_len + f.info("h").begin;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    INFO("x = ", xs[i]);
    CHECK(u16_at(file, std::size_t(off_h) + 2 * i) == cases[i].half);
    CHECK(u16_at(file, std::size_t(off_b) + 2 * i) == cases[i].bf16);
    CHECK(half_reference(xs[i]) == cases[i].half);  // the references agree with the table too
    CHECK(bf16_reference(xs[i]) == cases[i].bf16);
  }
  // Decoding: read back equals the exact value of the pattern.
  const auto hv = f.read<double>("h");
  const auto bv = f.read<double>("b");
  for (std::size_t i = 0; i < xs.size(); ++i) {
    CHECK(hv[i] == half_value(cases[i].half));
    CHECK(bv[i] == double(bf16_value(cases[i].bf16)));
  }
  // NaN stays NaN.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  dmoe::safetensors_writer wn;
  wn.add("h", dmoe::st_dtype::F16, {1}, &nan);
  wn.add("b", dmoe::st_dtype::BF16, {1}, &nan);
  const auto fn = dmoe::safetensors_file::from_bytes(wn.to_bytes());
  CHECK(std::isnan(fn.read<float>("h")[0]));
  CHECK(std::isnan(fn.read<float>("b")[0]));

  // Random values over the whole half range (normals, subnormals, past the max).
  dmoe_testing::splitmix g(7, 0x9e37, 0x10);
  std::vector<float> r;
  for (int i = 0; i < 400; ++i) {
    const double mag = std::ldexp(g.uniform(1.0, 2.0), g.integer(-27, 16));
    r.push_back(static_cast<float>(g.coin() ? mag : -mag));
  }
  dmoe::safetensors_writer wr;
  wr.add("h", dmoe::st_dtype::F16, {std::int64_t(r.size())}, r.data());
  wr.add("b", dmoe::st_dtype::BF16, {std::int64_t(r.size())}, r.data());
  const auto fr = dmoe::safetensors_file::from_bytes(wr.to_bytes());
  const auto rh = fr.read<double>("h"), rb = fr.read<double>("b");
  int bad = 0;
  for (std::size_t i = 0; i < r.size(); ++i) {
    if (rh[i] != half_value(half_reference(r[i])) && !(std::isinf(rh[i]) && std::isinf(half_value(half_reference(r[i])))))
      ++bad;
    if (rb[i] != double(bf16_value(bf16_reference(r[i])))) ++bad;
  }
  CHECK(bad == 0);
}

TEST_CASE("safetensors: round trips of every written dtype, shapes, empty tensors, files on disk") {
  dmoe_testing::splitmix g(11, 0x9e37, 0x20);
  for (int c = 0; c < 20; ++c) {
    const int rank = g.integer(0, 3);
    std::vector<std::int64_t> shape;
    std::size_t n = 1;
    for (int i = 0; i < rank; ++i) {
      shape.push_back(g.integer(c == 3 ? 0 : 1, 6));
      n *= std::size_t(shape.back());
    }
    std::vector<double> v(n);
    for (auto& x : v) x = g.uniform(-100.0, 100.0);
    std::vector<float> vf(v.begin(), v.end());
    std::vector<std::uint8_t> m(n);
    for (auto& x : m) x = static_cast<std::uint8_t>(g.integer(0, 255));
    dmoe::safetensors_writer w;
    w.add("f64", dmoe::st_dtype::F64, shape, v.data());
    w.add("f32", dmoe::st_dtype::F32, shape, vf.data());
    w.add("f32_from_double", dmoe::st_dtype::F32, shape, v);
    w.add("f16", dmoe::st_dtype::F16, shape, vf.data());
    w.add("bf16", dmoe::st_dtype::BF16, shape, vf.data());
    w.add("u8", dmoe::st_dtype::U8, shape, m.data());
    w.set_metadata("case", std::to_string(c));
    const auto f = dmoe::safetensors_file::from_bytes(w.to_bytes());
    CHECK(f.read<double>("f64") == v);
    CHECK(f.read<float>("f32") == vf);
    CHECK(f.read<float>("f32_from_double") == vf);
    const auto h = f.read<float>("f16"), b = f.read<float>("bf16");
    const auto u = f.read<double>("u8");
    for (std::size_t i = 0; i < n; ++i) {
      CHECK(double(h[i]) == half_value(half_reference(vf[i])));
      CHECK(b[i] == bf16_value(bf16_reference(vf[i])));
      CHECK(u[i] == double(m[i]));
    }
    for (const auto& t : f.tensors()) CHECK(t.shape == shape);
    CHECK(f.metadata_value("case") == std::to_string(c));
    // Deterministic: the same content in another insertion order gives the same bytes.
    dmoe::safetensors_writer w2;
    w2.set_metadata("case", std::to_string(c));
    w2.add("u8", dmoe::st_dtype::U8, shape, m.data());
    w2.add("bf16", dmoe::st_dtype::BF16, shape, vf.data());
    w2.add("f16", dmoe::st_dtype::F16, shape, vf.data());
    w2.add("f32_from_double", dmoe::st_dtype::F32, shape, v);
    w2.add("f32", dmoe::st_dtype::F32, shape, vf.data());
    w2.add("f64", dmoe::st_dtype::F64, shape, v.data());
    CHECK(w2.to_bytes() == w.to_bytes());
  }
  // A matrix, and a file on disk.
  dmoe::safetensors_writer w;
  const std::vector<float> mat = {1, 2, 3, 4, 5, 6};
  w.add("m", dmoe::st_dtype::F32, {2, 3}, mat);
  const std::string path = "dmoe_io_test_roundtrip.safetensors";
  w.write(path);
  const auto f = dmoe::safetensors_file::from_path(path);
  CHECK(f.label() == path);
  const auto m = f.read_matrix<double>("m");
  CHECK(m.rows() == 2);
  CHECK(m(1, 0) == 4.0);
  CHECK(m(0, 2) == 3.0);
  std::FILE* tmp = std::fopen((path + ".tmp").c_str(), "rb");
  CHECK(tmp == nullptr);  // renamed away
  if (tmp) std::fclose(tmp);
  std::remove(path.c_str());
}

TEST_CASE("safetensors: reader API errors name the file, the tensor and what was expected") {
  dmoe::safetensors_writer w;
  const std::vector<float> v = {1, 2, 3};
  w.add("v", dmoe::st_dtype::F32, {3}, v);
  const auto f = dmoe::safetensors_file::from_bytes(w.to_bytes(), "mem.safetensors");
  CHECK_THROWS_WITH_AS(f.info("w"), doctest::Contains("no tensor named 'w'"), dmoe::error);
  CHECK_THROWS_WITH_AS(f.read_matrix<float>("v"), doctest::Contains("expected a matrix"), dmoe::error);
  CHECK_THROWS_WITH_AS(f.expect_shape("v", {1, 3}), doctest::Contains("tensor 'v' has shape [3], expected [1, 3]"),
                       dmoe::error);
  CHECK_THROWS_WITH_AS(dmoe::safetensors_file::from_path("/nonexistent/dir/x.safetensors"),
                       doctest::Contains("cannot open '/nonexistent/dir/x.safetensors'"), dmoe::error);
  // Writer misuse.
  dmoe::safetensors_writer bad;
  bad.add("a", dmoe::st_dtype::F32, {1}, v.data());
  CHECK_THROWS_WITH_AS(bad.add("a", dmoe::st_dtype::F32, {1}, v.data()), doctest::Contains("added twice"), dmoe::error);
  CHECK_THROWS_WITH_AS(bad.add("__metadata__", dmoe::st_dtype::F32, {1}, v.data()), doctest::Contains("reserved"),
                       dmoe::error);
  CHECK_THROWS_WITH_AS(bad.add("b", dmoe::st_dtype::F32, {-1}, v.data()), doctest::Contains("negative extent"),
                       dmoe::error);
  CHECK_THROWS_WITH_AS(bad.add("c", dmoe::st_dtype::I32, {1}, v.data()), doctest::Contains("not supported"), dmoe::error);
  CHECK_THROWS_WITH_AS(bad.add("d", dmoe::st_dtype::F32, {2}, v), doctest::Contains("3 values for shape [2]"),
                       dmoe::error);
  CHECK_THROWS_WITH_AS(bad.write("/nonexistent/dir/out.safetensors"), doctest::Contains("cannot open"), dmoe::error);
  // F8 tensors parse, but do not convert.
  const auto f8 = dmoe::safetensors_file::from_bytes(
      make_file("{\"q\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", {1, 2}));
  CHECK_THROWS_WITH_AS(f8.read<float>("q"), doctest::Contains("F8_E4M3"), dmoe::error);
  try {
    (void)f8.read<float>("q");
  } catch (const dmoe::error& e) {
    CHECK(e.code() == dmoe::errc::unsupported);
  }
  // Integer dtypes convert.
  const auto fi = dmoe::safetensors_file::from_bytes(make_file(
      "{\"i\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[0,4]},\"k\":{\"dtype\":\"BOOL\",\"shape\":[2],"
      "\"data_offsets\":[4,6]}}",
      {0xff, 0xff, 0x02, 0x01, 0x00, 0x07}));
  CHECK(fi.read<double>("i") == std::vector<double>{-1.0, 258.0});
  CHECK(fi.read<float>("k") == std::vector<float>{0.0f, 1.0f});
}

TEST_CASE("safetensors: every corrupt header is a specific error") {
  const std::string ok_entry = "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  const bytes eight(8, 0);
  // Sanity: the base case parses.
  CHECK_NOTHROW((void)dmoe::safetensors_file::from_bytes(make_file("{\"a\":" + ok_entry + "}", eight)));

  expect_error(bytes{1, 2, 3}, "fewer than the 8-byte header length");
  expect_error(make_file("{}", {}, 200'000'000ull), "exceeds the limit");
  expect_error(make_file("{}", {}, ~1ull), "exceeds the limit");
  expect_error(make_file("{}", {}, 3), "truncated");
  expect_error(make_file("[]"), "starting with '{'");
  expect_error(make_file(""), "starting with '{'");
  expect_error(make_file("{\"a\":"), "not valid JSON");
  expect_error(make_file("{\"a\":1} x"), "not valid JSON");
  expect_error(make_file("{\"\xff\":1}"), "not valid JSON");  // invalid UTF-8
  expect_error(make_file("{\"a\":" + ok_entry + ",\"a\":" + ok_entry + "}", eight), "the key 'a' twice");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", eight),
               "the key 'dtype' twice");
  expect_error(make_file("{\"a\":3}"), "tensor 'a': entry must be an object, got number");
  expect_error(make_file("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", eight), "missing field 'dtype'");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", eight), "missing field 'shape'");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", eight), "missing field 'data_offsets'");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", eight),
               "unknown field 'x'");
  expect_error(make_file("{\"a\":{\"dtype\":32,\"shape\":[2],\"data_offsets\":[0,8]}}", eight),
               "dtype must be a string");
  expect_error(make_file("{\"a\":{\"dtype\":\"F17\",\"shape\":[2],\"data_offsets\":[0,8]}}", eight),
               "unknown dtype 'F17'");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", eight),
               "shape must be an array");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", eight),
               "got a negative number");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", eight),
               "non-negative integers, got number");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", eight),
               "non-negative integers, got string");
  expect_error(
      make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", eight),
      "more elements than fit in 64 bits");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551615],\"data_offsets\":[0,8]}}", eight),
               "more elements than fit in 64 bits");
  expect_error(make_file("{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,8]}}", eight),
               "more bytes than fit in 64 bits");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", eight),
               "data_offsets must be [begin, end]");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-1,7]}}", eight),
               "data_offsets must be [begin, end]");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":\"0,8\"}}", eight),
               "data_offsets must be [begin, end]");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", eight),
               "end before they begin");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", eight),
               "run past the end of the 8-byte data buffer");
  expect_error(
      make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,18446744073709551615]}}", eight),
      "run past the end");
  expect_error(make_file("{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,8]}}", eight),
               "span 8 bytes, but dtype F16 and shape [2] need 4");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                         bytes(12, 0)),
               "tensor 'b': data_offsets [4, 12] overlap the previous tensor");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                         bytes(12, 0)),
               "without holes");
  expect_error(make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", eight), "without holes");
  expect_error(make_file("{\"a\":" + ok_entry + "}", bytes(9, 0)), "cover 8 bytes of the 9-byte data buffer");
  expect_error(make_file("{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}"),
               "nests JSON deeper than 16 levels");
  // Brackets inside strings do not count as nesting.
  CHECK_NOTHROW((void)dmoe::safetensors_file::from_bytes(
      make_file("{\"__metadata__\":{\"k\":\"[[[[[[[[[[[[[[[[[[[[\\\"[[[[\"},\"a\":" + ok_entry + "}", eight)));
  expect_error(make_file("{\"__metadata__\":[1]}"), "__metadata__ must be an object of strings");
  expect_error(make_file("{\"__metadata__\":{\"k\":1}}"), "__metadata__ value of 'k' must be a string");
  // Zero-size tensors may share an offset (they occupy no bytes).
  CHECK_NOTHROW((void)dmoe::safetensors_file::from_bytes(make_file(
      "{\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},\"y\":{\"dtype\":\"F16\",\"shape\":[3,0],"
      "\"data_offsets\":[0,0]},\"a\":" + ok_entry + "}",
      eight)));
}

TEST_CASE("safetensors: every truncation of a valid file is an error; byte flips never crash") {
  dmoe::safetensors_writer w;
  const std::vector<float> v = {1.5f, -2.0f, 3.25f, 0.5f, 8.0f, -1.0f};
  w.add("a", dmoe::st_dtype::F32, {2, 3}, v);
  w.add("b", dmoe::st_dtype::BF16, {3}, v.data());
  w.add("c", dmoe::st_dtype::F16, {1, 2}, v.data());
  w.set_metadata("note", "x");
  const auto file = w.to_bytes();
  for (std::size_t len = 0; len < file.size(); ++len) {
    INFO("length ", len, " of ", file.size());
    // The copy has exactly `len` bytes: ASan sees any read past it.
    CHECK_THROWS_AS((void)dmoe::safetensors_file::from_bytes(bytes(file.begin(), file.begin() + std::ptrdiff_t(len))),
                    dmoe::error);
  }
  CHECK_NOTHROW((void)dmoe::safetensors_file::from_bytes(file));
  // Appending bytes is an error too (the tensors no longer cover the buffer).
  bytes longer = file;
  longer.push_back(0);
  CHECK_THROWS_AS((void)dmoe::safetensors_file::from_bytes(longer), dmoe::error);

  // Random single and multiple byte changes: either a valid file (all tensors readable) or a
  // dmoe::error; anything else (another exception, a sanitizer report) fails.
  dmoe_testing::splitmix g(3, 0x9e37, 0x30);
  int parsed = 0, rejected = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    bytes b = file;
    const int flips = g.integer(1, 3);
    for (int k = 0; k < flips; ++k) b[std::size_t(g.integer(0, int(b.size()) - 1))] = static_cast<unsigned char>(g.integer(0, 255));
    try {
      const auto f = dmoe::safetensors_file::from_bytes(b);
      for (const auto& t : f.tensors()) (void)f.read<double>(t.name);
      ++parsed;
    } catch (const dmoe::error&) {
      ++rejected;
    }
  }
  CHECK(parsed + rejected == 3000);
  CHECK(parsed > 0);    // data-byte changes keep the file valid
  CHECK(rejected > 0);  // header changes break it
}

}  // TEST_SUITE
