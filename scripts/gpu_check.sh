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
#   3. compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over a reduced case list
#      (DMOE_SANITIZE_CASES, a doctest -tc filter), each tool under its own timeout.
# Host code is compiled with warnings but without -Werror (a newer host compiler on the device
# machine must not stop the build); every step runs under `timeout`; the toolkit's bin and lib64
# are put on PATH / LD_LIBRARY_PATH (cuBLAS for the benchmark). A one-screen summary ends the run.
# Exit status: nonzero if the tests do not build, do not pass, or a sanitizer reports an error.
# Benchmark figures are printed, never judged. Budget (16 cores): build ~2 min, tests ~1 min,
# sanitizers ~3 min, benchmark ~2 min: under 8 minutes.
#   DMOE_GPU_DRY=1         prints every step's command and runs none (rehearsal without a GPU);
#   DMOE_GPU_BUILD_ONLY=1  runs the build step for real and stops (rehearsal of the build).
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
  exclude="$(git rev-parse --git-path info/exclude)"  # a worktree's .git is a file
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$deps/" "$exclude" 2>/dev/null || echo "/$deps/" >> "$exclude"
  du -sh "$deps"
  exit 0
fi

cuda_home="${CUDA_HOME:-/usr/local/cuda}"
[[ -d "$cuda_home/bin" ]] && export PATH="$cuda_home/bin:$PATH"
[[ -d "$cuda_home/lib64" ]] && export LD_LIBRARY_PATH="$cuda_home/lib64:${LD_LIBRARY_PATH:-}"
nvcc_bin="$(command -v nvcc || echo "$cuda_home/bin/nvcc")"
dry="${DMOE_GPU_DRY:-0}"
run() { if [[ $dry == 1 ]]; then printf 'DRY:'; printf ' %q' "$@"; echo; else "$@"; fi; }
arch="${DMOE_CUDA_ARCH:-90}"
build="${DMOE_GPU_BUILD:-build/gpu}"
out="${OUT:-$build}"
mkdir -p "$build" "$out"

step() { printf '\n==== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

inc=(-Iinclude -Itests/support)
for d in /usr/include/eigen3 "$deps/eigen3"; do [[ -d "$d" ]] && { inc+=(-isystem "$d"); break; }; done
[[ -d "$deps/include" ]] && inc+=(-isystem "$deps/include")
flags=(-std=c++17 -O2 "-arch=sm_$arch" --expt-relaxed-constexpr -diag-suppress=20012
       -Xcompiler=-Wall,-Wextra -UNDEBUG -lineinfo)
summary=()
note() { summary+=("$*"); }
tu_timeout="${DMOE_GPU_TU_TIMEOUT:-420}"  # per nvcc process; a loaded 2-core rehearsal needs more

step "device"
run timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$nvcc_bin" --version | tail -2

step "build (sm_$arch, tests and benchmark in parallel)"
start=$(date +%s)
# one nvcc per TU, in parallel (the backward and forward TUs are the slow ones)
objs=()
pids=()
for src in tests/unit/main.cpp tests/cuda/test_cuda_forward.cu tests/cuda/test_cuda_backward.cu tests/cuda/test_cuda_second_tu.cu; do
  o="$build/$(basename "$src").o"
  objs+=("$o")
  run timeout "$tu_timeout" "$nvcc_bin" "${flags[@]}" "${inc[@]}" -x cu -c "$src" -o "$o" > "$out/build_$(basename "$src").log" 2>&1 &
  pids+=($!)
done
bench_ok=0
bench_pid=
if [[ -f "$deps/include/benchmark/benchmark.h" || -f /usr/include/benchmark/benchmark.h ]]; then
  run timeout "$tu_timeout" "$nvcc_bin" "${flags[@]}" "${inc[@]}" bench/cuda/bench_cuda_forward.cu -o "$build/bench_cuda_forward" \
    -L"$deps/lib" -lbenchmark -lcublas -lpthread > "$out/build_bench.log" 2>&1 &
  bench_pid=$!
fi
build_ok=1
for p in "${pids[@]}"; do wait "$p" || build_ok=0; done
[[ $build_ok == 1 ]] && { run timeout 120 "$nvcc_bin" "-arch=sm_$arch" "${objs[@]}" -o "$build/dmoe_cuda_tests" \
  > "$out/build_tests.log" 2>&1 || build_ok=0; }
if [[ -n "$bench_pid" ]]; then
  wait "$bench_pid" && bench_ok=1 || { echo "benchmark build failed:"; tail -n 30 "$out/build_bench.log"; }
fi
[[ $build_ok == 1 ]] || { echo "test build failed:"; tail -n 60 "$out"/build_*.log; exit 1; }
echo "build seconds: $(( $(date +%s) - start ))"
if [[ "${DMOE_GPU_BUILD_ONLY:-0}" == 1 ]]; then  # rehearsal of the build on a machine without a GPU
  echo "build only: $build/dmoe_cuda_tests, bench built: $bench_ok"
  exit 0
fi
note "build: $(( $(date +%s) - start )) s (benchmark built: $bench_ok)"

step "CUDA tests"
rc=0
export LD_LIBRARY_PATH="$deps/lib:${LD_LIBRARY_PATH:-}"
run timeout 240 "$build/dmoe_cuda_tests" --duration=true 2>&1 | tee "$out/tests.log" || rc=1
if grep -q "DMOE_SKIP" "$out/tests.log"; then
  echo "FAIL: CUDA tests skipped (no device found) on the device machine"
  rc=1
fi
note "tests: rc=$rc, $(grep -E '^\[doctest\] test cases' "$out/tests.log" | tail -1)"

step "compute-sanitizer (reduced case list)"
cases="${DMOE_SANITIZE_CASES:-*edge cases*,*determinism*,*backward refuses*,*dynamic_k backward*}"
sanitizer="$(command -v compute-sanitizer || echo "$cuda_home/bin/compute-sanitizer")"
for tool in memcheck racecheck initcheck synccheck; do
  src=0
  run timeout 120 "$sanitizer" --tool "$tool" --error-exitcode 99 "$build/dmoe_cuda_tests" -tc="$cases" \
    > "$out/sanitize_$tool.log" 2>&1 || src=$?
  tail -n 3 "$out/sanitize_$tool.log"
  [[ $src == 0 ]] || rc=1
  note "compute-sanitizer $tool: rc=$src"
done

if [[ $bench_ok == 1 ]]; then
  step "benchmark"
  run timeout 180 "$build/bench_cuda_forward" \
    --benchmark_out="$out/bench_cuda_forward.json" --benchmark_out_format=json 2>&1 | tee "$out/bench.txt" || true
  note "benchmark: $out/bench_cuda_forward.json"
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

step "summary"
printf '  %s\n' "${summary[@]}"
step "done (rc=$rc)"
exit "$rc"
