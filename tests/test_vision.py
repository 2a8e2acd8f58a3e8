"""Vision: the SigLIP tower + projector, image prompts and their attention, against the float32
transformers reference of a tiny Gemma3ForConditionalGeneration (fixtures/make_tiny_vision.py).

The fixture drives the text model with ids: <start_of_image> 5, <end_of_image> 6,
<image_soft_token> 7, 4 soft tokens per image (a 4 x 4 patch grid pooled 2 x 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import multimodal as MM
from gemma3 import vision as V
from tolerances import (BF16_GEMM_SUM_U, VISION_ATTN_BF16_REL, VISION_ATTN_F32_REL,
                        VISION_BF16_REL)

D = Path(__file__).parent / "fixtures" / "tiny_vision"
TEXT_ONLY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"
REF = np.load(D / "reference.npz")
M, IMG, BOI, EOI = 4, 7, 5, 6

# Tolerances (measured values in comments). Both sides float32; they differ in summation order
# only (BLAS vs PyTorch) and LayerNorm's reduction (double here, float32 pairwise in torch).
TOWER_ABS = 1e-4  # hidden 3.3e-7, projected 8.3e-7
LOGITS_ABS = 1e-4  # 3.4e-6 (pan & scan prompt, 4 images)
ATTN_ABS = 1e-4  # probabilities, <= 1
GGUF_VS_HF_ABS = 1e-6  # same weights and arithmetic: 0 measured
F16_MMPROJ_ABS = 5e-3  # llama.cpp's F16 matrices: 1.3e-3 on the logits
Q8_ABS = 0.25  # q8_0 tower and text matrices on load: 0.117 on logits of magnitude ~4

SOURCES = {
    "hf": dict(path=D / "hf"),
    "hf-hub": dict(path=D / "hf-hub"),
    "hf-new": dict(path=D / "hf-new"),
    "gguf": dict(path=D / "text.gguf", mmproj=D / "mmproj.gguf"),
    "gguf-oldffn": dict(path=D / "text.gguf", mmproj=D / "mmproj-oldffn.gguf"),
}
CASES = ("single", "pas", "two")


def _report(a, b, what):
    d = np.abs(a - b)
    i = np.unravel_index(np.argmax(d), d.shape)
    return f"{what}: shape {a.shape}, max |diff| {d.max():.3g} at {i} ({a[i]} vs {b[i]})"


def _close(a, b, tol, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert np.abs(a - b).max() <= tol, _report(a, b, what)


@pytest.fixture(scope="module")
def models():
    return {k: gemma3.load(**v) for k, v in SOURCES.items()}


def _pics(case):
    px = REF[f"pixels_{case}"]
    # "two" holds two separate pictures; "pas" one picture with its crops; "single" one
    return [px[:1], px[1:]] if case == "two" else [px]


@pytest.mark.parametrize("src", list(SOURCES))
@pytest.mark.parametrize("case", CASES)
def test_tower_and_projector(models, src, case):
    vt = models[src].vision
    proj, hidden = vt.encode_with_hidden(REF[f"pixels_{case}"])
    _close(hidden, REF[f"hidden_{case}"], TOWER_ABS, f"{src} hidden {case}")
    _close(proj, REF[f"proj_{case}"], TOWER_ABS, f"{src} projected {case}")


def test_config_from_both_formats(models):
    a, b = models["hf"].vision.config, models["gguf"].vision.config
    assert a.mm_tokens_per_image == b.mm_tokens_per_image == M
    assert (a.boi_token_id, a.eoi_token_id, a.image_token_id) == (BOI, EOI, IMG)
    assert (b.boi_token_id, b.eoi_token_id, b.image_token_id) == (BOI, EOI, IMG)
    assert a.pool == b.pool == 2 and a.tokens_per_side == 2
    assert a.text_hidden_size == b.text_hidden_size == 64


@pytest.mark.parametrize("src", list(SOURCES))
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(models, src, case):
    lg = models[src].logits(REF[f"ids_{case}"], images=_pics(case))
    _close(lg, REF[f"logits_{case}"], LOGITS_ABS, f"{src} logits {case}")


@pytest.mark.parametrize("case", CASES)
def test_gguf_pair_equals_safetensors(models, case):
    a = models["hf"].logits(REF[f"ids_{case}"], images=_pics(case))
    b = models["gguf"].logits(REF[f"ids_{case}"], images=_pics(case))
    _close(a, b, GGUF_VS_HF_ABS, f"gguf vs hf {case}")


def test_f16_mmproj_close():
    m = gemma3.load(D / "text.gguf", mmproj=D / "mmproj-f16.gguf", vision_dtype="f32")
    assert m.vision.compute == "f32"
    lg = m.logits(REF["ids_pas"], images=[REF["pixels_pas"]])
    _close(lg, REF["logits_pas"], F16_MMPROJ_ABS, "f16 mmproj logits")


def test_q8_0_on_load():
    m = gemma3.load(D / "hf", dtype="q8_0")
    lg = m.logits(REF["ids_pas"], images=[REF["pixels_pas"]])
    _close(lg, REF["logits_pas"], Q8_ABS, "q8_0 logits")


def test_encode_image(models):
    m = models["hf"]
    e = m.encode_image(REF["pixels_single"][0])
    assert e.shape == (M, 64) and e.dtype == np.float32
    _close(e, REF["proj_single"][0], TOWER_ABS, "encode_image")
    e4 = m.encode_image(REF["pixels_pas"], pan_and_scan=True)
    assert e4.shape == (4, M, 64)


def test_bidirectional_within_each_image(models):
    m = models["hf"]
    ids = REF["ids_pas"]
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(4)]
    _, cache = m.run_with_cache(ids, names=names, images=[REF["pixels_pas"]], logits="none")
    starts = np.nonzero(ids == IMG)[0][::M]
    assert len(starts) == 4
    for L in range(4):
        p = cache[names[L]]  # (heads, T, T)
        _close(p, REF["attn_pas"][L], ATTN_ABS, f"layer {L} attention")
        for k, s in enumerate(starts):
            blk = p[:, s:s + M, s:s + M]
            assert (blk > 0).all(), f"layer {L} image {k}: not bidirectional within the image"
            if k + 1 < len(starts):  # never the next image (nor anything after this one)
                assert (p[:, s:s + M, s + M:] == 0).all()
        text = np.nonzero(ids != IMG)[0]
        for t in text:  # text stays causal
            assert (p[:, t, t + 1:] == 0).all()


def test_consecutive_images_are_separate_blocks(models):
    """Two images whose soft-token runs touch: two bidirectional blocks, not one (the forward's
    mask value differs per image); HF would merge such runs, so compare with two runs fed as
    one-image prompts' semantics: the first image must not see the second."""
    m = models["hf"]
    ids = np.array([2, 20, BOI] + [IMG] * (2 * M) + [EOI, 30], np.int32)
    px = REF["pixels_two"]
    name = "blocks.0.attn.hook_pattern"
    _, cache = m.run_with_cache(ids, names=[name], images=[px[:1], px[1:]], logits="none")
    p = cache[name]
    a, b = 3, 3 + M
    assert (p[:, a:a + M, a:a + M] > 0).all() and (p[:, b:b + M, b:b + M] > 0).all()
    assert (p[:, a:a + M, b:b + M] == 0).all()


