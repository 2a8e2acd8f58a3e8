"""Prompts with images: where each image's soft tokens go in the ids, how a prompt with images
is fed (never cutting an image between forward calls), and how much of a cached context a new
prompt with images may reuse.

The tower itself (gemma3.vision) only turns pixels into embeddings; everything here is about token
positions, so the engine (gemma3.engine) and the model facade use it without the loaders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .vision import VisionConfig, VisionTower

# -- prompts with images -----------------------------------------------------------------------
# transformers-gemma3.md §4.3: each <start_of_image> placeholder becomes the full image sequence
# "\n\n<start_of_image>" + M x <image_soft_token> + "<end_of_image>\n\n" (or, with pan & scan
# crops, "Here is the original image " + FIS + " and here are some crops to help you see better "
# + " ".join([FIS] * n_crops)), then the whole string is tokenized, so the blank lines merge with
# the neighbouring text as BPE does. The soft-token run is kept out of the tokenizer (a sentinel
# splits the string there); since <start_of_image>/<end_of_image> are special tokens on either
# side, tokenizing the pieces separately gives the same ids as tokenizing the whole string.
BOI_TEXT, EOI_TEXT = "<start_of_image>", "<end_of_image>"
_SOFT = "\x00soft\x00"  # where a run of soft tokens goes (never in user text: NUL is rejected)


@dataclass(frozen=True)
class ImageSpan:
    """One image's soft tokens in a prompt: positions [start, start + M)."""

    start: int
    pixels: np.ndarray  # (3, S, S) float32
    digest: str  # identity of the pixels (the KV cache reuses an image only if it matches)


def image_sequence(n_crops: int) -> str:
    """The text an image placeholder expands to (the soft-token run is the _SOFT sentinel)."""
    fis = "\n\n" + BOI_TEXT + _SOFT + EOI_TEXT + "\n\n"
    if n_crops <= 0:
        return fis
    return ("Here is the original image " + fis + " and here are some crops to help you see "
            "better " + " ".join([fis] * n_crops))


def pixel_values(img: Any, pan_and_scan: bool, size: int) -> np.ndarray:
    """An image in any accepted form -> ``(1 + n_crops, 3, size, size)`` float32 (original first,
    then crops). Pixel arrays ``(3, S, S)`` / ``(n, 3, S, S)`` and objects with a
    ``pixel_values`` attribute (gemma3.image.ImageInput) are used as given; pictures (paths,
    bytes, PIL images, uint8 arrays) go through ``gemma3.image.preprocess``."""
    px = getattr(img, "pixel_values", None)
    if px is None and isinstance(img, np.ndarray) and img.dtype.kind == "f" and (
            img.ndim == 4 or (img.ndim == 3 and img.shape[0] == 3)):
        px = img
    if px is None:
        try:
            from . import image as _image
        except ImportError as e:
            raise ValueError("decoding pictures needs gemma3.image, which is not available "
                             f"({e}); pass pixel_values (n, 3, {size}, {size}) float32") from None
        px = _image.preprocess(img, pan_and_scan=pan_and_scan, size=size).pixel_values
    px = np.asarray(px)
    if px.ndim == 3:
        px = px[None]
    if px.ndim != 4 or px.shape[1:] != (3, size, size) or px.dtype.kind != "f" or not len(px):
        raise ValueError(f"pixel_values must be (n, 3, {size}, {size}) float32 in [-1, 1], got "
                         f"{px.dtype} {px.shape}")
    px = np.ascontiguousarray(px, dtype=np.float32)
    if not np.isfinite(px).all():
        raise ValueError("pixel_values contain NaN or infinity")
    return px


