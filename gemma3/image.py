"""Image input for Gemma 3's vision tower, as the reference image processor prepares it.

``preprocess(img)`` reproduces transformers' ``Gemma3ImageProcessor`` (slow/PIL path): optional
pan & scan on the original picture, each image resized to ``size × size`` with PIL's antialiasing
BILINEAR (done in C, bit-exact with Pillow 13), then ``x / 127.5 - 1`` channel-first.

Pictures come as paths, bytes, NumPy arrays or PIL images. WebP is decoded in C (libwebp); other
formats go through Pillow (``pip install pillow``, or the ``gemma3[vision]`` extra). Colour
conversion follows the reference for each kind of input:

- paths and bytes: as ``transformers.image_utils.load_image`` — EXIF orientation applied (Pillow
  formats), then ``convert("RGB")``, which drops alpha;
- PIL images: as the processor's ``convert_to_rgb`` — alpha composited onto white with PIL's
  ``alpha_composite`` (8-bit fixed point); palette/grayscale converted by PIL;
- NumPy ``(H, W, 4)`` uint8: composited onto white in float, rounded (the processor's array path);
  ``(H, W)`` and ``(H, W, 1)`` repeated to RGB.

``alpha="white"`` or ``alpha="drop"`` overrides the per-input default. Broken, truncated, empty,
zero-sized, oversized (> 16384 per side or > 2^28 pixels) and non-image inputs raise ValueError;
missing paths raise OSError.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _check, _core

__all__ = ["ImageInput", "load_image", "pan_and_scan", "preprocess", "resize", "MAX_SIDE",
           "MAX_PIXELS"]

MAX_SIDE = 16384
# Largest picture decoded (width x height), checked from the header before any pixel memory
# exists: a WebP file of a few dozen bytes can declare 16384 x 16384 (1 GiB as RGBA). 2^27
# (e.g. 16384 x 8192, 512 MiB as RGBA) by default; assign gemma3.image.MAX_PIXELS to change it,
# up to MAX_SIDE^2 (Pillow-decoded formats are also bound by PIL.Image.MAX_IMAGE_PIXELS).
MAX_PIXELS = 1 << 27
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels, end-exclusive


@dataclass(frozen=True)
class ImageInput:
    """``pixel_values``: ``(1 + n_crops, 3, size, size)`` float32 in [-1, 1], the whole picture
    first, then the pan & scan crops row-major; ``crops``: their boxes ``(x0, y0, x1, y1)`` in the
    original picture; ``original_size``: ``(height, width)``."""

    pixel_values: np.ndarray
    crops: list[Box] = field(default_factory=list)
    original_size: tuple[int, int] = (0, 0)


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError("decoding PNG/JPEG and other non-WebP images needs Pillow: "
                          "pip install pillow (or pip install 'gemma3[vision]')") from None
    return Image, ImageOps


def _max_pixels() -> int:
    m = MAX_PIXELS
    if isinstance(m, bool) or not isinstance(m, int) or not 0 < m <= MAX_SIDE * MAX_SIDE:
        raise ValueError(f"gemma3.image.MAX_PIXELS must be an int in [1, {MAX_SIDE}^2], "
                         f"got {m!r}")
    return m


def _check_size(w: int, h: int, what: str) -> None:
    if w <= 0 or h <= 0:
        raise ValueError(f"{what} has zero size ({w} x {h} pixels)")
    m = _max_pixels()
    if w > MAX_SIDE or h > MAX_SIDE or w * h > m:
        raise ValueError(f"{what} of {w} x {h} pixels is too large (limits: {MAX_SIDE} per side, "
                         f"{m} pixels: gemma3.image.MAX_PIXELS)")


def _composite_white_pil_math(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 over opaque white with PIL.Image.alpha_composite's 8-bit arithmetic."""
    a = rgba[..., 3:4].astype(np.uint32)
    t = rgba[..., :3].astype(np.uint32) * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7)
    return ((((t >> 8) + t) >> 8) >> 7).astype(np.uint8)


