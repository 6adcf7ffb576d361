#!/usr/bin/env python3
"""Generate float64 references for a multi-head self-attention layer (projections, optional
rotary position embeddings, grouped-query heads, composed masks, output projection, and BERT's
residual LayerNorm), with the weights in safetensors files under the names PyTorch's
nn.MultiheadAttention, Hugging Face's BertAttention and LlamaAttention give them.

Usage:  python3 Scripts/make_mha_fixtures.py            (numpy only, and Scripts/fixturelib.py)
        /work/venv/bin/python Scripts/make_mha_fixtures.py --verify
                                 (also checks every reference against PyTorch run in float64:
                                  nn.MultiheadAttention, transformers' BertAttention and
                                  LlamaAttention when transformers is installed; needs torch)
Writes: Tests/_TestSupport/Fixtures/mha/ (flat: .safetensors, .npy files + manifest.json)
        with fixturelib.Writer: deterministic and idempotent.

Conventions
-----------
Shape legend: B batch, T sequence (self-attention: Tq = Tk = T), E embedding, H query heads,
Hkv key/value heads (H % Hkv == 0, G = H / Hkv), D head dim.

Layer (float64, from float32 weights and a float32 input x [B, T, E], batch first):
  q = x·Wqᵀ + bq -> [B, T, H, D] -> [B, H, T, D];  k, v likewise with Hkv heads.
  RoPE (optional) on q and k at positions p = offset + t: inv_freq[i] = theta^(-2i/D), i < D/2,
    angle = p·inv_freq[i], all in float64.
    "half" (GPT-NeoX, HF Llama): out = x·cat(cos, cos) + rotate_half(x)·cat(sin, sin),
      rotate_half(x) = cat(-x[D/2:], x[:D/2]).
    "interleaved" (GPT-J): (x[2i], x[2i+1]) -> (x0·cos - x1·sin, x0·sin + x1·cos).
  score = (q·k) / sqrt(D) (scale in float64), query head h reads key/value head h // G;
  masks compose (a pair is masked when any of them masks it):
    key_padding_mask [B, Tk] |b1, True = padding = masked (nn.MultiheadAttention's convention);
    attn_mask as F.scaled_dot_product_attention: |b1 True = may attend, or <f4 added to the
      score (may hold -inf); right-aligned broadcast to [B, H, Tq, Tk];
    is_causal: top-left, key j masked for query i when j > i.
  weights = softmax over keys; a row whose keys are all masked gets zero weights and a zero
    context (nn.MultiheadAttention gives NaN there);
  context [B, H, T, D] -> [B, T, H·D] -> out = context·Woᵀ + bo;
  bert: out = LayerNorm(out + x) over E, biased variance, eps layer_norm_eps, weight and bias.

Layouts (every name is prefixed with the case's "prefix"; the files hold other tensors too):
  torch  in_proj_weight [3E, E] (rows q, k, v), in_proj_bias [3E], out_proj.weight [E, E],
         out_proj.bias [E]; Hkv = H, D = E / H.
  bert   self.query.weight [E, E], self.query.bias [E], self.key.*, self.value.*,
         output.dense.weight [E, E], output.dense.bias [E], output.LayerNorm.weight [E],
         output.LayerNorm.bias [E]; Hkv = H, D = E / H.
  llama  q_proj.weight [H·D, E], k_proj.weight [Hkv·D, E], v_proj.weight [Hkv·D, E],
         o_proj.weight [E, H·D]; no biases; RoPE "half"; causal.

Inputs and weights come from numpy's default_rng seeded with zlib.crc32("mha/" + case name),
rounded to float32; the references are computed in float64 from those float32 values.
Every case is also checked on sample rows by an independent loop implementation
(reference_rows_loops), which uses complex rotation for RoPE.

Manifest schema (manifest.json; paths relative to the folder holding it)
------------------------------------------------------------------------
A file ref is {"file": str, "dtype": "<f4" | "<f8" | "|b1", "shape": [int]}.
{
  "schema_version": 1,
  "generator": "Scripts/make_mha_fixtures.py",
  "conventions": [str],
  "cases": [Case],
  "rope_cases": [RopeCase]
}
Case = {
  "name": str, "description": str,
  "layout": "torch" | "bert" | "llama",
  "prefix": str,                       # prepended to every layer tensor name; may be ""
  "embed_dim": E, "heads": H, "kv_heads": Hkv, "head_dim": D,
  "rope": null | {"theta": float, "layout": "half" | "interleaved", "offset": int},
  "batch": B, "seq": T,
  "is_causal": bool,
  "key_padding_mask": null | ref |b1 [B, T],           # True = padding
  "attn_mask": null | ref |b1 or <f4, 2-D [T, T] or 4-D (broadcast to [B, H, T, T]),
  "layer_norm_eps": float | null,      # bert only
  "fully_masked_head_rows": int,       # (b, h, t) rows with every key masked
  "fully_masked_rows": [[b, t]],       # rows masked in every head: output = bias (bert: LN)
  "magnitudes": {"max_abs_input": f, "max_abs_score": f, "max_abs_context": f,
                 "max_abs_output": f},
  "files": {
    "safetensors": {"file": str, "layer_tensors": [str], "other_tensors": [str]},
    "input": ref <f4 [B, T, E],
    "expected_output": ref <f8 [B, T, E],
    "expected_weights": null | ref <f8 [B, H, T, T],          # per head
    "expected_average_weights": null | ref <f8 [B, T, T]      # mean over heads (torch layout)
  }
}
RopeCase = {"name": str, "layout": "half" | "interleaved", "theta": float, "offset": int,
            "input": ref <f4 [B, H, T, D], "expected": ref <f8 [B, H, T, D]}
(positions offset + t along the T axis, t = 0..T-1)
"""

