"""GGUF reader and writer: parity with the gguf package, zero-copy views, hostile files.

- On the real 270M file, GGUFFile lists metadata and tensors exactly as gguf.GGUFReader does, and
  dequantizes every tensor bit-identically to gguf.quants.dequantize.
- raw() views are read-only, zero-copy, keep the mapping alive; close() refuses while one is alive.
- Opening maps the file without reading the weights (RSS growth measured in a fresh process).
- GGUFWriter output round-trips through our reader and through gguf.GGUFReader (independent).
- Hostile files (hand-built with struct, or truncated prefixes of a valid file) raise the documented
  exception with a message naming the problem -- never a crash -- and leave the reader usable.
"""

from __future__ import annotations

import errno
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import FormatError, GGUFFile, GGUFWriter, UnsupportedError

gguf = pytest.importorskip("gguf")

REGRESSIONS = Path(__file__).parent / "data" / "fuzz_regressions" / "gguf"
MODEL = gemma3.default_model_path()
needs_model = pytest.mark.skipif(not os.path.exists(MODEL), reason=f"{MODEL} not present")

# ---- gguf value type ids (reference digest §1.2) ----------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
# ggml type ids (§1.4)
T_F32, T_F16, T_Q4_0, T_Q8_0, T_Q4_K, T_Q6_K, T_BF16 = 0, 1, 2, 8, 12, 14, 30


# ---------------------------------------------------------------------------------------------
# The real 270M file against gguf.GGUFReader


@pytest.fixture(scope="module")
def model_pair():
    if not os.path.exists(MODEL):
        pytest.skip(f"{MODEL} not present")
    return GGUFFile(MODEL), gguf.GGUFReader(MODEL)


def reader_value(field):
    """(value, kind) of a gguf ReaderField: numeric arrays as one ndarray with the file's dtype."""
    t = field.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        et = field.types[-1] if len(field.types) > 1 else None
        if et == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data], "strings"
        if not field.data:
            return None, "empty"
        return np.concatenate([field.parts[i] for i in field.data]), "array"
    if t == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8"), "string"
    return field.parts[-1][0], "scalar"


def assert_value_equal(key, ours, field):
    theirs, kind = reader_value(field)
    if kind == "strings":
        assert ours == theirs, key
    elif kind == "empty":
        assert len(ours) == 0, key
    elif kind == "array":
        assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype.newbyteorder("="), key
        assert ours.tobytes() == theirs.tobytes(), key
    elif kind == "string":
        assert ours == theirs, key
    else:
        vt = field.types[0]
        if vt == gguf.GGUFValueType.BOOL:
            assert ours is bool(theirs), key
        elif vt in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
            assert isinstance(ours, float), key
            assert np.array(ours, theirs.dtype).tobytes() == theirs.tobytes(), key
        else:
            assert type(ours) is int and ours == int(theirs), key


@needs_model
def test_metadata_matches_gguf(model_pair):
    ours, theirs = model_pair
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    md = ours.metadata
    assert list(md) == list(fields)  # same keys, same (file) order
    for key, field in fields.items():
        assert_value_equal(key, md[key], field)
    assert ours.version == theirs.fields["GGUF.version"].parts[-1][0]
    assert len(md["tokenizer.ggml.tokens"]) == 262144


@needs_model
def test_tensor_infos_match_gguf(model_pair):
    ours, theirs = model_pair
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
        assert info.type == t.tensor_type.name and info.type_id == int(t.tensor_type), t.name
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name
        assert info.n_elements == t.n_elements, t.name


