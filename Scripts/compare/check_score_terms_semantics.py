#!/usr/bin/env python3
"""Checks the numpy semantics of Scripts/fixtures/make_score_terms_fixtures.py (soft-capping,
ALiBi, T5 buckets, attention sinks) against PyTorch and transformers, and its committed fixtures
(Tests/_TestSupport/Fixtures/score_terms/) against an independent torch float64 implementation.
Prints the tables; exits 1 when a check fails. Runs nothing of attn; not run by the tests.

    "$VENV/bin/python" Scripts/compare/check_score_terms_semantics.py
    ($VENV: the reference environment, set up by Scripts/reference-env.sh)

Needs torch, transformers and numpy.

  (a) T5 buckets: make_score_terms_fixtures.t5_bucket against transformers'
      T5Attention._relative_position_bucket on relative positions -3000...3000, for the cases'
      configurations, T5's usual ones, and a grid of (bidirectional, num_buckets 2..129,
      max_distance); every case's "buckets" file against T5Attention.compute_bias's buckets.
      Where they differ, the cause is torch's float32 log (not correctly rounded; t5_bucket uses
      the correctly rounded one): shown by redoing t5_bucket's arithmetic with torch's log.
      Also glibc's logf (Swift's log(Float) on Linux) against the correctly rounded log.
  (b) BLOOM's slopes: bloom_slopes(H) against transformers' _get_alibi_slopes and against
      build_alibi_tensor (slope = alibi[.., j] / j; alibi[.., j] == float32(slope·j)), H 1...16
      (and 17...64 reported).
  (c) soft-capping and sinks against transformers' eager code: Gemma 2's eager_attention_forward
      (softcap; as written, with its float32 softmax, and with the softmax kept in float64) on
      the soft-capped cases without sinks, position terms and masks given as its additive
      attention_mask; gpt-oss's eager_attention_forward (module.sinks) on the sink cases without
      soft-capping. Rows with every key masked are left out of Gemma 2's (its softmax gives
      NaN there); gpt-oss gives zeros there, as the fixtures do.
  (d) every case against a torch float64 implementation written here from the formulas (T5 bias
      from T5Attention.compute_bias with the case's table, BLOOM slopes from
      _get_alibi_slopes); plus, for the cases with neither sinks nor soft-capping, PyTorch's
      F.scaled_dot_product_attention (float64, enable_gqa) with the terms as a float mask, and
      for the ALiBi cases without sinks, BLOOM's own bias slope·j (build_alibi_tensor), which
      differs from slope·(j - i_abs) by a constant per row.
  (e) every case's gradients (dq, dk, dv, dsinks, dt5_table, dbias, ds) against torch float64
      autograd of L = Σ output∘grad_out through an eager forward written here: soft-cap by
      tanh, ALiBi, T5 (T5Attention.compute_bias, its relative_attention_bias.weight the leaf
      whose gradient is dt5_table) and the bias added, masked pairs -inf, sinks gpt-oss's way
      (a sink column concatenated to the logits, row max subtracted, softmax, the column
      dropped), fully masked rows zeroed; K and V repeated to H heads inside the graph (so dk
      and dv are summed over the G query heads) and the bias a leaf of its stored shape.
      Tolerance: max |Δ| <= 1e-10·max |torch's gradient| for each array.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.t5.modeling_t5 import T5Attention

ROOT = Path(__file__).resolve().parents[2]  # Scripts/compare/ -> the repository
sys.path.insert(0, str(ROOT / "Scripts" / "fixtures"))
import make_score_terms_fixtures as gen  # noqa: E402

FOLDER = ROOT / "Tests" / "_TestSupport" / "Fixtures" / "score_terms"
failures: list[str] = []


def check(ok: bool, what: str) -> str:
    if not ok:
        failures.append(what)
    return "ok" if ok else "FAIL"


def torch_buckets(rel: np.ndarray, bidirectional: bool, nb: int, md: int) -> np.ndarray:
    return T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional, nb,
                                                 md).numpy()


def buckets_with_torch_log(rel: np.ndarray, bidirectional: bool, nb: int, md: int):
    """t5_bucket's float32 arithmetic with torch.log in place of the correctly rounded log."""
    saved = gen.float32_log
    gen.float32_log = lambda x: torch.log(torch.from_numpy(
        np.ascontiguousarray(x, dtype=np.float32))).numpy()
    try:
        return gen.t5_bucket(rel, bidirectional, nb, md)
    finally:
        gen.float32_log = saved


