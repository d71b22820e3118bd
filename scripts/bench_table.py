#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
"""Markdown tables of MoE-vs-peer ratios from dmoe's Google Benchmark JSON files.

    bench_forward --benchmark_out=forward.json --benchmark_out_format=json
    python3 scripts/bench_table.py forward.json [more.json ...] [--out table.md]
    python3 scripts/bench_table.py m.json                        (bench_shape_m: same tables)
    python3 scripts/bench_table.py --decode decode.json          (bench_decode: GB/s vs bandwidth)
    python3 scripts/bench_table.py --backward backward.json      (bench_backward: bwd/fwd ratios)

Each MoE run (moe_<policy>/tokens:T/threads:N/...) is matched with the peers of the same tokens
and threads measured in the same run: `dense` (dmoe::dense_ffn), `dense_eigen` (plain Eigen,
threads 1 only), `dense_openblas` (cblas_sgemm) and its per-expert loop twin `loop_<policy>` (same
arguments, OpenBLAS). bench_shape_m's dense_eq* runs (the equal-FLOPs dense FFN) stand in for the
dense ones. Columns:

    speedup = t_dense / t_moe          eta = (t_dense / dense FLOPs) * moe FLOPs / t_moe
                                           = t_dense * f / t_moe for the full-width dense FFN
                                             (f = measured active fraction; 1.0 = time linear in f)
    GFLOP/s = executed expert FLOPs / t  (the `flops` counter over the chosen time statistic)
    % peak  = GFLOP/s over the FMA peak the binary measured for that thread count (context)
    vs loop = t_loop / t_moe             (> 1: dmoe is faster than the per-expert loop; the loop's
                                          time leaves out the router, dmoe's includes it)
    vs best dense = t_best / t_moe, the fastest dense peer of that tokens and threads

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
# bench_shape_m's equal-FLOPs dense peers play the part of bench_forward's dense ones.
DENSE_ALIASES = {"dense_eq": "dense", "dense_eq_eigen": "dense_eigen", "dense_eq_openblas": "dense_openblas"}
DENSE_NAMES = {"dense": "dense_ffn", "dense_eigen": "eigen", "dense_openblas": "openblas"}
# Fields of a benchmark entry that are not user counters.
NON_COUNTERS = {
    "name", "family_index", "per_family_instance_index", "run_name", "run_type", "repetitions",
    "repetition_index", "threads", "iterations", "real_time", "cpu_time", "time_unit", "label",
    "aggregate_name", "aggregate_unit", "error_occurred", "error_message", "big_o", "rms",
}
POLICY_ORDER = {"top_k": 0, "top_k infer": 0.5, "dynamic_k": 1, "dynamic_k infer": 1.5, "top_any": 2}


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
    """dense, eigen, openblas: {(tokens, threads): record}; moe: sorted MoE records; loops:
    {run name of the matching moe_ run: loop record}."""
    dense, eigen, blas, loops = {}, {}, {}, {}
    moe = []
    for r in records:
        a = r["args"]
        if "tokens" not in a or "threads" not in a:
            continue
        key = (a["tokens"], a["threads"])
        fam = DENSE_ALIASES.get(r["family"], r["family"])
        if fam == "dense":
            dense[key] = r
        elif fam == "dense_eigen":
            eigen[key] = r
        elif fam == "dense_openblas":
            blas[key] = r
        elif fam.startswith("moe_"):
            r["policy"] = fam[len("moe_"):]
            moe.append(r)
        elif fam.startswith("infer_"):  # moe_layer::infer (fused combine), matched with moe_'s loop twin
            r["policy"] = fam[len("infer_"):] + " infer"
            r["loop_key"] = "moe_" + r["run_name"][len("infer_"):]
            moe.append(r)
        elif fam.startswith("loop_"):
            loops["moe_" + r["run_name"][len("loop_"):]] = r
    moe.sort(key=lambda r: (r["args"]["tokens"], r["args"]["threads"], POLICY_ORDER.get(r["policy"], 9),
                            r.get("target_f", 0.0)))
    return dense, eigen, blas, moe, loops


def eta(base, r):
    """FLOP rate of r over base's: t_base * (flops_r / flops_base) / t_r; with no flops counters
    (older files) t_base * f / t_r, f being r's measured active fraction."""
    if "flops" in r and base.get("flops"):
        return base["t_ms"] * (r["flops"] / base["flops"]) / r["t_ms"]
    f = r.get("f")
    return base["t_ms"] * f / r["t_ms"] if f is not None else float("nan")


