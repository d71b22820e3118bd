// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Reading and writing safetensors files (the Hugging Face tensor format): an 8-byte
/// little-endian header length N, N bytes of JSON describing each tensor (dtype, shape, byte
/// offsets into the data buffer), then the data buffer, row-major and little-endian.
///
/// A file is untrusted input: safetensors_file validates every field of the header against
/// the bytes it owns before any tensor is read, and reports a problem as dmoe::error
/// (errc::invalid_argument, or errc::unsupported for a dtype it knows but cannot convert)
/// naming the file, the tensor and what was expected. See docs/io.md for the exact rules.
/// Needs nlohmann/json (link dmoe::io).

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "../core/checked.hpp"
#include "../core/status.hpp"
#include "../core/views.hpp"

DMOE_NAMESPACE_BEGIN

/// Element types of the safetensors format. Reading converts F64, F32, F16, BF16 and the
/// integer types to float or double; F8 types are recognised but not converted.
enum class st_dtype : std::uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

namespace detail::io {
struct dtype_row {
  st_dtype dtype;
  const char* name;
  std::size_t size;
};
// Declaration order = the reference writer's dtype order (it writes the larger types first).
inline constexpr dtype_row dtype_table[] = {
    {st_dtype::BOOL, "BOOL", 1}, {st_dtype::U8, "U8", 1},   {st_dtype::I8, "I8", 1},
    {st_dtype::F8_E5M2, "F8_E5M2", 1}, {st_dtype::F8_E4M3, "F8_E4M3", 1}, {st_dtype::I16, "I16", 2},
    {st_dtype::U16, "U16", 2},   {st_dtype::F16, "F16", 2}, {st_dtype::BF16, "BF16", 2},
    {st_dtype::I32, "I32", 4},   {st_dtype::U32, "U32", 4}, {st_dtype::F32, "F32", 4},
    {st_dtype::F64, "F64", 8},   {st_dtype::I64, "I64", 8}, {st_dtype::U64, "U64", 8}};
}  // namespace detail::io

/// The format's name of a dtype ("F32", "BF16", ...).
inline const char* to_string(st_dtype t) noexcept { return detail::io::dtype_table[static_cast<int>(t)].name; }
/// Bytes per element.
inline std::size_t dtype_size(st_dtype t) noexcept { return detail::io::dtype_table[static_cast<int>(t)].size; }
/// Parses a dtype name; false if unknown.
inline bool parse_dtype(const std::string& s, st_dtype& out) noexcept {
  for (const auto& r : detail::io::dtype_table)
    if (s == r.name) {
      out = r.dtype;
      return true;
    }
  return false;
}

/// The safetensors dtype that stores T exactly (F32 for float, F64 for double).
template <class T>
inline constexpr st_dtype native_dtype = std::is_same_v<T, double> ? st_dtype::F64 : st_dtype::F32;

/// One tensor's header entry. Offsets are relative to the start of the data buffer.
struct tensor_info {
  std::string name;
  st_dtype dtype = st_dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;  // validated not to overflow when parsed
    return n;
  }
};

namespace detail::io {

/// Header lengths above this are refused (the reference implementation's limit).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

inline std::uint64_t load_u64_le(const unsigned char* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline void store_u64_le(unsigned char* p, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

inline std::string shape_string(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// Little-endian element loads from possibly unaligned bytes.
template <class U>
U load_le(const unsigned char* p) noexcept {
  static_assert(std::is_trivially_copyable_v<U>);
  unsigned char b[sizeof(U)];
  for (std::size_t i = 0; i < sizeof(U); ++i) b[i] = p[i];  // the format is little-endian, so is x86/ARM
  U v;
  std::memcpy(&v, b, sizeof(U));
  return v;
}

inline float half_bits_to_float(std::uint16_t bits) noexcept {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
}
inline float bf16_bits_to_float(std::uint16_t bits) noexcept {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits));
}
/// Round to nearest even, through Eigen's conversions (a double goes through float first).
inline std::uint16_t float_to_half_bits(float v) noexcept {
  return Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(v));
}
inline std::uint16_t float_to_bf16_bits(float v) noexcept {
  return Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(v));
}

