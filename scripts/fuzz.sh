#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Fuzzes the safetensors reader and the MoE layer / dense FFN loaders on top of it
# (tests/fuzz/fuzz_safetensors.cpp) with libFuzzer, ASan and UBSan for a bounded time.
#   bash scripts/fuzz.sh [seconds=60] [jobs=1]
# Builds into build/fuzz/, writes a seed corpus of valid files (every dtype dmoe writes, empty
# tensors, metadata, small layer and FFN files) into build/fuzz/seeds/, keeps the growing corpus in build/fuzz/corpus/ and
# any crashing input in build/fuzz/artifacts/ (DMOE_FUZZ_DIR overrides build/fuzz). Exit status 0 =
# no finding. Missing tools are installed through apt-get, unless DMOE_FUZZ_NO_INSTALL=1: then the
# script prints DMOE_SKIP and exits 77 (for a CTest smoke test).
set -euo pipefail
secs="${1:-60}"
jobs="${2:-1}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${DMOE_FUZZ_DIR:-$root/build/fuzz}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v clang++ >/dev/null 2>&1 || need+=(clang)
[ -f /usr/include/nlohmann/json.hpp ] || need+=(nlohmann-json3-dev)
[ -d /usr/include/eigen3 ] || need+=(libeigen3-dev)
if ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 &&
   ! ls /usr/lib/llvm-*/lib/clang/*/lib/x86_64-pc-linux-gnu/libclang_rt.fuzzer.a >/dev/null 2>&1; then
  need+=(libclang-rt-dev)
fi
if [ "${#need[@]}" -gt 0 ] && [ "${DMOE_FUZZ_NO_INSTALL:-0}" = 1 ]; then
  echo "fuzz.sh: DMOE_SKIP: missing ${need[*]} and DMOE_FUZZ_NO_INSTALL=1"
  exit 77
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "fuzz.sh: installing ${need[*]}"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

mkdir -p "$out/seeds" "$out/corpus" "$out/artifacts"
flags=(-std=c++17 -g -O1 -fno-omit-frame-pointer -I"$root/include" -isystem /usr/include/eigen3)
echo "fuzz.sh: building the fuzzer and the seed writer"
clang++ "${flags[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  "$root/tests/fuzz/fuzz_safetensors.cpp" -o "$out/fuzz_safetensors"
clang++ "${flags[@]}" "$root/tests/fuzz/make_seeds.cpp" -o "$out/make_seeds"
"$out/make_seeds" "$out/seeds"

echo "fuzz.sh: fuzzing for ${secs}s with ${jobs} job(s)"
cd "$out"
args=(-max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$out/artifacts/"
      -print_final_stats=1 -dict="$root/tests/fuzz/safetensors.dict")
if [ "$jobs" -gt 1 ]; then args+=(-fork="$jobs"); fi
"$out/fuzz_safetensors" "${args[@]}" "$out/corpus" "$out/seeds"
