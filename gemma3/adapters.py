"""LoRA adapters: reading PEFT directories and llama.cpp LoRA GGUFs, and the set a model has loaded.

A LoRA adapter changes some layer matrices by a low-rank delta: ``W' = W + s * B A`` with
``A: (r, cols)`` and ``B: (rows, r)``. Applied unmerged (the default), the C core adds
``s * B (A x)`` to every product with ``W`` (csrc/kernels/lora.c), so adapters can be switched,
mixed and removed without touching the base weights; :func:`merge_into` folds them into the
weights instead (requantized to each tensor's type).

Formats (validated like checkpoints: the safetensors / GGUF readers check every byte, then every
name and shape here is checked against the base model, errors naming the tensor):

* PEFT (transformers / TRL ``save_pretrained``): a directory with ``adapter_config.json`` and
  ``adapter_model.safetensors``; tensors ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``lora_B.weight`` (out, r). Scale ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
  ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override r / alpha for the modules whose
  name ends with a key (a regular expression, PEFT's rule). Only plain LoRA on the text model's
  q/k/v/o/gate/up/down projections is taken; DoRA, biases, ``modules_to_save``, embeddings and
  other PEFT types raise :class:`gemma3.UnsupportedError`.
* llama.cpp (``convert_lora_to_gguf.py``): ``general.type = adapter``, ``adapter.type = lora``,
  ``adapter.lora.alpha``; tensors ``blk.N.<role>.weight.lora_a`` (ne [cols, r]) and ``.lora_b``
  (ne [r, rows]). Scale ``alpha / r`` per tensor (1 when alpha is 0 or absent), as llama.cpp
  computes it. The format has a single alpha, so a PEFT adapter with ``use_rslora`` or an
  ``alpha_pattern`` converts to a GGUF with other scales (the converter drops them).

Names map through the one role table (csrc/model/roles.c via :func:`gemma3.loader.tensor_roles`):
a delta is keyed by its matrix's weights-dict key, e.g. ``blk.3.attn_q``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _check, _core
from ._core import FormatError, UnsupportedError
from .gguf import GGUFFile, ggml_type_id
from .loader import HF_TEXT_PREFIXES, Role, tensor_roles
from .safetensors import SafetensorsFile

__all__ = ["Adapter", "Delta", "AdapterSet", "load_adapter", "merge_into"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# PEFT config keys that change what the weights mean; a non-empty value is refused
_PEFT_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "lora_bias": "LoRA biases",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style) layers",
}
_MAX_PATTERNS = 1024


@dataclass(frozen=True)
class Delta:
    """One matrix's low-rank delta: ``W += scale * B @ A``."""

    key: str  # weights-dict key of the matrix, e.g. "blk.3.attn_q"
    A: np.ndarray  # (r, cols) float32, read-only
    B: np.ndarray  # (rows, r) float32, read-only; the transposed view of a contiguous B^T
    scale: float  # alpha / r (or alpha / sqrt(r)), before any user scale

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def Bt(self) -> np.ndarray:  # noqa: N802
        """B^T (r, rows), contiguous (B is its transposed view): the layout the C core adds
        with (kernels/lora.c)."""
        return self.B.T


@dataclass(frozen=True)
class Adapter:
    """A loaded LoRA adapter: its deltas in role-table order."""

    path: str
    format: str  # "peft" | "gguf"
    deltas: tuple[Delta, ...]

    @property
    def nbytes(self) -> int:
        return sum(d.A.nbytes + d.B.nbytes for d in self.deltas)

    def __repr__(self) -> str:
        ranks = sorted({d.rank for d in self.deltas})
        return (f"Adapter({self.format} {self.path!r}: {len(self.deltas)} matrices, rank "
                f"{'/'.join(map(str, ranks))}, {self.nbytes / 2**20:.1f} MiB)")


# -- the role table, seen from an adapter -----------------------------------------------------
def _layer_matrices() -> list[Role]:
    """The per-layer matrix roles (q, k, v, o, gate, up, down): what a delta may change."""
    return [r for r in tensor_roles("text") if r.per_layer and r.kind == "matrix"]


def _expected(cfg, role: Role) -> tuple[int, int]:
    dims = cfg.to_core(1).dims
    return dims[role.shape[0]], dims[role.shape[1]]


