"""Fused dequantize-and-dot (_core.dot_f32, _core.matvec) and the SIMD dequantizers, per ISA.

- dot_f32(w, x) for every type with a dot kernel and every ISA this CPU runs equals the float64 dot
  of the reference dequantization with x, within tol.DOT_F32_REL * sum |w_i x_i| (float32
  summation error only), at 1, 2, 3, 5, 8, 9, 17 blocks (SIMD tails and the odd block of 2-block
  loops) and the real row lengths 640, 2048, 2560.
- dequantize(..., isa=...) is bit-identical to the reference dequantization: SIMD variants form the
  same products d*q in the same order.
- matvec is one dot_f32 per row; G3_ISA lowers the selected level; bad arguments raise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import _core

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402
from test_quant import TYPE_ID, assert_bits_equal, random_blocks  # noqa: E402

DOT_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
             "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]  # fmt: skip
ISA_ORDER = ["ref", "avx2", "avx512"]
CPU_ISA = _core.isa()["cpu"]
ISAS = ISA_ORDER[: ISA_ORDER.index(CPU_ISA if CPU_ISA != "scalar" else "ref") + 1]
N_BLOCKS = [1, 2, 3, 5, 8, 9, 17]
REAL_N = [640, 2048, 2560]  # Gemma 3 270M hidden size, 1B hidden size / 270M ffn, 4B hidden size
FLOAT_ODD_N = [31, 33, 63, 65, 255, 257]  # float formats: 64/16-wide loops and scalar tails


def blck(name):
    return _core.type_info(TYPE_ID[name])[2]


def sizes(name):
    b = blck(name)
    ns = [k * b for k in N_BLOCKS] + [n for n in REAL_N if n % b == 0]
    return ns + (FLOAT_ODD_N if b == 1 else [])


def dot_weights(name, n, rng):
    """A row of n elements: random blocks with finite half scales; for F32/BF16 random magnitudes
    in 2^-20..2^20 instead of raw bit patterns (whose products with x overflow float32)."""
    if name in ("F32", "BF16"):
        w = (rng.standard_normal(n) * 2.0 ** rng.uniform(-20, 20, n)).astype(np.float32)
        if name == "F32":
            return w.view(np.uint8)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return random_blocks(name, n // blck(name), rng)


def check_dot(name, isa, w, x, what):
    tid, n = TYPE_ID[name], x.size
    wd = _core.dequantize(tid, w, n, isa="ref").astype(np.float64)
    want = float(wd @ x.astype(np.float64))
    scale = float(np.abs(wd * x).sum())
    got = _core.dot_f32(tid, w, x, isa=isa)
    err = abs(got - want)
    assert err <= tol.DOT_F32_REL * scale, (
        f"{name} {isa} {what} n={n}: dot {got!r} vs float64 {want!r}, |diff| {err:g} > "
        f"{tol.DOT_F32_REL:g} * sum|w x| = {tol.DOT_F32_REL * scale:g}"
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", DOT_TYPES)
def test_dot_f32_matches_reference_dequant(name, isa):
    rng = np.random.default_rng([TYPE_ID[name], ISA_ORDER.index(isa)])
    for n in sizes(name):
        for trial in range(3):
            w = dot_weights(name, n, rng)
            x = rng.standard_normal(n).astype(np.float32)
            check_dot(name, isa, w, x, f"trial {trial}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", DOT_TYPES)
def test_dot_f32_unaligned_row_and_zero_x(name, isa):
    """Rows start at any byte (blocks are packed; GGUF data need not be aligned); x = 0 gives 0."""
    rng = np.random.default_rng(7)
    n = 9 * blck(name) if blck(name) > 1 else 65
    w = dot_weights(name, n, rng)
    buf = np.zeros(w.size + 1, np.uint8)
    buf[1:] = w
    x = rng.standard_normal(n).astype(np.float32)
    check_dot(name, isa, buf[1:], x, "offset 1")
    assert _core.dot_f32(TYPE_ID[name], w, np.zeros(n, np.float32), isa=isa) == 0.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", DOT_TYPES)
def test_dequantize_isa_bit_identical(name, isa):
    rng = np.random.default_rng([TYPE_ID[name], 100 + ISA_ORDER.index(isa)])
    tid = TYPE_ID[name]
    for n in sizes(name):
        w = random_blocks(name, n // blck(name), rng)  # raw bits: subnormals, +-0, extremes
        want = _core.dequantize(tid, w, n, isa="ref")
        assert_bits_equal(_core.dequantize(tid, w, n, isa=isa), want, f"{name} {isa} n={n}")
        buf = np.zeros(w.size + 3, np.uint8)
        buf[3:] = w
        assert_bits_equal(_core.dequantize(tid, buf[3:], n, isa=isa), want, f"{name} {isa} +3")


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "F16"])
def test_matvec_is_dot_per_row(name):
    rng = np.random.default_rng(3)
    tid, rows, cols = TYPE_ID[name], 13, 512
    w = np.concatenate([dot_weights(name, cols, rng) for _ in range(rows)])
    x = rng.standard_normal(cols).astype(np.float32)
    row = w.size // rows
    for isa in ISAS:
        y = _core.matvec(tid, w, rows, cols, x, isa=isa)
        assert y.shape == (rows,) and y.dtype == np.float32
        want = [_core.dot_f32(tid, w[r * row : (r + 1) * row], x, isa=isa) for r in range(rows)]
        assert_bits_equal(y, np.array(want, np.float32), f"matvec {name} {isa}")
    assert _core.matvec(tid, w, 0, cols, x).shape == (0,)


def test_isa_report_and_selection():
    info = _core.isa()
    assert info["cpu"] in ("scalar", "avx2", "avx512")
    assert info["selected"] in ISA_ORDER + ["scalar"]
    assert set(info["dot_f32"]) == set(DOT_TYPES)
    assert set(info["to_float"]) == set(DOT_TYPES)
    if info["env"] is None and info["cpu"] != "scalar":
        for name in ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "Q4_0", "F16", "BF16", "F32"]:
            assert info["dot_f32"][name] == info["cpu"], name
    for name in DOT_TYPES:  # the selected kernels are those of the selected level's table
        rng = np.random.default_rng(11)
        n = 2 * 256
        w, x = dot_weights(name, n, rng), rng.standard_normal(n).astype(np.float32)
        sel = info["selected"] if info["selected"] != "scalar" else "ref"
        assert _core.dot_f32(TYPE_ID[name], w, x) == _core.dot_f32(TYPE_ID[name], w, x, isa=sel)


def test_g3_isa_env_forces_reference():
    code = "from gemma3 import _core; i = _core.isa(); print(i['selected'], i['env'], " \
           "sorted(set(i['dot_f32'].values()) | set(i['to_float'].values())))"  # fmt: skip
    env = dict(os.environ, G3_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=2)  # fmt: skip
    assert out == ["scalar", "scalar", "['scalar']\n"]
    if CPU_ISA == "avx512":
        env["G3_ISA"] = "avx2"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.split(maxsplit=2)  # fmt: skip
        assert out[:2] == ["avx2", "avx2"] and "avx512" not in out[2]


def test_dot_f32_bad_arguments():
    x = np.ones(64, np.float32)
    w = np.zeros(2 * 34, np.uint8)
    with pytest.raises(ValueError, match="isa must be"):
        _core.dot_f32(8, w, x, isa="sse9")
    with pytest.raises(ValueError, match="too small"):
        _core.dot_f32(8, w[:-1], x)
    with pytest.raises(ValueError, match="multiple"):
        _core.dot_f32(8, w, np.ones(33, np.float32))
    with pytest.raises(TypeError, match="float32"):
        _core.dot_f32(8, w, np.ones(64, np.float64))
    with pytest.raises(ValueError, match="1-D"):
        _core.dot_f32(8, w, np.ones((2, 32), np.float32))
    with pytest.raises(gemma3.UnsupportedError):
        _core.dot_f32(16, w, x)  # IQ2_XXS: layout known, no kernel
    with pytest.raises(gemma3.UnsupportedError):
        _core.dot_f32(4, w, x)  # removed id
    with pytest.raises(ValueError, match="cols"):
        _core.matvec(8, w, 1, 32, x)
    with pytest.raises(ValueError, match="too small"):
        _core.matvec(8, w, 3, 64, x)
    with pytest.raises(ValueError, match="rows"):
        _core.matvec(8, w, -1, 64, x)
    for isa in ISA_ORDER:
        if isa not in ISAS:
            with pytest.raises(ValueError, match="not supported by this CPU"):
                _core.dot_f32(8, w, x, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_f16_every_half(isa):
    """All 65536 halves, NaN payloads and signalling NaNs included (F16C alone would quiet them)."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = _core.dequantize(TYPE_ID["F16"], h, h.size, isa="ref")
    assert_bits_equal(_core.dequantize(TYPE_ID["F16"], h, h.size, isa=isa), want, f"F16 {isa}")
