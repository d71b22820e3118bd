#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Sourced by scripts/test.sh and scripts/demo.sh: installs the Debian packages dmoe needs when
# one is missing (apt-get, with sudo when not root). Usage: ensure_packages NAME
# libopenblas-dev: the OpenBLAS peers of the benchmarks (bench/bench_peers.hpp; optional in CMake).
# libopenmpi-dev, openmpi-bin: expert parallelism over MPI (dmoe::mpi; tests/mpi, label mpi, run by
# mpirun as root with --allow-run-as-root; optional in CMake, so installed here to keep CI running them).
packages=(cmake make g++ libeigen3-dev doctest-dev libbenchmark-dev nlohmann-json3-dev libopenblas-dev libopenmpi-dev openmpi-bin)

ensure_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "$1: not a Debian system; assuming ${packages[*]} (or equivalents) are installed" >&2
    return 0
  fi
  local missing=() p
  for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "$1: installing ${missing[*]}" >&2
  local sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}

