# SPDX-License-Identifier: MIT
"""Independent plain NumPy (float64) references of dmoe's layers, written from the definitions in
docs/python.md (and the C++ docs), not from the kernels: routing per token in a Python loop, each
selected expert run as its own small MLP, combined in slot order."""
from __future__ import annotations

import math

import numpy as np

_SQRT2 = math.sqrt(2.0)


def _erf(v):
    return np.vectorize(math.erf)(v)


def act(name: str, pre: np.ndarray, n: int) -> np.ndarray:
    if name == "relu":
        return np.maximum(pre, 0.0)
    if name == "gelu_erf":
        return 0.5 * pre * (1.0 + _erf(pre / _SQRT2))
    if name == "gelu_tanh":
        return 0.5 * pre * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (pre + 0.044715 * pre ** 3)))
    if name == "silu":
        return pre / (1.0 + np.exp(-pre))
    if name == "swiglu":
        g, u = pre[..., :n], pre[..., n:]
        return act("silu", g, n) * u
    if name == "geglu":
        g, u = pre[..., :n], pre[..., n:]
        return act("gelu_erf", g, n) * u
    raise ValueError(name)


def expert_out(p: dict, e: int, x: np.ndarray, activation: str, n: int) -> np.ndarray:
    """Expert e on rows x: act(x W1_e^T + b1_e) W2_e^T (+ b2_e)."""
    pre = x @ p["w1"][e].astype(np.float64).T
    if "b1" in p:
        pre = pre + p["b1"][e]
    h = act(activation, pre, n)
    out = h @ p["w2"][e].astype(np.float64).T
    if "expert_bias" in p:
        out = out + p["expert_bias"][e]
    return out


def route(layer, p: dict, x: np.ndarray):
    """Per token: list of (expert, weight), ascending expert id, and the router scores."""
    E = layer.num_experts
    sel, scores = [], []
    for t in range(x.shape[0]):
        xt = x[t].astype(np.float64)
        if layer.policy == "top_k":
            z = p["router_weight"].astype(np.float64) @ xt + p["router_bias"]
            pr = np.exp(z - z.max())
            pr /= pr.sum()
            order = sorted(range(E), key=lambda e: (-pr[e], e))[: layer.k]
            ids = sorted(order)
            tot = sum(pr[e] for e in ids)
            sel.append([(e, pr[e] / tot if layer.renormalize else pr[e]) for e in ids])
            scores.append(pr)
        elif layer.policy == "dynamic_k":
            h = np.maximum(p["router_w_in"].astype(np.float64) @ xt, 0.0)
            r = np.abs(p["router_w_out"].astype(np.float64) @ h)
            ids = [e for e in range(E) if r[e] >= layer.tau * r.max()]
            if layer.k_max:
                ids = sorted(sorted(ids, key=lambda e: (-r[e], e))[: layer.k_max])
            sel.append([(e, 1.0) for e in ids])
            scores.append(r)
        else:
            w = p["router_weight"].astype(np.float64)
            cos = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (xt / max(np.linalg.norm(xt), 1e-12))
            active = layer.active
            ids = [e for e in range(E) if active[e] and cos[e] > p["router_threshold"][e]]
            if not ids and not layer.training:
                cand = [e for e in range(E) if active[e]]
                ids = [max(cand, key=lambda e: (cos[e], -e))]
                sel.append([(ids[0], 1.0)])
            else:
                sel.append([(e, 1.0 / len(ids)) for e in ids])
            scores.append(cos)
    return sel, np.array(scores)


def forward(layer, x: np.ndarray):
    """y (float64) and the per-token selection of a dmoe.MoELayer, from its parameters."""
    p = {k: v.astype(np.float64) for k, v in layer.parameters().items()}
    n = layer.expert_width
    sel, scores = route(layer, p, x)
    y = np.zeros((x.shape[0], layer.d_model))
    if "output_bias" in p:
        y += p["output_bias"]
    for t, slots in enumerate(sel):
        for e, w in slots:
            y[t] += w * expert_out(p, e, x[t : t + 1].astype(np.float64), layer.activation, n)[0]
    return y, sel, scores