def saved_bucket(rel, bidirectional, nb, md, log):
    """t5_bucket with `log` as its float32 log."""
    current = gen.float32_log
    gen.float32_log = log
    try:
        return gen.t5_bucket(rel, bidirectional, nb, md)
    finally:
        gen.float32_log = current


# --------------------------------------------------------------------------------------------
# Fixture cases
# --------------------------------------------------------------------------------------------


def load_cases() -> list[dict]:
    manifest = json.loads((FOLDER / "manifest.json").read_text())

    def load(ref):
        return None if ref is None else np.load(FOLDER / ref["file"])

    cases = []
    for e in manifest["cases"]:
        c = dict(e)
        c["q"], c["k"], c["v"] = load(e["q"]), load(e["k"]), load(e["v"])
        c["keep"] = c["bias"] = None
        for m in e["masks"]:
            c[m["kind"]] = load(m)
        c["slopes"] = None if e["alibi"] is None else load(e["alibi"]["slopes"])
        c["table"] = None if e["t5"] is None else load(e["t5"]["table"])
        c["buckets"] = None if e["t5"] is None else load(e["t5"]["buckets"])
        c["sinks_v"] = load(e["sinks"])
        c["out"] = load(e["expected"]["output"])
        c["weights"] = load(e["expected"]["weights"])
        c["sink_w"] = load(e["expected"]["sink_weights"])
        c["grads"] = {key: load(ref) for key, ref in e["gradients"].items()}
        cases.append(c)
    return cases


def t5_module(c) -> T5Attention:
    heads = c["heads"]
    nb = c["t5"]["num_buckets"]
    config = T5Config(d_model=8, d_kv=8, num_heads=heads, relative_attention_num_buckets=nb,
                      relative_attention_max_distance=c["t5"]["max_distance"],
                      is_decoder=not c["t5"]["bidirectional"])
    module = T5Attention(config, has_relative_attention_bias=True, layer_idx=0).double()
    with torch.no_grad():
        module.relative_attention_bias.weight.copy_(torch.from_numpy(c["table"]).double())
    return module


def pieces(c):
    """torch float64: q, k, v (K and V repeated to H heads), the position terms [1, H, Tq, Tk],
    the allowed pairs [B, H, Tq, Tk], the bias (or 0), i_abs offset. Written from the formulas,
    not from make_score_terms_fixtures."""
    q = torch.from_numpy(c["q"]).double()
    k = torch.from_numpy(c["k"]).double()
    v = torch.from_numpy(c["v"]).double()
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    offset = tk - tq if c["causal"] and c["alignment"] == "bottom-right" else 0
    assert offset == c["query_position_offset"]
    rel = torch.arange(tk)[None, :] - (torch.arange(tq)[:, None] + offset)
    terms = torch.zeros(1, h, tq, tk, dtype=torch.float64)
    if c["alibi"] is not None:
        slopes = torch.from_numpy(c["slopes"]).double()
        if c["alibi"]["bloom"]:
            bloom = _get_alibi_slopes(h, "cpu").double()
            assert torch.equal(bloom, slopes), c["name"]
        terms = terms + slopes[None, :, None, None] * rel
    if c["t5"] is not None:
        with torch.no_grad():
            terms = terms + t5_module(c).compute_bias(tq, tk, past_seen_tokens=offset)
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if c["causal"]:
        allowed &= rel <= 0
    if c["window"] is not None:
        allowed &= rel > -c["window"]
    if c["keep"] is not None:
        allowed = allowed & torch.from_numpy(c["keep"])
    bias = torch.zeros(1, dtype=torch.float64)
    if c["bias"] is not None:
        bias = torch.from_numpy(c["bias"]).double()
        allowed = allowed & (bias > -math.inf)
    allowed = allowed.expand(b, h, tq, tk)
    return q, k, v, terms, allowed, bias, offset