def peak_for(ctx, threads):
    """The FMA peak (GFLOP/s) the binary measured for `threads` (bench_limits.hpp's fma_peak)."""
    try:
        p1 = float(ctx["limit_fma_gflops_1t"])
        pall = float(ctx["limit_fma_gflops_all"])
        nall = int(ctx["limit_threads_all"])
    except (KeyError, ValueError):
        return None
    if threads <= 1:
        return p1
    return pall if threads >= nall else min(p1 * threads, pall)


def gflops(r):
    return r["flops"] / (r["t_ms"] * 1e-3) / 1e9 if r.get("flops") and r["t_ms"] > 0 else None


def limits_line(ctx):
    if "limit_fma_gflops_1t" not in ctx:
        return None
    n = ctx.get("limit_threads_all", "?")
    smoke = " **(smoke-run probe: not the machine's limits)**" if "limit_smoke" in ctx else ""
    return (f"Limits measured by the binary in this run{smoke}: fp32 FMA peak ({ctx.get('limit_fma_isa', '?')}) "
            f"{ctx['limit_fma_gflops_1t']} GFLOP/s on 1 thread, {ctx.get('limit_fma_gflops_all', '?')} on {n}; "
            f"read {ctx.get('limit_read_gbs_1t', '?')} / {ctx.get('limit_read_gbs_all', '?')} GB/s and copy "
            f"{ctx.get('limit_copy_gbs_1t', '?')} / {ctx.get('limit_copy_gbs_all', '?')} GB/s (1 / {n} threads) over "
            f"{ctx.get('limit_bw_buffer_mib', '?')} MiB; LLC {ctx.get('limit_llc_mib', '?')} MiB.")


