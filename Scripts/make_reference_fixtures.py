#!/usr/bin/env python3
"""Generate float64 reference fixtures for the AttentionKit tests.

Usage:  python3 Scripts/make_reference_fixtures.py
Needs:  numpy (2.x) and safetensors (`pip install safetensors`); no torch. Scripts/fixturelib.py
        (the helpers the fixture scripts share).
Writes: Tests/_TestSupport/Fixtures/reference/ (files below + manifest.json) with
        fixturelib.Writer: deterministic and idempotent.

Conventions
-----------
Shape legend: B batch, H heads, Tq queries, Tk keys, D head dim, Dv value dim,
M max relative distance, T sequence length (self-attention, Tq = Tk = T), d d_model.

Inputs (Q, K, V, masks, biases, x, layer weights) come from numpy's default_rng seeded with
zlib.crc32(case name), are rounded to float32 and saved as `<f4`; boolean masks as `|b1`; a 0/1
float keep mask as `<f4`. References are computed in float64 FROM the float32-rounded inputs and
saved as `<f8`. Every .npy is C-order (fortran_order False). Basenames are unique across the whole
folder (prefixed by section and case), so a resource step that flattens folders still works.

1. Scaled dot-product attention (SDPA), PyTorch >= 2.5 semantics:
   scores = Q·Kᵀ·scale (+ bias); positions masked by a keep mask or by causality -> -inf;
   weights = softmax(scores) along the last axis (row max subtracted first);
   a row whose keys are all masked (all -inf) gets ALL-ZERO weights and an all-zero output row;
   output = weights·V.  Keep masks: 0 / False means MASKED.  Masks and biases broadcast numpy-style
   (right-aligned) to [..., Tq, Tk].  Causal is top-left aligned: query i sees key j iff j <= i,
   also when Tq != Tk.  Several masks in one case combine: keep masks AND, biases add.
   With dropout (section `sdpa_dropout`): after the softmax, weights are multiplied by
   keep·2**16/(2**16 - t) (t the 16-bit threshold; see dropout_scale), then output = weights·V;
   the saved weights are those after dropout.

2. Philox4x32-10 (Random123) and AttentionKit's transforms (see Sources/AttentionKit/Philox.swift):
   key = (seed & 0xffffffff, seed >> 32); tensor element e uses block counter
   (lo32(e//4), hi32(e//4), 0, stream), word e % 4.
   uniform: float32((w >> 8) * 2**-24).
   normal: Box–Muller in float64 on words (w0, w1) and (w2, w3) of a block:
     u1 = (w0 + 1) / 2**32, u2 = w1 / 2**32, r = sqrt(-2 ln u1) -> r cos(2π u2), r sin(2π u2);
     saved as float64 BEFORE rounding to float32 (compare Float(expected) with the Swift output).
   Dropout: weight at flat row r = (flat batch index)·Tq + i and key column j uses block counter
     (lo32(r), hi32(r), 16·(j // 128) + j % 16, stream 0), word (j % 128) // 32 = w, and of w
     its low 16 bits h = w & 0xffff when (j % 32) < 16, its high 16 bits h = w >> 16 otherwise
     (so sixteen blocks computed side by side give 128 consecutive keys); it is DROPPED iff
     h < threshold, with threshold = 0 for p = 0, 2**16 for p = 1 (drop all), else
     min(round_half_up(p·2**16), 2**16-1).
     Every p written is exactly a float32 (the Swift API takes `Float`), e.g. "0.1" is stored as
     0.10000000149011612 = Float(0.1), so Float and Double computations of the threshold agree.

3. Relative-position self-attention (exercise 3 of the notebook, single head, no output
   projection), following the notebook's CODE: Q = x·W_qᵀ + b_q (same for K, V; nn.Linear layout,
   weight [out, in]); index[i, j] = clip(j - i, -M, M) + M into E = relative_embeddings.weight
   [2M+1, d]; score(i, j) = (q_i·k_j + q_i·E[index[i, j]]) / sqrt(d); keep mask (0 = masked; fully
   masked rows -> zero weights and zero output); softmax; output = weights·V.

Manifest schema (manifest.json, all paths relative to the folder holding manifest.json)
--------------------------------------------------------------------------------------
A "file ref" is {"file": str, "dtype": str, "shape": [int]}; dtype is the npy descr ("<f4", "<f8",
"|b1", "<i8"), or "F32" for safetensors tensors.  All integers in the manifest are < 2**53.

{
  "schema_version": 1,
  "generator": "Scripts/make_reference_fixtures.py",
  "conventions": [str],                # human-readable summary of the rules above
  "sdpa": [SdpaCase],                  # no dropout ("dropout" is null)
  "sdpa_dropout": [SdpaCase],          # same keys, "dropout" is an object
  "philox": {"file": str, "count": int},   # JSON file, see PhiloxFile below
  "random_uniform": [RandomCase],
  "random_normal": [RandomCase],
  "dropout_masks": [DropoutMaskCase],
  "relative_position": [RelPosCase]
}
SdpaCase = {
  "name": str, "description": str,
  "q": ref [..., Tq, D], "k": ref [..., Tk, D], "v": ref [..., Tk, Dv],   (same leading dims)
  "masks": [{"kind": "keep" | "bias", "file", "dtype", "shape"}],   # 0, 1 or 2 entries
  "causal": bool,
  "scale": float,                      # always the value used, also when it is the default
  "scale_is_default": bool,            # true: scale == 1/sqrt(D), the API default (pass nil)
  "fully_masked_rows": int,            # rows of the weights that are all zero
  "max_abs_score": float,              # max |finite score| (info; large-magnitude case)
  "dropout": null | {"p": float, "seed": int, "stream": 0, "threshold": int,
                     "keep": ref |b1 [..., Tq, Tk]},
  "expected": {"output": ref <f8 [..., Tq, Dv], "weights": ref <f8 [..., Tq, Tk]}
}
PhiloxFile (JSON) = {"algorithm": "philox4x32-10",
  "vectors": [{"source": "random123-kat" | "generated", "counter": [4 x uint32],
               "key": [2 x uint32], "output": [4 x uint32]}]}
RandomCase = {"name": str, "seed": int, "stream": int, "count": int,
              "expected": ref (uniform: <f4 [count]; normal: <f8 [count], before rounding)}
DropoutMaskCase = {"name": str, "seed": int, "stream": 0, "p": float, "threshold": int,
                   "scale": float | null (1/(1-p), null for p = 1), "shape": [B, Tq, Tk],
                   "keep": ref |b1 [B, Tq, Tk]}     # True = kept
RelPosCase = {"name": str, "description": str, "batch": B, "seq_len": T, "d_model": d,
  "max_relative_position": M,
  "params": {"file": str (.safetensors), "dtype": "F32",
             "tensors": {"W_q.weight": [d, d], "W_q.bias": [d], "W_k.weight", "W_k.bias",
                         "W_v.weight", "W_v.bias", "relative_embeddings.weight": [2M+1, d]}},
  "x": ref <f4 [B, T, d],
  "mask": null | {"kind": "keep", "file", "dtype", "shape"},   # [T, T] or [B, T, T]
  "relative_index": ref <i8 [T, T],
  "fully_masked_rows": int,
  "expected": {"output": ref <f8 [B, T, d], "weights": ref <f8 [B, T, T]}
}
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

try:
    from safetensors.numpy import save as safetensors_save
except ImportError:  # pragma: no cover - message for a missing dependency
    sys.exit("make_reference_fixtures: needs the safetensors package (pip install safetensors)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import (FIXTURES, Writer, f32, manifest_header, masked_softmax,  # noqa: E402
                        relative_index, rng_factory)

OUT = FIXTURES / "reference"

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # multiplies counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9  # key word 0 bump (golden ratio)
PHILOX_W1 = 0xBB67AE85  # key word 1 bump (sqrt(3) - 1)
DROPOUT_STREAM = 0

# Random123 known-answer vectors for philox4x32-10: (counter, key, output).
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


rng_for = rng_factory("")  # seeded by crc32 of the name itself ("sdpa/plain_tiny", "philox")


def save_safetensors(tensors: dict[str, np.ndarray], metadata) -> bytes:
    """The safetensors file of `tensors`, laid out by the safetensors package."""
    return safetensors_save(tensors, metadata=metadata)


# --------------------------------------------------------------------------------------------
# 1. Scaled dot-product attention
# --------------------------------------------------------------------------------------------


def causal_keep(tq: int, tk: int) -> np.ndarray:
    """Top-left aligned causal keep mask [Tq, Tk]: query i sees key j iff j <= i."""
    return np.arange(tk)[None, :] <= np.arange(tq)[:, None]


def sdpa_reference(q, k, v, masks, causal, scale, dropout_keep=None, p=0.0):
    """float64 SDPA from float32 inputs.

    q: [..., Tq, D], k: [..., Tk, D], v: [..., Tk, Dv];
    masks: list of (kind, array) with kind "keep" (0/False = masked) or "bias" (added), each
           broadcastable to [..., Tq, Tk];
    dropout_keep: None or bool [..., Tq, Tk] (True = kept), applied with scale 1/(1-p).
    Returns (output [..., Tq, Dv], weights [..., Tq, Tk], raw scores [..., Tq, Tk]).
    """
    q64, k64, v64 = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scores = np.einsum("...qd,...kd->...qk", q64, k64) * scale  # [..., Tq, Tk]
    raw = scores.copy()
    keep = np.ones(scores.shape, dtype=bool)
    for kind, m in masks:
        if kind == "bias":
            scores = scores + np.asarray(m, dtype=np.float64)
        elif kind == "keep":
            keep = keep & (np.asarray(m) != 0)
        else:
            raise ValueError(kind)
    if causal:
        keep = keep & causal_keep(scores.shape[-2], scores.shape[-1])
    scores = np.where(keep, scores, -np.inf)
    weights = masked_softmax(scores)
    if dropout_keep is not None:
        weights = np.where(dropout_keep, weights * dropout_scale(p), 0.0) if p < 1 else weights * 0.0
    output = np.einsum("...qk,...kv->...qv", weights, v64)  # [..., Tq, Dv]
    return output, weights, np.where(np.isfinite(scores), raw, np.nan)


def make_qkv(rng, batch, tq, tk, d, dv, magnitude=1.0):
    """Random float32 Q [*batch, Tq, D], K [*batch, Tk, D], V [*batch, Tk, Dv]."""
    q = f32(rng.standard_normal((*batch, tq, d)) * magnitude)
    k = f32(rng.standard_normal((*batch, tk, d)) * magnitude)
    v = f32(rng.standard_normal((*batch, tk, dv)))
    return q, k, v


def sdpa_case_specs():
    """The SDPA cases: name, description, and a builder rng -> (q, k, v, masks, causal, scale)."""

    def plain_tiny(rng):
        q, k, v = make_qkv(rng, (1,), 4, 4, 8, 8)  # the notebook's [1, 4, 8]
        return q, k, v, [], False, None

    def rect_dv(rng):
        q, k, v = make_qkv(rng, (2,), 5, 7, 8, 6)  # B 2, Tq 5, Tk 7, D 8, Dv 6
        return q, k, v, [], False, None

    def batch_2x3(rng):
        q, k, v = make_qkv(rng, (2, 3), 4, 6, 8, 5)  # Q [2, 3, Tq, D]
        return q, k, v, [], False, None

    def bool_mask_full_row(rng):
        q, k, v = make_qkv(rng, (2,), 5, 6, 8, 8)
        keep = rng.random((2, 5, 6)) > 0.3  # [B, Tq, Tk]
        keep[0, :, 0] = True  # every row but the one below keeps something
        keep[1, :, 1] = True
        keep[1, 2, :] = False  # a fully masked row
        return q, k, v, [("keep", keep)], False, None

    def float_mask_broadcast_batch(rng):
        q, k, v = make_qkv(rng, (3,), 6, 7, 8, 8)
        keep = (rng.random((6, 7)) > 0.4).astype(np.float32)  # [Tq, Tk] 0/1, over B
        keep[:, 0] = 1.0
        return q, k, v, [("keep", keep)], False, None

    def mask_broadcast_heads(rng):
        q, k, v = make_qkv(rng, (2, 3), 5, 6, 8, 8)  # [B, H, ...]
        keep = rng.random((2, 1, 5, 6)) > 0.35  # [B, 1, Tq, Tk], over H
        keep[..., 2] = True
        return q, k, v, [("keep", keep)], False, None

    def key_padding_mask(rng):
        q, k, v = make_qkv(rng, (2, 2), 4, 7, 8, 8)
        keep = np.ones((2, 1, 1, 7), dtype=bool)  # [B, 1, 1, Tk]
        keep[0, ..., 5:] = False  # batch 0 has 5 valid keys
        keep[1, ..., 3:] = False  # batch 1 has 3
        return q, k, v, [("keep", keep)], False, None

    def additive_bias(rng):
        q, k, v = make_qkv(rng, (2, 2), 5, 6, 8, 8)
        bias = f32(rng.standard_normal((2, 5, 6)) * 2.0)  # [H, Tq, Tk], over B
        bias[0, 1, 3] = -np.inf
        bias[1, 4, :] = -np.inf  # a fully masked row through the bias
        return q, k, v, [("bias", bias)], False, None

    def bias_and_keep(rng):
        q, k, v = make_qkv(rng, (2, 2), 5, 7, 8, 8)
        bias = f32(rng.standard_normal((5, 7)))  # [Tq, Tk]
        bias[0, 2] = -np.inf
        keep = np.ones((2, 1, 1, 7), dtype=bool)  # [B, 1, 1, Tk]
        keep[1, ..., 4:] = False
        return q, k, v, [("bias", bias), ("keep", keep)], False, None

    def causal_square(rng):
        q, k, v = make_qkv(rng, (2,), 6, 6, 8, 8)
        return q, k, v, [], True, None

    def causal_tq_lt_tk(rng):
        q, k, v = make_qkv(rng, (2,), 4, 7, 8, 8)
        return q, k, v, [], True, None

    def causal_tq_gt_tk(rng):
        q, k, v = make_qkv(rng, (2,), 7, 4, 8, 8)
        return q, k, v, [], True, None

    def causal_and_keep_full_row(rng):
        q, k, v = make_qkv(rng, (2,), 5, 5, 8, 8)
        keep = np.ones((2, 5, 5), dtype=bool)  # [B, Tq, Tk]
        keep[1, 0, 0] = False  # with causal, query 0 of batch 1 sees nothing
        keep[0, 3, 1] = False
        return q, k, v, [("keep", keep)], True, None

    def scale_override(rng):
        q, k, v = make_qkv(rng, (2,), 5, 6, 8, 8)
        return q, k, v, [], False, 0.3

    def large_tiles(rng):
        q, k, v = make_qkv(rng, (2, 2), 70, 130, 16, 16)
        return q, k, v, [], False, None

    def large_tiles_causal_masked(rng):
        q, k, v = make_qkv(rng, (1, 2), 70, 70, 16, 16)
        keep = rng.random((70, 70)) > 0.2  # [Tq, Tk]
        keep[np.arange(70), np.arange(70)] = True
        keep[33, :] = False  # a fully masked row inside a middle tile
        return q, k, v, [("keep", keep)], True, None

    def large_magnitude(rng):
        q, k, v = make_qkv(rng, (2,), 6, 8, 8, 8, magnitude=6.0)  # scores ~ ±100
        return q, k, v, [], False, None

    return [
        ("plain_tiny", "no mask, notebook shape [1, 4, 8]", plain_tiny),
        ("rect_dv", "no mask, Tq 5 != Tk 7, Dv 6 != D 8", rect_dv),
        ("batch_2x3", "leading batch [2, 3], Tq 4, Tk 6, D 8, Dv 5", batch_2x3),
        ("bool_mask_full_row", "bool keep mask [B, Tq, Tk], batch 1 row 2 fully masked",
         bool_mask_full_row),
        ("float_mask_broadcast_batch", "0/1 float keep mask [Tq, Tk] broadcast over B 3",
         float_mask_broadcast_batch),
        ("mask_broadcast_heads", "bool keep mask [B, 1, Tq, Tk] broadcast over H",
         mask_broadcast_heads),
        ("key_padding_mask", "bool keep mask [B, 1, 1, Tk] (key padding)", key_padding_mask),
        ("additive_bias", "float bias [H, Tq, Tk] over B, with -inf entries and a -inf row",
         additive_bias),
        ("bias_and_keep", "bias [Tq, Tk] with a -inf plus keep mask [B, 1, 1, Tk]",
         bias_and_keep),
        ("causal_square", "causal, Tq == Tk == 6", causal_square),
        ("causal_tq_lt_tk", "causal top-left, Tq 4 < Tk 7", causal_tq_lt_tk),
        ("causal_tq_gt_tk", "causal top-left, Tq 7 > Tk 4", causal_tq_gt_tk),
        ("causal_and_keep_full_row", "causal plus keep mask; batch 1 query 0 sees no key",
         causal_and_keep_full_row),
        ("scale_override", "explicit scale 0.3", scale_override),
        ("large_tiles", "[2, 2, 70, 130, 16], Tq/Tk not multiples of block sizes", large_tiles),
        ("large_tiles_causal_masked", "[1, 2, 70, 70, 16] causal + keep mask [Tq, Tk] with a "
         "fully masked row 33", large_tiles_causal_masked),
        ("large_magnitude", "inputs ×6, |scores| up to ~100 (overflows float32 exp without max "
         "subtraction)", large_magnitude),
    ]


def write_sdpa_case(w: Writer, section: str, name: str, description: str, q, k, v, masks,
                    causal, scale, dropout=None) -> dict:
    """Compute one SDPA reference and save its files; return its manifest entry.

    dropout: None or dict(p=..., seed=...) -> keep mask from philox_dropout_keep.
    """
    d = q.shape[-1]
    default_scale = 1.0 / math.sqrt(d)
    used_scale = default_scale if scale is None else float(scale)
    prefix = f"{section}/{section}__{name}__"
    entry = {"name": name, "description": description}
    entry["q"] = w.npy(prefix + "q.npy", q, "<f4")
    entry["k"] = w.npy(prefix + "k.npy", k, "<f4")
    entry["v"] = w.npy(prefix + "v.npy", v, "<f4")
    mask_refs = []
    for index, (kind, m) in enumerate(masks):
        dtype = "|b1" if m.dtype == bool else "<f4"
        ref = w.npy(prefix + f"mask{index}_{kind}.npy", m, dtype)
        mask_refs.append({"kind": kind, **ref})
    entry["masks"] = mask_refs
    entry["causal"] = bool(causal)
    entry["scale"] = used_scale
    entry["scale_is_default"] = scale is None

    keep, p = None, 0.0
    if dropout is not None:
        p = dropout["p"]
        weights_shape = (*q.shape[:-1], k.shape[-2])  # [..., Tq, Tk]
        keep = philox_dropout_keep(dropout["seed"], p, weights_shape)
    out, weights, raw = sdpa_reference(q, k, v, masks, causal, used_scale, keep, p)
    if not (np.all(np.isfinite(out)) and np.all(np.isfinite(weights))):
        raise AssertionError(f"{name}: non-finite reference")
    entry["fully_masked_rows"] = int(np.sum(np.all(
        sdpa_reference(q, k, v, masks, causal, used_scale)[1] == 0, axis=-1)))
    entry["max_abs_score"] = float(np.nanmax(np.abs(raw)))
    if dropout is None:
        entry["dropout"] = None
    else:
        entry["dropout"] = {
            "p": p,
            "seed": dropout["seed"],
            "stream": DROPOUT_STREAM,
            "threshold": dropout_threshold(p),
            "keep": w.npy(prefix + "dropout_keep.npy", keep, "|b1"),
        }
    entry["expected"] = {
        "output": w.npy(prefix + "expected_output.npy", out, "<f8"),
        "weights": w.npy(prefix + "expected_weights.npy", weights, "<f8"),
    }
    return entry


def build_sdpa(w: Writer) -> list[dict]:
    """All non-dropout SDPA cases."""
    entries = []
    for name, description, build in sdpa_case_specs():
        q, k, v, masks, causal, scale = build(rng_for("sdpa/" + name))
        entries.append(write_sdpa_case(w, "sdpa", name, description, q, k, v, masks, causal,
                                       scale))
    return entries


def build_sdpa_dropout(w: Writer) -> list[dict]:
    """SDPA with dropout: weights after softmax are masked by Philox and scaled by 1/(1-p)."""
    entries = []
    rng = rng_for("sdpa_dropout/basic")
    q, k, v = make_qkv(rng, (2, 2), 5, 9, 8, 6)  # [B 2, H 2], Tq 5, Tk 9, D 8, Dv 6
    entries.append(write_sdpa_case(
        w, "sdpa_dropout", "basic", "dropout p 0.25 on [2, 2, 5, 9] weights, Dv 6", q, k, v, [],
        False, None, dropout={"p": 0.25, "seed": 2024}))

    rng = rng_for("sdpa_dropout/causal_masked")
    q, k, v = make_qkv(rng, (2,), 6, 6, 8, 8)
    keep = np.ones((2, 6, 6), dtype=bool)  # [B, Tq, Tk]
    keep[1, 0, 0] = False  # fully masked row stays zero under dropout
    entries.append(write_sdpa_case(
        w, "sdpa_dropout", "causal_masked",
        "dropout p 0.5, seed >= 2**32, causal + keep mask with a fully masked row", q, k, v,
        [("keep", keep)], True, None, dropout={"p": 0.5, "seed": 2**32 + 11}))
    return entries


# --------------------------------------------------------------------------------------------
# 2. Philox4x32-10 and the random transforms
# --------------------------------------------------------------------------------------------


def philox_block(counter, key, rounds: int = 10):
    """Philox4x32-R on one 128-bit counter (4 words) and 64-bit key (2 words), pure Python ints."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        p0 = PHILOX_M0 * x0
        p1 = PHILOX_M1 * x2
        x0, x1, x2, x3 = ((p1 >> 32) ^ x1 ^ k0, p1 & MASK32, (p0 >> 32) ^ x3 ^ k1, p0 & MASK32)
    return (x0, x1, x2, x3)