def _hf_module_regex() -> re.Pattern:
    """Module names of the text model's layer matrices in HF checkpoints -> (layer, role key)."""
    prefixes = "|".join(re.escape(p) for p in HF_TEXT_PREFIXES)
    alts = []
    for j, r in enumerate(_layer_matrices()):
        body = re.escape(r.hf.removesuffix(".weight")).replace(re.escape("{t}"), f"(?:{prefixes})")
        alts.append("(?P<r%d>%s)" % (j, body.replace(re.escape("{i}"), r"(?P<i%d>\d+)" % j)))
    return re.compile("|".join(alts))


def _check_finite(path: str, name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise FormatError(f"{path}: tensor {name!r} holds NaN or infinite values")


def _freeze(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.flags.writeable = False
    return a


def _check_pair(path: str, names: tuple[str, str], A: np.ndarray, B: np.ndarray, cfg, role: Role,
                layer: int) -> None:
    """A (r, cols) and B (rows, r) against the base matrix, errors naming the file's tensors."""
    if layer >= cfg.num_layers:
        raise FormatError(f"{path}: tensor {names[0]!r} is for layer {layer}, but the model has "
                          f"{cfg.num_layers} layers")
    rows, cols = _expected(cfg, role)
    key = role.key.format(i=layer)
    if A.ndim != 2 or A.shape[1] != cols or A.shape[0] < 1:
        raise FormatError(f"{path}: tensor {names[0]!r} ({key} lora A) has shape {A.shape}, "
                          f"expected (rank, {role.shape[1]}) = (rank, {cols})")
    r = A.shape[0]
    if B.shape != (rows, r):
        raise FormatError(f"{path}: tensor {names[1]!r} ({key} lora B) has shape {B.shape}, "
                          f"expected ({role.shape[0]}, rank) = ({rows}, {r})")
    if r > min(rows, cols):
        raise FormatError(f"{path}: tensor {names[0]!r} has rank {r}, more than the matrix's "
                          f"{min(rows, cols)}")


# -- PEFT ---------------------------------------------------------------------------------------
def _peft_pattern(patterns: dict, module: str, default):
    """PEFT's per-module override: the first key that matches a dotted suffix of the name."""
    for k, v in patterns.items():
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{k})", module):
                return v
        except re.error as e:
            raise FormatError(f"bad pattern {k!r} in {PEFT_CONFIG}: {e}") from None
    return default


def _peft_config(path: Path) -> dict[str, Any]:
    cfg_path = path / PEFT_CONFIG
    if not cfg_path.is_file():
        raise FormatError(f"{path}: no {PEFT_CONFIG} (not a PEFT adapter directory)")
    try:
        c = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(c, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object")
    ptype = c.get("peft_type")
    if ptype != "LORA":
        raise UnsupportedError(f"{cfg_path}: peft_type {ptype!r} is not supported (LORA only)")
    for k, what in _PEFT_REFUSED.items():
        if c.get(k):
            raise UnsupportedError(f"{cfg_path}: {what} is not supported ({k} = {c[k]!r})")
    if c.get("bias", "none") != "none":
        raise UnsupportedError(f"{cfg_path}: trained biases are not supported (bias = "
                               f"{c['bias']!r})")
    for k in ("r", "lora_alpha"):
        v = c.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise FormatError(f"{cfg_path}: {k} must be a positive number, got {v!r}")
    for k in ("rank_pattern", "alpha_pattern"):
        v = c.get(k) or {}
        if not isinstance(v, dict) or len(v) > _MAX_PATTERNS or not all(
                isinstance(p, str) and isinstance(x, (int, float)) and not isinstance(x, bool)
                and math.isfinite(x) and x > 0 for p, x in v.items()):
            raise FormatError(f"{cfg_path}: {k} must map module patterns to positive numbers")
        c[k] = v
    if not isinstance(c.get("use_rslora", False), bool):
        raise FormatError(f"{cfg_path}: use_rslora must be true or false")
    return c


def _load_peft(path: Path, cfg) -> Adapter:
    c = _peft_config(path)
    wpath = path / PEFT_WEIGHTS
    if not wpath.is_file():
        if (path / "adapter_model.bin").is_file():
            raise UnsupportedError(f"{path}: adapter_model.bin is a pickle, which is never "
                                   f"loaded; save the adapter as {PEFT_WEIGHTS}")
        raise FormatError(f"{path}: no {PEFT_WEIGHTS}")
    f = SafetensorsFile(wpath)
    where = str(wpath)
    pairs: dict[str, dict[str, str]] = {}  # module -> {"A": name, "B": name}
    for name in f.tensors:
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if not m:
            what = ("DoRA magnitudes" if "lora_magnitude" in name else
                    "LoRA on an embedding" if "lora_embedding" in name else
                    "a bias" if name.endswith(".bias") else "not a LoRA A/B matrix")
            raise UnsupportedError(f"{where}: tensor {name!r} is not supported ({what})")
        ab = pairs.setdefault(m.group(1), {})
        if m.group(2) in ab:
            raise FormatError(f"{where}: tensors {ab[m.group(2)]!r} and {name!r} are both "
                              f"lora_{m.group(2)} of {m.group(1)!r}")
        ab[m.group(2)] = name
    rx = _hf_module_regex()
    roles = _layer_matrices()
    found = []
    seen: dict[str, str] = {}  # matrix key -> module (two spellings of one layer's matrix)
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))
            raise FormatError(f"{where}: tensor {have!r} has no lora_{'B' if 'A' in ab else 'A'} "
                              "partner")
        m = rx.fullmatch(module)
        if not m:
            where_ = ("the vision tower" if re.search(r"vision|multi_modal_projector", module)
                      else "a module that is not a text layer's q/k/v/o/gate/up/down projection")
            raise UnsupportedError(f"{where}: tensor {ab['A']!r} adapts {where_}, which is not "
                                   "supported")
        j = int(next(g for g, v in m.groupdict().items() if v is not None and g[0] == "r")[1:])
        layer = int(m.group(f"i{j}"))
        key = roles[j].key.format(i=layer)
        if key in seen:
            raise FormatError(f"{where}: modules {seen[key]!r} and {module!r} both adapt {key}")
        seen[key] = module
        A, B = f.array(ab["A"]), f.array(ab["B"])
        _check_pair(where, (ab["A"], ab["B"]), A, B, cfg, roles[j], layer)
        _check_finite(where, ab["A"], A)
        _check_finite(where, ab["B"], B)
        r = _peft_pattern(c["rank_pattern"], module, c["r"])
        if A.shape[0] != r:
            raise FormatError(f"{where}: tensor {ab['A']!r} has rank {A.shape[0]} but "
                              f"{PEFT_CONFIG} says r = {r} for {module!r}")
        alpha = _peft_pattern(c["alpha_pattern"], module, c["lora_alpha"])
        scale = alpha / (math.sqrt(r) if c.get("use_rslora") else r)
        found.append((layer, j, Delta(key, _freeze(A), _freeze(B.T).T, float(scale))))
    if not found:
        raise FormatError(f"{where}: no LoRA tensors")
    return Adapter(str(path), "peft", tuple(d for _, _, d in sorted(found, key=lambda x: x[:2])))


