#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Training step: dmoe.torch.MoE against the same layer as a per-expert PyTorch loop.

    python bench/python/bench_train_step.py [--json OUT] [--tokens 512] [--threads 1,2]

One step = zero_grad, forward, MSE loss against a fixed target, backward (gradients of the
parameters and of the input, as inside a model), AdamW step. The layer (default shape S: d_model
768, 24 experts x 128, ReLU, softmax top-k with k = 6, so f = 0.25; hidden and output biases) is

  dmoe   dmoe.torch.MoE(..., policy="top_k", activation="relu", k=k, threads=T)
  torch  the loop PyTorch MoE code is written as (HF Mixtral / Switch style): router logits,
         softmax, top-k, renormalized weights; for every expert with tokens: gather its rows,
         nn.Linear, ReLU, nn.Linear, multiply by the routing weight, index_add_ into y; autograd
         does the backward. Per-expert nn.Parameters, initialized as copies of the dmoe layer's.

Before timing, the script checks that the two compute the same function: on a small case and on
the benchmark shape it compares y, the input gradient and every parameter gradient (relative to
each one's largest value), and after one AdamW step it compares the outputs again (so the dmoe
optimizer step really updated the weights dmoe reads). It exits with status 1 if they differ.

torch.set_num_threads(T) for both (the dmoe layer runs its own pool of T threads; torch's loss,
backward glue and optimizer use torch's). The two are timed in alternating blocks of --block steps
(after --warmup steps each), --steps steps each in all; the table gives the median wall time per
step and the median process CPU time per step (all threads; with T > 1 it includes threads
spinning while they wait, in both), and torch / dmoe (> 1: dmoe is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

import dmoe
import dmoe.torch as dt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_binding import machine_info, parse_ints  # noqa: E402


class LoopMoE(nn.Module):
    """Top-k MoE written as a per-expert loop in plain PyTorch, weights copied from a dmoe MoE."""

    def __init__(self, src: dt.MoE):
        super().__init__()
        L = src.layer
        self.E, self.k, self.renormalize = L.num_experts, L.k, L.renormalize
        with torch.no_grad():
            self.router = nn.Linear(L.d_model, self.E)
            self.router.weight.copy_(src.router_weight)
            self.router.bias.copy_(src.router_bias)
            self.up = nn.ModuleList()
            self.down = nn.ModuleList()
            for e in range(self.E):
                u = nn.Linear(L.d_model, L.expert_width, bias=L.hidden_bias)
                u.weight.copy_(src.w1[e])
                if L.hidden_bias:
                    u.bias.copy_(src.b1[e])
                dn = nn.Linear(L.expert_width, L.d_model, bias=False)
                dn.weight.copy_(src.w2[e])
                self.up.append(u)
                self.down.append(dn)
            self.out_bias = nn.Parameter(src.output_bias.detach().clone()) if L.output_bias else None
        if L.expert_bias:
            raise ValueError("LoopMoE: expert_bias is not part of this benchmark's layer")

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        w, idx = probs.topk(self.k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x) if self.out_bias is None else self.out_bias.expand_as(x).clone()
        mask = F.one_hot(idx, self.E).permute(2, 1, 0)  # (E, k, tokens)
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            h = torch.relu(self.up[e](x[tok]))
            y.index_add_(0, tok, self.down[e](h) * w[tok, slot, None])
        return y

    def grads(self):
        """Gradients in dmoe's parameter names and layout."""
        g = {"router_weight": self.router.weight.grad, "router_bias": self.router.bias.grad,
             "w1": torch.stack([u.weight.grad for u in self.up]),
             "w2": torch.stack([dn.weight.grad for dn in self.down])}
        if self.up[0].bias is not None:
            g["b1"] = torch.stack([u.bias.grad for u in self.up])
        if self.out_bias is not None:
            g["output_bias"] = self.out_bias.grad
        return g


def make_pair(d, E, n, k, threads, seed=0):
    m = dt.MoE(d, E, n, policy="top_k", activation="relu", k=k, seed=seed, threads=threads)
    return m, LoopMoE(m)


def rel_diff(a, b):
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def step_fn(model, x, target, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        x.grad = None
        y = model(x)
        loss = (y - target).square().mean()
        loss.backward()
        opt.step()
        return y
    return step


def breakdown(model, x, target, steps, warmup):
    """Median process CPU ms of the step's parts: forward + loss, backward, optimizer step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    parts = {"forward": [], "backward": [], "optimizer": []}
    for i in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        x.grad = None
        c0 = time.process_time_ns()
        loss = (model(x) - target).square().mean()
        c1 = time.process_time_ns()
        loss.backward()
        c2 = time.process_time_ns()
        opt.step()
        c3 = time.process_time_ns()
        if i >= warmup:
            for k_, v in zip(parts, (c1 - c0, c2 - c1, c3 - c2)):
                parts[k_].append(v / 1e6)
    return {k_: statistics.median(v) for k_, v in parts.items()}


def check_same_function(d, E, n, k, tokens, threads, tol, seed=0):
    """Max relative differences of y, dx, each gradient, and y after one AdamW step."""
    torch.manual_seed(seed + 1)
    m, ref = make_pair(d, E, n, k, threads, seed)
    x = torch.randn(tokens, d)
    target = torch.randn(tokens, d)
    diffs = {}
    outs = []
    for model in (m, ref):
        xi = x.clone().requires_grad_()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        y = step_fn(model, xi, target, opt)()
        with torch.no_grad():
            y_after = model(x)
        g = {n_: getattr(model, n_).grad for n_ in model._param_names} if model is m else model.grads()
        outs.append((y.detach(), xi.grad, g, y_after))
    (y0, dx0, g0, a0), (y1, dx1, g1, a1) = outs
    diffs["y"] = rel_diff(y0, y1)
    diffs["dx"] = rel_diff(dx0, dx1)
    for name in g1:
        diffs["grad " + name] = rel_diff(g0[name], g1[name])
    missing = set(g0) - set(g1)
    if missing:
        raise SystemExit(f"bench_train_step.py: the loop has no parameters for {sorted(missing)}")
    diffs["y after AdamW step"] = rel_diff(a0, a1)
    bad = {k_: v for k_, v in diffs.items() if not v <= tol}
    return diffs, bad


def time_pair(fns, steps, block, warmup):
    """Alternating blocks; per-step (wall ms, process CPU ms) lists per name."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    out = {name: [] for name in fns}
    names = list(fns)
    b = 0
    while min(len(v) for v in out.values()) < steps:
        for name in (names if b % 2 == 0 else names[::-1]):
            for _ in range(min(block, steps - len(out[name]))):
                c0, w0 = time.process_time_ns(), time.perf_counter_ns()
                fns[name]()
                w1, c1 = time.perf_counter_ns(), time.process_time_ns()
                out[name].append(((w1 - w0) / 1e6, (c1 - c0) / 1e6))
        b += 1
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=parse_ints, default=[1, 2])
    ap.add_argument("--shape", type=parse_ints, default=[768, 24, 128, 6],
                    help="d_model,num_experts,expert_width,k (default 768,24,128,6: shape S, f = 0.25)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per implementation and thread count")
    ap.add_argument("--block", type=int, default=5, help="steps per block before switching implementation")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time forward, backward and optimizer step separately (process CPU)")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the same-function checks")
    a = ap.parse_args(argv)
    if len(a.shape) != 4:
        ap.error("--shape takes four integers: d_model,num_experts,expert_width,k")
    if a.tokens < 1 or a.steps < 1 or a.block < 1 or a.warmup < 0:
        ap.error("--tokens, --steps, --block must be >= 1 and --warmup >= 0")
    return a


def main(argv=None):
    args = parse_args(argv)
    d, E, n, k = args.shape
    torch.set_num_threads(max(args.threads))
    checks = {}
    for label, shape in (("small", (12, 6, 5, 2, 37)), ("benchmark", (d, E, n, k, args.tokens))):
        diffs, bad = check_same_function(*shape, threads=max(args.threads), tol=args.tol)
        checks[label] = diffs
        if bad:
            print(f"bench_train_step.py: dmoe and the torch loop differ on the {label} case {shape}: "
                  + ", ".join(f"{k_} {v:.3g}" for k_, v in bad.items()), file=sys.stderr)
            return 1
    worst = {lab: max(v.values()) for lab, v in checks.items()}

    rows = []
    for th in args.threads:
        torch.set_num_threads(th)
        torch.manual_seed(0)
        m, ref = make_pair(d, E, n, k, th)
        x = torch.randn(args.tokens, d, requires_grad=True)
        target = torch.randn(args.tokens, d)
        fns = {"dmoe": step_fn(m, x, target, torch.optim.AdamW(m.parameters(), lr=1e-4)),
               "torch": step_fn(ref, x, target, torch.optim.AdamW(ref.parameters(), lr=1e-4))}
        res = time_pair(fns, args.steps, args.block, args.warmup)
        med = {name: (statistics.median(v[0] for v in s), statistics.median(v[1] for v in s))
               for name, s in res.items()}
        parts = {}
        if args.breakdown:
            parts = {name: breakdown(mod, x, target, max(3, args.steps // 4), args.warmup)
                     for name, mod in (("dmoe", m), ("torch", ref))}
        with torch.no_grad():
            m(x)
        rows.append({"tokens": args.tokens, "threads": th, "f": m.routing_stats().active_fraction,
                     "dmoe_ms": med["dmoe"][0], "torch_ms": med["torch"][0],
                     "dmoe_cpu_ms": med["dmoe"][1], "torch_cpu_ms": med["torch"][1],
                     "speedup_wall": med["torch"][0] / med["dmoe"][0],
                     "speedup_cpu": med["torch"][1] / med["dmoe"][1], "steps": args.steps, "parts_cpu_ms": parts,
                     "samples": {name: s for name, s in res.items()}})

    info = machine_info()
    print(f"<!-- python bench/python/bench_train_step.py; {info['date']}; {info['cpu']}, {info['cores']} cores, "
          f"load {info['loadavg'][0]:.2f}; torch {torch.__version__}; shape d {d}, {E} x {n}, relu, top_k k={k}, "
          f"AdamW, MSE; medians of {args.steps} steps each (alternating blocks of {args.block}); same-function "
          f"check: max relative difference {worst['small']:.1e} (small case), {worst['benchmark']:.1e} (this shape) -->")
    print("| tokens | threads | f | dmoe ms | torch loop ms | torch / dmoe | dmoe CPU ms | torch CPU ms | torch / dmoe (CPU) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['threads']} | {r['f']:.3f} | {r['dmoe_ms']:.1f} | {r['torch_ms']:.1f} | "
              f"{r['speedup_wall']:.2f}x | {r['dmoe_cpu_ms']:.1f} | {r['torch_cpu_ms']:.1f} | {r['speedup_cpu']:.2f}x |")
    if args.breakdown:
        print("\n| threads | step part | dmoe CPU ms | torch loop CPU ms |\n|---:|---|---:|---:|")
        for r in rows:
            for part in ("forward", "backward", "optimizer"):
                print(f"| {r['threads']} | {part} | {r['parts_cpu_ms']['dmoe'][part]:.1f} | "
                      f"{r['parts_cpu_ms']['torch'][part]:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "torch": torch.__version__, "dmoe": dmoe.__version__,
            "shape": {"d_model": d, "num_experts": E, "expert_width": n, "k": k, "activation": "relu"},
            "checks": checks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