def torch_reference(c):
    """(output, weights, sink weights or None) in torch float64."""
    q, k, v, terms, allowed, bias, _ = pieces(c)
    g = c["group_size"]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) * c["scale_used"]
    if c["softcap"] is not None:
        s = c["softcap"] * torch.tanh(s / c["softcap"])
    s = (s + terms + bias).masked_fill(~allowed, -math.inf)
    dead = ~allowed.any(dim=-1, keepdim=True)
    sink_w = None
    if c["sinks_v"] is not None:
        sinks = torch.from_numpy(c["sinks_v"]).double()[None, :, None, None]
        logits = torch.cat([s, sinks.expand(*s.shape[:-1], 1)], dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)
        w, sink_w = probs[..., :-1], probs[..., -1:]
        sink_w = torch.where(dead, 0.0, sink_w)[..., 0]
    else:
        w = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)
    w = torch.where(dead, 0.0, w)
    return w @ v, w, sink_w


def max_diff(a, b, rows=None) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if rows is not None:
        a, b = a[rows], b[rows]
    return float(np.abs(a - b).max(initial=0.0))


class Stub(nn.Module):
    """What transformers' eager functions read from the attention module."""

    def __init__(self, c, sinks=None):
        super().__init__()
        self.num_key_value_groups = c["group_size"]
        self.head_dim = c["q"].shape[-1]
        if sinks is not None:
            self.sinks = nn.Parameter(torch.from_numpy(sinks).double())
        self.eval()


@contextmanager
def float64_softmax():
    """Gemma 2's eager code asks softmax for dtype=float32; keep float64 instead."""
    original = F.softmax

    def softmax(x, dim=None, dtype=None, **kw):
        return original(x, dim=dim, **kw)

    F.softmax = softmax
    try:
        yield
    finally:
        F.softmax = original


# --------------------------------------------------------------------------------------------


