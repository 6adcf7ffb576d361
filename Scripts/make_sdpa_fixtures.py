#!/usr/bin/env python3
"""Generate float64 references for scaled dot-product attention in PyTorch's semantics
(F.scaled_dot_product_attention): grouped-query attention, both causal alignments, sliding
windows, boolean and float masks, a scale override, float16/bfloat16-rounded inputs, decoding.

Usage:  /work/venv/bin/python Scripts/make_sdpa_fixtures.py   (any python3 with numpy 2.x)
Needs:  numpy only, and Scripts/fixturelib.py (the helpers the fixture scripts share).
Writes: Tests/_TestSupport/Fixtures/sdpa_gqa/ (flat: .npy files + manifest.json) with
        fixturelib.Writer: deterministic and idempotent. Read by
        Tests/_TestSupport/SDPAFixtures.swift.

Conventions
-----------
Shape legend: B batch, H query heads, Hkv key/value heads (H % Hkv == 0, G = H / Hkv), Tq
queries, Tk keys, D head dim, Dv value dim, W window.

Inputs: Q [B, H, Tq, D], K [B, Hkv, Tk, D], V [B, Hkv, Tk, Dv], from numpy's default_rng seeded
with zlib.crc32("sdpa_gqa/" + case name), rounded to float32 and saved as `<f4`. Keep masks are
`|b1` (True = attend, PyTorch's boolean attn_mask; False = masked), biases are `<f4` (PyTorch's
float attn_mask, ADDED to the scores; may hold -inf). Both broadcast numpy-style (right-aligned)
to [B, H, Tq, Tk] and are indexed by the QUERY head. References are computed in float64 from the
float32 inputs (cast to float64) and saved as `<f8`; every .npy is C-order.

Reference (sdpa_reference below):
  query head h uses key/value head h // G (done here, and only here, by np.repeat of K and V
  along the head axis: PyTorch's enable_gqa);
  score(i, j) = scale·q_i·k_j (+ bias), scale = float32(1/sqrt(D)) computed in float32 when
  "scale" is null, else float32(scale) (the library takes a Swift `Float`; the reference uses
  that exact value, widened, so a float64 kernel can match it to ~1e-15);
  masked where keep == False; or, when causal, where j > limit(i), limit(i) = i (top-left, torch
  is_causal) or i + Tk - Tq (bottom-right, torch causal_lower_right); or, with a window W (which
  implies causal), where j <= limit(i) - W (the W most recent keys stay visible);
  weights = softmax over keys (row max subtracted); a row with every key masked gets zero weights
  and a zero output (never NaN); output = weights·V.
Every case is also checked on sample rows by an independent loop implementation
(reference_row_loops), which maps heads by h // G itself.

Half-precision cases: Q, K, V are drawn, rounded to float16 (`astype(np.float16)`) or to bfloat16
(float32 rounded to nearest-even on the top 16 bits: fixturelib.bf16_bits, as in
make_io_fixtures.py), and the rounded values are saved as `<f4` (what the tests feed the
kernels) plus, for float16, as `<f2`, and for bfloat16 the bit patterns as `<u2`. The reference
uses the rounded values.

Decode cases share one K and V file (Tk = 4096): only the queries differ.

Manifest schema (manifest.json; paths relative to the folder holding it)
------------------------------------------------------------------------
A file ref is {"file": str, "dtype": "<f4" | "<f8" | "|b1" | "<f2" | "<u2", "shape": [int]}.
{
  "schema_version": 1,
  "generator": "Scripts/make_sdpa_fixtures.py",
  "conventions": [str],
  "cases": [Case]
}
Case = {
  "name": str, "description": str,
  "group": "gqa" | "alignment" | "window" | "mask" | "scale" | "half" | "decode",
  "q": ref <f4 [B, H, Tq, D], "k": ref <f4 [B, Hkv, Tk, D], "v": ref <f4 [B, Hkv, Tk, Dv],
  "heads": H, "kv_heads": Hkv, "group_size": G,
  "masks": [{"kind": "keep" | "bias", "file", "dtype", "shape"}],      # 0, 1 or 2 entries
  "causal": bool,                      # true also when only a window is given
  "alignment": "top-left" | "bottom-right",   # AttentionKit's CausalAlignment raw values
  "window": int | null,
  "scale": float | null,               # the requested scale; null = the default 1/sqrt(D)
  "scale_used": float,                 # the float32 scale of the reference, as a float64
  "half": null | {"format": "float16", "q": ref <f2, "k": ref <f2, "v": ref <f2}
              | {"format": "bfloat16", "q": ref <u2, "k": ref <u2, "v": ref <u2},  # bit patterns
  "fully_masked_rows": int,            # rows of the weights that are all zero
  "max_abs_score": float,              # S: max |scale·q·k| over unmasked pairs (no bias)
  "max_abs_product": float,            # A: scale·max_(i,j) sum_c |q_ic·k_jc| over all pairs
  "max_abs_bias": float,               # B: max |finite bias| (0 without a bias)
  "max_abs_value": float,              # max |v|
  "expected": {"output": ref <f8 [B, H, Tq, Dv], "weights": ref <f8 [B, H, Tq, Tk]}
}
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import (FIXTURES, Writer, bf16_bits, bf16_values, f32,  # noqa: E402
                        float32_scale, mask_refs, masked_softmax, rng_factory, visible_keys,
                        write_cases)

OUT = FIXTURES / "sdpa_gqa"
PREFIX = "sdpa_gqa__"
SIZE_LIMIT = 8 * 1024 * 1024  # the whole folder, bytes (8 MiB)

rng_for = rng_factory("sdpa_gqa/")


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def sdpa_reference(q, k, v, keep, bias, causal, alignment, window, scale):
    """float64 SDPA of float32 inputs. q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv];
    keep bool / bias float32, broadcastable to [B, H, Tq, Tk]. Returns (output, weights,
    unmasked-pair scores with NaN where masked)."""
    group = q.shape[1] // k.shape[1]
    q64 = q.astype(np.float64)
    k64 = np.repeat(k.astype(np.float64), group, axis=1)  # [B, H, Tk, D]
    v64 = np.repeat(v.astype(np.float64), group, axis=1)  # [B, H, Tk, Dv]
    raw = np.einsum("bhqd,bhkd->bhqk", q64, k64) * scale
    scores = raw if bias is None else raw + bias.astype(np.float64)
    seen = visible_keys(q.shape[2], k.shape[2], causal, alignment, window)
    if keep is not None:
        seen = seen & keep
    seen = np.broadcast_to(seen, scores.shape)
    scores = np.where(seen, scores, -np.inf)
    weights = masked_softmax(scores)
    output = np.einsum("bhqk,bhkv->bhqv", weights, v64)
    return output, weights, np.where(seen & np.isfinite(scores), raw, np.nan)


def reference_row_loops(q, k, v, keep, bias, causal, alignment, window, scale, b, h, i):
    """One row (weights [Tk], output [Dv]) with plain loops: an independent check of the
    vectorized reference, mapping query head h to key/value head h // G itself."""
    heads, kv_heads = q.shape[1], k.shape[1]
    tq, tk, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    kh = h // (heads // kv_heads)
    limit = i + (tk - tq if alignment == "bottom-right" else 0)
    keep_b = None if keep is None else np.broadcast_to(keep, (q.shape[0], heads, tq, tk))
    bias_b = None if bias is None else np.broadcast_to(bias, (q.shape[0], heads, tq, tk))
    scores = []
    for j in range(tk):
        masked = (causal or window is not None) and j > limit
        masked = masked or (window is not None and j <= limit - window)
        masked = masked or (keep_b is not None and not keep_b[b, h, i, j])
        s = -math.inf
        if not masked:
            s = math.fsum(float(q[b, h, i, c]) * float(k[b, kh, j, c]) for c in range(d)) * scale
            if bias_b is not None:
                s += float(bias_b[b, h, i, j])
        scores.append(s)
    peak = max(scores)
    if peak == -math.inf:
        return [0.0] * tk, [0.0] * dv
    e = [math.exp(s - peak) for s in scores]
    total = math.fsum(e)
    w = [x / total for x in e]
    out = [math.fsum(w[j] * float(v[b, kh, j, c]) for j in range(tk)) for c in range(dv)]
    return w, out