def _digest(px: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(px.tobytes() + repr(px.shape).encode()).hexdigest()


def expand_text(text: str, pictures: list[np.ndarray], tokenizer: Any, cfg: VisionConfig,
                add_bos: bool = True) -> tuple[list[int], list[ImageSpan]]:
    """A text prompt with one ``<start_of_image>`` per picture (pictures: pixel_values arrays
    ``(1 + crops, 3, S, S)``) -> (ids, spans), as Gemma3Processor + the tokenizer (specials
    parsed). Empty text with pictures becomes ``" ".join([<start_of_image>] * n)`` as there."""
    if "\x00" in text:
        raise ValueError("the prompt contains a NUL character")
    if not text and pictures:
        text = " ".join([BOI_TEXT] * len(pictures))
    parts = text.split(BOI_TEXT)
    if len(parts) - 1 != len(pictures):
        raise ValueError(f"the prompt has {len(parts) - 1} {BOI_TEXT} placeholders for "
                         f"{len(pictures)} images")
    full = parts[0]
    for px, rest in zip(pictures, parts[1:], strict=True):
        full += image_sequence(len(px) - 1) + rest
    pieces = full.split(_SOFT)
    frames = [f for px in pictures for f in px]
    return _assemble(pieces, frames, lambda s, first: tokenizer.encode(
        s, add_bos=add_bos and first, parse_special=True), cfg)


def _assemble(pieces, frames, encode, cfg: VisionConfig):
    ids: list[int] = []
    spans: list[ImageSpan] = []
    for i, piece in enumerate(pieces):
        ids += encode(piece, i == 0)
        if i < len(frames):
            px = frames[i]
            spans.append(ImageSpan(len(ids), px, _digest(px)))
            ids += [cfg.image_token_id] * cfg.mm_tokens_per_image
    return ids, spans


def expand_segments(segs: list[tuple[str, bool]], pictures: list[np.ndarray], tokenizer: Any,
                    cfg: VisionConfig) -> tuple[list[int], list[ImageSpan]]:
    """Chat segments ``(text, is_markup)`` from gemma3.chat.render, whose image items are
    ``("<start_of_image>", True)`` -> (ids with BOS, spans). Markup is tokenized with its special
    tokens parsed, user text without; text on both sides of a boundary is tokenized together,
    as the reference tokenizes the rendered string whole (so "user\\n" + "\\n\\n" is one
    "\\n\\n\\n" token)."""
    import re

    items: list[tuple[str, Any]] = []  # ("text", str) | ("id", int) | ("soft", None)
    k = 0
    for text, markup in segs:
        if markup and text == BOI_TEXT:
            if k >= len(pictures):
                raise ValueError("more image items than images")
            text = image_sequence(len(pictures[k]) - 1)
            k += 1
        if not markup:
            items.append(("text", text))
            continue
        for j, piece in enumerate(text.split(_SOFT)):
            if j:
                items.append(("soft", None))
            for tok in re.split(r"(<[^<>\s]+>)", piece):
                tid = tokenizer.token_to_id(tok) if tok.startswith("<") else None
                if tid is not None and tokenizer.is_special(tid):
                    items.append(("id", tid))
                elif tok:
                    items.append(("text", tok))
    if k != len(pictures):
        raise ValueError(f"{k} image items for {len(pictures)} images")
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    spans: list[ImageSpan] = []
    frames = iter([f for px in pictures for f in px])
    buf = ""
    for kind, val in items + [("end", None)]:
        if kind == "text":
            buf += val
            continue
        if buf:
            ids += tokenizer.encode(buf, add_bos=False, parse_special=False)
            buf = ""
        if kind == "id":
            ids.append(val)
        elif kind == "soft":
            px = next(frames)
            spans.append(ImageSpan(len(ids), px, _digest(px)))
            ids += [cfg.image_token_id] * cfg.mm_tokens_per_image
    return ids, spans


def spans_from_ids(ids: list[int], pictures: list[np.ndarray], cfg: VisionConfig
                   ) -> list[ImageSpan]:
    """Token-id prompts: every run of ``<image_soft_token>`` ids holds whole images (a multiple
    of M tokens, M per image), filled in order by the frames of ``pictures`` (original, then
    crops, per picture)."""
    M, tid = cfg.mm_tokens_per_image, cfg.image_token_id
    frames = [f for px in pictures for f in px]
    starts = []
    i = 0
    while i < len(ids):
        if ids[i] != tid:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == tid:
            j += 1
        if (j - i) % M:
            raise ValueError(f"a run of {j - i} image tokens at index {i} is not a multiple of "
                             f"the {M} tokens of an image")
        starts += range(i, j, M)
        i = j
    if len(starts) != len(frames):
        raise ValueError(f"the prompt has room for {len(starts)} images (runs of {M} image "
                         f"tokens, id {tid}) but {len(frames)} were given")
    return [ImageSpan(s, px, _digest(px)) for s, px in zip(starts, frames, strict=True)]


def chunk_bounds(n: int, spans_rel: list[int], M: int, chunk: int) -> list[tuple[int, int]]:
    """Splits [0, n) into pieces of about ``chunk`` tokens, never cutting an image's run (an
    image must be in one forward call to be bidirectional). spans_rel: image starts in [0, n)."""
    out, s = [], 0
    while s < n:
        e = min(n, s + chunk)
        for st in spans_rel:
            if st < e < st + M:
                e = min(n, st + M)
        out.append((s, e))
        s = e
    return out


# -- feeding and KV-cache reuse (used by gemma3.engine) ----------------------------------------
def text_positions(ids: list[int], spans: list[ImageSpan], M: int) -> list[int]:
    """ids without the soft tokens (those are replaced by embeddings; their id may even lie
    past a text GGUF's vocabulary)."""
    if not spans:
        return ids
    keep = np.ones(len(ids), bool)
    for sp in spans:
        keep[sp.start:sp.start + M] = False
    return [t for t, k in zip(ids, keep, strict=True) if k]


def reusable_prefix(common: int, cached: list[tuple[int, str]], spans: list[ImageSpan],
                    M: int) -> int:
    """How many cached positions a new prompt may keep, given the id-level common prefix.

    Soft tokens share one id, so ids alone cannot tell two images apart: the prefix also stops
    at the first cached image whose pixel digest differs from the new prompt's image at the
    same position (or where the new prompt has none). And an image is never split: it was
    computed bidirectionally, in one call, so the prefix never ends inside one."""
    new = {sp.start: sp.digest for sp in spans}
    for s, d in cached:
        if s < common and new.get(s) != d:
            common = s
    for s in [s for s, _ in cached] + list(new):
        if s < common < s + M:
            common = s
    return common


def encode_spans(tower: VisionTower, spans: list[ImageSpan]) -> dict[str, np.ndarray]:
    """digest -> (M, n_embd_text) projected embeddings, each distinct image encoded once."""
    uniq: dict[str, np.ndarray] = {}
    for sp in spans:
        uniq.setdefault(sp.digest, sp.pixels)
    if not uniq:
        return {}
    out = tower.encode(np.stack(list(uniq.values())))
    return dict(zip(uniq, out, strict=True))


def soft_mask(n: int, base: int, spans: list[ImageSpan], M: int) -> np.ndarray:
    """(n,) uint8: 1 at the soft tokens of ``spans`` among n tokens fed from position ``base``
    (their ids are replaced by embeddings, so the vocabulary check skips them)."""
    mask = np.zeros(n, np.uint8)
    for sp in spans:
        mask[max(sp.start - base, 0):max(sp.start - base + M, 0)] = 1
    return mask



# -- the Model's prompts with images ------------------------------------------------------------
NO_TOWER = ("this model has no vision tower: images need a multimodal checkpoint (an HF "
            "Gemma3ForConditionalGeneration directory, or load(text_gguf, mmproj=...))")


def prompt_with_images(prompt: Any, images: Any, pan_and_scan: bool, tower, tokenizer
                       ) -> tuple[list[int], list[ImageSpan]]:
    """-> (ids, image spans). Text: each ``<start_of_image>`` is expanded as the reference
    processor does and the whole string tokenized with special tokens parsed; ids (already
    gemma3._check.as_ids'd): the images fill the runs of ``<image_soft_token>`` ids in order."""
    if isinstance(images, (str, bytes, np.ndarray)) or not isinstance(images, Sequence):
        images = [images]
    if tower is None:
        raise ValueError(NO_TOWER)
    vc = tower.config
    pics = [pixel_values(im, pan_and_scan, vc.image_size) for im in images]
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids")
        return expand_text(prompt, pics, tokenizer, vc)
    return prompt, spans_from_ids(prompt, pics, vc)


def chat_prompt(segs: list[tuple[str, bool]], images: list, pan_and_scan: bool, tower,
                tokenizer) -> tuple[list[int], list[ImageSpan]]:
    """Rendered chat segments (gemma3.chat.render) -> (ids with BOS, image spans)."""
    if images:
        if tower is None:
            raise NotImplementedError("this model has no vision tower; images need a vision "
                                      "checkpoint")
        vc = tower.config
        pics = [pixel_values(im, pan_and_scan, vc.image_size) for im in images]
        return expand_segments(segs, pics, tokenizer, vc)
    ids = [tokenizer.bos_id]
    for text, markup in segs:
        ids += tokenizer.encode(text, add_bos=False, parse_special=markup)
    return ids, []


def encode_image(tower, image: Any, pan_and_scan: bool) -> np.ndarray:
    """See Model.encode_image."""
    if tower is None:
        raise ValueError("this model has no vision tower")
    px = pixel_values(image, pan_and_scan, tower.config.image_size)
    out = tower.encode(px)
    return out if pan_and_scan or len(px) > 1 else out[0]
