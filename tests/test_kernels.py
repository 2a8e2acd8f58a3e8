"""Single kernels (_core.rmsnorm/layernorm/rope/geglu/gelu_bias/softmax/dot) and the sampler against
their NumPy twins; the float kernels with SIMD variants at every ISA level this CPU runs, and the
dispatcher's report of what G3_ISA selected.

Sizes are the house list of odd lengths, so every SIMD body and tail is exercised. RoPE is checked
for the local (base 1e4) and global (base 1e6, with and without linear factor 8) tables at positions
up to 32768. The sampler's filtered distribution is compared with the twin's; draws are checked for
determinism per seed, difference between seeds, and agreement with the distribution (chi-square).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma3 import _core

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402
from reference import gemma3_ref as ref  # noqa: E402

SIZES = [1, 3, 31, 32, 33, 255, 256, 257, 640, 2560]


def assert_close_rel(got, want, rel, what):
    """|got - want| <= rel * max|want| per row; failures print shape, max diff, first mismatches."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = np.maximum(np.abs(want).max(axis=-1, keepdims=True), 1e-30)
    err = np.abs(got - want) / scale
    if not (err <= rel).all():
        bad = np.argwhere(err > rel)[:5]
        rows = [f"  at {tuple(b)}: got {got[tuple(b)]!r} want {want[tuple(b)]!r}" for b in bad]
        pytest.fail(f"{what}: shape {got.shape}, max rel err {err.max():.3g} > {rel:g}; "
                    f"{int((err > rel).sum())} mismatches; first:\n" + "\n".join(rows))


# ---- rmsnorm / geglu / softmax ---------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_rmsnorm(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((3, n)) * [[0.01], [1.0], [300.0]]).astype(np.float32)
    w = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    x0 = x.copy()
    got = _core.rmsnorm(x, w, 1e-6)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(x, x0)  # input untouched
    assert_close_rel(got, ref.rmsnorm(x, w, 1e-6), tol.RMSNORM_REL, f"rmsnorm n={n}")
    assert_close_rel(_core.rmsnorm(x[1], w, 1e-6), ref.rmsnorm(x[1], w, 1e-6), tol.RMSNORM_REL,
                     f"rmsnorm 1-D n={n}")


def test_rmsnorm_eps_dominates_zero_row():
    x = np.zeros((1, 33), np.float32)
    np.testing.assert_array_equal(_core.rmsnorm(x, np.ones(33, np.float32), 1e-6), x)


def test_rmsnorm_weight_mismatch():
    with pytest.raises(ValueError):
        _core.rmsnorm(np.ones((2, 8), np.float32), np.ones(7, np.float32), 1e-6)


@pytest.mark.parametrize("n", SIZES)
def test_geglu(n):
    rng = np.random.default_rng(100 + n)
    g = (rng.standard_normal((2, n)) * 4).astype(np.float32)
    u = rng.standard_normal((2, n)).astype(np.float32)
    got = _core.geglu(g, u)
    assert_close_rel(got, ref.geglu(g, u), tol.GEGLU_REL, f"geglu n={n}")


def test_gelu_tanh_known_values():
    # gelu_tanh(0) = 0, large positive -> x, large negative -> 0; 1 -> 0.8411919906
    g = np.array([0.0, 1.0, -1.0, 10.0, -10.0], np.float32)
    got = _core.geglu(g, np.ones_like(g))
    np.testing.assert_allclose(got, [0.0, 0.8411919906, -0.1588080094, 10.0, 0.0], atol=1e-6)


def test_geglu_shape_mismatch():
    with pytest.raises(ValueError):
        _core.geglu(np.ones(4, np.float32), np.ones(5, np.float32))


@pytest.mark.parametrize("n", SIZES)
def test_softmax(n):
    rng = np.random.default_rng(200 + n)
    x = (rng.standard_normal((3, n)) * [[0.1], [5.0], [80.0]]).astype(np.float32)
    got = _core.softmax(x)
    d = np.abs(got - ref.softmax(x)).max()
    assert d <= tol.SOFTMAX_ABS, f"softmax n={n}: max |diff| {d:.3g}"
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=n * 2**-23)


