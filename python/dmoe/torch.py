# SPDX-License-Identifier: MIT
"""PyTorch modules over dmoe's kernels: :class:`MoE` (an ``nn.Module`` whose forward and backward
are dmoe's), differentiable auxiliary losses, D2DMoE's router regression loss and activation
sparsity penalty, DynMoE's adaptive expert count. CPU and float32 only (the CUDA backend is not
bound yet). See docs/python.md.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _core

__all__ = ["MoE", "AUX_NAMES", "activation_sparsity"]

#: Order of the auxiliary-loss vector an MoE forward produces.
AUX_NAMES: Tuple[str, ...] = ("load_balance", "z_loss", "diversity", "simplicity", "balance", "efficiency")


def _check_cpu(t: torch.Tensor, fn: str, arg: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(
            f"{fn}: {arg} is on device '{t.device}'; dmoe.torch runs on the CPU (the CUDA backend is not "
            f"bound yet): move it with {arg}.cpu()"
        )
    if t.dtype != torch.float32:
        raise TypeError(f"{fn}: {arg} has dtype {t.dtype}, expected torch.float32 (convert with {arg}.float())")


class _MoEFunction(torch.autograd.Function):
    """y, aux = MoE(x) with dmoe's forward and backward. The parameters are inputs so that autograd
    routes their gradients; their values are read from the layer, whose memory they share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "MoE", *params: torch.Tensor):  # type: ignore[override]
        layer = module.layer
        ws = module._take_workspace()
        xd = x.detach()
        y = torch.empty_like(xd)
        try:
            # NumPy views of the tensors (zero-copy): the binding takes them through the buffer
            # protocol, several microseconds cheaper per array than torch's __dlpack__.
            layer.forward(xd.numpy(), y.numpy(), workspace=ws)
            if module._adapter is not None and module.training:
                module._adapter.record(xd.numpy(), workspace=ws)
            aux = layer.aux_losses(workspace=ws)
        except BaseException:
            module._give_workspace(ws)
            raise
        ctx.save_for_backward(x)
        ctx.ws = ws
        # A weak reference: the module keeps its last aux losses, whose graph holds this ctx; a
        # strong one would make a cycle through autograd's C++ nodes that no collector breaks.
        ctx.module = weakref.ref(module)
        ctx.layer = layer
        ctx.param_names = tuple(module._param_names)
        return y, torch.tensor([aux[n] for n in AUX_NAMES], dtype=torch.float32)

    @staticmethod
    def backward(ctx, dy: Optional[torch.Tensor], daux: Optional[torch.Tensor]):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ws = ctx.ws
        layer = ctx.layer
        if dy is None:
            dy = torch.zeros_like(x)
        dy = dy.detach().contiguous()
        weights = None
        if daux is not None:
            weights = dict(zip(AUX_NAMES, (float(v) for v in daux.tolist())))
        module = ctx.module()
        try:
            reuse = module._take_grads() if module is not None else None
            dx, grads = layer.backward(x.detach().numpy(), dy.numpy(), workspace=ws, aux_weights=weights,
                                       grads=reuse)
        finally:
            if module is not None:
                module._give_workspace(ws)
            ctx.ws = None
        if module is not None:
            module._grads = grads
        # The gradient buffers are viewed without a copy: autograd keeps them as .grad or adds them
        # to an existing .grad. The next backward writes into them again only once no view of
        # them is left (_take_grads), e.g. after zero_grad() dropped the .grad tensors.
        g = grads.tensors()
        return (torch.from_numpy(dx), None) + tuple(torch.from_numpy(g[n]) for n in ctx.param_names)


