"""
dmoe's C++ kernels: MoE layers (top_k, dynamic_k, top_any) x six activations, float32, CPU.
"""

from collections.abc import Callable, Sequence

import numpy
from numpy.typing import NDArray

from dmoe import DmoeError as DmoeError


activations: tuple = ...

policies: tuple = ('top_k', 'dynamic_k', 'top_any')

class ThreadPool:
    """
    A pool of worker threads that layers can share (the caller is worker 0).
    """

    def __init__(self, threads: int) -> None:
        """A pool of `threads` threads in all (the calling thread included)."""

    @property
    def threads(self) -> int: ...

class Workspace:
    """
    State of one forward (routing plan, activations, statistics) that backward reads.
    A layer has one of its own; autograd gives each pending forward its own.
    """

    def __init__(self) -> None: ...

    @property
    def tokens(self) -> int:
        """Tokens of the last forward, -1 if none."""

    @property
    def nbytes(self) -> int:
        """Bytes held."""

class Gradients:
    """Gradients shaped like a layer's parameters (see MoELayer.parameters)."""

    def tensors(self, group: str = 'all') -> dict:
        """Zero-copy NumPy views of the gradients, by parameter name."""

class RoutingStats:
    """Routing statistics of one forward."""

    @property
    def tokens(self) -> int: ...

    @property
    def slots(self) -> int:
        """(token, expert) pairs run"""

    @property
    def router_flops(self) -> float: ...

    @property
    def expert_flops(self) -> float: ...

    @property
    def dense_flops(self) -> float:
        """FLOPs of the dense FFN of width E*n on the same tokens"""

    @property
    def mean_k(self) -> float:
        """mean experts per token"""

    @property
    def active_fraction(self) -> float:
        """expert FLOPs / dense FLOPs"""

    @property
    def executed_fraction(self) -> float:
        """(router + expert FLOPs) / dense FLOPs"""

    @property
    def k_histogram(self) -> NDArray[numpy.int64]:
        """tokens that ran 0, 1, ..., E experts"""

    @property
    def tokens_per_expert(self) -> NDArray[numpy.int64]: ...