def part_a(cases) -> None:
    print("(a) T5 buckets: t5_bucket vs transformers' T5Attention._relative_position_bucket, "
          "relative positions -3000...3000")
    rel = np.arange(-3000, 3001, dtype=np.int64)
    configs = {(c["t5"]["bidirectional"], c["t5"]["num_buckets"], c["t5"]["max_distance"]):
               c["name"] for c in cases if c["t5"] is not None}
    usual = [(True, 32, 128), (False, 32, 128), (True, 64, 128), (False, 64, 256),
             (True, 16, 32), (True, 34, 27)]
    print(f"  {'bidir':>5} {'NB':>4} {'max_d':>5}  {'differ':>6}  {'max|Δbucket|':>12}  "
          f"{'f64 differs at':<22} case")
    for bi, nb, md in list(configs) + [u for u in usual if u not in configs]:
        ours = gen.t5_bucket(rel, bi, nb, md)
        theirs = torch_buckets(rel, bi, nb, md)
        wide = gen.t5_bucket_float64(rel, bi, nb, md)
        n = int((ours != theirs).sum())
        where = rel[(wide != theirs) & (np.abs(rel) < 200)].tolist()
        name = configs.get((bi, nb, md), "")
        status = check(n == 0, f"T5 buckets {bi, nb, md}") if name else ""
        note = ""
        if n and not name:
            at = sorted({abs(int(r)) for r in rel[ours != theirs]})[:4]
            note = f"(torch's log; |rel| {at})"
        print(f"  {bi!s:>5} {nb:>4} {md:>5}  {n:>6}  {int(np.abs(ours - theirs).max()):>12}  "
              f"{str(where[:4]):<22} {name} {status}{note}")

    grid = differ = differ_torch_log = 0
    examples = []
    for bi in (True, False):
        for nb in range(2, 130):
            for md in (2, 3, 4, 5, 7, 8, 10, 16, 20, 27, 32, 49, 64, 81, 100, 128, 200, 256,
                       512, 1000, 1024, 4096):
                n = nb // 2 if bi else nb
                if n // 2 == 0 or md <= n // 2:
                    continue  # max_distance <= max_exact: transformers divides by log(<= 1)
                grid += 1
                theirs = torch_buckets(rel, bi, nb, md)
                if not np.array_equal(gen.t5_bucket(rel, bi, nb, md), theirs):
                    differ += 1
                    if len(examples) < 4:
                        examples.append((bi, nb, md))
                    if not np.array_equal(buckets_with_torch_log(rel, bi, nb, md), theirs):
                        differ_torch_log += 1
    print(f"  grid of {grid} configurations: {differ} differ (e.g. {examples}); with torch's "
          f"log in t5_bucket's arithmetic: {differ_torch_log} differ "
          f"{check(differ_torch_log == 0, 'T5 arithmetic with torch log')}")
    for x in (1.5, 2.25, 2.625, 3.5):
        t = torch.log(torch.tensor([x], dtype=torch.float32)).item()
        print(f"    log({x}) float32: torch {t!r}, correctly rounded "
              f"{float(gen.float32_log(np.float32(x)))!r}")

    bad = 0
    for c in cases:
        if c["t5"] is None:
            continue
        tq, tk = c["q"].shape[2], c["k"].shape[2]
        offset = c["query_position_offset"]
        m = t5_module(c)
        context = torch.arange(tq)[:, None] + offset
        relpos = torch.arange(tk)[None, :] - context
        theirs = m._relative_position_bucket(relpos, bidirectional=not m.is_decoder,
                                             num_buckets=m.relative_attention_num_buckets,
                                             max_distance=m.relative_attention_max_distance)
        bad += int(not np.array_equal(theirs.numpy(), c["buckets"]))
    print(f"  the cases' buckets files vs compute_bias's positions: {bad} differ "
          f"{check(bad == 0, 'T5 bucket files')}")

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.logf.restype, libm.logf.argtypes = ctypes.c_float, [ctypes.c_float]
    args = sorted({np.float32(a) / np.float32(e) for e in range(1, 65) for a in range(e, 2049)})
    correct = gen.float32_log(np.array(args, dtype=np.float32))
    glibc = np.array([libm.logf(float(x)) for x in args], dtype=np.float32)
    torch_log = torch.log(torch.tensor(np.array(args, dtype=np.float32))).numpy()
    print(f"  float32 log of a / max_exact (a 1...2048, max_exact 1...64, {len(args)} "
          f"arguments): glibc logf differs from correctly rounded at "
          f"{int((glibc != correct).sum())}, torch.log at {int((torch_log != correct).sum())}")
    # What a port that calls logf (Swift's log(Float) on Linux) would give.
    saved = gen.float32_log
    gen.float32_log = lambda x: np.array([libm.logf(float(y)) for y in np.ravel(x)],
                                         dtype=np.float32).reshape(np.shape(x))
    try:
        small = np.arange(-300, 301, dtype=np.int64)
        glibc_differ = [(bi, nb, md) for bi in (True, False) for nb in range(2, 130)
                        for md in (16, 20, 27, 32, 49, 64, 81, 100, 128, 200, 256)
                        if (nb // 2 if bi else nb) // 2 >= 1 and md > (nb // 2 if bi else nb) // 2
                        and not np.array_equal(gen.t5_bucket(small, bi, nb, md),
                                               saved_bucket(small, bi, nb, md, saved))]
    finally:
        gen.float32_log = saved
    print(f"  buckets with glibc logf instead (relative positions -300...300, the grid's "
          f"max_distance 16...256): {len(glibc_differ)} configurations differ "
          f"{glibc_differ[:4]}")


def part_b() -> None:
    print("(b) BLOOM slopes: bloom_slopes(H) vs _get_alibi_slopes and build_alibi_tensor "
          "(alibi[h, j] = float32(slope_h·j), j 0...39)")
    worst = 0.0
    for heads in range(1, 65):
        ours = gen.bloom_slopes(heads)
        theirs = _get_alibi_slopes(heads, "cpu").numpy()
        t = 40
        alibi = build_alibi_tensor(torch.ones(1, t), heads, torch.float32).reshape(heads, t)
        rebuilt = torch.from_numpy(ours)[:, None] * torch.arange(t, dtype=torch.float32)
        exact = torch.equal(alibi, rebuilt)
        d1 = max_diff(ours, theirs)
        d2 = max_diff(alibi[:, 1].numpy(), ours)  # position 1: the slope itself
        d3 = float((alibi.double() - rebuilt.double()).abs().max())
        ulps = int(np.abs(ours.view(np.int32) - theirs.view(np.int32)).max())
        if heads <= 16:
            worst = max(worst, d1, d2, d3)
        if heads <= 16 or heads in (31, 32, 33, 48, 64):
            print(f"  H {heads:>2}: max|Δ slope| {d1:.1e} ({ulps} ulp), alibi[:, 1] vs slopes "
                  f"{d2:.1e}, max|alibi - float32(slope·j)| {d3:.1e} (equal: {exact})")
    differ = [h for h in range(1, 65)
              if not np.array_equal(gen.bloom_slopes(h), _get_alibi_slopes(h, "cpu").numpy())]
    print(f"  H 1...16: worst {worst:.1e} {check(worst == 0, 'BLOOM slopes')}; H 1...64 "
          f"differing (torch's float32 pow, one ulp at (2^-1/4)^15): {differ[0] if differ else '-'}"
          f"...{differ[-1] if differ else '-'} ({len(differ)} values of H)")


def part_c(cases) -> None:
    print("(c) transformers' eager attention: Gemma 2 (softcap), gpt-oss (sinks)")
    for c in cases:
        if c["softcap"] is None or c["sinks_v"] is not None:
            continue
        q, k, v, terms, allowed, bias, _ = pieces(c)
        mask = (terms + bias).masked_fill(~allowed, -math.inf)
        live = allowed.any(dim=-1).numpy()
        module = Stub(c)
        args = dict(attention_mask=mask, dropout=0.0, scaling=c["scale_used"],
                    softcap=c["softcap"])
        out32, w32 = modeling_gemma2.eager_attention_forward(module, q, k, v, **args)
        with float64_softmax():
            out64, w64 = modeling_gemma2.eager_attention_forward(module, q, k, v, **args)
        out32, out64 = out32.transpose(1, 2).numpy(), out64.transpose(1, 2).numpy()
        d64 = max(max_diff(out64, c["out"], live), max_diff(w64.numpy(), c["weights"], live))
        d32 = max(max_diff(out32, c["out"], live), max_diff(w32.numpy(), c["weights"], live))
        print(f"  gemma2  {c['name']:<30} live rows {int(live.sum()):>4}/{live.size:<4} "
              f"float64 softmax {d64:.1e} {check(d64 < 1e-13, 'gemma2 ' + c['name'])}, "
              f"as written (float32 softmax) {d32:.1e}")
    for c in cases:
        if c["sinks_v"] is None or c["softcap"] is not None:
            continue
        q, k, v, terms, allowed, bias, _ = pieces(c)
        mask = (terms + bias).masked_fill(~allowed, -math.inf)
        module = Stub(c, sinks=c["sinks_v"])
        with torch.no_grad():
            out, w = modeling_gpt_oss.eager_attention_forward(
                module, q, k, v, attention_mask=mask, scaling=c["scale_used"], dropout=0.0)
        d = max(max_diff(out.transpose(1, 2).numpy(), c["out"]),
                max_diff(w.numpy(), c["weights"]))
        print(f"  gpt-oss {c['name']:<30} all rows {c['weights'][..., 0].size:>4} "
              f"(fully masked {c['fully_masked_rows']}): {d:.1e} "
              f"{check(d < 1e-13, 'gpt-oss ' + c['name'])}")


def part_d(cases) -> None:
    print("(d) every case vs a torch float64 implementation (max |Δ| of output, weights, "
          "sink weights); SDPA and BLOOM's slope·j where they apply")
    for c in cases:
        out, w, sw = torch_reference(c)
        do = max_diff(out.numpy(), c["out"])
        dw = max_diff(w.numpy(), c["weights"])
        ds = 0.0 if sw is None else max_diff(sw.numpy(), c["sink_w"])
        line = (f"  {c['name']:<30} {'+'.join(c['terms']):<22} out {do:.1e}  w {dw:.1e}  "
                f"sink {ds:.1e} {check(max(do, dw, ds) < 1e-13, c['name'])}")
        q, k, v, terms, allowed, bias, _ = pieces(c)
        live = allowed.any(dim=-1).numpy()
        if c["softcap"] is None and c["sinks_v"] is None:
            mask = (terms + bias).masked_fill(~allowed, -math.inf)
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  scale=c["scale_used"], enable_gqa=True)
            dead = sdpa.numpy()[~live]
            dd = max_diff(sdpa.numpy(), c["out"], live)
            line += (f"; SDPA out {dd:.1e} {check(dd < 1e-13, 'sdpa ' + c['name'])} (fully "
                     f"masked rows: {'NaN' if np.isnan(dead).any() else 'zeros'})"
                     if dead.size else f"; SDPA out {dd:.1e} "
                     f"{check(dd < 1e-13, 'sdpa ' + c['name'])}")
        if c["alibi"] is not None and c["alibi"]["bloom"] and c["sinks_v"] is None:
            b, h, tq, tk = c["weights"].shape
            bloom = build_alibi_tensor(torch.ones(b, tk), h, torch.float64).reshape(b, h, 1, tk)
            shifted = dict(c)
            shifted["alibi"] = None  # the terms without ALiBi; BLOOM's bias as a float mask
            shifted["bias"] = (np.zeros((1,)) if c["bias"] is None else c["bias"].astype(
                np.float64)) + bloom.numpy()
            _, wb, _ = torch_reference(shifted)
            db = max_diff(wb.numpy(), c["weights"])
            line += f"; BLOOM slope·j {db:.1e} {check(db < 1e-13, 'bloom ' + c['name'])}"
        print(line)


