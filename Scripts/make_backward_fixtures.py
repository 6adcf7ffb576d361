#!/usr/bin/env python3
"""Generate float64 references for the backward pass of scaled dot-product attention: the
gradients dQ, dK, dV and d(bias) of O = dropout(softmax(scale·Q·Kᵀ + bias, masked)) · V for a
given upstream gradient dO, with grouped-query heads, both causal alignments, windows, keep masks
with fully masked rows, biases (full and broadcast) and dropout with a GIVEN keep mask.

Usage:  /work/venv/bin/python Scripts/make_backward_fixtures.py   (any python3 with numpy 2.x)
Needs:  numpy only, and Scripts/fixturelib.py (the helpers the fixture scripts share).
Writes: Tests/_TestSupport/Fixtures/backward/ (flat: .npy files + manifest.json) with
        fixturelib.Writer: deterministic and idempotent. Read by
        Tests/_TestSupport/BackwardFixtures.swift.

Conventions
-----------
Shape legend: B batch, H query heads, Hkv key/value heads (H % Hkv == 0, G = H / Hkv), Tq
queries, Tk keys, D head dim, Dv value dim, W window.

Inputs: Q [B, H, Tq, D], K [B, Hkv, Tk, D], V [B, Hkv, Tk, Dv], dO [B, H, Tq, Dv], from numpy's
default_rng seeded with zlib.crc32("backward/" + case name), rounded to float32 and saved as
`<f4`. Keep masks are `|b1` (True = attend), biases `<f4` (added to the scaled scores, may hold
-inf); both broadcast numpy-style (right-aligned) to [B, H, Tq, Tk], indexed by the QUERY head.

Dropout: AttentionKit's dropout decisions come from Philox counters, which numpy does not
reproduce, so a dropout case gives its keep decisions Z as an input (`|b1` [B, H, Tq, Tk], True =
kept, drawn here with probability 1 - p) and the reference uses them: kept weights are scaled by
1/(1 - p) (p the float64 in the manifest). The Swift tests feed Z to the reference kernel's
explicit-mask entry; the fast kernels, which only know the counters, are compared with the
reference kernel instead. p = 0 cases have Z all True (the kernels then run with a Dropout of
probability 0).

Reference (backward_reference below), in float64 from the float32 inputs:
  query head h uses key/value head h // G (np.repeat of K and V);
  S = scale·Q·Kᵀ + bias, scale = float32(1/sqrt(D)) or float32(scale), -inf where masked (keep
  False; causal: j > limit(i), limit(i) = i top-left or i + Tk - Tq bottom-right; window W:
  also j <= limit(i) - W);
  P = softmax(S) by rows (a row with every key masked: P = 0); Pd = P∘Z/(1 - p); O = Pd·V;
  dV = Pdᵀ·dO; dP = (dO·Vᵀ)∘Z/(1 - p); Δ = rowsum(dO∘O); dS = P∘(dP - Δ);
  dQ = scale·dS·K; dK = scale·dSᵀ·Q; d(bias) = dS summed over the bias's broadcast axes;
  dK and dV summed over the G query heads of each key/value head.
Every case is also checked here by central finite differences of f = Σ dO∘O (float64,
h = 1e-6, Z fixed) on a few entries of Q, K, V and the bias.

Manifest schema (manifest.json; paths relative to the folder holding it)
------------------------------------------------------------------------
A file ref is {"file": str, "dtype": "<f4" | "<f8" | "|b1", "shape": [int]}.
{
  "schema_version": 1,
  "generator": "Scripts/make_backward_fixtures.py",
  "conventions": [str],
  "cases": [Case]
}
Case = {
  "name": str, "description": str,
  "q": ref <f4 [B, H, Tq, D], "k": ref <f4 [B, Hkv, Tk, D], "v": ref <f4 [B, Hkv, Tk, Dv],
  "grad_output": ref <f4 [B, H, Tq, Dv],
  "heads": H, "kv_heads": Hkv, "group_size": G,
  "masks": [{"kind": "keep" | "bias", "file", "dtype", "shape"}],   # 0, 1 or 2 entries
  "causal": bool,                      # true also when only a window is given
  "alignment": "top-left" | "bottom-right",
  "window": int | null,
  "scale": float | null,               # requested; null = the default 1/sqrt(D)
  "scale_used": float,                 # the float32 scale of the reference, as a float64
  "dropout": null | {"p": float, "keep": ref |b1 [B, H, Tq, Tk]},
  "fully_masked_rows": int,            # rows (b, h, i) whose every key is masked
  "expected": {"output": ref <f8 [B, H, Tq, Dv], "dq": ref <f8 (Q's shape),
               "dk": ref <f8 (K's shape), "dv": ref <f8 (V's shape),
               "dbias": ref <f8 (the bias's shape) | null}
}
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import (FIXTURES, Writer, assert_finite, f32, float32_scale,  # noqa: E402
                        mask_refs, masked_softmax, rng_factory, visible_keys, write_cases)

OUT = FIXTURES / "backward"
PREFIX = "backward__"
SIZE_LIMIT = 4 * 1024 * 1024  # the whole folder, bytes (4 MiB)

rng_for = rng_factory("backward/")


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def reduce_to(array: np.ndarray, shape) -> np.ndarray:
    """Sums `array` over the axes along which `shape` was broadcast to array.shape."""
    lead = array.ndim - len(shape)
    out = array.sum(axis=tuple(range(lead))) if lead else array
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and out.shape[a] != 1)
    return out.sum(axis=axes, keepdims=True) if axes else out


class Problem:
    """One case's float64 inputs and masks."""

    def __init__(self, q, k, v, do, keep, bias, causal, alignment, window, scale, z, p):
        self.q, self.k, self.v, self.do = (a.astype(np.float64) for a in (q, k, v, do))
        self.bias = None if bias is None else bias.astype(np.float64)
        self.group = q.shape[1] // k.shape[1]
        seen = visible_keys(q.shape[2], k.shape[2], causal, alignment, window)
        if keep is not None:
            seen = seen & keep
        self.seen = np.broadcast_to(seen, q.shape[:3] + (k.shape[2],))
        self.scale = scale
        self.zs = 1.0 if z is None else z.astype(np.float64) / (1.0 - p)

    def forward(self, q=None, k=None, v=None, bias=None):
        """(O, P) for possibly perturbed inputs."""
        q = self.q if q is None else q
        k = self.k if k is None else k
        v = self.v if v is None else v
        bias = self.bias if bias is None else bias
        kr = np.repeat(k, self.group, axis=1)
        vr = np.repeat(v, self.group, axis=1)
        s = np.einsum("bhqd,bhkd->bhqk", q, kr) * self.scale
        if bias is not None:
            s = s + bias
        s = np.where(self.seen, s, -np.inf)
        p = masked_softmax(s)
        return np.einsum("bhqk,bhkv->bhqv", p * self.zs, vr), p

    def loss(self, **inputs) -> float:
        return float(np.sum(self.do * self.forward(**inputs)[0]))

    def backward(self):
        """(O, dQ, dK, dV, d(bias) or None, dS)."""
        b, hkv, tk, dv = self.v.shape
        g = self.group
        kr = np.repeat(self.k, g, axis=1)
        vr = np.repeat(self.v, g, axis=1)
        o, p = self.forward()
        pd = p * self.zs
        dv_full = np.einsum("bhqk,bhqv->bhkv", pd, self.do)
        dp = np.einsum("bhqv,bhkv->bhqk", self.do, vr) * self.zs
        delta = np.sum(self.do * o, axis=-1, keepdims=True)
        np.testing.assert_allclose(delta, np.sum(p * dp, axis=-1, keepdims=True),
                                   rtol=1e-10, atol=1e-12)
        ds = p * (dp - delta)
        dq = self.scale * np.einsum("bhqk,bhkd->bhqd", ds, kr)
        dk_full = self.scale * np.einsum("bhqk,bhqd->bhkd", ds, self.q)
        d = self.q.shape[-1]
        dk = dk_full.reshape(b, hkv, g, tk, d).sum(axis=2)
        dvv = dv_full.reshape(b, hkv, g, tk, dv).sum(axis=2)
        dbias = None if self.bias is None else reduce_to(ds, self.bias.shape)
        return o, dq, dk, dvv, dbias, ds


