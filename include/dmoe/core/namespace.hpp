// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// dmoe's namespaces. Everything public is in `dmoe::`; internals are in `dmoe::detail` and its
/// nested namespaces (`detail::cpu_backend`, `detail::cuda_backend`, `detail::io`,
/// `detail::conversion`). Both live inside an inline namespace named after the ABI generation, so
/// that two translation units built against incompatible dmoe headers fail to link instead of
/// silently mixing class layouts (the one-definition rule would not be diagnosed otherwise).
/// Users write `dmoe::moe_layer`; the inline namespace shows up only in symbol names.
/// The ABI generation changes when a public class's layout or a function's meaning changes in a
/// way that old object files would misread; it is not bumped for every release.

#define DMOE_ABI_NAMESPACE abi_v0
#define DMOE_NAMESPACE_BEGIN \
  namespace dmoe {           \
  inline namespace DMOE_ABI_NAMESPACE {
#define DMOE_NAMESPACE_END \
  }                        \
  }