def test_tower_attention_capture(models):
    vt = models["hf"].vision
    for L in range(2):
        a = vt.attention(REF["pixels_single"][0], L)
        assert a.shape == (4, 16, 16)
        _close(a, REF["tower_attn_single"][L], ATTN_ABS, f"tower layer {L} attention")
    proj = vt.encode(REF["pixels_single"])  # capture leaves the outputs alone
    _close(proj, REF["proj_single"], TOWER_ABS, "after capture")


def test_kv_cache_reuse_compares_images(models):
    """Same ids, different pixels: the cached image must not be reused; same pixels: it is."""
    m = models["gguf"]
    ids = [int(t) for t in REF["ids_single"]]
    pa, pb = REF["pixels_two"][:1], REF["pixels_two"][1:]
    fresh_b = m.logits(ids, images=[pb])[-1]
    g = dict(max_new_tokens=3, temperature=0, return_ids=True, stop_token_ids=[])
    m.generate(ids, images=[pa], **g)
    calls = []
    enc = m.vision.encode
    m.vision.encode = lambda px: (calls.append(len(px)), enc(px))[1]
    try:
        out_b = m.generate(ids, images=[pb], **g)  # same ids as the cached prompt
        assert calls == [1], "a different image must be encoded and fed again"
        assert m.engine.images and m.engine.images[0][1] == MM._digest(pb[0])
        m.reset()
        first = m.generate(ids, images=[pb], **g)
        assert first == out_b
        calls.clear()
        # the cache holds the prompt + 2 new tokens; this prompt extends it
        again = m.generate(ids + first[:2], images=[pb], **g)
        assert calls == [], "the cached image should have been reused"
        assert again[:1] == first[2:]
    finally:
        m.vision.encode = enc
    assert np.abs(m.logits(ids, images=[pb])[-1] - fresh_b).max() == 0


