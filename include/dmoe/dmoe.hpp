// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Umbrella header of the CPU build (plain C++17, no CUDA). The safetensors IO headers
/// (<dmoe/io/...>) are not included: they need nlohmann/json (CMake target dmoe::io).

#include "version.hpp"
#include "core/backend.hpp"
#include "core/config.hpp"
#include "core/executor.hpp"
#include "core/extents.hpp"
#include "core/layout.hpp"
#include "core/status.hpp"
#include "core/views.hpp"
#include "core/workspace.hpp"
#include "experts/activation.hpp"
#include "experts/expert_weights.hpp"
#include "experts/infer_precision.hpp"
#include "experts/weight_storage.hpp"
#include "routing/plan.hpp"
#include "routing/routers.hpp"
#include "routing/selection.hpp"
#include "routing/stats.hpp"
#include "layer/moe_layer.hpp"
#include "cpu/moe_layer.hpp"
#include "cpu/dense_ffn.hpp"
#include "cpu/router_regression.hpp"
#include "routing/aux_loss.hpp"
#include "train/parameters.hpp"
#include "train/optimizers.hpp"
#include "adapt/expert_count.hpp"
#include "convert/split.hpp"
#include "convert/convert_ffn.hpp"
#include "convert/attention.hpp"
#include "convert/router_fit.hpp"
#include "convert/sweep.hpp"