@needs_model
def test_dequantize_every_tensor_bit_identical(model_pair):
    ours, theirs = model_pair
    for t in theirs.tensors:
        mine = ours.dequantize(t.name)
        assert mine.dtype == np.float32 and mine.shape == ours.tensors[t.name].shape, t.name
        rows = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data[None]
        flat = mine.reshape(rows.shape[0], -1)
        step = 16384  # chunked: token_embd is 262144 x 640 (670 MB as float32)
        for r in range(0, rows.shape[0], step):
            ref = gguf.quants.dequantize(rows[r : r + step], t.tensor_type).astype(np.float32)
            got = flat[r : r + step].reshape(ref.shape)
            if not np.array_equal(got.view(np.uint32), ref.view(np.uint32)):
                bad = np.argwhere(got.view(np.uint32) != ref.view(np.uint32))
                at = tuple(bad[0])
                pytest.fail(f"{t.name} ({t.tensor_type.name}) rows {r}+: {len(bad)} mismatches, "
                            f"first at {list(at)}: {got[at]} vs {ref[at]}")


@needs_model
def test_raw_is_zero_copy_readonly_and_outlives_the_file():
    f = GGUFFile(MODEL)
    names = list(f.tensors)
    a, b = f.tensors[names[0]], f.tensors[names[1]]
    va, vb = f.raw(a.name), f.raw(b.name)
    assert va.dtype == np.uint8 and va.shape == (a.nbytes,)
    assert not va.flags.writeable and not va.flags.owndata
    with pytest.raises(ValueError):
        va[0] = 1
    with pytest.raises(ValueError):
        va.flags.writeable = True
    # base chain: ndarray -> _GGUFView (holds the mapping's owner), no intermediate copy
    assert type(va.base).__name__ == "_GGUFView"
    # one mapping: the two views are exactly their file offsets apart
    addr = lambda v: v.__array_interface__["data"][0]  # noqa: E731
    assert addr(vb) - addr(va) == b.offset - a.offset
    with open(MODEL, "rb") as fh:
        fh.seek(b.offset)
        expect = fh.read(b.nbytes)
    assert vb.tobytes() == expect
    del f  # the GGUFFile goes; the views keep the mapping
    import gc

    gc.collect()
    assert vb.tobytes() == expect
    assert int(va.sum(dtype=np.uint64)) >= 0


@needs_model
def test_close_refuses_while_a_view_is_alive():
    f = GGUFFile(MODEL)
    name = next(iter(f.tensors))
    v = f.raw(name)
    with pytest.raises(BufferError, match="view"):
        f.close()
    assert not f.closed
    v2 = f.raw(name)
    del v
    with pytest.raises(BufferError):
        f.close()
    del v2
    f.close()
    assert f.closed
    with pytest.raises(ValueError, match="closed"):
        f.raw(name)
    f.close()  # idempotent


@needs_model
def test_open_does_not_read_the_weights():
    prog = (
        "import os, sys, numpy, gemma3\n"
        "page = os.sysconf('SC_PAGE_SIZE')\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
        "r0 = rss()\n"
        "f = gemma3.GGUFFile(sys.argv[1]); t = f.tensors\n"
        "r1 = rss()\n"
        "print(r1 - r0, sum(x.nbytes for x in t.values()))\n"
    )
    out = subprocess.run([sys.executable, "-c", prog, MODEL], capture_output=True, text=True,
                         check=True).stdout.split()
    growth, tensor_bytes = int(out[0]), int(out[1])
    assert tensor_bytes > 200 * 2**20
    assert growth < 40 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB on open"


# ---------------------------------------------------------------------------------------------
# Writer round trip


