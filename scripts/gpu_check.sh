#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The CUDA backend's device check, in one run, for a session that has a GPU machine.
#
#   bash scripts/gpu_check.sh --prepare   # HERE (the build machine): copy the header-only deps
#                                         # (Eigen, doctest) and Google Benchmark into .gpu_deps/
#                                         # (git-ignored) for a bare device machine with no network
#   bash scripts/gpu_check.sh             # THERE (device tool: carry [".gpu_deps"]); OUT=<dir> collects
#
# The device image has nvcc and CMake but not Eigen, doctest or Google Benchmark, so the check
# compiles the two CUDA programs directly with nvcc, with the flags of dmoe_cuda_own_target
# (cmake/dmoeOwnTargets.cmake), for DMOE_CUDA_ARCH (default 90), both at once:
#   1. dmoe_cuda_tests (tests/cuda + the doctest main), then runs it: any DMOE_SKIP (no device
#      found) or failure fails the check;
#   2. bench_cuda_forward, then runs it with JSON output into $OUT (or build/gpu) and prints a table.
# Exit status: nonzero if the tests do not build or do not pass. Benchmark figures are printed,
# never judged. Budget: build ~1.5 min (16 cores, both programs in parallel), tests < 1 min,
# benchmark ~2 min.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deps=.gpu_deps
if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf "$deps"
  mkdir -p "$deps/include" "$deps/lib"
  cp -r /usr/include/eigen3 "$deps/eigen3"
  cp -r /usr/include/doctest "$deps/include/"
  cp -r /usr/include/benchmark "$deps/include/" 2>/dev/null || echo "no Google Benchmark headers: the bench is skipped there"
  cp -P /usr/lib/x86_64-linux-gnu/libbenchmark.so* "$deps/lib/" 2>/dev/null || true
  grep -qx "/$deps/" .git/info/exclude 2>/dev/null || echo "/$deps/" >> .git/info/exclude
  du -sh "$deps"
  exit 0
fi

arch="${DMOE_CUDA_ARCH:-90}"
build="${DMOE_GPU_BUILD:-build/gpu}"
out="${OUT:-$build}"
mkdir -p "$build" "$out"

step() { printf '\n==== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

inc=(-Iinclude -Itests/support)
for d in /usr/include/eigen3 "$deps/eigen3"; do [[ -d "$d" ]] && { inc+=(-isystem "$d"); break; }; done
[[ -d "$deps/include" ]] && inc+=(-isystem "$deps/include")
flags=(-std=c++17 -O2 "-arch=sm_$arch" --expt-relaxed-constexpr -diag-suppress=20012 -Werror=all-warnings
       -Xcompiler=-Wall,-Wextra,-Wshadow,-Wconversion -UNDEBUG)

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
nvcc --version | tail -2

step "build (sm_$arch, tests and benchmark in parallel)"
start=$(date +%s)
nvcc "${flags[@]}" "${inc[@]}" tests/unit/main.cpp tests/cuda/test_cuda_forward.cu tests/cuda/test_cuda_second_tu.cu -o "$build/dmoe_cuda_tests" \
  > "$out/build_tests.log" 2>&1 &
tests_pid=$!
bench_ok=0
if [[ -f "$deps/include/benchmark/benchmark.h" || -f /usr/include/benchmark/benchmark.h ]]; then
  nvcc "${flags[@]}" -O3 "${inc[@]}" bench/cuda/bench_cuda_forward.cu -o "$build/bench_cuda_forward" \
    -L"$deps/lib" -lbenchmark -lcublas -lpthread > "$out/build_bench.log" 2>&1 &
  bench_pid=$!
  wait "$bench_pid" && bench_ok=1 || { echo "benchmark build failed:"; tail -n 30 "$out/build_bench.log"; }
fi
wait "$tests_pid" || { echo "test build failed:"; tail -n 60 "$out/build_tests.log"; exit 1; }
echo "build seconds: $(( $(date +%s) - start ))"

step "CUDA tests"
rc=0
LD_LIBRARY_PATH="$deps/lib:${LD_LIBRARY_PATH:-}" "$build/dmoe_cuda_tests" --duration=true 2>&1 | tee "$out/tests.log" \
  || rc=1
if grep -q "DMOE_SKIP" "$out/tests.log"; then
  echo "FAIL: CUDA tests skipped (no device found) on the device machine"
  rc=1
fi

if [[ $bench_ok == 1 ]]; then
  step "benchmark"
  LD_LIBRARY_PATH="$deps/lib:${LD_LIBRARY_PATH:-}" "$build/bench_cuda_forward" \
    --benchmark_out="$out/bench_cuda_forward.json" --benchmark_out_format=json 2>&1 | tee "$out/bench.txt" || true
  step "table"
  python3 - "$out/bench_cuda_forward.json" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
cols = ["f", "mean_k", "moe_ms", "dense_ms", "speedup", "eta", "tflops", "sol", "graph_ms", "graph_sol"]
print(f"{'benchmark':<28}" + "".join(f"{c:>10}" for c in cols))
for b in d.get("benchmarks", []):
    print(f"{b['name']:<28}" + "".join(f"{b.get(c, float('nan')):>10.3f}" for c in cols))
PY
fi

step "done (tests rc=$rc)"
exit "$rc"
