// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Umbrella header of the CUDA backend: include it from a .cu translation unit compiled by nvcc
/// (sm_80 or newer) and link dmoe::cuda. It includes the CPU umbrella too (the CUDA layer uploads
/// its weights from a CPU layer); <dmoe/dmoe.hpp> never includes CUDA.

#include "dmoe.hpp"
#include "cuda/common.cuh"
#include "cuda/layout.hpp"
#include "cuda/route.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/experts.cuh"
#include "cuda/moe_layer.cuh"
