"""The tensor role table (csrc/model/roles.c) and the typed configs (csrc/python/py_roles.c).

* The configs cross into C as ``_core.TextConfig`` / ``_core.VisionConfig``: every field required
  and typed, an unknown (e.g. renamed) or missing field is an error naming it — C has no default
  that could shadow gemma3/config.py.
* The table is consistent: every weight field of the C structs is bound by exactly one role, and
  the names of both formats resolve on the committed fixtures, every tensor of a fixture belonging
  to some role.
* A checkpoint with a tensor of the wrong shape or a missing tensor is refused with a message
  naming the tensor, the expected and the actual shape.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import gemma3
from gemma3 import _core
from gemma3 import vision as V
from gemma3.config import from_gguf_metadata, from_hf_config
from gemma3.convert import hf_to_gguf
from gemma3.loader import (
    HF_TEXT_PREFIXES,
    _bound_shape,
    _find_hf_prefix,
    build_core,
    build_weights,
    hf_entry,
    load_hf_dir,
    tensor_roles,
)
from gemma3.safetensors import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "tiny"
VIS = ROOT / "tests" / "fixtures" / "tiny_vision"

TEXT_FIELDS = dict(n_vocab=512, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=16,
                   n_ff=128, window=4, max_seq=32, eps=1e-6, attn_scale=0.25, embd_scale=8.0,
                   final_softcap=0.0, rope_base_global=1e6, rope_scale_global=1.0,
                   rope_base_local=1e4, rope_scale_local=1.0)
VISION_FIELDS = dict(image_size=56, patch_size=14, n_embd=32, n_ff=37, n_layer=0, n_head=4,
                     n_mm_tokens=4, n_embd_text=8, eps=1e-6)
CONFIGS = [(_core.TextConfig, TEXT_FIELDS), (_core.VisionConfig, VISION_FIELDS)]


# -- typed configs --------------------------------------------------------------------------------
@pytest.mark.parametrize("tp,fields", CONFIGS, ids=["text", "vision"])
def test_config_round_trip(tp, fields):
    c = tp(**fields)
    for k, v in fields.items():
        got = getattr(c, k)
        assert type(got) is type(v) and got == pytest.approx(v, rel=1e-7), k
    assert repr(c).startswith(tp.__name__ + "(")
    with pytest.raises(AttributeError):
        c.eps = 1.0  # read-only


@pytest.mark.parametrize("tp,fields", CONFIGS, ids=["text", "vision"])
def test_config_missing_field_is_named(tp, fields):
    for key in fields:
        kw = {k: v for k, v in fields.items() if k != key}
        with pytest.raises(TypeError, match=f"missing the required field '{key}'"):
            tp(**kw)


@pytest.mark.parametrize("tp,fields", CONFIGS, ids=["text", "vision"])
def test_config_unknown_or_renamed_field_is_named(tp, fields):
    with pytest.raises(TypeError, match="unknown field 'rope_base'"):
        tp(**fields, rope_base=1e6)
    renamed = dict(fields)
    renamed["epsilon"] = renamed.pop("eps")  # a renamed key never falls back to a C default
    with pytest.raises(TypeError, match="'epsilon'"):
        tp(**renamed)
    with pytest.raises(TypeError, match="keyword"):
        tp(*fields.values())


def test_text_config_types():
    for key, bad, exc, msg in [("n_layer", 2.0, TypeError, "must be an int"),
                               ("n_layer", True, TypeError, "must be an int"),
                               ("n_layer", "2", TypeError, "must be an int"),
                               ("n_layer", 2**70, ValueError, "out of range"),
                               ("eps", True, TypeError, "must be a float"),
                               ("eps", "1e-6", TypeError, "must be a float"),
                               ("rope_base_global", math.inf, ValueError, "finite"),
                               ("rope_base_global", math.nan, ValueError, "finite"),
                               ("rope_base_global", 1e39, ValueError, "finite")]:
        with pytest.raises(exc, match=f"'{key}' {msg}|'{key}' is {msg}|'{key}'.*{msg}"):
            _core.TextConfig(**{**TEXT_FIELDS, key: bad})
    # NumPy integers are integers, ints are exact floats
    c = _core.TextConfig(**{**TEXT_FIELDS, "n_layer": np.int64(3), "rope_base_global": 10000})
    assert c.n_layer == 3 and c.rope_base_global == 10000.0


def test_core_takes_only_the_typed_config():
    cfg, weights, _, owners = load_hf_dir(str(TINY))
    is_global = bytes(t == "full_attention" for t in cfg.layer_types)
    as_dict = {k: getattr(cfg.to_core(64), k) for k in TEXT_FIELDS}
    with pytest.raises(TypeError, match="TextConfig"):
        _core.Model(as_dict, is_global, weights)
    with pytest.raises(TypeError, match="VisionConfig"):
        _core.VisionTower(cfg.to_core(64), {})
    for key in ("eps", "attn_scale", "rope_base_global", "rope_scale_local"):
        bad = _core.TextConfig(**{**{k: getattr(cfg.to_core(64), k) for k in TEXT_FIELDS},
                                  key: -1.0 if key != "eps" else -1e-6})
        with pytest.raises(gemma3.FormatError, match="invalid model configuration"):
            _core.Model(bad, is_global, weights)
    assert owners


def test_to_core_carries_config_values():
    """What C computes with is what config.py decided (tiny-scaled: linear RoPE on global
    layers, non-default bases)."""
    hf = json.loads((TINY.parent / "tiny-scaled" / "config.json").read_text())
    cfg = from_hf_config(hf)
    c = cfg.to_core(100)
    f32 = np.float32
    assert c.rope_base_global == f32(cfg.rope_theta)
    assert c.rope_base_local == f32(cfg.rope_local_base_freq)
    assert c.rope_scale_global == f32(1.0 / cfg.rope_scaling_factor)
    assert c.eps == f32(cfg.rms_norm_eps)
    assert c.attn_scale == f32(cfg.query_pre_attn_scalar ** -0.5)
    assert (c.n_layer, c.window, c.max_seq) == (cfg.num_layers, cfg.sliding_window, 100)


# -- the table ------------------------------------------------------------------------------------
def _struct_fields(header: str, name: str) -> dict[str, str]:
    """{field: "matrix" | "vector"} of the g3_weight and const float * fields of a C struct."""
    src = re.sub(r"/\*.*?\*/", "", (ROOT / "csrc" / header).read_text(), flags=re.S)
    end = src.index(f"}} {name};")
    body = src[src.rindex("typedef struct", 0, end):end]
    body = body[body.index("{") + 1:]
    out = {}
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        for prefix, kind in (("g3_weight ", "matrix"), ("const float *", "vector")):
            if decl.startswith(prefix):
                for f in decl[len(prefix):].split(","):
                    out[f.strip().lstrip("*").strip()] = kind
    return out


@pytest.mark.parametrize("kind,structs", [
    ("text", {"g3_model": "model/model.h", "g3_layer": "model/model.h"}),
    ("vision", {"g3_vision": "vision/siglip.h", "g3_vision_layer": "vision/siglip.h"}),
])
def test_every_field_bound_once(kind, structs):
    roles = tensor_roles(kind)
    fields = [r.field for r in roles]
    assert len(set(fields)) == len(fields)
    assert len({r.key for r in roles}) == len(roles)
    assert len({(r.field.split(".")[0], r.offset) for r in roles}) == len(roles)
    want = {f"{s}.{f}": k for s, h in structs.items() for f, k in _struct_fields(h, s).items()}
    assert {r.field: r.kind for r in roles} == want
    for r in roles:
        assert r.per_layer == r.field.split(".")[0].endswith("layer"), r.key
        assert ("{i}" in r.key) == ("{i}" in r.gguf) == ("{i}" in r.hf) == r.per_layer, r.key
        assert r.tie is None or any(t.key == r.tie and not t.per_layer for t in roles)


def _hf_names(role, i, prefixes):
    return [n.format(i=i, **prefixes) for n in (role.hf, role.hf_alt) if n]


def _check_hf(names: set[str], roles_by_kind: dict, n_layers: dict, prefixes: dict) -> None:
    claimed = set()
    for kind, roles in roles_by_kind.items():
        for r in roles:
            for i in range(n_layers[kind]) if r.per_layer else (None,):
                found = [n for n in _hf_names(r, i, prefixes) if n in names]
                assert found or r.optional, (kind, r.key, i)
                claimed.update(found)
    assert names == claimed, f"tensors no role names: {sorted(names - claimed)[:5]}"


def test_hf_names_resolve_on_the_text_fixture():
    names = set(SafetensorsFile(TINY / "model.safetensors").tensors)
    cfg = from_hf_config(json.loads((TINY / "config.json").read_text()))
    _check_hf(names, {"text": tensor_roles("text")}, {"text": cfg.num_layers},
              {"t": _find_hf_prefix(names)})


@pytest.mark.parametrize("layout", ["hf", "hf-hub", "hf-new"])
def test_hf_names_resolve_on_the_vision_fixtures(layout):
    d = VIS / layout
    names = set(SafetensorsFile(d / "model.safetensors").tensors)
    hf = json.loads((d / "config.json").read_text())
    prefixes = {"t": _find_hf_prefix(names),
                "v": V._find_prefix(names, V.HF_VISION_PREFIXES,
                                    "embeddings.patch_embedding.weight"),
                "m": V._find_prefix(names, V.HF_PROJECTOR_PREFIXES, "mm_input_projection_weight")}
    assert prefixes["t"] in HF_TEXT_PREFIXES and None not in prefixes.values()
    _check_hf(names, {"text": tensor_roles("text"), "vision": tensor_roles("vision")},
              {"text": from_hf_config(hf).num_layers,
               "vision": hf["vision_config"]["num_hidden_layers"]}, prefixes)


def _check_gguf(path: Path, kind: str, dims: dict, n_layer: int) -> dict[str, str]:
    """Every role resolves by the table's rule, with the expected shape; returns the file name
    each role's first layer was read from."""
    f = gemma3.GGUFFile(path)
    picked, claimed = {}, set()
    for r in tensor_roles(kind):
        want = (dims[r.shape[0]], dims[r.shape[1]])
        for i in range(n_layer) if r.per_layer else (None,):
            names = [n.format(i=i) for n in (r.gguf, r.gguf_alt) if n and n.format(i=i) in
                     f.tensors]
            assert names or r.optional, (path.name, r.key, i)
            ok = [n for n in names
                  if (_bound_shape(f.tensors[n].shape, r.gguf_conv) == want if r.kind == "matrix"
                      else math.prod(f.tensors[n].shape) == math.prod(want))]
            assert bool(ok) == bool(names), (path.name, r.key, i, names)
            if ok:
                picked.setdefault(r.key, ok[0].replace(f".{i}.", ".{i}."))
                claimed.add(ok[0])
    assert set(f.tensors) == claimed, sorted(set(f.tensors) - claimed)[:5]
    f.close()
    return picked


