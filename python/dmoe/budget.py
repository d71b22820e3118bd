# SPDX-License-Identifier: MIT
"""Taus for a FLOPs budget over several dynamic_k layers (a whole model).

A dynamic_k layer's executed FLOPs fraction does not increase with tau (docs/python.md), so a
budget is met by bisection on that monotone curve. ``MoELayer.tau_for_flops`` (C++,
include/dmoe/convert/budget.hpp) does it for one layer; here the same for a model: per-layer taus
(each layer meets the budget on its own tokens, so the model does) or one shared tau (the model's
fraction, token-weighted over the layers, meets it; layers differ).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ._core import MoELayer

__all__ = ["model_flops_fraction", "per_layer_taus_for_flops", "shared_tau_for_flops"]


def _check(layers: Sequence[MoELayer], xs: Sequence[Any], fn: str) -> None:
    if len(layers) == 0:
        raise ValueError(f"{fn}: layers is empty")
    if len(layers) != len(xs):
        raise ValueError(f"{fn}: {len(layers)} layers but {len(xs)} token matrices in xs; expected one per layer")
    for i, l in enumerate(layers):
        if l.policy != "dynamic_k":
            raise ValueError(f"{fn}: layers[{i}] has policy '{l.policy}', expected 'dynamic_k'")


def model_flops_fraction(layers: Sequence[MoELayer], xs: Sequence[Any], taus: Sequence[float]) -> float:
    """Executed FLOPs (routers + experts) over dense FLOPs, summed over the layers, each layer i
    run at taus[i] on its tokens xs[i]. The layers' taus are restored afterwards."""
    _check(layers, xs, "model_flops_fraction")
    if len(taus) != len(layers):
        raise ValueError(f"model_flops_fraction: {len(taus)} taus for {len(layers)} layers")
    executed = dense = 0.0
    for l, x, t in zip(layers, xs, taus):
        saved = l.tau
        try:
            l.tau = float(t)
            l.forward(x)
            s = l.routing_stats()
            executed += s.router_flops + s.expert_flops
            dense += s.dense_flops
        finally:
            l.tau = saved
    return executed / dense


def per_layer_taus_for_flops(layers: Sequence[MoELayer], xs: Sequence[Any], target_fraction: float, *,
                             y_refs: Optional[Sequence[Any]] = None, tolerance: float = 1e-3) -> Dict[str, Any]:
    """For each layer i, the smallest tau whose executed FLOPs fraction on xs[i] is <= target_fraction
    (MoELayer.tau_for_flops). Returns {'taus': [...], 'fractions': [...] (each layer's achieved
    fraction), 'fraction': the model's (token-weighted), 'points': the per-layer measurements}.
    Raises DmoeError naming the layer if one cannot reach the target."""
    _check(layers, xs, "per_layer_taus_for_flops")
    taus: List[float] = []
    points: List[Dict[str, Any]] = []
    for i, (l, x) in enumerate(zip(layers, xs)):
        y = None if y_refs is None else y_refs[i]
        try:
            r = l.tau_for_flops(x, target_fraction, y_ref=y, tolerance=tolerance)
        except Exception as e:  # name the layer: the C++ message names only the target
            raise type(e)(f"per_layer_taus_for_flops: layer {i}: {e}") from e
        taus.append(r["tau"])
        points.append(r["point"])
    return {"taus": taus, "fractions": [p["flops_fraction"] for p in points],
            "fraction": model_flops_fraction(layers, xs, taus), "points": points}


def shared_tau_for_flops(layers: Sequence[MoELayer], xs: Sequence[Any], target_fraction: float, *,
                         tolerance: float = 1e-3, max_evaluations: int = 40) -> Dict[str, Any]:
    """The smallest single tau, used by every layer, whose model FLOPs fraction (token-weighted over
    the layers, model_flops_fraction) is <= target_fraction, by bisection on [0, 1]. Returns
    {'tau', 'fraction', 'evaluations'}; raises ValueError if even tau = 1 is above the target."""
    _check(layers, xs, "shared_tau_for_flops")
    if not (target_fraction > 0):
        raise ValueError(f"shared_tau_for_flops: target_fraction must be positive, got {target_fraction}")
    n = len(layers)
    f = lambda t: model_flops_fraction(layers, xs, [t] * n)  # noqa: E731
    evals = 1
    f0 = f(0.0)
    if f0 <= target_fraction:
        return {"tau": 0.0, "fraction": f0, "evaluations": evals}
    f1 = f(1.0)
    evals += 1
    if f1 > target_fraction:
        raise ValueError(f"shared_tau_for_flops: target_fraction {target_fraction} is below the smallest model "
                         f"fraction on these tokens ({f1:.4g} at tau = 1)")
    lo, hi, fhi = 0.0, 1.0, f1
    while hi - lo > tolerance and evals < max_evaluations:
        mid = 0.5 * (lo + hi)
        fm = f(mid)
        evals += 1
        if fm <= target_fraction:
            hi, fhi = mid, fm
        else:
            lo = mid
    return {"tau": hi, "fraction": fhi, "evaluations": evals}