def finite_difference_check(name: str, prob: Problem, grads, rng) -> None:
    """Central differences of Σ dO∘O against the analytic gradients on a few entries."""
    _, dq, dk, dv, dbias, _ = grads
    h = 1e-6
    checks = [("q", prob.q, dq), ("k", prob.k, dk), ("v", prob.v, dv)]
    if prob.bias is not None:
        checks.append(("bias", prob.bias, dbias))
    for role, base, grad in checks:
        finite = np.flatnonzero(np.isfinite(base))
        for flat in rng.choice(finite, size=min(4, finite.size), replace=False):
            plus, minus = base.copy(), base.copy()
            plus.flat[flat] += h
            minus.flat[flat] -= h
            numeric = (prob.loss(**{role: plus}) - prob.loss(**{role: minus})) / (2 * h)
            analytic = grad.flat[flat]
            scale = max(1.0, abs(analytic))
            if abs(numeric - analytic) > 1e-6 * scale:
                raise AssertionError(f"{name}: d{role}[{flat}] analytic {analytic}, "
                                     f"finite difference {numeric}")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def inputs(rng, b, h, hkv, tq, tk, d, dv):
    q = f32(rng.standard_normal((b, h, tq, d)))
    k = f32(rng.standard_normal((b, hkv, tk, d)))
    v = f32(rng.standard_normal((b, hkv, tk, dv)))
    do = f32(rng.standard_normal((b, h, tq, dv)))
    return q, k, v, do