/// Converts `n` elements of dtype `dt` at `src` to T. Returns false for an unconvertible dtype.
template <class T>
bool convert_from(st_dtype dt, const unsigned char* src, std::size_t n, T* dst) noexcept {
  switch (dt) {
    case st_dtype::F64:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<double>(src + 8 * i));
      return true;
    case st_dtype::F32:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<float>(src + 4 * i));
      return true;
    case st_dtype::F16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(half_bits_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return true;
    case st_dtype::BF16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_bits_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return true;
    case st_dtype::BOOL:
      for (std::size_t i = 0; i < n; ++i) dst[i] = src[i] ? T(1) : T(0);
      return true;
    case st_dtype::U8:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
      return true;
    case st_dtype::I8:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<std::int8_t>(src + i));
      return true;
    case st_dtype::I16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<std::int16_t>(src + 2 * i));
      return true;
    case st_dtype::U16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<std::uint16_t>(src + 2 * i));
      return true;
    case st_dtype::I32:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<std::int32_t>(src + 4 * i));
      return true;
    case st_dtype::U32:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<std::uint32_t>(src + 4 * i));
      return true;
    case st_dtype::I64:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<std::int64_t>(src + 8 * i));
      return true;
    case st_dtype::U64:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_le<std::uint64_t>(src + 8 * i));
      return true;
    case st_dtype::F8_E5M2:
    case st_dtype::F8_E4M3: return false;
  }
  return false;
}

/// Appends `n` values converted to dtype `dt` (F64, F32, F16, BF16 or U8) little-endian.
template <class S>
void append_converted(std::vector<unsigned char>& out, st_dtype dt, const S* src, std::size_t n) {
  auto put = [&out](const auto v) {
    unsigned char b[sizeof(v)];
    std::memcpy(b, &v, sizeof(v));
    out.insert(out.end(), b, b + sizeof(v));
  };
  for (std::size_t i = 0; i < n; ++i) {
    switch (dt) {
      case st_dtype::F64: put(static_cast<double>(src[i])); break;
      case st_dtype::F32: put(static_cast<float>(src[i])); break;
      case st_dtype::F16: put(float_to_half_bits(static_cast<float>(src[i]))); break;
      case st_dtype::BF16: put(float_to_bf16_bits(static_cast<float>(src[i]))); break;
      case st_dtype::U8: put(static_cast<std::uint8_t>(src[i])); break;
      default: break;  // rejected by the caller
    }
  }
}

/// What kind of non-regular file `st` is, for the error message.
inline const char* file_kind(const std::filesystem::file_status& st) noexcept {
  switch (st.type()) {
    case std::filesystem::file_type::fifo: return "a FIFO";
    case std::filesystem::file_type::character: return "a character device";
    case std::filesystem::file_type::block: return "a block device";
    case std::filesystem::file_type::socket: return "a socket";
    default: return "not a regular file";
  }
}

/// `n` bytes for `what`, an allocation failure as dmoe::error(out_of_memory) naming the bytes.
inline std::vector<unsigned char> allocate_bytes(const char* what, const std::string& label, std::uint64_t n) {
  if (n > (std::numeric_limits<std::size_t>::max)() / 2)  // beyond any vector on this platform
    detail::raisef(errc::out_of_memory, "%s '%s': %llu bytes do not fit in memory on this platform", what, label.c_str(),
                   static_cast<unsigned long long>(n));
  std::vector<unsigned char> v;
  const std::string who = std::string(what) + " '" + label + "'";
  detail::allocate_or_throw(who.c_str(), static_cast<index_t>(n), 1, [&] { v.resize(static_cast<std::size_t>(n)); });
  return v;
}