# -- llama.cpp GGUF -----------------------------------------------------------------------------
def _load_gguf(path: str, cfg) -> Adapter:
    f = GGUFFile(path)
    md = f.metadata
    if md.get("general.type") != "adapter":
        raise FormatError(f"{path}: general.type is {md.get('general.type')!r}, not 'adapter' "
                          "(is this a model rather than a LoRA adapter?)")
    if md.get("adapter.type") != "lora":
        raise UnsupportedError(f"{path}: adapter.type {md.get('adapter.type')!r} is not "
                               "supported (lora only)")
    if "adapter.alora.invocation_tokens" in md:
        raise UnsupportedError(f"{path}: activated LoRA (adapter.alora.*) is not supported")
    arch = md.get("general.architecture")
    if arch != "gemma3":
        raise FormatError(f"{path}: an adapter for {arch!r}, not gemma3")
    alpha = md.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or alpha < 0:
        raise FormatError(f"{path}: adapter.lora.alpha must be a finite number >= 0, got "
                          f"{alpha!r}")
    roles = {r.gguf.removesuffix(".weight").replace("blk.{i}.", ""): (j, r)
             for j, r in enumerate(_layer_matrices())}
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for name in f.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.([a-z_]+)\.weight\.lora_([ab])", name)
        if not m or m.group(2) not in roles:
            raise UnsupportedError(f"{path}: tensor {name!r} is not supported (only lora_a/lora_b "
                                   "of the layers' q/k/v/o/gate/up/down projections)")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = name
    found = []
    for (layer, rname), ab in pairs.items():
        if set(ab) != {"a", "b"}:
            have = next(iter(ab.values()))
            raise FormatError(f"{path}: tensor {have!r} has no lora_{'b' if 'a' in ab else 'a'} "
                              "partner")
        j, role = roles[rname]
        for n in ab.values():
            if not _core.type_info(f.tensors[n].type_id)[4]:
                raise UnsupportedError(f"{path}: tensor {n!r} has type {f.tensors[n].type}, "
                                       "which this version cannot read")
        A = f.dequantize(ab["a"]).reshape(f.tensors[ab["a"]].shape)
        B = f.dequantize(ab["b"]).reshape(f.tensors[ab["b"]].shape)
        _check_pair(path, (ab["a"], ab["b"]), A, B, cfg, role, layer)
        _check_finite(path, ab["a"], A)
        _check_finite(path, ab["b"], B)
        scale = alpha / A.shape[0] if alpha else 1.0
        found.append((layer, j, Delta(role.key.format(i=layer), _freeze(A), _freeze(B.T).T,
                                      float(scale))))
    if not found:
        raise FormatError(f"{path}: no LoRA tensors")
    return Adapter(path, "gguf", tuple(d for _, _, d in sorted(found, key=lambda x: x[:2])))


