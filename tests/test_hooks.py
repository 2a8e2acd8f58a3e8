"""Interventions (gemma3.hooks, gemma3.sae, csrc/model/hooks.c).

Oracles:
  * transformers float32 with the equivalent torch forward hooks on the same weights
    (tests/fixtures/intervention_refs.npz, made by make_intervention_refs.py): head ablation,
    steering, patching, an SAE splice and greedy steered generation, on the tiny random model and
    the real 270M;
  * the built-ins' NumPy twins (their __call__) run as Python callbacks: the C ops must give the
    same logits bit for bit;
  * NumPy twins of SAE encode/decode written here from the published formulas;
  * exact properties where the math leaves no room (a zero value vector makes z zero, an
    unchanged attention pattern leaves the pass bit-identical).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import hooks
from gemma3.sae import SAE
from tolerances import INTERVENTION_LOGITS_REL

FIX = Path(__file__).parent / "fixtures"
TINY_DIR = FIX / "tiny" / "tiny"
REFS = FIX / "intervention_refs.npz"
SETUP = {  # as in make_intervention_refs.py
    "tiny": dict(LA=3, HEADS=[0, 2], LS=2, SCALE=4.0, STEER_POS=[3, 7], LP=4, PATCH_POS=5,
                 PATCH_HEAD=1, LSAE=5),
    "270m": dict(LA=6, HEADS=[0, 2], LS=6, SCALE=400.0, STEER_POS=[4, 9], LP=9, PATCH_POS=10,
                 PATCH_HEAD=1, LSAE=9),
}


@pytest.fixture(scope="module")
def tiny():
    m = gemma3.load(TINY_DIR)
    yield m
    m.close()


@pytest.fixture(scope="module")
def refs():
    return np.load(REFS)


@pytest.fixture(scope="module")
def m270():
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed: {e}")
    meta = json.loads((FIX / "intervention_refs.json").read_text())
    import hashlib

    if hashlib.sha256(Path(path).read_bytes()).hexdigest() != meta["270m_gguf_sha256"]:
        pytest.skip(f"{path} is not the file the fixtures were made from")
    m = gemma3.load(path, max_seq_len=256)
    yield m
    m.close()
    gc.collect()


def ids_of(z, key):
    return z[key].tolist()


# ---- against transformers ---------------------------------------------------------------------

def interventions(model, z, name):
    """{fixture key: (prompt key, fwd_hooks)} built from our own clean run, as a user would."""
    s = SETUP[name]
    p = f"{name}__"
    clean = ids_of(z, p + "ids_clean")
    _, cache = model.run_with_cache(clean, names=[f"blocks.{s['LP']}.hook_resid_pre",
                                                  f"blocks.{s['LA']}.attn.hook_z"], logits="none")
    la, ls = s["LA"], s["LS"]
    sae = SAE(*(z[p + "sae_" + k].astype(np.float32) for k in
                ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")),
              hook_name=f"blocks.{s['LSAE']}.hook_resid_post")
    return {
        "ablate_zero": ("clean", [(f"blocks.{la}.attn.hook_z", hooks.ablate_heads(s["HEADS"]))]),
        "ablate_mean": ("clean", [(f"blocks.{la}.attn.hook_z",
                                   hooks.ablate_heads(s["HEADS"], mean=z[p + "z_mean"]))]),
        "steer": ("clean", [(f"blocks.{ls}.hook_resid_post",
                             hooks.steer(z[p + "steer_vector"], s["SCALE"], s["STEER_POS"]))]),
        "patch_resid": ("corrupt", [(f"blocks.{s['LP']}.hook_resid_pre", hooks.patch(
            cache[f"blocks.{s['LP']}.hook_resid_pre"], positions=[s["PATCH_POS"]]))]),
        "patch_z": ("corrupt", [(f"blocks.{la}.attn.hook_z", hooks.patch(
            cache[f"blocks.{la}.attn.hook_z"], heads=[s["PATCH_HEAD"]]))]),
        "sae_splice": ("clean", [sae.splice()]),
    }


KINDS = ["ablate_zero", "ablate_mean", "steer", "patch_resid", "patch_z", "sae_splice"]


def check_against_ref(model, z, name, kind, cols=None):
    prompt, fwd = interventions(model, z, name)[kind]
    ids = ids_of(z, f"{name}__ids_{prompt}")
    ours = model.run_with_hooks(ids, fwd)
    ref = z[f"{name}__{kind}"]
    base = z[f"{name}__base_{prompt}"]
    if cols is not None:
        ours = ours[:, cols]
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= INTERVENTION_LOGITS_REL * scale, (
        f"{name} {kind}: max |ours - transformers| = {err:.3g}, scale {scale:.3g}")
    # the intervention did something the reference also did (the test could fail)
    assert np.abs(ref - base).max() > 100 * INTERVENTION_LOGITS_REL * scale


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_intervention_matches_transformers(tiny, refs, kind):
    check_against_ref(tiny, refs, "tiny", kind)


@pytest.mark.parametrize("kind", KINDS)
def test_270m_intervention_matches_transformers(m270, refs, kind):
    check_against_ref(m270, refs, "270m", kind, refs["270m__vocab_sel"])


@pytest.mark.parametrize("name", ["tiny", "270m"])
def test_steered_greedy_generation_matches_transformers(request, refs, name):
    model = request.getfixturevalue("tiny" if name == "tiny" else "m270")
    s, p = SETUP[name], f"{name}__"
    want = refs[p + "gen_steered"].tolist()
    fwd = [(f"blocks.{s['LS']}.hook_resid_post", hooks.steer(refs[p + "steer_vector"],
                                                              s["SCALE"]))]
    got = model.generate(ids_of(refs, p + "gen_prompt"), max_new_tokens=len(want),
                         temperature=0, return_ids=True, stop_token_ids=[], fwd_hooks=fwd)
    assert got == want
    plain = model.generate(ids_of(refs, p + "gen_prompt"), max_new_tokens=len(want),
                           temperature=0, return_ids=True, stop_token_ids=[])
    assert plain != want, "steering changed nothing: the test could not fail"
    if model.tokenizer is not None:  # the text path (stream) passes fwd_hooks too
        text = "".join(model.stream(ids_of(refs, p + "gen_prompt"), max_new_tokens=len(want),
                                    temperature=0, stop_token_ids=[], fwd_hooks=fwd))
        assert text == model.tokenizer.decode(want)


# ---- C built-ins vs their NumPy twins (Python callbacks) ---------------------------------------

def _twin(fn):
    return lambda act, hook: fn(act, hook)  # a plain function: runs as a Python callback


BUILTIN_CASES = {
    "ablate_zero_z": ("blocks.3.attn.hook_z", lambda cfg, c: hooks.ablate_heads([1, 3])),
    "ablate_mean_q_at": ("blocks.5.attn.hook_q", lambda cfg, c: hooks.ablate_heads(
        2, mean=c["blocks.5.attn.hook_q"], positions=[0, 4, 39])),
    "ablate_v_kvhead": ("blocks.1.attn.hook_v", lambda cfg, c: hooks.ablate_heads([1])),
    "steer_all": ("blocks.0.hook_resid_pre", lambda cfg, c: hooks.steer(
        np.linspace(-1, 1, cfg.hidden_size), 0.5)),
    "steer_mlp_out_at": ("blocks.6.hook_mlp_out", lambda cfg, c: hooks.steer(
        np.ones(cfg.hidden_size), -2.0, positions=[5, 5, 6])),
    "steer_final": ("ln_final.hook_normalized", lambda cfg, c: hooks.steer(
        np.ones(cfg.hidden_size), 0.25)),
    "patch_attn_out_at": ("blocks.2.hook_attn_out", lambda cfg, c: hooks.patch(
        c["blocks.2.hook_attn_out"][::-1].copy(), positions=[1, 20])),
    "patch_k_head": ("blocks.4.attn.hook_k", lambda cfg, c: hooks.patch(
        c["blocks.4.attn.hook_k"] * 2, heads=0)),
    "patch_short_source": ("blocks.7.hook_resid_mid", lambda cfg, c: hooks.patch(
        c["blocks.7.hook_resid_mid"][:10])),
    "patch_one_row_source": ("blocks.7.hook_resid_mid", lambda cfg, c: hooks.patch(
        c["blocks.7.hook_resid_mid"][:1])),  # position 0 only, not a row for every position
}


@pytest.mark.parametrize("case", sorted(BUILTIN_CASES))
def test_builtin_c_ops_equal_their_numpy_twins(tiny, refs, case):
    ids = refs["tiny__ids_clean"].tolist()[:12] + refs["tiny__ids_corrupt"].tolist()
    _, cache = tiny.run_with_cache(ids[::-1], logits="none")  # another prompt's activations
    name, make = BUILTIN_CASES[case]
    iv = make(tiny.config, cache)
    if case.startswith("patch_") and "source" in case:  # covers 10 / 1 of the 28 positions
        with pytest.raises(ValueError, match="covers 1.? positions"):
            tiny.run_with_hooks(ids, [(name, iv)])
        got = tiny.generate(ids, max_new_tokens=3, temperature=0, return_ids=True,
                            stop_token_ids=[], fwd_hooks=[(name, iv)])
        want = tiny.generate(ids, max_new_tokens=3, temperature=0, return_ids=True,
                             stop_token_ids=[], fwd_hooks=[(name, _twin(iv))])
        assert got == want
        return
    base = tiny.run_with_hooks(ids)
    c_ops = tiny.run_with_hooks(ids, [(name, iv)])
    twin = tiny.run_with_hooks(ids, [(name, _twin(iv))])
    np.testing.assert_array_equal(c_ops, twin)
    assert np.abs(c_ops - base).max() > 1e-3


@pytest.mark.parametrize("op,match", [
    ((99, 0, 0, 0, 64, None, 1.0, None, False), "layer 99 out of range"),
    ((-1, 0, 0, 0, 64, None, 1.0, None, False), "layer -1 out of range"),
    ((0, 9, 0, 0, 64, None, 1.0, None, False), "layer 0 out of range"),  # final: layer -1 only
    ((0, 12, 0, 0, 64, None, 1.0, None, False), "unknown point 12"),
    ((0, 0, 7, 0, 64, None, 1.0, None, False), "unknown kind 7"),
    ((0, 1, 0, 60, 8, None, 1.0, None, False), r"columns \[60, 68\) outside the width 64"),
    ((0, 0, 1, 0, 64, None, 1.0, None, False), "no source rows"),
    ((0, 0, 1, 0, 64, np.zeros((2, 64), np.float32), 1.0, None, False), "has one row, not 2"),
    ((0, 0, 0, 0, 64, np.zeros((1, 63), np.float32), 1.0, None, True), "63 values, not 64"),
    ((0, 0, 0, 0, 64, None, 1.0, np.array([-1]), False), "negative position"),
    ((0, 0, 2, 0, 0, None, 0.0, None, False), "without a function"),
    ((0, 0, 0), "must be .layer, point"),
])
def test_c_checks_every_op(tiny, op, match):
    """C trusts no caller: the private _core entry rejects bad plans before running."""
    core = tiny.engine.core
    with tiny.engine.exclusive():
        core.reset(0)
        with pytest.raises((ValueError, TypeError), match=match):
            core.forward(np.array([2, 5, 7], np.int32), 1, hooks=([op], None))
        assert core.n_past == 0
        tiny.engine.reset()


def test_no_hooks_is_the_plain_pass(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    plain = tiny.logits(ids)
    np.testing.assert_array_equal(tiny.run_with_hooks(ids), plain)
    np.testing.assert_array_equal(tiny.run_with_hooks(ids, []), plain)
    # a callback that reads only leaves every bit as it was, at every point
    seen = []
    np.testing.assert_array_equal(
        tiny.run_with_hooks(ids, [(lambda n: True, lambda a, h: seen.append(h.name))]), plain)
    assert len(seen) == len(hooks.hook_names(tiny.config.num_layers))


# ---- TransformerLens semantics ----------------------------------------------------------------

def test_hook_function_sees_run_with_cache_values(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    _, cache = tiny.run_with_cache(ids, logits="none")
    got = {}

    def keep(act, hook):
        got[hook.name] = act.copy()
        assert act.flags.writeable
        np.testing.assert_array_equal(hook.positions, np.arange(len(ids)))

    tiny.run_with_hooks(ids, [(lambda n: "hook_attn_scores" not in n, keep)])
    assert set(got) == set(cache) - {n for n in cache if n.endswith("hook_attn_scores")}
    for n, a in got.items():
        np.testing.assert_array_equal(a, cache[n], err_msg=n)


def test_return_value_replaces_and_in_place_writes(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    name = "blocks.2.hook_resid_post"

    def in_place(a, h):
        a *= 0.5

    def returned(a, h):
        return a * 0.5

    np.testing.assert_array_equal(tiny.run_with_hooks(ids, [(name, in_place)]),
                                  tiny.run_with_hooks(ids, [(name, returned)]))
    with pytest.raises(ValueError, match="returned shape"):
        tiny.run_with_hooks(ids, [(name, lambda a, h: a[:3])])


def test_zero_value_vectors_zero_the_attention_output(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    z = {}
    tiny.run_with_hooks(ids, [("blocks.4.attn.hook_v", lambda a, h: np.zeros_like(a)),
                              ("blocks.4.attn.hook_z", lambda a, h: z.setdefault("z", a.copy()))])
    assert not z["z"].any()


def test_pattern_hook_recomputes_z(tiny, refs):
    """A changed pattern gives z = pattern @ v (float64 NumPy here, computed from the captured v);
    an untouched one leaves the pass bit-identical."""
    ids = refs["tiny__ids_clean"].tolist()
    cfg = tiny.config
    plain = tiny.logits(ids)
    np.testing.assert_array_equal(
        tiny.run_with_hooks(ids, [("blocks.5.attn.hook_pattern", lambda p, h: p * 1.0)]), plain)
    _, cache = tiny.run_with_cache(ids, names=["blocks.5.attn.hook_v"], logits="none")
    v = np.repeat(cache["blocks.5.attn.hook_v"], cfg.num_heads // cfg.num_kv_heads, axis=1)

    def uniform(p, h):
        mask = p > 0
        return mask / mask.sum(-1, keepdims=True)

    got = {}
    tiny.run_with_hooks(ids, [("blocks.5.attn.hook_pattern", uniform),
                              ("blocks.5.attn.hook_z", lambda a, h: got.setdefault("z", a.copy()))])
    T = len(ids)
    P = np.tril(np.ones((T, T)))
    want = np.einsum("qk,khd->qhd", P / P.sum(-1, keepdims=True), v.astype(np.float64))
    np.testing.assert_allclose(got["z"], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_scores_hook_flows_into_pattern(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    seen = {}

    def mask_all_but_self(s, h):
        d = np.full_like(s, -np.inf)
        idx = np.arange(s.shape[1])
        d[:, idx, idx] = 0
        return d

    tiny.run_with_hooks(ids, [("blocks.5.attn.hook_attn_scores", mask_all_but_self),
                              ("blocks.5.attn.hook_pattern",
                               lambda p, h: seen.setdefault("p", p.copy()))])
    np.testing.assert_array_equal(seen["p"], np.broadcast_to(np.eye(len(ids)), seen["p"].shape))


def test_bad_hooks_fail_clearly(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    with pytest.raises(ValueError, match="unknown activation name"):
        tiny.run_with_hooks(ids, [("blocks.1.hook_nope", lambda a, h: None)])
    with pytest.raises(ValueError, match="layer out of range"):
        tiny.run_with_hooks(ids, [("blocks.99.hook_resid_pre", lambda a, h: None)])
    with pytest.raises(TypeError, match="not callable"):
        tiny.run_with_hooks(ids, [("blocks.1.hook_resid_pre", 3)])
    with pytest.raises(ValueError, match="steering vector has 3 values"):
        tiny.run_with_hooks(ids, [("blocks.1.hook_resid_pre", hooks.steer([1, 2, 3]))])
    with pytest.raises(ValueError, match="head 9 out of range"):
        tiny.run_with_hooks(ids, [("blocks.1.attn.hook_z", hooks.ablate_heads(9))])
    with pytest.raises(ValueError, match="head interventions"):
        tiny.run_with_hooks(ids, [("blocks.1.hook_resid_pre", hooks.ablate_heads(0))])
    with pytest.raises(ValueError, match="run_with_hooks only"):
        tiny.generate(ids, max_new_tokens=2, return_ids=True,
                      fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, h: None)])


def test_exception_in_a_hook_propagates_and_model_stays_usable(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    plain = tiny.logits(ids)
    want = tiny.generate(ids[:8], max_new_tokens=6, temperature=0, return_ids=True,
                         stop_token_ids=[])

    class Boom(Exception):
        pass

    def boom(a, h):
        raise Boom(h.name)

    with pytest.raises(Boom, match="blocks.3.hook_mlp_out"):
        tiny.run_with_hooks(ids, [("blocks.3.hook_mlp_out", boom)])
    np.testing.assert_array_equal(tiny.logits(ids), plain)
    # a hook that fails in the middle of a generation (step 3): the cache it left is not reused
    calls = []

    def late(a, h):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("late")

    with pytest.raises(Boom):
        tiny.generate(ids[:8], max_new_tokens=6, temperature=0, return_ids=True,
                      stop_token_ids=[], fwd_hooks=[("blocks.6.hook_resid_pre", late)])
    assert tiny.generate(ids[:8], max_new_tokens=6, temperature=0, return_ids=True,
                         stop_token_ids=[]) == want
    np.testing.assert_array_equal(tiny.logits(ids), plain)


def test_hooked_generation_leaves_no_hooked_cache_behind(tiny, refs):
    """The next unhooked call must not reuse K/V written under a hook (prefix reuse)."""
    ids = refs["tiny__ids_clean"].tolist()[:10]
    want = tiny.generate(ids, max_new_tokens=5, temperature=0, return_ids=True, stop_token_ids=[])
    st = hooks.steer(refs["tiny__steer_vector"], SETUP["tiny"]["SCALE"])
    steered = tiny.generate(ids, max_new_tokens=5, temperature=0, return_ids=True,
                            stop_token_ids=[], fwd_hooks=[("blocks.2.hook_resid_post", st)])
    assert steered != want
    assert tiny.generate(ids, max_new_tokens=5, temperature=0, return_ids=True,
                         stop_token_ids=[]) == want


def test_steer_positions_in_generation_are_absolute(tiny, refs):
    """Steering position 12 of a 10-token prompt acts at the third generated step only."""
    ids = refs["tiny__ids_clean"].tolist()[:10]
    v = np.ones(tiny.config.hidden_size)
    seen = []
    tiny.generate(ids, max_new_tokens=4, temperature=0, return_ids=True, stop_token_ids=[],
                  fwd_hooks=[("blocks.2.hook_resid_post", hooks.steer(v, 1.0, positions=[12])),
                             ("blocks.2.hook_resid_post",
                              lambda a, h: seen.append((h.positions.tolist(), a.copy())))])
    assert [p for p, _ in seen] == [list(range(10)), [10], [11], [12]]


# ---- SAEs -------------------------------------------------------------------------------------

def twin_encode(p, x, arch, k=None):
    pre = x.astype(np.float64) @ p["W_enc"].astype(np.float64) + p["b_enc"]
    if arch == "jumprelu":
        return np.where((pre > p["threshold"]) & (pre > 0), pre, 0.0)
    if arch == "relu":
        return np.maximum(pre, 0.0)
    out = np.zeros_like(pre)
    for r in range(len(pre)):
        top = np.argsort(-pre[r])[:k]
        out[r, top] = np.maximum(pre[r, top], 0)
    return out


def random_params(rng, d_in, d_sae):
    return {"W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32) / np.sqrt(d_in),
            "b_enc": rng.standard_normal(d_sae).astype(np.float32) * 0.1,
            "threshold": np.abs(rng.standard_normal(d_sae)).astype(np.float32) * 0.3,
            "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32) / np.sqrt(d_sae),
            "b_dec": rng.standard_normal(d_in).astype(np.float32) * 0.1}


def write_gemma_scope(d: Path, p, fmt):
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        np.savez(d / "params.npz", **p)
        return d / "params.npz"
    from safetensors.numpy import save_file

    save_file(p, str(d / "params.safetensors"))
    return d / "params.safetensors"


def write_saelens(d: Path, p, arch, k=None, hook="blocks.3.hook_resid_post"):
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    cfg = {"d_in": p["W_enc"].shape[0], "d_sae": p["W_enc"].shape[1], "hook_name": hook,
           "architecture": "standard" if arch in ("relu", "topk") else arch,
           "activation_fn_str": arch if arch != "jumprelu" else "relu",
           "apply_b_dec_to_input": False, "normalize_activations": "none"}
    if k is not None:
        cfg["activation_fn_kwargs"] = {"k": k}
    (d / "cfg.json").write_text(json.dumps(cfg))
    q = dict(p) if arch == "jumprelu" else {n: v for n, v in p.items() if n != "threshold"}
    save_file(q, str(d / "sae_weights.safetensors"))
    return d


@pytest.mark.parametrize("layout,arch", [("npz", "jumprelu"), ("safetensors", "jumprelu"),
                                         ("saelens", "jumprelu"), ("saelens", "relu"),
                                         ("saelens", "topk")])
def test_sae_encode_decode_equal_numpy_twin(tmp_path, layout, arch):
    rng = np.random.default_rng(7)
    p = random_params(rng, 64, 96)
    if layout == "saelens":
        sae = SAE.load(write_saelens(tmp_path / "s", p, arch, k=8 if arch == "topk" else None))
        assert sae.hook_name == "blocks.3.hook_resid_post"
    else:
        sae = SAE.load(write_gemma_scope(tmp_path / "resid_post" / "layer_4_width_96", p, layout))
        assert sae.hook_name == "blocks.4.hook_resid_post"  # from the folder names
    assert sae.architecture == arch
    x = rng.standard_normal((20, 64)).astype(np.float32)
    f = sae.encode(x)
    want = twin_encode(p, x, arch, 8)
    scale = np.abs(want).max()
    np.testing.assert_allclose(f, want, rtol=0, atol=1e-5 * scale)
    assert (f != 0).sum() > 0 and (f == 0).sum() > 0
    np.testing.assert_allclose(sae.decode(f), want @ p["W_dec"].astype(np.float64) + p["b_dec"],
                               rtol=0, atol=1e-5 * scale)


def test_gemma_scope_config_names_the_hook(tmp_path):
    p = random_params(np.random.default_rng(1), 16, 8)
    f = write_gemma_scope(tmp_path / "x", p, "safetensors")
    (tmp_path / "x" / "config.json").write_text(json.dumps(
        {"hf_hook_point_in": "model.language_model.layers.7.output", "width": 8}))
    assert SAE.load(f).hook_name == "blocks.7.hook_resid_post"
    assert SAE.load(f, hook_name="blocks.2.hook_mlp_out").hook_name == "blocks.2.hook_mlp_out"


@pytest.mark.parametrize("change,match", [
    (lambda p: p.pop("threshold"), "tensor 'threshold' is missing"),
    (lambda p: p.pop("W_dec"), "tensor 'W_dec' is missing"),
    (lambda p: p.update(W_dec=p["W_dec"][:, :5].copy()), "tensor 'W_dec' has shape"),
    (lambda p: p.update(b_enc=np.zeros(3, np.float32)), "tensor 'b_enc' has shape"),
    (lambda p: p.update(W_enc=np.zeros(16, np.float32)), "tensor 'W_enc' must be"),
    (lambda p: p.update(extra=np.zeros(2, np.float32)), "unexpected tensor 'extra'"),
    (lambda p: p["b_dec"].__setitem__(0, np.nan), "tensor 'b_dec' holds non-finite"),
])
@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_hostile_sae_files_fail_clearly(tmp_path, change, match, fmt):
    p = random_params(np.random.default_rng(2), 16, 8)
    change(p)
    f = write_gemma_scope(tmp_path, p, fmt)
    with pytest.raises(gemma3.FormatError, match=match) as e:
        SAE.load(f, hook_name="blocks.0.hook_resid_post")
    assert str(f) in str(e.value)


def test_hostile_sae_containers(tmp_path):
    bad = tmp_path / "params.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(gemma3.FormatError, match="params.npz"):
        SAE.load(bad)
    st = tmp_path / "params.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(gemma3.FormatError):
        SAE.load(st)
    d = write_saelens(tmp_path / "s", random_params(np.random.default_rng(3), 16, 8), "relu")
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 9}))
    with pytest.raises(gemma3.FormatError, match="d_sae = 9"):
        SAE.load(d)
    (d / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(gemma3.UnsupportedError, match="normalize_activations"):
        SAE.load(d)
    (d / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(gemma3.UnsupportedError, match="gated"):
        SAE.load(d)
    with pytest.raises(FileNotFoundError):
        SAE.load(tmp_path / "nothing")


def test_run_with_cache_gives_sae_acts(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    p = {k: refs["tiny__sae_" + k].astype(np.float32)
         for k in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")}
    sae = SAE(**p, hook_name="blocks.5.hook_resid_post")
    _, cache = tiny.run_with_cache(ids, names=["blocks.2.hook_resid_pre"], saes=[sae],
                                   logits="none")
    acts = cache["blocks.5.hook_resid_post.hook_sae_acts_post"]
    want = twin_encode(p, cache["blocks.5.hook_resid_post"], "jumprelu")
    np.testing.assert_allclose(acts, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert acts.shape == (len(ids), 128) and acts.any()


def test_splice_with_error_term_is_nearly_the_plain_pass(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    sae = SAE(*(refs["tiny__sae_" + k].astype(np.float32) for k in
                ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")),
              hook_name="blocks.5.hook_resid_post")
    plain = tiny.logits(ids)
    with_err = tiny.run_with_hooks(ids, [sae.splice(error_term=True)])
    spliced = tiny.run_with_hooks(ids, [sae.splice()])
    # x' = recon + (x - recon): x up to float32 rounding of the two sums
    assert np.abs(with_err - plain).max() < 1e-4 * np.abs(plain).max()
    assert np.abs(spliced - plain).max() > 0.1
    # an edit through the error-term splice: removing every feature leaves x - recon + b_dec
    edited = tiny.run_with_hooks(ids, [sae.splice(error_term=True, edit=lambda f: f * 0)])
    assert np.abs(edited - plain).max() > 0.1


def test_top_activations(tiny, refs):
    sae = SAE(*(refs["tiny__sae_" + k].astype(np.float32) for k in
                ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")),
              hook_name="blocks.5.hook_resid_post")
    texts = [refs["tiny__ids_clean"].tolist(), refs["tiny__ids_corrupt"].tolist(),
             refs["tiny__gen_prompt"].tolist()]
    feats = [0, 5, 17]
    got = gemma3.sae.top_activations(tiny, sae, texts, feats, k=4, chunk=3)
    every = []
    for i, t in enumerate(texts):
        _, c = tiny.run_with_cache(t, saes=[sae], names=[], logits="none")
        every.append(c["blocks.5.hook_resid_post.hook_sae_acts_post"])
    for f in feats:
        allv = sorted((float(a[p, f]) for a in every for p in range(1, len(a)) if a[p, f] > 0),
                      reverse=True)[:4]
        # a column subset in chunks of 3 rows: float32 sums in another order, so near-ties may
        # swap; each hit's value is the twin's at its place, and together they are the top 4
        vals = [h.value for h in got[f]]
        assert vals == sorted(vals, reverse=True) and len(vals) == len(allv) > 0
        for h in got[f]:
            assert h.token == texts[h.text][h.position]
            assert h.value == pytest.approx(float(every[h.text][h.position, f]), rel=1e-5)
        np.testing.assert_allclose(vals, allv, rtol=1e-5)


def test_a_hook_cannot_reenter_the_model(tiny, refs):
    ids = refs["tiny__ids_clean"].tolist()
    plain = tiny.logits(ids)
    with pytest.raises(RuntimeError, match="already running a call"):
        tiny.run_with_hooks(ids, [("blocks.0.hook_resid_post", lambda a, h: tiny.logits(ids))])
    np.testing.assert_array_equal(tiny.logits(ids), plain)


def test_hooked_calls_keep_no_references(tiny, refs):
    """Sources, position arrays and callbacks are released after every call (py_hooks.c)."""
    import sys

    ids = refs["tiny__ids_clean"].tolist()
    src = np.ones((len(ids), tiny.config.hidden_size), np.float32)
    pos = np.array([1, 3], np.int64)

    def fn(a, h):
        return None

    fwd = [("blocks.1.hook_resid_pre", hooks.patch(src, positions=pos)),
           ("blocks.2.hook_resid_pre", fn)]
    iv = fwd[0][1]
    tiny.run_with_hooks(ids, fwd)
    gc.collect()  # a Plan's closures refer back to it: a cycle the collector frees
    before = (sys.getrefcount(iv.source), sys.getrefcount(iv.positions), sys.getrefcount(fn))
    for _ in range(20):
        tiny.run_with_hooks(ids, fwd)
        with pytest.raises(ZeroDivisionError):
            tiny.run_with_hooks(ids, [("blocks.2.hook_resid_pre", lambda a, h: 1 / 0)] + fwd)
    gc.collect()
    assert (sys.getrefcount(iv.source), sys.getrefcount(iv.positions),
            sys.getrefcount(fn)) == before
