# SPDX-License-Identifier: MIT
"""Per-call cost of dmoe.torch.MoE on a layer so small that the kernels take a few microseconds:
what the Python module adds (autograd.Function, parameter checks, auxiliary-loss tensor) over
MoELayer.forward with NumPy arrays. Prints the best of --rounds rounds of --calls calls each.

    python bench/python/bench_module_overhead.py [--shape 64,4,16,2] [--calls 5000] [--rounds 5]
"""
import argparse
import time

import torch

import dmoe
import dmoe.torch as dt


def best_us(f, calls: int, rounds: int) -> float:
    for _ in range(min(300, calls)):
        f()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64,4,16,2", help="d_model,num_experts,expert_width,k")
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    d, e, n, k = (int(v) for v in args.shape.split(","))
    torch.set_num_threads(1)
    m = dt.MoE(d, e, n, policy="top_k", k=k, threads=1)
    x = torch.randn(1, d, requires_grad=True)
    xd = x.detach()
    y = torch.empty_like(xd)
    rows = {
        "MoELayer.forward (NumPy views)": best_us(lambda: m.layer.forward(xd.numpy(), y.numpy()), args.calls, args.rounds),
        "dmoe.torch.MoE forward (autograd)": best_us(lambda: m(x), args.calls, args.rounds),
    }
    with torch.no_grad():
        rows["dmoe.torch.MoE forward (no_grad)"] = best_us(lambda: m(x), args.calls, args.rounds)
    print(f"dmoe {dmoe.__version__}, torch {torch.__version__}, shape d {d}, {e} x {n}, top-k k={k}, 1 token, 1 thread")
    for name, us in rows.items():
        print(f"{name:36s} {us:8.1f} us")


if __name__ == "__main__":
    main()