def load_adapter(path: str | os.PathLike, cfg) -> Adapter:
    """Reads a PEFT adapter directory or a llama.cpp LoRA GGUF and checks it against the model
    configuration ``cfg`` (a :class:`gemma3.config.Gemma3Config`)."""
    path = _check.path("adapter", path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no such adapter file or directory", path)
    if os.path.isdir(path):
        return _load_peft(Path(path), cfg)
    if os.path.basename(path) in (PEFT_CONFIG, PEFT_WEIGHTS):  # a file of a PEFT directory
        return _load_peft(Path(path).parent, cfg)
    return _load_gguf(path, cfg)


# -- the adapters a model holds -----------------------------------------------------------------
class AdapterSet:
    """The adapters loaded into one model (name -> :class:`Adapter`) and the active ones with their
    scales. ``apply`` (given by the owner) receives the flat delta list for the C core each time
    the active set changes (the engine empties its KV caches then)."""

    def __init__(self, cfg, apply):
        self._cfg = cfg
        self._apply = apply
        self.loaded: dict[str, Adapter] = {}
        self.active: dict[str, float] = {}
        # folded into the weights at load (gemma3.load(merge=True)): path -> {"scale": s,
        # "error": {matrix key: relative requantization error}}
        self.merged: dict[str, dict] = {}

    def __repr__(self) -> str:
        return (f"<adapters loaded={sorted(self.loaded)} active={self.active} "
                f"merged={sorted(self.merged)}>")

    def load(self, path, name: str | None = None, scale: float = 1.0,
             activate: bool = True) -> str:
        ad = load_adapter(path, self._cfg)
        if name is None:
            base = Path(ad.path).name
            name = base.removesuffix(".gguf") if base.endswith(".gguf") else base
        name = _check.string("name", name)
        if name in self.loaded:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or "
                             "pass another name")
        scale = _check.number("scale", scale)
        self.loaded[name] = ad
        if activate:
            try:
                self.set({**self.active, name: scale})
            except BaseException:
                del self.loaded[name]
                raise
        return name

    def set(self, scales: dict[str, float] | None) -> None:
        if scales is None:
            scales = {}
        if not isinstance(scales, dict):
            raise TypeError(f"set_adapters takes a dict {{name: scale}}, got "
                            f"{type(scales).__name__}")
        clean = {}
        for n, s in scales.items():
            if n not in self.loaded:
                raise KeyError(f"no adapter named {n!r} is loaded (loaded: "
                               f"{sorted(self.loaded)})")
            clean[n] = _check.number(f"scale of {n!r}", s)
        self._apply([(d.key, d.A, d.Bt, d.scale * s) for n, s in clean.items()
                     for d in self.loaded[n].deltas if s != 0.0])
        self.active = clean

    def unload(self, name: str) -> None:
        if name not in self.loaded:
            raise KeyError(f"no adapter named {name!r} is loaded")
        if name in self.active:
            self.set({n: s for n, s in self.active.items() if n != name})
        del self.loaded[name]


