"""The Gemma 3 vision encoder: SigLIP tower + multimodal projector, loaded from a Hugging Face
multimodal checkpoint directory or from a llama.cpp ``mmproj`` GGUF.

``VisionTower.encode(pixel_values (n, 3, S, S) float32 in [-1, 1]) -> (n, M, n_embd_text)``
with M = ``mm_tokens_per_image`` (256 for the released models: a 64 x 64 patch grid average-pooled
4 x 4 to 16 x 16 tokens, row-major). Math in csrc/vision/siglip.c; references
transformers-gemma3.md §3.1-3.2 and llama-cpp-gemma3.md §6.1, §6.3.

Conventions, for both formats (one row each in the vision role table, csrc/model/roles.c, which
the loaders below read through ``loader.build_weights``):

* matrices are ``(rows, cols)`` with ``y = W x`` (HF Linear ``[out, in]``; GGUF ``ne = [in, out]``);
* the patch convolution ``(D, 3, p, p)`` is flattened to ``(D, 3 p p)`` in (channel, row, col)
  order — what the C im2col writes for a patch;
* the projector RMSNorm is bound as the full multiplier ``1 + w``: HF stores ``w``
  (``Gemma3RMSNorm``), llama.cpp's converter stores ``1 + w`` in ``mm.soft_emb_norm.weight``;
* the projection ``x @ P`` with HF's ``mm_input_projection_weight`` P of shape
  ``(D, n_embd_text)`` is bound as ``P^T`` ``(n_embd_text, D)``; the mmproj tensor
  ``mm.input_projection.weight`` (``ne = [n_embd_text, D]``) holds the same P and is transposed
  the same way;
* mmproj ``ffn_up``/``ffn_down`` are HF ``fc1``/``fc2``; old files had them the other way and are
  recognised as llama.cpp does: the role's alternative name is read when the current name's shape
  is not the role's and the alternative's is. When the MLP is square (``n_ff == width``) the two
  layouts cannot be told apart and the current one is assumed.
* token ids (``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>``) come from the HF
  config, or from our mmproj extension keys ``clip.gemma3.{boi,eoi,image}_token_id`` (llama.cpp
  ignores them), else from the tokenizer, else the Gemma 3 defaults 255999 / 256000 / 262144.

Compute modes (``vision_dtype``, :func:`vision_dtype`): ``"bf16"`` converts every matrix to
bfloat16 once at load and runs the products (attention too) with bf16 operands and float32
accumulation (AVX-512 BF16 kernels, csrc/kernels/gemm_bf16.c); ``"f32"`` keeps float32
throughout. Default: the file's precision class — F16 / BF16 (or quantized) mmproj matrices and
BF16 safetensors compute in bf16, F32 checkpoints in f32. On a CPU (or ``G3_ISA`` level) without
the bf16 kernel the tower runs the f32 path whatever was asked; ``VisionTower.compute`` says
which mode runs.

Prompts with images (where the soft tokens go, expansion of ``<start_of_image>``, what a cached
context may reuse) are gemma3.multimodal.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _check, _core
from ._core import FormatError, UnsupportedError
from .config import bounded_int, bounded_num
from .loader import build_weights, gguf_entry, hf_entry, role_of

__all__ = ["VisionConfig", "VisionTower", "load_hf_vision", "load_mmproj", "token_grid",
           "token_boxes", "vision_dtype", "VISION_DTYPES", "HF_VISION_PREFIXES",
           "HF_PROJECTOR_PREFIXES"]

# prefixes in HF checkpoints (transformers-gemma3.md §2.9); transformers 5 folds SiglipVisionModel's
# `vision_model.` away and its save_pretrained writes `vision_tower.embeddings...`
HF_VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.",
                      "model.vision_tower.", "vision_tower.")  # the last two: transformers >= 5
HF_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# the SigLIP configuration of every released Gemma 3 (convert_gemma3_weights.py _VISION_CONFIG);
# SiglipVisionConfig's own class defaults (768/3072/12/12/224/16) never apply
GEMMA3_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                              num_attention_heads=16, image_size=896, patch_size=14,
                              layer_norm_eps=1e-6)
BOI_ID, EOI_ID, IMAGE_ID = 255999, 256000, 262144
VISION_DTYPES = ("bf16", "f32")


def vision_dtype(value: Any, stored: str | None = None) -> str:
    """The tower's compute mode: ``value`` ("bf16", "f32", or None for the default) checked;
    the default is the precision class of ``stored``, the file's matrix type name ("F32" ->
    "f32"; "F16", "BF16" and quantized types -> "bf16")."""
    if value is None:
        return "f32" if stored in (None, "F32", "F64") else "bf16"
    if not isinstance(value, str) or value.lower() not in VISION_DTYPES:
        raise ValueError(f"vision_dtype must be 'bf16', 'f32' or None (the file's precision), "
                         f"got {value!r}")
    return value.lower()

@dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of the SigLIP tower and the Gemma 3 projector."""

    image_size: int = 896
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    mm_tokens_per_image: int = 256
    text_hidden_size: int = 2560
    boi_token_id: int = BOI_ID
    eoi_token_id: int = EOI_ID
    image_token_id: int = IMAGE_ID

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return int(self.mm_tokens_per_image ** 0.5)  # as the reference projector

    @property
    def pool(self) -> int:
        return self.patches_per_side // self.tokens_per_side

    def to_core(self) -> _core.VisionConfig:
        """The typed config the C tower takes (every field required, no defaults in C)."""
        return _core.VisionConfig(
            image_size=self.image_size, patch_size=self.patch_size, n_embd=self.hidden_size,
            n_ff=self.intermediate_size, n_layer=self.num_layers, n_head=self.num_heads,
            n_mm_tokens=self.mm_tokens_per_image, n_embd_text=self.text_hidden_size,
            eps=float(self.layer_norm_eps))


