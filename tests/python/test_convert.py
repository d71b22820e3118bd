# SPDX-License-Identifier: MIT
"""Conversion and IO from Python: dense FFNs from torch tensors and safetensors files (the MiniLM
fixture), split, to_moe, router fitting with a progress callback, sweeps, tau for a FLOPs budget,
dense and MoE save/load, and their bad arguments."""
import os

import numpy as np
import pytest
import torch

import dmoe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINILM = os.path.join(ROOT, "tests", "data", "minilm_l6_ffn.safetensors")


def torch_ffn(d, F, seed, act="gelu"):
    torch.manual_seed(seed)
    return torch.nn.Linear(d, F), torch.nn.Linear(F, d)


def test_dense_from_torch_weights_matches_torch():
    l1, l2 = torch_ffn(12, 48, 0)
    dense = dmoe.dense_from_weights(l1.weight, l2.weight, l1.bias, l2.bias, activation="gelu_erf")
    x = torch.randn(9, 12)
    with torch.no_grad():
        want = l2(torch.nn.functional.gelu(l1(x)))
    np.testing.assert_allclose(dense(x.numpy()), want.numpy(), rtol=1e-5, atol=1e-6)
    assert dense.parameters()["w1"].shape == (48, 12) and dense.hidden == 48


def test_dense_gated_from_weights():
    torch.manual_seed(1)
    d, F = 8, 16
    gate, up, down = torch.nn.Linear(d, F, bias=False), torch.nn.Linear(d, F, bias=False), torch.nn.Linear(F, d, bias=False)
    dense = dmoe.dense_from_weights(up.weight, down.weight, w_gate=gate.weight, activation="swiglu")
    x = torch.randn(5, d)
    with torch.no_grad():
        want = down(torch.nn.functional.silu(gate(x)) * up(x))
    np.testing.assert_allclose(dense(x.numpy()), want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs w_gate"):
        dmoe.dense_from_weights(up.weight, down.weight, activation="swiglu")
    with pytest.raises(ValueError, match=r"w2 has shape \(16, 8\), expected \(d, F\)"):
        dmoe.dense_from_weights(up.weight, down.weight.T, activation="relu")


@pytest.mark.parametrize("policy", ["dynamic_k", "top_k", "top_any"])
def test_split_and_to_moe_all_experts_equal_dense(policy):
    l1, l2 = torch_ffn(10, 40, 2)
    dense = dmoe.dense_from_weights(l1.weight, l2.weight, l1.bias, l2.bias, activation="relu")
    split = dense.split(5, seed=3)
    assert split.neurons.shape == (5, 8)
    assert sorted(split.neurons.ravel().tolist()) == list(range(40))
    assert all(list(r) == sorted(r) for r in split.neurons)
    x = np.random.default_rng(4).standard_normal((30, 10)).astype(np.float32)
    if policy == "dynamic_k":
        moe = dense.to_moe(split, policy="dynamic_k", tau=0.0, router_hidden=16)
        # router zero: r = 0 for every expert, so tau = 0 selects all of them at weight 1
        np.testing.assert_allclose(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    else:
        moe = dense.to_moe(split, policy=policy, **({"k": 5} if policy == "top_k" else {}))
        assert moe.policy == policy and moe.num_experts == 5 and moe.expert_width == 8
    # the experts hold the dense neurons the split gave them
    w1 = moe.parameters()["w1"]
    for e in range(5):
        np.testing.assert_array_equal(w1[e], dense.parameters()["w1"][split.neurons[e]])
    contiguous = dense.split(5, method="contiguous")
    assert contiguous.neurons.ravel().tolist() == list(range(40))
    with pytest.raises(ValueError, match="method must be"):
        dense.split(5, method="spectral")
    with pytest.raises(ValueError):
        dense.split(7)  # 40 is not a multiple of 7


@pytest.fixture(scope="module")
def minilm():
    return dmoe.DenseFFN.load(MINILM, "bert", layer=1, activation="gelu_erf")


def _tensor(path, name):
    """Reads one tensor of a safetensors file with plain Python (independently of dmoe)."""
    import json
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        info = hdr[name]
        a, b = info["data_offsets"]
        f.seek(8 + n + a)
        raw = f.read(b - a)
    dt = {"F16": np.float16, "F32": np.float32}[info["dtype"]]
    return np.frombuffer(raw, dtype=dt).reshape(info["shape"]).astype(np.float32)


def test_minilm_fixture_forward_matches_pytorch_output(minilm):
    x = _tensor(MINILM, "calibration.layer.1.ffn_input")[:64]
    want = _tensor(MINILM, "calibration.layer.1.ffn_output")
    y = minilm(x)
    assert minilm.d_model == 384 and minilm.hidden == 1536
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_convert_fit_sweep_budget_on_minilm(minilm, tmp_path):
    calib = _tensor(MINILM, "calibration.layer.1.ffn_input")[:512]
    held = _tensor(MINILM, "heldout.layer.1.ffn_input")[:256]
    split = minilm.split(24, seed=0, restarts=1, max_iterations=8)
    moe = minilm.to_moe(split, policy="dynamic_k", tau=0.5, router_hidden=64)
    seen = []
    rep = moe.fit_router(calib, epochs=4, batch_size=64, heldout_x=held, progress=seen.append)
    assert [p["epoch"] for p in seen] == [1, 2, 3, 4] and seen[-1]["epochs"] == 4
    assert rep["final_loss"] < rep["initial_loss"] and rep["heldout_loss"] < rep["heldout_initial_loss"]
    y_ref = minilm(held)
    pts = moe.sweep(held, y_ref, [0.0, 0.3, 0.6, 0.9])
    assert list(pts[0])[:5] == ["tau", "k", "flops_fraction", "token_rel_error", "mean_cosine"]
    assert pts[0]["token_rel_error"] < 1e-3 and pts[0]["mean_k"] == 24.0
    fr = [p["flops_fraction"] for p in pts]
    assert fr == sorted(fr, reverse=True)
    topk = moe.sweep_top_k(held, y_ref, [1, 4, 12])
    assert [p["k"] for p in topk] == [1, 4, 12] and topk[0]["mean_k"] == 1.0
    assert moe.tau == 0.5  # sweeps restore the options
    b = moe.tau_for_flops(held, 0.3, y_ref=y_ref)
    assert b["point"]["flops_fraction"] <= 0.3 and 0 < b["tau"] <= 1
    moe.tau = b["tau"]
    moe.forward(held)
    assert moe.routing_stats().executed_fraction == pytest.approx(b["point"]["flops_fraction"])
    with pytest.raises(ValueError, match="below the smallest fraction"):
        moe.tau_for_flops(held, 1e-4)
    # save / load keeps everything, the router included
    path = str(tmp_path / "moe.safetensors")
    moe.save(path)
    back = dmoe.load_moe_layer(path)
    assert back.tau == pytest.approx(moe.tau)
    np.testing.assert_array_equal(back(held), moe(held))
    with pytest.raises(ValueError, match="needs a dynamic_k layer"):
        dmoe.MoELayer(384, 4, 8).fit_router(calib)


def test_progress_callback_errors_propagate(minilm):
    calib = _tensor(MINILM, "calibration.layer.1.ffn_input")[:64]
    moe = minilm.to_moe(minilm.split(24, method="contiguous"), policy="dynamic_k")

    def stop(p):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        moe.fit_router(calib, epochs=3, progress=stop)


def test_dense_save_load_roundtrip(tmp_path):
    l1, l2 = torch_ffn(6, 12, 5)
    dense = dmoe.dense_from_weights(l1.weight, l2.weight, l1.bias, l2.bias, activation="silu")
    for names in ("bert", "gpt2", {"w1": "a.w", "b1": "a.b", "w2": "b.w", "b2": "b.b", "layout": "in_out"}):
        path = str(tmp_path / "d.safetensors")
        dense.save(path, names, layer=2)
        back = dmoe.DenseFFN.load(path, names, layer=2, activation="silu")
        for k, v in dense.parameters().items():
            np.testing.assert_array_equal(back.parameters()[k], v)
    with pytest.raises(ValueError, match="names must be 'bert', 'gpt2', 'llama'"):
        dmoe.DenseFFN.load(path, "t5")
    with pytest.raises(ValueError, match="unknown key 'bias'"):
        dmoe.DenseFFN.load(path, {"w1": "a", "w2": "b", "bias": "c"})
    with pytest.raises(ValueError, match="not found|no tensor"):
        dmoe.DenseFFN.load(path, "bert", layer=7)
    with pytest.raises(ValueError, match="dtype must be"):
        dense.save(path, dtype="I8")
