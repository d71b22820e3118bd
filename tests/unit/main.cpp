// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The unit-test executable's main (doctest). Test files live in tests/unit/<suite>/test_*.cpp
// with TEST_SUITE("<suite>"), suites: routing, layer, views, errors, dense, backward, train, io, convert, cuda_host.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
