"""Sparse autoencoders on the engine's activations: load, encode, decode, splice, search.

An SAE reads one hook point's activation x (one position: ``d_in`` values, e.g. the residual
stream after a block) and writes ``d_sae`` feature activations::

    pre  = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      W_enc (d_in, d_sae)
    f    = JumpReLU: pre * (pre > threshold) * (pre > 0)           threshold (d_sae,)
           ReLU:     max(pre, 0)
           TopK:     max(pre, 0) on the k largest pre per row, 0 elsewhere
    x'   = f @ W_dec + b_dec                                         W_dec (d_sae, d_in)

Layouts read by :meth:`SAE.load`:

* Gemma Scope / Gemma Scope 2 (JumpReLU): ``params.npz`` or ``params.safetensors`` with
  ``W_enc, b_enc, threshold, W_dec, b_dec`` (a path to the file or to its folder). The hook
  point comes from a ``config.json`` beside it when that names one (``hook_name``, or an HF
  module path ``...layers.N.output`` = ``blocks.N.hook_resid_post``), else from the folder names
  (``resid_post/layer_N...``, ``layer_N`` under a ``-res`` repository), else ``hook_name=``.
* SAELens: a folder with ``cfg.json`` + ``sae_weights.safetensors`` (architecture standard/ReLU,
  jumprelu, topk; ``hook_name`` from the config).

Files are validated as checkpoints are: every expected tensor present, no unknown ones, shapes
consistent, values finite; a bad file raises :class:`gemma3.FormatError` naming the file and the
tensor; valid but unsupported settings :class:`gemma3.UnsupportedError`.

Feature activations in a cache: ``model.run_with_cache(text, saes=[sae])`` adds
``"<hook_name>.hook_sae_acts_post"`` (T, d_sae) — SAELens's name. Splicing: ``fwd_hooks=
[sae.splice()]`` replaces the activation by its reconstruction (``error_term=True`` adds the
reconstruction error back, so only feature edits made by ``edit`` change the pass).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _check
from ._core import FormatError, UnsupportedError

ARCHS = ("jumprelu", "relu", "topk")
ACTS_SUFFIX = ".hook_sae_acts_post"
_NAMES = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold"}


@dataclass(eq=False)
class SAE:
    """A sparse autoencoder (float32 arrays; see the module docstring for the math)."""

    W_enc: np.ndarray  # (d_in, d_sae)
    b_enc: np.ndarray  # (d_sae,)
    W_dec: np.ndarray  # (d_sae, d_in)
    b_dec: np.ndarray  # (d_in,)
    threshold: np.ndarray | None = None  # (d_sae,) JumpReLU only
    architecture: str = "jumprelu"
    k: int | None = None  # TopK only
    hook_name: str | None = None
    apply_b_dec_to_input: bool = False

    def __post_init__(self):
        where = "SAE"
        arrays = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec,
                  "b_dec": self.b_dec}
        if self.threshold is not None:
            arrays["threshold"] = self.threshold
        _validate(arrays, self.architecture, where)
        for name, a in arrays.items():
            setattr(self, name, np.ascontiguousarray(a, np.float32))
        if self.architecture == "topk":
            self.k = _check.integer("k", self.k, 1, self.d_sae)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, hook_name: str | None = None,
             architecture: str | None = None) -> SAE:
        """Loads Gemma Scope (params.npz / params.safetensors) or SAELens (cfg.json +
        sae_weights.safetensors); ``hook_name`` overrides the hook point, ``architecture`` the
        activation ("jumprelu", "relu", "topk")."""
        p = Path(_check.path("path", path))
        if p.is_dir():
            if (p / "cfg.json").exists():
                return cls._load_saelens(p, hook_name, architecture)
            for f in ("params.safetensors", "params.npz"):
                if (p / f).exists():
                    return cls.load(p / f, hook_name, architecture)
            raise FileNotFoundError(f"{p}: no cfg.json + sae_weights.safetensors (SAELens) or "
                                    f"params.safetensors / params.npz (Gemma Scope) in it")
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file")
        arrays = _read_tensors(p)
        arch = architecture or "jumprelu"  # what Gemma Scope publishes
        hook = hook_name or _hook_from_config(p.parent / "config.json") or _hook_from_path(p)
        return cls._build(arrays, arch, None, hook, False, str(p))

    @classmethod
    def _load_saelens(cls, d: Path, hook_name, architecture) -> SAE:
        try:
            cfg = json.loads((d / "cfg.json").read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{d / 'cfg.json'}: not a JSON config ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{d / 'cfg.json'}: expected a JSON object")
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        arch = architecture or cfg.get("architecture") or "standard"
        act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
        if arch == "standard":
            arch = "topk" if act == "topk" else "relu"
        if arch not in ARCHS:
            raise UnsupportedError(f"{d / 'cfg.json'}: architecture {arch!r} is not supported "
                                   f"(supported: {', '.join(ARCHS)} and 'standard')")
        norm = cfg.get("normalize_activations")
        if norm not in (None, "none"):
            raise UnsupportedError(f"{d / 'cfg.json'}: normalize_activations={norm!r} is not "
                                   f"supported (only 'none')")
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        hook = hook_name or cfg.get("hook_name") or meta.get("hook_name")
        f = d / "sae_weights.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"{f}: SAELens weights missing")
        sae = cls._build(_read_tensors(f), arch, k, hook,
                         bool(cfg.get("apply_b_dec_to_input", False)), str(f))
        for key, got in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
            if key in cfg and cfg[key] != got:
                raise FormatError(f"{d / 'cfg.json'}: {key} = {cfg[key]} but the weights have "
                                  f"{got}")
        return sae

    @classmethod
    def _build(cls, arrays, arch, k, hook, apply_b_dec, where) -> SAE:
        if arch not in ARCHS:
            raise ValueError(f"architecture must be one of {ARCHS}, got {arch!r}")
        if "log_threshold" in arrays and "threshold" not in arrays:
            arrays["threshold"] = np.exp(arrays.pop("log_threshold"))
        _validate(arrays, arch, where)
        if arch == "topk" and k is None:
            raise FormatError(f"{where}: a TopK SAE needs k in its config")
        return cls(arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"],
                   arrays.get("threshold") if arch == "jumprelu" else None, arch, k, hook,
                   apply_b_dec)

    # -- the math -------------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations ``(..., d_sae)`` float32 of activations ``(..., d_in)``."""
        x = self._input(x)
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return pre * ((pre > self.threshold) & (pre > 0))
        if self.architecture == "relu":
            return np.maximum(pre, 0)
        idx = np.argpartition(-pre, self.k - 1, axis=-1)[..., :self.k]
        out = np.zeros_like(pre)
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
        return out

    def decode(self, f: np.ndarray) -> np.ndarray:
        """Reconstruction ``(..., d_in)`` float32 of feature activations ``(..., d_sae)``."""
        f = np.asarray(f, np.float32)
        if f.shape[-1:] != (self.d_sae,):
            raise ValueError(f"feature activations must end in {self.d_sae}, got {f.shape}")
        return f @ self.W_dec + self.b_dec

    def _input(self, x) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.shape[-1:] != (self.d_in,):
            raise ValueError(f"SAE input must end in d_in = {self.d_in}, got shape {x.shape}")
        return x - self.b_dec if self.apply_b_dec_to_input else x

    # -- in the forward pass --------------------------------------------------------------------
    def splice(self, error_term: bool = False,
               edit: Callable[[np.ndarray], np.ndarray | None] | None = None,
               hook_name: str | None = None) -> tuple[str, Callable]:
        """A ``(hook_name, fn)`` for ``fwd_hooks``: the activation is replaced by
        ``decode(f)`` where ``f = encode(x)`` (after ``edit(f)``, which may change f in place
        or return a new one), plus ``x - decode(encode(x))`` with ``error_term=True``."""
        name = self._hook(hook_name)

        def fn(act: np.ndarray, hook) -> np.ndarray:
            x = act.reshape(len(act), -1)
            f = self.encode(x)
            clean = self.decode(f) if error_term else None
            if edit is not None:
                r = edit(f)
                f = f if r is None else np.asarray(r, np.float32)
            out = self.decode(f)
            if error_term:
                out = out + (x - clean)
            return out.reshape(act.shape)
        return name, fn

    def _hook(self, hook_name: str | None = None) -> str:
        name = hook_name or self.hook_name
        if not name:
            raise ValueError("this SAE has no hook point: pass hook_name= (e.g. "
                             "'blocks.9.hook_resid_post')")
        return name

    def __repr__(self) -> str:
        return (f"<SAE {self.architecture} d_in={self.d_in} d_sae={self.d_sae} "
                f"hook={self.hook_name!r}>")