class LoadPlan:
    """load()'s ``adapter=``/``merge=``: merged into the weights before the C model is built
    (``prepare``, given to open_checkpoint), or loaded unmerged onto the built model (``attach``)."""

    def __init__(self, adapter: Any, merge: bool):
        self.todo = parse_spec(adapter)
        self.merge = _check.boolean("merge", merge)
        self.merged: dict = {}
        self.prepare = self._prepare if self.merge and self.todo else None

    def _prepare(self, cfg, weights: dict[str, Any]) -> None:
        self.merged.update(merge_paths(cfg, weights, self.todo))

    def attach(self, model):
        model.adapters.merged = self.merged
        for p, s in self.todo if not self.merge else ():
            model.load_adapter(p, scale=s)
        return model


def parse_spec(adapter: Any) -> list[tuple[str, float]]:
    """gemma3.load's ``adapter`` argument -> [(path, scale)]: None, a path, a list of paths, or
    a dict {path: scale}."""
    if adapter is None:
        return []
    if isinstance(adapter, (str, os.PathLike)):
        return [(_check.path("adapter", adapter), 1.0)]
    if isinstance(adapter, dict):
        return [(_check.path("adapter", p), _check.number(f"scale of adapter {p!r}", s))
                for p, s in adapter.items()]
    if isinstance(adapter, (list, tuple)):
        return [(_check.path("adapter", p), 1.0) for p in adapter]
    raise TypeError(f"adapter must be a path, a list of paths or a dict {{path: scale}}, got "
                    f"{type(adapter).__name__}")


def merge_paths(cfg, weights: dict[str, Any], todo: list[tuple[str, float]]) -> dict[str, dict]:
    """Loads the adapters of ``todo`` and merges them into ``weights`` (see :func:`merge_into`);
    -> {path: {"scale": s, "error": {key: relative error}}}."""
    ads = [(load_adapter(p, cfg), s) for p, s in todo]
    errors = merge_into(weights, ads)
    return {ad.path: {"scale": s, "error": {d.key: errors[d.key] for d in ad.deltas}}
            for ad, s in ads}


# -- merging --------------------------------------------------------------------------------------
def merge_into(weights: dict[str, Any], adapters: list[tuple[Adapter, float]]) -> dict[str, float]:
    """Folds ``scale * s_d * B_d A_d`` of every adapter into the weights dict built by a loader
    (entries ``(type_id, rows, cols, data)``), each matrix requantized to its own type. Returns,
    per changed matrix, the relative error the requantization costs:
    ``||Q(W + D) - (W + D)||_F / ||D||_F`` (0 for float32 matrices)."""
    by_key: dict[str, list[tuple[Delta, float]]] = {}
    for ad, s in adapters:
        for d in ad.deltas:
            by_key.setdefault(d.key, []).append((d, s))
    err = {}
    for key, ds in by_key.items():
        tid, rows, cols, data = weights[key]
        raw = np.ascontiguousarray(np.asarray(data).view(np.uint8).reshape(-1))
        W = _core.dequantize(tid, raw, rows * cols).reshape(rows, cols)
        D = np.zeros((rows, cols), np.float32)
        for d, s in ds:
            D += np.float32(d.scale * s) * (d.B @ d.A)
        target = W + D
        if tid == ggml_type_id("F32"):
            new = np.ascontiguousarray(target).view(np.uint8).reshape(-1)
            err[key] = 0.0
        else:
            new = _core.quantize(tid, np.ascontiguousarray(target).reshape(-1))
            back = _core.dequantize(tid, new, rows * cols).reshape(rows, cols)
            dn = float(np.linalg.norm(D))
            err[key] = float(np.linalg.norm(back - target)) / dn if dn else 0.0
        weights[key] = (tid, rows, cols, new)
    return err