def max_abs_product(q, k, scale) -> float:
    """A = scale·max over (b, h, i, j) of sum_c |q_c·k_c| (kv head h // G), float64."""
    group = q.shape[1] // k.shape[1]
    qa = np.abs(q.astype(np.float64))
    ka = np.repeat(np.abs(k.astype(np.float64)), group, axis=1)
    return float(np.einsum("bhqd,bhkd->bhqk", qa, ka).max() * scale)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def normal_qkv(rng, b, h, hkv, tq, tk, d, dv):
    q = f32(rng.standard_normal((b, h, tq, d)))
    k = f32(rng.standard_normal((b, hkv, tk, d)))
    v = f32(rng.standard_normal((b, hkv, tk, dv)))
    return q, k, v


def case(name, description, group, q, k, v, keep=None, bias=None, causal=False,
         alignment="top-left", window=None, scale=None, half=None, shared_kv=None):
    return dict(name=name, description=description, group=group, q=q, k=k, v=v, keep=keep,
                bias=bias, causal=causal or window is not None, alignment=alignment,
                window=window, scale=scale, half=half, shared_kv=shared_kv)


def gqa_cases():
    out = []
    for hkv in (8, 2, 1):
        name = f"gqa_h8_kv{hkv}"
        q, k, v = normal_qkv(rng_for(name), 2, 8, hkv, 33, 33, 16, 8)
        out.append(case(name, f"B 2, H 8, Hkv {hkv} (G {8 // hkv}), Tq = Tk = 33, D 16, Dv 8, "
                        "no mask", "gqa", q, k, v))
    name = "gqa_h8_kv2_causal_bias"
    rng = rng_for(name)
    q, k, v = normal_qkv(rng, 1, 8, 2, 33, 33, 16, 8)
    bias = f32(rng.standard_normal((8, 33, 33)))  # [H, Tq, Tk]: differs per QUERY head
    bias[3, 10, 4] = -np.inf
    out.append(case(name, "B 1, G 4, causal, bias [H, Tq, Tk] that differs per query head (a mask read "
                    "by the key/value head would be wrong)", "gqa", q, k, v, bias=bias,
                    causal=True))
    return out


