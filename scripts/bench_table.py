#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
"""Markdown table of MoE-vs-dense ratios from a bench_forward Google Benchmark JSON file.

    bench_forward --benchmark_out=forward.json --benchmark_out_format=json
    python3 scripts/bench_table.py forward.json [more.json ...] [--out table.md]
    python3 scripts/bench_table.py --backward backward.json      (bench_backward: bwd/fwd ratios)

Each MoE run (moe_<policy>/tokens:T/threads:N/...) is matched with the dense runs of the same
tokens and threads: `dense` (dmoe::dense_ffn, every thread count) and `dense_eigen` (plain Eigen,
threads 1 only). Columns:

    speedup = t_dense / t_moe          eta = t_dense * f / t_moe   (f = measured active fraction;
                                                                      1.0 = time linear in f)

With repetitions (--benchmark_repetitions), the median aggregate of each run is used when present
(--stat picks another aggregate: mean, min; bench_forward adds "min"), otherwise the mean of its
iterations. With several files, a run found in a later file replaces the same run from an earlier
one (re-run a noisy part with --benchmark_filter and pass both files). Standard library only.
"""

import argparse
import json
import re
import statistics
import sys

TIME_SCALE_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
COUNTERS = ("f", "target_f", "mean_k", "exec_frac", "experts_used")
# Fields of a benchmark entry that are not user counters.
NON_COUNTERS = {
    "name", "family_index", "per_family_instance_index", "run_name", "run_type", "repetitions",
    "repetition_index", "threads", "iterations", "real_time", "cpu_time", "time_unit", "label",
    "aggregate_name", "aggregate_unit", "error_occurred", "error_message", "big_o", "rms",
}
POLICY_ORDER = {"top_k": 0, "dynamic_k": 1, "top_any": 2}


def parse_run_name(run_name):
    """'moe_top_k/tokens:512/threads:2/k:6/real_time' -> ('moe_top_k', {'tokens': 512, ...})."""
    parts = run_name.split("/")
    fields = {}
    for p in parts[1:]:
        m = re.fullmatch(r"([A-Za-z_]+):(-?\d+)", p)
        if m:
            fields[m.group(1)] = int(m.group(2))
    return parts[0], fields