def philox_blocks(c0, c1, c2, c3, key, rounds: int = 10) -> np.ndarray:
    """Vectorised Philox4x32-R: counter word arrays (broadcast together) -> uint64 [..., 4]."""
    m = np.uint64(MASK32)
    x0, x1, x2, x3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint64) & m
                                           for c in (c0, c1, c2, c3)))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + np.uint64(PHILOX_W0)) & m
            k1 = (k1 + np.uint64(PHILOX_W1)) & m
        p0 = np.uint64(PHILOX_M0) * x0  # < 2**64, exact
        p1 = np.uint64(PHILOX_M1) * x2
        x0, x1, x2, x3 = ((p1 >> np.uint64(32)) ^ x1 ^ k0, p1 & m,
                          (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & m)
    return np.stack([x0, x1, x2, x3], axis=-1)


def seed_key(seed: int):
    """AttentionKit's key for a 64-bit seed: (low 32 bits, high 32 bits)."""
    return (seed & MASK32, (seed >> 32) & MASK32)


def check_philox() -> None:
    """Assert the Random123 known answers, and that the scalar and vector versions agree."""
    for counter, key, expected in RANDOM123_KAT:
        got = philox_block(counter, key)
        assert got == expected, f"philox KAT {counter} {key}: {[hex(g) for g in got]}"
        vec = philox_blocks(*counter, key)
        assert tuple(int(x) for x in vec) == expected, "vector philox disagrees with KAT"


def build_philox(w: Writer) -> dict:
    """Known answers plus generated vectors, as JSON; returns the manifest entry."""
    check_philox()
    vectors = [{"source": "random123-kat", "counter": list(c), "key": list(k), "output": list(o)}
               for c, k, o in RANDOM123_KAT]
    rng = rng_for("philox")
    words = rng.integers(0, 2**32, size=(16, 6), dtype=np.uint64)
    cases = [(tuple(int(x) for x in row[:4]), (int(row[4]), int(row[5]))) for row in words]
    # Counters in AttentionKit's layout: (lo(major), hi(major), minor, stream) with seed keys.
    for seed, major, minor, stream in [(0, 0, 0, 0), (42, 1, 0, 1), (2**32 + 7, 2**32 + 5, 3, 0),
                                       (2**53 - 1, 123456789, 7, 1024), (1, MASK32, 0, 16),
                                       (0xDEADBEEF, 0, 1, 4)]:
        cases.append(((major & MASK32, major >> 32, minor, stream), seed_key(seed)))
    for counter, key in cases:
        out = philox_block(counter, key)
        vec = tuple(int(x) for x in philox_blocks(*counter, key))
        assert out == vec, "scalar and vector philox disagree"
        vectors.append({"source": "generated", "counter": list(counter), "key": list(key),
                        "output": list(out)})
    rel = "random/random__philox4x32_10_vectors.json"
    w.json(rel, {"algorithm": "philox4x32-10", "vectors": vectors})
    return {"file": rel, "count": len(vectors)}


def tensor_words(seed: int, stream: int, count: int) -> np.ndarray:
    """The Philox words for tensor elements 0..count-1: uint64 [ceil(count/4), 4]."""
    blocks = np.arange((count + 3) // 4, dtype=np.uint64)
    return philox_blocks(blocks & np.uint64(MASK32), blocks >> np.uint64(32), 0, stream,
                         seed_key(seed))


def random_uniform(seed: int, stream: int, count: int) -> np.ndarray:
    """float32 uniforms in [0, 1): (w >> 8) * 2**-24 per element. -> [count]"""
    words = tensor_words(seed, stream, count).reshape(-1)[:count]
    return ((words >> np.uint64(8)).astype(np.float64) * 2.0**-24).astype(np.float32)


def box_muller(w0: int, w1: int):
    """One Box–Muller pair in float64 from two 32-bit words (libm, same order as Swift)."""
    u1 = (float(w0) + 1.0) * 2.0**-32
    u2 = float(w1) * 2.0**-32
    radius = math.sqrt(-2.0 * math.log(u1))
    angle = 2.0 * math.pi * u2
    return radius * math.cos(angle), radius * math.sin(angle)


def random_normal(seed: int, stream: int, count: int) -> np.ndarray:
    """float64 standard normals (before rounding to float32). -> [count]"""
    values = []
    for w0, w1, w2, w3 in tensor_words(seed, stream, count).tolist():
        values.extend(box_muller(w0, w1))
        values.extend(box_muller(w2, w3))
    return np.array(values[:count], dtype=np.float64)


RANDOM_COMBOS = [  # (seed, stream, count)
    (0, 0, 1),
    (42, 1, 7),
    (2**32 + 3, 4, 33),  # seed >= 2**32: key word 1 = 1
    (0x0012_3456_789A_BCDE, 2, 64),
    (7, 16, 10),
    (123456789, 1024, 5),
]


def build_random(w: Writer):
    """Uniform (<f4) and normal (<f8, before rounding) fixtures; returns the two manifest lists."""
    uniform, normal = [], []
    for seed, stream, count in RANDOM_COMBOS:
        name = f"seed{seed}_stream{stream}_count{count}"
        u = random_uniform(seed, stream, count)
        assert np.all((u >= 0) & (u < 1))
        uniform.append({"name": name, "seed": seed, "stream": stream, "count": count,
                        "expected": w.npy(f"random/uniform__{name}.npy", u, "<f4")})
        n = random_normal(seed, stream, count)
        normal.append({"name": name, "seed": seed, "stream": stream, "count": count,
                       "expected": w.npy(f"random/normal__{name}.npy", n, "<f8")})
    return uniform, normal


def dropout_threshold(p: float) -> int:
    """Drop iff h < threshold (h a 16-bit half of a word): 0 for p = 0, 2**16 for p = 1, else
    min(round(p·2**16), 2**16-1).

    Rounding is half up (exact: p·2**16 is an exact float64 and adding 0.5 keeps it exact).
    p must be exactly a float32, so that Swift's `Float` probability gives the same threshold.
    """
    if not 0.0 <= p <= 1.0 or float(np.float32(p)) != p:
        raise ValueError(f"dropout p must be a float32 in [0, 1]: {p!r}")
    if p == 0.0:
        return 0
    if p == 1.0:
        return 2**16
    return min(math.floor(p * 2.0**16 + 0.5), 2**16 - 1)


def dropout_scale(p: float) -> float:
    """The factor for kept weights: one over the probability a weight is kept, 2**16/(2**16 - t)
    with t the threshold (not 1/(1 - p): the decisions drop with probability t/2**16, and this
    keeps dropout unbiased for every p). p must be below 1."""
    return 2.0**16 / (2.0**16 - dropout_threshold(p))


def dropout_half(word: int, j: int) -> int:
    """The 16 bits of `word` that decide key j: the low half for j % 32 < 16, else the high."""
    return word & 0xFFFF if j % 32 < 16 else word >> 16


def philox_dropout_keep(seed: int, p: float, shape) -> np.ndarray:
    """Keep mask (True = kept) for weights of shape [..., Tq, Tk].

    Flat row r = flat batch index · Tq + i; column j -> counter
    (lo(r), hi(r), 16·(j // 128) + j % 16, 0), word (j % 128) // 32, its low 16 bits for
    j % 32 < 16, else its high 16 bits.
    """
    *batch, tq, tk = shape
    rows = np.arange(int(np.prod(batch, dtype=np.int64)) * tq, dtype=np.uint64)  # [R]
    minors = np.arange(16 * ((tk + 127) // 128), dtype=np.uint64)  # [16·ceil(Tk/128)]
    words = philox_blocks(rows[:, None] & np.uint64(MASK32), rows[:, None] >> np.uint64(32),
                          minors[None, :], DROPOUT_STREAM, seed_key(seed))  # [R, minors, 4]
    j = np.arange(tk)
    words = words[:, 16 * (j // 128) + j % 16, (j % 128) // 32]  # [R, Tk]
    halves = np.where(j % 32 < 16, words & np.uint64(0xFFFF), words >> np.uint64(16))
    keep = halves >= np.uint64(dropout_threshold(p))
    # Spot-check the vectorised layout against the scalar generator.
    for r, j in [(0, 0), (len(rows) - 1, tk - 1), (len(rows) // 2, tk // 2)]:
        minor = 16 * (j // 128) + j % 16
        word = philox_block((r & MASK32, r >> 32, minor, DROPOUT_STREAM),
                            seed_key(seed))[(j % 128) // 32]
        assert keep[r, j] == (dropout_half(word, j) >= dropout_threshold(p))
    return keep.reshape(shape)


DROPOUT_COMBOS = [  # (seed, p, [B, Tq, Tk])
    (0, 0.5, (1, 4, 8)),
    (1234, 0.25, (2, 5, 7)),
    (2**32 + 5, 0.125, (3, 6, 13)),
    (99, 0.75, (1, 3, 130)),
    (42, float(np.float32(0.1)), (2, 3, 10)),  # p = Float(0.1), not dyadic
    (7, 0.0, (1, 2, 5)),
    (7, 1.0, (1, 2, 5)),
]


def build_dropout_masks(w: Writer) -> list[dict]:
    """Keep masks for a few (seed, p, shape) combinations."""
    entries = []
    for seed, p, shape in DROPOUT_COMBOS:
        name = f"seed{seed}_p{p:g}_{'x'.join(map(str, shape))}"
        keep = philox_dropout_keep(seed, p, shape)
        entries.append({
            "name": name, "seed": seed, "stream": DROPOUT_STREAM, "p": p,
            "threshold": dropout_threshold(p), "scale": None if p == 1.0 else dropout_scale(p),
            "shape": list(shape),
            "keep": w.npy(f"dropout/dropout__{name}__keep.npy", keep, "|b1"),
        })
    return entries


# --------------------------------------------------------------------------------------------
# 3. Relative-position attention
# --------------------------------------------------------------------------------------------


def relpos_reference(x, params, max_rel, mask):
    """float64 relative-position self-attention.

    x: [B, T, d]; params: nn.Linear / nn.Embedding tensors (float32); mask: None or keep
    [T, T] / [B, T, T]. Returns (output [B, T, d], weights [B, T, T]).
    """
    x64 = np.asarray(x, dtype=np.float64)
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    d = x.shape[-1]
    q = x64 @ p["W_q.weight"].T + p["W_q.bias"]  # [B, T, d]
    k = x64 @ p["W_k.weight"].T + p["W_k.bias"]
    v = x64 @ p["W_v.weight"].T + p["W_v.bias"]
    rel = p["relative_embeddings.weight"][relative_index(x.shape[1], max_rel)]  # [T, T, d]
    content = np.einsum("bqd,bkd->bqk", q, k)  # [B, T, T]
    position = np.einsum("bqd,qkd->bqk", q, rel)  # [B, T, T]
    scores = (content + position) / math.sqrt(d)
    if mask is not None:
        scores = np.where(np.asarray(mask) != 0, scores, -np.inf)
    weights = masked_softmax(scores)
    return np.einsum("bqk,bkd->bqd", weights, v), weights


def relpos_params(rng, d: int, max_rel: int) -> dict[str, np.ndarray]:
    """PyTorch-like init, rounded to float32: Linear U(±1/sqrt(d)), Embedding N(0, 1)."""
    bound = 1.0 / math.sqrt(d)
    params = {}
    for name in ("W_q", "W_k", "W_v"):
        params[f"{name}.weight"] = f32(rng.uniform(-bound, bound, (d, d)))  # [out, in]
        params[f"{name}.bias"] = f32(rng.uniform(-bound, bound, (d,)))
    params["relative_embeddings.weight"] = f32(rng.standard_normal((2 * max_rel + 1, d)))
    return params


def build_relpos(w: Writer) -> list[dict]:
    """Relative-position attention cases (B = 2 everywhere)."""
    batch = 2
    specs = [  # name, description, d_model, M, T, mask kind
        ("d16_m4_t6", "T 6 < 2M+1 = 9, no mask", 16, 4, 6, None),
        ("d16_m3_t20", "T 20 > 2M+1 = 7 (clipping), no mask", 16, 3, 20, None),
        ("d16_m3_t20_causal", "causal keep mask [T, T] (bool)", 16, 3, 20, "causal"),
        ("d16_m4_t6_masked_row", "bool keep mask [B, T, T], batch 1 row 3 fully masked", 16, 4,
         6, "full_row"),
        ("d64_m16_t20", "the notebook's test shape, no mask", 64, 16, 20, None),
    ]
    entries = []
    for name, description, d, max_rel, t, mask_kind in specs:
        rng = rng_for("relpos/" + name)
        params = relpos_params(rng, d, max_rel)
        x = f32(rng.standard_normal((batch, t, d)))  # [B, T, d]
        mask = None
        if mask_kind == "causal":
            mask = causal_keep(t, t)  # [T, T]
        elif mask_kind == "full_row":
            mask = rng.random((batch, t, t)) > 0.3  # [B, T, T]
            mask[:, np.arange(t), np.arange(t)] = True
            mask[1, 3, :] = False
        out, weights = relpos_reference(x, params, max_rel, mask)
        prefix = f"relpos/relpos__{name}__"
        entry = {"name": name, "description": description, "batch": batch, "seq_len": t,
                 "d_model": d, "max_relative_position": max_rel,
                 "params": w.safetensors(prefix + "params.safetensors", params,
                                         encode=save_safetensors),
                 "x": w.npy(prefix + "x.npy", x, "<f4")}
        entry["mask"] = None if mask is None else {
            "kind": "keep", **w.npy(prefix + "mask_keep.npy", mask, "|b1")}
        entry["relative_index"] = w.npy(prefix + "relative_index.npy",
                                        relative_index(t, max_rel), "<i8")
        entry["fully_masked_rows"] = int(np.sum(np.all(weights == 0, axis=-1)))
        entry["expected"] = {"output": w.npy(prefix + "expected_output.npy", out, "<f8"),
                             "weights": w.npy(prefix + "expected_weights.npy", weights, "<f8")}
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------------------------


CONVENTIONS = [
    "Inputs are float32 (<f4) from numpy default_rng(crc32(case name)); references are float64 "
    "(<f8) computed from the float32 inputs.",
    "Paths are relative to the folder of manifest.json; basenames are unique.",
    "SDPA: weights = softmax(Q·Kᵀ·scale + bias, masked -> -inf), output = weights·V; keep masks: "
    "0/False = masked; masks broadcast right-aligned to [..., Tq, Tk]; keep masks AND, biases add.",
    "Causal is top-left aligned: query i sees key j iff j <= i.",
    "A fully masked row has all-zero weights and an all-zero output row.",
    "Dropout: flat row r = flat batch index·Tq + i, key j -> Philox counter (lo(r), hi(r), j/4, "
    "stream 0), word j%4; dropped iff word < threshold; kept weights scaled by 1/(1-p); saved "
    "weights are after dropout.",
    "Philox key = (seed & 0xffffffff, seed >> 32); tensor element e -> counter (lo(e/4), "
    "hi(e/4), 0, stream), word e%4.",
    "Uniform: float32((w >> 8)·2^-24). Normal: Box–Muller float64 values before rounding.",
    "Relative position: index[i, j] = clip(j - i, -M, M) + M; score = (q_i·k_j + "
    "q_i·E[index]) / sqrt(d_model).",
]


def main() -> None:
    w = Writer(OUT, nested=True)
    manifest = {
        **manifest_header(__file__, CONVENTIONS),
        "sdpa": build_sdpa(w),
        "sdpa_dropout": build_sdpa_dropout(w),
        "philox": build_philox(w),
    }
    manifest["random_uniform"], manifest["random_normal"] = build_random(w)
    manifest["dropout_masks"] = build_dropout_masks(w)
    manifest["relative_position"] = build_relpos(w)
    w.finish(manifest, notes=[
        f"sdpa cases: {len(manifest['sdpa'])}, sdpa_dropout cases: "
        f"{len(manifest['sdpa_dropout'])}, philox vectors: {manifest['philox']['count']} "
        f"(Random123 known answers pass)",
        f"random uniform/normal cases: {len(manifest['random_uniform'])}/"
        f"{len(manifest['random_normal'])}, dropout masks: {len(manifest['dropout_masks'])}, "
        f"relative-position cases: {len(manifest['relative_position'])}"])


if __name__ == "__main__":
    main()