def alignment_cases():
    out = []
    for tq, tk in ((5, 40), (37, 37), (40, 7)):
        for alignment in ("top-left", "bottom-right"):
            short = "tl" if alignment == "top-left" else "br"
            name = f"causal_{short}_tq{tq}_tk{tk}"
            q, k, v = normal_qkv(rng_for(name), 1, 2, 2, tq, tk, 16, 8)
            note = ""
            if tq > tk and alignment == "bottom-right":
                note = f"; the first Tq - Tk = {tq - tk} rows see no key (zeros)"
            out.append(case(name, f"causal {alignment}, Tq {tq}, Tk {tk}{note}", "alignment",
                            q, k, v, causal=True, alignment=alignment))
    return out


def window_cases():
    out = []
    name = "window3_t300"
    q, k, v = normal_qkv(rng_for(name), 1, 1, 1, 300, 300, 16, 8)
    out.append(case(name, "window 3 (smaller than a tile), top-left, Tq = Tk = 300", "window",
                    q, k, v, window=3))
    name = "window100_t300"
    q, k, v = normal_qkv(rng_for(name), 1, 1, 1, 300, 300, 16, 8)
    out.append(case(name, "window 100 (larger than a tile), bottom-right, Tq = Tk = 300",
                    "window", q, k, v, window=100, alignment="bottom-right"))
    name = "window64_decode_tq4_tk300"
    q, k, v = normal_qkv(rng_for(name), 1, 4, 1, 4, 300, 16, 8)
    out.append(case(name, "window 64, bottom-right, Tq 4 against Tk 300, H 4, Hkv 1", "window",
                    q, k, v, window=64, alignment="bottom-right"))
    return out