# -- validation and file reading ----------------------------------------------------------------

def _validate(arrays: dict, arch: str, where: str) -> None:
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    for n in need:
        if n not in arrays:
            raise FormatError(f"{where}: tensor {n!r} is missing (found "
                              f"{', '.join(sorted(arrays)) or 'nothing'})")
    extra = sorted(set(arrays) - _NAMES)
    if extra:
        raise FormatError(f"{where}: unexpected tensor {extra[0]!r} (an SAE holds "
                          f"{', '.join(need)})")
    W = np.asarray(arrays["W_enc"])
    if W.ndim != 2 or 0 in W.shape:
        raise FormatError(f"{where}: tensor 'W_enc' must be (d_in, d_sae), got shape {W.shape}")
    d_in, d_sae = W.shape
    want = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for n, shape in want.items():
        if n in arrays and np.shape(arrays[n]) != shape:
            raise FormatError(f"{where}: tensor {n!r} has shape {np.shape(arrays[n])}, expected "
                              f"{shape} (W_enc is {W.shape})")
    for n in need:
        a = np.asarray(arrays[n])
        if a.dtype.kind != "f":
            raise FormatError(f"{where}: tensor {n!r} has dtype {a.dtype}, expected floats")
        if not np.isfinite(a).all():
            raise FormatError(f"{where}: tensor {n!r} holds non-finite values")


