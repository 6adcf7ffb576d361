#!/usr/bin/env python3
"""Gradients of `attn relpos --grad-out` against PyTorch autograd on the notebook's
RelativePositionAttention: one table of worst absolute and relative errors per tensor against
PyTorch run in float64, beside PyTorch float32's own.

    "$VENV/bin/python" Scripts/compare/compare_relpos_grads.py [--attn PATH] [--work DIR]
                                                               [--threads N]
    ($VENV: the reference environment, set up by Scripts/reference-env.sh)

Needs torch, safetensors and numpy, and a built attn (release: swift build -c release).

For each case the notebook's class (verbatim, from Scripts/fixtures/make_torch_fixtures.py's
relative_position_attention_class(); the forward's relative position is j - i, as its code
computes it) is built in float32 with torch.manual_seed(seed); its state_dict is saved as
float32 safetensors, x and dY as float32 .npy (and a keep mask as bool .npy). Then
  torch64: the module and x converted to float64, L = sum(dY * Y), L.backward()
  torch32: the same in float32
  attn:    attn relpos --weights W --input X --grad-out DY --dx-out DX --grads-out G --out Y
           [--mask causal | --mask KEEP.npy]
Columns, each "worst |a - b|" and "worst relative" = max |a - b| / |b| over the elements where
|b| > 1e-3·max|b| (near-zero entries left out; W_k.bias, whose exact gradient is 0 because a
constant added to a whole row of scores leaves the softmax unchanged, shows only its absolute
error):
  attn vs torch64    attn's tensor against PyTorch float64
  torch32 vs 64      PyTorch float32 against PyTorch float64, for scale
The keep-mask case has no fully masked row: there the notebook's softmax gives NaN (attn gives
zeros; RelativePositionBackwardTests checks that case against numpy).

attn: --attn PATH, else $ATTN_BIN, else .build/release/attn.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]  # Scripts/compare/ -> the repository


# The notebook's exercise 3, verbatim (attention-from-scratch-solutions.txt), as
# make_torch_fixtures.py keeps it.
sys.path.insert(0, str(ROOT / "Scripts" / "fixtures"))
from make_torch_fixtures import relative_position_attention_class  # noqa: E402

RelativePositionAttention = relative_position_attention_class()


# name, B, T, D, M, mask ("none" | "causal" | "keep"), seed
CASES = [
    ("notebook", 2, 20, 64, 16, "none", 0),
    ("m<t causal", 2, 48, 32, 4, "causal", 1),
    ("m>t keep", 3, 12, 16, 20, "keep", 2),
    ("m=0", 2, 9, 8, 0, "none", 3),
    ("long", 1, 200, 64, 8, "causal", 4),
]
NAMES = ["W_q.weight", "W_q.bias", "W_k.weight", "W_k.bias", "W_v.weight", "W_v.bias",
         "relative_embeddings.weight"]


def autograd(module, x, dy, mask, dtype):
    m = RelativePositionAttention(module.d_model, module.max_relative_position)
    m.load_state_dict(module.state_dict())
    m = m.to(dtype)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    y, _ = m(xt, None if mask is None else torch.tensor(mask))
    (y * torch.tensor(dy, dtype=dtype)).sum().backward()
    grads = {n: p.grad.detach().numpy().astype(np.float64) for n, p in m.named_parameters()}
    grads["x"] = xt.grad.detach().numpy().astype(np.float64)
    grads["output"] = y.detach().numpy().astype(np.float64)
    return grads


def errors(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    worst_abs = float(diff.max()) if diff.size else 0.0
    big = np.abs(b) > 1e-3 * np.abs(b).max() if b.size and np.abs(b).max() > 1e-12 else None
    worst_rel = float((diff[big] / np.abs(b[big])).max()) if big is not None and big.any() \
        else float("nan")
    return worst_abs, worst_rel


def attn_binary(path):
    for candidate in [path, os.environ.get("ATTN_BIN"), str(ROOT / ".build/release/attn")]:
        if candidate and Path(candidate).is_file():
            return str(Path(candidate).resolve())
    sys.exit("no attn binary: build with swift build -c release, or pass --attn PATH")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attn", help="the attn executable (default .build/release/attn)")
    p.add_argument("--work", help="folder for the files (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    attn = attn_binary(args.attn)
    work = Path(args.work or tempfile.mkdtemp(prefix="relpos-grads-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, b, t, d, m, mask_kind, seed in CASES:
        torch.manual_seed(seed)
        module = RelativePositionAttention(d, m)
        folder = work / name.replace(" ", "_").replace("<", "lt").replace(">", "gt") \
            .replace("=", "eq")
        folder.mkdir(exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in module.state_dict().items()},
                  str(folder / "w.safetensors"), metadata={"format": "pt"})
        x = torch.randn(b, t, d).numpy()
        dy = torch.randn(b, t, d).numpy()
        np.save(folder / "x.npy", x)
        np.save(folder / "dy.npy", dy)
        mask = None
        flags = []
        if mask_kind == "causal":
            mask = np.tril(np.ones((t, t), dtype=bool))[None].repeat(b, 0)
            flags = ["--mask", "causal"]
        elif mask_kind == "keep":
            mask = np.random.default_rng(seed).random((b, t, t)) < 0.6
            mask[:, np.arange(t), np.arange(t)] = True   # no fully masked row (NaN in PyTorch)
            np.save(folder / "keep.npy", mask)
            flags = ["--mask", "keep.npy"]
        t64 = autograd(module, x, dy, mask, torch.float64)
        t32 = autograd(module, x, dy, mask, torch.float32)
        command = [attn, "relpos", "--weights", "w.safetensors", "--input", "x.npy",
                   "--grad-out", "dy.npy", "--dx-out", "dx.npy", "--grads-out",
                   "grads.safetensors", "--out", "y.npy", "--threads", str(args.threads)] + flags
        run = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        print(f"[{name}] B {b}, T {t}, D {d}, M {m}, mask {mask_kind}: (cd {folder} && "
              + " ".join(shlex.quote(c) for c in command) + f") -> exit {run.returncode}")
        if run.returncode != 0:
            print(run.stdout[-2000:], run.stderr, sep="\n")
            sys.exit(1)
        for line in run.stdout.splitlines():
            if line.startswith("  ✓") or line.startswith("  ✗"):
                print("   ", line.strip())
        ours = {n: v.astype(np.float64) for n, v in load_file(str(folder / "grads.safetensors"))
                .items()}
        ours["x"] = np.load(folder / "dx.npy").astype(np.float64)
        ours["output"] = np.load(folder / "y.npy").astype(np.float64)
        for tensor in ["output", "x"] + NAMES:
            a_abs, a_rel = errors(ours[tensor], t64[tensor])
            p_abs, p_rel = errors(t32[tensor], t64[tensor])
            label = "dx" if tensor == "x" else ("Y" if tensor == "output" else tensor)
            rows.append((name, label, a_abs, a_rel, p_abs, p_rel,
                         float(np.abs(t64[tensor]).max())))
    print()
    header = (f"{'case':<12} {'tensor':<27} {'max|torch64|':>12} {'attn vs torch64':>24} "
              f"{'torch32 vs 64':>24}")
    print(header)
    print(f"{'':<12} {'':<27} {'':>12} {'abs':>11} {'rel':>12} {'abs':>11} {'rel':>12}")
    print("-" * len(header))
    for name, label, a_abs, a_rel, p_abs, p_rel, scale in rows:
        print(f"{name:<12} {label:<27} {scale:>12.3e} {a_abs:>11.2e} {a_rel:>12.2e} "
              f"{p_abs:>11.2e} {p_rel:>12.2e}")


if __name__ == "__main__":
    main()
