"""Block formats: _core.dequantize / quantize / type_info against the gguf package and NumPy twins.

- Dequantization of random blocks is bit-identical to gguf.quants.dequantize (the gguf package's
  NumPy implementation), for every type we decode and odd block counts.
- Quantization matches gguf.quants.quantize bit for bit where gguf has a quantizer (F16, BF16, Q8_0,
  Q4_0, Q4_1, Q5_0, Q5_1: the simple published rules), and stays within stated bounds everywhere.
- Bad arguments and unknown/removed types raise the documented exceptions.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import _core

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402
from reference import quant_ref as ref  # noqa: E402

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

TYPE_ID = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "IQ2_XXS": 16,
    "IQ4_NL": 20, "IQ4_XS": 23, "BF16": 30,
}  # fmt: skip
DEQUANT_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                 "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]  # fmt: skip
# byte offsets of the half-precision scale fields in each block (reference digest §2)
HALF_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0],
}  # fmt: skip
REMOVED_IDS = [4, 5, 31, 32, 33, 36, 37, 38]
N_BLOCKS = [1, 3, 31, 33, 257]
# finite halves worth hitting on purpose: extremes, the largest/smallest normal, a subnormal, zeros
SPECIAL_HALVES = np.array([6e4, -6e4, 65504, -65504, 6e-8, -6e-8, 2**-14, 2**-24, 0.0, -0.0, 1.0],
                          dtype=np.float16).view(np.uint16)  # fmt: skip


def info(name):
    return _core.type_info(TYPE_ID[name])


def random_finite_halves(rng, n):
    """(n,) uint16 half bit patterns: random finite values mixed with SPECIAL_HALVES."""
    h = rng.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
    h = np.where((h & 0x7C00) == 0x7C00, h & np.uint16(0xBFFF), h)  # exponent 31 -> 15: finite
    pick = rng.random(n) < 0.3
    return np.where(pick, rng.choice(SPECIAL_HALVES, n), h).astype(np.uint16)


def random_blocks(name, n_blocks, rng):
    """Random bytes for n_blocks blocks of `name`, every float field finite; (n_bytes,) uint8."""
    _, _, blck, size, _, _ = info(name)
    n = n_blocks * blck
    if name == "F32":
        u = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
        u = np.where((u & 0x7F800000) == 0x7F800000, u & np.uint32(0xBFFFFFFF), u)
        return u.astype(np.uint32).view(np.uint8)
    if name == "F16":
        return random_finite_halves(rng, n).view(np.uint8)
    if name == "BF16":
        u = rng.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
        u = np.where((u & 0x7F80) == 0x7F80, u & np.uint16(0xBFFF), u)
        return u.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in HALF_FIELDS[name]:
        raw[:, off : off + 2] = random_finite_halves(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def assert_bits_equal(got, want, what):
    """Bit-level equality of two float32 arrays; on failure report shape, count, first mismatches."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.nonzero(got.view(np.uint32) != want.view(np.uint32))[0]
    if bad.size:
        first = ", ".join(f"[{i}] {got[i]!r} vs {want[i]!r}" for i in bad[:5])
        diff = np.nanmax(np.abs(got.astype(np.float64) - want.astype(np.float64)))
        pytest.fail(f"{what}: {bad.size}/{got.size} differ, max diff {diff:g}; first: {first}")


# ---- type table ---------------------------------------------------------------------------------


def test_type_table_matches_gguf_sizes():
    for qtype, (blck, size) in GGML_QUANT_SIZES.items():
        name, known, b, s, _, _ = _core.type_info(int(qtype))
        assert (name, known) == (qtype.name, True)
        if qtype.name == "Q8_1":
            assert (b, s) == (32, 36)  # gguf-py lists 40; ggml's block_q8_1 is 2+2+32 bytes
        else:
            assert (b, s) == (blck, size), qtype.name


