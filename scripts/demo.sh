#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds the examples (release preset) and runs the first one: build/release/examples/01_*.
# Arguments are passed to the example (e.g. --quick). Installs missing Debian packages first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs="${DMOE_JOBS:-2}"
packages=(cmake g++ libeigen3-dev doctest-dev libbenchmark-dev nlohmann-json3-dev)

ensure_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "demo.sh: not a Debian system; assuming ${packages[*]} (or equivalents) are installed" >&2
    return 0
  fi
  local missing=() p
  for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "demo.sh: installing ${missing[*]}" >&2
  local sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}

ensure_packages
cmake --preset release
cmake --build --preset release -j "$jobs" --target dmoe_examples

shopt -s nullglob
for d in build/release/examples/01_*; do
  if [[ -f "$d" && -x "$d" ]]; then
    echo "==== $d $*"
    exec "$d" "$@"
  fi
done
echo "demo.sh: no build/release/examples/01_* program" >&2
exit 1
