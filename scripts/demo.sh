#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds the examples (release preset) and runs the demo, example 04: the all-MiniLM-L6-v2 FFNs in
# tests/data converted into dynamic-k MoE layers, routers fitted, the threshold sweep against the
# MoEfication top-k baseline, and the measured speed against the dense layer.
# Arguments are passed to the example (e.g. --quick, --threads 1, --csv DIR). Installs missing
# Debian packages first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs="${DMOE_JOBS:-2}"
source scripts/packages.sh

ensure_packages demo.sh
cmake --preset release
cmake --build --preset release -j "$jobs" --target 04_convert_minilm

demo=build/release/examples/04_convert_minilm
echo "==== $demo $*"
exec "$demo" --csv build/release "$@"