class MoELayer:
    """A Mixture-of-Experts layer over dmoe's CPU kernels (float32)."""

    def __init__(self, d_model: int, num_experts: int, expert_width: int, *, policy: str = 'top_k', activation: str = 'gelu_erf', k: int | None = None, renormalize: bool | None = None, tau: float | None = None, k_max: int | None = None, training: bool | None = None, hidden_bias: bool = True, expert_bias: bool = False, output_bias: bool = True, router_hidden: int = 128, seed: int | None = 0, threads: int | None = None, pool: ThreadPool | None = None, weight_storage: str = 'f32', infer_precision: str = 'exact') -> None:
        """
        Builds a layer. policy: 'top_k' (options k, renormalize), 'dynamic_k' (tau, k_max, router_hidden) or
        'top_any' (training). activation: relu, gelu_erf, gelu_tanh, silu, swiglu, geglu. Weights are
        randomized from `seed` (None: all zero). threads: a pool of its own; pool: a shared ThreadPool;
        neither: the module's default pool (one thread per core). weight_storage, infer_precision: see the
        properties.
        """

    @property
    def policy(self) -> str: ...

    @property
    def activation(self) -> str: ...

    @property
    def d_model(self) -> int: ...

    @property
    def num_experts(self) -> int: ...

    @property
    def expert_width(self) -> int: ...

    @property
    def router_hidden(self) -> int: ...

    @property
    def hidden_bias(self) -> bool: ...

    @property
    def expert_bias(self) -> bool: ...

    @property
    def output_bias(self) -> bool: ...

    @property
    def weight_storage(self) -> str:
        """
        The format the expert products read W1 and W2 in: 'f32' (default), 'bf16' or 'f16'. With a 16-bit
        format the kernels read copies rounded to nearest even (half the bytes per token) and accumulate in
        float32: results are exactly those of a float32 layer holding the rounded W1, W2. The parameters
        stay float32 (the master copy optimizers update); gradients are float32.
        """

    @weight_storage.setter
    def weight_storage(self, arg: str, /) -> None: ...

    @property
    def infer_precision(self) -> str:
        """
        What infer() may compute with: 'exact' (default: forward's bits) or 'bf16'. With 'bf16', on a CPU with
        bf16 matrix tiles (Intel AMX: dmoe.cpu_has_bf16_tiles()), infer rounds the expert inputs, hidden
        activations and W1, W2 to bfloat16 and multiplies on the tiles in float32: about bf16's precision
        from forward's result, several times faster at large batches, still deterministic and independent
        of the batch. Elsewhere infer stays exact. forward and backward are unaffected.
        """

    @infer_precision.setter
    def infer_precision(self, arg: str, /) -> None: ...

    @property
    def infer_on_bf16_tiles(self) -> bool:
        """
        Whether infer() runs on bf16 tiles now (infer_precision 'bf16' on a CPU that has them).
        """

    @property
    def threads(self) -> int:
        """Threads the layer's calls run on."""

    @property
    def max_k(self) -> int:
        """Most experts one token can get."""

    @property
    def flops_per_slot(self) -> float: ...

    @property
    def router_flops_per_token(self) -> float: ...

    @property
    def k(self) -> int | None:
        """top_k: experts per token (None for other policies)."""

    @k.setter
    def k(self, arg: int, /) -> None: ...

    @property
    def renormalize(self) -> bool | None: ...

    @renormalize.setter
    def renormalize(self, arg: bool, /) -> None: ...

    @property
    def tau(self) -> float | None:
        """
        dynamic_k: expert e runs iff r_e >= tau * max r (None for other policies).
        """

    @tau.setter
    def tau(self, arg: float, /) -> None: ...

    @property
    def k_max(self) -> int | None: ...

    @k_max.setter
    def k_max(self, arg: int, /) -> None: ...

    @property
    def training(self) -> bool | None:
        """
        top_any: a token that fires nothing gets no expert (True) or its best active one (False).
        """

    @training.setter
    def training(self, arg: bool, /) -> None: ...

    @property
    def active(self) -> object:
        """
        top_any: the active mask (uint8, copy; assign a new mask to change it). None for other policies.
        """

    @active.setter
    def active(self, arg: Sequence[int], /) -> None: ...

    @property
    def num_active(self) -> int | None: ...

    def randomize(self, seed: int, initial_active: int | None = None) -> None:
        """
        Seeded random weights (PyTorch-style uniform init; top_any: orthonormal gate embeddings).
        top_any: `initial_active` lowest slots active, the rest free for the adaptive count.
        """

    def workspace_size(self, tokens: int) -> int:
        """Bytes a forward on `tokens` tokens keeps."""

    def forward(self, x: object, out: object | None = None, *, workspace: Workspace | None = None) -> object:
        """
        y = MoE(x) for x (tokens, d_model) float32 on the CPU (NumPy or any DLPack tensor, no copy).
        out: where to write y (same shape, writable); None allocates a NumPy array. Returns y.
        workspace: where the forward's state is kept for backward (default: the layer's own).
        The GIL is released while it runs.
        """

    def infer(self, x: object, out: object | None = None, *, workspace: Workspace | None = None) -> object:
        """
        y = MoE(x) for inference: forward's bits; on one thread each expert's output is added into y
        as it is computed, not kept. Routing statistics, plan and scores are kept;
        backward refuses the workspace (call forward for training). Arguments as for forward.
        """

    def __call__(self, x: object, out: object | None = None, *, workspace: Workspace | None = None) -> object: ...

    def make_gradients(self) -> Gradients:
        """
        Zero gradients shaped like the parameters (reuse them across backward calls).
        """

    def backward(self, x: object, dy: object, dx: object | None = None, *, grads: Gradients | None = None, workspace: Workspace | None = None, aux_weights: object | None = None) -> tuple:
        """
        Backward of the forward kept in `workspace`, for L = <dy, y> + sum_i aux_weights[i] * aux_i.
        x must be the forward's input. Overwrites dx (None: allocated) and grads (None: made).
        Returns (dx, grads). The GIL is released while it runs.
        """

    def aux_losses(self, *, workspace: Workspace | None = None) -> dict:
        """
        Auxiliary loss values of the last forward: load_balance, z_loss (top_k); diversity,
        simplicity, balance, efficiency (top_any); zero for terms of other policies.
        """

    def routing_stats(self, *, workspace: Workspace | None = None) -> RoutingStats:
        """Routing statistics of the last forward (a copy)."""

    def scores(self, *, workspace: Workspace | None = None) -> NDArray[numpy.float32]:
        """
        Router scores of the last forward (tokens, num_experts), a copy: softmax probabilities (top_k),
        predicted output norms (dynamic_k) or cosines (top_any).
        """

    def plan(self, *, workspace: Workspace | None = None) -> dict:
        """
        Routing plan of the last forward (copies): token t's slots are token_offsets[t]:token_offsets[t+1]
        of expert (ascending ids) and weight.
        """

    def mark_modified(self) -> None:
        """Declares that parameters were written through arrays taken earlier; the packed copy of w1/w2 is rebuilt on the next forward."""

    def parameters(self, group: str = 'all') -> dict:
        """
        Zero-copy NumPy views of the parameters, by name: w1 (E, f*n, d), b1 (E, f*n), w2 (E, d, n),
        expert_bias (E, d), output_bias (d,), router_* (see docs/python.md). Writing them changes the layer.
        """

    def router_targets(self, x: object, target: str = 'output_norm') -> NDArray[numpy.float32]:
        """
        Per (token, expert) targets from the experts: the L2 norm of each expert's output without b2
        (output_norm, D2DMoE) or the sum of its positive activations (summed_activation, MoEfication).
        """

    def router_regression_loss(self, x: object, targets: object) -> tuple:
        """
        D2DMoE's router loss: mean squared error of r = |ReLU(x W_in) W_out| against targets
        (tokens, E); returns (loss, {router_w_in: grad, router_w_out: grad}). x is a constant.
        """

    def fit_router(self, x: object, *, target: str = 'output_norm', epochs: int = 40, batch_size: int = 64, lr: float = 0.001, weight_decay: float = 0.01, seed: int = 0, heldout_x: object | None = None, progress: Callable | None = None) -> dict:
        """
        Fits the dynamic_k router to its experts' targets on calibration tokens x (experts frozen),
        with AdamW. progress(dict) is called after every epoch (epoch, epochs, loss, tokens_seen,
        steps, seconds): tqdm-friendly. Returns the fit report as a dict.
        """

    def sweep(self, x: object, y_ref: object, taus: Sequence[float], name: str = 'd2dmoe') -> list:
        """
        Measures the dynamic_k layer at each tau on tokens x against y_ref (usually the dense FFN's
        output). One dict per tau: tau, k, flops_fraction, token_rel_error, mean_cosine (per-token
        measures first), rel_error (Frobenius over all tokens), mean_k, k_histogram, ...
        """

    def sweep_top_k(self, x: object, y_ref: object, ks: Sequence[int], name: str = 'moefication') -> list:
        """
        The same router used as top-k (the k largest scores, weight 1): the MoEfication baseline.
        """

    def tau_for_flops(self, x: object, target_fraction: float, *, y_ref: object | None = None, tolerance: float = 0.001, max_evaluations: int = 40) -> dict:
        """
        The smallest tau whose executed FLOPs fraction on tokens x is <= target_fraction (bisection;
        the layer's tau is left as it was: set layer.tau = result['tau']). Errors in result['point']
        are against y_ref, or the layer's all-experts output when y_ref is None.
        """

    def save(self, path: str, dtype: str = 'F32') -> None:
        """
        Writes the layer (configuration, options, weights) to a safetensors file.
        """