def mask_cases():
    out = []
    name = "keep_bool_full_row"
    rng = rng_for(name)
    q, k, v = normal_qkv(rng, 2, 4, 2, 19, 23, 16, 8)
    keep = rng.random((2, 4, 19, 23)) > 0.3  # [B, H, Tq, Tk], True = attend
    keep[..., 0] = True
    keep[1, 2, 5, :] = False  # a fully masked row
    out.append(case(name, "bool keep [B, H, Tq, Tk], G 2, batch 1 head 2 query 5 fully masked",
                    "mask", q, k, v, keep=keep))

    name = "bias_inf_full_row"
    rng = rng_for(name)
    q, k, v = normal_qkv(rng, 2, 4, 2, 21, 26, 16, 8)
    bias = f32(rng.standard_normal((2, 4, 21, 26)) * 2.0)  # [B, H, Tq, Tk], added
    bias[rng.random(bias.shape) < 0.15] = -np.inf
    bias[..., 1] = 0.5
    bias[0, 3, 7, :] = -np.inf  # a fully masked row through the bias alone
    out.append(case(name, "float bias [B, H, Tq, Tk] with -inf entries, G 2, batch 0 head 3 "
                    "query 7 all -inf", "mask", q, k, v, bias=bias))

    name = "keep_and_bias_broadcast"
    rng = rng_for(name)
    q, k, v = normal_qkv(rng, 2, 4, 1, 17, 20, 16, 8)
    keep = np.ones((2, 1, 1, 20), dtype=bool)  # [B, 1, 1, Tk] key padding
    keep[0, ..., 15:] = False
    keep[1, ..., 9:] = False
    bias = f32(rng.standard_normal((17, 20)))  # [Tq, Tk] over B and H
    bias[4, :9] = -np.inf  # with batch 1's padding, query 4 sees nothing there
    bias[2, 3] = -np.inf
    out.append(case(name, "bool key padding [B, 1, 1, Tk] and bias [Tq, Tk] with -inf, G 4; "
                    "query 4 of batch 1 masked by the two together", "mask", q, k, v,
                    keep=keep, bias=bias))

    name = "causal_br_keep_bias_full_row"
    rng = rng_for(name)
    q, k, v = normal_qkv(rng, 1, 4, 2, 12, 30, 16, 8)
    keep = rng.random((1, 4, 12, 30)) > 0.25
    keep[0, 1, 0, :19] = False  # query 0 sees keys 0...18 (bottom-right): all masked
    bias = f32(rng.standard_normal((4, 1, 30)))  # [H, 1, Tk]
    out.append(case(name, "causal bottom-right Tq 12 Tk 30, keep [B, H, Tq, Tk] + bias [H, 1, Tk]; "
                    "head 1 query 0 fully masked by keep within its causal range", "mask",
                    q, k, v, keep=keep, bias=bias, causal=True, alignment="bottom-right"))
    return out


def scale_cases():
    name = "scale_override_0p3"
    q, k, v = normal_qkv(rng_for(name), 2, 2, 1, 9, 13, 16, 8)
    return [case(name, "scale 0.3 (the default would be 0.25), G 2", "scale", q, k, v,
                 scale=0.3)]


