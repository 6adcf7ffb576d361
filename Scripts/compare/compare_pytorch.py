#!/usr/bin/env python3
"""Side-by-side speed of `attn bench` against PyTorch and numpy on the performance targets.

Runs each case interleaved — `attn bench --repeats 3`, then three PyTorch runs, then three numpy
runs, each slot's median kept, then again — with the same thread count everywhere, and prints one
table of the medians over the slots and their ratios. (Three warm runs per slot treat every side
alike: a single run right after another program's is slower for all of them.)
Quote the ratios: the machines are shared and noisy, absolute times are not comparable between
runs.

    "$VENV/bin/python" Scripts/compare/compare_pytorch.py [--repeats 5] [--threads 2]
                                    [--cases attention,causal,...] [--torch-ops]
    ($VENV: the reference environment, set up by Scripts/reference-env.sh)

Cases (shapes from the performance issue):
  attention   B1 H8 T2048 D64          vs torch SDPA                 target ≥ 1.35× torch
  causal      B1 H8 T2048 D64 causal   vs torch SDPA is_causal=True  target ≥ 1.4× torch
  batched     B32 H12 T128 D64         vs torch SDPA                 target ≥ 1.6× torch
  dropout     B4 H8 T1024 D64 p 0.1    vs torch SDPA dropout_p=0.1   target ≥ 10× torch
  relpos      B1 T2048 d64 M32         vs the notebook's module      target ≥ 50× torch,
                                                                      ≤ 1.5× our plain attention
  efficiency  B1 H8 T4096 D64          vs OpenBLAS on the kernel's tile products, in the
                                       kernel's layout (same run)     target ≥ 0.92
  dropout-overhead  B4 H8 T1024 D64: attn with dropout p 0.1 against attn without, both in
              every slot (order alternating)                          target ≤ 5 % slower
  npy-read    `attn bench --read` of a 1 GiB float32 .npy (written to a temporary folder, read
              once before timing: warm page cache)        target ≥ 4 GB/s, peak RSS ≤ 1.1× file
  long        B1 H1 T65536 D64         completes, peak RSS           target < 200 MB
  backward    B1 H8 T2048 D64: the backward pass alone (attn bench --backward) vs
              torch.autograd.grad of SDPA's output (the forward's graph kept)  target ≥ 1× torch
  backward-causal   the same, causal                                 target ≥ 1.2× torch
  backward-dropout  B4 H8 T1024 D64 p 0.1 (PyTorch's math path)       target ≥ 3× torch
  backward-long     B1 H1 T65536 D64 backward, peak RSS              target < 500 MB
  step-dropout      B4 H8 T1024 D64 p 0.1: forward + backward on both sides  target ≥ 3× torch
  decode      B1 H32/8 Tq1 Tk4096 D128: one query per head against a float32 cache, vs torch SDPA
              (enable_gqa)                target ≥ 2× torch, ≥ 80 % of the read bandwidth that
              attn bench measured in the same run (the K and V bytes read over the median time)
  decode-16k  the same at Tk 16,384; decode-b8 at B8 (batched decoding), both without a mask
              (at Tq 1 the bottom-right causal mask of decode lets every key through)
                                                                      the same targets
  decode-16k-float16, decode-16k-q8   the 16k step over a float16 or q8 KV cache (attn bench
              --kv-dtype; K and V stored so, the kernel widening them as it reads), against the
              float32 tensors' step in the same run, and torch SDPA on its float32 cache
                                      target ≤ 0.6× (float16), ≤ 0.4× (q8) the float32 step;
                                      ≥ 4× torch
  decode-layer  one decoding step of a Llama-shaped attention layer: E 2048, 32 query heads on
              8 K/V heads, D 64, one new token against a cache of 4,096 tokens (the new token's
              K/V appended: 4,097 keys), q/k/v projections, RoPE, attention, o_proj
              vs transformers' LlamaAttention (sdpa) with a DynamicCache prefilled with 4,096
              random K/V (cropped back after every step); without transformers, or with
              --torch-ops, the same step in torch ops (F.linear, rotate_half RoPE, the new K/V
              written into a preallocated cache, F.scaled_dot_product_attention(...,
              enable_gqa=True), F.linear). No target: the speedup is reported.
  decode-llama8b  the same step on a Llama-3-8B-shaped layer (issue #25): E 4096, 32 query heads
              on 8 K/V heads, D 128, RoPE theta 500,000, one new token against a cache of 8,192
              tokens (8,193 keys), vs the same transformers LlamaAttention + DynamicCache
              (prefilled with 8,192 random K/V, cropped back after every step)
                                                                      target ≥ 2× torch
              Both layer cases: attn's slot is the median of the case's own 20 runs (`attn
              bench`'s repeats for them), PyTorch's of 3; weights are random (attn: its
              seeded Linear init; transformers: the module's init), float32 on both sides.
  alibi, t5, softcap, sinks (each also -causal)   B1 H8 T2048 D64, the score terms of `attn bench`
              (BLOOM's ALiBi slopes; a random T5 table of 32 buckets, max distance 128,
              bidirectional unless causal; soft-cap 50; one random sink per head) against PyTorch
              as its users run them today:                      target ≥ 3× torch, and attn's own
              time over plain attention (`attn bench`'s over_plain, same run) ≤ 8 % ALiBi,
              ≤ 12 % T5, ≤ 20 % soft-capping, ≤ 3 % sinks
              alibi   SDPA with ALiBi materialized as a float attn_mask [1, H, T, T]:
                      slope_h·(j − i) (the issue's definition; BLOOM's slope_h·j differs from it
                      by a per-row constant)
              t5      SDPA with T5's position bias as the float attn_mask [1, H, T, T]:
                      transformers' T5Attention.compute_bias (a T5Attention with the table as its
                      relative_attention_bias), or without transformers the same bucket formula
                      and embedding lookup in torch
              softcap transformers' Gemma 2 eager_attention_forward(..., softcap=50) (float32
                      softmax), or without transformers the same eager code written out
              sinks   transformers' gpt-oss eager_attention_forward with the sinks as the
                      module's `sinks`, or without transformers the same eager code written out
              -causal: SDPA forbids attn_mask with is_causal, so the causal mask is folded into
              the same float mask (alibi: masked_fill of the upper triangle with −inf; t5: the
              bias plus transformers' float causal mask, finfo.min above the diagonal, as T5
              adds it); the eager cases get that float causal mask [1, 1, T, T] as
              attention_mask.
              The mask is built INSIDE the timed region: a model builds it once per call, and
              that cost is part of what its users pay (BLOOM/T5 share it over the layers: one
              call's mask against one layer's attention is the worst case for PyTorch). Each
              slot also times building the mask alone, printed below the table, so the ratio
              without it can be read off. q, k, v (and the T5 table, slopes, sinks) are made
              once, outside the timing.
  step-alibi, step-t5, step-softcap, step-sinks (each also -causal)   the same cases, forward +
              backward, a training step's attention: `attn bench --backward --cases <term case>`
              (the forward saving its log-sum-exp, then Attention.backward(terms:) given it and
              the output; its forward_backward_ms) against the same PyTorch code run with
              autograd, then torch.autograd.grad of its output (a random dO) with respect to
              q, k, v and the term's learned parameter: the T5 table (transformers'
              relative_attention_bias.weight: the mask is built from it inside the timing and
              its gradient flows back through the embedding) and gpt-oss's sinks; BLOOM's ALiBi
              slopes are fixed and soft-capping has no parameter.     target ≥ 2× torch;
              attn's step (and backward) over plain attention's on the same inputs, interleaved
              in the same `attn bench --backward` run, is reported (no target).

The performance issue's table is one run of
    "$VENV/bin/python" Scripts/compare/compare_pytorch.py --cases attention,causal,batched,efficiency,dropout-overhead,npy-read --json perf.json
(`--json` also writes every slot's figures and the probe's readings, for quoting); the score
terms' (issue #24), of
    "$VENV/bin/python" Scripts/compare/compare_pytorch.py --cases alibi,alibi-causal,t5,t5-causal,softcap,softcap-causal,sinks,sinks-causal
the machine's limits and KV storage types' (issue #26), of
    "$VENV/bin/python" Scripts/compare/compare_pytorch.py --cases attention,batched,efficiency,dropout-overhead,decode,decode-16k,decode-b8,decode-16k-float16,decode-16k-q8
the Llama-3-8B-shaped decoding step's (issue #25), of
    "$VENV/bin/python" Scripts/compare/compare_pytorch.py --cases decode-llama8b --threads 1
(and --threads 2); and the score terms' forward + backward, of
    "$VENV/bin/python" Scripts/compare/compare_pytorch.py --cases step-alibi,step-alibi-causal,step-t5,step-t5-causal,step-softcap,step-softcap-causal,step-sinks,step-sinks-causal

numpy runs the textbook materialized attention (Q·Kᵀ, softmax, ·V) on the attention, causal and
dropout shapes. Without torch (another python than the reference environment's) the script
says so and compares against numpy only.
The script needs `attn` built in release mode (Scripts/setup.sh does that).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # Scripts/compare/ -> the repository
ATTN = Path(os.environ.get("ATTN_BIN", ROOT / ".build" / "release" / "attn"))

CASES = {
    "attention": dict(batch=1, heads=8, seq_len=2048, d=64),
    "causal": dict(batch=1, heads=8, seq_len=2048, d=64, causal=True),
    "dropout": dict(batch=4, heads=8, seq_len=1024, d=64, p=0.1),
    "relpos": dict(batch=1, heads=1, seq_len=2048, d=64, max_rel=32),
    "efficiency": dict(batch=1, heads=8, seq_len=4096, d=64),
    # Many short sequences: the per-tile element-wise work weighs most here.
    "batched": dict(batch=32, heads=12, seq_len=128, d=64),
    # The same shape with and without dropout, both attn (no PyTorch side).
    "dropout-overhead": dict(batch=4, heads=8, seq_len=1024, d=64, p=0.1),
    # Reading a 1 GiB float32 .npy (attn bench --read; no PyTorch side).
    "npy-read": dict(bytes=1 << 30),
    "long": dict(batch=1, heads=1, seq_len=65536, d=64),
    # One new token against a 4,096-token KV cache, grouped-query heads (32 on 8).
    "decode": dict(batch=1, heads=32, kv_heads=8, tq=1, seq_len=4096, d=128),
    "gqa": dict(batch=1, heads=32, kv_heads=8, seq_len=2048, d=128),
    # Decode against the machine's read bandwidth (issue #26): a 16,384-token cache, and eight
    # sequences at once against 4,096 tokens each (batched decoding).
    "decode-16k": dict(batch=1, heads=32, kv_heads=8, tq=1, seq_len=16384, d=128),
    "decode-b8": dict(batch=8, heads=32, kv_heads=8, tq=1, seq_len=4096, d=128),
    # The same 16k step over a compact KV cache (attn bench --kv-dtype: timed beside the float32
    # tensors in the same run); PyTorch's side is its SDPA on its float32 cache.
    "decode-16k-float16": dict(batch=1, heads=32, kv_heads=8, tq=1, seq_len=16384, d=128,
                               kv_dtype="float16"),
    "decode-16k-q8": dict(batch=1, heads=32, kv_heads=8, tq=1, seq_len=16384, d=128,
                          kv_dtype="q8"),
    # One decoding step of a whole Llama-shaped attention layer against a 4,096-token cache.
    "decode-layer": dict(batch=1, embed=2048, heads=32, kv_heads=8, tq=1, seq_len=4096, d=64,
                         rope_theta=10000.0),
    # The same step on a Llama-3-8B-shaped layer against an 8,192-token cache (issue #25).
    "decode-llama8b": dict(batch=1, embed=4096, heads=32, kv_heads=8, tq=1, seq_len=8192, d=128,
                           rope_theta=500000.0),
    # The backward pass alone (attn bench --backward; PyTorch: o.backward(dO) after the forward).
    "backward": dict(batch=1, heads=8, seq_len=2048, d=64, backward=True, bench="attention"),
    "backward-causal": dict(batch=1, heads=8, seq_len=2048, d=64, causal=True, backward=True,
                            bench="causal"),
    "backward-dropout": dict(batch=4, heads=8, seq_len=1024, d=64, p=0.1, backward=True,
                             bench="dropout"),
    "backward-long": dict(batch=1, heads=1, seq_len=65536, d=64, backward=True, bench="long"),
    # A training step's attention with dropout: forward + backward on both sides (PyTorch's
    # dropout runs its math path, which holds the T² weights per head).
    "step-dropout": dict(batch=4, heads=8, seq_len=1024, d=64, p=0.1, backward=True,
                         bench="dropout", step=True),
}
# The score terms of `attn bench` (BenchCase.Term), causal and not: attn bench --cases <case>.
for _term in ("alibi", "t5", "softcap", "sinks"):
    for _causal in (False, True):
        CASES[_term + ("-causal" if _causal else "")] = dict(
            batch=1, heads=8, seq_len=2048, d=64, causal=_causal, term=_term)
# Their training step's attention (issue #24): forward + backward on both sides (attn bench
# --backward --cases <term case>: forward_backward_ms; PyTorch: the same eager or masked-SDPA
# forward, then torch.autograd.grad of its output).
for _term in ("alibi", "t5", "softcap", "sinks"):
    for _causal in (False, True):
        _bench = _term + ("-causal" if _causal else "")
        CASES["step-" + _bench] = dict(batch=1, heads=8, seq_len=2048, d=64, causal=_causal,
                                       term=_term, backward=True, step=True, bench=_bench)
# The terms' settings, as BenchCase.Term has them.
T5_BUCKETS, T5_MAX_DISTANCE, SOFTCAP = 32, 128, 50.0
# The most a term's time may exceed plain attention's (attn bench's over_plain − 1).
TERM_OVERHEAD = {"sinks": 0.03, "alibi": 0.08, "t5": 0.12, "softcap": 0.20}
# The most a compact cache's decode step may take, as a fraction of the float32 tensors' step
# in the same run (attn bench's over_plain), and the least share of the read bandwidth a float32
# decode step must reach (issue #26).
KV_STEP_TARGET = {"float16": 0.6, "q8": 0.4}
BANDWIDTH_TARGET = {"decode": 0.8, "decode-16k": 0.8, "decode-b8": 0.8}
# The cases PyTorch runs, with the speedup they must reach (None: reported, no target).
TORCH_TARGET = {
    "attention": 1.35, "causal": 1.4, "batched": 1.6, "dropout": 10.0, "relpos": 50.0, "decode": 2.0, "gqa": 1.2,
    "decode-16k": 2.0, "decode-b8": 2.0, "decode-16k-float16": 4.0, "decode-16k-q8": 4.0,
    "decode-layer": None, "decode-llama8b": 2.0,
    "backward": 1.0, "backward-causal": 1.2, "backward-dropout": 3.0,
    "step-dropout": 3.0,
    **{case: 2.0 if c.get("step") else 3.0 for case, c in CASES.items() if c.get("term")},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", metavar="PATH",
                        help="also write the table's rows with every slot's figures as JSON")
    parser.add_argument("--torch-ops", action="store_true",
                        help="decode-layer, decode-llama8b: time plain torch ops even when "
                             "transformers is installed")
    args = parser.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be positive")
    return args


SLOT = 3  # runs per interleaved slot, on every side


# The cases `attn bench --cases` knows by name; the others run as its custom case.
STANDARD_BENCH = {"attention", "causal", "dropout", "relpos", "efficiency", "long", "decode",
                  "gqa", "decode-layer", "decode-llama8b",
                  *(case for case, c in CASES.items() if c.get("term") and not c.get("step"))}


def attn_once(case, threads, p=None):
    """One `attn bench` slot of a case (median of SLOT runs); its JSON figures. A backward case
    reports its backward pass's median as `median_ms`; `p` overrides a custom case's dropout."""
    c = CASES[case]
    bench = c.get("bench", case)
    single = bench == "long"
    if bench in STANDARD_BENCH:
        selection = ["--cases", bench]
    else:
        # A shape `attn bench` has no name for: its custom case.
        selection = ["--batch", str(c["batch"]), "--heads", str(c["heads"]),
                     "--seq-len", str(c["seq_len"]), "--d-k", str(c["d"]),
                     "--p", str(p if p is not None else c.get("p", 0.0))]
        for key, flag in (("tq", "--tq"), ("kv_heads", "--kv-heads"), ("kv_dtype", "--kv-dtype")):
            if key in c:
                selection += [flag, str(c[key])]
    out = subprocess.run(
        [str(ATTN), "bench", *selection, "--repeats", "1" if single else str(SLOT),
         "--threads", str(threads), "--format", "json"]
        + (["--backward"] if c.get("backward") else []),
        check=True, capture_output=True, text=True)
    report = json.loads(out.stdout)
    figures = report["cases"][0]
    # The machine's limits attn bench measured in the same run (forward cases).
    figures["limits"] = report.get("limits")
    if c.get("backward"):
        timing = "forward_backward_ms" if c.get("step") else "backward_ms"
        figures["median_ms"] = figures[timing]["median"]
        if c.get("step") and figures.get("plain_forward_backward_ms"):
            # A score term's step against plain attention's, interleaved in the same run.
            figures["plain_median_ms"] = figures["plain_forward_backward_ms"]["median"]
            figures["over_plain"] = figures["forward_backward_over_plain"]
    return figures


PROBE_SCALING = 1.8  # two threads must reach this multiple of one thread's FMA rate


def parallel_now(threads):
    """Whether the threads run in parallel right now (`attn bench --probe`: the FMA rate on
    `threads` threads over one thread's); the vCPUs of this machine sometimes share one core."""
    if threads < 2:
        return True, 1.0
    out = subprocess.run(
        [str(ATTN), "bench", "--probe", "--threads", str(threads), "--format", "json"],
        check=True, capture_output=True, text=True)
    scaling = json.loads(out.stdout)["scaling"]
    return scaling >= PROBE_SCALING * threads / 2, scaling


def timed(fn, runs=SLOT):
    """The median of `runs` timed calls, in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_runner(torch, case, torch_ops=False):
    """A function running the case once in PyTorch (inputs made once, outside the timing)."""
    import torch.nn.functional as F
    c = CASES[case]
    if c.get("embed"):  # decode-layer, decode-llama8b
        return decode_layer_runner(torch, c, torch_ops)
    if c.get("term"):
        return term_runner(torch, c)
    if case == "relpos":
        module = notebook_module(torch)(c["d"], c["max_rel"])
        x = torch.randn(c["batch"], c["seq_len"], c["d"])

        def run():
            with torch.no_grad():
                module(x)
        return run
    kv_heads = c.get("kv_heads", c["heads"])
    q = torch.randn(c["batch"], c["heads"], c.get("tq", c["seq_len"]), c["d"])
    k, v = (torch.randn(c["batch"], kv_heads, c["seq_len"], c["d"]) for _ in range(2))
    causal = c.get("causal", False)
    p = c.get("p", 0.0)
    gqa = kv_heads != c["heads"]
    if c.get("backward") and c.get("step"):
        for t in (q, k, v):
            t.requires_grad_(True)
        grad = torch.randn(q.shape[:-1] + (c["d"],))

        def run_step():
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
            torch.autograd.grad(out, (q, k, v), grad)
        return run_step
    if c.get("backward"):
        for t in (q, k, v):
            t.requires_grad_(True)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        grad = torch.randn_like(out)

        def run_backward():
            # The forward's graph is kept: each run is the backward pass alone.
            torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
        return run_backward

    def run():
        with torch.no_grad():
            # One query against the cache sees every key: no mask, as a decoder step calls it.
            F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=causal, enable_gqa=gqa)
    return run


def decode_layer_runner(torch, c, torch_ops):
    """One decoding step of a Llama-shaped attention layer (float32, batch 1, one token at
    position seq_len, the cache holding seq_len random K/V): transformers' LlamaAttention with a
    DynamicCache when transformers is installed (and not torch_ops), else the same step in torch
    ops. The returned function has a `label` saying which."""
    import torch.nn.functional as F
    e, h, hkv, d, t = c["embed"], c["heads"], c["kv_heads"], c["d"], c["seq_len"]
    theta = c["rope_theta"]
    x = torch.randn(c["batch"], 1, e)
    transformers = None
    if not torch_ops:
        try:
            import transformers
            from transformers import DynamicCache, LlamaConfig
            from transformers.models.llama.modeling_llama import (LlamaAttention,
                                                                  LlamaRotaryEmbedding)
        except ImportError:
            transformers = None
    if transformers is not None:
        cfg = LlamaConfig(hidden_size=e, num_attention_heads=h, num_key_value_heads=hkv,
                          head_dim=d, rope_theta=theta, max_position_embeddings=2 * t,
                          attention_bias=False, attention_dropout=0.0, num_hidden_layers=1,
                          intermediate_size=64, vocab_size=32)
        cfg._attn_implementation = "sdpa"
        layer = LlamaAttention(cfg, layer_idx=0).eval()
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            cache.update(torch.randn(c["batch"], hkv, t, d), torch.randn(c["batch"], hkv, t, d), 0)
            # The model computes cos/sin once per step for all its layers: outside the timing.
            cos_sin = LlamaRotaryEmbedding(cfg)(x, torch.tensor([[t]]))

        def run():
            with torch.no_grad():
                layer(x, position_embeddings=cos_sin, attention_mask=None, cache=cache)
            cache.crop(-1)  # back to the prefilled length for the next run
            assert cache.get_seq_length() == t
        run.label = (f"transformers {transformers.__version__} LlamaAttention (sdpa) + "
                     f"DynamicCache prefilled with {t} K/V")
        return run

    scale = e ** -0.5
    wq, wo = torch.randn(h * d, e) * scale, torch.randn(e, h * d) * (h * d) ** -0.5
    wk, wv = torch.randn(hkv * d, e) * scale, torch.randn(hkv * d, e) * scale
    k_cache = torch.empty(c["batch"], hkv, t + 1, d)
    v_cache = torch.empty(c["batch"], hkv, t + 1, d)
    k_cache[:, :, :t].normal_()
    v_cache[:, :, :t].normal_()
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = (t * inv_freq).repeat(2)  # position t, rotate_half layout
    cos, sin = angles.cos().float(), angles.sin().float()

    def rope(y):
        y1, y2 = y[..., : d // 2], y[..., d // 2:]
        return y * cos + torch.cat((-y2, y1), dim=-1) * sin

    b = c["batch"]

    def run():
        with torch.no_grad():
            q = rope(F.linear(x, wq).view(b, 1, h, d).transpose(1, 2))
            k = rope(F.linear(x, wk).view(b, 1, hkv, d).transpose(1, 2))
            v = F.linear(x, wv).view(b, 1, hkv, d).transpose(1, 2)
            k_cache[:, :, t:t + 1] = k
            v_cache[:, :, t:t + 1] = v
            o = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
            F.linear(o.transpose(1, 2).reshape(b, 1, h * d), wo)
    run.label = (f"torch ops (F.linear, RoPE, preallocated cache of {t} + 1, SDPA enable_gqa, "
                 "F.linear)")
    return run


def bloom_slopes(torch, heads):
    """BLOOM's ALiBi slopes for `heads` heads (build_alibi_tensor's rule, non-powers of two
    included), float32 [heads]."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** k for k in range(1, closest + 1)]
    if closest != heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** k for k in range(1, 2 * (heads - closest) + 1, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def t5_bucket(torch, relative, bidirectional, num_buckets, max_distance):
    """T5's _relative_position_bucket, as transformers computes it (float32 logarithm)."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).to(torch.long) * num_buckets
        relative = torch.abs(relative)
    else:
        relative = -torch.min(relative, torch.zeros_like(relative))
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (torch.log(relative.float() / max_exact)
                         / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


def term_runner(torch, c):
    """One forward of a score-term case the way PyTorch users run it today (the module
    docstring says which code, and that the mask is built inside the timing), or with `step`
    forward + backward: the same forward with autograd, then torch.autograd.grad of its output
    with respect to q, k, v and the term's learned parameter (the T5 table, the sinks). The
    returned function has a `label`, and a `mask_only` building the mask alone (no autograd)
    when the case has one."""
    import types
    import torch.nn.functional as F
    b, h, t, d = c["batch"], c["heads"], c["seq_len"], c["d"]
    causal, term, step = c["causal"], c["term"], c.get("step", False)
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    # What a step differentiates: q, k, v, then the term's parameter (appended below).
    params = [x.requires_grad_(True) for x in (q, k, v)] if step else []
    scale = d ** -0.5
    transformers = None
    try:
        import transformers
    except ImportError:
        pass
    source = f"transformers {transformers.__version__}" if transformers else "torch"

    if term == "alibi":
        slopes = bloom_slopes(torch, h)

        def mask():
            i = torch.arange(t)
            bias = slopes.view(1, h, 1, 1) * (i[None, :] - i[:, None]).float()  # [1, H, T, T]
            if causal:
                bias = bias.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
            return bias
        label = ("SDPA, attn_mask = BLOOM slopes·(j − i) [1, H, T, T] float32"
                 + (" with −inf above the diagonal" if causal else ""))
    elif term == "t5":
        table = torch.randn(T5_BUCKETS, h)
        bias_of = None
        if transformers:
            try:
                from transformers import T5Config
                from transformers.models.t5.modeling_t5 import T5Attention
                config = T5Config(d_model=h * d, d_kv=d, num_heads=h,
                                  relative_attention_num_buckets=T5_BUCKETS,
                                  relative_attention_max_distance=T5_MAX_DISTANCE,
                                  is_decoder=causal)
                module = T5Attention(config, has_relative_attention_bias=True,
                                     layer_idx=0).eval()
                with torch.no_grad():
                    module.relative_attention_bias.weight.copy_(table)
                table = module.relative_attention_bias.weight  # a Parameter: requires grad
                bias_of = lambda: module.compute_bias(t, t)
                source += " T5Attention.compute_bias"
            except ImportError:
                source = "torch (transformers without T5)"
        if bias_of is None:
            table.requires_grad_(step)

            def bias_of():
                i = torch.arange(t)
                buckets = t5_bucket(torch, i[None, :] - i[:, None], not causal, T5_BUCKETS,
                                    T5_MAX_DISTANCE)
                return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)
            source += " bucket formula + embedding"
        if step:
            params.append(table)

        def mask():
            bias = bias_of()  # [1, H, T, T]
            if causal:
                bias = bias + causal_float_mask(torch, t)
            return bias
        label = (f"SDPA, attn_mask = T5 bias [1, H, T, T] float32 from {source}"
                 + (", unidirectional, + float causal mask" if causal else ", bidirectional"))
    else:
        mask = (lambda: causal_float_mask(torch, t)) if causal else None
        module = types.SimpleNamespace(head_dim=d, num_key_value_groups=1, training=False)
        eager = None
        name = "modeling_gemma2" if term == "softcap" else "modeling_gpt_oss"
        if transformers:
            try:
                if term == "softcap":
                    from transformers.models.gemma2.modeling_gemma2 import \
                        eager_attention_forward as eager
                else:
                    from transformers.models.gpt_oss.modeling_gpt_oss import \
                        eager_attention_forward as eager
            except ImportError:
                eager = None
        if term == "sinks":
            module.sinks = torch.randn(h).requires_grad_(step)
            if step:
                params.append(module.sinks)
        if eager is None:
            eager = eager_softcap if term == "softcap" else eager_sinks
            source = f"torch (the eager code of transformers' {name}, written out)"
        else:
            source += f" {name}.eager_attention_forward"
        extra = dict(softcap=SOFTCAP) if term == "softcap" else {}
        attention = eager
        label = (f"{source}" + (f", softcap={SOFTCAP:g}" if term == "softcap" else ", sinks [H]")
                 + (", attention_mask = float causal mask [1, 1, T, T]" if causal else
                    ", attention_mask=None"))

    if term in ("alibi", "t5"):
        forward = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask(), scale=scale)
        out_shape = (b, h, t, d)
    else:
        forward = lambda: attention(module, q, k, v, mask() if mask else None, dropout=0.0,
                                    scaling=scale, **extra)[0]
        out_shape = (b, t, h, d)  # the eager code returns the output transposed, [B, T, H, D]
    if step:
        grad = torch.randn(out_shape)

        def run():
            torch.autograd.grad(forward(), params, grad)
        label += ("; forward + torch.autograd.grad with respect to q, k, v"
                  + {"t5": " and the T5 table", "sinks": " and the sinks"}.get(term, ""))
    else:
        def run():
            with torch.no_grad():
                forward()

    if mask is not None:
        def mask_only():
            with torch.no_grad():
                mask()
        run.mask_only = mask_only
    run.label = label + "; mask built inside the timing" * (mask is not None)
    return run


def causal_float_mask(torch, t):
    """transformers' eager causal mask, [1, 1, T, T]: 0 on and below the diagonal, finfo.min
    above."""
    return torch.zeros(1, 1, t, t).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1),
                                               torch.finfo(torch.float32).min)


def eager_softcap(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  softcap=None, **kwargs):
    """transformers' Gemma 2 eager_attention_forward, written out (no K/V groups, no dropout)."""
    import torch
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = weights / softcap
        weights = torch.tanh(weights)
        weights = weights * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def eager_sinks(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' gpt-oss eager_attention_forward, written out (no K/V groups, no dropout)."""
    import torch
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
    combined = torch.cat([weights, sinks], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.nn.functional.softmax(combined, dim=-1, dtype=combined.dtype)
    weights = probs[..., :-1].to(value.dtype)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def notebook_module(torch):
    """The notebook's RelativePositionAttention, as the torch fixtures script defines it."""
    sys.path.insert(0, str(ROOT / "Scripts" / "fixtures"))
    from make_torch_fixtures import relative_position_attention_class
    return relative_position_attention_class()


def numpy_runner(np, case):
    """Textbook materialized attention in numpy (float32), or None for cases it does not run."""
    if case not in ("attention", "causal", "dropout"):
        return None
    c = CASES[case]
    rng = np.random.default_rng(0)
    shape = (c["batch"], c["heads"], c["seq_len"], c["d"])
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    t = c["seq_len"]
    causal = np.triu(np.ones((t, t), dtype=bool), 1) if c.get("causal") else None
    p = c.get("p", 0.0)

    def run():
        s = q @ k.swapaxes(-1, -2) / np.float32(math.sqrt(c["d"]))
        if causal is not None:
            s[..., causal] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        if p > 0:
            s *= (rng.random(s.shape, dtype=np.float32) >= p) / np.float32(1 - p)
        s @ v
    return run


# The same allocator settings on every side: glibc then keeps freed memory instead of returning
# it to the kernel on every call (`attn bench` sets the same with mallopt; see WarmAllocator.swift).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def main():
    if any(os.environ.get(k) != v for k, v in ALLOCATOR.items()):
        # glibc reads these when the process starts: start again with them set.
        os.environ.update(ALLOCATOR)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    args = parse_args()
    # Thread counts must be set before numpy and torch load their BLAS.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if not ATTN.exists():
        sys.exit(f"{ATTN} not found: run Scripts/setup.sh first")
    import numpy as np
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
        print("PyTorch is not installed: comparing against numpy only. "
              "Run this with the python of the venv that Scripts/reference-env.sh sets up "
              "to compare against PyTorch.\n")

    rows = []
    discards = {}
    labels = {}
    # npy-read's 1 GiB input lives in a temporary folder, removed at exit.
    scratch = tempfile.TemporaryDirectory(prefix="attn-compare-")
    npy_path = None
    for case in args.cases:
        print(f"running {case} …", file=sys.stderr)
        t_run = (torch_runner(torch, case, args.torch_ops)
                 if torch is not None and case in TORCH_TARGET else None)
        if t_run is not None and getattr(t_run, "label", None):
            labels[case] = t_run.label
        n_run = numpy_runner(np, case)
        # The score terms' mask alone (built inside t_run's timing), timed beside it.
        m_run = getattr(t_run, "mask_only", None)
        # Warm-up, outside the timing.
        for fn in (t_run, n_run, m_run):
            if fn is not None:
                fn()
        attn_ms, torch_ms, numpy_ms, plain_ms, eff, peaks = [], [], [], [], [], []
        fractions = []  # per slot: (peak_fraction, bandwidth_fraction, limits)
        overs, back_overs, mask_ms = [], [], []
        slots = []
        wanted = 1 if CASES[case].get("bench", case) == "long" else args.repeats
        discarded = 0
        if case == "npy-read" and npy_path is None:
            npy_path = write_npy(scratch.name, CASES[case]["bytes"])
            read_slot(npy_path)  # into the page cache: the target is a warm-cache read
        while len(attn_ms) < wanted and discarded < 4 * wanted:
            # A slot counts only when the probe before it saw the threads run in parallel.
            ok, scaling = parallel_now(args.threads)
            if not ok:
                discarded += 1
                print(f"  slot discarded: {args.threads} threads ran at {scaling:.2f}× one "
                      f"thread's FMA rate", file=sys.stderr)
                time.sleep(1)
                continue
            slot = dict(probe_scaling=scaling)
            if case == "dropout-overhead":
                plain, dropped = overhead_slot(case, args.threads, len(attn_ms))
                attn_ms.append(dropped)
                plain_ms.append(plain)
                slot.update(dropout_ms=dropped, plain_ms=plain)
            elif case == "npy-read":
                figures = read_slot(npy_path)
                attn_ms.append(figures["time_ms"]["median"])
                growth = figures.get("peak_rss_growth_bytes")  # None where RSS is unreadable
                peaks.append(None if growth is None else growth / figures["bytes"])
                slot.update(read=figures)
            else:
                figures = attn_once(case, args.threads)
                attn_ms.append(figures["median_ms"])
                eff.append(figures.get("ratio_to_sgemm"))
                fractions.append((figures.get("peak_fraction"), figures.get("bandwidth_fraction"),
                                  figures.get("limits")))
                peaks.append(figures.get("peak_rss_bytes"))
                if figures.get("plain_median_ms") is not None:
                    plain_ms.append(figures["plain_median_ms"])
                if figures.get("over_plain") is not None:
                    overs.append(figures["over_plain"])
                if figures.get("backward_over_plain") is not None:
                    back_overs.append(figures["backward_over_plain"])
                slot.update(attn=figures)
            if t_run is not None:
                torch_ms.append(timed(t_run) * 1e3)
                slot.update(torch_ms=torch_ms[-1])
            if m_run is not None:
                mask_ms.append(timed(m_run) * 1e3)
                slot.update(torch_mask_ms=mask_ms[-1])
            if n_run is not None:
                numpy_ms.append(timed(n_run) * 1e3)
                slot.update(numpy_ms=numpy_ms[-1])
            slots.append(slot)
        discards[case] = discarded
        if not attn_ms:
            print(f"{case}: every slot discarded (the threads never ran in parallel)",
                  file=sys.stderr)
            continue
        rows.append(summarize(case, attn_ms, torch_ms, numpy_ms, plain_ms, eff, peaks, overs,
                              back_overs))
        add_limits(rows[-1], fractions)
        if mask_ms:
            row = rows[-1]
            row["torch_mask"] = statistics.median(mask_ms)
            labels[case] += (f" (building the mask alone: {row['torch_mask']:.1f} ms; without it "
                             f"{(row['torch'] - row['torch_mask']) / row['attn']:.2f}× attn)")
        rows[-1]["slots"] = slots
    print_table(rows, args)
    print("slots discarded by the FMA probe (threads not running in parallel): "
          + ", ".join(f"{case} {count}" for case, count in discards.items()))
    for case, label in labels.items():
        print(f"{case} PyTorch side: {label}")
    if args.json:
        write_json(args.json, rows, discards, labels, args, torch)


def overhead_slot(case, threads, index):
    """One slot of dropout-overhead: attn on the case's shape without and with dropout, the
    order alternating between slots; the two medians (ms), without first."""
    p = CASES[case]["p"]
    order = (0.0, p) if index % 2 == 0 else (p, 0.0)
    medians = {q: attn_once(case, threads, p=q)["median_ms"] for q in order}
    return medians[0.0], medians[p]


def write_npy(folder, size):
    """A float32 .npy holding `size` bytes of N(0, 1) data, written a band at a time (the
    script never holds the whole array)."""
    import numpy as np
    side = 16384
    path = Path(folder) / "input.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                      shape=(size // 4 // side, side))
    rng = np.random.default_rng(0)
    for r in range(0, array.shape[0], 1024):
        rows = min(1024, array.shape[0] - r)
        array[r:r + rows] = rng.standard_normal((rows, side), dtype=np.float32)
    array.flush()
    del array
    return path


def read_slot(path):
    """One npy-read slot: `attn bench --read` (median of SLOT reads); its JSON figures."""
    out = subprocess.run(
        [str(ATTN), "bench", "--read", str(path), "--repeats", str(SLOT), "--format", "json"],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def write_json(path, rows, discards, labels, args, torch):
    """The table's rows, every slot's figures and the run's settings, as JSON (written to a
    temporary file, then renamed)."""
    document = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), threads=args.threads, repeats=args.repeats,
        runs_per_slot=SLOT, probe_scaling_required=PROBE_SCALING * args.threads / 2,
        torch=torch.__version__ if torch is not None else None, attn=str(ATTN),
        cpu=cpu_model(), rows=rows, discarded_slots=discards, torch_sides=labels)
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(target)


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo (None elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def summarize(case, attn_ms, torch_ms, numpy_ms, plain_ms, eff, peaks, overs=(),
              back_overs=()):
    med = lambda xs: statistics.median(xs) if xs else None
    row = dict(case=case, attn=med(attn_ms), torch=med(torch_ms), numpy=med(numpy_ms))
    target, measured, met = "", "", None
    if case in TORCH_TARGET and TORCH_TARGET[case] is None and row["torch"] is not None:
        target, measured = "– (reported)", f"{row['torch'] / row['attn']:.2f}× torch"
    elif case in TORCH_TARGET and row["torch"] is not None:
        speedup = row["torch"] / row["attn"]
        # The same ratio slot by slot (both sides of a slot saw the same machine), for noisy runs.
        row["speedup_per_slot"] = med([t / a for t, a in zip(torch_ms, attn_ms)])
        target = f"≥ {TORCH_TARGET[case]:g}× torch"
        measured = f"{speedup:.2f}× torch"
        met = speedup >= TORCH_TARGET[case]
        if CASES[case].get("embed"):
            measured += f" (per slot {row['speedup_per_slot']:.2f}×)"
        if case == "relpos" and plain_ms:
            over = row["attn"] / med(plain_ms)
            target += ", ≤ 1.5× plain"
            measured += f", {over:.2f}× plain"
            met = met and over <= 1.5
        term = CASES[case].get("term")
        if term and CASES[case].get("step") and overs:
            # attn bench --backward's own ratios to plain attention's step and backward, per
            # slot (reported; no target).
            row.update(attn_plain=med(plain_ms) if plain_ms else None,
                       over_plain=med(overs) - 1,
                       backward_over_plain=med(back_overs) - 1 if back_overs else None)
            measured += (f" (per slot {row['speedup_per_slot']:.2f}×), step "
                         f"{row['over_plain'] * 100:+.1f} % over plain")
            if back_overs:
                measured += f" (backward {row['backward_over_plain'] * 100:+.1f} %)"
        elif term and overs:
            # attn bench's own ratio to plain attention of the same shape, per slot.
            over = med(overs) - 1
            target += f", ≤ {TERM_OVERHEAD[term] * 100:g} % over plain"
            measured += f", {over * 100:+.1f} % over plain"
            met = met and over <= TERM_OVERHEAD[term]
    elif case == "efficiency":
        ratio = med(eff)
        target, measured, met = "≥ 0.92 of sgemm", f"{ratio:.2f} of sgemm", ratio >= 0.92
    elif case == "dropout-overhead":
        # Per-slot ratios: both sides of a slot saw the same machine.
        overhead = med([d / q for d, q in zip(attn_ms, plain_ms)]) - 1
        target = "≤ 5 % over no dropout"
        measured = f"+{overhead * 100:.1f} % (no dropout {med(plain_ms):.1f} ms)"
        met = overhead <= 0.05
    elif case == "npy-read":
        size = CASES[case]["bytes"]
        rate = size / (row["attn"] * 1e-3) / 1e9
        rss = None if None in peaks else max(peaks)
        target = "≥ 4 GB/s, peak RSS ≤ 1.1× file"
        measured = f"{rate:.2f} GB/s, peak RSS " + ("n/a" if rss is None else f"{rss:.2f}× file")
        met = rate >= 4 and rss is not None and rss <= 1.1
    elif case in ("long", "backward-long"):
        peak = peaks[0]
        limit = 500e6 if case == "backward-long" else 200e6
        target = f"completes, peak RSS < {limit / 1e6:.0f} MB"
        measured = f"peak RSS {peak / 1e6:.0f} MB" if peak else "completed (RSS n/a)"
        met = peak is not None and peak < limit
    storage = CASES[case].get("kv_dtype")
    if storage and overs:
        # The compact cache's step over the float32 tensors' step in the same run (no torch
        # needed), per slot.
        over = med(overs)
        target = ", ".join(t for t in (target, f"≤ {KV_STEP_TARGET[storage]:g}× the float32 step") if t)
        measured = ", ".join(m for m in (measured, f"{over:.2f}× the float32 step") if m)
        met = (met is not False) and over <= KV_STEP_TARGET[storage]
    row.update(target=target, measured=measured, met=met)
    if row["numpy"] is not None:
        row["measured"] += f"; {row['numpy'] / row['attn']:.1f}× numpy"
    return row


def add_limits(row, fractions):
    """The case's share of the machine's limits, as attn bench measured them in each slot
    (medians over the slots): of the FMA peak, and for memory-bound cases (decode) of the read
    bandwidth; appended to the row's `measured`."""
    med = lambda xs: statistics.median(xs) if xs else None
    peak = med([f[0] for f in fractions if f[0] is not None])
    band = med([f[1] for f in fractions if f[1] is not None])
    limits = [f[2] for f in fractions if f[2]]
    row.update(peak_fraction=peak, bandwidth_fraction=band,
               peak_gflops=med([l["peak_gflops"] for l in limits]),
               bandwidth_gb_per_second=med([l["bandwidth_gb_per_second"] for l in limits]))
    if peak is not None:
        row["measured"] += f"; {peak * 100:.0f}% of FMA peak"
    if band is not None:
        row["measured"] += f", {band * 100:.0f}% of bandwidth"
    wanted = BANDWIDTH_TARGET.get(row["case"])
    if wanted is not None:
        row["target"] = ", ".join(t for t in (row["target"], f"≥ {wanted * 100:.0f}% of bandwidth") if t)
        # Without a bandwidth figure the target is not met: it was not measured.
        row["met"] = row["met"] is not False and band is not None and band >= wanted


def print_table(rows, args):
    fmt = lambda x: f"{x:9.1f}" if x is not None else "        –"
    print(f"\nmedians of {args.repeats} interleaved slots of {SLOT} runs, {args.threads} threads, "
          "float32")
    width = max([34] + [len(r["target"]) + 2 for r in rows])
    print(f"{'case':<19}{'attn ms':>9}{'torch ms':>10}{'numpy ms':>10}  {'target':<{width}}"
          f"{'measured':<58} met")
    for r in rows:
        met = {True: "yes", False: "NO", None: "–"}[r["met"]]
        print(f"{r['case']:<19}{fmt(r['attn'])}{fmt(r['torch']):>10}{fmt(r['numpy']):>10}  "
              f"{r['target']:<{width}}{r['measured']:<58} {met}")
    peaks = [r["peak_gflops"] for r in rows if r.get("peak_gflops")]
    bands = [r["bandwidth_gb_per_second"] for r in rows if r.get("bandwidth_gb_per_second")]
    if peaks:
        print(f"limits (attn bench, {args.threads} threads, medians over the slots): FMA peak "
              f"{statistics.median(peaks):.1f} GFLOP/s, memory read "
              f"{statistics.median(bands):.1f} GB/s")


if __name__ == "__main__":
    main()
