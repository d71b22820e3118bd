#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The CUDA backend's device check, in one run (for a session that has a GPU machine):
#   1. configure a Release build for CMAKE_CUDA_ARCHITECTURES=90 (H100/H200; override with
#      DMOE_CUDA_ARCH=80 on an A100) with tests and benchmarks, no examples;
#   2. build only the CUDA targets (dmoe_cuda_tests, bench_cuda_forward) and the unit tests' CUDA
#      host suite, with all cores;
#   3. run the CUDA tests (CTest label cuda, no skip allowed: a DMOE_SKIP here is a failure);
#   4. run the benchmark with JSON output into $OUT (if set) or build/gpu/, and print a short table.
# Exit status: nonzero if the build or any CUDA test fails. The benchmark's figures are printed,
# never judged here. Budget: build ~2-4 min on 16 cores, tests < 1 min, benchmark ~2 min.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

arch="${DMOE_CUDA_ARCH:-90}"
build="${DMOE_GPU_BUILD:-build/gpu}"
jobs="$(nproc 2>/dev/null || echo 4)"
out="${OUT:-$build}"
mkdir -p "$out"

step() { printf '\n==== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
nvcc --version | tail -2

step "configure (CUDA arch $arch)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DDMOE_BUILD_TESTS=ON -DDMOE_BUILD_EXAMPLES=OFF -DDMOE_BUILD_BENCHMARKS=ON -DDMOE_WERROR=ON \
  -DDMOE_INSTALL=OFF > "$out/configure.log" 2>&1 || { cat "$out/configure.log"; exit 1; }
grep -E "dmoe .*CUDA compiler" "$out/configure.log" || true

step "build"
start=$(date +%s)
cmake --build "$build" -j "$jobs" --target dmoe_cuda_tests bench_cuda_forward 2>&1 | tail -n 25
echo "build seconds: $(( $(date +%s) - start ))"

step "CUDA tests"
# A skip on a machine with a device means the device was not found: treat it as a failure.
set +e
(cd "$build" && ctest -L "^cuda$" -E bench --output-on-failure --timeout 300) 2>&1 | tee "$out/ctest_cuda.log"
rc=${PIPESTATUS[0]}
set -e
if grep -q "DMOE_SKIP\|(Skipped)" "$out/ctest_cuda.log"; then
  echo "FAIL: CUDA tests were skipped on a machine that should have a device"
  rc=1
fi

step "benchmark"
"$build/bench/bench_cuda_forward" --benchmark_out="$out/bench_cuda_forward.json" --benchmark_out_format=json \
  2>&1 | tee "$out/bench_cuda_forward.txt" || rc=1

step "table"
python3 - "$out/bench_cuda_forward.json" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
cols = ["f", "mean_k", "moe_ms", "dense_ms", "speedup", "eta", "tflops", "sol"]
print(f"{'benchmark':<28}" + "".join(f"{c:>10}" for c in cols))
for b in d.get("benchmarks", []):
    print(f"{b['name']:<28}" + "".join(f"{b.get(c, float('nan')):>10.3f}" for c in cols))
PY

step "done (rc=$rc)"
exit "$rc"