class VisionTower:
    """The loaded tower + projector. ``encode`` releases the GIL and runs on the threads set by
    :func:`gemma3.set_num_threads`. ``dtype``: the mode asked for ("bf16" or "f32");
    ``compute``: the mode that runs (f32 where the CPU has no bf16 kernel)."""

    def __init__(self, config: VisionConfig, weights: dict[str, Any], owners: Any = None,
                 path: str = "", dtype: str = "f32"):
        self.config = config
        self.path = path
        self._owners = owners
        self.dtype = vision_dtype(dtype)
        self._core = _core.VisionTower(config.to_core(), weights, bf16=self.dtype == "bf16")
        # bytes of the tower's weights as loaded (Model.memory)
        self.nbytes = sum((e[-1] if isinstance(e, tuple) else e).nbytes for e in weights.values()
                          if isinstance(e, (tuple, np.ndarray)))

    @property
    def compute(self) -> str:
        return self._core.compute

    def _pixels(self, pixel_values: Any) -> np.ndarray:
        s = self.config.image_size
        px = np.asarray(pixel_values)
        if px.ndim == 3:
            px = px[None]
        if px.ndim != 4 or px.shape[1:] != (3, s, s):
            raise ValueError(f"pixel_values must be (n, 3, {s}, {s}) float32 in [-1, 1], got "
                             f"shape {px.shape}")
        if px.dtype.kind != "f":
            raise ValueError(f"pixel_values must be floating point, got {px.dtype}")
        px = np.ascontiguousarray(px, dtype=np.float32)
        if not np.isfinite(px).all():
            raise ValueError("pixel_values contain NaN or infinity")
        return px

    def encode(self, pixel_values: Any) -> np.ndarray:
        """``pixel_values (n, 3, S, S)`` (or one ``(3, S, S)``) float32 in [-1, 1] ->
        ``(n, mm_tokens_per_image, n_embd_text)`` float32: the projected soft-token embeddings
        (unscaled; they replace the ``<image_soft_token>`` rows of the text input)."""
        return self._core.encode(self._pixels(pixel_values))

    def encode_with_hidden(self, pixel_values: Any) -> tuple[np.ndarray, np.ndarray]:
        """-> (projected ``(n, M, n_embd_text)``, tower last hidden state ``(n, P, width)``, after
        the post LayerNorm: what HF's ``SiglipVisionModel`` returns as ``last_hidden_state``)."""
        px = self._pixels(pixel_values)
        c = self.config
        hidden = np.empty((len(px), c.patches_per_side ** 2, c.hidden_size), np.float32)
        out = self._core.encode(px, hidden)
        return out, hidden

    def attention(self, pixel_values: Any, layer: int) -> np.ndarray:
        """Attention probabilities of one tower layer for one image:
        ``(heads, P, P)`` float32, P = patches (4096 for the real tower: 1 GiB at 16 heads).
        Rows are query patches, columns key patches, both row-major over the patch grid."""
        px = self._pixels(pixel_values)
        if len(px) != 1:
            raise ValueError("attention() takes one image")
        c = self.config
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < c.num_layers:
            raise ValueError(f"layer must be in [0, {c.num_layers}), got {layer!r}")
        P = c.patches_per_side ** 2
        buf = np.empty((1, c.num_heads, P, P), np.float32)
        self._core.encode(px, None, int(layer), buf)
        return buf[0]

    def __repr__(self) -> str:
        c = self.config
        return (f"<gemma3.VisionTower {c.num_layers} layers, width {c.hidden_size}, "
                f"{c.image_size}px / {c.patch_size}, {c.mm_tokens_per_image} tokens -> "
                f"{c.text_hidden_size}, {self.compute}>")