def collapse(entries, stat="median"):
    """One record per run: the `stat` aggregate if present, else the mean over iteration entries."""
    groups = {}
    order = []
    for e in entries:
        key = e.get("run_name", e["name"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(e)
    records = []
    for key in order:
        group = groups[key]
        if any(e.get("error_occurred") for e in group):
            msg = next(e.get("error_message", "") for e in group if e.get("error_occurred"))
            print(f"warning: {key} reported an error and is left out: {msg}", file=sys.stderr)
            continue
        medians = [e for e in group if e.get("run_type") == "aggregate" and e.get("aggregate_name") == stat]
        iters = [e for e in group if e.get("run_type", "iteration") == "iteration"]
        if medians:
            src, how = [medians[0]], stat
        elif iters:
            src, how = iters, "mean"
        else:
            continue
        rec = {"run_name": key, "how": how, "n": len(iters)}
        rec["t_ms"] = statistics.fmean(e["real_time"] * TIME_SCALE_TO_MS[e.get("time_unit", "ns")] for e in src)
        counter_keys = {k for e in src for k, v in e.items() if k not in NON_COUNTERS and isinstance(v, (int, float))}
        for k in counter_keys:
            vals = [e[k] for e in src if k in e]
            rec[k] = statistics.fmean(vals)
        rec["label"] = src[0].get("label", "")
        rec["family"], rec["args"] = parse_run_name(key)
        records.append(rec)
    return records


def fmt_time(ms):
    """Milliseconds with 3-4 significant digits."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def target_label(rec):
    tf = rec.get("target_f")
    args = rec["args"]
    if "k" in args:
        return f"k={args['k']} ({tf:.3f})" if tf is not None else f"k={args['k']}"
    if tf is not None:
        return f"{tf:.2f}"
    if "f_pct" in args:
        return f"{args['f_pct'] / 100:.2f}"
    return ""


def build_tables(records):
    dense = {}
    eigen = {}
    moe = []
    for r in records:
        a = r["args"]
        if "tokens" not in a or "threads" not in a:
            continue
        key = (a["tokens"], a["threads"])
        if r["family"] == "dense":
            dense[key] = r
        elif r["family"] == "dense_eigen":
            eigen[key] = r
        elif r["family"].startswith("moe_"):
            r["policy"] = r["family"][len("moe_"):]
            moe.append(r)
    moe.sort(key=lambda r: (r["args"]["tokens"], r["args"]["threads"], POLICY_ORDER.get(r["policy"], 9),
                            r.get("target_f", 0.0)))
    return dense, eigen, moe


def markdown(dense, eigen, moe):
    lines = []
    head = ["policy", "tokens", "threads", "target f", "f", "mean k", "exec frac", "experts used",
            "t_moe ms", "t_dense ms", "speedup", "eta", "t_eigen ms", "speedup eigen", "eta eigen"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
    missing = 0
    for r in moe:
        a = r["args"]
        key = (a["tokens"], a["threads"])
        f = r.get("f")
        row = [r["policy"], str(a["tokens"]), str(a["threads"]), target_label(r),
               f"{f:.3f}" if f is not None else "", f"{r['mean_k']:.2f}" if "mean_k" in r else "",
               f"{r['exec_frac']:.3f}" if "exec_frac" in r else "",
               f"{r['experts_used']:.0f}" if "experts_used" in r else "", fmt_time(r["t_ms"])]
        for i, base in enumerate((dense.get(key), eigen.get(key))):
            if base is None:
                row += ["", "", ""]
                missing += i == 0
                continue
            speedup = base["t_ms"] / r["t_ms"]
            eta = base["t_ms"] * f / r["t_ms"] if f is not None else float("nan")
            row += [fmt_time(base["t_ms"]), f"{speedup:.2f}x", f"{eta:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines, missing


def dense_summary(dense, eigen):
    lines = ["| tokens | threads | t_dense ms (dense_ffn) | t_eigen ms (plain Eigen, 1 thread) | dense_ffn / eigen |",
             "|---:|---:|---:|---:|---:|"]
    for key in sorted(dense):
        d = dense[key]
        e = eigen.get((key[0], 1))
        ratio = f"{d['t_ms'] / e['t_ms']:.2f}" if e else ""
        lines.append(f"| {key[0]} | {key[1]} | {fmt_time(d['t_ms'])} | {fmt_time(e['t_ms']) if e else ''} | {ratio} |")
    return lines


def backward_markdown(records):
    """bench_backward: backward against forward of the same setting, and against dense backward."""
    runs = {}
    for r in records:
        m = re.fullmatch(r"(moe_\w+|dense_layer|dense_eigen)_(forward|backward)", r["family"])
        if not m or "tokens" not in r["args"]:
            continue
        a = dict(r["args"])
        key = (m.group(1), a.get("tokens"), a.get("threads"), a.get("k"), a.get("f_pct"))
        runs.setdefault(key, {})[m.group(2)] = r
    head = ["policy", "tokens", "threads", "setting", "f", "t_fwd ms", "t_bwd ms", "bwd / fwd",
            "t_dense_bwd ms", "speedup vs dense bwd", "t_eigen_bwd ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    order = lambda k: (k[1], k[2], POLICY_ORDER.get(k[0][len("moe_"):], -1 if k[0] == "dense_layer" else 9),
                       k[3] or 0, k[4] or 0)
    for key in sorted(runs, key=order):
        name, tokens, threads, k, f_pct = key
        if name == "dense_eigen":
            continue
        pair = runs[key]
        fwd, bwd = pair.get("forward"), pair.get("backward")
        if bwd is None:
            continue
        dense = runs.get(("dense_layer", tokens, threads, None, None), {}).get("backward")
        eigen = runs.get(("dense_eigen", tokens, 1, None, None), {}).get("backward")
        setting = f"k={k}" if k is not None else (f"f={f_pct / 100:.2f}" if f_pct is not None else "")
        f = bwd.get("f")
        row = [name.replace("moe_", ""), str(tokens), str(threads), setting, f"{f:.3f}" if f is not None else "",
               fmt_time(fwd["t_ms"]) if fwd else "", fmt_time(bwd["t_ms"]),
               f"{bwd['t_ms'] / fwd['t_ms']:.2f}" if fwd else "",
               fmt_time(dense["t_ms"]) if dense else "", f"{dense['t_ms'] / bwd['t_ms']:.2f}x" if dense else "",
               fmt_time(eigen["t_ms"]) if eigen else ""]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def context_line(ctx):
    keys = ["date", "host_name", "num_cpus", "mhz_per_cpu", "dmoe_version", "dmoe_build_type", "compiler_isa",
            "library_build_type"]
    parts = [f"{k}={ctx[k]}" for k in keys if k in ctx]
    return "; ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+",
                    help="Google Benchmark JSON output(s) (--benchmark_out_format=json); '-' for stdin; "
                         "later files override runs of the same name")
    ap.add_argument("--out", help="also write the Markdown to this file")
    ap.add_argument("--stat", default="median",
                    help="aggregate to use when the file has repetitions (median, mean, min; default median)")
    ap.add_argument("--no-dense-summary", action="store_true", help="omit the dense-baseline table")
    ap.add_argument("--backward", action="store_true", help="the file is from bench_backward: backward tables")
    args = ap.parse_args(argv)

    merged = {}
    ctx = {}
    for path in args.json:
        try:
            if path == "-":
                data = json.load(sys.stdin)
            else:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"bench_table.py: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        ctx = ctx or data.get("context", {})
        for rec in collapse(data.get("benchmarks", []), args.stat):
            merged.pop(rec["run_name"], None)  # later files win
            merged[rec["run_name"]] = rec
    records = list(merged.values())
    if args.backward:
        text = "\n".join([f"<!-- {context_line(ctx)} -->"] if ctx else []) + "\n" + "\n".join(backward_markdown(records))
        print(text)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return 0
    dense, eigen, moe = build_tables(records)
    if not moe:
        print("bench_table.py: no moe_* runs in the file", file=sys.stderr)
        return 1

    out = []
    if ctx:
        more = f"; merged from {', '.join(args.json)}" if len(args.json) > 1 else ""
        out.append(f"<!-- {context_line(ctx)}{more} -->")
    how = {r["how"] for r in records}
    how_text = " / ".join("single run" if h == "mean" and all(r["n"] <= 1 for r in records) else h for h in sorted(how))
    out.append(f"Times are wall clock per forward ({how_text}); "
               "speedup = t_dense / t_moe, eta = t_dense * f / t_moe (1.0 = linear in f).")
    out.append("")
    table, missing = markdown(dense, eigen, moe)
    out += table
    if not args.no_dense_summary and dense:
        out.append("")
        out += dense_summary(dense, eigen)
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if missing:
        print(f"warning: {missing} MoE run(s) had no dense run of the same tokens and threads", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