def test_reusable_prefix_rules():
    sp = MM.ImageSpan(5, np.zeros(1), "a")
    assert MM.reusable_prefix(20, [(5, "a")], [sp], 4) == 20
    assert MM.reusable_prefix(20, [(5, "b")], [sp], 4) == 5
    assert MM.reusable_prefix(20, [(5, "a")], [], 4) == 5
    assert MM.reusable_prefix(7, [(5, "a")], [sp], 4) == 5  # never inside an image
    assert MM.chunk_bounds(10, [2], 4, 3) == [(0, 6), (6, 9), (9, 10)]


def test_grid_helpers():
    g = V.token_grid(np.arange(256.0))
    assert g.shape == (16, 16) and g[1, 0] == 16
    boxes = V.token_boxes((800, 300))
    assert boxes.shape == (256, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 50, 18.75])
    np.testing.assert_allclose(boxes[-1], [750, 281.25, 800, 300])
    crop = V.token_boxes((800, 300), 2, box=(267, 0, 534, 300))
    np.testing.assert_allclose(crop[3], [400.5, 150, 534, 300])
    with pytest.raises(ValueError):
        V.token_grid(np.zeros(10))


def test_errors_leave_model_usable(models, tmp_path):
    m = models["hf"]
    ids, px = REF["ids_single"], REF["pixels_single"]
    bad = [
        (dict(images=[px, px]), ValueError, "room for 1 images"),
        (dict(images=[px[:, :, :28]]), ValueError, r"\(n, 3, 56, 56\)"),
        (dict(images=[np.full_like(px, np.nan)]), ValueError, "NaN"),
        (dict(images=[px.astype(np.int32)]), ValueError, "uint8"),
        (dict(images=[b"not an image"]), ValueError, "not an image"),
        (dict(images=[np.zeros((0, 5, 3), np.uint8)]), ValueError, None),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            m.logits(ids, **kw)
        _close(m.logits(ids, images=[px]), REF["logits_single"], LOGITS_ABS, "after error")
    odd = np.array([2, BOI] + [IMG] * (M - 1) + [EOI], np.int32)
    with pytest.raises(ValueError, match="multiple"):
        m.logits(odd, images=[px])
    with pytest.raises(ValueError, match="pixel_values"):
        m.vision.encode(np.zeros((1, 3, 56, 57), np.float32))
    with pytest.raises(ValueError, match="layer"):
        m.vision.attention(px, 2)
    text_only = gemma3.load(TEXT_ONLY)
    assert text_only.vision is None
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.logits([2, 7, 7, 7, 7], images=[px])
    with pytest.raises(gemma3.FormatError, match="width"):
        V.load_mmproj(D / "mmproj.gguf", text_hidden=32)
    with pytest.raises(gemma3.UnsupportedError, match="clip"):
        gemma3.load(D / "text.gguf", mmproj=D / "text.gguf")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes((D / "mmproj.gguf").read_bytes()[:5000])
    with pytest.raises(gemma3.FormatError):
        gemma3.load(D / "text.gguf", mmproj=trunc)
    with pytest.raises(FileNotFoundError):
        gemma3.load(D / "text.gguf", mmproj=tmp_path / "nope.gguf")
    # a checkpoint missing one vision tensor
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((D / "hf" / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(cfg))
    _copy_without(D / "hf" / "model.safetensors", broken / "model.safetensors",
                  "vision_tower.post_layernorm.bias")
    with pytest.raises(gemma3.FormatError, match="post_layernorm.bias"):
        gemma3.load(broken)
    _close(m.logits(ids, images=[px]), REF["logits_single"], LOGITS_ABS, "still usable")


def _copy_without(src: Path, dst: Path, drop: str) -> None:
    """Rewrites a safetensors file without one tensor (the format is simple enough by hand)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out, blobs, off = {}, [], 0
    for name, info in header.items():
        if name == drop or name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        blobs.append(data[b:e])
        out[name] = dict(info, data_offsets=[off, off + e - b])
        off += e - b
    h = json.dumps(out).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_vision_core_rejects_bad_configs():
    from gemma3 import _core

    base = V.VisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=37,
                          num_layers=0, num_heads=4, mm_tokens_per_image=4, text_hidden_size=8)
    for bad in (dict(image_size=50), dict(mm_tokens_per_image=5), dict(mm_tokens_per_image=9),
                dict(num_heads=5)):
        cfg = V.VisionConfig(**{**base.__dict__, **bad})
        with pytest.raises((gemma3.UnsupportedError, ValueError)):
            _core.VisionTower(cfg.to_core(), {})
    with pytest.raises(gemma3.FormatError, match="missing vision tensor"):
        _core.VisionTower(base.to_core(), {})


def _tokenizer():
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model (its tokenizer) is not installed")
    md = gemma3.GGUFFile(path).metadata
    return gemma3.Tokenizer.from_gguf_metadata(md)


def test_placeholder_expansion_with_the_gemma_tokenizer():
    tok = _tokenizer()
    cfg = V.VisionConfig(mm_tokens_per_image=4)
    one = np.zeros((1, 3, 896, 896), np.float32)
    three = np.zeros((3, 3, 896, 896), np.float32)
    ids, spans = MM.expand_text("You are an assistant.\n\n<start_of_image>Describe.", [one], tok,
                               cfg)
    boi = ids.index(V.BOI_ID)
    assert ids[boi - 1] == 110  # "\n\n" + "\n\n" merged into one 4-newline token
    assert ids[boi + 1:boi + 5] == [V.IMAGE_ID] * 4 and ids[boi + 5] == V.EOI_ID
    assert spans[0].start == boi + 1
    # pan & scan: "Here is the original image" + 1 + crops full sequences
    ids, spans = MM.expand_text("<start_of_image>", [three], tok, cfg)
    assert ids.count(V.BOI_ID) == 3 and len(spans) == 3
    before = "Here is the original image \n\n<start_of_image>"
    assert ids[:spans[0].start] == tok.encode(before, parse_special=True)
    # chat: "user\n" and the image's "\n\n" are one piece of text, as in the whole string
    segs = [("<start_of_turn>user\n", True), ("<start_of_image>", True), ("Hi", False),
            ("<end_of_turn>\n", True), ("<start_of_turn>model\n", True)]
    ids, spans = MM.expand_segments(segs, [one], tok, cfg)
    assert ids[:spans[0].start] == tok.encode("<start_of_turn>user\n\n\n<start_of_image>",
                                              parse_special=True)
    after = "<end_of_image>\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert ids[spans[0].start + 4:] == tok.encode(after, add_bos=False, parse_special=True)
    with pytest.raises(ValueError, match="placeholders"):
        MM.expand_text("no placeholder", [one], tok, cfg)


_ODD_TOWER = '''
import sys, numpy as np
from gemma3 import vision as V
cfg = V.VisionConfig(image_size=70, patch_size=14, hidden_size=24, intermediate_size=37,
                     num_layers=2, num_heads=3, mm_tokens_per_image=25, text_hidden_size=40)
rng = np.random.default_rng(7)
def m(r, c):
    a = (rng.standard_normal((r, c)) * c ** -0.5).astype(np.float32)
    return (0, r, c, a.view(np.uint8).reshape(-1))
def v(n, s=0.3):
    return (rng.standard_normal(n) * s).astype(np.float32)
w = {"patch_embd": m(24, 588), "patch_embd.bias": v(24), "position_embd": v(25 * 24, 1.0),
     "post_ln.weight": v(24) + 1, "post_ln.bias": v(24), "mm.soft_emb_norm": v(24) + 1,
     "mm.input_projection": m(40, 24)}
for i in range(2):
    for o in ("attn_q", "attn_k", "attn_v", "attn_out"):
        w[f"blk.{i}.{o}"] = m(24, 24); w[f"blk.{i}.{o}.bias"] = v(24)
    w[f"blk.{i}.ffn_up"] = m(37, 24); w[f"blk.{i}.ffn_up.bias"] = v(37)
    w[f"blk.{i}.ffn_down"] = m(24, 37); w[f"blk.{i}.ffn_down.bias"] = v(24)
    for o in ("ln1", "ln2"):
        w[f"blk.{i}.{o}.weight"] = v(24) + 1; w[f"blk.{i}.{o}.bias"] = v(24)
px = rng.uniform(-1, 1, (2, 3, 70, 70)).astype(np.float32)
out, hid = V.VisionTower(cfg, w).encode_with_hidden(px)
np.save(sys.argv[1], np.concatenate([out.ravel(), hid.ravel()]))
'''
SIMD_VS_SCALAR_ABS = 1e-5  # polynomial exp / sigmoid-form GELU vs libm: measured ~1e-6


def test_simd_row_kernels_match_scalar(tmp_path):
    """Odd sizes (25 patches: softmax rows with a tail; MLP 37; pool 1) through the SIMD kernels
    and, in a second process, the scalar reference kernels (G3_ISA=scalar: the tower uses the
    dispatcher's kernels like the text model)."""
    import os
    import subprocess
    import sys

    outs = []
    for scalar in ("0", "1"):
        f = tmp_path / f"o{scalar}.npy"
        env = {k: v for k, v in os.environ.items() if k != "G3_ISA"}
        if scalar == "1":
            env["G3_ISA"] = "scalar"
        subprocess.run([sys.executable, "-c", _ODD_TOWER, str(f)], check=True, env=env)
        outs.append(np.load(f))
    _close(outs[0], outs[1], SIMD_VS_SCALAR_ABS, "SIMD vs scalar tower")


def _fixture_pictures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtv", Path(__file__).parent / "fixtures"
                                                  / "make_tiny_vision.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.pictures()  # numpy only: the very pictures the references were made from


def test_pictures_end_to_end(models):
    """uint8 pictures through gemma3.image (resize, normalise, pan & scan crops) give the
    reference processor's pixels, hence the reference logits."""
    pytest.importorskip("gemma3.image")
    small, wide, square = _fixture_pictures()
    m = models["hf"]
    _close(m.logits(REF["ids_single"], images=[small]), REF["logits_single"], LOGITS_ABS,
           "picture, no pan & scan")
    _close(m.logits(REF["ids_pas"], images=[wide], pan_and_scan=True), REF["logits_pas"],
           LOGITS_ABS, "picture with pan & scan")
    _close(m.logits(REF["ids_two"], images=[small, square]), REF["logits_two"], LOGITS_ABS,
           "two pictures")
    e = m.encode_image(wide, pan_and_scan=True)
    _close(e, REF["proj_pas"], TOWER_ABS, "encode_image of a picture with crops")


# -- the bf16 mode (issue #15) -----------------------------------------------------------------
BF16_HERE = gemma3._core.VisionTower.bf16_available()
needs_bf16 = pytest.mark.skipif(not BF16_HERE, reason="this CPU has no AVX-512 BF16 (the bf16 "
                                "mode runs the f32 path, tested by test_bf16_falls_back_to_f32)")


def _bf16(x):
    """Round-to-nearest-even float32 -> bfloat16, back in float32 (the kernels' rounding)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (13, 33, 37), (200, 300, 301), (385, 70, 1152)])
def test_bf16_gemm_matches_twin(m, n, k):
    """The bf16 GEMM vs its NumPy twin (operands rounded to bf16, float64 product); the AVX-512
    kernel and the scalar reference give the same bits; bias, GELU and accumulation epilogues."""
    gemm = gemma3._core.VisionTower.bf16_gemm
    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    a16, w16 = _bf16(a).astype(np.float64), _bf16(w).astype(np.float64)
    prod, mag = a16 @ w16.T, np.abs(a16) @ np.abs(w16).T
    bound = (k + 2) * BF16_GEMM_SUM_U * (mag + np.abs(b) + np.abs(c))
    for kw, want in ((dict(), prod), (dict(bias=b), prod + b), (dict(bias=b, c=c), prod + b + c)):
        got = gemm(a, w, **kw)
        assert (np.abs(got - want) <= bound).all(), (kw.keys(), np.abs(got - want).max())
        assert np.array_equal(got, gemm(a, w, simd=False, **kw)), "SIMD != scalar reference"
    got = gemm(a, w, bias=b, gelu=True)
    # GELU of a value within the bound above, in float32 (act.c's own tolerance is far smaller)
    assert np.abs(got - _gelu(prod + b)).max() <= bound.max() * 1.2 + 1e-5
    with pytest.raises(ValueError, match="w"):
        gemm(a, w[:, :-1] if k > 1 else np.zeros((n, 2), np.float32))


@pytest.mark.parametrize("p", [5, 300, 600])
def test_fused_attention_matches_twin(p):
    """Online-softmax attention over key blocks (256) and query blocks (192) vs a float64 softmax;
    head size 72 as SigLIP's."""
    attn = gemma3._core.VisionTower.attn_head
    rng = np.random.default_rng(p)
    q, k, v = (rng.standard_normal((p, 72)).astype(np.float32) * s for s in (2.0, 2.0, 1.0))
    scale = 72 ** -0.5

    def twin(q, k, v):
        s = (q.astype(np.float64) @ k.T.astype(np.float64)) * scale
        e = np.exp(s - s.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)) @ v.astype(np.float64)

    vmax = np.abs(v).max()
    assert np.abs(attn(q, k, v, scale) - twin(q, k, v)).max() <= VISION_ATTN_F32_REL * vmax
    if BF16_HERE:
        z = attn(q, k, v, scale, bf16=True)
        want = twin(_bf16(q), _bf16(k), _bf16(v))
        assert np.abs(z - want).max() <= VISION_ATTN_BF16_REL * vmax


@needs_bf16
@pytest.mark.parametrize("src", ["hf", "gguf", "gguf-f16"])
@pytest.mark.parametrize("case", CASES)
def test_bf16_mode_matches_transformers(src, case):
    """The bf16 mode's tower, projection and logits vs float32 transformers (VISION_BF16_REL of
    the reference's largest magnitude; the reason is in tests/tolerances.py)."""
    kw = dict(SOURCES.get(src, dict(path=D / "text.gguf", mmproj=D / "mmproj-f16.gguf")))
    m = _bf16_models(**kw)
    assert m.vision.compute == "bf16"
    proj, hidden = m.vision.encode_with_hidden(REF[f"pixels_{case}"])
    for got, key in ((hidden, "hidden"), (proj, "proj")):
        ref = REF[f"{key}_{case}"]
        _close(got, ref, VISION_BF16_REL * np.abs(ref).max(), f"bf16 {src} {key} {case}")
    lg, ref = m.logits(REF[f"ids_{case}"], images=_pics(case)), REF[f"logits_{case}"]
    _close(lg, ref, VISION_BF16_REL * np.abs(ref).max(), f"bf16 {src} logits {case}")


_BF16_MODELS: dict = {}


def _bf16_models(**kw):
    key = str(sorted(kw.items()))
    if key not in _BF16_MODELS:
        _BF16_MODELS[key] = gemma3.load(**kw, vision_dtype="bf16")
    return _BF16_MODELS[key]


def test_vision_dtype_default_and_validation(models):
    assert models["hf"].vision.dtype == "f32" and models["gguf"].vision.dtype == "f32"
    f16 = gemma3.load(D / "text.gguf", mmproj=D / "mmproj-f16.gguf")
    assert f16.vision.dtype == "bf16"
    assert f16.vision.compute == ("bf16" if BF16_HERE else "f32")
    assert [V.vision_dtype(None, t) for t in ("F32", "F16", "BF16", "Q8_0")] == \
        ["f32", "bf16", "bf16", "bf16"]
    assert V.vision_dtype("BF16") == "bf16"
    for bad in ("fp8", 16, "float16"):
        with pytest.raises(ValueError, match="vision_dtype"):
            gemma3.load(D / "hf", vision_dtype=bad)
        with pytest.raises(ValueError, match="vision_dtype"):
            V.load_mmproj(D / "mmproj.gguf", vision_dtype_=bad)
    assert "f32" in repr(models["hf"].vision)


_FALLBACK = """
import sys, numpy as np, gemma3
from gemma3 import _core
D = sys.argv[1]
a = gemma3.load(D + "/hf", vision_dtype="bf16").vision
b = gemma3.load(D + "/hf", vision_dtype="f32").vision
px = np.load(D + "/reference.npz")["pixels_pas"]
print(_core.VisionTower.bf16_available(), a.compute, np.array_equal(a.encode(px), b.encode(px)))
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_bf16_falls_back_to_f32(isa):
    """G3_ISA below avx512: no bf16 kernel, so the bf16 mode is the float32 path, bit for bit."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, G3_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _FALLBACK, str(D)], capture_output=True,
                         text=True, env=env, check=True).stdout.split()
    assert out == ["False", "f32", "True"], out


@needs_bf16
def test_bf16_mode_odd_sizes():
    """Odd sizes through the bf16 path: 25 patches (an odd last key pair, one query tile with a
    tail), MLP 37 (fc2's inputs end in half a pair), head size 8, pool 1; against the same tower
    in the f32 mode, within the bf16 bound."""
    ns = {}
    exec(_ODD_TOWER.split("out, hid =")[0], ns)  # the weights, config and pixels only
    V_, cfg, w, px = ns["V"], ns["cfg"], ns["w"], ns["px"]
    a = V_.VisionTower(cfg, w, dtype="bf16")
    b = V_.VisionTower(cfg, w, dtype="f32")
    assert (a.compute, b.compute) == ("bf16", "f32")
    for got, ref in zip(a.encode_with_hidden(px), b.encode_with_hidden(px)):
        _close(got, ref, VISION_BF16_REL * np.abs(ref).max(), "odd tower bf16 vs f32")
        assert not np.array_equal(got, ref)  # the bf16 path did run
