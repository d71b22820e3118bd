#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Binding overhead: dmoe's forward called from Python against the same call in C++.

    python bench/python/bench_binding.py [--json OUT] [--tokens 1,512] [--threads 1,2]

One layer (default shape S: d_model 768, 24 experts x 128, ReLU, top-k k = 6, so f = 0.25; seed 0)
is built in Python, saved, and loaded by the C++ program bench/python/bench_binding.cpp (Google
Benchmark), which this script configures and builds in build/bench_python (CMake, -j2) with the
optimisation flags the installed extension was compiled with, so that both sides run the same
machine code. The C++ program first checks that its output equals the Python side's on every
(tokens, threads) case, then times

  cpp_forward          layer.forward(ctx, x, y, ws, &stats): what the binding calls
  cpp_forward_nostats  the same without routing statistics (the cheapest C++ call)

and this script times, on the same layer object, input rows and thread count:

  numpy, out=y         MoELayer.forward(x, y) with NumPy arrays (nothing allocated)
  numpy                MoELayer.forward(x) (allocates the NumPy output)
  torch, out=y         MoELayer.forward(x, y) with torch tensors (DLPack)
  dmoe.torch.MoE       module(x) under torch.no_grad() (the nn.Module path without autograd)

Each timing is a repetition of n back-to-back calls (n chosen so that one repetition lasts about
--min-time seconds, as Google Benchmark does); the C++ and Python measurements alternate over
--rounds rounds of --repetitions repetitions each, and the table gives medians over all of them:
wall time per call and, with one thread, the calling thread's CPU time per call (Python:
time.thread_time; Google Benchmark: its cpu_time), which a loaded machine disturbs less.
overhead = Python median - cpp_forward median, per call.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def parse_ints(s: str):
    try:
        v = [int(p) for p in s.split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}")
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the measurements and the table's rows here")
    ap.add_argument("--tokens", type=parse_ints, default=[1, 512])
    ap.add_argument("--threads", type=parse_ints, default=[1, 2])
    ap.add_argument("--shape", type=parse_ints, default=[768, 24, 128, 6],
                    help="d_model,num_experts,expert_width,k (default 768,24,128,6: shape S at f = 0.25)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the C++ and Python measurements")
    ap.add_argument("--repetitions", type=int, default=5, help="repetitions per case and round")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition (default 0.2)")
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "bench_python"),
                    help="CMake build folder of the C++ program (default build/bench_python)")
    ap.add_argument("--cxx-flags", default=None,
                    help="optimisation flags for the C++ program (default: the extension's, see --help text)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    a = ap.parse_args(argv)
    if len(a.shape) != 4:
        ap.error("--shape takes four integers: d_model,num_experts,expert_width,k")
    if a.rounds < 1 or a.repetitions < 1 or a.min_time <= 0:
        ap.error("--rounds and --repetitions must be >= 1, --min-time > 0")
    return a


# ---- the C++ program ---------------------------------------------------------------------------
def extension_flags():
    """Optimisation flags of the installed dmoe._core, read from the scikit-build build folder that
    pyproject.toml keeps (build/python/<wheel tag>/build.ninja); None if there is none."""
    import dmoe._core as core

    candidates = sorted((ROOT / "build" / "python").glob("*/build.ninja"))
    so = Path(core.__file__).name
    for ninja in candidates:
        if not (ninja.parent / so).exists():
            continue
        text = ninja.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"build CMakeFiles/_core\.dir/src/layer_top_k\.cpp\.o:.*?\n((?:  .*\n)+)", text)
        if not m:
            continue
        f = re.search(r"^  FLAGS = (.*)$", m.group(1), re.M)
        if not f:
            continue
        keep = [t for t in shlex.split(f.group(1))
                if re.match(r"-O|-m(arch|tune|avx|fma)|-DNDEBUG|-DDMOE_|-ffast-math|-fno-math", t)]
        return " ".join(keep), str(ninja)
    return None