def _read_tensors(p: Path) -> dict[str, np.ndarray]:
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # pickles too
            raise FormatError(f"{p}: not a valid .npz of arrays ({e})") from None
    if p.suffix == ".safetensors":
        from .safetensors import SafetensorsFile

        f = SafetensorsFile(p)
        out = {}
        for name, t in f.tensors.items():
            if t.dtype not in ("F32", "F16", "BF16", "F64"):
                raise FormatError(f"{p}: tensor {name!r} has dtype {t.dtype}, expected floats")
            out[name] = f.array(name)
        return out
    raise ValueError(f"{p}: expected a .npz or .safetensors file")


_HF_POINTS = [(re.compile(r"layers\.(\d+)\.output$"), "hook_resid_post"),
              (re.compile(r"layers\.(\d+)\.input$"), "hook_resid_pre"),
              (re.compile(r"layers\.(\d+)\.post_feedforward_layernorm\.output$"), "hook_mlp_out"),
              (re.compile(r"layers\.(\d+)\.post_attention_layernorm\.output$"),
               "hook_attn_out")]


def _hook_from_config(f: Path) -> str | None:
    if not f.exists():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{f}: not a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        return None
    if isinstance(cfg.get("hook_name"), str):
        return cfg["hook_name"]
    for v in cfg.values():
        if isinstance(v, str):
            for rx, point in _HF_POINTS:
                m = rx.search(v)
                if m:
                    return f"blocks.{m.group(1)}.{point}"
    return None


def _hook_from_path(p: Path) -> str | None:
    s = str(p).replace(os.sep, "/")
    m = re.search(r"(resid_post|mlp_out|resid_pre)/layer_(\d+)", s)
    if m:
        return f"blocks.{m.group(2)}.hook_{m.group(1)}"
    m = re.search(r"-res[^/]*/layer_(\d+)/", s)
    return f"blocks.{m.group(1)}.hook_resid_post" if m else None


# -- with the model ------------------------------------------------------------------------------