def peers_markdown(dense, eigen, blas, moe, loops, ctx):
    """Per MoE run: its FLOP rate, % of peak, and time ratios to the loop and the best dense peer."""
    head = ["policy", "tokens", "threads", "setting", "f", "t_moe ms", "GFLOP/s", "% peak", "t_loop ms",
            "vs loop", "t_openblas ms", "speedup openblas", "eta openblas", "best dense", "vs best dense",
            "eta best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for r in moe:
        a = r["args"]
        key = (a["tokens"], a["threads"])
        g = gflops(r)
        peak = peak_for(ctx, a["threads"])
        loop = loops.get(r.get("loop_key", r["run_name"]))
        b = blas.get(key)
        cands = [(n, x) for n, x in (("dense_ffn", dense.get(key)), ("eigen", eigen.get((key[0], 1)) if key[1] == 1 else None),
                                     ("openblas", b)) if x is not None]
        best = min(cands, key=lambda c: c[1]["t_ms"]) if cands else None
        f = r.get("f")
        row = [r["policy"], str(a["tokens"]), str(a["threads"]), target_label(r), f"{f:.3f}" if f is not None else "",
               fmt_time(r["t_ms"]), f"{g:.1f}" if g else "", f"{100 * g / peak:.1f}" if g and peak else "",
               fmt_time(loop["t_ms"]) if loop else "", f"{loop['t_ms'] / r['t_ms']:.2f}x" if loop else "",
               fmt_time(b["t_ms"]) if b else "", f"{b['t_ms'] / r['t_ms']:.2f}x" if b else "",
               f"{eta(b, r):.2f}" if b else "",
               best[0] if best else "", f"{best[1]['t_ms'] / r['t_ms']:.2f}x" if best else "",
               f"{eta(best[1], r):.2f}" if best else ""]
        lines.append("| " + " | ".join(row) + " |")
    return lines


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
            row += [fmt_time(base["t_ms"]), f"{speedup:.2f}x", f"{eta(base, r):.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines, missing


def dense_summary(dense, eigen, blas, ctx):
    """The dense peers side by side, with their FLOP rates against the measured peak."""
    lines = ["| tokens | threads | t_dense ms (dense_ffn) | % peak | t_eigen ms (plain Eigen, 1 thread) | % peak | "
             "t_openblas ms | % peak | dense_ffn / eigen | dense_ffn / openblas |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(set(dense) | set(blas)):
        d, b = dense.get(key), blas.get(key)
        e = eigen.get((key[0], 1))

        def pct(x, threads=key[1]):
            p = peak_for(ctx, threads)
            g = gflops(x) if x else None
            return f"{100 * g / p:.1f}" if g and p else ""

        cells = [str(key[0]), str(key[1]), fmt_time(d["t_ms"]) if d else "", pct(d), fmt_time(e["t_ms"]) if e else "",
                 pct(e, 1), fmt_time(b["t_ms"]) if b else "", pct(b),
                 f"{d['t_ms'] / e['t_ms']:.2f}" if d and e else "", f"{d['t_ms'] / b['t_ms']:.2f}" if d and b else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def decode_markdown(records, ctx):
    """bench_decode: GB/s of the weight bytes touched per step against the measured read bandwidth."""
    runs = {}
    for r in records:
        m = re.fullmatch(r"decode_(hot|dram)", r["family"])
        parts = r["run_name"].split("/")
        if not m or len(parts) < 2 or "tokens" not in r["args"]:
            continue
        runs[(parts[1], r["args"]["tokens"], r["args"].get("threads", 1), m.group(1))] = r
    head = ["storage", "tokens", "threads", "layers", "touched MB", "touched / LLC", "t_step ms", "GB/s",
            "read bw GB/s", "% read bw", "hot GB/s (4 layers)", "dram / hot", "fp32 time / this"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for key in sorted(k for k in runs if k[3] == "dram"):
        r = runs[key]
        hot = runs.get((key[0], key[1], key[2], "hot"))
        gbs = r["touched_MB"] * 1e6 / (r["t_ms"] * 1e-3) / 1e9 if r.get("touched_MB") else None
        hot_gbs = hot["touched_MB"] * 1e6 / (hot["t_ms"] * 1e-3) / 1e9 if hot and hot.get("touched_MB") else None
        bw_key = "limit_read_gbs_1t" if key[2] <= 1 else "limit_read_gbs_all"
        bw = float(ctx[bw_key]) if bw_key in ctx else None
        if bw and key[2] > 1 and str(key[2]) != ctx.get("limit_threads_all"):
            bw = None  # only the 1-thread and all-threads figures are measured
        row = [key[0], str(key[1]), str(key[2]), f"{r.get('layers', 0):.0f}", f"{r.get('touched_MB', 0):.0f}",
               f"{r.get('touched_vs_llc', 0):.2f}", fmt_time(r["t_ms"]), f"{gbs:.1f}" if gbs else "",
               f"{bw:.1f}" if bw else "", f"{100 * gbs / bw:.0f}" if gbs and bw else "",
               f"{hot_gbs:.1f}" if hot_gbs else "", f"{gbs / hot_gbs:.2f}" if gbs and hot_gbs else ""]
        f32 = runs.get(("fp32", key[1], key[2], "dram"))
        row.append(f"{f32['t_ms'] / r['t_ms']:.2f}" if f32 and r["t_ms"] else "")
        lines.append("| " + " | ".join(row) + " |")
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
            "dmoe_shape", "openblas", "library_build_type"]
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
    ap.add_argument("--decode", action="store_true", help="the file is from bench_decode: bandwidth table")
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
    how = {r["how"] for r in records}
    how_text = " / ".join("single run" if h == "mean" and all(r["n"] <= 1 for r in records) else h for h in sorted(how))
    if args.decode or (records and all(r["family"].startswith("decode_") for r in records)):
        out = [f"<!-- {context_line(ctx)} -->"] if ctx else []
        if limits_line(ctx):
            out += [limits_line(ctx), ""]
        out.append(f"Times are wall clock per step through all layers ({how_text}); GB/s = weight bytes the step "
                   "touches / t_step.")
        out.append("")
        out += decode_markdown(records, ctx)
        text = "\n".join(out)
        print(text)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return 0
    dense, eigen, blas, moe, loops = build_tables(records)
    if not moe:
        print("bench_table.py: no moe_* runs in the file", file=sys.stderr)
        return 1

    out = []
    if ctx:
        more = f"; merged from {', '.join(args.json)}" if len(args.json) > 1 else ""
        out.append(f"<!-- {context_line(ctx)}{more} -->")
    if limits_line(ctx):
        out += [limits_line(ctx), ""]
    out.append(f"Times are wall clock per forward ({how_text}); "
               "speedup = t_dense / t_moe, eta = t_dense * f / t_moe (1.0 = linear in f).")
    out.append("")
    table, missing = markdown(dense, eigen, moe)
    out += table
    if blas or loops or any("flops" in r for r in moe):
        out.append("")
        out.append("Against the peers (GFLOP/s = executed expert FLOPs / t_moe; % peak of the measured FMA peak; "
                   "vs = t_peer / t_moe; the loop's time leaves out the router):")
        out.append("")
        out += peers_markdown(dense, eigen, blas, moe, loops, ctx)
    if not args.no_dense_summary and (dense or blas):
        out.append("")
        out += dense_summary(dense, eigen, blas, ctx)
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