def test_gguf_names_resolve_on_the_text_fixtures(tmp_path):
    hf_to_gguf(TINY, tmp_path / "tiny.gguf")
    for path in (tmp_path / "tiny.gguf", VIS / "text.gguf"):
        f = gemma3.GGUFFile(path)
        cfg = from_gguf_metadata(f.metadata, f.tensors["token_embd.weight"].shape[0])
        f.close()
        _check_gguf(path, "text", cfg.to_core(1).dims, cfg.num_layers)


@pytest.mark.parametrize("name", ["mmproj.gguf", "mmproj-f16.gguf", "mmproj-oldffn.gguf"])
def test_mmproj_names_resolve(name):
    tower = V.load_mmproj(VIS / name)
    picked = _check_gguf(VIS / name, "vision", tower.config.to_core().dims,
                         tower.config.num_layers)
    up, down = picked["blk.{i}.ffn_up"], picked["blk.{i}.ffn_down"]
    if name == "mmproj-oldffn.gguf":  # fc1 stored as ffn_down: the alternative names
        assert (up, down) == ("v.blk.{i}.ffn_down.weight", "v.blk.{i}.ffn_up.weight")
        assert picked["blk.{i}.ffn_up.bias"] == "v.blk.{i}.ffn_down.bias"
    else:
        assert (up, down) == ("v.blk.{i}.ffn_up.weight", "v.blk.{i}.ffn_down.weight")


