# SPDX-License-Identifier: MIT
"""The whole-model conversion example end to end, small (few steps, few sentences): fine-tune,
convert every FFN, run the model on dmoe's kernels, evaluate. Checks what must hold at any size:
with every expert on the converted model is the fine-tuned dense model, FLOPs fall with tau,
budgets are met on the calibration tokens, top-k runs exactly k experts, the saved weights are the
fine-tuned ReLU model, and the evaluation texts stay out of training and calibration."""
import json
import os

import numpy as np
import pytest
import torch

from dmoe.examples import convert_minilm as cm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVAL = os.path.join(ROOT, "tools", "ffn_calibration_texts.txt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert_minilm")
    js = out / "points.json"
    threads = torch.get_num_threads()
    try:
        rc = cm.main(["--eval-texts", EVAL, "--eval-limit", "12", "--json", str(js), "--out-dir", str(out),
                      "--steps", "3", "--batch", "4", "--train-sentences", "40", "--calib-sentences", "24",
                      "--router-epochs", "1", "--taus", "0", "0.1", "0.3", "0.6", "--budgets", "0.6",
                      "--top-ks", "6", "--time-repeats", "1", "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(js.read_text()), out


def test_points_have_the_issue_fields(run):
    res, _ = run
    kinds = {p["kind"] for p in res["points"]}
    assert kinds == {"tau", "budget", "top_k"}
    for p in res["points"]:
        for k in ("ffn_flops_fraction", "mean_cosine", "min_cosine", "spearman", "speedup", "speedup_2_threads"):
            assert np.isfinite(p[k]), (k, p)
        assert -1 <= p["min_cosine"] <= p["mean_cosine"] <= 1 + 1e-6
        assert -1 <= p["spearman"] <= 1
        assert p["speedup"] > 0 and len(p["layer_flops_fraction"]) == 6


def test_all_experts_is_the_dense_finetuned_model(run):
    res, _ = run
    p0 = next(p for p in res["points"] if p["kind"] == "tau" and p["tau"] == 0.0)
    assert abs(p0["mean_cosine"] - res["dense"]["mean_cosine"]) < 2e-4
    assert abs(p0["min_cosine"] - res["dense"]["min_cosine"]) < 5e-4
    # every expert plus the router: a little over the dense FFN
    assert 1.0 < p0["ffn_flops_fraction"] < 1.1


def test_flops_fall_with_tau_and_budgets_hold(run):
    res, _ = run
    taus = [p for p in res["points"] if p["kind"] == "tau"]
    f = [p["ffn_flops_fraction"] for p in sorted(taus, key=lambda p: p["tau"])]
    assert all(a >= b for a, b in zip(f, f[1:])) and f[-1] < f[0]
    b = next(p for p in res["points"] if p["kind"] == "budget")
    assert b["calibration_fraction"] <= b["budget"] + 1e-9


def test_top_k_runs_exactly_k_experts(run):
    res, out = run
    import dmoe
    p = next(p for p in res["points"] if p["kind"] == "top_k")
    layer = dmoe.load_moe_layer(str(out / "moe_layer0.safetensors"))
    want = (p["k"] * layer.flops_per_slot + layer.router_flops_per_token) / (
        layer.num_experts * layer.flops_per_slot)
    assert p["layer_flops_fraction"] == pytest.approx([want] * 6, rel=1e-6)


def test_saved_weights_are_the_finetuned_relu_model(run):
    res, out = run
    from safetensors.torch import load_file
    tok, original = cm.load_minilm()
    w = load_file(str(out / "finetuned.safetensors"))
    name = "encoder.layer.0.intermediate.dense.weight"
    assert w[name].shape == original.get_parameter(name).shape
    assert not torch.equal(w[name], original.get_parameter(name))  # three AdamW steps moved it
    # ReLU activations are exactly zero where GELU's are small negative numbers
    assert res["dense"]["activations"]["zero_fraction"] > 0.5
    assert res["original_activations"]["zero_fraction"] < 0.01


def test_eval_texts_are_kept_out():
    ev = cm.read_texts(EVAL)
    pool = cm.stdlib_sentences(exclude=ev[:5] + ["x"])
    assert len(pool) > 1000 and not set(ev[:5]) & set(pool)
    assert all(8 <= len(s.split()) <= 40 and s.endswith(".") for s in pool)