def case(name, description, q, k, v, do, keep=None, bias=None, causal=False,
         alignment="top-left", window=None, scale=None, dropout=None):
    return dict(name=name, description=description, q=q, k=k, v=v, do=do, keep=keep, bias=bias,
                causal=causal or window is not None, alignment=alignment, window=window,
                scale=scale, dropout=dropout)


def all_cases():
    out = []
    name = "plain_tq13_tk21"
    out.append(case(name, "B 2, H 2, Tq 13, Tk 21, D 16, Dv 8, no mask",
                    *inputs(rng_for(name), 2, 2, 2, 13, 21, 16, 8)))

    name = "dv_ne_d_scale"
    out.append(case(name, "B 1, H 3, Tq 19, Tk 11, D 8, Dv 24, scale 0.3",
                    *inputs(rng_for(name), 1, 3, 3, 19, 11, 8, 24), scale=0.3))

    name = "keep_full_rows"
    rng = rng_for(name)
    q, k, v, do = inputs(rng, 2, 2, 2, 17, 19, 16, 8)
    keep = rng.random((2, 2, 17, 19)) > 0.3
    keep[0, 1, 4, :] = False
    keep[1, 0, 16, :] = False
    out.append(case(name, "keep [B, H, Tq, Tk] (30% masked), rows (0, 1, 4) and (1, 0, 16) fully "
                    "masked", q, k, v, do, keep=keep))

    name = "bias_full"
    rng = rng_for(name)
    q, k, v, do = inputs(rng, 2, 2, 2, 11, 14, 16, 8)
    bias = f32(rng.standard_normal((2, 2, 11, 14)))
    bias[rng.random(bias.shape) < 0.1] = -np.inf
    bias[..., 0] = 0.25
    bias[1, 1, 6, :] = -np.inf
    out.append(case(name, "bias [B, H, Tq, Tk] with -inf entries, row (1, 1, 6) all -inf",
                    q, k, v, do, bias=bias))

    name = "bias_shared_tq_tk"
    rng = rng_for(name)
    q, k, v, do = inputs(rng, 2, 2, 2, 12, 15, 16, 8)
    bias = f32(rng.standard_normal((12, 15)))
    out.append(case(name, "bias [Tq, Tk] shared by every batch and head (d(bias) sums 4 heads)",
                    q, k, v, do, bias=bias))

    name = "bias_key_padding"
    rng = rng_for(name)
    q, k, v, do = inputs(rng, 2, 4, 4, 9, 16, 16, 8)
    bias = f32(rng.standard_normal((2, 1, 1, 16)))
    bias[0, ..., 12:] = -np.inf
    bias[1, ..., 7:] = -np.inf
    out.append(case(name, "bias [B, 1, 1, Tk] (key padding, -inf), d(bias) summed over H and Tq",
                    q, k, v, do, bias=bias))

    for tq, tk, alignment in ((20, 33, "top-left"), (33, 20, "bottom-right"),
                              (33, 20, "top-left"), (20, 33, "bottom-right")):
        short = "tl" if alignment == "top-left" else "br"
        name = f"causal_{short}_tq{tq}_tk{tk}"
        note = (f"; the first {tq - tk} rows see no key" if tq > tk and short == "br" else "")
        out.append(case(name, f"causal {alignment}, Tq {tq}, Tk {tk}{note}",
                        *inputs(rng_for(name), 1, 2, 2, tq, tk, 16, 8), causal=True,
                        alignment=alignment))

    name = "window7_t40"
    out.append(case(name, "window 7, top-left, Tq = Tk = 40",
                    *inputs(rng_for(name), 1, 2, 2, 40, 40, 16, 8), window=7))
    name = "window5_br_tq12_tk30"
    out.append(case(name, "window 5, bottom-right, Tq 12, Tk 30",
                    *inputs(rng_for(name), 1, 2, 1, 12, 30, 16, 8), window=5,
                    alignment="bottom-right"))

    name = "gqa_4to1_keep_bias"
    rng = rng_for(name)
    q, k, v, do = inputs(rng, 1, 8, 2, 15, 18, 16, 8)
    keep = rng.random((1, 8, 15, 18)) > 0.2
    keep[0, 5, 3, :] = False
    bias = f32(rng.standard_normal((8, 15, 18)))
    out.append(case(name, "GQA H 8, Hkv 2 (G 4), keep [B, H, Tq, Tk] with row (0, 5, 3) fully "
                    "masked, bias [H, Tq, Tk]", q, k, v, do, keep=keep, bias=bias))

    name = "gqa_4to1_causal"
    out.append(case(name, "GQA H 4, Hkv 1 (G 4), causal top-left, Tq = Tk = 25",
                    *inputs(rng_for(name), 2, 4, 1, 25, 25, 16, 8), causal=True))

    for p in (0.0, 0.3):
        tag = "p0" if p == 0 else "p0p3"
        name = f"dropout_{tag}"
        rng = rng_for(name)
        q, k, v, do = inputs(rng, 1, 2, 2, 12, 16, 16, 8)
        bias = f32(rng.standard_normal((1, 2, 12, 16)))
        z = rng.random((1, 2, 12, 16)) >= p
        out.append(case(name, f"dropout p = {p} with a given keep mask Z, bias [B, H, Tq, Tk], "
                        "causal bottom-right", q, k, v, do, bias=bias, causal=True,
                        alignment="bottom-right", dropout=(p, z)))

    name = "dropout_p0p3_gqa_keep"
    rng = rng_for(name)
    q, k, v, do = inputs(rng, 1, 4, 2, 14, 14, 16, 8)
    keep = rng.random((14, 14)) > 0.2
    keep[2, :] = False
    z = rng.random((1, 4, 14, 14)) >= 0.3
    out.append(case(name, "dropout p = 0.3 with a given Z, GQA G 2, keep [Tq, Tk] with query 2 "
                    "fully masked", q, k, v, do, keep=keep, dropout=(0.3, z)))

    name = "tiles_t300_causal"
    out.append(case(name, "Tq = Tk = 300 (several 128-blocks, a partial last one), D 32, Dv 32, "
                    "causal top-left", *inputs(rng_for(name), 1, 1, 1, 300, 300, 32, 32),
                    causal=True))
    return out


