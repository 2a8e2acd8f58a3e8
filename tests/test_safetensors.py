"""Safetensors reader (csrc/io/safetensors.c through gemma3.safetensors): hostile files raise the
documented exception with a useful message; valid files from the `safetensors` package read back
bit-exact; views are read-only and keep the mapping alive."""

import gc
import json
import struct

import numpy as np
import pytest

import gemma3
from gemma3.safetensors import SafetensorsFile


def write(tmp_path, header, data=b"", name="t.safetensors", length=None):
    """header: dict (JSON-encoded), str or bytes (written verbatim)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", n) + header + data)
    return p


def entry(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


FE, UE = gemma3.FormatError, gemma3.UnsupportedError
T = '{"t":{"dtype":"F32","shape":%s,"data_offsets":%s}}'

# (id, header, data, length override, exception, message regex)
HOSTILE = [
    ("empty-file", None, b"", None, FE, "0 bytes is too short"),
    ("short-length", None, b"\x01\x02\x03", None, FE, "3 bytes is too short"),
    ("length-past-eof", "{}", b"", 1000, FE, "header length 1000 runs past the end"),
    ("length-huge", "{}", b"", 2**63, FE, "exceeds the 100000000-byte limit"),
    ("length-zero", "", b"", None, FE, "header length is 0"),
    ("non-object-array", "[]", b"", None, FE, "must be a JSON object"),
    ("non-object-string", '"x"', b"", None, FE, "must be a JSON object"),
    ("truncated-json", '{"t":', b"", None, FE, "value expected at byte 5 \\(end of header\\)"),
    ("truncated-header-mid-entry", '{"t":{"dtype":"F32","sha', b"", None, FE, "unterminated"),
    ("trailing-comma", '{"a":"b",}', b"", None, FE, "expected a string key"),
    ("missing-colon", '{"a" "b"}', b"", None, FE, "expected ':'"),
    ("trailing-garbage", "{} x", b"", None, FE, "trailing data after the header object"),
    ("second-object", "{}{}", b"", None, FE, "trailing data"),
    ("unterminated-string", '{"abc', b"", None, FE, "unterminated string"),
    ("bad-escape", '{"a\\x":1}', b"", None, FE, "invalid escape"),
    ("short-unicode-escape", '{"\\u12":1}', b"", None, FE, "4 hex digits"),
    ("lone-high-surrogate", '{"\\ud800":1}', b"", None, FE, "high surrogate"),
    ("high-then-non-low", '{"\\ud800\\u0041":1}', b"", None, FE, "high surrogate"),
    ("lone-low-surrogate", '{"\\udc00":1}', b"", None, FE, "lone low surrogate"),
    ("invalid-utf8", b'{"\xff":1}', b"", None, FE, "invalid UTF-8"),
    ("overlong-utf8", b'{"\xc0\x80":1}', b"", None, FE, "invalid UTF-8"),
    ("utf8-surrogate", b'{"\xed\xa0\x80":1}', b"", None, FE, "invalid UTF-8"),
    ("truncated-utf8", b'{"\xe2\x82":1}', b"", None, FE, "invalid UTF-8"),
    ("control-char", '{"a\nb":1}', b"", None, FE, "control character"),
    ("non-ascii-outside-string", b'{\xc3\xa9}', b"", None, FE, "expected a string key"),
    ("leading-zero", T % ("[01]", "[0,4]"), b"\0" * 4, None, FE, "leading zero"),
    ("bad-literal", '{"a":tru}', b"", None, FE, "invalid literal"),
    ("bare-minus", T % ("[-]", "[0,4]"), b"", None, FE, "invalid number"),
    ("duplicate-tensor", '{"t":' + json.dumps(entry()) + ',"t":' + json.dumps(entry()) + "}",
     b"\0" * 8, None, FE, 'duplicate key "t"'),
    ("duplicate-field", '{"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
     b"\0" * 8, None, FE, 'duplicate key "dtype"'),
    ("duplicate-metadata", '{"__metadata__":{"k":"a","k":"b"}}', b"", None, FE,
     'duplicate key "k"'),
    ("deep-nesting", '{"t":' + "[" * 40 + "]" * 40 + "}", b"", None, FE, "nested deeper"),
    ("deep-objects", '{"a":' * 40 + "1" + "}" * 40, b"", None, FE, "nested deeper"),
    ("long-array", T % ("[" + ",".join(["1"] * 17) + "]", "[0,4]"), b"", None, FE,
     "more than 16 elements"),
    ("unknown-dtype", {"t": entry("F8_E4M3", (2,), (0, 2))}, b"\0" * 2, None, UE,
     "tensor 't' has dtype \"F8_E4M3\""),
    ("unknown-dtype-u32", {"w": entry("U32", (1,), (0, 4))}, b"\0" * 4, None, UE,
     "tensor 'w' has dtype \"U32\""),
    ("dtype-not-string", {"t": entry(7)}, b"\0" * 8, None, FE, "dtype must be a string"),
    ("negative-dim", T % ("[-2]", "[0,8]"), b"\0" * 8, None, FE, "is negative \\(-2\\)"),
    ("float-dim", T % ("[2.0]", "[0,8]"), b"\0" * 8, None, FE, "must be an integer, got non-int"),
    ("exponent-dim", T % ("[2e0]", "[0,8]"), b"\0" * 8, None, FE, "must be an integer"),
    ("bool-dim", T % ("[true]", "[0,4]"), b"\0" * 4, None, FE, "must be an integer, got true"),
    ("huge-dim", T % ("[18446744073709551616]", "[0,8]"), b"", None, FE, "does not fit in 64"),
    ("dim-past-int64", T % ("[9223372036854775808]", "[0,8]"), b"", None, FE, "too large"),
    ("product-overflow", T % ("[4294967296,4294967296]", "[0,8]"), b"", None, FE,
     "element count of its shape overflows"),
    ("bytes-overflow", T % ("[4611686018427387904]", "[0,8]"), b"", None, FE,
     "byte size overflows"),
    ("shape-not-array", T % ('"2"', "[0,8]"), b"\0" * 8, None, FE, "shape must be an array"),
    ("offsets-past-eof", {"t": entry(offs=(0, 8))}, b"\0" * 4, None, FE,
     "run past the end of the 4-byte data region"),
    ("offsets-misordered", {"t": entry(offs=(8, 0))}, b"\0" * 8, None, FE, "misordered"),
    ("offsets-size-mismatch", {"t": entry(offs=(0, 12))}, b"\0" * 12, None, FE,
     "span 12 bytes but 2 elements of F32 need 8"),
    ("offsets-negative", {"t": entry(offs=(-8, 0))}, b"\0" * 8, None, FE, "negative"),
    ("offsets-float", T % ("[2]", "[0,8.0]"), b"\0" * 8, None, FE, "data_offsets\\[1\\] must be"),
    ("offsets-three", {"t": entry(offs=(0, 8, 8))}, b"\0" * 8, None, FE, "array of length > 2"),
    ("overlap", {"a": entry(offs=(0, 8)), "b": entry(offs=(4, 12))}, b"\0" * 12, None, FE,
     "'a' \\[0, 8\\) and 'b' \\[4, 12\\) overlap"),
    ("overlap-hidden-by-empty", {"a": entry(shape=(4,), offs=(0, 16)), "e": entry(shape=(0,),
     offs=(8, 8)), "b": entry(offs=(8, 16))}, b"\0" * 16, None, FE, "overlap"),
    ("missing-field", {"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, FE,
     'missing field "data_offsets"'),
    ("unknown-field", {"t": {**entry(), "extra": 1}}, b"\0" * 8, None, FE,
     'unknown field "extra"'),
    ("entry-not-object", {"t": [1]}, b"", None, FE, "entry must be an object, got array"),
    ("metadata-not-object", {"__metadata__": "x"}, b"", None, FE, "__metadata__ must be an obj"),
    ("metadata-non-string", {"__metadata__": {"k": 1}}, b"", None, FE,
     '__metadata__\\["k"\\] must be a string'),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile(tmp_path, case):
    _, header, data, length, exc, msg = case
    if header is None:
        p = tmp_path / "t.safetensors"
        p.write_bytes(data)
    else:
        p = write(tmp_path, header, data, length=length)
    with pytest.raises(exc, match=msg) as ei:
        SafetensorsFile(p)
    assert str(p) in str(ei.value)  # the message names the file
    if exc is FE:
        assert isinstance(ei.value, ValueError)


def test_hostile_count():
    assert len(HOSTILE) >= 20


def test_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(OSError):
        SafetensorsFile(tmp_path)


def test_process_keeps_working_after_many_failures(tmp_path):
    bad = write(tmp_path, '{"t":' + "[" * 40, name="bad.safetensors")
    good = write(tmp_path, {"t": entry()}, np.arange(2, dtype="<f4").tobytes(),
                 name="good.safetensors")
    for _ in range(300):
        with pytest.raises(FE):
            SafetensorsFile(bad)
    np.testing.assert_array_equal(SafetensorsFile(good).array("t"), [0, 1])


def test_escapes_and_unicode_names(tmp_path):
    name = 'a"\\/\b\f\n\r\t\u00e9\u4e2d\U0001F600'
    header = json.dumps({name: entry(), "__metadata__": {"k\u00e9": "v\U0001F600"}},
                        ensure_ascii=True)  # \u escapes incl. a surrogate pair
    p = write(tmp_path, header + "    ", np.array([1.5, -2], "<f4").tobytes())
    f = SafetensorsFile(p)
    assert list(f.tensors) == [name]
    assert f.metadata == {"k\u00e9": "v\U0001F600"}
    np.testing.assert_array_equal(f.array(name), [1.5, -2])
    # raw UTF-8 (not escaped) reads the same
    f2 = SafetensorsFile(write(tmp_path, json.dumps({name: entry()}, ensure_ascii=False),
                               np.array([1.5, -2], "<f4").tobytes(), name="u.safetensors"))
    assert list(f2.tensors) == [name]


def test_edge_shapes_and_gaps(tmp_path):
    data = np.array([7.0], "<f4").tobytes() + b"\0" * 4 + np.array([1, 2], "<i2").tobytes()
    p = write(tmp_path, {"scalar": entry(shape=(), offs=(0, 4)),
                         "empty": entry(shape=(3, 0), offs=(4, 4)),
                         "gap_after_pad": entry("I16", (2,), (8, 12))}, data)
    f = SafetensorsFile(p)
    assert f.tensors["scalar"].shape == ()
    assert f.array("scalar") == np.float32(7)
    assert f.array("empty").shape == (3, 0)
    np.testing.assert_array_equal(f.array("gap_after_pad"), [1, 2])
    assert f.metadata == {}


DTYPES = ["float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]


def test_written_by_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {}
    for i, dt in enumerate(DTYPES):
        shape = [(3, 5), (7,), (2, 3, 4), (1,), (0, 4), ()][i % 6]
        a = np.asarray(rng.standard_normal(shape) * 50)
        tensors[f"t.{dt}"] = np.asarray((a > 0) if dt == "bool" else a.astype(dt))
    p = tmp_path / "pkg.safetensors"
    st_numpy.save_file(tensors, str(p), metadata={"format": "np", "note": "é"})
    f = SafetensorsFile(p)
    assert f.metadata == {"format": "np", "note": "é"}
    assert set(f.tensors) == set(tensors)
    ref = st_numpy.load_file(str(p))
    for name, a in tensors.items():
        t = f.tensors[name]
        assert t.shape == a.shape
        raw = f.raw(name)
        assert raw.nbytes == a.nbytes
        np.testing.assert_array_equal(raw.view(a.dtype).reshape(a.shape), ref[name])
        np.testing.assert_array_equal(f.array(name), a.astype(np.float32))


def test_bf16(tmp_path):
    x = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    bits = (x.view(np.uint32) >> 16).astype("<u2")
    f = SafetensorsFile(write(tmp_path, {"b": entry("BF16", (2, 2), (0, 8))}, bits.tobytes()))
    np.testing.assert_array_equal(f.array("b").ravel(),
                                  (bits.astype(np.uint32) << 16).view(np.float32))


def test_views_read_only_and_alive(tmp_path):
    p = write(tmp_path, {"t": entry()}, np.array([3, 4], "<f4").tobytes())
    f = SafetensorsFile(p)
    v = f.raw("t")
    assert not v.flags.writeable
    with pytest.raises(ValueError):
        v[0] = 1
    del f
    gc.collect()
    np.testing.assert_array_equal(v.view("<f4"), [3, 4])  # the view keeps the mapping alive


@pytest.mark.parametrize("name", ["tiny", "tiny-scaled"])
def test_fixtures_match_pure_python_reading(name):
    """The committed transformers-written fixtures read the same as a plain JSON reading."""
    from pathlib import Path

    p = Path(__file__).parent / "fixtures" / "tiny" / name / "model.safetensors"
    f = SafetensorsFile(p)
    blob = p.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    assert f.metadata == header.pop("__metadata__", {})
    assert list(f.tensors) == list(header)
    for k, v in header.items():
        t = f.tensors[k]
        assert (t.dtype, list(t.shape)) == (v["dtype"], v["shape"])
        assert (t.begin, t.end) == (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
        assert bytes(f.raw(k)) == blob[t.begin:t.end]
