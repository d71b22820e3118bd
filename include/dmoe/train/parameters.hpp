// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// The parameter views optimizers take (param_span, param_list, param_group, parameters_of).
/// They are defined in layer/parameters.hpp, next to the layers that return them; this header
/// keeps the train/ spelling working.

#include "../layer/parameters.hpp"