# --------------------------------------------------------------------------------------------


def write_case(w: Writer, c: dict) -> dict:
    q, k, v, do = c["q"], c["k"], c["v"], c["do"]
    heads, kv_heads = q.shape[1], k.shape[1]
    assert heads % kv_heads == 0 and q.shape[0] == k.shape[0] == v.shape[0]
    assert all(a.dtype == np.float32 for a in (q, k, v, do))
    scale = float32_scale(q.shape[-1], c["scale"])
    prefix = PREFIX + c["name"] + "__"
    entry = {"name": c["name"], "description": c["description"],
             "q": w.npy(prefix + "q.npy", q, "<f4"), "k": w.npy(prefix + "k.npy", k, "<f4"),
             "v": w.npy(prefix + "v.npy", v, "<f4"),
             "grad_output": w.npy(prefix + "grad_output.npy", do, "<f4"),
             "heads": heads, "kv_heads": kv_heads, "group_size": heads // kv_heads}
    entry["masks"] = mask_refs(w, prefix, c["keep"], c["bias"])
    entry["causal"] = c["causal"]
    entry["alignment"] = c["alignment"]
    entry["window"] = c["window"]
    entry["scale"] = c["scale"]
    entry["scale_used"] = scale
    z, p = (None, 0.0) if c["dropout"] is None else (c["dropout"][1], c["dropout"][0])
    entry["dropout"] = None
    if c["dropout"] is not None:
        entry["dropout"] = {"p": p, "keep": w.npy(prefix + "dropout_keep.npy", z, "|b1")}

    prob = Problem(q, k, v, do, c["keep"], c["bias"], c["causal"], c["alignment"], c["window"],
                   scale, z, p)
    grads = prob.backward()
    o, dq, dk, dv, dbias, ds = grads
    assert_finite(c["name"], (("output", o), ("dq", dq), ("dk", dk), ("dv", dv), ("ds", ds)))
    # The rows of dS sum to 0 (softmax's Jacobian), and fully masked rows give nothing.
    np.testing.assert_allclose(ds.sum(axis=-1), 0, atol=1e-12)
    dead = ~np.any(prob.seen & (np.isfinite(prob.bias) if prob.bias is not None else True),
                   axis=-1)
    assert np.all(dq[dead] == 0)
    finite_difference_check(c["name"], prob, grads, rng_for(c["name"] + "/fd"))
    entry["fully_masked_rows"] = int(dead.sum())
    entry["expected"] = {
        "output": w.npy(prefix + "expected_output.npy", o, "<f8"),
        "dq": w.npy(prefix + "expected_dq.npy", dq, "<f8"),
        "dk": w.npy(prefix + "expected_dk.npy", dk, "<f8"),
        "dv": w.npy(prefix + "expected_dv.npy", dv, "<f8"),
        "dbias": None if dbias is None else w.npy(prefix + "expected_dbias.npy", dbias, "<f8"),
    }
    return entry


CONVENTIONS = [
    "Q [B, H, Tq, D], K [B, Hkv, Tk, D], V [B, Hkv, Tk, Dv], dO [B, H, Tq, Dv], H % Hkv == 0: "
    "query head h uses key/value head h // (H / Hkv); dK and dV sum the G heads of a group.",
    "Inputs are float32 (<f4) from numpy default_rng(crc32('backward/' + name)); references are "
    "float64 (<f8) computed from the float32 inputs cast to float64.",
    "S = scale_used·Q·Kᵀ + bias; keep (|b1) False = masked; bias (<f4) is added and may be -inf; "
    "both broadcast right-aligned to [B, H, Tq, Tk] (query heads). Causal and windows as in "
    "make_sdpa_fixtures.py.",
    "P = softmax(S) (a fully masked row: 0); Pd = P∘Z/(1 - p) with Z the case's dropout keep "
    "mask (True = kept); O = Pd·V.",
    "dV = Pdᵀ·dO; dP = (dO·Vᵀ)∘Z/(1 - p); dS = P∘(dP - rowsum(dO∘O)); dQ = scale·dS·K; "
    "dK = scale·dSᵀ·Q; d(bias) = dS summed over the bias's broadcast axes.",
]


def main() -> None:
    write_cases(Writer(OUT), __file__, CONVENTIONS, all_cases(), write_case, size_limit=SIZE_LIMIT)


if __name__ == "__main__":
    main()
