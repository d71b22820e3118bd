#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds the examples (release preset) and runs the first one: build/release/examples/01_*.
# Arguments are passed to the example (e.g. --quick). Installs missing Debian packages first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs="${DMOE_JOBS:-2}"
source scripts/packages.sh

ensure_packages demo.sh
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