def test_type_table_covers_every_id():
    for t in range(43):
        name, known, blck, size, can_deq, can_q = _core.type_info(t)
        assert isinstance(name, str) and name
        if t in REMOVED_IDS:
            assert (known, blck, size, can_deq, can_q) == (False, 0, 0, False, False)
        else:
            assert known and blck >= 1 and size >= 1
    assert _core.type_info(42)[:4] == ("Q2_0", True, 64, 18)
    assert _core.type_info(16)[4:] == (False, False)  # IQ2_XXS: layout known, not decoded
    for name in DEQUANT_TYPES:
        assert info(name)[4], name


@pytest.mark.parametrize("bad", [-1, 43, 1000, 2**70, -(2**70)])
def test_type_info_unknown_id(bad):
    with pytest.raises(gemma3.UnsupportedError, match="unknown ggml type id"):
        _core.type_info(bad)


# ---- half / bfloat16 ----------------------------------------------------------------------------


def test_fp16_to_fp32_exhaustive():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _core.dequantize(TYPE_ID["F16"], h, h.size)
    assert_bits_equal(got, h.view(np.float16).astype(np.float32), "all 65536 halves")


def test_fp32_to_fp16_round_to_nearest_even():
    rng = np.random.default_rng(7)
    u = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    edges = np.array([65504, 65519.996, 65520, 65536, 1e9, 2**-14, 2**-24, 2**-25, 2**-25 * 1.0001,
                      3 * 2**-26, 2**-26, 1e-30, 0.0, 1 + 2**-11, 1 + 3 * 2**-11, np.inf],
                     dtype=np.float32)  # fmt: skip
    x = np.concatenate([u.view(np.float32), edges, -edges])
    got = _core.quantize(TYPE_ID["F16"], x).view(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    # NaN stays NaN and is quiet (as the x86 F16C instruction does; NumPy keeps signalling payloads)
    assert np.all((got[nan] & 0x7E00) == 0x7E00)


def test_bf16_matches_gguf_including_nan():
    rng = np.random.default_rng(8)
    u = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([u.view(np.float32), np.float32([np.inf, -np.inf, 3.4e38, 1e-40, -0.0])])
    got = _core.quantize(TYPE_ID["BF16"], x)
    want = gguf.quants.quantize(x, GGMLQuantizationType.BF16).reshape(-1)
    assert np.array_equal(got, want)


# ---- dequantization: bit-identical to gguf --------------------------------------------------------


@pytest.mark.parametrize("n_blocks", N_BLOCKS)
@pytest.mark.parametrize("name", DEQUANT_TYPES)
def test_dequantize_matches_gguf(name, n_blocks):
    rng = np.random.default_rng(1000 * TYPE_ID[name] + n_blocks)
    data = random_blocks(name, n_blocks, rng)
    n = n_blocks * info(name)[2]
    got = _core.dequantize(TYPE_ID[name], data, n)
    want = gguf.quants.dequantize(data, GGMLQuantizationType[name]).reshape(-1)
    assert got.dtype == np.float32 and got.shape == (n,)
    assert_bits_equal(got, want, f"{name} x {n_blocks} blocks")


@pytest.mark.parametrize("name", ["Q4_K", "F16", "Q8_0"])
def test_dequantize_accepts_buffers_at_any_offset(name):
    rng = np.random.default_rng(3)
    data = random_blocks(name, 5, rng)
    n = 5 * info(name)[2]
    want = _core.dequantize(TYPE_ID[name], data, n)
    for off in (1, 3):
        shifted = bytearray(off) + data.tobytes() + b"extra"  # trailing bytes are ignored
        got = _core.dequantize(TYPE_ID[name], memoryview(shifted)[off:], n)
        assert_bits_equal(got, want, f"offset {off}")
    assert_bits_equal(_core.dequantize(TYPE_ID[name], data.tobytes(), n), want, "bytes")


def test_dequantize_zero_elements():
    assert _core.dequantize(TYPE_ID["Q4_K"], b"", 0).shape == (0,)


# ---- quantization: bit-identical to gguf where it has a quantizer ---------------------------------


def quant_inputs(n_blocks, rng, blck=32):
    """Gaussian data plus blocks that stress edge rules: all zero, constant, one spike, ties."""
    x = rng.standard_normal(n_blocks * blck).astype(np.float32)
    xb = x.reshape(n_blocks, blck)
    if n_blocks >= 3:
        xb[0] = 0.0
        xb[1] = -0.75
        xb[2] = 0.0
        xb[2, 5] = 3.0
    if n_blocks >= 5:
        xb[3] = np.linspace(-1, 1, blck)
        xb[4] *= 1e-6  # scales in the half subnormal range
    return x


@pytest.mark.parametrize("n_blocks", N_BLOCKS)
@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantize_matches_gguf(name, n_blocks):
    rng = np.random.default_rng(2000 * TYPE_ID[name] + n_blocks)
    x = quant_inputs(n_blocks, rng)
    x0 = x.copy()
    got = _core.quantize(TYPE_ID[name], x)
    want = np.asarray(gguf.quants.quantize(x, GGMLQuantizationType[name])).view(np.uint8)
    assert np.array_equal(x, x0), "input modified"
    assert got.dtype == np.uint8 and got.shape == (x.size // info(name)[2] * info(name)[3],)
    assert np.array_equal(got, want.reshape(-1)), f"{name}: bytes differ"


# ---- quantization: round-trip error bounds ---------------------------------------------------------


def roundtrip(name, x):
    q = _core.quantize(TYPE_ID[name], x)
    return q, _core.dequantize(TYPE_ID[name], q, x.size).astype(np.float64)


@pytest.mark.parametrize("n_blocks", [1, 33, 257])
def test_roundtrip_float_formats(n_blocks):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(n_blocks * 32) * np.exp(rng.uniform(-20, 10, n_blocks * 32))).astype(
        np.float32
    )
    x = x[np.abs(x) < 65000]  # half range
    x64 = x.astype(np.float64)
    _, y = roundtrip("F16", x)
    assert np.all(np.abs(y - x64) <= tol.F16_REL * np.abs(x64) + tol.F16_ABS)
    _, y = roundtrip("BF16", x)
    assert np.all(np.abs(y - x64) <= tol.BF16_REL * np.abs(x64))


LEGACY_BOUNDS = {
    "Q8_0": ref.q8_0_error_bound,
    "Q4_0": lambda x: ref.sym_error_bound(x, 8),
    "Q5_0": lambda x: ref.sym_error_bound(x, 16),
    "Q4_1": lambda x: ref.minmax_error_bound(x, 15),
    "Q5_1": lambda x: ref.minmax_error_bound(x, 31),
}


@pytest.mark.parametrize("n_blocks", N_BLOCKS)
@pytest.mark.parametrize("name", list(LEGACY_BOUNDS))
def test_roundtrip_legacy_bounds(name, n_blocks):
    rng = np.random.default_rng(3000 * TYPE_ID[name] + n_blocks)
    x = quant_inputs(n_blocks, rng)
    _, y = roundtrip(name, x)
    err = np.abs(y - x).reshape(-1, 32).max(axis=1)
    amax = np.abs(x).reshape(-1, 32).max(axis=1)
    bound = LEGACY_BOUNDS[name](x) + tol.LEGACY_BOUND_SLACK_REL * amax
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), f"{name} block {worst}: err {err[worst]:g} > bound {bound[worst]:g}"