inline std::vector<unsigned char> read_whole_file(const std::string& path) {
  // Refuse what is not a regular file before opening it: a directory opens as a stream whose
  // tellg is 2^63 - 1 (std::bad_alloc), opening a FIFO blocks until a writer comes, and a device
  // such as /dev/zero never ends. A path that does not exist falls through to the open error.
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (!ec && std::filesystem::is_directory(st))
    detail::raisef(errc::invalid_argument, "safetensors: '%s' is a directory, not a safetensors file", path.c_str());
  if (!ec && std::filesystem::exists(st) && !std::filesystem::is_regular_file(st))
    detail::raisef(errc::invalid_argument,
                   "safetensors: '%s' is %s, not a regular file (safetensors files are read whole, from regular files "
                   "only)",
                   path.c_str(), file_kind(st));
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) detail::raisef(errc::invalid_argument, "safetensors: cannot open '%s' for reading: %s", path.c_str(), std::strerror(errno));
  const std::streamoff size = f.tellg();
  if (size < 0) detail::raisef(errc::invalid_argument, "safetensors: cannot determine the size of '%s'", path.c_str());
  std::vector<unsigned char> bytes =
      allocate_bytes("safetensors: reading", path, static_cast<std::uint64_t>(size));
  f.seekg(0);
  if (size > 0 && !f.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size)))
    detail::raisef(errc::invalid_argument, "safetensors: reading %lld bytes from '%s' failed", static_cast<long long>(size),
           path.c_str());
  return bytes;
}

/// Valid headers nest three levels deep (header, entry, shape); a hostile one could nest millions
/// of arrays, each a heap node once parsed. Refuse anything deeper than this before parsing.
inline constexpr int max_json_depth = 16;

