#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
"""PyTorch eager per-expert MoE loop, timed on the cases of a dmoe benchmark JSON, with the ratio.

    bench_forward --benchmark_out=fwd.json --benchmark_out_format=json [--benchmark_repetitions=5]
    python3 scripts/bench_torch_peer.py fwd.json            (bench_shape_m's JSON works the same way)

For every moe_<policy> run in the file (shape S or M, read from its context), this builds a layer of
the same shape in PyTorch (CPU, fp32, nn.Linear weight layout, PyTorch's default init) and times
the loop PyTorch users write:

    y = b2; for e in experts: idx = rows routed to e (torch.where on the routing mask)
        h = act(x[idx] @ W1_e^T + b1_e)                 (SwiGLU: silu(gate) * up)
        y.index_add_(0, idx, w[idx, e, None] * (h @ W2_e^T))

with torch.set_num_threads(threads of the run), under torch.inference_mode(). The routing is
made here, from a random router on random inputs, with the same number of slots as the dmoe run
(tokens * its measured mean k): top-k cases take each token's top k, variable-k cases the
highest-scoring (token, expert) pairs overall. As in bench_forward's OpenBLAS loop peer, the
router is not in the timed region (dmoe's time includes its router). Each case: warm-up, then
the best of --repetitions means over >= --min-time seconds each.

--runs picks other dmoe runs than moe_* (infer_*: dmoe's inference path), --dtype bfloat16 runs
the loop on bf16 weights and activations (the peer of dmoe's infer_top_k_bf16_tiles, both on AMX
where the CPU has it):

    python3 scripts/bench_torch_peer.py --runs infer_top_k_bf16_tiles --dtype bfloat16 fwd.json

Prints a Markdown table: dmoe's time (the JSON's --stat aggregate, else the mean), the PyTorch
time, and torch / dmoe (> 1: dmoe is faster). Needs torch; without it, says how to install it and
exits with status 2.
"""

import argparse
import json
import math
import re
import statistics
import sys
import time

TIME_SCALE_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
SHAPES = {
    # d_model, experts, width, activation
    "S": (768, 24, 128, "relu"),
    "M": (2048, 128, 768, "swiglu"),
}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="Google Benchmark JSON from bench_forward or bench_shape_m")
    ap.add_argument("--stat", default="median", help="aggregate of dmoe's runs to compare (median, mean, min)")
    ap.add_argument("--filter", default="", help="regular expression on the run names to keep (default: all)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timed repetition (default 0.3)")
    ap.add_argument("--repetitions", type=int, default=3, help="timed repetitions per case; best is kept (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the PyTorch weights, inputs and router")
    ap.add_argument("--runs", default="moe_",
                    help="prefix of the dmoe run names to compare (default moe_; e.g. infer_, or "
                         "infer_top_k_bf16_tiles with --dtype bfloat16)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the PyTorch loop's weights and activations (bfloat16: as after model.bfloat16(); "
                         "PyTorch then runs oneDNN's bf16 kernels, AMX where the CPU has it)")
    return ap.parse_args(argv)