# -- wrong shapes and missing tensors ----------------------------------------------------------
def test_wrong_matrix_shape_names_tensor_and_shapes():
    cfg, weights, _, owners = load_hf_dir(str(TINY))
    q, e = cfg.num_heads * cfg.head_dim, cfg.hidden_size
    bad = dict(weights)
    a = np.zeros((q + 1, e), np.float32)
    bad["blk.1.attn_q"] = (0, q + 1, e, a.view(np.uint8).reshape(-1))
    with pytest.raises(gemma3.FormatError,
                       match=re.escape(f"model tensor 'blk.1.attn_q' has shape ({q + 1}, {e}), "
                                       f"expected (n_head*head_dim, n_embd) = ({q}, {e})")):
        build_core(cfg, bad, 16)
    bad = dict(weights)
    bad["blk.0.attn_q_norm"] = np.ones(cfg.head_dim + 1, np.float32)
    with pytest.raises(gemma3.FormatError,
                       match=f"'blk.0.attn_q_norm' must be .* {cfg.head_dim} values"):
        build_core(cfg, bad, 16)
    bad = dict(weights)
    del bad["blk.3.ffn_up"]
    with pytest.raises(gemma3.FormatError, match="missing model tensor 'blk.3.ffn_up'"):
        build_core(cfg, bad, 16)
    assert owners