def all_value_types():
    """key -> (value, type, elem_type) covering every GGUF value type, arrays of each, empties."""
    vals = {
        "t.u8": (255, "UINT8", None), "t.i8": (-128, "INT8", None),
        "t.u16": (65535, "UINT16", None), "t.i16": (-32768, "INT16", None),
        "t.u32": (2**32 - 1, "UINT32", None), "t.i32": (-(2**31), "INT32", None),
        "t.f32": (1.5, "FLOAT32", None), "t.bool_t": (True, "BOOL", None),
        "t.bool_f": (False, "BOOL", None), "t.u64": (2**64 - 1, "UINT64", None),
        "t.i64": (-(2**63), "INT64", None), "t.f64": (math.pi, "FLOAT64", None),
        "t.str": ("plain", None, None), "t.str_empty": ("", None, None),
        "t.str_unicode": ("héllo ✓ 🦙 語 \u0000 end", None, None),
        "t.ünïcode.kéy": ("key is unicode too", None, None),
        "t.arr_str": (["a", "", "ü🦙", "x" * 300], None, None),
        "t.arr_str_empty": ([], "ARRAY", "STRING"),
        "t.arr_bool": (np.array([True, False, True]), None, None),
    }  # fmt: skip
    for dt in ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "uint64",
               "int64", "float64"]:  # fmt: skip
        info = np.iinfo(dt) if dt[0] in "ui" else np.finfo(dt)
        vals[f"t.arr_{dt}"] = (np.array([info.min, 0, 1, info.max], dtype=dt), None, None)
        vals[f"t.arr_{dt}_empty"] = (np.array([], dtype=dt), None, None)
    vals["t.arr_bool_empty"] = (np.array([], dtype=bool), None, None)
    return vals


WRITER_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "BF16"]


def write_all_types(path, alignment=64, seed=0):
    rng = np.random.default_rng(seed)
    w = GGUFWriter(alignment=alignment)
    w.add("general.architecture", "test")
    for key, (v, t, et) in all_value_types().items():
        w.add(key, v, type=t, elem_type=et)
    tensors = {}
    for i, ty in enumerate(WRITER_TYPES):
        shape = (3, 512) if i % 2 else (2, 1, 256)
        x = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(f"w.{ty.lower()}", x, type=ty)
        tensors[f"w.{ty.lower()}"] = (ty, shape)
    w.write(path)
    return tensors


def test_writer_round_trip_our_reader_and_gguf(tmp_path):
    path = tmp_path / "all.gguf"
    tensors = write_all_types(path)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.alignment == 64 and theirs.alignment == 64
    md = ours.metadata
    expected = all_value_types()
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(md) == list(fields) == ["general.alignment", "general.architecture", *expected]
    for key, (v, _, _) in expected.items():
        assert_value_equal(key, md[key], fields[key])  # ours == gguf's
        if isinstance(v, np.ndarray):  # ... == what was written
            assert md[key].dtype == v.dtype and np.array_equal(md[key], v), key
        elif isinstance(v, float):
            assert md[key] == (float(np.float32(v)) if key == "t.f32" else v), key
        else:
            assert md[key] == v and type(md[key]) is type(v), key
    assert [t.name for t in theirs.tensors] == list(ours.tensors) == list(tensors)
    for t in theirs.tensors:
        ty, shape = tensors[t.name]
        info = ours.tensors[t.name]
        assert info.shape == shape and info.type == ty == t.tensor_type.name
        assert info.offset == t.data_offset and info.offset % 64 == 0
        assert ours.raw(t.name).tobytes() == t.data.tobytes()
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        assert np.array_equal(ours.dequantize(t.name).view(np.uint32), ref.view(np.uint32)), t.name


def test_writer_default_alignment_and_no_tensors(tmp_path):
    w = GGUFWriter()
    w.add("a", 1)
    (tmp_path / "m.gguf").write_bytes(w.to_bytes())
    f = GGUFFile(tmp_path / "m.gguf")
    assert f.alignment == 32 and f.tensors == {} and f.metadata == {"a": 1}
    assert len(gguf.GGUFReader(tmp_path / "m.gguf").tensors) == 0


# ---------------------------------------------------------------------------------------------
# Hostile files


def gstr(s: bytes | str, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length % 2**64) + b


