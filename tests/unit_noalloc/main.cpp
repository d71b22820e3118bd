// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Main of the no-allocation test executable (compiled with -DEIGEN_RUNTIME_NO_MALLOC).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
