#!/usr/bin/env python3
"""Generate the PyTorch fixtures of TorchGenerator (AttentionKit's copy of PyTorch's CPU generator).

Usage:  python3 Scripts/make_torch_fixtures.py
Needs:  torch (CPU build is enough) and numpy, on an x86-64 CPU with AVX2. Without torch it prints
        how to install it and exits 0 without touching anything: nothing in the tests or CI needs
        torch, only this script does.
Writes: Tests/_TestSupport/Fixtures/torch/ (the .npy files below + manifest.json), replacing
        the folder's contents. Deterministic: re-running rewrites byte-identical files.

What the fixtures pin down
--------------------------
PyTorch's CPU numbers depend on the CPU "capability" its dispatcher picks, for the float math of
normal_ on >= 16 elements and for uniform_'s multiply-add: ATEN_CPU_CAPABILITY=avx2 and avx512
give the same numbers (kernel "vectorized", what nearly every x86-64 machine runs), =default
another set (kernel "scalar"). The capability is fixed when torch is imported, so this script runs
itself once per kernel in a subprocess with the variable set, and checks that torch reports it.

Every case starts with torch.manual_seed(seed) and runs a list of steps on the default generator;
each step's result is saved. Drawn values are float32 ("<f4"), masks booleans ("|b1"), reference
outputs computed in float64 from the float32 inputs ("<f8"); outputs torch computes in float32 are
"<f4". All arrays are C-order.

Manifest schema (manifest.json; paths relative to its folder)
-------------------------------------------------------------
A file ref is {"file": str, "dtype": str, "shape": [int]}.
{
  "schema_version": 1,
  "generator": "Scripts/make_torch_fixtures.py",
  "torch_version": str, "numpy_version": str, "platform": str,
  "kernels": {"vectorized": {"cpu_capability": "AVX2", "same_files_with": ["AVX512"]},
              "scalar": {"cpu_capability": "DEFAULT", "same_files_with": []}},
                                    # same_files_with: other capabilities checked to write
                                    # byte-identical files (when the CPU has them)
  "draws": [                        # generator cases, for every kernel
    {"name": str, "kernel": str, "seed": int,
     "steps": [{"op": "randn" | "rand" | "uniform" | "normal" | "bernoulli",
                "shape": [int],
                "low": float, "high": float,      # uniform only
                "mean": float, "std": float,      # normal only
                "p": float,                       # bernoulli only (|b1 result)
                "expected": file ref}]}],
  "exercise1": [                    # per kernel: the notebook's exercise 1 after manual_seed(42)
    {"kernel": str, "seed": 42,
     "q": ref, "k": ref, "v": ref,                # torch.randn(1, 4, 8) three times, in this order
     "eval": {"output_f32": ref, "weights_f32": ref,   # torch, float32, training=False
              "output_f64": ref, "weights_f64": ref},  # the same from Q, K, V in float64
     "training": {"p": 0.1,                       # the notebook's call: dropout on the weights
                  "keep": ref,                    # F.dropout's mask (|b1), drawn after Q, K, V
                  "weights_f32": ref, "output_f32": ref}}],
  "relpos": [                       # per kernel: RelativePositionAttention(64, 16)
    {"kernel": str, "seed": 42, "d_model": 64, "max_relative_position": 16,
     "parameters": {state_dict name: ref},        # right after manual_seed(42) + construction
     "x": ref,                                    # torch.randn(2, 20, 64), drawn next
     "output_f32": ref, "attention_f32": ref,     # vectorized only: the forward in float32,
     "output_f64": ref, "attention_f64": ref}],   # and the same module and x in float64
  "relpos_notebook_order": {        # vectorized: the notebook run top to bottom
    "kernel": "vectorized", "seed": 42,
    "draws_before_module": int,     # 32-bit draws of exercises 1 and 2 before the module is built
    "first_rows": {state_dict name: ref},         # row 0 of each parameter ([64] each)
    "x_first_row": ref}             # x[0, 0, :]
}
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "Tests" / "_TestSupport" / "Fixtures" / "torch"
KERNELS = {"vectorized": "avx2", "scalar": "default"}
SEEDS = [42, 0, 2**32 + 5, 123456789]
RANDN_SIZES = [1, 7, 15, 16, 17, 32, 1000]


def missing_torch_message() -> str:
    return (
        "make_torch_fixtures.py: torch is not installed; the fixtures in "
        f"{OUT.relative_to(ROOT)} were left as they are.\n"
        "To regenerate them, install PyTorch's CPU build and numpy, then run this script again:\n"
        "  pip install numpy torch --index-url https://download.pytorch.org/whl/cpu"
    )


# ---------------------------------------------------------------- worker (one kernel per process)

class Writer:
    """Saves arrays under unique basenames (prefixed by the kernel) and returns file refs."""

    def __init__(self, folder: Path, prefix: str):
        self.folder = folder
        self.prefix = prefix

    def save(self, name: str, array) -> dict:
        import numpy as np

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from fixturelib import file_ref, save_npy  # numpy, imported only once torch is there

        assert np.asarray(array).dtype in (np.float32, np.float64, np.bool_), array.dtype
        file = f"{self.prefix}__{name}.npy"
        return file_ref(file, save_npy(self.folder / file, array))


def relative_position_attention_class():
    """The notebook's class, exactly as written in exercise 3."""
    import math

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RelativePositionAttention(nn.Module):
        """
        Self-attention with relative position bias.

        score(i, j) = q_i · k_j + q_i · r_(i-j)

        Where r_(i-j) is a learned embedding for relative position.
        """

        def __init__(self, d_model, max_relative_position=32):
            super().__init__()

            self.d_model = d_model
            self.max_relative_position = max_relative_position

            # Q, K, V projections
            self.W_q = nn.Linear(d_model, d_model)
            self.W_k = nn.Linear(d_model, d_model)
            self.W_v = nn.Linear(d_model, d_model)

            # Relative position embeddings
            # Range: -max_relative_position to +max_relative_position
            num_positions = 2 * max_relative_position + 1
            self.relative_embeddings = nn.Embedding(num_positions, d_model)

        def _get_relative_positions(self, seq_len):
            """Compute relative position matrix."""
            positions = torch.arange(seq_len)
            relative = positions.unsqueeze(0) - positions.unsqueeze(1)

            # Clip to valid range
            relative = torch.clamp(
                relative,
                -self.max_relative_position,
                self.max_relative_position
            )

            # Shift to positive indices
            relative = relative + self.max_relative_position

            return relative

        def forward(self, x, mask=None):
            batch_size, seq_len, _ = x.shape

            # Project to Q, K, V
            Q = self.W_q(x)  # (batch, seq, d_model)
            K = self.W_k(x)
            V = self.W_v(x)

            # Content-based attention scores: Q @ K^T
            content_scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(self.d_model)

            # Position-based attention scores
            relative_positions = self._get_relative_positions(seq_len).to(x.device)
            relative_emb = self.relative_embeddings(relative_positions)  # (seq, seq, d_model)

            position_scores = torch.einsum('bqd,qkd->bqk', Q, relative_emb) / math.sqrt(self.d_model)

            # Combine scores
            scores = content_scores + position_scores

            # Apply mask
            if mask is not None:
                scores = scores.masked_fill(mask == 0, float('-inf'))

            # Softmax and apply to values
            attention = F.softmax(scores, dim=-1)
            output = torch.matmul(attention, V)

            return output, attention

    return RelativePositionAttention