def half_cases():
    out = []
    name = "float16_gqa_causal"
    rng = rng_for(name)
    shapes = [(1, 4, 40, 64), (1, 2, 40, 64), (1, 2, 40, 16)]
    halves = [rng.standard_normal(s).astype(np.float32).astype(np.float16) for s in shapes]
    q, k, v = (h.astype(np.float32) for h in halves)
    out.append(case(name, "Q, K, V rounded to float16 (also saved as <f2), G 2, causal, Tq = Tk "
                    "= 40, D 64, Dv 16", "half", q, k, v, causal=True,
                    half=("float16", halves)))
    name = "bfloat16_gqa"
    rng = rng_for(name)
    bits = [bf16_bits(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    q, k, v = (bf16_values(b) for b in bits)
    out.append(case(name, "Q, K, V rounded to bfloat16 (bit patterns saved as <u2), G 2, no mask, "
                    "Tq = Tk = 40, D 64, Dv 16", "half", q, k, v, half=("bfloat16", bits)))
    return out


def decode_cases():
    rng = rng_for("decode_shared_kv")
    k = f32(rng.standard_normal((1, 2, 4096, 64)))
    v = f32(rng.standard_normal((1, 2, 4096, 8)))
    out = []
    for tq in (1, 2, 7):
        name = f"decode_tq{tq}"
        q = f32(rng_for(name).standard_normal((1, 8, tq, 64)))
        out.append(case(name, f"decode: Tq {tq} against Tk 4096, H 8, Hkv 2, D 64, Dv 8, causal "
                        "bottom-right (K and V shared by the decode cases)", "decode", q, k, v,
                        causal=True, alignment="bottom-right", shared_kv="decode_shared"))
    return out


# --------------------------------------------------------------------------------------------


def write_case(w: Writer, c: dict) -> dict:
    q, k, v = c["q"], c["k"], c["v"]
    heads, kv_heads = q.shape[1], k.shape[1]
    assert heads % kv_heads == 0 and q.shape[0] == k.shape[0] == v.shape[0]
    assert all(a.dtype == np.float32 for a in (q, k, v))
    scale = float32_scale(q.shape[-1], c["scale"])
    prefix = PREFIX + c["name"] + "__"
    kv_prefix = PREFIX + c["shared_kv"] + "__" if c["shared_kv"] else prefix
    entry = {"name": c["name"], "description": c["description"], "group": c["group"],
             "q": w.npy(prefix + "q.npy", q, "<f4"),
             "k": w.npy(kv_prefix + "k.npy", k, "<f4"),
             "v": w.npy(kv_prefix + "v.npy", v, "<f4"),
             "heads": heads, "kv_heads": kv_heads, "group_size": heads // kv_heads}
    entry["masks"] = mask_refs(w, prefix, c["keep"], c["bias"])
    entry["causal"] = c["causal"]
    entry["alignment"] = c["alignment"]
    entry["window"] = c["window"]
    entry["scale"] = c["scale"]
    entry["scale_used"] = scale
    entry["half"] = None
    if c["half"] is not None:
        fmt, arrays = c["half"]
        dtype = "<f2" if fmt == "float16" else "<u2"
        entry["half"] = {"format": fmt, **{
            role: w.npy(prefix + f"{role}_{fmt}.npy", a, dtype)
            for role, a in zip(("q", "k", "v"), arrays)}}

    args = (q, k, v, c["keep"], c["bias"], c["causal"], c["alignment"], c["window"], scale)
    out, weights, raw = sdpa_reference(*args)
    if not (np.all(np.isfinite(out)) and np.all(np.isfinite(weights))):
        raise AssertionError(f"{c['name']}: non-finite reference")
    # Sample rows against the loop implementation: first, middle, last of two heads.
    b_last, h_last, tq = q.shape[0] - 1, heads - 1, q.shape[2]
    for b, h in {(0, 0), (b_last, h_last), (b_last, heads // 2)}:
        for i in sorted({0, tq // 2, tq - 1}):
            lw, lo = reference_row_loops(*args, b, h, i)
            np.testing.assert_allclose(weights[b, h, i], lw, rtol=1e-12, atol=1e-300)
            np.testing.assert_allclose(out[b, h, i], lo, rtol=1e-11, atol=1e-14)
    zero_rows = np.all(weights == 0, axis=-1)
    assert np.all(out[zero_rows] == 0)
    entry["fully_masked_rows"] = int(zero_rows.sum())
    entry["max_abs_score"] = float(np.nanmax(np.abs(raw)))
    entry["max_abs_product"] = max_abs_product(q, k, scale)
    bias = c["bias"]
    finite_bias = np.abs(bias[np.isfinite(bias)]) if bias is not None else np.zeros(1)
    entry["max_abs_bias"] = float(finite_bias.max()) if finite_bias.size else 0.0
    entry["max_abs_value"] = float(np.abs(v).max())
    entry["expected"] = {
        "output": w.npy(prefix + "expected_output.npy", out, "<f8"),
        "weights": w.npy(prefix + "expected_weights.npy", weights, "<f8"),
    }
    return entry


CONVENTIONS = [
    "Q [B, H, Tq, D], K [B, Hkv, Tk, D], V [B, Hkv, Tk, Dv], H % Hkv == 0: query head h uses "
    "key/value head h // (H / Hkv).",
    "Inputs are float32 (<f4) from numpy default_rng(crc32('sdpa_gqa/' + name)); references are "
    "float64 (<f8) computed from the float32 inputs cast to float64.",
    "score = scale_used·q·k + bias; keep (|b1) False = masked; bias (<f4) is added and may be "
    "-inf; both broadcast right-aligned to [B, H, Tq, Tk] (query heads).",
    "Causal: masked where j > limit(i), limit(i) = i (top-left) or i + Tk - Tq (bottom-right); "
    "a window W (implies causal) also masks j <= limit(i) - W.",
    "Softmax over keys; a row with every key masked has zero weights and a zero output.",
    "scale null = the default float32 1/sqrt(D); scale_used is the float32 value used.",
    "Half cases: the <f4 inputs hold float16- or bfloat16-rounded values; the reference uses them.",
]


def main() -> None:
    cases = (gqa_cases() + alignment_cases() + window_cases() + mask_cases() + scale_cases()
             + half_cases() + decode_cases())
    # The decode cases share one K and V file.
    write_cases(Writer(OUT, shared_files=True), __file__, CONVENTIONS, cases, write_case,
                size_limit=SIZE_LIMIT)


if __name__ == "__main__":
    main()
