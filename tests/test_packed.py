"""The integer decode kernels over packed weights (csrc/quant/packed.c, _core.packed_matvec).

Twin: NumPy quantizes x exactly as the C code does (float32 x * (LIM / amax), rounded half to
even, per 32-block) and forms sum_i dequant(w)_i * s_b * X_i in float64 from the reference
dequantization. The kernel's integer sums are exact, so the only differences are the float32
roundings when the three digit sums, the scales and the blocks are combined: bounded by
tol.PACKED_REL * sum |w_i x_i|. Against the float64 dot with x itself the extra error is the
activation rounding, |x - s X| <= s / 2 per element.

Weights are random blocks (every code, random finite scales), rows not multiples of 16 (the
masked tail group), every row length from one block to the real 640 / 2048 / 2560.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import _core

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402
from test_quant import TYPE_ID, random_blocks  # noqa: E402

PACKED_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]
LIM = 8355711  # G3_PACK_LIM: 127 * (65536 + 256 + 1)
HAS_VNNI = _core.packed_supported(TYPE_ID["Q8_0"])
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="packed kernels need AVX-512 VNNI; the float "
                                "kernels (tested in test_quant_dot.py) run instead")


def quantize_x(x):
    """(s per block, X) exactly as g3_xq_prepare computes them (float32 arithmetic)."""
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(LIM) / amax, np.float32(0)).astype(np.float32)
    s = (amax / np.float32(LIM)).astype(np.float32)
    X = np.rint((xb * inv[:, None]).astype(np.float32))
    return s, np.clip(X, -LIM, LIM)


def twin(Wd, x):
    s, X = quantize_x(x)
    xq = (s[:, None].astype(np.float64) * X).reshape(-1)
    return Wd @ xq


def case(name, rows, cols, rng, x=None):
    blk = _core.type_info(TYPE_ID[name])[2]
    w = random_blocks(name, rows * cols // blk, rng)
    Wd = _core.dequantize(TYPE_ID[name], w, rows * cols).reshape(rows, cols).astype(np.float64)
    if x is None:  # mostly N(0,1) with a few outliers, as hidden states have
        x = rng.standard_normal(cols) * np.where(rng.random(cols) < 0.03, 60.0, 1.0)
    return w, Wd, np.asarray(x, np.float32)


def shapes(name):
    k = name.endswith("_K")
    cols = [256, 512, 2560] if k else [32, 96, 640, 2048]
    return [(r, c) for r in (1, 15, 17, 40) for c in cols]


@needs_vnni
@pytest.mark.parametrize("name", PACKED_TYPES)
def test_packed_matvec_matches_twin(name):
    rng = np.random.default_rng(TYPE_ID[name])
    for rows, cols in shapes(name):
        w, Wd, x = case(name, rows, cols, rng)
        y = _core.packed_matvec(TYPE_ID[name], w, rows, cols, x)
        assert y.shape == (rows,) and y.dtype == np.float32
        mag = np.abs(Wd) @ np.abs(x.astype(np.float64))
        err = np.abs(y - twin(Wd, x))
        assert np.all(err <= tol.PACKED_REL * mag + 1e-30), (name, rows, cols, (err / mag).max())
        # against the exact product: the activation rounding s/2 per element on top
        s, _ = quantize_x(x)
        act = np.abs(Wd) @ np.repeat(s.astype(np.float64) / 2, 32)
        err = np.abs(y - Wd @ x.astype(np.float64))
        assert np.all(err <= act + tol.PACKED_REL * mag + 1e-30), (name, rows, cols)


@needs_vnni
@pytest.mark.parametrize("name", PACKED_TYPES)
def test_packed_matvec_edge_activations(name):
    rng = np.random.default_rng(7)
    cols = 512
    w, Wd, _ = case(name, 19, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    x[:64] = 0  # all-zero blocks: scale 0, digits 0, exact zero contribution
    x[100] = 3e4  # one huge value: its block's other values lose nothing below float32 precision
    y = _core.packed_matvec(TYPE_ID[name], w, 19, cols, x)
    mag = np.abs(Wd) @ np.abs(x.astype(np.float64))
    assert np.all(np.abs(y - twin(Wd, x)) <= tol.PACKED_REL * mag)
    x[200] = np.nan  # non-finite activations propagate, as in the float kernels
    assert np.isnan(_core.packed_matvec(TYPE_ID[name], w, 19, cols, x)).all()


@needs_vnni
def test_packed_matvec_bad_arguments():
    w = random_blocks("Q8_0", 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not match cols"):
        _core.packed_matvec(TYPE_ID["Q8_0"], w, 2, 96, np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="rows"):
        _core.packed_matvec(TYPE_ID["Q8_0"], w, 0, 64, np.zeros(64, np.float32))
    with pytest.raises(gemma3.UnsupportedError, match="packed kernel"):
        _core.packed_matvec(TYPE_ID["F16"], np.zeros(256, np.uint8), 2, 64,
                            np.zeros(64, np.float32))
    assert not _core.packed_supported(TYPE_ID["IQ4_NL"]) and not _core.packed_supported(-1)


# ---- the prefill GEMM (g3_packed_gemm, _core.packed_gemm) ---------------------------------------

LIM8 = 127  # one signed digit: the opt-in 8-bit activations
LIM16 = 127 * 257  # two signed base-256 digits: the opt-in 16-bit activations


def k4_mins(name, w, rows, cols):
    """(rows, cols / 32) dmin * m per Q4_K / Q5_K sub-block (the weights' offsets), else None."""
    if name not in ("Q4_K", "Q5_K"):
        return None
    size = 144 if name == "Q4_K" else 176
    blk = np.frombuffer(np.asarray(w, np.uint8).tobytes(), np.uint8)[:rows * cols // 256 * size]
    blk = blk.reshape(-1, size)
    dmin = blk[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64)
    q = blk[:, 4:16].astype(np.int64)
    m = np.empty((len(blk), 8))
    for j in range(8):
        m[:, j] = q[:, j + 4] & 63 if j < 4 else (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return (dmin[:, None] * m).reshape(rows, cols // 32)


def twin_gemm(Wd, X, lim, mins=None):
    """(T, rows) in float64: each token quantized per 32-block with |X| <= lim, as C does. The
    Q4_K / Q5_K offsets (mins) multiply the float sum of x per block, not of its quantization."""
    out = np.empty((X.shape[0], Wd.shape[0]))
    for t, x in enumerate(X):
        xb = x.reshape(-1, 32).astype(np.float32)
        amax = np.abs(xb).max(1)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(lim) / amax, np.float32(0)).astype(np.float32)
        s = (amax / np.float32(lim)).astype(np.float32)
        q = np.clip(np.rint((xb * inv[:, None]).astype(np.float32)), -lim, lim)
        xq = s[:, None].astype(np.float64) * q
        out[t] = Wd @ xq.reshape(-1)
        if mins is not None:
            out[t] += mins @ (xq.sum(1) - xb.astype(np.float64).sum(1))
    return out


@needs_vnni
@pytest.mark.parametrize("mode,lim", [(3, LIM), (2, LIM16), (1, LIM8)])
@pytest.mark.parametrize("name", PACKED_TYPES)
def test_packed_gemm_matches_twin(name, mode, lim):
    """Every packed type, odd row counts (masked tail group), token counts around the 8-token
    tile; each token's row is bit-identical to the same token computed alone, and (24-bit) to
    the decode kernel's row for it."""
    rng = np.random.default_rng(TYPE_ID[name] + 100 * mode)
    for rows, cols in [(17, 256), (40, 512), (15, 2560)] if name.endswith("_K") else \
            [(17, 96), (40, 640), (15, 2048)]:
        w, Wd, _ = case(name, rows, cols, rng)
        for T in (1, 7, 9, 33):
            X = (rng.standard_normal((T, cols)) *
                 np.where(rng.random((T, cols)) < 0.03, 60.0, 1.0)).astype(np.float32)
            Y = _core.packed_gemm(TYPE_ID[name], w, rows, cols, X, mode=mode)
            assert Y.shape == (T, rows) and Y.dtype == np.float32
            mag = np.abs(X.astype(np.float64)) @ np.abs(Wd).T
            err = np.abs(Y - twin_gemm(Wd, X, lim, k4_mins(name, w, rows, cols)))
            assert np.all(err <= tol.PACKED_REL * mag + 1e-30), (name, rows, cols, T,
                                                                 (err / mag).max())
            one = _core.packed_gemm(TYPE_ID[name], w, rows, cols, X[T // 2:T // 2 + 1].copy(),
                                    mode=mode)
            assert np.array_equal(one[0], Y[T // 2])
            if mode == 3:  # 24-bit activations: one kernel for decode and prefill, same bits
                for t in (0, T - 1):
                    y1 = _core.packed_matvec(TYPE_ID[name], w, rows, cols, X[t].copy())
                    assert np.array_equal(Y[t], y1), (name, rows, cols, T, t)


@needs_vnni
@pytest.mark.parametrize("name", PACKED_TYPES)
def test_packed_gemm_edge_activations(name):
    rng = np.random.default_rng(8)
    cols = 512
    w, Wd, _ = case(name, 19, cols, rng)
    X = rng.standard_normal((10, cols)).astype(np.float32)
    X[:, :64] = 0  # all-zero blocks: exact zero contribution
    X[3, 100] = 3e4  # one huge value in one token only
    Y = _core.packed_gemm(TYPE_ID[name], w, 19, cols, X)
    mag = np.abs(X.astype(np.float64)) @ np.abs(Wd).T
    assert np.all(np.abs(Y - twin_gemm(Wd, X, LIM)) <= tol.PACKED_REL * mag)
    X[5, 200] = np.nan  # non-finite activations propagate to their token only
    Y = _core.packed_gemm(TYPE_ID[name], w, 19, cols, X)
    assert np.isnan(Y[5]).all() and np.isfinite(np.delete(Y, 5, 0)).all()


@needs_vnni
def test_packed_gemm_bad_arguments():
    w = random_blocks("Q8_0", 4, np.random.default_rng(0))
    q8 = TYPE_ID["Q8_0"]
    with pytest.raises(ValueError, match="cols=64"):
        _core.packed_gemm(q8, w, 2, 64, np.zeros((3, 96), np.float32))
    with pytest.raises(ValueError, match="rows"):
        _core.packed_gemm(q8, w, 0, 64, np.zeros((3, 64), np.float32))
    with pytest.raises(ValueError, match="mode"):
        _core.packed_gemm(q8, w, 2, 64, np.zeros((3, 64), np.float32), mode=4)
    with pytest.raises(ValueError, match="w too small"):
        _core.packed_gemm(q8, w, 5, 64, np.zeros((3, 64), np.float32))
    with pytest.raises(TypeError, match="float32"):
        _core.packed_gemm(q8, w, 2, 64, np.zeros((3, 64)))
    with pytest.raises(gemma3.UnsupportedError, match="packed kernel"):
        _core.packed_gemm(TYPE_ID["F16"], np.zeros(256, np.uint8), 2, 64,
                          np.zeros((3, 64), np.float32))


# ---- greedy arg-max without every logit (g3_matmul_argmax) ----------------------------------------

def row_bytes(name, cols):
    blk, size = _core.type_info(TYPE_ID[name])[2:4]
    return cols // blk * size


@needs_vnni
@pytest.mark.parametrize("name", PACKED_TYPES)
def test_packed_argmax_is_the_full_products_argmax(name):
    """The ids equal np.argmax of g3_matmul's own full product (first index on ties) at every
    token count: one token, a verify pass, the prefill GEMM's exact path (>= 32 tokens) and past
    G3_ARGMAX_TOKENS (64: the full product). Rows 13, 500 and 999 are copies of the longest row
    (exact ties: the lowest index must win); the fast path must have been taken and computed few
    groups exactly."""
    rng = np.random.default_rng(TYPE_ID[name] + 7)
    rows, cols = 1000, 512 if name.endswith("_K") else 640
    rb = row_bytes(name, cols)
    w, Wd, _ = case(name, rows, cols, rng)
    w = w.reshape(rows, rb).copy()
    longest = int(np.argmax(np.linalg.norm(Wd, axis=1)))
    w[13] = w[500] = w[999] = w[longest]
    w = w.reshape(-1)
    Wd = _core.dequantize(TYPE_ID[name], w, rows * cols).reshape(rows, cols)
    groups = -(-rows // 16)
    for T in (1, 4, 17, 33, 70):
        X = (rng.standard_normal((T, cols)) *
             np.where(rng.random((T, cols)) < 0.03, 60.0, 1.0)).astype(np.float32)
        X[T // 2] = Wd[13] * 2.0  # the copies of the longest row on top (Cauchy-Schwarz)
        ids, exact, full = _core.packed_argmax(TYPE_ID[name], w, rows, cols, X)
        assert ids.dtype == np.int32 and ids.shape == (T,)
        assert np.array_equal(ids, full.argmax(1)), (name, T)
        assert ids[T // 2] == min(13, longest)
        if T > 64:
            assert exact == -1
        else:  # some 16-row groups per token (scales here vary wildly), not the whole matrix
            assert 0 < exact <= T * groups // 4, (name, T, exact, groups)


@needs_vnni
def test_packed_argmax_near_ties_and_bad_activations():
    """Rows one code apart (products closer than the 8-bit pass can tell) are settled by the
    exact kernel; x with a NaN or an Inf takes the full product (the ids g3_argmax_f32 gives)."""
    rng = np.random.default_rng(3)
    name, rows, cols = "Q8_0", 300, 640
    rb = row_bytes(name, cols)
    w, _, _ = case(name, rows, cols, rng)
    w = w.reshape(rows, rb).copy()
    for r in (40, 41, 290):  # row 40's codes, one of them moved by one step
        w[r] = w[7]
        w[r, 2 + (r % 32)] = (int(w[r, 2 + (r % 32)]) + (1 if r != 41 else 255)) % 256
    w = w.reshape(-1)
    Wd = _core.dequantize(TYPE_ID[name], w, rows * cols).reshape(rows, cols)
    X = np.stack([Wd[7], Wd[40], Wd[41], Wd[290] + 1e-3 * Wd[3]]).astype(np.float32)
    ids, exact, full = _core.packed_argmax(TYPE_ID[name], w, rows, cols, X)
    assert np.array_equal(ids, full.argmax(1)) and exact > 0
    assert len(set(np.flatnonzero(full[0] > full[0].max() - 1e-3 * abs(full[0].max())))) > 1
    for bad in (np.nan, np.inf):
        Xb = X.copy()
        Xb[1, 5] = bad
        ids, exact, full = _core.packed_argmax(TYPE_ID[name], w, rows, cols, Xb)
        assert exact == -1 and ids[0] == full[0].argmax() and ids[1] == 0


@needs_vnni
def test_packed_argmax_bad_arguments():
    w = random_blocks("Q8_0", 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cols=64"):
        _core.packed_argmax(TYPE_ID["Q8_0"], w, 2, 64, np.zeros((3, 96), np.float32))
    with pytest.raises(ValueError, match="w too small"):
        _core.packed_argmax(TYPE_ID["Q8_0"], w, 5, 64, np.zeros((3, 64), np.float32))


@pytest.fixture(scope="module")
def models():
    a = gemma3.load(n_threads=2)
    b = gemma3.load(n_threads=2, pack=False)
    yield a, b
    a.close()
    b.close()


@needs_vnni
def test_model_decode_packed_vs_float(models):
    """Every matrix of the 270M file (Q5_0, Q8_0, Q4_K, Q6_K and the Q8_0 LM head) is packed;
    decoding token by token gives the float kernels' logits to ~1e-6 relative and the same
    greedy text."""
    packed, flt = models
    assert packed.packed_bytes > 200e6 and flt.packed_bytes == 0
    ids = packed.tokenizer.encode("The capital of France is Paris. The capital of Japan is")
    worst = 0.0
    for m in (packed, flt):
        m.reset()
    for t in ids:
        a = packed.engine.core.forward(np.asarray([t], np.int32), 1)[0]
        b = flt.engine.core.forward(np.asarray([t], np.int32), 1)[0]
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    assert worst < tol.PACKED_MODEL_REL, worst
    for m in (packed, flt):
        m.reset()
    prompt = "def fibonacci(n):"
    assert (packed.generate(prompt, max_new_tokens=40, temperature=0)
            == flt.generate(prompt, max_new_tokens=40, temperature=0))


def test_model_argmax_mode_is_greedy_on_the_logits(models):
    """engine.feed(.., 3) (the greedy verify pass) returns the ids np.argmax picks from mode 2's
    rows, with the packed LM head's fast path and with the float kernels (full product)."""
    ids = models[0].tokenizer.encode("Speculative decoding verifies several drafted tokens at "
                                     "once; the greedy pass needs only the arg-max of each row.")
    for m in models:
        e = m.engine
        e.fresh()
        e.feed(ids[:10], 0)
        for T in (1, 4, 9):
            e.truncate(10)
            full = e.feed(ids[10:10 + T], 2)
            e.truncate(10)
            am = e.feed(ids[10:10 + T], 3)
            assert am.dtype == np.int32 and np.array_equal(am, full.argmax(1)), (T, am)
        assert e.feed([], 3).shape == (0,)
    with pytest.raises(ValueError, match="logits mode must be 0, 1, 2 or 3"):
        models[0].engine.core.forward(np.asarray(ids[:2], np.int32), 4)


def test_prefill_precision_argument():
    with pytest.raises(ValueError, match="prefill_precision must be one of"):
        gemma3.load(prefill_precision="int4")


@needs_vnni
@pytest.mark.parametrize("precision,lo,hi", [("int8", 1e-3, 0.2), ("int16", 1e-6, 0.01)])
def test_model_prefill_low_precision_opt_in(models, precision, lo, hi):
    """prefill_precision="int8"/"int16" changes prompt chunks (>= 32 tokens: the 8- or 16-bit
    GEMM) and nothing else: a short feed goes through the decode kernels with the same bits as
    the default model."""
    exact = models[0]
    low = gemma3.load(n_threads=2, prefill_precision=precision)
    try:
        ids = [2] + np.random.default_rng(5).integers(1000, 200000, 47).tolist()
        a, b = exact.logits(ids), low.logits(ids)
        assert np.isfinite(b).all() and not np.array_equal(a, b)
        # off by more than the 24-bit path's float roundings, yet the same distribution in the
        # large, 16 bits far closer than 8 (the README's agreement figures: bench_prefill.py)
        d = np.abs(a - b).max()
        assert lo < d < hi * np.abs(a).max(), d
        short = ids[:8]
        assert np.array_equal(exact.logits(short), low.logits(short))
    finally:
        low.close()
