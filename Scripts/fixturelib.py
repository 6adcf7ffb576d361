"""What the numpy fixture scripts (Scripts/make_*_fixtures.py) share: writing .npy, safetensors
and manifest files with their file refs, seeding generators by name, float32 and bfloat16
rounding, and the pieces of the float64 attention references that are the same in every script.

Needs numpy only. The scripts import it from their own folder (running `python3
Scripts/make_X_fixtures.py` puts Scripts/ first on sys.path; a script imported from elsewhere
inserts its folder itself).

Conventions kept by every helper here (the committed fixtures depend on them byte for byte):
  - a file ref is {"file": rel, "dtype": numpy's dtype.str ("<f4", "<f8", "|b1", ...), "shape":
    [int]}, rel relative to the folder holding manifest.json;
  - .npy files are C-order, written by np.save(allow_pickle=False) to an open file;
  - manifest.json is json.dumps(manifest, indent=2) plus a newline, keys in insertion order,
    beginning with "schema_version": 1, "generator", "conventions".
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "Tests" / "_TestSupport" / "Fixtures"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def file_ref(rel: str, data: np.ndarray) -> dict:
    """The manifest's reference to the array `data` saved as `rel`."""
    return {"file": rel, "dtype": data.dtype.str, "shape": list(data.shape)}


