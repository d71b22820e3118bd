// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// How an external weight matrix of a projection from `in` to `out` features is stored. Shared by
/// io/ (checkpoints) and convert/ (attention projections), which must not depend on each other:
/// io/ needs a JSON parser, convert/ does not.

DMOE_NAMESPACE_BEGIN

enum class weight_layout {
  out_in,  ///< (out, in): y = x W^T + b, PyTorch nn.Linear.weight
  in_out   ///< (in, out): y = x W + b, dmoe's row-vector convention and GPT-2 Conv1D
};

DMOE_NAMESPACE_END  // namespace dmoe
