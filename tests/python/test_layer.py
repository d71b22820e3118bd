# SPDX-License-Identifier: MIT
"""dmoe.MoELayer through NumPy: every policy x activation against the plain NumPy reference
(reference.py), statistics, aux losses, zero-copy in and out, and every bad argument."""
import re

import numpy as np
import pytest

import dmoe
from reference import forward as ref_forward

POLICIES = ["top_k", "dynamic_k", "top_any"]
ACTS = ["relu", "gelu_erf", "gelu_tanh", "silu", "swiglu", "geglu"]


def test_version_is_the_cpp_version():
    hpp = open(__file__.rsplit("/tests/", 1)[0] + "/include/dmoe/version.hpp").read()
    parts = [re.search(rf"DMOE_VERSION_{p}\s+(\d+)", hpp).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    assert dmoe.__version__ == ".".join(parts)


def make(policy, act, seed, **kw):
    rng = np.random.default_rng(seed)
    d, E, n = int(rng.integers(3, 20)), int(rng.integers(2, 7)), int(rng.integers(1, 9))
    opts = {}
    if policy == "top_k":
        opts = dict(k=int(rng.integers(1, E + 1)), renormalize=bool(seed % 2))
    elif policy == "dynamic_k":
        opts = dict(tau=float(rng.uniform(0.1, 0.9)), k_max=int(rng.integers(0, E + 1)), router_hidden=int(rng.integers(2, 12)))
    else:
        opts = dict(training=bool(seed % 2))
    layer = dmoe.MoELayer(d, E, n, policy=policy, activation=act, seed=seed, expert_bias=bool(seed % 3 == 0),
                          hidden_bias=bool(seed % 4 != 1), threads=1 + seed % 2, **opts, **kw)
    if policy == "top_any":  # thresholds below the typical cosines so that tokens pick several experts
        layer.parameters()["router_threshold"][:] = rng.uniform(-0.4, 0.2, size=E).astype(np.float32)
    x = rng.standard_normal((int(rng.integers(1, 40)), d)).astype(np.float32)
    return layer, x


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("act", ACTS)
def test_forward_matches_numpy_reference(policy, act):
    for seed in range(3):
        layer, x = make(policy, act, 100 * seed + ACTS.index(act))
        y = layer.forward(x)
        want, sel, scores = ref_forward(layer, x)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5 * (1 + np.abs(want).max()))
        plan = layer.plan()
        for t, slots in enumerate(sel):
            lo, hi = plan["token_offsets"][t], plan["token_offsets"][t + 1]
            assert list(plan["expert"][lo:hi]) == [e for e, _ in slots]
            np.testing.assert_allclose(plan["weight"][lo:hi], [w for _, w in slots], rtol=1e-5)
        np.testing.assert_allclose(layer.scores(), scores, rtol=1e-4, atol=1e-5)
        st = layer.routing_stats()
        k = [len(s) for s in sel]
        assert st.tokens == x.shape[0] and st.slots == sum(k)
        assert st.mean_k == pytest.approx(np.mean(k))
        assert list(st.k_histogram) == [k.count(i) for i in range(layer.num_experts + 1)]
        assert list(st.tokens_per_expert) == [sum(e == j for s in sel for e, _ in s) for j in range(layer.num_experts)]
        mult = 3 if act in ("swiglu", "geglu") else 2
        assert st.expert_flops == pytest.approx(sum(k) * 2 * layer.d_model * layer.expert_width * mult)


def test_top_k_aux_losses_match_definitions():
    layer, x = make("top_k", "relu", 7)
    layer.forward(x)
    _, sel, p = ref_forward(layer, x)
    E = layer.num_experts
    f = np.array([sum(e == j for s in sel for e, _ in s) for j in range(E)]) / sum(len(s) for s in sel)
    P = p.mean(axis=0)
    prm = {k: v.astype(np.float64) for k, v in layer.parameters().items()}
    z = x.astype(np.float64) @ prm["router_weight"].T + prm["router_bias"]
    lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
    aux = layer.aux_losses()
    assert aux["load_balance"] == pytest.approx(E * (f * P).sum(), rel=1e-5)
    assert aux["z_loss"] == pytest.approx((lse ** 2).mean(), rel=1e-5)
    assert aux["diversity"] == 0.0


