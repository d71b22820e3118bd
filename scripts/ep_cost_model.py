#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Paper cost model of expert parallelism's all-to-all (docs/distributed.md prints its output).

One MoE layer, one training step (forward + backward), per GPU: T tokens, top-k slots of d values
of s bytes. The all-to-all moves each slot's row four times (token rows out, outputs back,
output gradients out, input gradients back); a fraction (R-1)/R of them leave the GPU, and of
those, (R-G)/(R-1) leave the node (G GPUs per node, uniform routing). Intra-node bytes run on
NVLink, inter-node bytes on InfiniBand, each at `eff` of the link's one-direction peak; the two
run concurrently, the slower one sets the time. Compute: 18 d n FLOPs per slot per step
(gated expert: 6 d n forward, twice that backward), at `mfu` of peak dense bf16.

Usage: python3 scripts/ep_cost_model.py
"""

NVLINK_GBPS = 450.0   # H100 SXM NVLink 4: 900 GB/s bidirectional per GPU -> 450 GB/s each way
IB_GBPS = 50.0        # one ConnectX-7 NDR InfiniBand port per GPU: 400 Gb/s = 50 GB/s each way
PEAK_TFLOPS = 989.0   # H100 SXM dense BF16 tensor core peak
EFF = 0.7             # assumed share of link peak an all-to-all reaches (not measured here)
MFU = 0.5             # assumed share of compute peak the expert products reach (not measured here)
G = 8                 # GPUs per node (HGX H100)


def step(R, T, k, d, n, s):
    rows = 4 * T * k                      # slot rows moved per GPU per step
    remote = rows * (R - 1) / R
    inter = remote * (max(R - G, 0) / (R - 1)) if R > 1 else 0.0
    intra = remote - inter
    b = d * s
    t_nv = intra * b / (NVLINK_GBPS * 1e9 * EFF)
    t_ib = inter * b / (IB_GBPS * 1e9 * EFF)
    comm = max(t_nv, t_ib)
    flops = 3 * 6 * d * n * T * k          # gated: 6 d n per slot forward, backward twice that
    comp = flops / (PEAK_TFLOPS * 1e12 * MFU)
    return remote * b, comm, comp


def main():
    T, d, n, s = 4096, 4096, 14336, 2     # a Mixtral-8x7B-like layer, bf16, 4096 tokens per GPU
    print(f"T = {T} tokens/GPU, d = {d}, n = {n} (gated), bf16; NVLink {NVLINK_GBPS:.0f} GB/s, "
          f"IB {IB_GBPS:.0f} GB/s per GPU each way, link efficiency {EFF}, MFU {MFU}")
    print("| GPUs | k | bytes leaving a GPU per step | all-to-all time | expert compute | comm / compute |")
    print("|---:|---:|---:|---:|---:|---:|")
    for R in (8, 64, 512):
        for k in (1, 2, 6):
            by, comm, comp = step(R, T, k, d, n, s)
            print(f"| {R} | {k} | {by / 2**20:.0f} MiB | {comm * 1e3:.2f} ms | {comp * 1e3:.2f} ms | "
                  f"{comm / comp:.2f} |")


if __name__ == "__main__":
    main()