GRADIENT_RTOL = 1e-10  # max |fixture - torch| <= GRADIENT_RTOL·max |torch|, per array


def torch_gradients(c) -> dict:
    """torch float64 autograd of L = Σ output∘grad_out: {"dq", "dk", "dv", "dsinks",
    "dt5_table", "dbias", "ds"} (None for the terms the case lacks). The forward is written here
    (not make_score_terms_fixtures'); the sinks as gpt-oss's eager attention adds them."""
    with torch.enable_grad():
        _, _, _, alibi, allowed, _, offset = pieces({**c, "t5": None, "bias": None})
        if c["bias"] is not None:  # -inf bias entries are masked pairs too
            allowed = allowed & torch.from_numpy(np.isfinite(c["bias"]))
        q = torch.from_numpy(c["q"]).double().requires_grad_()
        k = torch.from_numpy(c["k"]).double().requires_grad_()
        v = torch.from_numpy(c["v"]).double().requires_grad_()
        g = c["group_size"]
        s = (q @ k.repeat_interleave(g, dim=1).transpose(-1, -2)) * c["scale_used"]
        if c["softcap"] is not None:
            s = c["softcap"] * torch.tanh(s / c["softcap"])
        s = s + alibi
        table = bias = sinks = None
        if c["t5"] is not None:
            module = t5_module(c)
            table = module.relative_attention_bias.weight  # [NB, H], a leaf
            s = s + module.compute_bias(s.shape[2], s.shape[3], past_seen_tokens=offset)
        if c["bias"] is not None:
            bias = torch.from_numpy(c["bias"]).double().requires_grad_()
            s = s + bias
        s = s.masked_fill(~allowed, -math.inf)
        s.retain_grad()  # the final score: ds
        dead = ~allowed.any(dim=-1, keepdim=True)
        if c["sinks_v"] is not None:
            sinks = torch.from_numpy(c["sinks_v"]).double().requires_grad_()
            column = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
            logits = torch.cat([s, column], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            w = torch.softmax(logits, dim=-1)[..., :-1]
        else:
            w = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)
        w = torch.where(dead, 0.0, w)
        out = w @ v.repeat_interleave(g, dim=1)
        grad_out = torch.from_numpy(c["grads"]["grad_out"]).double()
        (out * grad_out).sum().backward()

    def grad(t):
        return None if t is None else t.grad.numpy()

    return {"dq": grad(q), "dk": grad(k), "dv": grad(v), "dsinks": grad(sinks),
            "dt5_table": grad(table), "dbias": grad(bias), "ds": grad(s)}


