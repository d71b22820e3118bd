#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
"""Plot dmoe conversion sweeps: output error (log scale) against executed FLOPs fraction.

Reads one or more CSV files written by dmoe::write_sweep_csv (e.g. by examples/04_convert_minilm)
and draws one panel per file and error measure, one line per (router, policy) pair.

Usage:
    python3 scripts/plot_sweep.py minilm_layer1_sweep.csv minilm_layer4_sweep.csv -o sweep.png
    python3 scripts/plot_sweep.py *.csv -o sweep.png --metric rel_error
Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

METRICS = {
    "token_rel_error": "mean per-token relative error",
    "rel_error": "relative error over all tokens (Frobenius)",
}
LABELS = {
    ("d2dmoe", "dynamic_k"): "dynamic-k, D2DMoE router (tau swept)",
    ("moefication", "top_k"): "top-k, MoEfication router (k swept)",
}
# Points with (almost) zero error, i.e. every expert on, cannot sit on a log axis: not drawn.
ERROR_FLOOR = 1e-6


def read_sweep(path: Path) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Rows of one CSV grouped by (router, policy), each sorted by FLOPs fraction."""
    curves: dict[tuple[str, str], list[dict[str, float]]] = {}
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (write it with examples/04_convert_minilm --csv DIR)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"router", "policy", "flops_fraction", *METRICS}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: not a dmoe sweep CSV (missing columns: {', '.join(sorted(missing))})")
        for row in reader:
            point = {k: float(row[k]) for k in ("flops_fraction", "tau", "k", "mean_k", *METRICS)}
            curves.setdefault((row["router"], row["policy"]), []).append(point)
    for pts in curves.values():
        pts.sort(key=lambda p: p["flops_fraction"])
    return curves


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", type=Path, help="sweep CSV files (one panel row each)")
    ap.add_argument("-o", "--output", type=Path, default=Path("sweep.png"), help="PNG to write (default sweep.png)")
    ap.add_argument("--metric", choices=[*METRICS, "both"], default="both", help="error measure(s) to plot")
    ap.add_argument("--title", default="", help="figure title")
    args = ap.parse_args(argv)

    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_sweep.py needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 2

    metrics = list(METRICS) if args.metric == "both" else [args.metric]
    data = [(p, read_sweep(p)) for p in args.csv]
    fig, axes = plt.subplots(len(data), len(metrics), figsize=(5.5 * len(metrics), 4.0 * len(data)), squeeze=False)
    for r, (path, curves) in enumerate(data):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            for key, pts in sorted(curves.items()):
                kept = [p for p in pts if p[metric] > ERROR_FLOOR]
                xs = [100.0 * p["flops_fraction"] for p in kept]
                ys = [p[metric] for p in kept]
                ax.plot(xs, ys, marker="o", markersize=3.5, label=LABELS.get(key, f"{key[1]}, {key[0]} router"))
            ax.set_yscale("log")
            ax.set_xlabel("executed FLOPs, % of the dense FFN (router included)")
            ax.set_ylabel(METRICS[metric])
            ax.set_title(f"{path.stem} (all-experts points, error 0, not drawn)", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