def cache_names(names, saes: Sequence[SAE]):
    """run_with_cache's names plus every SAE's hook point (None: all names already)."""
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names)
    return names + [s._hook() for s in saes if s._hook() not in names]


def add_acts(cache: dict[str, np.ndarray], saes: Sequence[SAE]) -> dict[str, np.ndarray]:
    """Adds ``<hook>.hook_sae_acts_post`` (T, d_sae) for each SAE to a run_with_cache dict."""
    for s in saes:
        if not isinstance(s, SAE):
            raise TypeError(f"saes must hold gemma3.SAE objects, got {type(s).__name__}")
        name = s._hook()
        if name not in cache:
            raise ValueError(f"the SAE's hook point {name!r} was not recorded (check layers=)")
        x = cache[name]
        cache[name + ACTS_SUFFIX] = s.encode(x.reshape(len(x), -1))
    return cache


@dataclass(frozen=True)
class Activation:
    """One position where a feature fired: text index, token position, token id, value."""

    text: int
    position: int
    token: int
    value: float


def top_activations(model, sae: SAE, texts: Sequence, features: int | Sequence[int],
                    k: int = 10, chunk: int = 256, start: int = 1) -> dict[int, list[Activation]]:
    """The ``k`` positions with the largest activation of each feature over ``texts`` (strings
    or id lists), best first. Texts run one at a time and are encoded ``chunk`` positions at a
    time against only the chosen features' encoder columns, so memory stays bounded by one text's
    activation at the hook point plus a (chunk, n_features) block. Positions before ``start``
    are skipped (default 1: the BOS position, whose residual norm in Gemma is far larger than
    any other's and which SAEs are not trained on)."""
    feats = [features] if isinstance(features, (int, np.integer)) else list(features)
    feats = [_check.integer("features item", f, 0, sae.d_sae - 1) for f in feats]
    k = _check.integer("k", k, 1)
    chunk = _check.integer("chunk", chunk, 1)
    start = _check.integer("start", start, 0)
    name = sae._hook()
    sub = SAE(sae.W_enc[:, feats], sae.b_enc[feats], sae.W_dec[feats], sae.b_dec,
              None if sae.threshold is None else sae.threshold[feats],
              "relu" if sae.architecture == "topk" else sae.architecture,
              None, name, sae.apply_b_dec_to_input)
    if sae.architecture == "topk":
        raise UnsupportedError("top_activations reads single features; a TopK SAE's features "
                               "depend on all the others (encode whole rows instead)")
    heaps: dict[int, list] = {f: [] for f in feats}
    for i, text in enumerate(texts):
        ids = model._ids(text, "texts item")
        _, cache = model.run_with_cache(ids, names=[name], logits="none")
        x = cache[name].reshape(len(ids), -1)
        for s in range(start, len(x), chunk):
            acts = sub.encode(x[s:s + chunk])
            for j, f in enumerate(feats):
                col = acts[:, j]
                for r in np.argsort(-col)[:k]:
                    if col[r] <= 0:
                        break
                    item = (float(col[r]), -i, -(s + int(r)), ids[s + int(r)])
                    if len(heaps[f]) < k:
                        heapq.heappush(heaps[f], item)
                    elif item > heaps[f][0]:
                        heapq.heapreplace(heaps[f], item)
        del cache, x
    out = {}
    for f, h in heaps.items():
        out[f] = []
        for v, ni, npos, tok in sorted(h, reverse=True):
            out[f].append(Activation(-ni, -npos, int(tok), v))
    return out


def random_sae(d_in: int, d_sae: int, seed: int = 0, hook_name: str | None = None,
               scale: float = 1.0) -> SAE:
    """A seeded random JumpReLU SAE (unit decoder rows, encoder their transpose / scale,
    thresholds 0.5 / scale) — for trying the API without a downloaded Gemma Scope file."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return SAE(W_dec.T / scale, np.zeros(d_sae, np.float32), W_dec,
               np.zeros(d_in, np.float32), np.full(d_sae, 0.5, np.float32), "jumprelu",
               hook_name=hook_name)