class MoE(nn.Module):
    """A Mixture-of-Experts FFN block, (..., d_model) -> (..., d_model), over dmoe's CPU kernels.

    Construct it like :class:`dmoe.MoELayer` (``MoE(d_model, num_experts, expert_width, policy=...,
    activation=..., k=... / tau=... / training=..., seed=..., threads=...)``) or wrap an existing
    layer with ``MoE.from_layer(layer)``. Its parameters are ``nn.Parameter`` views of the layer's
    own storage (no copy): a torch optimizer updating them updates the layer.

    ``adaptive=True`` (top_any only) runs DynMoE's adaptive expert count: forward records each
    training batch; call :meth:`adapt_step` after every optimizer step.
    """

    def __init__(self, d_model: int = 0, num_experts: int = 0, expert_width: int = 0, *,
                 layer: Optional[_core.MoELayer] = None, adaptive: bool = False, adapt_interval: int = 1,
                 **options: Any) -> None:
        super().__init__()
        if layer is None:
            layer = _core.MoELayer(d_model, num_experts, expert_width, **options)
        elif options or d_model or num_experts or expert_width:
            raise ValueError("MoE: give either a layer or the layer's arguments, not both")
        self.layer = layer
        self._param_names: List[str] = []
        self._ptrs: Dict[str, int] = {}
        for name, arr in layer.parameters().items():
            p = nn.Parameter(torch.from_numpy(arr))
            self.register_parameter(name, p)
            self._param_names.append(name)
            self._ptrs[name] = arr.__array_interface__["data"][0]
        self._free: List[_core.Workspace] = []
        self._grads: Optional[_core.Gradients] = None  # the last backward's buffers (_take_grads)
        self._adapter: Optional[_core.ExpertCountAdapter] = None
        self._interval = int(adapt_interval)
        if adaptive:
            if layer.policy != "top_any":
                raise ValueError(f"MoE: adaptive=True needs policy 'top_any', this layer is '{layer.policy}'")
            self._adapter = _core.ExpertCountAdapter(layer, adapt_interval)
        self._aux_vec: Optional[torch.Tensor] = None  # the last forward's aux losses (AUX_NAMES order)
        self._aux: Optional[Dict[str, torch.Tensor]] = None  # by name, built from _aux_vec on first use
        if layer.policy == "top_any":
            layer.training = self.training

    @classmethod
    def from_layer(cls, layer: _core.MoELayer, **kw: Any) -> "MoE":
        """Wraps an existing dmoe.MoELayer (e.g. from DenseFFN.to_moe or dmoe.load_moe_layer)."""
        return cls(layer=layer, **kw)

    # --- workspaces: one per forward whose backward is pending, reused afterwards
    def _take_workspace(self) -> _core.Workspace:
        return self._free.pop() if self._free else _core.Workspace()

    def _give_workspace(self, ws: _core.Workspace) -> None:
        if len(self._free) < 4:
            self._free.append(ws)

    def _params(self) -> List[nn.Parameter]:
        # nn.Module keeps parameters in _parameters (what getattr finds, and what assigning a new
        # Parameter replaces); reading the dict directly skips Module.__getattr__ on the hot path.
        ps = self._parameters
        return [ps[n] for n in self._param_names]  # type: ignore[misc]

    def _take_grads(self) -> Optional[_core.Gradients]:
        # Reusing the last backward's gradient buffers saves allocating and faulting in a new set
        # (19 MB at shape S: layer.backward took 52 ms with new buffers against 43 ms reusing them,
        # and a training step 2-3 ms less, on an Intel Xeon core). Safe only when nothing views
        # them: every NumPy view (and the torch tensors over them, e.g. a .grad) holds a reference
        # to the Gradients object, so its count is then exactly ours (attribute, local, argument).
        g = self._grads
        if g is not None and sys.getrefcount(g) == 3:
            return g
        return None

    def _check_params(self, params: List[nn.Parameter]) -> None:
        ptrs = self._ptrs
        for name, p in zip(self._param_names, params):
            # data_ptr() first: it differs whenever the tensor was moved, cast or replaced, and it
            # is the one check every forward pays (the others only explain the failure).
            if p is None or p.data_ptr() != ptrs[name] or p.device.type != "cpu" or p.dtype != torch.float32:
                raise RuntimeError(
                    f"MoE: parameter '{name}' no longer shares memory with the dmoe layer (it was moved, cast or "
                    f"replaced, e.g. by .to()/.cuda()/.double() or assigning .data); dmoe runs float32 on the CPU "
                    f"and reads its own storage. Update parameters in place (optimizers do) instead."
                )
        # The C++ kernels read a packed copy of w1/w2; torch's version counters tell when an
        # optimizer step or an in-place edit wrote the shared storage, and then it is repacked.
        versions = [p._version for p in params]
        if versions != self.__dict__.get("_seen_versions"):
            self.layer.mark_modified()
            # Plain attributes set through __dict__: nn.Module.__setattr__ costs microseconds a call.
            self.__dict__["_seen_versions"] = versions

    def train(self, mode: bool = True) -> "MoE":
        super().train(mode)
        if self.layer.policy == "top_any":
            self.layer.training = mode  # DynMoE: in training a token that fires nothing gets no expert
        return self

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """y = MoE(x) for x (..., d_model). With return_aux, returns (y, aux) where aux maps each
        auxiliary loss name (AUX_NAMES) to a differentiable 0-d tensor; the last forward's are also
        in ``self.aux_losses``."""
        _check_cpu(x, "MoE.forward", "x")
        params = self._params()
        self._check_params(params)
        d = self.layer.d_model
        if x.shape[-1] != d:
            raise ValueError(f"MoE.forward: x has shape {tuple(x.shape)}, expected (..., {d})")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        needs_grad = torch.is_grad_enabled() and (x2.requires_grad or any(p.requires_grad for p in params))
        if needs_grad:
            y, aux_vec = _MoEFunction.apply(x2, self, *params)
        else:
            # No autograd state: the layer's own workspace, nothing kept for a backward.
            xd = x2.detach()
            y = torch.empty_like(xd)
            self.layer.infer(xd.numpy(), y.numpy())  # same bits, nothing kept for a backward
            if self._adapter is not None and self.training:
                self._adapter.record(xd.numpy())
            aux = self.layer.aux_losses()
            aux_vec = torch.tensor([aux[n] for n in AUX_NAMES], dtype=torch.float32)
        self.__dict__["_aux_vec"] = aux_vec
        self.__dict__["_aux"] = None
        y = y.reshape(*lead, d)
        return (y, self.aux_losses) if return_aux else y

    @property
    def aux_losses(self) -> Dict[str, torch.Tensor]:
        """The last forward's auxiliary losses by name (AUX_NAMES), differentiable 0-d tensors
        (empty before the first forward). Built on first access, not in every forward."""
        if self._aux is None and self._aux_vec is not None:
            self._aux = dict(zip(AUX_NAMES, self._aux_vec.unbind()))
        return self._aux if self._aux is not None else {}

    def aux_loss(self, weights: Dict[str, float]) -> torch.Tensor:
        """sum_i weights[i] * aux_i of the last forward, differentiable (e.g. {'load_balance': 0.01})."""
        if not self.aux_losses:
            raise RuntimeError("MoE.aux_loss: run forward first")
        total = torch.zeros((), dtype=torch.float32)
        for k, w in weights.items():
            if k not in self.aux_losses:
                raise ValueError(f"MoE.aux_loss: unknown loss '{k}', expected one of {AUX_NAMES}")
            total = total + w * self.aux_losses[k]
        return total

    def routing_stats(self) -> _core.RoutingStats:
        """Routing statistics of the last forward run without autograd, or with it while its backward
        is pending."""
        return self.layer.routing_stats()

    # --- D2DMoE
    def router_regression_loss(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D2DMoE's router loss on tokens x (..., d_model), differentiable w.r.t. the router
        parameters (x and the targets are constants, as the experts are frozen). targets default to
        the experts' output norms (layer.router_targets)."""
        if self.layer.policy != "dynamic_k":
            raise ValueError(f"router_regression_loss: needs policy 'dynamic_k', this layer is '{self.layer.policy}'")
        _check_cpu(x, "router_regression_loss", "x")
        self._check_params(self._params())
        x2 = x.detach().reshape(-1, self.layer.d_model).contiguous()
        if targets is None:
            t = torch.from_numpy(self.layer.router_targets(x2))
        else:
            _check_cpu(targets, "router_regression_loss", "targets")
            t = targets.detach().reshape(x2.shape[0], -1).contiguous()
        return _RouterLoss.apply(x2, t, self, self.router_w_in, self.router_w_out)

    # --- DynMoE
    def adapt_step(self, all_reduce: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> Dict[str, Any]:
        """DynMoE's adaptive expert count: call once after every optimizer step. Every
        adapt_interval steps, experts that no recorded token fired are masked off and one expert is
        added from the inputs that fired nothing. ``all_reduce(counts, unrouted)`` (e.g. two
        torch.distributed.all_reduce calls) sums the record window over data-parallel replicas in
        place before an update. Returns what changed."""
        if self._adapter is None:
            raise RuntimeError("MoE.adapt_step: construct the module with adaptive=True (policy 'top_any')")
        a = self._adapter
        if all_reduce is not None and (a.optimizer_steps + 1) % self._interval == 0:
            all_reduce(torch.from_numpy(a.window_counts), torch.from_numpy(a.window_unrouted))
        return a.on_optimizer_step()

    def extra_repr(self) -> str:
        l = self.layer
        opts = {"top_k": f"k={l.k}", "dynamic_k": f"tau={l.tau}, k_max={l.k_max}",
                "top_any": f"active={l.num_active}/{l.num_experts}"}[l.policy]
        return (f"d_model={l.d_model}, num_experts={l.num_experts}, expert_width={l.expert_width}, "
                f"policy={l.policy}, activation={l.activation}, {opts}")


class _RouterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, targets, module: MoE, w_in, w_out):  # type: ignore[override]
        loss, grads = module.layer.router_regression_loss(x, targets)
        ctx.grads = grads
        return torch.tensor(loss, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        s = float(g)
        return (None, None, None, torch.from_numpy(ctx.grads["router_w_in"]) * s,
                torch.from_numpy(ctx.grads["router_w_out"]) * s)


class _Sparsity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, kind: str):  # type: ignore[override]
        v, grad = _core.activation_sparsity(a.detach().contiguous(), kind)
        ctx.grad = grad
        return torch.tensor(v, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return torch.from_numpy(ctx.grad) * float(g), None


def activation_sparsity(a: torch.Tensor, kind: str = "hoyer_squared") -> torch.Tensor:
    """D2DMoE's activation-sparsity penalty on FFN activations a (tokens, F), averaged over tokens,
    differentiable: 'hoyer_squared' (||a||_1^2 / ||a||_2^2) or 'l1'."""
    _check_cpu(a, "activation_sparsity", "a")
    return _Sparsity.apply(a, kind)