# -- the grid helper ---------------------------------------------------------------------------
def token_grid(values: Any, tokens_per_side: int | None = None) -> np.ndarray:
    """Reshapes per-token values ``(..., M)`` to the image's token grid ``(..., s, s)`` with
    s = sqrt(M): token t covers grid row t // s, column t % s (row-major, top-left first), e.g.
    a text token's attention over the 256 soft tokens of one image -> a 16 x 16 heatmap."""
    v = np.asarray(values)
    s = tokens_per_side or int(round(math.sqrt(v.shape[-1])))
    if s * s != v.shape[-1]:
        raise ValueError(f"{v.shape[-1]} tokens do not form a square grid")
    return v.reshape(*v.shape[:-1], s, s)


def token_boxes(size: tuple[int, int], tokens_per_side: int = 16,
                box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Picture region of each soft token: ``(M, 4)`` float64 ``(x0, y0, x1, y1)`` in the
    original picture's pixels. ``size = (width, height)`` of the picture; ``box`` the region the
    encoded image covers (a pan & scan crop's box; default the whole picture). The encoder sees
    the region resized to a square, so each token covers an equal (1/s x 1/s) cell of it."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f"size must be a (width, height) pair, got {size!r}")
    w, h = (_check.number(f"size[{i}]", v, 0, lo_open=True) for i, v in enumerate(size))
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    s = _check.integer("tokens_per_side", tokens_per_side, 1)
    t = np.arange(s * s)
    r, c = t // s, t % s
    cw, ch = (x1 - x0) / s, (y1 - y0) / s
    return np.stack([x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch], axis=1)


# -- loading -----------------------------------------------------------------------------------
def _find_prefix(names, prefixes: tuple[str, ...], probe: str) -> str | None:
    return next((p for p in prefixes if f"{p}{probe}" in names), None)


def _vision_prefixes(names) -> tuple[str | None, str | None]:
    """(vision tower, projector) prefixes of an HF checkpoint's tensor names, None if absent:
    found by the patch-embedding and projection names of the role table."""
    patch = role_of("vision", "patch_embd").hf.format(v="")
    proj = role_of("vision", "mm.input_projection").hf.format(m="")
    return (_find_prefix(names, HF_VISION_PREFIXES, patch),
            _find_prefix(names, HF_PROJECTOR_PREFIXES, proj))


# Sanity bounds on the tower's sizes, checked before anything is sized from them (as
# config.INT_LIMITS for the text model): config.json key -> (mmproj key, low, high). SigLIP in
# Gemma 3: 896 px, patch 14, width 1152, MLP 4304, 27 layers, 16 heads.
VISION_LIMITS: dict[str, tuple[str, int, int]] = {
    "image_size": ("clip.vision.image_size", 1, 1 << 14),
    "patch_size": ("clip.vision.patch_size", 1, 1024),
    "hidden_size": ("clip.vision.embedding_length", 1, 1 << 15),
    "intermediate_size": ("clip.vision.feed_forward_length", 1, 1 << 17),
    "num_hidden_layers": ("clip.vision.block_count", 1, 256),
    "num_attention_heads": ("clip.vision.attention.head_count", 1, 256),
}


def check_vision(cfg: VisionConfig) -> VisionConfig:
    """The relations between the tower's sizes that single bounds cannot express."""
    if cfg.image_size % cfg.patch_size:
        raise FormatError(f"image_size {cfg.image_size} is not a multiple of patch_size "
                          f"{cfg.patch_size}")
    if cfg.hidden_size % cfg.num_heads:
        raise FormatError(f"vision hidden size {cfg.hidden_size} is not a multiple of "
                          f"{cfg.num_heads} heads")
    side, tok = cfg.image_size // cfg.patch_size, cfg.tokens_per_side
    if tok * tok != cfg.mm_tokens_per_image or tok < 1 or side % tok:
        raise FormatError(f"mm_tokens_per_image {cfg.mm_tokens_per_image} is not a square grid "
                          f"that divides the {side} patches per side")
    return cfg


def _token_ids(hf: dict[str, Any]) -> dict[str, int]:
    def pick(*keys, default):
        for k in keys:
            if hf.get(k) is not None:
                return bounded_int(hf[k], k, 0, (1 << 24) - 1)
        return default

    return dict(boi_token_id=pick("boi_token_id", "boi_token_index", default=BOI_ID),
                eoi_token_id=pick("eoi_token_id", "eoi_token_index", default=EOI_ID),
                image_token_id=pick("image_token_id", "image_token_index", default=IMAGE_ID))


def load_hf_vision(path: str, hf: dict[str, Any], where: dict[str, Any], text_hidden: int,
                   dtype: str | None = None, vision_dtype_: str | None = None
                   ) -> VisionTower | None:
    """The tower of a Hugging Face ``Gemma3ForConditionalGeneration`` directory (Hub
    ``vision_tower.vision_model.*`` / ``multi_modal_projector.*``, ``model.``-prefixed, or
    transformers 5's ``vision_tower.*`` names); ``where`` maps tensor names to their open
    safetensors shard. None when the checkpoint has no vision tower (a text-only model).
    ``vision_dtype_``: the compute mode (:func:`vision_dtype`; default from the stored type of
    the patch embedding)."""
    names = set(where)
    vp, pp = _vision_prefixes(names)
    if vp is None:
        return None
    probe = vp + role_of("vision", "patch_embd").hf.format(v="")
    mode = vision_dtype(vision_dtype_, where[probe].tensors[probe].dtype)
    if pp is None:
        raise FormatError(f"{path}: a vision tower but no multi_modal_projector."
                          "mm_input_projection_weight")
    vc = dict(GEMMA3_VISION_DEFAULTS)
    vc.update({k: v for k, v in (hf.get("vision_config") or {}).items() if v is not None})
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise UnsupportedError(f"{path}: vision hidden_act {act!r}; SigLIP in Gemma 3 uses "
                               "gelu_pytorch_tanh")
    if vc.get("vision_use_head"):
        pass  # the pooling head is never used by Gemma 3 (last_hidden_state feeds the projector)
    def hf_int(key, value=None):
        lim = VISION_LIMITS[key]
        return bounded_int(vc[key] if value is None else value, "vision_config." + key,
                           lim[1], lim[2])

    cfg = check_vision(VisionConfig(
        image_size=hf_int("image_size"), patch_size=hf_int("patch_size"),
        hidden_size=hf_int("hidden_size"), intermediate_size=hf_int("intermediate_size"),
        num_layers=hf_int("num_hidden_layers"), num_heads=hf_int("num_attention_heads"),
        layer_norm_eps=bounded_num(vc["layer_norm_eps"], "vision_config.layer_norm_eps", 0, 1),
        mm_tokens_per_image=bounded_int(hf.get("mm_tokens_per_image", 256),
                                        "mm_tokens_per_image", 1, 1 << 16),
        text_hidden_size=int(text_hidden), **_token_ids(hf)))

    prefixes = {"v": vp, "m": pp}
    w = build_weights("vision", cfg.to_core().dims, cfg.num_layers,
                      lambda role, i, shape: hf_entry(where, path, role, i, shape, prefixes, dtype))
    return VisionTower(cfg, w, owners=None, path=path, dtype=mode)


def _md_int(md: dict[str, Any], key: str, default: int | None = None, lo: int = 0,
            hi: int = 1 << 24) -> int:
    v = md.get(key, default)
    if v is None:
        raise FormatError(f"mmproj metadata key {key!r} is missing")
    return bounded_int(v, f"mmproj metadata key {key!r}", lo, hi)


def _md_size(md: dict[str, Any], field_: str) -> int:
    key, lo, hi = VISION_LIMITS[field_]
    return _md_int(md, key, None, lo, hi)


def load_mmproj(path: str | os.PathLike, text_hidden: int | None = None,
                dtype: str | None = None, tokenizer: Any = None,
                vision_dtype_: str | None = None) -> VisionTower:
    """A llama.cpp ``mmproj`` GGUF (``general.architecture = "clip"``, projector ``gemma3``).
    Tensors stay in the file mapping where they can be used as stored (the projection, which
    needs a transpose, is converted). ``text_hidden`` checks the projection width against the
    text model's. ``vision_dtype_``: the compute mode (:func:`vision_dtype`; default from the
    stored type of the first layer's q matrix)."""
    from .gguf import GGUFFile

    vision_dtype(vision_dtype_)  # a bad argument fails before the file is read
    path = os.fspath(path)
    f = GGUFFile(path)
    md = f.metadata
    if md.get("general.architecture") != "clip":
        raise UnsupportedError(f"{path}: general.architecture is "
                               f"{md.get('general.architecture')!r}, an mmproj file says 'clip'")
    ptype = md.get("clip.projector_type", md.get("clip.vision.projector_type"))
    if ptype != "gemma3":
        raise UnsupportedError(f"{path}: projector type {ptype!r}; only 'gemma3' is supported")
    if md.get("clip.has_vision_encoder") is False:
        raise FormatError(f"{path}: clip.has_vision_encoder is false")
    k = "clip.vision."
    image = _md_size(md, "image_size")
    patch = _md_size(md, "patch_size")
    if not patch or image % patch:
        raise FormatError(f"{path}: image_size {image} is not a multiple of patch_size {patch}")
    merge = _md_int(md, k + "projector.scale_factor", 4)
    side = image // patch
    if not merge or side % merge:
        raise FormatError(f"{path}: projector.scale_factor {merge} does not divide the {side} "
                          "patches per side")
    proj_dim = _md_int(md, k + "projection_dim", 0)
    ids = {}
    for name, default, text in (("boi_token_id", BOI_ID, "<start_of_image>"),
                                ("eoi_token_id", EOI_ID, "<end_of_image>"),
                                ("image_token_id", IMAGE_ID, "<image_soft_token>")):
        v = md.get(f"clip.gemma3.{name}")
        if v is None and tokenizer is not None:
            v = tokenizer.token_to_id(text)
        ids[name] = bounded_int(v, f"clip.gemma3.{name}", 0, (1 << 24) - 1) if v is not None \
            else default
    pname = role_of("vision", "mm.input_projection").gguf
    if pname not in f.tensors:
        raise FormatError(f"{path}: tensor {pname!r} is missing")
    pshape = f.tensors[pname].shape  # (D, n_embd_text), as HF's P
    n_text = pshape[-1]
    if proj_dim and proj_dim != n_text:
        raise FormatError(f"{path}: projection_dim {proj_dim} but mm.input_projection is "
                          f"{pshape}")
    if text_hidden is not None and n_text != text_hidden:
        raise FormatError(f"{path}: the projector outputs width {n_text} but the text model's "
                          f"width is {text_hidden}: mmproj and text GGUF do not belong together")
    eps_key = k + "attention.layer_norm_epsilon"
    cfg = check_vision(VisionConfig(
        image_size=image, patch_size=patch, hidden_size=_md_size(md, "hidden_size"),
        intermediate_size=_md_size(md, "intermediate_size"),
        num_layers=_md_size(md, "num_hidden_layers"), num_heads=_md_size(md, "num_attention_heads"),
        layer_norm_eps=bounded_num(md.get(eps_key, 1e-6), eps_key, 0, 1),
        mm_tokens_per_image=(side // merge) ** 2, text_hidden_size=n_text, **ids))
    w = build_weights("vision", cfg.to_core().dims, cfg.num_layers,
                      lambda role, i, shape: gguf_entry(f, path, role, i, shape, dtype))
    q0 = role_of("vision", "blk.{i}.attn_q").gguf.format(i=0)
    stored = f.tensors[q0].type if q0 in f.tensors else None
    return VisionTower(cfg, w, owners=f, path=path, dtype=vision_dtype(vision_dtype_, stored))
