// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// Error reporting. Hot-path calls (route, forward, backward) are noexcept and return a
/// [[nodiscard]] `status`; cold paths (construction, IO, conversion) throw `dmoe::error`.
/// A status carries its message in an inline buffer, so reporting an error never allocates.

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "config.hpp"

DMOE_NAMESPACE_BEGIN

/// Error categories.
enum class errc : int {
  ok = 0,
  invalid_argument,     ///< a shape, pointer or option is wrong; the message names it
  unsupported,          ///< valid request that this build or backend cannot do
  workspace_too_small,  ///< the caller's workspace is smaller than `*_workspace_size` asks for
  out_of_memory,
  cuda_error,
  numerical_error,  ///< NaN met where a decision depends on it (router scores)
  internal
};

/// Short name of an error category.
inline const char* to_string(errc c) noexcept {
  switch (c) {
    case errc::ok: return "ok";
    case errc::invalid_argument: return "invalid_argument";
    case errc::unsupported: return "unsupported";
    case errc::workspace_too_small: return "workspace_too_small";
    case errc::out_of_memory: return "out_of_memory";
    case errc::cuda_error: return "cuda_error";
    case errc::numerical_error: return "numerical_error";
    case errc::internal: return "internal";
  }
  return "unknown";
}

/// Result of a hot-path call: ok, or an error category with a message naming the argument
/// and the shapes involved.
class [[nodiscard]] status {
 public:
  status() noexcept = default;

  /// A failure with a printf-style message (formatted into an inline buffer, no allocation).
#if defined(__GNUC__)
  __attribute__((format(printf, 2, 3)))
#endif
  static status
  failure(errc code, const char* fmt, ...) noexcept {
    status s;
    s.code_ = code;
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(s.message_, sizeof(s.message_), fmt, args);
    va_end(args);
    return s;
  }

  bool ok() const noexcept { return code_ == errc::ok; }
  explicit operator bool() const noexcept { return ok(); }
  errc code() const noexcept { return code_; }
  /// Human-readable message; empty when ok.
  const char* message() const noexcept { return message_; }
  /// Native error code of the backend (cudaError_t for CUDA), 0 otherwise.
  int native_code() const noexcept { return native_; }
  void set_native_code(int c) noexcept { native_ = c; }

 private:
  errc code_ = errc::ok;
  int native_ = 0;
  char message_[240] = {};
};

/// Exception thrown by cold-path calls.
class error : public std::runtime_error {
 public:
  error(errc code, const std::string& what) : std::runtime_error(what), code_(code) {}
  errc code() const noexcept { return code_; }

 private:
  errc code_;
};

namespace detail {
[[noreturn]] inline void raise(errc code, const std::string& msg) {
#if DMOE_HAS_EXCEPTIONS
  throw error(code, msg);
#else
  std::fprintf(stderr, "dmoe error (%s): %s\n", to_string(code), msg.c_str());
  std::abort();
#endif
}

/// Throws dmoe::error with a printf-style message (cold paths only).
[[noreturn]] inline void raisef(errc code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
[[noreturn]] inline void raisef(errc code, const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  raise(code, buf);
}
}  // namespace detail

/// Bridges hot-path statuses to exceptions: throws dmoe::error if `s` is not ok.
inline void throw_if_error(const status& s) {
  if (!s.ok()) detail::raise(s.code(), std::string(to_string(s.code())) + ": " + s.message());
}

DMOE_NAMESPACE_END  // namespace dmoe

/// Returns from the enclosing function if the status expression failed.
#define DMOE_TRY(expr)                          \
  do {                                          \
    ::dmoe::status dmoe_try_status_ = (expr);   \
    if (!dmoe_try_status_.ok()) return dmoe_try_status_; \
  } while (0)