def draw_cases(w: Writer, kernel: str) -> list:
    import torch

    def step(name: str, op: str, shape: list, tensor, **params) -> dict:
        entry = {"op": op, "shape": shape, **params}
        entry["expected"] = w.save(name, tensor.numpy())
        return entry

    cases = []
    # randn of every size, each from a fresh manual_seed: both paths (< 16 and >= 16), the redo of
    # the last 16, and a seed >= 2**32 (only its low 32 bits count).
    for seed in SEEDS:
        for n in RANDN_SIZES:
            torch.manual_seed(seed)
            name = f"randn_seed{seed}_n{n}"
            cases.append({"name": name, "kernel": kernel, "seed": seed,
                          "steps": [step(name, "randn", [n], torch.randn(n))]})

    # One generator through several calls: the state carries over, and so does the < 16 path's
    # cached second normal (randn(1) keeps r sin θ; randn(16) does not touch it; randn(3) starts
    # with it).
    torch.manual_seed(7)
    name = "sequence_seed7"
    steps = [
        step(f"{name}_0", "randn", [1], torch.randn(1)),
        step(f"{name}_1", "randn", [16], torch.randn(16)),
        step(f"{name}_2", "randn", [3], torch.randn(3)),
        step(f"{name}_3", "rand", [5], torch.rand(5)),
        step(f"{name}_4", "randn", [2, 3, 5], torch.randn(2, 3, 5)),
        step(f"{name}_5", "uniform", [4, 9], torch.empty(4, 9).uniform_(-0.3, 0.7), low=-0.3,
             high=0.7),
        step(f"{name}_6", "normal", [5], torch.empty(5).normal_(0.5, 2.0), mean=0.5, std=2.0),
        step(f"{name}_7", "normal", [40], torch.empty(40).normal_(0.1, 0.37), mean=0.1, std=0.37),
        step(f"{name}_8", "randn", [7], torch.randn(7)),
        step(f"{name}_9", "bernoulli", [3, 7], torch.empty(3, 7).bernoulli_(0.9).bool(), p=0.9),
        step(f"{name}_10", "randn", [2], torch.randn(2)),
    ]
    cases.append({"name": name, "kernel": kernel, "seed": 7, "steps": steps})

    # uniform_ with bounds whose width is not a power of two (where fusing the multiply-add
    # matters), torch.rand, and the bound nn.Linear(7, ·) uses.
    bound7 = 1 / 7 ** 0.5
    for seed, (low, high) in [(3, (-bound7, bound7)), (4, (2.5, 3.1)), (5, (-0.125, 0.125))]:
        torch.manual_seed(seed)
        name = f"uniform_seed{seed}"
        cases.append({"name": name, "kernel": kernel, "seed": seed, "steps": [
            step(name, "uniform", [300], torch.empty(300).uniform_(low, high), low=low,
                 high=high)]})
    torch.manual_seed(11)
    cases.append({"name": "rand_seed11", "kernel": kernel, "seed": 11,
                  "steps": [step("rand_seed11", "rand", [3, 50], torch.rand(3, 50))]})
    return cases