def _composite_white_float(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 over white as transformers' convert_to_rgb does for arrays."""
    alpha = rgba[..., 3:4] / 255
    return np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)


def _from_pil(im: Any, alpha: str) -> np.ndarray:
    w, h = im.size
    _check_size(w, h, "image")
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if alpha == "white" and has_alpha:
        Image, _ = _pil()
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(bg, rgba).convert("RGB")
    else:
        out = im if im.mode == "RGB" else im.convert("RGB")
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


def _is_webp(data: bytes | memoryview) -> bool:
    return len(data) >= 12 and bytes(data[:4]) == b"RIFF" and bytes(data[8:12]) == b"WEBP"


def _from_bytes(data: bytes | memoryview, alpha: str, what: str) -> np.ndarray:
    if len(data) == 0:
        raise ValueError(f"{what}: empty image data (0 bytes)")
    if _is_webp(data):
        try:
            px = _core.webp_decode(data, max_pixels=_max_pixels())
        except _core.UnsupportedError:  # animated: Pillow gives the first frame
            px = None
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        if px is not None:
            if px.shape[2] == 4:
                px = (_composite_white_pil_math(px) if alpha == "white"
                      else np.ascontiguousarray(px[..., :3]))
            return px
    Image, ImageOps = _pil()
    try:
        im = Image.open(io.BytesIO(bytes(data)))
        _check_size(*im.size, what)
        im.load()
        im = ImageOps.exif_transpose(im)  # as transformers.image_utils.load_image
        return _from_pil(im, alpha)
    except ValueError:
        raise
    except Image.UnidentifiedImageError:
        raise ValueError(f"{what}: not an image (format not recognised; first bytes "
                         f"{bytes(data[:8])!r})") from None
    except Image.DecompressionBombError as e:  # MAX_PIXELS raised past Pillow's own limit
        raise ValueError(f"{what}: too large for Pillow ({e}); PIL.Image.MAX_IMAGE_PIXELS "
                         f"sets its limit") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{what}: broken or truncated image data ({e})") from None


def _from_array(a: np.ndarray, alpha: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (H, W), (H, W, 1|3|4); got {a.dtype} "
                         f"{a.shape} (pass pixel_values separately if already normalised)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        _check_size(a.shape[1], a.shape[0], "image array")
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 1|3|4) uint8; got shape {a.shape}")
    _check_size(a.shape[1], a.shape[0], "image array")
    if a.shape[2] == 4:
        return _composite_white_float(a) if alpha == "white" else np.ascontiguousarray(a[..., :3])
    return np.ascontiguousarray(a)


def load_image(obj: Any, *, alpha: str | None = None) -> np.ndarray:
    """A picture -> ``(H, W, 3)`` uint8 RGB.

    ``obj``: a path (str / os.PathLike), bytes-like file contents, a uint8 array ``(H, W)`` or
    ``(H, W, 1|3|4)``, or a PIL image. ``alpha``: ``"white"`` (composite onto white) or
    ``"drop"``; default per input kind as the reference does (module docstring)."""
    if alpha not in (None, "white", "drop"):
        raise ValueError(f"alpha must be None, 'white' or 'drop', got {alpha!r}")
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        with open(path, "rb") as f:  # OSError (FileNotFoundError, IsADirectoryError) as is
            data = f.read()
        return _from_bytes(data, alpha or "drop", path)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _from_bytes(memoryview(obj).cast("B"), alpha or "drop", "image bytes")
    if isinstance(obj, np.ndarray):
        return _from_array(obj, alpha or "white")
    if hasattr(obj, "getbands") and hasattr(obj, "convert") and hasattr(obj, "size"):
        try:
            obj.load()
        except (OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"broken or truncated PIL image ({e})") from None
        return _from_pil(obj, alpha or "white")
    raise ValueError(f"cannot read an image from {type(obj).__name__}: pass a path, bytes, a "
                     "uint8 array (H, W[, C]) or a PIL image")


