#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
"""ggml's CPU MoE (llama.cpp's mul_mat_id graph), timed on the top-k cases of a dmoe benchmark JSON.

    bench_forward --benchmark_out=fwd.json --benchmark_out_format=json [--benchmark_repetitions=5]
    scripts/bench_ggml_peer.sh fwd.json          (builds ggml and the peer first, then runs this)
    python3 scripts/bench_ggml_peer.py --ggml build/ggml-peer/build/dmoe_ggml_moe fwd.json

For every top-k run in the file whose name starts with --runs (default infer_top_k: dmoe's inference
path, which keeps no training state, as ggml keeps none), this runs bench/ggml/dmoe_ggml_moe with the
run's shape (S or M, from the JSON's context), tokens, threads and k: a layer built the way llama.cpp
builds its MoE FFN (router product, softmax, argsort top-k, ggml_mul_mat_id for both expert products,
ggml_add_id for the hidden biases, weighted slot sum, output bias), on ggml's threadpool. The weights
are stored in the type the dmoe run uses: bf16 for runs named *_bf16* (bf16 storage or bf16 tiles),
f32 otherwise (--type overrides). Unlike bench_torch_peer.py, ggml's time includes its router, as
dmoe's does. Variable-k runs are skipped: ggml's mul_mat_id takes a fixed k per token.

Every case is also checked (--check of the peer, unless --no-check): ggml's output against a plain-loop
reference of the same graph; a failed check stops the table.

Prints a Markdown table: dmoe's time (the JSON's --stat aggregate, else the mean), ggml's (the best of
--processes fresh processes, each the best of --repetitions means over >= --min-time seconds; the
slowest process in brackets) and ggml / dmoe (> 1: dmoe is faster).
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch_peer import fmt_ms, load_cases, shape_of  # noqa: E402  (same JSON reading and shapes)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="Google Benchmark JSON from bench_forward or bench_shape_m")
    ap.add_argument("--ggml", default="build/ggml-peer/build/dmoe_ggml_moe",
                    help="the peer program (scripts/bench_ggml_peer.sh builds it; default %(default)s)")
    ap.add_argument("--runs", default="infer_top_k",
                    help="prefix of the dmoe run names to compare (default infer_top_k; moe_top_k: the "
                         "training forward)")
    ap.add_argument("--stat", default="median", help="aggregate of dmoe's runs to compare (median, mean, min)")
    ap.add_argument("--filter", default="", help="regular expression on the run names to keep (default: all)")
    ap.add_argument("--type", choices=("f32", "f16", "bf16"), default=None,
                    help="ggml's weight type for every case (default: bf16 for *_bf16* runs, else f32)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timed repetition (default 0.3)")
    ap.add_argument("--repetitions", type=int, default=3, help="timed repetitions per case; best is kept (default 3)")
    ap.add_argument("--processes", type=int, default=3,
                    help="fresh peer processes per case; the best is kept, the slowest shown (default 3: one "
                         "process's time varies by up to 1.4x with where its buffers land)")
    ap.add_argument("--no-check", action="store_true", help="skip the peer's check against its plain loops")
    args = ap.parse_args(argv)
    for name in ("processes", "repetitions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not args.min_time > 0:
        ap.error(f"--min-time must be positive seconds (got {args.min_time})")
    return args


def run_peer(args, shape, case, wtype):
    d, experts, width, act = shape
    cmd = [args.ggml, "--tokens", str(case["args"]["tokens"]), "--threads", str(case["args"]["threads"]),
           "--d", str(d), "--experts", str(experts), "--width", str(width), "--act", act,
           "--k", str(case["args"]["k"]), "--type", wtype, "--min-time", str(args.min_time),
           "--repetitions", str(args.repetitions)]
    times = []
    for i in range(args.processes):
        # The check is the same in every process (same seed), so the first one does it.
        proc = subprocess.run(cmd + (["--check"] if i == 0 and not args.no_check else []),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_ggml_peer.py: {' '.join(cmd)} failed (status {proc.returncode}):\n{proc.stderr.strip()}")
        times.append(json.loads(proc.stdout.strip().splitlines()[-1])["best_ms"])
    return min(times), max(times)


def main(argv=None):
    args = parse_args(argv)
    if not (os.path.isfile(args.ggml) and os.access(args.ggml, os.X_OK)):
        print(f"bench_ggml_peer.py: the peer program {args.ggml} does not exist; build it with\n"
              f"  scripts/bench_ggml_peer.sh          (fetches ggml's sources from PyPI and builds)",
              file=sys.stderr)
        return 2
    ctx, cases = load_cases(args.json, args.stat, args.filter, args.runs)
    shape_name, shape = shape_of(ctx, args.json)
    top_k = [c for c in cases if c["policy"] == "top_k" and "k" in c["args"]]
    # The JSON's order is the benchmark's (interleaved when randomised); the table reads better grouped.
    top_k.sort(key=lambda c: (c["name"].split("/")[0], -c["args"]["tokens"], c["args"]["threads"], c["args"]["k"]))
    if not top_k:
        print(f"bench_ggml_peer.py: {args.json} has no top-k run starting with {args.runs!r}", file=sys.stderr)
        return 1
    skipped = len(cases) - len(top_k)
    print(f"shape {shape_name}: d {shape[0]}, {shape[1]} experts x {shape[2]}, {shape[3]}; "
          f"dmoe {top_k[0]['how']} of the JSON, ggml best of {args.processes} processes x {args.repetitions} "
          f"repetitions x >= {args.min_time} s (slowest process in brackets)"
          + ("" if args.no_check else "; every ggml case checked against plain loops")
          + (f"; {skipped} variable-k runs skipped" if skipped else ""))
    print()
    print("| dmoe run | tokens | threads | k | t_dmoe ms | ggml weights | t_ggml ms | ggml / dmoe |")
    print("|---|---|---|---|---|---|---|---|")
    for c in top_k:
        wtype = args.type or ("bf16" if "_bf16" in c["name"].split("/")[0] else "f32")
        best, worst = run_peer(args, shape, c, wtype)
        a = c["args"]
        print(f"| {c['name'].split('/')[0]} | {a['tokens']} | {a['threads']} | {a['k']} | {fmt_ms(c['t_ms'])} "
              f"| {wtype} | {fmt_ms(best)} ({fmt_ms(worst)}) | {best / c['t_ms']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
