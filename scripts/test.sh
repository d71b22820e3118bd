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
packages=(cmake g++ libeigen3-dev doctest-dev libbenchmark-dev nlohmann-json3-dev)

ensure_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "test.sh: not a Debian system; assuming ${packages[*]} (or equivalents) are installed" >&2
    return 0
  fi
  local missing=() p
  for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "test.sh: installing ${missing[*]}" >&2
  local sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}

step() { printf '\n==== %s\n' "$*"; }

ensure_packages

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

step "all checks passed"
