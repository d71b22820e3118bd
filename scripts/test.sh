#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Full check, as CI runs it (.ci/run):
#   1. release preset: build everything (tests, header checks, examples, benchmarks), run every
#      CTest test (unit, headers, compile_fail, examples, packaging, bench smoke);
#   2. asan preset (ASan + UBSan, RelWithDebInfo): build only the unit tests and examples
#      (target dmoe_check) and run them.
# Installs missing Debian packages first. Idempotent; exits nonzero on the first failure.
# Environment: DMOE_JOBS (default 2) build/test parallelism; DMOE_SKIP_ASAN=1 skips step 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs="${DMOE_JOBS:-2}"
source scripts/packages.sh

step() { printf '\n==== %s\n' "$*"; }

ensure_packages test.sh

step "release: configure"
cmake --preset release
step "release: build"
cmake --build --preset release -j "$jobs"
step "release: test"
ctest --preset release -j "$jobs" --output-on-failure

if [[ "${DMOE_SKIP_ASAN:-0}" != 1 ]]; then
  step "asan: configure"
  cmake --preset asan
  step "asan: build (unit tests and examples)"
  cmake --build --preset asan -j "$jobs"
  step "asan: test (without packaging, bench, compile_fail, headers)"
  ctest --preset asan -j "$jobs" --output-on-failure
fi

step "python: package build and pytest"
bash scripts/test_python.sh

step "all checks passed"