from __future__ import annotations

import argparse
import cmath
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import (FIXTURES, Writer, f32, manifest_header, masked_softmax,  # noqa: E402
                        rng_factory, unique_names)

OUT = FIXTURES / "mha"
PREFIX = "mha__"
SIZE_LIMIT = 1024 * 1024  # the whole folder, bytes (1 MiB)

rng_for = rng_factory("mha/")


# --------------------------------------------------------------------------------------------
# Reference (float64)
# --------------------------------------------------------------------------------------------


def rope_angles(t: int, d: int, theta: float, offset: int) -> np.ndarray:
    """float64 [T, D/2]: (offset + t)·theta^(-2i/D)."""
    inv_freq = float(theta) ** (-2.0 * np.arange(d // 2, dtype=np.float64) / d)
    pos = offset + np.arange(t, dtype=np.float64)
    return pos[:, None] * inv_freq[None, :]


def apply_rope(x: np.ndarray, theta: float, layout: str, offset: int) -> np.ndarray:
    """x [..., T, D] float64, rotated at positions offset + t."""
    t, d = x.shape[-2], x.shape[-1]
    assert d % 2 == 0
    ang = rope_angles(t, d, theta, offset)
    c, s = np.cos(ang), np.sin(ang)
    if layout == "half":
        cos = np.concatenate([c, c], axis=-1)
        sin = np.concatenate([s, s], axis=-1)
        rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
        return x * cos + rot * sin
    if layout == "interleaved":
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out
    raise ValueError(layout)


def layer_params(c: dict) -> dict:
    """The layer's float64 matrices, independent of the layout: wq [H·D, E], bq [H·D] (or
    None), wk, bk, wv, bv [Hkv·D, ...], wo [E, H·D], bo [E] (or None), ln_w, ln_b (bert)."""
    t = c["tensors"]
    p = c["prefix"]
    g = lambda n: t[p + n].astype(np.float64)
    e = c["embed_dim"]
    if c["layout"] == "torch":
        w, b = g("in_proj_weight"), g("in_proj_bias")
        return dict(wq=w[:e], wk=w[e:2 * e], wv=w[2 * e:], bq=b[:e], bk=b[e:2 * e],
                    bv=b[2 * e:], wo=g("out_proj.weight"), bo=g("out_proj.bias"))
    if c["layout"] == "bert":
        return dict(wq=g("self.query.weight"), bq=g("self.query.bias"),
                    wk=g("self.key.weight"), bk=g("self.key.bias"),
                    wv=g("self.value.weight"), bv=g("self.value.bias"),
                    wo=g("output.dense.weight"), bo=g("output.dense.bias"),
                    ln_w=g("output.LayerNorm.weight"), ln_b=g("output.LayerNorm.bias"))
    if c["layout"] == "llama":
        return dict(wq=g("q_proj.weight"), wk=g("k_proj.weight"), wv=g("v_proj.weight"),
                    wo=g("o_proj.weight"), bq=None, bk=None, bv=None, bo=None)
    raise ValueError(c["layout"])


def visible(c: dict, b: int, tq: int, tk: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep bool [B, H, Tq, Tk], bias float64 [B, H, Tq, Tk]) from the case's masks."""
    keep = np.ones((b, heads, tq, tk), dtype=bool)
    bias = np.zeros((b, heads, tq, tk))
    if c["key_padding_mask"] is not None:
        keep &= ~c["key_padding_mask"][:, None, None, :]
    m = c["attn_mask"]
    if m is not None:
        if m.dtype == bool:
            keep &= np.broadcast_to(m, keep.shape)
        else:
            bias = bias + np.broadcast_to(m.astype(np.float64), keep.shape)
    if c["is_causal"]:
        keep &= np.tril(np.ones((tq, tk), dtype=bool))
    return keep, bias


def mha_reference(c: dict) -> dict:
    """float64 layer output [B, T, E], per-head weights [B, H, T, T], and intermediates."""
    x = c["x"].astype(np.float64)
    bsz, t, e = x.shape
    h, hkv, d = c["heads"], c["kv_heads"], c["head_dim"]
    p = layer_params(c)

    def proj(w, bias, n):
        y = x @ w.T
        if bias is not None:
            y = y + bias
        return y.reshape(bsz, t, n, d).transpose(0, 2, 1, 3)  # [B, n, T, D]

    q, k, v = proj(p["wq"], p["bq"], h), proj(p["wk"], p["bk"], hkv), proj(p["wv"], p["bv"], hkv)
    if c["rope"] is not None:
        r = c["rope"]
        q = apply_rope(q, r["theta"], r["layout"], r["offset"])
        k = apply_rope(k, r["theta"], r["layout"], r["offset"])
    g = h // hkv
    kh, vh = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    raw = np.einsum("bhqd,bhkd->bhqk", q, kh) / math.sqrt(d)
    keep, bias = visible(c, bsz, t, t, h)
    scores = np.where(keep, raw + bias, -np.inf)
    weights = masked_softmax(scores)
    ctx = np.einsum("bhqk,bhkd->bhqd", weights, vh)
    flat = ctx.transpose(0, 2, 1, 3).reshape(bsz, t, h * d)
    out = flat @ p["wo"].T
    if p["bo"] is not None:
        out = out + p["bo"]
    if c["layout"] == "bert":
        out = layer_norm(out + x, p["ln_w"], p["ln_b"], c["layer_norm_eps"])
    live = keep & np.isfinite(scores)
    return dict(output=out, weights=weights, context=ctx, q=q, k=k, v=v,
                max_abs_score=float(np.abs(np.where(live, raw, 0.0)).max()))


def layer_norm(y, w, b, eps):
    mean = y.mean(axis=-1, keepdims=True)
    var = ((y - mean) ** 2).mean(axis=-1, keepdims=True)
    return (y - mean) / np.sqrt(var + eps) * w + b


def rope_row_loops(vec, pos, theta, layout):
    """One [D] vector rotated at position `pos` with complex numbers (independent check)."""
    d = len(vec)
    out = [0.0] * d
    for i in range(d // 2):
        rot = cmath.exp(1j * pos * float(theta) ** (-2.0 * i / d))
        a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + d // 2)
        z = complex(vec[a], vec[b]) * rot
        out[a], out[b] = z.real, z.imag
    return out


def reference_rows_loops(c: dict, b: int, i: int) -> tuple[list, list]:
    """The output row [E] and the per-head weights [H][T] of batch b, query i, with plain
    loops and math.fsum: an independent check of mha_reference."""
    x = c["x"]
    _, t, e = x.shape
    h, hkv, d = c["heads"], c["kv_heads"], c["head_dim"]
    p = layer_params(c)
    xs = [[float(v) for v in x[b, j]] for j in range(t)]

    def proj(w, bias, row, n):
        vals = [math.fsum(float(w[r, col]) * row[col] for col in range(e))
                + (float(bias[r]) if bias is not None else 0.0) for r in range(n * d)]
        return [vals[hh * d:(hh + 1) * d] for hh in range(n)]

    def rope(vec, pos):
        if c["rope"] is None:
            return vec
        r = c["rope"]
        return rope_row_loops(vec, r["offset"] + pos, r["theta"], r["layout"])

    qi = [rope(vec, i) for vec in proj(p["wq"], p["bq"], xs[i], h)]
    ks = [[rope(vec, j) for vec in proj(p["wk"], p["bk"], xs[j], hkv)] for j in range(t)]
    vs = [proj(p["wv"], p["bv"], xs[j], hkv) for j in range(t)]
    kpm, am = c["key_padding_mask"], c["attn_mask"]
    am_b = None if am is None else np.broadcast_to(am, (x.shape[0], h, t, t))
    ctx = []
    all_w = []
    for hh in range(h):
        kvh = hh // (h // hkv)
        scores = []
        for j in range(t):
            masked = (c["is_causal"] and j > i) or (kpm is not None and kpm[b, j])
            s = math.fsum(qi[hh][col] * ks[j][kvh][col] for col in range(d)) / math.sqrt(d)
            if am_b is not None:
                if am.dtype == bool:
                    masked = masked or not am_b[b, hh, i, j]
                else:
                    s += float(am_b[b, hh, i, j])
            scores.append(-math.inf if masked else s)
        peak = max(scores)
        if peak == -math.inf:
            w = [0.0] * t
        else:
            ex = [math.exp(s - peak) for s in scores]
            total = math.fsum(ex)
            w = [v / total for v in ex]
        all_w.append(w)
        ctx.extend(math.fsum(w[j] * vs[j][kvh][col] for j in range(t)) for col in range(d))
    out = [math.fsum(float(p["wo"][r, col]) * ctx[col] for col in range(h * d))
           + (float(p["bo"][r]) if p["bo"] is not None else 0.0) for r in range(e)]
    if c["layout"] == "bert":
        y = [out[r] + xs[i][r] for r in range(e)]
        mean = math.fsum(y) / e
        var = math.fsum((v - mean) ** 2 for v in y) / e
        inv = 1.0 / math.sqrt(var + c["layer_norm_eps"])
        out = [(y[r] - mean) * inv * float(p["ln_w"][r]) + float(p["ln_b"][r]) for r in range(e)]
    return out, all_w


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def linear(rng, rows, cols):
    return f32(rng.standard_normal((rows, cols)) / math.sqrt(cols))


def small(rng, *shape, scale=0.1):
    return f32(rng.standard_normal(shape) * scale)


def layer_tensors(rng, layout, prefix, e, h, hkv, d) -> dict[str, np.ndarray]:
    p = prefix
    if layout == "torch":
        return {p + "in_proj_weight": linear(rng, 3 * e, e), p + "in_proj_bias": small(rng, 3 * e),
                p + "out_proj.weight": linear(rng, e, e), p + "out_proj.bias": small(rng, e)}
    if layout == "bert":
        out = {}
        for n in ("query", "key", "value"):
            out[p + f"self.{n}.weight"] = linear(rng, e, e)
            out[p + f"self.{n}.bias"] = small(rng, e)
        out[p + "output.dense.weight"] = linear(rng, e, e)
        out[p + "output.dense.bias"] = small(rng, e)
        out[p + "output.LayerNorm.weight"] = f32(1.0 + small(rng, e))
        out[p + "output.LayerNorm.bias"] = small(rng, e)
        return out
    if layout == "llama":
        return {p + "q_proj.weight": linear(rng, h * d, e),
                p + "k_proj.weight": linear(rng, hkv * d, e),
                p + "v_proj.weight": linear(rng, hkv * d, e),
                p + "o_proj.weight": linear(rng, e, h * d)}
    raise ValueError(layout)


def make_case(name, description, layout, prefix, e, h, b, t, *, hkv=None, d=None, rope=None,
              is_causal=False, kpm=None, attn_mask=None, others=(), per_head_weights=True):
    """kpm / attn_mask: callables (rng, case) -> array, drawn after the weights and x."""
    hkv = hkv or h
    d = d or e // h
    rng = rng_for(name)
    tensors = layer_tensors(rng, layout, prefix, e, h, hkv, d)
    layer_names = sorted(tensors, key=lambda n: n.encode())
    for other, shape in others:
        assert other not in tensors
        tensors[other] = f32(rng.standard_normal(shape))
    x = f32(rng.standard_normal((b, t, e)))
    c = dict(name=name, description=description, layout=layout, prefix=prefix, embed_dim=e,
             heads=h, kv_heads=hkv, head_dim=d, rope=rope, batch=b, seq=t, is_causal=is_causal,
             layer_norm_eps=1e-12 if layout == "bert" else None, tensors=tensors,
             layer_names=layer_names, other_names=sorted((o for o, _ in others),
                                                         key=lambda n: n.encode()),
             x=x, key_padding_mask=None, attn_mask=None, per_head_weights=per_head_weights)
    if kpm is not None:
        c["key_padding_mask"] = kpm(rng, c)
    if attn_mask is not None:
        c["attn_mask"] = attn_mask(rng, c)
    return c


def cases() -> list[dict]:
    out = []

    def kpm_batch1_full(rng, c):
        m = np.zeros((c["batch"], c["seq"]), dtype=bool)
        m[0, 5:] = True   # batch 0: the last two keys are padding
        m[1, :] = True    # batch 1: every key is padding: output = out_proj.bias
        return m

    out.append(make_case(
        "torch_kpm_full_pad", "nn.MultiheadAttention layout, E 32, H 4, B 2, T 7; key padding: "
        "batch 0 pads keys 5-6, batch 1 is fully padded (zero weights, output = out_proj.bias)",
        "torch", "encoder.layers.1.self_attn.", 32, 4, 2, 7, kpm=kpm_batch1_full,
        others=[("encoder.layers.1.norm1.weight", (32,)),
                ("encoder.layers.11.self_attn.in_proj_bias", (96,))]))

    def float_mask(rng, c):
        h, t = c["heads"], c["seq"]
        m = f32(rng.standard_normal((1, h, t, t)))  # [1, H, T, T]: differs per head
        m[0, 2, 0, 0] = -np.inf  # head 2, query 0 (sees only key 0 when causal): fully masked
        m[0, 1, 4, 2] = -np.inf
        return m

    out.append(make_case(
        "torch_float_mask_causal", "nn.MultiheadAttention layout, E 32, H 4, B 2, T 6; float "
        "attn_mask [1, H, T, T] added (with -inf entries) and is_causal; head 2 of query 0 is "
        "fully masked (that head's context is zero)", "torch", "attn.", 32, 4, 2, 6,
        is_causal=True, attn_mask=float_mask, others=[("embed.weight", (10, 32))]))

    def kpm_bert(rng, c):
        m = np.zeros((c["batch"], c["seq"]), dtype=bool)
        m[1, 6:] = True  # batch 1: the last three tokens are padding
        return m

    out.append(make_case(
        "bert_kpm", "BertAttention layout, E 32, H 4, B 2, T 9; key padding on batch 1 (keys "
        "6-8); output = LayerNorm(dense(context) + x), eps 1e-12",
        "bert", "encoder.layer.0.attention.", 32, 4, 2, 9, kpm=kpm_bert,
        others=[("encoder.layer.0.intermediate.dense.bias", (64,)),
                ("encoder.layer.1.attention.self.query.weight", (32, 32))]))

    for offset in (0, 1000):
        out.append(make_case(
            f"llama_gqa4_offset{offset}", f"LlamaAttention layout, E 64, H 8, Hkv 2 (G 4), D 8, "
            f"RoPE half theta 10000 at positions {offset}.., causal, B 2, T 11",
            "llama", "model.layers.0.self_attn.", 64, 8, 2, 11, hkv=2, d=8,
            rope=dict(theta=10000.0, layout="half", offset=offset), is_causal=True,
            others=[("model.layers.0.input_layernorm.weight", (64,)),
                    ("model.layers.0.mlp.gate_proj.weight", (16, 64))]))

    out.append(make_case(
        "llama_mha_no_prefix", "LlamaAttention layout with H = Hkv = 4, E 32, D 8, RoPE half "
        "theta 10000, causal, B 1, T 10, empty prefix (names q_proj.weight, ...)",
        "llama", "", 32, 4, 1, 10, hkv=4, d=8,
        rope=dict(theta=10000.0, layout="half", offset=0), is_causal=True,
        # Every name is under an empty prefix: the file holds the layer alone (a strict loader
        # refuses anything else there).
        others=[]))

    def bool_mask(rng, c):
        t = c["seq"]
        m = rng.random((t, t)) > 0.2  # [T, T], True = may attend
        m[:, 0] = True
        m[3, :] = False  # query 3 sees nothing in any head or batch: output = out_proj.bias
        return m

    out.append(make_case(
        "torch_rope_interleaved", "nn.MultiheadAttention layout with interleaved (GPT-J) RoPE, "
        "theta 500, positions 3.., E 48, H 3, D 16, B 2, T 8; bool attn_mask [T, T] (True = "
        "attend), query 3 fully masked (output = out_proj.bias)",
        "torch", "blocks.2.attn.", 48, 3, 2, 8,
        rope=dict(theta=500.0, layout="interleaved", offset=3), attn_mask=bool_mask,
        others=[("blocks.2.attn_norm.bias", (48,))]))
    return out


def rope_cases():
    out = []
    for layout in ("half", "interleaved"):
        for offset in (0, 1000):
            name = f"rope_{layout}_offset{offset}"
            x = f32(rng_for(name).standard_normal((1, 2, 5, 16)))
            out.append(dict(name=name, layout=layout, theta=10000.0, offset=offset, x=x))
    return out


# --------------------------------------------------------------------------------------------


def write_case(w: Writer, c: dict) -> dict:
    ref = mha_reference(c)
    bsz, t = c["batch"], c["seq"]
    # Sample rows against the loop implementation.
    for b in sorted({0, bsz - 1}):
        for i in sorted({0, t // 2, t - 1}):
            lo, lw = reference_rows_loops(c, b, i)
            np.testing.assert_allclose(ref["output"][b, i], lo, rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(ref["weights"][b, :, i], lw, rtol=1e-11, atol=1e-300)
    out, weights = ref["output"], ref["weights"]
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(weights))
    zero_head_rows = np.all(weights == 0, axis=-1)  # [B, H, T]
    full_rows = np.all(zero_head_rows, axis=1)      # [B, T]
    p = layer_params(c)
    for b, i in zip(*np.nonzero(full_rows)):
        bias = p["bo"] if p["bo"] is not None else np.zeros(c["embed_dim"])
        if c["layout"] == "bert":
            bias = layer_norm(bias + c["x"][b, i].astype(np.float64), p["ln_w"], p["ln_b"],
                              c["layer_norm_eps"])
        np.testing.assert_array_equal(out[b, i], bias)

    pre = PREFIX + c["name"] + "__"
    st_file = pre + "weights.safetensors"
    w.safetensors(st_file, c["tensors"], {"format": "pt"})
    entry = {k: c[k] for k in ("name", "description", "layout", "prefix", "embed_dim", "heads",
                               "kv_heads", "head_dim", "rope", "batch", "seq", "is_causal")}
    entry["key_padding_mask"] = (None if c["key_padding_mask"] is None else
                                 w.npy(pre + "key_padding_mask.npy", c["key_padding_mask"], "|b1"))
    m = c["attn_mask"]
    entry["attn_mask"] = (None if m is None else
                          w.npy(pre + "attn_mask.npy", m, "|b1" if m.dtype == bool else "<f4"))
    entry["layer_norm_eps"] = c["layer_norm_eps"]
    entry["fully_masked_head_rows"] = int(zero_head_rows.sum())
    entry["fully_masked_rows"] = [[int(b), int(i)] for b, i in zip(*np.nonzero(full_rows))]
    entry["magnitudes"] = {
        "max_abs_input": float(np.abs(c["x"]).max()),
        "max_abs_score": ref["max_abs_score"],
        "max_abs_context": float(np.abs(ref["context"]).max()),
        "max_abs_output": float(np.abs(out).max()),
    }
    files = {
        "safetensors": {"file": st_file, "layer_tensors": c["layer_names"],
                        "other_tensors": c["other_names"]},
        "input": w.npy(pre + "input.npy", c["x"], "<f4"),
        "expected_output": w.npy(pre + "expected_output.npy", out, "<f8"),
        "expected_weights": None,
        "expected_average_weights": None,
    }
    if c["per_head_weights"]:
        files["expected_weights"] = w.npy(pre + "expected_weights.npy", weights, "<f8")
        if c["layout"] == "torch":
            files["expected_average_weights"] = w.npy(
                pre + "expected_average_weights.npy", weights.mean(axis=1), "<f8")
    entry["files"] = files
    return entry


def write_rope_case(w: Writer, r: dict) -> dict:
    x = r["x"]
    y = apply_rope(x.astype(np.float64), r["theta"], r["layout"], r["offset"])
    for h in range(x.shape[1]):
        for t in range(x.shape[2]):
            loop = rope_row_loops([float(v) for v in x[0, h, t]], r["offset"] + t, r["theta"],
                                  r["layout"])
            np.testing.assert_allclose(y[0, h, t], loop, rtol=1e-12, atol=1e-14)
    pre = PREFIX + r["name"] + "__"
    return {"name": r["name"], "layout": r["layout"], "theta": r["theta"], "offset": r["offset"],
            "input": w.npy(pre + "input.npy", x, "<f4"),
            "expected": w.npy(pre + "expected.npy", y, "<f8")}


CONVENTIONS = [
    "Self-attention, batch first: x [B, T, E] (<f4); H query heads, Hkv key/value heads "
    "(H % Hkv == 0), head dim D; query head h uses key/value head h // (H / Hkv).",
    "Weights and inputs are float32 from numpy default_rng(crc32('mha/' + name)); references "
    "are float64 (<f8) computed from the float32 values cast to float64.",
    "q = x·Wqᵀ + bq -> [B, T, H, D] -> [B, H, T, D]; k, v likewise with Hkv heads; no biases "
    "in the llama layout.",
    "RoPE (rope not null) on q and k at positions offset + t: inv_freq[i] = theta^(-2i/D) "
    "(i < D/2), angle = position·inv_freq[i], in float64. 'half' (GPT-NeoX, HF Llama): "
    "x·cat(cos, cos) + rotate_half(x)·cat(sin, sin), rotate_half(x) = cat(-x[D/2:], x[:D/2]); "
    "'interleaved' (GPT-J): (x[2i], x[2i+1]) -> (x0·cos - x1·sin, x0·sin + x1·cos).",
    "score = q·k / sqrt(D) (float64 scale) + float attn_mask; masks compose: key_padding_mask "
    "[B, Tk] |b1 True = padding (masked); attn_mask as F.scaled_dot_product_attention (|b1 "
    "True = may attend, <f4 added, may hold -inf), right-aligned broadcast to [B, H, Tq, Tk]; "
    "is_causal top-left (key j masked for query i when j > i).",
    "Softmax over keys; a row with every key masked has zero weights and a zero context (not "
    "NaN as nn.MultiheadAttention): if that holds in every head the output row is the output "
    "projection's bias (bert: LayerNorm(bias + x)); fully_masked_rows lists those [b, t].",
    "context [B, H, T, D] -> [B, T, H·D] -> output = context·Woᵀ + bo; bert: "
    "LayerNorm(output + x) over E, biased variance, eps layer_norm_eps.",
    "Tensor names (prefix prepended): torch in_proj_weight [3E, E] (rows q, k, v), "
    "in_proj_bias [3E], out_proj.weight, out_proj.bias; bert self.{query,key,value}.{weight,"
    "bias}, output.dense.{weight,bias}, output.LayerNorm.{weight,bias}; llama q_proj.weight "
    "[H·D, E], k_proj.weight [Hkv·D, E], v_proj.weight [Hkv·D, E], o_proj.weight [E, H·D]. "
    "The safetensors files (F32, __metadata__ {format: pt}) also hold other_tensors (other "
    "layers, outside the prefix), which a loader must ignore; with an empty prefix the file "
    "holds the layer alone.",
    "expected_weights [B, H, T, T] are per head; expected_average_weights [B, T, T] their mean "
    "over heads (nn.MultiheadAttention's average_attn_weights=True).",
    "rope_cases: x [B, H, T, D] (<f4) rotated at positions offset + t -> expected (<f8).",
]


def composed_keep_and_bias(c: dict):
    """(keep bool [B, H, T, T] True = attend, additive float64 bias [B, H, T, T]) of a case."""
    return visible(c, c["batch"], c["seq"], c["seq"], c["heads"])


def verify_with_torch(case_list, rope_list) -> None:
    """Checks every reference against PyTorch run in float64 on the same float32 values:
    nn.MultiheadAttention (torch layout without RoPE), torch ops with complex-number RoPE (torch
    layout with interleaved RoPE), transformers' BertAttention and LlamaAttention (eager, float64,
    RoPE cos/sin computed in float64 and passed in), apply_rotary_pos_emb and complex rotation
    (rope cases). Rows that PyTorch leaves NaN (every key masked) are compared with our
    convention instead: zero weights. Exits non-zero on a difference above 1e-12·max(1, |y|)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise SystemExit("--verify needs torch (e.g. /work/venv/bin/python); the fixtures were "
                         "written")
    try:
        import transformers
        from transformers import BertConfig, LlamaConfig
        from transformers.models.bert.modeling_bert import BertAttention
        from transformers.models.llama.modeling_llama import (LlamaAttention,
                                                              apply_rotary_pos_emb)
    except ImportError:
        transformers = None
        print("verify: transformers is not installed: skipping the bert and llama layouts and "
              "the half-layout rope cases (pip install transformers)")
    torch.manual_seed(0)
    dt = torch.float64
    failures = []
    rows = []

    def report(name, what, ours, theirs, note=""):
        ours = np.asarray(ours, dtype=np.float64)
        theirs = np.asarray(theirs, dtype=np.float64)
        nan = np.isnan(theirs)
        err = float(np.abs(np.where(nan, 0.0, ours - theirs)).max())
        scale = max(1.0, float(np.abs(ours).max()))
        ok = err <= 1e-12 * scale
        rows.append((name, what, err, int(nan.sum()), ok, note))
        if not ok:
            failures.append(f"{name} {what}: {err:.3g}")
        return nan

    def t64(a):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float64)))

    def cos_sin(c, layout_half=True):
        r = c["rope"]
        d, t = c["head_dim"], c["seq"]
        inv = 1.0 / (r["theta"] ** (torch.arange(0, d, 2, dtype=dt) / d))
        pos = torch.arange(r["offset"], r["offset"] + t, dtype=dt)
        return torch.outer(pos, inv)  # [T, D/2]

    def complex_rope(x, ang):  # x [..., T, D] float64, interleaved pairs, ang [T, D/2]
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        z = z * torch.polar(torch.ones_like(ang), ang)
        return torch.view_as_real(z).reshape(x.shape)

    for c in case_list:
        ref = mha_reference(c)
        name = c["name"]
        x = t64(c["x"])
        bsz, t, e = c["x"].shape
        h, hkv, d = c["heads"], c["kv_heads"], c["head_dim"]
        p = layer_params(c)
        keep, bias = composed_keep_and_bias(c)
        zero_rows = np.all(ref["weights"] == 0, axis=-1)
        with torch.no_grad():
            if c["layout"] == "torch" and c["rope"] is None:
                mha = torch.nn.MultiheadAttention(e, h, bias=True, batch_first=True, dtype=dt)
                mha.in_proj_weight.copy_(t64(np.concatenate([p["wq"], p["wk"], p["wv"]])))
                mha.in_proj_bias.copy_(t64(np.concatenate([p["bq"], p["bk"], p["bv"]])))
                mha.out_proj.weight.copy_(t64(p["wo"]))
                mha.out_proj.bias.copy_(t64(p["bo"]))
                mha.eval()
                kpm = c["key_padding_mask"]
                # nn.MultiheadAttention: attn_mask [T, T] or [B·H, T, T], bool True = NOT
                # allowed; the case's attn_mask and causality go in one float mask.
                am = None
                if c["attn_mask"] is not None or c["is_causal"]:
                    no_kpm = dict(c, key_padding_mask=None)
                    k2, b2 = visible(no_kpm, bsz, t, t, h)
                    am = t64(np.where(k2, b2, -np.inf).reshape(bsz * h, t, t))
                kpm_t = None if kpm is None else torch.from_numpy(kpm)
                y, w = mha(x, x, x, key_padding_mask=kpm_t, attn_mask=am, need_weights=True,
                           average_attn_weights=False)
                nan = report(name, "output vs nn.MultiheadAttention", ref["output"], y.numpy())
                wn = report(name, "weights vs nn.MultiheadAttention", ref["weights"], w.numpy())
                assert np.array_equal(np.isnan(w.numpy()).all(-1), zero_rows) or not wn.any()
                _, wa = mha(x, x, x, key_padding_mask=kpm_t, attn_mask=am, need_weights=True,
                            average_attn_weights=True)
                report(name, "average weights vs nn.MultiheadAttention",
                       ref["weights"].mean(axis=1), wa.numpy())
                if nan.any():
                    rows[-3] = rows[-3][:5] + (f"{int(nan.any(-1).sum())} rows NaN in torch (a "
                                               "head with every key masked): not compared",)
            elif c["layout"] == "torch":
                # Torch ops with RoPE (complex rotation, interleaved pairs) and SDPA, float64.
                def proj(w_, b_, n):
                    return F.linear(x, t64(w_), t64(b_)).view(bsz, t, n, d).transpose(1, 2)
                q, k = proj(p["wq"], p["bq"], h), proj(p["wk"], p["bk"], h)
                v = proj(p["wv"], p["bv"], h)
                ang = cos_sin(c)
                assert c["rope"]["layout"] == "interleaved"
                q, k = complex_rope(q, ang), complex_rope(k, ang)
                mask = t64(np.where(keep, bias, -np.inf))
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                y = F.linear(ctx.transpose(1, 2).reshape(bsz, t, h * d), t64(p["wo"]), t64(p["bo"]))
                s = (q @ k.transpose(-1, -2)) / math.sqrt(d) + mask
                w = torch.softmax(s, dim=-1)
                nan = report(name, "output vs torch ops + complex RoPE + SDPA", ref["output"],
                             y.numpy())
                report(name, "weights vs torch softmax", ref["weights"], w.numpy())
                if nan.any():
                    rows[-2] = rows[-2][:5] + (f"{int(nan.any(-1).sum())} rows NaN in torch: not "
                                               "compared",)
            elif transformers is None:
                continue
            elif c["layout"] == "bert":
                cfg = BertConfig(hidden_size=e, num_attention_heads=h, intermediate_size=4 * e,
                                 layer_norm_eps=c["layer_norm_eps"],
                                 attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
                cfg._attn_implementation = "eager"
                mod = BertAttention(cfg).to(dt).eval()
                pre = c["prefix"]
                sd = {n[len(pre):]: t64(c["tensors"][n]) for n in c["layer_names"]}
                mod.load_state_dict(sd, strict=True)
                kpm = c["key_padding_mask"]
                ext = None
                if kpm is not None:  # HF's extended mask: 0 / finfo.min, [B, 1, 1, T]
                    ext = torch.zeros(bsz, 1, 1, t, dtype=dt)
                    ext[torch.from_numpy(kpm)[:, None, None, :]] = torch.finfo(dt).min
                assert c["attn_mask"] is None and not c["is_causal"]
                y, w = mod(x, attention_mask=ext)
                report(name, f"output vs BertAttention (transformers {transformers.__version__})",
                       ref["output"], y.numpy())
                report(name, "weights vs BertAttention", ref["weights"], w.numpy())
            elif c["layout"] == "llama":
                cfg = LlamaConfig(hidden_size=e, num_attention_heads=h, num_key_value_heads=hkv,
                                  head_dim=d, rope_theta=c["rope"]["theta"], attention_bias=False,
                                  intermediate_size=16, num_hidden_layers=1, vocab_size=32,
                                  attention_dropout=0.0)
                # "sdpa": HF's eager path takes the softmax in float32 whatever the dtype; its
                # SDPA path stays in float64 (and returns no weights).
                cfg._attn_implementation = "sdpa"
                mod = LlamaAttention(cfg, layer_idx=0).to(dt).eval()
                pre = c["prefix"]
                mod.load_state_dict({n[len(pre):]: t64(c["tensors"][n]) for n in c["layer_names"]},
                                    strict=True)
                ang = cos_sin(c)
                emb = torch.cat([ang, ang], dim=-1)[None].expand(bsz, t, d)
                causal = torch.full((t, t), float("-inf"), dtype=dt).triu(1)[None, None]
                assert c["is_causal"] and c["rope"]["layout"] == "half"
                cs64 = (emb.cos(), emb.sin())
                y, _ = mod(x, position_embeddings=cs64, attention_mask=causal)
                report(name, "output vs LlamaAttention sdpa (float64 cos/sin)", ref["output"],
                       y.numpy())
                y, _ = mod(x, position_embeddings=cs64, attention_mask=None)
                report(name, "output vs LlamaAttention sdpa, its own is_causal", ref["output"],
                       y.numpy())
                mod.config._attn_implementation = "eager"
                _, w = mod(x, position_embeddings=cs64, attention_mask=causal)
                err = float(np.abs(w.numpy() - ref["weights"]).max())
                ok = err < 1e-6
                rows.append((name, "weights vs LlamaAttention eager (float32 softmax)", err, 0,
                             ok, "bound 1e-6: HF's eager softmax runs in float32"))
                if not ok:
                    failures.append(f"{name} eager weights: {err:.3g}")
                mod.config._attn_implementation = "sdpa"
                # Informational: HF's own rotary embedding computes the angles in float32.
                from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
                rot = LlamaRotaryEmbedding(cfg)
                off = c["rope"]["offset"]
                pos = torch.arange(off, off + t)[None].expand(bsz, t)
                cs32 = rot(x, pos)
                y32, _ = mod(x, position_embeddings=cs32, attention_mask=causal)
                err = float(np.abs(y32.numpy() - ref["output"]).max())
                rows.append((name, "  (info) LlamaAttention with HF's float32 rotary angles",
                             err, 0, True, "not a check: HF computes cos/sin in float32"))
    try:
        import tempfile
        from safetensors.numpy import load_file, save_file
        for c in case_list:
            path = OUT / (PREFIX + c["name"] + "__weights.safetensors")
            loaded = load_file(str(path))
            assert loaded.keys() == c["tensors"].keys()
            assert all(np.array_equal(loaded[n], c["tensors"][n]) for n in loaded)
            with tempfile.TemporaryDirectory() as tmp:
                save_file(loaded, tmp + "/w.safetensors", metadata={"format": "pt"})
                same = Path(tmp, "w.safetensors").read_bytes() == path.read_bytes()
            rows.append((c["name"], "safetensors file read back by the safetensors package",
                         0.0, 0, same, "byte-identical to its save_file" if same else
                         "NOT byte-identical to safetensors' save_file"))
            if not same:
                failures.append(f"{path.name}: not byte-identical")
    except ImportError:
        print("verify: the safetensors package is not installed: skipping the file check")
    for r in rope_list:
        x = t64(r["x"])
        y = apply_rope(r["x"].astype(np.float64), r["theta"], r["layout"], r["offset"])
        d, t = x.shape[-1], x.shape[-2]
        inv = 1.0 / (r["theta"] ** (torch.arange(0, d, 2, dtype=dt) / d))
        ang = torch.outer(torch.arange(r["offset"], r["offset"] + t, dtype=dt), inv)
        if r["layout"] == "interleaved":
            report(r["name"], "rope vs complex rotation", y, complex_rope(x, ang).numpy())
        elif transformers is not None:
            emb = torch.cat([ang, ang], dim=-1)[None]
            qe, _ = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
            report(r["name"], "rope vs HF apply_rotary_pos_emb", y, qe.numpy())
    print(f"\nverify (torch {torch.__version__}, float64): worst |ours - theirs|, bound "
          "1e-12·max(1, max|ours|)")
    for name, what, err, nans, ok, note in rows:
        print(f"  {name:<28} {what:<62} {err:9.2e} {'ok' if ok else 'FAIL'}"
              + (f"  [{note}]" if note else ""))
    if failures:
        raise SystemExit("verify failed: " + "; ".join(failures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--verify", action="store_true",
                        help="also check the references against PyTorch/transformers (float64)")
    args = parser.parse_args()
    w = Writer(OUT)
    cs, rs = cases(), rope_cases()
    unique_names([c["name"] for c in cs] + [r["name"] for r in rs])
    manifest = {**manifest_header(__file__, CONVENTIONS),
                "cases": [write_case(w, c) for c in cs],
                "rope_cases": [write_rope_case(w, r) for r in rs]}
    w.finish(manifest, counts=f"cases: {len(cs)} + {len(rs)} rope", size_limit=SIZE_LIMIT)
    if args.verify:
        verify_with_torch(cs, rs)


if __name__ == "__main__":
    main()