def test_softmax_extremes():
    got = _core.softmax(np.array([[1e30, 0.0, -1e30], [-np.inf, 0.0, 0.0]], np.float32))
    np.testing.assert_allclose(got, [[1, 0, 0], [0, 0.5, 0.5]], atol=1e-7)
    with pytest.raises(ValueError):
        _core.softmax(np.zeros((2, 0), np.float32))


# ---- every ISA level against the twin ---------------------------------------------------------

# up to the selected level, so that under G3_ISA=scalar these tests run scalar code only
LEVELS = ["scalar", "avx2", "avx512"][
    : {"scalar": 1, "avx2": 2, "avx512": 3}[_core.isa()["selected"]]
]


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("n", SIZES)
def test_float_kernels_each_level(isa, n):
    rng = np.random.default_rng(300 + n)
    g = (rng.standard_normal((2, n)) * 4).astype(np.float32)
    u = rng.standard_normal((2, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    for name, got, want in [("geglu", _core.geglu(g, u, isa=isa), ref.geglu(g, u)),
                            ("gelu_bias", _core.gelu_bias(g, b, isa=isa), ref.gelu_bias(g, b))]:
        # relative to the row's largest value, but at least 1 (a 1-value row may be ~1e-12)
        d = (np.abs(got - want) / np.maximum(np.abs(want).max(-1, keepdims=True), 1.0)).max()
        assert d <= tol.GEGLU_REL, f"{name} {isa} n={n}: max rel err {d:.3g}"
    x = (rng.standard_normal((3, n)) * [[0.1], [5.0], [80.0]]).astype(np.float32)
    d = np.abs(_core.softmax(x, isa=isa) - ref.softmax(x)).max()
    assert d <= tol.SOFTMAX_ABS, f"softmax {isa} n={n}: max |diff| {d:.3g}"
    a, c = g[0], u[0]
    want = float(np.dot(a.astype(np.float64), c.astype(np.float64)))
    bound = (n + 8) * 2.0**-24 * float(np.abs(a.astype(np.float64) * c).sum())
    assert abs(_core.dot(a, c, isa=isa) - want) <= bound, f"dot {isa} n={n}"


def test_auto_is_the_selected_level():
    sel = _core.isa()["selected"]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 257)) * 5).astype(np.float32)
    u = rng.standard_normal((3, 257)).astype(np.float32)
    np.testing.assert_array_equal(_core.softmax(x), _core.softmax(x, isa=sel))
    np.testing.assert_array_equal(_core.geglu(x, u), _core.geglu(x, u, isa=sel))
    assert _core.dot(x[0], u[0]) == _core.dot(x[0], u[0], isa=sel)


def test_bad_isa_names():
    with pytest.raises(ValueError, match="isa must be"):
        _core.softmax(np.ones(4, np.float32), isa="sse9")
    if _core.isa()["cpu"] != "avx512":
        with pytest.raises(ValueError, match="not supported"):
            _core.softmax(np.ones(4, np.float32), isa="avx512")


@pytest.mark.parametrize("n", SIZES)
def test_layernorm(n):
    rng = np.random.default_rng(400 + n)
    x = (rng.standard_normal((3, n)) * [[0.01], [1.0], [300.0]] + [[0.0], [0.5], [-20.0]])
    x = x.astype(np.float32)
    w = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n)).astype(np.float32)
    x0 = x.copy()
    got = _core.layernorm(x, w, b, 1e-6)
    np.testing.assert_array_equal(x, x0)
    assert_close_rel(got, ref.layernorm(x, w, b, 1e-6), tol.LAYERNORM_REL, f"layernorm n={n}")


# ---- RoPE ------------------------------------------------------------------------------------

ROPE_TABLES = [  # (base, freq_scale) : local, global, global with linear factor 8
    (1e4, 1.0), (1e6, 1.0), (1e6, 1.0 / 8),
]