/// Deepest nesting of [ and { outside strings in `h` (a cheap scan; the parser checks the rest).
inline int json_depth(const char* h, std::size_t n) noexcept {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (std::size_t i = 0; i < n; ++i) {
    const char c = h[i];
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = (std::max)(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

/// JSON keys seen so far in every open object, to reject duplicates (nlohmann keeps the last).
struct duplicate_key_guard {
  std::vector<std::set<std::string>> open;
  std::string duplicate;
  bool operator()(int, nlohmann::json::parse_event_t ev, nlohmann::json& j) {
    using ev_t = nlohmann::json::parse_event_t;
    if (ev == ev_t::object_start) {
      open.emplace_back();
    } else if (ev == ev_t::object_end) {
      if (!open.empty()) open.pop_back();
    } else if (ev == ev_t::key && !open.empty() && duplicate.empty() && j.is_string()) {
      if (!open.back().insert(j.get_ref<const std::string&>()).second) duplicate = j.get_ref<const std::string&>();
    }
    return true;
  }
};

}  // namespace detail::io

/// A parsed, validated safetensors file held in memory.
class safetensors_file {
 public:
  /// Reads and validates the file at `path`.
  static safetensors_file from_path(const std::string& path) {
    return safetensors_file(detail::io::read_whole_file(path), path);
  }
  /// Validates `bytes` (the whole file); `label` names it in error messages.
  static safetensors_file from_bytes(std::vector<unsigned char> bytes, std::string label = "<memory>") {
    return safetensors_file(std::move(bytes), std::move(label));
  }
  static safetensors_file from_bytes(const unsigned char* data, std::size_t size, std::string label = "<memory>") {
    std::vector<unsigned char> copy = detail::io::allocate_bytes("safetensors: copying", label, size);
    if (size > 0) std::memcpy(copy.data(), data, size);
    return safetensors_file(std::move(copy), std::move(label));
  }

  const std::string& label() const noexcept { return label_; }
  /// Tensors in data-offset order.
  const std::vector<tensor_info>& tensors() const noexcept { return tensors_; }
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const tensor_info& info(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end())
      detail::raisef(errc::invalid_argument, "safetensors '%s': no tensor named '%s' (the file has %zu tensors)",
                     label_.c_str(), name.c_str(), tensors_.size());
    return tensors_[it->second];
  }
  /// The raw little-endian bytes of a tensor.
  const unsigned char* data(const std::string& name, std::size_t* bytes = nullptr) const {
    const auto& t = info(name);
    if (bytes) *bytes = static_cast<std::size_t>(t.end - t.begin);
    return bytes_.data() + data_start_ + t.begin;
  }
  /// Metadata value, or `fallback` when the key is absent.
  std::string metadata_value(const std::string& key, const std::string& fallback = "") const {
    auto it = metadata_.find(key);
    return it == metadata_.end() ? fallback : it->second;
  }

  /// All elements, row-major, converted to T (float or double).
  template <class T>
  std::vector<T> read(const std::string& name) const {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "safetensors_file::read: T must be float or double");
    const auto& t = info(name);
    std::vector<T> out;
    detail::allocate_or_throw(("safetensors '" + label_ + "': reading tensor '" + name + "'").c_str(), t.numel(),
                              sizeof(T), [&] { out.resize(static_cast<std::size_t>(t.numel())); });
    if (!detail::io::convert_from<T>(t.dtype, bytes_.data() + data_start_ + t.begin, out.size(), out.data()))
      detail::raisef(errc::unsupported, "safetensors '%s': tensor '%s' has dtype %s, which dmoe cannot convert to %s",
                     label_.c_str(), name.c_str(), to_string(t.dtype), std::is_same_v<T, float> ? "float" : "double");
    return out;
  }
  /// A rank-2 tensor as a row-major matrix (rank 1: a (1, n) matrix is not accepted; use read).
  template <class T>
  row_matrix<T> read_matrix(const std::string& name) const {
    const auto& t = info(name);
    if (t.shape.size() != 2)
      detail::raisef(errc::invalid_argument, "safetensors '%s': tensor '%s' has shape %s, expected a matrix (rank 2)",
                     label_.c_str(), name.c_str(), detail::io::shape_string(t.shape).c_str());
    const auto v = read<T>(name);
    row_matrix<T> m;
    detail::allocate_or_throw(("safetensors '" + label_ + "': reading tensor '" + name + "'").c_str(), t.numel(),
                              sizeof(T), [&] { m.resize(static_cast<index_t>(t.shape[0]), static_cast<index_t>(t.shape[1])); });
    std::copy(v.begin(), v.end(), m.data());
    return m;
  }
  /// Checks that `name` exists with exactly `shape`; the message names found and expected shapes.
  const tensor_info& expect_shape(const std::string& name, const std::vector<std::int64_t>& shape) const {
    const auto& t = info(name);
    if (t.shape != shape)
      detail::raisef(errc::invalid_argument, "safetensors '%s': tensor '%s' has shape %s, expected %s", label_.c_str(),
                     name.c_str(), detail::io::shape_string(t.shape).c_str(), detail::io::shape_string(shape).c_str());
    return t;
  }

 private:
  safetensors_file(std::vector<unsigned char> bytes, std::string label) : label_(std::move(label)), bytes_(std::move(bytes)) {
    parse();
  }

  [[noreturn]] void fail(const char* fmt, ...) const
#if defined(__GNUC__)
      __attribute__((format(printf, 2, 3)))
#endif
  {
    char buf[400];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    detail::raise(errc::invalid_argument, "safetensors '" + label_ + "': " + buf);
  }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& what) const {
    detail::raise(errc::invalid_argument, "safetensors '" + label_ + "': tensor '" + name + "': " + what);
  }

  void parse() {
    using json = nlohmann::json;
    const std::uint64_t size = bytes_.size();
    if (size < 8) fail("the file has %llu bytes, fewer than the 8-byte header length", static_cast<unsigned long long>(size));
    const std::uint64_t n = detail::io::load_u64_le(bytes_.data());
    if (n > detail::io::max_header_bytes)
      fail("header length %llu exceeds the limit of %llu bytes", static_cast<unsigned long long>(n),
           static_cast<unsigned long long>(detail::io::max_header_bytes));
    if (n > size - 8)
      fail("header length %llu is larger than the %llu bytes that follow it (truncated file?)",
           static_cast<unsigned long long>(n), static_cast<unsigned long long>(size - 8));
    if (n < 2 || bytes_[8] != '{') fail("%s", "the header must be a JSON object starting with '{'");
    data_start_ = static_cast<std::size_t>(8 + n);
    const std::uint64_t buffer = size - 8 - n;

    const char* h = reinterpret_cast<const char*>(bytes_.data() + 8);
    if (detail::io::json_depth(h, static_cast<std::size_t>(n)) > detail::io::max_json_depth)
      fail("the header nests JSON deeper than %d levels (a valid header has 3)", detail::io::max_json_depth);
    detail::io::duplicate_key_guard guard;
    json header;
    try {
      header = json::parse(h, h + n, std::ref(guard), /*allow_exceptions=*/true);
    } catch (const json::exception& e) {
      fail("the header is not valid JSON: %s", e.what());
    } catch (const std::bad_alloc&) {
      detail::raisef(errc::out_of_memory, "safetensors '%s': parsing the %llu-byte header ran out of memory",
                     label_.c_str(), static_cast<unsigned long long>(n));
    }
    if (!guard.duplicate.empty()) fail("the header has the key '%s' twice", guard.duplicate.c_str());
    if (!header.is_object()) fail("%s", "the header must be a JSON object");

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ must be an object of strings, got %s", v.type_name());
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            fail("__metadata__ value of '%s' must be a string, got %s", m.key().c_str(), m.value().type_name());
          metadata_.emplace(m.key(), m.value().get<std::string>());
        }
        continue;
      }
      tensors_.push_back(parse_entry(name, v, buffer));
    }
    // Offsets: sorted by position, each tensor starts where the previous one ended (no overlap,
    // no hole), the first at 0 and the last at the end of the buffer, as the reference requires.
    std::sort(tensors_.begin(), tensors_.end(), [](const tensor_info& a, const tensor_info& b) {
      return a.begin != b.begin ? a.begin < b.begin : (a.end != b.end ? a.end < b.end : a.name < b.name);
    });
    std::uint64_t pos = 0;
    for (const auto& t : tensors_) {
      if (t.begin < pos)
        fail_tensor(t.name, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                                "] overlap the previous tensor, which ends at " + std::to_string(pos));
      if (t.begin > pos)
        fail_tensor(t.name, "data_offsets begin at " + std::to_string(t.begin) + " but the previous tensor ends at " +
                                std::to_string(pos) + " (the data must be contiguous, without holes)");
      pos = t.end;
    }
    if (pos != buffer)
      fail("the tensors cover %llu bytes of the %llu-byte data buffer (trailing bytes, or a truncated file)",
           static_cast<unsigned long long>(pos), static_cast<unsigned long long>(buffer));
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  tensor_info parse_entry(const std::string& name, const nlohmann::json& v, std::uint64_t buffer) const {
    tensor_info t;
    t.name = name;
    if (!v.is_object()) fail_tensor(name, std::string("entry must be an object, got ") + v.type_name());
    for (auto f = v.begin(); f != v.end(); ++f)
      if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets")
        fail_tensor(name, "unknown field '" + f.key() + "' (expected dtype, shape, data_offsets)");
    auto field = [&](const char* key) -> const nlohmann::json& {
      auto f = v.find(key);
      if (f == v.end()) fail_tensor(name, std::string("missing field '") + key + "'");
      return *f;
    };
    const auto& dt = field("dtype");
    if (!dt.is_string()) fail_tensor(name, std::string("dtype must be a string, got ") + dt.type_name());
    if (!parse_dtype(dt.get<std::string>(), t.dtype))
      fail_tensor(name, "unknown dtype '" + dt.get<std::string>() +
                            "' (expected one of BOOL U8 I8 F8_E5M2 F8_E4M3 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64)");
    const auto& sh = field("shape");
    if (!sh.is_array()) fail_tensor(name, std::string("shape must be an array, got ") + sh.type_name());
    // Element count and byte size, overflow-checked (core/checked.hpp): both must fit in an int64.
    const std::uint64_t limit = static_cast<std::uint64_t>((std::numeric_limits<std::int64_t>::max)());
    detail::checked_size count;
    for (const auto& d : sh) {
      if (!d.is_number_unsigned())
        fail_tensor(name, std::string("shape entries must be non-negative integers, got ") +
                              (d.is_number_integer() ? "a negative number" : d.type_name()));
      const std::uint64_t e = d.get<std::uint64_t>();
      if (e > limit || !count.mul(static_cast<index_t>(e)).ok())
        fail_tensor(name, "shape " + sh.dump() + " has more elements than fit in 64 bits");
      t.shape.push_back(static_cast<std::int64_t>(e));
    }
    if (!count.mul(static_cast<index_t>(dtype_size(t.dtype))).ok())
      fail_tensor(name, "shape " + sh.dump() + " has more bytes than fit in 64 bits");
    const std::uint64_t nbytes = static_cast<std::uint64_t>(count.value());
    const auto& off = field("data_offsets");
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail_tensor(name, "data_offsets must be [begin, end] with non-negative integers, got " + off.dump());
    t.begin = off[0].get<std::uint64_t>();
    t.end = off[1].get<std::uint64_t>();
    if (t.end < t.begin)
      fail_tensor(name, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] end before they begin");
    if (t.end > buffer)
      fail_tensor(name, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                            "] run past the end of the " + std::to_string(buffer) + "-byte data buffer");
    if (t.end - t.begin != nbytes)
      fail_tensor(name, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] span " +
                            std::to_string(t.end - t.begin) + " bytes, but dtype " + to_string(t.dtype) + " and shape " +
                            detail::io::shape_string(t.shape) + " need " + std::to_string(nbytes));
    return t;
  }

  std::string label_;
  std::vector<unsigned char> bytes_;
  std::size_t data_start_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file. Output is deterministic: tensors ordered as the reference writer