K_TYPES = {  # name -> (naive baseline, nearest-level unpacker)
    "Q4_K": (lambda x: ref.naive_asym(x, 32, 15), lambda q: ref.levels_k_asym(q, 144, 15)),
    "Q5_K": (lambda x: ref.naive_asym(x, 32, 31), lambda q: ref.levels_k_asym(q, 176, 31)),
    "Q6_K": (lambda x: ref.naive_sym(x, 16, 32), ref.levels_q6_k),
    "IQ4_NL": (ref.naive_iq4_nl, ref.levels_iq4_nl),
}


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
@pytest.mark.parametrize("name", list(K_TYPES))
def test_roundtrip_kquant_rmse(name, dist):
    """The RMSE search beats the naive quantizer with continuous scales (see tolerances)."""
    rng = np.random.default_rng(4000 * TYPE_ID[name] + len(dist))
    x = getattr(rng, dist)(size=256 * 33).astype(np.float32)
    _, y = roundtrip(name, x)
    naive, _ = K_TYPES[name]
    ratio = ref.rmse(x, y) / ref.rmse(x, naive(x))
    assert ratio <= tol.KQUANT_RMSE_VS_NAIVE, f"{name}/{dist}: rmse ratio to naive {ratio:.3f}"
    if dist == "normal":
        assert ref.rmse(x, y) / x.std() <= tol.KQUANT_RMSE_OVER_STD[name]