def exercise1(w: Writer, kernel: str) -> dict:
    import math

    import torch
    import torch.nn.functional as F

    torch.manual_seed(42)
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    state = torch.get_rng_state()

    def attention(q, k, v):
        weights = F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(k.size(-1)), dim=-1)
        return torch.matmul(weights, v), weights

    out32, w32 = attention(q, k, v)
    out64, w64 = attention(q.double(), k.double(), v.double())
    # The notebook's call (training=True, p=0.1): the mask is drawn right after Q, K, V.
    torch.set_rng_state(state)
    _, weights = attention(q, k, v)
    dropped = F.dropout(weights, p=0.1, training=True)
    torch.set_rng_state(state)
    keep = torch.empty(1, 4, 4).bernoulli_(1 - 0.1).bool()
    assert torch.equal(dropped != 0, keep), "F.dropout's mask is not bernoulli_(1 - p)"
    return {
        "kernel": kernel, "seed": 42,
        "q": w.save("ex1_q", q.numpy()), "k": w.save("ex1_k", k.numpy()),
        "v": w.save("ex1_v", v.numpy()),
        "eval": {
            "output_f32": w.save("ex1_eval_output_f32", out32.numpy()),
            "weights_f32": w.save("ex1_eval_weights_f32", w32.numpy()),
            "output_f64": w.save("ex1_eval_output_f64", out64.numpy()),
            "weights_f64": w.save("ex1_eval_weights_f64", w64.numpy()),
        },
        "training": {
            "p": 0.1,
            "keep": w.save("ex1_train_keep", keep.numpy()),
            "weights_f32": w.save("ex1_train_weights_f32", dropped.numpy()),
            "output_f32": w.save("ex1_train_output_f32", torch.matmul(dropped, v).numpy()),
        },
    }


def relpos(w: Writer, kernel: str, with_outputs: bool) -> dict:
    import copy

    import torch

    RelativePositionAttention = relative_position_attention_class()
    torch.manual_seed(42)
    module = RelativePositionAttention(d_model=64, max_relative_position=16)
    x = torch.randn(2, 20, 64)
    entry = {
        "kernel": kernel, "seed": 42, "d_model": 64, "max_relative_position": 16,
        "parameters": {name: w.save(f"relpos_{name}", p.detach().numpy())
                       for name, p in module.state_dict().items()},
        "x": w.save("relpos_x", x.numpy()),
    }
    if with_outputs:
        with torch.no_grad():
            out32, att32 = module(x)
            out64, att64 = copy.deepcopy(module).double()(x.double())
        entry["output_f32"] = w.save("relpos_output_f32", out32.numpy())
        entry["attention_f32"] = w.save("relpos_attention_f32", att32.numpy())
        entry["output_f64"] = w.save("relpos_output_f64", out64.numpy())
        entry["attention_f64"] = w.save("relpos_attention_f64", att64.numpy())
    return entry


