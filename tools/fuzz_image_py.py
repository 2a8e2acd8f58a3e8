"""Atheris harness: gemma3.image on arbitrary bytes — load_image and preprocess (pan & scan).

    tools/fuzz.sh image_py SECONDS

The input is an image file (seeds: PNG/JPEG/WebP from tests/data/images and small Pillow WebPs):
WebP goes to the C decoder, anything else to Pillow (every format Pillow recognises). Its last
bytes choose the preprocessing: output size 1..32, pan & scan on with min_crop_size 1..64 and
max_num_crops 1..5, alpha mode; every fourth input also goes through the PIL-image path (the
harness opens it with Pillow, gemma3 loads and composites it).

Checked invariants: load_image gives (H, W, 3) uint8; pixel_values is (1 + n_crops, 3, size,
size) float32 in [-1, 1]; crop boxes are non-empty and inside the picture; original_size is the
picture's. Documented failures: ValueError (broken, truncated, empty, non-image, oversized);
TypeError, NotImplementedError are tolerated. The pixel limits are lowered to 2^22 pixels (4096
per side) while an input runs, so that a tiny file declaring a huge picture is refused from its
header (the C WebP probe gets gemma3.image.MAX_PIXELS) instead of costing a large allocation on
every execution; the checks are the same code.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_common  # noqa: E402

with fuzz_common.instrumented(__name__, ["gemma3", "PIL"]):
    from PIL import Image

    from gemma3 import image as gimage

EXPECTED = (ValueError, TypeError, NotImplementedError)



@contextlib.contextmanager
def _lowered_limits():
    """gemma3.image's limits (and Pillow's bomb check, which errors at twice its value) lowered
    for one input, restored after: importing this module (the regression test) changes nothing."""
    saved = gimage.MAX_SIDE, gimage.MAX_PIXELS, Image.MAX_IMAGE_PIXELS
    gimage.MAX_SIDE, gimage.MAX_PIXELS, Image.MAX_IMAGE_PIXELS = 4096, 1 << 22, 1 << 21
    try:
        yield
    finally:
        gimage.MAX_SIDE, gimage.MAX_PIXELS, Image.MAX_IMAGE_PIXELS = saved

ROOT = Path(__file__).resolve().parent.parent


def _check(inp, h: int, w: int, size: int) -> None:
    px = inp.pixel_values
    assert px.dtype == np.float32 and px.shape == (1 + len(inp.crops), 3, size, size), px.shape
    assert np.all(px >= -1.0) and np.all(px <= 1.0), "pixel values outside [-1, 1]"
    assert inp.original_size == (h, w)
    for x0, y0, x1, y1 in inp.crops:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (inp.crops, w, h)


def one_input(data: bytes) -> None:
    with _lowered_limits(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings about broken files are expected here
        _one_input(data)


def _one_input(data: bytes) -> None:
    t = data[-4:].rjust(4, b"\0")
    size, min_crop, max_crops = 1 + t[3] % 32, 1 + t[2] % 64, 1 + t[1] % 5
    alpha = (None, "white", "drop")[t[0] % 3]
    rgb = gimage.load_image(data, alpha=alpha)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, rgb.shape
    h, w = rgb.shape[:2]
    inp = gimage.preprocess(data, pan_and_scan=True, size=size, alpha=alpha,
                            min_crop_size=min_crop, max_num_crops=max_crops)
    _check(inp, h, w, size)
    if t[0] % 4 == 0:
        try:
            im = Image.open(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - Pillow refusing the bytes is not gemma3's concern
            return
        inp = gimage.preprocess(im, pan_and_scan=True, size=size, min_crop_size=min_crop,
                                max_num_crops=max_crops)
        _check(inp, *inp.original_size, size)


def seeds() -> dict[str, bytes]:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_fuzz_seeds

    out = make_fuzz_seeds.image_seeds(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for fmt, mode in [("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("JPEG", "RGB"), ("GIF", "P"),
                      ("BMP", "RGB"), ("TIFF", "RGB")]:
        im = Image.fromarray(rng.integers(0, 256, (12, 40, 4), dtype=np.uint8), "RGBA")
        im = im.convert(mode)
        b = io.BytesIO()
        im.save(b, fmt)
        out[f"small_{mode.lower()}.{fmt.lower()}"] = b.getvalue()
    return out


if __name__ == "__main__":
    fuzz_common.main(sys.modules[__name__])