def _gguf_copy(src: Path, dst: Path, edit) -> None:
    f = gemma3.GGUFFile(src)
    w = gemma3.GGUFWriter(alignment=f.alignment)
    for k, v in f.metadata.items():
        if k != "general.alignment":
            w.add(k, v)
    for name, t in f.tensors.items():
        arr = edit(name, f)
        if arr is None:
            w.add_tensor(name, f.raw(name), type=t.type, raw_shape=t.shape)
        elif arr is not False:
            w.add_tensor(name, arr, type="F32")
    w.write(dst)
    f.close()


def test_gguf_checkpoint_with_wrong_shape_or_missing_tensor(tmp_path):
    hf_to_gguf(TINY, tmp_path / "tiny.gguf", dtype="F32")
    cfg = from_hf_config(json.loads((TINY / "config.json").read_text()))
    e, ff = cfg.hidden_size, cfg.intermediate_size
    _gguf_copy(tmp_path / "tiny.gguf", tmp_path / "t.gguf",
               lambda n, f: (np.ascontiguousarray(f.dequantize(n).T)
                             if n == "blk.1.ffn_down.weight" else None))
    with pytest.raises(gemma3.FormatError,
                       match=re.escape(f"t.gguf: tensor 'blk.1.ffn_down.weight' (blk.1.ffn_down) "
                                       f"has shape ({ff}, {e}), expected (n_embd, n_ff) = "
                                       f"({e}, {ff})")):
        gemma3.load(tmp_path / "t.gguf")
    _gguf_copy(tmp_path / "tiny.gguf", tmp_path / "m.gguf",
               lambda n, f: False if n == "blk.2.attn_v.weight" else None)
    with pytest.raises(gemma3.FormatError, match="tensor 'blk.2.attn_v.weight' is missing"):
        gemma3.load(tmp_path / "m.gguf")
    _gguf_copy(tmp_path / "tiny.gguf", tmp_path / "n.gguf",
               lambda n, f: (np.ones(cfg.head_dim - 1, np.float32)
                             if n == "blk.0.attn_k_norm.weight" else None))
    with pytest.raises(gemma3.FormatError, match=re.escape(
            f"'blk.0.attn_k_norm.weight' (blk.0.attn_k_norm) has shape ({cfg.head_dim - 1},), "
            f"expected (head_dim) = {cfg.head_dim} values")):
        gemma3.load(tmp_path / "n.gguf")


