#!/usr/bin/env python3
"""Writes the .npy and safetensors fixtures of the AttentionKit I/O tests.

Usage: python3 Scripts/make_io_fixtures.py    (needs numpy and `pip install safetensors`)

Output: Tests/_TestSupport/Fixtures/io/
  - valid files written by numpy (np.save, numpy.lib.format.write_array) and by the safetensors
    reference implementation (safetensors.numpy.save_file; BF16 through safetensors.serialize,
    since numpy has no bfloat16: the script computes the BF16 bit patterns itself by rounding
    float32 to nearest-even, and the reference library lays out the file);
  - malformed files, built by hand from valid ones, one defect each (named bad_*);
  - expected.json: for every valid file, each tensor's shape, stored dtype and the float32 bit
    patterns numpy gives when converting the stored values (`astype(np.float32)`), so the Swift
    tests compare against numpy's conversion rather than against the Swift code's own output.
    Bit patterns, not numbers, because JSON has no NaN or infinity and to check -0.0 exactly.

Everything is deterministic: fixed values, and at most one metadata key per file written by the
reference library (it writes metadata in hash order, which changes between runs).
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat
import safetensors
from safetensors.numpy import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import FIXTURES, bf16_bits  # noqa: E402  (float32 -> bfloat16, NaN kept quiet)

OUT = FIXTURES / "io"


def float32_bits(array):
    """The float32 bit patterns of `array` converted by numpy, flattened in C order."""
    with np.errstate(over="ignore", invalid="ignore"):
        converted = np.ascontiguousarray(array).astype(np.float32)
    return [int(b) for b in converted.reshape(-1).view(np.uint32)]


def write(name, data):
    (OUT / name).write_bytes(data)


# ---------------------------------------------------------------------------------------------
# .npy


def npy_header_bytes(header_text, version=(1, 0)):
    """A .npy preamble for a hand-written header dict text, padded as numpy pads it."""
    length_format = "<H" if version == (1, 0) else "<I"
    encoded = header_text.encode("latin1" if version != (3, 0) else "utf8")
    with_newline = len(encoded) + 1
    padding = 64 - (6 + 2 + struct.calcsize(length_format) + with_newline) % 64
    return (b"\x93NUMPY" + bytes(version) + struct.pack(length_format, with_newline + padding)
            + encoded + b" " * padding + b"\n")


def make_npy(expected):
    valid = {
        "f4_2x3.npy": np.array([[0.0, -0.0, 1.5], [np.nan, np.inf, -3.25e-39]], dtype=np.float32),
        "f4_2x3x4.npy": (np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7).astype(np.float32),
        # 0.1 and 1/3 round; 1e300 overflows to inf; 2**-150 ties to 0 and 3·2**-151 to 2**-149;
        # 16777217 ties to the even 16777216; -1e-40 becomes a float32 subnormal.
        "f8_2x6.npy": np.array(
            [[0.1, -1e-40, 1e300, -1e300, np.nan, -np.inf],
             [1 / 3, 16777217.0, 2.0**-149, 2.0**-150, 3 * 2.0**-151, -0.0]], dtype=np.float64),
        "b1_2x2.npy": np.array([[True, False], [False, True]]),
        "scalar_f4.npy": np.array(3.5, dtype=np.float32),
        "vector_f4.npy": np.array([1, 2, 3, 4, 5], dtype=np.float32) * np.float32(0.25),
        "empty_f4.npy": np.zeros((0, 3), dtype=np.float32),
        # A header long enough that numpy's 20 spare spaces push the data to the next 64 bytes.
        "rank15_f4.npy": np.array([1.0, 2.0, 3.0], dtype=np.float32).reshape((1,) * 14 + (3,)),
        # A header that ends exactly on a 64-byte boundary, where numpy still adds 64 spaces.
        "aligned_f4.npy": (np.arange(100, dtype=np.float32) / 8).reshape((1,) * 11 + (10, 10, 1)),
        # Masks as integer arrays (what torch.tril(torch.ones(…, dtype=int64)).numpy() gives),
        # and float16 data (values exact in float32: a subnormal, the largest finite, inf).
        "i8_2x3.npy": np.array([[1, 0, 0], [1, 1, 0]], dtype="<i8"),
        "u1_2x2.npy": np.array([[1, 0], [0, 1]], dtype="|u1"),
        "i4_4.npy": np.array([-2, 0, 16777217, 7], dtype="<i4"),
        "f2_2x3.npy": np.array([[0.5, -0.0, 65504.0], [6e-8, -np.inf, 1 / 3]], dtype="<f2"),
    }
    for name, array in valid.items():
        np.save(OUT / name, array)
    versioned = {"v2_f4.npy": (2, 0), "v3_f4.npy": (3, 0)}
    v_array = np.array([[1.0, -2.0], [0.5, 1e-3]], dtype=np.float32)
    for name, version in versioned.items():
        with open(OUT / name, "wb") as f:
            npformat.write_array(f, v_array, version=version)
        valid[name] = v_array
    # Double quotes, no trailing comma, other spacing: still a dict literal numpy reads.
    dq_array = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    write("f4_double_quotes.npy",
          npy_header_bytes('{"descr": "<f4", "fortran_order": False, "shape": (2,2)}')
          + dq_array.tobytes())
    valid["f4_double_quotes.npy"] = dq_array

    for name, array in valid.items():
        loaded = np.load(OUT / name)  # numpy itself must read every valid file
        assert loaded.dtype == array.dtype and loaded.shape == array.shape, name
        expected[name] = {"dtype": array.dtype.str, "shape": list(array.shape),
                          "bits": float32_bits(loaded)}

    # Malformed: each should fail with a message naming the file.
    f4 = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(OUT / "bad_fortran.npy", np.asfortranarray(f4))
    np.save(OUT / "bad_big_endian.npy", f4.astype(">f4"))
    np.save(OUT / "bad_complex64.npy", np.arange(4, dtype="<c8"))
    good = (OUT / "f4_2x3.npy").read_bytes()
    write("bad_truncated.npy", good[:-4])
    write("bad_magic.npy", b"\x93NUMPZ" + good[6:])
    write("bad_version.npy", good[:6] + bytes([4, 0]) + good[8:])
    write("bad_header_length.npy", good[:8] + struct.pack("<H", 0xFFFF) + good[10:])
    write("bad_shape_mismatch.npy",  # (2, 2) needs 16 bytes; the file holds 6 floats
          npy_header_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }")
          + f4.tobytes())
    write("bad_bool_byte.npy",
          npy_header_bytes("{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }")
          + bytes([1, 2, 0]))
    write("bad_negative_dim.npy",
          npy_header_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 3), }")
          + f4.tobytes())
    write("bad_overflow_dim.npy",  # 2**62 · 4 elements overflows Int before anything is read
          npy_header_bytes("{'descr': '<f4', 'fortran_order': False, "
                           "'shape': (4611686018427387904, 4), }") + f4.tobytes())
    write("bad_missing_key.npy",
          npy_header_bytes("{'descr': '<f4', 'shape': (2, 3), }") + f4.tobytes())
    write("bad_header_syntax.npy",
          npy_header_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ")
          + f4.tobytes())
    for path in sorted(OUT.glob("bad_*.npy")):
        if path.name in ("bad_fortran.npy", "bad_big_endian.npy", "bad_complex64.npy",
                         "bad_bool_byte.npy", "bad_shape_mismatch.npy"):
            # numpy reads these (a bool byte 2 as True, trailing bytes ignored);
            # AttentionKit refuses them by design.
            continue
        try:
            np.load(path)
        except Exception:
            continue
        raise AssertionError(f"numpy reads {path.name}, which should be malformed")


# ---------------------------------------------------------------------------------------------
# safetensors


def serialize_bf16(name, bits, shape, metadata):
    """A safetensors file holding `bits` as BF16, laid out by the reference implementation."""
    try:
        spec = safetensors.TensorSpec(dtype="bfloat16", shape=list(shape),
                                      data_ptr=bits.ctypes.data, data_len=bits.nbytes)
        return bytes(safetensors.serialize({name: spec}, metadata))
    except AttributeError:  # safetensors < 0.8 took plain dicts
        spec = {"dtype": "BF16", "shape": list(shape), "data": bits.tobytes()}
        return bytes(safetensors.serialize({name: spec}, metadata))


def st_raw(header, data, length=None):
    """A safetensors file from a raw header (str or bytes), padded to 8 bytes like the reference."""
    if isinstance(header, str):
        header = header.encode("utf8")
    header += b" " * ((8 - len(header) % 8) % 8)
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def make_safetensors(expected):
    f32 = {
        "attn.k.weight": np.array([0.5, -1.25, 3.0], dtype=np.float32),
        "attn.q.weight": np.array([[1.0, 2.0, -0.0], [np.nan, -np.inf, 1e-45]], dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(7.0, dtype=np.float32),
    }
    f16_bits = np.array([0x0000, 0x8000, 0x3C00, 0xC000, 0x7BFF, 0x0400, 0x0001, 0x03FF,
                         0x7C00, 0xFC00, 0x7E00, 0x2E66, 0x4248, 0x8001], dtype="<u2")
    f16 = {"half": f16_bits.view(np.float16).reshape(2, 7)}
    f64 = {"double": np.array([0.1, -1e-40, 1e300, np.nan, 16777217.0, 2.0**-150],
                              dtype=np.float64).reshape(3, 2)}
    mixed = {
        "a_half": np.array([1.5, -2.0], dtype=np.float16),
        "b_float": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
        "c_double": np.array([0.25], dtype=np.float64),
    }
    files = {
        "f32.safetensors": (f32, {"format": "np"}),
        "f16.safetensors": (f16, {"note": "binary16 edge values"}),
        "f64.safetensors": (f64, None),
        "mixed.safetensors": (mixed, None),  # laid out F64, F32, F16: not in name order
    }
    for name, (tensors, metadata) in files.items():
        write(name, st_save(tensors, metadata=metadata))
        expected[name] = {
            "metadata": metadata or {},
            "tensors": {key: {"dtype": {"float32": "F32", "float16": "F16",
                                        "float64": "F64"}[value.dtype.name],
                              "shape": list(value.shape), "bits": float32_bits(value)}
                        for key, value in tensors.items()},
        }

    bf16_values = np.array([1.0, -2.5, 3.14159, 1e-40, np.inf, -np.inf, np.nan, -0.0,
                            3.3895314e38, 65504.0, 1.00390625, 1.01171875], dtype=np.float32)
    bits = bf16_bits(bf16_values)
    write("bf16.safetensors", serialize_bf16("brain", bits, (3, 4), {"format": "bf16"}))
    expected["bf16.safetensors"] = {
        "metadata": {"format": "bf16"},
        "tensors": {"brain": {"dtype": "BF16", "shape": [3, 4],
                              "bits": [int(b) << 16 for b in bits]}},
    }
    for name in list(files) + ["bf16.safetensors"]:
        safetensors.deserialize((OUT / name).read_bytes())  # the reference reads every valid file

    # Malformed: each should fail with a message naming the file (and the tensor, where any).
    w24 = np.arange(6, dtype=np.float32).tobytes()  # 24 bytes
    entry = '"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}'
    good = st_raw("{" + entry + "}", w24)
    bad = {
        "bad_short.safetensors": good[:5],
        "bad_header_length.safetensors": struct.pack("<Q", len(good)) + good[8:],
        "bad_header_huge.safetensors": struct.pack("<Q", 2**63) + good[8:],
        "bad_not_utf8.safetensors": st_raw(b'{"w\xff":{}}', w24),
        "bad_not_json.safetensors": st_raw('{"w":{"dtype":"F32",', w24),
        "bad_not_object.safetensors": st_raw("[1, 2]", w24),
        "bad_unknown_dtype.safetensors":
            st_raw('{"w":{"dtype":"Q7","shape":[2,3],"data_offsets":[0,24]}}', w24),
        "bad_unsupported_dtype.safetensors":
            st_raw('{"w":{"dtype":"I32","shape":[2,3],"data_offsets":[0,24]}}', w24),
        "bad_offsets_range.safetensors":
            st_raw('{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]}}', w24),
        "bad_offsets_reversed.safetensors":
            st_raw('{"w":{"dtype":"F32","shape":[0],"data_offsets":[24,0]}}', w24),
        "bad_overlap.safetensors":
            st_raw('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                   '"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}', w24),
        "bad_gap.safetensors":
            st_raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                   '"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}', w24),
        "bad_tail.safetensors":
            st_raw('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', w24),
        "bad_duplicate.safetensors":
            st_raw("{" + entry + "," + entry + "}", w24),
        "bad_size_mismatch.safetensors":
            st_raw('{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,24]}}', w24),
        "bad_negative_dim.safetensors":
            st_raw('{"w":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}}', w24),
        "bad_fractional_dim.safetensors":
            st_raw('{"w":{"dtype":"F32","shape":[2.5,3],"data_offsets":[0,24]}}', w24),
        "bad_huge_dim.safetensors":
            st_raw('{"w":{"dtype":"F32","shape":[99999999999999999999],'
                   '"data_offsets":[0,24]}}', w24),
        "bad_overflow_shape.safetensors":
            st_raw('{"w":{"dtype":"F32","shape":[4294967296,4294967296],'
                   '"data_offsets":[0,24]}}', w24),
        "bad_missing_field.safetensors": st_raw('{"w":{"dtype":"F32","shape":[2,3]}}', w24),
        "bad_metadata.safetensors":
            st_raw('{"__metadata__":{"format":1},' + entry + "}", w24),
        "bad_deep.safetensors":
            st_raw('{"__metadata__":' + "[" * 100 + "]" * 100 + "," + entry + "}", w24),
    }
    accepted_by_reference = []
    for name, data in bad.items():
        write(name, data)
        try:
            safetensors.deserialize(data)
            accepted_by_reference.append(name)
        except Exception:
            pass
    return accepted_by_reference


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in list(OUT.glob("*.npy")) + list(OUT.glob("*.safetensors")):
        old.unlink()
    expected_npy, expected_st = {}, {}
    make_npy(expected_npy)
    accepted = make_safetensors(expected_st)
    expected = {"numpy": np.__version__, "safetensors": safetensors.__version__,
                "npy": expected_npy, "safetensors_files": expected_st}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    if accepted:
        # Stricter than the reference is fine (we refuse more); report it so it is a decision.
        print("note: the safetensors reference accepts:", ", ".join(sorted(accepted)))


if __name__ == "__main__":
    main()