@pytest.mark.parametrize("n_blocks", [1, 3, 31, 33])
@pytest.mark.parametrize("name", list(K_TYPES))
def test_roundtrip_kquant_nearest_level(name, n_blocks):
    """Every value decodes to the level nearest to it among those its stored scales can represent."""
    blck = info(name)[2]
    rng = np.random.default_rng(5000 * TYPE_ID[name] + n_blocks)
    x = quant_inputs(n_blocks, rng, blck)
    if n_blocks >= 3:  # a block with one huge sub-block: the others' 6-bit scales round coarsely
        x[2 * blck : 2 * blck + 16] *= 100.0
    q, y = roundtrip(name, x)
    _, levels = K_TYPES[name]
    best = ref.nearest_level_distance(x, levels(q))
    slack = tol.NEAREST_LEVEL_SLACK_REL * np.repeat(np.abs(x).reshape(-1, blck).max(axis=1), blck)
    err = np.abs(y - x)
    i = int(np.argmax(err - best - slack))
    assert np.all(err <= best + slack), f"{name}[{i}]: err {err[i]:g}, nearest level {best[i]:g}"


@pytest.mark.parametrize("n_blocks", [1, 3, 33])
def test_quantize_q8_k(n_blocks):
    """Q8_K (activations): d = max / -127 as float32, q nearest-even capped at 127, bsums = sums of 16."""
    rng = np.random.default_rng(6 + n_blocks)
    x = quant_inputs(n_blocks, rng, 256)
    d, qs, bsums = ref.decode_q8_k(_core.quantize(TYPE_ID["Q8_K"], x))
    xb = x.reshape(-1, 256).astype(np.float64)
    assert np.array_equal(bsums, qs.reshape(-1, 16, 16).astype(np.int64).sum(axis=2))
    amax = np.abs(xb).max(axis=1)
    err = np.abs(d[:, None].astype(np.float64) * qs - xb).max(axis=1)
    assert np.all(err <= np.abs(d) / 2 + tol.Q8_ACT_SLACK_REL * amax)
    assert np.all(qs.min(axis=1) >= -127) and np.all(d[amax == 0] == 0)


def test_quantize_q8_1_sum_field():
    rng = np.random.default_rng(9)
    x = quant_inputs(33, rng)
    b = _core.quantize(TYPE_ID["Q8_1"], x).reshape(-1, 36)
    d = b[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    s = b[:, 2:4].copy().view(np.float16)[:, 0]
    qs = b[:, 4:].copy().view(np.int8)
    q8_0 = _core.quantize(TYPE_ID["Q8_0"], x).reshape(-1, 34)
    assert np.array_equal(b[:, [0, 1]], q8_0[:, [0, 1]]) and np.array_equal(b[:, 4:], q8_0[:, 2:])
    d32 = (np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)).astype(np.float32)
    want = (qs.astype(np.int32).sum(axis=1).astype(np.float32) * d32).astype(np.float16)
    assert np.array_equal(s.view(np.uint16), want.view(np.uint16))
    assert d.shape == (33,)


# ---- bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 43, 2**70])
def test_unknown_type_ids_raise(bad):
    with pytest.raises(gemma3.UnsupportedError, match="unknown ggml type id"):
        _core.dequantize(bad, b"\0" * 64, 32)
    with pytest.raises(gemma3.UnsupportedError, match="unknown ggml type id"):
        _core.quantize(bad, np.zeros(32, np.float32))