@pytest.mark.parametrize("base,scale", ROPE_TABLES)
@pytest.mark.parametrize("d", [2, 32, 128, 256])
def test_rope(base, scale, d):
    rng = np.random.default_rng(int(base) + d)
    pos = np.array([0, 1, 2, 7, 511, 512, 513, 1023, 4095, 8191, 16384, 32767, 32768], np.int64)
    x = rng.standard_normal((len(pos), 3, d)).astype(np.float32)
    x0 = x.copy()
    got = _core.rope(x, pos, base, scale)
    np.testing.assert_array_equal(x, x0)
    assert_close_rel(got, ref.rope(x, pos, base, scale), tol.ROPE_REL,
                     f"rope base={base:g} scale={scale:g} d={d}")
    # position 0 is the identity; a rotation keeps each pair's norm
    np.testing.assert_array_equal(got[0], x[0])
    h = d // 2
    np.testing.assert_allclose(got[..., :h] ** 2 + got[..., h:] ** 2,
                               x[..., :h] ** 2 + x[..., h:] ** 2, rtol=1e-5, atol=1e-6)


def test_rope_is_split_halves():
    """Pair (j, j + D/2) rotates, not (2j, 2j+1): a unit vector on dim 0 moves into dim D/2."""
    d = 8
    x = np.zeros((1, 1, d), np.float32)
    x[0, 0, 0] = 1.0
    got = _core.rope(x, np.array([1]), 1e4, 1.0)[0, 0]
    np.testing.assert_allclose(got[[0, d // 2]], [math.cos(1.0), math.sin(1.0)], atol=1e-7)
    assert np.count_nonzero(got) == 2


def test_rope_linear_scaling_is_position_division():
    """freq_scale 1/8 at position 8p equals no scaling at position p."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    a = _core.rope(x, np.array([8, 800, 32768]), 1e6, 1.0 / 8)
    b = _core.rope(x, np.array([1, 100, 4096]), 1e6, 1.0)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_rope_bad_args():
    with pytest.raises(ValueError):
        _core.rope(np.ones((2, 1, 7), np.float32), np.array([0, 1]), 1e4, 1.0)  # odd D
    with pytest.raises(ValueError):
        _core.rope(np.ones((2, 1, 8), np.float32), np.array([0]), 1e4, 1.0)  # T mismatch


# ---- sampler: distributions ------------------------------------------------------------------

SAMPLER_CASES = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.5, top_k=40),
    dict(top_k=1),
    dict(top_p=0.9),
    dict(temperature=0.8, top_k=64, top_p=0.95),
    dict(min_p=0.05),
    dict(top_k=100, top_p=0.5, min_p=0.1),
    dict(repetition_penalty=1.3, history=[5, 7, 7, 100, 3]),
    dict(repetition_penalty=0.8, history=[0, 1, 2]),
    dict(bias_ids=[3, 17], bias_values=[5.0, -100.0]),
    dict(bias_ids=[9], bias_values=[2.0], repetition_penalty=1.1, history=[9, 10],
         temperature=0.9, top_k=20, top_p=0.8, min_p=0.02),
]


def _call(fn, logits, rng=None, **kw):
    kw = dict(kw)
    for k in ("history", "bias_ids"):
        if k in kw:
            kw[k] = np.asarray(kw[k], np.int32)
    if "bias_values" in kw:
        kw["bias_values"] = np.asarray(kw["bias_values"], np.float32)
    return fn(logits, rng, **kw)


def _cases_fitting(sizes):
    """(n, case) pairs whose history/bias ids exist in a vocabulary of n"""
    for n in sizes:
        for c, kw in enumerate(SAMPLER_CASES):
            if max([*kw.get("history", []), *kw.get("bias_ids", [])], default=-1) < n:
                yield n, c


@pytest.mark.parametrize("n,case", list(_cases_fitting([1, 3, 31, 257, 2560])))
def test_sample_probs_vs_twin(n, case):
    kw = SAMPLER_CASES[case]
    rng = np.random.default_rng(1000 * case + n)
    logits = (rng.standard_normal(n) * 3).astype(np.float32)
    probs, greedy = _call(_core.sample_probs, logits, **kw)
    want, want_greedy = ref.sample_probs(logits, **kw)
    assert greedy == want_greedy
    # support compared after float32 rounding: a -100 bias leaves p ~ 1e-44, which float32 flushes
    np.testing.assert_array_equal(probs > 0, want.astype(np.float32) > 0,
                                  err_msg=f"support differs, case {kw}")
    d = np.abs(probs - want).max()
    assert d <= tol.SAMPLER_PROBS_ABS, f"case {kw}, n={n}: max |Δp| {d:.3g}"
    assert abs(float(probs.sum(dtype=np.float64)) - 1.0) < 1e-5


def test_sample_probs_ties_lowest_id():
    logits = np.array([1.0, 3.0, 3.0, 3.0, 0.0], np.float32)
    probs, greedy = _core.sample_probs(logits, None, top_k=2)
    assert greedy == 1
    np.testing.assert_allclose(probs, [0, 0.5, 0.5, 0, 0])


def test_sample_probs_temperature_zero_is_one_hot():
    logits = np.array([0.5, 2.0, -1.0], np.float32)
    probs, greedy = _core.sample_probs(logits, None, temperature=0.0)
    assert greedy == 1 and probs.tolist() == [0.0, 1.0, 0.0]


def test_sample_all_neg_inf_falls_back_to_argmax():
    logits = np.full(5, -np.inf, np.float32)
    probs, greedy = _core.sample_probs(logits, None)
    assert probs.sum() == 1.0 and probs[greedy] == 1.0


# ---- sampler: draws --------------------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(7)
    state = _core.rng_seed(1)
    for n in SIZES:
        logits = rng.standard_normal(n).astype(np.float32)
        assert _core.sample(logits, state, temperature=0.0) == int(np.argmax(logits))
        assert _core.sample(logits, state, temperature=0.0, top_k=5, top_p=0.1) == int(
            np.argmax(logits))


def test_greedy_after_bias_and_penalty():
    logits = np.array([5.0, 4.0, 1.0], np.float32)
    st = _core.rng_seed(0)
    assert _core.sample(logits, st, temperature=0.0, bias_ids=np.array([2], np.int32),
                        bias_values=np.array([10.0], np.float32)) == 2
    assert _core.sample(logits, st, temperature=0.0, repetition_penalty=2.0,
                        history=np.array([0], np.int32)) == 1


def _draws(logits, seed, n, **kw):
    st = _core.rng_seed(seed)
    return np.array([_core.sample(logits, st, **kw) for _ in range(n)])


def test_same_seed_same_tokens():
    logits = np.random.default_rng(3).standard_normal(257).astype(np.float32)
    a = _draws(logits, 42, 300, temperature=1.0, top_k=64, top_p=0.95)
    b = _draws(logits, 42, 300, temperature=1.0, top_k=64, top_p=0.95)
    np.testing.assert_array_equal(a, b)
    s1, s2 = _core.rng_seed(42), _core.rng_seed(42)
    np.testing.assert_array_equal(s1, s2)


def test_different_seeds_differ():
    """Two seeds over a flat 100-token distribution: they agree about as often as chance says
    (sum p^2 = 1%), not always."""
    logits = np.zeros(100, np.float32)
    a = _draws(logits, 1, 2000)
    b = _draws(logits, 2, 2000)
    agree = float((a == b).mean())
    assert agree < 0.03, f"seeds 1 and 2 agree on {agree:.1%} of draws (chance: 1%)"
    assert len(set(a.tolist())) > 90


def _chi2_quantile(df: int, q: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (accurate to ~1% for df >= 3)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(q)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.8),
                                dict(min_p=0.1, temperature=1.3)])
def test_draws_follow_distribution(kw):
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, 0.2], np.float32)
    probs, _ = _core.sample_probs(logits, None, **kw)
    n = 20000
    draws = _draws(logits, 12345, n, **kw)
    counts = np.bincount(draws, minlength=len(logits))
    assert (counts[probs == 0] == 0).all(), "drew a filtered token"
    live = probs > 0
    expected = probs[live].astype(np.float64) * n
    chi2 = float((((counts[live] - expected) ** 2) / expected).sum())
    df = int(live.sum()) - 1
    if df == 0:
        return
    limit = _chi2_quantile(max(df, 3), tol.CHI2_QUANTILE)
    assert chi2 < limit, f"chi2 {chi2:.1f} >= {limit:.1f} (df {df}); counts {counts.tolist()}"


# ---- sampler: bad arguments ------------------------------------------------------------------

BAD_SAMPLER_ARGS = [
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")), dict(min_p=-0.1),
    dict(min_p=2.0), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
    dict(top_k=-1), dict(temperature=float("nan")),
    dict(bias_ids=np.array([10], np.int32), bias_values=np.array([1.0], np.float32)),
    dict(bias_ids=np.array([-1], np.int32), bias_values=np.array([1.0], np.float32)),
    dict(bias_ids=np.array([1, 2], np.int32), bias_values=np.array([1.0], np.float32)),
    dict(repetition_penalty=1.2, history=np.array([10], np.int32)),
    dict(repetition_penalty=1.2, history=np.array([-3], np.int32)),
]


@pytest.mark.parametrize("kw", BAD_SAMPLER_ARGS)
def test_bad_sampler_args_raise(kw):
    logits = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        _core.sample(logits, _core.rng_seed(0), **kw)
    with pytest.raises(ValueError):
        _core.sample_probs(logits, None, **kw)


def test_bad_sampler_inputs():
    with pytest.raises(ValueError):
        _core.sample(np.zeros(0, np.float32), _core.rng_seed(0))
    with pytest.raises(TypeError):
        _core.sample(np.zeros(4, np.float32), np.zeros(3, np.uint64))
    with pytest.raises(TypeError):
        _core.sample(np.zeros(4, np.float32), [1, 2, 3, 4])


# ---- the dispatcher: one G3_ISA decision for every kernel family ------------------------------

_ISA_DUMP = "import json; from gemma3 import _core; print(json.dumps(_core.isa()))"
SIMD_FLOAT_KERNELS = ["dot", "axpy", "expsum", "softmax", "geglu", "gelu_bias"]
SCALAR_ONLY_KERNELS = ["rmsnorm", "layernorm", "rope"]


def _isa_in_subprocess(level: str) -> dict:
    import json
    import os
    import subprocess

    env = dict(os.environ, G3_ISA=level)
    out = subprocess.run([sys.executable, "-c", _ISA_DUMP], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return json.loads(out)


def test_dispatcher_reports_every_kernel_family():
    info = _core.isa()
    assert set(info["kernels"]) == set(SIMD_FLOAT_KERNELS + SCALAR_ONLY_KERNELS)
    assert info["packed"] in ("avx512vnni", "off")
    for k in SIMD_FLOAT_KERNELS:  # the float kernels follow the selected level
        assert info["kernels"][k] == info["selected"], k
    for k in SCALAR_ONLY_KERNELS:
        assert info["kernels"][k] == "scalar", k
    if info["packed"] == "avx512vnni":
        assert info["selected"] == "avx512"


def test_g3_isa_scalar_runs_only_scalar_code():
    """G3_ISA=scalar: the float kernels, the quantized traits and the packing all stay scalar."""
    info = _isa_in_subprocess("scalar")
    assert info["selected"] == "scalar" and info["env"] == "scalar"
    assert set(info["kernels"].values()) == {"scalar"}, info["kernels"]
    assert set(info["dot_f32"].values()) == {"scalar"}, info["dot_f32"]
    assert set(info["to_float"].values()) == {"scalar"}, info["to_float"]
    assert info["packed"] == "off"


def test_g3_isa_avx2_stops_at_avx2():
    if _core.isa()["cpu"] == "scalar":
        pytest.skip("this CPU has no AVX2")
    info = _isa_in_subprocess("avx2")
    assert info["selected"] == "avx2" and info["env"] == "avx2"
    for k in SIMD_FLOAT_KERNELS:
        assert info["kernels"][k] == "avx2", k
    for k in SCALAR_ONLY_KERNELS:
        assert info["kernels"][k] == "scalar", k
    levels = set(info["dot_f32"].values()) | set(info["to_float"].values())
    assert "avx512" not in levels and "avx2" in levels
    assert info["packed"] == "off"