def build_cxx(build_dir: Path, flags: str, jobs: int) -> Path:
    cmake = shutil.which("cmake")
    if cmake is None:
        sys.exit("bench_binding.py: cmake is not on PATH (Debian: apt-get install cmake)")
    cfg = [cmake, "-S", str(HERE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
           f"-DCMAKE_CXX_FLAGS_RELEASE={flags}"]
    for cmd in (cfg, [cmake, "--build", str(build_dir), "--target", "bench_binding", "-j", str(jobs)]):
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            sys.exit(f"bench_binding.py: {' '.join(cmd)} failed:\n{r.stdout[-4000:]}")
    exe = build_dir / "bench_binding"
    if not exe.exists():
        sys.exit(f"bench_binding.py: {exe} was not built")
    return exe


def run_cxx(exe: Path, work: Path, rows: int, args, round_no: int):
    out = work / f"cxx_{round_no}.json"
    cmd = [str(exe), f"--layer={work / 'layer.safetensors'}", f"--x={work / 'x.f32'}", f"--rows={rows}",
           f"--tokens={','.join(map(str, args.tokens))}", f"--threads={','.join(map(str, args.threads))}",
           f"--ref_dir={work}", f"--benchmark_min_time={args.min_time}", f"--benchmark_repetitions={args.repetitions}",
           f"--benchmark_out={out}", "--benchmark_out_format=json", "--benchmark_format=json"]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_binding.py: the C++ program failed (status {r.returncode}):\n{r.stderr[-4000:]}")
    data = json.loads(out.read_text())
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
    samples = {}
    for b in data["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        if b.get("error_occurred"):
            sys.exit(f"bench_binding.py: {b['name']}: {b.get('error_message')}")
        m = re.match(r"(cpp_forward(?:_nostats)?)/tokens:(\d+)/threads:(\d+)", b["run_name"])
        s = scale[b.get("time_unit", "ns")]
        key = (int(m.group(2)), int(m.group(3)), m.group(1))
        samples.setdefault(key, []).append((b["real_time"] * s, b["cpu_time"] * s))
    return samples, data.get("context", {})


# ---- the Python side ---------------------------------------------------------------------------
def time_calls(fn, min_time: float, reps: int):
    """reps repetitions of n calls; (wall us, thread CPU us) per call for each."""
    fn()
    t0 = time.perf_counter()
    k = 0
    while time.perf_counter() - t0 < min(0.05, min_time / 4) or k < 2:
        fn()
        k += 1
    per = (time.perf_counter() - t0) / k
    n = max(1, int(math.ceil(min_time / max(per, 1e-9))))
    out = []
    for _ in range(reps):
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(n):
            fn()
        w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        out.append(((w1 - w0) / n / 1e3, (c1 - c0) / n / 1e3))
    return out


def python_cases(layer, module, x_np, x_t, tokens):
    import torch

    xn = np.ascontiguousarray(x_np[:tokens])
    yn = np.empty_like(xn)
    xt = x_t[:tokens].contiguous()
    yt = torch.empty_like(xt)

    def module_no_grad():
        with torch.no_grad():
            module(xt)

    return {
        "numpy, out=y": lambda: layer.forward(xn, yn),
        "numpy": lambda: layer.forward(xn),
        "torch, out=y": lambda: layer.forward(xt, yt),
        "dmoe.torch.MoE": module_no_grad,
    }


def machine_info():
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def fmt(v):
    return "-" if v is None else (f"{v:.0f}" if abs(v) >= 1000 else f"{v:.1f}")


def main(argv=None):
    args = parse_args(argv)
    import torch

    import dmoe
    import dmoe.torch as dt

    d, E, n, k = args.shape
    found = extension_flags()
    if args.cxx_flags is not None:
        flags, flags_from = args.cxx_flags, "--cxx-flags"
    elif found:
        flags, flags_from = found
    else:
        flags, flags_from = "-O3 -DNDEBUG", "default (the extension's build folder was not found)"
        print("bench_binding.py: warning: could not read the extension's compile flags; the C++ program uses "
              "-O3 -DNDEBUG, which may not be the extension's", file=sys.stderr)
    exe = build_cxx(Path(args.build_dir), flags, args.jobs)

    rows = max(args.tokens)
    x_np = np.random.default_rng(42).standard_normal((rows, d)).astype(np.float32)
    x_t = torch.from_numpy(x_np)
    layers = {th: dmoe.MoELayer(d, E, n, policy="top_k", activation="relu", k=k, seed=0, threads=th)
              for th in args.threads}
    modules = {th: dt.MoE.from_layer(l) for th, l in layers.items()}
    torch.set_num_threads(max(args.threads))
    samples = {}
    stats = {}
    with tempfile.TemporaryDirectory(prefix="dmoe_bench_binding_") as tmp:
        work = Path(tmp)
        layers[args.threads[0]].save(str(work / "layer.safetensors"))
        x_np.tofile(work / "x.f32")
        for th, l in layers.items():
            for t in args.tokens:
                l.forward(x_np[:t]).tofile(work / f"y_{t}_{th}.f32")
                stats[(t, th)] = l.routing_stats().active_fraction
        ctx = {}
        for r in range(args.rounds):
            cxx, ctx = run_cxx(exe, work, rows, args, r)
            for key, v in cxx.items():
                samples.setdefault(key, []).extend(v)
            for th in args.threads:
                for t in args.tokens:
                    for name, fn in python_cases(layers[th], modules[th], x_np, x_t, t).items():
                        samples.setdefault((t, th, name), []).extend(time_calls(fn, args.min_time, args.repetitions))

    order = ["cpp_forward", "cpp_forward_nostats", "numpy, out=y", "numpy", "torch, out=y", "dmoe.torch.MoE"]
    table = []
    for t in args.tokens:
        for th in args.threads:
            base = samples[(t, th, "cpp_forward")]
            bw = statistics.median(v[0] for v in base)
            bc = statistics.median(v[1] for v in base)
            for name in order:
                s = samples[(t, th, name)]
                w = statistics.median(v[0] for v in s)
                c = statistics.median(v[1] for v in s) if th == 1 else None
                py = not name.startswith("cpp")
                table.append({"tokens": t, "threads": th, "call": name, "wall_us": w, "cpu_us": c,
                              "overhead_wall_us": (w - bw) if py else None,
                              "overhead_cpu_us": (c - bc) if py and c is not None else None,
                              "samples": len(s), "f": stats[(t, th)]})

    info = machine_info()
    print(f"<!-- python bench/python/bench_binding.py; {info['date']}; {info['cpu']}, {info['cores']} cores, load "
          f"{info['loadavg'][0]:.2f}; shape d {d}, {E} x {n}, relu, top_k k={k}; C++ flags '{flags}' "
          f"({flags_from}); medians of {args.rounds} x {args.repetitions} repetitions of >= {args.min_time} s -->")
    print("| tokens | threads | call | wall us | CPU us (1 thread) | overhead wall us | overhead CPU us |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['tokens']} | {r['threads']} | {r['call']} | {fmt(r['wall_us'])} | {fmt(r['cpu_us'])} | "
              f"{fmt(r['overhead_wall_us'])} | {fmt(r['overhead_cpu_us'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "cxx_context": ctx, "cxx_flags": flags, "cxx_flags_from": flags_from,
            "shape": {"d_model": d, "num_experts": E, "expert_width": n, "k": k, "activation": "relu"},
            "torch": torch.__version__, "dmoe": dmoe.__version__,
            "method": {"rounds": args.rounds, "repetitions": args.repetitions, "min_time_s": args.min_time},
            "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
