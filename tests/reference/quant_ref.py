"""NumPy twins of the quantizers in csrc/quant/ref.c, written for clarity, in float64 where it matters.

They serve the error-bound tests in tests/test_quant.py:
  - the legacy rules (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1) give the unrounded float scale d and its stored
    half d16, from which the worst-case error of a block is bounded;
  - ``naive_*`` are the plain min/max (or abs-max) quantizers of each K-quant / IQ4_NL sub-block with
    *continuous* (unquantized) scales: a baseline the RMSE search must stay close to or beat;
  - ``levels_*`` unpack the stored scales of a block into every level it can represent, so a test can
    check that each value was rounded to the nearest level actually stored.
Layouts follow the format descriptions (reference digest §2), not any existing implementation.
"""

from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float64
)


def _half(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to IEEE half and back, as float64."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    assert x.ndim == 1 and x.size % size == 0
    return x.reshape(-1, size)


def _signed_absmax(xb: np.ndarray) -> np.ndarray:
    """Per row, the element of largest magnitude (first on ties), with its sign: (n_blocks,)."""
    return np.take_along_axis(xb, np.abs(xb).argmax(axis=1)[:, None], axis=1)[:, 0]


# ---- legacy blocks: scales and error bounds ----------------------------------------------------


def q8_0_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d, d16) per block of 32: d = amax / 127 in float32 (as the C code), d16 = d stored as half."""
    xb = _blocks(x.astype(np.float32), QK)
    d = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
    return d.astype(np.float64), _half(d)


def q8_0_error_bound(x: np.ndarray) -> np.ndarray:
    """Per-block bound on |x - dequant(quant(x))| for Q8_0: rounding to the grid of step d costs
    d/2; storing d as half moves level q by |q| * |d - d16| <= 127 |d - d16|."""
    d, d16 = q8_0_scales(x)
    return d / 2 + 127 * np.abs(d - d16)


def sym_error_bound(x: np.ndarray, half_levels: int) -> np.ndarray:
    """Per-block bound for Q4_0 (half_levels 8) / Q5_0 (16): d = max / -half_levels puts the
    largest-magnitude value on the lowest level, so its negation lands one level past the top one
    and is clipped: error up to |d| (elsewhere |d|/2), plus |q - half| * |d - d16| from the half."""
    xb = _blocks(x.astype(np.float32), QK)
    d = (_signed_absmax(xb) / np.float32(-half_levels)).astype(np.float32)
    d64 = d.astype(np.float64)
    return np.abs(d64) + half_levels * np.abs(d64 - _half(d))


def minmax_error_bound(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per-block bound for Q4_1 (nmax 15) / Q5_1 (31): m = min, d = (max - min) / nmax; the grid covers
    [min, max], so rounding costs d/2, plus nmax |d - d16| (scale stored as half) and |m - m16|."""
    xb = _blocks(x.astype(np.float32), QK)
    mn, mx = xb.min(axis=1), xb.max(axis=1)
    d = ((mx - mn) / np.float32(nmax)).astype(np.float32)
    d64 = d.astype(np.float64)
    return d64 / 2 + nmax * np.abs(d64 - _half(d)) + np.abs(mn.astype(np.float64) - _half(mn))


# ---- naive baselines with continuous scales (float64) --------------------------------------------


def naive_asym(x: np.ndarray, sub: int, nmax: int) -> np.ndarray:
    """Sub-blocks of `sub` values as y = a*q - m, q in 0..nmax, with m = -min(min(x), 0) and
    a = (max - min) / nmax, q nearest. Returns the dequantized values (float64)."""
    xb = _blocks(x.astype(np.float64), sub)
    mn = np.minimum(xb.min(axis=1, keepdims=True), 0.0)
    mx = xb.max(axis=1, keepdims=True)
    a = (mx - mn) / nmax
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(a > 0, np.clip(np.rint((xb - mn) / a), 0, nmax), 0)
    return (a * q + mn).reshape(-1)


def naive_sym(x: np.ndarray, sub: int, nmax: int) -> np.ndarray:
    """Sub-blocks as y = a*q, q in -nmax..nmax-1, a = max / -nmax (largest magnitude on -nmax)."""
    xb = _blocks(x.astype(np.float64), sub)
    a = _signed_absmax(xb)[:, None] / -nmax
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(a != 0, np.clip(np.rint(xb / a), -nmax, nmax - 1), 0)
    return (a * q).reshape(-1)


def naive_iq4_nl(x: np.ndarray) -> np.ndarray:
    """Blocks of 32 as y = d * k, k from the IQ4_NL grid nearest to x/d, d = max / -127."""
    xb = _blocks(x.astype(np.float64), QK)
    d = _signed_absmax(xb)[:, None] / -127.0
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d != 0, xb / d, 0.0)
    k = KVALUES_IQ4NL[np.abs(v[..., None] - KVALUES_IQ4NL).argmin(axis=-1)]
    return (d * k).reshape(-1)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


# ---- levels representable by stored blocks -------------------------------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n,) float64 half values."""
    return np.ascontiguousarray(raw).view(np.float16)[:, 0].astype(np.float64)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed Q4_K/Q5_K scales -> (n, 8) scales, (n, 8) mins (6-bit each)."""
    s = s.astype(np.int64)
    sc = np.empty((s.shape[0], 8), np.int64)
    mn = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[:, j] = s[:, j] & 63
            mn[:, j] = s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def levels_k_asym(data: np.ndarray, type_size: int, nmax: int) -> np.ndarray:
    """Q4_K (144 B, nmax 15) / Q5_K (176 B, nmax 31): (n_blocks * 8, nmax + 1) levels d*sc*q - dmin*m
    of every 32-element sub-block."""
    b = data.reshape(-1, type_size)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = np.arange(nmax + 1, dtype=np.float64)
    lv = (d[:, None] * sc)[..., None] * q - (dmin[:, None] * mn)[..., None]
    return lv.reshape(-1, nmax + 1)


def levels_q6_k(data: np.ndarray) -> np.ndarray:
    """Q6_K (210 B): (n_blocks * 16, 64) levels d*sc*(q - 32) of every 16-element sub-block."""
    b = data.reshape(-1, 210)
    sc = b[:, 192:208].view(np.int8).astype(np.float64)
    d = _f16(b[:, 208:210])
    q = np.arange(-32, 32, dtype=np.float64)
    return ((d[:, None] * sc)[..., None] * q).reshape(-1, 64)


def levels_iq4_nl(data: np.ndarray) -> np.ndarray:
    """IQ4_NL (18 B): (n_blocks, 16) levels d*k."""
    d = _f16(data.reshape(-1, 18)[:, 0:2])
    return d[:, None] * KVALUES_IQ4NL


def nearest_level_distance(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Distance from each x to the nearest level of its sub-block: x (n,), levels (n_sub, L)."""
    xs = x.astype(np.float64).reshape(levels.shape[0], -1)
    return np.abs(xs[..., None] - levels[:, None, :]).min(axis=-1).reshape(-1)


def decode_q8_k(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_K (292 B): d (n,) float32, qs (n, 256) int8, bsums (n, 16) int16."""
    b = data.reshape(-1, 292)
    d = np.ascontiguousarray(b[:, 0:4]).view(np.float32)[:, 0]
    qs = np.ascontiguousarray(b[:, 4:260]).view(np.int8)
    bsums = np.ascontiguousarray(b[:, 260:292]).view(np.int16)
    return d, qs, bsums
