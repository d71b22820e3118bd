#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
#
# Builds the ggml peer benchmark (bench/ggml) and, given a dmoe benchmark JSON, compares them:
#
#   scripts/bench_ggml_peer.sh                      fetch + build only; prints the program's path
#   scripts/bench_ggml_peer.sh fwd.json [ARGS...]   then python3 scripts/bench_ggml_peer.py fwd.json ARGS
#
# ggml's sources come from PyPI: the source distribution of llama-cpp-python (MIT), which vendors
# llama.cpp and its ggml (version pinned and its SHA-256 checked below; `pip download` fetches it, as
# PyPI is what these machines reach). Only vendor/llama.cpp/ggml is extracted. ggml is built as
# llama.cpp builds it by default (Release, GGML_NATIVE: -march=native, OpenMP). Takes a few minutes on
# 2 cores the first time; later calls reuse the build.
# Environment: DMOE_GGML_DIR (default build/ggml-peer), DMOE_JOBS (default 2), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
dir="${DMOE_GGML_DIR:-build/ggml-peer}"
py="${PYTHON:-python3}"
sdist="llama_cpp_python-${version}.tar.gz"

if [[ ! -f "$dir/src/ggml/CMakeLists.txt" ]]; then
  mkdir -p "$dir/download"
  if [[ ! -f "$dir/download/$sdist" ]]; then
    echo "bench_ggml_peer.sh: fetching llama-cpp-python==$version (sources) from PyPI" >&2
    "$py" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$dir/download" \
      || { echo "bench_ggml_peer.sh: pip download failed (is pip installed? apt-get install python3-pip)" >&2; exit 1; }
  fi
  got=$(sha256sum "$dir/download/$sdist" | cut -d' ' -f1)
  if [[ "$got" != "$sha256" ]]; then
    echo "bench_ggml_peer.sh: $dir/download/$sdist has SHA-256 $got, expected $sha256; remove it and retry" >&2
    exit 1
  fi
  rm -rf "$dir/src" && mkdir -p "$dir/src"
  tar -xzf "$dir/download/$sdist" -C "$dir/src" --strip-components=3 "llama_cpp_python-${version}/vendor/llama.cpp/ggml"
fi

cmake -S bench/ggml -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DDMOE_GGML_SOURCE_DIR="$PWD/$dir/src/ggml" > "$dir/configure.log" \
  || { cat "$dir/configure.log" >&2; exit 1; }
cmake --build "$dir/build" --target dmoe_ggml_moe -j "${DMOE_JOBS:-2}" > "$dir/build.log" \
  || { tail -50 "$dir/build.log" >&2; exit 1; }

if [[ $# -eq 0 ]]; then
  echo "$dir/build/dmoe_ggml_moe"
else
  exec "$py" scripts/bench_ggml_peer.py --ggml "$dir/build/dmoe_ggml_moe" "$@"
fi
