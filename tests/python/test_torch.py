# SPDX-License-Identifier: MIT
"""dmoe.torch.MoE: gradients against a pure-torch reference (float64 autograd over the same
routing decisions; dmoe computes in float32, tolerances below), zero-copy parameters, training
(a teacher FFN; a torch.nn transformer block with its FFN swapped), no_grad / inference_mode,
device and dtype refusals, D2DMoE losses, DynMoE's adaptive count."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import dmoe
import dmoe.torch as dt

ACTS = {
    "relu": torch.relu,
    "gelu_erf": lambda v: torch.nn.functional.gelu(v),
    "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}


def torch_act(name, pre, n):
    if name == "swiglu":
        return torch.nn.functional.silu(pre[:, :n]) * pre[:, n:]
    if name == "geglu":
        return torch.nn.functional.gelu(pre[:, :n]) * pre[:, n:]
    return ACTS[name](pre)


def reference(m: dt.MoE, x: torch.Tensor, params: dict, plan: dict):
    """y of the layer in float64 torch ops with the selection taken from dmoe's plan (routing
    decisions have no gradient); top_k weights through the softmax, others constant."""
    layer = m.layer
    E, n = layer.num_experts, layer.expert_width
    y = torch.zeros(x.shape, dtype=torch.float64)
    if "output_bias" in params:
        y = y + params["output_bias"]
    off, ex, wt = plan["token_offsets"], plan["expert"], plan["weight"]
    aux = {}
    if layer.policy == "top_k":
        z = x @ params["router_weight"].T + params["router_bias"]
        p = torch.softmax(z, dim=1)
        cnt = torch.zeros(E, dtype=torch.float64)
        for e in ex:
            cnt[e] += 1
        aux["load_balance"] = E * ((cnt / len(ex)) * p.mean(0)).sum()
        aux["z_loss"] = (torch.logsumexp(z, dim=1) ** 2).mean()
    rows = []
    for t in range(x.shape[0]):
        ids = list(ex[off[t]:off[t + 1]])
        if layer.policy == "top_k":
            w = p[t, ids]
            w = w / w.sum() if layer.renormalize else w
        else:
            w = torch.tensor(wt[off[t]:off[t + 1]], dtype=torch.float64)
        acc = y[t]
        for i, e in enumerate(ids):
            pre = x[t:t + 1] @ params["w1"][e].T
            if "b1" in params:
                pre = pre + params["b1"][e]
            out = torch_act(layer.activation, pre, n) @ params["w2"][e].T
            if "expert_bias" in params:
                out = out + params["expert_bias"][e]
            acc = acc + w[i] * out[0]
        rows.append(acc)
    return torch.stack(rows), aux


@pytest.mark.parametrize("policy", ["top_k", "dynamic_k", "top_any"])
@pytest.mark.parametrize("act", ["relu", "gelu_erf", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_gradients_match_torch_reference(policy, act):
    torch.manual_seed(0)
    rng = np.random.default_rng(len(act) + 7 * len(policy))
    d, E, n, T = int(rng.integers(4, 12)), int(rng.integers(2, 6)), int(rng.integers(2, 7)), int(rng.integers(3, 24))
    opts = {"top_k": dict(k=min(2, E)), "dynamic_k": dict(tau=0.4, router_hidden=6), "top_any": dict(training=True)}[policy]
    m = dt.MoE(d, E, n, policy=policy, activation=act, seed=3, expert_bias=True, **opts)
    if policy == "top_any":
        with torch.no_grad():
            m.router_threshold.uniform_(-0.3, 0.1)
    x = torch.randn(T, d, requires_grad=True)
    y, aux = m(x, return_aux=True)
    dy = torch.randn(T, d)
    aw = {"load_balance": 0.3, "z_loss": 0.05}
    loss = (y * dy).sum() + sum(c * aux[k] for k, c in aw.items())
    loss.backward()

    # the same forward again without autograd leaves the plan in the layer's own workspace
    with torch.no_grad():
        y2 = m(x.detach())
    plan = m.layer.plan()
    torch.testing.assert_close(y2, y.detach(), rtol=0, atol=0)
    params = {k: getattr(m, k).detach().double().requires_grad_() for k in m._param_names}
    xr = x.detach().double().requires_grad_()
    yr, auxr = reference(m, xr, params, plan)
    lr = (yr * dy.double()).sum()
    if policy == "top_k":
        lr = lr + sum(c * auxr[k] for k, c in aw.items())
        for k in aw:
            assert float(aux[k].detach()) == pytest.approx(float(auxr[k].detach()), rel=1e-4)
    lr.backward()
    # float32 kernels against a float64 reference: relative to each gradient's scale
    def close(got, want, what):
        scale = float(want.abs().max()) + 1e-6
        err = float((got.double() - want).abs().max())
        assert err <= 2e-4 * scale + 1e-6, f"{what}: max error {err} (scale {scale})"

    close(y.detach(), yr.detach(), "y")
    for k in m._param_names:
        g = getattr(m, k).grad
        if k.startswith("router_") and policy != "top_k":
            if policy == "dynamic_k":  # D2DMoE's router learns from its own regression loss only
                assert torch.count_nonzero(g) == 0
            continue  # top_any: straight-through gate gradients (checked by the C++ finite differences)
        close(g, params[k].grad, k)
    if policy != "top_any":
        close(x.grad, xr.grad, "dx")


def test_parameters_share_memory_with_the_layer():
    m = dt.MoE(8, 4, 4, policy="top_k", k=2)
    arrays = m.layer.parameters()
    for name, arr in arrays.items():
        assert getattr(m, name).data_ptr() == arr.__array_interface__["data"][0], name
        assert getattr(m, name).shape == arr.shape
    assert [n for n, _ in m.named_parameters()] == list(arrays)
    with torch.no_grad():
        m.output_bias.add_(2.0)
    np.testing.assert_allclose(m.layer.parameters()["output_bias"], m.output_bias.detach().numpy())
    # inputs and outputs: the output is written by dmoe into a torch tensor, no copies
    x = torch.randn(5, 8)
    out = torch.empty(5, 8)
    assert m.layer.forward(x, out).data_ptr() == out.data_ptr()
    np.testing.assert_array_equal(out.numpy(), m.layer.forward(x.numpy()))
    # a state_dict round trip writes through to the layer
    sd = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    assert float(np.abs(m.layer.parameters()["w1"]).max()) == 0.0


def test_no_grad_and_inference_mode_keep_no_state():
    m = dt.MoE(8, 4, 4, policy="dynamic_k", tau=0.5)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        a = m(x)
    with torch.inference_mode():
        b = m(x)
    assert a.shape == (2, 3, 8) and a.grad_fn is None
    torch.testing.assert_close(a, b)
    assert not m._free  # no autograd workspaces were taken
    assert m.routing_stats().tokens == 6


def test_refuses_other_devices_and_dtypes():
    m = dt.MoE(8, 4, 4)
    with pytest.raises(ValueError, match="is on device 'meta'.*CUDA backend is not bound"):
        m(torch.empty(3, 8, device="meta"))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        m(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 8\)"):
        m(torch.randn(3, 7))
    m.double()
    with pytest.raises(RuntimeError, match="no longer shares memory"):
        m(torch.randn(3, 8))
    # the core layer refuses tensors that require grad with a pointer to the module
    with pytest.raises(TypeError, match="requires grad; use dmoe.torch.MoE"):
        dmoe.MoELayer(8, 4, 4).forward(torch.randn(3, 8, requires_grad=True))


def test_training_learns_a_teacher_ffn():
    torch.manual_seed(1)
    d, F = 16, 64
    teacher = nn.Sequential(nn.Linear(d, F), nn.GELU(), nn.Linear(F, d))
    m = dt.MoE(d, 8, 16, policy="top_k", k=4, seed=2)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    X = torch.randn(512, d)
    with torch.no_grad():
        Y = teacher(X)
    def mse():
        with torch.no_grad():
            return float(((m(X) - Y) ** 2).mean())
    start = mse()
    for step in range(150):
        idx = torch.randint(0, 512, (64,))
        y, aux = m(X[idx], return_aux=True)
        loss = ((y - Y[idx]) ** 2).mean() + 0.01 * aux["load_balance"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = mse()
    assert end < 0.2 * start, (start, end)


def test_bf16_weight_storage_trains_and_follows_the_optimizer():
    # The kernels read bf16 copies of W1, W2; the nn.Parameters stay float32 masters. After each
    # optimizer step the next forward must use the updated (re-rounded) weights: compare with a
    # float32 layer loaded with the same parameters rounded to bf16.
    torch.manual_seed(4)
    d = 16
    m = dt.MoE(d, 8, 16, policy="top_k", k=3, seed=5, weight_storage="bf16")
    assert m.layer.weight_storage == "bf16"
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    X, Y = torch.randn(64, d), torch.randn(64, d)
    losses = []
    for _ in range(20):
        loss = ((m(X) - Y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    ref = dt.MoE(d, 8, 16, policy="top_k", k=3, seed=5)
    with torch.no_grad():
        for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            q.copy_(p.to(torch.bfloat16).to(torch.float32) if name in ("w1", "w2") else p)
        np.testing.assert_array_equal(m(X).numpy(), ref(X).numpy())


def test_transformer_block_with_swapped_ffn_trains():
    torch.manual_seed(2)
    d = 32
    block = nn.TransformerEncoderLayer(d_model=d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    moe = dt.MoE(d, 4, 16, policy="top_k", k=2, seed=3)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = block.self_attn
            self.n1, self.n2 = block.norm1, block.norm2
            self.ffn = moe  # replaces linear1 / activation / linear2

        def forward(self, x):
            h = self.n1(x + self.attn(x, x, x, need_weights=False)[0])
            return self.n2(h + self.ffn(h))

    model = Block()
    assert any(p is moe.w1 for p in model.parameters())
    x = torch.randn(4, 10, d)
    target = torch.roll(x, 1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    w1_before = moe.layer.parameters()["w1"].copy()
    for _ in range(12):
        loss = ((model(x) - target) ** 2).mean() + 0.01 * moe.aux_loss({"load_balance": 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert np.abs(moe.layer.parameters()["w1"] - w1_before).max() > 0  # the optimizer moved dmoe's weights


def test_two_pending_forwards_backward_independently():
    m = dt.MoE(8, 4, 4, policy="top_k", k=2, seed=4)
    a, b = torch.randn(5, 8, requires_grad=True), torch.randn(7, 8, requires_grad=True)
    ya, yb = m(a), m(b)
    (ya.sum() + 2 * yb.sum()).backward()
    ga = a.grad.clone()
    a.grad = None
    m(a).sum().backward()
    torch.testing.assert_close(a.grad, ga, rtol=0, atol=0)


def test_gradient_buffers_reused_only_when_nothing_views_them():
    """backward writes into the last backward's gradient buffers only once no .grad (or other
    view) holds them: kept .grads accumulate correctly, dropped ones are reused."""
    torch.manual_seed(0)
    m = dt.MoE(16, 4, 8, policy="top_k", k=2, seed=5)
    xa, xb = torch.randn(6, 16), torch.randn(9, 16)

    def grads_of(x):
        for p in m.parameters():
            p.grad = None
        m(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ga, gb = grads_of(xa), grads_of(xb)
    # Kept .grad (no zero_grad): the second backward must not overwrite the first's buffers.
    for p in m.parameters():
        p.grad = None
    m(xa).square().sum().backward()
    held = {n: p.grad for n, p in m.named_parameters()}
    m(xb).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ga[n] + gb[n], rtol=1e-6, atol=1e-6)
    # Dropped .grad (zero_grad(set_to_none=True)): the buffers are reused, the values fresh.
    del held
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    opt.zero_grad(set_to_none=True)
    m(xa).square().sum().backward()
    first = m.w1.grad.data_ptr()
    torch.testing.assert_close(m.w1.grad, ga["w1"], rtol=0, atol=0)
    opt.zero_grad(set_to_none=True)
    m(xb).square().sum().backward()
    assert m.w1.grad.data_ptr() == first
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, gb[n], rtol=0, atol=0)


def test_d2dmoe_router_loss_and_sparsity():
    torch.manual_seed(3)
    m = dt.MoE(8, 4, 6, policy="dynamic_k", tau=0.5, router_hidden=5, seed=1)
    x = torch.randn(20, 8)
    loss = m.router_regression_loss(x)
    loss.backward()
    # independent torch computation of the same loss and gradient
    w_in = m.router_w_in.detach().double().requires_grad_()
    w_out = m.router_w_out.detach().double().requires_grad_()
    t = torch.from_numpy(m.layer.router_targets(x.numpy())).double()
    r = (torch.relu(x.double() @ w_in.T) @ w_out.T).abs()
    ref = ((r - t) ** 2).mean()
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(m.router_w_in.grad.double(), w_in.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.router_w_out.grad.double(), w_out.grad, rtol=1e-4, atol=1e-6)
    # targets: the L2 norms of each expert's output without b2
    p = m.layer.parameters()
    e = 2
    h = torch.nn.functional.gelu(x.double() @ torch.from_numpy(p["w1"][e]).double().T + torch.from_numpy(p["b1"][e]).double())
    torch.testing.assert_close(t[:, e], (h @ torch.from_numpy(p["w2"][e]).double().T).norm(dim=1), rtol=1e-4, atol=1e-6)
    a = torch.randn(6, 10, requires_grad=True)
    for kind in ("hoyer_squared", "l1"):
        v = dt.activation_sparsity(a, kind)
        (g,) = torch.autograd.grad(v, a)
        ad = a.detach().double().requires_grad_()
        s1 = ad.abs().sum(1)
        rv = ((s1 ** 2) / (ad ** 2).sum(1)).mean() if kind == "hoyer_squared" else s1.mean()
        (rg,) = torch.autograd.grad(rv, ad)
        assert float(v.detach()) == pytest.approx(float(rv.detach()), rel=1e-5)
        torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="needs policy 'dynamic_k'"):
        dt.MoE(8, 4, 4).router_regression_loss(x)


def test_dynmoe_adaptive_count_from_a_training_loop():
    torch.manual_seed(4)
    m = dt.MoE(8, 6, 4, policy="top_any", adaptive=True, adapt_interval=3, seed=5)
    assert m.layer.training is True
    m.layer.randomize(5, initial_active=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    calls = []
    def all_reduce(counts, unrouted):  # a stand-in for torch.distributed.all_reduce (1 replica)
        calls.append((counts.clone(), unrouted.clone()))
    reports = []
    for step in range(6):
        x = torch.randn(16, 8)
        y, aux = m(x, return_aux=True)
        (y.pow(2).mean() + 0.1 * aux["diversity"] + 0.1 * aux["simplicity"]).backward()
        opt.step()
        opt.zero_grad()
        reports.append(m.adapt_step(all_reduce))
    assert [r["updated"] for r in reports] == [False, False, True, False, False, True]
    assert len(calls) == 2 and calls[0][0].dtype == torch.float64
    assert reports[2]["active_after"] == m.layer.num_active or reports[5]["updated"]
    m.eval()
    assert m.layer.training is False
    with pytest.raises(ValueError, match="adaptive=True needs policy 'top_any'"):
        dt.MoE(8, 4, 4, adaptive=True)