def _hf_copy(src: Path, dst: Path, edit) -> None:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    s = SafetensorsFile(src / "model.safetensors")
    save_file({n: np.ascontiguousarray(edit(n, s.array(n))) for n in s.tensors},
              str(dst / "model.safetensors"))


def test_hf_checkpoint_with_wrong_shape(tmp_path):
    cfg = from_hf_config(json.loads((TINY / "config.json").read_text()))
    e, ff = cfg.hidden_size, cfg.intermediate_size
    # layer 1: layer 0's shapes are cross-checked against config.json first (test_config_bounds)
    _hf_copy(TINY, tmp_path / "t", lambda n, a: a.T if n.endswith("layers.1.mlp.gate_proj.weight")
             else a)
    with pytest.raises(gemma3.FormatError,
                       match=re.escape(f"layers.1.mlp.gate_proj.weight' (blk.1.ffn_gate) has "
                                       f"shape ({e}, {ff}), expected (n_ff, n_embd) = "
                                       f"({ff}, {e})")):
        gemma3.load(tmp_path / "t")


def test_vision_checkpoint_with_wrong_shape(tmp_path):
    vc = json.loads((VIS / "hf" / "config.json").read_text())["vision_config"]
    d, f = vc["hidden_size"], vc["intermediate_size"]
    _hf_copy(VIS / "hf", tmp_path / "v", lambda n, a: a.T if n.endswith("layers.1.mlp.fc1.weight")
             else a)
    with pytest.raises(gemma3.FormatError,
                       match=re.escape(f"layers.1.mlp.fc1.weight' (blk.1.ffn_up) has shape "
                                       f"({d}, {f}), expected (n_ff, n_embd) = ({f}, {d})")):
        gemma3.load(tmp_path / "v")


def test_vision_core_checks_shapes_by_the_table():
    """The C check behind the loaders' own: a weights dict with a wrong matrix or vector."""
    where = {n: s for s in [SafetensorsFile(VIS / "hf" / "model.safetensors")] for n in s.tensors}
    hf = json.loads((VIS / "hf" / "config.json").read_text())
    tower = V.load_hf_vision(str(VIS / "hf"), hf, where, 64)
    c = tower.config
    prefixes = {"v": V._find_prefix(where, V.HF_VISION_PREFIXES,
                                    "embeddings.patch_embedding.weight"),
                "m": V._find_prefix(where, V.HF_PROJECTOR_PREFIXES, "mm_input_projection_weight")}
    w = build_weights("vision", c.to_core().dims, c.num_layers,
                      lambda r, i, shape: hf_entry(where, "x", r, i, shape, prefixes, None))
    _core.VisionTower(c.to_core(), w)  # as loaded: fine
    d, t = c.hidden_size, c.text_hidden_size
    bad = dict(w)
    bad["mm.input_projection"] = w["blk.0.attn_q"]
    with pytest.raises(gemma3.FormatError, match=re.escape(
            f"vision tensor 'mm.input_projection' has shape ({d}, {d}), expected "
            f"(n_embd_text, n_embd) = ({t}, {d})")):
        _core.VisionTower(c.to_core(), bad)
    bad = dict(w)
    bad["position_embd"] = w["post_ln.bias"]
    with pytest.raises(gemma3.FormatError, match="'position_embd' must be .* values"):
        _core.VisionTower(c.to_core(), bad)