def load_cases(path, stat, pattern, prefix="moe_"):
    """Runs of the file whose names start with `prefix`: one record per run name with its time,
    counters and arguments."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    ctx = data.get("context", {})
    groups = {}
    for e in data.get("benchmarks", []):
        groups.setdefault(e.get("run_name", e["name"]), []).append(e)
    cases = []
    for name, group in groups.items():
        policy = re.search(r"(top_k|dynamic_k|top_any)", name.split("/")[0])
        if not name.startswith(prefix) or not policy or (pattern and not re.search(pattern, name)):
            continue
        if any(e.get("error_occurred") for e in group):
            continue
        agg = [e for e in group if e.get("run_type") == "aggregate" and e.get("aggregate_name") == stat]
        src = agg[:1] or [e for e in group if e.get("run_type", "iteration") == "iteration"]
        if not src:
            continue
        t_ms = statistics.fmean(e["real_time"] * TIME_SCALE_TO_MS[e.get("time_unit", "ns")] for e in src)
        args = {}
        for part in name.split("/")[1:]:
            m = re.fullmatch(r"([A-Za-z_]+):(-?\d+)", part)
            if m:
                args[m.group(1)] = int(m.group(2))
        if "tokens" not in args or "threads" not in args:
            continue
        cases.append({"name": name, "policy": policy.group(1), "t_ms": t_ms, "args": args,
                      "mean_k": src[0].get("mean_k"), "f": src[0].get("f"), "how": stat if agg else "mean"})
    return ctx, cases


def shape_of(ctx, path):
    text = ctx.get("dmoe_shape", "")
    m = re.match(r"\s*([SM])\b", text)
    if not m:
        sys.exit(f"bench_torch_peer.py: {path}: the context has no dmoe_shape 'S: ...' or 'M: ...' "
                 f"(is it a bench_forward or bench_shape_m JSON?), got {text!r}")
    shape = SHAPES[m.group(1)]
    found = re.search(r"(\d+) experts", text)
    if found and int(found.group(1)) != shape[1]:  # a smoke run of bench_shape_m has fewer experts
        shape = (shape[0], int(found.group(1)), shape[2], shape[3])
    return m.group(1), shape


class TorchMoE:
    """Per-expert weights in nn.Linear layout (out x in), PyTorch's default uniform init."""

    def __init__(self, torch, d, experts, width, act, seed):
        self.torch, self.d, self.E, self.n, self.act = torch, d, experts, width, act
        g = torch.Generator().manual_seed(seed)
        fn = 2 * width if act == "swiglu" else width

        def uniform(shape, fan_in):
            a = 1.0 / math.sqrt(fan_in)
            return (torch.rand(shape, generator=g) * 2 - 1) * a

        self.w1 = [uniform((fn, d), d) for _ in range(experts)]
        self.b1 = [uniform((fn,), d) for _ in range(experts)]
        self.w2 = [uniform((d, width), width) for _ in range(experts)]
        self.b2 = uniform((d,), width)
        self.router = uniform((experts, d), d)
        self.gen = g

    def routing(self, x, slots, top_k):
        """(tokens x E) combine weights, zero where a token does not use an expert."""
        torch = self.torch
        probs = torch.softmax(x @ self.router.t(), dim=-1)
        tokens = x.shape[0]
        w = torch.zeros_like(probs)
        if top_k:
            k = max(1, min(self.E, round(slots / tokens)))
            val, idx = probs.topk(k, dim=-1)
            w.scatter_(1, idx, val)
        else:
            flat = probs.flatten()
            keep = max(1, min(flat.numel(), int(round(slots))))
            val, idx = flat.topk(keep)
            w.view(-1)[idx] = val
        return w

    def to(self, dtype):
        """The weights in `dtype` (the router stays float32: routing is done before the loop)."""
        self.w1 = [t.to(dtype) for t in self.w1]
        self.b1 = [t.to(dtype) for t in self.b1]
        self.w2 = [t.to(dtype) for t in self.w2]
        self.b2 = self.b2.to(dtype)

    def forward(self, x, w):
        torch = self.torch
        F = torch.nn.functional
        y = self.b2.expand(x.shape[0], self.d).clone()
        for e in range(self.E):
            idx = torch.where(w[:, e] != 0)[0]
            if idx.numel() == 0:
                continue
            h = F.linear(x[idx], self.w1[e], self.b1[e])
            if self.act == "swiglu":
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = torch.relu(h)
            y.index_add_(0, idx, F.linear(h, self.w2[e]) * w[idx, e, None])
        return y


def time_case(fn, min_time, repetitions):
    fn()  # warm-up
    best = math.inf
    for _ in range(repetitions):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        best = min(best, elapsed / n)
    return best * 1e3


def fmt_ms(ms):
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_torch_peer.py: PyTorch is not installed, so there is no PyTorch peer to time.\n"
              "  Install it with:  python3 -m pip install torch\n"
              "  (on Linux x86-64 the default wheel brings CUDA libraries too; PyTorch also publishes\n"
              "  smaller CPU-only wheels, which are all this script needs)", file=sys.stderr)
        return 2
    try:
        ctx, cases = load_cases(args.json, args.stat, args.filter, args.runs)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"bench_torch_peer.py: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"bench_torch_peer.py: no {args.runs}* runs in {args.json} (filter {args.filter!r})", file=sys.stderr)
        return 1
    shape_name, (d, experts, width, act) = shape_of(ctx, args.json)
    torch.manual_seed(args.seed)
    model = TorchMoE(torch, d, experts, width, act, args.seed)
    max_tokens = max(c["args"]["tokens"] for c in cases)
    x_all = torch.randn((max_tokens, d), generator=model.gen)
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32:
        model.to(dtype)

    print(f"<!-- dmoe: {args.json} ({ctx.get('date', '?')}, {ctx.get('host_name', '?')}); "
          f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; "
          f"shape {shape_name}: d {d}, {experts} experts x {width}, {act}; torch loop in {args.dtype}; "
          f"dmoe runs {args.runs}*; best of {args.repetitions} x "
          f">= {args.min_time} s -->")
    print("| policy | tokens | threads | setting | mean k | t_dmoe ms | t_torch ms | torch / dmoe |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for c in sorted(cases, key=lambda c: (c["args"]["tokens"], c["args"]["threads"], c["name"])):
            a = c["args"]
            tokens, threads = a["tokens"], a["threads"]
            mean_k = c["mean_k"] if c["mean_k"] is not None else (c["f"] or 0) * experts
            slots = mean_k * tokens
            torch.set_num_threads(threads)
            x = x_all[:tokens].contiguous()
            w = model.routing(x, slots, top_k=(c["policy"] == "top_k"))
            if dtype != torch.float32:
                x, w = x.to(dtype), w.to(dtype)
            t_torch = time_case(lambda: model.forward(x, w), args.min_time, args.repetitions)
            setting = f"k={a['k']}" if "k" in a else (f"f={a['f_pct'] / 100:.2f}" if "f_pct" in a else "")
            print(f"| {c['policy']} | {tokens} | {threads} | {setting} | {mean_k:.2f} | {fmt_ms(c['t_ms'])} | "
                  f"{fmt_ms(t_torch)} | {t_torch / c['t_ms']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