def test_zero_copy_in_and_out():
    layer = dmoe.MoELayer(8, 4, 4, policy="top_k", k=2)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    out = np.empty_like(x)
    y = layer.forward(x, out)
    assert y is out
    # a row-strided view (every other column of a wider matrix is not allowed, a row slice is)
    big = np.zeros((10, 12), np.float32)
    big[:5, :8] = x
    y2 = layer.forward(big[:5, :8])
    np.testing.assert_array_equal(y2, out)
    # parameters are views of the layer's storage: writing them changes the output
    p = layer.parameters()
    assert p["w1"].base is not None and not p["w1"].flags.owndata
    assert layer.parameters()["w1"].__array_interface__["data"][0] == p["w1"].__array_interface__["data"][0]
    p["output_bias"][:] += 1.0
    np.testing.assert_allclose(layer.forward(x), out + 1.0, rtol=1e-6, atol=1e-6)


def test_backward_shapes_and_reuse():
    layer = dmoe.MoELayer(8, 4, 4, policy="top_k", k=2, expert_bias=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    dy = rng.standard_normal((6, 8)).astype(np.float32)
    layer.forward(x)
    g = layer.make_gradients()
    dx, g2 = layer.backward(x, dy, grads=g)
    assert g2 is g and dx.shape == x.shape
    first = {k: v.copy() for k, v in g.tensors().items()}
    dx2, _ = layer.backward(x, dy, grads=g)  # backward leaves the forward state intact
    np.testing.assert_array_equal(dx, dx2)
    for k, v in g.tensors().items():
        np.testing.assert_array_equal(v, first[k])
        assert v.shape == layer.parameters()[k].shape
    # L = <dy, y> is linear in the output bias: its gradient is the column sum of dy
    np.testing.assert_allclose(g.tensors()["output_bias"], dy.sum(0), rtol=1e-5)


def test_workspaces_keep_separate_forwards():
    layer = dmoe.MoELayer(8, 4, 4, policy="dynamic_k", tau=0.3, seed=3)
    rng = np.random.default_rng(2)
    xa, xb = (rng.standard_normal((s, 8)).astype(np.float32) for s in (5, 9))
    wa, wb = dmoe.Workspace(), dmoe.Workspace()
    layer.forward(xa, workspace=wa)
    layer.forward(xb, workspace=wb)
    assert wa.tokens == 5 and wb.tokens == 9 and wa.nbytes > 0
    dy = np.ones((5, 8), np.float32)
    dx1, _ = layer.backward(xa, dy, workspace=wa)
    layer.forward(xa)
    dx2, _ = layer.backward(xa, dy)
    np.testing.assert_array_equal(dx1, dx2)


def test_threads_give_identical_bits():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    ys = []
    for kw in (dict(threads=1), dict(threads=2), dict(pool=dmoe.ThreadPool(2)), {}):
        layer = dmoe.MoELayer(24, 6, 16, policy="top_k", k=3, seed=5, **kw)
        ys.append(layer.forward(x))
    for y in ys[1:]:
        np.testing.assert_array_equal(ys[0], y)


def test_options_and_generation():
    layer = dmoe.MoELayer(8, 4, 4, policy="top_k", k=2)
    x = np.ones((3, 8), np.float32)
    layer.forward(x)
    layer.k = 3
    assert layer.k == 3 and layer.max_k == 3 and layer.tau is None
    with pytest.raises(ValueError, match="options or routing state changed"):
        layer.backward(x, x)
    with pytest.raises(ValueError, match="k must be in"):
        layer.k = 9
    assert layer.k == 3
    with pytest.raises(ValueError, match="tau is an option of dynamic_k"):
        layer.tau = 0.3


def test_top_any_mask_and_adapter():
    layer = dmoe.MoELayer(6, 5, 3, policy="top_any", training=True, seed=1)
    layer.randomize(2, initial_active=3)
    assert list(layer.active) == [1, 1, 1, 0, 0] and layer.num_active == 3
    ad = dmoe.ExpertCountAdapter(layer, interval=2)
    x = np.random.default_rng(3).standard_normal((20, 6)).astype(np.float32)
    layer.parameters()["router_threshold"][:] = 0.99  # nothing fires: all tokens unrouted
    layer.forward(x)
    ad.record(x)
    np.testing.assert_allclose(ad.window_unrouted, x.astype(np.float64).sum(0), rtol=1e-6)
    assert list(ad.window_counts) == [0] * 5
    assert ad.on_optimizer_step()["updated"] is False
    rep = ad.on_optimizer_step()
    # idle slots are masked off first, then the lowest free slot (0) is seeded from the unrouted sum
    assert rep["updated"] and rep["removed"] == [0, 1, 2] and rep["added"] == 0 and rep["active_after"] == 1
    assert list(layer.active) == [1, 0, 0, 0, 0]
    w = layer.parameters()["router_weight"][0]
    u = x.astype(np.float64).sum(0)
    np.testing.assert_allclose(w, u / np.linalg.norm(u), rtol=1e-5)
    layer.active = [1, 0, 0, 0, 1]
    assert layer.num_active == 2
    with pytest.raises(ValueError, match="at least one"):
        layer.active = [0] * 5
    with pytest.raises(ValueError, match="needs a top_any layer"):
        dmoe.ExpertCountAdapter(dmoe.MoELayer(6, 5, 3))


def test_save_and_load_roundtrip(tmp_path):
    for policy in POLICIES:
        layer, x = make(policy, "swiglu", 11)
        path = str(tmp_path / f"{policy}.safetensors")
        layer.save(path)
        back = dmoe.load_moe_layer(path)
        assert (back.policy, back.activation, back.d_model, back.num_experts) == (
            policy, "swiglu", layer.d_model, layer.num_experts)
        np.testing.assert_array_equal(back.forward(x), layer.forward(x))
    with pytest.raises(ValueError, match="cannot open"):
        dmoe.load_moe_layer(str(tmp_path / "missing.safetensors"))


def _round_bf16(a):
    """float32 -> nearest bfloat16 (ties to even), widened back: written here, not the library's."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("storage", ["bf16", "f16"])
@pytest.mark.parametrize("policy", POLICIES)
def test_weight_storage_is_the_rounded_float32_layer(storage, policy, tmp_path):
    layer, x = make(policy, "swiglu", 21)
    ref, _ = make(policy, "swiglu", 21)
    rnd = _round_bf16 if storage == "bf16" else (lambda a: a.astype(np.float16).astype(np.float32))
    for name in ("w1", "w2"):
        ref.parameters()[name][:] = rnd(ref.parameters()[name])
    ref.mark_modified()
    assert layer.weight_storage == "f32"
    y32 = layer.forward(x).copy()
    layer.weight_storage = storage
    assert layer.weight_storage == storage
    y = layer.forward(x).copy()
    np.testing.assert_array_equal(y, ref.forward(x))
    assert not np.array_equal(y, y32)  # the rounding shows, else this proves nothing
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    dx, g = layer.backward(x, dy)
    dx_ref, g_ref = ref.backward(x, dy)
    np.testing.assert_array_equal(dx, dx_ref)
    for k, v in g.tensors().items():
        np.testing.assert_array_equal(v, g_ref.tensors()[k], err_msg=k)
    path = str(tmp_path / "l.safetensors")
    layer.save(path)
    back = dmoe.load_moe_layer(path)
    assert back.weight_storage == storage
    np.testing.assert_array_equal(back.forward(x), y)
    built = dmoe.MoELayer(8, 4, 4, weight_storage=storage)
    assert built.weight_storage == storage
    with pytest.raises(ValueError, match="weight_storage must be"):
        layer.weight_storage = "int8"
    assert layer.weight_storage == storage


@pytest.mark.parametrize("policy", POLICIES)
def test_infer_precision_bf16(policy):
    layer, x = make(policy, "swiglu", 23)
    assert layer.infer_precision == "exact"
    y_fwd = layer.forward(x).copy()
    layer.infer_precision = "bf16"
    assert layer.infer_precision == "bf16"
    assert layer.infer_on_bf16_tiles == dmoe.cpu_has_bf16_tiles()
    y = layer.infer(x).copy()
    np.testing.assert_array_equal(layer.forward(x), y_fwd)  # forward is unaffected
    if not dmoe.cpu_has_bf16_tiles():
        np.testing.assert_array_equal(y, y_fwd)  # a permission not taken: infer stays exact
    else:
        assert not np.array_equal(y, y_fwd)  # the operands were rounded
        # About bf16's precision from the float result, relative to the output's scale.
        scale = np.abs(y_fwd).max() + 1e-6
        assert np.abs(y - y_fwd).max() <= 0.05 * scale
        # Deterministic and independent of the batch: each row alone gives its bits.
        for t in (0, x.shape[0] // 2, x.shape[0] - 1):
            np.testing.assert_array_equal(layer.infer(x[t : t + 1]), y[t : t + 1])
    layer.infer_precision = "exact"
    np.testing.assert_array_equal(layer.infer(x), y_fwd)
    built = dmoe.MoELayer(8, 4, 4, infer_precision="bf16")
    assert built.infer_precision == "bf16"
    with pytest.raises(ValueError, match="infer_precision must be 'exact' or 'bf16', got 'fp8'"):
        layer.infer_precision = "fp8"
    with pytest.raises(ValueError, match="infer_precision must be"):
        dmoe.MoELayer(8, 4, 4, infer_precision="half")


class _Meta:
    """An object that is not an array."""


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        (np.ones((4, 8), np.float64), TypeError, "forward: x has dtype float64, expected float32"),
        (np.ones((4, 8), np.int32), TypeError, "x has dtype int32"),
        (np.ones((4, 7), np.float32), ValueError, r"x has shape \(4, 7\), expected \(tokens x 8\)"),
        (np.ones((2, 4, 8), np.float32), ValueError, "x has 3 dimensions, expected 2"),
        (np.asfortranarray(np.ones((4, 8), np.float32)), ValueError, "x has strides"),
        (np.ones((4, 16), np.float32)[:, ::2], ValueError, "contiguous rows"),
        (_Meta(), TypeError, "x must be a float32 array"),
        ([[1.0] * 8], TypeError, "x must be a float32 array"),
    ],
)
def test_bad_inputs(bad, exc, msg):
    layer = dmoe.MoELayer(8, 4, 4)
    with pytest.raises(exc, match=msg):
        layer.forward(bad)


def test_bad_outputs_and_backward_arguments():
    layer = dmoe.MoELayer(8, 4, 4)
    x = np.ones((4, 8), np.float32)
    ro = np.empty((4, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        layer.forward(x, ro)
    with pytest.raises(ValueError, match=r"out has shape \(3, 8\), expected \(4 x 8\)"):
        layer.forward(x, np.empty((3, 8), np.float32))
    with pytest.raises(ValueError, match="must not alias"):
        layer.forward(x, x)
    fresh = dmoe.MoELayer(8, 4, 4)
    with pytest.raises(ValueError, match="holds no forward of this layer"):
        fresh.backward(x, x)
    layer.forward(x)
    with pytest.raises(ValueError, match=r"dy has shape \(3, 8\)"):
        layer.backward(x, np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="forward had 4 tokens, got 2"):
        layer.backward(x[:2], x[:2])
    with pytest.raises(ValueError, match="grads were made by another layer"):
        layer.backward(x, x, grads=fresh.make_gradients())
    with pytest.raises(ValueError, match="unknown key 'lb'"):
        layer.backward(x, x, aux_weights={"lb": 1.0})
    with pytest.raises(ValueError, match="dx must not alias"):
        layer.backward(x, np.ones_like(x), dx=x)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(policy="top_k", tau=0.5), "tau is an option of dynamic_k layers"),
        (dict(policy="dynamic_k", k=2), "k is an option of top_k layers"),
        (dict(policy="top_k", training=True), "training is an option of top_any"),
        (dict(policy="bogus"), "policy must be 'top_k', 'dynamic_k' or 'top_any'"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(policy="top_k", k=0), "k must be in"),
        (dict(policy="dynamic_k", tau=1.5), "tau must be in"),
        (dict(policy="dynamic_k", k_max=9), "k_max must be"),
        (dict(threads=0), "threads must be >= 1"),
        (dict(weight_storage="fp8"), "weight_storage must be 'f32', 'bf16' or 'f16', got 'fp8'"),
        (dict(threads=2, pool=None), None),
    ],
)
def test_bad_construction(kw, msg):
    if msg is None:
        dmoe.MoELayer(8, 4, 4, **kw)
        return
    with pytest.raises(ValueError, match=msg):
        dmoe.MoELayer(8, 4, 4, **kw)


def test_bad_shapes_in_config():
    with pytest.raises(ValueError, match=r"d_model must be in \[1, "):
        dmoe.MoELayer(0, 4, 4)
    with pytest.raises(ValueError, match="num_experts"):
        dmoe.MoELayer(8, 0, 4)
    with pytest.raises(ValueError, match="expert_width"):
        dmoe.MoELayer(8, 4, 0)
    with pytest.raises(ValueError, match="threads or pool"):
        dmoe.MoELayer(8, 4, 4, threads=2, pool=dmoe.ThreadPool(2))


def test_nan_input_is_a_dmoe_error():
    layer = dmoe.MoELayer(8, 4, 4, policy="top_k")
    x = np.ones((3, 8), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(dmoe.DmoeError, match="token 1"):
        layer.forward(x)
