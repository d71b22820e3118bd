#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
"""Independent check of tests/data/minilm_l6_ffn.safetensors, with numpy and safetensors only (no torch).

Reloads the file, checks every tensor's name, shape and dtype against the metadata, recomputes
calibration.layer.{i}.ffn_output from the *stored* weights and inputs in fp32 (erf GELU in float64 via
math.erf), and prints the relative Frobenius error against the stored output. With F16 storage that error
is the effect of rounding the weights to fp16 (expected ~1e-3); exits 1 if it exceeds --tolerance.

Usage: python3 tools/check_ffn_fixture.py [path] [--tolerance 5e-3]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

DEFAULT = Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_l6_ffn.safetensors"
_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)).astype(np.float64))).astype(np.float32)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, nargs="?", default=DEFAULT)
    p.add_argument("--tolerance", type=float, default=5e-3)
    args = p.parse_args(argv)

    with safe_open(str(args.path), framework="np") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    layers = [int(s) for s in meta["layers"].split(",")]
    d, h = int(meta["hidden"]), int(meta["intermediate"])
    nc, nh, nr = (int(meta[k]) for k in ("calibration_tokens", "heldout_tokens", "reference_rows"))
    store = {"F16": np.float16, "F32": np.float32}[meta["dtype"]]
    assert meta["activation"] == "gelu_erf", meta["activation"]

    expected = {}
    for i in layers:
        expected.update({
            f"encoder.layer.{i}.intermediate.dense.weight": ((h, d), store),
            f"encoder.layer.{i}.intermediate.dense.bias": ((h,), store),
            f"encoder.layer.{i}.output.dense.weight": ((d, h), store),
            f"encoder.layer.{i}.output.dense.bias": ((d,), store),
            f"calibration.layer.{i}.ffn_input": ((nc, d), store),
            f"heldout.layer.{i}.ffn_input": ((nh, d), store),
            f"calibration.layer.{i}.ffn_output": ((nr, d), np.float32),
        })
    ok = True
    if set(t) != set(expected):
        print(f"FAIL tensor names: missing {sorted(set(expected) - set(t))}, extra {sorted(set(t) - set(expected))}")
        ok = False
    for k, (shape, dt) in expected.items():
        if k in t and (t[k].shape != shape or t[k].dtype != dt):
            print(f"FAIL {k}: {t[k].dtype} {t[k].shape}, expected {np.dtype(dt)} {shape}")
            ok = False
        if k in t and not np.all(np.isfinite(t[k])):
            print(f"FAIL {k}: non-finite values")
            ok = False
    if not ok:
        return 1

    print(f"{args.path}: {args.path.stat().st_size} bytes, layers {layers}, {nc} calibration + {nh} held-out "
          f"tokens, {meta['dtype']} storage, {meta['package']}, torch {meta['torch']}")
    for i in layers:
        w1 = t[f"encoder.layer.{i}.intermediate.dense.weight"].astype(np.float32)
        b1 = t[f"encoder.layer.{i}.intermediate.dense.bias"].astype(np.float32)
        w2 = t[f"encoder.layer.{i}.output.dense.weight"].astype(np.float32)
        b2 = t[f"encoder.layer.{i}.output.dense.bias"].astype(np.float32)
        x = t[f"calibration.layer.{i}.ffn_input"][:nr].astype(np.float32)
        ref = t[f"calibration.layer.{i}.ffn_output"].astype(np.float64)
        y = gelu_erf(x @ w1.T + b1) @ w2.T + b2
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        row_err = float(np.max(np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)))
        xh = t[f"heldout.layer.{i}.ffn_input"].astype(np.float32)
        print(f"layer {i}: ffn_output rel. Frobenius error {err:.3e} (worst row {row_err:.3e}); "
              f"calibration |x| mean {np.linalg.norm(x, axis=1).mean():.2f}, "
              f"held-out |x| mean {np.linalg.norm(xh, axis=1).mean():.2f}")
        if not err <= args.tolerance:
            print(f"FAIL layer {i}: error {err:.3e} > tolerance {args.tolerance:.1e}")
            ok = False
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
