#!/usr/bin/env python3
"""Generate float64 references for the gradients of the notebook's RelativePositionAttention
(exercise 3): dx and the gradient of every parameter, under the module's state_dict names, for a
given upstream gradient dY, with M smaller and larger than T, M = 0, a keep mask with a fully
masked row, causal masking and B > 1.

Usage:  python3 Scripts/make_relpos_grad_fixtures.py   (any python3 with numpy)
Needs:  numpy only, and Scripts/fixturelib.py (the helpers the fixture scripts share).
Writes: Tests/_TestSupport/Fixtures/relpos_grad/ (flat: .npy files + manifest.json) with
        fixturelib.Writer: deterministic and idempotent. Read by
        Tests/_TestSupport/RelposGradFixtures.swift.

Conventions
-----------
Shape legend: B batch, T sequence length, D = d_model, M max relative distance (E has 2M + 1
rows).

Inputs, from numpy's default_rng seeded with zlib.crc32("relpos_grad/" + case name), rounded to
float32 and saved as `<f4`: x [B, T, D] and dY [B, T, D] standard normal; W_q, W_k, W_v [D, D]
([out, in], nn.Linear) and their biases [D] uniform in ±1/sqrt(D); E [2M + 1, D] standard
normal. The keep mask is `|b1` [B, T, T] (True = attend).

Reference (in float64 from the float32 inputs, scale = 1/sqrt(D) in float64 as PyTorch float64):
  Q = x·W_qᵀ + b_q (likewise K, V);
  S_ij = scale·(q_i·k_j + q_i·E[r(i, j)]), r(i, j) = clip(j - i, -M, M) + M (the notebook's code
  computes j - i), -inf where masked (keep False; causal: j > i);
  P = softmax(S) by rows, a fully masked row gives P = 0 (the notebook would give NaN); Y = P·V;
  dV = Pᵀ·dY; dP = dY·Vᵀ; dS = P∘(dP - rowsum(dP∘P));
  G_ir = sum over j with r(i, j) = r of dS_ij ([T, 2M + 1]);
  dQ = scale·(dS·K + G·E); dK = scale·dSᵀ·Q; dE = scale·sum_b Gᵀ·Q;
  dW_q = dQᵀ·x and db_q = column sums of dQ over all B·T rows (likewise k, v);
  dx = dQ·W_q + dK·W_k + dV·W_v.
Every case is also checked here by central finite differences of L = sum(dY∘Y) (float64,
h = 1e-6) on a few entries of x and of every parameter, and Σ_j dS_ij = 0 per row.

Manifest schema (manifest.json; paths relative to the folder holding it)
------------------------------------------------------------------------
A file ref is {"file": str, "dtype": "<f4" | "<f8" | "|b1", "shape": [int]}.
{
  "schema_version": 1,
  "generator": "Scripts/make_relpos_grad_fixtures.py",
  "conventions": [str],
  "cases": [Case]
}
Case = {
  "name": str, "description": str,
  "batch": B, "length": T, "d_model": D, "max_rel": M,
  "causal": bool, "keep": ref |b1 [B, T, T] | null,
  "fully_masked_rows": int,          # rows (b, i) whose every key is masked
  "x": ref <f4 [B, T, D], "grad_output": ref <f4 [B, T, D],
  "parameters": {state_dict name: ref <f4},  # W_q.weight, W_q.bias, ..., relative_embeddings.weight
  "expected": {"output": ref <f8 [B, T, D], "x": ref <f8 [B, T, D],
               "dq": ref <f8 [B, T, D], "dk": ref <f8 [B, T, D], "dv": ref <f8 [B, T, D],
               state_dict name: ref <f8 (the parameter's shape), ...}
}
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import (FIXTURES, Writer, assert_finite, f32, relative_index,  # noqa: E402
                        rng_factory, write_cases)

OUT = FIXTURES / "relpos_grad"
PREFIX = "relpos_grad__"
SIZE_LIMIT = 1024 * 1024  # the whole folder, bytes (1 MiB)
NAMES = ["W_q.weight", "W_q.bias", "W_k.weight", "W_k.bias", "W_v.weight", "W_v.bias",
         "relative_embeddings.weight"]

rng_for = rng_factory("relpos_grad/")


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


class Problem:
    """The module, x, dY and the mask in float64."""

    def __init__(self, params: dict, x, dy, visible, m: int):
        self.p = {n: np.asarray(a, dtype=np.float64) for n, a in params.items()}
        self.x = np.asarray(x, dtype=np.float64)
        self.dy = np.asarray(dy, dtype=np.float64)
        self.visible = visible  # bool [B, T, T]
        self.m = m
        self.d = self.x.shape[-1]
        self.scale = 1.0 / np.sqrt(self.d)
        self.rel = relative_index(self.x.shape[1], m)

    def forward(self, p=None, x=None):
        p = self.p if p is None else p
        x = self.x if x is None else x
        q = x @ p["W_q.weight"].T + p["W_q.bias"]
        k = x @ p["W_k.weight"].T + p["W_k.bias"]
        v = x @ p["W_v.weight"].T + p["W_v.bias"]
        emb = p["relative_embeddings.weight"][self.rel]          # the notebook's [T, T, D] gather
        s = (q @ np.swapaxes(k, -1, -2) + np.einsum("bqd,qkd->bqk", q, emb)) * self.scale
        s = np.where(self.visible, s, -np.inf)
        peak = s.max(axis=-1, keepdims=True)
        dead = ~np.isfinite(peak)
        e = np.exp(s - np.where(dead, 0.0, peak))
        e = np.where(self.visible, e, 0.0)
        total = e.sum(axis=-1, keepdims=True)
        prob = np.where(dead, 0.0, e / np.where(total == 0, 1.0, total))
        return q, k, v, prob, prob @ v

    def loss(self, p=None, x=None) -> float:
        return float(np.sum(self.dy * self.forward(p, x)[-1]))

    def backward(self):
        q, k, v, prob, y = self.forward()
        dy, scale, m = self.dy, self.scale, self.m
        t = q.shape[1]
        dv = np.swapaxes(prob, -1, -2) @ dy
        dp = dy @ np.swapaxes(v, -1, -2)
        ds = prob * (dp - np.sum(dp * prob, axis=-1, keepdims=True))
        width = 2 * m + 1
        g = np.zeros(q.shape[:2] + (width,))
        for i in range(t):
            for j in range(t):
                g[:, i, self.rel[i, j]] += ds[:, i, j]
        e = self.p["relative_embeddings.weight"]
        dq = scale * (ds @ k + g @ e)
        dk = scale * np.swapaxes(ds, -1, -2) @ q
        de = scale * np.einsum("bir,bid->rd", g, q)
        x2 = self.x.reshape(-1, self.d)
        grads = {"relative_embeddings.weight": de}
        dx = np.zeros_like(x2)
        for name, gr in (("W_q", dq), ("W_k", dk), ("W_v", dv)):
            g2 = gr.reshape(-1, self.d)
            grads[name + ".weight"] = g2.T @ x2
            grads[name + ".bias"] = g2.sum(axis=0)
            dx += g2 @ self.p[name + ".weight"]
        grads["x"] = dx.reshape(self.x.shape)
        return y, dq, dk, dv, ds, grads


def finite_difference_check(name: str, prob: Problem, grads: dict, rng) -> None:
    h = 1e-6
    for tensor in ["x"] + NAMES:
        base = prob.x if tensor == "x" else prob.p[tensor]
        for _ in range(3):
            idx = tuple(int(rng.integers(0, n)) for n in base.shape)
            if tensor == "relative_embeddings.weight":   # a row the sequence reads, ends included
                rows = np.unique(prob.rel)
                idx = (int(rows[rng.integers(0, len(rows))]),) + idx[1:]
            values = []
            for sign in (1, -1):
                if tensor == "x":
                    x = prob.x.copy()
                    x[idx] += sign * h
                    values.append(prob.loss(x=x))
                else:
                    p = dict(prob.p)
                    p[tensor] = prob.p[tensor].copy()
                    p[tensor][idx] += sign * h
                    values.append(prob.loss(p=p))
            fd = (values[0] - values[1]) / (2 * h)
            analytic = grads[tensor][idx]
            scale = max(1.0, np.abs(grads[tensor]).max())
            if abs(fd - analytic) > 1e-6 * scale:
                raise AssertionError(f"{name} {tensor}{list(idx)}: fd {fd}, analytic {analytic}")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def case(name, description, b, t, d, m, causal=False, keep=None):
    rng = rng_for(name)
    bound = 1 / np.sqrt(d)
    params = {}
    for proj in ("W_q", "W_k", "W_v"):
        params[proj + ".weight"] = f32(rng.uniform(-bound, bound, (d, d)))
        params[proj + ".bias"] = f32(rng.uniform(-bound, bound, (d,)))
    params["relative_embeddings.weight"] = f32(rng.standard_normal((2 * m + 1, d)))
    x = f32(rng.standard_normal((b, t, d)))
    dy = f32(rng.standard_normal((b, t, d)))
    if keep == "random":
        keep = rng.random((b, t, t)) < 0.7
        keep[:, :, 0] = True
        keep[-1, t // 2, :] = False   # a fully masked row
    return {"name": name, "description": description, "b": b, "t": t, "d": d, "m": m,
            "causal": causal, "keep": keep, "params": params, "x": x, "dy": dy}


def all_cases():
    return [
        case("m_smaller_than_t", "B 2, T 12, D 16, M 3: clipped columns sum many keys",
             2, 12, 16, 3),
        case("m_larger_than_t", "B 1, T 7, D 8, M 10: the table's ends are never read",
             1, 7, 8, 10),
        case("m_zero", "B 2, T 5, D 4, M 0: one embedding for every pair", 2, 5, 4, 0),
        case("keep_fully_masked_row", "B 2, T 9, D 8, M 2, random keep mask, row 4 of batch 1 "
             "fully masked", 2, 9, 8, 2, keep="random"),
        case("causal", "B 3, T 10, D 12, M 4, causal", 3, 10, 12, 4, causal=True),
    ]


def write_case(w: Writer, c: dict) -> dict:
    b, t, d, m = c["b"], c["t"], c["d"], c["m"]
    prefix = PREFIX + c["name"] + "__"
    visible = np.ones((b, t, t), dtype=bool)
    if c["causal"]:
        visible &= np.tril(np.ones((t, t), dtype=bool))[None]
    if c["keep"] is not None:
        visible &= c["keep"]
    entry = {"name": c["name"], "description": c["description"], "batch": b, "length": t,
             "d_model": d, "max_rel": m, "causal": c["causal"],
             "keep": None if c["keep"] is None else w.npy(prefix + "keep.npy", c["keep"], "|b1"),
             "x": w.npy(prefix + "x.npy", c["x"], "<f4"),
             "grad_output": w.npy(prefix + "grad_output.npy", c["dy"], "<f4"),
             "parameters": {n: w.npy(prefix + n + ".npy", c["params"][n], "<f4")
                            for n in NAMES}}
    prob = Problem(c["params"], c["x"], c["dy"], visible, m)
    y, dq, dk, dv, ds, grads = prob.backward()
    assert_finite(c["name"], [("y", y), ("ds", ds)] + list(grads.items()))
    np.testing.assert_allclose(ds.sum(axis=-1), 0, atol=1e-12)
    dead = ~visible.any(axis=-1)
    assert np.all(dq[dead] == 0)
    finite_difference_check(c["name"], prob, grads, rng_for(c["name"] + "/fd"))
    entry["fully_masked_rows"] = int(dead.sum())
    expected = {"output": w.npy(prefix + "expected_output.npy", y, "<f8"),
                "x": w.npy(prefix + "expected_dx.npy", grads["x"], "<f8"),
                "dq": w.npy(prefix + "expected_dq.npy", dq, "<f8"),
                "dk": w.npy(prefix + "expected_dk.npy", dk, "<f8"),
                "dv": w.npy(prefix + "expected_dv.npy", dv, "<f8")}
    for n in NAMES:
        expected[n] = w.npy(prefix + "expected_" + n + ".npy", grads[n], "<f8")
    entry["expected"] = expected
    return entry


CONVENTIONS = [
    "x, dY [B, T, D]; W_* [D, D] ([out, in]); b_* [D]; relative_embeddings.weight [2M + 1, D].",
    "Inputs are float32 (<f4) from numpy default_rng(crc32('relpos_grad/' + name)); references "
    "are float64 (<f8) computed from the float32 inputs cast to float64, scale = 1/sqrt(D).",
    "S_ij = scale·(q_i·k_j + q_i·E[clip(j - i, -M, M) + M]); keep False or causal (j > i) masks; "
    "a fully masked row gives P = 0.",
    "Gradients of L = sum(dY∘Y): dV = Pᵀ·dY; dS = P∘(dP - rowsum(dP∘P)), dP = dY·Vᵀ; "
    "G_ir = Σ_{j: r(i,j) = r} dS_ij; dQ = scale·(dS·K + G·E); dK = scale·dSᵀ·Q; "
    "dE = scale·Σ_b Gᵀ·Q; dW = dGᵀ·x, db = Σ_rows dG; dx = dQ·W_q + dK·W_k + dV·W_v.",
]


def main() -> None:
    write_cases(Writer(OUT), __file__, CONVENTIONS, all_cases(), write_case, size_limit=SIZE_LIMIT)


if __name__ == "__main__":
    main()