def part_e(cases) -> None:
    print("(e) every case's gradients vs torch float64 autograd of Σ output∘grad_out (max |Δ| / "
          f"max |torch| per array; tolerance {GRADIENT_RTOL:.0e})")
    worst_all = 0.0
    for c in cases:
        theirs = torch_gradients(c)
        ours = c["grads"]
        cells = []
        worst = 0.0
        for key, t in theirs.items():
            if t is None or ours[key] is None:
                ok = t is None and ours[key] is None
                check(ok, f"gradients {c['name']} {key}: present in one only")
                continue
            ok = t.shape == ours[key].shape and ours[key].dtype == np.float64
            check(ok, f"gradients {c['name']} {key}: shape {ours[key].shape} vs {t.shape}")
            error = max_diff(ours[key], t) / max(float(np.abs(t).max()), 1e-300)
            error = error if math.isfinite(error) else math.inf  # a NaN fails too
            worst = max(worst, error)
            cells.append(f"{key} {error:.0e}")
        worst_all = max(worst_all, worst)
        print(f"  {c['name']:<30} {'  '.join(cells)}  "
              f"{check(worst <= GRADIENT_RTOL, 'gradients ' + c['name'])}")
    print(f"  worst {worst_all:.1e}")


def main() -> None:
    torch.set_grad_enabled(False)
    cases = load_cases()
    part_a(cases)
    part_b()
    part_c(cases)
    part_d(cases)
    part_e(cases)
    print("all checks passed" if not failures else f"FAILED: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