@pytest.mark.parametrize("tid", REMOVED_IDS)
def test_removed_type_ids_raise(tid):
    name = _core.type_info(tid)[0]
    with pytest.raises(gemma3.UnsupportedError, match=f"{name}.*removed"):
        _core.dequantize(tid, b"\0" * 4096, 256)
    with pytest.raises(gemma3.UnsupportedError, match="removed"):
        _core.quantize(tid, np.zeros(256, np.float32))


def test_uncomputable_types_raise_naming_type():
    with pytest.raises(gemma3.UnsupportedError, match="dequantization.*IQ2_XXS"):
        _core.dequantize(TYPE_ID["IQ2_XXS"], b"\0" * 66, 256)
    with pytest.raises(gemma3.UnsupportedError, match="quantization.*Q2_K"):
        _core.quantize(TYPE_ID["Q2_K"], np.zeros(256, np.float32))
    assert issubclass(gemma3.UnsupportedError, NotImplementedError)


def test_dequantize_bad_sizes():
    q4k = TYPE_ID["Q4_K"]
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        _core.dequantize(q4k, b"\0" * 1000, 100)
    with pytest.raises(ValueError, match="needs 288 bytes, got 287 bytes"):
        _core.dequantize(q4k, b"\0" * 287, 512)
    with pytest.raises(ValueError, match=">= 0"):
        _core.dequantize(q4k, b"", -256)
    with pytest.raises(TypeError):
        _core.dequantize("Q4_K", b"", 0)
    with pytest.raises(TypeError):
        _core.dequantize(q4k, 12345, 0)
    strided = np.zeros(1000, np.uint8)[::2]
    with pytest.raises((ValueError, BufferError)):
        _core.dequantize(TYPE_ID["Q8_0"], strided, 32)


def test_quantize_bad_arrays():
    q4 = TYPE_ID["Q4_0"]
    with pytest.raises(TypeError, match="ndarray"):
        _core.quantize(q4, [0.0] * 32)
    with pytest.raises(TypeError, match="float32"):
        _core.quantize(q4, np.zeros(32, np.float64))
    with pytest.raises(TypeError, match="float32"):
        _core.quantize(q4, np.zeros(32, ">f4"))
    with pytest.raises(ValueError, match="1-D"):
        _core.quantize(q4, np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        _core.quantize(q4, np.zeros(64, np.float32)[::2])
    with pytest.raises(ValueError, match="multiple of the Q4_0 block size 32"):
        _core.quantize(q4, np.zeros(33, np.float32))
    x = np.zeros(64, np.float32)
    x[40] = np.nan
    with pytest.raises(ValueError, match=r"x\[40\] is nan"):
        _core.quantize(q4, x)
    x[40] = -np.inf
    with pytest.raises(ValueError, match=r"x\[40\] is inf"):
        _core.quantize(TYPE_ID["Q6_K"], np.resize(x, 256))
    # float formats carry non-finite values through
    assert np.isnan(_core.dequantize(1, _core.quantize(1, np.float32([np.nan])), 1)[0])


# ---- boundaries: references, threads ----------------------------------------------------------------


def test_no_reference_leaks():
    data = random_blocks("Q4_K", 4, np.random.default_rng(0))
    x = np.ones(256, np.float32)
    before = (sys.getrefcount(data), sys.getrefcount(x))
    for _ in range(200):
        _core.dequantize(TYPE_ID["Q4_K"], data, 1024)
        _core.quantize(TYPE_ID["Q4_K"], x)
        try:
            _core.dequantize(TYPE_ID["Q4_K"], data, 2048)
        except ValueError:
            pass
    assert (sys.getrefcount(data), sys.getrefcount(x)) == before


def test_concurrent_calls_agree():
    data = random_blocks("Q6_K", 64, np.random.default_rng(1))
    want = _core.dequantize(TYPE_ID["Q6_K"], data, 64 * 256)
    results = [None] * 4

    def work(i):
        results[i] = _core.dequantize(TYPE_ID["Q6_K"], data, 64 * 256)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert_bits_equal(r, want, "threaded")
