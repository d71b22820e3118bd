# SPDX-License-Identifier: MIT
"""dmoe: dynamic Mixture-of-Experts layers over dmoe's C++ CPU kernels.

NumPy arrays and DLPack tensors (PyTorch, ...) go in and out without copies; the PyTorch
module with autograd is :class:`dmoe.torch.MoE` (``import dmoe.torch``). See docs/python.md.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as _np

from ._core import (  # noqa: F401  (re-exported)
    DenseFFN,
    DmoeError,
    ExpertCountAdapter,
    Gradients,
    MoELayer,
    RoutingStats,
    Split,
    ThreadPool,
    Workspace,
    __version__,
    activation_sparsity,
    activations,
    cpu_has_bf16_tiles,
    load_moe_layer,
    policies,
)

__all__ = [
    "DenseFFN",
    "DmoeError",
    "ExpertCountAdapter",
    "Gradients",
    "MoELayer",
    "RoutingStats",
    "Split",
    "ThreadPool",
    "Workspace",
    "__version__",
    "activation_sparsity",
    "activations",
    "cpu_has_bf16_tiles",
    "dense_from_weights",
    "load_moe_layer",
    "policies",
]


def _as_f32(name: str, a: Any) -> _np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor: copy through NumPy on the CPU
        a = a.detach().cpu().numpy()
    a = _np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"dense_from_weights: {name} must be a numeric array, got dtype {a.dtype}")
    return a.astype(_np.float32, copy=False)


def dense_from_weights(
    w1: Any,
    w2: Any,
    b1: Optional[Any] = None,
    b2: Optional[Any] = None,
    *,
    w_gate: Optional[Any] = None,
    activation: str = "gelu_erf",
    threads: Optional[int] = None,
    pool: Optional[ThreadPool] = None,
) -> DenseFFN:
    """A :class:`DenseFFN` holding a copy of given weights in the nn.Linear layout.

    ``w1`` is the first projection's weight (F, d) (the up projection for gated activations,
    whose gate projection is ``w_gate``, (F, d)); ``w2`` the second's (d, F); ``b1`` (F,) and
    ``b2`` (d,) the biases (None: zero). NumPy arrays or torch tensors.
    """
    w1 = _as_f32("w1", w1)
    w2 = _as_f32("w2", w2)
    if w1.ndim != 2 or w2.ndim != 2:
        raise ValueError(f"dense_from_weights: w1 and w2 must be matrices, got shapes {w1.shape} and {w2.shape}")
    F, d = w1.shape
    if w2.shape != (d, F):
        raise ValueError(f"dense_from_weights: w2 has shape {w2.shape}, expected (d, F) = {(d, F)} to match w1 {w1.shape}")
    dense = DenseFFN(d, F, activation=activation, seed=None, threads=threads, pool=pool)
    gated = activation in ("swiglu", "geglu")
    if gated != (w_gate is not None):
        raise ValueError(
            f"dense_from_weights: activation '{activation}' {'needs' if gated else 'takes no'} w_gate"
        )
    p = dense.parameters()
    if gated:
        g = _as_f32("w_gate", w_gate)
        if g.shape != (F, d):
            raise ValueError(f"dense_from_weights: w_gate has shape {g.shape}, expected {(F, d)}")
        p["w1"][:F] = g
        p["w1"][F:] = w1
    else:
        p["w1"][...] = w1
    p["w2"][...] = w2
    if b1 is not None:
        b = _as_f32("b1", b1)
        if b.shape != p["b1"].shape:
            raise ValueError(f"dense_from_weights: b1 has shape {b.shape}, expected {p['b1'].shape}")
        p["b1"][...] = b
    if b2 is not None:
        b = _as_f32("b2", b2)
        if b.shape != (d,):
            raise ValueError(f"dense_from_weights: b2 has shape {b.shape}, expected {(d,)}")
        p["b2"][...] = b
    return dense
