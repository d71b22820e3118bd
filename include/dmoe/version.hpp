// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "core/namespace.hpp"
/// \file
/// The one source of dmoe's version. CMake reads these three macros with a regex.

#define DMOE_VERSION_MAJOR 0
#define DMOE_VERSION_MINOR 1
#define DMOE_VERSION_PATCH 0

DMOE_NAMESPACE_BEGIN
struct version_info { int major, minor, patch; };
/// The version of the headers in use.
constexpr version_info version() noexcept {
  return {DMOE_VERSION_MAJOR, DMOE_VERSION_MINOR, DMOE_VERSION_PATCH};
}
DMOE_NAMESPACE_END  // namespace dmoe