/// orders them (larger dtype first, then by name), compact JSON with "__metadata__" first, the
/// header padded with spaces to a multiple of 8 bytes.
class safetensors_writer {
 public:
  /// Adds a tensor, converting `data` (numel(shape) values, row-major) to `dtype` (F64, F32, F16,
  /// BF16 or U8). Throws on a duplicate name, a negative extent or another dtype.
  template <class S>
  void add(const std::string& name, st_dtype dtype, const std::vector<std::int64_t>& shape, const S* data) {
    static_assert(std::is_arithmetic_v<S>, "safetensors_writer::add: data must be float, double or an integer type");
    if (name == "__metadata__") detail::raisef(errc::invalid_argument, "safetensors_writer: '__metadata__' is reserved");
    if (entries_.count(name)) detail::raisef(errc::invalid_argument, "safetensors_writer: tensor '%s' added twice", name.c_str());
    if (dtype != st_dtype::F64 && dtype != st_dtype::F32 && dtype != st_dtype::F16 && dtype != st_dtype::BF16 &&
        dtype != st_dtype::U8)
      detail::raisef(errc::unsupported, "safetensors_writer: tensor '%s': writing dtype %s is not supported (F64, F32, F16, BF16, U8)",
                     name.c_str(), to_string(dtype));
    const index_t count = element_count(name, shape);
    const std::size_t n = static_cast<std::size_t>(count);
    index_t nbytes = 0;
    if (!detail::mul_ok(count, static_cast<index_t>(dtype_size(dtype)), nbytes))
      detail::raisef(errc::invalid_argument, "safetensors_writer: tensor '%s': shape %s in %s has more bytes than fit in 64 bits",
                     name.c_str(), detail::io::shape_string(shape).c_str(), to_string(dtype));
    if (n > 0 && !data) detail::raisef(errc::invalid_argument, "safetensors_writer: tensor '%s': null data", name.c_str());
    entry e{dtype, shape, {}};
    detail::allocate_or_throw(("safetensors_writer: tensor '" + name + "'").c_str(), nbytes, 1,
                              [&] { e.bytes.reserve(static_cast<std::size_t>(nbytes)); });
    detail::io::append_converted(e.bytes, dtype, data, n);
    entries_.emplace(name, std::move(e));
  }
  template <class S>
  void add(const std::string& name, st_dtype dtype, const std::vector<std::int64_t>& shape, const std::vector<S>& data) {
    const std::size_t n = static_cast<std::size_t>(element_count(name, shape));
    if (data.size() != n)
      detail::raisef(errc::invalid_argument, "safetensors_writer: tensor '%s' has %zu values for shape %s (%zu elements)",
                     name.c_str(), data.size(), detail::io::shape_string(shape).c_str(), n);
    add(name, dtype, shape, data.data());
  }
  /// A metadata entry (string to string).
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }

  /// The whole file.
  std::vector<unsigned char> to_bytes() const {
    std::vector<std::pair<const std::string*, const entry*>> order;
    for (const auto& kv : entries_) order.emplace_back(&kv.first, &kv.second);
    std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
      return static_cast<int>(a.second->dtype) > static_cast<int>(b.second->dtype);  // names already sorted
    });
    using json = nlohmann::json;
    std::string header = "{";
    bool first = true;
    if (!metadata_.empty()) {
      header += "\"__metadata__\":" + json(metadata_).dump();
      first = false;
    }
    std::uint64_t pos = 0;
    for (const auto& o : order) {
      const auto& e = *o.second;
      header += first ? "" : ",";
      first = false;
      header += json(*o.first).dump() + ":{\"dtype\":\"" + to_string(e.dtype) + "\",\"shape\":[";
      for (std::size_t i = 0; i < e.shape.size(); ++i) header += (i ? "," : "") + std::to_string(e.shape[i]);
      header += "],\"data_offsets\":[" + std::to_string(pos) + "," + std::to_string(pos + e.bytes.size()) + "]}";
      pos += e.bytes.size();
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');
    std::vector<unsigned char> out(8);
    std::size_t total = 0;
    if (!detail::add_ok(std::size_t{8} + header.size(), static_cast<std::size_t>(pos), total))
      detail::raisef(errc::out_of_memory, "safetensors_writer: the file would have more bytes than fit in memory");
    detail::allocate_or_throw("safetensors_writer: the file", static_cast<index_t>(total), 1, [&] { out.reserve(total); });
    detail::io::store_u64_le(out.data(), header.size());
    out.insert(out.end(), header.begin(), header.end());
    for (const auto& o : order) out.insert(out.end(), o.second->bytes.begin(), o.second->bytes.end());
    return out;
  }

  /// Writes the file: to `path`.tmp first, then renamed over `path`, so that a failed write never
  /// leaves a half-written file under the final name.
  void write(const std::string& path) const {
    const auto bytes = to_bytes();
    const std::string tmp = path + ".tmp";
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      if (!f)
        detail::raisef(errc::invalid_argument, "safetensors_writer: cannot open '%s' for writing: %s", tmp.c_str(),
                       std::strerror(errno));
      f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      f.flush();
      if (!f) {
        f.close();
        std::remove(tmp.c_str());
        detail::raisef(errc::invalid_argument, "safetensors_writer: writing %zu bytes to '%s' failed", bytes.size(),
                       tmp.c_str());
      }
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      const int err = errno;
      std::remove(tmp.c_str());
      detail::raisef(errc::invalid_argument, "safetensors_writer: cannot rename '%s' to '%s': %s", tmp.c_str(),
                     path.c_str(), std::strerror(err));
    }
  }

 private:
  /// Elements of `shape`, in checked arithmetic; throws on a negative extent or an overflow.
  static index_t element_count(const std::string& name, const std::vector<std::int64_t>& shape) {
    detail::checked_size n;
    for (auto s : shape) {
      if (s < 0)
        detail::raisef(errc::invalid_argument, "safetensors_writer: tensor '%s' has a negative extent in shape %s",
                       name.c_str(), detail::io::shape_string(shape).c_str());
      n.mul(static_cast<index_t>(s));
    }
    if (!n.ok())
      detail::raisef(errc::invalid_argument, "safetensors_writer: tensor '%s': shape %s has more elements than fit in 64 bits",
                     name.c_str(), detail::io::shape_string(shape).c_str());
    return n.value();
  }

  struct entry {
    st_dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;
  };
  std::map<std::string, entry> entries_;
  std::map<std::string, std::string> metadata_;
};

DMOE_NAMESPACE_END  // namespace dmoe
