# SPDX-License-Identifier: MIT
"""Taus for a FLOPs budget over several layers (dmoe.budget): per-layer taus meet the budget on
each layer's tokens, the shared tau is the smallest that meets it for the model, and bad input is
refused with the argument named."""
import numpy as np
import pytest

import dmoe
from dmoe.budget import model_flops_fraction, per_layer_taus_for_flops, shared_tau_for_flops


def fitted(seed, d=32, experts=8, width=16):
    dense = dmoe.DenseFFN(d, experts * width, activation="relu", seed=seed, threads=1)
    layer = dense.to_moe(dense.split(experts, seed=seed), policy="dynamic_k", tau=0.0, router_hidden=16)
    x = np.random.default_rng(seed).standard_normal((200, d)).astype(np.float32)
    layer.fit_router(x, epochs=3, seed=seed)
    return layer, x


@pytest.fixture(scope="module")
def model():
    pairs = [fitted(s) for s in (1, 2, 3)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_per_layer_taus_meet_the_budget(model):
    layers, xs = model
    r = per_layer_taus_for_flops(layers, xs, 0.5)
    assert len(r["taus"]) == 3
    assert all(f <= 0.5 for f in r["fractions"])
    assert r["fraction"] <= 0.5
    # each tau is (up to the bisection tolerance) the smallest that fits: a bit less is over budget
    for l, x, t in zip(layers, xs, r["taus"]):
        if t > 0:
            assert model_flops_fraction([l], [x], [max(0.0, t - 2e-3)]) > 0.5
    assert [l.tau for l in layers] == [0.0, 0.0, 0.0]  # left as they were


def test_shared_tau_is_the_smallest_that_fits(model):
    layers, xs = model
    r = shared_tau_for_flops(layers, xs, 0.45)
    assert r["fraction"] <= 0.45
    assert model_flops_fraction(layers, xs, [r["tau"]] * 3) == pytest.approx(r["fraction"])
    assert model_flops_fraction(layers, xs, [r["tau"] - 2e-3] * 3) > 0.45
    assert shared_tau_for_flops(layers, xs, 5.0)["tau"] == 0.0  # everything fits


def test_model_fraction_is_token_weighted(model):
    layers, xs = model
    xs2 = [xs[0], xs[1][:50], xs[2]]
    taus = [0.2, 0.4, 0.6]
    fr = []
    w = []
    for l, x, t in zip(layers, xs2, taus):
        l.tau = t
        l.forward(x)
        s = l.routing_stats()
        fr.append(s.router_flops + s.expert_flops)
        w.append(s.dense_flops)
        l.tau = 0.0
    assert model_flops_fraction(layers, xs2, taus) == pytest.approx(sum(fr) / sum(w))


def test_bad_input(model):
    layers, xs = model
    with pytest.raises(ValueError, match="one per layer"):
        per_layer_taus_for_flops(layers, xs[:2], 0.5)
    with pytest.raises(ValueError, match="below the smallest"):
        shared_tau_for_flops(layers, xs, 1e-6)
    with pytest.raises(Exception, match="layer 0"):
        per_layer_taus_for_flops(layers, xs, 1e-6)
    top = dmoe.MoELayer(32, 4, 8, policy="top_k", k=1, seed=0)
    with pytest.raises(ValueError, match="expected 'dynamic_k'"):
        model_flops_fraction([top], [xs[0]], [0.1])