def load_moe_layer(path: str, *, threads: int | None = None, pool: ThreadPool | None = None) -> MoELayer:
    """
    Reads a layer written by MoELayer.save (policy and activation come from the file).
    """

class Split:
    """A split of a dense FFN's neurons into experts (see DenseFFN.split)."""

    @property
    def num_experts(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def neurons(self) -> NDArray[numpy.int64]:
        """(num_experts, width): expert e's neurons, ascending"""

    @property
    def inertia(self) -> float: ...

    @property
    def iterations(self) -> int: ...

    @property
    def converged(self) -> bool: ...

    @property
    def restart_inertia(self) -> list[float]: ...

class DenseFFN:
    """
    A dense FFN y = act(x W1^T + b1) W2^T + b2 (float32), the source of a conversion.
    """

    def __init__(self, d_model: int, hidden: int, *, activation: str = 'gelu_erf', seed: int | None = 0, threads: int | None = None, pool: ThreadPool | None = None) -> None: ...

    @staticmethod
    def load(path: str, names: object = 'bert', layer: int = 0, prefix: str = '', activation: str = 'gelu_erf', *, threads: int | None = None, pool: ThreadPool | None = None) -> DenseFFN:
        """
        Loads a dense FFN from a safetensors file by tensor names: 'bert', 'gpt2', 'llama' (with layer
        and prefix) or a dict {w1, b1, w2, b2, w_gate, layout: 'out_in'|'in_out'}.
        """

    @property
    def activation(self) -> str: ...

    @property
    def d_model(self) -> int: ...

    @property
    def hidden(self) -> int: ...

    @property
    def flops_per_token(self) -> float: ...

    def randomize(self, seed: int) -> None: ...

    def mark_modified(self) -> None:
        """Declares that parameters were written through arrays taken earlier; the packed copy of w1/w2 is rebuilt on the next forward."""

    def parameters(self) -> dict:
        """
        Zero-copy NumPy views: w1 (f*F, d) (nn.Linear layout; gated: gate rows then up rows), b1 (f*F),
        w2 (d, F), b2 (d).
        """

    def forward(self, x: object, out: object | None = None) -> object: ...

    def __call__(self, x: object, out: object | None = None) -> object: ...

    def split(self, num_experts: int, *, method: str = 'balanced_kmeans', seed: int = 0, restarts: int = 3, max_iterations: int = 25, gated: str = 'gate') -> Split:
        """
        Splits the hidden units into num_experts experts of equal width (balanced k-means of the input
        weight directions by default; 'contiguous' and 'random' are baselines).
        """

    def to_moe(self, split: Split, *, policy: str = 'dynamic_k', k: int | None = None, renormalize: bool | None = None, tau: float | None = None, k_max: int | None = None, training: bool | None = None, router_hidden: int = 128) -> MoELayer:
        """
        The MoE layer of this FFN split by `split` (router zero: fit it with fit_router). With every
        expert on (dynamic_k, tau = 0) it computes this FFN.
        """

    def save(self, path: str, names: object = 'bert', layer: int = 0, prefix: str = '', dtype: str = 'F32') -> None:
        """Writes the FFN to a safetensors file under the given tensor names."""

class ExpertCountAdapter:
    """
    DynMoE's adaptive expert count for a top_any layer: record batches, then call
    on_optimizer_step() after each optimizer step.
    """

    def __init__(self, layer: MoELayer, interval: int = 1) -> None: ...

    def record(self, x: object, *, workspace: Workspace | None = None) -> None:
        """
        Adds the batch x of the layer's last forward (in `workspace`) to the record window.
        """

    def on_optimizer_step(self) -> dict:
        """
        Counts one optimizer step; every `interval` steps applies the update. Returns what changed.
        """

    def update(self) -> dict:
        """
        Applies the update now (after summing the window over data-parallel replicas).
        """

    def reset_window(self) -> None: ...

    @property
    def optimizer_steps(self) -> int: ...

    @property
    def window_counts(self) -> NDArray[numpy.float64]:
        """
        R_E: tokens that fired each slot in the window (float64, zero-copy: all-reduce it in place).
        """

    @property
    def window_unrouted(self) -> NDArray[numpy.float64]:
        """
        R_S: sum of the inputs that fired nothing (float64, zero-copy: all-reduce it in place).
        """

def cpu_has_bf16_tiles() -> bool:
    """
    Whether this CPU runs MoELayer.infer_precision = 'bf16' on bf16 matrix tiles (Intel AMX-BF16, granted
    by the OS); elsewhere that setting leaves infer exact.
    """

def activation_sparsity(a: object, kind: str = 'hoyer_squared') -> tuple:
    """
    D2DMoE's activation-sparsity penalty on FFN activations a (tokens, F), averaged over tokens:
    'hoyer_squared' (||a||_1^2 / ||a||_2^2) or 'l1'. Returns (value, gradient).
    """