def relpos_notebook_order(w: Writer, kernel: str) -> dict:
    """The notebook top to bottom: exercise 1's draws, exercise 2's, then exercise 3's module."""
    import torch
    import torch.nn.functional as F

    RelativePositionAttention = relative_position_attention_class()
    torch.manual_seed(42)
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    F.dropout(F.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.1, training=True)
    lengths = [128, 256, 512, 1024, 2048]
    for n in lengths:
        torch.randn(1, n, n)
    module = RelativePositionAttention(d_model=64, max_relative_position=16)
    x = torch.randn(2, 20, 64)
    # Q, K, V: 3·32 uniforms (>= 16 elements: one draw each); the dropout mask: 16 elements, two
    # draws each; exercise 2: n² draws per matrix (multiples of 16, so no redo).
    draws = 3 * 32 + 2 * 16 + sum(n * n for n in lengths)
    return {
        "kernel": kernel, "seed": 42, "draws_before_module": draws,
        "first_rows": {name: w.save(f"notebook_relpos_{name}_row0", p.detach()[0].numpy())
                       for name, p in module.state_dict().items()
                       if p.dim() == 2},
        "x_first_row": w.save("notebook_relpos_x_row0", x[0, 0].numpy()),
    }


def worker(kernel: str, expected: str, folder: Path) -> None:
    import numpy
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != expected.upper():
        sys.exit(f"make_torch_fixtures.py: asked torch for {expected}, it runs {capability} "
                 "(the vectorized kernel needs an x86-64 CPU with AVX2)")
    torch.set_num_threads(1)
    w = Writer(folder, kernel)
    part = {
        "kernel": kernel, "cpu_capability": capability,
        "torch_version": torch.__version__, "numpy_version": numpy.__version__,
        "draws": draw_cases(w, kernel),
        "exercise1": exercise1(w, kernel),
        "relpos": relpos(w, kernel, with_outputs=kernel == "vectorized"),
    }
    if kernel == "vectorized":
        part["relpos_notebook_order"] = relpos_notebook_order(w, kernel)
    (folder / f"part_{kernel}.json").write_text(json.dumps(part))


# ---------------------------------------------------------------- main

def run_worker(kernel: str, capability: str, folder: Path) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, __file__, "--worker", kernel, capability, str(folder)],
                   env=env, check=True)
    part_file = folder / f"part_{kernel}.json"
    part = json.loads(part_file.read_text())
    part_file.unlink()
    return part


def cpu_has_avx512() -> bool:
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx512")
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, check=True, capture_output=True, text=True)
    return probe.stdout.strip() == "AVX512"


def compact_json(value) -> str:
    """Indented JSON with every list of numbers (shapes) on one line."""
    import re

    text = json.dumps(value, indent=1)
    return re.sub(r"\[\s*([-0-9.e,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)


def main() -> int:
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("numpy") is None:
        print(missing_torch_message())
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        parts = {kernel: run_worker(kernel, capability, scratch)
                 for kernel, capability in KERNELS.items()}
        # AVX-512 builds draw with the same kernel as AVX2: check every drawn array, where the
        # CPU allows. (Computed results, named *_f32 / *_f64, may differ: their matmuls do.)
        also_checked = []
        if cpu_has_avx512():
            with tempfile.TemporaryDirectory() as other:
                other = Path(other)
                run_worker("vectorized", "avx512", other)
                for file in sorted(other.iterdir()):
                    if file.stem.endswith(("_f32", "_f64")):
                        continue
                    if file.read_bytes() != (scratch / file.name).read_bytes():
                        sys.exit(f"make_torch_fixtures.py: {file.name} differs between the AVX2 "
                                 "and AVX-512 builds; the vectorized kernel is not one kernel")
            also_checked.append("AVX512")
        parts["vectorized"]["also_checked"] = also_checked
        first = parts["vectorized"]
        manifest = {
            "schema_version": 1,
            "generator": "Scripts/make_torch_fixtures.py",
            "torch_version": first["torch_version"],
            "numpy_version": first["numpy_version"],
            "platform": f"{platform.system()} {platform.machine()}, "
                        f"{' '.join(platform.libc_ver())}",
            "kernels": {k: {"cpu_capability": p["cpu_capability"],
                            "same_files_with": p.get("also_checked", [])}
                        for k, p in parts.items()},
            "draws": [case for p in parts.values() for case in p["draws"]],
            "exercise1": [p["exercise1"] for p in parts.values()],
            "relpos": [p["relpos"] for p in parts.values()],
            "relpos_notebook_order": first["relpos_notebook_order"],
        }
        (scratch / "manifest.json").write_text(compact_json(manifest) + "\n")
        total = sum(f.stat().st_size for f in scratch.iterdir())
        if total > 500_000:
            sys.exit(f"make_torch_fixtures.py: {total} bytes of fixtures, over the 500 KB budget")
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(scratch, OUT)
        print(f"wrote {len(list(OUT.iterdir()))} files ({total} bytes) to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        sys.exit(main())