def kv(key, vtype, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<i", vtype) + payload


def kv_u32(key, v):
    return kv(key, U32, struct.pack("<I", v))


def tinfo(name, dims, ttype=T_F32, offset=0, n_dims=None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return (gstr(name) + struct.pack("<I", n) + b"".join(struct.pack("<q", d) for d in dims)
            + struct.pack("<iQ", ttype, offset % 2**64))  # fmt: skip


def gguf_file(kvs=(), infos=(), data=b"", version=3, n_kv=None, n_tensors=None, align=32,
              pad=True) -> bytes:
    """Assembles a file by hand; counts default to the real ones and may be any 64-bit value."""
    nt = len(infos) if n_tensors is None else n_tensors
    nk = len(kvs) if n_kv is None else n_kv
    out = b"GGUF" + struct.pack("<IQQ", version, nt % 2**64, nk % 2**64)
    out += b"".join(kvs) + b"".join(infos)
    if pad and infos:
        out += b"\0" * (-len(out) % align)
    return out + data


F32_8 = tinfo("t", [8])  # one F32 tensor of 8 elements = 32 bytes
D32 = bytes(32)

# (id, file bytes, exception, message substring)
HOSTILE = [
    ("empty", b"", FormatError, "empty file"),
    ("magic_short", b"GGU", FormatError, "bad magic"),
    ("magic_bad", b"GGML" + bytes(20), FormatError, "bad magic"),
    ("magic_lower", b"gguf" + struct.pack("<IQQ", 3, 0, 0), FormatError, "bad magic"),
    ("version_0", gguf_file(version=0), FormatError, "version 0"),
    ("version_1", gguf_file(version=1), UnsupportedError, "version 1"),
    ("version_4", gguf_file(version=4), UnsupportedError, "version 4"),
    ("version_byteswapped", gguf_file(version=0x03000000), FormatError, "byte-swapped"),
    ("header_truncated_version", b"GGUF\3\0", FormatError, "version"),
    ("header_truncated_counts", b"GGUF" + struct.pack("<IQ", 3, 0) + b"\0\0", FormatError,
     "metadata count"),
    ("n_kv_2^63-1", gguf_file(n_kv=2**63 - 1), FormatError, "metadata count"),
    ("n_kv_2^64-1", gguf_file(n_kv=2**64 - 1), FormatError, "negative count"),
    ("n_kv_negative", gguf_file(n_kv=-5), FormatError, "negative count"),
    ("n_kv_past_eof", gguf_file([kv_u32("a", 1)], n_kv=2), FormatError, "cannot fit"),
    ("n_tensors_2^63-1", gguf_file(n_tensors=2**63 - 1), FormatError, "tensor count"),
    ("n_tensors_2^64-1", gguf_file(n_tensors=2**64 - 1), FormatError, "negative count"),
    ("n_tensors_2^62", gguf_file(n_tensors=2**62), FormatError, "tensor count"),
    ("n_tensors_past_eof", gguf_file(infos=[F32_8], n_tensors=2, pad=False), FormatError,
     "tensor count 2 cannot fit"),
    ("n_tensors_one_short", gguf_file(infos=[F32_8], n_tensors=2, pad=False) + bytes(30),
     FormatError, "tensor name '' at offset 57 has length 0"),
    ("key_len_past_eof", gguf_file([gstr("abc", 1000) + b"abc" + bytes(16)]), FormatError,
     "string length 1000"),
    ("key_len_2^64-1", gguf_file([gstr("abc", 2**64 - 1) + bytes(16)]), FormatError,
     "string length 18446744073709551615"),
    ("key_empty", gguf_file([kv_u32("", 1)]), FormatError, "empty key"),
    ("key_truncated_mid", gguf_file([kv("general.name", U8, b"\1")])[:-10], FormatError,
     "truncated"),
    ("key_duplicate", gguf_file([kv_u32("a.b", 1), kv_u32("c", 2), kv_u32("a.b", 3)]),
     FormatError, "duplicate key 'a.b'"),
    ("value_type_unknown_13", gguf_file([kv("k", 13, bytes(8))]), FormatError,
     "unknown value type 13"),
    ("value_type_negative", gguf_file([kv("k", -1, bytes(8))]), FormatError,
     "unknown value type -1"),
    ("value_truncated_u64", gguf_file([kv("k", U64, b"\1\2\3")]), FormatError, "k"),
    ("string_len_past_eof", gguf_file([kv("k", STRING, gstr("hello", 99))]), FormatError,
     "string length 99"),
    ("string_len_2^64-8", gguf_file([kv("k", STRING, gstr("x", 2**64 - 8))]), FormatError,
     "runs past the end"),
    ("array_nested", gguf_file([kv("k", ARRAY, struct.pack("<iQ", ARRAY, 1) + bytes(12))]),
     FormatError, "nested arrays"),
    ("array_elem_type_99", gguf_file([kv("k", ARRAY, struct.pack("<iQ", 99, 1) + bytes(8))]),
     FormatError, "unknown array element type 99"),
    ("array_count_past_eof", gguf_file([kv("k", ARRAY, struct.pack("<iQ", U32, 1000) + bytes(8))]),
     FormatError, "1000 values of UINT32"),
    ("array_count_2^64-1", gguf_file([kv("k", ARRAY, struct.pack("<iQ", U8, 2**64 - 1))]),
     FormatError, "run past the end"),
    # 2^61 * 8 bytes wraps to 0 if multiplied naively
    ("array_count_2^61_u64", gguf_file([kv("k", ARRAY, struct.pack("<iQ", U64, 2**61))]),
     FormatError, "run past the end"),
    ("array_str_count_2^63", gguf_file([kv("k", ARRAY, struct.pack("<iQ", STRING, 2**63))]),
     FormatError, "strings cannot fit"),
    ("array_str_elem_past_eof",
     gguf_file([kv("k", ARRAY, struct.pack("<iQ", STRING, 2) + gstr("ok") + gstr("no", 50))]),
     FormatError, "string length 50"),
    ("array_truncated_header", gguf_file([kv("k", ARRAY, struct.pack("<i", U8) + b"\1\0")]),
     FormatError, "array length"),
    ("alignment_48", gguf_file([kv_u32("general.alignment", 48)]), FormatError, "power of two"),
    ("alignment_0", gguf_file([kv_u32("general.alignment", 0)]), FormatError, "power of two"),
    ("alignment_u64", gguf_file([kv("general.alignment", U64, struct.pack("<Q", 32))]),
     FormatError, "must be UINT32"),
    ("alignment_string", gguf_file([kv("general.alignment", STRING, gstr("32"))]), FormatError,
     "must be UINT32"),
    ("tensor_name_empty", gguf_file(infos=[tinfo("", [8])], data=D32), FormatError, "length 0"),
    ("tensor_name_64", gguf_file(infos=[tinfo("n" * 64, [8])], data=D32), FormatError,
     "length 64"),
    ("tensor_name_duplicate", gguf_file(infos=[tinfo("w", [8]), tinfo("w", [8], offset=32)],
                                        data=D32 * 2), FormatError, "duplicate tensor name 'w'"),
    ("tensor_name_len_past_eof", gguf_file(infos=[gstr("w", 10**6) + b"w"]), FormatError,
     "tensor name"),
    ("tensor_n_dims_5", gguf_file(infos=[tinfo("w", [1, 1, 1, 1, 8])], data=D32), FormatError,
     "5 dimensions"),
    ("tensor_n_dims_2^32-1", gguf_file(infos=[tinfo("w", [8], n_dims=2**32 - 1)], data=D32),
     FormatError, "4294967295 dimensions"),
    ("tensor_dim_negative", gguf_file(infos=[tinfo("w", [8, -2])], data=D32), FormatError,
     "negative dimension -2"),
    ("tensor_dim_product_overflow", gguf_file(infos=[tinfo("w", [2**32, 2**32])], data=D32),
     FormatError, "overflows"),
    ("tensor_dim_product_overflow_4d",
     gguf_file(infos=[tinfo("w", [2**16, 2**16, 2**16, 2**16])], data=D32), FormatError,
     "overflows"),
    ("tensor_bytes_overflow", gguf_file(infos=[tinfo("w", [2**62])], data=D32), FormatError,
     "byte size overflows"),
    ("tensor_offset_past_eof", gguf_file(infos=[tinfo("w", [8], offset=64)], data=D32),
     FormatError, "runs past the end"),
    ("tensor_offset_2^64-32", gguf_file(infos=[tinfo("w", [8], offset=2**64 - 32)], data=D32),
     FormatError, "runs past the end"),
    ("tensor_data_past_eof", gguf_file(infos=[tinfo("w", [9])], data=D32), FormatError,
     "runs past the end"),
    ("tensor_offset_misaligned", gguf_file(infos=[tinfo("w", [8], offset=4)], data=D32 * 2),
     FormatError, "not a multiple of the alignment 32"),
    ("tensor_overlap", gguf_file(infos=[tinfo("a", [16]), tinfo("b", [8], offset=32)],
                                 data=D32 * 2), FormatError, "overlap"),
    ("tensor_overlap_same_offset", gguf_file(infos=[tinfo("a", [8]), tinfo("b", [8])], data=D32),
     FormatError, "overlap"),
    # an empty tensor between two overlapping ones used to hide the overlap (fixed in gguf.c)
    ("tensor_overlap_behind_empty",
     gguf_file(infos=[tinfo("a", [24]), tinfo("e", [0], offset=32), tinfo("b", [8], offset=64)],
               data=D32 * 3), FormatError, "tensors 'a' [0, 96) and 'b' [64, 96) overlap"),
    ("tensor_q4k_100_cols", gguf_file(infos=[tinfo("w", [100, 2], T_Q4_K)], data=bytes(288)),
     FormatError, "not a multiple of the Q4_K block size 256"),
    ("tensor_q8_0_33_cols", gguf_file(infos=[tinfo("w", [33], T_Q8_0)], data=bytes(64)),
     FormatError, "block size 32"),
    ("tensor_type_99", gguf_file(infos=[tinfo("blk.0.w", [8], 99)], data=D32), UnsupportedError,
     "tensor 'blk.0.w' has ggml type id 99"),
    ("tensor_type_removed_4", gguf_file(infos=[tinfo("blk.1.w", [32], 4)], data=D32),
     UnsupportedError, "tensor 'blk.1.w' has ggml type id 4 (Q4_2)"),
    ("tensor_type_removed_31", gguf_file(infos=[tinfo("blk.2.w", [32], 31)], data=D32),
     UnsupportedError, "tensor 'blk.2.w' has ggml type id 31"),
    ("tensor_type_negative", gguf_file(infos=[tinfo("w", [8], -1)], data=D32), UnsupportedError,
     "type id -1"),
    ("tensor_info_truncated_dims", gguf_file(infos=[tinfo("w", [8, 8])[:-20]], pad=False),
     FormatError, "truncated"),
    ("padding_truncated", gguf_file(infos=[F32_8], pad=False) + b"\0", FormatError, "padding"),
]


def test_hostile_suite_is_large_enough():
    assert len(HOSTILE) >= 30
    assert len({h[0] for h in HOSTILE}) == len(HOSTILE)


@pytest.fixture(scope="module")
def valid_small(tmp_path_factory):
    """A small valid file whose last tensor ends exactly at EOF (so every prefix is invalid)."""
    rng = np.random.default_rng(1)
    w = GGUFWriter()
    w.add("general.architecture", "test")
    w.add("k.str", "héllo")
    w.add("k.arr", np.arange(5, dtype=np.int32))
    w.add("k.strs", ["a", "bc", ""])
    w.add("k.f", 0.5)
    w.add_tensor("q8", rng.standard_normal((2, 64)).astype(np.float32), type="Q8_0")
    w.add_tensor("q4k", rng.standard_normal((1, 256)).astype(np.float32), type="Q4_K")
    w.add_tensor("last", rng.standard_normal(8).astype(np.float32))  # 32 bytes: no tail padding
    path = tmp_path_factory.mktemp("valid") / "small.gguf"
    w.write(path)
    return path


def check_valid(path):
    f = GGUFFile(path)
    assert list(f.tensors) == ["q8", "q4k", "last"] and f.metadata["k.strs"] == ["a", "bc", ""]
    assert f.dequantize("last").shape == (8,)


@pytest.mark.parametrize("case", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_file(case, tmp_path, valid_small):
    name, data, exc, substring = case
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    with pytest.raises(exc) as ei:
        GGUFFile(path)
    msg = str(ei.value)
    assert substring in msg, msg
    assert str(path) in msg  # names the file
    check_valid(valid_small)  # the reader is still usable


def test_documented_exception_classes():
    assert issubclass(FormatError, ValueError)
    assert issubclass(UnsupportedError, NotImplementedError)


def test_every_truncation_of_a_valid_file_fails_cleanly(tmp_path, valid_small):
    data = valid_small.read_bytes()
    f = GGUFFile(valid_small)
    assert f.tensors["last"].offset + f.tensors["last"].nbytes == len(data)
    path = tmp_path / "cut.gguf"
    kinds = set()
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(FormatError) as ei:
            GGUFFile(path)
        kinds.add(str(ei.value).split(": ", 1)[1].split(" ")[0])
    assert len(kinds) > 3  # header, keys, values, tensor infos, padding, data: varied messages
    check_valid(valid_small)


def test_every_single_byte_mutation_of_the_header_is_safe(tmp_path, valid_small):
    """Flip each byte before the data blob to 0xFF: any outcome but a crash or a wrong exception."""
    data = bytearray(valid_small.read_bytes())
    data_off = GGUFFile(valid_small).data_offset
    path = tmp_path / "mut.gguf"
    for i in range(data_off):
        m = bytearray(data)
        m[i] ^= 0xFF
        path.write_bytes(bytes(m))
        try:
            f = GGUFFile(path)
        except (FormatError, UnsupportedError):
            continue
        f.metadata  # noqa: B018 - must decode whatever was accepted
        for t in f.tensors:
            f.raw(t)
            try:
                f.dequantize(t)
            except UnsupportedError:
                pass


def test_missing_path_and_directory_raise_oserror(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError) as ei:
        GGUFFile(missing)
    assert ei.value.errno == errno.ENOENT and str(missing) in str(ei.value)
    with pytest.raises(IsADirectoryError) as ei:
        GGUFFile(tmp_path)
    assert ei.value.errno == errno.EISDIR and str(tmp_path) in str(ei.value)


def test_regression_files():
    """Inputs that once crashed or fooled the reader (fuzzer finds): each must raise cleanly or
    open and decode fully."""
    files = sorted(REGRESSIONS.glob("*.gguf"))
    assert files, f"no regression files in {REGRESSIONS}"
    for p in files:
        try:
            f = GGUFFile(p)
        except (FormatError, UnsupportedError):
            continue
        f.metadata  # noqa: B018
        for t in f.tensors:
            f.raw(t)
            try:
                f.dequantize(t)
            except UnsupportedError:
                pass


def test_non_utf8_names_are_reachable(tmp_path):
    """Names are listed with surrogate escapes; raw()/dequantize() accept those same strs."""
    path = tmp_path / "latin1.gguf"
    path.write_bytes(gguf_file([kv_u32(b"k\xe9y", 7)], [tinfo(b"w\xe9", [8])], D32))
    f = GGUFFile(path)
    (name,) = f.tensors
    assert name == "w\udce9" and f.metadata == {"k\udce9y": 7}
    assert f.raw(name).nbytes == 32 and f.dequantize(name).shape == (8,)
    with pytest.raises(KeyError, match="no tensor named"):
        f.raw("w")
    with pytest.raises(TypeError):
        f.raw(b"w\xe9")


def test_dequantize_of_a_type_without_kernel_is_unsupported(tmp_path):
    path = tmp_path / "iq2.gguf"
    path.write_bytes(gguf_file(infos=[tinfo("w.iq2", [256], 16)], data=bytes(96)))  # IQ2_XXS, 66 B
    f = GGUFFile(path)
    assert f.tensors["w.iq2"].type == "IQ2_XXS" and f.raw("w.iq2").nbytes == 66
    with pytest.raises(UnsupportedError, match="w.iq2.*IQ2_XXS"):
        f.dequantize("w.iq2")