def pan_and_scan(img: np.ndarray, min_crop_size: int = 256, max_num_crops: int = 4,
                 min_ratio: float = 1.2) -> tuple[list[np.ndarray], list[Box]]:
    """Pan & scan crops of ``img (H, W, C)``, as transformers' Gemma3ImageProcessor.pan_and_scan:
    the longer side is cut into ``n`` equal crops (``round(long/short)`` limited by
    ``long // min_crop_size`` and to ``[2, max_num_crops]``) when the aspect ratio reaches
    ``min_ratio``; none if a crop would be smaller than ``min_crop_size``. Returns
    ``(crops, boxes)``: views into ``img`` row-major, and their ``(x0, y0, x1, y1)`` (the last crop
    may be narrower: boxes are clipped to the image)."""
    _check_crop_args(min_crop_size, max_num_crops, min_ratio)
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
        raise ValueError(f"img must be an (H, W[, C]) array with H, W >= 1, got "
                         f"{getattr(img, 'shape', type(img).__name__)}")
    height, width = int(img.shape[0]), int(img.shape[1])
    if width >= height:
        if width / height < min_ratio:
            return [], []
        n_w = int(math.floor(width / height + 0.5))
        n_w = min(int(math.floor(width / min_crop_size)), n_w)
        n_w = min(max_num_crops, max(2, n_w))
        n_h = 1
    else:
        if height / width < min_ratio:
            return [], []
        n_h = int(math.floor(height / width + 0.5))
        n_h = min(int(math.floor(height / min_crop_size)), n_h)
        n_h = min(max_num_crops, max(2, n_h))
        n_w = 1
    cw, ch = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(cw, ch) < min_crop_size:
        return [], []
    # range(0, width, cw), not n_w steps: with a small min_crop_size, n_w * cw can pass the
    # width by a whole crop (9 px in 4 crops of 3), and that crop would be empty
    boxes = [(x, y, min(x + cw, width), min(y + ch, height))
             for y in range(0, min(ch * n_h, height), ch)
             for x in range(0, min(cw * n_w, width), cw)]
    return [img[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes], boxes


_pan_and_scan = pan_and_scan  # preprocess's argument of the same name shadows it


def _check_crop_args(min_crop_size: Any, max_num_crops: Any, min_ratio: Any) -> None:
    _check.integer("min_crop_size", min_crop_size, 1)
    _check.integer("max_num_crops", max_num_crops, 1)
    _check.number("min_ratio", min_ratio, 0, lo_open=True)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(height, width, C)`` uint8 with PIL's BILINEAR (antialiased)."""
    return _core.image_resize(img, height, width)


def preprocess(img: Any, pan_and_scan: bool = False, size: int = 896, *, alpha: str | None = None,
               min_crop_size: int = 256, max_num_crops: int = 4,
               min_ratio: float = 1.2) -> ImageInput:
    """A picture (anything :func:`load_image` takes) -> :class:`ImageInput` with
    ``pixel_values (1 + n_crops, 3, size, size)`` float32: each of the picture and its crops
    resized to ``size × size`` (aspect ratio not kept, as the reference) and mapped to
    ``x / 127.5 - 1``. Pan & scan parameters are the processor's ``pan_and_scan_*`` ones."""
    size = _check.integer("size", size, 1, 16384)
    if pan_and_scan:
        _check_crop_args(min_crop_size, max_num_crops, min_ratio)
    rgb = load_image(img, alpha=alpha)
    crops, boxes = ([], [])
    if pan_and_scan:
        crops, boxes = _pan_and_scan(rgb, min_crop_size, max_num_crops, min_ratio)
    px = np.empty((1 + len(crops), 3, size, size), np.float32)
    for i, im in enumerate([rgb, *crops]):
        px[i] = _core.image_preprocess(im, size)
    return ImageInput(px, boxes, (int(rgb.shape[0]), int(rgb.shape[1])))