def save_npy(path: Path, array, dtype: str | None = None) -> np.ndarray:
    """Save `array` (converted to `dtype` when given) C-order at `path`; return what was saved."""
    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(np.dtype(dtype), copy=False)
    data = np.ascontiguousarray(data)
    with open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)
    return data


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    """A safetensors file of float32 tensors: 8-byte little-endian header length, the JSON header
    {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}} (names sorted by their
    UTF-8 bytes, offsets relative to the data section, tensors packed in that order), padded
    with spaces to a multiple of 8 bytes, then the data. What safetensors' save gives for the
    same tensors and metadata (make_mha_fixtures.py --verify checks it)."""
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors, key=lambda n: n.encode()):
        data = np.ascontiguousarray(tensors[name], dtype="<f4")
        raw = data.tobytes()
        header[name] = {"dtype": "F32", "shape": list(data.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


class Writer:
    """Writes the fixture files of one folder and remembers them (the summary, the stale-file
    cleanup). A script that writes through it is deterministic and idempotent: re-running it
    rewrites byte-identical files and deletes the files in that folder it no longer produces.

    Writing a file twice is an error, except with `shared_files`, where writing the same name
    again with the same contents returns the first ref (inputs shared by cases). `nested`: the
    files may sit in subfolders (rel "sdpa/x.npy"); remove_stale then walks them and removes
    emptied folders. Without it, only the files directly in the folder are looked at."""

    def __init__(self, root: Path, *, shared_files: bool = False, nested: bool = False):
        self.root = root
        self.shared_files = shared_files
        self.nested = nested
        self.written: dict[str, int] = {}
        self.refs: dict[str, dict] = {}

    def _path(self, rel: str) -> Path:
        if rel in self.written:
            raise ValueError(f"fixture file written twice: {rel}")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def npy(self, rel: str, array, dtype: str) -> dict:
        """Save `array` as `dtype` ("<f4", "<f8", "|b1", "<f2", "<u2", "<i8"); return its ref."""
        if self.shared_files and rel in self.refs:
            data = np.ascontiguousarray(np.asarray(array).astype(np.dtype(dtype), copy=False))
            previous = np.load(self.root / rel)
            if previous.dtype != data.dtype or not np.array_equal(previous, data):
                raise ValueError(f"fixture file written twice with different contents: {rel}")
            return self.refs[rel]
        path = self._path(rel)
        data = save_npy(path, array, dtype)
        self.written[rel] = path.stat().st_size
        self.refs[rel] = file_ref(rel, data)
        return self.refs[rel]

    def safetensors(self, rel: str, tensors: dict[str, np.ndarray],
                    metadata: dict[str, str] | None = None, encode=safetensors_bytes) -> dict:
        """Save float32 tensors as a safetensors file, laid out by `encode(tensors, metadata)`
        (default safetensors_bytes; safetensors.numpy.save gives the same layout); return
        {"file", "dtype": "F32", "tensors": {name: shape}}."""
        path = self._path(rel)
        data = {k: np.ascontiguousarray(np.asarray(v).astype("<f4")) for k, v in tensors.items()}
        path.write_bytes(encode(data, metadata))
        self.written[rel] = path.stat().st_size
        return {"file": rel, "dtype": "F32", "tensors": {k: list(v.shape) for k, v in data.items()}}

    def json(self, rel: str, obj) -> None:
        """Save `obj` as JSON, indent 2, keys in insertion order, with a trailing newline."""
        path = self._path(rel)
        path.write_text(json.dumps(obj, indent=2) + "\n")
        self.written[rel] = path.stat().st_size

    def remove_stale(self) -> list[str]:
        """Delete the files of the folder this run did not write; return their rel paths."""
        stale = []
        paths = sorted(self.root.rglob("*") if self.nested else self.root.iterdir())
        for path in paths:
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and rel not in self.written:
                path.unlink()
                stale.append(rel)
        if self.nested:
            for path in sorted(self.root.rglob("*"), reverse=True):  # now-empty folders
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        return stale

    def finish(self, manifest: dict, *, counts: str | None = None, notes=(),
               size_limit: int | None = None) -> None:
        """Write manifest.json, delete stale files, check the folder's size and print a summary:
        "fixtures: <folder>", the `notes` lines, then "[counts, ]files: N, total K KiB"."""
        self.json("manifest.json", manifest)
        stale = self.remove_stale()
        total = sum(self.written.values())
        if size_limit is not None and total > size_limit:
            raise SystemExit(f"fixtures total {total} bytes, over the {size_limit} limit")
        print(f"fixtures: {self.root.relative_to(REPO)}")
        for note in notes:
            print(f"  {note}")
        print("  " + (f"{counts}, " if counts else "")
              + f"files: {len(self.written)}, total {total / 1024:.1f} KiB"
              + (f", removed {len(stale)} stale" if stale else ""))


def manifest_header(script: str, conventions: list[str]) -> dict:
    """The first keys of every manifest: schema_version 1, the generator ("Scripts/" and the
    name of `script`, a script's __file__) and the conventions."""
    return {"schema_version": 1, "generator": "Scripts/" + Path(script).name,
            "conventions": conventions}


def write_cases(w: Writer, script: str, conventions: list[str], cases: list[dict], write_case,
                *, size_limit: int) -> None:
    """The main of a script whose manifest is header + "cases": checks that the case names are
    unique, writes every case with write_case(w, case) (which returns its manifest entry) and
    finishes the folder (manifest.json, stale files, size limit, "cases: N, files: ..." line)."""
    unique_names(c["name"] for c in cases)
    manifest = {**manifest_header(script, conventions),
                "cases": [write_case(w, c) for c in cases]}
    w.finish(manifest, counts=f"cases: {len(cases)}", size_limit=size_limit)


def unique_names(names) -> list[str]:
    """`names` as a list, checked to hold no name twice."""
    names = list(names)
    assert len(set(names)) == len(names), "case names repeat"
    return names


def mask_refs(w: Writer, prefix: str, keep, bias) -> list[dict]:
    """The "masks" entry of an attention case: [{"kind": "keep", ref |b1}] for a bool keep mask
    (True = attend), then [{"kind": "bias", ref <f4}] for an additive float32 bias, saved as
    prefix + "keep.npy" and prefix + "bias.npy"; 0, 1 or 2 entries."""
    masks = []
    if keep is not None:
        assert keep.dtype == bool
        masks.append({"kind": "keep", **w.npy(prefix + "keep.npy", keep, "|b1")})
    if bias is not None:
        assert bias.dtype == np.float32
        masks.append({"kind": "bias", **w.npy(prefix + "bias.npy", bias, "<f4")})
    return masks


def assert_finite(case: str, arrays) -> None:
    """Fails with the case's and the array's names when one of the (name, array) pairs holds a
    NaN or an infinity."""
    for name, a in arrays:
        if not np.all(np.isfinite(a)):
            raise AssertionError(f"{case}: non-finite {name}")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def seeded_rng(key: str) -> np.random.Generator:
    """numpy's default_rng seeded with zlib.crc32 of `key`: a generator per case name, so cases
    do not depend on their order."""
    return np.random.default_rng(zlib.crc32(key.encode()))


def rng_factory(namespace: str):
    """rng_for(name) = seeded_rng(namespace + name), e.g. namespace "backward/"."""

    def rng_for(name: str) -> np.random.Generator:
        """A generator seeded by the case name, so cases do not depend on their order."""
        return seeded_rng(namespace + name)

    return rng_for


def f32(array) -> np.ndarray:
    """Round to float32 (through float64): what is saved and what the references start from."""
    return np.asarray(array, dtype=np.float64).astype(np.float32)


def bf16_bits(values) -> np.ndarray:
    """float32 values rounded to bfloat16 bit patterns (`<u2`): nearest, ties to even on the top
    16 bits; a NaN keeps its top bits with the quiet bit set."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = np.isnan(np.asarray(values, dtype=np.float32))
    rounded = np.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.astype("<u2")


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 bit patterns (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------------
# Attention references (float64)
# --------------------------------------------------------------------------------------------


def float32_scale(d: int, scale) -> float:
    """The scale the library uses: Float(scale), or 1 / Float(D).squareRoot() in float32."""
    if scale is None:
        return float(np.float32(1.0) / np.sqrt(np.float32(d)))
    return float(np.float32(scale))


def visible_keys(tq: int, tk: int, causal: bool, alignment: str, window) -> np.ndarray:
    """bool [Tq, Tk]: True where causality and the window let query i see key j. limit(i) = i
    ("top-left") or i + Tk - Tq ("bottom-right"); causal masks j > limit(i), a window W (which
    implies causal) also j <= limit(i) - W."""
    i = np.arange(tq)[:, None]
    j = np.arange(tk)[None, :]
    if not causal and window is None:
        return np.ones((tq, tk), dtype=bool)
    limit = i + (tk - tq if alignment == "bottom-right" else 0)
    seen = j <= limit
    if window is not None:
        seen &= j > limit - window
    return seen


def masked_softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax along the last axis of float64 scores that may hold -inf (row max subtracted
    first); a row that is all -inf gives zeros. [..., Tq, Tk] -> [..., Tq, Tk]."""
    row_max = scores.max(axis=-1, keepdims=True)
    live = np.isfinite(row_max)  # rows with at least one visible key
    e = np.exp(scores - np.where(live, row_max, 0.0))  # exp(-inf) = 0
    total = e.sum(axis=-1, keepdims=True)
    return np.where(live, e / np.where(live, total, 1.0), 0.0)


def relative_index(t: int, m: int) -> np.ndarray:
    """index[i, j] = clip(j - i, -M, M) + M (the notebook's code), int64 [T, T]."""
    pos = np.arange(t)
    return np.clip(pos[None, :] - pos[:, None], -m, m) + m
